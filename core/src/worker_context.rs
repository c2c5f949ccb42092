//! Nameko's worker context: the context data a worker inherits from the message it handles and
//! passes on to every RPC request and event it sends.
//!
//! Inbound, every header becomes context data under its name with a leading `nameko.` stripped
//! (headers without the prefix keep their own name), except broker and framework internals
//! ([`is_internal_header`]). Each worker gets a call id `<service>.<method>.<uuid4>` and a call
//! id stack: the inbound `call_id_stack` plus its own id, at most [`MAX_CALL_ID_STACK`] entries.
//! Outbound, the whole context goes out as `nameko.<key>` headers (null values dropped) plus
//! `nameko.call_id_stack`. See `wire/nameko.md` section 1.4.
//!
//! Building a [`WorkerContext`] is O(1) and allocates nothing: it keeps the inbound [`Headers`]
//! as they are and computes the stripped view, the call id and the stack only when asked.
//! Header tables are small, so lookups scan linearly.

use std::sync::Arc;

use crate::message::{FieldValue, Headers};
use crate::rng::push_uuid4;

/// Most entries a worker's call id stack holds: Nameko's `parent_calls_tracked` (10) plus the
/// worker's own call id.
pub const MAX_CALL_ID_STACK: usize = 11;

/// The prefix Nameko puts on context data in message headers.
pub const NAMEKO_PREFIX: &str = "nameko.";

/// The context key of the call id stack.
const CALL_ID_STACK: &str = "call_id_stack";

/// The context of one worker (one handler run): inbound context data, the worker's call id and
/// call id stack, and values the handler set for its outbound messages.
///
/// Duplicate keys: when the inbound headers hold both `nameko.<key>` and a bare `<key>`, the
/// `nameko.` one wins (it is what a Nameko peer wrote on purpose); among identical names the
/// first wins, as in [`Headers::get`]. Header names are matched case-sensitively, as AMQP does.
///
/// Cloning costs two `Arc` bumps and two header-table reference-count bumps.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerContext {
    service: Arc<str>,
    method: Arc<str>,
    inbound: Headers,
    call_uuid: u128,
    /// Values set by the handler, keyed by bare context key.
    overrides: Headers,
}

impl WorkerContext {
    /// The context of a worker of `service.method` handling a message with `inbound` headers.
    ///
    /// `call_uuid` is 128 random bits the caller drew (from its seeded [`Rng`](crate::rng::Rng));
    /// it becomes the uuid of the call id, formatted as a version-4 uuid exactly as
    /// [`Rng::uuid4`](crate::rng::Rng::uuid4) formats the same bits. O(1): nothing is copied,
    /// parsed or formatted here, and nothing is validated (bad headers are skipped when read).
    pub fn new(service: Arc<str>, method: Arc<str>, inbound: Headers, call_uuid: u128) -> Self {
        WorkerContext { service, method, inbound, call_uuid, overrides: Headers::new() }
    }

    /// The context of a worker that started from no message (a timer, a standalone call): no
    /// context data and a call id stack holding only its own call id.
    pub fn empty(service: Arc<str>, method: Arc<str>, call_uuid: u128) -> Self {
        Self::new(service, method, Headers::new(), call_uuid)
    }

    /// The service this worker belongs to.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The method (route) this worker runs.
    pub fn method(&self) -> &str {
        &self.method
    }

    /// The worker's call id, `<service>.<method>.<uuid4>`. Formatted on each call (allocates);
    /// the same context always gives the same id.
    pub fn call_id(&self) -> String {
        let mut id = String::with_capacity(self.service.len() + self.method.len() + 38);
        id.push_str(&self.service);
        id.push('.');
        id.push_str(&self.method);
        id.push('.');
        push_uuid4(&mut id, self.call_uuid);
        id
    }

    /// The worker's call id stack: the string entries of the inbound `call_id_stack` followed
    /// by [`call_id`](Self::call_id), trimmed from the oldest end to [`MAX_CALL_ID_STACK`]
    /// entries.
    ///
    /// A missing or non-array inbound stack counts as empty and non-string items are skipped;
    /// this never fails. Values given to [`set`](Self::set) do not affect it.
    pub fn call_id_stack(&self) -> Vec<String> {
        let inbound: Vec<&str> = self.inbound_stack().collect();
        let keep = inbound.len().min(MAX_CALL_ID_STACK - 1);
        let mut stack = Vec::with_capacity(keep + 1);
        stack.extend(inbound[inbound.len() - keep..].iter().map(|s| (*s).to_owned()));
        stack.push(self.call_id());
        stack
    }

    /// The first (oldest) string entry of the inbound call id stack: the call that started the
    /// chain. `None` when the inbound stack is missing or holds no strings.
    pub fn origin_call_id(&self) -> Option<&str> {
        self.inbound_stack().next()
    }

    /// The last string entry of the inbound call id stack: the worker (or client) that sent
    /// this message. `None` when the inbound stack is missing or holds no strings.
    pub fn immediate_parent_call_id(&self) -> Option<&str> {
        self.inbound_stack().last()
    }

    /// Context data: `(key, value)` pairs with keys stripped of `nameko.`, internal headers and
    /// `call_id_stack` left out (it has its own accessor), one pair per key.
    ///
    /// Inbound keys come first in inbound order (a value [`set`](Self::set) for such a key
    /// replaces it in place), then keys only set by the handler, in the order first set.
    /// `Void` values are yielded as they are; only [`outbound_headers`](Self::outbound_headers)
    /// drops them. Allocates nothing.
    pub fn data(&self) -> impl Iterator<Item = (&str, &FieldValue)> {
        let inbound = self.inbound.iter().enumerate().filter_map(move |(at, (name, value))| {
            let key = self.winning_key(at, name)?;
            Some((key, self.overrides.get(key).unwrap_or(value)))
        });
        let added = self.overrides.iter().filter(move |(key, _)| self.inbound_value(key).is_none());
        inbound.chain(added)
    }

    /// The context value under `key` (a bare key such as `user_id`, not `nameko.user_id`), as
    /// [`data`](Self::data) would yield it. `None` for `call_id_stack` and internal names.
    pub fn get(&self, key: &str) -> Option<&FieldValue> {
        self.overrides.get(key).or_else(|| self.inbound_value(key))
    }

    /// The `language` context value, if it is a string.
    pub fn language(&self) -> Option<&str> {
        self.get("language").and_then(FieldValue::as_str)
    }

    /// The `user_id` context value, of whatever type it arrived as (Nameko enforces none; an
    /// integer stays an integer).
    pub fn user_id(&self) -> Option<&FieldValue> {
        self.get("user_id")
    }

    /// The `user_agent` context value, if it is a string.
    pub fn user_agent(&self) -> Option<&str> {
        self.get("user_agent").and_then(FieldValue::as_str)
    }

    /// The `auth_token` context value, if it is a string.
    pub fn auth_token(&self) -> Option<&str> {
        self.get("auth_token").and_then(FieldValue::as_str)
    }

    /// The headers for an RPC request or event this worker sends: `nameko.<key>` for every
    /// [`data`](Self::data) entry whose value is not `Void`, in that order, then
    /// `nameko.call_id_stack` as an array of strings ([`call_id_stack`](Self::call_id_stack)).
    ///
    /// A foreign inbound header `x-foo` goes out as `nameko.x-foo`. Replies carry no headers;
    /// this is not for them. Allocates a fresh table on every call.
    pub fn outbound_headers(&self) -> Headers {
        let stack = self.call_id_stack().into_iter().map(FieldValue::Str).collect();
        self.data()
            .filter(|(_, value)| !matches!(value, FieldValue::Void))
            .map(|(key, value)| (prefixed(key), value.clone()))
            .chain(std::iter::once((prefixed(CALL_ID_STACK), FieldValue::Array(stack))))
            .collect()
    }

    /// Sets the context value under the bare `key` for this worker's later outbound messages
    /// and for [`get`](Self::get) and [`data`](Self::data); `Void` keeps the key out of
    /// outbound headers.
    ///
    /// The key is taken literally (`nameko.` is not stripped). Setting `call_id_stack` or an
    /// internal name ([`is_internal_header`]) is ignored: the stack is derived from the call id,
    /// and internals are never propagated.
    pub fn set(&mut self, key: impl Into<String>, value: FieldValue) {
        let key = key.into();
        if key == CALL_ID_STACK || is_internal_header(&key) {
            return;
        }
        self.overrides.insert(key, value);
    }
}

/// True for headers that must never be propagated as context: broker internals (`x-death`,
/// `x-delay`, names starting `x-first-death-`) and every framework internal (names starting
/// `x-microfw-`). A name starting `nameko.` is checked again after stripping the prefix.
///
/// Case-sensitive, as AMQP header names are. It does not treat `call_id_stack` as internal:
/// that key travels, but [`WorkerContext`] rebuilds it instead of copying it.
pub fn is_internal_header(name: &str) -> bool {
    let bare = name.strip_prefix(NAMEKO_PREFIX).unwrap_or(name);
    is_internal_bare(name) || is_internal_bare(bare)
}

impl WorkerContext {
    /// Everything the context holds, for [`worker_wire`](crate::worker_wire): service, method,
    /// inbound headers, call uuid and the handler's overrides.
    pub(crate) fn wire_parts(&self) -> (&str, &str, &Headers, u128, &Headers) {
        (&self.service, &self.method, &self.inbound, self.call_uuid, &self.overrides)
    }

    /// The inverse of [`wire_parts`](Self::wire_parts).
    pub(crate) fn from_wire_parts(
        service: Arc<str>,
        method: Arc<str>,
        inbound: Headers,
        call_uuid: u128,
        overrides: Headers,
    ) -> Self {
        WorkerContext { service, method, inbound, call_uuid, overrides }
    }
}

impl WorkerContext {
    /// The string items of the inbound call id stack, oldest first.
    fn inbound_stack(&self) -> impl DoubleEndedIterator<Item = &str> {
        let items = match self.inbound_raw(CALL_ID_STACK) {
            Some(FieldValue::Array(items)) => items.as_slice(),
            _ => &[],
        };
        items.iter().filter_map(FieldValue::as_str)
    }

    /// The inbound context value under the bare `key`, internals and the stack excluded.
    fn inbound_value(&self, key: &str) -> Option<&FieldValue> {
        if key == CALL_ID_STACK || is_internal_header(key) {
            return None;
        }
        self.inbound_raw(key)
    }

    /// The inbound value under the bare `key`: the first `nameko.<key>` header, else the first
    /// header whose whole name is `key` (and does not itself carry the prefix).
    fn inbound_raw(&self, key: &str) -> Option<&FieldValue> {
        let mut bare = None;
        for (name, value) in self.inbound.iter() {
            match name.strip_prefix(NAMEKO_PREFIX) {
                Some(stripped) if stripped == key => return Some(value),
                None if name == key && bare.is_none() => bare = Some(value),
                _ => {}
            }
        }
        bare
    }

    /// The bare key of the inbound header at position `at` named `name`, if that header is
    /// context data and the one that wins for its key.
    fn winning_key<'a>(&self, at: usize, name: &'a str) -> Option<&'a str> {
        let (key, has_prefix) = match name.strip_prefix(NAMEKO_PREFIX) {
            Some(stripped) => (stripped, true),
            None => (name, false),
        };
        if key == CALL_ID_STACK || is_internal_header(name) {
            return None;
        }
        let earlier_same = self.inbound.iter().take(at).any(|(other, _)| other == name);
        let prefixed_elsewhere = !has_prefix
            && self.inbound.iter().any(|(other, _)| other.strip_prefix(NAMEKO_PREFIX) == Some(key));
        (!earlier_same && !prefixed_elsewhere).then_some(key)
    }
}

/// The internal-name test on one name, without stripping.
fn is_internal_bare(name: &str) -> bool {
    name == "x-death"
        || name == "x-delay"
        || name.starts_with("x-first-death-")
        || name.starts_with("x-microfw-")
}

/// `nameko.<key>`.
fn prefixed(key: &str) -> String {
    let mut name = String::with_capacity(NAMEKO_PREFIX.len() + key.len());
    name.push_str(NAMEKO_PREFIX);
    name.push_str(key);
    name
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::rng::Rng;

    const UUID: u128 = 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210;
    const UUID_TEXT: &str = "01234567-89ab-4def-bedc-ba9876543210";

    fn headers(entries: &[(&str, FieldValue)]) -> Headers {
        entries.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect()
    }

    fn strs(items: &[&str]) -> FieldValue {
        FieldValue::Array(items.iter().map(|s| FieldValue::from(*s)).collect())
    }

    fn ctx(entries: &[(&str, FieldValue)]) -> WorkerContext {
        WorkerContext::new(Arc::from("echo"), Arc::from("nested"), headers(entries), UUID)
    }

    fn data_of(ctx: &WorkerContext) -> Vec<(String, FieldValue)> {
        ctx.data().map(|(k, v)| (k.to_owned(), v.clone())).collect()
    }

    #[test]
    fn strips_the_prefix_and_keeps_bare_names() {
        let c = ctx(&[("nameko.language", "en".into()), ("x-foo", "bar".into())]);
        assert_eq!(
            data_of(&c),
            vec![("language".to_owned(), "en".into()), ("x-foo".to_owned(), "bar".into())]
        );
        assert_eq!(c.language(), Some("en"));
        assert_eq!(c.get("x-foo"), Some(&FieldValue::from("bar")));
        assert_eq!(c.get("nameko.language"), None);
    }

    #[test]
    fn internals_are_excluded() {
        let c = ctx(&[
            ("x-death", FieldValue::Array(vec![])),
            ("x-delay", FieldValue::I64(100)),
            ("x-first-death-queue", "q".into()),
            ("x-microfw-attempt", FieldValue::I64(2)),
            ("nameko.x-microfw-foo", "f".into()),
            ("nameko.x-death", "d".into()),
            ("user_agent", "ua".into()),
        ]);
        assert_eq!(data_of(&c), vec![("user_agent".to_owned(), "ua".into())]);
        for key in ["x-death", "x-delay", "x-first-death-queue", "x-microfw-attempt", "x-microfw-foo"] {
            assert_eq!(c.get(key), None, "{key}");
        }
        let out = c.outbound_headers();
        assert_eq!(
            out.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            ["nameko.user_agent", "nameko.call_id_stack"]
        );
        assert!(is_internal_header("nameko.x-first-death-reason"));
        assert!(!is_internal_header("x-deathly"));
        assert!(!is_internal_header("X-Death"));
        assert!(!is_internal_header("call_id_stack"));
    }

    #[test]
    fn typed_values_are_kept() {
        let c = ctx(&[("nameko.user_id", FieldValue::I64(7)), ("nameko.flag", FieldValue::Bool(true))]);
        assert_eq!(c.user_id(), Some(&FieldValue::I64(7)));
        assert_eq!(c.get("flag"), Some(&FieldValue::Bool(true)));
        assert_eq!(c.outbound_headers().get("nameko.user_id"), Some(&FieldValue::I64(7)));
    }

    #[test]
    fn call_id_format_and_determinism() {
        let c = ctx(&[]);
        assert_eq!(c.call_id(), format!("echo.nested.{UUID_TEXT}"));
        assert_eq!(c.call_id(), c.clone().call_id());
        let zero = WorkerContext::empty(Arc::from("s"), Arc::from("m"), 0);
        assert_eq!(zero.call_id(), "s.m.00000000-0000-4000-8000-000000000000");
        let ones = WorkerContext::empty(Arc::from("s"), Arc::from("m"), u128::MAX);
        assert_eq!(ones.call_id(), "s.m.ffffffff-ffff-4fff-bfff-ffffffffffff");
    }

    #[test]
    fn uuid_matches_rng_uuid4_for_the_same_bits() {
        for seed in [0, 1, 42, u64::MAX] {
            let mut draw = Rng::from_seed(seed);
            let bits = (u128::from(draw.next_u64()) << 64) | u128::from(draw.next_u64());
            let mut text = String::new();
            push_uuid4(&mut text, bits);
            assert_eq!(text, Rng::from_seed(seed).uuid4());
        }
    }

    #[test]
    fn stack_extends_the_inbound_stack() {
        let c = ctx(&[("nameko.call_id_stack", strs(&["a", "b"]))]);
        assert_eq!(c.call_id_stack(), vec!["a".to_owned(), "b".to_owned(), c.call_id()]);
        assert_eq!(c.origin_call_id(), Some("a"));
        assert_eq!(c.immediate_parent_call_id(), Some("b"));
        assert_eq!(c.get("call_id_stack"), None);
        assert_eq!(c.data().count(), 0);
    }

    #[test]
    fn stack_is_trimmed_from_the_oldest_end() {
        let inbound: Vec<String> = (0..11).map(|i| format!("id{i}")).collect();
        let refs: Vec<&str> = inbound.iter().map(String::as_str).collect();
        let c = ctx(&[("nameko.call_id_stack", strs(&refs))]);
        let stack = c.call_id_stack();
        assert_eq!(stack.len(), MAX_CALL_ID_STACK);
        assert_eq!(stack[0], "id1");
        assert_eq!(stack[9], "id10");
        assert_eq!(stack[10], c.call_id());
        // origin and parent come from the untrimmed inbound stack.
        assert_eq!(c.origin_call_id(), Some("id0"));
        assert_eq!(c.immediate_parent_call_id(), Some("id10"));
    }

    #[test]
    fn bad_stacks_are_tolerated() {
        let missing = ctx(&[]);
        assert_eq!(missing.call_id_stack(), vec![missing.call_id()]);
        assert_eq!((missing.origin_call_id(), missing.immediate_parent_call_id()), (None, None));

        let not_array = ctx(&[("nameko.call_id_stack", "a".into())]);
        assert_eq!(not_array.call_id_stack(), vec![not_array.call_id()]);
        assert_eq!(not_array.origin_call_id(), None);

        let mixed = FieldValue::Array(vec![FieldValue::I64(1), "a".into(), FieldValue::Void, "b".into()]);
        let c = ctx(&[("nameko.call_id_stack", mixed), ("x", FieldValue::I64(2))]);
        assert_eq!(c.call_id_stack(), vec!["a".to_owned(), "b".to_owned(), c.call_id()]);
        assert_eq!((c.origin_call_id(), c.immediate_parent_call_id()), (Some("a"), Some("b")));
    }

    #[test]
    fn bare_stack_is_read_when_no_prefixed_one() {
        let c = ctx(&[("call_id_stack", strs(&["p"]))]);
        assert_eq!(c.immediate_parent_call_id(), Some("p"));
        let both = ctx(&[("call_id_stack", strs(&["bare"])), ("nameko.call_id_stack", strs(&["pre"]))]);
        assert_eq!(both.origin_call_id(), Some("pre"));
    }

    #[test]
    fn prefixed_key_wins_over_bare_duplicate() {
        let c = ctx(&[
            ("user_id", FieldValue::I64(1)),
            ("nameko.user_id", FieldValue::I64(2)),
            ("nameko.user_id", FieldValue::I64(3)),
            ("lang", "a".into()),
            ("lang", "b".into()),
        ]);
        assert_eq!(
            data_of(&c),
            vec![("user_id".to_owned(), FieldValue::I64(2)), ("lang".to_owned(), "a".into())]
        );
        assert_eq!(c.get("user_id"), Some(&FieldValue::I64(2)));
        assert_eq!(c.get("lang"), Some(&FieldValue::from("a")));
    }

    #[test]
    fn double_prefix_strips_once() {
        let c = ctx(&[("nameko.nameko.a", FieldValue::I64(1)), ("nameko.a", FieldValue::I64(2))]);
        assert_eq!(c.get("nameko.a"), Some(&FieldValue::I64(1)));
        assert_eq!(c.get("a"), Some(&FieldValue::I64(2)));
        assert_eq!(c.outbound_headers().get("nameko.nameko.a"), Some(&FieldValue::I64(1)));
    }

    #[test]
    fn outbound_headers_prefix_drop_void_and_put_the_stack_last() {
        let c = ctx(&[
            ("x-foo", "bar".into()),
            ("nameko.call_id_stack", strs(&["a"])),
            ("nameko.auth_token", FieldValue::Void),
            ("nameko.user_id", FieldValue::I64(7)),
        ]);
        let expected = headers(&[
            ("nameko.x-foo", "bar".into()),
            ("nameko.user_id", FieldValue::I64(7)),
            ("nameko.call_id_stack", strs(&["a", &c.call_id()])),
        ]);
        assert_eq!(c.outbound_headers(), expected);
        assert_eq!(c.get("auth_token"), Some(&FieldValue::Void));
        assert_eq!(c.auth_token(), None);
    }

    #[test]
    fn observed_standalone_call_into_echo_nested() {
        let parent = "standalone_rpc_proxy.call.4f3c1a2e-0d5b-4c7a-9e11-2b3c4d5e6f70";
        let c = ctx(&[("nameko.call_id_stack", strs(&[parent]))]);
        let own = format!("echo.nested.{UUID_TEXT}");
        assert_eq!(c.outbound_headers(), headers(&[("nameko.call_id_stack", strs(&[parent, &own]))]));
        assert_eq!(c.origin_call_id(), Some(parent));
        assert_eq!(c.immediate_parent_call_id(), Some(parent));
    }

    #[test]
    fn empty_context_sends_only_its_own_stack() {
        let c = WorkerContext::empty(Arc::from("timer"), Arc::from("tick"), UUID);
        assert_eq!(c.data().count(), 0);
        assert_eq!(c.outbound_headers(), headers(&[("nameko.call_id_stack", strs(&[&c.call_id()]))]));
    }

    #[test]
    fn set_overrides_adds_and_removes() {
        let mut c = ctx(&[("nameko.user_id", FieldValue::I64(7)), ("nameko.language", "en".into())]);
        c.set("user_id", FieldValue::I64(9));
        c.set("tenant", "t1".into());
        c.set("language", FieldValue::Void);
        c.set("call_id_stack", strs(&["forged"]));
        c.set("x-microfw-attempt", FieldValue::I64(5));
        assert_eq!(
            data_of(&c),
            vec![
                ("user_id".to_owned(), FieldValue::I64(9)),
                ("language".to_owned(), FieldValue::Void),
                ("tenant".to_owned(), "t1".into()),
            ]
        );
        let expected = headers(&[
            ("nameko.user_id", FieldValue::I64(9)),
            ("nameko.tenant", "t1".into()),
            ("nameko.call_id_stack", strs(&[&c.call_id()])),
        ]);
        assert_eq!(c.outbound_headers(), expected);
        c.set("tenant", "t2".into());
        assert_eq!(c.get("tenant"), Some(&FieldValue::from("t2")));
        assert_eq!(c.data().count(), 3);
    }

    fn field() -> impl Strategy<Value = FieldValue> {
        prop_oneof![
            Just(FieldValue::Void),
            any::<i64>().prop_map(FieldValue::I64),
            "[a-z]{0,4}".prop_map(FieldValue::Str),
        ]
    }

    fn name() -> impl Strategy<Value = String> {
        let base = prop_oneof![
            Just("user_id".to_owned()),
            Just("call_id_stack".to_owned()),
            Just("x-death".to_owned()),
            Just("x-microfw-attempt".to_owned()),
            "[a-z]{1,3}",
        ];
        (any::<bool>(), base).prop_map(|(p, b)| if p { prefixed(&b) } else { b })
    }

    proptest! {
        #[test]
        fn stack_is_bounded_and_ends_with_own_id(n in 0usize..30) {
            let inbound: Vec<String> = (0..n).map(|i| format!("c{i}")).collect();
            let refs: Vec<&str> = inbound.iter().map(String::as_str).collect();
            let c = ctx(&[("nameko.call_id_stack", strs(&refs))]);
            let stack = c.call_id_stack();
            prop_assert_eq!(stack.len(), (n + 1).min(MAX_CALL_ID_STACK));
            prop_assert_eq!(stack.last(), Some(&c.call_id()));
            prop_assert_eq!(&stack[..stack.len() - 1], &inbound[n - (stack.len() - 1)..]);
        }

        #[test]
        fn next_hop_sees_the_same_data(entries in prop::collection::vec((name(), field()), 0..8), uuid in any::<u128>()) {
            let inbound: Headers = entries.into_iter().collect();
            let c = WorkerContext::new(Arc::from("a"), Arc::from("b"), inbound, uuid);
            let keys: Vec<&str> = c.data().map(|(k, _)| k).collect();
            let mut unique = keys.clone();
            unique.sort_unstable();
            unique.dedup();
            prop_assert_eq!(unique.len(), keys.len());
            for (key, value) in c.data() {
                prop_assert_eq!(c.get(key), Some(value));
            }
            let next = WorkerContext::new(Arc::from("c"), Arc::from("d"), c.outbound_headers(), 0);
            let sent: Vec<_> = c.data().filter(|(_, v)| **v != FieldValue::Void).collect();
            prop_assert_eq!(next.data().collect::<Vec<_>>(), sent);
            let own = c.call_id();
            prop_assert_eq!(next.immediate_parent_call_id(), Some(own.as_str()));
        }
    }
}

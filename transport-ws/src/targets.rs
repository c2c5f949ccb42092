//! Target details and micro_framework's two internal commands, `__list_targets__` and
//! `__get_target__`, which its clients send to build a proxy.
//!
//! A detail is `{"target": <id>, "args": [...], "kwargs": [...], "docstring": <text or null>}`,
//! keys in that order. micro_framework fills it wrongly (methods list `self`, the docstring is
//! null or the framework's own); microfw lists the handler's real parameter names (never the
//! injected extractors: only the fields of its `Params<T>`) and the route's doc text.

use microfw_core::route::RouteSpec;
use microfw_core::{Entrypoint, RemoteError, ServiceSpec};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::reply::{encode_error, encode_raw_ok};
use crate::request::RequestId;
use microfw_core::signature::Signature;
use microfw_core::targets as core_targets;

pub use microfw_core::targets::{GET_TARGET, LIST_TARGETS, is_internal};

/// One RPC target as listed to clients.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetDetail {
    /// The target id (the RPC method name).
    pub target: String,
    /// Parameters a caller must pass, in positional order (Python: positional parameters
    /// without a default).
    #[serde(default)]
    pub args: Vec<String>,
    /// Parameters a caller may leave out (Python: parameters with a default).
    #[serde(default)]
    pub kwargs: Vec<String>,
    /// The doc text, `null` when the route has none.
    #[serde(default)]
    pub docstring: Option<String>,
}

impl TargetDetail {
    /// A detail from its four parts.
    pub fn new(
        target: impl Into<String>,
        args: impl IntoIterator<Item = impl Into<String>>,
        kwargs: impl IntoIterator<Item = impl Into<String>>,
        docstring: Option<String>,
    ) -> Self {
        TargetDetail {
            target: target.into(),
            args: args.into_iter().map(Into::into).collect(),
            kwargs: kwargs.into_iter().map(Into::into).collect(),
            docstring,
        }
    }

    /// The detail of a handler whose RPC parameters are `T` (its `Params<T>`): the field names
    /// from [`microfw_core::params::parameter_names`], in declaration order, split the way Python splits a signature:
    /// fields a caller must pass go to `args`, fields it may leave out (`Option`,
    /// `#[serde(default)]`) to `kwargs`. Either kind may be passed by position or by keyword.
    ///
    /// The split comes from probing `T`'s `Deserialize` impl with placeholder values; when a
    /// field rejects its placeholder (a validating deserializer) every name goes to `args`. A
    /// `T` that is not a struct with named fields (a tuple, `()`, a map) lists no names.
    pub fn for_params<T: for<'de> Deserialize<'de>>(
        target: impl Into<String>,
        docstring: Option<String>,
    ) -> Self {
        TargetDetail::with_signature(target, Signature::of::<T>().as_ref(), docstring)
    }

    fn with_signature(
        target: impl Into<String>,
        signature: Option<&Signature>,
        docstring: Option<String>,
    ) -> Self {
        match signature {
            Some(sig) => TargetDetail::new(
                target,
                sig.required.iter().copied(),
                sig.optional.iter().copied(),
                docstring,
            ),
            None => TargetDetail::new(target, Vec::<String>::new(), Vec::<String>::new(), docstring),
        }
    }

    /// The detail of a route: target = the route's name, docstring = its doc text, `args` /
    /// `kwargs` = its handler's required / optional RPC parameters (the
    /// [`Signature`] the route recorded from its `Params<T>`; none without one). Does not check
    /// that the route is an RPC route.
    pub fn from_route(spec: &RouteSpec) -> Self {
        TargetDetail::with_signature(spec.name.clone(), spec.signature.as_ref(), spec.doc.clone())
    }

    /// The detail as JSON text, keys in the order `target, args, kwargs, docstring`.
    pub fn to_json_string(&self) -> String {
        let mut out = String::with_capacity(64);
        self.push_json(&mut out);
        out
    }

    fn push_json(&self, out: &mut String) {
        out.push_str("{\"target\":");
        push_str_value(out, &self.target);
        out.push_str(",\"args\":");
        push_names(out, &self.args);
        out.push_str(",\"kwargs\":");
        push_names(out, &self.kwargs);
        out.push_str(",\"docstring\":");
        match &self.docstring {
            Some(doc) => push_str_value(out, doc),
            None => out.push_str("null"),
        }
        out.push('}');
    }
}

/// The details of every WebSocket RPC route of a service, in declaration order, from their
/// specs: target = route name, docstring = its doc text.
///
/// Parameter names come from each route's recorded [`Signature`]. Does not list AMQP RPC
/// routes (micro_framework does; calling them over WebSocket fails anyway).
pub fn ws_targets(spec: &ServiceSpec) -> Vec<TargetDetail> {
    spec.routes
        .iter()
        .filter(|(route, _)| matches!(route.entrypoint, Entrypoint::WsRpc(_)))
        .map(|(route, _)| TargetDetail::from_route(route))
        .collect()
}

/// Answers an internal command with the reply frame to send (echoing `id`), or `None` when
/// `method` is not one: then the request is a call for the Engine.
///
/// * `__list_targets__` with no arguments: every detail, in the given order.
/// * `__get_target__` with the target id (positional, or keyword `target`): its detail; an
///   unknown id is a `KeyError` whose message is the id's Python repr (`'nope'`), as
///   micro_framework answers; missing or extra arguments are a `TypeError` worded like
///   Python's.
///
/// Lists exactly the details it is given (pass the WebSocket targets only; micro_framework
/// mixes in its AMQP targets).
pub fn answer_internal(
    method: &str,
    args: &[Value],
    kwargs: &Map<String, Value>,
    targets: &[TargetDetail],
    id: Option<&RequestId>,
) -> Option<String> {
    let result = match method {
        LIST_TARGETS => list_targets(args, kwargs, targets),
        GET_TARGET => get_target(args, kwargs, targets).map(TargetDetail::to_json_string),
        _ => return None,
    };
    Some(match result {
        Ok(data) => encode_raw_ok(&data, id),
        Err(error) => encode_error(&error, id),
    })
}

/// Finds the detail `__get_target__` asks for (see [`answer_internal`] for the errors).
pub fn get_target<'a>(
    args: &[Value],
    kwargs: &Map<String, Value>,
    targets: &'a [TargetDetail],
) -> Result<&'a TargetDetail, RemoteError> {
    // The arguments and the errors are micro_framework's; core owns them (the Engine answers
    // these commands with the same rules).
    match core_targets::target_key(args, kwargs)? {
        Value::String(name) => targets
            .iter()
            .find(|t| t.target == *name)
            .ok_or_else(|| core_targets::key_error(&Value::String(name.clone()))),
        other => Err(core_targets::key_error(other)),
    }
}

/// Why a target listing could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ListingError {
    /// The value is not a detail object (or, for a listing, not an array of them).
    #[error("not a target listing: {0}")]
    Invalid(String),
}

/// Reads a `__list_targets__` result (client side). Unknown keys in a detail are ignored;
/// missing `args`, `kwargs` or `docstring` are empty / null; `target` is required.
pub fn parse_target_list(data: &Value) -> Result<Vec<TargetDetail>, ListingError> {
    Vec::<TargetDetail>::deserialize(data).map_err(|e| ListingError::Invalid(e.to_string()))
}

/// Reads a `__get_target__` result (client side), with the same tolerance as
/// [`parse_target_list`].
pub fn parse_target_detail(data: &Value) -> Result<TargetDetail, ListingError> {
    TargetDetail::deserialize(data).map_err(|e| ListingError::Invalid(e.to_string()))
}

// ---------------------------------------------------------------------------------------------
// Private helpers.

fn list_targets(
    args: &[Value],
    kwargs: &Map<String, Value>,
    targets: &[TargetDetail],
) -> Result<String, RemoteError> {
    core_targets::check_list_targets(args, kwargs)?;
    let mut out = String::with_capacity(2 + targets.len() * 64);
    out.push('[');
    for (i, t) in targets.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        t.push_json(&mut out);
    }
    out.push(']');
    Ok(out)
}

fn push_str_value(out: &mut String, s: &str) {
    out.push_str(&Value::String(s.to_owned()).to_string());
}

fn push_names(out: &mut String, names: &[String]) {
    out.push('[');
    for (i, n) in names.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_str_value(out, n);
    }
    out.push(']');
}

#[cfg(test)]
mod tests {
    use super::*;
    use microfw_core::{Route, WsRpcListener, extract::Params};
    use serde_json::json;

    fn v(text: &str) -> Value {
        serde_json::from_str(text).unwrap()
    }

    fn targets() -> Vec<TargetDetail> {
        vec![
            // The wire notes' `def f(a, b=1, *args, c, d=2, **kw)`.
            TargetDetail::new("f", ["a", "args"], ["b", "d", "kw"], None),
            TargetDetail::new("K.m", ["x"], ["y"], Some("Adds things.".into())),
        ]
    }

    fn call(method: &str, args: Value, kwargs: Value, id: Option<&RequestId>) -> Option<Value> {
        let Value::Array(args) = args else { panic!() };
        let Value::Object(kwargs) = kwargs else { panic!() };
        answer_internal(method, &args, &kwargs, &targets(), id).map(|t| v(&t))
    }

    #[test]
    fn details_serialize_with_keys_in_order() {
        let text = targets()[0].to_json_string();
        assert_eq!(text, r#"{"target":"f","args":["a","args"],"kwargs":["b","d","kw"],"docstring":null}"#);
        // serde's derive agrees with the hand-written order.
        assert_eq!(serde_json::to_string(&targets()[1]).unwrap(), targets()[1].to_json_string());
    }

    #[test]
    fn list_targets_answers_every_detail_in_order() {
        let text = answer_internal(LIST_TARGETS, &[], &Map::new(), &targets(), Some(&RequestId::from(1i64)))
            .unwrap();
        assert!(text.starts_with(r#"{"data":[{"target":"f","args""#));
        assert_eq!(
            v(&text),
            json!({"data": [
                {"target": "f", "args": ["a", "args"], "kwargs": ["b", "d", "kw"], "docstring": null},
                {"target": "K.m", "args": ["x"], "kwargs": ["y"], "docstring": "Adds things."},
            ], "exception": null, "id": 1})
        );
        let listed = parse_target_list(&v(&text)["data"]).unwrap();
        assert_eq!(listed, targets());
    }

    #[test]
    fn get_target_finds_one_or_answers_like_python() {
        let found = call(GET_TARGET, json!(["K.m"]), json!({}), None).unwrap();
        assert_eq!(parse_target_detail(&found["data"]).unwrap(), targets()[1]);
        let by_keyword = call(GET_TARGET, json!([]), json!({"target": "f"}), None).unwrap();
        assert_eq!(by_keyword["data"]["target"], json!("f"));
        let error = |args, kwargs| call(GET_TARGET, args, kwargs, None).unwrap()["exception"].clone();
        assert_eq!(error(json!(["nope"]), json!({})), json!({"exception": "KeyError", "message": "'nope'"}));
        assert_eq!(
            error(json!(["it's"]), json!({})),
            json!({"exception": "KeyError", "message": "\"it's\""})
        );
        assert_eq!(error(json!([5]), json!({})), json!({"exception": "KeyError", "message": "5"}));
        assert_eq!(
            error(json!([[1]]), json!({})),
            json!({"exception": "TypeError", "message": "unhashable type: 'list'"})
        );
        assert_eq!(
            error(json!([]), json!({})),
            json!({"exception": "TypeError",
                "message": "__get_target__() missing 1 required positional argument: 'target'"})
        );
        assert_eq!(
            error(json!(["a", "b"]), json!({})),
            json!({"exception": "TypeError", "message": "__get_target__() takes 3 positional arguments but 4 were given"})
        );
        assert_eq!(
            error(json!(["f"]), json!({"target": "f"}))["message"],
            json!("__get_target__() got multiple values for argument 'target'")
        );
        assert_eq!(
            error(json!([]), json!({"x": 1}))["message"],
            json!("__get_target__() got an unexpected keyword argument 'x'")
        );
        assert_eq!(
            call(LIST_TARGETS, json!([1]), json!({}), None).unwrap()["exception"]["message"],
            json!("__list_targets__() takes 2 positional arguments but 3 were given")
        );
    }

    #[test]
    fn other_commands_are_not_internal() {
        assert_eq!(call("f", json!([]), json!({}), None), None);
        assert!(is_internal(LIST_TARGETS) && is_internal(GET_TARGET) && !is_internal("__call__"));
    }

    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct Add {
        a: i64,
        #[serde(rename = "second")]
        b: i64,
    }

    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct Greet {
        name: String,
        title: Option<String>,
        #[serde(default)]
        times: u32,
        loud: bool,
    }

    #[test]
    fn details_come_from_parameter_types_and_routes() {
        let d = TargetDetail::for_params::<Add>("add", Some("Adds.".into()));
        assert_eq!(d, TargetDetail::new("add", ["a", "second"], Vec::<String>::new(), Some("Adds.".into())));
        let d = TargetDetail::for_params::<Greet>("greet", None);
        assert_eq!(d, TargetDetail::new("greet", ["name", "loud"], ["title", "times"], None));
        let d = TargetDetail::for_params::<(i64, i64)>("pair", None);
        assert!(d.args.is_empty() && d.kwargs.is_empty());
        let route: Route =
            Route::blocking(WsRpcListener, "add", |Params(p): Params<Add>| microfw_core::Reply(p.a))
                .doc("Adds two numbers.");
        let d = TargetDetail::from_route(route.spec());
        assert_eq!(
            d,
            TargetDetail::new("add", ["a", "second"], Vec::<String>::new(), Some("Adds two numbers.".into()))
        );
        let other =
            Route::blocking(microfw_core::RpcListener::default(), "amqp_only", |Params(()): Params<()>| {
                microfw_core::Reply(1)
            });
        let service = microfw_core::Service::new("svc")
            .context(microfw_core::RunnerContext::new(1).route(route).route(other));
        let (spec, _) = service.build().unwrap();
        // The route recorded its Params<Add> signature: the listing has the names.
        assert_eq!(
            ws_targets(&spec),
            vec![TargetDetail::new(
                "add",
                ["a", "second"],
                Vec::<String>::new(),
                Some("Adds two numbers.".into())
            )]
        );
    }

    #[test]
    fn listings_tolerate_missing_and_unknown_keys_but_need_a_target() {
        let d = parse_target_detail(&json!({"target": "t", "extra": 1})).unwrap();
        assert_eq!(d, TargetDetail::new("t", Vec::<String>::new(), Vec::<String>::new(), None));
        assert!(parse_target_detail(&json!({"args": []})).is_err());
        assert!(parse_target_list(&json!({"target": "t"})).is_err());
        assert!(parse_target_list(&json!([{"target": 5}])).is_err());
    }
}

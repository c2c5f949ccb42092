//! RPC argument binding: Python's `args` and `kwargs` onto a Rust type.
//!
//! A Python caller sends positional arguments (a JSON array) and keyword arguments (a JSON
//! object). A handler takes one `T: Deserialize`. [`bind`] binds them the way Python binds a
//! call to a signature:
//!
//! * **Structs with named fields**: positional arguments fill the fields in declaration order,
//!   then keyword arguments fill fields by name. Any field may be passed by keyword. Too many
//!   positional arguments, an unknown keyword, a field given twice, a missing required field
//!   or a value of the wrong type is a [`SignatureError`]. `Option` fields and
//!   `#[serde(default)]` fields may be left out, as serde allows.
//! * **Tuples, tuple structs, `Vec`s and other sequences**: positional only; any keyword
//!   argument is [`SignatureError::KeywordsNotAccepted`].
//! * **`()` and unit structs**: no arguments at all.
//! * **Newtype structs** (`struct P(T)`) and **`Option<T>`** bind exactly like `T`.
//! * **Maps** (`HashMap<String, Value>`) and structs with `#[serde(flatten)]`: keyword only.
//!
//! It works by handing `T` a small [`serde::Deserializer`] that receives the struct's field
//! names from serde (`deserialize_struct`) and lines the arguments up against them. Argument
//! values are moved, never cloned or re-parsed, and each is deserialized by `serde_json`'s own
//! `Value` deserializer, so `Option`, nested structs and enums behave as they do in a body.
//!
//! ## What it does not do
//!
//! It does not know about Rust function signatures, only about `T`'s `Deserialize` impl. A field
//! with `#[serde(alias = ..)]` lists all its names in the field list serde hands over, which
//! shifts the positions of later fields: do not use aliases on parameter structs. Map keys are
//! read as strings only (a `HashMap<u32, _>` will not bind).

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::value::StrDeserializer;
use serde::de::{self, DeserializeOwned, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use crate::message::RemoteError;

/// Binds RPC arguments onto `T`: `args` by position onto `T`'s fields in declaration order,
/// then `kwargs` by name (see the [module docs](self) for tuples, units, newtypes and maps).
///
/// Takes the arguments by value and moves each value into `T`; nothing is cloned or re-parsed.
/// Does not apply any defaults beyond the ones `T`'s `Deserialize` impl applies, and does not
/// panic on any input.
///
/// ```
/// # use microfw_core::params::{bind, SignatureError};
/// # use serde_json::{json, Map};
/// #[derive(serde::Deserialize, Debug, PartialEq)]
/// struct Add { a: i64, b: i64 }
///
/// let kwargs: Map<_, _> = [("b".to_string(), json!(2))].into_iter().collect();
/// assert_eq!(bind::<Add>(vec![json!(1)], kwargs), Ok(Add { a: 1, b: 2 }));
/// assert_eq!(
///     bind::<Add>(vec![json!(1), json!(2), json!(3)], Map::new()),
///     Err(SignatureError::TooManyPositional { expected: 2, given: 3 })
/// );
/// ```
pub fn bind<T: DeserializeOwned>(args: Vec<Value>, kwargs: Map<String, Value>) -> Result<T, SignatureError> {
    T::deserialize(Args { args, kwargs }).map_err(|e| e.0)
}

/// Why RPC arguments did not fit a handler's parameters. Each becomes an `IncorrectSignature`
/// remote error (see [`SignatureError::to_remote_error`]); the texts read like Python's
/// `TypeError` messages, without a function name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignatureError {
    /// More positional arguments than the type has parameters.
    #[error("takes {expected} positional argument{} but {given} {} given", plural(.expected), was_were(.given))]
    TooManyPositional {
        /// How many positional parameters the type has.
        expected: usize,
        /// How many positional arguments the caller sent.
        given: usize,
    },
    /// A keyword argument that names no parameter.
    #[error("got an unexpected keyword argument '{0}'")]
    UnexpectedKeyword(String),
    /// A parameter given both positionally and by keyword.
    #[error("got multiple values for argument '{0}'")]
    MultipleValues(String),
    /// A required parameter was not given.
    #[error("missing a required argument: '{0}'")]
    Missing(String),
    /// A value of the wrong type, or anything else serde rejected; holds serde's message.
    #[error("{0}")]
    Mismatch(String),
    /// Keyword arguments sent to a type that takes positional arguments only (a tuple, a
    /// sequence, or a type that is not a struct).
    #[error("takes no keyword arguments")]
    KeywordsNotAccepted,
}

impl SignatureError {
    /// The remote error a server answers with: Nameko's `IncorrectSignature` carrying this
    /// error's text.
    pub fn to_remote_error(&self) -> RemoteError {
        RemoteError::incorrect_signature(self.to_string())
    }
}

/// The parameter names of `T` as [`bind`] sees them: the struct's field names in declaration
/// order (after serde renames), for target listings.
///
/// `None` for types that are not structs with named fields (tuples, `()`, sequences, maps,
/// primitives, structs with `#[serde(flatten)]`). A unit struct gives `Some(&[])`. Newtype
/// structs, `Option<T>` and `Box<T>` give `T`'s names. Never panics on its own account; it runs
/// `T`'s `Deserialize` impl against a tracing deserializer, which stops at the first request.
pub fn parameter_names<T: for<'de> Deserialize<'de>>() -> Option<&'static [&'static str]> {
    match T::deserialize(Tracer) {
        Err(TraceStop::Fields(fields)) => Some(fields),
        Err(TraceStop::Other) | Ok(_) => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Binding.

/// The error type of the binding deserializer: a [`SignatureError`] that serde can build.
#[derive(Debug)]
struct BindError(SignatureError);

impl fmt::Display for BindError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for BindError {}

impl de::Error for BindError {
    fn custom<M: fmt::Display>(msg: M) -> Self {
        BindError(SignatureError::Mismatch(msg.to_string()))
    }

    fn missing_field(field: &'static str) -> Self {
        BindError(SignatureError::Missing(field.to_owned()))
    }

    // Only raised by a sequence visitor at the top level (values go through serde_json).
    fn invalid_length(len: usize, exp: &dyn de::Expected) -> Self {
        let (s, verb) = (plural(&len), was_were(&len));
        BindError(SignatureError::Mismatch(format!(
            "expected {exp}, but {len} positional argument{s} {verb} given"
        )))
    }
}

impl From<SignatureError> for BindError {
    fn from(e: SignatureError) -> Self {
        BindError(e)
    }
}

/// The arguments of one call, as a deserializer.
struct Args {
    args: Vec<Value>,
    kwargs: Map<String, Value>,
}

impl Args {
    /// Positional arguments as a sequence; keywords are refused.
    fn visit_positional<'de, V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, BindError> {
        if !self.kwargs.is_empty() {
            return Err(SignatureError::KeywordsNotAccepted.into());
        }
        let given = self.args.len();
        let mut seq = Positional { iter: self.args.into_iter(), index: 0 };
        let value = visitor.visit_seq(&mut seq)?;
        if seq.iter.len() > 0 {
            return Err(SignatureError::TooManyPositional { expected: seq.index, given }.into());
        }
        Ok(value)
    }

    /// Keyword arguments as a map; positional arguments are refused.
    fn visit_keywords<'de, V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, BindError> {
        if !self.args.is_empty() {
            let given = self.args.len();
            return Err(SignatureError::TooManyPositional { expected: 0, given }.into());
        }
        let iter = self.kwargs.into_iter().map(|(k, v)| (Cow::Owned(k), v));
        visitor.visit_map(Named { iter, pending: None })
    }
}

impl<'de> Deserializer<'de> for Args {
    type Error = BindError;

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, BindError> {
        let Args { args, kwargs } = self;
        if args.len() > fields.len() {
            return Err(
                SignatureError::TooManyPositional { expected: fields.len(), given: args.len() }.into()
            );
        }
        let positional = args.len();
        let mut entries: Vec<(Cow<'static, str>, Value)> = Vec::with_capacity(positional + kwargs.len());
        entries.extend(fields.iter().zip(args).map(|(name, v)| (Cow::Borrowed(*name), v)));
        for (key, value) in kwargs {
            match fields.iter().position(|f| *f == key) {
                None => return Err(SignatureError::UnexpectedKeyword(key).into()),
                Some(i) if i < positional => return Err(SignatureError::MultipleValues(key).into()),
                Some(i) => entries.push((Cow::Borrowed(fields[i]), value)),
            }
        }
        visitor.visit_map(Named { iter: entries.into_iter(), pending: None })
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, BindError> {
        self.visit_keywords(visitor)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, BindError> {
        self.visit_positional(visitor)
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, BindError> {
        if self.kwargs.is_empty() && self.args.len() > len {
            return Err(SignatureError::TooManyPositional { expected: len, given: self.args.len() }.into());
        }
        self.visit_positional(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, BindError> {
        self.deserialize_tuple(len, visitor)
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, BindError> {
        if !self.args.is_empty() {
            return Err(SignatureError::TooManyPositional { expected: 0, given: self.args.len() }.into());
        }
        if let Some(key) = self.kwargs.into_iter().next().map(|(k, _)| k) {
            return Err(SignatureError::UnexpectedKeyword(key).into());
        }
        visitor.visit_unit()
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, BindError> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, BindError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, BindError> {
        visitor.visit_some(self)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, BindError> {
        visitor.visit_unit()
    }

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, BindError> {
        self.visit_positional(visitor)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf identifier enum
    }
}

/// Positional arguments, each value deserialized by serde_json.
struct Positional {
    iter: std::vec::IntoIter<Value>,
    /// How many values were taken so far.
    index: usize,
}

impl<'de> SeqAccess<'de> for Positional {
    type Error = BindError;

    fn next_element_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<Option<S::Value>, BindError> {
        let Some(value) = self.iter.next() else { return Ok(None) };
        self.index += 1;
        let position = self.index;
        seed.deserialize(value)
            .map(Some)
            .map_err(|e| SignatureError::Mismatch(format!("positional argument {position}: {e}")).into())
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.iter.len())
    }
}

/// Named arguments (struct fields or keywords), each value deserialized by serde_json.
struct Named<I> {
    iter: I,
    /// The entry whose key was handed out and whose value is next.
    pending: Option<(Cow<'static, str>, Value)>,
}

impl<'de, I: Iterator<Item = (Cow<'static, str>, Value)>> MapAccess<'de> for Named<I> {
    type Error = BindError;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, BindError> {
        let Some((key, value)) = self.iter.next() else { return Ok(None) };
        let out = seed.deserialize(StrDeserializer::<BindError>::new(&key))?;
        self.pending = Some((key, value));
        Ok(Some(out))
    }

    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, BindError> {
        let Some((key, value)) = self.pending.take() else {
            return Err(de::Error::custom("a value was asked for before its key"));
        };
        seed.deserialize(value).map_err(|e| SignatureError::Mismatch(format!("argument '{key}': {e}")).into())
    }

    fn size_hint(&self) -> Option<usize> {
        self.iter.size_hint().1
    }
}

fn plural(n: &usize) -> &'static str {
    if *n == 1 { "" } else { "s" }
}

fn was_were(n: &usize) -> &'static str {
    if *n == 1 { "was" } else { "were" }
}

// ---------------------------------------------------------------------------------------------
// Tracing the parameter names.

/// A deserializer that answers every request with an error, recording a struct's field names.
struct Tracer;

/// Why the tracer stopped: it saw a struct's fields, or something else.
#[derive(Debug)]
enum TraceStop {
    Fields(&'static [&'static str]),
    Other,
}

impl fmt::Display for TraceStop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("parameter tracing stopped")
    }
}

impl std::error::Error for TraceStop {}

impl de::Error for TraceStop {
    fn custom<M: fmt::Display>(_: M) -> Self {
        TraceStop::Other
    }
}

impl<'de> Deserializer<'de> for Tracer {
    type Error = TraceStop;

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, TraceStop> {
        Err(TraceStop::Fields(fields))
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _visitor: V,
    ) -> Result<V::Value, TraceStop> {
        Err(TraceStop::Fields(&[]))
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, TraceStop> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, TraceStop> {
        visitor.visit_some(self)
    }

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, TraceStop> {
        Err(TraceStop::Other)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit seq tuple tuple_struct map enum identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn kw(pairs: &[(&str, Value)]) -> Map<String, Value> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
    }

    #[derive(Deserialize, Debug, PartialEq)]
    struct Three {
        a: i64,
        b: i64,
        c: i64,
    }

    #[derive(Deserialize, Debug, PartialEq)]
    struct Greet {
        name: String,
        title: Option<String>,
        #[serde(default)]
        times: u32,
    }

    #[derive(Deserialize, Debug, PartialEq)]
    struct Point {
        x: i64,
        y: i64,
    }

    #[derive(Deserialize, Debug, PartialEq)]
    struct Shape {
        label: String,
        origin: Point,
        kind: Kind,
    }

    #[derive(Deserialize, Debug, PartialEq)]
    #[serde(rename_all = "snake_case")]
    enum Kind {
        Square,
        Circle { radius: u32 },
    }

    #[derive(Deserialize, Debug, PartialEq)]
    struct Wrapper(Three);

    #[derive(Deserialize, Debug, PartialEq)]
    struct Nothing;

    #[derive(Deserialize, Debug, PartialEq)]
    struct Pair(i64, String);

    #[derive(Deserialize, Debug, PartialEq)]
    struct Renamed {
        #[serde(rename = "userId")]
        user_id: u64,
        #[serde(skip)]
        cache: u8,
        flag: bool,
    }

    const ABC: Three = Three { a: 1, b: 2, c: 3 };

    #[test]
    fn positional_only() {
        assert_eq!(bind::<Three>(vec![json!(1), json!(2), json!(3)], Map::new()), Ok(ABC));
    }

    #[test]
    fn keyword_only_in_any_order() {
        let kwargs = kw(&[("c", json!(3)), ("a", json!(1)), ("b", json!(2))]);
        assert_eq!(bind::<Three>(vec![], kwargs), Ok(ABC));
    }

    #[test]
    fn mixed_positional_then_keyword() {
        assert_eq!(bind::<Three>(vec![json!(1)], kw(&[("c", json!(3)), ("b", json!(2))])), Ok(ABC));
        assert_eq!(bind::<Three>(vec![json!(1), json!(2)], kw(&[("c", json!(3))])), Ok(ABC));
    }

    #[test]
    fn too_many_positional() {
        let err = bind::<Three>(vec![json!(1), json!(2), json!(3), json!(4)], Map::new()).unwrap_err();
        assert_eq!(err, SignatureError::TooManyPositional { expected: 3, given: 4 });
        assert_eq!(err.to_string(), "takes 3 positional arguments but 4 were given");
        let err = bind::<Nothing>(vec![json!(1)], Map::new()).unwrap_err();
        assert_eq!(err.to_string(), "takes 0 positional arguments but 1 was given");
    }

    #[test]
    fn unknown_keyword() {
        let err =
            bind::<Three>(vec![json!(1), json!(2)], kw(&[("c", json!(3)), ("d", json!(4))])).unwrap_err();
        assert_eq!(err, SignatureError::UnexpectedKeyword("d".into()));
        assert_eq!(err.to_string(), "got an unexpected keyword argument 'd'");
    }

    #[test]
    fn duplicate_positional_and_keyword() {
        let err =
            bind::<Three>(vec![json!(1), json!(2)], kw(&[("a", json!(9)), ("c", json!(3))])).unwrap_err();
        assert_eq!(err, SignatureError::MultipleValues("a".into()));
        assert_eq!(err.to_string(), "got multiple values for argument 'a'");
    }

    #[test]
    fn missing_required_is_the_first_in_declaration_order() {
        let err = bind::<Three>(vec![json!(1)], Map::new()).unwrap_err();
        assert_eq!(err, SignatureError::Missing("b".into()));
        assert_eq!(err.to_string(), "missing a required argument: 'b'");
        assert_eq!(
            bind::<Greet>(vec![], kw(&[("title", json!("Dr"))])),
            Err(SignatureError::Missing("name".into()))
        );
    }

    #[test]
    fn option_and_default_fields_may_be_omitted() {
        let g: Greet = bind(vec![json!("Ada")], Map::new()).unwrap();
        assert_eq!(g, Greet { name: "Ada".into(), title: None, times: 0 });
        let g: Greet = bind(vec![json!("Ada")], kw(&[("times", json!(2))])).unwrap();
        assert_eq!(g, Greet { name: "Ada".into(), title: None, times: 2 });
        let g: Greet = bind(vec![json!("Ada"), json!(null), json!(5)], Map::new()).unwrap();
        assert_eq!(g, Greet { name: "Ada".into(), title: None, times: 5 });
        let g: Greet = bind(vec![json!("Ada"), json!("Dr")], Map::new()).unwrap();
        assert_eq!(g.title.as_deref(), Some("Dr"));
    }

    #[test]
    fn type_mismatch_names_the_argument_and_keeps_serdes_message() {
        let err = bind::<Three>(vec![json!(1), json!("two"), json!(3)], Map::new()).unwrap_err();
        let SignatureError::Mismatch(msg) = &err else { panic!("not a mismatch: {err:?}") };
        assert!(msg.starts_with("argument 'b': invalid type: string \"two\""), "{msg}");
        assert!(msg.contains("i64"), "{msg}");
        let remote = err.to_remote_error();
        assert_eq!(remote, RemoteError::incorrect_signature(msg.clone()));
    }

    #[test]
    fn nested_struct_and_enum_values_bind_through_serde_json() {
        let shape: Shape = bind(
            vec![json!("box")],
            kw(&[("origin", json!({"x": 1, "y": -2})), ("kind", json!({"circle": {"radius": 4}}))]),
        )
        .unwrap();
        assert_eq!(
            shape,
            Shape { label: "box".into(), origin: Point { x: 1, y: -2 }, kind: Kind::Circle { radius: 4 } }
        );
        let shape: Shape =
            bind(vec![json!("sq"), json!({"x": 0, "y": 0}), json!("square")], Map::new()).unwrap();
        assert_eq!(shape.kind, Kind::Square);
        // A nested missing field is the nested value's problem: a mismatch on that argument.
        let err = bind::<Shape>(vec![json!("sq"), json!({"x": 0}), json!("square")], Map::new()).unwrap_err();
        assert_eq!(err, SignatureError::Mismatch("argument 'origin': missing field `y`".into()));
    }

    #[test]
    fn renamed_and_skipped_fields() {
        let r: Renamed = bind(vec![json!(7)], kw(&[("flag", json!(true))])).unwrap();
        assert_eq!(r, Renamed { user_id: 7, cache: 0, flag: true });
        let err = bind::<Renamed>(vec![], kw(&[("user_id", json!(7)), ("flag", json!(true))])).unwrap_err();
        assert_eq!(err, SignatureError::UnexpectedKeyword("user_id".into()));
        assert_eq!(parameter_names::<Renamed>(), Some(&["userId", "flag"][..]));
    }

    #[test]
    fn tuples_bind_positionally() {
        assert_eq!(bind::<(i64, String)>(vec![json!(1), json!("x")], Map::new()), Ok((1, "x".to_string())));
        assert_eq!(bind::<Pair>(vec![json!(1), json!("x")], Map::new()), Ok(Pair(1, "x".into())));
        assert_eq!(
            bind::<Vec<Value>>(vec![json!(1), json!("x")], Map::new()),
            Ok(vec![json!(1), json!("x")])
        );
        assert_eq!(
            bind::<(i64, String)>(vec![json!(1), json!("x"), json!(2)], Map::new()),
            Err(SignatureError::TooManyPositional { expected: 2, given: 3 })
        );
        let err = bind::<(i64, String)>(vec![json!(1)], Map::new()).unwrap_err();
        assert_eq!(
            err,
            SignatureError::Mismatch(
                "expected a tuple of size 2, but 1 positional argument was given".into()
            )
        );
        let err = bind::<(i64, String)>(vec![json!("1"), json!("x")], Map::new()).unwrap_err();
        assert!(
            matches!(&err, SignatureError::Mismatch(m) if m.starts_with("positional argument 1: invalid type"))
        );
    }

    #[test]
    fn tuples_refuse_keywords() {
        let err = bind::<(i64, String)>(vec![json!(1)], kw(&[("b", json!("x"))])).unwrap_err();
        assert_eq!(err, SignatureError::KeywordsNotAccepted);
        assert_eq!(err.to_string(), "takes no keyword arguments");
        assert_eq!(
            bind::<Vec<Value>>(vec![], kw(&[("b", json!(1))])),
            Err(SignatureError::KeywordsNotAccepted)
        );
        assert_eq!(bind::<Value>(vec![], kw(&[("b", json!(1))])), Err(SignatureError::KeywordsNotAccepted));
    }

    #[test]
    fn unit_takes_no_arguments() {
        assert_eq!(bind::<()>(vec![], Map::new()), Ok(()));
        assert_eq!(bind::<Nothing>(vec![], Map::new()), Ok(Nothing));
        assert_eq!(
            bind::<()>(vec![json!(1), json!(2)], Map::new()),
            Err(SignatureError::TooManyPositional { expected: 0, given: 2 })
        );
        assert_eq!(
            bind::<Nothing>(vec![], kw(&[("x", json!(1))])),
            Err(SignatureError::UnexpectedKeyword("x".into()))
        );
    }

    #[test]
    fn newtype_and_option_bind_like_the_inner_type() {
        assert_eq!(
            bind::<Wrapper>(vec![json!(1)], kw(&[("b", json!(2)), ("c", json!(3))])),
            Ok(Wrapper(ABC))
        );
        assert_eq!(bind::<Option<Three>>(vec![json!(1), json!(2), json!(3)], Map::new()), Ok(Some(ABC)));
        assert_eq!(bind::<Wrapper>(vec![], Map::new()), Err(SignatureError::Missing("a".into())));
    }

    #[test]
    fn maps_take_keywords_only() {
        let got: HashMap<String, Value> = bind(vec![], kw(&[("x", json!(1)), ("y", json!([2]))])).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got["x"], json!(1));
        assert_eq!(got["y"], json!([2]));
        assert_eq!(
            bind::<HashMap<String, Value>>(vec![json!(1)], Map::new()),
            Err(SignatureError::TooManyPositional { expected: 0, given: 1 })
        );
        let err = bind::<HashMap<String, u8>>(vec![], kw(&[("x", json!(-1))])).unwrap_err();
        assert!(matches!(&err, SignatureError::Mismatch(m) if m.starts_with("argument 'x': invalid value")));
    }

    #[test]
    fn flattened_struct_takes_keywords_and_reports_missing() {
        #[derive(Deserialize, Debug, PartialEq)]
        struct Flat {
            id: u32,
            #[serde(flatten)]
            rest: HashMap<String, Value>,
        }
        let got: Flat = bind(vec![], kw(&[("id", json!(4)), ("z", json!(true))])).unwrap();
        assert_eq!(got.id, 4);
        assert_eq!(got.rest.get("z"), Some(&json!(true)));
        assert_eq!(bind::<Flat>(vec![], kw(&[("z", json!(1))])), Err(SignatureError::Missing("id".into())));
        assert_eq!(parameter_names::<Flat>(), None);
    }

    #[test]
    fn primitives_are_a_mismatch() {
        let err = bind::<i64>(vec![json!(1)], Map::new()).unwrap_err();
        assert!(matches!(&err, SignatureError::Mismatch(m) if m.contains("invalid type: sequence")));
    }

    #[test]
    fn parameter_names_of_structs_and_wrappers() {
        assert_eq!(parameter_names::<Three>(), Some(&["a", "b", "c"][..]));
        assert_eq!(parameter_names::<Greet>(), Some(&["name", "title", "times"][..]));
        assert_eq!(parameter_names::<Wrapper>(), Some(&["a", "b", "c"][..]));
        assert_eq!(parameter_names::<Option<Three>>(), Some(&["a", "b", "c"][..]));
        assert_eq!(parameter_names::<Box<Point>>(), Some(&["x", "y"][..]));
        assert_eq!(parameter_names::<Nothing>(), Some(&[][..]));
    }

    #[test]
    fn parameter_names_of_non_structs() {
        assert_eq!(parameter_names::<(i64, String)>(), None);
        assert_eq!(parameter_names::<Pair>(), None);
        assert_eq!(parameter_names::<()>(), None);
        assert_eq!(parameter_names::<Vec<Value>>(), None);
        assert_eq!(parameter_names::<HashMap<String, Value>>(), None);
        assert_eq!(parameter_names::<Value>(), None);
        assert_eq!(parameter_names::<i64>(), None);
        assert_eq!(parameter_names::<Kind>(), None);
        assert_eq!(parameter_names::<Option<(u8,)>>(), None);
    }

    proptest! {
        /// Any split into a positional prefix and keywords (in any order) binds the same struct.
        #[test]
        fn any_positional_keyword_split_binds_the_same(
            values in proptest::array::uniform3(any::<i64>()),
            split in 0usize..=3,
            order in Just(vec![0usize, 1, 2]).prop_shuffle(),
        ) {
            let names = ["a", "b", "c"];
            let args: Vec<Value> = values[..split].iter().map(|v| json!(v)).collect();
            let kwargs: Map<String, Value> = order
                .iter()
                .filter(|&&i| i >= split)
                .map(|&i| (names[i].to_string(), json!(values[i])))
                .collect();
            let got: Three = bind(args, kwargs).unwrap();
            prop_assert_eq!(got, Three { a: values[0], b: values[1], c: values[2] });
        }

        /// Arbitrary argument lists never panic, and succeed exactly when they fit the signature.
        #[test]
        fn arbitrary_arguments_bind_or_fail_cleanly(
            args in proptest::collection::vec(any::<i64>(), 0..5),
            keys in proptest::collection::btree_set(prop_oneof![Just("a"), Just("b"), Just("c"), Just("d")], 0..4),
        ) {
            let n = args.len();
            let kwargs: Map<String, Value> = keys.iter().map(|k| (k.to_string(), json!(0))).collect();
            let fits = n <= 3
                && !keys.contains("d")
                && keys.iter().all(|k| ["a", "b", "c"].iter().position(|f| f == k).is_some_and(|i| i >= n))
                && n + keys.len() == 3;
            let result = bind::<Three>(args.into_iter().map(Value::from).collect(), kwargs);
            prop_assert_eq!(result.is_ok(), fits, "{:?}", result);
        }
    }
}

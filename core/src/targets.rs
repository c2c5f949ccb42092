//! Target listings: micro_framework's internal commands `__list_targets__` and
//! `__get_target__`, which its clients send before any call to build their proxies.
//!
//! The Engine answers them itself on micro_framework-dialect and WebSocket RPC subscriptions
//! (Nameko has no such commands): no handler runs and no worker slot is taken. Each detail is
//! built from the route: its name, its handler's [`Signature`] (required parameters as
//! `args`, optional ones as `kwargs`) and its doc text, so the listing is right where
//! micro_framework's own is wrong (it lists `self`, injected dependencies and its own class
//! docstring).

use serde_json::{Map, Value};

use crate::message::RemoteError;
use crate::route::RouteSpec;

/// The command that lists every target of the subscription.
pub const LIST_TARGETS: &str = "__list_targets__";
/// The command that describes one target.
pub const GET_TARGET: &str = "__get_target__";

/// True for micro_framework's internal commands.
pub fn is_internal(method: &str) -> bool {
    method == LIST_TARGETS || method == GET_TARGET
}

/// One target's detail as micro_framework's clients read it:
/// `{"target", "args", "kwargs", "docstring"}`.
pub fn detail(route: &RouteSpec) -> Value {
    let (args, kwargs) = match &route.signature {
        Some(sig) => (names(&sig.required), names(&sig.optional)),
        None => (Value::Array(Vec::new()), Value::Array(Vec::new())),
    };
    let mut detail = Map::new();
    detail.insert("target".to_owned(), Value::String(route.name.clone()));
    detail.insert("args".to_owned(), args);
    detail.insert("kwargs".to_owned(), kwargs);
    detail.insert("docstring".to_owned(), route.doc.clone().map_or(Value::Null, Value::String));
    Value::Object(detail)
}

/// Answers an internal command over `routes` (the targets of one subscription, in order),
/// with micro_framework's errors for bad arguments (see [`check_list_targets`],
/// [`target_key`], [`key_error`]).
pub fn answer<'a>(
    method: &str,
    args: &[Value],
    kwargs: &Map<String, Value>,
    mut routes: impl Iterator<Item = &'a RouteSpec>,
) -> Result<Value, RemoteError> {
    if method == LIST_TARGETS {
        check_list_targets(args, kwargs)?;
        return Ok(Value::Array(routes.map(detail).collect()));
    }
    let key = target_key(args, kwargs)?;
    match key {
        Value::String(id) => routes.find(|r| r.name == *id).map(detail).ok_or_else(|| key_error(key)),
        other => Err(key_error(other)),
    }
}

/// `__list_targets__` takes no arguments: anything else is the `TypeError` Python raises.
pub fn check_list_targets(args: &[Value], kwargs: &Map<String, Value>) -> Result<(), RemoteError> {
    const NAME: &str = "__list_targets__()";
    if let Some(unexpected) = kwargs.keys().next() {
        return Err(type_error(format!("{NAME} got an unexpected keyword argument '{unexpected}'")));
    }
    if !args.is_empty() {
        let given = args.len() + 2;
        return Err(type_error(format!("{NAME} takes 2 positional arguments but {given} were given")));
    }
    Ok(())
}

/// The target id `__get_target__` was given (first positional argument, or keyword
/// `target`), or the `TypeError` Python raises for a missing, doubled or extra argument.
pub fn target_key<'a>(args: &'a [Value], kwargs: &'a Map<String, Value>) -> Result<&'a Value, RemoteError> {
    const NAME: &str = "__get_target__()";
    if let Some(unexpected) = kwargs.keys().find(|k| k.as_str() != "target") {
        return Err(type_error(format!("{NAME} got an unexpected keyword argument '{unexpected}'")));
    }
    match (args, kwargs.get("target")) {
        ([], None) => Err(type_error(format!("{NAME} missing 1 required positional argument: 'target'"))),
        ([key], None) | ([], Some(key)) => Ok(key),
        ([_], Some(_)) => Err(type_error(format!("{NAME} got multiple values for argument 'target'"))),
        _ => {
            let given = args.len() + 2;
            Err(type_error(format!("{NAME} takes 3 positional arguments but {given} were given")))
        }
    }
}

/// The error for a target id no route has, as micro_framework's dict lookup raises it: a
/// `KeyError` whose message is the key's Python repr, or a `TypeError` for unhashable keys.
pub fn key_error(key: &Value) -> RemoteError {
    let key_error = |repr: String| RemoteError::new("builtins", "KeyError", repr);
    match key {
        Value::String(name) => key_error(python_str_repr(name)),
        Value::Array(_) => type_error("unhashable type: 'list'".to_owned()),
        Value::Object(_) => type_error("unhashable type: 'dict'".to_owned()),
        Value::Null => key_error("None".to_owned()),
        Value::Bool(b) => key_error(if *b { "True" } else { "False" }.to_owned()),
        Value::Number(n) => key_error(n.to_string()),
    }
}

fn type_error(message: String) -> RemoteError {
    RemoteError::new("builtins", "TypeError", message)
}

/// Python's `repr()` of a `str`: single quotes unless the text holds a single quote and no
/// double quote; backslash, the quote and control characters escaped.
fn python_str_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

fn names(list: &[&'static str]) -> Value {
    Value::Array(list.iter().map(|n| Value::String((*n).to_owned())).collect())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn no_kwargs() -> Map<String, Value> {
        Map::new()
    }

    #[test]
    fn get_target_arguments_fail_like_python() {
        let kw = |k: &str| {
            let mut m = Map::new();
            m.insert(k.to_owned(), json!("x"));
            m
        };
        assert_eq!(target_key(&[json!("f")], &no_kwargs()), Ok(&json!("f")));
        assert_eq!(target_key(&[], &kw("target")), Ok(&json!("x")));
        let message = |r: Result<&Value, RemoteError>| r.map_err(|e| (e.exc_type, e.message)).unwrap_err();
        assert_eq!(
            message(target_key(&[], &no_kwargs())),
            ("TypeError".into(), "__get_target__() missing 1 required positional argument: 'target'".into())
        );
        assert_eq!(
            message(target_key(&[json!(1)], &kw("target"))).1,
            "__get_target__() got multiple values for argument 'target'"
        );
        assert_eq!(
            message(target_key(&[], &kw("other"))).1,
            "__get_target__() got an unexpected keyword argument 'other'"
        );
        assert_eq!(
            message(target_key(&[json!(1), json!(2)], &no_kwargs())).1,
            "__get_target__() takes 3 positional arguments but 4 were given"
        );
        assert_eq!(check_list_targets(&[json!(1)], &no_kwargs()).unwrap_err().exc_type, "TypeError");
        assert!(check_list_targets(&[], &no_kwargs()).is_ok());
    }

    #[test]
    fn unknown_keys_are_reported_with_their_python_repr() {
        assert_eq!(key_error(&json!("nope")).message, "'nope'");
        assert_eq!(key_error(&json!("it's")).message, "\"it's\"");
        assert_eq!(key_error(&json!("a\nb")).message, "'a\\nb'");
        assert_eq!(key_error(&json!(null)).message, "None");
        assert_eq!(key_error(&json!(true)).message, "True");
        assert_eq!(key_error(&json!(7)).message, "7");
        assert_eq!(key_error(&json!([1])).exc_type, "TypeError");
    }
}

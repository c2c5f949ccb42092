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

/// Answers an internal command over `routes` (the targets of one subscription, in order).
/// `__get_target__` takes the target id as its first positional argument or as keyword
/// `target`; an unknown id is micro_framework's `KeyError`, a missing one a `TypeError`.
pub fn answer<'a>(
    method: &str,
    args: &[Value],
    kwargs: &Map<String, Value>,
    routes: impl Iterator<Item = &'a RouteSpec>,
) -> Result<Value, RemoteError> {
    if method == LIST_TARGETS {
        return Ok(Value::Array(routes.map(detail).collect()));
    }
    let wanted = args.first().or_else(|| kwargs.get("target"));
    let Some(wanted) = wanted else {
        return Err(RemoteError::new(
            "builtins",
            "TypeError",
            "get_target() missing 1 required positional argument: 'target'",
        ));
    };
    let id = match wanted {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    routes
        .into_iter()
        .find(|r| r.name == id)
        .map(detail)
        .ok_or_else(|| RemoteError::new("builtins", "KeyError", format!("'{id}'")))
}

fn names(list: &[&'static str]) -> Value {
    Value::Array(list.iter().map(|n| Value::String((*n).to_owned())).collect())
}

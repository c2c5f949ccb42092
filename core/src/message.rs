//! The neutral message model: what a transport codec decodes deliveries into and encodes
//! publishes from.
//!
//! Nothing here knows a wire format. transport-amqp maps AMQP properties and bodies to
//! [`Envelope`] per dialect (Nameko or micro_framework); transport-ws maps WebSocket
//! frames; the memory link moves envelopes as they are.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::{Map, Value};

/// A typed AMQP field value (header values are not strings: Nameko sends `call_id_stack` as
/// an array and `user_id` may be an integer).
///
/// Integer widths collapse to `I64`; a transport picks the wire width when encoding.
#[derive(Clone, Debug, PartialEq)]
pub enum FieldValue {
    /// No value (AMQP `V`).
    Void,
    /// A boolean.
    Bool(bool),
    /// Any integer.
    I64(i64),
    /// Any float.
    F64(f64),
    /// A text string (AMQP long string, UTF-8).
    Str(String),
    /// A byte array.
    Bytes(Vec<u8>),
    /// An array of values.
    Array(Vec<FieldValue>),
    /// A nested table.
    Table(Headers),
    /// An AMQP timestamp, seconds since the Unix epoch.
    Timestamp(u64),
}

impl FieldValue {
    /// The string inside, if this is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            FieldValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The integer inside, if this is an integer.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            FieldValue::I64(n) => Some(*n),
            _ => None,
        }
    }

    /// The value as JSON: what a handler sees in its context data.
    pub fn to_json(&self) -> Value {
        match self {
            FieldValue::Void => Value::Null,
            FieldValue::Bool(b) => Value::Bool(*b),
            FieldValue::I64(n) => Value::from(*n),
            FieldValue::F64(x) => Value::from(*x),
            FieldValue::Str(s) => Value::String(s.clone()),
            FieldValue::Bytes(b) => Value::String(String::from_utf8_lossy(b).into_owned()),
            FieldValue::Array(items) => Value::Array(items.iter().map(FieldValue::to_json).collect()),
            FieldValue::Table(t) => {
                Value::Object(t.iter().map(|(k, v)| (k.to_owned(), v.to_json())).collect())
            }
            FieldValue::Timestamp(t) => Value::from(*t),
        }
    }
}

impl From<&str> for FieldValue {
    fn from(s: &str) -> Self {
        FieldValue::Str(s.to_owned())
    }
}

impl From<String> for FieldValue {
    fn from(s: String) -> Self {
        FieldValue::Str(s)
    }
}

impl From<i64> for FieldValue {
    fn from(n: i64) -> Self {
        FieldValue::I64(n)
    }
}

impl From<bool> for FieldValue {
    fn from(b: bool) -> Self {
        FieldValue::Bool(b)
    }
}

/// An ordered header table. Lookups scan linearly: tables are small, and scanning beats
/// hashing (and allocating) at these sizes.
///
/// Cloning is a reference-count bump (the entries are shared, copied on the first write), so
/// the Engine can keep a delivery's headers for a retry while the handler reads them.
#[derive(Clone, Default)]
pub struct Headers(Option<Arc<Vec<(String, FieldValue)>>>);

impl Headers {
    /// An empty table (no allocation).
    pub const fn new() -> Self {
        Headers(None)
    }

    /// The value under `name`, if any (first match).
    pub fn get(&self, name: &str) -> Option<&FieldValue> {
        self.entries().iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }

    /// Sets `name` to `value`, replacing an existing entry in place.
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<FieldValue>) {
        let name = name.into();
        let value = value.into();
        let entries = Arc::make_mut(self.0.get_or_insert_with(Default::default));
        match entries.iter_mut().find(|(k, _)| *k == name) {
            Some(slot) => slot.1 = value,
            None => entries.push((name, value)),
        }
    }

    /// Removes `name`, returning its value.
    pub fn remove(&mut self, name: &str) -> Option<FieldValue> {
        let at = self.entries().iter().position(|(k, _)| k == name)?;
        let entries = Arc::make_mut(self.0.as_mut()?);
        Some(entries.remove(at).1)
    }

    /// Entries in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &FieldValue)> {
        self.entries().iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries().len()
    }

    /// True when there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries().is_empty()
    }

    fn entries(&self) -> &[(String, FieldValue)] {
        self.0.as_deref().map_or(&[], Vec::as_slice)
    }
}

impl PartialEq for Headers {
    fn eq(&self, other: &Self) -> bool {
        self.entries() == other.entries()
    }
}

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl FromIterator<(String, FieldValue)> for Headers {
    fn from_iter<I: IntoIterator<Item = (String, FieldValue)>>(iter: I) -> Self {
        let entries: Vec<_> = iter.into_iter().collect();
        if entries.is_empty() { Headers(None) } else { Headers(Some(Arc::new(entries))) }
    }
}

impl IntoIterator for Headers {
    type Item = (String, FieldValue);
    type IntoIter = std::vec::IntoIter<(String, FieldValue)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.map(Arc::unwrap_or_clone).unwrap_or_default().into_iter()
    }
}

/// The message properties the core reads or sets. A codec fills the rest of the wire
/// properties from its dialect's defaults.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Properties {
    /// MIME type of a raw body (`application/json` for every peer we speak to).
    pub content_type: Option<String>,
    /// RPC: the correlation id a reply must echo.
    pub correlation_id: Option<String>,
    /// RPC: where the reply goes (a routing key on the RPC exchange for Nameko, a queue
    /// name for micro_framework, a connection for WebSocket).
    pub reply_to: Option<String>,
    /// Per-message time to live, in milliseconds (RPC requests carry the caller's timeout).
    pub expiration_ms: Option<u64>,
}

/// What a message carries, as far as the core needs to understand it.
#[derive(Clone, Debug, PartialEq)]
pub enum Body {
    /// An event or other payload, still encoded (JSON in practice). Decoded at most once,
    /// and only when a filter, a translator or the handler needs it.
    Raw(Bytes),
    /// A decoded RPC request.
    Request(RpcRequest),
    /// An RPC request whose body the codec could not read; the Engine answers it with a
    /// `MalformedRequest` error when it has somewhere to reply.
    MalformedRequest {
        /// What was wrong, for the error reply and the log.
        reason: String,
    },
    /// A decoded RPC reply.
    Reply(RpcReply),
}

/// A decoded RPC request.
#[derive(Clone, Debug, PartialEq)]
pub struct RpcRequest {
    /// The method (Nameko: the routing key's last word; micro_framework: `command`).
    pub method: String,
    /// Positional arguments.
    pub args: Vec<Value>,
    /// Keyword arguments.
    pub kwargs: Map<String, Value>,
}

/// A decoded RPC reply: the method's result or the remote error.
#[derive(Clone, Debug, PartialEq)]
pub struct RpcReply {
    /// `Ok(result)` or the error the remote side reported.
    pub result: Result<Value, RemoteError>,
}

/// A message in neutral form: addressing, headers, the properties the core uses, and a body.
#[derive(Clone, Debug, PartialEq)]
pub struct Envelope {
    /// The exchange it was published to (empty for the default exchange).
    pub exchange: String,
    /// Its routing key (for a delayed retry: the original routing key).
    pub routing_key: String,
    /// Header table (Nameko context travels here as `nameko.*`).
    pub headers: Headers,
    /// Properties.
    pub properties: Properties,
    /// The body.
    pub body: Body,
}

impl Envelope {
    /// An event-like envelope with a raw body and no headers.
    pub fn raw(exchange: impl Into<String>, routing_key: impl Into<String>, body: impl Into<Bytes>) -> Self {
        Envelope {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            headers: Headers::new(),
            properties: Properties {
                content_type: Some("application/json".to_owned()),
                ..Properties::default()
            },
            body: Body::Raw(body.into()),
        }
    }
}

/// A remote error in neutral form; each dialect encodes it (Nameko
/// `{"exc_type","exc_path","exc_args","value"}`, micro_framework `{"exception","message"}`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteError {
    /// The exception type name, e.g. `ValueError`, `MethodNotFound`.
    pub exc_type: String,
    /// The dotted module the type lives in, e.g. `builtins`, `nameko.exceptions`.
    pub module: String,
    /// The exception's arguments, each as text (Nameko's "safe for JSON" form).
    pub args: Vec<String>,
    /// The exception as text (`str(exc)`).
    pub message: String,
}

impl RemoteError {
    /// An error of type `exc_type` in `module` with one argument, the message.
    pub fn new(module: impl Into<String>, exc_type: impl Into<String>, message: impl Into<String>) -> Self {
        let message = message.into();
        RemoteError { exc_type: exc_type.into(), module: module.into(), args: vec![message.clone()], message }
    }

    /// The dotted path of the type (`module.Type`), Nameko's `exc_path`.
    pub fn path(&self) -> String {
        if self.module.is_empty() {
            self.exc_type.clone()
        } else {
            format!("{}.{}", self.module, self.exc_type)
        }
    }

    /// The error a server answers for a method it does not have.
    pub fn method_not_found(method: &str) -> Self {
        RemoteError::new(NAMEKO_EXCEPTIONS, "MethodNotFound", method)
    }

    /// The error a server answers for a request body it cannot read.
    pub fn malformed_request(reason: impl Into<String>) -> Self {
        RemoteError::new(NAMEKO_EXCEPTIONS, "MalformedRequest", reason)
    }

    /// The error for arguments that do not fit the method's parameters.
    pub fn incorrect_signature(reason: impl Into<String>) -> Self {
        RemoteError::new(NAMEKO_EXCEPTIONS, "IncorrectSignature", reason)
    }

    /// The error a server answers when a handler panicked or failed without saying more.
    pub fn internal(message: impl Into<String>) -> Self {
        RemoteError::new("microfw", "HandlerError", message)
    }
}

impl std::fmt::Display for RemoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.exc_type, self.message)
    }
}

impl std::error::Error for RemoteError {}

/// The module Nameko's own exceptions live in; Python callers re-raise these by path.
pub const NAMEKO_EXCEPTIONS: &str = "nameko.exceptions";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_insert_replaces_in_place() {
        let mut h = Headers::new();
        h.insert("a", 1i64);
        h.insert("b", "x");
        h.insert("a", 2i64);
        assert_eq!(h.len(), 2);
        assert_eq!(h.get("a"), Some(&FieldValue::I64(2)));
        assert_eq!(h.iter().next().map(|(k, _)| k), Some("a"));
        assert_eq!(h.remove("a"), Some(FieldValue::I64(2)));
        assert_eq!(h.get("a"), None);
    }

    #[test]
    fn field_values_become_json() {
        let v = FieldValue::Array(vec![FieldValue::from("svc.m.1"), FieldValue::I64(7), FieldValue::Void]);
        assert_eq!(v.to_json(), serde_json::json!(["svc.m.1", 7, null]));
    }

    #[test]
    fn remote_error_paths() {
        let e = RemoteError::method_not_found("nope");
        assert_eq!(e.path(), "nameko.exceptions.MethodNotFound");
        assert_eq!(e.args, vec!["nope".to_owned()]);
        assert_eq!(RemoteError::new("", "X", "m").path(), "X");
    }
}

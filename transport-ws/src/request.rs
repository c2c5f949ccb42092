//! Requests: one text frame in, a [`WsRequest`] or a [`RequestError`] out (server side); an
//! [`RpcRequest`] and optional id in, one text frame out (client side).
//!
//! Wire shape: `{"command": str, "command_args": [...], "command_kwargs": {...}, "id"?: str|int}`.
//! micro_framework ignores unknown keys, so a microfw client may send `id` to a
//! micro_framework server; that server answers without it, in order.

use std::fmt;

use microfw_core::{Body, Envelope, Headers, Properties, RemoteError, RpcRequest};
use serde_json::{Map, Value};

use crate::reply;

/// A request's multiplexing id, as the client sent it: a JSON string or integer. Echoed
/// verbatim in the reply (`"7"` and `7` are different ids).
///
/// Does not accept floats, booleans, arrays or objects (those are a
/// [`RequestErrorKind::BadId`]); `"id": null` means no id. Uniqueness is the client's business:
/// nothing here checks it, and a client reusing an id still in flight gets two replies with it.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(Repr);

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Repr {
    Neg(i64),
    Pos(u64),
    Str(String),
}

impl RequestId {
    /// Reads an id from its JSON value: `Some` for a string or an integer (any `i64` or `u64`),
    /// `None` for anything else (including `null`).
    pub fn from_json(value: &Value) -> Option<Self> {
        match value {
            Value::String(s) => Some(RequestId(Repr::Str(s.clone()))),
            Value::Number(n) => match (n.as_u64(), n.as_i64()) {
                (Some(u), _) => Some(RequestId(Repr::Pos(u))),
                (None, Some(i)) => Some(RequestId(Repr::Neg(i))),
                _ => None,
            },
            _ => None,
        }
    }

    /// The id as its JSON value (what the reply echoes).
    pub fn to_json(&self) -> Value {
        match &self.0 {
            Repr::Neg(i) => Value::from(*i),
            Repr::Pos(u) => Value::from(*u),
            Repr::Str(s) => Value::String(s.clone()),
        }
    }

    /// The string inside, if the id is a string.
    pub fn as_str(&self) -> Option<&str> {
        match &self.0 {
            Repr::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The integer inside, if the id is an integer that fits an `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        match &self.0 {
            Repr::Neg(i) => Some(*i),
            Repr::Pos(u) => i64::try_from(*u).ok(),
            Repr::Str(_) => None,
        }
    }
}

impl From<String> for RequestId {
    fn from(s: String) -> Self {
        RequestId(Repr::Str(s))
    }
}

impl From<&str> for RequestId {
    fn from(s: &str) -> Self {
        RequestId(Repr::Str(s.to_owned()))
    }
}

impl From<i64> for RequestId {
    fn from(n: i64) -> Self {
        match u64::try_from(n) {
            Ok(u) => RequestId(Repr::Pos(u)),
            Err(_) => RequestId(Repr::Neg(n)),
        }
    }
}

impl From<u64> for RequestId {
    fn from(n: u64) -> Self {
        RequestId(Repr::Pos(n))
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestId({})", self.to_json())
    }
}

impl fmt::Display for RequestId {
    /// The id as JSON text (`7`, `"abc"`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.to_json(), f)
    }
}

/// A decoded request frame.
#[derive(Clone, Debug, PartialEq)]
pub struct WsRequest {
    /// The multiplexing id; `None` puts the request on the connection's sequential lane.
    pub id: Option<RequestId>,
    /// The call: `command`, `command_args`, `command_kwargs`.
    pub request: RpcRequest,
}

impl WsRequest {
    /// The envelope to hand the Engine as a [`Delivery`](microfw_core::Delivery) on the
    /// `Source::WsRpc` subscription: routing key = the method, `reply_to` = the connection's
    /// name, `correlation_id` = the IO half's key for this request (it maps the Engine's
    /// `Destination::Reply` publish back to the connection, the lane ticket and the id).
    ///
    /// Does not put the id anywhere: the IO half keeps it next to the correlation id.
    pub fn into_envelope(self, reply_to: impl Into<String>, correlation_id: impl Into<String>) -> Envelope {
        Envelope {
            exchange: String::new(),
            routing_key: self.request.method.clone(),
            headers: Headers::new(),
            properties: Properties {
                content_type: Some("application/json".to_owned()),
                correlation_id: Some(correlation_id.into()),
                reply_to: Some(reply_to.into()),
                expiration_ms: None,
            },
            body: Body::Request(self.request),
        }
    }
}

/// A frame that is not a usable request. Carries the id when it could be read, so the error
/// reply can echo it (and the IO half can place it on the right lane).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind}")]
pub struct RequestError {
    /// The request's id, when the frame was a JSON object with a valid `id`.
    pub id: Option<RequestId>,
    /// What was wrong.
    pub kind: RequestErrorKind,
}

/// What was wrong with a request frame.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestErrorKind {
    /// Not JSON. Holds the message in Python's `json.JSONDecodeError` wording
    /// (`Expecting value: line 1 column 1 (char 0)`).
    #[error("{0}")]
    Json(String),
    /// JSON, but not an object.
    #[error("the request must be a JSON object, got {0}")]
    NotAnObject(&'static str),
    /// No `command` key.
    #[error("the request has no `command`")]
    MissingCommand,
    /// `command` is not a string.
    #[error("`command` must be a string, got {0}")]
    CommandNotString(&'static str),
    /// `command_args` is present, not null, and not an array.
    #[error("`command_args` must be an array, got {0}")]
    ArgsNotArray(&'static str),
    /// `command_kwargs` is present, not null, and not an object.
    #[error("`command_kwargs` must be an object, got {0}")]
    KwargsNotObject(&'static str),
    /// `id` is present, not null, and neither a string nor an integer.
    #[error("`id` must be a string or an integer, got {0}")]
    BadId(&'static str),
    /// A binary frame: this protocol speaks text frames only.
    #[error("binary frames are not supported: send the request as a text frame")]
    Binary,
}

impl RequestError {
    /// The remote error the reply carries: `JSONDecodeError` for [`RequestErrorKind::Json`]
    /// (as micro_framework answers), `MalformedRequest` for everything else.
    pub fn to_remote_error(&self) -> RemoteError {
        match &self.kind {
            RequestErrorKind::Json(message) => RemoteError::new("json.decoder", "JSONDecodeError", message),
            other => RemoteError::malformed_request(other.to_string()),
        }
    }

    /// The error reply frame to send, echoing the id when there is one.
    pub fn reply(&self) -> String {
        reply::encode_error(&self.to_remote_error(), self.id.as_ref())
    }
}

/// Decodes one text frame into a request.
///
/// Never panics, whatever the input; every failure is a [`RequestError`] (with the id when the
/// frame was an object carrying a valid one). Keys other than the four above are ignored.
/// `null` for `command_args`, `command_kwargs` or `id` counts as absent. Does not check the
/// size (see [`check_size`](crate::check_size)) nor whether the command exists.
pub fn decode_request(text: &str) -> Result<WsRequest, RequestError> {
    let value: Value = serde_json::from_str(text).map_err(|e| RequestError {
        id: None,
        kind: RequestErrorKind::Json(python_json_message(text, &e)),
    })?;
    let Value::Object(mut object) = value else {
        return Err(RequestError { id: None, kind: RequestErrorKind::NotAnObject(type_name(&value)) });
    };
    let id = match object.remove("id") {
        None | Some(Value::Null) => None,
        Some(v) => match RequestId::from_json(&v) {
            Some(id) => Some(id),
            None => return Err(RequestError { id: None, kind: RequestErrorKind::BadId(type_name(&v)) }),
        },
    };
    let fail = |kind| Err(RequestError { id: id.clone(), kind });
    let method = match object.remove("command") {
        Some(Value::String(s)) => s,
        None => return fail(RequestErrorKind::MissingCommand),
        Some(other) => return fail(RequestErrorKind::CommandNotString(type_name(&other))),
    };
    let args = match object.remove("command_args") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a,
        Some(other) => return fail(RequestErrorKind::ArgsNotArray(type_name(&other))),
    };
    let kwargs = match object.remove("command_kwargs") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m,
        Some(other) => return fail(RequestErrorKind::KwargsNotObject(type_name(&other))),
    };
    Ok(WsRequest { id, request: RpcRequest { method, args, kwargs } })
}

/// The error for a binary frame (text frames only). The payload is not looked at, so no id
/// is echoed; the reply goes on the sequential lane.
pub fn decode_binary(_payload: &[u8]) -> RequestError {
    RequestError { id: None, kind: RequestErrorKind::Binary }
}

/// Encodes a request frame (client side): `command`, `command_args`, `command_kwargs`, then
/// `id` when given. A micro_framework server ignores the id and answers in order.
pub fn encode_request(request: &RpcRequest, id: Option<&RequestId>) -> String {
    let mut out = String::with_capacity(64);
    out.push_str("{\"command\":");
    out.push_str(&Value::String(request.method.clone()).to_string());
    out.push_str(",\"command_args\":");
    push_array(&mut out, &request.args);
    out.push_str(",\"command_kwargs\":");
    push_object(&mut out, &request.kwargs);
    if let Some(id) = id {
        out.push_str(",\"id\":");
        out.push_str(&id.to_string());
    }
    out.push('}');
    out
}

/// Encodes the request an Engine publish carries (`Destination::Rpc` on the WebSocket
/// transport). `None` when the body is not a [`Body::Request`] (the Engine never publishes
/// anything else to a WebSocket RPC destination).
pub fn encode_request_envelope(envelope: &Envelope, id: Option<&RequestId>) -> Option<String> {
    match &envelope.body {
        Body::Request(request) => Some(encode_request(request, id)),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Private helpers.

fn push_array(out: &mut String, items: &[Value]) {
    out.push('[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&item.to_string());
    }
    out.push(']');
}

fn push_object(out: &mut String, map: &Map<String, Value>) {
    out.push('{');
    for (i, (k, v)) in map.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&Value::String(k.clone()).to_string());
        out.push(':');
        out.push_str(&v.to_string());
    }
    out.push('}');
}

/// The JSON type of a value, in words, for error messages.
pub(crate) fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// serde_json's error in Python's `JSONDecodeError` shape: `<msg>: line L column C (char N)`,
/// with the position counted in characters as Python does.
fn python_json_message(text: &str, error: &serde_json::Error) -> String {
    let raw = error.to_string();
    // serde_json appends " at line L column C"; keep only the description.
    let description = raw.split(" at line ").next().unwrap_or(&raw);
    let message = if description.starts_with("EOF while parsing")
        || description == "expected value"
        || description == "expected ident"
    {
        "Expecting value".to_owned()
    } else if description == "key must be a string" {
        "Expecting property name enclosed in double quotes".to_owned()
    } else if description == "trailing characters" {
        "Extra data".to_owned()
    } else if description == "expected `,` or `}`" || description == "expected `,` or `]`" {
        "Expecting ',' delimiter".to_owned()
    } else if description == "expected `:`" {
        "Expecting ':' delimiter".to_owned()
    } else {
        let mut chars = description.chars();
        match chars.next() {
            Some(first) => first.to_uppercase().chain(chars).collect(),
            None => "Invalid JSON".to_owned(),
        }
    };
    let (line, column, char_index) = python_position(text, error.line(), error.column());
    format!("{message}: line {line} column {column} (char {char_index})")
}

/// Converts serde_json's (1-based line, 1-based byte column) into Python's (line, 1-based
/// character column, 0-based character index). Positions past the end clamp to the end.
fn python_position(text: &str, line: usize, column: usize) -> (usize, usize, usize) {
    let line = line.max(1);
    let line_start = text.match_indices('\n').nth(line.saturating_sub(2)).map_or(0, |(i, _)| i + 1);
    let line_start = if line == 1 { 0 } else { line_start.min(text.len()) };
    let mut at = line_start.saturating_add(column.saturating_sub(1)).min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let before_line = text[..line_start].chars().count();
    let index = text[..at].chars().count();
    (line, index - before_line + 1, index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn decode_value(text: &str) -> Value {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn decodes_the_wire_example() {
        let r =
            decode_request(r#"{"command": "rpc_add", "command_args": [1, 2], "command_kwargs": {"d": 4}}"#)
                .unwrap();
        assert_eq!(r.id, None);
        assert_eq!(r.request.method, "rpc_add");
        assert_eq!(r.request.args, vec![json!(1), json!(2)]);
        assert_eq!(Value::Object(r.request.kwargs), json!({"d": 4}));
    }

    #[test]
    fn missing_or_null_arguments_are_empty() {
        for text in
            [r#"{"command": "f"}"#, r#"{"command": "f", "command_args": null, "command_kwargs": null}"#]
        {
            let r = decode_request(text).unwrap();
            assert_eq!(r.request, RpcRequest { method: "f".into(), args: vec![], kwargs: Map::new() });
        }
    }

    #[test]
    fn ids_are_strings_or_integers_and_kept_verbatim() {
        let cases = [
            (json!(7), Some(RequestId::from(7i64))),
            (json!("7"), Some(RequestId::from("7"))),
            (json!(-3), Some(RequestId::from(-3i64))),
            (json!(u64::MAX), Some(RequestId::from(u64::MAX))),
            (Value::Null, None),
        ];
        for (id, expected) in cases {
            let text = json!({"command": "f", "id": id}).to_string();
            let r = decode_request(&text).unwrap();
            assert_eq!(r.id, expected);
            if let Some(got) = &r.id {
                assert_eq!(got.to_json(), id);
            }
        }
        assert_ne!(RequestId::from(7i64), RequestId::from("7"));
        assert_eq!(RequestId::from(7u64), RequestId::from(7i64));
        assert_eq!(RequestId::from(7i64).as_i64(), Some(7));
        assert_eq!(RequestId::from("a").as_str(), Some("a"));
        assert_eq!(RequestId::from(u64::MAX).as_i64(), None);
    }

    #[test]
    fn bad_frames_are_errors_that_keep_the_id() {
        let cases: [(&str, Option<RequestId>, RequestErrorKind); 7] = [
            ("[1, 2]", None, RequestErrorKind::NotAnObject("an array")),
            (r#"{"id": 4}"#, Some(4i64.into()), RequestErrorKind::MissingCommand),
            (
                r#"{"id": "x", "command": 5}"#,
                Some("x".into()),
                RequestErrorKind::CommandNotString("a number"),
            ),
            (
                r#"{"id": 1, "command": "f", "command_args": {}}"#,
                Some(1i64.into()),
                RequestErrorKind::ArgsNotArray("an object"),
            ),
            (
                r#"{"command": "f", "command_kwargs": [1]}"#,
                None,
                RequestErrorKind::KwargsNotObject("an array"),
            ),
            (r#"{"command": "f", "id": 1.5}"#, None, RequestErrorKind::BadId("a number")),
            (r#"{"command": "f", "id": [1]}"#, None, RequestErrorKind::BadId("an array")),
        ];
        for (text, id, kind) in cases {
            assert_eq!(decode_request(text), Err(RequestError { id, kind }), "{text}");
        }
    }

    #[test]
    fn malformed_request_reply_echoes_the_id() {
        let err = decode_request(r#"{"id": 9, "command_args": []}"#).unwrap_err();
        assert_eq!(
            decode_value(&err.reply()),
            json!({"data": null, "exception": {"exception": "MalformedRequest",
                "message": "the request has no `command`"}, "id": 9})
        );
    }

    #[test]
    fn malformed_json_answers_json_decode_error_like_python() {
        let err = decode_request("").unwrap_err();
        assert_eq!(err.kind, RequestErrorKind::Json("Expecting value: line 1 column 1 (char 0)".into()));
        assert_eq!(
            decode_value(&err.reply()),
            json!({"data": null, "exception": {"exception": "JSONDecodeError",
                "message": "Expecting value: line 1 column 1 (char 0)"}})
        );
        let err = decode_request("xyz").unwrap_err();
        assert_eq!(err.kind, RequestErrorKind::Json("Expecting value: line 1 column 1 (char 0)".into()));
        let err = decode_request("{\"command\": \"f\"} x").unwrap_err();
        assert_eq!(err.kind, RequestErrorKind::Json("Extra data: line 1 column 18 (char 17)".into()));
        // Positions count characters, over lines.
        let err = decode_request("{\"é\": 1,\n \"b\" 2}").unwrap_err();
        assert_eq!(
            err.kind,
            RequestErrorKind::Json("Expecting ':' delimiter: line 2 column 6 (char 14)".into())
        );
        assert_eq!(err.id, None);
    }

    #[test]
    fn binary_frames_get_a_text_only_error() {
        let err = decode_binary(b"{\"command\": \"f\"}");
        assert_eq!(err.kind, RequestErrorKind::Binary);
        let reply = decode_value(&err.reply());
        assert_eq!(reply["exception"]["exception"], json!("MalformedRequest"));
        assert!(reply["exception"]["message"].as_str().unwrap().contains("text frame"));
        assert_eq!(reply.get("id"), None);
    }

    #[test]
    fn request_encoding_round_trips() {
        let request = RpcRequest {
            method: "ws_task".into(),
            args: vec![json!(1)],
            kwargs: [("b".to_owned(), json!(5))].into_iter().collect(),
        };
        let text = encode_request(&request, None);
        assert_eq!(
            decode_value(&text),
            json!({"command": "ws_task", "command_args": [1], "command_kwargs": {"b": 5}})
        );
        assert_eq!(decode_request(&text).unwrap(), WsRequest { id: None, request: request.clone() });
        let id = RequestId::from("call-1");
        let text = encode_request(&request, Some(&id));
        assert!(text.ends_with(",\"id\":\"call-1\"}"));
        assert_eq!(decode_request(&text).unwrap(), WsRequest { id: Some(id), request });
    }

    #[test]
    fn envelopes_carry_the_request_and_addressing() {
        let r = decode_request(r#"{"command": "f", "command_args": [1], "id": 3}"#).unwrap();
        let env = r.clone().into_envelope("conn-1", "c-9");
        assert_eq!(env.routing_key, "f");
        assert_eq!(env.properties.reply_to.as_deref(), Some("conn-1"));
        assert_eq!(env.properties.correlation_id.as_deref(), Some("c-9"));
        assert_eq!(env.body, Body::Request(r.request.clone()));
        let text = encode_request_envelope(&env, r.id.as_ref()).unwrap();
        assert_eq!(decode_request(&text).unwrap(), r);
        let raw = Envelope::raw("x", "y", "{}");
        assert_eq!(encode_request_envelope(&raw, None), None);
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            // Quarters print and parse back exactly (serde_json's default float parsing is not
            // always exact for arbitrary doubles).
            any::<i32>().prop_map(|n| Value::from(f64::from(n) / 4.0)),
            ".{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(
                    prop_oneof![
                        Just("command".to_owned()),
                        Just("command_args".to_owned()),
                        Just("command_kwargs".to_owned()),
                        Just("id".to_owned()),
                        "[a-z]{0,4}"
                    ],
                    inner,
                    0..6
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Whatever the decoder says, the answer is a request or a well-formed error reply that
    /// echoes the id exactly when the result says so.
    fn check(text: &str) {
        match decode_request(text) {
            Ok(r) => assert!(!encode_request(&r.request, r.id.as_ref()).is_empty()),
            Err(e) => {
                let reply: Value = serde_json::from_str(&e.reply()).unwrap();
                assert_eq!(reply["data"], Value::Null);
                assert!(reply["exception"]["exception"].is_string());
                assert!(reply["exception"]["message"].is_string());
                assert_eq!(reply.get("id").cloned(), e.id.as_ref().map(RequestId::to_json));
            }
        }
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            check(&String::from_utf8_lossy(&bytes));
            let err = decode_binary(&bytes);
            prop_assert_eq!(err.kind, RequestErrorKind::Binary);
        }

        #[test]
        fn random_json_never_panics(value in arb_json()) {
            check(&value.to_string());
        }

        #[test]
        fn well_formed_requests_round_trip(
            method in ".{0,12}",
            args in prop::collection::vec(arb_json(), 0..4),
            kwargs in prop::collection::btree_map("[a-z]{1,4}", arb_json(), 0..4),
            id in prop::option::of(prop_oneof![any::<i64>().prop_map(RequestId::from), ".{0,6}".prop_map(RequestId::from)]),
        ) {
            let request = RpcRequest { method, args, kwargs: kwargs.into_iter().collect() };
            let text = encode_request(&request, id.as_ref());
            prop_assert_eq!(decode_request(&text), Ok(WsRequest { id, request }));
        }
    }
}

//! Replies: an [`RpcReply`] and optional id in, one text frame out (server side); one text
//! frame in, a [`WsReply`] out (client side).
//!
//! Wire shape (micro_framework's `format_rpc_response`, single-encoded on WebSocket):
//! `{"data": <value>, "exception": null}` or
//! `{"data": null, "exception": {"exception": "<name>", "message": "<text>"}}`, then
//! `"id": <echoed>` when the request had one.

use microfw_core::{Body, Envelope, Headers, Properties, RemoteError, RpcReply};
use serde_json::{Map, Value};

use crate::request::{RequestId, type_name};

/// The module micro_framework's own exceptions live in.
pub const MICRO_FRAMEWORK_EXCEPTIONS: &str = "micro_framework.exceptions";

/// Encodes a reply frame: `data` and `exception` from `reply`, then `id` when given.
///
/// Errors go through [`error_to_wire`] first. Never fails: every [`Value`] encodes.
pub fn encode_reply(reply: &RpcReply, id: Option<&RequestId>) -> String {
    match &reply.result {
        Ok(data) => encode_ok(data, id),
        Err(error) => encode_error(error, id),
    }
}

/// Encodes a success frame: `{"data": <data>, "exception": null[, "id": <id>]}`.
pub fn encode_ok(data: &Value, id: Option<&RequestId>) -> String {
    encode_raw_ok(&data.to_string(), id)
}

/// Encodes an error frame:
/// `{"data": null, "exception": {"exception": <name>, "message": <text>}[, "id": <id>]}`, after
/// mapping the error with [`error_to_wire`]. Only the name and the message travel (the
/// micro_framework 2.0.16 format): module and args are dropped.
pub fn encode_error(error: &RemoteError, id: Option<&RequestId>) -> String {
    let wire = error_to_wire(error);
    let mut out = String::with_capacity(64 + wire.message.len());
    out.push_str("{\"data\":null,\"exception\":{\"exception\":");
    out.push_str(&Value::String(wire.exc_type).to_string());
    out.push_str(",\"message\":");
    out.push_str(&Value::String(wire.message).to_string());
    out.push('}');
    push_id(&mut out, id);
    out.push('}');
    out
}

/// Maps a microfw error to what a micro_framework client expects to see:
///
/// * `MethodNotFound` (message = the method) becomes `RPCTargetDoesNotExist` with
///   micro_framework's text "`<method> does not exist or is not exposed through a RPC method.`";
/// * `IncorrectSignature` becomes Python's `TypeError` (what micro_framework answers for bad
///   arguments), same message;
/// * anything else is unchanged.
///
/// Does not touch errors whose type merely shares a name but comes from a user module other
/// than `nameko.exceptions`.
pub fn error_to_wire(error: &RemoteError) -> RemoteError {
    let ours = error.module == microfw_core::message::NAMEKO_EXCEPTIONS;
    match error.exc_type.as_str() {
        "MethodNotFound" if ours => RemoteError::new(
            MICRO_FRAMEWORK_EXCEPTIONS,
            "RPCTargetDoesNotExist",
            format!("{} does not exist or is not exposed through a RPC method.", error.message),
        ),
        "IncorrectSignature" if ours => RemoteError::new("builtins", "TypeError", error.message.clone()),
        _ => error.clone(),
    }
}

/// The error a server answers when it has no capacity for the call (micro_framework's
/// `MaxConnectionsReached` / "No Available Workers"; its clients sleep 0.5 s and retry on a new
/// connection). Building it decides nothing: the IO half decides when to send it.
pub fn max_connections_reached() -> RemoteError {
    RemoteError::new(MICRO_FRAMEWORK_EXCEPTIONS, "MaxConnectionsReached", "No Available Workers")
}

/// Why an Engine publish could not become a reply frame.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReplyEncodeError {
    /// The envelope's body is not a [`Body::Reply`].
    #[error("the publish to a WebSocket reply destination does not carry a reply")]
    NotAReply,
}

/// Encodes the reply an Engine publish carries (`Destination::Reply` on the WebSocket
/// transport), echoing `id`. The IO half finds the connection and the id from the envelope's
/// `reply_to` and `correlation_id`; this function does not read them.
pub fn encode_reply_envelope(
    envelope: &Envelope,
    id: Option<&RequestId>,
) -> Result<String, ReplyEncodeError> {
    match &envelope.body {
        Body::Reply(reply) => Ok(encode_reply(reply, id)),
        _ => Err(ReplyEncodeError::NotAReply),
    }
}

/// A decoded reply frame (client side).
#[derive(Clone, Debug, PartialEq)]
pub struct WsReply {
    /// The echoed id; `None` from a server that does not multiplex (micro_framework) or for a
    /// request sent without one: such replies answer id-less requests in order.
    pub id: Option<RequestId>,
    /// The result or the rebuilt remote error.
    pub reply: RpcReply,
}

impl WsReply {
    /// The envelope to hand the Engine as a delivery on its `Source::Replies` subscription:
    /// routing key and `reply_to` unused by the Engine beyond addressing, `correlation_id` the
    /// call's (the IO half maps the id, or the order, back to it).
    pub fn into_envelope(self, reply_to: impl Into<String>, correlation_id: impl Into<String>) -> Envelope {
        Envelope {
            exchange: String::new(),
            routing_key: reply_to.into(),
            headers: Headers::new(),
            properties: Properties {
                content_type: Some("application/json".to_owned()),
                correlation_id: Some(correlation_id.into()),
                reply_to: None,
                expiration_ms: None,
            },
            body: Body::Reply(self.reply),
        }
    }
}

/// A reply frame that could not be read. Carries the id when it could be read, so the client
/// can fail that call rather than wait for it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind}")]
pub struct ReplyDecodeError {
    /// The echoed id, when the frame was an object with a valid one.
    pub id: Option<RequestId>,
    /// What was wrong.
    pub kind: ReplyErrorKind,
}

/// What was wrong with a reply frame.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReplyErrorKind {
    /// Not JSON (or a double-encoded string whose content is not JSON).
    #[error("the reply is not JSON: {0}")]
    Json(String),
    /// JSON, but not an object.
    #[error("the reply must be a JSON object, got {0}")]
    NotAnObject(&'static str),
    /// `exception` is neither null nor an object with a string `exception` name.
    #[error("the reply's `exception` is not an exception object")]
    BadException,
    /// `id` is present, not null, and neither a string nor an integer.
    #[error("the reply's `id` must be a string or an integer, got {0}")]
    BadId(&'static str),
}

/// Decodes a reply frame (client side). Accepts the single-encoded form and, like the AMQP
/// dialect, a double-encoded one (a JSON string holding the reply text).
///
/// A missing `data` is `null`; a non-null `exception` wins over `data` (as micro_framework's
/// `parse_rpc_response`). The error is rebuilt as a [`RemoteError`] with `exc_type` = the
/// name, `message` = the message (missing: empty; not a string: its JSON text), `module` and
/// `args` from the newer micro_framework fields when present (else empty module, args =
/// `[message]`). Names are kept as sent (`RPCTargetDoesNotExist` is not mapped back to
/// `MethodNotFound`). Never panics.
pub fn decode_reply(text: &str) -> Result<WsReply, ReplyDecodeError> {
    let json_err =
        |e: serde_json::Error| ReplyDecodeError { id: None, kind: ReplyErrorKind::Json(e.to_string()) };
    let mut value: Value = serde_json::from_str(text).map_err(json_err)?;
    if let Value::String(inner) = &value {
        value = serde_json::from_str(inner).map_err(json_err)?;
    }
    let Value::Object(mut object) = value else {
        return Err(ReplyDecodeError { id: None, kind: ReplyErrorKind::NotAnObject(type_name(&value)) });
    };
    let id = match object.remove("id") {
        None | Some(Value::Null) => None,
        Some(v) => match RequestId::from_json(&v) {
            Some(id) => Some(id),
            None => return Err(ReplyDecodeError { id: None, kind: ReplyErrorKind::BadId(type_name(&v)) }),
        },
    };
    let result = match object.remove("exception") {
        None | Some(Value::Null) => Ok(object.remove("data").unwrap_or(Value::Null)),
        Some(Value::Object(exception)) => match rebuild_error(exception) {
            Some(error) => Err(error),
            None => return Err(ReplyDecodeError { id, kind: ReplyErrorKind::BadException }),
        },
        Some(_) => return Err(ReplyDecodeError { id, kind: ReplyErrorKind::BadException }),
    };
    Ok(WsReply { id, reply: RpcReply { result } })
}

// ---------------------------------------------------------------------------------------------
// Private helpers.

/// A success frame whose data is already JSON text (target listings keep their key order).
pub(crate) fn encode_raw_ok(data_json: &str, id: Option<&RequestId>) -> String {
    let mut out = String::with_capacity(32 + data_json.len());
    out.push_str("{\"data\":");
    out.push_str(data_json);
    out.push_str(",\"exception\":null");
    push_id(&mut out, id);
    out.push('}');
    out
}

fn push_id(out: &mut String, id: Option<&RequestId>) {
    if let Some(id) = id {
        out.push_str(",\"id\":");
        out.push_str(&id.to_string());
    }
}

fn rebuild_error(mut exception: Map<String, Value>) -> Option<RemoteError> {
    let Some(Value::String(exc_type)) = exception.remove("exception") else {
        return None;
    };
    let message = match exception.remove("message") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s,
        Some(other) => other.to_string(),
    };
    let module = match exception.remove("module") {
        Some(Value::String(s)) => s,
        _ => String::new(),
    };
    let args = match exception.remove("args") {
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => s,
                other => other.to_string(),
            })
            .collect(),
        _ => vec![message.clone()],
    };
    Some(RemoteError { exc_type, module, args, message })
}

#[cfg(test)]
mod tests {
    use super::*;
    use microfw_core::message::NAMEKO_EXCEPTIONS;
    use proptest::prelude::*;
    use serde_json::json;

    fn v(text: &str) -> Value {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn success_replies_are_single_encoded_with_keys_in_order() {
        let text = encode_ok(&json!(10), None);
        assert_eq!(text, r#"{"data":10,"exception":null}"#);
        assert_eq!(v(&text), json!({"data": 10, "exception": null}));
        let text = encode_reply(&RpcReply { result: Ok(json!({"sum": 6})) }, Some(&RequestId::from(3i64)));
        assert_eq!(text, r#"{"data":{"sum":6},"exception":null,"id":3}"#);
    }

    #[test]
    fn error_replies_carry_name_and_message_only() {
        let err = RemoteError::new("builtins", "KeyError", "'nope'");
        let text = encode_error(&err, None);
        assert_eq!(
            v(&text),
            json!({"data": null, "exception": {"exception": "KeyError", "message": "'nope'"}})
        );
        assert!(text.starts_with(r#"{"data":null,"exception":{"exception":"KeyError","message""#));
        let text = encode_error(&err, Some(&RequestId::from("a")));
        assert_eq!(
            v(&text),
            json!({"data": null, "exception": {"exception": "KeyError", "message": "'nope'"}, "id": "a"})
        );
    }

    #[test]
    fn method_not_found_is_rpc_target_does_not_exist() {
        let text = encode_error(&RemoteError::method_not_found("target_id"), None);
        assert_eq!(
            v(&text),
            json!({"data": null, "exception": {"exception": "RPCTargetDoesNotExist",
                "message": "target_id does not exist or is not exposed through a RPC method."}})
        );
    }

    #[test]
    fn incorrect_signature_is_type_error_and_user_errors_pass_through() {
        let wire = error_to_wire(&RemoteError::incorrect_signature("missing a required argument: 'a'"));
        assert_eq!(
            (wire.exc_type.as_str(), wire.message.as_str()),
            ("TypeError", "missing a required argument: 'a'")
        );
        // A user error that happens to be called MethodNotFound is left alone.
        let user = RemoteError::new("shop.errors", "MethodNotFound", "x");
        assert_eq!(error_to_wire(&user), user);
        let user = RemoteError::new("builtins", "ValueError", "bad");
        assert_eq!(error_to_wire(&user), user);
        assert_eq!(RemoteError::method_not_found("f").module, NAMEKO_EXCEPTIONS);
    }

    #[test]
    fn max_connections_reached_matches_micro_framework() {
        assert_eq!(
            v(&encode_error(&max_connections_reached(), None)),
            json!({"data": null, "exception": {"exception": "MaxConnectionsReached",
                "message": "No Available Workers"}})
        );
    }

    #[test]
    fn decodes_single_and_double_encoded_replies() {
        let single = decode_reply(r#"{"data": 10, "exception": null}"#).unwrap();
        assert_eq!(single, WsReply { id: None, reply: RpcReply { result: Ok(json!(10)) } });
        let double = decode_reply(r#""{\"data\": 10, \"exception\": null}""#).unwrap();
        assert_eq!(double, single);
        let with_id = decode_reply(r#"{"data": {"sum": 5}, "exception": null, "id": "c1"}"#).unwrap();
        assert_eq!(with_id.id, Some(RequestId::from("c1")));
        assert_eq!(with_id.reply.result, Ok(json!({"sum": 5})));
        // parse_rpc_response: no data is None.
        assert_eq!(decode_reply("{}").unwrap().reply.result, Ok(Value::Null));
    }

    #[test]
    fn remote_errors_are_rebuilt() {
        let r = decode_reply(r#"{"data": null, "exception": {"exception": "ValueError", "message": "bad"}}"#)
            .unwrap();
        assert_eq!(
            r.reply.result,
            Err(RemoteError {
                exc_type: "ValueError".into(),
                module: String::new(),
                args: vec!["bad".into()],
                message: "bad".into()
            })
        );
        // The 2.0.19 format's extra fields are read when present.
        let r = decode_reply(
            r#"{"data": null, "exception": {"exception": "RPCTargetDoesNotExist", "message": "m",
                "args": ["m", 2], "kwargs": {}, "module": "micro_framework.exceptions"}, "id": 5}"#,
        )
        .unwrap();
        assert_eq!(r.id, Some(RequestId::from(5i64)));
        assert_eq!(
            r.reply.result,
            Err(RemoteError {
                exc_type: "RPCTargetDoesNotExist".into(),
                module: MICRO_FRAMEWORK_EXCEPTIONS.into(),
                args: vec!["m".into(), "2".into()],
                message: "m".into()
            })
        );
    }

    #[test]
    fn bad_replies_are_errors_with_the_id_when_readable() {
        let e = decode_reply("nope").unwrap_err();
        assert!(matches!(e.kind, ReplyErrorKind::Json(_)));
        assert_eq!(decode_reply("[1]").unwrap_err().kind, ReplyErrorKind::NotAnObject("an array"));
        assert_eq!(decode_reply(r#""[1]""#).unwrap_err().kind, ReplyErrorKind::NotAnObject("an array"));
        assert_eq!(
            decode_reply(r#"{"exception": {"message": "x"}, "id": 2}"#).unwrap_err(),
            ReplyDecodeError { id: Some(RequestId::from(2i64)), kind: ReplyErrorKind::BadException }
        );
        assert_eq!(decode_reply(r#"{"exception": "boom"}"#).unwrap_err().kind, ReplyErrorKind::BadException);
        assert_eq!(decode_reply(r#"{"id": true}"#).unwrap_err().kind, ReplyErrorKind::BadId("a boolean"));
    }

    #[test]
    fn envelopes_round_trip_through_reply_frames() {
        let reply = RpcReply { result: Err(RemoteError::new("", "ValueError", "bad")) };
        let env = WsReply { id: None, reply: reply.clone() }.into_envelope("conn", "c-1");
        assert_eq!(env.properties.correlation_id.as_deref(), Some("c-1"));
        let id = RequestId::from(1i64);
        let text = encode_reply_envelope(&env, Some(&id)).unwrap();
        assert_eq!(decode_reply(&text).unwrap(), WsReply { id: Some(id), reply });
        assert_eq!(
            encode_reply_envelope(&Envelope::raw("", "k", "{}"), None),
            Err(ReplyEncodeError::NotAReply)
        );
    }

    proptest! {
        #[test]
        fn replies_round_trip(
            data in prop_oneof![Just(Value::Null), any::<i64>().prop_map(Value::from), ".{0,12}".prop_map(Value::String)],
            error in prop::option::of(("[A-Za-z]{1,12}", ".{0,20}")),
            id in prop::option::of(prop_oneof![any::<i64>().prop_map(RequestId::from), ".{0,6}".prop_map(RequestId::from)]),
        ) {
            let result = match error {
                Some((name, message)) => Err(RemoteError::new("", name, message)),
                None => Ok(data),
            };
            let reply = RpcReply { result };
            let text = encode_reply(&reply, id.as_ref());
            prop_assert_eq!(decode_reply(&text), Ok(WsReply { id: id.clone(), reply: reply.clone() }));
            // Double-encoded (the AMQP dialect's form) decodes the same.
            let double = Value::String(text).to_string();
            prop_assert_eq!(decode_reply(&double), Ok(WsReply { id, reply }));
        }

        #[test]
        fn random_reply_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_reply(&String::from_utf8_lossy(&bytes));
        }
    }
}

//! Decoding: an [`IncomingMessage`] to the core's [`Envelope`], per dialect. Never fails and
//! never panics: what cannot be read becomes [`Body::MalformedRequest`] (requests) or stays
//! [`Body::Raw`] (replies; the Engine resolves the call with a malformed-reply error).

use bytes::Bytes;
use microfw_core::engine::{EXCHANGE_HEADER, ROUTING_KEY_HEADER};
use microfw_core::{
    Body, Dialect, Envelope, FieldValue, Headers, Properties, RemoteError, RpcReply, RpcRequest, Source,
};
use serde_json::{Map, Value};

use crate::model::{AmqpProperties, IncomingMessage};

/// Nameko's text for a request body without `args` or `kwargs`.
pub const MISSING_ARGS_OR_KWARGS: &str = "Message missing `args` or `kwargs`";

/// Decodes a delivery consumed for `source`.
///
/// * [`Source::Event`]: the body stays [`Body::Raw`], whatever its content type (decoded at
///   most once, later, by whoever needs it).
/// * [`Source::Rpc`]: a request in the source's dialect ([`decode_request`]).
/// * [`Source::Replies`]: a reply in either dialect, told apart by its body ([`decode_reply`]).
/// * [`Source::WsRpc`] is not an AMQP source; a message decoded for it is read as a
///   micro_framework request (the same body shape).
///
/// In every case the headers are kept as typed values, and when `x-microfw-routing-key` /
/// `x-microfw-exchange` are present (a delayed retry that came back through the default
/// exchange) the envelope's routing key / exchange are restored from them, before the RPC
/// method is read from the routing key. The headers themselves are kept (the Engine reads the
/// attempt count and the origin from them). `redelivered` is not part of an envelope: the link
/// puts it on the [`Delivery`](microfw_core::Delivery).
pub fn decode(source: &Source, message: IncomingMessage) -> Envelope {
    match source {
        Source::Event { .. } => decode_event(message),
        Source::Rpc { service, dialect, .. } => decode_request(*dialect, service, message),
        Source::WsRpc { service } => decode_request(Dialect::MicroFramework, service, message),
        Source::Replies { .. } => decode_reply(message),
    }
}

/// Decodes an event: raw body, addressing restored, headers kept.
pub fn decode_event(message: IncomingMessage) -> Envelope {
    let (mut envelope, body) = split(message);
    envelope.body = Body::Raw(body);
    envelope
}

/// Decodes an RPC request for `service` in `dialect`.
///
/// Nameko: the body must be JSON (content type `application/json`; a missing or other content
/// type is refused, since Nameko peers always send it and die without it) holding an object
/// with `args` (array) and `kwargs` (object); the method is the routing key after `<service>.`
/// (or its last dot-separated word when the key is not the service's, which is what Nameko's
/// `MethodNotFound` names). micro_framework: a JSON object (a JSON *string* is parsed once more,
/// as micro_framework does; a missing content type or `text/plain` is accepted, as kombu hands
/// such bodies over as text) with `command` (the method), `command_args` and
/// `command_kwargs` (missing or null means empty).
///
/// Anything else gives [`Body::MalformedRequest`] with a reason; Nameko's text where it has
/// one ([`MISSING_ARGS_OR_KWARGS`]).
pub fn decode_request(dialect: Dialect, service: &str, message: IncomingMessage) -> Envelope {
    let (mut envelope, body) = split(message);
    let request = match dialect {
        Dialect::Nameko => nameko_request(service, &envelope.routing_key, &envelope.properties, &body),
        Dialect::MicroFramework => micro_framework_request(&envelope.properties, &body),
    };
    envelope.body = match request {
        Ok(request) => Body::Request(request),
        Err(reason) => Body::MalformedRequest { reason },
    };
    envelope
}

/// Decodes an RPC reply of either dialect, told apart by the body: a JSON object with
/// `result` or `error` is Nameko's; a JSON string holding an object with `data` or
/// `exception` (micro_framework's double encoding), or such an object directly, is
/// micro_framework's. An unreadable body stays [`Body::Raw`].
///
/// Errors: Nameko `{"exc_type","exc_path","exc_args","value"}` gives a [`RemoteError`] whose
/// module is `exc_path` minus its last `.Type`; micro_framework `{"exception","message"}`
/// gives one with an empty module (2.0.16 sends none; a `module` string and an `args` array,
/// which later versions add, are taken when present) and the message as its one argument.
pub fn decode_reply(message: IncomingMessage) -> Envelope {
    let (mut envelope, body) = split(message);
    envelope.body = match reply(&body) {
        Some(result) => Body::Reply(RpcReply { result }),
        None => Body::Raw(body),
    };
    envelope
}

/// The envelope without its body, and the body bytes.
fn split(message: IncomingMessage) -> (Envelope, Bytes) {
    let IncomingMessage { exchange, routing_key, redelivered: _, properties, body } = message;
    let AmqpProperties { content_type, correlation_id, reply_to, expiration, headers, .. } = properties;
    let mut envelope = Envelope {
        exchange,
        routing_key,
        headers,
        properties: Properties {
            content_type,
            correlation_id,
            reply_to,
            expiration_ms: expiration.and_then(|e| e.trim().parse().ok()),
        },
        body: Body::Raw(Bytes::new()),
    };
    if let Some(key) = header_text(&envelope.headers, ROUTING_KEY_HEADER) {
        envelope.routing_key = key;
    }
    if let Some(exchange) = header_text(&envelope.headers, EXCHANGE_HEADER) {
        envelope.exchange = exchange;
    }
    (envelope, body)
}

fn header_text(headers: &Headers, name: &str) -> Option<String> {
    match headers.get(name)? {
        FieldValue::Str(s) => Some(s.clone()),
        FieldValue::Bytes(b) => String::from_utf8(b.clone()).ok(),
        _ => None,
    }
}

fn nameko_request(
    service: &str,
    routing_key: &str,
    properties: &Properties,
    body: &[u8],
) -> Result<RpcRequest, String> {
    match properties.content_type.as_deref() {
        None => return Err("Message missing `content_type`".to_owned()),
        Some(ct) if !is_json(ct) => return Err(format!("Unsupported content type `{ct}`")),
        Some(_) => {}
    }
    let Value::Object(mut object) = parse(body)? else {
        return Err("Message body is not a JSON object".to_owned());
    };
    let (Some(args), Some(kwargs)) = (object.remove("args"), object.remove("kwargs")) else {
        return Err(MISSING_ARGS_OR_KWARGS.to_owned());
    };
    let Value::Array(args) = args else { return Err("`args` is not an array".to_owned()) };
    let Value::Object(kwargs) = kwargs else { return Err("`kwargs` is not an object".to_owned()) };
    let method = match routing_key.strip_prefix(service).and_then(|rest| rest.strip_prefix('.')) {
        Some(method) => method,
        None => routing_key.rsplit('.').next().unwrap_or(routing_key),
    };
    Ok(RpcRequest { method: method.to_owned(), args, kwargs })
}

fn micro_framework_request(properties: &Properties, body: &[u8]) -> Result<RpcRequest, String> {
    if let Some(ct) = properties.content_type.as_deref()
        && !is_json(ct)
        && !ct.trim().eq_ignore_ascii_case("text/plain")
    {
        return Err(format!("Unsupported content type `{ct}`"));
    }
    let value = match parse(body)? {
        Value::String(text) => parse(text.as_bytes())?,
        value => value,
    };
    let Value::Object(mut object) = value else {
        return Err("Message body is not a JSON object".to_owned());
    };
    let Some(Value::String(command)) = object.remove("command") else {
        return Err("Message missing `command`".to_owned());
    };
    let args = match object.remove("command_args") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(args)) => args,
        Some(_) => return Err("`command_args` is not an array".to_owned()),
    };
    let kwargs = match object.remove("command_kwargs") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(kwargs)) => kwargs,
        Some(_) => return Err("`command_kwargs` is not an object".to_owned()),
    };
    Ok(RpcRequest { method: command, args, kwargs })
}

fn reply(body: &[u8]) -> Option<Result<Value, RemoteError>> {
    match serde_json::from_slice(body).ok()? {
        Value::String(inner) => match serde_json::from_str(&inner).ok()? {
            Value::Object(object) => micro_framework_reply(object),
            _ => None,
        },
        Value::Object(object) if object.contains_key("result") || object.contains_key("error") => {
            nameko_reply(object)
        }
        Value::Object(object) => micro_framework_reply(object),
        _ => None,
    }
}

fn nameko_reply(mut object: Map<String, Value>) -> Option<Result<Value, RemoteError>> {
    match object.remove("error") {
        None | Some(Value::Null) => Some(Ok(object.remove("result").unwrap_or(Value::Null))),
        Some(Value::Object(mut error)) => {
            let exc_type = text_or(error.remove("exc_type"), "RemoteError");
            let path = text_or(error.remove("exc_path"), "");
            let module = match path.strip_suffix(exc_type.as_str()).and_then(|m| m.strip_suffix('.')) {
                Some(module) => module.to_owned(),
                None => path.rsplit_once('.').map(|(module, _)| module.to_owned()).unwrap_or_default(),
            };
            let args = texts(error.remove("exc_args"));
            let message = text_or(error.remove("value"), "");
            Some(Err(RemoteError { exc_type, module, args, message }))
        }
        Some(_) => None,
    }
}

fn micro_framework_reply(mut object: Map<String, Value>) -> Option<Result<Value, RemoteError>> {
    if !object.contains_key("data") && !object.contains_key("exception") {
        return None;
    }
    match object.remove("exception") {
        None | Some(Value::Null) => Some(Ok(object.remove("data").unwrap_or(Value::Null))),
        Some(Value::Object(mut error)) => {
            let exc_type = text_or(error.remove("exception"), "RPCException");
            let message = text_or(error.remove("message"), "");
            let module = text_or(error.remove("module"), "");
            let args = match error.remove("args") {
                Some(Value::Array(args)) => texts(Some(Value::Array(args))),
                _ => vec![message.clone()],
            };
            Some(Err(RemoteError { exc_type, module, args, message }))
        }
        Some(_) => None,
    }
}

/// A JSON value as text: strings as they are, anything else as compact JSON.
fn text(value: Value) -> String {
    match value {
        Value::String(s) => s,
        other => other.to_string(),
    }
}

fn text_or(value: Option<Value>, default: &str) -> String {
    match value {
        None | Some(Value::Null) => default.to_owned(),
        Some(value) => text(value),
    }
}

fn texts(value: Option<Value>) -> Vec<String> {
    match value {
        Some(Value::Array(items)) => items.into_iter().map(text).collect(),
        None | Some(Value::Null) => Vec::new(),
        Some(other) => vec![text(other)],
    }
}

fn parse(body: &[u8]) -> Result<Value, String> {
    serde_json::from_slice(body).map_err(|e| format!("Can't decode message body: {e}"))
}

/// `application/json`, any case, with or without parameters (`; charset=utf-8`).
fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    essence.eq_ignore_ascii_case("application/json")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn msg(routing_key: &str, content_type: Option<&str>, body: &[u8]) -> IncomingMessage {
        IncomingMessage {
            exchange: "x".into(),
            routing_key: routing_key.into(),
            redelivered: true,
            properties: AmqpProperties {
                content_type: content_type.map(str::to_owned),
                ..AmqpProperties::default()
            },
            body: Bytes::copy_from_slice(body),
        }
    }

    fn nameko(routing_key: &str, content_type: Option<&str>, body: &[u8]) -> Body {
        decode_request(Dialect::Nameko, "svc", msg(routing_key, content_type, body)).body
    }

    fn mf(content_type: Option<&str>, body: &[u8]) -> Body {
        decode_request(Dialect::MicroFramework, "svc", msg("svc.t", content_type, body)).body
    }

    fn reply_of(body: &[u8]) -> Body {
        decode_reply(msg("r", Some("application/json"), body)).body
    }

    fn malformed(body: &Body) -> &str {
        match body {
            Body::MalformedRequest { reason } => reason,
            other => panic!("not malformed: {other:?}"),
        }
    }

    const JSON: Option<&str> = Some("application/json");
    const EMPTY: &[u8] = br#"{"args": [], "kwargs": {}}"#;

    #[test]
    fn nameko_requests_that_cannot_be_read_are_malformed_with_a_reason() {
        assert_eq!(malformed(&nameko("svc.m", JSON, b"[1, 2]")), "Message body is not a JSON object");
        assert!(malformed(&nameko("svc.m", JSON, b"\xff\xfe{")).starts_with("Can't decode message body"));
        assert!(malformed(&nameko("svc.m", JSON, b"")).starts_with("Can't decode message body"));
        assert_eq!(malformed(&nameko("svc.m", JSON, br#"{"args": []}"#)), MISSING_ARGS_OR_KWARGS);
        assert_eq!(
            malformed(&nameko("svc.m", JSON, br#"{"args": "ab", "kwargs": {}}"#)),
            "`args` is not an array"
        );
        assert_eq!(
            malformed(&nameko("svc.m", JSON, br#"{"args": [], "kwargs": []}"#)),
            "`kwargs` is not an object"
        );
        assert_eq!(malformed(&nameko("svc.m", None, EMPTY)), "Message missing `content_type`");
        assert_eq!(
            malformed(&nameko("svc.m", Some("application/x-python-serialize"), EMPTY)),
            "Unsupported content type `application/x-python-serialize`"
        );
    }

    #[test]
    fn nameko_method_comes_from_the_routing_key() {
        let method = |rk: &str, ct| match nameko(rk, ct, EMPTY) {
            Body::Request(r) => r.method,
            other => panic!("{other:?}"),
        };
        assert_eq!(method("svc.echo", JSON), "echo");
        assert_eq!(method("svc.echo", Some("Application/JSON; charset=utf-8")), "echo");
        assert_eq!(method("other.deep.name", JSON), "name", "Nameko's MethodNotFound names the last word");
        assert_eq!(method("nodots", JSON), "nodots");
        assert_eq!(method("svcx.m", JSON), "m");
    }

    #[test]
    fn micro_framework_request_edge_cases() {
        let ok = |body: &Body| match body {
            Body::Request(r) => (r.method.clone(), r.args.clone(), r.kwargs.len()),
            other => panic!("{other:?}"),
        };
        let full = br#"{"command": "t", "command_args": null, "command_kwargs": null}"#;
        assert_eq!(ok(&mf(JSON, full)), ("t".into(), vec![], 0));
        assert_eq!(
            ok(&mf(None, br#"{"command": "t", "command_args": [1]}"#)),
            ("t".into(), vec![json!(1)], 0)
        );
        assert_eq!(ok(&mf(Some("text/plain"), br#""{\"command\": \"t\"}""#)), ("t".into(), vec![], 0));
        assert!(malformed(&mf(JSON, br#""not json""#)).starts_with("Can't decode message body"));
        assert_eq!(malformed(&mf(JSON, br#"{"command": 3}"#)), "Message missing `command`");
        assert_eq!(
            malformed(&mf(JSON, br#"{"command": "t", "command_args": {}}"#)),
            "`command_args` is not an array"
        );
        assert_eq!(
            malformed(&mf(JSON, br#"{"command": "t", "command_kwargs": []}"#)),
            "`command_kwargs` is not an object"
        );
        assert_eq!(malformed(&mf(JSON, b"7")), "Message body is not a JSON object");
        assert!(malformed(&mf(Some("application/msgpack"), b"{}")).starts_with("Unsupported content type"));
    }

    #[test]
    fn nameko_reply_variants() {
        assert_eq!(
            reply_of(br#"{"result": [1], "error": null}"#),
            Body::Reply(RpcReply { result: Ok(json!([1])) })
        );
        assert_eq!(reply_of(br#"{"error": null}"#), Body::Reply(RpcReply { result: Ok(Value::Null) }));
        let err = |body: &[u8]| match reply_of(body) {
            Body::Reply(RpcReply { result: Err(e) }) => e,
            other => panic!("{other:?}"),
        };
        let e = err(br#"{"result": null, "error": {"exc_type": "X", "exc_path": "a.b.X", "exc_args": ["s", 42, null], "value": "('s', 42)"}}"#);
        assert_eq!(
            (e.module.as_str(), e.args.clone()),
            ("a.b", vec!["s".into(), "42".into(), "null".into()])
        );
        let e = err(br#"{"error": {"exc_type": "X", "exc_path": "mod.Other"}}"#);
        assert_eq!((e.exc_type.as_str(), e.module.as_str(), e.message.as_str()), ("X", "mod", ""));
        let e = err(br#"{"error": {"value": 5}}"#);
        assert_eq!((e.exc_type.as_str(), e.module.as_str(), e.message.as_str()), ("RemoteError", "", "5"));
        assert!(e.args.is_empty());
        // A truthy non-object error is not a reply Nameko itself could read.
        assert!(matches!(reply_of(br#"{"result": 1, "error": "bad"}"#), Body::Raw(_)));
    }

    #[test]
    fn micro_framework_reply_variants_and_garbage() {
        let later = br#"{"data": null, "exception": {"exception": "E", "message": "m", "module": "app.errors", "args": ["m", 1]}}"#;
        match reply_of(later) {
            Body::Reply(RpcReply { result: Err(e) }) => {
                assert_eq!((e.module.as_str(), e.args), ("app.errors", vec!["m".to_owned(), "1".to_owned()]));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(reply_of(br#"{"exception": null}"#), Body::Reply(RpcReply { result: Ok(Value::Null) }));
        for garbage in [
            &b"nope"[..],
            b"[]",
            b"{}",
            b"\"[1]\"",
            b"\"not json\"",
            br#"{"data": 1, "exception": 3}"#,
            b"\xff",
        ] {
            assert!(matches!(reply_of(garbage), Body::Raw(ref b) if b.as_ref() == garbage), "{garbage:?}");
        }
    }

    #[test]
    fn addressing_properties_and_headers() {
        let mut m = msg("microfw.retry.x.100", JSON, b"{}");
        m.exchange = String::new();
        m.properties.expiration = Some("1500".into());
        m.properties.headers.insert(ROUTING_KEY_HEADER, FieldValue::Bytes(b"src.key".to_vec()));
        m.properties.headers.insert(EXCHANGE_HEADER, "src.events");
        m.properties.headers.insert("nameko.user_id", 7i64);
        let env = decode_event(m.clone());
        assert_eq!((env.exchange.as_str(), env.routing_key.as_str()), ("src.events", "src.key"));
        assert_eq!(env.properties.expiration_ms, Some(1500));
        assert_eq!(env.headers.get("nameko.user_id"), Some(&FieldValue::I64(7)));
        assert_eq!(env.headers.len(), 3, "internal headers are kept for the Engine");
        m.properties.expiration = Some("soon".into());
        m.properties.headers.insert(ROUTING_KEY_HEADER, 5i64);
        let env = decode_event(m);
        assert_eq!((env.routing_key.as_str(), env.properties.expiration_ms), ("microfw.retry.x.100", None));
    }

    #[test]
    fn decode_dispatches_on_the_source() {
        let ws = Source::WsRpc { service: "svc".into() };
        assert!(matches!(decode(&ws, msg("svc.t", JSON, br#"{"command": "t"}"#)).body, Body::Request(_)));
        let replies = Source::Replies { reply_to: "r".into() };
        assert!(matches!(
            decode(&replies, msg("r", JSON, br#"{"result": 1, "error": null}"#)).body,
            Body::Reply(_)
        ));
        let rpc = Source::Rpc { service: "svc".into(), dialect: Dialect::Nameko, methods: vec![] };
        assert!(matches!(decode(&rpc, msg("svc.m", JSON, EMPTY)).body, Body::Request(_)));
    }
}

//! Every encoder and decoder held against the bytes captured from real peers
//! (`wire/nameko-captures.md`, nameko 2.14.1 and micro_framework 2.0.16) and the examples in
//! `wire/micro_framework.md`. Bodies compare as JSON values; key order is checked where the
//! peer writes one.

use bytes::Bytes;
use microfw_core::{
    Body, Destination, Dialect, Envelope, FieldValue, HandlerType, Headers, Properties, Publish, PublishId,
    RemoteError, RpcReply, RpcRequest, Source, Transport,
};
use microfw_transport_amqp::{
    AmqpProperties, AmqpSettings, IncomingMessage, MISSING_ARGS_OR_KWARGS, OutgoingMessage, decode, encode,
    queue_name, topology,
};
use serde_json::{Map, Value, json};

// ---------------------------------------------------------------- captured messages (verbatim)

const NAMEKO_REQUEST: &str = r#"{
  "exchange": "nameko-rpc",
  "routing_key": "nameko_peer.echo",
  "properties": {
    "application_headers": {
      "nameko.call_id_stack": [
        "standalone_rpc_proxy.call.090bdf76-a959-4cae-bd3c-9eab556cee26"
      ]
    },
    "content_encoding": "utf-8",
    "content_type": "application/json",
    "correlation_id": "41b49757-f24f-40b4-a147-1640e8854b63",
    "delivery_mode": 2,
    "priority": 0,
    "reply_to": "b537b70c-8865-4e50-81dd-b31ec7b7f9ed"
  },
  "body": "{\"args\": [\"hello\"], \"kwargs\": {}}"
}"#;

const NAMEKO_REPLY_OK: &str = r#"{
  "exchange": "nameko-rpc",
  "routing_key": "b537b70c-8865-4e50-81dd-b31ec7b7f9ed",
  "properties": {
    "application_headers": {},
    "content_encoding": "utf-8",
    "content_type": "application/json",
    "correlation_id": "41b49757-f24f-40b4-a147-1640e8854b63",
    "delivery_mode": 2,
    "priority": 0
  },
  "body": "{\"result\": \"hello\", \"error\": null}"
}"#;

const NAMEKO_REPLY_ERROR: &str = r#"{
  "exchange": "nameko-rpc",
  "routing_key": "b4da991d-cd03-4a4b-8d81-d75117315e50",
  "properties": {
    "application_headers": {},
    "content_encoding": "utf-8",
    "content_type": "application/json",
    "correlation_id": "a3e8d50c-3ef0-489e-b7b0-1f00fd1a293c",
    "delivery_mode": 2,
    "priority": 0
  },
  "body": "{\"result\": null, \"error\": {\"exc_type\": \"ValueError\", \"exc_path\": \"builtins.ValueError\", \"exc_args\": [\"boom\"], \"value\": \"boom\"}}"
}"#;

const NAMEKO_METHOD_NOT_FOUND_BODY: &str = r#"{"result": null, "error": {"exc_type": "MethodNotFound", "exc_path": "nameko.exceptions.MethodNotFound", "exc_args": ["no_such_method"], "value": "no_such_method"}}"#;

const NAMEKO_STANDALONE_EVENT: &str = r#"{
  "exchange": "rust_peer.events",
  "routing_key": "ping",
  "properties": {
    "application_headers": {},
    "content_encoding": "utf-8",
    "content_type": "application/json",
    "delivery_mode": 2,
    "priority": 0
  },
  "body": "{\"n\": 1, \"msg\": \"hello\"}"
}"#;

const NAMEKO_SERVICE_EVENT: &str = r#"{
  "exchange": "nameko_peer.events",
  "routing_key": "pong",
  "properties": {
    "application_headers": {
      "nameko.call_id_stack": [
        "standalone_rpc_proxy.call.0b47c6ba-a6df-4a54-a6a5-ee5b5f931f87",
        "nameko_peer.emit.ab0cb11f-aabd-4317-a325-14a66c2e6e97"
      ]
    },
    "content_encoding": "utf-8",
    "content_type": "application/json",
    "delivery_mode": 2,
    "priority": 0
  },
  "body": "{\"n\": 2, \"msg\": \"from nameko_peer\"}"
}"#;

const MF_REPLY_OK: &str = r#""{\"data\": 10, \"exception\": null}""#;
const MF_REPLY_NOT_FOUND: &str = r#""{\"data\": null, \"exception\": {\"exception\": \"RPCTargetDoesNotExist\", \"message\": \"no_such_target does not exist or is not exposed through a RPC method.\"}}""#;

// ---------------------------------------------------------------- Nameko RPC

#[test]
fn nameko_request_capture_decodes_to_a_request_with_typed_headers() {
    let env = decode(&nameko_rpc_source(), capture_in(NAMEKO_REQUEST));
    assert_eq!(env.exchange, "nameko-rpc");
    assert_eq!(env.routing_key, "nameko_peer.echo");
    assert_eq!(
        env.body,
        Body::Request(RpcRequest { method: "echo".into(), args: vec![json!("hello")], kwargs: Map::new() })
    );
    assert_eq!(
        env.properties,
        Properties {
            content_type: Some("application/json".into()),
            correlation_id: Some("41b49757-f24f-40b4-a147-1640e8854b63".into()),
            reply_to: Some("b537b70c-8865-4e50-81dd-b31ec7b7f9ed".into()),
            expiration_ms: None,
        }
    );
    assert_eq!(
        env.headers.get("nameko.call_id_stack"),
        Some(&FieldValue::Array(vec![FieldValue::from(
            "standalone_rpc_proxy.call.090bdf76-a959-4cae-bd3c-9eab556cee26"
        )]))
    );
}

#[test]
fn nameko_request_encodes_like_the_capture() {
    let captured = capture_in(NAMEKO_REQUEST);
    let publish = rpc_publish(
        Dialect::Nameko,
        "nameko_peer",
        "echo",
        vec![json!("hello")],
        Map::new(),
        captured.properties.headers.clone(),
        None,
    );
    let out = encode(&publish, &AmqpSettings::new("caller"), no_sources).unwrap();
    assert!(out.mandatory);
    assert_eq!(as_capture(&out), capture_json(NAMEKO_REQUEST));
    assert_eq!(body_keys(&out.body), ["args", "kwargs"]);
}

#[test]
fn nameko_keyword_call_body_and_expiration() {
    let kwargs = json!({"a": 2, "b": 3}).as_object().cloned().unwrap();
    let publish =
        rpc_publish(Dialect::Nameko, "nameko_peer", "add", vec![], kwargs, Headers::new(), Some(1500));
    let out = encode(&publish, &AmqpSettings::new("caller"), no_sources).unwrap();
    assert_eq!(body_json(&out.body), json!({"args": [], "kwargs": {"a": 2, "b": 3}}));
    assert_eq!(out.properties.expiration.as_deref(), Some("1500"));
    assert_eq!(out.routing_key, "nameko_peer.add");
}

#[test]
fn nameko_success_reply_capture_decodes_and_encodes() {
    let env = decode(&replies(), capture_in(NAMEKO_REPLY_OK));
    assert_eq!(env.body, Body::Reply(RpcReply { result: Ok(json!("hello")) }));
    assert_eq!(env.properties.correlation_id.as_deref(), Some("41b49757-f24f-40b4-a147-1640e8854b63"));

    let publish = reply_publish(
        Dialect::Nameko,
        "b537b70c-8865-4e50-81dd-b31ec7b7f9ed",
        "41b49757-f24f-40b4-a147-1640e8854b63",
        Ok(json!("hello")),
    );
    let out = encode(&publish, &AmqpSettings::new("nameko_peer"), no_sources).unwrap();
    assert!(!out.mandatory);
    assert_eq!(as_capture(&out), capture_json(NAMEKO_REPLY_OK));
    assert_eq!(body_keys(&out.body), ["result", "error"], "Nameko writes result first");
}

#[test]
fn nameko_error_reply_capture_decodes_and_encodes() {
    let boom = RemoteError {
        exc_type: "ValueError".into(),
        module: "builtins".into(),
        args: vec!["boom".into()],
        message: "boom".into(),
    };
    let env = decode(&replies(), capture_in(NAMEKO_REPLY_ERROR));
    assert_eq!(env.body, Body::Reply(RpcReply { result: Err(boom.clone()) }));

    let publish = reply_publish(
        Dialect::Nameko,
        "b4da991d-cd03-4a4b-8d81-d75117315e50",
        "a3e8d50c-3ef0-489e-b7b0-1f00fd1a293c",
        Err(boom),
    );
    let out = encode(&publish, &AmqpSettings::new("nameko_peer"), no_sources).unwrap();
    assert_eq!(as_capture(&out), capture_json(NAMEKO_REPLY_ERROR));
    let body = body_json(&out.body);
    let error_keys: Vec<&str> = body["error"].as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(error_keys.len(), 4);
}

#[test]
fn nameko_well_known_errors_use_nameko_paths() {
    let publish =
        reply_publish(Dialect::Nameko, "k", "c", Err(RemoteError::method_not_found("no_such_method")));
    let out = encode(&publish, &AmqpSettings::new("svc"), no_sources).unwrap();
    assert_eq!(body_json(&out.body), parse(NAMEKO_METHOD_NOT_FOUND_BODY));

    for (error, path) in [
        (RemoteError::malformed_request(MISSING_ARGS_OR_KWARGS), "nameko.exceptions.MalformedRequest"),
        (RemoteError::incorrect_signature("add() missing 1"), "nameko.exceptions.IncorrectSignature"),
    ] {
        let publish = reply_publish(Dialect::Nameko, "k", "c", Err(error.clone()));
        let out = encode(&publish, &AmqpSettings::new("svc"), no_sources).unwrap();
        let body = body_json(&out.body);
        assert_eq!(body["error"]["exc_path"], json!(path));
        assert_eq!(body["error"]["exc_type"], json!(error.exc_type));
        assert_eq!(body["error"]["exc_args"], json!([error.message]));
        assert_eq!(body["error"]["value"], json!(error.message));
        assert_eq!(body["result"], Value::Null);
    }

    let env = decode(&replies(), incoming("nameko-rpc", "k", json_props(), NAMEKO_METHOD_NOT_FOUND_BODY));
    assert_eq!(
        env.body,
        Body::Reply(RpcReply { result: Err(RemoteError::method_not_found("no_such_method")) })
    );
}

#[test]
fn nameko_raw_probe_cases() {
    // rpc_minimal: content type, correlation id and reply_to only; no headers, no encoding.
    let props = AmqpProperties {
        content_type: Some("application/json".into()),
        correlation_id: Some("c1".into()),
        reply_to: Some("r1".into()),
        ..AmqpProperties::default()
    };
    let env = decode(
        &nameko_rpc_source(),
        incoming("nameko-rpc", "nameko_peer.add", props.clone(), r#"{"args": [40, 2], "kwargs": {}}"#),
    );
    assert_eq!(
        env.body,
        Body::Request(RpcRequest {
            method: "add".into(),
            args: vec![json!(40), json!(2)],
            kwargs: Map::new()
        })
    );
    // rpc_kwargs_only: Nameko's own MalformedRequest text.
    let env = decode(
        &nameko_rpc_source(),
        incoming("nameko-rpc", "nameko_peer.add", props.clone(), r#"{"kwargs": {"a": 1, "b": 2}}"#),
    );
    assert_eq!(env.body, Body::MalformedRequest { reason: MISSING_ARGS_OR_KWARGS.into() });
    // rpc_no_ctype: Nameko dies; we refuse it as malformed (the Engine answers it).
    let no_ctype = AmqpProperties { content_type: None, ..props };
    let env = decode(
        &nameko_rpc_source(),
        incoming("nameko-rpc", "nameko_peer.add", no_ctype, r#"{"args": [40, 2], "kwargs": {}}"#),
    );
    assert!(matches!(env.body, Body::MalformedRequest { .. }), "{:?}", env.body);
    assert_eq!(env.properties.reply_to.as_deref(), Some("r1"));
}

// ---------------------------------------------------------------- Nameko events

#[test]
fn nameko_event_captures_decode_raw_and_encode_identically() {
    for (capture, source_service, event_type) in
        [(NAMEKO_STANDALONE_EVENT, "rust_peer", "ping"), (NAMEKO_SERVICE_EVENT, "nameko_peer", "pong")]
    {
        let captured = capture_in(capture);
        let source = Source::Event {
            source_service: source_service.into(),
            event_type: event_type.into(),
            handler_type: HandlerType::ServicePool,
            dialect: Dialect::Nameko,
            service: "rust_peer".into(),
            route: "on_it".into(),
        };
        let env = decode(&source, captured.clone());
        assert_eq!(env.body, Body::Raw(captured.body.clone()));
        assert_eq!(env.routing_key, event_type);
        assert_eq!(env.headers, captured.properties.headers);

        let mut envelope = Envelope::raw("", event_type, captured.body.clone());
        envelope.headers = captured.properties.headers.clone();
        let publish = Publish {
            id: PublishId::from_raw(1),
            transport: Transport::Broker,
            destination: Destination::Event {
                source_service: source_service.into(),
                event_type: event_type.into(),
                dialect: Dialect::Nameko,
            },
            mandatory: false,
            envelope,
        };
        let out = encode(&publish, &AmqpSettings::new(source_service), no_sources).unwrap();
        assert!(!out.mandatory);
        assert_eq!(out.body, captured.body, "the payload goes out untouched");
        assert_eq!(as_capture(&out), capture_json(capture));
    }
}

#[test]
fn nameko_topology_matches_the_rabbitmqctl_capture() {
    // Service nameko_peer's own view, as a microfw service of the same name would declare it.
    let settings = AmqpSettings::new("nameko_peer");
    let rpc = topology(
        &Source::Rpc { service: "nameko_peer".into(), dialect: Dialect::Nameko, methods: vec![] },
        &settings,
    );
    let handler = Source::Event {
        source_service: "rust_peer".into(),
        event_type: "ping".into(),
        handler_type: HandlerType::ServicePool,
        dialect: Dialect::Nameko,
        service: "nameko_peer".into(),
        route: "on_ping".into(),
    };
    let events = topology(&handler, &settings);
    let proxy = AmqpSettings::new("standalone_rpc_proxy");
    let uuid = "60924f45-a3fa-4db1-971d-7f9bc82874de";
    let replies = topology(&Source::Replies { reply_to: uuid.into() }, &proxy);

    // list_exchanges: name type durable auto_delete
    let exchanges: Vec<(String, bool, bool)> = [&rpc, &events, &replies]
        .iter()
        .flat_map(|t| t.exchanges.iter())
        .filter(|e| e.name != "ufw-rpc")
        .map(|e| (e.name.clone(), e.durable, e.auto_delete))
        .collect();
    assert_eq!(
        exchanges,
        [
            ("nameko-rpc".to_owned(), true, false),
            ("rust_peer.events".to_owned(), true, false),
            ("nameko-rpc".to_owned(), true, false)
        ]
    );
    // list_queues: name durable auto_delete exclusive arguments
    let queues: Vec<(String, bool, bool, bool, Value)> = [&rpc, &events, &replies]
        .iter()
        .flat_map(|t| t.queues.iter())
        .map(|q| (q.name.clone(), q.durable, q.auto_delete, q.exclusive, headers_json(&q.arguments)))
        .collect();
    assert_eq!(
        queues,
        [
            ("rpc-nameko_peer".to_owned(), true, false, false, json!({})),
            ("evt-rust_peer-ping--nameko_peer.on_ping".to_owned(), true, false, false, json!({})),
            (
                format!("rpc.reply-standalone_rpc_proxy-{uuid}"),
                true,
                false,
                false,
                json!({"x-expires": 300000})
            ),
        ]
    );
    // list_bindings: source destination routing_key
    let bindings: Vec<(String, String, String)> = [&rpc, &events, &replies]
        .iter()
        .flat_map(|t| t.bindings.iter())
        .filter(|b| b.exchange != "ufw-rpc")
        .map(|b| (b.exchange.clone(), b.queue.clone(), b.routing_key.clone()))
        .collect();
    assert_eq!(
        bindings,
        [
            ("nameko-rpc".to_owned(), "rpc-nameko_peer".to_owned(), "nameko_peer.*".to_owned()),
            (
                "rust_peer.events".to_owned(),
                "evt-rust_peer-ping--nameko_peer.on_ping".to_owned(),
                "ping".to_owned()
            ),
            ("nameko-rpc".to_owned(), format!("rpc.reply-standalone_rpc_proxy-{uuid}"), uuid.to_owned()),
        ]
    );
}

// ---------------------------------------------------------------- micro_framework

#[test]
fn micro_framework_request_example_decodes_and_encodes() {
    let body = r#"{"command": "rpc_add", "command_args": [1, 2], "command_kwargs": {"d": 4}}"#;
    let env = decode(&mf_rpc_source(), incoming("ufw-rpc", "svc_a.rpc_add", mf_request_props(), body));
    let expected = RpcRequest {
        method: "rpc_add".into(),
        args: vec![json!(1), json!(2)],
        kwargs: json!({"d": 4}).as_object().cloned().unwrap(),
    };
    assert_eq!(env.body, Body::Request(expected.clone()));

    let publish = rpc_publish(
        Dialect::MicroFramework,
        "svc_a",
        "rpc_add",
        expected.args,
        expected.kwargs,
        Headers::new(),
        None,
    );
    let out = encode(&publish, &AmqpSettings::new("caller"), no_sources).unwrap();
    assert_eq!(
        (out.exchange.as_str(), out.routing_key.as_str(), out.mandatory),
        ("ufw-rpc", "svc_a.rpc_add", true)
    );
    assert_eq!(body_json(&out.body), parse(body));
    assert_eq!(body_keys(&out.body), ["command", "command_args", "command_kwargs"]);
    assert_eq!(out.properties.content_type.as_deref(), Some("application/json"));
    assert_eq!(out.properties.content_encoding.as_deref(), Some("utf-8"));
    assert_eq!(out.properties.delivery_mode, Some(2));
    assert_eq!(out.properties.reply_to.as_deref(), Some("b537b70c"), "the bare uuid in both dialects");
}

#[test]
fn micro_framework_request_variants() {
    // The echo capture of nameko-captures.md section 6.
    let echo = r#"{"command": "echo", "command_args": ["xxx"], "command_kwargs": {}}"#;
    let env = decode(&mf_rpc_source(), incoming("ufw-rpc", "svc_a.echo", mf_request_props(), echo));
    assert!(matches!(&env.body, Body::Request(r) if r.method == "echo" && r.args == [json!("xxx")]));
    // Missing arguments default to empty.
    let env =
        decode(&mf_rpc_source(), incoming("ufw-rpc", "svc_a.x", mf_request_props(), r#"{"command": "x"}"#));
    assert_eq!(env.body, Body::Request(RpcRequest { method: "x".into(), args: vec![], kwargs: Map::new() }));
    // A JSON string body is parsed once more, as micro_framework does.
    let string_body = serde_json::to_string(echo).unwrap();
    let env = decode(&mf_rpc_source(), incoming("ufw-rpc", "svc_a.echo", mf_request_props(), &string_body));
    assert!(matches!(&env.body, Body::Request(r) if r.method == "echo"));
    // The body's command decides, not the routing key.
    let other = r#"{"command": "rpc_add", "command_args": [], "command_kwargs": {}}"#;
    let env = decode(&mf_rpc_source(), incoming("ufw-rpc", "svc_a.echo", mf_request_props(), other));
    assert!(matches!(&env.body, Body::Request(r) if r.method == "rpc_add"));
    // No command: malformed (micro_framework would requeue it forever).
    let env = decode(&mf_rpc_source(), incoming("ufw-rpc", "svc_a.x", mf_request_props(), r#"{"args": []}"#));
    assert!(matches!(env.body, Body::MalformedRequest { .. }));
}

#[test]
fn micro_framework_double_encoded_replies_decode() {
    let env = decode(&replies(), incoming("ufw-rpc", "r", json_props(), MF_REPLY_OK));
    assert_eq!(env.body, Body::Reply(RpcReply { result: Ok(json!(10)) }));
    let env = decode(&replies(), incoming("ufw-rpc", "r", json_props(), MF_REPLY_NOT_FOUND));
    let message = "no_such_target does not exist or is not exposed through a RPC method.";
    assert_eq!(
        env.body,
        Body::Reply(RpcReply {
            result: Err(RemoteError {
                exc_type: "RPCTargetDoesNotExist".into(),
                module: String::new(),
                args: vec![message.into()],
                message: message.into(),
            })
        })
    );
    // Single-encoded is accepted too.
    let single: String = serde_json::from_str(MF_REPLY_OK).unwrap();
    let env = decode(&replies(), incoming("ufw-rpc", "r", json_props(), &single));
    assert_eq!(env.body, Body::Reply(RpcReply { result: Ok(json!(10)) }));
}

#[test]
fn micro_framework_replies_encode_double_encoded_in_key_order() {
    let settings = AmqpSettings::new("svc_a");
    let out = encode(
        &reply_publish(Dialect::MicroFramework, "ufw-reply-1", "c", Ok(json!(10))),
        &settings,
        no_sources,
    )
    .unwrap();
    assert_eq!((out.exchange.as_str(), out.routing_key.as_str()), ("ufw-rpc", "ufw-reply-1"));
    assert_eq!(out.properties.correlation_id.as_deref(), Some("c"));
    assert!(out.properties.headers.is_empty());
    assert_eq!(parse_twice(&out.body), parse_twice(MF_REPLY_OK.as_bytes()));
    let inner: String = serde_json::from_slice(&out.body).unwrap();
    assert!(inner.starts_with(r#"{"data":"#), "{inner}");

    let not_found = reply_publish(
        Dialect::MicroFramework,
        "ufw-reply-1",
        "c",
        Err(RemoteError::method_not_found("no_such_target")),
    );
    let out = encode(&not_found, &settings, no_sources).unwrap();
    assert_eq!(parse_twice(&out.body), parse_twice(MF_REPLY_NOT_FOUND.as_bytes()));

    // Other errors keep their type and message (observed KeyError → "'nope'").
    let key_error = RemoteError::new("builtins", "KeyError", "'nope'");
    let out =
        encode(&reply_publish(Dialect::MicroFramework, "r", "c", Err(key_error)), &settings, no_sources)
            .unwrap();
    assert_eq!(
        parse_twice(&out.body),
        json!({"data": null, "exception": {"exception": "KeyError", "message": "'nope'"}})
    );
}

#[test]
fn micro_framework_events_and_queues() {
    let source = Source::Event {
        source_service: "svc_src".into(),
        event_type: "class_evt".into(),
        handler_type: HandlerType::ServicePool,
        dialect: Dialect::MicroFramework,
        service: "svc_a".into(),
        route: "Handler.handle".into(),
    };
    let settings = AmqpSettings::new("svc_a");
    assert_eq!(queue_name(&source, &settings).as_deref(), Some("svc_src.class_evt__svc_a.Handler.handle"));
    let t = topology(&source, &settings);
    assert!(t.exchanges[0].auto_delete, "micro_framework event exchanges are auto-delete");

    let payload = Bytes::from_static(br#"{"from": {"ok": true, "n": 1}}"#);
    let env = decode(
        &source,
        incoming("svc_src.events", "class_evt", json_props(), r#"{"from": {"ok": true, "n": 1}}"#),
    );
    assert_eq!(env.body, Body::Raw(payload.clone()));

    let publish = Publish {
        id: PublishId::from_raw(1),
        transport: Transport::Broker,
        destination: Destination::Event {
            source_service: "svc_src".into(),
            event_type: "class_evt".into(),
            dialect: Dialect::MicroFramework,
        },
        mandatory: false,
        envelope: Envelope::raw("", "class_evt", payload.clone()),
    };
    let out = encode(&publish, &settings, no_sources).unwrap();
    assert_eq!((out.exchange.as_str(), out.routing_key.as_str()), ("svc_src.events", "class_evt"));
    assert_eq!(out.body, payload);
    assert_eq!(
        (out.properties.content_type.as_deref(), out.properties.delivery_mode, out.properties.priority),
        (Some("application/json"), Some(2), Some(0))
    );
}

// ---------------------------------------------------------------- helpers

fn no_sources(_: microfw_core::SubscriptionId) -> Option<&'static Source> {
    None
}

fn nameko_rpc_source() -> Source {
    Source::Rpc { service: "nameko_peer".into(), dialect: Dialect::Nameko, methods: vec![] }
}

fn mf_rpc_source() -> Source {
    Source::Rpc { service: "svc_a".into(), dialect: Dialect::MicroFramework, methods: vec![] }
}

fn replies() -> Source {
    Source::Replies { reply_to: "b537b70c-8865-4e50-81dd-b31ec7b7f9ed".into() }
}

fn json_props() -> AmqpProperties {
    AmqpProperties {
        content_type: Some("application/json".into()),
        content_encoding: Some("utf-8".into()),
        delivery_mode: Some(2),
        priority: Some(0),
        ..AmqpProperties::default()
    }
}

fn mf_request_props() -> AmqpProperties {
    AmqpProperties { correlation_id: Some("c".into()), reply_to: Some("ufw-reply-1".into()), ..json_props() }
}

fn incoming(exchange: &str, routing_key: &str, properties: AmqpProperties, body: &str) -> IncomingMessage {
    IncomingMessage {
        exchange: exchange.into(),
        routing_key: routing_key.into(),
        redelivered: false,
        properties,
        body: Bytes::copy_from_slice(body.as_bytes()),
    }
}

fn rpc_publish(
    dialect: Dialect,
    service: &str,
    method: &str,
    args: Vec<Value>,
    kwargs: Map<String, Value>,
    headers: Headers,
    expiration_ms: Option<u64>,
) -> Publish {
    let (correlation_id, reply_to) = match dialect {
        Dialect::Nameko => ("41b49757-f24f-40b4-a147-1640e8854b63", "b537b70c-8865-4e50-81dd-b31ec7b7f9ed"),
        Dialect::MicroFramework => ("c", "b537b70c"),
    };
    Publish {
        id: PublishId::from_raw(7),
        transport: Transport::Broker,
        destination: Destination::Rpc { service: service.into(), method: method.into(), dialect },
        mandatory: true,
        envelope: Envelope {
            exchange: String::new(),
            routing_key: format!("{service}.{method}"),
            headers,
            properties: Properties {
                content_type: Some("application/json".into()),
                correlation_id: Some(correlation_id.into()),
                reply_to: Some(reply_to.into()),
                expiration_ms,
            },
            body: Body::Request(RpcRequest { method: method.into(), args, kwargs }),
        },
    }
}

fn reply_publish(
    dialect: Dialect,
    reply_to: &str,
    correlation: &str,
    result: Result<Value, RemoteError>,
) -> Publish {
    Publish {
        id: PublishId::from_raw(8),
        transport: Transport::Broker,
        destination: Destination::Reply { reply_to: reply_to.into(), dialect },
        mandatory: false,
        envelope: Envelope {
            exchange: String::new(),
            routing_key: reply_to.into(),
            headers: Headers::new(),
            properties: Properties {
                content_type: Some("application/json".into()),
                correlation_id: Some(correlation.into()),
                reply_to: None,
                expiration_ms: None,
            },
            body: Body::Reply(RpcReply { result }),
        },
    }
}

fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap()
}

fn body_json(body: &[u8]) -> Value {
    serde_json::from_slice(body).unwrap()
}

/// A double-encoded body: JSON text inside a JSON string.
fn parse_twice(body: &[u8]) -> Value {
    let inner: String = serde_json::from_slice(body).unwrap();
    parse(&inner)
}

/// The top-level keys of a JSON object body, in the order they were written.
fn body_keys(body: &[u8]) -> Vec<String> {
    let text = std::str::from_utf8(body).unwrap();
    let value = body_json(body);
    let mut keys: Vec<(usize, String)> = value
        .as_object()
        .unwrap()
        .keys()
        .map(|k| (text.find(&format!("\"{k}\":")).unwrap(), k.clone()))
        .collect();
    keys.sort();
    keys.into_iter().map(|(_, k)| k).collect()
}

fn json_to_field(value: &Value) -> FieldValue {
    match value {
        Value::Null => FieldValue::Void,
        Value::Bool(b) => FieldValue::Bool(*b),
        Value::Number(n) => n.as_i64().map_or_else(|| FieldValue::F64(n.as_f64().unwrap()), FieldValue::I64),
        Value::String(s) => FieldValue::Str(s.clone()),
        Value::Array(items) => FieldValue::Array(items.iter().map(json_to_field).collect()),
        Value::Object(map) => {
            FieldValue::Table(map.iter().map(|(k, v)| (k.clone(), json_to_field(v))).collect())
        }
    }
}

fn headers_json(headers: &Headers) -> Value {
    Value::Object(headers.iter().map(|(k, v)| (k.to_owned(), v.to_json())).collect())
}

/// A captured message as an incoming delivery.
fn capture_in(capture: &str) -> IncomingMessage {
    let c = parse(capture);
    let p = &c["properties"];
    let text = |key: &str| p[key].as_str().map(str::to_owned);
    let byte = |key: &str| p[key].as_u64().map(|n| u8::try_from(n).unwrap());
    let headers = match json_to_field(&p["application_headers"]) {
        FieldValue::Table(h) => h,
        other => panic!("headers {other:?}"),
    };
    IncomingMessage {
        exchange: c["exchange"].as_str().unwrap().into(),
        routing_key: c["routing_key"].as_str().unwrap().into(),
        redelivered: false,
        properties: AmqpProperties {
            content_type: text("content_type"),
            content_encoding: text("content_encoding"),
            delivery_mode: byte("delivery_mode"),
            priority: byte("priority"),
            correlation_id: text("correlation_id"),
            reply_to: text("reply_to"),
            expiration: text("expiration"),
            headers,
        },
        body: Bytes::copy_from_slice(c["body"].as_str().unwrap().as_bytes()),
    }
}

/// A capture with its body parsed, for comparison with [`as_capture`].
fn capture_json(capture: &str) -> Value {
    let mut c = parse(capture);
    let body = parse(c["body"].as_str().unwrap());
    c["body"] = body;
    c
}

/// An outgoing message in the capture's shape (absent properties omitted, body parsed).
fn as_capture(out: &OutgoingMessage) -> Value {
    let p = &out.properties;
    let mut props = Map::new();
    props.insert("application_headers".into(), headers_json(&p.headers));
    let mut put = |key: &str, value: Option<Value>| {
        if let Some(v) = value {
            props.insert(key.into(), v);
        }
    };
    put("content_encoding", p.content_encoding.clone().map(Value::from));
    put("content_type", p.content_type.clone().map(Value::from));
    put("correlation_id", p.correlation_id.clone().map(Value::from));
    put("delivery_mode", p.delivery_mode.map(Value::from));
    put("priority", p.priority.map(Value::from));
    put("reply_to", p.reply_to.clone().map(Value::from));
    put("expiration", p.expiration.clone().map(Value::from));
    json!({
        "exchange": out.exchange,
        "routing_key": out.routing_key,
        "properties": props,
        "body": body_json(&out.body),
    })
}

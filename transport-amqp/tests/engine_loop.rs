//! The codec driven by a real core Engine: what the Engine publishes is encoded, carried
//! through a hand-rolled model of RabbitMQ's routing (topic bindings, dead-lettering through
//! the default exchange), decoded and fed back. Proves the round trips the unit tests cannot:
//! delayed retry and dead letter of RPC requests and events, and replies reaching the caller's
//! reply queue in both dialects.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use microfw_core::engine::{ATTEMPT_HEADER, EXCHANGE_HEADER, ROUTING_KEY_HEADER};
use microfw_core::{
    Action, Body, Delivery, DeliveryTag, Destination, Dialect, Engine, EngineConfig, EventListener,
    FieldValue, HandlerError, Instant, LinkId, Outcome, OutgoingCall, Publish, Route, RpcListener,
    RunnerContext, Service, Settle, Source, SubscriptionId, Transport,
};
use microfw_core::{RetryPolicy, topic};
use microfw_transport_amqp::{
    AmqpSettings, IncomingMessage, OutgoingMessage, Topology, decode, encode, publish_topology, topology,
};
use serde_json::{Map, Value, json};

fn h() {}

/// One Engine with its link state: the sources of its subscriptions and their topology.
struct Harness {
    engine: Engine,
    settings: AmqpSettings,
    sources: HashMap<SubscriptionId, Source>,
    declared: Vec<Topology>,
    now: Instant,
    tag: u64,
}

impl Harness {
    fn new(service: Service<()>, settings: AmqpSettings) -> Self {
        let (spec, _) = service.build().unwrap();
        let mut harness = Harness {
            engine: Engine::new(&spec, EngineConfig { seed: 7, ..EngineConfig::default() }),
            settings,
            sources: HashMap::new(),
            declared: Vec::new(),
            now: Instant::EPOCH,
            tag: 0,
        };
        harness.engine.handle_start(harness.now);
        harness
    }

    /// Drains actions: subscriptions are recorded and declared, everything else returned.
    fn actions(&mut self) -> Vec<Action> {
        let mut rest = Vec::new();
        while let Some(action) = self.engine.poll_action() {
            match action {
                Action::Subscribe(s) => {
                    self.declared.push(topology(&s.source, &self.settings));
                    self.sources.insert(s.id, s.source);
                }
                other => rest.push(other),
            }
        }
        rest
    }

    fn source(&self, id: SubscriptionId) -> &Source {
        &self.sources[&id]
    }

    fn subscription(&self, pred: impl Fn(&Source) -> bool) -> SubscriptionId {
        *self.sources.iter().find(|(_, s)| pred(s)).unwrap().0
    }

    fn deliver(&mut self, subscription: SubscriptionId, message: IncomingMessage) {
        self.tag += 1;
        let envelope = decode(self.source(subscription), message);
        let delivery = Delivery {
            link: LinkId::from_raw(0),
            tag: DeliveryTag::from_raw(self.tag),
            subscription,
            redelivered: false,
            envelope,
        };
        self.engine.handle_delivery(self.now, delivery);
    }

    /// Encodes a publish (and checks its declarations), confirming it to the Engine.
    fn encode(&mut self, publish: &Publish) -> (OutgoingMessage, Topology) {
        let sources = &self.sources;
        let out = encode(publish, &self.settings, |id| sources.get(&id)).unwrap();
        let needs = publish_topology(publish, &self.settings, |id| sources.get(&id)).unwrap();
        self.engine.handle_publish_result(self.now, publish.id, Ok(()));
        (out, needs)
    }
}

/// RabbitMQ's routing of `out` to `queue` over `topology`'s bindings (or the default exchange).
fn routes_to(out: &OutgoingMessage, topology: &[Topology], queue: &str) -> bool {
    if out.exchange.is_empty() {
        return out.routing_key == queue;
    }
    topology.iter().flat_map(|t| &t.bindings).any(|b| {
        b.queue == queue
            && b.exchange == out.exchange
            && topic::topic_matches(&b.routing_key, &out.routing_key)
    })
}

/// The waiting queue expiring: the broker dead-letters the message through the default
/// exchange with the waiting queue's `x-dead-letter-routing-key`, adding `x-death`.
fn dead_letter_from_waiting_queue(out: &OutgoingMessage, waiting: &Topology) -> IncomingMessage {
    let queue = &waiting.queues[0];
    assert_eq!(queue.name, out.routing_key, "published to the waiting queue itself");
    let Some(FieldValue::Str(target)) = queue.arguments.get("x-dead-letter-routing-key") else {
        panic!("no dead-letter routing key: {queue:?}")
    };
    let mut properties = out.properties.clone();
    properties.headers.insert("x-death", FieldValue::Array(vec![]));
    IncomingMessage {
        exchange: String::new(),
        routing_key: target.clone(),
        redelivered: false,
        properties,
        body: out.body.clone(),
    }
}

fn dispatch_ids(actions: &[Action]) -> Vec<microfw_core::DispatchId> {
    actions.iter().filter_map(|a| if let Action::Dispatch(d) = a { Some(d.id) } else { None }).collect()
}

fn publishes(actions: Vec<Action>) -> Vec<Publish> {
    actions.into_iter().filter_map(|a| if let Action::Publish(p) = a { Some(p) } else { None }).collect()
}

fn boom() -> HandlerError {
    HandlerError::retryable("ValueError", "boom").in_module("builtins")
}

#[test]
fn nameko_rpc_request_is_retried_through_a_waiting_queue_then_dead_lettered() {
    let service = Service::new("svc").context(
        RunnerContext::new(2).route(
            Route::blocking(RpcListener::new(), "echo", h)
                .retry(RetryPolicy::fixed(1, Duration::from_millis(200)))
                .on_give_up(Settle::DeadLetter),
        ),
    );
    let mut hx = Harness::new(service, AmqpSettings::new("svc"));
    assert!(hx.actions().is_empty());
    let rpc = hx.subscription(|s| matches!(s, Source::Rpc { .. }));

    // A Nameko caller's request, as captured.
    let request = IncomingMessage {
        exchange: "nameko-rpc".into(),
        routing_key: "svc.echo".into(),
        redelivered: false,
        properties: microfw_transport_amqp::AmqpProperties {
            content_type: Some("application/json".into()),
            correlation_id: Some("corr-1".into()),
            reply_to: Some("reply-key".into()),
            ..Default::default()
        },
        body: Bytes::from_static(br#"{"args": ["hello"], "kwargs": {"k": 1}}"#),
    };
    hx.deliver(rpc, request);
    let first = hx.actions();
    let [dispatch] = dispatch_ids(&first)[..] else { panic!("{first:?}") };
    hx.engine.handle_outcome(hx.now, dispatch, Outcome::Failed(boom()));

    // First failure: a delayed retry to the waiting queue of rpc-svc.
    let retry = publishes(hx.actions());
    assert_eq!(retry.len(), 1, "{retry:?}");
    assert!(matches!(retry[0].destination, Destination::Retry { .. }));
    let (out, waiting) = hx.encode(&retry[0]);
    assert_eq!((out.exchange.as_str(), out.routing_key.as_str()), ("", "microfw.retry.rpc-svc.200"));
    assert!(out.mandatory);
    assert_eq!(waiting.queues[0].name, "microfw.retry.rpc-svc.200");
    assert_eq!(out.properties.headers.get(ATTEMPT_HEADER), Some(&FieldValue::I64(1)));
    assert_eq!(out.properties.headers.get(ROUTING_KEY_HEADER), Some(&FieldValue::from("svc.echo")));
    assert_eq!(out.properties.headers.get(EXCHANGE_HEADER), Some(&FieldValue::from("nameko-rpc")));
    assert_eq!(out.properties.reply_to.as_deref(), Some("reply-key"));
    assert_eq!(out.properties.correlation_id.as_deref(), Some("corr-1"));
    assert_eq!(out.properties.expiration, None);
    assert_eq!(
        serde_json::from_slice::<Value>(&out.body).unwrap(),
        json!({"args": ["hello"], "kwargs": {"k": 1}})
    );
    assert!(hx.actions().iter().any(|a| matches!(a, Action::Ack(_))), "acked once the retry is confirmed");

    // The waiting queue expires into rpc-svc through the default exchange; the codec restores
    // the original addressing, so the Engine sees the same request again, attempt 1.
    let back = dead_letter_from_waiting_queue(&out, &waiting);
    assert_eq!((back.exchange.as_str(), back.routing_key.as_str()), ("", "rpc-svc"));
    hx.now += Duration::from_millis(200);
    hx.deliver(rpc, back);
    let second = hx.actions();
    let [dispatch] = dispatch_ids(&second)[..] else { panic!("{second:?}") };
    if let Some(Action::Dispatch(d)) = second.iter().find(|a| matches!(a, Action::Dispatch(_))) {
        assert_eq!(d.job.parts.attempt.retry_count, 1);
    }
    hx.engine.handle_outcome(hx.now, dispatch, Outcome::Failed(boom()));

    // Given up: the caller gets the error reply, the request goes to the DLQ.
    let last = publishes(hx.actions());
    let reply = last.iter().find(|p| matches!(p.destination, Destination::Reply { .. })).unwrap();
    let dead = last.iter().find(|p| matches!(p.destination, Destination::DeadLetter { .. })).unwrap();
    let (out, needs) = hx.encode(reply);
    assert!(needs.queues.is_empty() && needs.exchanges.is_empty());
    assert_eq!((out.exchange.as_str(), out.routing_key.as_str()), ("nameko-rpc", "reply-key"));
    assert_eq!(
        serde_json::from_slice::<Value>(&out.body).unwrap(),
        json!({"result": null, "error": {"exc_type": "ValueError", "exc_path": "builtins.ValueError", "exc_args": ["boom"], "value": "boom"}})
    );
    let (out, dlq) = hx.encode(dead);
    assert_eq!((out.exchange.as_str(), out.routing_key.as_str()), ("", "microfw.dlq.rpc-svc"));
    assert_eq!(dlq.queues[0].name, "microfw.dlq.rpc-svc");
    assert_eq!(out.properties.headers.get(ROUTING_KEY_HEADER), Some(&FieldValue::from("svc.echo")));
    assert_eq!(
        serde_json::from_slice::<Value>(&out.body).unwrap(),
        json!({"args": ["hello"], "kwargs": {"k": 1}})
    );
}

#[test]
fn micro_framework_request_retry_goes_back_to_its_target_queue_in_its_dialect() {
    let service = Service::new("svc").context(
        RunnerContext::new(2).route(
            Route::blocking(RpcListener::new().dialect(Dialect::MicroFramework), "add", h)
                .retry(RetryPolicy::fixed(1, Duration::from_millis(100))),
        ),
    );
    let settings = AmqpSettings::new("svc");
    let mut hx = Harness::new(service, settings);
    hx.actions();
    let rpc = hx.subscription(|s| matches!(s, Source::Rpc { .. }));
    assert_eq!(hx.declared[0].consume, ["rpc-svc-add", "rpc-svc-broadcast"]);

    let request = IncomingMessage {
        exchange: "ufw-rpc".into(),
        routing_key: "svc.add".into(),
        redelivered: false,
        properties: microfw_transport_amqp::AmqpProperties {
            content_type: Some("application/json".into()),
            correlation_id: Some("c".into()),
            reply_to: Some("ufw-reply-9".into()),
            ..Default::default()
        },
        body: Bytes::from_static(br#"{"command": "add", "command_args": [1, 2], "command_kwargs": {}}"#),
    };
    hx.deliver(rpc, request);
    let actions = hx.actions();
    let [dispatch] = dispatch_ids(&actions)[..] else { panic!("{actions:?}") };
    hx.engine.handle_outcome(hx.now, dispatch, Outcome::Failed(boom()));
    let retry = publishes(hx.actions());
    let (out, waiting) = hx.encode(&retry[0]);
    assert_eq!(out.routing_key, "microfw.retry.rpc-svc-add.100");
    assert_eq!(
        waiting.queues[0].arguments.get("x-dead-letter-routing-key"),
        Some(&FieldValue::from("rpc-svc-add"))
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&out.body).unwrap(),
        json!({"command": "add", "command_args": [1, 2], "command_kwargs": {}})
    );
    hx.actions();

    // Back from the waiting queue, then success: the reply goes to the micro_framework
    // caller's own reply queue name, on ufw-rpc, double-encoded.
    let back = dead_letter_from_waiting_queue(&out, &waiting);
    hx.deliver(rpc, back);
    let actions = hx.actions();
    let [dispatch] = dispatch_ids(&actions)[..] else { panic!("{actions:?}") };
    hx.engine.handle_outcome(hx.now, dispatch, Outcome::Success(Some(json!(3))));
    let reply = publishes(hx.actions());
    let (out, _) = hx.encode(&reply[0]);
    assert_eq!((out.exchange.as_str(), out.routing_key.as_str()), ("ufw-rpc", "ufw-reply-9"));
    let inner: String = serde_json::from_slice(&out.body).unwrap();
    assert_eq!(serde_json::from_str::<Value>(&inner).unwrap(), json!({"data": 3, "exception": null}));
}

#[test]
fn event_retry_restores_the_source_exchange_and_event_type() {
    let service = Service::new("svc").context(
        RunnerContext::new(2).route(
            Route::blocking(EventListener::new("src", "evt"), "on_evt", h)
                .retry(RetryPolicy::fixed(1, Duration::from_millis(100))),
        ),
    );
    let mut hx = Harness::new(service, AmqpSettings::new("svc"));
    hx.actions();
    let sub = hx.subscription(|s| matches!(s, Source::Event { .. }));
    let event = IncomingMessage {
        exchange: "src.events".into(),
        routing_key: "evt".into(),
        redelivered: false,
        properties: Default::default(),
        body: Bytes::from_static(br#"{"n": 1}"#),
    };
    hx.deliver(sub, event);
    let actions = hx.actions();
    let [dispatch] = dispatch_ids(&actions)[..] else { panic!("{actions:?}") };
    hx.engine.handle_outcome(hx.now, dispatch, Outcome::Failed(boom()));
    let retry = publishes(hx.actions());
    let (out, waiting) = hx.encode(&retry[0]);
    assert_eq!(out.routing_key, "microfw.retry.evt-src-evt--svc.on_evt.100");
    assert_eq!(out.body, Bytes::from_static(br#"{"n": 1}"#));
    let back = dead_letter_from_waiting_queue(&out, &waiting);
    let envelope = decode(hx.source(sub), back);
    assert_eq!((envelope.exchange.as_str(), envelope.routing_key.as_str()), ("src.events", "evt"));
    assert_eq!(envelope.body, Body::Raw(Bytes::from_static(br#"{"n": 1}"#)));
    assert_eq!(envelope.headers.get(ATTEMPT_HEADER), Some(&FieldValue::I64(1)));
}

/// A call in `dialect` from one Engine, served by another microfw Engine speaking the same
/// dialect; the reply must route to the caller's reply queue and resolve the call.
fn call_round_trip(dialect: Dialect) {
    let server = Service::new("other").context(RunnerContext::new(2).route(Route::blocking(
        RpcListener::new().dialect(dialect),
        "m",
        h,
    )));
    let server_settings = AmqpSettings::new("other");
    let mut server = Harness::new(server, server_settings);
    server.actions();
    let mut client = Harness::new(Service::new("client"), AmqpSettings::new("client"));
    client.actions();

    let call = client.engine.handle_call(
        client.now,
        OutgoingCall {
            context: None,
            service: "other".into(),
            method: "m".into(),
            args: vec![json!(1)],
            kwargs: Map::new(),
            timeout: Some(Duration::from_secs(5)),
            transport: Transport::Broker,
            dialect,
        },
    );
    let request = publishes(client.actions());
    let (out, _) = client.encode(&request[0]);
    assert_eq!(out.properties.reply_to.as_deref(), Some(client.engine.reply_to()));
    assert_eq!(out.properties.expiration.as_deref(), Some("5000"));
    let rpc = server.subscription(|s| matches!(s, Source::Rpc { .. }));
    let server_queue = server.declared[0].consume[0].clone();
    assert!(routes_to(&out, &server.declared, &server_queue), "{out:?} does not reach {server_queue}");

    server.deliver(
        rpc,
        IncomingMessage {
            exchange: out.exchange,
            routing_key: out.routing_key,
            redelivered: false,
            properties: out.properties,
            body: out.body,
        },
    );
    let actions = server.actions();
    let [dispatch] = dispatch_ids(&actions)[..] else { panic!("{actions:?}") };
    server.engine.handle_outcome(server.now, dispatch, Outcome::Success(Some(json!({"ok": true}))));
    let reply = publishes(server.actions());
    let (out, _) = server.encode(&reply[0]);

    let replies = client.subscription(|s| matches!(s, Source::Replies { .. }));
    let reply_queue = format!("rpc.reply-client-{}", client.engine.reply_to());
    assert!(routes_to(&out, &client.declared, &reply_queue), "{out:?} does not reach {reply_queue}");
    client.deliver(
        replies,
        IncomingMessage {
            exchange: out.exchange,
            routing_key: out.routing_key,
            redelivered: false,
            properties: out.properties,
            body: out.body,
        },
    );
    let resolved = client.actions();
    assert!(
        resolved.iter().any(|a| matches!(a, Action::Resolve { call: c, result: Ok(v) } if *c == call && *v == json!({"ok": true}))),
        "{resolved:?}"
    );
}

#[test]
fn nameko_call_reply_round_trip() {
    call_round_trip(Dialect::Nameko);
}

#[test]
fn micro_framework_call_reply_round_trip() {
    call_round_trip(Dialect::MicroFramework);
}

#[test]
fn unknown_method_answers_in_each_dialect() {
    for (dialect, expected) in [
        (
            Dialect::Nameko,
            json!({"result": null, "error": {"exc_type": "MethodNotFound", "exc_path": "nameko.exceptions.MethodNotFound", "exc_args": ["nope"], "value": "nope"}}),
        ),
        (
            Dialect::MicroFramework,
            json!({"data": null, "exception": {"exception": "RPCTargetDoesNotExist", "message": "nope does not exist or is not exposed through a RPC method."}}),
        ),
    ] {
        let service = Service::new("svc").context(RunnerContext::new(1).route(Route::blocking(
            RpcListener::new().dialect(dialect),
            "m",
            h,
        )));
        let mut hx = Harness::new(service, AmqpSettings::new("svc"));
        hx.actions();
        let rpc = hx.subscription(|s| matches!(s, Source::Rpc { .. }));
        let body: &'static [u8] = match dialect {
            Dialect::Nameko => br#"{"args": [], "kwargs": {}}"#,
            Dialect::MicroFramework => br#"{"command": "nope"}"#,
        };
        hx.deliver(
            rpc,
            IncomingMessage {
                exchange: "x".into(),
                routing_key: "svc.nope".into(),
                redelivered: false,
                properties: microfw_transport_amqp::AmqpProperties {
                    content_type: Some("application/json".into()),
                    reply_to: Some("r".into()),
                    correlation_id: Some("c".into()),
                    ..Default::default()
                },
                body: Bytes::from_static(body),
            },
        );
        let reply = publishes(hx.actions());
        let (out, _) = hx.encode(&reply[0]);
        let mut value: Value = serde_json::from_slice(&out.body).unwrap();
        if let Value::String(inner) = value {
            value = serde_json::from_str(&inner).unwrap();
        }
        assert_eq!(value, expected, "{dialect:?}");
    }
}

#[test]
fn malformed_nameko_request_gets_a_malformed_request_reply() {
    let service =
        Service::new("svc").context(RunnerContext::new(1).route(Route::blocking(RpcListener::new(), "m", h)));
    let mut hx = Harness::new(service, AmqpSettings::new("svc"));
    hx.actions();
    let rpc = hx.subscription(|s| matches!(s, Source::Rpc { .. }));
    hx.deliver(
        rpc,
        IncomingMessage {
            exchange: "nameko-rpc".into(),
            routing_key: "svc.m".into(),
            redelivered: false,
            properties: microfw_transport_amqp::AmqpProperties {
                content_type: Some("application/json".into()),
                reply_to: Some("r".into()),
                ..Default::default()
            },
            body: Bytes::from_static(br#"{"kwargs": {}}"#),
        },
    );
    let reply = publishes(hx.actions());
    let (out, _) = hx.encode(&reply[0]);
    let value: Value = serde_json::from_slice(&out.body).unwrap();
    assert_eq!(value["error"]["exc_path"], json!("nameko.exceptions.MalformedRequest"));
    assert_eq!(value["error"]["value"], json!("Message missing `args` or `kwargs`"));
}

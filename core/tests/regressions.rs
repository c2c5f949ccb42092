//! Regression tests from the first review of the Engine: each once failed, each pins the
//! behaviour the contract promises.

use std::time::Duration;

use microfw_core::extract::{Params, Payload};
use microfw_core::testing::{Record, Simulator};
use microfw_core::{
    Action, Body, CallError, Delivery, DeliveryTag, Engine, EngineConfig, Envelope, EventListener,
    HandlerError, Instant, LinkId, Outcome, Properties, PublishError, Reply, RetryPolicy, Route, RpcListener,
    RpcRequest, RunnerContext, Service, ShutdownMode, Source, SubscriptionId, Transport, WsRpcListener,
};
use serde_json::{Value, json};

fn ok_event(Payload(_): Payload<Value>) {}

fn first_dispatch(actions: Vec<Action>) -> microfw_core::DispatchId {
    actions
        .into_iter()
        .find_map(|a| if let Action::Dispatch(d) = a { Some(d.id) } else { None })
        .expect("a dispatch")
}

fn drain(engine: &mut Engine) -> Vec<Action> {
    std::iter::from_fn(|| engine.poll_action()).collect()
}

// ------------------------------------------------------------------------------------------
// 1. After Stopped (shutdown timeout) a late outcome still makes the Engine act: it acks an
//    "abandoned" delivery and dispatches held work after Action::Stopped.
#[test]
fn no_dispatch_or_settle_after_stopped_at_timeout() {
    let ctx = RunnerContext::new(1)
        .shutdown_mode(ShutdownMode::DrainPending)
        .prefetch(3)
        .route(Route::blocking(EventListener::new("src", "evt"), "h", ok_event));
    let mut sim = Simulator::new();
    let config = EngineConfig { shutdown_timeout: Duration::from_secs(5), ..EngineConfig::default() };
    let node = sim.add_service_with(Service::new("svc").context(ctx), config).unwrap();
    for i in 0..3 {
        sim.publish_event("src", "evt", &json!(i));
    }
    let first = sim.pending().next().unwrap().id;
    sim.shutdown(node);
    sim.advance(Duration::from_secs(5));
    assert!(sim.engine(node).is_stopped());
    let records = sim.take_records(node);
    assert_eq!(records.last(), Some(&Record::Stopped { unfinished: 3 }));
    // The abandoned run ends late.
    sim.complete(node, first, Outcome::Success(None));
    let after: Vec<Record> =
        sim.take_records(node).into_iter().filter(|r| !matches!(r, Record::Outcome { .. })).collect();
    assert_eq!(after, vec![], "a stopped Engine must not ack / dispatch anything");
}

// ------------------------------------------------------------------------------------------
// 2. An in-engine retry (WebSocket RPC) scheduled during shutdown is forgotten: the Engine
//    reports a clean stop (unfinished 0) while the delivery was never settled, and later
//    dispatches the retry after Stopped.
fn ws_engine(max_workers: u32) -> (Engine, SubscriptionId, Instant) {
    let route = Route::blocking(WsRpcListener, "m", |Params(()): Params<()>| Reply(1))
        .retry(RetryPolicy::fixed(3, Duration::from_secs(1)));
    let (spec, _) =
        Service::new("svc").context(RunnerContext::new(max_workers).route(route)).build().unwrap();
    let mut engine = Engine::new(&spec, EngineConfig::default());
    let now = Instant::from_unix_millis(1_000_000);
    engine.handle_start(now);
    let sub = drain(&mut engine)
        .into_iter()
        .find_map(|a| match a {
            Action::Subscribe(s) if matches!(s.source, Source::WsRpc { .. }) => Some(s.id),
            _ => None,
        })
        .unwrap();
    (engine, sub, now)
}

fn ws_request(sub: SubscriptionId, tag: u64) -> Delivery {
    Delivery {
        link: LinkId::from_raw(1),
        tag: DeliveryTag::from_raw(tag),
        subscription: sub,
        redelivered: false,
        envelope: Envelope {
            exchange: String::new(),
            routing_key: "svc.m".into(),
            headers: Default::default(),
            properties: Properties {
                reply_to: Some("caller".into()),
                correlation_id: Some("c1".into()),
                ..Properties::default()
            },
            body: Body::Request(RpcRequest { method: "m".into(), args: vec![], kwargs: Default::default() }),
        },
    }
}

#[test]
fn in_engine_retry_during_shutdown_is_not_lost() {
    let (mut engine, sub, now) = ws_engine(1);
    engine.handle_delivery(now, ws_request(sub, 7));
    let dispatch = first_dispatch(drain(&mut engine));
    engine.handle_shutdown(now);
    drain(&mut engine);
    engine.handle_outcome(now, dispatch, Outcome::Failed(HandlerError::retryable("Busy", "later")));
    let actions = drain(&mut engine);
    let settled =
        actions.iter().any(|a| matches!(a, Action::Ack(_) | Action::Reject { .. } | Action::Publish(_)));
    let clean_stop = actions.iter().any(|a| matches!(a, Action::Stopped { unfinished: 0 }));
    assert!(
        settled || !clean_stop,
        "delivery neither settled nor counted as unfinished, yet Stopped{{0}}: {actions:?}"
    );
}

#[test]
fn delayed_retry_is_not_dispatched_after_stopped() {
    let (mut engine, sub, now) = ws_engine(1);
    engine.handle_delivery(now, ws_request(sub, 7));
    let dispatch = first_dispatch(drain(&mut engine));
    engine.handle_shutdown(now);
    engine.handle_outcome(now, dispatch, Outcome::Failed(HandlerError::retryable("Busy", "later")));
    drain(&mut engine);
    assert!(engine.is_stopped());
    let t = engine.poll_timeout();
    assert_eq!(t, None, "a stopped Engine still asks for a timeout");
    // Even if time passes anyway, the forgotten retry is not dispatched.
    engine.handle_timeout(now + Duration::from_secs(2));
    let actions = drain(&mut engine);
    assert!(!actions.iter().any(|a| matches!(a, Action::Dispatch(_))), "{actions:?}");
}

// ------------------------------------------------------------------------------------------
// 3. RPC subscription prefetch is summed per METHOD, not per context (the `context_seen`
//    check compares against the route being added, which is not in `self.routes` yet).
#[test]
fn rpc_prefetch_grows_per_context_not_per_method() {
    let m = |Params(()): Params<()>| Reply(1);
    let ctx = RunnerContext::new(2)
        .route(Route::blocking(RpcListener::new(), "a", m))
        .route(Route::blocking(RpcListener::new(), "b", m))
        .route(Route::blocking(RpcListener::new(), "c", m));
    let (spec, _) = Service::new("svc").context(ctx).build().unwrap();
    let mut engine = Engine::new(&spec, EngineConfig::default());
    engine.handle_start(Instant::from_unix_millis(0));
    let prefetch = drain(&mut engine)
        .into_iter()
        .find_map(|a| match a {
            Action::Subscribe(s) if matches!(s.source, Source::Rpc { .. }) => Some(s.prefetch),
            _ => None,
        })
        .unwrap();
    assert_eq!(prefetch, 2, "one context with prefetch 2 serves these methods");
}

#[test]
fn rpc_held_requests_exceed_context_prefetch() {
    let m = |Params(()): Params<()>| Reply(1);
    let server = Service::new("svc").context(
        RunnerContext::new(1)
            .route(Route::blocking(RpcListener::new(), "a", m))
            .route(Route::blocking(RpcListener::new(), "b", m))
            .route(Route::blocking(RpcListener::new(), "c", m))
            .route(Route::blocking(RpcListener::new(), "d", m)),
    );
    let mut sim = Simulator::new();
    let s = sim.add_service(server).unwrap();
    let c = sim.add_service(Service::new("client")).unwrap();
    for _ in 0..8 {
        sim.call(c, "svc", "a", json!([]), json!({}));
    }
    // Context: budget 1, prefetch 1 -> nothing should be held in the Engine.
    assert_eq!(sim.engine(s).stats().held, 0, "held beyond the context's prefetch");
}

// ------------------------------------------------------------------------------------------
// 4. A dead-letter publish that keeps failing requeues the message at once, forever: a tight
//    requeue loop (here the simulator's settle() never returns).
#[test]
fn failing_dead_letter_publish_is_not_a_tight_requeue_loop() {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let route = Route::blocking(EventListener::new("src", "evt"), "h", ok_event)
            .translator(|_| Err("cannot translate".into()));
        let mut sim = Simulator::new();
        sim.add_service(Service::new("svc").context(RunnerContext::new(1).route(route))).unwrap();
        // The DLQ exists with other arguments (declared by an operator, say): declare -> 406.
        let opts = microfw_core::broker::QueueOptions { exclusive: true, ..Default::default() };
        sim.broker_mut().declare_queue("microfw.dlq.evt-src-evt--svc.h", opts).unwrap();
        sim.publish_event("src", "evt", &json!({}));
        let _ = tx.send(());
    });
    assert!(
        rx.recv_timeout(Duration::from_secs(3)).is_ok(),
        "settle() spins: the poison message is requeued and re-rejected without pause"
    );
}

#[test]
fn failing_dead_letter_publish_requeues_immediately_each_time() {
    // Same thing, engine driven directly: N redeliveries -> N immediate DLQ publishes and N
    // immediate requeues, no time passing, no backoff, no counter.
    let route =
        Route::blocking(EventListener::new("src", "evt"), "h", ok_event).translator(|_| Err("x".into()));
    let (spec, _) = Service::new("svc").context(RunnerContext::new(1).route(route)).build().unwrap();
    let mut engine = Engine::new(&spec, EngineConfig::default());
    let now = Instant::from_unix_millis(0);
    engine.handle_start(now);
    drain(&mut engine);
    let mut requeues = 0;
    for tag in 0..100 {
        engine.handle_delivery(
            now,
            Delivery {
                link: LinkId::from_raw(0),
                tag: DeliveryTag::from_raw(tag),
                subscription: SubscriptionId::from_raw(0),
                redelivered: tag > 0,
                envelope: Envelope::raw("src.events", "evt", &b"{}"[..]),
            },
        );
        for a in drain(&mut engine) {
            if let Action::Publish(p) = a {
                engine.handle_publish_result(now, p.id, Err(PublishError::Other("406".into())));
            }
        }
        requeues +=
            drain(&mut engine).iter().filter(|a| matches!(a, Action::Reject { requeue: true, .. })).count();
    }
    assert!(requeues < 100, "requeued {requeues} times at the same instant");
}

// ------------------------------------------------------------------------------------------
// 5. memory link: a WebSocket RPC call never reaches a WsRpc route (the link ignores
//    Publish::transport and routes to nameko-rpc) -> UnknownService.
#[test]
fn simulator_routes_websocket_calls_to_ws_routes() {
    let server = Service::new("svc").context(RunnerContext::new(1).route(Route::blocking(
        WsRpcListener,
        "m",
        |Params(()): Params<()>| Reply(1),
    )));
    let mut sim = Simulator::new();
    sim.add_service(server).unwrap();
    let c = sim.add_service(Service::new("client")).unwrap();
    let call = sim.call_with(c, "svc", "m", json!([]), json!({}), None, Transport::WebSocket);
    sim.run_all();
    assert_eq!(sim.call_result(c, call), Some(&Ok(json!(1))));
}

// ------------------------------------------------------------------------------------------
// 6. Simulator::settle spins forever when a test consumes a queue by hand.
#[test]
fn settle_with_a_hand_made_consumer_terminates() {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let route = Route::blocking(EventListener::new("src", "evt"), "h", ok_event)
            .translator(|_| Err("cannot translate".into()));
        let mut sim = Simulator::new();
        sim.add_service(Service::new("svc").context(RunnerContext::new(1).route(route))).unwrap();
        sim.publish_event("src", "evt", &json!({}));
        // Inspect the DLQ by consuming it.
        sim.broker_mut().consume("microfw.dlq.evt-src-evt--svc.h", 1).unwrap();
        sim.settle();
        let _ = tx.send(());
    });
    assert!(rx.recv_timeout(Duration::from_secs(3)).is_ok(), "settle() never returns");
}

// ------------------------------------------------------------------------------------------
// 7. A reply for a pending call whose body is not a Reply (undecodable) is counted as an
//    "unknown" reply and the call hangs until its deadline.
#[test]
fn malformed_reply_for_a_known_call_resolves_it() {
    let (spec, _) = Service::new("c").build().unwrap();
    let mut engine = Engine::new(&spec, EngineConfig::default());
    let now = Instant::from_unix_millis(0);
    engine.handle_start(now);
    let call = engine.handle_call(
        now,
        microfw_core::OutgoingCall {
            context: None,
            service: "math".into(),
            method: "add".into(),
            args: vec![],
            kwargs: Default::default(),
            timeout: None,
            transport: Transport::Broker,
            dialect: microfw_core::Dialect::Nameko,
        },
    );
    let mut sub = None;
    let mut correlation = None;
    for a in drain(&mut engine) {
        match a {
            Action::Subscribe(s) => sub = Some(s.id),
            Action::Publish(p) => {
                correlation = p.envelope.properties.correlation_id.clone();
                engine.handle_publish_result(now, p.id, Ok(()));
            }
            _ => {}
        }
    }
    drain(&mut engine);
    engine.handle_delivery(
        now,
        Delivery {
            link: LinkId::from_raw(0),
            tag: DeliveryTag::from_raw(0),
            subscription: sub.unwrap(),
            redelivered: false,
            envelope: Envelope {
                exchange: String::new(),
                routing_key: engine.reply_to().to_owned(),
                headers: Default::default(),
                properties: Properties { correlation_id: correlation, ..Properties::default() },
                body: Body::Raw(bytes::Bytes::from_static(b"garbage")),
            },
        },
    );
    let actions = drain(&mut engine);
    assert!(
        actions.iter().any(|a| matches!(a, Action::Resolve { call: c, result: Err(_) } if *c == call)),
        "{actions:?}"
    );
    let _ = CallError::ShuttingDown;
}

// 1b. Stopped{unfinished} ignores deliveries waiting for their reply/retry/DLQ confirm; the
//     late confirm then acks after Stopped.
#[test]
fn unfinished_counts_deliveries_waiting_for_a_confirm() {
    let m = |Params(()): Params<()>| Reply(1);
    let (spec, _) = Service::new("svc")
        .context(RunnerContext::new(1).route(Route::blocking(RpcListener::new(), "m", m)))
        .build()
        .unwrap();
    let mut engine = Engine::new(
        &spec,
        EngineConfig { shutdown_timeout: Duration::from_secs(1), ..EngineConfig::default() },
    );
    let now = Instant::from_unix_millis(0);
    engine.handle_start(now);
    drain(&mut engine);
    let mut d = ws_request(SubscriptionId::from_raw(0), 1);
    d.envelope.routing_key = "svc.m".into();
    engine.handle_delivery(now, d);
    let dispatch = first_dispatch(drain(&mut engine));
    engine.handle_outcome(now, dispatch, Outcome::Success(Some(json!(1))));
    let reply = drain(&mut engine)
        .into_iter()
        .find_map(|a| if let Action::Publish(p) = a { Some(p.id) } else { None })
        .unwrap();
    engine.handle_shutdown(now);
    drain(&mut engine);
    engine.handle_timeout(now + Duration::from_secs(1));
    let actions = drain(&mut engine);
    assert!(
        actions.iter().any(|a| matches!(a, Action::Stopped { unfinished: 1 })),
        "the request is still unacked: {actions:?}"
    );
    engine.handle_publish_result(now, reply, Ok(()));
    let late = drain(&mut engine);
    assert!(late.is_empty(), "acted after Stopped: {late:?}");
}

// 8. Engine::new trusts ServiceSpec (public fields): a bad ContextId / callback index panics
//    on the first delivery instead of at construction.
#[test]
fn bad_service_spec_is_refused_not_a_panic_later() {
    let (mut spec, _) = Service::new("svc")
        .context(RunnerContext::new(1).route(Route::blocking(
            EventListener::new("src", "evt"),
            "h",
            ok_event,
        )))
        .build()
        .unwrap();
    spec.routes[0].1 = microfw_core::ContextId::from_raw(3);
    let refused = Engine::try_new(&spec, EngineConfig::default());
    assert!(matches!(refused, Err(microfw_core::BuildError::InconsistentSpec(_))), "{refused:?}");
}

// 9. The Retrying event reports the un-laddered delay; the broker retry waits the rung.
#[test]
fn retrying_event_reports_the_delay_actually_used() {
    let route = Route::blocking(EventListener::new("src", "evt"), "h", |Payload(_): Payload<Value>| {
        Err::<(), _>("busy")
    })
    .retry(RetryPolicy::fixed(1, Duration::from_millis(250)));
    let mut sim = Simulator::new();
    let node = sim.add_service(Service::new("svc").context(RunnerContext::new(1).route(route))).unwrap();
    sim.publish_event("src", "evt", &json!(1));
    sim.run_next();
    let records = sim.take_records(node);
    let event_delay = records.iter().find_map(|r| match r {
        Record::Event(microfw_core::EngineEvent::Retrying { delay, .. }) => Some(*delay),
        _ => None,
    });
    let publish_delay = records.iter().find_map(|r| match r {
        Record::Publish(microfw_core::Destination::Retry { delay, .. }) => Some(*delay),
        _ => None,
    });
    assert_eq!(event_delay, publish_delay);
}

// S1. Event consumers each get the whole context prefetch: held exceeds the context bound.

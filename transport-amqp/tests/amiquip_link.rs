//! The amiquip link against a real RabbitMQ, driven by real core Engines.
//!
//! Each test has its own vhost. A small driver loop ([`Node`]) owns an Engine and its link,
//! runs handlers inline (or holds them, to keep deliveries unsettled), and waits on the
//! links' wake-ups with timeouts. A raw amiquip connection ([`Raw`]) plays the peers.
#![cfg(feature = "sync")]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use amiquip::{
    AmqpProperties, AmqpValue, Channel, Confirm, Connection, ExchangeDeclareOptions, ExchangeType,
    FieldTable, QueueDeclareOptions, QueueDeleteOptions,
};
use microfw_core::config::{AmqpUri, Config};
use microfw_core::engine::ATTEMPT_HEADER;
use microfw_core::extract::{Attempt, Params, Payload, State};
use microfw_core::link::{Connect, Link, LinkInbox, LinkOp, LinkSpec, LinkWaker};
use microfw_core::retry::ladder_delay;
use microfw_core::{
    Action, CallError, CallId, Dialect, Dispatch, Engine, EngineConfig, EventListener, Instant, Outcome,
    OutgoingCall, OutgoingEvent, PublishError, PublishId, Reply, RetryPolicy, Route, RpcListener,
    RunnerContext, Service, Settle, Transport,
};
use microfw_tests::TestVhost;
use microfw_transport_amqp::{AmqpSyncConnector, dead_letter_queue_name, reply_queue_name, retry_queue_name};
use serde_json::{Map, Value, json};

const WAIT: Duration = Duration::from_secs(20);

/// One handler run: (handler, payload, retry count, when).
type Run = (&'static str, Value, u32, std::time::Instant);

/// What handlers saw.
#[derive(Clone, Default)]
struct Report(Arc<Mutex<Vec<Run>>>);

impl Report {
    fn push(&self, handler: &'static str, value: Value, retries: u32) {
        self.0.lock().unwrap().push((handler, value, retries, std::time::Instant::now()));
    }

    fn runs(&self, handler: &str) -> Vec<(Value, u32, std::time::Instant)> {
        let runs = self.0.lock().unwrap();
        runs.iter().filter(|r| r.0 == handler).map(|r| (r.1.clone(), r.2, r.3)).collect()
    }
}

fn on_evt(State(r): State<Report>, attempt: Attempt, Payload(v): Payload<Value>) {
    r.push("on_evt", v, attempt.retry_count);
}

fn flaky(State(r): State<Report>, attempt: Attempt, Payload(v): Payload<Value>) -> Result<(), String> {
    r.push("flaky", v, attempt.retry_count);
    if attempt.retry_count == 0 { Err("the first run fails".into()) } else { Ok(()) }
}

fn doomed(State(r): State<Report>, attempt: Attempt, Payload(v): Payload<Value>) -> Result<(), String> {
    r.push("doomed", v, attempt.retry_count);
    Err("always fails".into())
}

fn add(Params((a, b)): Params<(i64, i64)>) -> Reply<i64> {
    Reply(a + b)
}

fn mul(Params((a, b)): Params<(i64, i64)>) -> Reply<i64> {
    Reply(a * b)
}

fn now() -> Instant {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    Instant::from_unix_nanos(u64::try_from(since.as_nanos()).unwrap_or(u64::MAX))
}

/// Wake-ups of every node of a test, on one channel.
struct Wakes {
    tx: SyncSender<()>,
    rx: Receiver<()>,
}

impl Wakes {
    fn new() -> Self {
        let (tx, rx) = sync_channel(1);
        Wakes { tx, rx }
    }

    fn waker(&self) -> LinkWaker {
        let tx = self.tx.clone();
        LinkWaker::new(move || {
            let _ = tx.try_send(());
        })
    }
}

/// One service: an Engine, its amiquip link, and handlers run inline on the test thread.
struct Node {
    engine: Engine,
    table: microfw_core::HandlerTable<Report>,
    link: Box<dyn Link>,
    waker: LinkWaker,
    ops: Vec<LinkOp>,
    inbox: LinkInbox,
    /// Keep dispatches instead of running them (their deliveries stay unsettled).
    hold: bool,
    held: Vec<Dispatch>,
    dispatched: usize,
    redelivered: usize,
    resolved: HashMap<CallId, Result<Value, CallError>>,
    emitted: HashMap<PublishId, Result<(), PublishError>>,
    stopped: bool,
}

impl Node {
    fn start(service: Service<Report>, vhost: &TestVhost, wakes: &Wakes) -> Node {
        let (node, ready) = Node::try_start(service, vhost, wakes);
        ready.unwrap();
        node
    }

    /// Starts the node; the result is its link's barrier's.
    fn try_start(service: Service<Report>, vhost: &TestVhost, wakes: &Wakes) -> (Node, Result<(), String>) {
        static SEED: AtomicU64 = AtomicU64::new(1);
        let (spec, table) = service.build().unwrap();
        let seed = SEED.fetch_add(1, Ordering::Relaxed) ^ now().as_unix_nanos();
        let engine = Engine::new(&spec, EngineConfig { seed, ..EngineConfig::default() });
        let config = Config { amqp_uri: Some(AmqpUri::new(vhost.amqp_uri()).unwrap()), ..Config::default() };
        let link_spec = LinkSpec { service: spec.name.to_string(), transport: Transport::Broker, config };
        let waker = wakes.waker();
        let link = Box::new(AmqpSyncConnector::new()).connect(&link_spec, waker.clone()).unwrap();
        let mut node = Node {
            engine,
            table,
            link,
            waker,
            ops: Vec::new(),
            inbox: LinkInbox::default(),
            hold: false,
            held: Vec::new(),
            dispatched: 0,
            redelivered: 0,
            resolved: HashMap::new(),
            emitted: HashMap::new(),
            stopped: false,
        };
        node.engine.handle_start(now());
        node.pump();
        let ready = node.link.barrier().wait(WAIT);
        (node, ready)
    }

    /// A graceful stop: the Engine's shutdown (consumers cancelled), then the link's close.
    fn stop(mut self, wakes: &Wakes) {
        self.engine.handle_shutdown(now());
        drive(&mut [&mut self], wakes, "the stop", |n| n[0].stopped);
        self.link.close(Duration::from_secs(5));
    }

    /// Feeds the Engine and the link until neither has anything to do without waiting.
    fn pump(&mut self) -> bool {
        let mut any = false;
        loop {
            let mut progressed = false;
            if self.engine.poll_timeout().is_some_and(|t| t <= now()) {
                self.engine.handle_timeout(now());
                progressed = true;
            }
            let mut dispatches = Vec::new();
            while let Some(action) = self.engine.poll_action() {
                progressed = true;
                match action {
                    Action::Subscribe(s) => self.ops.push(LinkOp::Subscribe(s)),
                    Action::Unsubscribe { id, .. } => self.ops.push(LinkOp::Unsubscribe(id)),
                    Action::Publish(p) => self.ops.push(LinkOp::Publish(p)),
                    Action::Ack(d) => self.ops.push(LinkOp::Ack(d.tag)),
                    Action::Reject { delivery, requeue } => {
                        self.ops.push(LinkOp::Reject(delivery.tag, requeue))
                    }
                    Action::Dispatch(d) => dispatches.push(d),
                    Action::Resolve { call, result } => {
                        self.resolved.insert(call, result);
                    }
                    Action::Emitted { id, result } => {
                        self.emitted.insert(id, result);
                    }
                    Action::Stopped { .. } => self.stopped = true,
                    Action::Event(_) => {}
                }
            }
            for d in dispatches {
                self.dispatched += 1;
                if self.hold { self.held.push(d) } else { self.run(d) }
            }
            if self.waker.take() || !self.ops.is_empty() {
                self.link.exchange(now(), &mut self.ops, &mut self.inbox);
                for d in self.inbox.deliveries.drain(..) {
                    self.redelivered += usize::from(d.redelivered);
                    self.engine.handle_delivery(now(), d);
                    progressed = true;
                }
                for (id, result) in self.inbox.confirms.drain(..) {
                    self.engine.handle_publish_result(now(), id, result);
                    progressed = true;
                }
                if std::mem::take(&mut self.inbox.reply_queue_lost) {
                    self.engine.handle_reply_queue_lost(now(), Transport::Broker);
                    progressed = true;
                }
            }
            if !progressed {
                return any;
            }
            any = true;
        }
    }

    fn run(&mut self, d: Dispatch) {
        let state = self.table.state().clone();
        let outcome = self
            .table
            .handler(d.route)
            .and_then(|h| h.call_blocking(d.job, state))
            .unwrap_or_else(|| Outcome::Panicked("no blocking handler".into()));
        self.engine.handle_outcome(now(), d.id, outcome);
    }

    fn release(&mut self) {
        for d in std::mem::take(&mut self.held) {
            self.run(d);
        }
    }

    fn call(&mut self, service: &str, method: &str, args: Vec<Value>, dialect: Dialect) -> CallId {
        let call = OutgoingCall {
            context: None,
            service: service.into(),
            method: method.into(),
            args,
            kwargs: Map::new(),
            timeout: Some(Duration::from_secs(30)),
            transport: Transport::Broker,
            dialect,
        };
        self.engine.handle_call(now(), call)
    }

    fn emit(&mut self, event_type: &str, payload: Value) -> PublishId {
        let event = OutgoingEvent {
            context: None,
            source_service: self.engine.service().to_owned(),
            event_type: event_type.into(),
            payload: serde_json::to_vec(&payload).unwrap().into(),
            dialect: Dialect::Nameko,
        };
        self.engine.handle_emit(now(), event)
    }
}

/// Pumps every node until `done` holds, waiting on wake-ups and Engine deadlines; panics
/// after `WAIT`.
fn drive(nodes: &mut [&mut Node], wakes: &Wakes, what: &str, mut done: impl FnMut(&[&mut Node]) -> bool) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        while nodes.iter_mut().fold(false, |any, n| n.pump() | any) {}
        if done(nodes) {
            return;
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        assert!(!left.is_zero(), "timed out waiting for {what}");
        let next = nodes.iter().filter_map(|n| n.engine.poll_timeout()).min();
        let wait = next.map_or(left, |t| left.min(t.saturating_duration_since(now())));
        let _ = wakes.rx.recv_timeout(wait.max(Duration::from_millis(1)));
    }
}

/// A plain amiquip connection playing a peer.
struct Raw {
    conn: Connection,
    ch: Channel,
    confirms: crossbeam_channel::Receiver<Confirm>,
}

impl Raw {
    fn new(vhost: &TestVhost) -> Raw {
        let mut conn = Connection::insecure_open(&vhost.amqp_uri()).unwrap();
        let ch = conn.open_channel(None).unwrap();
        let confirms = ch.listen_for_publisher_confirms().unwrap();
        ch.enable_publisher_confirms().unwrap();
        Raw { conn, ch, confirms }
    }

    /// Publishes a persistent JSON message and waits for its confirm.
    fn publish(&self, exchange: &str, routing_key: &str, body: &Value) {
        let properties = AmqpProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_headers(FieldTable::new());
        let body = serde_json::to_vec(body).unwrap();
        let publish = amiquip::Publish::with_properties(&body, routing_key, properties);
        self.ch.basic_publish(exchange, publish).unwrap();
        match self.confirms.recv_timeout(WAIT) {
            Ok(Confirm::Ack(_)) => {}
            other => panic!("publish not confirmed: {other:?}"),
        }
    }

    /// Messages ready in `queue` (which must exist).
    fn ready(&mut self, queue: &str) -> u32 {
        let ch = self.conn.open_channel(None).unwrap();
        let count = ch.queue_declare_passive(queue).unwrap().declared_message_count().unwrap_or(0);
        let _ = ch.close();
        count
    }

    /// Polls until `queue` holds `n` ready messages (a broker-side state with no event to
    /// wait on), or panics after `WAIT`.
    fn wait_ready(&mut self, queue: &str, n: u32) {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let ready = self.ready(queue);
            if ready == n {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "{queue} holds {ready} messages, not {n}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn listener(name: &str, route: Route<Report>, report: &Report) -> Service<Report> {
    Service::with_state(name, report.clone()).context(RunnerContext::new(8).route(route))
}

#[test]
fn events_pass_the_filter_to_the_handler_and_everything_is_acked() {
    let vhost = TestVhost::create().unwrap();
    let wakes = Wakes::new();
    let report = Report::default();
    let route = Route::blocking(
        EventListener::new("src", "evt").filter(|v| v["keep"] == json!(true)),
        "on_evt",
        on_evt,
    );
    let mut svc = Node::start(listener("svc", route, &report), &vhost, &wakes);
    let mut src = Node::start(Service::with_state("src", report.clone()), &vhost, &wakes);
    let kept = src.emit("evt", json!({"keep": true, "n": 1}));
    let dropped = src.emit("evt", json!({"keep": false, "n": 2}));
    drive(&mut [&mut svc, &mut src], &wakes, "the events", |n| {
        n[1].emitted.len() == 2 && n[0].dispatched == 1 && n[0].engine.stats().running == 0
    });
    assert_eq!(src.emitted[&kept], Ok(()));
    assert_eq!(src.emitted[&dropped], Ok(()));
    let runs = report.runs("on_evt");
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].0, json!({"keep": true, "n": 1}));
    // Both deliveries were acked (the filtered one too): nothing is left in the queue.
    let mut raw = Raw::new(&vhost);
    raw.wait_ready("evt-src-evt--svc.on_evt", 0);
    // A graceful stop cancels the consumers (Unsubscribe) before the link closes.
    svc.stop(&wakes);
    src.stop(&wakes);
    let queues = vhost.queues().unwrap();
    assert!(queues.iter().all(|q| q.consumers == 0 && q.messages == 0), "{queues:?}");
}

#[test]
fn rpc_between_two_engines_in_both_dialects() {
    let vhost = TestVhost::create().unwrap();
    let wakes = Wakes::new();
    let report = Report::default();
    let server =
        Service::with_state("calc", report.clone()).context(
            RunnerContext::new(4)
                .route(Route::blocking(RpcListener::new(), "add", add))
                .route(Route::blocking(RpcListener::new().dialect(Dialect::MicroFramework), "mul", mul)),
        );
    let mut server = Node::start(server, &vhost, &wakes);
    let mut client = Node::start(Service::with_state("client", report.clone()), &vhost, &wakes);
    let nameko = client.call("calc", "add", vec![json!(2), json!(3)], Dialect::Nameko);
    let ufw = client.call("calc", "mul", vec![json!(4), json!(5)], Dialect::MicroFramework);
    let missing = client.call("calc", "nope", vec![], Dialect::Nameko);
    drive(&mut [&mut server, &mut client], &wakes, "the replies", |n| n[1].resolved.len() == 3);
    assert_eq!(client.resolved[&nameko], Ok(json!(5)));
    assert_eq!(client.resolved[&ufw], Ok(json!(20)));
    let Err(CallError::Remote(e)) = &client.resolved[&missing] else {
        panic!("{:?}", client.resolved[&missing])
    };
    assert_eq!(e.exc_type, "MethodNotFound");
}

#[test]
fn a_call_to_a_service_nobody_serves_fails_at_once() {
    let vhost = TestVhost::create().unwrap();
    let wakes = Wakes::new();
    let mut client = Node::start(Service::with_state("client", Report::default()), &vhost, &wakes);
    let started = std::time::Instant::now();
    let call = client.call("nobody", "m", vec![], Dialect::Nameko);
    drive(&mut [&mut client], &wakes, "the unroutable call", |n| !n[0].resolved.is_empty());
    assert!(
        matches!(client.resolved[&call], Err(CallError::UnknownService(_))),
        "{:?}",
        client.resolved[&call]
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?} (the call's timeout is 30 s)",
        started.elapsed()
    );
}

#[test]
fn a_failed_event_is_retried_through_a_real_waiting_queue() {
    let vhost = TestVhost::create().unwrap();
    let wakes = Wakes::new();
    let report = Report::default();
    let delay = Duration::from_millis(200);
    let route =
        Route::blocking(EventListener::new("src", "evt"), "flaky", flaky).retry(RetryPolicy::fixed(1, delay));
    let mut svc = Node::start(listener("svc", route, &report), &vhost, &wakes);
    let raw = Raw::new(&vhost);
    raw.publish("src.events", "evt", &json!({"n": 7}));
    drive(&mut [&mut svc], &wakes, "the retry", |n| n[0].dispatched == 2 && n[0].engine.stats().running == 0);
    let runs = report.runs("flaky");
    assert_eq!(
        runs.iter().map(|r| (r.0.clone(), r.1)).collect::<Vec<_>>(),
        [(json!({"n": 7}), 0), (json!({"n": 7}), 1)]
    );
    let waited = runs[1].2 - runs[0].2;
    assert!(waited >= delay - Duration::from_millis(20), "came back after {waited:?}");
    let mut raw = raw;
    let waiting = retry_queue_name("evt-src-evt--svc.flaky", ladder_delay(delay));
    raw.wait_ready(&waiting, 0);
    raw.wait_ready("evt-src-evt--svc.flaky", 0);
}

#[test]
fn the_last_failure_goes_to_the_dead_letter_queue() {
    let vhost = TestVhost::create().unwrap();
    let wakes = Wakes::new();
    let report = Report::default();
    let route = Route::blocking(EventListener::new("src", "evt"), "doomed", doomed)
        .retry(RetryPolicy::fixed(1, Duration::from_millis(100)))
        .on_give_up(Settle::DeadLetter);
    let mut svc = Node::start(listener("svc", route, &report), &vhost, &wakes);
    let mut raw = Raw::new(&vhost);
    raw.publish("src.events", "evt", &json!({"n": 9}));
    drive(&mut [&mut svc], &wakes, "both runs", |n| {
        n[0].dispatched == 2
            && n[0].engine.stats().running == 0
            && n[0].engine.stats().unconfirmed_publishes == 0
    });
    let dlq = dead_letter_queue_name("evt-src-evt--svc.doomed");
    raw.wait_ready(&dlq, 1);
    raw.wait_ready("evt-src-evt--svc.doomed", 0);
    let got = raw.ch.basic_get(dlq.as_str(), true).unwrap().unwrap();
    assert_eq!(serde_json::from_slice::<Value>(&got.delivery.body).unwrap(), json!({"n": 9}));
    let headers = got.delivery.properties.headers().clone().unwrap_or_default();
    assert!(
        matches!(headers.get(ATTEMPT_HEADER), Some(AmqpValue::LongInt(1) | AmqpValue::LongLongInt(1))),
        "{headers:?}"
    );
}

#[test]
fn an_events_exchange_declared_auto_delete_by_a_peer_is_adopted() {
    let vhost = TestVhost::create().unwrap();
    let wakes = Wakes::new();
    let report = Report::default();
    let raw = Raw::new(&vhost);
    let options =
        ExchangeDeclareOptions { durable: true, auto_delete: true, ..ExchangeDeclareOptions::default() };
    raw.ch.exchange_declare(ExchangeType::Topic, "src.events", options).unwrap();
    // Our default (AUTO_DELETE_EVENT_EXCHANGES false) differs: 406, then adopted.
    let route = Route::blocking(EventListener::new("src", "evt"), "on_evt", on_evt);
    let mut svc = Node::start(listener("svc", route, &report), &vhost, &wakes);
    raw.publish("src.events", "evt", &json!({"adopted": true}));
    drive(&mut [&mut svc], &wakes, "the event", |n| n[0].dispatched == 1);
    assert_eq!(report.runs("on_evt")[0].0, json!({"adopted": true}));
}

#[test]
fn closing_returns_unsettled_deliveries_to_the_broker() {
    let vhost = TestVhost::create().unwrap();
    let wakes = Wakes::new();
    let report = Report::default();
    let route = Route::blocking(EventListener::new("src", "evt"), "on_evt", on_evt);
    let mut svc = Node::start(listener("svc", route, &report), &vhost, &wakes);
    svc.hold = true;
    let mut raw = Raw::new(&vhost);
    for n in 0..3 {
        raw.publish("src.events", "evt", &json!({"n": n}));
    }
    drive(&mut [&mut svc], &wakes, "three held deliveries", |n| n[0].held.len() == 3);
    assert_eq!(raw.ready("evt-src-evt--svc.on_evt"), 0, "all three are out with the link");
    svc.link.close(Duration::from_secs(5));
    raw.wait_ready("evt-src-evt--svc.on_evt", 3);
}

#[test]
fn reconnects_after_the_broker_closes_the_connection_and_loses_nothing() {
    let vhost = TestVhost::create().unwrap();
    let wakes = Wakes::new();
    let report = Report::default();
    let route = Route::blocking(EventListener::new("svc", "evt"), "on_evt", on_evt);
    let mut svc = Node::start(listener("svc", route, &report), &vhost, &wakes);
    svc.hold = true;
    let raw = Raw::new(&vhost);
    for n in 0..5 {
        raw.publish("svc.events", "evt", &json!({"n": n}));
    }
    drive(&mut [&mut svc], &wakes, "five held deliveries", |n| n[0].held.len() == 5);

    close_all_connections(&vhost);
    // Published while the link is down or reconnecting: it waits (or fails, never vanishes).
    let during = svc.emit("evt", json!({"n": 5}));
    // The broker redelivers the five unsettled ones on the new connection.
    drive(&mut [&mut svc], &wakes, "the redeliveries", |n| {
        n[0].redelivered >= 5 && n[0].emitted.contains_key(&during)
    });
    // Settling the deliveries from before the loss is a no-op (no channel error), and the
    // redelivered copies are handled.
    svc.hold = false;
    svc.release();
    let raw = Raw::new(&vhost);
    for n in 6..8 {
        raw.publish("svc.events", "evt", &json!({"n": n}));
    }
    let expected: Vec<i64> =
        if svc.emitted[&during].is_ok() { (0..8).collect() } else { [0, 1, 2, 3, 4, 6, 7].into() };
    drive(&mut [&mut svc], &wakes, "every event", |_| {
        let mut seen: Vec<i64> = report.runs("on_evt").iter().filter_map(|r| r.0["n"].as_i64()).collect();
        seen.sort_unstable();
        seen.dedup();
        seen == expected
    });
    let mut raw = raw;
    raw.wait_ready("evt-svc-evt--svc.on_evt", 0);
}

#[test]
fn losing_the_reply_queue_fails_the_waiting_calls_and_later_calls_work() {
    let vhost = TestVhost::create().unwrap();
    let wakes = Wakes::new();
    let report = Report::default();
    let server = Service::with_state("calc", report.clone())
        .context(RunnerContext::new(4).route(Route::blocking(RpcListener::new(), "add", add)));
    let mut server = Node::start(server, &vhost, &wakes);
    server.hold = true;
    let mut client = Node::start(Service::with_state("client", report), &vhost, &wakes);
    let first = client.call("calc", "add", vec![json!(1), json!(1)], Dialect::Nameko);
    drive(&mut [&mut server, &mut client], &wakes, "the held request", |n| n[0].held.len() == 1);

    let raw = Raw::new(&vhost);
    let queue = reply_queue_name("client", client.engine.reply_to());
    raw.ch.queue_delete(queue.as_str(), QueueDeleteOptions::default()).unwrap();
    drive(&mut [&mut server, &mut client], &wakes, "the failed call", |n| !n[1].resolved.is_empty());
    assert_eq!(client.resolved[&first], Err(CallError::ReplyQueueLost));

    // The queue is declared again: the late reply is dropped, a new call gets its own.
    server.hold = false;
    server.release();
    let second = client.call("calc", "add", vec![json!(2), json!(2)], Dialect::Nameko);
    drive(&mut [&mut server, &mut client], &wakes, "the second call", |n| n[1].resolved.len() == 2);
    assert_eq!(client.resolved[&second], Ok(json!(4)));
}

#[test]
fn a_queue_a_peer_declared_differently_fails_the_barrier() {
    let vhost = TestVhost::create().unwrap();
    let wakes = Wakes::new();
    let raw = Raw::new(&vhost);
    let mut arguments = FieldTable::new();
    arguments.insert("x-message-ttl".into(), AmqpValue::LongInt(1000));
    let options = QueueDeclareOptions { durable: true, arguments, ..QueueDeclareOptions::default() };
    raw.ch.queue_declare("rpc-calc", options).unwrap();
    let server = Service::with_state("calc", Report::default())
        .context(RunnerContext::new(4).route(Route::blocking(RpcListener::new(), "add", add)));
    let (mut server, ready) = Node::try_start(server, &vhost, &wakes);
    let error = ready.unwrap_err();
    assert!(error.contains("rpc-calc") && error.contains("PRECONDITION_FAILED"), "{error}");
    // The link itself is fine: a later barrier opens.
    server.link.barrier().wait(WAIT).unwrap();
}

#[test]
fn a_deleted_events_exchange_costs_one_publish_not_the_connection() {
    let vhost = TestVhost::create().unwrap();
    let wakes = Wakes::new();
    let mut src = Node::start(Service::with_state("src", Report::default()), &vhost, &wakes);
    let first = src.emit("evt", json!({"n": 1}));
    drive(&mut [&mut src], &wakes, "the first event", |n| n[0].emitted.contains_key(&first));
    assert_eq!(src.emitted[&first], Ok(()));
    let raw = Raw::new(&vhost);
    let ports = connection_ports(&vhost);
    raw.ch.exchange_delete("src.events", false).unwrap();

    // Published to the missing exchange: the broker closes the publish channel (404).
    let second = src.emit("evt", json!({"n": 2}));
    drive(&mut [&mut src], &wakes, "the second event", |n| n[0].emitted.contains_key(&second));
    assert!(matches!(src.emitted[&second], Err(PublishError::LinkDown(_))), "{:?}", src.emitted[&second]);
    // The next publish declares the exchange again, on a new channel of the same connection.
    let third = src.emit("evt", json!({"n": 3}));
    drive(&mut [&mut src], &wakes, "the third event", |n| n[0].emitted.contains_key(&third));
    assert_eq!(src.emitted[&third], Ok(()));
    raw.ch.exchange_declare_passive("src.events").unwrap();
    assert_eq!(connection_ports(&vhost), ports, "no reconnect");
}

/// The client ports of the vhost's connections (a reconnect gets a new one).
/// `list_connections` lists every vhost's: the vhost column filters them.
fn connection_ports(vhost: &TestVhost) -> Vec<String> {
    let ctl = std::env::var("RABBITMQCTL").unwrap_or_else(|_| "rabbitmqctl".to_owned());
    let out = std::process::Command::new(ctl)
        .args(["list_connections", "-q", "--no-table-headers", "vhost", "peer_port"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let mut ports: Vec<String> = text
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .filter(|(v, _)| *v == vhost.name())
        .map(|(_, port)| port.trim().to_owned())
        .collect();
    ports.sort();
    assert_eq!(ports.len(), 2, "the node's and the raw connection: {text}");
    ports
}

/// `rabbitmqctl close_all_connections` for the test's vhost (RabbitMQ 3.10 syntax).
fn close_all_connections(vhost: &TestVhost) {
    let ctl = std::env::var("RABBITMQCTL").unwrap_or_else(|_| "rabbitmqctl".to_owned());
    let out = std::process::Command::new(ctl)
        .args(["close_all_connections", "--vhost", vhost.name(), "--limit", "100", "test"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

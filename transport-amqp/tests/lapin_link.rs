//! The lapin link against the real RabbitMQ, driven by real core Engines (see
//! `lapin_support`): events, RPC in both dialects, unknown services, delayed retries, dead
//! letters, adopting a peer's exchange, closing. Each test has a vhost of its own.
#![cfg(feature = "tokio")]

mod lapin_support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use lapin_support::{Node, WAIT, connector, rabbitmqctl, wait_queue};
use microfw_core::extract::JobInput;
use microfw_core::{
    CallError, Dialect, EngineEvent, EventListener, HandlerError, Outcome, OutgoingCall, RetryPolicy, Route,
    RpcListener, RunnerContext, Service, Settle, Transport,
};
use microfw_tests::TestVhost;
use serde_json::{Map, Value, json};
use tokio::sync::Notify;

fn h() {}

fn call(service: &str, method: &str, args: Vec<Value>, dialect: Dialect, timeout: Duration) -> OutgoingCall {
    OutgoingCall {
        context: None,
        service: service.into(),
        method: method.into(),
        args,
        kwargs: Map::new(),
        timeout: Some(timeout),
        transport: Transport::Broker,
        dialect,
    }
}

fn boom() -> HandlerError {
    HandlerError::retryable("ValueError", "boom").in_module("builtins")
}

fn listener(routes: impl FnOnce(RunnerContext<()>) -> RunnerContext<()>) -> Service<()> {
    Service::new("svc").context(routes(RunnerContext::new(8)))
}

const QUEUE: &str = "evt-src-evt--svc.on_evt";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_with_a_payload_filter_reach_the_handler() {
    let vhost = TestVhost::create().unwrap();
    let service = listener(|c| {
        c.route(Route::blocking(
            EventListener::new("src", "evt").filter(|v| v["keep"] == json!(true)),
            "on_evt",
            h,
        ))
    });
    let mut svc =
        Node::start(service, &vhost, connector()).await.with_handler(|_, _| Some(Outcome::Success(None)));
    let mut src = Node::start(Service::new("src"), &vhost, connector()).await;

    src.emit("src", "evt", &json!({"keep": false, "n": 1}));
    src.emit("src", "evt", &json!({"keep": true, "n": 2}));
    src.run_until("both events confirmed", WAIT, |n| n.emitted.len() == 2).await;
    assert!(src.emitted.iter().all(|(_, r)| r.is_ok()), "{:?}", src.emitted);

    svc.run_until("one run and one filtered event", WAIT, |n| {
        !n.runs.is_empty() && n.events.iter().any(|e| matches!(e, EngineEvent::Filtered { .. }))
    })
    .await;
    assert_eq!(svc.runs, [("on_evt".to_owned(), 0, json!({"keep": true, "n": 2}))]);
    // Both were acked (the filtered one without a run).
    wait_queue(&vhost, QUEUE, "empty with its consumer", |q| q.messages == 0 && q.consumers == 1).await;
    svc.stop().await;
    src.stop().await;
}

/// An Engine calling another through the broker, in both dialects, the server serving both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_round_trips_in_both_dialects() {
    let vhost = TestVhost::create().unwrap();
    let server =
        Service::new("calc").context(
            RunnerContext::new(4)
                .route(Route::blocking(RpcListener::new(), "add", h))
                .route(Route::blocking(RpcListener::new().dialect(Dialect::MicroFramework), "mul", h)),
        );
    let server = Node::start(server, &vhost, connector()).await.with_handler(|name, d| {
        let JobInput::Rpc { args, .. } = &d.job.input else { return Some(Outcome::Success(None)) };
        let nums: Vec<i64> = args.iter().filter_map(Value::as_i64).collect();
        let result = match name {
            "add" => nums.iter().sum::<i64>(),
            _ => nums.iter().product::<i64>(),
        };
        Some(Outcome::Success(Some(json!(result))))
    });
    let stop = Arc::new(Notify::new());
    let serving = server.serve(stop.clone());

    let mut client = Node::start(Service::new("client"), &vhost, connector()).await;
    let add = client.call(call("calc", "add", vec![json!(1), json!(2)], Dialect::Nameko, WAIT));
    let mul = client.call(call("calc", "mul", vec![json!(3), json!(4)], Dialect::MicroFramework, WAIT));
    client.run_until("both replies", WAIT, |n| n.resolved.len() == 2).await;
    assert_eq!(client.resolution(add), Some(&Ok(json!(3))));
    assert_eq!(client.resolution(mul), Some(&Ok(json!(12))));

    stop.notify_one();
    let mut server = serving.await.unwrap();
    server.stop().await;
    client.stop().await;
}

/// Also proves the link works on a current-thread runtime.
#[tokio::test(flavor = "current_thread")]
async fn a_call_to_an_unknown_service_fails_at_once() {
    let vhost = TestVhost::create().unwrap();
    let mut client = Node::start(Service::new("client"), &vhost, connector()).await;
    let started = std::time::Instant::now();
    let id = client.call(call("nobody", "m", vec![], Dialect::Nameko, Duration::from_secs(60)));
    client.run_until("the call resolved", WAIT, |n| n.resolution(id).is_some()).await;
    assert!(
        matches!(client.resolution(id), Some(Err(CallError::UnknownService(s))) if s == "nobody"),
        "{:?}",
        client.resolved
    );
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    client.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_event_is_retried_through_a_waiting_queue_then_succeeds() {
    let vhost = TestVhost::create().unwrap();
    let delay = Duration::from_millis(300);
    let service = listener(|c| {
        c.route(
            Route::blocking(EventListener::new("src", "evt"), "on_evt", h)
                .retry(RetryPolicy::fixed(2, delay)),
        )
    });
    let times = Arc::new(Mutex::new(Vec::new()));
    let seen = times.clone();
    let mut svc = Node::start(service, &vhost, connector()).await.with_handler(move |_, d| {
        seen.lock().unwrap().push(std::time::Instant::now());
        Some(if d.job.parts.attempt.retry_count == 0 {
            Outcome::Failed(boom())
        } else {
            Outcome::Success(None)
        })
    });
    let mut src = Node::start(Service::new("src"), &vhost, connector()).await;
    src.emit("src", "evt", &json!({"n": 1}));
    src.run_until("the event confirmed", WAIT, |n| !n.emitted.is_empty()).await;

    svc.run_until("two runs", WAIT, |n| n.runs.len() == 2).await;
    assert_eq!(svc.runs[0], ("on_evt".to_owned(), 0, json!({"n": 1})));
    assert_eq!(svc.runs[1], ("on_evt".to_owned(), 1, json!({"n": 1})));
    let times = times.lock().unwrap().clone();
    assert!(times[1] - times[0] >= delay, "retried after {:?}", times[1] - times[0]);

    let queues = tokio::task::block_in_place(|| vhost.queues()).unwrap();
    let prefix = format!("microfw.retry.{QUEUE}.");
    assert!(queues.iter().any(|q| q.name.starts_with(&prefix) && q.messages == 0), "{queues:?}");
    wait_queue(&vhost, QUEUE, "empty", |q| q.messages == 0).await;
    svc.stop().await;
    src.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_is_dead_lettered_after_its_last_retry() {
    let vhost = TestVhost::create().unwrap();
    let service = listener(|c| {
        c.route(
            Route::blocking(EventListener::new("src", "evt"), "on_evt", h)
                .retry(RetryPolicy::fixed(1, Duration::from_millis(200)))
                .on_give_up(Settle::DeadLetter),
        )
    });
    let mut svc =
        Node::start(service, &vhost, connector()).await.with_handler(|_, _| Some(Outcome::Failed(boom())));
    let mut src = Node::start(Service::new("src"), &vhost, connector()).await;
    src.emit("src", "evt", &json!({"n": 7}));
    src.run_until("the event confirmed", WAIT, |n| !n.emitted.is_empty()).await;

    svc.run_until("dead-lettered and settled", WAIT, |n| {
        n.events.iter().any(|e| matches!(e, EngineEvent::DeadLettered { .. }))
            && n.engine.stats().unconfirmed_publishes == 0
    })
    .await;
    assert_eq!(svc.runs.len(), 2, "{:?}", svc.runs);
    let dlq = format!("microfw.dlq.{QUEUE}");
    wait_queue(&vhost, &dlq, "one dead letter", |q| q.messages == 1).await;
    wait_queue(&vhost, QUEUE, "empty", |q| q.messages == 0).await;
    svc.stop().await;
    src.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_events_exchange_a_peer_declared_auto_delete_is_adopted() {
    let vhost = TestVhost::create().unwrap();
    // A Nameko peer with AUTO_DELETE_EVENT_EXCHANGES on declared it first.
    let peer =
        tokio::time::timeout(WAIT, Connection::connect(&vhost.amqp_uri(), ConnectionProperties::default()))
            .await
            .unwrap()
            .unwrap();
    let channel = peer.create_channel().await.unwrap();
    let options =
        ExchangeDeclareOptions { durable: true, auto_delete: true, ..ExchangeDeclareOptions::default() };
    channel
        .exchange_declare("src.events".into(), ExchangeKind::Topic, options, FieldTable::default())
        .await
        .unwrap();

    let service = listener(|c| c.route(Route::blocking(EventListener::new("src", "evt"), "on_evt", h)));
    let mut svc = Node::try_start(service, &vhost, connector())
        .await
        .expect("subscribing adopts the exchange")
        .with_handler(|_, _| Some(Outcome::Success(None)));
    let mut src = Node::start(Service::new("src"), &vhost, connector()).await;
    src.emit("src", "evt", &json!({"n": 1}));
    src.run_until("the event confirmed", WAIT, |n| !n.emitted.is_empty()).await;
    assert!(src.emitted[0].1.is_ok(), "{:?}", src.emitted);
    svc.run_until("the event handled", WAIT, |n| n.runs.len() == 1).await;
    svc.stop().await;
    src.stop().await;
    let _ = peer.close(200, "OK".into()).await;
}

/// An adopted auto-delete exchange that the broker deleted (its last binding went) is declared
/// again with our own flags, not looked up passively forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopted_exchange_that_was_deleted_is_declared_again() {
    let vhost = TestVhost::create().unwrap();
    let peer =
        tokio::time::timeout(WAIT, Connection::connect(&vhost.amqp_uri(), ConnectionProperties::default()))
            .await
            .unwrap()
            .unwrap();
    let channel = peer.create_channel().await.unwrap();
    let options =
        ExchangeDeclareOptions { durable: true, auto_delete: true, ..ExchangeDeclareOptions::default() };
    channel
        .exchange_declare("src.events".into(), ExchangeKind::Topic, options, FieldTable::default())
        .await
        .unwrap();
    channel
        .queue_declare("peer-q".into(), QueueDeclareOptions::default(), FieldTable::default())
        .await
        .unwrap();
    channel
        .queue_bind(
            "peer-q".into(),
            "src.events".into(),
            "evt".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    let mut src = Node::start(Service::new("src"), &vhost, connector()).await;
    let first = src.emit("src", "evt", &json!({"n": 1}));
    src.run_until("the adopting publish confirmed", WAIT, |n| n.emitted_ok(first).is_some()).await;
    assert_eq!(src.emitted_ok(first), Some(true), "{:?}", src.emitted);

    // The peer's queue goes, with it the last binding, with that the auto-delete exchange.
    channel.queue_delete("peer-q".into(), QueueDeleteOptions::default()).await.unwrap();
    let gone = tokio::task::block_in_place(|| vhost.exchange("src.events")).unwrap();
    assert_eq!(gone, None);

    // The next publish still goes to the exchange the link remembers and fails (publishes are
    // not retried); the one after declares it again.
    let second = src.emit("src", "evt", &json!({"n": 2}));
    src.run_until("the second publish settled", WAIT, |n| n.emitted_ok(second).is_some()).await;
    let third = src.emit("src", "evt", &json!({"n": 3}));
    src.run_until("the third publish settled", WAIT, |n| n.emitted_ok(third).is_some()).await;
    assert_eq!(src.emitted_ok(third), Some(true), "{:?}", src.emitted);
    let again = tokio::task::block_in_place(|| vhost.exchange("src.events")).unwrap();
    assert_eq!(again.map(|e| (e.durable, e.auto_delete)), Some((true, false)), "declared with our flags");
    src.stop().await;
    let _ = peer.close(200, "OK".into()).await;
}

/// Closing flushes the acks handed over, and gives every unsettled delivery back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_flushes_acks_and_returns_unacked_deliveries() {
    let vhost = TestVhost::create().unwrap();
    let service = || listener(|c| c.route(Route::blocking(EventListener::new("src", "evt"), "on_evt", h)));
    let mut svc = Node::start(service(), &vhost, connector()).await;
    let mut src = Node::start(Service::new("src"), &vhost, connector()).await;
    for n in 0..3 {
        src.emit("src", "evt", &json!({"n": n}));
    }
    src.run_until("three events confirmed", WAIT, |n| n.emitted.len() == 3).await;
    svc.run_until("three runs", WAIT, |n| n.dispatches.len() == 3).await;

    // One finishes; its ack is handed over and the link closed at once.
    let done = svc.dispatches.pop_front().unwrap();
    svc.engine.handle_outcome(lapin_support::now(), done.id, Outcome::Success(None));
    svc.pump();
    svc.close_links(Duration::from_secs(5)).await;
    wait_queue(&vhost, QUEUE, "two messages, no consumer", |q| q.messages == 2 && q.consumers == 0).await;

    // The other two are delivered again, to a new consumer.
    let mut again =
        Node::start(service(), &vhost, connector()).await.with_handler(|_, _| Some(Outcome::Success(None)));
    again.run_until("two redelivered runs", WAIT, |n| n.runs.len() == 2).await;
    let ns: Vec<i64> = again.runs.iter().filter_map(|r| r.2["n"].as_i64()).collect();
    assert_eq!(ns.len(), 2);
    assert!(!ns.contains(&input_n(&done.job.input)), "the acked event came back: {ns:?}");
    again.stop().await;
    src.stop().await;
}

fn input_n(input: &JobInput) -> i64 {
    lapin_support::input_json(input)["n"].as_i64().unwrap_or(-1)
}

/// A reply queue deleted under a pending call: the call fails with ReplyQueueLost instead of
/// waiting for its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_reply_queue_fails_pending_calls() {
    let vhost = TestVhost::create().unwrap();
    let server = Service::new("slow").context(RunnerContext::new(2).route(Route::blocking(
        RpcListener::new(),
        "wait",
        h,
    )));
    // Never answers.
    let server = Node::start(server, &vhost, connector()).await;
    let stop = Arc::new(Notify::new());
    let serving = server.serve(stop.clone());

    let mut client = Node::start(Service::new("client"), &vhost, connector()).await;
    let id = client.call(call("slow", "wait", vec![], Dialect::Nameko, Duration::from_secs(60)));
    wait_queue(&vhost, "rpc-slow", "the request taken", |q| q.messages == 1 && q.consumers == 1).await;
    let reply_queue = format!("rpc.reply-client-{}", client.engine.reply_to());
    rabbitmqctl(&["delete_queue", "-p", vhost.name(), &reply_queue]).await;
    client.run_until("the call failed", WAIT, |n| n.resolution(id).is_some()).await;
    assert_eq!(client.resolution(id), Some(&Err(CallError::ReplyQueueLost)));
    // The reply queue is back for new calls.
    wait_queue(&vhost, &reply_queue, "declared again", |q| q.consumers == 1).await;

    stop.notify_one();
    let mut server = serving.await.unwrap();
    server.close_links(Duration::from_secs(5)).await;
    client.stop().await;
}

/// A queue that exists with other arguments cannot be consumed as ours: the barrier says so
/// (the runner's start fails) instead of the service starting deaf.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_the_broker_refuses_fails_the_barrier() {
    let vhost = TestVhost::create().unwrap();
    let peer =
        tokio::time::timeout(WAIT, Connection::connect(&vhost.amqp_uri(), ConnectionProperties::default()))
            .await
            .unwrap()
            .unwrap();
    let channel = peer.create_channel().await.unwrap();
    let mut arguments = FieldTable::default();
    arguments.insert("x-max-length".into(), lapin::types::AMQPValue::LongInt(10));
    let durable = lapin::options::QueueDeclareOptions { durable: true, ..Default::default() };
    channel.queue_declare("rpc-svc".into(), durable, arguments).await.unwrap();

    let service = listener(|c| c.route(Route::blocking(RpcListener::new(), "m", h)));
    let error = Node::try_start(service, &vhost, connector()).await.err().expect("the barrier fails");
    assert!(error.contains("rpc-svc") && error.contains("PRECONDITION_FAILED"), "{error}");
    let _ = peer.close(200, "OK".into()).await;
}

/// A refused login is a `LinkError::Connect` naming the URI without its password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_a_connect_error_without_the_password() {
    use microfw_core::config::{AmqpUri, Config};
    use microfw_core::link::{ConnectAsync, LinkError, LinkSpec, LinkWaker};
    let uri = format!("amqp://guest:not-the-password@{}/%2f", microfw_tests::AMQP_AUTHORITY);
    let config = Config { amqp_uri: Some(AmqpUri::new(uri).unwrap()), ..Config::default() };
    let spec = LinkSpec { service: "svc".into(), transport: Transport::Broker, config };
    let result =
        tokio::time::timeout(WAIT, Box::new(connector()).connect(spec, LinkWaker::noop())).await.unwrap();
    let Err(LinkError::Connect { transport, reason }) = result else {
        panic!("connected with a wrong password")
    };
    let text = format!("{transport} {reason}");
    assert!(reason.contains("ACCESS_REFUSED"), "{reason}");
    assert!(!text.contains("not-the-password"), "{text}");
    assert!(transport.starts_with("amqp://guest:") && transport.contains("127.0.0.1"), "{transport}");
}

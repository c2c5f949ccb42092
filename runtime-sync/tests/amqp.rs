//! The threaded runtime on a real RabbitMQ (127.0.0.1:5672): Runners whose config names an
//! `AMQP_URI` talk through the amiquip link. Each test has its own vhost, deleted afterwards.
#![cfg(feature = "amqp")]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use microfw_core::config::AmqpUri;
use microfw_runtime_sync::extract::{Failure, Params, Payload, State};
use microfw_runtime_sync::{
    CallError, CallbackRoute, Config, Dialect, EventListener, HandlerError, Producer, Reply, RetryPolicy,
    Route, RpcError, RpcListener, Runner, RunnerContext, RunningService, TargetDetail,
};
use microfw_tests::TestVhost;
use serde::Deserialize;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);

fn config(vhost: &TestVhost, name: &str) -> Config {
    Config {
        service_name: Some(name.into()),
        shutdown_timeout: Duration::from_secs(5),
        amqp_uri: Some(AmqpUri::new(vhost.amqp_uri()).unwrap()),
        ..Config::default()
    }
}

fn client(vhost: &TestVhost, name: &str) -> RunningService {
    Runner::new(config(vhost, name)).start().unwrap()
}

fn stop_all(services: impl IntoIterator<Item = RunningService>) {
    for s in services {
        assert_eq!(s.stop().unwrap().unfinished, 0);
    }
}

#[derive(Clone)]
struct Report(Arc<Mutex<Sender<Value>>>);

impl Report {
    fn new() -> (Report, Receiver<Value>) {
        let (tx, rx) = mpsc::channel();
        (Report(Arc::new(Mutex::new(tx))), rx)
    }

    fn send(&self, v: Value) {
        let _ = self.0.lock().unwrap().send(v);
    }
}

fn relay(producer: Producer, Payload(v): Payload<Value>) -> Result<(), String> {
    producer.dispatch("pong", &json!({"relayed": v})).map_err(|e| e.to_string())
}

fn sink(State(report): State<Report>, Payload(v): Payload<Value>) {
    report.send(v);
}

#[test]
fn events_flow_through_rabbitmq_with_a_filter() {
    let vhost = TestVhost::create().unwrap();
    let (report, rx) = Report::new();
    let relay = Runner::new(config(&vhost, "relay"))
        .context(RunnerContext::new(2).route(Route::blocking(
            EventListener::new("src", "ping"),
            "relay",
            relay,
        )))
        .start()
        .unwrap();
    let only_big = EventListener::new("relay", "pong")
        .filter(|v: &Value| v["relayed"].as_i64().is_some_and(|n| n >= 10));
    let listener = Runner::with_state(config(&vhost, "listener"), report)
        .context(RunnerContext::new(2).route(Route::blocking(only_big, "sink", sink)))
        .start()
        .unwrap();
    let src = client(&vhost, "src");
    for n in [1, 10, 2, 20] {
        src.producer().dispatch("ping", &json!(n)).unwrap();
    }
    let mut got = vec![rx.recv_timeout(WAIT).unwrap(), rx.recv_timeout(WAIT).unwrap()];
    got.sort_by_key(|v| v["relayed"].as_i64());
    assert_eq!(got, vec![json!({"relayed": 10}), json!({"relayed": 20})]);
    stop_all([src, relay, listener]);
    assert!(rx.try_recv().is_err(), "the filter let a small number through");
}

#[derive(Deserialize)]
struct AddArgs {
    a: i64,
    b: i64,
}

fn add(Params(AddArgs { a, b }): Params<AddArgs>) -> Reply<i64> {
    Reply(a + b)
}

fn fail() -> Result<(), HandlerError> {
    Err(HandlerError::fatal("ValueError", "no good"))
}

fn slow() -> Reply<&'static str> {
    std::thread::sleep(Duration::from_millis(500));
    Reply("late")
}

#[test]
fn rpc_through_rabbitmq_in_both_dialects_with_errors_timeouts_and_unknown_services() {
    let vhost = TestVhost::create().unwrap();
    let mf = || RpcListener::new().dialect(Dialect::MicroFramework);
    let calc = Runner::new(config(&vhost, "calc"))
        .context(
            RunnerContext::new(4)
                .route(Route::blocking(RpcListener::new(), "add", add))
                .route(Route::blocking(RpcListener::new(), "fail", fail))
                .route(Route::blocking(RpcListener::new(), "slow", slow))
                .route(Route::blocking(mf(), "mf_add", add).doc("Adds, micro_framework style.")),
        )
        .start()
        .unwrap();
    let caller = client(&vhost, "caller");
    let rpc = caller.rpc();

    assert_eq!(rpc.call("calc", "add", (1, 2), ()), Ok(json!(3)));
    assert_eq!(rpc.call("calc", "add", (10,), json!({"b": 5})), Ok(json!(15)));
    let pending: Vec<_> = (0..16).map(|i| rpc.call_async("calc", "add", (i, i), ()).unwrap()).collect();
    for (i, call) in pending.into_iter().enumerate() {
        assert_eq!(call.wait(), Ok(json!(2 * i)));
    }
    let mf_rpc = rpc.clone().dialect(Dialect::MicroFramework);
    assert_eq!(mf_rpc.call("calc", "mf_add", (20, 22), ()), Ok(json!(42)));
    let detail =
        TargetDetail::new("mf_add", ["a", "b"], [""; 0], Some("Adds, micro_framework style.".into()));
    assert_eq!(rpc.targets("calc"), Ok(vec![detail]));

    match rpc.call("calc", "fail", (), ()) {
        Err(RpcError::Call(CallError::Remote(e))) => {
            assert_eq!((e.exc_type.as_str(), e.message.as_str()), ("ValueError", "no good"));
        }
        other => panic!("expected a remote error, got {other:?}"),
    }
    let short = rpc.clone().with_timeout(Duration::from_millis(100));
    assert_eq!(
        short.call("calc", "slow", (), ()),
        Err(RpcError::Call(CallError::Timeout(Duration::from_millis(100))))
    );
    let started = std::time::Instant::now();
    assert!(matches!(
        rpc.call("ghost", "add", (1, 2), ()),
        Err(RpcError::Call(CallError::UnknownService(_)))
    ));
    assert!(started.elapsed() < Duration::from_secs(2), "UnknownService took {:?}", started.elapsed());
    stop_all([caller, calc]);
}

#[derive(Clone)]
struct Retries {
    runs: Arc<AtomicU32>,
    report: Report,
}

fn flaky(State(s): State<Retries>, Payload(v): Payload<Value>) -> Result<(), HandlerError> {
    let run = s.runs.fetch_add(1, Ordering::SeqCst) + 1;
    if v["succeed_on"].as_u64().is_some_and(|n| u64::from(run) >= n) {
        s.report.send(json!({"ok": run}));
        Ok(())
    } else {
        Err(HandlerError::retryable("Flaky", format!("run {run}")))
    }
}

fn on_give_up(State(s): State<Retries>, Failure(e): Failure) {
    s.report.send(json!({"gave_up": e.error.message}));
}

#[test]
fn delayed_retries_go_through_ttl_waiting_queues_then_the_callback_runs() {
    let vhost = TestVhost::create().unwrap();
    for (succeed_on, expected) in [(3, json!({"ok": 3})), (99, json!({"gave_up": "run 3"}))] {
        let (report, rx) = Report::new();
        let state = Retries { runs: Arc::new(AtomicU32::new(0)), report };
        let route = Route::blocking(EventListener::new("src", "job"), "flaky", flaky)
            .retry(RetryPolicy::fixed(2, Duration::from_millis(100)))
            .callback(CallbackRoute::blocking("on_give_up", on_give_up));
        let worker = Runner::with_state(config(&vhost, "worker"), state.clone())
            .context(RunnerContext::new(1).route(route))
            .start()
            .unwrap();
        let src = client(&vhost, "src");
        src.producer().dispatch("job", &json!({"succeed_on": succeed_on})).unwrap();
        assert_eq!(rx.recv_timeout(WAIT).unwrap(), expected);
        assert_eq!(state.runs.load(Ordering::SeqCst), 3);
        stop_all([src, worker]);
    }
    let queues = vhost.queues().unwrap();
    assert!(
        queues.iter().any(|q| q.name.starts_with("microfw.retry.evt-src-job--worker.flaky.")),
        "no waiting queue among {queues:?}"
    );
}

/// Review: an event whose publish was handed to the link just before a stop went out (the
/// close flushes it and waits for its confirm), but the driver dropped that confirm and its
/// Producer saw ShuttingDown, inviting a second publish of an event already sent.
#[test]
fn an_event_dispatched_just_before_stop_is_reported_as_sent() {
    let vhost = TestVhost::create().unwrap();
    let (report, rx) = Report::new();
    let listener = Runner::with_state(config(&vhost, "listener"), report)
        .context(RunnerContext::new(2).route(Route::blocking(
            EventListener::new("src", "ping"),
            "sink",
            sink,
        )))
        .start()
        .unwrap();
    let mut raced = 0;
    for n in 0..20 {
        let src = client(&vhost, "src");
        let producer = src.producer();
        let started = Arc::new(std::sync::Barrier::new(2));
        let go = started.clone();
        let dispatch = std::thread::spawn(move || {
            go.wait();
            producer.dispatch("ping", &json!(n))
        });
        // Both start from here: the Emit and the Shutdown race to the driver.
        started.wait();
        assert_eq!(src.stop().unwrap().unfinished, 0);
        let sent = dispatch.join().unwrap();
        // Whether the Emit or the stop reached the driver first is up to the scheduler; an
        // event that did reach the listener must have been reported as sent.
        let arrived = rx.recv_timeout(if sent.is_ok() { WAIT } else { Duration::from_millis(300) });
        match (&sent, arrived) {
            (Ok(()), Ok(v)) => {
                assert_eq!(v, json!(n));
                raced += 1;
            }
            (Err(e), Ok(_)) => panic!("round {n}: the event went out but its dispatch failed: {e}"),
            (Ok(()), Err(_)) => panic!("round {n}: the dispatch succeeded but the event never arrived"),
            (Err(_), Err(_)) => {}
        }
    }
    assert!(raced > 0, "no round had its event handed over before the stop");
    stop_all([listener]);
}

//! End-to-end tests of the sync runtime on the memory hub. Each test has its own hub; every
//! wait has a timeout; nothing sleeps to synchronise.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use microfw_runtime_sync::extract::{Attempt, Context, Failure, Params, Payload, State};
use microfw_runtime_sync::{
    CallError, CallbackRoute, Config, Dialect, EventListener, HandlerError, MemoryHubHandle, Producer, Reply,
    RetryPolicy, Route, RpcError, RpcListener, RpcProxy, Runner, RunnerContext, StartError, TargetDetail,
    TimeEntrypoint, WorkerMode,
};
use serde::Deserialize;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(5);

fn config(name: &str) -> Config {
    Config { service_name: Some(name.into()), shutdown_timeout: Duration::from_secs(5), ..Config::default() }
}

/// A channel handlers can report to (through the service state).
#[derive(Clone)]
struct Report(Arc<Mutex<Sender<Value>>>);

fn report() -> (Report, Receiver<Value>) {
    let (tx, rx) = mpsc::channel();
    (Report(Arc::new(Mutex::new(tx))), rx)
}

impl Report {
    fn send(&self, v: Value) {
        let _ = self.0.lock().unwrap().send(v);
    }
}

#[test]
fn an_event_handler_dispatches_an_event_that_a_second_handler_receives() {
    let hub = MemoryHubHandle::new();
    let (report, rx) = report();

    fn bill(producer: Producer, Payload(order): Payload<Value>) -> Result<(), String> {
        let billed = json!({"id": order["id"], "billed": true});
        producer.dispatch("order_billed", &billed).map_err(|e| e.to_string())
    }
    fn notify(State(report): State<Report>, Context(ctx): Context, Payload(billed): Payload<Value>) {
        report.send(json!({"payload": billed, "stack": ctx.call_id_stack()}));
    }

    let service = Runner::with_state(config("billing"), report)
        .hub(hub.clone())
        .context(
            RunnerContext::new(2)
                .route(Route::blocking(EventListener::new("shop", "order_placed"), "bill", bill))
                .route(Route::blocking(EventListener::new("billing", "order_billed"), "notify", notify)),
        )
        .start()
        .unwrap();

    assert_eq!(hub.publish_event("shop", "order_placed", &json!({"id": 7})), Ok(1));
    let got = rx.recv_timeout(WAIT).unwrap();
    assert_eq!(got["payload"], json!({"id": 7, "billed": true}));
    // The worker context travelled with the event: bill's call id, then notify's.
    let stack: Vec<String> = serde_json::from_value(got["stack"].clone()).unwrap();
    assert_eq!(stack.len(), 2, "{stack:?}");
    assert!(stack[0].starts_with("billing.bill."), "{stack:?}");
    assert!(stack[1].starts_with("billing.notify."), "{stack:?}");

    // A standalone producer reaches the second handler too, with no inbound context.
    service.producer().dispatch("order_billed", &json!({"id": 8})).unwrap();
    let got = rx.recv_timeout(WAIT).unwrap();
    assert_eq!(got["payload"], json!({"id": 8}));
    assert_eq!(got["stack"].as_array().map(Vec::len), Some(1));

    assert_eq!(service.stop().unwrap().unfinished, 0);
    assert_eq!(hub.unacked_len("evt-shop-order_placed--billing.bill"), Some(0));
}

/// The math service: `add` (positional or keyword), `fail`, and `slow` (waits for the test).
fn math_service(hub: &MemoryHubHandle, release: Receiver<()>) -> microfw_runtime_sync::RunningService {
    #[derive(Deserialize)]
    struct AddArgs {
        a: i64,
        b: i64,
    }
    fn add(Params(args): Params<AddArgs>) -> Reply<i64> {
        Reply(args.a + args.b)
    }
    fn fail() -> Result<(), HandlerError> {
        Err(HandlerError::fatal("ValueError", "bad input"))
    }
    fn slow(State(release): State<Arc<Mutex<Receiver<()>>>>) -> Reply<&'static str> {
        let _ = release.lock().unwrap().recv_timeout(WAIT);
        Reply("late")
    }
    Runner::with_state(config("math"), Arc::new(Mutex::new(release)))
        .hub(hub.clone())
        .context(
            RunnerContext::new(4)
                .route(Route::blocking(RpcListener::new(), "add", add))
                .route(Route::blocking(RpcListener::new(), "fail", fail))
                .route(Route::blocking(RpcListener::new(), "slow", slow)),
        )
        .start()
        .unwrap()
}

#[test]
fn targets_list_the_parameter_names_and_docs_of_a_micro_framework_service() {
    #[derive(Deserialize)]
    struct Scale {
        #[allow(dead_code)]
        value: f64,
        #[serde(default)]
        #[allow(dead_code)]
        factor: Option<f64>,
    }
    fn scale(Params(_): Params<Scale>) {}
    let hub = MemoryHubHandle::new();
    let mf = || RpcListener::new().dialect(Dialect::MicroFramework);
    let svc = Runner::new(config("mfmath"))
        .hub(hub.clone())
        .context(RunnerContext::new(1).route(Route::blocking(mf(), "scale", scale).doc("Scales a value.")))
        .start()
        .unwrap();
    let caller = Runner::new(config("caller")).hub(hub.clone()).start().unwrap();
    let rpc = caller.rpc();
    let detail = TargetDetail::new("scale", ["value"], ["factor"], Some("Scales a value.".into()));
    assert_eq!(rpc.targets("mfmath"), Ok(vec![detail.clone()]));
    assert_eq!(rpc.target("mfmath", "scale"), Ok(detail));
    match rpc.target("mfmath", "nope") {
        Err(RpcError::Call(CallError::Remote(e))) => assert_eq!(e.exc_type, "KeyError"),
        other => panic!("expected a KeyError, got {other:?}"),
    }
    for s in [caller, svc] {
        assert_eq!(s.stop().unwrap().unfinished, 0);
    }
}

#[test]
fn rpc_between_two_runners_with_args_kwargs_remote_errors_and_timeouts() {
    let hub = MemoryHubHandle::new();
    let (release, release_rx) = mpsc::channel();
    let math = math_service(&hub, release_rx);

    // The caller relays an event into an RPC call from inside a handler.
    let (report, rx) = report();
    fn relay(rpc: RpcProxy, State(report): State<Report>, Payload(n): Payload<i64>) -> Result<(), String> {
        let sum: i64 = rpc.call_as("math", "add", (n,), json!({"b": 100})).map_err(|e| e.to_string())?;
        report.send(json!(sum));
        Ok(())
    }
    let caller = Runner::with_state(config("caller"), report)
        .hub(hub.clone())
        .context(RunnerContext::new(1).route(Route::blocking(
            EventListener::new("src", "number"),
            "relay",
            relay,
        )))
        .start()
        .unwrap();
    let rpc = caller.rpc();

    assert_eq!(rpc.call("math", "add", (1, 2), ()), Ok(json!(3)));
    assert_eq!(rpc.call("math", "add", [5], json!({"b": 6})), Ok(json!(11)));
    assert_eq!(rpc.call_as::<i64>("math", "add", (), json!({"a": 1, "b": 1})), Ok(2));
    let pending = rpc.call_async("math", "add", (20, 22), ()).unwrap();
    assert_eq!(pending.wait(), Ok(json!(42)));

    // A signature mismatch and a handler error come back as remote errors.
    match rpc.call("math", "add", (1, 2, 3), ()) {
        Err(RpcError::Call(CallError::Remote(e))) => assert_eq!(e.exc_type, "IncorrectSignature"),
        other => panic!("expected IncorrectSignature, got {other:?}"),
    }
    match rpc.call("math", "fail", (), ()) {
        Err(RpcError::Call(CallError::Remote(e))) => {
            assert_eq!(e.exc_type, "ValueError");
            assert_eq!(e.message, "bad input");
        }
        other => panic!("expected a remote ValueError, got {other:?}"),
    }
    assert_eq!(
        rpc.call("nobody", "ping", (), ()),
        Err(RpcError::Call(CallError::UnknownService("nobody".into())))
    );
    assert!(matches!(rpc.call("math", "add", 5, ()), Err(RpcError::Encode(_))));

    // A call whose handler waits past the deadline times out.
    let short = Duration::from_millis(150);
    assert_eq!(
        rpc.clone().with_timeout(short).call("math", "slow", (), ()),
        Err(RpcError::Call(CallError::Timeout(short)))
    );
    release.send(()).unwrap();

    // And from inside a handler, carrying its context.
    hub.publish_event("src", "number", &5).unwrap();
    assert_eq!(rx.recv_timeout(WAIT).unwrap(), json!(105));

    assert_eq!(caller.stop().unwrap().unfinished, 0);
    assert_eq!(math.stop().unwrap().unfinished, 0);
}

#[test]
fn failures_are_retried_then_the_callback_gets_the_payload_and_the_error() {
    let hub = MemoryHubHandle::new();
    let (report, rx) = report();
    let runs = Arc::new(AtomicU32::new(0));

    #[derive(Clone)]
    struct St(Report, Arc<AtomicU32>);
    impl microfw_runtime_sync::extract::FromRef<St> for Report {
        fn from_ref(s: &St) -> Report {
            s.0.clone()
        }
    }
    impl microfw_runtime_sync::extract::FromRef<St> for Arc<AtomicU32> {
        fn from_ref(s: &St) -> Arc<AtomicU32> {
            s.1.clone()
        }
    }
    fn flaky(
        State(runs): State<Arc<AtomicU32>>,
        attempt: Attempt,
        Payload(_): Payload<Value>,
    ) -> Result<(), String> {
        runs.fetch_add(1, Ordering::SeqCst);
        Err(format!("boom {}", attempt.retry_count))
    }
    fn on_failure(State(report): State<Report>, Failure(error): Failure, Payload(p): Payload<Value>) {
        report.send(json!({"payload": p, "error": error.error.message}));
    }

    let service = Runner::with_state(config("svc"), St(report, runs.clone()))
        .hub(hub.clone())
        .context(
            RunnerContext::new(1).route(
                Route::blocking(EventListener::new("shop", "order_placed"), "flaky", flaky)
                    .retry(RetryPolicy::fixed(2, Duration::from_millis(20)))
                    .callback(CallbackRoute::blocking("flaky_failed", on_failure)),
            ),
        )
        .start()
        .unwrap();

    hub.publish_event("shop", "order_placed", &json!({"id": 1})).unwrap();
    let got = rx.recv_timeout(WAIT).unwrap();
    assert_eq!(got, json!({"payload": {"id": 1}, "error": "boom 2"}));
    assert_eq!(runs.load(Ordering::SeqCst), 3, "one run and two retries");

    assert_eq!(service.stop().unwrap().unfinished, 0);
    // Events dead-letter when given up (after the callback).
    assert_eq!(hub.queue_len("microfw.dlq.evt-shop-order_placed--svc.flaky"), Some(1));
    assert_eq!(hub.queue_len("evt-shop-order_placed--svc.flaky"), Some(0));
    assert!(rx.try_recv().is_err(), "the callback ran once");
}

/// Budget 1 (prefetch 4), four events, a stop while the first runs.
fn shutdown_with_pending_work(mode: WorkerMode) -> (u32, usize, usize) {
    let hub = MemoryHubHandle::new();
    let (started_tx, started) = mpsc::channel::<()>();
    let (release, release_rx) = mpsc::channel::<()>();
    let ran = Arc::new(AtomicU32::new(0));

    type St = (Arc<Mutex<Sender<()>>>, Arc<Mutex<Receiver<()>>>, Arc<AtomicU32>);
    fn work(State((started, release, ran)): State<St>) -> Result<(), String> {
        started.lock().unwrap().send(()).map_err(|e| e.to_string())?;
        release.lock().unwrap().recv_timeout(WAIT).map_err(|e| e.to_string())?;
        ran.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    let state: St = (Arc::new(Mutex::new(started_tx)), Arc::new(Mutex::new(release_rx)), ran.clone());
    let service = Runner::with_state(config("svc"), state)
        .hub(hub.clone())
        .context(RunnerContext::new(1).prefetch(4).route(Route::blocking(
            EventListener::new("src", "job"),
            "work",
            work,
        )))
        .worker_mode(0, mode)
        .start()
        .unwrap();

    for i in 0..4 {
        hub.publish_event("src", "job", &i).unwrap();
    }
    started.recv_timeout(WAIT).unwrap();
    // All four reached the service before the stop request, so its Engine holds them all.
    service.request_stop();
    for _ in 0..4 {
        // In thread mode the service may end (dropping the receiver) after the first.
        let _ = release.send(());
    }
    let report = service.stop().unwrap();
    assert_eq!(report.unfinished, 0);
    let queue = "evt-src-job--svc.work";
    (ran.load(Ordering::SeqCst), hub.queue_len(queue).unwrap(), hub.unacked_len(queue).unwrap())
}

#[test]
fn thread_mode_finishes_the_running_job_and_hands_the_rest_back() {
    assert_eq!(shutdown_with_pending_work(WorkerMode::Thread), (1, 3, 0));
}

#[test]
fn greedy_thread_mode_runs_every_held_job_before_stopping() {
    assert_eq!(shutdown_with_pending_work(WorkerMode::GreedyThread), (4, 0, 0));
}

#[test]
fn a_panicking_handler_does_not_take_the_service_down() {
    let hub = MemoryHubHandle::new();
    let (report, rx) = report();
    fn touchy(State(report): State<Report>, Payload(word): Payload<String>) {
        if word == "boom" {
            panic!("touchy handler exploded");
        }
        report.send(json!(word));
    }
    let service = Runner::with_state(config("svc"), report)
        .hub(hub.clone())
        .context(RunnerContext::new(1).route(Route::blocking(
            EventListener::new("src", "word"),
            "touchy",
            touchy,
        )))
        .start()
        .unwrap();
    hub.publish_event("src", "word", &"boom").unwrap();
    hub.publish_event("src", "word", &"fine").unwrap();
    assert_eq!(rx.recv_timeout(WAIT).unwrap(), json!("fine"));
    assert_eq!(service.stop().unwrap().unfinished, 0);
    // The panicked run was a failure: not retried (no policy), dead-lettered.
    assert_eq!(hub.queue_len("microfw.dlq.evt-src-word--svc.touchy"), Some(1));
}

#[test]
fn timers_tick_on_the_driver_deadline() {
    let hub = MemoryHubHandle::new();
    let (report, rx) = report();
    fn tick(State(report): State<Report>) {
        report.send(json!("tick"));
    }
    let service = Runner::with_state(config("svc"), report)
        .hub(hub)
        .context(RunnerContext::new(1).route(Route::blocking(
            TimeEntrypoint::new(Duration::from_millis(10)).eager(),
            "tick",
            tick,
        )))
        .start()
        .unwrap();
    for _ in 0..3 {
        assert_eq!(rx.recv_timeout(WAIT).unwrap(), json!("tick"));
    }
    assert_eq!(service.stop().unwrap().unfinished, 0);
}

#[test]
fn unsupported_worker_modes_and_handlers_are_refused_at_start() {
    // WORKER_MODE as the environment gives it.
    let start = |mode: &str| -> Result<(), String> {
        let env = [("SERVICE_NAME", "svc"), ("WORKER_MODE", mode)];
        let config = Config::from_env(env).map_err(|e| e.to_string())?;
        let service = Runner::new(config).hub(MemoryHubHandle::new()).start().map_err(|e| e.to_string())?;
        service.stop().map(drop).map_err(|e| e.to_string())
    };
    // Process mode is supported (tests/process.rs); with no context it starts no worker.
    assert_eq!(start("process"), Ok(()));
    let bad = start("fibers").unwrap_err();
    assert!(bad.contains("WORKER_MODE") && bad.contains("\"fibers\""), "{bad}");
    let asyncio = start("asyncio").unwrap_err();
    assert!(asyncio.contains("needs microfw-runtime-tokio"), "{asyncio}");
    assert_eq!(start("greedy_thread"), Ok(()));

    let missing = Runner::new(config("svc")).worker_mode(2, WorkerMode::Thread).start().unwrap_err();
    assert_eq!(missing, StartError::NoSuchContext { index: 2, contexts: 0 });
    let unnamed = Runner::new(Config::default()).start().unwrap_err();
    assert!(
        matches!(unnamed, StartError::Config(_)) && unnamed.to_string().contains("SERVICE_NAME"),
        "{unnamed}"
    );
    // Nothing listens on port 1: the connection is refused, and the error names the URI
    // without its password.
    let amqp = Config::from_env([("SERVICE_NAME", "svc"), ("AMQP_URI", "amqp://guest:s3cret@127.0.0.1:1/")])
        .unwrap();
    let err = Runner::new(amqp).start().unwrap_err();
    if cfg!(feature = "amqp") {
        assert!(matches!(&err, StartError::Link(m) if m.contains("127.0.0.1:1")), "{err}");
        assert!(!err.to_string().contains("s3cret"), "{err}");
    } else {
        assert_eq!(err, StartError::AmqpUnsupported);
    }

    async fn later() {}
    let async_route = Runner::new(config("svc"))
        .hub(MemoryHubHandle::new())
        .context(RunnerContext::new(1).route(Route::new(EventListener::new("a", "b"), "later", later)))
        .start()
        .unwrap_err();
    assert_eq!(async_route, StartError::AsyncHandler { route: "later".into() });
    assert!(async_route.to_string().contains("\"later\""));
}

#[test]
fn a_stop_gives_up_at_the_shutdown_timeout_and_returns_the_delivery() {
    let hub = MemoryHubHandle::new();
    let (started_tx, started) = mpsc::channel::<()>();
    let (release, release_rx) = mpsc::channel::<()>();
    type St = (Arc<Mutex<Sender<()>>>, Arc<Mutex<Receiver<()>>>);
    fn stuck(State((started, release)): State<St>) {
        let _ = started.lock().unwrap().send(());
        let _ = release.lock().unwrap().recv_timeout(WAIT);
    }
    let mut config = config("svc");
    config.shutdown_timeout = Duration::from_millis(100);
    let state: St = (Arc::new(Mutex::new(started_tx)), Arc::new(Mutex::new(release_rx)));
    let service = Runner::with_state(config, state)
        .hub(hub.clone())
        .context(RunnerContext::new(1).route(Route::blocking(
            EventListener::new("src", "job"),
            "stuck",
            stuck,
        )))
        .start()
        .unwrap();
    hub.publish_event("src", "job", &1).unwrap();
    started.recv_timeout(WAIT).unwrap();
    let report = service.stop().unwrap();
    assert_eq!(report.unfinished, 1);
    // The link closed: the unfinished delivery is back in its queue for another instance.
    assert_eq!(hub.queue_len("evt-src-job--svc.stuck"), Some(1));
    assert_eq!(hub.unacked_len("evt-src-job--svc.stuck"), Some(0));
    release.send(()).unwrap(); // the detached worker thread ends
}

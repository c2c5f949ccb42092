//! End-to-end tests of the tokio runtime on the memory hub. Every wait has a timeout; nothing
//! sleeps to synchronise (the one poll loop waits for a broker condition, with a deadline).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use microfw_core::config::AmqpUri;
use microfw_runtime_tokio::TimeEntrypoint;
use microfw_runtime_tokio::extract::{Failure, Params, Payload, State};
use microfw_runtime_tokio::{
    CallError, CallbackRoute, Config, ConfigError, Dialect, EventListener, HandlerError, MemoryHubHandle,
    Producer, Reply, RetryPolicy, Route, RpcError, RpcListener, RpcProxy, Runner, RunnerContext,
    RunningService, StartError, TargetDetail, WorkerMode,
};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(5);

fn config(name: &str, mode: &str) -> Config {
    Config {
        service_name: Some(name.into()),
        worker_mode: mode.parse().unwrap(),
        shutdown_timeout: Duration::from_secs(5),
        ..Config::default()
    }
}

/// A service with no routes: a standalone producer / RPC client named `name`.
async fn client(hub: &MemoryHubHandle, name: &str) -> RunningService {
    Runner::new(config(name, "async")).hub(hub.clone()).start().await.unwrap()
}

async fn recv<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
    timeout(WAIT, rx.recv()).await.expect("timed out waiting").expect("channel closed")
}

/// Waits (with a deadline) until `cond` holds on the hub.
async fn until(hub: &MemoryHubHandle, what: &str, cond: impl Fn(&MemoryHubHandle) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond(hub) {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

type Tx = mpsc::UnboundedSender<Value>;

// 1. event -> handler -> Producer -> second handler, in async and in thread mode.

async fn relay_async(producer: Producer, Payload(v): Payload<Value>) -> Result<(), String> {
    producer.dispatch("pong", &json!({"relayed": v})).await.map_err(|e| e.to_string())
}

fn relay_blocking(producer: Producer, Payload(v): Payload<Value>) -> Result<(), String> {
    producer.dispatch_blocking("pong", &json!({"relayed": v})).map_err(|e| e.to_string())
}

async fn sink(State(tx): State<Tx>, Payload(v): Payload<Value>) {
    let _ = tx.send(v);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_handler_dispatches_an_event_another_service_receives() {
    for mode in ["async", "thread"] {
        let hub = MemoryHubHandle::new();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let relay_route = if mode == "async" {
            Route::new(EventListener::new("src", "ping"), "relay", relay_async)
        } else {
            Route::blocking(EventListener::new("src", "ping"), "relay", relay_blocking)
        };
        let relay = Runner::new(config("relay", mode))
            .context(RunnerContext::new(2).route(relay_route))
            .hub(hub.clone())
            .start()
            .await
            .unwrap();
        let listener = Runner::with_state(config("listener", "async"), tx)
            .context(RunnerContext::new(2).route(Route::new(
                EventListener::new("relay", "pong"),
                "sink",
                sink,
            )))
            .hub(hub.clone())
            .start()
            .await
            .unwrap();
        let src = client(&hub, "src").await;
        src.producer().dispatch("ping", &json!(7)).await.unwrap();
        assert_eq!(recv(&mut rx).await, json!({"relayed": 7}), "mode {mode}");
        for s in [src, relay, listener] {
            assert_eq!(s.stop().await.unwrap().unfinished, 0);
        }
    }
}

// 2. RPC between two runners: positional and keyword args, a remote error, a timeout.

#[derive(Deserialize)]
struct AddArgs {
    a: i64,
    b: i64,
}

async fn add(Params(AddArgs { a, b }): Params<AddArgs>) -> Reply<i64> {
    Reply(a + b)
}

async fn fail() -> Result<(), HandlerError> {
    Err(HandlerError::fatal("ValueError", "no good"))
}

async fn stuck(State(gate): State<Arc<tokio::sync::Semaphore>>) -> Reply<&'static str> {
    let _permit = gate.acquire().await;
    Reply("released")
}

/// Calls `calc.add` from inside a handler (the worker's context travels with the call).
async fn add_via(rpc: RpcProxy, Params((a, b)): Params<(i64, i64)>) -> Result<Reply<Value>, String> {
    rpc.call("calc", "add", (a, b), ()).await.map(Reply).map_err(|e| e.to_string())
}

fn add_via_blocking(rpc: RpcProxy, Params((a, b)): Params<(i64, i64)>) -> Result<Reply<Value>, String> {
    rpc.call_blocking("calc", "add", (a,), json!({ "b": b })).map(Reply).map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_between_runners_with_args_errors_and_timeouts() {
    let hub = MemoryHubHandle::new();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let calc = Runner::with_state(config("calc", "async"), gate.clone())
        .context(
            RunnerContext::new(4)
                .route(Route::new(RpcListener::new(), "add", add))
                .route(Route::new(RpcListener::new(), "fail", fail))
                .route(Route::new(RpcListener::new(), "stuck", stuck)),
        )
        .hub(hub.clone())
        .start()
        .await
        .unwrap();
    let proxy = Runner::new(config("proxy", "async"))
        .context(RunnerContext::new(2).route(Route::new(RpcListener::new(), "add_via", add_via)))
        .context(RunnerContext::new(2).route(Route::blocking(
            RpcListener::new(),
            "add_via_blocking",
            add_via_blocking,
        )))
        .worker_mode(1, WorkerMode::Thread)
        .hub(hub.clone())
        .start()
        .await
        .unwrap();
    let caller = client(&hub, "caller").await;
    let rpc = caller.rpc();

    assert_eq!(rpc.call("calc", "add", (1, 2), ()).await, Ok(json!(3)));
    assert_eq!(rpc.call("calc", "add", (10,), json!({"b": 5})).await, Ok(json!(15)));
    assert_eq!(rpc.call_as::<i64>("calc", "add", (), json!({"a": 4, "b": 5})).await, Ok(9));
    let pending = rpc.call_async("calc", "add", (2, 2), ()).await.unwrap();
    assert_eq!(pending.await, Ok(json!(4)));
    assert_eq!(rpc.call("proxy", "add_via", (20, 22), ()).await, Ok(json!(42)));
    assert_eq!(rpc.call("proxy", "add_via_blocking", (1, 1), ()).await, Ok(json!(2)));

    match rpc.call("calc", "fail", (), ()).await {
        Err(RpcError::Call(CallError::Remote(e))) => {
            assert_eq!(e.exc_type, "ValueError");
            assert_eq!(e.message, "no good");
        }
        other => panic!("expected a remote error, got {other:?}"),
    }
    match rpc.call("calc", "add", (1,), ()).await {
        Err(RpcError::Call(CallError::Remote(e))) => assert_eq!(e.exc_type, "IncorrectSignature"),
        other => panic!("expected IncorrectSignature, got {other:?}"),
    }

    let short = rpc.clone().with_timeout(Duration::from_millis(100));
    assert_eq!(
        short.call("calc", "stuck", (), ()).await,
        Err(RpcError::Call(CallError::Timeout(Duration::from_millis(100))))
    );
    // Released, the stuck call finishes (its late reply is dropped) and the next one works.
    gate.add_permits(2);
    assert_eq!(rpc.call("calc", "stuck", (), ()).await, Ok(json!("released")));

    for s in [caller, proxy, calc] {
        assert_eq!(s.stop().await.unwrap().unfinished, 0);
    }
}

#[tokio::test]
async fn targets_list_the_parameter_names_and_docs_of_a_micro_framework_service() {
    let hub = MemoryHubHandle::new();
    let mf = || RpcListener::new().dialect(Dialect::MicroFramework);
    let calc =
        Runner::new(config("mfcalc", "async"))
            .context(
                RunnerContext::new(2)
                    .route(Route::new(mf(), "add", add).doc("Adds a and b."))
                    .route(Route::new(mf(), "fail", fail)),
            )
            .hub(hub.clone())
            .start()
            .await
            .unwrap();
    let caller = client(&hub, "caller").await;
    let rpc = caller.rpc();
    let targets = rpc.targets("mfcalc").await.unwrap();
    let add_detail = TargetDetail::new("add", ["a", "b"], Vec::<String>::new(), Some("Adds a and b.".into()));
    assert_eq!(targets, vec![add_detail.clone(), TargetDetail::new("fail", [""; 0], [""; 0], None)]);
    assert_eq!(rpc.target("mfcalc", "add").await, Ok(add_detail));
    match rpc.target("mfcalc", "nope").await {
        Err(RpcError::Call(CallError::Remote(e))) => assert_eq!(e.exc_type, "KeyError"),
        other => panic!("expected a KeyError, got {other:?}"),
    }
    // The proxy's own dialect is untouched: calls still speak Nameko.
    assert!(matches!(
        rpc.call("mfcalc", "add", (1, 2), ()).await,
        Err(RpcError::Call(CallError::UnknownService(_)))
    ));
    for s in [caller, calc] {
        assert_eq!(s.stop().await.unwrap().unfinished, 0);
    }
}

// 3. Retries and the failure callback.

#[derive(Clone)]
struct Retries {
    runs: Arc<AtomicU32>,
    callback: Tx,
}

async fn always_fails(State(r): State<Retries>) -> Result<(), String> {
    r.runs.fetch_add(1, Ordering::SeqCst);
    Err("try again".into())
}

async fn on_fail(State(r): State<Retries>, Failure(e): Failure, Payload(v): Payload<Value>) {
    let _ = r.callback.send(json!({"payload": v, "error": e.error.message}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_route_is_retried_then_its_callback_runs() {
    let hub = MemoryHubHandle::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let runs = Arc::new(AtomicU32::new(0));
    let state = Retries { runs: runs.clone(), callback: tx };
    let route = Route::new(EventListener::new("src", "job"), "work", always_fails)
        .retry(RetryPolicy::fixed(2, Duration::from_millis(20)))
        .callback(CallbackRoute::new("on_fail", on_fail));
    let svc = Runner::with_state(config("worker", "async"), state)
        .context(RunnerContext::new(2).route(route))
        .hub(hub.clone())
        .start()
        .await
        .unwrap();
    let src = client(&hub, "src").await;
    src.producer().dispatch("job", &json!({"n": 1})).await.unwrap();
    assert_eq!(recv(&mut rx).await, json!({"payload": {"n": 1}, "error": "try again"}));
    assert_eq!(runs.load(Ordering::SeqCst), 3, "1 run + 2 retries");
    src.stop().await.unwrap();
    assert_eq!(svc.stop().await.unwrap().unfinished, 0);
}

// 4. Both shutdown modes with pending work counted.

#[derive(Clone)]
struct Gate {
    started: mpsc::UnboundedSender<()>,
    release: Arc<Mutex<std::sync::mpsc::Receiver<()>>>,
    runs: Arc<AtomicU32>,
}

fn gated(State(g): State<Gate>, Payload(_): Payload<Value>) {
    let _ = g.started.send(());
    let release = g.release.lock().unwrap().recv_timeout(WAIT);
    assert!(release.is_ok(), "never released");
    g.runs.fetch_add(1, Ordering::SeqCst);
}

async fn shutdown_case(mode: WorkerMode) -> (u32, Option<usize>, usize) {
    let hub = MemoryHubHandle::new();
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel();
    let runs = Arc::new(AtomicU32::new(0));
    let gate = Gate { started: started_tx, release: Arc::new(Mutex::new(release_rx)), runs: runs.clone() };
    let svc = Runner::with_state(config("gated", "thread"), gate)
        .context(RunnerContext::new(1).prefetch(4).route(Route::blocking(
            EventListener::new("src", "e"),
            "h",
            gated,
        )))
        .worker_mode(0, mode)
        .hub(hub.clone())
        .start()
        .await
        .unwrap();
    let src = client(&hub, "src").await;
    for i in 0..4 {
        src.producer().dispatch("e", &json!(i)).await.unwrap();
    }
    recv(&mut started).await; // the first run is going, the other three are held
    let queue = "evt-src-e--gated.h";
    assert_eq!(hub.with(|h| h.broker().unacked_len(queue)), Some(4));
    let stopping = tokio::spawn(svc.stop());
    until(&hub, "the consumer to be cancelled", |h| h.with(|h| h.broker().consumer_count(queue)) == Some(0))
        .await;
    for _ in 0..4 {
        let _ = release_tx.send(()); // in thread mode the service may be gone after the first
    }
    let report = timeout(WAIT, stopping).await.unwrap().unwrap().unwrap();
    src.stop().await.unwrap();
    assert_eq!(report.unfinished, 0);
    let unacked = hub.with(|h| h.broker().unacked_len(queue)).unwrap();
    (runs.load(Ordering::SeqCst), hub.queue_len(queue), unacked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thread_mode_finishes_running_work_and_returns_the_rest() {
    assert_eq!(shutdown_case(WorkerMode::Thread).await, (1, Some(3), 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_thread_mode_drains_pending_work() {
    assert_eq!(shutdown_case(WorkerMode::GreedyThread).await, (4, Some(0), 0));
}

// 5. Panic isolation.

async fn fragile_async(State(tx): State<Tx>, Payload(v): Payload<Value>) {
    assert!(v != json!("boom"), "boom");
    let _ = tx.send(v);
}

fn fragile_blocking(State(tx): State<Tx>, Payload(v): Payload<Value>) {
    assert!(v != json!("boom"), "boom");
    let _ = tx.send(v);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_does_not_take_the_service_down() {
    for mode in ["async", "thread"] {
        let hub = MemoryHubHandle::new();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let route = if mode == "async" {
            Route::new(EventListener::new("src", "e"), "fragile", fragile_async)
        } else {
            Route::blocking(EventListener::new("src", "e"), "fragile", fragile_blocking)
        };
        let svc = Runner::with_state(config("fragile", mode), tx)
            .context(RunnerContext::new(1).route(route))
            .hub(hub.clone())
            .start()
            .await
            .unwrap();
        let src = client(&hub, "src").await;
        src.producer().dispatch("e", &json!("boom")).await.unwrap();
        src.producer().dispatch("e", &json!("fine")).await.unwrap();
        assert_eq!(recv(&mut rx).await, json!("fine"), "mode {mode}");
        // The panicked run gave up (no retry policy) and dead-lettered its message.
        until(&hub, "the dead letter", |h| h.queue_len("microfw.dlq.evt-src-e--fragile.fragile") == Some(1))
            .await;
        src.stop().await.unwrap();
        assert_eq!(svc.stop().await.unwrap().unfinished, 0);
    }
}

// 6. Start errors.

fn noop_blocking() {}

#[tokio::test]
async fn bad_configurations_are_refused_at_start() {
    let hub = MemoryHubHandle::new();
    let start = |c: Config| Runner::new(c).hub(hub.clone()).start();
    // Process mode is supported (tests/process.rs); with no context it starts no worker.
    start(config("svc", "process")).await.unwrap().stop().await.unwrap();
    let err = Config::from_env([("WORKER_MODE", "fibers")]).unwrap_err();
    assert!(err.to_string().contains("\"fibers\""), "{err}");
    assert!("fibers".parse::<WorkerMode>().unwrap_err().to_string().contains("fibers"));
    let unnamed = start(Config::default()).await.unwrap_err();
    assert_eq!(unnamed, StartError::Config(ConfigError::Missing("SERVICE_NAME")));
    let mut amqp = config("svc", "async");
    // Nothing listens on port 1: the connection is refused, and the error names the URI
    // without its password.
    amqp.amqp_uri = Some(AmqpUri::new("amqp://guest:s3cret@127.0.0.1:1/").unwrap());
    let err = Runner::new(amqp).start().await.unwrap_err();
    if cfg!(feature = "amqp") {
        assert!(matches!(&err, StartError::Link(m) if m.contains("127.0.0.1:1")), "{err}");
        assert!(!err.to_string().contains("s3cret"), "{err}");
    } else {
        assert_eq!(err, StartError::AmqpUnsupported);
    }

    let blocking_in_async = Runner::new(config("svc", "async"))
        .context(RunnerContext::new(1).route(Route::blocking(RpcListener::new(), "slow", noop_blocking)))
        .hub(hub.clone())
        .start()
        .await
        .unwrap_err();
    assert_eq!(blocking_in_async, StartError::BlockingHandlerInAsyncContext { route: "slow".into() });
    let no_context = Runner::new(config("svc", "async")).worker_mode(0, WorkerMode::Thread).start().await;
    assert_eq!(no_context.unwrap_err(), StartError::NoSuchContext { index: 0, contexts: 0 });
}

// Async handlers also run in thread contexts (each worker drives them on its own runtime).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_handler_runs_in_a_thread_context() {
    let hub = MemoryHubHandle::new();
    let svc = Runner::new(config("calc", "thread"))
        .context(RunnerContext::new(2).route(Route::new(RpcListener::new(), "add", add)))
        .hub(hub.clone())
        .start()
        .await
        .unwrap();
    let caller = client(&hub, "caller").await;
    assert_eq!(caller.rpc().call("calc", "add", (2, 3), ()).await, Ok(json!(5)));
    caller.stop().await.unwrap();
    assert_eq!(svc.stop().await.unwrap().unfinished, 0);
}

// The shutdown timeout abandons a stuck run: counted, its message back in the queue.

async fn stuck_event(State(s): State<Stuck>, Payload(_): Payload<Value>) {
    let _permit = s.semaphore.acquire().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shutdown_timeout_abandons_stuck_runs() {
    for mode in ["thread", "async"] {
        let hub = MemoryHubHandle::new();
        let (started_tx, mut started) = mpsc::unbounded_channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel();
        let runs = Arc::new(AtomicU32::new(0));
        let gate = Gate { started: started_tx.clone(), release: Arc::new(Mutex::new(release_rx)), runs };
        let semaphore = Arc::new(tokio::sync::Semaphore::new(0));
        let mut cfg = config("stuck", mode);
        cfg.shutdown_timeout = Duration::from_millis(100);
        let route = if mode == "thread" {
            Route::blocking(EventListener::new("src", "e"), "h", gated)
        } else {
            Route::new(EventListener::new("src", "e"), "h", stuck_event)
        };
        let svc = Runner::with_state(cfg, Stuck { gate, semaphore: semaphore.clone() })
            .context(RunnerContext::new(1).route(route))
            .hub(hub.clone())
            .start()
            .await
            .unwrap();
        let src = client(&hub, "src").await;
        src.producer().dispatch("e", &json!(1)).await.unwrap();
        let queue = "evt-src-e--stuck.h";
        if mode == "thread" {
            recv(&mut started).await;
        } else {
            until(&hub, "the delivery", |h| h.with(|h| h.broker().unacked_len(queue)) == Some(1)).await;
        }
        let report = timeout(WAIT, svc.stop()).await.unwrap().unwrap();
        assert_eq!(report.unfinished, 1, "mode {mode}");
        assert_eq!(hub.queue_len(queue), Some(1), "mode {mode}: the message is back");
        let _ = release_tx.send(());
        semaphore.add_permits(1);
        src.stop().await.unwrap();
    }
}

#[derive(Clone)]
struct Stuck {
    gate: Gate,
    semaphore: Arc<tokio::sync::Semaphore>,
}

impl microfw_runtime_tokio::extract::FromRef<Stuck> for Gate {
    fn from_ref(s: &Stuck) -> Self {
        s.gate.clone()
    }
}

// Timers tick on the driver's deadline.

async fn on_tick(State(tx): State<Tx>) {
    let _ = tx.send(json!("tick"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timer_route_ticks() {
    let hub = MemoryHubHandle::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let svc = Runner::with_state(config("clock", "async"), tx)
        .context(RunnerContext::new(1).route(Route::new(
            TimeEntrypoint::new(Duration::from_millis(10)),
            "tick",
            on_tick,
        )))
        .hub(hub.clone())
        .start()
        .await
        .unwrap();
    for _ in 0..3 {
        assert_eq!(recv(&mut rx).await, json!("tick"));
    }
    assert_eq!(svc.stop().await.unwrap().unfinished, 0);
}

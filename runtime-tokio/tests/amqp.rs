//! The tokio runtime on a real RabbitMQ (127.0.0.1:5672): Runners whose config names an
//! `AMQP_URI` talk through the lapin link. Each test has its own vhost, deleted afterwards.
#![cfg(feature = "amqp")]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use microfw_core::config::AmqpUri;
use microfw_runtime_tokio::extract::{Failure, Params, Payload, State};
use microfw_runtime_tokio::{
    CallError, CallbackRoute, Config, Dialect, EventListener, HandlerError, Producer, Reply, RetryPolicy,
    Route, RpcError, RpcListener, Runner, RunnerContext, RunningService, TargetDetail,
};
use microfw_tests::TestVhost;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(10);

fn config(vhost: &TestVhost, name: &str, mode: &str) -> Config {
    Config {
        service_name: Some(name.into()),
        worker_mode: mode.parse().unwrap(),
        shutdown_timeout: Duration::from_secs(5),
        amqp_uri: Some(AmqpUri::new(vhost.amqp_uri()).unwrap()),
        ..Config::default()
    }
}

async fn client(vhost: &TestVhost, name: &str) -> RunningService {
    Runner::new(config(vhost, name, "async")).start().await.unwrap()
}

async fn recv<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
    timeout(WAIT, rx.recv()).await.expect("timed out waiting").expect("channel closed")
}

async fn stop_all(services: impl IntoIterator<Item = RunningService>) {
    for s in services {
        let report = timeout(WAIT, s.stop()).await.expect("stop timed out").unwrap();
        assert_eq!(report.unfinished, 0);
    }
}

type Tx = mpsc::UnboundedSender<Value>;

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
async fn events_flow_through_rabbitmq_with_a_filter_in_async_and_thread_modes() {
    let vhost = TestVhost::create().unwrap();
    for mode in ["async", "thread"] {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let relay_route = if mode == "async" {
            Route::new(EventListener::new("src", "ping"), "relay", relay_async)
        } else {
            Route::blocking(EventListener::new("src", "ping"), "relay", relay_blocking)
        };
        let relay = Runner::new(config(&vhost, "relay", mode))
            .context(RunnerContext::new(2).route(relay_route))
            .start()
            .await
            .unwrap();
        let only_big = EventListener::new("relay", "pong")
            .filter(|v: &Value| v["relayed"].as_i64().is_some_and(|n| n >= 10));
        let listener = Runner::with_state(config(&vhost, "listener", "async"), tx)
            .context(RunnerContext::new(2).route(Route::new(only_big, "sink", sink)))
            .start()
            .await
            .unwrap();
        let src = client(&vhost, "src").await;
        for n in [1, 10, 2, 20] {
            src.producer().dispatch("ping", &json!(n)).await.unwrap();
        }
        assert_eq!(recv(&mut rx).await, json!({"relayed": 10}), "mode {mode}");
        assert_eq!(recv(&mut rx).await, json!({"relayed": 20}), "mode {mode}");
        stop_all([src, relay, listener]).await;
        assert!(rx.try_recv().is_err(), "the filter let a small number through");
    }
}

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

async fn slow() -> Reply<&'static str> {
    tokio::time::sleep(Duration::from_millis(500)).await;
    Reply("late")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_through_rabbitmq_in_both_dialects_with_errors_timeouts_and_unknown_services() {
    let vhost = TestVhost::create().unwrap();
    let mf = || RpcListener::new().dialect(Dialect::MicroFramework);
    let calc = Runner::new(config(&vhost, "calc", "async"))
        .context(
            RunnerContext::new(4)
                .route(Route::new(RpcListener::new(), "add", add))
                .route(Route::new(RpcListener::new(), "fail", fail))
                .route(Route::new(RpcListener::new(), "slow", slow))
                .route(Route::new(mf(), "mf_add", add).doc("Adds, micro_framework style.")),
        )
        .start()
        .await
        .unwrap();
    let caller = client(&vhost, "caller").await;
    let rpc = caller.rpc();

    assert_eq!(rpc.call("calc", "add", (1, 2), ()).await, Ok(json!(3)));
    assert_eq!(rpc.call("calc", "add", (10,), json!({"b": 5})).await, Ok(json!(15)));
    let in_flight: Vec<_> = (0..16).map(|i| rpc.call("calc", "add", (i, i), ())).collect();
    for (i, call) in in_flight.into_iter().enumerate() {
        assert_eq!(call.await, Ok(json!(2 * i)));
    }
    let mf_rpc = rpc.clone().dialect(Dialect::MicroFramework);
    assert_eq!(mf_rpc.call("calc", "mf_add", (20, 22), ()).await, Ok(json!(42)));
    let detail =
        TargetDetail::new("mf_add", ["a", "b"], [""; 0], Some("Adds, micro_framework style.".into()));
    assert_eq!(rpc.targets("calc").await, Ok(vec![detail]));

    match rpc.call("calc", "fail", (), ()).await {
        Err(RpcError::Call(CallError::Remote(e))) => {
            assert_eq!((e.exc_type.as_str(), e.message.as_str()), ("ValueError", "no good"));
        }
        other => panic!("expected a remote error, got {other:?}"),
    }
    match rpc.call("calc", "nope", (), ()).await {
        Err(RpcError::Call(CallError::Remote(e))) => assert_eq!(e.exc_type, "MethodNotFound"),
        other => panic!("expected MethodNotFound, got {other:?}"),
    }
    let short = rpc.clone().with_timeout(Duration::from_millis(100));
    assert_eq!(
        short.call("calc", "slow", (), ()).await,
        Err(RpcError::Call(CallError::Timeout(Duration::from_millis(100))))
    );
    // Nobody serves `ghost`: the mandatory request comes back at once.
    let started = std::time::Instant::now();
    assert!(matches!(
        rpc.call("ghost", "add", (1, 2), ()).await,
        Err(RpcError::Call(CallError::UnknownService(_)))
    ));
    assert!(started.elapsed() < Duration::from_secs(2), "UnknownService took {:?}", started.elapsed());
    stop_all([caller, calc]).await;
}

#[derive(Clone)]
struct Retries {
    runs: Arc<AtomicU32>,
    gave_up: Tx,
}

async fn flaky(State(s): State<Retries>, Payload(v): Payload<Value>) -> Result<(), HandlerError> {
    let run = s.runs.fetch_add(1, Ordering::SeqCst) + 1;
    if v["succeed_on"].as_u64().is_some_and(|n| u64::from(run) >= n) {
        let _ = s.gave_up.send(json!({"ok": run}));
        Ok(())
    } else {
        Err(HandlerError::retryable("Flaky", format!("run {run}")))
    }
}

async fn on_give_up(State(s): State<Retries>, Failure(e): Failure) {
    let _ = s.gave_up.send(json!({"gave_up": e.error.message}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_retries_go_through_ttl_waiting_queues_then_the_callback_runs() {
    let vhost = TestVhost::create().unwrap();
    for (succeed_on, expected) in [(3, json!({"ok": 3})), (99, json!({"gave_up": "run 3"}))] {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let state = Retries { runs: Arc::new(AtomicU32::new(0)), gave_up: tx };
        let policy = RetryPolicy::fixed(2, Duration::from_millis(100));
        let route = Route::new(EventListener::new("src", "job"), "flaky", flaky)
            .retry(policy)
            .callback(CallbackRoute::new("on_give_up", on_give_up));
        let worker = Runner::with_state(config(&vhost, "worker", "async"), state.clone())
            .context(RunnerContext::new(1).route(route))
            .start()
            .await
            .unwrap();
        let src = client(&vhost, "src").await;
        src.producer().dispatch("job", &json!({"succeed_on": succeed_on})).await.unwrap();
        assert_eq!(recv(&mut rx).await, expected);
        assert_eq!(state.runs.load(Ordering::SeqCst), 3);
        stop_all([src, worker]).await;
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
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_dispatched_just_before_stop_is_reported_as_sent() {
    let vhost = TestVhost::create().unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let listener = Runner::with_state(config(&vhost, "listener", "async"), tx)
        .context(RunnerContext::new(2).route(Route::new(EventListener::new("src", "ping"), "sink", sink)))
        .start()
        .await
        .unwrap();
    for n in 0..5 {
        let src = client(&vhost, "src").await;
        // The dispatch is polled first: its Emit reaches the driver before the Shutdown.
        let (sent, stopped) =
            timeout(WAIT, async { tokio::join!(src.producer().dispatch("ping", &json!(n)), src.stop()) })
                .await
                .expect("dispatch and stop timed out");
        assert_eq!(stopped.unwrap().unfinished, 0);
        // The close flushed the publish: it reached the listener.
        assert_eq!(recv(&mut rx).await, json!(n));
        assert_eq!(sent, Ok(()), "round {n}: the event went out but its dispatch failed");
    }
    stop_all([listener]).await;
}

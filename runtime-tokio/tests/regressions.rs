//! Regression tests from the first review of the runtime: each pins a behaviour a reviewer found broken or untested.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use microfw_runtime_tokio::extract::{Payload, State};
use microfw_runtime_tokio::{
    Config, EventListener, MemoryHubHandle, RetryPolicy, Route, Runner, RunnerContext,
};
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

async fn until(what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[derive(Clone)]
struct St {
    tag: &'static str,
    runs: Arc<AtomicU32>,
    report: mpsc::UnboundedSender<(&'static str, u32)>,
}

async fn flaky(State(s): State<St>, Payload(_): Payload<Value>) -> Result<(), String> {
    let n = s.runs.fetch_add(1, Ordering::SeqCst) + 1;
    let _ = s.report.send((s.tag, n));
    if n == 1 { Err("first attempt fails".into()) } else { Ok(()) }
}

/// See the runtime-sync twin: the replica that published a delayed retry stops; the other
/// never learns the hub deadline, so nobody pumps the waiting queue when it expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_retry_reaches_the_surviving_replica() {
    let hub = MemoryHubHandle::new();
    let runs = Arc::new(AtomicU32::new(0));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let start = |tag| {
        let st = St { tag, runs: runs.clone(), report: tx.clone() };
        Runner::with_state(config("worker", "async"), st)
            .hub(hub.clone())
            .context(
                RunnerContext::new(1).route(
                    Route::new(EventListener::new("src", "job"), "work", flaky)
                        .retry(RetryPolicy::fixed(1, Duration::from_millis(300))),
                ),
            )
            .start()
    };
    let a = start("a").await.unwrap();
    let b = start("b").await.unwrap();
    let src = Runner::new(config("src", "async")).hub(hub.clone()).start().await.unwrap();
    src.producer().dispatch("job", &json!(1)).await.unwrap();
    let (first, n) = timeout(WAIT, rx.recv()).await.unwrap().unwrap();
    assert_eq!(n, 1);
    let waiting_name = || {
        hub.with(|h| {
            h.broker().queue_names().into_iter().find(|q| q.starts_with("microfw.retry.")).map(str::to_owned)
        })
    };
    until("the retry to be published", || waiting_name().is_some_and(|q| hub.queue_len(&q) == Some(1))).await;
    let waiting = waiting_name().unwrap();
    let survivor = if first == "a" {
        assert_eq!(a.stop().await.unwrap().unfinished, 0);
        b
    } else {
        assert_eq!(b.stop().await.unwrap().unfinished, 0);
        a
    };
    let second = timeout(WAIT, rx.recv()).await;
    assert!(
        second.is_ok(),
        "the retry never reached the surviving replica; waiting={:?} main={:?}",
        hub.queue_len(&waiting),
        hub.queue_len("evt-src-job--worker.work")
    );
    survivor.stop().await.unwrap();
    src.stop().await.unwrap();
}

async fn slow(State(gate): State<Arc<tokio::sync::Semaphore>>) -> microfw_runtime_tokio::Reply<&'static str> {
    let _p = gate.acquire().await.unwrap();
    microfw_runtime_tokio::Reply("done")
}

/// A huge per-call timeout (Duration::MAX) must not break the caller's driver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_rpc_timeout_does_not_break_the_driver() {
    let hub = MemoryHubHandle::new();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let math = Runner::with_state(config("math", "async"), gate.clone())
        .hub(hub.clone())
        .context(RunnerContext::new(2).route(Route::new(
            microfw_runtime_tokio::RpcListener::new(),
            "slow",
            slow,
        )))
        .start()
        .await
        .unwrap();
    let caller = Runner::new(config("caller", "async")).hub(hub.clone()).start().await.unwrap();
    let rpc = caller.rpc().with_timeout(Duration::MAX);
    let call = tokio::spawn(rpc.call("math", "slow", (), ()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    gate.add_permits(1);
    let r = timeout(WAIT, call).await.expect("call never resolved");
    assert_eq!(r.unwrap().unwrap(), json!("done"));
    caller.stop().await.unwrap();
    math.stop().await.unwrap();
}

async fn late_panic(State(tx): State<mpsc::UnboundedSender<Value>>, Payload(v): Payload<Value>) {
    tokio::task::yield_now().await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert!(v != json!("boom"), "boom after an await");
    let _ = tx.send(v);
}

/// The existing panic test only panics before the first await (the inline poll on the
/// driver); this one panics inside the spawned task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_panicking_after_an_await_is_a_failed_run() {
    let hub = MemoryHubHandle::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let svc = Runner::with_state(config("fragile", "async"), tx)
        .context(RunnerContext::new(1).route(Route::new(
            EventListener::new("src", "e"),
            "fragile",
            late_panic,
        )))
        .hub(hub.clone())
        .start()
        .await
        .unwrap();
    let src = Runner::new(config("src", "async")).hub(hub.clone()).start().await.unwrap();
    src.producer().dispatch("e", &json!("boom")).await.unwrap();
    src.producer().dispatch("e", &json!("fine")).await.unwrap();
    assert_eq!(timeout(WAIT, rx.recv()).await.unwrap().unwrap(), json!("fine"));
    until("dead letter", || hub.queue_len("microfw.dlq.evt-src-e--fragile.fragile") == Some(1)).await;
    src.stop().await.unwrap();
    assert_eq!(svc.stop().await.unwrap().unfinished, 0);
}

/// A call still waiting when its service stops resolves (ShuttingDown), promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_call_resolves_when_the_caller_stops() {
    let hub = MemoryHubHandle::new();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let math = Runner::with_state(config("math", "async"), gate.clone())
        .hub(hub.clone())
        .context(RunnerContext::new(2).route(Route::new(
            microfw_runtime_tokio::RpcListener::new(),
            "slow",
            slow,
        )))
        .start()
        .await
        .unwrap();
    let caller = Runner::new(config("caller", "async")).hub(hub.clone()).start().await.unwrap();
    let call = tokio::spawn(caller.rpc().call("math", "slow", (), ()));
    until("the request", || hub.with(|h| h.broker().unacked_len("rpc-math")) == Some(1)).await;
    let t0 = std::time::Instant::now();
    caller.stop().await.unwrap();
    let r = timeout(WAIT, call).await.expect("the call never resolved").unwrap();
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert!(
        matches!(
            r,
            Err(microfw_runtime_tokio::RpcError::Call(microfw_runtime_tokio::CallError::ShuttingDown))
        ),
        "{r:?}"
    );
    gate.add_permits(1);
    math.stop().await.unwrap();
    let stranded: Vec<(String, Option<usize>)> = hub.with(|h| {
        h.broker()
            .queue_names()
            .into_iter()
            .filter(|q| q.starts_with("rpc.reply-"))
            .map(|q| (q.to_owned(), h.broker().queue_len(q)))
            .collect()
    });
    eprintln!("reply queues after both stopped: {stranded:?}");
}

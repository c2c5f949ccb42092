//! Regression tests from the first review of the runtime: each pins a behaviour a reviewer found broken or untested.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use microfw_runtime_sync::extract::{Payload, State};
use microfw_runtime_sync::{
    Config, EventListener, MemoryHubHandle, RetryPolicy, Route, Runner, RunnerContext,
};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(5);

fn config(name: &str) -> Config {
    Config { service_name: Some(name.into()), shutdown_timeout: Duration::from_secs(5), ..Config::default() }
}

#[derive(Clone)]
struct St {
    tag: &'static str,
    runs: Arc<AtomicU32>,
    report: Arc<Mutex<Sender<(&'static str, u32)>>>,
}

fn flaky(State(s): State<St>, Payload(_): Payload<Value>) -> Result<(), String> {
    let n = s.runs.fetch_add(1, Ordering::SeqCst) + 1;
    let _ = s.report.lock().unwrap().send((s.tag, n));
    if n == 1 { Err("first attempt fails".into()) } else { Ok(()) }
}

fn until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Two replicas of one service share a queue. The replica that published a delayed retry
/// stops before the retry's waiting queue expires; the other replica never learns the hub's
/// deadline (only the driver that exchanged after the publish did), so nobody pumps the hub
/// and the retry is never delivered.
#[test]
fn a_delayed_retry_reaches_the_surviving_replica() {
    let hub = MemoryHubHandle::new();
    let runs = Arc::new(AtomicU32::new(0));
    let (tx, rx) = mpsc::channel();
    let report = Arc::new(Mutex::new(tx));
    let start = |tag| {
        let st = St { tag, runs: runs.clone(), report: report.clone() };
        Runner::with_state(config("worker"), st)
            .hub(hub.clone())
            .context(
                RunnerContext::new(1).route(
                    Route::blocking(EventListener::new("src", "job"), "work", flaky)
                        .retry(RetryPolicy::fixed(1, Duration::from_millis(300))),
                ),
            )
            .start()
            .unwrap()
    };
    let a = start("a");
    let b = start("b");
    hub.publish_event("src", "job", &json!(1)).unwrap();
    let (first, n) = rx.recv_timeout(WAIT).unwrap();
    assert_eq!(n, 1);
    let waiting_name = || {
        hub.with(|h| {
            h.broker().queue_names().into_iter().find(|q| q.starts_with("microfw.retry.")).map(str::to_owned)
        })
    };
    until("the retry to be published", || waiting_name().is_some_and(|q| hub.queue_len(&q) == Some(1)));
    let waiting = waiting_name().unwrap();
    let waiting = waiting.as_str();
    let survivor = if first == "a" {
        assert_eq!(a.stop().unwrap().unfinished, 0);
        b
    } else {
        assert_eq!(b.stop().unwrap().unfinished, 0);
        a
    };
    let second = rx.recv_timeout(WAIT);
    assert!(
        second.is_ok(),
        "the retry never reached the surviving replica: {:?}; waiting={:?} main={:?}",
        second,
        hub.queue_len(waiting),
        hub.queue_len("evt-src-job--worker.work")
    );
    survivor.stop().unwrap();
}

type Gate = Arc<Mutex<mpsc::Receiver<()>>>;
fn slow(State(gate): State<Gate>) -> microfw_runtime_sync::Reply<&'static str> {
    let _ = gate.lock().unwrap().recv_timeout(WAIT);
    microfw_runtime_sync::Reply("done")
}

/// A call still waiting when its service stops resolves (ShuttingDown), promptly.
#[test]
fn a_pending_call_resolves_when_the_caller_stops() {
    let hub = MemoryHubHandle::new();
    let (release, gate) = mpsc::channel();
    let gate: Gate = Arc::new(Mutex::new(gate));
    let math = Runner::with_state(config("math"), gate)
        .hub(hub.clone())
        .context(RunnerContext::new(2).route(Route::blocking(
            microfw_runtime_sync::RpcListener::new(),
            "slow",
            slow,
        )))
        .start()
        .unwrap();
    let caller = Runner::new(config("caller")).hub(hub.clone()).start().unwrap();
    let pending = caller.rpc().call_async("math", "slow", (), ()).unwrap();
    until("the request", || hub.unacked_len("rpc-math") == Some(1));
    caller.stop().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(pending.wait());
    });
    let r = rx.recv_timeout(Duration::from_secs(2)).expect("the call never resolved");
    assert!(
        matches!(r, Err(microfw_runtime_sync::RpcError::Call(microfw_runtime_sync::CallError::ShuttingDown))),
        "{r:?}"
    );
    release.send(()).unwrap();
    math.stop().unwrap();
}

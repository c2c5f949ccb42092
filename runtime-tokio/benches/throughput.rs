//! Throughput of the tokio runtime on the memory hub: events/s and sequential RPC round
//! trips/s. Run with `cargo bench -p microfw-runtime-tokio --bench throughput`.
//!
//! Environment: `BENCH_N` scales the counts (default 1 = 200,000 events, 50,000 calls);
//! `BENCH_RT=current` uses a current-thread runtime instead of the default multi-thread one
//! with 2 workers; `BENCH_ONLY=rpc|events|thread` runs one scenario once (for profiling);
//! `BENCH_METRICS=1` enables metrics (Prometheus recorder installed, `/metrics` served on a
//! free port; without it the metric handles are no-ops).
//!
//! Settings: one memory hub per measurement; no persistence, confirms are immediate (memory
//! hub); every scenario runs in a spawned task. Variants run interleaved (A B C D A B C D
//! ...), 5 repeats after a warm-up, and the median is printed with every run.
//! * `events async (preloaded)`: N events queued before the consumer starts; async worker
//!   mode, budget 256, prefetch 256; the handler decodes the payload (`IgnoredAny`) and counts.
//! * `events thread (preloaded)`: the same with a blocking handler, thread mode, budget 8
//!   (8 pool threads), prefetch 256.
//! * `events async (end to end)`: a producer service dispatches N events from 64 concurrent
//!   tasks (each awaits its confirm), the consumer as in the first variant.
//! * `rpc sequential`: one caller, one call at a time, `echo(x) -> x`, async mode, budget 256.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use microfw_core::Envelope;
use microfw_core::broker::{ExchangeKind, QueueOptions};
use microfw_runtime_tokio::extract::{Params, Payload, State};
use microfw_runtime_tokio::{
    Config, EventListener, MemoryHubHandle, Reply, Route, RpcListener, Runner, RunnerContext, WorkerMode,
};
use serde::de::IgnoredAny;
use tokio::sync::Notify;

#[derive(Clone)]
struct Counter {
    n: Arc<AtomicU64>,
    target: u64,
    done: Arc<Notify>,
}

impl Counter {
    fn new(target: u64) -> Self {
        Counter { n: Arc::new(AtomicU64::new(0)), target, done: Arc::new(Notify::new()) }
    }

    fn hit(&self) {
        if self.n.fetch_add(1, Ordering::Relaxed) + 1 == self.target {
            self.done.notify_one();
        }
    }
}

async fn tick(State(c): State<Counter>, Payload(_): Payload<IgnoredAny>) {
    c.hit();
}

fn tick_blocking(State(c): State<Counter>, Payload(_): Payload<IgnoredAny>) {
    c.hit();
}

async fn echo(Params((x,)): Params<(u64,)>) -> Reply<u64> {
    Reply(x)
}

fn config(name: &str, mode: WorkerMode) -> Config {
    let mut config = Config { service_name: Some(name.into()), worker_mode: mode, ..Config::default() };
    if std::env::var("BENCH_METRICS").is_ok_and(|v| v == "1") {
        // The Prometheus recorder installed and /metrics served (never scraped here).
        config.enable_metrics = true;
        config.metrics.host = "127.0.0.1".into();
        config.metrics.port = 0;
    }
    config
}

fn preload(hub: &MemoryHubHandle, n: u64) {
    let now = microfw_core::Instant::from_unix_nanos(
        SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos() as u64,
    );
    let queue = "evt-bench-tick--sink.tick";
    hub.with_mut(|h| {
        let b = h.broker_mut();
        b.declare_exchange("bench.events", ExchangeKind::Topic).unwrap();
        b.declare_queue(queue, QueueOptions::default()).unwrap();
        b.bind(queue, "bench.events", "tick").unwrap();
        for i in 0..n {
            let body = format!("{{\"n\":{i},\"name\":\"tick\"}}");
            b.publish(now, "bench.events", Envelope::raw("bench.events", "tick", body)).unwrap();
        }
    });
}

async fn events_preloaded(n: u64, mode: WorkerMode) -> f64 {
    let hub = MemoryHubHandle::new();
    preload(&hub, n);
    let counter = Counter::new(n);
    let route = match mode {
        WorkerMode::Async => Route::new(EventListener::new("bench", "tick"), "tick", tick),
        _ => Route::blocking(EventListener::new("bench", "tick"), "tick", tick_blocking),
    };
    let budget = if mode == WorkerMode::Async { 256 } else { 8 };
    let done = counter.done.notified();
    tokio::pin!(done);
    done.as_mut().enable();
    let start = std::time::Instant::now();
    let svc = Runner::with_state(config("sink", mode), counter.clone())
        .context(RunnerContext::new(budget).prefetch(256).route(route))
        .hub(hub.clone())
        .start()
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(120), done).await.expect("events not all handled");
    let secs = start.elapsed().as_secs_f64();
    svc.stop().await.unwrap();
    n as f64 / secs
}

async fn events_end_to_end(n: u64) -> f64 {
    let hub = MemoryHubHandle::new();
    let counter = Counter::new(n);
    let done = counter.done.notified();
    tokio::pin!(done);
    done.as_mut().enable();
    let svc = Runner::with_state(config("sink", WorkerMode::Async), counter.clone())
        .context(RunnerContext::new(256).route(Route::new(EventListener::new("bench", "tick"), "tick", tick)))
        .hub(hub.clone())
        .start()
        .await
        .unwrap();
    let src = Runner::new(config("bench", WorkerMode::Async)).hub(hub.clone()).start().await.unwrap();
    let start = std::time::Instant::now();
    let tasks = 64;
    let mut handles = Vec::new();
    for t in 0..tasks {
        let producer = src.producer();
        handles.push(tokio::spawn(async move {
            let mut i = t;
            while i < n {
                producer.dispatch("tick", &serde_json::json!({"n": i, "name": "tick"})).await.unwrap();
                i += tasks;
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    tokio::time::timeout(Duration::from_secs(120), done).await.expect("events not all handled");
    let secs = start.elapsed().as_secs_f64();
    src.stop().await.unwrap();
    svc.stop().await.unwrap();
    n as f64 / secs
}

async fn rpc_sequential(n: u64) -> f64 {
    let hub = MemoryHubHandle::new();
    let svc = Runner::new(config("calc", WorkerMode::Async))
        .context(RunnerContext::new(256).route(Route::new(RpcListener::new(), "echo", echo)))
        .hub(hub.clone())
        .start()
        .await
        .unwrap();
    let caller = Runner::new(config("caller", WorkerMode::Async)).hub(hub.clone()).start().await.unwrap();
    let rpc = caller.rpc();
    let start = std::time::Instant::now();
    for i in 0..n {
        let v = rpc.call("calc", "echo", (i,), ()).await.unwrap();
        assert_eq!(v, serde_json::json!(i));
    }
    let secs = start.elapsed().as_secs_f64();
    caller.stop().await.unwrap();
    svc.stop().await.unwrap();
    n as f64 / secs
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let scale: f64 = std::env::var("BENCH_N").ok().and_then(|s| s.parse().ok()).unwrap_or(1.0);
    let n_events = (200_000.0 * scale) as u64;
    let n_rpc = (50_000.0 * scale) as u64;
    let repeats = 5;
    let current = std::env::var("BENCH_RT").is_ok_and(|v| v == "current");
    let rt = if current {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
    };
    println!("tokio runtime: {}", if current { "current_thread" } else { "multi_thread, 2 workers" });
    let names = [
        "events async (preloaded)",
        "events thread (preloaded)",
        "events async (end to end)",
        "rpc sequential",
    ];
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    let only = std::env::var("BENCH_ONLY").ok();
    if only.as_deref() == Some("rpc") {
        let r = rt.block_on(async { tokio::spawn(rpc_sequential(n_rpc)).await.unwrap() });
        println!("rpc sequential {r:.0} /s");
        return;
    }
    if only.as_deref() == Some("thread") {
        let r = rt
            .block_on(async { tokio::spawn(events_preloaded(n_events, WorkerMode::Thread)).await.unwrap() });
        println!("events thread (preloaded) {r:.0} /s");
        return;
    }
    if only.as_deref() == Some("events") {
        let r =
            rt.block_on(async { tokio::spawn(events_preloaded(n_events, WorkerMode::Async)).await.unwrap() });
        println!("events async (preloaded) {r:.0} /s");
        return;
    }
    // Every scenario runs in a spawned task: on a worker thread, as handlers do, not on the
    // thread calling block_on (which would add a cross-thread wake-up per step).
    rt.block_on(async {
        // Warm-up.
        tokio::spawn(events_preloaded(n_events / 10, WorkerMode::Async)).await.unwrap();
        tokio::spawn(rpc_sequential(n_rpc / 10)).await.unwrap();
        for _ in 0..repeats {
            results[0].push(tokio::spawn(events_preloaded(n_events, WorkerMode::Async)).await.unwrap());
            results[1].push(tokio::spawn(events_preloaded(n_events, WorkerMode::Thread)).await.unwrap());
            results[2].push(tokio::spawn(events_end_to_end(n_events)).await.unwrap());
            results[3].push(tokio::spawn(rpc_sequential(n_rpc)).await.unwrap());
        }
    });
    for (name, r) in names.iter().zip(results) {
        let runs: Vec<String> = r.iter().map(|x| format!("{:.0}", x)).collect();
        println!("{name:<28} median {:>10.0} /s   runs [{}]", median(r.clone()), runs.join(", "));
    }
}

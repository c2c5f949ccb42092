//! Throughput of the sync runtime on the memory hub: events/s and sequential RPC round
//! trips/s. Run with `cargo bench -p microfw-runtime-sync`; `BENCH_N` scales the counts.
//!
//! Settings: one memory hub per measurement; no persistence, confirms are immediate (memory
//! hub). Variants run interleaved, 5 repeats after a warm-up, and the median is printed.
//! * `events thread (preloaded)`: N events queued before the consumer starts; thread mode,
//!   budget 8 (8 pool threads), prefetch 256; the handler decodes the payload (`IgnoredAny`)
//!   and counts.
//! * `events budget 256 (preloaded)`: the same with budget and prefetch 256 (256 threads).
//! * `events end to end`: a producer service dispatches N events from 8 threads (each
//!   dispatch blocks until confirmed), the consumer as in the first variant.
//! * `rpc sequential`: one caller thread, one call at a time, `echo(x) -> x`, budget 8.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use microfw_core::Envelope;
use microfw_core::broker::{ExchangeKind, QueueOptions};
use microfw_runtime_sync::extract::{Params, Payload, State};
use microfw_runtime_sync::{
    Config, EventListener, MemoryHubHandle, Reply, Route, RpcListener, Runner, RunnerContext,
};
use serde::de::IgnoredAny;

#[derive(Clone)]
struct Counter {
    n: Arc<AtomicU64>,
    target: u64,
    done: Arc<Mutex<SyncSender<()>>>,
}

impl Counter {
    fn new(target: u64) -> (Self, Receiver<()>) {
        let (tx, rx) = mpsc::sync_channel(1);
        (Counter { n: Arc::new(AtomicU64::new(0)), target, done: Arc::new(Mutex::new(tx)) }, rx)
    }

    fn hit(&self) {
        if self.n.fetch_add(1, Ordering::Relaxed) + 1 == self.target {
            let _ = self.done.lock().unwrap().try_send(());
        }
    }
}

fn tick(State(c): State<Counter>, Payload(_): Payload<IgnoredAny>) {
    c.hit();
}

fn echo(Params((x,)): Params<(u64,)>) -> Reply<u64> {
    Reply(x)
}

fn config(name: &str) -> Config {
    Config { service_name: Some(name.into()), ..Config::default() }
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

fn events_preloaded(n: u64, budget: u32) -> f64 {
    let hub = MemoryHubHandle::new();
    preload(&hub, n);
    let (counter, done) = Counter::new(n);
    let start = std::time::Instant::now();
    let svc = Runner::with_state(config("sink"), counter)
        .context(RunnerContext::new(budget).prefetch(256).route(Route::blocking(
            EventListener::new("bench", "tick"),
            "tick",
            tick,
        )))
        .hub(hub)
        .start()
        .unwrap();
    done.recv_timeout(Duration::from_secs(120)).expect("events not all handled");
    let secs = start.elapsed().as_secs_f64();
    svc.stop().unwrap();
    n as f64 / secs
}

fn events_end_to_end(n: u64) -> f64 {
    let hub = MemoryHubHandle::new();
    let (counter, done) = Counter::new(n);
    let svc = Runner::with_state(config("sink"), counter)
        .context(RunnerContext::new(8).prefetch(256).route(Route::blocking(
            EventListener::new("bench", "tick"),
            "tick",
            tick,
        )))
        .hub(hub.clone())
        .start()
        .unwrap();
    let src = Runner::new(config("bench")).hub(hub).start().unwrap();
    let start = std::time::Instant::now();
    let threads = 8;
    std::thread::scope(|s| {
        for t in 0..threads {
            let producer = src.producer();
            s.spawn(move || {
                let mut i = t;
                while i < n {
                    producer.dispatch("tick", &serde_json::json!({"n": i, "name": "tick"})).unwrap();
                    i += threads;
                }
            });
        }
    });
    done.recv_timeout(Duration::from_secs(120)).expect("events not all handled");
    let secs = start.elapsed().as_secs_f64();
    src.stop().unwrap();
    svc.stop().unwrap();
    n as f64 / secs
}

fn rpc_sequential(n: u64) -> f64 {
    let hub = MemoryHubHandle::new();
    let svc = Runner::new(config("calc"))
        .context(RunnerContext::new(8).route(Route::blocking(RpcListener::new(), "echo", echo)))
        .hub(hub.clone())
        .start()
        .unwrap();
    let caller = Runner::new(config("caller")).hub(hub).start().unwrap();
    let rpc = caller.rpc();
    let start = std::time::Instant::now();
    for i in 0..n {
        let v = rpc.call("calc", "echo", (i,), ()).unwrap();
        assert_eq!(v, serde_json::json!(i));
    }
    let secs = start.elapsed().as_secs_f64();
    caller.stop().unwrap();
    svc.stop().unwrap();
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
    let names =
        ["events thread (preloaded)", "events budget 256 (preloaded)", "events end to end", "rpc sequential"];
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let run = |i: usize| names[i].contains(only.as_str());
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    // Warm-up.
    if (0..3).any(run) {
        events_preloaded(n_events / 10, 8);
    }
    if run(3) {
        rpc_sequential(n_rpc / 10);
    }
    for _ in 0..repeats {
        if run(0) {
            results[0].push(events_preloaded(n_events, 8));
        }
        if run(1) {
            results[1].push(events_preloaded(n_events, 256));
        }
        if run(2) {
            results[2].push(events_end_to_end(n_events));
        }
        if run(3) {
            results[3].push(rpc_sequential(n_rpc));
        }
    }
    for (name, r) in names.iter().zip(results).filter(|(_, r)| !r.is_empty()) {
        let runs: Vec<String> = r.iter().map(|x| format!("{x:.0}")).collect();
        println!("{name:<30} median {:>10.0} /s   runs [{}]", median(r.clone()), runs.join(", "));
    }
}

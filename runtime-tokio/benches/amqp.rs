//! microfw on RabbitMQ against raw lapin doing the same work, in the same run.
//!
//! Run: `cargo bench -p microfw-runtime-tokio --bench amqp`. Needs RabbitMQ at 127.0.0.1:5672
//! and `rabbitmqctl` (one vhost of its own, deleted at the end).
//!
//! Environment knobs:
//! * `BENCH_N` events per run (default 200 000), `BENCH_CALLS` RPC calls per 64-in-flight run
//!   (default 50 000), `BENCH_SEQ` sequential calls per run (default 3 000), `BENCH_REPEATS`
//!   (default 3);
//! * `BENCH_ONLY=events|rpc` runs one scenario (`rpc` is both RPC measurements);
//!   `BENCH_SIDE=raw|microfw` runs one side only (for profiling).
//!
//! Workloads (both sides on one tokio multi-thread runtime with 2 workers, every variant in a
//! spawned task; body: a ~100-byte JSON `Order`, encoded with serde per message by the sender
//! and decoded into the struct by the receiver):
//! * events end to end: N persistent events (delivery mode 2, durable topic exchange, durable
//!   queue) published with publisher confirms, at most 4096 unconfirmed, consumed with prefetch
//!   256 and acked after handling; publisher and consumer on separate connections, running at
//!   once; timed from the first publish to the last confirm and the last handled event,
//!   whichever is later.
//!   * raw: one confirm channel, publishes written 256 at a time (`join_all`) with their
//!     confirms collected concurrently (`FuturesUnordered`); the consumer decodes each body and
//!     acks with `multiple` every 64 deliveries, and when nothing more came for 2 ms.
//!   * microfw: a producer service's `Producer::dispatch` futures, 4096 in flight; a
//!     consumer service with an async `EventListener` handler taking `Payload<Order>`, async
//!     worker mode, budget 256 (so prefetch 256).
//! * RPC, Nameko dialect (`nameko-rpc` exchange, persistent mandatory requests with
//!   `reply_to`, `correlation_id` and a 30 s `expiration`, on a confirm channel; the reply
//!   published on `nameko-rpc` to `reply_to`, confirmed, and only then the request acked;
//!   replies acked by the caller): `total(order) -> amount_cents * items`, budget and
//!   prefetch 256 on the server, no prefetch limit on the reply queue (microfw's default).
//!   * 64 in flight: 64 caller tasks, each making calls one after another, M calls in all.
//!   * sequential: one caller, one call at a time (after 200 warm-up calls); p50 and p99 of
//!     the round trip.
//!   * raw server: a task spawned per request (decode, reply, await the reply's confirm, ack
//!     the request). Raw client: one confirm channel for requests, a reply queue consumed on
//!     its own channel, a correlation map (correlation id -> oneshot) filled by the reply
//!     consumer, which acks with `multiple` every 64 replies and when nothing more came for 2 ms.
//!   * microfw: a service with an `RpcListener` route (async handler, `Params<(Order,)>`,
//!     `Reply<u64>`) and a caller service's `RpcProxy::call`.
//!
//! Variants run interleaved A B B A A B per scenario (raw first in even rounds), and the
//! medians and ratios are printed with every run, the load average and the CPU time this
//! process and the broker used per message.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind};
use microfw_core::config::AmqpUri;
use microfw_runtime_tokio::extract::{Params, Payload, State};
use microfw_runtime_tokio::{
    Config, EventListener, Reply, Route, RpcListener, Runner, RunnerContext, RunningService, WorkerMode,
};
use microfw_tests::TestVhost;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{Notify, oneshot};

const WINDOW: usize = 4096;
const PREFETCH: u16 = 256;
const BUDGET: u32 = 256;
const ACK_EVERY: u64 = 64;
/// How long a raw consumer waits for more deliveries before acking what it handled (the
/// lapin link holds settlements back at most as long).
const ACK_IDLE: Duration = Duration::from_millis(2);
const PUBLISH_BATCH: usize = 256;
const IN_FLIGHT: usize = 64;
const WARM_UP_CALLS: usize = 200;
const RPC_TIMEOUT_MS: u64 = 30_000;
const LIMIT: Duration = Duration::from_secs(300);

/// The payload of every message: 100-102 bytes of JSON.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Order {
    order_id: u64,
    customer: String,
    amount_cents: u64,
    currency: String,
    items: Vec<u32>,
}

fn order(i: u64) -> Order {
    Order {
        order_id: 100_000 + i % 900_000,
        customer: "ada@example.com".into(),
        amount_cents: 4200,
        currency: "EUR".into(),
        items: vec![1, 2, 3],
    }
}

fn total(o: &Order) -> u64 {
    o.amount_cents * o.items.len() as u64
}

struct Settings {
    events: usize,
    calls: usize,
    sequential: usize,
    repeats: usize,
    only: String,
    side: String,
}

impl Settings {
    fn from_env() -> Self {
        let num = |key: &str, default: usize| {
            std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
        };
        Settings {
            events: num("BENCH_N", 200_000),
            calls: num("BENCH_CALLS", 50_000),
            sequential: num("BENCH_SEQ", 3_000),
            repeats: num("BENCH_REPEATS", 3).max(1),
            only: std::env::var("BENCH_ONLY").unwrap_or_default(),
            side: std::env::var("BENCH_SIDE").unwrap_or_default(),
        }
    }

    fn runs(&self, scenario: &str) -> bool {
        self.only.is_empty() || self.only == scenario
    }

    /// The sides to run in `round`, in order (A B B A ...).
    fn sides(&self, round: usize) -> Vec<Side> {
        match self.side.as_str() {
            "raw" => vec![Side::Raw],
            "microfw" => vec![Side::Microfw],
            _ if round.is_multiple_of(2) => vec![Side::Raw, Side::Microfw],
            _ => vec![Side::Microfw, Side::Raw],
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Side {
    Raw,
    Microfw,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Raw => "raw lapin",
            Side::Microfw => "microfw",
        }
    }
}

/// CPU seconds (user + system) of this process and of the broker so far.
#[derive(Clone, Copy)]
struct Cpu {
    own: f64,
    broker: f64,
}

impl Cpu {
    fn now(broker: Option<u32>) -> Self {
        Cpu { own: cpu_seconds("self"), broker: broker.map_or(0.0, |pid| cpu_seconds(&pid.to_string())) }
    }

    /// Microseconds per operation since `self`: (this process, broker).
    fn per_op(self, broker: Option<u32>, ops: usize) -> (f64, f64) {
        let now = Cpu::now(broker);
        let per = |d: f64| d * 1e6 / ops.max(1) as f64;
        (per(now.own - self.own), per(now.broker - self.broker))
    }
}

/// User + system CPU time of process `pid` (Linux `/proc/<pid>/stat`, 100 ticks/s; 0 elsewhere).
fn cpu_seconds(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the command name (which ends with ')'): utime and stime are the 12th and 13th.
    let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) else { return 0.0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// The broker's process (`beam.smp`), to count its CPU time too.
fn broker_pid() -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
        (comm.trim() == "beam.smp").then_some(pid)
    })
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// One side's results over the repeats of one measurement.
#[derive(Default)]
struct Series {
    values: Vec<f64>,
}

impl Series {
    fn runs(&self) -> String {
        self.values.iter().map(|v| format!("{v:.0}")).collect::<Vec<_>>().join(", ")
    }
}

fn main() {
    let settings = Settings::from_env();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let vhost = TestVhost::create().expect("a RabbitMQ vhost (is RabbitMQ running?)");
    let uri = vhost.amqp_uri();
    let broker = broker_pid();
    let body_len = serde_json::to_vec(&order(0)).map(|b| b.len()).unwrap_or(0);
    println!(
        "microfw vs raw lapin on RabbitMQ; tokio multi-thread runtime, 2 workers; {} repeats, interleaved A B B A",
        settings.repeats
    );
    println!(
        "events: {} x {body_len}-byte JSON, persistent, confirms (window {WINDOW}), prefetch {PREFETCH}, \
         budget {BUDGET} (async mode); raw acks multiple every {ACK_EVERY} or after {ACK_IDLE:?} idle",
        settings.events
    );
    println!(
        "rpc: Nameko dialect, persistent mandatory requests on a confirm channel, replies confirmed \
         before the request is acked; server budget/prefetch {BUDGET}, reply queue without a prefetch \
         limit; {} calls with {IN_FLIGHT} in flight; {} sequential calls (after {WARM_UP_CALLS} warm-up) for p50/p99",
        settings.calls, settings.sequential
    );
    println!("load average at start: {}; broker pid {broker:?}", load_average());

    let mut events: HashMap<&str, Series> = HashMap::new();
    let mut concurrent: HashMap<&str, Series> = HashMap::new();
    let (mut p50s, mut p99s): (HashMap<&str, Series>, HashMap<&str, Series>) = Default::default();
    for round in 0..settings.repeats {
        if settings.runs("events") {
            for side in settings.sides(round) {
                let cpu = Cpu::now(broker);
                let uri = uri.clone();
                let n = settings.events;
                let rate = runtime.block_on(async move {
                    let run = match side {
                        Side::Raw => tokio::spawn(raw_events(uri, n, round)),
                        Side::Microfw => tokio::spawn(microfw_events(uri, n, round)),
                    };
                    run.await.expect("events run")
                });
                let (own, rabbit) = cpu.per_op(broker, n);
                println!(
                    "round {round} events      {:<9} {rate:>8.0} msg/s   cpu/msg: bench {own:5.1} us, broker {rabbit:5.1} us   load {}",
                    side.name(),
                    load_average()
                );
                events.entry(side.name()).or_default().values.push(rate);
            }
        }
        if settings.runs("rpc") {
            for side in settings.sides(round) {
                let cpu = Cpu::now(broker);
                let uri = uri.clone();
                let (calls, sequential) = (settings.calls, settings.sequential);
                let result = runtime.block_on(async move {
                    let run = match side {
                        Side::Raw => tokio::spawn(raw_rpc(uri, calls, sequential, round)),
                        Side::Microfw => tokio::spawn(microfw_rpc(uri, calls, sequential, round)),
                    };
                    run.await.expect("rpc run")
                });
                let (own, rabbit) = cpu.per_op(broker, calls + sequential + WARM_UP_CALLS);
                println!(
                    "round {round} rpc         {:<9} {:>8.0} calls/s ({IN_FLIGHT} in flight)   sequential p50 {:>6.0} us, p99 {:>6.0} us   cpu/call: bench {own:5.1} us, broker {rabbit:5.1} us   load {}",
                    side.name(),
                    result.rate,
                    result.p50.as_secs_f64() * 1e6,
                    result.p99.as_secs_f64() * 1e6,
                    load_average()
                );
                concurrent.entry(side.name()).or_default().values.push(result.rate);
                p50s.entry(side.name()).or_default().values.push(result.p50.as_secs_f64() * 1e6);
                p99s.entry(side.name()).or_default().values.push(result.p99.as_secs_f64() * 1e6);
            }
        }
    }
    drop(runtime);
    println!("load average at the end: {}", load_average());
    println!();
    println!("medians (runs in brackets):");
    let raw = Side::Raw.name();
    let mf = Side::Microfw.name();
    let report = |label: &str, unit: &str, series: &HashMap<&str, Series>, target: Option<(f64, bool)>| {
        let (Some(r), Some(m)) = (series.get(raw), series.get(mf)) else {
            for (side, s) in series {
                println!("{label:<22} {side}: {:.0} {unit} [{}]", median(&s.values), s.runs());
            }
            return;
        };
        let (rm, mm) = (median(&r.values), median(&m.values));
        let ratio = mm / rm;
        let verdict = match target {
            Some((t, higher_is_better)) => {
                let met = if higher_is_better { ratio >= t } else { ratio <= t };
                let sign = if higher_is_better { ">=" } else { "<=" };
                format!("target {sign} {t:.2}: {}", if met { "met" } else { "NOT met" })
            }
            None => String::new(),
        };
        println!(
            "{label:<22} raw {rm:>8.0} [{}]  microfw {mm:>8.0} [{}] {unit}  ratio {ratio:.2}  {verdict}",
            r.runs(),
            m.runs()
        );
    };
    report("events", "msg/s", &events, Some((0.9, true)));
    report("rpc 64 in flight", "calls/s", &concurrent, Some((0.85, true)));
    report("rpc sequential p50", "us", &p50s, Some((1.2, false)));
    report("rpc sequential p99", "us", &p99s, None);
}

// ---- events ----------------------------------------------------------------------------------

async fn raw_events(uri: String, events: usize, round: usize) -> f64 {
    let exchange = format!("raw{round}.events");
    let queue = format!("raw{round}-orders");
    let consumer_conn = Connection::connect(&uri, ConnectionProperties::default()).await.expect("connect");
    let setup = consumer_conn.create_channel().await.expect("channel");
    let durable = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
    setup
        .exchange_declare(exchange.as_str().into(), ExchangeKind::Topic, durable, FieldTable::default())
        .await
        .expect("exchange");
    let q = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    setup.queue_declare(queue.as_str().into(), q, FieldTable::default()).await.expect("queue");
    setup
        .queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            "order".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    let channel = consumer_conn.create_channel().await.expect("channel");
    channel.basic_qos(PREFETCH, BasicQosOptions::default()).await.expect("qos");
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "raw".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");

    let publisher_conn = Connection::connect(&uri, ConnectionProperties::default()).await.expect("connect");
    let publisher = publisher_conn.create_channel().await.expect("channel");
    publisher.confirm_select(ConfirmSelectOptions::default()).await.expect("confirms");

    let started = Instant::now();
    let consume = tokio::spawn(async move {
        let (mut handled, mut unacked, mut last_tag, mut sum) = (0usize, 0u64, 0u64, 0u64);
        while handled < events {
            // Ack every ACK_EVERY deliveries, and what was handled when nothing more came for
            // ACK_IDLE (a consumer does not know when its stream ends).
            let next = match consumer.next().now_or_never() {
                Some(next) => next,
                None if unacked == 0 => consumer.next().await,
                None => match tokio::time::timeout(ACK_IDLE, consumer.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        channel.basic_ack(last_tag, BasicAckOptions { multiple: true }).await.expect("ack");
                        unacked = 0;
                        consumer.next().await
                    }
                },
            };
            let Some(Ok(delivery)) = next else { break };
            let order: Order = serde_json::from_slice(&delivery.data).expect("an order");
            sum += total(&order);
            handled += 1;
            unacked += 1;
            last_tag = delivery.delivery_tag;
            if unacked >= ACK_EVERY {
                channel.basic_ack(last_tag, BasicAckOptions { multiple: true }).await.expect("ack");
                unacked = 0;
            }
        }
        if unacked > 0 {
            channel.basic_ack(last_tag, BasicAckOptions { multiple: true }).await.expect("ack");
        }
        (handled, sum)
    });
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("utf-8".into())
        .with_delivery_mode(2)
        .with_priority(0)
        .with_headers(FieldTable::default());
    let mut confirms = FuturesUnordered::new();
    let (mut sent, mut nacked) = (0usize, 0usize);
    while sent < events {
        while confirms.len() + PUBLISH_BATCH > WINDOW {
            if !matches!(confirms.next().await, Some(Ok(Confirmation::Ack(None)))) {
                nacked += 1;
            }
        }
        // Encode a batch, write it concurrently, then collect its confirms concurrently.
        let batch = PUBLISH_BATCH.min(events - sent);
        let bodies: Vec<Vec<u8>> =
            (sent..sent + batch).map(|i| serde_json::to_vec(&order(i as u64)).expect("encode")).collect();
        let writes = bodies.iter().map(|body| {
            publisher.basic_publish(
                exchange.as_str().into(),
                "order".into(),
                BasicPublishOptions::default(),
                body,
                properties.clone(),
            )
        });
        for confirm in futures_util::future::join_all(writes).await {
            confirms.push(confirm.expect("publish"));
        }
        sent += batch;
    }
    while let Some(result) = confirms.next().await {
        if !matches!(result, Ok(Confirmation::Ack(None))) {
            nacked += 1;
        }
    }
    let (handled, _) =
        tokio::time::timeout(LIMIT, consume).await.expect("consumer finished").expect("consumer");
    let elapsed = started.elapsed();
    assert_eq!((handled, nacked), (events, 0));
    let _ = publisher_conn.close(200, "OK".into()).await;
    let _ = consumer_conn.close(200, "OK".into()).await;
    events as f64 / elapsed.as_secs_f64()
}

#[derive(Clone)]
struct Counter {
    handled: Arc<AtomicU64>,
    sum: Arc<AtomicU64>,
    target: u64,
    done: Arc<Notify>,
}

async fn on_order(State(counter): State<Counter>, Payload(order): Payload<Order>) {
    counter.sum.fetch_add(total(&order), Ordering::Relaxed);
    if counter.handled.fetch_add(1, Ordering::Relaxed) + 1 == counter.target {
        counter.done.notify_one();
    }
}

fn config(uri: &str, name: &str) -> Config {
    Config {
        service_name: Some(name.into()),
        worker_mode: WorkerMode::Async,
        amqp_uri: Some(AmqpUri::new(uri).expect("uri")),
        shutdown_timeout: Duration::from_secs(10),
        ..Config::default()
    }
}

async fn stop(service: RunningService) {
    let report = tokio::time::timeout(LIMIT, service.stop()).await.expect("stop in time").expect("stop");
    assert_eq!(report.unfinished, 0);
}

async fn microfw_events(uri: String, events: usize, round: usize) -> f64 {
    let source = format!("src{round}");
    let counter = Counter {
        handled: Arc::default(),
        sum: Arc::default(),
        target: events as u64,
        done: Arc::new(Notify::new()),
    };
    let route = Route::new(EventListener::new(source.as_str(), "order"), "on_order", on_order);
    let sink = Runner::with_state(config(&uri, &format!("sink{round}")), counter.clone())
        .context(RunnerContext::new(BUDGET).route(route))
        .start()
        .await
        .expect("sink");
    let src = Runner::new(config(&uri, &source)).start().await.expect("source");
    let producer = src.producer();
    let done = counter.done.notified();
    tokio::pin!(done);
    done.as_mut().enable();

    let started = Instant::now();
    let mut confirms = FuturesUnordered::new();
    let mut failed = 0usize;
    for i in 0..events {
        if confirms.len() >= WINDOW && !matches!(confirms.next().await, Some(Ok(()))) {
            failed += 1;
        }
        confirms.push(producer.dispatch("order", &order(i as u64)));
    }
    while let Some(result) = confirms.next().await {
        if result.is_err() {
            failed += 1;
        }
    }
    tokio::time::timeout(LIMIT, done).await.expect("every event handled");
    let elapsed = started.elapsed();
    assert_eq!(failed, 0);
    stop(src).await;
    stop(sink).await;
    events as f64 / elapsed.as_secs_f64()
}

// ---- RPC -------------------------------------------------------------------------------------

struct RpcResult {
    rate: f64,
    p50: Duration,
    p99: Duration,
}

/// Runs the 64-in-flight and the sequential measurements with `call`.
async fn measure<F, Fut>(call: F, calls: usize, sequential: usize) -> RpcResult
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = u64> + Send,
{
    for i in 0..WARM_UP_CALLS as u64 {
        assert_eq!(call(i).await, total(&order(i)));
    }
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..IN_FLIGHT {
        let (call, next) = (call.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= calls as u64 {
                    break;
                }
                assert_eq!(call(i).await, total(&order(i)));
            }
        }));
    }
    for task in tasks {
        tokio::time::timeout(LIMIT, task).await.expect("calls in time").expect("caller task");
    }
    let rate = calls as f64 / started.elapsed().as_secs_f64();
    let mut latencies = Vec::with_capacity(sequential);
    for i in 0..sequential as u64 {
        let t = Instant::now();
        assert_eq!(call(i).await, total(&order(i)));
        latencies.push(t.elapsed());
    }
    latencies.sort_unstable();
    RpcResult { rate, p50: percentile(&latencies, 0.50), p99: percentile(&latencies, 0.99) }
}

async fn microfw_total(Params((order,)): Params<(Order,)>) -> Reply<u64> {
    Reply(total(&order))
}

async fn microfw_rpc(uri: String, calls: usize, sequential: usize, round: usize) -> RpcResult {
    let service = format!("calc{round}");
    let server = Runner::new(config(&uri, &service))
        .context(RunnerContext::new(BUDGET).route(Route::new(RpcListener::new(), "total", microfw_total)))
        .start()
        .await
        .expect("server");
    let caller = Runner::new(config(&uri, &format!("caller{round}"))).start().await.expect("caller");
    let rpc = caller.rpc();
    let service: Arc<str> = service.into();
    let call = move |i: u64| {
        // `call`'s future borrows nothing, but its opaque type names the borrows of `rpc` and
        // `service` (edition 2024 capture rules): call inside the block, on clones.
        let (rpc, service) = (rpc.clone(), service.clone());
        async move {
            match rpc.call(&service, "total", (order(i),), ()).await.expect("a reply") {
                Value::Number(n) => n.as_u64().expect("u64"),
                other => panic!("unexpected reply {other}"),
            }
        }
    };
    let result = measure(call, calls, sequential).await;
    stop(caller).await;
    stop(server).await;
    result
}

#[derive(Deserialize)]
struct RawRequest {
    args: (Order,),
    #[allow(dead_code)]
    kwargs: serde_json::Map<String, Value>,
}

#[derive(Serialize)]
struct RawRequestOut<'a> {
    args: (&'a Order,),
    kwargs: serde_json::Map<String, Value>,
}

#[derive(Serialize)]
struct RawReplyOut {
    result: u64,
    error: Option<Value>,
}

#[derive(Deserialize)]
struct RawReply {
    result: Value,
    error: Value,
}

fn json_properties() -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("utf-8".into())
        .with_delivery_mode(2)
        .with_priority(0)
        .with_headers(FieldTable::default())
}

async fn declare_rpc_exchange(channel: &Channel) {
    let durable = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
    channel
        .exchange_declare("nameko-rpc".into(), ExchangeKind::Topic, durable, FieldTable::default())
        .await
        .expect("rpc exchange");
}

/// The raw server: consumes `rpc-<service>`, a task per request.
async fn raw_server(conn: &Connection, service: &str) {
    let setup = conn.create_channel().await.expect("channel");
    declare_rpc_exchange(&setup).await;
    let queue = format!("rpc-{service}");
    let q = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    setup.queue_declare(queue.as_str().into(), q, FieldTable::default()).await.expect("queue");
    setup
        .queue_bind(
            queue.as_str().into(),
            "nameko-rpc".into(),
            format!("{service}.*").as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    let consume = conn.create_channel().await.expect("channel");
    consume.basic_qos(PREFETCH, BasicQosOptions::default()).await.expect("qos");
    let mut consumer = consume
        .basic_consume(
            queue.as_str().into(),
            "server".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let replies = conn.create_channel().await.expect("channel");
    replies.confirm_select(ConfirmSelectOptions::default()).await.expect("confirms");
    tokio::spawn(async move {
        while let Some(Ok(delivery)) = consumer.next().await {
            let replies = replies.clone();
            tokio::spawn(async move {
                let request: RawRequest = serde_json::from_slice(&delivery.data).expect("a request");
                let body = serde_json::to_vec(&RawReplyOut { result: total(&request.args.0), error: None })
                    .expect("encode");
                let (Some(reply_to), Some(correlation)) =
                    (delivery.properties.reply_to(), delivery.properties.correlation_id())
                else {
                    panic!("a request without reply_to or correlation_id");
                };
                let properties = json_properties().with_correlation_id(correlation.clone());
                let confirm = replies
                    .basic_publish(
                        "nameko-rpc".into(),
                        reply_to.clone(),
                        BasicPublishOptions::default(),
                        &body,
                        properties,
                    )
                    .await;
                // Acked once the reply is confirmed. Publishing or confirming fails only when
                // the bench closes the connection after its last call (the caller checks every
                // reply it waits for).
                let Ok(confirm) = confirm else { return };
                if let Ok(Confirmation::Ack(None)) = confirm.await {
                    let _ = delivery.acker.ack(BasicAckOptions::default()).await;
                }
            });
        }
    });
}

type Waiters = Arc<Mutex<HashMap<String, oneshot::Sender<Vec<u8>>>>>;

/// The raw client: a reply queue consumed into a correlation map, requests on a confirm channel.
#[derive(Clone)]
struct RawClient {
    requests: Channel,
    reply_to: Arc<str>,
    waiters: Waiters,
    next: Arc<AtomicU64>,
    routing_key: Arc<str>,
}

impl RawClient {
    async fn start(conn: &Connection, name: &str, service: &str, round: usize) -> Self {
        let setup = conn.create_channel().await.expect("channel");
        declare_rpc_exchange(&setup).await;
        let reply_to = format!("{:08x}-{round}", std::process::id());
        let queue = format!("rpc.reply-{name}-{reply_to}");
        let mut arguments = FieldTable::default();
        arguments.insert("x-expires".into(), lapin::types::AMQPValue::LongLongInt(300_000));
        let q = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
        setup.queue_declare(queue.as_str().into(), q, arguments).await.expect("reply queue");
        setup
            .queue_bind(
                queue.as_str().into(),
                "nameko-rpc".into(),
                reply_to.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind");
        // No basic.qos: no prefetch limit, as microfw's reply queue.
        let consume = conn.create_channel().await.expect("channel");
        let mut consumer = consume
            .basic_consume(
                queue.as_str().into(),
                "replies".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let waiters = Waiters::default();
        let map = waiters.clone();
        tokio::spawn(async move {
            let (mut unacked, mut last_tag) = (0u64, 0u64);
            loop {
                let next = match consumer.next().now_or_never() {
                    Some(next) => next,
                    None if unacked == 0 => consumer.next().await,
                    None => match tokio::time::timeout(ACK_IDLE, consumer.next()).await {
                        Ok(next) => next,
                        Err(_) => {
                            let _ = consume.basic_ack(last_tag, BasicAckOptions { multiple: true }).await;
                            unacked = 0;
                            consumer.next().await
                        }
                    },
                };
                let Some(Ok(delivery)) = next else { break };
                let waiter = delivery
                    .properties
                    .correlation_id()
                    .as_ref()
                    .and_then(|id| map.lock().expect("waiters").remove(id.as_str()));
                if let Some(waiter) = waiter {
                    let _ = waiter.send(delivery.data);
                }
                unacked += 1;
                last_tag = delivery.delivery_tag;
                if unacked >= ACK_EVERY {
                    let _ = consume.basic_ack(last_tag, BasicAckOptions { multiple: true }).await;
                    unacked = 0;
                }
            }
        });
        let requests = conn.create_channel().await.expect("channel");
        requests.confirm_select(ConfirmSelectOptions::default()).await.expect("confirms");
        RawClient {
            requests,
            reply_to: reply_to.into(),
            waiters,
            next: Arc::default(),
            routing_key: format!("{service}.total").into(),
        }
    }

    async fn call(&self, order: &Order) -> u64 {
        let body = serde_json::to_vec(&RawRequestOut { args: (order,), kwargs: serde_json::Map::new() })
            .expect("encode");
        let correlation = format!("{}", self.next.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = oneshot::channel();
        self.waiters.lock().expect("waiters").insert(correlation.clone(), tx);
        let properties = json_properties()
            .with_reply_to(self.reply_to.as_ref().into())
            .with_correlation_id(correlation.as_str().into())
            .with_expiration(RPC_TIMEOUT_MS.to_string().as_str().into());
        let confirm = self
            .requests
            .basic_publish(
                "nameko-rpc".into(),
                self.routing_key.as_ref().into(),
                BasicPublishOptions { mandatory: true, immediate: false },
                &body,
                properties,
            )
            .await
            .expect("publish request");
        let (confirmed, reply) = tokio::join!(confirm, tokio::time::timeout(LIMIT, rx));
        assert!(matches!(confirmed, Ok(Confirmation::Ack(None))), "request not confirmed or returned");
        let reply: RawReply =
            serde_json::from_slice(&reply.expect("reply in time").expect("a reply")).expect("a reply body");
        assert!(reply.error.is_null(), "remote error {}", reply.error);
        reply.result.as_u64().expect("u64")
    }
}

async fn raw_rpc(uri: String, calls: usize, sequential: usize, round: usize) -> RpcResult {
    let service = format!("rawcalc{round}");
    let server_conn = Connection::connect(&uri, ConnectionProperties::default()).await.expect("connect");
    raw_server(&server_conn, &service).await;
    let client_conn = Connection::connect(&uri, ConnectionProperties::default()).await.expect("connect");
    let client = RawClient::start(&client_conn, &format!("rawcaller{round}"), &service, round).await;
    let call = move |i: u64| {
        let client = client.clone();
        async move { client.call(&order(i)).await }
    };
    let result = measure(call, calls, sequential).await;
    let _ = client_conn.close(200, "OK".into()).await;
    let _ = server_conn.close(200, "OK".into()).await;
    result
}

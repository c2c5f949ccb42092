//! Event throughput through RabbitMQ: raw lapin (the best technique we know) against the
//! lapin link driven by real core Engines, interleaved in one run.
//!
//! Each variant publishes `BENCH_EVENTS` (default 200 000) persistent ~100-byte JSON events
//! with publisher confirms (at most 4096 unconfirmed) and consumes them with acks, prefetch
//! 256, publisher and consumer running at the same time on separate connections. The time is
//! from the first publish to the last delivery handled.
//!
//! * raw: one confirm channel, publishes written 256 at a time (`join_all`) with their
//!   confirms collected concurrently; the consumer acks with `multiple` every 64 deliveries (and at the end).
//! * link: an emitter Engine (`handle_emit`) over one link, a listener Engine (one event
//!   route, budget 256, so prefetch 256) over another; each dispatch is answered `Success`
//!   at once by the bench's driver (no handler code runs: this is the transport plus Engine
//!   cost). The drivers are what a runtime does: drain actions, exchange with the link when
//!   woken, feed deliveries and confirms back.
//!
//! Run: `cargo bench -p microfw-transport-amqp --features tokio --bench lapin_events`
//! (`BENCH_EVENTS`, `BENCH_REPEATS` (default 3) override the sizes; `BENCH_ONLY=raw|link`
//! runs one variant, for profiling). Needs RabbitMQ at
//! 127.0.0.1:5672 and `rabbitmqctl` (a vhost of its own is created and deleted).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties, ExchangeKind};
use microfw_core::config::{AmqpUri, Config};
use microfw_core::link::{Arrivals, ConnectAsync, LinkSpec, LinkWaker, Links};
use microfw_core::{
    Action, Dialect, Engine, EngineConfig, EventListener, Instant, Outcome, OutgoingEvent, Route,
    RunnerContext, Service, Transport,
};
use microfw_tests::TestVhost;
use microfw_transport_amqp::AmqpConnector;
use tokio::sync::Notify;

const WINDOW: usize = 4096;
const PREFETCH: u16 = 256;
const ACK_EVERY: u64 = 64;
const PUBLISH_BATCH: usize = 256;
const LIMIT: Duration = Duration::from_secs(300);

fn main() {
    let events: usize = std::env::var("BENCH_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000);
    let repeats: usize = std::env::var("BENCH_REPEATS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let vhost = TestVhost::create().expect("a RabbitMQ vhost (is RabbitMQ running?)");
    let uri = vhost.amqp_uri();
    let body = payload();
    println!(
        "{events} events of {} bytes, persistent, confirms (window {WINDOW}), prefetch {PREFETCH}, {repeats} repeats",
        body.len()
    );
    // `BENCH_ONLY=link` (or `raw`) runs one variant, for profiling.
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    if only == "link" || only == "raw" {
        for round in 0..repeats {
            let rate = match only.as_str() {
                "raw" => runtime.block_on(raw_lapin(&uri, events, &body, round)),
                _ => runtime.block_on(through_link(&uri, events, &body, round)),
            };
            println!("round {round}: {only} {rate:.0} msg/s");
        }
        return;
    }
    let (mut raws, mut links) = (Vec::new(), Vec::new());
    for round in 0..repeats {
        let cpu = cpu_seconds();
        let raw = runtime.block_on(raw_lapin(&uri, events, &body, round));
        let raw_cpu = (cpu_seconds() - cpu) * 1e6 / events as f64;
        println!("round {round}: raw lapin      {raw:>9.0} msg/s  {raw_cpu:5.1} us CPU/msg in this process");
        raws.push(raw);
        let cpu = cpu_seconds();
        let link = runtime.block_on(through_link(&uri, events, &body, round));
        let link_cpu = (cpu_seconds() - cpu) * 1e6 / events as f64;
        println!(
            "round {round}: link + Engine  {link:>9.0} msg/s  {link_cpu:5.1} us CPU/msg in this process  ({:.2} of raw)",
            link / raw
        );
        links.push(link);
    }
    let (raw, link) = (median(&mut raws), median(&mut links));
    println!("median: raw lapin {raw:.0} msg/s, link + Engine {link:.0} msg/s, ratio {:.2}", link / raw);
}

/// User + system CPU time of this process so far (Linux `/proc/self/stat`, 100 ticks/s;
/// 0 elsewhere).
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return 0.0 };
    // Fields after the command name (which ends with ')'): utime and stime are the 12th and 13th.
    let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) else { return 0.0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// A ~100-byte JSON event body.
fn payload() -> Vec<u8> {
    let mut body = br#"{"order_id": 1234567, "status": "shipped", "carrier": "acme", "note": ""#.to_vec();
    while body.len() < 98 {
        body.push(b'x');
    }
    body.extend_from_slice(br#""}"#);
    body
}

async fn raw_lapin(uri: &str, events: usize, body: &[u8], round: usize) -> f64 {
    let exchange = format!("raw{round}.events");
    let queue = format!("raw{round}-q");
    let consumer_conn = Connection::connect(uri, ConnectionProperties::default()).await.expect("connect");
    let setup = consumer_conn.create_channel().await.expect("channel");
    let durable = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
    setup
        .exchange_declare(exchange.as_str().into(), ExchangeKind::Topic, durable, FieldTable::default())
        .await
        .unwrap();
    let q = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    setup.queue_declare(queue.as_str().into(), q, FieldTable::default()).await.unwrap();
    setup
        .queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            "evt".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let channel = consumer_conn.create_channel().await.unwrap();
    channel.basic_qos(PREFETCH, BasicQosOptions::default()).await.unwrap();
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "raw".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    let publisher_conn = Connection::connect(uri, ConnectionProperties::default()).await.expect("connect");
    let publisher = publisher_conn.create_channel().await.unwrap();
    publisher.confirm_select(ConfirmSelectOptions::default()).await.unwrap();

    let started = std::time::Instant::now();
    let consume = tokio::spawn(async move {
        let mut received = 0u64;
        while let Some(Ok(delivery)) = consumer.next().await {
            received += 1;
            if received.is_multiple_of(ACK_EVERY) || received == events as u64 {
                channel.basic_ack(delivery.delivery_tag, BasicAckOptions { multiple: true }).await.unwrap();
            }
            if received == events as u64 {
                break;
            }
        }
        received
    });
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("utf-8".into())
        .with_delivery_mode(2)
        .with_priority(0)
        .with_headers(FieldTable::default());
    let mut confirms = FuturesUnordered::new();
    let mut nacked = 0;
    let mut sent = 0;
    while sent < events {
        while confirms.len() + PUBLISH_BATCH > WINDOW {
            if !matches!(confirms.next().await, Some(Ok(Confirmation::Ack(None)))) {
                nacked += 1;
            }
        }
        // Write a batch of publishes concurrently, then collect their confirms concurrently.
        let batch = PUBLISH_BATCH.min(events - sent);
        let writes = (0..batch).map(|_| {
            publisher.basic_publish(
                exchange.as_str().into(),
                "evt".into(),
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
    let received = tokio::time::timeout(LIMIT, consume).await.expect("consumer finished").unwrap();
    let elapsed = started.elapsed();
    assert_eq!((received, nacked), (events as u64, 0));
    let _ = publisher_conn.close(200, "OK".into()).await;
    let _ = consumer_conn.close(200, "OK".into()).await;
    events as f64 / elapsed.as_secs_f64()
}

fn now() -> Instant {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    Instant::from_unix_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// An Engine over one lapin link, driven the way a runtime drives it.
struct Driver {
    engine: Engine,
    links: Links,
    waker: LinkWaker,
    notify: Arc<Notify>,
    arrivals: Arrivals,
}

impl Driver {
    async fn start(service: Service<()>, uri: &str, seed: u64) -> Driver {
        let (spec, _) = service.build().expect("service");
        let config = Config { amqp_uri: Some(AmqpUri::new(uri).expect("uri")), ..Config::default() };
        let notify = Arc::new(Notify::new());
        let n = notify.clone();
        let waker = LinkWaker::new(move || n.notify_one());
        let link_spec = LinkSpec { service: spec.name.to_string(), transport: Transport::Broker, config };
        let link = Box::new(AmqpConnector::new()).connect(link_spec, waker.clone()).await.expect("link");
        let mut links = Links::new();
        links.add(&[Transport::Broker], link);
        let mut engine = Engine::new(&spec, EngineConfig { seed, ..EngineConfig::default() });
        engine.handle_start(now());
        let mut driver = Driver { engine, links, waker, notify, arrivals: Arrivals::default() };
        driver.pump(&mut |_| {});
        let barriers = driver.links.barriers();
        tokio::task::spawn_blocking(move || barriers.into_iter().try_for_each(|b| b.wait(LIMIT)))
            .await
            .unwrap()
            .expect("barrier");
        driver
    }

    /// One turn: drain actions (answering dispatches with Success), exchange, feed.
    fn pump(&mut self, on_action: &mut impl FnMut(&Action)) {
        loop {
            let now = now();
            let mut moved = false;
            while let Some(action) = self.engine.poll_action() {
                moved = true;
                if let Some(other) = self.links.route(action, &mut self.arrivals) {
                    on_action(&other);
                    if let Action::Dispatch(d) = other {
                        self.engine.handle_outcome(now, d.id, Outcome::Success(None));
                    }
                }
            }
            self.waker.take();
            self.links.exchange(now, true, &mut self.arrivals);
            moved |= self.arrivals.feed(&mut self.engine, now);
            if !moved {
                return;
            }
        }
    }

    async fn close(mut self) {
        let mut links = std::mem::take(&mut self.links);
        tokio::task::spawn_blocking(move || links.close(Duration::from_secs(10))).await.unwrap();
    }
}

async fn through_link(uri: &str, events: usize, body: &[u8], round: usize) -> f64 {
    let source = format!("src{round}");
    let listener =
        Service::new("bench").context(RunnerContext::new(u32::from(PREFETCH)).route(Route::blocking(
            EventListener::new(source.as_str(), "evt"),
            "on_evt",
            || {},
        )));
    let mut consumer = Driver::start(listener, uri, 1 + 2 * round as u64).await;
    let mut producer = Driver::start(Service::new(source.as_str()), uri, 2 + 2 * round as u64).await;
    let body = bytes::Bytes::copy_from_slice(body);

    let started = std::time::Instant::now();
    let consume = tokio::spawn(async move {
        let mut handled = 0usize;
        let deadline = tokio::time::Instant::now() + LIMIT;
        while handled < events {
            consumer.pump(&mut |a| {
                if matches!(a, Action::Dispatch(_)) {
                    handled += 1;
                }
            });
            if handled >= events {
                break;
            }
            tokio::select! {
                _ = consumer.notify.notified() => {}
                _ = tokio::time::sleep_until(deadline) => panic!("consumer stuck at {handled}"),
            }
        }
        (handled, consumer)
    });
    let (mut sent, mut confirmed, mut failed) = (0usize, 0usize, 0usize);
    let deadline = tokio::time::Instant::now() + LIMIT;
    while confirmed + failed < events {
        while sent < events && sent - confirmed - failed < WINDOW {
            producer.engine.handle_emit(
                now(),
                OutgoingEvent {
                    context: None,
                    source_service: source.clone(),
                    event_type: "evt".into(),
                    payload: body.clone(),
                    dialect: Dialect::Nameko,
                },
            );
            sent += 1;
            if sent.is_multiple_of(256) {
                break;
            }
        }
        producer.pump(&mut |a| {
            if let Action::Emitted { result, .. } = a {
                if result.is_ok() {
                    confirmed += 1;
                } else {
                    failed += 1;
                }
            }
        });
        if sent < events && sent - confirmed - failed < WINDOW {
            tokio::task::yield_now().await;
            continue;
        }
        if confirmed + failed < events {
            tokio::select! {
                _ = producer.notify.notified() => {}
                _ = tokio::time::sleep_until(deadline) => panic!("producer stuck at {confirmed}"),
            }
        }
    }
    let (handled, consumer) = tokio::time::timeout(LIMIT, consume).await.expect("consumer finished").unwrap();
    let elapsed = started.elapsed();
    assert_eq!((handled, failed), (events, 0));
    // The last acks were handed over; closing flushes them.
    consumer.close().await;
    producer.close().await;
    events as f64 / elapsed.as_secs_f64()
}

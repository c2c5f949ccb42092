//! Persistent JSON events through RabbitMQ with publisher confirms: raw amiquip (its best
//! technique) against the amiquip link driven by a core Engine, in the same run.
//!
//! ```sh
//! cargo bench -p microfw-transport-amqp --features sync --bench amiquip
//! ```
//!
//! Environment: `MICROFW_BENCH_N` (events per run, default 200000), `MICROFW_BENCH_REPEATS`
//! (default 3). Needs RabbitMQ on 127.0.0.1:5672 (guest/guest) and `rabbitmqctl` (a vhost per
//! run of the binary).
//!
//! Two phases per variant, run interleaved (raw, microfw, raw, microfw...):
//! * publish: N events of 101 bytes, delivery mode 2, confirms on, at most `WINDOW` waiting
//!   for their confirm. Raw: `basic_publish` without waiting, confirms read as they come.
//!   microfw: `Engine::handle_emit` -> link -> confirm -> `Emitted`.
//! * consume: the N events drained from a durable queue, prefetch 256, each body decoded into
//!   a 5-field struct, acked. Raw: one consumer, `ack_multiple` every 64 deliveries or when
//!   the consumer runs dry. microfw: an event route (budget 256) whose handler takes
//!   `Payload<Order>`, run inline on the driver thread; acks batched by the link.

use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use amiquip::{
    AmqpProperties, Confirm, Connection, ConsumerMessage, ConsumerOptions, ExchangeDeclareOptions,
    ExchangeType, FieldTable, QueueDeclareOptions,
};
use microfw_core::config::{AmqpUri, Config};
use microfw_core::extract::Payload;
use microfw_core::link::{Connect, Link, LinkInbox, LinkOp, LinkSpec, LinkWaker};
use microfw_core::{
    Action, Dialect, Engine, EngineConfig, EventListener, Instant, OutgoingEvent, Route, RunnerContext,
    Service, Transport,
};
use microfw_tests::TestVhost;
use microfw_transport_amqp::AmqpSyncConnector;
use serde::Deserialize;

const BODY: &[u8] =
    br#"{"order_id":123456,"customer":"ada@example.com","amount_cents":4200,"currency":"EUR","items":[1,2,3]}"#;
const WINDOW: usize = 16_384;
const PREFETCH: u16 = 256;
const TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Deserialize)]
#[allow(dead_code)]
struct Order {
    order_id: u64,
    customer: String,
    amount_cents: u64,
    currency: String,
    items: Vec<u32>,
}

fn on_order(Payload(order): Payload<Order>) {
    std::hint::black_box(order);
}

fn main() {
    let n: usize = std::env::var("MICROFW_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000);
    let repeats: usize =
        std::env::var("MICROFW_BENCH_REPEATS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let vhost = TestVhost::create().expect("a RabbitMQ vhost");
    println!(
        "amiquip events: {n} x {} B persistent JSON, confirms on, window {WINDOW}, prefetch {PREFETCH}, \
         budget 256, {repeats} repeats interleaved",
        BODY.len()
    );
    let mut raw = Raw::new(&vhost);
    let mut fw = Framework::new(&vhost);
    let mut results: [Vec<f64>; 4] = Default::default();
    for round in 0..repeats {
        let raw_pub = rate(n, raw.publish(n));
        let raw_con = rate(n, raw.consume(n));
        let fw_pub = rate(n, fw.publish(n));
        let fw_con = rate(n, fw.consume(n));
        println!(
            "round {round}: raw publish {raw_pub:>8.0}/s consume {raw_con:>8.0}/s | \
             microfw publish {fw_pub:>8.0}/s consume {fw_con:>8.0}/s"
        );
        for (i, r) in [raw_pub, raw_con, fw_pub, fw_con].into_iter().enumerate() {
            results[i].push(r);
        }
    }
    let [raw_pub, raw_con, fw_pub, fw_con] = results.map(median);
    println!("median publish: raw {raw_pub:.0}/s, microfw {fw_pub:.0}/s, ratio {:.2}", fw_pub / raw_pub);
    println!("median consume: raw {raw_con:.0}/s, microfw {fw_con:.0}/s, ratio {:.2}", fw_con / raw_con);
    fw.close();
}

fn rate(n: usize, took: Duration) -> f64 {
    n as f64 / took.as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Raw amiquip: its own exchange and queue.
struct Raw {
    _conn: Connection,
    publish: amiquip::Channel,
    confirms: crossbeam_channel::Receiver<Confirm>,
    consume: amiquip::Channel,
    /// Publishes on the channel so far (confirm tags continue across rounds).
    published: u64,
}

impl Raw {
    fn new(vhost: &TestVhost) -> Raw {
        let mut conn = Connection::insecure_open(&vhost.amqp_uri()).expect("connect");
        let publish = conn.open_channel(None).expect("channel");
        let confirms = publish.listen_for_publisher_confirms().expect("confirms");
        publish.enable_publisher_confirms().expect("confirm mode");
        let options = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
        publish.exchange_declare(ExchangeType::Topic, "raw.events", options).expect("exchange");
        let consume = conn.open_channel(None).expect("channel");
        let queue = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
        consume.queue_declare("raw-q", queue).expect("queue");
        consume.queue_bind("raw-q", "raw.events", "evt", FieldTable::new()).expect("bind");
        Raw { _conn: conn, publish, confirms, consume, published: 0 }
    }

    fn publish(&mut self, n: usize) -> Duration {
        let started = std::time::Instant::now();
        let properties = AmqpProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("utf-8".into())
            .with_delivery_mode(2)
            .with_priority(0)
            .with_headers(FieldTable::new());
        let mut confirmed = 0u64;
        // Counts the highest tag acked: enough here, where every publish is acked (a single
        // ack above a gap would only end the wait early by the size of the gap).
        let confirm = |c: Confirm, confirmed: &mut u64| match c {
            Confirm::Ack(p) => *confirmed = (*confirmed).max(p.delivery_tag),
            Confirm::Nack(p) => panic!("nacked {p:?}"),
        };
        // Tags restart per channel at 1, and this channel keeps counting across rounds.
        let base = self.published;
        for i in 0..n as u64 {
            let publish = amiquip::Publish::with_properties(BODY, "evt", properties.clone());
            self.publish.basic_publish("raw.events", publish).expect("publish");
            while let Ok(c) = self.confirms.try_recv() {
                confirm(c, &mut confirmed);
            }
            while (base + i + 1).saturating_sub(confirmed) as usize > WINDOW {
                let c = self.confirms.recv_timeout(TIMEOUT).expect("confirm");
                confirm(c, &mut confirmed);
            }
        }
        while confirmed < base + n as u64 {
            let c = self.confirms.recv_timeout(TIMEOUT).expect("confirm");
            confirm(c, &mut confirmed);
        }
        self.published = base + n as u64;
        started.elapsed()
    }

    fn consume(&mut self, n: usize) -> Duration {
        let started = std::time::Instant::now();
        self.consume.qos(0, PREFETCH, false).expect("qos");
        let consumer = self.consume.basic_consume("raw-q", ConsumerOptions::default()).expect("consume");
        let mut got = 0;
        let mut unacked = None;
        let mut since_ack = 0;
        while got < n {
            let message = match consumer.receiver().try_recv() {
                Ok(m) => m,
                Err(_) => {
                    if let Some(d) = unacked.take() {
                        consumer.ack_multiple(d).expect("ack");
                        since_ack = 0;
                    }
                    consumer.receiver().recv_timeout(TIMEOUT).expect("delivery")
                }
            };
            let ConsumerMessage::Delivery(d) = message else { panic!("{message:?}") };
            let order: Order = serde_json::from_slice(&d.body).expect("json");
            std::hint::black_box(order);
            got += 1;
            since_ack += 1;
            unacked = Some(d);
            if since_ack == 64 {
                if let Some(d) = unacked.take() {
                    consumer.ack_multiple(d).expect("ack");
                }
                since_ack = 0;
            }
        }
        if let Some(d) = unacked.take() {
            consumer.ack_multiple(d).expect("ack");
        }
        let took = started.elapsed();
        consumer.cancel().expect("cancel");
        took
    }
}

/// The link and Engines: `src` emits, `svc` consumes (its own queue on `src.events`).
struct Framework {
    src: Node,
    svc: Node,
    wake: Receiver<()>,
}

impl Framework {
    fn new(vhost: &TestVhost) -> Framework {
        let (tx, wake) = sync_channel(1);
        let src = Node::start(Service::new("src"), vhost, &tx, 1);
        let svc = Service::new("svc").context(RunnerContext::new(256).route(Route::blocking(
            EventListener::new("src", "evt"),
            "on_order",
            on_order,
        )));
        let mut svc = Node::start(svc, vhost, &tx, 2);
        // Subscribed but held back: the consumer only runs in the consume phase.
        svc.paused = true;
        Framework { src, svc, wake }
    }

    fn publish(&mut self, n: usize) -> Duration {
        let started = std::time::Instant::now();
        let mut emitted = 0;
        let mut confirmed = 0;
        while confirmed < n {
            while emitted < n && emitted - confirmed < WINDOW {
                let event = OutgoingEvent {
                    context: None,
                    source_service: "src".into(),
                    event_type: "evt".into(),
                    payload: bytes::Bytes::from_static(BODY),
                    dialect: Dialect::Nameko,
                };
                self.src.engine.handle_emit(now(), event);
                emitted += 1;
            }
            confirmed += self.src.pump();
            if confirmed < n {
                let _ = self.wake.recv_timeout(Duration::from_millis(100));
            }
        }
        started.elapsed()
    }

    fn consume(&mut self, n: usize) -> Duration {
        self.svc.handled = 0;
        self.svc.paused = false;
        let started = std::time::Instant::now();
        // The deliveries that arrived while paused are already in the link's inbox.
        self.svc.waker.wake();
        loop {
            self.svc.pump();
            if self.svc.handled >= n && self.svc.engine.stats().running == 0 {
                break;
            }
            let _ = self.wake.recv_timeout(Duration::from_millis(100));
            assert!(started.elapsed() < TIMEOUT, "consume timed out at {}", self.svc.handled);
        }
        // Flush the last acks.
        self.svc.pump();
        let took = started.elapsed();
        self.svc.paused = true;
        took
    }

    fn close(mut self) {
        self.src.link.close(Duration::from_secs(5));
        self.svc.link.close(Duration::from_secs(5));
    }
}

struct Node {
    engine: Engine,
    table: microfw_core::HandlerTable<()>,
    link: Box<dyn Link>,
    waker: LinkWaker,
    ops: Vec<LinkOp>,
    inbox: LinkInbox,
    /// While paused, deliveries stay in the link's inbox.
    paused: bool,
    handled: usize,
}

impl Node {
    fn start(service: Service<()>, vhost: &TestVhost, wake: &SyncSender<()>, seed: u64) -> Node {
        let (spec, table) = service.build().expect("service");
        let engine = Engine::new(
            &spec,
            EngineConfig { seed: seed ^ now().as_unix_nanos(), ..EngineConfig::default() },
        );
        let config =
            Config { amqp_uri: Some(AmqpUri::new(vhost.amqp_uri()).expect("uri")), ..Config::default() };
        let link_spec = LinkSpec { service: spec.name.to_string(), transport: Transport::Broker, config };
        let tx = wake.clone();
        let waker = LinkWaker::new(move || {
            let _ = tx.try_send(());
        });
        let link = Box::new(AmqpSyncConnector::new()).connect(&link_spec, waker.clone()).expect("connect");
        let mut node = Node {
            engine,
            table,
            link,
            waker,
            ops: Vec::new(),
            inbox: LinkInbox::default(),
            paused: false,
            handled: 0,
        };
        node.engine.handle_start(now());
        node.pump();
        node.link.barrier().wait(Duration::from_secs(20)).expect("barrier");
        node
    }

    /// One driver turn until idle; returns the number of emits confirmed.
    fn pump(&mut self) -> usize {
        let mut confirmed = 0;
        loop {
            let mut progressed = false;
            let now = now();
            while let Some(action) = self.engine.poll_action() {
                progressed = true;
                match action {
                    Action::Subscribe(s) => self.ops.push(LinkOp::Subscribe(s)),
                    Action::Unsubscribe { id, .. } => self.ops.push(LinkOp::Unsubscribe(id)),
                    Action::Publish(p) => self.ops.push(LinkOp::Publish(p)),
                    Action::Ack(d) => self.ops.push(LinkOp::Ack(d.tag)),
                    Action::Reject { delivery, requeue } => {
                        self.ops.push(LinkOp::Reject(delivery.tag, requeue))
                    }
                    Action::Dispatch(d) => {
                        let outcome = self
                            .table
                            .handler(d.route)
                            .and_then(|h| h.call_blocking(d.job, ()))
                            .expect("a blocking handler");
                        self.handled += 1;
                        self.engine.handle_outcome(now, d.id, outcome);
                    }
                    Action::Emitted { result, .. } => {
                        result.expect("emit confirmed");
                        confirmed += 1;
                    }
                    _ => {}
                }
            }
            if !self.paused && (self.waker.take() || !self.ops.is_empty()) {
                self.link.exchange(now, &mut self.ops, &mut self.inbox);
                for d in self.inbox.deliveries.drain(..) {
                    self.engine.handle_delivery(now, d);
                    progressed = true;
                }
                for (id, result) in self.inbox.confirms.drain(..) {
                    self.engine.handle_publish_result(now, id, result);
                    progressed = true;
                }
            }
            if !progressed {
                return confirmed;
            }
        }
    }
}

fn now() -> Instant {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    Instant::from_unix_nanos(u64::try_from(since.as_nanos()).unwrap_or(u64::MAX))
}

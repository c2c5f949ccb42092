//! The session task: owns the connection, carries out the driver's operations in order,
//! reconnects, and closes.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Confirmation, Connection, ErrorKind, PublisherConfirm};
use microfw_core::broker::ExchangeKind;
use microfw_core::link::{BarrierOpener, LinkError, LinkOp};
use microfw_core::{Delivery, DeliveryTag, LinkId, Publish, PublishError, PublishId, Source, SubscriptionId};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::acks::{AckLedger, Frame, Settle};
use super::convert::{self, MAX_BROKER_TAG};
use super::{Setup, Shared};
use crate::decode::decode;
use crate::encode::{encode, publish_topology};
use crate::model::OutgoingMessage;
use crate::topology::{Exchange, Queue, Topology, topology};

/// How often the session looks at the connection's state when nothing else happens.
const HEALTH_TICK: Duration = Duration::from_millis(250);
/// Pause before restarting a consumer the broker cancelled (its queue was deleted...).
const CONSUMER_RESTART: Duration = Duration::from_secs(1);
/// Pause before trying again to restart a consumer that failed to restart.
const CONSUMER_RETRY: Duration = Duration::from_secs(5);
/// How long closing may take when the link is dropped without [`Link::close`].
const DROP_CLOSE: Duration = Duration::from_secs(5);
/// At most this many queued items are carried out before the session looks around again.
const MAX_BATCH: usize = 4096;

/// What the driver's side sends the session.
pub(crate) enum Command {
    /// Operations to carry out, in order.
    Ops(Vec<LinkOp>),
    /// Open once everything before it is done.
    Barrier(BarrierOpener),
    /// Flush and close, signalling `done` at the end.
    Close { timeout: Duration, done: std::sync::mpsc::SyncSender<()> },
}

/// What the session's helper tasks tell it.
enum Internal {
    /// A consumer's stream ended (cancelled by the broker, or its channel closed).
    ConsumerEnded { sub: SubscriptionId, key: u32, reason: String },
    /// Time to restart a subscription whose consumer ended.
    Restart { sub: SubscriptionId },
}

/// A handed-over item waiting to be carried out.
enum Item {
    Op(LinkOp),
    Barrier(BarrierOpener),
    Close { timeout: Duration, done: std::sync::mpsc::SyncSender<()> },
}

struct Queued {
    item: Item,
    at: Instant,
}

/// Whether the session goes on.
#[derive(PartialEq, Eq)]
enum Flow {
    Continue,
    Closed,
}

/// A subscription the driver started (and has not stopped): restored after a reconnect.
struct Sub {
    source: Arc<Source>,
    prefetch: u32,
    /// The key of the channel consuming it, while it is consuming.
    running: Option<u32>,
    consumer_tags: Vec<ShortString>,
}

/// A consumer channel: what settles its deliveries.
struct ConsumerChannel {
    channel: Channel,
    ledger: AckLedger,
}

/// The current connection and its shared channels.
struct Live {
    conn: Connection,
    declare: Channel,
    publish: Channel,
    confirms: mpsc::UnboundedSender<(PublishId, PublisherConfirm)>,
}

/// Publish confirms not yet reported.
#[derive(Default)]
struct InFlight {
    count: AtomicUsize,
    zero: Notify,
}

/// Why a publish was not sent.
enum NotSent {
    /// The connection is down: it waits for the reconnect.
    Down,
    /// It cannot be sent: confirm it as failed.
    Failed(PublishError),
}

/// Why a declaration failed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct DeclareError(String);

pub(crate) struct Session {
    setup: Arc<Setup>,
    shared: Arc<Shared>,
    commands: mpsc::UnboundedReceiver<Command>,
    internal_tx: mpsc::UnboundedSender<Internal>,
    internal: mpsc::UnboundedReceiver<Internal>,
    live: Option<Live>,
    last_key: u32,
    subs: BTreeMap<SubscriptionId, Sub>,
    /// The source of every subscription ever started (retries and dead letters name them).
    sources: HashMap<SubscriptionId, Source>,
    consumers: HashMap<u32, ConsumerChannel>,
    /// Exchanges declared on the current connection.
    declared_exchanges: HashSet<String>,
    /// Queues declared on the current connection.
    declared_queues: HashSet<String>,
    /// Exchanges that exist with other flags than ours: declared passively.
    adopted: HashSet<String>,
    /// Subscription failures since the last barrier.
    failures: Vec<String>,
    queue: VecDeque<Queued>,
    in_flight: Arc<InFlight>,
}

impl Session {
    pub(crate) fn new(
        setup: Arc<Setup>,
        shared: Arc<Shared>,
        commands: mpsc::UnboundedReceiver<Command>,
    ) -> Self {
        let (internal_tx, internal) = mpsc::unbounded_channel();
        Session {
            setup,
            shared,
            commands,
            internal_tx,
            internal,
            live: None,
            last_key: 0,
            subs: BTreeMap::new(),
            sources: HashMap::new(),
            consumers: HashMap::new(),
            declared_exchanges: HashSet::new(),
            declared_queues: HashSet::new(),
            adopted: HashSet::new(),
            failures: Vec::new(),
            queue: VecDeque::new(),
            in_flight: Arc::default(),
        }
    }

    /// The first connection: its failure is the link's.
    pub(crate) async fn connect_first(&mut self) -> Result<(), LinkError> {
        let live = connect_live(self.setup.clone(), self.shared.clone(), self.in_flight.clone())
            .await
            .map_err(|reason| LinkError::Connect { transport: self.setup.redacted.clone(), reason })?;
        self.live = Some(live);
        info!(uri = %self.setup.redacted, "AMQP link connected");
        Ok(())
    }

    /// The session's loop, until the link is closed or dropped.
    pub(crate) async fn run(mut self) {
        let mut tick = tokio::time::interval(HEALTH_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.live.is_none() {
                if self.reconnect().await == Flow::Closed {
                    return;
                }
                continue;
            }
            while let Ok(command) = self.commands.try_recv() {
                self.enqueue(command);
            }
            while let Ok(event) = self.internal.try_recv() {
                self.internal_event(event).await;
            }
            if !self.queue.is_empty() {
                if self.work().await == Flow::Closed {
                    return;
                }
                self.check_health();
                continue;
            }
            tokio::select! {
                command = self.commands.recv() => match command {
                    Some(command) => self.enqueue(command),
                    None => {
                        self.shutdown(DROP_CLOSE).await;
                        return;
                    }
                },
                Some(event) = self.internal.recv() => self.internal_event(event).await,
                _ = tick.tick() => self.check_health(),
            }
        }
    }

    fn enqueue(&mut self, command: Command) {
        let at = Instant::now();
        match command {
            Command::Ops(ops) => {
                self.queue.extend(ops.into_iter().map(|op| Queued { item: Item::Op(op), at }))
            }
            Command::Barrier(opener) => self.queue.push_back(Queued { item: Item::Barrier(opener), at }),
            Command::Close { timeout, done } => {
                self.queue.push_back(Queued { item: Item::Close { timeout, done }, at })
            }
        }
    }

    /// Carries out queued items in order, batching publishes and settlements between the
    /// items that must wait for them. Stops early when the connection goes down: what is
    /// left stays queued for after the reconnect.
    async fn work(&mut self) -> Flow {
        let mut publishes = Vec::new();
        let mut settles = Vec::new();
        let mut done = 0;
        // A loss noticed midway is handled where it shows: unsent publishes are queued again,
        // subscriptions are restored, barriers wait, settlements of the old channels are moot.
        while done < MAX_BATCH {
            let Some(Queued { item, at }) = self.queue.pop_front() else { break };
            done += 1;
            match item {
                Item::Op(LinkOp::Publish(p)) => publishes.push((p, at)),
                Item::Op(LinkOp::Ack(tag)) => settles.push((tag, Settle::Ack)),
                Item::Op(LinkOp::Reject(tag, requeue)) => settles.push((tag, Settle::Reject { requeue })),
                Item::Op(LinkOp::Subscribe(s)) => {
                    self.flush(&mut publishes, &mut settles).await;
                    self.subscribe(s).await;
                }
                Item::Op(LinkOp::Unsubscribe(id)) => {
                    self.flush(&mut publishes, &mut settles).await;
                    self.unsubscribe(id).await;
                }
                Item::Barrier(opener) => {
                    self.flush(&mut publishes, &mut settles).await;
                    if self.is_down() {
                        // Not done yet: it opens after the reconnect.
                        self.queue.push_front(Queued { item: Item::Barrier(opener), at });
                        break;
                    }
                    let failures = std::mem::take(&mut self.failures);
                    opener.open(if failures.is_empty() { Ok(()) } else { Err(failures.join("; ")) });
                }
                Item::Close { timeout, done } => {
                    self.flush(&mut publishes, &mut settles).await;
                    self.shutdown(timeout).await;
                    let _ = done.send(());
                    return Flow::Closed;
                }
            }
        }
        self.flush(&mut publishes, &mut settles).await;
        Flow::Continue
    }

    async fn flush(
        &mut self,
        publishes: &mut Vec<(Publish, Instant)>,
        settles: &mut Vec<(DeliveryTag, Settle)>,
    ) {
        if !publishes.is_empty() {
            self.publish_batch(std::mem::take(publishes)).await;
        }
        if !settles.is_empty() {
            self.settle_batch(std::mem::take(settles)).await;
        }
    }

    fn is_down(&self) -> bool {
        self.live.as_ref().is_none_or(|live| !live.conn.status().connected())
    }

    fn check_health(&mut self) {
        if self.live.is_some() && self.is_down() {
            self.lost();
        }
    }

    /// The connection is gone: forget everything that lived on it.
    fn lost(&mut self) {
        warn!(uri = %self.setup.redacted, "AMQP connection lost; reconnecting");
        self.live = None;
        self.consumers.clear();
        self.declared_exchanges.clear();
        self.declared_queues.clear();
        for sub in self.subs.values_mut() {
            sub.running = None;
            sub.consumer_tags.clear();
        }
    }

    // ---- connecting ----------------------------------------------------------------------

    /// Reconnects with backoff, restoring every subscription. Operations handed over
    /// meanwhile are queued; publishes among them fail once they waited
    /// [`publish_wait`](super::AmqpConnector::publish_wait).
    async fn reconnect(&mut self) -> Flow {
        let tuning = self.setup.tuning;
        let mut delay = tuning.reconnect_first;
        let mut attempt: u32 = 0;
        loop {
            let until = Instant::now() + delay;
            // Wait before each attempt (the broker that just closed us is likely still busy),
            // taking commands meanwhile.
            loop {
                self.expire_publishes();
                if matches!(self.queue.back(), Some(Queued { item: Item::Close { .. }, .. })) {
                    self.close_while_down();
                    return Flow::Closed;
                }
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => break,
                    _ = tokio::time::sleep(HEALTH_TICK) => {}
                    command = self.commands.recv() => match command {
                        Some(command) => self.enqueue(command),
                        None => {
                            self.close_while_down();
                            return Flow::Closed;
                        }
                    },
                }
            }
            attempt += 1;
            // The attempt may take up to the connect timeout: keep taking commands and
            // expiring publishes meanwhile.
            let connecting = connect_live(self.setup.clone(), self.shared.clone(), self.in_flight.clone());
            tokio::pin!(connecting);
            let result = loop {
                tokio::select! {
                    result = &mut connecting => break result,
                    _ = tokio::time::sleep(HEALTH_TICK) => self.expire_publishes(),
                    command = self.commands.recv() => match command {
                        Some(command) => self.enqueue(command),
                        None => {
                            self.close_while_down();
                            return Flow::Closed;
                        }
                    },
                }
            };
            delay = (delay * 2).min(tuning.reconnect_max);
            match result {
                Ok(live) => {
                    self.live = Some(live);
                    if self.restore().await {
                        info!(uri = %self.setup.redacted, attempt, "AMQP link reconnected");
                        return Flow::Continue;
                    }
                    self.lost();
                }
                Err(e) => {
                    warn!(uri = %self.setup.redacted, attempt, error = %e, retry_in = ?delay, "AMQP reconnect failed");
                }
            }
        }
    }

    /// Declares every subscription's topology again and restarts its consumers. False when
    /// the connection dropped again meanwhile.
    async fn restore(&mut self) -> bool {
        let ids: Vec<SubscriptionId> = self.subs.keys().copied().collect();
        for id in ids {
            if let Err(e) = self.start(id, true).await {
                if self.is_down() {
                    return false;
                }
                error!(subscription = %id, error = %e, "cannot restore a subscription; retrying later");
                self.restart_later(id, CONSUMER_RETRY);
            }
        }
        !self.is_down()
    }

    fn expire_publishes(&mut self) {
        let wait = self.setup.tuning.publish_wait;
        let now = Instant::now();
        let shared = &self.shared;
        self.queue.retain(|q| match &q.item {
            Item::Op(LinkOp::Publish(p)) if now.duration_since(q.at) >= wait => {
                shared.confirm(
                    p.id,
                    Err(PublishError::LinkDown(format!(
                        "the AMQP connection is down (waited {wait:?} for the reconnect)"
                    ))),
                );
                false
            }
            _ => true,
        });
    }

    /// A close while the connection is down: nothing can be flushed.
    fn close_while_down(&mut self) {
        for q in self.queue.drain(..) {
            match q.item {
                Item::Op(LinkOp::Publish(p)) => self
                    .shared
                    .confirm(p.id, Err(PublishError::LinkDown("the AMQP link closed while down".into()))),
                Item::Barrier(opener) => opener.open(Err("the AMQP link closed while down".into())),
                Item::Close { done, .. } => {
                    let _ = done.send(());
                }
                Item::Op(_) => {}
            }
        }
        info!(uri = %self.setup.redacted, "AMQP link closed (while disconnected)");
    }

    /// Waits for the confirms in flight, then closes the connection: the broker requeues
    /// every unsettled delivery.
    async fn shutdown(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let in_flight = self.in_flight.clone();
        loop {
            let zero = in_flight.zero.notified();
            tokio::pin!(zero);
            zero.as_mut().enable();
            if in_flight.count.load(Ordering::Acquire) == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, zero).await.is_err() {
                warn!(
                    unconfirmed = in_flight.count.load(Ordering::Acquire),
                    "AMQP link closing with publishes unconfirmed"
                );
                break;
            }
        }
        if let Some(live) = self.live.take() {
            let close = live.conn.close(200, "OK".into());
            if let Ok(Err(e)) = tokio::time::timeout_at(deadline, close).await {
                debug!(error = %e, "AMQP connection close");
            }
        }
        self.close_while_down_silently();
        info!(uri = %self.setup.redacted, "AMQP link closed");
    }

    fn close_while_down_silently(&mut self) {
        for q in self.queue.drain(..) {
            match q.item {
                Item::Op(LinkOp::Publish(p)) => {
                    self.shared.confirm(p.id, Err(PublishError::LinkDown("the AMQP link closed".into())))
                }
                Item::Barrier(opener) => opener.open(Err("the AMQP link closed".into())),
                Item::Close { done, .. } => {
                    let _ = done.send(());
                }
                Item::Op(_) => {}
            }
        }
    }

    // ---- subscriptions -------------------------------------------------------------------

    async fn subscribe(&mut self, s: microfw_core::Subscribe) {
        if self.subs.contains_key(&s.id) {
            return;
        }
        self.sources.insert(s.id, s.source.clone());
        self.subs.insert(
            s.id,
            Sub {
                source: Arc::new(s.source),
                prefetch: s.prefetch,
                running: None,
                consumer_tags: Vec::new(),
            },
        );
        if let Err(e) = self.start(s.id, false).await {
            if self.is_down() {
                // Restored after the reconnect.
                return;
            }
            error!(subscription = %s.id, error = %e, "cannot subscribe");
            self.failures.push(format!("subscription {}: {e}", s.id));
            self.subs.remove(&s.id);
        }
    }

    async fn unsubscribe(&mut self, id: SubscriptionId) {
        let Some(sub) = self.subs.remove(&id) else { return };
        let Some(key) = sub.running else { return };
        // The channel stays open: deliveries in flight are still settled on it.
        if let Some(consumer) = self.consumers.get(&key) {
            for tag in sub.consumer_tags {
                if let Err(e) = consumer.channel.basic_cancel(tag, BasicCancelOptions::default()).await {
                    debug!(subscription = %id, error = %e, "basic.cancel");
                }
            }
        }
    }

    /// Declares a subscription's topology and starts its consumers on a new channel.
    /// `restoring`: a reply queue that is gone was lost (its replies with it).
    async fn start(&mut self, id: SubscriptionId, restoring: bool) -> Result<(), String> {
        let Some(sub) = self.subs.get(&id) else { return Ok(()) };
        let (source, prefetch) = (sub.source.clone(), sub.prefetch);
        let topo = topology(&source, &self.setup.settings);
        if restoring && let (Source::Replies { .. }, Some(queue)) = (&*source, topo.queues.first()) {
            self.check_reply_queue(&queue.name).await?;
        }
        self.declare(&topo).await.map_err(|e| e.0)?;
        let Some(live) = &self.live else { return Err("the connection is down".into()) };
        let channel = live.conn.create_channel().await.map_err(|e| self.setup.scrub(e))?;
        let qos = u16::try_from(prefetch).unwrap_or(u16::MAX);
        channel.basic_qos(qos, BasicQosOptions { global: false }).await.map_err(|e| self.setup.scrub(e))?;
        self.last_key = convert::next_key(self.last_key);
        let key = self.last_key;
        let mut tags = Vec::with_capacity(topo.consume.len());
        for (i, queue) in topo.consume.iter().enumerate() {
            let name = convert::short("queue", queue).map_err(|e| e.to_string())?;
            let tag = ShortString::from(format!("microfw.{id}.{key}.{i}"));
            let consumer = channel
                .basic_consume(name, tag, BasicConsumeOptions::default(), FieldTable::default())
                .await
                .map_err(|e| format!("cannot consume {queue}: {}", self.setup.scrub(e)))?;
            tags.push(consumer.tag());
            let task = ConsumerTask {
                sub: id,
                key,
                source: source.clone(),
                shared: self.shared.clone(),
                internal: self.internal_tx.clone(),
            };
            tokio::spawn(task.run(consumer));
        }
        self.consumers.insert(key, ConsumerChannel { channel, ledger: AckLedger::default() });
        if let Some(sub) = self.subs.get_mut(&id) {
            sub.running = Some(key);
            sub.consumer_tags = tags;
        }
        debug!(subscription = %id, queues = ?topo.consume, prefetch, "consuming");
        Ok(())
    }

    /// A passive declare of the reply queue: when it is gone, its replies are lost.
    async fn check_reply_queue(&mut self, name: &str) -> Result<(), String> {
        let Some(live) = &self.live else { return Err("the connection is down".into()) };
        let queue = convert::short("queue", name).map_err(|e| e.to_string())?;
        let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
        match live.declare.queue_declare(queue, passive, FieldTable::default()).await {
            Ok(_) => Ok(()),
            Err(e) if soft_error(&e) == Some(AMQPSoftError::NOTFOUND) => {
                warn!(queue = name, "the reply queue is gone: pending calls' replies are lost");
                self.shared.reply_queue_lost();
                self.reopen_declare().await;
                Ok(())
            }
            Err(e) => Err(self.setup.scrub(e)),
        }
    }

    async fn internal_event(&mut self, event: Internal) {
        match event {
            Internal::ConsumerEnded { sub, key, reason } => {
                let down = self.is_down();
                let Some(s) = self.subs.get_mut(&sub) else { return };
                if s.running != Some(key) || down {
                    return;
                }
                warn!(subscription = %sub, reason = %reason, "AMQP consumer stopped; restarting it");
                s.running = None;
                let tags = std::mem::take(&mut s.consumer_tags);
                // Other consumers of the subscription may still run on the channel: stop them
                // (the channel stays, for settling what they delivered).
                if let Some(consumer) = self.consumers.get(&key) {
                    if consumer.channel.status().connected() {
                        for tag in tags {
                            let _ = consumer.channel.basic_cancel(tag, BasicCancelOptions::default()).await;
                        }
                    } else {
                        self.consumers.remove(&key);
                    }
                }
                self.restart_later(sub, CONSUMER_RESTART);
            }
            Internal::Restart { sub } => {
                let Some(s) = self.subs.get(&sub) else { return };
                if s.running.is_some() || self.is_down() {
                    return;
                }
                match self.start(sub, true).await {
                    Ok(()) => info!(subscription = %sub, "AMQP consumer restarted"),
                    Err(e) if !self.is_down() => {
                        error!(subscription = %sub, error = %e, "cannot restart a consumer; retrying later");
                        self.restart_later(sub, CONSUMER_RETRY);
                    }
                    Err(_) => {}
                }
            }
        }
    }

    fn restart_later(&self, sub: SubscriptionId, after: Duration) {
        let internal = self.internal_tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let _ = internal.send(Internal::Restart { sub });
        });
    }

    // ---- declarations --------------------------------------------------------------------

    /// Declares `t` in order: exchanges, queues, bindings.
    async fn declare(&mut self, t: &Topology) -> Result<(), DeclareError> {
        for exchange in &t.exchanges {
            self.declare_exchange(exchange).await?;
        }
        for queue in &t.queues {
            self.declare_queue(queue).await?;
        }
        for b in &t.bindings {
            let Some(live) = &self.live else { return Err(DeclareError("the connection is down".into())) };
            let names = (convert::short("queue", &b.queue), convert::short("exchange", &b.exchange));
            let (Ok(queue), Ok(exchange)) = names else {
                return Err(DeclareError(format!("binding {b:?}: a name is longer than 255 bytes")));
            };
            let key =
                convert::short("routing key", &b.routing_key).map_err(|e| DeclareError(e.to_string()))?;
            let bound = live
                .declare
                .queue_bind(queue, exchange, key, QueueBindOptions::default(), FieldTable::default())
                .await;
            if let Err(e) = bound {
                let text = format!(
                    "cannot bind {} to {} with {:?}: {}",
                    b.queue,
                    b.exchange,
                    b.routing_key,
                    self.setup.scrub(e)
                );
                self.reopen_declare().await;
                return Err(DeclareError(text));
            }
        }
        Ok(())
    }

    async fn declare_exchange(&mut self, ex: &Exchange) -> Result<(), DeclareError> {
        let Some(live) = &self.live else { return Err(DeclareError("the connection is down".into())) };
        let name = convert::short("exchange", &ex.name).map_err(|e| DeclareError(e.to_string()))?;
        let kind = match ex.kind {
            ExchangeKind::Topic => lapin::ExchangeKind::Topic,
            ExchangeKind::Direct => lapin::ExchangeKind::Direct,
            ExchangeKind::Fanout => lapin::ExchangeKind::Fanout,
        };
        let passive = self.adopted.contains(&ex.name);
        let options = ExchangeDeclareOptions {
            passive,
            durable: ex.durable,
            auto_delete: ex.auto_delete,
            ..ExchangeDeclareOptions::default()
        };
        let result =
            live.declare.exchange_declare(name.clone(), kind.clone(), options, FieldTable::default()).await;
        match result {
            Ok(()) => {}
            Err(e) if !passive && soft_error(&e) == Some(AMQPSoftError::PRECONDITIONFAILED) => {
                self.reopen_declare().await;
                let Some(live) = &self.live else {
                    return Err(DeclareError("the connection is down".into()));
                };
                let options = ExchangeDeclareOptions { passive: true, ..options };
                if let Err(e) =
                    live.declare.exchange_declare(name, kind, options, FieldTable::default()).await
                {
                    let text = format!("cannot adopt exchange {}: {}", ex.name, self.setup.scrub(e));
                    self.reopen_declare().await;
                    return Err(DeclareError(text));
                }
                info!(exchange = %ex.name, durable = ex.durable, auto_delete = ex.auto_delete,
                    "exchange exists with other flags than ours: adopted as it is");
                self.adopted.insert(ex.name.clone());
            }
            Err(e) if passive && soft_error(&e) == Some(AMQPSoftError::NOTFOUND) => {
                // The adopted exchange is gone (an auto-delete exchange loses its last
                // binding): declare it again, with our flags (recursing once at most).
                info!(exchange = %ex.name, "an adopted exchange is gone: declaring it again");
                self.adopted.remove(&ex.name);
                self.reopen_declare().await;
                return Box::pin(self.declare_exchange(ex)).await;
            }
            Err(e) => {
                let text = format!("cannot declare exchange {}: {}", ex.name, self.setup.scrub(e));
                self.reopen_declare().await;
                return Err(DeclareError(text));
            }
        }
        self.declared_exchanges.insert(ex.name.clone());
        Ok(())
    }

    async fn declare_queue(&mut self, q: &Queue) -> Result<(), DeclareError> {
        let Some(live) = &self.live else { return Err(DeclareError("the connection is down".into())) };
        let name = convert::short("queue", &q.name).map_err(|e| DeclareError(e.to_string()))?;
        let options = QueueDeclareOptions {
            durable: q.durable,
            exclusive: q.exclusive,
            auto_delete: q.auto_delete,
            ..QueueDeclareOptions::default()
        };
        let arguments = convert::table_from_headers(&q.arguments);
        if let Err(e) = live.declare.queue_declare(name, options, arguments).await {
            let text = format!("cannot declare queue {}: {}", q.name, self.setup.scrub(e));
            self.reopen_declare().await;
            return Err(DeclareError(text));
        }
        self.declared_queues.insert(q.name.clone());
        Ok(())
    }

    /// Opens a new declaring channel after the broker closed the old one (a failed declare
    /// closes its channel).
    async fn reopen_declare(&mut self) {
        let Some(live) = &mut self.live else { return };
        if live.declare.status().connected() || !live.conn.status().connected() {
            return;
        }
        match live.conn.create_channel().await {
            Ok(channel) => live.declare = channel,
            Err(e) => warn!(error = %self.setup.scrub(e), "cannot reopen the declaring channel"),
        }
    }

    // ---- publishing ----------------------------------------------------------------------

    /// Encodes and declares for each publish, then writes them all and hands their confirms to
    /// the collector.
    async fn publish_batch(&mut self, publishes: Vec<(Publish, Instant)>) {
        let mut ready = Vec::with_capacity(publishes.len());
        let mut unsent = Vec::new();
        // A publish to a missing exchange closed the channel: reopen it (forgetting what was
        // declared) before deciding what these publishes need declared.
        if !publishes.is_empty() {
            self.ensure_publish_channel().await;
        }
        for (publish, at) in publishes {
            match self.prepare(&publish).await {
                Ok(message) => ready.push((publish, at, message)),
                Err(NotSent::Down) => unsent.push((publish, at)),
                Err(NotSent::Failed(e)) => self.shared.confirm(publish.id, Err(e)),
            }
        }
        if !ready.is_empty() && !self.ensure_publish_channel().await {
            unsent.extend(ready.drain(..).map(|(p, at, _)| (p, at)));
        }
        if let Some(live) = &self.live
            && !ready.is_empty()
        {
            let channel = live.publish.clone();
            let confirms = live.confirms.clone();
            // Write every message: each future queues its frames when first polled, so they
            // are polled once in order, then awaited together.
            let mut writes = Vec::with_capacity(ready.len());
            for (_, _, (exchange, routing_key, properties, message)) in &ready {
                let options = BasicPublishOptions { mandatory: message.mandatory, immediate: false };
                let mut write = Box::pin(channel.basic_publish(
                    exchange.clone(),
                    routing_key.clone(),
                    options,
                    &message.body,
                    properties.clone(),
                ));
                let first = poll_once(&mut write).await;
                writes.push((write, first));
            }
            let mut results = Vec::with_capacity(writes.len());
            for (write, first) in writes {
                results.push(match first {
                    Poll::Ready(result) => result,
                    Poll::Pending => write.await,
                });
            }
            let down = !channel.status().connected() && self.is_down();
            for ((publish, at, _), result) in ready.into_iter().zip(results) {
                match result {
                    Ok(confirm) => {
                        self.in_flight.count.fetch_add(1, Ordering::AcqRel);
                        if let Err(mpsc::error::SendError((id, _))) = confirms.send((publish.id, confirm)) {
                            self.in_flight.done();
                            self.shared.confirm(
                                id,
                                Err(PublishError::LinkDown("the publish channel closed".into())),
                            );
                        }
                    }
                    // Never written: it waits for the reconnect.
                    Err(_) if down => unsent.push((publish, at)),
                    Err(e) => self.shared.confirm(
                        publish.id,
                        Err(PublishError::LinkDown(format!("not published: {}", self.setup.scrub(e)))),
                    ),
                }
            }
        }
        for (publish, at) in unsent.into_iter().rev() {
            self.queue.push_front(Queued { item: Item::Op(LinkOp::Publish(publish)), at });
        }
    }

    /// Declares what `publish` needs (once per connection) and encodes it.
    async fn prepare(&mut self, publish: &Publish) -> Result<Prepared, NotSent> {
        let failed = |text: String| NotSent::Failed(PublishError::Other(text));
        let sources = &self.sources;
        let settings = &self.setup.settings;
        let needs =
            publish_topology(publish, settings, |id| sources.get(&id)).map_err(|e| failed(e.to_string()))?;
        let message = encode(publish, settings, |id| sources.get(&id)).map_err(|e| failed(e.to_string()))?;
        let exchange = convert::short("exchange", &message.exchange).map_err(|e| failed(e.to_string()))?;
        let routing_key =
            convert::short("routing key", &message.routing_key).map_err(|e| failed(e.to_string()))?;
        let properties = convert::properties(&message).map_err(|e| failed(e.to_string()))?;
        let missing = Topology {
            exchanges: needs
                .exchanges
                .into_iter()
                .filter(|e| !self.declared_exchanges.contains(&e.name))
                .collect(),
            queues: needs.queues.into_iter().filter(|q| !self.declared_queues.contains(&q.name)).collect(),
            bindings: needs.bindings,
            consume: Vec::new(),
        };
        let nothing_missing =
            missing.exchanges.is_empty() && missing.queues.is_empty() && missing.bindings.is_empty();
        if !nothing_missing && let Err(e) = self.declare(&missing).await {
            return Err(if self.is_down() { NotSent::Down } else { failed(e.0) });
        }
        Ok((exchange, routing_key, properties, message))
    }

    /// True when the publishing channel is usable, reopening it after the broker closed it
    /// (a publish to a missing exchange). What was declared may be gone too: it is declared
    /// again.
    async fn ensure_publish_channel(&mut self) -> bool {
        let Some(live) = &self.live else { return false };
        if live.publish.status().connected() {
            return true;
        }
        if !live.conn.status().connected() {
            return false;
        }
        warn!("the AMQP publish channel closed; reopening it");
        match open_publish_channel(&live.conn, self.shared.clone(), self.in_flight.clone()).await {
            Ok((channel, confirms)) => {
                self.declared_exchanges.clear();
                self.declared_queues.clear();
                if let Some(live) = &mut self.live {
                    live.publish = channel;
                    live.confirms = confirms;
                }
                true
            }
            Err(e) => {
                warn!(error = %self.setup.scrub(e), "cannot reopen the publish channel");
                false
            }
        }
    }

    // ---- settling ------------------------------------------------------------------------

    /// Acks and rejects, batched per consumer channel ([`AckLedger`]). Tags of channels that
    /// are gone are dropped silently.
    async fn settle_batch(&mut self, settles: Vec<(DeliveryTag, Settle)>) {
        let mut by_key: Vec<(u32, Vec<(u64, Settle)>)> = Vec::new();
        for (tag, settle) in settles {
            let (key, broker_tag) = convert::unpack_tag(tag);
            match by_key.iter_mut().find(|(k, _)| *k == key) {
                Some((_, batch)) => batch.push((broker_tag, settle)),
                None => by_key.push((key, vec![(broker_tag, settle)])),
            }
        }
        for (key, batch) in by_key {
            let Some(consumer) = self.consumers.get_mut(&key) else { continue };
            let frames = consumer.ledger.plan(&batch);
            let channel = consumer.channel.clone();
            let mut writes: Vec<Pin<Box<dyn Future<Output = lapin::Result<()>> + Send + '_>>> = Vec::new();
            for frame in frames {
                let mut write: Pin<Box<dyn Future<Output = lapin::Result<()>> + Send + '_>> = match frame {
                    Frame::Ack { tag, multiple } => {
                        Box::pin(channel.basic_ack(tag, BasicAckOptions { multiple }))
                    }
                    Frame::Reject { tag, requeue } => {
                        Box::pin(channel.basic_reject(tag, BasicRejectOptions { requeue }))
                    }
                };
                if poll_once(&mut write).await.is_pending() {
                    writes.push(write);
                }
            }
            for write in writes {
                if let Err(e) = write.await {
                    debug!(error = %e, "settling on a closed channel (the broker redelivers)");
                }
            }
            if !channel.status().connected() {
                self.consumers.remove(&key);
            }
        }
    }
}

type Prepared = (ShortString, ShortString, lapin::BasicProperties, OutgoingMessage);

impl InFlight {
    fn done(&self) {
        if self.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.zero.notify_waiters();
        }
    }
}

/// Connects and opens the declaring and publishing channels.
async fn connect_live(
    setup: Arc<Setup>,
    shared: Arc<Shared>,
    in_flight: Arc<InFlight>,
) -> Result<Live, String> {
    let connect = Connection::connect_uri(setup.uri.clone(), setup.properties.clone());
    let conn = match tokio::time::timeout(setup.tuning.connect_timeout, connect).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => return Err(setup.scrub(e)),
        Err(_) => return Err(format!("no connection within {:?}", setup.tuning.connect_timeout)),
    };
    let declare = conn.create_channel().await.map_err(|e| setup.scrub(e))?;
    let (publish, confirms) =
        open_publish_channel(&conn, shared, in_flight).await.map_err(|e| setup.scrub(e))?;
    Ok(Live { conn, declare, publish, confirms })
}

/// A confirm channel for publishing, and the sender to its confirm collector.
async fn open_publish_channel(
    conn: &Connection,
    shared: Arc<Shared>,
    in_flight: Arc<InFlight>,
) -> Result<(Channel, mpsc::UnboundedSender<(PublishId, PublisherConfirm)>), lapin::Error> {
    let channel = conn.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(collect_confirms(rx, shared, in_flight));
    Ok((channel, tx))
}

/// Polls `future` once with the current task's waker.
async fn poll_once<F: Future + Unpin>(future: &mut F) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *future).poll(cx))).await
}

/// The soft (channel) error of `e`, if it is one.
fn soft_error(e: &lapin::Error) -> Option<AMQPSoftError> {
    match e.kind() {
        ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(soft) => Some(soft.clone()),
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

/// Reports publish confirms as they come (in any order), until the publish channel is gone
/// and every confirm it had in flight resolved.
async fn collect_confirms(
    mut rx: mpsc::UnboundedReceiver<(PublishId, PublisherConfirm)>,
    shared: Arc<Shared>,
    in_flight: Arc<InFlight>,
) {
    let mut pending = FuturesUnordered::new();
    loop {
        tokio::select! {
            item = rx.recv() => match item {
                Some((id, confirm)) => pending.push(async move { (id, confirm.await) }),
                None => break,
            },
            Some((id, result)) = pending.next(), if !pending.is_empty() => {
                shared.confirm(id, confirmation(result));
                in_flight.done();
            }
        }
    }
    while let Some((id, result)) = pending.next().await {
        shared.confirm(id, confirmation(result));
        in_flight.done();
    }
}

fn confirmation(result: lapin::Result<Confirmation>) -> Result<(), PublishError> {
    match result {
        Ok(Confirmation::Ack(None) | Confirmation::NotRequested) => Ok(()),
        Ok(Confirmation::Ack(Some(_))) => Err(PublishError::Unroutable),
        Ok(Confirmation::Nack(_)) => Err(PublishError::Nacked),
        Err(e) => Err(PublishError::LinkDown(format!("no confirm from the broker: {e}"))),
    }
}

/// One consumer's task: decodes deliveries into the shared inbox.
struct ConsumerTask {
    sub: SubscriptionId,
    key: u32,
    source: Arc<Source>,
    shared: Arc<Shared>,
    internal: mpsc::UnboundedSender<Internal>,
}

impl ConsumerTask {
    async fn run(self, mut consumer: lapin::Consumer) {
        let reason = loop {
            match consumer.next().await {
                Some(Ok(delivery)) => {
                    if delivery.delivery_tag > MAX_BROKER_TAG {
                        break "the channel's delivery tags ran out".to_owned();
                    }
                    let tag = convert::pack_tag(self.key, delivery.delivery_tag);
                    let redelivered = delivery.redelivered;
                    let envelope = decode(&self.source, convert::incoming(delivery));
                    self.shared.deliver(Delivery {
                        link: LinkId::from_raw(0),
                        tag,
                        subscription: self.sub,
                        redelivered,
                        envelope,
                    });
                }
                Some(Err(e)) => break e.to_string(),
                None => break "cancelled".to_owned(),
            }
        };
        let _ = self.internal.send(Internal::ConsumerEnded { sub: self.sub, key: self.key, reason });
    }
}

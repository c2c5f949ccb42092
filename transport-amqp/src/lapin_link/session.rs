//! The session task: owns the connection, carries out the driver's operations in order,
//! reconnects, and closes.

mod consume;
mod declare;
mod publish;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;

use lapin::options::ConfirmSelectOptions;
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::ShortString;
use lapin::{Channel, Connection, ErrorKind};
use microfw_core::link::{BarrierOpener, LinkError, LinkOp};
use microfw_core::{DeliveryTag, Publish, PublishError, Source, SubscriptionId};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::acks::{AckLedger, Settle};
use super::{Setup, Shared};
use publish::collect_confirms;

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
    /// How many of its settlements are held back for one frame ([`consume::settle_batch_size`]).
    batch: usize,
}

/// The current connection and its shared channels.
struct Live {
    conn: Connection,
    declare: Channel,
    publish: Channel,
    confirms: mpsc::UnboundedSender<publish::Written>,
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
    /// Settlements held back so that one frame covers many, and since when.
    deferred: Vec<(DeliveryTag, Settle)>,
    deferred_since: Option<Instant>,
    /// An empty vector with capacity, for the next batch of publishes.
    spare_publishes: Vec<(Publish, Instant)>,
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
            deferred: Vec::new(),
            deferred_since: None,
            spare_publishes: Vec::new(),
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
        // Fires when settlements held back are due; moved only when that instant changes.
        let settle_timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(settle_timer);
        let mut armed: Option<Instant> = None;
        loop {
            if self.settle_deadline().is_some_and(|due| due <= Instant::now()) {
                self.settle_deferred().await;
            }
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
            let deadline = self.settle_deadline();
            if let Some(due) = deadline
                && armed != Some(due)
            {
                settle_timer.as_mut().reset(due);
            }
            armed = deadline;
            tokio::select! {
                command = self.commands.recv() => match command {
                    Some(command) => self.enqueue(command),
                    None => {
                        self.shutdown(DROP_CLOSE).await;
                        return;
                    }
                },
                Some(event) = self.internal.recv() => self.internal_event(event).await,
                () = &mut settle_timer, if armed.is_some() => self.settle_deferred().await,
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
    /// items that must wait for them. Stops early when the connection is seen down: what is
    /// left stays queued for after the reconnect.
    async fn work(&mut self) -> Flow {
        // Settlements go straight to those held back; publishes to a vector kept between
        // calls (its capacity is reused).
        let mut publishes = std::mem::take(&mut self.spare_publishes);
        let mut done = 0;
        // A loss noticed midway is handled where it shows: unsent publishes are queued again,
        // subscriptions are restored, barriers wait, settlements of the old channels are moot.
        while done < MAX_BATCH {
            let Some(Queued { item, at }) = self.queue.pop_front() else { break };
            done += 1;
            match item {
                Item::Op(LinkOp::Publish(p)) => publishes.push((p, at)),
                Item::Op(LinkOp::Ack(tag)) => self.deferred.push((tag, Settle::Ack)),
                Item::Op(LinkOp::Reject(tag, requeue)) => {
                    self.deferred.push((tag, Settle::Reject { requeue }))
                }
                Item::Op(LinkOp::Subscribe(s)) => {
                    self.flush(&mut publishes, true).await;
                    self.subscribe(s).await;
                    if self.is_down() {
                        break;
                    }
                }
                Item::Op(LinkOp::Unsubscribe(id)) => {
                    self.flush(&mut publishes, true).await;
                    self.unsubscribe(id).await;
                    if self.is_down() {
                        break;
                    }
                }
                Item::Barrier(opener) => {
                    self.flush(&mut publishes, true).await;
                    if self.is_down() {
                        // Not done yet: it opens after the reconnect.
                        self.queue.push_front(Queued { item: Item::Barrier(opener), at });
                        break;
                    }
                    let failures = std::mem::take(&mut self.failures);
                    opener.open(if failures.is_empty() { Ok(()) } else { Err(failures.join("; ")) });
                }
                Item::Close { timeout, done } => {
                    self.flush(&mut publishes, true).await;
                    self.shutdown(timeout).await;
                    let _ = done.send(());
                    return Flow::Closed;
                }
            }
        }
        self.flush(&mut publishes, false).await;
        self.spare_publishes = publishes;
        Flow::Continue
    }

    /// Publishes, then settles (or holds the settlements back a little, unless `force`: see
    /// [`settle`](Self::settle)).
    async fn flush(&mut self, publishes: &mut Vec<(Publish, Instant)>, force: bool) {
        if !publishes.is_empty() {
            self.publish_batch(publishes).await;
        }
        self.settle(force).await;
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
        // Their channels are gone: the broker redelivers what they named.
        self.deferred.clear();
        self.deferred_since = None;
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
        self.fail_queued("the AMQP link closed while disconnected");
        info!(uri = %self.setup.redacted, "AMQP link closed (while disconnected)");
    }

    /// Ends everything still queued: publishes fail with `LinkDown`, barriers with `reason`,
    /// settlements are moot (the broker requeues what they named).
    fn fail_queued(&mut self, reason: &str) {
        for q in self.queue.drain(..) {
            match q.item {
                Item::Op(LinkOp::Publish(p)) => {
                    self.shared.confirm(p.id, Err(PublishError::LinkDown(reason.into())))
                }
                Item::Barrier(opener) => opener.open(Err(reason.into())),
                Item::Close { done, .. } => {
                    let _ = done.send(());
                }
                Item::Op(_) => {}
            }
        }
    }

    /// Waits for the confirms in flight, then closes the connection: the broker requeues
    /// every unsettled delivery.
    async fn shutdown(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        self.settle_deferred().await;
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
        self.fail_queued("the AMQP link closed");
        info!(uri = %self.setup.redacted, "AMQP link closed");
    }
}

impl InFlight {
    /// `n` confirms were reported.
    fn done_many(&self, n: usize) {
        if n > 0 && self.count.fetch_sub(n, Ordering::AcqRel) == n {
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
) -> Result<(Channel, mpsc::UnboundedSender<publish::Written>), lapin::Error> {
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

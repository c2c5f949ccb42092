//! The seam between a runtime's driver and a transport: what a link is asked to do
//! ([`LinkOp`]), what it hands back ([`LinkInbox`]), how it wakes its driver ([`LinkWaker`]),
//! and the traits a transport implements ([`Link`], [`Connect`], [`ConnectAsync`]).
//!
//! A runtime's driver owns one [`Link`] per [`Transport`] its service uses (the broker: the
//! memory hub or RabbitMQ; WebSocket). Each turn it turns the Engine's actions into
//! [`LinkOp`]s and calls [`Link::exchange`], which takes the operations and returns everything
//! that arrived since the last call: deliveries, publish confirms, the loss of the reply
//! queue. The IO itself happens elsewhere (a lapin task, an amiquip thread, a WebSocket
//! server); a link only moves data between that IO and the driver, and wakes the driver with
//! [`LinkWaker::wake`] when something arrived.
//!
//! Nothing here does IO, reads a clock or names an async runtime: the traits are plain Rust,
//! so both runtimes and every transport can share them.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use crate::action::{Delivery, Publish, PublishError, Subscribe, Transport};
use crate::config::Config;
use crate::ids::{DeliveryTag, PublishId, SubscriptionId};
use crate::time::Instant;

/// How long a runtime waits for a link's set-up ([`Link::barrier`]) at start.
pub const LINK_SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a runtime lets a link flush its last operations and close ([`Link::close`]).
pub const LINK_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A link operation from one of an Engine's actions ([`Action::Subscribe`](crate::Action),
/// `Unsubscribe`, `Publish`, `Ack`, `Reject`), as a runtime batches them until its next
/// [`Link::exchange`]. A link carries them out in order.
#[derive(Debug)]
pub enum LinkOp {
    /// Start a consumer.
    Subscribe(Subscribe),
    /// Stop a consumer.
    Unsubscribe(SubscriptionId),
    /// Publish; the confirm comes back in [`LinkInbox::confirms`] with the same id.
    Publish(Publish),
    /// Ack a delivery.
    Ack(DeliveryTag),
    /// Reject a delivery; `true` requeues it.
    Reject(DeliveryTag, bool),
}

/// What a link hands its driver at an [`exchange`](Link::exchange). The driver empties it
/// after each exchange; a link only appends.
#[derive(Debug, Default)]
pub struct LinkInbox {
    /// New deliveries, in the order they arrived. [`Delivery::link`] is the link's own
    /// business: the driver overwrites it with the index it routes acks by.
    pub deliveries: Vec<Delivery>,
    /// Publish confirms (the broker's ack, a return, a nack, or a failure to publish).
    pub confirms: Vec<(PublishId, Result<(), PublishError>)>,
    /// The link lost its reply queue for good (its replies will never come): calls waiting on
    /// it fail at once. A reconnect that keeps the queue is NOT this.
    pub reply_queue_lost: bool,
}

impl LinkInbox {
    /// True when there is nothing to hand over.
    pub fn is_empty(&self) -> bool {
        self.deliveries.is_empty() && self.confirms.is_empty() && !self.reply_queue_lost
    }
}

/// Wakes the driver that owns a link when something arrived for it (cheap to clone, usable
/// from any thread).
///
/// A wake sets a pending flag and calls the driver's notifier only when the flag was clear,
/// so a burst of arrivals costs one notification. The driver clears the flag
/// ([`take`](Self::take)) before each [`Link::exchange`]; an arrival after that sets it again.
#[derive(Clone)]
pub struct LinkWaker(Arc<WakerInner>);

struct WakerInner {
    pending: AtomicBool,
    notify: Box<dyn Fn() + Send + Sync>,
}

impl LinkWaker {
    /// A waker calling `notify` (which must not block: it typically `try_send`s a wake-up on
    /// the driver's input channel; a dropped wake-up is fine, the driver checks
    /// [`is_pending`](Self::is_pending) after each batch).
    pub fn new(notify: impl Fn() + Send + Sync + 'static) -> Self {
        LinkWaker(Arc::new(WakerInner { pending: AtomicBool::new(false), notify: Box::new(notify) }))
    }

    /// A waker that notifies nobody (for links polled on a schedule, and tests).
    pub fn noop() -> Self {
        LinkWaker::new(|| {})
    }

    /// Something arrived: wake the driver unless a wake-up is already pending.
    pub fn wake(&self) {
        if !self.0.pending.swap(true, Ordering::AcqRel) {
            (self.0.notify)();
        }
    }

    /// True when something arrived since the last [`take`](Self::take).
    pub fn is_pending(&self) -> bool {
        self.0.pending.load(Ordering::Acquire)
    }

    /// Clears the pending flag, returning whether it was set. Call it before
    /// [`Link::exchange`], never after (an arrival in between would be missed).
    pub fn take(&self) -> bool {
        self.0.pending.swap(false, Ordering::AcqRel)
    }
}

impl fmt::Debug for LinkWaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkWaker").field("pending", &self.is_pending()).finish_non_exhaustive()
    }
}

/// One transport connection of one service, as its driver sees it.
///
/// The contract:
/// * [`exchange`](Self::exchange) never blocks on IO: it queues `ops` for the IO side (in
///   order) and moves what arrived into the inbox. It returns the next instant at which it
///   must be called again even if nothing arrives (the memory hub's delayed retries), or
///   `None`.
/// * Deliveries stay unsettled until an [`LinkOp::Ack`] or [`LinkOp::Reject`] names their tag;
///   a link never settles on its own, except that closing (or losing) the connection returns
///   unsettled deliveries to the broker.
/// * Every [`LinkOp::Publish`] gets exactly one confirm, unless the link is closed first.
/// * Reconnecting, if the transport does it, is the link's business: the driver sees at most
///   [`LinkInbox::reply_queue_lost`]. Deliveries from before a reconnect can no longer be
///   settled (the broker redelivers them); settling them is a silent no-op.
pub trait Link: Send + 'static {
    /// Hands `ops` (drained, carried out in order) to the link and appends to `inbox` what
    /// arrived since the last call.
    fn exchange(&mut self, now: Instant, ops: &mut Vec<LinkOp>, inbox: &mut LinkInbox) -> Option<Instant>;

    /// Flushes the operations already handed over (the last acks and publishes), then closes:
    /// unsettled deliveries go back to the broker. Waits at most `timeout`. Blocking: async
    /// runtimes call it off their reactor threads. An [`exchange`](Self::exchange) with no
    /// operations after the close still hands over what arrived during it (the confirms it
    /// waited for), and nothing else happens.
    fn close(&mut self, timeout: Duration);

    /// A barrier that opens once every operation handed over so far has been carried out
    /// (queues declared, consumers started), or failed. Runners wait on it at start, so a
    /// service is consuming when `start` returns. The default is already open (for links
    /// that carry out operations inside `exchange`).
    fn barrier(&mut self) -> LinkBarrier {
        LinkBarrier::open()
    }
}

/// A one-shot signal from a link's IO side: "everything handed over so far is done"
/// ([`Link::barrier`]).
#[derive(Debug)]
pub struct LinkBarrier(Option<mpsc::Receiver<Result<(), String>>>);

/// The IO side's end of a [`LinkBarrier`].
#[derive(Debug)]
pub struct BarrierOpener(mpsc::SyncSender<Result<(), String>>);

impl LinkBarrier {
    /// A barrier that is already open.
    pub fn open() -> Self {
        LinkBarrier(None)
    }

    /// A closed barrier and the opener the IO side keeps.
    pub fn pair() -> (LinkBarrier, BarrierOpener) {
        let (tx, rx) = mpsc::sync_channel(1);
        (LinkBarrier(Some(rx)), BarrierOpener(tx))
    }

    /// Blocks until the barrier opens or `timeout` passes. `Err` carries the IO side's reason,
    /// or says that it timed out or that the link went away first.
    pub fn wait(self, timeout: Duration) -> Result<(), String> {
        let Some(rx) = self.0 else { return Ok(()) };
        match rx.recv_timeout(timeout) {
            Ok(result) => result,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                Err(format!("the link did not finish its set-up within {timeout:?}"))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Err("the link closed during its set-up".into()),
        }
    }
}

impl BarrierOpener {
    /// Opens the barrier with `result` (a second call does nothing).
    pub fn open(self, result: Result<(), String>) {
        let _ = self.0.try_send(result);
    }
}

/// A driver's links, and the routing of the Engine's link actions to them.
///
/// Each link serves one or more [`Transport`]s (the memory hub serves both when no WebSocket
/// link is configured). Deliveries are stamped with the index of the link they came from
/// ([`Delivery::link`]), and [`Action::Ack`](crate::Action::Ack) / `Reject` go back to that
/// link. Pure plumbing: no IO of its own.
#[derive(Default)]
pub struct Links {
    slots: Vec<Slot>,
    by_transport: [Option<usize>; 2],
    deadline: Option<Instant>,
}

struct Slot {
    link: Box<dyn Link>,
    transports: Vec<Transport>,
    ops: Vec<LinkOp>,
    deadline: Option<Instant>,
}

fn transport_index(t: Transport) -> usize {
    match t {
        Transport::Broker => 0,
        Transport::WebSocket => 1,
    }
}

impl Links {
    /// No links yet.
    pub fn new() -> Self {
        Links::default()
    }

    /// Adds `link` as the carrier of `transports` (replacing an earlier carrier of them).
    pub fn add(&mut self, transports: &[Transport], link: Box<dyn Link>) {
        let index = self.slots.len();
        for &t in transports {
            self.by_transport[transport_index(t)] = Some(index);
        }
        // The earlier carriers no longer answer for these transports (a lost reply queue
        // there is not theirs to report).
        for slot in &mut self.slots {
            slot.transports.retain(|t| !transports.contains(t));
        }
        self.slots.push(Slot { link, transports: transports.to_vec(), ops: Vec::new(), deadline: None });
    }

    /// Takes a link action (`Subscribe`, `Unsubscribe`, `Publish`, `Ack`, `Reject`) and
    /// queues it for its link; any other action is handed back. A publish for a transport no
    /// link carries is confirmed at once as failed, in `arrivals`.
    pub fn route(&mut self, action: crate::Action, arrivals: &mut Arrivals) -> Option<crate::Action> {
        let inbox = &mut arrivals.inbox;
        use crate::Action;
        let (slot, op) = match action {
            Action::Subscribe(s) => (self.carrier(s.transport), LinkOp::Subscribe(s)),
            Action::Unsubscribe { id, transport } => (self.carrier(transport), LinkOp::Unsubscribe(id)),
            Action::Publish(p) => match self.carrier(p.transport) {
                Some(slot) => (Some(slot), LinkOp::Publish(p)),
                None => {
                    let error = PublishError::LinkDown(format!("no {:?} link is configured", p.transport));
                    inbox.confirms.push((p.id, Err(error)));
                    return None;
                }
            },
            Action::Ack(d) => (Some(d.link.into_raw() as usize), LinkOp::Ack(d.tag)),
            Action::Reject { delivery, requeue } => {
                (Some(delivery.link.into_raw() as usize), LinkOp::Reject(delivery.tag, requeue))
            }
            other => return Some(other),
        };
        if let Some(slot) = slot.and_then(|i| self.slots.get_mut(i)) {
            slot.ops.push(op);
        }
        None
    }

    fn carrier(&self, transport: Transport) -> Option<usize> {
        self.by_transport[transport_index(transport)]
    }

    /// True when operations wait to be handed to a link.
    pub fn has_ops(&self) -> bool {
        self.slots.iter().any(|s| !s.ops.is_empty())
    }

    /// The earliest instant a link asked to be called again at.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Exchanges with the links that have operations, or with all of them when `all` (a
    /// wake-up, or a link deadline passed). What arrived goes to `arrivals`, deliveries
    /// stamped with their link.
    pub fn exchange(&mut self, now: Instant, all: bool, arrivals: &mut Arrivals) {
        let Arrivals { inbox, lost } = arrivals;
        let mut deadline: Option<Instant> = None;
        for (index, slot) in self.slots.iter_mut().enumerate() {
            if all || !slot.ops.is_empty() || slot.deadline.is_some_and(|t| t <= now) {
                // The link appends straight to the driver's inbox; only its new deliveries
                // are stamped.
                let first = inbox.deliveries.len();
                slot.deadline = slot.link.exchange(now, &mut slot.ops, inbox);
                let link = crate::ids::LinkId::from_raw(index as u32);
                for delivery in &mut inbox.deliveries[first..] {
                    delivery.link = link;
                }
                if std::mem::take(&mut inbox.reply_queue_lost) {
                    lost.extend(slot.transports.iter().copied());
                }
            }
            deadline = match (deadline, slot.deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        self.deadline = deadline;
    }

    /// Barriers of every link ([`Link::barrier`]).
    pub fn barriers(&mut self) -> Vec<LinkBarrier> {
        self.slots.iter_mut().map(|s| s.link.barrier()).collect()
    }

    /// Closes every link ([`Link::close`]), each waiting at most `timeout`. Blocking.
    pub fn close(&mut self, timeout: Duration) {
        for slot in &mut self.slots {
            slot.link.close(timeout);
        }
    }
}

/// What a driver's links handed over ([`Links::exchange`]), waiting to be fed to its Engine.
#[derive(Debug, Default)]
pub struct Arrivals {
    /// Deliveries and confirms, in arrival order.
    pub inbox: LinkInbox,
    /// Transports whose reply queue a link lost for good.
    pub lost: Vec<Transport>,
}

impl Arrivals {
    /// True when there is nothing to feed.
    pub fn is_empty(&self) -> bool {
        self.inbox.is_empty() && self.lost.is_empty()
    }

    /// Feeds everything to `engine`: deliveries, then publish confirms, then lost reply
    /// queues. Returns false when there was nothing.
    pub fn feed(&mut self, engine: &mut crate::Engine, now: Instant) -> bool {
        if self.is_empty() {
            return false;
        }
        for delivery in self.inbox.deliveries.drain(..) {
            engine.handle_delivery(now, delivery);
        }
        for (id, result) in self.inbox.confirms.drain(..) {
            engine.handle_publish_result(now, id, result);
        }
        self.inbox.reply_queue_lost = false;
        for transport in self.lost.drain(..) {
            engine.handle_reply_queue_lost(now, transport);
        }
        true
    }
}

impl fmt::Debug for Links {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Links").field("links", &self.slots.len()).finish_non_exhaustive()
    }
}

/// Why a link could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// The transport cannot be reached, or refused us (the text says which, and never holds a
    /// password).
    #[error("cannot connect to {transport}: {reason}")]
    Connect {
        /// What was being connected to (an AMQP URI with its password redacted, an address).
        transport: String,
        /// Why it failed.
        reason: String,
    },
    /// The runtime was built without this transport.
    #[error("{0}")]
    Unsupported(String),
}

/// What a transport needs to know to open a link for a service.
#[derive(Clone, Debug)]
pub struct LinkSpec {
    /// The service's name.
    pub service: String,
    /// Which transport the link serves.
    pub transport: Transport,
    /// The service's configuration (URIs, heartbeat, prefetch, dialect, addresses...).
    pub config: Config,
}

/// Opens a link, blocking (threaded runtimes).
pub trait Connect: Send + 'static {
    /// Connects, declares nothing yet (subscriptions arrive as [`LinkOp`]s), and returns the
    /// link. `waker` is the driver's; the link calls it when something arrives.
    fn connect(self: Box<Self>, spec: &LinkSpec, waker: LinkWaker) -> Result<Box<dyn Link>, LinkError>;
}

/// The future an async [`ConnectAsync::connect`] returns.
pub type ConnectFuture = Pin<Box<dyn Future<Output = Result<Box<dyn Link>, LinkError>> + Send>>;

/// Opens a link inside an async runtime (the runtime's IO tasks are spawned on the runtime
/// current when the future is polled).
pub trait ConnectAsync: Send + 'static {
    /// As [`Connect::connect`], as a future.
    fn connect(self: Box<Self>, spec: LinkSpec, waker: LinkWaker) -> ConnectFuture;
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    #[test]
    fn a_burst_of_wakes_notifies_once_until_taken() {
        let count = Arc::new(AtomicUsize::new(0));
        let c = count.clone();
        let waker = LinkWaker::new(move || {
            c.fetch_add(1, Ordering::Relaxed);
        });
        waker.wake();
        waker.wake();
        assert_eq!(count.load(Ordering::Relaxed), 1);
        assert!(waker.take());
        assert!(!waker.take());
        waker.wake();
        assert_eq!(count.load(Ordering::Relaxed), 2);
    }

    /// Records the operations it gets; hands over one delivery per exchange and reports its
    /// reply queue lost.
    struct Fake {
        ops: Arc<std::sync::Mutex<Vec<String>>>,
    }

    impl Link for Fake {
        fn exchange(&mut self, _: Instant, ops: &mut Vec<LinkOp>, inbox: &mut LinkInbox) -> Option<Instant> {
            let mut seen = self.ops.lock().unwrap();
            seen.extend(ops.drain(..).map(|op| match op {
                LinkOp::Ack(tag) => format!("ack {}", tag.into_raw()),
                other => format!("{other:?}").split('(').next().unwrap_or_default().to_owned(),
            }));
            inbox.deliveries.push(crate::Delivery {
                link: crate::LinkId::from_raw(99),
                tag: DeliveryTag::from_raw(7),
                subscription: SubscriptionId::from_raw(1),
                redelivered: false,
                envelope: crate::Envelope::raw("", "", "x"),
            });
            inbox.reply_queue_lost = true;
            None
        }

        fn close(&mut self, _: Duration) {}
    }

    fn fake() -> (Box<dyn Link>, Arc<std::sync::Mutex<Vec<String>>>) {
        let ops = Arc::new(std::sync::Mutex::new(Vec::new()));
        (Box::new(Fake { ops: ops.clone() }), ops)
    }

    #[test]
    fn acks_go_back_to_the_link_a_delivery_came_from_and_losses_name_its_transports() {
        let mut links = Links::new();
        let (broker, broker_ops) = fake();
        let (ws, ws_ops) = fake();
        links.add(&[Transport::Broker, Transport::WebSocket], broker);
        links.add(&[Transport::WebSocket], ws); // replaces the broker link as WebSocket carrier
        let mut arrivals = Arrivals::default();
        links.exchange(Instant::EPOCH, true, &mut arrivals);
        let stamps: Vec<u32> = arrivals.inbox.deliveries.iter().map(|d| d.link.into_raw()).collect();
        assert_eq!(stamps, [0, 1], "each delivery is stamped with its link's index");
        assert_eq!(arrivals.lost, [Transport::Broker, Transport::WebSocket], "one transport per link");

        for link in [1, 0] {
            let delivery = crate::ids::DeliveryRef {
                link: crate::LinkId::from_raw(link),
                tag: DeliveryTag::from_raw(7),
            };
            assert!(links.route(crate::Action::Ack(delivery), &mut arrivals).is_none());
        }
        links.exchange(Instant::EPOCH, false, &mut arrivals);
        assert_eq!(*broker_ops.lock().unwrap(), ["ack 7"]);
        assert_eq!(*ws_ops.lock().unwrap(), ["ack 7"]);
    }
}

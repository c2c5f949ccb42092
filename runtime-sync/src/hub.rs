//! The shared in-process broker ([`MemoryHubHandle`]) and the process clock.
//!
//! Every Runner of a hub holds the same `Arc<Mutex<..>>`: the core's [`MemoryHub`] plus, per
//! link, an inbox of deliveries and the sender of the link's driver channel. Critical sections
//! are short and never block: a driver takes the lock once per batch of broker operations,
//! applies them in order, pumps the broker, and leaves each delivery in the inbox of the
//! Runner owning its link. An inbox going from empty to non-empty wakes its driver (its
//! [`LinkWaker`](microfw_core::link::LinkWaker)) once the lock is released: the waker's flag
//! is set and a wake-up sent with `try_send`; if that driver's channel is full it is busy
//! anyway and checks the flag before every input it takes. Nothing under the lock ever waits on another thread, so the
//! hub cannot deadlock with the drivers' bounded channels.
//!
//! The wake-ups are sent after the lock is released, not under it: a driver woken under the
//! lock went straight for the lock to take its inbox, found it still held by the waker (often
//! preempted by the very thread it woke, on a small machine), and went back to sleep; the
//! waker then had to wake it a second time when unlocking (a lock convoy, measured at roughly
//! one extra sleep and wake per hub hand-over). A wake sent after a racing `take_inbox` has
//! already emptied the inbox is harmless: the driver finds an empty inbox.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime};

use microfw_core::broker::ExchangeKind;
use microfw_core::link::{Connect, Link, LinkError, LinkInbox, LinkOp, LinkSpec, LinkWaker};
use microfw_core::memory::{MemoryHub, events_exchange};
use microfw_core::{Delivery, DeliveryTag, Envelope, Instant, LinkId, PublishError, PublishId};
use serde::Serialize;

/// A handle on an in-process broker shared by Runners (cheap to clone).
///
/// Runners on one hub exchange events and RPC with no broker installed. It does NOT speak
/// AMQP and keeps nothing on disk; everything is lost with the process.
#[derive(Clone)]
pub struct MemoryHubHandle(Arc<Mutex<HubState>>);

impl MemoryHubHandle {
    /// A new, empty hub (tests use one each).
    pub fn new() -> Self {
        MemoryHubHandle(Arc::new(Mutex::new(HubState {
            hub: MemoryHub::new(),
            links: Vec::new(),
            announced: None,
        })))
    }

    /// The process-wide hub Runners use unless told otherwise.
    pub fn global() -> Self {
        static GLOBAL: OnceLock<MemoryHubHandle> = OnceLock::new();
        GLOBAL.get_or_init(MemoryHubHandle::new).clone()
    }

    /// Runs `f` on the hub under its lock, for inspection (`hub.broker().queue_len(..)`).
    /// Keep `f` short: every Runner of the hub waits for it.
    pub fn with<R>(&self, f: impl FnOnce(&MemoryHub) -> R) -> R {
        f(&self.lock().hub)
    }

    /// Runs `f` on the hub under its lock (to declare or publish by hand), then hands every
    /// delivery it made possible to the Runner owning it. Everything `f` publishes reaches
    /// the consumers' inboxes in one step.
    pub fn with_mut<R>(&self, f: impl FnOnce(&mut MemoryHub) -> R) -> R {
        let now = now();
        let mut wakes = Vec::new();
        let mut state = self.lock();
        let r = f(&mut state.hub);
        state.pump(now, None, &mut Vec::new(), &mut wakes);
        state.announce(now, None);
        drop(state);
        wake_all(&mut wakes);
        r
    }

    /// Ready messages in queue `name` (`None`: no such queue).
    pub fn queue_len(&self, name: &str) -> Option<usize> {
        self.with(|h| h.broker().queue_len(name))
    }

    /// Delivered but unsettled messages of queue `name` (`None`: no such queue).
    pub fn unacked_len(&self, name: &str) -> Option<usize> {
        self.with(|h| h.broker().unacked_len(name))
    }

    /// Publishes an event as Nameko's standalone dispatcher would (bare JSON body, no
    /// headers) on exchange `<source_service>.events`, declaring it first. Returns how many
    /// queues it reached. It does NOT go through any Runner (no worker context, no confirm
    /// wait): use [`RunningService::producer`](crate::RunningService::producer) for that.
    pub fn publish_event(
        &self,
        source_service: &str,
        event_type: &str,
        payload: &impl Serialize,
    ) -> Result<usize, PublishError> {
        let body = serde_json::to_vec(payload).map_err(|e| PublishError::Other(e.to_string()))?;
        let exchange = events_exchange(source_service);
        let now = now();
        self.with_mut(|hub| {
            let broker = hub.broker_mut();
            broker
                .declare_exchange(&exchange, ExchangeKind::Topic)
                .map_err(|e| PublishError::Other(e.to_string()))?;
            broker
                .publish(now, &exchange, Envelope::raw(exchange.clone(), event_type, body))
                .map_err(|e| PublishError::Other(e.to_string()))
        })
    }

    /// Opens a link whose deliveries wake the driver behind `wake`.
    pub(crate) fn open_link(&self, waker: LinkWaker) -> LinkId {
        let mut state = self.lock();
        let id = state.hub.open_link();
        let index = id.into_raw() as usize;
        if state.links.len() <= index {
            state.links.resize_with(index + 1, || None);
        }
        state.links[index] = Some(LinkSlot { inbox: Vec::new(), waker });
        id
    }

    /// Closes `link`: its unacked deliveries (including any still in its inbox) return to
    /// their queues, and whatever becomes deliverable goes to the other links.
    pub(crate) fn close_link(&self, link: LinkId) {
        let now = now();
        let mut wakes = Vec::new();
        let mut state = self.lock();
        if let Some(slot) = state.links.get_mut(link.into_raw() as usize) {
            *slot = None;
        }
        state.hub.close_link(link);
        state.pump(now, None, &mut Vec::new(), &mut wakes);
        // The closing driver may have been the only one that knew the hub's next deadline.
        state.announced = None;
        state.announce(now, None);
        drop(state);
        wake_all(&mut wakes);
    }

    /// Applies `ops` in order for `link`, pumps, and moves `link`'s inbox into `inbox`.
    /// Publish confirms go to `confirms`; the other links' drivers to wake are woken after
    /// the lock is released (`wakes` is a scratch buffer, left empty). Returns the hub's next
    /// deadline.
    pub(crate) fn exchange(
        &self,
        now: Instant,
        link: LinkId,
        ops: &mut Vec<LinkOp>,
        confirms: &mut Vec<(PublishId, Result<(), PublishError>)>,
        inbox: &mut Vec<Delivery>,
        wakes: &mut Vec<LinkWaker>,
    ) -> Option<Instant> {
        let deadline = self.exchange_locked(now, link, ops, confirms, inbox, wakes);
        wake_all(wakes);
        deadline
    }

    fn exchange_locked(
        &self,
        now: Instant,
        link: LinkId,
        ops: &mut Vec<LinkOp>,
        confirms: &mut Vec<(PublishId, Result<(), PublishError>)>,
        inbox: &mut Vec<Delivery>,
        wakes: &mut Vec<LinkWaker>,
    ) -> Option<Instant> {
        let mut state = self.lock();
        for op in ops.drain(..) {
            if let Err((id, e)) = state.hub.apply(link, now, op, confirms) {
                tracing::error!(subscription = %id, error = %e, "memory hub subscribe failed");
            }
        }
        state.pump(now, Some(link), inbox, wakes);
        state.take_inbox(link, inbox);
        state.announce(now, Some(link));
        state.hub.poll_timeout()
    }

    fn lock(&self) -> MutexGuard<'_, HubState> {
        // A panic while holding the lock leaves the hub as consistent as the core left it.
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Default for MemoryHubHandle {
    /// The process-wide hub ([`global`](Self::global)), not a new one.
    fn default() -> Self {
        MemoryHubHandle::global()
    }
}

impl std::fmt::Debug for MemoryHubHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryHubHandle").finish_non_exhaustive()
    }
}

/// One Runner's link on a [`MemoryHubHandle`].
pub(crate) struct HubLink {
    hub: MemoryHubHandle,
    id: LinkId,
    /// Scratch: drivers to wake once the hub's lock is released.
    wakes: Vec<LinkWaker>,
}

impl Link for HubLink {
    fn exchange(&mut self, now: Instant, ops: &mut Vec<LinkOp>, inbox: &mut LinkInbox) -> Option<Instant> {
        self.hub.exchange(now, self.id, ops, &mut inbox.confirms, &mut inbox.deliveries, &mut self.wakes)
    }

    fn close(&mut self, _timeout: Duration) {
        self.hub.close_link(self.id);
    }
}

impl Connect for MemoryHubHandle {
    /// Opens a link on this hub (never fails, never waits).
    fn connect(self: Box<Self>, _spec: &LinkSpec, waker: LinkWaker) -> Result<Box<dyn Link>, LinkError> {
        let id = self.open_link(waker);
        Ok(Box::new(HubLink { hub: *self, id, wakes: Vec::new() }))
    }
}

/// The current time as the core counts it: Unix time read once per process, advanced by a
/// monotonic clock (so every Runner of the process agrees, and time never goes back).
pub(crate) fn now() -> Instant {
    struct Clock {
        base_std: std::time::Instant,
        base_unix: Instant,
    }
    static CLOCK: OnceLock<Clock> = OnceLock::new();
    let clock = CLOCK.get_or_init(|| {
        let unix = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        Clock {
            base_std: std::time::Instant::now(),
            base_unix: Instant::from_unix_nanos(u64::try_from(unix.as_nanos()).unwrap_or(u64::MAX)),
        }
    });
    clock.base_unix + clock.base_std.elapsed()
}

/// Wakes each driver in `wakes` (call with the hub unlocked), emptying it.
fn wake_all(wakes: &mut Vec<LinkWaker>) {
    for waker in wakes.drain(..) {
        waker.wake();
    }
}

struct HubState {
    hub: MemoryHub,
    links: Vec<Option<LinkSlot>>,
    /// The hub deadline every live driver has been told about.
    announced: Option<Instant>,
}

struct LinkSlot {
    inbox: Vec<Delivery>,
    waker: LinkWaker,
}

impl HubState {
    /// Pumps the broker: deliveries for `own` go straight to `own_inbox`, the others to their
    /// link's inbox. A link whose inbox was empty gets its driver's waker pushed on `wakes`,
    /// for the caller to [`wake_all`] once the lock is released.
    fn pump(
        &mut self,
        now: Instant,
        own: Option<LinkId>,
        own_inbox: &mut Vec<Delivery>,
        wakes: &mut Vec<LinkWaker>,
    ) {
        let HubState { hub, links, .. } = self;
        let mut orphans: Vec<DeliveryTag> = Vec::new();
        hub.pump(now, |d| {
            if Some(d.link) == own {
                own_inbox.push(d);
                return;
            }
            match links.get_mut(d.link.into_raw() as usize).and_then(Option::as_mut) {
                Some(slot) => {
                    if slot.inbox.is_empty() {
                        wakes.push(slot.waker.clone());
                    }
                    slot.inbox.push(d);
                }
                None => orphans.push(d.tag),
            }
        });
        for tag in orphans {
            hub.reject(now, tag, true);
        }
    }

    /// When the hub's next deadline comes earlier than the one every driver knows (or that
    /// one has passed), tells every driver but `own` (which gets it from `exchange`). Rare (a
    /// delayed retry's waiting queue appearing), so it sends under the hub lock; the lock order
    /// is always hub then channel.
    fn announce(&mut self, now: Instant, own: Option<LinkId>) {
        let Some(t) = self.hub.poll_timeout() else { return };
        if self.announced.is_some_and(|a| a > now && a <= t) {
            return;
        }
        self.announced = Some(t);
        for (i, slot) in self.links.iter().enumerate() {
            if let Some(slot) = slot
                && own.is_none_or(|l| l.into_raw() as usize != i)
            {
                // The driver exchanges with the hub on a wake-up, and learns the deadline.
                slot.waker.wake();
            }
        }
    }

    fn take_inbox(&mut self, link: LinkId, inbox: &mut Vec<Delivery>) {
        if let Some(slot) = self.links.get_mut(link.into_raw() as usize).and_then(Option::as_mut) {
            if inbox.is_empty() {
                std::mem::swap(inbox, &mut slot.inbox);
            } else {
                inbox.append(&mut slot.inbox);
            }
        }
    }
}

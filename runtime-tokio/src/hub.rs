//! The shared in-process broker ([`MemoryHubHandle`]) and the process clock.
//!
//! Every Runner of a hub holds the same `Arc<Mutex<..>>`: the core's [`MemoryHub`] plus, per
//! link, an inbox of deliveries and a wake-up signal. Critical sections are short and never
//! span an `.await`: a driver takes the lock once per batch of broker operations, applies
//! them in order, pumps the broker, and leaves each delivery in the inbox of the Runner that
//! owns its link (waking it through its input channel if its inbox was empty). Deliveries
//! wait in an inbox rather than in the bounded input channel because a delivery can be
//! neither dropped nor waited for under the lock; the inbox is bounded by the prefetch of
//! the link's consumers.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime};

use microfw_core::link::{ConnectAsync, ConnectFuture, Link, LinkInbox, LinkOp, LinkSpec, LinkWaker};
use microfw_core::memory::MemoryHub;
use microfw_core::{Delivery, DeliveryTag, Instant, LinkId, PublishError, PublishId};

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
    /// Keep `f` short: every Runner of the hub waits for it. `f` must not use this handle
    /// (the lock is not reentrant).
    pub fn with<R>(&self, f: impl FnOnce(&MemoryHub) -> R) -> R {
        f(&self.lock().hub)
    }

    /// Runs `f` on the hub under its lock (to declare or publish by hand), then hands every
    /// delivery it made possible to the Runner owning it. Same rules as [`with`](Self::with).
    pub fn with_mut<R>(&self, f: impl FnOnce(&mut MemoryHub) -> R) -> R {
        let now = now();
        let mut state = self.lock();
        let r = f(&mut state.hub);
        state.pump(now, None, &mut Vec::new());
        state.announce(now, None);
        r
    }

    /// Ready messages in queue `name` (`None`: no such queue).
    pub fn queue_len(&self, name: &str) -> Option<usize> {
        self.with(|h| h.broker().queue_len(name))
    }

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
        let mut state = self.lock();
        if let Some(slot) = state.links.get_mut(link.into_raw() as usize) {
            *slot = None;
        }
        state.hub.close_link(link);
        state.pump(now, None, &mut Vec::new());
        // The closing driver may have been the only one that knew the hub's next deadline.
        state.announced = None;
        state.announce(now, None);
    }

    /// Applies `ops` in order for `link`, pumps, and moves `link`'s inbox into `inbox`.
    /// Publish confirms go to `confirms`. Returns the hub's next deadline.
    pub(crate) fn exchange(
        &self,
        now: Instant,
        link: LinkId,
        ops: &mut Vec<LinkOp>,
        confirms: &mut Vec<(PublishId, Result<(), PublishError>)>,
        inbox: &mut Vec<Delivery>,
    ) -> Option<Instant> {
        let mut state = self.lock();
        for op in ops.drain(..) {
            if let Err((id, e)) = state.hub.apply(link, now, op, confirms) {
                tracing::error!(subscription = %id, error = %e, "memory hub subscribe failed");
            }
        }
        state.pump(now, Some(link), inbox);
        if let Some(slot) = state.links.get_mut(link.into_raw() as usize).and_then(Option::as_mut) {
            if inbox.is_empty() {
                std::mem::swap(inbox, &mut slot.inbox);
            } else {
                inbox.append(&mut slot.inbox);
            }
        }
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
}

impl Link for HubLink {
    fn exchange(&mut self, now: Instant, ops: &mut Vec<LinkOp>, inbox: &mut LinkInbox) -> Option<Instant> {
        self.hub.exchange(now, self.id, ops, &mut inbox.confirms, &mut inbox.deliveries)
    }

    fn close(&mut self, _timeout: Duration) {
        self.hub.close_link(self.id);
    }
}

impl ConnectAsync for MemoryHubHandle {
    /// Opens a link on this hub (never fails, never waits).
    fn connect(self: Box<Self>, _spec: LinkSpec, waker: LinkWaker) -> ConnectFuture {
        let id = self.open_link(waker);
        let link: Box<dyn Link> = Box::new(HubLink { hub: *self, id });
        Box::pin(std::future::ready(Ok(link)))
    }
}

/// The current time as the core counts it: Unix time read once per process, advanced by a
/// monotonic clock (so every Runner of the process agrees, and time never goes back).
pub(crate) fn now() -> Instant {
    let clock = clock();
    clock.base_unix + clock.base_std.elapsed()
}

/// The tokio instant of a core instant (for `sleep_until`), with no clock read.
pub(crate) fn to_tokio(at: Instant) -> tokio::time::Instant {
    let clock = clock();
    tokio::time::Instant::from_std(clock.base_std + at.saturating_duration_since(clock.base_unix))
}

struct Clock {
    base_std: std::time::Instant,
    base_unix: Instant,
}

fn clock() -> &'static Clock {
    static CLOCK: OnceLock<Clock> = OnceLock::new();
    CLOCK.get_or_init(|| {
        let unix = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        Clock {
            base_std: std::time::Instant::now(),
            base_unix: Instant::from_unix_nanos(u64::try_from(unix.as_nanos()).unwrap_or(u64::MAX)),
        }
    })
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
    /// When the hub's next deadline comes earlier than the one every driver knows, wakes
    /// every driver (but `own`, which gets it as `exchange`'s result) so it re-reads it.
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
                slot.waker.wake();
            }
        }
    }

    /// Pumps the broker: deliveries for `own` go straight to `own_inbox`, the others to their
    /// link's inbox (waking its driver when the inbox was empty).
    fn pump(&mut self, now: Instant, own: Option<LinkId>, own_inbox: &mut Vec<Delivery>) {
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
                        slot.waker.wake();
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
}

#[cfg(test)]
mod tests {
    use microfw_core::{
        Destination, Dialect, Envelope, HandlerType, Publish, Source, Subscribe, SubscriptionId, Transport,
    };

    use super::*;

    fn subscribe() -> LinkOp {
        LinkOp::Subscribe(Subscribe {
            id: SubscriptionId::from_raw(1),
            transport: Transport::Broker,
            source: Source::Event {
                source_service: "src".into(),
                event_type: "e".into(),
                handler_type: HandlerType::ServicePool,
                dialect: Dialect::Nameko,
                service: "svc".into(),
                route: "h".into(),
            },
            prefetch: 8,
        })
    }

    fn publish(id: u64) -> LinkOp {
        LinkOp::Publish(Publish {
            id: PublishId::from_raw(id),
            transport: Transport::Broker,
            destination: Destination::Event {
                source_service: "src".into(),
                event_type: "e".into(),
                dialect: Dialect::Nameko,
            },
            mandatory: false,
            envelope: Envelope::raw("", "", "1"),
        })
    }

    #[test]
    fn a_publish_lands_in_the_subscriber_inbox_and_wakes_it_once() {
        let hub = MemoryHubHandle::new();
        let wakes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = wakes.clone();
        let waker_a = LinkWaker::new(move || {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        });
        let a = hub.open_link(waker_a.clone());
        let b = hub.open_link(LinkWaker::noop());
        let (mut confirms, mut inbox) = (Vec::new(), Vec::new());
        hub.exchange(now(), a, &mut vec![subscribe()], &mut confirms, &mut inbox);
        assert!(inbox.is_empty() && confirms.is_empty());

        hub.exchange(now(), b, &mut vec![publish(1), publish(2)], &mut confirms, &mut inbox);
        assert_eq!(confirms.len(), 2);
        assert!(confirms.iter().all(|(_, r)| r.is_ok()));
        assert!(inbox.is_empty(), "the deliveries are a's, not b's");
        assert!(waker_a.is_pending());
        assert_eq!(wakes.load(std::sync::atomic::Ordering::Relaxed), 1, "one wake for a batch");
        assert!(waker_a.take());

        hub.exchange(now(), a, &mut Vec::new(), &mut confirms, &mut inbox);
        assert_eq!(inbox.len(), 2);
        assert!(inbox.iter().all(|d| d.link == a));
        assert!(!waker_a.is_pending());
        assert_eq!(hub.with(|h| h.broker().unacked_len("evt-src-e--svc.h")), Some(2));

        // Closing the link returns what it left unacked.
        hub.close_link(a);
        assert_eq!(hub.queue_len("evt-src-e--svc.h"), Some(2));
    }

    #[test]
    fn tokio_deadlines_follow_the_core_clock() {
        let now = now();
        let later = now + std::time::Duration::from_millis(250);
        let gap = to_tokio(later) - to_tokio(now);
        assert_eq!(gap, std::time::Duration::from_millis(250));
    }
}

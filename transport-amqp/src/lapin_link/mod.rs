//! The lapin IO half (feature `tokio`): a [`Link`] to RabbitMQ whose IO runs on tokio tasks.
//!
//! [`AmqpConnector`] opens it ([`ConnectAsync`]); a runtime's driver then talks to it only
//! through the [`Link`] seam. Every byte and every name comes from the pure half of this
//! crate ([`topology`](crate::topology), [`encode`](crate::encode), [`decode`](crate::decode)...);
//! this module only moves them.
//!
//! ## What the link does
//!
//! * One AMQP connection per link, heartbeats per `AMQP_HEARTBEAT`. One channel declares
//!   topology, one publishes (publisher confirms on), and each subscription consumes on a
//!   channel of its own, with a per-consumer `basic.qos` of its prefetch (0 = unlimited).
//! * Deliveries are decoded on the consumer's task and handed over with the driver's
//!   [`LinkWaker`]. The link's [`DeliveryTag`](microfw_core::DeliveryTag) packs the consumer
//!   channel's number (new for every channel opened) and the broker's tag.
//! * Acks and rejects are batched per channel: one `multiple` ack over the contiguous run of
//!   settled tags, single acks above a gap (so a slow handler never holds other settled
//!   deliveries' prefetch slots). Settlements wait, at most 2 ms, until a channel has a
//!   quarter of its prefetch of them (at most 64; nothing waits under a prefetch of 8), so one
//!   frame covers many; a barrier, a subscription change and closing send them at once.
//!   Settling a tag of a channel that is gone (a reconnect happened) does nothing: the broker
//!   redelivers the message.
//! * Deliveries and publish confirms that arrive together are handed over together (one lock
//!   of the shared inbox, one wake-up of the driver).
//! * Publishes are pipelined: everything handed over in one go is written, then the
//!   confirms are collected on a task of their own. A `basic.return` confirms
//!   [`PublishError::Unroutable`](microfw_core::PublishError::Unroutable), a `basic.nack`
//!   `Nacked`, a channel or connection lost before the confirm `LinkDown`. What
//!   [`publish_topology`](crate::publish_topology) says must exist is declared first, once
//!   per connection.
//! * Exchanges are declared with this service's flags; when one exists with other flags
//!   (406 PRECONDITION_FAILED, e.g. an events exchange a peer declared auto-delete), the link
//!   reopens its channel and adopts it with a passive declare. An adopted exchange that
//!   disappears (an auto-delete exchange losing its last binding) is declared again with
//!   this service's flags. A publish to an exchange that vanished fails (`LinkDown`) and
//!   closes the publish channel; the next batch reopens it and declares what it needs anew.
//! * When the connection drops, the link reconnects with exponential backoff, declares all
//!   topology again and resumes its consumers. Publishes handed over meanwhile wait, at most
//!   [`AmqpConnector::publish_wait`], then fail with `LinkDown`. A reply queue found missing
//!   after a reconnect (it expired, or was deleted) sets
//!   [`LinkInbox::reply_queue_lost`](microfw_core::link::LinkInbox::reply_queue_lost), and is
//!   declared anew for new calls.
//!
//! ## What it does NOT do
//!
//! No TLS (`amqps://` URIs fail to connect): lapin is built without its TLS features. It
//! never settles a delivery on its own, never retries a publish that reached the broker
//! (the Engine decides), and never re-checks an exchange or queue it declared once on the
//! current connection (a publish to an exchange deleted since fails, the publish channel is
//! reopened, and the next publish declares it again). A micro_framework RPC subscription
//! consumes several queues on one channel, each with the subscription's prefetch.

mod acks;
mod convert;
mod session;

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use lapin::ConnectionProperties;
use lapin::uri::AMQPUri;
use microfw_core::config::AmqpUri;
use microfw_core::link::{
    ConnectAsync, ConnectFuture, Link, LinkBarrier, LinkError, LinkInbox, LinkOp, LinkSpec, LinkWaker,
};
use microfw_core::{Delivery, Instant, PublishError, PublishId, Transport};
use tokio::sync::mpsc;

use crate::topology::AmqpSettings;
use session::{Command, Session};

/// Opens AMQP links on the tokio runtime it is polled in ([`ConnectAsync`]).
///
/// By default everything comes from the [`LinkSpec`]: the URI from `AMQP_URI`, the
/// heartbeat from `AMQP_HEARTBEAT` (it overrides a `heartbeat` in the URI's query), and the
/// names and flags from [`AmqpSettings::from_config`] (`RPC_EXCHANGE`,
/// `AUTO_DELETE_EVENT_EXCHANGES`). The builder methods override them. Prefetch is not a link
/// setting: each subscription carries its own (the Engine derives it from `PREFETCH_COUNT`
/// and the context's budget).
///
/// ```no_run
/// use microfw_core::link::{ConnectAsync, LinkSpec, LinkWaker};
/// use microfw_transport_amqp::AmqpConnector;
/// # async fn open(spec: LinkSpec, waker: LinkWaker) -> Result<(), microfw_core::link::LinkError> {
/// let link = Box::new(AmqpConnector::new()).connect(spec, waker).await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct AmqpConnector {
    uri: Option<AmqpUri>,
    settings: Option<AmqpSettings>,
    tuning: Tuning,
}

/// Timings of a link (see the [`AmqpConnector`] methods that set them).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tuning {
    pub(crate) connect_timeout: Duration,
    pub(crate) publish_wait: Duration,
    pub(crate) reconnect_first: Duration,
    pub(crate) reconnect_max: Duration,
}

impl Default for AmqpConnector {
    fn default() -> Self {
        AmqpConnector {
            uri: None,
            settings: None,
            tuning: Tuning {
                connect_timeout: Duration::from_secs(10),
                publish_wait: Duration::from_secs(5),
                reconnect_first: Duration::from_millis(200),
                reconnect_max: Duration::from_secs(10),
            },
        }
    }
}

impl AmqpConnector {
    /// A connector taking everything from the [`LinkSpec`]'s config.
    pub fn new() -> Self {
        AmqpConnector::default()
    }

    /// Connects to `uri` instead of the config's `AMQP_URI`.
    pub fn uri(mut self, uri: AmqpUri) -> Self {
        self.uri = Some(uri);
        self
    }

    /// Uses `settings` instead of [`AmqpSettings::from_config`] (e.g. to turn off the
    /// micro_framework reply binding, or to use reliable broadcast queues).
    pub fn settings(mut self, settings: AmqpSettings) -> Self {
        self.settings = Some(settings);
        self
    }

    /// How long the first connection may take (default 10 s). Reconnects use it too.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.tuning.connect_timeout = timeout;
        self
    }

    /// How long a publish handed over while the connection is down waits for the reconnect
    /// before it is confirmed as failed with `LinkDown` (default 5 s).
    pub fn publish_wait(mut self, wait: Duration) -> Self {
        self.tuning.publish_wait = wait;
        self
    }

    /// The pause before the first reconnect attempt, doubling after each failure up to
    /// `max` (defaults 200 ms and 10 s).
    pub fn reconnect_backoff(mut self, first: Duration, max: Duration) -> Self {
        self.tuning.reconnect_first = first;
        self.tuning.reconnect_max = max.max(first);
        self
    }

    async fn open(self, spec: LinkSpec, waker: LinkWaker) -> Result<Box<dyn Link>, LinkError> {
        if spec.transport != Transport::Broker {
            return Err(LinkError::Unsupported(format!(
                "the AMQP transport cannot carry the {:?} transport",
                spec.transport
            )));
        }
        let uri = self.uri.or_else(|| spec.config.amqp_uri.clone()).ok_or_else(|| LinkError::Connect {
            transport: "AMQP".into(),
            reason: "no AMQP_URI is configured".into(),
        })?;
        let settings =
            self.settings.unwrap_or_else(|| AmqpSettings::from_config(&spec.service, &spec.config));
        let setup = Setup::new(&uri, &spec, settings, self.tuning)?;
        let shared = Arc::new(Shared { inbox: Mutex::new(LinkInbox::default()), waker });
        let (commands, rx) = mpsc::unbounded_channel();
        let mut session = Session::new(Arc::new(setup), shared.clone(), rx);
        session.connect_first().await?;
        tokio::spawn(session.run());
        Ok(Box::new(LapinLink { commands, shared }))
    }
}

impl ConnectAsync for AmqpConnector {
    fn connect(self: Box<Self>, spec: LinkSpec, waker: LinkWaker) -> ConnectFuture {
        Box::pin((*self).open(spec, waker))
    }
}

/// What every task of one link reads: where to connect and how.
pub(crate) struct Setup {
    /// The parsed URI, password included: never printed.
    uri: AMQPUri,
    /// The password, to scrub from error texts.
    password: String,
    /// The URI as it may be logged.
    redacted: String,
    properties: ConnectionProperties,
    settings: AmqpSettings,
    tuning: Tuning,
}

impl Setup {
    fn new(
        uri: &AmqpUri,
        spec: &LinkSpec,
        settings: AmqpSettings,
        tuning: Tuning,
    ) -> Result<Self, LinkError> {
        let redacted = uri.redacted();
        let mut parsed: AMQPUri = uri.expose().parse().map_err(|e: String| LinkError::Connect {
            transport: redacted.clone(),
            reason: format!("invalid AMQP URI: {}", scrub_text(&e, uri.expose())),
        })?;
        let secs = spec.config.amqp_heartbeat.as_secs_f64().ceil();
        parsed.query.heartbeat = Some(if secs >= f64::from(u16::MAX) { u16::MAX } else { secs as u16 });
        let password = parsed.authority.userinfo.password.clone();
        let name = format!("microfw {}", spec.service);
        let properties = ConnectionProperties::default().with_connection_name(name.as_str().into());
        Ok(Setup { uri: parsed, password, redacted, properties, settings, tuning })
    }

    /// `text` without the password (error texts from the client library or the broker).
    fn scrub(&self, text: impl fmt::Display) -> String {
        scrub_text(&text.to_string(), &self.password)
    }
}

impl fmt::Debug for Setup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Setup").field("uri", &self.redacted).finish_non_exhaustive()
    }
}

fn scrub_text(text: &str, secret: &str) -> String {
    if secret.is_empty() { text.to_owned() } else { text.replace(secret, "***") }
}

/// What the IO tasks hand the driver, and its waker.
pub(crate) struct Shared {
    inbox: Mutex<LinkInbox>,
    waker: LinkWaker,
}

impl Shared {
    fn inbox(&self) -> MutexGuard<'_, LinkInbox> {
        self.inbox.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Hands several deliveries over at once (one lock, one wake-up).
    pub(crate) fn deliver_all(&self, deliveries: &mut Vec<Delivery>) {
        if deliveries.is_empty() {
            return;
        }
        self.inbox().deliveries.append(deliveries);
        self.waker.wake();
    }

    pub(crate) fn confirm(&self, id: PublishId, result: Result<(), PublishError>) {
        self.inbox().confirms.push((id, result));
        self.waker.wake();
    }

    /// Hands several confirms over at once (one lock, one wake-up).
    pub(crate) fn confirm_all(
        &self,
        confirms: impl IntoIterator<Item = (PublishId, Result<(), PublishError>)>,
    ) {
        let mut confirms = confirms.into_iter().peekable();
        if confirms.peek().is_none() {
            return;
        }
        self.inbox().confirms.extend(confirms);
        self.waker.wake();
    }

    pub(crate) fn reply_queue_lost(&self) {
        self.inbox().reply_queue_lost = true;
        self.waker.wake();
    }
}

/// The driver's side of a lapin link: queues operations for the session task and takes what
/// the IO tasks left in the shared inbox.
struct LapinLink {
    commands: mpsc::UnboundedSender<Command>,
    shared: Arc<Shared>,
}

impl Link for LapinLink {
    fn exchange(&mut self, _now: Instant, ops: &mut Vec<LinkOp>, inbox: &mut LinkInbox) -> Option<Instant> {
        if !ops.is_empty() {
            // One allocation of the right size; `ops` keeps its capacity for the next turn
            // (taking it would make the driver grow a new vector, copying, every turn).
            let mut batch = Vec::with_capacity(ops.len());
            batch.append(ops);
            let ops = batch;
            if let Err(mpsc::error::SendError(Command::Ops(ops))) = self.commands.send(Command::Ops(ops)) {
                // The session is gone (closed): publishes fail, settlements are moot.
                for op in ops {
                    if let LinkOp::Publish(p) = op {
                        self.shared
                            .confirm(p.id, Err(PublishError::LinkDown("the AMQP link is closed".into())));
                    }
                }
            }
        }
        let mut shared = self.shared.inbox();
        inbox.deliveries.append(&mut shared.deliveries);
        inbox.confirms.append(&mut shared.confirms);
        inbox.reply_queue_lost |= std::mem::take(&mut shared.reply_queue_lost);
        None
    }

    fn close(&mut self, timeout: Duration) {
        let (done, finished) = std::sync::mpsc::sync_channel(1);
        if self.commands.send(Command::Close { timeout, done }).is_ok() {
            let _ = finished.recv_timeout(timeout);
        }
    }

    fn barrier(&mut self) -> LinkBarrier {
        let (barrier, opener) = LinkBarrier::pair();
        // If the session is gone, the opener is dropped with the command and the barrier
        // reports that the link closed.
        let _ = self.commands.send(Command::Barrier(opener));
        barrier
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_scrubbed_and_the_heartbeat_comes_from_the_config() {
        let uri = AmqpUri::new("amqp://user:s3cret@127.0.0.1:5672/vh?heartbeat=99").unwrap();
        let config = microfw_core::config::Config {
            amqp_heartbeat: Duration::from_millis(2500),
            ..microfw_core::config::Config::default()
        };
        let spec = LinkSpec { service: "svc".into(), transport: Transport::Broker, config };
        let setup = Setup::new(&uri, &spec, AmqpSettings::new("svc"), AmqpConnector::new().tuning).unwrap();
        assert_eq!(setup.uri.query.heartbeat, Some(3));
        assert_eq!(setup.uri.vhost, "vh");
        assert_eq!(setup.scrub("login as user:s3cret refused"), "login as user:*** refused");
        assert!(!format!("{setup:?}").contains("s3cret"));
    }
}

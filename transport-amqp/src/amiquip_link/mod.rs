//! The blocking IO half (feature `sync`): an amiquip link for threaded runtimes, no tokio.
//!
//! [`AmqpSyncConnector`] implements [`Connect`]: it opens one AMQP connection (amiquip,
//! `amqp://` only: amiquip is built without TLS) and returns a [`Link`] whose IO runs on its
//! own std threads (amiquip's socket thread and this link's IO thread). The link moves bytes
//! and nothing more: every name, flag and byte comes from this crate's pure half ([`topology`],
//! [`publish_topology`], [`encode`], [`decode`]), every decision from the Engine.
//!
//! ## Contract
//!
//! * [`Link::exchange`] never blocks on IO: it hands the operations to the IO thread over a
//!   channel and takes what arrived from a shared inbox.
//! * Subscribe: declares the source's topology (an exchange that exists with other flags is
//!   adopted, see below), then one consumer per queue to consume with `basic.qos` prefetch =
//!   [`Subscribe::prefetch`](microfw_core::Subscribe) per consumer (0 = unlimited), manual ack.
//!   A micro_framework RPC subscription has one consumer per target queue, each with that
//!   prefetch. Deliveries are decoded with [`decode`] and numbered with the link's own
//!   [`DeliveryTag`](microfw_core::DeliveryTag)s.
//! * Publish: declares what [`publish_topology`] needs (once per connection), publishes the
//!   [`encode`]d message on a confirm channel without waiting, and reports the broker's verdict
//!   in [`LinkInbox::confirms`]: ack `Ok`, nack [`PublishError::Nacked`], a `basic.return`
//!   of a mandatory message [`PublishError::Unroutable`], a lost connection
//!   [`PublishError::LinkDown`] (the message may or may not have reached the broker). If the
//!   broker closes the publish channel (a publish to an exchange deleted meanwhile), the
//!   unconfirmed publishes fail with `LinkDown` and a new channel is opened, exchanges being
//!   declared again: the connection and its consumers stay.
//! * Ack / Reject: acks are batched per pass, `multiple` only over a contiguous run of done
//!   tags; rejects go out at once. Settling a delivery from before a reconnect does nothing.
//! * Events exchanges are declared with `AUTO_DELETE_EVENT_EXCHANGES`; on 406
//!   PRECONDITION_FAILED the exchange is declared passively and used as it is (any exchange,
//!   in fact). A refused queue declaration (406: a peer declared it with other arguments)
//!   fails the subscription: logged, and reported by the next [`Link::barrier`].
//! * Reconnect: on connection loss the link reconnects with exponential backoff (logged with
//!   `tracing`), declares everything again and resumes every consumer. Publishes handed over
//!   meanwhile wait up to [`AmqpSyncConnector::publish_wait`] (at most
//!   [`AmqpSyncConnector::max_waiting`] of them), then fail with `LinkDown`; none vanishes.
//!   The reply queue (`x-expires`) normally survives; when it did not (or the broker cancels
//!   its consumer), [`LinkInbox::reply_queue_lost`] is set and the queue declared again.
//! * Heartbeat `AMQP_HEARTBEAT` (a `heartbeat` in the URI wins), connection timeout 10 s
//!   unless the URI names one. The password of `AMQP_URI` never appears in logs or errors.
//! * [`Link::close`] carries out what was handed over, waits for outstanding confirms (for
//!   three quarters of its timeout), then closes: unsettled deliveries go back to the broker.
//!
//! ## What it does NOT do
//!
//! No TLS (`amqps://` fails to connect with a clear error), no channel pool (one consume and
//! one publish channel per connection), no WebSocket transport, no delayed-message plugin.
//! Publishes in flight when a connection is lost are reported failed, not sent again.

mod confirms;
mod convert;
mod declare;
mod io;
mod ledger;
mod publisher;
mod session;

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use amiquip::{Connection, ConnectionTuning};
use crossbeam_channel::{Receiver, Sender};
use microfw_core::config::AmqpUri;
use microfw_core::link::{Connect, Link, LinkBarrier, LinkError, LinkInbox, LinkOp, LinkSpec, LinkWaker};
use microfw_core::{PublishError, Transport};

use self::io::{Cmd, Io};
use crate::AmqpSettings;
#[cfg(doc)]
use crate::{decode, encode, publish_topology, topology};

/// Opens the blocking AMQP link of a service (amiquip on std threads).
///
/// By default everything comes from the [`LinkSpec`]: the URI from `AMQP_URI`, the heartbeat
/// from `AMQP_HEARTBEAT`, the names and flags from [`AmqpSettings::from_config`] (prefetch
/// arrives with each subscription, from `MAX_WORKERS` / `PREFETCH_COUNT`). The builder methods
/// override them.
///
/// ```no_run
/// use microfw_core::config::Config;
/// use microfw_core::link::{Connect, LinkSpec, LinkWaker};
/// use microfw_core::Transport;
/// use microfw_transport_amqp::AmqpSyncConnector;
///
/// let uri = microfw_core::config::AmqpUri::new("amqp://guest:guest@127.0.0.1:5672/").ok();
/// let config = Config { amqp_uri: uri, ..Config::default() };
/// let spec = LinkSpec { service: "svc".into(), transport: Transport::Broker, config };
/// let link = Box::new(AmqpSyncConnector::new()).connect(&spec, LinkWaker::noop())?;
/// # Ok::<(), microfw_core::link::LinkError>(())
/// ```
#[derive(Clone, Debug)]
pub struct AmqpSyncConnector {
    uri: Option<AmqpUri>,
    settings: Option<AmqpSettings>,
    options: Options,
}

/// Tuning of the link (see the builder methods of [`AmqpSyncConnector`]).
#[derive(Clone, Debug)]
pub(crate) struct Options {
    pub(crate) publish_wait: Duration,
    pub(crate) max_waiting: usize,
    pub(crate) backoff_min: Duration,
    pub(crate) backoff_max: Duration,
    pub(crate) connect_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            publish_wait: Duration::from_secs(30),
            max_waiting: 100_000,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

impl Default for AmqpSyncConnector {
    fn default() -> Self {
        AmqpSyncConnector::new()
    }
}

impl AmqpSyncConnector {
    /// A connector taking everything from the [`LinkSpec`] it connects with.
    pub fn new() -> Self {
        AmqpSyncConnector { uri: None, settings: None, options: Options::default() }
    }

    /// Connects to `uri` instead of the config's `AMQP_URI`.
    pub fn uri(mut self, uri: AmqpUri) -> Self {
        self.uri = Some(uri);
        self
    }

    /// Uses `settings` instead of [`AmqpSettings::from_config`] (to change
    /// `micro_framework_replies` or `reliable_broadcast`).
    pub fn settings(mut self, settings: AmqpSettings) -> Self {
        self.settings = Some(settings);
        self
    }

    /// How long a publish handed over while the connection is down waits for it to come back
    /// before it fails with [`PublishError::LinkDown`]. Default 30 s.
    pub fn publish_wait(mut self, wait: Duration) -> Self {
        self.options.publish_wait = wait;
        self
    }

    /// How many publishes may wait for the connection; more fail at once. Default 100 000.
    pub fn max_waiting(mut self, max: usize) -> Self {
        self.options.max_waiting = max;
        self
    }

    /// The reconnect backoff: first wait `min`, doubling up to `max`. Default 100 ms to 10 s.
    pub fn reconnect_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.options.backoff_min = min;
        self.options.backoff_max = max.max(min);
        self
    }
}

impl Connect for AmqpSyncConnector {
    /// Opens the connection (blocking, at most the connection timeout) and starts the link's
    /// IO thread. Fails with [`LinkError::Connect`] (password redacted) when the broker cannot
    /// be reached or refuses us, [`LinkError::Unsupported`] for a non-broker transport.
    fn connect(self: Box<Self>, spec: &LinkSpec, waker: LinkWaker) -> Result<Box<dyn Link>, LinkError> {
        let AmqpSyncConnector { uri, settings, options } = *self;
        if spec.transport != Transport::Broker {
            return Err(LinkError::Unsupported(format!("the AMQP link cannot carry {:?}", spec.transport)));
        }
        let Some(uri) = uri.or_else(|| spec.config.amqp_uri.clone()) else {
            return Err(LinkError::Connect {
                transport: "AMQP".into(),
                reason: "AMQP_URI is not set".into(),
            });
        };
        let settings =
            settings.unwrap_or_else(|| AmqpSettings::from_config(spec.service.clone(), &spec.config));
        let url = connection_url(uri.expose(), spec.config.amqp_heartbeat, options.connect_timeout);
        let conn = open(&url).map_err(|reason| LinkError::Connect { transport: uri.redacted(), reason })?;
        tracing::info!(uri = %uri, service = %spec.service, "AMQP connection open");

        let (cmds, cmd_rx) = crossbeam_channel::unbounded();
        let (done_tx, done) = crossbeam_channel::bounded(1);
        let shared = Arc::new(Mutex::new(LinkInbox::default()));
        let io = Io::new(url, uri.redacted(), settings, options, cmd_rx, shared.clone(), waker);
        let thread = std::thread::Builder::new()
            .name(format!("microfw-amqp-{}", spec.service))
            .spawn(move || {
                io.run(conn);
                let _ = done_tx.send(());
            })
            .map_err(|e| LinkError::Connect {
                transport: uri.redacted(),
                reason: format!("cannot start the IO thread: {e}"),
            })?;
        Ok(Box::new(AmqpSyncLink { cmds: Some(cmds), shared, thread: Some(thread), done }))
    }
}

/// The link [`AmqpSyncConnector`] returns.
struct AmqpSyncLink {
    /// `None` once closed.
    cmds: Option<Sender<Cmd>>,
    shared: Arc<Mutex<LinkInbox>>,
    thread: Option<JoinHandle<()>>,
    done: Receiver<()>,
}

impl Link for AmqpSyncLink {
    fn exchange(
        &mut self,
        _now: microfw_core::Instant,
        ops: &mut Vec<LinkOp>,
        inbox: &mut LinkInbox,
    ) -> Option<microfw_core::Instant> {
        if !ops.is_empty() {
            let batch = std::mem::take(ops);
            let refused = match &self.cmds {
                Some(tx) => match tx.send(Cmd::Ops(batch)) {
                    Ok(()) => Vec::new(),
                    Err(crossbeam_channel::SendError(Cmd::Ops(batch))) => batch,
                    Err(_) => Vec::new(),
                },
                None => batch,
            };
            for op in refused {
                if let LinkOp::Publish(p) = op {
                    inbox
                        .confirms
                        .push((p.id, Err(PublishError::LinkDown("the AMQP link is closed".into()))));
                }
            }
        }
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        inbox.deliveries.append(&mut shared.deliveries);
        inbox.confirms.append(&mut shared.confirms);
        inbox.reply_queue_lost |= std::mem::take(&mut shared.reply_queue_lost);
        None
    }

    fn close(&mut self, timeout: Duration) {
        let Some(cmds) = self.cmds.take() else { return };
        let _ = cmds.send(Cmd::Close(Instant::now() + timeout * 3 / 4));
        drop(cmds);
        match self.done.recv_timeout(timeout) {
            Ok(()) | Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                if let Some(thread) = self.thread.take() {
                    let _ = thread.join();
                }
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                tracing::warn!("the AMQP link did not close within {timeout:?}; leaving its thread behind");
            }
        }
    }

    fn barrier(&mut self) -> LinkBarrier {
        let (barrier, opener) = LinkBarrier::pair();
        if let Some(cmds) = &self.cmds {
            // If the IO thread is gone the opener is dropped: the barrier says so.
            let _ = cmds.send(Cmd::Barrier(opener));
        }
        barrier
    }
}

impl Drop for AmqpSyncLink {
    /// Dropped without [`Link::close`]: the IO thread closes on its own, without waiting for
    /// confirms, and is not waited for.
    fn drop(&mut self) {
        if let Some(cmds) = self.cmds.take() {
            let _ = cmds.send(Cmd::Close(Instant::now()));
        }
    }
}

impl std::fmt::Debug for AmqpSyncLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpSyncLink").field("open", &self.cmds.is_some()).finish_non_exhaustive()
    }
}

/// Opens a connection to `url`; the error text has the password scrubbed.
fn open(url: &str) -> Result<Connection, String> {
    // Publishes are three messages each into amiquip's IO thread: a deeper channel than the
    // default 16 keeps the publisher from blocking on every frame.
    let tuning = ConnectionTuning::default().mem_channel_bound(256);
    Connection::insecure_open_tuned(url, tuning).map_err(|e| convert::scrub(&e.to_string(), url))
}

/// `uri` with `heartbeat` (whole seconds, rounded up; 0 disables) and `connection_timeout`
/// query parameters added unless it names them.
fn connection_url(uri: &str, heartbeat: Duration, connect_timeout: Duration) -> String {
    let query = uri.split_once('?').map_or("", |(_, q)| q);
    let has = |name: &str| query.split('&').any(|kv| kv.split('=').next() == Some(name));
    let mut url = uri.to_owned();
    let mut add = |kv: String| {
        url.push(if url.contains('?') { '&' } else { '?' });
        url.push_str(&kv);
    };
    if !has("heartbeat") {
        let secs = heartbeat.as_secs() + u64::from(heartbeat.subsec_nanos() > 0);
        add(format!("heartbeat={}", secs.min(u64::from(u16::MAX))));
    }
    if !has("connection_timeout") {
        add(format!("connection_timeout={}", connect_timeout.as_millis()));
    }
    url
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_gets_heartbeat_and_timeout_unless_it_has_them() {
        let t = Duration::from_secs(10);
        assert_eq!(
            connection_url("amqp://u:p@h:5672/v", Duration::from_secs(10), t),
            "amqp://u:p@h:5672/v?heartbeat=10&connection_timeout=10000"
        );
        assert_eq!(
            connection_url("amqp://h/?heartbeat=3", Duration::from_millis(1500), t),
            "amqp://h/?heartbeat=3&connection_timeout=10000"
        );
        assert_eq!(
            connection_url("amqp://h/?connection_timeout=5", Duration::from_millis(1500), t),
            "amqp://h/?connection_timeout=5&heartbeat=2"
        );
        assert_eq!(
            connection_url("amqp://h/", Duration::ZERO, t),
            "amqp://h/?heartbeat=0&connection_timeout=10000"
        );
    }

    #[test]
    fn connect_failures_name_the_redacted_uri_only() {
        // Nothing listens on port 1.
        let config = microfw_core::config::Config {
            amqp_uri: AmqpUri::new("amqp://bob:hunter2@127.0.0.1:1/vh").ok(),
            ..Default::default()
        };
        let spec = LinkSpec { service: "svc".into(), transport: Transport::Broker, config };
        let error = Box::new(AmqpSyncConnector::new()).connect(&spec, LinkWaker::noop()).map(|_| ());
        let Err(LinkError::Connect { transport, reason }) = error else { panic!("{error:?}") };
        assert_eq!(transport, "amqp://bob:***@127.0.0.1:1/vh");
        assert!(!reason.contains("hunter2") && !transport.contains("hunter2"), "{reason}");
    }

    #[test]
    fn only_the_broker_transport_and_a_configured_uri_connect() {
        let config = microfw_core::config::Config::default();
        let mut spec = LinkSpec { service: "svc".into(), transport: Transport::Broker, config };
        let error = Box::new(AmqpSyncConnector::new()).connect(&spec, LinkWaker::noop()).map(|_| ());
        assert!(matches!(error, Err(LinkError::Connect { .. })), "{error:?}");
        spec.transport = Transport::WebSocket;
        let error = Box::new(AmqpSyncConnector::new()).connect(&spec, LinkWaker::noop()).map(|_| ());
        assert!(matches!(error, Err(LinkError::Unsupported(_))), "{error:?}");
    }
}

//! The link's IO thread: one amiquip connection at a time, its channels and consumers, and
//! the reconnect loop around them.
//!
//! The thread takes [`Cmd`]s from the link in order (a backlog keeps that order across a
//! connection loss), and waits on them, the publisher confirms and returns, and every
//! consumer with one crossbeam `Select`. Each pass drains everything ready, carries out the
//! backlog, sends the batched acks, and hands what arrived to the driver in one locked append
//! and one wake-up.
//!
//! Channels of a connection ([`Session`]): one consume channel for every consumer
//! (per-consumer prefetch: `basic.qos` with `global = false` before each `basic.consume`), one
//! confirm-mode publish channel, and the declaring channel
//! ([`Declarer`](super::declare::Declarer)), which a refused declaration may close without harm.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use amiquip::Connection;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use microfw_core::link::{BarrierOpener, LinkInbox, LinkOp, LinkWaker};
use microfw_core::{Publish, PublishError, PublishId, Source, Subscribe, SubscriptionId};

use super::Options;
use super::convert::scrub;
use super::publisher::Publisher;
use super::session::Session;
use crate::AmqpSettings;

/// What the link sends its IO thread.
#[derive(Debug)]
pub(crate) enum Cmd {
    /// Operations, in order.
    Ops(Vec<LinkOp>),
    /// Open this barrier once everything sent before it is carried out.
    Barrier(BarrierOpener),
    /// Flush and close; wait for outstanding confirms until the instant given.
    Close(Instant),
}

/// The IO thread's state that outlives a connection.
pub(crate) struct Io {
    /// The URL amiquip opens (holds the password: never log it).
    pub(crate) url: String,
    /// The URI for logs.
    pub(crate) redacted: String,
    pub(crate) settings: AmqpSettings,
    pub(crate) options: Options,
    pub(crate) cmds: Receiver<Cmd>,
    pub(crate) shared: Arc<Mutex<LinkInbox>>,
    pub(crate) waker: LinkWaker,
    /// Active subscriptions, restored on every connection.
    pub(super) subs: BTreeMap<SubscriptionId, Subscribe>,
    /// The source of every subscription ever made (retries and dead letters name them).
    pub(super) sources: HashMap<SubscriptionId, Source>,
    /// Reply-queue subscriptions whose queue a previous connection declared.
    pub(super) had_reply_queue: HashSet<SubscriptionId>,
    pub(super) last_tag: u64,
    /// Publishes waiting for a connection, with their deadline.
    pub(super) waiting: VecDeque<(Instant, Publish)>,
    /// Commands not carried out yet, in order.
    pub(super) backlog: VecDeque<Item>,
    /// Barriers waiting for the next connection's restore.
    pub(super) barriers: Vec<BarrierOpener>,
    /// Failures since the last barrier opened.
    pub(super) errors: Vec<String>,
    /// What arrived and is not handed to the driver yet.
    pub(super) out: LinkInbox,
}

#[derive(Debug)]
pub(super) enum Item {
    Op(LinkOp),
    Barrier(BarrierOpener),
    Close(Instant),
}

/// How a connection ended.
#[derive(Debug)]
pub(super) enum End {
    /// The link closed.
    Closed,
    /// The connection (or one of its essential channels) was lost.
    Lost(String),
}

impl Io {
    pub(crate) fn new(
        url: String,
        redacted: String,
        settings: AmqpSettings,
        options: Options,
        cmds: Receiver<Cmd>,
        shared: Arc<Mutex<LinkInbox>>,
        waker: LinkWaker,
    ) -> Self {
        Io {
            url,
            redacted,
            settings,
            options,
            cmds,
            shared,
            waker,
            subs: BTreeMap::new(),
            sources: HashMap::new(),
            had_reply_queue: HashSet::new(),
            last_tag: 0,
            waiting: VecDeque::new(),
            backlog: VecDeque::new(),
            barriers: Vec::new(),
            errors: Vec::new(),
            out: LinkInbox::default(),
        }
    }

    /// Serves `conn`, then reconnects with backoff whenever it is lost, until the link closes.
    pub(crate) fn run(mut self, conn: Connection) {
        let mut conn = Some(conn);
        let mut backoff = self.options.backoff_min;
        loop {
            if let Some(c) = conn.take() {
                match self.session(c) {
                    End::Closed => return,
                    End::Lost(reason) => {
                        tracing::warn!(uri = %self.redacted, "AMQP connection lost ({reason}); reconnecting");
                    }
                }
                backoff = self.options.backoff_min;
            }
            if self.outage(backoff) {
                return;
            }
            match super::open(&self.url) {
                Ok(c) => {
                    tracing::info!(uri = %self.redacted, "AMQP connection re-established");
                    conn = Some(c);
                }
                Err(reason) => {
                    backoff = (backoff * 2).min(self.options.backoff_max);
                    tracing::warn!(
                        uri = %self.redacted,
                        "AMQP reconnect failed ({reason}); next attempt in {backoff:?}"
                    );
                }
            }
        }
    }

    /// One connection: open the channels, restore, serve; close it when the link closes.
    fn session(&mut self, mut conn: Connection) -> End {
        let opened = conn.open_channel(None).and_then(|consume| Ok((consume, Publisher::open(&mut conn)?)));
        let end = match opened {
            // The session (its consumers cancelled) drops before the consume channel closes.
            Ok((consume, publisher)) => Session::new(self, &mut conn, &consume, publisher).serve(),
            Err(e) => End::Lost(scrub(&e.to_string(), &self.url)),
        };
        if let End::Closed = end
            && let Err(e) = conn.close()
        {
            tracing::debug!("closing the AMQP connection: {}", scrub(&e.to_string(), &self.url));
        }
        end
    }

    /// Waits `wait` with no connection, serving commands as well as it can: subscriptions
    /// are recorded for the restore, publishes wait (until their deadline), settling is a
    /// no-op. True when the link closed meanwhile.
    fn outage(&mut self, wait: Duration) -> bool {
        let until = Instant::now() + wait;
        loop {
            while let Some(item) = self.backlog.pop_front() {
                match item {
                    Item::Op(op) => self.op_down(op),
                    Item::Barrier(b) => self.barriers.push(b),
                    Item::Close(_) => {
                        self.close_down();
                        return true;
                    }
                }
            }
            let now = Instant::now();
            while self.waiting.front().is_some_and(|(deadline, _)| *deadline <= now) {
                if let Some((_, p)) = self.waiting.pop_front() {
                    let reason = format!("the AMQP link stayed down for {:?}", self.options.publish_wait);
                    self.out.confirms.push((p.id, Err(PublishError::LinkDown(reason))));
                }
            }
            self.flush_out();
            if now >= until {
                return false;
            }
            let next = self.waiting.front().map_or(until, |(deadline, _)| (*deadline).min(until));
            match self.cmds.recv_timeout(next.saturating_duration_since(now)) {
                Ok(cmd) => self.take_cmd(cmd),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => self.backlog.push_back(Item::Close(Instant::now())),
            }
        }
    }

    fn op_down(&mut self, op: LinkOp) {
        match op {
            LinkOp::Subscribe(s) => self.record(s),
            LinkOp::Unsubscribe(id) => {
                self.subs.remove(&id);
            }
            LinkOp::Publish(p) => self.wait(p),
            // Deliveries from before the loss are the broker's again.
            LinkOp::Ack(_) | LinkOp::Reject(..) => {}
        }
    }

    /// The link closed during an outage: waiting publishes and barriers fail.
    fn close_down(&mut self) {
        for (_, p) in self.waiting.drain(..) {
            let error = PublishError::LinkDown("the link closed while the AMQP connection was down".into());
            self.out.confirms.push((p.id, Err(error)));
        }
        for b in self.barriers.drain(..) {
            b.open(Err("the link closed while the AMQP connection was down".into()));
        }
        self.flush_out();
    }

    pub(super) fn record(&mut self, s: Subscribe) {
        self.sources.insert(s.id, s.source.clone());
        self.subs.insert(s.id, s);
    }

    /// Queues `p` for the next connection, or fails it when too many already wait.
    fn wait(&mut self, p: Publish) {
        if self.waiting.len() >= self.options.max_waiting {
            let reason = format!("the AMQP link is down and {} publishes already wait", self.waiting.len());
            self.out.confirms.push((p.id, Err(PublishError::LinkDown(reason))));
        } else {
            self.waiting.push_back((Instant::now() + self.options.publish_wait, p));
        }
    }

    pub(super) fn take_cmd(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Ops(ops) => self.backlog.extend(ops.into_iter().map(Item::Op)),
            Cmd::Barrier(b) => self.backlog.push_back(Item::Barrier(b)),
            Cmd::Close(deadline) => self.backlog.push_back(Item::Close(deadline)),
        }
    }

    pub(super) fn confirm(&mut self, id: PublishId, result: Result<(), PublishError>) {
        self.out.confirms.push((id, result));
    }

    pub(super) fn fail(&mut self, reason: String) {
        tracing::error!(uri = %self.redacted, "{reason}");
        self.errors.push(reason);
    }

    /// Hands what arrived to the driver and wakes it.
    pub(super) fn flush_out(&mut self) {
        if self.out.is_empty() {
            return;
        }
        {
            let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            shared.deliveries.append(&mut self.out.deliveries);
            shared.confirms.append(&mut self.out.confirms);
            shared.reply_queue_lost |= std::mem::take(&mut self.out.reply_queue_lost);
        }
        self.waker.wake();
    }

    pub(super) fn barrier_result(&mut self) -> Result<(), String> {
        if self.errors.is_empty() { Ok(()) } else { Err(std::mem::take(&mut self.errors).join("; ")) }
    }
}

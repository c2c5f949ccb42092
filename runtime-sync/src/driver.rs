//! The driver: the one thread that owns a service's [`Engine`].
//!
//! Each turn it feeds the Engine everything available (channel inputs, deliveries from its
//! inbox, publish confirms, due timeouts), drains every action, and hands the broker
//! operations to the hub in one locked batch. When nothing is left it blocks on its channel
//! with `recv_timeout(next deadline)`, the deadline being the earlier of the Engine's and the
//! hub's (a delayed retry's waiting queue).
//!
//! The channel is the crate's own small mutex-and-condvar channel ([`crate::chan`]: bounded,
//! `recv_timeout`, non-blocking `try_send` for the hub's wake-ups), not `std::sync::mpsc`,
//! whose wake-ups under an internal lock cost a lock convoy per hop (see that module); an
//! extra dependency would buy nothing. The worker pools share one such channel's
//! (cloneable) receiver (see the pool).
//!
//! Ordering: before taking any channel input the driver takes its inbox, so a delivery that
//! reached this Runner before a command was sent (for example a stop) is handed to the Engine
//! before that command.

use std::collections::HashMap;
use std::sync::mpsc::{RecvTimeoutError, TryRecvError};
use std::time::Duration;

use microfw_core::extract::Extensions;
use microfw_core::link::{Arrivals, LINK_CLOSE_TIMEOUT, LinkWaker, Links};
use microfw_core::metrics::ServiceMetrics;
use microfw_core::{
    Action, CallError, CallId, Dispatch, DispatchId, Engine, EngineEvent, Instant, Outcome, OutgoingCall,
    OutgoingEvent, PublishError, PublishId, RouteId, Severity,
};
use serde_json::Value;

use crate::chan::{self, Receiver, SyncSender};
use crate::hub::now;
use crate::pool::{Pool, WorkItem};

/// What a driver's input channel carries.
pub(crate) enum Input {
    /// A handler run ended.
    Outcome(Finished),
    /// An RPC call to make; the result goes to the sender.
    Call(OutgoingCall, SyncSender<Result<Value, CallError>>),
    /// An event to publish; the confirm goes to the sender.
    Emit(OutgoingEvent, SyncSender<Result<(), PublishError>>),
    /// A link has arrivals (or a new deadline: the shared hub next needs pumping when a
    /// delayed retry's waiting queue expires, and whichever driver is awake then pumps it, so
    /// a retry published by a Runner that has since stopped still reaches the others).
    Wake,
    /// Begin a graceful stop.
    Shutdown,
}

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Input::Outcome(done) => write!(f, "Outcome({})", done.id),
            Input::Call(c, _) => write!(f, "Call({}.{})", c.service, c.method),
            Input::Emit(e, _) => write!(f, "Emit({})", e.event_type),
            Input::Wake => f.write_str("Wake"),
            Input::Shutdown => f.write_str("Shutdown"),
        }
    }
}

/// A handler run that ended, as a worker reports it.
pub(crate) struct Finished {
    pub(crate) id: DispatchId,
    pub(crate) route: RouteId,
    pub(crate) outcome: Outcome,
    /// From the dispatch to the outcome.
    pub(crate) elapsed: Duration,
}

/// How a service's driver ended.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct StopReport {
    /// Runs and deliveries left unfinished because the shutdown timeout passed (0 on a clean
    /// stop). Their deliveries went back to the broker; their threads were detached.
    pub unfinished: usize,
}

pub(crate) struct Driver {
    pub(crate) engine: Engine,
    /// The service's links (broker, WebSocket), and the routing of link actions to them.
    pub(crate) links: Links,
    /// Set by any link when something arrived for this driver.
    pub(crate) waker: LinkWaker,
    pub(crate) rx: Receiver<Input>,
    /// Pool index by route id.
    pub(crate) route_pool: Vec<usize>,
    pub(crate) pools: Vec<Pool>,
    pub(crate) extensions: Extensions,
    pub(crate) calls: HashMap<CallId, SyncSender<Result<Value, CallError>>>,
    pub(crate) emits: HashMap<PublishId, SyncSender<Result<(), PublishError>>>,
    /// What the links handed over, fed to the Engine in the same turn.
    pub(crate) arrivals: Arrivals,
    pub(crate) outcomes: Vec<Finished>,
    /// The service's metric handles (no-ops unless a recorder was installed at start).
    pub(crate) metrics: ServiceMetrics,
    pub(crate) shutting_down: bool,
    pub(crate) stopped: Option<usize>,
}

/// Inputs taken from the channel per pass, so deliveries and the hub get their turn.
const INPUT_BATCH: usize = 256;

impl Driver {
    /// Drives the Engine until it stops, then closes the link and the pools.
    pub(crate) fn run(mut self) -> StopReport {
        loop {
            self.turn();
            if self.stopped.is_some() {
                break;
            }
            let deadline = match (self.engine.poll_timeout(), self.links.deadline()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let input = match deadline {
                Some(d) => self.rx.recv_timeout(d.saturating_duration_since(now())),
                // The driver's handle in the extensions holds a sender: never disconnected.
                None => self.rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            match input {
                Ok(input) => {
                    self.take_inbox_if_pending();
                    self.input(now(), input);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    // Every sender is gone: nobody can stop us any more, so stop now.
                    self.input(now(), Input::Shutdown);
                }
            }
        }
        self.finish()
    }

    /// Works until nothing is left to do without waiting.
    pub(crate) fn turn(&mut self) {
        loop {
            let now = now();
            let mut work = false;
            for _ in 0..INPUT_BATCH {
                match self.rx.try_recv() {
                    Ok(input) => {
                        self.take_inbox_if_pending();
                        self.input(now, input);
                        work = true;
                    }
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            self.take_inbox_if_pending();
            if !self.outcomes.is_empty() {
                work = true;
                let mut outcomes = std::mem::take(&mut self.outcomes);
                for done in outcomes.drain(..) {
                    self.finished(now, done);
                }
                if self.outcomes.is_empty() {
                    self.outcomes = outcomes; // keep the capacity
                }
            }
            work |= self.feed_arrivals(now);
            if self.engine.poll_timeout().is_some_and(|t| t <= now) {
                work = true;
                self.engine.handle_timeout(now);
            }
            work |= self.drain_actions();
            if self.links.has_ops() || self.links.deadline().is_some_and(|t| t <= now) {
                self.links.exchange(now, false, &mut self.arrivals);
                work |= !self.arrivals.is_empty();
            }
            if !work || self.stopped.is_some() {
                return;
            }
        }
    }

    /// What arrived on a link goes to the Engine before any later input.
    fn take_inbox_if_pending(&mut self) {
        if self.waker.take() {
            let now = now();
            self.links.exchange(now, true, &mut self.arrivals);
            self.feed_arrivals(now);
        }
    }

    /// Feeds what the links handed over to the Engine; true if there was any.
    fn feed_arrivals(&mut self, now: Instant) -> bool {
        for transport in &self.arrivals.lost {
            tracing::warn!(service = self.engine.service(), ?transport, "the reply queue was lost");
        }
        self.arrivals.feed(&mut self.engine, now)
    }

    fn input(&mut self, now: Instant, input: Input) {
        match input {
            Input::Outcome(done) => self.finished(now, done),
            Input::Call(call, reply) => {
                let id = self.engine.handle_call(now, call);
                self.calls.insert(id, reply);
            }
            Input::Emit(event, reply) => {
                let id = self.engine.handle_emit(now, event);
                self.emits.insert(id, reply);
            }
            Input::Wake => {} // the links were exchanged with before this input
            Input::Shutdown => {
                if !self.shutting_down {
                    self.shutting_down = true;
                    tracing::info!(service = self.engine.service(), "stopping");
                    self.engine.handle_shutdown(now);
                }
            }
        }
    }

    /// Carries out every pending action; true if there was any.
    fn drain_actions(&mut self) -> bool {
        let mut any = false;
        while let Some(action) = self.engine.poll_action() {
            any = true;
            let Some(action) = self.links.route(action, &mut self.arrivals) else { continue };
            match action {
                Action::Dispatch(d) => self.dispatch(d),
                Action::Resolve { call, result } => {
                    if let Some(reply) = self.calls.remove(&call) {
                        // Capacity 1, one send: never blocks. A dropped waiter is fine.
                        let _ = reply.try_send(result);
                    }
                }
                Action::Emitted { id, result } => {
                    if let Some(reply) = self.emits.remove(&id) {
                        let _ = reply.try_send(result);
                    }
                }
                Action::Event(e) => {
                    self.metrics.on_event(&e);
                    self.log(&e);
                }
                Action::Stopped { unfinished } => {
                    tracing::info!(service = self.engine.service(), unfinished, "stopped");
                    self.stopped = Some(unfinished);
                }
                // Routed to a link above.
                Action::Subscribe(_)
                | Action::Unsubscribe { .. }
                | Action::Publish(_)
                | Action::Ack(_)
                | Action::Reject { .. } => {}
            }
        }
        any
    }

    fn dispatch(&mut self, dispatch: Dispatch) {
        let Dispatch { id, route, mut job } = dispatch;
        self.metrics.dispatched(route);
        job.parts.extensions = self.extensions.clone();
        let failed = |message: String| Finished {
            id,
            route,
            outcome: Outcome::Panicked(message),
            elapsed: Duration::ZERO,
        };
        let Some(&pool) = self.route_pool.get(route.into_raw() as usize) else {
            self.outcomes.push(failed(format!("no handler for route {route}")));
            return;
        };
        let item = WorkItem { id, route, job, dispatched: std::time::Instant::now() };
        if self.pools[pool].submit(item).is_err() {
            self.outcomes.push(failed("the worker pool is gone".into()));
        }
    }

    fn finished(&mut self, now: Instant, done: Finished) {
        self.metrics.finished(done.route, &done.outcome, done.elapsed);
        self.engine.handle_outcome(now, done.id, done.outcome);
    }

    fn log(&self, event: &EngineEvent) {
        let service = self.engine.service();
        let text = self.engine.describe(event);
        match event.severity() {
            Severity::Warn => tracing::warn!(service, "{text}"),
            Severity::Info => tracing::info!(service, "{text}"),
            Severity::Debug => tracing::debug!(service, "{text}"),
        }
    }

    fn finish(mut self) -> StopReport {
        let unfinished = self.stopped.unwrap_or(0);
        // The Engine stopped with the events and calls of its last batch still waiting for
        // their confirms: report them, so an event that did go out is not reported as failed
        // (its Producer would otherwise see ShuttingDown and might publish it again).
        let now = now();
        for (id, result) in std::mem::take(&mut self.arrivals.inbox.confirms) {
            self.engine.handle_publish_result(now, id, result);
        }
        self.drain_actions();
        if self.links.has_ops() {
            self.links.exchange(now, false, &mut self.arrivals);
        }
        // Unsettled deliveries (and any a link still holds) go back to their queues.
        self.arrivals.inbox.deliveries.clear();
        self.links.close(LINK_CLOSE_TIMEOUT);
        // The close flushed the last publishes and waited for their confirms: report those
        // too (and those of the exchange above), or an event that went out would be reported
        // as not sent.
        self.links.exchange(now, true, &mut self.arrivals);
        for (id, result) in std::mem::take(&mut self.arrivals.inbox.confirms) {
            self.engine.handle_publish_result(now, id, result);
        }
        self.arrivals.inbox.deliveries.clear();
        self.drain_actions();
        // Waiters still registered see their sender dropped: ShuttingDown.
        self.calls.clear();
        self.emits.clear();
        if unfinished > 0 {
            // Worker processes still running an abandoned run are killed (and reaped).
            self.pools.iter().for_each(Pool::abandon);
        }
        let threads: Vec<_> = self.pools.iter_mut().flat_map(Pool::close).collect();
        // Dropping the receiver makes a worker's outcome send fail, so a thread finishing an
        // abandoned run ends instead of waiting on a channel nobody reads.
        drop(self);
        if unfinished == 0 {
            // Every run ended, so every thread is idle and ends now that its queue closed.
            for t in threads {
                let _ = t.join();
            }
        }
        // Otherwise threads still running an abandoned handler are detached: they end when
        // it returns.
        StopReport { unfinished }
    }
}

/// A driver channel: bounded, so senders wait when the driver falls behind.
pub(crate) fn channel(capacity: usize) -> (SyncSender<Input>, Receiver<Input>) {
    chan::sync_channel(capacity)
}

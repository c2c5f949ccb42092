//! The driver: the one task that owns a service's [`Engine`].
//!
//! Each turn it feeds the Engine everything available (channel inputs, outcomes of handlers
//! that finished inline, deliveries from its inbox, publish confirms, due timeouts), drains
//! every action, and hands the broker operations to the hub in one locked batch. When nothing
//! is left it waits for the first of: an input (a wake-up from the hub is one) or the next
//! deadline.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures_util::FutureExt;
use microfw_core::extract::{Extensions, Job};
use microfw_core::handler::{BoxedHandler, panic_message};
use microfw_core::metrics::ServiceMetrics;
use microfw_core::{
    Action, CallError, CallId, Dispatch, DispatchId, Engine, EngineEvent, Instant, Outcome, OutgoingCall,
    OutgoingEvent, PublishError, PublishId, RouteId, Severity,
};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;

use microfw_core::link::{Arrivals, LINK_CLOSE_TIMEOUT, LinkWaker, Links};

use crate::hub::{now, to_tokio};
use crate::pool::{Pool, WorkItem};

/// What the driver's input channel carries.
pub(crate) enum Input {
    /// A handler run ended.
    Outcome(Finished),
    /// An RPC call to make; the reply goes to the sender.
    Call(OutgoingCall, oneshot::Sender<Result<Value, CallError>>),
    /// An event to publish; the confirm goes to the sender.
    Emit(OutgoingEvent, oneshot::Sender<Result<(), PublishError>>),
    /// Begin a graceful stop.
    Shutdown,
    /// A link has arrivals (deliveries, confirms).
    Wake,
}

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Input::Outcome(done) => write!(f, "Outcome({})", done.id),
            Input::Call(c, _) => write!(f, "Call({}.{})", c.service, c.method),
            Input::Emit(e, _) => write!(f, "Emit({})", e.event_type),
            Input::Shutdown => f.write_str("Shutdown"),
            Input::Wake => f.write_str("Wake"),
        }
    }
}

/// A handler run that ended, as reported to the driver.
pub(crate) struct Finished {
    pub(crate) id: DispatchId,
    pub(crate) route: RouteId,
    pub(crate) outcome: Outcome,
    /// From the hand-off to the handler (pool queue or first poll) to its end.
    pub(crate) elapsed: Duration,
}

impl Finished {
    /// A run that never reached its handler.
    fn failed(id: DispatchId, route: RouteId, message: String) -> Self {
        Finished { id, route, outcome: Outcome::Panicked(message), elapsed: Duration::ZERO }
    }
}

/// Where a route's handler runs.
pub(crate) struct RouteExec<S> {
    pub(crate) handler: BoxedHandler<S>,
    /// The context's pool (threads, or worker processes), or `None` for async (tokio tasks).
    pub(crate) pool: Option<usize>,
}

/// How a driver ended.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct StopReport {
    /// Runs and deliveries left unfinished because the shutdown timeout passed (0 on a clean
    /// stop). Their deliveries went back to the broker.
    pub unfinished: usize,
}

pub(crate) struct Driver<S> {
    pub(crate) engine: Engine,
    /// The service's links (broker, WebSocket), and the routing of link actions to them.
    pub(crate) links: Links,
    /// Set by any link when something arrived for this driver.
    pub(crate) waker: LinkWaker,
    pub(crate) rx: mpsc::Receiver<Input>,
    pub(crate) tx: mpsc::Sender<Input>,
    pub(crate) routes: Vec<RouteExec<S>>,
    pub(crate) pools: Vec<Pool<S>>,
    pub(crate) state: S,
    pub(crate) extensions: Extensions,
    pub(crate) calls: IdMap<CallId, oneshot::Sender<Result<Value, CallError>>>,
    pub(crate) emits: IdMap<PublishId, oneshot::Sender<Result<(), PublishError>>>,
    /// Async runs that continue as tasks (aborted if the shutdown timeout abandons them).
    pub(crate) tasks: IdMap<DispatchId, AbortHandle>,
    /// What the links handed over, fed to the Engine in the same turn.
    pub(crate) arrivals: Arrivals,
    pub(crate) outcomes: Vec<Finished>,
    /// The service's metric handles (no-ops unless a recorder was current at start).
    pub(crate) metrics: ServiceMetrics,
    pub(crate) shutting_down: bool,
    pub(crate) stopped: Option<usize>,
    /// An input the wait received, fed in the next turn after the inbox.
    pub(crate) received: Option<Input>,
}

/// A map keyed by the Engine's sequential numeric ids: no SipHash needed.
pub(crate) type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;

/// Hashes one integer id by a multiplication (Fibonacci hashing).
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
}

/// Inputs taken from the channel per pass, so deliveries and the hub get their turn.
const INPUT_BATCH: usize = 256;
/// Passes per turn before the driver yields to the scheduler.
const MAX_PASSES: usize = 64;

impl<S: Clone + Send + Sync + 'static> Driver<S> {
    /// Drives the Engine until it stops, then closes the link and the pools.
    pub(crate) async fn run(mut self) -> StopReport {
        // One timer for the driver's life, moved only when the deadline changes.
        let sleep = tokio::time::sleep_until(to_tokio(now()));
        tokio::pin!(sleep);
        let mut armed: Option<Instant> = None;
        loop {
            let more = self.turn();
            if self.stopped.is_some() {
                break;
            }
            if more {
                tokio::task::yield_now().await;
                continue;
            }
            let deadline = match (self.engine.poll_timeout(), self.links.deadline()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            // Waking early is harmless (the turn finds nothing due and re-arms), so the timer
            // only moves when the deadline comes earlier than the armed one: a stream of calls
            // with ever later deadlines does not touch the timer wheel.
            if let Some(d) = deadline
                && armed.is_none_or(|a| d < a)
            {
                sleep.as_mut().reset(to_tokio(d));
                armed = Some(d);
            }
            tokio::select! {
                biased;
                input = self.rx.recv() => {
                    // The driver holds a sender itself, so the channel never closes here.
                    self.received = input;
                }
                () = &mut sleep, if armed.is_some() => armed = None,
            }
        }
        self.finish().await
    }

    /// Works until nothing is left to do (`false`), or until the pass budget is spent
    /// (`true`: call again after yielding).
    pub(crate) fn turn(&mut self) -> bool {
        // One clock read per turn: a turn lasts microseconds.
        let now = now();
        for _ in 0..MAX_PASSES {
            // The links first: deliveries that arrived before an input was sent are fed
            // before that input (a stop does not overtake work already delivered).
            // A load first: the swap (a write) only when a link did wake us.
            let woken = self.waker.is_pending() && self.waker.take();
            if woken || self.links.has_ops() || self.links.deadline().is_some_and(|t| t <= now) {
                self.links.exchange(now, woken, &mut self.arrivals);
            }
            if self.stopped.is_some() {
                return false;
            }
            let mut work = self.feed_arrivals(now);
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
            if let Some(input) = self.received.take() {
                work = true;
                self.input(now, input);
            }
            for _ in 0..INPUT_BATCH {
                match self.rx.try_recv() {
                    Ok(input) => {
                        self.input(now, input);
                        work = true;
                    }
                    Err(_) => break,
                }
            }
            if self.engine.poll_timeout().is_some_and(|t| t <= now) {
                work = true;
                self.engine.handle_timeout(now);
            }
            work |= self.drain_actions();
            if !work {
                return false;
            }
        }
        true
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
            Input::Outcome(done) => {
                if !self.tasks.is_empty() {
                    self.tasks.remove(&done.id);
                }
                self.finished(now, done);
            }
            Input::Call(call, reply) => {
                let id = self.engine.handle_call(now, call);
                self.calls.insert(id, reply);
            }
            Input::Emit(event, reply) => {
                let id = self.engine.handle_emit(now, event);
                self.emits.insert(id, reply);
            }
            // The waker's flag, checked each pass, is what says a link has arrivals.
            Input::Wake => {}
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
                        let _ = reply.send(result);
                    }
                }
                Action::Emitted { id, result } => {
                    if let Some(reply) = self.emits.remove(&id) {
                        let _ = reply.send(result);
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
        let Some(exec) = self.routes.get(route.into_raw() as usize) else {
            self.outcomes.push(Finished::failed(id, route, format!("no handler for route {route}")));
            return;
        };
        match exec.pool {
            Some(pool) => {
                let handler = exec.handler.clone();
                let state = self.state.clone();
                let item = WorkItem { id, route, handler, job, state, handed: std::time::Instant::now() };
                if let Err(id) = self.pools[pool].submit(item) {
                    self.outcomes.push(Finished::failed(id, route, "the worker pool is gone".into()));
                }
            }
            None => {
                let handler = &exec.handler;
                let state = self.state.clone();
                match run_async(handler, id, route, job, state, &self.tx) {
                    Ok(done) => self.outcomes.push(done),
                    Err(task) => {
                        self.tasks.insert(id, task);
                    }
                }
            }
        }
    }

    /// A run ended: its metrics, then the Engine.
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

    async fn finish(mut self) -> StopReport {
        let unfinished = self.stopped.unwrap_or(0);
        let now = now();
        if self.links.has_ops() {
            // The last acks, rejects and publishes, before the close returns whatever is left.
            self.links.exchange(now, false, &mut self.arrivals);
        }
        // The Engine stopped with the events and calls of its last batch still waiting for
        // their confirms: report them, so an event that did go out is not reported as failed
        // (its Producer would otherwise see ShuttingDown and might publish it again).
        // Deliveries that arrived meanwhile are not fed: the close returns them.
        for (id, result) in std::mem::take(&mut self.arrivals.inbox.confirms) {
            self.engine.handle_publish_result(now, id, result);
        }
        self.arrivals.inbox.deliveries.clear();
        self.drain_actions();
        // Closing may wait for the IO side to flush (a broker link): off the reactor.
        let mut links = std::mem::take(&mut self.links);
        let timeout = LINK_CLOSE_TIMEOUT;
        let closed = tokio::task::spawn_blocking(move || {
            links.close(timeout);
            links
        });
        if let Ok(mut links) = closed.await {
            // The close flushed the last publishes and waited for their confirms: report
            // those too, or an event that went out would be reported as not sent.
            links.exchange(now, true, &mut self.arrivals);
            for (id, result) in std::mem::take(&mut self.arrivals.inbox.confirms) {
                self.engine.handle_publish_result(now, id, result);
            }
            self.arrivals.inbox.deliveries.clear();
            self.drain_actions();
        }
        // Waiters still registered see their sender dropped: ShuttingDown.
        self.calls.clear();
        self.emits.clear();
        // Async runs the shutdown timeout abandoned are cancelled (their deliveries are
        // already back in the queue).
        for (_, task) in self.tasks.drain() {
            task.abort();
        }
        if unfinished > 0 {
            // Worker processes still running an abandoned run are killed (and reaped).
            self.pools.iter().for_each(Pool::abandon);
        }
        let threads: Vec<_> = self.pools.iter_mut().flat_map(Pool::close).collect();
        drop(self);
        if unfinished == 0 {
            // Every run ended, so every thread is idle and ends now that its queue closed.
            let _ = tokio::task::spawn_blocking(move || {
                for t in threads {
                    let _ = t.join();
                }
            })
            .await;
        }
        // Otherwise threads still running an abandoned handler are detached: they end when
        // it returns (their outcome has nowhere to go).
        StopReport { unfinished }
    }
}

/// Starts an async handler. It is polled once right here: a handler that finishes without
/// waiting (the common case for a quick handler) costs no task. Otherwise it continues as a
/// tokio task that sends its outcome to the driver. `Ok`: it already finished; `Err`: the
/// task's abort handle. The run's duration counts from just before the handler is called.
fn run_async<S: 'static>(
    handler: &BoxedHandler<S>,
    id: DispatchId,
    route: RouteId,
    job: Job,
    state: S,
    tx: &mpsc::Sender<Input>,
) -> Result<Finished, AbortHandle> {
    let start = std::time::Instant::now();
    let done = |outcome| Finished { id, route, outcome, elapsed: start.elapsed() };
    let mut fut = match catch_unwind(AssertUnwindSafe(|| handler.call_async(job, state))) {
        Ok(Some(fut)) => fut,
        Ok(None) => return Ok(done(Outcome::Panicked("a blocking handler cannot run as a task".into()))),
        Err(p) => return Ok(done(Outcome::Panicked(panic_message(&*p)))),
    };
    let mut cx = Context::from_waker(Waker::noop());
    match catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(&mut cx))) {
        Ok(Poll::Ready(outcome)) => Ok(done(outcome)),
        Err(p) => Ok(done(Outcome::Panicked(panic_message(&*p)))),
        Ok(Poll::Pending) => {
            let tx = tx.clone();
            let task = tokio::spawn(async move {
                let outcome = AssertUnwindSafe(fut)
                    .catch_unwind()
                    .await
                    .unwrap_or_else(|p| Outcome::Panicked(panic_message(&*p)));
                let done = Finished { id, route, outcome, elapsed: start.elapsed() };
                let _ = tx.send(Input::Outcome(done)).await;
            });
            Err(task.abort_handle())
        }
    }
}

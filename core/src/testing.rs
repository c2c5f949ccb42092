//! A deterministic simulator for testing services without a broker, a runtime or a clock.
//!
//! A [`Simulator`] holds Engines (one per service), a [`MemoryBroker`] and a virtual clock.
//! It does what a runtime does — carries out every [`Action`], moves messages through the
//! broker, runs handlers — but one step at a time, under your control, and it records every
//! action as a [`Record`] you can compare with `assert_eq!`.
//!
//! * [`Simulator::settle`] moves messages until nothing moves, without running handlers:
//!   dispatches wait in [`Simulator::pending`] so a test can complete them by hand
//!   ([`Simulator::complete`]) or run them ([`Simulator::run_next`], [`Simulator::run_all`]).
//! * [`Simulator::advance`] and [`Simulator::advance_to_next_deadline`] move the virtual clock
//!   (timers, retry delays, RPC deadlines, shutdown timeouts).
//! * Handlers run on the test's thread. Async handlers are polled until they finish; one that
//!   waits on something outside the simulator (a socket, a runtime timer) cannot finish here
//!   and is reported as a failed run.
//!
//! What it does NOT do: provide runtime extractors (`Producer`, `RpcProxy`); test those
//! handlers' routing by completing their dispatches by hand.

use std::collections::{HashMap, VecDeque};
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::Duration;

use serde_json::{Map, Value};

use crate::action::{
    Action, CallError, Destination, EngineEvent, OutgoingCall, OutgoingEvent, PublishError, Source, Transport,
};
use crate::broker::MemoryBroker;
use crate::engine::{Engine, EngineConfig};
use crate::extract::Job;
use crate::ids::{CallId, DispatchId, LinkId, PublishId, RouteId};
use crate::memory::MemoryLink;
use crate::message::Envelope;
use crate::outcome::Outcome;
use crate::route::Dialect;
use crate::service::{BuildError, HandlerTable, Service};
use crate::time::Instant;

/// The virtual clock's starting point: 2026-01-01T00:00:00Z.
pub const SIMULATION_EPOCH: Instant = Instant::from_unix_millis(1_767_225_600_000);

/// A service inside a [`Simulator`].
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct NodeId(usize);

/// An action as the simulator saw it, in a form tests can compare. Ids that carry no meaning
/// for a test (delivery tags, publish ids) are left out; routes are named.
#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    /// A consumer started.
    Subscribe(Source),
    /// A consumer could not start (the broker refused its topology).
    SubscribeFailed(String),
    /// A consumer stopped.
    Unsubscribe,
    /// A handler was dispatched: the route's name and the retries before this run.
    Dispatch {
        /// The route's name.
        route: String,
        /// Retries before this run (0 on the first).
        retry_count: u32,
    },
    /// A handler run ended with this outcome (recorded when the simulator reports it).
    Outcome {
        /// The route's name.
        route: String,
        /// The outcome.
        outcome: Outcome,
    },
    /// A message was published.
    Publish(Destination),
    /// A delivery was acked.
    Ack,
    /// A delivery was rejected.
    Reject {
        /// Put back on its queue.
        requeue: bool,
    },
    /// An outgoing call ended.
    Resolve(Result<Value, CallError>),
    /// An emitted event was confirmed or failed.
    Emitted(Result<(), PublishError>),
    /// An [`EngineEvent`].
    Event(EngineEvent),
    /// The Engine stopped.
    Stopped {
        /// Work abandoned at the shutdown timeout.
        unfinished: usize,
    },
}

/// A dispatch waiting for its outcome.
#[derive(Debug)]
pub struct PendingDispatch {
    /// The service.
    pub node: NodeId,
    /// The run.
    pub id: DispatchId,
    /// The route.
    pub route: RouteId,
    /// The job the handler would get.
    pub job: Job,
}

/// Engines, a memory broker and a virtual clock. See the [module docs](self).
#[derive(Debug)]
pub struct Simulator {
    now: Instant,
    broker: MemoryBroker,
    nodes: Vec<Node>,
    pending: VecDeque<PendingDispatch>,
}

impl Default for Simulator {
    fn default() -> Self {
        Simulator::new()
    }
}

impl Simulator {
    /// An empty simulation at [`SIMULATION_EPOCH`].
    pub fn new() -> Self {
        Simulator {
            now: SIMULATION_EPOCH,
            broker: MemoryBroker::new(),
            nodes: Vec::new(),
            pending: VecDeque::new(),
        }
    }

    /// Adds and starts a service with a default [`EngineConfig`] (seeded by its position).
    pub fn add_service<S: Clone + Send + Sync + 'static>(
        &mut self,
        service: Service<S>,
    ) -> Result<NodeId, BuildError> {
        let seed = 0x5EED_0000 + self.nodes.len() as u64;
        self.add_service_with(service, EngineConfig { seed, ..EngineConfig::default() })
    }

    /// Adds and starts a service with an explicit [`EngineConfig`].
    pub fn add_service_with<S: Clone + Send + Sync + 'static>(
        &mut self,
        service: Service<S>,
        config: EngineConfig,
    ) -> Result<NodeId, BuildError> {
        let (spec, handlers) = service.build()?;
        let mut engine = Engine::try_new(&spec, config)?;
        engine.handle_start(self.now);
        let id = NodeId(self.nodes.len());
        self.nodes.push(Node {
            engine,
            link: MemoryLink::new(LinkId::from_raw(id.0 as u32)),
            runner: Box::new(HandlerRunner(handlers)),
            records: Vec::new(),
            results: HashMap::new(),
            emitted: HashMap::new(),
        });
        self.settle();
        Ok(id)
    }

    /// The virtual now.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// The broker, for inspection.
    pub fn broker(&self) -> &MemoryBroker {
        &self.broker
    }

    /// The broker, to publish or declare by hand.
    pub fn broker_mut(&mut self) -> &mut MemoryBroker {
        &mut self.broker
    }

    /// A service's Engine, for inspection.
    pub fn engine(&self, node: NodeId) -> &Engine {
        &self.nodes[node.0].engine
    }

    /// Publishes an event as Nameko's standalone dispatcher would (bare JSON body, no
    /// headers), declaring the events exchange first, then settles.
    pub fn publish_event(&mut self, source_service: &str, event_type: &str, payload: &Value) {
        let exchange = crate::memory::events_exchange(source_service);
        let body = serde_json::to_vec(payload).unwrap_or_default();
        // Declaring a topic exchange that may exist cannot fail with the same kind.
        let _ = self.broker.declare_exchange(&exchange, crate::broker::ExchangeKind::Topic);
        let _ = self.broker.publish(self.now, &exchange, Envelope::raw(exchange.clone(), event_type, body));
        self.settle();
    }

    /// Emits an event from a service (as its `Producer` would, outside any handler).
    pub fn emit(&mut self, node: NodeId, event_type: &str, payload: &Value) -> PublishId {
        let engine = &mut self.nodes[node.0].engine;
        let event = OutgoingEvent {
            context: None,
            source_service: engine.service().to_owned(),
            event_type: event_type.to_owned(),
            payload: serde_json::to_vec(payload).unwrap_or_default().into(),
            dialect: Dialect::Nameko,
        };
        let id = engine.handle_emit(self.now, event);
        self.settle();
        id
    }

    /// Starts an RPC call from a service (standalone, outside any handler), then settles.
    /// `args` must be a JSON array and `kwargs` an object; anything else is sent empty.
    pub fn call(&mut self, node: NodeId, service: &str, method: &str, args: Value, kwargs: Value) -> CallId {
        self.call_with(node, service, method, args, kwargs, None, Transport::Broker)
    }

    /// Like [`call`](Self::call), with a timeout and a transport.
    #[allow(clippy::too_many_arguments)]
    pub fn call_with(
        &mut self,
        node: NodeId,
        service: &str,
        method: &str,
        args: Value,
        kwargs: Value,
        timeout: Option<Duration>,
        transport: Transport,
    ) -> CallId {
        let call = OutgoingCall {
            context: None,
            service: service.to_owned(),
            method: method.to_owned(),
            args: match args {
                Value::Array(a) => a,
                _ => Vec::new(),
            },
            kwargs: match kwargs {
                Value::Object(m) => m,
                _ => Map::new(),
            },
            timeout,
            transport,
            dialect: Dialect::Nameko,
        };
        let id = self.nodes[node.0].engine.handle_call(self.now, call);
        self.settle();
        id
    }

    /// Starts any outgoing call (dialect, transport, context of your choosing), then settles.
    pub fn call_raw(&mut self, node: NodeId, call: OutgoingCall) -> CallId {
        let id = self.nodes[node.0].engine.handle_call(self.now, call);
        self.settle();
        id
    }

    /// How a call ended, once it has.
    pub fn call_result(&self, node: NodeId, call: CallId) -> Option<&Result<Value, CallError>> {
        self.nodes[node.0].results.get(&call)
    }

    /// How an emitted event's publish ended, once it has.
    pub fn emit_result(&self, node: NodeId, id: PublishId) -> Option<&Result<(), PublishError>> {
        self.nodes[node.0].emitted.get(&id)
    }

    /// Every record of a service since the last call, oldest first.
    pub fn take_records(&mut self, node: NodeId) -> Vec<Record> {
        std::mem::take(&mut self.nodes[node.0].records)
    }

    /// Dispatches waiting for an outcome, oldest first.
    pub fn pending(&self) -> impl Iterator<Item = &PendingDispatch> {
        self.pending.iter()
    }

    /// Reports an outcome for a pending dispatch (without running its handler), then settles.
    /// Returns false if no such dispatch is pending.
    pub fn complete(&mut self, node: NodeId, id: DispatchId, outcome: Outcome) -> bool {
        let Some(at) = self.pending.iter().position(|p| p.node == node && p.id == id) else { return false };
        let pending = self.pending.remove(at);
        if let Some(p) = pending {
            self.finish(p.node, p.id, p.route, outcome);
        }
        true
    }

    /// Runs the oldest pending dispatch's handler and reports its outcome. Returns it, or
    /// `None` when nothing is pending.
    pub fn run_next(&mut self) -> Option<Outcome> {
        let p = self.pending.pop_front()?;
        let outcome = self.nodes[p.node.0].runner.run(p.job);
        self.finish(p.node, p.id, p.route, outcome.clone());
        Some(outcome)
    }

    /// Runs pending dispatches (and the ones they lead to) until none is left, without moving
    /// the clock. Returns how many ran.
    pub fn run_all(&mut self) -> usize {
        let mut ran = 0;
        while self.run_next().is_some() {
            ran += 1;
        }
        ran
    }

    /// Runs handlers and moves the clock from deadline to deadline until `duration` has passed
    /// (timers, retries and timeouts all fire on the way). Returns how many handlers ran.
    pub fn run_for(&mut self, duration: Duration) -> usize {
        let until = self.now + duration;
        let mut ran = self.run_all();
        loop {
            match self.next_deadline() {
                Some(t) if t <= until => {
                    self.set_time(t.max(self.now));
                    ran += self.run_all();
                }
                _ => break,
            }
        }
        self.set_time(until);
        ran + self.run_all()
    }

    /// Moves the clock forward by `by`, firing whatever falls due, then settles. Pending
    /// dispatches are not run.
    pub fn advance(&mut self, by: Duration) {
        let target = self.now + by;
        while let Some(t) = self.next_deadline().filter(|t| *t <= target) {
            self.set_time(t.max(self.now));
        }
        self.set_time(target);
    }

    /// Jumps the clock to the earliest deadline of any Engine or of the broker (a retry's
    /// waiting queue), fires it, and returns the new now; `None` when nothing waits on time.
    pub fn advance_to_next_deadline(&mut self) -> Option<Instant> {
        let t = self.next_deadline()?;
        self.set_time(t.max(self.now));
        Some(self.now)
    }

    /// Begins a service's graceful shutdown, then settles.
    pub fn shutdown(&mut self, node: NodeId) {
        self.nodes[node.0].engine.handle_shutdown(self.now);
        self.settle();
    }

    /// Carries out every action and moves every message until nothing moves. Handlers do not
    /// run: their dispatches wait in [`pending`](Self::pending).
    pub fn settle(&mut self) {
        loop {
            let mut moved = false;
            for index in 0..self.nodes.len() {
                moved |= self.drain(index);
            }
            while let Some(delivery) = self.broker.next_delivery(self.now) {
                let owner = self.nodes.iter().position(|n| n.link.owns(delivery.consumer));
                match owner {
                    Some(index) => {
                        moved = true;
                        let node = &mut self.nodes[index];
                        if let Some(d) = node.link.delivery(delivery) {
                            node.engine.handle_delivery(self.now, d);
                        }
                        self.drain(index);
                    }
                    None => {
                        let _ = self.broker.reject_at(self.now, delivery.tag, true);
                        break;
                    }
                }
            }
            if !moved {
                return;
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let engines = self.nodes.iter().filter_map(|n| n.engine.poll_timeout());
        engines.chain(self.broker.poll_timeout()).min()
    }

    fn set_time(&mut self, now: Instant) {
        self.now = now.max(self.now);
        self.broker.handle_timeout(self.now);
        for node in &mut self.nodes {
            if node.engine.poll_timeout().is_some_and(|t| t <= self.now) {
                node.engine.handle_timeout(self.now);
            }
        }
        self.settle();
    }

    fn finish(&mut self, node: NodeId, id: DispatchId, route: RouteId, outcome: Outcome) {
        let n = &mut self.nodes[node.0];
        let name = n.engine.route(route).map(|r| r.name.clone()).unwrap_or_default();
        n.records.push(Record::Outcome { route: name, outcome: outcome.clone() });
        n.engine.handle_outcome(self.now, id, outcome);
        self.settle();
    }

    /// Carries out one node's actions. Returns true if there were any.
    fn drain(&mut self, index: usize) -> bool {
        let mut any = false;
        let now = self.now;
        loop {
            let node = &mut self.nodes[index];
            let Some(action) = node.engine.poll_action() else { return any };
            any = true;
            match action {
                Action::Subscribe(s) => {
                    node.records.push(Record::Subscribe(s.source.clone()));
                    if let Err(e) = node.link.subscribe(&mut self.broker, &s) {
                        node.records.push(Record::SubscribeFailed(e.to_string()));
                    }
                }
                Action::Unsubscribe { id, .. } => {
                    node.records.push(Record::Unsubscribe);
                    let _ = node.link.unsubscribe(&mut self.broker, id);
                }
                Action::Dispatch(d) => {
                    let route = node.engine.route(d.route).map(|r| r.name.clone()).unwrap_or_default();
                    node.records
                        .push(Record::Dispatch { route, retry_count: d.job.parts.attempt.retry_count });
                    self.pending.push_back(PendingDispatch {
                        node: NodeId(index),
                        id: d.id,
                        route: d.route,
                        job: d.job,
                    });
                }
                Action::Publish(p) => {
                    node.records.push(Record::Publish(p.destination.clone()));
                    let id = p.id;
                    let result = node.link.publish(&mut self.broker, now, p);
                    node.engine.handle_publish_result(now, id, result);
                }
                Action::Ack(d) => {
                    node.records.push(Record::Ack);
                    let _ = self.broker.ack(d.tag);
                }
                Action::Reject { delivery, requeue } => {
                    node.records.push(Record::Reject { requeue });
                    let _ = self.broker.reject_at(now, delivery.tag, requeue);
                }
                Action::Resolve { call, result } => {
                    node.records.push(Record::Resolve(result.clone()));
                    node.results.insert(call, result);
                }
                Action::Emitted { id, result } => {
                    node.records.push(Record::Emitted(result.clone()));
                    node.emitted.insert(id, result);
                }
                Action::Event(e) => node.records.push(Record::Event(e)),
                Action::Stopped { unfinished } => node.records.push(Record::Stopped { unfinished }),
            }
        }
    }
}

struct Node {
    engine: Engine,
    link: MemoryLink,
    runner: Box<dyn RunJob>,
    records: Vec<Record>,
    results: HashMap<CallId, Result<Value, CallError>>,
    emitted: HashMap<PublishId, Result<(), PublishError>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("engine", &self.engine).field("records", &self.records.len()).finish()
    }
}

/// Runs a job with its route's handler, whatever the service's state type.
trait RunJob {
    fn run(&self, job: Job) -> Outcome;
}

struct HandlerRunner<S>(HandlerTable<S>);

impl<S: Clone + Send + Sync + 'static> RunJob for HandlerRunner<S> {
    fn run(&self, job: Job) -> Outcome {
        let Some(handler) = self.0.handler(job.parts.route) else {
            return Outcome::Panicked("no handler for this route".to_owned());
        };
        let state = self.0.state().clone();
        if handler.is_blocking() {
            return handler
                .call_blocking(job, state)
                .unwrap_or_else(|| Outcome::Panicked("not blocking".into()));
        }
        let mut cx = TaskContext::from_waker(Waker::noop());
        let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // Extractors run when the future is made: inside the catch, like the handler.
            let Some(mut future) = handler.call_async(job, state) else {
                return Some(Outcome::Panicked("not async".to_owned()));
            };
            // A future that is pending 1000 times in a row waits on something outside the
            // simulation (IO, a runtime timer) and can never finish here.
            for _ in 0..1000 {
                if let Poll::Ready(outcome) = future.as_mut().poll(&mut cx) {
                    return Some(outcome);
                }
            }
            None
        }));
        match polled {
            Ok(Some(outcome)) => outcome,
            Ok(None) => {
                Outcome::Panicked("the async handler waits on IO the simulator cannot drive".to_owned())
            }
            Err(payload) => Outcome::Panicked(crate::handler::panic_message(&*payload)),
        }
    }
}

//! The Engine: one per running service, a pure state machine.
//!
//! See [`Engine`] for the contract.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;

use crate::action::{
    Action, CallError, Delivery, Destination, Dispatch, EngineEvent, OutgoingCall, OutgoingEvent, Publish,
    PublishError, Source, Subscribe, Transport,
};
use crate::extract::{Attempt, Extensions, Job, JobInput, JobParts, PayloadData};
use crate::ids::{CallId, ContextId, DeliveryRef, DispatchId, IdMap, PublishId, RouteId, SubscriptionId};
use crate::message::{Body, Envelope, FieldValue, Headers, Properties, RemoteError, RpcReply, RpcRequest};
use crate::outcome::{HandlerError, Outcome, Rejection, RejectionStage};
use crate::retry::{RetryDecision, ladder_delay};
use crate::rng::Rng;
use crate::route::{
    ContextSpec, Dialect, Entrypoint, PayloadFilter, RouteSpec, Settle, ShutdownMode, pipeline_error,
};
use crate::service::ServiceSpec;
use crate::targets;
use crate::time::Instant;
use crate::worker_context::WorkerContext;

/// Header carrying how many retries a message has been through (frozen wire name).
pub const ATTEMPT_HEADER: &str = "x-microfw-attempt";
/// Header carrying a retried or dead-lettered message's original exchange (frozen).
pub const EXCHANGE_HEADER: &str = "x-microfw-exchange";
/// Header carrying a retried or dead-lettered message's original routing key (frozen).
pub const ROUTING_KEY_HEADER: &str = "x-microfw-routing-key";
/// Header carrying when the previous attempt failed, in Unix milliseconds.
pub const LAST_RETRY_HEADER: &str = "x-microfw-last-retry";
/// Header carrying the previous attempt's (or, on a dead letter, the final) error text.
pub const LAST_ERROR_HEADER: &str = "x-microfw-last-error";

/// Engine settings that are not part of the service definition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineConfig {
    /// Seed for correlation ids, reply keys, call ids and jitter. Runtimes draw it from OS
    /// entropy; tests fix it. Two instances with one seed would share reply routing keys.
    pub seed: u64,
    /// How long a shutdown may take before unfinished work is abandoned (`SHUTDOWN_TIMEOUT`).
    pub shutdown_timeout: Duration,
    /// The deadline of an outgoing RPC call that names none.
    pub rpc_timeout: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            seed: 0,
            shutdown_timeout: Duration::from_secs(30),
            rpc_timeout: Duration::from_secs(30),
        }
    }
}

/// Counters for metrics and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Handler runs in progress.
    pub running: usize,
    /// Jobs held because their context had no free worker.
    pub held: usize,
    /// Outgoing calls waiting for a reply.
    pub pending_calls: usize,
    /// Replies dropped because no call waited for them.
    pub unknown_replies: u64,
    /// Publishes waiting for their confirm.
    pub unconfirmed_publishes: usize,
}

/// The state machine of one service.
///
/// # Contract
///
/// * **Inputs** are the `handle_*` methods. Each takes `now`, the caller's current
///   [`Instant`]; the Engine never reads a clock, sleeps, spawns or draws OS randomness.
/// * **Outputs**: after every input, the runtime drains [`poll_action`](Self::poll_action)
///   until it returns `None`, carrying out each [`Action`] in order, then reads
///   [`poll_timeout`](Self::poll_timeout) and calls [`handle_timeout`](Self::handle_timeout)
///   no later than that instant. Feeding the next input before draining is allowed (actions
///   queue up in order) but delays them.
/// * Every [`Action::Dispatch`] is answered by exactly one
///   [`handle_outcome`](Self::handle_outcome); every [`Action::Publish`] by exactly one
///   [`handle_publish_result`](Self::handle_publish_result) (a link that goes down reports its
///   unconfirmed publishes as failed).
/// * Every delivery handed in is settled exactly once, by one [`Action::Ack`] or
///   [`Action::Reject`], unless the shutdown timeout abandons it
///   ([`Action::Stopped`] counts those); every call from [`handle_call`](Self::handle_call) is
///   resolved exactly once by an [`Action::Resolve`].
///
/// What it does NOT do: encode anything for a wire, name queues, or keep time. Transports do
/// the first two, runtimes the last.
#[derive(Debug)]
pub struct Engine {
    service: Arc<str>,
    config: EngineConfig,
    routes: Vec<RouteEntry>,
    contexts: Vec<ContextEntry>,
    subs: Vec<SubEntry>,
    timers: Vec<TimerEntry>,
    running: IdMap<DispatchId, Running>,
    delayed: BinaryHeap<Reverse<(Instant, u64)>>,
    delayed_tasks: IdMap<u64, Delayed>,
    calls: HashMap<String, PendingCall>,
    call_index: IdMap<CallId, String>,
    deadlines: BinaryHeap<Reverse<(Instant, CallId)>>,
    publishes: IdMap<PublishId, AfterPublish>,
    actions: VecDeque<Action>,
    rng: Rng,
    reply_to: String,
    reply_subs: [Option<SubscriptionId>; 2],
    phase: Phase,
    next_id: u64,
    unknown_replies: u64,
}

impl Engine {
    /// An Engine for `service`, not yet started.
    ///
    /// # Panics
    ///
    /// If the spec is inconsistent, which [`Service::build`](crate::Service::build) never
    /// produces; use [`try_new`](Self::try_new) for a hand-made spec.
    pub fn new(service: &ServiceSpec, config: EngineConfig) -> Self {
        match Engine::try_new(service, config) {
            Ok(engine) => engine,
            Err(e) => panic!("{e} (build the spec with Service::build)"),
        }
    }

    /// An Engine for `service`, or why its spec does not hold together (a route naming a
    /// context or callback that does not exist, a zero budget, a zero timer interval).
    pub fn try_new(service: &ServiceSpec, config: EngineConfig) -> Result<Self, crate::service::BuildError> {
        service.check()?;
        Ok(Engine::new_unchecked(service, config))
    }

    fn new_unchecked(service: &ServiceSpec, config: EngineConfig) -> Self {
        let mut rng = Rng::from_seed(config.seed);
        let reply_to = rng.uuid4();
        let contexts = service
            .contexts
            .iter()
            .map(|spec| ContextEntry { spec: spec.clone(), busy: 0, held: VecDeque::new() })
            .collect();
        let mut engine = Engine {
            service: service.name.clone(),
            config,
            routes: Vec::with_capacity(service.routes.len()),
            contexts,
            subs: Vec::new(),
            timers: Vec::new(),
            running: IdMap::default(),
            delayed: BinaryHeap::new(),
            delayed_tasks: IdMap::default(),
            calls: HashMap::new(),
            call_index: IdMap::default(),
            deadlines: BinaryHeap::new(),
            publishes: IdMap::default(),
            actions: VecDeque::new(),
            rng,
            reply_to,
            reply_subs: [None, None],
            phase: Phase::Idle,
            next_id: 0,
            unknown_replies: 0,
        };
        for (index, (spec, context)) in service.routes.iter().enumerate() {
            engine.add_route(RouteId(index as u32), spec.clone(), *context);
        }
        engine
    }

    /// The service name.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The routing key this Engine's RPC replies come back on (the requests' `reply_to`).
    pub fn reply_to(&self) -> &str {
        &self.reply_to
    }

    /// The route table, by [`RouteId`].
    pub fn route(&self, id: RouteId) -> Option<&RouteSpec> {
        self.routes.get(id.0 as usize).map(|r| &r.spec)
    }

    /// The context of a route.
    pub fn context_of(&self, id: RouteId) -> Option<&ContextSpec> {
        let route = self.routes.get(id.0 as usize)?;
        self.contexts.get(route.context.0 as usize).map(|c| &c.spec)
    }

    /// A one-line text for `event`, with route names resolved; formatted only when displayed,
    /// so a runtime can pass it to a log macro that may skip it.
    pub fn describe<'a>(&'a self, event: &'a EngineEvent) -> impl std::fmt::Display + 'a {
        EventText { engine: self, event }
    }

    /// Counters.
    pub fn stats(&self) -> EngineStats {
        EngineStats {
            running: self.running.len(),
            held: self.contexts.iter().map(|c| c.held.len()).sum(),
            pending_calls: self.calls.len(),
            unknown_replies: self.unknown_replies,
            unconfirmed_publishes: self.publishes.len(),
        }
    }

    /// True once [`Action::Stopped`] was emitted.
    pub fn is_stopped(&self) -> bool {
        matches!(self.phase, Phase::Stopped)
    }

    /// Starts the service: subscribes every consumer and arms the timers.
    pub fn handle_start(&mut self, now: Instant) {
        if !matches!(self.phase, Phase::Idle) {
            return;
        }
        self.phase = Phase::Running;
        for (i, sub) in self.subs.iter().enumerate() {
            self.actions.push_back(Action::Subscribe(Subscribe {
                id: SubscriptionId(i as u32),
                transport: sub.transport,
                source: sub.source.clone(),
                prefetch: sub.prefetch,
            }));
        }
        for timer in &mut self.timers {
            let eager = matches!(&self.routes[timer.route.0 as usize].spec.entrypoint, Entrypoint::Timer(t) if t.eager);
            timer.next = if eager { now } else { now + timer.interval };
        }
        self.fire_due_timers(now);
    }

    /// A link handed over a message.
    pub fn handle_delivery(&mut self, now: Instant, delivery: Delivery) {
        let delivery_ref = DeliveryRef { link: delivery.link, tag: delivery.tag };
        let Some(sub) = self.subs.get(delivery.subscription.0 as usize) else {
            self.actions.push_back(Action::Ack(delivery_ref));
            self.event(EngineEvent::Unexpected { subscription: delivery.subscription });
            return;
        };
        match &sub.kind {
            SubKind::Replies => self.on_reply(delivery_ref, delivery.envelope),
            _ if !matches!(self.phase, Phase::Running) => {
                self.actions.push_back(Action::Reject { delivery: delivery_ref, requeue: true });
            }
            SubKind::Route(route) => {
                let route = *route;
                self.on_event(now, route, delivery_ref, delivery.subscription, delivery.envelope);
            }
            SubKind::Rpc { .. } => {
                self.on_request(now, delivery_ref, delivery.subscription, delivery.envelope)
            }
        }
        self.check_stopped();
    }

    /// A handler run ended.
    pub fn handle_outcome(&mut self, now: Instant, dispatch: DispatchId, outcome: Outcome) {
        let Some(run) = self.running.remove(&dispatch) else { return };
        let context = self.routes[run.route.0 as usize].context;
        self.contexts[context.0 as usize].busy -= 1;
        if let Some(settlement) = run.after_callback {
            if let Some(error) = outcome.error() {
                self.event(EngineEvent::CallbackFailed { route: run.route, error });
            }
            self.settle_given_up(now, *settlement);
        } else {
            match outcome {
                Outcome::Success(value) => self.finish_success(now, run.origin, value),
                Outcome::Rejected(rejection) => {
                    self.reject(now, run.route, run.origin, rejection);
                }
                failed => {
                    let error =
                        failed.error().unwrap_or_else(|| HandlerError::fatal("Error", "unknown failure"));
                    self.on_failure(now, run.route, run.origin, run.input, run.attempt, error);
                }
            }
        }
        self.pump(now, context);
        self.check_stopped();
    }

    /// A link confirmed (or failed) a publish the Engine asked for.
    pub fn handle_publish_result(&mut self, now: Instant, id: PublishId, result: Result<(), PublishError>) {
        let Some(after) = self.publishes.remove(&id) else { return };
        match (after, result) {
            (AfterPublish::Nothing, Ok(())) => {}
            (AfterPublish::Nothing, Err(error)) => self.event(EngineEvent::ReplyLost { error }),
            (AfterPublish::Ack(delivery), Ok(())) => self.actions.push_back(Action::Ack(delivery)),
            (AfterPublish::Ack(delivery), Err(error)) => {
                // A reply that could not go out: the caller times out; the request is done.
                self.event(EngineEvent::ReplyLost { error });
                self.actions.push_back(Action::Ack(delivery));
            }
            (AfterPublish::AckOrRetry(settling), Ok(())) => {
                self.actions.push_back(Action::Ack(settling.delivery))
            }
            (AfterPublish::AckOrRetry(mut settling), Err(error)) => {
                // A retry or dead letter that did not reach the broker: keep the delivery
                // unacked and publish again after a growing pause. Requeueing it instead would
                // bring a poison message straight back here, in a tight loop.
                settling.failures += 1;
                let delay = republish_backoff(settling.failures);
                self.event(EngineEvent::SettlePublishFailed {
                    error,
                    failures: settling.failures,
                    retry_in: delay,
                });
                let key = self.next();
                self.delayed.push(Reverse((now + delay, key)));
                self.delayed_tasks.insert(key, Delayed::Republish(*settling));
            }
            (AfterPublish::Call(_), Ok(())) => {}
            (AfterPublish::Call(call), Err(error)) => {
                let error = match error {
                    PublishError::Unroutable => {
                        let service = self.call_service(call).unwrap_or_default();
                        CallError::UnknownService(service)
                    }
                    other => CallError::Publish(other),
                };
                self.resolve(call, Err(error));
            }
            (AfterPublish::Emit, result) => self.actions.push_back(Action::Emitted { id, result }),
        }
        self.check_stopped();
    }

    /// Time passed: fires timers, due in-engine retries, call deadlines and the shutdown
    /// deadline. Call it at (or after) [`poll_timeout`](Self::poll_timeout).
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(Reverse((deadline, call))) = self.deadlines.peek().copied() {
            if deadline > now {
                break;
            }
            self.deadlines.pop();
            if let Some(correlation) = self.call_index.get(&call)
                && let Some(pending) = self.calls.get(correlation)
            {
                let timeout = pending.timeout;
                self.resolve(call, Err(CallError::Timeout(timeout)));
            }
        }
        while let Some(Reverse((at, key))) = self.delayed.peek().copied() {
            if at > now {
                break;
            }
            self.delayed.pop();
            match self.delayed_tasks.remove(&key) {
                Some(Delayed::Task(task)) => self.admit(now, task),
                Some(Delayed::Republish(settling)) => self.publish_settling(settling),
                None => {}
            }
        }
        if matches!(self.phase, Phase::Running) {
            self.fire_due_timers(now);
        }
        if let Phase::Stopping { deadline } = self.phase
            && now >= deadline
        {
            let unsettled = self
                .publishes
                .values()
                .filter(|p| matches!(p, AfterPublish::Ack(_) | AfterPublish::AckOrRetry(_)))
                .count();
            let unfinished = self.running.len()
                + self.contexts.iter().map(|c| c.held.len()).sum::<usize>()
                + self.delayed_tasks.len()
                + unsettled;
            self.event(EngineEvent::ShutdownTimedOut { unfinished });
            self.stop(unfinished);
        }
        self.check_stopped();
    }

    /// Starts an outgoing RPC call. The reply, the deadline or a failure resolves it with one
    /// [`Action::Resolve`] naming the returned id.
    pub fn handle_call(&mut self, now: Instant, call: OutgoingCall) -> CallId {
        let id = CallId(self.next());
        if matches!(self.phase, Phase::Stopped) {
            self.actions.push_back(Action::Resolve { call: id, result: Err(CallError::ShuttingDown) });
            return id;
        }
        self.reply_subscription(call.transport);
        let correlation = self.rng.uuid4();
        let timeout = call.timeout.unwrap_or(self.config.rpc_timeout);
        let headers = match &call.context {
            Some(context) => context.outbound_headers(),
            None => self.standalone_context().outbound_headers(),
        };
        let envelope = Envelope {
            exchange: String::new(),
            routing_key: format!("{}.{}", call.service, call.method),
            headers,
            properties: Properties {
                content_type: Some("application/json".to_owned()),
                correlation_id: Some(correlation.clone()),
                reply_to: Some(self.reply_to.clone()),
                expiration_ms: Some(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX)),
            },
            body: Body::Request(RpcRequest {
                method: call.method.clone(),
                args: call.args,
                kwargs: call.kwargs,
            }),
        };
        let deadline = now + timeout;
        self.deadlines.push(Reverse((deadline, id)));
        self.call_index.insert(id, correlation.clone());
        self.calls.insert(
            correlation,
            PendingCall { id, timeout, transport: call.transport, service: call.service.clone() },
        );
        let destination =
            Destination::Rpc { service: call.service, method: call.method, dialect: call.dialect };
        self.publish(call.transport, destination, true, envelope, AfterPublish::Call(id));
        id
    }

    /// Publishes an event. Its confirm (or failure) comes back as [`Action::Emitted`] with the
    /// returned id.
    pub fn handle_emit(&mut self, _now: Instant, event: OutgoingEvent) -> PublishId {
        let headers = event.context.map(|c| c.outbound_headers()).unwrap_or_default();
        let envelope = Envelope {
            exchange: String::new(),
            routing_key: event.event_type.clone(),
            headers,
            properties: Properties {
                content_type: Some("application/json".to_owned()),
                ..Properties::default()
            },
            body: Body::Raw(event.payload),
        };
        let destination = Destination::Event {
            source_service: event.source_service,
            event_type: event.event_type,
            dialect: event.dialect,
        };
        if matches!(self.phase, Phase::Stopped) {
            let id = PublishId(self.next());
            self.actions.push_back(Action::Emitted {
                id,
                result: Err(PublishError::LinkDown("the service stopped".into())),
            });
            return id;
        }
        self.publish(Transport::Broker, destination, false, envelope, AfterPublish::Emit)
    }

    /// The transport lost the reply queue of `transport` (it will not come back with its
    /// messages): every call waiting on it fails now with [`CallError::ReplyQueueLost`]. A
    /// plain reconnect is NOT this: the reply queue outlives it, and calls stay pending.
    pub fn handle_reply_queue_lost(&mut self, _now: Instant, transport: Transport) {
        let lost: Vec<CallId> =
            self.calls.values().filter(|c| c.transport == transport).map(|c| c.id).collect();
        for call in lost {
            self.resolve(call, Err(CallError::ReplyQueueLost));
        }
    }

    /// Begins a graceful stop: consumers are cancelled, timers stop, and each context ends as
    /// its [`ShutdownMode`] says. [`Action::Stopped`] follows when all is settled, or when
    /// the shutdown timeout passes.
    pub fn handle_shutdown(&mut self, now: Instant) {
        match self.phase {
            Phase::Idle => {
                self.stop(0);
                return;
            }
            Phase::Running => {}
            Phase::Stopping { .. } | Phase::Stopped => return,
        }
        self.phase = Phase::Stopping { deadline: now + self.config.shutdown_timeout };
        for (i, sub) in self.subs.iter().enumerate() {
            if !matches!(sub.kind, SubKind::Replies) {
                self.actions.push_back(Action::Unsubscribe {
                    id: SubscriptionId(i as u32),
                    transport: sub.transport,
                });
            }
        }
        let mut handed_back = Vec::new();
        for context in &mut self.contexts {
            if context.spec.shutdown == ShutdownMode::FinishRunning {
                handed_back.extend(context.held.drain(..));
            }
        }
        let delayed = std::mem::take(&mut self.delayed_tasks);
        self.delayed.clear();
        for task in handed_back {
            self.hand_back(now, task);
        }
        for entry in delayed.into_values() {
            match entry {
                Delayed::Task(task) => self.hand_back(now, task),
                // Its settlement never reached the broker: the message goes back to its queue.
                Delayed::Republish(settling) => {
                    self.actions.push_back(Action::Reject { delivery: settling.delivery, requeue: true });
                }
            }
        }
        self.check_stopped();
    }

    /// The next action to carry out, in order; `None` when drained.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The instant by which [`handle_timeout`](Self::handle_timeout) must be called; `None`
    /// when nothing waits on time. May be earlier than necessary (a resolved call's old
    /// deadline), never later.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut earliest: Option<Instant> = None;
        let mut consider = |t: Instant| earliest = Some(earliest.map_or(t, |e| e.min(t)));
        if matches!(self.phase, Phase::Running) {
            for timer in &self.timers {
                consider(timer.next);
            }
        }
        if let Some(Reverse((t, _))) = self.delayed.peek() {
            consider(*t);
        }
        if let Some(Reverse((t, _))) = self.deadlines.peek() {
            consider(*t);
        }
        if let Phase::Stopping { deadline } = self.phase {
            consider(deadline);
        }
        earliest
    }
}

// ---------------------------------------------------------------------------------------------
// Private machinery.

/// [`Engine::describe`]'s text.
struct EventText<'a> {
    engine: &'a Engine,
    event: &'a EngineEvent,
}

impl std::fmt::Display for EventText<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = |r: &RouteId| self.engine.route(*r).map_or("?", |s| s.name.as_str());
        match self.event {
            EngineEvent::Retrying { route, attempt, delay, error } => {
                write!(f, "route {}: retry {attempt} in {delay:?} after {}", name(route), error.error)
            }
            EngineEvent::GaveUp { route, error } => {
                write!(f, "route {}: gave up after {}", name(route), error.error)
            }
            EngineEvent::DeadLettered { route } => write!(f, "route {}: message dead-lettered", name(route)),
            EngineEvent::CallbackFailed { route, error } => {
                write!(f, "failure callback {} failed: {}", name(route), error.error)
            }
            EngineEvent::ReplyLost { error } => write!(f, "RPC reply lost: {error}"),
            EngineEvent::SettlePublishFailed { error, failures, retry_in } => write!(
                f,
                "retry or dead-letter publish failed ({failures} so far, next try in {retry_in:?}): {error}"
            ),
            EngineEvent::ShutdownTimedOut { unfinished } => {
                write!(f, "shutdown timed out with {unfinished} unfinished")
            }
            EngineEvent::Filtered { route } => write!(f, "route {}: filtered out", name(route)),
            EngineEvent::Rejected { route, error } => write!(f, "route {}: rejected: {error}", name(route)),
            EngineEvent::CallbackSkipped { route } => {
                write!(f, "failure callback {} skipped at shutdown", name(route))
            }
            other => write!(f, "{other:?}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    Running,
    Stopping { deadline: Instant },
    Stopped,
}

#[derive(Debug)]
struct RouteEntry {
    spec: RouteSpec,
    context: ContextId,
    name: Arc<str>,
    /// The route's own subscription (event routes).
    sub: Option<SubscriptionId>,
    /// Transport of the route's deliveries (None for timers and callbacks).
    transport: Option<Transport>,
    /// Keep the decoded input after dispatch (for a callback or an in-engine retry).
    retain_input: bool,
    /// Keep the original body (for a broker retry or a dead letter).
    retain_body: bool,
    /// The route decodes payloads itself (a filter or translators).
    decodes: bool,
}

#[derive(Debug)]
struct ContextEntry {
    spec: ContextSpec,
    busy: u32,
    held: VecDeque<Task>,
}

#[derive(Debug)]
enum SubKind {
    Route(RouteId),
    Rpc { methods: HashMap<String, RouteId>, dialect: Dialect },
    Replies,
}

#[derive(Debug)]
struct SubEntry {
    kind: SubKind,
    transport: Transport,
    source: Source,
    prefetch: u32,
}

#[derive(Debug)]
struct TimerEntry {
    route: RouteId,
    interval: Duration,
    next: Instant,
    busy: bool,
    due: bool,
}

/// A unit of work between its arrival and its dispatch.
#[derive(Debug)]
struct Task {
    route: RouteId,
    origin: Origin,
    input: JobInput,
    headers: Headers,
    attempt: Attempt,
    at: Instant,
    failure: Option<HandlerError>,
    after_callback: Option<Box<Settlement>>,
}

/// What a finished job must settle.
#[derive(Debug)]
enum Origin {
    Delivery(Box<DeliveryOrigin>),
    Timer(usize),
    Detached,
}

#[derive(Debug)]
struct DeliveryOrigin {
    delivery: DeliveryRef,
    subscription: SubscriptionId,
    transport: Transport,
    exchange: String,
    routing_key: String,
    headers: Headers,
    properties: Properties,
    reply: Option<ReplyAddr>,
    original: Option<Body>,
}

#[derive(Debug, Clone)]
struct ReplyAddr {
    dialect: Dialect,
    reply_to: String,
    correlation_id: Option<String>,
}

#[derive(Debug)]
struct Running {
    route: RouteId,
    origin: Origin,
    input: Option<JobInput>,
    attempt: Attempt,
    after_callback: Option<Box<Settlement>>,
}

/// What remains to do once a route gave up: reply, settle, free the timer.
#[derive(Debug)]
struct Settlement {
    route: RouteId,
    origin: Origin,
    error: HandlerError,
}

/// A delayed piece of work.
#[derive(Debug)]
enum Delayed {
    /// A job to run again (in-engine retry of a timer or WebSocket job).
    Task(Task),
    /// A retry or dead-letter publish to try again.
    Republish(Settling),
}

/// A publish whose confirm settles a delivery: a copy is kept to publish again on failure.
#[derive(Debug)]
struct Settling {
    delivery: DeliveryRef,
    destination: Destination,
    envelope: Envelope,
    failures: u32,
}

#[derive(Debug)]
struct PendingCall {
    id: CallId,
    timeout: Duration,
    transport: Transport,
    service: String,
}

#[derive(Debug)]
enum AfterPublish {
    Nothing,
    Ack(DeliveryRef),
    /// A retry or dead-letter publish: ack the delivery once confirmed, publish again later
    /// if it fails.
    AckOrRetry(Box<Settling>),
    Call(CallId),
    Emit,
}

impl Engine {
    fn next(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn event(&mut self, event: EngineEvent) {
        self.actions.push_back(Action::Event(event));
    }

    fn add_route(&mut self, id: RouteId, spec: RouteSpec, context: ContextId) {
        let name: Arc<str> = Arc::from(spec.name.as_str());
        let has_callback = spec.callback.is_some();
        let retries = spec.retry.max_retries > 0;
        let dead_letters = spec.on_give_up == Settle::DeadLetter;
        let prefetch = self.contexts.get(context.0 as usize).map_or(1, |c| c.spec.prefetch);
        let mut entry = RouteEntry {
            context,
            name,
            sub: None,
            transport: None,
            retain_input: has_callback,
            retain_body: false,
            decodes: false,
            spec,
        };
        match &entry.spec.entrypoint {
            Entrypoint::Event(listener) => {
                entry.transport = Some(Transport::Broker);
                entry.retain_body = retries || dead_letters;
                entry.decodes = listener.filter.is_some() || !entry.spec.translators.is_empty();
                let sub = SubscriptionId(self.subs.len() as u32);
                self.subs.push(SubEntry {
                    kind: SubKind::Route(id),
                    transport: Transport::Broker,
                    source: Source::Event {
                        source_service: listener.source_service.clone(),
                        event_type: listener.event_type.clone(),
                        handler_type: listener.handler_type.clone(),
                        dialect: listener.dialect,
                        service: self.service.to_string(),
                        route: entry.spec.name.clone(),
                    },
                    prefetch,
                });
                entry.sub = Some(sub);
            }
            Entrypoint::Rpc(listener) => {
                entry.transport = Some(Transport::Broker);
                entry.retain_body = retries || dead_letters;
                let dialect = listener.dialect;
                let source = Source::Rpc { service: self.service.to_string(), dialect, methods: Vec::new() };
                entry.sub = Some(self.rpc_subscription(
                    Transport::Broker,
                    source,
                    dialect,
                    &entry.spec.name,
                    id,
                    context,
                ));
            }
            Entrypoint::WsRpc(_) => {
                entry.transport = Some(Transport::WebSocket);
                entry.retain_input |= retries;
                let source = Source::WsRpc { service: self.service.to_string() };
                entry.sub = Some(self.rpc_subscription(
                    Transport::WebSocket,
                    source,
                    Dialect::MicroFramework,
                    &entry.spec.name,
                    id,
                    context,
                ));
            }
            Entrypoint::Timer(timer) => {
                self.timers.push(TimerEntry {
                    route: id,
                    interval: timer.interval,
                    next: Instant::MAX,
                    busy: false,
                    due: false,
                });
            }
            Entrypoint::Callback => {}
        }
        self.routes.push(entry);
    }

    /// The shared RPC subscription of a transport and dialect, created on first use; its
    /// prefetch grows with each context that serves methods on it.
    fn rpc_subscription(
        &mut self,
        transport: Transport,
        source: Source,
        dialect: Dialect,
        method: &str,
        route: RouteId,
        context: ContextId,
    ) -> SubscriptionId {
        let prefetch = self.contexts.get(context.0 as usize).map_or(1, |c| c.spec.prefetch);
        let same_kind = |a: &Source, b: &Source| match (a, b) {
            (Source::Rpc { dialect: x, .. }, Source::Rpc { dialect: y, .. }) => x == y,
            (a, b) => a == b,
        };
        let existing =
            self.subs.iter().position(|s| s.transport == transport && same_kind(&s.source, &source));
        let index = existing.unwrap_or_else(|| {
            self.subs.push(SubEntry {
                kind: SubKind::Rpc { methods: HashMap::new(), dialect },
                transport,
                source,
                prefetch: 0,
            });
            self.subs.len() - 1
        });
        let sub = &mut self.subs[index];
        if let Source::Rpc { methods, .. } = &mut sub.source {
            methods.push(method.to_owned());
        }
        if let SubKind::Rpc { methods, .. } = &mut sub.kind {
            let context_seen =
                methods.values().any(|r| self.routes.get(r.0 as usize).map(|e| e.context) == Some(context));
            methods.insert(method.to_owned(), route);
            if !context_seen {
                sub.prefetch = sub.prefetch.saturating_add(prefetch);
            }
        }
        SubscriptionId(index as u32)
    }

    fn reply_subscription(&mut self, transport: Transport) -> SubscriptionId {
        let slot = match transport {
            Transport::Broker => 0,
            Transport::WebSocket => 1,
        };
        if let Some(id) = self.reply_subs[slot] {
            return id;
        }
        let id = SubscriptionId(self.subs.len() as u32);
        let source = Source::Replies { reply_to: self.reply_to.clone() };
        self.subs.push(SubEntry { kind: SubKind::Replies, transport, source: source.clone(), prefetch: 0 });
        self.reply_subs[slot] = Some(id);
        self.actions.push_back(Action::Subscribe(Subscribe { id, transport, source, prefetch: 0 }));
        id
    }

    fn standalone_context(&mut self) -> WorkerContext {
        let uuid = self.draw_u128();
        WorkerContext::empty(self.service.clone(), Arc::from("standalone_rpc_call"), uuid)
    }

    fn draw_u128(&mut self) -> u128 {
        (u128::from(self.rng.next_u64()) << 64) | u128::from(self.rng.next_u64())
    }

    fn on_event(
        &mut self,
        now: Instant,
        route: RouteId,
        delivery: DeliveryRef,
        sub: SubscriptionId,
        envelope: Envelope,
    ) {
        let entry = &self.routes[route.0 as usize];
        let Envelope { exchange, routing_key, headers, properties, body } = envelope;
        let Body::Raw(bytes) = body else {
            self.actions.push_back(Action::Ack(delivery));
            self.event(EngineEvent::Unexpected { subscription: sub });
            return;
        };
        let attempt = read_attempt(&headers);
        let original = entry.retain_body.then(|| Body::Raw(bytes.clone()));
        let origin = Origin::Delivery(Box::new(DeliveryOrigin {
            delivery,
            subscription: sub,
            transport: Transport::Broker,
            exchange,
            routing_key,
            headers: headers.clone(),
            properties,
            reply: None,
            original,
        }));
        let input = if entry.decodes {
            match run_pipeline(&entry.spec, &bytes) {
                Ok(Some(payload)) => payload,
                Ok(None) => {
                    self.event(EngineEvent::Filtered { route });
                    self.actions.push_back(Action::Ack(delivery));
                    return;
                }
                Err(rejection) => {
                    self.reject(now, route, origin, rejection);
                    return;
                }
            }
        } else {
            PayloadData::Raw(bytes)
        };
        let task = Task {
            route,
            origin,
            input: JobInput::Payload(input),
            headers,
            attempt,
            at: now,
            failure: None,
            after_callback: None,
        };
        self.admit(now, task);
    }

    fn on_request(&mut self, now: Instant, delivery: DeliveryRef, sub: SubscriptionId, envelope: Envelope) {
        let entry = &self.subs[sub.0 as usize];
        let transport = entry.transport;
        let SubKind::Rpc { methods, dialect } = &entry.kind else {
            self.actions.push_back(Action::Ack(delivery));
            self.event(EngineEvent::Unexpected { subscription: sub });
            return;
        };
        let dialect = *dialect;
        let Envelope { exchange, routing_key, headers, properties, body } = envelope;
        let reply = properties.reply_to.clone().map(|reply_to| ReplyAddr {
            dialect,
            reply_to,
            correlation_id: properties.correlation_id.clone(),
        });
        let request = match body {
            Body::Request(request) => request,
            Body::MalformedRequest { reason } => {
                self.answer_early(transport, delivery, reply, RemoteError::malformed_request(reason), "");
                return;
            }
            Body::Raw(_) | Body::Reply(_) => {
                let error = RemoteError::malformed_request("Message missing `args` or `kwargs`");
                self.answer_early(transport, delivery, reply, error, "");
                return;
            }
        };
        let lists_targets = dialect == Dialect::MicroFramework || transport == Transport::WebSocket;
        if lists_targets && targets::is_internal(&request.method) {
            let mut routes: Vec<RouteId> = methods.values().copied().collect();
            routes.sort_unstable();
            let specs = routes.iter().map(|r| &self.routes[r.0 as usize].spec);
            let answer = targets::answer(&request.method, &request.args, &request.kwargs, specs);
            match reply {
                Some(reply) => self.send_reply(transport, &reply, answer, AfterPublish::Ack(delivery)),
                None => {
                    self.actions.push_back(Action::Ack(delivery));
                    self.event(EngineEvent::NoReplyTo { method: request.method });
                }
            }
            return;
        }
        let Some(route) = methods.get(request.method.as_str()).copied() else {
            self.event(EngineEvent::MethodNotFound { method: request.method.clone() });
            let error = RemoteError::method_not_found(&request.method);
            self.answer_early(transport, delivery, reply, error, &request.method);
            return;
        };
        if reply.is_none() {
            self.actions.push_back(Action::Ack(delivery));
            self.event(EngineEvent::NoReplyTo { method: request.method });
            return;
        }
        let entry = &self.routes[route.0 as usize];
        let attempt = read_attempt(&headers);
        let original = entry.retain_body.then(|| Body::Request(request.clone()));
        let origin = Origin::Delivery(Box::new(DeliveryOrigin {
            delivery,
            subscription: sub,
            transport,
            exchange,
            routing_key,
            headers: headers.clone(),
            properties,
            reply,
            original,
        }));
        let task = Task {
            route,
            origin,
            input: JobInput::Rpc { args: request.args, kwargs: request.kwargs },
            headers,
            attempt,
            at: now,
            failure: None,
            after_callback: None,
        };
        self.admit(now, task);
    }

    /// Answers a request that never reaches a handler (unknown method, bad body), then acks
    /// it; without a `reply_to`, just acks and logs.
    fn answer_early(
        &mut self,
        transport: Transport,
        delivery: DeliveryRef,
        reply: Option<ReplyAddr>,
        error: RemoteError,
        method: &str,
    ) {
        match reply {
            Some(reply) => self.send_reply(transport, &reply, Err(error), AfterPublish::Ack(delivery)),
            None => {
                self.actions.push_back(Action::Ack(delivery));
                self.event(EngineEvent::NoReplyTo { method: method.to_owned() });
            }
        }
    }

    fn on_reply(&mut self, delivery: DeliveryRef, envelope: Envelope) {
        self.actions.push_back(Action::Ack(delivery));
        let correlation = envelope.properties.correlation_id;
        let pending = correlation.as_deref().and_then(|c| self.calls.get(c)).map(|p| p.id);
        match (pending, envelope.body) {
            (Some(call), Body::Reply(RpcReply { result })) => {
                self.resolve(call, result.map_err(CallError::Remote));
            }
            (Some(call), _) => {
                self.resolve(
                    call,
                    Err(CallError::MalformedReply("the reply body is not an RPC reply".into())),
                );
            }
            _ => {
                self.unknown_replies += 1;
                self.event(EngineEvent::UnknownReply { correlation_id: correlation });
            }
        }
    }

    fn resolve(&mut self, call: CallId, result: Result<Value, CallError>) {
        if let Some(correlation) = self.call_index.remove(&call) {
            self.calls.remove(&correlation);
            self.actions.push_back(Action::Resolve { call, result });
        }
    }

    fn call_service(&self, call: CallId) -> Option<String> {
        let correlation = self.call_index.get(&call)?;
        self.calls.get(correlation).map(|p| p.service.clone())
    }

    fn admit(&mut self, now: Instant, task: Task) {
        let context = self.routes[task.route.0 as usize].context;
        let ctx = &mut self.contexts[context.0 as usize];
        let stopping = !matches!(self.phase, Phase::Running);
        if stopping && ctx.spec.shutdown == ShutdownMode::FinishRunning && ctx.busy >= ctx.spec.max_workers {
            // Nothing new starts in a full context that only finishes running work.
            self.hand_back(now, task);
            return;
        }
        if ctx.busy < ctx.spec.max_workers && ctx.held.is_empty() {
            self.dispatch(now, task);
        } else {
            ctx.held.push_back(task);
            self.pump(now, context);
        }
    }

    /// Dispatches held tasks while the context has free workers.
    fn pump(&mut self, now: Instant, context: ContextId) {
        let draining = !matches!(self.phase, Phase::Running);
        loop {
            let ctx = &mut self.contexts[context.0 as usize];
            if ctx.busy >= ctx.spec.max_workers {
                return;
            }
            if draining && ctx.spec.shutdown == ShutdownMode::FinishRunning {
                return;
            }
            let Some(task) = ctx.held.pop_front() else { return };
            self.dispatch(now, task);
        }
    }

    fn dispatch(&mut self, _now: Instant, task: Task) {
        let id = DispatchId(self.next());
        let call_uuid = self.draw_u128();
        let route = &self.routes[task.route.0 as usize];
        self.contexts[route.context.0 as usize].busy += 1;
        let context = WorkerContext::new(self.service.clone(), route.name.clone(), task.headers, call_uuid);
        let retained = route.retain_input.then(|| task.input.clone());
        let job = Job {
            parts: JobParts {
                dispatch: id,
                route: task.route,
                dispatched_at: task.at,
                attempt: task.attempt.clone(),
                context,
                failure: task.failure,
                extensions: Extensions::new(),
            },
            input: task.input,
        };
        self.running.insert(
            id,
            Running {
                route: task.route,
                origin: task.origin,
                input: retained,
                attempt: task.attempt,
                after_callback: task.after_callback,
            },
        );
        self.actions.push_back(Action::Dispatch(Dispatch { id, route: task.route, job }));
    }

    fn finish_success(&mut self, now: Instant, origin: Origin, value: Option<Value>) {
        match origin {
            Origin::Delivery(o) => match &o.reply {
                Some(reply) => {
                    let result = Ok(value.unwrap_or(Value::Null));
                    self.send_reply(o.transport, reply, result, AfterPublish::Ack(o.delivery));
                }
                None => self.actions.push_back(Action::Ack(o.delivery)),
            },
            Origin::Timer(index) => self.timer_done(now, index),
            Origin::Detached => {}
        }
    }

    fn on_failure(
        &mut self,
        now: Instant,
        route: RouteId,
        origin: Origin,
        input: Option<JobInput>,
        attempt: Attempt,
        error: HandlerError,
    ) {
        let decision =
            self.routes[route.0 as usize].spec.retry.decide(attempt.retry_count, &error, now, &mut self.rng);
        match decision {
            RetryDecision::Retry { attempt: next, delay, at } => {
                let broker = matches!(&origin, Origin::Delivery(o) if o.transport == Transport::Broker);
                let delay = if broker { ladder_delay(delay) } else { delay };
                self.event(EngineEvent::Retrying { route, attempt: next, delay, error: error.clone() });
                match origin {
                    Origin::Delivery(o) if o.transport == Transport::Broker => {
                        let delivery = o.delivery;
                        let subscription = o.subscription;
                        let mut envelope = self.republished(&o, &error.error.message);
                        envelope.headers.insert(ATTEMPT_HEADER, i64::from(next));
                        envelope
                            .headers
                            .insert(LAST_RETRY_HEADER, FieldValue::I64(now.as_unix_millis() as i64));
                        let destination = Destination::Retry { subscription, delay };
                        self.publish_settling(Settling { delivery, destination, envelope, failures: 0 });
                    }
                    origin => {
                        let headers = match &origin {
                            Origin::Delivery(o) => o.headers.clone(),
                            _ => Headers::new(),
                        };
                        let task = Task {
                            route,
                            origin,
                            input: input.unwrap_or(JobInput::None),
                            headers,
                            attempt: Attempt {
                                retry_count: next,
                                last_retry: Some(now),
                                last_error: Some(error.error.message.clone()),
                            },
                            at,
                            failure: None,
                            after_callback: None,
                        };
                        if !matches!(self.phase, Phase::Running) {
                            self.hand_back(now, task);
                            return;
                        }
                        let key = self.next();
                        self.delayed.push(Reverse((at, key)));
                        self.delayed_tasks.insert(key, Delayed::Task(task));
                    }
                }
            }
            RetryDecision::GiveUp(_) => {
                self.event(EngineEvent::GaveUp { route, error: error.clone() });
                let settlement = Settlement { route, origin, error };
                match self.routes[route.0 as usize].spec.callback {
                    Some(callback) => {
                        let headers = match &settlement.origin {
                            Origin::Delivery(o) => o.headers.clone(),
                            _ => Headers::new(),
                        };
                        let task = Task {
                            route: callback,
                            origin: Origin::Detached,
                            input: input.unwrap_or(JobInput::None),
                            headers,
                            attempt,
                            at: now,
                            failure: Some(settlement.error.clone()),
                            after_callback: Some(Box::new(settlement)),
                        };
                        self.admit(now, task);
                    }
                    None => self.settle_given_up(now, settlement),
                }
            }
        }
    }

    /// A non-retryable refusal (filter, translator, decode or extractor failure).
    fn reject(&mut self, now: Instant, route: RouteId, origin: Origin, rejection: Rejection) {
        self.event(EngineEvent::Rejected { route, error: rejection.error.clone() });
        let error = HandlerError { retryable: false, error: rejection.error };
        self.settle_given_up(now, Settlement { route, origin, error });
    }

    /// Replies with the error (RPC), then acks or dead-letters the delivery as the route says.
    fn settle_given_up(&mut self, now: Instant, settlement: Settlement) {
        let Settlement { route, origin, error } = settlement;
        match origin {
            Origin::Delivery(o) => {
                let dead_letter = self.routes[route.0 as usize].spec.on_give_up == Settle::DeadLetter
                    && o.transport == Transport::Broker;
                let after_reply =
                    if dead_letter { AfterPublish::Nothing } else { AfterPublish::Ack(o.delivery) };
                match &o.reply {
                    Some(reply) => self.send_reply(o.transport, reply, Err(error.error.clone()), after_reply),
                    None if !dead_letter => self.actions.push_back(Action::Ack(o.delivery)),
                    None => {}
                }
                if dead_letter {
                    self.event(EngineEvent::DeadLettered { route });
                    let envelope = self.republished(&o, &error.error.message);
                    let destination = Destination::DeadLetter { subscription: o.subscription };
                    self.publish_settling(Settling {
                        delivery: o.delivery,
                        destination,
                        envelope,
                        failures: 0,
                    });
                }
            }
            Origin::Timer(index) => self.timer_done(now, index),
            Origin::Detached => {}
        }
    }

    /// The envelope for a retry or a dead letter: the original body and headers, plus where
    /// it first came from and the error text.
    fn republished(&self, o: &DeliveryOrigin, error: &str) -> Envelope {
        let mut headers = o.headers.clone();
        if headers.get(EXCHANGE_HEADER).is_none() {
            headers.insert(EXCHANGE_HEADER, o.exchange.as_str());
            headers.insert(ROUTING_KEY_HEADER, o.routing_key.as_str());
        }
        headers.insert(LAST_ERROR_HEADER, error);
        Envelope {
            exchange: o.exchange.clone(),
            routing_key: o.routing_key.clone(),
            headers,
            properties: o.properties.clone(),
            body: o.original.clone().unwrap_or(Body::Raw(Bytes::new())),
        }
    }

    fn send_reply(
        &mut self,
        transport: Transport,
        reply: &ReplyAddr,
        result: Result<Value, RemoteError>,
        after: AfterPublish,
    ) {
        let envelope = Envelope {
            exchange: String::new(),
            routing_key: reply.reply_to.clone(),
            headers: Headers::new(),
            properties: Properties {
                content_type: Some("application/json".to_owned()),
                correlation_id: reply.correlation_id.clone(),
                reply_to: None,
                expiration_ms: None,
            },
            body: Body::Reply(RpcReply { result }),
        };
        let destination = Destination::Reply { reply_to: reply.reply_to.clone(), dialect: reply.dialect };
        self.publish(transport, destination, false, envelope, after);
    }

    fn publish_settling(&mut self, settling: Settling) {
        let envelope = settling.envelope.clone();
        let destination = settling.destination.clone();
        self.publish(
            Transport::Broker,
            destination,
            false,
            envelope,
            AfterPublish::AckOrRetry(Box::new(settling)),
        );
    }

    fn publish(
        &mut self,
        transport: Transport,
        destination: Destination,
        mandatory: bool,
        envelope: Envelope,
        after: AfterPublish,
    ) -> PublishId {
        let id = PublishId(self.next());
        self.publishes.insert(id, after);
        self.actions.push_back(Action::Publish(Publish { id, transport, destination, mandatory, envelope }));
        id
    }

    fn fire_due_timers(&mut self, now: Instant) {
        for index in 0..self.timers.len() {
            let timer = &mut self.timers[index];
            if timer.next > now {
                continue;
            }
            let tick = timer.next;
            // Skip every tick that is already past: missed ticks coalesce into this one.
            let behind = (now - tick).as_nanos() / timer.interval.as_nanos().max(1);
            let steps = u32::try_from(behind + 1).unwrap_or(u32::MAX);
            timer.next = tick + timer.interval.saturating_mul(steps);
            if timer.busy {
                timer.due = true;
                let route = timer.route;
                self.event(EngineEvent::TimerCoalesced { route });
            } else {
                self.fire_timer(now, index, tick);
            }
        }
    }

    fn fire_timer(&mut self, now: Instant, index: usize, tick: Instant) {
        let timer = &mut self.timers[index];
        timer.busy = true;
        let task = Task {
            route: timer.route,
            origin: Origin::Timer(index),
            input: JobInput::None,
            headers: Headers::new(),
            attempt: Attempt::default(),
            at: tick,
            failure: None,
            after_callback: None,
        };
        self.admit(now, task);
    }

    fn timer_done(&mut self, now: Instant, index: usize) {
        let timer = &mut self.timers[index];
        timer.busy = false;
        if timer.due && matches!(self.phase, Phase::Running) {
            timer.due = false;
            self.fire_timer(now, index, now);
        }
    }

    /// Gives an unstarted task back at shutdown. A failure callback that never started is
    /// skipped: its route already gave up, so its delivery is settled (acked or dead-lettered)
    /// rather than run through the route once more.
    fn hand_back(&mut self, now: Instant, task: Task) {
        if let Some(settlement) = task.after_callback {
            self.event(EngineEvent::CallbackSkipped { route: task.route });
            self.settle_given_up(now, *settlement);
            return;
        }
        match task.origin {
            Origin::Delivery(o) => {
                self.actions.push_back(Action::Reject { delivery: o.delivery, requeue: true })
            }
            Origin::Timer(index) => self.timers[index].busy = false,
            Origin::Detached => {}
        }
    }

    fn check_stopped(&mut self) {
        if !matches!(self.phase, Phase::Stopping { .. }) {
            return;
        }
        let idle = self.running.is_empty()
            && self.delayed_tasks.is_empty()
            && self.contexts.iter().all(|c| c.held.is_empty())
            && self
                .publishes
                .values()
                .all(|p| matches!(p, AfterPublish::Call(_) | AfterPublish::Emit | AfterPublish::Nothing));
        if idle {
            self.stop(0);
        }
    }

    fn stop(&mut self, unfinished: usize) {
        self.phase = Phase::Stopped;
        self.running.clear();
        for context in &mut self.contexts {
            context.held.clear();
            context.busy = 0;
        }
        self.delayed.clear();
        self.delayed_tasks.clear();
        self.publishes.retain(|_, p| matches!(p, AfterPublish::Call(_) | AfterPublish::Emit));
        let calls: Vec<CallId> = self.call_index.keys().copied().collect();
        for call in calls {
            self.resolve(call, Err(CallError::ShuttingDown));
        }
        self.deadlines.clear();
        self.actions.push_back(Action::Stopped { unfinished });
    }
}

/// The pause before publishing a failed retry or dead letter again: 1 s, 2 s, 4 s ... 60 s.
fn republish_backoff(failures: u32) -> Duration {
    let secs = 1u64 << failures.saturating_sub(1).min(6);
    Duration::from_secs(secs.min(60))
}

/// The number of retries a message has been through, from its attempt header.
fn read_attempt(headers: &Headers) -> Attempt {
    if headers.is_empty() {
        return Attempt::default();
    }
    let retry_count =
        headers.get(ATTEMPT_HEADER).and_then(FieldValue::as_i64).and_then(|n| u32::try_from(n).ok());
    let Some(retry_count) = retry_count else { return Attempt::default() };
    Attempt {
        retry_count,
        last_retry: headers
            .get(LAST_RETRY_HEADER)
            .and_then(FieldValue::as_i64)
            .and_then(|ms| u64::try_from(ms).ok())
            .map(Instant::from_unix_millis),
        last_error: headers.get(LAST_ERROR_HEADER).and_then(FieldValue::as_str).map(str::to_owned),
    }
}

/// Decodes once, filters, translates. `Ok(None)`: filtered out.
fn run_pipeline(spec: &RouteSpec, bytes: &Bytes) -> Result<Option<PayloadData>, Rejection> {
    let filter = match &spec.entrypoint {
        Entrypoint::Event(listener) => listener.filter.as_ref(),
        _ => None,
    };
    let decode_error = |e: String| Rejection {
        stage: RejectionStage::Decode,
        error: pipeline_error("PayloadDecodeError", &e),
    };
    let filter_error =
        |e: String| Rejection { stage: RejectionStage::Filter, error: pipeline_error("FilterError", &e) };
    if spec.translators.is_empty()
        && let Some(PayloadFilter::Typed(typed)) = filter
    {
        // One decode, into the filter's type; the handler takes it if it wants that type.
        return match (typed.from_bytes)(bytes) {
            Ok(Some(value)) => Ok(Some(PayloadData::Decoded { value, raw: bytes.clone() })),
            Ok(None) => Ok(None),
            Err(e) => Err(decode_error(e)),
        };
    }
    let mut value: Value = serde_json::from_slice(bytes).map_err(|e| decode_error(e.to_string()))?;
    let keep = match filter {
        None => true,
        Some(PayloadFilter::Json(f)) => f(&value).map_err(filter_error)?,
        Some(PayloadFilter::Typed(typed)) => (typed.from_value)(&value).map_err(filter_error)?,
    };
    if !keep {
        return Ok(None);
    }
    for translator in &spec.translators {
        value = translator(value).map_err(|e| Rejection {
            stage: RejectionStage::Translate,
            error: pipeline_error("TranslatorError", &e),
        })?;
    }
    Ok(Some(PayloadData::Json(value)))
}

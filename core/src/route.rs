//! Routes and contexts: what a service is made of, as the Engine sees it.
//!
//! A [`Route`] ties an [`Entrypoint`] (timer, event, AMQP RPC method, WebSocket RPC method) to a
//! handler, with an optional payload filter, a chain of translators, a retry policy and an
//! optional failure callback ([`CallbackRoute`]). A [`RunnerContext`] groups routes that share a
//! worker budget and a metric label.
//!
//! This module holds definitions only: it runs nothing and decides nothing. The
//! [`Engine`](crate::Engine) takes the [`RouteSpec`]s; the runtime keeps the handlers.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::handler::{BlockingHandler, BoxedHandler, Handler};
use crate::ids::RouteId;
use crate::message::RemoteError;
use crate::retry::RetryPolicy;
use crate::signature::Signature;

/// Which AMQP wire dialect a listener, proxy or producer speaks. The core only carries the
/// tag; transport-amqp encodes it.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Default)]
pub enum Dialect {
    /// Nameko 2.x / 3.x (`nameko-rpc`, `{"args","kwargs"}`, `evt-...` queues). The default.
    #[default]
    Nameko,
    /// micro_framework 2.0.x (`ufw-rpc`, `{"command",...}`, double-encoded replies).
    MicroFramework,
}

/// Who receives an event, in Nameko's terms.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub enum HandlerType {
    /// One instance per (service, method) gets each event. The default.
    #[default]
    ServicePool,
    /// One instance across every service with a singleton handler for the event.
    Singleton,
    /// Every instance gets each event; the identifier names this instance's queue.
    Broadcast {
        /// A stable per-instance identifier (hostname, config value, or a random id).
        identifier: String,
    },
}

/// A payload filter: decides whether the handler runs (true) or the message is skipped (acked,
/// no run). A filter that fails (or a payload it cannot decode) is a non-retryable rejection.
#[derive(Clone)]
pub enum PayloadFilter {
    /// Works on the payload decoded as JSON ([`EventListener::filter`]).
    Json(JsonFilter),
    /// Works on the payload decoded into a type of its own ([`EventListener::filter_as`]).
    Typed(TypedFilter),
}

impl fmt::Debug for PayloadFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PayloadFilter::Json(_) => "PayloadFilter::Json",
            PayloadFilter::Typed(_) => "PayloadFilter::Typed",
        })
    }
}

impl fmt::Debug for TypedFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TypedFilter")
    }
}

/// A filter over a JSON value: `Ok(true)` keeps the message, `Err` rejects it.
pub type JsonFilter = Arc<dyn Fn(&Value) -> Result<bool, String> + Send + Sync>;

/// Decodes a body into a filter's type and filters it: `Ok(Some)` keeps the message with
/// its decoded payload, `Ok(None)` skips it, `Err` (undecodable) rejects it.
pub type DecodeAndFilter = Arc<dyn Fn(&[u8]) -> Result<Option<AnyPayload>, String> + Send + Sync>;

/// A payload decoded into a type only its filter knows; a handler whose
/// [`Payload`](crate::extract::Payload) asks for the same type takes it as is.
pub type AnyPayload = Box<dyn std::any::Any + Send>;

/// The two ways a typed filter can run: on the raw body (decoding it once, for the handler
/// too), or on a JSON value already decoded for translators.
#[derive(Clone)]
pub struct TypedFilter {
    pub(crate) from_bytes: DecodeAndFilter,
    pub(crate) from_value: JsonFilter,
}

/// A translator: turns the payload into what the next translator (or the handler) sees. `Err`
/// is a non-retryable rejection.
pub type Translator = Arc<dyn Fn(Value) -> Result<Value, String> + Send + Sync>;

/// A timer: fires every `interval`, passing the handler the timestamp it fired at. Runs never
/// overlap: a tick that falls while the previous run is still going is coalesced into one run
/// that starts when it ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimeEntrypoint {
    /// Time between ticks.
    pub interval: Duration,
    /// Fire once at start instead of waiting one interval first.
    pub eager: bool,
}

impl TimeEntrypoint {
    /// A timer firing every `interval`, first after one interval.
    pub fn new(interval: Duration) -> Self {
        TimeEntrypoint { interval, eager: false }
    }

    /// Fires once at start as well.
    pub fn eager(mut self) -> Self {
        self.eager = true;
        self
    }
}

/// An event listener: events of `event_type` dispatched by `source_service`.
#[derive(Clone)]
pub struct EventListener {
    /// The dispatching service (the exchange is `<source_service>.events`).
    pub source_service: String,
    /// The event type (the routing key; a topic pattern in AMQP terms).
    pub event_type: String,
    /// Who receives each event.
    pub handler_type: HandlerType,
    /// The wire dialect of the event queue name.
    pub dialect: Dialect,
    /// An optional filter run on the decoded payload before anything else.
    pub filter: Option<PayloadFilter>,
}

impl EventListener {
    /// Listens to `event_type` from `source_service`, service-pool semantics, Nameko dialect.
    pub fn new(source_service: impl Into<String>, event_type: impl Into<String>) -> Self {
        EventListener {
            source_service: source_service.into(),
            event_type: event_type.into(),
            handler_type: HandlerType::ServicePool,
            dialect: Dialect::Nameko,
            filter: None,
        }
    }

    /// Sets the handler type.
    pub fn handler_type(mut self, handler_type: HandlerType) -> Self {
        self.handler_type = handler_type;
        self
    }

    /// Sets the dialect (queue naming).
    pub fn dialect(mut self, dialect: Dialect) -> Self {
        self.dialect = dialect;
        self
    }

    /// Runs the handler only for payloads where `filter` returns true (micro_framework's
    /// `payload_filter`). Others are acked without a run.
    pub fn filter(mut self, filter: impl Fn(&Value) -> bool + Send + Sync + 'static) -> Self {
        self.filter = Some(PayloadFilter::Json(Arc::new(move |v| Ok(filter(v)))));
        self
    }

    /// Runs the handler only for payloads where `filter` returns true, deciding on the payload
    /// decoded as `T`. The body is decoded once: a handler taking `Payload<T>` of the same `T`
    /// gets that very value; any other type is decoded from the raw body. The fastest filter
    /// when `T` has just the fields the filter reads and is also what the handler takes.
    pub fn filter_as<T, F>(mut self, filter: F) -> Self
    where
        T: DeserializeOwned + Send + 'static,
        F: Fn(&T) -> bool + Send + Sync + 'static,
    {
        let filter = Arc::new(filter);
        let on_value = filter.clone();
        self.filter = Some(PayloadFilter::Typed(TypedFilter {
            from_bytes: Arc::new(move |bytes| {
                let payload: T = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
                Ok(filter(&payload).then(|| Box::new(payload) as AnyPayload))
            }),
            from_value: Arc::new(move |value| {
                let payload = T::deserialize(value).map_err(|e| e.to_string())?;
                Ok(on_value(&payload))
            }),
        }));
        self
    }

    /// Like [`filter`](Self::filter), for a filter that can fail; a failure rejects the message.
    pub fn try_filter(
        mut self,
        filter: impl Fn(&Value) -> Result<bool, String> + Send + Sync + 'static,
    ) -> Self {
        self.filter = Some(PayloadFilter::Json(Arc::new(filter)));
        self
    }
}

impl fmt::Debug for EventListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventListener")
            .field("source_service", &self.source_service)
            .field("event_type", &self.event_type)
            .field("handler_type", &self.handler_type)
            .field("dialect", &self.dialect)
            .field("filter", &self.filter.is_some())
            .finish()
    }
}

/// Serves the route as an AMQP RPC method named after the route.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RpcListener {
    /// The wire dialect it is served in.
    pub dialect: Dialect,
}

impl RpcListener {
    /// A Nameko-dialect RPC method.
    pub fn new() -> Self {
        RpcListener::default()
    }

    /// Sets the dialect.
    pub fn dialect(mut self, dialect: Dialect) -> Self {
        self.dialect = dialect;
        self
    }
}

/// Serves the route as a WebSocket RPC method named after the route.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct WsRpcListener;

/// What triggers a route.
#[derive(Clone, Debug)]
pub enum Entrypoint {
    /// A timer.
    Timer(TimeEntrypoint),
    /// An event listener.
    Event(EventListener),
    /// An AMQP RPC method.
    Rpc(RpcListener),
    /// A WebSocket RPC method.
    WsRpc(WsRpcListener),
    /// The failure callback of another route (set by [`Route::callback`]).
    Callback,
}

impl From<TimeEntrypoint> for Entrypoint {
    fn from(e: TimeEntrypoint) -> Self {
        Entrypoint::Timer(e)
    }
}
impl From<EventListener> for Entrypoint {
    fn from(e: EventListener) -> Self {
        Entrypoint::Event(e)
    }
}
impl From<RpcListener> for Entrypoint {
    fn from(e: RpcListener) -> Self {
        Entrypoint::Rpc(e)
    }
}
impl From<WsRpcListener> for Entrypoint {
    fn from(e: WsRpcListener) -> Self {
        Entrypoint::WsRpc(e)
    }
}

/// What happens to a delivery once a route gives up on it (after the last retry and the
/// failure callback, or on a non-retryable rejection).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Settle {
    /// Ack it: the message is gone.
    Ack,
    /// Publish it to the route's dead-letter queue (confirmed), then ack it.
    DeadLetter,
}

/// Everything the Engine needs to know about a route: no handler, no IO.
#[derive(Clone)]
pub struct RouteSpec {
    /// The target name: the RPC method, or the handler's name in event queue names.
    pub name: String,
    /// What triggers it.
    pub entrypoint: Entrypoint,
    /// Translators, run in order, each seeing the previous one's output.
    pub translators: Vec<Translator>,
    /// The retry policy.
    pub retry: RetryPolicy,
    /// How a given-up delivery is settled.
    pub on_give_up: Settle,
    /// The failure callback route, if any (a route of the same service).
    pub callback: Option<RouteId>,
    /// The metric label (`route` label), micro_framework's `Route__<target>` by default.
    pub metric_label: String,
    /// Doc text for target listings.
    pub doc: Option<String>,
    /// The handler's RPC parameters (from its `Params<T>`), for target listings.
    pub signature: Option<Signature>,
}

impl fmt::Debug for RouteSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouteSpec")
            .field("name", &self.name)
            .field("entrypoint", &self.entrypoint)
            .field("translators", &self.translators.len())
            .field("retry", &self.retry)
            .field("on_give_up", &self.on_give_up)
            .field("callback", &self.callback)
            .field("metric_label", &self.metric_label)
            .finish()
    }
}

/// A route: an entrypoint, a handler, and the pipeline around it. `S` is the service's shared
/// state type (see [`State`](crate::extract::State)).
pub struct Route<S = ()> {
    pub(crate) spec: RouteSpec,
    pub(crate) handler: BoxedHandler<S>,
    pub(crate) callback: Option<Box<CallbackRoute<S>>>,
}

impl<S: Clone + Send + Sync + 'static> Route<S> {
    /// A route running an async handler (runtime-tokio, `async` worker mode).
    pub fn new<H, T>(entrypoint: impl Into<Entrypoint>, name: impl Into<String>, handler: H) -> Self
    where
        H: Handler<T, S>,
        T: 'static,
    {
        Route::with_handler(entrypoint.into(), name.into(), BoxedHandler::from_async(handler), H::signature())
    }

    /// A route running a blocking handler (runtime-sync, or the `thread` / `greedy_thread`
    /// worker modes).
    pub fn blocking<H, T>(entrypoint: impl Into<Entrypoint>, name: impl Into<String>, handler: H) -> Self
    where
        H: BlockingHandler<T, S>,
        T: 'static,
    {
        Route::with_handler(
            entrypoint.into(),
            name.into(),
            BoxedHandler::from_blocking(handler),
            H::signature(),
        )
    }

    fn with_handler(
        entrypoint: Entrypoint,
        name: String,
        handler: BoxedHandler<S>,
        signature: Option<Signature>,
    ) -> Self {
        let metric_label = format!("Route__{name}");
        let on_give_up = match entrypoint {
            Entrypoint::Event(_) => Settle::DeadLetter,
            _ => Settle::Ack,
        };
        Route {
            spec: RouteSpec {
                name,
                entrypoint,
                translators: Vec::new(),
                retry: RetryPolicy::none(),
                on_give_up,
                callback: None,
                metric_label,
                doc: None,
                signature,
            },
            handler,
            callback: None,
        }
    }

    /// Appends a translator to the chain. Each translator sees the previous one's output.
    pub fn translator(mut self, t: impl Fn(Value) -> Result<Value, String> + Send + Sync + 'static) -> Self {
        self.spec.translators.push(Arc::new(t));
        self
    }

    /// Sets the retry policy (default: no retry).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.spec.retry = policy;
        self
    }

    /// Sets what happens to a delivery the route gives up on (events default to dead-letter,
    /// RPC to ack: its caller has the error reply).
    pub fn on_give_up(mut self, settle: Settle) -> Self {
        self.spec.on_give_up = settle;
        self
    }

    /// Runs `callback` with the payload and the error after the last retry fails.
    pub fn callback(mut self, callback: CallbackRoute<S>) -> Self {
        self.callback = Some(Box::new(callback));
        self
    }

    /// Sets the `route` metric label.
    pub fn metric_label(mut self, label: impl Into<String>) -> Self {
        self.spec.metric_label = label.into();
        self
    }

    /// Sets the doc text shown in target listings.
    pub fn doc(mut self, doc: impl Into<String>) -> Self {
        self.spec.doc = Some(doc.into());
        self
    }

    /// The route's definition.
    pub fn spec(&self) -> &RouteSpec {
        &self.spec
    }
}

impl<S> fmt::Debug for Route<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Route").field("spec", &self.spec).finish_non_exhaustive()
    }
}

/// A failure callback: runs once a route has given up, with the original payload and the
/// error (the [`Failure`](crate::extract::Failure) extractor). It runs in the same context as
/// its route; its own failure is logged, never retried.
pub struct CallbackRoute<S = ()> {
    pub(crate) name: String,
    pub(crate) handler: BoxedHandler<S>,
}

impl<S: Clone + Send + Sync + 'static> CallbackRoute<S> {
    /// An async callback.
    pub fn new<H, T>(name: impl Into<String>, handler: H) -> Self
    where
        H: Handler<T, S>,
        T: 'static,
    {
        CallbackRoute { name: name.into(), handler: BoxedHandler::from_async(handler) }
    }

    /// A blocking callback.
    pub fn blocking<H, T>(name: impl Into<String>, handler: H) -> Self
    where
        H: BlockingHandler<T, S>,
        T: 'static,
    {
        CallbackRoute { name: name.into(), handler: BoxedHandler::from_blocking(handler) }
    }
}

impl<S> fmt::Debug for CallbackRoute<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallbackRoute").field("name", &self.name).finish_non_exhaustive()
    }
}

/// How a context's runs end when the service stops.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub enum ShutdownMode {
    /// Finish running work; hand unstarted deliveries back to the broker (`thread`).
    #[default]
    FinishRunning,
    /// Run everything already held first (`greedy_thread`).
    DrainPending,
}

/// A group of routes sharing a worker budget and a metric label (micro_framework's
/// `RunnerContext`).
pub struct RunnerContext<S = ()> {
    pub(crate) routes: Vec<Route<S>>,
    pub(crate) max_workers: u32,
    pub(crate) shutdown: ShutdownMode,
    pub(crate) metric_label: Option<String>,
    pub(crate) prefetch: Option<u32>,
}

impl<S: Clone + Send + Sync + 'static> RunnerContext<S> {
    /// A context with a budget of `max_workers` concurrent runs (at least 1).
    pub fn new(max_workers: u32) -> Self {
        RunnerContext {
            routes: Vec::new(),
            max_workers: max_workers.max(1),
            shutdown: ShutdownMode::default(),
            metric_label: None,
            prefetch: None,
        }
    }

    /// Adds a route.
    pub fn route(mut self, route: Route<S>) -> Self {
        self.routes.push(route);
        self
    }

    /// Sets the shutdown mode.
    pub fn shutdown_mode(mut self, mode: ShutdownMode) -> Self {
        self.shutdown = mode;
        self
    }

    /// Sets the `context` metric label.
    pub fn metric_label(mut self, label: impl Into<String>) -> Self {
        self.metric_label = Some(label.into());
        self
    }

    /// Raises the transport prefetch above the budget (never below it): the bound on
    /// deliveries held while every worker is busy.
    pub fn prefetch(mut self, prefetch: u32) -> Self {
        self.prefetch = Some(prefetch);
        self
    }
}

impl<S> fmt::Debug for RunnerContext<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunnerContext")
            .field("routes", &self.routes)
            .field("max_workers", &self.max_workers)
            .field("shutdown", &self.shutdown)
            .field("metric_label", &self.metric_label)
            .finish()
    }
}

/// A context as the Engine sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContextSpec {
    /// The worker budget.
    pub max_workers: u32,
    /// Held deliveries beyond the budget are bounded by this (>= `max_workers`).
    pub prefetch: u32,
    /// The shutdown mode.
    pub shutdown: ShutdownMode,
    /// The `context` metric label.
    pub metric_label: String,
}

/// Returns the remote error for a filter or translator failure.
pub(crate) fn pipeline_error(stage: &str, message: &str) -> RemoteError {
    RemoteError::new("microfw", stage, message)
}

//! The Engine's vocabulary with the runtime: inputs' payload types and the [`Action`]s it asks
//! the runtime to carry out.

use std::time::Duration;

use bytes::Bytes;
use serde_json::{Map, Value};

use crate::extract::Job;
use crate::ids::{CallId, DeliveryRef, DeliveryTag, DispatchId, LinkId, PublishId, RouteId, SubscriptionId};
use crate::message::{Envelope, RemoteError};
use crate::outcome::HandlerError;
use crate::route::{Dialect, HandlerType};
use crate::worker_context::WorkerContext;

/// Which kind of link carries a subscription or a publish. The runtime maps `Broker` to its
/// broker link (RabbitMQ, or the embedded memory broker) and `WebSocket` to its WebSocket link.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    /// An AMQP broker or the memory broker.
    Broker,
    /// WebSocket RPC.
    WebSocket,
}

/// A message handed to the Engine by a link.
#[derive(Clone, Debug, PartialEq)]
pub struct Delivery {
    /// The link it came on.
    pub link: LinkId,
    /// The link's tag for it (what [`Action::Ack`] names).
    pub tag: DeliveryTag,
    /// The subscription it was consumed by.
    pub subscription: SubscriptionId,
    /// True when the broker delivered it before.
    pub redelivered: bool,
    /// The message.
    pub envelope: Envelope,
}

/// What a subscription consumes. A transport derives its names and topology from this (per
/// dialect); the core never names a queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// One event route's queue.
    Event {
        /// The dispatching service.
        source_service: String,
        /// The event type (routing key / binding pattern).
        event_type: String,
        /// Who receives each event.
        handler_type: HandlerType,
        /// Queue naming dialect.
        dialect: Dialect,
        /// This service.
        service: String,
        /// The route's name (Nameko's method).
        route: String,
    },
    /// This service's RPC requests in one dialect.
    Rpc {
        /// This service.
        service: String,
        /// The dialect served.
        dialect: Dialect,
        /// The methods served, in route order (micro_framework declares a queue per target).
        methods: Vec<String>,
    },
    /// WebSocket RPC requests for this service.
    WsRpc {
        /// This service.
        service: String,
    },
    /// Replies to this Engine's RPC calls.
    Replies {
        /// The routing key replies are addressed to (the requests' `reply_to`).
        reply_to: String,
    },
}

/// Where a publish goes, in neutral terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    /// An event: exchange `<source_service>.events`, routing key the event type.
    Event {
        /// The dispatching service.
        source_service: String,
        /// The event type.
        event_type: String,
        /// The dialect (exchange flags).
        dialect: Dialect,
    },
    /// An RPC request to `service.method`.
    Rpc {
        /// Target service.
        service: String,
        /// Target method.
        method: String,
        /// The dialect to encode it in.
        dialect: Dialect,
    },
    /// An RPC reply to `reply_to`.
    Reply {
        /// The request's `reply_to`.
        reply_to: String,
        /// The dialect of the request being answered.
        dialect: Dialect,
    },
    /// A delayed retry: back to this subscription's own queue after `delay` (already rounded
    /// to the waiting-queue ladder).
    Retry {
        /// The subscription whose queue gets the message back.
        subscription: SubscriptionId,
        /// The delay.
        delay: Duration,
    },
    /// The dead-letter queue of this subscription's queue.
    DeadLetter {
        /// The subscription whose queue the message came from.
        subscription: SubscriptionId,
    },
}

/// Start consuming (declaring whatever topology the source needs first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscribe {
    /// The id deliveries will carry.
    pub id: SubscriptionId,
    /// Which link.
    pub transport: Transport,
    /// What to consume.
    pub source: Source,
    /// At most this many unsettled deliveries in flight on this consumer (AMQP per-consumer
    /// prefetch); 0 means unlimited (reply queues). A context with several event routes gives
    /// each its own consumer with the context's prefetch, so the Engine may hold up to
    /// routes x prefetch of that context's deliveries.
    pub prefetch: u32,
}

/// Publish a message; report the confirm with
/// [`Engine::handle_publish_result`](crate::Engine::handle_publish_result) (same id).
#[derive(Clone, Debug, PartialEq)]
pub struct Publish {
    /// Id for the confirm.
    pub id: PublishId,
    /// Which link.
    pub transport: Transport,
    /// Where.
    pub destination: Destination,
    /// AMQP `mandatory`: an unroutable message must be reported as
    /// [`PublishError::Unroutable`].
    pub mandatory: bool,
    /// The message.
    pub envelope: Envelope,
}

/// Run a handler.
#[derive(Debug)]
pub struct Dispatch {
    /// The run; report its end with [`Engine::handle_outcome`](crate::Engine::handle_outcome).
    pub id: DispatchId,
    /// The route whose handler to run.
    pub route: RouteId,
    /// The handler's input.
    pub job: Job,
}

/// Something the runtime must do. Drain with [`Engine::poll_action`](crate::Engine::poll_action)
/// after every input, in order.
#[derive(Debug)]
#[must_use = "an action the runtime drops is a message never acked, a handler never run or a call never resolved"]
pub enum Action {
    /// Start a consumer.
    Subscribe(Subscribe),
    /// Stop a consumer (shutdown). Deliveries already in flight may still arrive; the Engine
    /// hands them back.
    Unsubscribe {
        /// The consumer to stop.
        id: SubscriptionId,
        /// Its link.
        transport: Transport,
    },
    /// Run a handler.
    Dispatch(Dispatch),
    /// Publish a message and report its confirm.
    Publish(Publish),
    /// Acknowledge a delivery: it is done.
    Ack(DeliveryRef),
    /// Give a delivery back: `requeue` true puts it back on its queue (unstarted work at
    /// shutdown, or a settle publish that could not be made before the service stopped); false
    /// drops it (the Engine dead-letters by publishing, never by broker reject).
    Reject {
        /// The delivery.
        delivery: DeliveryRef,
        /// Put it back on the queue.
        requeue: bool,
    },
    /// An outgoing RPC call ended.
    Resolve {
        /// The call (as returned by [`Engine::handle_call`](crate::Engine::handle_call)).
        call: CallId,
        /// Its result.
        result: Result<Value, CallError>,
    },
    /// A publish the runtime asked for with [`Engine::handle_emit`](crate::Engine::handle_emit)
    /// was confirmed, or failed.
    Emitted {
        /// The publish.
        id: PublishId,
        /// The broker's verdict.
        result: Result<(), PublishError>,
    },
    /// Something worth a log line or a metric.
    Event(EngineEvent),
    /// The Engine stopped: every action that mattered was already emitted. `unfinished` runs
    /// and deliveries were left unsettled because the shutdown timeout passed; the broker
    /// redelivers them when the link closes.
    Stopped {
        /// Runs and deliveries left unfinished (0 on a clean stop).
        unfinished: usize,
    },
}

/// Log- and metric-worthy happenings. None of them needs an answer.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum EngineEvent {
    /// The payload filter said no: acked without a run.
    Filtered {
        /// The route.
        route: RouteId,
    },
    /// A failed run will be retried.
    Retrying {
        /// The route.
        route: RouteId,
        /// The retry's attempt number (1 = first retry).
        attempt: u32,
        /// The delay before it.
        delay: Duration,
        /// The failure.
        error: HandlerError,
    },
    /// The route gave up on a job (retries exhausted or not retryable).
    GaveUp {
        /// The route.
        route: RouteId,
        /// The last failure.
        error: HandlerError,
    },
    /// The framework refused a message (payload decode, filter, translator or extractor
    /// failure): never retried, settled as the route says.
    Rejected {
        /// The route.
        route: RouteId,
        /// Why.
        error: RemoteError,
    },
    /// A message went to its dead-letter queue.
    DeadLettered {
        /// The route.
        route: RouteId,
    },
    /// A request named a method this service does not serve.
    MethodNotFound {
        /// The method.
        method: String,
    },
    /// An RPC request without `reply_to`: acked and dropped (Nameko crashes on these).
    NoReplyTo {
        /// The method.
        method: String,
    },
    /// A message the subscription cannot carry (for example a reply on a request queue).
    Unexpected {
        /// The subscription.
        subscription: SubscriptionId,
    },
    /// A reply nobody waits for (late, or not ours): acked and dropped.
    UnknownReply {
        /// Its correlation id.
        correlation_id: Option<String>,
    },
    /// A timer tick fell while the previous run was still going: coalesced.
    TimerCoalesced {
        /// The timer route.
        route: RouteId,
    },
    /// A failure callback failed; the delivery is settled anyway.
    CallbackFailed {
        /// The callback route.
        route: RouteId,
        /// Its failure.
        error: HandlerError,
    },
    /// A reply could not be published; its caller will time out.
    ReplyLost {
        /// Why.
        error: PublishError,
    },
    /// A retry or dead-letter publish failed; the delivery stays unacked and the publish is
    /// tried again after `retry_in`.
    SettlePublishFailed {
        /// The link's verdict.
        error: PublishError,
        /// Failures so far for this delivery.
        failures: u32,
        /// The pause before the next try.
        retry_in: Duration,
    },
    /// A failure callback that had not started when the service stopped was skipped; its
    /// delivery was settled without it.
    CallbackSkipped {
        /// The callback route.
        route: RouteId,
    },
    /// The shutdown timeout passed with work unfinished.
    ShutdownTimedOut {
        /// How much.
        unfinished: usize,
    },
}

/// How much a runtime should make of an [`EngineEvent`] in its logs.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Routine, possibly once per message (a filtered event, an unknown reply): debug logs.
    Debug,
    /// Notable but expected (a retry, a give-up, a dead letter): info logs.
    Info,
    /// Something lost or failed that an operator should look at: warnings.
    Warn,
}

impl EngineEvent {
    /// How notable the event is: runtimes log at this level (see
    /// [`Engine::describe`](crate::Engine::describe) for the text).
    pub fn severity(&self) -> Severity {
        match self {
            EngineEvent::Retrying { .. } | EngineEvent::GaveUp { .. } | EngineEvent::DeadLettered { .. } => {
                Severity::Info
            }
            EngineEvent::CallbackFailed { .. }
            | EngineEvent::ReplyLost { .. }
            | EngineEvent::SettlePublishFailed { .. }
            | EngineEvent::ShutdownTimedOut { .. } => Severity::Warn,
            _ => Severity::Debug,
        }
    }
}

/// Why an outgoing RPC call failed.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    /// The remote method raised.
    #[error("remote error: {0}")]
    Remote(RemoteError),
    /// No reply before the deadline.
    #[error("RPC call timed out after {0:?}")]
    Timeout(Duration),
    /// No queue is bound for the service (the mandatory publish came back).
    #[error("unknown service {0:?}")]
    UnknownService(String),
    /// The transport lost the reply queue, so the reply can never arrive.
    #[error("the reply queue was lost")]
    ReplyQueueLost,
    /// A reply arrived for this call but could not be read.
    #[error("malformed reply: {0}")]
    MalformedReply(String),
    /// The request could not be published.
    #[error("request not published: {0}")]
    Publish(PublishError),
    /// The service is stopping.
    #[error("the service is shutting down")]
    ShuttingDown,
}

/// Why a publish failed, as the link reports it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// A mandatory message had no queue to go to (AMQP basic.return NO_ROUTE).
    #[error("unroutable")]
    Unroutable,
    /// The broker refused it (basic.nack).
    #[error("nacked by the broker")]
    Nacked,
    /// The link is down and the publish could not wait.
    #[error("link down: {0}")]
    LinkDown(String),
    /// Anything else the link reports.
    #[error("{0}")]
    Other(String),
}

/// An outgoing RPC call, from a handler or a standalone client.
#[derive(Clone, Debug, PartialEq)]
pub struct OutgoingCall {
    /// The calling worker's context, or `None` for a standalone client.
    pub context: Option<WorkerContext>,
    /// Target service.
    pub service: String,
    /// Target method.
    pub method: String,
    /// Positional arguments.
    pub args: Vec<Value>,
    /// Keyword arguments.
    pub kwargs: Map<String, Value>,
    /// The deadline, relative to now (`None`: the Engine's default).
    pub timeout: Option<Duration>,
    /// Which link.
    pub transport: Transport,
    /// Which dialect.
    pub dialect: Dialect,
}

/// An outgoing event, from a handler's Producer or a standalone dispatcher.
#[derive(Clone, Debug, PartialEq)]
pub struct OutgoingEvent {
    /// The dispatching worker's context, or `None` for a standalone dispatcher.
    pub context: Option<WorkerContext>,
    /// The source service (the exchange `<source>.events`); usually this service.
    pub source_service: String,
    /// The event type.
    pub event_type: String,
    /// The encoded payload (JSON).
    pub payload: Bytes,
    /// Which dialect.
    pub dialect: Dialect,
}

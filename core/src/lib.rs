//! # microfw-core
//!
//! The sans-IO heart of microfw: everything about running a microservice that can be decided
//! without a socket or a clock. Route matching, payload filters, translator chains, retry and
//! backoff decisions, failure callbacks, RPC correlation and deadlines, worker budgets per
//! context, shutdown modes, Nameko's worker context, an in-memory broker model, and a
//! deterministic [simulator](testing) to test services with.
//!
//! ## What it does not do
//!
//! No IO, no clock reads, no threads, no async runtime, no OS randomness. The [`Engine`] is
//! driven by a runtime (`microfw-runtime-tokio` or `microfw-runtime-sync`) that passes it the
//! time, feeds it deliveries from transport links (`microfw-transport-amqp`,
//! `microfw-transport-ws`, or the embedded memory link) and carries out the [`Action`]s it
//! returns. CI checks that this crate's dependency tree holds no IO crate.
//!
//! ## Shape
//!
//! * A [`Service`] is a name and [`RunnerContext`]s of [`Route`]s. A route joins an
//!   entrypoint ([`TimeEntrypoint`], [`EventListener`], [`RpcListener`], [`WsRpcListener`])
//!   to a handler: a plain function whose parameters are [extractors](extract) such as
//!   [`Payload`](extract::Payload), [`Params`](extract::Params), [`Attempt`](extract::Attempt),
//!   [`Context`](extract::Context) and [`State`](extract::State).
//! * [`Service::build`] splits it into a [`ServiceSpec`] for the [`Engine`] and a
//!   [`HandlerTable`] for the runtime.
//! * The [`Engine`] takes inputs (`handle_*`, each with `now`) and yields [`Action`]s
//!   (`poll_action` until `None`, then `poll_timeout`).
//!
//! ## Testing a route with the simulator
//!
//! ```
//! use microfw_core::testing::{Record, Simulator};
//! use microfw_core::extract::Payload;
//! use microfw_core::{EngineEvent, EventListener, Route, RunnerContext, Service};
//! use serde::Deserialize;
//! use serde_json::json;
//!
//! #[derive(Deserialize)]
//! struct Order {
//!     amount: u64,
//! }
//!
//! fn bill(Payload(order): Payload<Order>) -> Result<(), String> {
//!     if order.amount > 1_000 { Err("needs approval".into()) } else { Ok(()) }
//! }
//!
//! let service = Service::new("billing").context(
//!     RunnerContext::new(4).route(Route::blocking(
//!         EventListener::new("shop", "order_placed").filter(|p| p["amount"].as_u64() > Some(0)),
//!         "bill",
//!         bill,
//!     )),
//! );
//! let mut sim = Simulator::new();
//! let billing = sim.add_service(service).unwrap();
//! sim.take_records(billing); // the subscription records
//!
//! // A free order is filtered out: acked, and the handler never runs.
//! sim.publish_event("shop", "order_placed", &json!({"amount": 0}));
//! assert_eq!(sim.run_all(), 0);
//! let route = sim.engine(billing).route(microfw_core::RouteId::from_raw(0)).is_some();
//! assert!(route);
//! assert!(matches!(
//!     sim.take_records(billing).as_slice(),
//!     [Record::Event(EngineEvent::Filtered { .. }), Record::Ack]
//! ));
//!
//! // A paid order runs the handler, then is acked.
//! sim.publish_event("shop", "order_placed", &json!({"amount": 30}));
//! assert_eq!(sim.run_all(), 1);
//! assert_eq!(
//!     sim.take_records(billing),
//!     vec![
//!         Record::Dispatch { route: "bill".into(), retry_count: 0 },
//!         Record::Outcome { route: "bill".into(), outcome: microfw_core::Outcome::Success(None) },
//!         Record::Ack,
//!     ]
//! );
//! ```
#![warn(missing_docs)]

pub mod action;
pub mod broker;
pub mod client;
pub mod config;
pub mod engine;
pub mod extract;
pub mod handler;
pub mod ids;
pub mod link;
pub mod memory;
pub mod message;
pub mod metrics;
pub mod outcome;
pub mod params;
mod probe;
pub mod retry;
pub mod rng;
pub mod route;
pub mod service;
pub mod signature;
pub mod targets;
pub mod testing;
pub mod time;
pub mod topic;
pub mod worker_context;
pub mod worker_wire;

pub use action::{
    Action, CallError, Delivery, Destination, Dispatch, EngineEvent, OutgoingCall, OutgoingEvent, Publish,
    PublishError, Severity, Source, Subscribe, Transport,
};
pub use engine::{Engine, EngineConfig, EngineStats};
pub use handler::{BlockingHandler, Handler, IntoHandlerError, IntoOutcome, Reply};
pub use ids::{
    CallId, ContextId, CorrelationId, DeliveryRef, DeliveryTag, DispatchId, LinkId, PublishId, RouteId,
    SubscriptionId,
};
pub use message::{Body, Envelope, FieldValue, Headers, Properties, RemoteError, RpcReply, RpcRequest};
pub use outcome::{HandlerError, Outcome, Rejection, RejectionStage};
pub use retry::{Backoff, RetryOn, RetryPolicy};
pub use route::{
    CallbackRoute, Dialect, Entrypoint, EventListener, HandlerType, Route, RpcListener, RunnerContext,
    Settle, ShutdownMode, TimeEntrypoint, WsRpcListener,
};
pub use service::{BuildError, HandlerTable, Service, ServiceSpec};
pub use time::Instant;

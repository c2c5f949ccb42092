//! # microfw-runtime-sync
//!
//! Runs a microfw service on plain OS threads, with no async runtime at all (no tokio in the
//! dependency tree). One driver thread owns the service's [`Engine`](microfw_core::Engine)
//! and is the only code touching it; it blocks on one bounded channel (a mutex and
//! condvars) with `recv_timeout(next deadline)`. Handler outcomes, client commands ([`Producer`],
//! [`RpcProxy`]) and stop requests arrive on that channel; deliveries wait in their link (the
//! shared [`MemoryHubHandle`], RabbitMQ, the WebSocket server), which wakes the driver. After
//! every batch of inputs the driver drains every action, hands the link operations to its
//! links ([`microfw_core::link::Link::exchange`]), and goes back to waiting.
//!
//! ## Contract
//!
//! * Every context gets a fixed pool of `max_workers` OS threads (its budget); the Engine
//!   never dispatches more runs to a context than that, so a run never waits for a thread.
//! * Worker modes, per context ([`WorkerMode`], default from the config's `WORKER_MODE`,
//!   overridden with [`Runner::worker_mode`]): `thread` finishes running work at shutdown and
//!   hands unstarted deliveries back to the broker; `greedy_thread` runs everything already
//!   held first. Both give up at `SHUTDOWN_TIMEOUT`. `process` (Unix) runs the context's
//!   handlers in `max_workers` child processes started from this program, one job at a time
//!   each, replaced when they crash and after `MAX_TASKS_PER_CHILD` jobs: see
//!   [`Runner`]'s section on it for what the program must do. The pool machinery is the
//!   public [`process`] module, which `microfw-runtime-tokio` uses too.
//! * Handlers are blocking functions ([`Route::blocking`]); a panic in one is a failed run
//!   ([`Outcome::Panicked`]), never a crash of the service.
//! * Deliveries that reached a service before a command was sent to it (a stop, say) are
//!   handed to its Engine before that command.
//! * The Engine decides everything (retries, acks, deadlines, budgets); the runtime only
//!   carries out its actions and reports results, reading the clock and drawing the seed
//!   from OS entropy.
//!
//! ```no_run
//! use microfw_runtime_sync::{Config, EventListener, Route, Runner, RunnerContext};
//! use microfw_runtime_sync::extract::Payload;
//!
//! fn greet(Payload(name): Payload<String>) {
//!     println!("hello {name}");
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = Config { service_name: Some("greeter".into()), ..Config::default() };
//! Runner::new(config)
//!     .context(RunnerContext::new(8).route(Route::blocking(EventListener::new("people", "arrived"), "greet", greet)))
//!     .run()?; // until SIGINT / SIGTERM
//! # Ok(())
//! # }
//! ```
//!
//! ## Metrics
//!
//! Every service records micro_framework's Prometheus metrics (`tasks_number`,
//! `tasks_number_total`, `failed_tasks_total`, `task_duration_seconds`, `service_info`,
//! `available_workers`, plus `retries_total` and `dead_letters_total`; each with a `service`
//! label) through the `metrics` facade, see [`microfw_core::metrics`]. The handles bind to the
//! recorder current when [`Runner::start`] runs (a thread-local one in tests). With
//! `ENABLE_METRICS` the runtime installs `metrics-exporter-prometheus`'s recorder as the
//! process's global recorder (once per process) and serves `GET /metrics` on
//! `METRICS.HOST:METRICS.PORT` from a small blocking HTTP server thread (one per address,
//! shared by the services of the process, stopped with the last of them; see
//! [`RunningService::metrics_addr`]). Start fails if another global recorder was installed
//! first or the address cannot be bound. The recorder being process-wide, a service started
//! without `ENABLE_METRICS` still records into it when another service installed it first
//! (its series then show on that server, under its own `service` label).
//!
//! ## Transports
//!
//! * The broker: with `AMQP_URI` set, RabbitMQ through the amiquip link (feature `amqp`, on by
//!   default; `microfw_transport_amqp::AmqpSyncConnector`, its IO on its own threads);
//!   otherwise the process's [`MemoryHubHandle::global`]. [`Runner::broker`] /
//!   [`Runner::hub`] name another.
//! * WebSocket RPC: a service with WebSocket routes serves them on its own threaded
//!   tungstenite server on `WEBSOCKET_IP:WEBSOCKET_PORT` (feature `ws`, on by default; see
//!   [`Runner::websocket_options`] and [`RunningService::websocket_addr`]).
//!   [`Runner::websocket`] names another link.
//!
//! ## What it does NOT do
//!
//! No async handlers (a start error naming the route) and no `async` worker mode: use
//! `microfw-runtime-tokio` for those. It does not read the environment or a config
//! file itself: build the [`Config`] (see
//! [`Config::from_env`](microfw_core::config::Config::from_env)) and pass it in.
#![warn(missing_docs)]

mod chan;
mod client;
mod driver;
mod exporter;
mod hub;
mod pool;
#[cfg(unix)]
pub mod process;
mod runner;
#[cfg(unix)]
mod worker;

pub use client::{DispatchError, PendingCall, Producer, RpcError, RpcProxy, TargetDetail};
pub use driver::StopReport;
pub use hub::MemoryHubHandle;
pub use runner::{RunError, Runner, RunningService, StartError, StopError};

pub use microfw_core::config::{Config, ConfigError, WorkerMode};
pub use microfw_core::{
    Backoff, CallError, CallbackRoute, Dialect, EventListener, HandlerError, HandlerType, Outcome,
    PublishError, RemoteError, Reply, RetryOn, RetryPolicy, Route, RpcListener, RunnerContext, Settle,
    ShutdownMode, TimeEntrypoint, WsRpcListener, extract,
};

//! # microfw-runtime-tokio
//!
//! Runs a microfw service on tokio.
//!
//! ## Contract
//!
//! * One driver task per [`Runner`] owns the service's [`Engine`](microfw_core::Engine) and is
//!   the only code touching it. Handler outcomes, client commands ([`Producer`],
//!   [`RpcProxy`]), wake-ups from its links and the stop request reach it over one bounded
//!   channel; deliveries wait in their link (bounded by the consumers' prefetch) until the
//!   driver takes them.
//! * Each turn it feeds the Engine every available input, drains every action, and hands the
//!   link operations (subscribe, publish, ack, reject) to its links
//!   ([`microfw_core::link::Link::exchange`]), taking back what arrived: deliveries and
//!   publish confirms. It then sleeps until the next input or the Engine's (or a link's) next
//!   deadline.
//! * Worker modes, per context ([`WorkerMode`]; the config's `WORKER_MODE` unless
//!   [`Runner::worker_mode`] overrides it):
//!   * `async` (alias `asyncio`): async handlers run as tokio tasks; the context budget bounds
//!     concurrency. Each is polled once on the driver first, so a handler that finishes
//!     without waiting costs no task: an async handler must therefore never block (a
//!     handler that blocks before its first `.await` stalls the whole service). Blocking
//!     handlers in an async context are refused at start.
//!   * `thread` / `greedy_thread`: a dedicated pool of `max_workers` OS threads per context
//!     (not tokio's blocking pool, so CPU-bound work never blocks the reactor). Blocking
//!     handlers run there, and async ones too, each pool thread driving them on its own
//!     current-thread runtime. On stop, `thread` finishes running work and returns the rest
//!     to the broker; `greedy_thread` runs everything already held first.
//!   * `process` (Unix): `max_workers` child processes started from this program run the
//!     context's handlers (blocking, or async on a current-thread runtime in the child), one
//!     job at a time each; a child that crashes fails its job and is replaced, and
//!     `MAX_TASKS_PER_CHILD` retires children. See [`Runner`]'s section on it for what the
//!     program must do.
//! * A panicking handler is a failed run ([`Outcome::Panicked`](microfw_core::Outcome)),
//!   never a crash of the service.
//! * [`RunningService::stop`] waits at most `SHUTDOWN_TIMEOUT`; runs still going then are
//!   abandoned (async tasks aborted, pool threads detached, worker processes killed) and
//!   their deliveries go back to the broker.
//!
//! ```no_run
//! use microfw_runtime_tokio::extract::Payload;
//! use microfw_runtime_tokio::{Config, EventListener, Route, Runner, RunnerContext, WorkerMode};
//!
//! async fn greet(Payload(name): Payload<String>) {
//!     println!("hello {name}");
//! }
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let config = Config {
//!     service_name: Some("greeter".into()),
//!     worker_mode: WorkerMode::Async,
//!     ..Config::default()
//! };
//! let route = Route::new(EventListener::new("people", "arrived"), "greet", greet);
//! Runner::new(config)
//!     .context(RunnerContext::new(8).route(route))
//!     .run() // until SIGINT / SIGTERM
//!     .await?;
//! # Ok(())
//! # }
//! ```
//!
//! ## Transports
//!
//! * The broker: with `AMQP_URI` set, RabbitMQ through the lapin link (feature `amqp`, on by
//!   default; [`microfw_transport_amqp::AmqpConnector`]); otherwise the process's
//!   [`MemoryHubHandle::global`]. [`Runner::broker`] / [`Runner::hub`] name another.
//! * WebSocket RPC: a service with WebSocket routes serves them on its own server on
//!   `WEBSOCKET_IP:WEBSOCKET_PORT` (feature `ws`, on by default; limits and token through
//!   [`Runner::websocket_options`], bound address from [`RunningService::websocket_addr`]).
//!   [`Runner::websocket`] names another link (a [`MemoryHubHandle`] keeps it in-process).
//!
//! ## Metrics
//!
//! Every service records micro_framework's Prometheus metrics (`tasks_number`,
//! `tasks_number_total`, `failed_tasks_total`, `task_duration_seconds`, `service_info`,
//! `available_workers`, plus `retries_total` and `dead_letters_total`, each with a `service`
//! label) through the `metrics` facade, see [`microfw_core::metrics`]. The handles bind to the
//! recorder current on the thread calling [`Runner::start`] (none: they do nothing). A run's
//! duration is measured from its hand-off (to the pool, or to its first poll) to its end. With
//! `ENABLE_METRICS` the runtime installs `metrics-exporter-prometheus`'s recorder as the
//! process's global recorder (once per process) and serves `GET /metrics` on
//! `METRICS.HOST:METRICS.PORT` from a small tokio HTTP server (one per address, shared by the
//! services of the process; the bound address is [`RunningService::metrics_addr`]). Start
//! fails if another global recorder was installed first. A service started without
//! `ENABLE_METRICS` still records into the global recorder if one is installed.
//!
//! ## What it does NOT do
//!
//! It does not make outgoing WebSocket calls through the Engine (handlers hold a
//! `microfw_transport_ws::tokio::WsRpcClient` in their state for that). It does not
//! read the environment or a config file: build the [`Config`] (for example with
//! [`Config::from_env`](microfw_core::config::Config::from_env)) and pass it in. It decides
//! nothing the Engine decides (retries, acks, deadlines): it carries out actions and reports
//! their results.
#![warn(missing_docs)]

mod client;
mod driver;
mod exporter;
mod hub;
mod pool;
mod runner;
#[cfg(unix)]
mod worker;

pub use client::{DispatchError, PendingCall, Producer, RpcError, RpcProxy, TargetDetail};
pub use driver::StopReport;
pub use hub::MemoryHubHandle;
pub use microfw_core::config::{Config, ConfigError, WorkerMode};
pub use runner::{RunError, Runner, RunningService, StartError, StopError};

pub use microfw_core::{
    Backoff, CallError, CallbackRoute, Dialect, EventListener, HandlerError, HandlerType, Outcome,
    PublishError, RemoteError, Reply, RetryOn, RetryPolicy, Route, RpcListener, RunnerContext, Settle,
    ShutdownMode, TimeEntrypoint, WsRpcListener, extract,
};

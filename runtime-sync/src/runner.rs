//! [`Runner`]: builds a service from a config and contexts, starts its driver thread and
//! worker pools, and stops them.

use std::collections::HashMap;
use std::ffi::OsString;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use microfw_core::config::{Config, ConfigError, ModeError, WorkerMode};
use microfw_core::extract::Extensions;
use microfw_core::metrics::ServiceMetrics;
use microfw_core::route::ContextSpec;
use microfw_core::{BuildError, Engine, RouteId, RunnerContext, ServiceSpec};

use crate::chan::SyncSender;
use crate::client::{Producer, RpcProxy, ServiceHandle};
use crate::driver::{self, Driver, Input, StopReport};
use crate::exporter::MetricsLease;
use microfw_core::Transport;
use microfw_core::link::{Connect, LINK_SETUP_TIMEOUT, LinkSpec, LinkWaker, Links};

use crate::hub::{MemoryHubHandle, now};
use crate::pool::Pool;

/// Capacity of a driver's input channel (handler outcomes and client commands). Senders
/// wait when it is full: back-pressure, not memory growth.
const INPUT_CAPACITY: usize = 4096;

/// Builds and starts a service (micro_framework's `Runner`).
///
/// The config is validated at start (`SERVICE_NAME` required); its `MAX_WORKERS` is the budget
/// of [`default_context`](Self::default_context) (other contexts keep their own budgets), its
/// `PREFETCH_COUNT` (if set) raises every context's prefetch, `SHUTDOWN_TIMEOUT` and
/// `RPC_TIMEOUT` go to the Engine, and `AMQP_DIALECT` is the clients' default dialect.
///
/// Each context runs in the config's `WORKER_MODE` unless [`worker_mode`](Self::worker_mode)
/// overrides it for that context. A `thread` context gets [`ShutdownMode::FinishRunning`](microfw_core::ShutdownMode::FinishRunning) and
/// a `greedy_thread` context [`ShutdownMode::DrainPending`](microfw_core::ShutdownMode::DrainPending), overriding the context's own
/// setting. Every context gets a fixed pool of `max_workers` OS threads (its budget).
///
/// Links: the broker is the process's [`MemoryHubHandle::global`] unless
/// [`hub`](Self::hub) or [`broker`](Self::broker) names another. A service with WebSocket
/// routes serves them on its own server on `WEBSOCKET_IP:WEBSOCKET_PORT` (feature `ws`, on
/// by default; see [`websocket_options`](Self::websocket_options)) unless
/// [`websocket`](Self::websocket) names another link.
///
/// Only blocking handlers ([`Route::blocking`](microfw_core::Route::blocking),
/// [`CallbackRoute::blocking`](microfw_core::CallbackRoute::blocking)) run here: an async
/// handler is a start error naming its route.
///
/// # `process` worker mode
///
/// A `process` context (Unix only) runs its handlers in `max_workers` child processes, one
/// job at a time each. A child is this program started again (the current executable with
/// the same arguments, or [`worker_command`](Self::worker_command)) with the environment
/// variable `MICROFW_PROCESS_WORKER=<service>/<context index>`; when that program reaches
/// `start` (or [`run`](Self::run)) for the same service, `start` serves jobs instead of
/// starting the service, and exits the process when the service closes its input. So the
/// program must build the same service (same routes, in the same order) on the way there,
/// and must not do anything before it that a worker must not do twice. In a worker, `start`
/// of any other service fails with [`StartError::WorkerOfAnotherService`].
///
/// Jobs, outcomes and the requests of the handlers' [`Producer`]s and [`RpcProxy`]s (which
/// carry the worker's context) travel as frames over a Unix socket that is the child's
/// standard input; its standard output and error are this process's. Handlers run with the
/// child's own copy of the state (built by the child's program), and must not read standard
/// input. A child that exits or breaks the protocol during a job fails the job with
/// [`Outcome::Panicked`](microfw_core::Outcome::Panicked) (the route's retry policy applies)
/// and is replaced. `MAX_TASKS_PER_CHILD` retires a child after that many jobs. At stop, the
/// running jobs finish (within `SHUTDOWN_TIMEOUT`, after which their children are killed)
/// and every child is closed and reaped. Start fails ([`StartError::WorkerProcess`]) if a
/// child cannot be started or rebuilds a different service.
pub struct Runner<S = ()> {
    config: Config,
    state: S,
    contexts: Vec<RunnerContext<S>>,
    modes: HashMap<usize, WorkerMode>,
    broker: Option<Box<dyn Connect>>,
    websocket: Option<Box<dyn Connect>>,
    #[cfg(feature = "ws")]
    websocket_options: microfw_transport_ws::ServerOptions,
    worker_command: Option<(PathBuf, Vec<OsString>)>,
}

impl Runner<()> {
    /// A runner with no shared state.
    pub fn new(config: Config) -> Self {
        Runner::with_state(config, ())
    }
}

impl<S: Clone + Send + Sync + 'static> Runner<S> {
    /// A runner whose handlers can extract `State<T>` for every `T: FromRef<S>`.
    pub fn with_state(config: Config, state: S) -> Self {
        Runner {
            config,
            state,
            contexts: Vec::new(),
            modes: HashMap::new(),
            broker: None,
            websocket: None,
            #[cfg(feature = "ws")]
            websocket_options: Default::default(),
            worker_command: None,
        }
    }

    /// Adds a context (micro_framework's `Runner(contexts=[...])`); contexts are numbered
    /// from 0 in the order added.
    pub fn context(mut self, context: RunnerContext<S>) -> Self {
        self.contexts.push(context);
        self
    }

    /// An empty context whose budget is the config's `MAX_WORKERS`.
    pub fn default_context(&self) -> RunnerContext<S> {
        RunnerContext::new(self.config.max_workers)
    }

    /// Runs context number `context` (0-based, in the order added) in `mode` instead of the
    /// config's `WORKER_MODE`. A number with no context is a start error.
    pub fn worker_mode(mut self, context: usize, mode: WorkerMode) -> Self {
        self.modes.insert(context, mode);
        self
    }

    /// Uses `hub` as the broker (default: [`MemoryHubHandle::global`]).
    pub fn hub(self, hub: MemoryHubHandle) -> Self {
        self.broker(hub)
    }

    /// Uses the link `connector` opens as the broker (RabbitMQ, or a memory hub).
    pub fn broker(mut self, connector: impl Connect) -> Self {
        self.broker = Some(Box::new(connector));
        self
    }

    /// Serves WebSocket RPC through the link `connector` opens (a [`MemoryHubHandle`] keeps
    /// it in-process, for tests) instead of the service's own server.
    pub fn websocket(mut self, connector: impl Connect) -> Self {
        self.websocket = Some(Box::new(connector));
        self
    }

    /// Limits, token and address of the service's own WebSocket server (defaults: 1 MiB
    /// messages, no token, `WEBSOCKET_IP:WEBSOCKET_PORT`). Ignored when
    /// [`websocket`](Self::websocket) names a link.
    #[cfg(feature = "ws")]
    pub fn websocket_options(mut self, options: microfw_transport_ws::ServerOptions) -> Self {
        self.websocket_options = options;
        self
    }

    /// Starts `process` workers as `program args...` instead of this program with its own
    /// arguments (the environment variable naming the service and context is added). The
    /// command must reach [`start`](Self::start) for this same service.
    ///
    /// In a test binary, run the test itself again, alone:
    /// `.worker_command(std::env::current_exe()?, ["<test name>", "--exact"])`, the test name
    /// as `cargo test` lists it (with its module path). Everything the test does before this
    /// runner's `start` then also runs in every worker.
    pub fn worker_command<A: Into<OsString>>(
        mut self,
        program: impl Into<PathBuf>,
        args: impl IntoIterator<Item = A>,
    ) -> Self {
        self.worker_command = Some((program.into(), args.into_iter().map(Into::into).collect()));
        self
    }

    /// Validates the definition, starts the worker pools and the driver thread, and returns
    /// once every consumer is subscribed.
    pub fn start(self) -> Result<RunningService, StartError> {
        #[cfg(feature = "ws")]
        let Runner { config, state, contexts, modes, broker, websocket, websocket_options, worker_command } =
            self;
        #[cfg(not(feature = "ws"))]
        let Runner { config, state, contexts, modes, broker, websocket, worker_command } = self;
        config.validate()?;
        let broker = match broker {
            Some(connector) => connector,
            #[cfg(feature = "amqp")]
            None if config.amqp_uri.is_some() => Box::new(microfw_transport_amqp::AmqpSyncConnector::new()),
            #[cfg(not(feature = "amqp"))]
            None if config.amqp_uri.is_some() => return Err(StartError::AmqpUnsupported),
            None => Box::new(MemoryHubHandle::global()),
        };
        let supported = [WorkerMode::Thread, WorkerMode::GreedyThread, WorkerMode::Process];
        let supported = &supported[..if cfg!(unix) { 3 } else { 2 }];
        let (service, ctx_modes) =
            config.plan_service(state, contexts, &modes, supported).map_err(|e| match e {
                ModeError::NoSuchContext { index, contexts } => StartError::NoSuchContext { index, contexts },
                ModeError::Unsupported(WorkerMode::Async) => StartError::AsyncModeUnsupported,
                _ => StartError::ProcessModeUnsupported,
            })?;
        let (spec, table) = service.build()?;
        let mut route_pool = Vec::with_capacity(spec.routes.len());
        for (i, (route, ctx)) in spec.routes.iter().enumerate() {
            match table.handler(RouteId::from_raw(i as u32)) {
                Some(h) if h.is_blocking() => route_pool.push(ctx.into_raw() as usize),
                _ => return Err(StartError::AsyncHandler { route: route.name.clone() }),
            }
        }
        #[cfg(unix)]
        if let Some(target) = crate::worker::target()? {
            // A worker process: serve the jobs of one context, then exit.
            return Err(crate::worker::serve(&target, &spec, &table, config.amqp_dialect));
        }

        // The recorder first: the service's metric handles bind to the recorder current when
        // they are registered.
        let metrics_lease = if config.enable_metrics {
            let handle = crate::exporter::install().map_err(StartError::Metrics)?;
            let (host, port) = (&config.metrics.host, config.metrics.port);
            let lease = MetricsLease::acquire(host, port, &handle)
                .map_err(|e| StartError::Metrics(format!("cannot serve /metrics on {host}:{port}: {e}")))?;
            Some(lease)
        } else {
            None
        };
        let mut metrics = ServiceMetrics::new(&spec, &ctx_modes);
        metrics.started();

        let table = Arc::new(table);
        let (tx, rx) = driver::channel(INPUT_CAPACITY);
        let mut pools = Vec::with_capacity(spec.contexts.len());
        for (i, ctx) in spec.contexts.iter().enumerate() {
            let pool = start_pool(&spec, i, ctx, ctx_modes[i], &config, &worker_command, &table, &tx);
            match pool {
                Ok(pool) => pools.push(pool),
                Err(e) => {
                    pools.iter_mut().for_each(|p| drop(p.close()));
                    return Err(e);
                }
            }
        }

        let handle =
            ServiceHandle { tx: tx.clone(), service: spec.name.clone(), dialect: config.amqp_dialect };
        let mut extensions = Extensions::new();
        extensions.insert(handle.clone());
        let engine = Engine::new(&spec, config.engine_config(entropy_seed()));
        let waker = LinkWaker::new(move || {
            // Full: the driver has inputs to take, and checks the flag before each.
            // Disconnected: it is ending, and closes its links.
            let _ = tx.try_send(Input::Wake);
        });
        #[cfg(feature = "ws")]
        let mut websocket_handle = None;
        let websocket = match websocket {
            Some(connector) => Some(connector),
            #[cfg(feature = "ws")]
            None if spec.serves_websocket() => {
                let server = microfw_transport_ws::sync::WsServer::new(websocket_options)
                    .with_connections_gauge(metrics.ws_connections());
                websocket_handle = Some(server.handle());
                Some(Box::new(server) as Box<dyn Connect>)
            }
            None => None,
        };
        let links = match open_links(&spec.name, &config, broker, websocket, &waker) {
            Ok(links) => links,
            Err(e) => {
                pools.iter_mut().for_each(|p| drop(p.close()));
                return Err(e);
            }
        };
        let mut driver = Driver {
            engine,
            links,
            waker,
            rx,
            route_pool,
            pools,
            extensions,
            calls: HashMap::new(),
            emits: HashMap::new(),
            arrivals: Default::default(),
            outcomes: Vec::new(),
            metrics,
            shutting_down: false,
            stopped: None,
        };
        driver.engine.handle_start(now());
        driver.turn(); // hands every subscription to its link
        // ... and waits until each link has declared and started its consumers.
        let ready = driver.links.barriers().into_iter().try_for_each(|b| b.wait(LINK_SETUP_TIMEOUT));
        if let Err(reason) = ready {
            driver.links.close(LINK_SETUP_TIMEOUT);
            driver.pools.iter_mut().for_each(|p| drop(p.close()));
            return Err(StartError::Link(reason));
        }
        let name = format!("{}-driver", spec.name);
        let (driver_tx, driver_rx) = std::sync::mpsc::sync_channel::<Driver>(1);
        let thread = std::thread::Builder::new().name(name).spawn(move || match driver_rx.recv() {
            Ok(driver) => driver.run(),
            Err(_) => StopReport { unfinished: 0 },
        });
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                driver.links.close(LINK_SETUP_TIMEOUT);
                driver.pools.iter_mut().for_each(|p| drop(p.close()));
                return Err(StartError::Threads(format!("driver: {e}")));
            }
        };
        // The thread is waiting for it: the send cannot fail.
        let _ = driver_tx.send(driver);
        tracing::info!(service = %spec.name, "started");
        Ok(RunningService {
            name: spec.name,
            handle,
            thread: Some(thread),
            metrics: metrics_lease,
            #[cfg(feature = "ws")]
            websocket: websocket_handle,
        })
    }

    /// Starts the service and blocks until SIGINT or SIGTERM, then stops it gracefully.
    pub fn run(self) -> Result<StopReport, RunError> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        // Install the handlers first: a signal between start and the wait is not lost.
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
            .map_err(|e| RunError::Signal(e.to_string()))?;
        let service = self.start()?;
        let signal = signals.forever().next();
        tracing::info!(service = service.name(), ?signal, "signal received");
        signals.handle().close();
        Ok(service.stop()?)
    }
}

impl<S> std::fmt::Debug for Runner<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("config", &self.config)
            .field("contexts", &self.contexts.len())
            .field("modes", &self.modes)
            .finish_non_exhaustive()
    }
}

/// A started service. Stop it with [`stop`](Self::stop); dropping it asks the driver to stop
/// but waits for nothing.
#[derive(Debug)]
pub struct RunningService {
    name: Arc<str>,
    handle: ServiceHandle,
    thread: Option<JoinHandle<StopReport>>,
    /// This service's use of the `/metrics` server (`ENABLE_METRICS`); released on drop.
    metrics: Option<MetricsLease>,
    /// The service's own WebSocket server, when it runs one.
    #[cfg(feature = "ws")]
    websocket: Option<microfw_transport_ws::WsServerHandle>,
}

impl RunningService {
    /// The service name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where `/metrics` is served (the bound address, so a configured port 0 shows the port
    /// picked), or `None` without `ENABLE_METRICS`. The server is shared by every service of
    /// the process configured with the same `METRICS.HOST` and `METRICS.PORT`, and stops when
    /// the last of them stops.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(MetricsLease::addr)
    }

    /// The address the service's own WebSocket server listens on (useful with port 0), or
    /// `None` when it runs none (no WebSocket routes, or [`Runner::websocket`] named a link).
    pub fn websocket_addr(&self) -> Option<SocketAddr> {
        #[cfg(feature = "ws")]
        return self.websocket.as_ref().and_then(microfw_transport_ws::WsServerHandle::local_addr);
        #[cfg(not(feature = "ws"))]
        None
    }

    /// A producer dispatching events as this service, with no worker context.
    pub fn producer(&self) -> Producer {
        self.handle.producer()
    }

    /// An RPC proxy calling from this service, with no worker context.
    pub fn rpc(&self) -> RpcProxy {
        self.handle.rpc()
    }

    /// Asks the driver to begin a graceful stop and returns at once (from a signal handler
    /// thread, say); [`stop`](Self::stop) waits for the end. Deliveries that reached this
    /// service before the request are handled by the shutdown mode like any held work.
    pub fn request_stop(&self) {
        request(&self.handle.tx);
    }

    /// Stops gracefully and blocks until done: consumers are cancelled, each context ends as
    /// its shutdown mode says (at most `SHUTDOWN_TIMEOUT`), the link closes (unsettled
    /// deliveries go back to their queues) and idle worker threads are joined; threads
    /// still running an abandoned handler are detached.
    pub fn stop(mut self) -> Result<StopReport, StopError> {
        let Some(thread) = self.thread.take() else {
            return Err(StopError::Driver("already stopped".into()));
        };
        request(&self.handle.tx);
        thread.join().map_err(|p| StopError::Driver(microfw_core::handler::panic_message(&*p)))
    }
}

impl Drop for RunningService {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.handle.tx.try_send(Input::Shutdown);
        }
    }
}

/// Starts context `index`'s pool: threads, or worker processes in `process` mode.
#[allow(clippy::too_many_arguments)]
fn start_pool<S: Clone + Send + Sync + 'static>(
    spec: &ServiceSpec,
    index: usize,
    ctx: &ContextSpec,
    mode: WorkerMode,
    config: &Config,
    worker_command: &Option<(PathBuf, Vec<OsString>)>,
    table: &Arc<microfw_core::HandlerTable<S>>,
    tx: &SyncSender<Input>,
) -> Result<Pool, StartError> {
    let name = format!("{}-{}", spec.name, ctx.metric_label);
    #[cfg(unix)]
    if mode == WorkerMode::Process {
        use crate::process::{Spawner, WorkerCommand};
        let command = worker_command
            .as_ref()
            .map(|(program, args)| WorkerCommand { program: program.clone(), args: args.clone() });
        let context = microfw_core::ContextId::from_raw(index as u32);
        let spawner = Spawner::for_context(spec, context, command, config.max_tasks_per_child)
            .map_err(|e| StartError::WorkerProcess(format!("cannot find this program: {e}")))?;
        return crate::process::ProcessPool::start(
            ctx.max_workers,
            &name,
            spawner,
            &crate::worker::Port(tx.clone()),
        )
        .map(Pool::processes)
        .map_err(|e| StartError::WorkerProcess(format!("context {index}: {e}")));
    }
    let _ = (mode, config, worker_command);
    Pool::start(ctx.max_workers, &name, table, tx)
        .map_err(|e| StartError::Threads(format!("context {index}: {e}")))
}

/// Opens the broker link, and the WebSocket link when one is configured (otherwise the
/// broker link carries WebSocket RPC too).
fn open_links(
    service: &str,
    config: &Config,
    broker: Box<dyn Connect>,
    websocket: Option<Box<dyn Connect>>,
    waker: &LinkWaker,
) -> Result<Links, StartError> {
    let spec = |transport| LinkSpec { service: service.to_owned(), transport, config: config.clone() };
    let mut links = Links::new();
    let link = broker.connect(&spec(Transport::Broker), waker.clone());
    let link = link.map_err(|e| StartError::Link(e.to_string()))?;
    match websocket {
        None => links.add(&[Transport::Broker, Transport::WebSocket], link),
        Some(ws) => {
            links.add(&[Transport::Broker], link);
            match ws.connect(&spec(Transport::WebSocket), waker.clone()) {
                Ok(ws) => links.add(&[Transport::WebSocket], ws),
                Err(e) => {
                    links.close(LINK_SETUP_TIMEOUT);
                    return Err(StartError::Link(e.to_string()));
                }
            }
        }
    }
    Ok(links)
}

/// Why a service did not start.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The config is not valid (e.g. `SERVICE_NAME` missing).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `AMQP_URI` is set, but this runtime was built without its `amqp` feature.
    #[error(
        "AMQP_URI is set, but microfw-runtime-sync was built without its `amqp` feature \
         (enable it, or unset AMQP_URI to use the memory hub)"
    )]
    AmqpUnsupported,
    /// `WORKER_MODE = process` (for the config or a context) on a platform without Unix
    /// sockets.
    #[error("process worker mode needs a Unix platform")]
    ProcessModeUnsupported,
    /// `process` mode: a worker process could not be started, or did not rebuild the same
    /// service; or this process is a worker and cannot serve (a bad `MICROFW_PROCESS_WORKER`,
    /// standard input not a worker socket).
    #[error("worker process: {0}")]
    WorkerProcess(String),
    /// This process is a `process`-mode worker of another service: it starts no service.
    #[error(
        "this process is a worker of {worker_of} (MICROFW_PROCESS_WORKER); it does not start service {service:?}"
    )]
    WorkerOfAnotherService {
        /// The worker's target, `<service>/<context index>`.
        worker_of: String,
        /// The service whose start was refused.
        service: String,
    },
    /// `WORKER_MODE = async` / `asyncio` (for the config or a context).
    #[error("async worker mode needs microfw-runtime-tokio")]
    AsyncModeUnsupported,
    /// [`Runner::worker_mode`] named a context that was not added.
    #[error("worker mode set for context {index}, but there are {contexts} contexts")]
    NoSuchContext {
        /// The index given.
        index: usize,
        /// How many contexts there are.
        contexts: usize,
    },
    /// An async handler: this runtime runs blocking handlers only.
    #[error(
        "route {route:?} has an async handler, but microfw-runtime-sync runs blocking handlers only; \
         use Route::blocking with a plain fn, or microfw-runtime-tokio"
    )]
    AsyncHandler {
        /// The route.
        route: String,
    },
    /// The service definition is invalid.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// A link (the broker, the WebSocket server) could not be opened, or could not declare
    /// and start the service's consumers.
    #[error("link: {0}")]
    Link(String),
    /// `ENABLE_METRICS` is set but the metrics could not be served: the address cannot be
    /// bound, or another global `metrics` recorder was installed first.
    #[error("metrics: {0}")]
    Metrics(String),
    /// A worker or driver thread could not be started.
    #[error("cannot start threads: {0}")]
    Threads(String),
}

/// Why [`RunningService::stop`] failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StopError {
    /// The driver thread failed (panicked), or the service was already stopped.
    #[error("the service driver failed: {0}")]
    Driver(String),
}

/// Why [`Runner::run`] failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// The service did not start.
    #[error(transparent)]
    Start(#[from] StartError),
    /// Signal handlers could not be installed.
    #[error("cannot listen for signals: {0}")]
    Signal(String),
    /// The stop failed.
    #[error(transparent)]
    Stop(#[from] StopError),
}

/// Sends a stop request; if the driver is gone the send fails and the caller learns it from
/// the join.
fn request(tx: &SyncSender<Input>) {
    let _ = tx.send(Input::Shutdown);
}

/// A seed from OS entropy: std's per-process random hash keys, mixed with the time, the
/// process id and a counter (two runners in one process never share a seed).
fn entropy_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(now().as_unix_nanos());
    h.write_u32(std::process::id());
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.finish()
}

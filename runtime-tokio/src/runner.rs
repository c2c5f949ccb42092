//! [`Runner`]: builds a service from a config and contexts, starts its driver, and stops it.

use std::collections::HashMap;
use std::ffi::OsString;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use microfw_core::config::{Config, ConfigError, ModeError, WorkerMode};
use microfw_core::extract::Extensions;
use microfw_core::link::{ConnectAsync, LINK_SETUP_TIMEOUT, LinkSpec, LinkWaker, Links};
use microfw_core::metrics::ServiceMetrics;
use microfw_core::route::ContextSpec;
use microfw_core::{BuildError, Engine, RunnerContext, ServiceSpec, Transport};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::client::{Producer, RpcProxy, ServiceHandle};
use crate::driver::{Driver, Input, RouteExec, StopReport};
use crate::exporter::MetricsLease;
use crate::hub::{MemoryHubHandle, now};
use crate::pool::Pool;

/// Capacity of a driver's input channel (handler outcomes and client commands). Senders
/// wait when it is full: back-pressure, not memory growth.
const INPUT_CAPACITY: usize = 4096;

/// Builds and starts a service (micro_framework's `Runner`).
///
/// Each context runs in the config's `WORKER_MODE` unless [`worker_mode`](Self::worker_mode)
/// overrides it, with its own budget ([`RunnerContext::new`]); `PREFETCH_COUNT`, when set,
/// becomes every context's prefetch (never below its budget). `thread` contexts get [`ShutdownMode::FinishRunning`](microfw_core::ShutdownMode::FinishRunning) and `greedy_thread`
/// contexts [`ShutdownMode::DrainPending`](microfw_core::ShutdownMode::DrainPending) (overriding the context's own setting); `async`
/// contexts keep theirs.
///
/// Links: the broker is the process's [`MemoryHubHandle::global`] unless
/// [`hub`](Self::hub) or [`broker`](Self::broker) names another; WebSocket RPC goes through
/// the broker link (the memory hub carries it in-process) unless
/// [`websocket`](Self::websocket) names a WebSocket link.
///
/// # `process` worker mode
///
/// A `process` context (Unix only) runs its handlers, blocking or async, in `max_workers`
/// child processes, one job at a time each (an async handler on a current-thread runtime in
/// the child). A child is this program started again (the current executable with the same
/// arguments, or [`worker_command`](Self::worker_command)) with the environment variable
/// `MICROFW_PROCESS_WORKER=<service>/<context index>`; when that program reaches `start` (or
/// [`run`](Self::run)) for the same service, on a tokio runtime, `start` serves jobs instead
/// of starting the service, and exits the process when the service closes its input. So the
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
    broker: Option<Box<dyn ConnectAsync>>,
    websocket: Option<Box<dyn ConnectAsync>>,
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
    pub fn broker(mut self, connector: impl ConnectAsync) -> Self {
        self.broker = Some(Box::new(connector));
        self
    }

    /// Serves WebSocket RPC through the link `connector` opens (a
    /// [`MemoryHubHandle`] keeps it in-process, for tests). By default a service with
    /// WebSocket routes serves them with its own server on `WEBSOCKET_IP:WEBSOCKET_PORT`
    /// (feature `ws`; see [`websocket_options`](Self::websocket_options)).
    pub fn websocket(mut self, connector: impl ConnectAsync) -> Self {
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

    /// Validates the definition, starts the worker pools and the driver, and returns once
    /// every consumer is subscribed. Must be called on a tokio runtime (multi-threaded
    /// recommended; a current-thread runtime works but runs handlers and the driver on one
    /// thread).
    ///
    /// Metrics: the service's metric handles bind to the `metrics` recorder current on the
    /// calling thread while `start` runs (a thread-local one set with
    /// `metrics::set_default_local_recorder`, else the global one, else none). With
    /// `ENABLE_METRICS` it first installs the Prometheus recorder as the global one (once per
    /// process; a foreign global recorder is a [`StartError::Metrics`]) and serves `/metrics`
    /// on `METRICS.HOST:METRICS.PORT` (see [`RunningService::metrics_addr`]).
    pub async fn start(self) -> Result<RunningService, StartError> {
        #[cfg(feature = "ws")]
        let Runner { config, state, contexts, modes, broker, websocket, websocket_options, worker_command } =
            self;
        #[cfg(not(feature = "ws"))]
        let Runner { config, state, contexts, modes, broker, websocket, worker_command } = self;
        config.validate()?;
        let broker = match broker {
            Some(connector) => connector,
            #[cfg(feature = "amqp")]
            None if config.amqp_uri.is_some() => Box::new(microfw_transport_amqp::AmqpConnector::new()),
            #[cfg(not(feature = "amqp"))]
            None if config.amqp_uri.is_some() => return Err(StartError::AmqpUnsupported),
            None => Box::new(MemoryHubHandle::global()),
        };
        let supported =
            [WorkerMode::Async, WorkerMode::Thread, WorkerMode::GreedyThread, WorkerMode::Process];
        let supported = &supported[..if cfg!(unix) { 4 } else { 3 }];
        let (service, ctx_modes) =
            config.plan_service(state, contexts, &modes, supported).map_err(|e| match e {
                ModeError::NoSuchContext { index, contexts } => StartError::NoSuchContext { index, contexts },
                _ => StartError::ProcessModeUnsupported,
            })?;
        let (spec, table) = service.build()?;

        // Check every route against its context's mode before starting any thread.
        let mut routes = Vec::with_capacity(spec.routes.len());
        for (handler, (route, ctx)) in table.handlers().iter().zip(&spec.routes) {
            let index = ctx.into_raw() as usize;
            if handler.is_blocking() && ctx_modes[index] == WorkerMode::Async {
                return Err(StartError::BlockingHandlerInAsyncContext { route: route.name.clone() });
            }
            routes.push(RouteExec { handler: handler.clone(), pool: None });
        }
        #[cfg(unix)]
        if let Some(target) = crate::worker::target()? {
            // A worker process: serve the jobs of one context, then exit.
            return Err(crate::worker::serve(&target, &spec, table, config.amqp_dialect).await);
        }

        // The recorder first: the service's metric handles bind to the recorder current when
        // they are registered.
        let metrics_lease = if config.enable_metrics {
            let handle = crate::exporter::install().map_err(StartError::Metrics)?;
            let (host, port) = (&config.metrics.host, config.metrics.port);
            let lease = MetricsLease::acquire(host, port, &handle)
                .await
                .map_err(|e| StartError::Metrics(format!("cannot serve /metrics on {host}:{port}: {e}")))?;
            Some(lease)
        } else {
            None
        };
        let mut metrics = ServiceMetrics::new(&spec, &ctx_modes);
        metrics.started();
        let (tx, rx) = mpsc::channel(INPUT_CAPACITY);
        let mut pools = Vec::new();
        let mut pool_of_context = Vec::new();
        for (i, (ctx, mode)) in spec.contexts.iter().zip(&ctx_modes).enumerate() {
            if *mode == WorkerMode::Async {
                pool_of_context.push(None);
            } else {
                let pool = start_pool(&spec, i, ctx, *mode, &config, &worker_command, &tx).await;
                let pool = match pool {
                    Ok(pool) => pool,
                    Err(e) => {
                        pools.iter_mut().for_each(|p: &mut Pool<S>| drop(p.close()));
                        release(metrics_lease).await;
                        return Err(e);
                    }
                };
                pools.push(pool);
                pool_of_context.push(Some(pools.len() - 1));
            }
        }
        for (exec, (_, ctx)) in routes.iter_mut().zip(&spec.routes) {
            exec.pool = pool_of_context[ctx.into_raw() as usize];
        }

        let handle =
            ServiceHandle { tx: tx.clone(), service: spec.name.clone(), dialect: config.amqp_dialect };
        let mut extensions = Extensions::new();
        extensions.insert(handle.clone());
        let engine = Engine::new(&spec, config.engine_config(entropy_seed()));
        let waker = {
            let tx = tx.clone();
            // A dropped wake-up (full channel) is fine: the driver checks the flag each pass.
            LinkWaker::new(move || {
                let _ = tx.try_send(Input::Wake);
            })
        };
        #[cfg(feature = "ws")]
        let mut websocket_handle = None;
        let websocket = match websocket {
            Some(connector) => Some(connector),
            #[cfg(feature = "ws")]
            None if spec.serves_websocket() => {
                let server = microfw_transport_ws::tokio::WsServer::new(websocket_options)
                    .with_connections_gauge(metrics.ws_connections());
                websocket_handle = Some(server.handle());
                Some(Box::new(server) as Box<dyn ConnectAsync>)
            }
            None => None,
        };
        let links = match open_links(&spec.name, &config, broker, websocket, &waker).await {
            Ok(links) => links,
            Err(e) => {
                release(metrics_lease).await;
                return Err(e);
            }
        };
        let mut driver = Driver {
            engine,
            links,
            waker,
            rx,
            tx,
            routes,
            pools,
            state: table.state().clone(),
            extensions,
            calls: Default::default(),
            emits: Default::default(),
            tasks: Default::default(),
            arrivals: Default::default(),
            outcomes: Vec::new(),
            metrics,
            shutting_down: false,
            stopped: None,
            received: None,
        };
        driver.engine.handle_start(now());
        driver.turn(); // hands every subscription to its link
        // ... and waits until each link has declared and started its consumers.
        let barriers = driver.links.barriers();
        let ready = tokio::task::spawn_blocking(move || {
            barriers.into_iter().try_for_each(|b| b.wait(LINK_SETUP_TIMEOUT))
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        if let Err(reason) = ready {
            let mut links = std::mem::take(&mut driver.links);
            let _ = tokio::task::spawn_blocking(move || links.close(LINK_SETUP_TIMEOUT)).await;
            release(metrics_lease).await;
            return Err(StartError::Link(reason));
        }
        tracing::info!(service = %spec.name, "started");
        let task = tokio::spawn(driver.run());
        Ok(RunningService {
            name: spec.name,
            handle,
            task: Some(task),
            metrics: metrics_lease,
            #[cfg(feature = "ws")]
            websocket: websocket_handle,
        })
    }

    /// Starts the service and runs it until SIGINT or SIGTERM, then stops it gracefully. The
    /// signal handlers are installed before the service starts.
    pub async fn run(self) -> Result<StopReport, RunError> {
        let signals = Signals::new().map_err(|e| RunError::Signal(e.to_string()))?;
        let service = self.start().await?;
        signals.wait().await;
        tracing::info!(service = service.name(), "signal received");
        Ok(service.stop().await?)
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
    task: Option<JoinHandle<StopReport>>,
    /// This service's use of the `/metrics` server (`ENABLE_METRICS`); released at stop.
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

    /// A producer dispatching events as this service, with no worker context.
    pub fn producer(&self) -> Producer {
        self.handle.producer()
    }

    /// An RPC proxy calling from this service, with no worker context.
    pub fn rpc(&self) -> RpcProxy {
        self.handle.rpc()
    }

    /// Where `/metrics` is served (the bound address, so a configured port 0 shows the port
    /// picked), or `None` without `ENABLE_METRICS`. The server is shared by every service of
    /// the process configured with the same `METRICS.HOST` and `METRICS.PORT`, and stops when
    /// the last of them stops (or is dropped).
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

    /// Stops gracefully: consumers are cancelled, each context ends as its shutdown mode says
    /// (at most `SHUTDOWN_TIMEOUT`), the link closes (unsettled deliveries go back to their
    /// queues) and idle worker threads are joined. Then this service leaves the `/metrics`
    /// server; if it was the last one there, the server's socket is closed before this returns.
    pub async fn stop(mut self) -> Result<StopReport, StopError> {
        let Some(task) = self.task.take() else { return Err(StopError::Driver("already stopped".into())) };
        // If the driver already ended, the send fails and the join below reports it.
        let _ = self.handle.tx.send(Input::Shutdown).await;
        let report = task.await.map_err(|e| StopError::Driver(e.to_string()));
        if let Some(lease) = self.metrics.take() {
            lease.release().await;
        }
        report
    }
}

impl Drop for RunningService {
    fn drop(&mut self) {
        if self.task.is_some() {
            let _ = self.handle.tx.try_send(Input::Shutdown);
        }
    }
}

/// Starts context `index`'s pool: threads, or worker processes in `process` mode (their
/// start waits for the children, off the reactor).
async fn start_pool<S: Send + 'static>(
    spec: &ServiceSpec,
    index: usize,
    ctx: &ContextSpec,
    mode: WorkerMode,
    config: &Config,
    worker_command: &Option<(PathBuf, Vec<OsString>)>,
    tx: &mpsc::Sender<Input>,
) -> Result<Pool<S>, StartError> {
    let name = format!("{}-{}", spec.name, ctx.metric_label);
    #[cfg(unix)]
    if mode == WorkerMode::Process {
        use crate::worker::Port;
        use microfw_runtime_sync::process::{ProcessPool, Spawner, WorkerCommand};
        let command = worker_command
            .as_ref()
            .map(|(program, args)| WorkerCommand { program: program.clone(), args: args.clone() });
        let context = microfw_core::ContextId::from_raw(index as u32);
        let spawner = Spawner::for_context(spec, context, command, config.max_tasks_per_child)
            .map_err(|e| StartError::WorkerProcess(format!("cannot find this program: {e}")))?;
        let (size, tx) = (ctx.max_workers, tx.clone());
        let started =
            tokio::task::spawn_blocking(move || ProcessPool::start(size, &name, spawner, &Port(tx)));
        return match started.await {
            Ok(pool) => pool
                .map(Pool::processes)
                .map_err(|e| StartError::WorkerProcess(format!("context {index}: {e}"))),
            Err(e) => Err(StartError::WorkerProcess(format!("context {index}: {e}"))),
        };
    }
    let _ = (mode, config, worker_command);
    Pool::start(ctx.max_workers, &name, tx.clone())
        .map_err(|e| StartError::Threads(format!("context {index}: {e}")))
}

/// Gives back the `/metrics` lease of a start that failed, waiting until the server's socket
/// is closed if it was the last user (a plain drop would leave the port bound a while).
async fn release(lease: Option<MetricsLease>) {
    if let Some(lease) = lease {
        lease.release().await;
    }
}

/// Opens the broker link, and the WebSocket link when one is configured (otherwise the
/// broker link carries WebSocket RPC too).
async fn open_links(
    service: &str,
    config: &Config,
    broker: Box<dyn ConnectAsync>,
    websocket: Option<Box<dyn ConnectAsync>>,
    waker: &LinkWaker,
) -> Result<Links, StartError> {
    let spec = |transport| LinkSpec { service: service.to_owned(), transport, config: config.clone() };
    let mut links = Links::new();
    let link = broker.connect(spec(Transport::Broker), waker.clone()).await;
    let link = link.map_err(|e| StartError::Link(e.to_string()))?;
    match websocket {
        None => links.add(&[Transport::Broker, Transport::WebSocket], link),
        Some(ws) => {
            links.add(&[Transport::Broker], link);
            let ws = ws.connect(spec(Transport::WebSocket), waker.clone()).await;
            match ws {
                Ok(ws) => links.add(&[Transport::WebSocket], ws),
                Err(e) => {
                    tokio::task::spawn_blocking(move || links.close(LINK_SETUP_TIMEOUT)).await.ok();
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
        "AMQP_URI is set, but microfw-runtime-tokio was built without its `amqp` feature \
         (enable it, or unset AMQP_URI to use the memory hub)"
    )]
    AmqpUnsupported,
    /// `WORKER_MODE = process` (in the config or for a context) on a platform without Unix
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
    /// [`Runner::worker_mode`] named a context that was not added.
    #[error("worker mode set for context {index}, but there are {contexts} contexts")]
    NoSuchContext {
        /// The index given.
        index: usize,
        /// How many contexts there are.
        contexts: usize,
    },
    /// A blocking handler in an `async` context (it would stall the reactor).
    #[error(
        "route {route:?} has a blocking handler but its context runs in async worker mode; \
         make it an async fn (Route::new) or run the context in thread mode"
    )]
    BlockingHandlerInAsyncContext {
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
    /// A worker thread could not be started.
    #[error("cannot start worker threads: {0}")]
    Threads(String),
    /// `ENABLE_METRICS` is set but the metrics could not be served: the address cannot be
    /// bound, or another global `metrics` recorder was installed first.
    #[error("metrics: {0}")]
    Metrics(String),
}

/// Why [`RunningService::stop`] failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StopError {
    /// The driver task failed (panicked or was cancelled).
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

/// SIGINT and SIGTERM listeners (Ctrl-C elsewhere).
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Signals { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())? })
        }
        #[cfg(not(unix))]
        {
            Ok(Signals {})
        }
    }

    async fn wait(mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
        #[cfg(not(unix))]
        {
            let _ = &mut self;
            let _ = tokio::signal::ctrl_c().await;
        }
    }
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

//! Service configuration: micro_framework's keys, read from environment variables and TOML.
//!
//! [`Config`] holds every setting a runner needs, with micro_framework 2.0.16's key names and
//! defaults where it has the key. Loading is pure: [`Config::from_env`] and
//! [`Config::merge_env`] take the environment as `(name, value)` pairs, [`Config::from_toml_str`]
//! takes the file's text. The runtimes read `std::env::vars()` and the file and pass them in;
//! this module does no IO. The usual precedence is defaults, then the file, then the
//! environment:
//!
//! ```
//! use microfw_core::config::{Config, WorkerMode};
//!
//! let file = "SERVICE_NAME = \"billing\"\nMAX_WORKERS = 8\n[METRICS]\nPORT = 9100\n";
//! let env = [("MAX_WORKERS".to_string(), "16".to_string())];
//! let config = Config::from_toml_str(file)?.merge_env(env)?;
//! config.validate()?;
//! assert_eq!(config.max_workers, 16);
//! assert_eq!(config.metrics.port, 9100);
//! assert_eq!(config.worker_mode, WorkerMode::Thread);
//! # Ok::<(), microfw_core::config::ConfigError>(())
//! ```
//!
//! In TOML the metric server's keys sit in a `[METRICS]` table (`HOST`, `PORT`); as environment
//! variables they are `METRICS_HOST` and `METRICS_PORT`. A bad value is a [`ConfigError`] naming
//! the key and the expected form. The password in `AMQP_URI` never appears in `Debug` output
//! or in an error (see [`AmqpUri`]).
//!
//! What it does not do: read files or the process environment, decide whether the runtime
//! supports a [`WorkerMode`] (process mode is a valid value here; runtimes refuse it), or
//! connect anywhere.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use toml::{Table, Value};

use crate::engine::EngineConfig;
use crate::route::{Dialect, RunnerContext, ShutdownMode};
use crate::service::Service;

/// The configuration of one service process. Every field documents its key, its default and
/// the micro_framework key it matches. [`Config::default()`] is the documented table.
///
/// Loading checks each value's form; [`Config::validate`] checks the whole (a service name is
/// set, counts are positive). Fields are public, so code may also build or adjust a config;
/// call `validate` afterwards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// `AMQP_URI`: the broker, e.g. `amqp://guest:guest@127.0.0.1:5672/`. Default: none, meaning
    /// the embedded memory transport. micro_framework: `AMQP_URI` (its `AMPQ_URI` default is a
    /// typo that nothing reads). An empty value means none.
    pub amqp_uri: Option<AmqpUri>,
    /// `AMQP_HEARTBEAT`: AMQP heartbeat of consumer connections, seconds (integer or float,
    /// 0 disables). Default 10 s, micro_framework 2.0.16's default (2.0.17 moved to 60).
    pub amqp_heartbeat: Duration,
    /// `SERVICE_NAME`: names the RPC queue, event exchange and event queues. Default: none;
    /// required when the runner starts (runners fill it from the `Service` when unset). No `.`
    /// or whitespace. micro_framework: `SERVICE_NAME`. An empty value means none.
    pub service_name: Option<String>,
    /// `MAX_WORKERS`: concurrent handler runs per context, at least 1. Default 3.
    /// micro_framework: `MAX_WORKERS` (per context overridable, see [`ContextOverrides`]).
    pub max_workers: u32,
    /// `WORKER_MODE`: how handlers run. Default `thread`. micro_framework: `WORKER_MODE`
    /// (`asyncio` is accepted for `async`).
    pub worker_mode: WorkerMode,
    /// `MAX_TASKS_PER_CHILD`: runs before a process worker is replaced (process mode only).
    /// Default: none. micro_framework documents it and ignores it.
    pub max_tasks_per_child: Option<u32>,
    /// `WEBSOCKET_IP`: address the WebSocket RPC server binds. Default `0.0.0.0`.
    /// micro_framework: `WEBSOCKET_IP`.
    pub websocket_ip: String,
    /// `WEBSOCKET_PORT`: port of the WebSocket RPC server (0 = any free port). Default 8765.
    /// micro_framework: `WEBSOCKET_PORT`.
    pub websocket_port: u16,
    /// `ENABLE_METRICS`: serve Prometheus metrics on [`metrics`](Self::metrics). Default false.
    /// From the environment: `true/false`, `1/0`, `yes/no`, any case. micro_framework:
    /// `ENABLE_METRICS`.
    pub enable_metrics: bool,
    /// `METRICS` (`[METRICS]` table in TOML, `METRICS_HOST` / `METRICS_PORT` in the environment):
    /// where the metric server listens. micro_framework: `METRICS.HOST` / `METRICS.PORT`.
    pub metrics: MetricsConfig,
    /// `AMQP_DIALECT`: `nameko` or `micro_framework`, the default dialect of listeners, proxies
    /// and producers that name none. Default `nameko`. Not a micro_framework key.
    pub amqp_dialect: Dialect,
    /// `RPC_EXCHANGE`: the exchange of Nameko-dialect RPC. Default `nameko-rpc` (Nameko's
    /// `rpc_exchange`). Not a micro_framework key.
    pub rpc_exchange: String,
    /// `AUTO_DELETE_EVENT_EXCHANGES`: declare event exchanges auto-delete. Default false
    /// (Nameko 2.14's default). Nameko key of the same name.
    pub auto_delete_event_exchanges: bool,
    /// `PREFETCH_COUNT`: AMQP prefetch of each context's consumers. Default: none, meaning the
    /// context's `MAX_WORKERS` (micro_framework's behaviour). It may raise the prefetch, never
    /// lower it below `MAX_WORKERS` (see [`Config::context_settings`]); 0 is an error.
    pub prefetch_count: Option<u32>,
    /// `SHUTDOWN_TIMEOUT`: how long a graceful stop may take before unfinished work is left
    /// unacked, seconds (integer or float). Default 30 s. Not a micro_framework key.
    pub shutdown_timeout: Duration,
    /// `RPC_TIMEOUT`: the deadline of an outgoing RPC call that names none, seconds (integer or
    /// float, above 0). Default 30 s. Our addition: micro_framework calls have no timeout.
    pub rpc_timeout: Duration,
}

/// Where the Prometheus metric server listens (`METRICS.HOST`, `METRICS.PORT`). It runs only
/// when [`Config::enable_metrics`] is true.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsConfig {
    /// `METRICS.HOST` / `METRICS_HOST`: bind address. Default `0.0.0.0`.
    pub host: String,
    /// `METRICS.PORT` / `METRICS_PORT`: port (0 = any free port). Default 8000.
    pub port: u16,
}

/// How a context runs its handlers (`WORKER_MODE`). Parsing accepts `thread`, `greedy_thread`,
/// `async`, `asyncio` (alias of `async`) and `process`, in any case; it does not check that
/// the runtime supports the mode.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Default)]
pub enum WorkerMode {
    /// `thread`: a fixed pool; on stop, running work finishes and unstarted work is returned.
    #[default]
    Thread,
    /// `greedy_thread`: a pool that drains pending work on stop.
    GreedyThread,
    /// `async` (or `asyncio`): handlers are futures on the runtime's executor.
    Async,
    /// `process`: handlers run in child processes started from the service's own program
    /// (Unix; see the runtimes' `Runner`).
    Process,
}

/// A broker URI whose password never shows: `Debug` and `Display` print
/// `amqp://user:***@host:port/vhost`. Only [`AmqpUri::expose`] gives the real text, for the
/// transport. It checks the scheme only; it does not validate the rest of the URI.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct AmqpUri(String);

/// Per-context settings that override the process-wide [`Config`] (micro_framework's
/// `RunnerContext(max_workers, worker_mode)`). `None` keeps the config's value.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct ContextOverrides {
    /// Overrides `MAX_WORKERS` for this context (0 is taken as 1).
    pub max_workers: Option<u32>,
    /// Overrides `WORKER_MODE` for this context.
    pub worker_mode: Option<WorkerMode>,
}

/// The effective settings of one context, from [`Config::context_settings`].
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ContextSettings {
    /// Concurrent runs, at least 1.
    pub max_workers: u32,
    /// How handlers run.
    pub worker_mode: WorkerMode,
    /// AMQP prefetch: `PREFETCH_COUNT`, but never below `max_workers`.
    pub prefetch_count: u32,
}

/// Why the worker modes of a service's contexts cannot be settled.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ModeError {
    /// A per-context override names a context the service does not have.
    #[error("context {index} does not exist (the service has {contexts})")]
    NoSuchContext {
        /// The index given.
        index: usize,
        /// How many contexts there are.
        contexts: usize,
    },
    /// The runtime cannot run this worker mode.
    #[error("worker mode {0} is not supported by this runtime")]
    Unsupported(WorkerMode),
}

impl Config {
    /// Settles each context's worker mode (its override in `overrides`, by context index, else
    /// `WORKER_MODE`) and refuses modes outside `supported` (`WORKER_MODE` itself is checked
    /// even with no context, so a bad config fails early). Returns the service, named
    /// `SERVICE_NAME`, with each context's prefetch raised to `PREFETCH_COUNT` when set and its
    /// shutdown mode following its worker mode (`thread`: finish running work;
    /// `greedy_thread`: drain what is held; other modes keep the context's own), and the modes.
    ///
    /// What it does not do: validate the rest of the config ([`validate`](Self::validate)) or
    /// build the service ([`Service::build`]).
    pub fn plan_service<S: Clone + Send + Sync + 'static>(
        &self,
        state: S,
        contexts: Vec<RunnerContext<S>>,
        overrides: &std::collections::HashMap<usize, WorkerMode>,
        supported: &[WorkerMode],
    ) -> Result<(Service<S>, Vec<WorkerMode>), ModeError> {
        if let Some(&index) = overrides.keys().filter(|&&i| i >= contexts.len()).min() {
            return Err(ModeError::NoSuchContext { index, contexts: contexts.len() });
        }
        let modes: Vec<WorkerMode> =
            (0..contexts.len()).map(|i| overrides.get(&i).copied().unwrap_or(self.worker_mode)).collect();
        if let Some(mode) = modes.iter().chain([&self.worker_mode]).find(|m| !supported.contains(m)) {
            return Err(ModeError::Unsupported(*mode));
        }
        let mut service = Service::with_state(self.service_name.clone().unwrap_or_default(), state);
        for (ctx, mode) in contexts.into_iter().zip(&modes) {
            let ctx = match self.prefetch_count {
                Some(prefetch) => ctx.prefetch(prefetch),
                None => ctx,
            };
            service = service.context(match mode {
                WorkerMode::Thread => ctx.shutdown_mode(ShutdownMode::FinishRunning),
                WorkerMode::GreedyThread => ctx.shutdown_mode(ShutdownMode::DrainPending),
                WorkerMode::Async | WorkerMode::Process => ctx,
            });
        }
        Ok((service, modes))
    }
}

/// Why a configuration could not be loaded or is not valid. Messages name the key and never
/// contain the `AMQP_URI` password.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A value of the wrong form, e.g. `MAX_WORKERS: expected a positive integer, got "abc"`.
    #[error("{key}: expected {expected}, got {value:?}")]
    InvalidValue {
        /// The key as the source spells it (`METRICS_PORT` in the environment, `METRICS.PORT`
        /// in TOML).
        key: &'static str,
        /// The value given (redacted for `AMQP_URI`).
        value: String,
        /// The accepted form.
        expected: &'static str,
    },
    /// A TOML key this config does not know (typo protection).
    #[error("unknown configuration key {key:?}{}", hint(.did_you_mean))]
    UnknownKey {
        /// The key as written (`METRICS.X` for a key inside `[METRICS]`).
        key: String,
        /// A known key spelled closely, if any.
        did_you_mean: Option<&'static str>,
    },
    /// A required key has no value.
    #[error("{0}: required but not set")]
    Missing(&'static str),
    /// The TOML text does not parse; the toml crate's message with line and column.
    #[error("TOML syntax error: {0}")]
    Toml(String),
}

impl Default for Config {
    fn default() -> Self {
        Config {
            amqp_uri: None,
            amqp_heartbeat: Duration::from_secs(10),
            service_name: None,
            max_workers: 3,
            worker_mode: WorkerMode::Thread,
            max_tasks_per_child: None,
            websocket_ip: "0.0.0.0".into(),
            websocket_port: 8765,
            enable_metrics: false,
            metrics: MetricsConfig::default(),
            amqp_dialect: Dialect::Nameko,
            rpc_exchange: "nameko-rpc".into(),
            auto_delete_event_exchanges: false,
            prefetch_count: None,
            shutdown_timeout: Duration::from_secs(30),
            rpc_timeout: Duration::from_secs(30),
        }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { host: "0.0.0.0".into(), port: 8000 }
    }
}

impl Config {
    /// The defaults overlaid with the known keys among `vars` (e.g. `std::env::vars()`).
    /// Unknown variables are ignored; the last of repeated names wins. Does not validate.
    pub fn from_env<I, K, V>(vars: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        Config::default().merge_env(vars)
    }

    /// Parses a TOML document: known keys at the top level, `HOST`/`PORT` in a `[METRICS]`
    /// table; missing keys keep their defaults. An unknown key is an error
    /// ([`ConfigError::UnknownKey`]). Does not validate.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        let table: Table = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
        Config::from_table(&table)
    }

    /// Overlays the known keys among `vars` on `self` (environment over file). Unknown names
    /// are ignored. Does not validate.
    pub fn merge_env<I, K, V>(mut self, vars: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        for (name, value) in vars {
            if let Some(key) = ENV_KEYS.iter().find(|k| **k == name.as_ref()) {
                self.set(key, Raw::Text(value.as_ref()))?;
            }
        }
        Ok(self)
    }

    /// Checks the whole config: `SERVICE_NAME` set, without `.` or whitespace; `MAX_WORKERS`,
    /// `PREFETCH_COUNT` and `MAX_TASKS_PER_CHILD` at least 1; hosts and `RPC_EXCHANGE` not
    /// empty; `RPC_TIMEOUT` above 0. Returns the first problem found. Does not check that
    /// ports are free or that the broker answers.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self.service_name.as_deref() {
            None | Some("") => return Err(ConfigError::Missing("SERVICE_NAME")),
            Some(name) => check_service_name("SERVICE_NAME", name)?,
        }
        let positive = |key, n: Option<u32>| match n {
            Some(0) => Err(invalid(key, "0", POSITIVE)),
            _ => Ok(()),
        };
        positive("MAX_WORKERS", Some(self.max_workers))?;
        positive("PREFETCH_COUNT", self.prefetch_count)?;
        positive("MAX_TASKS_PER_CHILD", self.max_tasks_per_child)?;
        for (key, value) in [
            ("WEBSOCKET_IP", &self.websocket_ip),
            ("METRICS_HOST", &self.metrics.host),
            ("RPC_EXCHANGE", &self.rpc_exchange),
        ] {
            if value.trim().is_empty() {
                return Err(invalid(key, value, NON_EMPTY));
            }
        }
        if self.rpc_timeout.is_zero() {
            return Err(invalid("RPC_TIMEOUT", "0", SECONDS_POSITIVE));
        }
        Ok(())
    }

    /// The effective settings of a context: the overrides over this config, and the prefetch
    /// (`PREFETCH_COUNT`, defaulting to and never below the context's `MAX_WORKERS`).
    pub fn context_settings(&self, overrides: &ContextOverrides) -> ContextSettings {
        let max_workers = overrides.max_workers.unwrap_or(self.max_workers).max(1);
        ContextSettings {
            max_workers,
            worker_mode: overrides.worker_mode.unwrap_or(self.worker_mode),
            prefetch_count: self.prefetch_count.unwrap_or(max_workers).max(max_workers),
        }
    }

    /// The Engine's settings from this config (`SHUTDOWN_TIMEOUT`, `RPC_TIMEOUT`) and `seed`,
    /// which the runtime draws from OS entropy.
    pub fn engine_config(&self, seed: u64) -> EngineConfig {
        EngineConfig { seed, shutdown_timeout: self.shutdown_timeout, rpc_timeout: self.rpc_timeout }
    }
}

impl<'de> Deserialize<'de> for Config {
    /// Reads the same shape as [`Config::from_toml_str`] from any serde format (a map of
    /// UPPER keys, `METRICS` nested), with the same checks.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let table = Table::deserialize(deserializer)?;
        Config::from_table(&table).map_err(serde::de::Error::custom)
    }
}

impl WorkerMode {
    /// The canonical name: `thread`, `greedy_thread`, `async` or `process`.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerMode::Thread => "thread",
            WorkerMode::GreedyThread => "greedy_thread",
            WorkerMode::Async => "async",
            WorkerMode::Process => "process",
        }
    }
}

impl FromStr for WorkerMode {
    type Err = ConfigError;

    /// Accepts the names listed on [`WorkerMode`] (any case, surrounding spaces ignored); any
    /// other value is a `WORKER_MODE` error listing them.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "thread" => Ok(WorkerMode::Thread),
            "greedy_thread" => Ok(WorkerMode::GreedyThread),
            "async" | "asyncio" => Ok(WorkerMode::Async),
            "process" => Ok(WorkerMode::Process),
            _ => Err(invalid("WORKER_MODE", s, MODES)),
        }
    }
}

impl fmt::Display for WorkerMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for WorkerMode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl AmqpUri {
    /// Wraps a URI with scheme `amqp://` or `amqps://` (any case). Anything else is an
    /// `AMQP_URI` error whose value is redacted. Does not check host, port or vhost.
    pub fn new(uri: impl Into<String>) -> Result<AmqpUri, ConfigError> {
        let uri = uri.into();
        let lower = uri.trim().to_ascii_lowercase();
        if lower.starts_with("amqp://") || lower.starts_with("amqps://") {
            Ok(AmqpUri(uri.trim().to_string()))
        } else {
            Err(invalid("AMQP_URI", &redact_uri(&uri), "an amqp:// or amqps:// URI"))
        }
    }

    /// The full URI, password included, for the transport only. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URI with the password replaced by `***` (what `Display` prints).
    pub fn redacted(&self) -> String {
        redact_uri(&self.0)
    }
}

impl fmt::Debug for AmqpUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AmqpUri({:?})", self.redacted())
    }
}

impl fmt::Display for AmqpUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

// ---- private helpers ----

/// Every environment variable this config reads.
const ENV_KEYS: &[&str] = &[
    "AMQP_URI",
    "AMQP_HEARTBEAT",
    "SERVICE_NAME",
    "MAX_WORKERS",
    "WORKER_MODE",
    "MAX_TASKS_PER_CHILD",
    "WEBSOCKET_IP",
    "WEBSOCKET_PORT",
    "ENABLE_METRICS",
    "METRICS_HOST",
    "METRICS_PORT",
    "AMQP_DIALECT",
    "RPC_EXCHANGE",
    "AUTO_DELETE_EVENT_EXCHANGES",
    "PREFETCH_COUNT",
    "SHUTDOWN_TIMEOUT",
    "RPC_TIMEOUT",
];
/// The keys of the `[METRICS]` table, as error messages name them.
const METRICS_KEYS: &[&str] = &["METRICS.HOST", "METRICS.PORT"];

const POSITIVE: &str = "a positive integer";
const NON_EMPTY: &str = "a non-empty string";
const PORT: &str = "a port number (0-65535)";
const BOOL: &str = "a boolean (true/false, 1/0, yes/no)";
const SECONDS: &str = "a number of seconds >= 0";
const SECONDS_POSITIVE: &str = "a number of seconds > 0";
const MODES: &str = "one of thread, greedy_thread, async, asyncio, process";

/// A value from one of the sources: environment text or a TOML value.
#[derive(Clone, Copy)]
enum Raw<'a> {
    Text(&'a str),
    Toml(&'a Value),
}

impl<'a> Raw<'a> {
    /// The value as text (trimmed), when it is text.
    fn text(self) -> Option<&'a str> {
        match self {
            Raw::Text(s) => Some(s.trim()),
            Raw::Toml(Value::String(s)) => Some(s.trim()),
            Raw::Toml(_) => None,
        }
    }

    /// True for an empty text value, which means "unset" for optional keys.
    fn is_empty(self) -> bool {
        self.text() == Some("")
    }

    /// The value as shown in an error.
    fn shown(self) -> String {
        match self {
            Raw::Text(s) => s.to_string(),
            Raw::Toml(Value::String(s)) => s.clone(),
            Raw::Toml(Value::Integer(i)) => i.to_string(),
            Raw::Toml(Value::Float(x)) => x.to_string(),
            Raw::Toml(Value::Boolean(b)) => b.to_string(),
            Raw::Toml(Value::Datetime(d)) => d.to_string(),
            Raw::Toml(Value::Array(_)) => "an array".into(),
            Raw::Toml(Value::Table(_)) => "a table".into(),
        }
    }
}

impl Config {
    fn from_table(table: &Table) -> Result<Config, ConfigError> {
        let mut config = Config::default();
        for (name, value) in table {
            if name == "METRICS" {
                let Value::Table(metrics) = value else {
                    return Err(invalid("METRICS", &Raw::Toml(value).shown(), "a table of HOST, PORT"));
                };
                for (inner, value) in metrics {
                    let full = format!("METRICS.{inner}");
                    let key = known(METRICS_KEYS, &full)?;
                    config.set(key, Raw::Toml(value))?;
                }
            } else if let Some(inner) = name.strip_prefix("METRICS_") {
                // The environment's spelling: suggest the TOML one (`METRICS.PORT` is a valid
                // dotted key).
                let did_you_mean =
                    METRICS_KEYS.iter().copied().find(|k| k.strip_prefix("METRICS.") == Some(inner));
                return Err(ConfigError::UnknownKey { key: name.clone(), did_you_mean });
            } else {
                let key = known(ENV_KEYS, name)?;
                config.set(key, Raw::Toml(value))?;
            }
        }
        Ok(config)
    }

    /// Sets the field of `key` (an entry of `ENV_KEYS` or `METRICS_KEYS`) from `raw`.
    fn set(&mut self, key: &'static str, raw: Raw<'_>) -> Result<(), ConfigError> {
        match key {
            "AMQP_URI" => {
                self.amqp_uri = match raw.text() {
                    Some("") => None,
                    Some(s) => Some(AmqpUri::new(s)?),
                    None => return Err(invalid(key, &raw.shown(), "an amqp:// or amqps:// URI")),
                }
            }
            "AMQP_HEARTBEAT" => self.amqp_heartbeat = seconds(key, raw, false)?,
            "SERVICE_NAME" if raw.is_empty() => self.service_name = None,
            "SERVICE_NAME" => {
                let name = string(key, raw)?;
                check_service_name(key, &name)?;
                self.service_name = Some(name);
            }
            "MAX_WORKERS" => self.max_workers = positive(key, raw)?,
            "WORKER_MODE" => {
                self.worker_mode = match raw.text() {
                    Some(s) => s.parse()?,
                    None => return Err(invalid(key, &raw.shown(), MODES)),
                }
            }
            "MAX_TASKS_PER_CHILD" if raw.is_empty() => self.max_tasks_per_child = None,
            "MAX_TASKS_PER_CHILD" => self.max_tasks_per_child = Some(positive(key, raw)?),
            "WEBSOCKET_IP" => self.websocket_ip = string(key, raw)?,
            "WEBSOCKET_PORT" => self.websocket_port = port(key, raw)?,
            "ENABLE_METRICS" => self.enable_metrics = boolean(key, raw)?,
            "METRICS_HOST" | "METRICS.HOST" => self.metrics.host = string(key, raw)?,
            "METRICS_PORT" | "METRICS.PORT" => self.metrics.port = port(key, raw)?,
            "AMQP_DIALECT" => {
                self.amqp_dialect = match raw.text().map(str::to_ascii_lowercase).as_deref() {
                    Some("nameko") => Dialect::Nameko,
                    Some("micro_framework") => Dialect::MicroFramework,
                    _ => return Err(invalid(key, &raw.shown(), "one of nameko, micro_framework")),
                }
            }
            "RPC_EXCHANGE" => self.rpc_exchange = string(key, raw)?,
            "AUTO_DELETE_EVENT_EXCHANGES" => self.auto_delete_event_exchanges = boolean(key, raw)?,
            "PREFETCH_COUNT" if raw.is_empty() => self.prefetch_count = None,
            "PREFETCH_COUNT" => self.prefetch_count = Some(positive(key, raw)?),
            "SHUTDOWN_TIMEOUT" => self.shutdown_timeout = seconds(key, raw, false)?,
            "RPC_TIMEOUT" => self.rpc_timeout = seconds(key, raw, true)?,
            _ => {}
        }
        Ok(())
    }
}

fn invalid(key: &'static str, value: &str, expected: &'static str) -> ConfigError {
    ConfigError::InvalidValue { key, value: value.to_string(), expected }
}

/// The entry of `keys` equal to `name`, or an unknown-key error with a suggestion.
fn known(keys: &[&'static str], name: &str) -> Result<&'static str, ConfigError> {
    keys.iter().copied().find(|k| *k == name).ok_or_else(|| unknown(name, keys))
}

fn unknown(name: &str, keys: &[&'static str]) -> ConfigError {
    let upper = name.to_ascii_uppercase();
    let did_you_mean = keys
        .iter()
        .copied()
        .map(|k| (edit_distance(&upper, k), k))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k);
    ConfigError::UnknownKey { key: name.to_string(), did_you_mean }
}

fn hint(did_you_mean: &Option<&'static str>) -> String {
    did_you_mean.map(|k| format!(" (did you mean {k:?}?)")).unwrap_or_default()
}

/// Levenshtein distance over bytes (keys are ASCII).
fn edit_distance(a: &str, b: &str) -> usize {
    let b = b.as_bytes();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.bytes().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

fn string(key: &'static str, raw: Raw<'_>) -> Result<String, ConfigError> {
    match raw.text() {
        Some(s) if !s.is_empty() => Ok(s.to_string()),
        _ => Err(invalid(key, &raw.shown(), NON_EMPTY)),
    }
}

fn check_service_name(key: &'static str, name: &str) -> Result<(), ConfigError> {
    if name.contains('.') || name.contains(char::is_whitespace) {
        return Err(invalid(key, name, "a service name without '.' or whitespace"));
    }
    Ok(())
}

fn positive(key: &'static str, raw: Raw<'_>) -> Result<u32, ConfigError> {
    let n = match raw {
        Raw::Toml(Value::Integer(i)) => u32::try_from(*i).ok(),
        _ => raw.text().and_then(|s| s.parse::<u32>().ok()),
    };
    n.filter(|n| *n > 0).ok_or_else(|| invalid(key, &raw.shown(), POSITIVE))
}

fn port(key: &'static str, raw: Raw<'_>) -> Result<u16, ConfigError> {
    let n = match raw {
        Raw::Toml(Value::Integer(i)) => u16::try_from(*i).ok(),
        _ => raw.text().and_then(|s| s.parse::<u16>().ok()),
    };
    n.ok_or_else(|| invalid(key, &raw.shown(), PORT))
}

fn boolean(key: &'static str, raw: Raw<'_>) -> Result<bool, ConfigError> {
    if let Raw::Toml(Value::Boolean(b)) = raw {
        return Ok(*b);
    }
    match raw.text().map(str::to_ascii_lowercase).as_deref() {
        Some("true" | "1" | "yes") => Ok(true),
        Some("false" | "0" | "no") => Ok(false),
        _ => Err(invalid(key, &raw.shown(), BOOL)),
    }
}

/// Seconds as an integer or a float: finite, not negative (above 0 when `positive`).
fn seconds(key: &'static str, raw: Raw<'_>, positive: bool) -> Result<Duration, ConfigError> {
    let expected = if positive { SECONDS_POSITIVE } else { SECONDS };
    let secs = match raw {
        Raw::Toml(Value::Integer(i)) => Some(*i as f64),
        Raw::Toml(Value::Float(x)) => Some(*x),
        _ => raw.text().and_then(|s| s.parse::<f64>().ok()),
    };
    secs.filter(|s| s.is_finite() && *s >= 0.0 && !(positive && *s == 0.0))
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .ok_or_else(|| invalid(key, &raw.shown(), expected))
}

/// A TOML syntax error: the toml crate's message (not its echo of the input) with line and
/// column, any URI password in it redacted.
fn toml_error(text: &str, error: &toml::de::Error) -> ConfigError {
    let at = match error.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {column}: ")
        }
        None => String::new(),
    };
    ConfigError::Toml(format!("{at}{}", redact_text(error.message().trim())))
}

/// `uri` with the password of its `user:password@` part replaced by `***`. Without a scheme,
/// the whole text is taken as the authority. Errs on the side of hiding: everything between
/// the scheme and the last `@` counts as user information.
fn redact_uri(uri: &str) -> String {
    let start = uri.find("://").map_or(0, |i| i + 3);
    let rest = &uri[start..];
    let Some(at) = rest.rfind('@') else { return uri.to_string() };
    let userinfo = &rest[..at];
    match userinfo.find(':') {
        Some(colon) => format!("{}{}:***{}", &uri[..start], &userinfo[..colon], &rest[at..]),
        None => uri.to_string(),
    }
}

/// `text` with every `scheme://user:password@` inside it redacted.
fn redact_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let token_start =
            rest[..i].rfind(|c: char| c.is_whitespace() || "\"'`".contains(c)).map_or(0, |j| j + 1);
        let end =
            rest[i..].find(|c: char| c.is_whitespace() || "\"'`".contains(c)).map_or(rest.len(), |j| i + j);
        out.push_str(&rest[..token_start]);
        out.push_str(&redact_uri(&rest[token_start..end]));
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn from_env(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_env(env(pairs))
    }

    fn bad(key: &'static str, value: &str, expected: &'static str) -> ConfigError {
        ConfigError::InvalidValue { key, value: value.into(), expected }
    }

    #[test]
    fn defaults_match_the_documented_table() {
        let c = Config::default();
        assert_eq!(c.amqp_uri, None);
        assert_eq!(c.amqp_heartbeat, Duration::from_secs(10));
        assert_eq!(c.service_name, None);
        assert_eq!(c.max_workers, 3);
        assert_eq!(c.worker_mode, WorkerMode::Thread);
        assert_eq!(c.max_tasks_per_child, None);
        assert_eq!(c.websocket_ip, "0.0.0.0");
        assert_eq!(c.websocket_port, 8765);
        assert!(!c.enable_metrics);
        assert_eq!(c.metrics, MetricsConfig { host: "0.0.0.0".into(), port: 8000 });
        assert_eq!(c.amqp_dialect, Dialect::Nameko);
        assert_eq!(c.rpc_exchange, "nameko-rpc");
        assert!(!c.auto_delete_event_exchanges);
        assert_eq!(c.prefetch_count, None);
        assert_eq!(c.shutdown_timeout, Duration::from_secs(30));
        assert_eq!(c.rpc_timeout, Duration::from_secs(30));
        // Empty sources give the defaults too.
        assert_eq!(from_env(&[]).unwrap(), c);
        assert_eq!(Config::from_toml_str("").unwrap(), c);
    }

    #[test]
    fn env_sets_every_key_and_ignores_others() {
        let c = from_env(&[
            ("AMQP_URI", "amqp://guest:guest@127.0.0.1:5672/"),
            ("AMQP_HEARTBEAT", "2.5"),
            ("SERVICE_NAME", "billing"),
            ("MAX_WORKERS", " 8 "),
            ("WORKER_MODE", "greedy_thread"),
            ("MAX_TASKS_PER_CHILD", "100"),
            ("WEBSOCKET_IP", "127.0.0.1"),
            ("WEBSOCKET_PORT", "9000"),
            ("ENABLE_METRICS", "YES"),
            ("METRICS_HOST", "localhost"),
            ("METRICS_PORT", "9100"),
            ("AMQP_DIALECT", "micro_framework"),
            ("RPC_EXCHANGE", "my-rpc"),
            ("AUTO_DELETE_EVENT_EXCHANGES", "1"),
            ("PREFETCH_COUNT", "256"),
            ("SHUTDOWN_TIMEOUT", "0.25"),
            ("RPC_TIMEOUT", "5"),
            ("PATH", "/usr/bin"),
            ("max_workers", "not read"),
        ])
        .unwrap();
        let expected = Config {
            amqp_uri: Some(AmqpUri::new("amqp://guest:guest@127.0.0.1:5672/").unwrap()),
            amqp_heartbeat: Duration::from_millis(2500),
            service_name: Some("billing".into()),
            max_workers: 8,
            worker_mode: WorkerMode::GreedyThread,
            max_tasks_per_child: Some(100),
            websocket_ip: "127.0.0.1".into(),
            websocket_port: 9000,
            enable_metrics: true,
            metrics: MetricsConfig { host: "localhost".into(), port: 9100 },
            amqp_dialect: Dialect::MicroFramework,
            rpc_exchange: "my-rpc".into(),
            auto_delete_event_exchanges: true,
            prefetch_count: Some(256),
            shutdown_timeout: Duration::from_millis(250),
            rpc_timeout: Duration::from_secs(5),
        };
        assert_eq!(c, expected);
        assert_eq!(c.amqp_uri.as_ref().unwrap().expose(), "amqp://guest:guest@127.0.0.1:5672/");
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn env_booleans() {
        for (text, value) in [
            ("true", true),
            ("TRUE", true),
            ("1", true),
            ("yes", true),
            ("Yes", true),
            ("false", false),
            ("False", false),
            ("0", false),
            ("no", false),
            ("NO", false),
        ] {
            let on = from_env(&[("ENABLE_METRICS", text), ("AUTO_DELETE_EVENT_EXCHANGES", text)]).unwrap();
            assert_eq!((on.enable_metrics, on.auto_delete_event_exchanges), (value, value), "{text}");
        }
    }

    #[test]
    fn worker_modes_parse_display_and_alias() {
        for (text, mode) in [
            ("thread", WorkerMode::Thread),
            ("greedy_thread", WorkerMode::GreedyThread),
            ("async", WorkerMode::Async),
            ("asyncio", WorkerMode::Async),
            ("process", WorkerMode::Process),
            ("Thread", WorkerMode::Thread),
        ] {
            assert_eq!(text.parse::<WorkerMode>(), Ok(mode));
            assert_eq!(from_env(&[("WORKER_MODE", text)]).unwrap().worker_mode, mode);
        }
        assert_eq!(WorkerMode::Async.to_string(), "async");
        assert_eq!(WorkerMode::GreedyThread.to_string(), "greedy_thread");
        let m: WorkerMode = serde_json::from_str("\"asyncio\"").unwrap();
        assert_eq!(m, WorkerMode::Async);
        let e = serde_json::from_str::<WorkerMode>("\"fork\"").unwrap_err().to_string();
        assert!(e.contains("WORKER_MODE: expected one of thread"), "{e}");
    }

    #[test]
    fn integer_and_float_seconds() {
        let c = from_env(&[("SHUTDOWN_TIMEOUT", "1.5"), ("AMQP_HEARTBEAT", "0")]).unwrap();
        assert_eq!(c.shutdown_timeout, Duration::from_millis(1500));
        assert_eq!(c.amqp_heartbeat, Duration::ZERO);
        let c =
            Config::from_toml_str("SHUTDOWN_TIMEOUT = 2\nRPC_TIMEOUT = 0.5\nAMQP_HEARTBEAT = 60").unwrap();
        assert_eq!(c.shutdown_timeout, Duration::from_secs(2));
        assert_eq!(c.rpc_timeout, Duration::from_millis(500));
        assert_eq!(c.amqp_heartbeat, Duration::from_secs(60));
    }

    #[test]
    fn empty_env_value_unsets_optional_keys() {
        let base = Config::from_toml_str(
            "AMQP_URI = \"amqp://h/\"\nSERVICE_NAME = \"a\"\nPREFETCH_COUNT = 9\nMAX_TASKS_PER_CHILD = 4",
        )
        .unwrap();
        let c = base
            .merge_env(env(&[
                ("AMQP_URI", ""),
                ("SERVICE_NAME", ""),
                ("PREFETCH_COUNT", ""),
                ("MAX_TASKS_PER_CHILD", " "),
            ]))
            .unwrap();
        assert_eq!(
            (c.amqp_uri, c.service_name, c.prefetch_count, c.max_tasks_per_child),
            (None, None, None, None)
        );
    }

    #[test]
    fn toml_reads_keys_and_metrics_table() {
        let text = r#"
            AMQP_URI = "amqps://svc:pw@rabbit:5671/prod"
            SERVICE_NAME = "orders"
            MAX_WORKERS = 16
            WORKER_MODE = "asyncio"
            ENABLE_METRICS = true
            AMQP_DIALECT = "micro_framework"
            WEBSOCKET_PORT = 0

            [METRICS]
            PORT = 9100
        "#;
        let c = Config::from_toml_str(text).unwrap();
        assert_eq!(c.amqp_uri.as_ref().map(AmqpUri::expose), Some("amqps://svc:pw@rabbit:5671/prod"));
        assert_eq!(c.service_name.as_deref(), Some("orders"));
        assert_eq!(c.max_workers, 16);
        assert_eq!(c.worker_mode, WorkerMode::Async);
        assert!(c.enable_metrics);
        assert_eq!(c.amqp_dialect, Dialect::MicroFramework);
        assert_eq!(c.websocket_port, 0);
        // METRICS merges key by key over the defaults, as micro_framework's deep merge does.
        assert_eq!(c.metrics, MetricsConfig { host: "0.0.0.0".into(), port: 9100 });
        // Keys not written keep their defaults.
        assert_eq!(c.rpc_exchange, "nameko-rpc");
        assert_eq!(c.shutdown_timeout, Duration::from_secs(30));
    }

    #[test]
    fn toml_unknown_keys_are_errors_with_a_hint() {
        assert_eq!(
            Config::from_toml_str("AMPQ_URI = \"amqp://h/\""),
            Err(ConfigError::UnknownKey { key: "AMPQ_URI".into(), did_you_mean: Some("AMQP_URI") })
        );
        let e = Config::from_toml_str("[METRICS]\nHOTS = \"x\"").unwrap_err();
        assert_eq!(
            e,
            ConfigError::UnknownKey { key: "METRICS.HOTS".into(), did_you_mean: Some("METRICS.HOST") }
        );
        assert_eq!(
            e.to_string(),
            "unknown configuration key \"METRICS.HOTS\" (did you mean \"METRICS.HOST\"?)"
        );
        assert_eq!(
            Config::from_toml_str("max_workers = 4"),
            Err(ConfigError::UnknownKey { key: "max_workers".into(), did_you_mean: Some("MAX_WORKERS") })
        );
        assert_eq!(
            Config::from_toml_str("COLOUR = 1").unwrap_err().to_string(),
            "unknown configuration key \"COLOUR\""
        );
        // The environment form of nested keys is not a TOML key.
        assert!(matches!(
            Config::from_toml_str("METRICS_PORT = 1"),
            Err(ConfigError::UnknownKey { did_you_mean: Some("METRICS.PORT"), .. })
        ));
        assert_eq!(Config::from_toml_str("METRICS = 5"), Err(bad("METRICS", "5", "a table of HOST, PORT")));
    }

    #[test]
    fn env_overrides_toml() {
        let file =
            Config::from_toml_str("MAX_WORKERS = 4\nRPC_EXCHANGE = \"x\"\n[METRICS]\nPORT = 1").unwrap();
        let c = file.merge_env(env(&[("MAX_WORKERS", "7"), ("METRICS_PORT", "2")])).unwrap();
        assert_eq!(c.max_workers, 7);
        assert_eq!(c.metrics.port, 2);
        assert_eq!(c.rpc_exchange, "x", "a key the environment does not set keeps the file's value");
        // The last of repeated variables wins.
        assert_eq!(from_env(&[("MAX_WORKERS", "2"), ("MAX_WORKERS", "5")]).unwrap().max_workers, 5);
    }

    #[test]
    fn bad_values_name_key_and_expected_form() {
        let cases: &[(&str, &str, &str)] = &[
            ("MAX_WORKERS", "abc", POSITIVE),
            ("MAX_WORKERS", "0", POSITIVE),
            ("MAX_WORKERS", "-2", POSITIVE),
            ("WORKER_MODE", "greedy_process", MODES),
            ("ENABLE_METRICS", "maybe", BOOL),
            ("AUTO_DELETE_EVENT_EXCHANGES", "2", BOOL),
            ("SHUTDOWN_TIMEOUT", "-1", SECONDS),
            ("SHUTDOWN_TIMEOUT", "NaN", SECONDS),
            ("AMQP_HEARTBEAT", "inf", SECONDS),
            ("RPC_TIMEOUT", "0", SECONDS_POSITIVE),
            ("PREFETCH_COUNT", "0", POSITIVE),
            ("MAX_TASKS_PER_CHILD", "0", POSITIVE),
            ("WEBSOCKET_PORT", "70000", PORT),
            ("METRICS_PORT", "http", PORT),
            ("AMQP_DIALECT", "kombu", "one of nameko, micro_framework"),
            ("SERVICE_NAME", "a.b", "a service name without '.' or whitespace"),
            ("WEBSOCKET_IP", "", NON_EMPTY),
            ("AMQP_URI", "http://h/", "an amqp:// or amqps:// URI"),
        ];
        for &(key, value, expected) in cases {
            let err = from_env(&[(key, value)]).unwrap_err();
            let ConfigError::InvalidValue { key: k, expected: x, .. } = &err else {
                panic!("{key}={value}: {err:?}")
            };
            assert_eq!((*k, *x), (key, expected), "{key}={value}");
            let msg = err.to_string();
            assert!(msg.starts_with(&format!("{key}: expected ")), "{msg}");
        }
        assert_eq!(
            from_env(&[("MAX_WORKERS", "abc")]).unwrap_err().to_string(),
            "MAX_WORKERS: expected a positive integer, got \"abc\""
        );
        assert_eq!(
            from_env(&[("WORKER_MODE", "greedy_process")]).unwrap_err().to_string(),
            "WORKER_MODE: expected one of thread, greedy_thread, async, asyncio, process, \
             got \"greedy_process\""
        );
        assert_eq!(
            from_env(&[("WEBSOCKET_PORT", "70000")]).unwrap_err().to_string(),
            "WEBSOCKET_PORT: expected a port number (0-65535), got \"70000\""
        );
    }

    #[test]
    fn bad_toml_values_and_types() {
        assert_eq!(Config::from_toml_str("MAX_WORKERS = \"abc\""), Err(bad("MAX_WORKERS", "abc", POSITIVE)));
        assert_eq!(Config::from_toml_str("MAX_WORKERS = 1.5"), Err(bad("MAX_WORKERS", "1.5", POSITIVE)));
        assert_eq!(Config::from_toml_str("ENABLE_METRICS = 1"), Err(bad("ENABLE_METRICS", "1", BOOL)));
        assert_eq!(Config::from_toml_str("SERVICE_NAME = 3"), Err(bad("SERVICE_NAME", "3", NON_EMPTY)));
        assert_eq!(Config::from_toml_str("WORKER_MODE = [1]"), Err(bad("WORKER_MODE", "an array", MODES)));
        assert_eq!(Config::from_toml_str("[METRICS]\nPORT = 70000"), Err(bad("METRICS.PORT", "70000", PORT)));
        assert_eq!(
            Config::from_toml_str("SHUTDOWN_TIMEOUT = -1"),
            Err(bad("SHUTDOWN_TIMEOUT", "-1", SECONDS))
        );
        // Strings in TOML follow the environment's rules.
        let c = Config::from_toml_str("MAX_WORKERS = \"5\"\nENABLE_METRICS = \"yes\"").unwrap();
        assert_eq!((c.max_workers, c.enable_metrics), (5, true));
    }

    #[test]
    fn toml_syntax_error_gives_position_and_message() {
        let err = Config::from_toml_str("MAX_WORKERS = 4\nSERVICE_NAME = \n").unwrap_err();
        let ConfigError::Toml(msg) = &err else { panic!("{err:?}") };
        assert!(msg.starts_with("line 2, column "), "{msg}");
        assert!(err.to_string().starts_with("TOML syntax error: line 2"), "{err}");
        // Duplicate keys are the toml crate's error too.
        assert!(matches!(
            Config::from_toml_str("MAX_WORKERS = 1\nMAX_WORKERS = 2"),
            Err(ConfigError::Toml(_))
        ));
    }

    #[test]
    fn validate_checks_the_whole() {
        let named = |name: &str| Config { service_name: Some(name.into()), ..Config::default() };
        assert_eq!(Config::default().validate(), Err(ConfigError::Missing("SERVICE_NAME")));
        assert_eq!(named("").validate(), Err(ConfigError::Missing("SERVICE_NAME")));
        assert_eq!(ConfigError::Missing("SERVICE_NAME").to_string(), "SERVICE_NAME: required but not set");
        assert_eq!(named("billing").validate(), Ok(()));
        assert_eq!(
            named("a.b").validate(),
            Err(bad("SERVICE_NAME", "a.b", "a service name without '.' or whitespace"))
        );
        assert_eq!(
            Config { max_workers: 0, ..named("s") }.validate(),
            Err(bad("MAX_WORKERS", "0", POSITIVE))
        );
        assert_eq!(
            Config { prefetch_count: Some(0), ..named("s") }.validate(),
            Err(bad("PREFETCH_COUNT", "0", POSITIVE))
        );
        assert_eq!(
            Config { max_tasks_per_child: Some(0), ..named("s") }.validate(),
            Err(bad("MAX_TASKS_PER_CHILD", "0", POSITIVE))
        );
        assert_eq!(
            Config { rpc_exchange: " ".into(), ..named("s") }.validate(),
            Err(bad("RPC_EXCHANGE", " ", NON_EMPTY))
        );
        assert_eq!(
            Config { rpc_timeout: Duration::ZERO, ..named("s") }.validate(),
            Err(bad("RPC_TIMEOUT", "0", SECONDS_POSITIVE))
        );
        // A prefetch below MAX_WORKERS is valid: it is raised to MAX_WORKERS.
        assert_eq!(Config { prefetch_count: Some(1), ..named("s") }.validate(), Ok(()));
    }

    #[test]
    fn context_settings_apply_overrides_and_prefetch_floor() {
        let c = Config { prefetch_count: Some(10), ..Config::default() };
        assert_eq!(
            c.context_settings(&ContextOverrides::default()),
            ContextSettings { max_workers: 3, worker_mode: WorkerMode::Thread, prefetch_count: 10 }
        );
        let o = ContextOverrides { max_workers: Some(20), worker_mode: Some(WorkerMode::Async) };
        assert_eq!(
            c.context_settings(&o),
            ContextSettings { max_workers: 20, worker_mode: WorkerMode::Async, prefetch_count: 20 }
        );
        let d = Config::default();
        let zero = ContextOverrides { max_workers: Some(0), worker_mode: None };
        assert_eq!(d.context_settings(&zero).max_workers, 1);
        assert_eq!(d.context_settings(&ContextOverrides::default()).prefetch_count, 3);
    }

    #[test]
    fn engine_config_carries_timeouts_and_seed() {
        let c = from_env(&[("SHUTDOWN_TIMEOUT", "3"), ("RPC_TIMEOUT", "4")]).unwrap();
        let e = c.engine_config(42);
        assert_eq!(
            (e.seed, e.shutdown_timeout, e.rpc_timeout),
            (42, Duration::from_secs(3), Duration::from_secs(4))
        );
    }

    #[test]
    fn password_never_in_debug_display_or_errors() {
        let secret = "s3cr3t-pw";
        let uri = format!("amqp://svc:{secret}@rabbit:5672/prod");
        let c = from_env(&[("AMQP_URI", &uri), ("SERVICE_NAME", "a")]).unwrap();
        let debug = format!("{c:?} {c:#?}");
        assert!(!debug.contains(secret), "{debug}");
        assert!(debug.contains("amqp://svc:***@rabbit:5672/prod"), "{debug}");
        let a = c.amqp_uri.as_ref().unwrap();
        assert_eq!(a.to_string(), "amqp://svc:***@rabbit:5672/prod");
        assert_eq!(a.expose(), uri);

        // A bad scheme: the error shows the redacted value.
        let err = from_env(&[("AMQP_URI", &format!("http://svc:{secret}@rabbit/"))]).unwrap_err();
        assert_eq!(err, bad("AMQP_URI", "http://svc:***@rabbit/", "an amqp:// or amqps:// URI"));
        let err = from_env(&[("AMQP_URI", &format!("svc:{secret}@rabbit"))]).unwrap_err();
        assert!(!err.to_string().contains(secret), "{err}");

        // A TOML syntax error on the URI's line does not echo it.
        for text in [
            format!("AMQP_URI = \"amqp://svc:{secret}@rabbit/\" junk"),
            format!("AMQP_URI = \"amqp://svc:{secret}@rabbit/"),
            format!("AMQP_URI = amqp://svc:{secret}@rabbit/"),
        ] {
            let err = Config::from_toml_str(&text).unwrap_err();
            assert!(matches!(err, ConfigError::Toml(_)), "{err:?}");
            assert!(!err.to_string().contains(secret) && !format!("{err:?}").contains(secret), "{err}");
        }
    }

    #[test]
    fn redaction_edge_cases() {
        assert_eq!(redact_uri("amqp://guest@h/"), "amqp://guest@h/");
        assert_eq!(redact_uri("amqp://h:5672/v"), "amqp://h:5672/v");
        assert_eq!(redact_uri("amqp://u:@h/"), "amqp://u:***@h/");
        assert_eq!(redact_uri("amqp://u:p@ss/w@h/"), "amqp://u:***@h/");
        assert_eq!(redact_uri("u:pw@h"), "u:***@h");
        assert_eq!(
            redact_text("bad \"amqp://a:b@h/\" and amqps://c:d@i x"),
            "bad \"amqp://a:***@h/\" and amqps://c:***@i x"
        );
    }

    #[test]
    fn deserialize_from_any_format() {
        let c: Config =
            serde_json::from_str(r#"{"MAX_WORKERS": 6, "METRICS": {"HOST": "h"}, "RPC_TIMEOUT": 1.5}"#)
                .unwrap();
        assert_eq!((c.max_workers, c.metrics.host.as_str()), (6, "h"));
        assert_eq!(c.rpc_timeout, Duration::from_millis(1500));
        let e = serde_json::from_str::<Config>(r#"{"MAX_WORKER": 6}"#).unwrap_err().to_string();
        assert!(e.contains("unknown configuration key \"MAX_WORKER\""), "{e}");
    }

    #[test]
    fn amqp_uri_checks_scheme() {
        assert!(AmqpUri::new("AMQPS://h").is_ok());
        assert_eq!(AmqpUri::new(" amqp://h/ ").unwrap().expose(), "amqp://h/");
        assert!(AmqpUri::new("memory://").is_err());
        assert_eq!(
            Config::from_toml_str("AMQP_URI = 5"),
            Err(bad("AMQP_URI", "5", "an amqp:// or amqps:// URI"))
        );
    }
}

#[cfg(test)]
mod plan_tests {
    use std::collections::HashMap;

    use super::*;

    fn ctxs(n: usize) -> Vec<RunnerContext<()>> {
        (0..n).map(|_| RunnerContext::new(2)).collect()
    }

    #[test]
    fn modes_follow_overrides_then_the_default_and_set_shutdown_and_prefetch() {
        let config =
            Config { service_name: Some("svc".into()), prefetch_count: Some(16), ..Config::default() };
        let overrides = HashMap::from([(1, WorkerMode::GreedyThread)]);
        let supported = [WorkerMode::Thread, WorkerMode::GreedyThread];
        let (service, modes) = config.plan_service((), ctxs(2), &overrides, &supported).unwrap();
        assert_eq!(modes, [WorkerMode::Thread, WorkerMode::GreedyThread]);
        let (spec, _) = service.build().unwrap();
        assert_eq!(&*spec.name, "svc");
        assert_eq!(spec.contexts[0].shutdown, ShutdownMode::FinishRunning);
        assert_eq!(spec.contexts[1].shutdown, ShutdownMode::DrainPending);
        assert_eq!(spec.contexts[0].prefetch, 16);
    }

    #[test]
    fn unsupported_modes_and_missing_contexts_are_refused() {
        let supported = [WorkerMode::Thread];
        let asyncish = Config { worker_mode: WorkerMode::Async, ..Config::default() };
        // The default is checked even with no context.
        let refused = asyncish.plan_service((), ctxs(0), &HashMap::new(), &supported).map(|_| ());
        assert_eq!(refused, Err(ModeError::Unsupported(WorkerMode::Async)));
        let overrides = HashMap::from([(3, WorkerMode::Thread)]);
        let refused = Config::default().plan_service((), ctxs(2), &overrides, &supported).map(|_| ());
        assert_eq!(refused, Err(ModeError::NoSuchContext { index: 3, contexts: 2 }));
        let overrides = HashMap::from([(0, WorkerMode::Process)]);
        let refused = Config::default().plan_service((), ctxs(1), &overrides, &supported).map(|_| ());
        assert_eq!(refused, Err(ModeError::Unsupported(WorkerMode::Process)));
    }
}

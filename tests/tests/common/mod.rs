//! Pieces shared by the interop test files (`interop_nameko.rs`, `interop_micro_framework.rs`).
//!
//! The tests are plain `#[test]` functions: the Python peers are waited on with blocking calls
//! on the test thread, and microfw runs on a multi-threaded tokio runtime ([`Rt`]) whose
//! workers those waits never block. Every await on the runtime is bounded by [`WAIT`].
#![allow(dead_code, unreachable_pub)] // each test file uses a subset

use std::future::Future;
use std::time::Duration;

use microfw_core::config::AmqpUri;
use microfw_runtime_tokio::{Config, Runner, RunningService};
use microfw_tests::{PythonProcess, TestVhost};
use serde_json::Value;
use tokio::runtime::Runtime;
use tokio::sync::mpsc;
use tokio::time::timeout;

/// How long a Python peer may take to get ready (interpreter start, imports, declarations).
pub const READY: Duration = Duration::from_secs(60);
/// How long a one-shot Python client may take from start to exit (its call included).
pub const CALL: Duration = Duration::from_secs(60);
/// How long any single await on the microfw side may take.
pub const WAIT: Duration = Duration::from_secs(30);
/// The RPC timeout the microfw callers use (shorter than [`WAIT`], so a lost reply shows as
/// a call timeout, not as a test timeout).
pub const RPC_TIMEOUT: Duration = Duration::from_secs(20);

/// A tokio runtime driven from a plain test thread.
#[derive(Debug)]
pub struct Rt(Runtime);

impl Rt {
    /// A multi-threaded runtime with two workers, IO and time enabled.
    pub fn new() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("building a tokio runtime");
        Rt(runtime)
    }

    /// Runs `fut` on the runtime; the test fails (naming `what`) after [`WAIT`].
    pub fn wait<F: Future>(&self, what: &str, fut: F) -> F::Output {
        match self.0.block_on(async { timeout(WAIT, fut).await }) {
            Ok(output) => output,
            Err(_) => panic!("timed out after {WAIT:?}: {what}"),
        }
    }

    /// Starts `runner` (every consumer subscribed when this returns).
    pub fn start<S: Clone + Send + Sync + 'static>(&self, runner: Runner<S>) -> RunningService {
        self.wait("starting a microfw service", runner.start()).unwrap_or_else(|e| panic!("start: {e}"))
    }

    /// Stops `service` gracefully and checks nothing was left unfinished.
    pub fn stop(&self, service: RunningService) {
        let name = service.name().to_owned();
        let report = self.wait("stopping a microfw service", service.stop());
        let report = report.unwrap_or_else(|e| panic!("stopping {name}: {e}"));
        assert_eq!(report.unfinished, 0, "{name} left work unfinished");
    }

    /// The next value on `rx`.
    pub fn recv<T>(&self, rx: &mut mpsc::UnboundedReceiver<T>) -> T {
        self.wait("a value from a microfw handler", rx.recv()).expect("the handler channel closed")
    }
}

/// A microfw config for service `name` on `vhost`: async workers, RPC timeout
/// [`RPC_TIMEOUT`], 5 s shutdown timeout, every other key at its default (Nameko dialect,
/// events exchanges not auto-delete).
pub fn config(vhost: &TestVhost, name: &str) -> Config {
    Config {
        service_name: Some(name.into()),
        worker_mode: "async".parse().expect("a worker mode"),
        shutdown_timeout: Duration::from_secs(5),
        rpc_timeout: RPC_TIMEOUT,
        amqp_uri: Some(AmqpUri::new(vhost.amqp_uri()).expect("a test vhost URI")),
        ..Config::default()
    }
}

/// Waits up to `timeout` for a stdout line starting with `prefix` and parses the JSON after
/// the prefix.
pub fn wait_json(process: &PythonProcess, prefix: &str, timeout: Duration) -> Value {
    let line = process.wait_for_line(prefix, timeout).unwrap_or_else(|e| panic!("{e}"));
    serde_json::from_str(&line[prefix.len()..])
        .unwrap_or_else(|e| panic!("{line:?}: {e}\n{}", process.dump()))
}

/// [`wait_json`] for a line that must already be there (the process has exited).
pub fn json_after(process: &PythonProcess, prefix: &str) -> Value {
    wait_json(process, prefix, Duration::ZERO)
}

/// The JSON after `prefix` in the stdout line printed just before `line` (which must have been
/// printed already), e.g. nameko_echo's `CONTEXT` line before its `EVENT` line.
pub fn json_before(process: &PythonProcess, line: &str, prefix: &str) -> Value {
    let lines = process.stdout_lines();
    let at =
        lines.iter().position(|l| l == line).unwrap_or_else(|| panic!("no {line:?}\n{}", process.dump()));
    let before = at.checked_sub(1).map(|i| lines[i].as_str()).unwrap_or_default();
    let json = before.strip_prefix(prefix).unwrap_or_else(|| panic!("{before:?} before {line:?}"));
    serde_json::from_str(json).unwrap_or_else(|e| panic!("{before:?}: {e}"))
}

/// Runs one-shot Python clients side by side: spawns them all, then waits for each to exit
/// within [`CALL`] and returns them in order, their output intact.
pub fn run_all(clients: Vec<PythonProcess>) -> Vec<PythonProcess> {
    clients
        .into_iter()
        .map(|mut client| {
            let status = client.wait_for_exit(CALL).unwrap_or_else(|e| panic!("{e}"));
            assert!(status.success(), "{status}\n{}", client.dump());
            client
        })
        .collect()
}

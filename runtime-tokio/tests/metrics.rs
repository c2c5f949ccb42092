//! Metrics of the tokio runtime: values through a thread-local in-memory recorder (current
//! while `start` runs: the handles bind then, and the driver and pool threads record through
//! them), and `/metrics` scraped over HTTP from the process-global Prometheus recorder. Each
//! test has its own hub; every await has a timeout; nothing sleeps to synchronise (two
//! handlers sleep to give their runs a known minimum duration).

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use microfw_core::metrics::{
    AVAILABLE_WORKERS, DEAD_LETTERS_TOTAL, FAILED_TASKS_TOTAL, MemoryRecorder, RETRIES_TOTAL, SERVICE_INFO,
    TASK_DURATION_SECONDS, TASKS_NUMBER, TASKS_NUMBER_TOTAL,
};
use microfw_runtime_tokio::extract::{Payload, State};
use microfw_runtime_tokio::{
    Config, EventListener, MemoryHubHandle, RetryPolicy, Route, Runner, RunnerContext, RunningService,
    StartError, WorkerMode,
};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(5);
/// How long the `slow` handlers take, at least.
const SLOW: Duration = Duration::from_millis(30);

fn config(name: &str) -> Config {
    Config {
        service_name: Some(name.into()),
        worker_mode: WorkerMode::Async,
        shutdown_timeout: Duration::from_secs(5),
        ..Config::default()
    }
}

fn metrics_config(name: &str) -> Config {
    let mut config = config(name);
    config.enable_metrics = true;
    config.metrics.host = "127.0.0.1".into();
    config.metrics.port = 0; // a free port, read back with metrics_addr()
    config
}

/// Handlers report each run here (through the service state).
type Runs = mpsc::UnboundedSender<i64>;

/// Fails on odd numbers.
async fn work(State(runs): State<Runs>, Payload(n): Payload<i64>) -> Result<(), String> {
    let _ = runs.send(n);
    if n % 2 == 1 { Err(format!("{n} is odd")) } else { Ok(()) }
}

/// Always fails.
async fn flaky(State(runs): State<Runs>, Payload(n): Payload<i64>) -> Result<(), String> {
    let _ = runs.send(n);
    Err("always".into())
}

/// Takes at least [`SLOW`], waiting (so it continues as a task after its first poll).
async fn slow(State(runs): State<Runs>, Payload(n): Payload<i64>) {
    tokio::time::sleep(SLOW).await;
    let _ = runs.send(n);
}

/// Takes at least [`SLOW`] on a pool thread.
fn slow_blocking(State(runs): State<Runs>, Payload(n): Payload<i64>) {
    std::thread::sleep(SLOW);
    let _ = runs.send(n);
}

/// Fails on odd numbers, on a pool thread.
fn work_blocking(State(runs): State<Runs>, Payload(n): Payload<i64>) -> Result<(), String> {
    let _ = runs.send(n);
    if n % 2 == 1 { Err(format!("{n} is odd")) } else { Ok(()) }
}

/// A service with no routes whose producer publishes events as service `src`.
async fn source(hub: &MemoryHubHandle) -> RunningService {
    let start = Runner::new(config("src")).hub(hub.clone()).start();
    timeout(WAIT, start).await.expect("start timed out").unwrap()
}

async fn publish(src: &RunningService, event: &str, n: i64) {
    timeout(WAIT, src.producer().dispatch(event, &json!(n))).await.expect("publish timed out").unwrap();
}

async fn wait_runs(rx: &mut mpsc::UnboundedReceiver<i64>, n: usize) {
    for i in 0..n {
        let run = timeout(WAIT, rx.recv()).await;
        assert!(matches!(run, Ok(Some(_))), "run {i} of {n}: {run:?}");
    }
}

async fn stop(service: RunningService) {
    let report = timeout(WAIT, service.stop()).await.expect("stop timed out").unwrap();
    assert_eq!(report.unfinished, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_are_counted_and_timed_in_async_and_thread_mode() {
    let hub = MemoryHubHandle::new();
    let recorder = MemoryRecorder::new();
    let (runs, mut rx) = mpsc::unbounded_channel();
    let runner = Runner::with_state(config("counted"), runs)
        .hub(hub.clone())
        .context(
            RunnerContext::new(2)
                .metric_label("tasks")
                .route(Route::new(EventListener::new("src", "work"), "work", work).metric_label("work"))
                .route(
                    Route::new(EventListener::new("src", "flaky"), "flaky", flaky)
                        .metric_label("flaky")
                        .retry(RetryPolicy::fixed(1, Duration::from_millis(20))),
                )
                .route(Route::new(EventListener::new("src", "slow"), "slow", slow).metric_label("slow")),
        )
        .context(
            RunnerContext::new(3)
                .metric_label("threads")
                .route(
                    Route::blocking(EventListener::new("src", "work_t"), "work_t", work_blocking)
                        .metric_label("work"),
                )
                .route(
                    Route::blocking(EventListener::new("src", "slow_t"), "slow_t", slow_blocking)
                        .metric_label("slow"),
                ),
        )
        .worker_mode(1, WorkerMode::Thread);
    // Local to this thread while start runs: the handles bind to it; the driver (a task on
    // the runtime's workers) and the pool threads then record through those handles.
    let service = {
        let _local = metrics::set_default_local_recorder(&recorder);
        timeout(WAIT, runner.start()).await.expect("start timed out").unwrap()
    };
    let tasks = [("service", "counted"), ("context", "tasks")];
    let threads = [("service", "counted"), ("context", "threads")];
    let info = [("service", "counted"), ("context", "tasks"), ("max_workers", "2"), ("worker_mode", "async")];
    assert_eq!(recorder.gauge(SERVICE_INFO, &info), Some(1.0));
    let info =
        [("service", "counted"), ("context", "threads"), ("max_workers", "3"), ("worker_mode", "thread")];
    assert_eq!(recorder.gauge(SERVICE_INFO, &info), Some(1.0));
    assert_eq!(recorder.gauge(AVAILABLE_WORKERS, &tasks), Some(2.0));
    assert_eq!(recorder.gauge(AVAILABLE_WORKERS, &threads), Some(3.0));

    const N: i64 = 100; // a burst well beyond either budget
    let src = source(&hub).await;
    for n in 0..N {
        publish(&src, "work", n).await;
        publish(&src, "work_t", n).await;
    }
    publish(&src, "flaky", -1).await;
    for n in 0..4 {
        publish(&src, "slow", n).await;
        publish(&src, "slow_t", n).await;
    }
    wait_runs(&mut rx, 2 * N as usize + 2 + 8).await; // the flaky one runs twice (one retry)
    stop(service).await;
    stop(src).await;

    for (ctx, max) in [("tasks", 2.0), ("threads", 3.0)] {
        let work = [("service", "counted"), ("context", ctx), ("route", "work")];
        assert_eq!(recorder.counter(TASKS_NUMBER_TOTAL, &work), Some(N as u64), "{ctx}");
        assert_eq!(recorder.counter(FAILED_TASKS_TOTAL, &work), Some(N as u64 / 2), "{ctx}: the odd ones");
        assert_eq!(
            recorder.counter(DEAD_LETTERS_TOTAL, &work),
            Some(N as u64 / 2),
            "{ctx}: events dead-letter"
        );
        assert_eq!(recorder.counter(RETRIES_TOTAL, &work), Some(0), "{ctx}");
        assert_eq!(recorder.histogram(TASK_DURATION_SECONDS, &work).map(|h| h.len()), Some(N as usize));
        assert_eq!(recorder.gauge(TASKS_NUMBER, &work), Some(0.0), "{ctx}");
        assert_eq!(recorder.gauge_min(TASKS_NUMBER, &work), Some(0.0), "{ctx}");

        // Durations run from the hand-off to the handler's end: the slow runs took SLOW+.
        let slow = [("service", "counted"), ("context", ctx), ("route", "slow")];
        let durations = recorder.histogram(TASK_DURATION_SECONDS, &slow).unwrap();
        assert_eq!(durations.len(), 4, "{ctx}");
        assert!(
            durations.iter().all(|&d| d >= SLOW.as_secs_f64() && d < WAIT.as_secs_f64()),
            "{durations:?}"
        );

        // Every value the gauge held was within 0..=max; the burst used every worker; it
        // ends back at the budget.
        let labels = [("service", "counted"), ("context", ctx)];
        assert_eq!(recorder.gauge(AVAILABLE_WORKERS, &labels), Some(max), "{ctx}");
        assert_eq!(recorder.gauge_min(AVAILABLE_WORKERS, &labels), Some(0.0), "{ctx}");
    }

    let flaky = [("service", "counted"), ("context", "tasks"), ("route", "flaky")];
    assert_eq!(recorder.counter(TASKS_NUMBER_TOTAL, &flaky), Some(2), "the run and its retry");
    assert_eq!(recorder.counter(FAILED_TASKS_TOTAL, &flaky), Some(2));
    assert_eq!(recorder.counter(RETRIES_TOTAL, &flaky), Some(1));
    assert_eq!(recorder.counter(DEAD_LETTERS_TOTAL, &flaky), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_over_http_and_shared_by_runners_of_the_process() {
    let hub = MemoryHubHandle::new();
    let (runs, mut rx) = mpsc::unbounded_channel();
    let start = Runner::with_state(metrics_config("scraped"), runs.clone())
        .hub(hub.clone())
        .context(
            RunnerContext::new(3)
                .metric_label("greeters")
                .route(Route::new(EventListener::new("src", "work"), "work", work).metric_label("greet")),
        )
        .context(
            RunnerContext::new(2).metric_label("pool").route(
                Route::blocking(EventListener::new("src", "work_t"), "work_t", work_blocking)
                    .metric_label("greet"),
            ),
        )
        .worker_mode(1, WorkerMode::GreedyThread)
        .start();
    let service = timeout(WAIT, start).await.expect("start timed out").unwrap();
    let addr = service.metrics_addr().expect("ENABLE_METRICS serves /metrics");
    assert_ne!(addr.port(), 0);

    let src = source(&hub).await;
    for n in [2, 3, 4] {
        publish(&src, "work", n).await;
        publish(&src, "work_t", n).await;
    }
    wait_runs(&mut rx, 6).await;
    // The runs are counted when dispatched; their outcomes reach the driver shortly after
    // they report: scrape until the workers are all back. `available_workers` is set last
    // when a run ends, but a rendering reads the series one by one, so scrape once more for a
    // consistent picture.
    let greeters = r#"{service="scraped",context="greeters"}"#;
    let pool = r#"{service="scraped",context="pool"}"#;
    scrape_until(addr, |body| {
        value(body, &format!("{AVAILABLE_WORKERS}{greeters}")) == Some(3.0)
            && value(body, &format!("{AVAILABLE_WORKERS}{pool}")) == Some(2.0)
    })
    .await;
    let body = scrape_until(addr, |_| true).await;
    for ctx in ["greeters", "pool"] {
        let labels = format!(r#"{{service="scraped",context="{ctx}",route="greet"}}"#);
        assert_eq!(value(&body, &format!("{TASKS_NUMBER_TOTAL}{labels}")), Some(3.0), "{body}");
        assert_eq!(value(&body, &format!("{FAILED_TASKS_TOTAL}{labels}")), Some(1.0), "{body}");
        assert_eq!(value(&body, &format!("{DEAD_LETTERS_TOTAL}{labels}")), Some(1.0), "{body}");
        assert_eq!(value(&body, &format!("{TASKS_NUMBER}{labels}")), Some(0.0), "{body}");
        assert_eq!(value(&body, &format!("{TASK_DURATION_SECONDS}_count{labels}")), Some(3.0), "{body}");
    }
    let info = r#"{service="scraped",context="greeters",max_workers="3",worker_mode="async"}"#;
    assert_eq!(value(&body, &format!("{SERVICE_INFO}{info}")), Some(1.0), "{body}");
    let info = r#"{service="scraped",context="pool",max_workers="2",worker_mode="greedy_thread"}"#;
    assert_eq!(value(&body, &format!("{SERVICE_INFO}{info}")), Some(1.0), "{body}");
    assert!(body.contains("# TYPE tasks_number_total counter"), "{body}");
    assert!(body.contains("# TYPE task_duration_seconds summary"), "{body}");

    let (status, _) = get(addr, "GET /other HTTP/1.1\r\n\r\n").await.unwrap();
    assert!(status.starts_with("HTTP/1.1 404"), "{status}");
    let (status, _) = get(addr, "POST /metrics HTTP/1.1\r\n\r\n").await.unwrap();
    assert!(status.starts_with("HTTP/1.1 405"), "{status}");
    let (status, _) = get(addr, &format!("GET /{} HTTP/1.1\r\n", "x".repeat(9_000))).await.unwrap();
    assert!(status.starts_with("HTTP/1.1 400"), "an oversized request: {status}");

    // A second Runner with the same METRICS settings shares the recorder and the server.
    let start = Runner::with_state(metrics_config("second"), runs)
        .hub(hub.clone())
        .context(RunnerContext::new(1).route(Route::new(EventListener::new("src", "other"), "other", work)))
        .start();
    let second = timeout(WAIT, start).await.expect("start timed out").unwrap();
    assert_eq!(second.metrics_addr(), Some(addr));
    let body = scrape_until(addr, |_| true).await;
    assert!(body.contains(r#"service="second""#) && body.contains(r#"service="scraped""#), "{body}");

    // The server outlives the first service and stops with the last.
    stop(service).await;
    assert!(get(addr, "GET /metrics HTTP/1.1\r\n\r\n").await.is_ok());
    stop(second).await;
    assert!(get(addr, "GET /metrics HTTP/1.1\r\n\r\n").await.is_err(), "the server stopped");
    stop(src).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metrics_address_in_use_is_a_start_error() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut config = metrics_config("blocked");
    config.metrics.port = taken.local_addr().unwrap().port();
    let start = Runner::new(config)
        .hub(MemoryHubHandle::new())
        .context(RunnerContext::new(1).route(Route::new(EventListener::new("src", "x"), "x", noop)))
        .start();
    match timeout(WAIT, start).await.expect("start timed out") {
        Err(e @ StartError::Metrics(_)) => assert!(e.to_string().contains("cannot serve /metrics"), "{e}"),
        other => panic!("expected a metrics start error, got {other:?}"),
    }
}

/// Review: a start failing after it began serving `/metrics` (here: the WebSocket port is
/// taken) dropped its lease without waiting for the server to stop, so the port was still
/// bound when `start` returned and an immediate second start failed on it.
#[cfg(feature = "ws")]
#[tokio::test]
async fn a_failed_start_frees_the_metrics_port_before_it_returns() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let free = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap().port();
    drop(free);
    let mut config = metrics_config("failing");
    config.metrics.port = port;
    config.websocket_ip = "127.0.0.1".into();
    config.websocket_port = taken.local_addr().unwrap().port();
    let route = Route::new(microfw_runtime_tokio::WsRpcListener, "x", noop);
    let start =
        Runner::new(config).hub(MemoryHubHandle::new()).context(RunnerContext::new(1).route(route)).start();
    match timeout(WAIT, start).await.expect("start timed out") {
        Err(StartError::Link(_)) => {}
        other => panic!("expected a link start error, got {other:?}"),
    }
    TcpListener::bind(("127.0.0.1", port)).expect("the failed start still holds the /metrics port");
}

async fn noop() {}

/// Scrapes `/metrics` until `done` accepts the body, for at most [`WAIT`].
async fn scrape_until(addr: SocketAddr, done: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, body) = get(addr, "GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n").await.unwrap();
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        if done(&body) {
            return body;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out; last scrape:\n{body}");
        tokio::task::yield_now().await;
    }
}

/// Sends `request` and returns the status line and the body; the whole exchange has a
/// timeout of [`WAIT`].
async fn get(addr: SocketAddr, request: &str) -> std::io::Result<(String, String)> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        // The server may answer (and close) before taking an oversized request whole.
        let _ = stream.write_all(request.as_bytes()).await;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&response).into_owned())
    };
    let response = timeout(WAIT, exchange).await.map_err(std::io::Error::other)??;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.lines().next().unwrap_or_default().to_owned();
    if status.is_empty() {
        return Err(std::io::Error::other("empty response"));
    }
    Ok((status, body.to_owned()))
}

/// The value of the exposition line for exactly this series (`name{labels}`).
fn value(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

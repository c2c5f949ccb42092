//! Metrics of the sync runtime: values through a local in-memory recorder, and `/metrics`
//! scraped over HTTP from the process-global Prometheus recorder. Each test has its own hub;
//! every wait has a timeout; nothing sleeps to synchronise.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use microfw_core::metrics::{
    AVAILABLE_WORKERS, DEAD_LETTERS_TOTAL, FAILED_TASKS_TOTAL, MemoryRecorder, RETRIES_TOTAL, SERVICE_INFO,
    TASK_DURATION_SECONDS, TASKS_NUMBER, TASKS_NUMBER_TOTAL,
};
use microfw_runtime_sync::extract::{Payload, State};
use microfw_runtime_sync::{
    Config, EventListener, MemoryHubHandle, RetryPolicy, Route, Runner, RunnerContext, StartError,
};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(5);

fn config(name: &str) -> Config {
    Config { service_name: Some(name.into()), shutdown_timeout: Duration::from_secs(5), ..Config::default() }
}

fn metrics_config(name: &str) -> Config {
    let mut config = config(name);
    config.enable_metrics = true;
    config.metrics.host = "127.0.0.1".into();
    config.metrics.port = 0; // a free port, read back with metrics_addr()
    config
}

/// Handlers report each run here (through the service state).
type Runs = Arc<Mutex<Sender<i64>>>;

fn runs() -> (Runs, Receiver<i64>) {
    let (tx, rx) = mpsc::channel();
    (Arc::new(Mutex::new(tx)), rx)
}

/// Fails on odd numbers.
fn work(State(runs): State<Runs>, Payload(n): Payload<i64>) -> Result<(), String> {
    let _ = runs.lock().unwrap().send(n);
    if n % 2 == 1 { Err(format!("{n} is odd")) } else { Ok(()) }
}

/// Always fails.
fn flaky(State(runs): State<Runs>, Payload(n): Payload<i64>) -> Result<(), String> {
    let _ = runs.lock().unwrap().send(n);
    Err("always".into())
}

fn wait_runs(rx: &Receiver<i64>, n: usize) {
    for i in 0..n {
        rx.recv_timeout(WAIT).unwrap_or_else(|e| panic!("run {i} of {n}: {e}"));
    }
}

#[test]
fn a_burst_is_counted_per_route_and_workers_never_go_negative() {
    let hub = MemoryHubHandle::new();
    let recorder = Arc::new(MemoryRecorder::new());
    let (runs, rx) = runs();
    let service = metrics::with_local_recorder(&*recorder, || {
        Runner::with_state(config("counted"), runs)
            .hub(hub.clone())
            .context(
                RunnerContext::new(2)
                    .metric_label("workers")
                    .route(
                        Route::blocking(EventListener::new("src", "work"), "work", work).metric_label("work"),
                    )
                    .route(
                        Route::blocking(EventListener::new("src", "flaky"), "flaky", flaky)
                            .metric_label("flaky")
                            .retry(RetryPolicy::fixed(1, Duration::from_millis(20))),
                    ),
            )
            .start()
            .unwrap()
    });
    let ctx = [("service", "counted"), ("context", "workers")];
    let info =
        [("service", "counted"), ("context", "workers"), ("max_workers", "2"), ("worker_mode", "thread")];
    assert_eq!(recorder.gauge(SERVICE_INFO, &info), Some(1.0));
    assert_eq!(recorder.gauge(AVAILABLE_WORKERS, &ctx), Some(2.0));

    const N: i64 = 100; // a burst well beyond the budget of 2
    for n in 0..N {
        hub.publish_event("src", "work", &json!(n)).unwrap();
    }
    hub.publish_event("src", "flaky", &json!(-1)).unwrap();
    wait_runs(&rx, N as usize + 2); // the flaky one runs twice (one retry)
    assert_eq!(service.stop().unwrap().unfinished, 0);

    let work = [("service", "counted"), ("context", "workers"), ("route", "work")];
    assert_eq!(recorder.counter(TASKS_NUMBER_TOTAL, &work), Some(N as u64));
    assert_eq!(recorder.counter(FAILED_TASKS_TOTAL, &work), Some(N as u64 / 2), "the odd ones");
    assert_eq!(recorder.counter(DEAD_LETTERS_TOTAL, &work), Some(N as u64 / 2), "events dead-letter");
    assert_eq!(recorder.counter(RETRIES_TOTAL, &work), Some(0));
    assert_eq!(recorder.histogram(TASK_DURATION_SECONDS, &work).map(|h| h.len()), Some(N as usize));
    assert_eq!(recorder.gauge(TASKS_NUMBER, &work), Some(0.0));
    assert_eq!(recorder.gauge_min(TASKS_NUMBER, &work), Some(0.0));

    let flaky = [("service", "counted"), ("context", "workers"), ("route", "flaky")];
    assert_eq!(recorder.counter(TASKS_NUMBER_TOTAL, &flaky), Some(2), "the run and its retry");
    assert_eq!(recorder.counter(FAILED_TASKS_TOTAL, &flaky), Some(2));
    assert_eq!(recorder.counter(RETRIES_TOTAL, &flaky), Some(1));
    assert_eq!(recorder.counter(DEAD_LETTERS_TOTAL, &flaky), Some(1));

    // Every value the gauge ever held was within 0..=2; it ends back at the budget.
    assert_eq!(recorder.gauge(AVAILABLE_WORKERS, &ctx), Some(2.0));
    assert_eq!(recorder.gauge_min(AVAILABLE_WORKERS, &ctx), Some(0.0), "the burst used both workers");
}

#[test]
fn metrics_are_served_over_http_and_shared_by_runners_of_the_process() {
    let hub = MemoryHubHandle::new();
    let (runs, rx) = runs();
    let service =
        Runner::with_state(metrics_config("scraped"), runs.clone())
            .hub(hub.clone())
            .context(RunnerContext::new(3).metric_label("greeters").route(
                Route::blocking(EventListener::new("src", "work"), "work", work).metric_label("greet"),
            ))
            .start()
            .unwrap();
    let addr = service.metrics_addr().expect("ENABLE_METRICS serves /metrics");
    assert_ne!(addr.port(), 0);

    for n in [2, 3, 4] {
        hub.publish_event("src", "work", &json!(n)).unwrap();
    }
    wait_runs(&rx, 3);
    let labels = r#"{service="scraped",context="greeters",route="greet"}"#;
    let ctx = r#"{service="scraped",context="greeters"}"#;
    // The runs are dispatched (counted) before they start; their outcomes reach the driver
    // shortly after they report: scrape until the workers are all back. `available_workers`
    // is set last when a run ends, but a rendering reads the series one by one, so scrape
    // once more for a consistent picture.
    scrape_until(addr, |body| value(body, &format!("{AVAILABLE_WORKERS}{ctx}")) == Some(3.0));
    let body = scrape_until(addr, |_| true);
    assert_eq!(value(&body, &format!("{TASKS_NUMBER_TOTAL}{labels}")), Some(3.0), "{body}");
    assert_eq!(value(&body, &format!("{FAILED_TASKS_TOTAL}{labels}")), Some(1.0), "{body}");
    assert_eq!(value(&body, &format!("{TASKS_NUMBER}{labels}")), Some(0.0), "{body}");
    assert_eq!(value(&body, &format!("{TASK_DURATION_SECONDS}_count{labels}")), Some(3.0), "{body}");
    let info = r#"{service="scraped",context="greeters",max_workers="3",worker_mode="thread"}"#;
    assert_eq!(value(&body, &format!("{SERVICE_INFO}{info}")), Some(1.0), "{body}");
    assert!(body.contains("# TYPE tasks_number_total counter"), "{body}");
    assert!(body.contains("# TYPE task_duration_seconds summary"), "{body}");

    let (status, _) = get(addr, "GET /other HTTP/1.1\r\n\r\n").unwrap();
    assert!(status.starts_with("HTTP/1.1 404"), "{status}");
    let (status, _) = get(addr, "POST /metrics HTTP/1.1\r\n\r\n").unwrap();
    assert!(status.starts_with("HTTP/1.1 405"), "{status}");
    let (status, _) = get(addr, &format!("GET /{} HTTP/1.1\r\n", "x".repeat(9_000))).unwrap();
    assert!(status.starts_with("HTTP/1.1 400"), "an oversized request: {status}");

    // A second Runner with the same METRICS settings shares the recorder and the server.
    let second = Runner::with_state(metrics_config("second"), runs)
        .hub(hub.clone())
        .context(RunnerContext::new(1).route(Route::blocking(
            EventListener::new("src", "other"),
            "other",
            work,
        )))
        .start()
        .unwrap();
    assert_eq!(second.metrics_addr(), Some(addr));
    let body = scrape_until(addr, |_| true);
    assert!(body.contains(r#"service="second""#) && body.contains(r#"service="scraped""#), "{body}");

    // The server outlives the first service and stops with the last.
    assert_eq!(service.stop().unwrap().unfinished, 0);
    assert!(get(addr, "GET /metrics HTTP/1.1\r\n\r\n").is_ok());
    assert_eq!(second.stop().unwrap().unfinished, 0);
    assert!(get(addr, "GET /metrics HTTP/1.1\r\n\r\n").is_err(), "the server stopped");
}

#[test]
fn a_metrics_address_in_use_is_a_start_error() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut config = metrics_config("blocked");
    config.metrics.port = taken.local_addr().unwrap().port();
    let result = Runner::new(config)
        .hub(MemoryHubHandle::new())
        .context(RunnerContext::new(1).route(Route::blocking(EventListener::new("src", "x"), "x", || ())))
        .start();
    match result {
        Err(e @ StartError::Metrics(_)) => assert!(e.to_string().contains("cannot serve /metrics"), "{e}"),
        other => panic!("expected a metrics start error, got {other:?}"),
    }
}

/// Scrapes `/metrics` until `done` accepts the body, for at most [`WAIT`].
fn scrape_until(addr: SocketAddr, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body) = get(addr, "GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        if done(&body) {
            return body;
        }
        assert!(Instant::now() < deadline, "timed out; last scrape:\n{body}");
        std::thread::yield_now();
    }
}

/// Sends `request` and returns the status line and the body.
fn get(addr: SocketAddr, request: &str) -> std::io::Result<(String, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, WAIT)?;
    stream.set_read_timeout(Some(WAIT))?;
    stream.set_write_timeout(Some(WAIT))?;
    // The server may answer (and close) before taking an oversized request whole.
    let _ = stream.write_all(request.as_bytes());
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
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

//! A foreign global `metrics` recorder: `ENABLE_METRICS` is then a start error, and services
//! started without it record into that recorder. Alone in its test binary: it installs the
//! process's global recorder.

use std::time::Duration;

use microfw_core::metrics::{AVAILABLE_WORKERS, MemoryRecorder, TASKS_NUMBER_TOTAL};
use microfw_runtime_tokio::extract::{Payload, State};
use microfw_runtime_tokio::{
    Config, EventListener, MemoryHubHandle, Route, Runner, RunnerContext, StartError,
};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(5);

async fn work(State(runs): State<mpsc::UnboundedSender<i64>>, Payload(n): Payload<i64>) {
    let _ = runs.send(n);
}

fn config(name: &str) -> Config {
    Config {
        service_name: Some(name.into()),
        worker_mode: "async".parse().unwrap(),
        shutdown_timeout: Duration::from_secs(5),
        ..Config::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_global_recorder_refuses_enable_metrics_and_records_the_rest() {
    let recorder: &'static MemoryRecorder = Box::leak(Box::new(MemoryRecorder::new()));
    metrics::set_global_recorder(recorder).unwrap();

    let mut with_metrics = config("refused");
    with_metrics.enable_metrics = true;
    with_metrics.metrics.host = "127.0.0.1".into();
    with_metrics.metrics.port = 0;
    let (runs, mut rx) = mpsc::unbounded_channel();
    let route = || Route::new(EventListener::new("src", "e"), "e", work).metric_label("e");
    let start = Runner::with_state(with_metrics, runs.clone())
        .hub(MemoryHubHandle::new())
        .context(RunnerContext::new(1).metric_label("c").route(route()))
        .start();
    match timeout(WAIT, start).await.expect("start timed out") {
        Err(e @ StartError::Metrics(_)) => {
            assert!(e.to_string().contains("another global metrics recorder"), "{e}");
        }
        other => panic!("expected a metrics start error, got {other:?}"),
    }
    // Refused before anything registered.
    let ctx = [("service", "refused"), ("context", "c")];
    assert_eq!(recorder.gauge(AVAILABLE_WORKERS, &ctx), None);

    // Without ENABLE_METRICS the service records into whatever global recorder there is.
    let hub = MemoryHubHandle::new();
    let start = Runner::with_state(config("recorded"), runs)
        .hub(hub.clone())
        .context(RunnerContext::new(1).metric_label("c").route(route()))
        .start();
    let service = timeout(WAIT, start).await.expect("start timed out").unwrap();
    assert_eq!(service.metrics_addr(), None);
    let src = timeout(WAIT, Runner::new(config("src")).hub(hub).start()).await.unwrap().unwrap();
    for n in 0..3 {
        timeout(WAIT, src.producer().dispatch("e", &json!(n))).await.unwrap().unwrap();
    }
    for _ in 0..3 {
        timeout(WAIT, rx.recv()).await.expect("a run").unwrap();
    }
    assert_eq!(timeout(WAIT, service.stop()).await.unwrap().unwrap().unfinished, 0);
    assert_eq!(timeout(WAIT, src.stop()).await.unwrap().unwrap().unfinished, 0);
    let e = [("service", "recorded"), ("context", "c"), ("route", "e")];
    assert_eq!(recorder.counter(TASKS_NUMBER_TOTAL, &e), Some(3));
    let ctx = [("service", "recorded"), ("context", "c")];
    assert_eq!(recorder.gauge(AVAILABLE_WORKERS, &ctx), Some(1.0));
}

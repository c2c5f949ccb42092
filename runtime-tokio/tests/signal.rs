//! `Runner::run` stops gracefully on SIGTERM. Alone in its test binary: it signals its own
//! process.

use std::time::Duration;

use microfw_runtime_tokio::{
    Config, EventListener, MemoryHubHandle, Route, Runner, RunnerContext, WorkerMode,
};

async fn noop() {}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_stops_on_sigterm() {
    let hub = MemoryHubHandle::new();
    let config =
        Config { service_name: Some("sig".into()), worker_mode: WorkerMode::Async, ..Config::default() };
    let runner = Runner::new(config)
        .context(RunnerContext::new(1).route(Route::new(EventListener::new("src", "e"), "h", noop)))
        .hub(hub.clone());
    let running = tokio::spawn(runner.run());
    // The signal handlers are installed before the service subscribes: wait for the consumer.
    let queue = "evt-src-e--sig.h";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while hub.with(|h| h.broker().consumer_count(queue)) != Some(1) {
        assert!(tokio::time::Instant::now() < deadline, "the service never subscribed");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let status =
        std::process::Command::new("kill").args(["-TERM", &std::process::id().to_string()]).status().unwrap();
    assert!(status.success());
    let report = tokio::time::timeout(Duration::from_secs(5), running).await.unwrap().unwrap().unwrap();
    assert_eq!(report.unfinished, 0);
    assert_eq!(hub.with(|h| h.broker().consumer_count(queue)), Some(0));
}

//! `Runner::run` stops gracefully on SIGTERM. In its own test binary: it raises a real
//! signal in the process.

use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use microfw_runtime_sync::extract::State;
use microfw_runtime_sync::{Config, MemoryHubHandle, Route, Runner, RunnerContext, TimeEntrypoint};

#[test]
fn run_stops_gracefully_on_sigterm() {
    let (tx, started) = mpsc::channel::<()>();
    fn tick(State(started): State<Arc<Mutex<Sender<()>>>>) {
        let _ = started.lock().unwrap().send(());
    }
    let config = Config { service_name: Some("svc".into()), ..Config::default() };
    let runner = Runner::with_state(config, Arc::new(Mutex::new(tx))).hub(MemoryHubHandle::new()).context(
        RunnerContext::new(1).route(Route::blocking(
            TimeEntrypoint::new(Duration::from_secs(60)).eager(),
            "tick",
            tick,
        )),
    );
    let running = std::thread::spawn(move || runner.run());
    // The eager timer ticks once the service started, which is after the signal handlers
    // were installed: raising SIGTERM now cannot kill the test process.
    started.recv_timeout(Duration::from_secs(5)).unwrap();
    signal_hook::low_level::raise(signal_hook::consts::SIGTERM).unwrap();
    let report = running.join().unwrap().unwrap();
    assert_eq!(report.unfinished, 0);
}

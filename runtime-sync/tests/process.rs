//! `process` worker mode end to end, on the memory hub.
//!
//! Each test is also its own worker program: the runner starts this test binary again with
//! the test's own name and `--exact` (see `Runner::worker_command`), so the child runs the
//! same test function up to the process-mode service's `start`, which then serves jobs and
//! exits. Anything a test does before that `start` therefore runs in every child too; the
//! other services of a test start after it. Handlers in children cannot reach the test's
//! channels: they report through RPC replies and events (relayed through the service) to
//! thread-mode handlers in the test process. Every wait has a timeout.
#![cfg(unix)]

use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use microfw_runtime_sync::extract::{Attempt, Context, Failure, Params, Payload, State};
use microfw_runtime_sync::{
    CallbackRoute, Config, EventListener, MemoryHubHandle, Producer, Reply, RetryPolicy, Route, RpcListener,
    RpcProxy, Runner, RunnerContext, StartError, WorkerMode,
};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);

fn config(name: &str) -> Config {
    Config { service_name: Some(name.into()), shutdown_timeout: Duration::from_secs(10), ..Config::default() }
}

/// This test binary, re-running only `test`.
fn worker_of(test: &str) -> (PathBuf, [String; 3]) {
    (std::env::current_exe().unwrap(), [test.to_owned(), "--exact".to_owned(), "--quiet".to_owned()])
}

/// A channel thread-mode handlers report to (through the state).
#[derive(Clone)]
struct Report(Arc<Mutex<Sender<Value>>>);

fn report() -> (Report, Receiver<Value>) {
    let (tx, rx) = mpsc::channel();
    (Report(Arc::new(Mutex::new(tx))), rx)
}

impl Report {
    fn send(&self, v: Value) {
        let _ = self.0.lock().unwrap().send(v);
    }
}

fn my_pid() -> Reply<u32> {
    Reply(std::process::id())
}

fn reported(State(report): State<Report>, Context(ctx): Context, Payload(v): Payload<Value>) {
    report.send(json!({"payload": v, "stack": ctx.call_id_stack()}));
}

/// True once process `pid` is gone and reaped (a zombie still has its /proc entry).
fn reaped(pid: u64) -> bool {
    !std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// True when process `pid` has exited, every thread of it, but is not reaped yet. (Its main
/// thread turns zombie before its other threads are gone and its files closed.)
fn zombie(pid: u64) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // "<pid> (<comm>) <state> ...": the state follows the last parenthesis.
    let z = stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
    z && std::fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|tasks| tasks.count() == 1)
}

fn pid_of(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a pid: {v}"))
}

#[test]
fn process_workers_run_event_and_rpc_handlers_and_relay_their_clients() {
    let hub = MemoryHubHandle::new();
    let (report, rx) = report();

    fn on_ping(producer: Producer, Payload(v): Payload<Value>) -> Result<(), String> {
        let pong = json!({"pid": std::process::id(), "v": v});
        producer.dispatch("ponged", &pong).map_err(|e| e.to_string())
    }
    fn ask(proxy: RpcProxy) -> Result<Reply<Value>, String> {
        let parent: u32 = proxy.call_as("proc-a", "parent_pid", (), ()).map_err(|e| e.to_string())?;
        // Two calls in flight at once through the relay.
        let first = proxy.call_async("proc-a", "parent_pid", (), ()).map_err(|e| e.to_string())?;
        let second = proxy.call_async("proc-a", "parent_pid", (), ()).map_err(|e| e.to_string())?;
        let (a, b) = (first.wait().map_err(|e| e.to_string())?, second.wait().map_err(|e| e.to_string())?);
        Ok(Reply(json!({"child": std::process::id(), "parent": parent, "more": [a, b]})))
    }
    fn print(Params((v,)): Params<(Value,)>) -> Reply<Value> {
        // Printing must not disturb the frames on the worker's socket (the test harness
        // captures print!, so write to the real standard output as well).
        println!("a worker prints {v}");
        let mut out = std::io::stdout();
        let _ = out.write_all(b"{\"a worker writes\": \"not a frame\"}\n").and_then(|()| out.flush());
        Reply(v)
    }

    let (program, args) = worker_of("process_workers_run_event_and_rpc_handlers_and_relay_their_clients");
    let service = Runner::with_state(config("proc-a"), report)
        .hub(hub.clone())
        .context(
            RunnerContext::new(2)
                .route(Route::blocking(RpcListener::new(), "pid", my_pid))
                .route(Route::blocking(RpcListener::new(), "ask", ask))
                .route(Route::blocking(RpcListener::new(), "print", print))
                .route(Route::blocking(EventListener::new("src", "ping"), "on_ping", on_ping)),
        )
        .context(
            RunnerContext::new(2)
                .route(Route::blocking(RpcListener::new(), "parent_pid", my_pid))
                .route(Route::blocking(EventListener::new("proc-a", "ponged"), "reported", reported)),
        )
        .worker_mode(0, WorkerMode::Process)
        .worker_command(program, args)
        .start()
        .unwrap();
    let parent = u64::from(std::process::id());
    let rpc = service.rpc().with_timeout(WAIT);

    let child = pid_of(&rpc.call("proc-a", "pid", (), ()).unwrap());
    assert_ne!(child, parent, "the RPC handler ran in a child process");
    assert_eq!(pid_of(&rpc.call("proc-a", "parent_pid", (), ()).unwrap()), parent);

    // An event handler in a child, whose Producer goes through the service with its context.
    hub.publish_event("src", "ping", &json!(7)).unwrap();
    let got = rx.recv_timeout(WAIT).unwrap();
    assert_eq!(got["payload"]["v"], json!(7));
    let pinged = pid_of(&got["payload"]["pid"]);
    assert_ne!(pinged, parent);
    let stack: Vec<String> = serde_json::from_value(got["stack"].clone()).unwrap();
    assert_eq!(stack.len(), 2, "{stack:?}");
    assert!(stack[0].starts_with("proc-a.on_ping."), "{stack:?}");
    assert!(stack[1].starts_with("proc-a.reported."), "{stack:?}");

    // An RpcProxy in a child calls back into the parent.
    let asked = rpc.call("proc-a", "ask", (), ()).unwrap();
    assert_ne!(pid_of(&asked["child"]), parent);
    assert_eq!(pid_of(&asked["parent"]), parent);
    assert_eq!(asked["more"], json!([parent, parent]));

    assert_eq!(rpc.call("proc-a", "print", (json!({"k": [1, 2]}),), ()).unwrap(), json!({"k": [1, 2]}));
    assert_ne!(pid_of(&rpc.call("proc-a", "pid", (), ()).unwrap()), parent, "still serving after the prints");

    assert_eq!(service.stop().unwrap().unfinished, 0);
    for pid in [child, pinged, pid_of(&asked["child"])] {
        assert!(reaped(pid), "worker {pid} was reaped at stop");
    }
    assert_eq!(hub.unacked_len("evt-src-ping--proc-a.on_ping"), Some(0));
}

#[test]
fn a_worker_that_exits_mid_job_fails_the_job_and_is_replaced() {
    let hub = MemoryHubHandle::new();
    let (report, rx) = report();

    fn fragile(producer: Producer, attempt: Attempt, Payload(v): Payload<Value>) -> Result<(), String> {
        if attempt.retry_count == 0 {
            std::process::exit(3);
        }
        let survived = json!({"v": v, "retry": attempt.retry_count, "error": attempt.last_error});
        producer.dispatch("survived", &survived).map_err(|e| e.to_string())
    }
    fn doomed(Payload(_): Payload<Value>) {
        std::process::exit(4);
    }
    fn scribble() -> Reply<u32> {
        // Junk on the worker's socket (its standard input) breaks the protocol.
        use std::os::fd::AsFd;
        let socket = std::io::stdin().as_fd().try_clone_to_owned().unwrap();
        let _ = std::os::unix::net::UnixStream::from(socket).write_all(b"garbage");
        Reply(std::process::id())
    }
    fn doomed_failed(
        producer: Producer,
        Failure(error): Failure,
        Payload(v): Payload<Value>,
    ) -> Result<(), String> {
        let gave_up = json!({"v": v, "error": error.error.message, "pid": std::process::id()});
        producer.dispatch("gave_up", &gave_up).map_err(|e| e.to_string())
    }

    let (program, args) = worker_of("a_worker_that_exits_mid_job_fails_the_job_and_is_replaced");
    let service = Runner::with_state(config("proc-b"), report)
        .hub(hub.clone())
        .context(
            RunnerContext::new(1)
                .route(Route::blocking(RpcListener::new(), "pid", my_pid))
                .route(Route::blocking(RpcListener::new(), "scribble", scribble))
                .route(
                    Route::blocking(EventListener::new("src", "fragile"), "fragile", fragile)
                        .retry(RetryPolicy::fixed(2, Duration::from_millis(10))),
                )
                .route(
                    Route::blocking(EventListener::new("src", "doomed"), "doomed", doomed)
                        .callback(CallbackRoute::blocking("doomed_failed", doomed_failed)),
                ),
        )
        .context(
            RunnerContext::new(1)
                .route(Route::blocking(EventListener::new("proc-b", "survived"), "on_survived", reported))
                .route(Route::blocking(EventListener::new("proc-b", "gave_up"), "on_gave_up", reported)),
        )
        .worker_mode(0, WorkerMode::Process)
        .worker_command(program, args)
        .start()
        .unwrap();
    let parent = u64::from(std::process::id());
    let rpc = service.rpc().with_timeout(WAIT);
    let first = pid_of(&rpc.call("proc-b", "pid", (), ()).unwrap());

    // The first run kills its worker: the job fails and is retried, on a new worker.
    hub.publish_event("src", "fragile", &json!(1)).unwrap();
    let got = rx.recv_timeout(WAIT).unwrap()["payload"].clone();
    assert_eq!((got["v"].clone(), got["retry"].clone()), (json!(1), json!(1)), "{got}");
    let error = got["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&format!("worker process {first} exited")) && error.contains("exit status: 3"),
        "{error}"
    );
    assert!(reaped(first), "the crashed worker was reaped");

    // No retries: the failure callback runs (in a worker too) with the crash as the error.
    hub.publish_event("src", "doomed", &json!(2)).unwrap();
    let got = rx.recv_timeout(WAIT).unwrap()["payload"].clone();
    assert_eq!(got["v"], json!(2));
    assert!(got["error"].as_str().is_some_and(|e| e.contains("exit status: 4")), "{got}");
    assert_ne!(pid_of(&got["pid"]), parent);

    // A worker that breaks the protocol is killed; its caller gets the failure.
    let scribbler = pid_of(&rpc.call("proc-b", "pid", (), ()).unwrap());
    let err = rpc.call("proc-b", "scribble", (), ()).unwrap_err().to_string();
    assert!(err.contains(&format!("worker process {scribbler} exited")) && err.contains("SIGKILL"), "{err}");
    assert!(reaped(scribbler));

    // A worker killed while idle is replaced before the next job reaches it.
    let idle = pid_of(&rpc.call("proc-b", "pid", (), ()).unwrap());
    let killed = std::process::Command::new("kill").args(["-9", &idle.to_string()]).status().unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + WAIT;
    while !zombie(idle) {
        assert!(Instant::now() < deadline, "worker {idle} did not die");
        std::thread::sleep(Duration::from_millis(5));
    }

    // And the service keeps serving.
    let later = pid_of(&rpc.call("proc-b", "pid", (), ()).unwrap());
    assert!(later != parent && later != first && later != scribbler && later != idle);
    assert!(reaped(idle));
    assert_eq!(service.stop().unwrap().unfinished, 0);
    assert!(reaped(later));
    assert_eq!(hub.queue_len("microfw.dlq.evt-src-doomed--proc-b.doomed"), Some(1));
    assert_eq!(hub.unacked_len("evt-src-fragile--proc-b.fragile"), Some(0));
}

#[test]
fn workers_are_recycled_after_max_tasks_per_child() {
    let hub = MemoryHubHandle::new();
    let (program, args) = worker_of("workers_are_recycled_after_max_tasks_per_child");
    // WORKER_MODE and MAX_TASKS_PER_CHILD from the config this time.
    let config =
        Config { worker_mode: WorkerMode::Process, max_tasks_per_child: Some(2), ..config("proc-c") };
    let service = Runner::new(config)
        .hub(hub.clone())
        .context(RunnerContext::new(1).route(Route::blocking(RpcListener::new(), "pid", my_pid)))
        .worker_command(program, args)
        .start()
        .unwrap();
    let rpc = service.rpc().with_timeout(WAIT);
    let pids: Vec<u64> = (0..5).map(|_| pid_of(&rpc.call("proc-c", "pid", (), ()).unwrap())).collect();
    assert_eq!(pids[0], pids[1], "{pids:?}");
    assert_eq!(pids[2], pids[3], "{pids:?}");
    assert!(pids[0] != pids[2] && pids[2] != pids[4] && pids[0] != pids[4], "{pids:?}");
    assert!(reaped(pids[0]) && reaped(pids[2]), "retired workers were reaped: {pids:?}");
    assert_eq!(service.stop().unwrap().unfinished, 0);
    assert!(reaped(pids[4]));
}

/// Test-process state of the gate the worker's job waits on.
#[derive(Clone)]
struct Gate {
    entered: Arc<Mutex<Sender<()>>>,
    release: Arc<Mutex<Receiver<()>>>,
}

#[test]
fn stop_waits_for_jobs_running_in_workers() {
    let hub = MemoryHubHandle::new();
    let (entered_tx, entered) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    let state = Gate { entered: Arc::new(Mutex::new(entered_tx)), release: Arc::new(Mutex::new(release_rx)) };

    fn slow(proxy: RpcProxy) -> Result<Reply<Value>, String> {
        let opened = proxy.call("proc-d", "gate", (), ()).map_err(|e| e.to_string())?;
        Ok(Reply(json!({"pid": std::process::id(), "gate": opened})))
    }
    fn gate(State(gate): State<Gate>) -> Result<Reply<&'static str>, String> {
        gate.entered.lock().unwrap().send(()).map_err(|e| e.to_string())?;
        gate.release.lock().unwrap().recv_timeout(WAIT).map_err(|e| e.to_string())?;
        Ok(Reply("open"))
    }

    let (program, args) = worker_of("stop_waits_for_jobs_running_in_workers");
    let service = Runner::with_state(config("proc-d"), state)
        .hub(hub.clone())
        .context(RunnerContext::new(1).route(Route::blocking(RpcListener::new(), "slow", slow)))
        .context(RunnerContext::new(1).route(Route::blocking(RpcListener::new(), "gate", gate)))
        .worker_mode(0, WorkerMode::Process)
        .worker_command(program, args)
        .start()
        .unwrap();
    // The caller is another service, started after the process-mode one (workers never get here).
    let client = Runner::new(config("proc-d-client")).hub(hub.clone()).start().unwrap();
    let pending = client.rpc().with_timeout(WAIT).call_async("proc-d", "slow", (), ()).unwrap();
    entered.recv_timeout(WAIT).unwrap();
    // The stop is requested while the worker's job waits on the gate.
    service.request_stop();
    release.send(()).unwrap();
    let report = service.stop().unwrap();
    assert_eq!(report.unfinished, 0);
    let reply = pending.wait().unwrap();
    assert_eq!(reply["gate"], json!("open"));
    let pid = pid_of(&reply["pid"]);
    assert_ne!(pid, u64::from(std::process::id()));
    assert!(reaped(pid), "the worker was reaped at stop");
    client.stop().unwrap();
}

#[test]
fn workers_still_running_at_the_shutdown_timeout_are_killed() {
    let hub = MemoryHubHandle::new();
    let (report, rx) = report();

    fn stuck(producer: Producer, Payload(_): Payload<Value>) -> Result<(), String> {
        producer.dispatch("stuck", &std::process::id()).map_err(|e| e.to_string())?;
        loop {
            std::thread::park();
        }
    }

    let (program, args) = worker_of("workers_still_running_at_the_shutdown_timeout_are_killed");
    let config = Config { shutdown_timeout: Duration::from_millis(200), ..config("proc-e") };
    let service = Runner::with_state(config, report)
        .hub(hub.clone())
        .context(RunnerContext::new(1).route(Route::blocking(
            EventListener::new("src", "work"),
            "stuck",
            stuck,
        )))
        .context(RunnerContext::new(1).route(Route::blocking(
            EventListener::new("proc-e", "stuck"),
            "on_stuck",
            reported,
        )))
        .worker_mode(0, WorkerMode::Process)
        .worker_command(program, args)
        .start()
        .unwrap();
    hub.publish_event("src", "work", &json!(1)).unwrap();
    let pid = pid_of(&rx.recv_timeout(WAIT).unwrap()["payload"]);
    assert_eq!(service.stop().unwrap().unfinished, 1);
    // Killed and reaped by its slot thread, after the stop returned.
    let deadline = Instant::now() + WAIT;
    while !reaped(pid) {
        assert!(Instant::now() < deadline, "worker {pid} still there");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The abandoned delivery went back to its queue.
    assert_eq!(hub.queue_len("evt-src-work--proc-e.stuck"), Some(1));
}

#[test]
fn a_worker_command_that_never_serves_fails_the_start() {
    let start = |program: &str| {
        Runner::new(config("proc-f"))
            .hub(MemoryHubHandle::new())
            .context(RunnerContext::new(2).route(Route::blocking(RpcListener::new(), "pid", my_pid)))
            .worker_mode(0, WorkerMode::Process)
            .worker_command(program, Vec::<String>::new())
            .start()
            .map(drop)
    };
    let Err(StartError::WorkerProcess(e)) = start("true") else { panic!("started") };
    assert!(e.contains("exited before it was ready") && e.contains("exit status: 0"), "{e}");
    let Err(StartError::WorkerProcess(e)) = start("/nonexistent/program") else { panic!("started") };
    assert!(e.contains("cannot run /nonexistent/program"), "{e}");
}

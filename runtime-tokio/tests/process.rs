//! `process` worker mode end to end, on the memory hub.
//!
//! Each test is also its own worker program: the runner starts this test binary again with
//! the test's own name and `--exact` (see `Runner::worker_command`), so the child runs the
//! same test function up to the process-mode service's `start`, which then serves jobs and
//! exits. Anything a test does before that `start` therefore runs in every child too; the
//! other services of a test start after it. Handlers in children cannot reach the test's
//! channels: they report through RPC replies and events (relayed through the service) to
//! async handlers in the test process. Every wait has a timeout.
#![cfg(unix)]

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use microfw_runtime_tokio::extract::{Attempt, Context, Failure, Params, Payload, State};
use microfw_runtime_tokio::{
    CallbackRoute, Config, EventListener, MemoryHubHandle, Producer, Reply, RetryPolicy, Route, RpcListener,
    RpcProxy, Runner, RunnerContext, RunningService, StartError, WorkerMode,
};
use serde_json::{Value, json};
use tokio::sync::{Mutex, mpsc};
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(20);

fn config(name: &str) -> Config {
    Config {
        service_name: Some(name.into()),
        worker_mode: WorkerMode::Async,
        shutdown_timeout: Duration::from_secs(10),
        ..Config::default()
    }
}

/// This test binary, re-running only `test`.
fn worker_of(test: &str) -> (PathBuf, [String; 3]) {
    (std::env::current_exe().unwrap(), [test.to_owned(), "--exact".to_owned(), "--quiet".to_owned()])
}

type Tx = mpsc::UnboundedSender<Value>;

async fn recv<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
    timeout(WAIT, rx.recv()).await.expect("timed out waiting").expect("channel closed")
}

async fn my_pid() -> Reply<u32> {
    Reply(std::process::id())
}

fn my_pid_blocking() -> Reply<u32> {
    Reply(std::process::id())
}

async fn reported(State(tx): State<Tx>, Context(ctx): Context, Payload(v): Payload<Value>) {
    let _ = tx.send(json!({"payload": v, "stack": ctx.call_id_stack()}));
}

/// The service `src`, whose events the tests' handlers listen to (started after the
/// process-mode service: workers never get here).
async fn source(hub: &MemoryHubHandle) -> RunningService {
    Runner::new(config("src")).hub(hub.clone()).start().await.unwrap()
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

#[tokio::test]
async fn process_workers_run_async_and_blocking_handlers_and_relay_their_clients() {
    let hub = MemoryHubHandle::new();
    let (tx, mut rx) = mpsc::unbounded_channel();

    async fn on_ping(producer: Producer, Payload(v): Payload<Value>) -> Result<(), String> {
        let pong = json!({"pid": std::process::id(), "v": v});
        producer.dispatch("ponged", &pong).await.map_err(|e| e.to_string())
    }
    async fn ask(proxy: RpcProxy) -> Result<Reply<Value>, String> {
        let parent: u32 = proxy.call_as("tproc-a", "parent_pid", (), ()).await.map_err(|e| e.to_string())?;
        // Two calls in flight at once through the relay.
        let first = proxy.call_async("tproc-a", "parent_pid", (), ()).await.map_err(|e| e.to_string())?;
        let second = proxy.call_async("tproc-a", "parent_pid", (), ()).await.map_err(|e| e.to_string())?;
        let (a, b) = (first.await.map_err(|e| e.to_string())?, second.await.map_err(|e| e.to_string())?);
        Ok(Reply(json!({"child": std::process::id(), "parent": parent, "more": [a, b]})))
    }
    fn ask_blocking(proxy: RpcProxy) -> Result<Reply<Value>, String> {
        let parent = proxy.call_blocking("tproc-a", "parent_pid", (), ()).map_err(|e| e.to_string())?;
        Ok(Reply(json!({"child": std::process::id(), "parent": parent})))
    }
    fn print(Params((v,)): Params<(Value,)>) -> Reply<Value> {
        // Printing must not disturb the frames on the worker's socket (the test harness
        // captures print!, so write to the real standard output as well).
        println!("a worker prints {v}");
        let mut out = std::io::stdout();
        let _ = out.write_all(b"{\"a worker writes\": \"not a frame\"}\n").and_then(|()| out.flush());
        Reply(v)
    }

    let (program, args) =
        worker_of("process_workers_run_async_and_blocking_handlers_and_relay_their_clients");
    let service = Runner::with_state(config("tproc-a"), tx)
        .hub(hub.clone())
        .context(
            RunnerContext::new(2)
                .route(Route::new(RpcListener::new(), "pid", my_pid))
                .route(Route::blocking(RpcListener::new(), "pid_blocking", my_pid_blocking))
                .route(Route::new(RpcListener::new(), "ask", ask))
                .route(Route::blocking(RpcListener::new(), "ask_blocking", ask_blocking))
                .route(Route::blocking(RpcListener::new(), "print", print))
                .route(Route::new(EventListener::new("src", "ping"), "on_ping", on_ping)),
        )
        .context(
            RunnerContext::new(2)
                .route(Route::new(RpcListener::new(), "parent_pid", my_pid))
                .route(Route::new(EventListener::new("tproc-a", "ponged"), "reported", reported)),
        )
        .worker_mode(0, WorkerMode::Process)
        .worker_command(program, args)
        .start()
        .await
        .unwrap();
    let src = source(&hub).await;
    let parent = u64::from(std::process::id());
    let rpc = service.rpc().with_timeout(WAIT);

    let child = pid_of(&rpc.call("tproc-a", "pid", (), ()).await.unwrap());
    assert_ne!(child, parent, "the async RPC handler ran in a child process");
    let blocking = pid_of(&rpc.call("tproc-a", "pid_blocking", (), ()).await.unwrap());
    assert_ne!(blocking, parent, "the blocking RPC handler ran in a child process");
    assert_eq!(pid_of(&rpc.call("tproc-a", "parent_pid", (), ()).await.unwrap()), parent);

    // An event handler in a child, whose Producer goes through the service with its context.
    src.producer().dispatch("ping", &json!(7)).await.unwrap();
    let got = recv(&mut rx).await;
    assert_eq!(got["payload"]["v"], json!(7));
    let pinged = pid_of(&got["payload"]["pid"]);
    assert_ne!(pinged, parent);
    let stack: Vec<String> = serde_json::from_value(got["stack"].clone()).unwrap();
    assert_eq!(stack.len(), 2, "{stack:?}");
    assert!(stack[0].starts_with("tproc-a.on_ping."), "{stack:?}");
    assert!(stack[1].starts_with("tproc-a.reported."), "{stack:?}");

    // An RpcProxy in a child calls back into the parent, from async and blocking handlers.
    let asked = rpc.call("tproc-a", "ask", (), ()).await.unwrap();
    assert_ne!(pid_of(&asked["child"]), parent);
    assert_eq!(pid_of(&asked["parent"]), parent);
    assert_eq!(asked["more"], json!([parent, parent]));
    let asked_blocking = rpc.call("tproc-a", "ask_blocking", (), ()).await.unwrap();
    assert_ne!(pid_of(&asked_blocking["child"]), parent);
    assert_eq!(pid_of(&asked_blocking["parent"]), parent);

    let printed = rpc.call("tproc-a", "print", (json!({"k": [1, 2]}),), ()).await.unwrap();
    assert_eq!(printed, json!({"k": [1, 2]}));
    assert_ne!(pid_of(&rpc.call("tproc-a", "pid", (), ()).await.unwrap()), parent, "still serving");

    assert_eq!(service.stop().await.unwrap().unfinished, 0);
    for pid in [child, blocking, pinged, pid_of(&asked["child"])] {
        assert!(reaped(pid), "worker {pid} was reaped at stop");
    }
    assert_eq!(hub.with(|h| h.broker().unacked_len("evt-src-ping--tproc-a.on_ping")), Some(0));
}

#[tokio::test]
async fn a_worker_that_exits_mid_job_fails_the_job_and_is_replaced() {
    let hub = MemoryHubHandle::new();
    let (tx, mut rx) = mpsc::unbounded_channel();

    async fn fragile(producer: Producer, attempt: Attempt, Payload(v): Payload<Value>) -> Result<(), String> {
        if attempt.retry_count == 0 {
            std::process::exit(3);
        }
        let survived = json!({"v": v, "retry": attempt.retry_count, "error": attempt.last_error});
        producer.dispatch("survived", &survived).await.map_err(|e| e.to_string())
    }
    fn doomed(Payload(_): Payload<Value>) {
        std::process::exit(4);
    }
    async fn doomed_failed(
        producer: Producer,
        Failure(error): Failure,
        Payload(v): Payload<Value>,
    ) -> Result<(), String> {
        let gave_up = json!({"v": v, "error": error.error.message, "pid": std::process::id()});
        producer.dispatch("gave_up", &gave_up).await.map_err(|e| e.to_string())
    }

    let (program, args) = worker_of("a_worker_that_exits_mid_job_fails_the_job_and_is_replaced");
    let service = Runner::with_state(config("tproc-b"), tx)
        .hub(hub.clone())
        .context(
            RunnerContext::new(1)
                .route(Route::new(RpcListener::new(), "pid", my_pid))
                .route(
                    Route::new(EventListener::new("src", "fragile"), "fragile", fragile)
                        .retry(RetryPolicy::fixed(2, Duration::from_millis(10))),
                )
                .route(
                    Route::blocking(EventListener::new("src", "doomed"), "doomed", doomed)
                        .callback(CallbackRoute::new("doomed_failed", doomed_failed)),
                ),
        )
        .context(
            RunnerContext::new(1)
                .route(Route::new(EventListener::new("tproc-b", "survived"), "on_survived", reported))
                .route(Route::new(EventListener::new("tproc-b", "gave_up"), "on_gave_up", reported)),
        )
        .worker_mode(0, WorkerMode::Process)
        .worker_command(program, args)
        .start()
        .await
        .unwrap();
    let src = source(&hub).await;
    let parent = u64::from(std::process::id());
    let rpc = service.rpc().with_timeout(WAIT);
    let first = pid_of(&rpc.call("tproc-b", "pid", (), ()).await.unwrap());

    // The first run kills its worker: the job fails and is retried, on a new worker.
    src.producer().dispatch("fragile", &json!(1)).await.unwrap();
    let got = recv(&mut rx).await["payload"].clone();
    assert_eq!((got["v"].clone(), got["retry"].clone()), (json!(1), json!(1)), "{got}");
    let error = got["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&format!("worker process {first} exited")) && error.contains("exit status: 3"),
        "{error}"
    );
    assert!(reaped(first), "the crashed worker was reaped");

    // No retries: the failure callback runs (in a worker too) with the crash as the error.
    src.producer().dispatch("doomed", &json!(2)).await.unwrap();
    let got = recv(&mut rx).await["payload"].clone();
    assert_eq!(got["v"], json!(2));
    assert!(got["error"].as_str().is_some_and(|e| e.contains("exit status: 4")), "{got}");
    assert_ne!(pid_of(&got["pid"]), parent);

    // A worker killed while idle is replaced before the next job reaches it.
    let idle = pid_of(&rpc.call("tproc-b", "pid", (), ()).await.unwrap());
    let killed = std::process::Command::new("kill").args(["-9", &idle.to_string()]).status().unwrap();
    assert!(killed.success());
    let deadline = tokio::time::Instant::now() + WAIT;
    while !zombie(idle) {
        assert!(tokio::time::Instant::now() < deadline, "worker {idle} did not die");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // And the service keeps serving.
    let later = pid_of(&rpc.call("tproc-b", "pid", (), ()).await.unwrap());
    assert!(later != parent && later != first && later != idle);
    assert!(reaped(idle));
    assert_eq!(service.stop().await.unwrap().unfinished, 0);
    assert!(reaped(later));
    assert_eq!(hub.queue_len("microfw.dlq.evt-src-doomed--tproc-b.doomed"), Some(1));
    assert_eq!(hub.with(|h| h.broker().unacked_len("evt-src-fragile--tproc-b.fragile")), Some(0));
}

#[tokio::test]
async fn workers_are_recycled_after_max_tasks_per_child() {
    let hub = MemoryHubHandle::new();
    let (program, args) = worker_of("workers_are_recycled_after_max_tasks_per_child");
    // WORKER_MODE and MAX_TASKS_PER_CHILD from the config this time.
    let config =
        Config { worker_mode: WorkerMode::Process, max_tasks_per_child: Some(2), ..config("tproc-c") };
    let service = Runner::new(config)
        .hub(hub.clone())
        .context(RunnerContext::new(1).route(Route::new(RpcListener::new(), "pid", my_pid)))
        .worker_command(program, args)
        .start()
        .await
        .unwrap();
    let rpc = service.rpc().with_timeout(WAIT);
    let mut pids = Vec::new();
    for _ in 0..5 {
        pids.push(pid_of(&rpc.call("tproc-c", "pid", (), ()).await.unwrap()));
    }
    assert_eq!(pids[0], pids[1], "{pids:?}");
    assert_eq!(pids[2], pids[3], "{pids:?}");
    assert!(pids[0] != pids[2] && pids[2] != pids[4] && pids[0] != pids[4], "{pids:?}");
    assert!(reaped(pids[0]) && reaped(pids[2]), "retired workers were reaped: {pids:?}");
    assert_eq!(service.stop().await.unwrap().unfinished, 0);
    assert!(reaped(pids[4]));
}

/// Test-process state of the gate the worker's job waits on.
#[derive(Clone)]
struct Gate {
    entered: mpsc::UnboundedSender<()>,
    release: Arc<Mutex<mpsc::UnboundedReceiver<()>>>,
}

#[tokio::test]
async fn stop_waits_for_jobs_running_in_workers() {
    let hub = MemoryHubHandle::new();
    let (entered_tx, mut entered) = mpsc::unbounded_channel();
    let (release, release_rx) = mpsc::unbounded_channel();
    let state = Gate { entered: entered_tx, release: Arc::new(Mutex::new(release_rx)) };

    async fn slow(proxy: RpcProxy) -> Result<Reply<Value>, String> {
        let opened = proxy.call("tproc-d", "gate", (), ()).await.map_err(|e| e.to_string())?;
        Ok(Reply(json!({"pid": std::process::id(), "gate": opened})))
    }
    async fn gate(State(gate): State<Gate>) -> Result<Reply<&'static str>, String> {
        gate.entered.send(()).map_err(|e| e.to_string())?;
        let mut release = gate.release.lock().await;
        timeout(WAIT, release.recv()).await.map_err(|e| e.to_string())?;
        Ok(Reply("open"))
    }

    let (program, args) = worker_of("stop_waits_for_jobs_running_in_workers");
    let service = Runner::with_state(config("tproc-d"), state)
        .hub(hub.clone())
        .context(RunnerContext::new(1).route(Route::new(RpcListener::new(), "slow", slow)))
        .context(RunnerContext::new(1).route(Route::new(RpcListener::new(), "gate", gate)))
        .worker_mode(0, WorkerMode::Process)
        .worker_command(program, args)
        .start()
        .await
        .unwrap();
    // The caller is another service, started after the process-mode one (workers never get here).
    let client = Runner::new(config("tproc-d-client")).hub(hub.clone()).start().await.unwrap();
    let pending = client.rpc().with_timeout(WAIT).call_async("tproc-d", "slow", (), ()).await.unwrap();
    recv(&mut entered).await;
    // The stop begins while the worker's job waits on the gate; it is released afterwards.
    let stopping = tokio::spawn(service.stop());
    let deadline = tokio::time::Instant::now() + WAIT;
    while hub.with(|h| h.broker().consumer_count("rpc-tproc-d")) != Some(0) {
        assert!(tokio::time::Instant::now() < deadline, "the stop did not begin");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    release.send(()).unwrap();
    let report = timeout(WAIT, stopping).await.unwrap().unwrap().unwrap();
    assert_eq!(report.unfinished, 0);
    let reply = timeout(WAIT, pending).await.unwrap().unwrap();
    assert_eq!(reply["gate"], json!("open"));
    let pid = pid_of(&reply["pid"]);
    assert_ne!(pid, u64::from(std::process::id()));
    assert!(reaped(pid), "the worker was reaped at stop");
    client.stop().await.unwrap();
}

#[tokio::test]
async fn workers_still_running_at_the_shutdown_timeout_are_killed() {
    let hub = MemoryHubHandle::new();
    let (tx, mut rx) = mpsc::unbounded_channel();

    fn stuck(producer: Producer, Payload(_): Payload<Value>) -> Result<(), String> {
        producer.dispatch_blocking("stuck", &std::process::id()).map_err(|e| e.to_string())?;
        loop {
            std::thread::park();
        }
    }

    let (program, args) = worker_of("workers_still_running_at_the_shutdown_timeout_are_killed");
    let config = Config { shutdown_timeout: Duration::from_millis(200), ..config("tproc-e") };
    let service = Runner::with_state(config, tx)
        .hub(hub.clone())
        .context(RunnerContext::new(1).route(Route::blocking(
            EventListener::new("src", "work"),
            "stuck",
            stuck,
        )))
        .context(RunnerContext::new(1).route(Route::new(
            EventListener::new("tproc-e", "stuck"),
            "on_stuck",
            reported,
        )))
        .worker_mode(0, WorkerMode::Process)
        .worker_command(program, args)
        .start()
        .await
        .unwrap();
    let src = source(&hub).await;
    src.producer().dispatch("work", &json!(1)).await.unwrap();
    let pid = pid_of(&recv(&mut rx).await["payload"]);
    assert_eq!(service.stop().await.unwrap().unfinished, 1);
    // Killed and reaped by its slot thread, after the stop returned.
    let deadline = tokio::time::Instant::now() + WAIT;
    while !reaped(pid) {
        assert!(tokio::time::Instant::now() < deadline, "worker {pid} still there");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The abandoned delivery went back to its queue.
    assert_eq!(hub.queue_len("evt-src-work--tproc-e.stuck"), Some(1));
}

#[tokio::test]
async fn a_worker_command_that_never_serves_fails_the_start() {
    let start = |program: &'static str| async move {
        Runner::new(config("tproc-f"))
            .hub(MemoryHubHandle::new())
            .context(RunnerContext::new(2).route(Route::new(RpcListener::new(), "pid", my_pid)))
            .worker_mode(0, WorkerMode::Process)
            .worker_command(program, Vec::<String>::new())
            .start()
            .await
            .map(drop)
    };
    let Err(StartError::WorkerProcess(e)) = start("true").await else { panic!("started") };
    assert!(e.contains("exited before it was ready") && e.contains("exit status: 0"), "{e}");
    let Err(StartError::WorkerProcess(e)) = start("/nonexistent/program").await else { panic!("started") };
    assert!(e.contains("cannot run /nonexistent/program"), "{e}");
}

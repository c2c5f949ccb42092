//! The process-pool machinery of `process` worker mode, shared by both microfw runtimes.
//!
//! This crate's [`Runner`](crate::Runner) and `microfw-runtime-tokio`'s both run `process`
//! contexts with this module: it is plain OS threads, [`std::process`] and Unix sockets, so it
//! needs no async runtime. Each runtime supplies only what differs between them: how an
//! outcome or a client request reaches its driver ([`DriverPort`]), and on the worker's side
//! where its handlers' client requests come from ([`RequestSource`]) and how a job runs (a
//! closure given to [`WorkerConnection::serve`]). It is not meant for other callers; its API
//! follows the runtimes' needs.
//!
//! # The service's side: [`ProcessPool`]
//!
//! Each of the context's `max_workers` slots is a thread owning one child process at a time,
//! running one job at a time on it. The child is the command of a [`Spawner`] (by default the
//! service's own program, [`WorkerCommand::current`]), started with [`WORKER_ENV`] naming the
//! service and context; its standard input is one end of a Unix socket pair (the other end
//! stays here), over which both sides exchange length-prefixed JSON frames
//! ([`microfw_core::worker_wire`]). Its standard output and error are this process's, so a
//! handler printing does not disturb the frames.
//!
//! Per child, a reader thread reads its frames: outcomes go to the slot, and the requests of
//! its handlers' clients (events, RPC calls) go to the driver ([`DriverPort::emit`],
//! [`DriverPort::call`]) as if a handler of this process had sent them, carrying the child's
//! worker context; a responder thread (started on the first request) waits for each
//! [`Answer`] and writes it back, in request order.
//!
//! Every job submitted gets exactly one [`JobDone`] sent to the driver
//! ([`DriverPort::finished`]), unless the driver is gone. A child that exits or sends a bad
//! frame mid-job fails that job with [`Outcome::Panicked`] (the retry policy decides what
//! follows); the child is reaped and a new one started. After `MAX_TASKS_PER_CHILD` jobs
//! ([`Spawner::max_tasks`]) a child is retired: its socket is shut for writing, it exits at
//! end of input, and it is reaped (killed if it has not exited within [`EXIT_TIMEOUT`]).
//! [`ProcessPool::close`] closes the pool the same way; [`ProcessPool::abandon`] kills the
//! children of runs the shutdown timeout abandoned. No child is ever left a zombie.
//!
//! # The worker's side: [`WorkerConnection`]
//!
//! What a runtime's `Runner::start` does instead of starting the service when [`WORKER_ENV`]
//! names it ([`worker_target`]): the worker rebuilt the same service (route ids are stable),
//! so it serves jobs for the named context on the socket it got as standard input. It says
//! hello, then runs each job it reads, one at a time, and writes its outcome back. Its
//! handlers' clients send their commands to the service as request frames and wait for the
//! answer frames. When the socket closes (the service retires the worker or stops, or died)
//! it finishes the job in hand and exits the process. SIGINT and SIGTERM are ignored: the
//! service decides when its workers end.
//!
//! # What it does NOT do
//!
//! It decides nothing about retries, acks or deadlines (the Engine does, from the outcomes);
//! it does not bound a child's memory or run time (a job runs until its handler returns or
//! the child dies); it does not run on non-Unix platforms.

mod child;

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use microfw_core::extract::Job;
use microfw_core::worker_wire::{self, FromWorker, PREFIX_LEN, ToWorker, WorkerHello, WorkerTarget};
use microfw_core::{
    CallError, ContextId, DispatchId, HandlerError, Outcome, OutgoingCall, OutgoingEvent, PublishError,
    RouteId, ServiceSpec,
};
use serde_json::Value;

use crate::chan::{self, Receiver, SyncSender};

pub use child::{Reply, Request, RequestSource, WorkerConnection, WorkerError, worker_target};
pub use microfw_core::worker_wire::WORKER_ENV;

/// One job for a process pool: a dispatch the driver hands to the context.
#[derive(Debug)]
pub struct ProcessJob {
    /// The dispatch, named again in its [`JobDone`].
    pub id: DispatchId,
    /// Its route.
    pub route: RouteId,
    /// What the worker process runs (its extensions are not sent: the worker adds its own).
    pub job: Job,
    /// When the driver handed it over: [`JobDone::elapsed`] counts from here.
    pub dispatched: std::time::Instant,
}

/// A job that ended, as a slot reports it to the driver.
#[derive(Debug)]
pub struct JobDone {
    /// The dispatch of the [`ProcessJob`].
    pub id: DispatchId,
    /// Its route.
    pub route: RouteId,
    /// The handler's outcome, or [`Outcome::Panicked`] when the worker process could not run
    /// it (it died, sent a bad frame, or could not be started).
    pub outcome: Outcome,
    /// From [`ProcessJob::dispatched`] to the outcome.
    pub elapsed: Duration,
}

/// The driver stopped reading: [`DriverPort::finished`] could not deliver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the driver is gone")]
pub struct DriverGone;

/// An answer the driver will give: [`wait`](Self::wait) blocks the calling (non-async)
/// thread until it comes.
pub struct Answer<T>(Box<dyn FnOnce() -> Option<T> + Send>);

impl<T> Answer<T> {
    /// An answer `wait` blocks for: it returns `None` when the driver dropped the request
    /// without answering (it is stopping).
    pub fn new(wait: impl FnOnce() -> Option<T> + Send + 'static) -> Self {
        Answer(Box::new(wait))
    }

    /// Blocks until the answer comes; `None` if the driver dropped the request.
    pub fn wait(self) -> Option<T> {
        (self.0)()
    }
}

impl<T> std::fmt::Debug for Answer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Answer")
    }
}

/// How a process pool reaches its runtime's driver: what differs between the runtimes.
///
/// Every method is called from the pool's own OS threads (never from an async context), so
/// it may block; a bounded driver channel therefore gives back-pressure. None of them may
/// panic.
pub trait DriverPort: Clone + Send + 'static {
    /// Hands a job's end to the driver (blocking while its channel is full). `Err` once the
    /// driver is gone: the slot then stops taking jobs.
    fn finished(&self, done: JobDone) -> Result<(), DriverGone>;

    /// Publishes a worker handler's event as this service; the answer is the broker's
    /// confirm. A driver that is gone answers `None` (the worker sees a stop).
    fn emit(&self, event: OutgoingEvent) -> Answer<Result<(), PublishError>>;

    /// Makes a worker handler's RPC call as this service; the answer is its result. A driver
    /// that is gone answers `None` (the worker sees [`CallError::ShuttingDown`]).
    fn call(&self, call: OutgoingCall) -> Answer<Result<Value, CallError>>;
}

/// Why a [`ProcessPool`] did not start (every child it did start was stopped and reaped).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PoolStartError(pub String);

/// How long a new child may take to start and say hello.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a child may take to exit once its input is closed, before it is killed.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(5);

/// The command worker processes are started with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerCommand {
    /// The program.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
}

impl WorkerCommand {
    /// This process's executable and arguments.
    pub fn current() -> io::Result<Self> {
        Ok(WorkerCommand { program: std::env::current_exe()?, args: std::env::args_os().skip(1).collect() })
    }
}

/// What a context's slots need to start and check their children.
#[derive(Debug, Clone)]
pub struct Spawner {
    /// The command children run.
    pub command: WorkerCommand,
    /// What they serve (set as [`WORKER_ENV`]).
    pub target: WorkerTarget,
    /// The hello a good child sends (its pid aside): one that differs is refused.
    pub hello: WorkerHello,
    /// Jobs per child before it is replaced (`MAX_TASKS_PER_CHILD`; `None`: never).
    pub max_tasks: Option<u32>,
}

impl Spawner {
    /// The spawner for context `context` of `spec`: children run `command`, or this program
    /// with its own arguments ([`WorkerCommand::current`], whose error this returns) when
    /// `None`.
    pub fn for_context(
        spec: &ServiceSpec,
        context: ContextId,
        command: Option<WorkerCommand>,
        max_tasks: Option<u32>,
    ) -> io::Result<Self> {
        let command = match command {
            Some(command) => command,
            None => WorkerCommand::current()?,
        };
        Ok(Spawner {
            command,
            target: WorkerTarget { service: spec.name.to_string(), context },
            hello: WorkerHello::new(spec, context, 0),
            max_tasks,
        })
    }
}

/// A context's pool of worker processes: `size` slot threads, each owning one child.
pub struct ProcessPool {
    jobs: Option<SyncSender<ProcessJob>>,
    threads: Vec<JoinHandle<()>>,
    children: Children,
}

impl ProcessPool {
    /// Starts `size` slots (at least one, threads named `<name>-<i>`), each with a ready
    /// child, and returns once every child said hello, or with the first failure, having
    /// stopped and reaped every child. Blocks for up to [`READY_TIMEOUT`] and more: call it
    /// off any async reactor.
    pub fn start<P: DriverPort>(
        size: u32,
        name: &str,
        spawner: Spawner,
        port: &P,
    ) -> Result<Self, PoolStartError> {
        let spawner = Arc::new(spawner);
        let (jobs_tx, jobs_rx) = chan::channel::<ProcessJob>();
        let (ready_tx, ready_rx) = chan::channel::<Result<(), String>>();
        let mut threads = Vec::new();
        let mut children = Children::default();
        for i in 0..size.max(1) {
            let cell = ChildCell::default();
            children.cells.push(cell.clone());
            let slot = Slot {
                closing: children.closing.clone(),
                spawner: spawner.clone(),
                jobs: jobs_rx.clone(),
                port: port.clone(),
                cell,
                name: format!("{name}-{i}"),
            };
            let ready = ready_tx.clone();
            match std::thread::Builder::new().name(format!("{name}-{i}")).spawn(move || slot.run(&ready)) {
                Ok(t) => threads.push(t),
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("cannot start a slot thread: {e}")));
                    break;
                }
            }
        }
        drop(ready_tx);
        let mut pool = ProcessPool { jobs: Some(jobs_tx), threads, children };
        let mut failure = None;
        for _ in 0..size.max(1) {
            // Each slot answers within its child's ready timeout; a slot thread that died
            // without answering disconnects the channel once the others answered.
            match ready_rx.recv_timeout(READY_TIMEOUT + EXIT_TIMEOUT) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    failure.get_or_insert(e);
                }
                Err(_) => {
                    failure.get_or_insert_with(|| "a worker slot did not report".to_owned());
                    break;
                }
            }
        }
        match failure {
            None => Ok(pool),
            Some(e) => {
                // The slots whose children did start retire them.
                for t in pool.close() {
                    let _ = t.join();
                }
                Err(PoolStartError(e))
            }
        }
    }

    /// Queues a job for the next free slot. `Err` gives its id back if every slot is gone
    /// (the job is dropped; no [`JobDone`] comes for it).
    pub fn submit(&self, job: ProcessJob) -> Result<(), DispatchId> {
        let id = job.id;
        match &self.jobs {
            Some(tx) => tx.send(job).map_err(|_| id),
            None => Err(id),
        }
    }

    /// Kills every child (for runs the shutdown timeout abandoned); their slots reap them
    /// and report those runs as [`Outcome::Panicked`] (if the driver still listens). No
    /// replacement children start afterwards.
    pub fn abandon(&self) {
        self.children.kill();
    }

    /// Closes the queue: each slot finishes its job in hand, retires its child (see the
    /// module docs) and ends. Returns the slot threads for joining (a join waits for the jobs
    /// in hand). Does not wait itself.
    pub fn close(&mut self) -> Vec<JoinHandle<()>> {
        self.children.closing();
        self.jobs = None;
        std::mem::take(&mut self.threads)
    }
}

impl std::fmt::Debug for ProcessPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessPool").field("slots", &self.threads.len()).finish()
    }
}

/// The child processes of a pool's slots, so [`ProcessPool::abandon`] can kill them, and
/// whether the pool is closing (no replacement children then).
#[derive(Clone, Default, Debug)]
struct Children {
    cells: Vec<ChildCell>,
    closing: Arc<AtomicBool>,
}

impl Children {
    /// The pool is closing: slots start no more children.
    fn closing(&self) {
        self.closing.store(true, Ordering::SeqCst);
    }

    /// Kills every child (their slots reap them).
    fn kill(&self) {
        self.closing();
        for cell in &self.cells {
            if let Some(child) = cell.lock().as_mut() {
                let _ = child.kill();
            }
        }
    }
}

/// The child process a slot currently runs. Never held while waiting (a kill never waits for
/// a run).
#[derive(Clone, Default, Debug)]
struct ChildCell(Arc<Mutex<Option<Child>>>);

impl ChildCell {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Slot<P> {
    closing: Arc<AtomicBool>,
    spawner: Arc<Spawner>,
    jobs: Receiver<ProcessJob>,
    port: P,
    cell: ChildCell,
    name: String,
}

impl<P: DriverPort> Slot<P> {
    fn run(self, ready: &SyncSender<Result<(), String>>) {
        let mut worker = match Worker::spawn(&self.spawner, &self.cell, &self.port, &self.name) {
            Ok(w) => {
                let _ = ready.send(Ok(()));
                Some(w)
            }
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        while let Ok(ProcessJob { id, route, job, dispatched }) = self.jobs.recv() {
            // A child that died while idle is replaced before it gets the job.
            if let Some(reason) = worker.as_ref().and_then(|w| w.gone(&self.cell)) {
                let status = kill_and_reap(&self.cell);
                tracing::warn!(worker = %self.name, "an idle worker process ended ({status}): {reason}");
                worker = None;
            }
            if worker.is_none() {
                match Worker::spawn(&self.spawner, &self.cell, &self.port, &self.name) {
                    Ok(w) => worker = Some(w),
                    Err(e) => {
                        let outcome = Outcome::Panicked(format!("cannot start a worker process: {e}"));
                        let done = JobDone { id, route, outcome, elapsed: dispatched.elapsed() };
                        if self.port.finished(done).is_err() {
                            return;
                        }
                        continue;
                    }
                }
            }
            let Some(mut current) = worker.take() else { continue };
            let outcome = match current.run(job) {
                Ok(outcome) => {
                    worker = Some(current);
                    outcome
                }
                Err(reason) => {
                    let status = current.reap(&self.cell);
                    let message =
                        format!("worker process {} exited during the run ({status}): {reason}", current.pid);
                    tracing::warn!(worker = %self.name, "{message}");
                    Outcome::Panicked(message)
                }
            };
            let done = JobDone { id, route, outcome, elapsed: dispatched.elapsed() };
            let driver_gone = self.port.finished(done).is_err();
            let spent =
                worker.as_ref().is_some_and(|w| self.spawner.max_tasks.is_some_and(|max| w.tasks >= max));
            if spent && let Some(old) = worker.take() {
                tracing::debug!(worker = %self.name, pid = old.pid, tasks = old.tasks, "recycling a worker process");
                old.retire(&self.cell);
            }
            if driver_gone {
                break;
            }
            if worker.is_none() && !self.closing.load(Ordering::SeqCst) {
                // The replacement starts now, not when the next job is already waiting.
                match Worker::spawn(&self.spawner, &self.cell, &self.port, &self.name) {
                    Ok(w) => worker = Some(w),
                    Err(e) => tracing::warn!(worker = %self.name, "cannot start a worker process: {e}"),
                }
            }
        }
        if let Some(w) = worker {
            w.retire(&self.cell);
        }
    }
}

/// What a child's reader thread reports to its slot.
enum Event {
    Frame(FromWorker),
    /// The child closed its socket, or sent something that is not a frame.
    Closed(String),
}

/// One child process, from its slot's point of view.
struct Worker {
    pid: u32,
    writer: Arc<Mutex<UnixStream>>,
    events: Receiver<Event>,
    tasks: u32,
}

impl Worker {
    /// Starts a child and waits for its hello.
    fn spawn<P: DriverPort>(
        spawner: &Spawner,
        cell: &ChildCell,
        port: &P,
        name: &str,
    ) -> Result<Self, String> {
        let (ours, theirs) = UnixStream::pair().map_err(|e| format!("socket pair: {e}"))?;
        let child = Command::new(&spawner.command.program)
            .args(&spawner.command.args)
            .env(WORKER_ENV, spawner.target.to_string())
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", spawner.command.program.display()))?;
        // The Command (and our copy of the child's end) is gone: the child's exit closes the
        // socket.
        let pid = child.id();
        *cell.lock() = Some(child);
        let started = (|| {
            let reader = ours.try_clone()?;
            let writer = Arc::new(Mutex::new(ours));
            let (events_tx, events) = chan::channel();
            let relay =
                Relay { port: port.clone(), writer: writer.clone(), responder: None, name: name.to_owned() };
            std::thread::Builder::new()
                .name(format!("{name}-read"))
                .spawn(move || read_frames(reader, &events_tx, relay))?;
            io::Result::Ok(Worker { pid, writer, events, tasks: 0 })
        })();
        let worker = match started {
            Ok(w) => w,
            Err(e) => {
                kill_and_reap(cell);
                return Err(format!("cannot watch worker process {pid}: {e}"));
            }
        };
        match worker.events.recv_timeout(READY_TIMEOUT) {
            Ok(Event::Frame(FromWorker::Hello(hello))) if hello.same_service(&spawner.hello) => {
                tracing::debug!(worker = name, pid, "worker process ready");
                Ok(worker)
            }
            Ok(Event::Frame(FromWorker::Hello(hello))) => {
                worker.reap(cell);
                Err(format!(
                    "worker process {pid} built service {:?} context {} with routes {:?}, expected {:?} context {} \
                     with routes {:?} (check the worker command)",
                    hello.service,
                    hello.context,
                    hello.routes,
                    spawner.hello.service,
                    spawner.hello.context,
                    spawner.hello.routes
                ))
            }
            Ok(Event::Frame(_)) => {
                let status = worker.reap(cell);
                Err(format!("worker process {pid} did not start with a hello ({status})"))
            }
            Ok(Event::Closed(reason)) => {
                let status = worker.reap(cell);
                Err(format!(
                    "worker process {pid} exited before it was ready ({status}): {reason}; it must reach \
                     Runner::start for service {:?} (see Runner::worker_command)",
                    spawner.target.service
                ))
            }
            Err(_) => {
                worker.reap(cell);
                Err(format!("worker process {pid} was not ready within {READY_TIMEOUT:?}"))
            }
        }
    }

    /// Runs one job: `Ok` with its outcome, or `Err` with why the child is gone or broken
    /// (the caller reaps it).
    fn run(&mut self, job: Job) -> Result<Outcome, String> {
        let dispatch = job.parts.dispatch;
        let frame = match worker_wire::encode_to_worker(&ToWorker::Job(job)) {
            Ok(frame) => frame,
            // The same job would fail the same way: not retryable.
            Err(e) => {
                return Ok(Outcome::Failed(
                    HandlerError::fatal("WorkerFrameError", e.to_string()).in_module("microfw"),
                ));
            }
        };
        if let Err(e) = lock(&self.writer).write_all(&frame) {
            return Err(format!("cannot send the job: {e}"));
        }
        match self.events.recv() {
            Ok(Event::Frame(FromWorker::Outcome { dispatch: d, outcome })) if d == dispatch => {
                self.tasks += 1;
                Ok(outcome)
            }
            Ok(Event::Frame(other)) => Err(format!("unexpected frame {other:?}")),
            Ok(Event::Closed(reason)) => Err(reason),
            Err(_) => Err("its reader thread ended".into()),
        }
    }

    /// Why the child is gone, if it has exited or its reader reported anything while it was
    /// idle (an idle child has nothing to say).
    fn gone(&self, cell: &ChildCell) -> Option<String> {
        match self.events.try_recv() {
            Ok(Event::Closed(reason)) => return Some(reason),
            Ok(Event::Frame(frame)) => return Some(format!("unexpected frame {frame:?}")),
            Err(TryRecvError::Disconnected) => return Some("its reader thread ended".into()),
            Err(TryRecvError::Empty) => {}
        }
        match cell.lock().as_mut().map(Child::try_wait) {
            Some(Ok(None)) => None,
            Some(Ok(Some(_))) => Some("it exited".into()),
            Some(Err(e)) => Some(format!("cannot check it: {e}")),
            None => Some("it was reaped".into()),
        }
    }

    /// Closes the child's input so it exits, waits for that (killing it after
    /// [`EXIT_TIMEOUT`]) and reaps it.
    fn retire(self, cell: &ChildCell) {
        let _ = lock(&self.writer).shutdown(Shutdown::Write);
        // Its socket closes when it exits; anything else it still says is of no use now.
        let exited = loop {
            match self.events.recv_timeout(EXIT_TIMEOUT) {
                Ok(Event::Closed(_)) | Err(RecvTimeoutError::Disconnected) => break true,
                Ok(Event::Frame(_)) => {}
                Err(RecvTimeoutError::Timeout) => break false,
            }
        };
        if !exited {
            tracing::warn!(pid = self.pid, "worker process did not exit within {EXIT_TIMEOUT:?}; killing it");
        }
        kill_and_reap(cell);
    }

    /// Kills the child (it may still run after a bad frame), reaps it, and describes how it
    /// ended.
    fn reap(&self, cell: &ChildCell) -> String {
        kill_and_reap(cell)
    }
}

/// Kills the cell's child if it still runs, waits for it (no zombie) and empties the cell.
fn kill_and_reap(cell: &ChildCell) -> String {
    let Some(mut child) = cell.lock().take() else { return "already reaped".into() };
    let status = match child.try_wait() {
        Ok(Some(status)) => Ok(status),
        _ => {
            let _ = child.kill();
            child.wait()
        }
    };
    match status {
        Ok(status) => status.to_string(),
        Err(e) => format!("cannot wait for it: {e}"),
    }
}

/// Sends the client requests of a child's handlers to the driver and their answers back.
struct Relay<P> {
    port: P,
    writer: Arc<Mutex<UnixStream>>,
    /// Answers to wait for, in request order; the responder thread starts on the first.
    responder: Option<SyncSender<Awaiting>>,
    name: String,
}

enum Awaiting {
    Emit(u64, Answer<Result<(), PublishError>>),
    Call(u64, Answer<Result<Value, CallError>>),
}

impl<P: DriverPort> Relay<P> {
    fn request(&mut self, frame: FromWorker) -> Result<(), String> {
        let awaiting = match frame {
            // A driver that is gone answers `None`: a stop.
            FromWorker::Emit { request, event } => Awaiting::Emit(request, self.port.emit(event)),
            FromWorker::Call { request, call } => Awaiting::Call(request, self.port.call(call)),
            other => return Err(format!("unexpected frame {other:?}")),
        };
        if self.responder.is_none() {
            let (tx, rx) = chan::channel::<Awaiting>();
            let writer = self.writer.clone();
            std::thread::Builder::new()
                .name(format!("{}-answer", self.name))
                .spawn(move || answer(&rx, &writer))
                .map_err(|e| format!("cannot start a responder thread: {e}"))?;
            self.responder = Some(tx);
        }
        if let Some(responder) = &self.responder {
            let _ = responder.send(awaiting);
        }
        Ok(())
    }
}

/// Writes each answer back to the child as it comes, in request order. Every answer comes:
/// the Engine confirms every event and resolves every call (at its deadline at the latest),
/// and a stopping driver drops the senders.
fn answer(awaiting: &Receiver<Awaiting>, writer: &Mutex<UnixStream>) {
    while let Ok(next) = awaiting.recv() {
        let frame = match next {
            Awaiting::Emit(request, answer) => ToWorker::Emitted { request, result: answer.wait() },
            Awaiting::Call(request, answer) => {
                ToWorker::Called { request, result: answer.wait().unwrap_or(Err(CallError::ShuttingDown)) }
            }
        };
        // A child that is gone needs no answer.
        if let Ok(bytes) = worker_wire::encode_to_worker(&frame) {
            let _ = lock(writer).write_all(&bytes);
        }
    }
}

/// A child's reader thread: until its socket closes, relays its requests and hands every
/// other frame to the slot.
fn read_frames<P: DriverPort>(mut reader: UnixStream, events: &SyncSender<Event>, mut relay: Relay<P>) {
    let closed = loop {
        let frame = match read_frame(&mut reader) {
            Ok(Some(body)) => worker_wire::decode_from_worker(&body).map_err(|e| e.to_string()),
            Ok(None) => break "it closed its socket".to_owned(),
            Err(e) => break format!("reading its socket: {e}"),
        };
        let result = match frame {
            Ok(frame @ (FromWorker::Emit { .. } | FromWorker::Call { .. })) => relay.request(frame),
            Ok(frame) => events.send(Event::Frame(frame)).map_err(|_| "its slot is gone".to_owned()),
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            break e;
        }
    };
    let _ = events.send(Event::Closed(closed));
}

/// Reads one frame body; `None` at a clean end of stream (between frames).
fn read_frame(reader: &mut impl Read) -> io::Result<Option<Vec<u8>>> {
    let mut prefix = [0u8; PREFIX_LEN];
    let mut filled = 0;
    while filled < PREFIX_LEN {
        match reader.read(&mut prefix[filled..]) {
            Ok(0) if filled == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let len = worker_wire::body_len(prefix).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let mut body = vec![0; len];
    reader.read_exact(&mut body)?;
    Ok(Some(body))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

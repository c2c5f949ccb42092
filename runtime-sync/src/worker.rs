//! `process` worker mode, the worker's side: what [`Runner::start`](crate::Runner::start)
//! does instead of starting the service when [`WORKER_ENV`] names it.
//!
//! The worker rebuilt the same service (route ids are stable), so it serves jobs for the named
//! context on the socket it got as standard input: it says hello, then runs each job it reads
//! on the calling thread, one at a time, and writes its outcome back. Its handlers' clients
//! ([`Producer`](crate::Producer), [`RpcProxy`](crate::RpcProxy)) send their commands to the
//! service as request frames and wait for the answer frames. When the socket closes (the
//! service retires the worker or stops, or died) it finishes the job in hand and exits the
//! process. SIGINT and SIGTERM are ignored: the service decides when its workers end.

use std::collections::HashMap;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use microfw_core::extract::{Extensions, Job};
use microfw_core::worker_wire::{self, FromWorker, ToWorker, WORKER_ENV, WorkerHello, WorkerTarget};
use microfw_core::{CallError, Dialect, HandlerError, HandlerTable, Outcome, PublishError, ServiceSpec};
use serde_json::Value;

use crate::chan::{self, Receiver, SyncSender};
use crate::client::ServiceHandle;
use crate::driver::{self, Input};
use crate::process::{lock, read_frame};
use crate::runner::StartError;

/// Client commands a worker's handlers may have waiting at once before they block.
const REQUEST_CAPACITY: usize = 256;

/// The worker target in the environment, if this process is a worker.
pub(crate) fn target() -> Result<Option<WorkerTarget>, StartError> {
    let Some(value) = std::env::var_os(WORKER_ENV) else { return Ok(None) };
    let value =
        value.to_str().ok_or_else(|| StartError::WorkerProcess(format!("{WORKER_ENV} is not UTF-8")))?;
    value.parse().map(Some).map_err(|e: worker_wire::WireError| StartError::WorkerProcess(e.to_string()))
}

/// Serves jobs for `target` until the service closes the socket, then exits the process.
/// Returns only if this process cannot serve `target` for this service.
pub(crate) fn serve<S: Clone + Send + Sync + 'static>(
    target: &WorkerTarget,
    spec: &ServiceSpec,
    table: &HandlerTable<S>,
    dialect: Dialect,
) -> StartError {
    if *target.service != *spec.name {
        return StartError::WorkerOfAnotherService {
            worker_of: target.to_string(),
            service: spec.name.to_string(),
        };
    }
    if target.context.into_raw() as usize >= spec.contexts.len() {
        return StartError::WorkerProcess(format!(
            "{WORKER_ENV}={target}, but service {:?} has {} contexts",
            spec.name,
            spec.contexts.len()
        ));
    }
    let stream = match std::io::stdin().as_fd().try_clone_to_owned().map(UnixStream::from) {
        Ok(s) if s.peer_addr().is_ok() => s,
        _ => {
            return StartError::WorkerProcess(format!(
                "{WORKER_ENV} is set, but standard input is not a worker socket: this process was not \
                 started by a microfw service"
            ));
        }
    };
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let _ = signal_hook::flag::register(signal, Arc::new(AtomicBool::new(false)));
    }
    let hello = WorkerHello::new(spec, target.context, std::process::id());
    let code = match run(stream, hello, table, spec.name.clone(), dialect) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(service = %spec.name, "worker process {}: {e}", std::process::id());
            eprintln!("microfw worker process {} of {target}: {e}", std::process::id());
            1
        }
    };
    std::process::exit(code)
}

/// A client command waiting for the service's answer.
enum Pending {
    Emit(SyncSender<Result<(), PublishError>>),
    Call(SyncSender<Result<Value, CallError>>),
}

type PendingMap = Arc<Mutex<HashMap<u64, Pending>>>;

fn run<S: Clone + Send + Sync + 'static>(
    stream: UnixStream,
    hello: WorkerHello,
    table: &HandlerTable<S>,
    service: Arc<str>,
    dialect: Dialect,
) -> io::Result<()> {
    let writer = Arc::new(Mutex::new(stream.try_clone()?));
    write(&writer, &FromWorker::Hello(hello))?;
    let pending = PendingMap::default();

    // The handlers' clients send to this channel as they would to a driver.
    let (tx, rx) = driver::channel(REQUEST_CAPACITY);
    let mut extensions = Extensions::new();
    extensions.insert(ServiceHandle { tx, service, dialect });
    {
        let (writer, pending) = (writer.clone(), pending.clone());
        std::thread::Builder::new()
            .name("microfw-worker-relay".into())
            .spawn(move || relay(&rx, &writer, &pending))?;
    }
    let (jobs_tx, jobs) = chan::channel::<Job>();
    {
        let pending = pending.clone();
        std::thread::Builder::new()
            .name("microfw-worker-read".into())
            .spawn(move || read(stream, &jobs_tx, &pending))?;
    }

    // Ends when the reader drops its sender: the socket closed.
    while let Ok(mut job) = jobs.recv() {
        let (dispatch, route) = (job.parts.dispatch, job.parts.route);
        job.parts.extensions = extensions.clone();
        let outcome = match table.handler(route) {
            // call_blocking catches a panic and makes it Outcome::Panicked.
            Some(handler) => handler
                .call_blocking(job, table.state().clone())
                .unwrap_or_else(|| Outcome::Panicked("an async handler cannot run here".into())),
            None => Outcome::Panicked(format!("no handler for route {route} in the worker process")),
        };
        let frame = FromWorker::Outcome { dispatch, outcome };
        let frame = match worker_wire::encode_from_worker(&frame) {
            Ok(frame) => frame,
            // Too large to send: the same run would fail the same way.
            Err(e) => {
                let failed = HandlerError::fatal("WorkerFrameError", e.to_string()).in_module("microfw");
                let frame = FromWorker::Outcome { dispatch, outcome: Outcome::Failed(failed) };
                worker_wire::encode_from_worker(&frame)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
            }
        };
        if let Err(e) = lock(&writer).write_all(&frame) {
            // The service is gone: nobody wants the outcome.
            return if e.kind() == io::ErrorKind::BrokenPipe { Ok(()) } else { Err(e) };
        }
    }
    Ok(())
}

/// Turns the handlers' client commands into request frames.
fn relay(rx: &Receiver<Input>, writer: &Mutex<UnixStream>, pending: &Mutex<HashMap<u64, Pending>>) {
    let mut next = 0u64;
    while let Ok(input) = rx.recv() {
        next += 1;
        let request = next;
        let frame = match input {
            Input::Emit(event, reply) => {
                lock(pending).insert(request, Pending::Emit(reply));
                FromWorker::Emit { request, event }
            }
            Input::Call(call, reply) => {
                lock(pending).insert(request, Pending::Call(reply));
                FromWorker::Call { request, call }
            }
            Input::Outcome(_) | Input::Wake | Input::Shutdown => continue,
        };
        if write(writer, &frame).is_err() {
            // The service is gone: the waiter sees its sender dropped (ShuttingDown).
            lock(pending).remove(&request);
        }
    }
}

/// Reads the service's frames: jobs for the main loop, answers for the waiting clients.
fn read(mut stream: UnixStream, jobs: &SyncSender<Job>, pending: &Mutex<HashMap<u64, Pending>>) {
    loop {
        let frame = match read_frame(&mut stream) {
            Ok(Some(body)) => worker_wire::decode_to_worker(&body),
            Ok(None) => break,
            Err(e) => {
                tracing::warn!("worker process {}: reading the service's socket: {e}", std::process::id());
                break;
            }
        };
        match frame {
            Ok(ToWorker::Job(job)) => {
                if jobs.send(job).is_err() {
                    break;
                }
            }
            Ok(ToWorker::Emitted { request, result }) => {
                if let (Some(Pending::Emit(reply)), Some(result)) = (lock(pending).remove(&request), result) {
                    let _ = reply.try_send(result);
                }
            }
            Ok(ToWorker::Called { request, result }) => {
                if let Some(Pending::Call(reply)) = lock(pending).remove(&request) {
                    let _ = reply.try_send(result);
                }
            }
            Err(e) => {
                tracing::warn!("worker process {}: {e}", std::process::id());
                break;
            }
        }
    }
    // Clients still waiting see their sender dropped: ShuttingDown.
    lock(pending).clear();
}

fn write(writer: &Mutex<UnixStream>, frame: &FromWorker) -> io::Result<()> {
    let bytes =
        worker_wire::encode_from_worker(frame).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    lock(writer).write_all(&bytes)
}

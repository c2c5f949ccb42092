//! The worker's side of `process` mode (see the parent module's docs).

use std::collections::HashMap;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use microfw_core::extract::Job;
use microfw_core::worker_wire::{self, FromWorker, ToWorker, WORKER_ENV, WorkerHello, WorkerTarget};
use microfw_core::{
    CallError, HandlerError, Outcome, OutgoingCall, OutgoingEvent, PublishError, ServiceSpec,
};
use serde_json::Value;

use super::{lock, read_frame};
use crate::chan::{self, SyncSender};

/// Why this process cannot serve as a worker.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkerError {
    /// [`WORKER_ENV`] names another service: this program builds `service`, the parent
    /// wanted `worker_of`.
    #[error("this process is a worker of {worker_of} ({WORKER_ENV}); it does not start service {service:?}")]
    OfAnotherService {
        /// The target in [`WORKER_ENV`].
        worker_of: String,
        /// The service this program built.
        service: String,
    },
    /// A bad [`WORKER_ENV`] value, a context the service does not have, or standard input
    /// that is not a worker socket.
    #[error("{0}")]
    Setup(String),
}

/// The worker target in the environment ([`WORKER_ENV`]), if this process is a worker.
pub fn worker_target() -> Result<Option<WorkerTarget>, WorkerError> {
    let Some(value) = std::env::var_os(WORKER_ENV) else { return Ok(None) };
    let value = value.to_str().ok_or_else(|| WorkerError::Setup(format!("{WORKER_ENV} is not UTF-8")))?;
    value.parse().map(Some).map_err(|e: worker_wire::WireError| WorkerError::Setup(e.to_string()))
}

/// A client request of a worker's handlers, to send to the service.
#[derive(Debug)]
pub enum Request {
    /// Publish an event; the reply is the broker's confirm.
    Emit(OutgoingEvent, Reply<Result<(), PublishError>>),
    /// Make an RPC call; the reply is its result.
    Call(OutgoingCall, Reply<Result<Value, CallError>>),
}

/// Where a request's answer goes. Dropped unanswered when the service is gone or answered
/// nothing: the runtime's waiter then sees its sender dropped (a stop).
pub struct Reply<T>(Box<dyn FnOnce(T) + Send>);

impl<T> Reply<T> {
    /// A reply delivered by `send` (which must not block).
    pub fn new(send: impl FnOnce(T) + Send + 'static) -> Self {
        Reply(Box::new(send))
    }

    /// Delivers the answer.
    pub fn send(self, answer: T) {
        (self.0)(answer)
    }
}

impl<T> std::fmt::Debug for Reply<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reply")
    }
}

/// Where a worker's handlers' client requests come from: the runtime's client channel,
/// read on a relay thread of [`WorkerConnection::serve`].
pub trait RequestSource: Send + 'static {
    /// Blocks for the next request; `None` once every client is gone (the relay ends).
    fn next_request(&mut self) -> Option<Request>;
}

/// This process as a worker: its socket to the service, checked and ready to serve.
#[derive(Debug)]
pub struct WorkerConnection {
    stream: UnixStream,
    hello: WorkerHello,
    target: WorkerTarget,
    service: Arc<str>,
}

/// A client command waiting for the service's answer.
enum Pending {
    Emit(Reply<Result<(), PublishError>>),
    Call(Reply<Result<Value, CallError>>),
}

type PendingMap = Arc<Mutex<HashMap<u64, Pending>>>;

impl WorkerConnection {
    /// Checks that this program's service `spec` is the one `target` names and has its
    /// context, and takes standard input as the worker socket. From here on SIGINT and
    /// SIGTERM are ignored (the service decides when its workers end).
    pub fn open(target: &WorkerTarget, spec: &ServiceSpec) -> Result<Self, WorkerError> {
        if *target.service != *spec.name {
            return Err(WorkerError::OfAnotherService {
                worker_of: target.to_string(),
                service: spec.name.to_string(),
            });
        }
        if target.context.into_raw() as usize >= spec.contexts.len() {
            return Err(WorkerError::Setup(format!(
                "{WORKER_ENV}={target}, but service {:?} has {} contexts",
                spec.name,
                spec.contexts.len()
            )));
        }
        let stream = match std::io::stdin().as_fd().try_clone_to_owned().map(UnixStream::from) {
            Ok(s) if s.peer_addr().is_ok() => s,
            _ => {
                return Err(WorkerError::Setup(format!(
                    "{WORKER_ENV} is set, but standard input is not a worker socket: this process was not \
                     started by a microfw service"
                )));
            }
        };
        // A registered handler replaces the default action (ending the process) for good.
        for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            let _ = signal_hook::flag::register(signal, Arc::new(AtomicBool::new(false)));
        }
        let hello = WorkerHello::new(spec, target.context, std::process::id());
        Ok(WorkerConnection { stream, hello, target: target.clone(), service: spec.name.clone() })
    }

    /// Says hello, then runs each job the service sends with `run` on the calling thread,
    /// one at a time, and writes its outcome back; `requests` is read on a relay thread.
    /// When the service closes the socket, exits the process (status 0; 1 after an IO error,
    /// which is logged). `run` must catch its handler's panics (as
    /// [`Outcome::Panicked`]); it gets the job as the service sent it, without extensions.
    pub fn serve(self, requests: impl RequestSource, run: impl FnMut(Job) -> Outcome) -> ! {
        let WorkerConnection { stream, hello, target, service } = self;
        let code = match serve(stream, hello, requests, run) {
            Ok(()) => 0,
            Err(e) => {
                tracing::error!(service = %service, "worker process {}: {e}", std::process::id());
                eprintln!("microfw worker process {} of {target}: {e}", std::process::id());
                1
            }
        };
        std::process::exit(code)
    }
}

fn serve(
    stream: UnixStream,
    hello: WorkerHello,
    requests: impl RequestSource,
    mut run: impl FnMut(Job) -> Outcome,
) -> io::Result<()> {
    let writer = Arc::new(Mutex::new(stream.try_clone()?));
    write(&writer, &FromWorker::Hello(hello))?;
    let pending = PendingMap::default();
    {
        let (writer, pending) = (writer.clone(), pending.clone());
        std::thread::Builder::new()
            .name("microfw-worker-relay".into())
            .spawn(move || relay(requests, &writer, &pending))?;
    }
    let (jobs_tx, jobs) = chan::channel::<Job>();
    {
        let pending = pending.clone();
        std::thread::Builder::new()
            .name("microfw-worker-read".into())
            .spawn(move || read(stream, &jobs_tx, &pending))?;
    }

    // Ends when the reader drops its sender: the socket closed.
    while let Ok(job) = jobs.recv() {
        let dispatch = job.parts.dispatch;
        let outcome = run(job);
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
fn relay(
    mut requests: impl RequestSource,
    writer: &Mutex<UnixStream>,
    pending: &Mutex<HashMap<u64, Pending>>,
) {
    let mut next = 0u64;
    while let Some(request) = requests.next_request() {
        next += 1;
        let id = next;
        let frame = match request {
            Request::Emit(event, reply) => {
                lock(pending).insert(id, Pending::Emit(reply));
                FromWorker::Emit { request: id, event }
            }
            Request::Call(call, reply) => {
                lock(pending).insert(id, Pending::Call(reply));
                FromWorker::Call { request: id, call }
            }
        };
        if write(writer, &frame).is_err() {
            // The service is gone: the waiter sees its sender dropped (ShuttingDown).
            lock(pending).remove(&id);
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
                    reply.send(result);
                }
            }
            Ok(ToWorker::Called { request, result }) => {
                if let Some(Pending::Call(reply)) = lock(pending).remove(&request) {
                    reply.send(result);
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

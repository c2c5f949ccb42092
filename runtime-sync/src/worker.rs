//! `process` worker mode: this runtime's side of the shared machinery in
//! [`crate::process`]. The service's pools reach the driver through [`Port`]; a worker
//! process's handlers run on its serving thread with their clients' commands relayed by
//! [`ClientRequests`].

use microfw_core::extract::Extensions;
use microfw_core::worker_wire::WorkerTarget;
use microfw_core::{
    CallError, Dialect, HandlerTable, Outcome, OutgoingCall, OutgoingEvent, PublishError, ServiceSpec,
};
use serde_json::Value;

use crate::chan::{self, Receiver, SyncSender};
use crate::client::ServiceHandle;
use crate::driver::{self, Finished, Input};
use crate::process::{
    Answer, DriverGone, DriverPort, JobDone, Reply, Request, RequestSource, WorkerConnection, WorkerError,
};
use crate::runner::StartError;

/// Client commands a worker's handlers may have waiting at once before they block.
const REQUEST_CAPACITY: usize = 256;

/// A process pool's way to the driver: its input channel.
#[derive(Clone)]
pub(crate) struct Port(pub(crate) SyncSender<Input>);

impl DriverPort for Port {
    fn finished(&self, done: JobDone) -> Result<(), DriverGone> {
        let JobDone { id, route, outcome, elapsed } = done;
        self.0.send(Input::Outcome(Finished { id, route, outcome, elapsed })).map_err(|_| DriverGone)
    }

    fn emit(&self, event: OutgoingEvent) -> Answer<Result<(), PublishError>> {
        let (reply, rx) = chan::sync_channel(1);
        // A driver that is gone dropped the sender: answered as a stop.
        let _ = self.0.send(Input::Emit(event, reply));
        Answer::new(move || rx.recv().ok())
    }

    fn call(&self, call: OutgoingCall) -> Answer<Result<Value, CallError>> {
        let (reply, rx) = chan::sync_channel(1);
        let _ = self.0.send(Input::Call(call, reply));
        Answer::new(move || rx.recv().ok())
    }
}

/// A worker process's client commands, from the channel its handlers' clients send to.
struct ClientRequests(Receiver<Input>);

impl RequestSource for ClientRequests {
    fn next_request(&mut self) -> Option<Request> {
        loop {
            match self.0.recv().ok()? {
                Input::Emit(event, reply) => {
                    return Some(Request::Emit(event, Reply::new(move |r| drop(reply.try_send(r)))));
                }
                Input::Call(call, reply) => {
                    return Some(Request::Call(call, Reply::new(move |r| drop(reply.try_send(r)))));
                }
                Input::Outcome(_) | Input::Wake | Input::Shutdown => {}
            }
        }
    }
}

/// The worker target in the environment, if this process is a worker.
pub(crate) fn target() -> Result<Option<WorkerTarget>, StartError> {
    crate::process::worker_target().map_err(start_error)
}

/// Serves jobs for `target` until the service closes the socket, then exits the process;
/// blocking handlers run on the calling thread. Returns only if this process cannot serve
/// `target` for this service.
pub(crate) fn serve<S: Clone + Send + Sync + 'static>(
    target: &WorkerTarget,
    spec: &ServiceSpec,
    table: &HandlerTable<S>,
    dialect: Dialect,
) -> StartError {
    let connection = match WorkerConnection::open(target, spec) {
        Ok(c) => c,
        Err(e) => return start_error(e),
    };
    // The handlers' clients send to this channel as they would to a driver.
    let (tx, rx) = driver::channel(REQUEST_CAPACITY);
    let mut extensions = Extensions::new();
    extensions.insert(ServiceHandle { tx, service: spec.name.clone(), dialect });
    connection.serve(ClientRequests(rx), |mut job| {
        let route = job.parts.route;
        job.parts.extensions = extensions.clone();
        match table.handler(route) {
            // call_blocking catches a panic and makes it Outcome::Panicked.
            Some(handler) => handler
                .call_blocking(job, table.state().clone())
                .unwrap_or_else(|| Outcome::Panicked("an async handler cannot run here".into())),
            None => Outcome::Panicked(format!("no handler for route {route} in the worker process")),
        }
    })
}

fn start_error(e: WorkerError) -> StartError {
    match e {
        WorkerError::OfAnotherService { worker_of, service } => {
            StartError::WorkerOfAnotherService { worker_of, service }
        }
        WorkerError::Setup(message) => StartError::WorkerProcess(message),
    }
}

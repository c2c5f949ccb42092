//! `process` worker mode: this runtime's side of the machinery shared with
//! `microfw-runtime-sync` ([`microfw_runtime_sync::process`]). The service's pools reach the
//! driver through [`Port`] (blocking sends from the pool's OS threads); a worker process runs
//! its handlers on a thread of its own, one at a time (an async handler on a current-thread
//! runtime of that thread), with their clients' commands relayed by [`ClientRequests`].

use microfw_core::extract::Extensions;
use microfw_core::worker_wire::WorkerTarget;
use microfw_core::{
    CallError, Dialect, HandlerTable, Outcome, OutgoingCall, OutgoingEvent, PublishError, ServiceSpec,
};
use microfw_runtime_sync::process::{
    Answer, DriverGone, DriverPort, JobDone, Reply, Request, RequestSource, WorkerConnection, WorkerError,
};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::client::ServiceHandle;
use crate::driver::{Finished, Input};
use crate::pool::{WorkItem, run_item};
use crate::runner::StartError;

/// Client commands a worker's handlers may have waiting at once before they block.
const REQUEST_CAPACITY: usize = 256;

/// A process pool's way to the driver: its input channel.
#[derive(Clone)]
pub(crate) struct Port(pub(crate) mpsc::Sender<Input>);

impl DriverPort for Port {
    fn finished(&self, done: JobDone) -> Result<(), DriverGone> {
        let JobDone { id, route, outcome, elapsed } = done;
        self.0.blocking_send(Input::Outcome(Finished { id, route, outcome, elapsed })).map_err(|_| DriverGone)
    }

    fn emit(&self, event: OutgoingEvent) -> Answer<Result<(), PublishError>> {
        let (reply, rx) = oneshot::channel();
        // A driver that is gone dropped the sender: answered as a stop.
        let _ = self.0.blocking_send(Input::Emit(event, reply));
        Answer::new(move || rx.blocking_recv().ok())
    }

    fn call(&self, call: OutgoingCall) -> Answer<Result<Value, CallError>> {
        let (reply, rx) = oneshot::channel();
        let _ = self.0.blocking_send(Input::Call(call, reply));
        Answer::new(move || rx.blocking_recv().ok())
    }
}

/// A worker process's client commands, from the channel its handlers' clients send to.
struct ClientRequests(mpsc::Receiver<Input>);

impl RequestSource for ClientRequests {
    fn next_request(&mut self) -> Option<Request> {
        loop {
            match self.0.blocking_recv()? {
                Input::Emit(event, reply) => {
                    return Some(Request::Emit(event, Reply::new(move |r| drop(reply.send(r)))));
                }
                Input::Call(call, reply) => {
                    return Some(Request::Call(call, Reply::new(move |r| drop(reply.send(r)))));
                }
                Input::Outcome(_) | Input::Wake | Input::Shutdown => {}
            }
        }
    }
}

/// The worker target in the environment, if this process is a worker.
pub(crate) fn target() -> Result<Option<WorkerTarget>, StartError> {
    microfw_runtime_sync::process::worker_target().map_err(start_error)
}

/// Serves jobs for `target` until the service closes the socket, then exits the process.
/// Returns only if this process cannot serve `target` for this service.
pub(crate) async fn serve<S: Clone + Send + Sync + 'static>(
    target: &WorkerTarget,
    spec: &ServiceSpec,
    table: HandlerTable<S>,
    dialect: Dialect,
) -> StartError {
    let connection = match WorkerConnection::open(target, spec) {
        Ok(c) => c,
        Err(e) => return start_error(e),
    };
    let service = spec.name.clone();
    let serving = std::thread::Builder::new().name("microfw-worker".into()).spawn(move || {
        // The handlers' clients send to this channel as they would to a driver.
        let (tx, rx) = mpsc::channel(REQUEST_CAPACITY);
        let mut extensions = Extensions::new();
        extensions.insert(ServiceHandle { tx, service, dialect });
        // Async handlers run on a current-thread runtime, built on first need.
        let mut rt = None;
        connection.serve(ClientRequests(rx), |mut job| {
            let (dispatch, route) = (job.parts.dispatch, job.parts.route);
            job.parts.extensions = extensions.clone();
            match table.handler(route) {
                // run_item catches a panic and makes it Outcome::Panicked.
                Some(handler) => {
                    let (handler, state) = (handler.clone(), table.state().clone());
                    let handed = std::time::Instant::now();
                    run_item(WorkItem { id: dispatch, route, handler, job, state, handed }, &mut rt)
                }
                None => Outcome::Panicked(format!("no handler for route {route} in the worker process")),
            }
        })
    });
    match serving {
        // That thread ends the process.
        Ok(_) => std::future::pending().await,
        Err(e) => StartError::WorkerProcess(format!("cannot start the worker thread: {e}")),
    }
}

fn start_error(e: WorkerError) -> StartError {
    match e {
        WorkerError::OfAnotherService { worker_of, service } => {
            StartError::WorkerOfAnotherService { worker_of, service }
        }
        WorkerError::Setup(message) => StartError::WorkerProcess(message),
    }
}

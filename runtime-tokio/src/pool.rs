//! A context's dedicated pool of OS threads for blocking handlers (`thread` and
//! `greedy_thread` worker modes). Not tokio's blocking pool: CPU-bound handlers never compete
//! with the reactor or with other contexts.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use futures_util::FutureExt;
use microfw_core::extract::Job;
use microfw_core::handler::{BoxedHandler, panic_message};
use microfw_core::{DispatchId, Outcome, RouteId};
use tokio::sync::mpsc::Sender;

use crate::driver::{Finished, Input};
#[cfg(unix)]
use microfw_runtime_sync::process::{ProcessJob, ProcessPool};

/// One run for a pool thread.
pub(crate) struct WorkItem<S> {
    pub(crate) id: DispatchId,
    pub(crate) route: RouteId,
    pub(crate) handler: BoxedHandler<S>,
    pub(crate) job: Job,
    pub(crate) state: S,
    /// When the driver handed it to the pool: the run's duration counts from here.
    pub(crate) handed: std::time::Instant,
}

/// `max_workers` threads taking [`WorkItem`]s from one channel and sending each outcome to
/// the driver: each runs the handlers itself (`thread` modes), or on a worker process it owns
/// (`process` mode, see [`microfw_runtime_sync::process`]).
pub(crate) struct Pool<S> {
    jobs: Option<mpsc::Sender<WorkItem<S>>>,
    threads: Vec<JoinHandle<()>>,
    /// The worker processes (`process` mode; the fields above are empty then).
    #[cfg(unix)]
    processes: Option<ProcessPool>,
}

impl<S: Send + 'static> Pool<S> {
    /// Starts `size` threads named after the service and context.
    pub(crate) fn start(size: u32, name: &str, outcomes: Sender<Input>) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<WorkItem<S>>();
        let rx = Arc::new(Mutex::new(rx));
        let mut threads = Vec::new();
        for i in 0..size.max(1) {
            let rx = rx.clone();
            let outcomes = outcomes.clone();
            let thread = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || worker(&rx, &outcomes))?;
            threads.push(thread);
        }
        Ok(Pool {
            jobs: Some(tx),
            threads,
            #[cfg(unix)]
            processes: None,
        })
    }

    /// A pool of worker processes.
    #[cfg(unix)]
    pub(crate) fn processes(pool: ProcessPool) -> Self {
        Pool { jobs: None, threads: Vec::new(), processes: Some(pool) }
    }

    /// Kills the worker processes (`process` mode) of runs the shutdown timeout abandoned;
    /// their slots reap them. Nothing for a thread pool: its threads cannot be stopped.
    pub(crate) fn abandon(&self) {
        #[cfg(unix)]
        if let Some(processes) = &self.processes {
            processes.abandon();
        }
    }

    /// Queues a run. `Err` gives its id back if every thread is gone.
    pub(crate) fn submit(&self, item: WorkItem<S>) -> Result<(), DispatchId> {
        #[cfg(unix)]
        if let Some(processes) = &self.processes {
            // The worker process has its own handler and state.
            let WorkItem { id, route, job, handed, .. } = item;
            return processes.submit(ProcessJob { id, route, job, dispatched: handed });
        }
        let id = item.id;
        match &self.jobs {
            Some(tx) => tx.send(item).map_err(|_| id),
            None => Err(id),
        }
    }

    /// Closes the queue; idle threads end (process slots close their children first).
    /// Returns the threads for joining.
    pub(crate) fn close(&mut self) -> Vec<JoinHandle<()>> {
        #[cfg(unix)]
        if let Some(processes) = &mut self.processes {
            return processes.close();
        }
        self.jobs = None;
        std::mem::take(&mut self.threads)
    }
}

impl<S> std::fmt::Debug for Pool<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("threads", &self.threads.len()).finish()
    }
}

/// Runs one item on the calling (non-async) thread. Async handlers run to completion on
/// `rt`, a current-thread runtime built on first need.
pub(crate) fn run_item<S: 'static>(item: WorkItem<S>, rt: &mut Option<tokio::runtime::Runtime>) -> Outcome {
    let WorkItem { handler, job, state, .. } = item;
    if handler.is_blocking() {
        return handler.call_blocking(job, state).unwrap_or_else(|| Outcome::Panicked("not blocking".into()));
    }
    let fut = match catch_unwind(AssertUnwindSafe(|| handler.call_async(job, state))) {
        Ok(Some(fut)) => fut,
        Ok(None) => return Outcome::Panicked("handler is neither async nor blocking".into()),
        Err(p) => return Outcome::Panicked(panic_message(&*p)),
    };
    if rt.is_none() {
        match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(r) => *rt = Some(r),
            Err(e) => return Outcome::Panicked(format!("cannot build a runtime for an async handler: {e}")),
        }
    }
    let Some(rt) = rt.as_ref() else { return Outcome::Panicked("no runtime".into()) };
    rt.block_on(AssertUnwindSafe(fut).catch_unwind())
        .unwrap_or_else(|p| Outcome::Panicked(panic_message(&*p)))
}

fn worker<S: 'static>(rx: &Mutex<mpsc::Receiver<WorkItem<S>>>, outcomes: &Sender<Input>) {
    let mut rt = None;
    loop {
        let item = {
            let Ok(rx) = rx.lock() else { return };
            rx.recv()
        };
        let Ok(item) = item else { return };
        let (id, route, handed) = (item.id, item.route, item.handed);
        let outcome = run_item(item, &mut rt);
        let done = Finished { id, route, outcome, elapsed: handed.elapsed() };
        if outcomes.blocking_send(Input::Outcome(done)).is_err() {
            return; // the driver is gone
        }
    }
}

//! A context's fixed pool of OS threads for blocking handlers (`thread` and `greedy_thread`
//! worker modes).
//!
//! The threads share one `std::sync::mpsc` receiver behind a mutex: the Engine never
//! dispatches more runs to a context than its budget (the pool's size), so the queue holds at
//! most one item per idle thread and the mutex is never contended for long. Each thread sends
//! its run's outcome to the driver's channel (a blocking send: back-pressure if the driver
//! falls behind).

use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use microfw_core::extract::Job;
use microfw_core::{DispatchId, HandlerTable, Outcome, RouteId};

use crate::driver::{Finished, Input};

/// One run for a pool thread.
pub(crate) struct WorkItem {
    pub(crate) id: DispatchId,
    pub(crate) route: RouteId,
    pub(crate) job: Job,
    /// When the driver dispatched it (the start of `task_duration_seconds`).
    pub(crate) dispatched: std::time::Instant,
}

/// `size` threads taking [`WorkItem`]s from one channel.
pub(crate) struct Pool {
    jobs: Option<mpsc::Sender<WorkItem>>,
    threads: Vec<JoinHandle<()>>,
}

impl Pool {
    /// Starts `size` threads named `<name>-<i>`.
    pub(crate) fn start<S: Clone + Send + Sync + 'static>(
        size: u32,
        name: &str,
        table: &Arc<HandlerTable<S>>,
        outcomes: &SyncSender<Input>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<WorkItem>();
        let rx = Arc::new(Mutex::new(rx));
        let mut threads = Vec::new();
        for i in 0..size.max(1) {
            let rx = rx.clone();
            let table = table.clone();
            let outcomes = outcomes.clone();
            let thread = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || worker(&rx, &table, &outcomes))?;
            threads.push(thread);
        }
        Ok(Pool { jobs: Some(tx), threads })
    }

    /// Queues a run. `Err` names it if every thread is gone (its job is dropped).
    pub(crate) fn submit(&self, item: WorkItem) -> Result<(), DispatchId> {
        let id = item.id;
        match &self.jobs {
            Some(tx) => tx.send(item).map_err(|_| id),
            None => Err(id),
        }
    }

    /// Closes the queue; idle threads end. Returns the threads for joining.
    pub(crate) fn close(&mut self) -> Vec<JoinHandle<()>> {
        self.jobs = None;
        std::mem::take(&mut self.threads)
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("threads", &self.threads.len()).finish()
    }
}

fn worker<S: Clone + Send + Sync + 'static>(
    rx: &Mutex<mpsc::Receiver<WorkItem>>,
    table: &HandlerTable<S>,
    outcomes: &SyncSender<Input>,
) {
    loop {
        let item = {
            // A poisoned lock cannot happen (nothing panics while holding it); end if it does.
            let Ok(rx) = rx.lock() else { return };
            rx.recv()
        };
        let Ok(WorkItem { id, route, job, dispatched }) = item else { return };
        let outcome = match table.handler(route) {
            // call_blocking catches a panic and makes it Outcome::Panicked.
            Some(handler) => handler.call_blocking(job, table.state().clone()).unwrap_or_else(|| {
                Outcome::Panicked("an async handler cannot run in a thread context".into())
            }),
            None => Outcome::Panicked(format!("no handler for route {route}")),
        };
        let done = Finished { id, route, outcome, elapsed: dispatched.elapsed() };
        if outcomes.send(Input::Outcome(done)).is_err() {
            return; // the driver is gone
        }
    }
}

//! A context's fixed pool of OS threads for blocking handlers (`thread` and `greedy_thread`
//! worker modes).
//!
//! The threads share one [`crate::chan`] queue: the Engine never dispatches more runs to a
//! context than its budget (the pool's size), so the queue holds at most one item per idle
//! thread. A thread that finishes a run takes the next queued one without sleeping; idle
//! threads wait on the queue's condvar, which releases its lock, and a run wakes one of them
//! (after the lock is released). The pool used to share a `std::sync::mpsc::Receiver` behind a
//! `Mutex`: the thread holding the mutex blocked in `recv` while the other idle threads slept
//! on the mutex, so every run also woke the next thread in line only for it to block again
//! (measured: about 3 extra futex calls and one extra context switch per run). Each thread
//! sends its run's outcome to the driver's channel (a blocking send: back-pressure if the
//! driver falls behind).

use std::sync::Arc;
use std::thread::JoinHandle;

use microfw_core::extract::Job;
use microfw_core::{DispatchId, HandlerTable, Outcome, RouteId};

use crate::chan::{self, Receiver, SyncSender};
use crate::driver::{Finished, Input};

/// One run for a pool thread.
pub(crate) struct WorkItem {
    pub(crate) id: DispatchId,
    pub(crate) route: RouteId,
    pub(crate) job: Job,
    /// When the driver dispatched it (the start of `task_duration_seconds`).
    pub(crate) dispatched: std::time::Instant,
}

/// `size` threads taking [`WorkItem`]s from one channel: each runs the handlers itself
/// (`thread` modes), or on a worker process it owns (`process` mode, see [`crate::process`]).
pub(crate) struct Pool {
    jobs: Option<SyncSender<WorkItem>>,
    threads: Vec<JoinHandle<()>>,
    /// The worker processes (`process` mode; the fields above are empty then).
    #[cfg(unix)]
    processes: Option<crate::process::ProcessPool>,
}

impl Pool {
    /// Starts `size` threads named `<name>-<i>`.
    pub(crate) fn start<S: Clone + Send + Sync + 'static>(
        size: u32,
        name: &str,
        table: &Arc<HandlerTable<S>>,
        outcomes: &SyncSender<Input>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = chan::channel::<WorkItem>();
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
        Ok(Pool {
            jobs: Some(tx),
            threads,
            #[cfg(unix)]
            processes: None,
        })
    }

    /// A pool of worker processes.
    #[cfg(unix)]
    pub(crate) fn processes(pool: crate::process::ProcessPool) -> Self {
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

    /// Queues a run. `Err` names it if every thread is gone (its job is dropped).
    pub(crate) fn submit(&self, item: WorkItem) -> Result<(), DispatchId> {
        #[cfg(unix)]
        if let Some(processes) = &self.processes {
            let WorkItem { id, route, job, dispatched } = item;
            return processes.submit(crate::process::ProcessJob { id, route, job, dispatched });
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

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("threads", &self.threads.len()).finish()
    }
}

fn worker<S: Clone + Send + Sync + 'static>(
    rx: &Receiver<WorkItem>,
    table: &HandlerTable<S>,
    outcomes: &SyncSender<Input>,
) {
    // Ends when the pool closes its sender.
    while let Ok(WorkItem { id, route, job, dispatched }) = rx.recv() {
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

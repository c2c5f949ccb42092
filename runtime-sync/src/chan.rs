//! A small blocking channel (mutex + condvars) whose wake-ups happen after its lock is
//! released, with the subset of `std::sync::mpsc`'s API (and its error types) the runtime uses.
//!
//! Why not `std::sync::mpsc`: std's channel wakes a blocked receiver (`Thread::unpark`) while
//! holding the internal mutex of its waiter list. On a small machine the woken thread often
//! preempts the waker right there, so the next `recv`/`send` on that channel (by either side)
//! finds the mutex held by a descheduled thread and sleeps on it: a lock convoy, measured at
//! more than one extra sleep and wake per hop of an RPC round trip (`perf record -e
//! sched:sched_switch`). Here a sender pushes under the lock, releases it, and only then
//! notifies, and only if the receiver is actually waiting; the woken receiver finds the lock
//! free. Wake-ups are also throttled: while one notified receiver has not yet run, senders
//! do not notify again (a burst of sends costs one wake, not one per send), and a woken
//! receiver that leaves items behind wakes the next one. A pool's burst of runs then wakes
//! its threads one after another instead of all at once, so a 256-thread pool on a small
//! machine does not thrash.
//!
//! Semantics follow std: `send` blocks while a bounded channel is full and fails once the
//! receiver is gone; `recv` returns the queued items first and fails once every sender is gone
//! and the queue is empty. Receivers can be cloned (the worker pools share one): each item
//! goes to one of them, and `send` fails once all are gone.

use std::collections::VecDeque;
use std::sync::mpsc::{RecvTimeoutError, SendError, TryRecvError, TrySendError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A bounded channel holding at most `capacity` items (at least 1).
pub(crate) fn sync_channel<T>(capacity: usize) -> (SyncSender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            queue: VecDeque::new(),
            capacity: capacity.max(1),
            senders: 1,
            receivers: 1,
            receivers_waiting: 0,
            waking: false,
            senders_waiting: 0,
        }),
        not_empty: Condvar::new(),
        not_full: Condvar::new(),
    });
    (SyncSender(shared.clone()), Receiver(shared))
}

/// An unbounded channel.
pub(crate) fn channel<T>() -> (SyncSender<T>, Receiver<T>) {
    sync_channel(usize::MAX)
}

/// The sending half (cheap to clone).
pub(crate) struct SyncSender<T>(Arc<Shared<T>>);

/// The receiving half (clone it for several consumers).
pub(crate) struct Receiver<T>(Arc<Shared<T>>);

struct Shared<T> {
    state: Mutex<State<T>>,
    not_empty: Condvar,
    not_full: Condvar,
}

struct State<T> {
    queue: VecDeque<T>,
    capacity: usize,
    senders: usize,
    receivers: usize,
    receivers_waiting: usize,
    /// A waiting receiver was notified and has not taken the lock yet: senders need not
    /// notify again (that receiver passes the wake on if it leaves items behind).
    waking: bool,
    senders_waiting: usize,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // Nothing panics while holding the lock; recover the state if something did.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<T> SyncSender<T> {
    /// Queues `item`, waiting while the channel is full. Fails if the receiver is gone.
    pub(crate) fn send(&self, item: T) -> Result<(), SendError<T>> {
        let mut state = self.0.lock();
        loop {
            if state.receivers == 0 {
                return Err(SendError(item));
            }
            if state.queue.len() < state.capacity {
                break;
            }
            state.senders_waiting += 1;
            state = self.0.not_full.wait(state).unwrap_or_else(|p| p.into_inner());
            state.senders_waiting -= 1;
        }
        self.push(state, item);
        Ok(())
    }

    /// Queues `item` if there is room, without waiting.
    pub(crate) fn try_send(&self, item: T) -> Result<(), TrySendError<T>> {
        let state = self.0.lock();
        if state.receivers == 0 {
            return Err(TrySendError::Disconnected(item));
        }
        if state.queue.len() >= state.capacity {
            return Err(TrySendError::Full(item));
        }
        self.push(state, item);
        Ok(())
    }

    fn push(&self, mut state: MutexGuard<'_, State<T>>, item: T) {
        state.queue.push_back(item);
        let wake = state.receivers_waiting > 0 && !state.waking;
        state.waking |= wake;
        drop(state);
        if wake {
            self.0.not_empty.notify_one();
        }
    }
}

impl<T> Clone for SyncSender<T> {
    fn clone(&self) -> Self {
        self.0.lock().senders += 1;
        SyncSender(self.0.clone())
    }
}

impl<T> Drop for SyncSender<T> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.senders -= 1;
        let wake = state.senders == 0 && state.receivers_waiting > 0;
        drop(state);
        if wake {
            self.0.not_empty.notify_all();
        }
    }
}

impl<T> Receiver<T> {
    /// The next item, waiting for one. Fails once every sender is gone and the queue is empty.
    pub(crate) fn recv(&self) -> Result<T, RecvTimeoutError> {
        self.recv_until(None)
    }

    /// The next item, waiting at most `timeout`.
    pub(crate) fn recv_timeout(&self, timeout: Duration) -> Result<T, RecvTimeoutError> {
        self.recv_until(Instant::now().checked_add(timeout))
    }

    /// The next item if one is queued.
    pub(crate) fn try_recv(&self) -> Result<T, TryRecvError> {
        match self.pop(self.0.lock()) {
            Ok(item) => Ok(item),
            Err(state) if state.senders == 0 => Err(TryRecvError::Disconnected),
            Err(_) => Err(TryRecvError::Empty),
        }
    }

    fn recv_until(&self, deadline: Option<Instant>) -> Result<T, RecvTimeoutError> {
        let mut state = self.0.lock();
        loop {
            state = match self.pop(state) {
                Ok(item) => return Ok(item),
                Err(state) if state.senders == 0 => return Err(RecvTimeoutError::Disconnected),
                Err(state) => state,
            };
            state.receivers_waiting += 1;
            state = match deadline {
                None => self.0.not_empty.wait(state).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        state.receivers_waiting -= 1;
                        return Err(RecvTimeoutError::Timeout);
                    }
                    self.0.not_empty.wait_timeout(state, left).unwrap_or_else(|p| p.into_inner()).0
                }
            };
            state.receivers_waiting -= 1;
            // Whoever was notified (this receiver, or one that will find nothing) is awake.
            state.waking = false;
        }
    }

    /// Pops an item (waking, after unlocking, a sender waiting for room); if there is none,
    /// hands the lock back.
    fn pop<'a>(&'a self, mut state: MutexGuard<'a, State<T>>) -> Result<T, MutexGuard<'a, State<T>>> {
        match state.queue.pop_front() {
            Some(item) => {
                let wake = state.senders_waiting > 0;
                // Items left and receivers asleep: pass the wake on (one at a time).
                let chain = !state.queue.is_empty() && state.receivers_waiting > 0 && !state.waking;
                state.waking |= chain;
                drop(state);
                if wake {
                    self.0.not_full.notify_one();
                }
                if chain {
                    self.0.not_empty.notify_one();
                }
                Ok(item)
            }
            None => Err(state),
        }
    }
}

impl<T> Clone for Receiver<T> {
    fn clone(&self) -> Self {
        self.0.lock().receivers += 1;
        Receiver(self.0.clone())
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.receivers -= 1;
        if state.receivers > 0 {
            return;
        }
        // Queued items are dropped with the last receiver, as with std (outside the lock: an
        // item may hold a sender of this very channel).
        let queued = std::mem::take(&mut state.queue);
        let wake = state.senders_waiting > 0;
        drop(state);
        drop(queued);
        if wake {
            self.0.not_full.notify_all();
        }
    }
}

impl<T> std::fmt::Debug for SyncSender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SyncSender { .. }")
    }
}

impl<T> std::fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Receiver { .. }")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_bounded_and_disconnects() {
        let (tx, rx) = sync_channel::<u32>(2);
        tx.send(1).unwrap();
        tx.try_send(2).unwrap();
        assert_eq!(tx.try_send(3), Err(TrySendError::Full(3)));
        assert_eq!(rx.recv().unwrap(), 1);
        assert_eq!(rx.try_recv().unwrap(), 2);
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
        assert_eq!(rx.recv_timeout(Duration::from_millis(5)), Err(RecvTimeoutError::Timeout));
        let tx2 = tx.clone();
        tx2.send(4).unwrap();
        drop(tx);
        drop(tx2);
        assert_eq!(rx.recv().unwrap(), 4);
        assert_eq!(rx.recv(), Err(RecvTimeoutError::Disconnected));
        let (tx, rx) = sync_channel::<u32>(1);
        let rx2 = rx.clone();
        drop(rx);
        tx.send(5).unwrap();
        assert_eq!(rx2.recv().unwrap(), 5);
        drop(rx2);
        assert_eq!(tx.send(6), Err(SendError(6)));
    }

    #[test]
    fn blocked_sides_are_woken() {
        let (tx, rx) = sync_channel::<u32>(1);
        let t = std::thread::spawn(move || {
            for i in 0..1000 {
                tx.send(i).unwrap(); // blocks while full
            }
        });
        for i in 0..1000 {
            assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), i);
        }
        t.join().unwrap();
        assert_eq!(rx.recv(), Err(RecvTimeoutError::Disconnected));
        let (tx, rx) = channel::<u32>();
        let t = std::thread::spawn(move || rx.recv());
        std::thread::sleep(Duration::from_millis(10)); // let it block (not a synchronisation)
        drop(tx);
        assert_eq!(t.join().unwrap(), Err(RecvTimeoutError::Disconnected));
    }

    /// Review: items queued when the last receiver went were kept until the last sender went
    /// too, so a reply sender inside a queued command (a Producer's Emit reaching a driver
    /// that just ended) was never dropped and its waiter blocked forever.
    #[test]
    fn queued_items_are_dropped_with_the_last_receiver() {
        let (tx, rx) = sync_channel::<SyncSender<u32>>(4);
        let (reply, waiter) = sync_channel::<u32>(1);
        tx.send(reply).unwrap();
        drop(rx);
        assert_eq!(waiter.recv_timeout(Duration::from_secs(5)), Err(RecvTimeoutError::Disconnected));
        drop(tx);
    }
}

//! Per-connection sequencing for the IO halves: which request to start and which replies to
//! write, given arrivals and completions.
//!
//! Rule: a request with an `id` starts at once and its reply is written as soon as it
//! completes (replies carry the id, so order does not matter). Requests without an `id` form
//! the connection's sequential lane, micro_framework's behaviour: one runs at a time, in
//! arrival order, and their replies are written in arrival order. A sequential request may be
//! completed before its turn (an error reply for a bad frame, an internal command answered
//! without the Engine): the lane holds that reply until every earlier sequential reply has
//! been written.

use std::collections::{BTreeSet, VecDeque};

/// A request's place on a connection, handed out by [`Lane::arrive`]. Unique per lane.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ticket(u64);

impl Ticket {
    /// The raw number (arrival order on the lane, from 0).
    pub const fn into_raw(self) -> u64 {
        self.0
    }
}

/// What [`Lane::arrive`] decided.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[must_use = "a request the IO half does not start when told never gets a reply"]
pub struct Admission {
    /// The request's ticket; pass it to [`Lane::complete`].
    pub ticket: Ticket,
    /// Start the request now. Always true with an id; without one, true only when no other
    /// id-less request is ahead of it (otherwise a later [`Released::start`] names it).
    pub start: bool,
}

/// What a completion released.
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use = "replies the IO half does not write are lost"]
pub struct Released<R> {
    /// Replies to write now, in this order (possibly none, possibly several).
    pub write: Vec<R>,
    /// An id-less request whose turn has come: start it now.
    pub start: Option<Ticket>,
}

/// A completion the lane cannot accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LaneError {
    /// No request on this lane has that ticket, or its reply was already written.
    #[error("no pending request has ticket {0:?}")]
    UnknownTicket(Ticket),
    /// The id-less request already has a reply waiting for its turn.
    #[error("the request with ticket {0:?} was already completed")]
    AlreadyCompleted(Ticket),
}

/// The sequencing state of one connection. `R` is whatever the IO half writes (a reply frame).
///
/// Pure bookkeeping: it runs nothing, holds no request data, and does not bound how many
/// requests are in flight (the IO half refuses work with `MaxConnectionsReached` or stops
/// reading when it wants a bound).
#[derive(Debug)]
pub struct Lane<R> {
    next: u64,
    /// Id-less requests in arrival order; the front one, if any, has been started.
    sequential: VecDeque<(Ticket, Option<R>)>,
    /// Requests with an id that have not completed.
    multiplexed: BTreeSet<Ticket>,
}

impl<R> Default for Lane<R> {
    fn default() -> Self {
        Lane::new()
    }
}

impl<R> Lane<R> {
    /// An empty lane.
    pub fn new() -> Self {
        Lane { next: 0, sequential: VecDeque::new(), multiplexed: BTreeSet::new() }
    }

    /// Registers a request as it arrives; `multiplexed` is true when it carries an id.
    pub fn arrive(&mut self, multiplexed: bool) -> Admission {
        let ticket = Ticket(self.next);
        self.next += 1;
        if multiplexed {
            self.multiplexed.insert(ticket);
            return Admission { ticket, start: true };
        }
        self.sequential.push_back((ticket, None));
        Admission { ticket, start: self.sequential.len() == 1 }
    }

    /// Records that `ticket`'s request finished with `reply`, and says what can be written and
    /// started now.
    ///
    /// An id'd reply is released at once. An id-less reply is released when every earlier
    /// id-less reply has been; releasing the running one starts the next id-less request
    /// (releasing any that were completed early on the way). Errors leave the lane unchanged.
    pub fn complete(&mut self, ticket: Ticket, reply: R) -> Result<Released<R>, LaneError> {
        if self.multiplexed.remove(&ticket) {
            return Ok(Released { write: vec![reply], start: None });
        }
        let at = self
            .sequential
            .binary_search_by_key(&ticket, |(t, _)| *t)
            .map_err(|_| LaneError::UnknownTicket(ticket))?;
        let slot = &mut self.sequential[at].1;
        if slot.is_some() {
            return Err(LaneError::AlreadyCompleted(ticket));
        }
        *slot = Some(reply);
        let mut write = Vec::new();
        while let Some((_, Some(_))) = self.sequential.front() {
            if let Some((_, Some(r))) = self.sequential.pop_front() {
                write.push(r);
            }
        }
        let start = if write.is_empty() { None } else { self.sequential.front().map(|(t, _)| *t) };
        Ok(Released { write, start })
    }

    /// The id-less request currently running, if any.
    pub fn running_sequential(&self) -> Option<Ticket> {
        self.sequential.front().map(|(t, _)| *t)
    }

    /// Requests that arrived and whose replies have not been written yet.
    pub fn pending(&self) -> usize {
        self.sequential.len() + self.multiplexed.len()
    }

    /// True when every reply has been written.
    pub fn is_idle(&self) -> bool {
        self.pending() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    #[test]
    fn multiplexed_replies_go_out_in_completion_order() {
        let mut lane = Lane::new();
        let a = lane.arrive(true);
        let b = lane.arrive(true);
        assert!(a.start && b.start);
        assert_eq!(lane.complete(b.ticket, "b"), Ok(Released { write: vec!["b"], start: None }));
        assert_eq!(lane.complete(a.ticket, "a"), Ok(Released { write: vec!["a"], start: None }));
        assert!(lane.is_idle());
        assert_eq!(lane.complete(a.ticket, "again"), Err(LaneError::UnknownTicket(a.ticket)));
    }

    #[test]
    fn id_less_requests_run_one_at_a_time_in_order() {
        let mut lane = Lane::new();
        let a = lane.arrive(false);
        let m = lane.arrive(true);
        let b = lane.arrive(false);
        let c = lane.arrive(false);
        assert_eq!((a.start, m.start, b.start, c.start), (true, true, false, false));
        assert_eq!(lane.running_sequential(), Some(a.ticket));
        // c is answered early (say a bad frame): held until b is written.
        assert_eq!(lane.complete(c.ticket, "c"), Ok(Released { write: vec![], start: None }));
        assert_eq!(lane.complete(c.ticket, "c2"), Err(LaneError::AlreadyCompleted(c.ticket)));
        assert_eq!(lane.complete(m.ticket, "m"), Ok(Released { write: vec!["m"], start: None }));
        assert_eq!(lane.complete(a.ticket, "a"), Ok(Released { write: vec!["a"], start: Some(b.ticket) }));
        assert_eq!(lane.pending(), 2);
        assert_eq!(lane.complete(b.ticket, "b"), Ok(Released { write: vec!["b", "c"], start: None }));
        assert!(lane.is_idle());
        assert_eq!(lane.running_sequential(), None);
        // An idle lane starts the next id-less request at once.
        assert!(lane.arrive(false).start);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Arrive(bool),
        Complete(usize),
    }

    #[derive(Default)]
    struct Model {
        multiplexed: BTreeMap<Ticket, bool>,
        arrival: Vec<Ticket>,
        started: BTreeSet<Ticket>,
        completed: BTreeSet<Ticket>,
        early: BTreeSet<Ticket>,
        written: Vec<Ticket>,
    }

    impl Model {
        fn start(&mut self, t: Ticket) {
            assert!(!self.multiplexed[&t], "only id-less requests are started late");
            assert!(self.started.insert(t), "started twice");
            // Everything before it on the sequential lane has been written.
            for earlier in self.arrival.iter().filter(|e| **e < t && !self.multiplexed[e]) {
                assert!(self.written.contains(earlier));
            }
        }

        fn write(&mut self, t: Ticket) {
            assert!(self.completed.contains(&t), "written before completion");
            assert!(!self.written.contains(&t), "written twice");
            assert!(self.started.contains(&t) || self.early.contains(&t), "never run");
            self.written.push(t);
        }

        fn running_sequential(&self) -> usize {
            self.started.iter().filter(|t| !self.multiplexed[*t] && !self.written.contains(*t)).count()
        }

        fn complete(&mut self, lane: &mut Lane<Ticket>, t: Ticket) {
            self.completed.insert(t);
            if !self.started.contains(&t) {
                self.early.insert(t);
            }
            let released = lane.complete(t, t).unwrap();
            if self.multiplexed[&t] {
                assert_eq!(released.write, vec![t]);
            }
            for w in released.write {
                self.write(w);
            }
            if let Some(s) = released.start {
                self.start(s);
            }
        }
    }

    proptest! {
        #[test]
        fn every_request_gets_one_reply_and_id_less_ones_keep_arrival_order(
            ops in prop::collection::vec(
                prop_oneof![any::<bool>().prop_map(Op::Arrive), any::<usize>().prop_map(Op::Complete)],
                0..80,
            ),
        ) {
            let mut lane = Lane::new();
            let mut m = Model::default();
            for op in ops {
                match op {
                    Op::Arrive(mux) => {
                        let a = lane.arrive(mux);
                        m.multiplexed.insert(a.ticket, mux);
                        m.arrival.push(a.ticket);
                        if mux {
                            prop_assert!(a.start);
                            m.started.insert(a.ticket);
                        } else if a.start {
                            m.start(a.ticket);
                        }
                    }
                    Op::Complete(pick) => {
                        let open: Vec<Ticket> =
                            m.arrival.iter().copied().filter(|t| !m.completed.contains(t)).collect();
                        if open.is_empty() {
                            continue;
                        }
                        m.complete(&mut lane, open[pick % open.len()]);
                    }
                }
                prop_assert!(m.running_sequential() <= 1);
                prop_assert_eq!(lane.pending(), m.arrival.len() - m.written.len());
            }
            // Drain: finish everything still open, latest first.
            let open: Vec<Ticket> = m.arrival.iter().copied().filter(|t| !m.completed.contains(t)).collect();
            for t in open.into_iter().rev() {
                m.complete(&mut lane, t);
            }
            prop_assert!(lane.is_idle());
            let mut all = m.written.clone();
            all.sort();
            prop_assert_eq!(&all, &m.arrival);
            let sequential_written: Vec<Ticket> =
                m.written.iter().copied().filter(|t| !m.multiplexed[t]).collect();
            let sequential_arrived: Vec<Ticket> =
                m.arrival.iter().copied().filter(|t| !m.multiplexed[t]).collect();
            prop_assert_eq!(sequential_written, sequential_arrived);
        }
    }
}

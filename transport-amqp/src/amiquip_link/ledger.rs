//! The unsettled deliveries of one consume channel, and how their acks are batched. Pure.
//!
//! A channel numbers its deliveries 1, 2, 3... across all its consumers. An ack with
//! `multiple` settles every unsettled delivery up to its tag, so it may only cover a
//! contiguous run of tags that are all done: the ledger sends one `multiple` ack for the run
//! at the bottom of the window (tags not yet seen break the run: a delivery still on its way
//! must not be acked by accident), and single acks for done tags above an unsettled one, so a
//! slow handler never holds the others' acks (and the prefetch window) back.

use std::collections::BTreeMap;

/// An ack to send, holding the token of the delivery it names.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum AckCmd<T> {
    /// Ack this delivery only.
    Single(T),
    /// Ack every unsettled delivery up to this one.
    Multiple(T),
}

/// Deliveries by channel tag, with their settling state. `T` is whatever the client needs to
/// settle one (amiquip's stripped `Delivery`).
#[derive(Debug)]
pub(crate) struct AckLedger<T> {
    /// Every tag below this is settled on the broker.
    floor: u64,
    entries: BTreeMap<u64, Slot<T>>,
    /// Entries in the `Acked` state.
    acked: usize,
}

#[derive(Debug)]
enum Slot<T> {
    Unsettled(T),
    Acked(T),
    /// Settled on its own (a single ack or a reject) and waiting for the floor to pass it.
    Settled,
}

impl<T> AckLedger<T> {
    /// An empty ledger for a fresh channel (whose first tag is 1).
    pub(crate) fn new() -> Self {
        AckLedger { floor: 1, entries: BTreeMap::new(), acked: 0 }
    }

    /// Records a delivery.
    pub(crate) fn insert(&mut self, tag: u64, token: T) {
        self.entries.insert(tag, Slot::Unsettled(token));
    }

    /// Marks `tag` done; it is acked at the next [`flush`](Self::flush). False when the tag is
    /// unknown or already settled (nothing happens).
    pub(crate) fn ack(&mut self, tag: u64) -> bool {
        let Some(slot) = self.entries.get_mut(&tag) else { return false };
        match std::mem::replace(slot, Slot::Settled) {
            Slot::Unsettled(token) => {
                *slot = Slot::Acked(token);
                self.acked += 1;
                true
            }
            other => {
                *slot = other;
                false
            }
        }
    }

    /// Takes `tag` out to be settled on its own (a reject): its token, or `None` when the tag
    /// is unknown or already settled.
    pub(crate) fn take(&mut self, tag: u64) -> Option<T> {
        let slot = self.entries.get_mut(&tag)?;
        match std::mem::replace(slot, Slot::Settled) {
            Slot::Unsettled(token) => Some(token),
            Slot::Acked(token) => {
                self.acked -= 1;
                Some(token)
            }
            Slot::Settled => None,
        }
    }

    /// The acks to send now, in order: one for the done run at the bottom (multiple when it
    /// settles more than one delivery), then single acks for done tags above a gap.
    pub(crate) fn flush(&mut self, out: &mut Vec<AckCmd<T>>) {
        if self.acked == 0 {
            self.advance_over_settled();
            return;
        }
        let mut last = None;
        let mut run = 0usize;
        while let Some(entry) = self.entries.first_entry() {
            if *entry.key() != self.floor || matches!(entry.get(), Slot::Unsettled(_)) {
                break;
            }
            if let Slot::Acked(token) = entry.remove() {
                self.acked -= 1;
                run += 1;
                last = Some(token);
            }
            self.floor += 1;
        }
        if let Some(token) = last {
            out.push(if run > 1 { AckCmd::Multiple(token) } else { AckCmd::Single(token) });
        }
        if self.acked > 0 {
            for slot in self.entries.values_mut() {
                if matches!(slot, Slot::Acked(_))
                    && let Slot::Acked(token) = std::mem::replace(slot, Slot::Settled)
                {
                    out.push(AckCmd::Single(token));
                }
            }
            self.acked = 0;
        }
    }

    /// Deliveries not settled yet.
    pub(crate) fn unsettled(&self) -> usize {
        self.entries.values().filter(|s| matches!(s, Slot::Unsettled(_))).count()
    }

    fn advance_over_settled(&mut self) {
        while let Some(entry) = self.entries.first_entry() {
            if *entry.key() != self.floor || !matches!(entry.get(), Slot::Settled) {
                break;
            }
            entry.remove();
            self.floor += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn flushed(ledger: &mut AckLedger<u64>) -> Vec<AckCmd<u64>> {
        let mut out = Vec::new();
        ledger.flush(&mut out);
        out
    }

    fn ledger(tags: impl IntoIterator<Item = u64>) -> AckLedger<u64> {
        let mut l = AckLedger::new();
        for t in tags {
            l.insert(t, t);
        }
        l
    }

    #[test]
    fn a_contiguous_done_run_is_one_multiple_ack() {
        let mut l = ledger(1..=4);
        for t in [2, 1, 3] {
            assert!(l.ack(t));
        }
        assert_eq!(flushed(&mut l), [AckCmd::Multiple(3)]);
        assert!(l.ack(4));
        assert_eq!(flushed(&mut l), [AckCmd::Single(4)]);
        assert_eq!(l.unsettled(), 0);
    }

    #[test]
    fn done_tags_above_an_unsettled_one_are_acked_singly() {
        let mut l = ledger(1..=4);
        assert!(l.ack(2) && l.ack(4));
        assert_eq!(flushed(&mut l), [AckCmd::Single(2), AckCmd::Single(4)]);
        assert!(l.ack(1));
        // 2 is already settled: the run 1..=2 acks only 1 itself.
        assert_eq!(flushed(&mut l), [AckCmd::Single(1)]);
        assert!(l.ack(3));
        assert_eq!(flushed(&mut l), [AckCmd::Single(3)]);
    }

    #[test]
    fn a_tag_not_seen_yet_breaks_the_run() {
        // Tag 2 is still on its way (another consumer's queue): acking 3 must not cover it.
        let mut l = ledger([1, 3]);
        assert!(l.ack(1) && l.ack(3));
        assert_eq!(flushed(&mut l), [AckCmd::Single(1), AckCmd::Single(3)]);
    }

    #[test]
    fn settling_twice_or_unknown_tags_does_nothing() {
        let mut l = ledger(1..=2);
        assert!(l.ack(1));
        assert!(!l.ack(1));
        assert_eq!(l.take(1), Some(1));
        assert_eq!(l.take(1), None);
        assert!(!l.ack(9));
        assert_eq!(l.take(9), None);
        assert!(flushed(&mut l).is_empty());
        assert_eq!(l.unsettled(), 1);
    }

    proptest! {
        /// Whatever the order of acks and rejects and wherever the flushes fall, every delivery
        /// is settled exactly once on the broker, and a multiple ack never covers a delivery
        /// that is not done.
        #[test]
        fn every_delivery_is_settled_once(
            n in 1u64..40,
            order in proptest::collection::vec((any::<u64>(), any::<bool>(), any::<bool>()), 0..80),
        ) {
            let mut l = ledger(1..=n);
            let mut done = vec![false; n as usize + 1];
            let mut broker_settled = vec![false; n as usize + 1];
            let mut pending: Vec<u64> = (1..=n).collect();
            let settle = |cmds: Vec<AckCmd<u64>>, done: &[bool], broker: &mut Vec<bool>| {
                for cmd in cmds {
                    match cmd {
                        AckCmd::Single(t) => {
                            assert!(done[t as usize] && !broker[t as usize], "single {t}");
                            broker[t as usize] = true;
                        }
                        AckCmd::Multiple(t) => {
                            for u in 1..=t {
                                if !broker[u as usize] {
                                    assert!(done[u as usize], "multiple {t} covers {u}");
                                    broker[u as usize] = true;
                                }
                            }
                        }
                    }
                }
            };
            for (pick, reject, flush) in order {
                if pending.is_empty() {
                    break;
                }
                let tag = pending.remove((pick % pending.len() as u64) as usize);
                done[tag as usize] = true;
                if reject {
                    assert_eq!(l.take(tag), Some(tag));
                    broker_settled[tag as usize] = true;
                } else {
                    assert!(l.ack(tag));
                }
                if flush {
                    let mut out = Vec::new();
                    l.flush(&mut out);
                    settle(out, &done, &mut broker_settled);
                }
            }
            for tag in pending.drain(..) {
                done[tag as usize] = true;
                assert!(l.ack(tag));
            }
            let mut out = Vec::new();
            l.flush(&mut out);
            settle(out, &done, &mut broker_settled);
            prop_assert!(broker_settled[1..].iter().all(|s| *s));
            prop_assert_eq!(l.unsettled(), 0);
            prop_assert!(l.entries.is_empty());
        }
    }
}

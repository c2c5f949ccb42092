//! Settling deliveries on one consumer channel in batches: which `basic.ack` / `basic.reject`
//! frames a batch of settlements becomes.
//!
//! The broker numbers a channel's deliveries 1, 2, 3... in order. An ack with `multiple` acks
//! every unsettled tag up to its own, which must itself be unsettled (RabbitMQ closes the
//! channel with 406 "unknown delivery tag" otherwise). So a `multiple` ack may only cover a
//! contiguous run of tags the Engine has settled; a settled tag above a gap (a delivery still
//! being handled) is acked on its own at once, so it never holds a prefetch slot.

use std::collections::BTreeSet;

/// One frame to send, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Frame {
    /// `basic.ack`.
    Ack {
        /// The broker's tag.
        tag: u64,
        /// Ack every unsettled tag up to `tag`.
        multiple: bool,
    },
    /// `basic.reject`.
    Reject {
        /// The broker's tag.
        tag: u64,
        /// Put the message back on its queue.
        requeue: bool,
    },
}

/// How the Engine settled a delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Settle {
    /// Ack it.
    Ack,
    /// Reject it, requeueing or not.
    Reject {
        /// Put it back on its queue.
        requeue: bool,
    },
}

/// What this side has sent for one channel: every tag up to `floor` is settled on the broker,
/// and so is every tag in `above` (all greater than `floor`).
#[derive(Debug, Default)]
pub(crate) struct AckLedger {
    floor: u64,
    above: BTreeSet<u64>,
}

impl AckLedger {
    /// The frames settling `batch` (broker tags with their settlement, in the Engine's order),
    /// in the order to send them: rejects first, then one `multiple` ack over the contiguous
    /// run of acked tags, then single acks above the first unsettled tag. A tag already
    /// settled is skipped (settling twice would close the channel).
    pub(crate) fn plan(&mut self, batch: &[(u64, Settle)]) -> Vec<Frame> {
        let mut frames = Vec::new();
        let mut acks = Vec::with_capacity(batch.len());
        for &(tag, settle) in batch {
            if tag == 0 || self.is_settled(tag) {
                continue;
            }
            match settle {
                Settle::Reject { requeue } => {
                    self.above.insert(tag);
                    frames.push(Frame::Reject { tag, requeue });
                }
                Settle::Ack => acks.push(tag),
            }
        }
        acks.sort_unstable();
        acks.dedup();
        self.absorb();
        let mut run_end = None;
        let mut run_len = 0usize;
        let mut singles = Vec::new();
        for tag in acks {
            if tag == self.floor + 1 {
                self.floor = tag;
                run_end = Some(tag);
                run_len += 1;
                self.absorb();
            } else {
                self.above.insert(tag);
                singles.push(tag);
            }
        }
        if let Some(tag) = run_end {
            frames.push(Frame::Ack { tag, multiple: run_len > 1 });
        }
        frames.extend(singles.into_iter().map(|tag| Frame::Ack { tag, multiple: false }));
        self.absorb();
        frames
    }

    fn is_settled(&self, tag: u64) -> bool {
        tag <= self.floor || self.above.contains(&tag)
    }

    /// Moves the floor over tags settled above it.
    fn absorb(&mut self) {
        while self.above.remove(&(self.floor + 1)) {
            self.floor += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACK: Settle = Settle::Ack;

    fn acks(tags: &[u64]) -> Vec<(u64, Settle)> {
        tags.iter().map(|&t| (t, ACK)).collect()
    }

    #[test]
    fn a_contiguous_run_is_one_multiple_ack() {
        let mut l = AckLedger::default();
        assert_eq!(l.plan(&acks(&[3, 1, 2])), [Frame::Ack { tag: 3, multiple: true }]);
        assert_eq!(l.plan(&acks(&[4])), [Frame::Ack { tag: 4, multiple: false }]);
    }

    #[test]
    fn tags_above_a_gap_are_acked_singly_and_never_covered_again() {
        let mut l = AckLedger::default();
        // 2 is still being handled.
        assert_eq!(
            l.plan(&acks(&[1, 3, 4])),
            [
                Frame::Ack { tag: 1, multiple: false },
                Frame::Ack { tag: 3, multiple: false },
                Frame::Ack { tag: 4, multiple: false }
            ]
        );
        // 2 completes: the run 2..=4 is settled, but only 2 is unsettled on the broker.
        assert_eq!(l.plan(&acks(&[2, 5, 6])), [Frame::Ack { tag: 6, multiple: true }]);
        assert_eq!((l.floor, l.above.len()), (6, 0));
    }

    #[test]
    fn rejects_go_first_and_a_run_can_pass_over_them() {
        let mut l = AckLedger::default();
        let batch = [(1, ACK), (2, Settle::Reject { requeue: true }), (3, ACK)];
        assert_eq!(
            l.plan(&batch),
            [Frame::Reject { tag: 2, requeue: true }, Frame::Ack { tag: 3, multiple: true }]
        );
        assert_eq!(l.floor, 3);
    }

    #[test]
    fn settling_twice_or_tag_zero_sends_nothing() {
        let mut l = AckLedger::default();
        l.plan(&acks(&[1, 3]));
        assert_eq!(l.plan(&acks(&[1, 3, 0])), []);
        assert_eq!(l.plan(&[(3, Settle::Reject { requeue: false })]), []);
    }

    /// Replays random settle orders against a model of the broker's unacked set: no frame
    /// ever names a tag that is not unsettled, `multiple` never covers an unsettled tag the
    /// Engine has not settled, and everything settled ends settled.
    #[test]
    fn random_orders_keep_the_broker_consistent() {
        use proptest::prelude::*;
        proptest!(|(order in Just((1..=40u64).collect::<Vec<_>>()).prop_shuffle(),
                    cuts in proptest::collection::vec(1usize..6, 1..20),
                    rejects in proptest::collection::vec(any::<bool>(), 40))| {
            let mut ledger = AckLedger::default();
            let mut unsettled: BTreeSet<u64> = (1..=40).collect();
            let mut settled_by_engine = BTreeSet::new();
            let mut at = 0;
            let mut cut = cuts.iter().cycle();
            while at < order.len() {
                let end = (at + cut.next().copied().unwrap_or(1)).min(order.len());
                let batch: Vec<_> = order[at..end]
                    .iter()
                    .map(|&t| (t, if rejects[(t - 1) as usize] { Settle::Reject { requeue: false } } else { ACK }))
                    .collect();
                settled_by_engine.extend(order[at..end].iter().copied());
                for frame in ledger.plan(&batch) {
                    match frame {
                        Frame::Reject { tag, .. } | Frame::Ack { tag, multiple: false } => {
                            prop_assert!(unsettled.remove(&tag), "unknown tag {tag}");
                        }
                        Frame::Ack { tag, multiple: true } => {
                            prop_assert!(unsettled.contains(&tag), "unknown tag {tag}");
                            let covered: Vec<u64> = unsettled.range(..=tag).copied().collect();
                            for t in covered {
                                prop_assert!(settled_by_engine.contains(&t), "covered unsettled {t}");
                                unsettled.remove(&t);
                            }
                        }
                    }
                }
                at = end;
            }
            prop_assert!(unsettled.is_empty(), "left {unsettled:?}");
        });
    }
}

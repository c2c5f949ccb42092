//! Publisher confirms of one confirm-mode channel: which publish a broker ack, nack or return
//! is about. Pure.
//!
//! A confirm channel numbers its publishes 1, 2, 3...; the broker acks or nacks them by that
//! number (possibly `multiple`, possibly out of order). A `basic.return` carries no number:
//! RabbitMQ sends it just before the ack of the same message, so the IO half reads every
//! return that arrived before it handles an ack, and [`Confirms::returned`] marks the oldest
//! unconfirmed mandatory publish with the same exchange, routing key and correlation id (an
//! RPC request's correlation id is unique, which makes the match exact for calls).

use std::collections::BTreeMap;

use microfw_core::{PublishError, PublishId};

/// The publishes of one channel waiting for their confirm.
#[derive(Debug, Default)]
pub(crate) struct Confirms {
    /// The sequence number of the last publish.
    last: u64,
    inflight: BTreeMap<u64, Inflight>,
}

#[derive(Debug)]
struct Inflight {
    id: PublishId,
    /// (exchange, routing key, correlation id) of a mandatory publish, for returns.
    key: Option<ReturnKey>,
    returned: bool,
}

/// What a `basic.return` is matched on.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ReturnKey {
    /// The exchange published to.
    pub(crate) exchange: String,
    /// The routing key.
    pub(crate) routing_key: String,
    /// The correlation id, if any.
    pub(crate) correlation_id: Option<String>,
}

/// What a publish result goes to.
pub(crate) type Results = Vec<(PublishId, Result<(), PublishError>)>;

impl Confirms {
    /// A fresh channel's tracker (its first publish is number 1).
    pub(crate) fn new() -> Self {
        Confirms::default()
    }

    /// Records the next publish on the channel; `key` is `Some` for a mandatory one.
    pub(crate) fn sent(&mut self, id: PublishId, key: Option<ReturnKey>) {
        self.last += 1;
        self.inflight.insert(self.last, Inflight { id, key, returned: false });
    }

    /// A `basic.return`: marks the matching publish, whose ack will then report
    /// [`PublishError::Unroutable`]. False when nothing matches (it is dropped).
    pub(crate) fn returned(&mut self, key: &ReturnKey) -> bool {
        let found = self.inflight.values_mut().find(|p| !p.returned && p.key.as_ref() == Some(key));
        match found {
            Some(p) => {
                p.returned = true;
                true
            }
            None => false,
        }
    }

    /// A broker ack of `tag` (and every earlier one when `multiple`).
    pub(crate) fn ack(&mut self, tag: u64, multiple: bool, out: &mut Results) {
        self.settle(tag, multiple, out, |p| if p.returned { Err(PublishError::Unroutable) } else { Ok(()) });
    }

    /// A broker nack of `tag` (and every earlier one when `multiple`).
    pub(crate) fn nack(&mut self, tag: u64, multiple: bool, out: &mut Results) {
        self.settle(tag, multiple, out, |_| Err(PublishError::Nacked));
    }

    /// Every unconfirmed publish fails with `error` (the channel is gone).
    pub(crate) fn fail_all(&mut self, error: &PublishError, out: &mut Results) {
        out.extend(std::mem::take(&mut self.inflight).into_values().map(|p| (p.id, Err(error.clone()))));
    }

    /// True when no publish waits for its confirm.
    pub(crate) fn is_empty(&self) -> bool {
        self.inflight.is_empty()
    }

    fn settle(
        &mut self,
        tag: u64,
        multiple: bool,
        out: &mut Results,
        result: impl Fn(&Inflight) -> Result<(), PublishError>,
    ) {
        if multiple {
            let rest = self.inflight.split_off(&(tag.saturating_add(1)));
            let done = std::mem::replace(&mut self.inflight, rest);
            out.extend(done.into_values().map(|p| (p.id, result(&p))));
        } else if let Some(p) = self.inflight.remove(&tag) {
            out.push((p.id, result(&p)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> PublishId {
        PublishId::from_raw(n)
    }

    fn key(rk: &str, corr: &str) -> ReturnKey {
        ReturnKey { exchange: "nameko-rpc".into(), routing_key: rk.into(), correlation_id: Some(corr.into()) }
    }

    #[test]
    fn multiple_acks_settle_every_earlier_publish_in_order() {
        let mut c = Confirms::new();
        for n in 10..14 {
            c.sent(id(n), None);
        }
        let mut out = Vec::new();
        c.ack(3, true, &mut out);
        assert_eq!(out, [(id(10), Ok(())), (id(11), Ok(())), (id(12), Ok(()))]);
        out.clear();
        c.nack(4, false, &mut out);
        assert_eq!(out, [(id(13), Err(PublishError::Nacked))]);
        assert!(c.is_empty());
        out.clear();
        c.ack(4, false, &mut out);
        assert!(out.is_empty(), "a second confirm of one tag is ignored");
    }

    #[test]
    fn a_return_marks_the_matching_publish_unroutable() {
        let mut c = Confirms::new();
        c.sent(id(1), Some(key("svc.m", "a")));
        c.sent(id(2), None);
        c.sent(id(3), Some(key("svc.m", "b")));
        assert!(c.returned(&key("svc.m", "b")));
        assert!(!c.returned(&key("svc.m", "b")), "already returned");
        assert!(!c.returned(&key("other.m", "a")));
        let mut out = Vec::new();
        c.ack(3, true, &mut out);
        assert_eq!(out, [(id(1), Ok(())), (id(2), Ok(())), (id(3), Err(PublishError::Unroutable))]);
    }

    #[test]
    fn losing_the_channel_fails_what_is_unconfirmed() {
        let mut c = Confirms::new();
        c.sent(id(1), None);
        c.sent(id(2), None);
        let mut out = Vec::new();
        c.ack(1, false, &mut out);
        c.fail_all(&PublishError::LinkDown("gone".into()), &mut out);
        assert_eq!(out, [(id(1), Ok(())), (id(2), Err(PublishError::LinkDown("gone".into())))]);
        assert!(c.is_empty());
    }
}

//! The private mechanics of [`MemoryBroker`]: routing, enqueueing, expiry, delivery and
//! settling.

use std::time::Duration;

use super::dead_letter::{Death, is_cycle, record_death};
use super::{
    BrokerDelivery, BrokerError, Exchange, ExchangeKind, MemoryBroker, Queue, QueueId, QueueOptions, Stored,
    Unacked,
};
use crate::ids::DeliveryTag;
use crate::message::Envelope;
use crate::time::Instant;
use crate::topic::topic_matches;

impl MemoryBroker {
    /// A live queue. Ids come from `queue_ids`, `consumers`, `active`, bindings and unacked
    /// entries, which never outlive their queue.
    pub(super) fn queue(&self, id: QueueId) -> &Queue {
        self.queues[id.0].as_ref().expect("queue ids refer to live queues")
    }

    pub(super) fn queue_mut(&mut self, id: QueueId) -> &mut Queue {
        self.queues[id.0].as_mut().expect("queue ids refer to live queues")
    }

    /// Remembers the latest `now` seen (callers must not go backwards; if one does, the
    /// latest stays).
    pub(super) fn observe(&mut self, now: Instant) {
        self.latest_now = self.latest_now.max(now);
    }

    pub(super) fn queue_id(&self, name: &str) -> Result<QueueId, BrokerError> {
        self.queue_ids.get(name).copied().ok_or_else(|| BrokerError::NoSuchQueue(name.to_owned()))
    }

    pub(super) fn binding_ends(
        &mut self,
        queue: &str,
        exchange: &str,
    ) -> Result<(QueueId, &mut Exchange), BrokerError> {
        if exchange.is_empty() {
            return Err(BrokerError::DefaultExchange);
        }
        let id = self.queue_id(queue)?;
        let x = self
            .exchanges
            .get_mut(exchange)
            .ok_or_else(|| BrokerError::NoSuchExchange(exchange.to_owned()))?;
        Ok((id, x))
    }

    pub(super) fn route(
        &mut self,
        now: Instant,
        exchange: &str,
        envelope: Envelope,
        detect_cycles: bool,
    ) -> Result<usize, BrokerError> {
        let mut dests = std::mem::take(&mut self.scratch);
        dests.clear();
        if exchange.is_empty() {
            dests.extend(self.queue_ids.get(&envelope.routing_key).copied());
        } else {
            let Some(x) = self.exchanges.get(exchange) else {
                self.scratch = dests;
                return Err(BrokerError::NoSuchExchange(exchange.to_owned()));
            };
            let key = envelope.routing_key.as_str();
            dests.extend(
                x.bindings
                    .iter()
                    .filter(|b| match x.kind {
                        ExchangeKind::Fanout => true,
                        ExchangeKind::Direct => b.key == key,
                        ExchangeKind::Topic => topic_matches(&b.key, key),
                    })
                    .map(|b| b.queue),
            );
            if dests.len() > 1 {
                dests.sort_unstable();
                dests.dedup();
            }
        }
        if detect_cycles {
            dests.retain(|&id| !is_cycle(&self.queue(id).name, &envelope.headers));
        }
        let routed = dests.len();
        if let Some((&last, rest)) = dests.split_last() {
            for &id in rest {
                self.enqueue(now, id, envelope.clone());
            }
            self.enqueue(now, last, envelope);
        }
        self.scratch = dests;
        Ok(routed)
    }

    pub(super) fn enqueue(&mut self, now: Instant, id: QueueId, envelope: Envelope) {
        let queue = self.queue_mut(id);
        let per_message = envelope.properties.expiration_ms.map(Duration::from_millis);
        let ttl = match (queue.options.message_ttl, per_message) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let expires_at = ttl.map(|ttl| now + ttl);
        queue.ready.push_back(Stored { envelope, expires_at, redelivered: false });
        self.note_head_expiry(expires_at);
    }

    pub(super) fn requeue(&mut self, id: QueueId, mut message: Stored) {
        message.redelivered = true;
        let expires_at = message.expires_at;
        self.queue_mut(id).ready.push_front(message);
        self.note_head_expiry(expires_at);
    }

    /// Keeps `expiry_hint` a lower bound of every head's expiry: called whenever a message
    /// with this expiry may have become a head.
    pub(super) fn note_head_expiry(&mut self, expires_at: Option<Instant>) {
        if let Some(t) = expires_at {
            self.expiry_hint = Some(self.expiry_hint.map_or(t, |h| h.min(t)));
        }
    }

    pub(super) fn earliest_head_expiry(&self) -> Option<Instant> {
        self.queues.iter().flatten().filter_map(|q| q.ready.front().and_then(|m| m.expires_at)).min()
    }

    /// Dead-letters (or drops) the due messages at the head of a queue.
    pub(super) fn expire(&mut self, now: Instant, id: QueueId) {
        loop {
            let Some(queue) = self.queues[id.0].as_mut() else {
                return;
            };
            if queue.ready.front().is_none_or(|m| m.expires_at.is_none_or(|t| t > now)) {
                return;
            }
            let Some(message) = queue.ready.pop_front() else {
                return;
            };
            self.dead_letter(now, id, message.envelope, Death::Expired);
        }
    }

    pub(super) fn deliver_from(&mut self, id: QueueId, now: Instant) -> Option<BrokerDelivery> {
        self.expire(now, id);
        let queue = self.queues[id.0].as_mut()?;
        if queue.ready.is_empty() {
            return None;
        }
        let n = queue.consumers.len();
        let at = (0..n).map(|i| (queue.next_consumer + i) % n).find(|&at| {
            let c = &queue.consumers[at];
            c.prefetch == 0 || c.unacked < c.prefetch
        })?;
        let message = queue.ready.pop_front()?;
        queue.next_consumer = (at + 1) % n;
        queue.unacked += 1;
        let consumer = &mut queue.consumers[at];
        consumer.unacked += 1;
        let consumer = consumer.tag;
        self.last_tag += 1;
        let tag = DeliveryTag::from_raw(self.last_tag);
        let delivery = BrokerDelivery {
            consumer,
            tag,
            queue: queue.name.clone(),
            redelivered: message.redelivered,
            envelope: message.envelope.clone(),
        };
        let next_expiry = queue.ready.front().and_then(|m| m.expires_at);
        self.note_head_expiry(next_expiry);
        self.unacked.insert(tag, Unacked { consumer, queue: id, message });
        Some(delivery)
    }

    /// Removes an unacked delivery and updates its queue's and consumer's counts.
    pub(super) fn settle(&mut self, tag: DeliveryTag) -> Result<Unacked, BrokerError> {
        let u = self.unacked.remove(&tag).ok_or(BrokerError::UnknownDeliveryTag(tag))?;
        let queue = self.queue_mut(u.queue);
        queue.unacked -= 1;
        if let Some(c) = queue.consumers.iter_mut().find(|c| c.tag == u.consumer) {
            c.unacked -= 1;
        }
        Ok(u)
    }

    pub(super) fn deactivate(&mut self, id: QueueId) {
        if let Some(at) = self.active.iter().position(|&q| q == id) {
            self.active.remove(at);
            if at < self.cursor {
                self.cursor -= 1;
            }
            if self.cursor >= self.active.len() {
                self.cursor = 0;
            }
        }
    }

    /// Republishes a message that died in queue `id` to the queue's dead-letter exchange, or
    /// drops it. A missing dead-letter exchange drops it too.
    pub(super) fn dead_letter(&mut self, now: Instant, id: QueueId, mut envelope: Envelope, death: Death) {
        let queue = self.queue(id);
        let Some(dlx) = queue.options.dead_letter_exchange.clone() else {
            return;
        };
        let original_expiration = envelope.properties.expiration_ms.take();
        record_death(&mut envelope, &queue.name, death, original_expiration, now);
        if let Some(key) = &queue.options.dead_letter_routing_key {
            envelope.routing_key.clone_from(key);
        }
        envelope.exchange.clone_from(&dlx);
        // Routing to a missing exchange drops the message, as in RabbitMQ.
        let _ = self.route(now, &dlx, envelope, death == Death::Expired);
    }
}

pub(super) fn inequivalent(name: &str, what: &str) -> BrokerError {
    BrokerError::Inequivalent { name: name.to_owned(), what: what.to_owned() }
}

pub(super) fn options_difference(a: &QueueOptions, b: &QueueOptions) -> Option<&'static str> {
    if a.message_ttl != b.message_ttl {
        Some("x-message-ttl")
    } else if a.dead_letter_exchange != b.dead_letter_exchange {
        Some("x-dead-letter-exchange")
    } else if a.dead_letter_routing_key != b.dead_letter_routing_key {
        Some("x-dead-letter-routing-key")
    } else if a.exclusive != b.exclusive {
        Some("exclusive")
    } else if a.auto_delete != b.auto_delete {
        Some("auto_delete")
    } else if a.expires != b.expires {
        Some("x-expires")
    } else {
        None
    }
}

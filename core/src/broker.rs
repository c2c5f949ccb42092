//! An in-memory model of the parts of RabbitMQ that microfw relies on.
//!
//! [`MemoryBroker`] is a plain data structure: no threads, no IO, no clock. Every operation
//! that depends on time takes `now` from the caller; the deterministic simulator passes a
//! virtual clock, runtimes wrap the broker in a mutex and pass their monotonic clock. It
//! stores [`Envelope`]s as they are (no wire encoding).
//!
//! What is modelled (RabbitMQ 3.10 semantics): topic, direct and fanout exchanges and the
//! implicit default exchange `""`; queues with message TTL, dead-letter exchange and routing
//! key, and auto-delete; idempotent declarations that fail with
//! [`BrokerError::Inequivalent`] when redeclared differently; bindings; consumers with a
//! prefetch limit served round-robin; acks (single and multiple), rejects with or without
//! requeue, redelivery flags; per-message expiration (`expiration_ms`); dead-lettering with
//! an `x-death` header and RabbitMQ's cycle detection.
//!
//! Expiry happens **at the head of a queue only**, as in RabbitMQ: a message with a long TTL
//! at the head blocks messages with shorter per-message TTLs behind it until it leaves the
//! queue. This is why microfw uses one waiting queue per delay (each queue's TTL is the same
//! for every message in it, so FIFO order is expiry order). A delayed delivery is a waiting
//! queue with `message_ttl` that dead-letters through the default exchange `""` with the
//! target queue's name as `dead_letter_routing_key`.
//!
//! What is not modelled: connections and channels (so `exclusive` is only compared on
//! redeclaration, and [`MemoryBroker::cancel`] returns the consumer's unacked messages as a
//! channel close would), queue expiry (`expires` is only compared), headers exchanges,
//! exchange-to-exchange bindings, the pre-declared `amq.*` exchanges, server-named queues,
//! length limits, priorities, publisher confirms (a publish is final when it returns) and
//! `basic.get`. A TTL of zero does not hand the message to a waiting consumer first, as
//! RabbitMQ does: it expires at the next expiry check.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::time::Duration;

use crate::ids::{DeliveryTag, IdMap};
use crate::message::Envelope;
use crate::time::Instant;

use self::dead_letter::Death;
use self::internals::{inequivalent, options_difference};

mod dead_letter;
mod internals;
#[cfg(test)]
mod tests;

/// How an exchange routes a message to the queues bound to it.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum ExchangeKind {
    /// Binding keys are topic patterns ([`topic_matches`](crate::topic::topic_matches)).
    Topic,
    /// The binding key must equal the routing key.
    Direct,
    /// Every bound queue gets the message; keys are ignored.
    Fanout,
}

/// The arguments of a queue. Two declarations of a queue are equivalent when their options
/// are equal. The default is a plain queue: no TTL, no dead-lettering, not exclusive, not
/// auto-delete.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueOptions {
    /// `x-message-ttl`: how long a message may wait in the queue (per-message `expiration_ms`
    /// shortens it, never lengthens it). Millisecond precision is not enforced.
    pub message_ttl: Option<Duration>,
    /// `x-dead-letter-exchange`: where expired and rejected (not requeued) messages go.
    /// `Some("")` is the default exchange. `None` drops them.
    pub dead_letter_exchange: Option<String>,
    /// `x-dead-letter-routing-key`: replaces the message's routing key when dead-lettered.
    /// Requires `dead_letter_exchange`.
    pub dead_letter_routing_key: Option<String>,
    /// Exclusive to its connection. Only compared on redeclaration: the model has no
    /// connections, so the runtime deletes the queue when its link goes away.
    pub exclusive: bool,
    /// Deleted when its last consumer is cancelled (never before it had one).
    pub auto_delete: bool,
    /// `x-expires`. Only compared on redeclaration: the model never expires queues.
    pub expires: Option<Duration>,
}

/// A broker operation that could not be done. The AMQP reply code RabbitMQ would use is
/// given on each variant; in the model nothing is closed, the operation just has no effect.
#[non_exhaustive]
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum BrokerError {
    /// No exchange of that name (404 NOT_FOUND).
    #[error("no exchange '{0}'")]
    NoSuchExchange(String),
    /// No queue of that name (404 NOT_FOUND).
    #[error("no queue '{0}'")]
    NoSuchQueue(String),
    /// Redeclared with another kind or other options (406 PRECONDITION_FAILED).
    #[error("inequivalent {what} for '{name}'")]
    Inequivalent {
        /// The exchange or queue.
        name: String,
        /// What differs (`type`, `x-message-ttl`, ...).
        what: String,
    },
    /// Queue options that RabbitMQ refuses (406 PRECONDITION_FAILED).
    #[error("invalid options for queue '{name}': {what}")]
    InvalidOptions {
        /// The queue.
        name: String,
        /// What is wrong.
        what: String,
    },
    /// Declaring, binding to or unbinding from the default exchange (403 ACCESS_REFUSED).
    #[error("operation not permitted on the default exchange")]
    DefaultExchange,
    /// A queue needs a name: the model does not make up server-named queues.
    #[error("queue name is empty")]
    EmptyQueueName,
    /// No unacked delivery with that tag (406 PRECONDITION_FAILED).
    #[error("unknown delivery tag {0}")]
    UnknownDeliveryTag(DeliveryTag),
    /// No consumer with that tag.
    #[error("unknown consumer {0}")]
    UnknownConsumer(ConsumerTag),
}

/// A consumer of the memory broker. Unique for the broker's lifetime, never reused.
#[derive(Copy, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConsumerTag(u64);

impl ConsumerTag {
    /// Builds the tag from its raw number (for runtimes and tests).
    pub const fn from_raw(raw: u64) -> Self {
        Self(raw)
    }

    /// The raw number behind the tag.
    pub const fn into_raw(self) -> u64 {
        self.0
    }
}

impl fmt::Debug for ConsumerTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConsumerTag({})", self.0)
    }
}

impl fmt::Display for ConsumerTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// A message handed to a consumer. It stays unacked until [`MemoryBroker::ack`],
/// [`MemoryBroker::ack_multiple`], [`MemoryBroker::reject`] or [`MemoryBroker::cancel`].
#[derive(Clone, Debug, PartialEq)]
pub struct BrokerDelivery {
    /// The consumer it is for.
    pub consumer: ConsumerTag,
    /// Its tag: unique and increasing over the broker's lifetime, starting at 1.
    pub tag: DeliveryTag,
    /// The queue it came from.
    pub queue: String,
    /// True when it was delivered before and requeued (by a reject or a cancel).
    pub redelivered: bool,
    /// The message. `exchange` is where it was last published (the dead-letter exchange
    /// for a dead-lettered message), `routing_key` the key it was routed with.
    pub envelope: Envelope,
}

/// The broker model. See the module documentation for what it models and what it does not.
///
/// Driving it: call [`publish`](Self::publish) and the other inputs, drain
/// [`next_delivery`](Self::next_delivery) until `None`, then wait until
/// [`poll_timeout`](Self::poll_timeout) (or the next input) and call
/// [`handle_timeout`](Self::handle_timeout) (or just `next_delivery`) with the new `now`.
/// `now` must not go backwards between calls.
#[derive(Debug, Default)]
pub struct MemoryBroker {
    exchanges: HashMap<String, Exchange>,
    queue_ids: HashMap<String, QueueId>,
    /// Queue slots; freed slots are reused (nothing refers to a deleted queue).
    queues: Vec<Option<Queue>>,
    free: Vec<QueueId>,
    consumers: HashMap<ConsumerTag, QueueId>,
    /// Every unacked delivery. Invariant: its queue and its consumer exist.
    unacked: IdMap<DeliveryTag, Unacked>,
    /// Queues with at least one consumer, served round-robin from `cursor`.
    active: Vec<QueueId>,
    cursor: usize,
    /// A lower bound of every queue head's expiry (`None`: no head expires).
    expiry_hint: Option<Instant>,
    /// The latest `now` given to any method: the time of a [`MemoryBroker::reject`].
    latest_now: Instant,
    last_tag: u64,
    last_consumer: u64,
    /// Reused buffer for routing destinations.
    scratch: Vec<QueueId>,
}

impl MemoryBroker {
    /// An empty broker. The default exchange `""` exists implicitly: it routes a message to
    /// the queue named by its routing key, if there is one.
    pub fn new() -> Self {
        Self::default()
    }

    /// Declares an exchange. Idempotent with the same kind; another kind gives
    /// [`BrokerError::Inequivalent`] and changes nothing. `""` is refused.
    pub fn declare_exchange(&mut self, name: &str, kind: ExchangeKind) -> Result<(), BrokerError> {
        if name.is_empty() {
            return Err(BrokerError::DefaultExchange);
        }
        match self.exchanges.get(name) {
            Some(x) if x.kind == kind => Ok(()),
            Some(_) => Err(inequivalent(name, "type")),
            None => {
                self.exchanges.insert(name.to_owned(), Exchange { kind, bindings: Vec::new() });
                Ok(())
            }
        }
    }

    /// Deletes an exchange and its bindings. Deleting a missing exchange is not an error
    /// (as in RabbitMQ); `""` is refused.
    pub fn delete_exchange(&mut self, name: &str) -> Result<(), BrokerError> {
        if name.is_empty() {
            return Err(BrokerError::DefaultExchange);
        }
        self.exchanges.remove(name);
        Ok(())
    }

    /// Declares a queue. Idempotent with equal options; other options give
    /// [`BrokerError::Inequivalent`] naming the first difference, and change nothing.
    /// A dead-letter routing key without a dead-letter exchange is refused, as RabbitMQ does.
    pub fn declare_queue(&mut self, name: &str, options: QueueOptions) -> Result<(), BrokerError> {
        if name.is_empty() {
            return Err(BrokerError::EmptyQueueName);
        }
        if let Some(&id) = self.queue_ids.get(name) {
            let existing = &self.queue(id).options;
            return match options_difference(existing, &options) {
                None => Ok(()),
                Some(what) => Err(inequivalent(name, what)),
            };
        }
        if options.dead_letter_routing_key.is_some() && options.dead_letter_exchange.is_none() {
            return Err(BrokerError::InvalidOptions {
                name: name.to_owned(),
                what: "x-dead-letter-routing-key without x-dead-letter-exchange".to_owned(),
            });
        }
        let queue = Queue {
            name: name.to_owned(),
            options,
            ready: VecDeque::new(),
            consumers: Vec::new(),
            next_consumer: 0,
            unacked: 0,
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.queues[id.0] = Some(queue);
                id
            }
            None => {
                self.queues.push(Some(queue));
                QueueId(self.queues.len() - 1)
            }
        };
        self.queue_ids.insert(name.to_owned(), id);
        Ok(())
    }

    /// Binds `queue` to `exchange` with `binding_key`. Idempotent. Binding to `""` is refused.
    pub fn bind(&mut self, queue: &str, exchange: &str, binding_key: &str) -> Result<(), BrokerError> {
        let (id, x) = self.binding_ends(queue, exchange)?;
        if !x.bindings.iter().any(|b| b.queue == id && b.key == binding_key) {
            x.bindings.push(Binding { key: binding_key.to_owned(), queue: id });
        }
        Ok(())
    }

    /// Removes a binding. Removing a missing binding is not an error; a missing queue or
    /// exchange is.
    pub fn unbind(&mut self, queue: &str, exchange: &str, binding_key: &str) -> Result<(), BrokerError> {
        let (id, x) = self.binding_ends(queue, exchange)?;
        x.bindings.retain(|b| !(b.queue == id && b.key == binding_key));
        Ok(())
    }

    /// Deletes a queue with its bindings and consumers, and returns how many ready messages
    /// were dropped (what `queue.delete-ok` reports). Its unacked deliveries are forgotten
    /// too (acking them later gives [`BrokerError::UnknownDeliveryTag`]). Nothing is
    /// dead-lettered. Deleting a missing queue returns `Ok(0)`, as in RabbitMQ.
    pub fn delete_queue(&mut self, name: &str) -> Result<usize, BrokerError> {
        let Some(id) = self.queue_ids.remove(name) else {
            return Ok(0);
        };
        let Some(queue) = self.queues[id.0].take() else {
            return Ok(0);
        };
        self.free.push(id);
        for c in &queue.consumers {
            self.consumers.remove(&c.tag);
        }
        if queue.unacked > 0 {
            self.unacked.retain(|_, u| u.queue != id);
        }
        self.deactivate(id);
        for x in self.exchanges.values_mut() {
            x.bindings.retain(|b| b.queue != id);
        }
        Ok(queue.ready.len())
    }

    /// Drops every ready message of a queue (not the unacked ones) and returns how many.
    pub fn purge(&mut self, name: &str) -> Result<usize, BrokerError> {
        let id = self.queue_id(name)?;
        let queue = self.queue_mut(id);
        let n = queue.ready.len();
        queue.ready.clear();
        Ok(n)
    }

    /// Routes `envelope` to every matching queue (one copy each, a queue matched by several
    /// bindings gets one) and returns how many queues got it: 0 means unroutable, which a
    /// mandatory publisher treats as "returned". The exchange is taken from the argument
    /// (`envelope.exchange` is set to it), the routing key from `envelope.routing_key`.
    /// Each copy expires after the queue's TTL or `properties.expiration_ms`, whichever is
    /// shorter, counted from `now`.
    pub fn publish(
        &mut self,
        now: Instant,
        exchange: &str,
        mut envelope: Envelope,
    ) -> Result<usize, BrokerError> {
        if envelope.exchange != exchange {
            envelope.exchange.clear();
            envelope.exchange.push_str(exchange);
        }
        self.observe(now);
        self.route(now, exchange, envelope, false)
    }

    /// Starts a consumer on `queue`. `prefetch` caps its unacked deliveries (0: no cap).
    pub fn consume(&mut self, queue: &str, prefetch: u32) -> Result<ConsumerTag, BrokerError> {
        let id = self.queue_id(queue)?;
        self.last_consumer += 1;
        let tag = ConsumerTag(self.last_consumer);
        let q = self.queue_mut(id);
        q.consumers.push(ConsumerState { tag, prefetch, unacked: 0 });
        if q.consumers.len() == 1 {
            self.active.push(id);
        }
        self.consumers.insert(tag, id);
        Ok(tag)
    }

    /// Stops a consumer as AMQP `basic.cancel` does: it gets no new deliveries, and its
    /// unacked deliveries stay unacked, still to be acked or rejected (a graceful shutdown
    /// finishes running work this way). [`cancel`](Self::cancel) afterwards requeues whatever
    /// is left, as closing the channel would.
    pub fn stop_consuming(&mut self, consumer: ConsumerTag) -> Result<(), BrokerError> {
        let id = *self.consumers.get(&consumer).ok_or(BrokerError::UnknownConsumer(consumer))?;
        let q = self.queue_mut(id);
        q.consumers.retain(|c| c.tag != consumer);
        q.next_consumer = 0;
        if q.consumers.is_empty() {
            self.deactivate(id);
        }
        Ok(())
    }

    /// Cancels a consumer. Its unacked messages go back to the head of their queue in their
    /// original order, marked redelivered (what RabbitMQ does when the channel closes; a
    /// bare `basic.cancel` would leave them unacked). An auto-delete queue left with no
    /// consumer is then deleted, dropping its messages.
    pub fn cancel(&mut self, consumer: ConsumerTag) -> Result<(), BrokerError> {
        let id = self.consumers.remove(&consumer).ok_or(BrokerError::UnknownConsumer(consumer))?;
        let mut tags: Vec<DeliveryTag> =
            self.unacked.iter().filter(|(_, u)| u.consumer == consumer).map(|(&t, _)| t).collect();
        // Tags grow with delivery order: sorting them restores the original order.
        tags.sort_unstable();
        let mut returned = Vec::with_capacity(tags.len());
        for tag in tags {
            if let Some(u) = self.unacked.remove(&tag) {
                returned.push(u.message);
            }
        }
        let q = self.queue_mut(id);
        q.unacked -= returned.len();
        q.consumers.retain(|c| c.tag != consumer);
        let now_idle = q.consumers.is_empty();
        let auto_delete = q.options.auto_delete;
        for message in returned.into_iter().rev() {
            self.requeue(id, message);
        }
        if now_idle {
            self.deactivate(id);
            if auto_delete {
                let name = self.queue(id).name.clone();
                self.delete_queue(&name)?;
            }
        }
        Ok(())
    }

    /// The next delivery to hand out at `now`, or `None` when no consumer can take a
    /// message. Expired messages are dead-lettered (or dropped) first. Queues with consumers
    /// take turns; within a queue messages leave in FIFO order, to its consumers in turn,
    /// skipping a consumer at its prefetch limit. The envelope is cloned: the broker keeps
    /// its copy until the delivery is settled.
    pub fn next_delivery(&mut self, now: Instant) -> Option<BrokerDelivery> {
        self.observe(now);
        if self.expiry_hint.is_some_and(|t| t <= now) {
            self.handle_timeout(now);
        }
        let n = self.active.len();
        for i in 0..n {
            let at = (self.cursor + i) % n;
            let id = self.active[at];
            if let Some(delivery) = self.deliver_from(id, now) {
                self.cursor = (at + 1) % n;
                return Some(delivery);
            }
        }
        None
    }

    /// Acks one delivery.
    pub fn ack(&mut self, tag: DeliveryTag) -> Result<(), BrokerError> {
        self.settle(tag).map(drop)
    }

    /// Acks every unacked delivery of `consumer` whose tag is at most `up_to`, and returns how
    /// many. Unlike RabbitMQ, an `up_to` that is not itself unacked is not an error.
    pub fn ack_multiple(&mut self, up_to: DeliveryTag, consumer: ConsumerTag) -> Result<usize, BrokerError> {
        if !self.consumers.contains_key(&consumer) {
            return Err(BrokerError::UnknownConsumer(consumer));
        }
        let tags: Vec<DeliveryTag> = self
            .unacked
            .iter()
            .filter(|(t, u)| **t <= up_to && u.consumer == consumer)
            .map(|(&t, _)| t)
            .collect();
        for &tag in &tags {
            self.settle(tag)?;
        }
        Ok(tags.len())
    }

    /// Rejects one delivery. `requeue`: back to the head of its queue, marked redelivered
    /// (it keeps its original expiry). Otherwise it is dead-lettered with reason `rejected`
    /// if its queue has a dead-letter exchange, else dropped. The dead-letter time is the
    /// latest `now` the broker was given (by [`publish`](Self::publish),
    /// [`next_delivery`](Self::next_delivery), [`handle_timeout`](Self::handle_timeout) or
    /// [`reject_at`](Self::reject_at)); use `reject_at` to give it explicitly.
    pub fn reject(&mut self, tag: DeliveryTag, requeue: bool) -> Result<(), BrokerError> {
        self.reject_at(self.latest_now, tag, requeue)
    }

    /// [`reject`](Self::reject) at an explicit `now`: the `x-death` time, and the instant the
    /// dead-lettered copies start their TTL in the queues they reach.
    pub fn reject_at(&mut self, now: Instant, tag: DeliveryTag, requeue: bool) -> Result<(), BrokerError> {
        self.observe(now);
        let u = self.settle(tag)?;
        if requeue {
            self.requeue(u.queue, u.message);
        } else {
            self.dead_letter(now, u.queue, u.message.envelope, Death::Rejected);
        }
        Ok(())
    }

    /// The earliest instant at which a message at the head of a queue expires (it may be in
    /// the past if not handled yet), so the caller can advance its clock to it; `None` when
    /// nothing waits on time. Messages behind a head are not considered: they cannot expire
    /// before it leaves.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.expiry_hint?;
        self.earliest_head_expiry()
    }

    /// Expires every message due at `now` at the head of its queue, dead-lettering (or
    /// dropping) it, until no head is due. [`next_delivery`](Self::next_delivery) does this
    /// too.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.observe(now);
        // Dead-lettering can put a due message (zero TTL) behind a queue already visited;
        // cycles without a reject are dropped, so this ends.
        while self.expiry_hint.is_some_and(|t| t <= now) {
            for slot in 0..self.queues.len() {
                self.expire(now, QueueId(slot));
            }
            self.expiry_hint = self.earliest_head_expiry();
        }
    }

    /// Ready messages in a queue, or `None` if there is no such queue.
    pub fn queue_len(&self, name: &str) -> Option<usize> {
        self.queue_ids.get(name).map(|&id| self.queue(id).ready.len())
    }

    /// Unacked deliveries from a queue, or `None` if there is no such queue.
    pub fn unacked_len(&self, name: &str) -> Option<usize> {
        self.queue_ids.get(name).map(|&id| self.queue(id).unacked)
    }

    /// Consumers of a queue, or `None` if there is no such queue.
    pub fn consumer_count(&self, name: &str) -> Option<usize> {
        self.queue_ids.get(name).map(|&id| self.queue(id).consumers.len())
    }

    /// The ready messages of a queue, head first, or `None` if there is no such queue.
    pub fn peek(&self, name: &str) -> Option<impl Iterator<Item = &Envelope> + '_> {
        let id = *self.queue_ids.get(name)?;
        Some(self.queue(id).ready.iter().map(|m| &m.envelope))
    }

    /// Every queue name, sorted.
    pub fn queue_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.queue_ids.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// True if the exchange exists (`""` always does).
    pub fn exchange_exists(&self, name: &str) -> bool {
        name.is_empty() || self.exchanges.contains_key(name)
    }

    /// The kind of an exchange, or `None` if there is no such exchange (`""` is `Direct`).
    pub fn exchange_kind(&self, name: &str) -> Option<ExchangeKind> {
        if name.is_empty() {
            return Some(ExchangeKind::Direct);
        }
        self.exchanges.get(name).map(|x| x.kind)
    }

    /// True if the queue exists.
    pub fn queue_exists(&self, name: &str) -> bool {
        self.queue_ids.contains_key(name)
    }

    /// The options a queue was declared with, or `None` if there is no such queue.
    pub fn queue_options(&self, name: &str) -> Option<&QueueOptions> {
        self.queue_ids.get(name).map(|&id| &self.queue(id).options)
    }

    /// The explicit bindings of a queue as `(exchange, binding key)`, sorted (the implicit
    /// default-exchange binding is not listed). Empty for a missing queue.
    pub fn bindings_of(&self, queue: &str) -> Vec<(&str, &str)> {
        let Some(&id) = self.queue_ids.get(queue) else {
            return Vec::new();
        };
        let mut out: Vec<(&str, &str)> = self
            .exchanges
            .iter()
            .flat_map(|(name, x)| {
                x.bindings.iter().filter(move |b| b.queue == id).map(move |b| (name.as_str(), b.key.as_str()))
            })
            .collect();
        out.sort_unstable();
        out
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct QueueId(usize);

#[derive(Debug)]
struct Exchange {
    kind: ExchangeKind,
    bindings: Vec<Binding>,
}

#[derive(Debug)]
struct Binding {
    key: String,
    queue: QueueId,
}

#[derive(Debug)]
struct Queue {
    name: String,
    options: QueueOptions,
    ready: VecDeque<Stored>,
    consumers: Vec<ConsumerState>,
    next_consumer: usize,
    unacked: usize,
}

#[derive(Debug)]
struct ConsumerState {
    tag: ConsumerTag,
    prefetch: u32,
    unacked: u32,
}

#[derive(Debug)]
struct Stored {
    envelope: Envelope,
    expires_at: Option<Instant>,
    redelivered: bool,
}

#[derive(Debug)]
struct Unacked {
    consumer: ConsumerTag,
    queue: QueueId,
    message: Stored,
}

//! One connection being served: its channels, consumers, unsettled deliveries and
//! unconfirmed publishes. A [`Session`] lives as long as its connection; what outlives it is in
//! [`Io`].

use std::collections::HashMap;
use std::time::{Duration, Instant};

use amiquip::{Channel, Connection, Consumer, ConsumerMessage, ConsumerOptions};
use crossbeam_channel::{Select, TryRecvError};
use microfw_core::link::LinkOp;
use microfw_core::{Delivery, DeliveryTag, LinkId, Publish, PublishError, Source, Subscribe};
use microfw_core::{SubscriptionId, Transport};

use super::convert::{incoming, scrub};
use super::declare::{DeclareError, Declarer};
use super::io::{End, Io, Item};
use super::ledger::{AckCmd, AckLedger};
use super::publisher::{ChannelClosed, Publisher};
use crate::{decode, encode, publish_topology, topology};

/// One consumer of a subscription (micro_framework RPC has one per target queue).
struct Consuming<'c> {
    sub: SubscriptionId,
    queue: String,
    consumer: Consumer<'c>,
}

/// A connection being served.
pub(super) struct Session<'a> {
    io: &'a mut Io,
    conn: &'a mut Connection,
    /// The channel every consumer uses.
    consume: &'a Channel,
    publisher: Publisher,
    declarer: Declarer,
    consumers: Vec<Consuming<'a>>,
    ledger: AckLedger<amiquip::Delivery>,
    /// Our delivery tags to the consume channel's.
    tags: HashMap<DeliveryTag, u64>,
    acks: Vec<AckCmd<amiquip::Delivery>>,
}

/// Backlog items carried out per pass, so consumers and confirms get their turn.
const ITEMS_PER_PASS: usize = 4096;
/// Messages taken from one consumer per pass.
const DELIVERIES_PER_PASS: usize = 1024;

impl<'a> Session<'a> {
    pub(super) fn new(
        io: &'a mut Io,
        conn: &'a mut Connection,
        consume: &'a Channel,
        publisher: Publisher,
    ) -> Self {
        Session {
            io,
            conn,
            consume,
            publisher,
            declarer: Declarer::default(),
            consumers: Vec::new(),
            ledger: AckLedger::new(),
            tags: HashMap::new(),
            acks: Vec::new(),
        }
    }

    /// Serves the connection until the link closes or the connection is lost; publishes still
    /// waiting for their confirm then fail with `LinkDown`.
    pub(super) fn serve(&mut self) -> End {
        let end = match self.run() {
            Ok(()) => End::Closed,
            Err(end) => end,
        };
        let error = PublishError::LinkDown(match &end {
            End::Closed => "the link closed before the broker confirmed the publish".into(),
            End::Lost(reason) => format!("the AMQP connection was lost before the confirm ({reason})"),
        });
        self.publisher.fail_all(&error, &mut self.io.out.confirms);
        self.io.flush_out();
        end
    }

    fn run(&mut self) -> Result<(), End> {
        self.restore()?;
        loop {
            if self.io.backlog.is_empty() {
                self.wait_for_anything();
            }
            self.drain_consumers()?;
            self.drain_confirms()?;
            loop {
                match self.io.cmds.try_recv() {
                    Ok(cmd) => self.io.take_cmd(cmd),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        // Dropped without close: close without waiting.
                        self.io.backlog.push_back(Item::Close(Instant::now()));
                        break;
                    }
                }
            }
            let mut closing = None;
            for _ in 0..ITEMS_PER_PASS {
                let Some(item) = self.io.backlog.pop_front() else { break };
                match item {
                    Item::Op(op) => self.op(op)?,
                    Item::Barrier(b) => {
                        self.flush_acks()?;
                        b.open(self.io.barrier_result());
                    }
                    Item::Close(deadline) => {
                        closing = Some(deadline);
                        break;
                    }
                }
            }
            self.flush_acks()?;
            self.io.flush_out();
            if let Some(deadline) = closing {
                return self.close(deadline);
            }
        }
    }

    /// Blocks until a command, a confirm, a return or a consumer message is ready.
    fn wait_for_anything(&self) {
        let mut select = Select::new();
        select.recv(&self.io.cmds);
        self.publisher.watch(&mut select);
        for c in &self.consumers {
            select.recv(c.consumer.receiver());
        }
        // The timeout only bounds a wait nothing interrupts (nothing is due at it).
        let _ = select.ready_timeout(Duration::from_secs(1));
    }

    /// Declares and consumes every subscription, then puts the publishes that waited for a
    /// connection, and after them the barriers that did, at the head of the backlog.
    fn restore(&mut self) -> Result<(), End> {
        let subs: Vec<Subscribe> = self.io.subs.values().cloned().collect();
        for s in &subs {
            self.start(s)?;
        }
        let io = &mut *self.io;
        for b in io.barriers.drain(..).rev() {
            io.backlog.push_front(Item::Barrier(b));
        }
        for (_, p) in io.waiting.drain(..).rev() {
            io.backlog.push_front(Item::Op(LinkOp::Publish(p)));
        }
        Ok(())
    }

    fn op(&mut self, op: LinkOp) -> Result<(), End> {
        match op {
            LinkOp::Subscribe(s) => {
                self.io.record(s.clone());
                self.start(&s)
            }
            LinkOp::Unsubscribe(id) => self.unsubscribe(id),
            LinkOp::Publish(p) => self.publish(p),
            LinkOp::Ack(tag) => {
                if let Some(channel_tag) = self.tags.remove(&tag) {
                    self.ledger.ack(channel_tag);
                }
                Ok(())
            }
            LinkOp::Reject(tag, requeue) => {
                let token = self.tags.remove(&tag).and_then(|t| self.ledger.take(t));
                match token {
                    Some(delivery) => delivery.reject(self.consume, requeue).map_err(|e| self.lost(&e)),
                    None => Ok(()),
                }
            }
        }
    }

    /// Declares `s`'s topology and starts its consumers. A refused declaration is recorded
    /// for the next barrier (and tried again on the next connection).
    fn start(&mut self, s: &Subscribe) -> Result<(), End> {
        if s.transport != Transport::Broker {
            self.io.fail(format!("subscription {} is not for the AMQP link", s.id));
            return Ok(());
        }
        let t = topology(&s.source, &self.io.settings);
        if let Source::Replies { .. } = s.source
            && self.io.had_reply_queue.contains(&s.id)
            && let Some(queue) = t.consume.first()
        {
            match self.declarer.queue_exists(self.conn, queue) {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(queue = %queue, "the reply queue was lost: calls waiting on it fail");
                    self.io.out.reply_queue_lost = true;
                }
                // Declaring it below says more.
                Err(DeclareError::Refused(_)) => {}
                Err(DeclareError::Lost(reason)) => return Err(End::Lost(reason)),
            }
        }
        match self.declarer.ensure(self.conn, &t) {
            Ok(()) => {}
            Err(DeclareError::Refused(reason)) => {
                self.io.fail(format!("subscription {}: {reason}", s.id));
                return Ok(());
            }
            Err(DeclareError::Lost(reason)) => return Err(End::Lost(reason)),
        }
        for queue in &t.consume {
            self.consume(s, queue)?;
        }
        if let Source::Replies { .. } = s.source {
            self.io.had_reply_queue.insert(s.id);
        }
        Ok(())
    }

    fn consume(&mut self, s: &Subscribe, queue: &str) -> Result<(), End> {
        let ch: &'a Channel = self.consume;
        let prefetch = u16::try_from(s.prefetch).unwrap_or(u16::MAX);
        ch.qos(0, prefetch, false).map_err(|e| self.lost(&e))?;
        let consumer = ch.basic_consume(queue, ConsumerOptions::default()).map_err(|e| self.lost(&e))?;
        tracing::debug!(queue, prefetch, "consuming");
        self.consumers.push(Consuming { sub: s.id, queue: queue.to_owned(), consumer });
        Ok(())
    }

    /// Cancels `id`'s consumers; deliveries they still had go to the driver (which hands
    /// them back).
    fn unsubscribe(&mut self, id: SubscriptionId) -> Result<(), End> {
        self.io.subs.remove(&id);
        let (gone, kept): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.consumers).into_iter().partition(|c| c.sub == id);
        self.consumers = kept;
        for c in gone {
            c.consumer.cancel().map_err(|e| self.lost(&e))?;
            while let Ok(message) = c.consumer.receiver().try_recv() {
                if let ConsumerMessage::Delivery(d) = message {
                    self.deliver(c.sub, d);
                }
            }
        }
        Ok(())
    }

    fn publish(&mut self, p: Publish) -> Result<(), End> {
        let sources = &self.io.sources;
        let encoded = encode(&p, &self.io.settings, |id| sources.get(&id))
            .and_then(|m| Ok((m, publish_topology(&p, &self.io.settings, |id| sources.get(&id))?)));
        let (message, needs) = match encoded {
            Ok(pair) => pair,
            Err(e) => {
                self.io.confirm(p.id, Err(PublishError::Other(format!("cannot publish: {e}"))));
                return Ok(());
            }
        };
        match self.declarer.ensure(self.conn, &needs) {
            Ok(()) => {}
            Err(DeclareError::Refused(reason)) => {
                self.io.confirm(p.id, Err(PublishError::Other(reason)));
                return Ok(());
            }
            Err(DeclareError::Lost(reason)) => {
                // Carried out again by the outage loop (it waits) or the next pass.
                self.io.backlog.push_front(Item::Op(LinkOp::Publish(p)));
                return Err(End::Lost(reason));
            }
        }
        let id = p.id;
        if let Err(e) = self.publisher.send(id, message) {
            self.io.backlog.push_front(Item::Op(LinkOp::Publish(p)));
            return self.reopen_publisher(scrub(&e.to_string(), &self.io.url));
        }
        Ok(())
    }

    /// The broker closed the publish channel (or the connection is gone): what was not
    /// confirmed fails, and a new channel is opened if the connection still stands. Exchanges
    /// are declared again before their next publish (a deleted one is the likely cause).
    fn reopen_publisher(&mut self, reason: String) -> Result<(), End> {
        let error =
            PublishError::LinkDown(format!("the publish channel closed before the confirm ({reason})"));
        self.publisher.fail_all(&error, &mut self.io.out.confirms);
        self.declarer.forget_exchanges();
        match Publisher::open(self.conn) {
            Ok(publisher) => {
                tracing::warn!(uri = %self.io.redacted, "the publish channel closed ({reason}); opened a new one");
                self.publisher = publisher;
                Ok(())
            }
            Err(e) => Err(self.lost(&e)),
        }
    }

    fn drain_consumers(&mut self) -> Result<(), End> {
        let mut cancelled = Vec::new();
        for i in 0..self.consumers.len() {
            for _ in 0..DELIVERIES_PER_PASS {
                let c = &self.consumers[i];
                match c.consumer.receiver().try_recv() {
                    Ok(ConsumerMessage::Delivery(d)) => {
                        let sub = c.sub;
                        self.deliver(sub, d);
                    }
                    Ok(ConsumerMessage::ServerCancelled) => {
                        cancelled.push(i);
                        break;
                    }
                    Ok(ConsumerMessage::ClientCancelled) => break,
                    Ok(
                        ConsumerMessage::ServerClosedChannel(e) | ConsumerMessage::ServerClosedConnection(e),
                    ) => {
                        return Err(self.lost(&e));
                    }
                    Ok(ConsumerMessage::ClientClosedChannel | ConsumerMessage::ClientClosedConnection) => {
                        return Err(End::Lost("the consume channel closed".into()));
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        return Err(End::Lost("the connection's IO thread ended".into()));
                    }
                }
            }
        }
        for i in cancelled.into_iter().rev() {
            let c = self.consumers.remove(i);
            self.resume(c.sub, &c.queue)?;
        }
        Ok(())
    }

    /// The broker cancelled the consumer of `queue` (the queue was deleted): declare it again
    /// and consume it again. A reply queue lost this way fails the calls waiting on it.
    fn resume(&mut self, sub: SubscriptionId, queue: &str) -> Result<(), End> {
        let Some(s) = self.io.subs.get(&sub).cloned() else { return Ok(()) };
        tracing::warn!(queue, "the broker cancelled the consumer (queue deleted?); declaring it again");
        if let Source::Replies { .. } = s.source {
            self.io.out.reply_queue_lost = true;
        }
        self.declarer.forget_queue(queue);
        match self.declarer.ensure(self.conn, &topology(&s.source, &self.io.settings)) {
            Ok(()) => self.consume(&s, queue),
            Err(DeclareError::Refused(reason)) => {
                self.io.fail(format!("subscription {sub}: {reason}"));
                Ok(())
            }
            Err(DeclareError::Lost(reason)) => Err(End::Lost(reason)),
        }
    }

    fn deliver(&mut self, sub: SubscriptionId, mut d: amiquip::Delivery) {
        let Some(source) = self.io.sources.get(&sub) else { return };
        let message = incoming(
            std::mem::take(&mut d.exchange),
            std::mem::take(&mut d.routing_key),
            d.redelivered,
            &std::mem::take(&mut d.properties),
            std::mem::take(&mut d.body),
        );
        let envelope = decode(source, message);
        self.io.last_tag += 1;
        let tag = DeliveryTag::from_raw(self.io.last_tag);
        let channel_tag = d.delivery_tag();
        let redelivered = d.redelivered;
        // What is left of `d` is the token that settles it.
        self.ledger.insert(channel_tag, d);
        self.tags.insert(tag, channel_tag);
        self.io.out.deliveries.push(Delivery {
            link: LinkId::from_raw(0),
            tag,
            subscription: sub,
            redelivered,
            envelope,
        });
    }

    /// Reads the publish results that arrived.
    fn drain_confirms(&mut self) -> Result<(), End> {
        match self.publisher.drain(&mut self.io.out.confirms) {
            Ok(()) => Ok(()),
            Err(ChannelClosed) => self.reopen_publisher("closed by the broker".into()),
        }
    }

    fn flush_acks(&mut self) -> Result<(), End> {
        self.ledger.flush(&mut self.acks);
        let consume: &Channel = self.consume;
        for cmd in self.acks.drain(..) {
            let result = match cmd {
                AckCmd::Single(d) => d.ack(consume),
                AckCmd::Multiple(d) => d.ack_multiple(consume),
            };
            if let Err(e) = result {
                return Err(End::Lost(scrub(&e.to_string(), &self.io.url)));
            }
        }
        Ok(())
    }

    /// Everything before the close is carried out: wait for the outstanding confirms (until
    /// `deadline`), then end. Unsettled deliveries go back when the connection closes.
    fn close(&mut self, deadline: Instant) -> Result<(), End> {
        while !self.publisher.is_idle() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let mut select = Select::new();
            self.publisher.watch(&mut select);
            let _ = select.ready_timeout(deadline - now);
            self.drain_confirms()?;
            self.io.flush_out();
        }
        tracing::debug!(unsettled = self.ledger.unsettled(), "closing the AMQP link");
        Ok(())
    }

    fn lost(&self, e: &amiquip::Error) -> End {
        End::Lost(scrub(&e.to_string(), &self.io.url))
    }
}

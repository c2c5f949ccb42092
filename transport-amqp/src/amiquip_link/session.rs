//! One connection being served: its channels, consumers, unsettled deliveries and
//! unconfirmed publishes. A [`Session`] lives as long as its connection; what outlives it is in
//! [`Io`].

use std::collections::HashMap;
use std::time::{Duration, Instant};

use amiquip::{Channel, Confirm, Connection, Consumer, ConsumerMessage, ConsumerOptions, Return};
use crossbeam_channel::{Receiver, Select, TryRecvError};
use microfw_core::link::LinkOp;
use microfw_core::{Delivery, DeliveryTag, LinkId, Publish, PublishError, Source, Subscribe};
use microfw_core::{SubscriptionId, Transport};

use super::confirms::{Confirms, ReturnKey};
use super::convert::{incoming, properties_out, scrub};
use super::declare::{DeclareError, Declarer};
use super::io::{End, Io, Item};
use super::ledger::{AckCmd, AckLedger};
use crate::{decode, encode, publish_topology, topology};

/// The channels of one connection.
pub(super) struct Channels {
    consume: Channel,
    publish: Channel,
    confirms: Receiver<Confirm>,
    returns: Receiver<Return>,
}

impl Channels {
    pub(super) fn open(conn: &mut Connection) -> amiquip::Result<Self> {
        let consume = conn.open_channel(None)?;
        let publish = conn.open_channel(None)?;
        let returns = publish.listen_for_returns()?;
        let confirms = publish.listen_for_publisher_confirms()?;
        publish.enable_publisher_confirms()?;
        Ok(Channels { consume, publish, confirms, returns })
    }
}

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
    ch: &'a Channels,
    declarer: Declarer,
    consumers: Vec<Consuming<'a>>,
    ledger: AckLedger<amiquip::Delivery>,
    /// Our delivery tags to the consume channel's.
    tags: HashMap<DeliveryTag, u64>,
    confirms: Confirms,
    acks: Vec<AckCmd<amiquip::Delivery>>,
}

/// Backlog items carried out per pass, so consumers and confirms get their turn.
const ITEMS_PER_PASS: usize = 4096;
/// Messages taken from one consumer per pass.
const DELIVERIES_PER_PASS: usize = 1024;

impl<'a> Session<'a> {
    pub(super) fn new(io: &'a mut Io, conn: &'a mut Connection, ch: &'a Channels) -> Self {
        Session {
            io,
            conn,
            ch,
            declarer: Declarer::default(),
            consumers: Vec::new(),
            ledger: AckLedger::new(),
            tags: HashMap::new(),
            confirms: Confirms::new(),
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
        self.confirms.fail_all(&error, &mut self.io.out.confirms);
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
        select.recv(&self.ch.confirms);
        select.recv(&self.ch.returns);
        for c in &self.consumers {
            select.recv(c.consumer.receiver());
        }
        // The timeout only bounds a wait nothing interrupts (nothing is due at it).
        let _ = select.ready_timeout(Duration::from_secs(1));
    }

    /// Declares and consumes every subscription, sends the publishes that waited, and opens
    /// the barriers that waited for this.
    fn restore(&mut self) -> Result<(), End> {
        let subs: Vec<Subscribe> = self.io.subs.values().cloned().collect();
        for s in &subs {
            self.start(s)?;
        }
        while let Some((_, p)) = self.io.waiting.pop_front() {
            self.publish(p)?;
        }
        let result = self.io.barrier_result();
        for b in self.io.barriers.drain(..) {
            b.open(result.clone());
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
                    Some(delivery) => delivery.reject(&self.ch.consume, requeue).map_err(|e| self.lost(&e)),
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
        let channels: &'a Channels = self.ch;
        let ch = &channels.consume;
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
                self.io.waiting.push_front((Instant::now() + self.io.options.publish_wait, p));
                return Err(End::Lost(reason));
            }
        }
        let wire = amiquip::Publish {
            body: &message.body,
            routing_key: message.routing_key.clone(),
            mandatory: message.mandatory,
            immediate: false,
            properties: properties_out(&message),
        };
        if let Err(e) = self.ch.publish.basic_publish(message.exchange.as_str(), wire) {
            let end = self.lost(&e);
            self.io.waiting.push_front((Instant::now() + self.io.options.publish_wait, p));
            return Err(end);
        }
        let key = message.mandatory.then_some(ReturnKey {
            exchange: message.exchange,
            routing_key: message.routing_key,
            correlation_id: message.properties.correlation_id,
        });
        self.confirms.sent(p.id, key);
        Ok(())
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

    /// Reads the confirms (and, before each, the returns that preceded it).
    fn drain_confirms(&mut self) -> Result<(), End> {
        loop {
            match self.ch.confirms.try_recv() {
                Ok(confirm) => {
                    self.drain_returns()?;
                    match confirm {
                        Confirm::Ack(c) => {
                            self.confirms.ack(c.delivery_tag, c.multiple, &mut self.io.out.confirms)
                        }
                        Confirm::Nack(c) => {
                            self.confirms.nack(c.delivery_tag, c.multiple, &mut self.io.out.confirms)
                        }
                    }
                }
                Err(TryRecvError::Empty) => return self.drain_returns(),
                Err(TryRecvError::Disconnected) => {
                    return Err(End::Lost("the publish channel closed".into()));
                }
            }
        }
    }

    fn drain_returns(&mut self) -> Result<(), End> {
        loop {
            match self.ch.returns.try_recv() {
                Ok(r) => {
                    let key = ReturnKey {
                        correlation_id: r.properties.correlation_id().clone(),
                        exchange: r.exchange,
                        routing_key: r.routing_key,
                    };
                    if !self.confirms.returned(&key) {
                        tracing::debug!(
                            exchange = %key.exchange,
                            routing_key = %key.routing_key,
                            "a returned message matched no publish"
                        );
                    }
                }
                Err(TryRecvError::Empty) => return Ok(()),
                Err(TryRecvError::Disconnected) => {
                    return Err(End::Lost("the publish channel closed".into()));
                }
            }
        }
    }

    fn flush_acks(&mut self) -> Result<(), End> {
        self.ledger.flush(&mut self.acks);
        let consume: &Channel = &self.ch.consume;
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
        while !self.confirms.is_empty() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let mut select = Select::new();
            select.recv(&self.ch.confirms);
            select.recv(&self.ch.returns);
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

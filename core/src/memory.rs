//! The memory link: how an Engine's subscriptions and publishes map onto the
//! [`MemoryBroker`] model. The simulator uses it directly; runtimes wrap a shared broker in a
//! mutex and use the same mapping as their embedded default transport.
//!
//! Names follow Nameko's layout so a broker dump reads familiarly (`<src>.events`,
//! `evt-<src>-<type>--<svc>.<route>`, `nameko-rpc`, `rpc-<svc>`), but the memory link is not a
//! wire: it moves [`Envelope`]s as they are, with no encoding. Delayed retries use the same
//! waiting-queue design as RabbitMQ (`microfw.retry.<queue>.<delay_ms>`, a TTL and a
//! dead-letter through the default exchange), and dead letters go to `microfw.dlq.<queue>`.

use std::collections::HashMap;

use crate::action::{Delivery, Destination, Publish, PublishError, Source, Subscribe};
use crate::broker::{BrokerDelivery, BrokerError, ConsumerTag, ExchangeKind, MemoryBroker, QueueOptions};
use crate::engine::{EXCHANGE_HEADER, ROUTING_KEY_HEADER};
use crate::ids::{DeliveryTag, IdMap, LinkId, PublishId, SubscriptionId};
use crate::link::LinkOp;
use crate::message::{Envelope, FieldValue};
use crate::route::{Dialect, HandlerType};
use crate::time::Instant;

/// One Engine's view of a [`MemoryBroker`]: which consumer feeds which subscription, and
/// which queue each subscription reads.
///
/// It holds no broker: every method takes the broker, so one broker can serve many links
/// (services) in one process. It does not deliver by itself: the owner pulls
/// [`MemoryBroker::next_delivery`] and hands each delivery to the link that owns its consumer
/// ([`MemoryLink::delivery`]).
#[derive(Debug)]
pub struct MemoryLink {
    link: LinkId,
    consumers: HashMap<ConsumerTag, SubscriptionId>,
    queues: HashMap<SubscriptionId, (String, ConsumerTag)>,
}

impl MemoryLink {
    /// A link numbered `link` (deliveries it converts carry this id).
    pub fn new(link: LinkId) -> Self {
        MemoryLink { link, consumers: HashMap::new(), queues: HashMap::new() }
    }

    /// This link's id.
    pub fn id(&self) -> LinkId {
        self.link
    }

    /// Declares the subscription's topology and starts its consumer.
    pub fn subscribe(&mut self, broker: &mut MemoryBroker, subscribe: &Subscribe) -> Result<(), BrokerError> {
        let queue = match &subscribe.source {
            Source::Event { source_service, event_type, handler_type, dialect: _, service, route } => {
                let exchange = events_exchange(source_service);
                broker.declare_exchange(&exchange, ExchangeKind::Topic)?;
                let queue = match handler_type {
                    HandlerType::ServicePool => {
                        format!("evt-{source_service}-{event_type}--{service}.{route}")
                    }
                    HandlerType::Singleton => format!("evt-{source_service}-{event_type}"),
                    HandlerType::Broadcast { identifier } => {
                        format!("evt-{source_service}-{event_type}--{service}.{route}-{identifier}")
                    }
                };
                broker.declare_queue(&queue, QueueOptions::default())?;
                broker.bind(&queue, &exchange, event_type)?;
                queue
            }
            Source::Rpc { service, dialect, .. } => {
                let exchange = rpc_exchange(*dialect);
                broker.declare_exchange(exchange, ExchangeKind::Topic)?;
                let queue = match dialect {
                    Dialect::Nameko => format!("rpc-{service}"),
                    Dialect::MicroFramework => format!("ufw-rpc-{service}"),
                };
                broker.declare_queue(&queue, QueueOptions::default())?;
                broker.bind(&queue, exchange, &format!("{service}.*"))?;
                queue
            }
            Source::WsRpc { service } => {
                broker.declare_exchange(WS_EXCHANGE, ExchangeKind::Topic)?;
                let queue = format!("ws-rpc-{service}");
                broker.declare_queue(&queue, QueueOptions::default())?;
                broker.bind(&queue, WS_EXCHANGE, &format!("{service}.*"))?;
                queue
            }
            Source::Replies { reply_to } => {
                let queue = format!("rpc.reply-{reply_to}");
                broker.declare_queue(&queue, QueueOptions::default())?;
                for exchange in
                    [rpc_exchange(Dialect::Nameko), rpc_exchange(Dialect::MicroFramework), WS_EXCHANGE]
                {
                    broker.declare_exchange(exchange, ExchangeKind::Topic)?;
                    broker.bind(&queue, exchange, reply_to)?;
                }
                queue
            }
        };
        let consumer = broker.consume(&queue, subscribe.prefetch)?;
        self.consumers.insert(consumer, subscribe.id);
        self.queues.insert(subscribe.id, (queue, consumer));
        Ok(())
    }

    /// Stops a subscription's consumer (`basic.cancel`): no new deliveries; the ones in
    /// flight stay unacked until the Engine settles them.
    pub fn unsubscribe(&mut self, broker: &mut MemoryBroker, id: SubscriptionId) -> Result<(), BrokerError> {
        match self.queues.get(&id) {
            Some((_, consumer)) => broker.stop_consuming(*consumer),
            None => Ok(()),
        }
    }

    /// Closes the link: every consumer is cancelled and whatever it left unacked goes back
    /// to its queue, as when an AMQP channel closes.
    pub fn close(&mut self, broker: &mut MemoryBroker) {
        for (_, consumer) in self.queues.values() {
            let _ = broker.cancel(*consumer);
        }
        self.consumers.clear();
        self.queues.clear();
    }

    /// Carries out a publish. A mandatory publish that reaches no queue fails with
    /// [`PublishError::Unroutable`]; everything else is confirmed at once (the broker is in
    /// memory).
    pub fn publish(
        &mut self,
        broker: &mut MemoryBroker,
        now: Instant,
        publish: Publish,
    ) -> Result<(), PublishError> {
        let Publish { destination, mandatory, mut envelope, transport, .. } = publish;
        let exchange = match destination {
            Destination::Event { source_service, event_type, .. } => {
                let exchange = events_exchange(&source_service);
                broker.declare_exchange(&exchange, ExchangeKind::Topic).map_err(other)?;
                envelope.routing_key = event_type;
                exchange
            }
            Destination::Rpc { service, method, dialect } => {
                let exchange = match transport {
                    crate::action::Transport::WebSocket => WS_EXCHANGE,
                    crate::action::Transport::Broker => rpc_exchange(dialect),
                };
                broker.declare_exchange(exchange, ExchangeKind::Topic).map_err(other)?;
                envelope.routing_key = format!("{service}.{method}");
                exchange.to_owned()
            }
            Destination::Reply { reply_to, .. } => {
                envelope.routing_key = reply_to;
                // Replies to WebSocket callers and AMQP callers meet on the same reply queue.
                rpc_exchange(Dialect::Nameko).to_owned()
            }
            Destination::Retry { subscription, delay } => {
                let queue = self.queue_of(subscription)?;
                let waiting = format!("microfw.retry.{queue}.{}", delay.as_millis());
                let options = QueueOptions {
                    message_ttl: Some(delay),
                    dead_letter_exchange: Some(String::new()),
                    dead_letter_routing_key: Some(queue),
                    ..QueueOptions::default()
                };
                broker.declare_queue(&waiting, options).map_err(other)?;
                envelope.routing_key = waiting;
                String::new()
            }
            Destination::DeadLetter { subscription } => {
                let queue = self.queue_of(subscription)?;
                let dlq = format!("microfw.dlq.{queue}");
                broker.declare_queue(&dlq, QueueOptions::default()).map_err(other)?;
                envelope.routing_key = dlq;
                String::new()
            }
        };
        let routed = broker.publish(now, &exchange, envelope).map_err(other)?;
        if mandatory && routed == 0 { Err(PublishError::Unroutable) } else { Ok(()) }
    }

    /// True when `consumer` feeds one of this link's subscriptions.
    pub fn owns(&self, consumer: ConsumerTag) -> bool {
        self.consumers.contains_key(&consumer)
    }

    /// Turns a broker delivery for one of this link's consumers into an Engine
    /// [`Delivery`], restoring a retried message's original exchange and routing key.
    /// `None` if the consumer is not this link's.
    pub fn delivery(&self, delivery: BrokerDelivery) -> Option<Delivery> {
        let subscription = *self.consumers.get(&delivery.consumer)?;
        let mut envelope = delivery.envelope;
        restore_origin(&mut envelope);
        Some(Delivery {
            link: self.link,
            tag: delivery.tag,
            subscription,
            redelivered: delivery.redelivered,
            envelope,
        })
    }

    /// The broker consumer feeding a subscription.
    pub fn consumer(&self, id: SubscriptionId) -> Option<ConsumerTag> {
        self.queues.get(&id).map(|(_, c)| *c)
    }

    /// The queue a subscription reads.
    pub fn queue(&self, id: SubscriptionId) -> Option<&str> {
        self.queues.get(&id).map(|(q, _)| q.as_str())
    }

    fn queue_of(&self, id: SubscriptionId) -> Result<String, PublishError> {
        self.queue(id)
            .map(str::to_owned)
            .ok_or_else(|| PublishError::Other(format!("no queue for subscription {id}")))
    }
}

/// Acks a delivery tag on the broker (a thin helper, for symmetry with the link's other verbs).
pub fn ack(broker: &mut MemoryBroker, tag: DeliveryTag) -> Result<(), BrokerError> {
    broker.ack(tag)
}

/// The events exchange of a service: `<service>.events`.
pub fn events_exchange(service: &str) -> String {
    format!("{service}.events")
}

/// The RPC exchange of a dialect.
pub fn rpc_exchange(dialect: Dialect) -> &'static str {
    match dialect {
        Dialect::Nameko => "nameko-rpc",
        Dialect::MicroFramework => "ufw-rpc",
    }
}

/// The exchange the memory link routes WebSocket RPC requests through.
const WS_EXCHANGE: &str = "microfw-ws";

fn restore_origin(envelope: &mut Envelope) {
    if let Some(FieldValue::Str(key)) = envelope.headers.get(ROUTING_KEY_HEADER) {
        envelope.routing_key = key.clone();
    }
    if let Some(FieldValue::Str(exchange)) = envelope.headers.get(EXCHANGE_HEADER) {
        envelope.exchange = exchange.clone();
    }
}

fn other(e: BrokerError) -> PublishError {
    PublishError::Other(e.to_string())
}

/// Many links over one [`MemoryBroker`]: the embedded transport of a whole process, where
/// several services exchange events and RPC with no broker installed.
///
/// Pure like the rest of the core: a runtime wraps it in a mutex, calls
/// [`pump`](Self::pump) after every operation (and at [`poll_timeout`](Self::poll_timeout), for
/// delayed retries), and forwards each [`Delivery`] to the Engine owning its link.
#[derive(Debug, Default)]
pub struct MemoryHub {
    broker: MemoryBroker,
    links: Vec<Option<MemoryLink>>,
    /// Which link owns each consumer (index into `links`): one lookup per delivery.
    owners: IdMap<ConsumerTag, usize>,
}

impl MemoryHub {
    /// An empty hub.
    pub fn new() -> Self {
        MemoryHub::default()
    }

    /// Opens a link (one per Engine).
    pub fn open_link(&mut self) -> LinkId {
        let id = LinkId::from_raw(self.links.len() as u32);
        self.links.push(Some(MemoryLink::new(id)));
        id
    }

    /// Closes a link: its consumers are cancelled and their unacked deliveries go back to
    /// their queues (as when an AMQP connection drops).
    pub fn close_link(&mut self, link: LinkId) {
        if let Some(slot) = self.links.get_mut(link.into_raw() as usize)
            && let Some(mut l) = slot.take()
        {
            l.close(&mut self.broker);
            let index = link.into_raw() as usize;
            self.owners.retain(|_, owner| *owner != index);
        }
    }

    /// Carries out an [`Action::Subscribe`](crate::Action::Subscribe) for `link`.
    pub fn subscribe(&mut self, link: LinkId, subscribe: &Subscribe) -> Result<(), BrokerError> {
        let index = link.into_raw() as usize;
        let Some(l) = self.links.get_mut(index).and_then(Option::as_mut) else {
            return Err(BrokerError::NoSuchQueue(format!("link {link} is closed")));
        };
        l.subscribe(&mut self.broker, subscribe)?;
        if let Some(consumer) = l.consumer(subscribe.id) {
            self.owners.insert(consumer, index);
        }
        Ok(())
    }

    /// Carries out an [`Action::Unsubscribe`](crate::Action::Unsubscribe) for `link`.
    pub fn unsubscribe(&mut self, link: LinkId, id: SubscriptionId) -> Result<(), BrokerError> {
        let index = link.into_raw() as usize;
        match self.links.get_mut(index).and_then(Option::as_mut) {
            Some(l) => l.unsubscribe(&mut self.broker, id),
            None => Ok(()),
        }
    }

    /// Carries out an [`Action::Publish`](crate::Action::Publish) for `link`; the result is
    /// the publish's confirm.
    pub fn publish(&mut self, link: LinkId, now: Instant, publish: Publish) -> Result<(), PublishError> {
        let index = link.into_raw() as usize;
        match self.links.get_mut(index).and_then(Option::as_mut) {
            Some(l) => l.publish(&mut self.broker, now, publish),
            None => Err(PublishError::LinkDown("link closed".to_owned())),
        }
    }

    /// Carries out `op` for `link`. A publish's confirm goes to `confirms` (the memory hub
    /// confirms at once); a subscription the broker refused comes back as the error, for the
    /// runtime to log (the other operations cannot fail in a way the Engine must hear of).
    pub fn apply(
        &mut self,
        link: LinkId,
        now: Instant,
        op: LinkOp,
        confirms: &mut Vec<(PublishId, Result<(), PublishError>)>,
    ) -> Result<(), (SubscriptionId, BrokerError)> {
        match op {
            LinkOp::Subscribe(s) => self.subscribe(link, &s).map_err(|e| (s.id, e))?,
            LinkOp::Unsubscribe(id) => {
                let _ = self.unsubscribe(link, id);
            }
            LinkOp::Publish(p) => {
                let id = p.id;
                confirms.push((id, self.publish(link, now, p)));
            }
            LinkOp::Ack(tag) => self.ack(tag),
            LinkOp::Reject(tag, requeue) => self.reject(now, tag, requeue),
        }
        Ok(())
    }

    /// Acks a delivery. Unknown tags (already settled, or from a closed link) are ignored.
    pub fn ack(&mut self, tag: DeliveryTag) {
        let _ = self.broker.ack(tag);
    }

    /// Rejects a delivery (`requeue`: back to its queue). Unknown tags are ignored.
    pub fn reject(&mut self, now: Instant, tag: DeliveryTag, requeue: bool) {
        let _ = self.broker.reject_at(now, tag, requeue);
    }

    /// Hands every delivery the broker can make at `now` to `deliver`, each addressed to its
    /// link ([`Delivery::link`]). Deliveries for a closed link go back to their queue.
    pub fn pump(&mut self, now: Instant, mut deliver: impl FnMut(Delivery)) {
        while let Some(d) = self.broker.next_delivery(now) {
            let tag = d.tag;
            let owner =
                self.owners.get(&d.consumer).and_then(|&i| self.links.get(i)).and_then(Option::as_ref);
            match owner.and_then(|l| l.delivery(d)) {
                Some(delivery) => deliver(delivery),
                None => {
                    // No live link consumes it any more: back to its queue, and stop pumping
                    // (the broker would hand the same message out again).
                    let _ = self.broker.reject_at(now, tag, true);
                    return;
                }
            }
        }
    }

    /// When the broker next needs [`pump`](Self::pump) for time to pass (a delayed retry's
    /// waiting queue expiring).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.broker.poll_timeout()
    }

    /// The broker, for inspection.
    pub fn broker(&self) -> &MemoryBroker {
        &self.broker
    }

    /// The broker, to declare or publish by hand (tests, standalone dispatchers).
    pub fn broker_mut(&mut self) -> &mut MemoryBroker {
        &mut self.broker
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::action::Transport;
    use crate::ids::PublishId;
    use crate::message::Envelope;

    fn event_subscription() -> Subscribe {
        Subscribe {
            id: SubscriptionId::from_raw(3),
            transport: Transport::Broker,
            source: Source::Event {
                source_service: "src".into(),
                event_type: "evt".into(),
                handler_type: HandlerType::ServicePool,
                dialect: Dialect::Nameko,
                service: "svc".into(),
                route: "h".into(),
            },
            prefetch: 10,
        }
    }

    fn emit(body: &'static str) -> Publish {
        Publish {
            id: PublishId::from_raw(1),
            transport: Transport::Broker,
            destination: Destination::Event {
                source_service: "src".into(),
                event_type: "evt".into(),
                dialect: Dialect::Nameko,
            },
            mandatory: false,
            envelope: Envelope::raw("", "", body),
        }
    }

    #[test]
    fn hub_routes_a_publish_from_one_link_to_the_subscriber_on_another() {
        let mut hub = MemoryHub::new();
        let consumer = hub.open_link();
        let producer = hub.open_link();
        hub.subscribe(consumer, &event_subscription()).unwrap();
        hub.publish(producer, Instant::EPOCH, emit("1")).unwrap();
        let mut got = Vec::new();
        hub.pump(Instant::EPOCH, |d| got.push(d));
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].link, consumer);
        assert_eq!(got[0].subscription, SubscriptionId::from_raw(3));
        assert_eq!(got[0].envelope.routing_key, "evt");
        assert_eq!(hub.broker().unacked_len("evt-src-evt--svc.h"), Some(1));
        hub.ack(got[0].tag);
        assert_eq!(hub.broker().unacked_len("evt-src-evt--svc.h"), Some(0));
    }

    #[test]
    fn closing_a_link_returns_its_unacked_deliveries_to_the_queue() {
        let mut hub = MemoryHub::new();
        let consumer = hub.open_link();
        hub.subscribe(consumer, &event_subscription()).unwrap();
        hub.publish(consumer, Instant::EPOCH, emit("1")).unwrap();
        hub.pump(Instant::EPOCH, |_| {});
        hub.close_link(consumer);
        assert_eq!(hub.broker().queue_len("evt-src-evt--svc.h"), Some(1));
        assert_eq!(
            hub.publish(consumer, Instant::EPOCH, emit("2")),
            Err(PublishError::LinkDown("link closed".into()))
        );
    }
}

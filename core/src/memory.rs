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
use crate::ids::{DeliveryTag, LinkId, SubscriptionId};
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
            Source::Rpc { service, dialect } => {
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
            Source::WsRpc => {
                broker.declare_exchange(WS_EXCHANGE, ExchangeKind::Topic)?;
                let queue = format!("ws-rpc-{}", self.link);
                broker.declare_queue(&queue, QueueOptions::default())?;
                broker.bind(&queue, WS_EXCHANGE, "#")?;
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
        let Publish { destination, mandatory, mut envelope, .. } = publish;
        let exchange = match destination {
            Destination::Event { source_service, event_type, .. } => {
                let exchange = events_exchange(&source_service);
                broker.declare_exchange(&exchange, ExchangeKind::Topic).map_err(other)?;
                envelope.routing_key = event_type;
                exchange
            }
            Destination::Rpc { service, method, dialect } => {
                let exchange = rpc_exchange(dialect);
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

//! Publishing: encoding, declaring what a publish needs, pipelined writes, and the confirm
//! collector.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{Confirmation, PublisherConfirm};
use microfw_core::link::LinkOp;
use microfw_core::{Publish, PublishError, PublishId};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::warn;

use super::super::Shared;
use super::super::convert;
use super::{InFlight, Item, NotSent, Queued, Session, open_publish_channel, poll_once};
use crate::encode::{encode, publish_topology};
use crate::model::OutgoingMessage;
use crate::topology::Topology;

impl Session {
    /// Encodes and declares for each publish, then writes them all and hands their confirms to
    /// the collector.
    pub(super) async fn publish_batch(&mut self, publishes: Vec<(Publish, Instant)>) {
        let mut ready = Vec::with_capacity(publishes.len());
        let mut unsent = Vec::new();
        // A publish to a missing exchange closed the channel: reopen it (forgetting what was
        // declared) before deciding what these publishes need declared.
        if !publishes.is_empty() {
            self.ensure_publish_channel().await;
        }
        for (publish, at) in publishes {
            match self.prepare(&publish).await {
                Ok(message) => ready.push((publish, at, message)),
                Err(NotSent::Down) => unsent.push((publish, at)),
                Err(NotSent::Failed(e)) => self.shared.confirm(publish.id, Err(e)),
            }
        }
        if !ready.is_empty() && !self.ensure_publish_channel().await {
            unsent.extend(ready.drain(..).map(|(p, at, _)| (p, at)));
        }
        if let Some(live) = &self.live
            && !ready.is_empty()
        {
            let channel = live.publish.clone();
            let confirms = live.confirms.clone();
            // Write every message: each future queues its frames when first polled, so they
            // are polled once in order, then awaited together.
            let mut writes = Vec::with_capacity(ready.len());
            for (_, _, (exchange, routing_key, properties, message)) in &ready {
                let options = BasicPublishOptions { mandatory: message.mandatory, immediate: false };
                let mut write = Box::pin(channel.basic_publish(
                    exchange.clone(),
                    routing_key.clone(),
                    options,
                    &message.body,
                    properties.clone(),
                ));
                let first = poll_once(&mut write).await;
                writes.push((write, first));
            }
            let mut results = Vec::with_capacity(writes.len());
            for (write, first) in writes {
                results.push(match first {
                    Poll::Ready(result) => result,
                    Poll::Pending => write.await,
                });
            }
            let down = !channel.status().connected() && self.is_down();
            for ((publish, at, _), result) in ready.into_iter().zip(results) {
                match result {
                    Ok(confirm) => {
                        self.in_flight.count.fetch_add(1, Ordering::AcqRel);
                        if let Err(mpsc::error::SendError((id, _))) = confirms.send((publish.id, confirm)) {
                            self.in_flight.done();
                            self.shared.confirm(
                                id,
                                Err(PublishError::LinkDown("the publish channel closed".into())),
                            );
                        }
                    }
                    // Never written: it waits for the reconnect.
                    Err(_) if down => unsent.push((publish, at)),
                    Err(e) => self.shared.confirm(
                        publish.id,
                        Err(PublishError::LinkDown(format!("not published: {}", self.setup.scrub(e)))),
                    ),
                }
            }
        }
        for (publish, at) in unsent.into_iter().rev() {
            self.queue.push_front(Queued { item: Item::Op(LinkOp::Publish(publish)), at });
        }
    }

    /// Declares what `publish` needs (once per connection) and encodes it.
    pub(super) async fn prepare(&mut self, publish: &Publish) -> Result<Prepared, NotSent> {
        let failed = |text: String| NotSent::Failed(PublishError::Other(text));
        let sources = &self.sources;
        let settings = &self.setup.settings;
        let needs =
            publish_topology(publish, settings, |id| sources.get(&id)).map_err(|e| failed(e.to_string()))?;
        let message = encode(publish, settings, |id| sources.get(&id)).map_err(|e| failed(e.to_string()))?;
        let exchange = convert::short("exchange", &message.exchange).map_err(|e| failed(e.to_string()))?;
        let routing_key =
            convert::short("routing key", &message.routing_key).map_err(|e| failed(e.to_string()))?;
        let properties = convert::properties(&message).map_err(|e| failed(e.to_string()))?;
        let missing = Topology {
            exchanges: needs
                .exchanges
                .into_iter()
                .filter(|e| !self.declared_exchanges.contains(&e.name))
                .collect(),
            queues: needs.queues.into_iter().filter(|q| !self.declared_queues.contains(&q.name)).collect(),
            bindings: needs.bindings,
            consume: Vec::new(),
        };
        let nothing_missing =
            missing.exchanges.is_empty() && missing.queues.is_empty() && missing.bindings.is_empty();
        if !nothing_missing && let Err(e) = self.declare(&missing).await {
            return Err(if self.is_down() { NotSent::Down } else { failed(e.0) });
        }
        Ok((exchange, routing_key, properties, message))
    }

    /// True when the publishing channel is usable, reopening it after the broker closed it
    /// (a publish to a missing exchange). What was declared may be gone too: it is declared
    /// again.
    pub(super) async fn ensure_publish_channel(&mut self) -> bool {
        let Some(live) = &self.live else { return false };
        if live.publish.status().connected() {
            return true;
        }
        if !live.conn.status().connected() {
            return false;
        }
        warn!("the AMQP publish channel closed; reopening it");
        match open_publish_channel(&live.conn, self.shared.clone(), self.in_flight.clone()).await {
            Ok((channel, confirms)) => {
                self.declared_exchanges.clear();
                self.declared_queues.clear();
                if let Some(live) = &mut self.live {
                    live.publish = channel;
                    live.confirms = confirms;
                }
                true
            }
            Err(e) => {
                warn!(error = %self.setup.scrub(e), "cannot reopen the publish channel");
                false
            }
        }
    }
}

type Prepared = (ShortString, ShortString, lapin::BasicProperties, OutgoingMessage);

/// Reports publish confirms as they come (in any order), until the publish channel is gone
/// and every confirm it had in flight resolved.
pub(super) async fn collect_confirms(
    mut rx: mpsc::UnboundedReceiver<(PublishId, PublisherConfirm)>,
    shared: Arc<Shared>,
    in_flight: Arc<InFlight>,
) {
    let mut pending = FuturesUnordered::new();
    loop {
        tokio::select! {
            item = rx.recv() => match item {
                Some((id, confirm)) => pending.push(async move { (id, confirm.await) }),
                None => break,
            },
            Some((id, result)) = pending.next(), if !pending.is_empty() => {
                shared.confirm(id, confirmation(result));
                in_flight.done();
            }
        }
    }
    while let Some((id, result)) = pending.next().await {
        shared.confirm(id, confirmation(result));
        in_flight.done();
    }
}

fn confirmation(result: lapin::Result<Confirmation>) -> Result<(), PublishError> {
    match result {
        Ok(Confirmation::Ack(None) | Confirmation::NotRequested) => Ok(()),
        Ok(Confirmation::Ack(Some(_))) => Err(PublishError::Unroutable),
        Ok(Confirmation::Nack(_)) => Err(PublishError::Nacked),
        Err(e) => Err(PublishError::LinkDown(format!("no confirm from the broker: {e}"))),
    }
}

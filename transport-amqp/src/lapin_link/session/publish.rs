//! Publishing: encoding, declaring what a publish needs, pipelined writes, and the confirm
//! collector.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;

use bytes::Bytes;
use futures_util::future::join_all;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{Confirmation, PublisherConfirm};
use microfw_core::link::LinkOp;
use microfw_core::{Destination, Publish, PublishError, PublishId};
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
    /// the collector (in one message).
    /// `publishes` is left empty (with its capacity).
    pub(super) async fn publish_batch(&mut self, publishes: &mut Vec<(Publish, Instant)>) {
        let mut ready = Vec::with_capacity(publishes.len());
        let mut wire = Vec::with_capacity(publishes.len());
        let mut unsent = Vec::new();
        // A publish to a missing exchange closed the channel: reopen it (forgetting what was
        // declared) before deciding what these publishes need declared.
        if !publishes.is_empty() {
            self.ensure_publish_channel().await;
        }
        for (publish, at) in publishes.drain(..) {
            match self.prepare(&publish).await {
                Ok(prepared) => {
                    ready.push((publish, at));
                    wire.push(prepared);
                }
                Err(NotSent::Down) => unsent.push((publish, at)),
                Err(NotSent::Failed(e)) => self.shared.confirm(publish.id, Err(e)),
            }
        }
        if !ready.is_empty() && !self.ensure_publish_channel().await {
            unsent.append(&mut ready);
        }
        if let Some(live) = &self.live
            && !ready.is_empty()
        {
            let channel = live.publish.clone();
            let confirms = live.confirms.clone();
            // The bodies outlive the writes, which borrow them; the rest moves into the writes.
            let mut heads = Vec::with_capacity(wire.len());
            let mut bodies = Vec::with_capacity(wire.len());
            for Prepared { exchange, routing_key, properties, mandatory, body } in wire {
                heads.push((exchange, routing_key, properties, mandatory));
                bodies.push(body);
            }
            // Write every message: each future queues its frames when first polled, so they
            // are polled once in order, then awaited together. A `join_all` of at most
            // WRITE_CHUNK futures keeps them in one allocation and polls them in order.
            let mut writes = Vec::with_capacity(heads.len().div_ceil(WRITE_CHUNK));
            let mut heads = heads.into_iter();
            let mut body_of = bodies.iter();
            while heads.len() > 0 {
                let chunk = heads.by_ref().take(WRITE_CHUNK).zip(body_of.by_ref()).map(
                    |((exchange, routing_key, properties, mandatory), body)| {
                        let options = BasicPublishOptions { mandatory, immediate: false };
                        channel.basic_publish(exchange, routing_key, options, body, properties)
                    },
                );
                let mut write = join_all(chunk);
                let first = poll_once(&mut write).await;
                writes.push((write, first));
            }
            let mut results = Vec::with_capacity(ready.len());
            for (write, first) in writes {
                results.extend(match first {
                    Poll::Ready(chunk) => chunk,
                    Poll::Pending => write.await,
                });
            }
            drop(bodies);
            let down = !channel.status().connected() && self.is_down();
            let mut written = Vec::with_capacity(results.len());
            for ((publish, at), result) in ready.into_iter().zip(results) {
                match result {
                    Ok(confirm) => written.push((publish.id, confirm)),
                    // Never written: it waits for the reconnect.
                    Err(_) if down => unsent.push((publish, at)),
                    Err(e) => self.shared.confirm(
                        publish.id,
                        Err(PublishError::LinkDown(format!("not published: {}", self.setup.scrub(e)))),
                    ),
                }
            }
            if !written.is_empty() {
                self.in_flight.count.fetch_add(written.len(), Ordering::AcqRel);
                if let Err(mpsc::error::SendError(written)) = confirms.send(written) {
                    self.in_flight.done_many(written.len());
                    let closed = || Err(PublishError::LinkDown("the publish channel closed".into()));
                    self.shared.confirm_all(written.into_iter().map(|(id, _)| (id, closed())));
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
        let message = encode(publish, settings, |id| sources.get(&id)).map_err(|e| failed(e.to_string()))?;
        // An event or RPC request needs its exchange only, the one it is published to; a reply
        // needs nothing. Once that exchange is declared on this connection, there is nothing
        // to look up.
        let known = match publish.destination {
            Destination::Event { .. } | Destination::Rpc { .. } => {
                self.declared_exchanges.contains(&message.exchange)
            }
            Destination::Reply { .. } => true,
            Destination::Retry { .. } | Destination::DeadLetter { .. } => false,
        };
        if !known {
            let needs = publish_topology(publish, settings, |id| sources.get(&id))
                .map_err(|e| failed(e.to_string()))?;
            let missing = Topology {
                exchanges: needs
                    .exchanges
                    .into_iter()
                    .filter(|e| !self.declared_exchanges.contains(&e.name))
                    .collect(),
                queues: needs
                    .queues
                    .into_iter()
                    .filter(|q| !self.declared_queues.contains(&q.name))
                    .collect(),
                bindings: needs.bindings,
                consume: Vec::new(),
            };
            let nothing_missing =
                missing.exchanges.is_empty() && missing.queues.is_empty() && missing.bindings.is_empty();
            if !nothing_missing && let Err(e) = self.declare(&missing).await {
                return Err(if self.is_down() { NotSent::Down } else { failed(e.0) });
            }
        }
        let exchange = convert::short("exchange", &message.exchange).map_err(|e| failed(e.to_string()))?;
        let routing_key =
            convert::short("routing key", &message.routing_key).map_err(|e| failed(e.to_string()))?;
        let properties = convert::properties(&message).map_err(|e| failed(e.to_string()))?;
        let OutgoingMessage { mandatory, body, .. } = message;
        Ok(Prepared { exchange, routing_key, properties, mandatory, body })
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

/// A publish encoded for lapin.
pub(super) struct Prepared {
    exchange: ShortString,
    routing_key: ShortString,
    properties: lapin::BasicProperties,
    mandatory: bool,
    body: Bytes,
}

/// Publishes whose writes share one allocation (a `join_all` at most this long polls its
/// futures in order, from one boxed slice: see the test below).
const WRITE_CHUNK: usize = 16;

/// The confirms of one batch of written publishes, for the collector.
pub(super) type Written = Vec<(PublishId, PublisherConfirm)>;

/// At most this many confirms are handed to the driver at once.
const CONFIRM_BATCH: usize = 1024;

/// Reports publish confirms as they come (in any order), until the publish channel is gone
/// and every confirm it had in flight resolved. The confirms that are ready together go to
/// the driver together (one lock, one wake-up).
pub(super) async fn collect_confirms(
    mut rx: mpsc::UnboundedReceiver<Written>,
    shared: Arc<Shared>,
    in_flight: Arc<InFlight>,
) {
    let mut pending = FuturesUnordered::new();
    let mut done = Vec::new();
    let report = |done: &mut Vec<(PublishId, Result<(), PublishError>)>| {
        let n = done.len();
        shared.confirm_all(done.drain(..));
        in_flight.done_many(n);
    };
    loop {
        tokio::select! {
            batch = rx.recv() => match batch {
                Some(batch) => {
                    for (id, confirm) in batch {
                        pending.push(async move { (id, confirm.await) });
                    }
                }
                None => break,
            },
            Some((id, result)) = pending.next(), if !pending.is_empty() => {
                done.push((id, confirmation(result)));
                // The others already resolved, without waiting. (The select above polls
                // `pending` with this task's waker again before the task sleeps.)
                while done.len() < CONFIRM_BATCH {
                    let Some(Some((id, result))) = pending.next().now_or_never() else { break };
                    done.push((id, confirmation(result)));
                }
                report(&mut done);
            }
        }
    }
    while let Some((id, result)) = pending.next().await {
        done.push((id, confirmation(result)));
        report(&mut done);
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Waker};

    use super::*;

    /// The writes of a chunk must queue their frames in order: `join_all` polls a chunk's
    /// futures in order, on its first poll.
    #[test]
    fn a_chunk_of_writes_is_first_polled_in_order() {
        for n in [1, WRITE_CHUNK - 1, WRITE_CHUNK] {
            let order = Arc::new(Mutex::new(Vec::new()));
            let futures = (0..n).map(|i| {
                let order = order.clone();
                async move {
                    order.lock().unwrap().push(i);
                    std::future::pending::<()>().await;
                }
            });
            let mut all = join_all(futures);
            let mut cx = Context::from_waker(Waker::noop());
            assert!(all.poll_unpin(&mut cx).is_pending());
            assert_eq!(*order.lock().unwrap(), (0..n).collect::<Vec<_>>());
        }
    }
}

//! Subscriptions: declaring and consuming, restarting consumers the broker stopped, and
//! settling deliveries in batches.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions,
    QueueDeclareOptions,
};
use lapin::protocol::AMQPSoftError;
use lapin::types::{FieldTable, ShortString};
use microfw_core::{Delivery, DeliveryTag, LinkId, Source, SubscriptionId};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::super::Shared;
use super::super::acks::{AckLedger, Frame, Settle};
use super::super::convert::{self, MAX_BROKER_TAG};
use super::{
    CONSUMER_RESTART, CONSUMER_RETRY, ConsumerChannel, Internal, Session, Sub, poll_once, soft_error,
};
use crate::decode::decode;
use crate::topology::topology;

impl Session {
    pub(super) async fn subscribe(&mut self, s: microfw_core::Subscribe) {
        if self.subs.contains_key(&s.id) {
            return;
        }
        self.sources.insert(s.id, s.source.clone());
        self.subs.insert(
            s.id,
            Sub {
                source: Arc::new(s.source),
                prefetch: s.prefetch,
                running: None,
                consumer_tags: Vec::new(),
            },
        );
        if let Err(e) = self.start(s.id, false).await {
            if self.is_down() {
                // Restored after the reconnect.
                return;
            }
            error!(subscription = %s.id, error = %e, "cannot subscribe");
            self.failures.push(format!("subscription {}: {e}", s.id));
            self.subs.remove(&s.id);
        }
    }

    pub(super) async fn unsubscribe(&mut self, id: SubscriptionId) {
        let Some(sub) = self.subs.remove(&id) else { return };
        let Some(key) = sub.running else { return };
        // The channel stays open: deliveries in flight are still settled on it.
        if let Some(consumer) = self.consumers.get(&key) {
            for tag in sub.consumer_tags {
                if let Err(e) = consumer.channel.basic_cancel(tag, BasicCancelOptions::default()).await {
                    debug!(subscription = %id, error = %e, "basic.cancel");
                }
            }
        }
    }

    /// Declares a subscription's topology and starts its consumers on a new channel.
    /// `restoring`: a reply queue that is gone was lost (its replies with it).
    pub(super) async fn start(&mut self, id: SubscriptionId, restoring: bool) -> Result<(), String> {
        let Some(sub) = self.subs.get(&id) else { return Ok(()) };
        let (source, prefetch) = (sub.source.clone(), sub.prefetch);
        let topo = topology(&source, &self.setup.settings);
        if restoring && let (Source::Replies { .. }, Some(queue)) = (&*source, topo.queues.first()) {
            self.check_reply_queue(&queue.name).await?;
        }
        self.declare(&topo).await.map_err(|e| e.0)?;
        let Some(live) = &self.live else { return Err("the connection is down".into()) };
        let channel = live.conn.create_channel().await.map_err(|e| self.setup.scrub(e))?;
        let qos = u16::try_from(prefetch).unwrap_or(u16::MAX);
        channel.basic_qos(qos, BasicQosOptions { global: false }).await.map_err(|e| self.setup.scrub(e))?;
        self.last_key = convert::next_key(self.last_key);
        let key = self.last_key;
        let mut tags = Vec::with_capacity(topo.consume.len());
        for (i, queue) in topo.consume.iter().enumerate() {
            let name = convert::short("queue", queue).map_err(|e| e.to_string())?;
            let tag = ShortString::from(format!("microfw.{id}.{key}.{i}"));
            let consumer = channel
                .basic_consume(name, tag, BasicConsumeOptions::default(), FieldTable::default())
                .await
                .map_err(|e| format!("cannot consume {queue}: {}", self.setup.scrub(e)))?;
            tags.push(consumer.tag());
            let task = ConsumerTask {
                sub: id,
                key,
                source: source.clone(),
                shared: self.shared.clone(),
                internal: self.internal_tx.clone(),
            };
            tokio::spawn(task.run(consumer));
        }
        let batch = settle_batch_size(prefetch);
        self.consumers.insert(key, ConsumerChannel { channel, ledger: AckLedger::default(), batch });
        if let Some(sub) = self.subs.get_mut(&id) {
            sub.running = Some(key);
            sub.consumer_tags = tags;
        }
        debug!(subscription = %id, queues = ?topo.consume, prefetch, "consuming");
        Ok(())
    }

    /// A passive declare of the reply queue: when it is gone, its replies are lost.
    pub(super) async fn check_reply_queue(&mut self, name: &str) -> Result<(), String> {
        let Some(live) = &self.live else { return Err("the connection is down".into()) };
        let queue = convert::short("queue", name).map_err(|e| e.to_string())?;
        let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
        match live.declare.queue_declare(queue, passive, FieldTable::default()).await {
            Ok(_) => Ok(()),
            Err(e) if soft_error(&e) == Some(AMQPSoftError::NOTFOUND) => {
                warn!(queue = name, "the reply queue is gone: pending calls' replies are lost");
                self.shared.reply_queue_lost();
                self.reopen_declare().await;
                Ok(())
            }
            Err(e) => Err(self.setup.scrub(e)),
        }
    }

    pub(super) async fn internal_event(&mut self, event: Internal) {
        match event {
            Internal::ConsumerEnded { sub, key, reason } => {
                let down = self.is_down();
                let Some(s) = self.subs.get_mut(&sub) else { return };
                if s.running != Some(key) || down {
                    return;
                }
                warn!(subscription = %sub, reason = %reason, "AMQP consumer stopped; restarting it");
                s.running = None;
                let tags = std::mem::take(&mut s.consumer_tags);
                // Other consumers of the subscription may still run on the channel: stop them
                // (the channel stays, for settling what they delivered).
                if let Some(consumer) = self.consumers.get(&key) {
                    if consumer.channel.status().connected() {
                        for tag in tags {
                            let _ = consumer.channel.basic_cancel(tag, BasicCancelOptions::default()).await;
                        }
                    } else {
                        self.consumers.remove(&key);
                    }
                }
                self.restart_later(sub, CONSUMER_RESTART);
            }
            Internal::Restart { sub } => {
                let Some(s) = self.subs.get(&sub) else { return };
                if s.running.is_some() || self.is_down() {
                    return;
                }
                match self.start(sub, true).await {
                    Ok(()) => info!(subscription = %sub, "AMQP consumer restarted"),
                    Err(e) if !self.is_down() => {
                        error!(subscription = %sub, error = %e, "cannot restart a consumer; retrying later");
                        self.restart_later(sub, CONSUMER_RETRY);
                    }
                    Err(_) => {}
                }
            }
        }
    }

    pub(super) fn restart_later(&self, sub: SubscriptionId, after: Duration) {
        let internal = self.internal_tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let _ = internal.send(Internal::Restart { sub });
        });
    }

    /// Sends the settlements held back (`self.deferred`) when `force`, or when a channel has
    /// [`settle_batch_size`] of them waiting; otherwise they wait at most [`SETTLE_DELAY`] for
    /// others to share their frame (a `multiple` ack), as a consumer acking every n deliveries
    /// or when idle does.
    pub(super) async fn settle(&mut self, force: bool) {
        if force || self.settles_due() {
            self.settle_deferred().await;
        } else if !self.deferred.is_empty() && self.deferred_since.is_none() {
            self.deferred_since = Some(Instant::now());
        }
    }

    /// Sends every settlement held back.
    pub(super) async fn settle_deferred(&mut self) {
        self.deferred_since = None;
        if !self.deferred.is_empty() {
            let mut settles = std::mem::take(&mut self.deferred);
            self.settle_batch(&settles).await;
            settles.clear();
            if self.deferred.is_empty() {
                self.deferred = settles; // keep the capacity
            }
        }
    }

    /// When the settlements held back must go out, if any are.
    pub(super) fn settle_deadline(&self) -> Option<Instant> {
        self.deferred_since.map(|since| since + SETTLE_DELAY)
    }

    /// True when a channel has a batch's worth of settlements held back.
    fn settles_due(&self) -> bool {
        let mut counts: Vec<(u32, usize)> = Vec::new();
        for (tag, _) in &self.deferred {
            let (key, _) = convert::unpack_tag(*tag);
            match counts.iter_mut().find(|(k, _)| *k == key) {
                Some((_, n)) => *n += 1,
                None => counts.push((key, 1)),
            }
        }
        counts.iter().any(|(key, n)| self.consumers.get(key).is_some_and(|c| *n >= c.batch))
    }

    /// Acks and rejects, batched per consumer channel ([`AckLedger`]). Tags of channels that
    /// are gone are dropped silently.
    pub(super) async fn settle_batch(&mut self, settles: &[(DeliveryTag, Settle)]) {
        let mut by_key: Vec<(u32, Vec<(u64, Settle)>)> = Vec::new();
        for &(tag, settle) in settles {
            let (key, broker_tag) = convert::unpack_tag(tag);
            match by_key.iter_mut().find(|(k, _)| *k == key) {
                Some((_, batch)) => batch.push((broker_tag, settle)),
                None => by_key.push((key, vec![(broker_tag, settle)])),
            }
        }
        for (key, batch) in by_key {
            let Some(consumer) = self.consumers.get_mut(&key) else { continue };
            let frames = consumer.ledger.plan(&batch);
            let channel = consumer.channel.clone();
            let mut writes: Vec<Pin<Box<dyn Future<Output = lapin::Result<()>> + Send + '_>>> = Vec::new();
            for frame in frames {
                let mut write: Pin<Box<dyn Future<Output = lapin::Result<()>> + Send + '_>> = match frame {
                    Frame::Ack { tag, multiple } => {
                        Box::pin(channel.basic_ack(tag, BasicAckOptions { multiple }))
                    }
                    Frame::Reject { tag, requeue } => {
                        Box::pin(channel.basic_reject(tag, BasicRejectOptions { requeue }))
                    }
                };
                if poll_once(&mut write).await.is_pending() {
                    writes.push(write);
                }
            }
            for write in writes {
                if let Err(e) = write.await {
                    debug!(error = %e, "settling on a closed channel (the broker redelivers)");
                }
            }
            if !channel.status().connected() {
                self.consumers.remove(&key);
            }
        }
    }
}

/// How long a settlement may be held back for others to share its frame.
pub(super) const SETTLE_DELAY: Duration = Duration::from_millis(2);
/// The most settlements of one channel held back.
const MAX_SETTLE_BATCH: u32 = 64;

/// How many settlements of a channel consuming with `prefetch` may wait for one frame: a
/// quarter of the prefetch (so at most a quarter of the window waits for its ack), at most
/// [`MAX_SETTLE_BATCH`]; 1 (nothing waits) under a prefetch of 8. A prefetch of 0 (no limit:
/// reply queues) takes the most.
pub(super) fn settle_batch_size(prefetch: u32) -> usize {
    let size = if prefetch == 0 { MAX_SETTLE_BATCH } else { (prefetch / 4).clamp(1, MAX_SETTLE_BATCH) };
    size as usize
}

/// One consumer's task: decodes deliveries into the shared inbox.
pub(super) struct ConsumerTask {
    sub: SubscriptionId,
    key: u32,
    source: Arc<Source>,
    shared: Arc<Shared>,
    internal: mpsc::UnboundedSender<Internal>,
}

/// At most this many deliveries are handed to the driver at once.
const DELIVERY_BATCH: usize = 256;

impl ConsumerTask {
    pub(super) async fn run(self, mut consumer: lapin::Consumer) {
        let mut batch = Vec::new();
        let reason = 'consume: loop {
            let mut next = consumer.next().await;
            // Then every delivery already there, without waiting: they go to the driver
            // together (one lock, one wake-up). The next `.await` polls the stream with this
            // task's waker again before the task sleeps.
            loop {
                match next {
                    Some(Ok(delivery)) => {
                        if delivery.delivery_tag > MAX_BROKER_TAG {
                            self.shared.deliver_all(&mut batch);
                            break 'consume "the channel's delivery tags ran out".to_owned();
                        }
                        batch.push(self.delivery(delivery));
                    }
                    Some(Err(e)) => {
                        self.shared.deliver_all(&mut batch);
                        break 'consume e.to_string();
                    }
                    None => {
                        self.shared.deliver_all(&mut batch);
                        break 'consume "cancelled".to_owned();
                    }
                }
                if batch.len() >= DELIVERY_BATCH {
                    break;
                }
                match consumer.next().now_or_never() {
                    Some(more) => next = more,
                    None => break,
                }
            }
            self.shared.deliver_all(&mut batch);
        };
        let _ = self.internal.send(Internal::ConsumerEnded { sub: self.sub, key: self.key, reason });
    }

    fn delivery(&self, delivery: lapin::message::Delivery) -> Delivery {
        let tag = convert::pack_tag(self.key, delivery.delivery_tag);
        let redelivered = delivery.redelivered;
        let envelope = decode(&self.source, convert::incoming(delivery));
        Delivery { link: LinkId::from_raw(0), tag, subscription: self.sub, redelivered, envelope }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quarter_of_the_prefetch_waits_for_one_frame_and_small_windows_none() {
        assert_eq!(settle_batch_size(256), 64);
        assert_eq!(settle_batch_size(1000), 64);
        assert_eq!(settle_batch_size(0), 64);
        assert_eq!(settle_batch_size(32), 8);
        assert_eq!(settle_batch_size(7), 1);
        assert_eq!(settle_batch_size(3), 1);
        assert_eq!(settle_batch_size(1), 1);
    }
}

//! The confirm-mode publish channel of a connection: sends encoded messages without waiting
//! and turns the broker's acks, nacks and returns into publish results ([`Confirms`]).
//!
//! The broker may close this channel on its own (a publish to an exchange that was deleted
//! meanwhile: 404): the session then fails what was unconfirmed and opens a new one, without
//! touching the consumers.

use amiquip::{Channel, Confirm, Connection, Return};
use crossbeam_channel::{Receiver, Select, TryRecvError};
use microfw_core::{PublishError, PublishId};

use super::confirms::{Confirms, Results, ReturnKey};
use super::convert::properties_out;
use crate::OutgoingMessage;

/// Why the publish channel stopped.
#[derive(Debug)]
pub(super) struct ChannelClosed;

/// A confirm-mode channel and the publishes waiting for their confirm.
pub(super) struct Publisher {
    channel: Channel,
    confirm_rx: Receiver<Confirm>,
    return_rx: Receiver<Return>,
    confirms: Confirms,
}

impl Publisher {
    /// Opens a channel in confirm mode, listening for confirms and returns.
    pub(super) fn open(conn: &mut Connection) -> amiquip::Result<Self> {
        let channel = conn.open_channel(None)?;
        let return_rx = channel.listen_for_returns()?;
        let confirm_rx = channel.listen_for_publisher_confirms()?;
        channel.enable_publisher_confirms()?;
        Ok(Publisher { channel, confirm_rx, return_rx, confirms: Confirms::new() })
    }

    /// Publishes `message` for publish `id`, without waiting for the broker.
    pub(super) fn send(&mut self, id: PublishId, message: OutgoingMessage) -> amiquip::Result<()> {
        let wire = amiquip::Publish {
            body: &message.body,
            routing_key: message.routing_key.clone(),
            mandatory: message.mandatory,
            immediate: false,
            properties: properties_out(&message),
        };
        self.channel.basic_publish(message.exchange.as_str(), wire)?;
        let key = message.mandatory.then_some(ReturnKey {
            exchange: message.exchange,
            routing_key: message.routing_key,
            correlation_id: message.properties.correlation_id,
        });
        self.confirms.sent(id, key);
        Ok(())
    }

    /// Reads the confirms that arrived (and, before each, the returns that preceded it) into
    /// `out`. `Err` when the channel is gone.
    pub(super) fn drain(&mut self, out: &mut Results) -> Result<(), ChannelClosed> {
        loop {
            match self.confirm_rx.try_recv() {
                Ok(confirm) => {
                    self.drain_returns()?;
                    match confirm {
                        Confirm::Ack(c) => self.confirms.ack(c.delivery_tag, c.multiple, out),
                        Confirm::Nack(c) => self.confirms.nack(c.delivery_tag, c.multiple, out),
                    }
                }
                Err(TryRecvError::Empty) => return self.drain_returns(),
                Err(TryRecvError::Disconnected) => return Err(ChannelClosed),
            }
        }
    }

    /// Adds the confirm and return receivers to `select`.
    pub(super) fn watch<'s>(&'s self, select: &mut Select<'s>) {
        select.recv(&self.confirm_rx);
        select.recv(&self.return_rx);
    }

    /// True when no publish waits for its confirm.
    pub(super) fn is_idle(&self) -> bool {
        self.confirms.is_empty()
    }

    /// Every unconfirmed publish fails with `error`.
    pub(super) fn fail_all(&mut self, error: &PublishError, out: &mut Results) {
        self.confirms.fail_all(error, out);
    }

    fn drain_returns(&mut self) -> Result<(), ChannelClosed> {
        loop {
            match self.return_rx.try_recv() {
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
                Err(TryRecvError::Disconnected) => return Err(ChannelClosed),
            }
        }
    }
}

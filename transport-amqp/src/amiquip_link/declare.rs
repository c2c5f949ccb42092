//! Declaring topology on a channel of its own, so a refused declaration (RabbitMQ closes the
//! channel with 406 or 403) never takes the consumers or the publisher confirms with it.
//!
//! What was declared on this connection is cached: a publish re-declares nothing it already
//! declared. An exchange that exists with other flags (406 PRECONDITION_FAILED, typically an
//! events exchange a peer declared with another `auto_delete`) is adopted: the channel is
//! reopened and the exchange declared passively. A queue is never adopted that way (its
//! arguments matter to us): its 406 fails the declaration.

use std::collections::HashSet;

use amiquip::{Channel, Connection, ExchangeDeclareOptions, FieldTable, QueueDeclareOptions};

use super::convert::{exchange_type, table_out};
use crate::topology::{Binding, Exchange, Queue, Topology};

/// AMQP reply code PRECONDITION_FAILED.
const PRECONDITION_FAILED: u16 = 406;
/// AMQP reply code NOT_FOUND.
const NOT_FOUND: u16 = 404;

/// Why a declaration failed.
#[derive(Debug)]
pub(crate) enum DeclareError {
    /// The broker refused this declaration; the connection is fine.
    Refused(String),
    /// The connection is gone (the caller reconnects).
    Lost(String),
}

/// The declaring channel of one connection, and what was declared on the connection.
#[derive(Default)]
pub(crate) struct Declarer {
    channel: Option<Channel>,
    exchanges: HashSet<String>,
    queues: HashSet<String>,
    bindings: HashSet<(String, String, String)>,
}

impl std::fmt::Debug for Declarer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Declarer")
            .field("exchanges", &self.exchanges.len())
            .field("queues", &self.queues.len())
            .finish_non_exhaustive()
    }
}

impl Declarer {
    /// Declares what `topology` lists and was not declared yet on this connection: exchanges,
    /// then queues, then bindings.
    pub(crate) fn ensure(&mut self, conn: &mut Connection, topology: &Topology) -> Result<(), DeclareError> {
        for exchange in &topology.exchanges {
            if !self.exchanges.contains(&exchange.name) {
                self.exchange(conn, exchange)?;
                self.exchanges.insert(exchange.name.clone());
            }
        }
        for queue in &topology.queues {
            if !self.queues.contains(&queue.name) {
                self.queue(conn, queue)?;
                self.queues.insert(queue.name.clone());
            }
        }
        for binding in &topology.bindings {
            let key = (binding.queue.clone(), binding.exchange.clone(), binding.routing_key.clone());
            if !self.bindings.contains(&key) {
                self.bind(conn, binding)?;
                self.bindings.insert(key);
            }
        }
        Ok(())
    }

    /// True when queue `name` exists (a passive declare).
    pub(crate) fn queue_exists(&mut self, conn: &mut Connection, name: &str) -> Result<bool, DeclareError> {
        let result = self.channel(conn)?.queue_declare_passive(name).map(|_| ());
        match result {
            Ok(()) => Ok(true),
            Err(amiquip::Error::ServerClosedChannel { code: NOT_FOUND, .. }) => {
                self.channel = None;
                Ok(false)
            }
            Err(e) => Err(self.failed(e, &format!("queue {name}"))),
        }
    }

    /// Forgets every exchange (one may have been deleted under us), so the next
    /// [`ensure`](Self::ensure) declares them again.
    pub(crate) fn forget_exchanges(&mut self) {
        self.exchanges.clear();
    }

    /// Forgets queue `name` (it was deleted under us), so the next [`ensure`](Self::ensure)
    /// declares it and its bindings again.
    pub(crate) fn forget_queue(&mut self, name: &str) {
        self.queues.remove(name);
        self.bindings.retain(|(queue, _, _)| queue != name);
    }

    fn exchange(&mut self, conn: &mut Connection, e: &Exchange) -> Result<(), DeclareError> {
        let options = ExchangeDeclareOptions {
            durable: e.durable,
            auto_delete: e.auto_delete,
            internal: false,
            arguments: FieldTable::new(),
        };
        let result = self.channel(conn)?.exchange_declare(exchange_type(e.kind), e.name.as_str(), options);
        match result {
            Ok(_) => Ok(()),
            Err(amiquip::Error::ServerClosedChannel { code: PRECONDITION_FAILED, message, .. }) => {
                self.channel = None;
                let adopted = self.channel(conn)?.exchange_declare_passive(e.name.as_str()).map(|_| ());
                match adopted {
                    Ok(()) => {
                        tracing::warn!(
                            exchange = %e.name,
                            "the exchange exists with other flags ({message}); using it as it is"
                        );
                        Ok(())
                    }
                    Err(err) => Err(self.failed(err, &format!("exchange {}", e.name))),
                }
            }
            Err(err) => Err(self.failed(err, &format!("exchange {}", e.name))),
        }
    }

    fn queue(&mut self, conn: &mut Connection, q: &Queue) -> Result<(), DeclareError> {
        let options = QueueDeclareOptions {
            durable: q.durable,
            exclusive: q.exclusive,
            auto_delete: q.auto_delete,
            arguments: table_out(&q.arguments),
        };
        let result = self.channel(conn)?.queue_declare(q.name.as_str(), options).map(|_| ());
        result.map_err(|err| self.failed(err, &format!("queue {}", q.name)))
    }

    fn bind(&mut self, conn: &mut Connection, b: &Binding) -> Result<(), DeclareError> {
        let result = self.channel(conn)?.queue_bind(
            b.queue.as_str(),
            b.exchange.as_str(),
            b.routing_key.as_str(),
            FieldTable::new(),
        );
        result.map_err(|err| {
            self.failed(err, &format!("binding of {} to {} with {:?}", b.queue, b.exchange, b.routing_key))
        })
    }

    fn channel(&mut self, conn: &mut Connection) -> Result<&Channel, DeclareError> {
        if self.channel.is_none() {
            let channel = conn.open_channel(None).map_err(|e| DeclareError::Lost(e.to_string()))?;
            self.channel = Some(channel);
        }
        self.channel.as_ref().ok_or_else(|| DeclareError::Lost("no declaring channel".into()))
    }

    /// Classifies `err`: a closed channel is this declaration's failure (the channel is
    /// reopened next time), anything else is the connection's.
    fn failed(&mut self, err: amiquip::Error, what: &str) -> DeclareError {
        match err {
            amiquip::Error::ServerClosedChannel { code, message, .. } => {
                self.channel = None;
                DeclareError::Refused(format!("cannot declare {what}: {message} ({code})"))
            }
            amiquip::Error::ClientClosedChannel => {
                self.channel = None;
                DeclareError::Refused(format!("cannot declare {what}: the channel was closed"))
            }
            other => DeclareError::Lost(format!("declaring {what}: {other}")),
        }
    }
}

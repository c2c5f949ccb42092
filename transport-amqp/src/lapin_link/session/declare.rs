//! Declaring topology, adopting exchanges that exist with other flags.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::protocol::AMQPSoftError;
use lapin::types::FieldTable;
use microfw_core::broker::ExchangeKind;
use tracing::{info, warn};

use super::super::convert;
use super::{DeclareError, Session, soft_error};
use crate::topology::{Exchange, Queue, Topology};

impl Session {
    /// Declares `t` in order: exchanges, queues, bindings.
    pub(super) async fn declare(&mut self, t: &Topology) -> Result<(), DeclareError> {
        for exchange in &t.exchanges {
            self.declare_exchange(exchange).await?;
        }
        for queue in &t.queues {
            self.declare_queue(queue).await?;
        }
        for b in &t.bindings {
            let Some(live) = &self.live else { return Err(DeclareError("the connection is down".into())) };
            let names = (convert::short("queue", &b.queue), convert::short("exchange", &b.exchange));
            let (Ok(queue), Ok(exchange)) = names else {
                return Err(DeclareError(format!("binding {b:?}: a name is longer than 255 bytes")));
            };
            let key =
                convert::short("routing key", &b.routing_key).map_err(|e| DeclareError(e.to_string()))?;
            let bound = live
                .declare
                .queue_bind(queue, exchange, key, QueueBindOptions::default(), FieldTable::default())
                .await;
            if let Err(e) = bound {
                let text = format!(
                    "cannot bind {} to {} with {:?}: {}",
                    b.queue,
                    b.exchange,
                    b.routing_key,
                    self.setup.scrub(e)
                );
                self.reopen_declare().await;
                return Err(DeclareError(text));
            }
        }
        Ok(())
    }

    pub(super) async fn declare_exchange(&mut self, ex: &Exchange) -> Result<(), DeclareError> {
        let Some(live) = &self.live else { return Err(DeclareError("the connection is down".into())) };
        let name = convert::short("exchange", &ex.name).map_err(|e| DeclareError(e.to_string()))?;
        let kind = match ex.kind {
            ExchangeKind::Topic => lapin::ExchangeKind::Topic,
            ExchangeKind::Direct => lapin::ExchangeKind::Direct,
            ExchangeKind::Fanout => lapin::ExchangeKind::Fanout,
        };
        let passive = self.adopted.contains(&ex.name);
        let options = ExchangeDeclareOptions {
            passive,
            durable: ex.durable,
            auto_delete: ex.auto_delete,
            ..ExchangeDeclareOptions::default()
        };
        let result =
            live.declare.exchange_declare(name.clone(), kind.clone(), options, FieldTable::default()).await;
        match result {
            Ok(()) => {}
            Err(e) if !passive && soft_error(&e) == Some(AMQPSoftError::PRECONDITIONFAILED) => {
                self.reopen_declare().await;
                let Some(live) = &self.live else {
                    return Err(DeclareError("the connection is down".into()));
                };
                let options = ExchangeDeclareOptions { passive: true, ..options };
                if let Err(e) =
                    live.declare.exchange_declare(name, kind, options, FieldTable::default()).await
                {
                    let text = format!("cannot adopt exchange {}: {}", ex.name, self.setup.scrub(e));
                    self.reopen_declare().await;
                    return Err(DeclareError(text));
                }
                info!(exchange = %ex.name, durable = ex.durable, auto_delete = ex.auto_delete,
                    "exchange exists with other flags than ours: adopted as it is");
                self.adopted.insert(ex.name.clone());
            }
            Err(e) if passive && soft_error(&e) == Some(AMQPSoftError::NOTFOUND) => {
                // The adopted exchange is gone (an auto-delete exchange loses its last
                // binding): declare it again, with our flags (recursing once at most).
                info!(exchange = %ex.name, "an adopted exchange is gone: declaring it again");
                self.adopted.remove(&ex.name);
                self.reopen_declare().await;
                return Box::pin(self.declare_exchange(ex)).await;
            }
            Err(e) => {
                let text = format!("cannot declare exchange {}: {}", ex.name, self.setup.scrub(e));
                self.reopen_declare().await;
                return Err(DeclareError(text));
            }
        }
        self.declared_exchanges.insert(ex.name.clone());
        Ok(())
    }

    pub(super) async fn declare_queue(&mut self, q: &Queue) -> Result<(), DeclareError> {
        let Some(live) = &self.live else { return Err(DeclareError("the connection is down".into())) };
        let name = convert::short("queue", &q.name).map_err(|e| DeclareError(e.to_string()))?;
        let options = QueueDeclareOptions {
            durable: q.durable,
            exclusive: q.exclusive,
            auto_delete: q.auto_delete,
            ..QueueDeclareOptions::default()
        };
        let arguments = convert::table_from_headers(&q.arguments);
        if let Err(e) = live.declare.queue_declare(name, options, arguments).await {
            let text = format!("cannot declare queue {}: {}", q.name, self.setup.scrub(e));
            self.reopen_declare().await;
            return Err(DeclareError(text));
        }
        self.declared_queues.insert(q.name.clone());
        Ok(())
    }

    /// Opens a new declaring channel after the broker closed the old one (a failed declare
    /// closes its channel).
    pub(super) async fn reopen_declare(&mut self) {
        let Some(live) = &mut self.live else { return };
        if live.declare.status().connected() || !live.conn.status().connected() {
            return;
        }
        match live.conn.create_channel().await {
            Ok(channel) => live.declare = channel,
            Err(e) => warn!(error = %self.setup.scrub(e), "cannot reopen the declaring channel"),
        }
    }
}

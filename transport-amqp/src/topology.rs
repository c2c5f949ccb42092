//! Topology derivation: which exchanges, queues and bindings a [`Source`] needs on RabbitMQ,
//! per dialect, with exactly the flags the Python peers declare (a mismatch closes the channel
//! with 406 PRECONDITION_FAILED).
//!
//! Pure: nothing here talks to a broker. The IO half declares what [`topology`] returns, in
//! order (exchanges, then queues, then bindings), then consumes every queue in
//! [`Topology::consume`].

use std::time::Duration;

use microfw_core::broker::ExchangeKind;
use microfw_core::config::Config;
use microfw_core::{Dialect, FieldValue, HandlerType, Headers, Source};

/// Nameko's default RPC exchange (`RPC_EXCHANGE` may rename it).
pub const NAMEKO_RPC_EXCHANGE: &str = "nameko-rpc";
/// micro_framework's RPC exchange (fixed in micro_framework 2.0.16).
pub const MICRO_FRAMEWORK_RPC_EXCHANGE: &str = "ufw-rpc";
/// `x-expires` of a reply queue, as Nameko declares its own (5 minutes idle).
pub const REPLY_QUEUE_EXPIRES_MS: i64 = 300_000;
/// The routing-key word micro_framework puts before its internal commands.
pub const MICRO_FRAMEWORK_BROADCAST: &str = "_broadcast";

/// What topology derivation needs to know beyond the [`Source`]. Also taken by
/// [`encode`](crate::encode) (exchange names, queue resolution), so one value serves a link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AmqpSettings {
    /// This service (`SERVICE_NAME`): names the reply queue.
    pub service: String,
    /// The Nameko-dialect RPC exchange (`RPC_EXCHANGE`, default `nameko-rpc`).
    pub rpc_exchange: String,
    /// `AUTO_DELETE_EVENT_EXCHANGES`: the `auto_delete` flag of Nameko-dialect event
    /// exchanges. micro_framework-dialect event exchanges are always auto-delete.
    pub auto_delete_event_exchanges: bool,
    /// Also bind the reply queue on `ufw-rpc`, so micro_framework servers' replies reach it.
    /// Default true; turn off in a Nameko-only estate to avoid declaring `ufw-rpc`.
    pub micro_framework_replies: bool,
    /// Nameko's `reliable_delivery` for broadcast handlers: true gives a durable, shared-name
    /// queue that survives restarts (needs a stable identifier); false (default, Nameko's
    /// requirement for its random identifiers) an exclusive auto-delete one.
    pub reliable_broadcast: bool,
}

impl AmqpSettings {
    /// Settings for `service` with every default: `nameko-rpc`, event exchanges not
    /// auto-delete, replies bound on both RPC exchanges,
    /// exclusive broadcast queues.
    pub fn new(service: impl Into<String>) -> Self {
        AmqpSettings {
            service: service.into(),
            rpc_exchange: NAMEKO_RPC_EXCHANGE.to_owned(),
            auto_delete_event_exchanges: false,
            micro_framework_replies: true,
            reliable_broadcast: false,
        }
    }

    /// Settings for `service` taking `RPC_EXCHANGE` and `AUTO_DELETE_EVENT_EXCHANGES` from
    /// `config`. It does not read `SERVICE_NAME` (the runner resolves it) nor the targets.
    pub fn from_config(service: impl Into<String>, config: &Config) -> Self {
        AmqpSettings {
            rpc_exchange: config.rpc_exchange.clone(),
            auto_delete_event_exchanges: config.auto_delete_event_exchanges,
            ..AmqpSettings::new(service)
        }
    }

    /// The RPC exchange of `dialect`: [`rpc_exchange`](Self::rpc_exchange) for Nameko,
    /// `ufw-rpc` for micro_framework.
    pub fn rpc_exchange_of(&self, dialect: Dialect) -> &str {
        match dialect {
            Dialect::Nameko => &self.rpc_exchange,
            Dialect::MicroFramework => MICRO_FRAMEWORK_RPC_EXCHANGE,
        }
    }
}

/// An exchange declaration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exchange {
    /// Its name.
    pub name: String,
    /// Its type (`topic` for everything this crate declares).
    pub kind: ExchangeKind,
    /// `durable`.
    pub durable: bool,
    /// `auto_delete`.
    pub auto_delete: bool,
}

/// A queue declaration.
#[derive(Clone, Debug, PartialEq)]
pub struct Queue {
    /// Its name.
    pub name: String,
    /// `durable`.
    pub durable: bool,
    /// `exclusive`.
    pub exclusive: bool,
    /// `auto_delete`.
    pub auto_delete: bool,
    /// `arguments` (`x-expires`, `x-message-ttl`, dead-lettering), typed.
    pub arguments: Headers,
}

/// A queue binding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    /// The queue.
    pub queue: String,
    /// The exchange.
    pub exchange: String,
    /// The binding key (a topic pattern on topic exchanges).
    pub routing_key: String,
}

/// Everything to declare for a source, and the queues to consume.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Topology {
    /// Exchanges, declared first.
    pub exchanges: Vec<Exchange>,
    /// Queues, declared after the exchanges.
    pub queues: Vec<Queue>,
    /// Bindings, made last.
    pub bindings: Vec<Binding>,
    /// The queues one subscription consumes (several for micro_framework RPC: one per target
    /// plus the broadcast queue; none for declarations that are not consumed).
    pub consume: Vec<String>,
}

/// The topology of `source`. [`Source::WsRpc`] is not an AMQP source: its topology is empty.
///
/// Nameko dialect: event exchange `<src>.events` (topic, durable, auto-delete =
/// `AUTO_DELETE_EVENT_EXCHANGES`) and queue `evt-<src>-<type>--<svc>.<method>`,
/// `evt-<src>-<type>` (singleton) or `...-<identifier>` (broadcast); RPC exchange
/// `nameko-rpc` and queue `rpc-<svc>` bound `<svc>.*`. micro_framework dialect: event
/// exchange always auto-delete, queue `<src>.<event>__<svc>.<target>`; RPC exchange `ufw-rpc`,
/// queues `rpc-<svc>-<target>` bound `<svc>.<target>` and `rpc-<svc>-broadcast` bound
/// `<svc>._broadcast.*`. Replies: queue `rpc.reply-<svc>-<reply_to>` (durable, `x-expires`
/// 300000) bound with the bare `reply_to` on the Nameko RPC exchange and on `ufw-rpc`.
/// No queue a Python peer also declares gets any argument.
pub fn topology(source: &Source, settings: &AmqpSettings) -> Topology {
    let mut t = Topology::default();
    match source {
        Source::Event { source_service, event_type, dialect, .. } => {
            let exchange = events_exchange(*dialect, source_service, settings);
            let Some(queue) = queue_name(source, settings) else { return t };
            let (exclusive, auto_delete) = event_queue_flags(source, settings);
            t.bind(&queue, &exchange.name, event_type);
            t.exchanges.push(exchange);
            t.queues.push(plain_queue(&queue, exclusive, auto_delete));
            t.consume.push(queue);
        }
        Source::Rpc { service, dialect, methods } => {
            let exchange = rpc_exchange(*dialect, settings);
            match dialect {
                Dialect::Nameko => {
                    t.add_consumed(&exchange.name, &format!("rpc-{service}"), &format!("{service}.*"))
                }
                Dialect::MicroFramework => {
                    for target in methods {
                        let queue = micro_framework_target_queue(service, target);
                        t.add_consumed(&exchange.name, &queue, &format!("{service}.{target}"));
                    }
                    let queue = micro_framework_target_queue(service, "broadcast");
                    t.add_consumed(
                        &exchange.name,
                        &queue,
                        &format!("{service}.{MICRO_FRAMEWORK_BROADCAST}.*"),
                    );
                }
            }
            t.exchanges.push(exchange);
        }
        Source::Replies { reply_to } => {
            let queue = reply_queue_name(&settings.service, reply_to);
            let mut arguments = Headers::new();
            arguments.insert("x-expires", FieldValue::I64(REPLY_QUEUE_EXPIRES_MS));
            t.queues.push(Queue { arguments, ..plain_queue(&queue, false, false) });
            let mut exchanges = vec![rpc_exchange(Dialect::Nameko, settings)];
            if settings.micro_framework_replies {
                exchanges.push(rpc_exchange(Dialect::MicroFramework, settings));
            }
            for exchange in exchanges {
                t.bind(&queue, &exchange.name, reply_to);
                t.exchanges.push(exchange);
            }
            t.consume.push(queue);
        }
        Source::WsRpc { .. } => {}
    }
    t
}

/// The one queue `source` consumes, or `None` when it consumes several (micro_framework RPC:
/// use [`route_queue`]) or none (WebSocket RPC).
pub fn queue_name(source: &Source, settings: &AmqpSettings) -> Option<String> {
    match source {
        Source::Event { source_service: src, event_type: ty, handler_type, dialect, service, route } => {
            Some(match (dialect, handler_type) {
                (Dialect::Nameko, HandlerType::ServicePool) => format!("evt-{src}-{ty}--{service}.{route}"),
                (Dialect::Nameko, HandlerType::Singleton) => format!("evt-{src}-{ty}"),
                (Dialect::Nameko, HandlerType::Broadcast { identifier }) => {
                    format!("evt-{src}-{ty}--{service}.{route}-{identifier}")
                }
                (Dialect::MicroFramework, HandlerType::ServicePool) => {
                    format!("{src}.{ty}__{service}.{route}")
                }
                (Dialect::MicroFramework, HandlerType::Singleton) => format!("{src}.{ty}"),
                (Dialect::MicroFramework, HandlerType::Broadcast { identifier }) => {
                    format!("{src}.{ty}__{service}.{route}-{identifier}")
                }
            })
        }
        Source::Rpc { service, dialect: Dialect::Nameko, .. } => Some(format!("rpc-{service}")),
        Source::Rpc { dialect: Dialect::MicroFramework, .. } | Source::WsRpc { .. } => None,
        Source::Replies { reply_to } => Some(reply_queue_name(&settings.service, reply_to)),
    }
}

/// The queue of `source` that a message with `routing_key` (its original one, before any
/// retry) was consumed from: what a delayed retry or a dead letter is named after. Same as
/// [`queue_name`], except for micro_framework RPC, where `<svc>.<target>` gives
/// `rpc-<svc>-<target>` and `<svc>._broadcast.<command>` gives `rpc-<svc>-broadcast`.
/// `None` when the routing key does not belong to the service, or for WebSocket RPC.
pub fn route_queue(source: &Source, routing_key: &str, settings: &AmqpSettings) -> Option<String> {
    match source {
        Source::Rpc { service, dialect: Dialect::MicroFramework, .. } => {
            let target = routing_key.strip_prefix(service.as_str())?.strip_prefix('.')?;
            if target.is_empty() {
                return None;
            }
            match target.strip_prefix(MICRO_FRAMEWORK_BROADCAST) {
                Some(rest) if rest.starts_with('.') => {
                    Some(micro_framework_target_queue(service, "broadcast"))
                }
                _ => Some(micro_framework_target_queue(service, target)),
            }
        }
        _ => queue_name(source, settings),
    }
}

/// The reply queue of an Engine: `rpc.reply-<service>-<reply_to>` (Nameko's convention).
pub fn reply_queue_name(service: &str, reply_to: &str) -> String {
    format!("rpc.reply-{service}-{reply_to}")
}

/// The waiting queue of a delayed retry: `microfw.retry.<queue>.<delay_ms>` (frozen name).
pub fn retry_queue_name(queue: &str, delay: Duration) -> String {
    format!("microfw.retry.{queue}.{}", delay.as_millis())
}

/// The dead-letter queue of a route queue: `microfw.dlq.<queue>` (frozen name).
pub fn dead_letter_queue_name(queue: &str) -> String {
    format!("microfw.dlq.{queue}")
}

/// The waiting queue for retries of `queue` after `delay`: durable, `x-message-ttl` = the
/// delay in ms, dead-lettering through the default exchange (`x-dead-letter-exchange` `""`)
/// with routing key `queue`, so the message comes back to that queue only. Not consumed.
///
/// It deliberately has no `x-expires`: RabbitMQ would delete an unused waiting queue together
/// with the messages waiting in it.
pub fn retry_topology(queue: &str, delay: Duration) -> Topology {
    let ttl = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
    let mut arguments = Headers::new();
    arguments.insert("x-message-ttl", FieldValue::I64(ttl));
    arguments.insert("x-dead-letter-exchange", "");
    arguments.insert("x-dead-letter-routing-key", queue);
    let name = retry_queue_name(queue, delay);
    Topology { queues: vec![Queue { arguments, ..plain_queue(&name, false, false) }], ..Topology::default() }
}

/// The dead-letter queue of `queue`: durable, no arguments, not consumed.
pub fn dead_letter_topology(queue: &str) -> Topology {
    Topology {
        queues: vec![plain_queue(&dead_letter_queue_name(queue), false, false)],
        ..Topology::default()
    }
}

/// The events exchange of `source_service` in `dialect`: `<source>.events`, topic, durable;
/// auto-delete per `AUTO_DELETE_EVENT_EXCHANGES` (Nameko) or always (micro_framework).
pub fn events_exchange(dialect: Dialect, source_service: &str, settings: &AmqpSettings) -> Exchange {
    let auto_delete = match dialect {
        Dialect::Nameko => settings.auto_delete_event_exchanges,
        Dialect::MicroFramework => true,
    };
    Exchange {
        name: format!("{source_service}.events"),
        kind: ExchangeKind::Topic,
        durable: true,
        auto_delete,
    }
}

/// The RPC exchange of `dialect`: topic, durable, not auto-delete.
pub fn rpc_exchange(dialect: Dialect, settings: &AmqpSettings) -> Exchange {
    Exchange {
        name: settings.rpc_exchange_of(dialect).to_owned(),
        kind: ExchangeKind::Topic,
        durable: true,
        auto_delete: false,
    }
}

impl Topology {
    fn bind(&mut self, queue: &str, exchange: &str, routing_key: &str) {
        self.bindings.push(Binding {
            queue: queue.to_owned(),
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
        });
    }

    fn add_consumed(&mut self, exchange: &str, queue: &str, routing_key: &str) {
        self.queues.push(plain_queue(queue, false, false));
        self.bind(queue, exchange, routing_key);
        self.consume.push(queue.to_owned());
    }
}

fn micro_framework_target_queue(service: &str, target: &str) -> String {
    format!("rpc-{service}-{target}")
}

/// `(exclusive, auto_delete)` of an event queue: Nameko's table (auto-delete and exclusive only
/// for a broadcast queue without reliable delivery).
fn event_queue_flags(source: &Source, settings: &AmqpSettings) -> (bool, bool) {
    match source {
        Source::Event { handler_type: HandlerType::Broadcast { .. }, .. } if !settings.reliable_broadcast => {
            (true, true)
        }
        _ => (false, false),
    }
}

fn plain_queue(name: &str, exclusive: bool, auto_delete: bool) -> Queue {
    Queue { name: name.to_owned(), durable: true, exclusive, auto_delete, arguments: Headers::new() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> AmqpSettings {
        AmqpSettings::new("svc")
    }

    fn event(handler_type: HandlerType, dialect: Dialect) -> Source {
        Source::Event {
            source_service: "src".into(),
            event_type: "evt".into(),
            handler_type,
            dialect,
            service: "svc".into(),
            route: "on_evt".into(),
        }
    }

    fn broadcast() -> HandlerType {
        HandlerType::Broadcast { identifier: "host1".into() }
    }

    /// (name, durable, exclusive, auto_delete, argument count) of the one queue.
    fn queue_row(t: &Topology) -> (String, bool, bool, bool, usize) {
        assert_eq!(t.queues.len(), 1, "{t:?}");
        let q = &t.queues[0];
        (q.name.clone(), q.durable, q.exclusive, q.auto_delete, q.arguments.len())
    }

    #[test]
    fn event_queues_follow_the_wire_tables() {
        let mut reliable = settings();
        reliable.reliable_broadcast = true;
        let rows = [
            (
                event(HandlerType::ServicePool, Dialect::Nameko),
                settings(),
                "evt-src-evt--svc.on_evt",
                false,
                false,
            ),
            (event(HandlerType::Singleton, Dialect::Nameko), settings(), "evt-src-evt", false, false),
            (event(broadcast(), Dialect::Nameko), settings(), "evt-src-evt--svc.on_evt-host1", true, true),
            (event(broadcast(), Dialect::Nameko), reliable, "evt-src-evt--svc.on_evt-host1", false, false),
            (
                event(HandlerType::ServicePool, Dialect::MicroFramework),
                settings(),
                "src.evt__svc.on_evt",
                false,
                false,
            ),
            (event(HandlerType::Singleton, Dialect::MicroFramework), settings(), "src.evt", false, false),
            (
                event(broadcast(), Dialect::MicroFramework),
                settings(),
                "src.evt__svc.on_evt-host1",
                true,
                true,
            ),
        ];
        for (source, settings, name, exclusive, auto_delete) in rows {
            let t = topology(&source, &settings);
            assert_eq!(queue_row(&t), (name.to_owned(), true, exclusive, auto_delete, 0), "{source:?}");
            assert_eq!(t.consume, vec![name.to_owned()]);
            assert_eq!(
                t.bindings,
                vec![Binding {
                    queue: name.into(),
                    exchange: "src.events".into(),
                    routing_key: "evt".into()
                }]
            );
            assert_eq!(queue_name(&source, &settings).as_deref(), Some(name));
        }
    }

    #[test]
    fn event_exchange_flags_per_dialect_and_setting() {
        let mut auto = settings();
        auto.auto_delete_event_exchanges = true;
        let rows = [
            (Dialect::Nameko, settings(), false),
            (Dialect::Nameko, auto.clone(), true),
            (Dialect::MicroFramework, settings(), true),
            (Dialect::MicroFramework, auto, true),
        ];
        for (dialect, settings, auto_delete) in rows {
            let t = topology(&event(HandlerType::ServicePool, dialect), &settings);
            let expected =
                Exchange { name: "src.events".into(), kind: ExchangeKind::Topic, durable: true, auto_delete };
            assert_eq!(t.exchanges, vec![expected], "{dialect:?}");
        }
    }

    #[test]
    fn nameko_rpc_is_one_shared_queue_on_the_configured_exchange() {
        let mut s = settings();
        s.rpc_exchange = "my-rpc".into();
        let source = Source::Rpc { service: "svc".into(), dialect: Dialect::Nameko, methods: vec![] };
        let t = topology(&source, &s);
        assert_eq!(
            t.exchanges,
            vec![Exchange {
                name: "my-rpc".into(),
                kind: ExchangeKind::Topic,
                durable: true,
                auto_delete: false
            }]
        );
        assert_eq!(queue_row(&t), ("rpc-svc".into(), true, false, false, 0));
        assert_eq!(
            t.bindings,
            vec![Binding { queue: "rpc-svc".into(), exchange: "my-rpc".into(), routing_key: "svc.*".into() }]
        );
        assert_eq!(t.consume, vec!["rpc-svc".to_owned()]);
    }

    #[test]
    fn micro_framework_rpc_has_a_queue_per_target_and_the_broadcast_queue() {
        let s = settings();
        let source = Source::Rpc {
            service: "svc_a".into(),
            dialect: Dialect::MicroFramework,
            methods: vec!["rpc_add".into(), "RpcClass.method".into()],
        };
        let t = topology(&source, &s);
        assert_eq!(t.exchanges.len(), 1);
        assert_eq!((t.exchanges[0].name.as_str(), t.exchanges[0].auto_delete), ("ufw-rpc", false));
        let bindings: Vec<(&str, &str, &str)> = t
            .bindings
            .iter()
            .map(|b| (b.queue.as_str(), b.exchange.as_str(), b.routing_key.as_str()))
            .collect();
        assert_eq!(
            bindings,
            [
                ("rpc-svc_a-rpc_add", "ufw-rpc", "svc_a.rpc_add"),
                ("rpc-svc_a-RpcClass.method", "ufw-rpc", "svc_a.RpcClass.method"),
                ("rpc-svc_a-broadcast", "ufw-rpc", "svc_a._broadcast.*"),
            ]
        );
        assert!(
            t.queues.iter().all(|q| q.durable && !q.exclusive && !q.auto_delete && q.arguments.is_empty())
        );
        assert_eq!(t.consume, ["rpc-svc_a-rpc_add", "rpc-svc_a-RpcClass.method", "rpc-svc_a-broadcast"]);
        assert_eq!(queue_name(&source, &s), None);
        assert_eq!(
            route_queue(&source, "svc_a.RpcClass.method", &s).as_deref(),
            Some("rpc-svc_a-RpcClass.method")
        );
        assert_eq!(
            route_queue(&source, "svc_a._broadcast.__list_targets__", &s).as_deref(),
            Some("rpc-svc_a-broadcast")
        );
        assert_eq!(route_queue(&source, "other.rpc_add", &s), None);
        assert_eq!(route_queue(&source, "svc_a.", &s), None);
        assert_eq!(route_queue(&source, "svc_ab.x", &s), None);
    }

    #[test]
    fn reply_queue_is_durable_expiring_and_bound_on_both_rpc_exchanges() {
        let source = Source::Replies { reply_to: "60924f45".into() };
        let t = topology(&source, &settings());
        assert_eq!(queue_row(&t), ("rpc.reply-svc-60924f45".into(), true, false, false, 1));
        assert_eq!(t.queues[0].arguments.get("x-expires"), Some(&FieldValue::I64(300_000)));
        let bindings: Vec<(&str, &str)> =
            t.bindings.iter().map(|b| (b.exchange.as_str(), b.routing_key.as_str())).collect();
        assert_eq!(bindings, [("nameko-rpc", "60924f45"), ("ufw-rpc", "60924f45")]);
        assert!(t.exchanges.iter().all(|e| e.durable && !e.auto_delete && e.kind == ExchangeKind::Topic));

        let mut nameko_only = settings();
        nameko_only.micro_framework_replies = false;
        let t = topology(&source, &nameko_only);
        assert_eq!(t.exchanges.len(), 1);
        assert_eq!(t.bindings.len(), 1);
    }

    #[test]
    fn websocket_sources_have_no_amqp_topology() {
        let source = Source::WsRpc { service: "svc".into() };
        assert_eq!(topology(&source, &settings()), Topology::default());
        assert_eq!(queue_name(&source, &settings()), None);
    }

    #[test]
    fn retry_and_dead_letter_queues_use_the_frozen_names() {
        let t = retry_topology("rpc-svc", Duration::from_millis(1600));
        assert_eq!(queue_row(&t), ("microfw.retry.rpc-svc.1600".into(), true, false, false, 3));
        let args = &t.queues[0].arguments;
        assert_eq!(args.get("x-message-ttl"), Some(&FieldValue::I64(1600)));
        assert_eq!(args.get("x-dead-letter-exchange"), Some(&FieldValue::from("")));
        assert_eq!(args.get("x-dead-letter-routing-key"), Some(&FieldValue::from("rpc-svc")));
        assert!(t.bindings.is_empty() && t.consume.is_empty() && t.exchanges.is_empty());
        let t = dead_letter_topology("rpc-svc");
        assert_eq!(queue_row(&t), ("microfw.dlq.rpc-svc".into(), true, false, false, 0));
        assert!(t.consume.is_empty());
    }

    #[test]
    fn settings_follow_the_config() {
        let config =
            Config { rpc_exchange: "x-rpc".into(), auto_delete_event_exchanges: true, ..Config::default() };
        let s = AmqpSettings::from_config("svc", &config);
        assert_eq!((s.rpc_exchange.as_str(), s.auto_delete_event_exchanges), ("x-rpc", true));
        assert_eq!(s.rpc_exchange_of(Dialect::MicroFramework), "ufw-rpc");
        assert_eq!(AmqpSettings::new("svc").rpc_exchange_of(Dialect::Nameko), "nameko-rpc");
    }
}

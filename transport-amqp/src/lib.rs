//! # microfw-transport-amqp
//!
//! The pure half of microfw's AMQP transport: a codec between AMQP messages and the core's
//! [`Envelope`](microfw_core::Envelope), and topology derivation, for the two wire dialects
//! microfw speaks: `nameko` (Nameko 2.x/3.x, the default) and `micro_framework` (2.0.x). Tested
//! without a broker against bytes captured from the real Python peers.
//!
//! ## Contract
//!
//! * [`IncomingMessage`], [`OutgoingMessage`] and [`AmqpProperties`] are this crate's own,
//!   client-neutral message model; an IO half converts its library's types to and from them.
//! * [`topology`] says what to declare and consume for a subscription's
//!   [`Source`](microfw_core::Source), with exactly the flags the Python peers use (one
//!   mismatch closes the channel with 406). [`queue_name`] / [`route_queue`] name queues;
//!   [`retry_topology`] / [`dead_letter_topology`] give the frozen retry names
//!   (`microfw.retry.<queue>.<delay_ms>`, `microfw.dlq.<queue>`).
//! * [`decode`] turns a delivery into an envelope and never fails: what cannot be read becomes
//!   a `MalformedRequest` body (requests) or stays raw (replies), which the Engine answers.
//! * [`encode`] turns an [`Action::Publish`](microfw_core::Action::Publish) into a fully
//!   addressed message; [`publish_topology`] says what must exist before it goes out.
//!
//! ```
//! use bytes::Bytes;
//! use microfw_core::{Body, Destination, Dialect, Envelope, Headers, Properties, Publish, PublishId};
//! use microfw_core::{RpcReply, Source, Transport};
//! use microfw_transport_amqp::{AmqpProperties, AmqpSettings, IncomingMessage, decode, encode};
//! use serde_json::json;
//!
//! let settings = AmqpSettings::new("echo");
//! let source = Source::Rpc { service: "echo".into(), dialect: Dialect::Nameko, methods: vec![] };
//! assert_eq!(microfw_transport_amqp::topology(&source, &settings).consume, ["rpc-echo"]);
//!
//! // A Nameko caller's request, as a consumer receives it.
//! let request = IncomingMessage {
//!     exchange: "nameko-rpc".into(),
//!     routing_key: "echo.say".into(),
//!     redelivered: false,
//!     properties: AmqpProperties {
//!         content_type: Some("application/json".into()),
//!         correlation_id: Some("c-1".into()),
//!         reply_to: Some("6f1c".into()),
//!         ..AmqpProperties::default()
//!     },
//!     body: Bytes::from_static(br#"{"args": ["hi"], "kwargs": {}}"#),
//! };
//! let envelope = decode(&source, request);
//! let Body::Request(call) = &envelope.body else { panic!() };
//! assert_eq!((call.method.as_str(), &call.args[..]), ("say", &[json!("hi")][..]));
//!
//! // The Engine's reply to it, encoded for the wire.
//! let reply = Publish {
//!     id: PublishId::from_raw(1),
//!     transport: Transport::Broker,
//!     destination: Destination::Reply { reply_to: "6f1c".into(), dialect: Dialect::Nameko },
//!     mandatory: false,
//!     envelope: Envelope {
//!         exchange: String::new(),
//!         routing_key: "6f1c".into(),
//!         headers: Headers::new(),
//!         properties: Properties { correlation_id: Some("c-1".into()), ..Properties::default() },
//!         body: Body::Reply(RpcReply { result: Ok(json!("hi")) }),
//!     },
//! };
//! let out = encode(&reply, &settings, |_| None).unwrap();
//! assert_eq!((out.exchange.as_str(), out.routing_key.as_str()), ("nameko-rpc", "6f1c"));
//! assert_eq!(&out.body[..], br#"{"result":"hi","error":null}"#);
//! ```
//!
//! ## `reply_to` across dialects
//!
//! The Engine puts one bare uuid in every request's `reply_to`, whatever the dialect. The
//! reply queue `rpc.reply-<service>-<uuid>` is bound with that uuid on the Nameko RPC exchange
//! **and** on `ufw-rpc`. A Nameko server replies on `nameko-rpc` with routing key `reply_to`;
//! a micro_framework server replies on `ufw-rpc` with routing key `reply_to` (it never uses
//! `reply_to` as a queue name, only as that routing key), so both replies reach the same queue
//! and [`decode_reply`] tells them apart by their body. Serving micro_framework callers works
//! the same way in reverse: their `reply_to` is `ufw-reply-<uuid>`, bound with its own name
//! on `ufw-rpc`, where our reply goes.
//!
//! ## Decisions beyond the wire notes
//!
//! * Broadcast event queues are exclusive and auto-delete unless
//!   [`AmqpSettings::reliable_broadcast`] is set (Nameko's `reliable_delivery`).
//! * The micro_framework dialect has only service-pool event handlers; singleton and broadcast
//!   queues there are named `<src>.<event>` and `<src>.<event>__<svc>.<route>-<id>` (only
//!   microfw instances share them).
//! * micro_framework RPC needs one queue per target:
//!   [`Source::Rpc`](microfw_core::Source::Rpc) lists the methods it serves.
//! * Retries and dead letters are published `mandatory` and without `expiration`.
//!
//! ## What it does NOT do
//!
//! Without features, no IO: the lapin half (feature `tokio`, [`AmqpConnector`], for
//! `microfw-runtime-tokio`) and the amiquip half (feature `sync`, `AmqpSyncConnector`, for
//! `microfw-runtime-sync`) move these messages; each is a
//! [`Link`](microfw_core::link::Link) with confirms, reconnect and consumer management. It does
//! not answer micro_framework's internal commands `__list_targets__` / `__get_target__`: they
//! decode as ordinary requests, which the Engine answers from its routes. Neither half speaks
//! TLS (`amqps://`). It does not decode kombu's `__type__` wrappers (datetime, Decimal...), nor
//! any serializer but JSON.
#![warn(missing_docs)]

#[cfg(feature = "sync")]
mod amiquip_link;
mod decode;
mod encode;
#[cfg(feature = "tokio")]
mod lapin_link;
mod model;
mod topology;

pub use decode::{MISSING_ARGS_OR_KWARGS, decode, decode_event, decode_reply, decode_request};
pub use encode::{
    EncodeError, JSON, MAX_EXPIRATION_MS, UTF_8, encode, micro_framework_error, publish_topology,
};
#[cfg(feature = "tokio")]
pub use lapin_link::AmqpConnector;
pub use model::{AmqpProperties, IncomingMessage, OutgoingMessage};
pub use topology::{
    AmqpSettings, Binding, Exchange, MICRO_FRAMEWORK_BROADCAST, MICRO_FRAMEWORK_RPC_EXCHANGE,
    NAMEKO_RPC_EXCHANGE, Queue, REPLY_QUEUE_EXPIRES_MS, Topology, dead_letter_queue_name,
    dead_letter_topology, events_exchange, queue_name, reply_queue_name, retry_queue_name, retry_topology,
    route_queue, rpc_exchange, topology,
};

#[cfg(feature = "sync")]
pub use amiquip_link::AmqpSyncConnector;

//! The wire-neutral AMQP message: what the IO halves (lapin, amiquip) convert their own types
//! to and from. No client library type appears here.

use bytes::Bytes;
use microfw_core::Headers;

/// The AMQP basic properties this transport reads or writes.
///
/// Every field is optional, as on the wire: `None` means "property absent" (not "empty").
/// What it does NOT carry: `message_id`, `timestamp`, `type`, `user_id`, `app_id`; no peer we
/// speak to sets or reads them, and the IO halves drop them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AmqpProperties {
    /// `content_type` (`application/json` for everything this crate writes).
    pub content_type: Option<String>,
    /// `content_encoding` (`utf-8` for everything this crate writes).
    pub content_encoding: Option<String>,
    /// `delivery_mode`: 2 = persistent, 1 = transient.
    pub delivery_mode: Option<u8>,
    /// `priority` (0 on everything this crate writes, like Nameko and micro_framework).
    pub priority: Option<u8>,
    /// `correlation_id` (RPC requests and replies).
    pub correlation_id: Option<String>,
    /// `reply_to` (RPC requests): the routing key the reply must be published with.
    pub reply_to: Option<String>,
    /// `expiration`: per-message TTL in milliseconds, as a decimal string (AMQP's form).
    pub expiration: Option<String>,
    /// `headers` (AMQP `application_headers`), with typed values. An empty table and an absent
    /// one are the same here; the IO half writes an empty table, as the Python peers do.
    pub headers: Headers,
}

/// A message to publish, fully addressed.
#[derive(Clone, Debug, PartialEq)]
pub struct OutgoingMessage {
    /// The exchange (`""` is the default exchange).
    pub exchange: String,
    /// The routing key.
    pub routing_key: String,
    /// AMQP `mandatory`: an unroutable message comes back as basic.return, which the IO half
    /// must report as [`PublishError::Unroutable`](microfw_core::PublishError::Unroutable).
    pub mandatory: bool,
    /// The properties.
    pub properties: AmqpProperties,
    /// The body bytes.
    pub body: Bytes,
}

/// A message as a consumer received it (basic.deliver), before decoding.
#[derive(Clone, Debug, PartialEq)]
pub struct IncomingMessage {
    /// The exchange it was published to (`""` for the default exchange, which is how a
    /// delayed retry comes back).
    pub exchange: String,
    /// The routing key it was published with.
    pub routing_key: String,
    /// True when the broker delivered it before.
    pub redelivered: bool,
    /// The properties.
    pub properties: AmqpProperties,
    /// The body bytes.
    pub body: Bytes,
}

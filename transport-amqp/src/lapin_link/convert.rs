//! Conversions between lapin's types and this crate's client-neutral model
//! ([`IncomingMessage`], [`OutgoingMessage`], [`Headers`]), and the packing of a link's own
//! delivery tags.

use bytes::Bytes;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, ByteArray, FieldArray, FieldTable, LongString, ShortString};
use microfw_core::{DeliveryTag, FieldValue, Headers};

use crate::model::{AmqpProperties, IncomingMessage, OutgoingMessage};

/// Bits of a [`DeliveryTag`] holding the broker's tag; the bits above hold the channel key.
const BROKER_TAG_BITS: u32 = 40;
/// The largest broker tag a packed tag can carry.
pub(crate) const MAX_BROKER_TAG: u64 = (1 << BROKER_TAG_BITS) - 1;
/// Channel keys wrap within this many bits (the rest of the 64).
const KEY_MASK: u32 = (1 << (64 - BROKER_TAG_BITS)) - 1;

/// The link's tag for broker tag `tag` on the consumer channel numbered `key`. Each channel a
/// link opens gets a new key, so a tag from a closed channel (before a reconnect) never names
/// a live one.
pub(crate) fn pack_tag(key: u32, tag: u64) -> DeliveryTag {
    DeliveryTag::from_raw((u64::from(key & KEY_MASK) << BROKER_TAG_BITS) | (tag & MAX_BROKER_TAG))
}

/// The channel key and broker tag inside a tag made by [`pack_tag`].
pub(crate) fn unpack_tag(tag: DeliveryTag) -> (u32, u64) {
    let raw = tag.into_raw();
    ((raw >> BROKER_TAG_BITS) as u32, raw & MAX_BROKER_TAG)
}

/// The next channel key after `key` (never 0, wrapping within the key bits).
pub(crate) fn next_key(key: u32) -> u32 {
    let next = key.wrapping_add(1) & KEY_MASK;
    if next == 0 { 1 } else { next }
}

/// A lapin delivery as this crate's [`IncomingMessage`].
pub(crate) fn incoming(delivery: lapin::message::Delivery) -> IncomingMessage {
    let props = &delivery.properties;
    let text = |s: &Option<ShortString>| s.as_ref().map(|s| s.as_str().to_owned());
    IncomingMessage {
        exchange: delivery.exchange.as_str().to_owned(),
        routing_key: delivery.routing_key.as_str().to_owned(),
        redelivered: delivery.redelivered,
        properties: AmqpProperties {
            content_type: text(props.content_type()),
            content_encoding: text(props.content_encoding()),
            delivery_mode: *props.delivery_mode(),
            priority: *props.priority(),
            correlation_id: text(props.correlation_id()),
            reply_to: text(props.reply_to()),
            expiration: text(props.expiration()),
            headers: props.headers().as_ref().map(headers_from_table).unwrap_or_default(),
        },
        body: Bytes::from(delivery.data),
    }
}

/// Why an outgoing message cannot be put on the wire.
#[derive(Debug, thiserror::Error)]
#[error("{field} is longer than 255 bytes")]
pub(crate) struct TooLong {
    field: &'static str,
}

/// A short string, or the error naming `field` when the text is longer than AMQP allows.
pub(crate) fn short(field: &'static str, text: &str) -> Result<ShortString, TooLong> {
    ShortString::try_new(text).map_err(|_| TooLong { field })
}

/// The basic properties of `out`.
pub(crate) fn properties(out: &OutgoingMessage) -> Result<BasicProperties, TooLong> {
    let p = &out.properties;
    let mut props = BasicProperties::default().with_headers(table_from_headers(&p.headers));
    if let Some(v) = &p.content_type {
        props = props.with_content_type(short("content_type", v)?);
    }
    if let Some(v) = &p.content_encoding {
        props = props.with_content_encoding(short("content_encoding", v)?);
    }
    if let Some(v) = p.delivery_mode {
        props = props.with_delivery_mode(v);
    }
    if let Some(v) = p.priority {
        props = props.with_priority(v);
    }
    if let Some(v) = &p.correlation_id {
        props = props.with_correlation_id(short("correlation_id", v)?);
    }
    if let Some(v) = &p.reply_to {
        props = props.with_reply_to(short("reply_to", v)?);
    }
    if let Some(v) = &p.expiration {
        props = props.with_expiration(short("expiration", v)?);
    }
    Ok(props)
}

/// A header table as core [`Headers`]: every integer type becomes `I64`, strings `Str`
/// (a long string that is not UTF-8 stays `Bytes`), decimals `F64`.
pub(crate) fn headers_from_table(table: &FieldTable) -> Headers {
    table.inner().iter().map(|(k, v)| (k.as_str().to_owned(), field_from_amqp(v))).collect()
}

/// Core [`Headers`] as a header table. Integers are written as a signed 32-bit `I` when they
/// fit and a 64-bit `l` otherwise (as the Python peers' client does), strings as long
/// strings `S`.
pub(crate) fn table_from_headers(headers: &Headers) -> FieldTable {
    let mut table = FieldTable::default();
    for (k, v) in headers.iter() {
        // A header name longer than 255 bytes cannot be on the wire; peers never send one.
        if let Ok(name) = ShortString::try_new(k) {
            table.insert(name, amqp_from_field(v));
        }
    }
    table
}

fn field_from_amqp(value: &AMQPValue) -> FieldValue {
    match value {
        AMQPValue::Boolean(b) => FieldValue::Bool(*b),
        AMQPValue::ShortShortInt(n) => FieldValue::I64(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => FieldValue::I64(i64::from(*n)),
        AMQPValue::ShortInt(n) => FieldValue::I64(i64::from(*n)),
        AMQPValue::ShortUInt(n) => FieldValue::I64(i64::from(*n)),
        AMQPValue::LongInt(n) => FieldValue::I64(i64::from(*n)),
        AMQPValue::LongUInt(n) => FieldValue::I64(i64::from(*n)),
        AMQPValue::LongLongInt(n) => FieldValue::I64(*n),
        AMQPValue::Float(f) => FieldValue::F64(f64::from(*f)),
        AMQPValue::Double(f) => FieldValue::F64(*f),
        AMQPValue::DecimalValue(d) => FieldValue::F64(f64::from(d.value) / 10f64.powi(i32::from(d.scale))),
        AMQPValue::ShortString(s) => FieldValue::Str(s.as_str().to_owned()),
        AMQPValue::LongString(s) => match std::str::from_utf8(s.as_bytes()) {
            Ok(text) => FieldValue::Str(text.to_owned()),
            Err(_) => FieldValue::Bytes(s.as_bytes().to_vec()),
        },
        AMQPValue::FieldArray(a) => FieldValue::Array(a.as_slice().iter().map(field_from_amqp).collect()),
        AMQPValue::Timestamp(t) => FieldValue::Timestamp(*t),
        AMQPValue::FieldTable(t) => FieldValue::Table(headers_from_table(t)),
        AMQPValue::ByteArray(b) => FieldValue::Bytes(b.as_slice().to_vec()),
        AMQPValue::Void => FieldValue::Void,
    }
}

fn amqp_from_field(value: &FieldValue) -> AMQPValue {
    match value {
        FieldValue::Void => AMQPValue::Void,
        FieldValue::Bool(b) => AMQPValue::Boolean(*b),
        FieldValue::I64(n) => match i32::try_from(*n) {
            Ok(small) => AMQPValue::LongInt(small),
            Err(_) => AMQPValue::LongLongInt(*n),
        },
        FieldValue::F64(f) => AMQPValue::Double(*f),
        FieldValue::Str(s) => AMQPValue::LongString(LongString::from(s.as_bytes())),
        FieldValue::Bytes(b) => AMQPValue::ByteArray(ByteArray::from(b.as_slice())),
        FieldValue::Array(items) => {
            AMQPValue::FieldArray(FieldArray::from(items.iter().map(amqp_from_field).collect::<Vec<_>>()))
        }
        FieldValue::Table(t) => AMQPValue::FieldTable(table_from_headers(t)),
        FieldValue::Timestamp(t) => AMQPValue::Timestamp(*t),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_pack_and_unpack() {
        let tag = pack_tag(7, 123_456);
        assert_eq!(unpack_tag(tag), (7, 123_456));
        assert_eq!(unpack_tag(pack_tag(KEY_MASK, MAX_BROKER_TAG)), (KEY_MASK, MAX_BROKER_TAG));
        assert_ne!(pack_tag(1, 5), pack_tag(2, 5));
    }

    #[test]
    fn keys_wrap_and_skip_zero() {
        assert_eq!(next_key(1), 2);
        assert_eq!(next_key(KEY_MASK), 1);
    }

    #[test]
    fn headers_round_trip_with_python_integer_widths() {
        let mut nested = Headers::new();
        nested.insert("n", FieldValue::I64(1));
        let mut h = Headers::new();
        h.insert("small", FieldValue::I64(-5));
        h.insert("big", FieldValue::I64(1 << 40));
        h.insert("s", "text");
        h.insert("b", FieldValue::Bool(true));
        h.insert("a", FieldValue::Array(vec![FieldValue::from("x"), FieldValue::I64(2)]));
        h.insert("t", FieldValue::Table(nested));
        h.insert("raw", FieldValue::Bytes(vec![0xff, 0]));
        h.insert("ts", FieldValue::Timestamp(9));
        h.insert("f", FieldValue::F64(0.5));
        h.insert("v", FieldValue::Void);
        let table = table_from_headers(&h);
        assert_eq!(table.inner().get("small"), Some(&AMQPValue::LongInt(-5)));
        assert_eq!(table.inner().get("big"), Some(&AMQPValue::LongLongInt(1 << 40)));
        let back = headers_from_table(&table);
        // The table is sorted by name; compare entry by entry.
        assert_eq!(back.len(), h.len());
        for (k, v) in h.iter() {
            assert_eq!(back.get(k), Some(v), "{k}");
        }
    }

    #[test]
    fn peer_header_types_become_core_values() {
        let mut table = FieldTable::default();
        table.insert("u8".into(), AMQPValue::ShortShortUInt(3));
        table.insert(
            "dec".into(),
            AMQPValue::DecimalValue(lapin::types::DecimalValue { scale: 2, value: 150 }),
        );
        table.insert("bin".into(), AMQPValue::LongString(LongString::from(vec![0xff_u8])));
        let h = headers_from_table(&table);
        assert_eq!(h.get("u8"), Some(&FieldValue::I64(3)));
        assert_eq!(h.get("dec"), Some(&FieldValue::F64(1.5)));
        assert_eq!(h.get("bin"), Some(&FieldValue::Bytes(vec![0xff])));
    }

    #[test]
    fn overlong_short_strings_are_errors_not_panics() {
        let long = "x".repeat(256);
        assert!(short("routing_key", &long).is_err());
        let out = OutgoingMessage {
            exchange: String::new(),
            routing_key: "q".into(),
            mandatory: false,
            properties: AmqpProperties { correlation_id: Some(long), ..AmqpProperties::default() },
            body: Bytes::new(),
        };
        assert_eq!(properties(&out).unwrap_err().to_string(), "correlation_id is longer than 255 bytes");
    }
}

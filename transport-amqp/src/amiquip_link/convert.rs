//! Conversions between amiquip's (amq-protocol 1.x) types and this crate's client-neutral
//! model, plus the redaction of secrets from amiquip's error texts. Pure.

use amiquip::{AmqpProperties as WireProperties, AmqpValue, ExchangeType, FieldTable};
use bytes::Bytes;
use microfw_core::broker::ExchangeKind;
use microfw_core::{FieldValue, Headers};

use crate::model::{AmqpProperties, IncomingMessage, OutgoingMessage};

/// A consumed message in the model. `body`, `exchange` and `routing_key` are taken by value
/// (no copy of the body).
pub(crate) fn incoming(
    exchange: String,
    routing_key: String,
    redelivered: bool,
    properties: &WireProperties,
    body: Vec<u8>,
) -> IncomingMessage {
    IncomingMessage {
        exchange,
        routing_key,
        redelivered,
        properties: properties_in(properties),
        body: Bytes::from(body),
    }
}

/// The model's properties from the wire's. `message_id`, `timestamp`, `type`, `user_id`,
/// `app_id` and `cluster_id` are dropped (see [`AmqpProperties`]).
pub(crate) fn properties_in(p: &WireProperties) -> AmqpProperties {
    AmqpProperties {
        content_type: p.content_type().clone(),
        content_encoding: p.content_encoding().clone(),
        delivery_mode: *p.delivery_mode(),
        priority: *p.priority(),
        correlation_id: p.correlation_id().clone(),
        reply_to: p.reply_to().clone(),
        expiration: p.expiration().clone(),
        headers: p.headers().as_ref().map(table_in).unwrap_or_default(),
    }
}

/// The wire properties of an outgoing message. The headers table is always written (empty
/// when there are none), as the Python peers do.
pub(crate) fn properties_out(message: &OutgoingMessage) -> WireProperties {
    let p = &message.properties;
    let mut out = WireProperties::default().with_headers(table_out(&p.headers));
    if let Some(v) = &p.content_type {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = &p.content_encoding {
        out = out.with_content_encoding(v.clone());
    }
    if let Some(v) = p.delivery_mode {
        out = out.with_delivery_mode(v);
    }
    if let Some(v) = p.priority {
        out = out.with_priority(v);
    }
    if let Some(v) = &p.correlation_id {
        out = out.with_correlation_id(v.clone());
    }
    if let Some(v) = &p.reply_to {
        out = out.with_reply_to(v.clone());
    }
    if let Some(v) = &p.expiration {
        out = out.with_expiration(v.clone());
    }
    out
}

/// A wire table as typed headers. Integer widths collapse to `I64`, floats and decimals to
/// `F64`. amq-protocol 1.x keeps tables sorted by key, so the peer's key order is not kept.
pub(crate) fn table_in(table: &FieldTable) -> Headers {
    table.iter().map(|(k, v)| (k.clone(), value_in(v))).collect()
}

/// Typed headers as a wire table. Integers are written as 32-bit when they fit and 64-bit
/// otherwise (as pyamqp does).
pub(crate) fn table_out(headers: &Headers) -> FieldTable {
    headers.iter().map(|(k, v)| (k.to_owned(), value_out(v))).collect()
}

/// The amiquip exchange type of a declared exchange kind.
pub(crate) fn exchange_type(kind: ExchangeKind) -> ExchangeType {
    match kind {
        ExchangeKind::Topic => ExchangeType::Topic,
        ExchangeKind::Direct => ExchangeType::Direct,
        ExchangeKind::Fanout => ExchangeType::Fanout,
    }
}

/// `text` with the password of `uri` replaced by `***` wherever it appears after a `:` and
/// before an `@` (how URLs print it), so an amiquip error naming the URL leaks nothing.
pub(crate) fn scrub(text: &str, uri: &str) -> String {
    match password(uri) {
        Some(password) if !password.is_empty() => text.replace(&format!(":{password}@"), ":***@"),
        _ => text.to_owned(),
    }
}

/// The password part of an `amqp://user:password@host/...` URI, as written.
fn password(uri: &str) -> Option<&str> {
    let rest = uri.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next()?;
    let userinfo = authority.rsplit_once('@')?.0;
    Some(userinfo.split_once(':')?.1)
}

fn value_in(v: &AmqpValue) -> FieldValue {
    match v {
        AmqpValue::Boolean(b) => FieldValue::Bool(*b),
        AmqpValue::ShortShortInt(n) => FieldValue::I64(i64::from(*n)),
        AmqpValue::ShortShortUInt(n) => FieldValue::I64(i64::from(*n)),
        AmqpValue::ShortInt(n) => FieldValue::I64(i64::from(*n)),
        AmqpValue::ShortUInt(n) => FieldValue::I64(i64::from(*n)),
        AmqpValue::LongInt(n) => FieldValue::I64(i64::from(*n)),
        AmqpValue::LongUInt(n) => FieldValue::I64(i64::from(*n)),
        AmqpValue::LongLongInt(n) => FieldValue::I64(*n),
        AmqpValue::Float(f) => FieldValue::F64(f64::from(*f)),
        AmqpValue::Double(f) => FieldValue::F64(*f),
        AmqpValue::DecimalValue(d) => FieldValue::F64(f64::from(d.value) / 10f64.powi(i32::from(d.scale))),
        AmqpValue::LongString(s) => FieldValue::Str(s.clone()),
        AmqpValue::FieldArray(items) => FieldValue::Array(items.iter().map(value_in).collect()),
        AmqpValue::Timestamp(t) => FieldValue::Timestamp(*t),
        AmqpValue::FieldTable(t) => FieldValue::Table(table_in(t)),
        AmqpValue::ByteArray(b) => FieldValue::Bytes(b.clone()),
        AmqpValue::Void => FieldValue::Void,
    }
}

fn value_out(v: &FieldValue) -> AmqpValue {
    match v {
        FieldValue::Void => AmqpValue::Void,
        FieldValue::Bool(b) => AmqpValue::Boolean(*b),
        FieldValue::I64(n) => match i32::try_from(*n) {
            Ok(small) => AmqpValue::LongInt(small),
            Err(_) => AmqpValue::LongLongInt(*n),
        },
        FieldValue::F64(f) => AmqpValue::Double(*f),
        FieldValue::Str(s) => AmqpValue::LongString(s.clone()),
        FieldValue::Bytes(b) => AmqpValue::ByteArray(b.clone()),
        FieldValue::Array(items) => AmqpValue::FieldArray(items.iter().map(value_out).collect()),
        FieldValue::Table(t) => AmqpValue::FieldTable(table_out(t)),
        FieldValue::Timestamp(t) => AmqpValue::Timestamp(*t),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_survive_a_round_trip() {
        let mut nested = Headers::new();
        nested.insert("n", FieldValue::I64(1));
        let mut headers = Headers::new();
        headers.insert("big", FieldValue::I64(i64::MAX));
        headers.insert("call_id_stack", FieldValue::Array(vec!["a.b.1".into(), "c.d.2".into()]));
        headers.insert("flag", FieldValue::Bool(true));
        headers.insert("nested", FieldValue::Table(nested));
        headers.insert("raw", FieldValue::Bytes(vec![0, 255]));
        headers.insert("ts", FieldValue::Timestamp(1_700_000_000));
        headers.insert("user_id", FieldValue::I64(42));
        headers.insert("void", FieldValue::Void);
        headers.insert("x", FieldValue::F64(0.5));
        let table = table_out(&headers);
        assert_eq!(table.get("user_id"), Some(&AmqpValue::LongInt(42)));
        assert_eq!(table.get("big"), Some(&AmqpValue::LongLongInt(i64::MAX)));
        // Keys were inserted sorted, so the order survives the wire's sorted table.
        assert_eq!(table_in(&table), headers);
    }

    #[test]
    fn narrow_wire_values_widen() {
        let mut table = FieldTable::new();
        table.insert("a".into(), AmqpValue::ShortShortUInt(7));
        table.insert("b".into(), AmqpValue::Float(1.5));
        let headers = table_in(&table);
        assert_eq!(headers.get("a"), Some(&FieldValue::I64(7)));
        assert_eq!(headers.get("b"), Some(&FieldValue::F64(1.5)));
    }

    #[test]
    fn properties_round_trip_and_headers_are_always_written() {
        let message = OutgoingMessage {
            exchange: "x".into(),
            routing_key: "k".into(),
            mandatory: false,
            properties: AmqpProperties {
                content_type: Some("application/json".into()),
                content_encoding: Some("utf-8".into()),
                delivery_mode: Some(2),
                priority: Some(0),
                correlation_id: Some("c".into()),
                reply_to: Some("r".into()),
                expiration: Some("5000".into()),
                headers: Headers::new(),
            },
            body: Bytes::new(),
        };
        let wire = properties_out(&message);
        assert_eq!(wire.headers().as_ref().map(FieldTable::len), Some(0));
        assert_eq!(properties_in(&wire), message.properties);
        assert_eq!(properties_in(&WireProperties::default()), AmqpProperties::default());
    }

    #[test]
    fn passwords_are_scrubbed_from_error_texts() {
        let uri = "amqp://bob:s3cret@rabbit:5672/vh";
        let text = "failed to connect to amqp://bob:s3cret@rabbit:5672/vh: refused";
        assert_eq!(scrub(text, uri), "failed to connect to amqp://bob:***@rabbit:5672/vh: refused");
        assert_eq!(scrub("no secret here", uri), "no secret here");
        assert_eq!(scrub("amqp://h/", "amqp://h/"), "amqp://h/");
        assert_eq!(password("amqp://u@h/"), None);
        assert_eq!(password("amqp://u:p%40ss@h/x?y=@"), Some("p%40ss"));
    }
}

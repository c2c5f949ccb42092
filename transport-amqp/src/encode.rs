//! Encoding: the core's [`Publish`] to an [`OutgoingMessage`], per dialect.

use bytes::Bytes;
use microfw_core::message::NAMEKO_EXCEPTIONS;
use microfw_core::targets;
use microfw_core::{
    Body, Destination, Dialect, Envelope, Headers, Publish, RemoteError, RpcReply, RpcRequest, Source,
    SubscriptionId, Transport,
};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::model::{AmqpProperties, OutgoingMessage};
use crate::topology::{
    AmqpSettings, MICRO_FRAMEWORK_BROADCAST, Topology, dead_letter_queue_name, dead_letter_topology,
    events_exchange, retry_queue_name, retry_topology, route_queue, rpc_exchange,
};

/// The content type of everything this crate writes.
pub const JSON: &str = "application/json";
/// The content encoding of everything this crate writes.
pub const UTF_8: &str = "utf-8";
/// The largest per-message TTL RabbitMQ accepts (ms); longer request expirations are capped.
pub const MAX_EXPIRATION_MS: u64 = u32::MAX as u64;

/// Why a publish could not be encoded. Each is a bug or a misconfigured link, never bad
/// input from a peer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The publish is for another transport (WebSocket).
    #[error("not an AMQP publish (transport {0:?})")]
    NotAmqp(Transport),
    /// The body does not fit the destination (e.g. a reply body on an RPC request).
    #[error("a {destination} publish cannot carry a {body} body")]
    UnexpectedBody {
        /// The destination kind.
        destination: &'static str,
        /// The body kind.
        body: &'static str,
    },
    /// An RPC request without `reply_to` (it would crash a Nameko service and poison its queue).
    #[error("RPC request without reply_to")]
    MissingReplyTo,
    /// A retry or dead letter names a subscription the resolver does not know.
    #[error("unknown subscription {0}")]
    UnknownSubscription(SubscriptionId),
    /// The subscription has no queue for the message's routing key.
    #[error("subscription {subscription} has no queue for routing key {routing_key:?}")]
    NoQueue {
        /// The subscription.
        subscription: SubscriptionId,
        /// The message's original routing key.
        routing_key: String,
    },
    /// The body could not be serialized.
    #[error("cannot serialize the body: {0}")]
    Json(String),
}

/// Encodes `publish` for RabbitMQ. The dialect comes from the destination ([`Destination`]'s
/// `Event`, `Rpc` and `Reply` carry one) or, for `Retry` and `DeadLetter`, from the
/// subscription's [`Source`], which `sources` resolves (the link keeps the sources of the
/// subscriptions it started).
///
/// * Event: exchange `<src>.events`, routing key the event type, raw body, the envelope's
///   headers, `application/json` (unless the envelope names another type), `utf-8`, delivery
///   mode 2, priority 0, `mandatory` as asked.
/// * RPC request: exchange `nameko-rpc` (or `RPC_EXCHANGE`) / `ufw-rpc`, routing key
///   `<svc>.<method>`, mandatory, `reply_to` and `correlation_id` from the envelope (the same
///   bare `reply_to` in both dialects: our reply queue is bound with it on both exchanges),
///   `expiration` the envelope's milliseconds as a string (capped at [`MAX_EXPIRATION_MS`]),
///   the envelope's headers; body `{"args","kwargs"}` or `{"command","command_args",
///   "command_kwargs"}`, every key always present.
/// * Reply: exchange the dialect's RPC exchange, routing key `reply_to`, the correlation id,
///   empty headers, not mandatory; Nameko body `{"result","error"}`, micro_framework body
///   `{"data","exception"}` encoded twice (a JSON string).
/// * Retry: default exchange, routing key `microfw.retry.<queue>.<delay_ms>`; DeadLetter:
///   default exchange, routing key `microfw.dlq.<queue>`. Both mandatory (the queue is
///   declared just before, see [`publish_topology`]), with headers, `correlation_id` and
///   `reply_to` carried, the body re-encoded in the source's dialect, and no `expiration`
///   (a TTL would cut the wait short, or drop a dead letter).
///
/// It does NOT declare anything: see [`publish_topology`].
pub fn encode<'a>(
    publish: &Publish,
    settings: &AmqpSettings,
    sources: impl Fn(SubscriptionId) -> Option<&'a Source>,
) -> Result<OutgoingMessage, EncodeError> {
    if publish.transport != Transport::Broker {
        return Err(EncodeError::NotAmqp(publish.transport));
    }
    let envelope = &publish.envelope;
    match &publish.destination {
        Destination::Event { source_service, event_type, dialect } => {
            let Body::Raw(body) = &envelope.body else { return Err(unexpected("event", &envelope.body)) };
            let mut properties = json_properties(envelope.headers.clone());
            properties.content_type =
                Some(envelope.properties.content_type.clone().unwrap_or_else(|| JSON.into()));
            Ok(OutgoingMessage {
                exchange: events_exchange(*dialect, source_service, settings).name,
                routing_key: event_type.clone(),
                mandatory: publish.mandatory,
                properties,
                body: body.clone(),
            })
        }
        Destination::Rpc { service, method, dialect } => {
            let Body::Request(request) = &envelope.body else {
                return Err(unexpected("RPC", &envelope.body));
            };
            let Some(reply_to) = envelope.properties.reply_to.clone() else {
                return Err(EncodeError::MissingReplyTo);
            };
            let mut properties = json_properties(envelope.headers.clone());
            properties.reply_to = Some(reply_to);
            properties.correlation_id = envelope.properties.correlation_id.clone();
            properties.expiration =
                envelope.properties.expiration_ms.map(|ms| ms.min(MAX_EXPIRATION_MS).to_string());
            // micro_framework serves its two listing commands on the broadcast queue only.
            let routing_key = if *dialect == Dialect::MicroFramework && targets::is_internal(method) {
                format!("{service}.{MICRO_FRAMEWORK_BROADCAST}.{method}")
            } else {
                format!("{service}.{method}")
            };
            Ok(OutgoingMessage {
                exchange: settings.rpc_exchange_of(*dialect).to_owned(),
                routing_key,
                mandatory: true,
                properties,
                body: request_body(*dialect, method, request)?,
            })
        }
        Destination::Reply { reply_to, dialect } => {
            let Body::Reply(reply) = &envelope.body else { return Err(unexpected("reply", &envelope.body)) };
            let mut properties = json_properties(Headers::new());
            properties.correlation_id = envelope.properties.correlation_id.clone();
            Ok(OutgoingMessage {
                exchange: settings.rpc_exchange_of(*dialect).to_owned(),
                routing_key: reply_to.clone(),
                mandatory: false,
                properties,
                body: reply_body(*dialect, reply)?,
            })
        }
        Destination::Retry { subscription, delay } => {
            let (queue, dialect) = resolve(*subscription, envelope, settings, &sources)?;
            settle_message(retry_queue_name(&queue, *delay), dialect, envelope)
        }
        Destination::DeadLetter { subscription } => {
            let (queue, dialect) = resolve(*subscription, envelope, settings, &sources)?;
            settle_message(dead_letter_queue_name(&queue), dialect, envelope)
        }
    }
}

/// What must exist before `publish` goes out: the events exchange (a publish to a missing
/// exchange closes the channel with 404), the RPC exchange of a request, the waiting queue
/// of a retry ([`retry_topology`]) or the dead-letter queue ([`dead_letter_topology`]).
/// Nothing for a reply (the caller's exchange and queue exist). The link may cache what it
/// declared; declaring again is harmless.
pub fn publish_topology<'a>(
    publish: &Publish,
    settings: &AmqpSettings,
    sources: impl Fn(SubscriptionId) -> Option<&'a Source>,
) -> Result<Topology, EncodeError> {
    if publish.transport != Transport::Broker {
        return Err(EncodeError::NotAmqp(publish.transport));
    }
    let exchanges = match &publish.destination {
        Destination::Event { source_service, dialect, .. } => {
            vec![events_exchange(*dialect, source_service, settings)]
        }
        Destination::Rpc { dialect, .. } => vec![rpc_exchange(*dialect, settings)],
        Destination::Reply { .. } => Vec::new(),
        Destination::Retry { subscription, delay } => {
            let (queue, _) = resolve(*subscription, &publish.envelope, settings, &sources)?;
            return Ok(retry_topology(&queue, *delay));
        }
        Destination::DeadLetter { subscription } => {
            let (queue, _) = resolve(*subscription, &publish.envelope, settings, &sources)?;
            return Ok(dead_letter_topology(&queue));
        }
    };
    Ok(Topology { exchanges, ..Topology::default() })
}

/// The error a micro_framework peer understands for `error`: Nameko's `MethodNotFound`
/// becomes `RPCTargetDoesNotExist` with micro_framework's text; anything else keeps its type
/// name and message (micro_framework 2.0.16 has no module or args fields).
pub fn micro_framework_error(error: &RemoteError) -> (String, String) {
    if error.exc_type == "MethodNotFound" && error.module == NAMEKO_EXCEPTIONS {
        let target = error.args.first().unwrap_or(&error.message);
        let message = format!("{target} does not exist or is not exposed through a RPC method.");
        ("RPCTargetDoesNotExist".to_owned(), message)
    } else {
        (error.exc_type.clone(), error.message.clone())
    }
}

/// The queue a retry or dead letter is named after, and the dialect to re-encode its body in.
fn resolve<'a>(
    subscription: SubscriptionId,
    envelope: &Envelope,
    settings: &AmqpSettings,
    sources: &impl Fn(SubscriptionId) -> Option<&'a Source>,
) -> Result<(String, Dialect), EncodeError> {
    let source = sources(subscription).ok_or(EncodeError::UnknownSubscription(subscription))?;
    let queue = route_queue(source, &envelope.routing_key, settings)
        .ok_or_else(|| EncodeError::NoQueue { subscription, routing_key: envelope.routing_key.clone() })?;
    let dialect = match source {
        Source::Event { dialect, .. } | Source::Rpc { dialect, .. } => *dialect,
        Source::WsRpc { .. } => Dialect::MicroFramework,
        Source::Replies { .. } => Dialect::Nameko,
    };
    Ok((queue, dialect))
}

fn settle_message(
    routing_key: String,
    dialect: Dialect,
    envelope: &Envelope,
) -> Result<OutgoingMessage, EncodeError> {
    let mut properties = json_properties(envelope.headers.clone());
    let body = match &envelope.body {
        Body::Raw(body) => {
            if let Some(content_type) = &envelope.properties.content_type {
                properties.content_type = Some(content_type.clone());
            }
            body.clone()
        }
        Body::Request(request) => request_body(dialect, &request.method, request)?,
        other => return Err(unexpected("retry or dead-letter", other)),
    };
    properties.correlation_id = envelope.properties.correlation_id.clone();
    properties.reply_to = envelope.properties.reply_to.clone();
    Ok(OutgoingMessage { exchange: String::new(), routing_key, mandatory: true, properties, body })
}

fn json_properties(headers: Headers) -> AmqpProperties {
    AmqpProperties {
        content_type: Some(JSON.to_owned()),
        content_encoding: Some(UTF_8.to_owned()),
        delivery_mode: Some(2),
        priority: Some(0),
        headers,
        ..AmqpProperties::default()
    }
}

#[derive(Serialize)]
struct NamekoRequest<'a> {
    args: &'a [Value],
    kwargs: &'a Map<String, Value>,
}

#[derive(Serialize)]
struct MicroFrameworkRequest<'a> {
    command: &'a str,
    command_args: &'a [Value],
    command_kwargs: &'a Map<String, Value>,
}

#[derive(Serialize)]
struct NamekoReply<'a> {
    result: &'a Value,
    error: Option<NamekoError<'a>>,
}

#[derive(Serialize)]
struct NamekoError<'a> {
    exc_type: &'a str,
    exc_path: String,
    exc_args: &'a [String],
    value: &'a str,
}

#[derive(Serialize)]
struct MicroFrameworkReply<'a> {
    data: &'a Value,
    exception: Option<MicroFrameworkError>,
}

#[derive(Serialize)]
struct MicroFrameworkError {
    exception: String,
    message: String,
}

fn request_body(dialect: Dialect, method: &str, request: &RpcRequest) -> Result<Bytes, EncodeError> {
    match dialect {
        Dialect::Nameko => to_bytes(&NamekoRequest { args: &request.args, kwargs: &request.kwargs }),
        Dialect::MicroFramework => to_bytes(&MicroFrameworkRequest {
            command: method,
            command_args: &request.args,
            command_kwargs: &request.kwargs,
        }),
    }
}

fn reply_body(dialect: Dialect, reply: &RpcReply) -> Result<Bytes, EncodeError> {
    const NULL: &Value = &Value::Null;
    match (dialect, &reply.result) {
        (Dialect::Nameko, Ok(result)) => to_bytes(&NamekoReply { result, error: None }),
        (Dialect::Nameko, Err(e)) => to_bytes(&NamekoReply {
            result: NULL,
            error: Some(NamekoError {
                exc_type: &e.exc_type,
                exc_path: e.path(),
                exc_args: &e.args,
                value: &e.message,
            }),
        }),
        (Dialect::MicroFramework, result) => {
            let inner = match result {
                Ok(data) => MicroFrameworkReply { data, exception: None },
                Err(e) => {
                    let (exception, message) = micro_framework_error(e);
                    MicroFrameworkReply {
                        data: NULL,
                        exception: Some(MicroFrameworkError { exception, message }),
                    }
                }
            };
            let text = serde_json::to_string(&inner).map_err(|e| EncodeError::Json(e.to_string()))?;
            to_bytes(&text)
        }
    }
}

fn to_bytes(value: &impl Serialize) -> Result<Bytes, EncodeError> {
    serde_json::to_vec(value).map(Bytes::from).map_err(|e| EncodeError::Json(e.to_string()))
}

fn unexpected(destination: &'static str, body: &Body) -> EncodeError {
    let body = match body {
        Body::Raw(_) => "raw",
        Body::Request(_) => "request",
        Body::MalformedRequest { .. } => "malformed request",
        Body::Reply(_) => "reply",
    };
    EncodeError::UnexpectedBody { destination, body }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use microfw_core::{Properties, PublishId};
    use serde_json::json;

    use super::*;

    fn publish(destination: Destination, body: Body) -> Publish {
        Publish {
            id: PublishId::from_raw(1),
            transport: Transport::Broker,
            destination,
            mandatory: false,
            envelope: Envelope {
                exchange: String::new(),
                routing_key: "svc.m".into(),
                headers: Headers::new(),
                properties: Properties { reply_to: Some("r".into()), ..Properties::default() },
                body,
            },
        }
    }

    fn none(_: SubscriptionId) -> Option<&'static Source> {
        None
    }

    fn rpc() -> Destination {
        Destination::Rpc { service: "svc".into(), method: "m".into(), dialect: Dialect::Nameko }
    }

    fn request() -> Body {
        Body::Request(RpcRequest { method: "m".into(), args: vec![], kwargs: Map::new() })
    }

    #[test]
    fn refusals_are_typed() {
        let s = AmqpSettings::new("svc");
        let mut ws = publish(rpc(), request());
        ws.transport = Transport::WebSocket;
        assert_eq!(encode(&ws, &s, none), Err(EncodeError::NotAmqp(Transport::WebSocket)));
        assert_eq!(publish_topology(&ws, &s, none), Err(EncodeError::NotAmqp(Transport::WebSocket)));
        let event = Destination::Event {
            source_service: "a".into(),
            event_type: "e".into(),
            dialect: Dialect::Nameko,
        };
        assert_eq!(
            encode(&publish(event, request()), &s, none),
            Err(EncodeError::UnexpectedBody { destination: "event", body: "request" })
        );
        assert_eq!(
            encode(&publish(rpc(), Body::Raw(Bytes::new())), &s, none),
            Err(EncodeError::UnexpectedBody { destination: "RPC", body: "raw" })
        );
        let reply = Destination::Reply { reply_to: "r".into(), dialect: Dialect::Nameko };
        assert_eq!(
            encode(&publish(reply, Body::MalformedRequest { reason: "x".into() }), &s, none),
            Err(EncodeError::UnexpectedBody { destination: "reply", body: "malformed request" })
        );
        let mut no_reply_to = publish(rpc(), request());
        no_reply_to.envelope.properties.reply_to = None;
        assert_eq!(encode(&no_reply_to, &s, none), Err(EncodeError::MissingReplyTo));
        let sub = SubscriptionId::from_raw(4);
        let retry = Destination::Retry { subscription: sub, delay: Duration::from_millis(100) };
        assert_eq!(
            encode(&publish(retry.clone(), request()), &s, none),
            Err(EncodeError::UnknownSubscription(sub))
        );
        assert_eq!(
            publish_topology(&publish(retry, request()), &s, none),
            Err(EncodeError::UnknownSubscription(sub))
        );
        let mf = Source::Rpc { service: "svc".into(), dialect: Dialect::MicroFramework, methods: vec![] };
        let mut foreign = publish(Destination::DeadLetter { subscription: sub }, request());
        foreign.envelope.routing_key = "other.m".into();
        assert_eq!(
            encode(&foreign, &s, |_| Some(&mf)),
            Err(EncodeError::NoQueue { subscription: sub, routing_key: "other.m".into() })
        );
        let nameko = Source::Rpc { service: "svc".into(), dialect: Dialect::Nameko, methods: vec![] };
        let reply_body = Body::Reply(RpcReply { result: Ok(json!(1)) });
        assert_eq!(
            encode(&publish(Destination::DeadLetter { subscription: sub }, reply_body), &s, |_| Some(
                &nameko
            )),
            Err(EncodeError::UnexpectedBody { destination: "retry or dead-letter", body: "reply" })
        );
    }

    #[test]
    fn expiration_is_capped_and_events_keep_their_content_type() {
        let s = AmqpSettings::new("svc");
        let mut p = publish(rpc(), request());
        p.envelope.properties.expiration_ms = Some(u64::MAX);
        assert_eq!(encode(&p, &s, none).unwrap().properties.expiration.as_deref(), Some("4294967295"));

        let event = Destination::Event {
            source_service: "a".into(),
            event_type: "e".into(),
            dialect: Dialect::Nameko,
        };
        let mut p = publish(event, Body::Raw(Bytes::from_static(b"hi")));
        p.envelope.properties.content_type = Some("text/plain".into());
        p.mandatory = true;
        let out = encode(&p, &s, none).unwrap();
        assert_eq!(out.properties.content_type.as_deref(), Some("text/plain"));
        assert!(out.mandatory, "events keep the mandatory flag they were asked for");
        assert_eq!(out.properties.reply_to, None);
        let t = publish_topology(&p, &s, none).unwrap();
        assert_eq!((t.exchanges[0].name.as_str(), t.exchanges[0].auto_delete), ("a.events", false));
        let t = publish_topology(&publish(rpc(), request()), &s, none).unwrap();
        assert_eq!(t.exchanges[0].name, "nameko-rpc");
    }

    #[test]
    fn micro_framework_listing_commands_go_to_the_broadcast_queue() {
        let s = AmqpSettings::new("caller");
        let mf_call = |method: &str| {
            let destination = Destination::Rpc {
                service: "svc".into(),
                method: method.into(),
                dialect: Dialect::MicroFramework,
            };
            let body = Body::Request(RpcRequest { method: method.into(), args: vec![], kwargs: Map::new() });
            encode(&publish(destination, body), &s, none).unwrap().routing_key
        };
        assert_eq!(mf_call("__list_targets__"), "svc._broadcast.__list_targets__");
        assert_eq!(mf_call("__get_target__"), "svc._broadcast.__get_target__");
        assert_eq!(mf_call("add"), "svc.add");
        let nameko = publish(rpc(), request());
        assert_eq!(encode(&nameko, &s, none).unwrap().routing_key, "svc.m");
    }

    #[test]
    fn micro_framework_error_mapping() {
        let (name, message) = micro_framework_error(&RemoteError::method_not_found("t"));
        assert_eq!(
            (name.as_str(), message.as_str()),
            ("RPCTargetDoesNotExist", "t does not exist or is not exposed through a RPC method.")
        );
        let own = RemoteError::new("app", "MethodNotFound", "mine");
        assert_eq!(micro_framework_error(&own), ("MethodNotFound".to_owned(), "mine".to_owned()));
        let bad = RemoteError::malformed_request("Message missing `command`");
        assert_eq!(
            micro_framework_error(&bad),
            ("MalformedRequest".to_owned(), "Message missing `command`".to_owned())
        );
    }
}

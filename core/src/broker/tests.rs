use std::collections::HashMap;
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::message::{Body, FieldValue, Headers};

fn at(ms: u64) -> Instant {
    Instant::from_unix_millis(ms)
}

fn msg(key: &str, body: &str) -> Envelope {
    Envelope::raw("ignored", key, body.to_owned())
}

fn body(e: &Envelope) -> &str {
    match &e.body {
        Body::Raw(b) => std::str::from_utf8(b).unwrap(),
        other => panic!("not raw: {other:?}"),
    }
}

fn ttl(ms: u64) -> QueueOptions {
    QueueOptions { message_ttl: Some(Duration::from_millis(ms)), ..QueueOptions::default() }
}

fn dlx(exchange: &str, key: Option<&str>) -> QueueOptions {
    QueueOptions {
        dead_letter_exchange: Some(exchange.to_owned()),
        dead_letter_routing_key: key.map(str::to_owned),
        ..QueueOptions::default()
    }
}

/// Bodies delivered at `now` until `next_delivery` is exhausted (acking each).
fn drain(b: &mut MemoryBroker, now: Instant) -> Vec<(String, String)> {
    let mut out = Vec::new();
    while let Some(d) = b.next_delivery(now) {
        b.ack(d.tag).unwrap();
        out.push((d.queue, body(&d.envelope).to_owned()));
    }
    out
}

fn broker_with(queues: &[&str]) -> MemoryBroker {
    let mut b = MemoryBroker::new();
    for q in queues {
        b.declare_queue(q, QueueOptions::default()).unwrap();
    }
    b
}

#[test]
fn exchanges_declare_idempotently() {
    let mut b = MemoryBroker::new();
    assert!(!b.exchange_exists("x"));
    b.declare_exchange("x", ExchangeKind::Topic).unwrap();
    b.declare_exchange("x", ExchangeKind::Topic).unwrap();
    assert_eq!(
        b.declare_exchange("x", ExchangeKind::Direct),
        Err(BrokerError::Inequivalent { name: "x".into(), what: "type".into() })
    );
    assert_eq!(b.exchange_kind("x"), Some(ExchangeKind::Topic));
    assert_eq!(b.declare_exchange("", ExchangeKind::Direct), Err(BrokerError::DefaultExchange));
    assert!(b.exchange_exists(""));
    b.delete_exchange("x").unwrap();
    assert!(!b.exchange_exists("x"));
    b.delete_exchange("x").unwrap();
}

#[test]
fn queues_declare_idempotently() {
    let mut b = MemoryBroker::new();
    b.declare_queue("q", ttl(100)).unwrap();
    b.declare_queue("q", ttl(100)).unwrap();
    let err = |what: &str| Err(BrokerError::Inequivalent { name: "q".into(), what: what.into() });
    assert_eq!(b.declare_queue("q", ttl(200)), err("x-message-ttl"));
    let auto = QueueOptions { auto_delete: true, ..ttl(100) };
    assert_eq!(b.declare_queue("q", auto), err("auto_delete"));
    assert_eq!(b.declare_queue("q", QueueOptions { exclusive: true, ..ttl(100) }), err("exclusive"));
    assert_eq!(b.queue_options("q"), Some(&ttl(100)));
    assert_eq!(b.declare_queue("", QueueOptions::default()), Err(BrokerError::EmptyQueueName));
    let bad = QueueOptions { dead_letter_routing_key: Some("k".into()), ..QueueOptions::default() };
    assert!(matches!(b.declare_queue("r", bad), Err(BrokerError::InvalidOptions { .. })));
    assert!(!b.queue_exists("r"));
    assert_eq!(b.queue_names(), vec!["q"]);
}

#[test]
fn bindings() {
    let mut b = broker_with(&["q"]);
    b.declare_exchange("x", ExchangeKind::Topic).unwrap();
    assert_eq!(b.bind("nope", "x", "k"), Err(BrokerError::NoSuchQueue("nope".into())));
    assert_eq!(b.bind("q", "nope", "k"), Err(BrokerError::NoSuchExchange("nope".into())));
    assert_eq!(b.bind("q", "", "k"), Err(BrokerError::DefaultExchange));
    b.bind("q", "x", "a.#").unwrap();
    b.bind("q", "x", "a.#").unwrap();
    b.bind("q", "x", "*.b").unwrap();
    assert_eq!(b.bindings_of("q"), vec![("x", "*.b"), ("x", "a.#")]);
    // Both bindings match: one copy.
    assert_eq!(b.publish(at(0), "x", msg("a.b", "1")), Ok(1));
    assert_eq!(b.queue_len("q"), Some(1));
    b.unbind("q", "x", "a.#").unwrap();
    b.unbind("q", "x", "a.#").unwrap();
    assert_eq!(b.bindings_of("q"), vec![("x", "*.b")]);
    assert_eq!(b.publish(at(0), "x", msg("a.c", "2")), Ok(0));
    b.delete_exchange("x").unwrap();
    assert_eq!(b.bindings_of("q"), vec![]);
}

#[test]
fn routing_by_exchange_kind() {
    let mut b = broker_with(&["q1", "q2", "q3"]);
    b.declare_exchange("topic", ExchangeKind::Topic).unwrap();
    b.declare_exchange("direct", ExchangeKind::Direct).unwrap();
    b.declare_exchange("fanout", ExchangeKind::Fanout).unwrap();
    b.bind("q1", "topic", "svc.*").unwrap();
    b.bind("q2", "topic", "#").unwrap();
    b.bind("q1", "direct", "k").unwrap();
    b.bind("q2", "direct", "k.*").unwrap();
    b.bind("q2", "fanout", "ignored").unwrap();
    b.bind("q3", "fanout", "").unwrap();
    assert_eq!(b.publish(at(0), "topic", msg("svc.evt", "t1")), Ok(2));
    assert_eq!(b.publish(at(0), "topic", msg("other", "t2")), Ok(1));
    assert_eq!(b.publish(at(0), "direct", msg("k", "d1")), Ok(1));
    assert_eq!(b.publish(at(0), "direct", msg("k.x", "d2")), Ok(0));
    assert_eq!(b.publish(at(0), "fanout", msg("whatever", "f1")), Ok(2));
    assert_eq!(b.publish(at(0), "", msg("q3", "default")), Ok(1));
    assert_eq!(b.publish(at(0), "", msg("nope", "lost")), Ok(0));
    assert_eq!(
        b.publish(at(0), "missing", msg("k", "x")),
        Err(BrokerError::NoSuchExchange("missing".into()))
    );
    let bodies = |b: &MemoryBroker, q| b.peek(q).unwrap().map(|e| body(e).to_owned()).collect::<Vec<_>>();
    assert_eq!(bodies(&b, "q1"), ["t1", "d1"]);
    assert_eq!(bodies(&b, "q2"), ["t1", "t2", "f1"]);
    assert_eq!(bodies(&b, "q3"), ["f1", "default"]);
    let first = b.peek("q1").unwrap().next().unwrap();
    assert_eq!((first.exchange.as_str(), first.routing_key.as_str()), ("topic", "svc.evt"));
}

#[test]
fn prefetch_limits_unacked() {
    let mut b = broker_with(&["q"]);
    for i in 0..5 {
        b.publish(at(0), "", msg("q", &i.to_string())).unwrap();
    }
    let c = b.consume("q", 2).unwrap();
    let d1 = b.next_delivery(at(0)).unwrap();
    let d2 = b.next_delivery(at(0)).unwrap();
    assert_eq!(b.next_delivery(at(0)), None);
    assert_eq!((d1.consumer, body(&d1.envelope), d1.redelivered), (c, "0", false));
    assert!(d2.tag > d1.tag);
    assert_eq!((b.queue_len("q"), b.unacked_len("q")), (Some(3), Some(2)));
    b.ack(d1.tag).unwrap();
    assert_eq!(b.ack(d1.tag), Err(BrokerError::UnknownDeliveryTag(d1.tag)));
    assert_eq!(body(&b.next_delivery(at(0)).unwrap().envelope), "2");
    assert_eq!(b.next_delivery(at(0)), None);
}

#[test]
fn round_robin_across_consumers_and_queues() {
    let mut b = broker_with(&["q", "r"]);
    let c1 = b.consume("q", 0).unwrap();
    let c2 = b.consume("q", 0).unwrap();
    let c3 = b.consume("r", 0).unwrap();
    for i in 0..4 {
        b.publish(at(0), "", msg("q", &format!("q{i}"))).unwrap();
    }
    for i in 0..2 {
        b.publish(at(0), "", msg("r", &format!("r{i}"))).unwrap();
    }
    let got: Vec<(ConsumerTag, String)> = std::iter::from_fn(|| b.next_delivery(at(0)))
        .map(|d| (d.consumer, body(&d.envelope).to_owned()))
        .collect();
    let want = [(c1, "q0"), (c3, "r0"), (c2, "q1"), (c3, "r1"), (c1, "q2"), (c2, "q3")];
    assert_eq!(got, want.map(|(c, s)| (c, s.to_owned())));
}

#[test]
fn ack_multiple_acks_one_consumers_tags_up_to() {
    let mut b = broker_with(&["q"]);
    let c1 = b.consume("q", 0).unwrap();
    let c2 = b.consume("q", 0).unwrap();
    for i in 0..6 {
        b.publish(at(0), "", msg("q", &i.to_string())).unwrap();
    }
    let ds: Vec<BrokerDelivery> = std::iter::from_fn(|| b.next_delivery(at(0))).collect();
    assert_eq!(ds.len(), 6);
    // c1 has tags 1, 3, 5; c2 has 2, 4, 6.
    assert_eq!(b.ack_multiple(ds[3].tag, c1), Ok(2));
    assert_eq!(b.unacked_len("q"), Some(4));
    assert_eq!(b.ack(ds[0].tag), Err(BrokerError::UnknownDeliveryTag(ds[0].tag)));
    b.ack(ds[4].tag).unwrap();
    assert_eq!(b.ack_multiple(ds[5].tag, c2), Ok(3));
    assert_eq!(b.unacked_len("q"), Some(0));
    let gone = ConsumerTag::from_raw(99);
    assert_eq!(b.ack_multiple(ds[5].tag, gone), Err(BrokerError::UnknownConsumer(gone)));
}

#[test]
fn reject_with_requeue_goes_back_to_the_head() {
    let mut b = broker_with(&["q"]);
    b.consume("q", 1).unwrap();
    b.publish(at(0), "", msg("q", "a")).unwrap();
    b.publish(at(0), "", msg("q", "b")).unwrap();
    let d = b.next_delivery(at(0)).unwrap();
    b.reject(d.tag, true).unwrap();
    assert_eq!(b.reject(d.tag, true), Err(BrokerError::UnknownDeliveryTag(d.tag)));
    let again = b.next_delivery(at(0)).unwrap();
    assert_eq!((body(&again.envelope), again.redelivered), ("a", true));
    assert!(again.tag > d.tag);
    b.ack(again.tag).unwrap();
    let next = b.next_delivery(at(0)).unwrap();
    assert_eq!((body(&next.envelope), next.redelivered), ("b", false));
}

#[test]
fn reject_without_requeue_dead_letters_with_x_death() {
    let mut b = broker_with(&["dlq"]);
    b.declare_exchange("events", ExchangeKind::Topic).unwrap();
    b.declare_exchange("dlx", ExchangeKind::Fanout).unwrap();
    b.declare_queue("q", dlx("dlx", None)).unwrap();
    b.bind("q", "events", "#").unwrap();
    b.bind("dlq", "dlx", "").unwrap();
    b.consume("q", 0).unwrap();
    let mut m = msg("svc.evt", "x");
    m.properties.expiration_ms = Some(60_000);
    b.publish(at(5_000), "events", m).unwrap();
    let d = b.next_delivery(at(5_000)).unwrap();
    b.reject_at(at(7_000), d.tag, false).unwrap();
    assert_eq!((b.queue_len("q"), b.unacked_len("q"), b.queue_len("dlq")), (Some(0), Some(0), Some(1)));
    let dead = b.peek("dlq").unwrap().next().unwrap();
    assert_eq!((dead.exchange.as_str(), dead.routing_key.as_str()), ("dlx", "svc.evt"));
    assert_eq!(dead.properties.expiration_ms, None);
    let mut entry = Headers::new();
    entry.insert("count", 1i64);
    entry.insert("exchange", "events");
    entry.insert("original-expiration", "60000");
    entry.insert("queue", "q");
    entry.insert("reason", "rejected");
    entry.insert("routing-keys", FieldValue::Array(vec!["svc.evt".into()]));
    entry.insert("time", FieldValue::Timestamp(7));
    assert_eq!(dead.headers.get("x-death"), Some(&FieldValue::Array(vec![FieldValue::Table(entry)])));
    assert_eq!(dead.headers.get("x-first-death-queue"), Some(&"q".into()));
    assert_eq!(dead.headers.get("x-first-death-reason"), Some(&"rejected".into()));
    assert_eq!(dead.headers.get("x-first-death-exchange"), Some(&"events".into()));
    // Without a dead-letter exchange the message is dropped.
    b.consume("dlq", 0).unwrap();
    let d = b.next_delivery(at(8_000)).unwrap();
    b.reject(d.tag, false).unwrap();
    assert_eq!(b.next_delivery(at(8_000)), None);
    assert_eq!(b.queue_len("dlq"), Some(0));
}

#[test]
fn repeated_deaths_increment_one_entry() {
    let mut b = MemoryBroker::new();
    // Rejected messages come back to the same queue: a cycle with a reject is allowed.
    b.declare_queue("q", dlx("", Some("q"))).unwrap();
    b.consume("q", 0).unwrap();
    b.publish(at(0), "", msg("q", "x")).unwrap();
    for _ in 0..3 {
        let d = b.next_delivery(at(0)).unwrap();
        b.reject(d.tag, false).unwrap();
    }
    let d = b.next_delivery(at(0)).unwrap();
    let Some(FieldValue::Array(deaths)) = d.envelope.headers.get("x-death") else { panic!() };
    assert_eq!(deaths.len(), 1);
    let FieldValue::Table(entry) = &deaths[0] else { panic!() };
    assert_eq!(entry.get("count"), Some(&FieldValue::I64(3)));
    assert_eq!(entry.get("exchange"), Some(&"".into()));
    assert!(!d.redelivered);
}

#[test]
fn cancel_returns_unacked_to_the_head_in_order() {
    let mut b = broker_with(&["q"]);
    let c1 = b.consume("q", 0).unwrap();
    for i in 0..4 {
        b.publish(at(0), "", msg("q", &i.to_string())).unwrap();
    }
    let d0 = b.next_delivery(at(0)).unwrap();
    let d1 = b.next_delivery(at(0)).unwrap();
    let _d2 = b.next_delivery(at(0)).unwrap();
    b.ack(d1.tag).unwrap();
    b.cancel(c1).unwrap();
    assert_eq!(b.cancel(c1), Err(BrokerError::UnknownConsumer(c1)));
    assert_eq!(b.ack(d0.tag), Err(BrokerError::UnknownDeliveryTag(d0.tag)));
    assert_eq!((b.queue_len("q"), b.unacked_len("q"), b.consumer_count("q")), (Some(3), Some(0), Some(0)));
    assert_eq!(b.next_delivery(at(0)), None);
    b.consume("q", 0).unwrap();
    let got: Vec<(String, bool)> = std::iter::from_fn(|| b.next_delivery(at(0)))
        .map(|d| (body(&d.envelope).to_owned(), d.redelivered))
        .collect();
    assert_eq!(got, [("0".into(), true), ("2".into(), true), ("3".into(), false)]);
}

#[test]
fn waiting_queue_delivers_to_its_target_after_the_ttl() {
    let mut b = broker_with(&["target"]);
    let wait = QueueOptions { message_ttl: Some(Duration::from_millis(100)), ..dlx("", Some("target")) };
    b.declare_queue("microfw.retry.target.100", wait).unwrap();
    b.consume("target", 0).unwrap();
    assert_eq!(b.poll_timeout(), None);
    b.publish(at(1_000), "", msg("microfw.retry.target.100", "a")).unwrap();
    b.publish(at(1_030), "", msg("microfw.retry.target.100", "b")).unwrap();
    assert_eq!(b.poll_timeout(), Some(at(1_100)));
    assert_eq!(b.next_delivery(at(1_099)), None);
    let d = b.next_delivery(at(1_100)).unwrap();
    assert_eq!((d.queue.as_str(), body(&d.envelope)), ("target", "a"));
    assert_eq!((d.envelope.exchange.as_str(), d.envelope.routing_key.as_str()), ("", "target"));
    let Some(FieldValue::Array(deaths)) = d.envelope.headers.get("x-death") else { panic!() };
    let FieldValue::Table(entry) = &deaths[0] else { panic!() };
    assert_eq!(entry.get("reason"), Some(&"expired".into()));
    assert_eq!(entry.get("routing-keys"), Some(&FieldValue::Array(vec!["microfw.retry.target.100".into()])));
    assert_eq!(b.poll_timeout(), Some(at(1_130)));
    assert_eq!(b.next_delivery(at(1_100)), None);
    b.handle_timeout(at(1_200));
    assert_eq!((b.queue_len("microfw.retry.target.100"), b.queue_len("target")), (Some(0), Some(1)));
    assert_eq!(b.poll_timeout(), None);
}

#[test]
fn expiry_happens_at_the_head_only() {
    let mut b = broker_with(&["q"]);
    let mut long = msg("q", "long");
    long.properties.expiration_ms = Some(1_000);
    let mut short = msg("q", "short");
    short.properties.expiration_ms = Some(100);
    b.publish(at(0), "", long).unwrap();
    b.publish(at(0), "", short).unwrap();
    assert_eq!(b.poll_timeout(), Some(at(1_000)));
    b.handle_timeout(at(500));
    assert_eq!(b.queue_len("q"), Some(2));
    // Once the head goes, the overdue message behind it goes at once.
    b.handle_timeout(at(1_000));
    assert_eq!(b.queue_len("q"), Some(0));
    assert_eq!(b.poll_timeout(), None);
}

#[test]
fn message_ttl_is_the_shorter_of_queue_and_message() {
    let mut b = MemoryBroker::new();
    b.declare_queue("q", ttl(300)).unwrap();
    let mut m = msg("q", "a");
    m.properties.expiration_ms = Some(50);
    b.publish(at(0), "", m).unwrap();
    assert_eq!(b.poll_timeout(), Some(at(50)));
    b.handle_timeout(at(50));
    let mut m = msg("q", "b");
    m.properties.expiration_ms = Some(5_000);
    b.publish(at(100), "", m).unwrap();
    assert_eq!(b.poll_timeout(), Some(at(400)));
}

#[test]
fn a_delivered_head_uncovers_an_overdue_message() {
    let mut b = broker_with(&["q", "dlq"]);
    b.declare_queue("q2", dlx("", Some("dlq"))).unwrap();
    let c = b.consume("q2", 1).unwrap();
    b.publish(at(0), "", msg("q2", "long")).unwrap();
    let mut short = msg("q2", "short");
    short.properties.expiration_ms = Some(10);
    b.publish(at(0), "", short).unwrap();
    let d = b.next_delivery(at(20)).unwrap();
    assert_eq!(body(&d.envelope), "long");
    assert_eq!(b.poll_timeout(), Some(at(10)));
    b.ack_multiple(d.tag, c).unwrap();
    // The consumer is free again, but "short" expired while waiting behind "long".
    assert_eq!(b.next_delivery(at(20)), None);
    assert_eq!(b.queue_len("dlq"), Some(1));
}

#[test]
fn requeued_messages_keep_their_expiry() {
    let mut b = MemoryBroker::new();
    b.declare_queue("q", ttl(100)).unwrap();
    b.consume("q", 0).unwrap();
    b.publish(at(0), "", msg("q", "a")).unwrap();
    let d = b.next_delivery(at(50)).unwrap();
    b.reject(d.tag, true).unwrap();
    assert_eq!(b.poll_timeout(), Some(at(100)));
    assert_eq!(b.next_delivery(at(150)), None);
    assert_eq!(b.queue_len("q"), Some(0));
}

#[test]
fn rejects_dead_letter_at_the_latest_or_given_now() {
    let death_time = |b: &MemoryBroker| {
        let dead = b.peek("wait").unwrap().next().unwrap();
        let Some(FieldValue::Array(deaths)) = dead.headers.get("x-death") else { panic!() };
        let FieldValue::Table(entry) = &deaths[0] else { panic!() };
        entry.get("time").cloned()
    };
    let mut b = MemoryBroker::new();
    b.declare_queue("wait", ttl(100)).unwrap();
    b.declare_queue("q", dlx("", Some("wait"))).unwrap();
    b.consume("q", 0).unwrap();
    b.publish(at(0), "", msg("q", "a")).unwrap();
    b.publish(at(0), "", msg("q", "b")).unwrap();
    let a = b.next_delivery(at(4_000)).unwrap();
    let d = b.next_delivery(at(4_000)).unwrap();
    b.reject(a.tag, false).unwrap();
    assert_eq!(b.poll_timeout(), Some(at(4_100)));
    assert_eq!(death_time(&b), Some(FieldValue::Timestamp(4)));
    b.handle_timeout(at(4_100));
    b.reject_at(at(6_000), d.tag, false).unwrap();
    assert_eq!(b.poll_timeout(), Some(at(6_100)));
    assert_eq!(death_time(&b), Some(FieldValue::Timestamp(6)));
}

#[test]
fn expiry_cycles_without_a_reject_are_dropped() {
    let mut b = MemoryBroker::new();
    let opts = QueueOptions { message_ttl: Some(Duration::ZERO), ..dlx("", Some("b")) };
    b.declare_queue("a", opts).unwrap();
    let opts = QueueOptions { message_ttl: Some(Duration::ZERO), ..dlx("", Some("a")) };
    b.declare_queue("b", opts).unwrap();
    b.publish(at(0), "", msg("a", "x")).unwrap();
    b.handle_timeout(at(0));
    assert_eq!((b.queue_len("a"), b.queue_len("b")), (Some(0), Some(0)));
    assert_eq!(b.poll_timeout(), None);
}

#[test]
fn dead_letters_to_a_missing_exchange_are_dropped() {
    let mut b = MemoryBroker::new();
    b.declare_queue("q", QueueOptions { message_ttl: Some(Duration::from_millis(5)), ..dlx("gone", None) })
        .unwrap();
    b.publish(at(0), "", msg("q", "x")).unwrap();
    b.handle_timeout(at(5));
    assert_eq!(b.queue_len("q"), Some(0));
}

#[test]
fn auto_delete_queue_goes_with_its_last_consumer() {
    let mut b = MemoryBroker::new();
    b.declare_exchange("x", ExchangeKind::Fanout).unwrap();
    b.declare_queue("q", QueueOptions { auto_delete: true, ..QueueOptions::default() }).unwrap();
    b.bind("q", "x", "").unwrap();
    let c1 = b.consume("q", 0).unwrap();
    let c2 = b.consume("q", 0).unwrap();
    b.publish(at(0), "x", msg("", "m")).unwrap();
    let d = b.next_delivery(at(0)).unwrap();
    b.cancel(c1).unwrap();
    assert!(b.queue_exists("q"));
    b.cancel(c2).unwrap();
    assert!(!b.queue_exists("q"));
    assert_eq!(b.ack(d.tag), Err(BrokerError::UnknownDeliveryTag(d.tag)));
    assert_eq!(b.publish(at(0), "x", msg("", "m")), Ok(0));
    // The name is free again, and the freed slot does not leak old state.
    b.declare_queue("q", QueueOptions::default()).unwrap();
    assert_eq!((b.queue_len("q"), b.consumer_count("q")), (Some(0), Some(0)));
    assert_eq!(b.bindings_of("q"), vec![]);
}

#[test]
fn delete_and_purge() {
    let mut b = broker_with(&["q", "r"]);
    let c = b.consume("q", 0).unwrap();
    for i in 0..3 {
        b.publish(at(0), "", msg("q", &i.to_string())).unwrap();
        b.publish(at(0), "", msg("r", &i.to_string())).unwrap();
    }
    let d = b.next_delivery(at(0)).unwrap();
    assert_eq!(b.purge("q"), Ok(2));
    assert_eq!(b.unacked_len("q"), Some(1));
    assert_eq!(b.purge("nope"), Err(BrokerError::NoSuchQueue("nope".into())));
    assert_eq!(b.delete_queue("r"), Ok(3));
    assert_eq!(b.delete_queue("r"), Ok(0));
    assert_eq!(b.delete_queue("q"), Ok(0));
    assert_eq!(b.ack(d.tag), Err(BrokerError::UnknownDeliveryTag(d.tag)));
    assert_eq!(b.cancel(c), Err(BrokerError::UnknownConsumer(c)));
    assert_eq!(b.consume("q", 0), Err(BrokerError::NoSuchQueue("q".into())));
    assert_eq!(b.next_delivery(at(0)), None);
    assert!(b.queue_names().is_empty());
}

#[derive(Clone, Debug)]
enum Op {
    Publish(u8),
    Deliver,
    Ack(usize),
    AckMultiple(usize),
    Reject(usize, bool),
    Consume(u8, u32),
    Cancel(usize),
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..3).prop_map(Op::Publish),
        5 => Just(Op::Deliver),
        2 => any::<usize>().prop_map(Op::Ack),
        1 => any::<usize>().prop_map(Op::AckMultiple),
        2 => (any::<usize>(), any::<bool>()).prop_map(|(i, r)| Op::Reject(i, r)),
        1 => (0u8..3, 0u32..3).prop_map(|(q, p)| Op::Consume(q, p)),
        1 => any::<usize>().prop_map(Op::Cancel),
        1 => (0u64..80).prop_map(Op::Advance),
    ]
}

proptest! {
    /// Every published message is, in the end, acked exactly once: nothing is lost or
    /// duplicated by deliveries, acks, requeues, cancels, dead-lettering and expiry.
    #[test]
    fn no_message_is_lost_or_duplicated(ops in prop::collection::vec(op(), 0..120)) {
        let names = ["q0", "q1", "q2"];
        let mut b = MemoryBroker::new();
        b.declare_exchange("dlx", ExchangeKind::Fanout).unwrap();
        b.declare_queue("dlq", QueueOptions::default()).unwrap();
        b.bind("dlq", "dlx", "").unwrap();
        b.declare_queue("q0", QueueOptions::default()).unwrap();
        b.declare_queue("q1", dlx("dlx", None)).unwrap();
        b.declare_queue("q2", QueueOptions { message_ttl: Some(Duration::from_millis(50)), ..dlx("dlx", None) }).unwrap();
        let mut now = at(0);
        let mut published = 0u32;
        let mut outstanding: Vec<BrokerDelivery> = Vec::new();
        let mut consumers: Vec<(ConsumerTag, u32)> = Vec::new();
        let mut acked: HashMap<String, u32> = HashMap::new();
        let mut seen: std::collections::HashSet<String> = std::collections::HashSet::new();
        let mut last_tag = 0;
        for op in ops {
            match op {
                Op::Publish(q) => {
                    published += 1;
                    let n = b.publish(now, "", msg(names[usize::from(q)], &published.to_string())).unwrap();
                    prop_assert_eq!(n, 1);
                }
                Op::Deliver => {
                    if let Some(d) = b.next_delivery(now) {
                        prop_assert!(d.tag.into_raw() > last_tag);
                        last_tag = d.tag.into_raw();
                        let first = seen.insert(body(&d.envelope).to_owned());
                        // A first delivery is never flagged redelivered.
                        prop_assert!(!(first && d.redelivered));
                        outstanding.push(d);
                    }
                }
                Op::Ack(i) if !outstanding.is_empty() => {
                    let d = outstanding.swap_remove(i % outstanding.len());
                    b.ack(d.tag).unwrap();
                    *acked.entry(body(&d.envelope).to_owned()).or_default() += 1;
                }
                Op::AckMultiple(i) if !outstanding.is_empty() => {
                    let pick = &outstanding[i % outstanding.len()];
                    let (up_to, consumer) = (pick.tag, pick.consumer);
                    let n = b.ack_multiple(up_to, consumer).unwrap();
                    let before = outstanding.len();
                    outstanding.retain(|d| {
                        let hit = d.consumer == consumer && d.tag <= up_to;
                        if hit {
                            *acked.entry(body(&d.envelope).to_owned()).or_default() += 1;
                        }
                        !hit
                    });
                    prop_assert_eq!(n, before - outstanding.len());
                }
                Op::Reject(i, requeue) if !outstanding.is_empty() => {
                    let d = outstanding.swap_remove(i % outstanding.len());
                    // q0 has no dead-letter exchange: only requeue there, or it is lost.
                    b.reject_at(now, d.tag, requeue || d.queue == "q0").unwrap();
                }
                Op::Consume(q, prefetch) => {
                    let c = b.consume(names[usize::from(q)], prefetch).unwrap();
                    consumers.push((c, prefetch));
                }
                Op::Cancel(i) if !consumers.is_empty() => {
                    let (c, _) = consumers.swap_remove(i % consumers.len());
                    b.cancel(c).unwrap();
                    outstanding.retain(|d| d.consumer != c);
                }
                Op::Advance(ms) => now += Duration::from_millis(ms),
                _ => {}
            }
            for &(c, prefetch) in &consumers {
                let held = outstanding.iter().filter(|d| d.consumer == c).count();
                prop_assert!(prefetch == 0 || held <= prefetch as usize);
            }
            let unacked: usize = names.iter().chain(["dlq"].iter()).map(|q| b.unacked_len(q).unwrap()).sum();
            prop_assert_eq!(unacked, outstanding.len());
        }
        // Settle everything: ack what is out, then drain every queue.
        for d in outstanding.drain(..) {
            b.ack(d.tag).unwrap();
            *acked.entry(body(&d.envelope).to_owned()).or_default() += 1;
        }
        for q in names.iter().chain(["dlq"].iter()) {
            b.consume(q, 0).unwrap();
        }
        let end = now + Duration::from_secs(1);
        b.handle_timeout(end);
        for (_, body) in drain(&mut b, end) {
            *acked.entry(body).or_default() += 1;
        }
        prop_assert_eq!(acked.len(), published as usize);
        prop_assert!(acked.values().all(|&n| n == 1), "{:?}", acked);
        prop_assert_eq!(b.poll_timeout(), None);
    }
}

#[test]
fn stop_consuming_keeps_in_flight_deliveries_ackable_and_sends_no_more() {
    let mut b = broker_with(&["q"]);
    let c = b.consume("q", 0).unwrap();
    for i in 0..3 {
        b.publish(at(0), "", msg("q", &i.to_string())).unwrap();
    }
    let first = b.next_delivery(at(0)).unwrap();
    b.stop_consuming(c).unwrap();
    assert!(b.next_delivery(at(0)).is_none(), "a stopped consumer gets nothing new");
    assert_eq!(b.queue_len("q"), Some(2));
    b.ack(first.tag).unwrap();
    assert_eq!(b.unacked_len("q"), Some(0));
    // A second consumer picks up the rest.
    b.consume("q", 0).unwrap();
    assert_eq!(drain(&mut b, at(0)).len(), 2);
}

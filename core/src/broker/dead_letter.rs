//! Dead-lettering as RabbitMQ 3.10 does it: the `x-death` header and cycle detection.

use crate::message::{Envelope, FieldValue, Headers};
use crate::time::Instant;

/// Why a message died.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(super) enum Death {
    Expired,
    Rejected,
}

impl Death {
    fn reason(self) -> &'static str {
        match self {
            Death::Expired => "expired",
            Death::Rejected => "rejected",
        }
    }
}

/// Adds or updates the `x-death` entry for `queue` and `death` (most recent first, count
/// incremented, other fields kept from the first such death) and sets the
/// `x-first-death-*` headers if absent. Uses the envelope's exchange and routing key as
/// they were before dead-lettering.
pub(super) fn record_death(
    envelope: &mut Envelope,
    queue: &str,
    death: Death,
    original_expiration: Option<u64>,
    now: Instant,
) {
    let reason = death.reason();
    let headers = &mut envelope.headers;
    let mut deaths = match headers.remove("x-death") {
        Some(FieldValue::Array(deaths)) => deaths,
        _ => Vec::new(),
    };
    let same = |d: &FieldValue| match d {
        FieldValue::Table(t) => {
            field_str(t, "queue") == Some(queue) && field_str(t, "reason") == Some(reason)
        }
        _ => false,
    };
    let entry = match deaths.iter().position(same) {
        Some(at) => {
            let mut entry = deaths.remove(at);
            if let FieldValue::Table(t) = &mut entry {
                let count = t.get("count").and_then(FieldValue::as_i64).unwrap_or(0);
                t.insert("count", count.saturating_add(1));
            }
            entry
        }
        None => {
            // Keys in sorted order, as RabbitMQ writes them.
            let mut t = Headers::new();
            t.insert("count", 1i64);
            t.insert("exchange", envelope.exchange.as_str());
            if let Some(ms) = original_expiration {
                t.insert("original-expiration", ms.to_string());
            }
            t.insert("queue", queue);
            t.insert("reason", reason);
            t.insert("routing-keys", FieldValue::Array(vec![envelope.routing_key.as_str().into()]));
            t.insert("time", FieldValue::Timestamp(now.as_unix_millis() / 1000));
            FieldValue::Table(t)
        }
    };
    deaths.insert(0, entry);
    headers.insert("x-death", FieldValue::Array(deaths));
    if headers.get("x-first-death-reason").is_none() {
        headers.insert("x-first-death-exchange", envelope.exchange.as_str());
        headers.insert("x-first-death-queue", queue);
        headers.insert("x-first-death-reason", reason);
    }
}

/// RabbitMQ's cycle check for a message dead-lettered to `queue`: the message already died in
/// `queue`, and no death since then (that one included) was a reject.
pub(super) fn is_cycle(queue: &str, headers: &Headers) -> bool {
    let Some(FieldValue::Array(deaths)) = headers.get("x-death") else {
        return false;
    };
    let mut automatic = true;
    for death in deaths {
        match death {
            FieldValue::Table(t) => {
                automatic &= field_str(t, "reason") != Some("rejected");
                if field_str(t, "queue") == Some(queue) {
                    return automatic;
                }
            }
            _ => automatic = false,
        }
    }
    false
}

fn field_str<'a>(table: &'a Headers, name: &str) -> Option<&'a str> {
    table.get(name).and_then(FieldValue::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn died(envelope: &mut Envelope, queue: &str, death: Death) {
        record_death(envelope, queue, death, None, Instant::from_unix_millis(0));
    }

    #[test]
    fn cycles_are_automatic_deaths_back_to_a_queue() {
        let mut e = Envelope::raw("x", "k", "b");
        assert!(!is_cycle("a", &e.headers));
        died(&mut e, "a", Death::Expired);
        assert!(is_cycle("a", &e.headers));
        assert!(!is_cycle("b", &e.headers));
        died(&mut e, "b", Death::Rejected);
        // A reject since the last death in "a" breaks the cycle.
        assert!(!is_cycle("a", &e.headers));
        died(&mut e, "c", Death::Expired);
        assert!(is_cycle("c", &e.headers));
        assert!(!is_cycle("b", &e.headers));
    }

    #[test]
    fn deaths_are_counted_most_recent_first() {
        let mut e = Envelope::raw("x", "k", "b");
        died(&mut e, "a", Death::Expired);
        died(&mut e, "b", Death::Expired);
        died(&mut e, "a", Death::Expired);
        let Some(FieldValue::Array(deaths)) = e.headers.get("x-death") else { panic!() };
        let summary: Vec<(&str, i64)> = deaths
            .iter()
            .map(|d| match d {
                FieldValue::Table(t) => {
                    (field_str(t, "queue").unwrap(), t.get("count").unwrap().as_i64().unwrap())
                }
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(summary, [("a", 2), ("b", 1)]);
        assert_eq!(e.headers.get("x-first-death-queue"), Some(&"a".into()));
    }
}

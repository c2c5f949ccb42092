//! Property tests of the Engine's contract, driven directly (no broker):
//! every delivery is settled exactly once; every call is resolved exactly once.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use microfw_core::extract::Payload;
use microfw_core::{
    Action, Body, CallId, Delivery, DeliveryTag, Dialect, Engine, EngineConfig, Envelope, EventListener,
    HandlerError, Instant, LinkId, Outcome, OutgoingCall, Properties, PublishError, PublishId, RetryPolicy,
    Route, RpcReply, RunnerContext, Service, Settle, ShutdownMode, SubscriptionId, Transport,
};
use proptest::prelude::*;
use serde_json::{Value, json};

fn noop(Payload(_): Payload<Value>) {}

#[derive(Clone, Debug)]
enum Op {
    Deliver { valid: bool, filtered: bool },
    Complete { pick: usize, outcome: u8 },
    Confirm { pick: usize, ok: bool },
    Advance(u64),
    Shutdown,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (any::<bool>(), any::<bool>()).prop_map(|(valid, filtered)| Op::Deliver { valid, filtered }),
        4 => (any::<usize>(), 0u8..4).prop_map(|(pick, outcome)| Op::Complete { pick, outcome }),
        3 => (any::<usize>(), prop::bool::weighted(0.8)).prop_map(|(pick, ok)| Op::Confirm { pick, ok }),
        2 => (0u64..3_000).prop_map(Op::Advance),
        1 => Just(Op::Shutdown),
    ]
}

struct Harness {
    engine: Engine,
    now: Instant,
    running: Vec<microfw_core::DispatchId>,
    publishes: Vec<PublishId>,
    settled: HashMap<u64, u32>,
    stopped: Option<usize>,
}

impl Harness {
    fn drain(&mut self) {
        while let Some(action) = self.engine.poll_action() {
            match action {
                Action::Dispatch(d) => self.running.push(d.id),
                Action::Publish(p) => self.publishes.push(p.id),
                Action::Ack(d) | Action::Reject { delivery: d, .. } => {
                    *self.settled.entry(d.tag.into_raw()).or_default() += 1;
                }
                Action::Stopped { unfinished } => self.stopped = Some(unfinished),
                _ => {}
            }
        }
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        self.engine.handle_timeout(self.now);
        self.drain();
    }
}

fn outcome(code: u8) -> Outcome {
    match code {
        0 => Outcome::Success(None),
        1 => Outcome::Failed(HandlerError::retryable("Busy", "try later")),
        2 => Outcome::Failed(HandlerError::fatal("ValueError", "bad")),
        _ => Outcome::Panicked("boom".into()),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_delivery_is_settled_exactly_once(
        max_workers in 1u32..4,
        retries in 0u32..3,
        dead_letter in any::<bool>(),
        greedy in any::<bool>(),
        ops in prop::collection::vec(op(), 1..80),
    ) {
        let listener = EventListener::new("src", "evt").filter(|v| v["drop"] != json!(true));
        let route = Route::blocking(listener, "h", noop)
            .retry(RetryPolicy::fixed(retries, Duration::from_millis(500)))
            .on_give_up(if dead_letter { Settle::DeadLetter } else { Settle::Ack });
        let mode = if greedy { ShutdownMode::DrainPending } else { ShutdownMode::FinishRunning };
        let ctx = RunnerContext::new(max_workers).shutdown_mode(mode).route(route);
        let (spec, _) = Service::new("svc").context(ctx).build().unwrap();
        let config = EngineConfig { shutdown_timeout: Duration::from_secs(3_600), ..EngineConfig::default() };
        let mut h = Harness {
            engine: Engine::new(&spec, config),
            now: Instant::from_unix_millis(1_000),
            running: Vec::new(),
            publishes: Vec::new(),
            settled: HashMap::new(),
            stopped: None,
        };
        h.engine.handle_start(h.now);
        h.drain();
        let mut delivered = 0u64;
        for op in ops {
            match op {
                Op::Deliver { valid, filtered } => {
                    let body: &[u8] = match (valid, filtered) {
                        (false, _) => b"{broken",
                        (true, true) => br#"{"drop":true}"#,
                        (true, false) => br#"{"drop":false}"#,
                    };
                    let envelope = Envelope::raw("src.events", "evt", body.to_vec());
                    h.engine.handle_delivery(h.now, Delivery {
                        link: LinkId::from_raw(0),
                        tag: DeliveryTag::from_raw(delivered),
                        subscription: SubscriptionId::from_raw(0),
                        redelivered: false,
                        envelope,
                    });
                    delivered += 1;
                }
                Op::Complete { pick, outcome: code } if !h.running.is_empty() => {
                    let id = h.running.remove(pick % h.running.len());
                    h.engine.handle_outcome(h.now, id, outcome(code));
                }
                Op::Confirm { pick, ok } if !h.publishes.is_empty() => {
                    let id = h.publishes.remove(pick % h.publishes.len());
                    let result = if ok { Ok(()) } else { Err(PublishError::Nacked) };
                    h.engine.handle_publish_result(h.now, id, result);
                }
                Op::Advance(ms) => h.advance(Duration::from_millis(ms)),
                Op::Shutdown => h.engine.handle_shutdown(h.now),
                _ => {}
            }
            h.drain();
        }
        // Let everything finish: runs succeed, publishes are confirmed, time passes.
        for _ in 0..1_000 {
            if let Some(id) = h.running.pop() {
                h.engine.handle_outcome(h.now, id, Outcome::Success(None));
            } else if let Some(id) = h.publishes.pop() {
                h.engine.handle_publish_result(h.now, id, Ok(()));
            } else if h.engine.poll_timeout().is_some() && h.stopped.is_none() {
                let next = h.engine.poll_timeout().unwrap();
                h.now = next.max(h.now);
                h.engine.handle_timeout(h.now);
            } else {
                break;
            }
            h.drain();
        }
        prop_assert!(h.running.is_empty() && h.publishes.is_empty());
        for tag in 0..delivered {
            prop_assert_eq!(h.settled.get(&tag).copied(), Some(1), "delivery {} settled {:?} times", tag, h.settled.get(&tag));
        }
        prop_assert_eq!(h.settled.len() as u64, delivered);
        if let Some(unfinished) = h.stopped {
            prop_assert_eq!(unfinished, 0);
        }
    }

    #[test]
    fn every_call_resolves_exactly_once(
        calls in prop::collection::vec((0u64..5_000, 0u8..6), 1..40),
        advance_each in 0u64..2_000,
        shutdown_at in prop::option::of(0usize..40),
        lose_queue_at in prop::option::of(0usize..40),
    ) {
        let (spec, _) = Service::new("caller").build().unwrap();
        let mut engine = Engine::new(&spec, EngineConfig { seed: 9, ..EngineConfig::default() });
        let mut now = Instant::from_unix_millis(1_000);
        engine.handle_start(now);
        let mut started: Vec<CallId> = Vec::new();
        let mut resolved: HashMap<CallId, u32> = HashMap::new();
        let mut requests: Vec<(PublishId, Option<String>)> = Vec::new();
        let mut reply_sub = SubscriptionId::from_raw(0);
        let drain = |engine: &mut Engine, requests: &mut Vec<(PublishId, Option<String>)>, resolved: &mut HashMap<CallId, u32>, reply_sub: &mut SubscriptionId| {
            while let Some(action) = engine.poll_action() {
                match action {
                    Action::Publish(p) => requests.push((p.id, p.envelope.properties.correlation_id.clone())),
                    Action::Resolve { call, .. } => *resolved.entry(call).or_default() += 1,
                    Action::Subscribe(s) => *reply_sub = s.id,
                    _ => {}
                }
            }
        };
        let mut tag = 0u64;
        for (i, (timeout_ms, fate)) in calls.into_iter().enumerate() {
            if shutdown_at == Some(i) {
                engine.handle_shutdown(now);
            }
            if lose_queue_at == Some(i) {
                engine.handle_reply_queue_lost(now, Transport::Broker);
            }
            let id = engine.handle_call(now, OutgoingCall {
                context: None,
                service: "math".into(),
                method: "add".into(),
                args: vec![json!(1)],
                kwargs: Default::default(),
                timeout: Some(Duration::from_millis(timeout_ms)),
                transport: Transport::Broker,
                dialect: Dialect::Nameko,
            });
            started.push(id);
            drain(&mut engine, &mut requests, &mut resolved, &mut reply_sub);
            if let Some((publish, correlation)) = requests.pop() {
                // 0: unroutable; 1: nacked; 2: reply; 3: duplicate reply; 4: foreign reply; 5: silence.
                let result = match fate { 0 => Err(PublishError::Unroutable), 1 => Err(PublishError::Nacked), _ => Ok(()) };
                engine.handle_publish_result(now, publish, result);
                let replies = match fate { 2 => 1, 3 => 2, 4 => 1, _ => 0 };
                for _ in 0..replies {
                    let correlation_id = if fate == 4 { Some("not-ours".into()) } else { correlation.clone() };
                    engine.handle_delivery(now, Delivery {
                        link: LinkId::from_raw(0),
                        tag: DeliveryTag::from_raw(tag),
                        subscription: reply_sub,
                        redelivered: false,
                        envelope: Envelope {
                            exchange: "nameko-rpc".into(),
                            routing_key: engine.reply_to().to_owned(),
                            headers: Default::default(),
                            properties: Properties { correlation_id, ..Properties::default() },
                            body: Body::Reply(RpcReply { result: Ok(json!(2)) }),
                        },
                    });
                    tag += 1;
                }
            }
            now += Duration::from_millis(advance_each);
            engine.handle_timeout(now);
            drain(&mut engine, &mut requests, &mut resolved, &mut reply_sub);
        }
        // Past every deadline.
        now += Duration::from_secs(3_600);
        engine.handle_timeout(now);
        drain(&mut engine, &mut requests, &mut resolved, &mut reply_sub);
        let unique: HashSet<_> = started.iter().collect();
        prop_assert_eq!(unique.len(), started.len(), "call ids are unique");
        for id in &started {
            prop_assert_eq!(resolved.get(id).copied(), Some(1), "call {:?} resolved {:?} times", id, resolved.get(id));
        }
        prop_assert_eq!(resolved.len(), started.len());
        prop_assert_eq!(engine.stats().pending_calls, 0);
    }
}

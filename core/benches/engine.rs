//! Engine-alone throughput: one ~100-byte JSON event through
//! deliver -> match -> filter -> translate -> dispatch -> handler -> complete -> ack,
//! and one RPC call's correlation round (call -> request publish -> reply -> resolve).
//!
//! Run: `cargo bench -p microfw-core --bench engine`. Single thread; prints the median of
//! several repeats. Not a test: nothing here asserts a time.
#![allow(clippy::disallowed_methods)] // a benchmark reads the clock; the library never does

use std::hint::black_box;
use std::time::{Duration, Instant as StdInstant};

use bytes::Bytes;
use microfw_core::extract::Payload;
use microfw_core::{
    Action, Body, Delivery, Dialect, Engine, EngineConfig, Envelope, EventListener, HandlerTable, Instant,
    OutgoingCall, Properties, Route, RpcReply, RunnerContext, Service, Transport,
};
use microfw_core::{DeliveryTag, LinkId, SubscriptionId};
use serde::Deserialize;
use serde_json::json;

#[derive(Deserialize)]
#[allow(dead_code)]
struct Order {
    order_id: u64,
    customer: String,
    amount_cents: u64,
    currency: String,
    items: Vec<u32>,
}

fn handle(Payload(order): Payload<Order>) {
    black_box(order.amount_cents);
}

const BODY: &[u8] =
    br#"{"order_id":123456,"customer":"ada@example.com","amount_cents":4200,"currency":"EUR","items":[1,2,3]}"#;

/// How the bench route looks at its payload before the handler.
#[derive(Clone, Copy, PartialEq)]
enum Pipeline {
    /// No filter, no translator: the handler decodes the body.
    Raw,
    /// A JSON filter and a translator: one decode into `serde_json::Value`.
    JsonFilterAndTranslator,
    /// A typed filter on the handler's own type: one decode, shared with the handler.
    TypedFilter,
}

fn event_service(pipeline: Pipeline) -> (Engine, HandlerTable<()>) {
    let mut listener = EventListener::new("shop", "order_placed");
    match pipeline {
        Pipeline::Raw => {}
        Pipeline::JsonFilterAndTranslator => {
            listener = listener.filter(|v| v["amount_cents"].as_u64().is_some_and(|a| a > 0));
        }
        Pipeline::TypedFilter => listener = listener.filter_as(|o: &Order| o.amount_cents > 0),
    }
    let mut route = Route::blocking(listener, "bill", handle);
    if pipeline == Pipeline::JsonFilterAndTranslator {
        route = route.translator(|mut v| {
            v["currency"] = json!("EUR");
            Ok(v)
        });
    }
    let service = Service::new("billing").context(RunnerContext::new(256).route(route));
    let (spec, handlers) = service.build().expect("valid service");
    let mut engine = Engine::new(&spec, EngineConfig { seed: 1, ..EngineConfig::default() });
    engine.handle_start(Instant::EPOCH);
    while engine.poll_action().is_some() {}
    (engine, handlers)
}

/// Runs `n` events through the Engine and the handler; returns the elapsed time.
fn run_events(n: u64, pipeline: Pipeline) -> Duration {
    let (mut engine, handlers) = event_service(pipeline);
    let handler = handlers.handler(microfw_core::RouteId::from_raw(0)).expect("route 0").clone();
    let body = Bytes::from_static(BODY);
    let now = Instant::from_unix_millis(1);
    let start = StdInstant::now();
    for tag in 0..n {
        let envelope = Envelope {
            exchange: "shop.events".to_owned(),
            routing_key: "order_placed".to_owned(),
            headers: Default::default(),
            properties: Properties::default(),
            body: Body::Raw(body.clone()),
        };
        engine.handle_delivery(
            now,
            Delivery {
                link: LinkId::from_raw(0),
                tag: DeliveryTag::from_raw(tag),
                subscription: SubscriptionId::from_raw(0),
                redelivered: false,
                envelope,
            },
        );
        let mut dispatched = None;
        while let Some(action) = engine.poll_action() {
            if let Action::Dispatch(d) = action {
                dispatched = Some(d);
            }
        }
        let d = dispatched.expect("a dispatch per event");
        let outcome = handler.call_blocking(d.job, ()).expect("blocking handler");
        engine.handle_outcome(now, d.id, outcome);
        let mut acked = false;
        while let Some(action) = engine.poll_action() {
            acked |= matches!(action, Action::Ack(_));
        }
        assert!(acked);
    }
    start.elapsed()
}

/// Runs `n` RPC correlation rounds; returns the elapsed time.
fn run_calls(n: u64) -> Duration {
    let (spec, _) = Service::new("caller").build().expect("valid service");
    let mut engine = Engine::new(&spec, EngineConfig { seed: 2, ..EngineConfig::default() });
    let now = Instant::from_unix_millis(1);
    engine.handle_start(now);
    while engine.poll_action().is_some() {}
    let start = StdInstant::now();
    for tag in 0..n {
        let call = engine.handle_call(
            now,
            OutgoingCall {
                context: None,
                service: "math".to_owned(),
                method: "add".to_owned(),
                args: vec![json!(1), json!(2)],
                kwargs: Default::default(),
                timeout: None,
                transport: Transport::Broker,
                dialect: Dialect::Nameko,
            },
        );
        let mut request = None;
        let mut reply_sub = SubscriptionId::from_raw(0);
        while let Some(action) = engine.poll_action() {
            match action {
                Action::Publish(p) => request = Some(p),
                Action::Subscribe(s) => reply_sub = s.id,
                _ => {}
            }
        }
        let request = request.expect("a request per call");
        engine.handle_publish_result(now, request.id, Ok(()));
        let reply = Envelope {
            exchange: "nameko-rpc".to_owned(),
            routing_key: request.envelope.properties.reply_to.clone().unwrap_or_default(),
            headers: Default::default(),
            properties: Properties {
                correlation_id: request.envelope.properties.correlation_id,
                ..Properties::default()
            },
            body: Body::Reply(RpcReply { result: Ok(json!(3)) }),
        };
        engine.handle_delivery(
            now,
            Delivery {
                link: LinkId::from_raw(0),
                tag: DeliveryTag::from_raw(tag),
                subscription: reply_sub,
                redelivered: false,
                envelope: reply,
            },
        );
        let mut resolved = false;
        while let Some(action) = engine.poll_action() {
            if let Action::Resolve { call: c, result } = action {
                resolved = c == call && result.is_ok();
            }
        }
        assert!(resolved);
    }
    start.elapsed()
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() {
    let n: u64 = std::env::var("MICROFW_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let repeats = 5;
    if std::env::var("MICROFW_BENCH_ONLY").as_deref() == Ok("raw") {
        // For profilers: one scenario, no baselines.
        run_events(n, Pipeline::Raw);
        return;
    }
    // Warm up.
    run_events(n / 10, Pipeline::Raw);
    run_events(n / 10, Pipeline::JsonFilterAndTranslator);
    run_events(n / 10, Pipeline::TypedFilter);
    run_calls(n / 10);
    let (mut raw, mut filtered, mut typed, mut calls) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..repeats {
        raw.push(run_events(n, Pipeline::Raw).as_secs_f64());
        filtered.push(run_events(n, Pipeline::JsonFilterAndTranslator).as_secs_f64());
        typed.push(run_events(n, Pipeline::TypedFilter).as_secs_f64());
        calls.push(run_calls(n).as_secs_f64());
    }
    let report = |name: &str, secs: f64| {
        println!("{name:<58} {:>8.0} ns/op {:>12.0} ops/s", secs / n as f64 * 1e9, n as f64 / secs);
    };
    baselines(n);
    println!("microfw-core Engine alone, {n} ops x {repeats} repeats (interleaved), medians, 1 thread:");
    report("event, handler decodes the body (no filter)", median(raw));
    report("event, JSON filter + translator (one decode to Value)", median(filtered));
    report("event, typed filter (one decode, shared with the handler)", median(typed));
    report("RPC correlation round (call -> request -> reply -> resolve)", median(calls));
}

/// Baselines: what the JSON work alone costs on this machine (printed for context).
pub fn baselines(n: u64) {
    let t = StdInstant::now();
    for _ in 0..n {
        let v: serde_json::Value = serde_json::from_slice(black_box(BODY)).expect("valid");
        black_box(v);
    }
    let value = t.elapsed().as_secs_f64();
    let t = StdInstant::now();
    for _ in 0..n {
        let v: Order = serde_json::from_slice(black_box(BODY)).expect("valid");
        black_box(v);
    }
    let typed = t.elapsed().as_secs_f64();
    let t = StdInstant::now();
    for _ in 0..n {
        let v: serde_json::Value = serde_json::from_slice(black_box(BODY)).expect("valid");
        let o: Order = serde_json::from_value(v).expect("valid");
        black_box(o);
    }
    let both = t.elapsed().as_secs_f64();
    let per = |s: f64| s / n as f64 * 1e9;
    println!("baseline: decode to serde_json::Value {:>6.0} ns", per(value));
    println!("baseline: decode to the typed struct  {:>6.0} ns", per(typed));
    println!("baseline: decode to Value, then typed {:>6.0} ns", per(both));
}

//! The quickstart's services driven by the core's deterministic simulator instead of a runtime:
//! a virtual clock, no threads, no broker, and it runs instantly. The same pieces of
//! micro_framework's README example as `quickstart_sync`, shown as the Engine decides them:
//!
//! * two contexts with separate worker budgets;
//! * an event listener with a payload filter;
//! * an RPC method with shared state (micro_framework's class-with-a-dependency case);
//! * a timer;
//! * a failing handler with retries and a failure callback;
//! * an RPC call from one service to another.
//!
//! Usage: `cargo run -p microfw-examples --bin simulated -- [--stop-after SECONDS]`
//! (virtual seconds; default 5).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use microfw_core::extract::{Attempt, Failure, Params, Payload, State, Tick};
use microfw_core::testing::{Record, SIMULATION_EPOCH, Simulator};
use microfw_core::{
    CallbackRoute, EngineEvent, EventListener, HandlerError, Reply, RetryPolicy, Route, RpcListener,
    RunnerContext, Service, TimeEntrypoint,
};
use serde::Deserialize;
use serde_json::{Value, json};

/// Shared state of the `shop` service: a counter, standing in for a database pool.
#[derive(Clone, Default)]
struct Shop {
    greetings: Arc<AtomicU64>,
}

#[derive(Deserialize)]
struct GreetArgs {
    name: String,
}

/// RPC `shop.greet(name)`: uses the shared state.
fn greet(State(shop): State<Shop>, Params(args): Params<GreetArgs>) -> Reply<String> {
    let n = shop.greetings.fetch_add(1, Ordering::SeqCst) + 1;
    println!("[shop.greet] greeting #{n} for {}", args.name);
    Reply(format!("Hello, {}!", args.name))
}

#[derive(Deserialize)]
struct Order {
    id: u64,
    amount: u64,
}

/// Event handler: only orders with an amount pass the filter.
fn on_order(Payload(order): Payload<Order>) {
    println!("[shop.on_order] order {} for {} cents", order.id, order.amount);
}

/// Event handler that fails until its third attempt.
fn flaky_invoice(attempt: Attempt, Payload(order): Payload<Order>) -> Result<(), HandlerError> {
    if attempt.retry_count < 2 {
        println!("[shop.invoice] order {}: attempt {} fails", order.id, attempt.retry_count + 1);
        Err(HandlerError::retryable("TemporaryError", "invoice service busy"))
    } else {
        println!("[shop.invoice] order {}: attempt {} succeeds", order.id, attempt.retry_count + 1);
        Ok(())
    }
}

/// Event handler that always fails: its callback runs after the last retry.
fn refund(Payload(order): Payload<Order>) -> Result<(), HandlerError> {
    Err(HandlerError::retryable("PaymentError", format!("cannot refund order {}", order.id)))
}

fn on_refund_failed(Failure(error): Failure, Payload(order): Payload<Value>) {
    println!("[shop.on_refund_failed] gave up on {order}: {}", error.error);
}

fn tick(Tick(at): Tick) {
    let secs = (at.as_unix_millis() - SIMULATION_EPOCH.as_unix_millis()) as f64 / 1000.0;
    println!("[shop.tick] timer fired at t={secs:.1}s");
}

fn main() {
    let stop_after = parse_stop_after().unwrap_or_else(|e| {
        eprintln!("simulated: {e}");
        std::process::exit(2);
    });

    let retry = RetryPolicy::exponential(3, Duration::from_millis(200), Duration::from_secs(2));
    let shop = Service::with_state("shop", Shop::default())
        .context(
            RunnerContext::new(4)
                .metric_label("events")
                .route(Route::blocking(
                    EventListener::new("checkout", "order_placed").filter(|p| p["amount"].as_u64() > Some(0)),
                    "on_order",
                    on_order,
                ))
                .route(
                    Route::blocking(EventListener::new("checkout", "order_placed"), "invoice", flaky_invoice)
                        .retry(retry.clone()),
                )
                .route(
                    Route::blocking(EventListener::new("checkout", "refund_requested"), "refund", refund)
                        .retry(retry)
                        .callback(CallbackRoute::blocking("on_refund_failed", on_refund_failed)),
                )
                .route(Route::blocking(TimeEntrypoint::new(Duration::from_secs(2)), "tick", tick)),
        )
        .context(RunnerContext::new(1).metric_label("rpc").route(Route::blocking(
            RpcListener::new(),
            "greet",
            greet,
        )));

    let mut sim = Simulator::new();
    let shop_node = sim.add_service(shop).unwrap_or_else(|e| panic!("invalid service: {e}"));
    let client = sim.add_service(Service::new("frontend")).unwrap_or_else(|e| panic!("invalid service: {e}"));

    sim.publish_event("checkout", "order_placed", &json!({"id": 1, "amount": 1250}));
    sim.publish_event("checkout", "order_placed", &json!({"id": 2, "amount": 0}));
    sim.publish_event("checkout", "refund_requested", &json!({"id": 3, "amount": 99}));
    let call = sim.call(client, "shop", "greet", json!(["Ada"]), json!({}));
    let call_kw = sim.call(client, "shop", "greet", json!([]), json!({"name": "Grace"}));
    sim.run_for(Duration::from_secs(stop_after));

    for (label, id) in [("greet(\"Ada\")", call), ("greet(name=\"Grace\")", call_kw)] {
        match sim.call_result(client, id) {
            Some(Ok(v)) => println!("[frontend] shop.{label} -> {v}"),
            Some(Err(e)) => println!("[frontend] shop.{label} failed: {e}"),
            None => println!("[frontend] shop.{label} still pending"),
        }
    }
    let records = sim.take_records(shop_node);
    let filtered =
        records.iter().filter(|r| matches!(r, Record::Event(EngineEvent::Filtered { .. }))).count();
    let retries = records.iter().filter(|r| matches!(r, Record::Event(EngineEvent::Retrying { .. }))).count();
    println!("[summary] {filtered} event filtered out, {retries} retries scheduled, {} dead letter(s)", {
        sim.broker().queue_len("microfw.dlq.evt-checkout-refund_requested--shop.refund").unwrap_or(0)
    });
    sim.shutdown(shop_node);
    println!("[summary] stopped cleanly after {stop_after} virtual seconds");
}

fn parse_stop_after() -> Result<u64, String> {
    let mut args = std::env::args().skip(1);
    let mut stop_after = 5;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--stop-after" => {
                let v = args.next().ok_or("--stop-after needs a number of seconds")?;
                stop_after =
                    v.parse().map_err(|_| format!("--stop-after: {v:?} is not a number of seconds"))?;
            }
            "-h" | "--help" => {
                println!("usage: simulated [--stop-after SECONDS]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    Ok(stop_after)
}

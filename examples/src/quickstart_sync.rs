//! The microfw quickstart, blocking flavour: two real services on `microfw-runtime-sync`,
//! talking through the embedded memory broker (no RabbitMQ needed), or through RabbitMQ when
//! `AMQP_URI` is set.
//!
//! micro_framework's README example, ported:
//!
//! * `shop` has two contexts with separate worker budgets: `events` (4 workers) and `rpc`
//!   (1 worker);
//! * an event chain with a payload filter: `frontend` dispatches `order_placed`; `shop.on_order`
//!   only takes orders with an amount and dispatches `order_confirmed`, which
//!   `frontend.on_confirmed` receives;
//! * a handler with shared state (the class-with-a-dependency case): `shop.greet` counts
//!   greetings in a shared counter;
//! * a timer: `frontend.tick` fires every second, places an order and calls `shop.greet`;
//! * a failing handler with retries and a failure callback: `shop.invoice` fails twice then
//!   succeeds; `shop.refund` always fails, and its callback runs after the last retry;
//! * an RPC call between two services (`frontend` -> `shop.greet`).
//!
//! Usage: `cargo run -p microfw-examples --bin quickstart_sync -- [--stop-after SECONDS]`.
//! Stops cleanly on Ctrl-C / SIGTERM, or by itself after `--stop-after` seconds.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use microfw_runtime_sync::extract::{Attempt, Failure, Params, Payload, State, Tick};
use microfw_runtime_sync::{
    CallbackRoute, Config, EventListener, HandlerError, Producer, Reply, RetryPolicy, Route, RpcListener,
    RpcProxy, Runner, RunnerContext, TimeEntrypoint,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// `shop`'s shared state: a counter standing in for a database pool.
#[derive(Clone, Default)]
struct Shop {
    greetings: Arc<AtomicU64>,
}

#[derive(Deserialize)]
struct GreetArgs {
    name: String,
}

#[derive(Serialize, Deserialize)]
struct Order {
    id: u64,
    amount: u64,
}

fn greet(State(shop): State<Shop>, Params(args): Params<GreetArgs>) -> Reply<String> {
    let n = shop.greetings.fetch_add(1, Ordering::SeqCst) + 1;
    Reply(format!("Hello, {}! (greeting #{n})", args.name))
}

fn on_order(producer: Producer, Payload(order): Payload<Order>) -> Result<(), HandlerError> {
    println!("[shop.on_order] order {} for {} cents: confirming", order.id, order.amount);
    producer
        .dispatch("order_confirmed", &order)
        .map_err(|e| HandlerError::retryable("DispatchError", e.to_string()))
}

fn invoice(attempt: Attempt, Payload(order): Payload<Order>) -> Result<(), HandlerError> {
    if attempt.retry_count < 2 {
        println!("[shop.invoice] order {}: attempt {} fails", order.id, attempt.retry_count + 1);
        Err(HandlerError::retryable("TemporaryError", "invoice service busy"))
    } else {
        println!("[shop.invoice] order {}: attempt {} succeeds", order.id, attempt.retry_count + 1);
        Ok(())
    }
}

fn refund(Payload(order): Payload<Order>) -> Result<(), HandlerError> {
    Err(HandlerError::retryable("PaymentError", format!("cannot refund order {}", order.id)))
}

fn on_refund_failed(Failure(error): Failure, Payload(order): Payload<Value>) {
    println!("[shop.on_refund_failed] gave up on {order}: {}", error.error);
}

fn on_confirmed(Payload(order): Payload<Order>) {
    println!("[frontend.on_confirmed] order {} confirmed", order.id);
}

fn tick(Tick(_): Tick, producer: Producer, rpc: RpcProxy, State(next): State<Arc<AtomicU64>>) {
    let id = next.fetch_add(1, Ordering::SeqCst);
    // Every other order is free: shop's filter skips it.
    let amount = if id % 2 == 0 { 1_250 } else { 0 };
    let event = if id % 5 == 4 { "refund_requested" } else { "order_placed" };
    if let Err(e) = producer.dispatch(event, &Order { id, amount }) {
        println!("[frontend.tick] could not dispatch: {e}");
    }
    match rpc.call("shop", "greet", json!(["Ada"]), json!({})) {
        Ok(reply) => println!("[frontend.tick] shop.greet -> {reply}"),
        Err(e) => println!("[frontend.tick] shop.greet failed: {e}"),
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("quickstart_sync: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let stop_after = parse_stop_after()?;
    let base = Config::from_env(std::env::vars())?;
    let config = |name: &str| Config { service_name: Some(name.to_owned()), ..base.clone() };

    let retry = RetryPolicy::exponential(3, Duration::from_millis(200), Duration::from_secs(2));
    let shop = Runner::with_state(config("shop"), Shop::default())
        .context(
            RunnerContext::new(4)
                .metric_label("events")
                .route(Route::blocking(
                    EventListener::new("frontend", "order_placed").filter_as(|o: &Order| o.amount > 0),
                    "on_order",
                    on_order,
                ))
                .route(
                    Route::blocking(EventListener::new("frontend", "order_placed"), "invoice", invoice)
                        .retry(retry.clone()),
                )
                .route(
                    Route::blocking(EventListener::new("frontend", "refund_requested"), "refund", refund)
                        .retry(retry)
                        .callback(CallbackRoute::blocking("on_refund_failed", on_refund_failed)),
                ),
        )
        .context(RunnerContext::new(1).metric_label("rpc").route(Route::blocking(
            RpcListener::new(),
            "greet",
            greet,
        )))
        .start()?;
    let frontend = Runner::with_state(config("frontend"), Arc::new(AtomicU64::new(1)))
        .context(
            RunnerContext::new(2)
                .route(Route::blocking(TimeEntrypoint::new(Duration::from_secs(1)), "tick", tick))
                .route(Route::blocking(
                    EventListener::new("shop", "order_confirmed"),
                    "on_confirmed",
                    on_confirmed,
                )),
        )
        .start()?;
    let broker = match &base.amqp_uri {
        Some(uri) => format!("RabbitMQ at {uri}"),
        None => "the embedded memory broker".to_owned(),
    };
    println!("[quickstart] shop and frontend running on {broker}; Ctrl-C to stop");

    let reason = wait_for_stop(stop_after)?;
    println!("[quickstart] {reason}: stopping");
    let frontend_report = frontend.stop()?;
    let shop_report = shop.stop()?;
    println!(
        "[quickstart] stopped cleanly (unfinished: frontend {}, shop {})",
        frontend_report.unfinished, shop_report.unfinished
    );
    Ok(())
}

/// Blocks until SIGINT or SIGTERM, or until `stop_after` has passed.
fn wait_for_stop(stop_after: Option<Duration>) -> Result<String, Box<dyn std::error::Error>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    let handle = signals.handle();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        if let Some(signal) = signals.forever().next() {
            let _ = tx.send(signal);
        }
    });
    let received = match stop_after {
        Some(after) => rx.recv_timeout(after).ok(),
        None => rx.recv().ok(),
    };
    handle.close();
    Ok(match received {
        Some(SIGINT) => "SIGINT".to_owned(),
        Some(_) => "SIGTERM".to_owned(),
        None => format!("{} s passed", stop_after.map_or(0, |d| d.as_secs())),
    })
}

fn parse_stop_after() -> Result<Option<Duration>, String> {
    let mut args = std::env::args().skip(1);
    let mut stop_after = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--stop-after" => {
                let v = args.next().ok_or("--stop-after needs a number of seconds")?;
                let secs: u64 =
                    v.parse().map_err(|_| format!("--stop-after: {v:?} is not a number of seconds"))?;
                stop_after = Some(Duration::from_secs(secs));
            }
            "-h" | "--help" => {
                println!("usage: quickstart_sync [--stop-after SECONDS]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    Ok(stop_after)
}

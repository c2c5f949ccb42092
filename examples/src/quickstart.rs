//! The microfw quickstart: two real services on `microfw-runtime-tokio` (`async` worker mode),
//! talking through the embedded memory broker (no RabbitMQ needed), or through RabbitMQ when
//! `AMQP_URI` is set (`AMQP_URI=amqp://guest:guest@127.0.0.1:5672/ cargo run -p
//! microfw-examples --bin quickstart`). `quickstart_sync` is the same program on plain
//! threads.
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
//! Usage: `cargo run -p microfw-examples --bin quickstart -- [--stop-after SECONDS]`.
//! Stops cleanly on Ctrl-C / SIGTERM, or by itself after `--stop-after` seconds.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use microfw_runtime_tokio::extract::{Attempt, Failure, Params, Payload, State, Tick};
use microfw_runtime_tokio::{
    CallbackRoute, Config, EventListener, HandlerError, Producer, Reply, RetryPolicy, Route, RpcListener,
    RpcProxy, Runner, RunnerContext, TimeEntrypoint, WorkerMode,
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

async fn greet(State(shop): State<Shop>, Params(args): Params<GreetArgs>) -> Reply<String> {
    let n = shop.greetings.fetch_add(1, Ordering::SeqCst) + 1;
    Reply(format!("Hello, {}! (greeting #{n})", args.name))
}

async fn on_order(producer: Producer, Payload(order): Payload<Order>) -> Result<(), HandlerError> {
    println!("[shop.on_order] order {} for {} cents: confirming", order.id, order.amount);
    producer
        .dispatch("order_confirmed", &order)
        .await
        .map_err(|e| HandlerError::retryable("DispatchError", e.to_string()))
}

async fn invoice(attempt: Attempt, Payload(order): Payload<Order>) -> Result<(), HandlerError> {
    if attempt.retry_count < 2 {
        println!("[shop.invoice] order {}: attempt {} fails", order.id, attempt.retry_count + 1);
        Err(HandlerError::retryable("TemporaryError", "invoice service busy"))
    } else {
        println!("[shop.invoice] order {}: attempt {} succeeds", order.id, attempt.retry_count + 1);
        Ok(())
    }
}

async fn refund(Payload(order): Payload<Order>) -> Result<(), HandlerError> {
    Err(HandlerError::retryable("PaymentError", format!("cannot refund order {}", order.id)))
}

async fn on_refund_failed(Failure(error): Failure, Payload(order): Payload<Value>) {
    println!("[shop.on_refund_failed] gave up on {order}: {}", error.error);
}

async fn on_confirmed(Payload(order): Payload<Order>) {
    println!("[frontend.on_confirmed] order {} confirmed", order.id);
}

async fn tick(Tick(_): Tick, producer: Producer, rpc: RpcProxy, State(next): State<Arc<AtomicU64>>) {
    let id = next.fetch_add(1, Ordering::SeqCst);
    // Every other order is free: shop's filter skips it.
    let amount = if id % 2 == 0 { 1_250 } else { 0 };
    let event = if id % 5 == 4 { "refund_requested" } else { "order_placed" };
    if let Err(e) = producer.dispatch(event, &Order { id, amount }).await {
        println!("[frontend.tick] could not dispatch: {e}");
    }
    match rpc.call("shop", "greet", json!(["Ada"]), json!({})).await {
        Ok(reply) => println!("[frontend.tick] shop.greet -> {reply}"),
        Err(e) => println!("[frontend.tick] shop.greet failed: {e}"),
    }
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("quickstart: {e}");
        std::process::exit(1);
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let stop_after = parse_stop_after()?;
    let base = Config::from_env(std::env::vars())?;
    let config = |name: &str| Config {
        service_name: Some(name.to_owned()),
        worker_mode: WorkerMode::Async,
        ..base.clone()
    };

    let retry = RetryPolicy::exponential(3, Duration::from_millis(200), Duration::from_secs(2));
    let shop = Runner::with_state(config("shop"), Shop::default())
        .context(
            RunnerContext::new(4)
                .metric_label("events")
                .route(Route::new(
                    EventListener::new("frontend", "order_placed").filter_as(|o: &Order| o.amount > 0),
                    "on_order",
                    on_order,
                ))
                .route(
                    Route::new(EventListener::new("frontend", "order_placed"), "invoice", invoice)
                        .retry(retry.clone()),
                )
                .route(
                    Route::new(EventListener::new("frontend", "refund_requested"), "refund", refund)
                        .retry(retry)
                        .callback(CallbackRoute::new("on_refund_failed", on_refund_failed)),
                ),
        )
        .context(RunnerContext::new(1).metric_label("rpc").route(Route::new(
            RpcListener::new(),
            "greet",
            greet,
        )))
        .start()
        .await?;
    let frontend = Runner::with_state(config("frontend"), Arc::new(AtomicU64::new(1)))
        .context(
            RunnerContext::new(2)
                .route(Route::new(TimeEntrypoint::new(Duration::from_secs(1)), "tick", tick))
                .route(Route::new(
                    EventListener::new("shop", "order_confirmed"),
                    "on_confirmed",
                    on_confirmed,
                )),
        )
        .start()
        .await?;
    let broker = match &base.amqp_uri {
        Some(uri) => format!("RabbitMQ at {uri}"),
        None => "the embedded memory broker".to_owned(),
    };
    println!("[quickstart] shop and frontend running on {broker}; Ctrl-C to stop");

    let reason = wait_for_stop(stop_after).await?;
    println!("[quickstart] {reason}: stopping");
    let frontend_report = frontend.stop().await?;
    let shop_report = shop.stop().await?;
    println!(
        "[quickstart] stopped cleanly (unfinished: frontend {}, shop {})",
        frontend_report.unfinished, shop_report.unfinished
    );
    Ok(())
}

/// Waits for SIGINT or SIGTERM, or until `stop_after` has passed.
async fn wait_for_stop(stop_after: Option<Duration>) -> Result<String, Box<dyn std::error::Error>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let deadline = async {
        match stop_after {
            Some(after) => tokio::time::sleep(after).await,
            None => std::future::pending().await,
        }
    };
    Ok(tokio::select! {
        _ = int.recv() => "SIGINT".to_owned(),
        _ = term.recv() => "SIGTERM".to_owned(),
        () = deadline => format!("{} s passed", stop_after.map_or(0, |d| d.as_secs())),
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
                println!("usage: quickstart [--stop-after SECONDS]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    Ok(stop_after)
}

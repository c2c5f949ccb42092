//! A runtime-sync service embedded in a program driven by another async runtime.
//!
//! micro_framework's original design names async-std; it is discontinued upstream, so it
//! appears here only, as this example's own dependency, never as a library dependency of
//! microfw. The point: `microfw-runtime-sync` needs no async runtime, so any executor can host
//! it. Its blocking calls (`start`, `stop`, `RpcProxy::call`) go through
//! `async_std::task::spawn_blocking`, so the executor's threads never block.
//!
//! Usage: `cargo run -p microfw-examples --bin embedded_async_std`

use microfw_runtime_sync::extract::Params;
use microfw_runtime_sync::{Config, Reply, Route, RpcListener, Runner, RunnerContext};
use serde_json::json;

fn add(Params((a, b)): Params<(i64, i64)>) -> Reply<i64> {
    Reply(a + b)
}

fn main() {
    if let Err(e) = async_std::task::block_on(run()) {
        eprintln!("embedded_async_std: {e}");
        std::process::exit(1);
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let config = Config { service_name: Some("calculator".into()), ..Config::default() };
    let service = async_std::task::spawn_blocking(move || {
        Runner::new(config)
            .context(RunnerContext::new(2).route(Route::blocking(RpcListener::new(), "add", add)))
            .start()
    })
    .await?;
    println!("[async-std] calculator service started on runtime-sync threads");

    // Several calls at once from async-std tasks, each waiting on a blocking-pool thread.
    let calls = (0..4).map(|i| {
        let rpc = service.rpc();
        async_std::task::spawn(async move {
            let reply = async_std::task::spawn_blocking(move || {
                rpc.call("calculator", "add", json!([i, 10]), json!({}))
            })
            .await;
            (i, reply)
        })
    });
    for call in calls {
        let (i, reply) = call.await;
        println!("[async-std] calculator.add({i}, 10) -> {}", reply?);
    }

    let report = async_std::task::spawn_blocking(move || service.stop()).await?;
    println!("[async-std] stopped cleanly (unfinished: {})", report.unfinished);
    Ok(())
}

//! A service with WebSocket routes serves them on its own server (feature `ws`), under its
//! context's budget; `WsRpcClient` calls it, multiplexed.
#![cfg(feature = "ws")]

use std::sync::Arc;
use std::time::Duration;

use microfw_runtime_tokio::extract::{Params, State};
use microfw_runtime_tokio::{
    Config, HandlerError, Reply, Route, Runner, RunnerContext, TargetDetail, WsRpcListener,
};
use microfw_transport_ws::ServerOptions;
use microfw_transport_ws::tokio::{ClientOptions, WsCallError, WsRpcClient};
use serde::Deserialize;
use serde_json::{Map, json};
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(10);

#[derive(Deserialize)]
struct Gated {
    tag: String,
    wait: bool,
}

/// Answers its tag; with `wait`, only once the test opens the gate.
async fn gated(State(gate): State<Arc<tokio::sync::Semaphore>>, Params(g): Params<Gated>) -> Reply<String> {
    if g.wait {
        let _permit = gate.acquire().await;
    }
    Reply(g.tag)
}

async fn refuse() -> Result<(), HandlerError> {
    Err(HandlerError::fatal("PermissionError", "not you"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_routes_are_served_on_the_services_own_server() {
    let config = Config { service_name: Some("wsvc".into()), ..Config::default() };
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let service = Runner::with_state(config, gate.clone())
        .context(
            RunnerContext::new(4)
                .route(Route::new(WsRpcListener, "gated", gated).doc("Answers its tag."))
                .route(Route::new(WsRpcListener, "refuse", refuse)),
        )
        .websocket_options(ServerOptions::default().with_bind("127.0.0.1:0"))
        .start()
        .await
        .unwrap();
    let addr = service.websocket_addr().expect("the service runs a WebSocket server");
    let client = WsRpcClient::connect(&format!("ws://{addr}"), ClientOptions::default()).await.unwrap();

    let detail = TargetDetail::new("gated", ["tag", "wait"], [""; 0], Some("Answers its tag.".into()));
    assert_eq!(timeout(WAIT, client.info("gated")).await.unwrap(), Ok(detail));

    // Multiplexed: a call held at the gate does not hold up a second one on the same
    // connection (without multiplexing the quick call would time out here).
    let call = |tag: &str, wait: bool| {
        let mut kwargs = Map::new();
        kwargs.insert("tag".into(), json!(tag));
        kwargs.insert("wait".into(), json!(wait));
        client.call("gated", Vec::new(), kwargs)
    };
    let held = tokio::spawn(call("held", true));
    assert_eq!(timeout(WAIT, call("quick", false)).await.unwrap(), Ok(json!("quick")));
    assert!(!held.is_finished(), "the held call finished before its gate opened");
    gate.add_permits(1);
    assert_eq!(timeout(WAIT, held).await.unwrap().unwrap(), Ok(json!("held")));

    match timeout(WAIT, client.call("refuse", Vec::new(), Map::new())).await.unwrap() {
        Err(WsCallError::Remote(e)) => assert_eq!(e.exc_type, "PermissionError"),
        other => panic!("expected a remote error, got {other:?}"),
    }
    assert_eq!(timeout(WAIT, service.stop()).await.unwrap().unwrap().unfinished, 0);
}

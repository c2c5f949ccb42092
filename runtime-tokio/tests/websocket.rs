//! A service with WebSocket routes serves them on its own server (feature `ws`), under its
//! context's budget; `WsRpcClient` calls it, multiplexed.
#![cfg(feature = "ws")]

use std::time::Duration;

use microfw_runtime_tokio::extract::Params;
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
struct Pause {
    ms: u64,
    tag: String,
}

async fn pause(Params(Pause { ms, tag }): Params<Pause>) -> Reply<String> {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    Reply(tag)
}

async fn refuse() -> Result<(), HandlerError> {
    Err(HandlerError::fatal("PermissionError", "not you"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_routes_are_served_on_the_services_own_server() {
    let config = Config { service_name: Some("wsvc".into()), ..Config::default() };
    let service = Runner::new(config)
        .context(
            RunnerContext::new(4)
                .route(Route::new(WsRpcListener, "pause", pause).doc("Sleeps, then echoes."))
                .route(Route::new(WsRpcListener, "refuse", refuse)),
        )
        .websocket_options(ServerOptions::default().with_bind("127.0.0.1:0"))
        .start()
        .await
        .unwrap();
    let addr = service.websocket_addr().expect("the service runs a WebSocket server");
    let client = WsRpcClient::connect(&format!("ws://{addr}"), ClientOptions::default()).await.unwrap();

    let detail = TargetDetail::new("pause", ["ms", "tag"], [""; 0], Some("Sleeps, then echoes.".into()));
    assert_eq!(timeout(WAIT, client.info("pause")).await.unwrap(), Ok(detail));

    // Multiplexed: a slow call and a quick one in flight; the quick one answers first.
    let call = |ms: u64, tag: &str| {
        let mut kwargs = Map::new();
        kwargs.insert("ms".into(), json!(ms));
        kwargs.insert("tag".into(), json!(tag));
        client.call("pause", Vec::new(), kwargs)
    };
    let slow = tokio::spawn(call(300, "slow"));
    let quick = timeout(WAIT, call(0, "quick")).await.unwrap();
    assert_eq!(quick, Ok(json!("quick")));
    assert!(!slow.is_finished(), "the quick call waited for the slow one");
    assert_eq!(timeout(WAIT, slow).await.unwrap().unwrap(), Ok(json!("slow")));

    match timeout(WAIT, client.call("refuse", Vec::new(), Map::new())).await.unwrap() {
        Err(WsCallError::Remote(e)) => assert_eq!(e.exc_type, "PermissionError"),
        other => panic!("expected a remote error, got {other:?}"),
    }
    assert_eq!(timeout(WAIT, service.stop()).await.unwrap().unwrap().unfinished, 0);
}

//! A service with WebSocket routes serves them on its own threaded server (feature `ws`),
//! under its context's budget; the blocking `WsRpcClient` calls it.
#![cfg(feature = "ws")]

use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use microfw_runtime_sync::extract::{Params, State};
use microfw_runtime_sync::{
    Config, HandlerError, Reply, Route, Runner, RunnerContext, TargetDetail, WsRpcListener,
};
use microfw_transport_ws::ServerOptions;
use microfw_transport_ws::sync::{ClientOptions, WsCallError, WsRpcClient};
use serde::Deserialize;
use serde_json::{Map, json};

#[derive(Deserialize)]
struct Gate {
    tag: String,
    wait: bool,
}

/// Answers its tag; with `wait`, only once the test opens the gate.
fn gated(State(gate): State<Arc<Mutex<mpsc::Receiver<()>>>>, Params(g): Params<Gate>) -> Reply<String> {
    if g.wait {
        let _ = gate.lock().unwrap().recv_timeout(Duration::from_secs(10));
    }
    Reply(g.tag)
}

fn refuse() -> Result<(), HandlerError> {
    Err(HandlerError::fatal("PermissionError", "not you"))
}

#[test]
fn websocket_routes_are_served_on_the_services_own_server() {
    let (open, gate) = mpsc::channel();
    let config = Config { service_name: Some("wsvc".into()), ..Config::default() };
    let service = Runner::with_state(config, Arc::new(Mutex::new(gate)))
        .context(
            RunnerContext::new(4)
                .route(Route::blocking(WsRpcListener, "gated", gated).doc("Answers its tag."))
                .route(Route::blocking(WsRpcListener, "refuse", refuse)),
        )
        .websocket_options(ServerOptions::default().with_bind("127.0.0.1:0"))
        .start()
        .unwrap();
    let addr = service.websocket_addr().expect("the service runs a WebSocket server");
    let client = WsRpcClient::connect(&format!("ws://{addr}"), ClientOptions::default()).unwrap();

    let detail = TargetDetail::new("gated", ["tag", "wait"], [""; 0], Some("Answers its tag.".into()));
    assert_eq!(client.info("gated"), Ok(detail));

    // Multiplexed: a call held at the gate does not hold up a second one.
    let kwargs = |tag: &str, wait: bool| {
        let mut m = Map::new();
        m.insert("tag".into(), json!(tag));
        m.insert("wait".into(), json!(wait));
        m
    };
    let held = client.call_async("gated", Vec::new(), kwargs("held", true));
    assert_eq!(client.call("gated", Vec::new(), kwargs("quick", false)), Ok(json!("quick")));
    open.send(()).unwrap();
    assert_eq!(held.wait(), Ok(json!("held")));

    match client.call("refuse", Vec::new(), Map::new()) {
        Err(WsCallError::Remote(e)) => assert_eq!(e.exc_type, "PermissionError"),
        other => panic!("expected a remote error, got {other:?}"),
    }
    assert_eq!(service.stop().unwrap().unfinished, 0);
}

//! Interop over WebSocket: micro_framework 2.0.16's own `WebSocketRPCClient`
//! (`tests/python/mf_client.py ws`) builds its proxy from a microfw service's target listing
//! and calls it; the service is a real `microfw_runtime_tokio::Runner` serving its WebSocket
//! routes on its own server (no broker involved: the embedded memory hub is the broker).
//!
//! Needs `python3` (without it the test prints `SKIPPED: ...` and passes).

mod common;

use common::{Rt, json_after, run_all};
use microfw_runtime_tokio::extract::Params;
use microfw_runtime_tokio::{
    Config, HandlerError, MemoryHubHandle, Reply, Route, Runner, RunnerContext, WsRpcListener,
};
use microfw_tests::{PythonPeers, PythonProcess, Venv, peer_or_skip};
use microfw_transport_ws::ServerOptions;
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Deserialize)]
struct AddArgs {
    a: i64,
    #[serde(default)]
    b: i64,
}

async fn add(Params(AddArgs { a, b }): Params<AddArgs>) -> Reply<i64> {
    Reply(a + b)
}

#[derive(Deserialize)]
struct FailArgs {
    message: String,
}

async fn fail(Params(FailArgs { message }): Params<FailArgs>) -> Result<(), HandlerError> {
    Err(HandlerError::fatal("ValueError", message))
}

fn ws_client(venv: &Venv, port: u16, args: &[&str]) -> PythonProcess {
    let port = port.to_string();
    let args = [&["ws", port.as_str()], args].concat();
    PythonProcess::spawn(venv, "mf_client.py", &args, &[]).unwrap()
}

#[test]
fn micro_framework_websocket_client_lists_and_calls_a_microfw_service() {
    let venv = peer_or_skip!(PythonPeers::micro_framework());
    let rt = Rt::new();
    let config = Config { service_name: Some("mfw_ws".into()), ..Config::default() };
    let service = rt.start(
        Runner::new(config)
            .hub(MemoryHubHandle::new())
            .context(
                RunnerContext::new(4)
                    .route(Route::new(WsRpcListener, "add", add).doc("Adds a and b."))
                    .route(Route::new(WsRpcListener, "fail", fail)),
            )
            .websocket_options(ServerOptions::default().with_bind("127.0.0.1:0")),
    );
    let port = service.websocket_addr().expect("a WebSocket server").port();

    let clients = run_all(vec![
        ws_client(&venv, port, &["add", "[40]", r#"{"b": 2}"#]),
        ws_client(&venv, port, &["add", "[1]"]),
        ws_client(&venv, port, &["fail", r#"["no good"]"#]),
    ]);
    let listing = json!([
        {"target": "add", "args": ["a"], "kwargs": ["b"], "docstring": "Adds a and b."},
        {"target": "fail", "args": ["message"], "kwargs": [], "docstring": null},
    ]);
    for client in &clients {
        assert_eq!(json_after(client, "TARGETS "), listing, "{}", client.dump());
    }
    assert_eq!(json_after(&clients[0], "RESULT "), json!(42));
    assert_eq!(json_after(&clients[1], "RESULT "), json!(1));
    let error: Value = json_after(&clients[2], "ERROR ValueError ");
    assert_eq!(error, json!("no good"), "{}", clients[2].dump());
    rt.stop(service);
}

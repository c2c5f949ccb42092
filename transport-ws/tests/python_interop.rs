//! Interop with the real micro_framework 2.0.16: its WebSocket client against our server, and
//! our client against its server. Needs `python3` (else `SKIPPED: ...` and a pass), the cached
//! peer venv (PyPI on the first run) and, for micro_framework's server, RabbitMQ.
#![cfg(feature = "tokio")]

mod common;

use std::time::Duration;

use common::{Gate, service, start, within};
use microfw_tests::{DEFAULT_STOP_GRACE, PythonPeers, PythonProcess, TestVhost, free_tcp_port, peer_or_skip};
use microfw_transport_ws::ServerOptions;
use microfw_transport_ws::tokio::{ClientOptions, ServerMode, WsCallError, WsRpcClient, WsServer};
use serde_json::{Map, Value, json};

const READY: Duration = Duration::from_secs(60);
const CALL: Duration = Duration::from_secs(60);

/// micro_framework's client (`mf_client.py ws PORT TARGET ARGS [KWARGS]`), run to its end.
async fn mf_call(port: u16, args: &[&str]) -> String {
    let venv = PythonPeers::micro_framework().unwrap();
    let mut argv = vec!["ws".to_owned(), port.to_string()];
    argv.extend(args.iter().map(|a| (*a).to_owned()));
    let process = tokio::task::spawn_blocking(move || {
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        PythonProcess::run(&venv, "mf_client.py", &argv, &[], CALL).unwrap()
    })
    .await
    .unwrap();
    let out = process.stdout_lines();
    out.into_iter().find(|l| l.starts_with("RESULT ") || l.starts_with("ERROR ")).unwrap_or_else(|| {
        panic!("no result from mf_client.py\n{}", process.dump());
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn micro_frameworks_client_calls_our_server() {
    let _ = peer_or_skip!(PythonPeers::micro_framework());
    let gate = Gate::default();
    let svc = start(service(&gate, 3), WsServer::new(ServerOptions::default())).await;
    let port = svc.addr.port();
    // Its proxy lists the targets first, then calls by name with positional and keyword args.
    assert_eq!(mf_call(port, &["add", "[2]", r#"{"b": 5}"#]).await, "RESULT 7");
    assert_eq!(mf_call(port, &["add", "[1, 2]", r#"{"c": 3}"#]).await, "RESULT 6");
    assert_eq!(mf_call(port, &["fail", "[]"]).await, r#"ERROR ValueError "bad value""#);
    let missing = mf_call(port, &["add", "[]"]).await;
    assert!(missing.starts_with("ERROR TypeError "), "{missing}");
    assert_eq!(svc.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_calls_micro_frameworks_server_in_order() {
    let venv = peer_or_skip!(PythonPeers::micro_framework());
    let vhost = TestVhost::create().unwrap();
    let uri = vhost.amqp_uri();
    let port = free_tcp_port().unwrap();
    let port_text = port.to_string();
    let mut server = tokio::task::spawn_blocking(move || {
        let env = [("AMQP_URI", uri.as_str()), ("WEBSOCKET_PORT", port_text.as_str())];
        let server = PythonProcess::spawn(&venv, "mf_service.py", &[], &env).unwrap();
        server.wait_for_line("READY", READY).unwrap();
        server
    })
    .await
    .unwrap();

    let client =
        within("connect", WsRpcClient::connect(&format!("ws://127.0.0.1:{port}"), ClientOptions::default()))
            .await
            .unwrap();
    let mut kwargs = Map::new();
    kwargs.insert("b".into(), json!(5));
    assert_eq!(within("ws_add", client.call("ws_add", vec![json!(2)], kwargs)).await, Ok(json!(7)));
    assert_eq!(client.mode(), ServerMode::InOrder);
    // Several calls in flight on one connection: it answers them one by one, in order.
    let calls: Vec<_> = (0..5).map(|i| client.call("ws_echo", vec![json!({"i": i})], Map::new())).collect();
    for (i, call) in calls.into_iter().enumerate() {
        assert_eq!(within("ws_echo", call).await, Ok(json!({"i": i})));
    }
    let targets = within("targets", client.targets()).await.unwrap();
    let names: Vec<&str> = targets.iter().map(|t| t.target.as_str()).collect();
    assert!(names.contains(&"ws_add") && names.contains(&"ws_echo"), "{names:?}");
    let ws_add = targets.iter().find(|t| t.target == "ws_add").unwrap();
    assert_eq!((ws_add.args.clone(), ws_add.kwargs.clone()), (vec!["a".to_owned()], vec!["b".to_owned()]));
    match within("unknown", client.call("nope", vec![], Map::new())).await {
        Err(WsCallError::Remote(e)) => assert_eq!(e.exc_type, "RPCTargetDoesNotExist"),
        other => panic!("{other:?}"),
    }
    let value: Value =
        within("after an error", client.call("ws_echo", vec![json!("ok")], Map::new())).await.unwrap();
    assert_eq!(value, json!("ok"));

    drop(client);
    let status = tokio::task::spawn_blocking(move || server.stop(DEFAULT_STOP_GRACE).unwrap()).await.unwrap();
    assert!(status.success(), "{status}");
}

//! The blocking half: the threaded server link under a real Engine, a blocking raw client,
//! and the blocking `WsRpcClient`. Every blocking read has a timeout.
#![cfg(feature = "sync")]

mod common;

use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{Gate, T, ok, service, start_sync};
use microfw_core::metrics::{MemoryRecorder, ServiceMetrics, WS_ACTIVE_CONNECTIONS};
use microfw_transport_ws::ServerOptions;
use microfw_transport_ws::sync::{
    ClientOptions, ServerMode, WsCallError, WsClientError, WsRpcClient, WsServer,
};
use serde_json::{Map, Value, json};
use tungstenite::client::IntoClientRequest;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Error as WsError, Message, WebSocket};

type Ws = WebSocket<TcpStream>;

fn raw(url: &str) -> Result<Ws, WsError> {
    let request = url.into_client_request()?;
    raw_request(request)
}

fn raw_request(request: tungstenite::handshake::client::Request) -> Result<Ws, WsError> {
    let host = request.uri().host().unwrap().to_owned();
    let port = request.uri().port_u16().unwrap();
    let stream = TcpStream::connect((host.as_str(), port)).unwrap();
    stream.set_read_timeout(Some(T)).unwrap();
    match tungstenite::client(request, stream) {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::HandshakeError::Failure(e)) => Err(e),
        Err(tungstenite::HandshakeError::Interrupted(_)) => panic!("handshake interrupted"),
    }
}

fn send(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).unwrap();
}

fn recv(ws: &mut Ws) -> Value {
    loop {
        match ws.read() {
            Ok(Message::Text(t)) => return serde_json::from_str(t.as_str()).unwrap(),
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// Waits until `cond` holds, at most [`T`], re-checking every few milliseconds.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + T;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn started(gate: &Gate, key: &str) {
    assert!(gate.wait_started(key), "handler {key} never started");
}

#[test]
fn calls_with_and_without_id_and_the_lane_order() {
    let gate = Gate::default();
    let svc = start_sync(service(&gate, 8), WsServer::new(ServerOptions::default()));
    let mut ws = raw(&svc.url()).unwrap();
    send(&mut ws, r#"{"command": "add", "command_args": [1, 2]}"#);
    assert_eq!(recv(&mut ws), ok(json!(3), None));
    send(&mut ws, r#"{"command": "add", "command_args": [1], "command_kwargs": {"b": 5}, "id": 7}"#);
    assert_eq!(recv(&mut ws), ok(json!(6), Some(json!(7))));
    send(&mut ws, r#"{"command": "wait", "command_args": ["l1"]}"#);
    send(&mut ws, r#"{"command": "wait", "command_args": ["m1"], "id": 1}"#);
    send(&mut ws, r#"{"command": "wait", "command_args": ["l2"]}"#);
    send(&mut ws, r#"{"command": "wait", "command_args": ["m2"], "id": 2}"#);
    for key in ["l1", "m1", "m2"] {
        started(&gate, key);
    }
    gate.open("m2");
    assert_eq!(recv(&mut ws), ok(json!("m2"), Some(json!(2))));
    gate.open("m1");
    assert_eq!(recv(&mut ws), ok(json!("m1"), Some(json!(1))));
    assert!(!gate.has_started("l2"));
    gate.open("l2");
    gate.open("l1");
    assert_eq!(recv(&mut ws), ok(json!("l1"), None));
    assert_eq!(recv(&mut ws), ok(json!("l2"), None));
    send(&mut ws, r#"{"command": "__list_targets__"}"#);
    assert_eq!(recv(&mut ws)["data"][0]["kwargs"], json!(["c"]));
    assert_eq!(svc.stop_blocking(), 0);
}

#[test]
fn bad_input_oversize_and_binary_frames() {
    let gate = Gate::default();
    let svc =
        start_sync(service(&gate, 2), WsServer::new(ServerOptions::default().with_max_message_size(1024)));
    let mut ws = raw(&svc.url()).unwrap();
    let exception = |v: Value| v["exception"]["exception"].as_str().unwrap().to_owned();
    send(&mut ws, "{nope");
    assert_eq!(exception(recv(&mut ws)), "JSONDecodeError");
    send(&mut ws, "[1]");
    assert_eq!(exception(recv(&mut ws)), "MalformedRequest");
    send(&mut ws, r#"{"command": "add", "command_args": ["a", "b"]}"#);
    assert_eq!(exception(recv(&mut ws)), "TypeError");
    send(&mut ws, r#"{"command": "nope"}"#);
    assert_eq!(exception(recv(&mut ws)), "RPCTargetDoesNotExist");
    ws.send(Message::binary(vec![1u8, 2, 3])).unwrap();
    assert_eq!(exception(recv(&mut ws)), "MalformedRequest");
    send(&mut ws, r#"{"command": "add", "command_args": [20, 22]}"#);
    assert_eq!(recv(&mut ws), ok(json!(42), None));
    send(&mut ws, &format!(r#"{{"command": "add", "p": "{}"}}"#, "x".repeat(2000)));
    match ws.read() {
        Ok(Message::Close(Some(frame))) => assert_eq!(frame.code, CloseCode::Size),
        other => panic!("expected a 1009 close, got {other:?}"),
    }
    drop(svc);
}

#[test]
fn tokens_limits_and_max_connections_reached() {
    let gate = Gate::default();
    let options = ServerOptions::default().with_token("s3cret").with_max_waiting(1).with_max_connections(2);
    let svc = start_sync(service(&gate, 1), WsServer::new(options));
    let status = |e: WsError| match e {
        WsError::Http(response) => response.status().as_u16(),
        other => panic!("expected an HTTP refusal, got {other:?}"),
    };
    assert_eq!(status(raw(&svc.url()).unwrap_err()), 401);
    let mut request = svc.url().into_client_request().unwrap();
    request.headers_mut().insert("Authorization", "Bearer s3cret".parse().unwrap());
    let mut a = raw_request(request).unwrap();
    let mut b = raw(&format!("{}/?token=s3cret", svc.url())).unwrap();
    // Two connections open: a third upgrade is refused.
    assert_eq!(status(raw(&format!("{}/?token=s3cret", svc.url())).unwrap_err()), 503);
    send(&mut a, r#"{"command": "wait", "command_args": ["x"], "id": 1}"#);
    started(&gate, "x");
    send(&mut a, r#"{"command": "wait", "command_args": ["y"], "id": 2}"#);
    send(&mut a, r#"{"command": "add", "command_args": [1, 1], "id": 3}"#);
    assert_eq!(
        recv(&mut a),
        json!({"data": null, "exception": {"exception": "MaxConnectionsReached", "message": "No Available Workers"}, "id": 3})
    );
    send(&mut b, r#"{"command": "add", "command_args": [1, 1]}"#);
    assert_eq!(recv(&mut b)["exception"]["exception"], json!("MaxConnectionsReached"));
    gate.open("x");
    assert_eq!(recv(&mut a), ok(json!("x"), Some(json!(1))));
    started(&gate, "y");
    gate.open("y");
    assert_eq!(recv(&mut a), ok(json!("y"), Some(json!(2))));
    assert_eq!(svc.stop_blocking(), 0);
}

#[test]
fn the_gauge_idle_close_and_shutdown() {
    let gate = Gate::default();
    let recorder = MemoryRecorder::new();
    let (spec, _) = service(&gate, 1).build().unwrap();
    let metrics = metrics::with_local_recorder(&recorder, || ServiceMetrics::new(&spec, &[]));
    let options =
        ServerOptions::default().with_idle_timeout(Some(Duration::from_millis(150))).with_max_waiting(4);
    let server = WsServer::new(options).with_connections_gauge(metrics.ws_connections());
    let svc = start_sync(service(&gate, 1), server);
    let gauge = || recorder.gauge(WS_ACTIVE_CONNECTIONS, &[("service", "svc")]);
    let mut idle = raw(&svc.url()).unwrap();
    let mut busy = raw(&svc.url()).unwrap();
    eventually("two connections", || gauge() == Some(2.0));
    // The idle one is closed with 1001; the one with a call in flight is not.
    send(&mut busy, r#"{"command": "wait", "command_args": ["run"], "id": 1}"#);
    started(&gate, "run");
    match idle.read() {
        Ok(Message::Close(Some(frame))) => assert_eq!(u16::from(frame.code), 1001),
        other => panic!("expected an idle close, got {other:?}"),
    }
    drop(idle);
    eventually("one connection", || gauge() == Some(1.0));
    send(&mut busy, r#"{"command": "add", "command_args": [1, 1], "id": 2}"#);
    eventually("queued", || svc.handle.stats().unwrap().waiting == 1);
    svc.shutdown();
    assert_eq!(recv(&mut busy)["exception"]["message"], json!("The service is shutting down"));
    gate.open("run");
    assert_eq!(recv(&mut busy), ok(json!("run"), Some(json!(1))));
    match busy.read() {
        Ok(Message::Close(Some(frame))) => assert_eq!(u16::from(frame.code), 1001),
        other => panic!("expected a 1001 close, got {other:?}"),
    }
    let _ = busy.flush();
    eventually("closed at stop", || gauge() == Some(0.0));
}

#[test]
fn the_blocking_client_multiplexes_lists_and_times_out() {
    let gate = Gate::default();
    let svc = start_sync(service(&gate, 8), WsServer::new(ServerOptions::default().with_token("t")));
    match WsRpcClient::connect(&svc.url(), ClientOptions::default()) {
        Err(WsClientError::Connect(WsCallError::Connect(reason))) => {
            assert!(reason.contains("401"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    let options = ClientOptions::default().with_token("t").with_timeout(T);
    let client = WsRpcClient::connect(&svc.url(), options).unwrap();
    let a = client.call_async("wait", vec![json!("a")], Map::new());
    let b = client.call_async("wait", vec![json!("b")], Map::new());
    assert_eq!(client.call("add", vec![json!(1), json!(2)], Map::new()), Ok(json!(3)));
    assert_eq!(client.mode(), ServerMode::Multiplexed);
    started(&gate, "a");
    started(&gate, "b");
    gate.open("b");
    assert_eq!(b.wait(), Ok(json!("b")));
    gate.open("a");
    assert_eq!(a.wait(), Ok(json!("a")));
    let targets = client.targets().unwrap();
    assert_eq!(targets[0].args, ["a", "b"]);
    assert_eq!(client.info("add").unwrap().docstring.as_deref(), Some("Adds a and b, and c when given."));
    let slow = client.call_with_timeout("wait", vec![json!("late")], Map::new(), Duration::from_millis(100));
    assert_eq!(slow, Err(WsCallError::Timeout(Duration::from_millis(100))));
    gate.open("late");
    assert_eq!(client.call("add", vec![json!(2), json!(2)], Map::new()), Ok(json!(4)));
    // From several threads at once.
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let client = client.clone();
            std::thread::spawn(move || client.call("add", vec![json!(i), json!(i)], Map::new()))
        })
        .collect();
    for (i, t) in threads.into_iter().enumerate() {
        assert_eq!(t.join().unwrap(), Ok(json!(2 * i)));
    }
    drop(svc);
}

#[test]
fn the_blocking_client_reconnects_after_an_idle_close() {
    let gate = Gate::default();
    let options = ServerOptions::default().with_idle_timeout(Some(Duration::from_millis(100)));
    let svc = start_sync(service(&gate, 2), WsServer::new(options));
    let client = WsRpcClient::connect(&svc.url(), ClientOptions::default().with_timeout(T)).unwrap();
    assert_eq!(client.call("add", vec![json!(1), json!(1)], Map::new()), Ok(json!(2)));
    let handle = svc.handle.clone();
    eventually("idle close", || handle.stats().unwrap().connections == 0);
    // The reader thread sees the close shortly after; a call made in between may see the
    // connection lost, the next one reconnects.
    let deadline = Instant::now() + T;
    loop {
        match client.call("add", vec![json!(2), json!(2)], Map::new()) {
            Ok(v) => break assert_eq!(v, json!(4)),
            Err(WsCallError::ConnectionLost) if Instant::now() < deadline => continue,
            Err(e) => panic!("{e}"),
        }
    }
    drop(svc);
}

#[test]
fn the_blocking_client_matches_in_order_against_a_server_without_ids() {
    // One request at a time, replies in order, no id; `stall` waits for a signal.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (release, released) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        let Ok((stream, _)) = listener.accept() else { return };
        stream.set_read_timeout(Some(T)).unwrap();
        let Ok(mut ws) = tungstenite::accept(stream) else { return };
        while let Ok(Message::Text(text)) = ws.read() {
            let request: Value = serde_json::from_str(text.as_str()).unwrap();
            if request["command"] == "stall" {
                let _ = released.recv_timeout(T);
            }
            let reply = json!({"data": request["command_args"][0], "exception": null});
            if ws.send(Message::text(reply.to_string())).is_err() {
                return;
            }
        }
    });
    let client =
        WsRpcClient::connect(&format!("ws://{addr}"), ClientOptions::default().with_timeout(T)).unwrap();
    let calls: Vec<_> = (0..5).map(|i| client.call_async("echo", vec![json!(i)], Map::new())).collect();
    for (i, call) in calls.into_iter().enumerate() {
        assert_eq!(call.wait(), Ok(json!(i)));
    }
    assert_eq!(client.mode(), ServerMode::InOrder);
    let stalled = client.call_async("stall", vec![json!("stalled")], Map::new());
    let next = client.call_async("echo", vec![json!("next")], Map::new());
    assert!(matches!(stalled.wait_timeout(Duration::from_millis(50)), Err(WsCallError::Timeout(_))));
    release.send(()).unwrap();
    assert_eq!(next.wait(), Ok(json!("next")));
}

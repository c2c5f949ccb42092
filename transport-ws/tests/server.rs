//! The tokio server link under a real Engine, spoken to with a raw WebSocket client.
#![cfg(feature = "tokio")]

mod common;

use common::{Gate, T, eventually, ok, raw, recv, send, service, start, within};
use futures_util::{SinkExt, StreamExt};
use microfw_core::metrics::{MemoryRecorder, ServiceMetrics, WS_ACTIVE_CONNECTIONS};
use microfw_transport_ws::ServerOptions;
use microfw_transport_ws::tokio::WsServer;
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

fn server() -> WsServer {
    WsServer::new(ServerOptions::default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_without_id_is_answered_like_micro_framework_and_with_id_echoes_it() {
    let gate = Gate::default();
    let svc = start(service(&gate, 4), server()).await;
    let mut ws = raw(svc.url()).await.unwrap();
    send(&mut ws, r#"{"command": "add", "command_args": [1, 2]}"#).await;
    assert_eq!(recv(&mut ws).await, ok(json!(3), None));
    send(&mut ws, r#"{"command": "add", "command_args": [1], "command_kwargs": {"b": 5, "c": 1}, "id": 7}"#)
        .await;
    assert_eq!(recv(&mut ws).await, ok(json!(7), Some(json!(7))));
    send(&mut ws, r#"{"command": "add", "command_args": [2, 2], "id": "x-1"}"#).await;
    assert_eq!(recv(&mut ws).await, ok(json!(4), Some(json!("x-1"))));
    // A handler error is micro_framework's exception object.
    send(&mut ws, r#"{"command": "fail"}"#).await;
    assert_eq!(
        recv(&mut ws).await,
        json!({"data": null, "exception": {"exception": "ValueError", "message": "bad value"}})
    );
    assert_eq!(svc.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_in_flight_are_answered_as_they_complete_while_the_id_less_lane_stays_in_order() {
    let gate = Gate::default();
    let svc = start(service(&gate, 8), server()).await;
    let mut ws = raw(svc.url()).await.unwrap();
    send(&mut ws, r#"{"command": "wait", "command_args": ["l1"]}"#).await;
    send(&mut ws, r#"{"command": "wait", "command_args": ["m1"], "id": 1}"#).await;
    send(&mut ws, r#"{"command": "wait", "command_args": ["l2"]}"#).await;
    send(&mut ws, r#"{"command": "wait", "command_args": ["m2"], "id": 2}"#).await;
    for key in ["l1", "m1", "m2"] {
        gate.started(key).await;
    }
    // The multiplexed calls come back in completion order, m2 first.
    gate.open("m2");
    assert_eq!(recv(&mut ws).await, ok(json!("m2"), Some(json!(2))));
    gate.open("m1");
    assert_eq!(recv(&mut ws).await, ok(json!("m1"), Some(json!(1))));
    // l2 is behind l1 on the sequential lane: not started even though workers are free.
    assert!(!gate.has_started("l2"));
    gate.open("l2");
    gate.open("l1");
    assert_eq!(recv(&mut ws).await, ok(json!("l1"), None));
    assert_eq!(recv(&mut ws).await, ok(json!("l2"), None));
    assert_eq!(svc.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_targets_and_get_target_show_real_parameter_names_and_docs() {
    let gate = Gate::default();
    let svc = start(service(&gate, 2), server()).await;
    let mut ws = raw(svc.url()).await.unwrap();
    send(&mut ws, r#"{"command": "__list_targets__", "id": 1}"#).await;
    let listing = recv(&mut ws).await;
    assert_eq!(listing["id"], json!(1));
    assert_eq!(
        listing["data"],
        json!([
            {"target": "add", "args": ["a", "b"], "kwargs": ["c"], "docstring": "Adds a and b, and c when given."},
            {"target": "wait", "args": [], "kwargs": [], "docstring": null},
            {"target": "fail", "args": [], "kwargs": [], "docstring": null},
        ])
    );
    send(&mut ws, r#"{"command": "__get_target__", "command_args": ["add"]}"#).await;
    assert_eq!(recv(&mut ws).await["data"]["kwargs"], json!(["c"]));
    send(&mut ws, r#"{"command": "__get_target__", "command_args": ["nope"]}"#).await;
    assert_eq!(
        recv(&mut ws).await,
        json!({"data": null, "exception": {"exception": "KeyError", "message": "'nope'"}})
    );
    drop(svc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_error_replies_and_the_connection_stays_open() {
    let gate = Gate::default();
    let svc = start(service(&gate, 2), server()).await;
    let mut ws = raw(svc.url()).await.unwrap();
    let exception = |v: serde_json::Value| v["exception"]["exception"].as_str().unwrap().to_owned();
    send(&mut ws, "{nope").await;
    let reply = recv(&mut ws).await;
    assert_eq!(
        reply["exception"],
        json!({"exception": "JSONDecodeError", "message": "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"})
    );
    send(&mut ws, "[1, 2]").await;
    assert_eq!(exception(recv(&mut ws).await), "MalformedRequest");
    send(&mut ws, r#"{"command_args": []}"#).await;
    assert_eq!(exception(recv(&mut ws).await), "MalformedRequest");
    send(&mut ws, r#"{"command": "add", "command_args": "x", "id": 9}"#).await;
    let reply = recv(&mut ws).await;
    assert_eq!((exception(reply.clone()), reply["id"].clone()), ("MalformedRequest".into(), json!(9)));
    send(&mut ws, r#"{"command": "add", "command_args": ["a", "b"]}"#).await;
    assert_eq!(exception(recv(&mut ws).await), "TypeError");
    send(&mut ws, r#"{"command": "add", "command_args": [1]}"#).await;
    assert_eq!(exception(recv(&mut ws).await), "TypeError");
    send(&mut ws, r#"{"command": "nope"}"#).await;
    assert_eq!(
        recv(&mut ws).await["exception"],
        json!({"exception": "RPCTargetDoesNotExist", "message": "nope does not exist or is not exposed through a RPC method."})
    );
    within("binary", ws.send(Message::binary(vec![0u8, 159, 146, 150]))).await.unwrap();
    assert_eq!(exception(recv(&mut ws).await), "MalformedRequest");
    // Still open and serving.
    send(&mut ws, r#"{"command": "add", "command_args": [20, 22]}"#).await;
    assert_eq!(recv(&mut ws).await, ok(json!(42), None));
    drop(svc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_message_closes_the_connection_with_1009() {
    let gate = Gate::default();
    let svc =
        start(service(&gate, 2), WsServer::new(ServerOptions::default().with_max_message_size(1024))).await;
    let mut ws = raw(svc.url()).await.unwrap();
    // Exactly at the limit is fine.
    let padding = "x".repeat(1024 - r#"{"command": "add", "command_args": [1, 1], "p": ""}"#.len());
    send(&mut ws, &format!(r#"{{"command": "add", "command_args": [1, 1], "p": "{padding}"}}"#)).await;
    assert_eq!(recv(&mut ws).await, ok(json!(2), None));
    send(&mut ws, &format!(r#"{{"command": "add", "p": "{}"}}"#, "x".repeat(2000))).await;
    match within("close", ws.next()).await {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Size),
        other => panic!("expected a 1009 close, got {other:?}"),
    }
    drop(svc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_is_required_in_the_header_or_the_query() {
    let gate = Gate::default();
    let svc = start(service(&gate, 2), WsServer::new(ServerOptions::default().with_token("s3cret"))).await;
    let status = |e: WsError| match e {
        WsError::Http(response) => response.status().as_u16(),
        other => panic!("expected an HTTP refusal, got {other:?}"),
    };
    assert_eq!(status(raw(svc.url()).await.unwrap_err()), 401);
    assert_eq!(status(raw(format!("{}/?token=wrong", svc.url())).await.unwrap_err()), 401);
    let mut request = svc.url().into_client_request().unwrap();
    request.headers_mut().insert("Authorization", "Bearer wrong".parse().unwrap());
    assert_eq!(status(raw(request).await.unwrap_err()), 401);

    let mut request = svc.url().into_client_request().unwrap();
    request.headers_mut().insert("Authorization", "Bearer s3cret".parse().unwrap());
    let mut ws = raw(request).await.unwrap();
    send(&mut ws, r#"{"command": "add", "command_args": [1, 2]}"#).await;
    assert_eq!(recv(&mut ws).await, ok(json!(3), None));
    let mut ws = raw(format!("{}/any/path?x=1&token=s3cret", svc.url())).await.unwrap();
    send(&mut ws, r#"{"command": "add", "command_args": [2, 2]}"#).await;
    assert_eq!(recv(&mut ws).await, ok(json!(4), None));
    drop(svc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_reached_when_the_budget_and_the_wait_queue_are_full() {
    let gate = Gate::default();
    let options = ServerOptions::default().with_max_waiting(1);
    let svc = start(service(&gate, 1), WsServer::new(options)).await;
    let mut a = raw(svc.url()).await.unwrap();
    let mut b = raw(svc.url()).await.unwrap();
    send(&mut a, r#"{"command": "wait", "command_args": ["x"], "id": 1}"#).await;
    gate.started("x").await;
    // The budget (1) is taken: the next call waits in the server's queue (1)...
    send(&mut a, r#"{"command": "wait", "command_args": ["y"], "id": 2}"#).await;
    // ...and the one after is refused at once, as micro_framework answers.
    send(&mut a, r#"{"command": "add", "command_args": [1, 1], "id": 3}"#).await;
    assert_eq!(
        recv(&mut a).await,
        json!({"data": null, "exception": {"exception": "MaxConnectionsReached", "message": "No Available Workers"}, "id": 3})
    );
    // Another connection shares the same limit (an id-less call).
    send(&mut b, r#"{"command": "add", "command_args": [1, 1]}"#).await;
    assert_eq!(recv(&mut b).await["exception"]["exception"], json!("MaxConnectionsReached"));
    assert_eq!(svc.handle.stats().unwrap().refused, 2);
    assert!(!gate.has_started("y"));
    gate.open("x");
    assert_eq!(recv(&mut a).await, ok(json!("x"), Some(json!(1))));
    gate.started("y").await;
    gate.open("y");
    assert_eq!(recv(&mut a).await, ok(json!("y"), Some(json!(2))));
    // Capacity is back.
    send(&mut b, r#"{"command": "add", "command_args": [1, 1]}"#).await;
    assert_eq!(recv(&mut b).await, ok(json!(2), None));
    assert_eq!(svc.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_over_the_connection_limit_are_refused_with_503() {
    let gate = Gate::default();
    let svc = start(service(&gate, 2), WsServer::new(ServerOptions::default().with_max_connections(2))).await;
    let a = raw(svc.url()).await.unwrap();
    let mut b = raw(svc.url()).await.unwrap();
    match raw(svc.url()).await {
        Err(WsError::Http(response)) => assert_eq!(response.status().as_u16(), 503),
        other => panic!("expected 503, got {:?}", other.map(|_| ())),
    }
    send(&mut b, r#"{"command": "add", "command_args": [1, 2]}"#).await;
    assert_eq!(recv(&mut b).await, ok(json!(3), None));
    drop(a);
    let handle = svc.handle.clone();
    eventually("the server notices the close", || handle.stats().unwrap().connections == 1).await;
    let mut c = within("reconnect", async {
        loop {
            if let Ok(ws) = raw(svc.url()).await {
                break ws;
            }
        }
    })
    .await;
    send(&mut c, r#"{"command": "add", "command_args": [2, 2]}"#).await;
    assert_eq!(recv(&mut c).await, ok(json!(4), None));
    drop(svc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_active_connections_follows_open_connections() {
    let gate = Gate::default();
    let recorder = MemoryRecorder::new();
    let svc_def = service(&gate, 2);
    let (spec, _) = service(&gate, 2).build().unwrap();
    let metrics = metrics::with_local_recorder(&recorder, || ServiceMetrics::new(&spec, &[]));
    let server = server().with_connections_gauge(metrics.ws_connections());
    let svc = start(svc_def, server).await;
    let gauge = || recorder.gauge(WS_ACTIVE_CONNECTIONS, &[("service", "svc")]);
    assert_eq!(gauge(), Some(0.0));
    let mut a = raw(svc.url()).await.unwrap();
    let b = raw(svc.url()).await.unwrap();
    eventually("two connections counted", || gauge() == Some(2.0)).await;
    drop(b);
    eventually("one connection counted", || gauge() == Some(1.0)).await;
    // A refused upgrade is not a connection.
    let token_svc = start(
        service(&gate, 1),
        WsServer::new(ServerOptions::default().with_token("t"))
            .with_connections_gauge(metrics.ws_connections()),
    )
    .await;
    assert!(raw(token_svc.url()).await.is_err());
    send(&mut a, r#"{"command": "add", "command_args": [1, 2]}"#).await;
    assert_eq!(recv(&mut a).await, ok(json!(3), None));
    assert_eq!(gauge(), Some(1.0));
    svc.stop().await;
    eventually("closed at stop", || gauge() == Some(0.0)).await;
    assert_eq!(recorder.gauge_min(WS_ACTIVE_CONNECTIONS, &[("service", "svc")]), Some(0.0));
    drop(token_svc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_waiting_calls_finishes_running_ones_and_closes_with_1001() {
    let gate = Gate::default();
    let svc = start(service(&gate, 1), WsServer::new(ServerOptions::default().with_max_waiting(4))).await;
    let mut ws = raw(svc.url()).await.unwrap();
    send(&mut ws, r#"{"command": "wait", "command_args": ["run"], "id": 1}"#).await;
    gate.started("run").await;
    send(&mut ws, r#"{"command": "add", "command_args": [1, 1], "id": 2}"#).await;
    eventually("queued", || svc.handle.stats().unwrap().waiting == 1).await;
    svc.shutdown();
    // The waiting call never ran: refused so a client may retry elsewhere.
    assert_eq!(
        recv(&mut ws).await,
        json!({"data": null, "exception": {"exception": "MaxConnectionsReached", "message": "The service is shutting down"}, "id": 2})
    );
    // The running one finishes and is answered before the close.
    gate.open("run");
    assert_eq!(recv(&mut ws).await, ok(json!("run"), Some(json!(1))));
    match within("close", ws.next()).await {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 1001),
        other => panic!("expected a 1001 close, got {other:?}"),
    }
    assert_eq!(svc.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_but_a_busy_one_is_not() {
    let gate = Gate::default();
    let options = ServerOptions::default().with_idle_timeout(Some(std::time::Duration::from_millis(200)));
    let svc = start(service(&gate, 2), WsServer::new(options)).await;
    let mut ws = raw(svc.url()).await.unwrap();
    send(&mut ws, r#"{"command": "wait", "command_args": ["slow"]}"#).await;
    gate.started("slow").await;
    // Longer than the idle timeout, with a call in flight: still open.
    let early = tokio::time::timeout(std::time::Duration::from_millis(500), ws.next()).await;
    assert!(early.is_err(), "closed while a call was in flight: {early:?}");
    gate.open("slow");
    assert_eq!(recv(&mut ws).await, ok(json!("slow"), None));
    match tokio::time::timeout(T, ws.next()).await {
        Ok(Some(Ok(Message::Close(Some(frame))))) => assert_eq!(u16::from(frame.code), 1001),
        other => panic!("expected an idle close, got {other:?}"),
    }
    drop(svc);
}

/// A deterministic xorshift, so a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[(self.next() % items.len() as u64) as usize]
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_frames_each_get_one_reply_and_never_close_the_connection() {
    let gate = Gate::default();
    let svc = start(service(&gate, 4), server()).await;
    let mut ws = raw(svc.url()).await.unwrap();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let commands = ["add", "fail", "nope", "__list_targets__", "__get_target__", "", "add"];
    let values = ["1", "-2", "\"a\"", "null", "[]", "{}", "[1, 2]", "{\"b\": 1}", "1.5", "true"];
    let n = 300;
    for _ in 0..n {
        let message = match rng.next() % 5 {
            0 => {
                let bytes: Vec<u8> = (0..rng.next() % 48).map(|_| rng.next() as u8).collect();
                Message::text(String::from_utf8_lossy(&bytes).into_owned())
            }
            1 => Message::binary((0..rng.next() % 16).map(|_| rng.next() as u8).collect::<Vec<u8>>()),
            2 => Message::text(format!("{{\"command\": {}}}", rng.pick(&values))),
            _ => {
                let id = match rng.next() % 3 {
                    0 => String::new(),
                    1 => format!(", \"id\": {}", rng.next() % 1000),
                    _ => format!(", \"id\": {}", rng.pick(&values)),
                };
                Message::text(format!(
                    "{{\"command\": \"{}\", \"command_args\": {}, \"command_kwargs\": {}{id}}}",
                    rng.pick(&commands),
                    rng.pick(&["[]", "[1]", "[1, 2]", "[\"add\"]", "[[1], {}]", "1", "null"]),
                    rng.pick(&["{}", "{\"b\": 2}", "{\"c\": null}", "[]", "null", "{\"target\": \"add\"}"]),
                ))
            }
        };
        within("send", ws.send(message)).await.unwrap();
    }
    for _ in 0..n {
        let reply = recv(&mut ws).await;
        assert!(reply.get("data").is_some() && reply.get("exception").is_some(), "{reply}");
    }
    send(&mut ws, r#"{"command": "add", "command_args": [1, 2]}"#).await;
    assert_eq!(recv(&mut ws).await, ok(json!(3), None));
    assert_eq!(svc.stop().await, 0);
}

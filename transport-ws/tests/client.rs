//! `WsRpcClient` against the microfw server (multiplexed) and against a server that answers
//! in order without echoing ids (micro_framework's behaviour).
#![cfg(feature = "tokio")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Gate, eventually, service, start, within};
use futures_util::{SinkExt, StreamExt};
use microfw_transport_ws::ServerOptions;
use microfw_transport_ws::tokio::{
    ClientOptions, ServerMode, WsCallError, WsClientError, WsRpcClient, WsServer,
};
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;

fn args(values: &[Value]) -> Vec<Value> {
    values.to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_share_one_connection_and_complete_out_of_order() {
    let gate = Gate::default();
    let svc = start(service(&gate, 8), WsServer::new(ServerOptions::default())).await;
    let client = within("connect", WsRpcClient::connect(&svc.url(), ClientOptions::default())).await.unwrap();
    let a = client.call("wait", args(&[json!("a")]), Map::new());
    let b = client.call("wait", args(&[json!("b")]), Map::new());
    let mut kwargs = Map::new();
    kwargs.insert("c".into(), json!(10));
    let sum = client.call("add", args(&[json!(1), json!(2)]), kwargs);
    // The quick call overtakes the two held ones on the same connection.
    assert_eq!(within("add", sum).await, Ok(json!(13)));
    assert_eq!(client.mode(), ServerMode::Multiplexed);
    gate.started("a").await;
    gate.started("b").await;
    gate.open("b");
    let b = tokio::spawn(b);
    assert_eq!(within("b", b).await.unwrap(), Ok(json!("b")));
    gate.open("a");
    assert_eq!(within("a", a).await, Ok(json!("a")));
    assert_eq!(svc.handle.stats().unwrap().connections, 1);
    // Remote errors come back as values.
    match within("fail", client.call("fail", vec![], Map::new())).await {
        Err(WsCallError::Remote(e)) => {
            assert_eq!((e.exc_type.as_str(), e.message.as_str()), ("ValueError", "bad value"))
        }
        other => panic!("{other:?}"),
    }
    drop(svc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_and_info_list_parameter_names_and_docs() {
    let gate = Gate::default();
    let svc = start(service(&gate, 2), WsServer::new(ServerOptions::default())).await;
    let client = WsRpcClient::new(&svc.url(), ClientOptions::default()).unwrap();
    let targets = within("targets", client.targets()).await.unwrap();
    let names: Vec<&str> = targets.iter().map(|t| t.target.as_str()).collect();
    assert_eq!(names, ["add", "wait", "fail"]);
    assert_eq!(targets[0].args, ["a", "b"]);
    assert_eq!(targets[0].kwargs, ["c"]);
    assert_eq!(targets[0].docstring.as_deref(), Some("Adds a and b, and c when given."));
    let add = within("info", client.info("add")).await.unwrap();
    assert_eq!(add, targets[0]);
    match within("info nope", client.info("nope")).await {
        Err(WsCallError::Remote(e)) => assert_eq!(e.exc_type, "KeyError"),
        other => panic!("{other:?}"),
    }
    drop(svc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_times_out_on_its_own_and_the_connection_survives() {
    let gate = Gate::default();
    let svc = start(service(&gate, 4), WsServer::new(ServerOptions::default())).await;
    let client = WsRpcClient::connect(&svc.url(), ClientOptions::default()).await.unwrap();
    let slow =
        client.call_with_timeout("wait", args(&[json!("late")]), Map::new(), Duration::from_millis(100));
    assert_eq!(within("timeout", slow).await, Err(WsCallError::Timeout(Duration::from_millis(100))));
    // Its late reply is dropped; other calls are unaffected.
    gate.started("late").await;
    gate.open("late");
    assert_eq!(
        within("add", client.call("add", args(&[json!(2), json!(3)]), Map::new())).await,
        Ok(json!(5))
    );
    assert_eq!(
        within("add", client.call("add", args(&[json!(3), json!(3)]), Map::new())).await,
        Ok(json!(6))
    );
    drop(svc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_reconnects_after_the_server_closed_its_connection() {
    let gate = Gate::default();
    let options = ServerOptions::default().with_idle_timeout(Some(Duration::from_millis(100)));
    let svc = start(service(&gate, 2), WsServer::new(options)).await;
    let client = WsRpcClient::connect(&svc.url(), ClientOptions::default()).await.unwrap();
    assert_eq!(
        within("first", client.call("add", args(&[json!(1), json!(1)]), Map::new())).await,
        Ok(json!(2))
    );
    let handle = svc.handle.clone();
    eventually("idle close", || handle.stats().unwrap().connections == 0).await;
    assert_eq!(
        within("again", client.call("add", args(&[json!(2), json!(2)]), Map::new())).await,
        Ok(json!(4))
    );
    assert_eq!(svc.handle.stats().unwrap().connections, 1);
    drop(svc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_connection_failures_are_reported() {
    let gate = Gate::default();
    let svc = start(service(&gate, 2), WsServer::new(ServerOptions::default().with_token("s3cret"))).await;
    match within("no token", WsRpcClient::connect(&svc.url(), ClientOptions::default())).await {
        Err(WsClientError::Connect(WsCallError::Connect(reason))) => {
            assert!(reason.contains("401"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    let client =
        WsRpcClient::connect(&svc.url(), ClientOptions::default().with_token("s3cret")).await.unwrap();
    assert_eq!(
        within("call", client.call("add", args(&[json!(1), json!(2)]), Map::new())).await,
        Ok(json!(3))
    );
    let by_query =
        WsRpcClient::new(&format!("{}/?token=s3cret", svc.url()), ClientOptions::default()).unwrap();
    assert_eq!(
        within("call", by_query.call("add", args(&[json!(1), json!(3)]), Map::new())).await,
        Ok(json!(4))
    );
    // Nobody listens here any more: the call fails, it does not hang.
    let addr = svc.addr;
    drop(svc);
    let refused = WsRpcClient::new(&format!("ws://{addr}"), ClientOptions::default()).unwrap();
    let result = within("refused", async {
        loop {
            // The server's listener closes shortly after the drop.
            match refused.call("add", vec![], Map::new()).await {
                Err(WsCallError::Connect(_)) => break,
                _ => tokio::task::yield_now().await,
            }
        }
    })
    .await;
    assert_eq!(result, ());
    assert!(matches!(
        WsRpcClient::new("wss://example.invalid/", ClientOptions::default()),
        Err(WsClientError::InvalidUrl { .. })
    ));
}

/// A server like micro_framework's: one request at a time per connection, replies in order,
/// no id. `stall` waits for `release` before answering; every other command echoes its
/// first argument.
async fn in_order_server(release: Arc<Notify>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let release = release.clone();
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else { return };
                while let Some(Ok(Message::Text(text))) = ws.next().await {
                    let request: Value = serde_json::from_str(text.as_str()).unwrap();
                    if request["command"] == "stall" {
                        release.notified().await;
                    }
                    let reply = json!({"data": request["command_args"][0], "exception": null});
                    if ws.send(Message::text(reply.to_string())).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    format!("ws://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn against_a_server_that_does_not_echo_ids_replies_are_matched_in_order() {
    let release = Arc::new(Notify::new());
    let url = in_order_server(release.clone()).await;
    let client = WsRpcClient::connect(&url, ClientOptions::default()).await.unwrap();
    let calls: Vec<_> = (0..5).map(|i| client.call("echo", vec![json!(i)], Map::new())).collect();
    for (i, call) in calls.into_iter().enumerate() {
        assert_eq!(within("echo", call).await, Ok(json!(i)));
    }
    assert_eq!(client.mode(), ServerMode::InOrder);
    // A call that times out still owns its place in the order: the replies after it are not
    // shifted onto the wrong calls.
    let stalled =
        client.call_with_timeout("stall", vec![json!("stalled")], Map::new(), Duration::from_millis(50));
    let next = client.call("echo", vec![json!("next")], Map::new());
    assert!(matches!(within("stall", stalled).await, Err(WsCallError::Timeout(_))));
    release.notify_one();
    assert_eq!(within("next", next).await, Ok(json!("next")));
    assert_eq!(within("after", client.call("echo", vec![json!(7)], Map::new())).await, Ok(json!(7)));
}

//! The lapin link surviving the broker closing every connection of its vhost
//! (`rabbitmqctl close_all_connections`): consumers resume, publishes made during the outage
//! go out after the reconnect (or fail, reported), nothing confirmed is lost, and a call
//! pending across the reconnect still gets its reply.
#![cfg(feature = "tokio")]

mod lapin_support;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin_support::{Node, WAIT, connector, now, rabbitmqctl, wait_queue};
use microfw_core::{
    Dialect, EventListener, Outcome, OutgoingCall, Route, RpcListener, RunnerContext, Service, Transport,
};
use microfw_tests::TestVhost;
use serde_json::{Map, json};
use tokio::sync::Notify;

fn h() {}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_the_broker_closes_every_connection_and_loses_nothing() {
    let vhost = TestVhost::create().unwrap();
    let service = Service::new("svc").context(
        RunnerContext::new(16)
            .route(Route::blocking(EventListener::new("src", "evt"), "on_evt", h))
            .route(Route::blocking(RpcListener::new(), "slow", h)),
    );
    let handled = Arc::new(Mutex::new(Vec::new()));
    let seen = handled.clone();
    let svc = Node::start(service, &vhost, connector()).await.with_handler(move |name, d| match name {
        "on_evt" => {
            let n = lapin_support::input_json(&d.job.input)["n"].as_i64().unwrap_or(-1);
            seen.lock().unwrap().push(n);
            Some(Outcome::Success(None))
        }
        // Left running: the test answers it after the reconnect.
        _ => None,
    });
    let stop = Arc::new(Notify::new());
    let serving = svc.serve(stop.clone());

    let mut src = Node::start(Service::new("src"), &vhost, connector()).await;
    let call = src.call(OutgoingCall {
        context: None,
        service: "svc".into(),
        method: "slow".into(),
        args: vec![],
        kwargs: Map::new(),
        timeout: Some(Duration::from_secs(60)),
        transport: Transport::Broker,
        dialect: Dialect::Nameko,
    });
    let mut emits = Vec::new();
    for n in 0..50 {
        emits.push((n, src.emit("src", "evt", &json!({ "n": n }))));
    }
    src.run_until("the first events confirmed", WAIT, |node| node.emitted.len() == 50).await;
    wait_queue(&vhost, "rpc-svc", "the call taken", |q| q.messages == 1 && q.consumers == 1).await;

    // The broker drops every connection while events keep being emitted.
    let ctl = tokio::spawn({
        let vhost = vhost.name().to_owned();
        async move { rabbitmqctl(&["close_all_connections", "--vhost", &vhost, "test"]).await }
    });
    let mut n = 50;
    while !ctl.is_finished() {
        emits.push((n, src.emit("src", "evt", &json!({ "n": n }))));
        n += 1;
        src.run_for(Duration::from_millis(10)).await;
    }
    ctl.await.unwrap();
    for _ in 0..20 {
        emits.push((n, src.emit("src", "evt", &json!({ "n": n }))));
        n += 1;
    }
    let total = emits.len();
    src.run_until("every emit reported", WAIT, |node| node.emitted.len() == total).await;
    let ok: BTreeSet<i64> =
        emits.iter().filter(|(_, id)| src.emitted_ok(*id) == Some(true)).map(|(n, _)| *n).collect();
    let failed = total - ok.len();
    eprintln!("{total} events emitted, {failed} reported failed around the reconnect");
    assert!(ok.len() >= 70, "too few events went out: {}", ok.len());
    assert!((n - 20..n).all(|m| ok.contains(&m)), "events emitted after the reconnect failed");

    stop.notify_one();
    let mut svc = serving.await.unwrap();
    // The request was unacked when the connection dropped: it came again.
    svc.run_until("the request redelivered", WAIT, |node| node.dispatches.len() == 2).await;
    for d in std::mem::take(&mut svc.dispatches) {
        // The first one's ack names the old channel: a silent no-op.
        svc.engine.handle_outcome(now(), d.id, Outcome::Success(Some(json!("done"))));
    }
    svc.run_until("every confirmed event handled", WAIT, |node| {
        let handled: BTreeSet<i64> = handled.lock().unwrap().iter().copied().collect();
        ok.is_subset(&handled) && node.engine.stats().unconfirmed_publishes == 0
    })
    .await;
    src.run_until("the pending call answered", WAIT, |node| node.resolution(call).is_some()).await;
    assert_eq!(src.resolution(call), Some(&Ok(json!("done"))));
    let stop = Arc::new(Notify::new());
    let serving = svc.serve(stop.clone());
    wait_queue(&vhost, "evt-src-evt--svc.on_evt", "drained, consumer back", |q| {
        q.messages == 0 && q.consumers == 1
    })
    .await;
    stop.notify_one();
    let mut svc = serving.await.unwrap();
    svc.stop().await;
    src.stop().await;
}

/// While the broker refuses us (permissions revoked, connections closed), a publish waits at
/// most `publish_wait` and then fails with `LinkDown`; once the broker takes us again, the
/// link reconnects on its own and publishes go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_wait_a_bounded_time_while_the_broker_refuses_us() {
    let vhost = TestVhost::create().unwrap();
    let connector = connector().publish_wait(Duration::from_secs(2));
    let mut src = Node::start(Service::new("src"), &vhost, connector).await;
    rabbitmqctl(&["clear_permissions", "-p", vhost.name(), "guest"]).await;
    rabbitmqctl(&["close_all_connections", "--vhost", vhost.name(), "test"]).await;

    let started = std::time::Instant::now();
    let lost = src.emit("src", "evt", &json!({"n": 1}));
    src.run_until("the publish given up", WAIT, |node| node.emitted_ok(lost).is_some()).await;
    let result = &src.emitted[0].1;
    assert!(matches!(result, Err(microfw_core::PublishError::LinkDown(_))), "{result:?}");
    assert!(started.elapsed() >= Duration::from_millis(1900), "gave up after {:?}", started.elapsed());

    rabbitmqctl(&["set_permissions", "-p", vhost.name(), "guest", ".*", ".*", ".*"]).await;
    let sent = src.emit("src", "evt", &json!({"n": 2}));
    src.run_until("the publish confirmed", WAIT, |node| node.emitted_ok(sent).is_some()).await;
    // It may have been handed over before the reconnect and waited, or after it.
    assert_eq!(src.emitted_ok(sent), Some(true), "{:?}", src.emitted);
    src.stop().await;
}

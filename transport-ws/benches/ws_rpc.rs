//! WebSocket RPC round trips: microfw (WsServer link + a real Engine + WsRpcClient) against
//! raw tokio-tungstenite echoing the same JSON, in the same run.
//!
//! Run: `cargo bench -p microfw-transport-ws --features tokio --bench ws_rpc`
//! (`BENCH_N` scales the counts; default 1 = 3,000 sequential calls and 30,000 calls at 64
//! in flight per run.)
//!
//! Settings: loopback, TCP_NODELAY everywhere, one connection per variant, no TLS, no token.
//! microfw: one context, async handler `echo(x) -> x`, budget 256 (prefetch 256), the Engine
//! driven by the test harness's driver thread (tests/common: std channel wake-ups; runtime-tokio
//! will have its own driver), tokio multi-thread runtime with 2 workers. Raw: a tokio-tungstenite
//! server task per connection that parses the request and writes
//! `{"data": args[0], "exception": null, "id": id}`; the raw client pipelines 64 requests with
//! a semaphore. Variants run interleaved (A B C D, 3 repeats after a warm-up); medians and
//! ratios are printed.
#![allow(clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use microfw_core::extract::Params;
use microfw_core::{Reply, Route, RunnerContext, Service, WsRpcListener};
use microfw_transport_ws::ServerOptions;
use microfw_transport_ws::tokio::{ClientOptions, WsRpcClient, WsServer};
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

fn payload() -> Value {
    json!({"id": 42, "name": "widget", "tags": ["a", "b"], "price": 9.5})
}

struct Run {
    calls_per_sec: f64,
    p50_us: f64,
    p99_us: f64,
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

fn summarize(total: Duration, n: usize, mut latencies: Vec<Duration>) -> Run {
    latencies.sort();
    let (p50_us, p99_us) = if latencies.is_empty() {
        (0.0, 0.0)
    } else {
        (percentile(&latencies, 0.5), percentile(&latencies, 0.99))
    };
    Run { calls_per_sec: n as f64 / total.as_secs_f64(), p50_us, p99_us }
}

// ---------------------------------------------------------------------------------------------
// microfw.

async fn microfw_sequential(client: &WsRpcClient, n: usize) -> Run {
    let mut latencies = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        client.call("echo", vec![payload()], Map::new()).await.unwrap();
        latencies.push(t.elapsed());
    }
    summarize(start.elapsed(), n, latencies)
}

async fn microfw_in_flight(client: &WsRpcClient, n: usize, window: usize) -> Run {
    let start = Instant::now();
    let per_task = n / window;
    let tasks: Vec<_> = (0..window)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                for _ in 0..per_task {
                    client.call("echo", vec![payload()], Map::new()).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    summarize(start.elapsed(), per_task * window, Vec::new())
}

// ---------------------------------------------------------------------------------------------
// Raw tokio-tungstenite.

async fn raw_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            stream.set_nodelay(true).unwrap();
            tokio::spawn(async move {
                let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
                while let Some(Ok(Message::Text(text))) = ws.next().await {
                    let request: Value = serde_json::from_str(text.as_str()).unwrap();
                    let reply =
                        json!({"data": request["command_args"][0], "exception": null, "id": request["id"]});
                    ws.send(Message::text(reply.to_string())).await.unwrap();
                }
            });
        }
    });
    format!("ws://{addr}")
}

type RawWs = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn raw_connect(url: &str) -> RawWs {
    let (ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true).await.unwrap();
    ws
}

fn raw_request(id: usize) -> String {
    json!({"command": "echo", "command_args": [payload()], "command_kwargs": {}, "id": id}).to_string()
}

async fn raw_sequential(ws: &mut RawWs, n: usize) -> Run {
    let mut latencies = Vec::with_capacity(n);
    let start = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        ws.send(Message::text(raw_request(i))).await.unwrap();
        let Some(Ok(Message::Text(reply))) = ws.next().await else { panic!("raw reply") };
        let _: Value = serde_json::from_str(reply.as_str()).unwrap();
        latencies.push(t.elapsed());
    }
    summarize(start.elapsed(), n, latencies)
}

async fn raw_in_flight(ws: RawWs, n: usize, window: usize) -> (Run, RawWs) {
    let (mut sink, mut stream) = ws.split();
    let permits = Arc::new(Semaphore::new(window));
    let start = Instant::now();
    let sender = {
        let permits = permits.clone();
        tokio::spawn(async move {
            for i in 0..n {
                permits.acquire().await.unwrap().forget();
                sink.send(Message::text(raw_request(i))).await.unwrap();
            }
            sink
        })
    };
    for _ in 0..n {
        let Some(Ok(Message::Text(reply))) = stream.next().await else { panic!("raw reply") };
        let _: Value = serde_json::from_str(reply.as_str()).unwrap();
        permits.add_permits(1);
    }
    let sink = sender.await.unwrap();
    let run = summarize(start.elapsed(), n, Vec::new());
    (run, sink.reunite(stream).unwrap())
}

// ---------------------------------------------------------------------------------------------

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let scale: usize = std::env::var("BENCH_N").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let (sequential_n, in_flight_n, window, repeats) = (3_000 * scale, 30_000 * scale, 64, 3);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async move {
        let echo = Route::new(WsRpcListener, "echo", |Params((x,)): Params<(Value,)>| async move { Reply(x) });
        let service = Service::new("bench").context(RunnerContext::new(256).route(echo));
        let svc = common::start(service, WsServer::new(ServerOptions::default())).await;
        let client = WsRpcClient::connect(&svc.url(), ClientOptions::default()).await.unwrap();
        let raw_url = raw_server().await;
        let mut raw = Some(raw_connect(&raw_url).await);
        // The two mixed pairs split the cost: our client against the raw server, and a raw
        // client against our server (link + Engine + harness driver).
        let client_to_raw = WsRpcClient::connect(&raw_url, ClientOptions::default()).await.unwrap();
        let mut raw_to_ours = raw_connect(&svc.url()).await;

        // Warm-up.
        microfw_sequential(&client, 300).await;
        raw_sequential(raw.as_mut().unwrap(), 300).await;

        let mut ours_seq = Vec::new();
        let mut raw_seq = Vec::new();
        let mut ours_par = Vec::new();
        let mut raw_par = Vec::new();
        let mut mixed = Vec::new();
        for round in 0..repeats {
            let a = microfw_sequential(&client, sequential_n).await;
            let b = raw_sequential(raw.as_mut().unwrap(), sequential_n).await;
            let c = microfw_in_flight(&client, in_flight_n, window).await;
            let (d, ws) = raw_in_flight(raw.take().unwrap(), in_flight_n, window).await;
            raw = Some(ws);
            println!(
                "round {round}: sequential microfw {:>8.0}/s (p50 {:>6.1} us, p99 {:>7.1} us) raw {:>8.0}/s (p50 {:>6.1} us, p99 {:>7.1} us) | {window} in flight microfw {:>8.0}/s raw {:>8.0}/s",
                a.calls_per_sec, a.p50_us, a.p99_us, b.calls_per_sec, b.p50_us, b.p99_us, c.calls_per_sec, d.calls_per_sec
            );
            let e = microfw_sequential(&client_to_raw, sequential_n).await;
            let f = raw_sequential(&mut raw_to_ours, sequential_n).await;
            println!(
                "round {round}: sequential microfw client -> raw server {:>8.0}/s (p50 {:>6.1} us) | raw client -> microfw server {:>8.0}/s (p50 {:>6.1} us)",
                e.calls_per_sec, e.p50_us, f.calls_per_sec, f.p50_us
            );
            mixed.push((e.calls_per_sec, f.calls_per_sec));
            ours_seq.push(a);
            raw_seq.push(b);
            ours_par.push(c.calls_per_sec);
            raw_par.push(d.calls_per_sec);
        }
        let m = |runs: &[Run], f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
        let (os, rs) = (m(&ours_seq, |r| r.calls_per_sec), m(&raw_seq, |r| r.calls_per_sec));
        let (op, rp) = (median(ours_par), median(raw_par));
        println!("median sequential: microfw {os:.0}/s (p50 {:.1} us, p99 {:.1} us), raw {rs:.0}/s (p50 {:.1} us, p99 {:.1} us), ratio microfw/raw {:.2}",
            m(&ours_seq, |r| r.p50_us), m(&ours_seq, |r| r.p99_us), m(&raw_seq, |r| r.p50_us), m(&raw_seq, |r| r.p99_us), os / rs);
        println!("median {window} in flight: microfw {op:.0}/s, raw {rp:.0}/s, ratio microfw/raw {:.2}", op / rp);
        let (e, f) = (median(mixed.iter().map(|m| m.0).collect()), median(mixed.iter().map(|m| m.1).collect()));
        println!("median sequential mixed: microfw client -> raw server {e:.0}/s, raw client -> microfw server {f:.0}/s");
        drop(client);
        svc.stop().await;
    });
}

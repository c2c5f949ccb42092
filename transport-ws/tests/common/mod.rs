//! Test harness: a real core Engine driven over the WebSocket server link by a small driver
//! thread (drain actions -> link ops, exchange, feed the inbox back), handlers run on their
//! own threads, and a raw tokio-tungstenite client.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use microfw_core::config::Config;
use microfw_core::extract::Params;
use microfw_core::link::{Arrivals, Link, LinkSpec, LinkWaker, Links};
use microfw_core::{
    Action, DispatchId, Engine, EngineConfig, HandlerError, HandlerTable, Instant, Outcome, Reply, Route,
    RunnerContext, Service, Transport, WsRpcListener,
};
use microfw_transport_ws::WsServerHandle;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Every await on a socket in these tests is bounded by this.
pub const T: Duration = Duration::from_secs(10);

/// Awaits `f` at most [`T`], panicking with `what` when it takes longer.
pub async fn within<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(T, f).await {
        Ok(out) => out,
        Err(_) => panic!("timed out: {what}"),
    }
}

/// Waits (at most [`T`]) until `cond` holds, re-checking every few milliseconds: for state
/// another task changes with no event to await (a connection count after a close).
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    within(what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Handlers.

/// Lets a test hold handler runs and release them by key, and see which have started.
#[derive(Clone, Default)]
pub struct Gate(Arc<(Mutex<GateState>, Condvar)>);

#[derive(Default)]
struct GateState {
    started: HashSet<String>,
    open: HashSet<String>,
}

impl Gate {
    /// Called by a handler: records `key` as started, then blocks until it is opened (false
    /// after [`T`] without it).
    pub fn pass(&self, key: &str) -> bool {
        let (lock, cv) = &*self.0;
        let mut s = lock.lock().unwrap();
        s.started.insert(key.to_owned());
        cv.notify_all();
        let (s, _) = cv.wait_timeout_while(s, T, |s| !s.open.contains(key)).unwrap();
        s.open.contains(key)
    }

    /// Lets the run(s) holding `key` finish.
    pub fn open(&self, key: &str) {
        let (lock, cv) = &*self.0;
        lock.lock().unwrap().open.insert(key.to_owned());
        cv.notify_all();
    }

    pub fn has_started(&self, key: &str) -> bool {
        self.0.0.lock().unwrap().started.contains(key)
    }

    /// Waits (blocking, at most [`T`]) until `key` started.
    pub fn wait_started(&self, key: &str) -> bool {
        let (lock, cv) = &*self.0;
        let s = lock.lock().unwrap();
        let (s, _) = cv.wait_timeout_while(s, T, |s| !s.started.contains(key)).unwrap();
        s.started.contains(key)
    }

    /// As [`wait_started`](Self::wait_started), from async code.
    pub async fn started(&self, key: &str) {
        let gate = self.clone();
        let key = key.to_owned();
        let ok = tokio::task::spawn_blocking(move || gate.wait_started(&key)).await.unwrap();
        assert!(ok, "handler never started");
    }
}

/// `add`'s parameters: two required, one optional.
#[derive(Deserialize)]
pub struct AddArgs {
    pub a: i64,
    pub b: i64,
    #[serde(default)]
    pub c: Option<i64>,
}

/// The test service `svc`: `add(a, b, c=None)`, `wait(key)` (held by the gate, replies the
/// key), `fail()` (raises ValueError), in one context with `budget` workers.
pub fn service(gate: &Gate, budget: u32) -> Service<()> {
    let gate = gate.clone();
    let add = Route::blocking(WsRpcListener, "add", |Params(x): Params<AddArgs>| {
        Reply(x.a + x.b + x.c.unwrap_or(0))
    })
    .doc("Adds a and b, and c when given.");
    let wait = Route::blocking(WsRpcListener, "wait", move |Params((key,)): Params<(String,)>| {
        if gate.pass(&key) {
            Ok(Reply(key))
        } else {
            Err(HandlerError::fatal("TimeoutError", "gate never opened"))
        }
    });
    let fail = Route::blocking(WsRpcListener, "fail", |Params(()): Params<()>| -> Result<(), HandlerError> {
        Err(HandlerError::fatal("ValueError", "bad value"))
    });
    Service::new("svc").context(RunnerContext::new(budget).route(add).route(wait).route(fail))
}

// ---------------------------------------------------------------------------------------------
// The driver.

enum Input {
    Wake,
    Outcome(DispatchId, Outcome),
    Shutdown,
}

/// A service running over a WebSocket server link.
pub struct Running {
    pub addr: SocketAddr,
    pub handle: WsServerHandle,
    inputs: mpsc::Sender<Input>,
    thread: Option<std::thread::JoinHandle<usize>>,
}

impl Running {
    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// Begins the Engine's graceful shutdown (the driver closes the link when it stopped).
    pub fn shutdown(&self) {
        let _ = self.inputs.send(Input::Shutdown);
    }

    /// Shuts down and waits for the driver; returns the work left unfinished.
    pub async fn stop(mut self) -> usize {
        self.shutdown();
        let thread = self.thread.take().unwrap();
        within("driver stop", tokio::task::spawn_blocking(move || thread.join().unwrap())).await.unwrap()
    }
}

impl Running {
    /// [`stop`](Self::stop), blocking (at most [`T`]).
    pub fn stop_blocking(mut self) -> usize {
        self.shutdown();
        let thread = self.thread.take().unwrap();
        let (done, wait) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = done.send(thread.join().unwrap());
        });
        wait.recv_timeout(T).expect("driver stop")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.inputs.send(Input::Shutdown);
    }
}

/// Connects a tokio `server` for `service` (on 127.0.0.1, any port) and starts the driver
/// thread; async handlers run on the current runtime.
#[cfg(feature = "tokio")]
pub async fn start(service: Service<()>, server: microfw_transport_ws::tokio::WsServer) -> Running {
    use microfw_core::link::ConnectAsync;
    let handle = server.handle();
    let (spec, handlers) = service.build().unwrap();
    let (tx, rx, waker) = channels();
    let link = within("connect", Box::new(server).connect(link_spec(&spec), waker.clone())).await.unwrap();
    let runtime = Some(tokio::runtime::Handle::current());
    launch(spec, handlers, link, handle, (tx, rx, waker), runtime)
}

/// Connects a blocking `server` for `service` and starts the driver thread (blocking
/// handlers only).
#[cfg(feature = "sync")]
pub fn start_sync(service: Service<()>, server: microfw_transport_ws::sync::WsServer) -> Running {
    use microfw_core::link::Connect;
    let handle = server.handle();
    let (spec, handlers) = service.build().unwrap();
    let (tx, rx, waker) = channels();
    let link = Box::new(server).connect(&link_spec(&spec), waker.clone()).unwrap();
    launch(spec, handlers, link, handle, (tx, rx, waker), None)
}

fn link_spec(spec: &microfw_core::ServiceSpec) -> LinkSpec {
    let config = Config { websocket_ip: "127.0.0.1".into(), websocket_port: 0, ..Config::default() };
    LinkSpec { service: spec.name.to_string(), transport: Transport::WebSocket, config }
}

type Channels = (mpsc::Sender<Input>, mpsc::Receiver<Input>, LinkWaker);

fn channels() -> Channels {
    let (tx, rx) = mpsc::channel();
    let wake = tx.clone();
    let waker = LinkWaker::new(move || {
        let _ = wake.send(Input::Wake);
    });
    (tx, rx, waker)
}

fn launch(
    spec: microfw_core::ServiceSpec,
    handlers: HandlerTable<()>,
    link: Box<dyn Link>,
    handle: WsServerHandle,
    (tx, rx, waker): Channels,
    runtime: Option<tokio::runtime::Handle>,
) -> Running {
    let outcomes = tx.clone();
    let thread = std::thread::spawn(move || drive(spec, handlers, link, waker, rx, outcomes, runtime));
    Running { addr: handle.local_addr().unwrap(), handle, inputs: tx, thread: Some(thread) }
}

struct Clock {
    base: std::time::Instant,
    unix: Instant,
}

impl Clock {
    fn new() -> Self {
        let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        Clock { base: std::time::Instant::now(), unix: Instant::from_unix_nanos(since.as_nanos() as u64) }
    }

    fn now(&self) -> Instant {
        self.unix + self.base.elapsed()
    }
}

fn drive(
    spec: microfw_core::ServiceSpec,
    handlers: HandlerTable<()>,
    link: Box<dyn Link>,
    waker: LinkWaker,
    inputs: mpsc::Receiver<Input>,
    outcomes: mpsc::Sender<Input>,
    runtime: Option<tokio::runtime::Handle>,
) -> usize {
    let config =
        EngineConfig { seed: 7, shutdown_timeout: Duration::from_secs(5), ..EngineConfig::default() };
    let mut engine = Engine::new(&spec, config);
    let mut links = Links::new();
    links.add(&[Transport::WebSocket], link);
    let handlers = Arc::new(handlers);
    let clock = Clock::new();
    engine.handle_start(clock.now());
    let mut arrivals = Arrivals::default();
    let mut stopped = None;
    loop {
        while let Some(action) = engine.poll_action() {
            match links.route(action, &mut arrivals) {
                Some(Action::Dispatch(d)) => run(d, &handlers, &outcomes, &runtime),
                Some(Action::Stopped { unfinished }) => stopped = Some(unfinished),
                _ => {}
            }
        }
        let now = clock.now();
        waker.take();
        links.exchange(now, true, &mut arrivals);
        let moved = arrivals.feed(&mut engine, now);
        if engine.poll_timeout().is_some_and(|t| t <= now) {
            engine.handle_timeout(now);
            continue;
        }
        if moved {
            continue;
        }
        if let Some(unfinished) = stopped {
            links.close(Duration::from_secs(5));
            return unfinished;
        }
        let wait = engine.poll_timeout().map_or(Duration::from_secs(1), |t| t.saturating_duration_since(now));
        match inputs.recv_timeout(wait) {
            Ok(Input::Outcome(id, outcome)) => engine.handle_outcome(clock.now(), id, outcome),
            Ok(Input::Wake) => {}
            Ok(Input::Shutdown) | Err(RecvTimeoutError::Disconnected) => engine.handle_shutdown(clock.now()),
            Err(RecvTimeoutError::Timeout) => engine.handle_timeout(clock.now()),
        }
    }
}

fn run(
    d: microfw_core::Dispatch,
    handlers: &Arc<HandlerTable<()>>,
    outcomes: &mpsc::Sender<Input>,
    runtime: &Option<tokio::runtime::Handle>,
) {
    let outcomes = outcomes.clone();
    let Some(handler) = handlers.handler(d.route).cloned() else {
        let _ = outcomes.send(Input::Outcome(d.id, Outcome::Panicked("no handler".into())));
        return;
    };
    if handler.is_blocking() {
        std::thread::spawn(move || {
            let outcome =
                handler.call_blocking(d.job, ()).unwrap_or(Outcome::Panicked("not blocking".into()));
            let _ = outcomes.send(Input::Outcome(d.id, outcome));
        });
    } else if let Some(runtime) = runtime {
        runtime.spawn(async move {
            let outcome = match handler.call_async(d.job, ()) {
                Some(future) => future.await,
                None => Outcome::Panicked("not async".into()),
            };
            let _ = outcomes.send(Input::Outcome(d.id, outcome));
        });
    } else {
        let _ =
            outcomes.send(Input::Outcome(d.id, Outcome::Panicked("async handler without a runtime".into())));
    }
}

// ---------------------------------------------------------------------------------------------
// A raw client.

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Opens a raw WebSocket connection to `url` (a request may carry headers).
pub async fn raw<R>(request: R) -> Result<Ws, tokio_tungstenite::tungstenite::Error>
where
    R: tokio_tungstenite::tungstenite::client::IntoClientRequest + Unpin,
{
    within("raw connect", tokio_tungstenite::connect_async(request)).await.map(|(ws, _)| ws)
}

pub async fn send(ws: &mut Ws, text: &str) {
    within("send", ws.send(Message::text(text))).await.unwrap();
}

/// The next text frame, as JSON (panics on anything else).
pub async fn recv(ws: &mut Ws) -> Value {
    loop {
        match within("recv", ws.next()).await {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(t.as_str()).unwrap(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// A success reply's JSON, with the id when given.
pub fn ok(data: Value, id: Option<Value>) -> Value {
    let mut v = json!({"data": data, "exception": null});
    if let Some(id) = id {
        v["id"] = id;
    }
    v
}

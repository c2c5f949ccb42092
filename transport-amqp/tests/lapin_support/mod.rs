//! A small driver for the lapin link tests: one real core Engine over one `AmqpConnector`
//! link, with handler outcomes decided by the test. It does what a runtime's driver does:
//! drain the Engine's actions into link operations ([`Links`]), exchange with the link when
//! woken, feed deliveries and confirms back, and fire the Engine's timeouts.

#![allow(dead_code, unreachable_pub)]

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use microfw_core::config::{AmqpUri, Config};
use microfw_core::extract::{JobInput, PayloadData};
use microfw_core::link::{Arrivals, ConnectAsync, LinkSpec, LinkWaker, Links};
use microfw_core::{
    Action, CallError, CallId, Dispatch, EngineConfig, EngineEvent, Instant, Outcome, PublishError,
    PublishId, Service, Transport,
};
use microfw_core::{Engine, OutgoingCall, OutgoingEvent};
use microfw_tests::{QueueInfo, TestVhost};
use microfw_transport_amqp::AmqpConnector;
use serde_json::Value;
use tokio::sync::Notify;

/// Every wait on the broker gives up after this.
pub const WAIT: Duration = Duration::from_secs(20);

/// The wall clock as the Engine's instant (tests only: runtimes own the clock).
pub fn now() -> Instant {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    Instant::from_unix_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// A seed no other Engine of this process uses (reply routing keys come from it).
fn seed() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    (u64::from(nanos) << 20) ^ NEXT.fetch_add(1, Ordering::Relaxed) ^ u64::from(std::process::id())
}

/// A connector with fast reconnects for tests.
pub fn connector() -> AmqpConnector {
    AmqpConnector::new().reconnect_backoff(Duration::from_millis(100), Duration::from_millis(500))
}

/// Decides the outcome of each dispatch as it is made (None: leave it running).
pub type Handler = Box<dyn FnMut(&str, &Dispatch) -> Option<Outcome> + Send>;

/// One Engine and its AMQP link.
pub struct Node {
    pub engine: Engine,
    links: Links,
    waker: LinkWaker,
    notify: Arc<Notify>,
    arrivals: Arrivals,
    /// Dispatches the handler left running (or all of them without a handler).
    pub dispatches: VecDeque<Dispatch>,
    /// Every dispatch made, with its route name and input as JSON.
    pub runs: Vec<(String, u32, Value)>,
    pub resolved: Vec<(CallId, Result<Value, CallError>)>,
    pub emitted: Vec<(PublishId, Result<(), PublishError>)>,
    pub events: Vec<EngineEvent>,
    pub stopped: bool,
    handler: Option<Handler>,
}

impl Node {
    /// Connects `service` to the vhost, starts its Engine and waits for the link's barrier
    /// (consumers running).
    pub async fn start(service: Service<()>, vhost: &TestVhost, connector: AmqpConnector) -> Node {
        Node::try_start(service, vhost, connector).await.expect("node start")
    }

    pub async fn try_start(
        service: Service<()>,
        vhost: &TestVhost,
        connector: AmqpConnector,
    ) -> Result<Node, String> {
        let (spec, _) = service.build().map_err(|e| e.to_string())?;
        let config = Config {
            amqp_uri: Some(AmqpUri::new(vhost.amqp_uri()).map_err(|e| e.to_string())?),
            amqp_heartbeat: Duration::from_secs(5),
            ..Config::default()
        };
        let notify = Arc::new(Notify::new());
        let n = notify.clone();
        let waker = LinkWaker::new(move || n.notify_one());
        let link_spec = LinkSpec { service: spec.name.to_string(), transport: Transport::Broker, config };
        let link = tokio::time::timeout(WAIT, Box::new(connector).connect(link_spec, waker.clone()))
            .await
            .map_err(|_| "connect timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        let mut links = Links::new();
        links.add(&[Transport::Broker], link);
        let engine = Engine::new(&spec, EngineConfig { seed: seed(), ..EngineConfig::default() });
        let mut node = Node {
            engine,
            links,
            waker,
            notify,
            arrivals: Arrivals::default(),
            dispatches: VecDeque::new(),
            runs: Vec::new(),
            resolved: Vec::new(),
            emitted: Vec::new(),
            events: Vec::new(),
            stopped: false,
            handler: None,
        };
        node.engine.handle_start(now());
        node.pump();
        let barriers = node.links.barriers();
        tokio::task::spawn_blocking(move || barriers.into_iter().try_for_each(|b| b.wait(WAIT)))
            .await
            .map_err(|e| e.to_string())??;
        Ok(node)
    }

    /// Answers every dispatch with `handler` from now on.
    pub fn with_handler(
        mut self,
        handler: impl FnMut(&str, &Dispatch) -> Option<Outcome> + Send + 'static,
    ) -> Self {
        self.handler = Some(Box::new(handler));
        self
    }

    /// Drains the Engine, exchanges with the link and feeds what arrived, until nothing moves.
    pub fn pump(&mut self) {
        loop {
            let now = now();
            let mut moved = false;
            while let Some(action) = self.engine.poll_action() {
                moved = true;
                match self.links.route(action, &mut self.arrivals) {
                    None => {}
                    Some(Action::Dispatch(d)) => {
                        let name =
                            self.engine.route(d.job.parts.route).map(|r| r.name.clone()).unwrap_or_default();
                        self.runs.push((
                            name.clone(),
                            d.job.parts.attempt.retry_count,
                            input_json(&d.job.input),
                        ));
                        let outcome = self.handler.as_mut().and_then(|h| h(&name, &d));
                        match outcome {
                            Some(outcome) => self.engine.handle_outcome(now, d.id, outcome),
                            None => self.dispatches.push_back(d),
                        }
                    }
                    Some(Action::Resolve { call, result }) => self.resolved.push((call, result)),
                    Some(Action::Emitted { id, result }) => self.emitted.push((id, result)),
                    Some(Action::Event(e)) => self.events.push(e),
                    Some(Action::Stopped { .. }) => self.stopped = true,
                    Some(other) => panic!("unexpected action {other:?}"),
                }
            }
            self.waker.take();
            self.links.exchange(now, true, &mut self.arrivals);
            moved |= self.arrivals.feed(&mut self.engine, now);
            if self.engine.poll_timeout().is_some_and(|t| t <= now) {
                moved = true;
                self.engine.handle_timeout(now);
            }
            if !moved {
                return;
            }
        }
    }

    /// Runs the node until `done` holds; panics naming `what` after `limit`.
    pub async fn run_until(&mut self, what: &str, limit: Duration, mut done: impl FnMut(&mut Node) -> bool) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            self.pump();
            if done(self) {
                return;
            }
            self.wait_a_turn(deadline, what).await;
        }
    }

    /// Waits for a wake-up, the Engine's next deadline or `deadline` (then panics).
    async fn wait_a_turn(&mut self, deadline: tokio::time::Instant, what: &str) {
        let timer = self
            .engine
            .poll_timeout()
            .map(|t| t.saturating_duration_since(now()))
            .unwrap_or(Duration::from_secs(3600));
        tokio::select! {
            _ = self.notify.notified() => {}
            _ = tokio::time::sleep(timer) => {}
            _ = tokio::time::sleep_until(deadline) => panic!(
                "timed out waiting for {what}; runs {:?}, events {:?}, resolved {:?}, emitted {}",
                self.runs, self.events, self.resolved, self.emitted.len()
            ),
        }
    }

    /// Runs the node for `period` (a serving node in a test that drives another).
    pub async fn run_for(&mut self, period: Duration) {
        let end = tokio::time::Instant::now() + period;
        loop {
            self.pump();
            let timer = self
                .engine
                .poll_timeout()
                .map(|t| t.saturating_duration_since(now()))
                .unwrap_or(Duration::from_secs(3600));
            tokio::select! {
                _ = self.notify.notified() => {}
                _ = tokio::time::sleep(timer) => {}
                _ = tokio::time::sleep_until(end) => return,
            }
        }
    }

    /// Serves on a task of its own until `stop` is notified; returns the node.
    pub fn serve(mut self, stop: Arc<Notify>) -> tokio::task::JoinHandle<Node> {
        tokio::spawn(async move {
            loop {
                self.pump();
                let timer = self
                    .engine
                    .poll_timeout()
                    .map(|t| t.saturating_duration_since(now()))
                    .unwrap_or(Duration::from_secs(3600));
                tokio::select! {
                    _ = self.notify.notified() => {}
                    _ = tokio::time::sleep(timer) => {}
                    _ = stop.notified() => return self,
                }
            }
        })
    }

    pub fn emit(&mut self, source: &str, event_type: &str, payload: &Value) -> PublishId {
        let id = self.engine.handle_emit(
            now(),
            OutgoingEvent {
                context: None,
                source_service: source.into(),
                event_type: event_type.into(),
                payload: serde_json::to_vec(payload).expect("json").into(),
                dialect: microfw_core::Dialect::Nameko,
            },
        );
        self.pump();
        id
    }

    pub fn call(&mut self, call: OutgoingCall) -> CallId {
        let id = self.engine.handle_call(now(), call);
        self.pump();
        id
    }

    pub fn emitted_ok(&self, id: PublishId) -> Option<bool> {
        self.emitted.iter().find(|(i, _)| *i == id).map(|(_, r)| r.is_ok())
    }

    pub fn resolution(&self, id: CallId) -> Option<&Result<Value, CallError>> {
        self.resolved.iter().find(|(c, _)| *c == id).map(|(_, r)| r)
    }

    /// Closes the links (blocking, off this task) without stopping the Engine first.
    pub async fn close_links(&mut self, timeout: Duration) {
        let mut links = std::mem::take(&mut self.links);
        tokio::task::spawn_blocking(move || links.close(timeout)).await.expect("close");
    }

    /// Stops the Engine gracefully, then closes the links.
    pub async fn stop(&mut self) {
        self.engine.handle_shutdown(now());
        self.run_until("Stopped", WAIT, |n| n.stopped).await;
        self.close_links(Duration::from_secs(5)).await;
    }
}

/// A job's input as JSON (events: the body; RPC: `[args, kwargs]`).
pub fn input_json(input: &JobInput) -> Value {
    match input {
        JobInput::Payload(PayloadData::Raw(raw)) | JobInput::Payload(PayloadData::Decoded { raw, .. }) => {
            serde_json::from_slice(raw).unwrap_or(Value::Null)
        }
        JobInput::Payload(PayloadData::Json(v)) => v.clone(),
        JobInput::Rpc { args, kwargs } => {
            Value::Array(vec![Value::Array(args.clone()), Value::Object(kwargs.clone())])
        }
        JobInput::None => Value::Null,
    }
}

/// Polls the vhost (blocking, off the runtime) until `pred` holds for queue `name`.
pub async fn wait_queue(
    vhost: &TestVhost,
    name: &str,
    what: &str,
    pred: impl Fn(&QueueInfo) -> bool,
) -> QueueInfo {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let queues = tokio::task::block_in_place(|| vhost.queues()).expect("list_queues");
        if let Some(q) = queues.iter().find(|q| q.name == name && pred(q)) {
            return q.clone();
        }
        assert!(std::time::Instant::now() < deadline, "queue {name}: {what} not seen; queues {queues:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs `rabbitmqctl` with `args` (blocking, off the runtime), killing it after a minute.
pub async fn rabbitmqctl(args: &[&str]) {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let status = tokio::task::spawn_blocking(move || {
        let program = std::env::var("RABBITMQCTL").unwrap_or_else(|_| "rabbitmqctl".to_owned());
        let mut child = std::process::Command::new(program)
            .args(&args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("rabbitmqctl starts");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return Some(status);
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .expect("join");
    assert!(status.is_some_and(|s| s.success()), "rabbitmqctl failed or timed out: {status:?}");
}

//! The WebSocket RPC server's bookkeeping, shared by both IO halves: which connection each
//! request came from, which requests the Engine holds (its prefetch), the bounded wait queue
//! behind it, and how the Engine's link operations turn into reply frames.
//!
//! [`ServerState`] is a plain value; an IO half keeps it behind a mutex shared by its
//! connection readers and its [`Link`](microfw_core::link::Link), and calls:
//!
//! * [`open`](ServerState::open) when an upgrade succeeded, with the [`FrameSink`] that
//!   writes to that connection; [`request`](ServerState::request) for each decoded frame;
//!   [`closed`](ServerState::closed) when the connection is gone;
//! * [`exchange`](ServerState::exchange) from the link's `exchange`;
//! * [`stop`](ServerState::stop) from the link's `close`.
//!
//! Rules:
//! * A request the Engine may take (a prefetch slot is free and nobody waits) becomes a
//!   [`Delivery`] on the `Source::WsRpc` subscription at once: `reply_to` names the
//!   connection, `correlation_id` is the delivery tag. Otherwise it waits in the queue
//!   (at most [`ServerOptions::max_waiting`]), else it is answered `MaxConnectionsReached`.
//!   Before the subscription starts, every request waits.
//! * The Engine's reply (`Publish` to `Destination::Reply` on the WebSocket transport) is
//!   encoded with the request's id and released through the connection's [`Lane`]; it is
//!   confirmed at once (or failed when the connection is gone). The slot is freed by the
//!   delivery's `Ack` / `Reject`, which also admits the next waiting request.
//! * A delivery settled without a reply gets one, so a sequential lane never blocks:
//!   [`shutting_down`] for a `Reject` (the call never ran), [`service_stopped`] for an `Ack`.
//! * Each request gets exactly one reply frame, through the connection's sink, in the lane's
//!   order. Frames for a connection that closed are dropped.
//!
//! What it does NOT do: IO, decoding (the caller decodes frames first, outside its lock),
//! size limits, authentication, idle timers, or counting connections for the gauge.

use std::collections::{HashMap, VecDeque};

use microfw_core::link::{LinkInbox, LinkOp, LinkWaker};
use microfw_core::{
    Delivery, DeliveryTag, Destination, LinkId, Publish, PublishError, RemoteError, Source, SubscriptionId,
    Transport,
};

use crate::lane::{Lane, Ticket};
use crate::options::{ServerOptions, service_stopped, shutting_down};
use crate::reply::{encode_error, encode_reply_envelope, max_connections_reached};
use crate::request::{RequestError, RequestId, WsRequest};

/// Writes frames to one connection, without blocking (the IO half queues them for the
/// connection's writer). Frames for a connection that is gone may be dropped.
pub trait FrameSink: Send + 'static {
    /// Queues one text frame.
    fn send(&self, frame: String);
}

/// A connection of a [`ServerState`], numbered from 1 in opening order.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(u64);

impl ConnId {
    /// The raw number.
    pub const fn into_raw(self) -> u64 {
        self.0
    }

    /// The `reply_to` the connection's requests carry (`ws-<n>`).
    pub fn reply_to(self) -> String {
        format!("ws-{}", self.0)
    }
}

/// Counters, for tests and logs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionStats {
    /// Open connections.
    pub connections: usize,
    /// Deliveries handed to the Engine and not yet settled.
    pub in_engine: usize,
    /// Requests waiting for a prefetch slot.
    pub waiting: usize,
    /// Requests answered `MaxConnectionsReached` because the wait queue was full.
    pub refused: u64,
}

/// The server's state. See the [module docs](self).
#[derive(Debug)]
pub struct ServerState<S> {
    service: String,
    waker: LinkWaker,
    max_waiting: usize,
    subscription: Option<(SubscriptionId, u32)>,
    stopping: bool,
    conns: HashMap<ConnId, Conn<S>>,
    next_conn: u64,
    in_engine: HashMap<u64, InEngine>,
    waiting: VecDeque<Waiting>,
    next_tag: u64,
    deliveries: Vec<Delivery>,
    refused: u64,
}

#[derive(Debug)]
struct Conn<S> {
    sink: S,
    lane: Lane<String>,
    /// Id-less requests waiting for their turn on the lane.
    held: HashMap<Ticket, WsRequest>,
}

#[derive(Debug)]
struct InEngine {
    conn: ConnId,
    ticket: Ticket,
    id: Option<RequestId>,
    replied: bool,
}

#[derive(Debug)]
struct Waiting {
    conn: ConnId,
    ticket: Ticket,
    request: WsRequest,
}

impl<S: FrameSink> ServerState<S> {
    /// An empty server for `service`; `waker` is the driver's (woken when deliveries wait).
    pub fn new(service: impl Into<String>, options: &ServerOptions, waker: LinkWaker) -> Self {
        ServerState {
            service: service.into(),
            waker,
            max_waiting: options.max_waiting,
            subscription: None,
            stopping: false,
            conns: HashMap::new(),
            next_conn: 0,
            in_engine: HashMap::new(),
            waiting: VecDeque::new(),
            next_tag: 0,
            deliveries: Vec::new(),
            refused: 0,
        }
    }

    /// The service served.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// A connection opened; its replies go to `sink`.
    pub fn open(&mut self, sink: S) -> ConnId {
        self.next_conn += 1;
        let id = ConnId(self.next_conn);
        self.conns.insert(id, Conn { sink, lane: Lane::new(), held: HashMap::new() });
        id
    }

    /// A connection is gone: its waiting requests are dropped; its requests inside the Engine
    /// stay until settled (their replies are dropped). Unknown ids are ignored.
    pub fn closed(&mut self, conn: ConnId) {
        if self.conns.remove(&conn).is_some() {
            self.waiting.retain(|w| w.conn != conn);
        }
    }

    /// A frame arrived on `conn`, decoded. A bad frame is answered with its error reply (in
    /// lane order); a request starts now (or when its lane turn comes). Frames of unknown
    /// connections are ignored.
    pub fn request(&mut self, conn: ConnId, frame: Result<WsRequest, RequestError>) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        match frame {
            Err(bad) => {
                let ticket = c.lane.arrive(bad.id.is_some()).ticket;
                self.answer(conn, ticket, bad.reply());
            }
            Ok(request) => {
                let admission = c.lane.arrive(request.id.is_some());
                if admission.start {
                    self.start(conn, admission.ticket, request);
                } else {
                    c.held.insert(admission.ticket, request);
                }
            }
        }
    }

    /// Carries out the link operations meant for this server and hands over what arrived:
    /// `Subscribe` / `Unsubscribe` of the `WsRpc` source (other sources are accepted and never
    /// deliver), `Publish` of replies (confirmed at once; other destinations fail), `Ack` /
    /// `Reject`. Never blocks.
    pub fn exchange(&mut self, ops: &mut Vec<LinkOp>, inbox: &mut LinkInbox) {
        for op in ops.drain(..) {
            match op {
                LinkOp::Subscribe(s) => {
                    if matches!(s.source, Source::WsRpc { .. }) && !self.stopping {
                        self.subscription = Some((s.id, s.prefetch));
                        self.pump();
                    }
                }
                LinkOp::Unsubscribe(id) => {
                    if self.subscription.is_some_and(|(s, _)| s == id) {
                        self.stopping = true;
                        self.refuse_waiting();
                    }
                }
                LinkOp::Publish(p) => {
                    let id = p.id;
                    inbox.confirms.push((id, self.publish(p)));
                }
                LinkOp::Ack(tag) => self.settle(tag, false),
                LinkOp::Reject(tag, _) => self.settle(tag, true),
            }
        }
        inbox.deliveries.append(&mut self.deliveries);
    }

    /// The server stops: nothing more reaches the Engine; waiting requests are answered
    /// [`shutting_down`], requests inside the Engine without a reply [`service_stopped`]
    /// (their later replies are dropped). Connections stay open: closing them is the IO
    /// half's business, after writing what this queued.
    pub fn stop(&mut self) {
        self.stopping = true;
        self.refuse_waiting();
        let unanswered: Vec<u64> =
            self.in_engine.iter().filter(|(_, e)| !e.replied).map(|(tag, _)| *tag).collect();
        for tag in unanswered {
            if let Some(entry) = self.in_engine.get_mut(&tag) {
                entry.replied = true;
                let (conn, ticket, id) = (entry.conn, entry.ticket, entry.id.clone());
                self.answer(conn, ticket, encode_error(&service_stopped(), id.as_ref()));
            }
        }
        self.deliveries.clear();
    }

    /// Requests of `conn` whose replies have not been written yet (0 for unknown ids).
    pub fn pending(&self, conn: ConnId) -> usize {
        self.conns.get(&conn).map_or(0, |c| c.lane.pending())
    }

    /// Counters.
    pub fn stats(&self) -> SessionStats {
        SessionStats {
            connections: self.conns.len(),
            in_engine: self.in_engine.len(),
            waiting: self.waiting.len(),
            refused: self.refused,
        }
    }

    // -----------------------------------------------------------------------------------------
    // Private machinery.

    fn has_slot(&self) -> bool {
        match self.subscription {
            Some((_, prefetch)) => {
                !self.stopping && (prefetch == 0 || self.in_engine.len() < prefetch as usize)
            }
            None => false,
        }
    }

    /// A request whose turn came: to the Engine, the wait queue, or refused.
    fn start(&mut self, conn: ConnId, ticket: Ticket, request: WsRequest) {
        if self.stopping {
            self.answer(conn, ticket, encode_error(&shutting_down(), request.id.as_ref()));
        } else if self.has_slot() && self.waiting.is_empty() {
            self.deliver(conn, ticket, request);
        } else if self.waiting.len() < self.max_waiting {
            self.waiting.push_back(Waiting { conn, ticket, request });
        } else {
            self.refused += 1;
            self.answer(conn, ticket, encode_error(&max_connections_reached(), request.id.as_ref()));
        }
    }

    fn deliver(&mut self, conn: ConnId, ticket: Ticket, request: WsRequest) {
        let Some((subscription, _)) = self.subscription else { return };
        self.next_tag += 1;
        let tag = self.next_tag;
        let id = request.id.clone();
        let envelope = request.into_envelope(conn.reply_to(), tag.to_string());
        self.in_engine.insert(tag, InEngine { conn, ticket, id, replied: false });
        self.deliveries.push(Delivery {
            link: LinkId::from_raw(0),
            tag: DeliveryTag::from_raw(tag),
            subscription,
            redelivered: false,
            envelope,
        });
        self.waker.wake();
    }

    /// Moves waiting requests to the Engine while slots are free.
    fn pump(&mut self) {
        while self.has_slot() {
            let Some(w) = self.waiting.pop_front() else { return };
            self.deliver(w.conn, w.ticket, w.request);
        }
    }

    fn refuse_waiting(&mut self) {
        for w in std::mem::take(&mut self.waiting) {
            self.answer(w.conn, w.ticket, encode_error(&shutting_down(), w.request.id.as_ref()));
        }
    }

    fn publish(&mut self, publish: Publish) -> Result<(), PublishError> {
        if publish.transport != Transport::WebSocket {
            return Err(PublishError::Other("the WebSocket link only carries WebSocket publishes".into()));
        }
        match &publish.destination {
            Destination::Reply { .. } => {}
            Destination::Rpc { .. } => {
                return Err(PublishError::Other(
                    "the WebSocket server link does not make calls: use WsRpcClient".into(),
                ));
            }
            _ => return Err(PublishError::Other("the WebSocket link only publishes RPC replies".into())),
        }
        let tag = publish.envelope.properties.correlation_id.as_deref().and_then(|c| c.parse::<u64>().ok());
        let Some(entry) = tag.and_then(|t| self.in_engine.get_mut(&t)) else {
            return Err(PublishError::Other("no WebSocket request has this correlation id".into()));
        };
        if entry.replied {
            // The server stopped and answered already: this late reply is dropped.
            return Ok(());
        }
        let frame = encode_reply_envelope(&publish.envelope, entry.id.as_ref())
            .map_err(|e| PublishError::Other(e.to_string()))?;
        entry.replied = true;
        let (conn, ticket) = (entry.conn, entry.ticket);
        if !self.conns.contains_key(&conn) {
            return Err(PublishError::LinkDown("the WebSocket connection closed before the reply".into()));
        }
        self.answer(conn, ticket, frame);
        Ok(())
    }

    /// An `Ack` or `Reject` of a delivery: frees its slot, answers it if nobody did.
    fn settle(&mut self, tag: DeliveryTag, rejected: bool) {
        let Some(entry) = self.in_engine.remove(&tag.into_raw()) else { return };
        if !entry.replied {
            let error: RemoteError = if rejected { shutting_down() } else { service_stopped() };
            self.answer(entry.conn, entry.ticket, encode_error(&error, entry.id.as_ref()));
        }
        self.pump();
    }

    /// Completes `ticket` on its lane with `frame`, writes what the lane releases and starts
    /// the id-less requests whose turn comes (which may be answered at once in turn).
    fn answer(&mut self, conn: ConnId, ticket: Ticket, frame: String) {
        let mut next = Some((ticket, frame));
        while let Some((ticket, frame)) = next.take() {
            let Some(c) = self.conns.get_mut(&conn) else { return };
            let Ok(released) = c.lane.complete(ticket, frame) else { return };
            for frame in released.write {
                c.sink.send(frame);
            }
            let Some(turn) = released.start else { continue };
            let Some(request) = c.held.remove(&turn) else { continue };
            // Starting may answer at once (refused, stopping): loop instead of recursing.
            if self.stopping {
                next = Some((turn, encode_error(&shutting_down(), request.id.as_ref())));
            } else if self.has_slot() && self.waiting.is_empty() {
                self.deliver(conn, turn, request);
            } else if self.waiting.len() < self.max_waiting {
                self.waiting.push_back(Waiting { conn, ticket: turn, request });
            } else {
                self.refused += 1;
                next = Some((turn, encode_error(&max_connections_reached(), request.id.as_ref())));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use microfw_core::{Action, Body, Engine, EngineConfig, Instant, PublishId, Subscribe};
    use serde_json::{Value, json};

    use super::*;
    use crate::request::decode_request;

    #[derive(Clone, Default, Debug)]
    struct Sink(Arc<Mutex<Vec<String>>>);

    impl FrameSink for Sink {
        fn send(&self, frame: String) {
            self.0.lock().unwrap().push(frame);
        }
    }

    impl Sink {
        fn take(&self) -> Vec<Value> {
            self.0.lock().unwrap().drain(..).map(|f| serde_json::from_str(&f).unwrap()).collect()
        }
    }

    fn subscribe(prefetch: u32) -> LinkOp {
        LinkOp::Subscribe(Subscribe {
            id: SubscriptionId::from_raw(3),
            transport: Transport::WebSocket,
            source: Source::WsRpc { service: "svc".into() },
            prefetch,
        })
    }

    fn state(max_waiting: usize) -> ServerState<Sink> {
        ServerState::new("svc", &ServerOptions::default().with_max_waiting(max_waiting), LinkWaker::noop())
    }

    fn exchange(s: &mut ServerState<Sink>, ops: Vec<LinkOp>) -> LinkInbox {
        let mut ops = ops;
        let mut inbox = LinkInbox::default();
        s.exchange(&mut ops, &mut inbox);
        inbox
    }

    fn reply_to(delivery: &Delivery, result: Value) -> LinkOp {
        let mut envelope = delivery.envelope.clone();
        envelope.body = Body::Reply(microfw_core::RpcReply { result: Ok(result) });
        LinkOp::Publish(Publish {
            id: PublishId::from_raw(delivery.tag.into_raw()),
            transport: Transport::WebSocket,
            destination: Destination::Reply {
                reply_to: envelope.properties.reply_to.clone().unwrap(),
                dialect: microfw_core::Dialect::MicroFramework,
            },
            mandatory: false,
            envelope,
        })
    }

    fn req(text: &str) -> Result<WsRequest, RequestError> {
        decode_request(text)
    }

    #[test]
    fn requests_wait_for_the_subscription_then_flow_within_the_prefetch() {
        let mut s = state(1);
        let sink = Sink::default();
        let c = s.open(sink.clone());
        s.request(c, req(r#"{"command": "a", "id": 1}"#));
        s.request(c, req(r#"{"command": "b", "id": 2}"#));
        // Before the subscription: the first waits, the second overflows the queue of 1.
        assert_eq!(
            sink.take(),
            vec![
                json!({"data": null, "exception": {"exception": "MaxConnectionsReached", "message": "No Available Workers"}, "id": 2})
            ]
        );
        let inbox = exchange(&mut s, vec![subscribe(1)]);
        assert_eq!(inbox.deliveries.len(), 1);
        let d = &inbox.deliveries[0];
        assert_eq!(d.envelope.routing_key, "a");
        assert_eq!(d.envelope.properties.reply_to.as_deref(), Some("ws-1"));
        // Prefetch 1 is taken: the next one waits; the one after is refused.
        s.request(c, req(r#"{"command": "c", "id": 3}"#));
        s.request(c, req(r#"{"command": "d", "id": 4}"#));
        assert_eq!(sink.take()[0]["id"], json!(4));
        assert_eq!(s.stats().refused, 2);
        // The reply goes out with its id; the ack frees the slot for "c".
        let inbox = exchange(&mut s, vec![reply_to(d, json!(10))]);
        assert_eq!(inbox.confirms, vec![(PublishId::from_raw(1), Ok(()))]);
        assert_eq!(sink.take(), vec![json!({"data": 10, "exception": null, "id": 1})]);
        assert!(inbox.deliveries.is_empty());
        let inbox = exchange(&mut s, vec![LinkOp::Ack(d.tag)]);
        assert_eq!(inbox.deliveries.len(), 1);
        assert_eq!(inbox.deliveries[0].envelope.routing_key, "c");
    }

    #[test]
    fn the_id_less_lane_runs_one_at_a_time_and_bad_frames_keep_their_place() {
        let mut s = state(8);
        let sink = Sink::default();
        let c = s.open(sink.clone());
        exchange(&mut s, vec![subscribe(8)]);
        s.request(c, req(r#"{"command": "a"}"#));
        s.request(c, req("nope"));
        s.request(c, req(r#"{"command": "b"}"#));
        s.request(c, req(r#"{"command": "m", "id": "x"}"#));
        let inbox = exchange(&mut s, vec![]);
        let names: Vec<&str> = inbox.deliveries.iter().map(|d| d.envelope.routing_key.as_str()).collect();
        assert_eq!(names, ["a", "m"]);
        assert!(sink.take().is_empty(), "the bad frame waits behind a");
        let a = inbox.deliveries[0].clone();
        let m = inbox.deliveries[1].clone();
        exchange(&mut s, vec![reply_to(&m, json!("m"))]);
        assert_eq!(sink.take(), vec![json!({"data": "m", "exception": null, "id": "x"})]);
        let inbox = exchange(&mut s, vec![reply_to(&a, json!("a")), LinkOp::Ack(a.tag)]);
        let out = sink.take();
        assert_eq!(out[0], json!({"data": "a", "exception": null}));
        assert_eq!(out[1]["exception"]["exception"], json!("JSONDecodeError"));
        assert_eq!(out.len(), 2);
        assert_eq!(inbox.deliveries.len(), 1);
        assert_eq!(inbox.deliveries[0].envelope.routing_key, "b");
        assert_eq!(s.pending(c), 1);
    }

    #[test]
    fn settling_without_a_reply_answers_and_stop_answers_everything() {
        let mut s = state(8);
        let sink = Sink::default();
        let c = s.open(sink.clone());
        exchange(&mut s, vec![subscribe(2)]);
        for i in 0..4 {
            s.request(c, req(&format!(r#"{{"command": "f", "id": {i}}}"#)));
        }
        let inbox = exchange(&mut s, vec![]);
        assert_eq!(inbox.deliveries.len(), 2);
        // A reject (the Engine handed it back at shutdown) answers "shutting down".
        exchange(&mut s, vec![LinkOp::Reject(inbox.deliveries[0].tag, true)]);
        let out = sink.take();
        assert_eq!(out[0]["exception"]["message"], json!("The service is shutting down"));
        assert_eq!(s.stats().waiting, 1);
        s.stop();
        let mut out = sink.take();
        out.sort_by_key(|v| v["id"].as_i64());
        let names: Vec<&str> = out.iter().map(|v| v["exception"]["exception"].as_str().unwrap()).collect();
        assert_eq!(names, ["ServiceStopped", "ServiceStopped", "MaxConnectionsReached"]);
        // After stop, a new request is refused and a late reply is dropped.
        s.request(c, req(r#"{"command": "f"}"#));
        assert_eq!(sink.take()[0]["exception"]["exception"], json!("MaxConnectionsReached"));
        let late = exchange(&mut s, vec![reply_to(&inbox.deliveries[1], json!(1))]);
        assert_eq!(late.confirms[0].1, Ok(()));
        assert!(sink.take().is_empty());
    }

    #[test]
    fn a_closed_connection_fails_its_replies_and_frees_its_queue() {
        let mut s = state(8);
        let sink = Sink::default();
        let c = s.open(sink.clone());
        let other = s.open(Sink::default());
        exchange(&mut s, vec![subscribe(1)]);
        s.request(c, req(r#"{"command": "f", "id": 1}"#));
        s.request(c, req(r#"{"command": "f", "id": 2}"#));
        s.request(other, req(r#"{"command": "g", "id": 1}"#));
        let inbox = exchange(&mut s, vec![]);
        s.closed(c);
        assert_eq!(s.stats().waiting, 1);
        let d = &inbox.deliveries[0];
        let inbox = exchange(&mut s, vec![reply_to(d, json!(1)), LinkOp::Ack(d.tag)]);
        assert!(matches!(inbox.confirms[0].1, Err(PublishError::LinkDown(_))));
        assert_eq!(inbox.deliveries[0].envelope.routing_key, "g");
        assert!(sink.take().is_empty());
    }

    /// The Engine's own view: its WsRpc subscription, its reply for a listing, and its
    /// method-not-found reply come back through the session as frames.
    #[test]
    fn an_engine_round_trip() {
        use microfw_core::extract::Params;
        use microfw_core::{Reply, Route, RunnerContext, Service, WsRpcListener};
        let route = Route::blocking(WsRpcListener, "add", |Params((a, b)): Params<(i64, i64)>| Reply(a + b));
        let (spec, _) = Service::new("svc").context(RunnerContext::new(2).route(route)).build().unwrap();
        let mut engine = Engine::new(&spec, EngineConfig::default());
        let now = Instant::from_unix_millis(1);
        engine.handle_start(now);
        let mut s = state(8);
        let sink = Sink::default();
        let c = s.open(sink.clone());
        let mut ops: Vec<LinkOp> = Vec::new();
        let turn = |engine: &mut Engine, s: &mut ServerState<Sink>, ops: &mut Vec<LinkOp>| {
            while let Some(action) = engine.poll_action() {
                match action {
                    Action::Subscribe(x) => ops.push(LinkOp::Subscribe(x)),
                    Action::Publish(p) => ops.push(LinkOp::Publish(p)),
                    Action::Ack(d) => ops.push(LinkOp::Ack(d.tag)),
                    Action::Reject { delivery, requeue } => ops.push(LinkOp::Reject(delivery.tag, requeue)),
                    _ => {}
                }
            }
            let mut inbox = LinkInbox::default();
            s.exchange(ops, &mut inbox);
            for d in inbox.deliveries {
                engine.handle_delivery(now, d);
            }
            for (id, r) in inbox.confirms {
                engine.handle_publish_result(now, id, r);
            }
        };
        turn(&mut engine, &mut s, &mut ops);
        s.request(c, req(r#"{"command": "__list_targets__", "id": 1}"#));
        s.request(c, req(r#"{"command": "nope"}"#));
        for _ in 0..3 {
            turn(&mut engine, &mut s, &mut ops);
        }
        let out = sink.take();
        assert_eq!(out[0]["id"], json!(1));
        assert_eq!(out[0]["data"][0]["target"], json!("add"));
        assert_eq!(
            out[1],
            json!({"data": null, "exception": {"exception": "RPCTargetDoesNotExist",
                "message": "nope does not exist or is not exposed through a RPC method."}})
        );
        assert_eq!(s.stats().in_engine, 0);
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// A frame on connection 0 or 1: 0 id-less call, 1 call with id, 2 bad frame, 3 bad
        /// frame with id, 4 random text.
        Frame(bool, u8, String),
        Reply(usize),
        Ack(usize),
        Reject(usize),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            3 => (any::<bool>(), 0u8..5, ".{0,12}").prop_map(|(c, k, t)| Op::Frame(c, k, t)),
            2 => any::<usize>().prop_map(Op::Reply),
            2 => any::<usize>().prop_map(Op::Ack),
            1 => any::<usize>().prop_map(Op::Reject),
        ]
    }

    proptest::proptest! {
        /// Whatever arrives and whatever the Engine does, every frame gets exactly one reply,
        /// id-less replies keep arrival order, the Engine never holds more than the prefetch,
        /// and nothing panics.
        #[test]
        fn every_frame_gets_one_reply_in_lane_order(
            prefetch in 1u32..4,
            max_waiting in 0usize..3,
            ops in proptest::collection::vec(op(), 0..60),
        ) {
            let mut s = state(max_waiting);
            let sinks = [Sink::default(), Sink::default()];
            let conns = [s.open(sinks[0].clone()), s.open(sinks[1].clone())];
            exchange(&mut s, vec![subscribe(prefetch)]);
            let mut held: Vec<Delivery> = Vec::new();
            let mut replied: Vec<bool> = Vec::new();
            let mut sent = [0usize; 2];
            let mut next_id = 0u64;
            let mut seq = 0u64;
            for op in ops {
                let mut link_ops = Vec::new();
                match op {
                    Op::Frame(c, kind, text) => {
                        let c = usize::from(c);
                        sent[c] += 1;
                        next_id += 1;
                        seq += 1;
                        let frame = match kind {
                            0 => format!(r#"{{"command": "s{seq}"}}"#),
                            1 => format!(r#"{{"command": "m", "id": {next_id}}}"#),
                            2 => r#"{"command": 5}"#.to_owned(),
                            3 => format!(r#"{{"command": [], "id": {next_id}}}"#),
                            _ => text,
                        };
                        s.request(conns[c], decode_request(&frame));
                    }
                    Op::Reply(i) if !held.is_empty() => {
                        let i = i % held.len();
                        if !replied[i] {
                            replied[i] = true;
                            let name = held[i].envelope.routing_key.clone();
                            link_ops.push(reply_to(&held[i], json!(name)));
                        }
                    }
                    Op::Ack(i) | Op::Reject(i) if !held.is_empty() => {
                        let i = i % held.len();
                        let d = held.remove(i);
                        replied.remove(i);
                        link_ops.push(if matches!(op, Op::Ack(_)) { LinkOp::Ack(d.tag) } else { LinkOp::Reject(d.tag, true) });
                    }
                    _ => {}
                }
                let inbox = exchange(&mut s, link_ops);
                for d in inbox.deliveries {
                    held.push(d);
                    replied.push(false);
                }
                proptest::prop_assert!(s.stats().in_engine <= prefetch as usize);
                proptest::prop_assert_eq!(s.stats().in_engine, held.len());
            }
            s.stop();
            let acks = held.iter().map(|d| LinkOp::Ack(d.tag)).collect();
            exchange(&mut s, acks);
            for (c, sink) in sinks.iter().enumerate() {
                let frames = sink.take();
                proptest::prop_assert_eq!(frames.len(), sent[c]);
                let mut last = 0u64;
                for f in &frames {
                    if f.get("id").is_none() && let Some(name) = f["data"].as_str() {
                        let n: u64 = name[1..].parse().unwrap();
                        proptest::prop_assert!(n > last, "id-less replies out of order");
                        last = n;
                    }
                }
                proptest::prop_assert_eq!(s.pending(conns[c]), 0);
            }
        }
    }
}

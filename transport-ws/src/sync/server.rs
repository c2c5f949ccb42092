//! The WebSocket RPC server as a [`Link`] on OS threads: an accept thread, and per
//! connection a reader thread and a writer thread. The shared [`ServerState`] decides
//! everything else.
//!
//! A tungstenite `WebSocket` cannot be read and written from two threads, so a connection
//! has two: the reader's (which also produces the protocol's own replies, pongs and close
//! replies, forwarded as raw bytes to the writer) and the writer's (which encodes reply
//! frames). The writer is the only thread that writes to the socket.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant as StdInstant};

use microfw_core::link::{Connect, Link, LinkError, LinkInbox, LinkOp, LinkSpec, LinkWaker};
use microfw_core::metrics::WsConnections;
use microfw_core::{Instant, Transport};
use tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tungstenite::protocol::frame::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{Message, Role, WebSocket};
use tungstenite::{Error as WsError, Utf8Bytes};

use crate::gauge::ConnGauge;
use crate::handle::WsServerHandle;
use crate::options::{CLOSE_GOING_AWAY, ServerOptions};
use crate::request::{decode_binary, decode_request};
use crate::session::{ConnId, FrameSink, ServerState};
use crate::upgrade;

/// Over-limit upgrades refused at the same time; beyond it the TCP connection is dropped.
const MAX_REJECTING: usize = 64;
/// How long a closing connection waits for the peer's close frame.
const CLOSE_LINGER: Duration = Duration::from_secs(1);
/// The longest a reader blocks before it re-checks the idle timer and the stop flag.
const TICK: Duration = Duration::from_millis(250);

/// The WebSocket RPC server of one service on OS threads, as a blocking [`Connect`]
/// connector: its [`connect`](Connect::connect) binds `WEBSOCKET_IP:WEBSOCKET_PORT` (or
/// [`ServerOptions::bind`]) and returns the [`Link`] that carries the Engine's
/// `Source::WsRpc` subscription on [`Transport::WebSocket`].
///
/// The same behaviour as the tokio half's server (same [`ServerState`], same limits, token,
/// 1009 and 1001 closes, `ws_active_connections`), with two threads per connection. No tokio.
///
/// It does not make outgoing calls (use [`WsRpcClient`](super::WsRpcClient)), speak TLS, or
/// read any configuration key other than the two address keys.
#[derive(Debug)]
pub struct WsServer {
    options: ServerOptions,
    handle: WsServerHandle,
    gauge: Option<WsConnections>,
}

impl WsServer {
    /// A server with these options, not bound yet.
    pub fn new(options: ServerOptions) -> Self {
        WsServer { options, handle: WsServerHandle::default(), gauge: None }
    }

    /// Counts connections on the runtime's gauge handle (its
    /// `ServiceMetrics::ws_connections()`) instead of registering `ws_active_connections`
    /// with the global recorder at connect.
    pub fn with_connections_gauge(mut self, gauge: WsConnections) -> Self {
        self.gauge = Some(gauge);
        self
    }

    /// The handle to read the bound address and counters from once connected.
    pub fn handle(&self) -> WsServerHandle {
        self.handle.clone()
    }
}

impl Connect for WsServer {
    fn connect(self: Box<Self>, spec: &LinkSpec, waker: LinkWaker) -> Result<Box<dyn Link>, LinkError> {
        if spec.transport != Transport::WebSocket {
            return Err(LinkError::Unsupported("WsServer carries the WebSocket transport only".into()));
        }
        let addr = self.options.address(&spec.config.websocket_ip, spec.config.websocket_port);
        let connect_error =
            |e: io::Error| LinkError::Connect { transport: format!("ws://{addr}"), reason: e.to_string() };
        let listener = TcpListener::bind(addr.as_str()).map_err(connect_error)?;
        let local = listener.local_addr().map_err(connect_error)?;
        let shared = Arc::new(Shared {
            state: Mutex::new(ServerState::new(spec.service.clone(), &self.options, waker)),
            gauge: ConnGauge::new(self.gauge, &spec.service),
            options: self.options,
            local,
            stopping: AtomicBool::new(false),
            conns: Mutex::new(Registry::default()),
            threads: Mutex::new(0),
            threads_done: Condvar::new(),
            reserved: AtomicUsize::new(0),
            rejecting: AtomicUsize::new(0),
        });
        let weak = Arc::downgrade(&shared);
        self.handle.bound(local, Box::new(move || weak.upgrade().map(|s| s.state().stats())));
        let accepting = shared.clone();
        spawn_tracked(&shared, "microfw-ws-accept", move || accept_loop(accepting, listener))
            .map_err(connect_error)?;
        Ok(Box::new(WsLink { shared, closed: false }))
    }
}

/// The link a [`WsServer`] returns.
struct WsLink {
    shared: Arc<Shared>,
    closed: bool,
}

impl Link for WsLink {
    fn exchange(&mut self, _now: Instant, ops: &mut Vec<LinkOp>, inbox: &mut LinkInbox) -> Option<Instant> {
        self.shared.state().exchange(ops, inbox);
        None
    }

    /// Stops accepting, answers every request without a reply (waiting ones with
    /// `MaxConnectionsReached` "shutting down", started ones with `ServiceStopped`), writes
    /// what is queued, closes every connection with 1001, waits for the peers' close frames
    /// (at most 1 s), then shuts the sockets and waits for the threads at most `timeout` in all
    /// (threads still running then are left to end on their own).
    fn close(&mut self, timeout: Duration) {
        if std::mem::replace(&mut self.closed, true) {
            return;
        }
        let deadline = StdInstant::now() + timeout;
        self.shared.state().stop();
        self.shared.begin_stop();
        for (_, tx) in self.shared.registry().conns.values() {
            let _ = tx.send(Out::Close(CLOSE_GOING_AWAY, "the service is stopping"));
        }
        self.shared.wait_threads(deadline.min(StdInstant::now() + CLOSE_LINGER));
        self.shared.shutdown_sockets();
        self.shared.wait_threads(deadline);
    }
}

impl Drop for WsLink {
    fn drop(&mut self) {
        if !self.closed {
            self.shared.begin_stop();
            self.shared.shutdown_sockets();
        }
    }
}

impl std::fmt::Debug for WsLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsLink").field("closed", &self.closed).finish_non_exhaustive()
    }
}

// ---------------------------------------------------------------------------------------------
// Private machinery.

#[derive(Debug)]
struct Shared {
    state: Mutex<ServerState<Outbox>>,
    options: ServerOptions,
    gauge: ConnGauge,
    local: SocketAddr,
    stopping: AtomicBool,
    conns: Mutex<Registry>,
    threads: Mutex<usize>,
    threads_done: Condvar,
    reserved: AtomicUsize,
    rejecting: AtomicUsize,
}

/// Open connections: a handle on each socket (to shut it at stop) and its writer's queue.
#[derive(Debug, Default)]
struct Registry {
    next: u64,
    conns: HashMap<u64, (TcpStream, mpsc::Sender<Out>)>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, ServerState<Outbox>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Sets the stop flag and wakes the accept thread (with a connection of its own).
    fn begin_stop(&self) {
        if self.stopping.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut wake = self.local;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
    }

    fn shutdown_sockets(&self) {
        for (stream, _) in self.registry().conns.values() {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    fn wait_threads(&self, deadline: StdInstant) {
        let mut live = self.threads.lock().unwrap_or_else(PoisonError::into_inner);
        while *live > 0 {
            let left = deadline.saturating_duration_since(StdInstant::now());
            if left.is_zero() {
                return;
            }
            live = match self.threads_done.wait_timeout(live, left) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }
}

/// Spawns a named thread counted by [`Shared::wait_threads`].
fn spawn_tracked(shared: &Arc<Shared>, name: &str, f: impl FnOnce() + Send + 'static) -> io::Result<()> {
    *shared.threads.lock().unwrap_or_else(PoisonError::into_inner) += 1;
    let guard = ThreadGuard(shared.clone());
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let _guard = guard;
            f();
        })
        .map(|_| ())
}

/// Uncounts a thread when it ends (or when it could not be spawned: the closure, and the
/// guard with it, is dropped).
struct ThreadGuard(Arc<Shared>);

impl Drop for ThreadGuard {
    fn drop(&mut self) {
        let mut live = self.0.threads.lock().unwrap_or_else(PoisonError::into_inner);
        *live = live.saturating_sub(1);
        self.0.threads_done.notify_all();
    }
}

/// Gives back a reservation when dropped.
struct Reservation<'a>(&'a AtomicUsize);

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a connection's writer thread is asked to write.
enum Out {
    /// A reply frame.
    Frame(String),
    /// Bytes the reader's websocket produced (a pong, a close reply), already framed.
    Raw(Vec<u8>),
    /// A close frame with this code and reason; nothing but dropped frames after it.
    Close(u16, &'static str),
}

/// Where a connection's reply frames go: its writer's queue.
#[derive(Debug)]
struct Outbox(mpsc::Sender<Out>);

impl FrameSink for Outbox {
    fn send(&self, frame: String) {
        let _ = self.0.send(Out::Frame(frame));
    }
}

/// The reader's side of the socket: reads from it, and forwards what its websocket writes to
/// the writer thread (once the upgrade is done; the upgrade response is written directly).
struct ReadHalf {
    stream: TcpStream,
    forward: Option<mpsc::Sender<Out>>,
}

impl Read for ReadHalf {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.read(buf)
    }
}

impl Write for ReadHalf {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &self.forward {
            Some(tx) => {
                tx.send(Out::Raw(buf.to_vec())).map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?;
                Ok(buf.len())
            }
            None => self.stream.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &self.forward {
            Some(_) => Ok(()),
            None => self.stream.flush(),
        }
    }
}

/// The writer's side of the socket (never read).
struct WriteHalf(TcpStream);

impl Read for WriteHalf {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Err(io::Error::from(io::ErrorKind::WouldBlock))
    }
}

impl Write for WriteHalf {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// Requests read on a connection whose reply frame has not been written.
#[derive(Default)]
struct Flight {
    count: Mutex<usize>,
    changed: Condvar,
}

impl Flight {
    fn get(&self) -> usize {
        *self.count.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn add(&self) {
        *self.count.lock().unwrap_or_else(PoisonError::into_inner) += 1;
    }

    fn sub(&self, n: usize) {
        let mut count = self.count.lock().unwrap_or_else(PoisonError::into_inner);
        *count = count.saturating_sub(n);
        self.changed.notify_all();
    }

    /// Waits until fewer than `max` are in flight, at most `tick`; true when that holds.
    fn below(&self, max: usize, tick: Duration) -> bool {
        let count = self.count.lock().unwrap_or_else(PoisonError::into_inner);
        let (count, _) = self
            .changed
            .wait_timeout_while(count, tick, |n| *n >= max)
            .unwrap_or_else(PoisonError::into_inner);
        *count < max
    }
}

fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let accepted = listener.accept();
        if shared.stopping() {
            return;
        }
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(_) => {
                // Out of descriptors or a reset before accept: try again shortly.
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        if shared.reserved.fetch_add(1, Ordering::AcqRel) < shared.options.max_connections {
            let conn = shared.clone();
            if spawn_tracked(&shared, "microfw-ws-conn", move || connection(conn, stream)).is_err() {
                shared.reserved.fetch_sub(1, Ordering::AcqRel);
            }
        } else {
            shared.reserved.fetch_sub(1, Ordering::AcqRel);
            if shared.rejecting.fetch_add(1, Ordering::AcqRel) < MAX_REJECTING {
                let conn = shared.clone();
                if spawn_tracked(&shared, "microfw-ws-refuse", move || refuse(conn, stream)).is_err() {
                    shared.rejecting.fetch_sub(1, Ordering::AcqRel);
                }
            } else {
                shared.rejecting.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

/// Answers an upgrade over the connection limit with HTTP 503.
// The callback's error type is tungstenite's (an HTTP response), large by nature.
#[allow(clippy::result_large_err)]
fn refuse(shared: Arc<Shared>, stream: TcpStream) {
    let _slot = Reservation(&shared.rejecting);
    let _ = stream.set_read_timeout(Some(shared.options.handshake_timeout));
    let _ = stream.set_write_timeout(Some(shared.options.handshake_timeout));
    let callback = |_: &Request, _: Response| -> Result<Response, ErrorResponse> { Err(upgrade::too_many()) };
    let _ = tungstenite::accept_hdr(stream, callback);
}

#[allow(clippy::result_large_err)]
fn connection(shared: Arc<Shared>, stream: TcpStream) {
    let _slot = Reservation(&shared.reserved);
    let options = &shared.options;
    let (Ok(write_stream), Ok(registry_stream)) = (stream.try_clone(), stream.try_clone()) else { return };
    let _ = stream.set_read_timeout(Some(options.handshake_timeout));
    let _ = stream.set_write_timeout(Some(options.handshake_timeout));
    let token = options.token.clone();
    let callback = move |request: &Request, response: Response| -> Result<Response, ErrorResponse> {
        upgrade::check(token.as_deref(), request).map(|()| response)
    };
    let config = upgrade::server_config(options);
    let io = ReadHalf { stream, forward: None };
    let Ok(mut ws) = tungstenite::accept_hdr_with_config(io, callback, Some(config)) else { return };
    let tick = options.idle_timeout.map_or(TICK, |idle| (idle / 4).clamp(Duration::from_millis(10), TICK));
    let _ = ws.get_ref().stream.set_read_timeout(Some(tick));
    let _ = ws.get_ref().stream.set_write_timeout(None);
    let (tx, rx) = mpsc::channel();
    ws.get_mut().forward = Some(tx.clone());
    let flight = Arc::new(Flight::default());
    let writer_flight = flight.clone();
    let started =
        spawn_tracked(&shared, "microfw-ws-write", move || writer(write_stream, rx, &writer_flight, config));
    if started.is_err() {
        return;
    }
    let conn = shared.state().open(Outbox(tx.clone()));
    let key = {
        let mut registry = shared.registry();
        registry.next += 1;
        let key = registry.next;
        registry.conns.insert(key, (registry_stream, tx.clone()));
        key
    };
    shared.gauge.connected();
    if shared.stopping() {
        // The stop began before this connection was registered: close it like the others.
        let _ = tx.send(Out::Close(CLOSE_GOING_AWAY, "the service is stopping"));
    }
    read_loop(&shared, conn, &mut ws, &tx, &flight, tick);
    shared.state().closed(conn);
    shared.registry().conns.remove(&key);
    shared.gauge.disconnected();
}

fn read_loop(
    shared: &Shared,
    conn: ConnId,
    ws: &mut WebSocket<ReadHalf>,
    tx: &mpsc::Sender<Out>,
    flight: &Flight,
    tick: Duration,
) {
    let options = &shared.options;
    let mut last_activity = StdInstant::now();
    // When we sent a close frame and wait for the peer's.
    let mut closing: Option<StdInstant> = None;
    loop {
        if closing.is_none() && !flight.below(options.max_in_flight_per_connection, tick) {
            if shared.stopping() {
                closing = Some(StdInstant::now());
            }
            continue;
        }
        let decoded = match ws.read() {
            Ok(Message::Text(text)) => decode_request(text.as_str()),
            Ok(Message::Binary(bytes)) => Err(decode_binary(&bytes)),
            Ok(Message::Close(_)) => {
                // The reply close frame (if the peer began) goes out through the writer.
                let _ = ws.flush();
                return;
            }
            Ok(_) => {
                last_activity = StdInstant::now();
                continue;
            }
            Err(WsError::Io(e))
                if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) =>
            {
                match closing {
                    Some(since) if since.elapsed() >= CLOSE_LINGER => return,
                    Some(_) => {}
                    None if shared.stopping() => closing = Some(StdInstant::now()),
                    None => {
                        let idle = options.idle_timeout.is_some_and(|idle| last_activity.elapsed() >= idle);
                        if idle && flight.get() == 0 {
                            let _ = tx.send(Out::Close(CLOSE_GOING_AWAY, "idle"));
                            closing = Some(StdInstant::now());
                        }
                    }
                }
                continue;
            }
            Err(WsError::Capacity(_)) => {
                let _ = tx.send(Out::Close(u16::from(CloseCode::Size), "message too big"));
                return;
            }
            Err(_) => return,
        };
        if closing.is_some() {
            continue;
        }
        flight.add();
        last_activity = StdInstant::now();
        shared.state().request(conn, decoded);
    }
}

fn writer(
    stream: TcpStream,
    rx: mpsc::Receiver<Out>,
    flight: &Flight,
    config: tungstenite::protocol::WebSocketConfig,
) {
    let mut ws = WebSocket::from_raw_socket(WriteHalf(stream), Role::Server, Some(config));
    let mut closed = false;
    let mut broken = false;
    while let Ok(first) = rx.recv() {
        let mut frames = 0;
        let mut next = Some(first);
        while let Some(out) = next.take() {
            match out {
                Out::Frame(frame) => {
                    frames += 1;
                    if !closed && !broken {
                        broken = ws.write(Message::text(frame)).is_err();
                    }
                }
                Out::Raw(bytes) if !closed && !broken => {
                    broken = ws.flush().is_err() || ws.get_mut().0.write_all(&bytes).is_err();
                }
                Out::Raw(_) => {}
                Out::Close(code, reason) if !closed && !broken => {
                    closed = true;
                    let frame =
                        CloseFrame { code: CloseCode::from(code), reason: Utf8Bytes::from_static(reason) };
                    broken = ws.close(Some(frame)).is_err();
                }
                Out::Close(..) => {}
            }
            next = rx.try_recv().ok();
        }
        if !broken && ws.flush().is_err() {
            broken = true;
        }
        flight.sub(frames);
    }
    let _ = ws.get_ref().0.shutdown(Shutdown::Write);
}

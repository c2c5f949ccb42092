//! The WebSocket RPC server as a [`Link`]: tokio tasks accept connections and move frames;
//! the shared [`ServerState`] decides everything else.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use microfw_core::link::{
    ConnectAsync, ConnectFuture, Link, LinkError, LinkInbox, LinkOp, LinkSpec, LinkWaker,
};
use microfw_core::metrics::WsConnections;
use microfw_core::{Instant, Transport};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::Message;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Utf8Bytes};
use tokio_tungstenite::{WebSocketStream, accept_hdr_async_with_config};

use crate::gauge::ConnGauge;
use crate::handle::WsServerHandle;
use crate::options::{CLOSE_GOING_AWAY, ServerOptions};
use crate::request::{decode_binary, decode_request};
use crate::session::{ConnId, FrameSink, ServerState};
use crate::upgrade;

/// Upgrades refused at once (over the connection limit) that may be in their handshake at
/// the same time; beyond it, the TCP connection is dropped without an HTTP answer.
const MAX_REJECTING: usize = 64;
/// How long a closing connection waits for the peer's close frame.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// The WebSocket RPC server of one service, as a [`ConnectAsync`] connector: its
/// [`connect`](ConnectAsync::connect) binds `WEBSOCKET_IP:WEBSOCKET_PORT` (or
/// [`ServerOptions::bind`]) and returns the [`Link`] that carries the Engine's
/// `Source::WsRpc` subscription on [`Transport::WebSocket`].
///
/// Each connection is served by one tokio task (TCP_NODELAY set, upgrade checked for the
/// token and the connection limit). Requests become deliveries within the subscription's
/// prefetch, then wait in a bounded queue, then are refused with `MaxConnectionsReached`
/// (see [`ServerState`]). Oversize messages close the connection with 1009; anything else a
/// client sends gets a reply, never a close. `ws_active_connections` follows the open
/// connections.
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

impl ConnectAsync for WsServer {
    fn connect(self: Box<Self>, spec: LinkSpec, waker: LinkWaker) -> ConnectFuture {
        Box::pin(async move {
            if spec.transport != Transport::WebSocket {
                return Err(LinkError::Unsupported("WsServer carries the WebSocket transport only".into()));
            }
            let addr = self.options.address(&spec.config.websocket_ip, spec.config.websocket_port);
            let connect_error = |e: std::io::Error| LinkError::Connect {
                transport: format!("ws://{addr}"),
                reason: e.to_string(),
            };
            let listener = TcpListener::bind(addr.as_str()).await.map_err(connect_error)?;
            let local = listener.local_addr().map_err(connect_error)?;
            let (shutdown, _) = watch::channel(false);
            let shared = Arc::new(Shared {
                state: Mutex::new(ServerState::new(spec.service.clone(), &self.options, waker)),
                gauge: ConnGauge::new(self.gauge, &spec.service),
                options: self.options,
                shutdown,
                tasks: Mutex::new(Tasks::default()),
                tasks_done: Condvar::new(),
                reserved: AtomicUsize::new(0),
                rejecting: AtomicUsize::new(0),
            });
            let weak = Arc::downgrade(&shared);
            self.handle.bound(local, Box::new(move || weak.upgrade().map(|s| s.state().stats())));
            spawn_tracked(&shared, accept_loop(shared.clone(), listener));
            Ok(Box::new(WsLink { shared, closed: false }) as Box<dyn Link>)
        })
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
    /// what is queued, closes every connection with 1001, and waits for the tasks at most
    /// `timeout` (then aborts them). Blocks the calling thread: call it off the reactor.
    fn close(&mut self, timeout: Duration) {
        if std::mem::replace(&mut self.closed, true) {
            return;
        }
        self.shared.state().stop();
        self.shared.shutdown.send_replace(true);
        let deadline = std::time::Instant::now() + timeout;
        let mut tasks = self.shared.tasks.lock().unwrap_or_else(PoisonError::into_inner);
        while !tasks.live.is_empty() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            tasks = match self.shared.tasks_done.wait_timeout(tasks, left) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        tasks.abort_all();
    }
}

impl Drop for WsLink {
    fn drop(&mut self) {
        if !self.closed {
            self.shared.shutdown.send_replace(true);
            self.shared.tasks.lock().unwrap_or_else(PoisonError::into_inner).abort_all();
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
    shutdown: watch::Sender<bool>,
    tasks: Mutex<Tasks>,
    tasks_done: Condvar,
    /// Connections accepted and not finished (in their handshake or open).
    reserved: AtomicUsize,
    /// Over-limit upgrades being refused.
    rejecting: AtomicUsize,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, ServerState<Outbox>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Debug, Default)]
struct Tasks {
    next: u64,
    live: HashMap<u64, Option<AbortHandle>>,
}

impl Tasks {
    fn abort_all(&mut self) {
        for handle in self.live.values().flatten() {
            handle.abort();
        }
    }
}

/// Spawns `task`, tracked so [`WsLink::close`] can wait for it and abort it.
fn spawn_tracked(shared: &Arc<Shared>, task: impl Future<Output = ()> + Send + 'static) {
    let key = {
        let mut tasks = shared.tasks.lock().unwrap_or_else(PoisonError::into_inner);
        tasks.next += 1;
        let key = tasks.next;
        tasks.live.insert(key, None);
        key
    };
    let guard = TaskGuard { shared: Arc::downgrade(shared), key };
    let handle = tokio::spawn(async move {
        let _guard = guard;
        task.await;
    });
    let mut tasks = shared.tasks.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(slot) = tasks.live.get_mut(&key) {
        *slot = Some(handle.abort_handle());
    }
}

/// Unregisters a task when it ends (also when aborted).
struct TaskGuard {
    shared: Weak<Shared>,
    key: u64,
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            let mut tasks = shared.tasks.lock().unwrap_or_else(PoisonError::into_inner);
            tasks.live.remove(&self.key);
            shared.tasks_done.notify_all();
        }
    }
}

/// Gives back a connection's reservation when its task ends.
struct Reservation<'a>(&'a AtomicUsize);

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Where a connection's reply frames go: its task's queue.
#[derive(Debug)]
struct Outbox(mpsc::UnboundedSender<String>);

impl FrameSink for Outbox {
    fn send(&self, frame: String) {
        let _ = self.0.send(frame);
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        let accepted = tokio::select! {
            () = stopped(&mut shutdown) => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(_) => {
                // Out of descriptors or a connection reset before accept: try again shortly,
                // not in a tight loop.
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        if shared.reserved.fetch_add(1, Ordering::AcqRel) < shared.options.max_connections {
            spawn_tracked(&shared, connection(shared.clone(), stream));
        } else {
            shared.reserved.fetch_sub(1, Ordering::AcqRel);
            if shared.rejecting.fetch_add(1, Ordering::AcqRel) < MAX_REJECTING {
                spawn_tracked(&shared, refuse(shared.clone(), stream));
            } else {
                shared.rejecting.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

/// Answers an upgrade over the connection limit with HTTP 503.
// The callback's error type is tungstenite's (an HTTP response), large by nature.
#[allow(clippy::result_large_err)]
async fn refuse(shared: Arc<Shared>, stream: TcpStream) {
    let _slot = Reservation(&shared.rejecting);
    let callback = |_: &Request, _: Response| -> Result<Response, ErrorResponse> { Err(upgrade::too_many()) };
    let handshake = accept_hdr_async_with_config(stream, callback, None);
    let _ = tokio::time::timeout(shared.options.handshake_timeout, handshake).await;
}

/// Why a connection's loop ended.
enum End {
    Shutdown,
    Idle,
    TooBig,
    PeerClosed,
    Gone,
}

#[allow(clippy::result_large_err)]
async fn connection(shared: Arc<Shared>, stream: TcpStream) {
    let _slot = Reservation(&shared.reserved);
    let options = &shared.options;
    let token = options.token.clone();
    let callback = move |request: &Request, response: Response| -> Result<Response, ErrorResponse> {
        upgrade::check(token.as_deref(), request).map(|()| response)
    };
    let config = upgrade::server_config(options);
    let handshake = accept_hdr_async_with_config(stream, callback, Some(config));
    let Ok(Ok(ws)) = tokio::time::timeout(options.handshake_timeout, handshake).await else { return };
    let (tx, rx) = mpsc::unbounded_channel();
    let conn = shared.state().open(Outbox(tx));
    shared.gauge.connected();
    serve(&shared, conn, ws, rx).await;
    shared.state().closed(conn);
    shared.gauge.disconnected();
}

async fn serve(
    shared: &Shared,
    conn: ConnId,
    mut ws: WebSocketStream<TcpStream>,
    mut rx: mpsc::UnboundedReceiver<String>,
) {
    let options = &shared.options;
    let mut shutdown = shared.shutdown.subscribe();
    let idle = options.idle_timeout;
    let far = Duration::from_secs(86_400 * 365);
    let sleep = tokio::time::sleep(idle.unwrap_or(far));
    tokio::pin!(sleep);
    // Requests read whose reply frame has not been written (each request gets one frame).
    let mut in_flight = 0usize;
    let end = loop {
        tokio::select! {
            biased;
            () = stopped(&mut shutdown) => break End::Shutdown,
            Some(frame) = rx.recv() => {
                match write_batch(&mut ws, frame, &mut rx).await {
                    Ok(written) => in_flight = in_flight.saturating_sub(written),
                    Err(_) => break End::Gone,
                }
                if let Some(idle) = idle {
                    sleep.as_mut().reset(tokio::time::Instant::now() + idle);
                }
            }
            message = ws.next(), if in_flight < options.max_in_flight_per_connection => {
                let decoded = match message {
                    Some(Ok(Message::Text(text))) => decode_request(text.as_str()),
                    Some(Ok(Message::Binary(bytes))) => Err(decode_binary(&bytes)),
                    Some(Ok(Message::Close(_))) => break End::PeerClosed,
                    Some(Ok(_)) => continue,
                    Some(Err(WsError::Capacity(_))) => break End::TooBig,
                    Some(Err(_)) | None => break End::Gone,
                };
                in_flight += 1;
                shared.state().request(conn, decoded);
                if let Some(idle) = idle {
                    sleep.as_mut().reset(tokio::time::Instant::now() + idle);
                }
            }
            () = &mut sleep, if idle.is_some() && in_flight == 0 => break End::Idle,
        }
    };
    let close = |code: CloseCode, reason: &'static str| {
        Some(CloseFrame { code, reason: Utf8Bytes::from_static(reason) })
    };
    match end {
        End::Shutdown => {
            // The state answered everything before the signal: write it, then say goodbye.
            let mut ok = true;
            while let Ok(frame) = rx.try_recv() {
                ok &= ws.feed(Message::text(frame)).await.is_ok();
                if !ok {
                    break;
                }
            }
            if ok {
                let _ = ws.close(close(CloseCode::from(CLOSE_GOING_AWAY), "the service is stopping")).await;
                linger(&mut ws).await;
            }
        }
        End::Idle => {
            let _ = ws.close(close(CloseCode::from(CLOSE_GOING_AWAY), "idle")).await;
            linger(&mut ws).await;
        }
        End::TooBig => {
            let _ = ws.close(close(CloseCode::Size, "message too big")).await;
        }
        End::PeerClosed => {
            let _ = ws.close(None).await;
        }
        End::Gone => {}
    }
}

/// Writes `first` and every frame already queued behind it, then flushes once. Returns how
/// many frames were written.
async fn write_batch(
    ws: &mut WebSocketStream<TcpStream>,
    first: String,
    rx: &mut mpsc::UnboundedReceiver<String>,
) -> Result<usize, WsError> {
    ws.feed(Message::text(first)).await?;
    let mut written = 1;
    while let Ok(frame) = rx.try_recv() {
        ws.feed(Message::text(frame)).await?;
        written += 1;
    }
    ws.flush().await?;
    Ok(written)
}

/// After sending a close frame, waits briefly for the peer's, so the peer sees a clean close
/// rather than a reset.
async fn linger(ws: &mut WebSocketStream<TcpStream>) {
    let _ = tokio::time::timeout(CLOSE_LINGER, async { while let Some(Ok(_)) = ws.next().await {} }).await;
}

/// Resolves once the shutdown signal is set (at once if it already is, or if the sender is
/// gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

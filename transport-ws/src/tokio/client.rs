//! `WsRpcClient`: micro_framework's WebSocket RPC client, async, over one persistent
//! multiplexed connection.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use microfw_core::{RemoteError, RpcRequest};
use serde_json::{Map, Value};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Sleep;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::http::{HeaderValue, header};
use tokio_tungstenite::tungstenite::protocol::{Message, WebSocketConfig};
use tokio_tungstenite::{WebSocketStream, client_async_with_config};

use crate::reply::{ReplyDecodeError, WsReply, decode_reply};
use crate::request::{RequestId, encode_request};
use crate::targets::{GET_TARGET, LIST_TARGETS, TargetDetail, parse_target_detail, parse_target_list};

/// Settings of a [`WsRpcClient`]. `Debug` never prints the token.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientOptions {
    /// Sent as `Authorization: Bearer <token>` on every upgrade.
    pub token: Option<String>,
    /// The timeout of a call that names none. Default 30 s.
    pub timeout: Duration,
    /// Time allowed to open the TCP connection and complete the upgrade. Default 10 s.
    pub connect_timeout: Duration,
    /// Largest reply accepted, in bytes (a larger one loses the connection). Default 64 MiB.
    pub max_message_size: usize,
    /// Calls that may be queued for the connection task before `call` fails at once with
    /// [`WsCallError::Overloaded`]. Default 1024.
    pub max_queued: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            token: None,
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            max_message_size: 64 << 20,
            max_queued: 1024,
        }
    }
}

impl ClientOptions {
    /// Sets [`token`](Self::token).
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Sets [`timeout`](Self::timeout).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets [`connect_timeout`](Self::connect_timeout).
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets [`max_message_size`](Self::max_message_size).
    pub fn with_max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// Sets [`max_queued`](Self::max_queued) (at least 1).
    pub fn with_max_queued(mut self, n: usize) -> Self {
        self.max_queued = n.max(1);
        self
    }
}

impl std::fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientOptions")
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("max_message_size", &self.max_message_size)
            .field("max_queued", &self.max_queued)
            .finish()
    }
}

/// Why a client could not be made.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum WsClientError {
    /// The URL is not a `ws://host[:port][/path]` URL (`wss` needs TLS, which this crate
    /// does not speak).
    #[error("invalid WebSocket URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Made outside a tokio runtime.
    #[error("WsRpcClient needs a tokio runtime")]
    NoRuntime,
    /// The first connection failed ([`WsRpcClient::connect`] only).
    #[error("{0}")]
    Connect(WsCallError),
}

/// Why a call failed.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum WsCallError {
    /// The server answered with an exception (micro_framework's name and message; the
    /// module and args when the server sends them). `MaxConnectionsReached` means the server
    /// had no capacity and the call did not run.
    #[error("remote error: {0}")]
    Remote(RemoteError),
    /// No reply within the call's timeout. The call may still run on the server.
    #[error("WebSocket RPC call timed out after {0:?}")]
    Timeout(Duration),
    /// The connection could not be opened (refused, upgrade rejected: 401 without a valid
    /// token, 503 over the server's connection limit).
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The connection closed before the reply. The call may or may not have run; the next
    /// call reconnects.
    #[error("the WebSocket connection was lost before the reply")]
    ConnectionLost,
    /// The reply could not be read.
    #[error("malformed reply: {0}")]
    MalformedReply(String),
    /// Too many calls queued for the connection ([`ClientOptions::max_queued`]).
    #[error("too many calls queued")]
    Overloaded,
    /// The client's connection task is gone (its runtime shut down).
    #[error("the client is closed")]
    Closed,
}

/// How the server answers, as far as the client has seen (per connection).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServerMode {
    /// No reply seen yet on this connection.
    Unknown,
    /// The server echoes ids (microfw): replies are matched by id.
    Multiplexed,
    /// The server does not echo ids (micro_framework): replies are matched in send order.
    InOrder,
}

/// An async client of a WebSocket RPC server (microfw's or micro_framework's).
///
/// One persistent connection carries every call, each with an `id`; replies are matched by
/// the echoed id, so calls are answered as they complete. Against a server that does not echo
/// ids (micro_framework answers one request at a time, in order) replies are matched in send
/// order instead, which is correct because such a server never reorders. A lost connection
/// fails the calls in flight ([`WsCallError::ConnectionLost`]) and the next call reconnects.
/// TCP_NODELAY is set.
///
/// Cheap to clone (clones share the connection); usable standalone or from handlers (put it
/// in the service's state). The connection task lives on the tokio runtime current when the
/// client was made, and ends when every clone is dropped.
///
/// It does not retry calls (not even `MaxConnectionsReached`, which micro_framework's client
/// retries forever), speak TLS (`wss`), or build proxies with attribute access: call by name.
#[derive(Clone)]
pub struct WsRpcClient {
    inner: Arc<Inner>,
}

struct Inner {
    url: String,
    commands: mpsc::Sender<Command>,
    next_key: AtomicU64,
    timeout: Duration,
    mode: Arc<AtomicU8>,
}

impl std::fmt::Debug for WsRpcClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsRpcClient").field("url", &self.inner.url).field("mode", &self.mode()).finish()
    }
}

impl WsRpcClient {
    /// A client of `url` (`ws://host:port/path`; `?token=` may be part of it) that connects
    /// on its first call. Must be called inside a tokio runtime.
    pub fn new(url: &str, options: ClientOptions) -> Result<WsRpcClient, WsClientError> {
        let target = Target::parse(url, &options)?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| WsClientError::NoRuntime)?;
        let (commands, rx) = mpsc::channel(options.max_queued);
        let mode = Arc::new(AtomicU8::new(MODE_UNKNOWN));
        let timeout = options.timeout;
        runtime.spawn(run(rx, target, options, mode.clone()));
        let inner = Inner { url: url.to_owned(), commands, next_key: AtomicU64::new(0), timeout, mode };
        Ok(WsRpcClient { inner: Arc::new(inner) })
    }

    /// A client of `url` whose connection is open (upgrade accepted) when this returns.
    pub async fn connect(url: &str, options: ClientOptions) -> Result<WsRpcClient, WsClientError> {
        let client = WsRpcClient::new(url, options)?;
        let (done, result) = oneshot::channel();
        client.inner.commands.send(Command::Connect(done)).await.map_err(|_| closed())?;
        match result.await {
            Ok(Ok(())) => Ok(client),
            Ok(Err(e)) => Err(WsClientError::Connect(e)),
            Err(_) => Err(closed()),
        }
    }

    /// Calls `method` with the client's default timeout. The request is queued at once (the
    /// call is in flight even if the future is not polled yet); the future resolves with the
    /// reply's `data`. Dropping the future abandons the call (its reply is discarded).
    pub fn call(&self, method: &str, args: Vec<Value>, kwargs: Map<String, Value>) -> WsCall {
        self.call_with_timeout(method, args, kwargs, self.inner.timeout)
    }

    /// As [`call`](Self::call), with this call's own timeout.
    pub fn call_with_timeout(
        &self,
        method: &str,
        args: Vec<Value>,
        kwargs: Map<String, Value>,
        timeout: Duration,
    ) -> WsCall {
        let key = self.inner.next_key.fetch_add(1, Ordering::Relaxed) + 1;
        let request = RpcRequest { method: method.to_owned(), args, kwargs };
        let (reply, rx) = oneshot::channel();
        let failed = match self.inner.commands.try_send(Command::Call { key, request, reply }) {
            Ok(()) => None,
            Err(mpsc::error::TrySendError::Full(_)) => Some(WsCallError::Overloaded),
            Err(mpsc::error::TrySendError::Closed(_)) => Some(WsCallError::Closed),
        };
        WsCall {
            key,
            rx,
            failed,
            timeout,
            started: tokio::time::Instant::now(),
            sleep: None,
            commands: self.inner.commands.clone(),
            done: false,
        }
    }

    /// The server's targets (`__list_targets__`), with their parameter names and docs.
    pub async fn targets(&self) -> Result<Vec<TargetDetail>, WsCallError> {
        let data = self.call(LIST_TARGETS, Vec::new(), Map::new()).await?;
        parse_target_list(&data).map_err(|e| WsCallError::MalformedReply(e.to_string()))
    }

    /// One target's detail (`__get_target__`). An unknown target is the server's `KeyError`.
    pub async fn info(&self, target: &str) -> Result<TargetDetail, WsCallError> {
        let data = self.call(GET_TARGET, vec![Value::String(target.to_owned())], Map::new()).await?;
        parse_target_detail(&data).map_err(|e| WsCallError::MalformedReply(e.to_string()))
    }

    /// How the server of the current connection answers.
    pub fn mode(&self) -> ServerMode {
        match self.inner.mode.load(Ordering::Relaxed) {
            MODE_MULTIPLEXED => ServerMode::Multiplexed,
            MODE_IN_ORDER => ServerMode::InOrder,
            _ => ServerMode::Unknown,
        }
    }

    /// The URL it calls.
    pub fn url(&self) -> &str {
        &self.inner.url
    }
}

/// A call in flight ([`WsRpcClient::call`]): resolves with the reply's data, the remote
/// error, or [`WsCallError::Timeout`] once the call's timeout has passed since `call`.
#[must_use = "a call's result is only seen by awaiting it"]
pub struct WsCall {
    key: u64,
    rx: oneshot::Receiver<Result<Value, WsCallError>>,
    failed: Option<WsCallError>,
    timeout: Duration,
    started: tokio::time::Instant,
    sleep: Option<Pin<Box<Sleep>>>,
    commands: mpsc::Sender<Command>,
    done: bool,
}

impl std::fmt::Debug for WsCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsCall").field("key", &self.key).field("timeout", &self.timeout).finish()
    }
}

impl Future for WsCall {
    type Output = Result<Value, WsCallError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(Err(WsCallError::Closed));
        }
        if let Some(error) = this.failed.take() {
            this.done = true;
            return Poll::Ready(Err(error));
        }
        if let Poll::Ready(result) = Pin::new(&mut this.rx).poll(cx) {
            this.done = true;
            return Poll::Ready(result.unwrap_or(Err(WsCallError::Closed)));
        }
        let deadline = this.started + this.timeout;
        let sleep = this.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.as_mut().poll(cx).is_ready() {
            this.done = true;
            let _ = this.commands.try_send(Command::Cancel(this.key));
            return Poll::Ready(Err(WsCallError::Timeout(this.timeout)));
        }
        Poll::Pending
    }
}

impl Drop for WsCall {
    fn drop(&mut self) {
        if !self.done && self.failed.is_none() {
            let _ = self.commands.try_send(Command::Cancel(self.key));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Private machinery: the connection task.

const MODE_UNKNOWN: u8 = 0;
const MODE_MULTIPLEXED: u8 = 1;
const MODE_IN_ORDER: u8 = 2;

enum Command {
    Call { key: u64, request: RpcRequest, reply: oneshot::Sender<Result<Value, WsCallError>> },
    Cancel(u64),
    Connect(oneshot::Sender<Result<(), WsCallError>>),
}

fn closed() -> WsClientError {
    WsClientError::Connect(WsCallError::Closed)
}

/// Where to connect: the parsed upgrade request and the TCP address.
struct Target {
    request: Request,
    host: String,
    port: u16,
}

impl Target {
    fn parse(url: &str, options: &ClientOptions) -> Result<Target, WsClientError> {
        let invalid =
            |reason: &str| WsClientError::InvalidUrl { url: url.to_owned(), reason: reason.to_owned() };
        let mut request = url.into_client_request().map_err(|e| invalid(&e.to_string()))?;
        let uri = request.uri();
        if uri.scheme_str() != Some("ws") {
            return Err(invalid("the scheme must be ws (wss needs TLS, which is not supported)"));
        }
        let host = uri.host().ok_or_else(|| invalid("no host"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        let port = uri.port_u16().unwrap_or(80);
        if let Some(token) = &options.token {
            let value = HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| invalid("the token is not a valid header value"))?;
            request.headers_mut().insert(header::AUTHORIZATION, value);
        }
        Ok(Target { request, host, port })
    }

    async fn connect(&self, options: &ClientOptions) -> Result<WebSocketStream<TcpStream>, WsCallError> {
        let attempt = async {
            let stream = TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| WsCallError::Connect(e.to_string()))?;
            let _ = stream.set_nodelay(true);
            let config = WebSocketConfig::default()
                .max_message_size(Some(options.max_message_size))
                .max_frame_size(Some(options.max_message_size));
            let (ws, _) = client_async_with_config(self.request.clone(), stream, Some(config))
                .await
                .map_err(|e| WsCallError::Connect(e.to_string()))?;
            Ok(ws)
        };
        match tokio::time::timeout(options.connect_timeout, attempt).await {
            Ok(result) => result,
            Err(_) => {
                Err(WsCallError::Connect(format!("no connection within {:?}", options.connect_timeout)))
            }
        }
    }
}

/// Calls sent on the current connection, and how to match their replies.
struct Calls {
    /// Calls without a reply; `None` once the caller gave up (its reply is still awaited in
    /// order mode, where it must be consumed).
    pending: HashMap<u64, Option<oneshot::Sender<Result<Value, WsCallError>>>>,
    /// Send order, while the server might answer in order.
    order: VecDeque<u64>,
    mode: u8,
    /// What [`WsRpcClient::mode`] reads; set before any reply is handed over.
    shown: Arc<AtomicU8>,
}

impl Calls {
    fn set_mode(&mut self, mode: u8) {
        self.mode = mode;
        self.shown.store(mode, Ordering::Relaxed);
    }

    fn sent(&mut self, key: u64, reply: oneshot::Sender<Result<Value, WsCallError>>) {
        self.pending.insert(key, Some(reply));
        if self.mode != MODE_MULTIPLEXED {
            self.order.push_back(key);
        }
    }

    fn cancel(&mut self, key: u64) {
        if self.mode == MODE_MULTIPLEXED {
            self.pending.remove(&key);
        } else if let Some(slot) = self.pending.get_mut(&key) {
            *slot = None;
        }
    }

    fn reply(&mut self, decoded: Result<WsReply, ReplyDecodeError>) {
        let (id, result) = match decoded {
            Ok(r) => (r.id, r.reply.result.map_err(WsCallError::Remote)),
            Err(e) => (e.id.clone(), Err(WsCallError::MalformedReply(e.to_string()))),
        };
        let key = match id {
            Some(id) => {
                if self.mode != MODE_MULTIPLEXED {
                    self.set_mode(MODE_MULTIPLEXED);
                    self.order.clear();
                    self.pending.retain(|_, slot| slot.is_some());
                }
                id.as_i64().and_then(|n| u64::try_from(n).ok())
            }
            None => {
                self.set_mode(MODE_IN_ORDER);
                std::iter::from_fn(|| self.order.pop_front()).find(|k| self.pending.contains_key(k))
            }
        };
        if let Some(Some(reply)) = key.and_then(|k| self.pending.remove(&k)) {
            let _ = reply.send(result);
        }
    }

    /// The connection is gone: every call in flight fails.
    fn lost(&mut self) {
        for (_, slot) in self.pending.drain() {
            if let Some(reply) = slot {
                let _ = reply.send(Err(WsCallError::ConnectionLost));
            }
        }
        self.order.clear();
        self.set_mode(MODE_UNKNOWN);
    }
}

async fn next_message(
    conn: &mut Option<WebSocketStream<TcpStream>>,
) -> Option<Result<Message, tokio_tungstenite::tungstenite::Error>> {
    match conn {
        Some(ws) => ws.next().await,
        None => std::future::pending().await,
    }
}

async fn run(
    mut commands: mpsc::Receiver<Command>,
    target: Target,
    options: ClientOptions,
    mode: Arc<AtomicU8>,
) {
    let mut conn: Option<WebSocketStream<TcpStream>> = None;
    let mut calls =
        Calls { pending: HashMap::new(), order: VecDeque::new(), mode: MODE_UNKNOWN, shown: mode };
    let mut batch = Vec::new();
    loop {
        tokio::select! {
            command = commands.recv() => {
                let Some(command) = command else { break };
                batch.push(command);
                while batch.len() < 256 {
                    match commands.try_recv() {
                        Ok(c) => batch.push(c),
                        Err(_) => break,
                    }
                }
                let mut connect_error: Option<WsCallError> = None;
                let mut wrote = false;
                for command in batch.drain(..) {
                    match command {
                        Command::Cancel(key) => calls.cancel(key),
                        Command::Connect(done) => {
                            let result = ensure(&mut conn, &mut calls, &target, &options, &mut connect_error).await;
                            let _ = done.send(result);
                        }
                        Command::Call { key, request, reply } => {
                            if let Err(e) = ensure(&mut conn, &mut calls, &target, &options, &mut connect_error).await {
                                let _ = reply.send(Err(e));
                                continue;
                            }
                            let Some(ws) = conn.as_mut() else { continue };
                            let frame = encode_request(&request, Some(&RequestId::from(key)));
                            if ws.feed(Message::text(frame)).await.is_err() {
                                let _ = reply.send(Err(WsCallError::ConnectionLost));
                                lose(&mut conn, &mut calls);
                                continue;
                            }
                            calls.sent(key, reply);
                            wrote = true;
                        }
                    }
                }
                if wrote && let Some(ws) = conn.as_mut() && ws.flush().await.is_err() {
                    lose(&mut conn, &mut calls);
                }
            }
            message = next_message(&mut conn), if conn.is_some() => {
                match message {
                    Some(Ok(Message::Text(text))) => calls.reply(decode_reply(text.as_str())),
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => lose(&mut conn, &mut calls),
                    Some(Ok(_)) => {}
                }
            }
        }
    }
    if let Some(mut ws) = conn {
        let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
    }
}

/// Opens the connection if there is none; one failure per batch fails the rest of it too
/// (no reconnect storm against a server that is down).
async fn ensure(
    conn: &mut Option<WebSocketStream<TcpStream>>,
    calls: &mut Calls,
    target: &Target,
    options: &ClientOptions,
    failed: &mut Option<WsCallError>,
) -> Result<(), WsCallError> {
    if conn.is_some() {
        return Ok(());
    }
    if let Some(e) = failed {
        return Err(e.clone());
    }
    match target.connect(options).await {
        Ok(ws) => {
            *conn = Some(ws);
            calls.set_mode(MODE_UNKNOWN);
            Ok(())
        }
        Err(e) => {
            *failed = Some(e.clone());
            Err(e)
        }
    }
}

fn lose(conn: &mut Option<WebSocketStream<TcpStream>>, calls: &mut Calls) {
    *conn = None;
    calls.lost();
}

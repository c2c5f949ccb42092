//! `WsRpcClient`: micro_framework's WebSocket RPC client, async, over one persistent
//! multiplexed connection.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use microfw_core::RpcRequest;
use serde_json::{Map, Value};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Sleep;
use tokio_tungstenite::tungstenite::protocol::Message;
use tokio_tungstenite::{WebSocketStream, client_async_with_config};

use crate::client::{
    Calls, ClientOptions, Responder, ServerMode, SharedMode, Target, WsCallError, WsClientError,
    client_config,
};
use crate::reply::decode_reply;
use crate::request::{RequestId, encode_request};
use crate::targets::{GET_TARGET, LIST_TARGETS, TargetDetail, parse_target_detail, parse_target_list};

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
    mode: SharedMode,
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
        let mode = SharedMode::default();
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
        self.inner.mode.get()
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

enum Command {
    Call { key: u64, request: RpcRequest, reply: Reply },
    Cancel(u64),
    Connect(oneshot::Sender<Result<(), WsCallError>>),
}

fn closed() -> WsClientError {
    WsClientError::Connect(WsCallError::Closed)
}

type Reply = oneshot::Sender<Result<Value, WsCallError>>;

impl Responder for Reply {
    fn respond(self, result: Result<Value, WsCallError>) {
        let _ = self.send(result);
    }
}

async fn connect(
    target: &Target,
    options: &ClientOptions,
) -> Result<WebSocketStream<TcpStream>, WsCallError> {
    let attempt = async {
        let stream = TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|e| WsCallError::Connect(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let (ws, _) = client_async_with_config(target.request.clone(), stream, Some(client_config(options)))
            .await
            .map_err(|e| WsCallError::Connect(e.to_string()))?;
        Ok(ws)
    };
    match tokio::time::timeout(options.connect_timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(WsCallError::Connect(format!("no connection within {:?}", options.connect_timeout))),
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
    mode: SharedMode,
) {
    let mut conn: Option<WebSocketStream<TcpStream>> = None;
    let mut calls: Calls<Reply> = Calls::new(mode);
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
    calls: &mut Calls<Reply>,
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
    match connect(target, options).await {
        Ok(ws) => {
            *conn = Some(ws);
            calls.reconnected();
            Ok(())
        }
        Err(e) => {
            *failed = Some(e.clone());
            Err(e)
        }
    }
}

fn lose(conn: &mut Option<WebSocketStream<TcpStream>>, calls: &mut Calls<Reply>) {
    *conn = None;
    calls.lost();
}

//! The blocking `WsRpcClient`: one persistent multiplexed connection, a reader thread, and
//! callers that write under a lock.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use microfw_core::RpcRequest;
use serde_json::{Map, Value};
use tungstenite::protocol::{Message, Role, WebSocket};

use crate::client::{
    Calls, ClientOptions, Responder, ServerMode, SharedMode, Target, WsCallError, WsClientError,
    client_config,
};
use crate::reply::decode_reply;
use crate::request::{RequestId, encode_request};
use crate::targets::{GET_TARGET, LIST_TARGETS, TargetDetail, parse_target_detail, parse_target_list};

/// A blocking client of a WebSocket RPC server (microfw's or micro_framework's).
///
/// The same protocol as the tokio half's client: one persistent connection carries every
/// call with an `id`, replies are matched by the echoed id, or in send order against a server
/// that does not echo ids; a lost connection fails the calls in flight
/// ([`WsCallError::ConnectionLost`]) and the next call reconnects. TCP_NODELAY is set. Calls
/// may be made from many threads at once (each blocks only itself); [`call_async`]
/// starts a call and returns a handle to wait on later.
///
/// Cheap to clone (clones share the connection). A reader thread per connection reads the
/// replies; it ends when the connection closes, and the connection is closed when the last
/// clone is dropped.
///
/// It does not retry calls, speak TLS (`wss`), or build proxies with attribute access.
///
/// [`call_async`]: Self::call_async
#[derive(Clone)]
pub struct WsRpcClient {
    inner: Arc<Inner>,
}

struct Inner {
    url: String,
    target: Target,
    options: ClientOptions,
    next_key: AtomicU64,
    mode: SharedMode,
    conn: Mutex<Option<Arc<Conn>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.get_mut().unwrap_or_else(PoisonError::into_inner).take() {
            conn.close();
        }
    }
}

impl std::fmt::Debug for WsRpcClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsRpcClient").field("url", &self.inner.url).field("mode", &self.mode()).finish()
    }
}

impl WsRpcClient {
    /// A client of `url` (`ws://host:port/path`; `?token=` may be part of it) that connects
    /// on its first call.
    pub fn new(url: &str, options: ClientOptions) -> Result<WsRpcClient, WsClientError> {
        let target = Target::parse(url, &options)?;
        let inner = Inner {
            url: url.to_owned(),
            target,
            options,
            next_key: AtomicU64::new(0),
            mode: SharedMode::default(),
            conn: Mutex::new(None),
        };
        Ok(WsRpcClient { inner: Arc::new(inner) })
    }

    /// A client of `url` whose connection is open (upgrade accepted) when this returns.
    pub fn connect(url: &str, options: ClientOptions) -> Result<WsRpcClient, WsClientError> {
        let client = WsRpcClient::new(url, options)?;
        client.connection().map_err(WsClientError::Connect)?;
        Ok(client)
    }

    /// Calls `method` and blocks for its reply, at most the client's default timeout.
    pub fn call(
        &self,
        method: &str,
        args: Vec<Value>,
        kwargs: Map<String, Value>,
    ) -> Result<Value, WsCallError> {
        self.call_async(method, args, kwargs).wait()
    }

    /// As [`call`](Self::call), with this call's own timeout.
    pub fn call_with_timeout(
        &self,
        method: &str,
        args: Vec<Value>,
        kwargs: Map<String, Value>,
        timeout: Duration,
    ) -> Result<Value, WsCallError> {
        self.call_async(method, args, kwargs).wait_timeout(timeout)
    }

    /// Sends the call now and returns a handle to wait for its reply (micro_framework's
    /// `call_async`). Several calls may be in flight on the connection at once.
    pub fn call_async(&self, method: &str, args: Vec<Value>, kwargs: Map<String, Value>) -> PendingCall {
        let key = self.inner.next_key.fetch_add(1, Ordering::Relaxed) + 1;
        let started = Instant::now();
        let timeout = self.inner.options.timeout;
        let conn = match self.connection() {
            Ok(conn) => conn,
            Err(e) => return PendingCall { key, conn: None, state: Waiting::Failed(e), started, timeout },
        };
        let request = RpcRequest { method: method.to_owned(), args, kwargs };
        let frame = encode_request(&request, Some(&RequestId::from(key)));
        let (tx, rx) = mpsc::sync_channel(1);
        if let Err(e) = conn.send(key, frame, Reply(tx)) {
            return PendingCall { key, conn: None, state: Waiting::Failed(e), started, timeout };
        }
        PendingCall { key, conn: Some(conn), state: Waiting::Reply(rx), started, timeout }
    }

    /// The server's targets (`__list_targets__`), with their parameter names and docs.
    pub fn targets(&self) -> Result<Vec<TargetDetail>, WsCallError> {
        let data = self.call(LIST_TARGETS, Vec::new(), Map::new())?;
        parse_target_list(&data).map_err(|e| WsCallError::MalformedReply(e.to_string()))
    }

    /// One target's detail (`__get_target__`). An unknown target is the server's `KeyError`.
    pub fn info(&self, target: &str) -> Result<TargetDetail, WsCallError> {
        let data = self.call(GET_TARGET, vec![Value::String(target.to_owned())], Map::new())?;
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

    /// The open connection, or a new one (callers wait for each other while connecting).
    fn connection(&self) -> Result<Arc<Conn>, WsCallError> {
        let mut slot = self.inner.conn.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(conn) = slot.as_ref().filter(|c| c.alive.load(Ordering::Acquire)) {
            return Ok(conn.clone());
        }
        let conn = Conn::open(&self.inner.target, &self.inner.options, self.inner.mode.clone())?;
        *slot = Some(conn.clone());
        Ok(conn)
    }
}

/// A call in flight ([`WsRpcClient::call_async`]).
#[must_use = "a call's result is only seen by waiting for it"]
pub struct PendingCall {
    key: u64,
    conn: Option<Arc<Conn>>,
    state: Waiting,
    started: Instant,
    timeout: Duration,
}

enum Waiting {
    Reply(mpsc::Receiver<Result<Value, WsCallError>>),
    Failed(WsCallError),
}

impl std::fmt::Debug for PendingCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingCall").field("key", &self.key).finish_non_exhaustive()
    }
}

impl PendingCall {
    /// Blocks until the reply, at most the client's default timeout counted from the call.
    pub fn wait(self) -> Result<Value, WsCallError> {
        let timeout = self.timeout;
        self.wait_timeout(timeout)
    }

    /// Blocks until the reply, at most `timeout` counted from the call. On timeout the
    /// call is abandoned (its reply is discarded); it may still run on the server.
    pub fn wait_timeout(mut self, timeout: Duration) -> Result<Value, WsCallError> {
        let rx = match std::mem::replace(&mut self.state, Waiting::Failed(WsCallError::Closed)) {
            Waiting::Failed(e) => return Err(e),
            Waiting::Reply(rx) => rx,
        };
        let left = timeout.saturating_sub(self.started.elapsed());
        match rx.recv_timeout(left) {
            Ok(result) => result,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Some(conn) = &self.conn {
                    conn.calls().cancel(self.key);
                }
                Err(WsCallError::Timeout(timeout))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(WsCallError::ConnectionLost),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Private machinery.

struct Reply(mpsc::SyncSender<Result<Value, WsCallError>>);

impl Responder for Reply {
    fn respond(self, result: Result<Value, WsCallError>) {
        let _ = self.0.try_send(result);
    }
}

/// One open connection: the writing side under a lock, the calls in flight, and the socket
/// (to shut it when the client goes away).
struct Conn {
    writer: Arc<Mutex<WebSocket<WriteHalf>>>,
    calls: Mutex<Calls<Reply>>,
    alive: AtomicBool,
    socket: TcpStream,
}

impl Conn {
    fn open(target: &Target, options: &ClientOptions, mode: SharedMode) -> Result<Arc<Conn>, WsCallError> {
        let connect_error = |e: &dyn std::fmt::Display| WsCallError::Connect(e.to_string());
        let addrs = (target.host.as_str(), target.port).to_socket_addrs().map_err(|e| connect_error(&e))?;
        let mut last = io::Error::new(io::ErrorKind::NotFound, "the host resolves to no address");
        let stream = addrs
            .into_iter()
            .find_map(|addr| match TcpStream::connect_timeout(&addr, options.connect_timeout) {
                Ok(s) => Some(s),
                Err(e) => {
                    last = e;
                    None
                }
            })
            .ok_or_else(|| connect_error(&last))?;
        let _ = stream.set_nodelay(true);
        let _ = stream.set_read_timeout(Some(options.connect_timeout));
        let _ = stream.set_write_timeout(Some(options.connect_timeout));
        let (write_stream, socket) = match (stream.try_clone(), stream.try_clone()) {
            (Ok(w), Ok(s)) => (w, s),
            (Err(e), _) | (_, Err(e)) => return Err(connect_error(&e)),
        };
        let config = client_config(options);
        let io = ReadHalf { stream, writer: None };
        let (mut ws, _) = tungstenite::client::client_with_config(target.request.clone(), io, Some(config))
            .map_err(|e| match e {
            tungstenite::HandshakeError::Failure(e) => connect_error(&e),
            tungstenite::HandshakeError::Interrupted(_) => connect_error(&"the upgrade timed out"),
        })?;
        let _ = ws.get_ref().stream.set_read_timeout(None);
        let _ = write_stream.set_write_timeout(None);
        let writer = Arc::new(Mutex::new(WebSocket::from_raw_socket(
            WriteHalf(write_stream),
            Role::Client,
            Some(config),
        )));
        ws.get_mut().writer = Some(writer.clone());
        let conn = Arc::new(Conn {
            writer,
            calls: Mutex::new(Calls::new(mode)),
            alive: AtomicBool::new(true),
            socket,
        });
        let reading = conn.clone();
        std::thread::Builder::new()
            .name("microfw-ws-client".into())
            .spawn(move || reading.read_loop(ws))
            .map_err(|e| connect_error(&e))?;
        Ok(conn)
    }

    fn calls(&self) -> MutexGuard<'_, Calls<Reply>> {
        self.calls.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers and writes a call; the registration and the write happen under the writer's
    /// lock, so the send order is the registration order (what in-order matching relies on).
    fn send(&self, key: u64, frame: String, reply: Reply) -> Result<(), WsCallError> {
        let mut writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        if !self.alive.load(Ordering::Acquire) {
            return Err(WsCallError::ConnectionLost);
        }
        self.calls().sent(key, reply);
        if writer.send(Message::text(frame)).is_err() {
            drop(writer);
            self.close();
        }
        // A failed write fails the call through `lost` (the reader sees the socket shut).
        Ok(())
    }

    fn close(&self) {
        self.alive.store(false, Ordering::Release);
        let _ = self.socket.shutdown(Shutdown::Both);
    }

    fn read_loop(self: Arc<Self>, mut ws: WebSocket<ReadHalf>) {
        loop {
            match ws.read() {
                Ok(Message::Text(text)) => self.calls().reply(decode_reply(text.as_str())),
                Ok(Message::Close(_)) | Err(_) => break,
                Ok(_) => {}
            }
        }
        // Under the writer's lock: no call registers between "not alive" and `lost`.
        let writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        self.close();
        self.calls().lost();
        drop(writer);
    }
}

/// The reader's side of the socket; what its websocket writes (pongs, close replies) goes
/// through the writer's lock once the upgrade is done.
struct ReadHalf {
    stream: TcpStream,
    writer: Option<Arc<Mutex<WebSocket<WriteHalf>>>>,
}

impl Read for ReadHalf {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.read(buf)
    }
}

impl Write for ReadHalf {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &self.writer {
            Some(writer) => {
                let mut writer = writer.lock().unwrap_or_else(PoisonError::into_inner);
                writer.flush().map_err(io::Error::other)?;
                writer.get_mut().0.write_all(buf)?;
                Ok(buf.len())
            }
            None => self.stream.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
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

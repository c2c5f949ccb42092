//! The client side shared by both IO halves' `WsRpcClient`: settings, errors, the parsed
//! target URL, and [`Calls`], which matches reply frames to calls (by the echoed id, or in send
//! order against a server that does not echo ids). No IO.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use microfw_core::RemoteError;
use serde_json::Value;
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::client::Request;
use tungstenite::http::{HeaderValue, header};

use crate::reply::{ReplyDecodeError, WsReply};

/// Settings of a WebSocket RPC client (either IO half's `WsRpcClient`). `Debug` never prints
/// the token.
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
    /// The first connection failed (`WsRpcClient::connect` only).
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

/// Where a call's result goes: the IO half's one-shot channel to the caller.
pub trait Responder: Send + 'static {
    /// Hands the result over (a caller that went away is not an error).
    fn respond(self, result: Result<Value, WsCallError>);
}

/// [`ServerMode`] as the [`Calls`] of a connection publish it (an `AtomicU8` the client handle
/// reads).
#[derive(Clone, Debug, Default)]
pub struct SharedMode(Arc<AtomicU8>);

const MODE_UNKNOWN: u8 = 0;
const MODE_MULTIPLEXED: u8 = 1;
const MODE_IN_ORDER: u8 = 2;

impl SharedMode {
    /// The mode last published.
    pub fn get(&self) -> ServerMode {
        match self.0.load(Ordering::Acquire) {
            MODE_MULTIPLEXED => ServerMode::Multiplexed,
            MODE_IN_ORDER => ServerMode::InOrder,
            _ => ServerMode::Unknown,
        }
    }

    fn set(&self, mode: ServerMode) {
        let raw = match mode {
            ServerMode::Unknown => MODE_UNKNOWN,
            ServerMode::Multiplexed => MODE_MULTIPLEXED,
            ServerMode::InOrder => MODE_IN_ORDER,
        };
        self.0.store(raw, Ordering::Release);
    }
}

/// The calls sent on one connection, and how their replies are matched.
///
/// Every request is sent with an id (`key`). A reply with an id answers that call; the first
/// such reply makes the connection [`ServerMode::Multiplexed`]. A reply without an id answers
/// the oldest call still waiting, in send order ([`ServerMode::InOrder`], micro_framework's
/// server, which runs one request at a time). In order mode a call the caller gave up on
/// ([`cancel`](Self::cancel)) keeps its place, so its late reply is consumed by it and not
/// handed to the next call.
///
/// It does not send anything, time anything out, or reconnect: the IO half does, and calls
/// [`lost`](Self::lost) when the connection goes.
#[derive(Debug)]
pub struct Calls<R> {
    /// Calls without a reply; `None` once the caller gave up.
    pending: HashMap<u64, Option<R>>,
    /// Send order, while the server might answer in order.
    order: VecDeque<u64>,
    mode: ServerMode,
    shown: SharedMode,
}

impl<R: Responder> Calls<R> {
    /// No calls; the mode is published to `shown`.
    pub fn new(shown: SharedMode) -> Self {
        shown.set(ServerMode::Unknown);
        Calls { pending: HashMap::new(), order: VecDeque::new(), mode: ServerMode::Unknown, shown }
    }

    /// The call `key` was written to the connection.
    pub fn sent(&mut self, key: u64, responder: R) {
        self.pending.insert(key, Some(responder));
        if self.mode != ServerMode::Multiplexed {
            self.order.push_back(key);
        }
    }

    /// The caller of `key` gave up (timeout, dropped): its reply will be discarded.
    pub fn cancel(&mut self, key: u64) {
        if self.mode == ServerMode::Multiplexed {
            self.pending.remove(&key);
        } else if let Some(slot) = self.pending.get_mut(&key) {
            *slot = None;
        }
    }

    /// A reply frame arrived (decoded): hands its result to its call, if one waits.
    pub fn reply(&mut self, decoded: Result<WsReply, ReplyDecodeError>) {
        let (id, result) = match decoded {
            Ok(r) => (r.id, r.reply.result.map_err(WsCallError::Remote)),
            Err(e) => (e.id.clone(), Err(WsCallError::MalformedReply(e.to_string()))),
        };
        let key = match id {
            Some(id) => {
                if self.mode != ServerMode::Multiplexed {
                    self.set_mode(ServerMode::Multiplexed);
                    self.order.clear();
                    self.pending.retain(|_, slot| slot.is_some());
                }
                id.as_i64().and_then(|n| u64::try_from(n).ok())
            }
            None => {
                self.set_mode(ServerMode::InOrder);
                std::iter::from_fn(|| self.order.pop_front()).find(|k| self.pending.contains_key(k))
            }
        };
        if let Some(Some(responder)) = key.and_then(|k| self.pending.remove(&k)) {
            responder.respond(result);
        }
    }

    /// The connection is gone: every call in flight fails with
    /// [`WsCallError::ConnectionLost`]; the mode is unknown again.
    pub fn lost(&mut self) {
        for (_, slot) in self.pending.drain() {
            if let Some(responder) = slot {
                responder.respond(Err(WsCallError::ConnectionLost));
            }
        }
        self.order.clear();
        self.set_mode(ServerMode::Unknown);
    }

    /// A new connection: nothing is known of its server yet.
    pub fn reconnected(&mut self) {
        self.set_mode(ServerMode::Unknown);
    }

    /// Calls waiting for a reply (including abandoned ones whose reply must be consumed).
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// True when no call waits.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    fn set_mode(&mut self, mode: ServerMode) {
        self.mode = mode;
        self.shown.set(mode);
    }
}

/// Where to connect: the upgrade request (with the token header when one is set) and the TCP
/// address.
#[derive(Debug, Clone)]
pub struct Target {
    /// The upgrade request.
    pub request: Request,
    /// The host to open the TCP connection to (IPv6 without brackets).
    pub host: String,
    /// The port (80 when the URL names none).
    pub port: u16,
}

impl Target {
    /// Parses `ws://host[:port][/path][?query]`; adds `Authorization: Bearer <token>` when
    /// `options` has a token. Refuses `wss` (no TLS here) and anything without a host.
    pub fn parse(url: &str, options: &ClientOptions) -> Result<Target, WsClientError> {
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
}

/// The websocket settings of a client connection.
pub(crate) fn client_config(options: &ClientOptions) -> tungstenite::protocol::WebSocketConfig {
    tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(options.max_message_size))
        .max_frame_size(Some(options.max_message_size))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use serde_json::json;

    use super::*;
    use crate::reply::decode_reply;

    #[derive(Clone, Default)]
    struct Slot(Arc<Mutex<Option<Result<Value, WsCallError>>>>);

    impl Responder for Slot {
        fn respond(self, result: Result<Value, WsCallError>) {
            *self.0.lock().unwrap() = Some(result);
        }
    }

    impl Slot {
        fn get(&self) -> Option<Result<Value, WsCallError>> {
            self.0.lock().unwrap().clone()
        }
    }

    #[test]
    fn replies_match_by_id_once_the_server_echoes_them() {
        let mode = SharedMode::default();
        let mut calls = Calls::new(mode.clone());
        let (a, b) = (Slot::default(), Slot::default());
        calls.sent(1, a.clone());
        calls.sent(2, b.clone());
        calls.cancel(1);
        calls.reply(decode_reply(r#"{"data": "b", "exception": null, "id": 2}"#));
        assert_eq!(mode.get(), ServerMode::Multiplexed);
        assert_eq!(b.get(), Some(Ok(json!("b"))));
        // The cancelled call's slot went with the switch to ids: its late reply is dropped.
        assert!(calls.is_empty());
        calls.reply(decode_reply(r#"{"data": "a", "exception": null, "id": 1}"#));
        assert_eq!(a.get(), None);
    }

    #[test]
    fn replies_without_ids_match_in_send_order_and_abandoned_calls_keep_their_place() {
        let mode = SharedMode::default();
        let mut calls = Calls::new(mode.clone());
        let slots: Vec<Slot> = (0..3).map(|_| Slot::default()).collect();
        for (i, s) in slots.iter().enumerate() {
            calls.sent(i as u64 + 1, s.clone());
        }
        calls.cancel(1);
        calls.reply(decode_reply(r#"{"data": "first", "exception": null}"#));
        assert_eq!(mode.get(), ServerMode::InOrder);
        assert_eq!(slots[0].get(), None);
        assert_eq!(slots[1].get(), None);
        calls.reply(decode_reply(
            r#"{"data": null, "exception": {"exception": "ValueError", "message": "x"}}"#,
        ));
        assert!(matches!(slots[1].get(), Some(Err(WsCallError::Remote(e))) if e.exc_type == "ValueError"));
        calls.reply(decode_reply("not json"));
        assert!(matches!(slots[2].get(), Some(Err(WsCallError::MalformedReply(_)))));
        // A reply nobody waits for is dropped.
        calls.reply(decode_reply(r#"{"data": 1, "exception": null}"#));
        let lost = Slot::default();
        calls.sent(9, lost.clone());
        calls.lost();
        assert_eq!(lost.get(), Some(Err(WsCallError::ConnectionLost)));
        assert_eq!(mode.get(), ServerMode::Unknown);
    }

    #[test]
    fn targets_parse_ws_urls_only() {
        let t = Target::parse("ws://[::1]:9000/rpc?token=x", &ClientOptions::default()).unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 9000));
        let t = Target::parse("ws://localhost", &ClientOptions::default().with_token("s")).unwrap();
        assert_eq!(t.port, 80);
        assert_eq!(t.request.headers()["authorization"], "Bearer s");
        assert!(Target::parse("wss://h/", &ClientOptions::default()).is_err());
        assert!(Target::parse("nonsense", &ClientOptions::default()).is_err());
        assert!(Target::parse("ws://h/", &ClientOptions::default().with_token("a\nb")).is_err());
    }
}

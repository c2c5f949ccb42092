//! Server and client settings shared by both IO halves, and the pure checks they make with
//! them (the upgrade's token, the address to bind).

use std::fmt;
use std::time::Duration;

use microfw_core::RemoteError;

use crate::reply::MICRO_FRAMEWORK_EXCEPTIONS;

/// The default most connections a server keeps open at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// The default length of the server's wait queue (calls accepted while every prefetch slot of
/// the WebSocket subscription is taken).
pub const DEFAULT_MAX_WAITING: usize = 256;
/// The default most requests one connection may have unanswered before the server stops
/// reading from it.
pub const DEFAULT_MAX_IN_FLIGHT_PER_CONNECTION: usize = 256;
/// The default time a connection with nothing in flight may stay silent before the server
/// closes it.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// The default time a client has to complete the WebSocket upgrade.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The close code the server sends when it closes an idle connection or stops (RFC 6455
/// "going away").
pub const CLOSE_GOING_AWAY: u16 = 1001;

/// Settings of a WebSocket RPC server (either IO half). The address comes from the service's
/// `WEBSOCKET_IP` / `WEBSOCKET_PORT` unless [`bind`](Self::bind) overrides it.
///
/// Build with [`Default`] and the `with_*` methods. `Debug` never prints the token.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerOptions {
    /// `host:port` to listen on instead of `WEBSOCKET_IP:WEBSOCKET_PORT` (port 0: any free
    /// port; read the bound address from the server's handle).
    pub bind: Option<String>,
    /// Largest message accepted, in bytes; a larger one closes the connection with 1009.
    /// Default [`DEFAULT_MAX_MESSAGE_SIZE`](crate::DEFAULT_MAX_MESSAGE_SIZE) (1 MiB).
    pub max_message_size: usize,
    /// Most connections open at once; an upgrade beyond it is refused with HTTP 503.
    /// Default [`DEFAULT_MAX_CONNECTIONS`].
    pub max_connections: usize,
    /// Calls that may wait in the server while every prefetch slot is taken; a call beyond
    /// it is answered `MaxConnectionsReached` at once. 0 refuses as soon as the prefetch is
    /// full (micro_framework's behaviour). Default [`DEFAULT_MAX_WAITING`].
    pub max_waiting: usize,
    /// Unanswered requests one connection may have before the server stops reading from it
    /// (back-pressure through TCP). Default [`DEFAULT_MAX_IN_FLIGHT_PER_CONNECTION`].
    pub max_in_flight_per_connection: usize,
    /// A connection with nothing in flight that sends nothing for this long is closed
    /// (1001). `None`: never. Default [`DEFAULT_IDLE_TIMEOUT`].
    pub idle_timeout: Option<Duration>,
    /// Time allowed for the upgrade request. Default [`DEFAULT_HANDSHAKE_TIMEOUT`].
    pub handshake_timeout: Duration,
    /// A shared secret: when set, an upgrade must carry `Authorization: Bearer <token>` or
    /// the query parameter `token=<token>`, or it is refused with HTTP 401 before any call.
    pub token: Option<String>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            bind: None,
            max_message_size: crate::DEFAULT_MAX_MESSAGE_SIZE,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_waiting: DEFAULT_MAX_WAITING,
            max_in_flight_per_connection: DEFAULT_MAX_IN_FLIGHT_PER_CONNECTION,
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            token: None,
        }
    }
}

impl ServerOptions {
    /// Listens on `addr` (`host:port`) instead of the configured address.
    pub fn with_bind(mut self, addr: impl Into<String>) -> Self {
        self.bind = Some(addr.into());
        self
    }

    /// Sets [`max_message_size`](Self::max_message_size).
    pub fn with_max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// Sets [`max_connections`](Self::max_connections).
    pub fn with_max_connections(mut self, n: usize) -> Self {
        self.max_connections = n;
        self
    }

    /// Sets [`max_waiting`](Self::max_waiting).
    pub fn with_max_waiting(mut self, n: usize) -> Self {
        self.max_waiting = n;
        self
    }

    /// Sets [`max_in_flight_per_connection`](Self::max_in_flight_per_connection) (at least 1).
    pub fn with_max_in_flight_per_connection(mut self, n: usize) -> Self {
        self.max_in_flight_per_connection = n.max(1);
        self
    }

    /// Sets [`idle_timeout`](Self::idle_timeout).
    pub fn with_idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Sets [`handshake_timeout`](Self::handshake_timeout).
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// Requires `token` on every upgrade ([`token`](Self::token)).
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// The address to listen on: [`bind`](Self::bind), or `ip:port` from the configuration
    /// (an IPv6 address is bracketed). Resolution is the IO half's business.
    pub fn address(&self, websocket_ip: &str, websocket_port: u16) -> String {
        match &self.bind {
            Some(addr) => addr.clone(),
            None if websocket_ip.contains(':') && !websocket_ip.starts_with('[') => {
                format!("[{websocket_ip}]:{websocket_port}")
            }
            None => format!("{websocket_ip}:{websocket_port}"),
        }
    }
}

impl fmt::Debug for ServerOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerOptions")
            .field("bind", &self.bind)
            .field("max_message_size", &self.max_message_size)
            .field("max_connections", &self.max_connections)
            .field("max_waiting", &self.max_waiting)
            .field("max_in_flight_per_connection", &self.max_in_flight_per_connection)
            .field("idle_timeout", &self.idle_timeout)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .finish()
    }
}

/// Whether an upgrade request carries the server's token: `authorization` is the value of
/// its `Authorization` header (`Bearer <token>`, scheme case-insensitive), `query` the
/// request target's query string (`a=1&token=<token>`, percent-decoded). Comparison takes the
/// same time wherever the first difference is.
///
/// Does not look at anything else of the request, and accepts nothing when `token` is empty
/// (an empty secret is a configuration mistake, not "no auth": pass no token for that).
pub fn authorized(token: &str, authorization: Option<&[u8]>, query: Option<&str>) -> bool {
    if token.is_empty() {
        return false;
    }
    let header_ok = authorization.and_then(bearer).is_some_and(|given| same(given, token.as_bytes()));
    let query_ok = query.is_some_and(|q| {
        q.split('&')
            .filter_map(|pair| pair.strip_prefix("token="))
            .any(|v| same(&percent_decode(v), token.as_bytes()))
    });
    header_ok || query_ok
}

/// The error a server answers when it stops before a call could start (the Engine handed it
/// back, or it waited in the server's queue): micro_framework's `MaxConnectionsReached`, so
/// its clients retry on a new connection (another instance, after a restart). The call did
/// not run.
pub fn shutting_down() -> RemoteError {
    RemoteError::new(MICRO_FRAMEWORK_EXCEPTIONS, "MaxConnectionsReached", "The service is shutting down")
}

/// The error a server answers when it closes while a call it started has no reply yet (the
/// shutdown timeout passed, or the Engine settled it without replying). The call may have
/// run, in part or whole: a client must not retry it blindly.
pub fn service_stopped() -> RemoteError {
    RemoteError::new("microfw", "ServiceStopped", "The service stopped before the call finished")
}

// ---------------------------------------------------------------------------------------------
// Private helpers.

fn bearer(header: &[u8]) -> Option<&[u8]> {
    let text = std::str::from_utf8(header).ok()?.trim();
    let (scheme, rest) = text.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim().as_bytes())
}

fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn percent_decode(s: &str) -> Vec<u8> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    out
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_come_from_the_bearer_header_or_the_query() {
        assert!(authorized("s3cret", Some(b"Bearer s3cret"), None));
        assert!(authorized("s3cret", Some(b"bearer  s3cret "), None));
        assert!(authorized("s3cret", None, Some("a=1&token=s3cret")));
        assert!(authorized("a b/c", None, Some("token=a%20b%2Fc")));
        assert!(authorized("a b", None, Some("token=a+b")));
        assert!(!authorized("s3cret", Some(b"Basic s3cret"), None));
        assert!(!authorized("s3cret", Some(b"Bearer s3cre"), Some("token=s3cretx")));
        assert!(!authorized("s3cret", None, None));
        assert!(!authorized("", Some(b"Bearer "), Some("token=")));
        // Broken escapes never panic.
        assert!(!authorized("x", None, Some("token=%")));
        assert!(!authorized("x", None, Some("token=%4")));
        assert!(!authorized("x", Some(&[0xff, 0xfe]), Some("token=%zz")));
    }

    #[test]
    fn address_prefers_the_override_and_brackets_ipv6() {
        let o = ServerOptions::default();
        assert_eq!(o.address("0.0.0.0", 8765), "0.0.0.0:8765");
        assert_eq!(o.address("::1", 0), "[::1]:0");
        assert_eq!(o.clone().with_bind("127.0.0.1:0").address("0.0.0.0", 8765), "127.0.0.1:0");
        let shown = format!("{:?}", o.with_token("hunter2"));
        assert!(!shown.contains("hunter2") && shown.contains("***"));
    }
}

//! The tokio half (feature `tokio`): [`WsServer`], the server link a runtime-tokio service
//! carries its `Source::WsRpc` subscription on, and [`WsRpcClient`], the async client.
//!
//! Both use tokio-tungstenite without TLS, set TCP_NODELAY on every socket, and write every
//! byte with this crate's pure codec; the server's decisions live in
//! [`ServerState`](crate::ServerState), shared with the blocking half.
//!
//! Wiring a server into a runtime: build `WsServer::new(options)` (optionally
//! `.with_connections_gauge(service_metrics.ws_connections())`), keep its
//! [`handle`](WsServer::handle) for the bound address, and hand the connector to the runtime
//! as the [`ConnectAsync`](microfw_core::link::ConnectAsync) of `Transport::WebSocket`. The
//! link's [`close`](microfw_core::link::Link::close) blocks: call it off the reactor
//! (`spawn_blocking`), as the `Link` contract says.

mod client;
mod server;

pub use crate::client::{ClientOptions, ServerMode, WsCallError, WsClientError};
pub use crate::handle::WsServerHandle;
pub use client::{WsCall, WsRpcClient};
pub use server::WsServer;

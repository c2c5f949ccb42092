//! The blocking half (feature `sync`, no tokio): [`WsServer`], the server link a
//! runtime-sync service carries its `Source::WsRpc` subscription on, and [`WsRpcClient`],
//! the blocking client.
//!
//! Both use tungstenite without TLS on OS threads, set TCP_NODELAY on every socket, and write
//! every byte with this crate's pure codec; the server's decisions live in
//! [`ServerState`](crate::ServerState), shared with the tokio half.
//!
//! Wiring a server into a runtime: build `WsServer::new(options)` (optionally
//! `.with_connections_gauge(service_metrics.ws_connections())`), keep its
//! [`handle`](WsServer::handle) for the bound address, and hand the connector to the runtime
//! as the [`Connect`](microfw_core::link::Connect) of `Transport::WebSocket`.

mod client;
mod server;

pub use crate::client::{ClientOptions, ServerMode, WsCallError, WsClientError};
pub use crate::handle::WsServerHandle;
pub use client::{PendingCall, WsRpcClient};
pub use server::WsServer;

//! # microfw-transport-ws
//!
//! Contract (to be built, see the transport-ws issue): a pure codec for micro_framework's
//! WebSocket RPC (`{"command","command_args","command_kwargs"}` / `{"data","exception"}`) with
//! an optional multiplexing `id`, and server and client halves on tokio-tungstenite (feature
//! `tokio`) and tungstenite (feature `sync`).
//!
//! What it does NOT do yet: anything. This crate is a placeholder that compiles so the
//! workspace layout is fixed; it holds no API.
#![warn(missing_docs)]

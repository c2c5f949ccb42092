//! The tokio half: a tokio-tungstenite server link and the async `WsRpcClient` (in progress).

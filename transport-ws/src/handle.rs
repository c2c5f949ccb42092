//! [`WsServerHandle`], the view of a server either IO half hands out.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use crate::session::SessionStats;

/// A view of a WebSocket server that outlives its connector: the bound address (for port 0)
/// and the server's counters. Cheap to clone; filled in when the server's `connect` bound it.
#[derive(Clone, Default)]
pub struct WsServerHandle(Arc<HandleInner>);

#[derive(Default)]
struct HandleInner {
    addr: OnceLock<SocketAddr>,
    stats: OnceLock<Box<dyn Fn() -> Option<SessionStats> + Send + Sync>>,
}

impl WsServerHandle {
    /// The address the server listens on, once bound.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.0.addr.get().copied()
    }

    /// The server's counters, while its link is alive.
    pub fn stats(&self) -> Option<SessionStats> {
        self.0.stats.get().and_then(|f| f())
    }

    /// Called once by the IO half when bound (later calls change nothing).
    pub(crate) fn bound(&self, addr: SocketAddr, stats: Box<dyn Fn() -> Option<SessionStats> + Send + Sync>) {
        let _ = self.0.addr.set(addr);
        let _ = self.0.stats.set(stats);
    }
}

impl std::fmt::Debug for WsServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsServerHandle").field("local_addr", &self.local_addr()).finish_non_exhaustive()
    }
}

//! The `ws_active_connections` gauge as both IO halves update it.

use std::sync::{Mutex, PoisonError};

use microfw_core::metrics::{LABEL_SERVICE, WS_ACTIVE_CONNECTIONS, WsConnections};

/// Open connections, counted and mirrored on the gauge: the runtime's handle when it gave
/// one (its `ServiceMetrics::ws_connections`), else a gauge registered with the recorder
/// current when the server starts.
#[derive(Debug)]
pub(crate) enum ConnGauge {
    Shared(WsConnections),
    Own { open: Mutex<u64>, gauge: metrics::Gauge },
}

impl ConnGauge {
    pub(crate) fn new(shared: Option<WsConnections>, service: &str) -> Self {
        match shared {
            Some(handle) => ConnGauge::Shared(handle),
            None => {
                let gauge = metrics::gauge!(WS_ACTIVE_CONNECTIONS, LABEL_SERVICE => service.to_owned());
                gauge.set(0.0);
                ConnGauge::Own { open: Mutex::new(0), gauge }
            }
        }
    }

    pub(crate) fn connected(&self) {
        match self {
            ConnGauge::Shared(handle) => handle.connected(),
            ConnGauge::Own { open, gauge } => {
                let mut open = open.lock().unwrap_or_else(PoisonError::into_inner);
                *open = open.saturating_add(1);
                gauge.set(*open as f64);
            }
        }
    }

    pub(crate) fn disconnected(&self) {
        match self {
            ConnGauge::Shared(handle) => handle.disconnected(),
            ConnGauge::Own { open, gauge } => {
                let mut open = open.lock().unwrap_or_else(PoisonError::into_inner);
                *open = open.saturating_sub(1);
                gauge.set(*open as f64);
            }
        }
    }
}

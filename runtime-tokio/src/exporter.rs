//! The Prometheus side of `ENABLE_METRICS`: the process-wide recorder of
//! `metrics-exporter-prometheus` and a small tokio HTTP server answering `GET /metrics` with
//! the recorder's rendering.
//!
//! The exporter's own HTTP listener (its `http-listener` feature) is not used: it binds inside
//! `PrometheusBuilder::build` and never reports the address it bound (so a configured port 0
//! could not be read back), it is tied to a recorder of its own (a second service could not
//! share the process's recorder on another address), and it answers every path with the
//! rendering. This server takes a few dozen lines and no hyper.
//!
//! The recorder is process-global, so it is installed once per process and shared by every
//! Runner; so is one server per configured `METRICS.HOST:METRICS.PORT`, which stops when the
//! last service using it stops. Each connection gets one request and one answer, within a
//! time limit and a bounded request size; at most [`MAX_CONNECTIONS`] are served at once.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

/// How long a connection may take to send its request and read the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest request head accepted (request line and headers).
const MAX_REQUEST: usize = 8 * 1024;
/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 32;
/// How often histogram samples are folded into their summaries when nobody scrapes. Samples
/// wait in memory until then (16 bytes each: ~20 MB per second at a million runs per second),
/// so this is shorter than the exporter's default of 5 s; a fold costs per sample, not per pass.
const UPKEEP_EVERY: Duration = Duration::from_secs(1);

/// Installs the Prometheus recorder as the process's global recorder, once; later calls
/// return the same handle. Fails (every time) if another global recorder was installed first.
pub(crate) fn install() -> Result<PrometheusHandle, String> {
    static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder)
                .map_err(|_| "another global metrics recorder is installed".to_owned())?;
            let upkeep = handle.clone();
            // A thread, not a task: it must outlive whichever tokio runtime installed the
            // recorder. Detached for the life of the process, like the recorder.
            let _ = std::thread::Builder::new().name("microfw-metrics-upkeep".into()).spawn(move || {
                loop {
                    std::thread::sleep(UPKEEP_EVERY);
                    upkeep.run_upkeep();
                }
            });
            Ok(handle)
        })
        .clone()
}

/// A service's use of a metric server; the server stops when the last lease is released
/// (or dropped).
#[derive(Debug)]
pub(crate) struct MetricsLease {
    key: (String, u16),
    /// The server this lease counts in (a server replaced under the same key has another id).
    server: u64,
    addr: SocketAddr,
    released: bool,
}

impl MetricsLease {
    /// Serves `handle` on `host:port` from a task of the current tokio runtime, or joins the
    /// server already serving that configured address in this process. Port 0 binds a free
    /// port (see [`addr`](Self::addr)).
    pub(crate) async fn acquire(
        host: &str,
        port: u16,
        handle: &PrometheusHandle,
    ) -> io::Result<MetricsLease> {
        let key = (host.to_owned(), port);
        if let Some(lease) = Self::join(&key) {
            return Ok(lease);
        }
        let listener = match TcpListener::bind((host, port)).await {
            Ok(listener) => listener,
            // Another service of this process may have bound it meanwhile: share it.
            Err(e) => return Self::join(&key).ok_or(e),
        };
        let addr = listener.local_addr()?;
        let mut servers = servers();
        // Another service may have started the same server while this one was binding.
        if let Some(server) = servers.get_mut(&key).filter(|s| !s.task.is_finished()) {
            server.users += 1;
            return Ok(MetricsLease { key, server: server.id, addr: server.addr, released: false });
        }
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let task = tokio::spawn(serve(listener, handle.clone()));
        servers.insert(key.clone(), Server { id, addr, users: 1, task });
        tracing::info!(%addr, "serving /metrics");
        Ok(MetricsLease { key, server: id, addr, released: false })
    }

    /// The address the server listens on.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Gives the lease back; if it was the last one, stops the server and waits (at most
    /// [`IO_TIMEOUT`]) until its socket is closed.
    pub(crate) async fn release(mut self) {
        if let Some(task) = self.detach() {
            let _ = tokio::time::timeout(IO_TIMEOUT, task).await;
        }
    }

    /// A lease on a live server already serving `key`.
    fn join(key: &(String, u16)) -> Option<MetricsLease> {
        let mut servers = servers();
        // A server whose runtime is gone (its task ended) is replaced, not joined.
        let server = servers.get_mut(key).filter(|s| !s.task.is_finished())?;
        server.users += 1;
        Some(MetricsLease { key: key.clone(), server: server.id, addr: server.addr, released: false })
    }

    /// Drops this lease's use; the last one aborts the server and returns its task.
    fn detach(&mut self) -> Option<JoinHandle<()>> {
        if std::mem::replace(&mut self.released, true) {
            return None;
        }
        let mut servers = servers();
        // A server replaced under the same key (its runtime ended) is not ours to count.
        let server = servers.get_mut(&self.key).filter(|s| s.id == self.server)?;
        server.users -= 1;
        if server.users > 0 {
            return None;
        }
        let server = servers.remove(&self.key)?;
        server.task.abort();
        tracing::info!(addr = %server.addr, "stopped serving /metrics");
        Some(server.task)
    }
}

impl Drop for MetricsLease {
    fn drop(&mut self) {
        // Not awaited: the socket closes when the aborted task is next scheduled.
        let _ = self.detach();
    }
}

#[derive(Debug)]
struct Server {
    id: u64,
    addr: SocketAddr,
    users: usize,
    task: JoinHandle<()>,
}

fn servers() -> std::sync::MutexGuard<'static, HashMap<(String, u16), Server>> {
    static SERVERS: OnceLock<Mutex<HashMap<(String, u16), Server>>> = OnceLock::new();
    SERVERS.get_or_init(Default::default).lock().unwrap_or_else(PoisonError::into_inner)
}

/// Accepts connections until aborted; each is answered by a task of its own.
async fn serve(listener: TcpListener, handle: PrometheusHandle) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        match listener.accept().await {
            Ok((stream, _)) => {
                let handle = handle.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(IO_TIMEOUT, answer(stream, &handle)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::debug!(error = %e, "metrics request failed"),
                        Err(_) => tracing::debug!("metrics request timed out"),
                    }
                    drop(slot);
                });
            }
            Err(e) => {
                // Out of file descriptors, say: pause instead of spinning.
                tracing::warn!(error = %e, "metrics server cannot accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Reads one request head and answers it; the connection closes after the answer.
async fn answer(mut stream: TcpStream, handle: &PrometheusHandle) -> io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let complete = loop {
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            break true;
        }
        if head.len() > MAX_REQUEST {
            break false;
        }
        match stream.read(&mut buf).await? {
            0 => break false,
            n => head.extend_from_slice(&buf[..n]),
        }
    };
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let mut parts = std::str::from_utf8(line).unwrap_or_default().split_whitespace();
    let (method, target) = (parts.next(), parts.next().map(|t| t.split('?').next().unwrap_or(t)));
    let (status, body) = match (complete, method, target) {
        (false, ..) => ("400 Bad Request", String::from("bad request\n")),
        (true, Some("GET"), Some("/metrics")) => {
            // Rendering walks every series: off the reactor, as the exporter's listener does.
            let handle = handle.clone();
            let body =
                tokio::task::spawn_blocking(move || handle.render()).await.map_err(io::Error::other)?;
            ("200 OK", body)
        }
        (true, Some("GET"), _) => ("404 Not Found", String::from("not found: try /metrics\n")),
        (true, _, _) => ("405 Method Not Allowed", String::from("only GET\n")),
    };
    let content_type = if status.starts_with("200") { "text/plain; version=0.0.4" } else { "text/plain" };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

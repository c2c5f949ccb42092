//! The Prometheus side of `ENABLE_METRICS`, with no async runtime: the process-wide
//! recorder of `metrics-exporter-prometheus` (its HTTP listener feature off) and a small
//! blocking HTTP server answering `GET /metrics` with the recorder's rendering.
//!
//! The recorder is process-global, so it is installed once per process and shared by every
//! Runner; so is one server per configured `METRICS.HOST:METRICS.PORT`, which stops when the
//! last service using it stops. The server handles one connection at a time (a scrape is a
//! short request; each connection has read and write timeouts and a bounded request size).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// How long a connection may take to send its request or read the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest request head accepted (request line and headers).
const MAX_REQUEST: usize = 8 * 1024;
/// How often histogram samples are folded into their summaries when nobody scrapes.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

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
            // Detached for the life of the process, like the recorder it maintains.
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

/// A service's use of a metric server; the server stops when the last lease is dropped.
#[derive(Debug)]
pub(crate) struct MetricsLease {
    key: (String, u16),
    addr: SocketAddr,
}

impl MetricsLease {
    /// Serves `handle` on `host:port`, or joins the server already serving that configured
    /// address in this process. Port 0 binds a free port (see [`addr`](Self::addr)).
    pub(crate) fn acquire(host: &str, port: u16, handle: &PrometheusHandle) -> io::Result<MetricsLease> {
        let key = (host.to_owned(), port);
        let mut servers = servers();
        if let Some(server) = servers.get_mut(&key) {
            server.users += 1;
            return Ok(MetricsLease { key, addr: server.addr });
        }
        let listener = TcpListener::bind((host, port))?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, handle) = (stop.clone(), handle.clone());
        let thread = std::thread::Builder::new()
            .name(format!("microfw-metrics-{}", addr.port()))
            .spawn(move || serve(&listener, &flag, &handle))?;
        servers.insert(key.clone(), Server { addr, users: 1, stop, thread });
        tracing::info!(%addr, "serving /metrics");
        Ok(MetricsLease { key, addr })
    }

    /// The address the server listens on.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsLease {
    fn drop(&mut self) {
        let mut servers = servers();
        let Some(server) = servers.get_mut(&self.key) else { return };
        server.users -= 1;
        if server.users > 0 {
            return;
        }
        let Some(server) = servers.remove(&self.key) else { return };
        server.stop.store(true, Ordering::Release);
        // Wake the blocking accept; if that fails the thread is left to end with the process.
        if TcpStream::connect_timeout(&wake_addr(server.addr), IO_TIMEOUT).is_ok() {
            let _ = server.thread.join();
        }
        tracing::info!(addr = %server.addr, "stopped serving /metrics");
    }
}

struct Server {
    addr: SocketAddr,
    users: usize,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

fn servers() -> std::sync::MutexGuard<'static, HashMap<(String, u16), Server>> {
    static SERVERS: OnceLock<Mutex<HashMap<(String, u16), Server>>> = OnceLock::new();
    SERVERS.get_or_init(Default::default).lock().unwrap_or_else(PoisonError::into_inner)
}

/// An address that reaches a listener bound to `addr` (loopback for a wildcard bind).
fn wake_addr(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port()),
        _ => addr,
    }
}

fn serve(listener: &TcpListener, stop: &AtomicBool, handle: &PrometheusHandle) {
    for stream in listener.incoming() {
        if stop.load(Ordering::Acquire) {
            return;
        }
        match stream {
            Ok(stream) => {
                if let Err(e) = answer(stream, handle) {
                    tracing::debug!(error = %e, "metrics request failed");
                }
            }
            Err(e) => {
                // Out of file descriptors, say: pause instead of spinning.
                tracing::warn!(error = %e, "metrics server cannot accept");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Reads one request head and answers it; the connection closes after the answer.
fn answer(mut stream: TcpStream, handle: &PrometheusHandle) -> io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let complete = loop {
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            break true;
        }
        if head.len() > MAX_REQUEST {
            break false;
        }
        match stream.read(&mut buf)? {
            0 => break false,
            n => head.extend_from_slice(&buf[..n]),
        }
    };
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let mut parts = std::str::from_utf8(line).unwrap_or_default().split_whitespace();
    let (method, target) = (parts.next(), parts.next().map(|t| t.split('?').next().unwrap_or(t)));
    let (status, body) = match (complete, method, target) {
        (false, ..) => ("400 Bad Request", String::from("bad request\n")),
        (true, Some("GET"), Some("/metrics")) => ("200 OK", handle.render()),
        (true, Some("GET"), _) => ("404 Not Found", String::from("not found: try /metrics\n")),
        (true, _, _) => ("405 Method Not Allowed", String::from("only GET\n")),
    };
    let content_type = if status.starts_with("200") { "text/plain; version=0.0.4" } else { "text/plain" };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(body.as_bytes())?;
    stream.flush()
}

//! Prometheus metrics with micro_framework's names and labels, recorded through the
//! [`metrics`] facade (no exporter, no IO: the runtime installs a recorder and serves it).
//!
//! A runtime builds one [`ServiceMetrics`] per service from its [`ServiceSpec`] and calls it at
//! the moments listed on each method; every handle (counter, gauge, histogram) is registered
//! once in [`ServiceMetrics::new`], so recording a message allocates nothing and formats
//! nothing.
//!
//! | name | kind | labels | changes when |
//! | --- | --- | --- | --- |
//! | [`TASKS_NUMBER`] | gauge | service, context, route | runs in progress (set from the runtime's count) |
//! | [`TASKS_NUMBER_TOTAL`] | counter | service, context, route | +1 per dispatched run (retries and callbacks too) |
//! | [`FAILED_TASKS_TOTAL`] | counter | service, context, route | +1 per run whose outcome is not a success |
//! | [`TASK_DURATION_SECONDS`] | histogram | service, context, route | seconds from dispatch to outcome |
//! | [`SERVICE_INFO`] | gauge (1) | service, context, max_workers, worker_mode | set at start |
//! | [`AVAILABLE_WORKERS`] | gauge | service, context | `max_workers - running`, never below 0 |
//! | [`WS_ACTIVE_CONNECTIONS`] | gauge | service | open WebSocket connections |
//! | [`RETRIES_TOTAL`] | counter | service, context, route | +1 per retry scheduled (our addition) |
//! | [`DEAD_LETTERS_TOTAL`] | counter | service, context, route | +1 per dead-lettered message (our addition) |
//!
//! The recorder is process-global, so every series carries a `service` label. Unlike
//! micro_framework, the gauges are set from counts the runtime keeps (never blind increments),
//! so a framework error cannot leak a worker: `available_workers` stays in `0..=max_workers`.
//! Counters are registered under their exposed names (`tasks_number_total`): the Prometheus
//! exporter appends no suffix. No `*_created` series (prometheus-client adds them; the
//! `metrics` exporters do not).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use metrics::{
    Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Label, Level, Metadata, Recorder, SharedString,
    Unit,
};

use crate::action::EngineEvent;
use crate::config::WorkerMode;
use crate::ids::{ContextId, RouteId};
use crate::outcome::Outcome;
use crate::service::ServiceSpec;

/// Gauge: runs in progress per route.
pub const TASKS_NUMBER: &str = "tasks_number";
/// Counter: runs dispatched per route (micro_framework's counter `tasks_number`, exposed so).
pub const TASKS_NUMBER_TOTAL: &str = "tasks_number_total";
/// Counter: runs that ended in a failure, a rejection or a panic.
pub const FAILED_TASKS_TOTAL: &str = "failed_tasks_total";
/// Histogram (a summary in the Prometheus exporter's default): run durations in seconds.
pub const TASK_DURATION_SECONDS: &str = "task_duration_seconds";
/// Gauge, always 1: a context's settings as labels (micro_framework's `Info("service")`).
pub const SERVICE_INFO: &str = "service_info";
/// Gauge: free workers per context.
pub const AVAILABLE_WORKERS: &str = "available_workers";
/// Gauge: open WebSocket connections.
pub const WS_ACTIVE_CONNECTIONS: &str = "ws_active_connections";
/// Counter: retries scheduled per route (not in micro_framework).
pub const RETRIES_TOTAL: &str = "retries_total";
/// Counter: messages dead-lettered per route (not in micro_framework).
pub const DEAD_LETTERS_TOTAL: &str = "dead_letters_total";

/// Label: the service name (`SERVICE_NAME`) on every series.
pub const LABEL_SERVICE: &str = "service";
/// Label: the context's metric label.
pub const LABEL_CONTEXT: &str = "context";
/// Label: the route's metric label.
pub const LABEL_ROUTE: &str = "route";
/// Label on [`SERVICE_INFO`]: the context's budget.
pub const LABEL_MAX_WORKERS: &str = "max_workers";
/// Label on [`SERVICE_INFO`]: the context's worker mode (`thread`, `greedy_thread`, ...).
pub const LABEL_WORKER_MODE: &str = "worker_mode";

/// One service's metric handles and the run counts its gauges are computed from.
///
/// Built once per service by the runtime (see [`new`](Self::new) for which recorder it
/// binds to). The run methods take `&mut self`: the driver that owns the Engine owns this
/// too, so the gauges it sets are exact. [`ws_connections`](Self::ws_connections) gives a
/// handle other tasks may share. Unknown route or context ids are ignored, never a panic.
/// It does not export or serve anything.
#[derive(Debug)]
pub struct ServiceMetrics {
    routes: Vec<RouteMetrics>,
    contexts: Vec<ContextMetrics>,
    ws: WsConnections,
}

impl ServiceMetrics {
    /// Registers every series of `spec` with the recorder current on this thread:
    /// the thread-local one ([`metrics::with_local_recorder`], for tests), else the global
    /// one, else none (every handle is then a no-op). Install the global recorder BEFORE
    /// calling this; a recorder installed later does not see these handles.
    ///
    /// `worker_modes[i]` is context `i`'s mode; a missing entry counts as the default
    /// ([`WorkerMode::Thread`]). Series appear at once (counters at 0); nothing else is
    /// recorded until [`started`](Self::started).
    pub fn new(spec: &ServiceSpec, worker_modes: &[WorkerMode]) -> Self {
        metrics::with_recorder(|recorder| Self::register(recorder, spec, worker_modes))
    }

    /// The service started: `service_info` = 1 and `available_workers` = `max_workers` for
    /// every context, `tasks_number` = 0 for every route.
    pub fn started(&mut self) {
        for context in &mut self.contexts {
            context.running = 0;
            context.info.set(1.0);
            context.available.set(f64::from(context.max));
        }
        for route in &mut self.routes {
            route.running = 0;
            route.tasks.set(0.0);
        }
    }

    /// A run of `route` was dispatched (every `Action::Dispatch`, retries and failure
    /// callbacks included): `tasks_number_total` +1, `tasks_number` and `available_workers`
    /// set from the new counts. `available_workers` never goes below 0, even if the runtime
    /// reports more runs than the budget.
    pub fn dispatched(&mut self, route: RouteId) {
        let Some(r) = self.routes.get_mut(route.into_raw() as usize) else { return };
        r.running = r.running.saturating_add(1);
        r.tasks.set(f64::from(r.running));
        r.total.increment(1);
        if let Some(c) = self.contexts.get_mut(r.context) {
            c.running = c.running.saturating_add(1);
            c.available.set(f64::from(c.max.saturating_sub(c.running)));
        }
    }

    /// A run of `route` ended with `outcome` after `elapsed` (measured by the runtime from
    /// dispatch to outcome): `task_duration_seconds` observes it, `failed_tasks_total` +1
    /// unless it is a success, and the gauges are set from the new counts. An end with no
    /// matching dispatch changes no gauge below 0.
    pub fn finished(&mut self, route: RouteId, outcome: &Outcome, elapsed: Duration) {
        let Some(r) = self.routes.get_mut(route.into_raw() as usize) else { return };
        r.running = r.running.saturating_sub(1);
        r.tasks.set(f64::from(r.running));
        r.duration.record(elapsed.as_secs_f64());
        if !matches!(outcome, Outcome::Success(_)) {
            r.failed.increment(1);
        }
        if let Some(c) = self.contexts.get_mut(r.context) {
            c.running = c.running.saturating_sub(1);
            c.available.set(f64::from(c.max.saturating_sub(c.running)));
        }
    }

    /// An Engine event: `Retrying` adds 1 to `retries_total`, `DeadLettered` to
    /// `dead_letters_total`, of its route; every other event is ignored.
    pub fn on_event(&mut self, event: &EngineEvent) {
        let (route, dead) = match event {
            EngineEvent::Retrying { route, .. } => (route, false),
            EngineEvent::DeadLettered { route } => (route, true),
            _ => return,
        };
        if let Some(r) = self.routes.get(route.into_raw() as usize) {
            if dead { r.dead_letters.increment(1) } else { r.retries.increment(1) }
        }
    }

    /// The free workers of `context` as this tracks them (`max_workers - running`, at least 0).
    pub fn available_workers(&self, context: ContextId) -> Option<u32> {
        self.contexts.get(context.into_raw() as usize).map(|c| c.max.saturating_sub(c.running))
    }

    /// A WebSocket connection opened: `ws_active_connections` +1.
    pub fn ws_connected(&self) {
        self.ws.connected();
    }

    /// A WebSocket connection closed: `ws_active_connections` -1, never below 0.
    pub fn ws_disconnected(&self) {
        self.ws.disconnected();
    }

    /// A shareable handle on `ws_active_connections`, for the task that accepts connections.
    pub fn ws_connections(&self) -> WsConnections {
        self.ws.clone()
    }

    fn register(recorder: &dyn Recorder, spec: &ServiceSpec, modes: &[WorkerMode]) -> Self {
        describe(recorder);
        let service = Label::new(LABEL_SERVICE, spec.name.to_string());
        let contexts = spec.contexts.iter().enumerate().map(|(i, c)| {
            let labels = vec![service.clone(), Label::new(LABEL_CONTEXT, c.metric_label.clone())];
            let mut info_labels = labels.clone();
            let mode = modes.get(i).copied().unwrap_or_default();
            info_labels.push(Label::new(LABEL_MAX_WORKERS, c.max_workers.to_string()));
            info_labels.push(Label::new(LABEL_WORKER_MODE, mode.as_str()));
            ContextMetrics {
                max: c.max_workers,
                running: 0,
                info: recorder.register_gauge(&Key::from_parts(SERVICE_INFO, info_labels), &METADATA),
                available: recorder.register_gauge(&Key::from_parts(AVAILABLE_WORKERS, labels), &METADATA),
            }
        });
        let contexts: Vec<_> = contexts.collect();
        let routes = spec.routes.iter().map(|(route, context)| {
            let context = context.into_raw() as usize;
            let label = spec.contexts.get(context).map_or_else(String::new, |c| c.metric_label.clone());
            let labels = vec![
                service.clone(),
                Label::new(LABEL_CONTEXT, label),
                Label::new(LABEL_ROUTE, route.metric_label.clone()),
            ];
            let key = |name: &'static str| Key::from_parts(name, labels.clone());
            RouteMetrics {
                context,
                running: 0,
                tasks: recorder.register_gauge(&key(TASKS_NUMBER), &METADATA),
                total: recorder.register_counter(&key(TASKS_NUMBER_TOTAL), &METADATA),
                failed: recorder.register_counter(&key(FAILED_TASKS_TOTAL), &METADATA),
                duration: recorder.register_histogram(&key(TASK_DURATION_SECONDS), &METADATA),
                retries: recorder.register_counter(&key(RETRIES_TOTAL), &METADATA),
                dead_letters: recorder.register_counter(&key(DEAD_LETTERS_TOTAL), &METADATA),
            }
        });
        let routes = routes.collect();
        let ws = recorder.register_gauge(&Key::from_parts(WS_ACTIVE_CONNECTIONS, vec![service]), &METADATA);
        ServiceMetrics { routes, contexts, ws: WsConnections { open: Arc::new(Mutex::new(0)), gauge: ws } }
    }
}

/// A service's `ws_active_connections` gauge with its count: cheap to clone, shared by the
/// tasks that accept and close WebSocket connections. The count never goes below 0 (a close
/// with no open connection changes nothing); the gauge is set under the count's lock, so it
/// is exact under concurrency.
#[derive(Clone, Debug)]
pub struct WsConnections {
    open: Arc<Mutex<u64>>,
    gauge: Gauge,
}

impl WsConnections {
    /// A connection opened.
    pub fn connected(&self) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        *open = open.saturating_add(1);
        self.gauge.set(*open as f64);
    }

    /// A connection closed.
    pub fn disconnected(&self) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        *open = open.saturating_sub(1);
        self.gauge.set(*open as f64);
    }
}

/// A recorder keeping every series in memory, for tests of code that records metrics
/// (use it with [`metrics::with_local_recorder`] around the code that registers the
/// handles, e.g. [`ServiceMetrics::new`]). Gauges also remember their lowest value ever set.
/// Not an exporter: it renders nothing and never forgets a series.
#[derive(Debug, Default)]
pub struct MemoryRecorder {
    series: Mutex<HashMap<SeriesKey, Series>>,
}

impl MemoryRecorder {
    /// An empty recorder.
    pub fn new() -> Self {
        Self::default()
    }

    /// The value of counter `name` with exactly these labels (in any order).
    pub fn counter(&self, name: &str, labels: &[(&str, &str)]) -> Option<u64> {
        match self.find(name, labels)? {
            Series::Counter(c) => Some(c.load(Ordering::Acquire)),
            _ => None,
        }
    }

    /// The value of gauge `name` with exactly these labels.
    pub fn gauge(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        match self.find(name, labels)? {
            Series::Gauge(g) => Some(g.value()),
            _ => None,
        }
    }

    /// The lowest value gauge `name` ever held (0 before any change).
    pub fn gauge_min(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        match self.find(name, labels)? {
            Series::Gauge(g) => Some(g.min()),
            _ => None,
        }
    }

    /// Every value histogram `name` observed, in order.
    pub fn histogram(&self, name: &str, labels: &[(&str, &str)]) -> Option<Vec<f64>> {
        match self.find(name, labels)? {
            Series::Histogram(h) => Some(h.0.lock().unwrap_or_else(PoisonError::into_inner).clone()),
            _ => None,
        }
    }

    fn find(&self, name: &str, labels: &[(&str, &str)]) -> Option<Series> {
        let mut wanted: Vec<(String, String)> =
            labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        wanted.sort();
        let series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        series.get(&(name.to_owned(), wanted)).cloned()
    }

    fn entry(&self, key: &Key, make: impl FnOnce() -> Series) -> Series {
        let mut labels: Vec<(String, String)> =
            key.labels().map(|l| (l.key().to_owned(), l.value().to_owned())).collect();
        labels.sort();
        let mut series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        series.entry((key.name().to_owned(), labels)).or_insert_with(make).clone()
    }
}

impl Recorder for MemoryRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        match self.entry(key, || Series::Counter(Arc::default())) {
            Series::Counter(c) => Counter::from_arc(c),
            _ => Counter::noop(),
        }
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        match self.entry(key, || Series::Gauge(Arc::default())) {
            Series::Gauge(g) => Gauge::from_arc(g),
            _ => Gauge::noop(),
        }
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        match self.entry(key, || Series::Histogram(Arc::default())) {
            Series::Histogram(h) => Histogram::from_arc(h),
            _ => Histogram::noop(),
        }
    }
}

static METADATA: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

struct RouteMetrics {
    context: usize,
    running: u32,
    tasks: Gauge,
    total: Counter,
    failed: Counter,
    duration: Histogram,
    retries: Counter,
    dead_letters: Counter,
}

impl std::fmt::Debug for RouteMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteMetrics")
            .field("context", &self.context)
            .field("running", &self.running)
            .finish()
    }
}

#[derive(Debug)]
struct ContextMetrics {
    max: u32,
    running: u32,
    info: Gauge,
    available: Gauge,
}

fn describe(recorder: &dyn Recorder) {
    let counter = |name: &'static str, unit, text: &'static str| {
        recorder.describe_counter(KeyName::from_const_str(name), unit, SharedString::const_str(text));
    };
    counter(TASKS_NUMBER_TOTAL, None, "Handler runs dispatched (retries and failure callbacks included).");
    counter(FAILED_TASKS_TOTAL, None, "Handler runs that failed, were rejected or panicked.");
    counter(RETRIES_TOTAL, None, "Retries scheduled.");
    counter(DEAD_LETTERS_TOTAL, None, "Messages sent to their dead-letter queue.");
    let gauge = |name: &'static str, text: &'static str| {
        recorder.describe_gauge(KeyName::from_const_str(name), None, SharedString::const_str(text));
    };
    gauge(TASKS_NUMBER, "Handler runs in progress.");
    gauge(SERVICE_INFO, "Context settings (value always 1).");
    gauge(AVAILABLE_WORKERS, "Free workers of the context.");
    gauge(WS_ACTIVE_CONNECTIONS, "Open WebSocket connections.");
    recorder.describe_histogram(
        KeyName::from_const_str(TASK_DURATION_SECONDS),
        Some(Unit::Seconds),
        SharedString::const_str("Handler run duration, dispatch to outcome."),
    );
}

type SeriesKey = (String, Vec<(String, String)>);

#[derive(Clone, Debug)]
enum Series {
    Counter(Arc<AtomicU64>),
    Gauge(Arc<GaugeCell>),
    Histogram(Arc<Samples>),
}

/// A gauge's value and the lowest value it ever held.
#[derive(Debug, Default)]
struct GaugeCell(Mutex<(f64, f64)>);

impl GaugeCell {
    fn value(&self) -> f64 {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).0
    }

    fn min(&self) -> f64 {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).1
    }
}

impl metrics::GaugeFn for GaugeCell {
    fn increment(&self, value: f64) {
        let mut g = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        g.0 += value;
        g.1 = g.1.min(g.0);
    }

    fn decrement(&self, value: f64) {
        self.increment(-value);
    }

    fn set(&self, value: f64) {
        let mut g = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        *g = (value, g.1.min(value));
    }
}

#[derive(Debug, Default)]
struct Samples(Mutex<Vec<f64>>);

impl HistogramFn for Samples {
    fn record(&self, value: f64) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).push(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EventListener, HandlerError, Route, RunnerContext, Service};

    fn noop() {}

    fn spec() -> ServiceSpec {
        let service = Service::new("svc")
            .context(
                RunnerContext::new(2)
                    .metric_label("ctx")
                    .route(Route::blocking(EventListener::new("src", "a"), "a", noop).metric_label("ra"))
                    .route(Route::blocking(EventListener::new("src", "b"), "b", noop)),
            )
            .context(RunnerContext::new(1).route(Route::blocking(EventListener::new("src", "c"), "c", noop)));
        service.build().unwrap().0
    }

    const RA: &[(&str, &str)] = &[("service", "svc"), ("context", "ctx"), ("route", "ra")];
    const CTX: &[(&str, &str)] = &[("service", "svc"), ("context", "ctx")];

    fn with_metrics(modes: &[WorkerMode]) -> (Arc<MemoryRecorder>, ServiceMetrics) {
        let rec = Arc::new(MemoryRecorder::new());
        let m = metrics::with_local_recorder(&*rec, || ServiceMetrics::new(&spec(), modes));
        (rec, m)
    }

    #[test]
    fn start_sets_info_and_budgets() {
        let (rec, mut m) = with_metrics(&[WorkerMode::GreedyThread]);
        assert_eq!(rec.counter(TASKS_NUMBER_TOTAL, RA), Some(0), "registered before any run");
        assert_eq!(rec.gauge(AVAILABLE_WORKERS, CTX), Some(0.0));
        m.started();
        assert_eq!(rec.gauge(AVAILABLE_WORKERS, CTX), Some(2.0));
        let info =
            [("service", "svc"), ("context", "ctx"), ("max_workers", "2"), ("worker_mode", "greedy_thread")];
        assert_eq!(rec.gauge(SERVICE_INFO, &info), Some(1.0));
        // The second context has no mode given (default thread) and the default labels.
        let spec = spec();
        let (route_b, ctx2) = (&spec.routes[1].0.metric_label, &spec.contexts[1].metric_label);
        assert!(route_b.starts_with("Route__"), "{route_b}");
        let info2 = [("service", "svc"), ("context", ctx2), ("max_workers", "1"), ("worker_mode", "thread")];
        assert_eq!(rec.gauge(SERVICE_INFO, &info2), Some(1.0));
        assert_eq!(
            rec.gauge(TASKS_NUMBER, &[("service", "svc"), ("context", "ctx"), ("route", route_b)]),
            Some(0.0)
        );
    }

    #[test]
    fn runs_move_counts_and_gauges() {
        let (rec, mut m) = with_metrics(&[]);
        m.started();
        let a = RouteId::from_raw(0);
        m.dispatched(a);
        m.dispatched(a);
        assert_eq!(rec.gauge(TASKS_NUMBER, RA), Some(2.0));
        assert_eq!(rec.gauge(AVAILABLE_WORKERS, CTX), Some(0.0));
        assert_eq!(m.available_workers(ContextId::from_raw(0)), Some(0));
        m.finished(a, &Outcome::Success(None), Duration::from_millis(250));
        m.finished(a, &Outcome::Failed(HandlerError::fatal("E", "no")), Duration::from_millis(500));
        assert_eq!(rec.counter(TASKS_NUMBER_TOTAL, RA), Some(2));
        assert_eq!(rec.counter(FAILED_TASKS_TOTAL, RA), Some(1));
        assert_eq!(rec.gauge(TASKS_NUMBER, RA), Some(0.0));
        assert_eq!(rec.gauge(AVAILABLE_WORKERS, CTX), Some(2.0));
        assert_eq!(rec.histogram(TASK_DURATION_SECONDS, RA), Some(vec![0.25, 0.5]));
        m.finished(a, &Outcome::Panicked("x".into()), Duration::ZERO);
        assert_eq!(rec.counter(FAILED_TASKS_TOTAL, RA), Some(2));
    }

    #[test]
    fn available_workers_never_negative_or_above_max() {
        let (rec, mut m) = with_metrics(&[]);
        m.started();
        let a = RouteId::from_raw(0);
        for _ in 0..5 {
            m.dispatched(a); // more than the budget of 2
        }
        for _ in 0..9 {
            m.finished(a, &Outcome::Success(None), Duration::ZERO); // more ends than runs
        }
        assert_eq!(rec.gauge_min(AVAILABLE_WORKERS, CTX), Some(0.0));
        assert_eq!(rec.gauge_min(TASKS_NUMBER, RA), Some(0.0));
        assert_eq!(rec.gauge(AVAILABLE_WORKERS, CTX), Some(2.0));
        m.dispatched(RouteId::from_raw(99)); // unknown: ignored
        m.finished(RouteId::from_raw(99), &Outcome::Success(None), Duration::ZERO);
    }

    #[test]
    fn events_count_retries_and_dead_letters() {
        let (rec, mut m) = with_metrics(&[]);
        let route = RouteId::from_raw(0);
        let error = HandlerError::retryable("E", "later");
        m.on_event(&EngineEvent::Retrying { route, attempt: 1, delay: Duration::ZERO, error });
        m.on_event(&EngineEvent::DeadLettered { route });
        m.on_event(&EngineEvent::DeadLettered { route });
        m.on_event(&EngineEvent::Filtered { route });
        assert_eq!(rec.counter(RETRIES_TOTAL, RA), Some(1));
        assert_eq!(rec.counter(DEAD_LETTERS_TOTAL, RA), Some(2));
    }

    #[test]
    fn ws_connections_never_negative() {
        let (rec, m) = with_metrics(&[]);
        let ws = m.ws_connections();
        m.ws_connected();
        ws.connected();
        assert_eq!(rec.gauge(WS_ACTIVE_CONNECTIONS, &[("service", "svc")]), Some(2.0));
        for _ in 0..3 {
            m.ws_disconnected();
        }
        assert_eq!(rec.gauge(WS_ACTIVE_CONNECTIONS, &[("service", "svc")]), Some(0.0));
        assert_eq!(rec.gauge_min(WS_ACTIVE_CONNECTIONS, &[("service", "svc")]), Some(0.0));
    }

    #[test]
    fn no_recorder_means_no_op_handles() {
        let mut m = ServiceMetrics::new(&spec(), &[]);
        m.started();
        m.dispatched(RouteId::from_raw(0));
        assert_eq!(m.available_workers(ContextId::from_raw(0)), Some(1));
    }
}

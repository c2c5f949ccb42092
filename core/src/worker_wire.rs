//! The frames a service and its worker processes exchange in `process` worker mode: what they
//! mean and how they are encoded. Pure: no pipes, no processes, no IO (the runtimes move the
//! bytes).
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of JSON (serde_json).
//! The parent sends [`ToWorker`] frames (a job to run, the answer to a client request) and
//! the worker sends [`FromWorker`] frames (its [`WorkerHello`] once at start, a job's
//! outcome, a client request: an event to emit or an RPC call to make, which the parent
//! carries out with the worker's context attached).
//!
//! Both ends are the same binary, so the JSON shape is private to this module and may change
//! between versions; only the length prefix and [`MAX_FRAME`] are fixed.
//!
//! What does not cross: a job's [`Extensions`] (the worker puts
//! its own), and a payload a typed filter already decoded ([`PayloadData::Decoded`]): the
//! worker gets its raw body and decodes it again.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::action::{CallError, OutgoingCall, OutgoingEvent, PublishError, Transport};
use crate::extract::{Attempt, Extensions, Job, JobInput, JobParts, PayloadData};
use crate::ids::{ContextId, DispatchId, RouteId};
use crate::message::{FieldValue, Headers, RemoteError};
use crate::outcome::{HandlerError, Outcome, Rejection, RejectionStage};
use crate::route::Dialect;
use crate::service::ServiceSpec;
use crate::time::Instant;
use crate::worker_context::WorkerContext;

/// The environment variable that makes a process a worker: its value is a [`WorkerTarget`]
/// (`<service>/<context index>`). A runner starting a service sees it and serves jobs for that
/// context instead of starting the service.
pub const WORKER_ENV: &str = "MICROFW_PROCESS_WORKER";

/// Length of a frame's length prefix.
pub const PREFIX_LEN: usize = 4;

/// Largest frame body either side accepts (128 MiB): a bigger length prefix is a broken
/// stream, not a big message.
pub const MAX_FRAME: usize = 128 << 20;

/// Which context of which service a worker process serves: `<service>/<context index>` in
/// [`WORKER_ENV`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerTarget {
    /// The service name.
    pub service: String,
    /// The context (index in declaration order).
    pub context: ContextId,
}

impl fmt::Display for WorkerTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.service, self.context)
    }
}

impl FromStr for WorkerTarget {
    type Err = WireError;

    /// Parses `<service>/<context index>`; the service name may not be empty.
    fn from_str(s: &str) -> Result<Self, WireError> {
        let bad = || WireError::Decode(format!("{WORKER_ENV}: expected <service>/<context>, got {s:?}"));
        let (service, context) = s.rsplit_once('/').ok_or_else(bad)?;
        let context = context.parse::<u32>().map_err(|_| bad())?;
        if service.is_empty() {
            return Err(bad());
        }
        Ok(WorkerTarget { service: service.to_owned(), context: ContextId(context) })
    }
}

/// The first frame a worker sends: who it is and the routes it built, so the parent can tell
/// a worker that rebuilt a different service (another binary, other arguments) from a good one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerHello {
    /// The service the worker built.
    pub service: String,
    /// The context it serves.
    pub context: u32,
    /// Every route name of the service, by route id.
    pub routes: Vec<String>,
    /// The worker's process id.
    pub pid: u32,
}

impl WorkerHello {
    /// The hello a worker of `context` of `spec` sends.
    pub fn new(spec: &ServiceSpec, context: ContextId, pid: u32) -> Self {
        WorkerHello {
            service: spec.name.to_string(),
            context: context.0,
            routes: spec.routes.iter().map(|(r, _)| r.name.clone()).collect(),
            pid,
        }
    }

    /// True when `other` describes the same service, context and routes (pids aside).
    pub fn same_service(&self, other: &WorkerHello) -> bool {
        self.service == other.service && self.context == other.context && self.routes == other.routes
    }
}

/// A frame from the parent to a worker process.
#[derive(Debug)]
pub enum ToWorker {
    /// A job to run (its extensions are not sent).
    Job(Job),
    /// The result of the worker's [`FromWorker::Emit`] with the same `request`.
    Emitted {
        /// The worker's request number.
        request: u64,
        /// The confirm; `None` when the service stopped before confirming (the producer's
        /// `ShuttingDown`).
        result: Option<Result<(), PublishError>>,
    },
    /// The result of the worker's [`FromWorker::Call`] with the same `request`.
    Called {
        /// The worker's request number.
        request: u64,
        /// The reply.
        result: Result<Value, CallError>,
    },
}

/// A frame from a worker process to the parent.
#[derive(Clone, Debug, PartialEq)]
pub enum FromWorker {
    /// Sent once, first.
    Hello(WorkerHello),
    /// A job ended.
    Outcome {
        /// The job's dispatch.
        dispatch: DispatchId,
        /// What it produced.
        outcome: Outcome,
    },
    /// A handler's `Producer` dispatches an event; answered by [`ToWorker::Emitted`].
    Emit {
        /// Numbered by the worker, unique among its pending requests.
        request: u64,
        /// The event, with the worker's context.
        event: OutgoingEvent,
    },
    /// A handler's `RpcProxy` calls; answered by [`ToWorker::Called`].
    Call {
        /// Numbered by the worker, unique among its pending requests.
        request: u64,
        /// The call, with the worker's context.
        call: OutgoingCall,
    },
}

/// Why a frame could not be encoded or decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// A length prefix above [`MAX_FRAME`] (or a frame that would be).
    #[error("frame of {0} bytes is larger than the limit of {MAX_FRAME}")]
    TooLarge(usize),
    /// The value could not be encoded as JSON.
    #[error("cannot encode a frame: {0}")]
    Encode(String),
    /// The bytes are not a frame of the expected kind.
    #[error("bad frame: {0}")]
    Decode(String),
}

/// The body length a frame's prefix announces; [`WireError::TooLarge`] above [`MAX_FRAME`].
pub fn body_len(prefix: [u8; PREFIX_LEN]) -> Result<usize, WireError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME { Err(WireError::TooLarge(len)) } else { Ok(len) }
}

/// Encodes a frame for a worker, length prefix included.
pub fn encode_to_worker(frame: &ToWorker) -> Result<Vec<u8>, WireError> {
    let wire = match frame {
        ToWorker::Job(job) => WToWorker::Job(WJob::from_job(job)),
        ToWorker::Emitted { request, result } => WToWorker::Emitted {
            request: *request,
            result: result.as_ref().map(|r| r.as_ref().copied().map_err(WPublishError::from_core)),
        },
        ToWorker::Called { request, result } => WToWorker::Called {
            request: *request,
            result: result.as_ref().cloned().map_err(WCallError::from_core),
        },
    };
    frame_bytes(&wire)
}

/// Decodes a frame body (without its prefix) a parent sent. A job comes back with empty
/// [`Extensions`].
pub fn decode_to_worker(body: &[u8]) -> Result<ToWorker, WireError> {
    let wire: WToWorker = serde_json::from_slice(body).map_err(|e| WireError::Decode(e.to_string()))?;
    Ok(match wire {
        WToWorker::Job(job) => ToWorker::Job(job.into_job()),
        WToWorker::Emitted { request, result } => {
            ToWorker::Emitted { request, result: result.map(|r| r.map_err(WPublishError::into_core)) }
        }
        WToWorker::Called { request, result } => {
            ToWorker::Called { request, result: result.map_err(WCallError::into_core) }
        }
    })
}

/// Encodes a frame for the parent, length prefix included.
pub fn encode_from_worker(frame: &FromWorker) -> Result<Vec<u8>, WireError> {
    let wire = match frame {
        FromWorker::Hello(hello) => WFromWorker::Hello(hello.clone()),
        FromWorker::Outcome { dispatch, outcome } => {
            WFromWorker::Outcome { dispatch: dispatch.0, outcome: WOutcome::from_core(outcome) }
        }
        FromWorker::Emit { request, event } => {
            WFromWorker::Emit { request: *request, event: WEvent::from_core(event) }
        }
        FromWorker::Call { request, call } => {
            WFromWorker::Call { request: *request, call: WCall::from_core(call) }
        }
    };
    frame_bytes(&wire)
}

/// Decodes a frame body (without its prefix) a worker sent.
pub fn decode_from_worker(body: &[u8]) -> Result<FromWorker, WireError> {
    let wire: WFromWorker = serde_json::from_slice(body).map_err(|e| WireError::Decode(e.to_string()))?;
    Ok(match wire {
        WFromWorker::Hello(hello) => FromWorker::Hello(hello),
        WFromWorker::Outcome { dispatch, outcome } => {
            FromWorker::Outcome { dispatch: DispatchId(dispatch), outcome: outcome.into_core() }
        }
        WFromWorker::Emit { request, event } => FromWorker::Emit { request, event: event.into_core() },
        WFromWorker::Call { request, call } => FromWorker::Call { request, call: call.into_core() },
    })
}

fn frame_bytes(value: &impl Serialize) -> Result<Vec<u8>, WireError> {
    let mut bytes = vec![0; PREFIX_LEN];
    serde_json::to_writer(&mut bytes, value).map_err(|e| WireError::Encode(e.to_string()))?;
    let len = bytes.len() - PREFIX_LEN;
    let prefix = u32::try_from(len).ok().filter(|_| len <= MAX_FRAME).ok_or(WireError::TooLarge(len))?;
    bytes[..PREFIX_LEN].copy_from_slice(&prefix.to_be_bytes());
    Ok(bytes)
}

// The JSON shapes. Mirrors of the core types, so the public types carry no serde derives
// and floats survive (a NaN header value travels as its bits).

#[derive(Serialize, Deserialize)]
enum WToWorker {
    Job(WJob),
    Emitted { request: u64, result: Option<Result<(), WPublishError>> },
    Called { request: u64, result: Result<Value, WCallError> },
}

#[derive(Serialize, Deserialize)]
enum WFromWorker {
    Hello(WorkerHello),
    Outcome { dispatch: u64, outcome: WOutcome },
    Emit { request: u64, event: WEvent },
    Call { request: u64, call: WCall },
}

#[derive(Serialize, Deserialize)]
struct WJob {
    dispatch: u64,
    route: u32,
    dispatched_at: u64,
    retry_count: u32,
    last_retry: Option<u64>,
    last_error: Option<String>,
    context: WContext,
    failure: Option<WHandlerError>,
    input: WInput,
}

impl WJob {
    fn from_job(job: &Job) -> Self {
        let parts = &job.parts;
        WJob {
            dispatch: parts.dispatch.0,
            route: parts.route.0,
            dispatched_at: parts.dispatched_at.as_unix_nanos(),
            retry_count: parts.attempt.retry_count,
            last_retry: parts.attempt.last_retry.map(Instant::as_unix_nanos),
            last_error: parts.attempt.last_error.clone(),
            context: WContext::from_core(&parts.context),
            failure: parts.failure.as_ref().map(WHandlerError::from_core),
            input: match &job.input {
                JobInput::Payload(PayloadData::Raw(raw) | PayloadData::Decoded { raw, .. }) => {
                    WInput::Body(WBytes::from_core(raw))
                }
                JobInput::Payload(PayloadData::Json(value)) => WInput::Json(value.clone()),
                JobInput::Rpc { args, kwargs } => WInput::Rpc { args: args.clone(), kwargs: kwargs.clone() },
                JobInput::None => WInput::None,
            },
        }
    }

    fn into_job(self) -> Job {
        Job {
            parts: JobParts {
                dispatch: DispatchId(self.dispatch),
                route: RouteId(self.route),
                dispatched_at: Instant::from_unix_nanos(self.dispatched_at),
                attempt: Attempt {
                    retry_count: self.retry_count,
                    last_retry: self.last_retry.map(Instant::from_unix_nanos),
                    last_error: self.last_error,
                },
                context: self.context.into_core(),
                failure: self.failure.map(WHandlerError::into_core),
                extensions: Extensions::new(),
            },
            input: match self.input {
                WInput::Body(bytes) => JobInput::Payload(PayloadData::Raw(bytes.into_core())),
                WInput::Json(value) => JobInput::Payload(PayloadData::Json(value)),
                WInput::Rpc { args, kwargs } => JobInput::Rpc { args, kwargs },
                WInput::None => JobInput::None,
            },
        }
    }
}

#[derive(Serialize, Deserialize)]
enum WInput {
    Body(WBytes),
    Json(Value),
    Rpc { args: Vec<Value>, kwargs: Map<String, Value> },
    None,
}

/// Bytes as text when they are UTF-8 (bodies are JSON in practice), else as numbers.
#[derive(Serialize, Deserialize)]
enum WBytes {
    Text(String),
    Raw(Vec<u8>),
}

impl WBytes {
    fn from_core(bytes: &[u8]) -> Self {
        match std::str::from_utf8(bytes) {
            Ok(text) => WBytes::Text(text.to_owned()),
            Err(_) => WBytes::Raw(bytes.to_vec()),
        }
    }

    fn into_core(self) -> bytes::Bytes {
        match self {
            WBytes::Text(text) => bytes::Bytes::from(text),
            WBytes::Raw(raw) => bytes::Bytes::from(raw),
        }
    }
}

#[derive(Serialize, Deserialize)]
enum WField {
    Void,
    Bool(bool),
    I64(i64),
    /// The float's bits.
    F64(u64),
    Str(String),
    Bytes(Vec<u8>),
    Array(Vec<WField>),
    Table(Vec<(String, WField)>),
    Timestamp(u64),
}

impl WField {
    fn from_core(value: &FieldValue) -> Self {
        match value {
            FieldValue::Void => WField::Void,
            FieldValue::Bool(b) => WField::Bool(*b),
            FieldValue::I64(n) => WField::I64(*n),
            FieldValue::F64(x) => WField::F64(x.to_bits()),
            FieldValue::Str(s) => WField::Str(s.clone()),
            FieldValue::Bytes(b) => WField::Bytes(b.clone()),
            FieldValue::Array(items) => WField::Array(items.iter().map(WField::from_core).collect()),
            FieldValue::Table(table) => WField::Table(table_from_core(table)),
            FieldValue::Timestamp(t) => WField::Timestamp(*t),
        }
    }

    fn into_core(self) -> FieldValue {
        match self {
            WField::Void => FieldValue::Void,
            WField::Bool(b) => FieldValue::Bool(b),
            WField::I64(n) => FieldValue::I64(n),
            WField::F64(bits) => FieldValue::F64(f64::from_bits(bits)),
            WField::Str(s) => FieldValue::Str(s),
            WField::Bytes(b) => FieldValue::Bytes(b),
            WField::Array(items) => FieldValue::Array(items.into_iter().map(WField::into_core).collect()),
            WField::Table(table) => FieldValue::Table(table_into_core(table)),
            WField::Timestamp(t) => FieldValue::Timestamp(t),
        }
    }
}

fn table_from_core(headers: &Headers) -> Vec<(String, WField)> {
    headers.iter().map(|(k, v)| (k.to_owned(), WField::from_core(v))).collect()
}

fn table_into_core(table: Vec<(String, WField)>) -> Headers {
    table.into_iter().map(|(k, v)| (k, v.into_core())).collect()
}

#[derive(Serialize, Deserialize)]
struct WContext {
    service: String,
    method: String,
    inbound: Vec<(String, WField)>,
    /// The call uuid, high and low halves (JSON numbers are not 128 bits wide).
    uuid: [u64; 2],
    overrides: Vec<(String, WField)>,
}

impl WContext {
    fn from_core(context: &WorkerContext) -> Self {
        let (service, method, inbound, uuid, overrides) = context.wire_parts();
        WContext {
            service: service.to_owned(),
            method: method.to_owned(),
            inbound: table_from_core(inbound),
            uuid: [(uuid >> 64) as u64, uuid as u64],
            overrides: table_from_core(overrides),
        }
    }

    fn into_core(self) -> WorkerContext {
        WorkerContext::from_wire_parts(
            Arc::from(self.service),
            Arc::from(self.method),
            table_into_core(self.inbound),
            (u128::from(self.uuid[0]) << 64) | u128::from(self.uuid[1]),
            table_into_core(self.overrides),
        )
    }
}

#[derive(Serialize, Deserialize)]
struct WRemote {
    exc_type: String,
    module: String,
    args: Vec<String>,
    message: String,
}

impl WRemote {
    fn from_core(e: &RemoteError) -> Self {
        WRemote {
            exc_type: e.exc_type.clone(),
            module: e.module.clone(),
            args: e.args.clone(),
            message: e.message.clone(),
        }
    }

    fn into_core(self) -> RemoteError {
        RemoteError { exc_type: self.exc_type, module: self.module, args: self.args, message: self.message }
    }
}

#[derive(Serialize, Deserialize)]
struct WHandlerError {
    retryable: bool,
    error: WRemote,
}

impl WHandlerError {
    fn from_core(e: &HandlerError) -> Self {
        WHandlerError { retryable: e.retryable, error: WRemote::from_core(&e.error) }
    }

    fn into_core(self) -> HandlerError {
        HandlerError { retryable: self.retryable, error: self.error.into_core() }
    }
}

#[derive(Serialize, Deserialize)]
enum WStage {
    Decode,
    Filter,
    Translate,
    Extract,
}

#[derive(Serialize, Deserialize)]
enum WOutcome {
    Success(Option<Value>),
    Failed(WHandlerError),
    Rejected { stage: WStage, error: WRemote },
    Panicked(String),
}

impl WOutcome {
    fn from_core(outcome: &Outcome) -> Self {
        match outcome {
            Outcome::Success(value) => WOutcome::Success(value.clone()),
            Outcome::Failed(e) => WOutcome::Failed(WHandlerError::from_core(e)),
            Outcome::Rejected(r) => WOutcome::Rejected {
                stage: match r.stage {
                    RejectionStage::Decode => WStage::Decode,
                    RejectionStage::Filter => WStage::Filter,
                    RejectionStage::Translate => WStage::Translate,
                    RejectionStage::Extract => WStage::Extract,
                },
                error: WRemote::from_core(&r.error),
            },
            Outcome::Panicked(message) => WOutcome::Panicked(message.clone()),
        }
    }

    fn into_core(self) -> Outcome {
        match self {
            WOutcome::Success(value) => Outcome::Success(value),
            WOutcome::Failed(e) => Outcome::Failed(e.into_core()),
            WOutcome::Rejected { stage, error } => Outcome::Rejected(Rejection {
                stage: match stage {
                    WStage::Decode => RejectionStage::Decode,
                    WStage::Filter => RejectionStage::Filter,
                    WStage::Translate => RejectionStage::Translate,
                    WStage::Extract => RejectionStage::Extract,
                },
                error: error.into_core(),
            }),
            WOutcome::Panicked(message) => Outcome::Panicked(message),
        }
    }
}

#[derive(Serialize, Deserialize)]
enum WPublishError {
    Unroutable,
    Nacked,
    LinkDown(String),
    Other(String),
}

impl WPublishError {
    fn from_core(e: &PublishError) -> Self {
        match e {
            PublishError::Unroutable => WPublishError::Unroutable,
            PublishError::Nacked => WPublishError::Nacked,
            PublishError::LinkDown(s) => WPublishError::LinkDown(s.clone()),
            PublishError::Other(s) => WPublishError::Other(s.clone()),
        }
    }

    fn into_core(self) -> PublishError {
        match self {
            WPublishError::Unroutable => PublishError::Unroutable,
            WPublishError::Nacked => PublishError::Nacked,
            WPublishError::LinkDown(s) => PublishError::LinkDown(s),
            WPublishError::Other(s) => PublishError::Other(s),
        }
    }
}

#[derive(Serialize, Deserialize)]
enum WCallError {
    Remote(WRemote),
    Timeout(Duration),
    UnknownService(String),
    ReplyQueueLost,
    MalformedReply(String),
    Publish(WPublishError),
    ShuttingDown,
}

impl WCallError {
    fn from_core(e: &CallError) -> Self {
        match e {
            CallError::Remote(r) => WCallError::Remote(WRemote::from_core(r)),
            CallError::Timeout(d) => WCallError::Timeout(*d),
            CallError::UnknownService(s) => WCallError::UnknownService(s.clone()),
            CallError::ReplyQueueLost => WCallError::ReplyQueueLost,
            CallError::MalformedReply(s) => WCallError::MalformedReply(s.clone()),
            CallError::Publish(p) => WCallError::Publish(WPublishError::from_core(p)),
            CallError::ShuttingDown => WCallError::ShuttingDown,
        }
    }

    fn into_core(self) -> CallError {
        match self {
            WCallError::Remote(r) => CallError::Remote(r.into_core()),
            WCallError::Timeout(d) => CallError::Timeout(d),
            WCallError::UnknownService(s) => CallError::UnknownService(s),
            WCallError::ReplyQueueLost => CallError::ReplyQueueLost,
            WCallError::MalformedReply(s) => CallError::MalformedReply(s),
            WCallError::Publish(p) => CallError::Publish(p.into_core()),
            WCallError::ShuttingDown => CallError::ShuttingDown,
        }
    }
}

#[derive(Serialize, Deserialize)]
enum WDialect {
    Nameko,
    MicroFramework,
}

impl WDialect {
    fn from_core(d: Dialect) -> Self {
        match d {
            Dialect::Nameko => WDialect::Nameko,
            Dialect::MicroFramework => WDialect::MicroFramework,
        }
    }

    fn into_core(self) -> Dialect {
        match self {
            WDialect::Nameko => Dialect::Nameko,
            WDialect::MicroFramework => Dialect::MicroFramework,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct WEvent {
    context: Option<WContext>,
    source_service: String,
    event_type: String,
    payload: WBytes,
    dialect: WDialect,
}

impl WEvent {
    fn from_core(e: &OutgoingEvent) -> Self {
        WEvent {
            context: e.context.as_ref().map(WContext::from_core),
            source_service: e.source_service.clone(),
            event_type: e.event_type.clone(),
            payload: WBytes::from_core(&e.payload),
            dialect: WDialect::from_core(e.dialect),
        }
    }

    fn into_core(self) -> OutgoingEvent {
        OutgoingEvent {
            context: self.context.map(WContext::into_core),
            source_service: self.source_service,
            event_type: self.event_type,
            payload: self.payload.into_core(),
            dialect: self.dialect.into_core(),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct WCall {
    context: Option<WContext>,
    service: String,
    method: String,
    args: Vec<Value>,
    kwargs: Map<String, Value>,
    timeout: Option<Duration>,
    websocket: bool,
    dialect: WDialect,
}

impl WCall {
    fn from_core(c: &OutgoingCall) -> Self {
        WCall {
            context: c.context.as_ref().map(WContext::from_core),
            service: c.service.clone(),
            method: c.method.clone(),
            args: c.args.clone(),
            kwargs: c.kwargs.clone(),
            timeout: c.timeout,
            websocket: c.transport == Transport::WebSocket,
            dialect: WDialect::from_core(c.dialect),
        }
    }

    fn into_core(self) -> OutgoingCall {
        OutgoingCall {
            context: self.context.map(WContext::into_core),
            service: self.service,
            method: self.method,
            args: self.args,
            kwargs: self.kwargs,
            timeout: self.timeout,
            transport: if self.websocket { Transport::WebSocket } else { Transport::Broker },
            dialect: self.dialect.into_core(),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn body(frame: &[u8]) -> &[u8] {
        let len = body_len(frame[..PREFIX_LEN].try_into().unwrap()).unwrap();
        assert_eq!(len, frame.len() - PREFIX_LEN);
        &frame[PREFIX_LEN..]
    }

    fn context() -> WorkerContext {
        let inbound: Headers = [
            ("nameko.call_id_stack".to_owned(), FieldValue::Array(vec!["a.b.c".into()])),
            ("nameko.user_id".to_owned(), FieldValue::I64(7)),
            ("x-ratio".to_owned(), FieldValue::F64(f64::NAN)),
        ]
        .into_iter()
        .collect();
        let mut ctx = WorkerContext::new(Arc::from("svc"), Arc::from("m"), inbound, u128::MAX - 5);
        ctx.set("tenant", "t1".into());
        ctx
    }

    fn job(input: JobInput) -> Job {
        Job {
            parts: JobParts {
                dispatch: DispatchId(42),
                route: RouteId(3),
                dispatched_at: Instant::from_unix_millis(1_700_000_000_123),
                attempt: Attempt {
                    retry_count: 2,
                    last_retry: Some(Instant::from_unix_millis(1_700_000_000_000)),
                    last_error: Some("boom".into()),
                },
                context: context(),
                failure: Some(HandlerError::fatal("ValueError", "bad").in_module("builtins")),
                extensions: Extensions::new(),
            },
            input,
        }
    }

    fn round_trip_job(input: JobInput) -> Job {
        let frame = encode_to_worker(&ToWorker::Job(job(input))).unwrap();
        match decode_to_worker(body(&frame)).unwrap() {
            ToWorker::Job(job) => job,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn jobs_cross_whole() {
        let original = job(JobInput::None);
        let back = round_trip_job(JobInput::None);
        assert_eq!(back.parts.dispatch, original.parts.dispatch);
        assert_eq!(back.parts.route, original.parts.route);
        assert_eq!(back.parts.dispatched_at, original.parts.dispatched_at);
        assert_eq!(back.parts.attempt, original.parts.attempt);
        assert_eq!(back.parts.failure, original.parts.failure);
        // The context: same call id, same data, same outbound headers (NaN compares by bits).
        let (a, b) = (&back.parts.context, &original.parts.context);
        assert_eq!(a.call_id(), b.call_id());
        assert_eq!(a.call_id_stack(), b.call_id_stack());
        assert_eq!(a.get("tenant"), Some(&FieldValue::from("t1")));
        assert_eq!(a.user_id(), Some(&FieldValue::I64(7)));
        assert!(matches!(a.get("x-ratio"), Some(FieldValue::F64(x)) if x.is_nan()));
        assert_eq!(back.input, JobInput::None);
    }

    #[test]
    fn every_input_kind_crosses() {
        let raw = JobInput::Payload(PayloadData::Raw(bytes::Bytes::from_static(br#"{"id":7}"#)));
        assert_eq!(round_trip_job(raw.clone()).input, raw);
        let binary = JobInput::Payload(PayloadData::Raw(bytes::Bytes::from_static(&[0xff, 0, 1])));
        assert_eq!(round_trip_job(binary.clone()).input, binary);
        let parsed = JobInput::Payload(PayloadData::Json(json!({"a": [1, 2]})));
        assert_eq!(round_trip_job(parsed.clone()).input, parsed);
        let rpc = JobInput::Rpc {
            args: vec![json!(1), json!("x")],
            kwargs: json!({"k": null}).as_object().unwrap().clone(),
        };
        assert_eq!(round_trip_job(rpc.clone()).input, rpc);
        // A typed payload arrives as its raw body.
        let typed = JobInput::Payload(PayloadData::Decoded {
            value: Box::new(7u32),
            raw: bytes::Bytes::from_static(b"7"),
        });
        let back = round_trip_job(typed);
        assert!(matches!(back.input, JobInput::Payload(PayloadData::Raw(b)) if b == "7"));
    }

    #[test]
    fn outcomes_and_requests_cross() {
        let outcomes = [
            Outcome::Success(None),
            Outcome::Success(Some(json!({"pid": 12}))),
            Outcome::Failed(HandlerError::retryable("Busy", "later")),
            Outcome::Rejected(Rejection {
                stage: RejectionStage::Translate,
                error: RemoteError::new("m", "T", "no"),
            }),
            Outcome::Panicked("worker process exited".into()),
        ];
        let event = OutgoingEvent {
            context: Some(context()),
            source_service: "svc".into(),
            event_type: "done".into(),
            payload: bytes::Bytes::from_static(b"[1]"),
            dialect: Dialect::MicroFramework,
        };
        let call = OutgoingCall {
            context: None,
            service: "other".into(),
            method: "m".into(),
            args: vec![json!(1)],
            kwargs: Map::new(),
            timeout: Some(Duration::from_millis(1500)),
            transport: Transport::WebSocket,
            dialect: Dialect::Nameko,
        };
        let mut frames: Vec<FromWorker> = outcomes
            .into_iter()
            .enumerate()
            .map(|(i, outcome)| FromWorker::Outcome { dispatch: DispatchId(i as u64), outcome })
            .collect();
        frames.push(FromWorker::Call { request: 9, call });
        frames.push(FromWorker::Hello(WorkerHello {
            service: "svc".into(),
            context: 1,
            routes: vec!["a".into(), "b".into()],
            pid: 77,
        }));
        for frame in frames {
            let bytes = encode_from_worker(&frame).unwrap();
            assert_eq!(decode_from_worker(body(&bytes)).unwrap(), frame);
        }
        // An event's context holds a NaN, which is not equal to itself: compare the rest.
        let bytes = encode_from_worker(&FromWorker::Emit { request: 1, event: event.clone() }).unwrap();
        let FromWorker::Emit { request: 1, event: back } = decode_from_worker(body(&bytes)).unwrap() else {
            panic!("not an emit")
        };
        assert_eq!(back.payload, event.payload);
        assert_eq!(back.dialect, event.dialect);
        assert_eq!(back.context.map(|c| c.outbound_headers().len()), Some(4));
    }

    #[test]
    fn answers_cross() {
        let answers = [
            ToWorker::Emitted { request: 1, result: Some(Ok(())) },
            ToWorker::Emitted { request: 2, result: Some(Err(PublishError::LinkDown("gone".into()))) },
            ToWorker::Emitted { request: 7, result: None },
            ToWorker::Called { request: 3, result: Ok(json!([1, 2])) },
            ToWorker::Called { request: 4, result: Err(CallError::Timeout(Duration::from_secs(2))) },
            ToWorker::Called {
                request: 5,
                result: Err(CallError::Remote(RemoteError::method_not_found("x"))),
            },
            ToWorker::Called { request: 6, result: Err(CallError::Publish(PublishError::Nacked)) },
        ];
        for answer in answers {
            let bytes = encode_to_worker(&answer).unwrap();
            let back = decode_to_worker(body(&bytes)).unwrap();
            assert_eq!(format!("{back:?}"), format!("{answer:?}"));
        }
    }

    #[test]
    fn bad_frames_are_errors() {
        assert_eq!(body_len(u32::MAX.to_be_bytes()), Err(WireError::TooLarge(u32::MAX as usize)));
        assert_eq!(body_len((MAX_FRAME as u32).to_be_bytes()), Ok(MAX_FRAME));
        assert!(matches!(decode_from_worker(b"hello world"), Err(WireError::Decode(_))));
        assert!(matches!(decode_to_worker(br#"{"Job":{}}"#), Err(WireError::Decode(_))));
        assert!(matches!(decode_from_worker(b""), Err(WireError::Decode(_))));
    }

    #[test]
    fn targets_parse_and_print() {
        let t: WorkerTarget = "svc-a/2".parse().unwrap();
        assert_eq!(t, WorkerTarget { service: "svc-a".into(), context: ContextId(2) });
        assert_eq!(t.to_string(), "svc-a/2");
        for bad in ["", "svc", "/1", "svc/x", "svc/-1"] {
            assert!(bad.parse::<WorkerTarget>().is_err(), "{bad}");
        }
    }

    fn field() -> impl Strategy<Value = FieldValue> {
        let leaf = prop_oneof![
            Just(FieldValue::Void),
            any::<bool>().prop_map(FieldValue::Bool),
            any::<i64>().prop_map(FieldValue::I64),
            any::<u64>().prop_map(|bits| FieldValue::F64(f64::from_bits(bits))),
            ".{0,6}".prop_map(FieldValue::Str),
            prop::collection::vec(any::<u8>(), 0..4).prop_map(FieldValue::Bytes),
            any::<u64>().prop_map(FieldValue::Timestamp),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(FieldValue::Array),
                prop::collection::vec(("[a-z]{1,3}", inner), 0..4)
                    .prop_map(|entries| FieldValue::Table(entries.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn field_values_cross_bit_for_bit(value in field()) {
            let back = WField::from_core(&value).into_core();
            // Debug shows floats by value; compare the encoded bits instead.
            let a = serde_json::to_string(&WField::from_core(&value)).unwrap();
            let b = serde_json::to_string(&WField::from_core(&back)).unwrap();
            prop_assert_eq!(a, b);
            let json: WField = serde_json::from_str(&serde_json::to_string(&WField::from_core(&value)).unwrap()).unwrap();
            prop_assert_eq!(
                serde_json::to_string(&json).unwrap(),
                serde_json::to_string(&WField::from_core(&value)).unwrap()
            );
        }
    }
}

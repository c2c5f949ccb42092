//! The JSON shapes of [`worker_wire`](super) frames: mirrors of the core types, so the
//! public types carry no serde derives, and floats survive (a NaN header value travels as its
//! bits).

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::action::{CallError, OutgoingCall, OutgoingEvent, PublishError, Transport};
use crate::extract::{Attempt, Extensions, Job, JobInput, JobParts, PayloadData};
use crate::ids::{DispatchId, RouteId};
use crate::message::{FieldValue, Headers, RemoteError};
use crate::outcome::{HandlerError, Outcome, Rejection, RejectionStage};
use crate::route::Dialect;
use crate::time::Instant;
use crate::worker_context::WorkerContext;

use super::WorkerHello;

#[derive(Serialize, Deserialize)]
pub(super) enum WToWorker {
    Job(WJob),
    Emitted { request: u64, result: Option<Result<(), WPublishError>> },
    Called { request: u64, result: Result<Value, WCallError> },
}

#[derive(Serialize, Deserialize)]
pub(super) enum WFromWorker {
    Hello(WorkerHello),
    Outcome { dispatch: u64, outcome: WOutcome },
    Emit { request: u64, event: WEvent },
    Call { request: u64, call: WCall },
}

#[derive(Serialize, Deserialize)]
pub(super) struct WJob {
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
    pub(super) fn from_job(job: &Job) -> Self {
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

    pub(super) fn into_job(self) -> Job {
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
pub(super) enum WInput {
    Body(WBytes),
    Json(Value),
    Rpc { args: Vec<Value>, kwargs: Map<String, Value> },
    None,
}

/// Bytes as text when they are UTF-8 (bodies are JSON in practice), else as numbers.
#[derive(Serialize, Deserialize)]
pub(super) enum WBytes {
    Text(String),
    Raw(Vec<u8>),
}

impl WBytes {
    pub(super) fn from_core(bytes: &[u8]) -> Self {
        match std::str::from_utf8(bytes) {
            Ok(text) => WBytes::Text(text.to_owned()),
            Err(_) => WBytes::Raw(bytes.to_vec()),
        }
    }

    pub(super) fn into_core(self) -> bytes::Bytes {
        match self {
            WBytes::Text(text) => bytes::Bytes::from(text),
            WBytes::Raw(raw) => bytes::Bytes::from(raw),
        }
    }
}

#[derive(Serialize, Deserialize)]
pub(super) enum WField {
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
    pub(super) fn from_core(value: &FieldValue) -> Self {
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

    pub(super) fn into_core(self) -> FieldValue {
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
pub(super) struct WContext {
    service: String,
    method: String,
    inbound: Vec<(String, WField)>,
    /// The call uuid, high and low halves (JSON numbers are not 128 bits wide).
    uuid: [u64; 2],
    overrides: Vec<(String, WField)>,
}

impl WContext {
    pub(super) fn from_core(context: &WorkerContext) -> Self {
        let (service, method, inbound, uuid, overrides) = context.wire_parts();
        WContext {
            service: service.to_owned(),
            method: method.to_owned(),
            inbound: table_from_core(inbound),
            uuid: [(uuid >> 64) as u64, uuid as u64],
            overrides: table_from_core(overrides),
        }
    }

    pub(super) fn into_core(self) -> WorkerContext {
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
pub(super) struct WRemote {
    exc_type: String,
    module: String,
    args: Vec<String>,
    message: String,
}

impl WRemote {
    pub(super) fn from_core(e: &RemoteError) -> Self {
        WRemote {
            exc_type: e.exc_type.clone(),
            module: e.module.clone(),
            args: e.args.clone(),
            message: e.message.clone(),
        }
    }

    pub(super) fn into_core(self) -> RemoteError {
        RemoteError { exc_type: self.exc_type, module: self.module, args: self.args, message: self.message }
    }
}

#[derive(Serialize, Deserialize)]
pub(super) struct WHandlerError {
    retryable: bool,
    error: WRemote,
}

impl WHandlerError {
    pub(super) fn from_core(e: &HandlerError) -> Self {
        WHandlerError { retryable: e.retryable, error: WRemote::from_core(&e.error) }
    }

    pub(super) fn into_core(self) -> HandlerError {
        HandlerError { retryable: self.retryable, error: self.error.into_core() }
    }
}

#[derive(Serialize, Deserialize)]
pub(super) enum WStage {
    Decode,
    Filter,
    Translate,
    Extract,
}

#[derive(Serialize, Deserialize)]
pub(super) enum WOutcome {
    Success(Option<Value>),
    Failed(WHandlerError),
    Rejected { stage: WStage, error: WRemote },
    Panicked(String),
}

impl WOutcome {
    pub(super) fn from_core(outcome: &Outcome) -> Self {
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

    pub(super) fn into_core(self) -> Outcome {
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
pub(super) enum WPublishError {
    Unroutable,
    Nacked,
    LinkDown(String),
    Other(String),
}

impl WPublishError {
    pub(super) fn from_core(e: &PublishError) -> Self {
        match e {
            PublishError::Unroutable => WPublishError::Unroutable,
            PublishError::Nacked => WPublishError::Nacked,
            PublishError::LinkDown(s) => WPublishError::LinkDown(s.clone()),
            PublishError::Other(s) => WPublishError::Other(s.clone()),
        }
    }

    pub(super) fn into_core(self) -> PublishError {
        match self {
            WPublishError::Unroutable => PublishError::Unroutable,
            WPublishError::Nacked => PublishError::Nacked,
            WPublishError::LinkDown(s) => PublishError::LinkDown(s),
            WPublishError::Other(s) => PublishError::Other(s),
        }
    }
}

#[derive(Serialize, Deserialize)]
pub(super) enum WCallError {
    Remote(WRemote),
    Timeout(Duration),
    UnknownService(String),
    ReplyQueueLost,
    MalformedReply(String),
    Publish(WPublishError),
    ShuttingDown,
}

impl WCallError {
    pub(super) fn from_core(e: &CallError) -> Self {
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

    pub(super) fn into_core(self) -> CallError {
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
pub(super) enum WDialect {
    Nameko,
    MicroFramework,
}

impl WDialect {
    pub(super) fn from_core(d: Dialect) -> Self {
        match d {
            Dialect::Nameko => WDialect::Nameko,
            Dialect::MicroFramework => WDialect::MicroFramework,
        }
    }

    pub(super) fn into_core(self) -> Dialect {
        match self {
            WDialect::Nameko => Dialect::Nameko,
            WDialect::MicroFramework => Dialect::MicroFramework,
        }
    }
}

#[derive(Serialize, Deserialize)]
pub(super) struct WEvent {
    context: Option<WContext>,
    source_service: String,
    event_type: String,
    payload: WBytes,
    dialect: WDialect,
}

impl WEvent {
    pub(super) fn from_core(e: &OutgoingEvent) -> Self {
        WEvent {
            context: e.context.as_ref().map(WContext::from_core),
            source_service: e.source_service.clone(),
            event_type: e.event_type.clone(),
            payload: WBytes::from_core(&e.payload),
            dialect: WDialect::from_core(e.dialect),
        }
    }

    pub(super) fn into_core(self) -> OutgoingEvent {
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
pub(super) struct WCall {
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
    pub(super) fn from_core(c: &OutgoingCall) -> Self {
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

    pub(super) fn into_core(self) -> OutgoingCall {
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

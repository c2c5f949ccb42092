//! Extractors: how a handler's parameters are built from a [`Job`], axum style.
//!
//! Every parameter of a handler is an extractor. All but the last implement
//! [`FromJobParts`] (they read the job's metadata); the last may implement [`FromJob`] and
//! consume the job's input, which is how a body is decoded at most once: only one extractor
//! can own it. Extraction never does IO and never blocks.
//!
//! A failing extractor yields a [`Rejection`], which the Engine treats as non-retryable (the
//! same input fails the same way). Transports and runtimes add their own extractors
//! (`Producer`, `RpcProxy`) by implementing [`FromJobParts`], usually by reading a handle
//! they put in [`Extensions`].

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::ids::{DispatchId, RouteId};
use crate::message::RemoteError;
use crate::outcome::{HandlerError, Rejection, RejectionStage};
use crate::params;
use crate::route::AnyPayload;
use crate::signature::Signature;
use crate::time::Instant;
use crate::worker_context::WorkerContext;

/// One handler run's input and metadata, built by the Engine ([`Dispatch`](crate::Dispatch))
/// and handed to the handler by the runtime.
#[derive(Debug)]
pub struct Job {
    /// Metadata extractors read.
    pub parts: JobParts,
    /// The input the last extractor may consume.
    pub input: JobInput,
}

/// A job's metadata.
#[derive(Debug)]
pub struct JobParts {
    /// This run.
    pub dispatch: DispatchId,
    /// The route it runs.
    pub route: RouteId,
    /// When it was dispatched; for a timer, the tick's instant.
    pub dispatched_at: Instant,
    /// Retry information.
    pub attempt: Attempt,
    /// The Nameko worker context.
    pub context: WorkerContext,
    /// For a failure callback: the error the route gave up on.
    pub failure: Option<HandlerError>,
    /// Services the runtime provides to extractors.
    pub extensions: Extensions,
}

/// What a job carries for its handler.
#[derive(Clone, Debug, PartialEq)]
pub enum JobInput {
    /// An event payload (or any message body).
    Payload(PayloadData),
    /// RPC arguments.
    Rpc {
        /// Positional arguments.
        args: Vec<Value>,
        /// Keyword arguments.
        kwargs: Map<String, Value>,
    },
    /// No input (timers).
    None,
}

/// A payload, decoded or not.
pub enum PayloadData {
    /// Still encoded: no filter or translator needed to look at it, so the handler decodes it
    /// straight into its own type.
    Raw(Bytes),
    /// Already decoded (by the filter / translator stage); never parsed again.
    Json(Value),
    /// Decoded by a typed filter into its own type; `Payload<T>` of that type takes it as is,
    /// any other type decodes `raw`.
    Decoded {
        /// The filter's value.
        value: AnyPayload,
        /// The body it came from.
        raw: Bytes,
    },
}

impl Clone for PayloadData {
    /// A typed value cannot be cloned without knowing its type: the clone keeps the raw body.
    fn clone(&self) -> Self {
        match self {
            PayloadData::Raw(b) => PayloadData::Raw(b.clone()),
            PayloadData::Json(v) => PayloadData::Json(v.clone()),
            PayloadData::Decoded { raw, .. } => PayloadData::Raw(raw.clone()),
        }
    }
}

impl PartialEq for PayloadData {
    /// Raw and typed payloads compare by their bytes; JSON by value.
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (PayloadData::Json(a), PayloadData::Json(b)) => a == b,
            (PayloadData::Json(_), _) | (_, PayloadData::Json(_)) => false,
            (a, b) => a.raw() == b.raw(),
        }
    }
}

impl fmt::Debug for PayloadData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PayloadData::Raw(b) => f.debug_tuple("Raw").field(b).finish(),
            PayloadData::Json(v) => f.debug_tuple("Json").field(v).finish(),
            PayloadData::Decoded { raw, .. } => {
                f.debug_struct("Decoded").field("raw", raw).finish_non_exhaustive()
            }
        }
    }
}

impl PayloadData {
    fn raw(&self) -> Option<&Bytes> {
        match self {
            PayloadData::Raw(b) | PayloadData::Decoded { raw: b, .. } => Some(b),
            PayloadData::Json(_) => None,
        }
    }
}

/// Retry information for the current run (micro_framework's `BackOffData`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Attempt {
    /// Retries done before this run: 0 on the first run.
    pub retry_count: u32,
    /// When the previous attempt failed, as Unix time.
    pub last_retry: Option<Instant>,
    /// The previous attempt's error text.
    pub last_error: Option<String>,
}

/// Builds a value from a job's metadata. Implement this for extractors that do not consume the
/// input; they may appear in any position.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a microfw extractor for state `{S}`",
    note = "handler parameters must implement `FromJobParts` (any position) or `FromJob` (last position only)"
)]
pub trait FromJobParts<S>: Sized {
    /// Extracts the value, or rejects the job.
    fn from_job_parts(parts: &mut JobParts, state: &S) -> Result<Self, Rejection>;
}

/// Builds a value from a whole job, consuming its input. Only a handler's last parameter may
/// be a `FromJob` extractor.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a microfw handler's last parameter for state `{S}`",
    note = "the last parameter must implement `FromJob` or `FromJobParts`"
)]
pub trait FromJob<S, M = private::ViaJob>: Sized {
    /// Extracts the value, or rejects the job.
    fn from_job(job: Job, state: &S) -> Result<Self, Rejection>;

    /// The RPC signature this extractor binds, for target listings: `Some` for
    /// [`Params<T>`] of a struct, `None` for everything else.
    fn signature() -> Option<Signature> {
        None
    }
}

mod private {
    /// Marker: the extractor consumes the job.
    #[derive(Debug, Clone, Copy)]
    pub enum ViaJob {}
    /// Marker: the extractor only reads the parts.
    #[derive(Debug, Clone, Copy)]
    pub enum ViaParts {}
}

impl<S, T: FromJobParts<S>> FromJob<S, private::ViaParts> for T {
    fn from_job(mut job: Job, state: &S) -> Result<Self, Rejection> {
        T::from_job_parts(&mut job.parts, state)
    }
}

impl<S, T: FromJobParts<S>> FromJobParts<S> for Option<T> {
    fn from_job_parts(parts: &mut JobParts, state: &S) -> Result<Self, Rejection> {
        Ok(T::from_job_parts(parts, state).ok())
    }
}

impl<S, T: FromJobParts<S>> FromJobParts<S> for Result<T, Rejection> {
    fn from_job_parts(parts: &mut JobParts, state: &S) -> Result<Self, Rejection> {
        Ok(T::from_job_parts(parts, state))
    }
}

/// The decoded payload of an event (or a failure callback's original payload).
///
/// Decodes straight from the raw bytes when no filter or translator already decoded it, and
/// from the decoded value otherwise: never twice.
#[derive(Clone, Debug, PartialEq)]
pub struct Payload<T>(pub T);

impl<S, T: DeserializeOwned + 'static> FromJob<S> for Payload<T> {
    fn from_job(job: Job, _: &S) -> Result<Self, Rejection> {
        let decoded = match job.input {
            JobInput::Payload(PayloadData::Raw(bytes)) => serde_json::from_slice(&bytes),
            JobInput::Payload(PayloadData::Decoded { value, raw }) => match value.downcast::<T>() {
                Ok(payload) => return Ok(Payload(*payload)),
                Err(_) => serde_json::from_slice(&raw),
            },
            JobInput::Payload(PayloadData::Json(value)) => serde_json::from_value(value),
            JobInput::Rpc { .. } | JobInput::None => {
                return Err(extract_rejection(
                    "this route's jobs carry no payload; use Params for RPC arguments",
                ));
            }
        };
        decoded.map(Payload).map_err(|e| Rejection {
            stage: RejectionStage::Decode,
            error: RemoteError::new("microfw", "PayloadDecodeError", e.to_string()),
        })
    }
}

/// RPC arguments bound onto `T`: positional arguments onto `T`'s fields in declaration order,
/// then keyword arguments by name (see [`params::bind`]). A mismatch rejects the call with
/// `IncorrectSignature`.
#[derive(Clone, Debug, PartialEq)]
pub struct Params<T>(pub T);

impl<S, T: DeserializeOwned> FromJob<S> for Params<T> {
    fn signature() -> Option<Signature> {
        Signature::of::<T>()
    }

    fn from_job(job: Job, _: &S) -> Result<Self, Rejection> {
        match job.input {
            JobInput::Rpc { args, kwargs } => params::bind(args, kwargs)
                .map(Params)
                .map_err(|e| Rejection { stage: RejectionStage::Extract, error: e.to_remote_error() }),
            JobInput::Payload(_) | JobInput::None => {
                Err(extract_rejection("this route's jobs carry no RPC arguments; use Payload"))
            }
        }
    }
}

impl<S> FromJobParts<S> for Attempt {
    fn from_job_parts(parts: &mut JobParts, _: &S) -> Result<Self, Rejection> {
        Ok(parts.attempt.clone())
    }
}

/// The worker's Nameko context: context data and call id stack.
#[derive(Clone, Debug)]
pub struct Context(pub WorkerContext);

impl<S> FromJobParts<S> for Context {
    fn from_job_parts(parts: &mut JobParts, _: &S) -> Result<Self, Rejection> {
        Ok(Context(parts.context.clone()))
    }
}

/// The instant a timer ticked (or any job was dispatched).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Tick(pub Instant);

impl<S> FromJobParts<S> for Tick {
    fn from_job_parts(parts: &mut JobParts, _: &S) -> Result<Self, Rejection> {
        Ok(Tick(parts.dispatched_at))
    }
}

/// In a failure callback: the error the route gave up on. Rejects outside a callback.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure(pub HandlerError);

impl<S> FromJobParts<S> for Failure {
    fn from_job_parts(parts: &mut JobParts, _: &S) -> Result<Self, Rejection> {
        parts
            .failure
            .clone()
            .map(Failure)
            .ok_or_else(|| extract_rejection("Failure is only available in a callback route"))
    }
}

/// Shared service state (database pools, clients), or a part of it through [`FromRef`].
/// A handler asking for state the service does not have is a compile error.
#[derive(Clone, Debug, Default)]
pub struct State<T>(pub T);

impl<S, T: FromRef<S>> FromJobParts<S> for State<T> {
    fn from_job_parts(_: &mut JobParts, state: &S) -> Result<Self, Rejection> {
        Ok(State(T::from_ref(state)))
    }
}

/// Takes a part of the service state (axum's `FromRef`).
pub trait FromRef<S> {
    /// Clones the part out of the state.
    fn from_ref(state: &S) -> Self;
}

impl<T: Clone> FromRef<T> for T {
    fn from_ref(state: &T) -> Self {
        state.clone()
    }
}

/// Services a runtime offers to extractors, keyed by type. Built once, cloned per job (one
/// reference count).
#[derive(Clone, Default)]
pub struct Extensions(Option<Arc<HashMap<TypeId, Arc<dyn Any + Send + Sync>>>>);

impl Extensions {
    /// No services.
    pub fn new() -> Self {
        Extensions(None)
    }

    /// Adds (or replaces) a service of type `T`. Meant for start-up, before jobs exist: it
    /// copies the map if it is shared.
    pub fn insert<T: Any + Send + Sync>(&mut self, value: T) {
        let map = self.0.get_or_insert_with(Default::default);
        Arc::make_mut(map).insert(TypeId::of::<T>(), Arc::new(value));
    }

    /// The service of type `T`, if present.
    pub fn get<T: Any + Send + Sync>(&self) -> Option<&T> {
        self.0.as_ref()?.get(&TypeId::of::<T>())?.downcast_ref()
    }
}

impl fmt::Debug for Extensions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.as_ref().map_or(0, |m| m.len());
        f.debug_struct("Extensions").field("services", &n).finish()
    }
}

fn extract_rejection(message: &str) -> Rejection {
    Rejection { stage: RejectionStage::Extract, error: RemoteError::new("microfw", "ExtractError", message) }
}

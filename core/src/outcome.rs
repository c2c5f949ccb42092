//! What a handler run produced: a value, not an exception of the framework.

use serde_json::Value;

use crate::message::RemoteError;

/// A handler's failure: the neutral remote error, and whether trying again may help.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandlerError {
    /// True when the route's retry policy may retry this failure.
    pub retryable: bool,
    /// The error as callers and logs see it.
    pub error: RemoteError,
}

impl HandlerError {
    /// A failure worth retrying (a timeout, a busy dependency).
    pub fn retryable(exc_type: impl Into<String>, message: impl Into<String>) -> Self {
        HandlerError { retryable: true, error: RemoteError::new("", exc_type, message) }
    }

    /// A failure that will fail again however often it is retried (bad input).
    pub fn fatal(exc_type: impl Into<String>, message: impl Into<String>) -> Self {
        HandlerError { retryable: false, error: RemoteError::new("", exc_type, message) }
    }

    /// Sets the module path of the error type (Nameko's `exc_path` prefix).
    pub fn in_module(mut self, module: impl Into<String>) -> Self {
        self.error.module = module.into();
        self
    }
}

impl std::fmt::Display for HandlerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.retryable { "retryable" } else { "fatal" };
        write!(f, "{kind} {}", self.error)
    }
}

impl std::error::Error for HandlerError {}

/// Why the framework refused to run a handler on a message: a failing payload filter,
/// translator or extractor. Never retried: the same input fails the same way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// Which stage refused.
    pub stage: RejectionStage,
    /// The error, as an RPC caller would receive it.
    pub error: RemoteError,
}

/// The stage of the pipeline that refused a message.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum RejectionStage {
    /// The body could not be decoded.
    Decode,
    /// The payload filter failed (not "returned false": that is a normal skip).
    Filter,
    /// A translator failed.
    Translate,
    /// An extractor could not build a handler argument.
    Extract,
}

/// The result of one handler run, reported to the Engine with
/// [`Engine::handle_outcome`](crate::Engine::handle_outcome).
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// The handler finished; for RPC routes, with the value to reply (`None` replies null).
    Success(Option<Value>),
    /// The handler returned an error.
    Failed(HandlerError),
    /// The framework could not run the handler on this input (non-retryable).
    Rejected(Rejection),
    /// The handler panicked; the text is the panic message. Treated as a retryable failure.
    Panicked(String),
}

impl Outcome {
    /// The error this outcome carries, as a [`HandlerError`], if it is not a success.
    pub fn error(&self) -> Option<HandlerError> {
        match self {
            Outcome::Success(_) => None,
            Outcome::Failed(e) => Some(e.clone()),
            Outcome::Rejected(r) => Some(HandlerError { retryable: false, error: r.error.clone() }),
            Outcome::Panicked(msg) => Some(HandlerError {
                retryable: true,
                error: RemoteError::new("microfw", "HandlerPanicked", msg.clone()),
            }),
        }
    }
}

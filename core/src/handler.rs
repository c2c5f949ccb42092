//! Handlers: plain functions whose parameters are extractors.
//!
//! An async handler implements [`Handler`]; a blocking one implements [`BlockingHandler`]. The
//! two are told apart by the route builder you call ([`Route::new`](crate::Route::new) or
//! [`Route::blocking`](crate::Route::blocking)), not by blanket impls that would overlap.
//!
//! A handler returns `()`, [`Reply<T>`], a JSON `Value`, or `Result<R, E>` over those, where
//! `E: IntoHandlerError` says whether the failure is retryable. Running a handler is the
//! runtime's job; this module only defines how a job becomes arguments and how a return value
//! becomes an [`Outcome`].

use std::fmt;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;

use crate::extract::{FromJob, FromJobParts, Job};
use crate::message::RemoteError;
use crate::outcome::{HandlerError, Outcome};
use crate::params::SignatureError;
use crate::signature::Signature;

/// A boxed, sendable future producing an [`Outcome`].
pub type BoxFuture = Pin<Box<dyn Future<Output = Outcome> + Send + 'static>>;

/// An async handler taking extractors `T` over state `S`.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an async microfw handler",
    note = "an async handler is an `async fn` whose parameters are extractors (the last may consume the input) and whose output implements `IntoOutcome`; use `Route::blocking` for a plain fn"
)]
pub trait Handler<T, S>: Clone + Send + Sync + Sized + 'static {
    /// Extracts the arguments and starts the handler.
    fn call(self, job: Job, state: S) -> BoxFuture;

    /// The RPC signature of the handler's `Params<T>` argument, if it has one.
    fn signature() -> Option<Signature> {
        None
    }
}

/// A blocking handler taking extractors `T` over state `S`.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a blocking microfw handler",
    note = "a blocking handler is a plain `fn` whose parameters are extractors (the last may consume the input) and whose output implements `IntoOutcome`; use `Route::new` for an async fn"
)]
pub trait BlockingHandler<T, S>: Clone + Send + Sync + Sized + 'static {
    /// Extracts the arguments and runs the handler to completion.
    fn call(self, job: Job, state: S) -> Outcome;

    /// The RPC signature of the handler's `Params<T>` argument, if it has one.
    fn signature() -> Option<Signature> {
        None
    }
}

/// Turns a handler's return value into an [`Outcome`].
pub trait IntoOutcome {
    /// The outcome.
    fn into_outcome(self) -> Outcome;
}

/// Turns a handler's error type into a [`HandlerError`]: say whether it is retryable and how
/// a remote caller sees it.
pub trait IntoHandlerError {
    /// The error.
    fn into_handler_error(self) -> HandlerError;
}

/// An RPC reply: `T` is serialized to JSON for the caller.
#[derive(Clone, Debug, PartialEq)]
pub struct Reply<T>(pub T);

impl IntoOutcome for () {
    fn into_outcome(self) -> Outcome {
        Outcome::Success(None)
    }
}

impl IntoOutcome for Outcome {
    fn into_outcome(self) -> Outcome {
        self
    }
}

impl IntoOutcome for Value {
    fn into_outcome(self) -> Outcome {
        Outcome::Success(Some(self))
    }
}

impl<T: Serialize> IntoOutcome for Reply<T> {
    fn into_outcome(self) -> Outcome {
        match serde_json::to_value(&self.0) {
            Ok(v) => Outcome::Success(Some(v)),
            Err(e) => Outcome::Failed(HandlerError {
                retryable: false,
                error: RemoteError::new(
                    crate::message::NAMEKO_EXCEPTIONS,
                    "UnserializableValueError",
                    format!("Unserializable value: {e}"),
                ),
            }),
        }
    }
}

impl<R: IntoOutcome, E: IntoHandlerError> IntoOutcome for Result<R, E> {
    fn into_outcome(self) -> Outcome {
        match self {
            Ok(r) => r.into_outcome(),
            Err(e) => Outcome::Failed(e.into_handler_error()),
        }
    }
}

impl IntoHandlerError for HandlerError {
    fn into_handler_error(self) -> HandlerError {
        self
    }
}

/// A remote error passed through (for example a downstream call's): not retryable unless the
/// handler says so by wrapping it in a retryable [`HandlerError`].
impl IntoHandlerError for RemoteError {
    fn into_handler_error(self) -> HandlerError {
        HandlerError { retryable: false, error: self }
    }
}

/// Bad arguments never get better: not retryable.
impl IntoHandlerError for SignatureError {
    fn into_handler_error(self) -> HandlerError {
        HandlerError { retryable: false, error: self.to_remote_error() }
    }
}

/// A plain message: a retryable `Error` (micro_framework retries any exception by default).
impl IntoHandlerError for String {
    fn into_handler_error(self) -> HandlerError {
        HandlerError::retryable("Error", self)
    }
}

/// A plain message: a retryable `Error`.
impl IntoHandlerError for &'static str {
    fn into_handler_error(self) -> HandlerError {
        HandlerError::retryable("Error", self)
    }
}

/// A handler with its extractor types erased, as routes and runtimes store it.
pub struct BoxedHandler<S>(Kind<S>);

enum Kind<S> {
    Async(Arc<dyn Fn(Job, S) -> BoxFuture + Send + Sync>),
    Blocking(Arc<dyn Fn(Job, S) -> Outcome + Send + Sync>),
}

impl<S> Clone for BoxedHandler<S> {
    fn clone(&self) -> Self {
        BoxedHandler(match &self.0 {
            Kind::Async(f) => Kind::Async(f.clone()),
            Kind::Blocking(f) => Kind::Blocking(f.clone()),
        })
    }
}

impl<S: 'static> BoxedHandler<S> {
    /// Erases an async handler.
    pub fn from_async<H: Handler<T, S>, T: 'static>(handler: H) -> Self {
        BoxedHandler(Kind::Async(Arc::new(move |job, state| handler.clone().call(job, state))))
    }

    /// Erases a blocking handler.
    pub fn from_blocking<H: BlockingHandler<T, S>, T: 'static>(handler: H) -> Self {
        BoxedHandler(Kind::Blocking(Arc::new(move |job, state| handler.clone().call(job, state))))
    }

    /// True for a blocking handler.
    pub fn is_blocking(&self) -> bool {
        matches!(self.0, Kind::Blocking(_))
    }

    /// Starts an async handler; `None` if this handler is blocking.
    pub fn call_async(&self, job: Job, state: S) -> Option<BoxFuture> {
        match &self.0 {
            Kind::Async(f) => Some(f(job, state)),
            Kind::Blocking(_) => None,
        }
    }

    /// Runs a blocking handler on the calling thread, turning a panic into
    /// [`Outcome::Panicked`]; `None` if this handler is async.
    pub fn call_blocking(&self, job: Job, state: S) -> Option<Outcome> {
        match &self.0 {
            Kind::Blocking(f) => Some(
                catch_unwind(AssertUnwindSafe(|| f(job, state)))
                    .unwrap_or_else(|p| Outcome::Panicked(panic_message(&*p))),
            ),
            Kind::Async(_) => None,
        }
    }
}

impl<S> fmt::Debug for BoxedHandler<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            Kind::Async(_) => "BoxedHandler(async)",
            Kind::Blocking(_) => "BoxedHandler(blocking)",
        })
    }
}

/// The text of a panic payload (`&str` or `String` payloads; anything else gets a generic text).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "handler panicked".to_owned()
    }
}

macro_rules! impl_handlers {
    ([$($ty:ident),*], $last:ident) => {
        #[allow(non_snake_case, unused_mut, unused_variables)]
        impl<F, Fut, S, Res, M, $($ty,)* $last> Handler<(M, $($ty,)* $last,), S> for F
        where
            F: FnOnce($($ty,)* $last) -> Fut + Clone + Send + Sync + 'static,
            Fut: Future<Output = Res> + Send + 'static,
            Res: IntoOutcome,
            S: Send + Sync + 'static,
            $($ty: FromJobParts<S> + Send,)*
            $last: FromJob<S, M> + Send,
        {
            fn call(self, job: Job, state: S) -> BoxFuture {
                let Job { mut parts, input } = job;
                $(
                    let $ty = match $ty::from_job_parts(&mut parts, &state) {
                        Ok(v) => v,
                        Err(r) => return Box::pin(std::future::ready(Outcome::Rejected(r))),
                    };
                )*
                let $last = match $last::from_job(Job { parts, input }, &state) {
                    Ok(v) => v,
                    Err(r) => return Box::pin(std::future::ready(Outcome::Rejected(r))),
                };
                let fut = self($($ty,)* $last);
                Box::pin(async move { fut.await.into_outcome() })
            }

            fn signature() -> Option<Signature> {
                <$last as FromJob<S, M>>::signature()
            }
        }

        #[allow(non_snake_case, unused_mut, unused_variables)]
        impl<F, S, Res, M, $($ty,)* $last> BlockingHandler<(M, $($ty,)* $last,), S> for F
        where
            F: FnOnce($($ty,)* $last) -> Res + Clone + Send + Sync + 'static,
            Res: IntoOutcome,
            S: Send + Sync + 'static,
            $($ty: FromJobParts<S>,)*
            $last: FromJob<S, M>,
        {
            fn call(self, job: Job, state: S) -> Outcome {
                let Job { mut parts, input } = job;
                $(
                    let $ty = match $ty::from_job_parts(&mut parts, &state) {
                        Ok(v) => v,
                        Err(r) => return Outcome::Rejected(r),
                    };
                )*
                let $last = match $last::from_job(Job { parts, input }, &state) {
                    Ok(v) => v,
                    Err(r) => return Outcome::Rejected(r),
                };
                self($($ty,)* $last).into_outcome()
            }

            fn signature() -> Option<Signature> {
                <$last as FromJob<S, M>>::signature()
            }
        }
    };
}

impl<F, Fut, S, Res> Handler<((),), S> for F
where
    F: FnOnce() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Res> + Send + 'static,
    Res: IntoOutcome,
{
    fn call(self, _: Job, _: S) -> BoxFuture {
        let fut = self();
        Box::pin(async move { fut.await.into_outcome() })
    }
}

impl<F, S, Res> BlockingHandler<((),), S> for F
where
    F: FnOnce() -> Res + Clone + Send + Sync + 'static,
    Res: IntoOutcome,
{
    fn call(self, _: Job, _: S) -> Outcome {
        self().into_outcome()
    }
}

impl_handlers!([], T1);
impl_handlers!([T1], T2);
impl_handlers!([T1, T2], T3);
impl_handlers!([T1, T2, T3], T4);
impl_handlers!([T1, T2, T3, T4], T5);
impl_handlers!([T1, T2, T3, T4, T5], T6);
impl_handlers!([T1, T2, T3, T4, T5, T6], T7);
impl_handlers!([T1, T2, T3, T4, T5, T6, T7], T8);

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::extract::{Attempt, Extensions, Failure, JobInput, JobParts, Payload, PayloadData, State};
    use crate::ids::{DispatchId, RouteId};
    use crate::outcome::RejectionStage;
    use crate::time::Instant;
    use crate::worker_context::WorkerContext;

    fn job(input: JobInput) -> Job {
        Job {
            parts: JobParts {
                dispatch: DispatchId(1),
                route: RouteId(0),
                dispatched_at: Instant::EPOCH,
                attempt: Attempt::default(),
                context: WorkerContext::empty(Arc::from("svc"), Arc::from("m"), 0),
                failure: None,
                extensions: Extensions::new(),
            },
            input,
        }
    }

    fn raw(body: &'static str) -> JobInput {
        JobInput::Payload(PayloadData::Raw(bytes::Bytes::from_static(body.as_bytes())))
    }

    #[test]
    fn return_types_become_outcomes() {
        assert_eq!(().into_outcome(), Outcome::Success(None));
        assert_eq!(Reply(vec![1, 2]).into_outcome(), Outcome::Success(Some(json!([1, 2]))));
        assert_eq!(Ok::<_, String>(Reply("x")).into_outcome(), Outcome::Success(Some(json!("x"))));
        let failed = Err::<(), _>("boom").into_outcome();
        assert_eq!(failed, Outcome::Failed(HandlerError::retryable("Error", "boom")));
        let fatal = Err::<(), _>(HandlerError::fatal("ValueError", "bad")).into_outcome();
        assert!(matches!(fatal, Outcome::Failed(HandlerError { retryable: false, .. })));
    }

    #[test]
    fn blocking_handlers_extract_their_arguments() {
        let handler =
            BoxedHandler::<u32>::from_blocking(|State(n): State<u32>, Payload(v): Payload<Vec<u32>>| {
                Reply(v.iter().sum::<u32>() + n)
            });
        assert!(handler.is_blocking());
        assert_eq!(handler.call_blocking(job(raw("[1,2,3]")), 10), Some(Outcome::Success(Some(json!(16)))));
        assert!(handler.call_async(job(raw("[]")), 0).is_none());
    }

    #[test]
    fn extractor_failures_are_rejections_not_panics() {
        let handler = BoxedHandler::<()>::from_blocking(|Payload(_): Payload<Vec<u32>>| ());
        let outcome = handler.call_blocking(job(raw("{oops")), ()).unwrap();
        assert!(matches!(outcome, Outcome::Rejected(r) if r.stage == RejectionStage::Decode));
        let outside_callback = BoxedHandler::<()>::from_blocking(|Failure(_): Failure| ());
        let outcome = outside_callback.call_blocking(job(JobInput::None), ()).unwrap();
        assert!(matches!(outcome, Outcome::Rejected(r) if r.stage == RejectionStage::Extract));
    }

    #[test]
    fn a_panicking_blocking_handler_is_a_failed_run() {
        let handler = BoxedHandler::<()>::from_blocking(|| -> () { panic!("kaboom") });
        assert_eq!(handler.call_blocking(job(JobInput::None), ()), Some(Outcome::Panicked("kaboom".into())));
    }

    #[test]
    fn async_handlers_return_a_future() {
        let handler = BoxedHandler::<()>::from_async(|Payload(v): Payload<u32>| async move { Reply(v * 2) });
        assert!(!handler.is_blocking());
        let mut fut = handler.call_async(job(raw("21")), ()).unwrap();
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let std::task::Poll::Ready(outcome) = fut.as_mut().poll(&mut cx) else { panic!("pending") };
        assert_eq!(outcome, Outcome::Success(Some(json!(42))));
    }
}

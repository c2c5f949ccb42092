//! The clients handlers (and the program around a running service) use to talk to other
//! services: [`Producer`] for events and [`RpcProxy`] for RPC calls.
//!
//! Both send a command to the service's driver and block the calling thread until the
//! Engine answers; neither touches the broker itself. Inside a handler they carry the
//! worker's context (Nameko context data and call id stack); from
//! [`RunningService`](crate::RunningService) they carry none.

use std::sync::Arc;
use std::sync::mpsc::TryRecvError;
use std::time::Duration;

use microfw_core::client::{decode_result, encode_arguments, encode_payload};
use microfw_core::extract::{FromJobParts, JobParts};
use microfw_core::targets::{GET_TARGET, LIST_TARGETS};
use microfw_core::worker_context::WorkerContext;
use microfw_core::{
    CallError, Dialect, OutgoingCall, OutgoingEvent, Rejection, RejectionStage, RemoteError, Transport,
};
pub use microfw_transport_ws::TargetDetail;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::chan::{self, Receiver, SyncSender};
use crate::driver::Input;

pub use microfw_core::client::{DispatchError, RpcError};

/// Dispatches events as this service (Nameko's `EventDispatcher`).
///
/// As a handler parameter it carries the worker's context; from
/// [`RunningService::producer`](crate::RunningService::producer) it carries none. Events are
/// published with this service as source (exchange `<service>.events`), in the config's
/// `AMQP_DIALECT` (Nameko by default).
/// It does NOT retry a failed publish.
#[derive(Clone, Debug)]
pub struct Producer {
    handle: ServiceHandle,
    context: Option<WorkerContext>,
}

impl Producer {
    /// Publishes `payload` (encoded as JSON) as event `event_type` and blocks until the
    /// broker confirmed it.
    pub fn dispatch(&self, event_type: &str, payload: &impl Serialize) -> Result<(), DispatchError> {
        let event = OutgoingEvent {
            context: self.context.clone(),
            source_service: self.handle.service.to_string(),
            event_type: event_type.to_owned(),
            payload: encode_payload(payload)?,
            dialect: self.handle.dialect,
        };
        let (reply, rx) = chan::sync_channel(1);
        self.handle.tx.send(Input::Emit(event, reply)).map_err(|_| DispatchError::ShuttingDown)?;
        match rx.recv() {
            Ok(result) => result.map_err(DispatchError::Publish),
            Err(_) => Err(DispatchError::ShuttingDown),
        }
    }
}

impl<S> FromJobParts<S> for Producer {
    fn from_job_parts(parts: &mut JobParts, _: &S) -> Result<Self, Rejection> {
        let handle = ServiceHandle::from_parts(parts)?;
        Ok(Producer { handle, context: Some(parts.context.clone()) })
    }
}

/// Calls other services' RPC methods (Nameko's `ServiceRpcProxy`) over the service's broker
/// link (RabbitMQ or the memory hub),
/// blocking the calling thread.
///
/// Every call has a deadline: [`with_timeout`](Self::with_timeout), or the runner's RPC
/// timeout (`RPC_TIMEOUT`, 30 s by default); the Engine enforces it, so a call always
/// returns. Calls use the config's `AMQP_DIALECT` (Nameko by default) unless
/// [`dialect`](Self::dialect) says otherwise; [`targets`](Self::targets) lists a
/// micro_framework-dialect service's methods. It does not retry. A handler calling a method
/// of its own context with every worker busy waits for its deadline: give such contexts room.
#[derive(Clone, Debug)]
pub struct RpcProxy {
    handle: ServiceHandle,
    context: Option<WorkerContext>,
    timeout: Option<Duration>,
    dialect: Dialect,
}

impl RpcProxy {
    /// The same proxy with a per-call deadline.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The same proxy speaking `dialect`.
    pub fn dialect(mut self, dialect: Dialect) -> Self {
        self.dialect = dialect;
        self
    }

    /// Calls `service.method(*args, **kwargs)` and blocks until the reply, the deadline or a
    /// failure. `args` must serialize to an array (a tuple or `Vec`; `()` for none), `kwargs`
    /// to an object (`()` for none).
    pub fn call(
        &self,
        service: &str,
        method: &str,
        args: impl Serialize,
        kwargs: impl Serialize,
    ) -> Result<Value, RpcError> {
        self.call_async(service, method, args, kwargs)?.wait()
    }

    /// [`call`](Self::call), decoding the reply into `T`.
    pub fn call_as<T: DeserializeOwned>(
        &self,
        service: &str,
        method: &str,
        args: impl Serialize,
        kwargs: impl Serialize,
    ) -> Result<T, RpcError> {
        let value = self.call(service, method, args, kwargs)?;
        decode_result(value)
    }

    /// Sends the request and returns at once with a [`PendingCall`] to wait on later, so
    /// several calls can be in flight (micro_framework's `call_async`).
    pub fn call_async(
        &self,
        service: &str,
        method: &str,
        args: impl Serialize,
        kwargs: impl Serialize,
    ) -> Result<PendingCall, RpcError> {
        let call = self.outgoing(service, method, args, kwargs)?;
        let (reply, rx) = chan::sync_channel(1);
        self.handle.tx.send(Input::Call(call, reply)).map_err(|_| CallError::ShuttingDown)?;
        Ok(PendingCall(rx))
    }

    /// Lists the RPC targets of `service` with their parameter names and docs
    /// (micro_framework's `__list_targets__`). The listing exists only in the micro_framework
    /// dialect, so this call speaks it whatever [`dialect`](Self::dialect) says: the service
    /// must serve that dialect (a micro_framework service, or a microfw service with an
    /// `RpcListener` in it). A Nameko service has no listing and answers `MethodNotFound`.
    pub fn targets(&self, service: &str) -> Result<Vec<TargetDetail>, RpcError> {
        self.clone().dialect(Dialect::MicroFramework).call_as(service, LIST_TARGETS, (), ())
    }

    /// Describes one RPC target of `service` (micro_framework's `__get_target__`); same
    /// dialect rule as [`targets`](Self::targets). An unknown target is a remote `KeyError`.
    pub fn target(&self, service: &str, target: &str) -> Result<TargetDetail, RpcError> {
        self.clone().dialect(Dialect::MicroFramework).call_as(service, GET_TARGET, [target], ())
    }

    fn outgoing(
        &self,
        service: &str,
        method: &str,
        args: impl Serialize,
        kwargs: impl Serialize,
    ) -> Result<OutgoingCall, RpcError> {
        let (args, kwargs) = encode_arguments(args, kwargs)?;
        Ok(OutgoingCall {
            context: self.context.clone(),
            service: service.to_owned(),
            method: method.to_owned(),
            args,
            kwargs,
            timeout: self.timeout,
            transport: Transport::Broker,
            dialect: self.dialect,
        })
    }
}

impl<S> FromJobParts<S> for RpcProxy {
    fn from_job_parts(parts: &mut JobParts, _: &S) -> Result<Self, Rejection> {
        let handle = ServiceHandle::from_parts(parts)?;
        let dialect = handle.dialect;
        Ok(RpcProxy { handle, context: Some(parts.context.clone()), timeout: None, dialect })
    }
}

/// A call sent by [`RpcProxy::call_async`]; [`wait`](Self::wait) for the reply. Dropping it
/// does not cancel the call (its reply is dropped when it comes).
#[derive(Debug)]
pub struct PendingCall(Receiver<Result<Value, CallError>>);

impl PendingCall {
    /// Blocks until the reply, the call's deadline or a failure.
    pub fn wait(self) -> Result<Value, RpcError> {
        match self.0.recv() {
            Ok(result) => result.map_err(RpcError::Call),
            Err(_) => Err(RpcError::Call(CallError::ShuttingDown)),
        }
    }

    /// The result if the call has ended, without blocking; `Err(self)` if it has not.
    pub fn try_wait(self) -> Result<Result<Value, RpcError>, PendingCall> {
        match self.0.try_recv() {
            Ok(result) => Ok(result.map_err(RpcError::Call)),
            Err(TryRecvError::Empty) => Err(self),
            Err(TryRecvError::Disconnected) => Ok(Err(RpcError::Call(CallError::ShuttingDown))),
        }
    }
}

/// What the clients need of a running service: its driver's input and its name. Put in
/// every job's extensions.
#[derive(Clone, Debug)]
pub(crate) struct ServiceHandle {
    pub(crate) tx: SyncSender<Input>,
    pub(crate) service: Arc<str>,
    /// The default dialect (`AMQP_DIALECT`).
    pub(crate) dialect: Dialect,
}

impl ServiceHandle {
    pub(crate) fn producer(&self) -> Producer {
        Producer { handle: self.clone(), context: None }
    }

    pub(crate) fn rpc(&self) -> RpcProxy {
        RpcProxy { handle: self.clone(), context: None, timeout: None, dialect: self.dialect }
    }

    fn from_parts(parts: &JobParts) -> Result<Self, Rejection> {
        parts.extensions.get::<ServiceHandle>().cloned().ok_or_else(|| Rejection {
            stage: RejectionStage::Extract,
            error: RemoteError::new(
                "microfw",
                "ExtractError",
                "no microfw-runtime-sync service handle in this job",
            ),
        })
    }
}

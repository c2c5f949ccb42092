//! The clients handlers (and the program around a running service) use to talk to other
//! services: [`Producer`] for events and [`RpcProxy`] for RPC calls.
//!
//! Both send a command to the service's driver and wait for the Engine's answer; neither
//! touches the broker itself. Inside a handler they carry the worker's context (Nameko
//! context data and call id stack); from [`RunningService`](crate::RunningService) they
//! carry none.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
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
use tokio::sync::{mpsc, oneshot};

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
    /// Publishes `payload` (encoded as JSON now) as event `event_type`; the future resolves
    /// when the broker confirmed it. The future holds no borrow and is `Send`.
    pub fn dispatch(
        &self,
        event_type: &str,
        payload: &impl Serialize,
    ) -> impl Future<Output = Result<(), DispatchError>> + Send + 'static {
        let event = self.event(event_type, payload);
        let tx = self.handle.tx.clone();
        async move {
            let (reply, rx) = oneshot::channel();
            tx.send(Input::Emit(event?, reply)).await.map_err(|_| DispatchError::ShuttingDown)?;
            match rx.await {
                Ok(result) => result.map_err(DispatchError::Publish),
                Err(_) => Err(DispatchError::ShuttingDown),
            }
        }
    }

    /// [`dispatch`](Self::dispatch) for blocking handlers (`thread` worker modes), waiting
    /// on the calling thread. Must NOT be called from async code running on a tokio runtime
    /// (it panics there, as tokio's blocking calls do).
    pub fn dispatch_blocking(&self, event_type: &str, payload: &impl Serialize) -> Result<(), DispatchError> {
        let event = self.event(event_type, payload)?;
        let (reply, rx) = oneshot::channel();
        self.handle.tx.blocking_send(Input::Emit(event, reply)).map_err(|_| DispatchError::ShuttingDown)?;
        match rx.blocking_recv() {
            Ok(result) => result.map_err(DispatchError::Publish),
            Err(_) => Err(DispatchError::ShuttingDown),
        }
    }

    fn event(&self, event_type: &str, payload: &impl Serialize) -> Result<OutgoingEvent, DispatchError> {
        Ok(OutgoingEvent {
            context: self.context.clone(),
            source_service: self.handle.service.to_string(),
            event_type: event_type.to_owned(),
            payload: encode_payload(payload)?,
            dialect: self.handle.dialect,
        })
    }
}

impl<S> FromJobParts<S> for Producer {
    fn from_job_parts(parts: &mut JobParts, _: &S) -> Result<Self, Rejection> {
        let handle = ServiceHandle::from_parts(parts)?;
        Ok(Producer { handle, context: Some(parts.context.clone()) })
    }
}

/// Calls other services' RPC methods (Nameko's `ServiceRpcProxy`) over the service's broker
/// link (RabbitMQ or the memory hub).
///
/// Every call has a deadline: [`with_timeout`](Self::with_timeout), or the runner's RPC
/// timeout (`Config::rpc_timeout`, 30 s by default). Calls use the config's `AMQP_DIALECT`
/// (Nameko by default) unless [`dialect`](Self::dialect) says otherwise;
/// [`targets`](Self::targets) lists a micro_framework-dialect service's methods. It does not
/// retry, and does not call over WebSocket (that is `WsRpcClient`'s job).
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

    /// Calls `service.method(*args, **kwargs)` and waits for the reply. `args` must serialize
    /// to an array (a tuple or `Vec`; `()` for none), `kwargs` to an object (`()` for none).
    /// Arguments are encoded now; the future holds no borrow and is `Send`.
    pub fn call(
        &self,
        service: &str,
        method: &str,
        args: impl Serialize,
        kwargs: impl Serialize,
    ) -> impl Future<Output = Result<Value, RpcError>> + Send + 'static {
        let sent = self.call_async(service, method, args, kwargs);
        async move { sent.await?.await }
    }

    /// [`call`](Self::call), decoding the reply into `T`.
    pub fn call_as<T: DeserializeOwned>(
        &self,
        service: &str,
        method: &str,
        args: impl Serialize,
        kwargs: impl Serialize,
    ) -> impl Future<Output = Result<T, RpcError>> + Send + 'static {
        let call = self.call(service, method, args, kwargs);
        async move { decode_result(call.await?) }
    }

    /// Sends the request and resolves (once the driver has it) to a [`PendingCall`]: the
    /// reply, awaited later. Several calls can be in flight this way (micro_framework's
    /// `call_async`).
    pub fn call_async(
        &self,
        service: &str,
        method: &str,
        args: impl Serialize,
        kwargs: impl Serialize,
    ) -> impl Future<Output = Result<PendingCall, RpcError>> + Send + 'static {
        send(self.handle.tx.clone(), self.outgoing(service, method, args, kwargs))
    }

    /// [`call`](Self::call) for blocking handlers (`thread` worker modes), waiting on the
    /// calling thread. Must NOT be called from async code running on a tokio runtime (it
    /// panics there, as tokio's blocking calls do).
    pub fn call_blocking(
        &self,
        service: &str,
        method: &str,
        args: impl Serialize,
        kwargs: impl Serialize,
    ) -> Result<Value, RpcError> {
        let call = self.outgoing(service, method, args, kwargs)?;
        let (reply, rx) = oneshot::channel();
        self.handle.tx.blocking_send(Input::Call(call, reply)).map_err(|_| CallError::ShuttingDown)?;
        PendingCall(rx).wait_blocking()
    }

    /// Lists the RPC targets of `service` with their parameter names and docs
    /// (micro_framework's `__list_targets__`). The listing exists only in the micro_framework
    /// dialect, so this call speaks it whatever [`dialect`](Self::dialect) says: the service
    /// must serve that dialect (a micro_framework service, or a microfw service with an
    /// `RpcListener` in it). A Nameko service has no listing and answers `MethodNotFound`.
    pub fn targets(
        &self,
        service: &str,
    ) -> impl Future<Output = Result<Vec<TargetDetail>, RpcError>> + Send + 'static {
        self.listing(service, LIST_TARGETS, Vec::new())
    }

    /// Describes one RPC target of `service` (micro_framework's `__get_target__`); same
    /// dialect rule as [`targets`](Self::targets). An unknown target is a remote `KeyError`.
    pub fn target(
        &self,
        service: &str,
        target: &str,
    ) -> impl Future<Output = Result<TargetDetail, RpcError>> + Send + 'static {
        self.listing(service, GET_TARGET, vec![Value::String(target.to_owned())])
    }

    /// Sends one of micro_framework's internal commands and decodes its answer.
    fn listing<T: DeserializeOwned>(
        &self,
        service: &str,
        command: &str,
        args: Vec<Value>,
    ) -> impl Future<Output = Result<T, RpcError>> + Send + 'static {
        let mut call = self.outgoing(service, command, (), ());
        if let Ok(call) = &mut call {
            call.dialect = Dialect::MicroFramework;
            call.args = args;
        }
        let sent = send(self.handle.tx.clone(), call);
        async move { decode_result(sent.await?.await?) }
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

/// Hands `call` to the driver; resolves to the call's reply, to be awaited.
async fn send(
    tx: mpsc::Sender<Input>,
    call: Result<OutgoingCall, RpcError>,
) -> Result<PendingCall, RpcError> {
    let (reply, rx) = oneshot::channel();
    tx.send(Input::Call(call?, reply)).await.map_err(|_| CallError::ShuttingDown)?;
    Ok(PendingCall(rx))
}

impl<S> FromJobParts<S> for RpcProxy {
    fn from_job_parts(parts: &mut JobParts, _: &S) -> Result<Self, Rejection> {
        let handle = ServiceHandle::from_parts(parts)?;
        let dialect = handle.dialect;
        Ok(RpcProxy { handle, context: Some(parts.context.clone()), timeout: None, dialect })
    }
}

/// A call sent by [`RpcProxy::call_async`]; await it for the reply. Dropping it does not
/// cancel the call (its reply is dropped when it comes).
#[derive(Debug)]
pub struct PendingCall(oneshot::Receiver<Result<Value, CallError>>);

impl PendingCall {
    /// Waits for the reply on the calling thread. Must NOT be called from async code running
    /// on a tokio runtime.
    pub fn wait_blocking(self) -> Result<Value, RpcError> {
        match self.0.blocking_recv() {
            Ok(result) => result.map_err(RpcError::Call),
            Err(_) => Err(RpcError::Call(CallError::ShuttingDown)),
        }
    }
}

impl Future for PendingCall {
    type Output = Result<Value, RpcError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map(|r| match r {
            Ok(result) => result.map_err(RpcError::Call),
            Err(_) => Err(RpcError::Call(CallError::ShuttingDown)),
        })
    }
}

/// What the clients need of a running service: its driver's input and its name. Put in
/// every job's extensions.
#[derive(Clone, Debug)]
pub(crate) struct ServiceHandle {
    pub(crate) tx: mpsc::Sender<Input>,
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
                "no microfw-runtime-tokio service handle in this job",
            ),
        })
    }
}

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
//! What does not cross: a job's [`Extensions`](crate::extract::Extensions) (the worker puts
//! its own), and a payload a typed filter already decoded
//! ([`PayloadData::Decoded`](crate::extract::PayloadData::Decoded)): the worker gets its raw
//! body and decodes it again.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::action::{CallError, OutgoingCall, OutgoingEvent, PublishError};
use crate::extract::Job;
use crate::ids::{ContextId, DispatchId};
use crate::outcome::Outcome;
use crate::service::ServiceSpec;

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
/// [`Extensions`](crate::extract::Extensions).
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

mod shape;

use shape::{WCall, WCallError, WEvent, WFromWorker, WJob, WOutcome, WPublishError, WToWorker};

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use proptest::prelude::*;
    use serde_json::{Map, json};

    use super::shape::WField;
    use super::*;
    use crate::action::Transport;
    use crate::extract::{Attempt, Extensions, JobInput, JobParts, PayloadData};
    use crate::ids::RouteId;
    use crate::message::{FieldValue, Headers, RemoteError};
    use crate::outcome::{HandlerError, Rejection, RejectionStage};
    use crate::route::Dialect;
    use crate::time::Instant;
    use crate::worker_context::WorkerContext;

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

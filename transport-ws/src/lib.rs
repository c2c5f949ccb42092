//! # microfw-transport-ws
//!
//! microfw's WebSocket RPC transport, compatible with micro_framework's protocol
//! (`wire/micro_framework.md` section 4) and extended with an optional multiplexing `id`.
//!
//! * Always (pure, no IO): the codec, the answers to micro_framework's two internal commands,
//!   the per-connection sequencing rule ([`lane`]), the server's bookkeeping shared by both IO
//!   halves ([`session`]: prefetch, wait queue, replies) and the server settings
//!   ([`options`]). It turns frames into [`RpcRequest`](microfw_core::RpcRequest)s and
//!   [`RpcReply`](microfw_core::RpcReply)s into frames, and back, for both server and client.
//! * Feature `tokio`: `tokio::WsServer` (a `ConnectAsync` server link on tokio-tungstenite) and
//!   the async `tokio::WsRpcClient`.
//! * Feature `sync`: `sync::WsServer` (a blocking `Connect` server link on tungstenite and OS
//!   threads, no tokio) and the blocking `sync::WsRpcClient`.
//!
//! With either feature, `client` holds the client parts both halves share (settings, errors,
//! reply matching). Neither half speaks TLS.
//!
//! ## The contract
//!
//! * **Requests** ([`request`]): one text frame holds one JSON object
//!   `{"command": str, "command_args": [...], "command_kwargs": {...}, "id"?: str | int}`.
//!   Missing `command_args` / `command_kwargs` are empty. A request with an `id` is multiplexed:
//!   its reply echoes the id and may overtake other replies. A request without one belongs to
//!   the connection's sequential lane, micro_framework's behaviour: one runs at a time and the
//!   replies come back in arrival order ([`lane`]).
//! * **Bad input never panics and never closes the connection**: malformed JSON, a value that
//!   is not an object, a missing or non-string `command`, badly typed arguments or id, and
//!   binary frames each decode to a [`RequestError`] whose [`reply`](RequestError::reply) is the
//!   error frame to send (echoing the id when one could be read). micro_framework closes with
//!   1011 on some of these; microfw answers instead.
//! * **Replies** ([`reply`]): `{"data": <value>, "exception": null}` or
//!   `{"data": null, "exception": {"exception": "<name>", "message": "<text>"}}`, single-encoded
//!   (the AMQP dialect double-encodes; WebSocket does not), keys in that order, then
//!   `"id": <echoed>` last when the request had one (micro_framework's client reads `data` and
//!   `exception` only). microfw's `MethodNotFound` goes out as micro_framework's
//!   `RPCTargetDoesNotExist`, `IncorrectSignature` as Python's `TypeError`.
//! * **Clients** encode requests (with or without id) and decode replies (single- or
//!   double-encoded) into an [`RpcReply`](microfw_core::RpcReply) plus the echoed id.
//! * **Target listings** ([`targets`]): `__list_targets__` / `__get_target__` answered from
//!   [`TargetDetail`]s (keys `target, args, kwargs, docstring` in that order), with the real
//!   parameter names and doc text, and parsed back on the client side.
//! * **Limits**: [`WsLimits`] ([`DEFAULT_MAX_MESSAGE_SIZE`], 1 MiB) and [`check_size`] for the IO half, which
//!   closes with [`CLOSE_MESSAGE_TOO_BIG`] (1009) on an oversize frame.
//!
//! ## A server connection, without the Engine
//!
//! ```
//! use microfw_transport_ws::{Lane, TargetDetail, answer_internal, decode_request, encode_ok};
//! use serde_json::{Value, json};
//!
//! let targets = vec![TargetDetail::new("add", ["a", "b"], Vec::<String>::new(), Some("Adds.".into()))];
//! let mut lane = Lane::new();
//! let mut written = Vec::new();
//! // Two frames arrive: a call without id (sequential lane), then a listing with id 7.
//! let frames = [r#"{"command": "add", "command_args": [1, 2]}"#, r#"{"command": "__list_targets__", "id": 7}"#];
//! let mut running = Vec::new();
//! for frame in frames {
//!     match decode_request(frame) {
//!         Ok(req) => {
//!             let admission = lane.arrive(req.id.is_some());
//!             let r = &req.request;
//!             match answer_internal(&r.method, &r.args, &r.kwargs, &targets, req.id.as_ref()) {
//!                 Some(reply) => written.extend(lane.complete(admission.ticket, reply).unwrap().write),
//!                 None => running.push((admission.ticket, req)), // the Engine would run it
//!             }
//!         }
//!         Err(bad) => {
//!             let ticket = lane.arrive(bad.id.is_some()).ticket;
//!             written.extend(lane.complete(ticket, bad.reply()).unwrap().write);
//!         }
//!     }
//! }
//! // The listing (id 7) overtook the running call; then the call finishes.
//! let (ticket, req) = running.pop().unwrap();
//! let sum = req.request.args.iter().filter_map(Value::as_i64).sum::<i64>();
//! written.extend(lane.complete(ticket, encode_ok(&json!(sum), req.id.as_ref())).unwrap().write);
//!
//! let replies: Vec<Value> = written.iter().map(|w| serde_json::from_str(w).unwrap()).collect();
//! assert_eq!(replies[0]["id"], json!(7));
//! assert_eq!(replies[0]["data"][0]["target"], json!("add"));
//! assert_eq!(replies[1], json!({"data": 3, "exception": null}));
//! assert!(lane.is_idle());
//! ```
//!
//! ## What it does NOT do
//!
//! The pure modules do no IO, read no clock and start no thread: the IO halves behind the
//! features move frames and use them for every byte they write and every decision they make.
//! Nothing here runs handlers or counts workers (the Engine does; the server only keeps within
//! its subscription's prefetch and refuses with `MaxConnectionsReached` past its wait queue),
//! and the decoders accept any length (the IO halves enforce the size limit; [`check_size`]
//! for others).
#![warn(missing_docs)]

#[cfg(any(feature = "tokio", feature = "sync"))]
pub mod client;
#[cfg(any(feature = "tokio", feature = "sync"))]
mod gauge;
#[cfg(any(feature = "tokio", feature = "sync"))]
mod handle;
pub mod lane;
pub mod options;
pub mod reply;
pub mod request;
pub mod session;
pub mod targets;
#[cfg(any(feature = "tokio", feature = "sync"))]
mod upgrade;

#[cfg(feature = "sync")]
pub mod sync;
#[cfg(feature = "tokio")]
pub mod tokio;

#[cfg(any(feature = "tokio", feature = "sync"))]
pub use handle::WsServerHandle;
pub use lane::{Admission, Lane, LaneError, Released, Ticket};
pub use options::{CLOSE_GOING_AWAY, ServerOptions, authorized, service_stopped, shutting_down};
pub use reply::{
    MICRO_FRAMEWORK_EXCEPTIONS, ReplyDecodeError, ReplyEncodeError, ReplyErrorKind, WsReply, decode_reply,
    encode_error, encode_ok, encode_reply, encode_reply_envelope, error_to_wire, max_connections_reached,
};
pub use request::{
    RequestError, RequestErrorKind, RequestId, WsRequest, decode_binary, decode_request, encode_request,
    encode_request_envelope,
};
pub use session::{ConnId, FrameSink, ServerState, SessionStats};
pub use targets::{
    GET_TARGET, LIST_TARGETS, ListingError, TargetDetail, answer_internal, get_target, is_internal,
    parse_target_detail, parse_target_list, ws_targets,
};

/// The default largest message (frame payload) a connection accepts: 1 MiB.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 1 << 20;

/// The WebSocket close code the IO half sends for an oversize message (RFC 6455 "message too
/// big").
pub const CLOSE_MESSAGE_TOO_BIG: u16 = 1009;

/// The message was larger than the connection's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
#[error("message of {size} bytes is over the {max} byte limit")]
pub struct TooLarge {
    /// The message's size in bytes.
    pub size: usize,
    /// The limit it broke.
    pub max: usize,
}

/// Checks a message's size against `max` (use [`DEFAULT_MAX_MESSAGE_SIZE`] unless configured).
///
/// `Ok` when `size <= max`. On `Err` the IO half closes the connection with
/// [`CLOSE_MESSAGE_TOO_BIG`]; this function closes nothing and does not look at the payload.
pub fn check_size(size: usize, max: usize) -> Result<(), TooLarge> {
    if size <= max { Ok(()) } else { Err(TooLarge { size, max }) }
}

/// Per-connection limits the IO half enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct WsLimits {
    /// The largest message (frame payload, or reassembled message) accepted, in bytes.
    /// Default [`DEFAULT_MAX_MESSAGE_SIZE`].
    pub max_message_size: usize,
}

impl Default for WsLimits {
    fn default() -> Self {
        WsLimits { max_message_size: DEFAULT_MAX_MESSAGE_SIZE }
    }
}

impl WsLimits {
    /// Limits with the given largest message size.
    pub fn with_max_message_size(max_message_size: usize) -> Self {
        WsLimits { max_message_size }
    }

    /// [`check_size`] against these limits.
    pub fn check(&self, size: usize) -> Result<(), TooLarge> {
        check_size(size, self.max_message_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_limit_is_inclusive() {
        assert_eq!(check_size(DEFAULT_MAX_MESSAGE_SIZE, DEFAULT_MAX_MESSAGE_SIZE), Ok(()));
        assert_eq!(
            check_size(DEFAULT_MAX_MESSAGE_SIZE + 1, DEFAULT_MAX_MESSAGE_SIZE),
            Err(TooLarge { size: DEFAULT_MAX_MESSAGE_SIZE + 1, max: 1_048_576 })
        );
        assert_eq!(CLOSE_MESSAGE_TOO_BIG, 1009);
        assert_eq!(WsLimits::default().check(1 << 20), Ok(()));
        assert_eq!(WsLimits::with_max_message_size(4).check(5), Err(TooLarge { size: 5, max: 4 }));
    }
}

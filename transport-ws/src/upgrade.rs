//! The upgrade request checks and websocket settings both IO halves' servers use.
//!
//! The error type is tungstenite's (an HTTP response), large by nature: clippy's
//! `result_large_err` is allowed here.
#![allow(clippy::result_large_err)]

use tungstenite::handshake::server::{ErrorResponse, Request};
use tungstenite::http::{HeaderValue, StatusCode, header};
use tungstenite::protocol::WebSocketConfig;

use crate::options::{ServerOptions, authorized};

/// `Ok` when the upgrade may proceed: no token is configured, or the request carries it
/// (header or query); else the 401 to answer.
pub(crate) fn check(token: Option<&str>, request: &Request) -> Result<(), ErrorResponse> {
    let Some(token) = token else { return Ok(()) };
    let authorization = request.headers().get(header::AUTHORIZATION).map(HeaderValue::as_bytes);
    if authorized(token, authorization, request.uri().query()) {
        Ok(())
    } else {
        Err(refusal(StatusCode::UNAUTHORIZED, "a valid token is required"))
    }
}

/// The 503 answered to an upgrade over the connection limit.
pub(crate) fn too_many() -> ErrorResponse {
    refusal(StatusCode::SERVICE_UNAVAILABLE, "too many connections")
}

/// The websocket settings of a server connection: the message and frame size limits.
pub(crate) fn server_config(options: &ServerOptions) -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(options.max_message_size))
        .max_frame_size(Some(options.max_message_size))
}

fn refusal(status: StatusCode, text: &str) -> ErrorResponse {
    let mut response = ErrorResponse::new(Some(text.to_owned()));
    *response.status_mut() = status;
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

//! The IO-free half of the runtimes' clients (`Producer`, `RpcProxy`): their error types and
//! the encoding of call arguments and event payloads. Each runtime adds the sending and the
//! waiting (blocking or async).

use bytes::Bytes;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::action::{CallError, PublishError};

/// Why dispatching an event failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DispatchError {
    /// The payload could not be encoded as JSON.
    #[error("cannot encode the event payload: {0}")]
    Encode(String),
    /// The broker did not take the event.
    #[error("event not published: {0}")]
    Publish(PublishError),
    /// The service stopped before the event was confirmed.
    #[error("the service is shutting down")]
    ShuttingDown,
}

/// Why an RPC call failed.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum RpcError {
    /// The call went out and failed (remote error, timeout, unknown service, shutdown...).
    #[error(transparent)]
    Call(#[from] CallError),
    /// The arguments could not be encoded (args must be an array or tuple, kwargs an object
    /// or `()`).
    #[error("cannot encode the call arguments: {0}")]
    Encode(String),
    /// The reply could not be decoded into the requested type.
    #[error("cannot decode the reply: {0}")]
    Decode(String),
}

/// Encodes RPC arguments: `args` must serialize to an array (a tuple, a `Vec`, or `()` for
/// none), `kwargs` to an object (a map, a struct, or `()` for none).
pub fn encode_arguments(
    args: impl Serialize,
    kwargs: impl Serialize,
) -> Result<(Vec<Value>, Map<String, Value>), RpcError> {
    let encode = |e: serde_json::Error| RpcError::Encode(e.to_string());
    let args = match serde_json::to_value(args).map_err(encode)? {
        Value::Array(a) => a,
        Value::Null => Vec::new(),
        other => return Err(RpcError::Encode(format!("args must be an array or tuple, not {other}"))),
    };
    let kwargs = match serde_json::to_value(kwargs).map_err(encode)? {
        Value::Object(m) => m,
        Value::Null => Map::new(),
        other => return Err(RpcError::Encode(format!("kwargs must be an object, not {other}"))),
    };
    Ok((args, kwargs))
}

/// Encodes an event payload as JSON.
pub fn encode_payload(payload: &impl Serialize) -> Result<Bytes, DispatchError> {
    serde_json::to_vec(payload).map(Bytes::from).map_err(|e| DispatchError::Encode(e.to_string()))
}

/// Decodes a call's JSON result into `T`.
pub fn decode_result<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, RpcError> {
    serde_json::from_value(value).map_err(|e| RpcError::Decode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn arguments_accept_tuples_vectors_unit_and_maps() {
        assert_eq!(encode_arguments((1, "a"), ()).unwrap(), (vec![json!(1), json!("a")], Map::new()));
        let (args, kwargs) = encode_arguments(vec![1, 2], json!({"k": true})).unwrap();
        assert_eq!(args, vec![json!(1), json!(2)]);
        assert_eq!(kwargs.get("k"), Some(&json!(true)));
        assert_eq!(encode_arguments((), ()).unwrap(), (vec![], Map::new()));
    }

    #[test]
    fn arguments_of_the_wrong_shape_are_refused() {
        assert!(matches!(encode_arguments(5, ()), Err(RpcError::Encode(_))));
        assert!(matches!(encode_arguments((), [1, 2]), Err(RpcError::Encode(_))));
    }

    #[test]
    fn payloads_and_results() {
        assert_eq!(encode_payload(&json!({"a": 1})).unwrap(), Bytes::from_static(br#"{"a":1}"#));
        assert_eq!(decode_result::<u8>(json!(7)), Ok(7));
        assert!(matches!(decode_result::<u8>(json!("x")), Err(RpcError::Decode(_))));
    }
}

//! JSON-RPC 2.0 messages as MCP uses them: parsing a POST body into a single message or a batch,
//! telling parse errors (-32700) from invalid requests (-32600), and building error/result bodies.
//!
//! MCP narrows JSON-RPC in two ways: a request id is a string or an integer (never null), and
//! `params` is structured (object or array). This module enforces the second and the non-null
//! id; for numeric ids it accepts every number form SDKs accept (`1.0` included), so the mesh
//! never reads a message differently from the agent. Integer ids within 64 bits survive a round
//! trip byte for byte; string ids keep their value (a `\u0041` escape comes back as `A`, which
//! every JSON reader treats as the same id).
//!
//! Error codes the proxy itself sends:
//!
//! | code | constant | when |
//! |---|---|---|
//! | -32700 | [`PARSE_ERROR`] | the body is not JSON |
//! | -32600 | [`INVALID_REQUEST`] | JSON, but not a valid JSON-RPC 2.0 message for this protocol version |
//! | -32601 | [`METHOD_NOT_FOUND`] | the federated endpoint has no such method |
//! | -32602 | [`INVALID_PARAMS`] | params missing or of the wrong shape (e.g. unknown tool) |
//! | -32603 | [`INTERNAL_ERROR`] | a bug or resource failure inside the proxy |
//! | -32020 | [`HEADER_MISMATCH`] | 2026-07-28: `Mcp-Method`/`Mcp-Name`/version header missing or ≠ body |
//! | -32021 | [`MISSING_CAPABILITY`] | 2026-07-28: the client lacks a capability the call needs |
//! | -32022 | [`UNSUPPORTED_PROTOCOL_VERSION`] | `MCP-Protocol-Version` names a version capmesh does not speak |
//! | -32003 | [`FORBIDDEN`] | capmesh policy denies this caller the capability |
//! | -32004 | [`NO_ENDPOINT`] | the capability exists but no provider instance is healthy |
//! | -32005 | [`UPSTREAM_FAILED`] | the provider could not be reached or failed before answering |

use std::fmt;

use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize, Serializer, ser::SerializeMap};
use serde_json::{Map, Number, Value};

/// The body is not valid JSON.
pub const PARSE_ERROR: i64 = -32700;
/// The JSON is not a valid JSON-RPC 2.0 message (or batch) for the protocol in use.
pub const INVALID_REQUEST: i64 = -32600;
/// The method does not exist or is not available.
pub const METHOD_NOT_FOUND: i64 = -32601;
/// Invalid method parameters.
pub const INVALID_PARAMS: i64 = -32602;
/// Internal JSON-RPC error.
pub const INTERNAL_ERROR: i64 = -32603;
/// MCP 2026-07-28: a mirrored HTTP header is missing, malformed or differs from the body.
pub const HEADER_MISMATCH: i64 = -32020;
/// MCP 2026-07-28: the client did not declare a capability the request needs.
pub const MISSING_CAPABILITY: i64 = -32021;
/// MCP 2026-07-28: the `MCP-Protocol-Version` is not one the server supports.
pub const UNSUPPORTED_PROTOCOL_VERSION: i64 = -32022;
/// capmesh: the authorization policy denies the caller this capability.
pub const FORBIDDEN: i64 = -32003;
/// capmesh: the capability is known but no healthy provider endpoint can serve it now.
pub const NO_ENDPOINT: i64 = -32004;
/// capmesh: the chosen provider failed (connect, TLS, reset) before sending a response.
pub const UPSTREAM_FAILED: i64 = -32005;

/// A JSON-RPC request id: an integer or a string, kept as received.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Id {
    /// A numeric id: MCP asks for integers, but SDKs accept `1.0` (an integer to JavaScript and
    /// pydantic), so every number form is read, as the agent would, and sent back as read.
    Number(Number),
    /// A string id.
    String(String),
}

impl Id {
    /// Reads an id from a JSON value: `None` for null and anything but numbers and
    /// strings.
    pub fn from_value(v: &Value) -> Option<Id> {
        match v {
            Value::Number(n) => Some(Id::Number(n.clone())),
            Value::String(s) => Some(Id::String(s.clone())),
            _ => None,
        }
    }

    /// The id as a JSON value.
    pub fn to_value(&self) -> Value {
        match self {
            Id::Number(n) => Value::Number(n.clone()),
            Id::String(s) => Value::String(s.clone()),
        }
    }
}

impl From<i64> for Id {
    fn from(n: i64) -> Self {
        Id::Number(n.into())
    }
}

impl From<&str> for Id {
    fn from(s: &str) -> Self {
        Id::String(s.to_owned())
    }
}

impl fmt::Display for Id {
    /// JSON form: `7` or `"abc"`, so numbers and strings stay distinguishable in logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Id::Number(n) => write!(f, "{n}"),
            Id::String(s) => write!(f, "{}", Value::String(s.clone())),
        }
    }
}

impl Serialize for Id {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Id::Number(n) => n.serialize(s),
            Id::String(v) => s.serialize_str(v),
        }
    }
}

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        Id::from_value(&v)
            .ok_or_else(|| serde::de::Error::custom("a JSON-RPC id must be a string or an integer"))
    }
}

/// The `error` member of a JSON-RPC error response.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ErrorObject {
    /// The error code (see the constants in this module).
    pub code: i64,
    /// A short description.
    pub message: String,
    /// Optional structured detail.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

/// One JSON-RPC 2.0 message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// A call that expects a response.
    Request {
        /// The caller's id, echoed in the response.
        id: Id,
        /// The method name, e.g. `tools/call`.
        method: String,
        /// The parameters (object or array), if any.
        params: Option<Value>,
    },
    /// A one-way message.
    Notification {
        /// The method name, e.g. `notifications/progress`.
        method: String,
        /// The parameters (object or array), if any.
        params: Option<Value>,
    },
    /// The answer to a request. `id` is `None` only for an error about an unidentifiable request.
    Response {
        /// The id of the request answered (`None` = JSON null).
        id: Option<Id>,
        /// `Ok(result)` or `Err(error)`.
        outcome: Result<Value, ErrorObject>,
    },
}

impl Message {
    /// The method of a request or notification.
    pub fn method(&self) -> Option<&str> {
        match self {
            Message::Request { method, .. } | Message::Notification { method, .. } => Some(method),
            Message::Response { .. } => None,
        }
    }

    /// The id of a request or response.
    pub fn id(&self) -> Option<&Id> {
        match self {
            Message::Request { id, .. } => Some(id),
            Message::Response { id, .. } => id.as_ref(),
            Message::Notification { .. } => None,
        }
    }

    /// The params of a request or notification.
    pub fn params(&self) -> Option<&Value> {
        match self {
            Message::Request { params, .. } | Message::Notification { params, .. } => {
                params.as_ref()
            }
            Message::Response { .. } => None,
        }
    }

    /// The message as a JSON body.
    pub fn to_bytes(&self) -> Bytes {
        serde_json::to_vec(self).map_or_else(|_| fallback_body(), Bytes::from)
    }
}

impl Serialize for Message {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("jsonrpc", "2.0")?;
        match self {
            Message::Request { id, method, params } => {
                m.serialize_entry("id", id)?;
                m.serialize_entry("method", method)?;
                if let Some(p) = params {
                    m.serialize_entry("params", p)?;
                }
            }
            Message::Notification { method, params } => {
                m.serialize_entry("method", method)?;
                if let Some(p) = params {
                    m.serialize_entry("params", p)?;
                }
            }
            Message::Response { id, outcome } => {
                m.serialize_entry("id", id)?;
                match outcome {
                    Ok(r) => m.serialize_entry("result", r)?,
                    Err(e) => m.serialize_entry("error", e)?,
                }
            }
        }
        m.end()
    }
}

/// A POST body: one message, or a batch (an array, legal only in MCP 2025-03-26).
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    /// A single JSON object.
    Single(Message),
    /// A non-empty JSON array of messages.
    Batch(Vec<Message>),
}

impl Parsed {
    /// The messages, whether one or many.
    pub fn messages(&self) -> &[Message] {
        match self {
            Parsed::Single(m) => std::slice::from_ref(m),
            Parsed::Batch(v) => v,
        }
    }

    /// The message, when this is not a batch.
    pub fn single(&self) -> Option<&Message> {
        match self {
            Parsed::Single(m) => Some(m),
            Parsed::Batch(_) => None,
        }
    }
}

/// A JSON-RPC failure detected by the proxy, ready to be sent as an error body.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("JSON-RPC error {code}: {message}")]
pub struct RpcError {
    /// The JSON-RPC error code.
    pub code: i64,
    /// What was wrong, phrased for the client.
    pub message: String,
    /// The id of the offending request when it could be read.
    pub id: Option<Id>,
    /// Optional structured detail.
    pub data: Option<Value>,
}

impl RpcError {
    /// A new error without id or data.
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            id: None,
            data: None,
        }
    }

    /// Attaches the request id (or clears it with `None`).
    pub fn with_id(mut self, id: Option<Id>) -> Self {
        self.id = id;
        self
    }

    /// Attaches structured detail.
    pub fn with_data(mut self, data: Value) -> Self {
        self.data = Some(data);
        self
    }

    /// The JSON-RPC error response body for this error.
    pub fn to_body(&self) -> Bytes {
        error_body(
            self.id.as_ref(),
            self.code,
            &self.message,
            self.data.clone(),
        )
    }
}

fn invalid(message: impl Into<String>) -> RpcError {
    RpcError::new(INVALID_REQUEST, message)
}

/// Parses a POST body into one message or a batch.
///
/// Not JSON → [`PARSE_ERROR`]; JSON that is not a JSON-RPC 2.0 message (no `"jsonrpc":"2.0"`, no
/// method and no result/error, a null/boolean request id, scalar params, an empty
/// array, or any bad element in a batch) → [`INVALID_REQUEST`], carrying the id when it was
/// readable.
pub fn parse(body: &[u8]) -> Result<Parsed, RpcError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| RpcError::new(PARSE_ERROR, format!("the body is not valid JSON: {e}")))?;
    match value {
        Value::Array(items) => {
            if items.is_empty() {
                return Err(invalid("an empty JSON-RPC batch is not a valid request"));
            }
            let msgs = items
                .into_iter()
                .map(message_from_value)
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Parsed::Batch(msgs))
        }
        other => message_from_value(other).map(Parsed::Single),
    }
}

/// Converts one JSON value into a message, applying the JSON-RPC 2.0 and MCP rules.
pub fn message_from_value(v: Value) -> Result<Message, RpcError> {
    let Value::Object(mut obj) = v else {
        return Err(invalid("a JSON-RPC message must be a JSON object"));
    };
    let raw_id = obj.remove("id");
    let id = raw_id.as_ref().and_then(Id::from_value);
    let fail = |msg: &str| Err(invalid(msg).with_id(id.clone()));
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return fail("the message must contain \"jsonrpc\": \"2.0\"");
    }
    if let Some(method) = obj.remove("method") {
        let Value::String(method) = method else {
            return fail("\"method\" must be a string");
        };
        let params = take_params(&mut obj).map_err(|m| invalid(m).with_id(id.clone()))?;
        return match raw_id {
            None => Ok(Message::Notification { method, params }),
            Some(Value::Null) => fail("a request id must not be null in MCP"),
            Some(_) => match id {
                Some(id) => Ok(Message::Request { id, method, params }),
                None => fail("a request id must be a string or an integer"),
            },
        };
    }
    let outcome = match (obj.remove("result"), obj.remove("error")) {
        (Some(r), None) => Ok(r),
        (None, Some(e)) => Err(error_object(e).map_err(|m| invalid(m).with_id(id.clone()))?),
        (Some(_), Some(_)) => return fail("a response must not contain both result and error"),
        (None, None) => return fail("a message needs a \"method\", a \"result\" or an \"error\""),
    };
    match (&raw_id, &outcome) {
        // An error about a request whose id could not be read has a null (or, loosely, no) id.
        (None | Some(Value::Null), Err(_)) => Ok(Message::Response { id: None, outcome }),
        (Some(_), _) if id.is_some() => Ok(Message::Response { id, outcome }),
        _ => fail("a response id must be a string or an integer"),
    }
}

fn take_params(obj: &mut Map<String, Value>) -> Result<Option<Value>, &'static str> {
    match obj.remove("params") {
        None => Ok(None),
        Some(p @ (Value::Object(_) | Value::Array(_))) => Ok(Some(p)),
        Some(_) => Err("\"params\" must be an object or an array"),
    }
}

fn error_object(v: Value) -> Result<ErrorObject, &'static str> {
    let Value::Object(mut e) = v else {
        return Err("\"error\" must be an object");
    };
    let code = e
        .get("code")
        .and_then(Value::as_i64)
        .ok_or("\"error.code\" must be an integer")?;
    let message = match e.remove("message") {
        Some(Value::String(s)) => s,
        _ => return Err("\"error.message\" must be a string"),
    };
    Ok(ErrorObject {
        code,
        message,
        data: e.remove("data"),
    })
}

#[derive(Serialize)]
struct ErrorEnvelope<'a> {
    jsonrpc: &'static str,
    id: Option<&'a Id>,
    error: ErrorRef<'a>,
}

#[derive(Serialize)]
struct ErrorRef<'a> {
    code: i64,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<Value>,
}

#[derive(Serialize)]
struct ResultEnvelope<'a> {
    jsonrpc: &'static str,
    id: &'a Id,
    result: &'a Value,
}

/// Serialising these envelopes cannot fail (all keys are strings); this is the answer if it did.
fn fallback_body() -> Bytes {
    Bytes::from_static(
        br#"{"jsonrpc":"2.0","id":null,"error":{"code":-32603,"message":"internal error"}}"#,
    )
}

/// A JSON-RPC error response body; `id` is written as null when unknown.
pub fn error_body(id: Option<&Id>, code: i64, message: &str, data: Option<Value>) -> Bytes {
    let env = ErrorEnvelope {
        jsonrpc: "2.0",
        id,
        error: ErrorRef {
            code,
            message,
            data,
        },
    };
    serde_json::to_vec(&env).map_or_else(|_| fallback_body(), Bytes::from)
}

/// A JSON-RPC success response body.
pub fn result_body(id: &Id, result: &Value) -> Bytes {
    let env = ResultEnvelope {
        jsonrpc: "2.0",
        id,
        result,
    };
    serde_json::to_vec(&env).map_or_else(|_| fallback_body(), Bytes::from)
}

#[cfg(test)]
#[path = "jsonrpc_tests.rs"]
mod tests;

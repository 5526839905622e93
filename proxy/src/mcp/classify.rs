//! What a POST to an MCP endpoint is, across both protocol generations, and the 400s the proxy
//! owes a client that breaks the transport rules.
//!
//! * **Legacy** (2025-03-26, 2025-06-18, 2025-11-25): sessions (`Mcp-Session-Id`), `initialize`;
//!   JSON-RPC batches only in 2025-03-26 (an absent `MCP-Protocol-Version` header means
//!   2025-03-26, as the 2025-06-18 spec says).
//! * **Modern** (2026-07-28): stateless; `Mcp-Method` (and `Mcp-Name` for `tools/call`,
//!   `resources/read`, `prompts/get`) mirror the body and must agree with it, so that
//!   intermediaries may route on headers alone ([`route_hint`]). No batches, no client responses,
//!   and `Mcp-Session-Id` is ignored.
//!
//! A caller holding a legacy session negotiated at a later version must still refuse batches that
//! arrive without the header; only it knows the session's version.

use std::borrow::Cow;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, StatusCode};
use serde_json::{Value, json};

use super::call::ToolCall;
use super::header::{MCP_METHOD, MCP_NAME, MCP_PROTOCOL_VERSION, MCP_SESSION_ID};
pub use super::header::{header_value_decode, set_routing_headers};
use super::jsonrpc::{
    self, HEADER_MISMATCH, INVALID_REQUEST, Id, Message, Parsed, RpcError,
    UNSUPPORTED_PROTOCOL_VERSION,
};
pub use super::rewrite::{rename_tool_call, rename_tool_call_with_id};

/// The session-based protocol versions, oldest first.
pub const LEGACY_VERSIONS: [&str; 3] = ["2025-03-26", "2025-06-18", "2025-11-25"];
/// The stateless protocol version.
pub const MODERN: &str = "2026-07-28";
/// Every version capmesh speaks, oldest first.
pub const SUPPORTED_VERSIONS: [&str; 4] = ["2025-03-26", "2025-06-18", "2025-11-25", MODERN];
/// The only version whose POST bodies may be JSON-RPC batches.
pub const BATCH_VERSION: &str = "2025-03-26";
/// The `_meta` key that carries the protocol version in 2026-07-28 requests.
pub const META_PROTOCOL_VERSION: &str = "io.modelcontextprotocol/protocolVersion";

/// The MCP protocol generation of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Generation {
    /// 2025-03-26 … 2025-11-25: sessions and `initialize`.
    Legacy,
    /// 2026-07-28: stateless, routing headers.
    Modern,
}

/// A POST body that passed the transport rules.
#[derive(Debug, Clone, PartialEq)]
pub struct Classified {
    /// Which protocol generation the request follows.
    pub generation: Generation,
    /// The `MCP-Protocol-Version` header, else (modern only) the body's `_meta` version: one
    /// of [`SUPPORTED_VERSIONS`].
    pub protocol_version: Option<&'static str>,
    /// The parsed body; `None` for a single `tools/call` request, which is read without a
    /// tree ([`super::call`]): everything the mesh needs of it is in the fields here.
    pub message: Option<Parsed>,
    /// The method of a single request or notification (`tools/call` without a copy).
    pub method: Option<Cow<'static, str>>,
    /// `params.name` of `tools/call`/`prompts/get`, `params.uri` of `resources/read`.
    pub name: Option<String>,
    /// The id of a single request or response.
    pub id: Option<Id>,
    /// The `Mcp-Session-Id` header (legacy only; 2026-07-28 has no sessions).
    pub session_id: Option<String>,
    /// `params.requestState` of a single 2026-07-28 request, when a string (a retried call's
    /// state, which the mesh may have sealed).
    pub request_state: Option<String>,
}

impl Classified {
    /// Whether the body is a JSON-RPC batch (2025-03-26 only).
    pub fn is_batch(&self) -> bool {
        matches!(self.message, Some(Parsed::Batch(_)))
    }
}

/// What the transport rules look at in a single message, read from a tree or without one.
struct Facts<'a> {
    batch: bool,
    id: Option<&'a Id>,
    method: Option<&'a str>,
    /// `params.name` and `params.uri`, when strings.
    name: Option<&'a str>,
    uri: Option<&'a str>,
    meta_version: Option<&'a str>,
    request_state: Option<&'a str>,
}

impl<'a> Facts<'a> {
    fn of_tree(message: &'a Parsed) -> Self {
        let single = message.single();
        let params = single.and_then(Message::params);
        Self {
            batch: single.is_none(),
            id: single.and_then(Message::id),
            method: single.and_then(Message::method),
            name: str_param(params, "name"),
            uri: str_param(params, "uri"),
            meta_version: params
                .and_then(|p| p.get("_meta"))
                .and_then(|m| m.get(META_PROTOCOL_VERSION))
                .and_then(Value::as_str),
            request_state: str_param(params, "requestState"),
        }
    }

    fn of_call(call: &'a ToolCall) -> Self {
        Self {
            batch: false,
            id: Some(&call.id),
            method: Some("tools/call"),
            name: call.name.as_deref(),
            uri: call.uri.as_deref(),
            meta_version: call.meta_version.as_deref(),
            request_state: call.request_state.as_deref(),
        }
    }

    /// The target the method names in `params` (its key and value), if it names one.
    fn target(&self) -> Option<(&'static str, Option<&'a str>)> {
        let key = self.method.and_then(name_param)?;
        Some((key, if key == "uri" { self.uri } else { self.name }))
    }
}

/// A request refused before routing: send `status` with `body` (a JSON-RPC error).
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    /// The HTTP status (400 for every transport-rule failure).
    pub status: StatusCode,
    /// The JSON-RPC error code inside `body`, for metrics.
    pub code: i64,
    /// The JSON-RPC error response body (`application/json`).
    pub body: Bytes,
    /// The error itself.
    pub error: Box<RpcError>,
}

impl Rejection {
    /// A rejection with `status` carrying `err`.
    pub fn new(status: StatusCode, err: &RpcError) -> Self {
        Self {
            status,
            code: err.code,
            body: err.to_body(),
            error: Box::new(err.clone()),
        }
    }

    /// A 400 Bad Request carrying `err`.
    pub fn bad_request(err: &RpcError) -> Self {
        Self::new(StatusCode::BAD_REQUEST, err)
    }
}

/// Reads a header that must appear at most once, as text.
fn read_one<'a>(
    headers: &'a HeaderMap,
    name: &HeaderName,
) -> Result<Option<&'a str>, &'static str> {
    let mut values = headers.get_all(name).iter();
    let Some(v) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err("appears more than once");
    }
    v.to_str().map(Some).map_err(|_| "is not printable ASCII")
}

/// The methods whose target is mirrored in `Mcp-Name`, and the param that holds it.
fn name_param(method: &str) -> Option<&'static str> {
    match method {
        "tools/call" | "prompts/get" => Some("name"),
        "resources/read" => Some("uri"),
        _ => None,
    }
}

fn str_param<'a>(params: Option<&'a Value>, key: &str) -> Option<&'a str> {
    params.and_then(|p| p.get(key)).and_then(Value::as_str)
}

fn mismatch(
    id: Option<&Id>,
    header: &HeaderName,
    header_value: Option<&str>,
    body_value: Option<&str>,
    what: &str,
) -> Rejection {
    let shown = |v: Option<&str>| v.map_or_else(|| "absent".to_owned(), |v| format!("{v:?}"));
    let message = format!(
        "header {} is {} but the body's {what} is {}: they must be equal",
        display_name(header),
        shown(header_value),
        shown(body_value)
    );
    let data = json!({ "header": display_name(header), "headerValue": header_value, "bodyValue": body_value });
    Rejection::bad_request(
        &RpcError::new(HEADER_MISMATCH, message)
            .with_id(id.cloned())
            .with_data(data),
    )
}

fn malformed(id: Option<&Id>, header: &HeaderName, problem: &str) -> Rejection {
    let message = format!("header {} {problem}", display_name(header));
    Rejection::bad_request(&RpcError::new(HEADER_MISMATCH, message).with_id(id.cloned()))
}

fn display_name(h: &HeaderName) -> &'static str {
    match h.as_str() {
        "mcp-method" => "Mcp-Method",
        "mcp-name" => "Mcp-Name",
        "mcp-session-id" => "Mcp-Session-Id",
        _ => "MCP-Protocol-Version",
    }
}

fn invalid(id: Option<&Id>, message: &str) -> Rejection {
    Rejection::bad_request(&RpcError::new(INVALID_REQUEST, message).with_id(id.cloned()))
}

fn unsupported(requested: &str) -> Rejection {
    let message = format!(
        "unsupported MCP-Protocol-Version {requested:?}: capmesh supports {}",
        SUPPORTED_VERSIONS.join(", ")
    );
    let data = json!({ "supported": SUPPORTED_VERSIONS, "requested": requested });
    Rejection::bad_request(&RpcError::new(UNSUPPORTED_PROTOCOL_VERSION, message).with_data(data))
}

/// Classifies a POST body with its headers, applying the transport rules of its generation.
///
/// Failures (all HTTP 400): unsupported `MCP-Protocol-Version` → -32022; not JSON → -32700;
/// invalid JSON-RPC → -32600; 2026-07-28 batch or client response → -32600; legacy batch after
/// 2025-03-26, or one holding `initialize`, or mixing requests and responses → -32600;
/// 2026-07-28 `Mcp-Method`/`Mcp-Name`/version header missing, repeated or ≠ body → -32020.
pub fn classify(headers: &HeaderMap, body: &[u8]) -> Result<Classified, Rejection> {
    classify_as(headers, body, super::call::read(body))
}

/// [`classify`] always through a JSON tree, as it reads every message other than a single
/// `tools/call`: for checking that both ways agree.
pub fn classify_with_tree(headers: &HeaderMap, body: &[u8]) -> Result<Classified, Rejection> {
    classify_as(headers, body, None)
}

fn classify_as(
    headers: &HeaderMap,
    body: &[u8],
    call: Option<ToolCall>,
) -> Result<Classified, Rejection> {
    let header_version = match read_one(headers, &MCP_PROTOCOL_VERSION) {
        Ok(v) => v,
        Err(problem) => return Err(malformed(None, &MCP_PROTOCOL_VERSION, problem)),
    };
    if let Some(v) = header_version.filter(|v| !SUPPORTED_VERSIONS.contains(v)) {
        return Err(unsupported(v));
    }
    let read = match call {
        Some(call) => Read::Call(call),
        None => Read::Tree(jsonrpc::parse(body).map_err(|e| Rejection::bad_request(&e))?),
    };
    let facts = match &read {
        Read::Call(call) => Facts::of_call(call),
        Read::Tree(message) => Facts::of_tree(message),
    };
    let id = facts.id.cloned();
    // Read as strictly as the providers' inbound side reads it (a repeated key, for one): the
    // mesh never routes a message that readers could take two ways. A plain `tools/call` read
    // without a tree already meets those rules: that reader leaves every repeated key the
    // inspection refuses to the tree (the `mcp_body` fuzz target checks that the inspection
    // takes whatever the classifier takes).
    if let Read::Tree(_) = read
        && let Err(e) = super::inspect::inspect(body)
    {
        return Err(invalid(id.as_ref(), &e.to_string()));
    }
    let meta_version = facts.meta_version;
    let generation = match header_version {
        Some(v) if v == MODERN => Generation::Modern,
        None if meta_version == Some(MODERN) => Generation::Modern,
        _ => Generation::Legacy,
    };
    let name = facts.target().and_then(|(_, name)| name);
    let session_id = match generation {
        Generation::Modern => None,
        Generation::Legacy => match read_one(headers, &MCP_SESSION_ID) {
            Ok(s) => s.map(str::to_owned),
            Err(problem) => {
                return Err(invalid(
                    id.as_ref(),
                    &format!("header Mcp-Session-Id {problem}"),
                ));
            }
        },
    };
    match (generation, &read) {
        (Generation::Modern, _) => check_modern(headers, &facts, header_version)?,
        (Generation::Legacy, Read::Tree(message)) => check_legacy_batch(message, header_version)?,
        (Generation::Legacy, Read::Call(_)) => {}
    }
    // A supported version, so one of the constants (the header's was checked above, and a
    // modern body's `_meta` version is the modern one).
    let protocol_version = match (header_version, generation) {
        (Some(v), _) => Some(v),
        (None, Generation::Modern) => meta_version,
        (None, Generation::Legacy) => None,
    }
    .and_then(|v| SUPPORTED_VERSIONS.iter().copied().find(|s| *s == v));
    let request_state = match generation {
        Generation::Modern => facts.request_state.map(str::to_owned),
        Generation::Legacy => None,
    };
    Ok(Classified {
        generation,
        protocol_version,
        method: facts.method.map(|m| match m {
            "tools/call" => Cow::Borrowed("tools/call"),
            other => Cow::Owned(other.to_owned()),
        }),
        name: name.map(str::to_owned),
        id,
        session_id,
        request_state,
        message: match read {
            Read::Tree(message) => Some(message),
            Read::Call(_) => None,
        },
    })
}

/// A body as read: a plain `tools/call` without a tree, or parsed.
enum Read {
    Call(ToolCall),
    Tree(Parsed),
}

fn check_modern(
    headers: &HeaderMap,
    facts: &Facts<'_>,
    header_version: Option<&str>,
) -> Result<(), Rejection> {
    if facts.batch {
        return Err(invalid(
            None,
            "batches are not allowed in protocol 2026-07-28",
        ));
    }
    let id = facts.id;
    let Some(method) = facts.method else {
        return Err(invalid(
            id,
            "clients must not send responses in protocol 2026-07-28",
        ));
    };
    if let (Some(h), Some(m)) = (header_version, facts.meta_version)
        && h != m
    {
        let what = format!("params._meta[\"{META_PROTOCOL_VERSION}\"]");
        return Err(mismatch(id, &MCP_PROTOCOL_VERSION, Some(h), Some(m), &what));
    }
    let header_method =
        read_one(headers, &MCP_METHOD).map_err(|p| malformed(id, &MCP_METHOD, p))?;
    if header_method != Some(method) {
        return Err(mismatch(
            id,
            &MCP_METHOD,
            header_method,
            Some(method),
            "method",
        ));
    }
    let raw_name = read_one(headers, &MCP_NAME).map_err(|p| malformed(id, &MCP_NAME, p))?;
    let header_name: Option<Cow<'_, str>> = match raw_name {
        None => None,
        Some(v) => Some(
            header_value_decode(v)
                .map_err(|e| malformed(id, &MCP_NAME, &format!("is malformed: {e}")))?,
        ),
    };
    let (key, body_name) = match facts.target() {
        Some(target) => target,
        // Other methods: the header is optional, but when sent it must match what it names.
        None => match (facts.name, facts.uri) {
            (Some(n), _) => ("name", Some(n)),
            (None, u) => ("uri", u),
        },
    };
    // A body without a target leaves a missing header to the server's -32602 (as the SDKs do).
    let required = facts.target().is_some() && body_name.is_some();
    if (required || header_name.is_some()) && header_name.as_deref() != body_name {
        return Err(mismatch(
            id,
            &MCP_NAME,
            header_name.as_deref(),
            body_name,
            &format!("params.{key}"),
        ));
    }
    Ok(())
}

fn check_legacy_batch(message: &Parsed, header_version: Option<&str>) -> Result<(), Rejection> {
    let Parsed::Batch(msgs) = message else {
        return Ok(());
    };
    let version = header_version.unwrap_or(BATCH_VERSION);
    if version != BATCH_VERSION {
        let text = format!(
            "JSON-RPC batches were removed after protocol 2025-03-26 (this request is {version}): send one message per POST"
        );
        return Err(invalid(None, &text));
    }
    if msgs.iter().any(|m| m.method() == Some("initialize")) {
        return Err(invalid(
            None,
            "initialize must not be part of a JSON-RPC batch",
        ));
    }
    let responses = msgs
        .iter()
        .filter(|m| matches!(m, Message::Response { .. }))
        .count();
    if responses != 0 && responses != msgs.len() {
        return Err(invalid(
            None,
            "a batch holds either requests and notifications, or responses, not both",
        ));
    }
    Ok(())
}

/// The route of a 2026-07-28 request read from headers alone: `(Mcp-Method, decoded Mcp-Name)`.
///
/// `None` unless `MCP-Protocol-Version` is 2026-07-28 and `Mcp-Method` is present once; a
/// repeated or undecodable `Mcp-Name` also gives `None`. The hint is unverified: the body must
/// still pass [`classify`] before the request is forwarded.
pub fn route_hint(headers: &HeaderMap) -> Option<(&str, Option<Cow<'_, str>>)> {
    if read_one(headers, &MCP_PROTOCOL_VERSION).ok()?? != MODERN {
        return None;
    }
    let method = read_one(headers, &MCP_METHOD).ok()??;
    let name = match read_one(headers, &MCP_NAME).ok()? {
        None => None,
        Some(v) => Some(header_value_decode(v).ok()?),
    };
    Some((method, name))
}

#[cfg(test)]
#[path = "classify_tests.rs"]
mod tests;

//! The one error type of the request path, and the one place where errors become responses.
//!
//! Every layer of every listener's stack returns [`ProxyError`]. Each variant knows its HTTP
//! status, its JSON-RPC code, the label it is counted under, and whether the request can have
//! reached an agent (which is what the retry policy asks). [`ProxyError::into_response`] is the
//! only code that turns an error into a response; the `Respond` layer at the top of each stack
//! calls it.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use serde_json::{Value, json};

use crate::contract::ERROR_HEADER;
use crate::mcp::jsonrpc::{self, Id};
use crate::pool::PeerError;
use crate::{BoxBody, boxed};

/// Why the mesh did not forward a request, or forwarding it failed.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// An error about a JSON-RPC request whose id is known: answered with that id.
    #[error("{source}")]
    ForRequest {
        /// The request's id.
        id: Id,
        /// What went wrong.
        source: Box<ProxyError>,
    },
    /// The body broke JSON-RPC or an MCP transport rule (already phrased for the client).
    #[error("{}", .0.message)]
    Protocol(jsonrpc::RpcError),
    /// The body is larger than the listener accepts.
    #[error("request body over {limit} bytes")]
    TooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The body could not be read (the client went away or sent a broken body).
    #[error("cannot read the request body: {0}")]
    BodyUnreadable(String),
    /// DNS-rebinding protection refused the request.
    #[error("{0}")]
    Rebinding(&'static str),
    /// The method is not served on this path.
    #[error("{0}")]
    MethodNotAllowed(&'static str),
    /// Nothing is served at this path.
    #[error("{0}")]
    NotFound(&'static str),
    /// A legacy session id the mesh does not know (ended, tampered, or its instance is gone).
    #[error("unknown or tampered session (or its instance is gone): initialize again")]
    UnknownSession,
    /// A legacy request without a session.
    #[error("missing Mcp-Session-Id: send initialize first")]
    MissingSession,
    /// The federated endpoint does not serve this method.
    #[error("method \"{method}\" is not served by the federated endpoint")]
    MethodNotServed {
        /// The method asked for.
        method: String,
        /// A 2026-07-28 request (answered 404, as the protocol says).
        modern: bool,
    },
    /// A `tools/call` on the federated endpoint names a tool this agent cannot call.
    #[error(
        "unknown capability \"{name}\": {why}; this agent can call: {}",
        list(known)
    )]
    UnknownTool {
        /// The tool (capability or alias) called.
        name: String,
        /// Why it is unknown.
        why: &'static str,
        /// What the agent can call.
        known: Vec<String>,
    },
    /// A `tools/call` of a tool the agent did not register with the mesh: it has no capability
    /// to authorize, so it is not called. Answered as MCP servers answer a tool they cannot
    /// run: a tool result with `isError`.
    #[error("this agent has no tool \"{0}\" registered with the mesh, so it cannot be authorized")]
    UnregisteredTool(String),
    /// Passthrough names a capability no agent provides.
    #[error("unknown capability \"{0}\": no agent in the mesh provides it")]
    UnknownCapability(String),
    /// Passthrough names a capability this agent does not depend on.
    #[error(
        "capability \"{0}\" exists in the mesh, but this agent does not depend on it: add --dependency {0}"
    )]
    NotDependedOn(String),
    /// The capability exists, but no endpoint can serve it now.
    #[error(
        "capability \"{capability}\" has no healthy endpoint{} ({registered} registered)",
        matching(selector)
    )]
    NoEndpoint {
        /// The capability.
        capability: String,
        /// The consumer's tag and version rules (empty when none).
        selector: String,
        /// Endpoints registered for it, healthy or not.
        registered: usize,
    },
    /// A 2026-07-28 retry carries a `requestState` the mesh cannot route.
    #[error("{0}: call again without requestState")]
    StaleRequestState(String),
    /// The answer to a provider's request names no request the mesh relayed.
    #[error("this response answers no request the mesh relayed to you (unknown or altered id)")]
    UnknownServerRequest,
    /// The provider instance a request must go back to is gone.
    #[error("the provider instance {instance} of capability \"{capability}\" is gone")]
    ProviderGone {
        /// The instance.
        instance: String,
        /// The capability it served.
        capability: String,
    },
    /// The authorization policy denies the caller the capability.
    #[error("{caller} may not call capability \"{capability}\" (authorization policy)")]
    Forbidden {
        /// The caller's SPIFFE ID, or `unauthenticated`.
        caller: String,
        /// The capability.
        capability: String,
    },
    /// The caller has no mesh identity where one is required, or it is no longer trusted.
    #[error("{0}")]
    Untrusted(String),
    /// The proxy cannot serve yet (no snapshot, no registration, no session key).
    #[error("not ready: {0}")]
    NotReady(String),
    /// This proxy serves no inbound calls (`--agent-url none`).
    #[error("this agent serves no inbound calls (--agent-url none)")]
    NoAgent,
    /// Sending to another proxy failed.
    #[error("{endpoint}: {source}")]
    Peer {
        /// The endpoint's identity and instance.
        endpoint: String,
        /// What failed.
        source: PeerError,
    },
    /// Every endpoint tried failed, or the retry budget ran out.
    #[error("capability \"{capability}\": no provider answered ({tried} tried): {last}")]
    Exhausted {
        /// The capability (or agent, in transparent mode).
        capability: String,
        /// How many endpoints were tried.
        tried: usize,
        /// The last failure.
        last: String,
    },
    /// No response headers within the request's deadline.
    #[error("no response within {after:?} (set x-capmesh-timeout to wait longer)")]
    Timeout {
        /// The deadline.
        after: Duration,
    },
    /// The response body could not be read to rewrite it.
    #[error("reading the provider's response failed: {0}")]
    UpstreamBody(String),
    /// The local agent could not be reached (nothing was sent to it).
    #[error("the agent is not answering: {0}")]
    AgentUnreachable(String),
    /// The local agent failed after the request was sent.
    #[error("the agent failed while answering: {0}")]
    AgentFailed(String),
    /// A bug or resource failure inside the proxy.
    #[error("internal error: {0}")]
    Internal(String),
}

fn list(known: &[String]) -> String {
    if known.is_empty() {
        "nothing (add --dependency)".to_owned()
    } else {
        known.join(", ")
    }
}

fn matching(selector: &str) -> String {
    if selector.is_empty() {
        String::new()
    } else {
        format!(" matching \"{selector}\"")
    }
}

impl ProxyError {
    /// Attaches the id of the JSON-RPC request the error is about.
    pub fn for_request(self, id: Option<&Id>) -> Self {
        match (id, self) {
            (Some(id), Self::Protocol(e)) if e.id.is_none() => {
                Self::Protocol(e.with_id(Some(id.clone())))
            }
            (Some(_), e @ (Self::Protocol(_) | Self::ForRequest { .. })) => e,
            (Some(id), e) => Self::ForRequest {
                id: id.clone(),
                source: Box::new(e),
            },
            (None, e) => e,
        }
    }

    /// The error without its request id.
    pub fn inner(&self) -> &ProxyError {
        match self {
            Self::ForRequest { source, .. } => source.inner(),
            other => other,
        }
    }

    /// The HTTP status of the answer.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::ForRequest { source, .. } => source.status(),
            Self::Protocol(_)
            | Self::BodyUnreadable(_)
            | Self::MissingSession
            | Self::UnknownServerRequest => StatusCode::BAD_REQUEST,
            Self::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Rebinding(_) | Self::Forbidden { .. } | Self::Untrusted(_) => {
                StatusCode::FORBIDDEN
            }
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::NotFound(_)
            | Self::UnknownSession
            | Self::UnknownCapability(_)
            | Self::NotDependedOn(_)
            | Self::ProviderGone { .. }
            | Self::NoAgent => StatusCode::NOT_FOUND,
            Self::MethodNotServed { modern: true, .. } => StatusCode::NOT_FOUND,
            // Errors a client's MCP library shows as a tool error travel in a 200.
            Self::MethodNotServed { modern: false, .. }
            | Self::UnknownTool { .. }
            | Self::UnregisteredTool(_)
            | Self::StaleRequestState(_) => StatusCode::OK,
            Self::NoEndpoint { .. }
            | Self::NotReady(_)
            | Self::Exhausted { .. }
            | Self::AgentUnreachable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Peer { source, .. } if !source.may_have_reached() => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Peer { .. } | Self::UpstreamBody(_) | Self::AgentFailed(_) => {
                StatusCode::BAD_GATEWAY
            }
            Self::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The JSON-RPC error code of the answer.
    pub fn rpc_code(&self) -> i64 {
        match self {
            Self::ForRequest { source, .. } => source.rpc_code(),
            Self::Protocol(e) => e.code,
            Self::TooLarge { .. }
            | Self::BodyUnreadable(_)
            | Self::Rebinding(_)
            | Self::MethodNotAllowed(_)
            | Self::NotFound(_)
            | Self::UnknownSession
            | Self::MissingSession
            | Self::UnknownServerRequest => jsonrpc::INVALID_REQUEST,
            Self::MethodNotServed { .. } | Self::NoAgent => jsonrpc::METHOD_NOT_FOUND,
            Self::UnknownTool { .. }
            | Self::UnregisteredTool(_)
            | Self::UnknownCapability(_)
            | Self::NotDependedOn(_)
            | Self::StaleRequestState(_) => jsonrpc::INVALID_PARAMS,
            Self::Forbidden { .. } | Self::Untrusted(_) => jsonrpc::FORBIDDEN,
            Self::NoEndpoint { .. } | Self::NotReady(_) => jsonrpc::NO_ENDPOINT,
            Self::ProviderGone { .. }
            | Self::Peer { .. }
            | Self::Exhausted { .. }
            | Self::Timeout { .. }
            | Self::UpstreamBody(_)
            | Self::AgentUnreachable(_)
            | Self::AgentFailed(_) => jsonrpc::UPSTREAM_FAILED,
            Self::Internal(_) => jsonrpc::INTERNAL_ERROR,
        }
    }

    /// The label the error is counted under (metrics, `x-capmesh-error`).
    pub fn label(&self) -> &'static str {
        match self {
            Self::ForRequest { source, .. } => source.label(),
            Self::Protocol(_) | Self::BodyUnreadable(_) => "bad_request",
            Self::TooLarge { .. } => "too_large",
            Self::Rebinding(_) => "rebinding",
            Self::MethodNotAllowed(_) => "method_not_allowed",
            Self::NotFound(_) => "not_found",
            Self::UnknownSession | Self::MissingSession => "session",
            Self::MethodNotServed { .. } => "method_not_found",
            Self::UnknownTool { .. } | Self::UnknownCapability(_) | Self::NotDependedOn(_) => {
                "unknown_capability"
            }
            Self::UnregisteredTool(_) => "unregistered_tool",
            Self::NoEndpoint { .. } => "no_endpoint",
            Self::StaleRequestState(_) => "stale_request_state",
            Self::UnknownServerRequest | Self::ProviderGone { .. } => "unknown_request",
            Self::Forbidden { .. } => "denied",
            Self::Untrusted(_) => "untrusted",
            Self::NotReady(_) => "not_ready",
            Self::NoAgent => "no_agent",
            Self::Peer { source, .. } if !source.may_have_reached() => "unreachable",
            Self::Peer { .. } => "upstream_reset",
            Self::Exhausted { .. } => "upstream_failed",
            Self::Timeout { .. } => "timeout",
            Self::UpstreamBody(_) => "upstream_body",
            Self::AgentUnreachable(_) => "agent_unreachable",
            Self::AgentFailed(_) => "agent_failed",
            Self::Internal(_) => "internal",
        }
    }

    /// Whether the request can have reached an agent. `false` means it certainly did not: it
    /// is safe to send it again elsewhere, whatever it asks.
    pub fn may_have_reached_agent(&self) -> bool {
        match self {
            Self::ForRequest { source, .. } => source.may_have_reached_agent(),
            Self::Peer { source, .. } => source.may_have_reached(),
            Self::Timeout { .. }
            | Self::UpstreamBody(_)
            | Self::AgentFailed(_)
            | Self::Internal(_) => true,
            _ => false,
        }
    }

    fn data(&self) -> Option<Value> {
        match self {
            Self::ForRequest { source, .. } => source.data(),
            Self::Protocol(e) => e.data.clone(),
            Self::UnknownTool { name, known, .. } => {
                Some(json!({ "capability": name, "known": known }))
            }
            Self::UnknownCapability(c) | Self::NotDependedOn(c) => Some(json!({ "capability": c })),
            _ => None,
        }
    }

    fn id(&self) -> Option<&Id> {
        match self {
            Self::ForRequest { id, .. } => Some(id),
            Self::Protocol(e) => e.id.as_ref(),
            _ => None,
        }
    }

    /// The response that tells the client: the status, a JSON-RPC error body with the
    /// request's id when known, and `x-capmesh-error` naming the label, so that the proxy on
    /// the other side of a hop can tell the mesh's own answers from the agent's.
    pub fn into_response(self) -> Response<BoxBody> {
        let status = self.status();
        let label = self.label();
        let mut resp = Response::new(boxed(Full::new(self.body())));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(ERROR_HEADER, HeaderValue::from_static(label));
        resp
    }

    /// The JSON-RPC message that tells the client (also sent as the last event of a stream
    /// that broke).
    pub fn body(&self) -> Bytes {
        match self.inner() {
            ProxyError::UnregisteredTool(_) => {
                let result = json!({
                    "content": [{ "type": "text", "text": self.to_string() }],
                    "isError": true
                });
                Bytes::from(
                    serde_json::to_vec(
                        &json!({ "jsonrpc": "2.0", "id": self.id(), "result": result }),
                    )
                    .unwrap_or_default(),
                )
            }
            _ => jsonrpc::error_body(self.id(), self.rpc_code(), &self.to_string(), self.data()),
        }
    }
}

impl From<jsonrpc::RpcError> for ProxyError {
    fn from(e: jsonrpc::RpcError) -> Self {
        Self::Protocol(e)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http_body_util::BodyExt;

    async fn body(resp: Response<BoxBody>) -> Value {
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn an_error_answers_with_its_status_code_label_and_the_request_id() {
        let e = ProxyError::NoEndpoint {
            capability: "get_weather".into(),
            selector: String::new(),
            registered: 1,
        }
        .for_request(Some(&Id::from(7)));
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(!e.may_have_reached_agent());
        let resp = e.into_response();
        assert_eq!(resp.headers()[ERROR_HEADER], "no_endpoint");
        let v = body(resp).await;
        assert_eq!(v["id"], 7);
        assert_eq!(v["error"]["code"], jsonrpc::NO_ENDPOINT);
        let msg = v["error"]["message"].as_str().unwrap();
        assert_eq!(
            msg,
            "capability \"get_weather\" has no healthy endpoint (1 registered)"
        );
        assert!(!msg.contains("Capability(") && !msg.contains("Some("));
    }

    #[test]
    fn unknown_tools_name_what_the_agent_can_call() {
        let e = ProxyError::UnknownTool {
            name: "nope".into(),
            why: "no agent in the mesh provides it",
            known: vec!["get_weather".into(), "llm".into()],
        };
        assert_eq!(
            e.to_string(),
            "unknown capability \"nope\": no agent in the mesh provides it; this agent can call: get_weather, llm"
        );
        assert_eq!(e.status(), StatusCode::OK);
    }
}

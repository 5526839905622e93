//! The bottom of the inbound stack: sessions with the agent, and the agent client.
//!
//! * [`Shared`] (mesh calls): the proxy holds one MCP session with its agent for every caller.
//!   Its id never leaves the proxy. A request the agent sends a caller on a call's stream gets
//!   an id sealed for that caller, so only that caller's answer is accepted.
//! * [`Owned`] (passthrough, the agent's own paths): each caller's conversation is its own
//!   session; the agent's session id goes out sealed for the caller, so no other caller can
//!   use or end it.
//! * [`AgentClient`]: sends to the agent over plain HTTP on localhost, with the agent's view
//!   of the headers (the verified caller, its own `Host`, the trace continued).

use std::sync::Arc;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use serde_json::Value;

use super::authorize::Inspection;
use super::{Caller, Path};
use crate::agent::{Agent, AgentSession};
use crate::contract::{CALLER_HEADER, MESH_HEADER_PREFIX};
use crate::error::ProxyError;
use crate::headers::{continue_trace, is_hop_by_hop};
use crate::mcp::classify::MODERN;
use crate::mcp::header::{MCP_PROTOCOL_VERSION, MCP_SESSION_ID};
use crate::mcp::inspect::Inspected;
use crate::mcp::relay::{EventFn, MapEvents};
use crate::mcp::sse::Event;
use crate::outbound::tool_call::sealer;
use crate::seal::{self, Sealer};
use crate::stack::{Either, Handled, Handler, Middleware, Next, call, refuse};
use crate::{BoxBody, Proxy, boxed};

fn caller_of<B>(req: &Request<B>) -> String {
    req.extensions()
        .get::<Caller>()
        .cloned()
        .unwrap_or_default()
        .to_string()
}

fn ready_sealer(proxy: &Proxy) -> Result<Sealer, ProxyError> {
    sealer(proxy)
        .ok_or_else(|| ProxyError::NotReady("no session key from the control plane yet".into()))
}

/// Mesh calls in the proxy's own session with the agent (see the module docs).
#[derive(Debug, Clone)]
pub struct Shared {
    proxy: Arc<Proxy>,
}

impl Shared {
    /// For `proxy`'s agent.
    pub fn new(proxy: Arc<Proxy>) -> Self {
        Self { proxy }
    }
}

impl<S> Middleware<Request<Bytes>, S> for Shared
where
    S: Next<Request<Bytes>, Response<BoxBody>>,
{
    type Response = Response<BoxBody>;

    fn handle(self, req: Request<Bytes>, next: S) -> impl Handled<Response<BoxBody>> {
        let Some(agent) = self.proxy.agent.clone() else {
            return Either::Left(refuse(ProxyError::NoAgent));
        };
        let opened = ready_sealer(&self.proxy).and_then(|sealer| {
            let caller = caller_of(&req);
            let req = open_answer(req, &sealer, &caller)?;
            Ok((sealer, caller, req))
        });
        let (sealer, caller, req) = match opened {
            Ok(opened) => opened,
            Err(e) => return Either::Left(refuse(e)),
        };
        let modern = req
            .headers()
            .get(MCP_PROTOCOL_VERSION)
            .is_some_and(|v| v.as_bytes() == MODERN.as_bytes());
        Either::Right(if modern {
            Either::Left(
                call(next, req).map(move |answer| Ok(seal_requests(answer?, sealer, caller))),
            )
        } else {
            Either::Right(in_agent_session(agent, sealer, caller, req, next))
        })
    }
}

/// A 2025 call in the proxy's session with the agent, opened again (once) if the agent has
/// forgotten it.
async fn in_agent_session<S>(
    agent: Arc<Agent>,
    sealer: Sealer,
    caller: String,
    req: Request<Bytes>,
    next: S,
) -> Result<Response<BoxBody>, ProxyError>
where
    S: Next<Request<Bytes>, Response<BoxBody>>,
{
    let session = agent_session(&agent).await?;
    let resp = call(next.clone(), in_session(&req, &session)).await?;
    // An agent that restarted or expired our session answers 404 without running anything:
    // open a new session and send the request in it. Not a retry: the request has not been
    // processed.
    let resp = if resp.status() == StatusCode::NOT_FOUND && session.id.is_some() {
        agent.forget_session(&session).await;
        let fresh = agent_session(&agent).await?;
        call(next, in_session(&req, &fresh)).await?
    } else {
        resp
    };
    Ok(seal_requests(resp, sealer, caller))
}

async fn agent_session(agent: &Agent) -> Result<AgentSession, ProxyError> {
    agent
        .session()
        .await
        .map_err(|e| ProxyError::AgentUnreachable(format!("{e:#}")))
}

/// `req` in `session`: its id and protocol version.
fn in_session(req: &Request<Bytes>, session: &AgentSession) -> Request<Bytes> {
    let mut out = Request::new(req.body().clone());
    *out.method_mut() = req.method().clone();
    *out.uri_mut() = req.uri().clone();
    *out.headers_mut() = req.headers().clone();
    *out.extensions_mut() = req.extensions().clone();
    let h = out.headers_mut();
    h.remove(MCP_SESSION_ID);
    if let Ok(v) = HeaderValue::from_str(&session.version) {
        h.insert(MCP_PROTOCOL_VERSION, v);
    }
    if let Some(id) = &session.id
        && let Ok(v) = HeaderValue::from_str(id)
    {
        h.insert(MCP_SESSION_ID, v);
    }
    out
}

/// A caller's answer to a request the agent sent it: its id must be one sealed for this
/// caller, and goes back to the agent's own.
fn open_answer(
    req: Request<Bytes>,
    sealer: &Sealer,
    caller: &str,
) -> Result<Request<Bytes>, ProxyError> {
    // Authorization read the messages already: only a response needs the tree.
    let response = req
        .extensions()
        .get::<Inspection>()
        .is_some_and(|m| m.0.iter().any(Inspected::is_response));
    if !response {
        return Ok(req);
    }
    let Ok(mut message) = serde_json::from_slice::<Value>(req.body()) else {
        return Ok(req);
    };
    let own = message
        .get("id")
        .and_then(Value::as_str)
        .and_then(|id| sealer.open_for(seal::AGENT_REQUEST, caller, id))
        .and_then(|text| serde_json::from_str::<Value>(&text).ok())
        .ok_or(ProxyError::UnknownServerRequest)?;
    message["id"] = own;
    let body = serde_json::to_vec(&message).map_err(|e| ProxyError::Internal(e.to_string()))?;
    let (parts, _) = req.into_parts();
    Ok(Request::from_parts(parts, Bytes::from(body)))
}

/// The agent's answer to a mesh call: its session id kept here; on an event stream, the id of
/// each request the agent sends the caller sealed for that caller.
fn seal_requests(resp: Response<BoxBody>, sealer: Sealer, caller: String) -> Response<BoxBody> {
    let (mut parts, body) = resp.into_parts();
    parts.headers.remove(MCP_SESSION_ID);
    let sse = parts
        .headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if !sse {
        return Response::from_parts(parts, body);
    }
    let map: EventFn = Box::new(move |mut event: Event| {
        let Ok(mut v) = serde_json::from_str::<Value>(&event.data) else {
            return event;
        };
        let Some(id) = v.get("id").filter(|id| !id.is_null()) else {
            return event;
        };
        if v.get("method").is_none() {
            return event;
        }
        if let Some(sealed) = sealer.seal_for(seal::AGENT_REQUEST, &caller, &id.to_string()) {
            v["id"] = Value::String(sealed);
            event.data = v.to_string();
        }
        event
    });
    Response::from_parts(parts, boxed(MapEvents::new(body, map)))
}

/// A caller's own conversation with the agent (see the module docs).
#[derive(Debug, Clone)]
pub struct Owned {
    proxy: Arc<Proxy>,
}

impl Owned {
    /// For `proxy`'s agent.
    pub fn new(proxy: Arc<Proxy>) -> Self {
        Self { proxy }
    }
}

impl<S> Middleware<Request<Bytes>, S> for Owned
where
    S: Next<Request<Bytes>, Response<BoxBody>>,
{
    type Response = Response<BoxBody>;

    fn handle(self, mut req: Request<Bytes>, next: S) -> impl Handled<Response<BoxBody>> {
        let sealer = match ready_sealer(&self.proxy) {
            Ok(sealer) => sealer,
            Err(e) => return Either::Left(refuse(e)),
        };
        let caller = caller_of(&req);
        let mut known: Option<(HeaderValue, String)> = None;
        if let Some(sealed) = req.headers().get(MCP_SESSION_ID).cloned() {
            let opened = sealed
                .to_str()
                .ok()
                .and_then(|s| sealer.open_for(seal::AGENT_SESSION, &caller, s))
                .and_then(|own| Some((HeaderValue::from_str(&own).ok()?, own)));
            let Some((v, own)) = opened else {
                return Either::Left(refuse(ProxyError::UnknownSession));
            };
            req.headers_mut().insert(MCP_SESSION_ID, v);
            known = Some((sealed, own));
        }
        Either::Right(call(next, req).map(move |answer| {
            let mut resp = answer?;
            let answered = resp
                .headers()
                .get(MCP_SESSION_ID)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            if let Some(own) = answered {
                // The same session: the caller's id back unchanged; a new one sealed.
                let v = match known {
                    Some((sealed, plain)) if plain == own => Some(sealed),
                    _ => sealer
                        .seal_for(seal::AGENT_SESSION, &caller, &own)
                        .and_then(|s| HeaderValue::from_str(&s).ok()),
                };
                match v {
                    Some(v) => resp.headers_mut().insert(MCP_SESSION_ID, v),
                    None => resp.headers_mut().remove(MCP_SESSION_ID),
                };
            }
            Ok(resp)
        }))
    }
}

/// Sends a request to the agent and streams the answer back (see the module docs).
#[derive(Debug, Clone)]
pub struct AgentClient {
    proxy: Arc<Proxy>,
}

impl AgentClient {
    /// For `proxy`'s agent.
    pub fn new(proxy: Arc<Proxy>) -> Self {
        Self { proxy }
    }
}

/// The headers the agent receives: the caller's minus hop-by-hop and the mesh's own, plus the
/// verified caller, the agent's own `Host`, and the trace continued.
fn agent_headers(from: &HeaderMap, caller: &str, agent: &Agent) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(from.len() + 3);
    for (name, value) in from {
        let n = name.as_str();
        // `origin` belongs to the caller's side of the mesh; agents that check it would refuse.
        if is_hop_by_hop(n)
            || n.starts_with(MESH_HEADER_PREFIX)
            || matches!(n, "traceparent" | "tracestate" | "origin")
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out.insert(header::HOST, agent.authority().clone());
    if let Ok(v) = HeaderValue::from_str(caller) {
        out.insert(http::HeaderName::from_static(CALLER_HEADER), v);
    }
    continue_trace(from, &mut out);
    out
}

impl Handler<Request<Bytes>> for AgentClient {
    type Response = Response<BoxBody>;
    fn serve(self, req: Request<Bytes>) -> impl Handled<Response<BoxBody>> {
        let Some(agent) = self.proxy.agent.as_ref() else {
            return Either::Left(refuse(ProxyError::NoAgent));
        };
        let caller = caller_of(&req);
        let uri = match Path::of(&req) {
            Path::Agent => {
                let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
                match agent.uri_for(path) {
                    Ok(uri) => uri,
                    Err(e) => {
                        return Either::Left(refuse(ProxyError::Protocol(
                            crate::mcp::jsonrpc::RpcError::new(
                                crate::mcp::jsonrpc::INVALID_REQUEST,
                                format!("bad path: {e}"),
                            ),
                        )));
                    }
                }
            }
            _ => agent.url().clone(),
        };
        let (parts, body) = req.into_parts();
        let mut out = Request::new(body);
        *out.method_mut() = parts.method;
        *out.uri_mut() = uri;
        *out.headers_mut() = agent_headers(&parts.headers, &caller, agent);
        Either::Right(agent.send(out).map(|answer| {
            let resp = answer.map_err(|e| {
                if e.is_connect() {
                    ProxyError::AgentUnreachable(e.to_string())
                } else {
                    ProxyError::AgentFailed(e.to_string())
                }
            })?;
            let (mut parts, body) = resp.into_parts();
            let hop: Vec<_> = parts
                .headers
                .keys()
                .filter(|k| is_hop_by_hop(k.as_str()))
                .cloned()
                .collect();
            for k in hop {
                parts.headers.remove(k);
            }
            Ok(Response::from_parts(parts, boxed(body)))
        }))
    }
}

//! A federated `tools/call`: [`Resolve`] finds the capability's ranked endpoints (or the one
//! instance a `requestState` names) and makes the [`Call`]; [`Relay`] gives the call an id of
//! the mesh's own at the provider and maps the response back: the client's id, providers'
//! requests to the client under sealed ids, an `input_required` `requestState` sealed with its
//! instance.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use capmesh_api::{Capability, Endpoint};
use futures_util::FutureExt;
use http::{HeaderMap, HeaderValue, Method, Response, header};
use http_body_util::Full;
use serde_json::{Value, json};

use super::federated::Mcp;
use crate::contract::{MAX_RESPONSE, SERVED_BY_HEADER, TIMEOUT_HEADER};
use crate::error::ProxyError;
use crate::forward::{Attempts, Call, CallSpec, Target, Upstream};
use crate::mcp::classify::{Classified, Generation};
use crate::mcp::jsonrpc::Id;
use crate::mcp::relay::{CutFn, EventFn, MapEvents};
use crate::mcp::rewrite::replace_response_id;
use crate::mcp::sse::Event;
use crate::pool::PeerBody;
use crate::seal::{self, Route, Sealer};
use crate::stack::{Either, Handled, Middleware, Next, call, read_body, refuse};
use crate::{BoxBody, Proxy, boxed};

/// A `tools/call` on its way to a provider, with the id the provider will see.
#[derive(Debug, Clone)]
pub struct ToolCall {
    /// The request.
    pub mcp: Mcp,
    /// The mesh's own id for it at the provider.
    pub upstream_id: Value,
}

/// The mesh's session-sealing key, once the control plane sent it.
pub fn sealer(proxy: &Proxy) -> Option<Sealer> {
    proxy.routing.load().sealer.clone()
}

/// The caller's deadline: `x-capmesh-timeout`, else the mesh's default.
pub fn call_timeout(proxy: &Proxy, headers: &HeaderMap) -> Duration {
    const TIMEOUT: http::HeaderName = http::HeaderName::from_static(TIMEOUT_HEADER);
    headers
        .get(TIMEOUT)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| capmesh_api::duration::parse_duration(v).ok())
        .unwrap_or_else(|| {
            let ms = proxy
                .routing
                .load()
                .snapshot
                .as_ref()
                .map(|s| s.settings.request_timeout_ms)
                .unwrap_or(300_000);
            Duration::from_millis(ms)
        })
}

/// The headers of a JSON POST to a provider's proxy: content type, `accept` (the client's, or
/// both MCP answers), the client's `MCP-Protocol-Version`, the propagated headers and the
/// trace continued.
pub fn mesh_headers(proxy: &Proxy, client: &HeaderMap) -> HeaderMap {
    // Six fit the usual four (content type, accept, protocol version, trace context) and two
    // propagated headers in a map small enough for the allocator's per-thread cache.
    let mut out = HeaderMap::with_capacity(6);
    out.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    out.insert(
        header::ACCEPT,
        client
            .get(header::ACCEPT)
            .cloned()
            .unwrap_or(HeaderValue::from_static(
                "application/json, text/event-stream",
            )),
    );
    if let Some(v) = client.get(crate::mcp::header::MCP_PROTOCOL_VERSION) {
        out.insert(crate::mcp::header::MCP_PROTOCOL_VERSION, v.clone());
    }
    proxy.propagation.load().copy(client, &mut out);
    crate::headers::continue_trace(client, &mut out);
    out
}

/// Gives the call an id of the mesh's own at the provider (the provider's agent serves every
/// consumer in one session) and relays the response with the ids mapped back.
#[derive(Debug, Clone)]
pub struct Relay {
    proxy: Arc<Proxy>,
}

impl Relay {
    /// Relaying for `proxy`.
    pub fn new(proxy: Arc<Proxy>) -> Self {
        Self { proxy }
    }
}

impl<S> Middleware<Mcp, S> for Relay
where
    S: Next<ToolCall, Response<PeerBody>>,
{
    type Response = Response<BoxBody>;

    fn handle(self, req: Mcp, next: S) -> impl Handled<Response<BoxBody>> {
        let proxy = self.proxy;
        let mut upstream_id = String::with_capacity(3 + 24);
        upstream_id.push_str("cm-");
        crate::ids::push_random_hex(&mut upstream_id, 12);
        let upstream_id = Value::String(upstream_id);
        // What the relay needs of the request (not the body's tree).
        let asked = Asked {
            id: req.classified.id.clone(),
            session_id: req.classified.session_id.clone(),
            generation: req.classified.generation,
        };
        let tool_call = ToolCall {
            mcp: req,
            upstream_id: upstream_id.clone(),
        };
        call(next, tool_call)
            .then(move |answer| async move { relay(&proxy, answer?, &asked, &upstream_id).await })
    }
}

/// A 2026-07-28 `input_required` result: its `requestState` sealed with the route of the
/// instance that minted it, so that the retry goes back there. Returns whether it changed `v`
/// (a JSON-RPC response).
pub fn seal_request_state(v: &mut Value, sealer: Option<&Sealer>, route: &Route) -> bool {
    let Some(result) = v.get_mut("result") else {
        return false;
    };
    if result.get("resultType").and_then(Value::as_str) != Some("input_required") {
        return false;
    }
    let Some(state) = result
        .get("requestState")
        .filter(|s| s.is_string())
        .cloned()
    else {
        return false;
    };
    let mut minted = route.clone();
    minted.upstream_id = state;
    let Some(sealed) = sealer.and_then(|s| s.seal_route(seal::REQUEST_STATE, &minted)) else {
        return false;
    };
    result["requestState"] = json!(sealed);
    true
}

/// What relaying a call's response needs of its request.
struct Asked {
    id: Option<Id>,
    session_id: Option<String>,
    generation: Generation,
}

/// The call's id at the provider and the client's, as raw JSON text.
struct Ids {
    upstream: Bytes,
    client: Bytes,
}

impl Ids {
    /// Both written into one buffer, which the two share.
    fn of(upstream: &Value, client: &Value) -> Self {
        let mut raw = Vec::with_capacity(64);
        let _ = serde_json::to_writer(&mut raw, upstream);
        let split = raw.len();
        let _ = serde_json::to_writer(&mut raw, client);
        let raw = Bytes::from(raw);
        Self {
            upstream: raw.slice(..split),
            client: raw.slice(split..),
        }
    }
}

/// Whether a message needs the JSON tree: a provider's request to the client (its id is
/// sealed into a route) or an `input_required` result (its `requestState` is sealed).
fn needs_tree(data: &[u8]) -> bool {
    memchr::memmem::find(data, b"\"method\"").is_some()
        || memchr::memmem::find(data, b"input_required").is_some()
}

/// Streams a provider's response back: status, content type and body, each SSE event passed
/// on as it arrives. The call's id goes back to the client's; requests the provider sends the
/// client on the stream get sealed ids naming the provider; a 2025 session's streaming call is
/// recorded for `notifications/cancelled` until its stream ends.
async fn relay(
    proxy: &Arc<Proxy>,
    resp: Response<PeerBody>,
    classified: &Asked,
    upstream_id: &Value,
) -> Result<Response<BoxBody>, ProxyError> {
    let Some(ep) = resp.body().served().cloned() else {
        return Err(ProxyError::Internal(
            "a response without its endpoint".into(),
        ));
    };
    let (parts, body) = resp.into_parts();
    let client_id = classified.id.as_ref().map_or(Value::Null, Id::to_value);
    let sse = parts
        .headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    // The provider's route and the sealer: only an event stream, or an answer that needs the
    // tree, uses them.
    let route = || Route {
        endpoint: ep.id.clone(),
        instance: ep.instance.clone(),
        capability: ep.capability.to_string(),
        upstream_id: upstream_id.clone(),
    };
    // The ids as raw JSON text: the provider echoes the mesh's id byte for byte, so the
    // response gets the client's back by a splice, without a tree (the slow path below only
    // for what needs one: a provider's request to the client, an input_required result).
    let ids = Ids::of(upstream_id, &client_id);
    let body = if sse {
        let route = route();
        let sealer = sealer(proxy);
        let guard = match (&classified.session_id, &classified.id) {
            (Some(session), Some(id)) if classified.generation == Generation::Legacy => {
                Some(proxy.sessions.track(session, id, route.clone()))
            }
            _ => None,
        };
        let up = upstream_id.clone();
        let answered = Arc::new(AtomicBool::new(false));
        let cut = cut_off(&ep, classified.id.clone(), answered.clone());
        let map: EventFn = Box::new(move |mut event: Event| {
            let _streaming = &guard;
            let data = event.data.as_bytes();
            if !needs_tree(data)
                && let Some(out) = replace_response_id(data, &ids.upstream, &ids.client)
            {
                answered.store(true, Ordering::Relaxed);
                event.data = String::from_utf8(out.to_vec()).unwrap_or_default();
                return event;
            }
            let Ok(mut v) = serde_json::from_str::<Value>(&event.data) else {
                return event;
            };
            if v.get("method").is_some() {
                let Some(id) = v.get("id").filter(|id| !id.is_null()).cloned() else {
                    return event;
                };
                let mut asked = route.clone();
                asked.upstream_id = id;
                if let Some(sealed) = sealer
                    .as_ref()
                    .and_then(|s| s.seal_route(seal::SERVER_REQUEST, &asked))
                {
                    v["id"] = json!(sealed);
                    event.data = v.to_string();
                }
            } else if v.get("id") == Some(&up) {
                answered.store(true, Ordering::Relaxed);
                v["id"] = client_id.clone();
                seal_request_state(&mut v, sealer.as_ref(), &route);
                event.data = v.to_string();
            }
            event
        });
        boxed(MapEvents::new(body, map).on_cut(cut))
    } else {
        // One JSON response: read it (bounded) to give it the client's id.
        let bytes = read_body(body, MAX_RESPONSE)
            .await
            .map_err(|e| ProxyError::UpstreamBody(format!("{}: {e}", ep.identity)))?;
        let fast = (!needs_tree(&bytes))
            .then(|| replace_response_id(&bytes, &ids.upstream, &ids.client))
            .flatten();
        let bytes = match fast {
            Some(out) => out,
            None => match serde_json::from_slice::<Value>(&bytes) {
                Ok(mut v) if v.get("id") == Some(upstream_id) => {
                    v["id"] = client_id;
                    seal_request_state(&mut v, sealer(proxy).as_ref(), &route());
                    Bytes::from(serde_json::to_vec(&v).unwrap_or_else(|_| bytes.to_vec()))
                }
                _ => bytes,
            },
        };
        boxed(Full::new(bytes))
    };
    let mut out = Response::new(body);
    *out.status_mut() = parts.status;
    for name in [header::CONTENT_TYPE, header::CACHE_CONTROL] {
        if let Some(v) = parts.headers.get(&name) {
            out.headers_mut().insert(name, v.clone());
        }
    }
    const ACCEL_BUFFERING: http::HeaderName = http::HeaderName::from_static("x-accel-buffering");
    if let Some(v) = parts.headers.get(ACCEL_BUFFERING) {
        out.headers_mut().insert(ACCEL_BUFFERING, v.clone());
    }
    if let Some(v) = crate::headers::served_by(&ep) {
        out.headers_mut()
            .insert(http::HeaderName::from_static(SERVED_BY_HEADER), v);
    }
    Ok(out)
}

/// When a provider's event stream breaks before it answered, the client's stream ends with a
/// JSON-RPC error for its request naming the provider (the call reached it and may have run
/// there, so it is not sent again), rather than being cut.
fn cut_off(ep: &Endpoint, id: Option<Id>, answered: Arc<AtomicBool>) -> CutFn {
    let provider = format!("{}#{}", ep.identity, ep.instance);
    Box::new(move |e| {
        if answered.load(Ordering::Relaxed) {
            return None;
        }
        let error = ProxyError::UpstreamBody(format!(
            "{provider}: its event stream broke before it answered: {e}"
        ))
        .for_request(id.as_ref());
        Some(Event::message(
            String::from_utf8_lossy(&error.body()).into_owned(),
        ))
    })
}

/// Resolves a `tools/call` to the [`Call`] the forward stack sends: the tool's capability and
/// its endpoints ranked for the agent's selector (cached per snapshot), or the instance a
/// retried call's `requestState` names.
#[derive(Debug, Clone)]
pub struct Resolve {
    proxy: Arc<Proxy>,
}

impl Resolve {
    /// Resolving in `proxy`'s routing table.
    pub fn new(proxy: Arc<Proxy>) -> Self {
        Self { proxy }
    }
}

impl<S> Middleware<ToolCall, S> for Resolve
where
    S: Next<Call, Response<PeerBody>>,
{
    type Response = Response<PeerBody>;

    fn handle(self, req: ToolCall, next: S) -> impl Handled<Response<PeerBody>> {
        match resolve(&self.proxy, req) {
            Ok(spec) => Either::Left(call(next, spec)),
            Err(e) => Either::Right(refuse(e)),
        }
    }
}

fn resolve(proxy: &Proxy, req: ToolCall) -> Result<Call, ProxyError> {
    let c = &req.mcp.classified;
    let name = c.name.as_deref().unwrap_or_default();
    let routing = proxy.routing.load_full();
    let Some(tool) = routing.tool(name) else {
        let known: Vec<String> = routing.tools.iter().map(|t| t.name.clone()).collect();
        let why = match Capability::new(name) {
            Ok(cap) if routing.known(&cap) => {
                "it exists in the mesh, but this agent does not depend on it or may not call it"
            }
            _ => "no agent in the mesh provides it",
        };
        return Err(ProxyError::UnknownTool {
            name: name.to_owned(),
            why,
            known,
        });
    };
    let cap = &tool.capability;
    // A retry carrying the mesh's requestState goes to the instance that minted it.
    let (target, restored) = match request_state_route(proxy, c) {
        None => {
            if tool.ranks.iter().all(Vec::is_empty) {
                proxy
                    .metrics
                    .responses
                    .with_label_values(&[cap.as_str(), "503", "no_endpoint"])
                    .inc();
                return Err(ProxyError::NoEndpoint {
                    capability: cap.to_string(),
                    selector: tool.selector.to_string(),
                    registered: tool.registered,
                });
            }
            let target = Target::Ranked {
                ranks: tool.ranks.clone(),
            };
            (target, None)
        }
        Some(Some(route)) if route.capability == cap.as_str() => {
            let ep = routing
                .endpoints(cap)
                .iter()
                .find(|e| e.id == route.endpoint && e.instance == route.instance && e.healthy)
                .cloned()
                .ok_or_else(|| {
                    ProxyError::StaleRequestState(format!(
                        "the provider instance {} that issued this requestState is gone",
                        route.instance
                    ))
                })?;
            (Target::Pinned(ep), Some(route.upstream_id))
        }
        Some(_) => {
            return Err(ProxyError::StaleRequestState(format!(
                "requestState was not issued by this mesh for capability \"{cap}\""
            )));
        }
    };
    proxy
        .metrics
        .requests
        .with_label_values(&[cap.as_str()])
        .inc();
    proxy.retry_budget.deposit();
    let headers = mesh_headers(proxy, &req.mcp.headers);
    Ok(Call(Arc::new(CallSpec {
        target,
        upstream: Upstream::ToolCall {
            upstream_id: req.upstream_id,
            request_state: restored,
            modern: c.generation == Generation::Modern,
        },
        method: Method::POST,
        timeout: call_timeout(proxy, &req.mcp.headers),
        headers,
        body: req.mcp.body,
        safe: false,
        label: cap.to_string(),
        attempts: Attempts::default(),
    })))
}

/// The route a retried 2026-07-28 call's `requestState` names: `None` when it carries none of
/// the mesh's, `Some(None)` when it carries one that does not open.
fn request_state_route(proxy: &Proxy, classified: &Classified) -> Option<Option<Route>> {
    if classified.generation != Generation::Modern {
        return None;
    }
    let state = classified.request_state.as_deref()?;
    if !state.starts_with(seal::PREFIX) {
        return None;
    }
    Some(sealer(proxy).and_then(|s| s.open_route(seal::REQUEST_STATE, state)))
}

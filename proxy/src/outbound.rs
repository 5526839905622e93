//! Outbound: the mesh as one MCP server at `http://127.0.0.1:15001/mcp`.
//!
//! The local agent sees one server whose tools are the capabilities it depends on. The proxy
//! answers the protocol itself (`initialize` with its own session ids, `server/discover`,
//! `tools/list` from the snapshot, `ping`) and routes each `tools/call` to a provider:
//! resolve (tags, version) → pick (power of two choices over peak-EWMA) → forward over mutual
//! TLS to the provider's proxy → on a failure that cannot have reached the agent, retry on
//! another endpoint within the retry budget. The response streams back unbuffered.
//!
//! Ids across the mesh: a call gets its own id at the provider (mapped back in the response);
//! a provider's request to the client on the call's stream gets a sealed id naming the provider
//! instance, so the client's answer goes back there (`answer_provider`); a 2025 session's
//! `notifications/cancelled` follows its call ([`Sessions`] keeps the streaming ones); a
//! 2026-07-28 `input_required` result's `requestState` is sealed with its instance so that the
//! retry returns to it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use capmesh_api::{Endpoint, EndpointId, ToolSpec};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::{Value, json};

use crate::balance::{self, Outcome};
use crate::mcp::classify::{self, Classified, Generation};
use crate::mcp::jsonrpc::{self, Id, Message, Parsed};
use crate::mcp::relay::{EventFn, MapEvents};
use crate::mcp::sse::Event;
use crate::passthrough::Sealer;
use crate::{BoxBody, Proxy, boxed};

/// Largest request body accepted from the agent.
pub const MAX_REQUEST: usize = 4 * 1024 * 1024;
/// Path of federated calls on a peer proxy's inbound listener.
pub const CALL_PATH: &str = "/.capmesh/call";
const MAX_ATTEMPTS: usize = 3;

/// Sessions the proxy minted for legacy clients of the federated endpoint: id → protocol
/// version; and the calls of those sessions still streaming, so that a client's
/// `notifications/cancelled` reaches the provider running the call.
#[derive(Debug, Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, String>>,
    calls: Arc<Mutex<HashMap<(String, String), Route>>>,
}

/// Where a call or a provider's request to the client lives: the provider instance, the
/// capability it was reached for, the session its proxy holds with its agent, and the id the
/// agent knows.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub(crate) endpoint: EndpointId,
    pub(crate) instance: String,
    pub(crate) capability: String,
    pub(crate) upstream_session: Option<String>,
    pub(crate) upstream_id: Value,
}

impl Route {
    pub(crate) fn to_json(&self) -> Value {
        json!([
            self.endpoint.as_str(),
            self.instance,
            self.capability,
            self.upstream_session,
            self.upstream_id
        ])
    }

    pub(crate) fn from_json(v: Value) -> Option<Self> {
        let (endpoint, instance, capability, upstream_session, upstream_id): (
            String,
            String,
            String,
            Option<String>,
            Value,
        ) = serde_json::from_value(v).ok()?;
        Some(Self {
            endpoint: EndpointId(endpoint),
            instance,
            capability,
            upstream_session,
            upstream_id,
        })
    }
}

/// Removes a streaming call from [`Sessions`] when its response ends or the client leaves.
struct CallGuard {
    calls: Arc<Mutex<HashMap<(String, String), Route>>>,
    key: (String, String),
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

impl Sessions {
    fn mint(&self, version: &str) -> String {
        let id = crate::random_hex(16);
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), version.to_owned());
        id
    }

    fn version(&self, id: &str) -> Option<String> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    fn remove(&self, id: &str) -> bool {
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(session, _), _| session != id);
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
            .is_some()
    }

    /// Records a call of `session` (client id `id`) as streaming from `route`, until the
    /// returned guard drops.
    fn track(&self, session: &str, id: &Id, route: Route) -> CallGuard {
        let key = (session.to_owned(), id.to_string());
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone(), route);
        CallGuard {
            calls: Arc::clone(&self.calls),
            key,
        }
    }

    fn call_route(&self, session: &str, id: &Id) -> Option<Route> {
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(session.to_owned(), id.to_string()))
            .cloned()
    }
}

/// Prefix of the ids the proxy gives providers' requests to the client (sealed routes).
pub(crate) const SERVER_REQUEST_PREFIX: &str = "capmesh-";
/// What sealed server-request ids are bound to.
const SERVER_REQUEST_CONTEXT: &str = "capmesh/server-request";
/// What sealed 2026-07-28 `requestState` values are bound to.
pub(crate) const REQUEST_STATE_CONTEXT: &str = "capmesh/request-state";

/// A 2026-07-28 `input_required` result: its `requestState` sealed with the route of the
/// instance that minted it, so that the retry goes back there (another replica could not open
/// it). Returns whether it changed `v` (a JSON-RPC response).
pub(crate) fn seal_request_state(v: &mut Value, sealer: Option<&Sealer>, route: &Route) -> bool {
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
    let Some(sealed) = sealer.and_then(|s| s.seal_json(REQUEST_STATE_CONTEXT, &minted.to_json()))
    else {
        return false;
    };
    result["requestState"] = json!(format!("{SERVER_REQUEST_PREFIX}{sealed}"));
    true
}

/// The route a retried 2026-07-28 call's `requestState` names: `None` when it carries none of
/// the mesh's, `Some(None)` when it carries one that does not open.
fn request_state_route(proxy: &Proxy, classified: &Classified) -> Option<Option<Route>> {
    if classified.generation != Generation::Modern {
        return None;
    }
    let state = classified
        .message
        .single()
        .and_then(Message::params)
        .and_then(|p| p.get("requestState"))
        .and_then(Value::as_str)?
        .strip_prefix(SERVER_REQUEST_PREFIX)?;
    Some(
        mesh_sealer(proxy)
            .and_then(|s| s.open_json(REQUEST_STATE_CONTEXT, state))
            .and_then(Route::from_json),
    )
}

fn json_response(status: StatusCode, body: Bytes) -> Response<BoxBody> {
    let mut resp = Response::new(boxed(Full::new(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

pub(crate) fn rpc_error(
    status: StatusCode,
    id: Option<&Id>,
    code: i64,
    message: &str,
    data: Option<Value>,
) -> Response<BoxBody> {
    json_response(status, jsonrpc::error_body(id, code, message, data))
}

fn text(status: StatusCode, msg: &str) -> Response<BoxBody> {
    let mut resp = Response::new(boxed(Full::new(Bytes::from(format!("{msg}\n")))));
    *resp.status_mut() = status;
    resp
}

/// Whether `host` (a `Host` value or an `Origin`'s host, port allowed) names this machine:
/// `localhost`, a loopback IP (`127.0.0.0/8`, `[::1]`), or an IP literal at all when
/// `ip_ok` (a sidecar may listen on a pod address).
fn local_host(host: &str, ip_ok: bool) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else {
        host.rsplit_once(':').map_or(host, |(h, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                host
            }
        })
    };
    if name.eq_ignore_ascii_case("localhost") {
        return true;
    }
    match name.parse::<std::net::IpAddr>() {
        Ok(ip) => ip_ok || ip.is_loopback(),
        Err(_) => false,
    }
}

/// DNS-rebinding protection for the outbound listener, a plain-HTTP server on the agent's
/// machine: a browser page on another site can reach it under a name of its own. An `Origin`
/// that is not this machine is refused everywhere; on passthrough a `Host` that names another
/// site is refused too (the provider's own check cannot see it: its proxy sets `Host` to the
/// agent's address). Returns the 403 to send.
fn rebinding_refusal(headers: &HeaderMap, passthrough: bool) -> Option<Response<BoxBody>> {
    if let Some(origin) = headers.get(header::ORIGIN) {
        let host = origin
            .to_str()
            .ok()
            .and_then(|o| o.split_once("://"))
            .map(|(_, rest)| rest.split('/').next().unwrap_or_default());
        if !host.is_some_and(|h| local_host(h, false)) {
            return Some(rpc_error(
                StatusCode::FORBIDDEN,
                None,
                jsonrpc::INVALID_REQUEST,
                "Origin is not this machine (DNS-rebinding protection): the mesh takes requests from the local agent only",
                None,
            ));
        }
    }
    if passthrough
        && let Some(host) = headers.get(header::HOST)
        && !host.to_str().is_ok_and(|h| local_host(h, true))
    {
        return Some(rpc_error(
            StatusCode::FORBIDDEN,
            None,
            jsonrpc::INVALID_REQUEST,
            "Host is not this machine (DNS-rebinding protection): use http://127.0.0.1:<outbound port>/capabilities/<capability>/mcp",
            None,
        ));
    }
    None
}

/// Routes one request on the outbound listener.
pub async fn handle(proxy: Arc<Proxy>, req: Request<Incoming>) -> Response<BoxBody> {
    let path = req.uri().path().to_owned();
    let passthrough = crate::passthrough::capability_in_path(&path).is_some();
    if let Some(refused) = rebinding_refusal(req.headers(), passthrough) {
        return refused;
    }
    match (req.method().clone(), path.as_str()) {
        (Method::POST, "/mcp") => federated(proxy, req).await,
        (Method::GET, "/mcp") => listen(proxy, req),
        (Method::DELETE, "/mcp") => end_session(&proxy, req.headers()),
        (_, "/mcp") => text(
            StatusCode::METHOD_NOT_ALLOWED,
            "use POST (GET and DELETE for legacy sessions)",
        ),
        (_, p) if crate::passthrough::capability_in_path(p).is_some() => {
            let cap = crate::passthrough::capability_in_path(p)
                .unwrap_or_default()
                .to_owned();
            crate::passthrough::handle(proxy, &cap, req).await
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "the mesh is at /mcp; one capability's provider, unchanged, at /capabilities/<capability>/mcp",
        ),
    }
}

fn session_header(headers: &HeaderMap) -> Option<&str> {
    headers.get("mcp-session-id").and_then(|v| v.to_str().ok())
}

fn is_modern(headers: &HeaderMap) -> bool {
    headers
        .get("mcp-protocol-version")
        .and_then(|v| v.to_str().ok())
        == Some(classify::MODERN)
}

fn end_session(proxy: &Proxy, headers: &HeaderMap) -> Response<BoxBody> {
    if is_modern(headers) {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "protocol 2026-07-28 has no sessions",
        );
    }
    match session_header(headers) {
        Some(id) if proxy.sessions.remove(id) => text(StatusCode::OK, "session ended"),
        Some(_) => text(StatusCode::NOT_FOUND, "unknown session"),
        None => text(StatusCode::BAD_REQUEST, "missing Mcp-Session-Id"),
    }
}

/// GET /mcp (legacy): the session's standalone stream, carrying
/// `notifications/tools/list_changed` whenever the set of callable capabilities changes.
fn listen(proxy: Arc<Proxy>, req: Request<Incoming>) -> Response<BoxBody> {
    if is_modern(req.headers()) {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "protocol 2026-07-28 has no GET stream",
        );
    }
    match session_header(req.headers()) {
        Some(id) if proxy.sessions.version(id).is_some() => {}
        Some(_) => return text(StatusCode::NOT_FOUND, "unknown session: initialize again"),
        None => return text(StatusCode::BAD_REQUEST, "missing Mcp-Session-Id"),
    }
    let (tx, body) = capmesh_client::channel(8);
    let mut changes = proxy.tools_changed.subscribe();
    changes.borrow_and_update();
    tokio::spawn(async move {
        let note = Bytes::from_static(
            b"event: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/tools/list_changed\"}\n\n",
        );
        loop {
            let chunk = tokio::select! {
                changed = changes.changed() => match changed {
                    Ok(()) => note.clone(),
                    Err(_) => return,
                },
                // A comment now and then finds clients that went away.
                _ = tokio::time::sleep(Duration::from_secs(15)) => Bytes::from_static(b": keep-alive\n\n"),
            };
            if tx.send(chunk).await.is_err() {
                return;
            }
        }
    });
    let mut resp = Response::new(boxed(body));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-transform"),
    );
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

fn negotiate(requested: Option<&str>) -> &'static str {
    classify::LEGACY_VERSIONS
        .iter()
        .find(|v| Some(**v) == requested)
        .copied()
        .unwrap_or(classify::LEGACY_VERSIONS[classify::LEGACY_VERSIONS.len() - 1])
}

fn server_info() -> Value {
    json!({ "name": "capmesh", "version": env!("CARGO_PKG_VERSION") })
}

fn tools_result(proxy: &Proxy) -> Value {
    let tools: Vec<Value> = proxy
        .routing
        .load()
        .tools
        .iter()
        .map(|t| t.to_json())
        .collect();
    json!({ "tools": tools })
}

/// Adds what 2026-07-28 results carry: `resultType`, the server's info in `_meta`, and for
/// lists and discovery the caching hints. The federated tool list depends on the caller's
/// policy and on every snapshot, so it is `private` and not to be cached (`ttlMs: 0`).
fn modern_result(mut v: Value, method: &str) -> Value {
    v["resultType"] = json!("complete");
    v["_meta"] = json!({ "io.modelcontextprotocol/serverInfo": server_info() });
    if method.ends_with("/list") || method == "server/discover" {
        v["cacheScope"] = json!("private");
        v["ttlMs"] = json!(0);
    }
    v
}

/// What the proxy answers itself, or `None` when the request goes to a provider.
fn local_answer(
    proxy: &Proxy,
    generation: Generation,
    method: &str,
    params: Option<&Value>,
) -> Option<Result<Value, (i64, String)>> {
    let result = match method {
        "initialize" => {
            let requested = params
                .and_then(|p| p.get("protocolVersion"))
                .and_then(Value::as_str);
            json!({
                "protocolVersion": negotiate(requested),
                "capabilities": { "tools": { "listChanged": true } },
                "serverInfo": server_info(),
                "instructions": "capmesh: every tool here is a capability of the mesh, routed to a healthy provider."
            })
        }
        "server/discover" => json!({
            "supportedVersions": [classify::MODERN],
            "capabilities": { "tools": { "listChanged": true } },
            "serverInfo": server_info(),
        }),
        "ping" | "logging/setLevel" => json!({}),
        "tools/list" => tools_result(proxy),
        "resources/list" => json!({ "resources": [] }),
        "resources/templates/list" => json!({ "resourceTemplates": [] }),
        "prompts/list" => json!({ "prompts": [] }),
        "tools/call" => return None,
        other => {
            return Some(Err((
                jsonrpc::METHOD_NOT_FOUND,
                format!("method {other:?} is not served by the federated endpoint"),
            )));
        }
    };
    Some(Ok(match generation {
        Generation::Modern => modern_result(result, method),
        Generation::Legacy => result,
    }))
}

async fn federated(proxy: Arc<Proxy>, req: Request<Incoming>) -> Response<BoxBody> {
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_REQUEST).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            return rpc_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                None,
                jsonrpc::INVALID_REQUEST,
                &format!("request body over {MAX_REQUEST} bytes"),
                None,
            );
        }
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                &format!("cannot read the request: {e}"),
            );
        }
    };
    let classified = match classify::classify(&parts.headers, &body) {
        Ok(c) => c,
        Err(rejection) => return json_response(rejection.status, rejection.body),
    };
    let generation = classified.generation;

    // Legacy sessions: initialize mints one; everything else must carry a live one.
    let mut minted = None;
    if generation == Generation::Legacy {
        if classified.method.as_deref() == Some("initialize") {
            let requested = match &classified.message {
                Parsed::Single(Message::Request { params, .. }) => params
                    .as_ref()
                    .and_then(|p| p.get("protocolVersion"))
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                _ => None,
            };
            minted = Some(proxy.sessions.mint(negotiate(requested.as_deref())));
        } else {
            match classified.session_id.as_deref() {
                // Batches only in sessions negotiated at 2025-03-26, whatever the header says.
                Some(id)
                    if matches!(classified.message, Parsed::Batch(_))
                        && proxy
                            .sessions
                            .version(id)
                            .is_some_and(|v| v != classify::BATCH_VERSION) =>
                {
                    let v = proxy.sessions.version(id).unwrap_or_default();
                    return rpc_error(
                        StatusCode::BAD_REQUEST,
                        None,
                        jsonrpc::INVALID_REQUEST,
                        &format!(
                            "JSON-RPC batches are only allowed in protocol {}; this session negotiated {v}: send one message per POST",
                            classify::BATCH_VERSION
                        ),
                        None,
                    );
                }
                Some(id) if proxy.sessions.version(id).is_some() => {}
                Some(_) => {
                    return rpc_error(
                        StatusCode::NOT_FOUND,
                        classified.id.as_ref(),
                        jsonrpc::INVALID_REQUEST,
                        "unknown session: initialize again",
                        None,
                    );
                }
                None => {
                    return rpc_error(
                        StatusCode::BAD_REQUEST,
                        classified.id.as_ref(),
                        jsonrpc::INVALID_REQUEST,
                        "missing Mcp-Session-Id: send initialize first",
                        None,
                    );
                }
            }
        }
    }

    let mut resp = match &classified.message {
        Parsed::Batch(items) => batch(&proxy, &parts.headers, generation, items.clone()).await,
        Parsed::Single(Message::Request { id, method, params }) => {
            match local_answer(&proxy, generation, method, params.as_ref()) {
                Some(Ok(result)) => {
                    json_response(StatusCode::OK, jsonrpc::result_body(id, &result))
                }
                Some(Err((code, msg))) => {
                    let status = if generation == Generation::Modern {
                        StatusCode::NOT_FOUND
                    } else {
                        StatusCode::OK
                    };
                    rpc_error(status, Some(id), code, &msg, None)
                }
                None => call(&proxy, &parts.headers, &classified, &body).await,
            }
        }
        // The client's answer to a provider's request: to that provider, with its own id.
        Parsed::Single(Message::Response {
            id: Some(Id::String(sealed)),
            ..
        }) if sealed.starts_with(SERVER_REQUEST_PREFIX) => {
            answer_provider(&proxy, &parts.headers, &body, sealed).await
        }
        Parsed::Single(Message::Notification { method, params })
            if method == "notifications/cancelled" && generation == Generation::Legacy =>
        {
            cancel(
                &proxy,
                &parts.headers,
                classified.session_id.as_deref(),
                params.as_ref(),
            )
            .await
        }
        // Other notifications and responses from the client: accepted.
        Parsed::Single(_) => {
            let mut r = Response::new(boxed(Full::new(Bytes::new())));
            *r.status_mut() = StatusCode::ACCEPTED;
            r
        }
    };
    if let Some(id) = minted
        && let Ok(v) = HeaderValue::from_str(&id)
    {
        resp.headers_mut().insert("mcp-session-id", v);
    }
    resp
}

/// A 2025-03-26 batch: each request answered in turn, the answers returned as one array.
async fn batch(
    proxy: &Arc<Proxy>,
    headers: &HeaderMap,
    generation: Generation,
    items: Vec<Message>,
) -> Response<BoxBody> {
    let mut out = Vec::new();
    for item in items {
        let Message::Request { id, method, params } = item else {
            continue;
        };
        let (id, method) = (&id, method.as_str());
        let answer = match local_answer(proxy, generation, method, params.as_ref()) {
            Some(Ok(result)) => json!({ "jsonrpc": "2.0", "id": id, "result": result }),
            Some(Err((code, msg))) => {
                json!({ "jsonrpc": "2.0", "id": id, "error": { "code": code, "message": msg } })
            }
            None => {
                let single =
                    json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params });
                let body = Bytes::from(serde_json::to_vec(&single).unwrap_or_default());
                match classify::classify(headers, &body) {
                    Ok(c) => {
                        let resp = call(proxy, headers, &c, &body).await;
                        collect_response(resp, id.clone()).await
                    }
                    Err(r) => serde_json::from_slice(&r.body).unwrap_or(Value::Null),
                }
            }
        };
        out.push(answer);
    }
    if out.is_empty() {
        let mut r = Response::new(boxed(Full::new(Bytes::new())));
        *r.status_mut() = StatusCode::ACCEPTED;
        return r;
    }
    json_response(
        StatusCode::OK,
        Bytes::from(serde_json::to_vec(&out).unwrap_or_default()),
    )
}

/// Reads a whole response (JSON or SSE, at most 16 MiB) and returns the JSON-RPC response
/// with `id` in it (for batches, which answer all at once).
async fn collect_response(resp: Response<BoxBody>, id: Id) -> Value {
    const LIMIT: usize = 16 * 1024 * 1024;
    let ct = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_owned();
    let fail = |msg: String| json!({ "jsonrpc": "2.0", "id": id, "error": { "code": jsonrpc::UPSTREAM_FAILED, "message": msg } });
    let mut body = resp.into_body();
    let mut bytes = Vec::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    if bytes.len() + data.len() > LIMIT {
                        return fail(format!("response over {LIMIT} bytes"));
                    }
                    bytes.extend_from_slice(data);
                }
            }
            Err(e) => return fail(e.to_string()),
        }
    }
    crate::mcp::sse::find_response(&bytes, &ct, &id)
        .ok()
        .flatten()
        .unwrap_or(Value::Null)
}

pub(crate) fn call_timeout(proxy: &Proxy, headers: &HeaderMap) -> Duration {
    headers
        .get("x-capmesh-timeout")
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

/// Routes a `tools/call` to a provider of the capability.
async fn call(
    proxy: &Arc<Proxy>,
    headers: &HeaderMap,
    classified: &Classified,
    body: &Bytes,
) -> Response<BoxBody> {
    let id = classified.id.as_ref();
    let name = classified.name.clone().unwrap_or_default();
    let routing = proxy.routing.load_full();
    let Some(tool) = routing.tool(&name).cloned() else {
        let known: Vec<&str> = routing.tools.iter().map(|t| t.name.as_str()).collect();
        let why = match capmesh_api::Capability::new(name.as_str()) {
            Ok(cap) if routing.known(&cap) => {
                "it exists in the mesh, but this agent does not depend on it or may not call it"
            }
            _ => "no agent in the mesh provides it",
        };
        return rpc_error(
            StatusCode::OK,
            id,
            jsonrpc::INVALID_PARAMS,
            &format!(
                "unknown capability {name:?}: {why}; this agent can call: {}",
                known.join(", ")
            ),
            Some(json!({ "capability": name, "known": known })),
        );
    };
    let cap = tool.capability.clone();
    let label = [cap.as_str()];
    proxy.metrics.requests.with_label_values(&label).inc();
    let all = routing.endpoints(&cap);
    // A retry carrying the mesh's requestState goes to the instance that minted it.
    let pinned = match request_state_route(proxy, classified) {
        None => None,
        Some(Some(route)) if route.capability == cap.as_str() => Some(route),
        Some(_) => {
            return rpc_error(
                StatusCode::OK,
                id,
                jsonrpc::INVALID_PARAMS,
                &format!(
                    "requestState was not issued by this mesh for capability {cap:?}: call again without it"
                ),
                None,
            );
        }
    };
    let ranks = balance::rank(
        all.iter().filter(|e| {
            pinned
                .as_ref()
                .is_none_or(|r| e.id == r.endpoint && e.instance == r.instance)
        }),
        &tool.selector,
    );
    if let Some(route) = &pinned
        && ranks.iter().all(Vec::is_empty)
    {
        return rpc_error(
            StatusCode::OK,
            id,
            jsonrpc::INVALID_PARAMS,
            &format!(
                "the provider instance {} that issued this requestState is gone: call again without requestState",
                route.instance
            ),
            None,
        );
    }
    let restored_state = pinned.map(|r| r.upstream_id);
    if ranks.iter().all(Vec::is_empty) {
        proxy
            .metrics
            .responses
            .with_label_values(&[cap.as_str(), "503", "no_endpoint"])
            .inc();
        return rpc_error(
            StatusCode::SERVICE_UNAVAILABLE,
            id,
            jsonrpc::NO_ENDPOINT,
            &format!(
                "capability {cap:?} has no healthy endpoint matching {:?} ({} registered)",
                tool.selector.to_string(),
                all.len()
            ),
            None,
        );
    }
    proxy.retry_budget.deposit();
    // The provider's agent serves every consumer in one session: the call gets an id of its
    // own there, mapped back in the response.
    let upstream_id = json!(format!("cm-{}", crate::random_hex(12)));
    let timeout = call_timeout(proxy, headers);
    let started = Instant::now();
    let mut tried: Vec<EndpointId> = Vec::new();
    let mut last_error = String::new();
    for attempt in 0..MAX_ATTEMPTS {
        let Some(ep) = balance::pick(
            &ranks,
            &|id: &EndpointId| routing.stats(id),
            &tried,
            Instant::now(),
        ) else {
            break;
        };
        let ep = ep.clone();
        if attempt > 0 {
            if !proxy.retry_budget.try_withdraw() {
                last_error = format!("{last_error} (retry budget exhausted)");
                break;
            }
            proxy.metrics.retries.with_label_values(&label).inc();
        }
        tried.push(ep.id.clone());
        let request = match upstream_request(
            proxy,
            headers,
            classified,
            body,
            &ep,
            &upstream_id,
            restored_state.as_ref(),
        ) {
            Ok(r) => r,
            Err(e) => {
                return rpc_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    id,
                    jsonrpc::INTERNAL_ERROR,
                    &e,
                    None,
                );
            }
        };
        let stats = routing.stats(&ep.id);
        let _in_flight = stats.as_ref().map(|s| s.start());
        let t0 = Instant::now();
        let left = timeout.saturating_sub(started.elapsed());
        let result =
            tokio::time::timeout(left, proxy.peers.send(&ep.address, &ep.identity, request)).await;
        let rtt = t0.elapsed();
        let observe = |outcome: Outcome| {
            if let Some(s) = &stats {
                let ejected = s.observe(outcome, rtt);
                if ejected {
                    proxy.metrics.ejections.with_label_values(&label).inc();
                    tracing::info!(capability = %cap, endpoint = %ep.id, "endpoint ejected after consecutive failures");
                }
            }
        };
        match result {
            Err(_) => {
                observe(Outcome::ServerError);
                proxy
                    .metrics
                    .responses
                    .with_label_values(&[cap.as_str(), "504", "timeout"])
                    .inc();
                return rpc_error(
                    StatusCode::GATEWAY_TIMEOUT,
                    id,
                    jsonrpc::UPSTREAM_FAILED,
                    &format!(
                        "capability {cap:?}: no response from {} within {timeout:?} (x-capmesh-timeout)",
                        ep.identity
                    ),
                    None,
                );
            }
            Ok(Err(e)) => {
                observe(Outcome::Unavailable);
                tracing::debug!(capability = %cap, endpoint = %ep.id, error = %e, "endpoint unavailable; trying another");
                last_error = e.to_string();
                continue;
            }
            Ok(Ok(resp)) => {
                let status = resp.status();
                if status == StatusCode::SERVICE_UNAVAILABLE {
                    observe(Outcome::Unavailable);
                    last_error = format!("{} answered 503", ep.identity);
                    continue;
                }
                observe(match status.as_u16() {
                    429 => Outcome::Overloaded,
                    500..=599 => Outcome::ServerError,
                    _ => Outcome::Success,
                });
                if attempt > 0 {
                    proxy.metrics.failovers.with_label_values(&label).inc();
                }
                proxy.metrics.answered(cap.as_str(), status, rtt);
                return relay(proxy, resp, &ep, cap.as_str(), classified, &upstream_id).await;
            }
        }
    }
    proxy
        .metrics
        .responses
        .with_label_values(&[cap.as_str(), "503", "upstream_failed"])
        .inc();
    rpc_error(
        StatusCode::SERVICE_UNAVAILABLE,
        id,
        jsonrpc::UPSTREAM_FAILED,
        &format!(
            "capability {cap:?}: every attempt failed ({} tried): {last_error}",
            tried.len()
        ),
        None,
    )
}

/// A JSON POST to `path` on the peer proxy at `address`: content type, `accept` (the client's,
/// or both MCP answers) and the client's `MCP-Protocol-Version`.
fn mesh_post(
    address: &str,
    path: &str,
    client: &HeaderMap,
    accept: Option<&HeaderValue>,
) -> Result<http::request::Builder, String> {
    let uri: http::Uri = format!("https://{address}{path}")
        .parse()
        .map_err(|e| format!("endpoint address {address:?}: {e}"))?;
    let mut req = Request::builder().method(Method::POST).uri(uri);
    let out = req.headers_mut().ok_or("request builder failed")?;
    out.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    out.insert(
        header::ACCEPT,
        accept.cloned().unwrap_or(HeaderValue::from_static(
            "application/json, text/event-stream",
        )),
    );
    if let Some(v) = client.get("mcp-protocol-version") {
        out.insert("mcp-protocol-version", v.clone());
    }
    Ok(req)
}

fn upstream_request(
    proxy: &Proxy,
    headers: &HeaderMap,
    classified: &Classified,
    body: &Bytes,
    ep: &Endpoint,
    upstream_id: &Value,
    request_state: Option<&Value>,
) -> Result<Request<BoxBody>, String> {
    let (address, function) = (&ep.address, &ep.function);
    let mut renamed = classify::rename_tool_call_with_id(body, function, upstream_id)
        .map_err(|e| e.to_string())?;
    // Only a retry carrying a restored requestState needs the JSON tree.
    if let Some(state) = request_state {
        let mut message: Value = serde_json::from_slice(&renamed).map_err(|e| e.to_string())?;
        if let Some(params) = message.get_mut("params").and_then(Value::as_object_mut) {
            params.insert("requestState".to_owned(), state.clone());
        }
        renamed = Bytes::from(serde_json::to_vec(&message).map_err(|e| e.to_string())?);
    }
    let mut req = mesh_post(address, CALL_PATH, headers, headers.get(header::ACCEPT))?;
    let out = req.headers_mut().ok_or("request builder failed")?;
    if classified.generation == Generation::Modern {
        classify::set_routing_headers(out, "tools/call", Some(function));
    }
    proxy.propagation.load().copy(headers, out);
    crate::headers::continue_trace(headers, out);
    req.body(boxed(Full::new(renamed)))
        .map_err(|e| e.to_string())
}

/// Streams a provider's response back: status, content type and body, each SSE event passed
/// on as it arrives. The call's id goes back to the client's; requests the provider sends the
/// client on the stream get sealed ids naming the provider (so that two providers' ids cannot
/// collide and the client's answer finds its way back); a 2025 session's streaming call is
/// recorded for `notifications/cancelled` until its stream ends.
async fn relay(
    proxy: &Arc<Proxy>,
    resp: Response<Incoming>,
    ep: &Endpoint,
    capability: &str,
    classified: &Classified,
    upstream_id: &Value,
) -> Response<BoxBody> {
    let (parts, body) = resp.into_parts();
    let client_id = classified.id.as_ref().map_or(Value::Null, Id::to_value);
    let upstream_session = parts
        .headers
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let sse = parts
        .headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let route = Route {
        endpoint: ep.id.clone(),
        instance: ep.instance.clone(),
        capability: capability.to_owned(),
        upstream_session,
        upstream_id: upstream_id.clone(),
    };
    let body = if sse {
        let guard = match (&classified.session_id, &classified.id) {
            (Some(session), Some(id)) if classified.generation == Generation::Legacy => {
                Some(proxy.sessions.track(session, id, route.clone()))
            }
            _ => None,
        };
        let sealer = mesh_sealer(proxy);
        let up = upstream_id.clone();
        let map: EventFn = Box::new(move |mut event: Event| {
            let _streaming = &guard;
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
                    .and_then(|s| s.seal_json(SERVER_REQUEST_CONTEXT, &asked.to_json()))
                {
                    v["id"] = json!(format!("{SERVER_REQUEST_PREFIX}{sealed}"));
                    event.data = v.to_string();
                }
            } else if v.get("id") == Some(&up) {
                v["id"] = client_id.clone();
                seal_request_state(&mut v, sealer.as_ref(), &route);
                event.data = v.to_string();
            }
            event
        });
        boxed(MapEvents::new(body, map))
    } else {
        // One JSON response: read it (bounded) to give it the client's id.
        const LIMIT: usize = 16 * 1024 * 1024;
        match Limited::new(body, LIMIT).collect().await {
            Ok(collected) => {
                let bytes = collected.to_bytes();
                let bytes = match serde_json::from_slice::<Value>(&bytes) {
                    Ok(mut v) if v.get("id") == Some(upstream_id) => {
                        v["id"] = client_id;
                        seal_request_state(&mut v, mesh_sealer(proxy).as_ref(), &route);
                        Bytes::from(serde_json::to_vec(&v).unwrap_or_else(|_| bytes.to_vec()))
                    }
                    _ => bytes,
                };
                boxed(Full::new(bytes))
            }
            Err(e) => {
                return rpc_error(
                    StatusCode::BAD_GATEWAY,
                    classified.id.as_ref(),
                    jsonrpc::UPSTREAM_FAILED,
                    &format!("{}: reading the response failed: {e}", ep.identity),
                    None,
                );
            }
        }
    };
    let mut out = Response::new(body);
    *out.status_mut() = parts.status;
    for name in [header::CONTENT_TYPE, header::CACHE_CONTROL] {
        if let Some(v) = parts.headers.get(&name) {
            out.headers_mut().insert(name, v.clone());
        }
    }
    if let Some(v) = parts.headers.get("x-accel-buffering") {
        out.headers_mut().insert("x-accel-buffering", v.clone());
    }
    if let Ok(v) = HeaderValue::from_str(&format!("{}#{}", ep.identity, ep.instance)) {
        out.headers_mut().insert("x-capmesh-served-by", v);
    }
    out
}

fn mesh_sealer(proxy: &Proxy) -> Option<Sealer> {
    proxy
        .routing
        .load()
        .snapshot
        .as_ref()
        .and_then(|s| Sealer::from_hex(&s.settings.session_key))
}

/// The client's answer to a request a provider sent it (sealed id): to that provider instance,
/// in the session its proxy holds with the agent, with the agent's own id.
async fn answer_provider(
    proxy: &Arc<Proxy>,
    headers: &HeaderMap,
    body: &Bytes,
    sealed: &str,
) -> Response<BoxBody> {
    let route = sealed
        .strip_prefix(SERVER_REQUEST_PREFIX)
        .and_then(|s| mesh_sealer(proxy)?.open_json(SERVER_REQUEST_CONTEXT, s))
        .and_then(Route::from_json);
    let Some(route) = route else {
        return rpc_error(
            StatusCode::BAD_REQUEST,
            None,
            jsonrpc::INVALID_REQUEST,
            "this response answers no request the mesh relayed (unknown or altered id)",
            None,
        );
    };
    let Ok(mut message) = serde_json::from_slice::<Value>(body) else {
        return rpc_error(
            StatusCode::BAD_REQUEST,
            None,
            jsonrpc::PARSE_ERROR,
            "not JSON",
            None,
        );
    };
    message["id"] = route.upstream_id.clone();
    to_provider(proxy, headers, &route, &message).await
}

/// A 2025 client's `notifications/cancelled` for a call still streaming: to the provider
/// running it, naming the call by the id the provider knows. Unknown or finished calls: 202, as
/// a cancellation may arrive after the response.
async fn cancel(
    proxy: &Arc<Proxy>,
    headers: &HeaderMap,
    session: Option<&str>,
    params: Option<&Value>,
) -> Response<BoxBody> {
    let route = session.zip(
        params
            .and_then(|p| p.get("requestId"))
            .and_then(Id::from_value),
    );
    let Some(route) = route.and_then(|(s, id)| proxy.sessions.call_route(s, &id)) else {
        return accepted();
    };
    let mut params = params.cloned().unwrap_or_else(|| json!({}));
    params["requestId"] = route.upstream_id.clone();
    let message =
        json!({ "jsonrpc": "2.0", "method": "notifications/cancelled", "params": params });
    to_provider(proxy, headers, &route, &message).await
}

fn accepted() -> Response<BoxBody> {
    let mut r = Response::new(boxed(Full::new(Bytes::new())));
    *r.status_mut() = StatusCode::ACCEPTED;
    r
}

/// Sends one message into the session the provider's proxy holds with its agent (over the
/// passthrough path, which checks the caller's policy) and returns the agent's status.
async fn to_provider(
    proxy: &Arc<Proxy>,
    headers: &HeaderMap,
    route: &Route,
    message: &Value,
) -> Response<BoxBody> {
    let routing = proxy.routing.load_full();
    let ep = capmesh_api::Capability::new(route.capability.as_str())
        .ok()
        .and_then(|cap| {
            routing
                .endpoints(&cap)
                .iter()
                .find(|e| e.id == route.endpoint && e.instance == route.instance)
                .cloned()
        });
    let Some(ep) = ep else {
        return rpc_error(
            StatusCode::NOT_FOUND,
            None,
            jsonrpc::UPSTREAM_FAILED,
            &format!(
                "the provider instance {} of capability {:?} is gone; its request cannot be answered",
                route.instance, route.capability
            ),
            None,
        );
    };
    let request = (|| -> Result<Request<BoxBody>, String> {
        let mut req = mesh_post(&ep.address, crate::passthrough::PATH, headers, None)?;
        let out = req.headers_mut().ok_or("request builder failed")?;
        if let Some(s) = &route.upstream_session {
            out.insert(
                "mcp-session-id",
                HeaderValue::from_str(s).map_err(|e| e.to_string())?,
            );
        }
        out.insert(
            crate::passthrough::CAPABILITY_HEADER,
            HeaderValue::from_str(&route.capability).map_err(|e| e.to_string())?,
        );
        crate::headers::continue_trace(headers, out);
        let body = serde_json::to_vec(message).map_err(|e| e.to_string())?;
        req.body(boxed(Full::new(Bytes::from(body))))
            .map_err(|e| e.to_string())
    })();
    let request = match request {
        Ok(r) => r,
        Err(e) => {
            return rpc_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                None,
                jsonrpc::INTERNAL_ERROR,
                &e,
                None,
            );
        }
    };
    let timeout = call_timeout(proxy, headers);
    match tokio::time::timeout(
        timeout,
        proxy.peers.send(&ep.address, &ep.identity, request),
    )
    .await
    {
        Ok(Ok(resp)) => {
            let (parts, body) = resp.into_parts();
            let mut out = Response::new(boxed(body));
            *out.status_mut() = parts.status;
            if let Some(v) = parts.headers.get(header::CONTENT_TYPE) {
                out.headers_mut().insert(header::CONTENT_TYPE, v.clone());
            }
            out
        }
        Ok(Err(e)) => rpc_error(
            StatusCode::BAD_GATEWAY,
            None,
            jsonrpc::UPSTREAM_FAILED,
            &format!("{}: {e}", ep.identity),
            None,
        ),
        Err(_) => rpc_error(
            StatusCode::GATEWAY_TIMEOUT,
            None,
            jsonrpc::UPSTREAM_FAILED,
            &format!("{}: no answer within {timeout:?}", ep.identity),
            None,
        ),
    }
}

/// The registration's function → capability map (for inbound authorization).
pub fn function_map(tools: &[ToolSpec]) -> HashMap<String, capmesh_api::Capability> {
    tools
        .iter()
        .map(|t| (t.function.clone(), t.capability.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn this_machine_is_localhost_or_loopback_with_any_port() {
        for h in [
            "localhost",
            "LOCALHOST:15001",
            "127.0.0.1",
            "127.0.0.1:15001",
            "127.9.9.9:80",
            "[::1]",
            "[::1]:15001",
        ] {
            assert!(local_host(h, false), "{h}");
        }
        for h in [
            "evil.example.com",
            "evil.example.com:15001",
            "localhost.evil.com",
            "10.0.0.5:15001",
            "[fe80::1]:1",
            "",
        ] {
            assert!(!local_host(h, false), "{h}");
        }
        assert!(local_host("10.0.0.5:15001", true));
        assert!(!local_host("weather.default.svc:15001", true));
    }

    #[test]
    fn foreign_origins_and_passthrough_hosts_are_refused() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.insert(*k, HeaderValue::from_static(v));
            }
            m
        };
        let evil = h(&[
            ("host", "evil.example.com:15001"),
            ("origin", "http://evil.example.com:15001"),
        ]);
        assert!(rebinding_refusal(&evil, true).is_some());
        assert!(rebinding_refusal(&evil, false).is_some());
        let host_only = h(&[("host", "evil.example.com:15001")]);
        assert!(rebinding_refusal(&host_only, true).is_some());
        assert!(
            rebinding_refusal(&host_only, false).is_none(),
            "/mcp checks Origin only"
        );
        let local = h(&[
            ("host", "127.0.0.1:15001"),
            ("origin", "http://localhost:15001"),
        ]);
        assert!(rebinding_refusal(&local, true).is_none());
        assert!(rebinding_refusal(&h(&[("origin", "null")]), false).is_some());
        assert!(rebinding_refusal(&HeaderMap::new(), true).is_none());
    }
}

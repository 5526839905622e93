//! Inbound: the local agent as a mesh member, behind mutual TLS.
//!
//! accept → TLS per the mode (peer's SPIFFE ID verified against the snapshot's trust bundle and
//! revocations; re-verified on every request after the trust changes) → strip client-supplied
//! `x-capmesh-*` and set `x-capmesh-caller` → authorize `tools/call` by capability → rewrite
//! `Host` → forward to the agent → stream the response back.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use capmesh_certs::{AcceptError, Accepted, MeshAcceptor, Refusal};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use rustls::pki_types::CertificateDer;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::agent::{Agent, AgentSession};
use crate::headers::{continue_trace, is_hop_by_hop};
use crate::mcp::jsonrpc::{self, Message, Parsed};
use crate::outbound::{CALL_PATH, MAX_REQUEST};
use crate::{BoxBody, Proxy, boxed};

/// Who is on the other end of an inbound connection.
#[derive(Debug)]
struct Peer {
    /// The verified SPIFFE ID, or `None` for a permitted plaintext client.
    identity: Option<String>,
    chain: Vec<CertificateDer<'static>>,
    trust_generation: AtomicU64,
}

impl Peer {
    /// Re-checks the peer's chain when the trust bundle changed since the last check, so a
    /// revocation ends long-lived connections too.
    fn still_trusted(&self, proxy: &Proxy) -> Result<(), Refusal> {
        let current = proxy.identity.trust.generation();
        if self.identity.is_none() || self.trust_generation.load(Ordering::Acquire) == current {
            return Ok(());
        }
        proxy
            .identity
            .trust
            .verify_client_chain(&self.chain)
            .map(|_| self.trust_generation.store(current, Ordering::Release))
    }
}

fn rpc_error(
    status: StatusCode,
    id: Option<&jsonrpc::Id>,
    code: i64,
    msg: &str,
) -> Response<BoxBody> {
    let mut r = Response::new(boxed(Full::new(jsonrpc::error_body(id, code, msg, None))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// Serves the inbound listener until `stop`; then stops accepting and lets in-flight calls
/// finish (bounded by `drain`).
pub async fn serve(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    acceptor: MeshAcceptor,
    mut stop: watch::Receiver<bool>,
    drain: Duration,
) {
    let graceful = GracefulShutdown::new();
    loop {
        let tcp = tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::warn!(error = %e, "inbound accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let (proxy, acceptor, watcher) = (proxy.clone(), acceptor.clone(), graceful.watcher());
        tokio::spawn(async move {
            let (io, peer) = match acceptor.accept(tcp).await {
                Ok(Accepted::Tls { stream, peer }) => {
                    proxy
                        .metrics
                        .tls_handshakes
                        .with_label_values(&["mtls"])
                        .inc();
                    let chain = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .map(|c| c.to_vec())
                        .unwrap_or_default();
                    let peer = Peer {
                        identity: peer.map(|p| p.to_string()),
                        chain,
                        trust_generation: AtomicU64::new(proxy.identity.trust.generation()),
                    };
                    (Io::Tls(stream), peer)
                }
                Ok(Accepted::Plain(tcp)) => {
                    proxy
                        .metrics
                        .tls_handshakes
                        .with_label_values(&["plaintext"])
                        .inc();
                    (
                        Io::Plain(tcp),
                        Peer {
                            identity: None,
                            chain: vec![],
                            trust_generation: AtomicU64::new(0),
                        },
                    )
                }
                Err(AcceptError::Refused(r)) => {
                    proxy
                        .metrics
                        .tls_refusals
                        .with_label_values(&[r.reason()])
                        .inc();
                    tracing::info!(reason = %r, "inbound connection refused");
                    return;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "inbound handshake failed");
                    return;
                }
            };
            let peer = Arc::new(peer);
            let (trust, guard, metrics) = (
                proxy.identity.trust.clone(),
                peer.clone(),
                proxy.metrics.clone(),
            );
            let svc = service_fn(move |req| {
                let (proxy, peer) = (proxy.clone(), peer.clone());
                async move { Ok::<_, std::convert::Infallible>(handle(proxy, peer, req).await) }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http2()
                .timer(TokioTimer::new())
                .keep_alive_interval(Some(Duration::from_secs(10)));
            let serve = async move {
                match io {
                    Io::Tls(s) => {
                        watcher
                            .watch(builder.serve_connection(TokioIo::new(s), svc).into_owned())
                            .await
                    }
                    Io::Plain(s) => {
                        watcher
                            .watch(builder.serve_connection(TokioIo::new(s), svc).into_owned())
                            .await
                    }
                }
            };
            // A revoked or expired peer's open connection is closed, not only its next request.
            let role = capmesh_certs::PeerRole::Client;
            let Some(result) =
                crate::identity::while_trusted(&trust, &guard.chain, role, serve).await
            else {
                metrics
                    .tls_refusals
                    .with_label_values(&["connection_closed"])
                    .inc();
                return;
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "inbound connection ended with an error");
            }
        });
    }
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(?drain, "in-flight inbound calls did not finish in time");
    }
}

enum Io {
    Tls(Box<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>),
    Plain(tokio::net::TcpStream),
}

async fn handle(proxy: Arc<Proxy>, peer: Arc<Peer>, req: Request<Incoming>) -> Response<BoxBody> {
    if let Err(refusal) = peer.still_trusted(&proxy) {
        proxy
            .metrics
            .tls_refusals
            .with_label_values(&[refusal.reason()])
            .inc();
        return rpc_error(
            StatusCode::FORBIDDEN,
            None,
            jsonrpc::FORBIDDEN,
            &format!("your certificate is no longer trusted by this mesh: {refusal}"),
        );
    }
    let Some(agent) = proxy.agent.clone() else {
        return rpc_error(
            StatusCode::NOT_FOUND,
            None,
            jsonrpc::METHOD_NOT_FOUND,
            "this agent serves no inbound calls (--agent-url none)",
        );
    };
    let caller = peer.identity.clone();
    if req.uri().path() == CALL_PATH && req.method() == Method::POST {
        if caller.is_none() {
            return rpc_error(
                StatusCode::FORBIDDEN,
                None,
                jsonrpc::FORBIDDEN,
                "mesh calls need a mesh certificate",
            );
        }
        return federated_call(&proxy, &agent, caller.as_deref(), req).await;
    }
    if req.uri().path() == crate::passthrough::PATH {
        if caller.is_none() {
            return rpc_error(
                StatusCode::FORBIDDEN,
                None,
                jsonrpc::FORBIDDEN,
                "mesh calls need a mesh certificate",
            );
        }
        return mesh_passthrough(&proxy, &agent, caller.as_deref(), req).await;
    }
    passthrough(&proxy, &agent, caller.as_deref(), req).await
}

/// A passthrough request from a peer proxy: a whole MCP conversation with the agent, for a
/// capability it provides and the caller may use. The client owns its session
/// (`Mcp-Session-Id` is its own, not the pooled one); both directions stream.
async fn mesh_passthrough(
    proxy: &Proxy,
    agent: &Agent,
    caller: Option<&str>,
    req: Request<Incoming>,
) -> Response<BoxBody> {
    if !matches!(*req.method(), Method::POST | Method::GET | Method::DELETE) {
        return rpc_error(
            StatusCode::METHOD_NOT_ALLOWED,
            None,
            jsonrpc::INVALID_REQUEST,
            "passthrough takes POST, GET or DELETE",
        );
    }
    let capability = req
        .headers()
        .get(crate::passthrough::CAPABILITY_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let provided = proxy
        .functions
        .load()
        .values()
        .any(|c| c.as_str() == capability);
    if !provided {
        return rpc_error(
            StatusCode::NOT_FOUND,
            None,
            jsonrpc::INVALID_PARAMS,
            &format!("this agent does not provide capability {capability:?}"),
        );
    }
    if let Some(denied) = authorize(proxy, caller, &capability, None) {
        return denied;
    }
    let (parts, body) = req.into_parts();
    forward(agent, parts, agent.url().clone(), caller, boxed(body)).await
}

/// Checks the snapshot's policy for `caller` calling `capability`, counting the outcome.
/// Returns the denial to send (403 with JSON-RPC error -32003 naming both), if denied.
fn authorize(
    proxy: &Proxy,
    caller: Option<&str>,
    capability: &str,
    id: Option<&jsonrpc::Id>,
) -> Option<Response<BoxBody>> {
    let allowed = proxy
        .routing
        .load()
        .snapshot
        .as_ref()
        .is_none_or(|s| s.policy.allows(caller, capability));
    let outcome = if allowed { "allowed" } else { "denied" };
    proxy
        .metrics
        .inbound
        .with_label_values(&[capability, outcome])
        .inc();
    if allowed {
        return None;
    }
    tracing::info!(caller = ?caller, capability = %capability, "call denied by policy");
    Some(rpc_error(
        StatusCode::FORBIDDEN,
        id,
        jsonrpc::FORBIDDEN,
        &format!(
            "{} may not call capability {capability:?} (authorization policy)",
            caller.unwrap_or(capmesh_api::UNAUTHENTICATED)
        ),
    ))
}

/// The headers the agent receives: the caller's minus hop-by-hop and capmesh's own, plus the
/// verified caller, the agent's own `Host`, and the trace continued.
fn agent_headers(from: &HeaderMap, caller: Option<&str>, agent: &Agent) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(from.len() + 3);
    for (name, value) in from {
        let n = name.as_str();
        // `origin` belongs to the caller's side of the mesh; agents that check it would refuse.
        if is_hop_by_hop(n)
            || n.starts_with("x-capmesh-")
            || matches!(n, "traceparent" | "tracestate" | "origin")
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out.insert(header::HOST, agent.authority().clone());
    let caller = caller.unwrap_or(capmesh_api::UNAUTHENTICATED);
    if let Ok(v) = HeaderValue::from_str(caller) {
        out.insert("x-capmesh-caller", v);
    }
    continue_trace(from, &mut out);
    out
}

async fn federated_call(
    proxy: &Proxy,
    agent: &Agent,
    caller: Option<&str>,
    req: Request<Incoming>,
) -> Response<BoxBody> {
    let (parts, body) = req.into_parts();
    let body = match collect_request(body).await {
        Ok(b) => b,
        Err(too_large) => return too_large,
    };
    let (id, function) = match jsonrpc::parse(&body) {
        Ok(Parsed::Single(Message::Request { id, method, params })) if method == "tools/call" => {
            let name = params
                .as_ref()
                .and_then(|p| p.get("name"))
                .and_then(|n| n.as_str())
                .map(str::to_owned);
            (id, name.unwrap_or_default())
        }
        _ => {
            return rpc_error(
                StatusCode::BAD_REQUEST,
                None,
                jsonrpc::INVALID_REQUEST,
                "a mesh call carries one tools/call request",
            );
        }
    };
    let capability = proxy.functions.load().get(&function).cloned();
    let Some(capability) = capability else {
        return rpc_error(
            StatusCode::NOT_FOUND,
            Some(&id),
            jsonrpc::INVALID_PARAMS,
            &format!("this agent has no tool {function:?} (its registration changed?)"),
        );
    };
    if let Some(denied) = authorize(proxy, caller, capability.as_str(), Some(&id)) {
        return denied;
    }
    let headers = agent_headers(&parts.headers, caller, agent);
    let modern = parts
        .headers
        .get("mcp-protocol-version")
        .and_then(|v| v.to_str().ok())
        == Some(crate::agent::MODERN_VERSION);
    for attempt in 0..2 {
        let session = if modern {
            None
        } else {
            match agent.session().await {
                Ok(s) => Some(s),
                Err(e) => {
                    return rpc_error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        Some(&id),
                        jsonrpc::UPSTREAM_FAILED,
                        &format!("the agent is not answering: {e:#}"),
                    );
                }
            }
        };
        let mut h = headers.clone();
        h.remove("mcp-session-id");
        if let Some(s) = &session {
            set_session(&mut h, s);
        }
        let mut out = Request::builder()
            .method(Method::POST)
            .uri(agent.url().clone());
        if let Some(hm) = out.headers_mut() {
            *hm = h;
        }
        let Ok(out) = out.body(boxed(Full::new(body.clone()))) else {
            return rpc_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                Some(&id),
                jsonrpc::INTERNAL_ERROR,
                "cannot build the request",
            );
        };
        match agent.send(out).await {
            Ok(resp)
                if resp.status() == StatusCode::NOT_FOUND
                    && attempt == 0
                    && session.as_ref().is_some_and(|s| s.id.is_some()) =>
            {
                // The agent restarted or expired our session: open a new one and try again
                // (a 404 means it did not run the call).
                if let Some(s) = &session {
                    agent.forget_session(s).await;
                }
                continue;
            }
            Ok(resp) => return stream_back(resp),
            Err(e) => {
                return rpc_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Some(&id),
                    jsonrpc::UPSTREAM_FAILED,
                    &format!("the agent is not answering: {e}"),
                );
            }
        }
    }
    rpc_error(
        StatusCode::SERVICE_UNAVAILABLE,
        Some(&id),
        jsonrpc::UPSTREAM_FAILED,
        "the agent keeps refusing its session",
    )
}

fn set_session(h: &mut HeaderMap, s: &AgentSession) {
    if let Ok(v) = HeaderValue::from_str(&s.version) {
        h.insert("mcp-protocol-version", v);
    }
    if let Some(id) = &s.id
        && let Ok(v) = HeaderValue::from_str(id)
    {
        h.insert("mcp-session-id", v);
    }
}

/// Anything else on the inbound listener (transparent mode: the caller's own request, path and
/// all) goes to the agent unchanged (bar headers) — if the policy lets the caller use at least
/// one of the agent's capabilities, and, for `tools/call`, the capability of the tool called.
async fn passthrough(
    proxy: &Proxy,
    agent: &Agent,
    caller: Option<&str>,
    req: Request<Incoming>,
) -> Response<BoxBody> {
    let functions = proxy.functions.load_full();
    if functions.is_empty() {
        return rpc_error(
            StatusCode::SERVICE_UNAVAILABLE,
            None,
            jsonrpc::NO_ENDPOINT,
            "this agent has not registered its tools with the mesh yet; retry shortly",
        );
    }
    let policy_allows = |capability: &str| {
        proxy
            .routing
            .load()
            .snapshot
            .as_ref()
            .is_none_or(|s| s.policy.allows(caller, capability))
    };
    if !functions.values().any(|c| policy_allows(c.as_str())) {
        proxy
            .metrics
            .inbound
            .with_label_values(&["*", "denied"])
            .inc();
        return rpc_error(
            StatusCode::FORBIDDEN,
            None,
            jsonrpc::FORBIDDEN,
            &format!(
                "{} may not call any capability of this agent (authorization policy)",
                caller.unwrap_or(capmesh_api::UNAUTHENTICATED)
            ),
        );
    }
    let (parts, body) = req.into_parts();
    // A POST may carry tools/call: check the capability of each tool it calls.
    let body = if parts.method == Method::POST {
        let bytes = match collect_request(body).await {
            Ok(b) => b,
            Err(too_large) => return too_large,
        };
        if let Ok(parsed) = jsonrpc::parse(&bytes) {
            for message in parsed.messages() {
                if let Message::Request { id, method, params } = message
                    && method == "tools/call"
                    && let Some(name) = params
                        .as_ref()
                        .and_then(|p| p.get("name"))
                        .and_then(|n| n.as_str())
                    && let Some(capability) = functions.get(name)
                    && let Some(denied) = authorize(proxy, caller, capability.as_str(), Some(id))
                {
                    return denied;
                }
            }
        }
        boxed(Full::new(bytes))
    } else {
        boxed(body)
    };
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let Ok(uri) = agent.uri_for(path) else {
        return rpc_error(
            StatusCode::BAD_REQUEST,
            None,
            jsonrpc::INVALID_REQUEST,
            "bad path",
        );
    };
    forward(agent, parts, uri, caller, body).await
}

/// Reads a request body of at most [`MAX_REQUEST`] bytes; a larger one gets 413.
async fn collect_request(body: Incoming) -> Result<bytes::Bytes, Response<BoxBody>> {
    match Limited::new(body, MAX_REQUEST).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(_) => Err(rpc_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            None,
            jsonrpc::INVALID_REQUEST,
            "request body too large",
        )),
    }
}

/// Sends a request to the agent at `uri` with the agent's view of the headers, and streams the
/// answer back.
async fn forward(
    agent: &Agent,
    parts: http::request::Parts,
    uri: http::Uri,
    caller: Option<&str>,
    body: BoxBody,
) -> Response<BoxBody> {
    let mut out = Request::builder().method(parts.method.clone()).uri(uri);
    if let Some(h) = out.headers_mut() {
        *h = agent_headers(&parts.headers, caller, agent);
    }
    let Ok(out) = out.body(body) else {
        return rpc_error(
            StatusCode::BAD_REQUEST,
            None,
            jsonrpc::INVALID_REQUEST,
            "bad request",
        );
    };
    match agent.send(out).await {
        Ok(resp) => stream_back(resp),
        Err(e) => rpc_error(
            StatusCode::BAD_GATEWAY,
            None,
            jsonrpc::UPSTREAM_FAILED,
            &format!("the agent is not answering: {e}"),
        ),
    }
}

/// Streams the agent's response back, minus connection-level headers.
fn stream_back(resp: Response<Incoming>) -> Response<BoxBody> {
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
    Response::from_parts(parts, boxed(body))
}

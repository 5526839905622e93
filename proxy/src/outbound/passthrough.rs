//! Passthrough: `http://127.0.0.1:15001/capabilities/<capability>/mcp`.
//!
//! The whole MCP conversation (resources, prompts, everything) goes unchanged to one provider
//! instance of the capability, over mutual TLS to its proxy's `/.capmesh/passthrough`, and the
//! response streams back unbuffered. Nothing is renamed.
//!
//! Session affinity without shared state: when the provider answers with an `Mcp-Session-Id`,
//! the client gets a *sealed* id instead ([`Pinned`]: endpoint, instance, the provider proxy's
//! session id), bound to the capability. Any proxy of the mesh can open it; a request carrying
//! it goes to that instance with the provider's id restored. An id that does not open, or
//! whose instance is gone or unreachable, is answered 404 at once so the client initializes
//! again and lands on a live instance. 2026-07-28 requests carry no session and are routed
//! one by one; a retry carrying a `requestState` the mesh sealed goes back to the instance
//! that minted it.

use std::sync::Arc;

use bytes::Bytes;
use capmesh_api::{Capability, Endpoint, Selector};
use http::{HeaderValue, Method, Request, Response, header};
use http_body_util::Full;
use serde_json::Value;

use super::tool_call::{call_timeout, seal_request_state, sealer};
use crate::balance::rank;
use crate::contract::{MAX_RESPONSE, MESH_HEADER_PREFIX, SERVED_BY_HEADER};
use crate::error::ProxyError;
use crate::forward::{Attempts, Call, CallSpec, Target, Upstream};
use crate::headers::is_hop_by_hop;
use crate::mcp::classify;
use crate::mcp::inspect::inspect;
use crate::mcp::relay::{EventFn, MapEvents};
use crate::mcp::sse::Event;
use crate::pool::PeerBody;
use crate::seal::{self, Pinned, Route, Sealer};
use crate::stack::{Handled, Middleware, Next, call, read_body};
use crate::{BoxBody, Proxy, boxed};

/// The capability in `/capabilities/<capability>/mcp`, or `None` for any other path.
pub fn capability_in_path(path: &str) -> Option<&str> {
    let cap = path.strip_prefix("/capabilities/")?.strip_suffix("/mcp")?;
    (!cap.is_empty() && !cap.contains('/')).then_some(cap)
}

/// Methods safe to send again to another instance when an attempt may have reached one: they
/// read, they change nothing.
pub fn is_safe_method(method: &str) -> bool {
    matches!(
        method,
        "initialize"
            | "ping"
            | "server/discover"
            | "tools/list"
            | "resources/list"
            | "resources/templates/list"
            | "resources/read"
            | "prompts/list"
            | "prompts/get"
            | "completion/complete"
    )
}

/// Whether a request may be sent again after it may have reached an agent: a GET (it opens a
/// stream), or a POST whose every message is a request of a safe method.
pub fn is_safe(method: &Method, body: &[u8]) -> bool {
    if method == Method::GET {
        return true;
    }
    method == Method::POST
        && inspect(body).is_ok_and(|msgs| {
            msgs.iter()
                .all(|m| m.method.as_deref().is_some_and(is_safe_method))
        })
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct Passthrough {
    proxy: Arc<Proxy>,
}

impl Passthrough {
    /// For `proxy`.
    pub fn new(proxy: Arc<Proxy>) -> Self {
        Self { proxy }
    }
}

/// Where a passthrough request goes, and what its answer needs to be relayed.
struct Plan {
    call: Call,
    capability: Capability,
    sealer: Sealer,
    pinned: Option<Pinned>,
    client_session: Option<String>,
    modern: bool,
}

impl<S> Middleware<Request<Bytes>, S> for Passthrough
where
    S: Next<Call, Response<PeerBody>>,
{
    type Response = Response<BoxBody>;

    fn handle(self, req: Request<Bytes>, next: S) -> impl Handled<Response<BoxBody>> {
        let proxy = self.proxy;
        async move {
            let plan = plan(&proxy, req)?;
            let resp = match call(next, plan.call.clone()).await {
                Ok(resp) => resp,
                // The instance holding the session is unreachable: the client starts over.
                Err(e) if plan.pinned.is_some() && !e.may_have_reached_agent() => {
                    return Err(ProxyError::UnknownSession);
                }
                // The connection broke after the request went out. When the instance's proxy
                // no longer accepts connections, the session died with it: whatever became of
                // this request, the client has to start over, and 404 tells it so.
                Err(e) if plan.pinned.is_some() && instance_gone(&plan.call).await => {
                    tracing::debug!(error = %e, "the session's instance is gone");
                    return Err(ProxyError::UnknownSession);
                }
                Err(e) => return Err(e),
            };
            relay(resp, &plan).await
        }
    }
}

/// Whether a pinned call's instance refuses new connections (its proxy is not listening any
/// more), asked once with a short bound after its connection broke.
async fn instance_gone(call: &Call) -> bool {
    let Target::Pinned(ep) = &call.0.target else {
        return false;
    };
    let connect = tokio::net::TcpStream::connect(ep.address.as_str());
    matches!(
        tokio::time::timeout(std::time::Duration::from_millis(500), connect).await,
        Ok(Err(_))
    )
}

fn plan(proxy: &Proxy, req: Request<Bytes>) -> Result<Plan, ProxyError> {
    if !matches!(*req.method(), Method::POST | Method::GET | Method::DELETE) {
        return Err(ProxyError::MethodNotAllowed("use POST, GET or DELETE"));
    }
    let name = capability_in_path(req.uri().path()).unwrap_or_default();
    let routing = proxy.routing.load_full();
    let cap = Capability::new(name).map_err(|_| ProxyError::UnknownCapability(name.to_owned()))?;
    let all = routing.endpoints(&cap);
    if all.is_empty() {
        return Err(if routing.known(&cap) {
            ProxyError::NotDependedOn(name.to_owned())
        } else {
            ProxyError::UnknownCapability(name.to_owned())
        });
    }
    let sealer = sealer(proxy).ok_or_else(|| {
        ProxyError::NotReady(
            "passthrough needs the mesh's session key from the control plane".into(),
        )
    })?;
    let (parts, body) = req.into_parts();
    let modern = parts.method == Method::POST
        && parts
            .headers
            .get("mcp-protocol-version")
            .is_some_and(|v| v.as_bytes() == classify::MODERN.as_bytes());
    let client_session = parts
        .headers
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .filter(|_| !modern);
    let find = |endpoint: &capmesh_api::EndpointId, instance: &str| {
        all.iter()
            .find(|e| &e.id == endpoint && e.instance == instance && e.healthy)
            .cloned()
    };
    let (state, body) = if modern {
        restore_state(&sealer, cap.as_str(), body)?
    } else {
        (None, body)
    };
    let (target, pinned) = if let Some(route) = state {
        let ep = find(&route.endpoint, &route.instance).ok_or_else(|| {
            ProxyError::StaleRequestState(format!(
                "the provider instance {} that issued this requestState is gone",
                route.instance
            ))
        })?;
        (Target::Pinned(ep), None)
    } else if let Some(sealed) = &client_session {
        let pinned = sealer
            .open_pinned(cap.as_str(), sealed)
            .ok_or(ProxyError::UnknownSession)?;
        let ep = find(&pinned.endpoint, &pinned.instance).ok_or(ProxyError::UnknownSession)?;
        (Target::Pinned(ep), Some(pinned))
    } else {
        let tool = routing.tool_for(&cap);
        let ranks = match tool {
            Some(t) => t.ranks.clone(),
            None => Arc::new(rank(all.iter().cloned(), &Selector::default())),
        };
        if ranks.iter().all(Vec::is_empty) {
            return Err(ProxyError::NoEndpoint {
                capability: cap.to_string(),
                selector: tool.map(|t| t.selector.to_string()).unwrap_or_default(),
                registered: all.len(),
            });
        }
        (Target::Ranked { ranks }, None)
    };
    proxy
        .metrics
        .requests
        .with_label_values(&[cap.as_str()])
        .inc();
    if pinned.is_none() {
        proxy.retry_budget.deposit();
    }
    let query = parts
        .uri
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let safe = is_safe(&parts.method, &body);
    let call = Call(Arc::new(CallSpec {
        target,
        upstream: Upstream::Passthrough {
            capability: cap.to_string(),
            query,
            session: pinned.as_ref().map(|p| p.upstream.clone()),
        },
        timeout: call_timeout(proxy, &parts.headers),
        headers: crate::headers::forwarded(&parts.headers),
        method: parts.method,
        body,
        safe,
        label: cap.to_string(),
        attempts: Attempts::default(),
    }));
    Ok(Plan {
        call,
        capability: cap,
        sealer,
        pinned,
        client_session,
        modern,
    })
}

/// A 2026-07-28 POST carrying a `requestState` the mesh sealed: the route it names, with the
/// provider's own value put back in the body.
fn restore_state(
    sealer: &Sealer,
    capability: &str,
    body: Bytes,
) -> Result<(Option<Route>, Bytes), ProxyError> {
    let Ok(mut message) = serde_json::from_slice::<Value>(&body) else {
        // Not ours to judge: the provider answers it.
        return Ok((None, body));
    };
    let Some(sealed) = message
        .get("params")
        .and_then(|p| p.get("requestState"))
        .and_then(Value::as_str)
        .filter(|s| s.starts_with(seal::PREFIX))
    else {
        return Ok((None, body));
    };
    let route = sealer
        .open_route(seal::REQUEST_STATE, sealed)
        .filter(|r| r.capability == capability)
        .ok_or_else(|| {
            ProxyError::StaleRequestState(
                "the requestState was not issued by this mesh for this capability".into(),
            )
        })?;
    message["params"]["requestState"] = route.upstream_id.clone();
    let body = serde_json::to_vec(&message).map_err(|e| ProxyError::Internal(e.to_string()))?;
    Ok((Some(route), Bytes::from(body)))
}

/// Streams the provider's response back: the session id sealed, a 2026-07-28
/// `input_required` `requestState` sealed with its instance.
async fn relay(resp: Response<PeerBody>, plan: &Plan) -> Result<Response<BoxBody>, ProxyError> {
    let Some(ep) = resp.body().served().cloned() else {
        return Err(ProxyError::Internal(
            "a response without its endpoint".into(),
        ));
    };
    let (parts, body) = resp.into_parts();
    let body = if plan.modern {
        seal_states(&parts.headers, body, plan, &ep).await?
    } else {
        boxed(body)
    };
    let mut out = Response::new(body);
    *out.status_mut() = parts.status;
    let h = out.headers_mut();
    for (name, value) in &parts.headers {
        let n = name.as_str();
        if is_hop_by_hop(n) || n.starts_with(MESH_HEADER_PREFIX) || n == "mcp-session-id" {
            continue;
        }
        h.append(name.clone(), value.clone());
    }
    if let Some(upstream) = parts
        .headers
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
    {
        // The same session as the request's: hand back the client's id unchanged.
        let sealed = match (&plan.pinned, &plan.client_session) {
            (Some(p), Some(id)) if p.upstream == upstream => Some(id.clone()),
            _ => plan.sealer.seal_pinned(
                plan.capability.as_str(),
                &Pinned {
                    endpoint: ep.id.clone(),
                    instance: ep.instance.clone(),
                    upstream: upstream.to_owned(),
                },
            ),
        };
        if let Some(v) = sealed.and_then(|s| HeaderValue::from_str(&s).ok()) {
            h.insert("mcp-session-id", v);
        }
    }
    if let Ok(v) = HeaderValue::from_str(&format!("{}#{}", ep.identity, ep.instance)) {
        h.insert(SERVED_BY_HEADER, v);
    }
    if !h.contains_key(header::CACHE_CONTROL)
        && h.get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"))
    {
        h.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-cache, no-transform"),
        );
    }
    Ok(out)
}

/// A 2026-07-28 response body with each `input_required` result's `requestState` sealed with
/// the instance that minted it (JSON read whole; an event stream relayed event by event).
async fn seal_states(
    headers: &http::HeaderMap,
    body: PeerBody,
    plan: &Plan,
    ep: &Endpoint,
) -> Result<BoxBody, ProxyError> {
    let route = Route {
        endpoint: ep.id.clone(),
        instance: ep.instance.clone(),
        capability: plan.capability.to_string(),
        upstream_id: Value::Null,
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .map(|v| v.as_bytes().to_vec())
        .unwrap_or_default();
    if content_type.starts_with(b"text/event-stream") {
        let sealer = plan.sealer.clone();
        let map: EventFn = Box::new(move |mut event: Event| {
            if let Ok(mut v) = serde_json::from_str::<Value>(&event.data)
                && seal_request_state(&mut v, Some(&sealer), &route)
            {
                event.data = v.to_string();
            }
            event
        });
        return Ok(boxed(MapEvents::new(body, map)));
    }
    if !content_type.starts_with(b"application/json") {
        return Ok(boxed(body));
    }
    let bytes = read_body(body, MAX_RESPONSE)
        .await
        .map_err(|e| ProxyError::UpstreamBody(format!("{}: {e}", ep.identity)))?;
    let sealed = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|mut v| {
            seal_request_state(&mut v, Some(&plan.sealer), &route).then(|| v.to_string())
        });
    Ok(boxed(Full::new(sealed.map_or(bytes, Bytes::from))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_capability_comes_from_the_path() {
        assert_eq!(
            capability_in_path("/capabilities/get_weather/mcp"),
            Some("get_weather")
        );
        assert_eq!(capability_in_path("/capabilities//mcp"), None);
        assert_eq!(capability_in_path("/capabilities/a/b/mcp"), None);
        assert_eq!(capability_in_path("/capabilities/a"), None);
    }

    #[test]
    fn reads_are_safe_to_repeat_and_calls_are_not() {
        let post = |b: &str| is_safe(&Method::POST, b.as_bytes());
        assert!(post(r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#));
        assert!(post(
            r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{}}"#
        ));
        assert!(!post(
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x"}}"#
        ));
        assert!(!post(
            r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#
        ));
        assert!(!post(r#"{"jsonrpc":"2.0","id":1,"result":{}}"#));
        assert!(!post("not json"));
        assert!(is_safe(&Method::GET, b""));
        assert!(!is_safe(&Method::DELETE, b""));
    }
}

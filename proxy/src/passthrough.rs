//! Passthrough: `http://127.0.0.1:15001/capabilities/<capability>/mcp`.
//!
//! The whole MCP conversation (resources, prompts, everything) goes unchanged to one provider
//! instance of the capability, over mutual TLS to its proxy's `/.capmesh/passthrough`, and the
//! response streams back unbuffered. Nothing is renamed.
//!
//! Session affinity without shared state: when the provider answers with an `Mcp-Session-Id`,
//! the client gets a *sealed* id instead, an AEAD (ChaCha20-Poly1305, random 96-bit nonce) of
//! (endpoint id, instance, upstream session id) under the mesh's session key, bound to the
//! capability, in URL-safe Base64. Any proxy of the mesh can open it; a request carrying it goes
//! to that instance with the upstream id restored. An id that does not open, or whose instance
//! is gone or unreachable, is answered 404 at once so the client initializes again and lands on
//! a live instance. 2026-07-28 requests carry no session and are routed one by one.

use std::sync::Arc;
use std::time::Instant;

use capmesh_api::{Capability, Endpoint, EndpointId, Selector};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

use crate::balance::{self, Outcome};
use crate::headers::is_hop_by_hop;
use crate::mcp::jsonrpc;
use crate::mcp::relay::{EventFn, MapEvents};
use crate::mcp::sse::Event;
use crate::outbound::{
    REQUEST_STATE_CONTEXT, Route, SERVER_REQUEST_PREFIX, call_timeout, rpc_error,
    seal_request_state,
};
use crate::{BoxBody, Proxy, boxed};

/// Path of passthrough requests on a peer proxy's inbound listener.
pub const PATH: &str = "/.capmesh/passthrough";
/// The header naming the capability of a passthrough request between proxies.
pub const CAPABILITY_HEADER: &str = "x-capmesh-capability";
const MAX_PICKS: usize = 3;

/// Where a session lives: what a sealed session id holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pinned {
    /// The endpoint that answered `initialize`.
    pub endpoint: EndpointId,
    /// Its instance (proxy id).
    pub instance: String,
    /// The session id the provider's agent minted.
    pub upstream: String,
}

/// Seals and opens session ids with the mesh's key.
#[derive(Clone)]
pub struct Sealer {
    key: LessSafeKey,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(<key>)")
    }
}

impl Sealer {
    /// From the mesh settings' hex key (32 bytes); `None` when absent or malformed.
    pub fn from_hex(hex: &str) -> Option<Self> {
        if hex.len() != 64 {
            return None;
        }
        let bytes: Option<Vec<u8>> = (0..32)
            .map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
            .collect();
        let key = UnboundKey::new(&CHACHA20_POLY1305, &bytes?).ok()?;
        Some(Self {
            key: LessSafeKey::new(key),
        })
    }

    /// The sealed id of `pinned`, valid for `capability` only.
    pub fn seal(&self, capability: &str, pinned: &Pinned) -> Option<String> {
        self.seal_json(
            capability,
            &serde_json::json!([
                pinned.endpoint.as_str(),
                pinned.instance.as_str(),
                pinned.upstream.as_str(),
            ]),
        )
    }

    /// What a sealed id holds; `None` when it was not sealed by this mesh for `capability`, or
    /// was changed.
    pub fn open(&self, capability: &str, sealed: &str) -> Option<Pinned> {
        let [endpoint, instance, upstream]: [String; 3] =
            serde_json::from_value(self.open_json(capability, sealed)?).ok()?;
        Some(Pinned {
            endpoint: EndpointId(endpoint),
            instance,
            upstream,
        })
    }

    /// `value` sealed (encrypted and authenticated, fresh nonce) and bound to `context`, as
    /// URL-safe Base64 without padding.
    pub fn seal_json(&self, context: &str, value: &serde_json::Value) -> Option<String> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).ok()?;
        let mut data = serde_json::to_vec(value).ok()?;
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context.as_bytes()),
                &mut data,
            )
            .ok()?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        Some(base64url_encode(&out))
    }

    /// The value [`seal_json`](Self::seal_json) sealed for `context`; `None` for anything else.
    pub fn open_json(&self, context: &str, sealed: &str) -> Option<serde_json::Value> {
        let raw = base64url_decode(sealed.as_bytes())?;
        if raw.len() < NONCE_LEN {
            return None;
        }
        let (nonce, rest) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut rest = rest.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(context.as_bytes()), &mut rest)
            .ok()?;
        serde_json::from_slice(plain).ok()
    }
}

pub use crate::mcp::header::{base64url_decode, base64url_encode};

fn not_found_session() -> Response<BoxBody> {
    rpc_error(
        StatusCode::NOT_FOUND,
        None,
        jsonrpc::INVALID_REQUEST,
        "unknown or tampered session: initialize again",
        None,
    )
}

/// The capability in `/capabilities/<capability>/mcp`, or `None` for any other path.
pub fn capability_in_path(path: &str) -> Option<&str> {
    let cap = path.strip_prefix("/capabilities/")?.strip_suffix("/mcp")?;
    (!cap.is_empty() && !cap.contains('/')).then_some(cap)
}

/// Serves one request on `/capabilities/<capability>/mcp`.
pub async fn handle(proxy: Arc<Proxy>, name: &str, req: Request<Incoming>) -> Response<BoxBody> {
    if !matches!(*req.method(), Method::POST | Method::GET | Method::DELETE) {
        return rpc_error(
            StatusCode::METHOD_NOT_ALLOWED,
            None,
            jsonrpc::INVALID_REQUEST,
            "use POST, GET or DELETE",
            None,
        );
    }
    let routing = proxy.routing.load_full();
    let unknown = || {
        rpc_error(
            StatusCode::NOT_FOUND,
            None,
            jsonrpc::INVALID_PARAMS,
            &format!("unknown capability {name:?}: no agent in the mesh provides it"),
            Some(serde_json::json!({ "capability": name })),
        )
    };
    let Ok(cap) = Capability::new(name) else {
        return unknown();
    };
    let all = routing.endpoints(&cap);
    if all.is_empty() {
        if !routing.known(&cap) {
            return unknown();
        }
        return rpc_error(
            StatusCode::NOT_FOUND,
            None,
            jsonrpc::INVALID_PARAMS,
            &format!(
                "capability {name:?} exists in the mesh, but this agent does not depend on it"
            ),
            Some(serde_json::json!({ "capability": name })),
        );
    }
    let Some(sealer) = routing
        .snapshot
        .as_ref()
        .and_then(|s| Sealer::from_hex(&s.settings.session_key))
    else {
        return rpc_error(
            StatusCode::SERVICE_UNAVAILABLE,
            None,
            jsonrpc::NO_ENDPOINT,
            "passthrough is not ready: no session key from the control plane yet",
            None,
        );
    };
    let label = [cap.as_str()];
    proxy.metrics.requests.with_label_values(&label).inc();
    let timeout = call_timeout(&proxy, req.headers());
    let client_session = req
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);

    // 2026-07-28: a retry carrying the mesh's requestState goes to the instance that minted it.
    let (parts, body) = req.into_parts();
    let (body, state_pin) = match modern_state(&parts, body, &sealer, cap.as_str()).await {
        Ok(read) => read,
        Err(refusal) => return refusal,
    };
    let modern = state_pin.is_some() || is_modern_post(&parts);
    let client_session = client_session.filter(|_| !modern);

    // Pinned: the sealed id (or requestState) says where the session lives.
    let (ep, sender, pinned) = if let Some(route) = &state_pin {
        let Some(ep) = all
            .iter()
            .find(|e| e.id == route.endpoint && e.instance == route.instance && e.healthy)
        else {
            return stale_state(&route.instance);
        };
        match proxy.peers.ready(&ep.address, &ep.identity).await {
            Ok(s) => (ep.clone(), s, None),
            Err(_) => return stale_state(&route.instance),
        }
    } else if let Some(sealed) = &client_session {
        let Some(pinned) = sealer.open(cap.as_str(), sealed) else {
            return not_found_session();
        };
        let Some(ep) = all
            .iter()
            .find(|e| e.id == pinned.endpoint && e.instance == pinned.instance && e.healthy)
        else {
            return not_found_session();
        };
        match proxy.peers.ready(&ep.address, &ep.identity).await {
            Ok(s) => (ep.clone(), s, Some(pinned)),
            Err(e) => {
                tracing::debug!(capability = %cap, endpoint = %ep.id, error = %e, "the instance holding a session is unreachable");
                if let Some(s) = routing.stats(&ep.id) {
                    s.observe(Outcome::Unavailable, std::time::Duration::ZERO);
                }
                return not_found_session();
            }
        }
    } else {
        // No session: any healthy provider, tried until one is reachable.
        let selector = routing
            .tools
            .iter()
            .find(|t| t.capability == cap)
            .map(|t| t.selector.clone())
            .unwrap_or_else(Selector::default);
        let ranks = balance::rank(all, &selector);
        let mut tried: Vec<EndpointId> = Vec::new();
        let mut found: Option<(Endpoint, _)> = None;
        let mut last_error = String::new();
        for _ in 0..MAX_PICKS {
            let Some(ep) = balance::pick(
                &ranks,
                &|id: &EndpointId| routing.stats(id),
                &tried,
                Instant::now(),
            ) else {
                break;
            };
            tried.push(ep.id.clone());
            match proxy.peers.ready(&ep.address, &ep.identity).await {
                Ok(s) => {
                    found = Some((ep.clone(), s));
                    break;
                }
                Err(e) => {
                    if let Some(s) = routing.stats(&ep.id) {
                        s.observe(Outcome::Unavailable, std::time::Duration::ZERO);
                    }
                    last_error = e.to_string();
                }
            }
        }
        let Some((ep, sender)) = found else {
            let (status, code, why) = if tried.is_empty() {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    jsonrpc::NO_ENDPOINT,
                    format!(
                        "capability {name:?} has no healthy endpoint ({} registered)",
                        all.len()
                    ),
                )
            } else {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    jsonrpc::UPSTREAM_FAILED,
                    format!(
                        "capability {name:?}: no provider reachable ({} tried): {last_error}",
                        tried.len()
                    ),
                )
            };
            proxy
                .metrics
                .responses
                .with_label_values(&[cap.as_str(), "503", "no_endpoint"])
                .inc();
            return rpc_error(status, None, code, &why, None);
        };
        (ep, sender, None)
    };

    let request = match upstream_request(&cap, &ep, pinned.as_ref(), parts, body) {
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
    let stats = routing.stats(&ep.id);
    let t0 = Instant::now();
    let mut sender = sender;
    let result = tokio::time::timeout(timeout, sender.send_request(request)).await;
    let rtt = t0.elapsed();
    let resp = match result {
        Err(_) => {
            if let Some(s) = &stats {
                s.observe(Outcome::ServerError, rtt);
            }
            return rpc_error(
                StatusCode::GATEWAY_TIMEOUT,
                None,
                jsonrpc::UPSTREAM_FAILED,
                &format!(
                    "capability {name:?}: no response from {} within {timeout:?}",
                    ep.identity
                ),
                None,
            );
        }
        Ok(Err(e)) => {
            if let Some(s) = &stats {
                s.observe(Outcome::Unavailable, rtt);
            }
            if pinned.is_some() {
                return not_found_session();
            }
            return rpc_error(
                StatusCode::BAD_GATEWAY,
                None,
                jsonrpc::UPSTREAM_FAILED,
                &format!("capability {name:?}: {} failed: {e}", ep.identity),
                None,
            );
        }
        Ok(Ok(resp)) => resp,
    };
    let status = resp.status();
    if let Some(s) = &stats {
        s.observe(
            match status.as_u16() {
                429 => Outcome::Overloaded,
                500..=599 => Outcome::ServerError,
                _ => Outcome::Success,
            },
            rtt,
        );
    }
    proxy.metrics.answered(cap.as_str(), status, rtt);
    let resp = if modern {
        seal_states(resp, &sealer, &cap, &ep).await
    } else {
        resp.map(boxed)
    };
    relay(
        resp,
        &sealer,
        &cap,
        &ep,
        pinned.as_ref(),
        client_session.as_deref(),
    )
}

fn is_modern_post(parts: &http::request::Parts) -> bool {
    parts.method == Method::POST
        && parts
            .headers
            .get("mcp-protocol-version")
            .is_some_and(|v| v.as_bytes() == crate::mcp::classify::MODERN.as_bytes())
}

fn stale_state(instance: &str) -> Response<BoxBody> {
    rpc_error(
        StatusCode::OK,
        None,
        jsonrpc::INVALID_PARAMS,
        &format!(
            "the provider instance {instance} that issued this requestState is gone, or the requestState was not issued by this mesh: call again without requestState"
        ),
        None,
    )
}

/// A 2026-07-28 POST is read whole (it is one small JSON-RPC request) to find a requestState
/// the mesh sealed: returned opened, with the provider's own value put back in the body.
async fn modern_state(
    parts: &http::request::Parts,
    body: Incoming,
    sealer: &Sealer,
    capability: &str,
) -> Result<(BoxBody, Option<Route>), Response<BoxBody>> {
    use http_body_util::{BodyExt, Full, Limited};
    if !is_modern_post(parts) {
        return Ok((boxed(body), None));
    }
    let bytes = match Limited::new(body, crate::outbound::MAX_REQUEST)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return Err(rpc_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                None,
                jsonrpc::INVALID_REQUEST,
                &format!(
                    "cannot read the request (at most {} bytes): {e}",
                    crate::outbound::MAX_REQUEST
                ),
                None,
            ));
        }
    };
    let Ok(mut message) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        // Not ours to judge: the provider answers it.
        return Ok((boxed(Full::new(bytes)), None));
    };
    let Some(sealed) = message
        .get("params")
        .and_then(|p| p.get("requestState"))
        .and_then(serde_json::Value::as_str)
        .and_then(|s| s.strip_prefix(SERVER_REQUEST_PREFIX))
    else {
        return Ok((boxed(Full::new(bytes)), None));
    };
    let route = sealer
        .open_json(REQUEST_STATE_CONTEXT, sealed)
        .and_then(Route::from_json)
        .filter(|r| r.capability == capability);
    let Some(route) = route else {
        return Err(stale_state("(unknown)"));
    };
    message["params"]["requestState"] = route.upstream_id.clone();
    let bytes = serde_json::to_vec(&message).map_err(|e| {
        rpc_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            None,
            jsonrpc::INTERNAL_ERROR,
            &e.to_string(),
            None,
        )
    })?;
    Ok((boxed(Full::new(bytes::Bytes::from(bytes))), Some(route)))
}

/// A 2026-07-28 response: an `input_required` result's requestState sealed with the instance
/// that minted it (JSON read whole; an event stream relayed event by event).
async fn seal_states(
    resp: Response<Incoming>,
    sealer: &Sealer,
    cap: &Capability,
    ep: &Endpoint,
) -> Response<BoxBody> {
    use http_body_util::{BodyExt, Full, Limited};
    let route = Route {
        endpoint: ep.id.clone(),
        instance: ep.instance.clone(),
        capability: cap.as_str().to_owned(),
        upstream_session: None,
        upstream_id: serde_json::Value::Null,
    };
    let (parts, body) = resp.into_parts();
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .map(|v| v.as_bytes().to_vec())
        .unwrap_or_default();
    let body = if content_type.starts_with(b"text/event-stream") {
        let sealer = sealer.clone();
        let map: EventFn = Box::new(move |mut event: Event| {
            if let Ok(mut v) = serde_json::from_str::<serde_json::Value>(&event.data)
                && seal_request_state(&mut v, Some(&sealer), &route)
            {
                event.data = v.to_string();
            }
            event
        });
        boxed(MapEvents::new(body, map))
    } else if content_type.starts_with(b"application/json") {
        const LIMIT: usize = 16 * 1024 * 1024;
        match Limited::new(body, LIMIT).collect().await {
            Ok(b) => {
                let bytes = b.to_bytes();
                let sealed = serde_json::from_slice::<serde_json::Value>(&bytes)
                    .ok()
                    .and_then(|mut v| {
                        seal_request_state(&mut v, Some(sealer), &route).then(|| v.to_string())
                    });
                boxed(Full::new(sealed.map_or(bytes, bytes::Bytes::from)))
            }
            Err(e) => {
                return rpc_error(
                    StatusCode::BAD_GATEWAY,
                    None,
                    jsonrpc::UPSTREAM_FAILED,
                    &format!("{}: reading the response failed: {e}", ep.identity),
                    None,
                );
            }
        }
    } else {
        boxed(body)
    };
    Response::from_parts(parts, body)
}

fn upstream_request(
    cap: &Capability,
    ep: &Endpoint,
    pinned: Option<&Pinned>,
    parts: http::request::Parts,
    body: BoxBody,
) -> Result<Request<BoxBody>, String> {
    let query = parts
        .uri
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let uri: http::Uri = format!("https://{}{PATH}{query}", ep.address)
        .parse()
        .map_err(|e| format!("endpoint address {:?}: {e}", ep.address))?;
    let mut out = Request::builder().method(parts.method).uri(uri);
    let h = out.headers_mut().ok_or("request builder failed")?;
    // Every header of the client's goes on (the propagation allow-list is a subset of them).
    *h = forwarded_headers(&parts.headers);
    crate::headers::continue_trace(&parts.headers, h);
    h.remove("mcp-session-id");
    if let Some(p) = pinned
        && let Ok(v) = HeaderValue::from_str(&p.upstream)
    {
        h.insert("mcp-session-id", v);
    }
    if let Ok(v) = HeaderValue::from_str(cap.as_str()) {
        h.insert(CAPABILITY_HEADER, v);
    }
    out.body(body).map_err(|e| e.to_string())
}

/// The client's headers minus hop-by-hop ones, `host`, capmesh's own (a caller cannot forge
/// them) and the trace context (continued separately). Transparent mode forwards the same.
pub(crate) fn forwarded_headers(from: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(from.len() + 4);
    for (name, value) in from {
        let n = name.as_str();
        if is_hop_by_hop(n)
            || n.starts_with("x-capmesh-")
            || matches!(n, "traceparent" | "tracestate")
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

/// Streams the provider's response back with the session id sealed.
fn relay(
    resp: Response<BoxBody>,
    sealer: &Sealer,
    cap: &Capability,
    ep: &Endpoint,
    pinned: Option<&Pinned>,
    client_session: Option<&str>,
) -> Response<BoxBody> {
    let (parts, body) = resp.into_parts();
    let mut out = Response::new(body);
    *out.status_mut() = parts.status;
    let h = out.headers_mut();
    for (name, value) in &parts.headers {
        let n = name.as_str();
        if is_hop_by_hop(n) || n.starts_with("x-capmesh-") || n == "mcp-session-id" {
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
        let sealed = match (pinned, client_session) {
            (Some(p), Some(id)) if p.upstream == upstream => Some(id.to_owned()),
            _ => sealer.seal(
                cap.as_str(),
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
        h.insert("x-capmesh-served-by", v);
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
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    fn pinned() -> Pinned {
        Pinned {
            endpoint: EndpointId("default/alpha/alpha-1/get_weather".into()),
            instance: "alpha-1".into(),
            upstream: "7e270f7bb85847899070920791e16e47".into(),
        }
    }

    #[test]
    fn sealed_ids_open_to_what_was_sealed_and_are_visible_ascii() {
        let s = Sealer::from_hex(KEY).unwrap();
        let a = s.seal("get_weather", &pinned()).unwrap();
        let b = s.seal("get_weather", &pinned()).unwrap();
        assert_ne!(a, b, "a fresh nonce each time");
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        );
        assert!(!a.contains(&pinned().upstream));
        assert_eq!(s.open("get_weather", &a), Some(pinned()));
        // Another proxy with the same mesh key opens it too.
        assert_eq!(
            Sealer::from_hex(KEY).unwrap().open("get_weather", &b),
            Some(pinned())
        );
    }

    #[test]
    fn tampered_foreign_or_misplaced_ids_do_not_open() {
        let s = Sealer::from_hex(KEY).unwrap();
        let id = s.seal("get_weather", &pinned()).unwrap();
        for i in 0..id.len() {
            let mut bytes = id.clone().into_bytes();
            bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
            let tampered = String::from_utf8(bytes).unwrap();
            assert_eq!(s.open("get_weather", &tampered), None, "flipped at {i}");
        }
        assert_eq!(s.open("other_capability", &id), None);
        let other = Sealer::from_hex(&KEY.replace("1f", "ff")).unwrap();
        assert_eq!(other.open("get_weather", &id), None);
        for junk in ["", "abc", "7e270f7bb85847899070920791e16e47", "a+b/c=="] {
            assert_eq!(s.open("get_weather", junk), None, "{junk}");
        }
    }

    #[test]
    fn keys_must_be_32_bytes_of_hex() {
        assert!(Sealer::from_hex("").is_none());
        assert!(Sealer::from_hex(&KEY[2..]).is_none());
        assert!(Sealer::from_hex(&KEY.replace('0', "g")).is_none());
    }

    #[test]
    fn base64url_round_trips_without_padding() {
        for len in 0..40u8 {
            let data: Vec<u8> = (0..len).map(|i| i.wrapping_mul(37) ^ 0xa5).collect();
            let enc = base64url_encode(&data);
            assert!(!enc.contains('=') && !enc.contains('+') && !enc.contains('/'));
            assert_eq!(base64url_decode(enc.as_bytes()), Some(data));
        }
        assert_eq!(base64url_encode(b"\xfb\xff"), "-_8");
        assert_eq!(base64url_decode(b"Zh"), None, "non-zero trailing bits");
    }

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
}

//! Admin endpoints on 127.0.0.1:15020: `/live`, `/ready`, `/metrics`, `/config`. Kept off the
//! request path (their own listener and tasks).
//!
//! The listener serves from the proxy's first moment, before it has a certificate: `/live`
//! answers 200 as long as the process runs (a Kubernetes liveness probe must not restart a
//! sidecar that waits for a slow control plane), and `/ready` answers 503 naming what is missing
//! and why ([`Readiness`]).

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::UNIX_EPOCH;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::Proxy;
use crate::readiness::{Condition, Readiness};

/// What the admin endpoints see: the reasons from the first moment, the proxy once it exists.
#[derive(Debug)]
pub struct AdminState {
    /// Why each start-up wait is not over yet.
    pub readiness: Arc<Readiness>,
    /// Set once the proxy has its certificate and runs.
    pub proxy: OnceLock<Arc<Proxy>>,
    /// Whether the proxy serves an agent (`--agent-url` is not `none`).
    pub has_agent: bool,
}

impl AdminState {
    /// The state of a proxy that is starting.
    pub fn new(readiness: Arc<Readiness>, has_agent: bool) -> Self {
        Self {
            readiness,
            proxy: OnceLock::new(),
            has_agent,
        }
    }

    /// What is still missing before the proxy is ready, each with why; empty when ready.
    pub fn not_ready(&self) -> Vec<String> {
        let mut unmet = Vec::new();
        match self.proxy.get() {
            None => {
                unmet.extend([Condition::Certificate, Condition::Snapshot]);
                if self.has_agent {
                    unmet.extend([Condition::Registration, Condition::AgentHealth]);
                }
            }
            Some(proxy) => unmet.extend(not_ready(proxy)),
        }
        self.readiness.describe(&unmet)
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

/// The conditions a running proxy does not meet yet; empty when ready.
pub fn not_ready(proxy: &Proxy) -> Vec<Condition> {
    let mut missing = Vec::new();
    if !proxy.ready_snapshot.load(Ordering::Acquire) {
        missing.push(Condition::Snapshot);
    }
    if proxy.agent.is_some() {
        if proxy.registration.borrow().is_none() {
            missing.push(Condition::Registration);
        }
        if !*proxy.healthy.borrow() {
            missing.push(Condition::AgentHealth);
        }
    }
    missing
}

fn metrics(proxy: &Proxy) -> String {
    let routing = proxy.routing.load();
    let m = &proxy.metrics;
    m.endpoints.reset();
    let now = std::time::Instant::now();
    for (cap, ep, stats) in routing.all_stats() {
        let state = if !ep.healthy {
            "unhealthy"
        } else if stats.breaker().is_available(now) {
            "ready"
        } else {
            "ejected"
        };
        m.endpoints.with_label_values(&[cap.as_str(), state]).inc();
    }
    if let Some(s) = &routing.snapshot {
        m.snapshot_version.set(s.version.0 as i64);
    }
    let expiry = proxy
        .identity
        .cell
        .current()
        .not_after()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    m.certificate_expiry.set(expiry);
    m.render()
}

fn config(proxy: &Proxy) -> String {
    let routing = proxy.routing.load();
    let cred = proxy.identity.cell.current();
    let unix = |t: std::time::SystemTime| {
        t.duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    };
    // The mesh's session key stays secret.
    let snapshot = routing.snapshot.as_deref().map(|s| {
        let mut s = s.clone();
        s.settings.session_key.clear();
        s
    });
    let now = std::time::Instant::now();
    // What the balancer sees now, per tool: its ranks, best first, and each endpoint's latency
    // estimate, requests in flight and breaker (why an endpoint gets no traffic).
    let balancing: Vec<_> = routing
        .tools
        .iter()
        .map(|t| {
            let ranks: Vec<Vec<_>> = t
                .ranks
                .iter()
                .map(|rank| {
                    rank.iter()
                        .map(|e| {
                            let stats = routing.stats(&e.id);
                            let stats = stats.as_ref();
                            json!({
                                "id": e.id,
                                "estimate_ms": stats.and_then(|s| s.estimate(now)).map(|ns| ns / 1e6),
                                "in_flight": stats.map_or(0, |s| s.in_flight()),
                                "breaker": stats.map(|s| s.breaker().state(now).name()),
                            })
                        })
                        .collect()
                })
                .collect();
            json!({ "tool": t.name, "capability": t.capability, "ranks": ranks })
        })
        .collect();
    let doc = json!({
        "identity": proxy.identity.id.to_string(),
        "proxy_id": proxy.node.proxy_id,
        "certificate": { "serial": cred.serial(), "not_after_unix": unix(cred.not_after()) },
        "control_plane_connected": proxy.metrics.control_plane_connected.get() == 1,
        "registration": *proxy.registration.borrow(),
        "agent_healthy": *proxy.healthy.borrow(),
        "tools": routing.tools.iter().map(|t| t.to_json()).collect::<Vec<_>>(),
        "balancing": balancing,
        "snapshot": snapshot,
    });
    serde_json::to_string_pretty(&doc).unwrap_or_default()
}

async fn handle(state: Arc<AdminState>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    match path {
        "/live" => return reply(StatusCode::OK, "text/plain", "ok\n".into()),
        "/ready" => {
            let missing = state.not_ready();
            return if missing.is_empty() {
                reply(StatusCode::OK, "text/plain", "ready\n".into())
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("not ready: {}\n", missing.join("; ")),
                )
            };
        }
        _ => {}
    }
    let Some(proxy) = state.proxy.get() else {
        return reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            format!(
                "starting: {path} is served once the proxy has its certificate; {}\n",
                state.not_ready().join("; ")
            ),
        );
    };
    match path {
        "/metrics" => reply(StatusCode::OK, "text/plain; version=0.0.4", metrics(proxy)),
        "/config" => reply(StatusCode::OK, "application/json", config(proxy)),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /live, /ready, /metrics or /config\n".into(),
        ),
    }
}

/// Serves the admin listener with the limits every listener has (a probe or a scraper that
/// stalls is closed like any slow client; the connection cap holds), until `drain` flips.
pub async fn serve(
    state: Arc<AdminState>,
    listener: TcpListener,
    limits: crate::serve::Limits,
    refused: prometheus::IntCounterVec,
    drain: watch::Receiver<bool>,
) {
    let svc = tower::service_fn(move |req| {
        let state = state.clone();
        Box::pin(async move { Ok::<_, Infallible>(handle(state, req).await.map(crate::boxed)) })
    });
    let connection = |tcp: tokio::net::TcpStream| {
        let (svc, drain) = (svc.clone(), drain.clone());
        crate::serve::connection(tcp, svc, limits, drain)
    };
    crate::serve::accept(
        "admin",
        listener,
        crate::serve::Gate::for_listener("admin", &limits, &refused),
        drain.clone(),
        ADMIN_GRACE,
        connection,
    )
    .await;
}

/// How long the admin listener waits for its open connections once it stops.
const ADMIN_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// What the admin listener allows: the proxy's header deadline and idle time-out, and a
/// small cap (probes and scrapers, not traffic).
pub fn limits(config: &crate::serve::Limits) -> crate::serve::Limits {
    crate::serve::Limits {
        max_connections: ADMIN_MAX_CONNECTIONS.min(config.max_connections),
        max_streams: 16,
        // Probes and scrapers send their request at once; a silent connection only holds a slot.
        close_silent: true,
        ..*config
    }
}

/// Connections the admin listener holds at once.
const ADMIN_MAX_CONNECTIONS: usize = 64;

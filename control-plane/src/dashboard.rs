//! The read-only web dashboard, served on the admin listener at `/dashboard`: agents and
//! capabilities as a graph with each consumer → capability edge's live request rate, error
//! rate and p99 (from the sidecars' traffic reports), the providers' health and ejections, and
//! the recent traces as trees (from the span window).
//!
//! The page, its script and its style are compiled into the binary (`assets/`); there is no
//! build step and nothing is fetched from elsewhere. The page reads `/dashboard/api/mesh`
//! every two seconds and `/dashboard/api/traces/<id>` for a trace it opens.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use capmesh_api::{SpanKind, Trace, TraceSummary};
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use serde::Serialize;

use crate::App;

const PAGE: &str = include_str!("../assets/dashboard.html");
const SCRIPT: &str = include_str!("../assets/dashboard.js");
const STYLE: &str = include_str!("../assets/dashboard.css");

/// How many recent traces the page lists.
const RECENT: usize = 15;

/// One agent and its instances.
#[derive(Debug, Serialize)]
struct AgentView {
    name: String,
    namespace: String,
    identity: String,
    /// Capabilities its instances provide.
    provides: Vec<String>,
    instances: Vec<InstanceView>,
}

#[derive(Debug, Serialize)]
struct InstanceView {
    proxy_id: String,
    healthy: bool,
    connected: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
}

/// One capability and the instances that provide it.
#[derive(Debug, Serialize)]
struct CapabilityView {
    name: String,
    providers: Vec<ProviderView>,
}

#[derive(Debug, Serialize)]
struct ProviderView {
    agent: String,
    instance: String,
    healthy: bool,
    /// Consumers whose circuit breaker holds this instance ejected.
    ejected_by: Vec<String>,
}

/// A consumer agent → capability edge.
#[derive(Debug, Serialize)]
struct EdgeView {
    from: String,
    capability: String,
    /// Calls per second over the latest reports (0 when idle).
    rate_per_s: f64,
    /// Share of those calls answered with an error, 0 to 1.
    error_rate: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    p99_ms: Option<f64>,
    /// Whether a traffic report from the last 30 s backs it (else it was only seen in traces).
    live: bool,
}

#[derive(Debug, Serialize)]
struct MeshView {
    generated_unix_ms: u64,
    agents: Vec<AgentView>,
    capabilities: Vec<CapabilityView>,
    edges: Vec<EdgeView>,
    traces: Vec<TraceSummary>,
    /// The most recent trace in full, so that a tree shows without a click.
    #[serde(skip_serializing_if = "Option::is_none")]
    latest: Option<Trace>,
}

#[derive(Default)]
struct EdgeSum {
    requests: u64,
    errors: u64,
    interval_ms: u64,
    p99_ms: Option<f64>,
}

fn mesh(app: &App) -> MeshView {
    let agents_info = app.registry.agents();
    let mut providers: BTreeMap<String, Vec<ProviderView>> = BTreeMap::new();
    let mut agents = Vec::new();
    for a in &agents_info {
        let mut provides = BTreeSet::new();
        let mut instances = Vec::new();
        for i in &a.instances {
            for t in &i.tools {
                provides.insert(t.capability.to_string());
                providers
                    .entry(t.capability.to_string())
                    .or_default()
                    .push(ProviderView {
                        agent: a.name.to_string(),
                        instance: i.proxy_id.clone(),
                        healthy: i.healthy,
                        ejected_by: vec![],
                    });
            }
            instances.push(InstanceView {
                proxy_id: i.proxy_id.clone(),
                healthy: i.healthy,
                connected: i.connected,
                detail: i.health_detail.clone(),
            });
        }
        agents.push(AgentView {
            name: a.name.to_string(),
            namespace: a.namespace.to_string(),
            identity: a.identity.clone(),
            provides: provides.into_iter().collect(),
            instances,
        });
    }

    // Live edges: each consumer's latest reports, summed over its instances.
    let mut sums: BTreeMap<(String, String), EdgeSum> = BTreeMap::new();
    for (_, reported) in app.observed.live_traffic() {
        for e in &reported.traffic.edges {
            let sum = sums
                .entry((reported.agent.clone(), e.capability.clone()))
                .or_default();
            sum.requests += e.requests;
            sum.errors += e.errors;
            sum.interval_ms = sum.interval_ms.max(reported.traffic.interval_ms);
            sum.p99_ms = match (sum.p99_ms, e.p99_ms) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
            for out in &e.ejected {
                let (agent, instance) = out.split_once('#').unwrap_or((out.as_str(), ""));
                if let Some(p) = providers.get_mut(&e.capability).and_then(|ps| {
                    ps.iter_mut()
                        .find(|p| p.agent == agent && p.instance == instance)
                }) && !p.ejected_by.contains(&reported.agent)
                {
                    p.ejected_by.push(reported.agent.clone());
                }
            }
        }
    }
    let mut edges: Vec<EdgeView> = sums
        .into_iter()
        .map(|((from, capability), s)| EdgeView {
            from,
            capability,
            rate_per_s: if s.interval_ms == 0 {
                0.0
            } else {
                s.requests as f64 * 1000.0 / s.interval_ms as f64
            },
            error_rate: if s.requests == 0 {
                0.0
            } else {
                (s.errors as f64 / s.requests as f64).min(1.0)
            },
            p99_ms: s.p99_ms,
            live: true,
        })
        .collect();

    let traces = app.observed.recent(RECENT);
    // Edges seen only in traces (idle now) still belong on the graph.
    for t in &traces {
        if let Some(full) = app.observed.trace(&t.trace_id) {
            for s in full
                .spans
                .iter()
                .filter(|s| s.span.kind == SpanKind::Client)
            {
                let Some(cap) = s.span.text("capmesh.capability") else {
                    continue;
                };
                if !edges
                    .iter()
                    .any(|e| e.from == s.agent && e.capability == cap)
                {
                    edges.push(EdgeView {
                        from: s.agent.clone(),
                        capability: cap,
                        rate_per_s: 0.0,
                        error_rate: 0.0,
                        p99_ms: None,
                        live: false,
                    });
                }
            }
        }
    }
    let mut capabilities: Vec<CapabilityView> = providers
        .into_iter()
        .map(|(name, providers)| CapabilityView { name, providers })
        .collect();
    for e in &edges {
        if !capabilities.iter().any(|c| c.name == e.capability) {
            capabilities.push(CapabilityView {
                name: e.capability.clone(),
                providers: vec![],
            });
        }
    }
    let latest = traces.first().and_then(|t| app.observed.trace(&t.trace_id));
    MeshView {
        generated_unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        agents,
        capabilities,
        edges,
        traces,
        latest,
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // The page loads only its own script and style and reads only this listener.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

fn json<T: Serialize>(value: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec(value) {
        Ok(body) => respond(StatusCode::OK, "application/json", Bytes::from(body)),
        Err(e) => respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain; charset=utf-8",
            Bytes::from(format!("cannot encode the view: {e}\n")),
        ),
    }
}

fn not_found(what: String) -> Response<Full<Bytes>> {
    respond(
        StatusCode::NOT_FOUND,
        "text/plain; charset=utf-8",
        Bytes::from(what),
    )
}

/// Serves `path` (under `/dashboard`), or `None` when the path is not the dashboard's.
pub fn serve(app: &App, path: &str) -> Option<Response<Full<Bytes>>> {
    let rest = path.strip_prefix("/dashboard")?;
    Some(match rest {
        "" | "/" | "/index.html" => respond(
            StatusCode::OK,
            "text/html; charset=utf-8",
            Bytes::from_static(PAGE.as_bytes()),
        ),
        "/app.js" => respond(
            StatusCode::OK,
            "text/javascript; charset=utf-8",
            Bytes::from_static(SCRIPT.as_bytes()),
        ),
        "/app.css" => respond(
            StatusCode::OK,
            "text/css; charset=utf-8",
            Bytes::from_static(STYLE.as_bytes()),
        ),
        "/api/mesh" => json(&mesh(app)),
        other => match other.strip_prefix("/api/traces/") {
            Some(id) => {
                let id = id.to_ascii_lowercase();
                match app.observed.trace(&id) {
                    Some(t) => json(&t),
                    None => not_found(format!(
                        "no span of trace {id} is held by this control plane replica\n"
                    )),
                }
            }
            None => not_found(
                "the dashboard is at /dashboard; its data at /dashboard/api/mesh\n".to_owned(),
            ),
        },
    })
}

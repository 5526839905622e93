//! Admin endpoints on 127.0.0.1:15020: `/live`, `/ready`, `/metrics`, `/config`. Kept off the
//! request path (their own listener and tasks).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::UNIX_EPOCH;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::Proxy;

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

/// What is still missing before the proxy is ready; empty when ready.
pub fn not_ready(proxy: &Proxy) -> Vec<&'static str> {
    let mut missing = Vec::new();
    if !proxy.ready_snapshot.load(Ordering::Acquire) {
        missing.push("no snapshot from the control plane yet");
    }
    if proxy.agent.is_some() {
        if proxy.registration.borrow().is_none() {
            missing.push("the agent's tools are not registered yet");
        }
        if !*proxy.healthy.borrow() {
            missing.push("the agent is not healthy");
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
    let doc = json!({
        "identity": proxy.identity.id.to_string(),
        "proxy_id": proxy.node.proxy_id,
        "certificate": { "serial": cred.serial(), "not_after_unix": unix(cred.not_after()) },
        "control_plane_connected": proxy.metrics.control_plane_connected.get() == 1,
        "registration": *proxy.registration.borrow(),
        "agent_healthy": *proxy.healthy.borrow(),
        "tools": routing.tools.iter().map(|t| t.to_json()).collect::<Vec<_>>(),
        "snapshot": snapshot,
    });
    serde_json::to_string_pretty(&doc).unwrap_or_default()
}

async fn handle(proxy: Arc<Proxy>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/live" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        "/ready" => {
            let missing = not_ready(&proxy);
            if missing.is_empty() {
                reply(StatusCode::OK, "text/plain", "ready\n".into())
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("not ready: {}\n", missing.join("; ")),
                )
            }
        }
        "/metrics" => reply(StatusCode::OK, "text/plain; version=0.0.4", metrics(&proxy)),
        "/config" => reply(StatusCode::OK, "application/json", config(&proxy)),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /live, /ready, /metrics or /config\n".into(),
        ),
    }
}

/// Serves the admin listener until `stop` flips.
pub async fn serve(proxy: Arc<Proxy>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    loop {
        let tcp = tokio::select! {
            _ = stop.changed() => return,
            a = listener.accept() => match a { Ok((tcp, _)) => tcp, Err(_) => continue },
        };
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let proxy = proxy.clone();
                async move { Ok::<_, Infallible>(handle(proxy, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

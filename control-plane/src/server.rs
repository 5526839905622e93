//! Listeners: the TLS API (topology stream + REST, HTTP/2 and HTTP/1.1) and the plain admin
//! address (`/live`, `/ready`, `/metrics`).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use capmesh_certs::{AcceptError, Accepted, MeshAcceptor, VerifiedPeer};
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::UnixTime;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::App;
use crate::rest::{self, Body, Caller};

/// The identity an admin certificate carries: `ns/capmesh-system/agent/admin`.
fn is_admin_identity(peer: &VerifiedPeer) -> bool {
    peer.identity.namespace().as_str() == "capmesh-system"
        && peer.identity.agent().as_str() == "admin"
}

fn bearer_is_admin(app: &App, req: &Request<Incoming>) -> bool {
    let Some(value) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some(token) = value.strip_prefix("Bearer ") else {
        return false;
    };
    crate::ca::constant_time_eq(token.trim().as_bytes(), app.admin_token.as_bytes())
}

async fn dispatch(
    app: Arc<App>,
    peer: Option<VerifiedPeer>,
    cert_not_after: Option<i64>,
    req: Request<Incoming>,
) -> Response<Body> {
    if req.uri().path() == "/v1/stream" {
        if req.method() != Method::POST {
            return rest::ApiError::method_not_allowed(
                "the topology stream is POST /v1/stream over HTTP/2",
            )
            .into_response();
        }
        return crate::stream::handle(app, peer, cert_not_after, req.into_body()).await;
    }
    let caller = Caller {
        admin: bearer_is_admin(&app, &req) || peer.as_ref().is_some_and(is_admin_identity),
        peer: peer.map(|p| p.identity),
    };
    rest::handle(app, caller, req).await
}

/// Serves the TLS API until `shutdown` flips to true.
pub async fn serve_api(
    app: Arc<App>,
    listener: TcpListener,
    acceptor: MeshAcceptor,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let tcp = tokio::select! {
            _ = shutdown.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let (app, acceptor) = (app.clone(), acceptor.clone());
        tokio::spawn(async move {
            match acceptor.accept(tcp).await {
                Ok(Accepted::Tls { stream, .. }) => {
                    // Verify again to learn which entity (if any) issued the chain: a stream
                    // is closed when its entity is revoked.
                    let peer = stream.get_ref().1.peer_certificates().and_then(|chain| {
                        let (leaf, rest) = chain.split_first()?;
                        app.trust
                            .verify_peer(
                                leaf,
                                rest,
                                UnixTime::now(),
                                webpki::KeyUsage::client_auth(),
                            )
                            .ok()
                    });
                    let not_after = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .and_then(|leaf| capmesh_certs::inspect_der(leaf).ok())
                        .and_then(|info| info.not_after.duration_since(std::time::UNIX_EPOCH).ok())
                        .map(|d| d.as_secs() as i64);
                    let svc = service_fn(move |req| {
                        let (app, peer) = (app.clone(), peer.clone());
                        async move { Ok::<_, Infallible>(dispatch(app, peer, not_after, req).await) }
                    });
                    let mut builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    builder
                        .http2()
                        .timer(TokioTimer::new())
                        .keep_alive_interval(Some(Duration::from_secs(10)))
                        .keep_alive_timeout(Duration::from_secs(20));
                    if let Err(e) = builder.serve_connection(TokioIo::new(stream), svc).await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                }
                Ok(Accepted::Plain(mut tcp)) => {
                    let msg = "This is the capmesh control plane's TLS port: use https:// (the CA is <data-dir>/ca.pem).\n";
                    let resp = format!(
                        "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{msg}",
                        msg.len()
                    );
                    let _ = tcp.write_all(resp.as_bytes()).await;
                    let _ = tcp.shutdown().await;
                }
                Err(AcceptError::Refused(r)) => {
                    tracing::info!(reason = %r, "TLS connection refused");
                    app.metrics.refuse(r.reason());
                }
                Err(e) => tracing::debug!(error = %e, "TLS handshake failed"),
            }
        });
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp
}

/// Serves `/live`, `/ready`, `/metrics` and the read-only dashboard (`/dashboard`) over plain
/// HTTP until `shutdown` flips.
pub async fn serve_admin(
    app: Arc<App>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let tcp = tokio::select! {
            _ = shutdown.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(_) => continue,
            },
        };
        let app = app.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let app = app.clone();
                async move {
                    if let Some(page) = crate::dashboard::serve(&app, req.uri().path()) {
                        return Ok::<_, Infallible>(page);
                    }
                    let resp = match req.uri().path() {
                        "/live" => text(StatusCode::OK, "ok\n".into()),
                        "/ready" if app.ready.load(Ordering::Acquire) => {
                            text(StatusCode::OK, "ready\n".into())
                        }
                        "/ready" => text(StatusCode::SERVICE_UNAVAILABLE, "starting\n".into()),
                        "/metrics" => {
                            let (streams, agents, caps) = app.registry.counts();
                            app.metrics.agents.set(agents as i64);
                            app.metrics.capabilities.set(caps as i64);
                            let _ = streams;
                            text(StatusCode::OK, app.metrics.render())
                        }
                        _ => text(
                            StatusCode::NOT_FOUND,
                            "try /live, /ready, /metrics or /dashboard\n".into(),
                        ),
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

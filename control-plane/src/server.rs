//! Listeners: the TLS API (topology stream + REST, HTTP/2 and HTTP/1.1) and the plain admin
//! address (`/live`, `/ready`, `/metrics`). Each applies the same limits
//! ([`capmesh_client::listen`]): a connection cap, header and first-request deadlines, an idle
//! timeout, HTTP/2 keepalive and a stream cap.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use capmesh_certs::{
    AcceptError, Accepted, MeshAcceptor, PeerRole, SYSTEM_NAMESPACE, VerifiedPeer,
};
use capmesh_client::listen::{self, ConnectionCap, Limits};
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use rustls::pki_types::CertificateDer;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::App;
use crate::rest::{self, Body, Caller};

/// The identity an admin certificate carries: `spiffe://<mesh trust domain>/ns/capmesh-system/agent/admin`,
/// issued by the mesh CA (an entity's CA can never make one: see `capmesh_certs::verify`; the
/// check is repeated here because this is the key to the mesh).
fn is_admin_identity(app: &App, peer: &VerifiedPeer) -> bool {
    peer.entity.is_none()
        && peer.identity.trust_domain() == &app.trust_domain
        && peer.identity.namespace().as_str() == SYSTEM_NAMESPACE
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
    let token = token.trim();
    // The admin token is never empty (the control plane refuses to start with one); an empty
    // bearer is never an admin.
    !token.is_empty() && crate::ca::constant_time_eq(token.as_bytes(), app.admin_token.as_bytes())
}

/// Answers one request on the API listener. Who the caller is gets decided here, for every
/// request, against the trust in force now: a certificate revoked or expired since the
/// connection opened no longer counts.
async fn dispatch(
    app: Arc<App>,
    chain: Arc<Vec<CertificateDer<'static>>>,
    cert_not_after: Option<i64>,
    req: Request<Incoming>,
) -> Response<Body> {
    let peer = if chain.is_empty() {
        None
    } else {
        match app.trust.verify_chain(&chain, PeerRole::Client) {
            Ok(peer) => Some(peer),
            Err(refusal) => {
                app.metrics.refuse(refusal.reason());
                // Read a REST body (bounded) first: answering before it is read makes HTTP/2
                // reset the stream, and some clients then report the reset instead of the
                // 403. A topology stream's body never ends, so it is not waited for.
                if req.uri().path() != "/v1/stream" {
                    let _ = http_body_util::Limited::new(req.into_body(), rest::MAX_BODY)
                        .collect()
                        .await;
                }
                return rest::ApiError::forbidden(format!(
                    "your certificate is no longer trusted: {refusal}"
                ))
                .into_response();
            }
        }
    };
    if req.uri().path() == "/v1/stream" {
        if req.method() != Method::POST {
            return rest::ApiError::method_not_allowed(
                "the topology stream is POST /v1/stream over HTTP/2",
            )
            .into_response();
        }
        let chain = chain.as_ref().clone();
        return crate::stream::handle(app, peer, chain, cert_not_after, req.into_body()).await;
    }
    let caller = Caller {
        admin: bearer_is_admin(&app, &req)
            || peer.as_ref().is_some_and(|p| is_admin_identity(&app, p)),
        peer,
    };
    rest::handle(app, caller, req).await
}

/// Accepts connections on `listener` while `shutdown` is false, closing those over the cap
/// (counted per `name`), and hands each admitted one to `serve`.
pub(crate) async fn accept_loop<F, Fut>(
    app: Arc<App>,
    name: &'static str,
    listener: TcpListener,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
    serve: F,
) where
    F: Fn(TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let cap = ConnectionCap::new(limits.max_connections);
    loop {
        let tcp = tokio::select! {
            _ = shutdown.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(admitted) = cap.try_admit() else {
            app.metrics
                .connections_refused
                .with_label_values(&[name])
                .inc();
            tracing::debug!(
                listener = name,
                max = limits.max_connections,
                "connection refused: the listener is full"
            );
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let work = serve(tcp);
        tokio::spawn(async move {
            let _admitted = admitted;
            work.await;
        });
    }
}

/// Serves the TLS API until `shutdown` flips to true.
pub async fn serve_api(
    app: Arc<App>,
    listener: TcpListener,
    acceptor: MeshAcceptor,
    limits: Limits,
    shutdown: watch::Receiver<bool>,
) {
    accept_loop(app.clone(), "api", listener, limits, shutdown, move |tcp| {
        let (app, acceptor) = (app.clone(), acceptor.clone());
        async move {
            match acceptor.accept(tcp).await {
                Ok(Accepted::Tls { stream, .. }) => {
                    let chain: Vec<CertificateDer<'static>> = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .map(|c| c.to_vec())
                        .unwrap_or_default();
                    let not_after = chain
                        .first()
                        .and_then(|leaf| capmesh_certs::inspect_der(leaf).ok())
                        .and_then(|info| info.not_after.duration_since(std::time::UNIX_EPOCH).ok())
                        .map(|d| d.as_secs() as i64);
                    let chain = Arc::new(chain);
                    listen::serve(*stream, limits, move |req| {
                        dispatch(app.clone(), chain.clone(), not_after, req)
                    })
                    .await;
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
        }
    })
    .await;
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp
}

fn admin_answer(app: &App, path: &str) -> Response<Full<Bytes>> {
    if let Some(page) = crate::dashboard::serve(app, path) {
        return page;
    }
    match path {
        "/live" => text(StatusCode::OK, "ok\n".into()),
        "/ready" if app.ready.load(Ordering::Acquire) => text(StatusCode::OK, "ready\n".into()),
        "/ready" => text(StatusCode::SERVICE_UNAVAILABLE, "starting\n".into()),
        "/metrics" => {
            let (_, agents, caps) = app.registry.counts();
            app.metrics.agents.set(agents as i64);
            app.metrics.capabilities.set(caps as i64);
            text(StatusCode::OK, app.metrics.render())
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "try /live, /ready, /metrics or /dashboard\n".into(),
        ),
    }
}

/// Serves `/live`, `/ready`, `/metrics` and the read-only dashboard (`/dashboard`) over plain
/// HTTP until `shutdown` flips.
pub async fn serve_admin(
    app: Arc<App>,
    listener: TcpListener,
    limits: Limits,
    shutdown: watch::Receiver<bool>,
) {
    accept_loop(
        app.clone(),
        "admin",
        listener,
        limits,
        shutdown,
        move |tcp| {
            let app = app.clone();
            async move {
                listen::serve(tcp, limits, move |req: Request<Incoming>| {
                    let resp = admin_answer(&app, req.uri().path());
                    async move { resp }
                })
                .await;
            }
        },
    )
    .await;
}

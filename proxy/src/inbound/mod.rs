//! Inbound: the local agent as a mesh member, behind mutual TLS on `0.0.0.0:15006`.
//!
//! Three kinds of request arrive from peer proxies (or, in permissive mode, from plaintext
//! clients): mesh calls (`/.capmesh/call`), passthrough conversations
//! (`/.capmesh/passthrough`) and requests for the agent's own paths (transparent mode). One
//! stack serves them all, composed in [`stack`]; [`serve`] accepts connections, terminates TLS
//! per the mode and closes a connection whose peer stops being trusted.

pub mod agent;
pub mod authorize;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use capmesh_certs::{AcceptError, Accepted, MeshAcceptor, Refusal};
use http::{Request, Response};
use hyper::body::Incoming;
use rustls::pki_types::CertificateDer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceBuilder;

use crate::contract::{CALL_PATH, CAPABILITY_HEADER, MAX_REQUEST, PASSTHROUGH_PATH};
use crate::error::ProxyError;
use crate::pool::PeerBody;
use crate::serve::{ConnService, Limits};
use crate::stack::{
    Either, Handled, Handler, Middleware, Next, ReadBody, RespondLayer, Stage, Terminal, call,
    refuse,
};
use crate::{BoxBody, Proxy};

/// Who sent a request: the verified SPIFFE ID, or `None` for a plaintext client permissive
/// mode let in. A request extension from the top of the stack down.
#[derive(Debug, Clone, Default)]
pub struct Caller(pub Option<Arc<str>>);

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_deref().unwrap_or(capmesh_api::UNAUTHENTICATED))
    }
}

/// Which kind of inbound request this is, by its path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Path {
    /// `/.capmesh/call`: one message of a federated call.
    Call,
    /// `/.capmesh/passthrough`: a conversation for this capability.
    Passthrough {
        /// From [`CAPABILITY_HEADER`].
        capability: String,
    },
    /// Any other path: the agent's own (transparent mode).
    Agent,
}

impl Path {
    /// The kind of `req`.
    pub fn of<B>(req: &Request<B>) -> Path {
        match req.uri().path() {
            CALL_PATH => Path::Call,
            PASSTHROUGH_PATH => Path::Passthrough {
                capability: req
                    .headers()
                    .get(CAPABILITY_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned(),
            },
            _ => Path::Agent,
        }
    }
}

/// Who is on the other end of one inbound connection.
#[derive(Debug)]
struct Peer {
    /// The verified SPIFFE ID, or `None` for a permitted plaintext client.
    identity: Option<Arc<str>>,
    chain: Vec<CertificateDer<'static>>,
    /// The trust generation the chain was last verified against.
    verified: AtomicU64,
}

impl Peer {
    /// Re-checks the peer's chain when the trust bundle changed since the last check.
    fn still_trusted(&self, proxy: &Proxy) -> Result<(), Refusal> {
        let current = proxy.identity.trust.generation();
        if self.identity.is_none() || self.verified.load(Ordering::Acquire) == current {
            return Ok(());
        }
        proxy
            .identity
            .trust
            .verify_client_chain(&self.chain)
            .map(|_| self.verified.store(current, Ordering::Release))
    }

    /// Resolves when the peer is no longer trusted (revoked, its CA removed) or its
    /// certificate expires: the connection is then closed, whatever it carries. Woken by the
    /// trust store on every trust change and at the certificate's expiry (no polling).
    async fn distrusted(&self, proxy: &Proxy) {
        if self.identity.is_none() {
            return std::future::pending().await;
        }
        let refusal = proxy
            .identity
            .trust
            .until_refused(&self.chain, capmesh_certs::PeerRole::Client)
            .await;
        tracing::info!(reason = %refusal, "closing an inbound connection: the peer is no longer trusted");
        proxy
            .metrics
            .tls_refusals
            .with_label_values(&[refusal.reason()])
            .inc();
    }
}

/// Verifies, on every request, that the connection's peer is still trusted (a revocation
/// applies to connections already open), and names the caller for the layers below. Mesh
/// paths need a mesh identity.
#[derive(Debug, Clone)]
struct Verify {
    proxy: Arc<Proxy>,
}

impl<S> Middleware<Request<Body>, S> for Verify
where
    S: Next<Request<Body>, Response<BoxBody>>,
{
    type Response = Response<BoxBody>;

    fn handle(self, mut req: Request<Body>, next: S) -> impl Handled<Response<BoxBody>> {
        let proxy = self.proxy;
        let Some(peer) = req.extensions().get::<Arc<Peer>>().cloned() else {
            let e = ProxyError::Internal("a request without its connection".into());
            return Either::Left(refuse(e));
        };
        if let Err(refusal) = peer.still_trusted(&proxy) {
            proxy
                .metrics
                .tls_refusals
                .with_label_values(&[refusal.reason()])
                .inc();
            return Either::Left(refuse(ProxyError::Untrusted(format!(
                "your certificate is no longer trusted by this mesh: {refusal}"
            ))));
        }
        if proxy.agent.is_none() {
            return Either::Left(refuse(ProxyError::NoAgent));
        }
        if peer.identity.is_none() && Path::of(&req) != Path::Agent {
            return Either::Left(refuse(ProxyError::Untrusted(
                "mesh calls need a mesh certificate".into(),
            )));
        }
        req.extensions_mut().insert(Caller(peer.identity.clone()));
        Either::Right(call(next, req))
    }
}

/// A request's body as it arrives: through hyper (HTTP/1, or HTTP/2 without TLS), or on a
/// stream of an HTTP/2 connection served with `h2` directly (a peer proxy's connection, which
/// chose HTTP/2 in its TLS handshake; [`crate::serve::connection_h2`]).
pub type Body = http_body_util::Either<Incoming, PeerBody>;

/// The inbound listener's stack, top to bottom.
pub fn stack(proxy: &Arc<Proxy>) -> impl Next<Request<Body>, Response<BoxBody>> {
    ServiceBuilder::new()
        // Still trusted (a revocation ends open connections' calls too); the caller named.
        .layer(Stage(Verify {
            proxy: proxy.clone(),
        }))
        // Bounded: every message is read to be authorized.
        .layer(Stage(ReadBody { limit: MAX_REQUEST }))
        // The hop's server span when sampled (a refusal below is recorded too); the agent
        // sees this span's id in traceparent.
        .layer(Stage(crate::trace::ServerSpan::new(proxy.clone())))
        // One decision for every message on every path; fails closed.
        .layer(Stage(authorize::Authorize::new(
            proxy.authz.clone(),
            Some(proxy.metrics.inbound.clone()),
        )))
        .service(Terminal(Route {
            call: ServiceBuilder::new()
                // The proxy's own session with the agent, shared by callers; the agent's
                // requests to a caller sealed for that caller.
                .layer(Stage(agent::Shared::new(proxy.clone())))
                .service(Terminal(agent::AgentClient::new(proxy.clone()))),
            conversation: ServiceBuilder::new()
                // The caller's own session: the agent's session ids sealed for the caller.
                .layer(Stage(agent::Owned::new(proxy.clone())))
                .service(Terminal(agent::AgentClient::new(proxy.clone()))),
        }))
}

/// Mesh calls to the shared session; passthrough and the agent's own paths to the caller's.
#[derive(Debug, Clone)]
struct Route<C, O> {
    call: C,
    conversation: O,
}

impl<C, O> Handler<Request<Bytes>> for Route<C, O>
where
    C: Next<Request<Bytes>, Response<BoxBody>>,
    O: Next<Request<Bytes>, Response<BoxBody>>,
{
    type Response = Response<BoxBody>;
    fn serve(self, req: Request<Bytes>) -> impl Handled<Response<BoxBody>> {
        if req.uri().path() == CALL_PATH {
            Either::Left(call(self.call, req))
        } else {
            Either::Right(call(self.conversation, req))
        }
    }
}

/// Serves the inbound listener until `drain`; then stops accepting and lets in-flight calls
/// finish (bounded by `grace`). Each worker thread runs one, on its own handle to the
/// listener, all sharing the listener's `gate`.
pub async fn serve(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    gate: crate::serve::Gate,
    acceptor: MeshAcceptor,
    limits: Limits,
    drain: watch::Receiver<bool>,
    grace: Duration,
) {
    let svc = ServiceBuilder::new()
        // Errors become responses here, and only here.
        .layer(RespondLayer)
        .service(stack(&proxy));
    let serve = |tcp| {
        let (proxy, acceptor, svc, drain) =
            (proxy.clone(), acceptor.clone(), svc.clone(), drain.clone());
        connection(proxy, acceptor, tcp, svc, limits, drain)
    };
    crate::serve::accept("inbound", listener, gate, drain.clone(), grace, serve).await;
}

async fn connection<S>(
    proxy: Arc<Proxy>,
    acceptor: MeshAcceptor,
    tcp: tokio::net::TcpStream,
    svc: S,
    limits: Limits,
    drain: watch::Receiver<bool>,
) where
    S: ConnService<Body>,
{
    let handshakes = &proxy.metrics.tls_handshakes;
    let (io, peer) =
        match tokio::time::timeout(limits.header_read_timeout, acceptor.accept(tcp)).await {
            Err(_) => {
                tracing::debug!("inbound handshake timed out");
                return;
            }
            Ok(Ok(Accepted::Tls { stream, peer })) => {
                handshakes.with_label_values(&["mtls"]).inc();
                let chain = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .map(|c| c.to_vec())
                    .unwrap_or_default();
                let peer = Peer {
                    identity: peer.map(|p| Arc::from(p.to_string())),
                    chain,
                    verified: AtomicU64::new(proxy.identity.trust.generation()),
                };
                (Io::Tls(stream), peer)
            }
            Ok(Ok(Accepted::Plain(tcp))) => {
                handshakes.with_label_values(&["plaintext"]).inc();
                let peer = Peer {
                    identity: None,
                    chain: vec![],
                    verified: AtomicU64::new(0),
                };
                (Io::Plain(tcp), peer)
            }
            Ok(Err(AcceptError::Refused(r))) => {
                proxy
                    .metrics
                    .tls_refusals
                    .with_label_values(&[r.reason()])
                    .inc();
                tracing::info!(reason = %r, "inbound connection refused");
                return;
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "inbound handshake failed");
                return;
            }
        };
    let peer = Arc::new(peer);
    let for_requests = peer.clone();
    let distrusted = async { peer.distrusted(&proxy).await };
    let h2 = matches!(&io, Io::Tls(s) if s.get_ref().1.alpn_protocol() == Some(b"h2"));
    match io {
        // Peer proxies: their pooled HTTP/2 connections, served without a task per stream.
        Io::Tls(s) if h2 => {
            let svc = tower::util::MapRequest::new(svc, move |req: Request<PeerBody>| {
                let mut req = req.map(Body::Right);
                req.extensions_mut().insert(for_requests.clone());
                req
            });
            crate::serve::connection_h2(s, svc, limits, drain, distrusted).await;
        }
        io => {
            let svc = tower::util::MapRequest::new(svc, move |req: Request<Incoming>| {
                let mut req = req.map(Body::Left);
                req.extensions_mut().insert(for_requests.clone());
                req
            });
            match io {
                Io::Tls(s) => {
                    crate::serve::connection_until(s, svc, limits, drain, distrusted).await;
                }
                Io::Plain(s) => {
                    crate::serve::connection_until(s, svc, limits, drain, distrusted).await;
                }
            }
        }
    }
}

enum Io {
    Tls(Box<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>),
    Plain(tokio::net::TcpStream),
}

//! Connections to other proxies: one HTTP/2 connection over mutual TLS per peer, shared by
//! every request to it, and the peer's SPIFFE ID checked against the snapshot's.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use capmesh_certs::{CredentialCell, Refusal, SpiffeId, TrustStore};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::BoxBody;

/// Why a request to a peer got no response headers. [`PeerError::may_have_reached`] tells
/// whether the peer can have processed it: only [`PeerError::Reset`] may have.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// TCP connect failed (refused, unreachable).
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The peer.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// Connecting or the handshake took too long.
    #[error("connecting to {addr} timed out after {after:?}")]
    Timeout {
        /// The peer.
        addr: String,
        /// The limit.
        after: Duration,
    },
    /// The TLS handshake failed or the peer is not who the snapshot says.
    #[error("TLS with {addr} failed: {detail}")]
    Tls {
        /// The peer.
        addr: String,
        /// What the handshake said.
        detail: String,
    },
    /// The snapshot's identity for the endpoint is not a SPIFFE ID.
    #[error("endpoint identity \"{0}\" is not a SPIFFE ID")]
    BadIdentity(String),
    /// The connection failed before the request was written: nothing reached the peer.
    #[error("HTTP/2 with {addr} failed before the request was sent: {source}")]
    NotSent {
        /// The peer.
        addr: String,
        /// Why.
        source: hyper::Error,
    },
    /// The peer refused the request without processing it (HTTP/2 `REFUSED_STREAM`, a graceful
    /// `GOAWAY` that did not cover it), or the connection failed before the peer ever spoke on
    /// it (it refused our certificate).
    #[error("{addr} refused the request unprocessed: {source}")]
    Refused {
        /// The peer.
        addr: String,
        /// Why.
        source: hyper::Error,
    },
    /// The request was sent, then the exchange failed before response headers: the peer may
    /// have processed it.
    #[error("{addr} reset the request after it was sent: {source}")]
    Reset {
        /// The peer.
        addr: String,
        /// Why.
        source: hyper::Error,
    },
}

impl PeerError {
    /// Whether the peer can have processed the request.
    pub fn may_have_reached(&self) -> bool {
        matches!(self, PeerError::Reset { .. })
    }

    /// Sorts a failed send: unsent (the request came back), refused by the peer unprocessed,
    /// or reset after it was sent.
    fn from_send(addr: &str, unsent: bool, heard: bool, source: hyper::Error) -> Self {
        let addr = addr.to_owned();
        if unsent {
            return PeerError::NotSent { addr, source };
        }
        let refused = !heard || refused_stream(&source);
        if refused {
            PeerError::Refused { addr, source }
        } else {
            PeerError::Reset { addr, source }
        }
    }
}

/// Whether a failure after the request was written proves the peer did not process it: it
/// refused the stream (HTTP/2 `REFUSED_STREAM`, or a graceful `GOAWAY` that did not cover it).
fn refused_stream(source: &hyper::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(source);
    while let Some(e) = cause {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h2.is_go_away() && h2.reason() == Some(h2::Reason::NO_ERROR));
        }
        cause = e.source();
    }
    false
}

/// The TLS stream to a peer, noting whether the peer has sent it anything. An HTTP/2 server
/// sends its SETTINGS before it serves a stream, so a connection that failed before a single
/// byte came back was never accepted (with TLS 1.3 a server that refuses the client's
/// certificate says so only after the client sent its first request): nothing on it reached
/// an agent.
struct Heard<T> {
    io: T,
    heard: Arc<AtomicBool>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Heard<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.heard.store(true, Ordering::Release);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Heard<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// One pooled connection: its sender, and whether the peer has spoken on it.
#[derive(Debug, Clone)]
struct Conn {
    sender: SendRequest<BoxBody>,
    heard: Arc<AtomicBool>,
}

type Slot = Arc<tokio::sync::Mutex<Option<Conn>>>;

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// HTTP/2 connections to peer proxies, keyed by address and expected identity.
#[derive(Debug)]
pub struct PeerPool {
    cell: Arc<CredentialCell>,
    trust: Arc<TrustStore>,
    /// TCP connect and TLS handshake, in milliseconds (the mesh settings' `connect_timeout_ms`).
    connect_timeout_ms: AtomicU64,
    /// address → expected identity → connection (looked up without allocating).
    slots: Mutex<HashMap<String, HashMap<String, Slot>>>,
    configs: Mutex<HashMap<String, Arc<rustls::ClientConfig>>>,
}

impl PeerPool {
    /// A pool presenting `cell`'s certificate and verifying peers against `trust`.
    pub fn new(
        cell: Arc<CredentialCell>,
        trust: Arc<TrustStore>,
        connect_timeout: Duration,
    ) -> Self {
        Self {
            cell,
            trust,
            connect_timeout_ms: AtomicU64::new(millis(connect_timeout)),
            slots: Mutex::new(HashMap::new()),
            configs: Mutex::new(HashMap::new()),
        }
    }

    /// Changes the connect time-out for new connections (the mesh settings changed).
    pub fn set_connect_timeout(&self, timeout: Duration) {
        self.connect_timeout_ms
            .store(millis(timeout), Ordering::Relaxed);
    }

    fn config(&self, identity: &str) -> Result<Arc<rustls::ClientConfig>, PeerError> {
        let mut configs = self.configs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = configs.get(identity) {
            return Ok(c.clone());
        }
        let expected: SpiffeId = identity
            .parse()
            .map_err(|_| PeerError::BadIdentity(identity.to_owned()))?;
        let config = capmesh_certs::tls::client_config(
            Some(self.cell.clone()),
            self.trust.clone(),
            expected,
            &[b"h2"],
        )
        .map_err(|e| PeerError::Tls {
            addr: String::new(),
            detail: e.to_string(),
        })?;
        configs.insert(identity.to_owned(), config.clone());
        Ok(config)
    }

    async fn connect(&self, addr: &str, identity: &str) -> Result<Conn, PeerError> {
        let config = self.config(identity)?;
        let timeout = Duration::from_millis(self.connect_timeout_ms.load(Ordering::Relaxed));
        let work = async {
            let tcp = TcpStream::connect(addr)
                .await
                .map_err(|source| PeerError::Connect {
                    addr: addr.to_owned(),
                    source,
                })?;
            let _ = tcp.set_nodelay(true);
            let tls = capmesh_certs::tls::connect(config, tcp)
                .await
                .map_err(|e| PeerError::Tls {
                    addr: addr.to_owned(),
                    detail: Refusal::from_io_error(&e)
                        .map(|r| r.to_string())
                        .unwrap_or_else(|| e.to_string()),
                })?;
            let server_chain: Vec<_> = tls
                .get_ref()
                .1
                .peer_certificates()
                .map(|c| c.to_vec())
                .unwrap_or_default();
            let heard = Arc::new(AtomicBool::new(false));
            let tls = Heard {
                io: tls,
                heard: heard.clone(),
            };
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(20))
                .initial_stream_window_size(1024 * 1024)
                .initial_connection_window_size(4 * 1024 * 1024)
                .handshake(TokioIo::new(tls))
                .await
                .map_err(|source| PeerError::NotSent {
                    addr: addr.to_owned(),
                    source,
                })?;
            let peer = addr.to_owned();
            let (trust, chain) = (self.trust.clone(), server_chain);
            // Boxed as a plain `Send` future: rustc cannot prove hyper's connection `Send`
            // through the generic select otherwise.
            let conn: std::pin::Pin<Box<dyn Future<Output = hyper::Result<()>> + Send>> =
                Box::pin(conn);
            tokio::spawn(async move {
                // A provider revoked (or expired) while pooled: its connection closes.
                let role = capmesh_certs::PeerRole::Server;
                let ended = crate::identity::while_trusted(&trust, &chain, role, conn).await;
                if let Some(Err(e)) = ended {
                    tracing::debug!(peer = %peer, error = %e, "peer connection ended");
                }
            });
            Ok(Conn { sender, heard })
        };
        tokio::time::timeout(timeout, work)
            .await
            .unwrap_or_else(|_| {
                Err(PeerError::Timeout {
                    addr: addr.to_owned(),
                    after: timeout,
                })
            })
    }

    async fn sender(&self, addr: &str, identity: &str) -> Result<Conn, PeerError> {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            match slots.get(addr).and_then(|ids| ids.get(identity)) {
                Some(slot) => slot.clone(),
                None => slots
                    .entry(addr.to_owned())
                    .or_default()
                    .entry(identity.to_owned())
                    .or_default()
                    .clone(),
            }
        };
        let mut guard = slot.lock().await;
        if let Some(conn) = guard.as_ref()
            && !conn.sender.is_closed()
        {
            return Ok(conn.clone());
        }
        let conn = self.connect(addr, identity).await?;
        *guard = Some(conn.clone());
        Ok(conn)
    }

    /// Sends `req` to the proxy at `addr`, which must prove `identity`. The error says whether
    /// the request can have reached the peer ([`PeerError::may_have_reached`]).
    pub async fn send(
        &self,
        addr: &str,
        identity: &str,
        req: Request<BoxBody>,
    ) -> Result<Response<Incoming>, PeerError> {
        let Conn { mut sender, heard } = self.sender(addr, identity).await?;
        sender
            .ready()
            .await
            .map_err(|source| PeerError::from_send(addr, true, false, source))?;
        sender.try_send_request(req).await.map_err(|mut e| {
            let unsent = e.take_message().is_some();
            let heard = heard.load(Ordering::Acquire);
            PeerError::from_send(addr, unsent, heard, e.into_error())
        })
    }

    /// Drops pooled connections to peers that are no longer in the snapshot.
    pub fn retain(&self, keep: impl Fn(&str, &str) -> bool) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        for (addr, ids) in slots.iter_mut() {
            ids.retain(|id, _| keep(addr, id));
        }
        slots.retain(|_, ids| !ids.is_empty());
    }
}

//! Connections to other proxies: one HTTP/2 connection over mutual TLS per peer, shared by
//! every request to it, and the peer's SPIFFE ID checked against the snapshot's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capmesh_certs::{CredentialCell, Refusal, SpiffeId, TrustStore};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::BoxBody;

/// Why a request never got response headers from a peer. All of these are safe to retry on
/// another endpoint except [`PeerError::Http`] after the request body was sent, which the
/// caller judges.
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
    #[error("endpoint identity {0:?} is not a SPIFFE ID")]
    BadIdentity(String),
    /// HTTP/2 failed (connection reset, stream reset before response headers).
    #[error("HTTP/2 with {addr}: {source}")]
    Http {
        /// The peer.
        addr: String,
        /// Why.
        source: hyper::Error,
    },
}

type Slot = Arc<tokio::sync::Mutex<Option<SendRequest<BoxBody>>>>;

/// HTTP/2 connections to peer proxies, keyed by address and expected identity.
#[derive(Debug)]
pub struct PeerPool {
    cell: Arc<CredentialCell>,
    trust: Arc<TrustStore>,
    connect_timeout: Duration,
    slots: Mutex<HashMap<(String, String), Slot>>,
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
            connect_timeout,
            slots: Mutex::new(HashMap::new()),
            configs: Mutex::new(HashMap::new()),
        }
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

    async fn connect(&self, addr: &str, identity: &str) -> Result<SendRequest<BoxBody>, PeerError> {
        let config = self.config(identity)?;
        let timeout = self.connect_timeout;
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
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(20))
                .initial_stream_window_size(1024 * 1024)
                .initial_connection_window_size(4 * 1024 * 1024)
                .handshake(TokioIo::new(tls))
                .await
                .map_err(|source| PeerError::Http {
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
            Ok(sender)
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

    async fn sender(&self, addr: &str, identity: &str) -> Result<SendRequest<BoxBody>, PeerError> {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            slots
                .entry((addr.to_owned(), identity.to_owned()))
                .or_default()
                .clone()
        };
        let mut guard = slot.lock().await;
        if let Some(sender) = guard.as_ref()
            && !sender.is_closed()
        {
            return Ok(sender.clone());
        }
        let sender = self.connect(addr, identity).await?;
        *guard = Some(sender.clone());
        Ok(sender)
    }

    /// A connection to the proxy at `addr` (which must prove `identity`), ready for one more
    /// request. Failing here means nothing was sent, so another endpoint may be tried.
    pub async fn ready(
        &self,
        addr: &str,
        identity: &str,
    ) -> Result<SendRequest<BoxBody>, PeerError> {
        let mut sender = self.sender(addr, identity).await?;
        sender.ready().await.map_err(|source| PeerError::Http {
            addr: addr.to_owned(),
            source,
        })?;
        Ok(sender)
    }

    /// Sends `req` to the proxy at `addr`, which must prove `identity`.
    pub async fn send(
        &self,
        addr: &str,
        identity: &str,
        req: Request<BoxBody>,
    ) -> Result<Response<Incoming>, PeerError> {
        let mut sender = self.sender(addr, identity).await?;
        sender.ready().await.map_err(|source| PeerError::Http {
            addr: addr.to_owned(),
            source,
        })?;
        sender
            .send_request(req)
            .await
            .map_err(|source| PeerError::Http {
                addr: addr.to_owned(),
                source,
            })
    }

    /// Drops pooled connections to peers that are no longer in the snapshot.
    pub fn retain(&self, keep: impl Fn(&str, &str) -> bool) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.retain(|(addr, id), _| keep(addr, id));
    }
}

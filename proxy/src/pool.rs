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
    /// The peer refused the stream without processing it (HTTP/2 `REFUSED_STREAM`, or a
    /// graceful `GOAWAY` that did not cover it).
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
    fn from_send(addr: &str, unsent: bool, source: hyper::Error) -> Self {
        let addr = addr.to_owned();
        if unsent {
            return PeerError::NotSent { addr, source };
        }
        let refused = {
            let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&source);
            let mut found = false;
            while let Some(e) = cause {
                if let Some(h2) = e.downcast_ref::<h2::Error>() {
                    found = h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                        || (h2.is_go_away() && h2.reason() == Some(h2::Reason::NO_ERROR));
                    break;
                }
                cause = e.source();
            }
            found
        };
        if refused {
            PeerError::Refused { addr, source }
        } else {
            PeerError::Reset { addr, source }
        }
    }
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
            tokio::spawn(async move {
                if let Err(e) = conn.await {
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

    /// Sends `req` to the proxy at `addr`, which must prove `identity`. The error says whether
    /// the request can have reached the peer ([`PeerError::may_have_reached`]).
    pub async fn send(
        &self,
        addr: &str,
        identity: &str,
        req: Request<BoxBody>,
    ) -> Result<Response<Incoming>, PeerError> {
        let mut sender = self.sender(addr, identity).await?;
        sender
            .ready()
            .await
            .map_err(|source| PeerError::from_send(addr, true, source))?;
        sender.try_send_request(req).await.map_err(|mut e| {
            let unsent = e.take_message().is_some();
            PeerError::from_send(addr, unsent, e.into_error())
        })
    }

    /// Drops pooled connections to peers that are no longer in the snapshot.
    pub fn retain(&self, keep: impl Fn(&str, &str) -> bool) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.retain(|(addr, id), _| keep(addr, id));
    }
}

//! Reaching the control plane: TCP, then TLS with the server checked one of two ways. With
//! several replicas, each call goes to the one that answered last and moves on to the next
//! address at once when it does not.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use capmesh_certs::inspect::certs_from_pem;
use capmesh_certs::tls::{client_config, provider};
use capmesh_certs::{CredentialCell, Refusal, SpiffeId, TrustStore};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::addr::{ControlPlaneAddrs, Host};
use crate::{ClientError, ControlPlaneUrl};

/// How long TCP connect plus TLS handshake may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one address may take when there are others to try: a replica on a node that
/// vanished does not hold up the move to a live one.
pub const CONNECT_TIMEOUT_PER_ADDRESS: Duration = Duration::from_millis(800);

/// The protocols offered: HTTP/2 for the stream (and REST), HTTP/1.1 for REST through
/// anything that only speaks that.
const ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

/// How the client decides that the server is the control plane.
#[derive(Debug, Clone)]
pub enum ServerCheck {
    /// The server's certificate must chain to the mesh trust store and carry exactly this
    /// SPIFFE ID (what proxies do).
    Spiffe(SpiffeId),
    /// Standard web PKI verification of the URL's host name against this CA bundle (PEM),
    /// what the CLI does with `--control-plane-ca`.
    Hostname {
        /// The CA certificates to trust, PEM.
        ca_pem: String,
    },
}

/// A client of one control plane (one or several replicas). Cheap to clone (clones share which
/// replica answered last); every call opens its own connection.
#[derive(Debug, Clone)]
pub struct ControlPlaneClient {
    addrs: ControlPlaneAddrs,
    preferred: Arc<AtomicUsize>,
    tls: Arc<ClientConfig>,
}

impl ControlPlaneClient {
    /// A client for the control plane at `url`.
    ///
    /// With [`ServerCheck::Spiffe`], `trust` is required and `cell`, when given, is presented
    /// as the client certificate (a proxy's mesh certificate, rotated in place). With
    /// [`ServerCheck::Hostname`], `trust` is not used and no client certificate can be
    /// presented.
    pub fn new(
        addrs: impl Into<ControlPlaneAddrs>,
        check: ServerCheck,
        trust: Option<Arc<TrustStore>>,
        cell: Option<Arc<CredentialCell>>,
    ) -> Result<Self, ClientError> {
        let tls = match check {
            ServerCheck::Spiffe(expected) => {
                let trust = trust.ok_or(ClientError::MissingTrust)?;
                client_config(cell, trust, expected, ALPN)?
            }
            ServerCheck::Hostname { ca_pem } => {
                if cell.is_some() {
                    return Err(ClientError::ClientCertUnsupported);
                }
                hostname_config(&ca_pem)?
            }
        };
        let preferred = Arc::new(AtomicUsize::new(0));
        Ok(Self {
            addrs: addrs.into(),
            preferred,
            tls,
        })
    }

    /// The replica tried first: the one that answered last (at first, the first given).
    pub fn url(&self) -> &ControlPlaneUrl {
        let urls = self.addrs.urls();
        &urls[self.preferred.load(Ordering::Relaxed) % urls.len()]
    }

    /// Every address given.
    pub fn addrs(&self) -> &ControlPlaneAddrs {
        &self.addrs
    }

    /// A new TLS connection to the first replica that takes it, starting with the one that
    /// answered last, and that replica's URL. When none does, the last failure.
    pub(crate) async fn connect(
        &self,
    ) -> Result<(TlsStream<TcpStream>, ControlPlaneUrl), ClientError> {
        let urls = self.addrs.urls();
        let start = self.preferred.load(Ordering::Relaxed);
        let several = urls.len() > 1;
        let mut last = None;
        for k in 0..urls.len() {
            let i = (start + k) % urls.len();
            match self.connect_url(&urls[i], several).await {
                Ok(tls) => {
                    self.preferred.store(i, Ordering::Relaxed);
                    return Ok((tls, urls[i].clone()));
                }
                Err(e) => {
                    if several {
                        tracing::debug!(url = %urls[i], error = %e, "control-plane replica unreachable; trying the next");
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| ClientError::Timeout {
            url: self.addrs.to_string(),
            stage: "connecting to",
            after: CONNECT_TIMEOUT,
        }))
    }

    /// One URL: each of its addresses in turn (a name may resolve to several replicas).
    async fn connect_url(
        &self,
        url: &ControlPlaneUrl,
        several: bool,
    ) -> Result<TlsStream<TcpStream>, ClientError> {
        let shown = url.to_string();
        let targets: Vec<SocketAddr> = match url.host() {
            Host::Ip(ip) => vec![SocketAddr::new(*ip, url.port())],
            Host::Name(_) => {
                let resolving = tokio::net::lookup_host(url.dial_target());
                match tokio::time::timeout(CONNECT_TIMEOUT, resolving).await {
                    Ok(Ok(addrs)) => spread(addrs.collect()),
                    Ok(Err(source)) => {
                        return Err(ClientError::Connect { url: shown, source });
                    }
                    Err(_) => {
                        return Err(ClientError::Timeout {
                            url: shown,
                            stage: "resolving",
                            after: CONNECT_TIMEOUT,
                        });
                    }
                }
            }
        };
        let limit = if several || targets.len() > 1 {
            CONNECT_TIMEOUT_PER_ADDRESS
        } else {
            CONNECT_TIMEOUT
        };
        let mut last = None;
        for target in targets {
            match tokio::time::timeout(limit, self.handshake(url, target)).await {
                Ok(Ok(tls)) => return Ok(tls),
                Ok(Err(e)) => last = Some(e),
                Err(_) => {
                    last = Some(ClientError::Timeout {
                        url: shown.clone(),
                        stage: "connecting to",
                        after: limit,
                    })
                }
            }
        }
        Err(last.unwrap_or_else(|| ClientError::Connect {
            url: shown,
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the name resolved to no address",
            ),
        }))
    }

    async fn handshake(
        &self,
        url: &ControlPlaneUrl,
        target: SocketAddr,
    ) -> Result<TlsStream<TcpStream>, ClientError> {
        let shown = url.to_string();
        let tcp = TcpStream::connect(target)
            .await
            .map_err(|source| ClientError::Connect {
                url: shown.clone(),
                source,
            })?;
        // Frames are small and latency matters more than packet count.
        tcp.set_nodelay(true)
            .map_err(|source| ClientError::Connect {
                url: shown.clone(),
                source,
            })?;
        TlsConnector::from(self.tls.clone())
            .connect(url.server_name(), tcp)
            .await
            .map_err(|source| match Refusal::from_io_error(&source) {
                Some(refusal) => ClientError::Refused {
                    url: shown.clone(),
                    refusal,
                },
                None => ClientError::Handshake {
                    url: shown.clone(),
                    source,
                },
            })
    }
}

/// The addresses a name resolved to, rotated by a random amount: proxies given one name for
/// several replicas spread over them.
fn spread(mut addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
    use std::hash::{BuildHasher, RandomState};
    if addrs.len() > 1 {
        let n = RandomState::new().hash_one(std::time::SystemTime::now()) as usize % addrs.len();
        addrs.rotate_left(n);
    }
    addrs
}

/// Whether the server agreed to HTTP/2.
pub(crate) fn negotiated_h2(tls: &TlsStream<TcpStream>) -> bool {
    tls.get_ref().1.alpn_protocol() == Some(b"h2")
}

/// Runs a client connection to its end; the request's own result reports any failure that
/// matters to the caller, so this only leaves a trace.
pub(crate) async fn drive<F: Future<Output = hyper::Result<()>>>(what: &'static str, conn: F) {
    if let Err(e) = conn.await {
        tracing::debug!(connection = what, error = %e, "control plane connection ended");
    }
}

/// A client connection's task, stopped when its guard is dropped: a finished call, a timeout
/// or a reconnect never leaves a connection behind.
#[derive(Debug)]
pub(crate) struct ConnTask(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for ConnTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A web-PKI client config trusting only the given CAs (TLS 1.3, no client certificate).
fn hostname_config(ca_pem: &str) -> Result<Arc<ClientConfig>, ClientError> {
    let mut roots = RootCertStore::empty();
    let certs = certs_from_pem(ca_pem).map_err(|e| ClientError::CaBundle {
        detail: e.to_string(),
    })?;
    for cert in certs {
        roots.add(cert).map_err(|e| ClientError::CaBundle {
            detail: format!("a certificate is not usable as a CA: {e}"),
        })?;
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Tls(capmesh_certs::CertError::Tls(e)))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hostname_check() -> ServerCheck {
        let ca = capmesh_certs::Ca::generate(
            capmesh_api::TrustDomain::new("capmesh.local").unwrap(),
            false,
        )
        .unwrap();
        ServerCheck::Hostname {
            ca_pem: ca.root_pem().to_owned(),
        }
    }

    #[tokio::test]
    async fn a_dead_replica_is_skipped_for_the_next_address() {
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // A live port: the TCP connection succeeds (the TLS handshake fails on garbage, which
        // is enough to tell the two apart).
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live_port = live.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = live.accept().await {
                use tokio::io::AsyncWriteExt;
                let _ = tcp.write_all(b"not tls\r\n").await;
            }
        });
        let addrs: ControlPlaneAddrs =
            format!("https://127.0.0.1:{dead},https://127.0.0.1:{live_port}")
                .parse()
                .unwrap();
        let client = ControlPlaneClient::new(addrs, hostname_check(), None, None).unwrap();
        assert_eq!(client.url().port(), dead);
        let err = client.connect().await.map(|_| ()).unwrap_err();
        // Both were tried: the error is the live one's handshake, not the dead one's refusal.
        assert!(
            matches!(&err, ClientError::Handshake { url, .. } if url.ends_with(&live_port.to_string())),
            "{err}"
        );
        let started = std::time::Instant::now();
        let _ = client.connect().await;
        assert!(
            started.elapsed() < CONNECT_TIMEOUT,
            "a refused port fails fast"
        );
    }

    fn url() -> ControlPlaneUrl {
        "https://127.0.0.1:1".parse().unwrap()
    }

    #[test]
    fn spiffe_checking_needs_a_trust_store() {
        let id: SpiffeId = "spiffe://capmesh.local/ns/capmesh/agent/control-plane"
            .parse()
            .unwrap();
        let err = ControlPlaneClient::new(url(), ServerCheck::Spiffe(id), None, None).unwrap_err();
        assert!(matches!(err, ClientError::MissingTrust), "{err}");
    }

    #[test]
    fn a_bad_ca_bundle_names_the_flag() {
        let check = ServerCheck::Hostname {
            ca_pem: "not a certificate".into(),
        };
        let err = ControlPlaneClient::new(url(), check, None, None).unwrap_err();
        assert!(err.to_string().starts_with("--control-plane-ca: "), "{err}");
    }

    #[tokio::test]
    async fn a_closed_port_is_a_connect_error_naming_the_url() {
        // Bind then drop, so the port is very likely closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url: ControlPlaneUrl = format!("https://127.0.0.1:{port}").parse().unwrap();
        let ca = capmesh_certs::Ca::generate(
            capmesh_api::TrustDomain::new("capmesh.local").unwrap(),
            false,
        )
        .unwrap();
        let check = ServerCheck::Hostname {
            ca_pem: ca.root_pem().to_owned(),
        };
        let client = ControlPlaneClient::new(url, check, None, None).unwrap();
        let err = client.connect().await.map(|_| ()).unwrap_err();
        assert!(matches!(err, ClientError::Connect { .. }), "{err}");
        assert!(
            err.to_string()
                .contains(&format!("https://127.0.0.1:{port}")),
            "{err}"
        );
    }
}

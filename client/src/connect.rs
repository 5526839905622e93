//! Reaching the control plane: TCP, then TLS with the server checked one of two ways.

use std::sync::Arc;
use std::time::Duration;

use capmesh_certs::inspect::certs_from_pem;
use capmesh_certs::tls::{client_config, provider};
use capmesh_certs::{CredentialCell, Refusal, SpiffeId, TrustStore};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::{ClientError, ControlPlaneUrl};

/// How long TCP connect plus TLS handshake may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

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

/// A client of one control plane. Cheap to clone; every call opens its own connection.
#[derive(Debug, Clone)]
pub struct ControlPlaneClient {
    url: ControlPlaneUrl,
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
        url: ControlPlaneUrl,
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
        Ok(Self { url, tls })
    }

    /// The control plane's URL.
    pub fn url(&self) -> &ControlPlaneUrl {
        &self.url
    }

    /// A new TLS connection, with the ALPN protocol the server picked, if any.
    pub(crate) async fn connect(&self) -> Result<TlsStream<TcpStream>, ClientError> {
        let url = self.url.to_string();
        let work = async {
            let tcp = TcpStream::connect(self.url.dial_target())
                .await
                .map_err(|source| ClientError::Connect {
                    url: url.clone(),
                    source,
                })?;
            // Frames are small and latency matters more than packet count.
            tcp.set_nodelay(true)
                .map_err(|source| ClientError::Connect {
                    url: url.clone(),
                    source,
                })?;
            TlsConnector::from(self.tls.clone())
                .connect(self.url.server_name(), tcp)
                .await
                .map_err(|source| match Refusal::from_io_error(&source) {
                    Some(refusal) => ClientError::Refused {
                        url: url.clone(),
                        refusal,
                    },
                    None => ClientError::Handshake {
                        url: url.clone(),
                        source,
                    },
                })
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, work).await {
            Ok(result) => result,
            Err(_) => Err(ClientError::Timeout {
                url,
                stage: "connecting to",
                after: CONNECT_TIMEOUT,
            }),
        }
    }
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
        let err = client.connect().await.unwrap_err();
        assert!(matches!(err, ClientError::Connect { .. }), "{err}");
        assert!(
            err.to_string()
                .contains(&format!("https://127.0.0.1:{port}")),
            "{err}"
        );
    }
}

//! rustls configurations for the mesh, and an acceptor that applies the listener's TLS mode.

use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, ServerConfig};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::credential::CellResolver;
use crate::inspect::identity_of;
use crate::verify::{MeshClientVerifier, MeshServerVerifier, Refusal};
use crate::{CertError, CredentialCell, SpiffeId, TrustStore};

/// How a listener treats inbound connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// Only mutual TLS with a valid mesh certificate.
    #[default]
    Strict,
    /// Mutual TLS, or plaintext marked unauthenticated. A certificate that is presented must
    /// still be valid.
    Permissive,
    /// No TLS at all (development only).
    Off,
}

impl FromStr for TlsMode {
    type Err = CertError;
    fn from_str(s: &str) -> Result<Self, CertError> {
        match s {
            "strict" => Ok(TlsMode::Strict),
            "permissive" => Ok(TlsMode::Permissive),
            "off" => Ok(TlsMode::Off),
            other => Err(CertError::BadTlsMode(other.to_owned())),
        }
    }
}

impl std::fmt::Display for TlsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TlsMode::Strict => "strict",
            TlsMode::Permissive => "permissive",
            TlsMode::Off => "off",
        })
    }
}

/// The one crypto provider (ring): the mesh speaks TLS 1.3 with ECDSA P-256 everywhere.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// A server config presenting the cell's credential. With `client_auth_mandatory`, clients
/// must present a valid mesh certificate; without, one is optional but checked when present.
pub fn server_config(
    cell: Arc<CredentialCell>,
    trust: Arc<TrustStore>,
    client_auth_mandatory: bool,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, CertError> {
    build_server_config(cell, trust, client_auth_mandatory, false, alpn)
}

fn build_server_config(
    cell: Arc<CredentialCell>,
    trust: Arc<TrustStore>,
    client_auth_mandatory: bool,
    deferred: bool,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, CertError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(CertError::Tls)?
        .with_client_cert_verifier(Arc::new(MeshClientVerifier {
            trust,
            mandatory: client_auth_mandatory,
            deferred,
        }))
        .with_cert_resolver(Arc::new(CellResolver(cell)));
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// A client config that presents the cell's credential (when given) and accepts only a server
/// whose SPIFFE ID is `expected`.
pub fn client_config(
    cell: Option<Arc<CredentialCell>>,
    trust: Arc<TrustStore>,
    expected: SpiffeId,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, CertError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(CertError::Tls)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(MeshServerVerifier { trust, expected }));
    let mut config = match cell {
        Some(cell) => builder.with_client_cert_resolver(Arc::new(CellResolver(cell))),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// Connects over mutual TLS to a peer that must be `config`'s expected identity. Errors carry
/// the [`Refusal`] when the handshake was refused (see [`Refusal::from_io_error`]).
pub async fn connect(
    config: Arc<ClientConfig>,
    tcp: TcpStream,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    // The server name is not checked (identity is the SPIFFE ID); any valid name will do.
    let name = rustls::pki_types::ServerName::try_from("capmesh.mesh")
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    TlsConnector::from(config).connect(name, tcp).await
}

/// An accepted inbound connection.
#[derive(Debug)]
pub enum Accepted {
    /// Mutual TLS (or server-only TLS in permissive mode); `peer` is the verified client
    /// identity, `None` when the client presented no certificate.
    Tls {
        /// The decrypted stream.
        stream: Box<tokio_rustls::server::TlsStream<TcpStream>>,
        /// The client's verified identity.
        peer: Option<SpiffeId>,
    },
    /// Plaintext, allowed by the listener's mode; the caller is unauthenticated.
    Plain(TcpStream),
}

/// Why an inbound connection was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    /// The connection broke a TLS rule.
    #[error("connection refused: {0}")]
    Refused(Refusal),
    /// The handshake failed for another reason (reset, garbage).
    #[error("TLS handshake failed: {0}")]
    Handshake(std::io::Error),
    /// The client did not finish the handshake in time.
    #[error("TLS handshake timed out after {0:?}")]
    Timeout(Duration),
}

impl AcceptError {
    /// The refusal, when the connection broke a TLS rule.
    pub fn refusal(&self) -> Option<&Refusal> {
        match self {
            AcceptError::Refused(r) => Some(r),
            _ => None,
        }
    }
}

/// Accepts inbound connections according to a [`TlsMode`].
#[derive(Clone)]
pub struct MeshAcceptor {
    mode: TlsMode,
    acceptor: TlsAcceptor,
    trust: Arc<TrustStore>,
    handshake_timeout: Duration,
    deferred: bool,
}

impl std::fmt::Debug for MeshAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshAcceptor")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

/// The first byte of every TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

impl MeshAcceptor {
    /// A listener's acceptor: strict mode requires client certificates, permissive makes them
    /// optional and lets plaintext through, off accepts only plaintext.
    pub fn new(
        mode: TlsMode,
        cell: Arc<CredentialCell>,
        trust: Arc<TrustStore>,
        alpn: &[&[u8]],
    ) -> Result<Self, CertError> {
        let config = server_config(cell, trust.clone(), mode == TlsMode::Strict, alpn)?;
        Ok(Self {
            mode,
            acceptor: TlsAcceptor::from(config),
            trust,
            handshake_timeout: Duration::from_secs(10),
            deferred: false,
        })
    }

    /// The control plane's acceptor: TLS with an optional client certificate, which the
    /// handshake does not judge beyond proof of its key; the server verifies the chain with
    /// [`TrustStore::verify_chain`] for every request (and refuses with the rule's name).
    /// Plaintext is passed through (to be told to use https).
    pub fn deferred(
        cell: Arc<CredentialCell>,
        trust: Arc<TrustStore>,
        alpn: &[&[u8]],
    ) -> Result<Self, CertError> {
        let config = build_server_config(cell, trust.clone(), false, true, alpn)?;
        Ok(Self {
            mode: TlsMode::Permissive,
            acceptor: TlsAcceptor::from(config),
            trust,
            handshake_timeout: Duration::from_secs(10),
            deferred: true,
        })
    }

    /// Sets how long a client may take to finish the TLS handshake (default 10 s).
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// The listener's mode.
    pub fn mode(&self) -> TlsMode {
        self.mode
    }

    /// Sniffs the first byte, then applies the mode: TLS is handshaken and the client's identity
    /// verified; plaintext is passed through or refused.
    pub async fn accept(&self, tcp: TcpStream) -> Result<Accepted, AcceptError> {
        if self.mode == TlsMode::Off {
            return Ok(Accepted::Plain(tcp));
        }
        let timeout = self.handshake_timeout;
        let work = async {
            let mut first = [0u8; 1];
            let n = tcp.peek(&mut first).await.map_err(AcceptError::Handshake)?;
            if n == 0 {
                return Err(AcceptError::Handshake(
                    std::io::ErrorKind::UnexpectedEof.into(),
                ));
            }
            if first[0] != TLS_HANDSHAKE_RECORD {
                return match self.mode {
                    TlsMode::Permissive => Ok(Accepted::Plain(tcp)),
                    _ => Err(AcceptError::Refused(Refusal::Plaintext)),
                };
            }
            let stream =
                self.acceptor
                    .accept(tcp)
                    .await
                    .map_err(|e| match Refusal::from_io_error(&e) {
                        Some(r) => AcceptError::Refused(r),
                        None => AcceptError::Handshake(e),
                    })?;
            let conn = stream.get_ref().1;
            // A resumed TLS 1.3 session skips certificate verification: check the chain it
            // carries against what is trusted *now*, so a revocation also ends resumptions.
            if !self.deferred
                && conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
                && let Some((leaf, rest)) = conn.peer_certificates().and_then(|c| c.split_first())
            {
                self.trust
                    .verify(
                        leaf,
                        rest,
                        rustls::pki_types::UnixTime::now(),
                        webpki::KeyUsage::client_auth(),
                    )
                    .map_err(AcceptError::Refused)?;
            }
            let peer = conn
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|leaf| identity_of(leaf).ok());
            Ok(Accepted::Tls {
                stream: Box::new(stream),
                peer,
            })
        };
        tokio::time::timeout(timeout, work)
            .await
            .unwrap_or(Err(AcceptError::Timeout(timeout)))
    }
}

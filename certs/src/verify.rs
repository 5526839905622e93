//! Peer verification: chains checked against a *set* of trust anchors (the mesh CA plus
//! registered entity CAs) minus revocations, and identity read from the SPIFFE URI SAN.
//!
//! The anchors and revocations live behind an `ArcSwap`, so a change applies to the next
//! handshake of every listener and client built on the same [`TrustStore`], with no restart.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use capmesh_api::TrustDomain;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};

use crate::inspect::{certs_from_pem, identity_of, inspect_der};
use crate::{CertError, SpiffeId};

/// Why a peer's certificate (or connection) was refused. Each case names one rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The chain does not lead to any trusted CA.
    #[error("unknown CA: the certificate does not chain to the mesh CA or a registered entity")]
    UnknownCa,
    /// The certificate's validity window has ended.
    #[error("expired: the certificate's validity window has ended")]
    Expired,
    /// The certificate's validity window has not started.
    #[error("not yet valid: the certificate's validity window starts in the future (check clocks)")]
    NotYetValid,
    /// The certificate's (or an intermediate's) serial is on the revocation list.
    #[error("revoked serial: the certificate's serial number is revoked")]
    RevokedSerial,
    /// The certificate chains to an entity CA that has been revoked.
    #[error("revoked entity: the certificate was issued by entity {0:?}, which is revoked")]
    RevokedEntity(String),
    /// The certificate's identity is revoked (`capmesh agent revoke`).
    #[error("revoked identity: {0} is revoked (`capmesh agent lift` restores it)")]
    RevokedIdentity(String),
    /// The CA that issued the certificate may not speak for its identity: an entity's CA only
    /// for its own trust domain, the mesh's trust domain and `capmesh-system` only the mesh CA.
    #[error("trust domain mismatch: {identity} was issued by {issuer}, which {rule}")]
    TrustDomainMismatch {
        /// The identity the certificate claims.
        identity: String,
        /// Who issued it (`the mesh CA`, `entity "partner"`).
        issuer: String,
        /// What that issuer may issue.
        rule: String,
    },
    /// The peer is not the workload this side expected.
    #[error("identity mismatch: expected {expected}, the peer is {actual}")]
    IdentityMismatch {
        /// Who we meant to reach.
        expected: String,
        /// Who answered.
        actual: String,
    },
    /// The certificate carries no (or an invalid) SPIFFE ID.
    #[error("no identity: {0}")]
    NoIdentity(String),
    /// A strict listener received a connection that is not TLS.
    #[error("plaintext refused: this listener is in strict mode and accepts only mutual TLS")]
    Plaintext,
    /// A strict listener's client presented no certificate.
    #[error(
        "no client certificate: this listener is in strict mode and requires a mesh certificate"
    )]
    NoClientCertificate,
    /// The peer refused *our* certificate and told us so with a TLS alert.
    #[error("refused by the peer with TLS alert {0}")]
    PeerAlert(String),
    /// Anything else wrong with the certificate.
    #[error("invalid certificate: {0}")]
    Invalid(String),
}

impl Refusal {
    /// Classifies a rustls error, as returned by a failed handshake, into the rule it broke.
    pub fn from_tls_error(err: &rustls::Error) -> Option<Refusal> {
        match err {
            rustls::Error::InvalidCertificate(cert) => Some(match cert {
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    Refusal::Expired
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    Refusal::NotYetValid
                }
                CertificateError::UnknownIssuer => Refusal::UnknownCa,
                CertificateError::Revoked => Refusal::RevokedSerial,
                CertificateError::Other(OtherError(inner)) => match inner.downcast_ref::<Refusal>()
                {
                    Some(r) => r.clone(),
                    None => Refusal::Invalid(inner.to_string()),
                },
                other => Refusal::Invalid(other.to_string()),
            }),
            rustls::Error::NoCertificatesPresented => Some(Refusal::NoClientCertificate),
            rustls::Error::AlertReceived(alert) => Some(Refusal::PeerAlert(format!("{alert:?}"))),
            _ => None,
        }
    }

    /// Classifies the `io::Error` a tokio-rustls handshake returns.
    pub fn from_io_error(err: &std::io::Error) -> Option<Refusal> {
        err.get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
            .and_then(Refusal::from_tls_error)
    }

    /// A short stable label for metrics (`refusals{reason="expired"}`).
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::UnknownCa => "unknown_ca",
            Refusal::Expired => "expired",
            Refusal::NotYetValid => "not_yet_valid",
            Refusal::RevokedSerial => "revoked_serial",
            Refusal::RevokedEntity(_) => "revoked_entity",
            Refusal::RevokedIdentity(_) => "revoked_identity",
            Refusal::TrustDomainMismatch { .. } => "trust_domain_mismatch",
            Refusal::IdentityMismatch { .. } => "identity_mismatch",
            Refusal::NoIdentity(_) => "no_identity",
            Refusal::Plaintext => "plaintext",
            Refusal::NoClientCertificate => "no_client_certificate",
            Refusal::PeerAlert(_) => "peer_alert",
            Refusal::Invalid(_) => "invalid",
        }
    }

    fn into_rustls(self) -> rustls::Error {
        // Standard variants where rustls has them, so the peer gets the precise TLS alert.
        let cert = match self {
            Refusal::UnknownCa => CertificateError::UnknownIssuer,
            Refusal::Expired => CertificateError::Expired,
            Refusal::NotYetValid => CertificateError::NotValidYet,
            Refusal::RevokedSerial => CertificateError::Revoked,
            other => CertificateError::Other(OtherError(Arc::new(other))),
        };
        rustls::Error::InvalidCertificate(cert)
    }
}

/// A peer whose chain passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedPeer {
    /// Its SPIFFE ID.
    pub identity: SpiffeId,
    /// The registered entity whose CA issued it; `None` for the mesh CA.
    pub entity: Option<String>,
}

/// An entity as the verifiers see it: another trust domain and the CA that speaks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntityAnchor {
    /// The entity's name.
    pub name: String,
    /// The only trust domain its CA may issue identities in (`None`: none at all).
    pub trust_domain: Option<TrustDomain>,
    /// Its CA certificate(s), PEM.
    pub ca_pem: String,
}

/// What the mesh trusts right now. Built from the topology stream's trust bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustConfig {
    /// The mesh's trust domain.
    pub trust_domain: TrustDomain,
    /// The mesh CA certificate(s), PEM.
    pub mesh_ca_pem: String,
    /// Registered entities.
    pub entities: Vec<EntityAnchor>,
    /// Names of revoked entities (their CAs may still be listed; they are refused by name).
    pub revoked_entities: Vec<String>,
    /// Revoked serial numbers, lowercase hex.
    pub revoked_serials: Vec<String>,
    /// Revoked identities (SPIFFE IDs).
    pub revoked_identities: Vec<String>,
}

impl TrustConfig {
    /// Only the mesh CA, nothing revoked: what a proxy trusts before its first snapshot.
    pub fn mesh_only(trust_domain: TrustDomain, mesh_ca_pem: impl Into<String>) -> Self {
        Self {
            trust_domain,
            mesh_ca_pem: mesh_ca_pem.into(),
            entities: Vec::new(),
            revoked_entities: Vec::new(),
            revoked_serials: Vec::new(),
            revoked_identities: Vec::new(),
        }
    }
}

impl From<&capmesh_api::TrustBundle> for TrustConfig {
    /// What a snapshot's trust bundle says to trust.
    fn from(bundle: &capmesh_api::TrustBundle) -> Self {
        TrustConfig {
            trust_domain: bundle.trust_domain.clone(),
            mesh_ca_pem: bundle.ca_pems.join("\n"),
            entities: bundle
                .entities
                .iter()
                .map(|e| EntityAnchor {
                    name: e.name.clone(),
                    trust_domain: e.trust_domain.clone(),
                    ca_pem: e.ca_pem.clone(),
                })
                .collect(),
            revoked_entities: bundle.revoked_entities.clone(),
            revoked_serials: bundle.revoked_serials.clone(),
            revoked_identities: bundle.revoked_identities.clone(),
        }
    }
}

/// Which side of a connection presented a chain: it decides the key usage checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRole {
    /// A client of one of our listeners.
    Client,
    /// A server we connected to.
    Server,
}

impl PeerRole {
    fn usage(self) -> webpki::KeyUsage {
        match self {
            PeerRole::Client => webpki::KeyUsage::client_auth(),
            PeerRole::Server => webpki::KeyUsage::server_auth(),
        }
    }
}

#[derive(Debug)]
struct Anchor {
    /// `None` for the mesh CA; the entity's name and trust domain otherwise.
    entity: Option<(String, Option<TrustDomain>)>,
    anchor: TrustAnchor<'static>,
}

#[derive(Debug)]
struct TrustState {
    trust_domain: TrustDomain,
    anchors: Vec<Anchor>,
    webpki_anchors: Vec<TrustAnchor<'static>>,
    revoked_entities: HashSet<String>,
    revoked_serials: HashSet<String>,
    revoked_identities: HashSet<String>,
}

/// The namespace of the control plane's, the admin's and the CLI's identities.
pub const SYSTEM_NAMESPACE: &str = "capmesh-system";

impl TrustState {
    fn build(cfg: &TrustConfig) -> Result<Self, CertError> {
        let mut anchors = Vec::new();
        let mut add = |entity: Option<&EntityAnchor>, pem: &str| -> Result<(), CertError> {
            for der in certs_from_pem(pem)? {
                let anchor = webpki::anchor_from_trusted_cert(&der)
                    .map_err(|e| CertError::Pem {
                        what: "trust anchor",
                        detail: format!("{}: {e}", entity.map_or("mesh CA", |e| &e.name)),
                    })?
                    .to_owned();
                anchors.push(Anchor {
                    entity: entity.map(|e| (e.name.clone(), e.trust_domain.clone())),
                    anchor,
                });
            }
            Ok(())
        };
        add(None, &cfg.mesh_ca_pem)?;
        for entity in &cfg.entities {
            add(Some(entity), &entity.ca_pem)?;
        }
        Ok(Self {
            trust_domain: cfg.trust_domain.clone(),
            webpki_anchors: anchors.iter().map(|a| a.anchor.clone()).collect(),
            anchors,
            revoked_entities: cfg.revoked_entities.iter().cloned().collect(),
            revoked_identities: cfg.revoked_identities.iter().cloned().collect(),
            revoked_serials: cfg
                .revoked_serials
                .iter()
                .map(|s| s.to_ascii_lowercase())
                .collect(),
        })
    }
}

/// Trust anchors and revocations, swappable at run time. Share one per process.
#[derive(Debug)]
pub struct TrustStore {
    trust_domain: ArcSwap<TrustDomain>,
    state: ArcSwap<TrustState>,
    generation: std::sync::atomic::AtomicU64,
    changed: tokio::sync::watch::Sender<u64>,
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

impl TrustStore {
    /// Builds a store from `cfg`; fails if any CA PEM does not parse.
    pub fn new(cfg: &TrustConfig) -> Result<Self, CertError> {
        Ok(Self {
            trust_domain: ArcSwap::from_pointee(cfg.trust_domain.clone()),
            state: ArcSwap::from_pointee(TrustState::build(cfg)?),
            generation: std::sync::atomic::AtomicU64::new(1),
            changed: tokio::sync::watch::channel(1).0,
        })
    }

    /// Replaces what is trusted. All or nothing: on error the old state stays in force.
    /// Takes effect on the next handshake of every listener and client using this store.
    pub fn update(&self, cfg: &TrustConfig) -> Result<(), CertError> {
        let state = TrustState::build(cfg)?;
        self.trust_domain.store(Arc::new(cfg.trust_domain.clone()));
        self.state.store(Arc::new(state));
        let generation = self
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Release)
            + 1;
        self.changed.send_replace(generation);
        tracing::info!(
            anchors = cfg.entities.len() + 1,
            revoked_entities = cfg.revoked_entities.len(),
            revoked_serials = cfg.revoked_serials.len(),
            revoked_identities = cfg.revoked_identities.len(),
            "trust bundle applied"
        );
        Ok(())
    }

    /// Verifies a chain (leaf first) presented by a peer in `role`, now.
    pub fn verify_chain(
        &self,
        chain: &[CertificateDer<'_>],
        role: PeerRole,
    ) -> Result<VerifiedPeer, Refusal> {
        let (leaf, rest) = chain
            .split_first()
            .ok_or_else(|| Refusal::Invalid("no certificate".into()))?;
        self.verify_peer(leaf, rest, UnixTime::now(), role.usage())
    }

    /// Resolves when a connection whose peer presented `chain` must end: after a trust change
    /// (a revocation, an entity removed) the chain no longer verifies, or its leaf expired.
    /// Long-lived connections (HTTP/2, the topology stream) race their work against this, so
    /// a revocation or an expiry ends them too, not only new handshakes. Never resolves for an
    /// empty chain (a plaintext peer has nothing to revoke).
    pub async fn until_refused(
        &self,
        chain: &[CertificateDer<'static>],
        role: PeerRole,
    ) -> Refusal {
        let Some(leaf) = chain.first() else {
            return std::future::pending().await;
        };
        let not_after = inspect_der(leaf).ok().map(|i| i.not_after);
        let mut changes = self.changed.subscribe();
        loop {
            if let Err(refusal) = self.verify_chain(chain, role) {
                return refusal;
            }
            // Wake just after the leaf expires, and at least daily (a timer that long is fine).
            let until_expiry = not_after
                .and_then(|t| t.duration_since(SystemTime::now()).ok())
                .map_or(Duration::from_secs(1), |d| d + Duration::from_secs(1))
                .min(Duration::from_secs(24 * 3600));
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        // The store is gone with its process: nothing will change any more.
                        return std::future::pending().await;
                    }
                }
                _ = tokio::time::sleep(until_expiry) => {}
            }
        }
    }

    /// A receiver that wakes on every trust change.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Bumped on every [`TrustStore::update`]: long-lived connections compare it to decide
    /// when to re-verify their peer against the new trust.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The mesh's trust domain.
    pub fn trust_domain(&self) -> TrustDomain {
        self.trust_domain.load().as_ref().clone()
    }

    /// Verifies a presented chain for `usage` and returns the peer's identity.
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<SpiffeId, Refusal> {
        self.verify_peer(end_entity, intermediates, now, usage)
            .map(|p| p.identity)
    }

    /// Verifies a client chain (leaf first) as presented on a mesh connection, now.
    pub fn verify_client_chain(&self, chain: &[CertificateDer<'_>]) -> Result<SpiffeId, Refusal> {
        let (leaf, rest) = chain
            .split_first()
            .ok_or_else(|| Refusal::Invalid("no certificate".into()))?;
        self.verify(leaf, rest, UnixTime::now(), webpki::KeyUsage::client_auth())
    }

    /// Like [`TrustStore::verify`], and also says which entity's CA the chain leads to (`None`
    /// for the mesh CA), so a stream can be closed when that entity is revoked.
    pub fn verify_peer(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<VerifiedPeer, Refusal> {
        let state = self.state.load();
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| Refusal::Invalid(format!("cannot parse the certificate: {e}")))?;
        let algs = algorithms();
        let path = cert
            .verify_for_usage(
                algs.all,
                &state.webpki_anchors,
                intermediates,
                now,
                usage,
                None,
                None,
            )
            .map_err(|e| match e {
                webpki::Error::CertExpired { .. } => Refusal::Expired,
                webpki::Error::CertNotValidYet { .. } => Refusal::NotYetValid,
                // A same-named issuer whose key did not sign this chain is still not a CA we trust.
                webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey => {
                    Refusal::UnknownCa
                }
                other => Refusal::Invalid(format!("{other:?}")),
            })?;
        let used = path.anchor();
        let entity = state
            .anchors
            .iter()
            .find(|a| {
                a.anchor.subject == used.subject
                    && a.anchor.subject_public_key_info == used.subject_public_key_info
            })
            .and_then(|a| a.entity.clone());
        if let Some((name, _)) = &entity
            && state.revoked_entities.contains(name)
        {
            return Err(Refusal::RevokedEntity(name.clone()));
        }
        for der in std::iter::once(end_entity).chain(intermediates.iter()) {
            if let Ok(info) = inspect_der(der)
                && state.revoked_serials.contains(&info.serial)
            {
                tracing::info!(serial = %info.serial, "refused a revoked certificate");
                return Err(Refusal::RevokedSerial);
            }
        }
        let identity = identity_of(end_entity).map_err(|e| Refusal::NoIdentity(e.to_string()))?;
        check_issuer(&state.trust_domain, entity.as_ref(), &identity)?;
        if state.revoked_identities.contains(&identity.to_string()) {
            return Err(Refusal::RevokedIdentity(identity.to_string()));
        }
        Ok(VerifiedPeer {
            identity,
            entity: entity.map(|(name, _)| name),
        })
    }
}

/// The SPIFFE federation rule: the mesh CA speaks only for the mesh's trust domain, an entity's
/// CA only for the entity's own trust domain, and `capmesh-system` identities (the control
/// plane, the admin, the CLI) come only from the mesh CA.
fn check_issuer(
    mesh: &TrustDomain,
    entity: Option<&(String, Option<TrustDomain>)>,
    identity: &SpiffeId,
) -> Result<(), Refusal> {
    let refuse = |issuer: String, rule: String| {
        Err(Refusal::TrustDomainMismatch {
            identity: identity.to_string(),
            issuer,
            rule,
        })
    };
    match entity {
        None if identity.trust_domain() != mesh => refuse(
            "the mesh CA".into(),
            format!("issues identities only in the mesh's trust domain {mesh}"),
        ),
        None => Ok(()),
        Some((name, allowed)) => {
            let issuer = format!("entity {name:?}");
            match allowed {
                None => refuse(
                    issuer,
                    "has no trust domain: register it again with --trust-domain".into(),
                ),
                Some(td) if td != identity.trust_domain() || td == mesh => refuse(
                    issuer,
                    format!("may issue identities only in its trust domain {td}"),
                ),
                Some(_) if identity.namespace().as_str() == SYSTEM_NAMESPACE => refuse(
                    issuer,
                    format!("may not issue {SYSTEM_NAMESPACE} identities (only the mesh CA does)"),
                ),
                Some(_) => Ok(()),
            }
        }
    }
}

/// Verifies clients of a mesh listener. Mandatory (strict) or optional (permissive): either way
/// a certificate that *is* presented must pass every check. With `deferred` (the control
/// plane's API), the handshake only proves the client holds the key of the certificate it
/// presents; the server verifies the chain for every request, so a refusal reaches the client
/// as an HTTP 403 naming the rule instead of a bare TLS alert.
#[derive(Debug)]
pub(crate) struct MeshClientVerifier {
    pub(crate) trust: Arc<TrustStore>,
    pub(crate) mandatory: bool,
    pub(crate) deferred: bool,
}

impl ClientCertVerifier for MeshClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if self.deferred {
            return Ok(ClientCertVerified::assertion());
        }
        self.trust
            .verify(
                end_entity,
                intermediates,
                now,
                webpki::KeyUsage::client_auth(),
            )
            .map(|_| ClientCertVerified::assertion())
            .map_err(Refusal::into_rustls)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

/// Verifies a server: its chain, then that its SPIFFE ID is exactly the one expected. DNS names
/// and the TLS server name are ignored: in the mesh, identity is the SPIFFE ID.
#[derive(Debug)]
pub(crate) struct MeshServerVerifier {
    pub(crate) trust: Arc<TrustStore>,
    pub(crate) expected: SpiffeId,
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let actual = self
            .trust
            .verify(
                end_entity,
                intermediates,
                now,
                webpki::KeyUsage::server_auth(),
            )
            .map_err(Refusal::into_rustls)?;
        if actual != self.expected {
            return Err(Refusal::IdentityMismatch {
                expected: self.expected.to_string(),
                actual: actual.to_string(),
            }
            .into_rustls());
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

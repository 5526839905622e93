//! A workload's current certificate and key, swappable while listeners run.

use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use crate::inspect::{certs_from_pem, inspect_der};
use crate::{CertError, SpiffeId, WorkloadKey};

/// A certificate chain with its key, checked to match, and what it says about itself.
#[derive(Debug)]
pub struct Credential {
    certified: Arc<CertifiedKey>,
    chain_pem: String,
    identity: SpiffeId,
    serial: String,
    not_before: SystemTime,
    not_after: SystemTime,
    received: SystemTime,
}

impl Credential {
    /// Pairs a PEM chain (leaf first) with its private key.
    pub fn new(chain_pem: &str, key: PrivateKeyDer<'static>) -> Result<Self, CertError> {
        let chain: Vec<CertificateDer<'static>> = certs_from_pem(chain_pem)?;
        let info = inspect_der(&chain[0])?;
        let identity = match (info.identity, info.uris.as_slice()) {
            (Some(id), _) => id,
            (None, []) => return Err(CertError::NoIdentity),
            (None, uris) => return Err(CertError::BadIdentity(uris.join(", "))),
        };
        let signer =
            rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| CertError::Pem {
                what: "private key",
                detail: e.to_string(),
            })?;
        let certified = CertifiedKey::new(chain, signer);
        certified.keys_match().map_err(|_| CertError::KeyMismatch)?;
        Ok(Self {
            certified: Arc::new(certified),
            chain_pem: chain_pem.to_owned(),
            identity,
            serial: info.serial,
            not_before: info.not_before,
            not_after: info.not_after,
            received: SystemTime::now(),
        })
    }

    /// Pairs a PEM chain with a [`WorkloadKey`].
    pub fn with_key(chain_pem: &str, key: &WorkloadKey) -> Result<Self, CertError> {
        Self::new(chain_pem, key.private_key_der())
    }

    /// Reads a PEM chain and a PEM private key (the file-based mode).
    pub fn from_pem(chain_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        let key =
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| CertError::Pem {
                what: "private key",
                detail: e.to_string(),
            })?;
        Self::new(chain_pem, key)
    }

    /// The workload identity this credential proves.
    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    /// The leaf's serial, lowercase hex.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// The chain as PEM (leaf first).
    pub fn chain_pem(&self) -> &str {
        &self.chain_pem
    }

    /// Start of the leaf's validity window.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// End of the leaf's validity window.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// When this process installed it (renewal is timed from here, not from `notBefore`,
    /// which the CA backdates for clock skew).
    pub fn received(&self) -> SystemTime {
        self.received
    }

    pub(crate) fn certified(&self) -> Arc<CertifiedKey> {
        self.certified.clone()
    }
}

use rustls::pki_types::pem::PemObject;

/// The credential in force. Listeners and clients read it on every handshake, so storing a
/// new one rotates the certificate without restarting anything.
#[derive(Debug)]
pub struct CredentialCell {
    current: ArcSwap<Credential>,
}

impl CredentialCell {
    /// Starts with `initial`.
    pub fn new(initial: Credential) -> Self {
        Self {
            current: ArcSwap::from_pointee(initial),
        }
    }

    /// The credential in force.
    pub fn current(&self) -> Arc<Credential> {
        self.current.load_full()
    }

    /// Replaces the credential; refuses one for a different identity, which would mean the
    /// workload changed who it is mid-flight.
    pub fn store(&self, next: Credential) -> Result<(), CertError> {
        let current = self.current.load();
        if next.identity() != current.identity() {
            return Err(CertError::NotEntitled {
                requested: next.identity().to_string(),
                entitled: current.identity().to_string(),
            });
        }
        self.current.store(Arc::new(next));
        Ok(())
    }
}

#[derive(Debug)]
pub(crate) struct CellResolver(pub(crate) Arc<CredentialCell>);

impl rustls::server::ResolvesServerCert for CellResolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().certified())
    }
}

impl rustls::client::ResolvesClientCert for CellResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().certified())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

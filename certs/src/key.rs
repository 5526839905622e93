//! Workload keys and certificate signing requests.
//!
//! A proxy makes its own P-256 key and asks for a certificate with a CSR; the key never leaves it.

use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::{CertError, SpiffeId};

/// A workload's private key (ECDSA P-256). Its `Debug` never prints the key.
pub struct WorkloadKey {
    key: KeyPair,
}

impl std::fmt::Debug for WorkloadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadKey").finish_non_exhaustive()
    }
}

impl WorkloadKey {
    /// Generates a fresh P-256 key.
    pub fn generate() -> Result<Self, CertError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CertError::Generate)?;
        Ok(Self { key })
    }

    /// Reads a PKCS#8 PEM key.
    pub fn from_pem(pem: &str) -> Result<Self, CertError> {
        let key = KeyPair::from_pem(pem).map_err(|e| CertError::Pem {
            what: "private key",
            detail: e.to_string(),
        })?;
        Ok(Self { key })
    }

    /// A CSR asking for `identity` in its URI SAN, and nothing else: no CN, no DNS names.
    pub fn csr_pem(&self, identity: &SpiffeId) -> Result<String, CertError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![uri_san(&identity.to_string())?];
        let csr = params
            .serialize_request(&self.key)
            .map_err(CertError::Generate)?;
        csr.pem().map_err(CertError::Generate)
    }

    /// The key as PKCS#8 PEM, for writing to a 0600 file.
    pub fn to_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// The key in the form rustls takes.
    pub fn private_key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()))
    }

    pub(crate) fn key_pair(&self) -> &KeyPair {
        &self.key
    }
}

pub(crate) fn uri_san(uri: &str) -> Result<SanType, CertError> {
    let ia5 = rcgen::string::Ia5String::try_from(uri).map_err(CertError::Generate)?;
    Ok(SanType::URI(ia5))
}

//! capmesh identity: the layer every other part trusts.
//!
//! This crate owns the mesh CA (root and optional intermediate), SPIFFE IDs, workload keys and
//! CSRs, issuance for an entitled identity, certificate inspection, the rustls configurations
//! for mutual TLS (trust anchors and revocations swappable at run time), the inbound acceptor
//! that applies a listener's TLS mode, and certificate rotation. It does not speak HTTP or know
//! about bootstrap tokens: the control plane decides who is entitled to what, this crate signs.
#![forbid(unsafe_code)]

pub mod ca;
pub mod credential;
pub mod inspect;
pub mod key;
pub mod rotate;
pub mod spiffe;
pub mod tls;
pub mod verify;

use std::path::PathBuf;

pub use ca::{Ca, Issued, Validity};
pub use credential::{Credential, CredentialCell};
pub use inspect::{CertInfo, inspect_der, inspect_pem};
pub use key::WorkloadKey;
pub use rotate::{Renew, RenewPolicy, run_rotation};
pub use spiffe::{SpiffeError, SpiffeId};
pub use tls::{AcceptError, Accepted, MeshAcceptor, TlsMode};
pub use verify::{
    EntityAnchor, PeerRole, Refusal, SYSTEM_NAMESPACE, TrustConfig, TrustStore, VerifiedPeer,
};

/// Everything that can go wrong making, reading or using certificates.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// Key or certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Generate(rcgen::Error),
    /// A PEM or DER input did not parse.
    #[error("cannot read the {what}: {detail}")]
    Pem {
        /// What was being read.
        what: &'static str,
        /// The parser's complaint.
        detail: String,
    },
    /// The system random generator failed.
    #[error("the system random number generator failed")]
    Random,
    /// The CSR did not parse or its signature is wrong.
    #[error("invalid certificate signing request: {0}")]
    BadCsr(String),
    /// The CSR asks for an identity the caller is not entitled to.
    #[error("the CSR asks for {requested:?}, but the caller is entitled only to {entitled}")]
    NotEntitled {
        /// What the CSR asked for.
        requested: String,
        /// What the caller proved.
        entitled: String,
    },
    /// The identity belongs to another trust domain.
    #[error("identity {identity} is outside this CA's trust domain {trust_domain}")]
    WrongTrustDomain {
        /// The identity.
        identity: String,
        /// The CA's trust domain.
        trust_domain: String,
    },
    /// A certificate has no SPIFFE URI SAN.
    #[error(
        "the certificate has no SPIFFE ID in its URI SAN (capmesh never reads identity from the CN)"
    )]
    NoIdentity,
    /// A certificate's URI SAN is not one valid capmesh SPIFFE ID.
    #[error(
        "the certificate's URI SAN {0:?} is not one valid spiffe://<trust-domain>/ns/<namespace>/agent/<name>"
    )]
    BadIdentity(String),
    /// The private key does not belong to the certificate.
    #[error("the private key does not match the certificate")]
    KeyMismatch,
    /// A TLS mode that does not exist.
    #[error("--tls-mode {0:?} is not valid: use strict, permissive or off")]
    BadTlsMode(String),
    /// rustls refused a configuration.
    #[error("TLS configuration: {0}")]
    Tls(rustls::Error),
    /// Reading or writing a file failed.
    #[error("{path}: {1}", path = .0.display())]
    Io(PathBuf, std::io::Error),
}

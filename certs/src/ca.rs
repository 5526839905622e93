//! The mesh certificate authority: a root (optionally with an intermediate) that signs workload
//! certificates for the identities callers are entitled to.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use capmesh_api::TrustDomain;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use ring::rand::SecureRandom;
use time::OffsetDateTime;

use crate::inspect::serial_hex;
use crate::key::uri_san;
use crate::{CertError, SpiffeId, WorkloadKey};

/// How far back a new certificate's `notBefore` is set, so peers whose clocks run a little
/// behind still accept it.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Default workload certificate lifetime.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);

const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The validity window of a certificate to issue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// Start of the window.
    pub not_before: OffsetDateTime,
    /// End of the window.
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From now (less [`CLOCK_SKEW`]) until now + `ttl`.
    pub fn for_ttl(ttl: Duration) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            not_before: now - CLOCK_SKEW,
            not_after: now + ttl,
        }
    }
}

/// A certificate the CA issued.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The leaf, then any intermediates: what the workload presents.
    pub chain_pem: String,
    /// The leaf's serial (lowercase hex), for revocation.
    pub serial: String,
    /// End of the validity window.
    pub not_after: OffsetDateTime,
}

/// The mesh CA. Its `Debug` never prints a key.
pub struct Ca {
    trust_domain: TrustDomain,
    root_pem: String,
    root_key_pem: String,
    /// The intermediate certificate and key, when there is one; it then signs the leaves.
    intermediate: Option<(String, String)>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("intermediate", &self.intermediate.is_some())
            .finish_non_exhaustive()
    }
}

const ROOT_CERT: &str = "ca.pem";
const ROOT_KEY: &str = "ca-key.pem";
const INTERMEDIATE_CERT: &str = "intermediate.pem";
const INTERMEDIATE_KEY: &str = "intermediate-key.pem";

fn random_serial() -> Result<SerialNumber, CertError> {
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| CertError::Random)?;
    // Positive and without a leading zero byte, so it prints the same everywhere.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

fn ca_params(
    trust_domain: &TrustDomain,
    name: &str,
    path_len: Option<u8>,
) -> Result<CertificateParams, CertError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain.as_str());
    // A random suffix keeps CA names unique: two meshes' CAs (say, an entity CA from another
    // capmesh install) must never share a subject, or chain building picks the wrong issuer.
    let mut tag = [0u8; 4];
    ring::rand::SystemRandom::new()
        .fill(&mut tag)
        .map_err(|_| CertError::Random)?;
    dn.push(
        DnType::CommonName,
        format!("{name} {}", crate::inspect::hex(&tag)),
    );
    params.distinguished_name = dn;
    params.is_ca = match path_len {
        Some(n) => IsCa::Ca(BasicConstraints::Constrained(n)),
        None => IsCa::Ca(BasicConstraints::Unconstrained),
    };
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let validity = Validity::for_ttl(ROOT_TTL);
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    params.serial_number = Some(random_serial()?);
    params.use_authority_key_identifier_extension = path_len.is_some();
    Ok(params)
}

fn leaf_params(sans: Vec<SanType>, validity: Validity) -> Result<CertificateParams, CertError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    params.serial_number = Some(random_serial()?);
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

impl Ca {
    /// Creates a new root CA for `trust_domain`, and an intermediate under it when asked.
    pub fn generate(trust_domain: TrustDomain, with_intermediate: bool) -> Result<Self, CertError> {
        let root_key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CertError::Generate)?;
        let root_params = ca_params(&trust_domain, "capmesh root CA", None)?;
        let root = root_params
            .self_signed(&root_key)
            .map_err(CertError::Generate)?;
        let root_pem = root.pem();
        let root_key_pem = root_key.serialize_pem();
        if !with_intermediate {
            let issuer = Issuer::new(root_params, root_key);
            return Ok(Self {
                trust_domain,
                root_pem,
                root_key_pem,
                intermediate: None,
                issuer,
            });
        }
        let root_issuer = Issuer::new(root_params, root_key);
        let int_key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CertError::Generate)?;
        let int_params = ca_params(&trust_domain, "capmesh intermediate CA", Some(0))?;
        let int_cert = int_params
            .signed_by(&int_key, &root_issuer)
            .map_err(CertError::Generate)?;
        let intermediate = Some((int_cert.pem(), int_key.serialize_pem()));
        Ok(Self {
            trust_domain,
            root_pem,
            root_key_pem,
            intermediate,
            issuer: Issuer::new(int_params, int_key),
        })
    }

    /// Loads a CA from PEM: the signing certificate and key, plus the root when the signing
    /// certificate is an intermediate (bring your own CA).
    pub fn from_pem(
        trust_domain: TrustDomain,
        cert_pem: &str,
        key_pem: &str,
        root_pem: Option<&str>,
    ) -> Result<Self, CertError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| CertError::Pem {
            what: "CA private key",
            detail: e.to_string(),
        })?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(|e| CertError::Pem {
            what: "CA certificate",
            detail: e.to_string(),
        })?;
        let (root_pem, intermediate) = match root_pem {
            Some(root) => (
                root.to_owned(),
                Some((cert_pem.to_owned(), key_pem.to_owned())),
            ),
            None => (cert_pem.to_owned(), None),
        };
        Ok(Self {
            trust_domain,
            root_pem,
            root_key_pem: key_pem.to_owned(),
            intermediate,
            issuer,
        })
    }

    /// Loads the CA saved in `dir`, or `None` when there is none yet.
    pub fn load(trust_domain: TrustDomain, dir: &Path) -> Result<Option<Self>, CertError> {
        let root = dir.join(ROOT_CERT);
        if !root.exists() {
            return Ok(None);
        }
        let root_pem = read(&root)?;
        let root_key_pem = read(&dir.join(ROOT_KEY))?;
        let int = dir.join(INTERMEDIATE_CERT);
        let ca = if int.exists() {
            let int_pem = read(&int)?;
            let int_key = read(&dir.join(INTERMEDIATE_KEY))?;
            let mut ca = Self::from_pem(trust_domain, &int_pem, &int_key, Some(&root_pem))?;
            ca.root_key_pem = root_key_pem;
            ca
        } else {
            Self::from_pem(trust_domain, &root_pem, &root_key_pem, None)?
        };
        Ok(Some(ca))
    }

    /// Saves the CA into `dir`: certificates world-readable, keys mode 0600.
    pub fn save(&self, dir: &Path) -> Result<(), CertError> {
        fs::create_dir_all(dir).map_err(|e| CertError::Io(dir.to_path_buf(), e))?;
        write_file(&dir.join(ROOT_CERT), &self.root_pem, 0o644)?;
        write_file(&dir.join(ROOT_KEY), &self.root_key_pem, 0o600)?;
        if let Some((cert, key)) = &self.intermediate {
            write_file(&dir.join(INTERMEDIATE_CERT), cert, 0o644)?;
            write_file(&dir.join(INTERMEDIATE_KEY), key, 0o600)?;
        }
        Ok(())
    }

    /// The signing certificate and key as PEM, plus the root when the signer is an
    /// intermediate: what a store keeps so every replica signs with the same CA.
    pub fn export_pem(&self) -> (String, String, Option<String>) {
        match &self.intermediate {
            Some((cert, key)) => (cert.clone(), key.clone(), Some(self.root_pem.clone())),
            None => (self.root_pem.clone(), self.root_key_pem.clone(), None),
        }
    }

    /// The trust domain this CA issues for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The root certificate: the trust bundle workloads and clients verify against.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    fn chain(&self, leaf_pem: String) -> String {
        match &self.intermediate {
            Some((int, _)) => leaf_pem + int,
            None => leaf_pem,
        }
    }

    /// Signs `csr_pem` for `entitled`, the one identity the caller has proven it may have.
    /// A CSR asking for any other identity (or for more than one) is refused.
    pub fn issue(
        &self,
        csr_pem: &str,
        entitled: &SpiffeId,
        validity: Validity,
    ) -> Result<Issued, CertError> {
        if entitled.trust_domain() != &self.trust_domain {
            return Err(CertError::WrongTrustDomain {
                identity: entitled.to_string(),
                trust_domain: self.trust_domain.to_string(),
            });
        }
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CertError::BadCsr(e.to_string()))?;
        let requested: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|san| match san {
                SanType::URI(u) => u.as_str().to_owned(),
                other => format!("{other:?}"),
            })
            .collect();
        if requested.len() != 1 || requested[0] != entitled.to_string() {
            return Err(CertError::NotEntitled {
                requested: requested.join(", "),
                entitled: entitled.to_string(),
            });
        }
        let params = leaf_params(vec![uri_san(&entitled.to_string())?], validity)?;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(CertError::Generate)?;
        Ok(Issued {
            serial: serial_of(&params),
            chain_pem: self.chain(cert.pem()),
            not_after: validity.not_after,
        })
    }

    /// Issues a serving certificate for a key held here (the control plane's own): the
    /// SPIFFE ID plus DNS names and IP addresses, so plain TLS clients such as curl can verify
    /// it by host name.
    pub fn issue_serving(
        &self,
        key: &WorkloadKey,
        identity: &SpiffeId,
        dns_names: &[String],
        ips: &[IpAddr],
        validity: Validity,
    ) -> Result<Issued, CertError> {
        let mut sans = vec![uri_san(&identity.to_string())?];
        for name in dns_names {
            let ia5 =
                rcgen::string::Ia5String::try_from(name.as_str()).map_err(CertError::Generate)?;
            sans.push(SanType::DnsName(ia5));
        }
        sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        let params = leaf_params(sans, validity)?;
        let cert = params
            .signed_by(key.key_pair(), &self.issuer)
            .map_err(CertError::Generate)?;
        Ok(Issued {
            serial: serial_of(&params),
            chain_pem: self.chain(cert.pem()),
            not_after: validity.not_after,
        })
    }
}

/// The identity a CSR asks for: its one URI SAN, which must be a valid SPIFFE ID. The CSR's
/// signature is checked too.
pub fn requested_identity(csr_pem: &str) -> Result<SpiffeId, CertError> {
    let csr = CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| CertError::BadCsr(e.to_string()))?;
    let uris: Vec<&str> = csr
        .params
        .subject_alt_names
        .iter()
        .filter_map(|san| match san {
            SanType::URI(u) => Some(u.as_str()),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [one] if csr.params.subject_alt_names.len() == 1 => one
            .parse()
            .map_err(|e: crate::SpiffeError| CertError::BadCsr(e.to_string())),
        _ => Err(CertError::BadCsr(
            "a CSR must carry exactly one SAN: the SPIFFE ID it asks for".into(),
        )),
    }
}

fn serial_of(params: &CertificateParams) -> String {
    params
        .serial_number
        .as_ref()
        .map(|s| serial_hex(&s.to_bytes()))
        .unwrap_or_default()
}

fn read(path: &Path) -> Result<String, CertError> {
    fs::read_to_string(path).map_err(|e| CertError::Io(path.to_path_buf(), e))
}

/// Writes `contents` to `path` atomically (temp file + rename) with the given mode, so a crash
/// never leaves half a key and a key file is never readable by others, even for a moment.
pub fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), CertError> {
    let tmp: PathBuf = path.with_extension("tmp");
    let io = |e| CertError::Io(path.to_path_buf(), e);
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(contents.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inspect::inspect_pem;
    use std::os::unix::fs::PermissionsExt;

    fn td() -> TrustDomain {
        TrustDomain::new("capmesh.local").unwrap()
    }

    fn id(agent: &str) -> SpiffeId {
        format!("spiffe://capmesh.local/ns/default/agent/{agent}")
            .parse()
            .unwrap()
    }

    #[test]
    fn issues_only_the_entitled_identity_with_no_cn() {
        let ca = Ca::generate(td(), false).unwrap();
        let key = WorkloadKey::generate().unwrap();
        let csr = key.csr_pem(&id("weather")).unwrap();
        let issued = ca
            .issue(&csr, &id("weather"), Validity::for_ttl(DEFAULT_TTL))
            .unwrap();
        let info = inspect_pem(&issued.chain_pem).unwrap();
        assert_eq!(info.identity, Some(id("weather")));
        assert_eq!(info.serial, issued.serial);
        assert!(
            info.subject.is_empty(),
            "no CN identity, got subject {:?}",
            info.subject
        );
        assert_eq!(info.extended_key_usage, vec!["serverAuth", "clientAuth"]);
        assert!(!info.is_ca);

        let err = ca
            .issue(&csr, &id("planner"), Validity::for_ttl(DEFAULT_TTL))
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("agent/weather") && msg.contains("agent/planner"),
            "{msg}"
        );
    }

    #[test]
    fn refuses_garbage_csrs_and_foreign_trust_domains() {
        let ca = Ca::generate(td(), false).unwrap();
        assert!(matches!(
            ca.issue("nonsense", &id("a"), Validity::for_ttl(DEFAULT_TTL)),
            Err(CertError::BadCsr(_))
        ));
        let other: SpiffeId = "spiffe://other.org/ns/default/agent/a".parse().unwrap();
        let csr = WorkloadKey::generate().unwrap().csr_pem(&other).unwrap();
        assert!(matches!(
            ca.issue(&csr, &other, Validity::for_ttl(DEFAULT_TTL)),
            Err(CertError::WrongTrustDomain { .. })
        ));
    }

    #[test]
    fn saves_keys_0600_and_loads_the_same_ca() {
        let dir = tempfile::tempdir().unwrap();
        for with_intermediate in [false, true] {
            let sub = dir.path().join(with_intermediate.to_string());
            let ca = Ca::generate(td(), with_intermediate).unwrap();
            ca.save(&sub).unwrap();
            let mode = fs::metadata(sub.join(ROOT_KEY))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
            let loaded = Ca::load(td(), &sub).unwrap().unwrap();
            assert_eq!(loaded.root_pem(), ca.root_pem());
            let csr = WorkloadKey::generate().unwrap().csr_pem(&id("x")).unwrap();
            let issued = loaded
                .issue(&csr, &id("x"), Validity::for_ttl(DEFAULT_TTL))
                .unwrap();
            let chain_len = crate::inspect::certs_from_pem(&issued.chain_pem)
                .unwrap()
                .len();
            assert_eq!(chain_len, if with_intermediate { 2 } else { 1 });
        }
        assert!(Ca::load(td(), &dir.path().join("empty")).unwrap().is_none());
    }
}

//! Reading certificates: identity, serial, issuer, validity, key usage.
//!
//! Used by the verifiers on every handshake and by `capmesh cert inspect`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::{CertError, SpiffeId};

/// What a certificate says, in plain values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The SPIFFE ID in the URI SAN, when there is exactly one valid one.
    pub identity: Option<SpiffeId>,
    /// Every URI SAN as written (to show what was there when `identity` is `None`).
    pub uris: Vec<String>,
    /// DNS-name SANs (the control plane's serving certificate has some; workloads have none).
    pub dns_names: Vec<String>,
    /// Serial number, lowercase hex without leading zero bytes.
    pub serial: String,
    /// Issuer distinguished name.
    pub issuer: String,
    /// Subject distinguished name (empty for workload certificates).
    pub subject: String,
    /// Start of the validity window.
    pub not_before: SystemTime,
    /// End of the validity window.
    pub not_after: SystemTime,
    /// Whether it is a CA certificate.
    pub is_ca: bool,
    /// Key usages (`digitalSignature`, `keyCertSign`, ...).
    pub key_usage: Vec<&'static str>,
    /// Extended key usages (`serverAuth`, `clientAuth`).
    pub extended_key_usage: Vec<&'static str>,
    /// SHA-256 of the DER, lowercase hex.
    pub fingerprint_sha256: String,
}

/// Lowercase hex of a serial's bytes without leading zero bytes, so the same serial always
/// prints the same way whatever its DER padding.
pub fn serial_hex(raw: &[u8]) -> String {
    let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
    let trimmed = &raw[start..];
    if trimmed.is_empty() {
        return "0".to_owned();
    }
    hex(trimmed)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn unix_time(ts: i64) -> SystemTime {
    if ts >= 0 {
        UNIX_EPOCH + Duration::from_secs(ts.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(ts.unsigned_abs())
    }
}

/// Reads every certificate in a PEM text (a chain or a bundle), in order.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Pem {
            what: "certificate",
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(CertError::Pem {
            what: "certificate",
            detail: "no CERTIFICATE block found".to_owned(),
        });
    }
    Ok(certs)
}

/// The SPIFFE ID of a certificate, read only from its URI SAN.
pub fn identity_of(der: &[u8]) -> Result<SpiffeId, CertError> {
    let info = inspect_der(der)?;
    match (info.identity, info.uris.as_slice()) {
        (Some(id), _) => Ok(id),
        (None, []) => Err(CertError::NoIdentity),
        (None, uris) => Err(CertError::BadIdentity(uris.join(", "))),
    }
}

/// Parses one DER certificate.
pub fn inspect_der(der: &[u8]) -> Result<CertInfo, CertError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| CertError::Pem {
        what: "certificate",
        detail: format!("not a valid X.509 certificate: {e}"),
    })?;
    let mut uris = Vec::new();
    let mut dns_names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(u) => uris.push((*u).to_owned()),
                GeneralName::DNSName(d) => dns_names.push((*d).to_owned()),
                _ => {}
            }
        }
    }
    let identity = match uris.as_slice() {
        [only] => only.parse::<SpiffeId>().ok(),
        _ => None,
    };
    let mut key_usage = Vec::new();
    if let Ok(Some(ku)) = cert.key_usage() {
        let ku = ku.value;
        let flags = [
            (ku.digital_signature(), "digitalSignature"),
            (ku.key_encipherment(), "keyEncipherment"),
            (ku.key_agreement(), "keyAgreement"),
            (ku.key_cert_sign(), "keyCertSign"),
            (ku.crl_sign(), "cRLSign"),
        ];
        key_usage.extend(flags.iter().filter(|(on, _)| *on).map(|(_, n)| *n));
    }
    let mut extended_key_usage = Vec::new();
    if let Ok(Some(eku)) = cert.extended_key_usage() {
        if eku.value.server_auth {
            extended_key_usage.push("serverAuth");
        }
        if eku.value.client_auth {
            extended_key_usage.push("clientAuth");
        }
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    Ok(CertInfo {
        identity,
        uris,
        dns_names,
        serial: serial_hex(cert.tbs_certificate.raw_serial()),
        issuer: cert.issuer().to_string(),
        subject: cert.subject().to_string(),
        not_before: unix_time(cert.validity().not_before.timestamp()),
        not_after: unix_time(cert.validity().not_after.timestamp()),
        is_ca: cert.is_ca(),
        key_usage,
        extended_key_usage,
        fingerprint_sha256: hex(digest.as_ref()),
    })
}

/// Parses the first certificate of a PEM text.
pub fn inspect_pem(pem: &str) -> Result<CertInfo, CertError> {
    let certs = certs_from_pem(pem)?;
    inspect_der(&certs[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_print_without_padding() {
        assert_eq!(serial_hex(&[0x00, 0x8f, 0x01]), "8f01");
        assert_eq!(serial_hex(&[0x01]), "01");
        assert_eq!(serial_hex(&[0x00]), "0");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(inspect_der(b"not a certificate").is_err());
        assert!(inspect_pem("hello").is_err());
        assert!(
            inspect_pem("-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n").is_err()
        );
    }
}

//! Secrets at rest: the CA key and the passthrough session key are sealed (AES-256-GCM) with the
//! key from `--store-key-file` before they reach the store, so a database dump or a replica's
//! PostgreSQL credentials do not give away the mesh CA.
//!
//! A sealed value is `cms1 ‖ nonce (12 bytes) ‖ ciphertext ‖ tag`; the purpose (`ca-key`,
//! `session-key`) is the AEAD's associated data, so one sealed value cannot stand in for the other.

use std::path::Path;

use base64::Engine;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

/// What a sealed value starts with.
const MAGIC: &[u8; 4] = b"cms1";

/// What a sealed value is for: bound into the seal as associated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// The mesh CA's private key (PEM).
    CaKey,
    /// The passthrough session-sealing key.
    SessionKey,
}

impl Purpose {
    fn aad(self) -> &'static [u8] {
        match self {
            Purpose::CaKey => b"capmesh ca-key",
            Purpose::SessionKey => b"capmesh session-key",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Purpose::CaKey => "the CA key",
            Purpose::SessionKey => "the session key",
        }
    }
}

/// Why a store key cannot be used, or a sealed value cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The key file cannot be read or does not hold a key.
    #[error(
        "--store-key-file {path}: {problem}: it must hold 32 random bytes as 64 hex characters or base64, such as `openssl rand -hex 32 > {path}`"
    )]
    KeyFile {
        /// The file as given.
        path: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A sealed value does not open with this key.
    #[error(
        "{what} in the store does not open with --store-key-file: it was sealed with another key (or altered); pass the key file the store was first started with"
    )]
    WrongKey {
        /// What was being opened.
        what: &'static str,
    },
    /// The system random number generator failed.
    #[error("the system random number generator failed while sealing {what}")]
    Random {
        /// What was being sealed.
        what: &'static str,
    },
}

/// The key from `--store-key-file`.
pub struct StoreKey {
    key: LessSafeKey,
}

impl std::fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreKey(..)")
    }
}

impl StoreKey {
    /// Reads the key from `path`: 64 hex characters or the base64 of 32 bytes, surrounding
    /// whitespace ignored (a Kubernetes Secret mounted as a file, or `openssl rand -hex 32`).
    pub fn from_file(path: &Path) -> Result<Self, SealError> {
        let fail = |problem: String| SealError::KeyFile {
            path: path.display().to_string(),
            problem,
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| fail(format!("cannot read it as text: {e}")))?;
        let bytes = parse_key(text.trim()).map_err(fail)?;
        Self::from_bytes(&bytes).map_err(fail)
    }

    /// A key from its 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        let unbound = UnboundKey::new(&AES_256_GCM, bytes)
            .map_err(|_| format!("the key has {} bytes, not 32", bytes.len()))?;
        Ok(Self {
            key: LessSafeKey::new(unbound),
        })
    }

    /// Seals `plain` for `purpose`.
    pub fn seal(&self, purpose: Purpose, plain: &[u8]) -> Result<Vec<u8>, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| SealError::Random {
                what: purpose.what(),
            })?;
        let mut body = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(purpose.aad()),
                &mut body,
            )
            .map_err(|_| SealError::Random {
                what: purpose.what(),
            })?;
        let mut out = Vec::with_capacity(MAGIC.len() + NONCE_LEN + body.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Opens a value sealed for `purpose`.
    pub fn open(&self, purpose: Purpose, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        let wrong = || SealError::WrongKey {
            what: purpose.what(),
        };
        let rest = sealed.strip_prefix(MAGIC.as_slice()).ok_or_else(wrong)?;
        if rest.len() < NONCE_LEN {
            return Err(wrong());
        }
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| wrong())?;
        let mut body = body.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(purpose.aad()), &mut body)
            .map_err(|_| wrong())?;
        Ok(plain.to_vec())
    }
}

/// Whether `value` is a sealed value (as opposed to a plaintext one written without a key).
pub fn is_sealed(value: &[u8]) -> bool {
    value.starts_with(MAGIC)
}

fn parse_key(text: &str) -> Result<Vec<u8>, String> {
    if text.is_empty() {
        return Err("it is empty".into());
    }
    if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return (0..64)
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).map_err(|e| e.to_string()))
            .collect();
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|_| "it is neither 64 hex characters nor base64".to_owned())?;
    if decoded.len() != 32 {
        return Err(format!("it decodes to {} bytes, not 32", decoded.len()));
    }
    Ok(decoded)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn key(byte: u8) -> StoreKey {
        StoreKey::from_bytes(&[byte; 32]).unwrap()
    }

    #[test]
    fn sealed_values_open_only_with_their_key_and_purpose() {
        let k = key(7);
        let sealed = k
            .seal(Purpose::CaKey, b"-----BEGIN PRIVATE KEY-----")
            .unwrap();
        assert!(is_sealed(&sealed));
        assert!(
            !sealed.windows(11).any(|w| w == b"-----BEGIN "),
            "no plaintext inside"
        );
        assert_eq!(
            k.open(Purpose::CaKey, &sealed).unwrap(),
            b"-----BEGIN PRIVATE KEY-----"
        );
        let err = key(8)
            .open(Purpose::CaKey, &sealed)
            .unwrap_err()
            .to_string();
        assert!(err.contains("sealed with another key"), "{err}");
        assert!(
            k.open(Purpose::SessionKey, &sealed).is_err(),
            "purpose is bound"
        );
        let mut tampered = sealed.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(k.open(Purpose::CaKey, &tampered).is_err());
        assert!(k.open(Purpose::CaKey, b"cms1").is_err());
        assert!(k.open(Purpose::CaKey, &[1; 32]).is_err());
        // Two seals of the same value differ (fresh nonce).
        assert_ne!(
            sealed,
            k.seal(Purpose::CaKey, b"-----BEGIN PRIVATE KEY-----")
                .unwrap()
        );
    }

    #[test]
    fn key_files_take_hex_or_base64_and_say_how_to_make_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, format!("{}\n", "ab".repeat(32))).unwrap();
        assert!(StoreKey::from_file(&path).is_ok());
        std::fs::write(
            &path,
            base64::engine::general_purpose::STANDARD.encode([9u8; 32]),
        )
        .unwrap();
        assert!(StoreKey::from_file(&path).is_ok());
        for (content, problem) in [
            ("", "it is empty"),
            ("not a key!", "neither 64 hex characters nor base64"),
            ("abcd", "decodes to 3 bytes, not 32"),
            ("aGVsbG8=", "decodes to 5 bytes, not 32"),
        ] {
            std::fs::write(&path, content).unwrap();
            let err = StoreKey::from_file(&path).unwrap_err().to_string();
            assert!(err.contains(problem), "{err}");
            assert!(err.starts_with("--store-key-file "), "{err}");
            assert!(err.contains("openssl rand -hex 32"), "{err}");
        }
        let err = StoreKey::from_file(&dir.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot read it"), "{err}");
    }
}

//! The CA service: the mesh CA's life (created on first start, kept in the store), bootstrap
//! tokens, and `POST /v1/certificates`.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use capmesh_api::rest::{
    CertificateRequest, CertificateResponse, TokenCreated, TokenInfo, TokenRequest,
};
use capmesh_api::{TrustDomain, glob_match};
use capmesh_certs::ca::requested_identity;
use capmesh_certs::{Ca, CertError, SYSTEM_NAMESPACE, SpiffeId, Validity, VerifiedPeer};
use ring::rand::SecureRandom;

use anyhow::{Context, bail};

use crate::error::Error;
use crate::store::{Purpose, Store, StoreError, StoreKey, StoredCa, StoredKey, StoredToken};

/// Loads the CA from the store, or creates one (from `byo` files when given) and saves it,
/// its key sealed with `key` when there is one. Replicas starting together on an empty store
/// race to save theirs: the first wins and the others load it. Writes the root to
/// `<data-dir>/ca.pem` for clients either way.
pub async fn load_or_create(
    store: &impl Store,
    key: Option<&StoreKey>,
    trust_domain: &TrustDomain,
    data_dir: &Path,
    byo: Option<(String, String)>,
) -> anyhow::Result<Ca> {
    let ca = match store.ca().await? {
        Some(stored) => from_stored(store, key, trust_domain, stored).await?,
        None => {
            let (ca, cert_pem, key_pem, root_pem) = match byo {
                Some((cert, key)) => {
                    let ca = Ca::from_pem(trust_domain.clone(), &cert, &key, None)?;
                    (ca, cert, key, None)
                }
                None => {
                    let ca = Ca::generate(trust_domain.clone(), false)?;
                    let (cert_pem, key_pem, root_pem) = ca.export_pem();
                    (ca, cert_pem, key_pem, root_pem)
                }
            };
            let stored = StoredCa {
                cert_pem,
                key: match key {
                    Some(k) => StoredKey::Sealed(k.seal(Purpose::CaKey, key_pem.as_bytes())?),
                    None => StoredKey::Plain(key_pem),
                },
                root_pem,
            };
            match store.insert_ca(&stored).await {
                Ok(()) => {
                    tracing::info!(trust_domain = %trust_domain, sealed = key.is_some(), "created the mesh CA");
                    ca
                }
                Err(StoreError::Conflict { .. }) => {
                    let stored = store
                        .ca()
                        .await?
                        .context("the store reported a CA, then had none")?;
                    tracing::info!("another replica created the mesh CA first; using it");
                    from_stored(store, key, trust_domain, stored).await?
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    capmesh_certs::ca::write_file(&data_dir.join("ca.pem"), ca.root_pem(), 0o644)?;
    Ok(ca)
}

/// The CA from its stored form: the key unsealed (or, when a store key is given for a store
/// that has the key in plaintext, sealed in place from now on).
async fn from_stored(
    store: &impl Store,
    key: Option<&StoreKey>,
    trust_domain: &TrustDomain,
    stored: StoredCa,
) -> anyhow::Result<Ca> {
    let key_pem = match (&stored.key, key) {
        (StoredKey::Sealed(sealed), Some(k)) => String::from_utf8(k.open(Purpose::CaKey, sealed)?)
            .context("the unsealed CA key is not text")?,
        (StoredKey::Sealed(_), None) => bail!(
            "the CA key in the store is sealed: pass --store-key-file with the key the store was first started with"
        ),
        (StoredKey::Plain(pem), Some(k)) => {
            store
                .seal_ca_key(&k.seal(Purpose::CaKey, pem.as_bytes())?)
                .await?;
            tracing::info!("sealed the CA key in the store with --store-key-file");
            pem.clone()
        }
        (StoredKey::Plain(pem), None) => pem.clone(),
    };
    Ok(Ca::from_pem(
        trust_domain.clone(),
        &stored.cert_pem,
        &key_pem,
        stored.root_pem.as_deref(),
    )?)
}

pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

pub(crate) fn random_hex(bytes: usize) -> Result<String, Error> {
    let mut buf = vec![0u8; bytes];
    ring::rand::SystemRandom::new()
        .fill(&mut buf)
        .map_err(|_| Error::internal("the system random number generator failed"))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

pub(crate) fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Compares secrets without an early exit, so timing does not reveal how much of a guess
/// matched.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Creates a bootstrap token. The secret is shown once, here; only its hash is stored.
/// `max_ttl` is the control plane's `--max-token-ttl`.
pub async fn create_token(
    store: &impl Store,
    req: TokenRequest,
    max_ttl: Duration,
) -> Result<TokenCreated, Error> {
    let max = max_ttl.as_secs();
    if req.ttl_secs == 0 || req.ttl_secs > max {
        return Err(Error::invalid(format!(
            "ttl_secs {} is out of range: use 1 to {max} seconds (the control plane's --max-token-ttl)",
            req.ttl_secs
        )));
    }
    if req.agent_pattern.is_empty()
        || !req
            .agent_pattern
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'*')
    {
        return Err(Error::invalid(format!(
            "agent_pattern {:?} is not valid: use an agent name with '*' wildcards, such as weather-* or *",
            req.agent_pattern
        )));
    }
    // capmesh-system holds the control plane's and the admin's identities: a token for it is
    // a way to become admin, so it is made only when asked for in so many words.
    if req.namespace.as_str() == SYSTEM_NAMESPACE && !req.system {
        return Err(Error::denied(format!(
            "a token for namespace {SYSTEM_NAMESPACE} (the control plane's and the admin's identities) needs \"system\": true (`capmesh token create --system`)"
        )));
    }
    if req.uses == Some(0) {
        return Err(Error::invalid(
            "uses 0 would make a token that can never be used: give 1 or more, or leave it out",
        ));
    }
    // One exact agent: one certificate, unless more are asked for.
    let uses = req
        .uses
        .or_else(|| (!req.agent_pattern.contains('*')).then_some(1));
    let id = random_hex(6)?;
    let secret = random_hex(24)?;
    let info = TokenInfo {
        id: id.clone(),
        namespace: req.namespace,
        agent_pattern: req.agent_pattern,
        expires_unix: unix_now() + req.ttl_secs as i64,
        revoked: false,
        uses,
        used: 0,
        description: req.description,
    };
    store
        .insert_token(&StoredToken {
            info: info.clone(),
            secret_sha256: sha256_hex(secret.as_bytes()),
        })
        .await?;
    tracing::info!(id = %id, namespace = %info.namespace, pattern = %info.agent_pattern, uses = %info.uses.map_or_else(|| "unlimited".to_owned(), |u| u.to_string()), "bootstrap token created");
    Ok(TokenCreated {
        info,
        token: format!("cmt_{id}_{secret}"),
    })
}

/// Checks a bootstrap token for `identity`: it must exist, match, be unexpired and unrevoked,
/// and cover the identity's namespace and agent name.
async fn check_token(store: &impl Store, token: &str, identity: &SpiffeId) -> Result<(), Error> {
    let denied = |why: &str| Error::denied(format!("bootstrap token refused: {why}"));
    let rest = token
        .strip_prefix("cmt_")
        .ok_or_else(|| denied("it is not a capmesh token (cmt_…)"))?;
    let (id, secret) = rest
        .split_once('_')
        .ok_or_else(|| denied("it is malformed"))?;
    let stored = store
        .token(id)
        .await?
        .ok_or_else(|| denied("unknown token"))?;
    let given = sha256_hex(secret.as_bytes());
    if !constant_time_eq(given.as_bytes(), stored.secret_sha256.as_bytes()) {
        return Err(denied("unknown token"));
    }
    if stored.info.revoked {
        return Err(denied("the token was revoked"));
    }
    if stored.info.expires_unix <= unix_now() {
        return Err(denied(
            "the token expired: create a new one with `capmesh token create`",
        ));
    }
    if identity.namespace() != &stored.info.namespace
        || !glob_match(&stored.info.agent_pattern, identity.agent().as_str())
    {
        return Err(denied(&format!(
            "it is for namespace {} and agents {:?}, not {identity}",
            stored.info.namespace, stored.info.agent_pattern
        )));
    }
    store.use_token(id).await.map_err(|e| match e {
        StoreError::Exhausted { uses, .. } => denied(&format!(
            "it has been used {uses} time(s), all it may be: create a new one (`capmesh token create --uses N` for more)"
        )),
        other => other.into(),
    })?;
    Ok(())
}

/// `POST /v1/certificates`: first certificates against a bootstrap token, renewals against the
/// caller's current certificate, which the mesh CA must have issued (an entity's certificate is
/// never laundered into a mesh one) for the same identity. A revoked identity gets neither.
pub async fn issue(
    app: &crate::App,
    peer: Option<&VerifiedPeer>,
    req: &CertificateRequest,
) -> Result<CertificateResponse, Error> {
    let requested = requested_identity(&req.csr_pem).map_err(|e| Error::invalid(e.to_string()))?;
    if requested.trust_domain() != &app.trust_domain {
        return Err(Error::denied(format!(
            "the CSR asks for {requested}, outside the mesh's trust domain {}: the mesh CA issues only its own identities",
            app.trust_domain
        )));
    }
    if crate::revocations::is_revoked(app, &requested).await? {
        return Err(Error::denied(format!(
            "{requested} is revoked: no certificate is issued for it until the revocation is lifted (`capmesh agent lift`)"
        )));
    }
    match (&req.token, peer) {
        (Some(token), _) => check_token(app.store.as_ref(), token, &requested).await?,
        (None, Some(peer)) if peer.entity.is_some() => {
            return Err(Error::denied(format!(
                "renewal refused: your certificate {} was issued by entity {:?}, not the mesh CA; the mesh renews only its own certificates",
                peer.identity,
                peer.entity.as_deref().unwrap_or_default()
            )));
        }
        (None, Some(peer)) if peer.identity == requested => {}
        (None, Some(peer)) => {
            return Err(Error::denied(format!(
                "renewal refused: the CSR asks for {requested}, but your certificate is {}",
                peer.identity
            )));
        }
        (None, None) => {
            return Err(Error::unauthenticated(
                "present a bootstrap token (\"token\") or your current mesh certificate",
            ));
        }
    }
    let ca = &app.ca;
    let issued = ca
        .issue(&req.csr_pem, &requested, Validity::for_ttl(app.cert_ttl))
        .map_err(|e| match e {
            CertError::NotEntitled { .. } | CertError::WrongTrustDomain { .. } => {
                Error::denied(e.to_string())
            }
            CertError::BadCsr(_) => Error::invalid(e.to_string()),
            other => Error::internal(other.to_string()),
        })?;
    tracing::info!(identity = %requested, serial = %issued.serial, renewal = req.token.is_none(), "certificate issued");
    Ok(CertificateResponse {
        certificate_chain_pem: issued.chain_pem,
        ca_bundle_pem: ca.root_pem().to_owned(),
        not_after_unix: issued.not_after.unix_timestamp(),
        identity: requested.to_string(),
    })
}

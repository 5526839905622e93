//! Workload revocation: one identity (`capmesh agent revoke <namespace>/<name>`) or one
//! certificate serial, stored, applied to this process's listener at once and pushed to every
//! proxy in the next delta. A stream or connection whose peer is revoked is closed by its
//! trust watcher (`TrustStore::until_refused`); renewal and first certificates for a revoked
//! identity are refused. Lifting deletes the revocation and pushes the change the same way.

use capmesh_api::rest::{Revocation, RevocationRequest};
use capmesh_certs::SpiffeId;
use capmesh_certs::inspect::serial_hex;

use crate::App;
use crate::ca::{random_hex, unix_now};
use crate::entities::apply_trust;
use crate::error::Error;
use crate::store::Store;

/// Reads an identity as `<namespace>/<agent>` (in the mesh's trust domain) or a SPIFFE ID.
pub fn parse_identity(app: &App, input: &str) -> Result<SpiffeId, Error> {
    let full = match input.split_once('/') {
        Some((ns, name)) if !input.starts_with("spiffe://") && !name.contains('/') => {
            format!("spiffe://{}/ns/{ns}/agent/{name}", app.trust_domain)
        }
        _ => input.to_owned(),
    };
    full.parse().map_err(|e| {
        Error::invalid(format!(
            "identity {input:?}: {e}: give <namespace>/<agent>, such as default/weather, or a whole SPIFFE ID"
        ))
    })
}

/// Reads a serial as printed by `capmesh cert inspect` or openssl (`0A:1B…`, any case, leading
/// zeros allowed) into the form the verifiers compare.
pub fn parse_serial(input: &str) -> Result<String, Error> {
    let digits: String = input
        .trim()
        .trim_start_matches("0x")
        .chars()
        .filter(|c| *c != ':')
        .collect();
    let bad = || {
        Error::invalid(format!(
            "serial {input:?} is not a hexadecimal serial number: copy it from `capmesh cert inspect` or `openssl x509 -serial`"
        ))
    };
    if digits.is_empty() || digits.len() > 64 || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let padded = if digits.len() % 2 == 1 {
        format!("0{digits}")
    } else {
        digits
    };
    let bytes = (0..padded.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&padded[i..i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| bad())?;
    Ok(serial_hex(&bytes))
}

/// Whether `identity` is revoked now.
pub async fn is_revoked(app: &App, identity: &SpiffeId) -> Result<bool, Error> {
    let id = identity.to_string();
    Ok(app
        .store
        .revocations()
        .await?
        .iter()
        .any(|r| r.identity.as_deref() == Some(id.as_str())))
}

/// `POST /v1/revocations`.
pub async fn revoke(app: &App, req: RevocationRequest) -> Result<Revocation, Error> {
    let (identity, serial) = match (&req.identity, &req.serial) {
        (Some(id), None) => (Some(parse_identity(app, id)?.to_string()), None),
        (None, Some(serial)) => (None, Some(parse_serial(serial)?)),
        _ => {
            return Err(Error::invalid(
                "give exactly one of \"identity\" (<namespace>/<agent> or a SPIFFE ID) and \"serial\"",
            ));
        }
    };
    if let Some(id) = &identity
        && id.ends_with("/ns/capmesh-system/agent/control-plane")
    {
        return Err(Error::invalid(
            "the control plane's own identity cannot be revoked: proxies would refuse it and stop receiving changes",
        ));
    }
    let revocation = Revocation {
        id: random_hex(6)?,
        identity,
        serial,
        reason: req.reason,
        created_unix: unix_now(),
    };
    app.store.insert_revocation(&revocation).await?;
    apply_trust(app).await?;
    tracing::info!(
        id = %revocation.id,
        identity = revocation.identity.as_deref().unwrap_or("-"),
        serial = revocation.serial.as_deref().unwrap_or("-"),
        "revoked: refused by the control plane now and pushed to every proxy"
    );
    Ok(revocation)
}

/// `DELETE /v1/revocations/{id}`.
pub async fn lift(app: &App, id: &str) -> Result<Revocation, Error> {
    let lifted = app.store.remove_revocation(id).await?;
    apply_trust(app).await?;
    tracing::info!(id = %id, identity = lifted.identity.as_deref().unwrap_or("-"), serial = lifted.serial.as_deref().unwrap_or("-"), "revocation lifted");
    Ok(lifted)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn serials_read_in_every_usual_spelling() {
        assert_eq!(parse_serial("0A:1B:ff").unwrap(), "0a1bff");
        assert_eq!(parse_serial("00:8f:01").unwrap(), "8f01");
        assert_eq!(parse_serial("0x8F01").unwrap(), "8f01");
        assert_eq!(parse_serial("f01").unwrap(), "0f01");
        let err = parse_serial("zz").unwrap_err();
        assert!(err.to_string().contains("capmesh cert inspect"), "{}", err);
        assert!(parse_serial("").is_err());
    }
}

//! Entities (registration trust, SPIFFE federation): other trust domains, each with the CA that
//! speaks for it, registered and revoked at run time. An entity's CA is trusted only for
//! identities in its own trust domain (see `capmesh_certs::verify`). Every change rebuilds the
//! trust bundle, applies it to the control plane's own listener and pushes it to every proxy in
//! the next delta; a revocation also closes the entity's streams.

use capmesh_api::rest::{Entity, EntityRequest, Revocation};
use capmesh_api::{EntityTrust, TrustBundle};
use capmesh_certs::inspect::{certs_from_pem, inspect_der};
use capmesh_certs::{EntityAnchor, TrustConfig};

use crate::App;
use crate::ca::unix_now;
use crate::error::Error;
use crate::store::Store;

/// The trust bundle for proxies and the trust config for this process, from the store.
pub fn trust_from_store(
    app_ca_root: &str,
    trust_domain: &capmesh_api::TrustDomain,
    entities: &[Entity],
    revocations: &[Revocation],
) -> (TrustBundle, TrustConfig) {
    let revoked: Vec<String> = entities
        .iter()
        .filter(|e| e.revoked_unix.is_some())
        .map(|e| e.name.clone())
        .collect();
    let revoked_serials: Vec<String> = revocations
        .iter()
        .filter_map(|r| r.serial.clone())
        .collect();
    let revoked_identities: Vec<String> = revocations
        .iter()
        .filter_map(|r| r.identity.clone())
        .collect();
    let bundle = TrustBundle {
        trust_domain: trust_domain.clone(),
        ca_pems: vec![app_ca_root.to_owned()],
        entities: entities
            .iter()
            .map(|e| EntityTrust {
                name: e.name.clone(),
                trust_domain: e.trust_domain.clone(),
                ca_pem: e.ca_pem.clone(),
            })
            .collect(),
        revoked_entities: revoked,
        revoked_serials,
        revoked_identities,
    };
    let config = TrustConfig::from(&bundle);
    (bundle, config)
}

/// Re-reads the entities and revocations and applies the resulting trust everywhere: this
/// process's listener at once, every proxy in its next delta, and the streams of revoked
/// entities (closed). Also how a change made on another replica is applied here.
pub async fn apply_trust(app: &App) -> Result<(), Error> {
    let entities = app.store.entities().await?;
    let revocations = app.store.revocations().await?;
    let (bundle, config) = trust_from_store(
        app.ca.root_pem(),
        &app.trust_domain,
        &entities,
        &revocations,
    );
    app.trust
        .update(&config)
        .map_err(|e| Error::internal(format!("cannot apply the trust bundle: {e}")))?;
    app.registry.set_trust(bundle);
    for revoked in entities.iter().filter(|e| e.revoked_unix.is_some()) {
        let closed = app.registry.close_entity_streams(&revoked.name);
        if closed > 0 {
            tracing::info!(entity = %revoked.name, streams_closed = closed, "closed the streams of a revoked entity");
        }
    }
    Ok(())
}

/// `POST /v1/entities`.
pub async fn register(app: &App, req: EntityRequest) -> Result<Entity, Error> {
    req.validate().map_err(|e| Error::invalid(e.to_string()))?;
    if req.trust_domain == app.trust_domain {
        return Err(Error::invalid(format!(
            "trust_domain {}: that is the mesh's own trust domain, which only the mesh CA speaks for: give the entity's own trust domain, such as partner.example",
            req.trust_domain
        )));
    }
    if let Some(other) =
        app.store.entities().await?.into_iter().find(|e| {
            e.revoked_unix.is_none() && e.trust_domain.as_ref() == Some(&req.trust_domain)
        })
    {
        return Err(Error::conflict(format!(
            "trust domain {} is already registered by entity {:?}: one CA speaks for a trust domain (revoke {:?} first)",
            req.trust_domain, other.name, other.name
        )));
    }
    let certs = certs_from_pem(&req.ca_pem).map_err(|e| Error::invalid(format!("ca_pem: {e}")))?;
    let mut fingerprint = String::new();
    for der in &certs {
        let info = inspect_der(der).map_err(|e| Error::invalid(format!("ca_pem: {e}")))?;
        if !info.is_ca {
            return Err(Error::invalid(format!(
                "ca_pem: the certificate {} is not a CA certificate (basicConstraints CA:TRUE is required)",
                info.subject
            )));
        }
        if fingerprint.is_empty() {
            fingerprint = info.fingerprint_sha256;
        }
    }
    // The mesh CA registered as an entity would let it speak for another domain too.
    let mesh_ca = capmesh_certs::inspect_pem(app.ca.root_pem())
        .map_err(|e| Error::internal(format!("the mesh CA does not parse: {e}")))?;
    for der in &certs {
        if inspect_der(der).is_ok_and(|i| i.fingerprint_sha256 == mesh_ca.fingerprint_sha256) {
            return Err(Error::invalid(
                "ca_pem: this is the mesh CA itself: register the entity's own CA",
            ));
        }
    }
    // Make sure rustls/webpki will take it as an anchor before anything is stored.
    let mut probe = TrustConfig::mesh_only(app.trust_domain.clone(), app.ca.root_pem());
    probe.entities = vec![EntityAnchor {
        name: req.name.clone(),
        trust_domain: Some(req.trust_domain.clone()),
        ca_pem: req.ca_pem.clone(),
    }];
    capmesh_certs::TrustStore::new(&probe).map_err(|e| Error::invalid(format!("ca_pem: {e}")))?;
    let entity = Entity {
        name: req.name,
        trust_domain: Some(req.trust_domain),
        ca_pem: req.ca_pem,
        fingerprint_sha256: fingerprint,
        created_unix: unix_now(),
        revoked_unix: None,
    };
    app.store.insert_entity(&entity).await?;
    apply_trust(app).await?;
    tracing::info!(entity = %entity.name, trust_domain = entity.trust_domain.as_ref().map_or("-", |t| t.as_str()), fingerprint = %entity.fingerprint_sha256, "entity registered");
    Ok(entity)
}

/// `DELETE /v1/entities/{name}`: revoke, push, and close the entity's open streams.
pub async fn revoke(app: &App, name: &str) -> Result<Entity, Error> {
    let entity = app.store.revoke_entity(name, unix_now()).await?;
    apply_trust(app).await?;
    tracing::info!(entity = %name, "entity revoked");
    Ok(entity)
}

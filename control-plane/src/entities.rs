//! Entities (registration trust): extra CAs the mesh trusts, registered and revoked at run time.
//! Every change rebuilds the trust bundle, applies it to the control plane's own listener and
//! pushes it to every proxy in the next delta; a revocation also closes the entity's streams.

use capmesh_api::rest::{Entity, EntityRequest};
use capmesh_api::{EntityTrust, TrustBundle};
use capmesh_certs::TrustConfig;
use capmesh_certs::inspect::{certs_from_pem, inspect_der};

use crate::App;
use crate::ca::unix_now;
use crate::rest::ApiError;
use crate::store::Store;

/// The trust bundle for proxies and the trust config for this process, from the store.
pub fn trust_from_store(
    app_ca_root: &str,
    trust_domain: &capmesh_api::TrustDomain,
    entities: &[Entity],
) -> (TrustBundle, TrustConfig) {
    let revoked: Vec<String> = entities
        .iter()
        .filter(|e| e.revoked_unix.is_some())
        .map(|e| e.name.clone())
        .collect();
    let bundle = TrustBundle {
        trust_domain: trust_domain.clone(),
        ca_pems: vec![app_ca_root.to_owned()],
        entities: entities
            .iter()
            .map(|e| EntityTrust {
                name: e.name.clone(),
                ca_pem: e.ca_pem.clone(),
            })
            .collect(),
        revoked_entities: revoked.clone(),
        revoked_serials: Vec::new(),
    };
    let config = TrustConfig {
        trust_domain: trust_domain.clone(),
        mesh_ca_pem: app_ca_root.to_owned(),
        entities: entities
            .iter()
            .map(|e| (e.name.clone(), e.ca_pem.clone()))
            .collect(),
        revoked_entities: revoked,
        revoked_serials: Vec::new(),
    };
    (bundle, config)
}

/// Re-reads the entities and applies the resulting trust everywhere: this process's listener,
/// every proxy (in the next delta), and the streams of revoked entities (closed). Also how a
/// change made on another replica is applied here.
pub async fn apply_trust(app: &App) -> Result<(), ApiError> {
    let entities = app.store.entities().await?;
    let (bundle, config) = trust_from_store(app.ca.root_pem(), &app.trust_domain, &entities);
    app.trust
        .update(&config)
        .map_err(|e| ApiError::internal(format!("cannot apply the trust bundle: {e}")))?;
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
pub async fn register(app: &App, req: EntityRequest) -> Result<Entity, ApiError> {
    req.validate()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let certs =
        certs_from_pem(&req.ca_pem).map_err(|e| ApiError::bad_request(format!("ca_pem: {e}")))?;
    let mut fingerprint = String::new();
    for der in &certs {
        let info = inspect_der(der).map_err(|e| ApiError::bad_request(format!("ca_pem: {e}")))?;
        if !info.is_ca {
            return Err(ApiError::bad_request(format!(
                "ca_pem: the certificate {} is not a CA certificate (basicConstraints CA:TRUE is required)",
                info.subject
            )));
        }
        if fingerprint.is_empty() {
            fingerprint = info.fingerprint_sha256;
        }
    }
    // Make sure rustls/webpki will take it as an anchor before anything is stored.
    let probe = TrustConfig {
        trust_domain: app.trust_domain.clone(),
        mesh_ca_pem: app.ca.root_pem().to_owned(),
        entities: vec![(req.name.clone(), req.ca_pem.clone())],
        revoked_entities: vec![],
        revoked_serials: vec![],
    };
    capmesh_certs::TrustStore::new(&probe)
        .map_err(|e| ApiError::bad_request(format!("ca_pem: {e}")))?;
    let entity = Entity {
        name: req.name,
        ca_pem: req.ca_pem,
        fingerprint_sha256: fingerprint,
        created_unix: unix_now(),
        revoked_unix: None,
    };
    app.store.insert_entity(&entity).await?;
    apply_trust(app).await?;
    tracing::info!(entity = %entity.name, fingerprint = %entity.fingerprint_sha256, "entity registered");
    Ok(entity)
}

/// `DELETE /v1/entities/{name}`: revoke, push, and close the entity's open streams.
pub async fn revoke(app: &App, name: &str) -> Result<Entity, ApiError> {
    let entity = app.store.revoke_entity(name, unix_now()).await?;
    apply_trust(app).await?;
    tracing::info!(entity = %name, "entity revoked");
    Ok(entity)
}

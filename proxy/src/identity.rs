//! The proxy's workload identity: its first certificate (a bootstrap token at the control
//! plane's CA, or files), renewal at 70 % of the lifetime with the current certificate, and file
//! reloads. The private key is made here and never leaves the process.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use capmesh_api::rest::{CertificateRequest, CertificateResponse};
use capmesh_certs::{
    Credential, CredentialCell, Renew, SpiffeId, TrustConfig, TrustStore, WorkloadKey,
};
use capmesh_client::{ControlPlaneAddrs, ControlPlaneClient, ServerCheck};

use crate::backoff::ExponentialBackoff;
use crate::config::Config;
use crate::readiness::{Condition, Readiness, StartupWait};

/// The control plane's own SPIFFE ID in `trust_domain`.
pub fn control_plane_id(trust_domain: &capmesh_api::TrustDomain) -> anyhow::Result<SpiffeId> {
    Ok(SpiffeId::new(
        trust_domain.clone(),
        "capmesh-system".parse()?,
        "control-plane".parse()?,
    ))
}

/// Where the certificate comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// The control plane's CA.
    ControlPlane,
    /// Files, reloaded when they change.
    Files {
        /// Certificate chain.
        cert: PathBuf,
        /// Private key.
        key: PathBuf,
    },
}

/// The proxy's identity and what it trusts.
#[derive(Debug, Clone)]
pub struct Identity {
    /// This proxy's SPIFFE ID.
    pub id: SpiffeId,
    /// The credential in force (rotated in place).
    pub cell: Arc<CredentialCell>,
    /// Trust anchors and revocations (replaced from every snapshot).
    pub trust: Arc<TrustStore>,
    /// Where the certificate comes from.
    pub source: Source,
}

fn read(path: &Path, flag: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(path)
        .with_context(|| format!("{flag} {}: cannot read it", path.display()))
}

/// Parses `--control-plane` (one URL or several).
pub fn control_plane_url(config: &Config) -> anyhow::Result<ControlPlaneAddrs> {
    Ok(config.control_plane.parse()?)
}

async fn request_certificate(
    client: &ControlPlaneClient,
    id: &SpiffeId,
    token: Option<String>,
) -> anyhow::Result<Credential> {
    let key = WorkloadKey::generate()?;
    let resp: CertificateResponse = client
        .post(
            "/v1/certificates",
            &CertificateRequest {
                csr_pem: key.csr_pem(id)?,
                token,
            },
            None,
        )
        .await?;
    Ok(Credential::with_key(&resp.certificate_chain_pem, &key)?)
}

/// Gets the first certificate. With a bootstrap token this waits for the control plane (the
/// sidecar may start first), retrying with backoff, and records why it waits in `readiness`
/// (logged at WARN once, then at a bounded interval); a refusal (bad token) fails at once.
pub async fn obtain(config: &Config, readiness: &Readiness) -> anyhow::Result<Identity> {
    let id = SpiffeId::new(
        config.trust_domain.clone(),
        config.namespace.clone(),
        config.agent_name.clone(),
    );
    let ca_path = config
        .tls_ca
        .as_ref()
        .or(config.control_plane_ca.as_ref())
        .context("--control-plane-ca is required: pass the control plane's <data-dir>/ca.pem")?;
    let ca_pem = read(ca_path, "--control-plane-ca")?;
    let trust = Arc::new(TrustStore::new(&TrustConfig::mesh_only(
        config.trust_domain.clone(),
        ca_pem,
    ))?);

    if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
        let credential =
            Credential::from_pem(&read(cert, "--tls-cert")?, &read(key, "--tls-key")?)?;
        let own = credential.identity().clone();
        if own.namespace() != id.namespace() || own.agent() != id.agent() {
            bail!(
                "--tls-cert {} is for {own}, but this proxy is {id}: fix --agent-name/--namespace or the certificate",
                cert.display(),
            );
        }
        // An entity's workload: its identity is in the entity's own trust domain, while
        // --trust-domain stays the mesh's (the control plane's identity and the peers').
        if own.trust_domain() != id.trust_domain() {
            tracing::info!(identity = %own, mesh = %id.trust_domain(), "an entity's workload: its identity is in its own trust domain");
        }
        return Ok(Identity {
            id: own,
            cell: Arc::new(CredentialCell::new(credential)),
            trust,
            source: Source::Files {
                cert: cert.clone(),
                key: key.clone(),
            },
        });
    }

    // The token file is read again before every attempt, so a refused token can be replaced
    // without restarting the sidecar.
    let read_token = || -> anyhow::Result<String> {
        match (&config.bootstrap_token, &config.bootstrap_token_file) {
            (Some(t), _) => Ok(t.trim().to_owned()),
            (None, Some(path)) => Ok(read(path, "--bootstrap-token-file")?.trim().to_owned()),
            (None, None) => bail!(
                "no way to get a certificate: pass --bootstrap-token or --bootstrap-token-file (see `capmesh token create`), \
                 or --tls-cert and --tls-key"
            ),
        }
    };
    read_token()?;
    let client = ControlPlaneClient::new(
        control_plane_url(config)?,
        ServerCheck::Spiffe(control_plane_id(&config.trust_domain)?),
        Some(trust.clone()),
        None,
    )?;
    let mut backoff =
        ExponentialBackoff::new(Duration::from_millis(100), Duration::from_secs(5)).backoff();
    let mut wait = StartupWait::new("the first certificate");
    loop {
        let attempt = match read_token() {
            Ok(token) => request_certificate(&client, &id, Some(token)).await,
            Err(e) => Err(e),
        };
        match attempt {
            Ok(credential) => {
                wait.done();
                tracing::info!(identity = %id, serial = %credential.serial(), "got the first certificate");
                return Ok(Identity {
                    id,
                    cell: Arc::new(CredentialCell::new(credential)),
                    trust,
                    source: Source::ControlPlane,
                });
            }
            Err(e) => {
                let (reason, fix) = match e.downcast_ref() {
                    Some(capmesh_client::ClientError::Api { status, detail, .. }) => (
                        format!(
                            "the control plane at {} refused the bootstrap token for {id} (HTTP {status}): {detail}",
                            config.control_plane
                        ),
                        format!(
                            "check --agent-name and --namespace, or create a token for them (capmesh token create --namespace {} --agent {}) and pass it with --bootstrap-token-file (re-read on every attempt)",
                            config.namespace, config.agent_name
                        ),
                    ),
                    _ => (
                        crate::readiness::error_text(&e),
                        "start the control plane, or fix --control-plane / --control-plane-ca"
                            .to_owned(),
                    ),
                };
                readiness.waiting(Condition::Certificate, reason.clone());
                wait.waiting(&reason, &fix, false);
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

/// Renews from the control plane, authenticated by the current certificate.
#[derive(Debug)]
pub struct ControlPlaneRenewer {
    /// A client that presents the current credential.
    pub client: ControlPlaneClient,
    /// The identity to renew.
    pub id: SpiffeId,
}

impl Renew for ControlPlaneRenewer {
    async fn renew(&self, _current: Arc<Credential>) -> Result<Credential, String> {
        request_certificate(&self.client, &self.id, None)
            .await
            .map_err(|e| format!("{e:#}"))
    }
}

/// Reloads file-based certificates when either file changes (checked every 2 s).
pub async fn watch_files(
    cell: Arc<CredentialCell>,
    cert: PathBuf,
    key: PathBuf,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let stamp = |p: &Path| {
        std::fs::metadata(p)
            .and_then(|m| m.modified())
            .unwrap_or(SystemTime::UNIX_EPOCH)
    };
    let mut last = (stamp(&cert), stamp(&key));
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
        let now = (stamp(&cert), stamp(&key));
        if now == last {
            continue;
        }
        let loaded = std::fs::read_to_string(&cert)
            .and_then(|c| std::fs::read_to_string(&key).map(|k| (c, k)))
            .map_err(|e| e.to_string())
            .and_then(|(c, k)| Credential::from_pem(&c, &k).map_err(|e| e.to_string()))
            .and_then(|cred| cell.store(cred).map_err(|e| e.to_string()));
        match loaded {
            Ok(()) => {
                last = now;
                tracing::info!(serial = %cell.current().serial(), "certificate reloaded from files");
            }
            // Half-written files (a rotation in progress): try again next tick.
            Err(e) => {
                tracing::warn!(error = %e, "certificate files changed but cannot be loaded yet; keeping the current one")
            }
        }
    }
}

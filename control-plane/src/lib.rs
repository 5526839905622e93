//! capmesh control plane: the registry of agents and capabilities, the topology stream that
//! pushes snapshots and deltas to proxies, the CA service, entities (registration trust), the
//! authorization policy, the REST API and the admin endpoints, and the admission webhook that
//! injects the sidecar (with [`inject`], which `capmesh inject` uses too).
//!
//! It owns the mesh's durable state (the store) and its live state (the registry). It does not
//! route calls: proxies do, on the snapshots it pushes. Data-plane traffic never touches it, so
//! an outage here stops changes, not calls.
#![forbid(unsafe_code)]

pub mod ca;
pub mod config;
pub mod dashboard;
pub mod entities;
pub mod inject;
pub mod metrics;
pub mod registry;
pub mod rest;
pub mod server;
pub mod spans;
pub mod store;
pub mod stream;
pub mod webhook;

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use capmesh_api::{AgentName, MeshSettings, Namespace, TrustDomain};
use capmesh_certs::{
    Ca, Credential, CredentialCell, MeshAcceptor, Renew, RenewPolicy, SpiffeId, TlsMode,
    TrustStore, Validity, WorkloadKey,
};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use config::Config;
use metrics::Metrics;
use registry::Registry;
use store::{SqliteStore, Store};

/// Everything a request handler needs. One per process.
#[derive(Debug)]
pub struct App {
    /// Durable state.
    pub store: Arc<dyn Store>,
    /// Live state.
    pub registry: Arc<Registry>,
    /// The mesh CA.
    pub ca: Ca,
    /// What this process's listener trusts (mesh CA + entities).
    pub trust: Arc<TrustStore>,
    /// The mesh's trust domain.
    pub trust_domain: TrustDomain,
    /// Lifetime of issued workload certificates.
    pub cert_ttl: Duration,
    /// How long a dropped stream's endpoints stay.
    pub grace: Duration,
    /// The admin token.
    pub admin_token: String,
    /// Metrics.
    pub metrics: Metrics,
    /// True once the API listener is serving.
    pub ready: AtomicBool,
    /// Sampled spans and traffic reports from the proxies (this replica's streams only).
    pub observed: spans::Observed,
}

impl App {
    /// Saves an instance's current record (after it connected, re-registered or changed
    /// health), so a restarted control plane keeps serving it until it reconnects.
    pub fn persist(&self, proxy_id: &str) {
        let Some(record) = self.registry.record(proxy_id) else {
            return;
        };
        let result = serde_json::to_string(&record)
            .map_err(|e| e.to_string())
            .and_then(|json| {
                self.store
                    .upsert_instance(proxy_id, &json)
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = result {
            tracing::warn!(proxy_id, error = %e, "cannot persist the instance; a restart would forget it");
        }
    }

    /// Forgets a withdrawn instance.
    pub fn forget(&self, proxy_id: &str) {
        if let Err(e) = self.store.remove_instance(proxy_id) {
            tracing::warn!(proxy_id, error = %e, "cannot remove the withdrawn instance from the store");
        }
    }

    /// Brings back the instances a previous run knew; each is withdrawn after `restart_grace`
    /// unless its proxy reconnects first.
    fn restore_instances(self: &Arc<Self>, restart_grace: Duration) -> anyhow::Result<usize> {
        let stored = self.store.instances()?;
        let mut restored = 0;
        for (proxy_id, json) in stored {
            let record: registry::InstanceRecord = match serde_json::from_str(&json) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(proxy_id = %proxy_id, error = %e, "dropping an unreadable stored instance");
                    self.forget(&proxy_id);
                    continue;
                }
            };
            let epoch = self.registry.restore(record);
            restored += 1;
            let app = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(restart_grace).await;
                if app.registry.expire(&proxy_id, epoch) {
                    tracing::info!(proxy_id = %proxy_id, "did not reconnect after the restart; endpoints withdrawn");
                    app.forget(&proxy_id);
                }
            });
        }
        Ok(restored)
    }
}

/// The control plane's own identity: `spiffe://<td>/ns/capmesh-system/agent/control-plane`.
pub fn control_plane_identity(trust_domain: &TrustDomain) -> anyhow::Result<SpiffeId> {
    Ok(SpiffeId::new(
        trust_domain.clone(),
        Namespace::new("capmesh-system")?,
        AgentName::new("control-plane")?,
    ))
}

fn admin_token(config: &Config) -> anyhow::Result<String> {
    if let Some(path) = &config.admin_token_file {
        let token = std::fs::read_to_string(path)
            .with_context(|| format!("--admin-token-file {}: cannot read it", path.display()))?;
        let token = token.trim().to_owned();
        if token.len() < 16 {
            bail!(
                "--admin-token-file {}: the token is shorter than 16 characters; use a long random string",
                path.display()
            );
        }
        return Ok(token);
    }
    let path = config.data_dir.join("admin-token");
    if path.exists() {
        return Ok(std::fs::read_to_string(&path)?.trim().to_owned());
    }
    let token = ca::random_hex(32).map_err(|e| anyhow::anyhow!(e.detail))?;
    capmesh_certs::ca::write_file(&path, &format!("{token}\n"), 0o600)?;
    tracing::info!(path = %path.display(), "generated the admin token");
    Ok(token)
}

fn host_names(config: &Config) -> Vec<String> {
    let mut names = vec!["localhost".to_owned()];
    if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let host = host.trim();
        if !host.is_empty() && host != "localhost" {
            names.push(host.to_owned());
        }
    }
    names.extend(config.server_names.iter().cloned());
    names
}

/// Issues (and re-issues, for rotation) the control plane's serving certificate.
#[derive(Debug)]
struct ServingCert {
    ca: Ca,
    identity: SpiffeId,
    names: Vec<String>,
    ips: Vec<IpAddr>,
    ttl: Duration,
}

impl ServingCert {
    fn issue(&self) -> Result<Credential, capmesh_certs::CertError> {
        let key = WorkloadKey::generate()?;
        let issued = self.ca.issue_serving(
            &key,
            &self.identity,
            &self.names,
            &self.ips,
            Validity::for_ttl(self.ttl),
        )?;
        Credential::with_key(&issued.chain_pem, &key)
    }
}

impl Renew for ServingCert {
    async fn renew(&self, _current: Arc<Credential>) -> Result<Credential, String> {
        self.issue().map_err(|e| e.to_string())
    }
}

/// The mesh's passthrough session key as hex: created once (32 random bytes), then read back.
fn session_key(store: &dyn Store) -> anyhow::Result<String> {
    use ring::rand::SecureRandom;
    let mut fresh = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut fresh)
        .map_err(|_| anyhow::anyhow!("no system randomness for the session key"))?;
    let key = store.session_key_or_insert(&fresh)?;
    if key.len() != 32 {
        bail!("the stored session key has {} bytes, not 32", key.len());
    }
    Ok(key.iter().map(|b| format!("{b:02x}")).collect())
}

fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    match config.store.as_deref() {
        None => Ok(Arc::new(SqliteStore::open(
            &config.data_dir.join("capmesh.db"),
        )?)),
        Some(url) if url.starts_with("sqlite://") => Ok(Arc::new(SqliteStore::open(Path::new(
            url.trim_start_matches("sqlite://"),
        ))?)),
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => bail!(
            "--store {url:?}: the PostgreSQL store is not built yet; leave --store unset for the SQLite store in the data dir"
        ),
        Some(url) => bail!(
            "--store {url:?}: use sqlite:///path/to/file.db (or leave it unset for <data-dir>/capmesh.db)"
        ),
    }
}

/// The `capmesh-control-plane` program: parses `args` (the first is the program name), then
/// runs until SIGTERM or Ctrl-C. A bad flag prints clap's message and exits 2.
pub fn main_with_args(
    args: impl IntoIterator<Item = std::ffi::OsString>,
) -> std::process::ExitCode {
    use capmesh_client::process;
    process::main(
        "capmesh-control-plane",
        args,
        |c: &Config| c.log_format.as_str(),
        |c| run(c, process::shutdown_signal()),
    )
}

/// Runs the control plane until `shutdown` resolves.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("--data-dir {}: cannot create it", config.data_dir.display()))?;
    // The store holds the CA key: nobody else may read the data dir.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&config.data_dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| {
                format!(
                    "--data-dir {}: cannot restrict it to mode 0700",
                    config.data_dir.display()
                )
            })?;
    }
    let store = open_store(&config)?;
    let byo = match (&config.ca_cert, &config.ca_key) {
        (Some(cert), Some(key)) => Some((
            std::fs::read_to_string(cert)
                .with_context(|| format!("--ca-cert {}", cert.display()))?,
            std::fs::read_to_string(key).with_context(|| format!("--ca-key {}", key.display()))?,
        )),
        _ => None,
    };
    let ca = ca::load_or_create(store.as_ref(), &config.trust_domain, &config.data_dir, byo)?;
    let admin_token = admin_token(&config)?;
    let (bundle, trust_config) =
        entities::trust_from_store(ca.root_pem(), &config.trust_domain, &store.entities()?);
    let trust = Arc::new(TrustStore::new(&trust_config)?);
    let policy = store.policy()?.unwrap_or_default();
    let settings = MeshSettings {
        session_key: session_key(store.as_ref())?,
        ..store.settings()?.unwrap_or_default()
    };
    let registry = Arc::new(Registry::new(bundle, policy, settings));

    let (cert_pem, key_pem, root) = ca.export_pem();
    let serving = ServingCert {
        ca: Ca::from_pem(
            config.trust_domain.clone(),
            &cert_pem,
            &key_pem,
            root.as_deref(),
        )?,
        identity: control_plane_identity(&config.trust_domain)?,
        names: host_names(&config),
        ips: {
            let mut ips: Vec<IpAddr> = vec!["127.0.0.1".parse()?, "::1".parse()?];
            if !config.listen.ip().is_unspecified() && !ips.contains(&config.listen.ip()) {
                ips.push(config.listen.ip());
            }
            ips
        },
        ttl: config.cert_ttl,
    };
    let cell = Arc::new(CredentialCell::new(serving.issue()?));
    let acceptor = MeshAcceptor::new(
        TlsMode::Permissive,
        cell.clone(),
        trust.clone(),
        &[b"h2", b"http/1.1"],
    )?;

    let app = Arc::new(App {
        store,
        registry,
        ca,
        trust,
        trust_domain: config.trust_domain.clone(),
        cert_ttl: config.cert_ttl,
        grace: config.grace,
        admin_token,
        metrics: Metrics::new(),
        ready: AtomicBool::new(false),
        observed: spans::Observed::default(),
    });

    let restored = app.restore_instances(config.restart_grace)?;
    if restored > 0 {
        tracing::info!(
            restored,
            grace_ms = config.restart_grace.as_millis() as u64,
            "serving the last known instances until their proxies reconnect"
        );
    }

    let api = TcpListener::bind(config.listen).await.with_context(|| {
        format!(
            "--listen {}: cannot bind (in use? try another port)",
            config.listen
        )
    })?;
    // The admission webhook: its own TLS port and certificate (the API server's trust, not
    // the mesh's). Bound before anything is served, so a bad flag stops the start.
    let webhook = match (
        config.webhook_listen,
        &config.webhook_tls_cert,
        &config.webhook_tls_key,
    ) {
        (Some(addr), Some(cert), Some(key)) => {
            let tls = webhook::tls_config(cert, key)?;
            let listener = TcpListener::bind(addr).await.with_context(|| {
                format!("--webhook-listen {addr}: cannot bind (in use? try another port)")
            })?;
            tracing::info!(webhook = %listener.local_addr()?, "admission webhook listening (POST /inject)");
            Some((listener, tls))
        }
        _ => None,
    };
    let admin = TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| {
            format!(
                "--admin-listen {}: cannot bind (in use? try another port)",
                config.admin_listen
            )
        })?;
    if let Some(path) = &config.ports_file {
        let mut ports = vec![
            ("listen", api.local_addr()?),
            ("admin", admin.local_addr()?),
        ];
        if let Some((listener, _)) = &webhook {
            ports.push(("webhook", listener.local_addr()?));
        }
        capmesh_client::process::write_ports_file(path, &ports)
            .with_context(|| format!("--ports-file {}", path.display()))?;
    }
    tracing::info!(
        api = %api.local_addr()?,
        admin = %admin.local_addr()?,
        data_dir = %config.data_dir.display(),
        trust_domain = %config.trust_domain,
        "control plane listening"
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let rotation = tokio::spawn(capmesh_certs::run_rotation(
        cell,
        serving,
        RenewPolicy::default(),
        {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.changed().await;
            }
        },
    ));
    let api_task = tokio::spawn(server::serve_api(
        app.clone(),
        api,
        acceptor,
        stop_rx.clone(),
    ));
    let webhook_task = webhook.map(|(listener, tls)| {
        let inject = Arc::new(config.inject.config(&config.trust_domain));
        tokio::spawn(webhook::serve(listener, tls, inject, stop_rx.clone()))
    });
    let admin_task = tokio::spawn(server::serve_admin(app.clone(), admin, stop_rx));
    app.ready.store(true, Ordering::Release);

    shutdown.await;
    tracing::info!(
        "shutting down: proxies keep their last snapshot and reconnect when we are back"
    );
    app.ready.store(false, Ordering::Release);
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = api_task.await;
        let _ = admin_task.await;
        let _ = rotation.await;
        if let Some(task) = webhook_task {
            let _ = task.await;
        }
    })
    .await;
    Ok(())
}

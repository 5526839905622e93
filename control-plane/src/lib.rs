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
pub mod error;
pub mod inject;
pub mod metrics;
pub mod registry;
pub mod replicas;
pub mod rest;
pub mod revocations;
pub mod server;
pub mod spans;
pub mod store;
pub mod stream;
pub mod subscribers;
pub mod webhook;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use capmesh_api::{AgentName, MeshSettings, Namespace, TrustDomain};
use capmesh_certs::{
    Ca, Credential, CredentialCell, MeshAcceptor, Renew, RenewPolicy, SpiffeId, TrustStore,
    Validity, WorkloadKey,
};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use config::Config;
use metrics::Metrics;
use registry::Registry;
use store::{Backend, PgStore, Purpose, SqliteStore, Store, StoreKey};

/// Everything a request handler needs. One per process.
#[derive(Debug)]
pub struct App {
    /// Durable state.
    pub store: Arc<Backend>,
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
    /// Longest bootstrap token lifetime.
    pub max_token_ttl: Duration,
    /// How long a dropped stream's endpoints stay.
    pub grace: Duration,
    /// The admin token.
    pub admin_token: String,
    /// Metrics.
    pub metrics: Metrics,
    /// True once the API listener is serving.
    pub ready: AtomicBool,
    /// This replica's id (host name and a random suffix), the owner of its instances' rows.
    pub replica: String,
    /// This replica's pending instance writes.
    pub writer: replicas::Writer,
    /// The replicas with a current lease (this one alone on SQLite).
    live: std::sync::Mutex<BTreeSet<String>>,
    /// Sampled spans and traffic reports from the proxies (this replica's streams only).
    pub observed: spans::Observed,
}

impl App {
    /// Saves an instance this replica holds (after it connected, re-registered, changed health
    /// or disconnected), so other replicas serve it and a restart keeps serving it until its
    /// proxy reconnects. Written by the writer task, never on the caller's path.
    pub fn persist(&self, proxy_id: &str) {
        self.writer.mark(proxy_id);
    }

    /// Whether `replica` holds a current lease.
    pub fn is_live(&self, replica: &str) -> bool {
        replica == self.replica
            || self
                .live
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(replica)
    }

    /// Records the replicas with a current lease.
    pub fn set_live(&self, replicas: Vec<String>) {
        *self.live.lock().unwrap_or_else(|p| p.into_inner()) = replicas.into_iter().collect();
    }

    /// After the grace period of a stream that ended without goodbye: withdraws its instance
    /// unless its proxy reconnected (here, or to another replica, which then owns the row).
    pub async fn expire_local(self: Arc<Self>, proxy_id: String, epoch: u64, started_ms: i64) {
        if !self.registry.is_disconnected(&proxy_id, epoch) {
            return;
        }
        if let Ok(rows) = self
            .store
            .instances_by_id(std::slice::from_ref(&proxy_id))
            .await
            && rows
                .first()
                .is_some_and(|r| r.owner != self.replica && r.started_ms > started_ms)
        {
            // Moved: the follower swaps in the other replica's instance.
            return;
        }
        if self.registry.expire(&proxy_id, epoch) {
            tracing::info!(proxy_id = %proxy_id, "endpoints withdrawn");
            self.writer.mark_gone(&proxy_id, started_ms);
        }
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

/// The shortest admin token accepted: anything shorter can be guessed.
const MIN_ADMIN_TOKEN: usize = 16;

/// Reads an admin token file, refusing an empty or short token (an empty token would make an
/// empty bearer an admin).
fn read_admin_token(path: &Path, source: &str) -> anyhow::Result<String> {
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("{source} {}: cannot read it", path.display()))?;
    let token = token.trim().to_owned();
    if token.len() < MIN_ADMIN_TOKEN {
        bail!(
            "{source} {}: the admin token is {} characters, shorter than {MIN_ADMIN_TOKEN}: put a long random string in it (e.g. `openssl rand -hex 32`), or delete the data dir's file to have one generated",
            path.display(),
            token.len()
        );
    }
    Ok(token)
}

fn admin_token(config: &Config) -> anyhow::Result<String> {
    if let Some(path) = &config.admin_token_file {
        return read_admin_token(path, "--admin-token-file");
    }
    let path = config.data_dir.join("admin-token");
    if path.exists() {
        return read_admin_token(&path, "the data dir's admin token");
    }
    let token = ca::random_hex(32).map_err(|e| anyhow::anyhow!(e))?;
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

/// The mesh's passthrough session key as hex: created once (32 random bytes, sealed with the
/// store key when there is one), then read back.
async fn session_key(store: &Backend, key: Option<&StoreKey>) -> anyhow::Result<String> {
    use ring::rand::SecureRandom;
    let mut fresh = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut fresh)
        .map_err(|_| anyhow::anyhow!("no system randomness for the session key"))?;
    let offered = match key {
        Some(k) => k.seal(Purpose::SessionKey, &fresh)?,
        None => fresh.to_vec(),
    };
    let stored = store.session_key_or_insert(&offered).await?;
    let plain = match (store::seal::is_sealed(&stored), key) {
        (true, Some(k)) => k.open(Purpose::SessionKey, &stored)?,
        (true, None) => bail!(
            "the session key in the store is sealed: pass --store-key-file with the key the store was first started with"
        ),
        (false, _) => stored,
    };
    if plain.len() != 32 {
        bail!("the stored session key has {} bytes, not 32", plain.len());
    }
    Ok(plain.iter().map(|b| format!("{b:02x}")).collect())
}

async fn open_store(config: &Config, replica: &str) -> anyhow::Result<(Backend, Option<StoreKey>)> {
    let key = config
        .store_key_file
        .as_deref()
        .map(StoreKey::from_file)
        .transpose()?;
    let backend = match config.store.as_deref() {
        None => Backend::Sqlite(SqliteStore::open(&config.data_dir.join("capmesh.db"))?),
        Some(url) if url.starts_with("sqlite://") => Backend::Sqlite(SqliteStore::open(
            Path::new(url.trim_start_matches("sqlite://")),
        )?),
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            let shown = store::postgres::redact(url);
            if key.is_none() {
                bail!(
                    "--store {shown}: the CA key is kept in PostgreSQL only sealed: pass --store-key-file with 32 random bytes (`openssl rand -hex 32 > store.key`), the same file for every replica"
                );
            }
            if config.admin_token_file.is_none() {
                bail!(
                    "--store {shown}: every replica must accept the same admin token: pass --admin-token-file (the same file for every replica)"
                );
            }
            let store = PgStore::open(url, replica).await.map_err(|e| match e {
                store::StoreError::Unavailable { .. } => anyhow::anyhow!(
                    "{e}: check --store {shown} and that PostgreSQL is up and reachable from here"
                ),
                other => other.into(),
            })?;
            Backend::Postgres(Box::new(store))
        }
        Some(url) => bail!(
            "--store {:?}: use sqlite:///path/to/file.db, postgres://user:password@host:5432/database, or leave it unset for <data-dir>/capmesh.db",
            store::postgres::redact(url)
        ),
    };
    Ok((backend, key))
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
        process::Threads::Workers,
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
    let replica = replicas::new_replica_id();
    let (store, store_key) = open_store(&config, &replica).await?;
    let byo = match (&config.ca_cert, &config.ca_key) {
        (Some(cert), Some(key)) => Some((
            std::fs::read_to_string(cert)
                .with_context(|| format!("--ca-cert {}", cert.display()))?,
            std::fs::read_to_string(key).with_context(|| format!("--ca-key {}", key.display()))?,
        )),
        _ => None,
    };
    let ca = ca::load_or_create(
        &store,
        store_key.as_ref(),
        &config.trust_domain,
        &config.data_dir,
        byo,
    )
    .await?;
    let admin_token = admin_token(&config)?;
    let (bundle, trust_config) = entities::trust_from_store(
        ca.root_pem(),
        &config.trust_domain,
        &store.entities().await?,
        &store.revocations().await?,
    );
    let trust = Arc::new(TrustStore::new(&trust_config)?);
    let policy = store.policy().await?.unwrap_or_default();
    let settings = MeshSettings {
        session_key: session_key(&store, store_key.as_ref()).await?,
        ..store.settings().await?.unwrap_or_default()
    };
    let registry = Arc::new(Registry::new(replica.clone(), bundle, policy, settings));
    // A replica sharing the store learns who else is alive before it serves their instances.
    let live = store.heartbeat(&replica, replicas::LEASE).await?;
    let store = Arc::new(store);

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
    // Client certificates are judged per request (a refusal is a 403 naming the rule).
    let acceptor = MeshAcceptor::deferred(cell.clone(), trust.clone(), &[b"h2", b"http/1.1"])?
        .with_handshake_timeout(config.header_read_timeout);
    let limits = config.limits();

    let app = Arc::new(App {
        store,
        registry,
        ca,
        trust,
        trust_domain: config.trust_domain.clone(),
        cert_ttl: config.cert_ttl,
        max_token_ttl: config.max_token_ttl,
        grace: config.grace,
        admin_token,
        metrics: Metrics::new(),
        ready: AtomicBool::new(false),
        replica: replica.clone(),
        writer: replicas::Writer::default(),
        live: std::sync::Mutex::new(live.into_iter().collect()),
        observed: spans::Observed::default(),
    });
    app.metrics
        .replica_info
        .with_label_values(&[replica.as_str()])
        .set(1);
    tracing::info!(replica = %replica, store = %app.store.describe(), "store open");
    // Follow the other replicas from before the restore, so nothing changed in between is missed.
    let followed = match app.store.as_ref() {
        Backend::Postgres(pg) => Some(pg.follow()),
        Backend::Sqlite(_) => None,
    };

    let restored = replicas::restore(&app, config.restart_grace).await?;
    if restored > 0 {
        tracing::info!(
            restored,
            grace_ms = config.restart_grace.as_millis() as u64,
            "serving the stored instances (those of gone replicas until their proxies reconnect)"
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
        limits,
        stop_rx.clone(),
    ));
    let webhook_task = webhook.map(|(listener, tls)| {
        let inject = Arc::new(config.inject.config(&config.trust_domain));
        tokio::spawn(webhook::serve(
            app.clone(),
            listener,
            tls,
            inject,
            limits,
            stop_rx.clone(),
        ))
    });
    let mut background = vec![tokio::spawn(replicas::write(app.clone(), stop_rx.clone()))];
    if let Some(events) = followed {
        background.push(tokio::spawn(replicas::follow(
            app.clone(),
            events,
            stop_rx.clone(),
        )));
        background.push(tokio::spawn(replicas::heartbeat(
            app.clone(),
            stop_rx.clone(),
        )));
    }
    let admin_task = tokio::spawn(server::serve_admin(app.clone(), admin, limits, stop_rx));
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
        for task in background {
            let _ = task.await;
        }
    })
    .await;
    Ok(())
}

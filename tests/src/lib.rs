//! End-to-end test harness: starts the real capmesh binaries on loopback and speaks their
//! protocols, so tests (and benches) assert what a user would see.
//!
//! - [`ControlPlane`]: a `capmesh-control-plane` process on free ports with a temporary data
//!   dir, its admin client, bootstrap tokens and certificates for test workloads.
//! - [`TestProxy`]: a topology-stream client that keeps a local snapshot the way a proxy does
//!   (apply, ack) so tests can wait for "the consumer now sees X".
//! - [`postgres::Postgres`]: a throwaway PostgreSQL server, and [`SharedSecrets`]: what the
//!   replicas of one control plane on it share (admin token, store key).
//!
//! Ports are never guessed: every child binds port 0 and reports what it got (`--ports-file`,
//! `READY <port>`); a port that must stay the same across a restart, or one that must stay
//! closed, is a [`ReservedPort`]. Children never see the developer's `CAPMESH_*` variables
//! ([`scrub_env`]).
#![forbid(unsafe_code)]

pub mod node;
pub mod openssl;
pub mod postgres;
pub mod python;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use capmesh_api::rest::{CertificateRequest, CertificateResponse, TokenCreated, TokenRequest};
use capmesh_api::{
    AgentName, ControlFrame, Hello, Namespace, Node, ProxyFrame, Registration, Snapshot,
    TrustDomain,
};
use capmesh_certs::{Credential, CredentialCell, SpiffeId, TrustConfig, TrustStore, WorkloadKey};
use capmesh_client::{
    ControlPlaneClient, ControlPlaneUrl, ServerCheck, StreamReceiver, StreamSender,
};

/// A loopback port held for as long as this value lives: bound to port 0 (the system picks
/// it) with `SO_REUSEADDR` and never listening. Nobody else can bind it meanwhile (and the
/// kernel does not hand it out as an ephemeral port), but a child that binds it with
/// `SO_REUSEADDR` and listens — as tokio, Python, Node, nginx and HAProxy all do — can, even
/// again after a restart. Connecting to it while no child listens is refused, so it is also a
/// port that stays closed.
#[derive(Debug)]
pub struct ReservedPort {
    _socket: socket2::Socket,
    port: u16,
}

impl ReservedPort {
    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

/// Reserves a loopback port (see [`ReservedPort`]).
pub fn reserve_port() -> Result<ReservedPort> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    let port = socket
        .local_addr()?
        .as_socket()
        .context("the reserved socket has no IP address")?
        .port();
    Ok(ReservedPort {
        _socket: socket,
        port,
    })
}

/// The names of this process's `CAPMESH_*` environment variables.
pub fn capmesh_env_vars() -> Vec<std::ffi::OsString> {
    std::env::vars_os()
        .map(|(k, _)| k)
        .filter(|k| k.to_str().is_some_and(|k| k.starts_with("CAPMESH_")))
        .collect()
}

/// Removes the developer's `CAPMESH_*` variables from a child's environment, so a binary under
/// test sees only the flags and variables the test gives it.
pub fn scrub_env(cmd: &mut Command) -> &mut Command {
    for key in capmesh_env_vars() {
        cmd.env_remove(key);
    }
    cmd
}

/// [`scrub_env`] for a tokio command.
pub fn scrub_env_async(cmd: &mut tokio::process::Command) -> &mut tokio::process::Command {
    for key in capmesh_env_vars() {
        cmd.env_remove(key);
    }
    cmd
}

/// Waits for a child's `--ports-file` and returns its addresses by name; fails at once when the
/// child exits first (`log` says why).
pub async fn wait_ports_file(
    file: &Path,
    child: &mut Child,
    what: &str,
    log: impl Fn() -> String,
) -> Result<BTreeMap<String, SocketAddr>> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(text) = std::fs::read_to_string(file) {
            let raw: BTreeMap<String, String> = serde_json::from_str(&text)
                .with_context(|| format!("{what}'s ports file is unreadable: {text}"))?;
            return raw.into_iter().map(|(k, v)| Ok((k, v.parse()?))).collect();
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "{what} exited with {status} before binding its ports; log:\n{}",
                log()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "{what} did not report its ports within 20 s; log:\n{}",
                log()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn port_named(ports: &BTreeMap<String, SocketAddr>, name: &str) -> Result<u16> {
    ports
        .get(name)
        .map(SocketAddr::port)
        .with_context(|| format!("no {name:?} in the ports file: {ports:?}"))
}

/// The path of a workspace binary built beside the running program: next to it (a binary in
/// `target/<profile>/`) or one level up (a test in `target/<profile>/deps/`).
pub fn workspace_bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let here = exe.parent().context("cannot locate the target directory")?;
    for dir in [Some(here), here.parent()].into_iter().flatten() {
        let bin = dir.join(name);
        if bin.exists() {
            return Ok(bin);
        }
    }
    bail!(
        "{name} is not built next to {}: run `cargo build -p <its crate>` with the same profile",
        exe.display()
    )
}

/// A plain HTTP/1.1 GET on a loopback port: (status, body).
pub async fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    Ok(capmesh_client::process::http_get(port, path).await?)
}

/// SPIFFE ID in the default trust domain.
pub fn spiffe(namespace: &str, agent: &str) -> Result<SpiffeId> {
    Ok(SpiffeId::new(
        TrustDomain::new("capmesh.local")?,
        Namespace::new(namespace)?,
        AgentName::new(agent)?,
    ))
}

/// A certificate chain for `id` signed by `ca` (the mesh's or an outside entity's), valid for
/// `ttl`, and its key: a workload credential made without a control plane.
pub fn issue_workload(
    ca: &capmesh_certs::Ca,
    id: &SpiffeId,
    ttl: Duration,
) -> Result<(String, WorkloadKey)> {
    let key = WorkloadKey::generate()?;
    let issued = ca.issue(&key.csr_pem(id)?, id, capmesh_certs::Validity::for_ttl(ttl))?;
    Ok((issued.chain_pem, key))
}

/// A running `capmesh-control-plane`. Killed when dropped.
#[derive(Debug)]
pub struct ControlPlane {
    child: Option<Child>,
    bin: PathBuf,
    /// The data dir (kept across [`ControlPlane::restart`]).
    pub data_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    /// The API port (reserved for the control plane's whole life, restarts included, so
    /// proxies configured with it find it again).
    pub port: u16,
    /// The admin port, as the running process reported it.
    pub admin_port: u16,
    /// The admission webhook's port, when `--webhook-listen` was given (use `127.0.0.1:0`).
    pub webhook_port: Option<u16>,
    api: ReservedPort,
    extra: Vec<String>,
}

impl ControlPlane {
    /// Starts the binary at `bin` with a fresh data dir and `extra` flags; waits for `/ready`.
    pub async fn start(bin: &Path, extra: &[&str]) -> Result<Self> {
        let tmp = tempfile::tempdir()?;
        let api = reserve_port()?;
        let mut cp = Self {
            child: None,
            bin: bin.to_owned(),
            data_dir: tmp.path().join("data"),
            _tmp: Some(tmp),
            port: api.port(),
            admin_port: 0,
            webhook_port: None,
            api,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        cp.spawn().await?;
        Ok(cp)
    }

    async fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir.with_extension("log"))?;
        let ports_file = self.data_dir.with_extension("ports.json");
        let _ = std::fs::remove_file(&ports_file);
        let mut child = scrub_env(&mut Command::new(&self.bin))
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.api.port()))
            .arg("--admin-listen")
            .arg("127.0.0.1:0")
            .arg("--ports-file")
            .arg(&ports_file)
            .args(&self.extra)
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("cannot start {}", self.bin.display()))?;
        let log_path = self.data_dir.with_extension("log");
        let ports = wait_ports_file(&ports_file, &mut child, "the control plane", || {
            std::fs::read_to_string(&log_path).unwrap_or_default()
        })
        .await;
        self.child = Some(child);
        let ports = ports?;
        self.admin_port = port_named(&ports, "admin")?;
        self.webhook_port = ports.get("webhook").map(SocketAddr::port);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(body) = self.admin_get("/ready").await
                && body.starts_with("ready")
            {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "the control plane exited with {status}; log:\n{}",
                    self.log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the control plane was not ready within 20 s; log:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What the process logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.with_extension("log")).unwrap_or_default()
    }

    /// Stops the process with SIGTERM (waits up to 10 s), keeping the data dir.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    child.kill()?;
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.wait();
        }
        Ok(())
    }

    /// Stops and starts again on the same data dir and ports.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.spawn().await
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// A plain-HTTP GET on the admin address; returns the body.
    pub async fn admin_get(&self, path: &str) -> Result<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.admin_port)).await?;
        tcp.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await??;
        let text = String::from_utf8_lossy(&buf).to_string();
        Ok(text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default())
    }

    /// The URL of the API.
    pub fn url(&self) -> Result<ControlPlaneUrl> {
        Ok(format!("https://127.0.0.1:{}", self.port).parse()?)
    }

    /// The CA bundle the control plane wrote.
    pub fn ca_pem(&self) -> Result<String> {
        Ok(std::fs::read_to_string(self.data_dir.join("ca.pem"))?)
    }

    /// The admin token: from `--admin-token-file` when it was given, else the one the control
    /// plane generated in its data dir.
    pub fn admin_token(&self) -> Result<String> {
        let file = self
            .extra
            .iter()
            .position(|a| a == "--admin-token-file")
            .and_then(|i| self.extra.get(i + 1))
            .map(PathBuf::from)
            .unwrap_or_else(|| self.data_dir.join("admin-token"));
        Ok(std::fs::read_to_string(file)?.trim().to_owned())
    }

    /// The API address as `https://127.0.0.1:<port>`.
    pub fn address(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: the process vanishes without a word (the data dir stays for a restart).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again after [`ControlPlane::kill`] or [`ControlPlane::stop`], same data dir and
    /// ports.
    pub async fn start_again(&mut self) -> Result<()> {
        self.spawn().await
    }

    /// A REST client that checks the server by host name against `ca.pem` (as the CLI does).
    pub fn rest(&self) -> Result<ControlPlaneClient> {
        let url: ControlPlaneUrl = format!("https://localhost:{}", self.port).parse()?;
        Ok(ControlPlaneClient::new(
            url,
            ServerCheck::Hostname {
                ca_pem: self.ca_pem()?,
            },
            None,
            None,
        )?)
    }

    /// Creates a bootstrap token for `namespace` / `pattern`, with the control plane's
    /// default use count (one for an exact agent name, unlimited for a pattern).
    pub async fn token(&self, namespace: &str, pattern: &str) -> Result<String> {
        self.token_with(namespace, pattern, None).await
    }

    /// Creates a bootstrap token for `namespace` / `pattern` good for `uses` certificates
    /// (`capmesh-system` tokens are made with the explicit flag they need).
    pub async fn token_with(
        &self,
        namespace: &str,
        pattern: &str,
        uses: Option<u32>,
    ) -> Result<String> {
        let created: TokenCreated = self
            .rest()?
            .post(
                "/v1/tokens",
                &TokenRequest {
                    namespace: Namespace::new(namespace)?,
                    agent_pattern: pattern.to_owned(),
                    ttl_secs: 3600,
                    uses,
                    system: namespace == capmesh_certs::SYSTEM_NAMESPACE,
                    description: Some("test".into()),
                },
                Some(&self.admin_token()?),
            )
            .await?;
        Ok(created.token)
    }

    /// A mesh certificate for `namespace/agent`, got the way a proxy gets its first one.
    pub async fn credential(&self, namespace: &str, agent: &str) -> Result<Credential> {
        let token = self.token(namespace, agent).await?;
        let key = WorkloadKey::generate()?;
        let resp: CertificateResponse = self
            .rest()?
            .post(
                "/v1/certificates",
                &CertificateRequest {
                    csr_pem: key.csr_pem(&spiffe(namespace, agent)?)?,
                    token: Some(token),
                },
                None,
            )
            .await?;
        Ok(Credential::with_key(&resp.certificate_chain_pem, &key)?)
    }

    /// The trust store a proxy starts with: the mesh CA only.
    pub fn trust(&self) -> Result<Arc<TrustStore>> {
        Ok(Arc::new(TrustStore::new(&TrustConfig {
            trust_domain: TrustDomain::new("capmesh.local")?,
            mesh_ca_pem: self.ca_pem()?,
            entities: vec![],
            revoked_entities: vec![],
            revoked_serials: vec![],
            revoked_identities: vec![],
        })?))
    }

    /// A stream client presenting `credential`.
    pub fn stream_client(&self, credential: Credential) -> Result<ControlPlaneClient> {
        Ok(ControlPlaneClient::new(
            self.url()?,
            ServerCheck::Spiffe(spiffe("capmesh-system", "control-plane")?),
            Some(self.trust()?),
            Some(Arc::new(CredentialCell::new(credential))),
        )?)
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What the replicas of one control plane on a shared store have in common: the admin token
/// file and the store key file (fresh random values in a temporary directory).
#[derive(Debug)]
pub struct SharedSecrets {
    _dir: tempfile::TempDir,
    /// `--admin-token-file`.
    pub admin_token_file: PathBuf,
    /// `--store-key-file`.
    pub store_key_file: PathBuf,
}

impl SharedSecrets {
    /// New random secrets.
    pub fn new() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let admin_token_file = dir.path().join("admin-token");
        let store_key_file = dir.path().join("store.key");
        let random = |n: usize| -> Result<String> {
            use std::io::Read;
            let mut buf = vec![0u8; n];
            std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
            Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
        };
        std::fs::write(&admin_token_file, random(24)?)?;
        std::fs::write(&store_key_file, random(32)?)?;
        Ok(Self {
            _dir: dir,
            admin_token_file,
            store_key_file,
        })
    }

    /// The flags of a replica on the store at `url`.
    pub fn flags(&self, url: &str) -> Vec<String> {
        vec![
            "--store".into(),
            url.into(),
            "--store-key-file".into(),
            self.store_key_file.display().to_string(),
            "--admin-token-file".into(),
            self.admin_token_file.display().to_string(),
        ]
    }
}

/// A topology-stream client that behaves like a proxy: applies frames to a local snapshot and
/// acks them.
#[derive(Debug)]
pub struct TestProxy {
    /// Frames go up here.
    pub tx: StreamSender,
    rx: StreamReceiver,
    /// The snapshot as applied so far.
    pub snapshot: Option<Snapshot>,
    /// Error frames received.
    pub errors: Vec<(String, String)>,
    /// Nack frames received (the control plane refused part of a frame): (of, code, message).
    pub nacks: Vec<(String, String, String)>,
    /// Whether the control plane ended the stream.
    pub ended: bool,
}

impl TestProxy {
    /// Opens a stream with `hello` built from the arguments, and reports healthy.
    pub async fn connect(
        client: &ControlPlaneClient,
        namespace: &str,
        agent: &str,
        proxy_id: &str,
        registration: Registration,
    ) -> Result<Self> {
        let hello = ProxyFrame::Hello(Hello {
            node: Node {
                proxy_id: proxy_id.to_owned(),
                agent: AgentName::new(agent)?,
                namespace: Namespace::new(namespace)?,
                zone: None,
            },
            registration,
            version: None,
        });
        let (tx, rx) = client.open_stream(&hello).await?;
        tx.send(&ProxyFrame::Health {
            healthy: true,
            detail: None,
        })
        .await?;
        Ok(Self {
            tx,
            rx,
            snapshot: None,
            errors: Vec::new(),
            nacks: Vec::new(),
            ended: false,
        })
    }

    /// Reads and applies one frame (acking it); false when the stream ended or `wait` passed.
    pub async fn step(&mut self, wait: Duration) -> Result<bool> {
        let frame = match tokio::time::timeout(wait, self.rx.next()).await {
            Err(_) => return Ok(false),
            Ok(None) => {
                self.ended = true;
                return Ok(false);
            }
            Ok(Some(Err(e))) => {
                self.ended = true;
                bail!("stream error: {e}")
            }
            Ok(Some(Ok(frame))) => frame,
        };
        match frame {
            ControlFrame::Snapshot(s) => {
                let version = s.version;
                self.snapshot = Some(s);
                let _ = self.tx.send(&ProxyFrame::Ack { version }).await;
            }
            ControlFrame::Delta(d) => {
                let held = self
                    .snapshot
                    .as_ref()
                    .context("a delta arrived before any snapshot")?;
                let next = held
                    .apply(&d)
                    .map_err(|e| anyhow::anyhow!("delta does not apply: {e}"))?;
                self.snapshot = Some(next);
                let _ = self.tx.send(&ProxyFrame::Ack { version: d.version }).await;
            }
            ControlFrame::Error { code, message } => self.errors.push((code, message)),
            ControlFrame::Nack {
                of, code, message, ..
            } => self.nacks.push((of, code, message)),
        }
        Ok(true)
    }

    /// Applies frames until `cond` holds on the snapshot, or fails after `timeout`.
    pub async fn until(
        &mut self,
        timeout: Duration,
        what: &str,
        cond: impl Fn(&Snapshot) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.snapshot.as_ref().is_some_and(&cond) {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.ended {
                bail!(
                    "{what}: not seen within {timeout:?} (ended: {}, errors: {:?})",
                    self.ended,
                    self.errors
                );
            }
            self.step(left).await?;
        }
    }

    /// Reads until the stream ends; returns the error frames seen.
    pub async fn until_end(&mut self, timeout: Duration) -> Result<Vec<(String, String)>> {
        let deadline = Instant::now() + timeout;
        while !self.ended {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("the stream did not end within {timeout:?}");
            }
            let _ = self.step(left).await;
        }
        Ok(self.errors.clone())
    }
}

/// A running `capmesh-proxy` next to an agent. Killed when dropped.
#[derive(Debug)]
pub struct ProxyProcess {
    child: Option<Child>,
    /// The agent's name.
    pub agent: String,
    /// Outbound port (the agent's view of the mesh: `http://127.0.0.1:<port>/mcp`).
    pub outbound: u16,
    /// Inbound (mutual TLS) port.
    pub inbound: u16,
    /// Admin port.
    pub admin: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl ProxyProcess {
    /// Starts `capmesh-proxy` for `agent` (`agent_url` `None` = a consumer with no inbound
    /// tools), with a fresh bootstrap token from `cp`, and waits until `/ready`.
    pub async fn start(
        bin: &Path,
        cp: &ControlPlane,
        agent: &str,
        agent_url: Option<&str>,
        extra: &[&str],
    ) -> Result<Self> {
        let token = cp.token("default", agent).await?;
        let mut p = Self::spawn(bin, cp, &token, agent, agent_url, extra).await?;
        p.wait_ready(Duration::from_secs(30)).await?;
        Ok(p)
    }

    /// Starts `capmesh-proxy` with `token` and returns once its listeners are bound (ports 0,
    /// reported in its `--ports-file`), without waiting for readiness: the control plane may be
    /// down.
    pub async fn spawn(
        bin: &Path,
        cp: &ControlPlane,
        token: &str,
        agent: &str,
        agent_url: Option<&str>,
        extra: &[&str],
    ) -> Result<Self> {
        let mut args = vec!["--control-plane".to_owned(), cp.address()];
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let ca = cp.data_dir.join("ca.pem");
        Self::spawn_at(bin, &ca, Some(token), agent, agent_url, &args, &[]).await
    }

    /// Starts `capmesh-proxy` trusting `ca` (the mesh trust bundle), with `token` when given,
    /// and `extra` flags, which name the control plane (`--control-plane`, one address or
    /// several) or certificates from files, and `env` added to its environment. Returns once
    /// its listeners are bound, without waiting for readiness.
    pub async fn spawn_at(
        bin: &Path,
        ca: &Path,
        token: Option<&str>,
        agent: &str,
        agent_url: Option<&str>,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("proxy.log");
        let ports_file = dir.path().join("ports.json");
        let file = std::fs::File::create(&log)?;
        let mut command = Command::new(bin);
        scrub_env(&mut command);
        if let Some(token) = token {
            command.env("CAPMESH_BOOTSTRAP_TOKEN", token);
        }
        command.envs(env.iter().copied());
        let mut child = command
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .args([
                "--agent-name",
                agent,
                "--agent-url",
                agent_url.unwrap_or("none"),
            ])
            .arg("--control-plane-ca")
            .arg(ca)
            .args(["--outbound", "127.0.0.1:0"])
            .args(["--inbound", "127.0.0.1:0"])
            .args(["--admin", "127.0.0.1:0"])
            .arg("--ports-file")
            .arg(&ports_file)
            .args(extra)
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file))
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let what = format!("capmesh-proxy for {agent}");
        let ports = wait_ports_file(&ports_file, &mut child, &what, || {
            std::fs::read_to_string(&log).unwrap_or_default()
        })
        .await;
        let ports = match ports {
            Ok(p) => p,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        Ok(Self {
            child: Some(child),
            agent: agent.to_owned(),
            outbound: port_named(&ports, "outbound")?,
            inbound: port_named(&ports, "inbound")?,
            admin: port_named(&ports, "admin")?,
            log,
            _dir: dir,
        })
    }

    /// Waits until `/ready` answers 200.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok((200, _)) = http_get(self.admin, "/ready").await {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "capmesh-proxy for {} exited with {status}; log:\n{}",
                    self.agent,
                    self.log()
                );
            }
            if Instant::now() > deadline {
                let why = http_get(self.admin, "/ready")
                    .await
                    .map(|r| r.1)
                    .unwrap_or_default();
                bail!(
                    "capmesh-proxy for {} not ready in {timeout:?} ({why}); log:\n{}",
                    self.agent,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The federated endpoint.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/mcp", self.outbound)
    }

    /// What the proxy logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// GET on the admin port.
    pub async fn admin_get(&self, path: &str) -> Result<(u16, String)> {
        http_get(self.admin, path).await
    }

    /// Sends SIGTERM (graceful: withdraw, drain, exit) and waits up to 20 s.
    pub fn terminate(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while child.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    child.kill()?;
                    bail!("capmesh-proxy did not exit within 20 s of SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// SIGKILL: the process vanishes without a word.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

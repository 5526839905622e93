//! capmesh sidecar proxy: the outbound MCP router (the mesh as one MCP server), the inbound
//! mutual-TLS server in front of the local agent, the control-plane stream client and the admin
//! endpoints.
//!
//! Each listener's request path is a tower stack composed in one function that reads top to
//! bottom: [`outbound::stack`] (the local agent calls the mesh) over [`forward::stack`] (deadline,
//! retry, balance, metrics, the peer client), and [`inbound::stack`] on the provider's side
//! (verify the peer, authorize every message, sessions, the agent). Errors are one type,
//! [`error::ProxyError`], turned into responses in one place. `ARCHITECTURE.md` draws it all.
#![forbid(unsafe_code)]

pub mod admin;
pub mod agent;
pub mod agent_http;
pub mod backoff;
pub mod balance;
pub mod breaker;
pub mod config;
pub mod contract;
pub mod control;
pub mod error;
pub mod forward;
pub mod headers;
pub mod identity;
pub mod ids;
pub mod inbound;
pub mod init;
mod io;
pub mod mcp;
pub mod metrics;
pub mod outbound;
pub mod pool;
pub mod readiness;
pub mod routing;
pub mod seal;
pub mod serve;
pub mod stack;
pub mod trace;
mod wakes;
pub mod workers;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::Bytes;
use capmesh_api::{ControlFrame, Node, Registration, SnapshotVersion};
use capmesh_certs::{MeshAcceptor, RenewPolicy, TrustConfig};
use capmesh_client::{ControlPlaneClient, ServerCheck};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use config::Config;

/// Errors a body may carry.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A map looked up on every call by keys the control plane gave (endpoint ids, capabilities,
/// peer addresses): foldhash, seeded per process, instead of SipHash, which cost about a
/// thousand instructions per call (benches/RESULTS.md, "Instructions per call").
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// The body type used on every hop.
pub type BoxBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// Boxes any body whose error converts into [`BoxError`].
pub fn boxed<B>(body: B) -> BoxBody
where
    B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    use http_body_util::BodyExt;
    body.map_err(Into::into).boxed()
}

/// `bytes` random bytes as lowercase hex.
pub fn random_hex(bytes: usize) -> String {
    ids::random_hex(bytes)
}

/// Everything the proxy's tasks share.
#[derive(Debug)]
pub struct Proxy {
    /// The flags.
    pub config: Config,
    /// This instance.
    pub node: Node,
    /// Identity and trust.
    pub identity: identity::Identity,
    /// The routing table in force (last known good).
    pub routing: ArcSwap<routing::Routing>,
    /// True once a snapshot arrived.
    pub ready_snapshot: AtomicBool,
    /// The local agent, unless `--agent-url none`.
    pub agent: Option<Arc<agent::Agent>>,
    /// The current registration (`None` until the agent's tools are known).
    pub registration: watch::Receiver<Option<Registration>>,
    /// The agent's health.
    pub healthy: watch::Receiver<bool>,
    /// What inbound authorization decides from: the snapshot's policy and the agent's tools;
    /// `None` until both are known.
    pub authz: inbound::authorize::AuthzView,
    /// Connections to peer proxies.
    pub peers: pool::PeerPool,
    /// Legacy sessions of the federated endpoint.
    pub sessions: outbound::Sessions,
    /// Bumped when the federated tool list changes.
    pub tools_changed: watch::Sender<u64>,
    /// Propagated headers.
    pub propagation: ArcSwap<headers::Propagation>,
    /// Retry budget for outbound calls.
    pub retry_budget: Arc<balance::RetryBudget>,
    /// Metrics.
    pub metrics: metrics::Metrics,
    /// Connections intercepted in transparent mode.
    pub transparent: outbound::transparent::Transparent,
    /// Which hops are recorded; their spans' way out.
    pub tracer: trace::Tracer,
}

impl Proxy {
    /// The registration sent before the agent's tools are known.
    pub fn empty_registration(&self) -> Registration {
        Registration {
            endpoint: self.config.advertised(),
            tags: self.config.tags.clone(),
            version: self.config.agent_version.clone(),
            tools: vec![],
            dependencies: self.config.dependencies.clone(),
        }
    }

    /// Applies a snapshot or delta atomically: a new routing table is built and swapped in, or
    /// nothing changes. Returns the version to ack, or the version and why to nack.
    pub fn apply(&self, frame: ControlFrame) -> Result<SnapshotVersion, (SnapshotVersion, String)> {
        let version = control::frame_version(&frame);
        let current = self.routing.load_full();
        let snapshot = match frame {
            ControlFrame::Snapshot(s) => s,
            ControlFrame::Delta(d) => match &current.snapshot {
                Some(held) => held.apply(&d).map_err(|e| (version, e.to_string()))?,
                None => return Err((version, "a delta arrived before any snapshot".into())),
            },
            ControlFrame::Error { .. } | ControlFrame::Nack { .. } => return Ok(version),
        };
        let trust_changed = current
            .snapshot
            .as_ref()
            .is_none_or(|s| s.trust != snapshot.trust);
        if trust_changed {
            self.identity
                .trust
                .update(&TrustConfig::from(&snapshot.trust))
                .map_err(|e| (version, format!("trust bundle refused: {e}")))?;
        }
        let mut patterns = self.config.propagate_headers.clone();
        patterns.extend(snapshot.settings.propagate_headers.iter().cloned());
        self.propagation
            .store(Arc::new(headers::Propagation::new(&patterns)));
        self.retry_budget.set(
            snapshot.settings.retry_budget_percent,
            snapshot.settings.retry_min_per_sec,
        );
        self.peers
            .set_connect_timeout(Duration::from_millis(snapshot.settings.connect_timeout_ms));
        let breaker = breaker::BreakerConfig {
            failures: snapshot.settings.breaker_failures.max(1),
            ..Default::default()
        };
        let caller = self.identity.id.to_string();
        let next = routing::Routing::build(
            snapshot,
            &self.config.dependencies,
            &caller,
            &current,
            breaker,
        );
        let tools_changed = next.tools != current.tools;
        let addresses: Vec<(String, String)> = next
            .all_stats()
            .map(|(_, e, _)| (e.address.clone(), e.identity.clone()))
            .collect();
        self.routing.store(Arc::new(next));
        self.refresh_authz();
        self.peers
            .retain(|addr, id| addresses.iter().any(|(a, i)| a == addr && i == id));
        if tools_changed {
            self.tools_changed.send_modify(|n| *n += 1);
            tracing::info!(
                tools = self.routing.load().tools.len(),
                "callable capabilities changed"
            );
        }
        if !self.ready_snapshot.swap(true, Ordering::AcqRel) {
            tracing::info!(version = %version, "first snapshot applied");
        }
        self.metrics.snapshot_version.set(version.0 as i64);
        self.metrics.snapshot_applied.set(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0),
        );
        Ok(version)
    }
}

impl Proxy {
    /// Rebuilds what inbound authorization decides from, after the snapshot or the agent's
    /// registration changed. Stays `None` (everything refused with 503) until both are known.
    pub fn refresh_authz(&self) {
        let routing = self.routing.load();
        let registration = self.registration.borrow();
        let view = match (&routing.snapshot, registration.as_ref()) {
            (Some(snapshot), Some(reg)) => Some(Arc::new(inbound::authorize::Authz::new(
                snapshot.policy.clone(),
                &reg.tools,
            ))),
            _ => None,
        };
        self.authz.store(view);
    }
}

async fn bind(addr: std::net::SocketAddr, flag: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("{flag} {addr}: cannot bind (in use? pick another port)"))
}

/// What serving the inbound and outbound listeners needs, for each worker.
#[derive(Clone)]
struct Serving {
    proxy: Arc<Proxy>,
    acceptor: MeshAcceptor,
    inbound_gate: serve::Gate,
    outbound_gate: serve::Gate,
    limits: serve::Limits,
    drain: watch::Receiver<bool>,
    grace: Duration,
}

impl Serving {
    /// Serves both listeners on this thread's scheduler until the drain has ended.
    async fn run(self, inbound: TcpListener, outbound: TcpListener) {
        tokio::join!(
            inbound::serve(
                self.proxy.clone(),
                inbound,
                self.inbound_gate,
                self.acceptor,
                self.limits,
                self.drain.clone(),
                self.grace,
            ),
            outbound::serve(
                self.proxy,
                outbound,
                self.outbound_gate,
                self.limits,
                self.drain,
                self.grace,
            ),
        );
    }
}

/// Another handle to `listener` (the same socket), for a worker thread to accept on with its
/// own scheduler.
fn handle(listener: &TcpListener) -> anyhow::Result<std::net::TcpListener> {
    use std::os::fd::AsFd;
    let fd = listener
        .as_fd()
        .try_clone_to_owned()
        .context("cannot hand a listener to a worker thread")?;
    Ok(std::net::TcpListener::from(fd))
}

/// The `capmesh-proxy` program: parses `args` (the first is the program name), then runs until
/// SIGTERM or Ctrl-C. A bad flag prints clap's message and exits 2; `--version` (`-V`) prints
/// the proxy's version. `capmesh-proxy init …` writes the transparent-mode iptables rules
/// instead; `capmesh-proxy run …` is the default.
pub fn main_with_args(
    args: impl IntoIterator<Item = std::ffi::OsString>,
) -> std::process::ExitCode {
    use capmesh_client::process;
    let mut args: Vec<std::ffi::OsString> = args.into_iter().collect();
    match args.get(1).and_then(|a| a.to_str()) {
        Some("init") => {
            args.remove(1);
            return init::main_with_args(args);
        }
        Some("run") => {
            args.remove(1);
        }
        _ => {}
    }
    let env_version = std::env::var("CAPMESH_VERSION").ok();
    for warning in config::rewrite_deprecated_version(&mut args, env_version) {
        eprintln!("capmesh-proxy: warning: {warning}");
    }
    // The proxy starts its worker threads itself, each with a scheduler of its own (`workers`).
    process::main(
        "capmesh-proxy",
        args,
        |c: &Config| c.log_format.as_str(),
        process::Threads::MainOnly,
        |c| run(c, process::shutdown_signal()),
    )
}

/// Runs the proxy until `shutdown` resolves; then withdraws from the mesh, drains and exits.
///
/// Start-up order: every listener is bound first (a taken port fails at once, and
/// `--ports-file` reports the ports chosen for `:0`), the admin listener serves `/live` and
/// `/ready` from that moment, then the first certificate is awaited (SIGTERM still stops the
/// wait), and only then do the outbound and inbound listeners serve.
pub async fn run(
    mut config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let workers = workers::count();
    let agent = match config.agent() {
        Some(url) => Some(Arc::new(agent::Agent::new(url, workers)?)),
        None => None,
    };
    let outbound_listener = bind(config.outbound, "--outbound").await?;
    let inbound_listener = bind(config.inbound, "--inbound").await?;
    let admin_listener = bind(config.admin, "--admin").await?;
    // From here on the addresses are the bound ones (a port 0 became a real port), so what is
    // advertised, logged and reported is what others can dial.
    config.outbound = outbound_listener.local_addr()?;
    config.inbound = inbound_listener.local_addr()?;
    config.admin = admin_listener.local_addr()?;
    if let Some(path) = &config.ports_file {
        capmesh_client::process::write_ports_file(
            path,
            &[
                ("outbound", config.outbound),
                ("inbound", config.inbound),
                ("admin", config.admin),
            ],
        )
        .with_context(|| format!("--ports-file {}", path.display()))?;
    }

    let readiness = Arc::new(readiness::Readiness::default());
    let admin_state = Arc::new(admin::AdminState::new(readiness.clone(), agent.is_some()));
    // Listeners stay up during the drain, so calls already routed here still land.
    let (drain_tx, drain_rx) = watch::channel(false);
    let metrics = metrics::Metrics::new();
    let admin_task = tokio::spawn(admin::serve(
        admin_state.clone(),
        admin_listener,
        admin::limits(&config.limits()),
        metrics.connections_refused.clone(),
        drain_rx.clone(),
    ));
    tracing::info!(admin = %config.admin, "admin listener serving /live and /ready");

    // The agent is watched from the start too, so a wrong --agent-url is reported while the
    // certificate is still on its way.
    let (stop_tx, stop_rx) = watch::channel(false);
    let (reg_tx, reg_rx) = watch::channel(None);
    let (health_tx, health_rx) = watch::channel(agent.is_none());
    let template = agent::RegistrationTemplate {
        endpoint: config.advertised(),
        tags: config.tags.clone(),
        version: config.agent_version.clone(),
        overrides: config.overrides()?,
        dependencies: config.dependencies.clone(),
    };
    let mut tasks = Vec::new();
    // A consumer's registration never changes; its senders live as long as the proxy.
    let mut _consumer_senders = None;
    match &agent {
        Some(agent) => tasks.push(tokio::spawn(agent::watch(
            agent.clone(),
            template,
            reg_tx,
            health_tx,
            readiness.clone(),
            stop_rx.clone(),
        ))),
        None => {
            reg_tx.send_replace(Some(template.build(&[])));
            _consumer_senders = Some((reg_tx, health_tx));
        }
    }

    let mut shutdown = std::pin::pin!(shutdown);
    let identity = tokio::select! {
        identity = identity::obtain(&config, &readiness) => identity?,
        _ = &mut shutdown => {
            tracing::info!("stopped before the first certificate arrived");
            let _ = stop_tx.send(true);
            let _ = drain_tx.send(true);
            let _ = admin_task.await;
            for t in tasks {
                t.abort();
            }
            return Ok(());
        }
    };
    let node = Node {
        proxy_id: config
            .proxy_id
            .clone()
            .unwrap_or_else(|| format!("{}-{}", config.agent_name, random_hex(4))),
        agent: config.agent_name.clone(),
        namespace: config.namespace.clone(),
        zone: config.zone.clone(),
    };
    // OTLP export only when a collector is named; a setting it cannot honour stops start-up.
    let otlp = match trace::export::resolve(config.otlp_endpoint.as_deref(), |k| {
        std::env::var(k).ok()
    })
    .map_err(anyhow::Error::msg)?
    {
        Some(target) => {
            let origin = trace::export::Origin {
                service: std::env::var("OTEL_SERVICE_NAME")
                    .ok()
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| config.agent_name.to_string()),
                namespace: config.namespace.to_string(),
                instance: node.proxy_id.clone(),
            };
            let (sink, task) = trace::export::start(&target, &origin, metrics.spans())?;
            tracing::info!(collector = %target.url, from = target.from, "exporting spans over OTLP (HTTP/protobuf)");
            tasks.push(task);
            Some(sink)
        }
        None => None,
    };
    let tracer = trace::Tracer::new(config.trace_sampling, otlp, metrics.spans());
    let proxy = Arc::new(Proxy {
        node: node.clone(),
        routing: ArcSwap::from_pointee(routing::Routing::default()),
        ready_snapshot: AtomicBool::new(false),
        agent: agent.clone(),
        registration: reg_rx.clone(),
        healthy: health_rx.clone(),
        authz: Arc::new(ArcSwapOption::empty()),
        peers: pool::PeerPool::new(
            identity.cell.clone(),
            identity.trust.clone(),
            Duration::from_secs(1),
            workers,
        ),
        sessions: outbound::Sessions::default(),
        tools_changed: watch::channel(0).0,
        propagation: ArcSwap::from_pointee(headers::Propagation::new(&config.propagate_headers)),
        retry_budget: Arc::new(balance::RetryBudget::new(20, 10)),
        metrics,
        transparent: outbound::transparent::Transparent::default(),
        tracer,
        identity,
        config,
    });
    let _ = admin_state.proxy.set(proxy.clone());

    // Keep inbound authorization in step with the registration.
    {
        let proxy = proxy.clone();
        let mut reg = reg_rx.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                reg.borrow_and_update();
                proxy.refresh_authz();
                if reg.changed().await.is_err() {
                    return;
                }
            }
        }));
    }
    let url = identity::control_plane_url(&proxy.config)?;
    let cp_id = identity::control_plane_id(&proxy.config.trust_domain)?;
    let client = ControlPlaneClient::new(
        url,
        ServerCheck::Spiffe(cp_id),
        Some(proxy.identity.trust.clone()),
        Some(proxy.identity.cell.clone()),
    )?;
    match proxy.identity.source.clone() {
        identity::Source::ControlPlane => {
            let renewer = identity::ControlPlaneRenewer {
                client: client.clone(),
                id: proxy.identity.id.clone(),
            };
            let mut stop = stop_rx.clone();
            tasks.push(tokio::spawn(capmesh_certs::run_rotation(
                proxy.identity.cell.clone(),
                renewer,
                RenewPolicy::default(),
                async move {
                    let _ = stop.changed().await;
                },
            )));
        }
        identity::Source::Files { cert, key } => {
            tasks.push(tokio::spawn(identity::watch_files(
                proxy.identity.cell.clone(),
                cert,
                key,
                stop_rx.clone(),
            )));
        }
    }
    let (goodbye_tx, goodbye_rx) = tokio::sync::oneshot::channel();
    let control_task = tokio::spawn(control::run(
        proxy.clone(),
        client,
        node.clone(),
        reg_rx,
        health_rx,
        readiness.clone(),
        stop_rx.clone(),
        goodbye_tx,
    ));

    let acceptor = MeshAcceptor::new(
        proxy.config.tls_mode,
        proxy.identity.cell.clone(),
        proxy.identity.trust.clone(),
        &[b"h2", b"http/1.1"],
    )?;
    let drain = Duration::from_secs(10);
    let limits = proxy.config.limits();
    let refused = &proxy.metrics.connections_refused;
    let serving = Serving {
        proxy: proxy.clone(),
        acceptor,
        inbound_gate: serve::Gate::for_listener("inbound", &limits, refused).spread_over(
            "inbound",
            workers,
            &proxy.metrics.worker_connections,
        ),
        outbound_gate: serve::Gate::for_listener("outbound", &limits, refused).spread_over(
            "outbound",
            workers,
            &proxy.metrics.worker_connections,
        ),
        limits,
        drain: drain_rx.clone(),
        grace: drain,
    };
    // Each resolves when a worker has stopped serving (drained).
    let mut served = Vec::new();
    if workers == 1 {
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            serving.run(inbound_listener, outbound_listener).await;
            let _ = done_tx.send(());
        });
        served.push(done_rx);
    } else {
        // The main thread keeps to the control plane, the admin listener and the background
        // work; workers 1..=n serve, each on handles of its own to the two listeners.
        for index in 1..=workers {
            let handles = (handle(&inbound_listener)?, handle(&outbound_listener)?);
            let serving = serving.clone();
            let done = workers::spawn(index, move || async move {
                match (
                    TcpListener::from_std(handles.0),
                    TcpListener::from_std(handles.1),
                ) {
                    (Ok(inbound), Ok(outbound)) => serving.run(inbound, outbound).await,
                    (Err(e), _) | (_, Err(e)) => tracing::error!(
                        worker = index,
                        error = %e,
                        "this worker cannot accept on the listeners; the others serve them"
                    ),
                }
            })
            .with_context(|| format!("cannot start worker thread {index}"))?;
            served.push(done);
        }
        // The workers hold the sockets now; kept here, the main thread would be woken for every
        // new connection it never accepts.
        drop((inbound_listener, outbound_listener));
    }
    tracing::info!(
        workers,
        identity = %proxy.identity.id,
        proxy_id = %node.proxy_id,
        outbound = %proxy.config.outbound,
        inbound = %proxy.config.inbound,
        admin = %proxy.config.admin,
        tls_mode = %proxy.config.tls_mode,
        "proxy running"
    );

    shutdown.await;
    tracing::info!("shutting down: withdrawing from the mesh, then draining");
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(3), goodbye_rx).await;
    // Consumers learn of the withdrawal within one delta; give calls already on their way a
    // moment to arrive, then stop accepting and let in-flight calls finish.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = drain_tx.send(true);
    let _ = tokio::join!(admin_task, control_task);
    for done in served {
        let _ = done.await;
    }
    for t in tasks {
        t.abort();
    }
    tracing::info!("stopped");
    Ok(())
}

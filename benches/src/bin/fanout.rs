//! Control-plane fan-out: N proxy streams over TLS (HTTP/2, mutual TLS) depend on one
//! capability, spread over R replicas of the control plane (R ≥ 2: on a PostgreSQL the bench
//! starts); A agent instances are registered beside them. A provider on the first replica flips
//! its health every 250 ms, and for every flip we time how long until the *last* of the N
//! proxies has the delta (on every replica: across PostgreSQL for all but the first). Also
//! reports each replica's RSS.
//!
//! Usage: capmesh-bench-fanout [STREAMS] [CHANGES] [REPLICAS] [AGENTS]
//!   (defaults: 1000, 40, 1, 0). The A registered instances are 100 per agent identity (one
//!   HTTP/2 connection each, 100 streams on it), every agent offering its own capability, so
//!   the registry holds A instances and A/100 capabilities the watchers do not depend on.
//! Needs `cargo build --release -p capmesh-control-plane -p capmesh-bench`; with REPLICAS ≥ 2,
//! PostgreSQL (Debian's package; installed when missing and run as root).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use capmesh_api::rest::AgentInfo;
use capmesh_api::{
    AgentName, Capability, ControlFrame, Hello, Namespace, Node, ProxyFrame, Registration, ToolSpec,
};
use capmesh_bench::procstat::rss_kib;
use capmesh_client::ControlPlaneClient;
use capmesh_tests::postgres::Postgres;
use capmesh_tests::{ControlPlane, SharedSecrets, TestProxy, workspace_bin};
use hdrhistogram::Histogram;
use tokio::sync::mpsc;

/// Instances of one agent identity, on one HTTP/2 connection (the server allows 200 streams
/// per connection).
const PER_AGENT: usize = 100;

/// Between two health flips of the provider: under the control plane's per-stream limit of 5
/// health frames a second.
const CHANGE_EVERY: Duration = Duration::from_millis(250);

fn registration(deps: &[&str], tools: &[&str]) -> Result<Registration> {
    Ok(Registration {
        endpoint: "127.0.0.1:15006".into(),
        tags: vec![],
        version: None,
        tools: tools
            .iter()
            .map(|t| {
                Ok(ToolSpec {
                    function: (*t).to_owned(),
                    capability: Capability::new(*t)?,
                    version: None,
                    tags: vec![],
                    description: None,
                    input_schema: None,
                })
            })
            .collect::<Result<_>>()?,
        dependencies: deps.iter().map(|d| d.parse()).collect::<Result<_, _>>()?,
    })
}

fn hello(agent: &str, proxy_id: String, registration: Registration) -> Result<ProxyFrame> {
    Ok(ProxyFrame::Hello(Hello {
        node: Node {
            proxy_id,
            agent: AgentName::new(agent)?,
            namespace: Namespace::new("default")?,
            zone: None,
        },
        registration,
        version: None,
    }))
}

fn arg(args: &mut impl Iterator<Item = String>, name: &str, default: usize) -> Result<usize> {
    args.next()
        .map(|s| s.parse())
        .transpose()
        .with_context(|| format!("{name} must be a number"))
        .map(|v| v.unwrap_or(default))
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Every replica's RSS in MiB, as text.
fn rss_all(replicas: &[ControlPlane]) -> String {
    replicas
        .iter()
        .enumerate()
        .map(|(i, cp)| {
            let kib = cp.pid().and_then(rss_kib).unwrap_or(0);
            format!("replica {} {:.1} MiB", i + 1, mib(kib))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Registers `agents` instances, [`PER_AGENT`] per identity, spread over the replicas; their
/// streams are read (and acked) until the bench ends.
async fn register(
    replicas: &[ControlPlane],
    agents: usize,
) -> Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut tasks = Vec::new();
    let identities = agents.div_ceil(PER_AGENT);
    for a in 0..identities {
        let cp = &replicas[a % replicas.len()];
        let name = format!("agent-{a:04}");
        let client = cp.stream_client(cp.credential("default", &name).await?)?;
        let conn = client.stream_connection().await?;
        let capability = format!("cap-{a:04}");
        for i in 0..PER_AGENT.min(agents - a * PER_AGENT) {
            let first = hello(
                &name,
                format!("{name}-{i:03}"),
                registration(&[], &[&capability])?,
            )?;
            let (tx, mut rx) = conn.open(&first).await?;
            tx.send(&ProxyFrame::Health {
                healthy: true,
                detail: None,
            })
            .await?;
            tasks.push(tokio::spawn(async move {
                while let Some(Ok(frame)) = rx.next().await {
                    let version = match frame {
                        ControlFrame::Snapshot(s) => s.version,
                        ControlFrame::Delta(d) => d.version,
                        ControlFrame::Error { .. } | ControlFrame::Nack { .. } => continue,
                    };
                    if tx.send(&ProxyFrame::Ack { version }).await.is_err() {
                        return;
                    }
                }
            }));
        }
    }
    // Every replica serves all of them (its own and, through PostgreSQL, the others').
    for (i, cp) in replicas.iter().enumerate() {
        let rest = cp.rest()?;
        let token = cp.admin_token()?;
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let listed: Vec<AgentInfo> = rest.get("/v1/agents", Some(&token)).await?;
            let n: usize = listed
                .iter()
                .filter(|a| a.name.as_str().starts_with("agent-"))
                .map(|a| a.instances.iter().filter(|i| i.healthy).count())
                .sum();
            if n == agents {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "replica {} lists {n} of {agents} registered instances after 300 s",
                    i + 1
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(tasks)
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let streams = arg(&mut args, "STREAMS", 1000)?;
    let changes = arg(&mut args, "CHANGES", 40)?;
    let replica_count = arg(&mut args, "REPLICAS", 1)?.max(1);
    let agents = arg(&mut args, "AGENTS", 0)?;
    let bin = workspace_bin("capmesh-control-plane")?;

    let mut flags = vec!["--grace".to_owned(), "60s".to_owned()];
    let pg = if replica_count > 1 {
        Some(Postgres::start()?)
    } else {
        None
    };
    let secrets = SharedSecrets::new()?;
    if let Some(pg) = &pg {
        flags.extend(secrets.flags(&pg.url()));
    }
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut replicas = Vec::new();
    for _ in 0..replica_count {
        replicas.push(ControlPlane::start(&bin, &flags).await?);
    }
    let idle = rss_all(&replicas);

    let started = Instant::now();
    let _registered = register(&replicas, agents).await?;
    let registered_secs = started.elapsed().as_secs_f64();
    let with_agents = rss_all(&replicas);

    // One identity, many instances (replicas of one agent), each its own TLS + HTTP/2 stream,
    // spread over the control-plane replicas round robin.
    let (arrived_tx, mut arrived) = mpsc::unbounded_channel::<(usize, u64, Instant)>();
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(streams);
    let (ready_tx, mut ready) = mpsc::unbounded_channel::<()>();
    let mut watchers: Vec<ControlPlaneClient> = Vec::new();
    for cp in &replicas {
        watchers.push(cp.stream_client(cp.credential("default", "watcher").await?)?);
    }
    for i in 0..streams {
        let which = i % replicas.len();
        let client = watchers[which].clone();
        let arrived_tx = arrived_tx.clone();
        let ready_tx = ready_tx.clone();
        tasks.push(tokio::spawn(async move {
            let first = hello("watcher", format!("w-{i}"), registration(&["target"], &[])?)?;
            let (tx, mut rx) = client.open_stream(&first).await?;
            while let Some(frame) = rx.next().await {
                match frame? {
                    ControlFrame::Snapshot(s) => {
                        let _ = ready_tx.send(());
                        tx.send(&ProxyFrame::Ack { version: s.version }).await?;
                    }
                    ControlFrame::Delta(d) => {
                        let now = Instant::now();
                        let healthy = d
                            .upserts
                            .iter()
                            .find(|e| e.capability.as_str() == "target")
                            .map(|e| e.healthy);
                        if let Some(h) = healthy {
                            let _ = arrived_tx.send((which, u64::from(h), now));
                        }
                        tx.send(&ProxyFrame::Ack { version: d.version }).await?;
                    }
                    ControlFrame::Nack { .. } => {}
                    ControlFrame::Error { code, message } => bail!("{code}: {message}"),
                }
            }
            anyhow::Ok(())
        }));
        if i % 50 == 49 {
            tokio::task::yield_now().await;
        }
    }
    for n in 0..streams {
        tokio::time::timeout(Duration::from_secs(120), ready.recv())
            .await
            .with_context(|| {
                format!("only {n} of {streams} streams got their snapshot in 120 s")
            })?;
    }
    let connect_secs = start.elapsed().as_secs_f64();
    let connected = rss_all(&replicas);

    let first = &replicas[0];
    let provider_client = first.stream_client(first.credential("default", "provider").await?)?;
    let provider = TestProxy::connect(
        &provider_client,
        "default",
        "provider",
        "p-1",
        registration(&[], &["target"])?,
    )
    .await?;
    // The provider starts healthy (TestProxy::connect reports health): drain its first wave.
    let mut first_wave = 0;
    while first_wave < streams {
        match tokio::time::timeout(Duration::from_secs(30), arrived.recv()).await {
            Ok(Some((_, 1, _))) => first_wave += 1,
            Ok(Some(_)) => {}
            _ => bail!("only {first_wave} of {streams} proxies saw the provider arrive"),
        }
    }

    let mut last = Histogram::<u64>::new(3)?;
    let mut each = Histogram::<u64>::new(3)?;
    let mut last_on: Vec<Histogram<u64>> = (0..replicas.len())
        .map(|_| Histogram::<u64>::new(3))
        .collect::<Result<_, _>>()?;
    let mut healthy = true;
    for _ in 0..changes {
        // A stream may send 5 health frames a second (bursts of 20); more are refused.
        tokio::time::sleep(CHANGE_EVERY).await;
        healthy = !healthy;
        let t0 = Instant::now();
        provider
            .tx
            .send(&ProxyFrame::Health {
                healthy,
                detail: None,
            })
            .await?;
        let mut seen = 0;
        let mut slowest = Duration::ZERO;
        let mut slowest_on = vec![Duration::ZERO; replicas.len()];
        while seen < streams {
            let (which, h, at) = tokio::time::timeout(Duration::from_secs(30), arrived.recv())
                .await
                .context("a proxy missed a delta for 30 s")?
                .context("streams ended")?;
            if (h == 1) == healthy {
                seen += 1;
                let d = at.duration_since(t0);
                slowest = slowest.max(d);
                slowest_on[which] = slowest_on[which].max(d);
                each.record(d.as_micros() as u64)?;
            }
        }
        last.record(slowest.as_micros() as u64)?;
        for (h, d) in last_on.iter_mut().zip(slowest_on) {
            h.record(d.as_micros() as u64)?;
        }
    }
    let busy = rss_all(&replicas);
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "control plane: {} replica(s) on {}",
        replicas.len(),
        if pg.is_some() {
            "one PostgreSQL"
        } else {
            "SQLite"
        }
    );
    println!(
        "registered: {agents} agent instances ({} agents × {PER_AGENT}, {} capabilities), served by every replica after {registered_secs:.1} s",
        agents.div_ceil(PER_AGENT),
        agents.div_ceil(PER_AGENT)
    );
    println!(
        "streams: {streams} (mutual TLS, HTTP/2, one per proxy, round robin over the replicas), connected in {connect_secs:.1} s"
    );
    println!(
        "change → last proxy's delta over {changes} changes: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        ms(&last, 0.5),
        ms(&last, 0.99),
        last.max() as f64 / 1000.0
    );
    for (i, h) in last_on.iter().enumerate() {
        println!(
            "  last proxy on replica {}{}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            i + 1,
            if i == 0 {
                " (the provider's)"
            } else {
                " (through PostgreSQL)"
            },
            ms(h, 0.5),
            ms(h, 0.99),
            h.max() as f64 / 1000.0
        );
    }
    println!(
        "change → each proxy's delta ({} samples): p50 {:.1} ms, p99 {:.1} ms",
        each.len(),
        ms(&each, 0.5),
        ms(&each, 0.99)
    );
    println!("RSS idle: {idle}");
    println!("RSS with {agents} registered: {with_agents}");
    println!("RSS with {streams} watcher streams too: {connected}");
    println!("RSS after the changes: {busy}");
    drop(Arc::new(tasks));
    Ok(())
}

//! Control-plane fan-out: N proxy streams over TLS (HTTP/2, mutual TLS) depend on one
//! capability; a provider flips its health again and again, and for every flip we time how
//! long until the *last* of the N proxies has the delta. Also reports the control plane's RSS.
//!
//! Usage: capmesh-bench-fanout [STREAMS] [CHANGES]   (defaults: 1000, 40)
//! Needs `cargo build --release -p capmesh-control-plane -p capmesh-bench`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use capmesh_api::{
    AgentName, Capability, ControlFrame, Hello, Namespace, Node, ProxyFrame, Registration, ToolSpec,
};
use capmesh_bench::procstat::rss_kib;
use capmesh_tests::{ControlPlane, TestProxy, workspace_bin};
use hdrhistogram::Histogram;
use tokio::sync::mpsc;

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

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let streams: usize = args
        .next()
        .map(|s| s.parse())
        .transpose()
        .context("STREAMS")?
        .unwrap_or(1000);
    let changes: usize = args
        .next()
        .map(|s| s.parse())
        .transpose()
        .context("CHANGES")?
        .unwrap_or(40);
    let bin = workspace_bin("capmesh-control-plane")?;
    let cp = ControlPlane::start(&bin, &["--grace", "60s"]).await?;
    let pid = cp.pid().context("control plane not running")?;
    let idle_rss = rss_kib(pid).unwrap_or(0);

    // One identity, many instances (replicas of one agent), each its own TLS + HTTP/2 stream.
    let watcher = cp.stream_client(cp.credential("default", "watcher").await?)?;
    let (arrived_tx, mut arrived) = mpsc::unbounded_channel::<(u64, Instant)>();
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(streams);
    let (ready_tx, mut ready) = mpsc::unbounded_channel::<()>();
    for i in 0..streams {
        let client = watcher.clone();
        let arrived_tx = arrived_tx.clone();
        let ready_tx = ready_tx.clone();
        tasks.push(tokio::spawn(async move {
            let hello = ProxyFrame::Hello(Hello {
                node: Node {
                    proxy_id: format!("w-{i}"),
                    agent: AgentName::new("watcher")?,
                    namespace: Namespace::new("default")?,
                    zone: None,
                },
                registration: registration(&["target"], &[])?,
                version: None,
            });
            let (tx, mut rx) = client.open_stream(&hello).await?;
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
                            let _ = arrived_tx.send((u64::from(h), now));
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
    let connected_rss = rss_kib(pid).unwrap_or(0);

    let provider_client = cp.stream_client(cp.credential("default", "provider").await?)?;
    let provider = TestProxy::connect(
        &provider_client,
        "default",
        "provider",
        "p-1",
        registration(&[], &["target"])?,
    )
    .await?;
    // The provider starts healthy (TestProxy::connect reports health): drain its first wave.
    let mut first = 0;
    while first < streams {
        match tokio::time::timeout(Duration::from_secs(30), arrived.recv()).await {
            Ok(Some((1, _))) => first += 1,
            Ok(Some(_)) => {}
            _ => bail!("only {first} of {streams} proxies saw the provider arrive"),
        }
    }

    let mut last = Histogram::<u64>::new(3)?;
    let mut each = Histogram::<u64>::new(3)?;
    let mut healthy = true;
    for _ in 0..changes {
        tokio::time::sleep(Duration::from_millis(100)).await;
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
        while seen < streams {
            let (h, at) = tokio::time::timeout(Duration::from_secs(30), arrived.recv())
                .await
                .context("a proxy missed a delta for 30 s")?
                .context("streams ended")?;
            if (h == 1) == healthy {
                seen += 1;
                let d = at.duration_since(t0);
                slowest = slowest.max(d);
                each.record(d.as_micros() as u64)?;
            }
        }
        last.record(slowest.as_micros() as u64)?;
    }
    let busy_rss = rss_kib(pid).unwrap_or(0);
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "streams: {streams} (mutual TLS, HTTP/2, one per proxy), connected in {connect_secs:.1} s"
    );
    println!(
        "change → last proxy's delta over {changes} changes: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        ms(&last, 0.5),
        ms(&last, 0.99),
        last.max() as f64 / 1000.0
    );
    println!(
        "change → each proxy's delta ({} samples): p50 {:.1} ms, p99 {:.1} ms",
        each.len(),
        ms(&each, 0.5),
        ms(&each, 0.99)
    );
    println!(
        "control plane RSS: idle {:.1} MiB, {streams} streams {:.1} MiB, after changes {:.1} MiB",
        idle_rss as f64 / 1024.0,
        connected_rss as f64 / 1024.0,
        busy_rss as f64 / 1024.0
    );
    drop(Arc::new(tasks));
    Ok(())
}

//! The soak run (issue 16): a constant rate through the mesh path for a long time while the
//! two providers take turns restarting (SIGTERM, then a fresh sidecar), watching for failed
//! calls and for memory that keeps growing.
//!
//! One control plane, two echo upstreams each behind its own provider sidecar, one consumer
//! sidecar; the generator (`capmesh-bench load`, open loop) runs for the whole duration. Every
//! `restart_every`, provider 0, 1, 0, … is stopped with SIGTERM (it withdraws, drains and
//! exits) and a new sidecar for the same upstream starts. The consumer sidecar lives
//! throughout: its RSS after the first minute against its RSS at the end is the growth figure.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use capmesh_tests::{ControlPlane, ProxyProcess, workspace_bin};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::load::LoadReport;
use crate::procstat;

/// What to run.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    /// How long the load runs.
    pub duration: Duration,
    /// Requests per second.
    pub rate: f64,
    /// Time between provider restarts.
    pub restart_every: Duration,
    /// `taskset -c` CPUs of the generator (`None`: unpinned).
    pub gen_cpus: Option<String>,
}

/// What the run saw.
#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    /// The generator's report.
    pub load: LoadReport,
    /// Provider restarts done.
    pub restarts: usize,
    /// The consumer sidecar's RSS (KiB) every 10 s, from the start.
    pub consumer_rss_kib: Vec<u64>,
    /// RSS after the first minute and at the end (KiB).
    pub rss_after_first_minute_kib: u64,
    /// RSS at the end (KiB).
    pub rss_at_end_kib: u64,
}

impl SoakReport {
    /// Growth of the consumer's RSS after the first minute, in percent.
    pub fn growth_percent(&self) -> f64 {
        let first = self.rss_after_first_minute_kib.max(1) as f64;
        (self.rss_at_end_kib as f64 - first) / first * 100.0
    }
}

fn pid_of(p: &ProxyProcess) -> Result<u32> {
    crate::suite::pid_listening(p.admin)
        .with_context(|| format!("no process listens on {}", p.admin))
}

/// Runs the soak (see the module docs).
pub async fn run(opts: SoakOptions) -> Result<SoakReport> {
    let exe = std::env::current_exe()?;
    let cp =
        ControlPlane::start(&workspace_bin("capmesh-control-plane")?, &["--grace", "2s"]).await?;
    let proxy_bin = workspace_bin("capmesh-proxy")?;
    let mut upstreams = Vec::new();
    let mut providers = Vec::new();
    for _ in 0..2 {
        let (child, port, reserved) = crate::suite::start_echo(&exe).await?;
        let url = format!("http://127.0.0.1:{port}/mcp");
        providers.push(ProxyProcess::start(&proxy_bin, &cp, "echo", Some(&url), &[]).await?);
        upstreams.push((child, url, reserved));
    }
    let consumer = ProxyProcess::start(
        &proxy_bin,
        &cp,
        "soak-client",
        None,
        &["--dependency", "echo"],
    )
    .await?;
    let consumer_pid = pid_of(&consumer)?;

    let mut cmd = match &opts.gen_cpus {
        Some(cpus) => {
            let mut c = tokio::process::Command::new("taskset");
            c.args(["-c", cpus]).arg(&exe);
            c
        }
        None => tokio::process::Command::new(&exe),
    };
    cmd.args([
        "load",
        "--url",
        &format!("http://127.0.0.1:{}/mcp", consumer.outbound),
        "--rate",
        &opts.rate.to_string(),
        "--warmup",
        "0",
        "--duration",
        &opts.duration.as_secs_f64().to_string(),
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit())
    .kill_on_drop(true);
    let mut generator = cmd.spawn().context("cannot start the load generator")?;
    let stdout = generator.stdout.take().context("generator stdout")?;
    let report = tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        let mut report = None;
        while let Ok(Some(line)) = lines.next_line().await {
            if line.starts_with('{') {
                report = serde_json::from_str::<LoadReport>(&line).ok();
            }
        }
        report
    });

    let started = Instant::now();
    let mut rss = Vec::new();
    let mut next_restart = opts.restart_every;
    let mut restarts = 0usize;
    let mut next_sample = Duration::ZERO;
    while started.elapsed() < opts.duration {
        let now = started.elapsed();
        if now >= next_sample {
            rss.push(procstat::rss_kib(consumer_pid).unwrap_or(0));
            next_sample += Duration::from_secs(10);
        }
        if now >= next_restart && now + Duration::from_secs(30) < opts.duration {
            let k = restarts % providers.len();
            eprintln!("soak: {:?} restarting provider {k}", now);
            providers[k].terminate()?;
            let url = &upstreams[k].1;
            providers[k] = ProxyProcess::start(&proxy_bin, &cp, "echo", Some(url), &[]).await?;
            restarts += 1;
            next_restart += opts.restart_every;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let status = generator.wait().await?;
    let Some(load) = report.await? else {
        bail!("the load generator gave no report ({status})");
    };
    let after_minute = rss.get(6).copied().unwrap_or(0);
    let at_end = procstat::rss_kib(consumer_pid).unwrap_or(0);
    rss.push(at_end);
    Ok(SoakReport {
        load,
        restarts,
        consumer_rss_kib: rss,
        rss_after_first_minute_kib: after_minute,
        rss_at_end_kib: at_end,
    })
}

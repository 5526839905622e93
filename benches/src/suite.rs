//! The routing-latency suite: starts every path (direct, the capmesh mesh, nginx, HAProxy), runs
//! the load generator against each as a separate pinned process, meters the proxies' CPU and
//! memory while it measures, and writes one JSON line per measured point.
//!
//! Order (so that each scenario starts from a known state):
//! 1. start the echo upstream, the mesh (control plane, one provider sidecar, one consumer
//!    sidecar), nginx and HAProxy; record idle RSS;
//! 2. the load step 1,000 → 5,000 req/s on every path while its pools are still cold;
//! 3. `rounds` interleaved rounds (the path order rotates each round) at 1,000 and 5,000 req/s
//!    over HTTP/1.1, 1,000 req/s over HTTP/2, and saturation (closed loop);
//! 4. a second provider (balancing over 2), then eight more (over 10), each measured `rounds`
//!    times in a row, then one of the ten killed with SIGKILL in the middle of a run.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use capmesh_tests::{ControlPlane, ProxyProcess, workspace_bin};
use http::Uri;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::load::{LoadReport, Proto};
use crate::peers::{Kind, Peer};
use crate::procstat::CpuMeter;

/// The agent name of the provider killed mid-run.
const VICTIM: &str = "echo-victim";

/// How the processes under test are set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Setup {
    /// The comparison: one worker thread per proxy instance, everything but the generator on
    /// one core (the caller pins this process; children inherit it).
    Compare,
    /// capmesh as shipped: default worker threads, no pinning of the proxies (only direct and
    /// capmesh are run).
    Defaults,
}

/// Options of one suite run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Short phases, one round, no saturation: a check that every scenario runs clean.
    pub quick: bool,
    /// Which set-up.
    pub setup: Setup,
    /// Interleaved rounds (medians are taken over them).
    pub rounds: usize,
    /// CPU list for the load generator (`taskset -c`); `None` leaves it unpinned.
    pub gen_cpus: Option<String>,
    /// Where the JSON lines go.
    pub out: PathBuf,
    /// When set, `perf record` samples both capmesh sidecars during round 1's capmesh points
    /// (files `capmesh-<load>.perf.data` here), for the profiles of missed budgets.
    pub perf_dir: Option<PathBuf>,
}

/// One measured point.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Point {
    /// Which set-up.
    pub setup: Setup,
    /// Scenario: `direct`, `capmesh`, `nginx`, `haproxy`, `capmesh-2`, `capmesh-10`,
    /// `capmesh-10-kill`.
    pub path: String,
    /// Load: `1000`, `5000`, `saturation`, `step`.
    pub load: String,
    /// HTTP version from the generator.
    pub proto: Proto,
    /// Round (from 1).
    pub round: usize,
    /// What the generator measured.
    pub report: LoadReport,
    /// Per proxy instance: cores used during the measured phase.
    pub cores: Vec<f64>,
    /// Per proxy instance: RSS at the end of the measured phase (KiB).
    pub rss_kib: Vec<u64>,
    /// Per proxy instance: voluntary context switches (all threads) per request served during
    /// the measured phase.
    #[serde(default)]
    pub switches_per_request: Vec<f64>,
    /// Whether a clean run must have zero errors (all but the kill scenario, which must have
    /// zero errors that had not reached the killed provider).
    pub zero_errors_expected: bool,
}

/// Idle RSS of each path's instances, measured before any load.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Idle {
    /// Which set-up.
    pub setup: Setup,
    /// Path name.
    pub path: String,
    /// Per instance, KiB.
    pub rss_kib: Vec<u64>,
}

/// A line of the suite's output.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Line {
    /// A measured point.
    Point(Box<Point>),
    /// Idle memory.
    Idle(Idle),
    /// How the machine was set up.
    Machine(Machine),
}

/// The machine and pinning, as recorded in the results.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    /// Which set-up.
    pub setup: Setup,
    /// `nproc`.
    pub cpus: usize,
    /// CPUs the proxies and the upstream may use.
    pub sut_cpus: String,
    /// CPUs of the load generator.
    pub gen_cpus: String,
    /// Load average when the run started.
    pub loadavg: String,
    /// `TOKIO_WORKER_THREADS` the proxies got.
    pub tokio_worker_threads: Option<String>,
    /// nginx and HAProxy versions.
    pub peers: Vec<String>,
}

struct Durations {
    warmup: Duration,
    measure: Duration,
    sat_warmup: Duration,
    sat_measure: Duration,
    step_warmup: Duration,
    step_measure: Duration,
    step_at: Duration,
    kill_measure: Duration,
    kill_at: Duration,
    /// The two open-loop rates (and the load step goes from the first to the second).
    rates: [f64; 2],
}

impl Durations {
    fn new(quick: bool) -> Self {
        let s = Duration::from_secs_f64;
        if quick {
            // A longer look at the open-loop points when iterating on speed:
            // CAPMESH_BENCH_QUICK_MEASURE=6 (seconds).
            let measure = std::env::var("CAPMESH_BENCH_QUICK_MEASURE")
                .ok()
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|v| (0.1..=60.0).contains(v))
                .unwrap_or(0.7);
            Self {
                warmup: s(0.3),
                measure: s(measure),
                sat_warmup: s(0.3),
                sat_measure: s(1.0),
                step_warmup: s(0.3),
                step_measure: s(1.4),
                step_at: s(0.7),
                kill_measure: s(2.5),
                kill_at: s(1.0),
                rates: [500.0, 2000.0],
            }
        } else {
            Self {
                warmup: s(2.0),
                measure: s(4.0),
                sat_warmup: s(1.0),
                sat_measure: s(4.0),
                step_warmup: s(2.0),
                step_measure: s(7.0),
                step_at: s(2.0),
                kill_measure: s(8.0),
                kill_at: s(3.0),
                rates: [1000.0, 5000.0],
            }
        }
    }
}

/// A path under test: where the generator connects and which processes are the proxies.
#[derive(Debug, Clone)]
struct Target {
    name: String,
    h1: Uri,
    h2: Uri,
    meter: CpuMeter,
}

/// What a point runs.
#[derive(Debug, Clone, Copy)]
enum Load {
    Rate(f64),
    Saturation,
    Step,
}

impl Load {
    fn label(self) -> String {
        match self {
            Self::Rate(r) => format!("{r:.0}"),
            Self::Saturation => "saturation".into(),
            Self::Step => "step".into(),
        }
    }
}

/// Workers of the closed loop at saturation (HTTP/1.1 connections).
const SATURATION_WORKERS: usize = 64;
/// [`SATURATION_WORKERS`] as the report prints it.
pub const SATURATION_WORKERS_DOC: usize = SATURATION_WORKERS;

struct Runner {
    opts: Options,
    d: Durations,
    exe: PathBuf,
    out: std::fs::File,
    failures: Vec<String>,
}

impl Runner {
    fn emit(&mut self, line: &Line) -> Result<()> {
        use std::io::Write;
        writeln!(self.out, "{}", serde_json::to_string(line)?)?;
        Ok(())
    }

    /// Runs the generator once against `t` and records the point.
    async fn point(
        &mut self,
        t: &Target,
        load: Load,
        proto: Proto,
        round: usize,
        mid_run: Option<(Duration, ProxyProcess)>,
    ) -> Result<Point> {
        let url = match proto {
            Proto::Http1 => &t.h1,
            Proto::Http2 => &t.h2,
        };
        let mut args: Vec<String> = vec![
            "load".into(),
            "--url".into(),
            url.to_string(),
            "--http".into(),
            if proto == Proto::Http2 { "2" } else { "1" }.into(),
        ];
        let d = &self.d;
        let (warmup, measure) = match load {
            Load::Rate(r) => {
                args.extend(["--rate".into(), r.to_string()]);
                if mid_run.is_some() {
                    // A call that failed inside the victim names it; every other failure is
                    // a call the mesh lost.
                    args.extend(["--reached-marker".into(), format!("agent/{VICTIM}")]);
                    (d.warmup, d.kill_measure)
                } else {
                    (d.warmup, d.measure)
                }
            }
            Load::Saturation => {
                args.extend(["--closed".into(), SATURATION_WORKERS.to_string()]);
                (d.sat_warmup, d.sat_measure)
            }
            Load::Step => {
                args.extend([
                    "--rate".into(),
                    d.rates[0].to_string(),
                    "--step-rate".into(),
                    d.rates[1].to_string(),
                    "--step-at".into(),
                    d.step_at.as_secs_f64().to_string(),
                ]);
                (d.step_warmup, d.step_measure)
            }
        };
        args.extend([
            "--warmup".into(),
            warmup.as_secs_f64().to_string(),
            "--duration".into(),
            measure.as_secs_f64().to_string(),
        ]);
        let mut cmd = match &self.opts.gen_cpus {
            Some(cpus) => {
                let mut c = tokio::process::Command::new("taskset");
                c.arg("-c").arg(cpus).arg(&self.exe);
                c
            }
            None => tokio::process::Command::new(&self.exe),
        };
        // The generator uses one runtime thread whatever the proxies were told.
        cmd.args(&args)
            .env_remove("TOKIO_WORKER_THREADS")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {} load", self.exe.display()))?;
        let stdout = child
            .stdout
            .take()
            .context("no stdout from the generator")?;
        let mut lines = BufReader::new(stdout).lines();
        let (mut start, mut end, mut report, mut rss) = (None, None, None, vec![]);
        let mut mid_run = mid_run;
        let mut killed: Option<tokio::task::JoinHandle<()>> = None;
        let mut perf: Option<tokio::process::Child> = None;
        let deadline = Instant::now() + warmup + measure + Duration::from_secs(30);
        loop {
            let line = tokio::time::timeout_at(deadline.into(), lines.next_line())
                .await
                .context("the load generator ran 30 s past its phases")??;
            let Some(line) = line else { break };
            match line.trim() {
                "MEASURE-START" => {
                    start = Some(t.meter.sample());
                    if let (Some(dir), true, Load::Rate(_)) =
                        (&self.opts.perf_dir, t.name == "capmesh" && round == 1, load)
                        && proto == Proto::Http1
                    {
                        perf = Some(start_perf(dir, t, &load.label(), measure)?);
                    }
                    if let Some((after, mut victim)) = mid_run.take() {
                        killed = Some(tokio::spawn(async move {
                            tokio::time::sleep(after).await;
                            victim.kill();
                        }));
                    }
                }
                "MEASURE-END" => {
                    end = Some(t.meter.sample());
                    rss = t.meter.rss_kib();
                }
                json if json.starts_with('{') => {
                    report = Some(serde_json::from_str::<LoadReport>(json).with_context(|| {
                        format!("unreadable report from the generator: {json}")
                    })?);
                }
                _ => {}
            }
        }
        let status = child.wait().await?;
        if let Some(mut p) = perf {
            let _ = tokio::time::timeout(Duration::from_secs(30), p.wait()).await;
        }
        if let Some(k) = killed {
            let _ = k.await;
        }
        let report = match report {
            Some(r) if status.success() => r,
            _ => bail!(
                "the load generator failed ({status}) on {} {}",
                t.name,
                load.label()
            ),
        };
        let (cores, switches) = match (&start, &end) {
            (Some(a), Some(b)) => (t.meter.cores(a, b), t.meter.switches(a, b)),
            _ => (vec![], vec![]),
        };
        let served = report.ok.max(1) as f64;
        let switches_per_request: Vec<f64> = switches.iter().map(|s| *s as f64 / served).collect();
        let point = Point {
            setup: self.opts.setup,
            path: t.name.clone(),
            load: load.label(),
            proto,
            round,
            cores,
            rss_kib: rss,
            switches_per_request,
            zero_errors_expected: !t.name.ends_with("-kill"),
            report,
        };
        let r = &point.report;
        eprintln!(
            "  {:<16} {:<10} {:<8} r{} ok {:>7} err {:>4}  {:>8.0} req/s  p50 {:>6} µs  p99 {:>7} µs  p99.9 {:>7} µs  cores {:?}  switches/req {:?}",
            point.path,
            point.load,
            proto.to_string(),
            round,
            r.ok,
            r.errors,
            r.achieved_rps,
            r.latency.p50_us,
            r.latency.p99_us,
            r.latency.p999_us,
            point
                .cores
                .iter()
                .map(|c| (c * 100.0).round() / 100.0)
                .collect::<Vec<_>>(),
            point
                .switches_per_request
                .iter()
                .map(|c| (c * 100.0).round() / 100.0)
                .collect::<Vec<_>>()
        );
        let lost = r.errors.saturating_sub(r.errors_reached);
        if !point.zero_errors_expected && lost > 0 {
            self.failures.push(format!(
                "{} {} {}: {lost} of {} calls failed that had not reached the killed provider (first: {})",
                point.path,
                point.load,
                proto,
                r.sent,
                r.first_unreached_error
                    .as_deref()
                    .or(r.first_error.as_deref())
                    .unwrap_or("?")
            ));
        }
        if point.zero_errors_expected && r.errors > 0 {
            self.failures.push(format!(
                "{} {} {}: {} of {} calls failed (first: {})",
                point.path,
                point.load,
                proto,
                r.errors,
                r.sent,
                r.first_error.as_deref().unwrap_or("?")
            ));
        }
        self.emit(&Line::Point(Box::new(point.clone())))?;
        Ok(point)
    }

    fn idle(&mut self, t: &Target) -> Result<()> {
        let rss_kib = t.meter.rss_kib();
        self.emit(&Line::Idle(Idle {
            setup: self.opts.setup,
            path: t.name.clone(),
            rss_kib,
        }))
    }
}

/// `perf record` (CPU-clock samples at 999 Hz with DWARF call graphs, so allocations can be
/// charged to their callers) of every process of `t` for `secs`.
fn start_perf(
    dir: &Path,
    t: &Target,
    label: &str,
    secs: Duration,
) -> Result<tokio::process::Child> {
    let pids: Vec<String> = t.meter.roots().iter().map(u32::to_string).collect();
    // More samples for a short (--quick) look: CAPMESH_BENCH_PERF_HZ=9999.
    let hz = std::env::var("CAPMESH_BENCH_PERF_HZ").unwrap_or_else(|_| "999".into());
    tokio::process::Command::new("perf")
        .args(["record", "-q", "-F", &hz, "--call-graph", "dwarf,16384"])
        .args(["-p", &pids.join(","), "-o"])
        .arg(dir.join(format!("{}-{label}.perf.data", t.name)))
        .args(["--", "sleep", &secs.as_secs_f64().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start perf (apt-get install linux-perf)")
}

fn uri(port: u16, path: &str) -> Result<Uri> {
    Ok(format!("http://127.0.0.1:{port}{path}").parse()?)
}

/// One `tools/call` through `url`: the `x-capmesh-served-by` header when it succeeds.
async fn probe(url: &Uri) -> Result<Option<String>> {
    use http_body_util::{BodyExt, Full};
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<bytes::Bytes>>();
    let req = http::Request::post(url.clone())
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", "tools/call")
        .header("mcp-name", "echo")
        .body(Full::new(bytes::Bytes::from_static(
            crate::load::CALL_BODY.as_bytes(),
        )))?;
    let resp = tokio::time::timeout(Duration::from_secs(5), client.request(req)).await??;
    let served = resp
        .headers()
        .get("x-capmesh-served-by")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() || !String::from_utf8_lossy(&body).contains("\"result\"") {
        bail!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        );
    }
    Ok(served)
}

/// Waits until `url` answers a call (and, with `providers`, until that many distinct provider
/// instances have served calls).
async fn until_serving(url: &Uri, providers: usize, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = std::collections::HashSet::new();
    let mut last = String::new();
    loop {
        match probe(url).await {
            Ok(served) => {
                if let Some(s) = served {
                    seen.insert(s);
                }
                if seen.len() >= providers {
                    return Ok(());
                }
            }
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() > deadline {
            bail!(
                "{what} did not serve calls from {providers} provider(s) within 30 s (saw {}; last error: {last})",
                seen.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts the mesh path in front of the echo server at `echo_url`: the control plane,
/// `providers` sidecars for agent `echo` and the consumer's sidecar (`bench-client`, depending
/// on `echo`), each ready.
pub(crate) async fn start_mesh(
    providers: usize,
    echo_url: &str,
) -> Result<(ControlPlane, Vec<ProxyProcess>, ProxyProcess)> {
    let cp =
        ControlPlane::start(&workspace_bin("capmesh-control-plane")?, &["--grace", "2s"]).await?;
    let proxy_bin = workspace_bin("capmesh-proxy")?;
    let mut started = vec![];
    for _ in 0..providers {
        started.push(ProxyProcess::start(&proxy_bin, &cp, "echo", Some(echo_url), &[]).await?);
    }
    let consumer = ProxyProcess::start(
        &proxy_bin,
        &cp,
        "bench-client",
        None,
        &["--dependency", "echo"],
    )
    .await?;
    Ok((cp, started, consumer))
}

/// Waits until the consumer sidecar (admin port `admin`) routes to `count` ready endpoints of
/// `echo`, as its `/metrics` says (`capmesh_proxy_endpoints{state="ready"}`).
pub(crate) async fn until_ready_endpoints(admin: u16, count: usize, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut ready = 0;
    loop {
        if let Ok((200, text)) = capmesh_tests::http_get(admin, "/metrics").await {
            ready = text
                .lines()
                .filter(|l| {
                    l.starts_with("capmesh_proxy_endpoints{")
                        && l.contains("capability=\"echo\"")
                        && l.contains("state=\"ready\"")
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>() as usize;
            if ready >= count {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!(
                "{what}: the consumer sees {ready} ready providers of echo after 30 s, not {count}"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn version_of(program: &str) -> String {
    let Ok(path) = crate::peers::which(program) else {
        return format!("{program}: not installed");
    };
    std::process::Command::new(path)
        .arg("-v")
        .output()
        .map(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines().next().unwrap_or("").trim().to_owned()
        })
        .unwrap_or_default()
}

fn own_cpus() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Cpus_allowed_list:"))
                .map(|l| l.split_whitespace().nth(1).unwrap_or("").to_owned())
        })
        .unwrap_or_default()
}

/// Starts the echo upstream as its own process (so it can be metered and pinned like the
/// proxies); returns it, its port and the port's reservation (hold it while the echo runs).
pub(crate) async fn start_echo(
    exe: &Path,
) -> Result<(tokio::process::Child, u16, capmesh_tests::ReservedPort)> {
    let reserved = capmesh_tests::reserve_port()?;
    let port = reserved.port();
    let child = tokio::process::Command::new(exe)
        .args(["echo", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {} echo", exe.display()))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            bail!("the echo server is not listening on {port} after 10 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok((child, port, reserved))
}

/// Runs the suite; returns the failures (calls that failed where none should).
pub async fn run(opts: Options) -> Result<Vec<String>> {
    let exe = std::env::current_exe()?;
    let out = std::fs::File::create(&opts.out)
        .with_context(|| format!("cannot write {}", opts.out.display()))?;
    let mut r = Runner {
        d: Durations::new(opts.quick),
        exe: exe.clone(),
        out,
        failures: vec![],
        opts: opts.clone(),
    };
    let compare = opts.setup == Setup::Compare;
    r.emit(&Line::Machine(Machine {
        setup: opts.setup,
        cpus: std::fs::read_to_string("/proc/cpuinfo")
            .map(|s| s.lines().filter(|l| l.starts_with("processor")).count())
            .unwrap_or(0),
        sut_cpus: own_cpus(),
        gen_cpus: opts.gen_cpus.clone().unwrap_or_else(|| "unpinned".into()),
        loadavg: std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        tokio_worker_threads: std::env::var("TOKIO_WORKER_THREADS").ok(),
        peers: if compare {
            vec![version_of("nginx"), version_of("haproxy")]
        } else {
            vec![]
        },
    }))?;

    eprintln!("== starting the paths ({:?})", opts.setup);
    let (echo, echo_port, _echo_port_held) = start_echo(&exe).await?;
    let echo_pid = echo.id().context("the echo server exited")?;
    let echo_url = format!("http://127.0.0.1:{echo_port}/mcp");
    let direct = Target {
        name: "direct".into(),
        h1: uri(echo_port, "/mcp")?,
        h2: uri(echo_port, "/mcp")?,
        meter: CpuMeter::new(vec![echo_pid]),
    };
    until_serving(&direct.h1, 0, "the echo server").await?;

    let proxy_bin = workspace_bin("capmesh-proxy")?;
    let (cp, mut providers, consumer) = start_mesh(1, &echo_url).await?;
    let pid = |p: &ProxyProcess| -> Result<u32> {
        // ProxyProcess keeps the child private; its admin port identifies it in /proc.
        pid_listening(p.admin).with_context(|| format!("no process listens on {}", p.admin))
    };
    let mesh = Target {
        name: "capmesh".into(),
        h1: uri(consumer.outbound, "/mcp")?,
        h2: uri(consumer.outbound, "/mcp")?,
        meter: CpuMeter::new(vec![pid(&consumer)?, pid(&providers[0])?]),
    };
    until_serving(&mesh.h1, 1, "the mesh path").await?;

    let mut peers = vec![];
    let mut targets = vec![direct.clone(), mesh.clone()];
    if compare {
        for kind in [Kind::Nginx, Kind::Haproxy] {
            let peer = Peer::start(kind, echo_port)?;
            let (front, back) = peer.pids();
            let t = Target {
                name: kind.program().into(),
                h1: uri(peer.entry_h1, "/mcp")?,
                h2: uri(peer.entry_h2, "/mcp")?,
                meter: CpuMeter::new(vec![front, back]),
            };
            until_serving(&t.h1, 0, kind.program())
                .await
                .with_context(|| peer.logs())?;
            targets.push(t);
            peers.push(peer);
        }
    }
    for t in &targets {
        r.idle(t)?;
    }

    if compare {
        eprintln!(
            "== load step {} → {} req/s, no warm-up at the new rate (cold pools)",
            r.d.rates[0], r.d.rates[1]
        );
        for t in &targets {
            r.point(t, Load::Step, Proto::Http1, 1, None).await?;
        }
    }

    let rounds = if opts.quick { 1 } else { opts.rounds.max(1) };
    for round in 1..=rounds {
        eprintln!("== round {round} of {rounds}");
        let mut order = targets.clone();
        order.rotate_left((round - 1) % targets.len());
        for t in &order {
            for rate in r.d.rates {
                r.point(t, Load::Rate(rate), Proto::Http1, round, None)
                    .await?;
            }
            r.point(t, Load::Rate(r.d.rates[0]), Proto::Http2, round, None)
                .await?;
            if !opts.quick {
                r.point(t, Load::Saturation, Proto::Http1, round, None)
                    .await?;
            }
        }
    }

    if compare {
        eprintln!("== balancing");
        for (count, name) in [(2usize, "capmesh-2"), (10, "capmesh-10")] {
            // Start the new sidecars together, then wait for each.
            let mut fresh = vec![];
            while providers.len() + fresh.len() < count {
                // The tenth provider, killed later, has a name of its own (same capability)
                // so that calls that failed inside it can be told from calls the mesh lost.
                let name = if providers.len() + fresh.len() + 1 == 10 {
                    VICTIM
                } else {
                    "echo"
                };
                let token = cp.token("default", name).await?;
                fresh.push(
                    ProxyProcess::spawn(&proxy_bin, &cp, &token, name, Some(&echo_url), &[])
                        .await?,
                );
            }
            for mut p in fresh {
                p.wait_ready(Duration::from_secs(30)).await?;
                providers.push(p);
            }
            let mut roots = vec![pid(&consumer)?];
            for p in &providers {
                roots.push(pid(p)?);
            }
            let t = Target {
                name: name.into(),
                meter: CpuMeter::new(roots),
                ..mesh.clone()
            };
            until_ready_endpoints(consumer.admin, count, name).await?;
            until_serving(&t.h1, 1, name).await?;
            let mut loads = vec![Load::Rate(r.d.rates[0])];
            if !opts.quick {
                loads.extend([Load::Rate(r.d.rates[1]), Load::Saturation]);
            }
            // As many rounds as the single provider's points, so that the medians compare
            // like with like (one round of 4 s made this p99 swing from run to run).
            for round in 1..=rounds {
                for &load in &loads {
                    r.point(&t, load, Proto::Http1, round, None).await?;
                }
            }
        }
        eprintln!("== one of 10 providers killed (SIGKILL) mid-run");
        let victim = providers.pop().context("no provider to kill")?;
        let t = Target {
            name: "capmesh-10-kill".into(),
            meter: CpuMeter::new(vec![pid(&consumer)?]),
            ..mesh.clone()
        };
        let after = r.d.kill_at;
        let rate = r.d.rates[0];
        r.point(&t, Load::Rate(rate), Proto::Http1, 1, Some((after, victim)))
            .await?;
    }
    // Tracing's cost: the same path with no hop recorded (`--trace-sampling 0`) and with every
    // hop recorded (`--trace-sampling 1`: a client and a server span per call, sent to the
    // control plane), interleaved, at the first rate. A capability of their own keeps the other
    // providers out of it.
    eprintln!(
        "== tracing off / every call sampled, {} req/s",
        r.d.rates[0]
    );
    let traced_provider = ProxyProcess::start(
        &proxy_bin,
        &cp,
        "echo-traced",
        Some(&echo_url),
        &["--capability", "echo=traced_echo", "--trace-sampling", "0"],
    )
    .await?;
    let mut pair = vec![];
    for (name, ratio) in [("capmesh-trace-off", "0"), ("capmesh-trace-all", "1")] {
        let c = ProxyProcess::start(
            &proxy_bin,
            &cp,
            name,
            None,
            &[
                "--dependency",
                "echo=traced_echo",
                "--trace-sampling",
                ratio,
            ],
        )
        .await?;
        let t = Target {
            name: name.into(),
            h1: uri(c.outbound, "/mcp")?,
            h2: uri(c.outbound, "/mcp")?,
            meter: CpuMeter::new(vec![pid(&c)?, pid(&traced_provider)?]),
        };
        until_serving(&t.h1, 1, name).await?;
        pair.push((t, c));
    }
    for round in 1..=rounds {
        let mut order: Vec<&Target> = pair.iter().map(|(t, _)| t).collect();
        order.rotate_left((round - 1) % 2);
        for t in order {
            r.point(t, Load::Rate(r.d.rates[0]), Proto::Http1, round, None)
                .await?;
        }
    }
    drop(pair);
    drop(traced_provider);
    drop(peers);
    drop(providers);
    drop(consumer);
    drop(cp);
    drop(echo);
    Ok(r.failures)
}

/// The pid of the process with a listening socket on 127.0.0.1:`port` (from /proc/net/tcp
/// and the fd links of each process).
pub(crate) fn pid_listening(port: u16) -> Option<u32> {
    let want = format!(":{port:04X}");
    let tcp = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let inode = tcp.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // local_address, state 0A = LISTEN, inode at 9.
        (f.get(1)?.ends_with(&want) && *f.get(3)? == "0A")
            .then(|| f.get(9).map(|s| s.to_string()))?
    })?;
    let target = format!("socket:[{inode}]");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy() == target) {
                return Some(pid);
            }
        }
    }
    None
}

//! The load generator: MCP `tools/call` over HTTP/1.1 or HTTP/2 (cleartext), either open loop
//! at a constant rate or closed loop at a fixed concurrency (saturation).
//!
//! Open loop: a pacing thread computes each request's *intended* send time from the rate
//! alone and hands it to the runtime; latency is measured from that intended time, so a stall
//! anywhere (in the path, in the generator, in a full connection pool) shows up in the
//! histogram instead of silently slowing the sender down (coordinated omission corrected).
//! The generator never waits for a response before sending the next request.
//!
//! Closed loop: `concurrency` workers each send the next request when the previous one is
//! answered; the completed rate is the path's throughput at saturation.
//!
//! Output (stdout): `MEASURE-START` and `MEASURE-END` lines bracket the measured phase (the
//! suite samples the proxies' CPU between them), then one JSON [`LoadReport`] line.

use std::io::Write;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{Request, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc};

/// The HTTP version the generator speaks to the entry of the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Proto {
    /// HTTP/1.1 with keep-alive; one request in flight per connection.
    Http1,
    /// HTTP/2 with prior knowledge; every request multiplexed on one connection.
    Http2,
}

impl FromStr for Proto {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "1" | "h1" | "http1" | "1.1" => Ok(Self::Http1),
            "2" | "h2" | "http2" => Ok(Self::Http2),
            other => bail!("--http {other:?}: use 1 (HTTP/1.1) or 2 (HTTP/2)"),
        }
    }
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Http1 => "HTTP/1.1",
            Self::Http2 => "HTTP/2",
        })
    }
}

/// What to send, how fast and for how long.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// The MCP endpoint (`http://127.0.0.1:PORT/mcp`).
    pub url: Uri,
    /// HTTP version.
    pub proto: Proto,
    /// Open loop: requests per second. Ignored when `closed` is set.
    pub rate: f64,
    /// Closed loop with this many workers (saturation).
    pub closed: Option<usize>,
    /// Sent at the measured rate, not recorded.
    pub warmup: Duration,
    /// The measured phase.
    pub duration: Duration,
    /// A load step: after `at` into the measured phase the rate becomes `rate` at once.
    pub step: Option<Step>,
    /// A request not answered within this is an error.
    pub timeout: Duration,
    /// Errors whose message contains this (the killed provider's SPIFFE ID, which the proxy
    /// names when a call failed inside that provider) are counted apart: those calls had
    /// reached it.
    pub reached_marker: Option<String>,
}

/// A rate change in the middle of the measured phase, with no warm-up at the new rate.
#[derive(Debug, Clone, Copy)]
pub struct Step {
    /// The new rate (requests per second).
    pub rate: f64,
    /// When, counted from the start of the measured phase.
    pub at: Duration,
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Recorded requests.
    pub count: u64,
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Largest.
    pub max_us: u64,
}

impl Percentiles {
    /// Reads the percentiles of `h`.
    pub fn of(h: &Histogram<u64>) -> Self {
        Self {
            count: h.len(),
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

/// What one run measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    /// Requests sent in the measured phase.
    pub sent: u64,
    /// Answered with HTTP 2xx and a JSON-RPC result.
    pub ok: u64,
    /// Everything else: connection errors, timeouts, non-2xx, JSON-RPC errors.
    pub errors: u64,
    /// The first error seen, to name the cause.
    pub first_error: Option<String>,
    /// Of `errors`, those whose message names the `reached_marker` (calls that had reached
    /// the provider it names); 0 without a marker.
    #[serde(default)]
    pub errors_reached: u64,
    /// The first error that does not name the marker, when a marker was given.
    #[serde(default)]
    pub first_unreached_error: Option<String>,
    /// Length of the measured phase in seconds.
    pub seconds: f64,
    /// Successful requests per second over the measured phase.
    pub achieved_rps: f64,
    /// Latency of the successful requests (from the intended send time in open loop).
    pub latency: Percentiles,
    /// After a load step: latency of the requests intended after the step.
    pub after_step: Option<Percentiles>,
    /// After a load step: how many of those took over 5 ms.
    pub after_step_over_5ms: Option<u64>,
}

/// The body of every request: a small stateless (2026-07-28) `tools/call`.
pub const CALL_BODY: &str = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"hello, mesh"},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}"#;

/// Open loop: requests in flight at once (so HTTP/1.1 connections) at most; the rest wait, and
/// the wait counts in their latency. A real client's pool is bounded too; without a bound a
/// stalled path would make the generator open thousands of connections.
pub const MAX_IN_FLIGHT: usize = 256;

fn histogram() -> Result<Histogram<u64>> {
    // 1 µs … 60 s at 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).context("cannot create the latency histogram")
}

#[derive(Debug)]
struct Recorder {
    measured: Histogram<u64>,
    after_step: Histogram<u64>,
    over_5ms: u64,
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    marker: Option<String>,
    errors_reached: u64,
    first_unreached_error: Option<String>,
}

impl Recorder {
    fn record(&mut self, phase: Phase, outcome: Result<Duration, String>) {
        match (phase, outcome) {
            (Phase::Warmup, _) => {}
            (phase, Ok(latency)) => {
                let us = (latency.as_micros() as u64).clamp(1, 60_000_000);
                self.ok += 1;
                let _ = self.measured.record(us);
                if phase == Phase::AfterStep {
                    let _ = self.after_step.record(us);
                    if us > 5_000 {
                        self.over_5ms += 1;
                    }
                }
            }
            (_, Err(e)) => {
                self.errors += 1;
                match &self.marker {
                    Some(m) if e.contains(m.as_str()) => self.errors_reached += 1,
                    Some(_) => {
                        self.first_unreached_error.get_or_insert(e.clone());
                    }
                    None => {}
                }
                self.first_error.get_or_insert(e);
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Warmup,
    Measured,
    AfterStep,
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client(proto: Proto) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(2)));
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .pool_max_idle_per_host(usize::MAX)
        // Below the servers' keep-alive idle (capmesh closes an HTTP/1 connection idle for
        // --header-read-timeout, 10 s), as httpx (5 s) and undici (4 s) keep theirs: a server
        // closing an idle connection then never races a request sent on it.
        .pool_idle_timeout(Duration::from_secs(5));
    if proto == Proto::Http2 {
        builder.http2_only(true);
    }
    builder.build(connector)
}

fn request(url: &Uri) -> Result<Request<Full<Bytes>>> {
    Ok(Request::post(url.clone())
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::ACCEPT, "application/json, text/event-stream")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", "tools/call")
        .header("mcp-name", "echo")
        .body(Full::new(Bytes::from_static(CALL_BODY.as_bytes())))?)
}

/// One call: Ok when answered 2xx with a JSON-RPC result, else the reason.
async fn call(client: &HttpClient, url: &Uri, timeout: Duration) -> Result<(), String> {
    let req = request(url).map_err(|e| e.to_string())?;
    let work = async {
        let resp = client.request(req).await.map_err(|e| {
            let mut msg = e.to_string();
            if let Some(src) = std::error::Error::source(&e) {
                msg = format!("{msg}: {src}");
            }
            msg
        })?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        if !status.is_success() {
            return Err(format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            ));
        }
        if !contains(&body, b"\"result\"") || contains(&body, b"\"error\"") {
            return Err(format!(
                "not a JSON-RPC result: {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            ));
        }
        Ok(())
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn marker(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Runs `spec` on the current runtime and reports. Prints the phase markers as it goes.
pub async fn run(spec: &LoadSpec) -> Result<LoadReport> {
    let recorder = Arc::new(Mutex::new(Recorder {
        measured: histogram()?,
        after_step: histogram()?,
        over_5ms: 0,
        ok: 0,
        errors: 0,
        first_error: None,
        marker: spec.reached_marker.clone(),
        errors_reached: 0,
        first_unreached_error: None,
    }));
    let client = client(spec.proto);
    let (sent, seconds) = match spec.closed {
        Some(workers) => closed_loop(spec, workers, &client, &recorder).await?,
        None => open_loop(spec, &client, &recorder).await?,
    };
    let r = recorder.lock().unwrap_or_else(|p| p.into_inner());
    let errors = r.errors + sent.saturating_sub(r.ok + r.errors);
    Ok(LoadReport {
        sent,
        ok: r.ok,
        errors,
        first_error: r.first_error.clone(),
        errors_reached: r.errors_reached,
        first_unreached_error: r.first_unreached_error.clone(),
        seconds,
        achieved_rps: r.ok as f64 / seconds.max(1e-9),
        latency: Percentiles::of(&r.measured),
        after_step: spec.step.map(|_| Percentiles::of(&r.after_step)),
        after_step_over_5ms: spec.step.map(|_| r.over_5ms),
    })
}

async fn open_loop(
    spec: &LoadSpec,
    client: &HttpClient,
    recorder: &Arc<Mutex<Recorder>>,
) -> Result<(u64, f64)> {
    if !(spec.rate > 0.0 && spec.rate <= 1_000_000.0) {
        bail!(
            "--rate {}: use a rate between 1 and 1000000 requests per second",
            spec.rate
        );
    }
    // The pacing thread sleeps to each intended time with the OS timer (tens of µs), which
    // the runtime's millisecond timer could not do.
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Phase)>();
    let (warmup, duration, rate, step) = (spec.warmup, spec.duration, spec.rate, spec.step);
    let pacer = std::thread::spawn(move || {
        let start = Instant::now() + Duration::from_millis(5);
        let measure_at = start + warmup;
        let end = measure_at + duration;
        let step_at = step.map(|s| measure_at + s.at);
        let mut next = start;
        let mut started = false;
        let mut sent = 0u64;
        while next < end {
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            }
            let phase = if next < measure_at {
                Phase::Warmup
            } else {
                if !started {
                    started = true;
                    marker("MEASURE-START");
                }
                match step_at {
                    Some(at) if next >= at => Phase::AfterStep,
                    _ => Phase::Measured,
                }
            };
            if phase != Phase::Warmup {
                sent += 1;
            }
            if tx.send((next, phase)).is_err() {
                break;
            }
            let current = match (step, step_at) {
                (Some(s), Some(at)) if next >= at => s.rate,
                _ => rate,
            };
            next += Duration::from_secs_f64(1.0 / current);
        }
        marker("MEASURE-END");
        sent
    });
    // At most this many requests wait for or hold a connection; the rest queue here, and
    // their wait counts in their latency.
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut tasks = tokio::task::JoinSet::new();
    while let Some((intended, phase)) = rx.recv().await {
        let client = client.clone();
        let url = spec.url.clone();
        let timeout = spec.timeout;
        let recorder = recorder.clone();
        let permits = permits.clone();
        tasks.spawn(async move {
            let outcome = match permits.acquire().await {
                Ok(_permit) => call(&client, &url, timeout)
                    .await
                    .map(|()| intended.elapsed()),
                Err(_) => Err("the generator is shutting down".to_owned()),
            };
            recorder
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .record(phase, outcome);
        });
        // Reap finished tasks so the set stays small.
        while tasks.try_join_next().is_some() {}
    }
    let drain = tokio::time::timeout(spec.timeout + Duration::from_secs(1), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drain.is_err() {
        tasks.abort_all();
    }
    let sent = pacer
        .join()
        .map_err(|_| anyhow::anyhow!("the pacing thread failed"))?;
    Ok((sent, spec.duration.as_secs_f64()))
}

async fn closed_loop(
    spec: &LoadSpec,
    workers: usize,
    client: &HttpClient,
    recorder: &Arc<Mutex<Recorder>>,
) -> Result<(u64, f64)> {
    if workers == 0 || workers > 10_000 {
        bail!("--closed {workers}: use between 1 and 10000 concurrent workers");
    }
    let start = Instant::now();
    let measure_at = start + spec.warmup;
    let end = measure_at + spec.duration;
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let (client, url, recorder, sent) = (
            client.clone(),
            spec.url.clone(),
            recorder.clone(),
            sent.clone(),
        );
        let timeout = spec.timeout;
        tasks.spawn(async move {
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    return;
                }
                let phase = if t0 < measure_at {
                    Phase::Warmup
                } else {
                    sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    Phase::Measured
                };
                let outcome = call(&client, &url, timeout).await.map(|()| t0.elapsed());
                let failed = outcome.is_err();
                recorder
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .record(phase, outcome);
                if failed {
                    // Don't spin on a path that refuses connections.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        });
    }
    tokio::time::sleep_until((measure_at).into()).await;
    marker("MEASURE-START");
    tokio::time::sleep_until(end.into()).await;
    marker("MEASURE-END");
    let drain = tokio::time::timeout(spec.timeout + Duration::from_secs(1), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drain.is_err() {
        tasks.abort_all();
    }
    Ok((
        sent.load(std::sync::atomic::Ordering::Relaxed),
        spec.duration.as_secs_f64(),
    ))
}

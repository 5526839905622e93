//! `capmesh-bench`: the routing-latency bench (issue 9). Subcommands:
//!
//! - `echo --listen ADDR`: the minimal MCP upstream;
//! - `load --url URL --rate R | --closed N …`: the open-loop (or closed-loop) generator;
//! - `suite --setup compare|defaults --out FILE.jsonl`: every scenario, one JSON line per point;
//! - `hold --path capmesh|nginx|haproxy|floor --upstream PORT`: one path held for outside
//!   measurement;
//! - `floor --role front|back …`: one instance of the floor path (started by `hold`);
//! - `report FILE.jsonl…`: the Markdown tables (medians over rounds) for `benches/RESULTS.md`.
//!
//! `benches/run.sh` drives all of it; see `benches/RESULTS.md` for what each scenario is.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use capmesh_bench::load::{LoadSpec, Proto, Step};
use capmesh_bench::suite::{Options, Setup};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "capmesh-bench",
    about = "capmesh routing-latency bench",
    version
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve the minimal MCP echo upstream (one tool, `echo`).
    Echo {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:9090")]
        listen: SocketAddr,
        /// Runtime worker threads.
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
    /// Send MCP `tools/call` at a constant rate (open loop) or from N workers (closed loop).
    Load {
        /// The MCP endpoint, e.g. http://127.0.0.1:15001/mcp.
        #[arg(long)]
        url: http::Uri,
        /// HTTP version: 1 (HTTP/1.1, keep-alive) or 2 (HTTP/2 prior knowledge).
        #[arg(long, default_value = "1")]
        http: Proto,
        /// Requests per second (open loop).
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        /// Closed loop with this many concurrent workers instead of a rate (saturation).
        #[arg(long)]
        closed: Option<usize>,
        /// Seconds at the measured rate before recording.
        #[arg(long, default_value_t = 2.0)]
        warmup: f64,
        /// Seconds recorded.
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
        /// Switch to this rate mid-run, without warm-up (load step).
        #[arg(long, requires = "step_at")]
        step_rate: Option<f64>,
        /// Seconds into the recorded phase when the step happens.
        #[arg(long, requires = "step_rate")]
        step_at: Option<f64>,
        /// Seconds before a request counts as failed.
        #[arg(long, default_value_t = 5.0)]
        timeout: f64,
        /// Count apart the errors whose message contains this text (the SPIFFE ID of a
        /// provider killed during the run: calls that failed inside it had reached it).
        #[arg(long, value_name = "TEXT")]
        reached_marker: Option<String>,
    },
    /// Run every scenario against every path; one JSON line per measured point.
    Suite {
        /// `compare` (one worker per proxy, run pinned) or `defaults` (capmesh as shipped).
        #[arg(long, default_value = "compare", value_parser = parse_setup)]
        setup: Setup,
        /// Short phases, one round, no saturation: checks every scenario runs without errors.
        #[arg(long)]
        quick: bool,
        /// Interleaved rounds; the tables show medians over them.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// `taskset -c` CPU list for the load generator; empty for unpinned.
        #[arg(long, default_value = "0")]
        gen_cpus: String,
        /// Output file (JSON lines).
        #[arg(long)]
        out: PathBuf,
        /// Record `perf` profiles of the capmesh sidecars (round 1) into this directory.
        #[arg(long)]
        perf_dir: Option<PathBuf>,
    },
    /// Hold a rate through the mesh path for a long time while the two providers take turns
    /// restarting; prints the failed calls and the consumer sidecar's RSS growth.
    Soak {
        /// Minutes of load.
        #[arg(long, default_value_t = 30.0)]
        minutes: f64,
        /// Requests per second.
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        /// Minutes between provider restarts.
        #[arg(long, default_value_t = 5.0)]
        restart_every: f64,
        /// `taskset -c` CPU list for the load generator; empty for unpinned.
        #[arg(long, default_value = "0")]
        gen_cpus: String,
    },
    /// Start one path (the mesh with N providers, nginx, HAProxy or the floor path) in front
    /// of a running echo upstream and hold it until SIGTERM; prints its entry URL and process
    /// ids as one JSON line.
    Hold {
        /// `capmesh`, `nginx`, `haproxy` or `floor` (capmesh's HTTP and TLS crates without
        /// capmesh).
        #[arg(long)]
        path: capmesh_bench::hold::HoldPath,
        /// Provider sidecars (capmesh only).
        #[arg(long, default_value_t = 1)]
        providers: usize,
        /// The echo upstream's port on 127.0.0.1 (`capmesh-bench echo`).
        #[arg(long)]
        upstream: u16,
    },
    /// One instance of the floor path: hyper, h2 and rustls as capmesh's sidecars use them,
    /// with nothing of capmesh's in between (started by `hold --path floor`). Prints the port
    /// it listens on.
    Floor {
        /// `front` (HTTP/1.1 in, HTTP/2 over mutual TLS out) or `back` (the reverse).
        #[arg(long)]
        role: capmesh_bench::floor::Role,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// The port on 127.0.0.1 to send to: the back instance's, or the upstream's.
        #[arg(long)]
        to: u16,
        /// The directory with the bench CA and the instances' certificates and keys.
        #[arg(long)]
        certs: PathBuf,
    },
    /// Print the Markdown results section from suite outputs.
    Report {
        /// Files written by `suite --out`.
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
    },
}

fn parse_setup(s: &str) -> Result<Setup, String> {
    match s {
        "compare" => Ok(Setup::Compare),
        "defaults" => Ok(Setup::Defaults),
        other => Err(format!("{other:?}: use compare or defaults")),
    }
}

fn secs(flag: &str, v: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(v)
        .ok()
        .filter(|d| *d <= Duration::from_secs(3600))
        .with_context(|| format!("{flag} {v}: use a number of seconds between 0 and 3600"))
}

fn runtime(threads: usize) -> Result<tokio::runtime::Runtime> {
    let rt = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?
    };
    Ok(rt)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.cmd) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("capmesh-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: Cmd) -> Result<ExitCode> {
    match cmd {
        Cmd::Soak {
            minutes,
            rate,
            restart_every,
            gen_cpus,
        } => {
            let opts = capmesh_bench::soak::SoakOptions {
                duration: secs("--minutes", minutes * 60.0)?,
                rate,
                restart_every: secs("--restart-every", restart_every * 60.0)?,
                gen_cpus: (!gen_cpus.is_empty()).then_some(gen_cpus),
            };
            let report = runtime(2)?.block_on(capmesh_bench::soak::run(opts))?;
            let l = &report.load;
            println!("{}", serde_json::to_string(&report)?);
            eprintln!(
                "soak: {} sent, {} ok, {} failed; p50 {} µs p99 {} µs p99.9 {} µs; {} restarts; consumer RSS {} KiB after 1 min → {} KiB at the end ({:+.1} %)",
                l.sent,
                l.ok,
                l.errors,
                l.latency.p50_us,
                l.latency.p99_us,
                l.latency.p999_us,
                report.restarts,
                report.rss_after_first_minute_kib,
                report.rss_at_end_kib,
                report.growth_percent()
            );
            Ok(if l.errors == 0 && report.growth_percent() < 5.0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Cmd::Floor {
            role,
            listen,
            to,
            certs,
        } => {
            runtime(1)?.block_on(capmesh_bench::floor::serve(role, listen, to, &certs))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Echo { listen, threads } => {
            runtime(threads)?.block_on(capmesh_bench::echo::serve(listen))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Load {
            url,
            http,
            rate,
            closed,
            warmup,
            duration,
            step_rate,
            step_at,
            timeout,
            reached_marker,
        } => {
            let step = match (step_rate, step_at) {
                (Some(rate), Some(at)) => Some(Step {
                    rate,
                    at: secs("--step-at", at)?,
                }),
                _ => None,
            };
            let spec = LoadSpec {
                url,
                proto: http,
                rate,
                closed,
                warmup: secs("--warmup", warmup)?,
                duration: secs("--duration", duration)?,
                step,
                timeout: secs("--timeout", timeout)?,
                reached_marker,
            };
            let report = runtime(1)?.block_on(capmesh_bench::load::run(&spec))?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Suite {
            setup,
            quick,
            rounds,
            gen_cpus,
            out,
            perf_dir,
        } => {
            let opts = Options {
                quick,
                setup,
                rounds,
                gen_cpus: (!gen_cpus.is_empty()).then_some(gen_cpus),
                out,
                perf_dir,
            };
            // The suite's own runtime is small; the proxies it starts read TOKIO_WORKER_THREADS.
            let failures = runtime(2)?.block_on(capmesh_bench::suite::run(opts))?;
            if failures.is_empty() {
                eprintln!("every scenario completed with zero errors where zero is expected");
                Ok(ExitCode::SUCCESS)
            } else {
                for f in &failures {
                    eprintln!("FAILED: {f}");
                }
                Ok(ExitCode::FAILURE)
            }
        }
        Cmd::Hold {
            path,
            providers,
            upstream,
        } => {
            runtime(1)?.block_on(capmesh_bench::hold::run(path, providers, upstream))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Report { inputs } => {
            print!("{}", capmesh_bench::report::render(&inputs)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

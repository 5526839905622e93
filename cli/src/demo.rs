//! `capmesh demo`: a small trip planner on a real local mesh.
//!
//! Every box is its own process — this binary run as `capmesh control-plane`, `capmesh proxy`
//! and `capmesh agent` — so killing the preferred LLM provider is a real crash, and the
//! failover shown is what production would see. Every process binds port 0 and reports the
//! port it got. Output is plain text when stdout is not a terminal (or with `NO_COLOR`), and a
//! closed stdout (`capmesh demo | head -3`) stops the demo quietly, cleaning up as usual.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use capmesh_api::rest::{AgentInfo, TokenCreated, TokenRequest};
use capmesh_client::{ControlPlaneClient, ServerCheck};
use serde_json::{Value, json};

use crate::local_mesh::{self, LocalMesh};
use crate::output::{self, bold, line};
use crate::supervise::{Output, Supervisor, http_get, port, wait_ports, wait_ready};

/// Printed like `println!`, but through [`output::line`] (no panic on a closed stdout).
macro_rules! say {
    ($($arg:tt)*) => { line(&format!($($arg)*)) };
}

/// Flags of `capmesh demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Keep the mesh running after the demo until Ctrl-C (try `capmesh list` meanwhile).
    #[arg(long)]
    pub keep: bool,
    /// Print every process's own log lines too.
    #[arg(long)]
    pub verbose: bool,
}

/// One agent of the demo and its sidecar.
struct Member {
    name: &'static str,
    kind: &'static str,
    extra_agent: &'static [&'static str],
    sidecar: &'static [&'static str],
    what: &'static str,
}

const MEMBERS: &[Member] = &[
    Member {
        name: "weather-eu",
        kind: "weather",
        extra_agent: &[],
        sidecar: &["--tags", "eu"],
        what: "weather agent → get_weather",
    },
    Member {
        name: "flights",
        kind: "flights",
        extra_agent: &[],
        sidecar: &[],
        what: "flights agent → search_flights",
    },
    Member {
        name: "llm-claude",
        kind: "llm",
        extra_agent: &["--flavor", "claude"],
        sidecar: &["--tags", "claude", "--capability", "chat=llm"],
        what: "LLM agent, tag claude → llm",
    },
    Member {
        name: "llm-openai",
        kind: "llm",
        extra_agent: &["--flavor", "openai"],
        sidecar: &["--tags", "openai", "--capability", "chat=llm"],
        what: "LLM agent, tag openai → llm",
    },
];

/// A sidecar's ports, as it reported them.
struct Ports {
    outbound: u16,
    admin: u16,
}

impl Ports {
    fn from(ports: &BTreeMap<String, SocketAddr>) -> anyhow::Result<Self> {
        Ok(Self {
            outbound: port(ports, "outbound")?,
            admin: port(ports, "admin")?,
        })
    }
}

/// The reader of stdout went away (`capmesh demo | head -3`): stop the demo, quietly.
#[derive(Debug, thiserror::Error)]
#[error("stdout was closed")]
struct Closed;

fn step(n: u32, text: &str) -> anyhow::Result<()> {
    if output::stdout_closed() {
        return Err(Closed.into());
    }
    say!("\n{}", bold(&format!("{n}. {text}")));
    Ok(())
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| (*x).to_owned()).collect()
}

/// One stateless (2026-07-28) `tools/call` through a sidecar: (answer text, served by).
async fn mcp_call(outbound: u16, tool: &str, args: Value) -> anyhow::Result<(String, String)> {
    use http_body_util::{BodyExt, Full};
    let body = json!({
        "jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {
            "name": tool, "arguments": args,
            "_meta": { "io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {} }
        }
    });
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<bytes::Bytes>>();
    let req = http::Request::post(format!("http://127.0.0.1:{outbound}/mcp"))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", "tools/call")
        .header("mcp-name", tool)
        .body(Full::new(bytes::Bytes::from(serde_json::to_vec(&body)?)))?;
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .context("no answer in 10 s")??;
    let served = resp
        .headers()
        .get("x-capmesh-served-by")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    let status = resp.status();
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    // A body that breaks after the headers came from the provider that served them.
    let bytes = resp
        .into_body()
        .collect()
        .await
        .with_context(|| format!("the answer from {served} broke off"))?
        .to_bytes();
    let rpc = capmesh_proxy::mcp::sse::find_response(
        &bytes,
        &ct,
        &capmesh_proxy::mcp::jsonrpc::Id::from(1),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?
    .with_context(|| format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes)))?;
    if let Some(err) = rpc.get("error") {
        bail!(
            "HTTP {status}: {}",
            err["message"].as_str().unwrap_or("error")
        );
    }
    let text = rpc["result"]["content"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    Ok((text, served))
}

/// Runs the demo.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find the capmesh binary")?;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("control-plane");
    let log_file = dir.path().join("mesh.log");
    let output = if args.verbose {
        Output::Prefixed
    } else {
        Output::File(log_file.clone())
    };
    let mut sup = Supervisor::default();
    let result = demo(&args, &exe, dir.path(), &data, output, &mut sup).await;
    let closed = output::stdout_closed()
        || result
            .as_ref()
            .is_err_and(|e| e.downcast_ref::<Closed>().is_some());
    say!(
        "\n{} (SIGTERM: sidecars withdraw, then drain)…",
        bold("Stopping the mesh")
    );
    sup.stop_all(Duration::from_secs(15)).await;
    if closed {
        // Nobody reads the story any more: end as quietly as `head` expects.
        drop(dir);
        return Ok(());
    }
    if let Err(e) = &result {
        eprintln!("\ncapmesh demo failed: {e:#}");
        if let Ok(log) = std::fs::read_to_string(&log_file) {
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- last lines of the mesh's log ---");
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
    drop(dir);
    say!("Stopped. Temporary files removed.");
    result
}

/// One failover call's outcome: who served it, or why it failed.
type Outcome = Result<String, String>;

async fn demo(
    args: &DemoArgs,
    exe: &Path,
    run_dir: &Path,
    data: &Path,
    output: Output,
    sup: &mut Supervisor,
) -> anyhow::Result<()> {
    say!(
        "{} — a trip planner on a local service mesh. Every agent below is its own",
        bold("capmesh demo")
    );
    say!(
        "process with its own sidecar; agent ↔ agent traffic is mutual TLS with SPIFFE identities."
    );

    step(1, "Control plane")?;
    let cp_ports = run_dir.join("control-plane.ports.json");
    sup.spawn(
        "control-plane",
        exe,
        &[
            s(&["control-plane", "--data-dir"]),
            vec![data.display().to_string()],
            s(&[
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--grace",
                "2s",
                "--ports-file",
            ]),
            vec![cp_ports.display().to_string()],
        ]
        .concat(),
        &[],
        output.clone(),
    )?;
    let ports = wait_ports(sup, "the control plane", &cp_ports, Duration::from_secs(20)).await?;
    let (api, admin) = (port(&ports, "listen")?, port(&ports, "admin")?);
    wait_ready(
        sup,
        "the control plane",
        admin,
        "/ready",
        Duration::from_secs(20),
    )
    .await?;
    let ca: PathBuf = data.join("ca.pem");
    let token_file = data.join("admin-token");
    let token = std::fs::read_to_string(&token_file)?.trim().to_owned();
    let rest = ControlPlaneClient::new(
        format!("https://localhost:{api}").parse::<capmesh_client::ControlPlaneUrl>()?,
        ServerCheck::Hostname {
            ca_pem: std::fs::read_to_string(&ca)?,
        },
        None,
        None,
    )?;
    say!("   https://127.0.0.1:{api}  (CA and admin token in a temporary data dir)");
    say!(
        "   dashboard: http://127.0.0.1:{admin}/dashboard  (read-only: the mesh, live traffic, traces)"
    );

    step(2, "Agents, each behind its own capmesh-proxy sidecar")?;
    let control_plane = format!("https://127.0.0.1:{api}");
    let sidecar = |sup: &mut Supervisor,
                   name: &str,
                   agent_url: &str,
                   extra: &[&str],
                   bootstrap: String|
     -> anyhow::Result<PathBuf> {
        let ports_file = run_dir.join(format!("{name}-proxy.ports.json"));
        let mut argv = s(&[
            "proxy",
            "--agent-name",
            name,
            "--agent-url",
            agent_url,
            "--control-plane",
            &control_plane,
        ]);
        argv.extend(s(&["--control-plane-ca", &ca.display().to_string()]));
        argv.extend(s(&[
            "--outbound",
            "127.0.0.1:0",
            "--inbound",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--ports-file",
            &ports_file.display().to_string(),
        ]));
        argv.extend(s(extra));
        sup.spawn(
            &format!("{name}-proxy"),
            exe,
            &argv,
            &[("CAPMESH_BOOTSTRAP_TOKEN".into(), bootstrap)],
            output.clone(),
        )?;
        Ok(ports_file)
    };
    let bootstrap = |agent: &'static str| {
        let rest = &rest;
        let token = &token;
        async move {
            let created: TokenCreated = rest
                .post(
                    "/v1/tokens",
                    &TokenRequest {
                        namespace: "default".parse()?,
                        agent_pattern: agent.into(),
                        ttl_secs: 600,
                        uses: None,
                        system: false,
                        description: Some("demo".into()),
                    },
                    Some(token),
                )
                .await?;
            Ok::<_, anyhow::Error>(created.token)
        }
    };
    let mut member_ports = Vec::new();
    for m in MEMBERS {
        let mut argv = s(&["agent", m.kind, "--port", "0", "--name", m.name]);
        argv.extend(s(m.extra_agent));
        sup.spawn(m.name, exe, &argv, &[], output.clone())?;
        let agent_port = sup.ready_port(m.name, Duration::from_secs(20)).await?;
        let ports_file = sidecar(
            sup,
            m.name,
            &format!("http://127.0.0.1:{agent_port}/mcp"),
            m.sidecar,
            bootstrap(m.name).await?,
        )?;
        say!("   {:<12} {}", m.name, m.what);
        member_ports.push(ports_file);
    }
    let planner_deps = [
        "--dependency",
        "get_weather",
        "--dependency",
        "search_flights",
        "--dependency",
        "chat=llm:+claude",
    ];
    let planner_file = sidecar(
        sup,
        "planner",
        "none",
        &planner_deps,
        bootstrap("planner").await?,
    )?;
    say!(
        "   {:<12} the planner's sidecar: depends on get_weather, search_flights and chat=llm:+claude",
        "planner"
    );
    for (m, file) in MEMBERS.iter().zip(&member_ports) {
        let what = format!("{}'s sidecar", m.name);
        let p = Ports::from(&wait_ports(sup, &what, file, Duration::from_secs(20)).await?)?;
        wait_ready(sup, &what, p.admin, "/ready", Duration::from_secs(30)).await?;
    }
    let planner = Ports::from(
        &wait_ports(
            sup,
            "the planner's sidecar",
            &planner_file,
            Duration::from_secs(20),
        )
        .await?,
    )?;
    wait_ready(
        sup,
        "the planner's sidecar",
        planner.admin,
        "/ready",
        Duration::from_secs(30),
    )
    .await?;

    step(3, "The mesh, as the control plane sees it")?;
    let agents: Vec<AgentInfo> = rest.get("/v1/agents", Some(&token)).await?;
    say!(
        "   {:<12} {:<50} {:<16} TAGS",
        "AGENT",
        "mTLS IDENTITY",
        "CAPABILITIES"
    );
    for a in &agents {
        let inst = a.instances.first();
        let caps: Vec<String> = inst
            .map(|i| i.tools.iter().map(|t| t.capability.to_string()).collect())
            .unwrap_or_default();
        let tags: Vec<String> = inst
            .map(|i| i.tags.iter().map(|t| t.to_string()).collect())
            .unwrap_or_default();
        say!(
            "   {:<12} {:<50} {:<16} {}",
            a.name.as_str(),
            a.identity,
            caps.join(","),
            tags.join(",")
        );
    }

    step(
        4,
        "The planner plans a trip through its sidecar (the official Rust MCP SDK as client)",
    )?;
    let mesh_url = format!("http://127.0.0.1:{}/mcp", planner.outbound);
    let plan = capmesh_examples::plan_trip(&mesh_url, "Lisbon")
        .await
        .context("the planner failed")?;
    for text in plan.to_string().lines() {
        say!("   {text}");
    }
    say!("   Who served each call (x-capmesh-served-by, the provider's verified identity):");
    for (tool, arguments) in [
        ("get_weather", json!({ "city": "Lisbon" })),
        (
            "search_flights",
            json!({ "origin": "Berlin", "destination": "Lisbon", "date": "2026-12-01" }),
        ),
        ("chat", json!({ "prompt": "Plan three days in Lisbon" })),
    ] {
        let (_, served) = mcp_call(planner.outbound, tool, arguments).await?;
        say!("   {tool:<15} → {served}");
    }
    // Collected now, while every provider that served the trip still runs (a sidecar sends
    // its spans once a second; llm-claude is killed next). Shown at the end.
    // Three calls, each a client span at the planner's sidecar and a server span at the
    // provider's.
    let trip = trip_trace(&rest, &token, &plan.trace_id, 6).await?;

    step(
        5,
        "Failover: kill -9 the preferred LLM provider (llm-claude, agent and sidecar) mid-traffic",
    )?;
    // Four callers keep calls in flight; the provider dies after 40 calls were served, while
    // others are on their way. All times are on this process's clock.
    const CALLERS: usize = 4;
    const KILL_AFTER: usize = 40;
    let run_for = Duration::from_millis(2600);
    let started = Instant::now();
    let served = Arc::new(AtomicUsize::new(0));
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..CALLERS {
        let (served, outbound) = (served.clone(), planner.outbound);
        callers.spawn(async move {
            let mut outcomes: Vec<(Duration, Outcome)> = Vec::new();
            while started.elapsed() < run_for {
                let at = started.elapsed();
                let call = mcp_call(
                    outbound,
                    "chat",
                    json!({ "prompt": "Where to eat in Lisbon?" }),
                )
                .await;
                match call {
                    Ok((_, who)) => {
                        served.fetch_add(1, Ordering::Relaxed);
                        outcomes.push((at, Ok(agent_of(&who))));
                    }
                    Err(e) => outcomes.push((at, Err(format!("{e:#}")))),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            outcomes
        });
    }
    let mut killed_at = None;
    while started.elapsed() < run_for && killed_at.is_none() {
        if served.load(Ordering::Relaxed) >= KILL_AFTER {
            sup.kill("llm-claude-proxy").await?;
            sup.kill("llm-claude").await?;
            let at = started.elapsed();
            killed_at = Some(at);
            say!(
                "   ✝ llm-claude killed at {:>5.0} ms, after {} calls were served",
                at.as_secs_f64() * 1000.0,
                served.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut outcomes = Vec::new();
    while let Some(done) = callers.join_next().await {
        outcomes.extend(done.context("a caller task panicked")?);
    }
    outcomes.sort_by_key(|(at, _)| *at);
    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    let (mut reached, mut lost, mut first_openai) = (0u32, 0u32, None);
    for (at, outcome) in &outcomes {
        match outcome {
            Ok(who) => {
                *counts.entry(who.clone()).or_default() += 1;
                if let Some(k) = killed_at
                    && *at >= k
                    && who == "llm-openai"
                    && first_openai.is_none()
                {
                    first_openai = Some(*at - k);
                }
            }
            // The proxy names the provider a failed call was answered by: such a call was
            // running at llm-claude when it died, and is not retried, since it may have had
            // an effect there. Anything else is a call the mesh lost.
            Err(e) if e.contains("agent/llm-claude") => {
                reached += 1;
                say!("   ~ in flight at llm-claude when it died: {e}");
            }
            Err(e) => {
                lost += 1;
                say!("   ✗ {e}");
            }
        }
    }
    let by: Vec<String> = counts.iter().map(|(who, n)| format!("{who} {n}")).collect();
    say!(
        "   calls: {} ok; {lost} failed that never reached llm-claude, {reached} cut off inside it; served by: {}",
        outcomes.len() as u32 - lost - reached,
        by.join(", ")
    );
    match first_openai {
        Some(d) => say!(
            "   traffic moved to llm-openai {:.0} ms after the kill (+claude preferred, openai the next rank)",
            d.as_secs_f64() * 1000.0
        ),
        None => say!("   traffic never reached llm-openai"),
    }

    step(
        6,
        "A few metrics from the planner's sidecar (its admin port, /metrics)",
    )?;
    let (_, metrics) = http_get(planner.admin, "/metrics").await?;
    for l in metrics.lines().filter(|l| {
        !l.starts_with('#')
            && (l.starts_with("capmesh_proxy_requests_total")
                || l.starts_with("capmesh_proxy_retries_total")
                || l.starts_with("capmesh_proxy_failovers_total")
                || l.starts_with("capmesh_proxy_endpoints{")
                || l.starts_with("capmesh_proxy_endpoint_ejections_total"))
    }) {
        say!("   {l}");
    }
    step(
        7,
        &format!(
            "The trip's trace: each hop the planner's calls took (capmesh trace {})",
            plan.trace_id
        ),
    )?;
    for text in crate::trace::render(&trip).lines() {
        say!("   {text}");
    }
    if lost > 0 {
        bail!("{lost} calls that never reached the killed provider failed during the failover");
    }
    if args.keep {
        let local = LocalMesh {
            control_plane: control_plane.clone(),
            control_plane_ca: ca.clone(),
            admin_token_file: token_file.clone(),
            data_dir: data.to_path_buf(),
            pid: std::process::id(),
            started_by: "capmesh demo --keep".into(),
        };
        let recorded = local_mesh::record(&local);
        say!("\nThe mesh keeps running. Control plane: {control_plane} (Ctrl-C to stop).");
        match &recorded {
            Some(_) => say!(
                "Try, from any directory: capmesh list; capmesh call get_weather --args '{{\"city\":\"Porto\"}}'"
            ),
            None => say!("Try: capmesh {} list", local_mesh::flags(&local)),
        }
        say!(
            "Or plan through the planner's sidecar: capmesh agent planner --mesh {mesh_url} --city Porto"
        );
        let _ = tokio::signal::ctrl_c().await;
        drop(recorded);
    }
    Ok(())
}

/// The trip's trace once `spans` spans arrived (or what arrived within 10 s).
async fn trip_trace(
    rest: &ControlPlaneClient,
    token: &str,
    trace_id: &str,
    spans: usize,
) -> anyhow::Result<capmesh_api::Trace> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let path = format!("/v1/traces/{trace_id}");
    loop {
        let got: Result<capmesh_api::Trace, _> = rest.get(&path, Some(token)).await;
        match got {
            Ok(t) if t.spans.len() >= spans || Instant::now() >= deadline => return Ok(t),
            Err(e) if Instant::now() >= deadline => {
                return Err(anyhow::anyhow!(
                    "the trip's trace {trace_id} did not reach the control plane within 10 s: {e}"
                ));
            }
            _ => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
}

/// `llm-openai` from `spiffe://capmesh.local/ns/default/agent/llm-openai#instance`.
fn agent_of(served_by: &str) -> String {
    served_by
        .split('/')
        .next_back()
        .unwrap_or(served_by)
        .split('#')
        .next()
        .unwrap_or("")
        .to_owned()
}

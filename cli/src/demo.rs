//! `capmesh demo`: a small trip planner on a real local mesh.
//!
//! Every box is its own process — this binary run as `capmesh control-plane`, `capmesh proxy`
//! and `capmesh agent` — so killing the preferred LLM provider is a real crash, and the
//! failover shown is what production would see.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use capmesh_api::rest::{AgentInfo, TokenCreated, TokenRequest};
use capmesh_client::{ControlPlaneClient, ServerCheck};
use serde_json::{Value, json};

use crate::supervise::{Output, Supervisor, free_port, http_get, wait_port, wait_ready};

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

struct Ports {
    agent: u16,
    outbound: u16,
    inbound: u16,
    admin: u16,
}

fn ports() -> anyhow::Result<Ports> {
    Ok(Ports {
        agent: free_port()?,
        outbound: free_port()?,
        inbound: free_port()?,
        admin: free_port()?,
    })
}

fn step(n: u32, text: &str) {
    println!("\n\x1b[1m{n}. {text}\x1b[0m");
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
    let bytes = resp.into_body().collect().await?.to_bytes();
    let rpc = capmesh_proxy::mcp::sse::find_response(
        &bytes,
        &ct,
        &capmesh_proxy::mcp::jsonrpc::Id::from(1),
    )
    .map_err(|e| anyhow::anyhow!("{e:?}"))?
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
    let result = demo(&args, &exe, &data, output, &mut sup).await;
    println!("\n\x1b[1mStopping the mesh\x1b[0m (SIGTERM: sidecars withdraw, then drain)…");
    sup.stop_all(Duration::from_secs(15)).await;
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
    println!("Stopped. Temporary files removed.");
    result
}

async fn demo(
    args: &DemoArgs,
    exe: &std::path::Path,
    data: &std::path::Path,
    output: Output,
    sup: &mut Supervisor,
) -> anyhow::Result<()> {
    println!(
        "\x1b[1mcapmesh demo\x1b[0m — a trip planner on a local service mesh. Every agent below is its own"
    );
    println!(
        "process with its own sidecar; agent ↔ agent traffic is mutual TLS with SPIFFE identities."
    );

    step(1, "Control plane");
    let (api, admin) = (free_port()?, free_port()?);
    sup.spawn(
        "control-plane",
        exe,
        &[
            s(&["control-plane", "--data-dir"]),
            vec![data.display().to_string()],
            s(&[
                "--listen",
                &format!("127.0.0.1:{api}"),
                "--admin-listen",
                &format!("127.0.0.1:{admin}"),
                "--grace",
                "2s",
            ]),
        ]
        .concat(),
        &[],
        output.clone(),
    )?;
    wait_ready(
        sup,
        "the control plane",
        admin,
        "/ready",
        Duration::from_secs(20),
    )
    .await?;
    let ca: PathBuf = data.join("ca.pem");
    let token = std::fs::read_to_string(data.join("admin-token"))?
        .trim()
        .to_owned();
    let rest = ControlPlaneClient::new(
        format!("https://localhost:{api}").parse::<capmesh_client::ControlPlaneUrl>()?,
        ServerCheck::Hostname {
            ca_pem: std::fs::read_to_string(&ca)?,
        },
        None,
        None,
    )?;
    println!("   https://127.0.0.1:{api}  (CA and admin token in a temporary data dir)");

    step(2, "Agents, each behind its own capmesh-proxy sidecar");
    let control_plane = format!("https://127.0.0.1:{api}");
    let sidecar = |sup: &mut Supervisor,
                   name: &str,
                   agent_url: &str,
                   extra: &[&str],
                   p: &Ports,
                   bootstrap: String| {
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
            &format!("127.0.0.1:{}", p.outbound),
            "--inbound",
            &format!("127.0.0.1:{}", p.inbound),
        ]));
        argv.extend(s(&["--admin", &format!("127.0.0.1:{}", p.admin)]));
        argv.extend(s(extra));
        sup.spawn(
            &format!("{name}-proxy"),
            exe,
            &argv,
            &[("CAPMESH_BOOTSTRAP_TOKEN".into(), bootstrap)],
            output.clone(),
        )
    };
    let mut member_ports = Vec::new();
    for m in MEMBERS {
        let p = ports()?;
        let mut argv = s(&[
            "agent",
            m.kind,
            "--port",
            &p.agent.to_string(),
            "--name",
            m.name,
        ]);
        argv.extend(s(m.extra_agent));
        sup.spawn(m.name, exe, &argv, &[], output.clone())?;
        wait_port(sup, m.name, p.agent, Duration::from_secs(20)).await?;
        let created: TokenCreated = rest
            .post(
                "/v1/tokens",
                &TokenRequest {
                    namespace: "default".parse()?,
                    agent_pattern: m.name.into(),
                    ttl_secs: 600,
                    description: Some("demo".into()),
                },
                Some(&token),
            )
            .await?;
        sidecar(
            sup,
            m.name,
            &format!("http://127.0.0.1:{}/mcp", p.agent),
            m.sidecar,
            &p,
            created.token,
        )?;
        println!("   {:<12} {}", m.name, m.what);
        member_ports.push(p);
    }
    let planner = ports()?;
    let created: TokenCreated = rest
        .post(
            "/v1/tokens",
            &TokenRequest {
                namespace: "default".parse()?,
                agent_pattern: "planner".into(),
                ttl_secs: 600,
                description: Some("demo".into()),
            },
            Some(&token),
        )
        .await?;
    let planner_deps = [
        "--dependency",
        "get_weather",
        "--dependency",
        "search_flights",
        "--dependency",
        "chat=llm:+claude",
    ];
    sidecar(
        sup,
        "planner",
        "none",
        &planner_deps,
        &planner,
        created.token,
    )?;
    println!(
        "   {:<12} the planner's sidecar: depends on get_weather, search_flights and chat=llm:+claude",
        "planner"
    );
    for (m, p) in MEMBERS.iter().zip(&member_ports) {
        wait_ready(
            sup,
            &format!("{}'s sidecar", m.name),
            p.admin,
            "/ready",
            Duration::from_secs(30),
        )
        .await?;
    }
    wait_ready(
        sup,
        "the planner's sidecar",
        planner.admin,
        "/ready",
        Duration::from_secs(30),
    )
    .await?;

    step(3, "The mesh, as the control plane sees it");
    let agents: Vec<AgentInfo> = rest.get("/v1/agents", Some(&token)).await?;
    println!(
        "   {:<12} {:<50} {:<16} TAGS",
        "AGENT", "mTLS IDENTITY", "CAPABILITIES"
    );
    for a in &agents {
        let inst = a.instances.first();
        let caps: Vec<String> = inst
            .map(|i| i.tools.iter().map(|t| t.capability.to_string()).collect())
            .unwrap_or_default();
        let tags: Vec<String> = inst
            .map(|i| i.tags.iter().map(|t| t.to_string()).collect())
            .unwrap_or_default();
        println!(
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
    );
    let mesh_url = format!("http://127.0.0.1:{}/mcp", planner.outbound);
    let plan = capmesh_examples::plan_trip(&mesh_url, "Lisbon")
        .await
        .context("the planner failed")?;
    for line in plan.to_string().lines() {
        println!("   {line}");
    }
    println!("   Who served each call (x-capmesh-served-by, the provider's verified identity):");
    for (tool, arguments) in [
        ("get_weather", json!({ "city": "Lisbon" })),
        (
            "search_flights",
            json!({ "origin": "Berlin", "destination": "Lisbon", "date": "2026-12-01" }),
        ),
        ("chat", json!({ "prompt": "Plan three days in Lisbon" })),
    ] {
        let (_, served) = mcp_call(planner.outbound, tool, arguments).await?;
        println!("   {tool:<15} → {served}");
    }

    step(
        5,
        "Failover: kill -9 the preferred LLM provider (llm-claude, agent and sidecar) mid-traffic",
    );
    let kill_after = Duration::from_millis(600);
    let started = Instant::now();
    let mut killed_at = None;
    let (mut ok, mut failed) = (0u32, 0u32);
    let mut first_openai: Option<Duration> = None;
    let mut served_counts: std::collections::BTreeMap<String, u32> = Default::default();
    while started.elapsed() < Duration::from_millis(2600) {
        if killed_at.is_none() && started.elapsed() >= kill_after {
            sup.kill("llm-claude-proxy").await?;
            sup.kill("llm-claude").await?;
            killed_at = Some(started.elapsed());
            println!(
                "   ✝ llm-claude killed at {:>5.0} ms",
                started.elapsed().as_secs_f64() * 1000.0
            );
        }
        match mcp_call(
            planner.outbound,
            "chat",
            json!({ "prompt": "Where to eat in Lisbon?" }),
        )
        .await
        {
            Ok((_, served)) => {
                ok += 1;
                let who = served
                    .split('/')
                    .next_back()
                    .unwrap_or(&served)
                    .split('#')
                    .next()
                    .unwrap_or("")
                    .to_owned();
                if let Some(k) = killed_at
                    && who == "llm-openai"
                    && first_openai.is_none()
                {
                    first_openai = Some(started.elapsed().saturating_sub(k));
                }
                *served_counts.entry(who).or_default() += 1;
            }
            Err(e) => {
                failed += 1;
                println!("   ✗ {e:#}");
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    println!("   calls: {ok} ok, {failed} failed; served by: {served_counts:?}");
    match first_openai {
        Some(d) => println!(
            "   traffic moved to llm-openai {:.0} ms after the kill (+claude preferred, openai the next rank)",
            d.as_secs_f64() * 1000.0
        ),
        None => println!("   traffic never reached llm-openai"),
    }

    step(
        6,
        "A few metrics from the planner's sidecar (its admin port, /metrics)",
    );
    let (_, metrics) = http_get(planner.admin, "/metrics").await?;
    for line in metrics.lines().filter(|l| {
        !l.starts_with('#')
            && (l.starts_with("capmesh_proxy_requests_total")
                || l.starts_with("capmesh_proxy_retries_total")
                || l.starts_with("capmesh_proxy_failovers_total")
                || l.starts_with("capmesh_proxy_endpoints{")
                || l.starts_with("capmesh_proxy_endpoint_ejections_total"))
    }) {
        println!("   {line}");
    }
    if failed > 0 {
        bail!("{failed} calls failed during the failover");
    }
    if args.keep {
        println!(
            "\nThe mesh keeps running. Control plane: https://127.0.0.1:{api} (Ctrl-C to stop)."
        );
        println!(
            "Try: capmesh --control-plane https://localhost:{api} --control-plane-ca {} --admin-token-file {} list",
            ca.display(),
            data.join("admin-token").display()
        );
        let _ = tokio::signal::ctrl_c().await;
    }
    Ok(())
}

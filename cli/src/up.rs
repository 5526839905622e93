//! `capmesh up -f mesh.yaml`: a local mesh described in a file, like `docker compose up`.
//!
//! The file names the agents as commands with their sidecar settings; `up` starts a control
//! plane (or uses a running one), every agent and its sidecar, prefixes each process's output
//! with its name, and stops everything cleanly on Ctrl-C or when any process dies.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use capmesh_api::rest::{TokenCreated, TokenRequest};
use capmesh_api::{AgentName, Namespace};
use capmesh_client::{ControlPlaneClient, ServerCheck};
use serde::Deserialize;

use crate::supervise::{Output, Supervisor, free_port, wait_port, wait_ready};

/// Flags of `capmesh up`.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Examples:\n  capmesh up -f examples/mesh/demo.yaml\n  capmesh up -f examples/mesh/python.yaml"
)]
pub struct UpArgs {
    /// The mesh description (YAML).
    #[arg(short = 'f', long = "file", default_value = "mesh.yaml")]
    pub file: PathBuf,
}

/// The file's top level.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshFile {
    /// The control plane to start (default: one with its data in `./capmesh-data`).
    #[serde(default)]
    pub control_plane: ControlPlaneSpec,
    /// The agents, each with its sidecar.
    pub agents: Vec<AgentSpec>,
}

/// How to run the control plane.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlPlaneSpec {
    /// API address (default 127.0.0.1:8000).
    pub listen: Option<String>,
    /// Admin address (default 127.0.0.1:9090).
    pub admin_listen: Option<String>,
    /// Data dir (default ./capmesh-data, relative to the file).
    pub data_dir: Option<PathBuf>,
    /// More `capmesh-control-plane` flags.
    #[serde(default)]
    pub args: Vec<String>,
}

/// One agent and its sidecar.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSpec {
    /// The agent's name (a DNS label): its identity and its sidecar's `--agent-name`.
    pub name: AgentName,
    /// Namespace (default `default`).
    pub namespace: Option<Namespace>,
    /// The agent's command line; empty for a consumer run by hand (a notebook) that only needs
    /// its sidecar. A first word `capmesh` means this binary.
    #[serde(default)]
    pub command: Vec<String>,
    /// Environment for the command.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The agent's MCP endpoint (`http://127.0.0.1:PORT/mcp`), or `none` for a consumer.
    #[serde(default = "none")]
    pub url: String,
    /// More `capmesh-proxy` flags (`--tags`, `--dependency`, `--capability`, ...).
    #[serde(default)]
    pub sidecar: Vec<String>,
    /// Sidecar outbound address (default: a free loopback port, printed at start).
    pub outbound: Option<String>,
    /// Sidecar inbound address (default: a free loopback port).
    pub inbound: Option<String>,
    /// Sidecar admin address (default: a free loopback port).
    pub admin: Option<String>,
}

impl AgentSpec {
    fn namespace(&self) -> &str {
        self.namespace.as_ref().map_or("default", Namespace::as_str)
    }
}

fn none() -> String {
    "none".into()
}

/// Reads and checks a mesh file; errors name the file, the line and the problem.
pub fn load(path: &Path) -> anyhow::Result<MeshFile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read it", path.display()))?;
    let mesh: MeshFile =
        serde_yaml_ng::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut seen = std::collections::BTreeSet::new();
    for (i, a) in mesh.agents.iter().enumerate() {
        let at = format!("{}: agents[{i}] ({})", path.display(), a.name);
        if !seen.insert((a.namespace().to_owned(), a.name.to_string())) {
            bail!("{at}: the name is used twice; each agent needs its own name");
        }
        if !a.command.is_empty() && a.url == "none" {
            bail!(
                "{at}: a command is given but no url: add `url: http://127.0.0.1:PORT/mcp` (the agent's MCP endpoint)"
            );
        }
        if a.url != "none" && !a.url.starts_with("http://") {
            bail!(
                "{at}: url {:?} must be http://host:port/path (or none)",
                a.url
            );
        }
    }
    if mesh.agents.is_empty() {
        bail!("{}: no agents: add a list under `agents:`", path.display());
    }
    Ok(mesh)
}

fn port_of(url: &str) -> Option<u16> {
    let authority = url.strip_prefix("http://")?.split('/').next()?;
    authority.rsplit_once(':')?.1.parse().ok()
}

fn addr_or_free(given: &Option<String>) -> anyhow::Result<String> {
    Ok(match given {
        Some(a) => a.clone(),
        None => format!("127.0.0.1:{}", free_port()?),
    })
}

/// Runs the mesh described in the file until Ctrl-C (or until a process dies).
pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let mesh = load(&args.file)?;
    let base = args
        .file
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let exe = std::env::current_exe().context("cannot find the capmesh binary")?;
    let mut sup = Supervisor::default();
    let result = tokio::select! {
        r = up(&mesh, &base, &exe, &mut sup) => r,
        _ = tokio::signal::ctrl_c() => Ok(()),
    };
    println!("\nstopping: sidecars withdraw from the mesh, agents and the control plane stop…");
    sup.stop_all(Duration::from_secs(15)).await;
    println!("stopped");
    result
}

async fn up(mesh: &MeshFile, base: &Path, exe: &Path, sup: &mut Supervisor) -> anyhow::Result<()> {
    let cp = &mesh.control_plane;
    let listen = cp.listen.clone().unwrap_or_else(|| "127.0.0.1:8000".into());
    let admin_listen = cp
        .admin_listen
        .clone()
        .unwrap_or_else(|| "127.0.0.1:9090".into());
    let data = base.join(
        cp.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("capmesh-data")),
    );
    let admin_port: u16 = admin_listen
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .context("control_plane.admin_listen needs a port")?;
    let api_port: u16 = listen
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .context("control_plane.listen needs a port")?;
    let mut argv: Vec<String> = vec![
        "control-plane".into(),
        "--data-dir".into(),
        data.display().to_string(),
    ];
    argv.extend([
        "--listen".into(),
        listen.clone(),
        "--admin-listen".into(),
        admin_listen.clone(),
    ]);
    argv.extend(cp.args.iter().cloned());
    sup.spawn("control-plane", exe, &argv, &[], Output::Prefixed)?;
    wait_ready(
        sup,
        "the control plane",
        admin_port,
        "/ready",
        Duration::from_secs(30),
    )
    .await?;
    let ca = data.join("ca.pem");
    let token = std::fs::read_to_string(data.join("admin-token"))?
        .trim()
        .to_owned();
    let rest = ControlPlaneClient::new(
        format!("https://localhost:{api_port}").parse::<capmesh_client::ControlPlaneUrl>()?,
        ServerCheck::Hostname {
            ca_pem: std::fs::read_to_string(&ca)?,
        },
        None,
        None,
    )?;

    let mut summary = Vec::new();
    for a in &mesh.agents {
        if !a.command.is_empty() {
            let (program, rest_args) = a.command.split_first().context("empty command")?;
            let program: PathBuf = if program == "capmesh" {
                exe.to_path_buf()
            } else {
                PathBuf::from(program)
            };
            let env: Vec<(String, String)> =
                a.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            sup.spawn(a.name.as_str(), &program, rest_args, &env, Output::Prefixed)?;
            if let Some(port) = port_of(&a.url) {
                wait_port(sup, a.name.as_str(), port, Duration::from_secs(60)).await?;
            }
        }
        let created: TokenCreated = rest
            .post(
                "/v1/tokens",
                &TokenRequest {
                    namespace: a.namespace().parse()?,
                    agent_pattern: a.name.to_string(),
                    ttl_secs: 3600,
                    description: Some("capmesh up".into()),
                },
                Some(&token),
            )
            .await?;
        let (outbound, inbound, admin) = (
            addr_or_free(&a.outbound)?,
            addr_or_free(&a.inbound)?,
            addr_or_free(&a.admin)?,
        );
        let mut argv: Vec<String> = [
            "proxy",
            "--agent-name",
            a.name.as_str(),
            "--namespace",
            a.namespace(),
            "--agent-url",
            &a.url,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        argv.extend([
            "--control-plane".into(),
            format!("https://127.0.0.1:{api_port}"),
            "--control-plane-ca".into(),
            ca.display().to_string(),
        ]);
        argv.extend([
            "--outbound".into(),
            outbound.clone(),
            "--inbound".into(),
            inbound,
            "--admin".into(),
            admin.clone(),
        ]);
        argv.extend(a.sidecar.iter().cloned());
        sup.spawn(
            &format!("{}-proxy", a.name),
            exe,
            &argv,
            &[("CAPMESH_BOOTSTRAP_TOKEN".into(), created.token)],
            Output::Prefixed,
        )?;
        summary.push((a.name.to_string(), outbound, admin));
    }
    for (name, _, admin) in &summary {
        let port: u16 = admin
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .context("admin address needs a port")?;
        wait_ready(
            sup,
            &format!("{name}'s sidecar"),
            port,
            "/ready",
            Duration::from_secs(60),
        )
        .await?;
    }
    println!("\nmesh is up (Ctrl-C to stop). Each agent calls the mesh at its sidecar:");
    for (name, outbound, admin) in &summary {
        println!("  {name:<16} http://{outbound}/mcp   admin http://{admin}/metrics");
    }
    println!(
        "control plane: https://{listen} (CA {}, admin token {})",
        ca.display(),
        data.join("admin-token").display()
    );
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        sup.check_alive()?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> anyhow::Result<MeshFile> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("mesh.yaml");
        std::fs::write(&path, text)?;
        load(&path)
    }

    #[test]
    fn bad_files_name_the_line_and_the_problem() {
        let err = parse("agents:\n  - name: ok\n  - name: Bad_Name\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 3") && err.contains("agent name \"Bad_Name\""),
            "{err}"
        );
        let err = parse("agents:\n  - name: a\n    comand: [x]\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unknown field `comand`") && err.contains("line 3"),
            "{err}"
        );
        let err = parse("agents:\n  - name: a\n    command: [python3, a.py]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("no url"), "{err}");
        let err = parse("agents:\n  - name: a\n  - name: a\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("used twice"), "{err}");
        let err = parse("agents: []\n").unwrap_err().to_string();
        assert!(err.contains("no agents"), "{err}");
        let ok =
            parse("agents:\n  - name: planner\n    sidecar: [--dependency, weather]\n").unwrap();
        assert_eq!(ok.agents[0].url, "none");
    }

    #[test]
    fn the_shipped_example_files_load() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/mesh");
        for file in ["demo.yaml", "python.yaml"] {
            let mesh = load(&root.join(file)).unwrap_or_else(|e| panic!("{file}: {e:#}"));
            assert!(mesh.agents.len() >= 3, "{file}");
        }
    }
}

//! `capmesh up -f mesh.yaml`: a local mesh described in a file, like `docker compose up`.
//!
//! The file names the agents as commands with their sidecar settings; `up` starts a control
//! plane, every agent and its sidecar, prefixes each process's output with its name, and stops
//! everything cleanly on Ctrl-C or when any process dies. A process that exits while the mesh
//! starts stops the start with that process's own last lines and the field of the file to change.
//!
//! Every process binds the addresses the file gives, or port 0 (a port the system picks) where
//! it gives none, and reports what it bound (`--ports-file`, `READY <port>`), so nothing is
//! guessed. The running mesh is recorded for the CLI ([`crate::local_mesh`]): `capmesh list`
//! and the other commands find it from any directory.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use capmesh_api::rest::{TokenCreated, TokenRequest};
use capmesh_api::{AgentName, Namespace};
use capmesh_client::{ControlPlaneClient, ServerCheck};
use serde::Deserialize;

use crate::local_mesh::{self, LocalMesh};
use crate::output;
use crate::supervise::{ChildExited, Output, Supervisor, port, wait_port, wait_ports, wait_ready};

/// Flags of `capmesh up`.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Examples:\n  \
    capmesh up -f examples/mesh/demo.yaml\n  \
    capmesh up -f examples/mesh/python.yaml\n\n\
    Commands run in the current directory. The control plane keeps its data in\n\
    control_plane.data_dir (default: capmesh-data next to the file); a relative data_dir is\n\
    relative to the file and must stay inside the file's directory. While the mesh runs, `capmesh list`, `status`, `call`, ...\n\
    find its control plane from any directory.")]
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
    /// API address (default 127.0.0.1:8000, where the CLI looks by default; port 0 picks one).
    pub listen: Option<String>,
    /// Admin address (default 127.0.0.1:0: a port the system picks).
    pub admin_listen: Option<String>,
    /// Data dir (default `capmesh-data` next to the file). A relative path is relative to the
    /// file and must stay inside the file's directory; an absolute path is taken as given.
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
    /// The agent's MCP endpoint (`http://127.0.0.1:PORT/mcp`), or `none` for a consumer. Port 0:
    /// the command is started with a port of its choosing and prints `READY <port>` on stdout
    /// (the example agents do), which then replaces the 0.
    #[serde(default = "none")]
    pub url: String,
    /// More `capmesh-proxy` flags (`--tags`, `--dependency`, `--capability`, ...).
    #[serde(default)]
    pub sidecar: Vec<String>,
    /// Sidecar outbound address (default 127.0.0.1:0: a port the system picks, printed at start).
    pub outbound: Option<String>,
    /// Sidecar inbound address (default 127.0.0.1:0).
    pub inbound: Option<String>,
    /// Sidecar admin address (default 127.0.0.1:0).
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

/// `url` with its port replaced.
fn with_port(url: &str, port: u16) -> String {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    format!("http://{host}:{port}/{path}")
}

/// `path` with `.` and `..` resolved without touching the file system.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// The control plane's data dir for `file`: `capmesh-data` next to it by default; a relative
/// `data_dir` is relative to the file and may not leave the file's directory (a file copied
/// elsewhere must not write to `/capmesh-data` by surprise); an absolute one is used as given.
pub fn data_dir(file: &Path, given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let file = std::path::absolute(file)
        .with_context(|| format!("{}: cannot resolve the path", file.display()))?;
    let base = file.parent().map(Path::to_path_buf).unwrap_or_default();
    let Some(given) = given else {
        return Ok(base.join("capmesh-data"));
    };
    if given.is_absolute() {
        return Ok(given.to_path_buf());
    }
    let resolved = normalize(&base.join(given));
    if !resolved.starts_with(&base) {
        bail!(
            "{}: control_plane.data_dir {:?} resolves to {}, outside the directory of the file ({}): \
             use a path inside it (such as capmesh-data, the default) or an absolute path",
            file.display(),
            given.display().to_string(),
            resolved.display(),
            base.display()
        );
    }
    Ok(resolved)
}

/// Runs the mesh described in the file until Ctrl-C, until a process dies, or until stdout
/// closes (`capmesh up | head`).
pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let mesh = load(&args.file)?;
    let data = data_dir(&args.file, mesh.control_plane.data_dir.as_deref())?;
    let exe = std::env::current_exe().context("cannot find the capmesh binary")?;
    let run_dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let mut sup = Supervisor::default();
    let mut recorded = None;
    let started = Started {
        file: &args.file,
        data: &data,
        exe: &exe,
        run_dir: run_dir.path(),
    };
    let result = tokio::select! {
        r = up(&mesh, &started, &mut sup, &mut recorded) => r,
        _ = tokio::signal::ctrl_c() => Ok(()),
    };
    output::line("\nstopping: sidecars withdraw from the mesh, agents and the control plane stop…");
    sup.stop_all(Duration::from_secs(15)).await;
    drop(recorded);
    output::line("stopped");
    result
}

/// Where `up` runs from.
struct Started<'a> {
    file: &'a Path,
    data: &'a Path,
    exe: &'a Path,
    run_dir: &'a Path,
}

impl Started<'_> {
    /// A child's early exit as the user's error: its last lines and the field to change.
    fn explain(&self, mesh: &MeshFile, e: ChildExited) -> anyhow::Error {
        let said = e.tail.join("\n");
        let field = if e.name == "control-plane" {
            if said.contains("--admin-listen") {
                "control_plane.admin_listen".to_owned()
            } else if said.contains("--listen") {
                "control_plane.listen".to_owned()
            } else if said.contains("--data-dir") || said.contains("data dir") {
                "control_plane.data_dir".to_owned()
            } else {
                "control_plane.args".to_owned()
            }
        } else {
            let (i, sidecar) = mesh
                .agents
                .iter()
                .enumerate()
                .find_map(|(i, a)| {
                    if e.name == a.name.as_str() {
                        Some((i, false))
                    } else if e.name == format!("{}-proxy", a.name) {
                        Some((i, true))
                    } else {
                        None
                    }
                })
                .unwrap_or((0, false));
            if !sidecar {
                format!("agents[{i}].command (or its env and url)")
            } else if said.contains("--outbound") {
                format!("agents[{i}].outbound")
            } else if said.contains("--inbound") {
                format!("agents[{i}].inbound")
            } else if said.contains("--admin") {
                format!("agents[{i}].admin")
            } else {
                format!("agents[{i}].sidecar (or its url)")
            }
        };
        anyhow::anyhow!(
            "{e}\nthe mesh did not start: {} stopped it; change {field} in {}",
            e.name,
            self.file.display()
        )
    }
}

fn listen_port(addr: &str, field: &str, file: &Path) -> anyhow::Result<()> {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .map(|_| ())
        .with_context(|| {
            format!(
                "{}: {field} {addr:?} needs a host:port, such as 127.0.0.1:8000",
                file.display()
            )
        })
}

async fn up(
    mesh: &MeshFile,
    at: &Started<'_>,
    sup: &mut Supervisor,
    recorded: &mut Option<local_mesh::Recorded>,
) -> anyhow::Result<()> {
    let cp = &mesh.control_plane;
    let listen = cp.listen.clone().unwrap_or_else(|| "127.0.0.1:8000".into());
    let admin_listen = cp
        .admin_listen
        .clone()
        .unwrap_or_else(|| "127.0.0.1:0".into());
    listen_port(&listen, "control_plane.listen", at.file)?;
    listen_port(&admin_listen, "control_plane.admin_listen", at.file)?;
    let ports_file = at.run_dir.join("control-plane.ports.json");
    let mut argv: Vec<String> = vec![
        "control-plane".into(),
        "--data-dir".into(),
        at.data.display().to_string(),
        "--listen".into(),
        listen.clone(),
        "--admin-listen".into(),
        admin_listen,
        "--ports-file".into(),
        ports_file.display().to_string(),
    ];
    argv.extend(cp.args.iter().cloned());
    sup.spawn("control-plane", at.exe, &argv, &[], Output::Prefixed)?;
    let started = async {
        let ports = wait_ports(
            sup,
            "the control plane",
            &ports_file,
            Duration::from_secs(30),
        )
        .await?;
        let admin_port = port(&ports, "admin")?;
        wait_ready(
            sup,
            "the control plane",
            admin_port,
            "/ready",
            Duration::from_secs(30),
        )
        .await?;
        port(&ports, "listen")
    };
    let api_port = match started.await {
        Ok(p) => p,
        Err(e) => return Err(explain_any(at, mesh, e)),
    };
    let ca = at.data.join("ca.pem");
    let token_file = at.data.join("admin-token");
    let token = std::fs::read_to_string(&token_file)
        .with_context(|| format!("cannot read the control plane's {}", token_file.display()))?
        .trim()
        .to_owned();
    let control_plane = format!("https://127.0.0.1:{api_port}");
    let rest = ControlPlaneClient::new(
        control_plane.parse::<capmesh_client::ControlPlaneUrl>()?,
        ServerCheck::Hostname {
            ca_pem: std::fs::read_to_string(&ca)
                .with_context(|| format!("cannot read the control plane's {}", ca.display()))?,
        },
        None,
        None,
    )?;
    let local = LocalMesh {
        control_plane: control_plane.clone(),
        control_plane_ca: ca.clone(),
        admin_token_file: token_file.clone(),
        data_dir: at.data.to_path_buf(),
        pid: std::process::id(),
        started_by: format!("capmesh up -f {}", at.file.display()),
    };
    *recorded = local_mesh::record(&local);

    let mut summary = Vec::new();
    for a in &mesh.agents {
        let mut url = a.url.clone();
        if !a.command.is_empty() {
            let (program, rest_args) = a.command.split_first().context("empty command")?;
            let program: PathBuf = if program == "capmesh" {
                at.exe.to_path_buf()
            } else {
                PathBuf::from(program)
            };
            let env: Vec<(String, String)> =
                a.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            sup.spawn(a.name.as_str(), &program, rest_args, &env, Output::Prefixed)?;
            let waited = match port_of(&a.url) {
                Some(0) => sup
                    .ready_port(a.name.as_str(), Duration::from_secs(60))
                    .await
                    .map(|p| url = with_port(&a.url, p)),
                Some(p) => wait_port(sup, a.name.as_str(), p, Duration::from_secs(60)).await,
                None => Ok(()),
            };
            waited.map_err(|e| explain_any(at, mesh, e))?;
        }
        let created: TokenCreated = rest
            .post(
                "/v1/tokens",
                &TokenRequest {
                    namespace: a.namespace().parse()?,
                    agent_pattern: a.name.to_string(),
                    ttl_secs: 3600,
                    uses: None,
                    system: false,
                    description: Some("capmesh up".into()),
                },
                Some(&token),
            )
            .await?;
        let or_any = |given: &Option<String>| given.clone().unwrap_or_else(|| "127.0.0.1:0".into());
        let ports_file = at.run_dir.join(format!("{}.ports.json", a.name));
        let mut argv: Vec<String> = [
            "proxy",
            "--agent-name",
            a.name.as_str(),
            "--namespace",
            a.namespace(),
            "--agent-url",
            &url,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        argv.extend([
            "--control-plane".into(),
            control_plane.clone(),
            "--control-plane-ca".into(),
            ca.display().to_string(),
            "--outbound".into(),
            or_any(&a.outbound),
            "--inbound".into(),
            or_any(&a.inbound),
            "--admin".into(),
            or_any(&a.admin),
            "--ports-file".into(),
            ports_file.display().to_string(),
        ]);
        argv.extend(a.sidecar.iter().cloned());
        sup.spawn(
            &format!("{}-proxy", a.name),
            at.exe,
            &argv,
            &[("CAPMESH_BOOTSTRAP_TOKEN".into(), created.token)],
            Output::Prefixed,
        )?;
        summary.push((a.name.to_string(), ports_file));
    }
    let mut shown = Vec::new();
    for (name, ports_file) in &summary {
        let what = format!("{name}'s sidecar");
        let ready = async {
            let ports = wait_ports(sup, &what, ports_file, Duration::from_secs(30)).await?;
            let admin = port(&ports, "admin")?;
            wait_ready(sup, &what, admin, "/ready", Duration::from_secs(60)).await?;
            Ok::<_, anyhow::Error>((port(&ports, "outbound")?, admin))
        };
        let (outbound, admin) = ready.await.map_err(|e| explain_any(at, mesh, e))?;
        shown.push((name, outbound, admin));
    }
    output::line("\nmesh is up (Ctrl-C to stop). Each agent calls the mesh at its sidecar:");
    for (name, outbound, admin) in &shown {
        output::line(&format!(
            "  {name:<16} http://127.0.0.1:{outbound}/mcp   admin http://127.0.0.1:{admin}/ready"
        ));
    }
    output::line(&format!(
        "control plane: {control_plane} (data in {})",
        at.data.display()
    ));
    match recorded {
        Some(_) => output::line(
            "capmesh list, status, call, ... find this mesh from any directory while it runs",
        ),
        None => output::line(&format!(
            "reach it from anywhere with: capmesh {} list",
            local_mesh::flags(&local)
        )),
    }
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if output::stdout_closed() {
            return Ok(());
        }
        if let Err(e) = sup.check_alive().await {
            bail!("{e}\nthe mesh stopped because {} exited", e.name);
        }
    }
}

/// A start-up error, with a child's exit explained when that is what it was.
fn explain_any(at: &Started<'_>, mesh: &MeshFile, e: anyhow::Error) -> anyhow::Error {
    match e.downcast::<ChildExited>() {
        Ok(exited) => at.explain(mesh, exited),
        Err(other) => other,
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
    fn data_dirs_stay_beside_the_file_unless_absolute() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("mesh.yaml");
        assert_eq!(
            data_dir(&file, None).unwrap(),
            dir.path().join("capmesh-data")
        );
        assert_eq!(
            data_dir(&file, Some(Path::new("./state/../data"))).unwrap(),
            dir.path().join("data")
        );
        assert_eq!(
            data_dir(&file, Some(Path::new("/var/lib/capmesh"))).unwrap(),
            PathBuf::from("/var/lib/capmesh")
        );
        // `../../capmesh-data` from a file in the home directory would be /capmesh-data.
        let err = data_dir(&file, Some(Path::new("../../capmesh-data")))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("control_plane.data_dir")
                && err.contains("outside the directory of the file"),
            "{err}"
        );
    }

    #[test]
    fn a_port_0_url_takes_the_reported_port() {
        assert_eq!(port_of("http://127.0.0.1:0/mcp"), Some(0));
        assert_eq!(
            with_port("http://127.0.0.1:0/mcp", 41234),
            "http://127.0.0.1:41234/mcp"
        );
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

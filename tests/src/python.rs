//! Real MCP peers for end-to-end tests: agents (servers) and clients written with the official
//! Python SDK (`mcp` 2.3.0 from PyPI, see `tests/python/`). Nothing is mocked: the agents are
//! what a user would write, and the client is the SDK's own `mcp.Client` in either protocol
//! generation (`"legacy"` = 2025 sessions, `"2026-07-28"` = stateless).
//!
//! - [`venv`]: creates `target/py-venv` once (runs `tests/python/setup-venv.sh`, safe across
//!   concurrent test processes) and returns its `python`.
//! - [`PyAgent`]: `tests/python/agent.py` on a loopback port, killed on drop.
//! - [`client`] / [`client_output`] / [`client_json`] / [`spawn_client`]: `tests/python/client.py`.
//!
//! The environment variable `CAPMESH_PY_VENV` overrides the venv directory.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How long `PyAgent::start` waits for the agent's `READY <port>` line.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`client`] lets one `client.py` run.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
/// A venv lock file older than this is considered left behind by a killed process.
const STALE_LOCK: Duration = Duration::from_secs(15 * 60);

/// The repository root (`tests/` is this crate's manifest directory).
pub fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map_or_else(|| manifest.to_path_buf(), Path::to_path_buf)
}

/// `tests/python/`: the agents, the client and the venv setup script.
pub fn python_dir() -> PathBuf {
    repo_root().join("tests").join("python")
}

/// The venv directory: `$CAPMESH_PY_VENV`, or `<repo>/target/py-venv`.
pub fn venv_dir() -> PathBuf {
    std::env::var_os("CAPMESH_PY_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target").join("py-venv"))
}

static VENV: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();

/// The Python interpreter of the test venv, creating or refreshing the venv first (once per
/// process; a no-op taking well under a second when `requirements.txt` is unchanged).
///
/// Blocking (the first run downloads from PyPI); from async code prefer calling it through
/// `tokio::task::spawn_blocking`, as [`PyAgent::start`] and [`client`] do.
pub fn venv() -> Result<PathBuf> {
    VENV.get_or_init(|| setup_venv().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

async fn venv_async() -> Result<PathBuf> {
    tokio::task::spawn_blocking(venv)
        .await
        .context("the Python venv setup task panicked")?
}

fn setup_venv() -> Result<PathBuf> {
    let dir = venv_dir();
    let script = python_dir().join("setup-venv.sh");
    if !script.exists() {
        bail!("{} is missing", script.display());
    }
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let lock_path = PathBuf::from(format!("{}.lock", dir.display()));
    let output = if have_flock() {
        // flock(1) serialises concurrent test processes and releases on exit, even on a crash.
        std::process::Command::new("flock")
            .arg(&lock_path)
            .arg("bash")
            .arg(&script)
            .arg(&dir)
            .stdin(Stdio::null())
            .output()
    } else {
        let _guard = LockFile::acquire(&lock_path)?;
        std::process::Command::new("bash")
            .arg(&script)
            .arg(&dir)
            .stdin(Stdio::null())
            .output()
    }
    .with_context(|| format!("cannot run {}", script.display()))?;
    if !output.status.success() {
        bail!(
            "setting up the Python test environment failed: `{} {}` exited with {}.\n\
             Fix: install python3 (>= 3.10) with its venv module (Debian/Ubuntu: \
             `apt-get install -y python3-venv`), make sure PyPI is reachable, and run the \
             script by hand to see the full error.\n--- stdout ---\n{}\n--- stderr ---\n{}",
            script.display(),
            dir.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
    }
    let python = dir.join("bin").join("python");
    if !python.exists() {
        bail!(
            "{} succeeded but {} does not exist; delete {} and run it again",
            script.display(),
            python.display(),
            dir.display()
        );
    }
    Ok(python)
}

fn have_flock() -> bool {
    std::process::Command::new("flock")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A lock file created with `create_new` (used only where flock(1) is unavailable).
#[derive(Debug)]
struct LockFile(PathBuf);

impl LockFile {
    fn acquire(path: &Path) -> Result<Self> {
        let deadline = Instant::now() + STALE_LOCK;
        loop {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
            {
                Ok(_) => return Ok(Self(path.to_path_buf())),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let age = std::fs::metadata(path)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| SystemTime::now().duration_since(t).ok());
                    if age.is_some_and(|a| a > STALE_LOCK) {
                        let _ = std::fs::remove_file(path);
                        continue;
                    }
                    if Instant::now() > deadline {
                        bail!(
                            "timed out waiting for {} (another test process is setting up the \
                             Python venv); delete the file if no such process is running",
                            path.display()
                        );
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot create {}", path.display()));
                }
            }
        }
    }
}

impl Drop for LockFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Options for [`PyAgent::start_with`].
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Instance name: every tool result starts with `"<name>: "`.
    pub name: String,
    /// `--tools` keys (`weather`, `echo`, `slow`, `caller`/`headers`, `fail`); empty = the
    /// agent's default (`weather,echo,slow,caller`).
    pub tools: Vec<String>,
    /// Fixed port, or `None` for a free one chosen by the agent (`--port 0`, no race).
    pub port: Option<u16>,
    /// Listen address (default `127.0.0.1`; the SDK then only accepts loopback `Host` headers).
    pub host: String,
    /// Extra latency added to every tool call.
    pub delay_ms: u64,
    /// Disable the SDK's DNS-rebinding protection (Host/Origin allow-list).
    pub no_host_check: bool,
    /// A file to which each `get_weather`/`echo` call's argument is appended as the call
    /// arrives (`echo <text>`), before its delay: which calls reached this agent.
    pub journal: Option<PathBuf>,
}

impl AgentOptions {
    /// Defaults for an agent called `name` serving `tools`.
    pub fn new(name: &str, tools: &[&str]) -> Self {
        Self {
            name: name.to_string(),
            tools: tools.iter().map(|t| (*t).to_string()).collect(),
            port: None,
            host: "127.0.0.1".to_string(),
            delay_ms: 0,
            no_host_check: false,
            journal: None,
        }
    }
}

/// A running `tests/python/agent.py`: an MCP server (both protocol generations) at
/// [`PyAgent::url`]. Killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct PyAgent {
    child: Child,
    pid: u32,
    stderr: tempfile::NamedTempFile,
    /// The instance name (prefix of every tool result).
    pub name: String,
    /// The port it listens on.
    pub port: u16,
    /// `http://127.0.0.1:<port>/mcp`.
    pub url: String,
}

impl PyAgent {
    /// Starts an agent called `name` with the given `--tools` keys (empty: the default set) on
    /// `port` (`None`: a free one) and waits up to 30 s for it to listen.
    pub async fn start(name: &str, tools: &[&str], port: Option<u16>) -> Result<Self> {
        let mut opts = AgentOptions::new(name, tools);
        opts.port = port;
        Self::start_with(opts).await
    }

    /// Starts an agent with full [`AgentOptions`].
    pub async fn start_with(opts: AgentOptions) -> Result<Self> {
        let python = venv_async().await?;
        let script = python_dir().join("agent.py");
        let stderr = tempfile::Builder::new()
            .prefix(&format!("agent-{}-", opts.name))
            .suffix(".stderr")
            .tempfile()
            .context("cannot create a temp file for the agent's stderr")?;
        let stderr_handle = stderr
            .reopen()
            .context("cannot reopen the agent's stderr file")?;

        let mut cmd = Command::new(&python);
        crate::scrub_env_async(&mut cmd);
        cmd.arg(&script)
            .arg("--port")
            .arg(opts.port.unwrap_or(0).to_string())
            .arg("--host")
            .arg(&opts.host)
            .arg("--name")
            .arg(&opts.name);
        if !opts.tools.is_empty() {
            cmd.arg("--tools").arg(opts.tools.join(","));
        }
        if opts.delay_ms > 0 {
            cmd.arg("--delay-ms").arg(opts.delay_ms.to_string());
        }
        if opts.no_host_check {
            cmd.arg("--no-host-check");
        }
        if let Some(journal) = &opts.journal {
            cmd.arg("--journal").arg(journal);
        }
        cmd.env("PYTHONUNBUFFERED", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr_handle))
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {} {}", python.display(), script.display()))?;
        let pid = child.id().context("the agent exited immediately")?;
        let stdout = child
            .stdout
            .take()
            .context("the agent's stdout is not piped")?;
        let mut lines = BufReader::new(stdout).lines();

        let waited = tokio::time::timeout(READY_TIMEOUT, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(port) = line.trim().strip_prefix("READY ") {
                    return port
                        .trim()
                        .parse::<u16>()
                        .map(Some)
                        .with_context(|| format!("bad READY line {line:?}"));
                }
            }
            Ok(None)
        })
        .await;
        let failure = match waited {
            Ok(Ok(Some(port))) => {
                if opts.port.is_some_and(|p| p != port) {
                    Some(format!("it reported port {port}, not the requested one"))
                } else {
                    // Keep draining stdout (e.g. "TOOLS added extra") so the pipe never fills.
                    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                    let host = match opts.host.as_str() {
                        "0.0.0.0" | "" => "127.0.0.1".to_string(),
                        "::" => "[::1]".to_string(),
                        h if h.contains(':') => format!("[{h}]"),
                        h => h.to_string(),
                    };
                    return Ok(Self {
                        child,
                        pid,
                        stderr,
                        name: opts.name,
                        port,
                        url: format!("http://{host}:{port}/mcp"),
                    });
                }
            }
            Ok(Ok(None)) => {
                let status = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                Some(format!("it exited before printing READY ({status:?})"))
            }
            Ok(Err(e)) => Some(format!("reading its stdout failed: {e:#}")),
            Err(_) => Some(format!(
                "it did not print READY within {} s",
                READY_TIMEOUT.as_secs()
            )),
        };
        let _ = child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
        bail!(
            "agent.py {:?} (port {:?}) failed to start: {}\n--- agent stderr ---\n{}",
            opts.name,
            opts.port,
            failure.unwrap_or_default(),
            read_lossy(stderr.path())
        )
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// SIGKILL, then waits (up to 5 s) until the process is gone, so its port is closed.
    pub fn kill(&mut self) {
        let _ = self.child.start_kill();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    /// SIGTERM (graceful shutdown: open streams are closed within 2 s) and waits up to 10 s
    /// for the exit code (0 when the agent stopped cleanly).
    pub async fn terminate(&mut self) -> Result<Option<i32>> {
        self.signal("TERM")?;
        let status = tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .context("the agent did not exit within 10 s of SIGTERM")??;
        Ok(status.code())
    }

    /// SIGUSR1: the agent adds (or, the next time, removes) a tool named `extra` and sends
    /// `notifications/tools/list_changed` (legacy sessions: on their GET stream; 2026-07-28:
    /// on `subscriptions/listen` streams).
    pub fn toggle_extra_tool(&self) -> Result<()> {
        self.signal("USR1")
    }

    fn signal(&self, name: &str) -> Result<()> {
        let status = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid.to_string())
            .status()
            .context("cannot run kill(1)")?;
        if !status.success() {
            bail!("kill -{name} {} failed ({status})", self.pid);
        }
        Ok(())
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// What the agent wrote to stderr so far.
    pub fn stderr(&self) -> String {
        read_lossy(self.stderr.path())
    }
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_else(|e| format!("<cannot read {}: {e}>", path.display()))
}

/// The output of one `client.py` run.
#[derive(Debug, Clone)]
pub struct ClientOutput {
    /// 0 ok, 1 MCP / JSON-RPC error (HTTP 4xx/5xx included), 2 connection error, -1 killed.
    pub code: i32,
    /// JSON (one document, or one line per item for `watch` / `loop`).
    pub stdout: String,
    /// Diagnostics.
    pub stderr: String,
}

async fn client_command(
    url: &str,
    mode: &str,
    headers: &[(&str, &str)],
    args: &[&str],
) -> Result<Command> {
    let python = venv_async().await?;
    Ok(client_command_with(&python, url, mode, headers, args))
}

fn client_command_with(
    python: &Path,
    url: &str,
    mode: &str,
    headers: &[(&str, &str)],
    args: &[&str],
) -> Command {
    let mut cmd = Command::new(python);
    crate::scrub_env_async(&mut cmd);
    cmd.arg(python_dir().join("client.py"))
        .arg("--url")
        .arg(url)
        .arg("--mode")
        .arg(mode);
    for (k, v) in headers {
        cmd.arg("--header").arg(format!("{k}={v}"));
    }
    cmd.args(args)
        .env("PYTHONUNBUFFERED", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Runs `client.py --url URL --mode MODE [--header K=V]... ARGS...` (60 s limit) and returns
/// its exit code and stdout. `mode` is `"legacy"`, `"2026-07-28"` or `"auto"`; `args` is a
/// command such as `["call", "get_weather", r#"{"city":"Paris"}"#]`.
pub async fn client(
    url: &str,
    mode: &str,
    headers: &[(&str, &str)],
    args: &[&str],
) -> Result<(i32, String)> {
    let out = client_output(url, mode, headers, args, CLIENT_TIMEOUT).await?;
    Ok((out.code, out.stdout))
}

/// Like [`client`], with stderr and a chosen time limit.
pub async fn client_output(
    url: &str,
    mode: &str,
    headers: &[(&str, &str)],
    args: &[&str],
    limit: Duration,
) -> Result<ClientOutput> {
    let mut cmd = client_command(url, mode, headers, args).await?;
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().context("cannot start client.py")?;
    match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(Ok(out)) => Ok(ClientOutput {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }),
        Ok(Err(e)) => Err(e).context("waiting for client.py failed"),
        // Dropping the future drops the child, which kill_on_drop kills.
        Err(_) => bail!(
            "client.py {args:?} against {url} ({mode}) did not finish within {} s",
            limit.as_secs()
        ),
    }
}

/// Like [`client`], parsing stdout as one JSON document (a failure to parse is an error that
/// shows the exit code, stdout and stderr).
pub async fn client_json(
    url: &str,
    mode: &str,
    headers: &[(&str, &str)],
    args: &[&str],
) -> Result<(i32, serde_json::Value)> {
    let out = client_output(url, mode, headers, args, CLIENT_TIMEOUT).await?;
    let value = serde_json::from_str(out.stdout.trim()).with_context(|| {
        format!(
            "client.py {args:?} printed no JSON (exit {}):\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.code, out.stdout, out.stderr
        )
    })?;
    Ok((out.code, value))
}

/// Parses the JSON lines printed by `watch` / `loop`.
pub fn json_lines(stdout: &str) -> Result<Vec<serde_json::Value>> {
    stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("not a JSON line: {l:?}")))
        .collect()
}

/// Starts a long-running `client.py` (`watch SECONDS`, `loop TOOL ARGS COUNT INTERVAL_MS`)
/// with stdout piped (one JSON line per event) and stderr inherited; killed on drop.
/// Must be called inside a tokio runtime. Blocks while the venv is first created.
pub fn spawn_client(
    url: &str,
    mode: &str,
    headers: &[(&str, &str)],
    args: &[&str],
) -> Result<Child> {
    let python = venv()?;
    let mut cmd = client_command_with(&python, url, mode, headers, args);
    cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
    cmd.spawn().context("cannot start client.py")
}

//! Real npm MCP peers for end-to-end tests, installed at locked versions under
//! `target/node-peers` by `tests/node/setup-node-peers.sh` on first use (Node 22 itself comes
//! from npm, so a machine with any Node >= 18 and npm is enough):
//!
//! - [`NodeServer::everything`]: `@modelcontextprotocol/server-everything` (v1 SDK, stateful
//!   sessions, resumable streams, sampling / elicitation / progress tools) over Streamable HTTP.
//! - [`NodeServer::ts_sdk`]: `tests/node/ts-server.mjs`, a sessionless TypeScript SDK v2 server
//!   (both protocol generations).
//! - [`conformance`]: `@modelcontextprotocol/conformance` against a URL, results per scenario.
//!
//! The environment variable `CAPMESH_NODE_PEERS` overrides the install directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};

use crate::python::repo_root;

/// How long a server has to say it is listening.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one conformance run may take (the whole active suite takes seconds).
const CONFORMANCE_TIMEOUT: Duration = Duration::from_secs(300);

/// `tests/node/`: the locked package list, the setup script and the servers written here.
pub fn node_dir() -> PathBuf {
    repo_root().join("tests").join("node")
}

/// The install directory: `$CAPMESH_NODE_PEERS`, or `<repo>/target/node-peers`.
pub fn peers_dir() -> PathBuf {
    std::env::var_os("CAPMESH_NODE_PEERS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target").join("node-peers"))
}

static PEERS: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();

/// The install directory, running the setup script first (once per process; it returns at
/// once when the lock file is unchanged). Blocking: the first run downloads from npm.
pub fn peers() -> Result<PathBuf> {
    PEERS
        .get_or_init(|| setup().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

async fn peers_async() -> Result<PathBuf> {
    tokio::task::spawn_blocking(peers)
        .await
        .context("the npm peer setup task panicked")?
}

/// The Node 22 binary installed from npm.
pub fn node22(dir: &Path) -> PathBuf {
    dir.join("node_modules")
        .join("node")
        .join("bin")
        .join("node")
}

fn setup() -> Result<PathBuf> {
    let dir = peers_dir();
    let script = node_dir().join("setup-node-peers.sh");
    if !script.exists() {
        bail!("{} is missing", script.display());
    }
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    // flock(1) serialises test processes installing at once and releases on exit.
    let lock = PathBuf::from(format!("{}.lock", dir.display()));
    let output = std::process::Command::new("flock")
        .arg(&lock)
        .arg("bash")
        .arg(&script)
        .arg(&dir)
        .stdin(Stdio::null())
        .output()
        .with_context(|| {
            format!(
                "cannot run `flock {} bash {}`: install util-linux (flock) and bash",
                lock.display(),
                script.display()
            )
        })?;
    if !output.status.success() {
        bail!(
            "installing the npm test peers failed: `{} {}` exited with {}.\n\
             Fix: install Node.js (>= 18) with npm, make sure the npm registry is reachable, \
             and run the script by hand to see the full error.\n--- stdout ---\n{}\n\
             --- stderr ---\n{}",
            script.display(),
            dir.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
    }
    let node = node22(&dir);
    if !node.exists() {
        bail!(
            "{} succeeded but {} does not exist; delete {} and run it again",
            script.display(),
            node.display(),
            dir.display()
        );
    }
    Ok(dir)
}

/// An npm MCP server on a loopback port, killed on drop.
#[derive(Debug)]
pub struct NodeServer {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Its MCP endpoint, `http://127.0.0.1:<port>/mcp`.
    pub url: String,
    output: tempfile::NamedTempFile,
    _reserved: Option<crate::ReservedPort>,
}

impl NodeServer {
    /// `@modelcontextprotocol/server-everything streamableHttp` on a free port.
    pub async fn everything() -> Result<Self> {
        let dir = peers_async().await?;
        // It cannot report a port it picked, so it gets one reserved for its whole life.
        let reserved = crate::reserve_port()?;
        let port = reserved.port();
        let script = dir
            .join("node_modules")
            .join("@modelcontextprotocol")
            .join("server-everything")
            .join("dist")
            .join("index.js");
        let mut cmd = Command::new(node22(&dir));
        cmd.arg(&script)
            .arg("streamableHttp")
            .env("PORT", port.to_string());
        // It logs "… listening on port N" on stderr once bound.
        let marker = format!("listening on port {port}");
        let mut server = Self::spawn(cmd, "server-everything", move |line| {
            line.contains(&marker).then_some(port)
        })
        .await?;
        server._reserved = Some(reserved);
        Ok(server)
    }

    /// `tests/node/ts-server.mjs PORT NAME`: a sessionless TypeScript SDK v2 server with one
    /// tool, `shout`, answering `"<name>: <TEXT>"`.
    pub async fn ts_sdk(name: &str) -> Result<Self> {
        let dir = peers_async().await?;
        let mut cmd = Command::new(node22(&dir));
        cmd.arg(dir.join("ts-server.mjs")).arg("0").arg(name);
        Self::spawn(cmd, "ts-server.mjs", |line| {
            line.trim().strip_prefix("READY ")?.parse().ok()
        })
        .await
    }

    /// Any server process (the Python conformance server too): started with its output
    /// captured, ready when `ready` finds its port in a line it prints; killed on drop.
    pub async fn spawn(
        mut cmd: Command,
        what: &str,
        ready: impl Fn(&str) -> Option<u16>,
    ) -> Result<Self> {
        let output = tempfile::Builder::new()
            .prefix(&format!("{what}-"))
            .suffix(".log")
            .tempfile()
            .context("cannot create a temp file for the server's output")?;
        crate::scrub_env_async(&mut cmd);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {what}"))?;
        let stdout = child.stdout.take().context("stdout is not piped")?;
        let stderr = child.stderr.take().context("stderr is not piped")?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        for stream in [
            Box::new(stdout) as Box<dyn AsyncRead + Send + Unpin>,
            Box::new(stderr),
        ] {
            // Both streams go to the log file for the whole run, and line by line to `rx`.
            let tx = tx.clone();
            let log = output.reopen()?;
            tokio::spawn(async move {
                use std::io::Write;
                let mut log = log;
                let mut lines = BufReader::new(stream).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let _ = writeln!(log, "{line}");
                    let _ = tx.send(line);
                }
            });
        }
        drop(tx);
        let waited = tokio::time::timeout(READY_TIMEOUT, async {
            while let Some(line) = rx.recv().await {
                if let Some(port) = ready(&line) {
                    return Some(port);
                }
            }
            None
        })
        .await;
        match waited {
            Ok(Some(port)) => Ok(Self {
                child,
                port,
                url: format!("http://127.0.0.1:{port}/mcp"),
                output,
                _reserved: None,
            }),
            other => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                let why = match other {
                    Err(_) => format!("it did not report listening within {READY_TIMEOUT:?}"),
                    _ => "it exited before listening".to_owned(),
                };
                bail!(
                    "{what} failed to start: {why}\n--- its output ---\n{}",
                    std::fs::read_to_string(output.path()).unwrap_or_default()
                )
            }
        }
    }

    /// What the server printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(self.output.path()).unwrap_or_default()
    }

    /// SIGKILL.
    pub async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// One conformance run: every scenario's (checks passed, checks failed), and the full output.
#[derive(Debug, Clone)]
pub struct Conformance {
    /// Scenario name → (passed, failed) from the suite's summary.
    pub scenarios: BTreeMap<String, (u32, u32)>,
    /// Everything the suite printed.
    pub output: String,
}

/// Runs `conformance server --url URL` (the active suite, or one `scenario`) with Node 22.
pub async fn conformance(url: &str, scenario: Option<&str>) -> Result<Conformance> {
    let dir = peers_async().await?;
    let results = tempfile::tempdir()?;
    let bin = dir.join("node_modules").join(".bin").join("conformance");
    let mut cmd = Command::new(node22(&dir));
    crate::scrub_env_async(&mut cmd);
    cmd.arg(&bin)
        .arg("server")
        .arg("--url")
        .arg(url)
        .arg("--output-dir")
        .arg(results.path());
    if let Some(s) = scenario {
        cmd.arg("--scenario").arg(s);
    }
    cmd.current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(CONFORMANCE_TIMEOUT, cmd.output())
        .await
        .map_err(|_| {
            anyhow!("the conformance suite against {url} ran past {CONFORMANCE_TIMEOUT:?}")
        })?
        .context("cannot run the conformance suite")?;
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let scenarios = summary(&output);
    if scenarios.is_empty() {
        bail!(
            "the conformance suite against {url} printed no summary (exit {}):\n{output}",
            out.status
        );
    }
    Ok(Conformance { scenarios, output })
}

/// Parses the summary lines `✓ name: 1 passed, 0 failed` / `✗ name: 0 passed, 1 failed`.
pub fn summary(output: &str) -> BTreeMap<String, (u32, u32)> {
    let after = output
        .rsplit_once("=== SUMMARY ===")
        .map_or("", |(_, rest)| rest);
    after
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            let rest = line
                .strip_prefix('✓')
                .or_else(|| line.strip_prefix('✗'))?
                .trim();
            let (name, counts) = rest.rsplit_once(": ")?;
            let (passed, failed) = counts.split_once(" passed, ")?;
            let failed = failed.strip_suffix(" failed")?;
            Some((
                name.to_owned(),
                (passed.trim().parse().ok()?, failed.trim().parse().ok()?),
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    #[test]
    fn the_summary_is_read_per_scenario() {
        let text = "=== Running scenario: ping ===\n\n=== SUMMARY ===\n\
                    ✓ ping: 1 passed, 0 failed\n\
                    ✗ dns-rebinding-protection: 1 passed, 1 failed\n\nTotal: 2 passed, 1 failed\n";
        let s = super::summary(text);
        assert_eq!(s.len(), 2);
        assert_eq!(s["ping"], (1, 0));
        assert_eq!(s["dns-rebinding-protection"], (1, 1));
        assert!(super::summary("no summary here").is_empty());
    }
}

//! Running a local mesh as child processes: the control plane, agents and their sidecars, each
//! a real process (killing one is a real crash), with output prefixed by name, readiness
//! checks, and a clean stop that never leaves a process behind.
//!
//! Ports are never picked here: every child binds port 0 itself and reports the port it got
//! (`--ports-file` for the control plane and the sidecars, `READY <port>` on stdout for the
//! example agents), so no port is released and reused. A child that exits while the mesh
//! starts stops the start with that child's own last lines ([`ChildExited`]).

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::output;

/// How many of a child's last output lines are kept for an error message.
const TAIL_LINES: usize = 12;

/// Where a child's output goes.
#[derive(Debug, Clone)]
pub enum Output {
    /// Printed as `name │ line`.
    Prefixed,
    /// Appended to this file (the demo keeps the terminal for its own story).
    File(PathBuf),
}

/// What a child printed that the supervisor needs: its last lines and its `READY <port>`.
#[derive(Debug, Default)]
struct Seen {
    tail: VecDeque<String>,
    ready_port: Option<u16>,
}

/// One supervised process.
#[derive(Debug)]
struct Managed {
    name: String,
    child: Child,
    seen: Arc<Mutex<Seen>>,
}

/// The processes of a local mesh.
#[derive(Debug, Default)]
pub struct Supervisor {
    children: Vec<Managed>,
}

/// A child exited before the mesh was up: its name, how it ended and what it said last.
#[derive(Debug, thiserror::Error)]
#[error("{name} exited ({status}); its last lines:\n{}", indent(.tail))]
pub struct ChildExited {
    /// The child's name (`control-plane`, `weather-proxy`, ...).
    pub name: String,
    /// How it ended.
    pub status: String,
    /// Its last lines of output, stdout and stderr interleaved.
    pub tail: Vec<String>,
}

fn indent(lines: &[String]) -> String {
    if lines.is_empty() {
        return "  (it printed nothing)".to_owned();
    }
    lines
        .iter()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn lock(seen: &Mutex<Seen>) -> std::sync::MutexGuard<'_, Seen> {
    seen.lock().unwrap_or_else(|p| p.into_inner())
}

fn pipe_lines<R>(name: String, reader: R, output: Output, seen: Arc<Mutex<Seen>>)
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut lines = BufReader::new(reader).lines();
        let mut file = match &output {
            Output::File(path) => std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .ok(),
            Output::Prefixed => None,
        };
        while let Ok(Some(line)) = lines.next_line().await {
            {
                let mut seen = lock(&seen);
                if seen.ready_port.is_none()
                    && let Some(port) = line
                        .strip_prefix("READY ")
                        .and_then(|p| p.trim().parse().ok())
                {
                    seen.ready_port = Some(port);
                }
                if seen.tail.len() == TAIL_LINES {
                    seen.tail.pop_front();
                }
                seen.tail.push_back(line.clone());
            }
            match (&output, file.as_mut()) {
                (Output::Prefixed, _) => output::line(&format!("{name:>14} │ {line}")),
                (Output::File(_), Some(f)) => {
                    use std::io::Write;
                    let _ = writeln!(f, "{name}: {line}");
                }
                (Output::File(_), None) => {}
            }
        }
    });
}

impl Supervisor {
    /// Starts `program args…` as `name`. The child gets this process's environment without
    /// its `CAPMESH_*` variables (they configure this command, not the mesh it starts), plus
    /// `env`.
    pub fn spawn(
        &mut self,
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(String, String)],
        output: Output,
    ) -> anyhow::Result<u32> {
        let mut cmd = Command::new(program);
        for (key, _) in std::env::vars_os() {
            if key.to_str().is_some_and(|k| k.starts_with("CAPMESH_")) {
                cmd.env_remove(key);
            }
        }
        cmd.args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name} ({})", program.display()))?;
        let pid = child.id().unwrap_or(0);
        let seen = Arc::new(Mutex::new(Seen::default()));
        if let Some(out) = child.stdout.take() {
            pipe_lines(name.to_owned(), out, output.clone(), seen.clone());
        }
        if let Some(err) = child.stderr.take() {
            pipe_lines(name.to_owned(), err, output, seen.clone());
        }
        self.children.push(Managed {
            name: name.to_owned(),
            child,
            seen,
        });
        Ok(pid)
    }

    /// Whether `name` is still running.
    pub fn running(&mut self, name: &str) -> bool {
        self.children
            .iter_mut()
            .find(|m| m.name == name)
            .is_some_and(|m| matches!(m.child.try_wait(), Ok(None)))
    }

    /// Fails with [`ChildExited`] if any child has exited (a mesh with a dead member is not
    /// what the user asked for).
    pub async fn check_alive(&mut self) -> Result<(), ChildExited> {
        let mut exited = None;
        for m in &mut self.children {
            if let Ok(Some(status)) = m.child.try_wait() {
                exited = Some((m.name.clone(), status.to_string(), m.seen.clone()));
                break;
            }
        }
        let Some((name, status, seen)) = exited else {
            return Ok(());
        };
        // Its pipes may still hold its last words: give the readers a moment to drain them.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let tail = lock(&seen).tail.iter().cloned().collect();
        Err(ChildExited { name, status, tail })
    }

    /// SIGKILL: the process vanishes, as in a crash.
    pub async fn kill(&mut self, name: &str) -> anyhow::Result<()> {
        let m = self
            .children
            .iter_mut()
            .find(|m| m.name == name)
            .with_context(|| format!("no process named {name}"))?;
        m.child
            .kill()
            .await
            .with_context(|| format!("cannot kill {name}"))?;
        Ok(())
    }

    /// SIGTERM to everything (newest first, so sidecars withdraw before the control plane
    /// goes), then SIGKILL whatever is still running after `grace`.
    pub async fn stop_all(&mut self, grace: Duration) {
        for m in self.children.iter().rev() {
            if let Some(pid) = m.child.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
        let deadline = Instant::now() + grace;
        for m in &mut self.children {
            let left = deadline.saturating_duration_since(Instant::now());
            if tokio::time::timeout(left, m.child.wait()).await.is_err() {
                let _ = m.child.kill().await;
            }
        }
        self.children.clear();
    }

    /// Waits for `name`'s `READY <port>` line (an example agent started with `--port 0`).
    pub async fn ready_port(&mut self, name: &str, timeout: Duration) -> anyhow::Result<u16> {
        let seen = self
            .children
            .iter()
            .find(|m| m.name == name)
            .map(|m| m.seen.clone())
            .with_context(|| format!("no process named {name}"))?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(port) = lock(&seen).ready_port {
                return Ok(port);
            }
            self.check_alive().await?;
            if Instant::now() > deadline {
                bail!("{name} did not print READY <port> within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Plain HTTP GET on a loopback port: (status, body).
pub async fn http_get(port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    Ok(capmesh_client::process::http_get(port, path).await?)
}

/// Waits until `file` (a child's `--ports-file`) exists and returns its addresses by name,
/// while `sup` checks nobody died.
pub async fn wait_ports(
    sup: &mut Supervisor,
    what: &str,
    file: &Path,
    timeout: Duration,
) -> anyhow::Result<BTreeMap<String, SocketAddr>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(text) = std::fs::read_to_string(file) {
            let ports: BTreeMap<String, String> = serde_json::from_str(&text)
                .with_context(|| format!("{what}'s ports file {} is unreadable", file.display()))?;
            return ports
                .into_iter()
                .map(|(k, v)| {
                    let addr = v.parse().with_context(|| {
                        format!("{what}'s ports file {}: {k} = {v:?}", file.display())
                    })?;
                    Ok((k, addr))
                })
                .collect();
        }
        sup.check_alive().await?;
        if Instant::now() > deadline {
            bail!("{what} did not bind its ports within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The address named `name` in a ports file's addresses.
pub fn port(ports: &BTreeMap<String, SocketAddr>, name: &str) -> anyhow::Result<u16> {
    ports
        .get(name)
        .map(SocketAddr::port)
        .with_context(|| format!("the ports file has no {name:?} address"))
}

/// Waits until `GET path` on `port` answers 200, while `sup` checks nobody died.
pub async fn wait_ready(
    sup: &mut Supervisor,
    what: &str,
    port: u16,
    path: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok((200, _)) = http_get(port, path).await {
            return Ok(());
        }
        sup.check_alive().await?;
        if Instant::now() > deadline {
            let why = http_get(port, path)
                .await
                .map(|(_, b)| b)
                .unwrap_or_default();
            bail!(
                "{what} was not ready within {} s: {}",
                timeout.as_secs(),
                why.trim()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until something accepts connections on `port` (an agent given its port up front).
pub async fn wait_port(
    sup: &mut Supervisor,
    what: &str,
    port: u16,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        sup.check_alive().await?;
        if Instant::now() > deadline {
            bail!(
                "{what} did not open port {port} within {} s",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

//! Running a local mesh as child processes: the control plane, agents and their sidecars, each
//! a real process (killing one is a real crash), with output prefixed by name, readiness
//! checks, and a clean stop that never leaves a process behind.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Where a child's output goes.
#[derive(Debug, Clone)]
pub enum Output {
    /// Printed as `name │ line`.
    Prefixed,
    /// Appended to this file (the demo keeps the terminal for its own story).
    File(PathBuf),
}

/// One supervised process.
#[derive(Debug)]
struct Managed {
    name: String,
    child: Child,
}

/// The processes of a local mesh.
#[derive(Debug, Default)]
pub struct Supervisor {
    children: Vec<Managed>,
}

/// A free loopback port.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn pipe_lines<R>(name: String, reader: R, output: Output)
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
            match (&output, file.as_mut()) {
                (Output::Prefixed, _) => println!("{name:>14} │ {line}"),
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
    /// Starts `program args…` as `name`.
    pub fn spawn(
        &mut self,
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(String, String)],
        output: Output,
    ) -> anyhow::Result<u32> {
        let mut cmd = Command::new(program);
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
        if let Some(out) = child.stdout.take() {
            pipe_lines(name.to_owned(), out, output.clone());
        }
        if let Some(err) = child.stderr.take() {
            pipe_lines(name.to_owned(), err, output);
        }
        self.children.push(Managed {
            name: name.to_owned(),
            child,
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

    /// Fails if any child has exited (a mesh with a dead member is not what the user asked for).
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for m in &mut self.children {
            if let Ok(Some(status)) = m.child.try_wait() {
                bail!("{} exited unexpectedly ({status})", m.name);
            }
        }
        Ok(())
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
}

/// Plain HTTP GET on a loopback port: (status, body).
pub async fn http_get(port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    Ok(capmesh_client::process::http_get(port, path).await?)
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
        sup.check_alive()?;
        if Instant::now() > deadline {
            let why = http_get(port, path)
                .await
                .map(|(_, b)| b)
                .unwrap_or_default();
            bail!("{what} was not ready within {timeout:?}: {}", why.trim());
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
        sup.check_alive()?;
        if Instant::now() > deadline {
            bail!("{what} did not open port {port} within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

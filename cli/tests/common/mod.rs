//! Running the real `capmesh` binary against a real control plane (started as
//! `capmesh-control-plane`, a symlink to this very binary: the multi-call path), with real
//! sidecars (`capmesh-proxy`, the same way) and real Python MCP agents.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use capmesh_tests::python::PyAgent;
use capmesh_tests::{ControlPlane, ProxyProcess};

/// How long one `capmesh` command may run.
pub const COMMAND_LIMIT: Duration = Duration::from_secs(60);

/// The binary under test.
pub fn capmesh_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_capmesh"))
}

/// What one command did.
#[derive(Debug, Clone)]
pub struct Run {
    /// The exit code (-1 when killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Run {
    /// Asserts a zero exit and returns stdout.
    pub fn ok(&self) -> &str {
        assert_eq!(self.code, 0, "expected success:\n{self}");
        &self.stdout
    }

    /// Asserts exit code `code` and that stderr mentions every one of `words`.
    pub fn fails(&self, code: i32, words: &[&str]) -> &Self {
        assert_eq!(self.code, code, "expected exit {code}:\n{self}");
        for word in words {
            assert!(
                self.stderr.contains(word),
                "stderr should mention {word:?}:\n{self}"
            );
        }
        self
    }

    /// Stdout as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.ok())
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{self}"))
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs a prepared command with a time limit (killed past it), capturing its output.
pub fn run_bounded(mut cmd: Command, limit: Duration) -> Run {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => {
            let out = out.unwrap();
            Run {
                code: out.status.code().unwrap_or(-1),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            }
        }
        Err(_) => {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            panic!("{cmd:?} did not finish within {limit:?}");
        }
    }
}

/// `capmesh args…` with a clean environment (no `CAPMESH_*` from the caller), `HOME` and the
/// working directory set to `dir`, plus `envs`.
pub fn capmesh_in(dir: &Path, envs: &[(&str, &str)], args: &[&str]) -> Run {
    let mut cmd = Command::new(capmesh_bin());
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", dir)
        .current_dir(dir)
        .args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    run_bounded(cmd, COMMAND_LIMIT)
}

/// Symlinks named `capmesh-control-plane` and `capmesh-proxy` to the binary under test, so the
/// harness starts them as it would the stand-alone binaries.
#[derive(Debug)]
pub struct Programs {
    dir: tempfile::TempDir,
}

impl Programs {
    /// Makes the links.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        for name in ["capmesh-control-plane", "capmesh-proxy"] {
            std::os::unix::fs::symlink(capmesh_bin(), dir.path().join(name)).unwrap();
        }
        Self { dir }
    }

    /// `capmesh-control-plane`.
    pub fn control_plane(&self) -> PathBuf {
        self.dir.path().join("capmesh-control-plane")
    }

    /// `capmesh-proxy`.
    pub fn proxy(&self) -> PathBuf {
        self.dir.path().join("capmesh-proxy")
    }
}

/// A running control plane and a place to run the CLI against it.
#[derive(Debug)]
pub struct Mesh {
    /// The control plane.
    pub cp: ControlPlane,
    /// `HOME` and working directory of the CLI (empty: no config file, no `./capmesh-data`).
    pub home: tempfile::TempDir,
    programs: Programs,
}

impl Mesh {
    /// Starts a control plane with `extra` flags.
    pub async fn start(extra: &[&str]) -> Self {
        let programs = Programs::new();
        let cp = ControlPlane::start(&programs.control_plane(), extra)
            .await
            .unwrap();
        Self {
            cp,
            home: tempfile::tempdir().unwrap(),
            programs,
        }
    }

    /// The control plane's URL.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.cp.port)
    }

    /// The trust bundle the control plane wrote.
    pub fn ca(&self) -> PathBuf {
        self.cp.data_dir.join("ca.pem")
    }

    /// The admin token file the control plane wrote.
    pub fn token_file(&self) -> PathBuf {
        self.cp.data_dir.join("admin-token")
    }

    /// The settings for this control plane, as environment variables.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("CAPMESH_CONTROL_PLANE".into(), self.url()),
            (
                "CAPMESH_CONTROL_PLANE_CA".into(),
                self.ca().display().to_string(),
            ),
            (
                "CAPMESH_ADMIN_TOKEN_FILE".into(),
                self.token_file().display().to_string(),
            ),
        ]
    }

    /// `capmesh args…` pointed at this control plane through `CAPMESH_*` variables.
    pub fn capmesh(&self, args: &[&str]) -> Run {
        let env = self.env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        capmesh_in(self.home.path(), &env, args)
    }

    /// `capmesh args…` with only the given variables (no settings for this control plane).
    pub fn capmesh_with(&self, envs: &[(&str, &str)], args: &[&str]) -> Run {
        capmesh_in(self.home.path(), envs, args)
    }

    /// A Python agent offering `tools`, and its sidecar registered as `name` with `extra`
    /// sidecar flags; waits until the sidecar is ready.
    pub async fn provider(
        &self,
        name: &str,
        tools: &[&str],
        extra: &[&str],
    ) -> (PyAgent, ProxyProcess) {
        let agent = PyAgent::start(name, tools, None).await.unwrap();
        let proxy = ProxyProcess::start(
            &self.programs.proxy(),
            &self.cp,
            name,
            Some(&agent.url),
            extra,
        )
        .await
        .unwrap();
        (agent, proxy)
    }
}

impl Mesh {
    /// A consumer's sidecar (`--agent-url none`) named `name` with `extra` flags; waits until
    /// it is ready.
    pub async fn consumer(&self, name: &str, extra: &[&str]) -> ProxyProcess {
        ProxyProcess::start(&self.programs.proxy(), &self.cp, name, None, extra)
            .await
            .unwrap()
    }

    /// A sidecar for `name` started with `token` and `agent_url`, not waited for.
    pub async fn sidecar(&self, name: &str, agent_url: &str, token: &str) -> ProxyProcess {
        ProxyProcess::spawn(
            &self.programs.proxy(),
            &self.cp,
            token,
            name,
            Some(agent_url),
            &[],
        )
        .await
        .unwrap()
    }
}

/// Runs `probe` every 200 ms until it returns `Some`, or panics after `timeout`.
pub async fn eventually<T>(
    timeout: Duration,
    what: &str,
    mut probe: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A port nothing listens on, held closed while the value lives (see `ReservedPort`).
pub fn closed_port() -> capmesh_tests::ReservedPort {
    capmesh_tests::reserve_port().unwrap()
}

//! Transparent mode, end to end, on real iptables in network namespaces this test creates.
//!
//! Two "pods" joined by a veth pair: `a` (10.77.0.1) runs an unmodified Python MCP client
//! and its sidecar; `b` (10.77.0.2, plus 10.77.0.3 for a service outside the mesh) runs the
//! control plane, a Python MCP server on :8080 and its sidecar. Both pods get the rules of
//! `capmesh-proxy init`, and both sidecars run as UID 1337, the UID the rules exclude. The
//! client calls `http://10.77.0.2:8080/mcp`, the address it would use with no mesh, and the
//! call must cross both sidecars over mutual TLS: the server sees the client's SPIFFE ID in
//! `x-capmesh-caller`.
//!
//! Needs root, `ip` (iproute2), `iptables`, `setpriv` and `curl`; when one is missing the test
//! installs it with apt-get, and fails saying what is missing if it cannot (it never skips).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use capmesh_tests::python::{python_dir, venv};
use capmesh_tests::workspace_bin;
use serde_json::Value;

const PROXY_UID: &str = "1337";
const CP_ADDR: &str = "10.77.0.2:8000";

/// Runs a command to completion and returns its output (never fails on the exit code).
fn run(program: &str, args: &[&str]) -> Result<Output> {
    Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program} {args:?}"))
}

fn must(program: &str, args: &[&str]) -> Result<String> {
    let out = run(program, args)?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn prerequisites() -> Result<()> {
    let uid = must("id", &["-u"])?;
    if uid.trim() != "0" {
        bail!("this test creates network namespaces and iptables rules: run it as root");
    }
    let have = |tool: &str| -> Result<bool> {
        Ok(run("sh", &["-c", &format!("command -v {tool}")])?
            .status
            .success())
    };
    let mut missing = Vec::new();
    for (tool, package) in [
        ("ip", "iproute2"),
        ("iptables", "iptables"),
        ("setpriv", "util-linux"),
        ("curl", "curl"),
    ] {
        if !have(tool)? {
            missing.push(package);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    // As root on Debian, install what is missing, as the venv script does for python3-venv.
    eprintln!("installing {missing:?} with apt-get for the transparent-mode test");
    let _ = run("apt-get", &["update", "-qq"]);
    let mut args = vec!["install", "-y", "-qq"];
    args.extend(&missing);
    let out = Command::new("apt-get")
        .args(&args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .context("apt-get is not available")?;
    if !out.status.success() {
        bail!(
            "{missing:?} are missing and apt-get could not install them: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A network namespace and the processes started in it; all removed on drop.
struct Netns {
    name: String,
    children: Vec<(String, Child, PathBuf)>,
}

impl Netns {
    fn create(name: String) -> Result<Self> {
        let _ = run("ip", &["netns", "del", &name]);
        must("ip", &["netns", "add", &name])?;
        let ns = Self {
            name,
            children: Vec::new(),
        };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Gives the namespace its own /etc/hosts (removed on drop).
    fn hosts(&self, text: &str) -> Result<()> {
        let dir = Path::new("/etc/netns").join(&self.name);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("hosts"), format!("127.0.0.1 localhost\n{text}"))?;
        Ok(())
    }

    /// Runs a command in the namespace (as root) and returns stdout, failing on a bad exit.
    fn exec(&self, cmd: &[&str]) -> Result<String> {
        let mut args = vec!["netns", "exec", &self.name];
        args.extend_from_slice(cmd);
        must("ip", &args)
    }

    fn exec_output(&self, cmd: &[&str]) -> Result<Output> {
        let mut args = vec!["netns", "exec", &self.name];
        args.extend_from_slice(cmd);
        run("ip", &args)
    }

    /// Starts a long-running process in the namespace, as `uid` when given, logging to `log`.
    fn spawn(&mut self, label: &str, uid: Option<&str>, cmd: &[&str], log: &Path) -> Result<()> {
        let file = std::fs::File::create(log)?;
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]);
        if let Some(uid) = uid {
            c.args([
                "setpriv",
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
                "--",
            ]);
        }
        c.args(cmd)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file));
        let child = c.spawn().with_context(|| format!("cannot start {label}"))?;
        self.children
            .push((label.to_owned(), child, log.to_owned()));
        Ok(())
    }

    /// Every log of this namespace's processes, for failure messages.
    fn logs(&self) -> String {
        let mut text = String::new();
        for (label, _, log) in &self.children {
            let body = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = body.lines().rev().take(40).collect();
            text.push_str(&format!("--- {label} ({}) ---\n", self.name));
            for line in tail.into_iter().rev() {
                text.push_str(line);
                text.push('\n');
            }
        }
        text
    }

    fn curl(&self, uid: Option<&str>, url: &str) -> Result<Output> {
        let mut cmd: Vec<String> = Vec::new();
        if let Some(uid) = uid {
            cmd.extend([
                "setpriv".to_owned(),
                format!("--reuid={uid}"),
                format!("--regid={uid}"),
                "--clear-groups".to_owned(),
                "--".to_owned(),
            ]);
        }
        cmd.extend(
            ["curl", "-sS", "--max-time", "5", url]
                .iter()
                .map(|s| s.to_string()),
        );
        let refs: Vec<&str> = cmd.iter().map(String::as_str).collect();
        self.exec_output(&refs)
    }

    /// Waits until `url` (inside the namespace) answers 200.
    fn wait_ok(&self, url: &str, what: &str, others: &[&Netns]) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            let out = self.exec_output(&["curl", "-sf", "--max-time", "2", url])?;
            if out.status.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let mut logs = self.logs();
                for o in others {
                    logs.push_str(&o.logs());
                }
                bail!("{what} ({url}) was not ready within 40 s\n{logs}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for (_, child, _) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = run("ip", &["netns", "del", &self.name]);
        let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(&self.name));
    }
}

fn metric(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn an_unmodified_client_reaches_a_provider_by_its_own_address_through_both_sidecars() {
    prerequisites().unwrap();
    let proxy = workspace_bin("capmesh-proxy").unwrap();
    let cp_bin = workspace_bin("capmesh-control-plane").unwrap();
    let capmesh = workspace_bin("capmesh").unwrap();
    let python = venv().unwrap();
    let proxy = proxy.to_str().unwrap();

    // A directory the sidecars (UID 1337) can read.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let path = |f: &str| dir.path().join(f);
    let p = |f: &str| path(f).to_str().unwrap().to_owned();

    let id = std::process::id();
    let mut a = Netns::create(format!("cm{id}a")).unwrap();
    let mut b = Netns::create(format!("cm{id}b")).unwrap();
    must(
        "ip",
        &[
            "-n", &a.name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns",
            &b.name,
        ],
    )
    .unwrap();
    // `ip netns exec` shows /etc/netns/<name>/hosts as /etc/hosts inside the namespace.
    a.hosts("10.77.0.50 weather.default.svc.cluster.local weather\n")
        .unwrap();
    a.exec(&["ip", "addr", "add", "10.77.0.1/24", "dev", "eth0"])
        .unwrap();
    a.exec(&["ip", "link", "set", "eth0", "up"]).unwrap();
    b.exec(&["ip", "addr", "add", "10.77.0.2/24", "dev", "eth0"])
        .unwrap();
    b.exec(&["ip", "addr", "add", "10.77.0.3/24", "dev", "eth0"])
        .unwrap();
    b.exec(&["ip", "link", "set", "eth0", "up"]).unwrap();

    // Pod b: the control plane (its port left alone by the rules), a service outside the mesh
    // on 10.77.0.3:9999, the provider agent on :8080 and its sidecar.
    let data = p("cp-data");
    b.spawn(
        "control plane",
        None,
        &[
            cp_bin.to_str().unwrap(),
            "--data-dir",
            &data,
            "--listen",
            CP_ADDR,
            "--admin-listen",
            "127.0.0.1:9090",
        ],
        &path("cp.log"),
    )
    .unwrap();
    b.wait_ok("http://127.0.0.1:9090/ready", "the control plane", &[])
        .unwrap();
    std::fs::copy(path("cp-data/ca.pem"), path("ca.pem")).unwrap();
    let data_token = format!("{data}/admin-token");
    let token = |agent: &str| -> String {
        b.exec(&[
            capmesh.to_str().unwrap(),
            "--control-plane",
            &format!("https://{CP_ADDR}"),
            "--control-plane-ca",
            &p("ca.pem"),
            "--admin-token-file",
            &data_token,
            "token",
            "create",
            "--agent",
            agent,
        ])
        .unwrap()
        .trim()
        .to_owned()
    };
    let provider_token = token("weather");
    let consumer_token = token("planner");

    std::fs::write(path("outside.txt"), "not part of the mesh\n").unwrap();
    b.spawn(
        "outside service",
        None,
        &[
            python.to_str().unwrap(),
            "-m",
            "http.server",
            "--bind",
            "10.77.0.3",
            "--directory",
            &p(""),
            "9999",
        ],
        &path("outside.log"),
    )
    .unwrap();

    // The rules, as the init container writes them; twice, to show a rerun replaces them.
    for _ in 0..2 {
        b.exec(&[proxy, "init", "--skip-inbound-ports", "15020,8000,9999"])
            .unwrap();
        a.exec(&[proxy, "init"]).unwrap();
    }
    let rules = a.exec(&["iptables", "-t", "nat", "-S"]).unwrap();
    assert_eq!(
        rules.matches("-A OUTPUT -p tcp -j CAPMESH_OUTPUT").count(),
        1,
        "{rules}"
    );
    assert_eq!(
        rules.matches("--to-ports 15001").count(),
        1,
        "a second init must replace the rules, not add to them:\n{rules}"
    );

    let agent_py = python_dir().join("agent.py");
    b.spawn(
        "provider agent",
        None,
        &[
            python.to_str().unwrap(),
            agent_py.to_str().unwrap(),
            "--host",
            "0.0.0.0",
            "--port",
            "8080",
            "--name",
            "weather",
            "--tools",
            "weather,caller",
        ],
        &path("agent.log"),
    )
    .unwrap();
    let sidecar = |agent: &str, token: &str, agent_url: &str, advertise: &str| -> Vec<String> {
        [
            proxy,
            "--agent-name",
            agent,
            "--agent-url",
            agent_url,
            "--control-plane",
            &format!("https://{CP_ADDR}"),
            "--control-plane-ca",
            &p("ca.pem"),
            "--bootstrap-token",
            token,
            "--advertise",
            advertise,
            "--dependency",
            "*",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let args = sidecar(
        "weather",
        &provider_token,
        "http://127.0.0.1:8080/mcp",
        "10.77.0.2:15006",
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    b.spawn(
        "provider sidecar",
        Some(PROXY_UID),
        &args,
        &path("b-proxy.log"),
    )
    .unwrap();

    // Pod a: the consumer's sidecar (it serves no tools) and, later, the client.
    let args = sidecar("planner", &consumer_token, "none", "10.77.0.1:15006");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    a.spawn(
        "consumer sidecar",
        Some(PROXY_UID),
        &args,
        &path("a-proxy.log"),
    )
    .unwrap();
    b.wait_ok(
        "http://127.0.0.1:15020/ready",
        "the provider's sidecar",
        &[&a],
    )
    .unwrap();
    a.wait_ok(
        "http://127.0.0.1:15020/ready",
        "the consumer's sidecar",
        &[&b],
    )
    .unwrap();

    // The client, unmodified: the provider's own address, no proxy settings.
    let client_py = python_dir().join("client.py");
    let url = "http://10.77.0.2:8080/mcp";
    let call = |url: &str, tool: &str, args: &str| -> Result<Value> {
        let out = a.exec_output(&[
            "timeout",
            "60",
            python.to_str().unwrap(),
            client_py.to_str().unwrap(),
            "--url",
            url,
            "--mode",
            "legacy",
            "call",
            tool,
            args,
        ])?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(stdout.trim()).with_context(|| {
            format!(
                "client.py printed no JSON ({}): {stdout}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })
    };
    // The consumer's snapshot may trail its /ready by one delta; allow a few seconds.
    let deadline = Instant::now() + Duration::from_secs(20);
    let whoami = loop {
        let v = call(url, "whoami", "{}").unwrap();
        if v.get("result_text").is_some() || Instant::now() > deadline {
            break v;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let Some(text) = whoami["result_text"].as_str() else {
        panic!(
            "the call through both sidecars failed: {whoami}\n{}{}",
            a.logs(),
            b.logs()
        );
    };
    let headers: Value = serde_json::from_str(text.trim_start_matches("weather: ")).unwrap();
    assert_eq!(
        headers["x-capmesh-caller"], "spiffe://capmesh.local/ns/default/agent/planner",
        "the provider must see the consumer's verified identity: {headers}"
    );
    let weather = call(url, "get_weather", r#"{"city":"Oslo"}"#).unwrap();
    assert_eq!(
        weather["result_text"], "weather: sunny in Oslo",
        "{weather}"
    );
    // By name, as in Kubernetes: `weather` resolves to an address no pod has (a Service's
    // virtual IP); the sidecar routes by the Host header to the agent of that name.
    let by_name = call(
        "http://weather.default.svc.cluster.local:8080/mcp",
        "get_weather",
        r#"{"city":"Bergen"}"#,
    )
    .unwrap();
    assert_eq!(
        by_name["result_text"],
        "weather: sunny in Bergen",
        "{by_name}\n{}",
        a.logs()
    );

    // Both sidecars carried it: the consumer's intercepted requests went to the mesh, and the
    // provider's sidecar accepted mutual-TLS connections.
    let a_metrics = a
        .exec(&["curl", "-s", "http://127.0.0.1:15020/metrics"])
        .unwrap();
    assert!(
        metric(
            &a_metrics,
            "capmesh_proxy_intercepted_total",
            "route=\"mesh\""
        ) >= 3.0,
        "{a_metrics}"
    );
    let b_metrics = b
        .exec(&["curl", "-s", "http://127.0.0.1:15020/metrics"])
        .unwrap();
    assert!(
        metric(
            &b_metrics,
            "capmesh_proxy_tls_handshakes_total",
            "mode=\"mtls\""
        ) >= 1.0,
        "{b_metrics}"
    );

    // Traffic that is not for the mesh still reaches its destination, relayed as it is.
    let outside = a.curl(None, "http://10.77.0.3:9999/outside.txt").unwrap();
    assert!(
        outside.status.success(),
        "{}",
        String::from_utf8_lossy(&outside.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&outside.stdout),
        "not part of the mesh\n"
    );
    let a_metrics = a
        .exec(&["curl", "-s", "http://127.0.0.1:15020/metrics"])
        .unwrap();
    assert!(
        metric(
            &a_metrics,
            "capmesh_proxy_intercepted_total",
            "route=\"direct\""
        ) >= 1.0,
        "{a_metrics}"
    );

    // Going around the client's sidecar (as the excluded UID) does not reach the agent either:
    // pod b's rules send it to the strict mutual-TLS listener, which refuses plain HTTP.
    let around = a
        .curl(Some(PROXY_UID), "http://10.77.0.2:8080/mcp")
        .unwrap();
    assert!(
        !around.status.success(),
        "plain HTTP around the mesh reached the agent: {}",
        String::from_utf8_lossy(&around.stdout)
    );
}

//! A sidecar's first moments, as a new user (or a Kubernetes probe) sees them: `/live` and
//! `/ready` answer before the certificate arrives and say what is missing and why; each wait
//! is logged once with its reason and fix; a wrong `--agent-url` is named within seconds;
//! `--version` is the proxy's; mesh settings set at the control plane reach running proxies.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use capmesh_certs::Ca;
use capmesh_tests::python::{PyAgent, client_json};
use capmesh_tests::{ProxyProcess, http_get, reserve_port, scrub_env, wait_ports_file};
use common::{Mesh, eventually};

/// `GET path` on the admin port, failing if there is no whole answer within `limit`.
async fn get_within(port: u16, path: &str, limit: Duration) -> (u16, String) {
    tokio::time::timeout(limit, http_get(port, path))
        .await
        .unwrap_or_else(|_| panic!("GET {path} did not answer within {limit:?}"))
        .unwrap()
}

#[tokio::test]
async fn live_answers_at_once_and_ready_says_why_while_no_control_plane_is_reachable() {
    // A trust bundle, and a control-plane address that nothing listens on (held closed).
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("capmesh.local".parse().unwrap(), false).unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.root_pem()).unwrap();
    let nowhere = reserve_port().unwrap();
    let log_path = dir.path().join("proxy.log");
    let ports_file = dir.path().join("ports.json");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = scrub_env(&mut Command::new(env!("CARGO_BIN_EXE_capmesh-proxy")))
        .args(["--agent-name", "weather", "--agent-url", "none"])
        .arg("--control-plane")
        .arg(format!("https://127.0.0.1:{}", nowhere.port()))
        .arg("--control-plane-ca")
        .arg(&ca_file)
        .args(["--bootstrap-token", "cmt_0000_unused"])
        .args(["--outbound", "127.0.0.1:0", "--inbound", "127.0.0.1:0"])
        .args(["--admin", "127.0.0.1:0", "--ports-file"])
        .arg(&ports_file)
        .env("RUST_LOG", "info")
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    let read_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let ports = wait_ports_file(&ports_file, &mut child, "capmesh-proxy", read_log)
        .await
        .unwrap();
    let admin = ports["admin"].port();

    // A liveness probe (2 s timeout in the charts) gets its answer at once, again and again.
    for _ in 0..5 {
        let (status, body) = get_within(admin, "/live", Duration::from_millis(100)).await;
        assert_eq!((status, body.as_str()), (200, "ok\n"));
    }
    // Readiness says what is missing and why: the certificate, because the control plane at
    // that address cannot be reached.
    let address = format!("127.0.0.1:{}", nowhere.port());
    let body = eventually_body(admin, |b| b.contains("certificate: cannot connect")).await;
    assert!(
        body.starts_with("not ready: ")
            && body.contains(&address)
            && body.contains("snapshot: ")
            && !body.contains("agent health"),
        "{body}"
    );
    let (status, metrics) = get_within(admin, "/metrics", Duration::from_secs(2)).await;
    assert_eq!(status, 503, "{metrics}");
    assert!(metrics.contains("starting"), "{metrics}");

    // The wait is logged at WARN once, with the address and the fix, not once per attempt.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let text = read_log();
    let warnings: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("waiting for the first certificate"))
        .collect();
    assert_eq!(warnings.len(), 1, "{text}");
    assert!(
        warnings[0].contains(&address) && warnings[0].contains("fix="),
        "{text}"
    );
    assert!(
        !text.contains("retry_in=") && !text.contains("Some("),
        "{text}"
    );

    // SIGTERM during the wait stops it cleanly.
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("no exit within 10 s of SIGTERM:\n{}", read_log());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}:\n{}", read_log());
}

/// The `/ready` body once `cond` holds (10 s at most).
async fn eventually_body(admin: u16, cond: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = get_within(admin, "/ready", Duration::from_secs(2)).await;
        if cond(&body) {
            assert_eq!(status, 503, "{body}");
            return body;
        }
        assert!(Instant::now() < deadline, "/ready never said it: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_wrong_agent_url_is_named_in_a_warning_within_5_s_and_in_ready() {
    let mesh = Mesh::new().await;
    let agent = PyAgent::start("alpha", &["weather"], None).await.unwrap();
    // The agent's address without its MCP path, the usual slip.
    let wrong = format!("http://127.0.0.1:{}/", agent.port);
    let token = mesh.cp.token("default", "alpha").await.unwrap();
    let started = Instant::now();
    let proxy = ProxyProcess::spawn(
        mesh.proxy_bin(),
        &mesh.cp,
        &token,
        "alpha",
        Some(&wrong),
        &[],
    )
    .await
    .unwrap();
    let warning = loop {
        let log = proxy.log();
        if let Some(line) = log
            .lines()
            .find(|l| l.contains("WARN") && l.contains(&wrong))
        {
            break line.to_owned();
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no warning naming {wrong} within 5 s:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        warning.contains("404") && warning.contains("--agent-url"),
        "{warning}"
    );
    let (status, body) = proxy.admin_get("/ready").await.unwrap();
    assert_eq!(status, 503);
    assert!(
        body.contains("agent registration: the agent at --agent-url")
            && body.contains(&wrong)
            && body.contains("404"),
        "{body}"
    );
}

#[test]
fn version_prints_the_proxys_own_version() {
    for flag in ["--version", "-V"] {
        let out = scrub_env(&mut Command::new(env!("CARGO_BIN_EXE_capmesh-proxy")))
            .arg(flag)
            .output()
            .unwrap();
        assert!(out.status.success(), "{flag}: {out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("capmesh-proxy {}\n", env!("CARGO_PKG_VERSION")),
            "{flag}"
        );
    }
}

#[tokio::test]
async fn mesh_settings_set_at_the_control_plane_reach_running_proxies() {
    let mesh = Mesh::new().await;
    let (_agent, _provider) = mesh.provider("alpha", &["caller"], &[]).await;
    // No --propagate-headers on the consumer: only the mesh settings can carry the header.
    let consumer = mesh.consumer("planner", &["whoami"], &[]).await;
    let tenant = [("x-tenant-id", "tenant-7")];
    let seen = || async {
        let (code, v) = client_json(
            &consumer.url(),
            "2026-07-28",
            &tenant,
            &["call", "whoami", "{}"],
        )
        .await
        .unwrap();
        assert_eq!(code, 0, "{v}");
        let seen: serde_json::Value =
            serde_json::from_str(v["result_text"].as_str().unwrap()).unwrap();
        seen["x-tenant-id"].clone()
    };
    assert!(seen().await.is_null(), "not propagated before the setting");

    let _: serde_json::Value = mesh
        .cp
        .rest()
        .unwrap()
        .put(
            "/v1/settings",
            &serde_json::json!({"propagate_headers": ["x-tenant-*"]}),
            Some(&mesh.cp.admin_token().unwrap()),
        )
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "the header is carried", || async {
        seen().await == "tenant-7"
    })
    .await;
    let (_, config) = consumer.admin_get("/config").await.unwrap();
    assert!(config.contains("x-tenant-*"), "{config}");
}

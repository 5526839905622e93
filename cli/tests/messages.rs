//! What users read never shows Rust's debug formatting (`Capability("x")`, `Some(..)`,
//! `SnapshotVersion(3)`): a mesh is taken through the situations that produce messages — bad
//! calls, no healthy endpoint, a denied call, a wrong agent URL, a dead agent, a control-plane
//! outage, CLI errors — and everything captured is searched: every line the MCP client and the
//! CLI printed, and every log line at INFO and above of the control plane and the sidecars.
//!
//! Messages on the proxy's request path are reworded by the request-path rewrite (issue 13);
//! until it lands this test names what is left there.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use capmesh_tests::python::{PyAgent, client_json};
use common::{Mesh, eventually};

/// What debug formatting looks like in a message.
const DEBUG_DUMPS: [&str; 3] = ["Capability(", "Some(", "SnapshotVersion("];

/// Lines of `text` that show debug formatting, labelled with where they came from.
fn dumps(label: &str, text: &str, only_logs_from_info: bool) -> Vec<String> {
    text.lines()
        .filter(|l| {
            !only_logs_from_info
                || [" INFO ", " WARN ", " ERROR "]
                    .iter()
                    .any(|lvl| l.contains(lvl))
        })
        .filter(|l| DEBUG_DUMPS.iter().any(|d| l.contains(d)))
        .map(|l| format!("{label}: {l}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_user_facing_message_or_log_line_shows_debug_formatting() {
    let mut mesh = Mesh::start(&["--grace", "1s"]).await;
    let (mut agent, provider) = mesh
        .provider("alpha", &["weather", "echo"], &["--tags", "fast"])
        .await;
    let consumer = mesh
        .consumer(
            "planner",
            &[
                "--dependency",
                "get_weather",
                "--dependency",
                "gpu_weather=get_weather:gpu",
                "--dependency",
                "echo",
            ],
        )
        .await;
    let mut seen: Vec<(String, String)> = Vec::new();
    let mut client =
        |label: &str, v: serde_json::Value| seen.push((label.to_owned(), v.to_string()));

    // What an MCP client reads: an unknown capability, a selector nothing matches, both
    // generations.
    for mode in ["legacy", "2026-07-28"] {
        let (_, v) = client_json(&consumer.url(), mode, &[], &["call", "teleport", "{}"])
            .await
            .unwrap();
        client(&format!("client {mode} unknown"), v);
        let (_, v) = client_json(
            &consumer.url(),
            mode,
            &[],
            &["call", "gpu_weather", r#"{"city":"Oslo"}"#],
        )
        .await
        .unwrap();
        client(&format!("client {mode} no match"), v);
    }
    // A call the policy denies (set first with a caller pattern that cannot match).
    let dir = mesh.home.path().to_owned();
    let bare = dir.join("bare.json");
    std::fs::write(
        &bare,
        r#"{"rules": [{"from": ["planner"], "capabilities": ["echo"], "action": "deny"}]}"#,
    )
    .unwrap();
    let mut cli: Vec<(String, common::Run)> = Vec::new();
    cli.push((
        "policy set (bare)".into(),
        mesh.capmesh(&["policy", "set", "-f", bare.to_str().unwrap()]),
    ));
    let deny = dir.join("deny.json");
    std::fs::write(
        &deny,
        r#"{"rules": [{"from": ["spiffe://capmesh.local/ns/default/agent/planner"], "capabilities": ["echo"], "action": "deny"}]}"#,
    )
    .unwrap();
    cli.push((
        "policy set".into(),
        mesh.capmesh(&["policy", "set", "-f", deny.to_str().unwrap()]),
    ));
    // The proxy hides a denied capability; a raw call still reaches the provider's check.
    let (_, v) = client_json(
        &consumer.url(),
        "legacy",
        &[],
        &["call", "echo", r#"{"text":"x"}"#],
    )
    .await
    .unwrap();
    client("client denied", v);

    // What the CLI prints, errors included.
    for args in [
        &["call", "teleport"][..],
        &[
            "call",
            "get_weather",
            "--args",
            r#"{"city":"Oslo"}"#,
            "--tags",
            "gpu",
        ],
        &["call", "get_weather", "--args", r#"{"city":"Oslo"}"#],
        &["status"],
        &["list"],
        &["list", "endpoints"],
        &["list", "capabilities"],
        &["token", "list"],
        &["settings", "get"],
        &["settings", "set", "--retry-budget", "150"],
        &["inject", "-f", "/nonexistent/app.yaml"],
    ] {
        cli.push((args.join(" "), mesh.capmesh(args)));
    }

    // A sidecar given the agent's address without its MCP path.
    let wrong_agent = PyAgent::start("beta", &["weather"], None).await.unwrap();
    let token = mesh.cp.token("default", "beta").await.unwrap();
    let wrong = mesh
        .sidecar(
            "beta",
            &format!("http://127.0.0.1:{}/", wrong_agent.port),
            &token,
        )
        .await;
    eventually(Duration::from_secs(10), "the wrong URL is reported", || {
        wrong.log().contains("WARN").then_some(())
    })
    .await;

    // The provider's agent dies: unhealthy, then no healthy endpoint.
    agent.kill();
    eventually(Duration::from_secs(30), "alpha reported unhealthy", || {
        provider.log().contains("agent is unhealthy").then_some(())
    })
    .await;
    let (_, v) = client_json(
        &consumer.url(),
        "2026-07-28",
        &[],
        &["call", "get_weather", r#"{"city":"Oslo"}"#],
    )
    .await
    .unwrap();
    client("client no healthy endpoint", v);
    // `capmesh status` says why, as the sidecar reported it.
    let status = eventually(Duration::from_secs(10), "status says why", || {
        let out = mesh.capmesh(&["status"]);
        out.stdout
            .contains("unhealthy: nothing accepts connections at --agent-url")
            .then_some(out)
    })
    .await;
    assert!(status.stdout.contains(&agent.url), "{status}");
    cli.push(("status (unhealthy)".into(), status));

    // A control-plane outage and its return.
    mesh.cp.stop().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    mesh.cp.restart().await.unwrap();
    eventually(Duration::from_secs(30), "the consumer reconnects", || {
        (consumer.log().matches("topology stream open").count() >= 2).then_some(())
    })
    .await;

    let mut found = Vec::new();
    for (label, text) in &seen {
        found.extend(dumps(label, text, false));
    }
    for (label, run) in &cli {
        found.extend(dumps(
            &format!("capmesh {label} (stdout)"),
            &run.stdout,
            false,
        ));
        found.extend(dumps(
            &format!("capmesh {label} (stderr)"),
            &run.stderr,
            false,
        ));
    }
    for (label, log) in [
        ("control plane log", mesh.cp.log()),
        ("alpha's sidecar log", provider.log()),
        ("planner's sidecar log", consumer.log()),
        ("beta's sidecar log", wrong.log()),
    ] {
        found.extend(dumps(label, &log, true));
    }
    assert!(
        found.is_empty(),
        "{} message(s) show Rust debug formatting:\n{}",
        found.len(),
        found.join("\n")
    );
}

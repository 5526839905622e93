//! Issue "Proxy outbound": a real MCP client calls the mesh through its own sidecar, in both
//! protocol generations; load is shared, the preferred provider fails over, and a control-plane
//! outage does not stop calls.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use capmesh_tests::ProxyProcess;
use capmesh_tests::python::{PyAgent, json_lines, spawn_client};
use common::{MODES, Mesh, call, served_by, tool_names};
use tokio::io::AsyncReadExt;

#[tokio::test]
async fn a_real_client_lists_and_calls_in_both_generations_with_live_progress() {
    let mesh = Mesh::new().await;
    let (_agent, _provider) = mesh.provider("alpha", &["weather", "slow"], &[]).await;
    let consumer = mesh
        .consumer("planner", &["get_weather", "slow_count"], &[])
        .await;

    for mode in MODES {
        assert_eq!(
            tool_names(&consumer, mode).await,
            ["get_weather", "slow_count"],
            "{mode}"
        );

        let (code, v) = call(&consumer, mode, "get_weather", r#"{"city":"Paris"}"#).await;
        assert_eq!(code, 0, "{mode}: {v}");
        assert_eq!(v["result_text"], "alpha: sunny in Paris", "{mode}");

        // Progress arrives while the tool runs: the first well before the result.
        let (code, v) = call(&consumer, mode, "slow_count", r#"{"n":4,"delay_ms":300}"#).await;
        assert_eq!(code, 0, "{mode}: {v}");
        assert_eq!(v["result_text"], "alpha: counted 4");
        let progress = v["progress"].as_array().unwrap();
        assert_eq!(progress.len(), 4, "{mode}: {v}");
        let first = progress[0]["elapsed_ms"].as_f64().unwrap();
        let result = v["result_elapsed_ms"].as_f64().unwrap();
        assert!(
            first + 500.0 < result,
            "{mode}: first progress at {first} ms, result at {result} ms: buffered?"
        );

        // Unknown capability: a JSON-RPC error naming it and what is known.
        let (code, v) = call(&consumer, mode, "teleport", "{}").await;
        assert_eq!(code, 1, "{mode}: {v}");
        let msg = v["error"].as_str().unwrap();
        assert!(
            msg.contains("\"teleport\"") && msg.contains("get_weather"),
            "{mode}: {msg}"
        );
    }
}

async fn serve_counts(
    consumer: &ProxyProcess,
    n: usize,
) -> std::collections::HashMap<String, usize> {
    let mut counts = std::collections::HashMap::new();
    for _ in 0..n {
        let (code, v) = call(consumer, "legacy", "get_weather", r#"{"city":"Oslo"}"#).await;
        assert_eq!(code, 0, "{v}");
        *counts
            .entry(served_by(v["result_text"].as_str().unwrap()).to_owned())
            .or_default() += 1;
    }
    counts
}

#[tokio::test]
async fn providers_share_load_and_the_preferred_one_fails_over_without_failed_calls() {
    let mesh = Mesh::new().await;
    let (mut fast_agent, mut fast_proxy) = mesh
        .provider("alpha", &["weather"], &["--tags", "fast"])
        .await;
    let (_slow_agent, _slow_proxy) = mesh
        .provider("beta", &["weather"], &["--tags", "slow"])
        .await;

    // No preference: both providers receive calls.
    let any = mesh.consumer("planner", &["get_weather"], &[]).await;
    let counts = serve_counts(&any, 16).await;
    assert!(
        counts.get("alpha").copied().unwrap_or(0) > 0
            && counts.get("beta").copied().unwrap_or(0) > 0,
        "{counts:?}"
    );

    // `+fast` preferred: every call goes to alpha.
    let picky = mesh.consumer("picky", &["get_weather:+fast"], &[]).await;
    let counts = serve_counts(&picky, 8).await;
    assert_eq!(counts.get("alpha"), Some(&8), "{counts:?}");

    // Steady calls every 50 ms; SIGKILL alpha (agent and sidecar) one second in.
    let mut looping = spawn_client(
        &picky.url(),
        "legacy",
        &[],
        &["loop", "get_weather", r#"{"city":"Rome"}"#, "80", "50"],
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let started = std::time::Instant::now();
    fast_proxy.kill();
    fast_agent.kill();
    let killed_at_ms = 1000.0 + started.elapsed().as_secs_f64() * 1000.0;
    let mut out = String::new();
    let mut stdout = looping.stdout.take().unwrap();
    tokio::time::timeout(Duration::from_secs(60), stdout.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    let lines = json_lines(&out).unwrap();
    assert_eq!(lines.len(), 80, "{out}");
    let mut moved_at = None;
    for line in &lines {
        let t = line["t_ms"].as_f64().unwrap();
        let ok = line["ok"].as_bool().unwrap();
        // Only a call in flight at the very moment of the kill may fail: it had reached alpha.
        if !ok {
            assert!(
                (t - killed_at_ms).abs() < 150.0,
                "a call failed at {t} ms, kill at {killed_at_ms} ms: {line}"
            );
        }
        if ok
            && t > killed_at_ms
            && served_by(line["text"].as_str().unwrap()) == "beta"
            && moved_at.is_none()
        {
            moved_at = Some(t - killed_at_ms);
        }
        if ok && t > killed_at_ms + 1000.0 {
            assert_eq!(
                served_by(line["text"].as_str().unwrap()),
                "beta",
                "still routed to the dead provider: {line}"
            );
        }
    }
    let failures = lines.iter().filter(|l| !l["ok"].as_bool().unwrap()).count();
    assert!(failures <= 1, "{failures} failed calls:\n{out}");
    let moved = moved_at.expect("no call moved to beta");
    eprintln!(
        "failover: {failures} failed of {} calls; first call served by beta {moved:.0} ms after the kill",
        lines.len()
    );
    assert!(
        moved < 1000.0,
        "calls moved to beta {moved} ms after the kill"
    );
}

#[tokio::test]
async fn a_control_plane_outage_does_not_stop_calls_and_the_mesh_converges_after() {
    let mut mesh = Mesh::new().await;
    let (_agent, _provider) = mesh.provider("alpha", &["weather"], &[]).await;
    let consumer = mesh
        .consumer("planner", &["get_weather", "echo"], &[])
        .await;
    assert_eq!(tool_names(&consumer, "legacy").await, ["get_weather"]);
    let gamma_token = mesh.cp.token("default", "gamma").await.unwrap();

    mesh.cp.stop().unwrap();
    for mode in MODES {
        let (code, v) = call(&consumer, mode, "get_weather", r#"{"city":"Lima"}"#).await;
        assert_eq!(
            (code, v["result_text"].as_str()),
            (0, Some("alpha: sunny in Lima")),
            "{mode} during the outage: {v}"
        );
    }
    // A provider started during the outage cannot register yet...
    let gamma_agent = PyAgent::start("gamma", &["echo"], None).await.unwrap();
    let mut gamma = ProxyProcess::spawn(
        mesh.proxy_bin(),
        &mesh.cp,
        &gamma_token,
        "gamma",
        Some(&gamma_agent.url),
        &[],
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (code, _) = call(&consumer, "legacy", "echo", r#"{"text":"hi"}"#).await;
    assert_eq!(code, 1, "echo cannot be known yet");

    // ...and is callable once the control plane is back: everyone reconnects and converges.
    // Meanwhile the restarted control plane must keep serving what it knew, so calls to the
    // old provider never fail, whatever order the proxies reconnect in.
    mesh.cp.restart().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (code, v) = call(&consumer, "legacy", "get_weather", r#"{"city":"Quito"}"#).await;
        assert_eq!(
            code, 0,
            "a call failed while the mesh converged after the restart: {v}"
        );
        let (code, v) = call(&consumer, "legacy", "echo", r#"{"text":"hi"}"#).await;
        if code == 0 {
            assert_eq!(v["result_text"], "gamma: hi");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "echo not callable 30 s after the restart: {v}"
        );
    }
    gamma.wait_ready(Duration::from_secs(30)).await.unwrap();
    let (code, v) = call(
        &consumer,
        "2026-07-28",
        "get_weather",
        r#"{"city":"Quito"}"#,
    )
    .await;
    assert_eq!(code, 0, "{v}");
}

/// A raw HTTP/1.1 POST to the outbound listener: (status, body).
fn post(port: u16, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
    let (status, _, body) = common::post_mcp(port, headers, body);
    (status, body)
}

#[tokio::test]
async fn bad_input_gets_json_rpc_errors_and_the_proxy_keeps_serving() {
    let mesh = Mesh::new().await;
    let (mut agent, _provider) = mesh.provider("alpha", &["weather"], &[]).await;
    let consumer = mesh.consumer("planner", &["get_weather"], &[]).await;
    let port = consumer.outbound;
    let modern = [
        ("content-type", "application/json"),
        ("accept", "application/json, text/event-stream"),
        ("mcp-protocol-version", "2026-07-28"),
        ("mcp-method", "tools/call"),
        ("mcp-name", "get_weather"),
    ];
    let code = |body: &str| {
        serde_json::from_str::<serde_json::Value>(body)
            .map(|v| v["error"]["code"].clone())
            .unwrap_or_default()
    };

    let (status, body) = tokio::task::spawn_blocking(move || post(port, &modern, b"{not json"))
        .await
        .unwrap();
    assert_eq!(
        (status, code(&body)),
        (400, serde_json::json!(-32700)),
        "{body}"
    );
    let (status, body) =
        tokio::task::spawn_blocking(move || post(port, &modern, br#"{"hello":"world"}"#))
            .await
            .unwrap();
    assert_eq!(
        (status, code(&body)),
        (400, serde_json::json!(-32600)),
        "{body}"
    );
    let mismatch = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"other","arguments":{},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}"#;
    let (status, body) = tokio::task::spawn_blocking(move || post(port, &modern, mismatch))
        .await
        .unwrap();
    assert_eq!(
        (status, code(&body)),
        (400, serde_json::json!(-32020)),
        "{body}"
    );
    let huge = vec![b' '; 5 * 1024 * 1024];
    let (status, _) = tokio::task::spawn_blocking(move || post(port, &modern, &huge))
        .await
        .unwrap();
    assert_eq!(status, 413);

    // Still serving.
    let (code_ok, v) = call(&consumer, "2026-07-28", "get_weather", r#"{"city":"Riga"}"#).await;
    assert_eq!(code_ok, 0, "{v}");

    // The only provider's agent dies (its sidecar lives on and reports it unhealthy): the
    // capability is known but has no healthy endpoint, which is a 503 saying so.
    agent.kill();
    let good = br#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"get_weather","arguments":{"city":"Riga"},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}"#;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = tokio::task::spawn_blocking(move || post(port, &modern, good))
            .await
            .unwrap();
        if status == 503 && code(&body) == serde_json::json!(-32004) {
            assert!(body.contains("no healthy endpoint"), "{body}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never a 503 for a dead provider: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (status, _) = consumer.admin_get("/live").await.unwrap();
    assert_eq!(status, 200);
}

//! Issue "Proxy inbound": identity and headers reaching the agent, strict mTLS, revocation,
//! authorization, registration of an unmodified agent, and graceful shutdown.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use capmesh_api::rest::Entity;
use capmesh_certs::tls::{client_config, connect};
use capmesh_certs::{Ca, Credential, CredentialCell, TrustStore};
use capmesh_tests::python::{PyAgent, client_json, json_lines, spawn_client};
use capmesh_tests::{ProxyProcess, issue_workload, spiffe};
use common::{MODES, Mesh, call, eventually, served_by, set_policy, tool_names};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn whoami(v: &Value) -> Value {
    serde_json::from_str(v["result_text"].as_str().unwrap()).unwrap()
}

#[tokio::test]
async fn the_agent_sees_the_verified_caller_and_only_allow_listed_headers() {
    let mesh = Mesh::new().await;
    let (_agent, _provider) = mesh.provider("alpha", &["caller"], &[]).await;
    let consumer = mesh
        .consumer(
            "planner",
            &["whoami"],
            &["--propagate-headers", "x-tenant-id"],
        )
        .await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let headers = [
        ("x-tenant-id", "tenant-7"),
        ("x-secret", "do-not-forward"),
        (
            "x-capmesh-caller",
            "spiffe://capmesh.local/ns/default/agent/admin",
        ),
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
    ];
    for mode in MODES {
        let (code, v) = client_json(&consumer.url(), mode, &headers, &["call", "whoami", "{}"])
            .await
            .unwrap();
        assert_eq!(code, 0, "{mode}: {v}");
        let seen = whoami(&v);
        assert_eq!(
            seen["x-capmesh-caller"], "spiffe://capmesh.local/ns/default/agent/planner",
            "{mode}: forged? {seen}"
        );
        assert_eq!(seen["x-tenant-id"], "tenant-7", "{mode}");
        assert!(
            seen["x-secret"].is_null(),
            "{mode}: a header off the allow-list crossed: {seen}"
        );
        let tp = seen["traceparent"].as_str().unwrap();
        assert!(tp.contains(trace), "{mode}: trace id lost: {tp}");
        assert!(
            !tp.contains("00f067aa0ba902b7"),
            "{mode}: each hop has its own span id: {tp}"
        );
        let host = seen["host"].as_str().unwrap();
        assert!(
            host.starts_with("127.0.0.1:"),
            "{mode}: Host not rewritten: {host}"
        );
    }
}

/// The partner entity's workload identity (in the entity's own trust domain).
const PARTNER: &str = "spiffe://acme.example/ns/default/agent/partner";

/// A ten-minute credential for `id` from `ca`.
fn credential(ca: &Ca, id: &capmesh_certs::SpiffeId) -> Credential {
    let (chain, key) = issue_workload(ca, id, Duration::from_secs(600)).unwrap();
    Credential::with_key(&chain, &key).unwrap()
}

/// An `initialize` over mutual TLS with `cred` to the provider's inbound port (Err when the
/// handshake or the connection was refused).
async fn tls_request(
    port: u16,
    trust: Arc<TrustStore>,
    cred: Credential,
) -> std::io::Result<String> {
    common::tls_initialize(port, trust, Arc::new(CredentialCell::new(cred)), "alpha").await
}

#[tokio::test]
async fn strict_mode_refuses_plaintext_foreign_cas_and_revoked_entities() {
    let mesh = Mesh::new().await;
    let (_agent, provider) = mesh.provider("alpha", &["weather"], &[]).await;

    // Plaintext against strict: no HTTP answer at all.
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", provider.inbound))
        .await
        .unwrap();
    tcp.write_all(b"POST /mcp HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut out)).await;
    assert!(
        !String::from_utf8_lossy(&out).contains("HTTP/1.1"),
        "plaintext got an answer: {:?}",
        String::from_utf8_lossy(&out)
    );

    // A certificate from a CA the mesh does not trust.
    let trust = mesh.cp.trust().unwrap();
    let stranger = Ca::generate("capmesh.local".parse().unwrap(), false).unwrap();
    let issue = |ca: &Ca, who: &str| credential(ca, &spiffe("default", who).unwrap());
    let refused = tls_request(provider.inbound, trust.clone(), issue(&stranger, "planner")).await;
    assert!(
        refused.is_err(),
        "a foreign CA's certificate got an answer: {refused:?}"
    );
    // The same request with a mesh certificate is answered, so the refusal above is the CA's.
    let ok = tls_request(
        provider.inbound,
        trust.clone(),
        mesh.cp.credential("default", "planner").await.unwrap(),
    )
    .await;
    assert!(
        ok.as_ref().is_ok_and(|r| r.starts_with("HTTP/1.1 200")),
        "{ok:?}"
    );

    // An entity's certificates work once registered (for its own trust domain only), and stop
    // within 1 s of its revocation.
    let token = mesh.cp.admin_token().unwrap();
    let rest = mesh.cp.rest().unwrap();
    let acme = Ca::generate("acme.example".parse().unwrap(), false).unwrap();
    common::register_entity(&mesh, "acme", "acme.example", acme.root_pem().into()).await;
    let partner = || credential(&acme, &PARTNER.parse().unwrap());
    eventually(
        Duration::from_secs(10),
        "acme's certificate accepted",
        || async {
            tls_request(provider.inbound, trust.clone(), partner())
                .await
                .is_ok_and(|r| r.contains("200 OK"))
        },
    )
    .await;
    // The same CA minting an identity in the mesh's trust domain is refused: an entity speaks
    // only for its own domain.
    let (cert, key, _) = acme.export_pem();
    let forger = Ca::from_pem("capmesh.local".parse().unwrap(), &cert, &key, None).unwrap();
    let forged = tls_request(provider.inbound, trust.clone(), issue(&forger, "planner")).await;
    assert!(
        forged.is_err(),
        "an entity-minted mesh identity got an answer: {forged:?}"
    );
    let _: Entity = rest
        .delete("/v1/entities/acme", Some(&token))
        .await
        .unwrap();
    let revoked_at = Instant::now();
    loop {
        let r = tls_request(provider.inbound, trust.clone(), partner()).await;
        if r.is_err() {
            break;
        }
        assert!(
            revoked_at.elapsed() < Duration::from_secs(1),
            "still accepted {:?} after revocation",
            revoked_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "revoked entity refused {:?} after DELETE /v1/entities/acme returned",
        revoked_at.elapsed()
    );
    // The refusal is counted once the handshake has failed on the proxy's side, which may be a
    // moment after the client saw the alert (the connection's worker and the admin listener are
    // different threads).
    let counted = |metrics: &str, reason: &str| {
        metrics.contains(&format!(
            "capmesh_proxy_tls_refusals_total{{reason=\"{reason}\"}}"
        ))
    };
    let reasons = [
        "plaintext",
        "unknown_ca",
        "revoked_entity",
        "trust_domain_mismatch",
    ];
    eventually(Duration::from_secs(2), "every refusal counted", || async {
        let (_, metrics) = provider.admin_get("/metrics").await.unwrap();
        let missing: Vec<_> = reasons.iter().filter(|r| !counted(&metrics, r)).collect();
        if !missing.is_empty() {
            eprintln!("not counted yet: {missing:?} in\n{metrics}");
        }
        missing.is_empty()
    })
    .await;
}

/// The `capmesh_proxy_tls_handshakes_total{kind="mtls"}` count of a proxy.
async fn mtls_handshakes(proxy: &ProxyProcess) -> u64 {
    let (_, metrics) = proxy.admin_get("/metrics").await.unwrap();
    metrics
        .lines()
        .find(|l| l.starts_with("capmesh_proxy_tls_handshakes_total") && l.contains("mtls"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_revoked_entity_is_refused_on_the_pooled_connection_it_already_holds() {
    let mesh = Mesh::new().await;
    let (_agent, provider) = mesh.provider("alpha", &["weather"], &[]).await;
    // A partner whose sidecar's certificate comes from its own CA, registered as an entity.
    let token = mesh.cp.admin_token().unwrap();
    let rest = mesh.cp.rest().unwrap();
    let acme = Ca::generate("acme.example".parse().unwrap(), false).unwrap();
    common::register_entity(&mesh, "acme", "acme.example", acme.root_pem().into()).await;
    let dir = tempfile::tempdir().unwrap();
    // The partner's identity is in its own trust domain (its CA may issue no other).
    let (chain, key) =
        issue_workload(&acme, &PARTNER.parse().unwrap(), Duration::from_secs(3600)).unwrap();
    let (cert, key_file) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert, chain).unwrap();
    std::fs::write(&key_file, key.to_pem()).unwrap();
    let (cert, key_file) = (cert.display().to_string(), key_file.display().to_string());
    let mut partner = ProxyProcess::spawn(
        mesh.proxy_bin(),
        &mesh.cp,
        "unused-with-files",
        "partner",
        None,
        &[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key_file,
            "--dependency",
            "get_weather",
        ],
    )
    .await
    .unwrap();
    partner.wait_ready(Duration::from_secs(30)).await.unwrap();

    // Calls go over one pooled HTTP/2 connection from the partner's sidecar to alpha's.
    for _ in 0..5 {
        let (code, v) = call(&partner, "2026-07-28", "get_weather", r#"{"city":"Oslo"}"#).await;
        assert_eq!(code, 0, "{v}");
    }
    let handshakes = mtls_handshakes(&provider).await;

    let _: Entity = rest
        .delete("/v1/entities/acme", Some(&token))
        .await
        .unwrap();
    let revoked_at = Instant::now();
    // The first call refused is refused on the pooled connection: alpha either answers it 403
    // (the peer is re-verified on every request) or has already closed the connection (a
    // connection whose peer stops being trusted is closed within a second).
    let first = loop {
        let (code, v) = call(&partner, "2026-07-28", "get_weather", r#"{"city":"Oslo"}"#).await;
        if code != 0 {
            break v.to_string();
        }
        assert!(
            revoked_at.elapsed() < Duration::from_secs(10),
            "the revoked partner's calls still pass"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        (first.contains("no longer trusted") && first.contains("revoked entity"))
            || first.contains("agent/alpha"),
        "{first}"
    );
    // From then on nothing passes: a new connection is refused at the handshake.
    let mut messages = vec![first];
    for _ in 0..5 {
        let (code, v) = call(&partner, "2026-07-28", "get_weather", r#"{"city":"Oslo"}"#).await;
        assert_ne!(code, 0, "a call passed after the revocation: {v}");
        messages.push(v.to_string());
    }
    // Every refusal is the mesh's own, and none may have run: a 403 on the pooled connection,
    // or a connection alpha closed or never accepted (503, not retried as a failure).
    assert!(
        messages
            .iter()
            .all(|m| m.contains("\"http_status\":403") || m.contains("\"http_status\":503")),
        "{messages:#?}"
    );
    // Refused on the connection it already held, and never let in again: alpha completed no
    // new handshake.
    assert_eq!(
        mtls_handshakes(&provider).await,
        handshakes,
        "the revoked partner got a new connection"
    );
    let (_, metrics) = provider.admin_get("/metrics").await.unwrap();
    assert!(
        metrics.contains("capmesh_proxy_tls_refusals_total{reason=\"revoked_entity\"}"),
        "{metrics}"
    );
    eprintln!(
        "revoked entity refused on its open connection {:?} after DELETE /v1/entities/acme returned",
        revoked_at.elapsed()
    );
}

#[tokio::test]
async fn a_deny_rule_blocks_the_call_and_hides_the_capability() {
    let mesh = Mesh::new().await;
    let (_agent, provider) = mesh.provider("alpha", &["weather", "echo"], &[]).await;
    let consumer = mesh
        .consumer("planner", &["get_weather", "echo"], &[])
        .await;
    assert_eq!(
        tool_names(&consumer, "legacy").await,
        ["echo", "get_weather"]
    );

    let policy = serde_json::json!({
        "default": "allow",
        "rules": [{ "from": ["spiffe://capmesh.local/ns/default/agent/planner"], "capabilities": ["get_weather"], "action": "deny" }]
    });
    set_policy(&mesh, policy).await;
    eventually(
        Duration::from_secs(10),
        "get_weather leaves the consumer's tools/list",
        || async { tool_names(&consumer, "legacy").await == ["echo"] },
    )
    .await;
    let (code, v) = call(&consumer, "legacy", "echo", r#"{"text":"still fine"}"#).await;
    assert_eq!(
        (code, v["result_text"].as_str()),
        (0, Some("alpha: still fine")),
        "{v}"
    );

    // Even a caller that goes around its own proxy's list is stopped at the provider: 403 with
    // a JSON-RPC error naming the caller and the capability.
    let cred = mesh.cp.credential("default", "planner").await.unwrap();
    let config = client_config(
        Some(Arc::new(CredentialCell::new(cred))),
        mesh.cp.trust().unwrap(),
        spiffe("default", "alpha").unwrap(),
        &[b"http/1.1"],
    )
    .unwrap();
    let body = r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"get_weather","arguments":{"city":"X"}}}"#;
    // The mesh's own call path, and the agent's own path as transparent mode forwards it.
    for path in ["/.capmesh/call", "/mcp"] {
        let mut tls = connect(
            config.clone(),
            tokio::net::TcpStream::connect(("127.0.0.1", provider.inbound))
                .await
                .unwrap(),
        )
        .await
        .unwrap();
        let req = format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\naccept: application/json, text/event-stream\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        tls.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        tls.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 403"), "{path}: {out}");
        assert!(
            out.contains("agent/planner") && out.contains("get_weather") && out.contains("-32003"),
            "{path}: {out}"
        );
    }
    let (_, metrics) = provider.admin_get("/metrics").await.unwrap();
    assert!(
        metrics.contains(
            "capmesh_proxy_inbound_requests_total{capability=\"get_weather\",outcome=\"denied\"} 2"
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_unmodified_agent_joins_by_its_sidecar_and_new_tools_reach_running_consumers() {
    let mesh = Mesh::new().await;
    // The agent restarts on the same port below: the port is held for the whole test, so
    // nothing else can take it in between.
    let held = capmesh_tests::reserve_port().unwrap();
    let port = held.port();
    let mut agent = PyAgent::start("alpha", &["weather"], Some(port))
        .await
        .unwrap();
    let provider = ProxyProcess::start(mesh.proxy_bin(), &mesh.cp, "alpha", Some(&agent.url), &[])
        .await
        .unwrap();
    let consumer = mesh.consumer("planner", &["*"], &[]).await;
    assert_eq!(tool_names(&consumer, "legacy").await, ["get_weather"]);
    let (code, v) = call(&consumer, "2026-07-28", "get_weather", r#"{"city":"Kyiv"}"#).await;
    assert_eq!(
        (code, served_by(v["result_text"].as_str().unwrap())),
        (0, "alpha"),
        "{v}"
    );

    // A consumer that keeps one session open and watches for list changes.
    let mut watcher = spawn_client(&consumer.url(), "legacy", &[], &["watch", "25"]).unwrap();

    // The agent restarts with one more tool; nothing else restarts.
    agent.kill();
    let agent = PyAgent::start("alpha", &["weather", "echo"], Some(port))
        .await
        .unwrap();
    eventually(
        Duration::from_secs(20),
        "echo in the running consumer's tools/list",
        || async {
            tool_names(&consumer, "legacy")
                .await
                .contains(&"echo".to_owned())
        },
    )
    .await;
    let (code, v) = call(&consumer, "legacy", "echo", r#"{"text":"new"}"#).await;
    assert_eq!(
        (code, v["result_text"].as_str()),
        (0, Some("alpha: new")),
        "{v}"
    );
    drop(agent);
    drop(provider);

    let _ = watcher.kill().await;
    let mut out = String::new();
    let _ = watcher
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .await;
    let lines = json_lines(&out).unwrap();
    assert!(
        lines.iter().any(|l| l["event"] == "list_changed"
            && l["tools"].as_array().unwrap().iter().any(|t| t == "echo")),
        "the watching client was never told: {out}"
    );
}

#[tokio::test]
async fn sigterm_to_a_provider_sidecar_during_steady_calls_fails_no_call() {
    let mesh = Mesh::new().await;
    let (_a, mut alpha) = mesh.provider("alpha", &["weather"], &[]).await;
    let (_b, _beta) = mesh.provider("beta", &["weather"], &[]).await;
    let consumer = mesh.consumer("planner", &["get_weather"], &[]).await;

    let mut looping = spawn_client(
        &consumer.url(),
        "legacy",
        &[],
        &["loop", "get_weather", r#"{"city":"Bern"}"#, "60", "50"],
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let stop = tokio::task::spawn_blocking(move || alpha.terminate());
    let mut out = String::new();
    tokio::time::timeout(
        Duration::from_secs(60),
        looping.stdout.take().unwrap().read_to_string(&mut out),
    )
    .await
    .unwrap()
    .unwrap();
    stop.await.unwrap().unwrap();
    let lines = json_lines(&out).unwrap();
    assert_eq!(lines.len(), 60, "{out}");
    let failed: Vec<&Value> = lines
        .iter()
        .filter(|l| !l["ok"].as_bool().unwrap())
        .collect();
    assert!(
        failed.is_empty(),
        "calls failed during the graceful shutdown: {failed:?}"
    );
    let last = lines.last().unwrap()["text"].as_str().unwrap();
    assert_eq!(served_by(last), "beta", "{last}");
}

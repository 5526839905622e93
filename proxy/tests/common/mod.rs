//! A small mesh for end-to-end tests: the real control plane, real `capmesh-proxy` sidecars,
//! real Python MCP agents (PyPI `mcp` 2.3.0) and the real Python MCP client.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::Duration;

use capmesh_tests::python::{PyAgent, client_json};
use capmesh_tests::{ControlPlane, ProxyProcess, workspace_bin};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const MODES: [&str; 2] = ["legacy", "2026-07-28"];

pub struct Mesh {
    pub cp: ControlPlane,
    proxy_bin: PathBuf,
}

impl Mesh {
    pub async fn new() -> Self {
        let cp_bin = workspace_bin("capmesh-control-plane").unwrap();
        let cp = ControlPlane::start(&cp_bin, &["--grace", "2s"])
            .await
            .unwrap();
        Self {
            cp,
            proxy_bin: env!("CARGO_BIN_EXE_capmesh-proxy").into(),
        }
    }

    pub fn proxy_bin(&self) -> &std::path::Path {
        &self.proxy_bin
    }

    /// A Python agent offering `tools`, and its sidecar registered as `name`.
    pub async fn provider(
        &self,
        name: &str,
        tools: &[&str],
        extra: &[&str],
    ) -> (PyAgent, ProxyProcess) {
        let agent = PyAgent::start(name, tools, None).await.unwrap();
        let proxy = ProxyProcess::start(&self.proxy_bin, &self.cp, name, Some(&agent.url), extra)
            .await
            .unwrap();
        (agent, proxy)
    }

    /// A consumer's sidecar (`--agent-url none`) with these `--dependency` values.
    pub async fn consumer(&self, name: &str, deps: &[&str], extra: &[&str]) -> ProxyProcess {
        let mut args: Vec<&str> = Vec::new();
        for d in deps {
            args.push("--dependency");
            args.push(d);
        }
        args.extend_from_slice(extra);
        ProxyProcess::start(&self.proxy_bin, &self.cp, name, None, &args)
            .await
            .unwrap()
    }
}

/// Replaces the mesh's authorization policy (as the admin).
pub async fn set_policy(mesh: &Mesh, policy: Value) {
    let policy: capmesh_api::Policy = serde_json::from_value(policy).unwrap();
    let _: capmesh_api::Policy = mesh
        .cp
        .rest()
        .unwrap()
        .put(
            "/v1/policies",
            &policy,
            Some(&mesh.cp.admin_token().unwrap()),
        )
        .await
        .unwrap();
}

/// `client.py call` through `proxy`; returns (exit code, JSON).
pub async fn call(proxy: &ProxyProcess, mode: &str, tool: &str, args: &str) -> (i32, Value) {
    client_json(&proxy.url(), mode, &[], &["call", tool, args])
        .await
        .unwrap()
}

/// `client.py list` through `proxy`: the tool names.
pub async fn tool_names(proxy: &ProxyProcess, mode: &str) -> Vec<String> {
    let (code, v) = client_json(&proxy.url(), mode, &[], &["list"])
        .await
        .unwrap();
    assert_eq!(code, 0, "{v}");
    v.as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect()
}

/// Polls `cond` every 200 ms until it holds or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Which agent served a text like "alpha: sunny in Paris".
pub fn served_by(text: &str) -> &str {
    text.split(':').next().unwrap_or("")
}

/// One raw HTTP/1.1 POST to `/mcp` on `port`: (status, response head lowercased, body).
/// Blocking; run it in `spawn_blocking`.
pub fn post_mcp(port: u16, headers: &[(&str, &str)], body: &[u8]) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut head = format!(
        "POST /mcp HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    tcp.write_all(head.as_bytes()).unwrap();
    // A refused oversized body may be answered before it is all sent.
    let _ = tcp.write_all(body);
    let mut out = Vec::new();
    let _ = tcp.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (status, head.to_ascii_lowercase(), body.to_owned())
}

/// Eight 2026-07-28 calls of `consult` (the agent asks the client for a sample, then answers
/// with it) at `url`; each must come back answered by alpha or beta after exactly one sampling
/// round trip. Returns which instances served.
pub async fn consult_rounds(url: &str) -> std::collections::BTreeSet<String> {
    let mut served = std::collections::BTreeSet::new();
    for round in 0..8 {
        let (code, v) = client_json(
            url,
            "2026-07-28",
            &[],
            &[
                "--sample-reply",
                "seven",
                "call",
                "consult",
                r#"{"question":"how many days in a week?"}"#,
            ],
        )
        .await
        .unwrap();
        assert_eq!(code, 0, "round {round}: {v}");
        let text = v["result_text"].as_str().unwrap();
        assert!(
            text == "alpha: seven" || text == "beta: seven",
            "round {round}: {v}"
        );
        assert_eq!(
            v["sampling"].as_array().unwrap().len(),
            1,
            "round {round}: {v}"
        );
        served.insert(served_by(text).to_owned());
    }
    served
}

/// Registers an entity (a partner organisation's CA for `trust_domain`), as the admin.
pub async fn register_entity(mesh: &Mesh, name: &str, trust_domain: &str, ca_pem: String) {
    let _: capmesh_api::rest::Entity = mesh
        .cp
        .rest()
        .unwrap()
        .post(
            "/v1/entities",
            &capmesh_api::rest::EntityRequest {
                name: name.into(),
                trust_domain: trust_domain.parse().unwrap(),
                ca_pem,
            },
            Some(&mesh.cp.admin_token().unwrap()),
        )
        .await
        .unwrap();
}

/// A mutual-TLS connection to a provider sidecar's inbound `port` as `cred` (HTTP/1.1), which
/// expects the sidecar of `provider`; `Err` when the connection or the handshake was refused.
pub async fn tls_to(
    port: u16,
    trust: std::sync::Arc<capmesh_certs::TrustStore>,
    cred: std::sync::Arc<capmesh_certs::CredentialCell>,
    provider: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let config = capmesh_certs::tls::client_config(
        Some(cred),
        trust,
        capmesh_tests::spiffe("default", provider).unwrap(),
        &[b"http/1.1"],
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    capmesh_certs::tls::connect(config, tcp).await
}

/// An `initialize` POSTed to `/mcp` over [`tls_to`]; the whole response text.
pub async fn tls_initialize(
    port: u16,
    trust: std::sync::Arc<capmesh_certs::TrustStore>,
    cred: std::sync::Arc<capmesh_certs::CredentialCell>,
    provider: &str,
) -> std::io::Result<String> {
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
    let req = format!(
        "POST /mcp HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\naccept: application/json, text/event-stream\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut tls = tls_to(port, trust, cred, provider).await?;
    tls.write_all(req.as_bytes()).await?;
    let mut out = String::new();
    tls.read_to_string(&mut out).await?;
    Ok(out)
}

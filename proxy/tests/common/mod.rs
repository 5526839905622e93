//! A small mesh for end-to-end tests: the real control plane, real `capmesh-proxy` sidecars,
//! real Python MCP agents (PyPI `mcp` 2.3.0) and the real Python MCP client.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::Duration;

use capmesh_tests::python::{PyAgent, client_json};
use capmesh_tests::{ControlPlane, ProxyProcess, workspace_bin};
use serde_json::Value;

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

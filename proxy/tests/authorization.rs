//! Issue "The request path as composed tower stacks": the holes the old request path had,
//! tried against the real binaries with real MCP peers.
//!
//! * a caller allowed one tool of an agent cannot call another through passthrough;
//! * a denied tool called on the agent's own path with `"id": 1.0` never reaches an rmcp agent;
//! * a second caller can neither use nor end the first caller's session, nor answer the
//!   requests the agent sends the first caller.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use capmesh_certs::CredentialCell;
use capmesh_tests::{ProxyProcess, workspace_bin};
use common::{Mesh, set_policy};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const INIT: &str = r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{"sampling":{}},"clientInfo":{"name":"t","version":"1"}}}"#;
const INITIALIZED: &str = r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// A response as the test reads it: status, headers, and the body read whole.
struct Answer {
    status: u16,
    session: Option<String>,
    body: String,
}

/// One request to `http://127.0.0.1:{port}{path}` with the MCP headers, read whole.
async fn send(port: u16, method: &str, path: &str, session: Option<&str>, body: &str) -> Answer {
    let resp = client()
        .request(request(port, method, path, session, body))
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let session = resp
        .headers()
        .get("mcp-session-id")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        session,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

fn request(
    port: u16,
    method: &str,
    path: &str,
    session: Option<&str>,
    body: &str,
) -> http::Request<Full<Bytes>> {
    let mut b = http::Request::builder()
        .method(method)
        .uri(format!("http://127.0.0.1:{port}{path}"))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2025-11-25");
    if let Some(s) = session {
        b = b.header("mcp-session-id", s);
    }
    b.body(Full::new(Bytes::from(body.to_owned()))).unwrap()
}

/// Opens a legacy session at `path` and returns its id.
async fn open(port: u16, path: &str) -> String {
    let init = send(port, "POST", path, None, INIT).await;
    assert_eq!(init.status, 200, "{}", init.body);
    let id = init.session.unwrap();
    let done = send(port, "POST", path, Some(&id), INITIALIZED).await;
    assert_eq!(done.status, 202, "{}", done.body);
    id
}

fn call(id: &str, tool: &str, args: Value) -> String {
    json!({ "jsonrpc": "2.0", "id": 0, "method": "tools/call", "params": { "name": tool, "arguments": args } })
        .to_string()
        .replacen("\"id\":0", &format!("\"id\":{id}"), 1)
}

fn deny(caller: &str, capability: &str) -> Value {
    json!({
        "default": "allow",
        "rules": [{
            "from": [format!("spiffe://capmesh.local/ns/default/agent/{caller}")],
            "capabilities": [capability],
            "action": "deny"
        }]
    })
}

#[tokio::test]
async fn passthrough_opened_for_an_allowed_capability_cannot_call_a_denied_tool_of_the_agent() {
    let mesh = Mesh::new().await;
    let (_agent, provider) = mesh.provider("alpha", &["weather", "echo"], &[]).await;
    let consumer = mesh.consumer("planner", &["echo"], &[]).await;
    set_policy(&mesh, deny("planner", "get_weather")).await;
    let path = "/capabilities/echo/mcp";
    let session = open(consumer.outbound, path).await;

    // The capability the conversation was opened for works…
    let ok = send(
        consumer.outbound,
        "POST",
        path,
        Some(&session),
        &call("1", "echo", json!({"text": "hi"})),
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert!(ok.body.contains("alpha: hi"), "{}", ok.body);

    // …but another tool of the same agent is checked against its own capability, whatever the
    // id looks like, and the policy has the last word.
    for id in ["2", "2.0", "\"x\""] {
        // The policy reaches the provider's sidecar within a snapshot; poll briefly.
        let mut denied = None;
        for _ in 0..50 {
            let r = send(
                consumer.outbound,
                "POST",
                path,
                Some(&session),
                &call(id, "get_weather", json!({"city": "Paris"})),
            )
            .await;
            if r.status == 403 {
                denied = Some(r);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let r = denied.unwrap_or_else(|| panic!("id {id}: never refused"));
        let v: Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["error"]["code"], -32003, "{}", r.body);
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("agent/planner may not call capability \"get_weather\""),
            "{}",
            r.body
        );
        assert!(!r.body.contains("sunny"), "the agent ran it: {}", r.body);
    }
    let (_, metrics) = provider.admin_get("/metrics").await.unwrap();
    assert!(
        metrics.contains(
            "capmesh_proxy_inbound_requests_total{capability=\"get_weather\",outcome=\"denied\"} 3"
        ),
        "{metrics}"
    );
}

/// Starts `capmesh agent all` (rmcp: chat, get_weather, search_flights) on a free port.
async fn rmcp_agent() -> (tokio::process::Child, String) {
    let mut child = tokio::process::Command::new(workspace_bin("capmesh-example-agent").unwrap())
        .args(["all", "--port", "0", "--name", "alpha"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let port: u16 = line.strip_prefix("READY ").unwrap().trim().parse().unwrap();
    (child, format!("http://127.0.0.1:{port}/mcp"))
}

/// One HTTP/1.1 POST over mutual TLS with `cred` to `port` (as a peer proxy, or transparent
/// mode, sends it); returns the whole response text.
async fn tls_post(
    mesh: &Mesh,
    cred: &Arc<CredentialCell>,
    port: u16,
    path: &str,
    session: Option<&str>,
    body: &str,
) -> String {
    let mut tls = common::tls_to(port, mesh.cp.trust().unwrap(), cred.clone(), "alpha")
        .await
        .unwrap();
    let session = session
        .map(|s| format!("mcp-session-id: {s}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\naccept: application/json, text/event-stream\r\nmcp-protocol-version: 2025-11-25\r\n{session}content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    tls.read_to_string(&mut out).await.unwrap();
    out
}

fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    let head = response.split("\r\n\r\n").next()?;
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[tokio::test]
async fn a_denied_tool_called_on_the_agents_own_path_with_a_float_id_never_reaches_an_rmcp_agent() {
    let mesh = Mesh::new().await;
    let (_agent, url) = rmcp_agent().await;
    let provider = ProxyProcess::start(mesh.proxy_bin(), &mesh.cp, "alpha", Some(&url), &[])
        .await
        .unwrap();
    set_policy(&mesh, deny("planner", "search_flights")).await;
    let planner = Arc::new(CredentialCell::new(
        mesh.cp.credential("default", "planner").await.unwrap(),
    ));
    // What transparent mode sends: the agent's own path, over mutual TLS as the caller.
    let init = tls_post(&mesh, &planner, provider.inbound, "/mcp", None, INIT).await;
    assert!(init.starts_with("HTTP/1.1 200"), "{init}");
    let session = header(&init, "mcp-session-id").unwrap().to_owned();
    let done = tls_post(
        &mesh,
        &planner,
        provider.inbound,
        "/mcp",
        Some(&session),
        INITIALIZED,
    )
    .await;
    assert!(done.starts_with("HTTP/1.1 202"), "{done}");

    // rmcp reads "id": 1.0 as a request id: an allowed tool runs with it…
    let weather = call("1.0", "get_weather", json!({"city": "Paris"}));
    let ok = tls_post(
        &mesh,
        &planner,
        provider.inbound,
        "/mcp",
        Some(&session),
        &weather,
    )
    .await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(ok.contains("in Paris"), "{ok}");

    // …so the mesh must read it the same way: the denied tool is refused before the agent.
    let mut refused = None;
    for _ in 0..50 {
        let flights = call(
            "1.0",
            "search_flights",
            json!({"origin": "Berlin", "destination": "Lisbon", "date": "2026-12-24"}),
        );
        let r = tls_post(
            &mesh,
            &planner,
            provider.inbound,
            "/mcp",
            Some(&session),
            &flights,
        )
        .await;
        if r.starts_with("HTTP/1.1 403") {
            refused = Some(r);
            break;
        }
        assert!(
            !r.contains("cheapest"),
            "the policy is in force and the agent ran the denied tool: {r}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = refused.expect("search_flights never refused");
    assert!(r.contains("-32003") && r.contains("search_flights"), "{r}");
    assert!(!r.contains("cheapest"), "{r}");
}

#[tokio::test]
async fn a_second_caller_can_neither_use_nor_end_the_first_callers_session() {
    let mesh = Mesh::new().await;
    let (_agent, _provider) = mesh.provider("alpha", &["echo"], &[]).await;
    let first = mesh.consumer("planner", &["echo"], &[]).await;
    let second = mesh.consumer("intruder", &["echo"], &[]).await;
    let path = "/capabilities/echo/mcp";
    let session = open(first.outbound, path).await;
    let list = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#;

    // The intruder holds the first caller's session id (it leaked): its own sidecar opens it,
    // but the provider's sidecar sealed the agent's session for the first caller only.
    let used = send(second.outbound, "POST", path, Some(&session), list).await;
    assert_eq!(used.status, 404, "{}", used.body);
    assert!(!used.body.contains("echo"), "{}", used.body);
    let ended = send(second.outbound, "DELETE", path, Some(&session), "").await;
    assert_eq!(ended.status, 404, "{}", ended.body);

    // The first caller's session is untouched.
    let mine = send(first.outbound, "POST", path, Some(&session), list).await;
    assert_eq!(mine.status, 200, "{}", mine.body);
    assert!(mine.body.contains("echo"), "{}", mine.body);
    assert_eq!(mine.session.as_deref(), Some(session.as_str()));
}

#[tokio::test]
async fn a_second_caller_cannot_answer_the_requests_an_agent_sends_the_first() {
    let mesh = Mesh::new().await;
    let (_agent, _provider) = mesh.provider("alpha", &["ask"], &[]).await;
    let first = mesh.consumer("planner", &["ask"], &[]).await;
    let second = mesh.consumer("intruder", &["ask"], &[]).await;
    let mine = open(first.outbound, "/mcp").await;
    let theirs = open(second.outbound, "/mcp").await;

    // The first caller's call: the agent asks its client for a sample on the call's stream.
    let resp = client()
        .request(request(
            first.outbound,
            "POST",
            "/mcp",
            Some(&mine),
            &call("5", "ask", json!({"question": "which colour?"})),
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut seen = String::new();
    let asked = loop {
        let frame = tokio::time::timeout(Duration::from_secs(20), body.frame())
            .await
            .expect("no sampling request on the stream")
            .unwrap()
            .unwrap();
        if let Some(data) = frame.data_ref() {
            seen.push_str(&String::from_utf8_lossy(data));
        }
        let request = seen.lines().find_map(|l| {
            let v: Value = serde_json::from_str(l.strip_prefix("data: ")?).ok()?;
            (v["method"] == "sampling/createMessage").then_some(v)
        });
        if let Some(v) = request {
            break v;
        }
    };
    let id = asked["id"].clone();
    let answer = |text: &str| {
        json!({ "jsonrpc": "2.0", "id": id, "result": {
            "role": "assistant", "content": { "type": "text", "text": text }, "model": "m"
        }})
        .to_string()
    };

    // The intruder learns the id and answers first: refused, and the agent never sees it.
    let forged = send(
        second.outbound,
        "POST",
        "/mcp",
        Some(&theirs),
        &answer("intruder"),
    )
    .await;
    assert_eq!(forged.status, 400, "{}", forged.body);
    assert!(
        forged.body.contains("answers no request"),
        "{}",
        forged.body
    );

    // The first caller's own answer completes its call.
    let real = send(first.outbound, "POST", "/mcp", Some(&mine), &answer("teal")).await;
    assert!(real.status == 200 || real.status == 202, "{}", real.body);
    let rest = tokio::time::timeout(Duration::from_secs(20), body.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    seen.push_str(&String::from_utf8_lossy(&rest));
    assert!(seen.contains("alpha: teal"), "{seen}");
    assert!(!seen.contains("intruder"), "{seen}");
}

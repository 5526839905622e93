//! The federated endpoint (`/mcp`) with peers from both SDKs: a sessionless TypeScript SDK v2
//! server (npm) and a Python `mcp` 2.3.0 server behind their sidecars serve one consumer in both
//! protocol generations; JSON-RPC batches only for 2025-03-26 sessions.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use capmesh_tests::ProxyProcess;
use capmesh_tests::node::NodeServer;
use common::{MODES, Mesh, call, tool_names};

#[tokio::test]
async fn a_ts_sdk_v2_server_and_a_python_server_serve_one_consumer_in_both_generations() {
    let mesh = Mesh::new().await;
    let ts = NodeServer::ts_sdk("ts").await.unwrap();
    let _ts_proxy = ProxyProcess::start(mesh.proxy_bin(), &mesh.cp, "ts", Some(&ts.url), &[])
        .await
        .unwrap();
    let (_py, _py_proxy) = mesh.provider("py", &["weather"], &[]).await;
    let consumer = mesh.consumer("planner", &["*"], &[]).await;

    common::eventually(Duration::from_secs(20), "both providers listed", || {
        let c = &consumer;
        async move {
            let mut names = tool_names(c, "legacy").await;
            names.sort();
            names == ["get_weather", "shout"]
        }
    })
    .await;
    for mode in MODES {
        let mut names = tool_names(&consumer, mode).await;
        names.sort();
        assert_eq!(names, ["get_weather", "shout"], "{mode}");
        let (code, v) = call(&consumer, mode, "shout", r#"{"text":"hello mesh"}"#).await;
        assert_eq!(
            (code, v["result_text"].as_str()),
            (0, Some("ts: HELLO MESH")),
            "{mode}: {v}"
        );
        let (code, v) = call(&consumer, mode, "get_weather", r#"{"city":"Oslo"}"#).await;
        assert_eq!(
            (code, v["result_text"].as_str()),
            (0, Some("py: sunny in Oslo")),
            "{mode}: {v}"
        );
    }
}

/// One HTTP/1.1 POST to `/mcp`: (status, response headers, body).
fn post(port: u16, headers: &[(&str, &str)], body: &[u8]) -> (u16, String, String) {
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
    tcp.write_all(body).unwrap();
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

fn session_of(head: &str) -> String {
    head.lines()
        .find_map(|l| l.strip_prefix("mcp-session-id: "))
        .unwrap()
        .trim()
        .to_owned()
}

#[tokio::test]
async fn batches_are_served_only_in_sessions_negotiated_at_2025_03_26() {
    let mesh = Mesh::new().await;
    let (_agent, _provider) = mesh.provider("alpha", &["weather"], &[]).await;
    let consumer = mesh.consumer("planner", &["get_weather"], &[]).await;
    let port = consumer.outbound;
    let base = [
        ("content-type", "application/json"),
        ("accept", "application/json, text/event-stream"),
    ];
    let batch = br#"[{"jsonrpc":"2.0","id":7,"method":"ping"},{"jsonrpc":"2.0","id":8,"method":"tools/call","params":{"name":"get_weather","arguments":{"city":"Bern"}}}]"#;

    for (version, allowed) in [
        ("2025-03-26", true),
        ("2025-06-18", false),
        ("2025-11-25", false),
    ] {
        let init = format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"initialize","params":{{"protocolVersion":"{version}","capabilities":{{}},"clientInfo":{{"name":"raw","version":"0"}}}}}}"#
        );
        let (status, head, body) =
            tokio::task::spawn_blocking(move || post(port, &base, init.as_bytes()))
                .await
                .unwrap();
        assert_eq!(status, 200, "{body}");
        assert!(
            body.contains(&format!("\"protocolVersion\":\"{version}\"")),
            "{body}"
        );
        let session = session_of(&head);
        // Without MCP-Protocol-Version (which a 2025-03-26 client does not send): only the
        // session knows its version.
        let (status, _, body) = tokio::task::spawn_blocking(move || {
            let mut h = base.to_vec();
            h.push(("mcp-session-id", &session));
            post(port, &h, batch)
        })
        .await
        .unwrap();
        if allowed {
            assert_eq!(status, 200, "{version}: {body}");
            let answers: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(answers[0]["id"], 7, "{body}");
            assert_eq!(answers[1]["id"], 8, "{body}");
            assert_eq!(
                answers[1]["result"]["content"][0]["text"], "alpha: sunny in Bern",
                "{body}"
            );
        } else {
            assert_eq!(status, 400, "{version}: {body}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["error"]["code"], -32600, "{body}");
            assert!(body.contains("2025-03-26"), "{body}");
        }
    }
    // 2026-07-28: never.
    let modern = [
        ("content-type", "application/json"),
        ("accept", "application/json, text/event-stream"),
        ("mcp-protocol-version", "2026-07-28"),
    ];
    let (status, _, body) = tokio::task::spawn_blocking(move || post(port, &modern, batch))
        .await
        .unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("-32600"), "{body}");
}

//! The federated endpoint (`/mcp`) with peers from both SDKs: a sessionless TypeScript SDK v2
//! server (npm) and a Python `mcp` 2.3.0 server behind their sidecars serve one consumer in both
//! protocol generations; providers' requests to the client (sampling) with ids the mesh gives
//! them, answered back to the provider that asked; cancellation per generation; JSON-RPC batches
//! only for 2025-03-26 sessions.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use capmesh_tests::ProxyProcess;
use capmesh_tests::node::NodeServer;
use capmesh_tests::python::client_json;
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
            tokio::task::spawn_blocking(move || common::post_mcp(port, &base, init.as_bytes()))
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
            common::post_mcp(port, &h, batch)
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
    let (status, _, body) =
        tokio::task::spawn_blocking(move || common::post_mcp(port, &modern, batch))
            .await
            .unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("-32600"), "{body}");
}

#[tokio::test]
async fn providers_requests_reach_the_client_and_its_answers_reach_the_provider_that_asked() {
    let mesh = Mesh::new().await;
    let (_a, _pa) = mesh
        .provider("alpha", &["ask"], &["--capability", "ask=ask_alpha"])
        .await;
    let (_b, _pb) = mesh
        .provider("beta", &["ask"], &["--capability", "ask=ask_beta"])
        .await;
    let consumer = mesh.consumer("planner", &["*"], &[]).await;
    common::eventually(Duration::from_secs(20), "both providers listed", || {
        let c = &consumer;
        async move {
            let mut names = tool_names(c, "legacy").await;
            names.sort();
            names == ["ask_alpha", "ask_beta"]
        }
    })
    .await;

    let mut ids = Vec::new();
    for (tool, agent) in [("ask_alpha", "alpha"), ("ask_beta", "beta")] {
        let (code, v) = client_json(
            &consumer.url(),
            "legacy",
            &[],
            &[
                "--sample-reply",
                &format!("forty-two for {agent}"),
                "call",
                tool,
                r#"{"question":"what is six times seven?"}"#,
            ],
        )
        .await
        .unwrap();
        assert_eq!(code, 0, "{tool}: {v}");
        // The provider's sampling request reached the client's handler...
        let sampling = v["sampling"].as_array().unwrap();
        assert_eq!(sampling.len(), 1, "{v}");
        assert_eq!(
            sampling[0]["messages"][0], "what is six times seven?",
            "{v}"
        );
        // ...under an id the mesh gave it...
        let id = sampling[0]["id"].as_str().unwrap().to_owned();
        assert!(id.starts_with("capmesh-"), "{id}");
        ids.push(id);
        // ...and the client's answer reached the agent that asked.
        assert_eq!(
            v["result_text"].as_str(),
            Some(format!("{agent}: forty-two for {agent}").as_str()),
            "{v}"
        );
    }
    // Both agents numbered their first request to the client alike; the client saw two ids.
    assert_ne!(ids[0], ids[1]);

    // An answer whose id the mesh did not give (or that was altered): refused, not forwarded.
    let port = consumer.outbound;
    let base = [
        ("content-type", "application/json"),
        ("accept", "application/json, text/event-stream"),
    ];
    let (_, head, _) = tokio::task::spawn_blocking(move || common::post_mcp(port, &base, INIT))
        .await
        .unwrap();
    let session = session_of(&head);
    let mut forged = ids[0].clone();
    forged.pop();
    forged.push(if ids[0].ends_with('A') { 'B' } else { 'A' });
    let answer = format!(
        r#"{{"jsonrpc":"2.0","id":"{forged}","result":{{"role":"assistant","content":{{"type":"text","text":"x"}},"model":"m"}}}}"#
    );
    let (status, _, body) = tokio::task::spawn_blocking(move || {
        let mut h = base.to_vec();
        h.push(("mcp-session-id", &session));
        h.push(("mcp-protocol-version", "2025-11-25"));
        common::post_mcp(port, &h, answer.as_bytes())
    })
    .await
    .unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("answers no request"), "{body}");
}

const INIT: &[u8] = br#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"raw","version":"0"}}}"#;

/// POSTs to `/mcp` and reads the response until `marker` shows up; returns the open connection
/// and what was read.
fn stream_until(
    port: u16,
    headers: &[(&str, &str)],
    body: &[u8],
    marker: &str,
) -> (std::net::TcpStream, String) {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut head = format!(
        "POST /mcp HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    tcp.write_all(head.as_bytes()).unwrap();
    tcp.write_all(body).unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(marker) {
        let n = tcp.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "stream ended before {marker:?}: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    (tcp, String::from_utf8_lossy(&seen).into_owned())
}

const SLOW: &str = r#"{"jsonrpc":"2.0","id":"c-1","method":"tools/call","params":{"name":"slow_count","arguments":{"n":40,"delay_ms":250},"_meta":{"progressToken":"p1"}}}"#;

#[tokio::test]
async fn cancellation_follows_each_generation() {
    let mesh = Mesh::new().await;
    let (agent, _provider) = mesh.provider("alpha", &["slow"], &[]).await;
    let consumer = mesh.consumer("planner", &["slow_count"], &[]).await;
    let port = consumer.outbound;
    let cancelled = |agent: &capmesh_tests::python::PyAgent| {
        agent.stderr().matches("CANCELLED slow_count").count()
    };
    let legacy = [
        ("content-type", "application/json"),
        ("accept", "application/json, text/event-stream"),
    ];
    let (_, head, _) = tokio::task::spawn_blocking(move || common::post_mcp(port, &legacy, INIT))
        .await
        .unwrap();
    let session = session_of(&head);

    // 2025: the client going away does not cancel the call...
    let s = session.clone();
    let (tcp, _) = tokio::task::spawn_blocking(move || {
        let mut h = legacy.to_vec();
        h.push(("mcp-session-id", &s));
        h.push(("mcp-protocol-version", "2025-11-25"));
        stream_until(port, &h, SLOW.as_bytes(), "notifications/progress")
    })
    .await
    .unwrap();
    drop(tcp);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(cancelled(&agent), 0, "{}", agent.stderr());

    // ...notifications/cancelled does, sent to the provider under the id it knows.
    let s = session.clone();
    let (tcp, _) = tokio::task::spawn_blocking(move || {
        let mut h = legacy.to_vec();
        h.push(("mcp-session-id", &s));
        h.push(("mcp-protocol-version", "2025-11-25"));
        stream_until(
            port,
            &h,
            SLOW.replace("c-1", "c-2").as_bytes(),
            "notifications/progress",
        )
    })
    .await
    .unwrap();
    let s = session.clone();
    let (status, _, body) = tokio::task::spawn_blocking(move || {
        let mut h = legacy.to_vec();
        h.push(("mcp-session-id", &s));
        h.push(("mcp-protocol-version", "2025-11-25"));
        common::post_mcp(
            port,
            &h,
            br#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":"c-2","reason":"changed my mind"}}"#,
        )
    })
    .await
    .unwrap();
    assert_eq!(status, 202, "{body}");
    common::eventually(Duration::from_secs(10), "the 2025 call cancelled", || {
        let n = cancelled(&agent);
        async move { n == 1 }
    })
    .await;
    drop(tcp);

    // 2026-07-28: closing the stream is the cancellation.
    let modern_call = SLOW.replace(
        r#""_meta":{"progressToken":"p1"}"#,
        r#""_meta":{"progressToken":"p1","io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}"#,
    );
    let (tcp, _) = tokio::task::spawn_blocking(move || {
        let h = [
            ("content-type", "application/json"),
            ("accept", "application/json, text/event-stream"),
            ("mcp-protocol-version", "2026-07-28"),
            ("mcp-method", "tools/call"),
            ("mcp-name", "slow_count"),
        ];
        stream_until(port, &h, modern_call.as_bytes(), "notifications/progress")
    })
    .await
    .unwrap();
    drop(tcp);
    common::eventually(
        Duration::from_secs(10),
        "the 2026-07-28 call cancelled",
        || {
            let n = cancelled(&agent);
            async move { n == 2 }
        },
    )
    .await;
}

#[tokio::test]
async fn a_2026_input_required_retry_returns_to_the_instance_that_asked() {
    let mesh = Mesh::new().await;
    // Two instances of one capability; each seals its requestState with a key of its own.
    let (_a, _pa) = mesh.provider("alpha", &["consult"], &[]).await;
    let (_b, _pb) = mesh.provider("beta", &["consult"], &[]).await;
    let consumer = mesh.consumer("planner", &["consult"], &[]).await;
    common::eventually(Duration::from_secs(20), "both instances registered", || {
        let admin = consumer.admin;
        async move {
            capmesh_tests::http_get(admin, "/config")
                .await
                .is_ok_and(|(_, c)| c.matches("consult").count() >= 1)
        }
    })
    .await;
    let served = common::consult_rounds(&consumer.url()).await;
    println!("served by {served:?}");

    // A requestState the mesh did not seal: -32602, and the provider never sees it.
    let port = consumer.outbound;
    let forged = br#"{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"consult","arguments":{"question":"q"},"requestState":"capmesh-bm90IHNlYWxlZCBieSB0aGUgbWVzaA","_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{"sampling":{}}}}}"#;
    let (status, _, body) = tokio::task::spawn_blocking(move || {
        let h = [
            ("content-type", "application/json"),
            ("accept", "application/json, text/event-stream"),
            ("mcp-protocol-version", "2026-07-28"),
            ("mcp-method", "tools/call"),
            ("mcp-name", "consult"),
        ];
        common::post_mcp(port, &h, forged)
    })
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], -32602, "{body}");
    assert!(body.contains("call again without"), "{body}");
}

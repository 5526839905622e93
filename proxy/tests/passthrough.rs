//! Passthrough (`/capabilities/<capability>/mcp`): the whole MCP conversation goes unchanged to
//! one provider instance, with sealed session ids for session affinity; real Python agents
//! behind real sidecars, the real Python client and raw HTTP.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use capmesh_tests::ProxyProcess;
use capmesh_tests::python::client_json;
use common::{MODES, Mesh};

fn passthrough_url(consumer: &ProxyProcess, capability: &str) -> String {
    format!(
        "http://127.0.0.1:{}/capabilities/{capability}/mcp",
        consumer.outbound
    )
}

#[tokio::test]
async fn a_real_client_gets_the_providers_own_tools_and_live_progress_in_both_generations() {
    let mesh = Mesh::new().await;
    let (_a, _pa) = mesh.provider("alpha", &["weather", "slow"], &[]).await;
    let (_b, _pb) = mesh.provider("beta", &["weather", "slow"], &[]).await;
    let consumer = mesh.consumer("planner", &["*"], &[]).await;
    let url = passthrough_url(&consumer, "get_weather");

    for mode in MODES {
        // The provider's own tool list, unrenamed: slow_count too, though the path names
        // get_weather.
        let (code, v) = client_json(&url, mode, &[], &["list"]).await.unwrap();
        assert_eq!(code, 0, "{mode}: {v}");
        let mut names: Vec<&str> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["get_weather", "slow_count"], "{mode}");

        let (code, v) = client_json(
            &url,
            mode,
            &[],
            &["call", "get_weather", r#"{"city":"Paris"}"#],
        )
        .await
        .unwrap();
        assert_eq!(code, 0, "{mode}: {v}");
        let text = v["result_text"].as_str().unwrap();
        assert!(
            text == "alpha: sunny in Paris" || text == "beta: sunny in Paris",
            "{mode}: {text}"
        );

        let (code, v) = client_json(
            &url,
            mode,
            &[],
            &["call", "slow_count", r#"{"n":4,"delay_ms":300}"#],
        )
        .await
        .unwrap();
        assert_eq!(code, 0, "{mode}: {v}");
        assert!(
            v["result_text"].as_str().unwrap().ends_with(": counted 4"),
            "{mode}: {v}"
        );
        let progress = v["progress"].as_array().unwrap();
        assert_eq!(progress.len(), 4, "{mode}: {v}");
        let first = progress[0]["elapsed_ms"].as_f64().unwrap();
        let result = v["result_elapsed_ms"].as_f64().unwrap();
        assert!(
            first + 500.0 < result,
            "{mode}: first progress at {first} ms, result at {result} ms: buffered?"
        );
    }

    // An unknown capability: 404 naming it.
    let port = consumer.outbound;
    let r = tokio::task::spawn_blocking(move || {
        http(
            port,
            "POST",
            "/capabilities/teleport/mcp",
            &legacy_headers(None),
            INITIALIZE,
        )
    })
    .await
    .unwrap();
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(r.body.contains("\"teleport\""), "{}", r.body);

    // The mesh's session key is shown nowhere.
    let (status, config) = consumer.admin_get("/config").await.unwrap();
    assert_eq!(status, 200);
    assert!(!config.contains("session_key"), "{config}");
    let topology: serde_json::Value = mesh
        .cp
        .rest()
        .unwrap()
        .get("/v1/topology", Some(&mesh.cp.admin_token().unwrap()))
        .await
        .unwrap();
    assert!(
        topology["settings"].get("session_key").is_none(),
        "{topology}"
    );
}

const INITIALIZE: &[u8] = br#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"raw","version":"0"}}}"#;
const INITIALIZED: &[u8] = br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;
const LIST: &[u8] = br#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#;
const CALL: &[u8] = br#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"get_weather","arguments":{"city":"Oslo"}}}"#;

fn legacy_headers(session: Option<&str>) -> Vec<(String, String)> {
    let mut h = vec![
        ("content-type".to_owned(), "application/json".to_owned()),
        (
            "accept".to_owned(),
            "application/json, text/event-stream".to_owned(),
        ),
    ];
    if let Some(s) = session {
        h.push(("mcp-session-id".into(), s.into()));
        h.push(("mcp-protocol-version".into(), "2025-11-25".into()));
    }
    h
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request on a fresh connection, read to the end (bounded by a 10 s read timeout).
fn http(port: u16, method: &str, path: &str, headers: &[(String, String)], body: &[u8]) -> Reply {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nconnection: close\r\ncontent-length: {}\r\n",
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
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Reply {
        status,
        headers,
        body: body.to_owned(),
    }
}

async fn http_async(
    port: u16,
    method: &'static str,
    path: String,
    session: Option<String>,
    body: &'static [u8],
) -> Reply {
    tokio::task::spawn_blocking(move || {
        http(
            port,
            method,
            &path,
            &legacy_headers(session.as_deref()),
            body,
        )
    })
    .await
    .unwrap()
}

/// `initialize` + `notifications/initialized` through passthrough: the sealed id and who
/// served it.
async fn open_session(port: u16, path: &str) -> (String, String) {
    let r = http_async(port, "POST", path.to_owned(), None, INITIALIZE).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("\"protocolVersion\""), "{}", r.body);
    let id = r.header("mcp-session-id").unwrap().to_owned();
    let served_by = r.header("x-capmesh-served-by").unwrap().to_owned();
    let r = http_async(port, "POST", path.to_owned(), Some(id.clone()), INITIALIZED).await;
    assert_eq!(r.status, 202, "{}", r.body);
    (id, served_by)
}

fn is_upstream_style(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

#[tokio::test]
async fn sessions_are_sealed_tamper_proof_and_end_with_delete() {
    let mesh = Mesh::new().await;
    let (_a, _pa) = mesh.provider("alpha", &["weather", "slow"], &[]).await;
    let consumer = mesh.consumer("planner", &["*"], &[]).await;
    let port = consumer.outbound;
    let path = "/capabilities/get_weather/mcp".to_owned();

    let (id, _) = open_session(port, &path).await;
    assert!(!is_upstream_style(&id), "the agent's own id leaked: {id}");
    assert!(id.len() > 32, "{id}");
    assert!(
        id.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "not base64url: {id}"
    );

    let r = http_async(port, "POST", path.clone(), Some(id.clone()), LIST).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.body.contains("get_weather") && r.body.contains("slow_count"),
        "{}",
        r.body
    );
    // The same session comes back under the same id.
    assert_eq!(r.header("mcp-session-id"), Some(id.as_str()));

    // One character changed: not ours, answered at once.
    let mid = id.len() / 2;
    let flipped = if &id[mid..=mid] == "A" { "B" } else { "A" };
    let tampered = format!("{}{flipped}{}", &id[..mid], &id[mid + 1..]);
    let r = http_async(port, "POST", path.clone(), Some(tampered), LIST).await;
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(r.body.contains("unknown or tampered session"), "{}", r.body);
    let r = http_async(
        port,
        "POST",
        path.clone(),
        Some("7e270f7bb85847899070920791e16e47".into()),
        LIST,
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.body);
    // Sealed for another capability: no use on this one.
    let r = http_async(
        port,
        "POST",
        "/capabilities/slow_count/mcp".into(),
        Some(id.clone()),
        LIST,
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.body);

    let r = http_async(port, "POST", path.clone(), Some(id.clone()), CALL).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("alpha: sunny in Oslo"), "{}", r.body);

    let r = http_async(port, "DELETE", path.clone(), Some(id.clone()), b"").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = http_async(port, "POST", path.clone(), Some(id.clone()), LIST).await;
    assert_eq!(r.status, 404, "{}", r.body);
}

#[tokio::test]
async fn a_session_on_a_killed_instance_is_404_at_once_and_a_new_one_lands_elsewhere() {
    let mesh = Mesh::new().await;
    let mut alpha = mesh.provider("alpha", &["weather"], &[]).await;
    let mut beta = mesh.provider("beta", &["weather"], &[]).await;
    let consumer = mesh.consumer("planner", &["*"], &[]).await;
    let port = consumer.outbound;
    let path = "/capabilities/get_weather/mcp".to_owned();

    let (id, served_by) = open_session(port, &path).await;
    let (victim, survivor) = if served_by.contains("alpha") {
        ("alpha", "beta")
    } else {
        assert!(served_by.contains("beta"), "{served_by}");
        ("beta", "alpha")
    };
    // Affinity: every call of the session goes to the same instance.
    for _ in 0..4 {
        let r = http_async(port, "POST", path.clone(), Some(id.clone()), CALL).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(
            r.body.contains(&format!("{victim}: sunny in Oslo")),
            "{}",
            r.body
        );
    }

    let (agent, sidecar) = if victim == "alpha" {
        (&mut alpha.0, &mut alpha.1)
    } else {
        (&mut beta.0, &mut beta.1)
    };
    agent.kill();
    sidecar.kill();

    let t0 = Instant::now();
    let r = http_async(port, "POST", path.clone(), Some(id.clone()), CALL).await;
    let took = t0.elapsed();
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(took < Duration::from_secs(5), "took {took:?}");

    let (id2, served_by) = open_session(port, &path).await;
    assert!(served_by.contains(survivor), "{served_by}");
    let r = http_async(port, "POST", path.clone(), Some(id2), CALL).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.body.contains(&format!("{survivor}: sunny in Oslo")),
        "{}",
        r.body
    );
}

#[tokio::test]
async fn a_2026_input_required_retry_through_passthrough_returns_to_the_instance_that_asked() {
    let mesh = Mesh::new().await;
    // Two instances of one capability; each seals its requestState with a key of its own.
    let (_a, _pa) = mesh.provider("alpha", &["consult"], &[]).await;
    let (_b, _pb) = mesh.provider("beta", &["consult"], &[]).await;
    let consumer = mesh.consumer("planner", &["consult"], &[]).await;
    let url = passthrough_url(&consumer, "consult");
    let served = common::consult_rounds(&url).await;
    println!("served by {served:?}");
}

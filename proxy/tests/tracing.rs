//! Issue "See the mesh": a planner → provider call through two sidecars yields a client and a
//! server span of one trace with the right parent/child link and the MCP attributes, exported
//! over OTLP/HTTP to a real receiver (OpenTelemetry's own protobuf definitions, in Python);
//! with the receiver down, calls are unaffected and the drop counter rises. The same spans
//! reach the control plane's window (`GET /v1/traces/{id}`).

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Stdio;
use std::time::Duration;

use capmesh_api::{SpanKind, Trace};
use capmesh_tests::python::{client_json, venv};
use common::{Mesh, eventually};
use serde_json::Value;
use tokio::io::AsyncBufReadExt;
use tokio::sync::Mutex;

/// The receiver: a child process printing one JSON line per span it decoded.
struct Receiver {
    child: tokio::process::Child,
    port: u16,
    spans: std::sync::Arc<Mutex<Vec<Value>>>,
    _dir: tempfile::TempDir,
}

impl Receiver {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port_file = dir.path().join("port.json");
        let python = tokio::task::spawn_blocking(venv).await.unwrap().unwrap();
        let script = capmesh_tests::python::python_dir().join("otlp_receiver.py");
        let mut child = tokio::process::Command::new(python)
            .arg(script)
            .arg("--port-file")
            .arg(&port_file)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let spans = std::sync::Arc::new(Mutex::new(Vec::new()));
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let sink = spans.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                sink.lock().await.push(serde_json::from_str(&line).unwrap());
            }
        });
        let mut port = None;
        for _ in 0..100 {
            if let Ok(text) = std::fs::read_to_string(&port_file) {
                let v: Value = serde_json::from_str(&text).unwrap();
                port = Some(v["port"].as_u64().unwrap() as u16);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Self {
            child,
            port: port.expect("the OTLP receiver did not start within 10 s"),
            spans,
            _dir: dir,
        }
    }

    async fn of_trace(&self, trace: &str) -> Vec<Value> {
        self.spans
            .lock()
            .await
            .iter()
            .filter(|s| s["trace_id"] == trace)
            .cloned()
            .collect()
    }
}

fn dropped(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("capmesh_proxy_spans_dropped_total{") && l.contains("sink=\"otlp\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test]
async fn a_call_through_two_sidecars_is_one_trace_of_a_client_and_a_server_span() {
    let receiver = Receiver::start().await;
    let otlp = format!("http://127.0.0.1:{}", receiver.port);
    let mesh = Mesh::new().await;
    let tracing = ["--otlp-endpoint", otlp.as_str(), "--trace-sampling", "1"];
    let (_agent, _provider) = mesh
        .provider("weather", &["weather", "caller"], &tracing)
        .await;
    let consumer = mesh.consumer("planner", &["*"], &tracing).await;

    // The planner agent sends its own (sampled) context, as an instrumented agent would.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let agent_span = "00f067aa0ba902b7";
    let tp = format!("00-{trace}-{agent_span}-01");
    let (code, v) = client_json(
        &consumer.url(),
        "2026-07-28",
        &[("traceparent", tp.as_str())],
        &["call", "whoami", "{}"],
    )
    .await
    .unwrap();
    assert_eq!(code, 0, "{v}");
    let seen: Value = serde_json::from_str(v["result_text"].as_str().unwrap()).unwrap();
    let agent_saw = seen["traceparent"].as_str().unwrap().to_owned();

    eventually(
        Duration::from_secs(10),
        "two spans of the trace at the receiver",
        || async { receiver.of_trace(trace).await.len() >= 2 },
    )
    .await;
    let spans = receiver.of_trace(trace).await;
    // OTLP span kinds: 2 = SERVER, 3 = CLIENT.
    let client = spans.iter().find(|s| s["kind"] == 3).unwrap();
    let server = spans.iter().find(|s| s["kind"] == 2).unwrap();
    assert_eq!(
        client["parent_span_id"], agent_span,
        "the client span continues the agent's"
    );
    assert_eq!(
        server["parent_span_id"], client["span_id"],
        "the server span is the client span's child"
    );
    assert_eq!(
        agent_saw,
        format!("00-{trace}-{}-01", server["span_id"].as_str().unwrap()),
        "the provider agent's parent is the recorded server span"
    );
    for s in [client, server] {
        let a = &s["attributes"];
        assert_eq!(s["name"], "tools/call whoami", "{s}");
        assert_eq!(a["mcp.method.name"], "tools/call", "{s}");
        assert_eq!(a["gen_ai.tool.name"], "whoami", "{s}");
        assert_eq!(a["gen_ai.operation.name"], "execute_tool", "{s}");
        assert_eq!(a["http.response.status_code"], 200, "{s}");
        assert_eq!(
            a["capmesh.caller"], "spiffe://capmesh.local/ns/default/agent/planner",
            "{s}"
        );
        assert_eq!(
            a["capmesh.provider"], "spiffe://capmesh.local/ns/default/agent/weather",
            "{s}"
        );
        assert_eq!(a["capmesh.capability"], "whoami", "{s}");
        assert_eq!(s["status_code"], 0, "unset: no error {s}");
        assert_eq!(s["scope"], "capmesh-proxy");
        assert!(s["end"].as_u64().unwrap() >= s["start"].as_u64().unwrap());
    }
    assert_eq!(client["attributes"]["capmesh.attempts"], 1);
    assert_eq!(client["attributes"]["capmesh.failover"], false);
    assert!(
        client["attributes"]["capmesh.instance"]
            .as_str()
            .unwrap()
            .starts_with("weather")
    );
    assert_eq!(client["resource"]["service.name"], "planner");
    assert_eq!(server["resource"]["service.name"], "weather");

    // The same spans reached the control plane's window, for `capmesh trace`.
    let rest = mesh.cp.rest().unwrap();
    let token = mesh.cp.admin_token().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let held = loop {
        let t: Result<Trace, _> = rest.get(&format!("/v1/traces/{trace}"), Some(&token)).await;
        match t {
            Ok(t) if t.spans.len() >= 2 => break t,
            other => assert!(
                tokio::time::Instant::now() < deadline,
                "the trace never reached the control plane: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let kinds: Vec<(SpanKind, &str)> = held
        .spans
        .iter()
        .map(|s| (s.span.kind, s.agent.as_str()))
        .collect();
    assert!(kinds.contains(&(SpanKind::Client, "planner")), "{kinds:?}");
    assert!(kinds.contains(&(SpanKind::Server, "weather")), "{kinds:?}");

    // A tool that fails (get_weather without its city) makes the spans' status an error.
    let _ = client_json(
        &consumer.url(),
        "legacy",
        &[],
        &["call", "get_weather", "{}"],
    )
    .await
    .unwrap();
    eventually(
        Duration::from_secs(10),
        "the failed call's spans",
        || async {
            receiver.spans.lock().await.iter().any(|s| {
                s["name"] == "tools/call get_weather" && s["kind"] == 2 && s["status_code"] == 2
            })
        },
    )
    .await;

    // The receiver goes away: calls are unaffected, and the spans that cannot be exported are
    // counted as dropped.
    let mut receiver = receiver;
    receiver.child.kill().await.unwrap();
    let (_, before) = consumer.admin_get("/metrics").await.unwrap();
    let before = dropped(&before);
    for i in 0..5 {
        let (code, v) = call_whoami(&consumer).await;
        assert_eq!(code, 0, "call {i} with the receiver down: {v}");
    }
    eventually(
        Duration::from_secs(15),
        "the drop counter to rise by 5",
        || async {
            let (_, m) = consumer.admin_get("/metrics").await.unwrap();
            dropped(&m) >= before + 5
        },
    )
    .await;
}

async fn call_whoami(p: &capmesh_tests::ProxyProcess) -> (i32, Value) {
    client_json(&p.url(), "2026-07-28", &[], &["call", "whoami", "{}"])
        .await
        .unwrap()
}

//! Issue "Proxy outbound": a real MCP client calls the mesh through its own sidecar, in both
//! protocol generations; load is shared, the preferred provider fails over, and a control-plane
//! outage does not stop calls.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use capmesh_tests::ProxyProcess;
use capmesh_tests::python::{AgentOptions, PyAgent};
use common::{MODES, Mesh, call, served_by, tool_names};

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
async fn providers_share_load_and_a_preferred_tag_picks_one() {
    let mesh = Mesh::new().await;
    let (mut fast_agent, _fast_proxy) = mesh
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

    // `+fast` preferred: every call goes to alpha. 20 calls: the first 8 answers on each of
    // the consumer's connections to alpha (one per worker) give no latency sample.
    let picky = mesh.consumer("picky", &["get_weather:+fast"], &[]).await;
    let counts = serve_counts(&picky, 20).await;
    assert_eq!(counts.get("alpha"), Some(&20), "{counts:?}");

    // Its /config shows what the balancer sees: alpha alone in the best rank, observed; beta
    // behind it, never tried.
    let (_, config) = picky.admin_get("/config").await.unwrap();
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    let balancing = &config["balancing"][0];
    assert_eq!(balancing["tool"], "get_weather", "{balancing}");
    let rank = |i: usize| -> Vec<(String, bool, String)> {
        balancing["ranks"][i]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                (
                    e["id"]
                        .as_str()
                        .unwrap_or_default()
                        .split('/')
                        .nth(1)
                        .unwrap_or_default()
                        .to_owned(),
                    e["estimate_ms"].is_f64(),
                    e["breaker"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    };
    assert_eq!(
        rank(0),
        [("alpha".to_owned(), true, "closed".to_owned())],
        "{balancing}"
    );
    assert_eq!(
        rank(1),
        [("beta".to_owned(), false, "closed".to_owned())],
        "{balancing}"
    );

    // alpha's agent gone, its sidecar still up: the call alpha's sidecar cannot hand over
    // (the mesh's own 503) goes to beta, and the consumer counts one retry and one failover.
    fast_agent.kill();
    let counts = serve_counts(&picky, 1).await;
    assert_eq!(counts.get("beta"), Some(&1), "{counts:?}");
    let (_, metrics) = picky.admin_get("/metrics").await.unwrap();
    for counter in [
        "capmesh_proxy_retries_total{capability=\"get_weather\"} 1",
        "capmesh_proxy_failovers_total{capability=\"get_weather\"} 1",
    ] {
        assert!(metrics.contains(counter), "no {counter} in:\n{metrics}");
    }
}

/// One 2026-07-28 `tools/call` of `echo` through a sidecar's outbound port: the result text, or
/// why it failed.
async fn echo_call(
    client: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<bytes::Bytes>,
    >,
    port: u16,
    text: &str,
) -> Result<String, String> {
    use http_body_util::BodyExt;
    let body = serde_json::json!({
        "jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {
            "name": "echo", "arguments": {"text": text},
            "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}
        }
    });
    let req = http::Request::post(format!("http://127.0.0.1:{port}/mcp"))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", "tools/call")
        .header("mcp-name", "echo")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_string(),
        )))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(20), client.request(req))
        .await
        .map_err(|_| "no answer within 20 s".to_owned())?
        .map_err(|e| format!("request failed: {e}"))?;
    let status = resp.status();
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let bytes = tokio::time::timeout(Duration::from_secs(20), resp.into_body().collect())
        .await
        .map_err(|_| "the answer did not finish within 20 s".to_owned())?
        .map_err(|e| format!("reading the answer failed: {e}"))?
        .to_bytes();
    let rpc = capmesh_proxy::mcp::sse::find_response(
        &bytes,
        &ct,
        &capmesh_proxy::mcp::jsonrpc::Id::from(1),
    )
    .map_err(|e| format!("HTTP {status}: {e}"))?
    .ok_or_else(|| format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes)))?;
    if let Some(err) = rpc.get("error") {
        return Err(format!("HTTP {status}: {err}"));
    }
    if rpc["result"]["isError"] == true {
        return Err(format!("tool error: {}", rpc["result"]));
    }
    rpc["result"]["content"][0]["text"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("no text in {rpc}"))
}

/// One call of the failover test, on the test's own clock.
#[derive(Debug)]
struct Call {
    text: String,
    started: Duration,
    ended: Duration,
    outcome: Result<String, String>,
}

#[tokio::test]
async fn a_provider_killed_while_calls_are_in_flight_fails_no_call_that_had_not_reached_it() {
    const CALLERS: usize = 8;
    const KILL_AFTER: usize = 24;
    const CALLS_PER_CALLER: usize = 40;
    let mesh = Mesh::new().await;
    // alpha, the preferred provider, writes down every call that reaches it (before its 200 ms
    // of work), so the test knows which calls it had when it died.
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("alpha.calls");
    let mut opts = AgentOptions::new("alpha", &["echo"]);
    opts.delay_ms = 200;
    opts.journal = Some(journal.clone());
    let mut alpha_agent = PyAgent::start_with(opts).await.unwrap();
    let mut alpha = ProxyProcess::start(
        mesh.proxy_bin(),
        &mesh.cp,
        "alpha",
        Some(&alpha_agent.url),
        &["--tags", "fast"],
    )
    .await
    .unwrap();
    let mut opts = AgentOptions::new("beta", &["echo"]);
    opts.delay_ms = 200;
    let beta_agent = PyAgent::start_with(opts).await.unwrap();
    let _beta = ProxyProcess::start(
        mesh.proxy_bin(),
        &mesh.cp,
        "beta",
        Some(&beta_agent.url),
        &["--tags", "slow"],
    )
    .await
    .unwrap();
    let consumer = mesh.consumer("planner", &["echo:+fast"], &[]).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    assert_eq!(
        echo_call(&client, consumer.outbound, "warm-up").await,
        Ok("alpha: warm-up".to_owned())
    );

    // Concurrent callers, each a bounded loop; every time is read from one clock, this
    // process's.
    let clock = std::time::Instant::now();
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let killed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut callers = tokio::task::JoinSet::new();
    for c in 0..CALLERS {
        let (client, served, killed) = (client.clone(), served.clone(), killed.clone());
        let port = consumer.outbound;
        callers.spawn(async move {
            let mut calls = Vec::new();
            let mut after_kill = 0;
            for n in 0..CALLS_PER_CALLER {
                // Keep going for a few calls after the kill, then stop.
                if killed.load(std::sync::atomic::Ordering::Acquire) {
                    after_kill += 1;
                    if after_kill > 4 {
                        break;
                    }
                }
                let text = format!("c{c}-{n}");
                let started = clock.elapsed();
                let outcome = echo_call(&client, port, &text).await;
                if outcome.is_ok() {
                    served.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                }
                calls.push(Call {
                    text,
                    started,
                    ended: clock.elapsed(),
                    outcome,
                });
            }
            calls
        });
    }
    // SIGKILL alpha (agent and sidecar: the whole pod) once KILL_AFTER calls were served, with
    // about CALLERS calls in flight.
    let deadline = clock.elapsed() + Duration::from_secs(60);
    while served.load(std::sync::atomic::Ordering::Acquire) < KILL_AFTER {
        assert!(
            clock.elapsed() < deadline,
            "{KILL_AFTER} calls were not served within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    alpha.kill();
    alpha_agent.kill();
    let killed_at = clock.elapsed();
    killed.store(true, std::sync::atomic::Ordering::Release);
    // A burst right after the kill, before the consumer can have heard of it: these calls go
    // to alpha's dead address and are refused there, so only a retry elsewhere saves them.
    for b in 0..CALLERS {
        let client = client.clone();
        let port = consumer.outbound;
        callers.spawn(async move {
            let text = format!("burst-{b}");
            let started = clock.elapsed();
            let outcome = echo_call(&client, port, &text).await;
            vec![Call {
                text,
                started,
                ended: clock.elapsed(),
                outcome,
            }]
        });
    }
    let mut calls = Vec::new();
    while let Some(done) = callers.join_next().await {
        calls.extend(done.unwrap());
    }
    calls.sort_by_key(|c| c.started);

    let reached: std::collections::BTreeSet<String> = std::fs::read_to_string(&journal)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("echo ").map(str::to_owned))
        .collect();
    let in_flight = calls
        .iter()
        .filter(|c| c.started < killed_at && c.ended > killed_at)
        .count();
    assert!(
        in_flight > 0,
        "the kill must come while calls are in flight: {calls:#?}"
    );
    let failed: Vec<&Call> = calls.iter().filter(|c| c.outcome.is_err()).collect();
    // A call reached the killed provider when its agent journaled it, or when the mesh says
    // it was sent to alpha's sidecar before the connection broke (it may have run there, so
    // the mesh does not repeat it: the one retry rule).
    let sent_to_alpha = |c: &Call| {
        c.outcome
            .as_ref()
            .is_err_and(|e| e.contains("/agent/alpha#") && e.contains("after it was sent"))
    };
    let lost: Vec<&&Call> = failed
        .iter()
        .filter(|c| !reached.contains(&c.text) && !sent_to_alpha(c))
        .collect();
    assert!(
        lost.is_empty(),
        "{} call(s) failed that had never reached the killed provider (kill at {killed_at:?}): {lost:#?}",
        lost.len()
    );
    // What succeeded is real: before the kill alpha (preferred), after it only beta.
    for c in calls.iter().filter(|c| c.started > killed_at) {
        if let Ok(text) = &c.outcome {
            assert_eq!(text, &format!("beta: {}", c.text), "{c:?}");
        }
    }
    let after: Vec<&Call> = calls.iter().filter(|c| c.started > killed_at).collect();
    assert!(
        after.len() >= CALLERS && after.iter().all(|c| c.outcome.is_ok()),
        "calls after the kill: {after:#?}"
    );
    let first_beta = calls
        .iter()
        .filter(|c| {
            c.ended > killed_at && c.outcome.as_deref().is_ok_and(|t| t.starts_with("beta:"))
        })
        .map(|c| c.ended.saturating_sub(killed_at))
        .min();
    eprintln!(
        "failover: {} calls, {in_flight} in flight at the kill, {} failed (all had reached alpha), first answer from beta {first_beta:?} after the kill",
        calls.len(),
        failed.len()
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
    .await
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

/// One 2026-07-28 `get_weather` call through the federated endpoint at `port`: which agent
/// served it (from `x-capmesh-served-by`), `None` when it failed.
async fn weather_call(
    client: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<bytes::Bytes>,
    >,
    port: u16,
) -> Option<String> {
    use http_body_util::BodyExt;
    let body = r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"get_weather","arguments":{"city":"Riga"},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}"#;
    let req = http::Request::post(format!("http://127.0.0.1:{port}/mcp"))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", "tools/call")
        .header("mcp-name", "get_weather")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            body.as_bytes(),
        )))
        .unwrap();
    let resp = client.request(req).await.ok()?;
    let served = resp
        .headers()
        .get("x-capmesh-served-by")?
        .to_str()
        .ok()?
        .to_owned();
    let ok = resp.status() == 200;
    let text = resp.into_body().collect().await.ok()?.to_bytes();
    (ok && String::from_utf8_lossy(&text).contains("sunny in Riga")).then_some(served)
}

#[tokio::test]
async fn under_load_a_new_provider_is_served_within_100ms_of_the_consumer_knowing_it() {
    use std::sync::{Arc, Mutex};
    use std::time::Instant;
    let mesh = Mesh::new().await;
    let (_alpha, _pa) = mesh.provider("alpha", &["weather"], &[]).await;
    let consumer = mesh.consumer("planner", &["get_weather"], &[]).await;
    let port = consumer.outbound;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(hyper_util::client::legacy::connect::HttpConnector::new());
    assert!(weather_call(&client, port).await.is_some());

    // 200 calls a second, open loop, for at most 60 s: each answer's time and who served it.
    let origin = Instant::now();
    // (when answered, since `origin`; who served it, or None when the call failed)
    type Answers = Arc<Mutex<Vec<(Duration, Option<String>)>>>;
    let answers: Answers = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (answers, stop, client) = (answers.clone(), stop.clone(), client.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            for _ in 0..12_000 {
                tick.tick().await;
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let (answers, client) = (answers.clone(), client.clone());
                tokio::spawn(async move {
                    let served = weather_call(&client, port).await;
                    answers.lock().unwrap().push((origin.elapsed(), served));
                });
            }
        })
    };
    // When the consumer first holds a healthy beta endpoint (its /config, every 2 ms).
    let known = {
        let consumer_admin = consumer.admin;
        tokio::spawn(async move {
            loop {
                if let Ok((200, doc)) = capmesh_tests::http_get(consumer_admin, "/config").await
                    && let Ok(v) = serde_json::from_str::<serde_json::Value>(&doc)
                    && v["snapshot"]["endpoints"].as_array().is_some_and(|eps| {
                        eps.iter()
                            .any(|e| e["agent"] == "beta" && e["healthy"] == true)
                    })
                {
                    return origin.elapsed();
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (_beta, _pb) = mesh.provider("beta", &["weather"], &[]).await;
    let known_at = tokio::time::timeout(Duration::from_secs(30), known)
        .await
        .expect("the consumer never learnt of beta")
        .unwrap();
    let first_beta = async {
        loop {
            let seen = answers.lock().unwrap().iter().find_map(|(at, who)| {
                who.as_deref()
                    .filter(|w| w.contains("/agent/beta#"))
                    .map(|_| *at)
            });
            if let Some(at) = seen {
                return at;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let served_at = tokio::time::timeout(Duration::from_secs(10), first_beta)
        .await
        .expect("beta never served a call");
    // And it keeps taking its share: its first answer came over a fresh mutual-TLS connection,
    // which must not read as a slow provider (power of two choices would pass it over for
    // seconds, until that estimate decayed).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (mut beta, mut all) = (0, 0);
    for (at, who) in answers.lock().unwrap().iter() {
        if *at > served_at && *at <= served_at + Duration::from_secs(1) {
            all += 1;
            beta += usize::from(who.as_deref().is_some_and(|w| w.contains("/agent/beta#")));
        }
    }
    println!("in the second after its first answer, beta served {beta} of {all} calls");
    assert!(
        all >= 100 && beta * 5 >= all,
        "beta served {beta} of the {all} calls answered in the second after its first"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.await.unwrap();
    let failed = answers
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, who)| who.is_none())
        .count();
    assert_eq!(failed, 0, "calls failed while beta joined");
    let delay = served_at.saturating_sub(known_at);
    println!("beta known at {known_at:?}, first served at {served_at:?}: {delay:?} later");
    assert!(
        delay <= Duration::from_millis(100),
        "beta first served {delay:?} after the consumer knew it"
    );
}

/// The runtime (ns on a CPU, from `/proc/<pid>/task/*/schedstat`) of each of `pid`'s threads
/// named `worker-<n>`, by name.
fn worker_runtimes(pid: u32) -> std::collections::BTreeMap<String, u64> {
    let mut runtimes = std::collections::BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let name = name.trim_end();
        if !name.starts_with("worker-") {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
        let ns = stat.split_whitespace().next().and_then(|n| n.parse().ok());
        runtimes.insert(name.to_owned(), ns.unwrap_or(0));
    }
    runtimes
}

/// With four workers, each a thread of its own that accepts on both listeners: calls arriving
/// on many connections at once are all served, the connections are spread evenly over the
/// workers, and SIGTERM still drains every worker and ends the process.
#[tokio::test]
async fn a_sidecar_with_four_workers_spreads_connections_evenly_and_drains_on_sigterm() {
    let mesh = Mesh::new().await;
    // A sidecar with four workers, ready.
    let four_workers = async |name: &str, agent_url: Option<&str>, extra: &[&str]| {
        let token = mesh.cp.token("default", name).await.unwrap();
        let address = mesh.cp.address();
        let mut flags = vec!["--control-plane", &address];
        flags.extend_from_slice(extra);
        let ca = mesh.cp.data_dir.join("ca.pem");
        let four = [("TOKIO_WORKER_THREADS", "4")];
        let bin = mesh.proxy_bin();
        let mut proxy =
            ProxyProcess::spawn_at(bin, &ca, Some(&token), name, agent_url, &flags, &four)
                .await
                .unwrap();
        proxy.wait_ready(Duration::from_secs(30)).await.unwrap();
        proxy
    };
    let agent = PyAgent::start("alpha", &["weather"], None).await.unwrap();
    let _provider = four_workers("alpha", Some(&agent.url), &[]).await;
    let mut consumer = four_workers("planner", None, &["--dependency", "get_weather"]).await;
    let pid = consumer.pid().unwrap();
    let before = worker_runtimes(pid);
    for n in 1..=4 {
        assert!(before.contains_key(&format!("worker-{n}")), "{before:?}");
    }

    // 32 clients at once, each on a connection of its own that it keeps open, 8 calls each.
    let port = consumer.outbound;
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..32 {
        clients.spawn(async move {
            let client =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .pool_max_idle_per_host(1)
                    .build(hyper_util::client::legacy::connect::HttpConnector::new());
            let mut served = 0;
            for _ in 0..8 {
                served += usize::from(weather_call(&client, port).await.is_some());
            }
            (served, client)
        });
    }
    let (served, _open): (Vec<usize>, Vec<_>) = clients.join_all().await.into_iter().unzip();
    assert_eq!(
        served.iter().sum::<usize>(),
        256,
        "calls failed:\n{}",
        consumer.log()
    );

    // The 32 open connections are spread over the four workers, whichever thread the kernel
    // woke first for each.
    let (_, metrics) = consumer.admin_get("/metrics").await.unwrap();
    let open: Vec<i64> = (1..=4)
        .map(|n| {
            let series = format!(
                "capmesh_proxy_worker_connections{{listener=\"outbound\",worker=\"{n}\"}} "
            );
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(&series))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("no {series}in\n{metrics}"))
        })
        .collect();
    assert_eq!(open.iter().sum::<i64>(), 32, "open per worker: {open:?}");
    assert!(
        open.iter().all(|&n| n >= 6),
        "uneven: open per worker {open:?}"
    );

    let after = worker_runtimes(pid);
    let busy: Vec<(&String, u64)> = after
        .iter()
        .map(|(name, ns)| (name, ns - before.get(name).copied().unwrap_or(0)))
        .collect();
    println!("open connections per worker: {open:?}; CPU time per worker (ns): {busy:?}");
    consumer.terminate().unwrap();
}

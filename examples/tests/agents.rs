//! The example agents as a user meets them: served over Streamable HTTP, reached with rmcp's
//! client, and the planner planning through one endpoint. Every wait is bounded.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail, ensure};
use capmesh_examples::{AgentKind, AgentServer, Flavor, HyperClient, ServeOptions, plan_trip};
use rmcp::ServiceExt as _;
use rmcp::model::{CallToolRequestParams, CallToolResult, ClientConfig, JsonObject};
use rmcp::service::{RoleClient, RunningService};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::timeout;

/// The bound on any single wait in these tests.
const WAIT: Duration = Duration::from_secs(20);

/// An agent served in-process until `stop`.
struct Running {
    url: String,
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    async fn start(kind: AgentKind, name: &str, flavor: Flavor) -> anyhow::Result<Self> {
        let opts = ServeOptions {
            name: Some(name.to_owned()),
            flavor,
            ..ServeOptions::default()
        };
        let server = AgentServer::bind(kind, &opts).await?;
        ensure!(server.local_addr().port() != 0, "port 0 was not resolved");
        let url = server.url();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run_until(async move {
            let _ = stopped.await;
        }));
        Ok(Self { url, stop, task })
    }

    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        timeout(WAIT, self.task)
            .await
            .context("the agent did not stop in time")??
    }
}

type Client = RunningService<RoleClient, ClientConfig>;

async fn connect(url: &str) -> anyhow::Result<Client> {
    let transport = StreamableHttpClientTransport::with_client(
        HyperClient::new(),
        StreamableHttpClientTransportConfig::with_uri(url),
    );
    Ok(timeout(WAIT, ClientConfig::default().serve(transport))
        .await
        .context("initialize timed out")??)
}

async fn call(client: &Client, tool: &str, args: Value) -> anyhow::Result<CallToolResult> {
    let Value::Object(args) = args else {
        bail!("arguments must be an object");
    };
    let params = CallToolRequestParams::new(tool.to_owned()).with_arguments(args);
    Ok(timeout(WAIT, client.call_tool(params))
        .await
        .with_context(|| format!("{tool} timed out"))??)
}

fn text(result: &CallToolResult) -> String {
    result
        .content
        .iter()
        .filter_map(|c| c.as_text().map(|t| t.text.clone()))
        .collect::<Vec<_>>()
        .join("\n")
}

fn schema_fields(schema: &JsonObject) -> Vec<String> {
    let mut fields: Vec<String> = schema
        .get("properties")
        .and_then(Value::as_object)
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default();
    fields.sort();
    fields
}

#[tokio::test]
async fn each_kind_lists_its_tools_and_answers_deterministically() -> anyhow::Result<()> {
    let cases = [
        (
            AgentKind::Weather,
            "weather-eu",
            Flavor::Claude,
            "get_weather",
            json!({ "city": "Lisbon" }),
            vec!["city"],
            "weather-eu: sunny, 24°C in Lisbon",
        ),
        (
            AgentKind::Flights,
            "flights-a",
            Flavor::Claude,
            "search_flights",
            json!({ "origin": "Berlin", "destination": "Lisbon", "date": "2026-06-12" }),
            vec!["date", "destination", "origin"],
            "flights-a: 3 flights Berlin → Lisbon on 2026-06-12: ",
        ),
        (
            AgentKind::Llm,
            "llm-openai",
            Flavor::Openai,
            "chat",
            json!({ "prompt": "Plan a 3-day trip to Lisbon" }),
            vec!["prompt"],
            "[gpt-4o via llm-openai] Here is a 3-day plan for Lisbon: Day 1: ",
        ),
    ];
    for (kind, name, flavor, tool, args, fields, expected) in cases {
        let agent = Running::start(kind, name, flavor).await?;
        let client = connect(&agent.url).await?;

        let info = client.peer_info().context("no server info")?;
        let server_name = info.server_info.as_ref().map(|i| i.name.as_str());
        assert_eq!(server_name, Some(name));
        let tools = timeout(WAIT, client.list_all_tools()).await??;
        let names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
        assert_eq!(names, kind.tools(), "{kind}");
        let listed = &tools[0];
        assert!(
            listed.description.as_deref().is_some_and(|d| d.len() > 20),
            "{tool} has no description"
        );
        assert_eq!(schema_fields(&listed.input_schema), fields, "{tool}");

        let first = call(&client, tool, args.clone()).await?;
        assert_ne!(first.is_error, Some(true), "{}", text(&first));
        let answer = text(&first);
        assert!(answer.starts_with(expected), "{kind}: {answer}");
        let again = call(&client, tool, args).await?;
        assert_eq!(text(&again), answer, "{kind} answers are not deterministic");

        timeout(WAIT, client.cancel()).await??;
        agent.stop().await?;
    }
    Ok(())
}

#[tokio::test]
async fn bad_input_is_a_tool_error_and_the_server_keeps_serving() -> anyhow::Result<()> {
    let agent = Running::start(AgentKind::All, "all", Flavor::Claude).await?;
    let client = connect(&agent.url).await?;

    let empty = call(&client, "get_weather", json!({ "city": "  " })).await?;
    assert_eq!(empty.is_error, Some(true));
    assert!(text(&empty).contains("city must be"), "{}", text(&empty));

    let same = call(
        &client,
        "search_flights",
        json!({ "origin": "Berlin", "destination": "berlin", "date": "2026-06-12" }),
    )
    .await?;
    assert_eq!(same.is_error, Some(true));

    let missing = timeout(
        WAIT,
        client
            .call_tool(CallToolRequestParams::new("get_weather").with_arguments(JsonObject::new())),
    )
    .await?;
    // rmcp reports bad arguments as a tool error (or a JSON-RPC error); either way, no answer.
    let refused = match &missing {
        Ok(result) => result.is_error == Some(true) && text(result).contains("city"),
        Err(_) => true,
    };
    assert!(
        refused,
        "a call without `city` must be refused: {missing:?}"
    );

    let ok = call(&client, "get_weather", json!({ "city": "Paris" })).await?;
    assert_eq!(text(&ok), "all: cloudy, 17°C in Paris");

    timeout(WAIT, client.cancel()).await??;
    agent.stop().await
}

#[tokio::test]
async fn planner_plans_a_trip_through_one_endpoint() -> anyhow::Result<()> {
    let agent = Running::start(AgentKind::All, "all-in-one", Flavor::Claude).await?;
    let plan = plan_trip(&agent.url, "Lisbon").await?;

    assert_eq!(plan.tools, ["chat", "get_weather", "search_flights"]);
    let tools: Vec<&str> = plan.steps.iter().map(|s| s.tool.as_str()).collect();
    assert_eq!(tools, ["get_weather", "search_flights", "chat"]);
    let weather = plan.step("get_weather").context("no weather step")?;
    assert_eq!(weather.answer, "all-in-one: sunny, 24°C in Lisbon");
    assert_eq!(weather.served_by, None, "no sidecar, no served-by header");
    let flights = plan.step("search_flights").context("no flights step")?;
    assert!(
        flights
            .answer
            .starts_with("all-in-one: 3 flights Berlin → Lisbon on 2026-06-12: "),
        "{}",
        flights.answer
    );
    let itinerary = plan.itinerary().context("no itinerary")?;
    assert!(
        itinerary.starts_with("[claude-sonnet via all-in-one] Here is a 3-day plan for Lisbon: "),
        "{itinerary}"
    );
    // The LLM saw the earlier answers: sunny weather, a cheapest flight.
    assert!(itinerary.contains("Bring sunscreen."), "{itinerary}");

    let printed = plan.to_string();
    assert!(
        printed.contains("planner: get_weather(Lisbon) → all-in-one: sunny, 24°C in Lisbon\n"),
        "{printed}"
    );
    assert!(printed.contains("planner: search_flights(Berlin, Lisbon, 2026-06-12) → "));
    assert!(printed.contains("planner: chat(\"Plan a 3-day trip to Lisbon"));

    // Deterministic end to end (but for the trace each plan starts).
    let mut again = plan_trip(&agent.url, "Lisbon").await?;
    assert_ne!(again.trace_id, plan.trace_id, "each plan is its own trace");
    again.trace_id.clone_from(&plan.trace_id);
    assert_eq!(again, plan);
    agent.stop().await
}

#[tokio::test]
async fn planner_says_which_tools_are_missing() -> anyhow::Result<()> {
    let agent = Running::start(AgentKind::Weather, "weather", Flavor::Claude).await?;
    let error = match plan_trip(&agent.url, "Lisbon").await {
        Ok(plan) => bail!("planned without flights or llm: {plan}"),
        Err(error) => format!("{error:#}"),
    };
    assert!(
        error.contains("does not offer search_flights, chat") && error.contains("[get_weather]"),
        "{error}"
    );
    let url = agent.url.clone();
    agent.stop().await?;

    let unreachable = plan_trip(&url, "Lisbon").await;
    assert!(unreachable.is_err(), "a stopped agent cannot plan");
    Ok(())
}

#[tokio::test]
async fn the_planner_is_not_a_server() {
    let refused = AgentServer::bind(AgentKind::Planner, &ServeOptions::default()).await;
    let error = refused.map(|_| ()).map_err(|e| e.to_string());
    assert!(
        error.as_ref().is_err_and(|e| e.contains("serves no tools")),
        "{error:?}"
    );
}

#[tokio::test]
async fn stopping_ends_open_sessions_promptly() -> anyhow::Result<()> {
    let agent = Running::start(AgentKind::Llm, "llm", Flavor::Claude).await?;
    // An initialised client holds a session and its standalone SSE stream open.
    let client = connect(&agent.url).await?;
    let answer = call(&client, "chat", json!({ "prompt": "hello" })).await?;
    assert_eq!(
        text(&answer),
        "[claude-sonnet via llm] You said \"hello\" (1 words). Ask me to plan a trip to a city \
         and I will write an itinerary."
    );
    // Open SSE streams would hold the drain for its full 5 s; ending the sessions ends them.
    let started = std::time::Instant::now();
    agent.stop().await?;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "stop waited out the drain: {:?}",
        started.elapsed()
    );
    drop(client);
    Ok(())
}

/// A stand-in for a sidecar: forwards every request to `upstream` unchanged (streaming the
/// response) and stamps `x-capmesh-served-by` on the answer.
async fn stamping_proxy(upstream: &str, stamp: &'static str) -> anyhow::Result<String> {
    use hyper_util::client::legacy::Client as HttpClient;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let upstream: http::Uri = upstream.parse()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/mcp", listener.local_addr()?);
    let http = HttpClient::builder(TokioExecutor::new()).build_http::<hyper::body::Incoming>();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (http, upstream) = (http.clone(), upstream.clone());
            let service = hyper::service::service_fn(move |mut req: http::Request<_>| {
                *req.uri_mut() = upstream.clone();
                let http = http.clone();
                async move {
                    let mut resp = http.request(req).await?;
                    resp.headers_mut().insert(
                        capmesh_examples::SERVED_BY_HEADER,
                        http::HeaderValue::from_static(stamp),
                    );
                    Ok::<_, hyper_util::client::legacy::Error>(resp)
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    Ok(url)
}

#[tokio::test]
async fn planner_reports_who_served_each_step() -> anyhow::Result<()> {
    let agent = Running::start(AgentKind::All, "all", Flavor::Claude).await?;
    let proxy = stamping_proxy(&agent.url, "all#instance-1").await?;
    let plan = plan_trip(&proxy, "Lisbon").await?;
    for step in &plan.steps {
        assert_eq!(
            step.served_by.as_deref(),
            Some("all#instance-1"),
            "{}",
            step.tool
        );
    }
    assert!(
        plan.to_string()
            .contains("→ all: sunny, 24°C in Lisbon  [served by all#instance-1]\n")
    );
    agent.stop().await
}

/// Reads the child's stdout until `READY <port>`.
async fn ready_port(child: &mut tokio::process::Child) -> anyhow::Result<u16> {
    let stdout = child.stdout.take().context("stdout not piped")?;
    let mut lines = BufReader::new(stdout).lines();
    let line = timeout(WAIT, lines.next_line())
        .await
        .context("no READY line in time")??
        .context("the agent exited before READY")?;
    line.strip_prefix("READY ")
        .and_then(|p| p.trim().parse().ok())
        .ok_or_else(|| anyhow!("expected `READY <port>`, got {line:?}"))
}

#[tokio::test]
async fn the_binary_prints_ready_plans_and_stops_on_sigterm() -> anyhow::Result<()> {
    let exe = env!("CARGO_BIN_EXE_capmesh-example-agent");
    let mut server = tokio::process::Command::new(exe)
        .args([
            "all",
            "--port",
            "0",
            "--name",
            "bin-agent",
            "--flavor",
            "openai",
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let port = ready_port(&mut server).await?;

    let planner = timeout(
        WAIT,
        tokio::process::Command::new(exe)
            .args([
                "planner",
                "--mesh",
                &format!("http://127.0.0.1:{port}/mcp"),
                "--city",
                "Paris",
            ])
            .output(),
    )
    .await??;
    let printed = String::from_utf8_lossy(&planner.stdout);
    assert!(
        planner.status.success(),
        "{printed}\n{}",
        String::from_utf8_lossy(&planner.stderr)
    );
    assert!(
        printed.contains("planner: get_weather(Paris) → bin-agent: cloudy, 17°C in Paris\n"),
        "{printed}"
    );
    assert!(
        printed.contains("[gpt-4o via bin-agent] Here is a 3-day plan for Paris: "),
        "{printed}"
    );
    assert!(
        printed.contains("planner: trip to Paris planned (trace "),
        "{printed}"
    );

    let misuse = timeout(
        WAIT,
        tokio::process::Command::new(exe)
            .args(["weather", "--flavor", "openai"])
            .output(),
    )
    .await??;
    assert!(!misuse.status.success());
    assert!(
        String::from_utf8_lossy(&misuse.stderr).contains("--flavor applies only to the llm agent")
    );

    let pid = server.id().context("the agent already exited")?;
    let killed = tokio::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await?;
    ensure!(killed.success(), "could not send SIGTERM");
    let status = timeout(WAIT, server.wait())
        .await
        .context("the agent ignored SIGTERM")??;
    assert!(status.success(), "SIGTERM should be a clean stop: {status}");
    Ok(())
}

//! The planner: an MCP *client* that sees the whole mesh as one server (its sidecar's federated
//! endpoint) and plans a trip with whichever providers the mesh routes it to: weather, flights,
//! then the LLM, each answer feeding the next prompt.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use rmcp::ServiceExt as _;
use rmcp::model::{
    CallToolRequestParams, ClientCapabilities, ClientConfig, Implementation, JsonObject,
};
use rmcp::service::{RoleClient, RunningService};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use serde_json::json;

use crate::client::HyperClient;

/// Where every trip starts.
pub const ORIGIN: &str = "Berlin";
/// The travel day (fixed, so plans are reproducible).
pub const TRAVEL_DATE: &str = "2026-06-12";
/// The longest any one step (connecting, listing, one call) may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// The tools a plan needs, in the order they are called.
const NEEDED: [&str; 3] = ["get_weather", "search_flights", "chat"];

/// One tool call of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanStep {
    /// The tool called.
    pub tool: String,
    /// Its arguments, as a person would write them: `Lisbon`, `Berlin, Lisbon, 2026-06-12`.
    pub arguments: String,
    /// The tool's text answer.
    pub answer: String,
    /// The provider instance that served, from the sidecar's `x-capmesh-served-by` header
    /// (`None` when talking to an agent directly).
    pub served_by: Option<String>,
}

/// A finished trip plan: what the mesh offered and each step's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TripPlan {
    /// The endpoint planned through.
    pub mesh_url: String,
    /// The city planned for.
    pub city: String,
    /// The tools the endpoint listed, sorted.
    pub tools: Vec<String>,
    /// The calls made, in order: `get_weather`, `search_flights`, `chat`.
    pub steps: Vec<PlanStep>,
    /// The W3C trace id every request of the trip carried (sampled), so that each sidecar on
    /// the way records its hop: `capmesh trace <id>` draws the trip.
    pub trace_id: String,
}

impl TripPlan {
    /// The step that called `tool`.
    pub fn step(&self, tool: &str) -> Option<&PlanStep> {
        self.steps.iter().find(|s| s.tool == tool)
    }

    /// The itinerary: the LLM's answer.
    pub fn itinerary(&self) -> Option<&str> {
        self.step("chat").map(|s| s.answer.as_str())
    }
}

impl fmt::Display for TripPlan {
    /// One line per step, e.g. `planner: get_weather(Lisbon) → weather-eu: sunny, 24°C in Lisbon`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "planner: {} offers {} tools: {}",
            self.mesh_url,
            self.tools.len(),
            self.tools.join(", ")
        )?;
        for step in &self.steps {
            write!(
                f,
                "planner: {}({}) → {}",
                step.tool, step.arguments, step.answer
            )?;
            match &step.served_by {
                Some(who) => writeln!(f, "  [served by {who}]")?,
                None => writeln!(f)?,
            }
        }
        writeln!(
            f,
            "planner: trip to {} planned (trace {})",
            self.city, self.trace_id
        )
    }
}

/// Bounds `fut` by [`STEP_TIMEOUT`], naming `what` when it runs out.
async fn step<T, E>(what: &str, fut: impl Future<Output = Result<T, E>>) -> anyhow::Result<T>
where
    E: std::error::Error + Send + Sync + 'static,
{
    tokio::time::timeout(STEP_TIMEOUT, fut)
        .await
        .map_err(|_| anyhow!("{what} took over {}s", STEP_TIMEOUT.as_secs()))?
        .with_context(|| format!("{what} failed"))
}

/// Plans a trip to `city` through the MCP endpoint `mesh_url` (normally the planner's sidecar,
/// `http://127.0.0.1:15001/mcp`): lists the tools, then calls `get_weather`, `search_flights`
/// and `chat` (whose prompt carries the first two answers). Each step is bounded by 30 s.
pub async fn plan_trip(mesh_url: &str, city: &str) -> anyhow::Result<TripPlan> {
    let city = city.trim();
    if city.is_empty() {
        bail!("the city to plan for is empty: pass one, e.g. --city Lisbon");
    }
    // The planner starts the trip's trace (sampled): the mesh records every hop under it.
    let trace = crate::client::TraceContext::new_sampled();
    let http = HyperClient::new().with_trace(&trace);
    let transport = StreamableHttpClientTransport::with_client(
        http.clone(),
        StreamableHttpClientTransportConfig::with_uri(mesh_url),
    );
    let info = ClientConfig::new(
        ClientCapabilities::default(),
        Implementation::new("capmesh-planner", env!("CARGO_PKG_VERSION")),
    );
    let session = step(
        &format!("connecting to the MCP endpoint {mesh_url}"),
        info.serve(transport),
    )
    .await?;
    let plan = plan_with(&session, &http, mesh_url, city)
        .await
        .map(|plan| TripPlan {
            trace_id: trace.trace_id.clone(),
            ..plan
        });
    // Ending the session is a courtesy (it frees server state); the plan stands either way.
    if let Err(error) = step("closing the MCP session", session.cancel()).await {
        tracing::debug!(error = %format!("{error:#}"), "could not close the MCP session");
    }
    plan
}

async fn plan_with(
    session: &RunningService<RoleClient, ClientConfig>,
    http: &HyperClient,
    mesh_url: &str,
    city: &str,
) -> anyhow::Result<TripPlan> {
    let listed = step("listing tools", session.list_all_tools()).await?;
    let mut tools: Vec<String> = listed.iter().map(|t| t.name.to_string()).collect();
    tools.sort();
    let missing: Vec<&str> = NEEDED
        .iter()
        .copied()
        .filter(|need| !tools.iter().any(|t| t == need))
        .collect();
    if !missing.is_empty() {
        bail!(
            "{mesh_url} does not offer {}; it offers [{}]. Start an agent providing each \
             (capmesh agent llm|flights|weather), and check that the planner's sidecar depends \
             on them (--dependency)",
            missing.join(", "),
            tools.join(", ")
        );
    }
    let call = async |tool: &str, arguments: String, args: serde_json::Value| {
        let args: JsonObject = match args {
            serde_json::Value::Object(map) => map,
            _ => JsonObject::new(),
        };
        http.take_served_by();
        let params = CallToolRequestParams::new(tool.to_owned()).with_arguments(args);
        let result = step(&format!("calling {tool}"), session.call_tool(params)).await?;
        let answer = result
            .content
            .iter()
            .filter_map(|c| c.as_text().map(|t| t.text.as_str()))
            .collect::<Vec<_>>()
            .join("\n");
        if result.is_error == Some(true) {
            bail!("{tool}({arguments}) answered with an error: {answer}");
        }
        Ok::<_, anyhow::Error>(PlanStep {
            tool: tool.to_owned(),
            arguments,
            answer,
            served_by: http.take_served_by(),
        })
    };
    let weather = call("get_weather", city.to_owned(), json!({ "city": city })).await?;
    let flights = call(
        "search_flights",
        format!("{ORIGIN}, {city}, {TRAVEL_DATE}"),
        json!({ "origin": ORIGIN, "destination": city, "date": TRAVEL_DATE }),
    )
    .await?;
    let prompt = format!(
        "Plan a 3-day trip to {city}. Weather: {}. Flights: {}. Prefer the cheapest flight.",
        weather.answer, flights.answer
    );
    let shown: String = prompt.chars().take(32).collect();
    let llm = call("chat", format!("\"{shown}…\""), json!({ "prompt": prompt })).await?;
    Ok(TripPlan {
        mesh_url: mesh_url.to_owned(),
        city: city.to_owned(),
        tools,
        steps: vec![weather, flights, llm],
        trace_id: String::new(),
    })
}

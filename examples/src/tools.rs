//! The MCP side of the agents: one rmcp `ServerHandler` whose tool router holds the tools of its
//! kind (or of every kind, for `all`). The answers themselves live in `answers.rs`.

use std::sync::Arc;

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{Implementation, ServerCapabilities, ServerConfig};
use rmcp::{ServerHandler, tool, tool_handler, tool_router};
use serde::Deserialize;

use crate::answers;
use crate::args::{AgentKind, Flavor};

/// Input of `chat`.
#[derive(Debug, Deserialize, rmcp::schemars::JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
pub(crate) struct ChatInput {
    /// What to ask the model, e.g. "Plan a 3-day trip to Lisbon".
    prompt: String,
}

/// Input of `search_flights`.
#[derive(Debug, Deserialize, rmcp::schemars::JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
pub(crate) struct FlightsInput {
    /// Departure city, e.g. "Berlin".
    origin: String,
    /// Arrival city, e.g. "Lisbon".
    destination: String,
    /// Day of travel, YYYY-MM-DD.
    date: String,
}

/// Input of `get_weather`.
#[derive(Debug, Deserialize, rmcp::schemars::JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
pub(crate) struct WeatherInput {
    /// City to report on, e.g. "Lisbon".
    city: String,
}

/// One agent's MCP server: its name (shown in every answer), its LLM flavour and its tools.
#[derive(Debug, Clone)]
pub(crate) struct Agent {
    name: Arc<str>,
    flavor: Flavor,
    tool_router: ToolRouter<Agent>,
}

impl Agent {
    /// The server for `kind`; `None` for the planner, which serves nothing.
    pub(crate) fn new(kind: AgentKind, name: &str, flavor: Flavor) -> Option<Self> {
        let tool_router = match kind {
            AgentKind::Llm => Self::llm_tools(),
            AgentKind::Flights => Self::flights_tools(),
            AgentKind::Weather => Self::weather_tools(),
            AgentKind::All => Self::llm_tools() + Self::flights_tools() + Self::weather_tools(),
            AgentKind::Planner => return None,
        };
        Some(Self {
            name: name.into(),
            flavor,
            tool_router,
        })
    }
}

#[tool_router(router = llm_tools)]
impl Agent {
    #[tool(
        description = "Ask the language model. Give it a prompt; it answers in text (a trip \
                       itinerary when the prompt names a city). Deterministic demo model.",
        annotations(read_only_hint = true, idempotent_hint = true, open_world_hint = false)
    )]
    fn chat(&self, Parameters(input): Parameters<ChatInput>) -> Result<String, String> {
        answers::chat(&self.name, self.flavor.model(), &input.prompt)
    }
}

#[tool_router(router = flights_tools)]
impl Agent {
    #[tool(
        description = "Search flights between two cities on a day (YYYY-MM-DD); lists three \
                       flights with departure time and price, and names the cheapest.",
        annotations(read_only_hint = true, idempotent_hint = true, open_world_hint = false)
    )]
    fn search_flights(
        &self,
        Parameters(input): Parameters<FlightsInput>,
    ) -> Result<String, String> {
        answers::flights(&self.name, &input.origin, &input.destination, &input.date)
    }
}

#[tool_router(router = weather_tools)]
impl Agent {
    #[tool(
        description = "Current weather for a city: sky and temperature in °C.",
        annotations(read_only_hint = true, idempotent_hint = true, open_world_hint = false)
    )]
    fn get_weather(&self, Parameters(input): Parameters<WeatherInput>) -> Result<String, String> {
        answers::weather(&self.name, &input.city)
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Agent {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(
                Implementation::new(self.name.to_string(), env!("CARGO_PKG_VERSION"))
                    .with_title("capmesh example agent"),
            )
            .with_instructions(
                "A deterministic demo agent from capmesh-examples: same input, same answer.",
            )
    }
}

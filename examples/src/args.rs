//! The flags of `capmesh agent ...` (and of the `capmesh-example-agent` binary), and `run`,
//! which turns them into a server or one planner run.

use std::fmt;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context as _, bail};

use crate::planner::plan_trip;
use crate::server::{ServeOptions, serve};

/// The planner's default `--mesh`: its sidecar's federated endpoint.
pub const DEFAULT_MESH_URL: &str = "http://127.0.0.1:15001/mcp";
/// The planner's default `--city`.
pub const DEFAULT_CITY: &str = "Lisbon";

/// Which agent to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum AgentKind {
    /// An LLM provider: tool `chat(prompt)`.
    Llm,
    /// A flight search: tool `search_flights(origin, destination, date)`.
    Flights,
    /// A weather service: tool `get_weather(city)`.
    Weather,
    /// A consumer that plans a trip through its sidecar's mesh endpoint (`--mesh`); serves nothing.
    Planner,
    /// One server with every tool above (tests, and a one-process demo).
    All,
}

impl AgentKind {
    /// The kind as written on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentKind::Llm => "llm",
            AgentKind::Flights => "flights",
            AgentKind::Weather => "weather",
            AgentKind::Planner => "planner",
            AgentKind::All => "all",
        }
    }

    /// The names of the tools a server of this kind offers (none for the planner).
    pub fn tools(self) -> &'static [&'static str] {
        match self {
            AgentKind::Llm => &["chat"],
            AgentKind::Flights => &["search_flights"],
            AgentKind::Weather => &["get_weather"],
            AgentKind::Planner => &[],
            AgentKind::All => &["chat", "get_weather", "search_flights"],
        }
    }
}

impl fmt::Display for AgentKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which vendor the `llm` agent pretends to be; its answers name the model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Flavor {
    /// Answers as `claude-sonnet`.
    #[default]
    Claude,
    /// Answers as `gpt-4o`.
    Openai,
}

impl Flavor {
    /// The model name the answers carry.
    pub fn model(self) -> &'static str {
        match self {
            Flavor::Claude => "claude-sonnet",
            Flavor::Openai => "gpt-4o",
        }
    }
}

/// Flags of `capmesh agent` (each also read from `CAPMESH_AGENT_<FLAG>`).
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// Which agent: llm, flights, weather, planner (a consumer), or all (every tool in one server).
    #[arg(value_enum, env = "CAPMESH_AGENT_KIND")]
    pub kind: AgentKind,
    /// Port to listen on; 0 picks a free one. Once listening, `READY <port>` is printed on stdout.
    #[arg(long, env = "CAPMESH_AGENT_PORT", default_value_t = 0)]
    pub port: u16,
    /// Address to listen on.
    #[arg(long, env = "CAPMESH_AGENT_HOST", default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    pub host: IpAddr,
    /// Name shown in every answer, so a person sees who served (default: the kind).
    #[arg(long, env = "CAPMESH_AGENT_NAME")]
    pub name: Option<String>,
    /// llm only: which model the answers name (default claude).
    #[arg(long, value_enum, env = "CAPMESH_AGENT_FLAVOR")]
    pub flavor: Option<Flavor>,
    /// planner only: the MCP endpoint to plan through, normally its sidecar's federated endpoint.
    #[arg(long, env = "CAPMESH_AGENT_MESH", value_name = "URL")]
    pub mesh: Option<String>,
    /// planner only: the city to plan a trip to (default Lisbon).
    #[arg(long, env = "CAPMESH_AGENT_CITY")]
    pub city: Option<String>,
}

/// Runs what `args` asks for: a server until SIGTERM or Ctrl-C, or (planner) one trip plan,
/// printed line by line on stdout.
pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    if args.kind == AgentKind::Planner {
        if args.flavor.is_some() {
            bail!("--flavor applies only to the llm agent: drop it for the planner");
        }
        let mesh = args.mesh.as_deref().unwrap_or(DEFAULT_MESH_URL);
        let city = args.city.as_deref().unwrap_or(DEFAULT_CITY);
        let plan = plan_trip(mesh, city).await?;
        let mut out = std::io::stdout().lock();
        return match write!(out, "{plan}").and_then(|()| out.flush()) {
            // `capmesh agent planner | head -3`: the reader has what it wanted.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            other => other.context("could not write the plan to stdout"),
        };
    }
    for (flag, given) in [
        ("--mesh", args.mesh.is_some()),
        ("--city", args.city.is_some()),
    ] {
        if given {
            bail!("{flag} applies only to the planner: drop it, or run `agent planner {flag} ...`");
        }
    }
    if args.flavor.is_some() && !matches!(args.kind, AgentKind::Llm | AgentKind::All) {
        bail!(
            "--flavor applies only to the llm agent, not to {}: drop it",
            args.kind
        );
    }
    let opts = ServeOptions {
        host: args.host,
        port: args.port,
        name: args.name,
        flavor: args.flavor.unwrap_or_default(),
    };
    serve(args.kind, opts).await
}

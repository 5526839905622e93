//! `capmesh list [agents|capabilities|endpoints]`: what is in the mesh.

use capmesh_api::{AgentInfo, CapabilityInfo, Endpoint};
use serde_json::Value;

use crate::api::Api;
use crate::output::{self, Output, Table, join_unique};

/// What to list.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum What {
    /// Agents with their instances, health, tags, version and tools.
    #[default]
    #[value(alias = "agent")]
    Agents,
    /// Capabilities with their endpoints, agents, tags and versions.
    #[value(alias = "capability", alias = "caps")]
    Capabilities,
    /// Every endpoint: one function of one agent instance.
    #[value(alias = "endpoint")]
    Endpoints,
}

/// Flags of `capmesh list`.
#[derive(Debug, Clone, clap::Args)]
pub struct ListArgs {
    /// What to list.
    #[arg(value_enum, default_value_t = What::Agents)]
    pub what: What,
}

/// Lists agents, capabilities or endpoints.
pub async fn run(api: &Api, output: Output, args: ListArgs) -> anyhow::Result<()> {
    match args.what {
        What::Agents => {
            let raw: Value = api.get("/v1/agents").await?;
            if output == Output::Json {
                return output::print_json(&raw);
            }
            let agents: Vec<AgentInfo> = serde_json::from_value(raw)?;
            print_table(
                agents_table(&agents),
                "no agents are registered yet: start one next to its sidecar (capmesh-proxy, see docs/proxy.md)",
            )
        }
        What::Capabilities => {
            let raw: Value = api.get("/v1/capabilities").await?;
            if output == Output::Json {
                return output::print_json(&raw);
            }
            let caps: Vec<CapabilityInfo> = serde_json::from_value(raw)?;
            print_table(
                capabilities_table(&caps),
                "no capabilities are registered yet: an agent's tools become capabilities when its sidecar registers",
            )
        }
        What::Endpoints => {
            let raw: Value = api.get("/v1/capabilities").await?;
            if output == Output::Json {
                // The endpoint objects as the control plane sent them, in one flat list.
                let flat: Vec<&Value> = raw
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|c| c.get("endpoints").and_then(Value::as_array))
                    .flatten()
                    .collect();
                return output::print_json(&flat);
            }
            let caps: Vec<CapabilityInfo> = serde_json::from_value(raw)?;
            print_table(
                endpoints_table(&caps),
                "no endpoints are registered yet: an agent's tools become endpoints when its sidecar registers",
            )
        }
    }
}

fn print_table(table: Table, empty: &str) -> anyhow::Result<()> {
    output::print(&table.render())?;
    if table.is_empty() {
        eprintln!("({empty})");
    }
    Ok(())
}

fn version_text(v: Option<&semver::Version>) -> String {
    v.map(ToString::to_string).unwrap_or_default()
}

/// NAME, NAMESPACE, INSTANCES (connected/total), HEALTHY, TAGS, VERSION, TOOLS.
pub fn agents_table(agents: &[AgentInfo]) -> Table {
    let mut sorted: Vec<&AgentInfo> = agents.iter().collect();
    sorted.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let mut table = Table::new(&[
        "NAME",
        "NAMESPACE",
        "INSTANCES",
        "HEALTHY",
        "TAGS",
        "VERSION",
        "TOOLS",
    ]);
    for agent in sorted {
        let total = agent.instances.len();
        let connected = agent.instances.iter().filter(|i| i.connected).count();
        let healthy = agent.instances.iter().filter(|i| i.healthy).count();
        let tools = join_unique(agent.instances.iter().flat_map(|i| {
            i.tools.iter().map(|t| {
                if t.function == t.capability.as_str() {
                    t.function.clone()
                } else {
                    format!("{}={}", t.function, t.capability)
                }
            })
        }));
        table.row(vec![
            agent.name.to_string(),
            agent.namespace.to_string(),
            format!("{connected}/{total}"),
            format!("{healthy}/{total}"),
            join_unique(
                agent
                    .instances
                    .iter()
                    .flat_map(|i| i.tags.iter().map(|t| t.as_str())),
            ),
            join_unique(
                agent
                    .instances
                    .iter()
                    .map(|i| version_text(i.version.as_ref())),
            ),
            tools,
        ]);
    }
    table
}

/// `agent` or `namespace/agent` outside the default namespace.
pub fn agent_label(endpoint: &Endpoint) -> String {
    if endpoint.namespace.as_str() == "default" {
        endpoint.agent.to_string()
    } else {
        format!("{}/{}", endpoint.namespace, endpoint.agent)
    }
}

/// CAPABILITY, ENDPOINTS, HEALTHY, AGENTS, TAGS, VERSIONS.
pub fn capabilities_table(caps: &[CapabilityInfo]) -> Table {
    let mut sorted: Vec<&CapabilityInfo> = caps.iter().collect();
    sorted.sort_by(|a, b| a.capability.cmp(&b.capability));
    let mut table = Table::new(&[
        "CAPABILITY",
        "ENDPOINTS",
        "HEALTHY",
        "AGENTS",
        "TAGS",
        "VERSIONS",
    ]);
    for cap in sorted {
        let mut endpoints: Vec<&Endpoint> = cap.endpoints.iter().collect();
        endpoints.sort_by(|a, b| a.id.cmp(&b.id));
        table.row(vec![
            cap.capability.to_string(),
            endpoints.len().to_string(),
            endpoints.iter().filter(|e| e.healthy).count().to_string(),
            join_unique(endpoints.iter().map(|e| agent_label(e))),
            join_unique(
                endpoints
                    .iter()
                    .flat_map(|e| e.tags.iter().map(|t| t.as_str())),
            ),
            join_unique(endpoints.iter().map(|e| version_text(e.version.as_ref()))),
        ]);
    }
    table
}

/// CAPABILITY, AGENT, INSTANCE, ADDRESS, HEALTHY, TAGS, VERSION, FUNCTION.
pub fn endpoints_table(caps: &[CapabilityInfo]) -> Table {
    let mut endpoints: Vec<&Endpoint> = caps.iter().flat_map(|c| &c.endpoints).collect();
    endpoints.sort_by(|a, b| (&a.capability, &a.id).cmp(&(&b.capability, &b.id)));
    let mut table = Table::new(&[
        "CAPABILITY",
        "AGENT",
        "INSTANCE",
        "ADDRESS",
        "HEALTHY",
        "TAGS",
        "VERSION",
        "FUNCTION",
    ]);
    for e in endpoints {
        table.row(vec![
            e.capability.to_string(),
            agent_label(e),
            e.instance.clone(),
            e.address.clone(),
            if e.healthy { "yes" } else { "no" }.to_owned(),
            join_unique(e.tags.iter().map(|t| t.as_str())),
            version_text(e.version.as_ref()),
            e.function.clone(),
        ]);
    }
    table
}

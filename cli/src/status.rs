//! `capmesh status`: is the control plane up, and how is each proxy doing (its stream, the
//! snapshot it acked, its certificate, its agent's health).

use capmesh_api::{AgentInfo, InstanceInfo, Snapshot};
use serde_json::json;

use crate::api::Api;
use crate::output::{self, Output, Table};

/// Flags of `capmesh status` (none beyond the global ones).
#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {}

/// Prints the control plane's state and one row per proxy. Fails (non-zero exit) when the
/// control plane cannot be reached.
pub async fn run(api: &Api, output: Output, _args: StatusArgs) -> anyhow::Result<()> {
    let topology: Snapshot = api.get("/v1/topology").await?;
    let agents: Vec<AgentInfo> = api.get("/v1/agents").await?;
    let current = topology.version;
    let mut rows: Vec<(&AgentInfo, &InstanceInfo)> = agents
        .iter()
        .flat_map(|a| a.instances.iter().map(move |i| (a, i)))
        .collect();
    rows.sort_by(|(a, x), (b, y)| {
        (&a.namespace, &a.name, &x.proxy_id).cmp(&(&b.namespace, &b.name, &y.proxy_id))
    });
    let instances = rows.len();
    let connected = rows.iter().filter(|(_, i)| i.connected).count();
    let healthy_endpoints = topology.endpoints.iter().filter(|e| e.healthy).count();
    let trust = &topology.trust;
    // The bundle lists revoked entities too (proxies refuse them by name).
    let revoked = trust.revoked_entities.len();
    let entities = trust
        .entities
        .iter()
        .filter(|e| !trust.revoked_entities.contains(&e.name))
        .count();

    if output == Output::Json {
        let proxies: Vec<_> = rows
            .iter()
            .map(|(a, i)| {
                json!({
                    "agent": a.name,
                    "namespace": a.namespace,
                    "identity": a.identity,
                    "proxy_id": i.proxy_id,
                    "address": i.address,
                    "connected": i.connected,
                    "since_unix": i.since_unix,
                    "snapshot_version": i.snapshot_version,
                    "current_version": current,
                    "certificate_not_after_unix": i.certificate_not_after_unix,
                    "healthy": i.healthy,
                    "refused": i.refused,
                    "health_detail": i.health_detail,
                })
            })
            .collect();
        return output::print_json(&json!({
            "control_plane": {
                "url": api.url(),
                "reachable": true,
                "trust_domain": trust.trust_domain,
                "version": current,
                "agents": agents.len(),
                "instances": instances,
                "connected": connected,
                "capabilities": topology.known_capabilities.len(),
                "endpoints": topology.endpoints.len(),
                "healthy_endpoints": healthy_endpoints,
                "trusted_entities": entities,
                "revoked_entities": revoked,
            },
            "proxies": proxies,
        }));
    }

    let mut text = String::new();
    text.push_str(&format!("Control plane  {} (reachable)\n", api.url()));
    text.push_str(&format!("Trust domain   {}\n", trust.trust_domain));
    text.push_str(&format!(
        "Topology       version {current}: {}, {} ({connected} connected), {}, {} ({healthy_endpoints} healthy)\n",
        count(agents.len(), "agent", "agents"),
        count(instances, "proxy", "proxies"),
        count(topology.known_capabilities.len(), "capability", "capabilities"),
        count(topology.endpoints.len(), "endpoint", "endpoints"),
    ));
    if entities > 0 || revoked > 0 {
        text.push_str(&format!(
            "Entities       {entities} trusted, {revoked} revoked\n"
        ));
    }
    text.push('\n');
    let mut table = Table::new(&[
        "AGENT",
        "PROXY",
        "STREAM",
        "SNAPSHOT",
        "CERT EXPIRES",
        "HEALTH",
    ]);
    for (agent, inst) in &rows {
        let name = if agent.namespace.as_str() == "default" {
            agent.name.to_string()
        } else {
            format!("{}/{}", agent.namespace, agent.name)
        };
        let state = if inst.connected {
            "connected"
        } else {
            "disconnected"
        };
        let stream = match inst.since_unix {
            Some(since) => format!("{state} since {}", output::ago(since)),
            None => state.to_owned(),
        };
        // acked/current. A proxy is sent a new version only when something it depends on
        // changes, so trailing the control plane is not by itself a sign of trouble.
        let snapshot = match inst.snapshot_version {
            Some(v) => format!("{v}/{current}"),
            None => format!("none/{current}"),
        };
        let cert = inst
            .certificate_not_after_unix
            .map(output::expires)
            .unwrap_or_default();
        let health = if inst.healthy { "healthy" } else { "unhealthy" };
        table.row(vec![
            name,
            inst.proxy_id.clone(),
            stream,
            snapshot,
            cert,
            health.to_owned(),
        ]);
    }
    if table.is_empty() {
        text.push_str(
            "No proxies are connected yet: start one next to an agent with capmesh-proxy (see docs/proxy.md).\n",
        );
    } else {
        text.push_str(&table.render());
        // Why each unhealthy agent is unhealthy, as its sidecar said.
        for (_, inst) in &rows {
            if let (false, Some(why)) = (inst.healthy, &inst.health_detail) {
                text.push_str(&format!("{} unhealthy: {why}\n", inst.proxy_id));
            }
        }
    }
    // Capabilities the control plane would not publish (the policy's provide rules).
    for (agent, inst) in &rows {
        for r in &inst.refused {
            text.push_str(&format!(
                "refused: {}/{} ({}) may not provide {}: {}\n",
                agent.namespace, agent.name, inst.proxy_id, r.capability, r.error
            ));
        }
    }
    output::print(&text)?;
    Ok(())
}

/// `1 agent`, `2 agents`.
fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

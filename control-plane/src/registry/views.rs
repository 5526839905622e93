//! What the REST API and the metrics show of the registry.

use std::collections::{BTreeMap, BTreeSet};

use capmesh_api::rest::{AgentInfo, CapabilityInfo, InstanceInfo};

use super::Registry;

impl Registry {
    /// Every agent with its instances, for `GET /v1/agents`.
    pub fn agents(&self) -> Vec<AgentInfo> {
        let inner = self.lock();
        let mut agents: BTreeMap<(String, String), AgentInfo> = BTreeMap::new();
        for inst in inner.instances.values() {
            let key = (inst.node.namespace.to_string(), inst.node.agent.to_string());
            let agent = agents.entry(key).or_insert_with(|| AgentInfo {
                name: inst.node.agent.clone(),
                namespace: inst.node.namespace.clone(),
                identity: inst.identity.clone(),
                instances: Vec::new(),
            });
            agent.instances.push(InstanceInfo {
                replica: Some(inst.owner.clone().unwrap_or_else(|| self.replica.clone())),
                proxy_id: inst.node.proxy_id.clone(),
                address: inst.registration.endpoint.clone(),
                zone: inst.node.zone.clone(),
                healthy: inst.healthy,
                health_detail: inst.health_detail.clone(),
                connected: inst.connected,
                tags: inst.registration.tags.clone(),
                version: inst.registration.version.clone(),
                snapshot_version: inst.held,
                certificate_not_after_unix: inst.cert_not_after,
                since_unix: Some(inst.since),
                tools: inst.registration.tools.clone(),
                refused: inst.refused.clone(),
            });
        }
        let mut out: Vec<AgentInfo> = agents.into_values().collect();
        for a in &mut out {
            a.instances.sort_by(|x, y| x.proxy_id.cmp(&y.proxy_id));
        }
        out
    }

    /// Every capability with its endpoints, for `GET /v1/capabilities`.
    pub fn capabilities(&self) -> Vec<CapabilityInfo> {
        self.lock()
            .caps
            .iter()
            .map(|(cap, entry)| CapabilityInfo {
                capability: cap.clone(),
                endpoints: entry.endpoints.values().map(|e| (**e).clone()).collect(),
            })
            .collect()
    }

    /// Counts for metrics: (connected streams, agents, capabilities).
    pub fn counts(&self) -> (usize, usize, usize) {
        let inner = self.lock();
        let connected = inner
            .instances
            .values()
            .filter(|i| i.connected && i.owner.is_none())
            .count();
        let agents: BTreeSet<(&str, &str)> = inner
            .instances
            .values()
            .map(|i| (i.node.namespace.as_str(), i.node.agent.as_str()))
            .collect();
        (connected, agents.len(), inner.caps.len())
    }
}

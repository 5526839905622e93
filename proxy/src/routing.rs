//! The routing table: an immutable view built from each snapshot, swapped in atomically, plus
//! the per-endpoint runtime state (latency, breaker) that survives from one table to the next.

use crate::FastMap;
use std::sync::Arc;

use capmesh_api::{
    Capability, Dependency, DependencyTarget, Endpoint, EndpointId, Selector, Snapshot,
};
use serde_json::{Value, json};

use crate::balance::{EndpointStats, rank};
use crate::breaker::BreakerConfig;
use crate::forward::Ranks;

/// A tool the local agent sees on the federated endpoint.
#[derive(Debug, Clone)]
pub struct ToolEntry {
    /// The name the agent calls (the alias, or the capability).
    pub name: String,
    /// The capability it routes to.
    pub capability: Capability,
    /// Tag and version rules for choosing a provider.
    pub selector: Selector,
    /// Description (from a provider).
    pub description: Option<String>,
    /// Input schema (from a provider).
    pub input_schema: Value,
    /// Its healthy endpoints ranked by the selector, best first: computed once per snapshot,
    /// read by every call.
    pub ranks: Arc<Ranks>,
    /// Endpoints registered for the capability, healthy or not.
    pub registered: usize,
}

/// Equal when the agent would see the same tool (endpoints may differ).
impl PartialEq for ToolEntry {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && self.capability == other.capability
            && self.selector == other.selector
            && self.description == other.description
            && self.input_schema == other.input_schema
    }
}

impl ToolEntry {
    /// As an MCP `Tool` object.
    pub fn to_json(&self) -> Value {
        let mut tool = json!({ "name": self.name, "inputSchema": self.input_schema });
        if let Some(d) = &self.description {
            tool["description"] = json!(d);
        }
        tool
    }
}

/// One snapshot, indexed for routing.
#[derive(Debug, Default)]
pub struct Routing {
    /// The snapshot as received.
    pub snapshot: Option<Arc<Snapshot>>,
    endpoints: FastMap<Capability, Vec<Arc<Endpoint>>>,
    stats: FastMap<EndpointId, Arc<EndpointStats>>,
    /// The federated endpoint's tools, sorted by name.
    pub tools: Arc<Vec<ToolEntry>>,
    /// The mesh's sealing key from the snapshot's settings, ready to use (its key schedule is
    /// computed once per snapshot, not per call).
    pub sealer: Option<crate::seal::Sealer>,
}

impl Routing {
    /// Indexes `snapshot` for a proxy with `deps`, as identity `caller`, keeping the runtime
    /// state of endpoints that were already known.
    pub fn build(
        snapshot: Snapshot,
        deps: &[Dependency],
        caller: &str,
        previous: &Routing,
        breaker: BreakerConfig,
    ) -> Self {
        let mut endpoints: FastMap<Capability, Vec<Arc<Endpoint>>> = FastMap::default();
        let mut stats = FastMap::default();
        for ep in &snapshot.endpoints {
            let s = previous
                .stats
                .get(&ep.id)
                .cloned()
                .unwrap_or_else(|| Arc::new(EndpointStats::new(breaker)));
            stats.insert(ep.id.clone(), s);
            endpoints
                .entry(ep.capability.clone())
                .or_default()
                .push(Arc::new(ep.clone()));
        }
        for list in endpoints.values_mut() {
            list.sort_by(|a, b| a.id.cmp(&b.id));
        }
        let mut tools: Vec<ToolEntry> = Vec::new();
        let mut add = |name: String, capability: &Capability, selector: &Selector| {
            if tools.iter().any(|t| t.name == name)
                || !snapshot.policy.allows(Some(caller), capability.as_str())
            {
                return;
            }
            let list = endpoints.get(capability);
            let best = list.and_then(|l| {
                l.iter()
                    .filter(|e| selector.matches(&e.tags, e.version.as_ref()).is_some())
                    .max_by_key(|e| (e.healthy, selector.matches(&e.tags, e.version.as_ref())))
            });
            let Some(best) = best else { return };
            tools.push(ToolEntry {
                name,
                capability: capability.clone(),
                selector: selector.clone(),
                ranks: Arc::new(rank(list.into_iter().flatten().cloned(), selector)),
                registered: list.map_or(0, Vec::len),
                description: best.description.clone(),
                input_schema: best
                    .input_schema
                    .clone()
                    .unwrap_or_else(|| json!({ "type": "object" })),
            });
        };
        for dep in deps {
            match &dep.capability {
                DependencyTarget::One(cap) => {
                    let name = dep.alias.as_ref().unwrap_or(cap).to_string();
                    add(name, cap, &dep.selector);
                }
                DependencyTarget::All => {
                    let mut caps: Vec<&Capability> = endpoints.keys().collect();
                    caps.sort();
                    for cap in caps {
                        add(cap.to_string(), cap, &dep.selector);
                    }
                }
            }
        }
        tools.sort_by(|a, b| a.name.cmp(&b.name));
        let sealer = crate::seal::Sealer::from_hex(&snapshot.settings.session_key);
        Self {
            sealer,
            snapshot: Some(Arc::new(snapshot)),
            endpoints,
            stats,
            tools: Arc::new(tools),
        }
    }

    /// Every endpoint of `capability` (healthy or not).
    pub fn endpoints(&self, capability: &Capability) -> &[Arc<Endpoint>] {
        self.endpoints
            .get(capability)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Runtime state of an endpoint.
    pub fn stats(&self, id: &EndpointId) -> Option<Arc<EndpointStats>> {
        self.stats.get(id).cloned()
    }

    /// The tool called `name`, if the agent may call it.
    pub fn tool(&self, name: &str) -> Option<&ToolEntry> {
        self.tools.iter().find(|t| t.name == name)
    }

    /// The first tool entry that routes to `capability` (for passthrough), if the agent may
    /// call it.
    pub fn tool_for(&self, capability: &Capability) -> Option<&ToolEntry> {
        self.tools.iter().find(|t| &t.capability == capability)
    }

    /// Whether the capability exists anywhere in the mesh.
    pub fn known(&self, capability: &Capability) -> bool {
        self.snapshot.as_ref().is_some_and(|s| s.knows(capability))
    }

    /// Every (capability, endpoint id, stats) for metrics.
    pub fn all_stats(&self) -> impl Iterator<Item = (&Capability, &Endpoint, &Arc<EndpointStats>)> {
        let stats = &self.stats;
        self.endpoints.iter().flat_map(move |(cap, eps)| {
            eps.iter()
                .filter_map(move |e| stats.get(&e.id).map(|s| (cap, e.as_ref(), s)))
        })
    }
}

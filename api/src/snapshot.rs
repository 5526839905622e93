//! The topology a proxy routes on: a versioned, immutable snapshot of endpoints, trust, policy
//! and mesh settings, and the deltas that move it from one version to the next.

use std::collections::HashSet;
use std::fmt;

use semver::Version;
use serde::{Deserialize, Serialize};

use crate::names::{AgentName, Capability, Namespace, Tag, TrustDomain};
use crate::policy::Policy;

/// The version of a snapshot. Versions only grow; a proxy acks the version it holds.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct SnapshotVersion(pub u64);

impl fmt::Display for SnapshotVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// An endpoint's id: unique per agent instance and function,
/// `<namespace>/<agent>/<proxy id>/<function>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EndpointId(pub String);

impl EndpointId {
    /// The id of `function` on the instance `instance` (a proxy id) of `namespace/agent`.
    pub fn new(namespace: &Namespace, agent: &AgentName, instance: &str, function: &str) -> Self {
        EndpointId(format!("{namespace}/{agent}/{instance}/{function}"))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EndpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One routable provider: one function of one agent instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Endpoint {
    /// Unique id (see [`EndpointId`]).
    pub id: EndpointId,
    /// The providing agent.
    pub agent: AgentName,
    /// The providing agent's namespace.
    pub namespace: Namespace,
    /// The instance: the provider's proxy id.
    pub instance: String,
    /// The SPIFFE ID the provider's certificate must carry.
    pub identity: String,
    /// The `host:port` of the provider's inbound listener.
    pub address: String,
    /// The provider's zone, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// The capability served.
    pub capability: Capability,
    /// The MCP tool name on the provider.
    pub function: String,
    /// The tool's version (or the agent's when the tool has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<Version>,
    /// The agent's tags together with the tool's.
    #[serde(default)]
    pub tags: Vec<Tag>,
    /// The tool's description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The tool's JSON input schema.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_schema: Option<serde_json::Value>,
    /// Whether the provider's proxy reports its agent healthy.
    pub healthy: bool,
}

/// An entity (another trust domain and its CA) as proxies see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntityTrust {
    /// The entity's name.
    pub name: String,
    /// The only trust domain its CA may issue identities in (`None`: none at all).
    #[serde(default)]
    pub trust_domain: Option<TrustDomain>,
    /// The entity's CA certificate (PEM).
    pub ca_pem: String,
}

/// What a proxy trusts and what it refuses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustBundle {
    /// The mesh's trust domain; peer SPIFFE IDs must be in it.
    pub trust_domain: TrustDomain,
    /// Trusted CA certificates (PEM): the mesh CA first, then registered entity CAs.
    #[serde(default)]
    pub ca_pems: Vec<String>,
    /// The registered entities.
    #[serde(default)]
    pub entities: Vec<EntityTrust>,
    /// Names of revoked entities, whose certificates are refused.
    #[serde(default)]
    pub revoked_entities: Vec<String>,
    /// Serial numbers of revoked certificates (lowercase hex, no separators).
    #[serde(default)]
    pub revoked_serials: Vec<String>,
    /// Revoked workload identities (SPIFFE IDs), refused whatever certificate they present.
    #[serde(default)]
    pub revoked_identities: Vec<String>,
}

/// Mesh-wide data-plane settings. Missing fields take their defaults.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MeshSettings {
    /// Header names or prefixes (`x-tenant-*`) carried on every hop.
    pub propagate_headers: Vec<String>,
    /// Request timeout when the caller sets no `x-capmesh-timeout` (default 300 000 ms).
    pub request_timeout_ms: u64,
    /// Connect timeout (default 1 000 ms).
    pub connect_timeout_ms: u64,
    /// Retries allowed as a share of requests (default 20 %).
    pub retry_budget_percent: u32,
    /// Retries always allowed per second, on top of the budget (default 10).
    pub retry_min_per_sec: u32,
    /// Consecutive failures that eject an endpoint (default 5).
    pub breaker_failures: u32,
    /// The mesh's secret for sealing passthrough session ids (32 bytes, lowercase hex), so any
    /// proxy can open an id another one sealed. Sent to proxies only: blank in every view shown
    /// to people (`GET /v1/topology`, a proxy's `/config`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub session_key: String,
}

impl fmt::Debug for MeshSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshSettings")
            .field("propagate_headers", &self.propagate_headers)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("retry_budget_percent", &self.retry_budget_percent)
            .field("retry_min_per_sec", &self.retry_min_per_sec)
            .field("breaker_failures", &self.breaker_failures)
            .field(
                "session_key",
                &if self.session_key.is_empty() {
                    ""
                } else {
                    "<redacted>"
                },
            )
            .finish()
    }
}

impl Default for MeshSettings {
    fn default() -> Self {
        MeshSettings {
            propagate_headers: Vec::new(),
            request_timeout_ms: 300_000,
            connect_timeout_ms: 1_000,
            retry_budget_percent: 20,
            retry_min_per_sec: 10,
            breaker_failures: 5,
            session_key: String::new(),
        }
    }
}

/// Everything one proxy needs, at one version. Never mutated: a change builds a new snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// This snapshot's version.
    pub version: SnapshotVersion,
    /// Endpoints of the capabilities the proxy's agent depends on.
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    /// Every capability in the mesh, so "unknown capability" differs from "no healthy endpoint".
    #[serde(default)]
    pub known_capabilities: Vec<Capability>,
    /// Trusted CAs and revocations.
    pub trust: TrustBundle,
    /// The authorization policy for this proxy's agent.
    #[serde(default)]
    pub policy: Policy,
    /// Mesh settings.
    #[serde(default)]
    pub settings: MeshSettings,
}

/// The change from `base_version` to `version`. `None` fields are unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delta {
    /// The version this delta produces.
    pub version: SnapshotVersion,
    /// The version it applies to.
    pub base_version: SnapshotVersion,
    /// Endpoints added or replaced (matched by id).
    #[serde(default)]
    pub upserts: Vec<Endpoint>,
    /// Ids of endpoints withdrawn.
    #[serde(default)]
    pub removals: Vec<EndpointId>,
    /// The new list of known capabilities, when it changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub known_capabilities: Option<Vec<Capability>>,
    /// The new trust bundle, when it changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust: Option<TrustBundle>,
    /// The new policy, when it changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<Policy>,
    /// The new settings, when they changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settings: Option<MeshSettings>,
}

/// Why a delta was not applied (the proxy nacks it and keeps its snapshot).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    /// The delta was built on a different snapshot than the one held.
    #[error("delta to version {version} is based on version {base}, but version {held} is held")]
    BaseMismatch {
        /// The version held.
        held: SnapshotVersion,
        /// The delta's base version.
        base: SnapshotVersion,
        /// The delta's target version.
        version: SnapshotVersion,
    },
    /// The delta would not move the version forward.
    #[error("delta to version {version} does not advance past the held version {held}")]
    NotNewer {
        /// The version held.
        held: SnapshotVersion,
        /// The delta's target version.
        version: SnapshotVersion,
    },
}

impl Snapshot {
    /// Builds the snapshot that `delta` produces from this one; `self` is left as it was.
    ///
    /// Removals are applied first (unknown ids are ignored), then upserts, which replace an
    /// endpoint with the same id in place or are appended.
    pub fn apply(&self, delta: &Delta) -> Result<Snapshot, DeltaError> {
        if delta.base_version != self.version {
            return Err(DeltaError::BaseMismatch {
                held: self.version,
                base: delta.base_version,
                version: delta.version,
            });
        }
        if delta.version <= self.version {
            return Err(DeltaError::NotNewer {
                held: self.version,
                version: delta.version,
            });
        }
        let removed: HashSet<&EndpointId> = delta.removals.iter().collect();
        let mut endpoints: Vec<Endpoint> = self
            .endpoints
            .iter()
            .filter(|e| !removed.contains(&e.id))
            .cloned()
            .collect();
        for upsert in &delta.upserts {
            match endpoints.iter_mut().find(|e| e.id == upsert.id) {
                Some(existing) => *existing = upsert.clone(),
                None => endpoints.push(upsert.clone()),
            }
        }
        Ok(Snapshot {
            version: delta.version,
            endpoints,
            known_capabilities: delta
                .known_capabilities
                .clone()
                .unwrap_or_else(|| self.known_capabilities.clone()),
            trust: delta.trust.clone().unwrap_or_else(|| self.trust.clone()),
            policy: delta.policy.clone().unwrap_or_else(|| self.policy.clone()),
            settings: delta
                .settings
                .clone()
                .unwrap_or_else(|| self.settings.clone()),
        })
    }

    /// The endpoints serving `capability` (healthy or not).
    pub fn endpoints_for<'a>(
        &'a self,
        capability: &'a Capability,
    ) -> impl Iterator<Item = &'a Endpoint> + 'a {
        self.endpoints
            .iter()
            .filter(move |e| &e.capability == capability)
    }

    /// Whether `capability` exists anywhere in the mesh.
    pub fn knows(&self, capability: &Capability) -> bool {
        self.known_capabilities.contains(capability)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(instance: &str, function: &str, healthy: bool) -> Endpoint {
        let namespace = Namespace::new("default").unwrap();
        let agent = AgentName::new("weather").unwrap();
        Endpoint {
            id: EndpointId::new(&namespace, &agent, instance, function),
            identity: "spiffe://capmesh.local/ns/default/agent/weather".into(),
            agent,
            namespace,
            instance: instance.into(),
            address: "10.0.0.7:15006".into(),
            zone: None,
            capability: Capability::new("weather").unwrap(),
            function: function.into(),
            version: Some(Version::new(1, 0, 0)),
            tags: vec![],
            description: None,
            input_schema: None,
            healthy,
        }
    }

    fn snapshot(version: u64, endpoints: Vec<Endpoint>) -> Snapshot {
        Snapshot {
            version: SnapshotVersion(version),
            endpoints,
            known_capabilities: vec![Capability::new("weather").unwrap()],
            trust: TrustBundle {
                trust_domain: TrustDomain::new("capmesh.local").unwrap(),
                ca_pems: vec!["mesh-ca".into()],
                entities: vec![],
                revoked_entities: vec![],
                revoked_serials: vec![],
                revoked_identities: vec![],
            },
            policy: Policy::default(),
            settings: MeshSettings::default(),
        }
    }

    fn delta(base: u64, version: u64) -> Delta {
        Delta {
            version: SnapshotVersion(version),
            base_version: SnapshotVersion(base),
            upserts: vec![],
            removals: vec![],
            known_capabilities: None,
            trust: None,
            policy: None,
            settings: None,
        }
    }

    #[test]
    fn endpoint_ids_name_namespace_agent_instance_and_function() {
        assert_eq!(
            endpoint("p-1", "get_weather", true).id.as_str(),
            "default/weather/p-1/get_weather"
        );
    }

    #[test]
    fn deltas_on_another_base_or_not_newer_are_refused() {
        let held = snapshot(5, vec![]);
        assert_eq!(
            held.apply(&delta(4, 6)),
            Err(DeltaError::BaseMismatch {
                held: SnapshotVersion(5),
                base: SnapshotVersion(4),
                version: SnapshotVersion(6),
            })
        );
        assert_eq!(
            held.apply(&delta(5, 5)).unwrap_err().to_string(),
            "delta to version 5 does not advance past the held version 5"
        );
        assert!(held.apply(&delta(5, 9)).is_ok());
    }

    #[test]
    fn upserts_replace_by_id_removals_withdraw_and_the_old_snapshot_stays() {
        let a = endpoint("p-1", "get_weather", true);
        let b = endpoint("p-2", "get_weather", true);
        let held = snapshot(1, vec![a.clone(), b.clone()]);
        let before = held.clone();

        let mut change = delta(1, 2);
        change.upserts = vec![
            endpoint("p-1", "get_weather", false),
            endpoint("p-3", "get_weather", true),
        ];
        change.removals = vec![b.id.clone(), EndpointId("default/ghost/p-9/x".into())];
        let settings = MeshSettings {
            breaker_failures: 9,
            ..MeshSettings::default()
        };
        change.settings = Some(settings.clone());

        let next = held.apply(&change).unwrap();
        assert_eq!(next.version, SnapshotVersion(2));
        let ids: Vec<&str> = next.endpoints.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "default/weather/p-1/get_weather",
                "default/weather/p-3/get_weather"
            ]
        );
        assert!(
            !next.endpoints[0].healthy,
            "the upsert replaced the old endpoint"
        );
        assert_eq!(next.settings, settings);
        assert_eq!(next.trust, held.trust, "unchanged parts carry over");
        assert_eq!(next.known_capabilities, held.known_capabilities);
        assert_eq!(held, before, "the held snapshot is untouched");
        assert_eq!(held.endpoints.len(), 2);
    }

    #[test]
    fn capabilities_known_without_endpoints_are_told_apart() {
        let snap = snapshot(1, vec![endpoint("p-1", "get_weather", false)]);
        let weather = Capability::new("weather").unwrap();
        let news = Capability::new("news").unwrap();
        assert!(snap.knows(&weather) && !snap.knows(&news));
        assert_eq!(snap.endpoints_for(&weather).count(), 1);
        assert_eq!(snap.endpoints_for(&news).count(), 0);
    }

    #[test]
    fn settings_fill_missing_fields_with_defaults() {
        let s: MeshSettings =
            serde_json::from_str(r#"{"request_timeout_ms":5000,"future_knob":true}"#).unwrap();
        assert_eq!(s.request_timeout_ms, 5000);
        assert_eq!(s.connect_timeout_ms, 1000);
        assert_eq!(s.retry_budget_percent, 20);
        assert_eq!(s.retry_min_per_sec, 10);
        assert_eq!(s.breaker_failures, 5);
    }
}

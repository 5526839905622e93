//! Request and response bodies (JSON) of the control plane's REST API under `/v1/`.

use semver::Version;
use serde::{Deserialize, Serialize};

use crate::names::{AgentName, Capability, NameError, Namespace, Tag, TrustDomain};
use crate::registration::ToolSpec;
use crate::snapshot::{Endpoint, SnapshotVersion};

/// Every error response: a short machine-readable `error` and a `detail` saying what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// A stable code (`not_found`, `invalid_request`, `unauthorized`, ...).
    pub error: String,
    /// What went wrong and how to fix it, for people.
    pub detail: String,
}

/// One running instance of an agent (one proxy).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// The instance's proxy id.
    pub proxy_id: String,
    /// The control-plane replica that holds (or last held) its stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
    /// The `host:port` other proxies dial.
    pub address: String,
    /// The instance's zone, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Whether its agent is healthy.
    pub healthy: bool,
    /// Why its agent is unhealthy, as its proxy reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_detail: Option<String>,
    /// Whether its proxy's stream is connected now (false during the grace period).
    pub connected: bool,
    /// The agent's tags.
    #[serde(default)]
    pub tags: Vec<Tag>,
    /// The agent's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<Version>,
    /// The snapshot version the proxy last acked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_version: Option<SnapshotVersion>,
    /// When the certificate the proxy presented on its stream expires (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_not_after_unix: Option<i64>,
    /// When its stream connected, or last disconnected when `connected` is false (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_unix: Option<i64>,
    /// The tools it registered.
    #[serde(default)]
    pub tools: Vec<ToolSpec>,
    /// Capabilities of its registration that the control plane refused (`provide` rules), with
    /// why; they are not published.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<RefusedCapability>,
}

/// A capability of a registration that the control plane refused to publish.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedCapability {
    /// The capability.
    pub capability: Capability,
    /// Why, and what to change.
    pub error: String,
}

/// An agent and its instances (`GET /v1/agents`, `GET /v1/agents/{id}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentInfo {
    /// The agent's name.
    pub name: AgentName,
    /// The agent's namespace.
    pub namespace: Namespace,
    /// The agent's SPIFFE ID.
    pub identity: String,
    /// Its running instances.
    #[serde(default)]
    pub instances: Vec<InstanceInfo>,
}

/// A capability and every endpoint serving it (`GET /v1/capabilities`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CapabilityInfo {
    /// The capability.
    pub capability: Capability,
    /// Its endpoints, healthy or not.
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
}

/// `POST /v1/certificates`: a CSR, with a bootstrap token for a proxy's first certificate
/// (renewals authenticate with the current certificate instead).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateRequest {
    /// The PKCS#10 certificate signing request (PEM).
    pub csr_pem: String,
    /// The bootstrap token, for a first certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// The answer to a [`CertificateRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateResponse {
    /// The issued certificate followed by any intermediates (PEM).
    pub certificate_chain_pem: String,
    /// The CAs to trust for mesh peers (PEM).
    pub ca_bundle_pem: String,
    /// When the certificate expires (Unix seconds).
    pub not_after_unix: i64,
    /// The SPIFFE ID the certificate carries.
    pub identity: String,
}

/// `POST /v1/entities`: register another SPIFFE trust domain and the CA that speaks for it
/// (SPIFFE federation). Certificates chaining to `ca_pem` are valid only for identities in
/// `trust_domain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntityRequest {
    /// The entity's name: a DNS label (`partner-a`).
    pub name: String,
    /// The entity's trust domain (`partner.example`); never the mesh's own.
    pub trust_domain: TrustDomain,
    /// The entity's CA certificate (PEM).
    pub ca_pem: String,
}

impl EntityRequest {
    /// Checks the name is a DNS label (lowercase letters, digits and '-', at most 63).
    pub fn validate(&self) -> Result<(), NameError> {
        // Same rule as a namespace; only the name of the thing differs in the message.
        Namespace::new(self.name.as_str())
            .map(drop)
            .map_err(|e| NameError {
                kind: "entity name",
                ..e
            })
    }
}

/// A registered entity (`GET /v1/entities`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entity {
    /// The entity's name.
    pub name: String,
    /// The trust domain its CA may issue identities in. `None` only for an entity registered
    /// before entities had trust domains: its certificates are refused until it is registered
    /// again with one.
    #[serde(default)]
    pub trust_domain: Option<TrustDomain>,
    /// The entity's CA certificate (PEM).
    pub ca_pem: String,
    /// SHA-256 of the CA certificate's DER, lowercase hex.
    pub fingerprint_sha256: String,
    /// When it was registered (Unix seconds).
    pub created_unix: i64,
    /// When it was revoked (Unix seconds), if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_unix: Option<i64>,
}

/// `POST /v1/tokens`: create a bootstrap token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRequest {
    /// The namespace the token may get certificates in.
    pub namespace: Namespace,
    /// Which agent names it may get certificates for (a glob: `weather-*`, `*`).
    pub agent_pattern: String,
    /// How long the token is valid, in seconds (at most the control plane's
    /// `--max-token-ttl`).
    pub ttl_secs: u64,
    /// How many certificates it may get. Absent: one when `agent_pattern` names one exact
    /// agent, unlimited for a pattern with `*`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uses: Option<u32>,
    /// Must be true for a token in the `capmesh-system` namespace (the control plane's, the
    /// admin's and the CLI's identities), so such a token is never made by accident.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub system: bool,
    /// A note for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// A bootstrap token, without its secret (`GET /v1/tokens`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    /// The token's id (for `DELETE /v1/tokens/{id}`).
    pub id: String,
    /// The namespace it may get certificates in.
    pub namespace: Namespace,
    /// Which agent names it may get certificates for (a glob).
    pub agent_pattern: String,
    /// When it expires (Unix seconds).
    pub expires_unix: i64,
    /// Whether it was revoked.
    pub revoked: bool,
    /// How many certificates it may get in all (`None`: unlimited until it expires).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uses: Option<u32>,
    /// How many certificates it got so far.
    #[serde(default)]
    pub used: u32,
    /// A note for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// The answer to a [`TokenRequest`]: the only time the secret is shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCreated {
    /// The token's details.
    pub info: TokenInfo,
    /// The secret to pass as `--bootstrap-token`.
    pub token: String,
}

/// `POST /v1/revocations`: revoke one workload identity or one certificate serial. Exactly one
/// of `identity` and `serial` is given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationRequest {
    /// `<namespace>/<agent>` (in the mesh's trust domain) or a whole SPIFFE ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// A certificate serial number (hex, `:` separators and leading zeros allowed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// A note for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A revocation in force (`GET /v1/revocations`); `DELETE /v1/revocations/{id}` lifts it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// Its id.
    pub id: String,
    /// The revoked SPIFFE ID, for an identity revocation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// The revoked serial (lowercase hex without leading zero bytes), for a serial revocation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// A note for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When it was made (Unix seconds).
    pub created_unix: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entity_names_follow_the_dns_label_rule() {
        let request = |name: &str| EntityRequest {
            name: name.into(),
            trust_domain: TrustDomain::new("partner.example").unwrap(),
            ca_pem: String::new(),
        };
        assert!(request("partner-a").validate().is_ok());
        let err = request("Partner A").validate().unwrap_err().to_string();
        assert!(
            err.starts_with("entity name \"Partner A\" is not valid: it is a DNS label"),
            "{err}"
        );
    }

    #[test]
    fn bodies_read_with_missing_optionals_and_unknown_fields() {
        let info: TokenInfo = serde_json::from_str(
            r#"{"id":"t1","namespace":"default","agent_pattern":"*","expires_unix":1,"revoked":false,"new":0}"#,
        )
        .unwrap();
        assert_eq!(info.description, None);
        let out = serde_json::to_value(&info).unwrap();
        assert!(
            out.get("description").is_none(),
            "absent optionals are left out: {out}"
        );

        let agent: AgentInfo = serde_json::from_str(
            r#"{"name":"weather","namespace":"default","identity":"spiffe://capmesh.local/ns/default/agent/weather",
                "instances":[{"proxy_id":"p-1","address":"10.0.0.7:15006","healthy":true,"connected":false,
                "snapshot_version":4,"tools":[{"function":"get_weather","capability":"weather"}]}]}"#,
        )
        .unwrap();
        assert_eq!(
            agent.instances[0].snapshot_version,
            Some(SnapshotVersion(4))
        );
        assert!(!agent.instances[0].connected);
        assert_eq!(agent.instances[0].tools[0].function, "get_weather");

        let bad = serde_json::from_str::<TokenRequest>(
            r#"{"namespace":"Bad NS","agent_pattern":"*","ttl_secs":60}"#,
        );
        assert!(bad.is_err());
    }
}

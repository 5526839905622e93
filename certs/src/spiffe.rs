//! SPIFFE IDs: `spiffe://<trust-domain>/ns/<namespace>/agent/<agent-name>`.

use std::fmt;
use std::str::FromStr;

use capmesh_api::{AgentName, NameError, Namespace, TrustDomain};

/// A workload identity, carried in a certificate's URI SAN. No other part of a certificate
/// (CN, DNS names) is ever read as an identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    namespace: Namespace,
    agent: AgentName,
}

/// Why a string is not a capmesh SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeError {
    /// The scheme is not `spiffe://`.
    #[error("identity {0:?} is not a SPIFFE ID: it must start with spiffe://")]
    Scheme(String),
    /// The path does not have the form `/ns/<namespace>/agent/<agent-name>`.
    #[error(
        "identity {0:?} has the wrong path: use spiffe://<trust-domain>/ns/<namespace>/agent/<agent-name>"
    )]
    Path(String),
    /// One of the parts breaks its naming rule.
    #[error("identity {id:?}: {source}")]
    Part {
        /// The whole identity as given.
        id: String,
        /// The part that is wrong and why.
        source: NameError,
    },
}

impl SpiffeId {
    /// Builds an identity from already-validated parts.
    pub fn new(trust_domain: TrustDomain, namespace: Namespace, agent: AgentName) -> Self {
        Self {
            trust_domain,
            namespace,
            agent,
        }
    }

    /// The trust domain (`capmesh.local`).
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The namespace (`default`).
    pub fn namespace(&self) -> &Namespace {
        &self.namespace
    }

    /// The agent's name.
    pub fn agent(&self) -> &AgentName {
        &self.agent
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeError;

    fn from_str(s: &str) -> Result<Self, SpiffeError> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| SpiffeError::Scheme(s.to_owned()))?;
        let (domain, path) = rest
            .split_once('/')
            .ok_or_else(|| SpiffeError::Path(s.to_owned()))?;
        let parts: Vec<&str> = path.split('/').collect();
        let ["ns", namespace, "agent", agent] = parts.as_slice() else {
            return Err(SpiffeError::Path(s.to_owned()));
        };
        let part = |source| SpiffeError::Part {
            id: s.to_owned(),
            source,
        };
        Ok(Self {
            trust_domain: TrustDomain::new(domain).map_err(part)?,
            namespace: Namespace::new(*namespace).map_err(part)?,
            agent: AgentName::new(*agent).map_err(part)?,
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/agent/{}",
            self.trust_domain, self.namespace, self.agent
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_the_canonical_form() {
        let id: SpiffeId = "spiffe://capmesh.local/ns/default/agent/weather"
            .parse()
            .unwrap();
        assert_eq!(id.trust_domain().as_str(), "capmesh.local");
        assert_eq!(id.namespace().as_str(), "default");
        assert_eq!(id.agent().as_str(), "weather");
        assert_eq!(
            id.to_string(),
            "spiffe://capmesh.local/ns/default/agent/weather"
        );
    }

    #[test]
    fn errors_name_the_bad_part_and_the_rule() {
        let err = "https://capmesh.local/ns/a/agent/b"
            .parse::<SpiffeId>()
            .unwrap_err();
        assert!(err.to_string().contains("must start with spiffe://"));

        let err = "spiffe://capmesh.local/agent/b"
            .parse::<SpiffeId>()
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("/ns/<namespace>/agent/<agent-name>")
        );

        let err = "spiffe://capmesh.local/ns/default/agent/Foo_Bar"
            .parse::<SpiffeId>()
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("agent name \"Foo_Bar\""), "{msg}");
        assert!(msg.contains("lowercase letters, digits and '-'"), "{msg}");

        let err = "spiffe://Bad Domain/ns/default/agent/x"
            .parse::<SpiffeId>()
            .unwrap_err();
        assert!(err.to_string().contains("trust domain"));

        assert!(
            "spiffe://capmesh.local/ns/default/agent/x/extra"
                .parse::<SpiffeId>()
                .is_err()
        );
    }
}

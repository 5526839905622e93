//! Authorization policy: which callers may call which capabilities of an agent.
//!
//! Rules are tried in order and the first whose caller and capability patterns both match
//! decides; when none matches, the policy's default does. Patterns are globs where `*` matches
//! any run of characters (including none, and including `/`).
//!
//! `provide` rules say who may *register* a capability (and so receive its calls): a capability
//! that some rule names may be provided only by an identity one of those rules lists; any other
//! capability only by identities of the mesh's own trust domain (never by an entity's).

use serde::{Deserialize, Serialize};

/// The caller pattern that matches a caller without a mesh identity (permissive mode).
pub const UNAUTHENTICATED: &str = "unauthenticated";

/// Why a policy was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// A rule with an empty `from` or `capabilities` list, which could never match.
    #[error(
        "policy rule {rule}: {field} is empty, so the rule never matches: list at least one pattern, or \"*\""
    )]
    EmptyList {
        /// The rule's position, from 0.
        rule: usize,
        /// The empty field.
        field: &'static str,
    },
    /// An empty pattern string.
    #[error("policy rule {rule}: {field} has an empty pattern: use \"*\" to match everything")]
    EmptyPattern {
        /// The rule's position, from 0.
        rule: usize,
        /// The field holding the empty pattern.
        field: &'static str,
    },
}

/// What a rule, or the default, decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyAction {
    /// The call goes through.
    #[default]
    Allow,
    /// The call is refused (HTTP 403 with a JSON-RPC error).
    Deny,
}

/// The decision when no rule matches; the same two choices as a rule's action.
pub type PolicyDefault = PolicyAction;

/// One rule: if the caller matches any `from` pattern and the capability matches any
/// `capabilities` pattern, `action` decides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRule {
    /// Caller patterns: SPIFFE ID globs (`spiffe://capmesh.local/ns/prod/agent/*`), `*`, or
    /// `unauthenticated` for callers without a mesh identity.
    pub from: Vec<String>,
    /// Capability globs (`weather*`, `*`).
    pub capabilities: Vec<String>,
    /// What happens when the rule matches.
    pub action: PolicyAction,
}

impl PolicyRule {
    /// True when this rule applies to `caller` (None = unauthenticated) calling `capability`.
    pub fn matches(&self, caller: Option<&str>, capability: &str) -> bool {
        let caller_matches = self.from.iter().any(|pattern| match caller {
            Some(id) => glob_match(pattern, id),
            None => pattern == "*" || pattern == UNAUTHENTICATED,
        });
        caller_matches
            && self
                .capabilities
                .iter()
                .any(|pattern| glob_match(pattern, capability))
    }
}

/// Who may provide capabilities: identities matching any `from` glob may register the
/// capabilities matching any `capabilities` glob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProvideRule {
    /// Capability globs (`weather*`).
    pub capabilities: Vec<String>,
    /// SPIFFE ID globs of the identities that may provide them
    /// (`spiffe://partner.example/ns/*/agent/*`).
    pub from: Vec<String>,
}

/// An agent's authorization policy. The default policy allows everything and has no rules.
///
/// Deserializing validates it (see [`Policy::validate`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawPolicy")]
pub struct Policy {
    /// The decision when no rule matches (allow when absent).
    pub default: PolicyDefault,
    /// The rules, tried in order (none when absent).
    pub rules: Vec<PolicyRule>,
    /// Who may provide which capabilities (none: only the mesh's own identities, any
    /// capability).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub provide: Vec<ProvideRule>,
}

impl Policy {
    /// Whether `caller` (a SPIFFE ID, or None when unauthenticated) may call `capability`.
    pub fn allows(&self, caller: Option<&str>, capability: &str) -> bool {
        let action = self
            .rules
            .iter()
            .find(|rule| rule.matches(caller, capability))
            .map_or(self.default, |rule| rule.action);
        action == PolicyAction::Allow
    }

    /// Whether `identity` (a SPIFFE ID) may provide `capability`. A capability named by some
    /// `provide` rule: only an identity that one of those rules lists. Any other: only an
    /// identity of `mesh_trust_domain`.
    pub fn may_provide(&self, identity: &str, capability: &str, mesh_trust_domain: &str) -> bool {
        let mut named = false;
        for rule in &self.provide {
            if rule.capabilities.iter().any(|p| glob_match(p, capability)) {
                named = true;
                if rule.from.iter().any(|p| glob_match(p, identity)) {
                    return true;
                }
            }
        }
        !named
            && identity
                .strip_prefix("spiffe://")
                .and_then(|rest| rest.split_once('/'))
                .is_some_and(|(domain, _)| domain == mesh_trust_domain)
    }

    /// Checks that every rule can match: no empty lists and no empty patterns.
    pub fn validate(&self) -> Result<(), PolicyError> {
        for (index, rule) in self.rules.iter().enumerate() {
            check_patterns(index, "from", &rule.from)?;
            check_patterns(index, "capabilities", &rule.capabilities)?;
        }
        for (index, rule) in self.provide.iter().enumerate() {
            check_patterns(index, "provide.from", &rule.from)?;
            check_patterns(index, "provide.capabilities", &rule.capabilities)?;
        }
        Ok(())
    }
}

fn check_patterns(
    rule: usize,
    field: &'static str,
    patterns: &[String],
) -> Result<(), PolicyError> {
    if patterns.is_empty() {
        return Err(PolicyError::EmptyList { rule, field });
    }
    if patterns.iter().any(|p| p.is_empty()) {
        return Err(PolicyError::EmptyPattern { rule, field });
    }
    Ok(())
}

/// The wire shape of [`Policy`], before validation.
#[derive(Deserialize)]
struct RawPolicy {
    #[serde(default)]
    default: PolicyDefault,
    #[serde(default)]
    rules: Vec<PolicyRule>,
    #[serde(default)]
    provide: Vec<ProvideRule>,
}

impl TryFrom<RawPolicy> for Policy {
    type Error = PolicyError;
    fn try_from(raw: RawPolicy) -> Result<Self, PolicyError> {
        let policy = Policy {
            default: raw.default,
            rules: raw.rules,
            provide: raw.provide,
        };
        policy.validate()?;
        Ok(policy)
    }
}

/// Matches `text` against `pattern`, where `*` matches any run of characters (including none)
/// and every other character matches itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    // Where the last `*` was, and where in `text` it began matching; on a mismatch the star
    // takes one more character. Linear in practice, O(len(p) * len(t)) at worst.
    let mut backtrack: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            backtrack = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((star, start)) = backtrack {
            pi = star + 1;
            ti = start + 1;
            backtrack = Some((star, start + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLANNER: &str = "spiffe://capmesh.local/ns/default/agent/planner";
    const PROD_BILLING: &str = "spiffe://capmesh.local/ns/prod/agent/billing";

    fn rule(from: &[&str], capabilities: &[&str], action: PolicyAction) -> PolicyRule {
        PolicyRule {
            from: from.iter().map(|s| s.to_string()).collect(),
            capabilities: capabilities.iter().map(|s| s.to_string()).collect(),
            action,
        }
    }

    #[test]
    fn globs_match_any_run_of_characters() {
        assert!(glob_match("*", ""));
        assert!(glob_match("*", PLANNER));
        assert!(glob_match(
            "spiffe://capmesh.local/ns/prod/agent/*",
            PROD_BILLING
        ));
        assert!(!glob_match(
            "spiffe://capmesh.local/ns/prod/agent/*",
            PLANNER
        ));
        assert!(glob_match("spiffe://*/ns/default/*", PLANNER));
        assert!(glob_match("weather*", "weather"));
        assert!(glob_match("weather*", "weather_forecast"));
        assert!(glob_match("*_forecast", "weather_forecast"));
        assert!(glob_match("a*b*c", "aXbYbZc"));
        assert!(!glob_match("a*b*c", "aXbYbZ"));
        assert!(glob_match("get_weather", "get_weather"));
        assert!(!glob_match("get_weather", "get_weather2"));
        assert!(!glob_match("", "x"));
        assert!(glob_match("**x", "abx"));
    }

    #[test]
    fn default_policy_allows_everyone() {
        let policy = Policy::default();
        assert!(policy.allows(Some(PLANNER), "weather"));
        assert!(policy.allows(None, "weather"));
        let json = serde_json::to_string(&policy).unwrap();
        assert_eq!(json, r#"{"default":"allow","rules":[]}"#);
        assert_eq!(serde_json::from_str::<Policy>("{}").unwrap(), policy);
    }

    #[test]
    fn the_first_matching_rule_wins_and_the_default_decides_the_rest() {
        let policy = Policy {
            default: PolicyAction::Deny,
            rules: vec![
                rule(
                    &["spiffe://capmesh.local/ns/prod/agent/*"],
                    &["billing*"],
                    PolicyAction::Deny,
                ),
                rule(
                    &["spiffe://capmesh.local/ns/*"],
                    &["*"],
                    PolicyAction::Allow,
                ),
            ],
            provide: vec![],
        };
        assert!(!policy.allows(Some(PROD_BILLING), "billing_charge"));
        assert!(policy.allows(Some(PROD_BILLING), "weather"));
        assert!(policy.allows(Some(PLANNER), "billing_charge"));
        assert!(!policy.allows(Some("spiffe://other.domain/ns/x/agent/y"), "weather"));
        assert!(!policy.allows(None, "weather"));
    }

    #[test]
    fn unauthenticated_callers_match_only_star_or_unauthenticated() {
        let named = Policy {
            default: PolicyAction::Deny,
            rules: vec![rule(&["spiffe://*"], &["*"], PolicyAction::Allow)],
            provide: vec![],
        };
        assert!(!named.allows(None, "weather"));
        assert!(named.allows(Some(PLANNER), "weather"));

        let unauth = Policy {
            default: PolicyAction::Allow,
            rules: vec![rule(&[UNAUTHENTICATED], &["admin*"], PolicyAction::Deny)],
            provide: vec![],
        };
        assert!(!unauth.allows(None, "admin_reset"));
        assert!(unauth.allows(None, "weather"));
        assert!(unauth.allows(Some(PLANNER), "admin_reset"));

        let star = Policy {
            default: PolicyAction::Allow,
            rules: vec![rule(&["*"], &["admin*"], PolicyAction::Deny)],
            provide: vec![],
        };
        assert!(!star.allows(None, "admin_reset"));
        assert!(!star.allows(Some(PLANNER), "admin_reset"));
    }

    #[test]
    fn provide_rules_bind_capabilities_to_identities_and_keep_entities_out_by_default() {
        let policy: Policy = serde_json::from_str(
            r#"{"provide":[{"capabilities":["weather*"],"from":["spiffe://capmesh.local/ns/default/agent/weather"]},
                           {"capabilities":["translate"],"from":["spiffe://partner.example/ns/*/agent/*"]}]}"#,
        )
        .unwrap();
        let td = "capmesh.local";
        let weather = "spiffe://capmesh.local/ns/default/agent/weather";
        let squatter = "spiffe://capmesh.local/ns/default/agent/squatter";
        let partner = "spiffe://partner.example/ns/default/agent/deepl";
        assert!(policy.may_provide(weather, "weather_forecast", td));
        assert!(
            !policy.may_provide(squatter, "weather", td),
            "a rule names weather*"
        );
        assert!(
            policy.may_provide(squatter, "news", td),
            "mesh identities by default"
        );
        assert!(
            !policy.may_provide(partner, "news", td),
            "no entity by default"
        );
        assert!(
            policy.may_provide(partner, "translate", td),
            "allowed by a rule"
        );
        assert!(!policy.may_provide("spiffe://capmesh.local.evil/ns/a/agent/b", "news", td));
        assert!(Policy::default().may_provide(weather, "anything", td));
        let err =
            serde_json::from_str::<Policy>(r#"{"provide":[{"capabilities":["*"],"from":[]}]}"#)
                .unwrap_err()
                .to_string();
        assert!(err.contains("provide.from is empty"), "{err}");
    }

    #[test]
    fn policies_with_empty_patterns_are_refused_when_read() {
        let json =
            r#"{"default":"deny","rules":[{"from":[""],"capabilities":["*"],"action":"allow"}]}"#;
        let err = serde_json::from_str::<Policy>(json)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("policy rule 0: from has an empty pattern"),
            "{err}"
        );
        let json = r#"{"rules":[{"from":["*"],"capabilities":[],"action":"allow"}]}"#;
        let err = serde_json::from_str::<Policy>(json)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("policy rule 0: capabilities is empty"),
            "{err}"
        );
        let json = r#"{"default":"deny","extra":1,"rules":[{"from":["*"],"capabilities":["w*"],"action":"allow","note":"x"}]}"#;
        let policy: Policy = serde_json::from_str(json).unwrap();
        assert!(policy.allows(None, "weather") && !policy.allows(None, "news"));
    }
}

//! `capmesh policy get|set -f`: the mesh's authorization policy (who may call which
//! capability).

use std::io::Read;
use std::path::PathBuf;

use capmesh_api::Policy;
use serde_json::Value;

use crate::api::Api;
use crate::output::{self, Output};

/// `capmesh policy …`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum PolicyCommand {
    /// Print the authorization policy (JSON, whatever --output says).
    #[command(after_help = "Examples:\n  \
        capmesh policy get > policy.json\n  \
        capmesh policy get | jq '.rules'")]
    Get,
    /// Replace the authorization policy with the one in a JSON file (checked here first; a bad
    /// policy changes nothing).
    #[command(after_help = "Examples:\n  \
        capmesh policy set -f policy.json\n  \
        capmesh policy get | jq '.default = \"deny\"' | capmesh policy set -f -\n\n\
        A policy: rules tried in order, the first match decides, else the default:\n  \
        {\"default\": \"allow\", \"rules\": [\n    \
        {\"from\": [\"spiffe://capmesh.local/ns/default/agent/planner\"], \"capabilities\": [\"weather*\"], \"action\": \"allow\"},\n    \
        {\"from\": [\"*\"], \"capabilities\": [\"admin_*\"], \"action\": \"deny\"}]}")]
    Set(SetArgs),
}

/// Flags of `capmesh policy set`.
#[derive(Debug, Clone, clap::Args)]
pub struct SetArgs {
    /// The policy file (JSON); `-` reads standard input.
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: PathBuf,
}

/// Runs a policy subcommand.
pub async fn run(api: &Api, output: Output, command: PolicyCommand) -> anyhow::Result<()> {
    match command {
        PolicyCommand::Get => {
            let raw: Value = api.get("/v1/policies").await?;
            output::print_json(&raw)
        }
        PolicyCommand::Set(args) => {
            let policy = read_policy(&args.file)?;
            let unmatchable = unmatchable_callers(&policy);
            if !unmatchable.is_empty() {
                // Best effort: the trust domain makes the suggestion exact.
                let trust_domain = api
                    .get::<capmesh_api::Snapshot>("/v1/topology")
                    .await
                    .map(|t| t.trust.trust_domain.to_string())
                    .unwrap_or_else(|_| "capmesh.local".to_owned());
                for (rule, pattern) in &unmatchable {
                    eprintln!(
                        "warning: rule {rule}: \"from\": {pattern:?} can never match a caller: callers are SPIFFE IDs such as spiffe://{trust_domain}/ns/default/agent/planner (or \"unauthenticated\"); did you mean {:?}?",
                        suggest(pattern, &trust_domain)
                    );
                }
            }
            let stored: Value = api.put("/v1/policies", &policy).await?;
            if output == Output::Json {
                return output::print_json(&stored);
            }
            let default = match policy.default {
                capmesh_api::PolicyAction::Allow => "allow",
                capmesh_api::PolicyAction::Deny => "deny",
            };
            output::print(&format!(
                "policy replaced: {} rule(s), default {default}; every proxy applies it with its next snapshot\n",
                policy.rules.len()
            ))?;
            Ok(())
        }
    }
}

/// Reads and validates a policy file; errors name the file and the problem.
pub fn read_policy(file: &std::path::Path) -> anyhow::Result<Policy> {
    let (text, name) = if file.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| anyhow::anyhow!("cannot read the policy from standard input: {e}"))?;
        (text, "standard input".to_owned())
    } else {
        let name = file.display().to_string();
        let text = std::fs::read_to_string(file).map_err(|e| {
            anyhow::anyhow!("cannot read the policy file {name}: {e}: check the path given with -f")
        })?;
        (text, name)
    };
    let invalid = |problem: String| {
        anyhow::anyhow!(
            "{name} is not a valid policy: {problem}\nfix the file: a policy is {{\"default\": \"allow\"|\"deny\", \"rules\": [{{\"from\": [\"<spiffe-id glob>\"], \"capabilities\": [\"<glob>\"], \"action\": \"allow\"|\"deny\"}}]}}"
        )
    };
    let value: Value = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    // The control plane ignores keys it does not know, so a misspelt "defualt" would silently
    // leave the default at allow: refuse it here.
    if let Some(unknown) = unknown_key(&value) {
        return Err(invalid(format!("unknown key {unknown}")));
    }
    // Parsed again from the text, so errors carry the line and column.
    serde_json::from_str::<Policy>(&text).map_err(|e| invalid(e.to_string()))
}

/// Caller patterns that no caller can ever match, with their rule's index: callers are SPIFFE
/// IDs (`spiffe://…`) or `unauthenticated`, so a pattern whose fixed start is neither (such as
/// `planner`) is a mistake that silently never applies.
pub fn unmatchable_callers(policy: &Policy) -> Vec<(usize, String)> {
    const SCHEME: &str = "spiffe://";
    let mut found = Vec::new();
    for (i, rule) in policy.rules.iter().enumerate() {
        for pattern in &rule.from {
            if pattern == capmesh_api::UNAUTHENTICATED {
                continue;
            }
            let fixed = pattern.split('*').next().unwrap_or_default();
            if !(fixed.starts_with(SCHEME) || SCHEME.starts_with(fixed)) {
                found.push((i, pattern.clone()));
            }
        }
    }
    found
}

/// What an unmatchable caller pattern probably meant.
pub fn suggest(pattern: &str, trust_domain: &str) -> String {
    if pattern.contains("/agent/") || pattern.starts_with("ns/") {
        let rest = pattern.trim_start_matches('/');
        if rest.starts_with("ns/") {
            format!("spiffe://{trust_domain}/{rest}")
        } else {
            format!("spiffe://{rest}")
        }
    } else if let Some((ns, name)) = pattern.split_once('/') {
        format!("spiffe://{trust_domain}/ns/{ns}/agent/{name}")
    } else {
        format!("spiffe://{trust_domain}/ns/default/agent/{pattern}")
    }
}

/// The first key that is not part of a policy, as `"x"` or `"x" in rule 2`.
fn unknown_key(value: &Value) -> Option<String> {
    let top = value.as_object()?;
    if let Some(k) = top
        .keys()
        .find(|k| !matches!(k.as_str(), "default" | "rules"))
    {
        return Some(format!("{k:?}"));
    }
    let rules = top.get("rules")?.as_array()?;
    rules.iter().enumerate().find_map(|(i, rule)| {
        rule.as_object()?
            .keys()
            .find(|k| !matches!(k.as_str(), "from" | "capabilities" | "action"))
            .map(|k| format!("{k:?} in rule {i}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caller_patterns_that_can_never_match_are_found_with_a_suggestion() {
        let policy: Policy = serde_json::from_value(serde_json::json!({
            "default": "allow",
            "rules": [
                {"from": ["planner", "spiffe://capmesh.local/ns/default/agent/ok", "*", "unauthenticated", "*/agent/x", "spif*"], "capabilities": ["*"], "action": "deny"},
                {"from": ["prod/weather-*", "capmesh.local/ns/a/agent/b"], "capabilities": ["*"], "action": "allow"}
            ]
        }))
        .unwrap();
        let found = unmatchable_callers(&policy);
        assert_eq!(
            found,
            [
                (0, "planner".to_owned()),
                (1, "prod/weather-*".to_owned()),
                (1, "capmesh.local/ns/a/agent/b".to_owned())
            ]
        );
        assert_eq!(
            suggest("planner", "capmesh.local"),
            "spiffe://capmesh.local/ns/default/agent/planner"
        );
        assert_eq!(
            suggest("prod/weather-*", "capmesh.local"),
            "spiffe://capmesh.local/ns/prod/agent/weather-*"
        );
        assert_eq!(
            suggest("capmesh.local/ns/a/agent/b", "x"),
            "spiffe://capmesh.local/ns/a/agent/b"
        );
    }

    #[test]
    fn bad_policies_name_the_file_and_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.json");
        std::fs::write(
            &path,
            "{\"rules\": [{\"from\": [], \"capabilities\": [\"*\"], \"action\": \"deny\"}]}",
        )
        .unwrap();
        let err = read_policy(&path).unwrap_err().to_string();
        assert!(
            err.contains("p.json") && err.contains("from is empty"),
            "{err}"
        );
        std::fs::write(&path, "{\"default\": \"maybe\"}").unwrap();
        let err = read_policy(&path).unwrap_err().to_string();
        assert!(err.contains("maybe") && err.contains("line 1"), "{err}");
        std::fs::write(&path, "{\"defualt\": \"deny\"}").unwrap();
        let err = read_policy(&path).unwrap_err().to_string();
        assert!(err.contains("unknown key \"defualt\""), "{err}");
        let ok = "{\"default\": \"deny\", \"rules\": []}";
        std::fs::write(&path, ok).unwrap();
        assert_eq!(
            read_policy(&path).unwrap().default,
            capmesh_api::PolicyAction::Deny
        );
    }
}

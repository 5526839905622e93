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

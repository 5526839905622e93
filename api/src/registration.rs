//! What an agent's proxy registers: its tools mapped to capabilities and the capabilities it
//! depends on ([`Dependency`]), plus the `--capability 'tool=capability@version#tag1,tag2'` flag
//! form that changes how a tool is registered.
//!
//! Flag forms are also the JSON form, so a registration reads the same on the command line, in a
//! `hello` frame and in `capmesh list --output json`.

use std::fmt;
use std::str::FromStr;

use semver::Version;
use serde::{Deserialize, Serialize};

use crate::dependency::Dependency;
use crate::flag::FlagError;
use crate::names::{Capability, Tag};
use crate::version::parse_version;

/// The right form of `--capability`, shown in its errors.
pub const CAPABILITY_FORM: &str = "tool=capability@1.2.0#tag1,tag2";

/// One tool of an agent, as the mesh sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolSpec {
    /// The MCP tool name on the agent (what the provider's proxy calls).
    pub function: String,
    /// The capability the tool provides (what consumers ask for).
    pub capability: Capability,
    /// The tool's version, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<Version>,
    /// The tool's own tags (the agent's tags are added to these on its endpoints).
    #[serde(default)]
    pub tags: Vec<Tag>,
    /// The tool's description from `tools/list`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The tool's JSON input schema from `tools/list`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_schema: Option<serde_json::Value>,
}

/// One `--capability 'tool=capability@version#tag1,tag2'` flag: changes how a tool is registered.
///
/// Every part after `tool` is optional, but at least one must be given:
/// `tool=capability`, `tool@1.2.0`, `tool#fast`, `tool=cap@1.0.0#a,b`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CapabilityOverride {
    /// The MCP tool name this override applies to.
    pub tool: String,
    /// The capability to register the tool as, instead of its own name.
    pub capability: Option<Capability>,
    /// The version to register the tool with.
    pub version: Option<Version>,
    /// Tags for the tool (replace any it had when non-empty).
    pub tags: Vec<Tag>,
}

impl CapabilityOverride {
    /// Applies the override to `spec` when it names `spec`'s tool; returns whether it did.
    pub fn apply(&self, spec: &mut ToolSpec) -> bool {
        if spec.function != self.tool {
            return false;
        }
        if let Some(capability) = &self.capability {
            spec.capability = capability.clone();
        }
        if let Some(version) = &self.version {
            spec.version = Some(version.clone());
        }
        if !self.tags.is_empty() {
            spec.tags = self.tags.clone();
        }
        true
    }
}

impl FromStr for CapabilityOverride {
    type Err = FlagError;

    fn from_str(input: &str) -> Result<Self, FlagError> {
        let fail = |problem: String| FlagError {
            flag: "--capability",
            input: input.to_owned(),
            problem,
            form: CAPABILITY_FORM,
        };
        // Read right to left: tags, then version, then tool=capability.
        let (rest, tags) = match input.trim().split_once('#') {
            Some((rest, list)) => (rest, parse_tag_list(list).map_err(&fail)?),
            None => (input.trim(), Vec::new()),
        };
        let (rest, version) = match rest.split_once('@') {
            Some((rest, text)) => {
                let version = parse_version(text)
                    .map_err(|_| fail(format!("version {text:?} is not semver")))?;
                (rest, Some(version))
            }
            None => (rest, None),
        };
        let (tool, capability) = match rest.split_once('=') {
            Some((tool, name)) => (
                tool,
                Some(Capability::new(name).map_err(|e| fail(e.to_string()))?),
            ),
            None => (rest, None),
        };
        check_tool_name(tool).map_err(&fail)?;
        if capability.is_none() && version.is_none() && tags.is_empty() {
            return Err(fail(format!(
                "it names tool {tool:?} but changes nothing: add =capability, @version or #tags"
            )));
        }
        Ok(CapabilityOverride {
            tool: tool.to_owned(),
            capability,
            version,
            tags,
        })
    }
}

impl fmt::Display for CapabilityOverride {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.tool)?;
        if let Some(capability) = &self.capability {
            write!(f, "={capability}")?;
        }
        if let Some(version) = &self.version {
            write!(f, "@{version}")?;
        }
        if !self.tags.is_empty() {
            write!(f, "#{}", join(&self.tags))?;
        }
        Ok(())
    }
}

fn check_tool_name(tool: &str) -> Result<(), String> {
    if tool.is_empty() {
        return Err("the tool name is empty".to_owned());
    }
    if tool
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '=' | '@' | '#'))
    {
        return Err(format!(
            "tool name {tool:?} has a space, control character, '=', '@' or '#'"
        ));
    }
    Ok(())
}

fn parse_tag_list(list: &str) -> Result<Vec<Tag>, String> {
    if list.trim().is_empty() {
        return Err("no tags after '#'".to_owned());
    }
    list.split(',')
        .map(|t| Tag::new(t.trim()).map_err(|e| e.to_string()))
        .collect()
}

fn join(items: &[impl fmt::Display]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}
impl TryFrom<String> for CapabilityOverride {
    type Error = FlagError;
    fn try_from(s: String) -> Result<Self, FlagError> {
        s.parse()
    }
}

impl From<CapabilityOverride> for String {
    fn from(value: CapabilityOverride) -> String {
        value.to_string()
    }
}

/// What a proxy registers for its agent (sent in `hello` and `register` frames).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Registration {
    /// The `host:port` other proxies dial to reach this agent (the proxy's inbound listener).
    pub endpoint: String,
    /// The agent's tags (`--tags`); added to every tool's own tags.
    #[serde(default)]
    pub tags: Vec<Tag>,
    /// The agent's version (`--version`); a tool's own version wins over it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<Version>,
    /// The agent's tools; empty for an agent that only consumes.
    #[serde(default)]
    pub tools: Vec<ToolSpec>,
    /// The capabilities the agent calls.
    #[serde(default)]
    pub dependencies: Vec<Dependency>,
}
#[cfg(test)]
mod tests {
    use super::*;

    fn cap(s: &str) -> Capability {
        Capability::new(s).unwrap()
    }

    fn over(s: &str) -> CapabilityOverride {
        s.parse().unwrap()
    }

    #[test]
    fn capability_flag_forms() {
        let full = over("get_weather=weather@1.2.0#fast,eu");
        assert_eq!(full.tool, "get_weather");
        assert_eq!(full.capability, Some(cap("weather")));
        assert_eq!(full.version, Some(Version::new(1, 2, 0)));
        assert_eq!(
            full.tags,
            vec![Tag::new("fast").unwrap(), Tag::new("eu").unwrap()]
        );

        let only_cap = over("tool=capability");
        assert_eq!(
            (only_cap.capability, only_cap.version),
            (Some(cap("capability")), None)
        );
        let only_version = over("tool@1.2.0");
        assert_eq!(only_version.capability, None);
        assert_eq!(only_version.version, Some(Version::new(1, 2, 0)));
        let only_tags = over("tool#fast");
        assert_eq!(only_tags.tags, vec![Tag::new("fast").unwrap()]);
        assert_eq!(only_tags.version, None);
    }

    #[test]
    fn capability_flag_round_trips_through_display_and_json() {
        for text in [
            "t=c@1.0.0#a,b",
            "tool=capability",
            "tool@1.2.0",
            "tool#fast",
            "t@2.0.0-rc.1",
        ] {
            let parsed = over(text);
            assert_eq!(parsed.to_string(), text);
            let json = serde_json::to_string(&parsed).unwrap();
            assert_eq!(json, format!("\"{text}\""));
            assert_eq!(
                serde_json::from_str::<CapabilityOverride>(&json).unwrap(),
                parsed
            );
        }
    }

    #[test]
    fn capability_flag_errors_name_the_flag_the_part_and_the_form() {
        let err = |s: &str| s.parse::<CapabilityOverride>().unwrap_err().to_string();
        assert_eq!(
            err("x=@@"),
            "--capability \"x=@@\": version \"@\" is not semver (use tool=capability@1.2.0#tag1,tag2)"
        );
        assert_eq!(
            err("x@1.2"),
            "--capability \"x@1.2\": version \"1.2\" is not semver (use tool=capability@1.2.0#tag1,tag2)"
        );
        assert!(err("x=has space").contains(": capability \"has space\" is not valid"));
        assert!(err("x#Fast").contains(": tag \"Fast\" is not valid"));
        assert!(err("x#").contains(": no tags after '#'"));
        assert!(err("x#a,,b").contains(": tag \"\" is not valid"));
        assert!(err("=weather").contains(": the tool name is empty"));
        assert!(err("my tool=weather").contains(": tool name \"my tool\" has a space"));
        assert_eq!(
            err("get_weather"),
            "--capability \"get_weather\": it names tool \"get_weather\" but changes nothing: \
             add =capability, @version or #tags (use tool=capability@1.2.0#tag1,tag2)"
        );
    }

    #[test]
    fn overrides_apply_only_to_their_tool() {
        let mut spec = ToolSpec {
            function: "get_weather".into(),
            capability: cap("get_weather"),
            version: None,
            tags: vec![Tag::new("old").unwrap()],
            description: Some("Weather".into()),
            input_schema: None,
        };
        assert!(!over("other=x").apply(&mut spec));
        assert_eq!(spec.capability, cap("get_weather"));
        assert!(over("get_weather=weather@1.0.0").apply(&mut spec));
        assert_eq!(spec.capability, cap("weather"));
        assert_eq!(spec.version, Some(Version::new(1, 0, 0)));
        assert_eq!(spec.tags, vec![Tag::new("old").unwrap()]);
        assert!(over("get_weather#new").apply(&mut spec));
        assert_eq!(spec.tags, vec![Tag::new("new").unwrap()]);
    }
    #[test]
    fn registrations_tolerate_missing_lists_and_unknown_fields() {
        let json = r#"{"endpoint":"10.0.0.7:15006","future":1,
            "tools":[{"function":"get_weather","capability":"weather","version":"1.0.0","extra":true}],
            "dependencies":["llm:+claude","*"]}"#;
        let reg: Registration = serde_json::from_str(json).unwrap();
        assert_eq!(reg.endpoint, "10.0.0.7:15006");
        assert!(reg.tags.is_empty());
        assert_eq!(reg.tools[0].capability, cap("weather"));
        assert_eq!(reg.dependencies[1].capability, crate::DependencyTarget::All);
        let bad = r#"{"endpoint":"x:1","dependencies":["llm:+Bad"]}"#;
        let err = serde_json::from_str::<Registration>(bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--dependency \"llm:+Bad\""), "{err}");
    }
}

//! Dependencies: the capabilities an agent calls, the tool names it sees them under, and which
//! providers it accepts — and the `--dependency 'alias=capability:+tag,-tag,>=1.2'` flag form,
//! which is also their JSON form.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::flag::FlagError;
use crate::names::{Capability, NameError};
use crate::selector::Selector;

/// The right form of `--dependency`, shown in its errors.
pub const DEPENDENCY_FORM: &str = "alias=capability:+tag,-tag,>=1.2";

/// What a dependency asks for: one capability, or every capability in the mesh.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DependencyTarget {
    /// Every capability (written `*`); each is offered under its own name.
    All,
    /// One capability.
    One(Capability),
}

/// One `--dependency 'alias=capability:+tag,-tag,>=1.2'` flag: a capability the agent calls, the
/// tool name it sees it under, and which providers it accepts.
///
/// Forms: `weather` (alias = capability, no rules), `llm:+claude`, `fast_llm=llm:+claude,-slow`,
/// `llm:>=1.2,<2`, `*` (everything), `*:+fast`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Dependency {
    /// The tool name the consumer sees; `None` only for `*`, where each capability keeps its name.
    pub alias: Option<Capability>,
    /// The capability (or all of them) this dependency routes to.
    pub capability: DependencyTarget,
    /// Which providers are accepted, and how they rank.
    pub selector: Selector,
}

impl Dependency {
    /// True when this dependency subscribes to `capability` (what the control plane sends for it).
    pub fn covers(&self, capability: &Capability) -> bool {
        match &self.capability {
            DependencyTarget::All => true,
            DependencyTarget::One(c) => c == capability,
        }
    }

    /// The capability a call to the consumer-side tool `tool` routes to through this dependency.
    pub fn route(&self, tool: &str) -> Option<Capability> {
        match (&self.capability, &self.alias) {
            (DependencyTarget::One(c), Some(alias)) if alias.as_str() == tool => Some(c.clone()),
            (DependencyTarget::One(_), _) => None,
            (DependencyTarget::All, _) => Capability::new(tool).ok(),
        }
    }
}

impl FromStr for Dependency {
    type Err = FlagError;

    fn from_str(input: &str) -> Result<Self, FlagError> {
        let fail = |problem: String| FlagError {
            flag: "--dependency",
            input: input.to_owned(),
            problem,
            form: DEPENDENCY_FORM,
        };
        let text = input.trim();
        if text.is_empty() {
            return Err(fail("it is empty".to_owned()));
        }
        let (head, selector) = match text.split_once(':') {
            Some((_, "")) => {
                return Err(fail(
                    "nothing after ':': add rules or drop the ':'".to_owned(),
                ));
            }
            Some((head, rules)) => (head, rules.parse().map_err(|e| fail(format!("{e}")))?),
            None => (text, Selector::default()),
        };
        let (alias, target) = match head.split_once('=') {
            Some((alias, target)) => (Some(alias), target),
            None => (None, head),
        };
        if target == "*" {
            if let Some(alias) = alias {
                return Err(fail(format!(
                    "alias {alias:?} given for '*': every capability keeps its own name, so drop \"{alias}=\""
                )));
            }
            return Ok(Dependency {
                alias: None,
                capability: DependencyTarget::All,
                selector,
            });
        }
        let capability = Capability::new(target).map_err(|e| fail(e.to_string()))?;
        let alias = match alias {
            Some(alias) => Capability::new(alias)
                .map_err(|e| fail(NameError { kind: "alias", ..e }.to_string()))?,
            None => capability.clone(),
        };
        Ok(Dependency {
            alias: Some(alias),
            capability: DependencyTarget::One(capability),
            selector,
        })
    }
}

impl fmt::Display for Dependency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.capability, &self.alias) {
            (DependencyTarget::All, _) => f.write_str("*")?,
            (DependencyTarget::One(c), Some(alias)) if alias != c => write!(f, "{alias}={c}")?,
            (DependencyTarget::One(c), _) => write!(f, "{c}")?,
        }
        if !self.selector.is_empty() {
            write!(f, ":{}", self.selector)?;
        }
        Ok(())
    }
}

impl TryFrom<String> for Dependency {
    type Error = FlagError;
    fn try_from(s: String) -> Result<Self, FlagError> {
        s.parse()
    }
}

impl From<Dependency> for String {
    fn from(value: Dependency) -> String {
        value.to_string()
    }
}

#[cfg(test)]
mod tests {
    use semver::Version;

    use super::*;
    use crate::names::Tag;
    use crate::selector::TagRule;

    fn cap(s: &str) -> Capability {
        Capability::new(s).unwrap()
    }

    fn dep(s: &str) -> Dependency {
        s.parse().unwrap()
    }

    #[test]
    fn dependency_flag_forms() {
        let plain = dep("weather");
        assert_eq!(plain.alias, Some(cap("weather")));
        assert_eq!(plain.capability, DependencyTarget::One(cap("weather")));
        assert!(plain.selector.is_empty());

        let preferred = dep("llm:+claude");
        assert_eq!(preferred.alias, Some(cap("llm")));
        assert_eq!(
            preferred.selector.tags,
            vec![TagRule::Preferred(Tag::new("claude").unwrap())]
        );

        let aliased = dep("fast_llm=llm:+claude,-slow");
        assert_eq!(aliased.alias, Some(cap("fast_llm")));
        assert_eq!(aliased.capability, DependencyTarget::One(cap("llm")));
        assert_eq!(aliased.selector.tags.len(), 2);

        let versioned = dep("llm:>=1.2,<2");
        assert!(versioned.selector.tags.is_empty());
        let req = versioned.selector.version.unwrap();
        assert!(req.matches(&Version::new(1, 4, 0)) && !req.matches(&Version::new(2, 0, 0)));

        let all = dep("*");
        assert_eq!((all.alias, all.capability), (None, DependencyTarget::All));
        let all_fast = dep("*:+fast");
        assert_eq!(
            all_fast.selector.tags,
            vec![TagRule::Preferred(Tag::new("fast").unwrap())]
        );
    }

    #[test]
    fn dependency_flag_round_trips_through_display_and_json() {
        for text in [
            "weather",
            "llm:+claude",
            "fast_llm=llm:+claude,-slow",
            "llm:>=1.2,<2",
            "*",
            "*:+fast,eu",
        ] {
            let parsed = dep(text);
            assert_eq!(parsed.to_string(), text);
            let json = serde_json::to_string(&parsed).unwrap();
            assert_eq!(serde_json::from_str::<Dependency>(&json).unwrap(), parsed);
        }
        // An alias equal to the capability is written without it.
        assert_eq!(dep("weather=weather").to_string(), "weather");
    }

    #[test]
    fn dependency_flag_errors_name_the_flag_the_part_and_the_form() {
        let err = |s: &str| s.parse::<Dependency>().unwrap_err().to_string();
        let form = "(use alias=capability:+tag,-tag,>=1.2)";
        assert_eq!(
            err("llm:"),
            format!("--dependency \"llm:\": nothing after ':': add rules or drop the ':' {form}")
        );
        assert_eq!(err(""), format!("--dependency \"\": it is empty {form}"));
        let e = err("llm:+Claude");
        assert!(
            e.starts_with("--dependency \"llm:+Claude\": tag rule \"+Claude\": tag \"Claude\""),
            "{e}"
        );
        assert!(e.ends_with(form), "{e}");
        assert!(err("llm:>=1.x.q").contains(": version requirement \">=1.x.q\" is not valid"));
        assert!(err("llm:+a,,b").contains(": the rule list has an empty item"));
        assert!(
            err("bad name")
                .starts_with("--dependency \"bad name\": capability \"bad name\" is not valid")
        );
        assert!(err("my alias=llm").contains(": alias \"my alias\" is not valid"));
        assert!(err("all=*").contains(": alias \"all\" given for '*'"));
    }

    #[test]
    fn dependencies_route_their_alias_or_everything() {
        let aliased = dep("fast_llm=llm:+claude");
        assert_eq!(aliased.route("fast_llm"), Some(cap("llm")));
        assert_eq!(aliased.route("llm"), None);
        assert!(aliased.covers(&cap("llm")) && !aliased.covers(&cap("weather")));
        let all = dep("*");
        assert_eq!(all.route("weather"), Some(cap("weather")));
        assert_eq!(all.route("not valid"), None);
        assert!(all.covers(&cap("anything")));
    }
}

//! Validated names: agent names, namespaces, trust domains, capabilities and tags.
//!
//! Each is parsed once at the edge (a flag, a frame, a certificate) and carried as its own type
//! afterwards, so code further in never re-checks a string.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why a name was refused. The message names the input, the rule it broke and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {value:?} is not valid: {rule}")]
pub struct NameError {
    /// What sort of name it was ("agent name", "namespace", ...).
    pub kind: &'static str,
    /// The refused input, as given.
    pub value: String,
    /// The rule it broke, phrased as the fix.
    pub rule: &'static str,
}

fn dns_label(kind: &'static str, value: &str) -> Result<(), NameError> {
    let err = |rule| {
        Err(NameError {
            kind,
            value: value.to_owned(),
            rule,
        })
    };
    if value.is_empty() {
        return err("it must not be empty");
    }
    if value.len() > 63 {
        return err("it is a DNS label: use at most 63 characters");
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return err("it is a DNS label: use lowercase letters, digits and '-'");
    }
    if value.starts_with('-') || value.ends_with('-') {
        return err("it is a DNS label: start and end with a letter or digit");
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $check:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Parses and validates `value`.
            pub fn new(value: impl Into<String>) -> Result<Self, NameError> {
                let value = value.into();
                let check: fn(&'static str, &str) -> Result<(), NameError> = $check;
                check($kind, &value)?;
                Ok(Self(value))
            }

            /// The name as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                Self::new(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(s: String) -> Result<Self, NameError> {
                Self::new(s)
            }
        }

        impl From<$name> for String {
            fn from(n: $name) -> String {
                n.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

name_type!(
    /// An agent's name: a DNS label (`weather-agent`). Part of its SPIFFE ID.
    AgentName,
    "agent name",
    dns_label
);

name_type!(
    /// A namespace: a DNS label (`default`). Part of an agent's SPIFFE ID.
    Namespace,
    "namespace",
    dns_label
);

name_type!(
    /// A SPIFFE trust domain (`capmesh.local`): lowercase letters, digits, '.', '-' and '_'.
    TrustDomain,
    "trust domain",
    |kind, value| {
        let err = |rule| {
            Err(NameError {
                kind,
                value: value.to_owned(),
                rule,
            })
        };
        if value.is_empty() || value.len() > 255 {
            return err("use 1 to 255 characters, such as capmesh.local");
        }
        if !value.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        }) {
            return err("use lowercase letters, digits, '.', '-' and '_', such as capmesh.local");
        }
        Ok(())
    }
);

name_type!(
    /// A capability: what a tool does, as consumers ask for it (`weather_forecast`).
    /// Follows MCP's tool-name rule: 1 to 128 of letters, digits, '_', '-' and '.'.
    Capability,
    "capability",
    |kind, value| {
        if value.is_empty()
            || value.len() > 128
            || !value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        {
            return Err(NameError {
                kind,
                value: value.to_owned(),
                rule: "use 1 to 128 letters, digits, '_', '-' and '.'",
            });
        }
        Ok(())
    }
);

name_type!(
    /// A tag on an agent or tool (`claude`, `fast`, `eu-west`): 1 to 64 of lowercase letters,
    /// digits, '_', '-', '.' and ':'.
    Tag,
    "tag",
    |kind, value| {
        if value.is_empty()
            || value.len() > 64
            || !value.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-' | b'.' | b':')
            })
        {
            return Err(NameError {
                kind,
                value: value.to_owned(),
                rule: "use 1 to 64 lowercase letters, digits, '_', '-', '.' and ':'",
            });
        }
        Ok(())
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_names_follow_dns_label_rules() {
        assert!(AgentName::new("weather-agent").is_ok());
        assert!(AgentName::new("a").is_ok());
        let err = AgentName::new("Foo Bar").unwrap_err();
        assert_eq!(
            err.to_string(),
            "agent name \"Foo Bar\" is not valid: it is a DNS label: use lowercase letters, digits and '-'"
        );
        assert!(AgentName::new("-x").is_err());
        assert!(AgentName::new("").is_err());
        assert!(AgentName::new("a".repeat(64)).is_err());
    }

    #[test]
    fn names_refuse_bad_input_when_deserialized() {
        let bad: Result<Namespace, _> = serde_json::from_str("\"Bad_NS\"");
        assert!(
            bad.unwrap_err()
                .to_string()
                .contains("namespace \"Bad_NS\"")
        );
        let good: Capability = serde_json::from_str("\"get_weather\"").unwrap();
        assert_eq!(good.as_str(), "get_weather");
    }

    #[test]
    fn trust_domains_capabilities_and_tags() {
        assert!(TrustDomain::new("capmesh.local").is_ok());
        assert!(TrustDomain::new("Capmesh.Local").is_err());
        assert!(Capability::new("llm.chat-v2").is_ok());
        assert!(Capability::new("has space").is_err());
        assert!(Tag::new("eu-west:1").is_ok());
        assert!(Tag::new("+claude").is_err());
    }
}

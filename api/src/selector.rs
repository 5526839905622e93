//! Tag rules and selectors: which endpoints of a capability a consumer accepts, and how it ranks them.
//!
//! A rule list is written `+claude,-slow,fast,>=1.2,<2`: `tag` is required, `+tag` preferred,
//! `-tag` excluded, and items that start with a comparison operator or a digit form one semver
//! requirement. Because of that last rule a tag that starts with a digit cannot be written in a
//! rule list.

use std::fmt;
use std::str::FromStr;

use semver::{Version, VersionReq};
use serde::{Deserialize, Serialize};

use crate::names::{NameError, Tag};
use crate::version::{VersionError, format_version_req, looks_like_version_req, parse_version_req};

/// Why a rule list was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// Two commas in a row, or a trailing comma.
    #[error("the rule list has an empty item: separate rules with single commas")]
    EmptyItem,
    /// A tag rule whose tag is not a valid tag.
    #[error("tag rule {rule:?}: {source}")]
    Tag {
        /// The rule as written (`+Claude`).
        rule: String,
        /// What was wrong with the tag.
        source: NameError,
    },
    /// The version items do not form a semver requirement.
    #[error(transparent)]
    Version(#[from] VersionError),
}

/// One tag rule of a selector.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TagRule {
    /// The endpoint must carry the tag; written `tag`.
    Required(Tag),
    /// Endpoints carrying the tag rank higher; written `+tag`.
    Preferred(Tag),
    /// The endpoint must not carry the tag; written `-tag`.
    Excluded(Tag),
}

impl TagRule {
    /// The tag this rule is about.
    pub fn tag(&self) -> &Tag {
        match self {
            TagRule::Required(t) | TagRule::Preferred(t) | TagRule::Excluded(t) => t,
        }
    }
}

impl FromStr for TagRule {
    type Err = SelectorError;

    fn from_str(rule: &str) -> Result<Self, SelectorError> {
        let (make, name): (fn(Tag) -> TagRule, &str) = if let Some(rest) = rule.strip_prefix('+') {
            (TagRule::Preferred, rest)
        } else if let Some(rest) = rule.strip_prefix('-') {
            (TagRule::Excluded, rest)
        } else {
            (TagRule::Required, rule)
        };
        Tag::new(name)
            .map(make)
            .map_err(|source| SelectorError::Tag {
                rule: rule.to_owned(),
                source,
            })
    }
}

impl fmt::Display for TagRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TagRule::Required(t) => write!(f, "{t}"),
            TagRule::Preferred(t) => write!(f, "+{t}"),
            TagRule::Excluded(t) => write!(f, "-{t}"),
        }
    }
}

/// Which endpoints a consumer accepts and how it ranks them: tag rules plus an optional version
/// requirement.
///
/// The proxy routes to the endpoints of the best rank (highest [`Selector::matches`] score) and
/// spreads load across all of them; when none of those is available (unhealthy, ejected) it falls
/// back to the next rank down. That is how `+claude` prefers Claude providers yet still falls
/// back to `openai` ones.
///
/// Serialized as its rule list (`"+claude,-slow,>=1.2,<2"`; `""` for no rules).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Selector {
    /// Tag rules, in the order written.
    pub tags: Vec<TagRule>,
    /// Version requirement; `None` accepts any version, and endpoints without one.
    pub version: Option<VersionReq>,
}

impl Selector {
    /// True when the selector has no rules and no version requirement (it accepts everything).
    pub fn is_empty(&self) -> bool {
        self.tags.is_empty() && self.version.is_none()
    }

    /// Scores an endpoint: `None` when it is not acceptable (a required tag missing, an excluded
    /// tag present, or the version requirement failing — an endpoint with no version fails any
    /// requirement), otherwise `Some(score)` where score counts the preferred tags it carries.
    pub fn matches(
        &self,
        endpoint_tags: &[Tag],
        endpoint_version: Option<&Version>,
    ) -> Option<u32> {
        if let Some(req) = &self.version
            && !endpoint_version.is_some_and(|v| req.matches(v))
        {
            return None;
        }
        let mut score = 0u32;
        for rule in &self.tags {
            let present = endpoint_tags.contains(rule.tag());
            match rule {
                TagRule::Required(_) if !present => return None,
                TagRule::Excluded(_) if present => return None,
                TagRule::Preferred(_) if present => score += 1,
                _ => {}
            }
        }
        Some(score)
    }
}

impl FromStr for Selector {
    type Err = SelectorError;

    /// Reads a rule list such as `+claude,-slow,>=1.2,<2`; the empty string is the empty selector.
    fn from_str(list: &str) -> Result<Self, SelectorError> {
        let mut selector = Selector::default();
        if list.trim().is_empty() {
            return Ok(selector);
        }
        let mut version_items = Vec::new();
        for item in list.split(',').map(str::trim) {
            if item.is_empty() {
                return Err(SelectorError::EmptyItem);
            }
            if looks_like_version_req(item) {
                version_items.push(item);
            } else {
                selector.tags.push(item.parse()?);
            }
        }
        if !version_items.is_empty() {
            selector.version = Some(parse_version_req(&version_items.join(","))?);
        }
        Ok(selector)
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut items: Vec<String> = self.tags.iter().map(ToString::to_string).collect();
        if let Some(req) = &self.version {
            items.push(format_version_req(req));
        }
        f.write_str(&items.join(","))
    }
}

impl TryFrom<String> for Selector {
    type Error = SelectorError;
    fn try_from(s: String) -> Result<Self, SelectorError> {
        s.parse()
    }
}

impl From<Selector> for String {
    fn from(s: Selector) -> String {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(list: &[&str]) -> Vec<Tag> {
        list.iter().map(|t| Tag::new(*t).unwrap()).collect()
    }

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap()
    }

    #[test]
    fn rule_lists_parse_into_tags_and_one_requirement() {
        let s: Selector = "+claude,-slow,fast,>=1.2,<2".parse().unwrap();
        assert_eq!(
            s.tags,
            vec![
                TagRule::Preferred(Tag::new("claude").unwrap()),
                TagRule::Excluded(Tag::new("slow").unwrap()),
                TagRule::Required(Tag::new("fast").unwrap()),
            ]
        );
        assert_eq!(s.version, Some(VersionReq::parse(">=1.2, <2").unwrap()));
        assert_eq!(s.to_string(), "+claude,-slow,fast,>=1.2,<2");
        assert!("".parse::<Selector>().unwrap().is_empty());
    }

    #[test]
    fn bad_rule_lists_say_which_item() {
        assert_eq!(
            "+a,,b".parse::<Selector>().unwrap_err(),
            SelectorError::EmptyItem
        );
        let err = "+Claude".parse::<Selector>().unwrap_err().to_string();
        assert!(
            err.starts_with("tag rule \"+Claude\": tag \"Claude\" is not valid"),
            "{err}"
        );
        let err = "-".parse::<Selector>().unwrap_err().to_string();
        assert!(
            err.starts_with("tag rule \"-\": tag \"\" is not valid"),
            "{err}"
        );
        let err = ">=1.x.y".parse::<Selector>().unwrap_err();
        assert!(matches!(err, SelectorError::Version(_)), "{err}");
    }

    #[test]
    fn preferred_tags_score_and_required_tags_filter() {
        let s: Selector = "+claude,+fast,chat".parse().unwrap();
        assert_eq!(s.matches(&tags(&["chat", "claude", "fast"]), None), Some(2));
        assert_eq!(s.matches(&tags(&["chat", "openai"]), None), Some(0));
        assert_eq!(s.matches(&tags(&["claude", "fast"]), None), None);
    }

    #[test]
    fn excluded_tags_remove_the_endpoint() {
        let s: Selector = "+claude,-slow".parse().unwrap();
        assert_eq!(s.matches(&tags(&["claude", "slow"]), None), None);
        assert_eq!(s.matches(&tags(&["claude"]), None), Some(1));
        assert_eq!(s.matches(&[], None), Some(0));
    }

    #[test]
    fn version_requirements_filter_and_versionless_endpoints_fail_them() {
        let s: Selector = ">=1.2,<2".parse().unwrap();
        assert_eq!(s.matches(&[], Some(&v("1.5.0"))), Some(0));
        assert_eq!(s.matches(&[], Some(&v("2.0.0"))), None);
        assert_eq!(s.matches(&[], Some(&v("1.1.0"))), None);
        assert_eq!(s.matches(&[], None), None);
        let any = Selector::default();
        assert_eq!(any.matches(&[], None), Some(0));
    }

    #[test]
    fn selectors_serialize_as_their_rule_list() {
        let s: Selector = "+claude,>=1.2".parse().unwrap();
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"+claude,>=1.2\"");
        let back: Selector = serde_json::from_str("\"+claude,>=1.2\"").unwrap();
        assert_eq!(back, s);
        assert!(serde_json::from_str::<Selector>("\"+Bad\"").is_err());
    }
}

//! Version rules: parsing semver versions and requirements with errors that say how to fix them.
//!
//! Versions are strict semver (`1.2.0`, `2.0.0-beta.1`); requirements are semver comparators
//! (`>=1.2`, `<2`, `^1.4`, `~1.2.3`, `=1.0.0`). The `semver` crate does the parsing; this module
//! only phrases its refusals for people and writes requirements back in the compact flag form.

use semver::{Version, VersionReq};

/// Why a version or a version requirement was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VersionError {
    /// A version that is not semver.
    #[error("version {input:?} is not semver: {reason} (use MAJOR.MINOR.PATCH, such as 1.2.0)")]
    Version {
        /// The refused input, as given.
        input: String,
        /// What the semver parser objected to.
        reason: String,
    },
    /// A version requirement that is not a list of semver comparators.
    #[error(
        "version requirement {input:?} is not valid: {reason} (use comparators such as >=1.2,<2)"
    )]
    Requirement {
        /// The refused input, as given.
        input: String,
        /// What the semver parser objected to.
        reason: String,
    },
}

/// Parses a semver version such as `1.2.0`; surrounding whitespace is ignored.
pub fn parse_version(input: &str) -> Result<Version, VersionError> {
    Version::parse(input.trim()).map_err(|e| VersionError::Version {
        input: input.to_owned(),
        reason: e.to_string(),
    })
}

/// Parses a semver requirement such as `>=1.2,<2` (comparators joined by commas).
///
/// An empty requirement is refused: "no constraint" is written by leaving the requirement out.
pub fn parse_version_req(input: &str) -> Result<VersionReq, VersionError> {
    if input.trim().is_empty() {
        return Err(VersionError::Requirement {
            input: input.to_owned(),
            reason: "it is empty".to_owned(),
        });
    }
    VersionReq::parse(input.trim()).map_err(|e| VersionError::Requirement {
        input: input.to_owned(),
        reason: e.to_string(),
    })
}

/// Writes a requirement in the compact flag form (`>=1.2,<2`), which [`parse_version_req`] reads
/// back to an equal value. (`VersionReq`'s own `Display` puts a space after each comma.)
pub fn format_version_req(req: &VersionReq) -> String {
    if req.comparators.is_empty() {
        return "*".to_owned();
    }
    req.comparators
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// True when `item` (one comma-separated piece of a rule list) belongs to a version requirement
/// rather than naming a tag: it starts with a comparison operator or a digit.
pub fn looks_like_version_req(item: &str) -> bool {
    item.trim_start()
        .starts_with(|c: char| matches!(c, '>' | '<' | '=' | '^' | '~') || c.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_strictly_with_a_fix_in_the_error() {
        assert_eq!(parse_version(" 1.2.3 ").unwrap(), Version::new(1, 2, 3));
        assert!(parse_version("2.0.0-beta.1").is_ok());
        let err = parse_version("1.2").unwrap_err().to_string();
        assert!(err.starts_with("version \"1.2\" is not semver: "), "{err}");
        assert!(
            err.ends_with("(use MAJOR.MINOR.PATCH, such as 1.2.0)"),
            "{err}"
        );
        assert!(parse_version("v1.2.3").is_err());
    }

    #[test]
    fn requirements_parse_and_refuse_nonsense() {
        let req = parse_version_req(">=1.2,<2").unwrap();
        assert!(req.matches(&Version::new(1, 9, 0)));
        assert!(!req.matches(&Version::new(2, 0, 0)));
        assert!(!req.matches(&Version::new(1, 1, 9)));
        let err = parse_version_req(">=x").unwrap_err().to_string();
        assert!(
            err.starts_with("version requirement \">=x\" is not valid: "),
            "{err}"
        );
        assert!(parse_version_req("  ").is_err());
    }

    #[test]
    fn compact_form_round_trips() {
        for text in [">=1.2,<2", "^1.4", "~1.2.3", "=1.0.0", ">1,<=3.1"] {
            let req = parse_version_req(text).unwrap();
            assert_eq!(format_version_req(&req), text);
            assert_eq!(parse_version_req(&format_version_req(&req)).unwrap(), req);
        }
        // A bare version means caret, and says so when written back.
        let req = parse_version_req("1.2").unwrap();
        assert_eq!(format_version_req(&req), "^1.2");
    }

    #[test]
    fn version_items_are_told_from_tags() {
        for item in [">=1.2", "<2", "=1.0.0", "^1", "~1.2", "1.2"] {
            assert!(looks_like_version_req(item), "{item}");
        }
        for item in ["claude", "+claude", "-slow", "eu-west"] {
            assert!(!looks_like_version_req(item), "{item}");
        }
    }
}

//! The rules for mesh-wide settings ([`MeshSettings`]) set by people (`PUT /v1/settings`,
//! `capmesh settings set`): which keys exist, and which values make sense. A bad value is
//! refused whole, naming the key, the value and what is accepted.

use serde_json::Value;

use crate::snapshot::MeshSettings;

/// Why settings were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    /// A key that is not a setting (a typo would otherwise leave the default in force).
    #[error(
        "unknown setting {0:?}: the settings are propagate_headers, request_timeout_ms, connect_timeout_ms, retry_budget_percent, retry_min_per_sec and breaker_failures"
    )]
    UnknownKey(String),
    /// The session key is the control plane's own secret.
    #[error(
        "session_key cannot be set: the control plane creates the mesh's session key and keeps it secret"
    )]
    SessionKey,
    /// The body is not a JSON object of settings.
    #[error("the settings are not readable: {0}")]
    Shape(String),
    /// A value outside its range.
    #[error("{key} = {value} is out of range: use {range}")]
    OutOfRange {
        /// The setting.
        key: &'static str,
        /// The value given.
        value: u64,
        /// What is accepted.
        range: &'static str,
    },
    /// A propagated header that is not a header name or prefix.
    #[error("propagate_headers: {0}")]
    Header(String),
}

/// Keys a person may set.
const KEYS: [&str; 6] = [
    "propagate_headers",
    "request_timeout_ms",
    "connect_timeout_ms",
    "retry_budget_percent",
    "retry_min_per_sec",
    "breaker_failures",
];

/// Checks one propagated-header entry: a lowercase header name (`x-tenant-id`) or a prefix
/// ending in `*` (`x-request-*`); `*` alone is refused (it would carry cookies and credentials
/// to every agent). Returns it lowercased.
pub fn parse_propagated_header(s: &str) -> Result<String, String> {
    let s = s.trim().to_ascii_lowercase();
    if s == "*" {
        return Err(
            "'*' would leak every header (cookies, credentials) to every agent: list the names or \
             prefixes to carry, such as x-tenant-id,x-request-*"
                .into(),
        );
    }
    let name = s.strip_suffix('*').unwrap_or(&s);
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(format!(
            "{s:?} is not a header name or prefix: use names like x-tenant-id or prefixes like x-request-*"
        ));
    }
    Ok(s)
}

impl MeshSettings {
    /// Reads settings a person sent: a JSON object with only the keys of [`MeshSettings`] (the
    /// session key excluded); missing keys take their defaults. The result is validated.
    pub fn from_request(body: &Value) -> Result<MeshSettings, SettingsError> {
        let object = body.as_object().ok_or_else(|| {
            SettingsError::Shape(
                "send a JSON object such as {\"request_timeout_ms\": 30000}".into(),
            )
        })?;
        for key in object.keys() {
            if key == "session_key" {
                return Err(SettingsError::SessionKey);
            }
            if !KEYS.contains(&key.as_str()) {
                return Err(SettingsError::UnknownKey(key.clone()));
            }
        }
        let settings: MeshSettings = serde_json::from_value(body.clone())
            .map_err(|e| SettingsError::Shape(e.to_string()))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks every value; the first bad one is named.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let range = |key, value: u64, lo: u64, hi: u64, text| {
            if (lo..=hi).contains(&value) {
                Ok(())
            } else {
                Err(SettingsError::OutOfRange {
                    key,
                    value,
                    range: text,
                })
            }
        };
        range(
            "request_timeout_ms",
            self.request_timeout_ms,
            1,
            86_400_000,
            "1 to 86400000 (24 h)",
        )?;
        range(
            "connect_timeout_ms",
            self.connect_timeout_ms,
            1,
            60_000,
            "1 to 60000 (1 min)",
        )?;
        range(
            "retry_budget_percent",
            u64::from(self.retry_budget_percent),
            0,
            100,
            "0 to 100",
        )?;
        range(
            "retry_min_per_sec",
            u64::from(self.retry_min_per_sec),
            0,
            10_000,
            "0 to 10000",
        )?;
        range(
            "breaker_failures",
            u64::from(self.breaker_failures),
            1,
            1_000,
            "1 to 1000",
        )?;
        for header in &self.propagate_headers {
            let parsed = parse_propagated_header(header).map_err(SettingsError::Header)?;
            if &parsed != header {
                return Err(SettingsError::Header(format!(
                    "{header:?} must be written in lowercase: {parsed:?}"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn requests_name_the_bad_key_or_value() {
        let ok = MeshSettings::from_request(&json!({"request_timeout_ms": 30000, "propagate_headers": ["x-tenant-id", "x-request-*"]})).unwrap();
        assert_eq!(ok.request_timeout_ms, 30_000);
        assert_eq!(ok.retry_budget_percent, 20, "missing keys take defaults");
        let err = MeshSettings::from_request(&json!({"request_timout_ms": 1})).unwrap_err();
        assert!(
            err.to_string()
                .contains("unknown setting \"request_timout_ms\""),
            "{err}"
        );
        let err = MeshSettings::from_request(&json!({"session_key": "00"})).unwrap_err();
        assert_eq!(err, SettingsError::SessionKey);
        let err = MeshSettings::from_request(&json!({"retry_budget_percent": 150})).unwrap_err();
        assert!(
            err.to_string().contains("retry_budget_percent = 150"),
            "{err}"
        );
        let err = MeshSettings::from_request(&json!({"propagate_headers": ["*"]})).unwrap_err();
        assert!(err.to_string().contains("leak every header"), "{err}");
        let err = MeshSettings::from_request(&json!({"request_timeout_ms": "soon"})).unwrap_err();
        assert!(matches!(err, SettingsError::Shape(_)), "{err}");
        let err = MeshSettings::from_request(&json!([1])).unwrap_err();
        assert!(matches!(err, SettingsError::Shape(_)), "{err}");
    }
}

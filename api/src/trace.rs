//! What the mesh knows about its own traffic: the spans sidecars record (one per hop), the
//! per-capability traffic each sidecar counts, and the REST bodies that `capmesh trace` and the
//! dashboard read.
//!
//! Spans travel up the topology stream in [`crate::ProxyFrame::Spans`] batches and traffic in
//! [`crate::ProxyFrame::Traffic`] reports; [`SpanRecord::check`] is what the control plane
//! accepts (a span it cannot read is dropped and counted, never stored half-read).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The most spans one `spans` frame may carry.
pub const MAX_SPANS_PER_FRAME: usize = 256;
/// The most attributes one span may carry.
pub const MAX_ATTRIBUTES: usize = 32;
/// The longest span name, attribute key or string value, in bytes.
pub const MAX_TEXT: usize = 1024;

/// Which side of a hop a span describes (OpenTelemetry's span kinds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpanKind {
    /// The consumer's sidecar sending a call (`CLIENT`).
    Client,
    /// The provider's sidecar receiving it (`SERVER`).
    Server,
}

impl SpanKind {
    /// `client` or `server`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Server => "server",
        }
    }
}

/// An attribute's value: OpenTelemetry's string, integer and boolean kinds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AttributeValue {
    /// `true` / `false`.
    Bool(bool),
    /// A signed integer.
    Int(i64),
    /// Text.
    Text(String),
}

impl std::fmt::Display for AttributeValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Bool(b) => write!(f, "{b}"),
            Self::Int(i) => write!(f, "{i}"),
            Self::Text(s) => f.write_str(s),
        }
    }
}

impl From<&str> for AttributeValue {
    fn from(s: &str) -> Self {
        Self::Text(s.to_owned())
    }
}

impl From<String> for AttributeValue {
    fn from(s: String) -> Self {
        Self::Text(s)
    }
}

impl From<i64> for AttributeValue {
    fn from(i: i64) -> Self {
        Self::Int(i)
    }
}

impl From<bool> for AttributeValue {
    fn from(b: bool) -> Self {
        Self::Bool(b)
    }
}

/// One finished span, as a sidecar recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpanRecord {
    /// The W3C trace id: 32 lowercase hex digits.
    pub trace_id: String,
    /// This span's id: 16 lowercase hex digits (the `parent-id` the next hop saw).
    pub span_id: String,
    /// The span it continues, when the request carried a trace context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_span_id: Option<String>,
    /// `tools/call get_weather`, following OpenTelemetry's MCP conventions.
    pub name: String,
    /// Client (consumer side) or server (provider side).
    pub kind: SpanKind,
    /// When the hop began, in nanoseconds since the Unix epoch.
    pub start_unix_nanos: u64,
    /// When it ended (its response's last byte, or its error).
    pub end_unix_nanos: u64,
    /// MCP, GenAI, HTTP and capmesh attributes (`mcp.method.name`, `gen_ai.tool.name`,
    /// `capmesh.provider`, …).
    #[serde(default)]
    pub attributes: BTreeMap<String, AttributeValue>,
    /// Why the hop failed (the span's error status), when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Why a span was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpanError {
    /// An id is not lowercase hex of the right length, or is all zeros.
    #[error("{field} {value:?} is not {digits} lowercase hex digits (and not all zeros)")]
    BadId {
        /// `trace_id`, `span_id` or `parent_span_id`.
        field: &'static str,
        /// What was sent.
        value: String,
        /// 32 or 16.
        digits: usize,
    },
    /// The end is before the start.
    #[error("the span ends before it starts")]
    NegativeDuration,
    /// Too many attributes, or text too long.
    #[error("{0}")]
    TooLarge(String),
}

/// Whether `s` is `digits` lowercase hex digits, not all zeros (W3C trace context).
pub fn is_hex_id(s: &str, digits: usize) -> bool {
    s.len() == digits
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && s.bytes().any(|b| b != b'0')
}

impl SpanRecord {
    /// How long the hop took, in nanoseconds.
    pub fn duration_nanos(&self) -> u64 {
        self.end_unix_nanos.saturating_sub(self.start_unix_nanos)
    }

    /// The attribute `key` as text, if set.
    pub fn text(&self, key: &str) -> Option<String> {
        self.attributes.get(key).map(ToString::to_string)
    }

    /// Checks what a control plane stores: well-formed ids, an end after the start, bounded
    /// names and attributes.
    pub fn check(&self) -> Result<(), SpanError> {
        let id = |field, value: &str, digits| {
            if is_hex_id(value, digits) {
                Ok(())
            } else {
                Err(SpanError::BadId {
                    field,
                    value: value.chars().take(64).collect(),
                    digits,
                })
            }
        };
        id("trace_id", &self.trace_id, 32)?;
        id("span_id", &self.span_id, 16)?;
        if let Some(parent) = &self.parent_span_id {
            id("parent_span_id", parent, 16)?;
        }
        if self.end_unix_nanos < self.start_unix_nanos {
            return Err(SpanError::NegativeDuration);
        }
        if self.attributes.len() > MAX_ATTRIBUTES {
            return Err(SpanError::TooLarge(format!(
                "{} attributes, more than {MAX_ATTRIBUTES}",
                self.attributes.len()
            )));
        }
        let long = |s: &str| s.len() > MAX_TEXT;
        let value_long = |v: &AttributeValue| matches!(v, AttributeValue::Text(t) if long(t));
        if long(&self.name)
            || self.error.as_deref().is_some_and(long)
            || self
                .attributes
                .iter()
                .any(|(k, v)| long(k) || value_long(v))
        {
            return Err(SpanError::TooLarge(format!(
                "a name, attribute or error text is longer than {MAX_TEXT} bytes"
            )));
        }
        Ok(())
    }
}

/// A sidecar's outbound traffic to one capability over the last report interval, read from
/// its request metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EdgeTraffic {
    /// The capability called.
    pub capability: String,
    /// Calls made in the interval.
    pub requests: u64,
    /// Calls answered with an error (an HTTP error status or an error of the mesh's own).
    pub errors: u64,
    /// 99th percentile latency to response headers, in milliseconds, when calls were answered
    /// (from the latency histogram's buckets: the upper bound of the bucket it falls in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<f64>,
    /// Endpoints of the capability this sidecar's circuit breaker has ejected right now
    /// (`<agent>#<instance>`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ejected: Vec<String>,
}

/// One traffic report: what a sidecar sent to each capability since its last report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Traffic {
    /// How long the report covers, in milliseconds.
    pub interval_ms: u64,
    /// One entry per capability called (or with an endpoint ejected).
    pub edges: Vec<EdgeTraffic>,
}

/// One trace in the list `GET /v1/traces` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceSummary {
    /// The trace id.
    pub trace_id: String,
    /// The name of its first span (`tools/call get_weather`).
    pub root: String,
    /// When its first span began, nanoseconds since the Unix epoch.
    pub start_unix_nanos: u64,
    /// From the first span's start to the last span's end.
    pub duration_nanos: u64,
    /// Spans held.
    pub spans: usize,
    /// Spans that ended in an error.
    pub errors: usize,
    /// Agents whose sidecars recorded its spans, sorted.
    pub agents: Vec<String>,
}

/// A span as the control plane keeps it: the record plus who sent it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSpan {
    /// The span.
    #[serde(flatten)]
    pub span: SpanRecord,
    /// The agent whose sidecar recorded it.
    pub agent: String,
    /// That sidecar's proxy id.
    pub proxy_id: String,
}

/// `GET /v1/traces/{trace_id}`: every span the control plane holds for one trace, by start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trace {
    /// The trace id.
    pub trace_id: String,
    /// Its spans, earliest first.
    pub spans: Vec<StoredSpan>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn span() -> SpanRecord {
        SpanRecord {
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
            span_id: "00f067aa0ba902b7".into(),
            parent_span_id: None,
            name: "tools/call get_weather".into(),
            kind: SpanKind::Client,
            start_unix_nanos: 10,
            end_unix_nanos: 20,
            attributes: BTreeMap::from([
                (
                    "mcp.method.name".into(),
                    AttributeValue::Text("tools/call".into()),
                ),
                ("http.response.status_code".into(), AttributeValue::Int(200)),
                ("capmesh.failover".into(), AttributeValue::Bool(false)),
            ]),
            error: None,
        }
    }

    #[test]
    fn spans_round_trip_with_typed_attributes() {
        let s = span();
        let json = serde_json::to_string(&s).unwrap();
        assert!(
            json.contains(r#""http.response.status_code":200"#),
            "{json}"
        );
        assert!(json.contains(r#""capmesh.failover":false"#), "{json}");
        let back: SpanRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        assert!(back.check().is_ok());
    }

    #[test]
    fn malformed_spans_are_refused_with_the_field_named() {
        let mut s = span();
        s.trace_id = "00000000000000000000000000000000".into();
        assert!(s.check().unwrap_err().to_string().contains("trace_id"));
        let mut s = span();
        s.parent_span_id = Some("XYZ".into());
        assert!(
            s.check()
                .unwrap_err()
                .to_string()
                .contains("parent_span_id")
        );
        let mut s = span();
        s.end_unix_nanos = 5;
        assert_eq!(s.check(), Err(SpanError::NegativeDuration));
        let mut s = span();
        s.name = "x".repeat(MAX_TEXT + 1);
        assert!(matches!(s.check(), Err(SpanError::TooLarge(_))));
    }
}

//! Which headers cross a proxy hop, and W3C trace context.
//!
//! The mesh carries allow-listed headers (`--propagate-headers` plus the mesh settings) over
//! every proxy hop unchanged; everything else from the client stays behind. `traceparent` is
//! carried as the hop's span layer ([`crate::trace`]) left it: naming the span it recorded, or
//! as it came when the hop was not sampled. A request no span layer saw starts a new,
//! unsampled trace.

use http::{HeaderMap, HeaderName};

/// The `x-capmesh-served-by` value for `ep` (`identity#instance`), written in one allocation
/// that the value then owns; `None` if the name has bytes a header value cannot carry.
pub fn served_by(ep: &capmesh_api::Endpoint) -> Option<http::HeaderValue> {
    let mut v = Vec::with_capacity(ep.identity.len() + 1 + ep.instance.len());
    v.extend_from_slice(ep.identity.as_bytes());
    v.push(b'#');
    v.extend_from_slice(ep.instance.as_bytes());
    http::HeaderValue::from_maybe_shared(bytes::Bytes::from(v)).ok()
}

/// Allow-list of propagated headers: exact names and `prefix*` patterns, lowercase.
#[derive(Debug, Clone, Default)]
pub struct Propagation {
    exact: Vec<String>,
    prefixes: Vec<String>,
}

impl Propagation {
    /// From flag values and mesh settings (already validated: no bare `*`).
    pub fn new<'a>(patterns: impl IntoIterator<Item = &'a String>) -> Self {
        let mut p = Self::default();
        for pat in patterns {
            let pat = pat.to_ascii_lowercase();
            match pat.strip_suffix('*') {
                Some(prefix) if !prefix.is_empty() => p.prefixes.push(prefix.to_owned()),
                Some(_) => {}
                None => p.exact.push(pat),
            }
        }
        p
    }

    /// Whether `name` is carried.
    pub fn allows(&self, name: &str) -> bool {
        self.exact.iter().any(|e| e == name)
            || self.prefixes.iter().any(|p| name.starts_with(p.as_str()))
    }

    /// Copies the allow-listed headers of `from` into `to`.
    pub fn copy(&self, from: &HeaderMap, to: &mut HeaderMap) {
        for (name, value) in from {
            let n = name.as_str();
            if n.starts_with("x-capmesh-") {
                continue;
            }
            if self.allows(n) {
                to.append(name.clone(), value.clone());
            }
        }
    }
}

/// The client's headers minus hop-by-hop ones, `host`, the mesh's own (a caller cannot forge
/// them) and the trace context (continued separately): what passthrough and transparent mode
/// forward.
pub fn forwarded(from: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(from.len() + 4);
    for (name, value) in from {
        let n = name.as_str();
        if is_hop_by_hop(n)
            || n.starts_with(crate::contract::MESH_HEADER_PREFIX)
            || matches!(n, "traceparent" | "tracestate")
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    continue_trace(from, &mut out);
    out
}

/// Headers that belong to one connection, never forwarded (RFC 9110 §7.6.1), plus `host`.
pub fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
    )
}

/// Carries the trace context of `from` to `to` (`traceparent` as the span layer left it, and
/// `tracestate`), or starts a new unsampled trace when `from` has none that is valid. Returns
/// the trace id.
///
/// `traceparent` is marked sensitive: its value is new on every call, and over HTTP/2 HPACK
/// would add each one to the peer connection's dynamic table and evict the entries that do
/// repeat, so it goes as a literal that is never indexed (HTTP/1 ignores the mark).
pub fn continue_trace(from: &HeaderMap, to: &mut HeaderMap) -> opentelemetry::trace::TraceId {
    use crate::trace::{TRACEPARENT, context};
    use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator};
    let trace_id = match context::parent(from) {
        Some(parent) => {
            if let Some(v) = from.get(TRACEPARENT) {
                to.insert(TRACEPARENT, v.clone());
            }
            parent.trace_id
        }
        None => {
            let ids = RandomIdGenerator::default();
            let trace_id = ids.new_trace_id();
            to.insert(
                TRACEPARENT,
                context::value(trace_id, ids.new_span_id(), false),
            );
            trace_id
        }
    };
    if let Some(v) = to.get_mut(TRACEPARENT) {
        v.set_sensitive(true);
    }
    const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
    if let Some(state) = from.get(TRACESTATE) {
        to.insert(TRACESTATE, state.clone());
    }
    trace_id
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    #[test]
    fn allow_list_takes_exact_names_and_prefixes_and_never_capmesh_headers() {
        let p = Propagation::new(&["x-tenant-id".to_owned(), "x-request-*".to_owned()]);
        let mut from = HeaderMap::new();
        from.insert("x-tenant-id", HeaderValue::from_static("t1"));
        from.insert("x-request-source", HeaderValue::from_static("web"));
        from.insert("x-secret", HeaderValue::from_static("s"));
        from.insert("authorization", HeaderValue::from_static("Bearer x"));
        from.insert("x-capmesh-caller", HeaderValue::from_static("forged"));
        let mut to = HeaderMap::new();
        p.copy(&from, &mut to);
        assert_eq!(to.len(), 2);
        assert!(to.contains_key("x-tenant-id") && to.contains_key("x-request-source"));
    }

    #[test]
    fn trace_context_is_carried_as_the_span_layer_left_it_or_started() {
        let mut from = HeaderMap::new();
        // What a span layer leaves: its own span id in the parent-id field.
        from.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        from.insert("tracestate", HeaderValue::from_static("vendor=1"));
        let mut to = HeaderMap::new();
        let trace = continue_trace(&from, &mut to);
        assert_eq!(trace.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            to["traceparent"], "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "the next hop's parent is the recorded span"
        );
        assert!(
            to["traceparent"].is_sensitive(),
            "a new value per call stays out of HPACK's table"
        );
        assert_eq!(to["tracestate"], "vendor=1");

        let mut to = HeaderMap::new();
        let fresh = continue_trace(&HeaderMap::new(), &mut to);
        assert_eq!(fresh.to_string().len(), 32);
        assert!(
            to["traceparent"].to_str().unwrap().ends_with("-00"),
            "a trace no span layer saw is not sampled"
        );
        let mut bad = HeaderMap::new();
        bad.insert("traceparent", HeaderValue::from_static("garbage"));
        let mut to2 = HeaderMap::new();
        assert_ne!(continue_trace(&bad, &mut to2).to_string(), "garbage");
    }
}

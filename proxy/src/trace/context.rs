//! W3C trace context (`traceparent`): read what a request carries, write what the next hop
//! sees.

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::trace::{SpanId, TraceId};

/// The trace context header (a constant name: looked up and inserted on every call, and a
/// `&str` key is parsed on each lookup and copied on each insert).
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// What a request's `traceparent` says: the trace, the span that sent it and whether that
/// side sampled it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parent {
    /// The trace.
    pub trace_id: TraceId,
    /// The sending side's span.
    pub span_id: SpanId,
    /// The `sampled` flag.
    pub sampled: bool,
}

/// Reads `traceparent` (version `00`, or a later version's first four fields, as the W3C
/// specification asks). `None` when absent or malformed, or when an id is all zeros.
///
/// Read on the bytes, twice on every call of every hop (the span and the next hop's header):
/// `str` checks and `from_str_radix` made this about 2,400 instructions a read.
pub fn parent(headers: &HeaderMap) -> Option<Parent> {
    let value = headers.get(TRACEPARENT)?.as_bytes().trim_ascii();
    let mut parts = value.split(|&b| b == b'-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let [version] = crate::ids::hex_from::<1>(version)?;
    let [flags] = crate::ids::hex_from::<1>(flags)?;
    // Version 00 has exactly four fields; later versions may append more.
    if version == 0xff || (version == 0 && parts.next().is_some()) {
        return None;
    }
    let trace_id = TraceId::from_bytes(crate::ids::hex_from::<16>(trace)?);
    let span_id = SpanId::from_bytes(crate::ids::hex_from::<8>(span)?);
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    Some(Parent {
        trace_id,
        span_id,
        sampled: flags & 1 == 1,
    })
}

/// The `traceparent` value naming `span_id` of `trace_id` as the parent of the next hop.
pub fn value(trace_id: TraceId, span_id: SpanId, sampled: bool) -> HeaderValue {
    // Written in place (once per call on every hop): `00-<32 hex>-<16 hex>-<flags>`.
    let mut text = *b"00-00000000000000000000000000000000-0000000000000000-00";
    crate::ids::hex_into(&trace_id.to_bytes(), &mut text[3..35]);
    crate::ids::hex_into(&span_id.to_bytes(), &mut text[36..52]);
    if sampled {
        text[54] = b'1';
    }
    // Hex digits and dashes only: always a valid header value.
    HeaderValue::from_bytes(&text).unwrap_or(HeaderValue::from_static(
        "00-00000000000000000000000000000001-0000000000000001-00",
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn headers(tp: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static(tp));
        h
    }

    #[test]
    fn reads_valid_contexts_and_refuses_malformed_ones() {
        let p = parent(&headers(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ))
        .unwrap();
        assert_eq!(p.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(p.span_id.to_string(), "00f067aa0ba902b7");
        assert!(p.sampled);
        let unsampled = parent(&headers(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        ))
        .unwrap();
        assert!(!unsampled.sampled);
        // Either case, and optional whitespace around the value.
        let upper = parent(&headers(
            " 00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-03 ",
        ))
        .unwrap();
        assert_eq!(upper.trace_id, p.trace_id);
        assert_eq!(upper.span_id, p.span_id);
        assert!(upper.sampled);
        // A later version may carry more fields.
        assert!(
            parent(&headers(
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"
            ))
            .is_some()
        );
        for bad in [
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parent(&headers(bad)), None, "{bad}");
        }
    }

    #[test]
    fn writes_what_it_reads() {
        let trace = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap();
        let span = SpanId::from_hex("00f067aa0ba902b7").unwrap();
        let v = value(trace, span, true);
        assert_eq!(
            v.to_str().unwrap(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, value(trace, span, false));
        assert_eq!(
            parent(&h),
            Some(Parent {
                trace_id: trace,
                span_id: span,
                sampled: false
            })
        );
    }
}

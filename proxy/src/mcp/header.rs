//! The MCP HTTP headers: their names, the 2026-07-28 value encoding (`=?base64?…?=` for values
//! that cannot travel as plain header text) and re-emitting `Mcp-Method`/`Mcp-Name` after the
//! proxy rewrites a body.
//!
//! Encoding rule (SEP-2243): a value goes as-is when it is printable ASCII (0x20–0x7E) without
//! leading or trailing whitespace and does not itself look like the sentinel; otherwise it is
//! `=?base64?{standard Base64 of its UTF-8 bytes}?=`. The markers are lowercase and
//! case-sensitive.

use std::borrow::Cow;

use http::{HeaderMap, HeaderName, HeaderValue};

/// `MCP-Protocol-Version`.
pub const MCP_PROTOCOL_VERSION: HeaderName = HeaderName::from_static("mcp-protocol-version");
/// `Mcp-Session-Id` (legacy generations only).
pub const MCP_SESSION_ID: HeaderName = HeaderName::from_static("mcp-session-id");
/// `Mcp-Method` (2026-07-28): mirrors the body's `method`.
pub const MCP_METHOD: HeaderName = HeaderName::from_static("mcp-method");
/// `Mcp-Name` (2026-07-28): mirrors `params.name` or `params.uri`.
pub const MCP_NAME: HeaderName = HeaderName::from_static("mcp-name");

const PREFIX: &str = "=?base64?";
const SUFFIX: &str = "?=";

/// Why an `=?base64?…?=` header value could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderDecodeError {
    /// The payload is not standard Base64.
    #[error("the =?base64?…?= value is not valid Base64")]
    Base64,
    /// The decoded bytes are not UTF-8.
    #[error("the =?base64?…?= value does not decode to UTF-8 text")]
    Utf8,
}

/// Decodes an `Mcp-Name`/`Mcp-Param-*` value to the text the body carries: `=?base64?…?=`
/// values are decoded, anything else is returned unchanged (borrowed).
pub fn header_value_decode(v: &str) -> Result<Cow<'_, str>, HeaderDecodeError> {
    let Some(payload) = v
        .strip_prefix(PREFIX)
        .and_then(|rest| rest.strip_suffix(SUFFIX))
    else {
        return Ok(Cow::Borrowed(v));
    };
    let bytes = base64_decode(payload.as_bytes()).ok_or(HeaderDecodeError::Base64)?;
    String::from_utf8(bytes)
        .map(Cow::Owned)
        .map_err(|_| HeaderDecodeError::Utf8)
}

/// Encodes a value for an MCP header: as-is when it is safe plain text, otherwise wrapped as
/// `=?base64?…?=`. The result is always a valid [`HeaderValue`].
pub fn header_value_encode(v: &str) -> Cow<'_, str> {
    let plain = v.bytes().all(|b| (0x20..=0x7e).contains(&b)) && v.trim() == v && !looks_encoded(v);
    if plain {
        Cow::Borrowed(v)
    } else {
        Cow::Owned(format!("{PREFIX}{}{SUFFIX}", base64_encode(v.as_bytes())))
    }
}

/// Whether `v` has the sentinel form that [`header_value_decode`] would try to decode.
fn looks_encoded(v: &str) -> bool {
    v.strip_prefix(PREFIX)
        .is_some_and(|rest| rest.ends_with(SUFFIX))
}

/// Sets `Mcp-Method` to `method` and `Mcp-Name` to `name` (encoded as needed), removing any
/// `Mcp-Name` when `name` is `None`. Used after the proxy rewrites a tool name in the body so
/// that headers and body agree again.
pub fn set_routing_headers(headers: &mut HeaderMap, method: &str, name: Option<&str>) {
    set_encoded(headers, MCP_METHOD, method);
    match name {
        Some(n) => set_encoded(headers, MCP_NAME, n),
        None => {
            headers.remove(MCP_NAME);
        }
    }
}

fn set_encoded(headers: &mut HeaderMap, header: HeaderName, value: &str) {
    // `header_value_encode` yields printable ASCII only, so this cannot fail; if it somehow did,
    // dropping the header makes the upstream reject the request rather than mis-route it.
    match HeaderValue::from_str(&header_value_encode(value)) {
        Ok(v) => {
            headers.insert(header, v);
        }
        Err(_) => {
            headers.remove(header);
        }
    }
}

const STANDARD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const URL_SAFE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn encode_with(input: &[u8], alphabet: &[u8; 64], pad: bool) -> String {
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(alphabet[((n >> shift) & 63) as usize]));
            } else if pad {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes unpadded input; with `canonical`, bits past the last whole byte must be zero, so
/// each value has exactly one spelling (needed where the text is an identifier).
fn decode_with(input: &[u8], alphabet: &[u8; 64], canonical: bool) -> Option<Vec<u8>> {
    if input.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(input.len() / 4 * 3 + 2);
    for chunk in input.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            let v = alphabet.iter().position(|&a| a == c)? as u32;
            n |= v << (18 - 6 * i as u32);
        }
        let bytes = n.to_be_bytes();
        if canonical && bytes[chunk.len()..].iter().any(|&b| b != 0) {
            return None;
        }
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

/// Standard Base64 with `=` padding.
pub fn base64_encode(input: &[u8]) -> String {
    encode_with(input, STANDARD, true)
}

/// Decodes standard Base64; padding is optional, anything else outside the alphabet (or a
/// length that no encoding produces) is `None`.
pub fn base64_decode(input: &[u8]) -> Option<Vec<u8>> {
    let trimmed = match input {
        [rest @ .., b'=', b'='] | [rest @ .., b'='] if input.len().is_multiple_of(4) => rest,
        _ => input,
    };
    decode_with(trimmed, STANDARD, false)
}

/// URL-safe Base64 without padding (RFC 4648 §5).
pub fn base64url_encode(input: &[u8]) -> String {
    encode_with(input, URL_SAFE, false)
}

/// Decodes URL-safe Base64 without padding, accepting only the canonical spelling; anything
/// else is `None`.
pub fn base64url_decode(input: &[u8]) -> Option<Vec<u8>> {
    decode_with(input, URL_SAFE, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trip_and_vectors() {
        let vectors: [(&[u8], &str); 7] = [
            (b"", ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg=="),
            (b"fooba", "Zm9vYmE="),
            (b"foobar", "Zm9vYmFy"),
        ];
        for (raw, enc) in vectors {
            assert_eq!(base64_encode(raw), enc);
            assert_eq!(base64_decode(enc.as_bytes()).unwrap(), raw);
            assert_eq!(
                base64_decode(enc.trim_end_matches('=').as_bytes()).unwrap(),
                raw
            );
        }
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(base64_decode(base64_encode(&all).as_bytes()).unwrap(), all);
    }

    #[test]
    fn base64_rejects_garbage() {
        for bad in ["Zm9v!", "Z", "Zm9vY", "Zm-v", "Zg=a", "====", "Zg==="] {
            assert_eq!(base64_decode(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn decodes_sentinel_values() {
        // The spec's own example: a plain value that looks like the sentinel, encoded.
        assert_eq!(
            header_value_decode("=?base64?PT9iYXNlNjQ/bGl0ZXJhbD89?=").unwrap(),
            "=?base64?literal?="
        );
        assert_eq!(header_value_decode("=?base64?44Gt44GT?=").unwrap(), "ねこ");
        assert!(matches!(
            header_value_decode("add").unwrap(),
            Cow::Borrowed("add")
        ));
        // Markers are case-sensitive: an upper-case one is an ordinary value.
        assert_eq!(
            header_value_decode("=?BASE64?Zm9v?=").unwrap(),
            "=?BASE64?Zm9v?="
        );
        assert_eq!(
            header_value_decode("=?base64?***?="),
            Err(HeaderDecodeError::Base64)
        );
        assert_eq!(
            header_value_decode("=?base64?/w==?="),
            Err(HeaderDecodeError::Utf8)
        );
    }

    #[test]
    fn encodes_only_when_needed() {
        assert_eq!(header_value_encode("tools/call"), "tools/call");
        assert_eq!(header_value_encode("file:///a b.txt"), "file:///a b.txt");
        for v in ["ねこ", " lead", "trail ", "tab\there", "=?base64?literal?="] {
            let enc = header_value_encode(v);
            assert!(
                enc.starts_with(PREFIX) && enc.ends_with(SUFFIX),
                "{v} -> {enc}"
            );
            assert_eq!(header_value_decode(&enc).unwrap(), v);
        }
        assert_eq!(
            header_value_encode("=?base64?literal?="),
            "=?base64?PT9iYXNlNjQ/bGl0ZXJhbD89?="
        );
    }

    #[test]
    fn set_routing_headers_sets_and_clears() {
        let mut h = HeaderMap::new();
        h.insert(MCP_NAME, HeaderValue::from_static("old"));
        set_routing_headers(&mut h, "tools/call", Some("ねこ"));
        assert_eq!(h.get(MCP_METHOD).unwrap(), "tools/call");
        let name = h.get(MCP_NAME).unwrap().to_str().unwrap();
        assert_eq!(header_value_decode(name).unwrap(), "ねこ");
        set_routing_headers(&mut h, "tools/list", None);
        assert_eq!(h.get(MCP_METHOD).unwrap(), "tools/list");
        assert!(h.get(MCP_NAME).is_none());
        assert_eq!(h.get_all(MCP_METHOD).iter().count(), 1);
    }
}

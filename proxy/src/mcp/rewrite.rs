//! Rewriting `params.name` of a `tools/call` body in place, for the federated endpoint (the agent
//! calls the capability name; the provider knows the tool by its function name).
//!
//! The body is not round-tripped through `serde_json::Value`: that would turn integers beyond
//! 64 bits into floats and reorder keys. Instead a small scanner finds the byte span of the name
//! string and splices the new one in, so every other byte is forwarded exactly as the agent sent
//! it. Pair it with [`super::header::set_routing_headers`] so a 2026-07-28 request's `Mcp-Name`
//! agrees with the new body.

use bytes::Bytes;
use serde_json::Value;

use super::jsonrpc::{INVALID_PARAMS, INVALID_REQUEST, Id, PARSE_ERROR, RpcError};

/// Nesting deeper than this is refused, as serde_json does by default.
const MAX_DEPTH: usize = 128;

type Span = (usize, usize);

/// Structural failure inside the scanner; reported as a parse error.
struct Malformed;

struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
}

impl Scanner<'_> {
    fn ws(&mut self) {
        while matches!(self.b.get(self.i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        self.ws();
        if self.b.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    /// A string token; returns its span including the quotes.
    fn string(&mut self) -> Result<Span, Malformed> {
        self.ws();
        let start = self.i;
        if !self.eat(b'"') {
            return Err(Malformed);
        }
        loop {
            match self.b.get(self.i) {
                None => return Err(Malformed),
                Some(b'"') => {
                    self.i += 1;
                    return Ok((start, self.i));
                }
                Some(b'\\') => self.i += 2,
                Some(&c) if c < 0x20 => return Err(Malformed),
                Some(_) => self.i += 1,
            }
        }
    }

    /// Any value; returns its span.
    fn value(&mut self, depth: usize) -> Result<Span, Malformed> {
        if depth > MAX_DEPTH {
            return Err(Malformed);
        }
        self.ws();
        let start = self.i;
        match self.b.get(self.i) {
            Some(b'"') => return self.string(),
            Some(b'{') => self.object(|s, _| s.value(depth + 1).map(drop))?,
            Some(b'[') => {
                self.i += 1;
                if !self.eat(b']') {
                    loop {
                        self.value(depth + 1)?;
                        if self.eat(b']') {
                            break;
                        }
                        if !self.eat(b',') {
                            return Err(Malformed);
                        }
                    }
                }
            }
            _ => {
                while matches!(self.b.get(self.i), Some(c) if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'+' | b'.'))
                {
                    self.i += 1;
                }
                if self.i == start {
                    return Err(Malformed);
                }
            }
        }
        Ok((start, self.i))
    }

    /// An object, calling `member` with the key span once the scanner sits before its value.
    fn object<F>(&mut self, mut member: F) -> Result<(), Malformed>
    where
        F: FnMut(&mut Self, Span) -> Result<(), Malformed>,
    {
        if !self.eat(b'{') {
            return Err(Malformed);
        }
        if self.eat(b'}') {
            return Ok(());
        }
        loop {
            let key = self.string()?;
            if !self.eat(b':') {
                return Err(Malformed);
            }
            member(self, key)?;
            if self.eat(b'}') {
                return Ok(());
            }
            if !self.eat(b',') {
                return Err(Malformed);
            }
        }
    }

    /// Whether the string token at `span` means `want` (escapes decoded).
    fn str_eq(&self, span: Span, want: &str) -> bool {
        let Some(raw) = self.b.get(span.0..span.1) else {
            return false;
        };
        match raw.get(1..raw.len().saturating_sub(1)) {
            Some(inner) if !inner.contains(&b'\\') => inner == want.as_bytes(),
            _ => serde_json::from_slice::<String>(raw).is_ok_and(|s| s == want),
        }
    }
}

#[derive(Default)]
struct Found {
    method: Option<Span>,
    id: Option<Span>,
    params: Option<Span>,
    params_is_object: bool,
    name: Option<Span>,
    duplicate: bool,
}

fn set_once(slot: &mut Option<Span>, span: Span, duplicate: &mut bool) {
    if slot.replace(span).is_some() {
        *duplicate = true;
    }
}

fn scan(body: &[u8]) -> Result<Found, Malformed> {
    let mut s = Scanner { b: body, i: 0 };
    let mut f = Found::default();
    s.object(|s, key| {
        if s.str_eq(key, "params") {
            s.ws();
            let start = s.i;
            if s.b.get(s.i) == Some(&b'{') {
                f.params_is_object = true;
                s.object(|s, key| {
                    let v = s.value(2)?;
                    if s.str_eq(key, "name") {
                        set_once(&mut f.name, v, &mut f.duplicate);
                    }
                    Ok(())
                })?;
                set_once(&mut f.params, (start, s.i), &mut f.duplicate);
            } else {
                let v = s.value(1)?;
                set_once(&mut f.params, v, &mut f.duplicate);
            }
        } else {
            let v = s.value(1)?;
            if s.str_eq(key, "method") {
                set_once(&mut f.method, v, &mut f.duplicate);
            } else if s.str_eq(key, "id") {
                set_once(&mut f.id, v, &mut f.duplicate);
            }
        }
        Ok(())
    })?;
    s.ws();
    if s.i != body.len() {
        return Err(Malformed);
    }
    Ok(f)
}

/// Rewrites `params.name` of a `tools/call` request to `new_name`, leaving every other byte of
/// the body untouched.
///
/// Errors: not JSON → [`PARSE_ERROR`]; not a `tools/call` request, or a duplicated `method`,
/// `id`, `params` or `params.name` key (readers disagree on which copy wins) →
/// [`INVALID_REQUEST`]; `params` or `params.name` missing or not an object/string →
/// [`INVALID_PARAMS`]. Errors carry the request id when it was readable.
pub fn rename_tool_call(body: &[u8], new_name: &str) -> Result<Bytes, RpcError> {
    splice_tool_call(body, new_name, None)
}

/// Like [`rename_tool_call`], and replaces the request's `id` with `new_id` in the same pass
/// (the provider sees an id of the mesh's own; no JSON tree is built on the way).
pub fn rename_tool_call_with_id(
    body: &[u8],
    new_name: &str,
    new_id: &Value,
) -> Result<Bytes, RpcError> {
    splice_tool_call(body, new_name, Some(new_id))
}

fn splice_tool_call(
    body: &[u8],
    new_name: &str,
    new_id: Option<&Value>,
) -> Result<Bytes, RpcError> {
    let f =
        scan(body).map_err(|Malformed| RpcError::new(PARSE_ERROR, "the body is not valid JSON"))?;
    let slice = |span: Option<Span>| span.and_then(|(a, b)| body.get(a..b));
    // The request's own id, read only for an error's answer.
    let id = || {
        slice(f.id)
            .and_then(|raw| serde_json::from_slice::<Value>(raw).ok())
            .and_then(|v| Id::from_value(&v))
    };
    let fail = |code, msg: &str| Err(RpcError::new(code, msg).with_id(id()));
    if f.duplicate {
        return fail(
            INVALID_REQUEST,
            "the request repeats a key (method, id, params or name)",
        );
    }
    let is_call = f
        .method
        .is_some_and(|m| Scanner { b: body, i: 0 }.str_eq(m, "tools/call"));
    if !is_call || f.id.is_none() {
        return fail(
            INVALID_REQUEST,
            "only a tools/call request can have its tool renamed",
        );
    }
    if !f.params_is_object {
        return fail(
            INVALID_PARAMS,
            "tools/call needs \"params\" to be an object",
        );
    }
    let Some((start, end)) = f.name else {
        return fail(INVALID_PARAMS, "tools/call needs \"params.name\"");
    };
    if body.get(start) != Some(&b'"') {
        return fail(INVALID_PARAMS, "\"params.name\" must be a string");
    }
    // The name and the id (when given) written as JSON straight into the output, in the
    // order they stand in the body.
    let name = (start, end);
    let write_name = |out: &mut Vec<u8>| write_json(out, new_name);
    let mut out = Vec::with_capacity(body.len() + new_name.len() + 32);
    let mut at = 0;
    match new_id.zip(f.id) {
        Some((v, id)) if id.0 < start => {
            splice(&mut out, body, &mut at, id, |out| write_json(out, v));
            splice(&mut out, body, &mut at, name, write_name);
        }
        Some((v, id)) => {
            splice(&mut out, body, &mut at, name, write_name);
            splice(&mut out, body, &mut at, id, |out| write_json(out, v));
        }
        None => splice(&mut out, body, &mut at, name, write_name),
    }
    out.extend_from_slice(body.get(at..).unwrap_or_default());
    Ok(Bytes::from(out))
}

/// Copies `body` from `at` up to `span`, writes the replacement in its place, and moves `at`
/// past it.
fn splice(
    out: &mut Vec<u8>,
    body: &[u8],
    at: &mut usize,
    (a, b): Span,
    write: impl FnOnce(&mut Vec<u8>),
) {
    out.extend_from_slice(body.get(*at..a).unwrap_or_default());
    write(out);
    *at = b;
}

/// `value` as JSON text at the end of `out` (writing to a vector cannot fail).
fn write_json(out: &mut Vec<u8>, value: &(impl serde::Serialize + ?Sized)) {
    let _ = serde_json::to_writer(out, value);
}

/// In a JSON-RPC response (one object, no `method`), replaces the top-level `id` with `to`
/// (raw JSON text) when its raw text is exactly `from`; every other byte is left as it is.
/// `None` when the body is not such a response, its id is another, or a key repeats: the
/// caller then leaves the body alone (or takes the slow path).
///
/// The mesh gives each call an id of its own at the provider (`"cm-<hex>"`, no escapes), and
/// providers echo ids back as they received them, so raw equality is what "the same id" means.
pub fn replace_response_id(body: &[u8], from: &[u8], to: &[u8]) -> Option<Bytes> {
    let mut s = Scanner { b: body, i: 0 };
    let mut id: Option<Span> = None;
    let mut method = false;
    let mut repeated = false;
    s.object(|s, key| {
        let v = s.value(1)?;
        if s.str_eq(key, "id") {
            repeated |= id.replace(v).is_some();
        } else if s.str_eq(key, "method") {
            method = true;
        }
        Ok(())
    })
    .ok()?;
    s.ws();
    if s.i != body.len() || method || repeated {
        return None;
    }
    let (a, b) = id?;
    if body.get(a..b)? != from {
        return None;
    }
    // Exactly the length written, so that `Bytes` takes the vector without a second allocation.
    let mut out = Vec::with_capacity(body.len() - (b - a) + to.len());
    out.extend_from_slice(body.get(..a)?);
    out.extend_from_slice(to);
    out.extend_from_slice(body.get(b..)?);
    Some(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rename(body: &str, name: &str) -> Result<String, RpcError> {
        rename_tool_call(body.as_bytes(), name).map(|b| String::from_utf8(b.to_vec()).unwrap())
    }

    #[test]
    fn renames_and_keeps_every_other_byte() {
        let body = r#"{ "jsonrpc":"2.0", "id": 12345678901234567890123,
            "method":"tools/call","params":{"arguments":{"big":123456789012345678901234567890,"f":1.10,"name":"inner"},"name":"add","_meta":{}} }"#;
        let out = rename(body, "math_add").unwrap();
        assert_eq!(out, body.replace(r#""name":"add""#, r#""name":"math_add""#));
    }

    #[test]
    fn replaces_the_id_in_the_same_pass_wherever_it_stands() {
        let id = json!("cm-0a1b");
        for body in [
            r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"add","arguments":{"id":1}}}"#,
            r#"{"jsonrpc":"2.0","method":"tools/call","params":{"name":"add"},"id":"client-7"}"#,
        ] {
            let out = rename_tool_call_with_id(body.as_bytes(), "math_add", &id).unwrap();
            let v: Value = serde_json::from_slice(&out).unwrap();
            let mut want: Value = serde_json::from_str(body).unwrap();
            want["id"] = id.clone();
            want["params"]["name"] = json!("math_add");
            assert_eq!(v, want, "{}", String::from_utf8_lossy(&out));
        }
    }

    #[test]
    fn escapes_new_name_and_matches_escaped_keys() {
        let body =
            r#"{"jsonrpc":"2.0","id":"x","method":"tools\/call","params":{"n\u0061me":"a\"b"}}"#;
        let out = rename(body, "we\"ird\nname").unwrap();
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["params"]["name"], json!("we\"ird\nname"));
        assert_eq!(v["id"], json!("x"));
    }

    #[test]
    fn refuses_what_is_not_a_tools_call() {
        let e = rename("{nope", "x").unwrap_err();
        assert_eq!(e.code, PARSE_ERROR);
        let e = rename(
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{}} trailing"#,
            "x",
        )
        .unwrap_err();
        assert_eq!(e.code, PARSE_ERROR);
        let e = rename(
            r#"{"jsonrpc":"2.0","id":4,"method":"tools/list","params":{"name":"a"}}"#,
            "x",
        )
        .unwrap_err();
        assert_eq!((e.code, e.id), (INVALID_REQUEST, Some(Id::from(4))));
        let e = rename(
            r#"{"jsonrpc":"2.0","method":"tools/call","params":{"name":"a"}}"#,
            "x",
        )
        .unwrap_err();
        assert_eq!(e.code, INVALID_REQUEST);
        let e = rename(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call"}"#, "x").unwrap_err();
        assert_eq!(e.code, INVALID_PARAMS);
        let e = rename(
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":[1]}"#,
            "x",
        )
        .unwrap_err();
        assert_eq!(e.code, INVALID_PARAMS);
        let e = rename(
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"arguments":{}}}"#,
            "x",
        )
        .unwrap_err();
        assert_eq!(e.code, INVALID_PARAMS);
        let e = rename(
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":5}}"#,
            "x",
        )
        .unwrap_err();
        assert_eq!(e.code, INVALID_PARAMS);
    }

    #[test]
    fn refuses_duplicate_keys() {
        let e = rename(
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","name":"b"}}"#,
            "x",
        )
        .unwrap_err();
        assert_eq!((e.code, e.id), (INVALID_REQUEST, Some(Id::from(1))));
    }

    #[test]
    fn a_response_gets_the_client_id_back_byte_for_byte() {
        let from = br#""cm-00ff""#;
        let body = br#"{"jsonrpc":"2.0", "id" :"cm-00ff","result":{"content":[{"type":"text","text":"id: 1"}],"id":"cm-00ff"}}"#;
        let out = replace_response_id(body, from, b"1.0").unwrap();
        assert_eq!(
            &out[..],
            &br#"{"jsonrpc":"2.0", "id" :1.0,"result":{"content":[{"type":"text","text":"id: 1"}],"id":"cm-00ff"}}"#[..]
        );
        // Another id, a request, a repeated id, trailing bytes: left alone.
        assert!(replace_response_id(br#"{"id":"cm-1","result":{}}"#, from, b"1").is_none());
        assert!(replace_response_id(br#"{"id":"cm-00ff","method":"x"}"#, from, b"1").is_none());
        assert!(replace_response_id(br#"{"id":"cm-00ff","id":"cm-00ff"}"#, from, b"1").is_none());
        assert!(replace_response_id(br#"{"id":"cm-00ff"} x"#, from, b"1").is_none());
        assert!(replace_response_id(b"[]", from, b"1").is_none());
    }

    #[test]
    fn hostile_input_does_not_panic() {
        let deep = format!("{{\"params\":{{\"a\":{}", "[".repeat(10_000));
        let inputs = [
            "",
            "\"",
            "{\"a\\",
            "{\"params\":{\"name\":\"",
            "{\"params\":",
            &deep,
            "{\"a\":1,}",
            "\u{1}",
            "{\"params\":{\"name\":\"a\"}",
            "{\"method\":\"tools/call\",\"id\":1,\"params\":{\"name\":\"\\\"}}",
        ];
        for i in inputs {
            assert!(rename(i, "x").is_err(), "{i:?}");
        }
    }
}

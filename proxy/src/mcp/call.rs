//! A single `tools/call` request read in one pass without building a JSON tree: what the
//! outbound classifier needs of the mesh's most common message (its id, the tool's name, the
//! 2026-07-28 `_meta` protocol version and `requestState`), and nothing of its arguments.
//!
//! [`read`] answers only for a body that [`super::jsonrpc::parse`] would take as one
//! `tools/call` request, and reads what it answers the same way: keys after unescaping, ids
//! as serde_json numbers or strings, a target of another type as no target. Anything else
//! gives `None`, and the classifier parses the body into a tree as before, with the same
//! errors: another method, a batch, a response, a wrong `jsonrpc`, a null or boolean id,
//! scalar params, and any key this reader looks at appearing twice (a tree keeps the last
//! copy; this reader does not guess).

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Number;

use super::classify::META_PROTOCOL_VERSION;
use super::inspect::Text as Borrowed;
use super::jsonrpc::Id;

/// What the classifier reads of a `tools/call` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    /// The request's id.
    pub id: Id,
    /// `params.name`, when a string.
    pub name: Option<String>,
    /// `params.uri`, when a string.
    pub uri: Option<String>,
    /// `params._meta["io.modelcontextprotocol/protocolVersion"]`, when a string.
    pub meta_version: Option<String>,
    /// `params.requestState`, when a string.
    pub request_state: Option<String>,
}

/// Reads `body` as one `tools/call` request, or `None` when it is anything else (see the
/// module's documentation).
pub fn read(body: &[u8]) -> Option<ToolCall> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let call = de.deserialize_any(Request).ok()?;
    de.end().ok()?;
    Some(call)
}

/// Any JSON value, read through as a tree reads it and dropped. serde's `IgnoredAny` would skip
/// a string without checking its UTF-8 or its `\u` surrogates, and a number without checking
/// its range (`1e400`), all of which the tree refuses; this goes the tree's way
/// (`deserialize_any`), without building anything.
struct Checked;

impl<'de> de::Deserialize<'de> for Checked {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Checked)
    }
}

impl<'de> Visitor<'de> for Checked {
    type Value = Checked;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Checked, A::Error> {
        while seq.next_element::<Checked>()?.is_some() {}
        Ok(Checked)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Checked, A::Error> {
        while map.next_entry::<Checked, Checked>()?.is_some() {}
        Ok(Checked)
    }
}

/// Not a `tools/call` this reader answers for (the classifier then reads the body whole).
fn other<E: de::Error>() -> E {
    E::custom("not a plain tools/call request")
}

/// Fills `slot` once: a key read twice is left to the tree.
fn once<T, E: de::Error>(slot: &mut Option<T>, value: T) -> Result<(), E> {
    if slot.replace(value).is_some() {
        return Err(other());
    }
    Ok(())
}

struct Request;

impl<'de> Visitor<'de> for Request {
    type Value = ToolCall;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a tools/call request")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ToolCall, A::Error> {
        let (mut version, mut method, mut id, mut params) = (None, None, None, None);
        while let Some(key) = map.next_key::<Borrowed<'de>>()? {
            match key.as_ref() {
                "jsonrpc" => once(&mut version, map.next_value::<Borrowed<'de>>()?)?,
                "method" => once(&mut method, map.next_value::<Borrowed<'de>>()?)?,
                "id" => once(&mut id, map.next_value_seed(IdSeed)?)?,
                "params" => once(&mut params, map.next_value_seed(ParamsSeed)?)?,
                _ => {
                    map.next_value::<Checked>()?;
                }
            }
        }
        let is =
            |v: &Option<Borrowed<'_>>, want: &str| v.as_ref().is_some_and(|v| v.as_ref() == want);
        if !is(&version, "2.0") || !is(&method, "tools/call") {
            return Err(other());
        }
        let id = id.ok_or_else(other)?;
        let params = params.unwrap_or_default();
        Ok(ToolCall {
            id,
            name: params.name.flatten(),
            uri: params.uri.flatten(),
            meta_version: params.meta_version.flatten(),
            request_state: params.request_state.flatten(),
        })
    }
}

/// A request id: a string or a number, read as a tree reads it (null and the rest are left to
/// the tree, which refuses them).
struct IdSeed;

impl<'de> DeserializeSeed<'de> for IdSeed {
    type Value = Id;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Id, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for IdSeed {
    type Value = Id;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON-RPC id")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Id, E> {
        Ok(Id::String(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Id, E> {
        Ok(Id::String(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Id, E> {
        Ok(Id::Number(v.into()))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Id, E> {
        Ok(Id::Number(v.into()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Id, E> {
        Number::from_f64(v).map(Id::Number).ok_or_else(other)
    }
}

/// The params members the classifier reads; each `Some` once seen (`Some(None)`: present, not
/// a string).
#[derive(Default)]
struct Params {
    name: Option<Option<String>>,
    uri: Option<Option<String>>,
    meta_version: Option<Option<String>>,
    request_state: Option<Option<String>>,
}

struct ParamsSeed;

impl<'de> DeserializeSeed<'de> for ParamsSeed {
    type Value = Params;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Params, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ParamsSeed {
    type Value = Params;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("params (an object or an array)")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Params, A::Error> {
        let mut p = Params::default();
        while let Some(key) = map.next_key::<Borrowed<'de>>()? {
            match key.as_ref() {
                "name" => once(&mut p.name, map.next_value_seed(Member::Text)?)?,
                "uri" => once(&mut p.uri, map.next_value_seed(Member::Text)?)?,
                "requestState" => {
                    once(&mut p.request_state, map.next_value_seed(Member::Text)?)?;
                }
                "_meta" => once(&mut p.meta_version, map.next_value_seed(Member::Meta)?)?,
                _ => {
                    map.next_value::<Checked>()?;
                }
            }
        }
        Ok(p)
    }
    // Array params hold no named members.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Params, A::Error> {
        while seq.next_element::<Checked>()?.is_some() {}
        Ok(Params::default())
    }
}

/// A params member as the classifier reads it: `Text`, its text (`Some` for a string, `None`
/// for any other type, as `Value::as_str` reads it); `Meta`, the protocol version that `_meta`
/// holds (`Some` when `_meta` is an object holding it as a string).
#[derive(Debug, Clone, Copy)]
enum Member {
    Text,
    Meta,
}

impl<'de> DeserializeSeed<'de> for Member {
    type Value = Option<String>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<String>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Member {
    type Value = Option<String>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Option<String>, E> {
        Ok(matches!(self, Member::Text).then(|| v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Option<String>, E> {
        Ok(matches!(self, Member::Text).then_some(v))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<String>, A::Error> {
        if let Member::Text = self {
            return Checked.visit_map(map).map(|_| None);
        }
        let mut version = None;
        while let Some(key) = map.next_key::<Borrowed<'de>>()? {
            if key.as_ref() == META_PROTOCOL_VERSION {
                once(&mut version, map.next_value_seed(Member::Text)?)?;
            } else {
                map.next_value::<Checked>()?;
            }
        }
        Ok(version.flatten())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Option<String>, A::Error> {
        Checked.visit_seq(seq).map(|_| None)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Option<String>, E> {
        Ok(None)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Option<String>, E> {
        Ok(None)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Option<String>, E> {
        Ok(None)
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Option<String>, E> {
        Ok(None)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Option<String>, E> {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::mcp::jsonrpc::{Message, Parsed, parse};
    use serde_json::Value;

    /// What the tree reads of the same body, for a `tools/call` request.
    fn by_tree(body: &str) -> Option<ToolCall> {
        let Ok(Parsed::Single(Message::Request { id, method, params })) = parse(body.as_bytes())
        else {
            return None;
        };
        if method != "tools/call" {
            return None;
        }
        let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
        let p = params.as_ref();
        Some(ToolCall {
            id,
            name: text(p.and_then(|p| p.get("name"))),
            uri: text(p.and_then(|p| p.get("uri"))),
            meta_version: text(
                p.and_then(|p| p.get("_meta"))
                    .and_then(|m| m.get(META_PROTOCOL_VERSION)),
            ),
            request_state: text(p.and_then(|p| p.get("requestState"))),
        })
    }

    #[test]
    fn reads_a_call_as_the_tree_does() {
        for body in [
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"hi"},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}"#,
            r#"{"params":{"name":"add"},"method":"tools/call","id":"a\u0062c","jsonrpc":"2.0"}"#,
            r#"{"jsonrpc":"2.0","id":1.0,"method":"tools\/call","params":{"n\u0061me":"x"}}"#,
            r#"{"jsonrpc":"2.0","id":18446744073709551615,"method":"tools/call"}"#,
            r#"{"jsonrpc":"2.0","id":-3,"method":"tools/call","params":["a",{"name":"b"}]}"#,
            r#"{"jsonrpc":"2.0","id":1e3,"method":"tools/call","params":{"name":{"a":1},"uri":7}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","_meta":[1],"requestState":"s"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":5}},"result":{}}"#,
        ] {
            let fast = read(body.as_bytes());
            assert!(fast.is_some(), "{body}");
            assert_eq!(fast, by_tree(body), "{body}");
            // The strict inspection (which the classifier skips for these) takes it alike.
            let seen = crate::mcp::inspect::inspect(body.as_bytes()).unwrap();
            assert_eq!(seen.len(), 1);
            assert_eq!(seen[0].method.as_deref(), Some("tools/call"));
            assert_eq!(seen[0].name, fast.unwrap().name);
        }
    }

    #[test]
    fn leaves_everything_else_to_the_tree() {
        for body in [
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
            r#"{"jsonrpc":"2.0","method":"tools/call","params":{"name":"x"}}"#,
            r#"{"jsonrpc":"2.0","id":null,"method":"tools/call"}"#,
            r#"{"jsonrpc":"2.0","id":true,"method":"tools/call"}"#,
            r#"{"jsonrpc":"1.0","id":1,"method":"tools/call"}"#,
            r#"{"id":1,"method":"tools/call"}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":"x"}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":null}"#,
            r#"{"jsonrpc":"2.0","jsonrpc":"2.0","id":1,"method":"tools/call"}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","name":"b"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"_meta":{},"_meta":{}}}"#,
            r#"[{"jsonrpc":"2.0","id":1,"method":"tools/call"}]"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call"} x"#,
            r#"{"jsonrpc":"2.0","id":1,"result":{}}"#,
            "",
            "7",
        ] {
            assert_eq!(read(body.as_bytes()), None, "{body}");
        }
        // What the tree refuses inside members nobody reads, this reader refuses too: a
        // number out of range, a lone surrogate, bytes that are not UTF-8.
        for body in [
            &br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","arguments":{"x":1e400}}}"#[..],
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","arguments":{"x":"\ud800"}}}"#,
            b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"result\":{\"n\":\"h\xe5r\"}}",
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"_meta":{"k":1e999}}}"#,
        ] {
            assert!(parse(body).is_err(), "{}", String::from_utf8_lossy(body));
            assert_eq!(read(body), None, "{}", String::from_utf8_lossy(body));
        }
    }
}

//! What every JSON-RPC message in a body asks for, read in one strict pass without building a
//! tree: the method, the target (`params.name` / `params.uri`) and the shape of the id.
//!
//! Authorization reads bodies with this, so it must never read a message differently from the
//! agent behind it. Hence:
//! * the JSON is strict (serde_json's grammar: no comments, no trailing bytes); keys and the
//!   members read below are checked as UTF-8 text, while members nobody decides on are skipped
//!   unchecked (a string's UTF-8, a number's range such as `1e400`), as the agent's to judge.
//!   The outbound classifier refuses those too, as a JSON tree does;
//! * a key the decision depends on (`method`, `params`, `params.name`, `params.uri`) appearing
//!   twice is refused — JSON readers disagree on which copy wins;
//! * keys are compared after unescaping (`"\u006dethod"` is `method`);
//! * ids are not judged: integers of any size, `1.0`, `1e3` and strings are all accepted, as
//!   MCP SDKs accept them — the method decides what is checked, not the id.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// The shape of a message's `id` member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdShape {
    /// No `id` member: a notification (or a malformed message).
    Absent,
    /// `"id": null`.
    Null,
    /// A string or a number of any form.
    Present,
}

/// One message of a body, as far as routing and authorization care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspected {
    /// `method`, when the message has one (requests and notifications).
    pub method: Option<String>,
    /// `params.name`, when a string.
    pub name: Option<String>,
    /// `params.uri`, when a string.
    pub uri: Option<String>,
    /// Whether `params` is an object (absent params count as not).
    pub params_object: bool,
    /// The id's shape.
    pub id: IdShape,
}

impl Inspected {
    /// A response: no method (an answer to a request the other side sent).
    pub fn is_response(&self) -> bool {
        self.method.is_none()
    }
}

/// Why a body cannot be read as JSON-RPC messages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InspectError {
    /// Not JSON (or JSON with trailing bytes).
    #[error("the body is not valid JSON: {0}")]
    NotJson(String),
    /// Valid JSON, but not one JSON-RPC message or a batch of them.
    #[error("{0}")]
    NotJsonRpc(String),
}

/// Reads every message of `body` (one object, or a non-empty array of objects).
pub fn inspect(body: &[u8]) -> Result<Vec<Inspected>, InspectError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let messages = Body.deserialize(&mut de).map_err(|e| classify_error(&e))?;
    de.end().map_err(|e| InspectError::NotJson(e.to_string()))?;
    Ok(messages)
}

/// Our own refusals travel as custom serde errors with this prefix, to tell them from syntax
/// errors.
const SHAPE: &str = "capmesh:";

fn classify_error(e: &serde_json::Error) -> InspectError {
    let text = e.to_string();
    match text.strip_prefix(SHAPE) {
        Some(rest) => {
            let rest = rest.split(" at line ").next().unwrap_or(rest);
            InspectError::NotJsonRpc(rest.to_owned())
        }
        None if e.is_data() => InspectError::NotJsonRpc(text),
        None => InspectError::NotJson(text),
    }
}

fn shape<E: de::Error>(msg: &str) -> E {
    E::custom(format!("{SHAPE}{msg}"))
}

/// A key or string value, borrowed from the body when it holds it without escapes (serde's own
/// `Cow<str>` always copies).
pub(super) struct Text<'de>(std::borrow::Cow<'de, str>);

impl AsRef<str> for Text<'_> {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl<'de> de::Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(std::borrow::Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text(std::borrow::Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Text<'de>, E> {
                Ok(Text(std::borrow::Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

struct Body;

impl<'de> DeserializeSeed<'de> for Body {
    type Value = Vec<Inspected>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Body {
    type Value = Vec<Inspected>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON-RPC message or a batch of them")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        Ok(vec![MessageVisitor.visit_map(map)?])
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(m) = seq.next_element_seed(MessageSeed)? {
            out.push(m);
        }
        if out.is_empty() {
            return Err(shape("an empty JSON-RPC batch is not a valid request"));
        }
        Ok(out)
    }
}

struct MessageSeed;

impl<'de> DeserializeSeed<'de> for MessageSeed {
    type Value = Inspected;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(MessageVisitor)
    }
}

struct MessageVisitor;

impl<'de> Visitor<'de> for MessageVisitor {
    type Value = Inspected;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON-RPC message (a JSON object)")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut method: Option<Option<String>> = None;
        let mut params: Option<Params> = None;
        let mut id = IdShape::Absent;
        let mut id_seen = false;
        while let Some(key) = map.next_key::<Text<'de>>()? {
            match key.as_ref() {
                "method" => {
                    if method.is_some() {
                        return Err(shape("the message repeats the key \"method\""));
                    }
                    method = Some(map.next_value::<Option<StringOnly>>()?.map(|s| s.0));
                }
                "params" => {
                    if params.is_some() {
                        return Err(shape("the message repeats the key \"params\""));
                    }
                    params = Some(map.next_value_seed(ParamsSeed)?);
                }
                "id" => {
                    if id_seen {
                        return Err(shape("the message repeats the key \"id\""));
                    }
                    id_seen = true;
                    id = map.next_value_seed(IdSeed)?;
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let method = match method {
            None => None,
            Some(Some(m)) => Some(m),
            Some(None) => return Err(shape("\"method\" must be a string")),
        };
        let params = params.unwrap_or_default();
        Ok(Inspected {
            method,
            name: params.name,
            uri: params.uri,
            params_object: params.object,
            id,
        })
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
        Err(shape("a batch must not contain a batch"))
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Err(shape("a JSON-RPC message must be a JSON object"))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Err(shape("a JSON-RPC message must be a JSON object"))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Err(shape("a JSON-RPC message must be a JSON object"))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Err(shape("a JSON-RPC message must be a JSON object"))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Err(shape("a JSON-RPC message must be a JSON object"))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Err(shape("a JSON-RPC message must be a JSON object"))
    }
}

/// A JSON string; anything else is `None` through `Option` (JSON null) or an error.
struct StringOnly(String);

impl<'de> de::Deserialize<'de> for StringOnly {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'v> Visitor<'v> for V {
            type Value = StringOnly;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<StringOnly, E> {
                Ok(StringOnly(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<StringOnly, E> {
                Ok(StringOnly(v))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<StringOnly, E> {
                Err(shape("\"method\" must be a string"))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<StringOnly, E> {
                Err(shape("\"method\" must be a string"))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<StringOnly, E> {
                Err(shape("\"method\" must be a string"))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<StringOnly, E> {
                Err(shape("\"method\" must be a string"))
            }
            fn visit_map<A: MapAccess<'v>>(self, _: A) -> Result<StringOnly, A::Error> {
                Err(shape("\"method\" must be a string"))
            }
            fn visit_seq<A: SeqAccess<'v>>(self, _: A) -> Result<StringOnly, A::Error> {
                Err(shape("\"method\" must be a string"))
            }
        }
        d.deserialize_any(V)
    }
}

struct IdSeed;

impl<'de> DeserializeSeed<'de> for IdSeed {
    type Value = IdShape;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for IdSeed {
    type Value = IdShape;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON-RPC id")
    }
    fn visit_unit<E: de::Error>(self) -> Result<IdShape, E> {
        Ok(IdShape::Null)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<IdShape, E> {
        Ok(IdShape::Present)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<IdShape, E> {
        Ok(IdShape::Present)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<IdShape, E> {
        Ok(IdShape::Present)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<IdShape, E> {
        Ok(IdShape::Present)
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<IdShape, E> {
        Err(shape("a JSON-RPC id must be a string or a number"))
    }
    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<IdShape, A::Error> {
        Err(shape("a JSON-RPC id must be a string or a number"))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<IdShape, A::Error> {
        Err(shape("a JSON-RPC id must be a string or a number"))
    }
}

#[derive(Default)]
struct Params {
    object: bool,
    name: Option<String>,
    uri: Option<String>,
}

struct ParamsSeed;

impl<'de> DeserializeSeed<'de> for ParamsSeed {
    type Value = Params;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ParamsSeed {
    type Value = Params;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("params")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Params, A::Error> {
        let mut p = Params {
            object: true,
            ..Params::default()
        };
        let (mut name_seen, mut uri_seen) = (false, false);
        while let Some(key) = map.next_key::<Text<'de>>()? {
            let slot = match key.as_ref() {
                "name" => {
                    if std::mem::replace(&mut name_seen, true) {
                        return Err(shape("params repeat the key \"name\""));
                    }
                    &mut p.name
                }
                "uri" => {
                    if std::mem::replace(&mut uri_seen, true) {
                        return Err(shape("params repeat the key \"uri\""));
                    }
                    &mut p.uri
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            *slot = map.next_value::<MaybeString>()?.0;
        }
        Ok(p)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Params, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Params::default())
    }
    fn visit_unit<E: de::Error>(self) -> Result<Params, E> {
        Ok(Params::default())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Params, E> {
        Err(shape("\"params\" must be an object or an array"))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Params, E> {
        Err(shape("\"params\" must be an object or an array"))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Params, E> {
        Err(shape("\"params\" must be an object or an array"))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Params, E> {
        Err(shape("\"params\" must be an object or an array"))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Params, E> {
        Err(shape("\"params\" must be an object or an array"))
    }
}

/// A string value, or `None` for anything else (read and skipped).
struct MaybeString(Option<String>);

impl<'de> de::Deserialize<'de> for MaybeString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MaybeString;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any value")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<MaybeString, E> {
                Ok(MaybeString(Some(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<MaybeString, E> {
                Ok(MaybeString(Some(v)))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<MaybeString, E> {
                Ok(MaybeString(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<MaybeString, E> {
                Ok(MaybeString(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<MaybeString, E> {
                Ok(MaybeString(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<MaybeString, E> {
                Ok(MaybeString(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<MaybeString, E> {
                Ok(MaybeString(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<MaybeString, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(MaybeString(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<MaybeString, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(MaybeString(None))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn one(body: &str) -> Inspected {
        let mut v = inspect(body.as_bytes()).unwrap();
        assert_eq!(v.len(), 1);
        v.remove(0)
    }

    #[test]
    fn every_id_form_sdks_accept_is_read() {
        for id in [
            "1",
            "1.0",
            "-3",
            "1e3",
            "123456789012345678901234567890",
            "\"abc\"",
        ] {
            let m = one(&format!(
                r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"secret"}}}}"#
            ));
            assert_eq!(m.id, IdShape::Present, "{id}");
            assert_eq!(m.method.as_deref(), Some("tools/call"));
            assert_eq!(m.name.as_deref(), Some("secret"));
        }
        assert_eq!(one(r#"{"jsonrpc":"2.0","method":"x"}"#).id, IdShape::Absent);
        assert_eq!(
            one(r#"{"jsonrpc":"2.0","id":null,"error":{}}"#).id,
            IdShape::Null
        );
    }

    #[test]
    fn escaped_keys_and_names_are_read_as_the_agent_reads_them() {
        let m = one(
            r#"{"jsonrpc":"2.0","id":1,"\u006dethod":"tools\/call","params":{"n\u0061me":"sec\u0072et"}}"#,
        );
        assert_eq!(m.method.as_deref(), Some("tools/call"));
        assert_eq!(m.name.as_deref(), Some("secret"));
    }

    #[test]
    fn repeated_keys_that_decide_are_refused() {
        for body in [
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","method":"tools/call","params":{"name":"x"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"ok","name":"secret"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a"},"params":{"name":"b"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"id":2,"method":"tools/call","params":{"name":"a"}}"#,
        ] {
            assert!(
                matches!(inspect(body.as_bytes()), Err(InspectError::NotJsonRpc(_))),
                "{body}"
            );
        }
        // Repeats of keys nobody decides on are the agent's business.
        one(r#"{"jsonrpc":"2.0","jsonrpc":"2.0","id":1,"method":"ping"}"#);
    }

    #[test]
    fn batches_list_every_message() {
        let v = inspect(
            br#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a"}},
                 {"jsonrpc":"2.0","method":"notifications/x"},
                 {"jsonrpc":"2.0","id":"q","result":{}}]"#,
        )
        .unwrap();
        assert_eq!(v.len(), 3);
        assert_eq!(v[0].name.as_deref(), Some("a"));
        assert!(v[2].is_response());
    }

    #[test]
    fn what_is_not_json_rpc_is_refused() {
        for (body, json_ok) in [
            ("", false),
            ("{", false),
            ("{} x", false),
            ("\u{feff}{}", false),
            ("/* c */ {}", false),
            ("[]", true),
            ("[[]]", true),
            ("3", true),
            (r#"{"method":5}"#, true),
            (r#"{"method":"tools/call","params":"x"}"#, true),
            (r#"{"id":true,"method":"ping"}"#, true),
        ] {
            match inspect(body.as_bytes()) {
                Err(InspectError::NotJson(_)) => assert!(!json_ok, "{body:?}"),
                Err(InspectError::NotJsonRpc(_)) => assert!(json_ok, "{body:?}"),
                Ok(v) => panic!("{body:?} read as {v:?}"),
            }
        }
    }

    #[test]
    fn targets_of_other_types_are_not_names() {
        let m = one(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":{"a":1}}}"#);
        assert_eq!(m.name, None);
        assert!(m.params_object);
        let m = one(
            r#"{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"file:///x"}}"#,
        );
        assert_eq!(m.uri.as_deref(), Some("file:///x"));
    }
}

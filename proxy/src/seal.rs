//! Sealing: state the mesh hands to a client (session ids, ids of providers' requests,
//! `requestState`) encrypted and authenticated under the mesh-wide key the control plane
//! distributes, so that any proxy of the mesh can route it back without shared state, and no
//! client can read, forge or move it.
//!
//! A sealed value is ChaCha20-Poly1305 over JSON with a fresh 96-bit nonce, bound to a context
//! string (what it is and, where it matters, whom it was given to), in URL-safe Base64.
//!
//! Its uses:
//! * passthrough session ids: [`Pinned`] (which instance holds the session), bound to the
//!   capability;
//! * on the federated endpoint, ids of providers' requests to the client and 2026-07-28
//!   `requestState` values: a [`Route`] back to the instance that asked;
//! * on a provider's inbound side, the agent's own session ids and the ids of its requests,
//!   bound to the caller they were given to ([`Sealer::seal_for`]), so that no caller can use
//!   another's.

use capmesh_api::EndpointId;
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use serde_json::{Value, json};

pub use crate::mcp::header::{base64url_decode, base64url_encode};

/// Prefix of the ids and states the mesh seals inside JSON-RPC messages.
pub const PREFIX: &str = "capmesh-";
/// What sealed ids of providers' requests (federated endpoint) are bound to.
pub const SERVER_REQUEST: &str = "capmesh/server-request";
/// What sealed 2026-07-28 `requestState` values are bound to.
pub const REQUEST_STATE: &str = "capmesh/request-state";
/// What an agent's session id handed to a caller is bound to (with the caller's identity).
pub const AGENT_SESSION: &str = "capmesh/agent-session";
/// What the id of an agent's request to a caller is bound to (with the caller's identity).
pub const AGENT_REQUEST: &str = "capmesh/agent-request";

/// Seals and opens values with the mesh's key.
#[derive(Clone)]
pub struct Sealer {
    key: std::sync::Arc<LessSafeKey>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(<key>)")
    }
}

impl Sealer {
    /// From the mesh settings' hex key (32 bytes); `None` when absent or malformed.
    pub fn from_hex(hex: &str) -> Option<Self> {
        let bytes = crate::ids::hex_from::<32>(hex.as_bytes())?;
        let key = UnboundKey::new(&CHACHA20_POLY1305, &bytes).ok()?;
        Some(Self {
            key: std::sync::Arc::new(LessSafeKey::new(key)),
        })
    }

    /// `value` sealed (encrypted and authenticated, fresh nonce) and bound to `context`, as
    /// URL-safe Base64 without padding.
    pub fn seal_json(&self, context: &str, value: &Value) -> Option<String> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).ok()?;
        let mut data = serde_json::to_vec(value).ok()?;
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context.as_bytes()),
                &mut data,
            )
            .ok()?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        Some(base64url_encode(&out))
    }

    /// The value [`seal_json`](Self::seal_json) sealed for `context`; `None` for anything else.
    pub fn open_json(&self, context: &str, sealed: &str) -> Option<Value> {
        let raw = base64url_decode(sealed.as_bytes())?;
        if raw.len() < NONCE_LEN {
            return None;
        }
        let (nonce, rest) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut rest = rest.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(context.as_bytes()), &mut rest)
            .ok()?;
        serde_json::from_slice(plain).ok()
    }

    /// `text` sealed for `context` and `holder` only: [`open_for`](Self::open_for) with
    /// another holder fails.
    pub fn seal_for(&self, context: &str, holder: &str, text: &str) -> Option<String> {
        self.seal_json(&bound(context, holder), &json!(text))
            .map(|s| format!("{PREFIX}{s}"))
    }

    /// What [`seal_for`](Self::seal_for) sealed for `context` and `holder`.
    pub fn open_for(&self, context: &str, holder: &str, sealed: &str) -> Option<String> {
        let sealed = sealed.strip_prefix(PREFIX)?;
        match self.open_json(&bound(context, holder), sealed)? {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The sealed id of `pinned`, valid for `capability` only.
    pub fn seal_pinned(&self, capability: &str, pinned: &Pinned) -> Option<String> {
        self.seal_json(
            capability,
            &json!([
                pinned.endpoint.as_str(),
                pinned.instance.as_str(),
                pinned.upstream.as_str(),
            ]),
        )
    }

    /// What a sealed session id holds; `None` when it was not sealed by this mesh for
    /// `capability`, or was changed.
    pub fn open_pinned(&self, capability: &str, sealed: &str) -> Option<Pinned> {
        let [endpoint, instance, upstream]: [String; 3] =
            serde_json::from_value(self.open_json(capability, sealed)?).ok()?;
        Some(Pinned {
            endpoint: EndpointId(endpoint),
            instance,
            upstream,
        })
    }

    /// `route` sealed for `context`, prefixed with [`PREFIX`].
    pub fn seal_route(&self, context: &str, route: &Route) -> Option<String> {
        self.seal_json(context, &route.to_json())
            .map(|s| format!("{PREFIX}{s}"))
    }

    /// The route a [`seal_route`](Self::seal_route) value holds.
    pub fn open_route(&self, context: &str, sealed: &str) -> Option<Route> {
        Route::from_json(self.open_json(context, sealed.strip_prefix(PREFIX)?)?)
    }
}

fn bound(context: &str, holder: &str) -> String {
    format!("{context}\n{holder}")
}

/// Where a passthrough session lives: what a sealed session id holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pinned {
    /// The endpoint that answered `initialize`.
    pub endpoint: EndpointId,
    /// Its instance (proxy id).
    pub instance: String,
    /// The session id the provider's proxy gave out.
    pub upstream: String,
}

/// Where a call or a provider's request to the client lives: the provider instance, the
/// capability it was reached for, and the id the provider knows.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// The endpoint.
    pub endpoint: EndpointId,
    /// Its instance (proxy id).
    pub instance: String,
    /// The capability the call was routed by.
    pub capability: String,
    /// The id (or `requestState`) the provider knows.
    pub upstream_id: Value,
}

impl Route {
    fn to_json(&self) -> Value {
        json!([
            self.endpoint.as_str(),
            self.instance,
            self.capability,
            self.upstream_id
        ])
    }

    fn from_json(v: Value) -> Option<Self> {
        let (endpoint, instance, capability, upstream_id): (String, String, String, Value) =
            serde_json::from_value(v).ok()?;
        Some(Self {
            endpoint: EndpointId(endpoint),
            instance,
            capability,
            upstream_id,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    fn pinned() -> Pinned {
        Pinned {
            endpoint: EndpointId("default/alpha/alpha-1/get_weather".into()),
            instance: "alpha-1".into(),
            upstream: "7e270f7bb85847899070920791e16e47".into(),
        }
    }

    #[test]
    fn sealed_ids_open_to_what_was_sealed_and_are_visible_ascii() {
        let s = Sealer::from_hex(KEY).unwrap();
        let a = s.seal_pinned("get_weather", &pinned()).unwrap();
        let b = s.seal_pinned("get_weather", &pinned()).unwrap();
        assert_ne!(a, b, "a fresh nonce each time");
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        );
        assert!(!a.contains(&pinned().upstream));
        assert_eq!(s.open_pinned("get_weather", &a), Some(pinned()));
        // Another proxy with the same mesh key opens it too.
        assert_eq!(
            Sealer::from_hex(KEY)
                .unwrap()
                .open_pinned("get_weather", &b),
            Some(pinned())
        );
    }

    #[test]
    fn tampered_foreign_or_misplaced_ids_do_not_open() {
        let s = Sealer::from_hex(KEY).unwrap();
        let id = s.seal_pinned("get_weather", &pinned()).unwrap();
        for i in 0..id.len() {
            let mut bytes = id.clone().into_bytes();
            bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
            let tampered = String::from_utf8(bytes).unwrap();
            assert_eq!(
                s.open_pinned("get_weather", &tampered),
                None,
                "flipped at {i}"
            );
        }
        assert_eq!(s.open_pinned("other_capability", &id), None);
        let other = Sealer::from_hex(&KEY.replace("1f", "ff")).unwrap();
        assert_eq!(other.open_pinned("get_weather", &id), None);
        for junk in ["", "abc", "7e270f7bb85847899070920791e16e47", "a+b/c=="] {
            assert_eq!(s.open_pinned("get_weather", junk), None, "{junk}");
        }
    }

    #[test]
    fn values_sealed_for_one_holder_do_not_open_for_another() {
        let s = Sealer::from_hex(KEY).unwrap();
        let alice = "spiffe://capmesh.local/ns/default/agent/alice";
        let bob = "spiffe://capmesh.local/ns/default/agent/bob";
        let sealed = s.seal_for(AGENT_SESSION, alice, "session-1").unwrap();
        assert!(sealed.starts_with(PREFIX));
        assert_eq!(
            s.open_for(AGENT_SESSION, alice, &sealed).as_deref(),
            Some("session-1")
        );
        assert_eq!(s.open_for(AGENT_SESSION, bob, &sealed), None);
        assert_eq!(s.open_for(AGENT_REQUEST, alice, &sealed), None);
        assert_eq!(s.open_for(AGENT_SESSION, alice, "session-1"), None);
    }

    #[test]
    fn routes_round_trip() {
        let s = Sealer::from_hex(KEY).unwrap();
        let route = Route {
            endpoint: EndpointId("default/a/a-1/x".into()),
            instance: "a-1".into(),
            capability: "x".into(),
            upstream_id: json!("cm-1"),
        };
        let sealed = s.seal_route(SERVER_REQUEST, &route).unwrap();
        assert_eq!(s.open_route(SERVER_REQUEST, &sealed), Some(route));
        assert_eq!(s.open_route(REQUEST_STATE, &sealed), None);
    }

    #[test]
    fn keys_must_be_32_bytes_of_hex() {
        assert!(Sealer::from_hex("").is_none());
        assert!(Sealer::from_hex(&KEY[2..]).is_none());
        assert!(Sealer::from_hex(&KEY.replace('0', "g")).is_none());
    }

    #[test]
    fn base64url_round_trips_without_padding() {
        for len in 0..40u8 {
            let data: Vec<u8> = (0..len).map(|i| i.wrapping_mul(37) ^ 0xa5).collect();
            let enc = base64url_encode(&data);
            assert!(!enc.contains('=') && !enc.contains('+') && !enc.contains('/'));
            assert_eq!(base64url_decode(enc.as_bytes()), Some(data));
        }
        assert_eq!(base64url_encode(b"\xfb\xff"), "-_8");
        assert_eq!(base64url_decode(b"Zh"), None, "non-zero trailing bits");
    }
}

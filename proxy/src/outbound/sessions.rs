//! Sessions of the federated endpoint's legacy clients (2025-03-26 … 2025-11-25): the proxy
//! answers `initialize` itself and mints the session id; every other request must carry a
//! live one. The calls of a session still streaming are remembered, so that the client's
//! `notifications/cancelled` reaches the provider running the call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::FutureExt;
use http::{HeaderValue, Response};
use serde_json::Value;

use super::federated::Mcp;
use crate::BoxBody;
use crate::error::ProxyError;
use crate::mcp::classify::{self, Generation};
use crate::mcp::jsonrpc::{self, Id, Message, Parsed, RpcError};
use crate::seal::Route;
use crate::stack::{Either, Handled, Middleware, Next, call, refuse};

/// The sessions the proxy minted: id → negotiated protocol version; and the streaming calls.
#[derive(Debug, Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, String>>,
    calls: Arc<Mutex<HashMap<(String, String), Route>>>,
}

/// Removes a streaming call from [`Sessions`] when its response ends or the client leaves.
#[derive(Debug)]
pub struct CallGuard {
    calls: Arc<Mutex<HashMap<(String, String), Route>>>,
    key: (String, String),
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

impl Sessions {
    fn mint(&self, version: &str) -> String {
        let id = crate::random_hex(16);
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), version.to_owned());
        id
    }

    /// The protocol version session `id` negotiated, if it is live.
    pub fn version(&self, id: &str) -> Option<String> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// Ends session `id`; false when it was not live.
    pub fn remove(&self, id: &str) -> bool {
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(session, _), _| session != id);
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
            .is_some()
    }

    /// Records a call of `session` (client id `id`) as streaming from `route`, until the
    /// returned guard drops.
    pub fn track(&self, session: &str, id: &Id, route: Route) -> CallGuard {
        let key = (session.to_owned(), id.to_string());
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone(), route);
        CallGuard {
            calls: Arc::clone(&self.calls),
            key,
        }
    }

    /// Where the streaming call `id` of `session` runs.
    pub fn call_route(&self, session: &str, id: &Id) -> Option<Route> {
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(session.to_owned(), id.to_string()))
            .cloned()
    }
}

/// The protocol version to answer `initialize` with: the client's when capmesh speaks it,
/// else the newest legacy one.
pub fn negotiate(requested: Option<&str>) -> &'static str {
    classify::LEGACY_VERSIONS
        .iter()
        .find(|v| Some(**v) == requested)
        .copied()
        .unwrap_or(classify::LEGACY_VERSIONS[classify::LEGACY_VERSIONS.len() - 1])
}

/// The layer: `initialize` mints a session (its id goes back in `Mcp-Session-Id`); other
/// legacy requests must carry a live one; batches only in sessions negotiated at 2025-03-26,
/// whatever the header says.
#[derive(Debug, Clone)]
pub struct SessionLayer {
    sessions: Arc<crate::Proxy>,
}

impl SessionLayer {
    /// Over `proxy`'s sessions.
    pub fn new(proxy: Arc<crate::Proxy>) -> Self {
        Self { sessions: proxy }
    }
}

impl<S> Middleware<Mcp, S> for SessionLayer
where
    S: Next<Mcp, Response<BoxBody>>,
{
    type Response = Response<BoxBody>;

    fn handle(self, req: Mcp, next: S) -> impl Handled<Response<BoxBody>> {
        let c = &req.classified;
        let mut minted = None;
        if c.generation == Generation::Legacy {
            let sessions = &self.sessions.sessions;
            if c.method.as_deref() == Some("initialize") {
                let requested = match &c.message {
                    Some(Parsed::Single(Message::Request { params, .. })) => params
                        .as_ref()
                        .and_then(|p| p.get("protocolVersion"))
                        .and_then(Value::as_str),
                    _ => None,
                };
                minted = Some(sessions.mint(negotiate(requested)));
            } else {
                let Some(id) = c.session_id.as_deref() else {
                    return Either::Left(refuse(ProxyError::MissingSession));
                };
                let Some(version) = sessions.version(id) else {
                    return Either::Left(refuse(ProxyError::UnknownSession));
                };
                if c.is_batch() && version != classify::BATCH_VERSION {
                    return Either::Left(refuse(ProxyError::Protocol(RpcError::new(
                        jsonrpc::INVALID_REQUEST,
                        format!(
                            "JSON-RPC batches are only allowed in protocol {}; this session negotiated {version}: send one message per POST",
                            classify::BATCH_VERSION
                        ),
                    ))));
                }
            }
        }
        Either::Right(call(next, req).map(move |answer| {
            let mut resp = answer?;
            if let Some(id) = minted
                && let Ok(v) = HeaderValue::from_str(&id)
            {
                resp.headers_mut().insert("mcp-session-id", v);
            }
            Ok(resp)
        }))
    }
}

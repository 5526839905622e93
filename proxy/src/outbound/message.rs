//! Messages for one provider instance on the federated endpoint: the client's answer to a
//! request a provider sent it (its id is a sealed route back to that instance), and a 2025
//! `notifications/cancelled` for a call still streaming. Both go to that instance only.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Response, header};
use serde_json::{Value, json};

use super::federated::{Mcp, accepted};
use super::tool_call::{call_timeout, mesh_headers, sealer};
use crate::error::ProxyError;
use crate::forward::{Attempts, Call, CallSpec, Target, Upstream};
use crate::mcp::jsonrpc::{Id, Message, Parsed};
use crate::pool::PeerBody;
use crate::seal::{self, Route};
use crate::stack::{Handled, Middleware, Next, call};
use crate::{BoxBody, Proxy, boxed};

/// See the module docs.
#[derive(Debug, Clone)]
pub struct ToProvider {
    proxy: Arc<Proxy>,
}

impl ToProvider {
    /// For `proxy`.
    pub fn new(proxy: Arc<Proxy>) -> Self {
        Self { proxy }
    }
}

impl<S> Middleware<Mcp, S> for ToProvider
where
    S: Next<Call, Response<PeerBody>>,
{
    type Response = Response<BoxBody>;

    fn handle(self, req: Mcp, next: S) -> impl Handled<Response<BoxBody>> {
        let proxy = self.proxy;
        async move {
            let (route, message) = match &req.classified.message {
                Some(Parsed::Single(Message::Response {
                    id: Some(Id::String(sealed)),
                    ..
                })) => {
                    let route = sealer(&proxy)
                        .and_then(|s| s.open_route(seal::SERVER_REQUEST, sealed))
                        .ok_or(ProxyError::UnknownServerRequest)?;
                    let mut message: Value = serde_json::from_slice(&req.body)
                        .map_err(|e| ProxyError::Internal(e.to_string()))?;
                    message["id"] = route.upstream_id.clone();
                    (route, message)
                }
                Some(Parsed::Single(Message::Notification { params, .. })) => {
                    let route = req.classified.session_id.as_deref().zip(
                        params
                            .as_ref()
                            .and_then(|p| p.get("requestId"))
                            .and_then(Id::from_value),
                    );
                    // Unknown or finished calls: accepted, as a cancellation may arrive after
                    // the response.
                    let Some(route) = route.and_then(|(s, id)| proxy.sessions.call_route(s, &id))
                    else {
                        return Ok(accepted());
                    };
                    let mut params = params.clone().unwrap_or_else(|| json!({}));
                    params["requestId"] = route.upstream_id.clone();
                    let message = json!({
                        "jsonrpc": "2.0", "method": "notifications/cancelled", "params": params
                    });
                    (route, message)
                }
                _ => return Ok(accepted()),
            };
            let ep = find(&proxy, &route)?;
            let body = serde_json::to_vec(&message)
                .map(Bytes::from)
                .map_err(|e| ProxyError::Internal(e.to_string()))?;
            let spec = Call(Arc::new(CallSpec {
                target: Target::Pinned(ep),
                upstream: Upstream::Message,
                method: Method::POST,
                headers: mesh_headers(&proxy, &req.headers),
                body,
                safe: false,
                timeout: call_timeout(&proxy, &req.headers),
                label: route.capability.clone(),
                attempts: Attempts::default(),
            }));
            let resp = call(next, spec).await?;
            let (parts, body) = resp.into_parts();
            let mut out = Response::new(boxed(body));
            *out.status_mut() = parts.status;
            if let Some(v) = parts.headers.get(header::CONTENT_TYPE) {
                out.headers_mut().insert(header::CONTENT_TYPE, v.clone());
            }
            Ok(out)
        }
    }
}

/// The endpoint a route names, if it is still in the snapshot.
fn find(proxy: &Proxy, route: &Route) -> Result<Arc<capmesh_api::Endpoint>, ProxyError> {
    let routing = proxy.routing.load();
    capmesh_api::Capability::new(route.capability.as_str())
        .ok()
        .and_then(|cap| {
            routing
                .endpoints(&cap)
                .iter()
                .find(|e| e.id == route.endpoint && e.instance == route.instance)
                .cloned()
        })
        .ok_or_else(|| ProxyError::ProviderGone {
            instance: route.instance.clone(),
            capability: route.capability.clone(),
        })
}

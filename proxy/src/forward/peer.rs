//! The bottom of every outbound stack: writes the attempt's request for its endpoint and sends
//! it over the peer pool's mutual TLS.

use std::sync::{Arc, LazyLock};

use bytes::Bytes;
use capmesh_api::Endpoint;
use http::uri::{self, Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri};
use serde_json::Value;

use super::balance::Attempt;
use super::{CallSpec, Upstream};
use crate::Proxy;
use crate::contract::{CALL_PATH, CAPABILITY_HEADER, PASSTHROUGH_PATH};
use crate::error::ProxyError;
use crate::mcp::header::MCP_SESSION_ID;
use crate::mcp::{classify, rewrite};
use crate::pool::PeerBody;
use crate::stack::{Handled, Handler};

/// See the module docs.
#[derive(Debug, Clone)]
pub struct PeerClient {
    proxy: Arc<Proxy>,
}

impl PeerClient {
    /// Sending through `proxy`'s peer pool.
    pub fn new(proxy: Arc<Proxy>) -> Self {
        Self { proxy }
    }
}

impl Handler<Attempt> for PeerClient {
    type Response = Response<PeerBody>;
    fn serve(self, attempt: Attempt) -> impl Handled<Response<PeerBody>> {
        let proxy = self.proxy;
        async move {
            let ep = &attempt.endpoint;
            let request = request_for(&attempt.call, ep)?;
            proxy
                .peers
                .send(&ep.address, &ep.identity, request)
                .await
                .map_err(|source| ProxyError::Peer {
                    endpoint: format!("{}#{}", ep.identity, ep.instance),
                    source,
                })
        }
    }
}

/// The path every call and message to a provider's proxy takes, parsed once.
static CALL: LazyLock<PathAndQuery> = LazyLock::new(|| PathAndQuery::from_static(CALL_PATH));

/// The request `call` becomes when sent to `ep`.
pub fn request_for(call: &CallSpec, ep: &Endpoint) -> Result<Request<Bytes>, ProxyError> {
    let (path, body) = match &call.upstream {
        Upstream::ToolCall {
            upstream_id,
            request_state,
            ..
        } => (
            CALL.clone(),
            tool_call_body(
                &call.body,
                &ep.function,
                upstream_id,
                request_state.as_ref(),
            )?,
        ),
        Upstream::Message => (CALL.clone(), call.body.clone()),
        Upstream::Passthrough { query, .. } => (
            PathAndQuery::try_from(format!("{PASSTHROUGH_PATH}{query}"))
                .map_err(|e| ProxyError::Internal(format!("passthrough query {query}: {e}")))?,
            call.body.clone(),
        ),
        Upstream::Transparent { path } => (
            PathAndQuery::try_from(path.as_str())
                .map_err(|e| ProxyError::Internal(format!("path {path}: {e}")))?,
            call.body.clone(),
        ),
    };
    // From its parts: the address is parsed as an authority, with no URI formatted and parsed
    // whole on every call (about 2,500 instructions; benches/RESULTS.md).
    let mut uri = uri::Parts::default();
    uri.scheme = Some(Scheme::HTTPS);
    uri.authority = Some(
        Authority::try_from(ep.address.as_str())
            .map_err(|e| ProxyError::Internal(format!("endpoint address {}: {e}", ep.address)))?,
    );
    uri.path_and_query = Some(path);
    let uri = Uri::from_parts(uri)
        .map_err(|e| ProxyError::Internal(format!("endpoint address {}: {e}", ep.address)))?;
    let mut req = Request::new(body);
    *req.method_mut() = call.method.clone();
    *req.uri_mut() = uri;
    // Room for what is added below and by the pool (content length), so the map is allocated
    // once, not cloned exactly and then grown.
    let h = req.headers_mut();
    h.reserve(call.headers.len() + 3);
    h.extend(call.headers.iter().map(|(k, v)| (k.clone(), v.clone())));
    match &call.upstream {
        Upstream::ToolCall { modern: true, .. } => {
            classify::set_routing_headers(h, "tools/call", Some(&ep.function));
        }
        Upstream::Passthrough {
            capability,
            session,
            ..
        } => {
            h.remove(MCP_SESSION_ID);
            if let Some(s) = session {
                let v = HeaderValue::from_str(s).map_err(|_| ProxyError::UnknownSession)?;
                h.insert(MCP_SESSION_ID, v);
            }
            let v = HeaderValue::from_str(capability)
                .map_err(|_| ProxyError::UnknownCapability(capability.clone()))?;
            h.insert(CAPABILITY_HEADER, v);
        }
        _ => {}
    }
    Ok(req)
}

/// A federated `tools/call` for a provider: its function name, the mesh's id and, on a
/// retried 2026-07-28 call, the provider's own `requestState`.
fn tool_call_body(
    body: &Bytes,
    function: &str,
    upstream_id: &Value,
    request_state: Option<&Value>,
) -> Result<Bytes, ProxyError> {
    let renamed = rewrite::rename_tool_call_with_id(body, function, upstream_id)?;
    let Some(state) = request_state else {
        return Ok(renamed);
    };
    // Only a retry carrying a restored requestState needs the JSON tree.
    let mut message: Value = serde_json::from_slice(&renamed)
        .map_err(|e| ProxyError::Internal(format!("renamed call is not JSON: {e}")))?;
    if let Some(params) = message.get_mut("params").and_then(Value::as_object_mut) {
        params.insert("requestState".to_owned(), state.clone());
    }
    serde_json::to_vec(&message)
        .map(Bytes::from)
        .map_err(|e| ProxyError::Internal(e.to_string()))
}

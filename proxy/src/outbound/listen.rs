//! The federated endpoint's legacy session requests other than POST: `GET /mcp` opens the
//! session's stream, which carries `notifications/tools/list_changed` whenever the set of
//! callable capabilities changes; `DELETE /mcp` ends the session.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;

use crate::error::ProxyError;
use crate::mcp::classify;
use crate::serve::h1::AgentBody;
use crate::stack::{Handled, Handler};
use crate::{BoxBody, Proxy, boxed};

/// See the module docs.
#[derive(Debug, Clone)]
pub struct Listen {
    proxy: Arc<Proxy>,
}

impl Listen {
    /// Serving `proxy`'s sessions.
    pub fn new(proxy: Arc<Proxy>) -> Self {
        Self { proxy }
    }
}

fn session(headers: &HeaderMap) -> Result<&str, ProxyError> {
    if headers
        .get("mcp-protocol-version")
        .is_some_and(|v| v.as_bytes() == classify::MODERN.as_bytes())
    {
        return Err(ProxyError::MethodNotAllowed(
            "protocol 2026-07-28 has no sessions: use POST",
        ));
    }
    headers
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .ok_or(ProxyError::MissingSession)
}

impl Handler<Request<AgentBody>> for Listen {
    type Response = Response<BoxBody>;
    fn serve(self, req: Request<AgentBody>) -> impl Handled<Response<BoxBody>> {
        let result = match *req.method() {
            Method::DELETE => self.end(req.headers()),
            _ => self.stream(req.headers()),
        };
        std::future::ready(result)
    }
}

impl Listen {
    fn end(&self, headers: &HeaderMap) -> Result<Response<BoxBody>, ProxyError> {
        if !self.proxy.sessions.remove(session(headers)?) {
            return Err(ProxyError::UnknownSession);
        }
        Ok(Response::new(boxed(Full::new(Bytes::new()))))
    }

    fn stream(&self, headers: &HeaderMap) -> Result<Response<BoxBody>, ProxyError> {
        if self.proxy.sessions.version(session(headers)?).is_none() {
            return Err(ProxyError::UnknownSession);
        }
        let (tx, body) = capmesh_client::channel(8);
        let mut changes = self.proxy.tools_changed.subscribe();
        changes.borrow_and_update();
        tokio::spawn(async move {
            let note = Bytes::from_static(
                b"event: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/tools/list_changed\"}\n\n",
            );
            loop {
                let chunk = tokio::select! {
                    changed = changes.changed() => match changed {
                        Ok(()) => note.clone(),
                        Err(_) => return,
                    },
                    // A comment now and then finds clients that went away.
                    _ = tokio::time::sleep(Duration::from_secs(15)) => Bytes::from_static(b": keep-alive\n\n"),
                };
                if tx.send(chunk).await.is_err() {
                    return;
                }
            }
        });
        let mut resp = Response::new(boxed(body));
        *resp.status_mut() = StatusCode::OK;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-cache, no-transform"),
        );
        h.insert("x-accel-buffering", HeaderValue::from_static("no"));
        Ok(resp)
    }
}

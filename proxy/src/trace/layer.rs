//! The span layers: [`ClientSpan`] above the forward stack (a federated `tools/call`, a
//! passthrough or transparent request), [`RecordAttempts`] at the forward stack's top, and
//! [`ServerSpan`] in the inbound stack. A hop that is not sampled costs one header read and a
//! sampling decision; nothing else runs.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use capmesh_api::SpanKind;
use futures_util::FutureExt;
use http::{HeaderMap, Request, Response, header};
use http_body::{Body, Frame};
use serde_json::Value;

use super::{HOP, Span};
use crate::contract::{CAPABILITY_HEADER, SERVED_BY_HEADER};
use crate::error::ProxyError;
use crate::forward::Call;
use crate::outbound::federated::Mcp;
use crate::pool::PeerBody;
use crate::stack::{Either, Handled, Middleware, Next, call};
use crate::{BoxBody, Proxy, boxed};

/// The largest response frame searched for a JSON-RPC error.
const SCAN_LIMIT: usize = 64 * 1024;

/// What a hop's request says about itself: read only when the hop is recorded.
#[derive(Debug, Default)]
pub struct Described {
    method: Option<String>,
    name: Option<String>,
    id: Option<String>,
    session: Option<String>,
    protocol: Option<String>,
}

/// A request a span layer can trace: its headers (to continue the trace) and what it asks.
pub trait Hop: Send + 'static {
    /// The headers the `traceparent` is read from and written to.
    fn headers_mut(&mut self) -> &mut HeaderMap;
    /// The MCP method, tool, id, session and protocol version of the request.
    fn describe(&self) -> Described;
}

impl Hop for Mcp {
    fn headers_mut(&mut self) -> &mut HeaderMap {
        &mut self.headers
    }

    fn describe(&self) -> Described {
        let c = &self.classified;
        Described {
            method: c.method.as_deref().map(str::to_owned),
            name: c.name.clone(),
            id: c.id.as_ref().map(ToString::to_string),
            session: c.session_id.clone(),
            protocol: c.protocol_version.map(str::to_owned),
        }
    }
}

impl Hop for Request<Bytes> {
    fn headers_mut(&mut self) -> &mut HeaderMap {
        Request::headers_mut(self)
    }

    fn describe(&self) -> Described {
        let header = |name: &str| {
            self.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let mut d = Described {
            session: header("mcp-session-id"),
            protocol: header("mcp-protocol-version"),
            ..Described::default()
        };
        match serde_json::from_slice::<Value>(self.body()) {
            Ok(Value::Object(m)) => {
                d.method = m.get("method").and_then(Value::as_str).map(str::to_owned);
                d.name = m
                    .get("params")
                    .and_then(|p| p.get("name").or_else(|| p.get("uri")))
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                d.id = m.get("id").filter(|id| !id.is_null()).map(|id| match id {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                });
            }
            Ok(Value::Array(_)) => d.method = Some("batch".to_owned()),
            // A GET (a stream), a DELETE, or a body that is not JSON: the HTTP method says it.
            _ => d.method = Some(self.method().as_str().to_owned()),
        }
        d
    }
}

/// Names the span and sets the request's MCP and GenAI attributes.
fn describe(span: &Span, d: Described) {
    let method = d.method.unwrap_or_else(|| "mcp".to_owned());
    let tool = method == "tools/call";
    match (&d.name, tool || method == "prompts/get") {
        (Some(name), true) => span.name(format!("{method} {name}")),
        _ => span.name(method.clone()),
    }
    if tool {
        span.set("gen_ai.operation.name", "execute_tool");
        if let Some(name) = &d.name {
            span.set("gen_ai.tool.name", name.as_str());
        }
    } else if method == "prompts/get" {
        if let Some(name) = &d.name {
            span.set("gen_ai.prompt.name", name.as_str());
        }
    } else if method.starts_with("resources/")
        && let Some(uri) = &d.name
    {
        span.set("mcp.resource.uri", uri.as_str());
    }
    span.set("mcp.method.name", method);
    if let Some(id) = d.id {
        span.set("jsonrpc.request.id", id);
    }
    if let Some(session) = d.session {
        span.set("mcp.session.id", session);
    }
    if let Some(protocol) = d.protocol {
        span.set("mcp.protocol.version", protocol);
    }
    span.set("network.transport", "tcp");
    span.set("network.protocol.name", "http");
}

/// Records how the hop ended: the status, the mesh's error, and (from the body, as it streams
/// by) a JSON-RPC error or a tool's `isError`. The span ends with the body's last byte.
fn finish(
    span: Span,
    result: Result<Response<BoxBody>, ProxyError>,
) -> Result<Response<BoxBody>, ProxyError> {
    match result {
        Ok(resp) => {
            let status = resp.status();
            span.set("http.response.status_code", i64::from(status.as_u16()));
            if status.is_client_error() || status.is_server_error() {
                span.set("error.type", status.as_str());
                span.fail(format!("HTTP {status}"));
            }
            if let Some(served) = resp
                .headers()
                .get(SERVED_BY_HEADER)
                .and_then(|v| v.to_str().ok())
            {
                span.set("capmesh.served_by", served);
            }
            let sse = resp
                .headers()
                .get(header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
            Ok(resp.map(|body| boxed(Traced::new(body, span, sse))))
        }
        Err(e) => {
            span.set("http.response.status_code", i64::from(e.status().as_u16()));
            span.set("rpc.response.status_code", e.rpc_code().to_string());
            span.set("error.type", e.label());
            span.fail(e.to_string());
            span.end();
            Err(e)
        }
    }
}

/// The consumer's span of one hop, over the forward stack: from the agent's request to the
/// response's last byte, with the endpoint that served and the attempts it took.
#[derive(Debug, Clone)]
pub struct ClientSpan {
    proxy: Arc<Proxy>,
}

impl ClientSpan {
    /// Recording with `proxy`'s tracer.
    pub fn new(proxy: Arc<Proxy>) -> Self {
        Self { proxy }
    }
}

impl<R, S> Middleware<R, S> for ClientSpan
where
    R: Hop,
    S: Next<R, Response<BoxBody>>,
{
    type Response = Response<BoxBody>;

    fn handle(self, mut req: R, next: S) -> impl Handled<Response<BoxBody>> {
        let Some(span) = self.proxy.tracer.begin(req.headers_mut(), SpanKind::Client) else {
            return Either::Left(call(next, req));
        };
        describe(&span, req.describe());
        span.set("capmesh.caller", self.proxy.identity.id.to_string());
        // The layers below read the span when they are called, not when polled.
        let hop = HOP.sync_scope(span.clone(), || call(next, req));
        Either::Right(hop.map(move |result| finish(span, result)))
    }
}

/// At the top of the forward stack: adds to the hop's client span what only the forward stack
/// knows — the capability, the endpoint that served, how many endpoints were tried.
#[derive(Debug, Clone, Copy, Default)]
pub struct RecordAttempts;

impl<S> Middleware<Call, S> for RecordAttempts
where
    S: Next<Call, Response<PeerBody>>,
{
    type Response = Response<PeerBody>;

    fn handle(self, req: Call, next: S) -> impl Handled<Response<PeerBody>> {
        let Ok(span) = HOP.try_with(Span::clone) else {
            return Either::Left(call(next, req));
        };
        span.set("capmesh.capability", req.label.as_str());
        let spec = req.clone();
        Either::Right(call(next, req).map(move |result| {
            let tried = spec.attempts.tried();
            span.set("capmesh.attempts", tried.len() as i64);
            span.set("capmesh.retries", tried.len().saturating_sub(1) as i64);
            match &result {
                Ok(resp) => {
                    if let Some(ep) = resp.body().served() {
                        span.set("capmesh.provider", ep.identity.as_str());
                        span.set("capmesh.instance", ep.instance.as_str());
                        span.set("capmesh.provider.function", ep.function.as_str());
                        span.set("capmesh.failover", tried.first() != Some(&ep.id));
                        if let Some((host, port)) = ep.address.rsplit_once(':') {
                            span.set("server.address", host);
                            if let Ok(port) = port.parse::<i64>() {
                                span.set("server.port", port);
                            }
                        }
                    }
                    span.set("network.protocol.version", "2");
                }
                Err(_) => {
                    if let Some(last) = spec.attempts.last_error() {
                        span.set("capmesh.last_attempt_error", last);
                    }
                }
            }
            result
        }))
    }
}

/// The provider's span of one hop: from the peer's request (after it is read, before it is
/// authorized, so that a refusal is recorded too) to the response's last byte.
#[derive(Debug, Clone)]
pub struct ServerSpan {
    proxy: Arc<Proxy>,
}

impl ServerSpan {
    /// Recording with `proxy`'s tracer.
    pub fn new(proxy: Arc<Proxy>) -> Self {
        Self { proxy }
    }
}

impl<S> Middleware<Request<Bytes>, S> for ServerSpan
where
    S: Next<Request<Bytes>, Response<BoxBody>>,
{
    type Response = Response<BoxBody>;

    fn handle(self, mut req: Request<Bytes>, next: S) -> impl Handled<Response<BoxBody>> {
        let proxy = &self.proxy;
        let Some(span) = proxy.tracer.begin(req.headers_mut(), SpanKind::Server) else {
            return Either::Left(call(next, req));
        };
        let described = req.describe();
        let capability = match req
            .headers()
            .get(CAPABILITY_HEADER)
            .and_then(|v| v.to_str().ok())
        {
            Some(cap) => Some(cap.to_owned()),
            None => described.name.as_ref().and_then(|function| {
                proxy.registration.borrow().as_ref().and_then(|reg| {
                    reg.tools
                        .iter()
                        .find(|t| &t.function == function)
                        .map(|t| t.capability.to_string())
                })
            }),
        };
        describe(&span, described);
        if let Some(cap) = capability {
            span.set("capmesh.capability", cap);
        }
        let caller = req
            .extensions()
            .get::<crate::inbound::Caller>()
            .map_or_else(
                || capmesh_api::UNAUTHENTICATED.to_owned(),
                ToString::to_string,
            );
        span.set("capmesh.caller", caller);
        span.set("capmesh.provider", proxy.identity.id.to_string());
        span.set("capmesh.instance", proxy.node.proxy_id.as_str());
        let version = match req.version() {
            http::Version::HTTP_2 => "2",
            http::Version::HTTP_10 => "1.0",
            _ => "1.1",
        };
        span.set("network.protocol.version", version);
        Either::Right(call(next, req).map(move |result| finish(span, result)))
    }
}

/// A response body that ends its span with its last frame (or when dropped early) and
/// notes a JSON-RPC error or a tool's `isError` in what passes by.
struct Traced<B> {
    inner: B,
    span: Option<Span>,
    sse: bool,
}

impl<B> Traced<B> {
    fn new(inner: B, span: Span, sse: bool) -> Self {
        Self {
            inner,
            span: Some(span),
            sse,
        }
    }
}

impl<B> Body for Traced<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(span)) = (frame.data_ref(), &self.span) {
                    scan(span, data, self.sse);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(span) = self.span.take() {
                    span.fail("the response body broke off");
                    span.end();
                }
            }
            Poll::Ready(None) => {
                if let Some(span) = self.span.take() {
                    span.end();
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Looks for a JSON-RPC response carrying an error (or a tool result with `isError`) in one
/// frame of a response: a JSON body, or the `data:` lines of SSE events.
fn scan(span: &Span, data: &Bytes, sse: bool) {
    if data.len() > SCAN_LIMIT || !(contains(data, b"\"error\"") || contains(data, b"isError")) {
        return;
    }
    let check = |text: &[u8]| {
        if let Ok(v) = serde_json::from_slice::<Value>(text) {
            note_error(span, &v);
        }
    };
    if sse {
        for line in data.split(|b| *b == b'\n') {
            if let Some(rest) = line.strip_prefix(b"data:") {
                check(rest);
            }
        }
    } else {
        check(data);
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn note_error(span: &Span, v: &Value) {
    // Only responses: a provider's own requests on the stream carry no verdict.
    if v.get("id").is_none() || v.get("method").is_some() {
        return;
    }
    if let Some(err) = v.get("error") {
        let code = err.get("code").and_then(Value::as_i64);
        if let Some(code) = code {
            span.set("rpc.response.status_code", code.to_string());
            span.set("error.type", code.to_string());
        }
        let message = err
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("JSON-RPC error");
        span.fail(message);
    } else if v.pointer("/result/isError") == Some(&Value::Bool(true)) {
        span.set("error.type", "tool_error");
        span.fail("the tool reported an error (isError)");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use http_body_util::{BodyExt, Full};

    use super::*;
    use crate::trace::Tracer;

    fn tracer() -> Tracer {
        Tracer::new(1.0, None, crate::metrics::Metrics::new().spans())
    }

    #[tokio::test]
    async fn the_span_ends_with_the_body_and_reads_errors_from_sse_and_json() {
        let t = tracer();
        let span = t.begin(&mut HeaderMap::new(), SpanKind::Server).unwrap();
        let sse = "event: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":3,\"error\":{\"code\":-32602,\"message\":\"bad city\"}}\n\n";
        let body = Traced::new(boxed(Full::new(Bytes::from(sse))), span, true);
        assert!(t.spans_frame().is_none(), "open until the body ends");
        let _ = body.collect().await.unwrap();
        let Some((capmesh_api::ProxyFrame::Spans { spans, .. }, _)) = t.spans_frame() else {
            panic!("not shipped");
        };
        assert_eq!(spans[0].error.as_deref(), Some("bad city"));
        assert_eq!(spans[0].text("rpc.response.status_code").unwrap(), "-32602");

        let span = t.begin(&mut HeaderMap::new(), SpanKind::Client).unwrap();
        let json = r#"{"jsonrpc":"2.0","id":1,"result":{"content":[],"isError":true}}"#;
        let _ = Traced::new(boxed(Full::new(Bytes::from(json))), span, false)
            .collect()
            .await
            .unwrap();
        let Some((capmesh_api::ProxyFrame::Spans { spans, .. }, _)) = t.spans_frame() else {
            panic!("not shipped");
        };
        assert_eq!(spans[0].text("error.type").unwrap(), "tool_error");
    }

    #[test]
    fn requests_describe_their_method_tool_and_id() {
        let req = Request::new(Bytes::from_static(
            br#"{"jsonrpc":"2.0","id":"a-1","method":"tools/call","params":{"name":"get_weather"}}"#,
        ));
        let d = req.describe();
        assert_eq!(d.method.as_deref(), Some("tools/call"));
        assert_eq!(d.name.as_deref(), Some("get_weather"));
        assert_eq!(d.id.as_deref(), Some("a-1"));
        let t = tracer();
        let span = t.begin(&mut HeaderMap::new(), SpanKind::Client).unwrap();
        describe(&span, d);
        drop(span);
        let Some((capmesh_api::ProxyFrame::Spans { spans, .. }, _)) = t.spans_frame() else {
            panic!("not shipped");
        };
        assert_eq!(spans[0].name, "tools/call get_weather");
        assert_eq!(spans[0].text("gen_ai.tool.name").unwrap(), "get_weather");
        assert_eq!(
            spans[0].text("gen_ai.operation.name").unwrap(),
            "execute_tool"
        );
    }
}

//! The federated endpoint (`POST /mcp`): the mesh as one MCP server whose tools are the
//! capabilities the agent depends on. This module holds the layers that read and answer the
//! protocol: [`Classify`] (the transport rules of both generations), [`Batch`] (2025-03-26
//! batches), [`LocalAnswers`] (what the mesh answers itself) and [`Dispatch`] (where each
//! remaining message goes). Calls are routed by `tool_call`, messages for a provider by
//! `message`.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

use super::sessions::negotiate;
use crate::error::ProxyError;
use crate::mcp::classify::{self, Classified, Generation};
use crate::mcp::jsonrpc::{self, Id, Message, Parsed};
use crate::seal;
use crate::stack::{BoxFuture, Either, Handled, Handler, Middleware, Next, call, refuse};
use crate::{BoxBody, Proxy, boxed};

/// A POST to the federated endpoint that passed the transport rules.
#[derive(Debug, Clone)]
pub struct Mcp {
    /// The client's headers.
    pub headers: HeaderMap,
    /// The body as received.
    pub body: Bytes,
    /// What it is.
    pub classified: Classified,
}

/// Applies the transport rules of both generations ([`classify::classify`]); from here on
/// an error names the request's id.
#[derive(Debug, Clone, Copy, Default)]
pub struct Classify;

impl<S> Middleware<Request<Bytes>, S> for Classify
where
    S: Next<Mcp, Response<BoxBody>>,
{
    type Response = Response<BoxBody>;

    fn handle(self, req: Request<Bytes>, next: S) -> impl Handled<Response<BoxBody>> {
        let (parts, body) = req.into_parts();
        let classified = match classify::classify(&parts.headers, &body) {
            Ok(c) => c,
            Err(r) => return Either::Left(refuse(ProxyError::Protocol(*r.error))),
        };
        let id = classified.id.clone();
        let mcp = Mcp {
            headers: parts.headers,
            body,
            classified,
        };
        Either::Right(
            call(next, mcp).map(move |answer| answer.map_err(|e| e.for_request(id.as_ref()))),
        )
    }
}

fn json_response(status: StatusCode, body: Bytes) -> Response<BoxBody> {
    let mut resp = Response::new(boxed(Full::new(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// `202 Accepted` with no body: what a notification or a response gets.
pub fn accepted() -> Response<BoxBody> {
    let mut r = Response::new(boxed(Full::new(Bytes::new())));
    *r.status_mut() = StatusCode::ACCEPTED;
    r
}

/// A 2025-03-26 batch: each request goes through the layers below on its own, and the
/// answers come back as one array.
#[derive(Debug, Clone, Copy, Default)]
pub struct Batch;

impl<S> Middleware<Mcp, S> for Batch
where
    S: Next<Mcp, Response<BoxBody>>,
{
    type Response = Response<BoxBody>;

    fn handle(self, req: Mcp, next: S) -> impl Handled<Response<BoxBody>> {
        match &req.classified.message {
            // Rare, and its future is large: boxed, so that a single message's is not.
            Some(Parsed::Batch(items)) => {
                let items = items.clone();
                Either::Left(Box::pin(batch(req.headers, items, next)) as BoxFuture<_>)
            }
            _ => Either::Right(call(next, req)),
        }
    }
}

/// Each of a batch's `items` through `next`, and their answers as one array.
async fn batch<S>(
    headers: HeaderMap,
    items: Vec<Message>,
    next: S,
) -> Result<Response<BoxBody>, ProxyError>
where
    S: Next<Mcp, Response<BoxBody>>,
{
    let mut out = Vec::new();
    for item in items {
        let Message::Request { id, .. } = &item else {
            continue;
        };
        let id = id.clone();
        let body = item.to_bytes();
        let answer = match classify::classify(&headers, &body) {
            Ok(classified) => {
                let single = Mcp {
                    headers: headers.clone(),
                    body,
                    classified,
                };
                let resp = match call(next.clone(), single).await {
                    Ok(r) => r,
                    Err(e) => e.for_request(Some(&id)).into_response(),
                };
                collect_answer(resp, &id).await
            }
            Err(r) => serde_json::from_slice(&r.body).unwrap_or(Value::Null),
        };
        out.push(answer);
    }
    if out.is_empty() {
        return Ok(accepted());
    }
    Ok(json_response(
        StatusCode::OK,
        Bytes::from(serde_json::to_vec(&out).unwrap_or_default()),
    ))
}

/// The JSON-RPC response with `id` in a whole response (JSON or SSE, at most 16 MiB).
async fn collect_answer(resp: Response<BoxBody>, id: &Id) -> Value {
    let ct = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_owned();
    let fail = |msg: String| json!({ "jsonrpc": "2.0", "id": id, "error": { "code": jsonrpc::UPSTREAM_FAILED, "message": msg } });
    let limit = crate::contract::MAX_RESPONSE;
    let mut body = resp.into_body();
    let mut bytes = Vec::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    if bytes.len() + data.len() > limit {
                        return fail(format!("the answer is over {limit} bytes"));
                    }
                    bytes.extend_from_slice(data);
                }
            }
            Err(e) => return fail(format!("reading the answer failed: {e}")),
        }
    }
    crate::mcp::sse::find_response(&bytes, &ct, id)
        .ok()
        .flatten()
        .unwrap_or(Value::Null)
}

/// What the mesh answers itself, as the federated server: `initialize`, `server/discover`,
/// `ping`, the lists. `tools/call` and every message that is not a request go on; other
/// methods are not served.
#[derive(Debug, Clone)]
pub struct LocalAnswers {
    proxy: Arc<Proxy>,
}

impl LocalAnswers {
    /// Answering from `proxy`'s routing table.
    pub fn new(proxy: Arc<Proxy>) -> Self {
        Self { proxy }
    }
}

fn server_info() -> Value {
    json!({ "name": "capmesh", "version": env!("CARGO_PKG_VERSION") })
}

/// Adds what 2026-07-28 results carry: `resultType`, the server's info in `_meta`, and for
/// lists and discovery the caching hints. The federated tool list depends on the caller's
/// policy and on every snapshot, so it is `private` and not to be cached (`ttlMs: 0`).
fn modern_result(mut v: Value, method: &str) -> Value {
    v["resultType"] = json!("complete");
    v["_meta"] = json!({ "io.modelcontextprotocol/serverInfo": server_info() });
    if method.ends_with("/list") || method == "server/discover" {
        v["cacheScope"] = json!("private");
        v["ttlMs"] = json!(0);
    }
    v
}

impl LocalAnswers {
    /// The result of `method`, `Ok(None)` when it goes to a provider.
    fn answer(&self, method: &str, params: Option<&Value>) -> Result<Option<Value>, ()> {
        Ok(Some(match method {
            "initialize" => {
                let requested = params
                    .and_then(|p| p.get("protocolVersion"))
                    .and_then(Value::as_str);
                json!({
                    "protocolVersion": negotiate(requested),
                    "capabilities": { "tools": { "listChanged": true } },
                    "serverInfo": server_info(),
                    "instructions": "capmesh: every tool here is a capability of the mesh, routed to a healthy provider."
                })
            }
            "server/discover" => json!({
                "supportedVersions": [classify::MODERN],
                "capabilities": { "tools": { "listChanged": true } },
                "serverInfo": server_info(),
            }),
            "ping" | "logging/setLevel" => json!({}),
            "tools/list" => {
                let tools: Vec<Value> = self
                    .proxy
                    .routing
                    .load()
                    .tools
                    .iter()
                    .map(|t| t.to_json())
                    .collect();
                json!({ "tools": tools })
            }
            "resources/list" => json!({ "resources": [] }),
            "resources/templates/list" => json!({ "resourceTemplates": [] }),
            "prompts/list" => json!({ "prompts": [] }),
            "tools/call" => return Ok(None),
            _ => return Err(()),
        }))
    }
}

impl<S> Middleware<Mcp, S> for LocalAnswers
where
    S: Next<Mcp, Response<BoxBody>>,
{
    type Response = Response<BoxBody>;

    fn handle(self, req: Mcp, next: S) -> impl Handled<Response<BoxBody>> {
        let generation = req.classified.generation;
        let Some(Parsed::Single(Message::Request { id, method, params })) = &req.classified.message
        else {
            // A single `tools/call` (read without a tree) is never answered here.
            return Either::Left(call(next, req));
        };
        let answer = match self.answer(method, params.as_ref()) {
            Ok(Some(result)) => {
                let result = match generation {
                    Generation::Modern => modern_result(result, method),
                    Generation::Legacy => result,
                };
                Ok(json_response(
                    StatusCode::OK,
                    jsonrpc::result_body(id, &result),
                ))
            }
            Ok(None) => return Either::Left(call(next, req)),
            Err(()) => Err(ProxyError::MethodNotServed {
                method: method.clone(),
                modern: generation == Generation::Modern,
            }),
        };
        Either::Right(std::future::ready(answer))
    }
}

/// Where each message the mesh does not answer goes: a `tools/call` to a provider of its
/// capability; the client's answer to a provider's request (a sealed id) and a 2025
/// `notifications/cancelled` to the provider instance concerned; any other notification or
/// response is accepted and dropped.
#[derive(Debug, Clone)]
pub struct Dispatch<C, M> {
    /// The `tools/call` stack.
    pub tool_call: C,
    /// The stack of messages for one provider instance.
    pub message: M,
}

impl<C, M> Handler<Mcp> for Dispatch<C, M>
where
    C: Next<Mcp, Response<BoxBody>>,
    M: Next<Mcp, Response<BoxBody>>,
{
    type Response = Response<BoxBody>;
    fn serve(self, req: Mcp) -> impl Handled<Response<BoxBody>> {
        let c = &req.classified;
        let to_provider = match &c.message {
            // A single `tools/call`, read without a tree.
            None => return Either::Left(call(self.tool_call, req)),
            Some(Parsed::Single(Message::Request { method, .. })) if method == "tools/call" => {
                return Either::Left(call(self.tool_call, req));
            }
            Some(Parsed::Single(Message::Response {
                id: Some(Id::String(sealed)),
                ..
            })) => sealed.starts_with(seal::PREFIX),
            Some(Parsed::Single(Message::Notification { method, .. })) => {
                method == "notifications/cancelled" && c.generation == Generation::Legacy
            }
            _ => false,
        };
        Either::Right(if to_provider {
            Either::Left(call(self.message, req))
        } else {
            Either::Right(std::future::ready(Ok(accepted())))
        })
    }
}

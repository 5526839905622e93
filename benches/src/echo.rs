//! A minimal, fast MCP server used as the upstream of every scenario, so that what a bench
//! measures is the path in front of it and not an SDK.
//!
//! It speaks Streamable HTTP over HTTP/1.1 and HTTP/2 (cleartext, prior knowledge) with JSON
//! responses and no sessions: `initialize` (the legacy generation, which the sidecar uses to
//! list tools), `server/discover`, `tools/list` with one tool `echo`, and `tools/call`, whose
//! result is the call's `arguments.text`. Notifications get 202. Anything else is a JSON-RPC
//! error, never a panic.

use std::convert::Infallible;
use std::net::SocketAddr;

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// The one tool the echo server offers (and so the capability the mesh scenarios call).
pub const TOOL: &str = "echo";
const MAX_BODY: usize = 1024 * 1024;

/// Binds `addr` and serves until the process ends.
pub async fn serve(addr: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}: is the port free?"))?;
    serve_on(listener).await
}

/// Serves MCP on an already bound listener.
pub async fn serve_on(listener: TcpListener) -> Result<()> {
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(c) => c,
            // Out of file descriptors and the like: keep serving the connections we have.
            Err(_) => {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let svc = service_fn(|req| async move { Ok::<_, Infallible>(handle(req).await) });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let _ = builder.serve_connection(TokioIo::new(tcp), svc).await;
        });
    }
}

fn reply(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

async fn handle(req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::POST {
        return reply(StatusCode::METHOD_NOT_ALLOWED, Bytes::new());
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return reply(StatusCode::BAD_REQUEST, Bytes::new()),
    };
    let (status, answer) = answer(&body);
    reply(status, answer)
}

/// The answer to one POST body: the HTTP status and the JSON body (empty for a notification).
pub fn answer(body: &[u8]) -> (StatusCode, Bytes) {
    let msg: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &Value::Null,
                -32700,
                &e.to_string(),
            );
        }
    };
    let method = msg.get("method").and_then(Value::as_str).unwrap_or("");
    let Some(id) = msg.get("id") else {
        // A notification (`notifications/initialized` and friends): accepted, no body.
        return (StatusCode::ACCEPTED, Bytes::new());
    };
    let params = msg.get("params");
    let result = match method {
        "initialize" => json!({
            "protocolVersion": params
                .and_then(|p| p.get("protocolVersion"))
                .and_then(Value::as_str)
                .unwrap_or("2025-11-25"),
            "capabilities": { "tools": {} },
            "serverInfo": { "name": "capmesh-bench-echo", "version": env!("CARGO_PKG_VERSION") }
        }),
        "server/discover" => json!({
            "supportedVersions": ["2026-07-28"],
            "capabilities": { "tools": {} },
            "serverInfo": { "name": "capmesh-bench-echo", "version": env!("CARGO_PKG_VERSION") }
        }),
        "ping" => json!({}),
        "tools/list" => json!({ "tools": [{
            "name": TOOL,
            "description": "Returns its text argument.",
            "inputSchema": {
                "type": "object",
                "properties": { "text": { "type": "string" } },
                "required": ["text"]
            }
        }]}),
        "tools/call" => {
            let text = params
                .and_then(|p| p.get("arguments"))
                .and_then(|a| a.get("text"))
                .and_then(Value::as_str)
                .unwrap_or("");
            json!({ "content": [{ "type": "text", "text": text }], "isError": false })
        }
        other => {
            return error(
                StatusCode::OK,
                id,
                -32601,
                &format!("method {other:?} is not served by the echo server"),
            );
        }
    };
    let out = json!({ "jsonrpc": "2.0", "id": id, "result": result });
    (StatusCode::OK, Bytes::from(out.to_string()))
}

fn error(status: StatusCode, id: &Value, code: i64, message: &str) -> (StatusCode, Bytes) {
    let out = json!({ "jsonrpc": "2.0", "id": id, "error": { "code": code, "message": message } });
    (status, Bytes::from(out.to_string()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn result(body: &str) -> Value {
        let (status, out) = answer(body.as_bytes());
        assert_eq!(status, StatusCode::OK);
        serde_json::from_slice(&out).unwrap()
    }

    #[test]
    fn tools_call_returns_the_text() {
        let v = result(
            r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"echo","arguments":{"text":"hi"}}}"#,
        );
        assert_eq!(v["id"], 7);
        assert_eq!(v["result"]["content"][0]["text"], "hi");
    }

    #[test]
    fn initialize_and_list_name_the_echo_tool() {
        let v = result(
            r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18"}}"#,
        );
        assert_eq!(v["result"]["protocolVersion"], "2025-06-18");
        let v = result(r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#);
        assert_eq!(v["result"]["tools"][0]["name"], TOOL);
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let (status, out) = answer(b"{not json");
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(String::from_utf8_lossy(&out).contains("-32700"));
        let (status, out) = answer(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
        assert_eq!(status, StatusCode::ACCEPTED);
        assert!(out.is_empty());
        let v = result(r#"{"jsonrpc":"2.0","id":3,"method":"nope"}"#);
        assert_eq!(v["error"]["code"], -32601);
    }
}

//! rmcp's Streamable HTTP client over hyper.
//!
//! rmcp ships a reqwest backend; reqwest would add some forty crates (URL parsing, tower-http,
//! ...) to reach a sidecar on loopback, and it hides response headers. rmcp lets any type that
//! implements [`StreamableHttpClient`] carry its transport, so this one does it with the hyper
//! client the workspace already has, and remembers the `x-capmesh-served-by` header of each
//! `tools/call` answer so that a planner can show which provider instance served it.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rmcp::model::{ClientJsonRpcMessage, ClientRequest, JsonRpcMessage, ServerJsonRpcMessage};
use rmcp::transport::common::client_side_sse::BoxedSseResponse;
use rmcp::transport::common::http_header::{
    EVENT_STREAM_MIME_TYPE, HEADER_SESSION_ID, JSON_MIME_TYPE,
};
use rmcp::transport::streamable_http_client::{
    HttpStatusError, StreamableHttpClient, StreamableHttpError, StreamableHttpPostResponse,
};

/// The response header in which a capmesh sidecar names the provider instance that served.
pub const SERVED_BY_HEADER: &str = "x-capmesh-served-by";
/// Largest JSON response read (the same bound rmcp's own clients use).
const MAX_JSON_RESPONSE: usize = 16 * 1024 * 1024;
/// Largest error body read, for the error message.
const MAX_ERROR_RESPONSE: usize = 64 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why an HTTP exchange with an MCP server failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpClientError {
    /// The endpoint is not an absolute `http://` URL.
    #[error("MCP endpoint {url:?} is not a valid http:// URL: {source}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        #[source]
        source: http::uri::InvalidUri,
    },
    /// The server could not be reached, or the connection broke.
    #[error("could not reach the MCP server at {url}: is it running?")]
    Request {
        /// The endpoint.
        url: String,
        /// The connection error.
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    /// A request could not be built (a header value was invalid).
    #[error("could not build the HTTP request: {0}")]
    Build(#[from] http::Error),
    /// The message could not be written as JSON.
    #[error("could not encode the JSON-RPC message: {0}")]
    Encode(#[from] serde_json::Error),
    /// The response body broke off or was too large.
    #[error("could not read the MCP server's response: {0}")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl From<HttpClientError> for StreamableHttpError<HttpClientError> {
    fn from(error: HttpClientError) -> Self {
        StreamableHttpError::Client(error)
    }
}

type Failure = StreamableHttpError<HttpClientError>;

/// An HTTP/1.1 client for rmcp's `StreamableHttpClientTransport`, built on hyper.
///
/// ```no_run
/// # async fn demo() -> anyhow::Result<()> {
/// use rmcp::ServiceExt as _;
/// use rmcp::model::ClientConfig;
/// use rmcp::transport::StreamableHttpClientTransport;
/// use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
///
/// let http = capmesh_examples::HyperClient::new();
/// let config = StreamableHttpClientTransportConfig::with_uri("http://127.0.0.1:15001/mcp");
/// let transport = StreamableHttpClientTransport::with_client(http.clone(), config);
/// let client = ClientConfig::default().serve(transport).await?;
/// let tools = client.list_all_tools().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct HyperClient {
    http: Client<HttpConnector, Full<Bytes>>,
    served_by: Arc<Mutex<Option<String>>>,
    traceparent: Option<HeaderValue>,
}

/// A W3C trace context a client starts: every request it sends carries it as `traceparent`.
#[derive(Debug, Clone)]
pub struct TraceContext {
    /// 32 lowercase hex digits.
    pub trace_id: String,
    /// The client's own span id: 16 lowercase hex digits.
    pub span_id: String,
}

impl TraceContext {
    /// A new trace, marked sampled (every hop under it is recorded).
    pub fn new_sampled() -> Self {
        // Ids need to be unique, not secret: the standard library's per-process random hash
        // keys, mixed with the clock, are enough.
        use std::hash::{BuildHasher, Hasher};
        let random = |salt: u64| {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(salt);
            h.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0),
            );
            h.finish() | 1
        };
        Self {
            trace_id: format!("{:016x}{:016x}", random(1), random(2)),
            span_id: format!("{:016x}", random(3)),
        }
    }

    /// The `traceparent` header value.
    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-01", self.trace_id, self.span_id)
    }
}

impl Default for HyperClient {
    fn default() -> Self {
        Self::new()
    }
}

impl HyperClient {
    /// A client with a 5 s connect timeout and TCP_NODELAY.
    pub fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        Self {
            http: Client::builder(TokioExecutor::new()).build(connector),
            served_by: Arc::default(),
            traceparent: None,
        }
    }

    /// Every request carries `trace` as its `traceparent`.
    pub fn with_trace(mut self, trace: &TraceContext) -> Self {
        self.traceparent = HeaderValue::from_str(&trace.traceparent()).ok();
        self
    }

    /// Takes the `x-capmesh-served-by` value of the latest `tools/call` response, if it had one.
    /// Meaningful when tool calls are made one at a time, as the planner does.
    pub fn take_served_by(&self) -> Option<String> {
        self.served_by
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    fn remember_served_by(&self, headers: &HeaderMap) {
        let value = headers
            .get(SERVED_BY_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        *self
            .served_by
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = value;
    }

    async fn send(
        &self,
        method: Method,
        url: &str,
        headers: Vec<(HeaderName, HeaderValue)>,
        body: Bytes,
    ) -> Result<Response<Incoming>, HttpClientError> {
        let uri: Uri = url.parse().map_err(|source| HttpClientError::InvalidUrl {
            url: url.to_owned(),
            source,
        })?;
        let mut req = Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            req = req.header(name, value);
        }
        if let Some(tp) = &self.traceparent {
            req = req.header("traceparent", tp.clone());
        }
        let req = req.body(Full::new(body))?;
        self.http
            .request(req)
            .await
            .map_err(|source| HttpClientError::Request {
                url: url.to_owned(),
                source,
            })
    }
}

/// The headers every request carries: credentials, rmcp's protocol headers and the session.
fn common_headers(
    accept: &str,
    session_id: Option<&str>,
    auth: Option<String>,
    custom: HashMap<HeaderName, HeaderValue>,
) -> Result<Vec<(HeaderName, HeaderValue)>, HttpClientError> {
    let mut headers = vec![(
        ACCEPT,
        HeaderValue::from_str(accept).map_err(http::Error::from)?,
    )];
    if let Some(token) = auth {
        let value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(http::Error::from)?;
        headers.push((AUTHORIZATION, value));
    }
    if let Some(id) = session_id {
        let value = HeaderValue::from_str(id).map_err(http::Error::from)?;
        headers.push((HeaderName::from_static("mcp-session-id"), value));
    }
    headers.extend(custom);
    Ok(headers)
}

/// Reads at most `limit` bytes of a body.
async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, HttpClientError> {
    Limited::new(body, limit)
        .collect()
        .await
        .map(|collected| collected.to_bytes())
        .map_err(HttpClientError::Body)
}

fn content_type(resp: &Response<Incoming>) -> Option<String> {
    resp.headers()
        .get(CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

fn session_id(resp: &Response<Incoming>) -> Option<String> {
    resp.headers()
        .get(HEADER_SESSION_ID)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn sse(body: Incoming) -> BoxedSseResponse {
    Box::pin(sse_stream::SseStream::new(body))
}

/// 429 and 5xx keep their status (rmcp treats them as retryable); others become a message.
async fn http_failure(resp: Response<Incoming>) -> Failure {
    let status = resp.status();
    if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        return HttpStatusError::new(status.as_u16(), retry_after).into();
    }
    let body = read_body(resp.into_body(), MAX_ERROR_RESPONSE)
        .await
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    StreamableHttpError::UnexpectedServerResponse(Cow::Owned(format!("HTTP {status}: {body}")))
}

impl StreamableHttpClient for HyperClient {
    type Error = HttpClientError;

    async fn post_message(
        &self,
        uri: Arc<str>,
        message: ClientJsonRpcMessage,
        session_id_sent: Option<Arc<str>>,
        auth: Option<String>,
        custom: HashMap<HeaderName, HeaderValue>,
    ) -> Result<StreamableHttpPostResponse, Failure> {
        let accept = format!("{JSON_MIME_TYPE}, {EVENT_STREAM_MIME_TYPE}");
        let mut headers = common_headers(&accept, session_id_sent.as_deref(), auth, custom)?;
        headers.push((CONTENT_TYPE, HeaderValue::from_static(JSON_MIME_TYPE)));
        let body = Bytes::from(serde_json::to_vec(&message).map_err(HttpClientError::from)?);
        let resp = self.send(Method::POST, &uri, headers, body).await?;
        let is_tool_call = matches!(
            &message,
            JsonRpcMessage::Request(r) if matches!(r.request, ClientRequest::CallToolRequest(_))
        );
        if is_tool_call {
            self.remember_served_by(resp.headers());
        }
        let expects_reply = matches!(message, JsonRpcMessage::Request(_));
        let status = resp.status();
        if status == StatusCode::ACCEPTED || status == StatusCode::NO_CONTENT {
            return Ok(StreamableHttpPostResponse::Accepted);
        }
        if status == StatusCode::NOT_FOUND && session_id_sent.is_some() {
            return Err(StreamableHttpError::SessionExpired);
        }
        let kind = content_type(&resp).unwrap_or_default();
        let session = session_id(&resp);
        if !status.is_success() {
            // A JSON-RPC error in a 4xx body is the server's answer; keep it.
            if kind.starts_with(JSON_MIME_TYPE) && status.is_client_error() {
                let body = read_body(resp.into_body(), MAX_ERROR_RESPONSE).await?;
                return match serde_json::from_slice::<ServerJsonRpcMessage>(&body) {
                    Ok(error @ JsonRpcMessage::Error(_)) => {
                        Ok(StreamableHttpPostResponse::Json(error, session))
                    }
                    _ => Err(StreamableHttpError::UnexpectedServerResponse(Cow::Owned(
                        format!("HTTP {status}: {}", String::from_utf8_lossy(&body)),
                    ))),
                };
            }
            return Err(http_failure(resp).await);
        }
        if kind.starts_with(EVENT_STREAM_MIME_TYPE) {
            return Ok(StreamableHttpPostResponse::Sse(
                sse(resp.into_body()),
                session,
            ));
        }
        if kind.starts_with(JSON_MIME_TYPE) {
            let body = read_body(resp.into_body(), MAX_JSON_RESPONSE).await?;
            return match serde_json::from_slice::<ServerJsonRpcMessage>(&body) {
                Ok(reply) => Ok(StreamableHttpPostResponse::Json(reply, session)),
                // A notification or response needs no reply; an odd body is not an error.
                Err(_) if !expects_reply => Ok(StreamableHttpPostResponse::Accepted),
                Err(error) => Err(StreamableHttpError::Deserialize(error)),
            };
        }
        if !expects_reply {
            // Some servers answer notifications with an empty 200.
            return Ok(StreamableHttpPostResponse::Accepted);
        }
        Err(StreamableHttpError::UnexpectedContentType(
            (!kind.is_empty()).then_some(kind),
        ))
    }

    async fn delete_session(
        &self,
        uri: Arc<str>,
        session: Arc<str>,
        auth: Option<String>,
        custom: HashMap<HeaderName, HeaderValue>,
    ) -> Result<(), Failure> {
        let headers = common_headers(JSON_MIME_TYPE, Some(&session), auth, custom)?;
        let resp = self
            .send(Method::DELETE, &uri, headers, Bytes::new())
            .await?;
        // 405: the server keeps no sessions to delete; 404: it is gone already.
        let status = resp.status();
        if status.is_success()
            || status == StatusCode::METHOD_NOT_ALLOWED
            || status == StatusCode::NOT_FOUND
        {
            return Ok(());
        }
        Err(http_failure(resp).await)
    }

    async fn get_stream(
        &self,
        uri: Arc<str>,
        session: Option<Arc<str>>,
        last_event_id: Option<String>,
        auth: Option<String>,
        custom: HashMap<HeaderName, HeaderValue>,
    ) -> Result<BoxedSseResponse, Failure> {
        let mut headers = common_headers(EVENT_STREAM_MIME_TYPE, session.as_deref(), auth, custom)?;
        if let Some(id) = last_event_id {
            let value = HeaderValue::from_str(&id).map_err(|e| HttpClientError::Build(e.into()))?;
            headers.push((HeaderName::from_static("last-event-id"), value));
        }
        let resp = self.send(Method::GET, &uri, headers, Bytes::new()).await?;
        if resp.status() == StatusCode::METHOD_NOT_ALLOWED {
            return Err(StreamableHttpError::ServerDoesNotSupportSse);
        }
        if !resp.status().is_success() {
            return Err(http_failure(resp).await);
        }
        match content_type(&resp) {
            Some(kind) if kind.starts_with(EVENT_STREAM_MIME_TYPE) => Ok(sse(resp.into_body())),
            other => Err(StreamableHttpError::UnexpectedContentType(other)),
        }
    }
}

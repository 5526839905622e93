//! The local agent, seen from its sidecar: discovering its tools, health-checking it, keeping
//! one MCP session open with it for calls that arrive through the mesh, and forwarding.
//!
//! The agent is any MCP server speaking Streamable HTTP (either protocol generation). Nothing
//! here needs capmesh code in the agent.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use capmesh_api::{Capability, CapabilityOverride, Registration, ToolSpec};
use http::{HeaderValue, Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Limited};
use serde_json::{Value, json};
use tokio::sync::{Mutex, watch};

use crate::agent_http::{self, Client};
use crate::mcp::jsonrpc::Id;
use crate::mcp::sse::find_response;
use crate::readiness::{Condition, Readiness, StartupWait};

/// The newest session-based protocol version the proxy speaks to agents.
pub const LEGACY_VERSION: &str = "2025-11-25";
/// The stateless protocol version.
pub const MODERN_VERSION: &str = "2026-07-28";
const MAX_AGENT_RESPONSE: usize = 16 * 1024 * 1024;

/// The MCP session the proxy holds with its agent (legacy generation); `id` is `None` when
/// the agent mints no session ids, and `version` is the modern one when the agent only speaks
/// the stateless generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSession {
    /// `Mcp-Session-Id` to send, if any.
    pub id: Option<String>,
    /// The negotiated protocol version.
    pub version: String,
}

impl AgentSession {
    /// Whether the agent speaks only the stateless generation.
    pub fn modern(&self) -> bool {
        self.version == MODERN_VERSION
    }
}

/// A tool as the agent lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentTool {
    /// The tool's name on the agent.
    pub name: String,
    /// Its description.
    pub description: Option<String>,
    /// Its input schema.
    pub input_schema: Option<Value>,
}

/// The local agent.
#[derive(Debug)]
pub struct Agent {
    url: Uri,
    authority: HeaderValue,
    /// The agent's connections, kept per worker thread ([`crate::workers`]).
    client: Arc<Client>,
    session: Mutex<Option<AgentSession>>,
}

impl Agent {
    /// An agent at `url` (`http://host:port/path`), called from `workers` worker threads.
    pub fn new(url: &str, workers: usize) -> anyhow::Result<Self> {
        let uri: Uri = url.parse().with_context(|| {
            format!("--agent-url {url:?} is not a URL: use http://127.0.0.1:8080/mcp")
        })?;
        if uri.scheme_str() != Some("http") {
            bail!(
                "--agent-url {url:?}: the agent is reached over plain HTTP on this host; use http://127.0.0.1:PORT/PATH"
            );
        }
        let authority = uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .with_context(|| format!("--agent-url {url:?} has no host:port"))?;
        let port = uri.port_u16().unwrap_or(80);
        let host = uri.host().unwrap_or_default();
        let client = Arc::new(Client::new(format!("{host}:{port}"), workers));
        Ok(Self {
            authority: HeaderValue::from_str(&authority)?,
            url: uri,
            client,
            session: Mutex::new(None),
        })
    }

    /// `host:port` of the agent, the `Host` header it expects.
    pub fn authority(&self) -> &HeaderValue {
        &self.authority
    }

    /// The agent's URL.
    pub fn url(&self) -> &Uri {
        &self.url
    }

    /// A URI on the agent's host with `path_and_query` (for passthrough of other paths).
    pub fn uri_for(&self, path_and_query: &str) -> anyhow::Result<Uri> {
        Ok(format!("http://{}{}", self.authority.to_str()?, path_and_query).parse()?)
    }

    /// Sends a request to the agent as is; the answer's body streams from the connection.
    pub fn send(
        &self,
        req: Request<Bytes>,
    ) -> impl Future<Output = Result<http::Response<agent_http::Body>, agent_http::Error>> + Send + use<>
    {
        self.client.send(req)
    }

    fn rpc_request(
        &self,
        session: Option<&AgentSession>,
        body: &Value,
    ) -> anyhow::Result<Request<Bytes>> {
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(self.url.clone())
            .header(header::HOST, self.authority.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json, text/event-stream");
        if let Some(s) = session {
            req = req.header("mcp-protocol-version", s.version.as_str());
            if let Some(id) = &s.id {
                req = req.header("mcp-session-id", id.as_str());
            }
            if s.modern()
                && let Some(method) = body.get("method").and_then(Value::as_str)
            {
                req = req.header("mcp-method", method);
            }
        }
        Ok(req.body(Bytes::from(serde_json::to_vec(body)?))?)
    }

    async fn call(
        &self,
        session: Option<&AgentSession>,
        body: &Value,
    ) -> anyhow::Result<(StatusCode, http::HeaderMap, Bytes)> {
        let resp = tokio::time::timeout(
            Duration::from_secs(10),
            self.send(self.rpc_request(session, body)?),
        )
        .await
        .context("the agent did not answer within 10 s")??;
        let (parts, body) = resp.into_parts();
        let bytes = tokio::time::timeout(
            Duration::from_secs(10),
            Limited::new(body, MAX_AGENT_RESPONSE).collect(),
        )
        .await
        .context("the agent's answer did not finish within 10 s")?
        .map_err(|e| anyhow::anyhow!("reading the agent's answer: {e}"))?
        .to_bytes();
        Ok((parts.status, parts.headers, bytes))
    }

    fn result_of(headers: &http::HeaderMap, body: &[u8], id: i64) -> anyhow::Result<Value> {
        let ct = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/json");
        let response = find_response(body, ct, &Id::from(id))
            .map_err(|e| anyhow::anyhow!("unreadable answer: {e}"))?
            .context("the agent's answer holds no response to our request")?;
        if let Some(err) = response.get("error") {
            bail!("the agent answered with an error: {err}");
        }
        response
            .get("result")
            .cloned()
            .context("the agent's response has no result")
    }

    async fn initialize(&self) -> anyhow::Result<AgentSession> {
        let init = json!({
            "jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {
                "protocolVersion": LEGACY_VERSION,
                // Mesh callers' clients answer sampling and elicitation requests relayed on a
                // call's stream; servers that offer some tools only to such clients list them.
                "capabilities": { "sampling": {}, "elicitation": {} },
                "clientInfo": { "name": "capmesh-proxy", "version": env!("CARGO_PKG_VERSION") }
            }
        });
        let (status, headers, body) = self.call(None, &init).await?;
        if status.is_client_error() {
            // A stateless-only agent: speak 2026-07-28 to it.
            tracing::debug!(%status, "agent refused initialize; using protocol 2026-07-28");
            return Ok(AgentSession {
                id: None,
                version: MODERN_VERSION.to_owned(),
            });
        }
        if !status.is_success() {
            bail!("initialize answered HTTP {status}");
        }
        let result = Self::result_of(&headers, &body, 1)?;
        let version = result
            .get("protocolVersion")
            .and_then(Value::as_str)
            .unwrap_or(LEGACY_VERSION)
            .to_owned();
        let id = headers
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let session = AgentSession { id, version };
        let done = json!({ "jsonrpc": "2.0", "method": "notifications/initialized" });
        let (status, _, _) = self.call(Some(&session), &done).await?;
        if !status.is_success() {
            bail!("notifications/initialized answered HTTP {status}");
        }
        tracing::debug!(session = ?session.id, version = %session.version, "session with the agent opened");
        Ok(session)
    }

    /// The session to use for calls, opening one when there is none.
    pub async fn session(&self) -> anyhow::Result<AgentSession> {
        let mut guard = self.session.lock().await;
        if let Some(s) = guard.as_ref() {
            return Ok(s.clone());
        }
        // Boxed: opening a session is rare, and its future (an `initialize` round trip) would
        // otherwise make every 2025 call's future that much larger.
        let s = Box::pin(self.initialize()).await?;
        *guard = Some(s.clone());
        Ok(s)
    }

    /// Forgets `stale` (the agent answered 404: it restarted or expired the session).
    pub async fn forget_session(&self, stale: &AgentSession) {
        let mut guard = self.session.lock().await;
        if guard.as_ref() == Some(stale) {
            *guard = None;
        }
    }

    fn with_meta(session: &AgentSession, mut params: Value) -> Value {
        if session.modern()
            && let Some(obj) = params.as_object_mut()
        {
            obj.insert(
                "_meta".into(),
                json!({
                    "io.modelcontextprotocol/protocolVersion": MODERN_VERSION,
                    "io.modelcontextprotocol/clientCapabilities": {}
                }),
            );
        }
        params
    }

    /// Every tool the agent offers (follows `nextCursor`). An agent that restarted or expired
    /// the session answers 404 before listing anything: the session is opened again and the
    /// list asked in it (not a retry: nothing ran).
    pub async fn list_tools(&self) -> anyhow::Result<Vec<AgentTool>> {
        let session = self.session().await?;
        match self.list_tools_in(&session).await? {
            Some(tools) => Ok(tools),
            None => {
                self.forget_session(&session).await;
                let fresh = self.session().await?;
                self.list_tools_in(&fresh)
                    .await?
                    .context("the agent refused a session it had just opened (404 to tools/list)")
            }
        }
    }

    /// The tools listed in `session`; `None` when the agent no longer knows the session.
    async fn list_tools_in(
        &self,
        session: &AgentSession,
    ) -> anyhow::Result<Option<Vec<AgentTool>>> {
        let mut tools = Vec::new();
        let mut cursor: Option<String> = None;
        for page in 0..100 {
            let mut params = json!({});
            if let Some(c) = &cursor {
                params["cursor"] = json!(c);
            }
            let body = json!({ "jsonrpc": "2.0", "id": 2 + page, "method": "tools/list", "params": Self::with_meta(session, params) });
            let (status, headers, bytes) = self.call(Some(session), &body).await?;
            if status == StatusCode::NOT_FOUND && session.id.is_some() {
                return Ok(None);
            }
            if !status.is_success() {
                bail!("tools/list answered HTTP {status}");
            }
            let result = Self::result_of(&headers, &bytes, 2 + page)?;
            for tool in result
                .get("tools")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(name) = tool.get("name").and_then(Value::as_str) {
                    tools.push(AgentTool {
                        name: name.to_owned(),
                        description: tool
                            .get("description")
                            .and_then(Value::as_str)
                            .map(str::to_owned),
                        input_schema: tool.get("inputSchema").cloned(),
                    });
                }
            }
            cursor = result
                .get("nextCursor")
                .and_then(Value::as_str)
                .map(str::to_owned);
            if cursor.is_none() {
                return Ok(Some(tools));
            }
        }
        bail!("tools/list did not finish in 100 pages")
    }
}

/// What the proxy registers, built from the agent's tools and the flags.
#[derive(Debug, Clone)]
pub struct RegistrationTemplate {
    /// host:port other proxies dial.
    pub endpoint: String,
    /// Agent tags.
    pub tags: Vec<capmesh_api::Tag>,
    /// Agent version.
    pub version: Option<semver::Version>,
    /// `--capability` overrides.
    pub overrides: Vec<CapabilityOverride>,
    /// `--dependency` entries.
    pub dependencies: Vec<capmesh_api::Dependency>,
}

impl RegistrationTemplate {
    /// The registration for these agent tools.
    pub fn build(&self, tools: &[AgentTool]) -> Registration {
        let specs = tools
            .iter()
            .filter_map(|t| {
                let capability = match Capability::new(t.name.as_str()) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(tool = %t.name, error = %e, "tool name is not a valid capability; map it with --capability");
                        return None;
                    }
                };
                let mut spec = ToolSpec {
                    function: t.name.clone(),
                    capability,
                    version: None,
                    tags: vec![],
                    description: t.description.clone(),
                    input_schema: t.input_schema.clone(),
                };
                for o in &self.overrides {
                    o.apply(&mut spec);
                }
                Some(spec)
            })
            .collect();
        Registration {
            endpoint: self.endpoint.clone(),
            tags: self.tags.clone(),
            version: self.version.clone(),
            tools: specs,
            dependencies: self.dependencies.clone(),
        }
    }
}

/// Whether `e` is "nothing accepts connections at the agent's address" (yet).
fn nothing_listening(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<agent_http::Error>()
            .is_some_and(agent_http::Error::is_connect)
    })
}

/// How long an agent may take to start listening beside its sidecar before that is a warning.
const AGENT_START_GRACE: Duration = Duration::from_secs(2);

/// Watches the agent: registers its tools, re-registers when they change, and reports health.
/// Checks every second until the agent first answers, then every 5 s. Until then, why it does
/// not answer is recorded in `readiness` and logged at WARN (within a few seconds, naming the
/// URL and what it answered; nothing listening yet is normal for [`AGENT_START_GRACE`]).
pub async fn watch(
    agent: Arc<Agent>,
    template: RegistrationTemplate,
    registration: watch::Sender<Option<Registration>>,
    healthy: watch::Sender<bool>,
    readiness: Arc<Readiness>,
    mut stop: watch::Receiver<bool>,
) {
    let url = agent.url().to_string();
    let mut failures = 0u32;
    let mut wait = StartupWait::after("the agent's tools", AGENT_START_GRACE);
    loop {
        match agent.list_tools().await {
            Ok(tools) => {
                failures = 0;
                wait.done();
                let next = template.build(&tools);
                let changed = registration.borrow().as_ref() != Some(&next);
                if changed {
                    tracing::info!(tools = next.tools.len(), "agent tools registered");
                    registration.send_replace(Some(next));
                }
                if !*healthy.borrow() {
                    tracing::info!("agent is healthy");
                    healthy.send_replace(true);
                }
            }
            Err(e) => {
                failures += 1;
                let refused = nothing_listening(&e);
                let said = crate::readiness::error_text(&e);
                let reason = if refused {
                    format!("nothing accepts connections at --agent-url {url} ({said})")
                } else {
                    format!("the agent at --agent-url {url} answered: {said}")
                };
                readiness.waiting(Condition::AgentHealth, reason.clone());
                if registration.borrow().is_none() {
                    readiness.waiting(Condition::Registration, reason.clone());
                    let fix = if refused {
                        "start the agent, or fix --agent-url (host and port of its MCP endpoint)"
                    } else {
                        "check --agent-url: it must be the agent's MCP endpoint itself, such as http://127.0.0.1:8080/mcp"
                    };
                    wait.waiting(&reason, fix, refused);
                }
                if failures >= 2 && *healthy.borrow() {
                    tracing::warn!(agent_url = %url, error = %format!("{e:#}"), "agent is unhealthy");
                    healthy.send_replace(false);
                } else {
                    tracing::debug!(error = %format!("{e:#}"), "agent check failed");
                }
            }
        }
        let every = if registration.borrow().is_some() {
            Duration::from_secs(5)
        } else {
            Duration::from_secs(1)
        };
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

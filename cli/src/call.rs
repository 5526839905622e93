//! `capmesh call <capability> --args '{…}'`: one `tools/call` through the mesh, as a mesh
//! client with its own identity.
//!
//! The path: the topology (`GET /v1/topology`) → the capability's endpoints, ranked by the
//! `--tags`/`--version` selector the way a proxy ranks them → a short-lived identity
//! (`spiffe://<trust-domain>/ns/capmesh-system/agent/cli`: a bootstrap token made with the
//! admin token, a fresh P-256 key, a certificate) → the call over mutual TLS to the chosen
//! provider's proxy (`https://<address>/.capmesh/call`, its SPIFFE ID checked) → on a failure
//! that cannot have reached the agent (connect, TLS, 503), the next endpoint.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use capmesh_api::rest::{CertificateRequest, CertificateResponse, TokenCreated, TokenRequest};
use capmesh_api::{
    AgentName, Capability, Endpoint, EndpointId, Namespace, Selector, Snapshot, TrustDomain,
};
use capmesh_certs::{Credential, CredentialCell, SpiffeId, TrustConfig, TrustStore, WorkloadKey};
use capmesh_proxy::balance::{pick, rank};
use capmesh_proxy::contract::CALL_PATH;
use capmesh_proxy::mcp::{Id, find_response};
use capmesh_proxy::pool::{PeerError, PeerPool};
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use semver::VersionReq;
use serde_json::{Map, Value, json};

use crate::api::Api;
use crate::output::{self, Output};

/// The namespace of the CLI's own identity.
pub const CLI_NAMESPACE: &str = "capmesh-system";
/// The agent name of the CLI's own identity.
pub const CLI_AGENT: &str = "cli";
/// How long the CLI's bootstrap token lives (it is revoked as soon as it is used).
pub const TOKEN_TTL_SECS: u64 = 300;
/// Connect plus TLS handshake to one provider.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The largest answer read from a provider.
const MAX_ANSWER: usize = 16 * 1024 * 1024;

/// Flags of `capmesh call`.
#[derive(Debug, Clone, clap::Args)]
pub struct CallArgs {
    /// The capability to call (`capmesh list capabilities` shows them).
    pub capability: String,

    /// The tool's arguments: a JSON object, or @FILE to read one from a file.
    #[arg(long, value_name = "JSON", default_value = "{}", value_parser = parse_arguments)]
    pub args: Map<String, Value>,

    /// Tag rules, comma-separated: `tag` required, `+tag` preferred, `-tag` excluded.
    #[arg(long, value_name = "RULES", allow_hyphen_values = true, value_parser = parse_tags)]
    pub tags: Option<Selector>,

    /// Version requirement on the provider, such as '>=1.2,<2'.
    #[arg(long, value_name = "REQ", value_parser = parse_requirement)]
    pub version: Option<VersionReq>,

    /// How long to wait for the tool's answer.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = capmesh_api::duration::parse_duration)]
    pub timeout: Duration,

    /// Record this call's trace (a sampled W3C traceparent) and print its id on stderr; then
    /// `capmesh trace <id>` draws it.
    #[arg(long)]
    pub trace: bool,
}

fn parse_arguments(input: &str) -> Result<Map<String, Value>, String> {
    let (text, from) = match input.strip_prefix('@') {
        Some(path) => (
            std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?,
            format!("{path} "),
        ),
        None => (input.to_owned(), String::new()),
    };
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(format!(
            "{from}holds a JSON {}, but the tool's arguments are a JSON object: pass one such as '{{\"city\":\"Paris\"}}'",
            json_kind(&other)
        )),
        Err(e) => Err(format!(
            "{from}is not JSON ({e}): pass a JSON object such as '{{\"city\":\"Paris\"}}', quoted for the shell"
        )),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn parse_tags(input: &str) -> Result<Selector, String> {
    input.parse::<Selector>().map_err(|e| {
        format!("{e}: write tag rules such as +fast,-slow,eu (tag = required, +tag = preferred, -tag = excluded)")
    })
}

fn parse_requirement(input: &str) -> Result<VersionReq, String> {
    capmesh_api::parse_version_req(input).map_err(|e| e.to_string())
}

/// Why a call did not produce a tool result. Each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// `capmesh call` needs the admin token to get its own identity.
    #[error(
        "capmesh call joins the mesh with a short-lived identity that it gets with the admin token: pass --admin-token-file ./capmesh-data/admin-token (or set CAPMESH_ADMIN_TOKEN_FILE)"
    )]
    NeedsAdminToken,
    /// No agent provides the capability.
    #[error(
        "unknown capability {name:?}: no agent in the mesh provides it; known capabilities: {known} (see `capmesh list capabilities`)"
    )]
    UnknownCapability {
        /// The name as given.
        name: String,
        /// The known capabilities, comma-separated.
        known: String,
    },
    /// The capability is known but nothing can serve it now.
    #[error(
        "capability {capability:?} has no healthy endpoint{matching}: {detail}\nsee `capmesh list endpoints` and `capmesh status`"
    )]
    NoHealthyEndpoint {
        /// The capability.
        capability: String,
        /// ` matching "<selector>"`, or empty.
        matching: String,
        /// What there is instead.
        detail: String,
    },
    /// The authorization policy denies the CLI the capability.
    #[error(
        "{identity} may not call {capability:?}: {message}\nallow it in the authorization policy (`capmesh policy get`, then `capmesh policy set -f`)"
    )]
    Denied {
        /// The CLI's identity.
        identity: String,
        /// The capability.
        capability: String,
        /// What the provider's proxy said.
        message: String,
    },
    /// No answer within `--timeout`.
    #[error(
        "capability {capability:?}: no answer from {provider} within {after:?}: raise --timeout, or check the agent (`capmesh status`)"
    )]
    Timeout {
        /// The capability.
        capability: String,
        /// Who was called.
        provider: String,
        /// The limit.
        after: Duration,
    },
    /// Every endpoint that could serve failed before answering.
    #[error(
        "capability {capability:?}: every endpoint failed ({tried} tried): {last}\ncheck the providers with `capmesh status`"
    )]
    AllFailed {
        /// The capability.
        capability: String,
        /// How many endpoints were tried.
        tried: usize,
        /// The last failure.
        last: String,
    },
    /// The provider answered with an HTTP error or something that is not a JSON-RPC answer.
    #[error("capability {capability:?}: {provider} answered {detail}")]
    BadAnswer {
        /// The capability.
        capability: String,
        /// Who answered.
        provider: String,
        /// What was wrong.
        detail: String,
    },
}

/// Who served a call.
#[derive(Debug, Clone)]
struct Served<'a> {
    endpoint: &'a Endpoint,
    elapsed: Duration,
}

/// Calls the capability and prints the result. Returns the exit code: 0 for a result, 1 when
/// the tool reported an error (`isError`) or the call failed with a JSON-RPC error.
pub async fn run(
    api: &Api,
    output_format: Output,
    args: CallArgs,
) -> anyhow::Result<std::process::ExitCode> {
    let mut selector = args.tags.clone().unwrap_or_default();
    if let Some(req) = args.version.clone() {
        if selector.version.is_some() {
            anyhow::bail!(
                "a version requirement was given both in --tags and with --version: keep one (--version '>=1.2')"
            );
        }
        selector.version = Some(req);
    }
    if api.admin_token().is_none() {
        return Err(CallError::NeedsAdminToken.into());
    }
    let topology: Snapshot = api.get("/v1/topology").await?;
    let capability = resolve_capability(&topology, &args.capability)?;
    let endpoints: Vec<&Endpoint> = topology
        .endpoints
        .iter()
        .filter(|e| e.capability == capability)
        .collect();
    let ranks = rank(endpoints.iter().copied(), &selector);
    if ranks.is_empty() {
        return Err(no_healthy_endpoint(&capability, &selector, &endpoints).into());
    }

    let credential = obtain_identity(api, &topology.trust.trust_domain).await?;
    let me = credential.identity().to_string();
    let trust = Arc::new(TrustStore::new(&TrustConfig::from(&topology.trust))?);
    let pool = PeerPool::new(
        Arc::new(CredentialCell::new(credential)),
        trust,
        CONNECT_TIMEOUT,
        1,
    );

    // The CLI's own span is not recorded: the provider's server span is the first one held.
    let trace_id = args.trace.then(|| capmesh_proxy::random_hex(16));
    let traceparent = trace_id
        .as_ref()
        .map(|t| format!("00-{t}-{}-01", capmesh_proxy::random_hex(8)));
    let deadline = Instant::now() + args.timeout;
    let mut tried: Vec<EndpointId> = Vec::new();
    let mut last = String::new();
    let arguments = Value::Object(args.args.clone());
    while let Some(endpoint) = pick(&ranks, &|_: &EndpointId| None, &tried, Instant::now()) {
        tried.push(endpoint.id.clone());
        let provider = format!("{} ({})", endpoint.identity, endpoint.instance);
        let started = Instant::now();
        let left = deadline.saturating_duration_since(started);
        let attempt = tokio::time::timeout(
            left,
            send(&pool, endpoint, arguments.clone(), traceparent.as_deref()),
        )
        .await;
        let answer = match attempt {
            Err(_) => {
                return Err(CallError::Timeout {
                    capability: capability.to_string(),
                    provider,
                    after: args.timeout,
                }
                .into());
            }
            Ok(Err(Attempt::Unavailable(why))) => {
                eprintln!("note: {provider} is unavailable ({why}); trying the next endpoint");
                last = why;
                continue;
            }
            Ok(Err(Attempt::Failed(why))) => {
                return Err(CallError::AllFailed {
                    capability: capability.to_string(),
                    tried: tried.len(),
                    last: format!("{provider}: {why} (not retried: it may have run)"),
                }
                .into());
            }
            Ok(Ok(answer)) => answer,
        };
        let served = Served {
            endpoint,
            elapsed: started.elapsed(),
        };
        if let Some(id) = &trace_id {
            eprintln!("trace: {id}  (capmesh trace {id})");
        }
        return finish(output_format, &capability, &me, served, answer);
    }
    Err(CallError::AllFailed {
        capability: capability.to_string(),
        tried: tried.len(),
        last,
    }
    .into())
}

/// The capability named, or an error saying it is unknown and what is known.
fn resolve_capability(topology: &Snapshot, name: &str) -> Result<Capability, CallError> {
    let known = || {
        let mut names: Vec<&str> = topology
            .known_capabilities
            .iter()
            .map(Capability::as_str)
            .collect();
        names.sort_unstable();
        names.dedup();
        if names.is_empty() {
            "none yet".to_owned()
        } else {
            names.join(", ")
        }
    };
    match Capability::new(name) {
        Ok(cap)
            if topology.known_capabilities.contains(&cap)
                || topology.endpoints.iter().any(|e| e.capability == cap) =>
        {
            Ok(cap)
        }
        _ => Err(CallError::UnknownCapability {
            name: name.to_owned(),
            known: known(),
        }),
    }
}

fn no_healthy_endpoint(cap: &Capability, selector: &Selector, all: &[&Endpoint]) -> CallError {
    let healthy: Vec<&&Endpoint> = all.iter().filter(|e| e.healthy).collect();
    let matching = if selector.is_empty() {
        String::new()
    } else {
        format!(" matching {:?}", selector.to_string())
    };
    let detail = if all.is_empty() {
        "it is registered, but no instance serves it right now".to_owned()
    } else if healthy.is_empty() {
        format!("all {} of its endpoints are unhealthy", all.len())
    } else {
        let offered: Vec<String> = healthy
            .iter()
            .map(|e| {
                let tags = output::join_unique(e.tags.iter().map(|t| t.as_str()));
                let version = e
                    .version
                    .as_ref()
                    .map_or_else(|| "no version".to_owned(), |v| format!("version {v}"));
                format!(
                    "{} [{}] {version}",
                    e.agent,
                    if tags.is_empty() { "no tags" } else { &tags }
                )
            })
            .collect();
        format!(
            "the healthy ones do not match; they offer: {}; loosen --tags/--version",
            offered.join("; ")
        )
    };
    CallError::NoHealthyEndpoint {
        capability: cap.to_string(),
        matching,
        detail,
    }
}

/// Gets a certificate for `spiffe://<trust-domain>/ns/capmesh-system/agent/cli` the way a
/// proxy gets its first one, with a bootstrap token that is revoked once used.
async fn obtain_identity(api: &Api, trust_domain: &TrustDomain) -> anyhow::Result<Credential> {
    let namespace = Namespace::new(CLI_NAMESPACE)?;
    let created: TokenCreated = api
        .post(
            "/v1/tokens",
            &TokenRequest {
                namespace: namespace.clone(),
                agent_pattern: CLI_AGENT.to_owned(),
                ttl_secs: TOKEN_TTL_SECS,
                uses: Some(1),
                system: true,
                description: Some("capmesh call: the CLI's short-lived identity".to_owned()),
            },
        )
        .await?;
    let identity = SpiffeId::new(trust_domain.clone(), namespace, AgentName::new(CLI_AGENT)?);
    let key = WorkloadKey::generate()?;
    let issued: Result<CertificateResponse, _> = api
        .post(
            "/v1/certificates",
            &CertificateRequest {
                csr_pem: key.csr_pem(&identity)?,
                token: Some(created.token),
            },
        )
        .await;
    // The token has done its job (or failed to); nobody else should use it.
    let revoked: Result<Value, _> = api.delete(&format!("/v1/tokens/{}", created.info.id)).await;
    if let Err(e) = revoked {
        eprintln!(
            "note: could not revoke the CLI's bootstrap token {} (it expires in {TOKEN_TTL_SECS} s anyway): {e}",
            created.info.id
        );
    }
    let issued = issued?;
    Ok(Credential::with_key(&issued.certificate_chain_pem, &key)?)
}

/// What one attempt got back.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    content_type: String,
    body: Bytes,
}

/// Why an attempt did not get an answer worth reporting, sorted by the mesh's retry rule
/// (`capmesh_proxy::forward::retry`): only what cannot have reached the agent is sent again.
#[derive(Debug)]
enum Attempt {
    /// It certainly did not reach the agent (connect, TLS, unsent, refused, the mesh's 503):
    /// another endpoint may be tried.
    Unavailable(String),
    /// It may have reached the agent: a `tools/call` is not sent again.
    Failed(String),
}

/// Sends one `tools/call` to one provider and reads the whole answer.
async fn send(
    pool: &PeerPool,
    endpoint: &Endpoint,
    arguments: Value,
    traceparent: Option<&str>,
) -> Result<Answer, Attempt> {
    let body = json!({
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": endpoint.function, "arguments": arguments},
    });
    let uri = format!("https://{}{CALL_PATH}", endpoint.address);
    let mut request = Request::builder()
        .method(Method::POST)
        .uri(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::ACCEPT, "application/json, text/event-stream");
    if let Some(tp) = traceparent {
        request = request.header("traceparent", tp);
    }
    let request = request.body(Bytes::from(body.to_string())).map_err(|e| {
        Attempt::Unavailable(format!(
            "endpoint address {:?} is not usable: {e}",
            endpoint.address
        ))
    })?;
    let response = pool
        .send(&endpoint.address, &endpoint.identity, request)
        .await
        .map_err(|e: PeerError| {
            if e.may_have_reached() {
                Attempt::Failed(e.to_string())
            } else {
                Attempt::Unavailable(e.to_string())
            }
        })?;
    let status = response.status();
    // The mesh answers 503 (marked) only for what did not reach an agent.
    if status == StatusCode::SERVICE_UNAVAILABLE
        && response
            .headers()
            .contains_key(capmesh_proxy::contract::ERROR_HEADER)
    {
        let body = Limited::new(response.into_body(), 64 * 1024)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let why = rpc_message(&body).unwrap_or_else(|| "503".to_owned());
        return Err(Attempt::Unavailable(format!("503: {why}")));
    }
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_owned();
    let body = Limited::new(response.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| Attempt::Failed(format!("reading the answer failed: {e}")))?
        .to_bytes();
    Ok(Answer {
        status,
        content_type,
        body,
    })
}

/// The `error.message` of a JSON-RPC error body.
fn rpc_message(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    v.pointer("/error/message")
        .and_then(Value::as_str)
        .map(str::to_owned)
}

/// Reads the answer, prints it and picks the exit code.
fn finish(
    output_format: Output,
    capability: &Capability,
    me: &str,
    served: Served<'_>,
    answer: Answer,
) -> anyhow::Result<std::process::ExitCode> {
    let provider = format!(
        "{} ({})",
        served.endpoint.identity, served.endpoint.instance
    );
    let bad = |detail: String| CallError::BadAnswer {
        capability: capability.to_string(),
        provider: provider.clone(),
        detail,
    };
    if answer.status == StatusCode::FORBIDDEN {
        return Err(CallError::Denied {
            identity: me.to_owned(),
            capability: capability.to_string(),
            message: rpc_message(&answer.body).unwrap_or_else(|| "403 Forbidden".to_owned()),
        }
        .into());
    }
    let response = if answer.status.is_success() {
        let id = Id::Number(1.into());
        match find_response(&answer.body, &answer.content_type, &id) {
            Ok(Some(v)) => v,
            Ok(None) => {
                return Err(bad("without a JSON-RPC response to the call".to_owned()).into());
            }
            Err(e) => return Err(bad(e.to_string()).into()),
        }
    } else {
        match serde_json::from_slice::<Value>(&answer.body) {
            Ok(v) if v.get("error").is_some() => v,
            _ => {
                let text = String::from_utf8_lossy(&answer.body);
                return Err(bad(format!("HTTP {}: {}", answer.status, text.trim())).into());
            }
        }
    };

    let ms = served.elapsed.as_millis();
    let rpc_error = response.get("error").cloned();
    let tool_error = response
        .pointer("/result/isError")
        .and_then(Value::as_bool)
        .unwrap_or(false);

    if output_format == Output::Json {
        let mut out = response.clone();
        if let Value::Object(map) = &mut out {
            map.insert(
                "served_by".to_owned(),
                json!({
                    "identity": served.endpoint.identity,
                    "instance": served.endpoint.instance,
                    "agent": served.endpoint.agent,
                    "namespace": served.endpoint.namespace,
                    "address": served.endpoint.address,
                    "function": served.endpoint.function,
                    "elapsed_ms": ms,
                }),
            );
        }
        output::print_json(&out)?;
    } else {
        // The result alone on stdout (`capmesh call … > answer.txt`); who served it is a note.
        eprintln!("served by {provider} in {ms} ms");
        let mut text = String::new();
        if let Some(result) = response.get("result") {
            text.push_str(&result_text(result));
            if !text.ends_with('\n') {
                text.push('\n');
            }
        }
        output::print(&text)?;
    }

    if let Some(err) = rpc_error {
        let code = err.get("code").and_then(Value::as_i64).unwrap_or(0);
        let message = err
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("(no message)");
        eprintln!(
            "error: capability {:?}: {provider} answered JSON-RPC error {code}: {message}",
            capability.as_str()
        );
        return Ok(std::process::ExitCode::FAILURE);
    }
    if tool_error {
        eprintln!(
            "error: capability {:?}: the tool reported an error (isError: true); its message is above",
            capability.as_str()
        );
        return Ok(std::process::ExitCode::FAILURE);
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// A tool result as text: its text content, one block per line; other content described;
/// the structured content as JSON when there is no text.
pub fn result_text(result: &Value) -> String {
    let mut parts: Vec<String> = Vec::new();
    for item in result
        .get("content")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let kind = item.get("type").and_then(Value::as_str).unwrap_or("");
        let text = match kind {
            "text" => item
                .get("text")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            "image" | "audio" => format!(
                "[{kind}: {}]",
                item.get("mimeType").and_then(Value::as_str).unwrap_or("?")
            ),
            "resource" => item
                .pointer("/resource/text")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| {
                    format!(
                        "[resource: {}]",
                        item.pointer("/resource/uri")
                            .and_then(Value::as_str)
                            .unwrap_or("?")
                    )
                }),
            "resource_link" => format!(
                "[resource link: {}]",
                item.get("uri").and_then(Value::as_str).unwrap_or("?")
            ),
            other => format!("[{other} content]"),
        };
        parts.push(text);
    }
    if parts.is_empty()
        && let Some(structured) = result.get("structuredContent")
    {
        return serde_json::to_string_pretty(structured).unwrap_or_default();
    }
    parts.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_must_be_a_json_object() {
        assert_eq!(parse_arguments("{\"a\":1}").unwrap()["a"], 1);
        let err = parse_arguments("[1]").unwrap_err();
        assert!(
            err.contains("JSON array") && err.contains("object"),
            "{err}"
        );
        let err = parse_arguments("{city: Paris}").unwrap_err();
        assert!(err.contains("is not JSON"), "{err}");
        let err = parse_arguments("@/nonexistent/args.json").unwrap_err();
        assert!(err.contains("/nonexistent/args.json"), "{err}");
    }

    #[test]
    fn results_read_as_text() {
        let r = json!({"content": [{"type": "text", "text": "a"}, {"type": "image", "mimeType": "image/png", "data": ""}]});
        assert_eq!(result_text(&r), "a\n[image: image/png]");
        let r = json!({"content": [], "structuredContent": {"t": 1}});
        assert!(result_text(&r).contains("\"t\": 1"));
    }
}

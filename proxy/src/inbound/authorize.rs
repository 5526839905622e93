//! The one authorization layer of the inbound side: every request on every path — a mesh
//! call, a passthrough conversation, the agent's own paths (what transparent mode forwards) —
//! passes it, and every JSON-RPC message in its body is checked.
//!
//! * Each `tools/call` is checked against the capability of the tool it names (a tool the
//!   agent did not register is refused: it has no capability to check).
//! * `resources/read`, `resources/subscribe` and `prompts/get` name no capability (agents
//!   register tools only): on passthrough they belong to the conversation's capability, which
//!   the caller must be allowed; on the agent's own paths, to the agent, whose capabilities the
//!   caller must be allowed at least one of. A mesh call carries tool calls only.
//! * Notifications and responses pass (a response's target is checked where it is routed).
//! * A body that cannot be read as JSON-RPC — not JSON, a repeated `method`/`params`/`name`/
//!   `uri`, a non-string method — is refused (400, -32600), never forwarded unchecked. Ids of
//!   every form SDKs accept (`1`, `1.0`, huge integers, strings) are read, so the mesh and the
//!   agent never read one message two ways ([`crate::mcp::inspect`]).
//! * Before the first snapshot nothing is known, so nothing is allowed: 503, not "allow".

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use capmesh_api::{Capability, Policy, ToolSpec, UNAUTHENTICATED};
use http::{Method, Request, Response};
use prometheus::IntCounterVec;

use super::{Caller, Path};
use crate::BoxBody;
use crate::error::ProxyError;
use crate::mcp::inspect::{Inspected, inspect};
use crate::mcp::jsonrpc::{INVALID_PARAMS, INVALID_REQUEST, Id, RpcError};
use crate::stack::{Either, Handled, Middleware, Next, call, refuse};

/// What authorization needs: the snapshot's policy for this agent and the agent's tools.
#[derive(Debug, Clone, Default)]
pub struct Authz {
    policy: Policy,
    functions: HashMap<String, Capability>,
}

impl Authz {
    /// From the snapshot's policy and the registered tools.
    pub fn new(policy: Policy, tools: &[ToolSpec]) -> Self {
        Self {
            policy,
            functions: tools
                .iter()
                .map(|t| (t.function.clone(), t.capability.clone()))
                .collect(),
        }
    }

    fn provides(&self, capability: &str) -> bool {
        self.functions.values().any(|c| c.as_str() == capability)
    }
}

/// The view the layer reads: `None` until the first snapshot (and the agent's registration).
pub type AuthzView = Arc<ArcSwapOption<Authz>>;

/// See the module docs.
#[derive(Debug, Clone)]
pub struct Authorize {
    view: AuthzView,
    counted: Option<IntCounterVec>,
}

impl Authorize {
    /// Deciding from `view`, counting decisions by capability and outcome in `counted`.
    pub fn new(view: AuthzView, counted: Option<IntCounterVec>) -> Self {
        Self { view, counted }
    }
}

/// Which methods are checked, and against what.
fn protected(method: &str) -> Option<Target> {
    match method {
        "tools/call" => Some(Target::Tool),
        "resources/read" | "resources/subscribe" | "prompts/get" => Some(Target::Conversation),
        _ => None,
    }
}

enum Target {
    /// The capability of the tool named in `params.name`.
    Tool,
    /// The conversation's capability (passthrough) or the agent's (its own paths).
    Conversation,
}

/// What an allowed request was found to be.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    /// The capabilities it uses (counted as allowed).
    pub allowed: Vec<String>,
    /// Its JSON-RPC messages (none for a GET or DELETE).
    pub messages: Vec<Inspected>,
}

/// The messages of an authorized request, as the layer read them (a request extension): the
/// layers below need not read the body again to know what it holds.
#[derive(Debug, Clone)]
pub struct Inspection(pub Arc<[Inspected]>);

/// The decision for one request (see the module docs).
pub fn decide(
    authz: Option<&Authz>,
    caller: Option<&str>,
    path: &Path,
    method: &Method,
    body: &[u8],
) -> Result<Decision, ProxyError> {
    let Some(authz) = authz else {
        return Err(ProxyError::NotReady(
            "no snapshot from the control plane yet, so no authorization policy".into(),
        ));
    };
    if authz.functions.is_empty() {
        return Err(ProxyError::NotReady(
            "this agent has not registered its tools with the mesh yet; retry shortly".into(),
        ));
    }
    let denied = |capability: &str| ProxyError::Forbidden {
        caller: caller.unwrap_or(UNAUTHENTICATED).to_owned(),
        capability: capability.to_owned(),
    };
    let mut allowed = Vec::new();
    // What the conversation itself may do.
    match path {
        Path::Passthrough { capability } => {
            if !authz.provides(capability) {
                return Err(ProxyError::Protocol(RpcError::new(
                    INVALID_PARAMS,
                    format!("this agent does not provide capability \"{capability}\""),
                )));
            }
            if !authz.policy.allows(caller, capability) {
                return Err(denied(capability));
            }
            allowed.push(capability.clone());
        }
        Path::Agent => {
            let mut caps: Vec<&str> = authz.functions.values().map(Capability::as_str).collect();
            caps.sort_unstable();
            caps.dedup();
            if !caps.iter().any(|c| authz.policy.allows(caller, c)) {
                return Err(denied("*"));
            }
        }
        Path::Call => {}
    }
    if *method != Method::POST {
        if !body.is_empty() {
            return Err(unreadable(format!("a {method} request carries no body")));
        }
        if *path == Path::Call {
            return Err(ProxyError::MethodNotAllowed("mesh calls are POSTs"));
        }
        return Ok(Decision {
            allowed,
            messages: Vec::new(),
        });
    }
    let messages = inspect(body).map_err(|e| unreadable(e.to_string()))?;
    if *path == Path::Call && messages.len() != 1 {
        return Err(unreadable(
            "a mesh call carries one JSON-RPC message".to_owned(),
        ));
    }
    for m in &messages {
        let Some(method) = m.method.as_deref() else {
            continue;
        };
        match (protected(method), path) {
            (None, Path::Call) if method != "notifications/cancelled" => {
                return Err(unreadable(format!(
                    "a mesh call carries tools/call, not {method}"
                )));
            }
            (None, _) => {}
            (Some(Target::Tool), _) => {
                let capability = tool_capability(authz, m)?;
                if !authz.policy.allows(caller, capability.as_str()) {
                    return Err(denied(capability.as_str()));
                }
                allowed.push(capability.to_string());
            }
            (Some(Target::Conversation), Path::Call) => {
                return Err(unreadable(format!(
                    "a mesh call carries tools/call, not {method}"
                )));
            }
            // Checked above with the conversation.
            (Some(Target::Conversation), _) => {}
        }
    }
    allowed.sort_unstable();
    allowed.dedup();
    Ok(Decision { allowed, messages })
}

fn unreadable(why: String) -> ProxyError {
    ProxyError::Protocol(RpcError::new(
        INVALID_REQUEST,
        format!("the mesh cannot authorize this request, so it is refused: {why}"),
    ))
}

fn tool_capability<'a>(authz: &'a Authz, m: &Inspected) -> Result<&'a Capability, ProxyError> {
    let Some(name) = m.name.as_deref() else {
        return Err(ProxyError::Protocol(RpcError::new(
            INVALID_PARAMS,
            "tools/call needs params.name, a string",
        )));
    };
    authz
        .functions
        .get(name)
        .ok_or_else(|| ProxyError::UnregisteredTool(name.to_owned()))
}

impl<S> Middleware<Request<Bytes>, S> for Authorize
where
    S: Next<Request<Bytes>, Response<BoxBody>>,
{
    type Response = Response<BoxBody>;

    fn handle(self, mut req: Request<Bytes>, next: S) -> impl Handled<Response<BoxBody>> {
        let view = self.view.load_full();
        let caller = req
            .extensions()
            .get::<Caller>()
            .cloned()
            .unwrap_or_default();
        let path = Path::of(&req);
        let decision = decide(
            view.as_deref(),
            caller.0.as_deref(),
            &path,
            req.method(),
            req.body(),
        );
        let count = |capability: &str, outcome: &str| {
            if let Some(c) = &self.counted {
                c.with_label_values(&[capability, outcome]).inc();
            }
        };
        match decision {
            Ok(decision) => {
                for capability in &decision.allowed {
                    count(capability, "allowed");
                }
                req.extensions_mut()
                    .insert(Inspection(decision.messages.into()));
                Either::Right(call(next, req))
            }
            Err(e) => {
                if let ProxyError::Forbidden { capability, .. } = &e {
                    count(capability, "denied");
                    tracing::info!(caller = %caller, capability = %capability, "call denied by policy");
                }
                // The refusal answers the request by its id, when it has one.
                let id = serde_json::from_slice::<serde_json::Value>(req.body())
                    .ok()
                    .and_then(|v| v.get("id").and_then(Id::from_value));
                Either::Left(refuse(e.for_request(id.as_ref())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use capmesh_api::{PolicyAction, PolicyRule};
    use tower::ServiceBuilder;

    use super::*;
    use crate::stack::{Stage, service_fn};

    const ALICE: &str = "spiffe://capmesh.local/ns/default/agent/alice";

    /// An agent with tools `forecast` (capability get_weather) and `admin_reset` (capability
    /// reset); alice may call get_weather only.
    fn authz() -> Authz {
        let tool = |f: &str, c: &str| ToolSpec {
            function: f.into(),
            capability: Capability::new(c).unwrap(),
            version: None,
            tags: vec![],
            description: None,
            input_schema: None,
        };
        let policy = Policy {
            default: PolicyAction::Deny,
            rules: vec![PolicyRule {
                from: vec![ALICE.into()],
                capabilities: vec!["get_weather".into()],
                action: PolicyAction::Allow,
            }],
            provide: vec![],
        };
        Authz::new(
            policy,
            &[
                tool("forecast", "get_weather"),
                tool("admin_reset", "reset"),
            ],
        )
    }

    fn call_body(id: &str, tool: &str) -> String {
        format!(
            r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"{tool}"}}}}"#
        )
    }

    fn paths() -> [Path; 3] {
        [
            Path::Call,
            Path::Passthrough {
                capability: "get_weather".into(),
            },
            Path::Agent,
        ]
    }

    #[test]
    fn each_tool_call_is_checked_on_every_path_whatever_its_id() {
        let a = authz();
        for path in paths() {
            for id in [
                "1",
                "1.0",
                "\"x\"",
                "123456789012345678901234567890",
                "-1e2",
            ] {
                let allowed = decide(
                    Some(&a),
                    Some(ALICE),
                    &path,
                    &Method::POST,
                    call_body(id, "forecast").as_bytes(),
                );
                assert_eq!(
                    allowed.unwrap().allowed,
                    vec!["get_weather".to_owned()],
                    "{path:?} id {id}"
                );
                let denied = decide(
                    Some(&a),
                    Some(ALICE),
                    &path,
                    &Method::POST,
                    call_body(id, "admin_reset").as_bytes(),
                );
                assert!(
                    matches!(denied, Err(ProxyError::Forbidden { ref capability, .. }) if capability == "reset"),
                    "{path:?} id {id}: {denied:?}"
                );
            }
        }
    }

    #[test]
    fn batches_are_checked_message_by_message() {
        let a = authz();
        let batch = format!(
            "[{}, {}]",
            call_body("1", "forecast"),
            call_body("2", "admin_reset")
        );
        for path in [
            Path::Agent,
            Path::Passthrough {
                capability: "get_weather".into(),
            },
        ] {
            assert!(
                decide(
                    Some(&a),
                    Some(ALICE),
                    &path,
                    &Method::POST,
                    batch.as_bytes()
                )
                .is_err()
            );
        }
        // A mesh call is one message.
        assert!(
            decide(
                Some(&a),
                Some(ALICE),
                &Path::Call,
                &Method::POST,
                batch.as_bytes()
            )
            .is_err()
        );
    }

    #[test]
    fn what_cannot_be_read_is_refused_never_forwarded() {
        let a = authz();
        for body in [
            "not json",
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","method":"tools/call","params":{"name":"admin_reset"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"forecast","name":"admin_reset"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":7}}"#,
        ] {
            for path in paths() {
                let e = decide(Some(&a), Some(ALICE), &path, &Method::POST, body.as_bytes())
                    .unwrap_err();
                assert_eq!(
                    e.status(),
                    http::StatusCode::BAD_REQUEST,
                    "{path:?} {body}: {e}"
                );
            }
        }
        // A tool the agent did not register cannot be authorized: not called, answered as a
        // tool error.
        let unregistered = call_body("1", "not_registered");
        for path in paths() {
            let e = decide(
                Some(&a),
                Some(ALICE),
                &path,
                &Method::POST,
                unregistered.as_bytes(),
            )
            .unwrap_err();
            assert!(
                matches!(e, ProxyError::UnregisteredTool(_)),
                "{path:?}: {e}"
            );
        }
        // A GET carries no body.
        assert!(decide(Some(&a), Some(ALICE), &Path::Agent, &Method::GET, b"{}").is_err());
    }

    #[test]
    fn conversations_need_their_capability_and_agent_paths_one_of_the_agents() {
        let a = authz();
        let read =
            br#"{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"file:///x"}}"#;
        let on = |cap: &str| Path::Passthrough {
            capability: cap.into(),
        };
        assert!(
            decide(
                Some(&a),
                Some(ALICE),
                &on("get_weather"),
                &Method::POST,
                read
            )
            .is_ok()
        );
        assert!(matches!(
            decide(Some(&a), Some(ALICE), &on("reset"), &Method::POST, read),
            Err(ProxyError::Forbidden { .. })
        ));
        assert!(decide(Some(&a), Some(ALICE), &on("unknown"), &Method::POST, read).is_err());
        assert!(decide(Some(&a), Some(ALICE), &Path::Agent, &Method::POST, read).is_ok());
        assert!(decide(Some(&a), Some(ALICE), &Path::Agent, &Method::GET, b"").is_ok());
        let bob = "spiffe://capmesh.local/ns/default/agent/bob";
        assert!(decide(Some(&a), Some(bob), &Path::Agent, &Method::GET, b"").is_err());
        assert!(decide(Some(&a), None, &Path::Agent, &Method::GET, b"").is_err());
        // A mesh call carries tool calls, not resource reads.
        assert!(decide(Some(&a), Some(ALICE), &Path::Call, &Method::POST, read).is_err());
    }

    #[test]
    fn notifications_and_responses_pass() {
        let a = authz();
        for body in [
            r#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":"cm-1"}}"#,
            r#"{"jsonrpc":"2.0","id":"capmesh-x","result":{}}"#,
        ] {
            for path in paths() {
                assert!(
                    decide(Some(&a), Some(ALICE), &path, &Method::POST, body.as_bytes()).is_ok(),
                    "{path:?} {body}"
                );
            }
        }
    }

    #[test]
    fn before_the_first_snapshot_nothing_is_allowed() {
        for path in paths() {
            let e = decide(
                None,
                Some(ALICE),
                &path,
                &Method::POST,
                call_body("1", "forecast").as_bytes(),
            )
            .unwrap_err();
            assert_eq!(e.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        }
    }

    #[tokio::test]
    async fn the_layer_stops_denied_requests_before_the_agent() {
        let view: AuthzView = Arc::new(ArcSwapOption::empty());
        let reached = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = reached.clone();
        let svc = ServiceBuilder::new()
            .layer(Stage(Authorize::new(view.clone(), None)))
            .service(service_fn(move |_: Request<Bytes>| {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async {
                    Ok::<_, ProxyError>(Response::new(crate::boxed(http_body_util::Empty::new())))
                }
            }));
        let req = |tool: &str| {
            let mut r = Request::builder()
                .method(Method::POST)
                .uri("/mcp")
                .body(Bytes::from(call_body("1.0", tool)))
                .unwrap();
            r.extensions_mut().insert(Caller(Some(ALICE.into())));
            r
        };
        // No snapshot: 503, and the agent never sees it.
        let e = svc.clone().call(req("forecast")).await.unwrap_err();
        assert_eq!(e.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        view.store(Some(Arc::new(authz())));
        assert!(svc.clone().call(req("forecast")).await.is_ok());
        let e = svc.call(req("admin_reset")).await.unwrap_err();
        assert_eq!(e.status(), http::StatusCode::FORBIDDEN);
        assert_eq!(e.rpc_code(), crate::mcp::jsonrpc::FORBIDDEN);
        assert_eq!(reached.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}

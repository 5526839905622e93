//! The lower half of every outbound stack: a [`Call`] — a request already resolved to a set of
//! endpoints — goes through a deadline, the one retry policy, the balancer and the metrics to
//! the peer client, which sends it over mutual TLS to the chosen provider's proxy.
//!
//! ```text
//! RecordAttempts → Deadline → Retry(RetryPolicy) → Balance → Observe → PeerClient
//! ```
//!
//! The listeners (federated `/mcp`, passthrough, transparent) differ above this: each resolves
//! its own requests into a [`Call`] and relays the response its own way.

mod balance;
mod deadline;
mod observe;
mod peer;
pub mod retry;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use capmesh_api::{Endpoint, EndpointId};
use http::{HeaderMap, Method, Response};
use serde_json::Value;
use tower::ServiceBuilder;

pub use self::balance::Balance;
pub use self::deadline::Deadline;
pub use self::observe::Observe;
pub use self::peer::PeerClient;
pub use self::retry::{Retry, RetryPolicy};
use crate::Proxy;
use crate::pool::PeerBody;
use crate::stack::{Next, Stage, Terminal};

/// Endpoints ranked for one call: the best rank first; each rank shares the load.
pub type Ranks = Vec<Vec<Arc<Endpoint>>>;

/// Where a call may go.
#[derive(Debug, Clone)]
pub enum Target {
    /// Any endpoint of these ranks (a capability, or the instances behind an address).
    Ranked {
        /// The ranked endpoints.
        ranks: Arc<Ranks>,
    },
    /// Only this endpoint (a session, a `requestState`, a provider's request).
    Pinned(Arc<Endpoint>),
}

/// How the request is written for the endpoint chosen.
#[derive(Debug, Clone)]
pub enum Upstream {
    /// A federated `tools/call`: renamed to the endpoint's function, the mesh's own id, and
    /// the provider's `requestState` restored when the call carried the mesh's sealed one.
    ToolCall {
        /// The id the provider sees.
        upstream_id: Value,
        /// The provider's own `requestState`, when restored.
        request_state: Option<Value>,
        /// Re-emit `Mcp-Method`/`Mcp-Name` (2026-07-28).
        modern: bool,
    },
    /// One message as it is, to `/.capmesh/call` (an answer to a provider's request, a
    /// cancellation).
    Message,
    /// Passthrough: to `/.capmesh/passthrough` with the capability header, the query kept,
    /// and the provider proxy's session id when pinned.
    Passthrough {
        /// The capability the conversation is for.
        capability: String,
        /// The query string (with its `?`), if any.
        query: String,
        /// The provider proxy's session id.
        session: Option<String>,
    },
    /// Transparent mode: the caller's own path, unchanged.
    Transparent {
        /// Path and query.
        path: String,
    },
}

/// Per-request state the retry policy and the balancer share across attempts.
#[derive(Debug, Default)]
pub struct Attempts {
    tried: Mutex<Vec<EndpointId>>,
    last_error: Mutex<Option<String>>,
}

impl Attempts {
    /// Endpoints tried so far.
    pub fn tried(&self) -> Vec<EndpointId> {
        self.tried.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// How many endpoints were tried.
    pub fn count(&self) -> usize {
        self.tried.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn push(&self, id: EndpointId) {
        self.tried
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(id);
    }

    /// Why the last attempt failed.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records why an attempt failed.
    pub fn failed(&self, why: String) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }
}

/// A request bound for a provider, resolved to its [`Target`]. Cheap to clone (the retry
/// layer keeps a copy for each attempt).
#[derive(Debug, Clone)]
pub struct Call(pub Arc<CallSpec>);

/// What a [`Call`] holds.
#[derive(Debug)]
pub struct CallSpec {
    /// Where it may go.
    pub target: Target,
    /// How it is written for the endpoint chosen.
    pub upstream: Upstream,
    /// The HTTP method.
    pub method: Method,
    /// Headers to send (already filtered: propagation, trace context, MCP headers).
    pub headers: HeaderMap,
    /// The body as the client sent it.
    pub body: Bytes,
    /// Safe to send again even if it may have reached an agent (reads such as `tools/list`).
    pub safe: bool,
    /// The caller's deadline for response headers.
    pub timeout: Duration,
    /// The capability (or agent) it is counted under.
    pub label: String,
    /// What the attempts so far found.
    pub attempts: Attempts,
}

impl std::ops::Deref for Call {
    type Target = CallSpec;
    fn deref(&self) -> &CallSpec {
        &self.0
    }
}

/// The lower half of every outbound stack (see the module docs).
pub fn stack(proxy: &Arc<Proxy>) -> impl Next<Call, Response<PeerBody>> {
    ServiceBuilder::new()
        // The endpoint that served and the attempts it took, onto the hop's span (if sampled).
        .layer(Stage(crate::trace::RecordAttempts))
        // The caller's deadline covers every attempt, up to response headers.
        .layer(Stage(Deadline))
        // One policy decides every retry: only what cannot have reached an agent, or a safe
        // method, on another endpoint, within the retry budget.
        .layer(Stage(Retry::new(RetryPolicy::new(
            proxy.retry_budget.clone(),
            Some(proxy.metrics.retries.clone()),
        ))))
        // Power of two choices over peak-EWMA within the best rank that has an endpoint
        // left; feeds each outcome to the endpoint's latency estimate and breaker.
        .layer(Stage(Balance::new(proxy.clone())))
        // Per-attempt metrics: latency to headers, status.
        .layer(Stage(Observe::new(proxy.clone())))
        .service(Terminal(PeerClient::new(proxy.clone())))
}

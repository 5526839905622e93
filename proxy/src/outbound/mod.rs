//! Outbound: what the local agent calls, on `127.0.0.1:15001`.
//!
//! * `POST /mcp` — the federated endpoint: the mesh as one MCP server whose tools are the
//!   capabilities the agent depends on ([`federated`], [`tool_call`], [`message`]);
//!   `GET`/`DELETE /mcp` for its legacy sessions ([`listen`]).
//! * `/capabilities/<capability>/mcp` — passthrough: one provider instance's own MCP server,
//!   the conversation unchanged ([`passthrough`]).
//! * connections redirected here by `capmesh-proxy init`'s rules — transparent mode
//!   ([`transparent`]).
//!
//! Each is a tower stack composed in [`stack`] (and [`transparent::serve`]); their lower half,
//! shared, is [`crate::forward`].

pub mod federated;
mod guard;
pub mod listen;
pub mod message;
pub mod passthrough;
pub mod sessions;
pub mod tool_call;
pub mod transparent;

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceBuilder;

pub use self::sessions::Sessions;
use crate::contract::MAX_REQUEST;
use crate::error::ProxyError;
use crate::forward;
use crate::serve::h1::AgentBody;
use crate::serve::{ConnService, Limits};
use crate::stack::{
    Either, Handled, Handler, Next, ReadBody, RespondLayer, Stage, Terminal, call, refuse,
};
use crate::{BoxBody, Proxy, trace};

/// The outbound listener's stack, top to bottom.
pub fn stack(proxy: &Arc<Proxy>) -> impl ConnService<AgentBody> {
    ServiceBuilder::new()
        // Errors become JSON-RPC error responses here, and only here.
        .layer(RespondLayer)
        // A page on another site can reach a loopback port under a name of its own.
        .layer(Stage(guard::RebindingGuard))
        .service(Terminal(Router {
            federated: federated_stack(proxy),
            sessions: Terminal(listen::Listen::new(proxy.clone())),
            passthrough: passthrough_stack(proxy),
        }))
}

/// `POST /mcp`.
fn federated_stack(proxy: &Arc<Proxy>) -> impl Next<Request<AgentBody>, Response<BoxBody>> {
    ServiceBuilder::new()
        // A bounded body: the mesh reads every message it answers or routes.
        .layer(Stage(ReadBody { limit: MAX_REQUEST }))
        // The transport rules of both generations; errors name the request's id from here.
        .layer(Stage(federated::Classify))
        // Legacy sessions: initialize mints one, everything else must carry a live one.
        .layer(Stage(sessions::SessionLayer::new(proxy.clone())))
        // 2025-03-26 batches: each request through the layers below, answered as one array.
        .layer(Stage(federated::Batch))
        // The mesh is the server: initialize, ping, the lists.
        .layer(Stage(federated::LocalAnswers::new(proxy.clone())))
        .service(Terminal(federated::Dispatch {
            tool_call: ServiceBuilder::new()
                // The hop's client span when sampled: to the response's last byte.
                .layer(Stage(trace::ClientSpan::new(proxy.clone())))
                // The mesh's own id at the provider; the response mapped back to the client.
                .layer(Stage(tool_call::Relay::new(proxy.clone())))
                // Capability → ranked endpoints (or the instance a requestState names).
                .layer(Stage(tool_call::Resolve::new(proxy.clone())))
                .service(forward::stack(proxy)),
            // Answers to providers' requests and cancellations: to the instance concerned.
            message: ServiceBuilder::new()
                .layer(Stage(message::ToProvider::new(proxy.clone())))
                .service(forward::stack(proxy)),
        }))
}

/// `/capabilities/<capability>/mcp`.
fn passthrough_stack(proxy: &Arc<Proxy>) -> impl Next<Request<AgentBody>, Response<BoxBody>> {
    ServiceBuilder::new()
        // Bounded, so that it can be authorized on the other side and sent again.
        .layer(Stage(ReadBody { limit: MAX_REQUEST }))
        // The hop's client span when sampled: to the response's last byte.
        .layer(Stage(trace::ClientSpan::new(proxy.clone())))
        // Sealed sessions and requestStates → the instance; else the capability's endpoints.
        .layer(Stage(passthrough::Passthrough::new(proxy.clone())))
        .service(forward::stack(proxy))
}

/// Sends each request to the stack its method and path name.
#[derive(Debug, Clone)]
struct Router<F, L, P> {
    federated: F,
    sessions: L,
    passthrough: P,
}

impl<F, L, P> Handler<Request<AgentBody>> for Router<F, L, P>
where
    F: Next<Request<AgentBody>, Response<BoxBody>>,
    L: Next<Request<AgentBody>, Response<BoxBody>>,
    P: Next<Request<AgentBody>, Response<BoxBody>>,
{
    type Response = Response<BoxBody>;
    fn serve(self, req: Request<AgentBody>) -> impl Handled<Response<BoxBody>> {
        let path = req.uri().path();
        if path == "/mcp" {
            return match *req.method() {
                Method::POST => Either::Left(Either::Left(call(self.federated, req))),
                Method::GET | Method::DELETE => {
                    Either::Left(Either::Right(call(self.sessions, req)))
                }
                _ => Either::Right(Either::Right(refuse(ProxyError::MethodNotAllowed(
                    "use POST (GET and DELETE for legacy sessions)",
                )))),
            };
        }
        if passthrough::capability_in_path(path).is_some() {
            return Either::Right(Either::Left(call(self.passthrough, req)));
        }
        Either::Right(Either::Right(refuse(ProxyError::NotFound(
            "the mesh is at /mcp; one capability's provider, unchanged, at /capabilities/<capability>/mcp",
        ))))
    }
}

/// Serves the outbound listener (plain HTTP on loopback, and the connections transparent mode
/// redirects) until `drain`, then lets connections finish (bounded by `grace`). Each worker
/// thread runs one, on its own handle to the listener, all sharing the listener's `gate`.
pub async fn serve(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    gate: crate::serve::Gate,
    limits: Limits,
    drain: watch::Receiver<bool>,
    grace: Duration,
) {
    let svc = stack(&proxy);
    let connection = |tcp: tokio::net::TcpStream| {
        let (proxy, svc, drain) = (proxy.clone(), svc.clone(), drain.clone());
        async move {
            // Redirected here by `capmesh-proxy init`'s rules: the agent dialled another address.
            if let Some(dst) = transparent::original_dst(&tcp) {
                transparent::serve(proxy, tcp, dst, limits, drain).await;
            } else {
                crate::serve::h1::connection(tcp, svc, limits, drain, MAX_REQUEST).await;
            }
        }
    };
    crate::serve::accept("outbound", listener, gate, drain.clone(), grace, connection).await;
}

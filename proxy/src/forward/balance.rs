//! The balancer: picks the endpoint of each attempt by power of two choices over peak-EWMA
//! within the best rank that has an endpoint left ([`crate::balance::pick`]), skipping those
//! already tried, and feeds the outcome to the endpoint's breaker and latency estimate (less
//! any wait for the connection to open: [`crate::pool::ConnectWait`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use capmesh_api::Endpoint;
use http::{Response, StatusCode};

use super::{Call, Target};
use crate::Proxy;
use crate::balance::{Outcome, pick};
use crate::contract::ERROR_HEADER;
use crate::error::ProxyError;
use crate::pool::{ConnectWait, PeerBody, Warming};
use crate::stack::{Handled, Middleware, Next, call};

/// One attempt of a call: the call and the endpoint chosen for it.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// The call.
    pub call: Call,
    /// Where this attempt goes.
    pub endpoint: Arc<Endpoint>,
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct Balance {
    proxy: Arc<Proxy>,
}

impl Balance {
    /// Balancing over `proxy`'s routing table and endpoint state.
    pub fn new(proxy: Arc<Proxy>) -> Self {
        Self { proxy }
    }
}

/// How an attempt ended, for the endpoint's latency estimate and breaker.
fn outcome(result: &Result<Response<PeerBody>, ProxyError>) -> Outcome {
    match result {
        Ok(resp) => match resp.status() {
            StatusCode::TOO_MANY_REQUESTS => Outcome::Overloaded,
            // The provider's proxy could not hand the request to its agent.
            StatusCode::SERVICE_UNAVAILABLE if resp.headers().contains_key(ERROR_HEADER) => {
                Outcome::Unavailable
            }
            s if s.is_server_error() => Outcome::ServerError,
            _ => Outcome::Success,
        },
        Err(e) if !e.may_have_reached_agent() => Outcome::Unavailable,
        Err(_) => Outcome::ServerError,
    }
}

impl<S> Middleware<Call, S> for Balance
where
    S: Next<Attempt, Response<PeerBody>>,
{
    type Response = Response<PeerBody>;

    fn handle(self, req: Call, next: S) -> impl Handled<Response<PeerBody>> {
        let proxy = self.proxy;
        async move {
            let routing = proxy.routing.load_full();
            let pinned;
            let ranks: &[Vec<Arc<Endpoint>>] = match &req.target {
                Target::Ranked { ranks, .. } => ranks,
                Target::Pinned(ep) => {
                    pinned = [vec![ep.clone()]];
                    &pinned
                }
            };
            let tried = req.attempts.tried();
            let Some(endpoint) =
                pick(ranks, &|id| routing.stats(id), &tried, Instant::now()).cloned()
            else {
                return Err(ProxyError::Exhausted {
                    capability: req.label.clone(),
                    tried: tried.len(),
                    last: req
                        .attempts
                        .last_error()
                        .unwrap_or_else(|| "no endpoint left to try".to_owned()),
                });
            };
            req.attempts.push(endpoint.id.clone());
            let in_flight = routing.stats(&endpoint.id).map(|s| s.start());
            drop(routing);
            let attempt = Attempt {
                call: req.clone(),
                endpoint: endpoint.clone(),
            };
            let result = call(next, attempt).await;
            let outcome = outcome(&result);
            let extensions = result.as_ref().ok().map(Response::extensions);
            let setup = extensions
                .and_then(|e| e.get::<ConnectWait>())
                .map_or(Duration::ZERO, |w| w.0);
            let sampled = extensions.is_none_or(|e| e.get::<Warming>().is_none());
            if let Some(in_flight) = in_flight
                && in_flight.finish(outcome, setup, sampled)
            {
                proxy
                    .metrics
                    .ejections
                    .with_label_values(&[req.label.as_str()])
                    .inc();
                tracing::info!(
                    capability = %req.label,
                    endpoint = %endpoint.id,
                    "endpoint ejected after consecutive failures"
                );
            }
            match result {
                Ok(mut resp) => {
                    if outcome == Outcome::Success && !tried.is_empty() {
                        proxy
                            .metrics
                            .failovers
                            .with_label_values(&[req.label.as_str()])
                            .inc();
                    }
                    if outcome == Outcome::Unavailable {
                        req.attempts
                            .failed(format!("{} answered 503", endpoint.identity));
                    }
                    resp.body_mut().set_served(endpoint);
                    Ok(resp)
                }
                Err(e) => {
                    req.attempts.failed(e.to_string());
                    Err(e)
                }
            }
        }
    }
}

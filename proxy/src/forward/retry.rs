//! The one retry policy of the mesh: every outbound path (federated calls, passthrough,
//! transparent mode) retries through it, and nothing else retries.
//!
//! A failed attempt is sent again, to another endpoint, when
//! * it cannot have reached an agent — connect refused or reset, TLS failure, the connection
//!   failed before the request was written, the peer refused the stream unprocessed, or the
//!   provider's proxy answered with the mesh's own 503 — whatever the method; or
//! * it may have reached one (a reset after sending, a 502/504, the agent's own 503) and the
//!   method is safe to repeat (`tools/list`, `initialize`, other reads);
//!
//! and the retry budget has a retry left, and fewer than [`MAX_ATTEMPTS`] were made. A
//! `tools/call` that may have run is never repeated: the caller gets the failure.
//!
//! (The inbound side's re-initialize after an agent answers 404 to a stale session is not a
//! retry: the agent refused the session before running anything; see `inbound::agent`.)

use std::future::Ready;
use std::marker::PhantomData;
use std::sync::Arc;

use http::{Response, StatusCode};
use prometheus::IntCounterVec;

use super::Call;
use crate::balance::RetryBudget;
use crate::contract::ERROR_HEADER;
use crate::error::ProxyError;
use crate::pool::PeerBody;
use crate::stack::{Handled, Middleware, Next, call};

/// Attempts per call, the first included.
pub const MAX_ATTEMPTS: usize = 3;

/// How an attempt failed, as far as repeating it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// It certainly did not reach an agent.
    Unreached,
    /// It may have reached an agent.
    MaybeReached,
    /// Nothing to retry: a success, an answer to pass on, or no endpoint left.
    Final,
}

impl Failure {
    /// Sorts an attempt's result.
    pub fn of<B>(result: &Result<Response<B>, ProxyError>) -> Failure {
        match result {
            Ok(resp) => {
                let mesh = resp.headers().contains_key(ERROR_HEADER);
                match resp.status() {
                    // The mesh answers 503 only for what did not reach an agent.
                    StatusCode::SERVICE_UNAVAILABLE if mesh => Failure::Unreached,
                    StatusCode::SERVICE_UNAVAILABLE
                    | StatusCode::BAD_GATEWAY
                    | StatusCode::GATEWAY_TIMEOUT => Failure::MaybeReached,
                    _ => Failure::Final,
                }
            }
            Err(e) => match e.inner() {
                ProxyError::Peer { .. }
                | ProxyError::AgentUnreachable(_)
                | ProxyError::AgentFailed(_) => {
                    if e.may_have_reached_agent() {
                        Failure::MaybeReached
                    } else {
                        Failure::Unreached
                    }
                }
                _ => Failure::Final,
            },
        }
    }
}

/// Whether to try again: the policy's whole decision, apart from the mechanism.
pub fn decide(
    failure: Failure,
    safe: bool,
    attempts: usize,
    budget: impl FnOnce() -> bool,
) -> bool {
    let worth_it = match failure {
        Failure::Unreached => true,
        Failure::MaybeReached => safe,
        Failure::Final => false,
    };
    worth_it && attempts < MAX_ATTEMPTS && budget()
}

/// The [`tower::retry::Policy`] (see the module docs).
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    budget: Arc<RetryBudget>,
    retries: Option<IntCounterVec>,
}

impl RetryPolicy {
    /// Retrying within `budget`, counting retries by capability in `retries`.
    pub fn new(budget: Arc<RetryBudget>, retries: Option<IntCounterVec>) -> Self {
        Self { budget, retries }
    }
}

impl<B> tower::retry::Policy<Call, Response<B>, ProxyError> for RetryPolicy {
    type Future = Ready<()>;

    fn retry(
        &mut self,
        req: &mut Call,
        result: &mut Result<Response<B>, ProxyError>,
    ) -> Option<Ready<()>> {
        let failure = Failure::of(result);
        let again = decide(failure, req.safe, req.attempts.count(), || {
            self.budget.try_withdraw()
        });
        if !again {
            if failure != Failure::Final && result.is_err() {
                tracing::debug!(capability = %req.label, ?failure, safe = req.safe, "not retried");
            }
            return None;
        }
        if let Some(retries) = &self.retries {
            retries.with_label_values(&[req.label.as_str()]).inc();
        }
        Some(std::future::ready(()))
    }

    fn clone_request(&mut self, req: &Call) -> Option<Call> {
        Some(req.clone())
    }
}

/// Drives a [`tower::retry::Policy`] inside the request's one future (see `crate::stack`):
/// tower's own `Retry` service needs the future of the service below it by name, and a
/// stack's futures have none. `B` is the body of the answers it passes on.
#[derive(Debug)]
pub struct Retry<P, B = PeerBody> {
    policy: P,
    body: PhantomData<fn() -> B>,
}

impl<P, B> Retry<P, B> {
    /// Retrying as `policy` decides.
    pub fn new(policy: P) -> Self {
        Self {
            policy,
            body: PhantomData,
        }
    }
}

impl<P: Clone, B> Clone for Retry<P, B> {
    fn clone(&self) -> Self {
        Self::new(self.policy.clone())
    }
}

impl<P, S, B> Middleware<Call, S> for Retry<P, B>
where
    P: tower::retry::Policy<Call, Response<B>, ProxyError> + Clone + Send + Sync + 'static,
    P::Future: Send,
    S: Next<Call, Response<B>>,
    B: Send + 'static,
{
    type Response = Response<B>;

    fn handle(self, mut req: Call, next: S) -> impl Handled<Response<B>> {
        let mut policy = self.policy;
        async move {
            loop {
                // A `Call` is shared, not copied: each attempt sees what the earlier ones
                // recorded (`Attempts`), which is how the balancer skips their endpoints.
                let again = policy.clone_request(&req);
                let mut result = call(next.clone(), req).await;
                let Some(mut again) = again else {
                    return result;
                };
                let Some(backoff) = policy.retry(&mut again, &mut result) else {
                    return result;
                };
                backoff.await;
                req = again;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use bytes::Bytes;
    use capmesh_api::EndpointId;
    use http::{HeaderMap, HeaderValue, Method};

    use super::*;
    use crate::forward::{Attempts, CallSpec, Target, Upstream};
    use crate::pool::PeerError;

    /// Each way an attempt can end, and what it is.
    fn kinds() -> Vec<(&'static str, Failure)> {
        vec![
            ("connect refused", Failure::Unreached),
            ("tls failure", Failure::Unreached),
            ("mesh 503", Failure::Unreached),
            ("refused stream", Failure::Unreached),
            ("reset after sending", Failure::MaybeReached),
            ("agent 503", Failure::MaybeReached),
            ("mesh 502", Failure::MaybeReached),
            ("200", Failure::Final),
            ("403 denied", Failure::Final),
            ("no endpoint left", Failure::Final),
        ]
    }

    fn result(kind: &str) -> Result<Response<()>, ProxyError> {
        let peer = |source| {
            Err(ProxyError::Peer {
                endpoint: "x".into(),
                source,
            })
        };
        let status = |code: u16, mesh: bool| {
            let mut r = Response::new(());
            *r.status_mut() = StatusCode::from_u16(code).unwrap();
            if mesh {
                r.headers_mut()
                    .insert(ERROR_HEADER, HeaderValue::from_static("x"));
            }
            Ok(r)
        };
        match kind {
            "connect refused" => peer(PeerError::Connect {
                addr: "a".into(),
                source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
            }),
            "tls failure" => peer(PeerError::Tls {
                addr: "a".into(),
                detail: "unknown CA".into(),
            }),
            "reset after sending" => peer(PeerError::Reset {
                addr: "a".into(),
                source: h2::Error::from(h2::Reason::CANCEL),
            }),
            "refused stream" => peer(PeerError::Refused {
                addr: "a".into(),
                source: h2::Error::from(h2::Reason::REFUSED_STREAM),
            }),
            "mesh 503" => status(503, true),
            "agent 503" => status(503, false),
            "mesh 502" => status(502, true),
            "200" => status(200, false),
            "403 denied" => status(403, true),
            "no endpoint left" => Err(ProxyError::Exhausted {
                capability: "c".into(),
                tried: 2,
                last: "x".into(),
            }),
            other => panic!("{other}"),
        }
    }

    #[test]
    fn failures_are_sorted_by_whether_they_can_have_reached_an_agent() {
        for (kind, want) in kinds() {
            assert_eq!(Failure::of(&result(kind)), want, "{kind}");
        }
    }

    #[test]
    fn the_decision_table() {
        // failure × safe/unsafe × budget left → retry?
        let table = [
            (Failure::Unreached, false, true, true),
            (Failure::Unreached, true, true, true),
            (Failure::Unreached, false, false, false),
            (Failure::Unreached, true, false, false),
            (Failure::MaybeReached, false, true, false),
            (Failure::MaybeReached, true, true, true),
            (Failure::MaybeReached, true, false, false),
            (Failure::MaybeReached, false, false, false),
            (Failure::Final, false, true, false),
            (Failure::Final, true, true, false),
        ];
        for (failure, safe, budget, want) in table {
            assert_eq!(
                decide(failure, safe, 1, || budget),
                want,
                "{failure:?} safe={safe} budget={budget}"
            );
        }
        // Never beyond MAX_ATTEMPTS, budget or not.
        assert!(!decide(Failure::Unreached, true, MAX_ATTEMPTS, || true));
        // The budget is not touched when there is nothing to retry.
        assert!(!decide(Failure::Final, true, 1, || panic!("budget asked")));
    }

    fn call_of(safe: bool) -> Call {
        Call(Arc::new(CallSpec {
            target: Target::Ranked {
                ranks: Arc::new(vec![]),
            },
            upstream: Upstream::Message,
            method: Method::POST,
            headers: HeaderMap::new(),
            body: Bytes::new(),
            safe,
            timeout: Duration::from_secs(1),
            label: "cap".into(),
            attempts: Attempts::default(),
        }))
    }

    /// The policy in the retry layer in front of a fake that fails `failures` times with
    /// `kind`, then answers 200. Returns the attempts made and the final status.
    async fn run(
        kind: &'static str,
        failures: usize,
        safe: bool,
        budget: RetryBudget,
    ) -> (usize, u16) {
        let made = Arc::new(AtomicUsize::new(0));
        let counter = made.clone();
        let fake = crate::stack::service_fn(move |c: Call| {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            c.attempts.push(EndpointId(format!("ep{n}")));
            async move {
                if n < failures {
                    result(kind).map(|r| r.map(|()| ()))
                } else {
                    result("200")
                }
            }
        });
        let policy = RetryPolicy::new(Arc::new(budget), None);
        let status = match Retry::<_, ()>::new(policy)
            .handle(call_of(safe), fake)
            .await
        {
            Ok(r) => r.status().as_u16(),
            Err(e) => e.status().as_u16(),
        };
        (made.load(Ordering::SeqCst), status)
    }

    #[tokio::test]
    async fn the_policy_in_the_retry_layer_against_a_fake() {
        let plenty = || RetryBudget::new(100, 100);
        let none = || RetryBudget::new(0, 0);
        // Unreached: retried whatever the method, until it works.
        assert_eq!(run("connect refused", 1, false, plenty()).await, (2, 200));
        assert_eq!(run("mesh 503", 2, false, plenty()).await, (3, 200));
        // At most MAX_ATTEMPTS.
        assert_eq!(run("mesh 503", 5, true, plenty()).await, (3, 503));
        // Without budget, the failure is the answer.
        assert_eq!(run("connect refused", 1, true, none()).await, (1, 503));
        // May have reached the agent: only safe methods go again.
        assert_eq!(run("agent 503", 1, false, plenty()).await, (1, 503));
        assert_eq!(run("agent 503", 1, true, plenty()).await, (2, 200));
        assert_eq!(run("mesh 502", 1, false, plenty()).await, (1, 502));
        // Answers are answers.
        assert_eq!(run("403 denied", 1, true, plenty()).await, (1, 403));
    }
}

//! Per-attempt metrics: latency to response headers and the outcome, by capability.

use std::sync::Arc;
use std::time::Instant;

use http::Response;

use super::balance::Attempt;
use crate::Proxy;
use crate::pool::PeerBody;
use crate::stack::{Handled, Middleware, Next, call};

/// See the module docs.
#[derive(Debug, Clone)]
pub struct Observe {
    proxy: Arc<Proxy>,
}

impl Observe {
    /// Counting into `proxy`'s metrics.
    pub fn new(proxy: Arc<Proxy>) -> Self {
        Self { proxy }
    }
}

impl<S> Middleware<Attempt, S> for Observe
where
    S: Next<Attempt, Response<PeerBody>>,
{
    type Response = Response<PeerBody>;

    fn handle(self, req: Attempt, next: S) -> impl Handled<Response<PeerBody>> {
        let proxy = self.proxy;
        async move {
            // The call itself (one pointer), not a copy of its label.
            let spec = req.call.clone();
            let label = spec.label.as_str();
            let t0 = Instant::now();
            let result = call(next, req).await;
            let m = &proxy.metrics;
            match &result {
                Ok(resp) => m.answered(label, resp.status(), t0.elapsed()),
                Err(e) => m
                    .responses
                    .with_label_values(&[label, e.status().as_str(), e.label()])
                    .inc(),
            }
            result
        }
    }
}

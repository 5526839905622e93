//! The caller's deadline (`x-capmesh-timeout`, else the mesh default): it covers every attempt
//! up to response headers. A streamed response is never cut by it.

use futures_util::FutureExt;
use http::Response;

use super::Call;
use crate::error::ProxyError;
use crate::pool::PeerBody;
use crate::stack::{Handled, Middleware, Next, call};

/// See the module docs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Deadline;

impl<S> Middleware<Call, S> for Deadline
where
    S: Next<Call, Response<PeerBody>>,
{
    type Response = Response<PeerBody>;

    fn handle(self, req: Call, next: S) -> impl Handled<Response<PeerBody>> {
        let after = req.timeout;
        tokio::time::timeout(after, call(next, req))
            .map(move |answer| answer.unwrap_or(Err(ProxyError::Timeout { after })))
    }
}

//! The pieces every listener's stack is built from: a layer written as one async function
//! ([`Middleware`], turned into a tower [`Layer`] by [`Stage`]), the [`Respond`] layer that
//! turns errors into responses at the top, and [`ReadBody`], which reads a bounded body.
//!
//! Every service on the request path is always ready (`poll_ready` returns at once): limits
//! are enforced per connection and per request, not by back-pressure between layers. So a
//! layer may clone its inner service for each request.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Limited};
use tower::{Layer, Service};

use crate::BoxBody;
use crate::error::ProxyError;

/// A boxed, sendable future: what each layer's service returns.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What a layer's inner service must be: ready at once, cloneable, answering `Res` or a
/// [`ProxyError`].
pub trait Next<Req, Res>:
    Service<Req, Response = Res, Error = ProxyError, Future: Send> + Clone + Send + Sync + 'static
{
}

impl<T, Req, Res> Next<Req, Res> for T where
    T: Service<Req, Response = Res, Error = ProxyError, Future: Send>
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// Calls `next` with `req`. Every service on the request path is always ready (see the module
/// docs), so `poll_ready` is not awaited: a tower `Oneshot` here would add one more future to
/// poll through, per layer, on every wake-up of every request.
pub fn call<S, Req, Res>(mut next: S, req: Req) -> S::Future
where
    S: Next<Req, Res>,
{
    next.call(req)
}

/// What a layer's [`Middleware::handle`] returns.
pub type Handled<R> = BoxFuture<Result<R, ProxyError>>;

/// One layer of a stack, written as one async function of the request and the next service.
pub trait Middleware<Req, S>: Clone + Send + Sync + 'static {
    /// What the layer answers.
    type Response;
    /// Handles `req`, calling `next` when the request goes on.
    fn handle(&self, req: Req, next: S) -> Handled<Self::Response>;
}

/// A [`Middleware`] in front of the service `S`, which it holds [`Shared`]: cloning a layer
/// (once per request) copies its middleware and one pointer, not the whole rest of the stack.
#[derive(Debug, Clone)]
pub struct Layered<M, S> {
    middleware: M,
    inner: Shared<S>,
}

/// The rest of a stack behind one pointer; cloned per call, it copies only the layer it holds.
#[derive(Debug)]
pub struct Shared<S>(Arc<S>);

impl<S> Clone for Shared<S> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<S, Req> Service<Req> for Shared<S>
where
    S: Service<Req> + Clone,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        // Every service on the request path is always ready (see the module docs).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        S::clone(&self.0).call(req)
    }
}

impl<M, S, Req> Service<Req> for Layered<M, S>
where
    M: Middleware<Req, Shared<S>>,
    S: Clone,
{
    type Response = M::Response;
    type Error = ProxyError;
    type Future = BoxFuture<Result<M::Response, ProxyError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        self.middleware.handle(req, self.inner.clone())
    }
}

/// A service at the end of a stack, or where it forks, written as one async function of the
/// request. [`Terminal`] makes it a tower service.
pub trait Handler<Req>: Clone + Send + Sync + 'static {
    /// What it answers.
    type Response;
    /// Answers `req`.
    fn serve(&self, req: Req) -> Handled<Self::Response>;
}

/// The tower [`Service`] of an [`Handler`]: always ready (see the module docs).
#[derive(Debug, Clone)]
pub struct Terminal<E>(pub E);

impl<E, Req> Service<Req> for Terminal<E>
where
    E: Handler<Req>,
{
    type Response = E::Response;
    type Error = ProxyError;
    type Future = Handled<E::Response>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        self.0.serve(req)
    }
}

/// The tower [`Layer`] of a [`Middleware`].
#[derive(Debug, Clone)]
pub struct Stage<M>(pub M);

impl<M: Clone, S> Layer<S> for Stage<M> {
    type Service = Layered<M, S>;
    fn layer(&self, inner: S) -> Layered<M, S> {
        Layered {
            middleware: self.0.clone(),
            inner: Shared(Arc::new(inner)),
        }
    }
}

/// The top of every stack: turns a [`ProxyError`] into its response, in exactly one place
/// ([`ProxyError::into_response`]), so that hyper only ever sees responses.
#[derive(Debug, Clone, Copy, Default)]
pub struct RespondLayer;

impl<S> Layer<S> for RespondLayer {
    type Service = Respond<S>;
    fn layer(&self, inner: S) -> Respond<S> {
        Respond { inner }
    }
}

/// See [`RespondLayer`].
#[derive(Debug, Clone)]
pub struct Respond<S> {
    inner: S,
}

impl<S, Req> Service<Req> for Respond<S>
where
    S: Next<Req, Response<BoxBody>>,
    Req: Send + 'static,
{
    type Response = Response<BoxBody>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<BoxBody>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move {
            Ok(match call(inner, req).await {
                Ok(resp) => resp,
                Err(e) => {
                    tracing::debug!(error = %e, label = e.label(), "request refused or failed");
                    e.into_response()
                }
            })
        })
    }
}

/// Reads the request body whole, refusing more than `limit` bytes (413): the mesh reads every
/// request it routes or authorizes, and a bounded body is also what makes a request safe to
/// send again.
#[derive(Debug, Clone, Copy)]
pub struct ReadBody {
    /// The most bytes accepted.
    pub limit: usize,
}

impl<S, B> Middleware<Request<B>, S> for ReadBody
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<crate::BoxError>,
    S: Next<Request<Bytes>, Response<BoxBody>>,
{
    type Response = Response<BoxBody>;

    fn handle(&self, req: Request<B>, next: S) -> Handled<Response<BoxBody>> {
        let limit = self.limit;
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let body = read_body(body, limit).await?;
            call(next, Request::from_parts(parts, body)).await
        })
    }
}

/// Reads `body` whole, at most `limit` bytes.
pub async fn read_body<B>(body: B, limit: usize) -> Result<Bytes, ProxyError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<crate::BoxError>,
{
    match Limited::new(body, limit).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(ProxyError::TooLarge { limit })
        }
        Err(e) => Err(ProxyError::BodyUnreadable(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use http_body_util::Full;
    use tower::{ServiceBuilder, ServiceExt};

    use super::*;
    use crate::boxed;

    #[tokio::test]
    async fn oversize_bodies_get_413_and_errors_become_responses_at_the_top() {
        let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = seen.clone();
        let svc = ServiceBuilder::new()
            .layer(RespondLayer)
            .layer(Stage(ReadBody { limit: 8 }))
            .service(tower::service_fn(move |req: Request<Bytes>| {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let n = req.body().len();
                async move {
                    Ok::<_, ProxyError>(Response::new(boxed(Full::new(Bytes::from(n.to_string())))))
                }
            }));
        let small = Request::new(Full::new(Bytes::from_static(b"12345678")));
        let resp = svc.clone().oneshot(small).await.unwrap();
        assert_eq!(resp.status(), 200);
        let big = Request::new(Full::new(Bytes::from_static(b"123456789")));
        let resp = svc.oneshot(big).await.unwrap();
        assert_eq!(resp.status(), 413);
        assert_eq!(resp.headers()[crate::contract::ERROR_HEADER], "too_large");
        assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}

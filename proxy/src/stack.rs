//! The pieces every listener's stack is built from: a layer written as one async function
//! ([`Middleware`], turned into a tower [`Layer`] by [`Stage`]), the [`Respond`] layer that
//! turns errors into responses at the top, and [`ReadBody`], which reads a bounded body.
//!
//! Every service on the request path is always ready: limits are enforced per connection and
//! per request, not by back-pressure between layers. So a layer is cloned for each request, and
//! the services of a stack are [`Next`]s, not tower services: a call is one method, with no
//! `poll_ready`.
//!
//! A request's whole way down a stack is one future. Each layer's future holds the next
//! layer's inline, so the compiler sees the stack as one state machine: no allocation and no
//! dynamic call per layer. Only [`Respond`], at the top, boxes it once, for hyper.
//!
//! On the request path a layer does its own work before it calls the next layer, and returns
//! the next layer's future as it is ([`Either`] where it may answer itself), or wrapped in
//! `map` or `then` for what it does with the answer. An `async` block would keep room for the
//! request it captured all its life, beside the next layer's future, so every layer would add
//! the size of its request to each call's future, which is moved into its parent as each
//! layer starts and into the box at the top (benches/RESULTS.md, "Futures without the
//! request").

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::FutureExt;
pub use futures_util::future::Either;
use http::{Request, Response};
use http_body_util::{BodyExt, Limited};
use tower::{Layer, Service};

use crate::BoxBody;
use crate::error::ProxyError;

/// A boxed, sendable future: what the top of a stack hands to hyper.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What a layer's [`Middleware::handle`], a [`Handler::serve`] and a [`Next::call`] return: a
/// sendable future of the answer or a [`ProxyError`].
pub trait Handled<R>: Future<Output = Result<R, ProxyError>> + Send + 'static {}

impl<F, R> Handled<R> for F where F: Future<Output = Result<R, ProxyError>> + Send + 'static {}

/// A service on the request path: what a layer calls when the request goes on. Always ready
/// (see the module docs); cloned for each request, so a clone should be cheap.
pub trait Next<Req, Res>: Clone + Send + Sync + 'static {
    /// Answers `req`.
    fn call(self, req: Req) -> impl Handled<Res>;
}

/// Calls `next` with `req`.
pub fn call<S, Req, Res>(next: S, req: Req) -> impl Handled<Res>
where
    S: Next<Req, Res>,
{
    next.call(req)
}

/// One layer of a stack, written as one async function of the request and the next service.
pub trait Middleware<Req, S>: Clone + Send + Sync + 'static {
    /// What the layer answers.
    type Response;
    /// Handles `req`, calling `next` when the request goes on.
    fn handle(self, req: Req, next: S) -> impl Handled<Self::Response>;
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

impl<S, Req, Res> Next<Req, Res> for Shared<S>
where
    S: Next<Req, Res>,
{
    fn call(self, req: Req) -> impl Handled<Res> {
        S::clone(&self.0).call(req)
    }
}

impl<M, S, Req> Next<Req, M::Response> for Layered<M, S>
where
    M: Middleware<Req, Shared<S>>,
    S: Clone + Send + Sync + 'static,
{
    fn call(self, req: Req) -> impl Handled<M::Response> {
        self.middleware.handle(req, self.inner)
    }
}

/// A service at the end of a stack, or where it forks, written as one async function of the
/// request. [`Terminal`] makes it a [`Next`].
pub trait Handler<Req>: Clone + Send + Sync + 'static {
    /// What it answers.
    type Response;
    /// Answers `req`.
    fn serve(self, req: Req) -> impl Handled<Self::Response>;
}

/// The [`Next`] of a [`Handler`].
#[derive(Debug, Clone)]
pub struct Terminal<E>(pub E);

impl<E, Req> Next<Req, E::Response> for Terminal<E>
where
    E: Handler<Req>,
{
    fn call(self, req: Req) -> impl Handled<E::Response> {
        self.0.serve(req)
    }
}

/// The future of an answer a layer gives without calling the next one: an error.
pub fn refuse<R>(e: ProxyError) -> std::future::Ready<Result<R, ProxyError>> {
    std::future::ready(Err(e))
}

/// A [`Next`] of an async function, for tests and small ends of a stack.
pub fn service_fn<F>(f: F) -> ServiceFn<F> {
    ServiceFn(f)
}

/// See [`service_fn`].
#[derive(Debug, Clone)]
pub struct ServiceFn<F>(F);

impl<F, Fut, Req, Res> Next<Req, Res> for ServiceFn<F>
where
    F: Fn(Req) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Res, ProxyError>> + Send + 'static,
{
    fn call(self, req: Req) -> impl Handled<Res> {
        (self.0)(req)
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

    fn handle(self, req: Request<B>, next: S) -> impl Handled<Response<BoxBody>> {
        let (parts, body) = req.into_parts();
        read_body(body, self.limit).then(move |read| match read {
            Ok(body) => Either::Left(call(next, Request::from_parts(parts, body))),
            Err(e) => Either::Right(refuse(e)),
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
            .service(service_fn(move |req: Request<Bytes>| {
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

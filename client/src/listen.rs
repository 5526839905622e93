//! Limits every capmesh HTTP listener applies, so a slow or greedy client cannot hold a
//! listener's resources: a cap on open connections, a deadline for request headers (HTTP/1) and
//! for the first request of a connection (both protocols, before hyper knows which one it is),
//! an idle timeout (no request in flight), HTTP/2 keepalive pings and a cap on concurrent
//! HTTP/2 streams.
//!
//! The control plane's listeners and the proxy's use the same pieces: [`ConnectionCap`] at
//! accept, then [`serve`] for each admitted connection.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

/// What a listener allows one client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Open connections at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Time for a client to send a request's headers (HTTP/1), and for the first request of
    /// a connection to arrive (either protocol).
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed gracefully.
    pub idle_timeout: Duration,
    /// Concurrent HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// HTTP/2 keepalive ping interval; a peer that does not answer within twice this is gone.
    pub keepalive_interval: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            max_concurrent_streams: 128,
            keepalive_interval: Duration::from_secs(10),
        }
    }
}

/// Counts a listener's open connections and refuses those over the limit.
#[derive(Debug, Clone)]
pub struct ConnectionCap {
    permits: Arc<Semaphore>,
}

/// An admitted connection's place under the cap, given back when dropped.
#[derive(Debug)]
pub struct Admitted(#[allow(dead_code)] OwnedSemaphorePermit);

impl ConnectionCap {
    /// A cap of `max` open connections (at least one).
    pub fn new(max: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max.max(1))),
        }
    }

    /// A place for one more connection, or `None` when the listener is full: the caller
    /// closes the connection and counts the refusal.
    pub fn try_admit(&self) -> Option<Admitted> {
        self.permits.clone().try_acquire_owned().ok().map(Admitted)
    }
}

/// In-flight requests of one connection (a request counts until its response body is done or
/// dropped, so a streaming response is not idle) and whether any arrived yet.
#[derive(Debug, Clone)]
struct Activity(Arc<watch::Sender<(usize, bool)>>);

#[derive(Debug)]
struct InFlight(Activity);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.0.send_modify(|(n, _)| *n = n.saturating_sub(1));
    }
}

impl Activity {
    fn new() -> Self {
        Self(Arc::new(watch::channel((0, false)).0))
    }

    fn enter(&self) -> InFlight {
        self.0.send_modify(|(n, seen)| {
            *n += 1;
            *seen = true;
        });
        InFlight(self.clone())
    }

    /// Resolves when no request has been in flight for `timeout`.
    async fn idle_for(&self, timeout: Duration) {
        let mut rx = self.0.subscribe();
        loop {
            let active = rx.borrow_and_update().0;
            if active == 0 {
                tokio::select! {
                    _ = tokio::time::sleep(timeout) => return,
                    _ = rx.changed() => {}
                }
            } else if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Resolves if no request arrived within `timeout` of the connection's start.
    async fn no_first_request(&self, timeout: Duration) {
        let mut rx = self.0.subscribe();
        let arrived = tokio::time::timeout(timeout, rx.wait_for(|(_, seen)| *seen))
            .await
            .is_ok_and(|r| r.is_ok());
        if arrived {
            std::future::pending::<()>().await;
        }
    }
}

/// A response body that keeps its request counted as in flight until it is done or dropped.
#[derive(Debug)]
pub struct Tracked<B> {
    inner: B,
    _in_flight: InFlight,
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The hyper builder with `limits` applied to both protocols.
pub fn builder(limits: &Limits) -> hyper_util::server::conn::auto::Builder<TokioExecutor> {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .keep_alive_interval(Some(limits.keepalive_interval))
        .keep_alive_timeout(limits.keepalive_interval * 2);
    builder
}

/// Why a connection ended early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// It ran to its end (the client closed, or an error the caller may log).
    Done,
    /// No request arrived in time: closed.
    NoRequest,
    /// No request was in flight for the idle timeout: closed gracefully.
    Idle,
}

/// Serves one admitted connection with `limits`: HTTP/1.1 or HTTP/2 (by ALPN or preface), the
/// header and first-request deadlines, and the idle timeout. `handle` answers each request.
pub async fn serve<I, F, Fut, B>(io: I, limits: Limits, handle: F) -> Ended
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let activity = Activity::new();
    let svc = {
        let activity = activity.clone();
        hyper::service::service_fn(move |req| {
            let in_flight = activity.enter();
            let answer = handle(req);
            async move {
                let resp = answer.await;
                Ok::<_, Infallible>(resp.map(|inner| Tracked {
                    inner,
                    _in_flight: in_flight,
                }))
            }
        })
    };
    let builder = builder(&limits);
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            return Ended::Done;
        }
        _ = activity.no_first_request(limits.header_read_timeout) => return Ended::NoRequest,
        _ = activity.idle_for(limits.idle_timeout) => conn.as_mut().graceful_shutdown(),
    }
    // Let a response being written finish, but not for ever.
    let _ = tokio::time::timeout(limits.header_read_timeout, conn).await;
    Ended::Idle
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn listener(limits: Limits) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cap = ConnectionCap::new(limits.max_connections);
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let Some(admitted) = cap.try_admit() else {
                    drop(tcp);
                    continue;
                };
                tokio::spawn(async move {
                    let _admitted = admitted;
                    serve(tcp, limits, |_req| async {
                        Response::new(Full::new(Bytes::from_static(b"ok")))
                    })
                    .await
                });
            }
        });
        addr
    }

    /// Reads until the server closes; true if it closed within `within`.
    async fn closed_within(tcp: &mut tokio::net::TcpStream, within: Duration) -> bool {
        let mut buf = Vec::new();
        tokio::time::timeout(within, tcp.read_to_end(&mut buf))
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn slow_headers_silence_and_excess_connections_are_closed() {
        let limits = Limits {
            max_connections: 3,
            header_read_timeout: Duration::from_millis(300),
            idle_timeout: Duration::from_millis(600),
            ..Limits::default()
        };
        let addr = listener(limits).await;
        // Silent, a slow header and a preface-looking trickle: all closed by the deadline.
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nhost").await.unwrap();
        let mut preface = tokio::net::TcpStream::connect(addr).await.unwrap();
        preface.write_all(b"PRI").await.unwrap();
        // The cap is 3: a fourth is closed at once.
        let mut fourth = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(closed_within(&mut fourth, Duration::from_millis(200)).await);
        for conn in [&mut silent, &mut slow, &mut preface] {
            assert!(closed_within(conn, Duration::from_secs(2)).await);
        }
        // Places are given back: a normal request is served, then the idle connection closes.
        let mut ok = tokio::net::TcpStream::connect(addr).await.unwrap();
        ok.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 256];
        let n = ok.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        assert!(closed_within(&mut ok, Duration::from_secs(3)).await);
    }
}

//! Serving a listener's connections with the limits every listener enforces, whatever its
//! stack: a cap on connections (excess ones are closed at once and counted), a deadline for
//! each HTTP/1 request head (slow-header clients, idle keep-alive connections) and, on the
//! admin listener, for a connection's first request (silent clients), HTTP/2 keepalive pings
//! (dead peers are dropped), a cap on concurrent HTTP/2 streams, and an idle timeout after
//! which a connection with nothing in flight is closed gracefully (GOAWAY, so a request racing
//! the close is refused unprocessed, never lost). On drain, every connection is asked to
//! finish gracefully and the listener waits for them, up to a bound.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tower::Service;

use crate::BoxBody;

/// What a listener allows each client.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once; more are closed on accept.
    pub max_connections: usize,
    /// Time to send a whole HTTP/1 request head (and the most an HTTP/1 connection may idle
    /// between requests).
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed gracefully.
    pub idle_timeout: Duration,
    /// Concurrent HTTP/2 streams per connection.
    pub max_streams: u32,
    /// Close a connection that sends no request within the head deadline. Only for listeners
    /// whose clients never open a connection ahead of need: HTTP clients with pools (the
    /// agents, peer proxies) open spare connections and use them later, and closing those
    /// races the request sent on them.
    pub close_silent: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            max_streams: 512,
            close_silent: false,
        }
    }
}

/// The connections of one listener: admits up to the cap, counts refusals, knows when the
/// last one has closed, and spreads them over the workers that accept on it.
#[derive(Debug, Clone)]
pub struct Gate {
    permits: Arc<Semaphore>,
    max: usize,
    refused: IntCounter,
    spread: Arc<Spread>,
}

impl Gate {
    /// The gate of the listener `name`: `limits.max_connections`, refusals counted in
    /// `refused` under the listener's name. One per listener, shared by every worker that
    /// accepts on it, so the cap holds for the listener as a whole.
    pub fn for_listener(name: &str, limits: &Limits, refused: &IntCounterVec) -> Self {
        Self::new(limits.max_connections, refused.with_label_values(&[name]))
    }

    /// A gate for `max` connections, counting refusals in `refused`.
    pub fn new(max: usize, refused: IntCounter) -> Self {
        let max = max.max(1);
        Self {
            permits: Arc::new(Semaphore::new(max)),
            max,
            refused,
            spread: Arc::new(Spread::new(vec![
                IntGauge::new("open", "open").unwrap_or_else(|_| unreachable!("a valid name")),
            ])),
        }
    }

    /// The same gate, with its connections spread over `workers` worker threads (each serves a
    /// connection on the thread with the fewest open, so that a core never idles while
    /// another holds every connection). The open connections of worker `n` (1..=`workers`)
    /// are the gauge `open{listener="name", worker="n"}`.
    #[must_use]
    pub fn spread_over(mut self, name: &str, workers: usize, open: &IntGaugeVec) -> Self {
        let gauges = (1..=workers.max(1))
            .map(|n| open.with_label_values(&[name, &n.to_string()]))
            .collect();
        self.spread = Arc::new(Spread::new(gauges));
        self
    }

    /// A permit for one more connection (held while it is open), or `None` at the cap.
    pub fn admit(&self) -> Option<OwnedSemaphorePermit> {
        match self.permits.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                self.refused.inc();
                None
            }
        }
    }

    /// Waits until every admitted connection has closed, at most `bound`; false on time-out.
    pub async fn closed(&self, bound: Duration) -> bool {
        let all = u32::try_from(self.max).unwrap_or(u32::MAX);
        tokio::time::timeout(bound, self.permits.acquire_many(all))
            .await
            .is_ok()
    }
}

/// A connection one worker accepted and handed to another, with its permit and its place in
/// the receiving worker's count.
struct Handed {
    tcp: std::net::TcpStream,
    permit: OwnedSemaphorePermit,
    open: Open,
}

/// A listener's connections over its workers, least connections first. Every worker is woken
/// for a new connection and the first to ask the kernel takes it, so without this one busy
/// worker could end up with nearly all of them (benches/RESULTS.md, "An even split"). The
/// worker that accepts a connection hands it to the worker with the fewest open, itself on a
/// tie: one cross-thread hand-off per connection at most, none per call.
struct Spread {
    /// Each worker's open connections, counted from the moment it is chosen.
    open: Box<[IntGauge]>,
    /// Whether each worker is accepting (its accept loop runs): only those are chosen.
    live: Box<[AtomicBool]>,
    inboxes: Box<[mpsc::UnboundedSender<Handed>]>,
    /// Each worker's end of its inbox, until the worker takes it.
    receivers: std::sync::Mutex<Vec<Option<mpsc::UnboundedReceiver<Handed>>>>,
}

impl std::fmt::Debug for Spread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let open: Vec<i64> = self.open.iter().map(IntGauge::get).collect();
        f.debug_struct("Spread").field("open", &open).finish()
    }
}

impl Spread {
    fn new(open: Vec<IntGauge>) -> Self {
        let (inboxes, receivers): (Vec<_>, Vec<_>) = open
            .iter()
            .map(|_| {
                let (tx, rx) = mpsc::unbounded_channel();
                (tx, Some(rx))
            })
            .unzip();
        Self {
            live: open.iter().map(|_| AtomicBool::new(false)).collect(),
            open: open.into(),
            inboxes: inboxes.into(),
            receivers: std::sync::Mutex::new(receivers),
        }
    }

    /// This thread's place among the workers: worker `n` is entry `n - 1`; the main thread,
    /// the one worker when there is one, is entry 0.
    fn slot(&self) -> usize {
        crate::workers::index()
            .saturating_sub(1)
            .min(self.open.len() - 1)
    }

    /// Joins worker `slot` to the spread: it is chosen from now on, and it takes its inbox (if
    /// no other loop on this thread took it first).
    fn join(self: &Arc<Self>, slot: usize) -> Joined {
        let inbox = self
            .receivers
            .lock()
            .ok()
            .and_then(|mut r| r.get_mut(slot).and_then(Option::take));
        self.live[slot].store(true, Ordering::Release);
        Joined {
            spread: self.clone(),
            slot,
            inbox,
        }
    }

    /// The worker to serve a connection that worker `me` accepted: the live one with the
    /// fewest open, `me` on a tie. It is counted at once, so that connections accepted
    /// together spread.
    fn place(&self, me: usize) -> (usize, Open) {
        let mut best = me;
        let mut least = self.open[me].get();
        for (i, gauge) in self.open.iter().enumerate() {
            let n = gauge.get();
            if n < least && self.live[i].load(Ordering::Acquire) {
                (best, least) = (i, n);
            }
        }
        (best, Open::new(&self.open[best]))
    }
}

/// A worker's membership of a [`Spread`]; it leaves when dropped (its accept loop ended).
struct Joined {
    spread: Arc<Spread>,
    slot: usize,
    inbox: Option<mpsc::UnboundedReceiver<Handed>>,
}

impl Joined {
    /// The next connection another worker handed to this one; never, without an inbox.
    async fn handed(&mut self) -> Option<Handed> {
        match &mut self.inbox {
            Some(inbox) => inbox.recv().await,
            None => std::future::pending().await,
        }
    }

    /// Serves `tcp` here, or hands it to a worker with fewer connections open. What to
    /// serve here comes back.
    fn place(&self, tcp: TcpStream, permit: OwnedSemaphorePermit) -> Option<Placed> {
        let (to, open) = self.spread.place(self.slot);
        if to == self.slot {
            return Some(Placed { tcp, permit, open });
        }
        let tcp = match tcp.into_std() {
            Ok(tcp) => tcp,
            Err(e) => {
                tracing::warn!(error = %e, "cannot hand a connection to another worker");
                return None;
            }
        };
        match self.spread.inboxes[to].send(Handed { tcp, permit, open }) {
            Ok(()) => None,
            // The other worker stopped in the meantime: serve it here after all.
            Err(mpsc::error::SendError(Handed { tcp, permit, open })) => {
                drop(open);
                let open = Open::new(&self.spread.open[self.slot]);
                Self::receive(Handed { tcp, permit, open })
            }
        }
    }

    /// A handed connection, registered with this thread's scheduler.
    fn receive(handed: Handed) -> Option<Placed> {
        match TcpStream::from_std(handed.tcp) {
            Ok(tcp) => Some(Placed {
                tcp,
                permit: handed.permit,
                open: handed.open,
            }),
            Err(e) => {
                tracing::warn!(error = %e, "cannot take a connection from another worker");
                None
            }
        }
    }
}

impl Drop for Joined {
    fn drop(&mut self) {
        self.spread.live[self.slot].store(false, Ordering::Release);
    }
}

/// A connection to serve on this thread, with what it holds while open.
struct Placed {
    tcp: TcpStream,
    permit: OwnedSemaphorePermit,
    open: Open,
}

/// One open connection in its worker's count.
struct Open(IntGauge);

impl Open {
    fn new(gauge: &IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Accepts connections on `listener` until `drain` turns true, admitting each through `gate`
/// and handing it to `serve` on a task of its own (on the worker with the fewest connections
/// open); then waits for the listener's open connections to finish, at most `grace`. `name`
/// names the listener in logs.
pub async fn accept<F, Fut>(
    name: &'static str,
    listener: TcpListener,
    gate: Gate,
    mut drain: watch::Receiver<bool>,
    grace: Duration,
    serve: F,
) where
    F: Fn(TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut joined = gate.spread.join(gate.spread.slot());
    loop {
        let placed = tokio::select! {
            _ = drain.changed() => break,
            Some(handed) = joined.handed() => Joined::receive(handed),
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    let Some(permit) = gate.admit() else {
                        tracing::debug!(listener = name, "connection refused: at --max-connections");
                        continue;
                    };
                    let _ = tcp.set_nodelay(true);
                    joined.place(tcp, permit)
                }
                Err(e) => {
                    tracing::warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let Some(Placed { tcp, permit, open }) = placed else {
            continue;
        };
        let work = serve(tcp);
        tokio::spawn(async move {
            let _held = (permit, open);
            work.await;
        });
    }
    // Chosen no more; connections still in the inbox close with it.
    drop(joined);
    if !gate.closed(grace).await {
        tracing::warn!(
            listener = name,
            grace_secs = grace.as_secs(),
            "connections still open after the drain"
        );
    }
}

/// Requests in flight on one connection and when the last one ended.
#[derive(Debug)]
struct Activity {
    /// Whether a request has arrived (a connection that sends none in time is closed).
    started: AtomicBool,
    open: AtomicUsize,
    /// Milliseconds since `origin` when the connection last went idle.
    idle_since: AtomicU64,
    origin: Instant,
}

impl Activity {
    fn new() -> Self {
        Self {
            started: AtomicBool::new(false),
            open: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            origin: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    /// How long the connection has had nothing in flight (zero while busy).
    fn idle_for(&self) -> Duration {
        if self.open.load(Ordering::Acquire) > 0 {
            return Duration::ZERO;
        }
        let since = self.idle_since.load(Ordering::Acquire);
        Duration::from_millis(self.now_ms().saturating_sub(since))
    }
}

/// Counts each request as in flight until its response body ends (a long event stream is
/// activity), so the idle timeout only closes connections that carry nothing.
#[derive(Debug, Clone)]
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle_since.store(self.0.now_ms(), Ordering::Release);
        }
    }
}

impl<S> Service<Request<Incoming>> for Tracked<S>
where
    S: Service<Request<Incoming>, Response = Response<BoxBody>, Error = Infallible>,
    S::Future: Unpin,
{
    type Response = Response<Guarded>;
    type Error = Infallible;
    type Future = TrackedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        self.activity.started.store(true, Ordering::Release);
        self.activity.open.fetch_add(1, Ordering::AcqRel);
        TrackedFuture {
            inner: self.inner.call(req),
            guard: Some(InFlight(self.activity.clone())),
        }
    }
}

/// The answer of a [`Tracked`] request: the stack's future, whose response body then holds
/// the request's [`InFlight`] (a streaming body keeps its request in flight until it ends).
/// A named future rather than an `async` block, so that hyper gets the stack's one boxed future
/// and no second box around it.
struct TrackedFuture<F> {
    inner: F,
    guard: Option<InFlight>,
}

impl<F> Future for TrackedFuture<F>
where
    F: Future<Output = Result<Response<BoxBody>, Infallible>> + Unpin,
{
    type Output = Result<Response<Guarded>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let result = std::task::ready!(Pin::new(&mut self.inner).poll(cx));
        let guard = self.guard.take();
        Poll::Ready(result.map(|r| {
            r.map(|body| Guarded {
                body,
                _guard: guard,
            })
        }))
    }
}

/// A response body that keeps its request counted as in flight until it ends.
struct Guarded {
    body: BoxBody,
    _guard: Option<InFlight>,
}

impl http_body::Body for Guarded {
    type Data = bytes::Bytes;
    type Error = crate::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// What serves each connection: a whole stack, whose errors have already become responses,
/// and whose future is boxed once at its top (so `Unpin`, and wrapped here without a second box).
pub trait ConnService:
    Service<
        Request<Incoming>,
        Response = Response<BoxBody>,
        Error = Infallible,
        Future: Send + Unpin,
    > + Clone
    + Send
    + 'static
{
}

impl<T> ConnService for T where
    T: Service<
            Request<Incoming>,
            Response = Response<BoxBody>,
            Error = Infallible,
            Future: Send + Unpin,
        > + Clone
        + Send
        + 'static
{
}

/// Serves one connection with `svc` under `limits` until it closes, `drain` turns true (then
/// gracefully), or it idles past the limit (gracefully).
pub async fn connection<I, S>(io: I, svc: S, limits: Limits, drain: watch::Receiver<bool>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: ConnService,
{
    connection_until(io, svc, limits, drain, std::future::pending()).await;
}

/// [`connection`], also closed at once (not gracefully) when `close` resolves: the peer's
/// certificate was revoked or expired.
pub async fn connection_until<I, S>(
    io: I,
    svc: S,
    limits: Limits,
    mut drain: watch::Receiver<bool>,
    close: impl Future<Output = ()> + Send,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: ConnService,
{
    let activity = Arc::new(Activity::new());
    let svc = TowerToHyperService::new(Tracked {
        inner: svc,
        activity: activity.clone(),
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_streams)
        .keep_alive_interval(Some(Duration::from_secs(10)))
        .keep_alive_timeout(Duration::from_secs(20));
    let conn = builder.serve_connection(TokioIo::new(io), svc).into_owned();
    tokio::pin!(conn);
    let mut closing = *drain.borrow();
    if closing {
        conn.as_mut().graceful_shutdown();
    }
    let check = (limits.idle_timeout / 4).max(Duration::from_millis(50));
    // Where `close_silent` is set, a client that opens a connection and sends nothing is
    // closed like a slow one (HTTP/1's head deadline only starts with the first byte).
    let first_request = tokio::time::sleep(limits.header_read_timeout);
    tokio::pin!(close, first_request);
    loop {
        tokio::select! {
            () = &mut close => {
                tracing::info!("closing a connection whose peer is no longer trusted");
                return;
            }
            () = &mut first_request, if limits.close_silent && !activity.started.load(Ordering::Acquire) => {
                tracing::debug!("closing a connection that sent no request in time");
                return;
            }
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            changed = drain.changed(), if !closing => {
                if changed.is_err() || *drain.borrow() {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
            _ = tokio::time::sleep(check), if !closing => {
                if activity.idle_for() >= limits.idle_timeout {
                    tracing::debug!("closing an idle connection");
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_gate_admits_up_to_the_cap_and_counts_refusals() {
        let refused = IntCounter::new("r", "r").unwrap();
        let gate = Gate::new(2, refused.clone());
        let a = gate.admit().unwrap();
        let _b = gate.admit().unwrap();
        assert!(gate.admit().is_none());
        assert_eq!(refused.get(), 1);
        drop(a);
        assert!(gate.admit().is_some());
    }

    #[test]
    fn a_connection_goes_to_the_live_worker_with_the_fewest_open() {
        let gauges: Vec<IntGauge> = (0..3).map(|_| IntGauge::new("o", "o").unwrap()).collect();
        let spread = Arc::new(Spread::new(gauges.clone()));
        let (_zero, _one) = (spread.join(0), spread.join(1));
        // Worker 2 is not accepting: never chosen, though it has nothing open.
        let held: Vec<Open> = (0..4).map(|_| spread.place(0).1).collect();
        assert_eq!(
            gauges.iter().map(IntGauge::get).collect::<Vec<_>>(),
            [2, 2, 0]
        );
        // On a tie the accepting worker keeps it; else the least loaded gets it.
        assert_eq!(spread.place(1).0, 1);
        let joined_two = spread.join(2);
        assert_eq!(spread.place(0).0, 2);
        drop(joined_two);
        drop(held);
        assert_eq!(
            gauges.iter().map(IntGauge::get).collect::<Vec<_>>(),
            [0, 0, 0]
        );
    }

    #[test]
    fn activity_is_idle_only_with_nothing_in_flight() {
        let a = Arc::new(Activity::new());
        a.open.fetch_add(1, Ordering::AcqRel);
        let guard = InFlight(a.clone());
        assert_eq!(a.idle_for(), Duration::ZERO);
        drop(guard);
        assert_eq!(a.open.load(Ordering::Acquire), 0);
        std::thread::sleep(Duration::from_millis(20));
        assert!(a.idle_for() >= Duration::from_millis(15));
    }
}

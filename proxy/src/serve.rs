//! Serving a listener's connections with the limits every listener enforces, whatever its
//! stack: a cap on connections (excess ones are closed at once and counted), a deadline for
//! each HTTP/1 request head (slow-header clients, idle keep-alive connections) and, on the
//! admin listener, for a connection's first request (silent clients), HTTP/2 keepalive pings
//! (dead peers are dropped), a cap on concurrent HTTP/2 streams, and an idle timeout after
//! which a connection with nothing in flight is closed gracefully (GOAWAY, so a request racing
//! the close is refused unprocessed, never lost). On drain, every connection is asked to
//! finish gracefully and the listener waits for them, up to a bound.
//!
//! Connections are served by hyper, except the inbound listener's HTTP/2 connections from peer
//! proxies, which [`connection_h2`] serves with `h2` directly under the same limits: each
//! stream's call runs in the connection's task (benches/RESULTS.md, "The provider's HTTP/2
//! server on h2").

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use http::header::{CONTENT_LENGTH, HeaderValue};
use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tower::Service;

use crate::BoxBody;
use crate::io::Watched;
use crate::pool::PeerBody;
use crate::wakes::Wakes;

pub mod h1;

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

impl Limits {
    /// How often a connection checks whether it has idled past [`Limits::idle_timeout`] and,
    /// where `head` (HTTP/1 served by hyper), past [`Limits::header_read_timeout`] without a
    /// whole request head: so a deadline is enforced within a quarter of itself.
    fn idle_check(&self, head: bool) -> Duration {
        let idle = self.idle_timeout / 4;
        let every = if head {
            idle.min(self.header_read_timeout / 4)
        } else {
            idle
        };
        every.max(Duration::from_millis(50))
    }
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

/// What [`connection_until`] learns from its client's first bytes: the first byte starts
/// HTTP/1's head deadline ([`Activity::heard`]; hyper's deadline also started there, after
/// hyper-util's look at the first bytes), and HTTP/2's preface, byte for byte, marks the
/// connection as HTTP/2 ([`Activity::h2`]). Once it knows, each read costs one comparison.
struct FirstBytes {
    activity: Arc<Activity>,
    /// How many bytes of the preface the client has sent so far; [`FirstBytes::KNOWN`] once a
    /// byte differed or the whole preface came.
    matched: usize,
}

impl FirstBytes {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    const KNOWN: usize = usize::MAX;

    fn seen(&mut self, read: &[u8]) {
        if self.matched == Self::KNOWN {
            return;
        }
        if self.matched == 0 {
            self.activity.heard();
        }
        for &byte in read {
            if Self::PREFACE.get(self.matched) != Some(&byte) {
                self.matched = Self::KNOWN;
                return;
            }
            self.matched += 1;
            if self.matched == Self::PREFACE.len() {
                self.activity.h2.store(true, Ordering::Release);
                self.matched = Self::KNOWN;
                return;
            }
        }
    }
}

/// Requests in flight on one connection and when the last one ended.
#[derive(Debug)]
struct Activity {
    /// Whether a request has arrived (a connection that sends none in time is closed).
    started: AtomicBool,
    /// Whether the client has sent a byte ([`FirstBytes`]).
    heard: AtomicBool,
    /// Whether the client opened with HTTP/2's preface ([`FirstBytes`]).
    h2: AtomicBool,
    open: AtomicUsize,
    /// Milliseconds since `origin` when the connection last went idle.
    idle_since: AtomicU64,
    origin: Instant,
}

impl Activity {
    fn new() -> Self {
        Self {
            started: AtomicBool::new(false),
            heard: AtomicBool::new(false),
            h2: AtomicBool::new(false),
            open: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            origin: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    /// The client's first byte: HTTP/1's head deadline runs from here (not from the accept,
    /// so that a pooled client's spare connection is not closed for its silence).
    fn heard(&self) {
        self.idle_since.store(self.now_ms(), Ordering::Release);
        self.heard.store(true, Ordering::Release);
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
/// `B` is the request body: hyper's, or a peer's HTTP/2 stream ([`connection_h2`]).
pub trait ConnService<B = Incoming>:
    Service<Request<B>, Response = Response<BoxBody>, Error = Infallible, Future: Send + Unpin>
    + Clone
    + Send
    + 'static
{
}

impl<T, B> ConnService<B> for T where
    T: Service<Request<B>, Response = Response<BoxBody>, Error = Infallible, Future: Send + Unpin>
        + Clone
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
    drain: watch::Receiver<bool>,
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
    // HTTP/1's head deadline is kept by `Events`, not by hyper, whose timer cost each request
    // an allocation and a timer registered and removed (benches/RESULTS.md, "The head
    // deadline without a timer per request").
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_streams)
        .keep_alive_interval(Some(Duration::from_secs(10)))
        .keep_alive_timeout(Duration::from_secs(20));
    let mut first = FirstBytes {
        activity: activity.clone(),
        matched: 0,
    };
    let io = Watched {
        io,
        seen: move |read: &[u8]| first.seen(read),
    };
    let conn = builder.serve_connection(TokioIo::new(io), svc).into_owned();
    tokio::pin!(conn, close);
    // hyper pings an HTTP/2 client itself. An HTTP/1 client has the head deadline from its
    // first byte on, and again from each answer's end (the keep-alive idle between requests).
    // Where `close_silent` is set, a client that opens a connection and sends nothing is closed
    // like a slow one.
    let mut events = Events::new(
        &limits,
        None::<Pin<Box<std::future::Pending<String>>>>,
        drain,
        Some(limits.header_read_timeout),
    );
    let wakes = Wakes::new();
    std::future::poll_fn(|cx| {
        wakes.poll(cx, |cx, rare| {
            if let Some(rare) = rare {
                match events.poll(&mut close, &activity, rare) {
                    Some(Closing::Now) => return Poll::Ready(()),
                    Some(Closing::Gracefully) => conn.as_mut().graceful_shutdown(),
                    None => {}
                }
            }
            conn.as_mut().poll(cx).map(|result| {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
            })
        })
    })
    .await;
}

/// HTTP/2 settings of a connection served by [`connection_h2`]: hyper's server defaults, which
/// the other listeners keep, so that a peer sees the same limits either way.
mod h2_settings {
    /// Receive window of each stream and of the connection.
    pub const WINDOW: u32 = 1024 * 1024;
    /// The largest frame the client may send.
    pub const MAX_FRAME: u32 = 16 * 1024;
    /// The most header bytes one request may carry.
    pub const MAX_HEADER_LIST: u32 = 16 * 1024;
    /// The most response bytes buffered for one stream beyond what the client's window takes.
    pub const MAX_SEND_BUFFER: usize = 400 * 1024;
    /// Streams this end may reset for the client's errors before the connection is closed.
    pub const MAX_LOCAL_ERROR_RESETS: usize = 1024;
}

/// [`connection_until`] for a connection that chose HTTP/2 in its TLS handshake, served with
/// `h2` directly: every stream's call runs in the connection's own task, beside the connection
/// (hyper's server spawns a task for each stream, and the connection's task is woken again to
/// write what that task answered). The limits are the same: the stream cap, keep-alive PINGs,
/// the idle timeout, a graceful close on drain, and a client that sends no preface within the
/// head deadline is closed. A stream the client resets drops its call, as hyper does.
pub async fn connection_h2<I, S>(
    io: I,
    svc: S,
    limits: Limits,
    drain: watch::Receiver<bool>,
    close: impl Future<Output = ()> + Send,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: ConnService<PeerBody>,
{
    let handshake = h2::server::Builder::new()
        .initial_window_size(h2_settings::WINDOW)
        .initial_connection_window_size(h2_settings::WINDOW)
        .max_frame_size(h2_settings::MAX_FRAME)
        .max_header_list_size(h2_settings::MAX_HEADER_LIST)
        .max_send_buffer_size(h2_settings::MAX_SEND_BUFFER)
        .max_local_error_reset_streams(Some(h2_settings::MAX_LOCAL_ERROR_RESETS))
        .max_concurrent_streams(limits.max_streams)
        .handshake::<_, Bytes>(io);
    tokio::pin!(close);
    let mut conn = tokio::select! {
        () = &mut close => return,
        shaken = tokio::time::timeout(limits.header_read_timeout, handshake) => match shaken {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "HTTP/2 handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!("closing a connection that sent no HTTP/2 preface in time");
                return;
            }
        },
    };
    let activity = Arc::new(Activity::new());
    let keep_alive = Box::pin(crate::pool::keep_alive(conn.ping_pong()));
    let mut events = Events::new(&limits, Some(keep_alive), drain, None);
    let wakes = Wakes::new();
    let mut streams = FuturesUnordered::new();
    std::future::poll_fn(|cx| {
        wakes.poll(cx, |cx, rare| {
            if let Some(rare) = rare {
                match events.poll(&mut close, &activity, rare) {
                    Some(Closing::Now) => return Poll::Ready(()),
                    Some(Closing::Gracefully) => conn.graceful_shutdown(),
                    None => {}
                }
            }
            serve_streams(&mut conn, &mut streams, &svc, &activity, cx, &wakes)
        })
    })
    .await;
}

/// What a served connection waits for besides its requests, polled only when one of them woke
/// it ([`Wakes`]): the peer no longer trusted, keep-alive PINGs (HTTP/2 served with `h2`), no
/// request in time (`close_silent`), drain, and the idle timeout.
struct Events<K> {
    keep_alive: Option<Pin<Box<K>>>,
    first_request: Option<Pin<Box<tokio::time::Sleep>>>,
    drain: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    idle: tokio::time::Interval,
    idle_timeout: Duration,
    /// HTTP/1's head deadline (see [`Events::new`]).
    head: Option<Duration>,
}

/// How an event closes a connection.
enum Closing {
    /// At once: the peer is no longer trusted, a keep-alive PING went unanswered, or no request
    /// (or no whole HTTP/1 request head) came in time.
    Now,
    /// Gracefully, once (GOAWAY, or HTTP/1's close after the request in flight): drain, or
    /// the idle timeout.
    Gracefully,
}

impl<K> Events<K>
where
    K: Future<Output = String>,
{
    /// The events of one connection. With `head` (HTTP/1 served by hyper), an HTTP/1
    /// connection whose client has not sent a whole request head within it, counted from its
    /// first byte or from the end of its last answer, is also closed at once (hyper's
    /// `header_read_timeout` kept the same deadline with a timer per request). That check runs
    /// on the idle tick, a quarter of the deadline apart, also while the connection drains. A
    /// client that opened with HTTP/2's preface is left to hyper's HTTP/2 server, as before.
    fn new(
        limits: &Limits,
        keep_alive: Option<Pin<Box<K>>>,
        drain: watch::Receiver<bool>,
        head: Option<Duration>,
    ) -> Self {
        Self {
            keep_alive,
            first_request: (limits.close_silent)
                .then(|| Box::pin(tokio::time::sleep(limits.header_read_timeout))),
            drain: Some(Box::pin(async move {
                let mut drain = drain;
                // Drained, or the proxy is going away.
                let _ = drain.wait_for(|&drained| drained).await;
            })),
            idle: tokio::time::interval(limits.idle_check(head.is_some())),
            idle_timeout: limits.idle_timeout,
            head,
        }
    }

    /// Polls each event, and tells whether the connection is to close.
    fn poll<C>(
        &mut self,
        close: &mut Pin<&mut C>,
        activity: &Activity,
        cx: &mut Context<'_>,
    ) -> Option<Closing>
    where
        C: Future<Output = ()>,
    {
        if close.as_mut().poll(cx).is_ready() {
            tracing::info!("closing a connection whose peer is no longer trusted");
            return Some(Closing::Now);
        }
        if let Some(keep_alive) = &mut self.keep_alive
            && let Poll::Ready(why) = keep_alive.as_mut().poll(cx)
        {
            tracing::debug!(reason = %why, "closing a connection whose client stopped answering");
            return Some(Closing::Now);
        }
        if let Some(first) = &mut self.first_request {
            if activity.started.load(Ordering::Acquire) {
                self.first_request = None;
            } else if first.as_mut().poll(cx).is_ready() {
                tracing::debug!("closing a connection that sent no request in time");
                return Some(Closing::Now);
            }
        }
        let mut graceful = self
            .drain
            .as_mut()
            .is_some_and(|drain| drain.as_mut().poll(cx).is_ready());
        while self.idle.poll_tick(cx).is_ready() {
            let idle = activity.idle_for();
            // Also while draining: hyper's graceful close waits for a first request's head.
            if let Some(head) = self.head
                && idle >= head
                && activity.heard.load(Ordering::Acquire)
                && !activity.h2.load(Ordering::Acquire)
            {
                tracing::debug!("closing a connection whose request head did not come in time");
                return Some(Closing::Now);
            }
            if self.drain.is_some() && idle >= self.idle_timeout {
                tracing::debug!("closing an idle connection");
                graceful = true;
            }
        }
        // Once: then only the requests in flight are waited for.
        graceful.then(|| {
            self.drain = None;
            Closing::Gracefully
        })
    }
}

/// Drives an HTTP/2 connection and the calls of its streams: polls the calls that were woken,
/// takes each new stream's request to `svc`, and starts the new calls. Ready when the
/// connection has ended (closed, failed, or gracefully done).
fn serve_streams<I, S>(
    conn: &mut h2::server::Connection<I, Bytes>,
    streams: &mut FuturesUnordered<Stream<S::Future>>,
    svc: &S,
    activity: &Arc<Activity>,
    cx: &mut Context<'_>,
    wakes: &Wakes,
) -> Poll<()>
where
    I: AsyncRead + AsyncWrite + Unpin,
    S: ConnService<PeerBody>,
{
    while let Poll::Ready(Some(())) = streams.poll_next_unpin(cx) {}
    // What the calls queued so far (and whatever else woke the connection until now) is
    // written by the `poll_accept` below: only a wake from here on needs another round.
    wakes.rearm();
    loop {
        match conn.poll_accept(cx) {
            Poll::Ready(Some(Ok((req, reply)))) => {
                activity.started.store(true, Ordering::Release);
                activity.open.fetch_add(1, Ordering::AcqRel);
                let _guard = InFlight(activity.clone());
                let call = svc.clone().call(req.map(PeerBody::new));
                streams.push(Stream {
                    state: Answer::Call { call, reply },
                    _guard,
                });
            }
            Poll::Ready(Some(Err(e))) => {
                tracing::debug!(error = %e, "HTTP/2 connection ended with an error");
                return Poll::Ready(());
            }
            Poll::Ready(None) => return Poll::Ready(()),
            Poll::Pending => break,
        }
    }
    // The new calls start; what they queue wakes the connection, for another round.
    while let Poll::Ready(Some(())) = streams.poll_next_unpin(cx) {}
    Poll::Pending
}

/// One HTTP/2 stream's call: the stack's answer, then the answer's body sent to the client. It
/// counts as in flight until the body is sent.
struct Stream<F> {
    state: Answer<F>,
    _guard: InFlight,
}

enum Answer<F> {
    /// The stack is answering.
    Call {
        call: F,
        reply: h2::server::SendResponse<Bytes>,
    },
    /// The head is sent; the body follows, one frame at a time.
    Body {
        body: BoxBody,
        send: h2::SendStream<Bytes>,
        /// A frame read from the body, waiting for the client's window.
        held: Option<(Bytes, bool)>,
    },
}

impl<F> Future for Stream<F>
where
    F: Future<Output = Result<Response<BoxBody>, Infallible>> + Unpin,
{
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        // A panic in one call ends its stream (reset when dropped), not the connection's
        // other calls: under hyper each stream had a task of its own.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| this.answer(cx))).unwrap_or_else(
            |_| {
                tracing::error!("a request's handling panicked; its stream is reset");
                Poll::Ready(())
            },
        )
    }
}

impl<F> Stream<F>
where
    F: Future<Output = Result<Response<BoxBody>, Infallible>> + Unpin,
{
    fn answer(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if let Answer::Call { call, reply } = &mut self.state {
            let response = match Pin::new(call).poll(cx) {
                Poll::Ready(Ok(response)) => response,
                Poll::Ready(Err(never)) => match never {},
                Poll::Pending => {
                    // The client gave up on the call: it is dropped, with what it awaits.
                    if let Poll::Ready(reason) = reply.poll_reset(cx) {
                        tracing::debug!(?reason, "a stream was reset before its answer");
                        return Poll::Ready(());
                    }
                    return Poll::Pending;
                }
            };
            let (mut parts, body) = response.into_parts();
            crate::pool::strip_connection_headers(&mut parts.headers);
            let end = body.is_end_stream();
            if !end
                && let Some(len) = body.size_hint().exact()
                && !parts.headers.contains_key(CONTENT_LENGTH)
            {
                parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
            }
            let send = match reply.send_response(Response::from_parts(parts, ()), end) {
                Ok(_) if end => return Poll::Ready(()),
                Ok(send) => send,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot send a response head");
                    reply.send_reset(h2::Reason::INTERNAL_ERROR);
                    return Poll::Ready(());
                }
            };
            self.state = Answer::Body {
                body,
                send,
                held: None,
            };
        }
        match &mut self.state {
            Answer::Body { body, send, held } => pipe(body, send, held, cx),
            // Not reached: the call answered above, or this returned.
            Answer::Call { .. } => Poll::Ready(()),
        }
    }
}

/// Sends `body` on `send` as the client's window allows: one frame read ahead at most, so a
/// slow client holds back a streaming body instead of the proxy buffering it. Ready when the
/// body is sent, or the stream is reset or fails (then the body is dropped).
fn pipe(
    body: &mut BoxBody,
    send: &mut h2::SendStream<Bytes>,
    held: &mut Option<(Bytes, bool)>,
    cx: &mut Context<'_>,
) -> Poll<()> {
    loop {
        // Registered while the body or the window is awaited, so that a reset wakes the call.
        if let Poll::Ready(reason) = send.poll_reset(cx) {
            tracing::debug!(?reason, "a stream was reset while its body was sent");
            return Poll::Ready(());
        }
        if let Some((data, end)) = held.take() {
            if send.capacity() == 0 {
                match send.poll_capacity(cx) {
                    Poll::Pending => {
                        *held = Some((data, end));
                        return Poll::Pending;
                    }
                    Poll::Ready(Some(Ok(_))) => {
                        *held = Some((data, end));
                        continue;
                    }
                    Poll::Ready(Some(Err(e))) => {
                        tracing::debug!(error = %e, "a stream's window failed");
                        return Poll::Ready(());
                    }
                    Poll::Ready(None) => return Poll::Ready(()),
                }
            }
            // h2 takes the whole frame and sends it as the window opens.
            if send.send_data(data, end).is_err() || end {
                return Poll::Ready(());
            }
            continue;
        }
        match std::task::ready!(Pin::new(&mut *body).poll_frame(cx)) {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    let end = body.is_end_stream();
                    if data.is_empty() {
                        if send.send_data(data, end).is_err() || end {
                            return Poll::Ready(());
                        }
                    } else {
                        // A claim of one byte: the rest is asked for as the frame is sent.
                        send.reserve_capacity(1);
                        *held = Some((data, end));
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        send.reserve_capacity(0);
                        let _ = send.send_trailers(trailers);
                        return Poll::Ready(());
                    }
                }
            },
            Some(Err(e)) => {
                tracing::debug!(error = %e, "a response body failed; its stream is reset");
                send.send_reset(h2::Reason::INTERNAL_ERROR);
                return Poll::Ready(());
            }
            None => {
                let _ = send.send_data(Bytes::new(), true);
                return Poll::Ready(());
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

    /// HTTP/1's head deadline, kept by [`Events`]: from the client's first byte and from the end
    /// of each answer, never for a client that has sent nothing (unless `close_silent`), and
    /// not for a client that speaks HTTP/2 with prior knowledge.
    mod head_deadline {
        use super::*;
        use http_body_util::Full;
        use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
        use tokio::task::JoinHandle;

        const DEADLINE: Duration = Duration::from_millis(200);

        type Answer = Pin<Box<dyn Future<Output = Result<Response<BoxBody>, Infallible>> + Send>>;

        /// A connection served by [`connection`] that answers `ok` to every request.
        fn serve() -> (DuplexStream, JoinHandle<()>, watch::Sender<bool>) {
            let (client, server_io) = tokio::io::duplex(1 << 16);
            let (drain, drain_rx) = watch::channel(false);
            let svc = tower::service_fn(|_req: Request<Incoming>| -> Answer {
                Box::pin(async {
                    Ok(Response::new(crate::boxed(Full::new(Bytes::from_static(
                        b"ok",
                    )))))
                })
            });
            let limits = Limits {
                header_read_timeout: DEADLINE,
                ..Limits::default()
            };
            let server = tokio::spawn(connection(server_io, svc, limits, drain_rx));
            (client, server, drain)
        }

        /// Reads until the answer's body `ok` has come.
        async fn answer(client: &mut DuplexStream) -> String {
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            while !got.ends_with(b"ok") {
                let n = client.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed before the answer: {got:?}");
                got.extend_from_slice(&buf[..n]);
            }
            String::from_utf8(got).unwrap()
        }

        async fn closed_within(server: JoinHandle<()>, bound: Duration) -> Duration {
            let began = Instant::now();
            tokio::time::timeout(bound, server)
                .await
                .unwrap_or_else(|_| panic!("the connection was not closed within {bound:?}"))
                .unwrap();
            began.elapsed()
        }

        #[tokio::test]
        async fn a_silent_client_waits_and_a_slow_head_or_idle_keep_alive_is_closed() {
            let (mut client, server, _drain) = serve();
            // Silent for twice the deadline: a pooled client's spare connection stays open.
            tokio::time::sleep(DEADLINE * 2).await;
            assert!(!server.is_finished(), "a silent connection was closed");
            // A whole request is answered, and the connection idles from the answer's end.
            client
                .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                .await
                .unwrap();
            assert!(answer(&mut client).await.starts_with("HTTP/1.1 200"));
            let idle = closed_within(server, DEADLINE * 3).await;
            assert!(idle >= DEADLINE - Duration::from_millis(20), "{idle:?}");

            // A head begun and not finished is closed from its first byte on.
            let (mut client, server, _drain) = serve();
            client.write_all(b"GET / HTTP/1.1\r\nho").await.unwrap();
            let slow = closed_within(server, DEADLINE * 3).await;
            assert!(slow >= DEADLINE - Duration::from_millis(20), "{slow:?}");
            let mut rest = Vec::new();
            client.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty(), "no answer to a head that never came");
        }

        #[tokio::test]
        async fn a_slow_head_is_closed_at_its_deadline_while_the_listener_drains() {
            let (mut client, server, drain) = serve();
            client.write_all(b"GET / HTTP/1.1\r\nho").await.unwrap();
            tokio::time::sleep(DEADLINE / 4).await;
            drain.send_replace(true);
            let slow = closed_within(server, DEADLINE * 3).await;
            assert!(slow >= DEADLINE / 2, "{slow:?}");
        }

        #[tokio::test]
        async fn requests_keep_a_connection_open_past_the_deadline() {
            let (mut client, server, _drain) = serve();
            for _ in 0..6 {
                client
                    .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                    .await
                    .unwrap();
                answer(&mut client).await;
                tokio::time::sleep(DEADLINE / 2).await;
            }
            assert!(!server.is_finished(), "closed while requests kept coming");
        }

        #[tokio::test]
        async fn an_http2_client_is_not_held_to_the_http1_deadline() {
            let (client, server, _drain) = serve();
            let (sender, connection) = h2::client::handshake(client).await.unwrap();
            let _connection = tokio::spawn(connection);
            for _ in 0..2 {
                let mut sender = sender.clone().ready().await.unwrap();
                let (response, _) = sender
                    .send_request(Request::get("http://x/").body(()).unwrap(), true)
                    .unwrap();
                assert_eq!(response.await.unwrap().status(), http::StatusCode::OK);
                // Idle past the deadline between the two requests.
                tokio::time::sleep(DEADLINE * 2).await;
            }
            assert!(!server.is_finished(), "an HTTP/2 connection was closed");
        }
    }

    /// The HTTP/2 listener's tests: a real `h2` client on one end of an in-memory pipe,
    /// [`connection_h2`] on the other, serving the handlers of [`handler`].
    mod h2_direct {
        use super::*;
        use bytes::BytesMut;
        use http::StatusCode;
        use http_body_util::{Full, StreamBody};
        use tokio::sync::{Notify, oneshot};
        use tokio::task::JoinHandle;

        type Answer = Pin<Box<dyn Future<Output = Result<Response<BoxBody>, Infallible>> + Send>>;

        /// Tells `dropped` when the call holding it is dropped.
        struct DropSignal(Arc<Notify>);

        impl Drop for DropSignal {
            fn drop(&mut self) {
                self.0.notify_one();
            }
        }

        /// By path: `/echo` answers the request's body, `/big` 3 MiB in 64 KiB frames and a
        /// trailer, `/slow` after 300 ms, `/hang` never (`dropped` is told when the call is
        /// dropped), `/panic` panics, anything else answers `ok`.
        fn handler(dropped: Arc<Notify>) -> impl ConnService<PeerBody> {
            tower::service_fn(move |req: Request<PeerBody>| -> Answer {
                let dropped = dropped.clone();
                Box::pin(async move {
                    let body = match req.uri().path() {
                        "/echo" => {
                            let read = crate::stack::read_body(req.into_body(), 1 << 20).await;
                            crate::boxed(Full::new(read.unwrap_or_default()))
                        }
                        "/big" => {
                            let mut frames: Vec<Result<http_body::Frame<Bytes>, Infallible>> = (0
                                ..48u8)
                                .map(|i| Ok(http_body::Frame::data(Bytes::from(vec![i; 65_536]))))
                                .collect();
                            let mut trailers = http::HeaderMap::new();
                            trailers.insert("x-done", HeaderValue::from_static("yes"));
                            frames.push(Ok(http_body::Frame::trailers(trailers)));
                            crate::boxed(StreamBody::new(futures_util::stream::iter(frames)))
                        }
                        "/slow" => {
                            tokio::time::sleep(Duration::from_millis(300)).await;
                            crate::boxed(Full::new(Bytes::from_static(b"slow")))
                        }
                        "/hang" => {
                            let _signal = DropSignal(dropped);
                            std::future::pending::<BoxBody>().await
                        }
                        "/panic" => panic!("a bug in one call's handling"),
                        _ => crate::boxed(Full::new(Bytes::from_static(b"ok"))),
                    };
                    Ok(Response::new(body))
                })
            })
        }

        /// What the test holds of one served connection.
        struct Served {
            sender: h2::client::SendRequest<Bytes>,
            /// The client's side of the connection: ends when the connection does.
            client: JoinHandle<Result<(), h2::Error>>,
            /// The server's [`connection_h2`].
            server: JoinHandle<()>,
            drain: watch::Sender<bool>,
            /// Dropped or sent: the peer is no longer trusted.
            distrust: oneshot::Sender<()>,
            dropped: Arc<Notify>,
        }

        async fn serve(limits: Limits) -> Served {
            let (client_io, server_io) = tokio::io::duplex(1 << 16);
            let (drain, drain_rx) = watch::channel(false);
            let (distrust, distrusted) = oneshot::channel::<()>();
            let dropped = Arc::new(Notify::new());
            let server = tokio::spawn(connection_h2(
                server_io,
                handler(dropped.clone()),
                limits,
                drain_rx,
                async move {
                    let _ = distrusted.await;
                },
            ));
            let (sender, connection) = h2::client::handshake(client_io).await.unwrap();
            Served {
                sender,
                client: tokio::spawn(connection),
                server,
                drain,
                distrust,
                dropped,
            }
        }

        fn request(path: &str) -> Request<()> {
            Request::post(format!("https://provider{path}"))
                .body(())
                .unwrap()
        }

        /// The answer to `path` (with `body`, if any): status, whole body, trailers, and the
        /// content-length header.
        async fn call(
            sender: &h2::client::SendRequest<Bytes>,
            path: &str,
            body: Option<&'static [u8]>,
        ) -> Result<Answered, h2::Error> {
            let mut sender = sender.clone().ready().await?;
            let (response, mut stream) = sender.send_request(request(path), body.is_none())?;
            if let Some(body) = body {
                stream.send_data(Bytes::from_static(body), true)?;
            }
            let response = response.await?;
            let (status, length) = (
                response.status(),
                response.headers().get(CONTENT_LENGTH).cloned(),
            );
            let mut recv = response.into_body();
            let mut whole = BytesMut::new();
            while let Some(data) = recv.data().await {
                let data = data?;
                let _ = recv.flow_control().release_capacity(data.len());
                whole.extend_from_slice(&data);
            }
            let trailers = recv.trailers().await?;
            Ok((status, whole.freeze(), trailers, length))
        }

        /// Status, whole body, trailers and content-length of an answer.
        type Answered = (
            StatusCode,
            Bytes,
            Option<http::HeaderMap>,
            Option<HeaderValue>,
        );

        /// A call to `path` on a task of its own, given 50 ms to reach the server.
        async fn in_flight(
            served: &Served,
            path: &'static str,
        ) -> JoinHandle<Result<Answered, h2::Error>> {
            let sender = served.sender.clone();
            let call = tokio::spawn(async move { call(&sender, path, None).await });
            tokio::time::sleep(Duration::from_millis(50)).await;
            call
        }

        async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
            tokio::time::timeout(Duration::from_secs(5), f)
                .await
                .unwrap_or_else(|_| panic!("{what}: not within 5 s"))
        }

        #[tokio::test]
        async fn a_peer_gets_whole_answers_bodies_past_its_window_and_trailers() {
            let served = serve(Limits::default()).await;
            let (status, body, _, length) = call(&served.sender, "/echo", Some(b"{\"id\":1}"))
                .await
                .unwrap();
            assert_eq!(status, StatusCode::OK);
            assert_eq!(&body[..], b"{\"id\":1}");
            assert_eq!(length.unwrap(), "8");
            // 3 MiB against the client's 64 KiB window: sent as the client reads.
            let (_, body, trailers, _) = within("the big body", call(&served.sender, "/big", None))
                .await
                .unwrap();
            assert_eq!(body.len(), 48 * 65_536);
            assert!(
                body.chunks(65_536)
                    .enumerate()
                    .all(|(i, c)| c.iter().all(|&b| usize::from(b) == i))
            );
            assert_eq!(trailers.unwrap()["x-done"], "yes");
            // Both at once on the one connection.
            let (a, b) = tokio::join!(
                call(&served.sender, "/slow", None),
                call(&served.sender, "/echo", Some(b"second"))
            );
            assert_eq!(&a.unwrap().1[..], b"slow");
            assert_eq!(&b.unwrap().1[..], b"second");
        }

        #[tokio::test]
        async fn a_reset_stream_drops_its_call_and_a_panicking_call_spares_the_others() {
            let served = serve(Limits::default()).await;
            let mut sender = served.sender.clone().ready().await.unwrap();
            let (_response, mut stream) = sender.send_request(request("/hang"), true).unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            stream.send_reset(h2::Reason::CANCEL);
            within("the reset call dropped", served.dropped.notified()).await;
            // A bug in one call resets its stream; the connection serves the next call.
            assert!(call(&served.sender, "/panic", None).await.is_err());
            let (status, body, ..) = call(&served.sender, "/", None).await.unwrap();
            assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok"[..]));
            assert!(!served.server.is_finished());
        }

        #[tokio::test]
        async fn a_drain_lets_the_call_in_flight_finish_and_closes_the_connection() {
            let served = serve(Limits::default()).await;
            let slow = in_flight(&served, "/slow").await;
            served.drain.send(true).unwrap();
            let (status, body, ..) = within("the call in flight", slow).await.unwrap().unwrap();
            assert_eq!((status, &body[..]), (StatusCode::OK, &b"slow"[..]));
            within("the server's close", served.server).await.unwrap();
            within("the client's close", served.client)
                .await
                .unwrap()
                .unwrap();
            assert!(call(&served.sender, "/", None).await.is_err());
        }

        #[tokio::test]
        async fn an_idle_connection_is_closed_and_the_stream_cap_is_the_listeners() {
            let limits = Limits {
                idle_timeout: Duration::from_millis(300),
                max_streams: 2,
                ..Limits::default()
            };
            let served = serve(limits).await;
            assert_eq!(
                call(&served.sender, "/", None).await.unwrap().0,
                StatusCode::OK
            );
            assert_eq!(served.sender.current_max_send_streams(), 2);
            // Nothing in flight for the idle timeout: closed gracefully, on the server's side.
            let began = Instant::now();
            within("the idle close", served.server).await.unwrap();
            assert!(
                began.elapsed() >= Duration::from_millis(200),
                "{:?}",
                began.elapsed()
            );
            within("the client's close", served.client)
                .await
                .unwrap()
                .unwrap();
        }

        #[tokio::test]
        async fn a_peer_no_longer_trusted_is_cut_off_with_its_call_in_flight() {
            let served = serve(Limits::default()).await;
            let hang = in_flight(&served, "/hang").await;
            served.distrust.send(()).unwrap();
            within("the server's close", served.server).await.unwrap();
            within("the call dropped", served.dropped.notified()).await;
            assert!(within("the call's end", hang).await.unwrap().is_err());
        }

        #[tokio::test]
        async fn a_client_that_sends_no_preface_is_closed_at_the_head_deadline() {
            let (_client_io, server_io) = tokio::io::duplex(1 << 16);
            let (_drain, drain_rx) = watch::channel(false);
            let limits = Limits {
                header_read_timeout: Duration::from_millis(200),
                ..Limits::default()
            };
            let dropped = Arc::new(Notify::new());
            let began = Instant::now();
            let served = connection_h2(
                server_io,
                handler(dropped),
                limits,
                drain_rx,
                std::future::pending(),
            );
            within("the close", served).await;
            assert!(began.elapsed() >= Duration::from_millis(200));
        }
    }
}

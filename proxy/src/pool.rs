//! Connections to other proxies: one HTTP/2 connection over mutual TLS per peer, shared by
//! every request to it, and the peer's SPIFFE ID checked against the snapshot's.
//!
//! The HTTP/2 client is `h2` itself, driven from the request's own task: a request's HEADERS and
//! its body's DATA are queued together, so the connection writes them in one flush, and the
//! response is awaited where the request is (hyper's client spawned a task per request to wait
//! for it and another to send the body, and wrote the two frames in two flushes;
//! benches/RESULTS.md).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use capmesh_certs::{CredentialCell, Refusal, SpiffeId, TrustStore};
use h2::client::SendRequest;
use http::header::{
    CONNECTION, CONTENT_LENGTH, HeaderName, HeaderValue, TE, TRANSFER_ENCODING, UPGRADE,
};
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame};
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::io::Watched;
use crate::wakes::Wakes;

/// Why a request to a peer got no response headers. [`PeerError::may_have_reached`] tells
/// whether the peer can have processed it: only [`PeerError::Reset`] may have.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// TCP connect failed (refused, unreachable).
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The peer.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// Connecting or the handshake took too long.
    #[error("connecting to {addr} timed out after {after:?}")]
    Timeout {
        /// The peer.
        addr: String,
        /// The limit.
        after: Duration,
    },
    /// The TLS handshake failed or the peer is not who the snapshot says.
    #[error("TLS with {addr} failed: {detail}")]
    Tls {
        /// The peer.
        addr: String,
        /// What the handshake said.
        detail: String,
    },
    /// The snapshot's identity for the endpoint is not a SPIFFE ID.
    #[error("endpoint identity \"{0}\" is not a SPIFFE ID")]
    BadIdentity(String),
    /// The connection failed before the request was written: nothing reached the peer.
    #[error("HTTP/2 with {addr} failed before the request was sent: {source}")]
    NotSent {
        /// The peer.
        addr: String,
        /// Why.
        source: h2::Error,
    },
    /// The peer refused the request without processing it (HTTP/2 `REFUSED_STREAM`, a graceful
    /// `GOAWAY` that did not cover it), or the connection failed before the peer ever spoke on
    /// it (it refused our certificate).
    #[error("{addr} refused the request unprocessed: {source}")]
    Refused {
        /// The peer.
        addr: String,
        /// Why.
        source: h2::Error,
    },
    /// The request was sent, then the exchange failed before response headers: the peer may
    /// have processed it.
    #[error("{addr} reset the request after it was sent: {source}")]
    Reset {
        /// The peer.
        addr: String,
        /// Why.
        source: h2::Error,
    },
}

impl PeerError {
    /// Whether the peer can have processed the request.
    pub fn may_have_reached(&self) -> bool {
        matches!(self, PeerError::Reset { .. })
    }

    /// Sorts a failed send: unsent (the request came back), refused by the peer unprocessed,
    /// or reset after it was sent.
    fn from_send(addr: &str, unsent: bool, heard: bool, source: h2::Error) -> Self {
        let addr = addr.to_owned();
        if unsent {
            return PeerError::NotSent { addr, source };
        }
        let refused = !heard || refused_stream(&source);
        if refused {
            PeerError::Refused { addr, source }
        } else {
            PeerError::Reset { addr, source }
        }
    }
}

/// Whether a failure after the request was written proves the peer did not process it: it
/// refused the stream (HTTP/2 `REFUSED_STREAM`, or a graceful `GOAWAY` that did not cover it).
fn refused_stream(source: &h2::Error) -> bool {
    source.reason() == Some(h2::Reason::REFUSED_STREAM)
        || (source.is_go_away() && source.reason() == Some(h2::Reason::NO_ERROR))
}

/// One pooled connection: its sender, whether the peer has spoken on it, and whether it has
/// ended.
#[derive(Debug, Clone)]
struct Conn {
    sender: SendRequest<Bytes>,
    heard: Arc<AtomicBool>,
    closed: Arc<AtomicBool>,
    /// Requests sent on it so far.
    sent: Arc<AtomicU64>,
}

/// How long a request waited for its connection to a peer to open (opened by it, or by the
/// request that got there first): a response extension, present only when it waited.
///
/// The balancer leaves this out of the endpoint's latency sample, as tower's balancers do by
/// connecting in `poll_ready`. Counted in, a new provider's first answer (slowed by the TLS
/// handshake) reads as a slow provider, and power of two choices passes it over until that
/// estimate decays: seconds without traffic for a provider that just joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectWait(pub Duration);

/// Marks the answer to one of the first [`WARMING_REQUESTS`] requests on a connection to a
/// peer: a response extension. The peer serves a new connection on the worker with the fewest
/// open, whose own connections to its agent may not be open yet, so these answers carry the
/// provider's set-up as well as its latency. The balancer counts their outcome but takes no
/// latency sample from them, as [`ConnectWait`] leaves out this side's set-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Warming;

/// How many requests on a new connection to a peer answer [`Warming`].
pub const WARMING_REQUESTS: u64 = 8;

/// How often an HTTP/2 PING checks a pooled connection, and how long its answer may take before
/// the connection is given up: a peer that vanished without closing (its host gone) would
/// otherwise hold the next requests until their time-outs.
const KEEP_ALIVE: Duration = Duration::from_secs(10);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);

type Slot = Arc<tokio::sync::Mutex<Option<Conn>>>;
type Slots = crate::FastMap<String, crate::FastMap<String, Slot>>;

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// HTTP/2 connections to peer proxies, keyed by address and expected identity: one per peer
/// for each worker thread, so a call and the connection it goes out on share a thread
/// ([`crate::workers`]).
#[derive(Debug)]
pub struct PeerPool {
    cell: Arc<CredentialCell>,
    trust: Arc<TrustStore>,
    /// TCP connect and TLS handshake, in milliseconds (the mesh settings' `connect_timeout_ms`).
    connect_timeout_ms: AtomicU64,
    /// For each worker: address → expected identity → connection (looked up without
    /// allocating).
    slots: Box<[Mutex<Slots>]>,
    configs: Mutex<HashMap<String, Arc<rustls::ClientConfig>>>,
}

impl PeerPool {
    /// A pool presenting `cell`'s certificate and verifying peers against `trust`, for
    /// `workers` worker threads.
    pub fn new(
        cell: Arc<CredentialCell>,
        trust: Arc<TrustStore>,
        connect_timeout: Duration,
        workers: usize,
    ) -> Self {
        Self {
            cell,
            trust,
            connect_timeout_ms: AtomicU64::new(millis(connect_timeout)),
            slots: crate::workers::per_worker(workers, |_| Mutex::default()),
            configs: Mutex::new(HashMap::new()),
        }
    }

    /// Changes the connect time-out for new connections (the mesh settings changed).
    pub fn set_connect_timeout(&self, timeout: Duration) {
        self.connect_timeout_ms
            .store(millis(timeout), Ordering::Relaxed);
    }

    fn config(&self, identity: &str) -> Result<Arc<rustls::ClientConfig>, PeerError> {
        let mut configs = self.configs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = configs.get(identity) {
            return Ok(c.clone());
        }
        let expected: SpiffeId = identity
            .parse()
            .map_err(|_| PeerError::BadIdentity(identity.to_owned()))?;
        let config = capmesh_certs::tls::client_config(
            Some(self.cell.clone()),
            self.trust.clone(),
            expected,
            &[b"h2"],
        )
        .map_err(|e| PeerError::Tls {
            addr: String::new(),
            detail: e.to_string(),
        })?;
        configs.insert(identity.to_owned(), config.clone());
        Ok(config)
    }

    async fn connect(&self, addr: &str, identity: &str) -> Result<Conn, PeerError> {
        let config = self.config(identity)?;
        let timeout = Duration::from_millis(self.connect_timeout_ms.load(Ordering::Relaxed));
        let work = async {
            let tcp = TcpStream::connect(addr)
                .await
                .map_err(|source| PeerError::Connect {
                    addr: addr.to_owned(),
                    source,
                })?;
            let _ = tcp.set_nodelay(true);
            let tls = capmesh_certs::tls::connect(config, tcp)
                .await
                .map_err(|e| PeerError::Tls {
                    addr: addr.to_owned(),
                    detail: Refusal::from_io_error(&e)
                        .map(|r| r.to_string())
                        .unwrap_or_else(|| e.to_string()),
                })?;
            let server_chain: Vec<_> = tls
                .get_ref()
                .1
                .peer_certificates()
                .map(|c| c.to_vec())
                .unwrap_or_default();
            // Whether the peer has sent anything. An HTTP/2 server sends its SETTINGS before it
            // serves a stream, so a connection that failed before a single byte came back was
            // never accepted (with TLS 1.3 a server that refuses the client's certificate says
            // so only after the client sent its first request): nothing on it reached an agent.
            let heard = Arc::new(AtomicBool::new(false));
            let told = heard.clone();
            let tls = Watched {
                io: tls,
                seen: move |_: &[u8]| told.store(true, Ordering::Release),
            };
            let (sender, mut connection) = h2::client::Builder::new()
                .initial_window_size(1024 * 1024)
                .initial_connection_window_size(4 * 1024 * 1024)
                .handshake::<_, Bytes>(tls)
                .await
                .map_err(|source| PeerError::NotSent {
                    addr: addr.to_owned(),
                    source,
                })?;
            let pings = connection.ping_pong();
            let closed = Arc::new(AtomicBool::new(false));
            let peer = addr.to_owned();
            let (trust, chain) = (self.trust.clone(), server_chain);
            let ended = closed.clone();
            tokio::spawn(async move {
                let outcome = drive(connection, pings, &trust, &chain).await;
                ended.store(true, Ordering::Release);
                if let Err(e) = outcome {
                    tracing::debug!(peer = %peer, error = %e, "peer connection ended");
                }
            });
            Ok(Conn {
                sender,
                heard,
                closed,
                sent: Arc::default(),
            })
        };
        tokio::time::timeout(timeout, work)
            .await
            .unwrap_or_else(|_| {
                Err(PeerError::Timeout {
                    addr: addr.to_owned(),
                    after: timeout,
                })
            })
    }

    /// The pooled connection to `addr` proving `identity`, opened when there is none (or it
    /// ended), and how long this took when the request had to wait for it.
    async fn sender(
        &self,
        addr: &str,
        identity: &str,
    ) -> Result<(Conn, Option<Duration>), PeerError> {
        let slot = {
            let mut slots = crate::workers::mine(&self.slots)
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match slots.get(addr).and_then(|ids| ids.get(identity)) {
                Some(slot) => slot.clone(),
                None => slots
                    .entry(addr.to_owned())
                    .or_default()
                    .entry(identity.to_owned())
                    .or_default()
                    .clone(),
            }
        };
        // The usual case: a live connection and nobody opening one.
        if let Ok(guard) = slot.try_lock()
            && let Some(conn) = guard.as_ref()
            && !conn.closed.load(Ordering::Acquire)
        {
            return Ok((conn.clone(), None));
        }
        let began = std::time::Instant::now();
        let mut guard = slot.lock().await;
        if let Some(conn) = guard.as_ref()
            && !conn.closed.load(Ordering::Acquire)
        {
            return Ok((conn.clone(), Some(began.elapsed())));
        }
        // Boxed: opening a connection is rare, and its future (TCP, TLS and HTTP/2 handshakes)
        // is several kilobytes that every call's future would otherwise carry and copy.
        let conn = Box::pin(self.connect(addr, identity)).await?;
        *guard = Some(conn.clone());
        Ok((conn, Some(began.elapsed())))
    }

    /// Sends `req` to the proxy at `addr`, which must prove `identity`. The error says whether
    /// the request can have reached the peer ([`PeerError::may_have_reached`]).
    pub async fn send(
        &self,
        addr: &str,
        identity: &str,
        req: Request<Bytes>,
    ) -> Result<Response<PeerBody>, PeerError> {
        let (
            Conn {
                sender,
                heard,
                sent,
                ..
            },
            waited,
        ) = self.sender(addr, identity).await?;
        let warming = sent.fetch_add(1, Ordering::Relaxed) < WARMING_REQUESTS;
        let mut sender = sender
            .ready()
            .await
            .map_err(|source| PeerError::from_send(addr, true, false, source))?;
        let (mut parts, body) = req.into_parts();
        strip_connection_headers(&mut parts.headers);
        if !body.is_empty() && !parts.headers.contains_key(CONTENT_LENGTH) {
            parts
                .headers
                .insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        let end = body.is_empty();
        // Refused here (the connection is closing, or the head is not valid HTTP/2): not sent.
        let (response, mut stream) = sender
            .send_request(Request::from_parts(parts, ()), end)
            .map_err(|source| PeerError::from_send(addr, true, false, source))?;
        let sent = |source: h2::Error| {
            PeerError::from_send(addr, false, heard.load(Ordering::Acquire), source)
        };
        if !end {
            // Queued beside the HEADERS: both go out in the connection's next write.
            stream.send_data(body, true).map_err(sent)?;
        }
        let response = response.await.map_err(sent)?;
        let mut response = response.map(PeerBody::new);
        if let Some(waited) = waited {
            response.extensions_mut().insert(ConnectWait(waited));
        }
        if warming {
            response.extensions_mut().insert(Warming);
        }
        Ok(response)
    }

    /// Drops pooled connections to peers that are no longer in the snapshot.
    pub fn retain(&self, keep: impl Fn(&str, &str) -> bool) {
        for slots in &self.slots {
            let mut slots = slots.lock().unwrap_or_else(|p| p.into_inner());
            for (addr, ids) in slots.iter_mut() {
                ids.retain(|id, _| keep(addr, id));
            }
            slots.retain(|_, ids| !ids.is_empty());
        }
    }
}

/// Headers that name the HTTP/1 connection and are not allowed in HTTP/2 (RFC 9113 §8.2.2):
/// dropped, with those the `Connection` header lists, and `TE` unless it is `trailers`. Used on
/// the requests sent to peers and on the responses a peer gets ([`crate::serve`]).
pub(crate) fn strip_connection_headers(headers: &mut HeaderMap) {
    // Constant names: a `&str` key is parsed again on every lookup, and this runs per request.
    const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
    const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
    // Most heads have none of them (a request the mesh wrote, an agent's answer): one look at
    // each name costs less than a lookup of each of them.
    let connection_specific = |name: &HeaderName| {
        name == CONNECTION
            || name == TE
            || name == TRANSFER_ENCODING
            || name == UPGRADE
            || name == KEEP_ALIVE
            || name == PROXY_CONNECTION
    };
    if !headers.keys().any(connection_specific) {
        return;
    }
    if let Some(listed) = headers.remove(CONNECTION)
        && let Ok(names) = listed.to_str()
    {
        for name in names.split(',') {
            if let Ok(name) = HeaderName::from_bytes(name.trim().as_bytes()) {
                headers.remove(name);
            }
        }
    }
    for name in [KEEP_ALIVE, PROXY_CONNECTION, TRANSFER_ENCODING, UPGRADE] {
        headers.remove(name);
    }
    if headers.get(TE).is_some_and(|te| te != "trailers") {
        headers.remove(TE);
    }
}

/// Drives a connection to a peer until it ends: closed, failed (the error), a keep-alive PING
/// unanswered (why), or the peer's certificate no longer trusted (revoked, or expired while
/// pooled; logged, and `Ok`). Dropping the connection closes it. The PINGs and the trust are
/// polled only when one of them woke the task ([`Wakes`]), not on each of the connection's
/// wakes, which come several times a call. A plaintext peer (empty chain) is never cut off.
async fn drive<T>(
    mut connection: h2::client::Connection<T, Bytes>,
    pings: Option<h2::PingPong>,
    trust: &TrustStore,
    chain: &[CertificateDer<'static>],
) -> Result<(), String>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let keep_alive = keep_alive(pings);
    let refused = trust.until_refused(chain, capmesh_certs::PeerRole::Server);
    tokio::pin!(keep_alive, refused);
    let mut outcome = Ok(());
    let wakes = Wakes::new();
    std::future::poll_fn(|cx| {
        wakes.poll(cx, |cx, rare| {
            if let Some(rare) = rare {
                if let Poll::Ready(refusal) = refused.as_mut().poll(rare) {
                    tracing::info!(reason = %refusal, "closing a connection: the peer's certificate is no longer trusted");
                    return Poll::Ready(());
                }
                if let Poll::Ready(silent) = keep_alive.as_mut().poll(rare) {
                    outcome = Err(silent);
                    return Poll::Ready(());
                }
            }
            Pin::new(&mut connection).poll(cx).map(|done| {
                outcome = done.map_err(|e| e.to_string());
            })
        })
    })
    .await;
    outcome
}

/// Pings the peer every [`KEEP_ALIVE`]; returns (why) when an answer does not come within
/// [`KEEP_ALIVE_TIMEOUT`] or cannot be asked for, which ends the connection. Both ends of a
/// connection between proxies ping: the pool here, the peer's listener in [`crate::serve`].
pub(crate) async fn keep_alive(pings: Option<h2::PingPong>) -> String {
    let Some(mut pings) = pings else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(KEEP_ALIVE).await;
        match tokio::time::timeout(KEEP_ALIVE_TIMEOUT, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return format!("keep-alive PING failed: {e}"),
            Err(_) => {
                return format!(
                    "no answer to a keep-alive PING in {} s",
                    KEEP_ALIVE_TIMEOUT.as_secs()
                );
            }
        }
    }
}

/// A peer's response body (or, on the inbound listener, the body of a peer's request): its DATA
/// frames, then its trailers. The flow-control window is given back as each frame is read. A
/// reset with `NO_ERROR` after the response began ends the body early without failing it
/// (RFC 9113 §8.1), as HTTP clients read it.
#[derive(Debug)]
pub struct PeerBody {
    recv: h2::RecvStream,
    data_done: bool,
    /// The endpoint that answered, once the balancer has named it.
    served: Option<Arc<capmesh_api::Endpoint>>,
}

impl PeerBody {
    /// The body arriving on `recv`.
    pub(crate) fn new(recv: h2::RecvStream) -> Self {
        Self {
            recv,
            data_done: false,
            served: None,
        }
    }

    /// Which endpoint served this response, as the balancer recorded it
    /// ([`crate::forward::Balance`]). Kept in the body rather than in the response's
    /// extensions, which would cost two allocations on every call.
    pub fn served(&self) -> Option<&Arc<capmesh_api::Endpoint>> {
        self.served.as_ref()
    }

    pub(crate) fn set_served(&mut self, endpoint: Arc<capmesh_api::Endpoint>) {
        self.served = Some(endpoint);
    }
}

impl Body for PeerBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        let early_end = |e: &h2::Error| e.reason() == Some(h2::Reason::NO_ERROR);
        if !this.data_done {
            match std::task::ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) if early_end(&e) => return Poll::Ready(None),
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => this.data_done = true,
            }
        }
        match std::task::ready!(this.recv.poll_trailers(cx)) {
            Ok(trailers) => Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t)))),
            Err(e) if early_end(&e) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn connection_specific_headers_go_and_the_rest_stay() {
        // A head with none of them is left as it is.
        let mut plain = head(&[
            ("content-type", "application/json"),
            ("accept", "application/json, text/event-stream"),
            ("te", "trailers"),
            ("x-tenant", "t1"),
        ]);
        let before = plain.clone();
        strip_connection_headers(&mut plain);
        assert_eq!(plain, before);

        // Each of them goes, with the names `connection` lists; `te: trailers` stays.
        let mut h = head(&[
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("te", "trailers"),
            ("x-tenant", "t1"),
        ]);
        strip_connection_headers(&mut h);
        let mut left: Vec<_> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["te", "x-tenant"]);

        // Found on its own, any one of them sets the stripping off; `te` other than
        // `trailers` goes.
        for name in [
            "keep-alive",
            "proxy-connection",
            "upgrade",
            "transfer-encoding",
            "te",
        ] {
            let mut h = head(&[("x-tenant", "t1")]);
            h.insert(
                HeaderName::from_static(name),
                HeaderValue::from_static("gzip"),
            );
            strip_connection_headers(&mut h);
            assert_eq!(h, head(&[("x-tenant", "t1")]), "{name} was left");
        }
    }
}

//! The outbound listener's HTTP/1.1 server: the agent's calls, read and answered in the
//! connection's own loop.
//!
//! What an agent sends the mesh is almost always the same shape: an HTTP/1.1 `POST` whose body
//! has a `content-length`. Such a request is read here whole, handed to the stack, and its
//! answer written back with its head and body in one write where the body is already there.
//! Anything else (another method, HTTP/1.0, a chunked or too large body, `Expect`, `Upgrade`,
//! HTTP/2's preface, a head that does not parse) hands the connection, with the bytes read so
//! far, to hyper's server ([`super::connection_until`]) for the rest of its life: hyper answers
//! it as it answered every request before.
//!
//! The limits are the same as under hyper: the head deadline from the client's first byte and
//! from each answer's end, the idle timeout, a graceful close on drain (after the answer in
//! flight, with `connection: close`), and a client that closes its end while its call is
//! answered drops the call, as hyper's does by default. benches/RESULTS.md, "The agent's
//! server in the connection's loop", has what it saves.

use std::future::{Future, poll_fn};
use std::io;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, DATE, TRANSFER_ENCODING};
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body::Body;
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::{Activity, Closing, ConnService, Events, InFlight, Limits};
use crate::BoxBody;
use crate::agent_http::{decimal, field_spans, has_close, header_line as line, parse_decimal};
use crate::io::Rewind;
use crate::wakes::Wakes;

/// A request's body on the outbound listener: hyper's, or one read whole here.
pub type AgentBody = http_body_util::Either<Incoming, Full<Bytes>>;

/// The most bytes of a head read here; a longer one goes to hyper, which has its own limit.
const MAX_HEAD: usize = 64 * 1024;
/// Header fields parsed here; a request with more goes to hyper.
const FIELDS: usize = 32;
/// How much room each read is given at least.
const READ_ROOM: usize = 8 * 1024;
/// An answer's body frame larger than this is written on its own, not copied behind the head.
const INLINE_BODY: usize = 16 * 1024;
/// The most of an answer gathered before it is written.
const OUT_ROOM: usize = 64 * 1024;

/// Serves one connection of the outbound listener with `svc` under `limits` until it closes or
/// `drain` turns true (then gracefully); requests with a body over `max_body` go to hyper,
/// whose stack answers 413.
pub async fn connection<S>(
    io: TcpStream,
    svc: S,
    limits: Limits,
    drain: watch::Receiver<bool>,
    max_body: usize,
) where
    S: ConnService<AgentBody>,
{
    let activity = Arc::new(Activity::new());
    let closing = AtomicBool::new(false);
    let mut events = Events::new(
        &limits,
        None::<Pin<Box<std::future::Pending<String>>>>,
        drain.clone(),
        Some(limits.header_read_timeout),
    );
    let mut close = pin!(std::future::pending::<()>());
    let wakes = Wakes::new();
    let mut served = pin!(serve(io, svc.clone(), &activity, &closing, max_body));
    let mut outcome = None;
    poll_fn(|cx| {
        wakes.poll(cx, |cx, rare| {
            if let Some(rare) = rare {
                match events.poll(&mut close, &activity, rare) {
                    Some(Closing::Now) => return Poll::Ready(()),
                    Some(Closing::Gracefully) => closing.store(true, Ordering::Release),
                    None => {}
                }
            }
            let done = ready!(served.as_mut().poll(cx));
            outcome = Some(done);
            Poll::Ready(())
        })
    })
    .await;
    if let Some(Served::Handover(io, read)) = outcome {
        // Boxed: hyper's connection is large, and a connection's future is moved whole into
        // its task when the task is spawned (every connection pays for what is inline).
        Box::pin(hand_over(
            io,
            read,
            svc,
            limits,
            drain,
            closing.load(Ordering::Acquire),
        ))
        .await;
    }
}

/// Serves the rest of a connection with hyper (see the module docs): `read` is what was read of
/// it, and `closing` whether the listener began to drain or the connection idled out.
async fn hand_over<S>(
    io: TcpStream,
    read: BytesMut,
    svc: S,
    limits: Limits,
    drain: watch::Receiver<bool>,
    closing: bool,
) where
    S: ConnService<AgentBody>,
{
    let io = Rewind {
        prefix: read.freeze(),
        io,
    };
    if !closing {
        let svc =
            tower::util::MapRequest::new(svc, |req: Request<Incoming>| req.map(AgentBody::Left));
        super::connection_until(io, svc, limits, drain, std::future::pending()).await;
        return;
    }
    // Draining already, with a request on its way (a connection with nothing read is not
    // handed over while draining): hyper, told at once, would close the connection before it
    // read that request. It is told once the request has reached the stack, and then closes
    // after the answer, as this server does.
    let reached = Arc::new(tokio::sync::Notify::new());
    let svc = {
        let reached = reached.clone();
        tower::util::MapRequest::new(svc, move |req: Request<Incoming>| {
            reached.notify_one();
            req.map(AgentBody::Left)
        })
    };
    let (tell, told) = watch::channel(false);
    let later = async move {
        reached.notified().await;
        let _ = tell.send(true);
        // Kept, so that hyper's drain does not see the sender gone.
        std::future::pending::<()>().await;
    };
    tokio::select! {
        () = super::connection_until(io, svc, limits, told, std::future::pending()) => {}
        () = later => {}
    }
}

/// How [`serve`] ended.
enum Served {
    /// The connection is closed (or to be dropped).
    Closed,
    /// The connection and what was read of it, for hyper.
    Handover(TcpStream, BytesMut),
}

/// The connection's loop: a request read, answered, and the next.
async fn serve<S>(
    mut io: TcpStream,
    svc: S,
    activity: &Arc<Activity>,
    closing: &AtomicBool,
    max_body: usize,
) -> Served
where
    S: ConnService<AgentBody>,
{
    let mut buf = BytesMut::new();
    let mut heard = false;
    loop {
        let head = loop {
            match parse(&mut buf, max_body) {
                Parsed::Request(head) => break head,
                Parsed::Other => return Served::Handover(io, buf),
                Parsed::Partial if buf.len() >= MAX_HEAD => return Served::Handover(io, buf),
                Parsed::Partial => {}
            }
            let idle = buf.is_empty();
            let read = poll_fn(|cx| {
                // Drained or idle past the timeout: closed between requests, never during one.
                if idle && closing.load(Ordering::Acquire) {
                    return Poll::Ready(Ok(0));
                }
                poll_fill(&mut io, &mut buf, cx)
            })
            .await;
            match read {
                Ok(0) | Err(_) => return Served::Closed,
                Ok(_) => {}
            }
            // The head deadline runs from here ([`Activity::heard`]), then from each answer's
            // end.
            if !heard {
                heard = true;
                activity.heard();
            }
        };
        activity.started.store(true, Ordering::Release);
        activity.open.fetch_add(1, Ordering::AcqRel);
        let in_flight = InFlight(activity.clone());
        while buf.len() < head.length {
            // Room as the body comes, not all its claimed length at once.
            buf.reserve((head.length - buf.len()).min(READ_ROOM * 8));
            match poll_fn(|cx| poll_fill(&mut io, &mut buf, cx)).await {
                Ok(0) | Err(_) => return Served::Closed,
                Ok(_) => {}
            }
        }
        let body = buf.split_to(head.length).freeze();
        let mut req = Request::new(AgentBody::Right(Full::new(body)));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = head.uri;
        *req.headers_mut() = head.headers;
        let call = svc.clone().call(req);
        let Some(response) = answer(call, &mut io, &mut buf).await else {
            return Served::Closed;
        };
        let close = head.close
            || closing.load(Ordering::Acquire)
            || response
                .headers()
                .get(CONNECTION)
                .is_some_and(|v| has_close(v.as_bytes()));
        match respond(&mut io, &mut buf, response, close).await {
            Ok(true) => drop(in_flight),
            Ok(false) | Err(_) => return Served::Closed,
        }
        if close {
            let _ = io.shutdown().await;
            return Served::Closed;
        }
    }
}

/// Reads what the client sends into `buf`: the number of bytes, 0 at its end.
fn poll_fill(
    io: &mut TcpStream,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < READ_ROOM / 4 {
        buf.reserve(READ_ROOM);
    }
    tokio_util::io::poll_read_buf(Pin::new(io), cx, buf)
}

/// Whether the client has closed its end (or the connection failed): read while its call is
/// answered, so that a client gone drops its call. What it sends meanwhile (its next request)
/// is kept in `buf`, up to a head's worth.
fn poll_gone(io: &mut TcpStream, buf: &mut BytesMut, cx: &mut Context<'_>) -> Poll<()> {
    while buf.len() < MAX_HEAD {
        match poll_fill(io, buf, cx) {
            Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(()),
            Poll::Ready(Ok(_)) => {}
            Poll::Pending => break,
        }
    }
    Poll::Pending
}

/// The stack's answer to `call`; `None` when the client went away first.
async fn answer<F>(call: F, io: &mut TcpStream, buf: &mut BytesMut) -> Option<Response<BoxBody>>
where
    F: Future<Output = Result<Response<BoxBody>, std::convert::Infallible>> + Unpin,
{
    let mut call = call;
    poll_fn(|cx| {
        if let Poll::Ready(Ok(response)) = Pin::new(&mut call).poll(cx) {
            return Poll::Ready(Some(response));
        }
        poll_gone(io, buf, cx).map(|()| None)
    })
    .await
}

/// Writes `response`: its head and, where the body is already there, the body in the same
/// write. Tells whether the whole answer was sent (and the connection may carry another).
async fn respond(
    io: &mut TcpStream,
    buf: &mut BytesMut,
    response: Response<BoxBody>,
    close: bool,
) -> io::Result<bool> {
    let (parts, mut body) = response.into_parts();
    let status = parts.status;
    let bodiless = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let length = if bodiless {
        Some(0)
    } else {
        body.size_hint().exact()
    };
    let mut out = Vec::with_capacity(256 + length.map_or(0, |n| (n as usize).min(INLINE_BODY)));
    write_head(&mut out, status, &parts.headers, bodiless, length, close);
    if bodiless {
        io.write_all(&out).await?;
        return Ok(true);
    }
    let chunked = length.is_none();
    let mut sent = 0u64;
    loop {
        // A frame already there goes behind what is waiting to be written; else that is
        // written, and the frame waited for (and for the client going away meanwhile).
        let polled = poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await;
        let frame = match polled {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                if !out.is_empty() {
                    io.write_all(&out).await?;
                    out.clear();
                }
                let waited = poll_fn(|cx| {
                    if let Poll::Ready(frame) = Pin::new(&mut body).poll_frame(cx) {
                        return Poll::Ready(Some(frame));
                    }
                    poll_gone(io, buf, cx).map(|()| None)
                })
                .await;
                match waited {
                    Some(frame) => frame,
                    None => return Ok(false),
                }
            }
        };
        match frame {
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    // Trailers: HTTP/1.1 sends them only to a client that asked (`TE:
                    // trailers`); hyper left them out too.
                    continue;
                };
                if data.is_empty() {
                    continue;
                }
                sent += data.len() as u64;
                if length.is_some_and(|n| sent > n) {
                    tracing::debug!("an answer's body was longer than its length");
                    return Ok(false);
                }
                if chunked {
                    out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
                }
                if data.len() > INLINE_BODY {
                    io.write_all(&out).await?;
                    out.clear();
                    io.write_all(&data).await?;
                } else {
                    out.extend_from_slice(&data);
                }
                if chunked {
                    out.extend_from_slice(b"\r\n");
                }
                // A body whose frames are all there at once is still written as it goes.
                if out.len() >= OUT_ROOM {
                    io.write_all(&out).await?;
                    out.clear();
                }
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "an answer's body failed");
                if !out.is_empty() {
                    io.write_all(&out).await?;
                }
                return Ok(false);
            }
            None => break,
        }
    }
    if chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    } else if length != Some(sent) {
        tracing::debug!("an answer's body was shorter than its length");
        return Ok(false);
    }
    if !out.is_empty() {
        io.write_all(&out).await?;
    }
    Ok(true)
}

/// The status line and header fields of an answer, with the framing this server states.
fn write_head(
    out: &mut Vec<u8>,
    status: StatusCode,
    headers: &HeaderMap,
    bodiless: bool,
    length: Option<u64>,
    close: bool,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        // The framing and the connection's fate are this server's to state.
        if name == CONTENT_LENGTH || name == TRANSFER_ENCODING || name == CONNECTION {
            continue;
        }
        line(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if !bodiless {
        match length {
            Some(n) => line(
                out,
                b"content-length",
                decimal(usize::try_from(n).unwrap_or(usize::MAX), &mut [0; 20]),
            ),
            None => line(out, b"transfer-encoding", b"chunked"),
        }
    }
    if close {
        line(out, b"connection", b"close");
    }
    if !headers.contains_key(DATE) {
        date(|now| line(out, b"date", now));
    }
    out.extend_from_slice(b"\r\n");
}

/// Calls `with` with the `date` of an answer sent now: formatted once a second per thread, as
/// hyper does.
fn date(with: impl FnOnce(&[u8])) {
    thread_local! {
        static NOW: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((u64::MAX, String::new())) };
    }
    let second = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    NOW.with_borrow_mut(|(at, text)| {
        if *at != second {
            *at = second;
            *text = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(second));
        }
        with(text.as_bytes());
    });
}

/// A request head this server serves.
#[derive(Debug)]
pub struct Head {
    /// Its target (origin form).
    pub uri: Uri,
    /// Its header fields.
    pub headers: HeaderMap,
    /// The body's length.
    pub length: usize,
    /// The client asked to close the connection after the answer.
    pub close: bool,
}

/// What [`parse`] found at the front of the bytes read.
#[derive(Debug)]
pub enum Parsed {
    /// Not all of the head has come.
    Partial,
    /// A request this server serves, its head taken off `buf`.
    Request(Head),
    /// Anything else: for hyper, with `buf` as it was.
    Other,
}

/// The path every federated call takes, without parsing it again.
static MCP: std::sync::LazyLock<Uri> = std::sync::LazyLock::new(|| Uri::from_static("/mcp"));

/// Takes a request head off the front of `buf` if it is one this server serves (see the module
/// docs); leaves `buf` as it was otherwise. Fuzzed (`fuzz/src/bin/agent_request.rs`).
pub fn parse(buf: &mut BytesMut, max_body: usize) -> Parsed {
    if buf.is_empty() {
        return Parsed::Partial;
    }
    let mut fields = [httparse::EMPTY_HEADER; FIELDS];
    let mut parsed = httparse::Request::new(&mut fields);
    let len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Other,
    };
    if parsed.version != Some(1) || parsed.method != Some("POST") {
        return Parsed::Other;
    }
    let Some(path) = parsed.path.filter(|p| p.starts_with('/')) else {
        return Parsed::Other;
    };
    let mut length = None;
    let mut close = false;
    for field in parsed.headers.iter() {
        let name = field.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            match (
                length,
                parse_decimal(field.value).and_then(|n| usize::try_from(n).ok()),
            ) {
                (None, Some(n)) if n <= max_body => length = Some(n),
                // Twice, not a number, or too large.
                _ => return Parsed::Other,
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding")
            || name.eq_ignore_ascii_case(b"expect")
            || name.eq_ignore_ascii_case(b"upgrade")
        {
            return Parsed::Other;
        } else if name.eq_ignore_ascii_case(b"connection") {
            close |= has_close(field.value);
        }
    }
    // Where the path and each field lie in the head, so that they can share its bytes.
    let path_at = (path.as_ptr() as usize - buf.as_ptr() as usize, path.len());
    let is_mcp = path == "/mcp";
    let at = field_spans::<FIELDS>(buf, parsed.headers);
    let count = parsed.headers.len();
    let uri = if is_mcp {
        Some(MCP.clone())
    } else {
        PathAndQuery::try_from(&buf[path_at.0..path_at.0 + path_at.1])
            .ok()
            .map(Uri::from)
    };
    let head = buf.split_to(len).freeze();
    // httparse checked the names as tokens, and the path and values for control bytes, as
    // `http` does; what `http` refuses still (never seen) goes to hyper as it came.
    let mut headers = HeaderMap::with_capacity(count);
    for &(n0, n1, v0, v1) in &at[..count] {
        let name = HeaderName::from_bytes(&head[n0..n1]);
        let value = HeaderValue::from_maybe_shared(head.slice(v0..v1));
        let (Ok(name), Ok(value)) = (name, value) else {
            drop(headers);
            return unparsed(buf, head);
        };
        headers.append(name, value);
    }
    let Some(uri) = uri else {
        drop(headers);
        return unparsed(buf, head);
    };
    Parsed::Request(Head {
        uri,
        headers,
        length: length.unwrap_or(0),
        close,
    })
}

/// Puts a head taken off `buf` back in front of it, for hyper.
fn unparsed(buf: &mut BytesMut, head: Bytes) -> Parsed {
    let mut whole = BytesMut::with_capacity(head.len() + buf.len());
    whole.extend_from_slice(&head);
    whole.extend_from_slice(buf);
    *buf = whole;
    Parsed::Other
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::convert::Infallible;
    use std::sync::Mutex;
    use std::time::Instant;

    use http_body::Frame;
    use http_body_util::{BodyExt, StreamBody};
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;
    use tokio::sync::{mpsc, oneshot};
    use tokio::task::JoinHandle;

    use super::*;
    use crate::agent_http::{Framing, Head as AnswerHead, parse_head};

    type Answer = Pin<Box<dyn Future<Output = Result<Response<BoxBody>, Infallible>> + Send>>;

    const DEADLINE: Duration = Duration::from_millis(300);
    const MAX_BODY: usize = 1024;

    /// What the stack was given.
    #[derive(Debug)]
    struct Seen {
        method: Method,
        path: String,
        /// Read whole by this server (not hyper's body).
        read_here: bool,
        body: Bytes,
        test_header: Option<String>,
    }

    struct Served {
        client: TcpStream,
        buf: BytesMut,
        seen: Arc<Mutex<Vec<Seen>>>,
        drain: watch::Sender<bool>,
        server: JoinHandle<()>,
    }

    /// One loopback connection served by [`connection`], whose stack answers each request's
    /// body with `answer`.
    async fn serve(answer: fn(Bytes) -> Answer) -> Served {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (io, _) = listener.accept().await.unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let svc = {
            let seen = seen.clone();
            tower::service_fn(move |req: Request<AgentBody>| -> Answer {
                let seen = seen.clone();
                Box::pin(async move {
                    let (parts, body) = req.into_parts();
                    let read_here = matches!(body, AgentBody::Right(_));
                    let body = body.collect().await.unwrap().to_bytes();
                    seen.lock().unwrap().push(Seen {
                        method: parts.method,
                        path: parts.uri.to_string(),
                        read_here,
                        body: body.clone(),
                        test_header: parts
                            .headers
                            .get("x-test")
                            .map(|v| v.to_str().unwrap().to_owned()),
                    });
                    answer(body).await
                })
            })
        };
        let limits = Limits {
            header_read_timeout: DEADLINE,
            ..Limits::default()
        };
        let (drain, drain_rx) = watch::channel(false);
        let server = tokio::spawn(connection(io, svc, limits, drain_rx, MAX_BODY));
        Served {
            client,
            buf: BytesMut::new(),
            seen,
            drain,
            server,
        }
    }

    fn echo(body: Bytes) -> Answer {
        Box::pin(async move { Ok(Response::new(crate::boxed(Full::new(body)))) })
    }

    fn post(body: &str, extra: &str) -> String {
        format!(
            "POST /mcp HTTP/1.1\r\nhost: 127.0.0.1\r\nx-test: {body}\r\n{extra}content-length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    impl Served {
        async fn send(&mut self, wire: &str) {
            self.client.write_all(wire.as_bytes()).await.unwrap();
        }

        /// Reads one whole answer.
        async fn answer(&mut self) -> (AnswerHead, String) {
            let head = loop {
                match parse_head(&mut self.buf).unwrap() {
                    // `100 Continue`, to `Expect`.
                    Some(head) if head.status.is_informational() => {}
                    Some(head) => break head,
                    None => {
                        let n = self.client.read_buf(&mut self.buf).await.unwrap();
                        assert!(n > 0, "closed before an answer's head");
                    }
                }
            };
            let mut framing = Framing::of(&head, false).unwrap();
            let mut body = Vec::new();
            while !framing.done() {
                match framing.decode(&mut self.buf).unwrap() {
                    Some(piece) => body.extend_from_slice(&piece),
                    None if framing.done() => {}
                    None => {
                        let n = self.client.read_buf(&mut self.buf).await.unwrap();
                        assert!(n > 0, "closed inside an answer's body");
                    }
                }
            }
            (head, String::from_utf8(body).unwrap())
        }

        /// Whether the server closed the connection (and its task ended) within `bound`.
        async fn closed_within(&mut self, bound: Duration) -> bool {
            let read = tokio::time::timeout(bound, self.client.read_buf(&mut self.buf)).await;
            matches!(read, Ok(Ok(0)) | Ok(Err(_)))
                && tokio::time::timeout(Duration::from_secs(1), &mut self.server)
                    .await
                    .is_ok()
        }

        /// Waits until the stack has been given a request.
        async fn called(&self) {
            while self.seen.lock().unwrap().is_empty() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }

        fn seen(&self) -> Vec<(String, bool, String)> {
            self.seen
                .lock()
                .unwrap()
                .iter()
                .map(|s| {
                    (
                        format!("{} {}", s.method, s.path),
                        s.read_here,
                        String::from_utf8_lossy(&s.body).into_owned(),
                    )
                })
                .collect()
        }
    }

    #[tokio::test]
    async fn posts_are_read_here_answered_with_their_length_and_the_connection_kept() {
        let mut s = serve(echo).await;
        s.send(&post("hello", "")).await;
        let (head, body) = s.answer().await;
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(body, "hello");
        assert_eq!(head.headers["content-length"], "5");
        assert!(head.headers.contains_key("date"));
        assert!(head.keep_alive);
        s.send(&post("again", "")).await;
        assert_eq!(s.answer().await.1, "again");
        assert_eq!(
            s.seen(),
            [
                ("POST /mcp".into(), true, "hello".into()),
                ("POST /mcp".into(), true, "again".into()),
            ]
        );
        assert_eq!(
            s.seen.lock().unwrap()[0].test_header.as_deref(),
            Some("hello")
        );
    }

    #[tokio::test]
    async fn pipelined_requests_are_answered_in_order() {
        let mut s = serve(echo).await;
        let wire = format!(
            "{}{}{}",
            post("one", ""),
            post("two", ""),
            post("three", "")
        );
        s.send(&wire).await;
        for want in ["one", "two", "three"] {
            assert_eq!(s.answer().await.1, want);
        }
        assert!(s.seen().iter().all(|(_, read_here, _)| *read_here));
    }

    #[tokio::test]
    async fn what_this_server_does_not_serve_goes_to_hyper_on_the_same_connection() {
        let mut s = serve(echo).await;
        s.send(&post("mine", "")).await;
        assert_eq!(s.answer().await.1, "mine");
        // A chunked body: hyper's, with the bytes already read given back to it.
        s.send(
            "POST /capabilities/x/mcp HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n\r\n\
             3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .await;
        assert_eq!(s.answer().await.1, "abcde");
        s.send("GET /mcp HTTP/1.1\r\nhost: h\r\n\r\n").await;
        assert_eq!(s.answer().await.1, "");
        s.send(&post("after", "")).await;
        assert_eq!(s.answer().await.1, "after");
        assert_eq!(
            s.seen(),
            [
                ("POST /mcp".into(), true, "mine".into()),
                ("POST /capabilities/x/mcp".into(), false, "abcde".into()),
                ("GET /mcp".into(), false, "".into()),
                ("POST /mcp".into(), false, "after".into()),
            ]
        );

        // A body over the limit, HTTP/1.0, `Expect`: hyper's too.
        let big = "x".repeat(MAX_BODY + 1);
        for wire in [
            post(&big, ""),
            post("ten", "").replace("HTTP/1.1", "HTTP/1.0"),
            post("continue", "expect: 100-continue\r\n"),
        ] {
            let mut s = serve(echo).await;
            s.send(&wire).await;
            let body = s.answer().await.1;
            assert!(wire.ends_with(&body), "{body}");
            assert!(!s.seen()[0].1, "{wire} was read here");
        }
    }

    #[tokio::test]
    async fn an_answer_of_unknown_length_is_sent_chunked_as_each_piece_comes() {
        static PIECES: Mutex<Option<mpsc::Receiver<&'static str>>> = Mutex::new(None);
        let (tx, rx) = mpsc::channel(4);
        *PIECES.lock().unwrap() = Some(rx);
        fn streamed(body: Bytes) -> Answer {
            // The first call streams; the next is echoed.
            let Some(rx) = PIECES.lock().unwrap().take() else {
                return echo(body);
            };
            let pieces = futures_util::stream::unfold(rx, |mut rx| async move {
                let piece = rx.recv().await?;
                Some((
                    Ok::<_, Infallible>(Frame::data(Bytes::from_static(piece.as_bytes()))),
                    rx,
                ))
            });
            Box::pin(async move { Ok(Response::new(crate::boxed(StreamBody::new(pieces)))) })
        }
        let mut s = serve(streamed).await;
        s.send(&post("go", "")).await;
        tx.send("event: one\n\n").await.unwrap();
        let head = loop {
            if let Some(head) = parse_head(&mut s.buf).unwrap() {
                break head;
            }
            assert!(s.client.read_buf(&mut s.buf).await.unwrap() > 0);
        };
        assert_eq!(head.headers["transfer-encoding"], "chunked");
        assert!(!head.headers.contains_key("content-length"));
        // The first piece arrives while the answer is still open.
        let mut framing = Framing::of(&head, false).unwrap();
        let mut got = Vec::new();
        while got != b"event: one\n\n" {
            match framing.decode(&mut s.buf).unwrap() {
                Some(piece) => got.extend_from_slice(&piece),
                None => assert!(s.client.read_buf(&mut s.buf).await.unwrap() > 0),
            }
        }
        tx.send("event: two\n\n").await.unwrap();
        drop(tx);
        got.clear();
        while !framing.done() {
            match framing.decode(&mut s.buf).unwrap() {
                Some(piece) => got.extend_from_slice(&piece),
                None if framing.done() => {}
                None => assert!(s.client.read_buf(&mut s.buf).await.unwrap() > 0),
            }
        }
        assert_eq!(got, b"event: two\n\n");
        // And the connection carries the next call.
        s.send(&post("next", "")).await;
        assert_eq!(s.answer().await.1, "next");
    }

    #[tokio::test]
    async fn a_client_that_asks_to_close_is_answered_then_closed() {
        let mut s = serve(echo).await;
        s.send(&post("bye", "connection: close\r\n")).await;
        let (head, body) = s.answer().await;
        assert_eq!(body, "bye");
        assert_eq!(head.headers["connection"], "close");
        assert!(s.closed_within(Duration::from_secs(2)).await);
    }

    #[tokio::test]
    async fn a_client_gone_while_its_call_is_answered_drops_the_call() {
        static DROPPED: Mutex<Option<oneshot::Sender<()>>> = Mutex::new(None);
        let (tx, dropped) = oneshot::channel();
        *DROPPED.lock().unwrap() = Some(tx);
        fn never(_: Bytes) -> Answer {
            let held = DROPPED.lock().unwrap().take();
            Box::pin(async move {
                let _held = held;
                std::future::pending().await
            })
        }
        let mut s = serve(never).await;
        s.send(&post("hang", "")).await;
        s.called().await;
        let Served { client, server, .. } = s;
        drop(client);
        // The call's future is dropped, and with it what it held.
        let gone = tokio::time::timeout(Duration::from_secs(2), dropped).await;
        assert!(matches!(gone, Ok(Err(_))), "the call outlived its client");
        tokio::time::timeout(Duration::from_secs(1), server)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn a_drain_closes_an_idle_connection_and_one_in_flight_after_its_answer() {
        let mut idle = serve(echo).await;
        idle.send(&post("first", "")).await;
        idle.answer().await;
        idle.drain.send(true).unwrap();
        assert!(idle.closed_within(Duration::from_secs(2)).await);

        static RELEASE: Mutex<Option<oneshot::Receiver<()>>> = Mutex::new(None);
        let (release, rx) = oneshot::channel();
        *RELEASE.lock().unwrap() = Some(rx);
        fn held(body: Bytes) -> Answer {
            let rx = RELEASE.lock().unwrap().take().unwrap();
            Box::pin(async move {
                let _ = rx.await;
                echo(body).await
            })
        }
        let mut busy = serve(held).await;
        busy.send(&post("late", "")).await;
        busy.called().await;
        busy.drain.send(true).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        release.send(()).unwrap();
        let (head, body) = busy.answer().await;
        assert_eq!(body, "late");
        assert_eq!(head.headers["connection"], "close");
        assert!(busy.closed_within(Duration::from_secs(2)).await);
    }

    #[tokio::test]
    async fn a_request_for_hyper_still_arriving_when_the_drain_begins_is_answered() {
        let mut s = serve(echo).await;
        s.send("GET /mcp HTTP/1.1\r\nhost: h\r\n").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        s.drain.send(true).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        s.send("\r\n").await;
        let (head, body) = s.answer().await;
        assert_eq!((head.status, body.as_str()), (StatusCode::OK, ""));
        // Then closed (hyper may have written the answer before it heard of the drain, so
        // without `connection: close`).
        assert!(s.closed_within(Duration::from_secs(2)).await);
        assert_eq!(s.seen(), [("GET /mcp".into(), false, "".into())]);
    }

    #[tokio::test]
    async fn a_slow_head_and_an_idle_keep_alive_are_closed_at_the_head_deadline() {
        // Silent: a pooled client's spare connection stays open.
        let mut silent = serve(echo).await;
        assert!(!silent.closed_within(DEADLINE * 2).await);

        let mut slow = serve(echo).await;
        let began = Instant::now();
        slow.send("POST /mcp HTTP/1.1\r\nhost: h\r\n").await;
        assert!(slow.closed_within(DEADLINE * 3).await);
        let took = began.elapsed();
        assert!(took >= DEADLINE, "closed after {took:?}");
        assert!(slow.seen().is_empty());

        let mut kept = serve(echo).await;
        let asked = Instant::now();
        kept.send(&post("one", "")).await;
        kept.answer().await;
        assert!(kept.closed_within(DEADLINE * 3).await);
        // From the answer's end, which came after the request was sent.
        assert!(asked.elapsed() >= DEADLINE);
    }
}

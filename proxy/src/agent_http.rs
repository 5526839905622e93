//! The sidecar's HTTP/1.1 client for its agent, a plain-HTTP server on this host.
//!
//! The call's own future writes the request and reads the answer's head; the answer's
//! [`Body`] reads the rest from the socket as it is polled, and when the answer has ended the
//! connection goes back to an idle list of the worker that opened it ([`crate::workers`]).
//!
//! Why not hyper-util's pooled client, which this replaced: it runs every connection in a task
//! of its own and hands each request, answer head and body chunk to and from that task over
//! channels. That task and its hand-offs were about a fifth of the provider sidecar's
//! instructions per call (benches/RESULTS.md, "The agent's client in the call's task"). The
//! requests here are whole (`Bytes`), go to one known server, and need no upgrades, HTTP/2 or
//! proxies, which is what keeps this small.
//!
//! Parsing: answer heads by `httparse` (hyper's parser); the body's framing (a length, chunked,
//! or to the end of the connection, RFC 9112 §6.3) by [`Framing`], which is fuzzed
//! (`fuzz/src/bin/agent_answer.rs`). What cannot be read as HTTP/1.1 is an error naming what
//! was wrong, never a guess.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker, ready};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::{Frame, SizeHint};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// How long opening a connection to the agent may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a connection may sit idle before it is closed rather than used.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle connections kept per worker; more are closed when their answers end.
const MAX_IDLE: usize = 64;
/// The largest answer head (status line and headers) read.
const MAX_HEAD: usize = 64 * 1024;
/// The most header fields in an answer head.
const MAX_HEADERS: usize = 100;
/// Room made in the read buffer before each read.
const READ_ROOM: usize = 8 * 1024;
/// A request body up to this size is copied beside its head and written in one go.
const INLINE_BODY: usize = 16 * 1024;

/// Why a request to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No connection could be opened.
    #[error("connecting to the agent at {addr}: {source}")]
    Connect {
        /// `host:port` connected to.
        addr: String,
        /// Why it failed.
        source: io::Error,
    },
    /// Reading or writing failed.
    #[error("talking to the agent: {0}")]
    Io(#[from] io::Error),
    /// The agent closed the connection before its answer was complete.
    #[error("the agent closed the connection before its answer was complete")]
    Closed,
    /// The agent's answer is not valid HTTP/1.1.
    #[error("the agent's answer is not valid HTTP/1.1: {0}")]
    Malformed(String),
}

impl Error {
    /// Whether no connection to the agent could be opened (nothing was sent).
    pub fn is_connect(&self) -> bool {
        matches!(self, Self::Connect { .. })
    }
}

/// Connections to one agent (see the module docs).
#[derive(Debug)]
pub struct Client {
    /// `host:port` of the agent.
    addr: String,
    /// Idle connections of each worker, the most recently used last.
    idle: Box<[Mutex<Vec<Idle>>]>,
}

#[derive(Debug)]
struct Idle {
    conn: Conn,
    since: Instant,
}

impl Client {
    /// A client for the server at `addr` (`host:port`), used from `workers` worker threads.
    pub fn new(addr: String, workers: usize) -> Self {
        Self {
            addr,
            idle: crate::workers::per_worker(workers, |_| Mutex::new(Vec::new())),
        }
    }

    /// Sends `req` (its URI's path and query; `Host` as given, else the agent's) and resolves
    /// to the answer's head; the body streams from the connection as it is polled. A request
    /// that could not be written on an idle connection (the agent had closed it) is written
    /// once more on a new one: the agent cannot have read it.
    pub fn send(
        self: &Arc<Self>,
        req: Request<Bytes>,
    ) -> impl Future<Output = Result<Response<Body>, Error>> + Send + use<> {
        let client = Arc::clone(self);
        let worker = crate::workers::index();
        let worker = if worker < client.idle.len() {
            worker
        } else {
            0
        };
        let bodiless = req.method() == Method::HEAD;
        let (wire, body) = encode(&req, &client.addr);
        async move {
            let mut conn = match client.checkout(worker) {
                Some(mut conn) => match conn.write(&wire, &body).await {
                    Ok(()) => conn,
                    Err(_) => client.write_on_new(&wire, &body).await?,
                },
                None => client.write_on_new(&wire, &body).await?,
            };
            let head = conn.read_head().await?;
            let framing = Framing::of(&head, bodiless)?;
            let reuse = head.keep_alive;
            let body = Body::new(conn, framing, reuse, client, worker);
            let mut resp = Response::new(body);
            *resp.status_mut() = head.status;
            *resp.version_mut() = head.version;
            *resp.headers_mut() = head.headers;
            Ok(resp)
        }
    }

    async fn write_on_new(&self, head: &[u8], body: &Bytes) -> Result<Conn, Error> {
        let mut conn = self.connect().await?;
        conn.write(head, body).await?;
        Ok(conn)
    }

    async fn connect(&self) -> Result<Conn, Error> {
        let failed = |source| Error::Connect {
            addr: self.addr.clone(),
            source,
        };
        let io = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(self.addr.as_str()))
            .await
            .map_err(|_| {
                failed(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no answer within 1 s",
                ))
            })?
            .map_err(failed)?;
        io.set_nodelay(true).map_err(failed)?;
        Ok(Conn {
            io,
            buf: BytesMut::new(),
        })
    }

    /// The worker's most recently used idle connection that is still open.
    fn checkout(&self, worker: usize) -> Option<Conn> {
        let mut idle = self.idle[worker].lock().unwrap_or_else(|e| e.into_inner());
        while let Some(Idle { mut conn, since }) = idle.pop() {
            if since.elapsed() < IDLE_TIMEOUT && conn.open() {
                return Some(conn);
            }
        }
        None
    }

    fn checkin(&self, worker: usize, conn: Conn) {
        let mut idle = self.idle[worker].lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }
}

/// The request's head as HTTP/1.1 bytes, with its body when that is small; else the body
/// apart.
fn encode(req: &Request<Bytes>, addr: &str) -> (Vec<u8>, Bytes) {
    let body = req.body();
    let inline = body.len() <= INLINE_BODY;
    let mut w = Vec::with_capacity(256 + if inline { body.len() } else { 0 });
    w.extend_from_slice(req.method().as_str().as_bytes());
    w.push(b' ');
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    w.extend_from_slice(target.as_bytes());
    w.extend_from_slice(b" HTTP/1.1\r\n");
    let headers = req.headers();
    if !headers.contains_key(HOST) {
        header_line(&mut w, b"host", addr.as_bytes());
    }
    for (name, value) in headers {
        // The framing is this client's to state.
        if name == CONTENT_LENGTH || name == TRANSFER_ENCODING {
            continue;
        }
        header_line(&mut w, name.as_str().as_bytes(), value.as_bytes());
    }
    let bodiless = matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS
    );
    if !body.is_empty() || !bodiless {
        header_line(&mut w, b"content-length", decimal(body.len(), &mut [0; 20]));
    }
    w.extend_from_slice(b"\r\n");
    if inline {
        w.extend_from_slice(body);
        (w, Bytes::new())
    } else {
        (w, body.clone())
    }
}

/// One header field of an HTTP/1.1 head.
pub(crate) fn header_line(w: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    w.extend_from_slice(name);
    w.extend_from_slice(b": ");
    w.extend_from_slice(value);
    w.extend_from_slice(b"\r\n");
}

/// `n` in decimal, written at the end of `out`.
pub(crate) fn decimal(mut n: usize, out: &mut [u8; 20]) -> &[u8] {
    let mut at = out.len();
    loop {
        at -= 1;
        out[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &out[at..];
        }
    }
}

/// A connection to the agent and what has been read from it but not used yet.
#[derive(Debug)]
struct Conn {
    io: TcpStream,
    buf: BytesMut,
}

/// An answer's head.
#[derive(Debug)]
pub struct Head {
    /// Its status.
    pub status: StatusCode,
    /// HTTP/1.0 or HTTP/1.1.
    pub version: Version,
    /// Its header fields.
    pub headers: HeaderMap,
    /// Whether the connection may carry another request after this answer.
    pub keep_alive: bool,
}

impl Conn {
    /// Whether an idle connection is still open: the agent has neither closed it nor sent
    /// anything unasked. Costs no syscall unless the socket became readable.
    fn open(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    async fn write(&mut self, head: &[u8], body: &Bytes) -> io::Result<()> {
        self.io.write_all(head).await?;
        if !body.is_empty() {
            self.io.write_all(body).await?;
        }
        Ok(())
    }

    /// Reads what the agent sends into the buffer: the number of bytes, 0 at the end.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < READ_ROOM / 4 {
            self.buf.reserve(READ_ROOM);
        }
        loop {
            ready!(self.io.poll_read_ready(cx))?;
            match self.io.try_read_buf(&mut self.buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                read => return Poll::Ready(read),
            }
        }
    }

    /// Reads the answer's final head (interim 1xx answers are skipped).
    async fn read_head(&mut self) -> Result<Head, Error> {
        loop {
            if let Some(head) = parse_head(&mut self.buf)? {
                if head.status.is_informational() {
                    if head.status == StatusCode::SWITCHING_PROTOCOLS {
                        return Err(Error::Malformed("it switched protocols (101)".into()));
                    }
                    continue;
                }
                return Ok(head);
            }
            if self.buf.len() >= MAX_HEAD {
                return Err(Error::Malformed("the head is over 64 KiB".into()));
            }
            if poll_fn(|cx| self.poll_fill(cx)).await? == 0 {
                return Err(Error::Closed);
            }
        }
    }
}

/// Takes a complete answer head off the front of `buf`; `None` while it is incomplete.
pub fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, Error> {
    // Room for a few fields first: the arrays are zeroed on every call, and agents answer with
    // a handful of fields.
    parse_head_with::<16>(buf)
}

fn parse_head_with<const N: usize>(buf: &mut BytesMut) -> Result<Option<Head>, Error> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut fields = [httparse::EMPTY_HEADER; N];
    let mut parsed = httparse::Response::new(&mut fields);
    let len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) if N < MAX_HEADERS => {
            return parse_head_with::<MAX_HEADERS>(buf);
        }
        Err(e) => return Err(Error::Malformed(e.to_string())),
    };
    let version = match parsed.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let status = parsed
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or_else(|| Error::Malformed("no valid status code".into()))?;
    // Where each field lies in the head, so that values can share the head's bytes.
    let at = field_spans::<N>(buf, parsed.headers);
    let count = parsed.headers.len();
    let head = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(count);
    let mut close = version == Version::HTTP_10;
    for &(n0, n1, v0, v1) in &at[..count] {
        let name = HeaderName::from_bytes(&head[n0..n1])
            .map_err(|_| Error::Malformed("a header name is not a token".into()))?;
        let value = HeaderValue::from_maybe_shared(head.slice(v0..v1))
            .map_err(|_| Error::Malformed(format!("header {name}'s value is not valid")))?;
        if name == CONNECTION {
            close |= has_close(value.as_bytes());
        }
        headers.append(name, value);
    }
    Ok(Some(Head {
        status,
        version,
        headers,
        keep_alive: !close,
    }))
}

/// Whether a `connection` field's value names `close`.
pub(crate) fn has_close(value: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
}

/// Where each of `fields`, parsed from `head`, lies in it (name start and end, value start and
/// end), so that once the head is frozen its fields can share its bytes. Up to `N` fields.
pub(crate) fn field_spans<const N: usize>(
    head: &[u8],
    fields: &[httparse::Header<'_>],
) -> [(usize, usize, usize, usize); N] {
    let start = head.as_ptr() as usize;
    let mut at = [(0, 0, 0, 0); N];
    for (slot, field) in at.iter_mut().zip(fields) {
        let name = field.name.as_ptr() as usize - start;
        let value = field.value.as_ptr() as usize - start;
        *slot = (
            name,
            name + field.name.len(),
            value,
            value + field.value.len(),
        );
    }
    at
}

/// How an answer's body ends (RFC 9112 §6.3), and the decoder that takes it off the bytes
/// read.
#[derive(Debug)]
pub enum Framing {
    /// This many bytes are left.
    Length(u64),
    /// Chunked transfer coding.
    Chunked(Chunk),
    /// Everything until the agent closes the connection.
    Close {
        /// Whether the connection has ended.
        ended: bool,
    },
}

/// Where a chunked body's decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// At a chunk-size line.
    Size,
    /// Inside a chunk's data, this much left.
    Data(u64),
    /// After a chunk's data, at its CRLF.
    DataEnd,
    /// In the trailer section, having read this many bytes of it.
    Trailers(usize),
    /// Past the last chunk and the trailers.
    Done,
}

/// The longest chunk-size line (with extensions) and trailer section read.
const MAX_CHUNK_LINE: usize = 4 * 1024;
const MAX_TRAILERS: usize = 16 * 1024;

impl Framing {
    /// The framing of the answer with `head` to a request (`bodiless` for HEAD).
    pub fn of(head: &Head, bodiless: bool) -> Result<Self, Error> {
        let s = head.status.as_u16();
        if bodiless || head.status.is_informational() || s == 204 || s == 304 {
            return Ok(Self::Length(0));
        }
        let codings = head.headers.get_all(TRANSFER_ENCODING);
        if codings.iter().next().is_some() {
            let last = codings
                .iter()
                .flat_map(|v| v.as_bytes().split(|&b| b == b','))
                .map(<[u8]>::trim_ascii)
                .rfind(|t| !t.is_empty());
            return Ok(match last {
                Some(t) if t.eq_ignore_ascii_case(b"chunked") => Self::Chunked(Chunk::Size),
                _ => Self::Close { ended: false },
            });
        }
        let mut length = None;
        for v in head.headers.get_all(CONTENT_LENGTH) {
            for t in v.as_bytes().split(|&b| b == b',') {
                let n = parse_decimal(t.trim_ascii())
                    .ok_or_else(|| Error::Malformed("content-length is not a number".into()))?;
                if length.is_some_and(|l| l != n) {
                    return Err(Error::Malformed("content-length values differ".into()));
                }
                length = Some(n);
            }
        }
        Ok(length.map_or(Self::Close { ended: false }, Self::Length))
    }

    /// Whether the body has ended.
    pub fn done(&self) -> bool {
        matches!(
            self,
            Self::Length(0) | Self::Chunked(Chunk::Done) | Self::Close { ended: true }
        )
    }

    /// Whether the connection can carry another answer once this one is done.
    fn reusable(&self) -> bool {
        !matches!(self, Self::Close { .. })
    }

    /// The connection ended: the end of a body framed by the connection, an error otherwise.
    pub fn eof(&mut self) -> Result<(), Error> {
        match self {
            Self::Close { ended } => {
                *ended = true;
                Ok(())
            }
            _ if self.done() => Ok(()),
            _ => Err(Error::Closed),
        }
    }

    /// Takes the next piece of the body off the front of `buf`: `None` when `buf` holds none
    /// (more must be read, unless [`Framing::done`]).
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, Error> {
        match self {
            Self::Length(left) => {
                if *left == 0 || buf.is_empty() {
                    return Ok(None);
                }
                let n = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                *left -= n as u64;
                Ok(Some(buf.split_to(n).freeze()))
            }
            Self::Close { .. } => Ok((!buf.is_empty()).then(|| buf.split().freeze())),
            Self::Chunked(state) => decode_chunked(state, buf),
        }
    }
}

fn decode_chunked(state: &mut Chunk, buf: &mut BytesMut) -> Result<Option<Bytes>, Error> {
    let bad = |what: &str| Error::Malformed(format!("chunked body: {what}"));
    loop {
        match *state {
            Chunk::Done => return Ok(None),
            Chunk::Size => {
                let Some(line) =
                    take_line(buf, MAX_CHUNK_LINE).map_err(|()| bad("size line too long"))?
                else {
                    return Ok(None);
                };
                // `size [ BWS ; extension ... ]`: the extensions mean nothing here.
                let digits = line
                    .iter()
                    .position(|&b| !b.is_ascii_hexdigit())
                    .unwrap_or(line.len());
                let rest = line[digits..].trim_ascii_start();
                if digits == 0 || digits > 15 || !(rest.is_empty() || rest[0] == b';') {
                    return Err(bad("not a chunk size"));
                }
                let size = line[..digits].iter().fold(0u64, |n, &b| {
                    n * 16 + u64::from(char::from(b).to_digit(16).unwrap_or(0))
                });
                *state = if size == 0 {
                    Chunk::Trailers(0)
                } else {
                    Chunk::Data(size)
                };
            }
            Chunk::Data(left) => {
                if buf.is_empty() {
                    return Ok(None);
                }
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                let left = left - n as u64;
                *state = if left == 0 {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(left)
                };
                return Ok(Some(buf.split_to(n).freeze()));
            }
            Chunk::DataEnd => {
                if buf.len() < 2 {
                    return Ok(None);
                }
                if &buf[..2] != b"\r\n" {
                    return Err(bad("a chunk's data does not end with CRLF"));
                }
                let _ = buf.split_to(2);
                *state = Chunk::Size;
            }
            Chunk::Trailers(read) => {
                let Some(line) = take_line(buf, MAX_TRAILERS.saturating_sub(read))
                    .map_err(|()| bad("trailers over 16 KiB"))?
                else {
                    return Ok(None);
                };
                *state = if line.is_empty() {
                    Chunk::Done
                } else {
                    Chunk::Trailers(read + line.len() + 2)
                };
            }
        }
    }
}

/// Takes a CRLF-ended line (without the CRLF) off the front of `buf`; `None` while none is
/// complete; an error when none ends within `max` bytes or a line ends in a bare LF.
fn take_line(buf: &mut BytesMut, max: usize) -> Result<Option<BytesMut>, ()> {
    let Some(lf) = buf.iter().take(max).position(|&b| b == b'\n') else {
        return if buf.len() >= max { Err(()) } else { Ok(None) };
    };
    if lf == 0 || buf[lf - 1] != b'\r' {
        return Err(());
    }
    let mut line = buf.split_to(lf + 1);
    line.truncate(lf - 1);
    Ok(Some(line))
}

/// A length field's value: ASCII digits only, at most 19 of them.
pub(crate) fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(s.iter().fold(0u64, |n, &b| n * 10 + u64::from(b - b'0')))
}

/// An answer's body, read from the agent's connection as it is polled (see the module docs).
#[derive(Debug)]
pub struct Body {
    /// The connection while the body is being read; `None` once it has ended.
    reading: Option<Box<Reading>>,
    /// Read with the head already, the connection back in the idle list.
    ready: Option<Bytes>,
}

#[derive(Debug)]
struct Reading {
    conn: Conn,
    framing: Framing,
    reuse: bool,
    client: Arc<Client>,
    worker: usize,
}

impl Body {
    fn new(
        mut conn: Conn,
        mut framing: Framing,
        reuse: bool,
        client: Arc<Client>,
        worker: usize,
    ) -> Self {
        // The usual answer, a short JSON body, came with its head: take it now and give the
        // connection back before the body is even polled.
        if let Framing::Length(n) = framing
            && conn.buf.len() as u64 >= n
        {
            let ready = framing.decode(&mut conn.buf).ok().flatten();
            if reuse && conn.buf.is_empty() {
                client.checkin(worker, conn);
            }
            return Self {
                reading: None,
                ready,
            };
        }
        Self {
            reading: Some(Box::new(Reading {
                conn,
                framing,
                reuse,
                client,
                worker,
            })),
            ready: None,
        }
    }

    /// The body has ended: the connection goes back to the idle list if it can carry another
    /// answer.
    fn end(&mut self) {
        if let Some(r) = self.reading.take()
            && r.reuse
            && r.framing.reusable()
            && r.conn.buf.is_empty()
        {
            r.client.checkin(r.worker, r.conn);
        }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        if let Some(data) = self.ready.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        let this = &mut *self;
        loop {
            let Some(r) = this.reading.as_deref_mut() else {
                return Poll::Ready(None);
            };
            let step = match r.framing.decode(&mut r.conn.buf) {
                Ok(Some(data)) => Some(Ok(data)),
                Ok(None) if r.framing.done() => None,
                Ok(None) => match ready!(r.conn.poll_fill(cx)) {
                    Ok(0) => match r.framing.eof() {
                        Ok(()) => None,
                        Err(e) => Some(Err(e)),
                    },
                    Ok(_) => continue,
                    Err(e) => Some(Err(Error::Io(e))),
                },
                Err(e) => Some(Err(e)),
            };
            return match step {
                Some(Ok(data)) => {
                    if r.framing.done() {
                        this.end();
                    }
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                Some(Err(e)) => {
                    // A broken answer: the connection is not used again.
                    this.reading = None;
                    Poll::Ready(Some(Err(e)))
                }
                None => {
                    this.end();
                    Poll::Ready(None)
                }
            };
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ready.is_none() && self.reading.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.ready, self.reading.as_deref()) {
            (Some(data), _) => SizeHint::with_exact(data.len() as u64),
            (
                None,
                Some(Reading {
                    framing: Framing::Length(n),
                    ..
                }),
            ) => SizeHint::with_exact(*n),
            (None, Some(_)) => SizeHint::default(),
            (None, None) => SizeHint::with_exact(0),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    use super::*;

    /// What the test agent answers to its `n`th request: the pieces it writes (each flushed
    /// on its own) and whether it closes the connection afterwards.
    type Script = fn(usize) -> (Vec<&'static [u8]>, bool);

    struct TestAgent {
        addr: String,
        /// Connections accepted so far.
        connections: Arc<AtomicUsize>,
        /// Each request as it arrived.
        requests: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
    }

    async fn agent(script: Script) -> TestAgent {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let connections = Arc::new(AtomicUsize::new(0));
        let (tx, requests) = tokio::sync::mpsc::unbounded_channel();
        let accepted = Arc::clone(&connections);
        let served = Arc::new(AtomicUsize::new(0));
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                let (tx, served) = (tx.clone(), Arc::clone(&served));
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        // One request: its head, then as many bytes as its content-length says.
                        let end = loop {
                            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break at + 4;
                            }
                            let mut chunk = [0u8; 4096];
                            match tcp.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                        let length: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .map_or(0, |n| n.trim().parse().unwrap());
                        while buf.len() < end + length {
                            let mut chunk = [0u8; 4096];
                            let n = tcp.read(&mut chunk).await.unwrap();
                            assert!(n > 0, "request cut short");
                            buf.extend_from_slice(&chunk[..n]);
                        }
                        tx.send(buf.drain(..end + length).collect()).unwrap();
                        let (pieces, close) = script(served.fetch_add(1, Ordering::SeqCst));
                        for piece in pieces {
                            tcp.write_all(piece).await.unwrap();
                            tcp.flush().await.unwrap();
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        if close {
                            return;
                        }
                    }
                });
            }
        });
        TestAgent {
            addr,
            connections,
            requests,
        }
    }

    fn post(body: &'static str) -> Request<Bytes> {
        let mut req = Request::new(Bytes::from_static(body.as_bytes()));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = "http://agent/mcp?x=1".parse().unwrap();
        req.headers_mut()
            .insert("content-type", HeaderValue::from_static("application/json"));
        req
    }

    async fn answer(
        client: &Arc<Client>,
        req: Request<Bytes>,
    ) -> Result<(Response<()>, Bytes), Error> {
        let resp = client.send(req).await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok((Response::from_parts(parts, ()), body))
    }

    #[tokio::test]
    async fn a_json_answer_arrives_whole_and_its_connection_carries_the_next_call() {
        let mut agent = agent(|n| {
            (
                vec![if n == 0 {
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 7\r\nmcp-session-id: s1\r\n\r\n{\"a\":1}"
                } else {
                    b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n"
                }],
                false,
            )
        })
        .await;
        let client = Arc::new(Client::new(agent.addr.clone(), 1));
        let (resp, body) = answer(&client, post("{\"jsonrpc\":\"2.0\"}"))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["mcp-session-id"], "s1");
        assert_eq!(body, "{\"a\":1}");
        let sent = String::from_utf8(agent.requests.recv().await.unwrap()).unwrap();
        assert!(sent.starts_with("POST /mcp?x=1 HTTP/1.1\r\n"), "{sent}");
        assert!(
            sent.contains(&format!("host: {}\r\n", agent.addr)),
            "{sent}"
        );
        assert!(sent.contains("content-length: 17\r\n"), "{sent}");
        assert!(sent.ends_with("\r\n\r\n{\"jsonrpc\":\"2.0\"}"), "{sent}");

        let (resp, body) = answer(&client, post("{}")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        assert!(body.is_empty());
        assert_eq!(agent.connections.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_chunked_event_stream_streams_piece_by_piece_then_the_connection_is_reused() {
        let mut agent = agent(|n| {
            if n == 0 {
                (
                    vec![
                        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
                        b"d;ext=1\r\ndata: first\n\n\r\n",
                        b"e\r\ndata: sec",
                        b"ond\n\n\r\n0\r\nx-trailer: 1\r\n",
                        b"\r\n",
                    ],
                    false,
                )
            } else {
                (vec![b"HTTP/1.1 204 No Content\r\n\r\n"], false)
            }
        })
        .await;
        let client = Arc::new(Client::new(agent.addr.clone(), 1));
        let resp = client.send(post("{}")).await.unwrap();
        let mut body = resp.into_body();
        let mut pieces = Vec::new();
        while let Some(frame) = body.frame().await {
            pieces.push(frame.unwrap().into_data().unwrap());
        }
        assert!(pieces.len() >= 2, "streamed as it came: {pieces:?}");
        assert_eq!(pieces.concat(), b"data: first\n\ndata: second\n\n");
        assert!(http_body::Body::is_end_stream(&body));
        let (resp, _) = answer(&client, post("{}")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
        assert_eq!(agent.connections.load(Ordering::SeqCst), 1);
        agent.requests.recv().await.unwrap();
    }

    #[tokio::test]
    async fn an_answer_framed_by_closing_and_an_idle_connection_the_agent_closed_are_not_reused() {
        let agent = agent(|n| match n {
            // No length: the body ends when the agent closes.
            0 => (
                vec![b"HTTP/1.1 200 OK\r\n\r\npart one, ", b"part two"],
                true,
            ),
            // Keep-alive by its head, but the agent closes right after.
            1 => (
                vec![b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"],
                true,
            ),
            _ => (
                vec![b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfresh"],
                false,
            ),
        })
        .await;
        let client = Arc::new(Client::new(agent.addr.clone(), 1));
        let (_, body) = answer(&client, post("{}")).await.unwrap();
        assert_eq!(body, "part one, part two");
        let (_, body) = answer(&client, post("{}")).await.unwrap();
        assert_eq!(body, "ok");
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The closed idle connection is noticed without a failed call.
        let (_, body) = answer(&client, post("{}")).await.unwrap();
        assert_eq!(body, "fresh");
        assert_eq!(agent.connections.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn failures_say_what_went_wrong() {
        let free = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = free.local_addr().unwrap().to_string();
        drop(free);
        let err = answer(&Arc::new(Client::new(addr, 1)), post("{}"))
            .await
            .unwrap_err();
        assert!(err.is_connect(), "{err}");
        assert!(err.to_string().contains("connecting to the agent"), "{err}");

        let agent = agent(|n| match n {
            0 => (
                vec![b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf"],
                true,
            ),
            1 => (vec![b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n"], true),
            2 => (
                vec![b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n"],
                true,
            ),
            3 => (vec![b"NOT HTTP\r\n\r\n"], true),
            _ => (vec![], true),
        })
        .await;
        let client = Arc::new(Client::new(agent.addr.clone(), 1));
        let mut said = Vec::new();
        for _ in 0..5 {
            let err = answer(&client, post("{}")).await.unwrap_err();
            assert!(!err.is_connect());
            said.push(err.to_string());
        }
        assert!(said[0].contains("closed the connection before its answer was complete"));
        assert!(
            said[1].contains("content-length is not a number"),
            "{}",
            said[1]
        );
        assert!(
            said[2].contains("chunked body: not a chunk size"),
            "{}",
            said[2]
        );
        assert!(said[3].contains("not valid HTTP/1.1"), "{}", said[3]);
        assert!(said[4].contains("closed the connection"), "{}", said[4]);
    }

    /// Decodes `wire` fed in two parts split at `at`.
    fn chunked(wire: &[u8], at: usize) -> Result<(Vec<u8>, bool), Error> {
        let mut framing = Framing::Chunked(Chunk::Size);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for part in [&wire[..at], &wire[at..]] {
            buf.extend_from_slice(part);
            while let Some(data) = framing.decode(&mut buf)? {
                out.extend_from_slice(&data);
            }
        }
        Ok((out, framing.done()))
    }

    #[test]
    fn chunked_bodies_decode_the_same_wherever_the_reads_split_them() {
        let wire =
            b"4\r\nWiki\r\n6 ; a=b\r\npedia \r\nE\r\nin \r\n\r\nchunks.\r\n0\r\nT: v\r\n\r\n";
        for at in 0..=wire.len() {
            let (data, done) = chunked(wire, at).unwrap();
            assert_eq!(data, b"Wikipedia in \r\n\r\nchunks.", "split at {at}");
            assert!(done);
        }
        // Not done until the last chunk and the empty line after the trailers.
        assert!(!chunked(b"4\r\nWiki\r\n0\r\n", 3).unwrap().1);
        for bad in [
            &b"4\nWiki\r\n"[..],
            b"4\r\nWikiXX",
            b"g\r\n",
            b"1234567890abcdef0\r\n",
            b"\r\n",
        ] {
            assert!(
                chunked(bad, 1).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(chunked(&[b'1'; MAX_CHUNK_LINE + 1], 0).is_err());
    }

    #[test]
    fn the_framing_follows_rfc_9112() {
        let head = |status: u16, fields: &[(&'static str, &'static str)]| Head {
            status: StatusCode::from_u16(status).unwrap(),
            version: Version::HTTP_11,
            headers: fields
                .iter()
                .map(|(n, v)| (HeaderName::from_static(n), HeaderValue::from_static(v)))
                .collect(),
            keep_alive: true,
        };
        let framing = |status, fields, bodiless| match Framing::of(&head(status, fields), bodiless)
        {
            Ok(f) => format!("{f:?}"),
            Err(e) => e.to_string(),
        };
        let cl: &[_] = &[("content-length", "5")];
        let close = "Close { ended: false }";
        for (status, fields, bodiless, expected) in [
            // HEAD, 204 and 304 have no body whatever their head says.
            (200, cl, true, "Length(0)"),
            (204, cl, false, "Length(0)"),
            (304, cl, false, "Length(0)"),
            (200, cl, false, "Length(5)"),
            // Transfer-Encoding wins over Content-Length; chunked only when it comes last.
            (
                200,
                &[
                    ("content-length", "5"),
                    ("transfer-encoding", "gzip, chunked"),
                ],
                false,
                "Chunked(Size)",
            ),
            (200, &[("transfer-encoding", "chunked, gzip")], false, close),
            (200, &[("content-length", "5, 5")], false, "Length(5)"),
            (
                200,
                &[("content-length", "5, 6")],
                false,
                "the agent's answer is not valid HTTP/1.1: content-length values differ",
            ),
            (200, &[], false, close),
        ] {
            assert_eq!(
                framing(status, fields, bodiless),
                expected,
                "{status} {fields:?}"
            );
        }
    }

    #[test]
    fn heads_are_read_only_when_complete_and_connection_close_is_heard() {
        let mut buf =
            BytesMut::from(&b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nx: 1\r\n"[..]);
        assert!(parse_head(&mut buf).unwrap().is_none());
        buf.extend_from_slice(b"\r\nbody");
        let head = parse_head(&mut buf).unwrap().unwrap();
        assert!(!head.keep_alive);
        assert_eq!(head.headers["x"], "1");
        assert_eq!(&buf[..], b"body");
        let mut old = BytesMut::from(&b"HTTP/1.0 200 OK\r\n\r\n"[..]);
        assert!(!parse_head(&mut old).unwrap().unwrap().keep_alive);
        // More fields than the first try has room for; more than any answer may have.
        let many = |n: usize| {
            let fields: String = (0..n).map(|i| format!("x-{i}: {i}\r\n")).collect();
            BytesMut::from(format!("HTTP/1.1 200 OK\r\n{fields}\r\n").as_bytes())
        };
        let head = parse_head(&mut many(MAX_HEADERS)).unwrap().unwrap();
        assert_eq!(head.headers.len(), MAX_HEADERS);
        assert_eq!(head.headers["x-99"], "99");
        let err = parse_head(&mut many(MAX_HEADERS + 1)).unwrap_err();
        assert!(err.to_string().contains("too many headers"), "{err}");
    }
}

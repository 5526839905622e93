//! Transparent mode: connections that `capmesh-proxy init`'s rules redirected to the outbound
//! listener. The agent dialled some address as if there were no mesh; the proxy reads where
//! it was going (`SO_ORIGINAL_DST`) and:
//!
//! 1. if that address is a mesh instance's (its proxy advertises that IP), serves HTTP and
//!    forwards each request over mutual TLS to that instance's proxy, which hands it to its
//!    agent unchanged (same path, `x-capmesh-caller` set);
//! 2. else, if the first request is HTTP/1 whose `Host` names a mesh agent (`weather`,
//!    `weather.<namespace>`, `weather.<namespace>.svc.cluster.local`: a Kubernetes Service
//!    address), does the same for that agent's instances;
//! 3. else relays the bytes to the original destination untouched: traffic that is not for the
//!    mesh (an LLM API over HTTPS, a database) works as it did.
//!
//! Only endpoints in this proxy's snapshot are reachable, i.e. the capabilities its agent
//! depends on (`--dependency '*'` for all); the provider's proxy applies its own checks.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use capmesh_api::{Endpoint, Namespace};
use http::{Method, Request, Response};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tower::ServiceBuilder;

use super::passthrough::is_safe;
use super::tool_call::call_timeout;
use crate::contract::SERVED_BY_HEADER;
use crate::forward::{self, Attempts, Call, CallSpec, Target, Upstream};
use crate::headers::is_hop_by_hop;
use crate::pool::PeerBody;
use crate::routing::Routing;
use crate::stack::{Handled, Middleware, Next, ReadBody, RespondLayer, Stage, call};
use crate::{BoxBody, Proxy, boxed};

/// The address a redirected connection was going to, before the init rules sent it here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrigDstAddr(pub SocketAddr);

/// The original destination of `tcp`, if it was redirected (it differs from the address the
/// connection arrived at). `None` for connections made to the outbound listener directly.
pub fn original_dst(tcp: &TcpStream) -> Option<OrigDstAddr> {
    let local = tcp.local_addr().ok()?;
    let sock = socket2::SockRef::from(tcp);
    let orig = match local {
        SocketAddr::V4(_) => sock.original_dst_v4(),
        SocketAddr::V6(_) => sock.original_dst_v6(),
    }
    .ok()?
    .as_socket()?;
    (orig != local).then_some(OrigDstAddr(orig))
}

/// State shared by the proxy's intercepted connections.
#[derive(Debug, Default)]
pub struct Transparent {
    /// Local addresses of the relays this proxy opened: a redirected connection coming *from*
    /// one of them means the proxy's own traffic is being intercepted (it does not run as the
    /// UID given to `init --proxy-uid`), which would loop forever.
    relays: Mutex<HashSet<SocketAddr>>,
}

impl Transparent {
    fn relays(&self) -> std::sync::MutexGuard<'_, HashSet<SocketAddr>> {
        self.relays.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How long to wait for the first bytes of a connection to decide whether it is HTTP for the
/// mesh; protocols where the server speaks first are relayed after this.
const SNIFF: Duration = Duration::from_millis(200);
/// The most of a request head read to find `Host`.
const SNIFF_BYTES: usize = 8 * 1024;

/// Serves one redirected connection (see the module docs).
pub async fn serve(
    proxy: Arc<Proxy>,
    tcp: TcpStream,
    dst: OrigDstAddr,
    limits: crate::serve::Limits,
    drain: watch::Receiver<bool>,
) {
    if let Ok(peer) = tcp.peer_addr()
        && proxy.transparent.relays().contains(&peer)
    {
        tracing::error!(
            destination = %dst.0,
            "the proxy's own connection was redirected back to it: run capmesh-proxy as the UID \
             given to `capmesh-proxy init --proxy-uid` (default 1337)"
        );
        return;
    }
    let routing = proxy.routing.load_full();
    let mut fallback = instances_at(&routing, dst.0.ip());
    if fallback.is_empty()
        && let Some(host) = sniff_host(&tcp).await
    {
        fallback = instances_named(&routing, &host, &proxy.node.namespace);
    }
    if fallback.is_empty() {
        relay(proxy, tcp, dst).await;
        return;
    }
    let svc = ServiceBuilder::new()
        // Errors become responses here, and only here.
        .layer(RespondLayer)
        // The mesh reads what it forwards (bounded): the provider's proxy authorizes every
        // message, and a read body can be sent again.
        .layer(Stage(ReadBody {
            limit: crate::contract::MAX_REQUEST,
        }))
        // The hop's client span when sampled: to the response's last byte.
        .layer(Stage(crate::trace::ClientSpan::new(proxy.clone())))
        // The instances behind the address (or Host) the agent dialled.
        .layer(Stage(ToMesh {
            proxy: proxy.clone(),
            dst,
            fallback: Arc::new(fallback),
        }))
        .service(forward::stack(&proxy));
    crate::serve::connection(tcp, svc, limits, drain).await;
}

/// The instances (one endpoint each) whose proxy advertises `ip`.
pub fn instances_at(routing: &Routing, ip: IpAddr) -> Vec<Arc<Endpoint>> {
    dedup_instances(routing, |ep| host_ip(&ep.address) == Some(ip))
}

/// The instances of the agent a DNS name points at: `agent`, `agent.namespace` or
/// `agent.namespace.svc[.cluster.local]`; the bare name is looked up in `own` namespace.
pub fn instances_named(routing: &Routing, host: &str, own: &Namespace) -> Vec<Arc<Endpoint>> {
    let host = strip_port(host).trim_end_matches('.').to_ascii_lowercase();
    if host.parse::<IpAddr>().is_ok() {
        return Vec::new();
    }
    let mut labels = host.split('.');
    let Some(agent) = labels.next() else {
        return Vec::new();
    };
    let namespace = labels.next().unwrap_or(own.as_str()).to_owned();
    dedup_instances(routing, |ep| {
        ep.agent.as_str() == agent && ep.namespace.as_str() == namespace
    })
}

fn dedup_instances(routing: &Routing, want: impl Fn(&Endpoint) -> bool) -> Vec<Arc<Endpoint>> {
    let Some(snapshot) = &routing.snapshot else {
        return Vec::new();
    };
    let mut seen = HashSet::new();
    snapshot
        .endpoints
        .iter()
        .filter(|ep| want(ep) && seen.insert(ep.instance.clone()))
        .map(|ep| Arc::new(ep.clone()))
        .collect()
}

/// The host of `authority` (`host:port`, `[v6]:port` or a bare host).
fn strip_port(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    }
}

fn host_ip(address: &str) -> Option<IpAddr> {
    strip_port(address).parse().ok()
}

/// Reads (without consuming) the start of the connection; if it is an HTTP/1 request head,
/// returns its `Host`.
async fn sniff_host(tcp: &TcpStream) -> Option<String> {
    let deadline = Instant::now() + SNIFF;
    let mut buf = vec![0u8; SNIFF_BYTES];
    loop {
        let n = tokio::time::timeout_at(deadline.into(), tcp.peek(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        match parse_host(&buf[..n]) {
            Head::Host(h) => return Some(h),
            Head::NotHttp => return None,
            Head::Partial if n == buf.len() => return None,
            // More of the head is on its way; peek returns at once, so pace the retries.
            Head::Partial => tokio::time::sleep(Duration::from_millis(2)).await,
        }
        if Instant::now() >= deadline {
            return None;
        }
    }
}

#[derive(Debug, PartialEq)]
enum Head {
    Host(String),
    NotHttp,
    Partial,
}

/// Finds `Host` in an HTTP/1 request head (`buf` may hold only its start).
fn parse_host(buf: &[u8]) -> Head {
    let Some(line_end) = buf.windows(2).position(|w| w == b"\r\n") else {
        let looks_like_method = buf.iter().take(8).all(|b| b.is_ascii_uppercase());
        return if looks_like_method {
            Head::Partial
        } else {
            Head::NotHttp
        };
    };
    let request_line = String::from_utf8_lossy(&buf[..line_end]);
    let mut parts = request_line.split(' ');
    let method_ok = parts
        .next()
        .is_some_and(|m| !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase()));
    let version_ok = parts.nth(1).is_some_and(|v| v.starts_with("HTTP/1."));
    if !method_ok || !version_ok {
        return Head::NotHttp;
    }
    let mut rest = &buf[line_end + 2..];
    while let Some(end) = rest.windows(2).position(|w| w == b"\r\n") {
        if end == 0 {
            return Head::NotHttp; // the head ended without a Host
        }
        let line = String::from_utf8_lossy(&rest[..end]);
        if let Some((name, value)) = line.split_once(':')
            && name.trim().eq_ignore_ascii_case("host")
        {
            return Head::Host(value.trim().to_owned());
        }
        rest = &rest[end + 2..];
    }
    Head::Partial
}

/// Relays the bytes of a connection that is not for the mesh to where it was going.
async fn relay(proxy: Arc<Proxy>, mut tcp: TcpStream, dst: OrigDstAddr) {
    proxy
        .metrics
        .transparent
        .with_label_values(&["direct"])
        .inc();
    let mut upstream = match TcpStream::connect(dst.0).await {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(destination = %dst.0, error = %e, "direct connection failed");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let local = upstream.local_addr().ok();
    if let Some(l) = local {
        proxy.transparent.relays().insert(l);
    }
    let _ = tokio::io::copy_bidirectional(&mut tcp, &mut upstream).await;
    if let Some(l) = local {
        proxy.transparent.relays().remove(&l);
    }
}

/// Resolves an intercepted request to the instances behind the address (or `Host`) it was
/// sent to — the address wins, then this request's `Host`, then what the connection started
/// with — healthy ones first, and relays the answer unchanged.
#[derive(Debug, Clone)]
struct ToMesh {
    proxy: Arc<Proxy>,
    dst: OrigDstAddr,
    fallback: Arc<Vec<Arc<Endpoint>>>,
}

impl<S> Middleware<Request<Bytes>, S> for ToMesh
where
    S: Next<Call, Response<PeerBody>>,
{
    type Response = Response<BoxBody>;

    fn handle(self, req: Request<Bytes>, next: S) -> impl Handled<Response<BoxBody>> {
        async move {
            let proxy = &self.proxy;
            proxy.metrics.transparent.with_label_values(&["mesh"]).inc();
            let routing = proxy.routing.load_full();
            let mut instances = instances_at(&routing, self.dst.0.ip());
            if instances.is_empty()
                && let Some(host) = request_host(&req)
            {
                instances = instances_named(&routing, &host, &proxy.node.namespace);
            }
            if instances.is_empty() {
                instances = self.fallback.to_vec();
            }
            drop(routing);
            let label = instances
                .first()
                .map(|e| e.agent.to_string())
                .unwrap_or_default();
            let (healthy, unhealthy): (Vec<_>, Vec<_>) =
                instances.into_iter().partition(|e| e.healthy);
            let ranks = Arc::new(vec![healthy, unhealthy]);
            let (parts, body) = req.into_parts();
            let path = parts
                .uri
                .path_and_query()
                .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
            proxy.retry_budget.deposit();
            let spec = Call(Arc::new(CallSpec {
                target: Target::Ranked { ranks },
                upstream: Upstream::Transparent { path },
                safe: parts.method == Method::HEAD || is_safe(&parts.method, &body),
                timeout: call_timeout(proxy, &parts.headers),
                headers: crate::headers::forwarded(&parts.headers),
                method: parts.method,
                body,
                label,
                attempts: Attempts::default(),
            }));
            let resp = call(next, spec).await?;
            Ok(stream_back(resp))
        }
    }
}

fn request_host<B>(req: &Request<B>) -> Option<String> {
    req.headers()
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
}

fn stream_back(resp: Response<PeerBody>) -> Response<BoxBody> {
    let served = resp.body().served().cloned();
    let (parts, body) = resp.into_parts();
    let mut out = Response::new(boxed(body));
    *out.status_mut() = parts.status;
    let h = out.headers_mut();
    for (name, value) in &parts.headers {
        if !is_hop_by_hop(name.as_str()) {
            h.append(name.clone(), value.clone());
        }
    }
    if let Some(ep) = served
        && let Some(v) = crate::headers::served_by(&ep)
    {
        h.insert(SERVED_BY_HEADER, v);
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn finds_host_in_a_request_head() {
        assert_eq!(
            parse_host(b"POST /mcp HTTP/1.1\r\nhost: weather:8080\r\naccept: */*\r\n\r\n"),
            Head::Host("weather:8080".into())
        );
        assert_eq!(
            parse_host(b"GET / HTTP/1.1\r\nAccept: x\r\nHOST:  a.b \r\n"),
            Head::Host("a.b".into())
        );
        assert_eq!(parse_host(b"POST /mcp HTTP/1.1\r\nacc"), Head::Partial);
        assert_eq!(parse_host(b"POS"), Head::Partial);
        // TLS, an HTTP/2 preface, a head without Host: not for name routing.
        assert_eq!(parse_host(b"\x16\x03\x01\x02\x00\x01"), Head::NotHttp);
        assert_eq!(
            parse_host(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            Head::NotHttp
        );
        assert_eq!(parse_host(b"GET / HTTP/1.0\r\n\r\n"), Head::NotHttp);
    }

    #[test]
    fn hosts_and_addresses() {
        assert_eq!(strip_port("weather:8080"), "weather");
        assert_eq!(strip_port("[fd00::1]:15006"), "fd00::1");
        assert_eq!(strip_port("weather"), "weather");
        assert_eq!(host_ip("10.1.2.3:15006"), Some(IpAddr::from([10, 1, 2, 3])));
        assert_eq!(host_ip("weather:15006"), None);
    }
}

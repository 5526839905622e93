//! DNS-rebinding protection for the outbound listener, a plain-HTTP server on the agent's
//! machine: a browser page on another site can reach it under a name of its own. An `Origin`
//! that is not this machine is refused everywhere; on passthrough a `Host` that names another
//! site is refused too (the provider's own check cannot see it: its proxy sets `Host` to the
//! agent's address).

use http::{HeaderMap, Request, Response, header};

use super::passthrough::capability_in_path;
use crate::BoxBody;
use crate::error::ProxyError;
use crate::stack::{Either, Handled, Middleware, Next, call, refuse};

/// See the module docs.
#[derive(Debug, Clone, Copy, Default)]
pub struct RebindingGuard;

impl<S, B> Middleware<Request<B>, S> for RebindingGuard
where
    B: Send + 'static,
    S: Next<Request<B>, Response<BoxBody>>,
{
    type Response = Response<BoxBody>;

    fn handle(self, req: Request<B>, next: S) -> impl Handled<Response<BoxBody>> {
        let passthrough = capability_in_path(req.uri().path()).is_some();
        match refusal(req.headers(), passthrough) {
            Some(why) => Either::Left(refuse(ProxyError::Rebinding(why))),
            None => Either::Right(call(next, req)),
        }
    }
}

/// Whether `host` (a `Host` value or an `Origin`'s host, port allowed) names this machine:
/// `localhost`, a loopback IP (`127.0.0.0/8`, `[::1]`), or an IP literal at all when `ip_ok`
/// (a sidecar may listen on a pod address).
fn local_host(host: &str, ip_ok: bool) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else {
        host.rsplit_once(':').map_or(host, |(h, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                host
            }
        })
    };
    if name.eq_ignore_ascii_case("localhost") {
        return true;
    }
    match name.parse::<std::net::IpAddr>() {
        Ok(ip) => ip_ok || ip.is_loopback(),
        Err(_) => false,
    }
}

/// Why the request is refused, if it is.
fn refusal(headers: &HeaderMap, passthrough: bool) -> Option<&'static str> {
    if let Some(origin) = headers.get(header::ORIGIN) {
        let host = origin
            .to_str()
            .ok()
            .and_then(|o| o.split_once("://"))
            .map(|(_, rest)| rest.split('/').next().unwrap_or_default());
        if !host.is_some_and(|h| local_host(h, false)) {
            return Some(
                "Origin is not this machine (DNS-rebinding protection): the mesh takes requests from the local agent only",
            );
        }
    }
    if passthrough
        && let Some(host) = headers.get(header::HOST)
        && !host.to_str().is_ok_and(|h| local_host(h, true))
    {
        return Some(
            "Host is not this machine (DNS-rebinding protection): use http://127.0.0.1:<outbound port>/capabilities/<capability>/mcp",
        );
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use http::HeaderValue;
    use tower::ServiceBuilder;

    use super::*;
    use crate::stack::{Stage, service_fn};

    #[test]
    fn this_machine_is_localhost_or_loopback_with_any_port() {
        for h in [
            "localhost",
            "LOCALHOST:15001",
            "127.0.0.1",
            "127.0.0.1:15001",
            "127.9.9.9:80",
            "[::1]",
            "[::1]:15001",
        ] {
            assert!(local_host(h, false), "{h}");
        }
        for h in [
            "evil.example.com",
            "evil.example.com:15001",
            "localhost.evil.com",
            "10.0.0.5:15001",
            "[fe80::1]:1",
            "",
        ] {
            assert!(!local_host(h, false), "{h}");
        }
        assert!(local_host("10.0.0.5:15001", true));
        assert!(!local_host("weather.default.svc:15001", true));
    }

    fn request(path: &str, pairs: &[(&'static str, &'static str)]) -> Request<()> {
        let mut r = Request::builder().uri(path).body(()).unwrap();
        for (k, v) in pairs {
            r.headers_mut().insert(*k, HeaderValue::from_static(v));
        }
        r
    }

    #[tokio::test]
    async fn foreign_origins_and_passthrough_hosts_are_refused_before_anything_else() {
        let guarded = ServiceBuilder::new()
            .layer(Stage(RebindingGuard))
            .service(service_fn(|_: Request<()>| async {
                Ok::<_, ProxyError>(Response::new(crate::boxed(http_body_util::Empty::<
                    bytes::Bytes,
                >::new())))
            }));
        let run = |path: &'static str, pairs: &'static [(&'static str, &'static str)]| {
            guarded.clone().call(request(path, pairs))
        };
        let pt = "/capabilities/get_weather/mcp";
        let evil = &[
            ("host", "evil.example.com:15001"),
            ("origin", "http://evil.example.com:15001"),
        ];
        assert!(matches!(run(pt, evil).await, Err(ProxyError::Rebinding(_))));
        assert!(matches!(
            run("/mcp", evil).await,
            Err(ProxyError::Rebinding(_))
        ));
        let host_only = &[("host", "evil.example.com:15001")];
        assert!(run(pt, host_only).await.is_err());
        assert!(
            run("/mcp", host_only).await.is_ok(),
            "/mcp checks Origin only"
        );
        let local = &[
            ("host", "127.0.0.1:15001"),
            ("origin", "http://localhost:15001"),
        ];
        assert!(run(pt, local).await.is_ok());
        assert!(run("/mcp", &[("origin", "null")]).await.is_err());
        assert!(run(pt, &[]).await.is_ok());
    }
}

//! The control plane's addresses, as given with `--control-plane`: one URL, or several
//! separated by commas (the replicas of a highly available control plane).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use rustls_pki_types::{DnsName, ServerName};

/// The port the control plane listens on when the URL names none.
pub const DEFAULT_PORT: u16 = 8000;

/// The host part of a [`ControlPlaneUrl`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// A DNS name (`capmesh-control-plane.capmesh.svc`), checked and lowercased.
    Name(DnsName<'static>),
    /// An IP address (IPv6 is written in brackets in the URL).
    Ip(IpAddr),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(name) => f.write_str(name.as_ref()),
            Host::Ip(IpAddr::V4(ip)) => write!(f, "{ip}"),
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
        }
    }
}

/// Where the control plane is: `https://host:port`, the port defaulting to 8000.
///
/// Parsed once at the edge, so every later use (dialling, TLS server name, HTTP authority)
/// works from checked parts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ControlPlaneUrl {
    host: Host,
    port: u16,
}

/// Why a `--control-plane` value is not a usable URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "--control-plane {input:?}: {problem}: use https://host:port, such as https://127.0.0.1:8000, or several separated by commas"
)]
pub struct UrlError {
    /// The value as given.
    pub input: String,
    /// What is wrong with it.
    pub problem: String,
}

impl ControlPlaneUrl {
    /// A URL from already-checked parts.
    pub fn new(host: Host, port: u16) -> Self {
        Self { host, port }
    }

    /// The host.
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `host:port`, with brackets around an IPv6 address: the HTTP authority.
    pub fn authority(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// The name the TLS client checks (host-name mode) and sends as SNI.
    pub fn server_name(&self) -> ServerName<'static> {
        match &self.host {
            Host::Ip(ip) => ServerName::IpAddress((*ip).into()),
            Host::Name(name) => ServerName::DnsName(name.clone()),
        }
    }

    /// What `TcpStream::connect` takes: the host without brackets, and the port.
    pub(crate) fn dial_target(&self) -> (String, u16) {
        let host = match &self.host {
            Host::Name(name) => name.as_ref().to_owned(),
            Host::Ip(ip) => ip.to_string(),
        };
        (host, self.port)
    }
}

impl fmt::Display for ControlPlaneUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "https://{}:{}", self.host, self.port)
    }
}

impl FromStr for ControlPlaneUrl {
    type Err = UrlError;

    fn from_str(input: &str) -> Result<Self, UrlError> {
        let fail = |problem: &str| UrlError {
            input: input.to_owned(),
            problem: problem.to_owned(),
        };
        let trimmed = input.trim();
        let rest = match trimmed.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("https") => rest,
            Some((scheme, _)) => {
                return Err(fail(&format!(
                    "the scheme is {scheme:?}, but the control plane speaks only https"
                )));
            }
            None => return Err(fail("the scheme is missing")),
        };
        // A single trailing slash is harmless; any other path is a mistake worth reporting.
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#']) {
            return Err(fail(
                "the URL has a path, query or fragment; give only host and port",
            ));
        }
        if rest.contains('@') {
            return Err(fail(
                "the URL has user information; give only host and port",
            ));
        }
        let (host, port) = split_host_port(rest).map_err(|p| fail(&p))?;
        let port = match port {
            None => DEFAULT_PORT,
            Some(p) => match p.parse::<u16>() {
                Ok(0) | Err(_) => {
                    return Err(fail(&format!(
                        "the port {p:?} is not a number from 1 to 65535"
                    )));
                }
                Ok(p) => p,
            },
        };
        Ok(Self { host, port })
    }
}

/// The control plane's replicas: one URL or more, tried in the order given (a name that resolves
/// to several addresses counts once, its addresses tried in a random order).
///
/// `https://cp-0:8000,https://cp-1:8000` parses as two; each must be a valid
/// [`ControlPlaneUrl`], and duplicates are dropped.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ControlPlaneAddrs {
    urls: Vec<ControlPlaneUrl>,
}

impl ControlPlaneAddrs {
    /// The URLs, in the order to try them.
    pub fn urls(&self) -> &[ControlPlaneUrl] {
        &self.urls
    }

    /// The first URL.
    pub fn first(&self) -> &ControlPlaneUrl {
        // Never empty: built from at least one URL.
        &self.urls[0]
    }
}

impl From<ControlPlaneUrl> for ControlPlaneAddrs {
    fn from(url: ControlPlaneUrl) -> Self {
        Self { urls: vec![url] }
    }
}

impl fmt::Display for ControlPlaneAddrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, url) in self.urls.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{url}")?;
        }
        Ok(())
    }
}

impl FromStr for ControlPlaneAddrs {
    type Err = UrlError;

    fn from_str(input: &str) -> Result<Self, UrlError> {
        let mut urls: Vec<ControlPlaneUrl> = Vec::new();
        for part in input.split(',') {
            if part.trim().is_empty() {
                return Err(UrlError {
                    input: input.to_owned(),
                    problem: "an address in the list is empty".to_owned(),
                });
            }
            let url: ControlPlaneUrl = part.parse()?;
            if !urls.contains(&url) {
                urls.push(url);
            }
        }
        Ok(Self { urls })
    }
}

/// Splits `host[:port]`, `[v6][:port]`; checks the host.
fn split_host_port(authority: &str) -> Result<(Host, Option<&str>), String> {
    if authority.is_empty() {
        return Err("the host is missing".to_owned());
    }
    if let Some(bracketed) = authority.strip_prefix('[') {
        let (ip, after) = bracketed
            .split_once(']')
            .ok_or_else(|| "the IPv6 address has no closing ']'".to_owned())?;
        let ip: Ipv6Addr = ip
            .parse()
            .map_err(|_| format!("{ip:?} in brackets is not an IPv6 address"))?;
        let port = match after {
            "" => None,
            _ => Some(
                after
                    .strip_prefix(':')
                    .ok_or_else(|| format!("unexpected {after:?} after the IPv6 address"))?,
            ),
        };
        return Ok((Host::Ip(IpAddr::V6(ip)), port));
    }
    let (host, port) = match authority.split_once(':') {
        Some((_, port)) if port.contains(':') => {
            return Err("an IPv6 address must be written in brackets, as [::1]:8000".to_owned());
        }
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    };
    if host.is_empty() {
        return Err("the host is missing".to_owned());
    }
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return Ok((Host::Ip(IpAddr::V4(ip)), port));
    }
    // A name must be one TLS can verify; an all-numeric "name" is a mistyped IPv4 address.
    let looks_numeric = host.chars().all(|c| c.is_ascii_digit() || c == '.');
    let name = match DnsName::try_from(host.to_ascii_lowercase()) {
        Ok(name) if !looks_numeric => name,
        _ => return Err(format!("{host:?} is neither a host name nor an IP address")),
    };
    Ok((Host::Name(name), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> ControlPlaneUrl {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn err(s: &str) -> String {
        s.parse::<ControlPlaneUrl>().unwrap_err().to_string()
    }

    #[test]
    fn names_ipv4_and_bracketed_ipv6_parse_with_the_default_port() {
        let u = url("https://capmesh-control-plane.capmesh.svc");
        assert_eq!(
            u.host(),
            &Host::Name(
                DnsName::try_from("capmesh-control-plane.capmesh.svc")
                    .unwrap()
                    .to_owned()
            )
        );
        assert_eq!(u.port(), 8000);
        assert_eq!(
            u.to_string(),
            "https://capmesh-control-plane.capmesh.svc:8000"
        );

        let u = url("https://127.0.0.1:9443/");
        assert_eq!(u.host(), &Host::Ip("127.0.0.1".parse().unwrap()));
        assert_eq!(u.port(), 9443);
        assert_eq!(u.authority(), "127.0.0.1:9443");
        assert_eq!(u.dial_target(), ("127.0.0.1".to_owned(), 9443));

        let u = url("HTTPS://[::1]:8001");
        assert_eq!(u.host(), &Host::Ip("::1".parse().unwrap()));
        assert_eq!(u.authority(), "[::1]:8001");
        assert_eq!(u.dial_target(), ("::1".to_owned(), 8001));
        assert_eq!(url("https://[fe80::1]").port(), 8000);

        assert_eq!(
            url("https://LocalHost:1").host(),
            &Host::Name(DnsName::try_from("localhost").unwrap().to_owned())
        );
        assert!(matches!(
            url("https://[::1]").server_name(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            url("https://localhost").server_name(),
            ServerName::DnsName(_)
        ));
    }

    #[test]
    fn errors_name_the_flag_the_problem_and_the_fix() {
        assert_eq!(
            err("ftp://x"),
            "--control-plane \"ftp://x\": the scheme is \"ftp\", but the control plane speaks \
             only https: use https://host:port, such as https://127.0.0.1:8000, or several \
             separated by commas"
        );
        assert!(err("http://127.0.0.1:8000").contains("speaks only https"));
        assert!(err("127.0.0.1:8000").contains("the scheme is missing"));
        assert!(err("https://").contains("the host is missing"));
        assert!(err("https://:8000").contains("the host is missing"));
        assert!(err("https://h:0").contains("port \"0\""));
        assert!(err("https://h:99999").contains("port \"99999\""));
        assert!(err("https://h:x").contains("port \"x\""));
        assert!(err("https://::1").contains("in brackets"));
        assert!(err("https://[::1").contains("closing ']'"));
        assert!(err("https://[nope]:1").contains("not an IPv6 address"));
        assert!(err("https://[::1]8000").contains("unexpected"));
        assert!(err("https://h:1/v1/agents").contains("path, query or fragment"));
        assert!(err("https://u:p@h:1").contains("user information"));
        assert!(err("https://bad host:1").contains("neither a host name nor an IP"));
        assert!(err("https://300.1.1.1").contains("neither a host name nor an IP"));
        for e in [err("ftp://x"), err("https://h:x")] {
            assert!(e.starts_with("--control-plane "), "{e}");
            assert!(e.ends_with("or several separated by commas"), "{e}");
        }
    }

    #[test]
    fn several_addresses_parse_in_order_without_duplicates() {
        let addrs: ControlPlaneAddrs = " https://cp-0:8000, https://cp-1:8001,https://cp-0:8000"
            .parse()
            .unwrap();
        let shown: Vec<String> = addrs.urls().iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["https://cp-0:8000", "https://cp-1:8001"]);
        assert_eq!(addrs.to_string(), "https://cp-0:8000,https://cp-1:8001");
        assert_eq!(addrs.first(), &url("https://cp-0:8000"));
        let one: ControlPlaneAddrs = "https://cp:1".parse().unwrap();
        assert_eq!(one, ControlPlaneAddrs::from(url("https://cp:1")));

        let err = "https://cp-0:8000,http://cp-1:8000"
            .parse::<ControlPlaneAddrs>()
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("--control-plane \"http://cp-1:8000\": the scheme is \"http\""),
            "{err}"
        );
        let err = "https://cp-0:8000,,https://x"
            .parse::<ControlPlaneAddrs>()
            .unwrap_err()
            .to_string();
        assert!(err.contains("an address in the list is empty"), "{err}");
        assert!("".parse::<ControlPlaneAddrs>().is_err());
    }
}

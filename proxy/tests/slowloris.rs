//! Slowloris against every listener: connections that send a header byte every 10 s are closed
//! by the header (or TLS handshake) deadline, a normal request still succeeds meanwhile, and
//! the connection cap holds (the excess is closed at accept and counted).
//!
//! Each listener is one line in `targets`: the control plane's API and admin listeners, the
//! proxy's inbound and admin listeners, each started with a 3 s deadline and a cap of 12
//! connections.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use std::sync::Arc;

use capmesh_certs::CredentialCell;
use capmesh_certs::tls::{client_config, connect};
use capmesh_tests::{ControlPlane, ProxyProcess, spiffe};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The deadline the control plane is started with (`--header-read-timeout`).
const DEADLINE: Duration = Duration::from_secs(3);
/// Its `--max-connections`.
const CAP: usize = 12;
/// How often a slow client sends one more byte of its request head.
const TRICKLE: Duration = Duration::from_secs(10);

/// What a listener speaks before HTTP.
#[derive(Debug, Clone, Copy)]
enum Wire {
    /// Plain HTTP.
    Plain,
    /// TLS first: the trickle is the start of a ClientHello.
    Tls,
}

/// Whose listener it is: decides what a normal request is and where refusals are counted.
#[derive(Debug, Clone, Copy)]
enum Owner<'a> {
    ControlPlane,
    Proxy(&'a ProxyProcess),
}

#[derive(Debug, Clone, Copy)]
struct Target<'a> {
    name: &'static str,
    port: u16,
    wire: Wire,
    owner: Owner<'a>,
}

/// Opens a connection that sends its request head one byte every [`TRICKLE`]; returns how long
/// the server took to close it (or `None` if it did not within `limit`).
async fn trickle(port: u16, wire: Wire, limit: Duration) -> Option<Duration> {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let head: &[u8] = match wire {
        Wire::Plain => b"GET /metrics HTTP/1.1\r\nhost: x\r\nx-slow: yes\r\n\r\n",
        // A TLS handshake record header, then nothing useful.
        Wire::Tls => &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc],
    };
    let start = Instant::now();
    let mut buf = [0u8; 512];
    for byte in head {
        if tcp.write_all(&[*byte]).await.is_err() {
            return Some(start.elapsed());
        }
        let left = limit.saturating_sub(start.elapsed());
        match tokio::time::timeout(TRICKLE.min(left), tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => {
                // An error page on the way out (408 or an alert): wait for the close.
                let mut rest = Vec::new();
                let closed = tokio::time::timeout(left, tcp.read_to_end(&mut rest)).await;
                return closed.is_ok().then(|| start.elapsed());
            }
            Err(_) if start.elapsed() >= limit => return None,
            Err(_) => {}
        }
    }
    None
}

/// A normal request to the listener succeeds.
async fn normal_request(cp: &ControlPlane, target: Target<'_>) -> bool {
    match (target.owner, target.wire) {
        (Owner::ControlPlane, Wire::Plain) => cp
            .admin_get("/live")
            .await
            .is_ok_and(|b| b.starts_with("ok")),
        (Owner::ControlPlane, Wire::Tls) => cp
            .rest()
            .unwrap()
            .get::<serde_json::Value>("/v1/agents", Some(&cp.admin_token().unwrap()))
            .await
            .is_ok(),
        (Owner::Proxy(proxy), Wire::Plain) => proxy
            .admin_get("/live")
            .await
            .is_ok_and(|(status, _)| status == 200),
        (Owner::Proxy(proxy), Wire::Tls) => {
            // Mutual TLS with a mesh certificate; any HTTP answer is the listener serving.
            let cred = cp.credential("default", "caller").await.unwrap();
            let config = client_config(
                Some(Arc::new(CredentialCell::new(cred))),
                cp.trust().unwrap(),
                spiffe("default", &proxy.agent).unwrap(),
                &[b"http/1.1"],
            )
            .unwrap();
            let Ok(tcp) = TcpStream::connect(("127.0.0.1", target.port)).await else {
                return false;
            };
            let Ok(mut tls) = connect(config, tcp).await else {
                return false;
            };
            let _ = tls
                .write_all(b"GET /mcp HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                .await;
            let mut out = Vec::new();
            let _ = tls.read_to_end(&mut out).await;
            out.starts_with(b"HTTP/1.1 ")
        }
    }
}

/// How many connections the listener's owner counted as refused at its cap.
async fn refused_count(cp: &ControlPlane, target: Target<'_>) -> f64 {
    let (metrics, name) = match target.owner {
        Owner::ControlPlane => (
            cp.admin_get("/metrics").await.unwrap(),
            "capmesh_cp_connections_refused_total",
        ),
        Owner::Proxy(proxy) => (
            proxy.admin_get("/metrics").await.unwrap().1,
            "capmesh_proxy_connections_refused_total",
        ),
    };
    let listener = target.name.trim_start_matches("proxy ");
    let prefix = format!("{name}{{listener=\"{listener}\"}}");
    metrics
        .lines()
        .find(|l| l.starts_with(&prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn slow_clients_are_closed_normal_ones_served_and_the_cap_holds() {
    let cp_bin = capmesh_tests::workspace_bin("capmesh-control-plane").unwrap();
    let deadline = format!("{}s", DEADLINE.as_secs());
    let cap = CAP.to_string();
    let limits = [
        "--header-read-timeout",
        deadline.as_str(),
        "--max-connections",
        cap.as_str(),
    ];
    let cp = ControlPlane::start(&cp_bin, &limits).await.unwrap();
    let proxy_bin = env!("CARGO_BIN_EXE_capmesh-proxy");
    let provider = ProxyProcess::start(proxy_bin.as_ref(), &cp, "alpha", None, &limits)
        .await
        .unwrap();
    let targets = [
        Target {
            name: "api",
            port: cp.port,
            wire: Wire::Tls,
            owner: Owner::ControlPlane,
        },
        Target {
            name: "admin",
            port: cp.admin_port,
            wire: Wire::Plain,
            owner: Owner::ControlPlane,
        },
        Target {
            name: "inbound",
            port: provider.inbound,
            wire: Wire::Tls,
            owner: Owner::Proxy(&provider),
        },
        Target {
            name: "proxy admin",
            port: provider.admin,
            wire: Wire::Plain,
            owner: Owner::Proxy(&provider),
        },
    ];
    for target in targets {
        // Four slow clients at once, closed by the deadline, while a normal request is served.
        let slow: Vec<_> = (0..4)
            .map(|_| tokio::spawn(trickle(target.port, target.wire, DEADLINE * 4)))
            .collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            normal_request(&cp, target).await,
            "{}: a normal request failed beside slow ones",
            target.name
        );
        for s in slow {
            let closed = s.await.unwrap();
            let after =
                closed.unwrap_or_else(|| panic!("{}: a slow client was not closed", target.name));
            assert!(
                after >= DEADLINE - Duration::from_millis(500),
                "{}: closed after {after:?}, before the deadline",
                target.name
            );
            eprintln!("{}: slow client closed after {after:?}", target.name);
        }

        // The cap: CAP silent connections fill the listener, one more is closed at once.
        // (Which one is refused depends on accept order, so look at all of them.)
        let mut held = Vec::new();
        for _ in 0..=CAP {
            held.push(
                TcpStream::connect(("127.0.0.1", target.port))
                    .await
                    .unwrap(),
            );
        }
        // All read at once: each waits the same 300 ms, well inside the deadline.
        let reads: Vec<_> = held
            .into_iter()
            .map(|mut conn| {
                tokio::spawn(async move {
                    let mut buf = [0u8; 16];
                    let r =
                        tokio::time::timeout(Duration::from_millis(300), conn.read(&mut buf)).await;
                    (matches!(r, Ok(Ok(0)) | Ok(Err(_))), conn)
                })
            })
            .collect();
        let mut held = Vec::new();
        let mut closed_at_once = 0;
        for read in reads {
            let (closed, conn) = read.await.unwrap();
            closed_at_once += usize::from(closed);
            held.push(conn);
        }
        // Never more than CAP open; the rest closed at accept (here: CAP open, one closed).
        let open = held.len() - closed_at_once;
        assert!(
            closed_at_once >= 1 && open <= CAP,
            "{}: {open} connections held open, the cap is {CAP}",
            target.name
        );
        eprintln!(
            "{}: {open} held open, {closed_at_once} closed at accept",
            target.name
        );
        // Once the deadline has closed the silent ones, normal requests are served again.
        tokio::time::sleep(DEADLINE + Duration::from_secs(1)).await;
        assert!(
            normal_request(&cp, target).await,
            "{}: not served after the slow clients left",
            target.name
        );
        drop(held);
    }
    for target in targets {
        let refused = refused_count(&cp, target).await;
        assert!(refused >= 1.0, "{}: no refusal counted", target.name);
    }
}

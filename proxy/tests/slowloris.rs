//! Slowloris against every listener: connections that send a header byte every 10 s are closed
//! by the header (or TLS handshake) deadline, a normal request still succeeds meanwhile, and
//! the connection cap holds (the excess is closed at accept and counted).
//!
//! Each listener is one line in `targets`; the proxy's listeners join it the same way.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use capmesh_tests::ControlPlane;
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

#[derive(Debug, Clone, Copy)]
struct Target {
    name: &'static str,
    port: u16,
    wire: Wire,
}

/// Opens a connection that sends its request head one byte every [`TRICKLE`]; returns how long
/// the server took to close it (or `None` if it did not within `limit`).
async fn trickle(target: Target, limit: Duration) -> Option<Duration> {
    let mut tcp = TcpStream::connect(("127.0.0.1", target.port))
        .await
        .unwrap();
    let head: &[u8] = match target.wire {
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
async fn normal_request(cp: &ControlPlane, target: Target) -> bool {
    match target.wire {
        Wire::Plain => cp
            .admin_get("/live")
            .await
            .is_ok_and(|b| b.starts_with("ok")),
        Wire::Tls => cp
            .rest()
            .unwrap()
            .get::<serde_json::Value>("/v1/agents", Some(&cp.admin_token().unwrap()))
            .await
            .is_ok(),
    }
}

#[tokio::test]
async fn slow_clients_are_closed_normal_ones_served_and_the_cap_holds() {
    let cp_bin = capmesh_tests::workspace_bin("capmesh-control-plane").unwrap();
    let cp = ControlPlane::start(
        &cp_bin,
        &[
            "--header-read-timeout",
            &format!("{}s", DEADLINE.as_secs()),
            "--max-connections",
            &CAP.to_string(),
        ],
    )
    .await
    .unwrap();
    let targets = [
        Target {
            name: "api",
            port: cp.port,
            wire: Wire::Tls,
        },
        Target {
            name: "admin",
            port: cp.admin_port,
            wire: Wire::Plain,
        },
    ];
    for target in targets {
        // Four slow clients at once, closed by the deadline, while a normal request is served.
        let slow: Vec<_> = (0..4)
            .map(|_| tokio::spawn(trickle(target, DEADLINE * 4)))
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
    let metrics = cp.admin_get("/metrics").await.unwrap();
    for target in targets {
        let line = metrics
            .lines()
            .find(|l| {
                l.starts_with(&format!(
                    "capmesh_cp_connections_refused_total{{listener=\"{}\"}}",
                    target.name
                ))
            })
            .unwrap_or_else(|| panic!("no refusal counted for {}:\n{metrics}", target.name));
        let count: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(count >= 1.0, "{line}");
    }
}

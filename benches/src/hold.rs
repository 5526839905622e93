//! `capmesh-bench hold`: starts one path in front of the echo upstream (the capmesh mesh with
//! N providers, nginx's two instances, HAProxy's, or the [`crate::floor`] path) and holds it
//! until SIGTERM or Ctrl-C. It
//! prints one JSON line naming the entry URL and the process ids of the entry instance and of
//! every process the path started, for scripts that measure a path from outside with `perf`
//! and `/proc` (`benches/split.sh`, `benches/providers.sh`). Pin it with `taskset`: the
//! processes it starts inherit the CPU list, and the sidecars `TOKIO_WORKER_THREADS`.

use anyhow::{Context, Result, bail};
use capmesh_tests::ProxyProcess;
use serde::Serialize;

use crate::peers::{Kind, Peer};
use crate::procstat;

/// Which path to hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldPath {
    /// Control plane, provider sidecars and a consumer sidecar.
    Capmesh,
    /// A two-hop peer.
    Peer(Kind),
    /// capmesh's crates without capmesh (see [`crate::floor`]).
    Floor,
}

impl std::str::FromStr for HoldPath {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "capmesh" => Ok(Self::Capmesh),
            "nginx" => Ok(Self::Peer(Kind::Nginx)),
            "haproxy" => Ok(Self::Peer(Kind::Haproxy)),
            "floor" => Ok(Self::Floor),
            other => Err(format!("{other:?}: use capmesh, nginx, haproxy or floor")),
        }
    }
}

/// What `hold` prints once the path serves.
#[derive(Debug, Serialize)]
pub struct Held {
    /// Where a client sends `tools/call` (HTTP/1.1).
    pub entry: String,
    /// The entry instance: the consumer's sidecar, or the peer's or the floor path's front
    /// instance (its worker processes included).
    pub entry_pids: Vec<u32>,
    /// Every process the path started, the entry instance's included.
    pub pids: Vec<u32>,
}

/// Starts `path` in front of the echo server on 127.0.0.1:`upstream`, prints [`Held`] and
/// waits for SIGTERM or Ctrl-C; everything started is stopped on the way out.
pub async fn run(path: HoldPath, providers: usize, upstream: u16) -> Result<()> {
    let echo_url = format!("http://127.0.0.1:{upstream}/mcp");
    // Held here so that they live until the signal, and are stopped when dropped.
    let mut mesh: Vec<ProxyProcess> = vec![];
    let mut control_plane = None;
    let mut peer = None;
    let mut floor = None;
    let held = match path {
        HoldPath::Capmesh => {
            if providers == 0 {
                bail!("--providers must be 1 or more");
            }
            let (cp, providers_started, consumer) =
                crate::suite::start_mesh(providers, &echo_url).await?;
            mesh = providers_started;
            crate::suite::until_ready_endpoints(consumer.admin, providers, "hold").await?;
            let entry_pid = consumer.pid().context("the consumer's sidecar exited")?;
            let mut pids = vec![cp.pid().context("the control plane exited")?];
            pids.extend(mesh.iter().filter_map(ProxyProcess::pid));
            pids.push(entry_pid);
            let held = Held {
                entry: format!("http://127.0.0.1:{}/mcp", consumer.outbound),
                entry_pids: vec![entry_pid],
                pids,
            };
            mesh.push(consumer);
            control_plane = Some(cp);
            held
        }
        HoldPath::Peer(kind) => {
            let p = Peer::start(kind, upstream)?;
            let (front, back) = p.pids();
            let entry_pids = procstat::tree(front);
            let mut pids = entry_pids.clone();
            pids.extend(procstat::tree(back));
            let held = Held {
                entry: format!("http://127.0.0.1:{}/mcp", p.entry_h1),
                entry_pids,
                pids,
            };
            peer = Some(p);
            held
        }
        HoldPath::Floor => {
            let f = crate::floor::Floor::start(upstream)?;
            let (front, back) = f.pids();
            let held = Held {
                entry: format!("http://127.0.0.1:{}/mcp", f.entry),
                entry_pids: vec![front],
                pids: vec![front, back],
            };
            floor = Some(f);
            held
        }
    };
    println!("{}", serde_json::to_string(&held)?);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        r = tokio::signal::ctrl_c() => r?,
    }
    drop(mesh);
    drop(control_plane);
    drop(peer);
    drop(floor);
    Ok(())
}

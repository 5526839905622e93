//! The topology stream, proxy side: hello with the registration, snapshots and deltas applied
//! atomically and acked (or nacked, keeping the old state), health and re-registration sent up,
//! last known good kept when the stream drops, reconnects with jittered backoff.

use std::sync::Arc;
use std::time::Duration;

use capmesh_api::{ControlFrame, Hello, Node, ProxyFrame, Registration, SnapshotVersion};
use capmesh_client::ControlPlaneClient;
use tokio::sync::watch;

use crate::Proxy;
use crate::backoff::ExponentialBackoff;
use crate::readiness::{Condition, Readiness, StartupWait};

/// The `health` frame for the agent's state: unhealthy ones say why.
fn health_frame(healthy: bool, readiness: &Readiness) -> ProxyFrame {
    ProxyFrame::Health {
        healthy,
        detail: (!healthy).then(|| readiness.reason(Condition::AgentHealth)),
    }
}

/// Runs the stream until `stop` flips; then says goodbye (withdrawing at once).
#[allow(clippy::too_many_arguments)]
pub async fn run(
    proxy: Arc<Proxy>,
    client: ControlPlaneClient,
    node: Node,
    mut registration: watch::Receiver<Option<Registration>>,
    mut healthy: watch::Receiver<bool>,
    readiness: Arc<Readiness>,
    mut stop: watch::Receiver<bool>,
    goodbye_sent: tokio::sync::oneshot::Sender<()>,
) {
    let mut backoff = ExponentialBackoff::default_stream().backoff();
    let mut goodbye_sent = Some(goodbye_sent);
    // Waiting for the first snapshot, then for the stream to come back: each logged at WARN
    // once (then at a bounded interval), not once per attempt.
    let mut first = StartupWait::new("the first snapshot");
    let mut reconnect = StartupWait::new("the topology stream to reopen");
    loop {
        if *stop.borrow() {
            break;
        }
        let current = registration
            .borrow_and_update()
            .clone()
            .unwrap_or_else(|| proxy.empty_registration());
        let held = proxy.routing.load().snapshot.as_ref().map(|s| s.version);
        let hello = ProxyFrame::Hello(Hello {
            node: node.clone(),
            registration: current,
            version: held,
        });
        let opened = tokio::select! {
            _ = stop.changed() => break,
            r = client.open_stream(&hello) => r,
        };
        let (tx, mut rx) = match opened {
            Ok(pair) => pair,
            Err(e) => {
                let delay = backoff.next_delay();
                let reason = e.to_string();
                if held.is_none() {
                    readiness.waiting(Condition::Snapshot, reason.clone());
                    first.waiting(
                        &reason,
                        "start the control plane, or fix --control-plane / --control-plane-ca",
                        false,
                    );
                } else {
                    reconnect.waiting(
                        &reason,
                        "calls keep being routed on the last snapshot; start the control plane or fix --control-plane",
                        false,
                    );
                }
                tokio::select! {
                    _ = stop.changed() => break,
                    _ = tokio::time::sleep(delay) => continue,
                }
            }
        };
        proxy.metrics.control_plane_connected.set(1);
        first.done();
        reconnect.done();
        match held {
            Some(version) => tracing::info!(held = %version, "topology stream open"),
            None => {
                readiness.waiting(
                    Condition::Snapshot,
                    "the topology stream is open; waiting for the control plane's first snapshot",
                );
                tracing::info!("topology stream open")
            }
        }
        let h = *healthy.borrow_and_update();
        let _ = tx.send(&health_frame(h, &readiness)).await;
        let mut stopping = false;
        // Sampled spans go up once a second and a traffic report every five: a bounded number
        // of frames whatever the call rate (spans beyond a frame's worth wait, then drop).
        let mut spans_due = tokio::time::interval(crate::trace::SPANS_EVERY);
        let mut traffic_due = tokio::time::interval(crate::trace::TRAFFIC_EVERY);
        loop {
            tokio::select! {
                _ = spans_due.tick() => {
                    if let Some((frame, n)) = proxy.tracer.spans_frame() {
                        if tx.send(&frame).await.is_err() {
                            proxy.tracer.lost_to_stream(n);
                            break;
                        }
                        proxy.tracer.sent_to_control_plane(n);
                    }
                }
                _ = traffic_due.tick() => {
                    let frame = proxy.tracer.traffic_frame(&proxy.metrics, &proxy.routing.load());
                    if let Some(frame) = frame && tx.send(&frame).await.is_err() {
                        break;
                    }
                }
                _ = stop.changed() => { stopping = true; break; }
                changed = registration.changed() => {
                    if changed.is_err() { continue; }
                    let next = registration.borrow_and_update().clone();
                    if let Some(reg) = next
                        && tx.send(&ProxyFrame::Register(reg)).await.is_err()
                    {
                        break;
                    }
                }
                changed = healthy.changed() => {
                    if changed.is_err() { continue; }
                    let h = *healthy.borrow_and_update();
                    if tx.send(&health_frame(h, &readiness)).await.is_err() {
                        break;
                    }
                }
                frame = rx.next() => match frame {
                    None => { tracing::warn!("the control plane closed the topology stream; reconnecting"); break; }
                    Some(Err(e)) => { tracing::warn!(error = %e, "topology stream failed; reconnecting"); break; }
                    Some(Ok(ControlFrame::Error { code, message })) => {
                        tracing::warn!(code = %code, message = %message, "the control plane sent an error");
                    }
                    Some(Ok(ControlFrame::Nack { of, code, message, refused })) => {
                        let capabilities: Vec<&str> = refused.iter().map(|r| r.capability.as_str()).collect();
                        tracing::warn!(frame = %of, code = %code, message = %message, refused = %capabilities.join(", "), "the control plane refused part of what this proxy sent");
                    }
                    Some(Ok(frame)) => {
                        let reply = match proxy.apply(frame) {
                            Ok(version) => {
                                tracing::debug!(version = %version, "applied");
                                backoff.reset();
                                ProxyFrame::Ack { version }
                            }
                            Err((version, error)) => {
                                if proxy.routing.load().snapshot.is_none() {
                                    readiness.waiting(Condition::Snapshot, format!("refused the control plane's snapshot {version}: {error}"));
                                }
                                tracing::warn!(version = %version, error = %error, "refused a topology update; keeping the current snapshot");
                                ProxyFrame::Nack { version, error }
                            }
                        };
                        if tx.send(&reply).await.is_err() {
                            break;
                        }
                    }
                },
            }
        }
        proxy.metrics.control_plane_connected.set(0);
        if stopping {
            // Withdraw from the mesh first: consumers stop choosing us within one delta.
            let _ = tx.send(&ProxyFrame::Goodbye).await;
            drop(tx);
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while rx.next().await.is_some() {}
            })
            .await;
            if let Some(done) = goodbye_sent.take() {
                let _ = done.send(());
            }
            return;
        }
        let delay = backoff.next_delay();
        tokio::select! {
            _ = stop.changed() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    if let Some(done) = goodbye_sent.take() {
        let _ = done.send(());
    }
}

/// The version a frame would install.
pub fn frame_version(frame: &ControlFrame) -> SnapshotVersion {
    match frame {
        ControlFrame::Snapshot(s) => s.version,
        ControlFrame::Delta(d) => d.version,
        ControlFrame::Error { .. } | ControlFrame::Nack { .. } => SnapshotVersion(0),
    }
}

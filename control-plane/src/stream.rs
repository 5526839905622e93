//! `POST /v1/stream`: one proxy's topology stream. Hello first (checked against the client
//! certificate), then a full snapshot, then a delta for every change the proxy cares about,
//! while acks, nacks, health, re-registrations and goodbye come up. See `docs/protocol.md`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use capmesh_api::{ControlFrame, ProxyFrame, SnapshotVersion, encode_frame};
use capmesh_certs::VerifiedPeer;
use capmesh_client::body::channel;
use capmesh_client::frames::{FrameReader, ReadError};
use http::{Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::sync::mpsc;

use crate::App;
use crate::registry::Lease;
use crate::rest::Body;

/// How long a new stream may take to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

fn frame_response(status: StatusCode, code: &str, message: String) -> Response<Body> {
    let frame = ControlFrame::Error {
        code: code.to_owned(),
        message,
    };
    let mut resp = Response::new(Full::new(Bytes::from(encode_frame(&frame))).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/x-ndjson"),
    );
    resp
}

fn read_error_code(e: &ReadError) -> &'static str {
    match e {
        ReadError::Frame(capmesh_api::FrameError::TooLarge { .. }) => "frame_too_large",
        _ => "malformed_frame",
    }
}

/// Accepts or refuses a stream. On acceptance the stream runs in its own task and the response
/// body stays open for its life.
pub async fn handle(
    app: Arc<App>,
    peer: Option<VerifiedPeer>,
    cert_not_after: Option<i64>,
    body: Incoming,
) -> Response<Body> {
    let Some(peer) = peer else {
        app.metrics.refuse("no_client_certificate");
        return frame_response(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the topology stream needs the proxy's mesh certificate as its TLS client certificate"
                .into(),
        );
    };
    let mut reader: FrameReader<ProxyFrame> = FrameReader::new(body);
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, reader.next()).await {
        Ok(Some(Ok(ProxyFrame::Hello(hello)))) => hello,
        Ok(Some(Ok(_))) => {
            app.metrics.refuse("expected_hello");
            return frame_response(
                StatusCode::BAD_REQUEST,
                "expected_hello",
                "the first frame must be hello".into(),
            );
        }
        Ok(Some(Err(e))) => {
            app.metrics.refuse(read_error_code(&e));
            return frame_response(
                StatusCode::BAD_REQUEST,
                read_error_code(&e),
                format!("first frame: {e}"),
            );
        }
        Ok(None) | Err(_) => {
            app.metrics.refuse("expected_hello");
            return frame_response(
                StatusCode::BAD_REQUEST,
                "expected_hello",
                format!("no hello frame arrived within {HELLO_TIMEOUT:?}"),
            );
        }
    };
    let node = &hello.node;
    if node.agent != *peer.identity.agent() || node.namespace != *peer.identity.namespace() {
        tracing::warn!(
            claimed = %format!("{}/{}", node.namespace, node.agent),
            certificate = %peer.identity,
            proxy_id = %node.proxy_id,
            "stream refused: the hello claims another agent than its certificate"
        );
        app.metrics.refuse("identity_mismatch");
        return frame_response(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "hello claims agent {}/{}, but the client certificate is {}: an agent can only register as itself",
                node.namespace, node.agent, peer.identity
            ),
        );
    }
    tracing::info!(
        proxy_id = %node.proxy_id,
        identity = %peer.identity,
        tools = hello.registration.tools.len(),
        held = %hello
            .version
            .map_or_else(|| "none".to_owned(), |v| v.to_string()),
        "stream opened"
    );
    let lease = app.registry.connect(
        hello.node.clone(),
        peer.identity.to_string(),
        peer.entity.clone(),
        cert_not_after,
        hello.registration,
    );
    app.persist(&lease.proxy_id);
    let (tx, body) = channel(64);
    let agent = hello.node.agent.to_string();
    tokio::spawn(run(app, lease, agent, reader, tx));
    let mut resp = Response::new(body.boxed());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/x-ndjson"),
    );
    resp
}

async fn send(tx: &mpsc::Sender<Bytes>, frame: &ControlFrame) -> bool {
    tx.send(Bytes::from(encode_frame(frame))).await.is_ok()
}

/// The life of one accepted stream.
async fn run(
    app: Arc<App>,
    lease: Lease,
    agent: String,
    mut reader: FrameReader<ProxyFrame>,
    tx: mpsc::Sender<Bytes>,
) {
    let Lease {
        proxy_id,
        epoch,
        mut closed,
    } = lease;
    app.metrics.streams_connected.inc();
    let mut changes = app.registry.subscribe();
    changes.borrow_and_update();
    let (snapshot, mut view) = app.registry.snapshot(&app.registry.dependencies(&proxy_id));
    let mut in_flight: VecDeque<(SnapshotVersion, Instant)> = VecDeque::new();
    let mut graceful = false;
    let mut last_snapshot = view.version;
    if send(&tx, &ControlFrame::Snapshot(snapshot)).await {
        app.metrics.snapshots_sent.inc();
        in_flight.push_back((view.version, Instant::now()));
        loop {
            tokio::select! {
                reason = &mut closed => {
                    let message = reason.unwrap_or_else(|_| "closed by the control plane".into());
                    tracing::info!(proxy_id = %proxy_id, reason = %message, "closing stream");
                    send(&tx, &ControlFrame::Error { code: "closed".into(), message }).await;
                    // Replaced or revoked: this instance's endpoints go now (a replacing stream
                    // holds a newer epoch, so this withdraws nothing of it).
                    graceful = true;
                    break;
                }
                changed = changes.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let deps = app.registry.dependencies(&proxy_id);
                    if let Some(delta) = app.registry.delta(&mut view, &deps) {
                        let version = delta.version;
                        if !send(&tx, &ControlFrame::Delta(delta)).await {
                            break;
                        }
                        app.metrics.deltas_sent.inc();
                        in_flight.push_back((version, Instant::now()));
                        if in_flight.len() > 64 {
                            in_flight.pop_front();
                        }
                    }
                }
                frame = reader.next() => match frame {
                    None => break,
                    Some(Err(ReadError::Body(e))) => {
                        tracing::debug!(proxy_id = %proxy_id, error = %e, "stream broke");
                        break;
                    }
                    Some(Err(e)) => {
                        tracing::warn!(proxy_id = %proxy_id, error = %e, "bad frame: closing the stream");
                        app.metrics.refuse(read_error_code(&e));
                        send(&tx, &ControlFrame::Error { code: read_error_code(&e).into(), message: e.to_string() }).await;
                        break;
                    }
                    Some(Ok(frame)) => match frame {
                        ProxyFrame::Ack { version } => {
                            while let Some((v, at)) = in_flight.front().copied() {
                                if v > version {
                                    break;
                                }
                                in_flight.pop_front();
                                if v == version {
                                    app.metrics.ack_latency.observe(at.elapsed().as_secs_f64());
                                }
                            }
                            app.registry.ack(&proxy_id, epoch, version);
                        }
                        ProxyFrame::Nack { version, error } => {
                            tracing::warn!(proxy_id = %proxy_id, version = %version, error = %error, "proxy refused a frame");
                            app.metrics.nacks.inc();
                            in_flight.retain(|(v, _)| *v != version);
                            // After a refused delta, start over with a full snapshot: the
                            // proxy's state and ours have drifted. A refused snapshot is not
                            // re-sent until something changes (the next change brings a delta,
                            // which the proxy refuses, which brings a fresh snapshot).
                            if version != last_snapshot {
                                let (snapshot, fresh) = app.registry.snapshot(&app.registry.dependencies(&proxy_id));
                                view = fresh;
                                last_snapshot = view.version;
                                if !send(&tx, &ControlFrame::Snapshot(snapshot)).await {
                                    break;
                                }
                                app.metrics.snapshots_sent.inc();
                                in_flight.push_back((view.version, Instant::now()));
                            }
                        }
                        ProxyFrame::Health { healthy, detail } => {
                            tracing::debug!(proxy_id = %proxy_id, healthy, detail = ?detail, "health");
                            app.registry.set_health(&proxy_id, epoch, healthy, detail);
                            app.persist(&proxy_id);
                        }
                        ProxyFrame::Register(registration) => {
                            tracing::info!(proxy_id = %proxy_id, tools = registration.tools.len(), "re-registered");
                            app.registry.register(&proxy_id, epoch, registration);
                            app.persist(&proxy_id);
                        }
                        ProxyFrame::Spans { spans, dropped } => {
                            app.observed.accept(&app.metrics, &agent, &proxy_id, spans, dropped);
                        }
                        ProxyFrame::Traffic(traffic) => {
                            app.observed.traffic(&agent, &proxy_id, traffic);
                        }
                        ProxyFrame::Goodbye => {
                            tracing::info!(proxy_id = %proxy_id, "goodbye: withdrawing now");
                            graceful = true;
                            break;
                        }
                        ProxyFrame::Hello(_) => {
                            app.metrics.refuse("malformed_frame");
                            send(&tx, &ControlFrame::Error {
                                code: "malformed_frame".into(),
                                message: "hello may only be the first frame of a stream".into(),
                            }).await;
                            break;
                        }
                    },
                },
            }
        }
    }
    app.metrics.streams_connected.dec();
    app.registry.disconnect(&proxy_id, epoch, graceful);
    if graceful && app.registry.record(&proxy_id).is_none() {
        app.forget(&proxy_id);
    }
    if !graceful {
        tracing::info!(proxy_id = %proxy_id, grace_ms = app.grace.as_millis() as u64, "stream ended; endpoints withdrawn after the grace period unless it reconnects");
        let app = app.clone();
        tokio::spawn(async move {
            tokio::time::sleep(app.grace).await;
            if app.registry.expire(&proxy_id, epoch) {
                tracing::info!(proxy_id = %proxy_id, "endpoints withdrawn");
                app.forget(&proxy_id);
            }
        });
    }
}

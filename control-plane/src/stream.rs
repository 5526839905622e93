//! `POST /v1/stream`: one proxy's topology stream. Hello first (checked against the client
//! certificate), then a full snapshot, then a delta for every change the proxy cares about,
//! while acks, nacks, health, re-registrations and goodbye come up. See `docs/protocol.md`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use capmesh_api::rest::RefusedCapability;
use capmesh_api::{ControlFrame, ProxyFrame, SnapshotVersion, encode_frame};
use capmesh_certs::{PeerRole, VerifiedPeer};
use capmesh_client::body::channel;
use capmesh_client::frames::{FrameReader, ReadError};
use http::{Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use rustls::pki_types::CertificateDer;
use tokio::sync::mpsc;

use crate::App;
use crate::registry::Lease;
use crate::rest::Body;

/// How long a new stream may take to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest proxy id: it is a key in the store and travels in change notifications (PostgreSQL
/// caps those at 8,000 bytes).
const MAX_PROXY_ID: usize = 256;

/// Register and health frames a stream may send in a burst, and per second after it. A proxy
/// sends them when its agent's tools or health change, far below this; more is a broken or
/// hostile proxy making the control plane republish in a loop.
const FRAME_BURST: f64 = 20.0;
const FRAMES_PER_SEC: f64 = 5.0;

/// A token bucket for one stream's register and health frames.
#[derive(Debug)]
struct FrameBudget {
    tokens: f64,
    at: Instant,
}

impl FrameBudget {
    fn new() -> Self {
        Self {
            tokens: FRAME_BURST,
            at: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * FRAMES_PER_SEC)
            .min(FRAME_BURST);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

fn provide_nack(of: &str, refused: Vec<RefusedCapability>) -> ControlFrame {
    let names: Vec<&str> = refused.iter().map(|r| r.capability.as_str()).collect();
    ControlFrame::Nack {
        of: of.to_owned(),
        code: "not_allowed_to_provide".into(),
        message: format!(
            "not published: {} (the policy's provide rules; `capmesh status` lists them); the rest of the registration is",
            names.join(", ")
        ),
        refused,
    }
}

/// Refuses a stream before it starts: counts the refusal under `reason` and answers `status`
/// with one error frame (`code`, `message`).
fn refuse(
    app: &App,
    reason: &str,
    status: StatusCode,
    code: &str,
    message: String,
) -> Response<Body> {
    app.metrics.refuse(reason);
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
    chain: Vec<CertificateDer<'static>>,
    cert_not_after: Option<i64>,
    body: Incoming,
) -> Response<Body> {
    let Some(peer) = peer else {
        return refuse(
            &app,
            "no_client_certificate",
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
            return refuse(
                &app,
                "expected_hello",
                StatusCode::BAD_REQUEST,
                "expected_hello",
                "the first frame must be hello".into(),
            );
        }
        Ok(Some(Err(e))) => {
            return refuse(
                &app,
                read_error_code(&e),
                StatusCode::BAD_REQUEST,
                read_error_code(&e),
                format!("first frame: {e}"),
            );
        }
        Ok(None) | Err(_) => {
            return refuse(
                &app,
                "expected_hello",
                StatusCode::BAD_REQUEST,
                "expected_hello",
                format!("no hello frame arrived within {HELLO_TIMEOUT:?}"),
            );
        }
    };
    let node = &hello.node;
    if node.proxy_id.is_empty()
        || node.proxy_id.len() > MAX_PROXY_ID
        || node.proxy_id.chars().any(char::is_control)
    {
        return refuse(
            &app,
            "malformed_frame",
            StatusCode::BAD_REQUEST,
            "malformed_frame",
            format!(
                "hello: proxy_id must be 1 to {MAX_PROXY_ID} bytes without control characters (got {} bytes): use the default (host name and a random suffix) or a short name",
                node.proxy_id.len()
            ),
        );
    }
    if node.agent != *peer.identity.agent() || node.namespace != *peer.identity.namespace() {
        tracing::warn!(
            claimed = %format!("{}/{}", node.namespace, node.agent),
            certificate = %peer.identity,
            proxy_id = %node.proxy_id,
            "stream refused: the hello claims another agent than its certificate"
        );
        return refuse(
            &app,
            "identity_mismatch",
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
    let lease = match app.registry.connect(
        hello.node.clone(),
        peer.identity.to_string(),
        peer.entity.clone(),
        cert_not_after,
        hello.registration,
    ) {
        Ok(lease) => lease,
        Err(why) => {
            tracing::warn!(proxy_id = %hello.node.proxy_id, identity = %peer.identity, "stream refused: the proxy id belongs to another identity");
            return refuse(
                &app,
                "proxy_id_taken",
                StatusCode::FORBIDDEN,
                "proxy_id_taken",
                why,
            );
        }
    };
    app.persist(&lease.proxy_id);
    let (tx, body) = channel(64);
    let agent = hello.node.agent.to_string();
    tokio::spawn(run(app, lease, agent, chain, reader, tx));
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
    chain: Vec<CertificateDer<'static>>,
    mut reader: FrameReader<ProxyFrame>,
    tx: mpsc::Sender<Bytes>,
) {
    let Lease {
        proxy_id,
        epoch,
        started_ms,
        mut closed,
    } = lease;
    // Ends the stream when its certificate is revoked (identity, serial, entity) or expires.
    let trust = app.trust.clone();
    let untrusted = trust.until_refused(&chain, PeerRole::Client);
    tokio::pin!(untrusted);
    let mut budget = FrameBudget::new();
    app.metrics.streams_connected.inc();
    // Subscribed before the snapshot is taken, so no change falls in between.
    let deps = app.registry.dependencies(&proxy_id);
    let subscription = app.registry.subscribe(&deps);
    let (snapshot, mut view) = app.registry.snapshot(&deps);
    let mut in_flight: VecDeque<(SnapshotVersion, Instant)> = VecDeque::new();
    let mut graceful = false;
    let mut last_snapshot = view.version;
    if send(&tx, &ControlFrame::Snapshot(snapshot)).await {
        app.metrics.snapshots_sent.inc();
        in_flight.push_back((view.version, Instant::now()));
        let refused = app.registry.refused(&proxy_id);
        if !refused.is_empty() {
            app.metrics.refuse("not_allowed_to_provide");
            send(&tx, &provide_nack("hello", refused)).await;
        }
        loop {
            tokio::select! {
                refusal = &mut untrusted => {
                    tracing::info!(proxy_id = %proxy_id, reason = %refusal, "closing stream: its certificate is no longer trusted");
                    app.metrics.refuse(refusal.reason());
                    send(&tx, &ControlFrame::Error {
                        code: refusal.reason().into(),
                        message: format!("your certificate is no longer trusted: {refusal}"),
                    }).await;
                    graceful = true;
                    break;
                }
                reason = &mut closed => {
                    let message = reason.unwrap_or_else(|_| "closed by the control plane".into());
                    tracing::info!(proxy_id = %proxy_id, reason = %message, "closing stream");
                    send(&tx, &ControlFrame::Error { code: "closed".into(), message }).await;
                    // Replaced or revoked: this instance's endpoints go now (a replacing stream
                    // holds a newer epoch, so this withdraws nothing of it).
                    graceful = true;
                    break;
                }
                () = subscription.changed() => {
                    let deps = app.registry.dependencies(&proxy_id);
                    if let Some(delta) = app.registry.delta(&mut view, &deps) {
                        let version = delta.version;
                        if !send(&tx, &ControlFrame::Delta(delta)).await {
                            break;
                        }
                        app.metrics.deltas_sent.inc();
                        tracing::debug!(proxy_id = %proxy_id, version = %version, "delta sent");
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
                        ProxyFrame::Health { .. } | ProxyFrame::Register(_) if !budget.take() => {
                            let of = if matches!(frame, ProxyFrame::Health { .. }) { "health" } else { "register" };
                            app.metrics.frames_rate_limited.with_label_values(&[of]).inc();
                            tracing::debug!(proxy_id = %proxy_id, frame = of, "frame over the rate limit: refused");
                            send(&tx, &ControlFrame::Nack {
                                of: of.into(),
                                code: "rate_limited".into(),
                                message: format!("more than {FRAMES_PER_SEC} register/health frames a second (bursts of {FRAME_BURST}): this one was not applied; send it again later"),
                                refused: vec![],
                            }).await;
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
                            // New dependencies may mean new endpoints for this proxy itself.
                            subscription.set_dependencies(&app.registry.dependencies(&proxy_id));
                            subscription.poke();
                            let refused = app.registry.refused(&proxy_id);
                            if !refused.is_empty() {
                                app.metrics.refuse("not_allowed_to_provide");
                                send(&tx, &provide_nack("register", refused)).await;
                            }
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
    if !app.registry.disconnect(&proxy_id, epoch, graceful) {
        // Replaced by a newer stream (here or on another replica), which owns the instance now.
        return;
    }
    if graceful {
        app.writer.mark_gone(&proxy_id, started_ms);
        return;
    }
    app.persist(&proxy_id);
    tracing::info!(proxy_id = %proxy_id, grace_ms = app.grace.as_millis() as u64, "stream ended; endpoints withdrawn after the grace period unless it reconnects");
    tokio::spawn(async move {
        tokio::time::sleep(app.grace).await;
        app.expire_local(proxy_id, epoch, started_ms).await;
    });
}

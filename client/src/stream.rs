//! The proxy's side of the topology stream: `POST /v1/stream` over HTTP/2, frames both ways on
//! one open request.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use capmesh_api::{ControlFrame, MAX_FRAME_BYTES, ProxyFrame, encode_frame};
use http::header::{ACCEPT, CONTENT_TYPE};
use http::{Request, StatusCode, Uri};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::mpsc;

use crate::body::{ChannelBody, channel};
use crate::connect::{ConnTask, drive, negotiated_h2};
use crate::frames::FrameReader;
use crate::rest::{BoundedError, MAX_ERROR_BYTES, api_error, read_bounded};
use crate::{ClientError, ControlPlaneClient};

/// The stream's path on the control plane.
pub const STREAM_PATH: &str = "/v1/stream";

/// The stream's content type: one JSON frame per line.
pub const NDJSON: &str = "application/x-ndjson";

/// How long the control plane may take to answer the stream's request (or refuse it).
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// HTTP/2 keepalive: a ping this often, the connection given up when one goes unanswered.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Frames that may wait to be written before [`StreamSender::send`] waits.
const SEND_BUFFER: usize = 64;

impl ControlPlaneClient {
    /// Opens the topology stream on a fresh HTTP/2 connection and sends `first` (the proxy's
    /// `hello`) on it.
    ///
    /// The first frame goes out before the answer is awaited because the control plane reads
    /// it to decide whether to accept the stream at all. A refusal (403 when the hello's
    /// agent does not match the certificate) comes back as [`ClientError::Api`].
    ///
    /// The connection lives while the sender or the receiver does. To leave gracefully, send
    /// `goodbye`, drop every sender, and read the receiver until it ends.
    pub async fn open_stream(
        &self,
        first: &ProxyFrame,
    ) -> Result<(StreamSender, StreamReceiver), ClientError> {
        let url = self.url().to_string();
        let http = |source| ClientError::Http {
            url: url.clone(),
            source,
        };
        let tls = self.connect().await?;
        if !negotiated_h2(&tls) {
            return Err(ClientError::NoHttp2 { url });
        }
        let (mut send, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(http)?;
        let conn = Arc::new(ConnTask(tokio::spawn(drive("topology stream", conn))));

        let (tx, body) = channel(SEND_BUFFER);
        let sender = StreamSender {
            tx,
            _conn: conn.clone(),
        };
        sender.send(first).await?;

        let invalid = |e: http::Error| ClientError::InvalidPath {
            path: STREAM_PATH.to_owned(),
            detail: e.to_string(),
        };
        let uri = Uri::builder()
            .scheme("https")
            .authority(self.url().authority().as_str())
            .path_and_query(STREAM_PATH)
            .build()
            .map_err(invalid)?;
        let request = Request::post(uri)
            .header(CONTENT_TYPE, NDJSON)
            .header(ACCEPT, NDJSON)
            .body(body)
            .map_err(invalid)?;

        let answer = async {
            let response = send.send_request(request).await.map_err(http)?;
            let status = response.status();
            if status == StatusCode::OK {
                return Ok(response.into_body());
            }
            let bytes = read_bounded(response.into_body(), MAX_ERROR_BYTES)
                .await
                .map_err(|e| match e {
                    BoundedError::TooLarge => ClientError::TooLarge {
                        path: STREAM_PATH.to_owned(),
                        limit: MAX_ERROR_BYTES,
                    },
                    BoundedError::Http(source) => http(source),
                })?;
            Err(api_error(status, &bytes))
        };
        let body = match tokio::time::timeout(RESPONSE_TIMEOUT, answer).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(ClientError::Timeout {
                    url,
                    stage: "opening the topology stream with",
                    after: RESPONSE_TIMEOUT,
                });
            }
        };
        let receiver = StreamReceiver {
            frames: FrameReader::new(body),
            _send: send,
            _conn: conn,
        };
        Ok((sender, receiver))
    }
}

/// Sends frames on the topology stream. Clones share the stream (health reports and acks may
/// come from different tasks); the request ends when every clone is dropped.
#[derive(Debug, Clone)]
pub struct StreamSender {
    tx: mpsc::Sender<Bytes>,
    _conn: Arc<ConnTask>,
}

impl StreamSender {
    /// Queues `frame` to be written; waits while the connection is backed up.
    /// [`ClientError::StreamClosed`] once the stream is gone.
    pub async fn send(&self, frame: &ProxyFrame) -> Result<(), ClientError> {
        let line = encode_frame(frame);
        // The line ends in '\n', which the limit does not count.
        if line.len() > MAX_FRAME_BYTES + 1 {
            return Err(ClientError::FrameTooLarge {
                kind: frame_kind(frame),
                size: line.len() - 1,
                limit: MAX_FRAME_BYTES,
            });
        }
        self.tx
            .send(Bytes::from(line))
            .await
            .map_err(|_| ClientError::StreamClosed)
    }

    /// Queues bytes exactly as given, for tools and tests that speak the wire format directly
    /// (a malformed line, say). Proxies use [`StreamSender::send`].
    pub async fn send_raw(&self, bytes: Bytes) -> Result<(), ClientError> {
        self.tx
            .send(bytes)
            .await
            .map_err(|_| ClientError::StreamClosed)
    }

    /// Whether the stream is gone (the next `send` would fail).
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// Receives the control plane's frames on the topology stream.
#[derive(Debug)]
pub struct StreamReceiver {
    frames: FrameReader<ControlFrame>,
    // Held so the connection is not wound down while the stream is open.
    _send: http2::SendRequest<ChannelBody>,
    _conn: Arc<ConnTask>,
}

impl StreamReceiver {
    /// The next frame; `None` when the control plane ended the stream. A connection failure
    /// (keepalive timeout, reset) is reported once, then `None`. Cancel safe.
    pub async fn next(&mut self) -> Option<Result<ControlFrame, ClientError>> {
        self.frames
            .next()
            .await
            .map(|frame| frame.map_err(ClientError::from))
    }
}

fn frame_kind(frame: &ProxyFrame) -> &'static str {
    match frame {
        ProxyFrame::Hello(_) => "hello",
        ProxyFrame::Ack { .. } => "ack",
        ProxyFrame::Nack { .. } => "nack",
        ProxyFrame::Health { .. } => "health",
        ProxyFrame::Register(_) => "register",
        ProxyFrame::Goodbye => "goodbye",
        ProxyFrame::Spans { .. } => "spans",
        ProxyFrame::Traffic(_) => "traffic",
    }
}

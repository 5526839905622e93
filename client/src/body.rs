//! A streaming HTTP body fed from a channel: the request side of the topology stream here, and
//! the response side of it in the control plane's server.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame};
use tokio::sync::mpsc;

/// An HTTP body whose data frames are the chunks sent on the paired [`mpsc::Sender`]; it ends
/// (cleanly) when every sender is dropped.
///
/// Chunks are passed on as they arrive, never coalesced or buffered beyond the channel, so
/// each NDJSON frame is flushed to the peer at once. A full channel makes the sender wait:
/// that is the backpressure of a slow peer reaching the producer.
#[derive(Debug)]
pub struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

/// A body and the sender that feeds it; `capacity` chunks may wait before `send` blocks
/// (at least one).
pub fn channel(capacity: usize) -> (mpsc::Sender<Bytes>, ChannelBody) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    (tx, ChannelBody { rx })
}

impl ChannelBody {
    /// A body reading from an existing receiver.
    pub fn new(rx: mpsc::Receiver<Bytes>) -> Self {
        Self { rx }
    }
}

impl From<mpsc::Receiver<Bytes>> for ChannelBody {
    fn from(rx: mpsc::Receiver<Bytes>) -> Self {
        Self::new(rx)
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|data| Ok(Frame::data(data))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn chunks_arrive_in_order_and_the_body_ends_when_the_senders_drop() {
        let (tx, mut body) = channel(0);
        let second = tx.clone();
        tokio::spawn(async move {
            tx.send(Bytes::from_static(b"one\n")).await.unwrap();
            second.send(Bytes::from_static(b"two\n")).await.unwrap();
        });
        let mut seen = Vec::new();
        let read = async {
            while let Some(frame) = body.frame().await {
                seen.push(frame.unwrap().into_data().unwrap());
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(5), read)
            .await
            .expect("the body ended within 5 s");
        assert_eq!(seen, vec![Bytes::from("one\n"), Bytes::from("two\n")]);
    }
}

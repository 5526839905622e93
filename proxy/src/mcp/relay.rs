//! [`MapEvents`]: a response body that relays a `text/event-stream` event by event, passing each
//! complete event through a function (to remap JSON-RPC ids) and sending it on at once.
//!
//! Nothing is buffered beyond the event being decoded, and dropping the body drops the upstream
//! one, so a client that goes away closes the upstream stream as before. When the upstream
//! stream breaks, an optional last event (a JSON-RPC error for the request) ends the client's
//! stream cleanly instead of cutting it.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame};
use serde_json::Value;

use super::sse::{Event, SseDecoder};

/// An event-mapping function.
pub type EventFn = Box<dyn FnMut(Event) -> Event + Send + Sync>;

/// Called once when the upstream stream breaks: the last event to send the client, or `None`
/// to break the client's stream too.
pub type CutFn = Box<dyn FnOnce(&crate::BoxError) -> Option<Event> + Send + Sync>;

/// Relays the SSE body `B`, applying a function to every event.
pub struct MapEvents<B> {
    inner: B,
    decoder: SseDecoder,
    map: EventFn,
    cut: Option<CutFn>,
    ended: bool,
}

impl<B> std::fmt::Debug for MapEvents<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MapEvents")
            .field("ended", &self.ended)
            .finish()
    }
}

impl<B> MapEvents<B> {
    /// Relays `inner` with `map` applied to each event.
    pub fn new(inner: B, map: EventFn) -> Self {
        Self {
            inner,
            decoder: SseDecoder::new(),
            map,
            cut: None,
            ended: false,
        }
    }

    /// When the upstream stream breaks, `cut` says what to send the client last.
    pub fn on_cut(mut self, cut: CutFn) -> Self {
        self.cut = Some(cut);
        self
    }

    /// The upstream stream broke with `e`: the last event if [`Self::on_cut`] gave one (the
    /// stream then ends), else the error.
    fn broken(
        &mut self,
        e: crate::BoxError,
    ) -> Poll<Option<Result<Frame<Bytes>, crate::BoxError>>> {
        self.ended = true;
        match self.cut.take().and_then(|cut| cut(&e)) {
            Some(last) => {
                let mut out = BytesMut::from(&self.drain()[..]);
                out.extend_from_slice(&last.encode());
                Poll::Ready(Some(Ok(Frame::data(out.freeze()))))
            }
            None => Poll::Ready(Some(Err(e))),
        }
    }

    fn drain(&mut self) -> Bytes {
        let mut out = BytesMut::new();
        while let Some(event) = self.decoder.next_event() {
            out.extend_from_slice(&(self.map)(event).encode());
        }
        out.freeze()
    }
}

impl<B> Body for MapEvents<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<crate::BoxError>,
{
    type Data = Bytes;
    type Error = crate::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        loop {
            if this.ended {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    this.ended = true;
                    if let Err(e) = this.decoder.finish() {
                        return this.broken(e.into());
                    }
                    let out = this.drain();
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                }
                Poll::Ready(Some(Err(e))) => return this.broken(e.into()),
                Poll::Ready(Some(Ok(frame))) => {
                    let Ok(data) = frame.into_data() else {
                        // Trailers: nothing to relay in an event stream.
                        continue;
                    };
                    if let Err(e) = this.decoder.push(&data) {
                        return this.broken(e.into());
                    }
                    let out = this.drain();
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                }
            }
        }
    }
}

/// For an event carrying one JSON-RPC message: the message, if it is a request (has both
/// `method` and `id`) — a server→client request such as `sampling/createMessage`.
pub fn server_request(event: &Event) -> Option<Value> {
    let v: Value = serde_json::from_str(&event.data).ok()?;
    (v.get("method").is_some() && v.get("id").is_some_and(|i| !i.is_null())).then_some(v)
}

/// For an event carrying one JSON-RPC message: the message, if it is a response (has `id` and
/// `result` or `error`).
pub fn response(event: &Event) -> Option<Value> {
    let v: Value = serde_json::from_str(&event.data).ok()?;
    (v.get("method").is_none()
        && v.get("id").is_some()
        && (v.get("result").is_some() || v.get("error").is_some()))
    .then_some(v)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::VecDeque;

    use http_body_util::BodyExt;

    use super::*;

    /// A body that yields the given chunks one poll at a time.
    struct Chunks(VecDeque<&'static str>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(|c| Ok(Frame::data(Bytes::from(c)))))
        }
    }

    #[tokio::test]
    async fn events_are_mapped_one_by_one_across_chunk_boundaries() {
        let chunks = Chunks(VecDeque::from([
            "id: 1\ndata: {\"a\":",
            "1}\n\n",
            ": comment\n\nid: 2\ndata: x\n\nid: 3\nda",
            "ta: y\n",
        ]));
        let map: EventFn = Box::new(|mut e: Event| {
            e.data = e.data.to_uppercase();
            e
        });
        let mut body = MapEvents::new(chunks, map);
        let mut frames = Vec::new();
        while let Some(frame) = body.frame().await {
            frames.push(String::from_utf8(frame.unwrap().into_data().unwrap().to_vec()).unwrap());
        }
        // One frame per chunk that completed an event; the last event (no blank line) at the end.
        assert_eq!(
            frames,
            [
                "id: 1\ndata: {\"A\":1}\n\n",
                "id: 2\ndata: X\n\n",
                "id: 3\ndata: Y\n\n"
            ]
        );
    }

    /// Yields its chunks, then breaks.
    struct Breaks(VecDeque<&'static str>);

    impl Body for Breaks {
        type Data = Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(Some(match self.0.pop_front() {
                Some(c) => Ok(Frame::data(Bytes::from(c))),
                None => Err(std::io::Error::other("connection reset")),
            }))
        }
    }

    async fn relayed(body: MapEvents<Breaks>) -> (String, Option<String>) {
        let mut body = body;
        let mut text = String::new();
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => text.push_str(std::str::from_utf8(&f.into_data().unwrap()).unwrap()),
                Err(e) => return (text, Some(e.to_string())),
            }
        }
        (text, None)
    }

    #[tokio::test]
    async fn a_broken_upstream_stream_ends_with_the_last_event_or_breaks_the_clients() {
        let same: fn() -> EventFn = || Box::new(|e: Event| e);
        let progress = "data: {\"method\":\"notifications/progress\"}\n\n";
        // Without a last event, the client's stream breaks as the upstream one did.
        let (text, err) = relayed(MapEvents::new(Breaks(VecDeque::from([progress])), same())).await;
        assert_eq!(text, progress);
        assert_eq!(err.as_deref(), Some("connection reset"));
        // With one, the client gets what had arrived, then the last event, then a clean end.
        let body = MapEvents::new(Breaks(VecDeque::from([progress, "data: {\"par"])), same())
            .on_cut(Box::new(|e| Some(Event::message(format!("cut: {e}")))));
        let (text, err) = relayed(body).await;
        assert_eq!(text, format!("{progress}data: cut: connection reset\n\n"));
        assert_eq!(err, None);
    }

    #[test]
    fn requests_and_responses_are_told_apart() {
        let req = Event::message(r#"{"jsonrpc":"2.0","id":0,"method":"sampling/createMessage"}"#);
        let note = Event::message(r#"{"jsonrpc":"2.0","method":"notifications/progress"}"#);
        let resp = Event::message(r#"{"jsonrpc":"2.0","id":3,"result":{}}"#);
        assert!(server_request(&req).is_some());
        assert!(server_request(&note).is_none());
        assert!(server_request(&resp).is_none());
        assert!(response(&resp).is_some());
        assert!(response(&req).is_none());
        assert!(server_request(&Event::message("not json")).is_none());
    }
}

//! Reading newline-delimited JSON frames from an HTTP body, whichever side of the stream reads.

use std::marker::PhantomData;

use bytes::{Bytes, BytesMut};
use capmesh_api::{FrameError, MAX_FRAME_BYTES, decode_frame};
use http_body::Body;
use http_body_util::BodyExt;
use serde::de::DeserializeOwned;

/// Splits a byte stream into lines, however the bytes were chunked: a line may span chunks
/// and a chunk may hold several lines. Lines longer than the limit are refused without being
/// buffered whole.
#[derive(Debug)]
pub struct LineDecoder {
    buf: BytesMut,
    /// How much of `buf` is known to hold no `\n`, so each byte is scanned once.
    scanned: usize,
    max: usize,
    /// After an oversized line, the rest of it is dropped up to its `\n`.
    skipping: bool,
}

impl Default for LineDecoder {
    fn default() -> Self {
        Self::new(MAX_FRAME_BYTES)
    }
}

impl LineDecoder {
    /// A decoder refusing lines over `max` bytes (not counting the `\n` or `\r\n`).
    pub fn new(max: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            scanned: 0,
            max,
            skipping: false,
        }
    }

    /// Appends bytes as they arrived.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// How many bytes wait for the end of their line.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete line without its `\n` or `\r\n`; `Ok(None)` when more bytes are
    /// needed. Empty lines are skipped. A line over the limit is an error, reported once; the
    /// decoder then drops the rest of that line and goes on with the next.
    pub fn next_line(&mut self) -> Result<Option<Bytes>, FrameError> {
        loop {
            let Some(at) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') else {
                self.scanned = self.buf.len();
                return self.check_partial();
            };
            let mut line = self.buf.split_to(self.scanned + at + 1).freeze();
            self.scanned = 0;
            if std::mem::take(&mut self.skipping) {
                continue;
            }
            line.truncate(content_len(&line[..line.len() - 1]));
            if line.len() > self.max {
                return Err(self.too_large(line.len()));
            }
            if !line.is_empty() {
                return Ok(Some(line));
            }
        }
    }

    /// At end of input: the last line when it had no `\n` (a peer may omit the final one).
    pub fn finish(&mut self) -> Result<Option<Bytes>, FrameError> {
        let mut rest = self.buf.split().freeze();
        self.scanned = 0;
        if std::mem::take(&mut self.skipping) {
            return Ok(None);
        }
        rest.truncate(content_len(&rest));
        if rest.len() > self.max {
            return Err(self.too_large(rest.len()));
        }
        Ok((!rest.is_empty()).then_some(rest))
    }

    /// Refuses a partial line that is already too long, so a peer cannot make us buffer an
    /// endless line. One byte of slack for a `\r` before the coming `\n`.
    fn check_partial(&mut self) -> Result<Option<Bytes>, FrameError> {
        if self.skipping {
            self.buf.clear();
            self.scanned = 0;
        } else if self.buf.len() > self.max + 1 {
            let size = self.buf.len();
            self.buf.clear();
            self.scanned = 0;
            self.skipping = true;
            return Err(self.too_large(size));
        }
        Ok(None)
    }

    fn too_large(&self, size: usize) -> FrameError {
        FrameError::TooLarge {
            size,
            limit: self.max,
        }
    }
}

/// The length of a line once a trailing `\r` is dropped.
fn content_len(line: &[u8]) -> usize {
    match line.last() {
        Some(b'\r') => line.len() - 1,
        _ => line.len(),
    }
}

/// Why a frame could not be read from a body.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// A line was not a valid frame, or was too large.
    #[error("{0}")]
    Frame(#[from] FrameError),
    /// The body itself failed (connection reset, stream reset by the peer).
    #[error("the connection failed while reading: {0}")]
    Body(Box<dyn std::error::Error + Send + Sync>),
}

/// Reads frames of type `T` (`ControlFrame` on a proxy, `ProxyFrame` on the control plane),
/// one per line, from an HTTP body.
#[derive(Debug)]
pub struct FrameReader<T, B = hyper::body::Incoming> {
    body: B,
    lines: LineDecoder,
    done: bool,
    _frame: PhantomData<fn() -> T>,
}

impl<T, B> FrameReader<T, B>
where
    T: DeserializeOwned,
    B: Body + Unpin,
    B::Data: AsRef<[u8]>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// A reader of `body`, refusing frames over [`MAX_FRAME_BYTES`].
    pub fn new(body: B) -> Self {
        Self::with_limit(body, MAX_FRAME_BYTES)
    }

    /// A reader of `body`, refusing frames over `max` bytes.
    pub fn with_limit(body: B, max: usize) -> Self {
        Self {
            body,
            lines: LineDecoder::new(max),
            done: false,
            _frame: PhantomData,
        }
    }

    /// The next frame; `None` once the body has ended (or failed, after reporting it).
    ///
    /// A bad line is reported and reading may go on with the next line. Cancel safe: bytes
    /// already read stay buffered, so this can sit in a `select!`.
    pub async fn next(&mut self) -> Option<Result<T, ReadError>> {
        loop {
            match self.lines.next_line() {
                Ok(Some(line)) => return Some(decode_frame(&line).map_err(ReadError::from)),
                Err(e) => return Some(Err(e.into())),
                Ok(None) if self.done => return None,
                Ok(None) => {}
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    // Trailers carry nothing for us.
                    if let Ok(data) = frame.into_data() {
                        self.lines.push(data.as_ref());
                    }
                }
                Some(Err(e)) => {
                    self.done = true;
                    self.lines = LineDecoder::new(0);
                    return Some(Err(ReadError::Body(e.into())));
                }
                None => {
                    self.done = true;
                    return match self.lines.finish() {
                        Ok(Some(line)) => Some(decode_frame(&line).map_err(ReadError::from)),
                        Ok(None) => None,
                        Err(e) => Some(Err(e.into())),
                    };
                }
            }
        }
    }

    /// The body being read.
    pub fn into_inner(self) -> B {
        self.body
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capmesh_api::{ProxyFrame, SnapshotVersion};

    fn lines(decoder: &mut LineDecoder) -> Vec<Result<String, FrameError>> {
        let mut out = Vec::new();
        loop {
            match decoder.next_line() {
                Ok(Some(line)) => out.push(Ok(String::from_utf8(line.to_vec()).unwrap())),
                Ok(None) => return out,
                Err(e) => out.push(Err(e)),
            }
        }
    }

    #[test]
    fn a_line_split_across_chunks_comes_out_whole_once_its_newline_arrives() {
        let mut d = LineDecoder::new(100);
        d.push(b"{\"type\":");
        assert!(lines(&mut d).is_empty());
        d.push(b"\"goodbye\"");
        assert!(lines(&mut d).is_empty());
        assert_eq!(d.buffered(), 17);
        d.push(b"}\r");
        assert!(lines(&mut d).is_empty());
        d.push(b"\n");
        assert_eq!(lines(&mut d), vec![Ok("{\"type\":\"goodbye\"}".to_owned())]);
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn several_lines_in_one_chunk_come_out_in_order_and_blank_lines_are_skipped() {
        let mut d = LineDecoder::new(100);
        d.push(b"a\nbb\r\n\n\r\nccc\ndd");
        assert_eq!(
            lines(&mut d),
            vec![
                Ok("a".to_owned()),
                Ok("bb".to_owned()),
                Ok("ccc".to_owned())
            ]
        );
        d.push(b"d\n");
        assert_eq!(lines(&mut d), vec![Ok("ddd".to_owned())]);
    }

    #[test]
    fn oversized_lines_are_refused_once_and_the_next_line_still_reads() {
        let mut d = LineDecoder::new(4);
        d.push(b"12345\nok\n");
        assert_eq!(
            lines(&mut d),
            vec![
                Err(FrameError::TooLarge { size: 5, limit: 4 }),
                Ok("ok".to_owned())
            ]
        );
        // Exactly the limit, with \r\n, fits.
        d.push(b"1234\r\n");
        assert_eq!(lines(&mut d), vec![Ok("1234".to_owned())]);

        // An endless line is refused before its end arrives, and nothing of it is kept.
        d.push(b"123");
        assert!(lines(&mut d).is_empty());
        d.push(b"456");
        assert_eq!(
            lines(&mut d),
            vec![Err(FrameError::TooLarge { size: 6, limit: 4 })]
        );
        assert_eq!(d.buffered(), 0);
        d.push(b"789789");
        assert!(lines(&mut d).is_empty());
        assert_eq!(d.buffered(), 0);
        d.push(b"9\nnext\n");
        assert_eq!(lines(&mut d), vec![Ok("next".to_owned())]);
    }

    #[test]
    fn a_trailing_line_without_newline_is_returned_at_the_end() {
        let mut d = LineDecoder::new(10);
        d.push(b"one\ntwo");
        assert_eq!(lines(&mut d), vec![Ok("one".to_owned())]);
        assert_eq!(d.finish().unwrap().as_deref(), Some(&b"two"[..]));
        assert_eq!(d.finish().unwrap(), None);

        d.push(b"three\r");
        assert_eq!(d.finish().unwrap().as_deref(), Some(&b"three"[..]));
        d.push(b"\r\n");
        assert!(lines(&mut d).is_empty());
        assert_eq!(d.finish().unwrap(), None);

        let mut d = LineDecoder::new(2);
        d.push(b"abc");
        assert_eq!(d.finish(), Err(FrameError::TooLarge { size: 3, limit: 2 }));
    }

    #[tokio::test]
    async fn a_reader_decodes_frames_across_chunks_and_ends_with_the_body() {
        let (tx, body) = crate::body::channel(8);
        let mut reader: FrameReader<ProxyFrame, _> = FrameReader::new(body);
        for chunk in [
            &b"{\"type\":\"ack\",\"vers"[..],
            b"ion\":1}\n{\"type\":\"goodbye\"}\n{\"type\":\"tele",
            b"port\"}\n{\"type\":\"ack\",\"version\":2}",
        ] {
            tx.send(Bytes::copy_from_slice(chunk)).await.unwrap();
        }
        drop(tx);
        let mut got = Vec::new();
        let read = async {
            while let Some(frame) = reader.next().await {
                got.push(frame);
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(5), read)
            .await
            .expect("the reader ended within 5 s");
        assert_eq!(got.len(), 4);
        assert_eq!(
            got[0].as_ref().unwrap(),
            &ProxyFrame::Ack {
                version: SnapshotVersion(1)
            }
        );
        assert_eq!(got[1].as_ref().unwrap(), &ProxyFrame::Goodbye);
        let bad = got[2].as_ref().unwrap_err().to_string();
        assert!(bad.contains("unknown variant `teleport`"), "{bad}");
        assert_eq!(
            got[3].as_ref().unwrap(),
            &ProxyFrame::Ack {
                version: SnapshotVersion(2)
            }
        );
    }
}

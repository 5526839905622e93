//! A connection's stream with its reads shown to a closure as they arrive: how the pool tells
//! whether a peer has said anything, and how a served connection notes its client's first byte
//! and whether it opened with HTTP/2's preface; and a stream with bytes already read put back in
//! front. Writes pass through untouched (vectored writes included, which hyper and `h2` use).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// `io`, whose every read that returns bytes shows them to `seen`.
pub(crate) struct Watched<T, F> {
    pub(crate) io: T,
    pub(crate) seen: F,
}

impl<T: AsyncRead + Unpin, F: FnMut(&[u8]) + Unpin> AsyncRead for Watched<T, F> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            (self.seen)(&buf.filled()[before..]);
        }
        polled
    }
}

/// Writes pass through `$field` untouched (vectored writes included, which hyper and `h2` use).
macro_rules! writes_through {
    ($wrapper:ident < $($param:ident),* > . $field:ident) => {
        impl<T: AsyncWrite + Unpin, $($param: Unpin),*> AsyncWrite for $wrapper<T, $($param),*> {
            fn poll_write(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<std::io::Result<usize>> {
                Pin::new(&mut self.$field).poll_write(cx, buf)
            }

            fn poll_write_vectored(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> Poll<std::io::Result<usize>> {
                Pin::new(&mut self.$field).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.$field.is_write_vectored()
            }

            fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
                Pin::new(&mut self.$field).poll_flush(cx)
            }

            fn poll_shutdown(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
            ) -> Poll<std::io::Result<()>> {
                Pin::new(&mut self.$field).poll_shutdown(cx)
            }
        }
    };
}

writes_through!(Watched<F>.io);

/// `io` with `prefix` read first: bytes a server read from the connection before it handed the
/// connection to another (the outbound listener's HTTP/1.1 server hands what it does not serve
/// itself to hyper, [`crate::serve::h1`]).
pub(crate) struct Rewind<T> {
    pub(crate) prefix: Bytes,
    pub(crate) io: T,
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.prefix.is_empty() {
            return Pin::new(&mut self.io).poll_read(cx, buf);
        }
        let n = self.prefix.len().min(buf.remaining());
        buf.put_slice(&self.prefix.split_to(n));
        Poll::Ready(Ok(()))
    }
}

writes_through!(Rewind<>.io);

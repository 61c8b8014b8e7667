//! Forwarding 1xx informational responses (103 Early Hints, 102 Processing) from origins to
//! HTTP/1.1 clients (RFC 9110 §15.2: a proxy forwards them). hyper's server cannot send a 1xx
//! itself, so the connection's IO is wrapped and the interim head is written between hyper's
//! own writes, only at a point where that can't split a message: hyper has flushed everything
//! it buffered, every earlier response body is finished, and the current request's final
//! response has not been handed to hyper yet. An interim that misses that window is dropped
//! (1xx responses are hints; a cache never stores them).

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};

use bytes::{Buf, Bytes};
use http::{HeaderMap, StatusCode};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

#[derive(Default)]
struct State {
    queue: VecDeque<Bytes>,
    /// An interim partly written: it must be completed before any other byte goes out.
    partial: Option<Bytes>,
    awaiting_response: bool,
    bodies_in_progress: usize,
    waker: Option<Waker>,
}

/// One connection's interim channel; a clone rides in each HTTP/1.1 request's extensions.
#[derive(Clone, Default)]
pub struct InterimSink(Arc<Mutex<State>>);

impl InterimSink {
    /// Queues an interim response for the client (called from the upstream connection's task).
    pub fn send(&self, status: StatusCode, headers: &HeaderMap) {
        // 100 Continue is the server's own business (hyper answers Expect itself); 101 would
        // switch protocols.
        if !status.is_informational() || status.as_u16() < 102 {
            return;
        }
        let mut head = format!(
            "HTTP/1.1 {} {}\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or("Informational")
        )
        .into_bytes();
        let mut headers = headers.clone();
        crate::headers::strip_hop_by_hop(&mut headers);
        for (name, value) in &headers {
            crate::headers::push_field(&mut head, name.as_str().as_bytes(), value.as_bytes());
        }
        head.extend_from_slice(b"\r\n");
        let mut state = self.0.lock();
        if state.awaiting_response && state.bodies_in_progress == 0 {
            state.queue.push_back(head.into());
            if let Some(waker) = state.waker.take() {
                waker.wake();
            }
        }
    }

    pub fn has_pending(&self) -> bool {
        !self.0.lock().queue.is_empty()
    }

    pub(crate) fn request_started(&self) {
        self.0.lock().awaiting_response = true;
    }

    /// The final response goes to hyper now: interims not yet written are too late.
    pub(crate) fn response_returned(&self) {
        let mut state = self.0.lock();
        state.awaiting_response = false;
        state.queue.clear();
        state.bodies_in_progress += 1;
    }

    pub(crate) fn body_finished(&self) {
        let mut state = self.0.lock();
        state.bodies_in_progress = state.bodies_in_progress.saturating_sub(1);
    }
}

/// The connection's IO with the interim writer in front of the write side.
pub struct InterimIo<T> {
    inner: T,
    sink: InterimSink,
}

impl<T> InterimIo<T> {
    pub fn new(inner: T, sink: InterimSink) -> Self {
        InterimIo { inner, sink }
    }
}

impl<T: AsyncWrite + Unpin> InterimIo<T> {
    /// Finishes an interim already started, so nothing can come between its bytes.
    fn poll_partial(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let Some(mut bytes) = self.sink.0.lock().partial.take() else {
                return Poll::Ready(Ok(()));
            };
            match Pin::new(&mut self.inner).poll_write(cx, &bytes) {
                Poll::Ready(Ok(n)) => {
                    bytes.advance(n);
                    if !bytes.is_empty() {
                        self.sink.0.lock().partial = Some(bytes);
                    }
                    if n == 0 {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    self.sink.0.lock().partial = Some(bytes);
                    return Poll::Pending;
                }
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for InterimIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for InterimIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_partial(cx))?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_partial(cx))?;
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    /// hyper flushes only once its own buffer is fully written: the one point where an
    /// interim can go out whole between messages.
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_partial(cx))?;
        loop {
            {
                let mut state = self.sink.0.lock();
                state.waker = Some(cx.waker().clone());
                if !(state.awaiting_response && state.bodies_in_progress == 0) {
                    break;
                }
                match state.queue.pop_front() {
                    Some(next) => state.partial = Some(next),
                    None => break,
                }
            }
            ready!(self.poll_partial(cx))?;
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

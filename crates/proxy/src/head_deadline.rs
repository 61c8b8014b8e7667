//! `limits.header_read_timeout` for HTTP/1 connections: the next request head must arrive
//! within the limit of the previous response's end (or of the connection's start). That cuts off
//! slowloris heads and closes idle keep-alive connections.
//!
//! hyper has the same timer built in, but arms a new one for every request: an allocation and a
//! timer-wheel insert and removal per request, 8% of a cache hit's CPU. Here each connection
//! has one timer, moved only when it fires early; a request costs a clock read and two atomic
//! stores. HTTP/2 connections (seen by their preface) are left alone: their streams have their
//! own limits.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Buf;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// `idle_since` while a request is being served.
const IN_FLIGHT: u64 = u64::MAX;

/// When the connection last had no request in flight; shared by its IO and its requests.
#[derive(Debug)]
pub struct HeadClock {
    limit: Duration,
    opened: Instant,
    /// Nanoseconds after `opened`, or `IN_FLIGHT`.
    idle_since: AtomicU64,
    http2: AtomicBool,
}

impl HeadClock {
    pub fn new(limit: Duration) -> Arc<HeadClock> {
        Arc::new(HeadClock {
            limit,
            opened: Instant::now(),
            idle_since: AtomicU64::new(0),
            http2: AtomicBool::new(false),
        })
    }

    /// A request head has been read: no deadline until its response is done.
    pub fn request_started(&self) {
        self.idle_since.store(IN_FLIGHT, Relaxed);
    }

    /// The response has been handed over whole (or abandoned): the next head is now due.
    pub fn request_finished(&self) {
        let since = self
            .opened
            .elapsed()
            .as_nanos()
            .min(u128::from(IN_FLIGHT - 1)) as u64;
        self.idle_since.store(since, Relaxed);
    }

    /// When the next head is due, if one is.
    fn deadline(&self) -> Option<Instant> {
        if self.http2.load(Relaxed) {
            return None;
        }
        match self.idle_since.load(Relaxed) {
            IN_FLIGHT => None,
            since => Some(self.opened + Duration::from_nanos(since) + self.limit),
        }
    }
}

/// The error a late head ends the connection with.
#[derive(Debug, thiserror::Error)]
#[error("no complete request head within {0:?} (limits.header_read_timeout)")]
pub struct HeadTimedOut(pub Duration);

/// The connection's IO, failing a read that waits past the head deadline.
pub struct HeadDeadline<S> {
    inner: S,
    clock: Arc<HeadClock>,
    /// Never later than the deadline; reset when it fires early.
    timer: Pin<Box<Sleep>>,
    /// The connection's first bytes, until there are enough to tell an HTTP/2 preface.
    first: [u8; 3],
    first_len: u8,
}

impl<S> HeadDeadline<S> {
    pub fn new(inner: S, clock: Arc<HeadClock>) -> Self {
        let timer = Box::pin(tokio::time::sleep_until(clock.opened + clock.limit));
        HeadDeadline {
            inner,
            clock,
            timer,
            first: [0; 3],
            first_len: 0,
        }
    }

    fn note_first_bytes(&mut self, read: &[u8]) {
        let start = self.first_len as usize;
        let take = read.len().min(self.first.len() - start);
        self.first[start..start + take].copy_from_slice(&read[..take]);
        self.first_len += take as u8;
        if self.first_len as usize == self.first.len() && &self.first == b"PRI" {
            self.clock.http2.store(true, Relaxed);
        }
    }

    /// Keeps the timer armed for the head deadline, if one runs: Ready once it has passed.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(deadline) = self.clock.deadline() else {
            return Poll::Pending;
        };
        loop {
            match self.timer.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) if Instant::now() >= deadline => return Poll::Ready(()),
                Poll::Ready(()) => self.timer.as_mut().reset(deadline),
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for HeadDeadline<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if (self.first_len as usize) < self.first.len() {
                    let read = &buf.filled()[before..];
                    self.note_first_bytes(read);
                }
                Poll::Ready(result)
            }
            Poll::Pending => match self.poll_deadline(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    HeadTimedOut(self.clock.limit),
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for HeadDeadline<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    /// hyper flushes once a response is written, typically after its last read attempt and
    /// without another until the client sends something: the deadline of the next head must
    /// be armed here, or an idle connection would never be woken to be closed.
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = Pin::new(&mut self.inner).poll_flush(cx);
        if flushed.is_ready() && self.poll_deadline(cx).is_ready() {
            // Already past: the read this wake-up leads to reports it.
            cx.waker().wake_by_ref();
        }
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A response body that tells the connection's clock when hyper is done with it: finished,
/// or dropped with the connection.
pub struct Tracked<B> {
    body: B,
    clock: Option<Arc<HeadClock>>,
}

impl<B> Tracked<B> {
    pub fn new(body: B, clock: Option<Arc<HeadClock>>) -> Self {
        Tracked { body, clock }
    }
}

impl<B> Drop for Tracked<B> {
    fn drop(&mut self) {
        if let Some(clock) = &self.clock {
            clock.request_finished();
        }
    }
}

impl<B: Body + Unpin> Body for Tracked<B>
where
    B::Data: Buf,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

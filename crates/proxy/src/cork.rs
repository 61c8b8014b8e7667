//! Write batching for the connections hyper serves (HTTP/2, and HTTP/1 with request bodies):
//! the bytes written while their task is polled leave in one system call when the poll ends.
//!
//! Why: h2 keeps at most one DATA payload aside (not copied into its buffer) and flushes before
//! taking the next, so every response with a body over 256 bytes cost its own `writev`, even
//! when ten were ready at once (`bench/profile.sh syscalls h2c`: 1.0 per request; reads were
//! already 0.1). A write held here instead returns at once; the task's poll ends by flushing
//! ([`Batch::end`]), so nothing waits past the poll that produced it.

use std::cell::Cell;
use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Writes up to this size are copied aside; bigger ones (a 16 KiB DATA frame) go out directly,
/// after what is held, so large bodies are not copied twice.
const COPY_MAX: usize = 4096;
/// Held bytes past this go out before more are taken: the batch stays bounded.
const HOLD_MAX: usize = 64 * 1024;
/// Capacity the held buffer keeps once drained: a batch of a few small responses reuses it,
/// while a connection that once held `HOLD_MAX` does not keep that much for the rest of its life.
const KEEP_CAPACITY: usize = 8 * 1024;

thread_local! {
    /// Whether this thread is inside a batch (a [`Batch`] is open).
    static OPEN: Cell<bool> = const { Cell::new(false) };
    /// Whether a [`Corked`] IO holds bytes back in the open batch.
    static HELD: Cell<bool> = const { Cell::new(false) };
}

/// One poll of a connection's task: writes made meanwhile by [`Corked`] IO on this thread are
/// held until [`Batch::end`] says whether a flushing poll is due.
pub(crate) struct Batch {
    /// The state the thread was in before (batches do not nest today; this keeps them sound
    /// if they ever do).
    outer: bool,
}

impl Batch {
    pub(crate) fn begin() -> Batch {
        let outer = OPEN.replace(true);
        if !outer {
            HELD.set(false);
        }
        Batch { outer }
    }

    /// Closes the batch. True when bytes are held: the caller polls the connection once more,
    /// outside any batch, and that poll's flush writes them.
    pub(crate) fn end(self) -> bool {
        OPEN.set(self.outer);
        !self.outer && HELD.replace(false)
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        // Unwinding out of a poll must not leave the thread batching.
        OPEN.set(self.outer);
    }
}

/// An IO whose small writes wait, during a [`Batch`], for the batch's end.
///
/// Held bytes leave on the next flush, write outside a batch, or shutdown; a connection that
/// ends without any of those (hyper's HTTP/2 server returns early on some errors, and on a
/// client's EOF) has them written, best effort, when it is dropped.
pub(crate) struct Corked<S: AsyncWrite + Unpin> {
    inner: S,
    /// Off: every write goes straight through. Only for protocols whose connections always
    /// end with a shutdown (which sends what is held), or are polled again after a batch.
    enabled: bool,
    held: Vec<u8>,
}

impl<S: AsyncWrite + Unpin> Corked<S> {
    pub(crate) fn new(inner: S, enabled: bool) -> Self {
        Corked {
            inner,
            enabled,
            held: Vec::new(),
        }
    }

    /// Takes `len` bytes aside if a batch is open and they fit.
    fn hold(&mut self, len: usize, copy: impl FnOnce(&mut Vec<u8>)) -> bool {
        if !self.enabled
            || !OPEN.get()
            || len == 0
            || len > COPY_MAX
            || self.held.len() + len > HOLD_MAX
        {
            return false;
        }
        copy(&mut self.held);
        HELD.set(true);
        true
    }

    /// Writes out whatever is held.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let mut written = 0;
        while written < self.held.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &self.held[written..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    self.held.drain(..written);
                    return Poll::Pending;
                }
            }
        }
        if written > 0 {
            self.held.clear();
            // After a small batch only: a connection busy with big ones keeps its buffer
            // rather than regrow it every batch.
            if written <= KEEP_CAPACITY && self.held.capacity() > KEEP_CAPACITY {
                self.held.shrink_to(KEEP_CAPACITY);
            }
            if OPEN.get() {
                // Sent within the batch (a big write went after it): its end owes no flush
                // for it. h2 ends its writes with a flush anyway, which is what sends anything
                // an inner IO (TLS) buffered.
                HELD.set(false);
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> Drop for Corked<S> {
    fn drop(&mut self) {
        // Not while unwinding: the write could panic in turn (a timer after its driver), and
        // a panic then aborts.
        if self.held.is_empty() || std::thread::panicking() {
            return;
        }
        // Nobody will poll this IO again: one try, without waiting, at what a flush would do.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        if let Poll::Ready(Ok(())) = self.poll_drain(&mut cx) {
            let _ = Pin::new(&mut self.inner).poll_flush(&mut cx);
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Corked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Corked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if buf.is_empty() {
            // Nothing to send: what is held stays held.
            return Poll::Ready(Ok(0));
        }
        if this.hold(buf.len(), |held| held.extend_from_slice(buf)) {
            return Poll::Ready(Ok(buf.len()));
        }
        std::task::ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let len = bufs.iter().map(|b| b.len()).sum();
        if len == 0 {
            return Poll::Ready(Ok(0));
        }
        if this.hold(len, |held| {
            bufs.iter().for_each(|b| held.extend_from_slice(b))
        }) {
            return Poll::Ready(Ok(len));
        }
        std::task::ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        // Held writes take every slice whatever this says; the rest go to the inner IO.
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if OPEN.get() && !this.held.is_empty() {
            // The batch's end flushes: a flush now would send this batch in pieces.
            HELD.set(true);
            return Poll::Ready(Ok(()));
        }
        std::task::ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        std::task::ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_batch_holds_small_writes_and_its_end_asks_for_the_flush() {
        let (client, mut server) = tokio::io::duplex(1 << 20);
        let mut corked = Corked::new(client, true);
        let batch = Batch::begin();
        corked.write_all(b"one ").await.unwrap();
        corked.write_all(b"two ").await.unwrap();
        corked.flush().await.unwrap();
        assert_eq!(
            corked.held, b"one two ",
            "held through the flush inside the batch"
        );
        assert!(batch.end(), "the batch's end asks for a flushing poll");
        corked.flush().await.unwrap();
        let mut got = [0u8; 8];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"one two ");
    }

    #[tokio::test]
    async fn big_writes_and_writes_outside_a_batch_go_out_in_order() {
        let (client, mut server) = tokio::io::duplex(1 << 20);
        let mut corked = Corked::new(client, true);
        let big = vec![b'x'; COPY_MAX + 1];
        let batch = Batch::begin();
        corked.write_all(b"head ").await.unwrap();
        corked.write_all(&big).await.unwrap();
        assert!(
            corked.held.is_empty(),
            "a big write sends what was held first"
        );
        assert!(
            !batch.end(),
            "what was held went out: no flushing poll is owed"
        );
        corked.write_all(b" tail").await.unwrap();
        assert!(corked.held.is_empty(), "no batch: written through");
        corked.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), 5 + big.len() + 5);
        assert!(got.starts_with(b"head x") && got.ends_with(b"x tail"));
    }

    #[tokio::test]
    async fn a_disabled_cork_writes_through_even_in_a_batch() {
        let (client, mut server) = tokio::io::duplex(1 << 20);
        let mut corked = Corked::new(client, false);
        let batch = Batch::begin();
        corked.write_all(b"now").await.unwrap();
        assert!(corked.held.is_empty());
        assert!(!batch.end());
        let mut got = [0u8; 3];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"now");
    }

    #[tokio::test]
    async fn held_bytes_go_out_in_order_through_a_pipe_that_takes_a_few_at_a_time() {
        // 16 bytes of pipe: the drain is partial and pending until the reader makes room.
        let (client, mut server) = tokio::io::duplex(16);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut corked = Corked::new(client, true);
        let mut expected = Vec::new();
        let batch = Batch::begin();
        for i in 0..50u8 {
            let write = [i; 37];
            corked.write_all(&write).await.unwrap();
            expected.extend_from_slice(&write);
        }
        assert_eq!(corked.held.len(), 50 * 37, "all held: no byte waited");
        assert!(batch.end());
        corked.write_all(b"after").await.unwrap();
        expected.extend_from_slice(b"after");
        corked.shutdown().await.unwrap();
        drop(corked);
        assert_eq!(reader.await.unwrap(), expected);
    }

    #[tokio::test]
    async fn a_dropped_cork_still_sends_what_it_held() {
        let (client, mut server) = tokio::io::duplex(1 << 20);
        let mut corked = Corked::new(client, true);
        let batch = Batch::begin();
        corked.write_all(b"last frame").await.unwrap();
        assert!(batch.end());
        drop(corked);
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"last frame");
    }

    #[tokio::test]
    async fn a_big_batch_buffer_is_kept_while_batches_are_big_and_given_back_after_a_small_one() {
        let (client, mut server) = tokio::io::duplex(1 << 20);
        let mut corked = Corked::new(client, true);
        for _ in 0..2 {
            let batch = Batch::begin();
            for _ in 0..HOLD_MAX / COPY_MAX {
                corked.write_all(&[b'x'; COPY_MAX]).await.unwrap();
            }
            assert!(batch.end());
            corked.flush().await.unwrap();
            assert!(corked.held.is_empty());
            assert!(
                corked.held.capacity() >= HOLD_MAX,
                "kept for the next big batch"
            );
        }
        let batch = Batch::begin();
        corked.write_all(b"small").await.unwrap();
        assert!(batch.end());
        corked.flush().await.unwrap();
        assert!(
            corked.held.capacity() <= KEEP_CAPACITY,
            "kept {} bytes of capacity after a small batch",
            corked.held.capacity()
        );
        let mut got = vec![0u8; 2 * HOLD_MAX + 5];
        server.read_exact(&mut got).await.unwrap();
        assert!(got[..2 * HOLD_MAX].iter().all(|&b| b == b'x'));
        assert_eq!(&got[2 * HOLD_MAX..], b"small");
    }

    #[tokio::test]
    async fn an_empty_write_is_not_held() {
        let (client, _server) = tokio::io::duplex(64);
        let mut corked = Corked::new(client, true);
        let batch = Batch::begin();
        corked.write_all(b"held").await.unwrap();
        assert_eq!(corked.write(b"").await.unwrap(), 0);
        assert_eq!(corked.held, b"held", "an empty write sends nothing held");
        assert!(batch.end());
        corked.flush().await.unwrap();
        let batch = Batch::begin();
        assert_eq!(corked.write(b"").await.unwrap(), 0);
        assert!(!batch.end(), "nothing held, no flushing poll");
    }

    #[tokio::test]
    async fn a_batch_without_held_bytes_needs_no_flushing_poll() {
        let batch = Batch::begin();
        assert!(!batch.end());
    }
}

//! Body types of the data path.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use tokio::sync::{Notify, mpsc};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    http_body_util::Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn empty() -> ProxyBody {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn boxed<B>(body: B) -> ProxyBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// A coalesced request's body: the fill's, read along as it arrives (`larder_cache::stream`).
pub struct ReadAlong {
    reader: larder_cache::FillReader,
    left: u64,
    /// The request's place among the fill's waiters, kept until its body is done: readers
    /// along count against `max_coalesced_waiters` as waiters do.
    _place: larder_cache::FillWaiter,
}

impl ReadAlong {
    pub fn new(reader: larder_cache::FillReader, place: larder_cache::FillWaiter) -> Self {
        let left = reader.content_length();
        ReadAlong {
            reader,
            left,
            _place: place,
        }
    }
}

impl Body for ReadAlong {
    type Data = Bytes;
    type Error = larder_cache::FillStreamAborted;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match std::task::ready!(self.reader.poll_chunk(cx)) {
            Some(Ok(chunk)) => {
                self.left = self.left.saturating_sub(chunk.len() as u64);
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(e))),
            None => Poll::Ready(None),
        }
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

/// The bytes `start..start + len` of a body that carries a whole representation: a range
/// request fetched whole for the cache gets its range cut from the origin's answer as it comes.
/// A body that ends before the range does is an error, never a short 206.
pub struct RangeOf {
    inner: ProxyBody,
    skip: u64,
    left: u64,
}

impl RangeOf {
    pub fn new(inner: ProxyBody, start: u64, len: u64) -> Self {
        RangeOf {
            inner,
            skip: start,
            left: len,
        }
    }
}

impl Body for RangeOf {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        loop {
            if self.left == 0 {
                return Poll::Ready(None);
            }
            let frame = match std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => return Poll::Ready(Some(Err("body ended before the range did".into()))),
            };
            // Trailers belong to the whole body, not to a part of it.
            let Ok(mut data) = frame.into_data() else {
                continue;
            };
            let len = data.len() as u64;
            if self.skip >= len {
                self.skip -= len;
                continue;
            }
            let from = self.skip as usize;
            self.skip = 0;
            data = data.slice(from..);
            if data.len() as u64 > self.left {
                data.truncate(self.left as usize);
            }
            self.left -= data.len() as u64;
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

/// What a fill sends its client. The explicit `End` tells a complete body from a fill task
/// that died: a channel closing without it is an error, never a silently short body.
pub enum FeedItem {
    Data(Bytes),
    Error(BoxError),
    End,
}

/// Bytes handed to a client but not yet taken by it, so the fill can pause for a slow client
/// once it no longer buffers for the cache.
#[derive(Default)]
pub struct FeedFlow {
    queued: AtomicU64,
    drained: Notify,
}

impl FeedFlow {
    pub fn queued(&self) -> u64 {
        self.queued.load(Ordering::Acquire)
    }

    pub fn add(&self, n: u64) {
        self.queued.fetch_add(n, Ordering::AcqRel);
    }

    /// Waits until at most `limit` bytes are queued, or the client is gone.
    pub async fn wait_below(&self, limit: u64, client_gone: impl Fn() -> bool) {
        loop {
            let drained = self.drained.notified();
            if self.queued() <= limit || client_gone() {
                return;
            }
            // Bounded: a client that stops reading for good is cut off by the idle timeout of
            // its connection; re-checking periodically also notices it closing.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), drained).await;
        }
    }
}

/// The client's side of a fill: frames arrive from the task reading the origin, which keeps
/// going for the cache even if this client goes away or reads slowly.
pub struct ChannelBody {
    rx: mpsc::UnboundedReceiver<FeedItem>,
    flow: Arc<FeedFlow>,
    size_hint: SizeHint,
    ended: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("the origin fetch ended before the body was complete")]
pub struct FillAborted;

impl ChannelBody {
    pub fn new(
        rx: mpsc::UnboundedReceiver<FeedItem>,
        flow: Arc<FeedFlow>,
        exact_len: Option<u64>,
    ) -> Self {
        let size_hint = exact_len.map(SizeHint::with_exact).unwrap_or_default();
        ChannelBody {
            rx,
            flow,
            size_hint,
            ended: false,
        }
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(FeedItem::Data(data))) => {
                self.flow
                    .queued
                    .fetch_sub(data.len() as u64, Ordering::AcqRel);
                self.flow.drained.notify_one();
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Poll::Ready(Some(FeedItem::Error(e))) => {
                self.ended = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Some(FeedItem::End)) => {
                self.ended = true;
                Poll::Ready(None)
            }
            Poll::Ready(None) => {
                self.ended = true;
                Poll::Ready(Some(Err(Box::new(FillAborted))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        self.size_hint
    }
}

/// Runs a callback once, when the body is finished with: fully sent, failed, or dropped by a
/// client that went away. Lets the access log record bytes and the full duration.
pub struct ObservedBody {
    inner: ProxyBody,
    sent: u64,
    complete: bool,
    on_done: Option<Box<dyn FnOnce(u64, bool) + Send>>,
}

impl ObservedBody {
    pub fn new(inner: ProxyBody, on_done: impl FnOnce(u64, bool) + Send + 'static) -> Self {
        ObservedBody {
            inner,
            sent: 0,
            complete: false,
            on_done: Some(Box::new(on_done)),
        }
    }
}

impl Body for ObservedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.sent += data.len() as u64;
                }
            }
            Poll::Ready(None) => this.complete = true,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ObservedBody {
    fn drop(&mut self) {
        let complete = self.complete || self.inner.is_end_stream();
        if let Some(f) = self.on_done.take() {
            f(self.sent, complete);
        }
    }
}

/// Caps a streamed request body: past the limit the stream fails, so the upstream request is
/// aborted rather than forwarding more than allowed.
pub struct LimitedBody {
    inner: ProxyBody,
    remaining: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("request body exceeds the configured max_request_body_size")]
pub struct BodyTooLarge;

/// The client's request body failed (malformed chunking, a client gone mid-body): the
/// client's fault, never the upstream's.
#[derive(Debug, thiserror::Error)]
#[error("request body from the client failed: {0}")]
pub struct ClientBodyError(#[source] pub BoxError);

impl LimitedBody {
    pub fn new(inner: ProxyBody, limit: u64) -> Self {
        LimitedBody {
            inner,
            remaining: limit,
        }
    }
}

impl Body for LimitedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > this.remaining {
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge))));
                    }
                    this.remaining -= len;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(ClientBodyError(e))))),
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// Fails the body when no frame arrives for `idle`, or when it is still arriving at the
    /// exchange's deadline: an origin that stalls or trickles does not hold the client (and the
    /// connection) forever.
    pub struct IdleTimeoutBody<B> {
        #[pin]
        inner: B,
        idle: std::time::Duration,
        deadline: Option<tokio::time::Instant>,
        // Idle time counts only while a frame is awaited: not while the reader (a slow client,
        // an origin not yet taking the upload) has not asked for one.
        waiting: bool,
        #[pin]
        timer: tokio::time::Sleep,
    }
}

/// A response body from an upstream, as the pipeline receives it.
pub type UpstreamBody = IdleTimeoutBody<crate::upstream::ResponseBody>;

/// The error a stalled body ends with.
#[derive(Debug, thiserror::Error)]
#[error("upstream body idle for {0:?}")]
pub struct BodyIdleTimeout(pub std::time::Duration);

/// The error a body still arriving at the route's `total_timeout` ends with.
#[derive(Debug, thiserror::Error)]
#[error("upstream response not complete within the route's total_timeout")]
pub struct BodyDeadline;

impl<B> IdleTimeoutBody<B> {
    pub fn new(
        inner: B,
        idle: std::time::Duration,
        deadline: Option<tokio::time::Instant>,
    ) -> Self {
        IdleTimeoutBody {
            inner,
            idle,
            deadline,
            waiting: false,
            timer: tokio::time::sleep_until(next_wake(idle, deadline)),
        }
    }
}

/// One timer serves both limits: whichever comes first.
fn next_wake(
    idle: std::time::Duration,
    deadline: Option<tokio::time::Instant>,
) -> tokio::time::Instant {
    let idle_end = tokio::time::Instant::now() + idle;
    deadline.map_or(idle_end, |d| d.min(idle_end))
}

impl<B> Body for IdleTimeoutBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(frame) => {
                *this.waiting = false;
                // A body that keeps coming past the deadline is cut all the same.
                if frame.is_some()
                    && this
                        .deadline
                        .is_some_and(|d| tokio::time::Instant::now() >= d)
                {
                    return Poll::Ready(Some(Err(BodyDeadline.into())));
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                if !*this.waiting {
                    *this.waiting = true;
                    this.timer
                        .as_mut()
                        .reset(next_wake(*this.idle, *this.deadline));
                }
                match this.timer.poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(match this.deadline {
                        Some(d) if tokio::time::Instant::now() >= *d => BodyDeadline.into(),
                        _ => BodyIdleTimeout(*this.idle).into(),
                    }))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::time::Duration;

    /// A body fed by hand, one frame per message.
    fn fed() -> (
        tokio::sync::mpsc::UnboundedSender<Bytes>,
        impl Body<Data = Bytes, Error = BoxError>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
        let frames = futures_util::stream::unfold(rx, |mut rx| async move {
            let data = rx.recv().await?;
            Some((Ok::<_, BoxError>(Frame::data(data)), rx))
        });
        (tx, http_body_util::StreamBody::new(frames))
    }

    /// The whole 0..30 in chunks of 7, 1, 0 and 22 bytes.
    fn chunked_whole() -> ProxyBody {
        let whole: Vec<u8> = (0..30).collect();
        let (tx, body) = fed();
        for (from, to) in [(0, 7), (7, 8), (8, 8), (8, 30)] {
            tx.send(Bytes::copy_from_slice(&whole[from..to])).unwrap();
        }
        boxed(body)
    }

    #[tokio::test]
    async fn a_range_is_cut_across_chunk_boundaries() {
        for (start, len) in [(0, 30), (0, 1), (5, 4), (7, 1), (8, 1), (6, 20), (29, 1)] {
            let mut body = RangeOf::new(chunked_whole(), start, len);
            assert_eq!(body.size_hint().exact(), Some(len));
            let mut got = Vec::new();
            while let Some(frame) = body.frame().await {
                got.extend_from_slice(&frame.unwrap().into_data().unwrap());
            }
            let want: Vec<u8> = (start as u8..(start + len) as u8).collect();
            assert_eq!(got, want, "range {start} + {len}");
            assert!(body.is_end_stream());
        }
    }

    #[tokio::test]
    async fn a_body_that_ends_before_its_range_is_an_error() {
        let whole = boxed(http_body_util::Full::new(Bytes::from_static(b"0123")));
        let mut body = RangeOf::new(whole, 2, 5);
        assert_eq!(
            &body.frame().await.unwrap().unwrap().into_data().unwrap()[..],
            b"23"
        );
        assert!(body.frame().await.unwrap().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn idle_time_counts_only_while_a_frame_is_awaited() {
        let (tx, inner) = fed();
        let mut body = Box::pin(IdleTimeoutBody::new(inner, Duration::from_secs(1), None));
        tx.send(Bytes::from_static(b"a")).unwrap();
        assert!(body.frame().await.unwrap().is_ok());
        // The reader is away for 5 s (a slow client): not the origin's idleness.
        tokio::time::advance(Duration::from_secs(5)).await;
        let sender = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            sender.send(Bytes::from_static(b"b")).unwrap();
        });
        assert!(body.frame().await.unwrap().is_ok(), "no false idle timeout");
        // Now truly idle for longer than the limit.
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.is::<BodyIdleTimeout>(), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_cuts_a_body_that_never_pauses() {
        let (tx, inner) = fed();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        let mut body = Box::pin(IdleTimeoutBody::new(
            inner,
            Duration::from_secs(60),
            Some(deadline),
        ));
        tx.send(Bytes::from_static(b"a")).unwrap();
        assert!(body.frame().await.unwrap().is_ok());
        tokio::time::advance(Duration::from_secs(3)).await;
        tx.send(Bytes::from_static(b"late")).unwrap();
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.is::<BodyDeadline>(), "{err}");
    }
}

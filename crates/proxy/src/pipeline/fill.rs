//! The fill: reads one origin body for the cache and the first client, on the client's task
//! for what has already arrived, then on a task of its own.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::SystemTime;

use crate::body::UpstreamBody;
use bytes::{Bytes, BytesMut};
use http_body::Body;
use http_body_util::BodyExt;
use larder_cache::{Admission, FillGuard, FillStream, Key};
use tokio::sync::mpsc;

use crate::body::{BoxError, FeedFlow, FeedItem};

/// Past this many bytes queued for a client, a fill that no longer buffers for the cache waits
/// for the client (memory stays bounded for objects streamed through).
const CLIENT_HIGH_WATER: u64 = 1 << 20;

/// Reads one origin body, feeding the client and the cache. While the body is being buffered
/// for the cache (at most `max_object_size`), the client's pace never slows the read, so a slow
/// or vanished client cannot hold the key's fill and stall everyone coalesced on it. Only a body
/// that ends cleanly is stored.
pub(crate) struct Fill {
    tx: mpsc::UnboundedSender<FeedItem>,
    flow: Arc<FeedFlow>,
    cache: Arc<larder_cache::Cache>,
    fill_key: Key,
    guard: Option<FillGuard>,
    /// The body's length as the origin declared it (a stream is offered only for those).
    exact_len: Option<u64>,
    /// The body as offered to the requests coalesced on this fill ([`FillGuard::offer`]), once
    /// it is read by a task of its own ([`Fill::start`] decides).
    stream: Option<Arc<FillStream>>,
}

/// However the fill ends, readers along never wait for more (a complete body was marked so).
impl Drop for Fill {
    fn drop(&mut self) {
        // Waiters released first, so none joins the stream between its end and theirs.
        self.guard = None;
        if let Some(stream) = &self.stream {
            stream.finish(false);
        }
    }
}

/// Past this much of a body (give or take the last frame), or this many frames, the rest is read
/// by a task: a large body's client gets its head without waiting for it, and an origin sending
/// empty frames cannot hold the client's task.
const TAKEN_AT_ONCE: u64 = 256 * 1024;
const FRAMES_AT_ONCE: u32 = 64;

/// What a fill has read so far.
struct Progress {
    /// The body so far, while it is buffered for the cache.
    chunks: Vec<Bytes>,
    buffered: u64,
    /// False once the body proved too large to store.
    storing: bool,
}

impl Fill {
    /// A fill feeding its client through `tx` (paced by `flow`), storing under `guard`'s key.
    pub fn new(
        tx: mpsc::UnboundedSender<FeedItem>,
        flow: Arc<FeedFlow>,
        cache: Arc<larder_cache::Cache>,
        fill_key: Key,
        guard: Option<FillGuard>,
        exact_len: Option<u64>,
    ) -> Fill {
        Fill {
            tx,
            flow,
            cache,
            fill_key,
            guard,
            exact_len,
            stream: None,
        }
    }

    /// Starts reading `body` (it ends with an error when the origin stalls: see
    /// [`UpstreamBody`]). What the origin has sent already, often the whole of a small body
    /// read with its head, is taken now, on the caller's task; a task of its own reads the
    /// rest. A miss whose body came with its head then costs no task, and no wake-ups between
    /// tasks.
    pub fn start(mut self, body: UpstreamBody, admission: Admission) {
        let mut body = Box::pin(body);
        let mut progress = Progress {
            chunks: Vec::new(),
            buffered: 0,
            storing: true,
        };
        // Whatever a poll here registers to be woken is registered again by the task's polls.
        let mut cx = Context::from_waker(Waker::noop());
        let (mut taken, mut frames) = (0u64, 0u32);
        loop {
            frames += 1;
            if frames > FRAMES_AT_ONCE {
                break;
            }
            match body.as_mut().poll_frame(&mut cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    taken += data.len() as u64;
                    if !self.take(&mut progress, &admission, data) {
                        return;
                    }
                    if !progress.storing || taken >= TAKEN_AT_ONCE {
                        // From here the fill may wait for its client, or read for long: a
                        // task's work.
                        break;
                    }
                }
                Poll::Ready(None) => return self.finish(progress, admission),
                Poll::Ready(Some(Err(e))) => return self.fail(e),
                Poll::Pending => break,
            }
        }
        self.offer_stream(&progress, &admission);
        tokio::spawn(self.run(body, admission, progress));
    }

    /// Lets the requests coalesced on this fill read its body along, from what was read so
    /// far, when it will be stored whole. Only a fill that goes on reading needs this: one that
    /// ended on the caller's task was committed before its waiters were released, and they
    /// find it stored (offering costs a stream, a copy of the head and a wake-up of the
    /// waiters). Should the commit store nothing (a purge in between), they ask the origin.
    fn offer_stream(&mut self, progress: &Progress, admission: &Admission) {
        if !progress.storing {
            return;
        }
        let (Some(guard), Some(len)) = (&self.guard, self.exact_len) else {
            return;
        };
        let Some(stream) = admission.stream(len) else {
            return;
        };
        for chunk in &progress.chunks {
            stream.push(chunk.clone());
        }
        guard.offer(stream.clone());
        self.stream = Some(stream);
    }

    async fn run(
        mut self,
        mut body: Pin<Box<UpstreamBody>>,
        admission: Admission,
        mut progress: Progress,
    ) {
        loop {
            let frame = match body.frame().await {
                Some(Ok(frame)) => frame,
                None => break,
                Some(Err(e)) => return self.fail(e),
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if !self.take(&mut progress, &admission, data) {
                return;
            }
            if !progress.storing {
                let tx = &self.tx;
                self.flow
                    .wait_below(CLIENT_HIGH_WATER, || tx.is_closed())
                    .await;
            }
        }
        self.finish(progress, admission);
    }

    /// Buffers one piece of the body for the cache and hands it to the client. False when
    /// nobody needs the rest: the client is gone and the body is not being stored.
    fn take(&mut self, progress: &mut Progress, admission: &Admission, data: Bytes) -> bool {
        let len = data.len() as u64;
        if progress.storing {
            if progress.buffered + len > admission.max_object_size() {
                // Too large to store: stop buffering and release everyone waiting on it.
                progress.storing = false;
                progress.chunks = Vec::new();
                self.cache
                    .mark_hit_for_pass(&self.fill_key, SystemTime::now());
                self.guard = None;
                if let Some(stream) = self.stream.take() {
                    stream.finish(false);
                }
            } else {
                progress.buffered += len;
                progress.chunks.push(data.clone());
                if let Some(stream) = &self.stream {
                    stream.push(data.clone());
                }
            }
        }
        if !self.tx.is_closed() {
            self.flow.add(len);
            let _ = self.tx.send(FeedItem::Data(data));
            true
        } else {
            progress.storing
        }
    }

    /// The body has ended cleanly: stores it, if it is still being stored.
    fn finish(self, progress: Progress, admission: Admission) {
        if let Some(stream) = &self.stream {
            stream.finish(true);
        }
        if progress.storing {
            // One exact-size copy: the stored body owns no slack capacity and no shared buffers.
            let mut body = BytesMut::with_capacity(progress.buffered as usize);
            for chunk in &progress.chunks {
                body.extend_from_slice(chunk);
            }
            drop(progress);
            let body = body.freeze();
            if let Some(stream) = &self.stream {
                stream.stored(body.clone());
            }
            self.cache.commit(admission, body);
        }
        let _ = self.tx.send(FeedItem::End);
        // The guard drops last, after the commit, so waiters find the stored response.
    }

    fn fail(self, error: BoxError) {
        let _ = self.tx.send(FeedItem::Error(error));
    }
}

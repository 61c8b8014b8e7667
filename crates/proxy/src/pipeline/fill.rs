//! The fill: reads one origin body for the cache and the first client, on the client's task
//! for what has already arrived, then on a task of its own.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use http_body::Body;
use http_body_util::BodyExt;
use larder_cache::{Admission, FillGuard, FillStream, Key};
use tokio::sync::mpsc;

use crate::body::{BoxError, ChannelBody, FeedFlow, FeedItem};

/// Past this many bytes queued for a client, a fill that no longer buffers for the cache waits
/// for the client (memory stays bounded for objects streamed through).
const CLIENT_HIGH_WATER: u64 = 1 << 20;

/// Reads one origin body, feeding the client and the cache. While the body is being buffered
/// for the cache (at most `max_object_size`), the client's pace never slows the read, so a slow
/// or vanished client cannot hold the key's fill and stall everyone coalesced on it. Only a body
/// that ends cleanly is stored.
pub(crate) struct Fill {
    /// The client's channel, made when the fill goes on to a task of its own. Until then what
    /// the client will read is held here (`held`, or `Progress::chunks` while storing).
    feed: Option<(mpsc::UnboundedSender<FeedItem>, Arc<FeedFlow>)>,
    held: Vec<Bytes>,
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

/// What a fill's client reads.
pub(crate) enum Feed {
    /// The whole body, read on the caller's task (and stored, if it could be).
    Whole(Bytes),
    /// The body as the fill's task reads it.
    Streamed(ChannelBody),
}

/// What a fill has read so far.
struct Progress {
    /// The body so far, while it is buffered for the cache.
    chunks: Vec<Bytes>,
    buffered: u64,
    /// False once the body proved too large to store.
    storing: bool,
}

impl Fill {
    /// A fill storing under `guard`'s key, its client fed what [`Fill::start`] returns.
    pub fn new(
        cache: Arc<larder_cache::Cache>,
        fill_key: Key,
        guard: Option<FillGuard>,
        exact_len: Option<u64>,
    ) -> Fill {
        Fill {
            feed: None,
            held: Vec::new(),
            cache,
            fill_key,
            guard,
            exact_len,
            stream: None,
        }
    }

    /// Starts reading `body` (an origin's ends with an error when the origin stalls: see
    /// [`crate::body::UpstreamBody`]). What the origin has sent already, often the whole of a small body
    /// read with its head, is taken now, on the caller's task; a task of its own reads the
    /// rest. A miss whose body came with its head then costs no task, no channel to its
    /// client and no wake-ups between tasks: the client is given the body whole.
    pub fn start<B>(mut self, body: B, admission: Admission) -> Feed
    where
        B: Body<Data = Bytes, Error = BoxError> + Send + 'static,
    {
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
                    // Always true here: the client is not gone before it has its response.
                    self.take(&mut progress, &admission, data);
                    if !progress.storing || taken >= TAKEN_AT_ONCE {
                        // From here the fill may wait for its client, or read for long: a
                        // task's work.
                        break;
                    }
                }
                Poll::Ready(None) => {
                    let whole = self.finish(progress, admission);
                    return Feed::Whole(whole);
                }
                Poll::Ready(Some(Err(e))) => {
                    let client = self.feed_client(&progress);
                    self.fail(e);
                    return Feed::Streamed(client);
                }
                Poll::Pending => break,
            }
        }
        let client = self.feed_client(&progress);
        self.offer_stream(&progress, &admission);
        tokio::spawn(self.run(body, admission, progress));
        Feed::Streamed(client)
    }

    /// Makes the client's channel, with what was read for it so far.
    fn feed_client(&mut self, progress: &Progress) -> ChannelBody {
        let (tx, rx) = mpsc::unbounded_channel();
        let flow = Arc::new(FeedFlow::default());
        let held = std::mem::take(&mut self.held);
        let read = if progress.storing {
            progress.chunks.clone()
        } else {
            held
        };
        for data in read {
            flow.add(data.len() as u64);
            let _ = tx.send(FeedItem::Data(data));
        }
        self.feed = Some((tx, flow.clone()));
        ChannelBody::new(rx, flow, self.exact_len)
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

    async fn run<B>(mut self, mut body: Pin<Box<B>>, admission: Admission, mut progress: Progress)
    where
        B: Body<Data = Bytes, Error = BoxError> + Send + 'static,
    {
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
            if !progress.storing
                && let Some((tx, flow)) = &self.feed
            {
                flow.wait_below(CLIENT_HIGH_WATER, || tx.is_closed()).await;
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
                let read = std::mem::take(&mut progress.chunks);
                if self.feed.is_none() {
                    // They were the client's too.
                    self.held = read;
                }
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
                if self.feed.is_none() {
                    // The client reads the chunks buffered for the cache.
                    return true;
                }
            }
        }
        match &self.feed {
            None => {
                self.held.push(data);
                true
            }
            Some((tx, flow)) if !tx.is_closed() => {
                flow.add(len);
                let _ = tx.send(FeedItem::Data(data));
                true
            }
            Some(_) => progress.storing,
        }
    }

    /// The body has ended cleanly: stores it, if it is still being stored. Returns the whole
    /// body for a client without a channel (empty otherwise).
    fn finish(mut self, progress: Progress, admission: Admission) -> Bytes {
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
            self.cache.commit(admission, body.clone());
            if self.feed.is_none() {
                return body;
            }
        }
        match &self.feed {
            Some((tx, _)) => {
                let _ = tx.send(FeedItem::End);
                Bytes::new()
            }
            // Not reached: a body that proves too large goes on to a task (`start`).
            None => std::mem::take(&mut self.held).concat().into(),
        }
        // The guard drops last, after the commit, so waiters find the stored response.
    }

    fn fail(self, error: BoxError) {
        if let Some((tx, _)) = &self.feed {
            let _ = tx.send(FeedItem::Error(error));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, HeaderValue, Method, StatusCode};
    use http_body_util::StreamBody;
    use larder_cache::{
        Cache, CacheSettings, FreshnessRules, KeyRules, Lookup, MatchAll, RequestTarget,
        ResourceTypeSpec, SetCookiePolicy,
    };

    fn cache(max_object_size: u64) -> Arc<Cache> {
        let spec = ResourceTypeSpec {
            name: "default".into(),
            matcher: Arc::new(MatchAll),
            capacity_bytes: 1 << 20,
            max_object_size,
            freshness: FreshnessRules::default(),
            key: KeyRules::default(),
            set_cookie: SetCookiePolicy::default(),
        };
        Arc::new(Cache::new(vec![spec], CacheSettings::default()))
    }

    fn target(headers: &HeaderMap) -> RequestTarget<'_> {
        RequestTarget {
            scheme: "http",
            host: "a.example",
            path: "/parts",
            query: None,
            headers,
        }
    }

    /// A fill of these frames, all there at once (as a body read with its head is).
    fn fill_of(cache: &Arc<Cache>, frames: &[&'static [u8]]) -> Feed {
        fill_ending(cache, frames, None)
    }

    /// [`fill_of`], the body ending in `error` when one is given.
    fn fill_ending(
        cache: &Arc<Cache>,
        frames: &[&'static [u8]],
        error: Option<&'static str>,
    ) -> Feed {
        let request = HeaderMap::new();
        let mut response = HeaderMap::new();
        response.insert("cache-control", HeaderValue::from_static("max-age=60"));
        let now = SystemTime::now();
        let admission = cache
            .admit(
                &Method::GET,
                &target(&request),
                StatusCode::OK,
                &response,
                now,
                now,
                cache.purge_generation(),
            )
            .expect("cacheable");
        let Lookup::Miss { fill_key, .. } = cache.lookup(&target(&request)) else {
            panic!("nothing stored yet");
        };
        let frames: Vec<Result<http_body::Frame<Bytes>, BoxError>> = frames
            .iter()
            .map(|f| Ok(http_body::Frame::data(Bytes::from_static(f))))
            .chain(error.map(|e| Err(e.into())))
            .collect();
        let body = StreamBody::new(futures_util::stream::iter(frames));
        Fill::new(cache.clone(), fill_key, None, None).start(body, admission)
    }

    fn stored(cache: &Cache) -> Option<Bytes> {
        let request = HeaderMap::new();
        match cache.lookup(&target(&request)) {
            Lookup::Found(hit) => Some(hit.stored().body.clone()),
            _ => None,
        }
    }

    #[test]
    fn a_body_there_at_once_is_given_whole_and_stored() {
        let cache = cache(1024);
        let Feed::Whole(body) = fill_of(&cache, &[b"first ", b"second ", b"third"]) else {
            panic!("read on the caller's task")
        };
        assert_eq!(body, "first second third");
        assert_eq!(stored(&cache).as_deref(), Some(&b"first second third"[..]));
    }

    #[tokio::test]
    async fn a_body_found_too_large_streams_on_from_a_task_with_what_was_read_first() {
        // The first frame is buffered for the cache, the second makes the body too large: the
        // client pays for the rest at its own pace, from a task, and must get every frame in
        // order, those read on the caller's task included.
        let cache = cache(8);
        let Feed::Streamed(body) = fill_of(&cache, &[b"first ", b"second ", b"third"]) else {
            panic!("no longer stored: goes on from a task")
        };
        let body = body.collect().await.expect("whole").to_bytes();
        assert_eq!(body, "first second third");
        assert_eq!(stored(&cache), None);
    }

    #[tokio::test]
    async fn a_body_failing_on_the_callers_task_reaches_the_client_as_an_error_and_is_not_stored() {
        let cache = cache(1024);
        let Feed::Streamed(mut body) = fill_ending(&cache, &[b"first "], Some("origin reset"))
        else {
            panic!("an error is carried to the client")
        };
        let first = body.frame().await.expect("a frame").expect("data");
        assert_eq!(first.into_data().ok().as_deref(), Some(&b"first "[..]));
        let error = body
            .frame()
            .await
            .expect("the end")
            .expect_err("an error, not an end");
        assert_eq!(error.to_string(), "origin reset");
        assert_eq!(stored(&cache), None);
    }
}

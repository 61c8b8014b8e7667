//! A fill's body as it arrives from the origin, for the requests coalesced behind it to read
//! along rather than wait for the whole object: a 100 MiB object from a slow origin would
//! otherwise hold them past `coalesce_timeout`, and send each one to the origin after all.
//!
//! The chunks are the ones the fill buffers for the cache anyway (shared `Bytes`, no copy), so
//! a slow reader costs no memory beyond the object being stored: it only reads further behind.

use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use parking_lot::Mutex;

use crate::key::Key;
use crate::store::StoredResponse;

/// The response a fill is storing, its body growing.
pub struct FillStream {
    /// What will be stored, with an empty body: the head readers are answered with.
    head: StoredResponse,
    /// The body's length, declared by the origin (a stream is only offered when it is known).
    content_length: u64,
    /// The key and purge generation of the fill: a purge since then bars new readers.
    pub(crate) primary: Key,
    pub(crate) generation: u64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    chunks: Vec<Bytes>,
    /// `Some(true)` once the whole body is in, `Some(false)` when the fill failed.
    end: Option<bool>,
    wakers: Vec<Waker>,
}

/// The fill ended before its body was complete (the origin failed or the object turned out
/// too large to store): a reader must not take what it got for the whole body.
#[derive(Debug, thiserror::Error)]
#[error("the coalesced fill ended before the body was complete")]
pub struct FillStreamAborted;

impl FillStream {
    pub(crate) fn new(
        head: StoredResponse,
        content_length: u64,
        primary: Key,
        generation: u64,
    ) -> Arc<FillStream> {
        Arc::new(FillStream {
            head,
            content_length,
            primary,
            generation,
            state: Mutex::default(),
        })
    }

    pub fn head(&self) -> &StoredResponse {
        &self.head
    }

    pub fn content_length(&self) -> u64 {
        self.content_length
    }

    /// Appends the next chunk of the body and wakes the readers waiting for it.
    pub fn push(&self, chunk: Bytes) {
        let wakers = {
            let mut state = self.state.lock();
            if state.end.is_some() {
                return;
            }
            state.chunks.push(chunk);
            std::mem::take(&mut state.wakers)
        };
        wakers.into_iter().for_each(Waker::wake);
    }

    /// Ends the body: whole (`complete`) or cut short. Later calls change nothing.
    pub fn finish(&self, complete: bool) {
        let wakers = {
            let mut state = self.state.lock();
            if state.end.is_some() {
                return;
            }
            state.end = Some(complete);
            std::mem::take(&mut state.wakers)
        };
        wakers.into_iter().for_each(Waker::wake);
    }

    /// A reader from the body's first byte.
    pub fn reader(self: &Arc<Self>) -> FillReader {
        FillReader {
            stream: self.clone(),
            next: 0,
        }
    }
}

/// Reads a [`FillStream`]'s body from the start, waiting for chunks still to come.
pub struct FillReader {
    stream: Arc<FillStream>,
    next: usize,
}

impl FillReader {
    /// The next chunk, `None` at the end of a complete body, or the error of a fill cut short.
    pub fn poll_chunk(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, FillStreamAborted>>> {
        let mut state = self.stream.state.lock();
        if let Some(chunk) = state.chunks.get(self.next) {
            self.next += 1;
            return Poll::Ready(Some(Ok(chunk.clone())));
        }
        match state.end {
            Some(true) => Poll::Ready(None),
            Some(false) => Poll::Ready(Some(Err(FillStreamAborted))),
            None => {
                // One waker per reader: a reader polled again before new data replaces its own.
                if !state.wakers.iter().any(|w| w.will_wake(cx.waker())) {
                    state.wakers.push(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }

    pub fn content_length(&self) -> u64 {
        self.stream.content_length
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fields::StoredHeaders;
    use crate::freshness::Freshness;
    use crate::key::{KeyRules, RequestTarget};
    use http::{HeaderMap, StatusCode};
    use std::future::poll_fn;
    use std::time::{Duration, SystemTime};

    fn stream(len: u64) -> Arc<FillStream> {
        let h = HeaderMap::new();
        let key = Key::primary(
            &RequestTarget {
                scheme: "http",
                host: "a",
                path: "/",
                query: None,
                headers: &h,
            },
            &KeyRules::default(),
        );
        let now = SystemTime::now();
        let head = StoredResponse::new(
            StatusCode::OK,
            StoredHeaders::default(),
            Bytes::new(),
            Freshness {
                response_time: now,
                initial_age: Duration::ZERO,
                lifetime: Duration::from_secs(60),
                no_cache: false,
                must_revalidate: false,
                stale_while_revalidate: Duration::ZERO,
                stale_if_error: Duration::ZERO,
                stale_if_unreachable: Duration::ZERO,
                keep_until_staleness: None,
            },
            Box::new([]),
        );
        FillStream::new(head, len, key, 0)
    }

    async fn read_all(mut reader: FillReader) -> Result<Vec<u8>, FillStreamAborted> {
        let mut body = Vec::new();
        while let Some(chunk) = poll_fn(|cx| reader.poll_chunk(cx)).await {
            body.extend_from_slice(&chunk?);
        }
        Ok(body)
    }

    #[tokio::test]
    async fn readers_that_join_early_and_late_each_get_the_whole_body() {
        let s = stream(6);
        let early = tokio::spawn(read_all(s.reader()));
        s.push(Bytes::from_static(b"abc"));
        tokio::task::yield_now().await;
        let middle = tokio::spawn(read_all(s.reader()));
        s.push(Bytes::from_static(b"def"));
        s.finish(true);
        let late = read_all(s.reader()).await.unwrap();
        assert_eq!(early.await.unwrap().unwrap(), b"abcdef");
        assert_eq!(middle.await.unwrap().unwrap(), b"abcdef");
        assert_eq!(late, b"abcdef");
    }

    #[tokio::test]
    async fn a_fill_cut_short_is_an_error_never_a_short_body() {
        let s = stream(6);
        let reader = tokio::spawn(read_all(s.reader()));
        s.push(Bytes::from_static(b"abc"));
        s.finish(false);
        s.push(Bytes::from_static(b"def"));
        s.finish(true);
        assert!(reader.await.unwrap().is_err());
    }
}

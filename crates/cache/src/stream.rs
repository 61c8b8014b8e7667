//! A fill's body as it arrives from the origin, for the requests coalesced behind it to read
//! along rather than wait for the whole object: a 100 MiB object from a slow origin would
//! otherwise hold them past `coalesce_timeout`, and send each one to the origin after all.
//!
//! The chunks are the ones the fill buffers for the cache anyway (shared `Bytes`, no copy per
//! reader). Once the fill has stored the object, the chunks are swapped for the stored body,
//! so a slow reader pins no second copy of it, only reads further behind.

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
    /// The resource type, key and purge generation of the fill: a request whose own key for
    /// that type differs, or a purge since then, bars a new reader.
    pub(crate) resource_type: usize,
    pub(crate) primary: Key,
    pub(crate) generation: u64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    chunks: Vec<Bytes>,
    /// Where each chunk starts in the body.
    starts: Vec<u64>,
    received: u64,
    /// `Some(true)` once the whole body is in, `Some(false)` when the fill failed.
    end: Option<bool>,
    wakers: Vec<Waker>,
    /// Counts the times `wakers` was emptied: a reader registered in the current round keeps
    /// its slot there, so registering costs the same with ten readers or ten thousand.
    round: u64,
}

impl State {
    /// Takes the wakers to wake once the lock is released, and starts a new round.
    fn take_wakers(&mut self) -> Vec<Waker> {
        self.round += 1;
        std::mem::take(&mut self.wakers)
    }
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
        resource_type: usize,
        primary: Key,
        generation: u64,
    ) -> Arc<FillStream> {
        Arc::new(FillStream {
            head,
            content_length,
            resource_type,
            primary,
            generation,
            state: Mutex::default(),
        })
    }

    pub fn head(&self) -> &StoredResponse {
        &self.head
    }

    /// The resource type the response was admitted to (for [`crate::Cache::resource_type_label`]).
    pub fn resource_type(&self) -> usize {
        self.resource_type
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
            let start = state.received;
            state.received += chunk.len() as u64;
            state.starts.push(start);
            state.chunks.push(chunk);
            state.take_wakers()
        };
        wakers.into_iter().for_each(Waker::wake);
    }

    /// Ends the body: whole (`complete`, and only when every declared byte came) or cut short.
    /// Later calls change nothing.
    pub fn finish(&self, complete: bool) {
        let wakers = {
            let mut state = self.state.lock();
            if state.end.is_some() {
                return;
            }
            state.end = Some(complete && state.received == self.content_length);
            state.take_wakers()
        };
        wakers.into_iter().for_each(Waker::wake);
    }

    /// The whole body as stored: readers still reading take the rest from it, and the chunks
    /// (slices of the origin connection's read buffers) are let go.
    pub fn stored(&self, body: Bytes) {
        let mut state = self.state.lock();
        if state.end == Some(true) && body.len() as u64 == state.received {
            state.chunks = vec![body];
            state.starts = vec![0];
        }
    }

    /// Whether the fill ended without its whole body: nothing to read along any more.
    pub fn is_aborted(&self) -> bool {
        self.state.lock().end == Some(false)
    }

    /// A reader from the body's first byte.
    pub fn reader(self: &Arc<Self>) -> FillReader {
        FillReader {
            stream: self.clone(),
            offset: 0,
            slot: None,
        }
    }
}

/// Reads a [`FillStream`]'s body from the start, waiting for chunks still to come.
pub struct FillReader {
    stream: Arc<FillStream>,
    /// Bytes of the body already read.
    offset: u64,
    /// The round and index of this reader's waker in the stream's list, if it is there.
    slot: Option<(u64, usize)>,
}

impl FillReader {
    /// The next chunk, `None` at the end of a complete body, or the error of a fill cut short.
    pub fn poll_chunk(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, FillStreamAborted>>> {
        let mut state = self.stream.state.lock();
        if self.offset < state.received {
            // The chunk holding the next byte (chunks may have been swapped for the stored body).
            let index = state.starts.partition_point(|&start| start <= self.offset) - 1;
            let within = (self.offset - state.starts[index]) as usize;
            let chunk = state.chunks[index].slice(within..);
            self.offset += chunk.len() as u64;
            return Poll::Ready(Some(Ok(chunk)));
        }
        match state.end {
            Some(true) => Poll::Ready(None),
            Some(false) => Poll::Ready(Some(Err(FillStreamAborted))),
            None => {
                // One waker per reader and round: polled again, it replaces its own.
                match self.slot {
                    Some((round, index)) if round == state.round => {
                        if !state.wakers[index].will_wake(cx.waker()) {
                            state.wakers[index] = cx.waker().clone();
                        }
                    }
                    _ => {
                        self.slot = Some((state.round, state.wakers.len()));
                        state.wakers.push(cx.waker().clone());
                    }
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
    use http::StatusCode;
    use std::future::poll_fn;
    use std::time::{Duration, SystemTime};

    fn stream(len: u64) -> Arc<FillStream> {
        let key = crate::coalesce::tests::key();
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
        FillStream::new(head, len, 0, key, 0)
    }

    async fn read_all(reader: FillReader) -> Result<Vec<u8>, FillStreamAborted> {
        read_rest(reader).await
    }

    async fn read_rest(mut reader: FillReader) -> Result<Vec<u8>, FillStreamAborted> {
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
    async fn a_reader_midway_takes_the_rest_from_the_stored_body() {
        let s = stream(6);
        let mut reader = s.reader();
        s.push(Bytes::from_static(b"ab"));
        let first = poll_fn(|cx| reader.poll_chunk(cx)).await.unwrap().unwrap();
        assert_eq!(first, "ab");
        s.push(Bytes::from_static(b"cd"));
        s.push(Bytes::from_static(b"ef"));
        s.finish(true);
        s.stored(Bytes::from_static(b"abcdef"));
        assert_eq!(read_rest(reader).await.unwrap(), b"cdef");
        assert_eq!(read_all(s.reader()).await.unwrap(), b"abcdef");
    }

    #[tokio::test]
    async fn a_body_shorter_than_declared_is_never_complete() {
        let s = stream(6);
        s.push(Bytes::from_static(b"abc"));
        s.finish(true);
        assert!(s.is_aborted());
        assert!(read_all(s.reader()).await.is_err());
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

//! The task that reads one origin body for the cache and the first client.

use std::sync::Arc;
use std::time::SystemTime;

use crate::body::UpstreamBody;
use bytes::{Bytes, BytesMut};
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
    pub tx: mpsc::UnboundedSender<FeedItem>,
    pub flow: Arc<FeedFlow>,
    pub cache: Arc<larder_cache::Cache>,
    pub fill_key: Key,
    pub guard: Option<FillGuard>,
    /// The body as offered to the requests coalesced on this fill ([`FillGuard::offer`]).
    pub stream: Option<Arc<FillStream>>,
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

impl Fill {
    /// `body` ends with an error when the origin stalls (see [`UpstreamBody`]).
    pub async fn run(mut self, body: UpstreamBody, admission: Admission) {
        let mut body = std::pin::pin!(body);
        let max = admission.max_object_size();
        let mut chunks: Vec<Bytes> = Vec::new();
        let mut buffered = 0u64;
        let mut storing = true;
        loop {
            let frame = match body.frame().await {
                Some(Ok(frame)) => frame,
                None => break,
                Some(Err(e)) => return self.fail(e),
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let len = data.len() as u64;
            if storing {
                if buffered + len > max {
                    // Too large to store: stop buffering and release everyone waiting on it.
                    storing = false;
                    chunks = Vec::new();
                    self.cache
                        .mark_hit_for_pass(&self.fill_key, SystemTime::now());
                    self.guard = None;
                    if let Some(stream) = self.stream.take() {
                        stream.finish(false);
                    }
                } else {
                    buffered += len;
                    chunks.push(data.clone());
                    if let Some(stream) = &self.stream {
                        stream.push(data.clone());
                    }
                }
            }
            if !self.tx.is_closed() {
                self.flow.add(len);
                let _ = self.tx.send(FeedItem::Data(data));
                if !storing {
                    let tx = &self.tx;
                    self.flow
                        .wait_below(CLIENT_HIGH_WATER, || tx.is_closed())
                        .await;
                }
            } else if !storing {
                return;
            }
        }
        if let Some(stream) = &self.stream {
            stream.finish(true);
        }
        if storing {
            // One exact-size copy: the stored body owns no slack capacity and no shared buffers.
            let mut body = BytesMut::with_capacity(buffered as usize);
            for chunk in &chunks {
                body.extend_from_slice(chunk);
            }
            drop(chunks);
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

//! Larder's HTTP/2 server (RFC 9113), for connections that open with the HTTP/2 preface (h2c
//! prior knowledge, or TLS with ALPN `h2`).
//!
//! Why not hyper's (the h2 crate): a cache hit there cost 48k instructions, of which the
//! pipeline was 13k; the rest went to a general stream state machine, a HeaderMap per response
//! built from the stored fields and HPACK-encoded with a dynamic table, and a task per stream.
//! Here one task serves the connection and polls its streams' pipelines itself, responses are
//! encoded straight from their HeaderMap as never-indexed literals, and a body chunk goes out
//! without a copy.
//!
//! One connection, one `Connection`: frames are read and handled in order; each stream's
//! pipeline future and response body are polled from the connection's poll; what they write
//! is buffered and written once per poll.

pub(crate) mod hpack;
pub(crate) mod huffman;

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::task::{Context, Poll, Waker};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use h2::Reason;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use crate::Proxy;
use crate::body::{BoxError, ProxyBody};
use crate::pipeline::{Answer, ResponseWriter};

use hpack::{Field, Name, Pseudo};

type ConnectionError = Box<dyn std::error::Error + Send + Sync>;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

// Frame types (§6).
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const PRIORITY: u8 = 0x2;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PUSH_PROMISE: u8 = 0x5;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;

// Flags.
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY_FLAG: u8 = 0x20;

// Settings (§6.5.2).
const SETTINGS_HEADER_TABLE_SIZE: u16 = 0x1;
const SETTINGS_ENABLE_PUSH: u16 = 0x2;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;
const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 0x6;

/// The largest frame this server accepts: the protocol's default, never raised (a cache's
/// requests are small; bigger frames would only let a client make it buffer more).
const MAX_FRAME_SIZE: usize = 16_384;
/// The window every stream starts with, before SETTINGS changes it (§6.9.2).
const DEFAULT_WINDOW: i64 = 65_535;
const MAX_WINDOW: i64 = (1 << 31) - 1;
/// What a client may send on one stream, and on the whole connection, before this server
/// takes it: the request body bytes buffered at most (hyper's defaults, 1 MiB).
const STREAM_WINDOW: i64 = 1 << 20;
const CONNECTION_WINDOW: i64 = 1 << 20;
/// A WINDOW_UPDATE is sent once this much of a window has been taken (fewer frames).
const WINDOW_UPDATE_AT: i64 = STREAM_WINDOW / 4;
/// Response bytes buffered before bodies stop being polled: a slow client holds this much.
const WRITE_HIGH_WATER: usize = 256 * 1024;
/// Buffered output above which the connection stops reading: a client that sends PINGs or
/// SETTINGS and never reads the answers stops being read (and the write timeout ends it).
const READ_PAUSE_AT: usize = 1 << 20;
/// Request DATA payloads shorter than this are copied together (see `Inbound::small`).
const SMALL_DATA: usize = 1024;
/// Body chunks at least this long are written from their own buffer, not copied.
const ZERO_COPY_AT: usize = 2048;
/// Streams this server reset whose late frames are still expected, and ignored (§5.4.2).
const RECENT_RESETS: usize = 128;
/// Streams ended normally whose ids are remembered, so a frame on one is told from a frame on
/// a stream never opened.
const RECENT_CLOSES: usize = 128;
/// Client resets of streams still being answered, beyond the streams answered in full, before
/// the connection is closed (rapid reset, CVE-2023-44487).
const MAX_EXCESS_CLIENT_RESETS: u32 = 100;
/// Resets this server sends to malformed streams before it closes the connection (MadeYouReset,
/// CVE-2025-8671).
const MAX_LOCAL_RESETS: u32 = 256;
/// How long, and how much, a connection ended by an error still reads (see `poll_linger`).
const LINGER: std::time::Duration = std::time::Duration::from_secs(1);
const LINGER_READ_LIMIT: usize = 1 << 20;
/// CONTINUATION frames one header block may take (a full 64 KiB list needs 4 or 5).
const MAX_CONTINUATIONS: u32 = 64;
/// Reads per poll before the connection yields to other tasks.
const READS_PER_POLL: usize = 16;

/// What the listener's limits set for HTTP/2.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub max_concurrent_streams: u32,
    pub max_header_list_size: usize,
    /// No stream open this long: GOAWAY, and the connection closes.
    pub idle_timeout: std::time::Duration,
    /// Response data waiting this long on windows the client keeps shut ends the connection.
    pub stall_timeout: std::time::Duration,
}

/// Serves an HTTP/2 connection whose preface is (at least partly) in `io`'s first bytes,
/// until the client closes it, a protocol error ends it, or the drain has finished its
/// streams (GOAWAY first).
pub async fn serve<S>(
    io: S,
    proxy: Arc<Proxy>,
    peer: SocketAddr,
    scheme: &'static str,
    settings: Settings,
    mut drain: watch::Receiver<()>,
    mut draining: bool,
) -> Result<(), ConnectionError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut connection = Connection::new(io, proxy, peer, scheme, settings);
    if draining {
        connection.start_drain();
    }
    let mut drained = std::pin::pin!(drain.changed());
    std::future::poll_fn(|cx| {
        if !draining && drained.as_mut().poll(cx).is_ready() {
            draining = true;
            connection.start_drain();
        }
        connection.poll(cx)
    })
    .await
}

type Handler = Pin<Box<dyn Future<Output = Answer> + Send>>;

/// One stream, from its request's HEADERS until both sides have ended it.
struct Stream {
    id: u32,
    /// The pipeline, until it answers.
    handler: Option<Handler>,
    /// The response body still to send, and a chunk of it the windows held back.
    body: Option<ProxyBody>,
    pending: Bytes,
    /// The body has ended: END_STREAM goes with (or after) `pending`.
    pending_end: bool,
    send_window: i64,
    /// The request body's shared state, while the client may send more of it.
    inbound: Option<Arc<Mutex<Inbound>>>,
    recv_window: i64,
    /// Taken by the pipeline, not yet given back in a WINDOW_UPDATE.
    recv_released: i64,
    remote_ended: bool,
    /// END_STREAM (or a reset) sent: this side is done.
    local_ended: bool,
    head: bool,
    content_length: Option<u64>,
    received: u64,
    /// Swept from the list at the end of the pass that finished it.
    done: bool,
    /// Ended by a reset this server sent (its late frames are expected, and ignored).
    reset: bool,
}

impl Drop for Stream {
    fn drop(&mut self) {
        // However the stream ends (the connection closing, dropped, failing), a request body's
        // reader on another task learns of it now.
        self.abort_inbound();
    }
}

impl Stream {
    fn new(id: u32, send_window: i64) -> Stream {
        Stream {
            id,
            handler: None,
            body: None,
            pending: Bytes::new(),
            pending_end: false,
            send_window,
            inbound: None,
            recv_window: STREAM_WINDOW,
            recv_released: 0,
            remote_ended: false,
            local_ended: false,
            head: false,
            content_length: None,
            received: 0,
            done: false,
            reset: false,
        }
    }

    /// Ends the request body's reader with an error (the stream was reset).
    fn abort_inbound(&mut self) {
        if let Some(inbound) = self.inbound.take() {
            let mut inbound = inbound.lock();
            if !inbound.ended {
                inbound.aborted = true;
                if let Some(reader) = inbound.reader.take() {
                    reader.wake();
                }
            }
        }
    }
}

/// A request body between the connection (which adds DATA) and the pipeline (which reads it,
/// perhaps on another task: an upstream connection's).
#[derive(Default)]
struct Inbound {
    chunks: VecDeque<Bytes>,
    /// Small DATA payloads, copied after `chunks`: kept as slices, a client's 1-byte frames
    /// would each pin a read buffer and a queue entry.
    small: BytesMut,
    trailers: Option<HeaderMap>,
    ended: bool,
    aborted: bool,
    reader_gone: bool,
    /// Bytes read since the connection last looked: the stream's WINDOW_UPDATE to send.
    released: i64,
    /// The same for the connection's window, shared by all its request bodies: a body read
    /// after its stream ended (or was reset) still gives its bytes back.
    connection_released: Arc<AtomicI64>,
    reader: Option<Waker>,
    connection: Option<Waker>,
    /// `Expect: 100-continue`: the 100 goes out when the pipeline first waits for the body,
    /// as hyper's servers do (a client then sends it without waiting out its timeout).
    continue_state: Continue,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Continue {
    Expected,
    Wanted,
    #[default]
    Sent,
}

/// The pipeline's view of a request body.
struct RequestBody {
    shared: Arc<Mutex<Inbound>>,
    content_length: Option<u64>,
}

/// A request body the client reset before it ended.
#[derive(Debug, thiserror::Error)]
#[error("the client reset the HTTP/2 stream before its request body ended")]
struct StreamReset;

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut inbound = self.shared.lock();
        let chunk = match inbound.chunks.pop_front() {
            Some(chunk) => Some(chunk),
            None if !inbound.small.is_empty() => Some(inbound.small.split().freeze()),
            None => None,
        };
        if let Some(chunk) = chunk {
            inbound.release(chunk.len());
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if let Some(trailers) = inbound.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        if inbound.ended {
            return Poll::Ready(None);
        }
        if inbound.aborted {
            return Poll::Ready(Some(Err(Box::new(StreamReset))));
        }
        if inbound.continue_state == Continue::Expected {
            inbound.continue_state = Continue::Wanted;
            if let Some(connection) = &inbound.connection {
                connection.wake_by_ref();
            }
        }
        match &inbound.reader {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => inbound.reader = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        let inbound = self.shared.lock();
        inbound.ended
            && inbound.chunks.is_empty()
            && inbound.small.is_empty()
            && inbound.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.content_length {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

impl Inbound {
    /// Counts bytes taken from (or dropped with) the body against both windows, and wakes the
    /// connection to send the WINDOW_UPDATEs.
    fn release(&mut self, n: usize) {
        self.released += n as i64;
        self.connection_released
            .fetch_add(n as i64, std::sync::atomic::Ordering::Relaxed);
        if let Some(connection) = &self.connection {
            connection.wake_by_ref();
        }
    }

    /// Adds a DATA payload for the reader.
    fn push(&mut self, payload: Bytes) {
        if payload.len() < SMALL_DATA {
            self.small.extend_from_slice(&payload);
            return;
        }
        if !self.small.is_empty() {
            let small = self.small.split().freeze();
            self.chunks.push_back(small);
        }
        self.chunks.push_back(payload);
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        let mut inbound = self.shared.lock();
        inbound.reader_gone = true;
        // What was never read is given back all the same: the client must not stall on it.
        let unread = inbound.chunks.iter().map(Bytes::len).sum::<usize>() + inbound.small.len();
        inbound.chunks.clear();
        inbound.small = BytesMut::new();
        inbound.release(unread);
    }
}

/// A header block whose CONTINUATION frames are still to come.
struct PartialBlock {
    id: u32,
    /// CONTINUATION frames so far: empty ones add no bytes, so they are counted.
    frames: u32,
    end_stream: bool,
    self_dependent: bool,
    block: Vec<u8>,
}

/// Why the connection ends: the GOAWAY code, and what went wrong (for the debug log).
struct ConnectionFault(Reason, &'static str);

type FrameResult = Result<(), ConnectionFault>;

struct Connection<S> {
    io: S,
    proxy: Arc<Proxy>,
    peer: SocketAddr,
    scheme: &'static str,
    settings: Settings,
    read: BytesMut,
    preface_done: bool,
    settings_seen: bool,
    /// Frames being built, and frames (and body chunks) ready to write before them.
    out: BytesMut,
    queue: VecDeque<Bytes>,
    queued: usize,
    wrote: bool,
    scratch: Vec<u8>,
    fields: Vec<(Field, usize)>,
    decoder: hpack::Decoder,
    /// The next header block opens with a table size update to 0 (§4.2 of RFC 7541).
    table_size_update: bool,
    streams: Vec<Stream>,
    last_stream_id: u32,
    partial: Option<PartialBlock>,
    send_window: i64,
    recv_window: i64,
    recv_released: i64,
    /// What request bodies gave back of the connection's window (see `Inbound`).
    connection_released: Arc<AtomicI64>,
    peer_initial_window: i64,
    peer_max_frame: usize,
    recent_resets: VecDeque<u32>,
    recent_closes: VecDeque<u32>,
    excess_client_resets: u32,
    local_resets: u32,
    goaway_sent: bool,
    /// The last stream the GOAWAY named.
    goaway_last_id: u32,
    peer_goaway: bool,
    eof: bool,
    failed: Option<Reason>,
    /// After an error: how long the client's last bytes are awaited, and whether the write
    /// side is shut.
    linger: Option<Pin<Box<tokio::time::Sleep>>>,
    shut: bool,
    /// Since when no stream has been open, and the timer that ends such a connection. The
    /// timer is moved only when it fires early (streams came and went meanwhile), so a busy
    /// connection pays for no timer updates.
    idle_since: Option<tokio::time::Instant>,
    idle_timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Set by a pass that left response data waiting on a window, and by one that sent DATA;
    /// since when the former has gone on without the latter, and its timer (lazy, as idle's).
    window_blocked: bool,
    data_sent: bool,
    stalled_since: Option<tokio::time::Instant>,
    stall_timer: Option<Pin<Box<tokio::time::Sleep>>>,
    waker: Option<Waker>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    fn new(
        io: S,
        proxy: Arc<Proxy>,
        peer: SocketAddr,
        scheme: &'static str,
        settings: Settings,
    ) -> Self {
        let mut connection = Connection {
            io,
            proxy,
            peer,
            scheme,
            settings,
            read: BytesMut::with_capacity(16 * 1024),
            preface_done: false,
            settings_seen: false,
            out: BytesMut::with_capacity(16 * 1024),
            queue: VecDeque::new(),
            queued: 0,
            wrote: false,
            scratch: Vec::with_capacity(512),
            fields: Vec::with_capacity(16),
            decoder: hpack::Decoder::default(),
            table_size_update: true,
            streams: Vec::new(),
            last_stream_id: 0,
            partial: None,
            send_window: DEFAULT_WINDOW,
            recv_window: CONNECTION_WINDOW,
            recv_released: 0,
            connection_released: Arc::default(),
            peer_initial_window: DEFAULT_WINDOW,
            peer_max_frame: MAX_FRAME_SIZE,
            recent_resets: VecDeque::with_capacity(RECENT_RESETS),
            recent_closes: VecDeque::new(),
            excess_client_resets: 0,
            local_resets: 0,
            goaway_sent: false,
            goaway_last_id: 0,
            peer_goaway: false,
            eof: false,
            failed: None,
            linger: None,
            shut: false,
            idle_since: None,
            idle_timer: None,
            window_blocked: false,
            data_sent: false,
            stalled_since: None,
            stall_timer: None,
            waker: None,
        };
        connection.write_settings();
        connection
    }

    fn write_settings(&mut self) {
        let settings = [
            (
                SETTINGS_MAX_CONCURRENT_STREAMS,
                self.settings.max_concurrent_streams,
            ),
            (SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW as u32),
            (
                SETTINGS_MAX_HEADER_LIST_SIZE,
                self.settings.max_header_list_size as u32,
            ),
        ];
        frame_head(&mut self.out, settings.len() * 6, SETTINGS, 0, 0);
        for (id, value) in settings {
            self.out.put_u16(id);
            self.out.put_u32(value);
        }
        // The connection's window is only set by WINDOW_UPDATE (§6.9.2).
        self.write_window_update(0, (CONNECTION_WINDOW - DEFAULT_WINDOW) as u32);
        self.recv_window = CONNECTION_WINDOW;
    }

    fn start_drain(&mut self) {
        if !self.goaway_sent && self.failed.is_none() {
            self.goaway_sent = true;
            self.goaway_last_id = self.last_stream_id;
            self.write_goaway(Reason::NO_ERROR);
        }
    }

    /// A stream the client opened after this server's GOAWAY: never processed, so its frames
    /// are dropped (after flow-control accounting), not errors (§6.8).
    fn beyond_goaway(&self, id: u32) -> bool {
        self.goaway_sent && id > self.goaway_last_id
    }

    fn buffered(&self) -> usize {
        self.out.len() + self.queued
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConnectionError>> {
        match &self.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => self.waker = Some(cx.waker().clone()),
        }
        let mut reads = 0;
        // Reading stopped for a full buffer registers no wake-up: the writes that empty it
        // must bring the connection back to reading.
        let mut read_paused = false;
        while !self.eof && self.failed.is_none() {
            if self.buffered() >= READ_PAUSE_AT {
                read_paused = true;
                break;
            }
            if reads == READS_PER_POLL {
                cx.waker().wake_by_ref();
                break;
            }
            reads += 1;
            if self.read.capacity() - self.read.len() < 4096 {
                self.read.reserve(16 * 1024);
            }
            match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read) {
                Poll::Pending => break,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                Poll::Ready(Ok(0)) => self.eof = true,
                Poll::Ready(Ok(_)) => {
                    if let Err(ConnectionFault(reason, why)) = self.read_frames() {
                        self.fail(reason, why);
                    }
                }
            }
        }
        if self.failed.is_none() && !self.eof {
            self.poll_handlers(cx);
            loop {
                self.release_windows();
                let full = self.pump_bodies(cx);
                self.sweep();
                match self.poll_write(cx) {
                    Poll::Ready(Ok(())) if full => continue,
                    Poll::Ready(Ok(())) => {
                        if read_paused {
                            cx.waker().wake_by_ref();
                        }
                        break;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                    Poll::Pending => return Poll::Pending,
                }
            }
        } else if let Poll::Ready(Err(e)) = self.poll_write(cx) {
            return Poll::Ready(Err(e.into()));
        }
        if self.buffered() > 0 {
            return Poll::Pending;
        }
        if let Some(reason) = self.failed {
            if self.poll_linger(cx).is_pending() {
                return Poll::Pending;
            }
            return Poll::Ready(Err(Box::new(h2::Error::from(reason))));
        }
        if self.eof {
            return Poll::Ready(Ok(()));
        }
        if (self.goaway_sent || self.peer_goaway) && self.streams.is_empty() {
            // Lingering as after an error: the last responses must not be lost to a reset.
            return self.poll_linger(cx).map(Ok);
        }
        if self.poll_stalled(cx).is_ready() {
            let _ = self.poll_write(cx);
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        if self.poll_idle(cx).is_ready() {
            // GOAWAY written: the next poll sends it and closes.
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }

    /// Ready (after failing the connection) once response data has waited on the client's
    /// flow-control windows, with nothing sent, for `client_write_timeout`: a client that
    /// opens streams and never grants window would otherwise hold them, and their origin
    /// connections, forever. (A blocked socket write is the write guard's business.)
    fn poll_stalled(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if !std::mem::take(&mut self.window_blocked) || std::mem::take(&mut self.data_sent) {
            self.stalled_since = None;
            return Poll::Pending;
        }
        let now = tokio::time::Instant::now();
        let deadline = *self.stalled_since.get_or_insert(now) + self.settings.stall_timeout;
        let timer = self
            .stall_timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        loop {
            if timer.as_mut().poll(cx).is_pending() {
                // Asked again next poll: the blocked streams are still there to see.
                self.window_blocked = true;
                return Poll::Pending;
            }
            if now >= deadline {
                self.fail(Reason::ENHANCE_YOUR_CALM, "flow-control windows left shut");
                return Poll::Ready(());
            }
            timer.as_mut().reset(deadline);
        }
    }

    /// Ready (after writing GOAWAY) once no stream has been open for the idle timeout.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.streams.is_empty() {
            self.idle_since = None;
            return Poll::Pending;
        }
        let now = tokio::time::Instant::now();
        let deadline = *self.idle_since.get_or_insert(now) + self.settings.idle_timeout;
        let timer = self
            .idle_timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        loop {
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if now >= deadline {
                self.start_drain();
                return Poll::Ready(());
            }
            // Fired for an earlier idle spell: wait for this one's end.
            timer.as_mut().reset(deadline);
        }
    }

    /// After a GOAWAY for an error: the write side is shut, then what the client still sends is
    /// read and dropped for a moment. Closing with unread bytes would make the kernel answer
    /// with a TCP reset, which can discard the GOAWAY before the client reads it.
    fn poll_linger(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let linger = self
            .linger
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(LINGER)));
        if linger.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        if !self.shut && Pin::new(&mut self.io).poll_shutdown(cx).is_pending() {
            return Poll::Pending;
        }
        self.shut = true;
        let mut discarded = 0;
        while discarded < LINGER_READ_LIMIT {
            self.read.clear();
            if self.read.capacity() < 16 * 1024 {
                self.read.reserve(16 * 1024);
            }
            match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(()),
                Poll::Ready(Ok(n)) => discarded += n,
            }
        }
        Poll::Ready(())
    }

    /// Writes what is buffered; Ready once all of it is written (and flushed).
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if self.queue.is_empty() {
                if self.out.is_empty() {
                    if std::mem::take(&mut self.wrote) {
                        return Pin::new(&mut self.io).poll_flush(cx);
                    }
                    return Poll::Ready(Ok(()));
                }
                let n = std::task::ready!(Pin::new(&mut self.io).poll_write(cx, &self.out))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.wrote = true;
                self.out.advance(n);
                continue;
            }
            if !self.out.is_empty() {
                let built = self.out.split().freeze();
                self.queued += built.len();
                self.queue.push_back(built);
            }
            let mut slices = [IoSlice::new(&[]); 64];
            let mut count = 0;
            for (slot, chunk) in slices.iter_mut().zip(self.queue.iter()) {
                *slot = IoSlice::new(chunk);
                count += 1;
            }
            let mut n = std::task::ready!(
                Pin::new(&mut self.io).poll_write_vectored(cx, &slices[..count])
            )?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wrote = true;
            self.queued -= n;
            while n > 0 {
                let front = self.queue.front_mut().expect("written bytes were queued");
                if front.len() <= n {
                    n -= front.len();
                    self.queue.pop_front();
                } else {
                    front.advance(n);
                    n = 0;
                }
            }
        }
    }

    fn fail(&mut self, reason: Reason, why: &'static str) {
        if self.failed.is_some() {
            return;
        }
        tracing::debug!(client = %self.peer, ?reason, why, "HTTP/2 connection error");
        self.failed = Some(reason);
        self.partial = None;
        for stream in &mut self.streams {
            stream.abort_inbound();
        }
        self.streams.clear();
        self.write_goaway(reason);
    }

    // ---- reading ----

    fn read_frames(&mut self) -> FrameResult {
        if !self.preface_done {
            let n = self.read.len().min(PREFACE.len());
            if self.read[..n] != PREFACE[..n] {
                return Err(ConnectionFault(
                    Reason::PROTOCOL_ERROR,
                    "not the HTTP/2 preface",
                ));
            }
            if n < PREFACE.len() {
                return Ok(());
            }
            self.read.advance(PREFACE.len());
            self.preface_done = true;
        }
        while self.read.len() >= 9 && self.failed.is_none() {
            let head = &self.read[..9];
            let len =
                (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
            let (kind, flags) = (head[3], head[4]);
            let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            if len > MAX_FRAME_SIZE {
                return Err(ConnectionFault(
                    Reason::FRAME_SIZE_ERROR,
                    "a frame above SETTINGS_MAX_FRAME_SIZE",
                ));
            }
            if self.read.len() < 9 + len {
                break;
            }
            self.read.advance(9);
            let payload = self.read.split_to(len);
            if !self.settings_seen {
                if kind != SETTINGS || flags & ACK != 0 {
                    return Err(ConnectionFault(
                        Reason::PROTOCOL_ERROR,
                        "the first frame is not SETTINGS",
                    ));
                }
                self.settings_seen = true;
            }
            if let Some(partial) = &self.partial
                && (kind != CONTINUATION || id != partial.id)
            {
                return Err(ConnectionFault(
                    Reason::PROTOCOL_ERROR,
                    "a header block interrupted",
                ));
            }
            match kind {
                DATA => self.on_data(id, flags, payload)?,
                HEADERS => self.on_headers(id, flags, &payload)?,
                PRIORITY => self.on_priority(id, &payload)?,
                RST_STREAM => self.on_reset(id, &payload)?,
                SETTINGS => self.on_settings(id, flags, &payload)?,
                PUSH_PROMISE => {
                    return Err(ConnectionFault(
                        Reason::PROTOCOL_ERROR,
                        "a client's PUSH_PROMISE",
                    ));
                }
                PING => self.on_ping(id, flags, &payload)?,
                GOAWAY => self.on_goaway(id, &payload)?,
                WINDOW_UPDATE => self.on_window_update(id, &payload)?,
                CONTINUATION => self.on_continuation(id, flags, &payload)?,
                // Unknown types are ignored (§5.5).
                _ => {}
            }
        }
        Ok(())
    }

    fn stream_index(&self, id: u32) -> Option<usize> {
        self.streams.iter().position(|s| s.id == id && !s.done)
    }

    /// A stream this server reset recently: its late frames are ignored.
    fn recently_reset(&self, id: u32) -> bool {
        self.recent_resets.contains(&id)
    }

    /// Strips padding (§6.1): the content between the pad length and the padding.
    fn unpad(flags: u8, payload: &[u8]) -> Result<&[u8], ConnectionFault> {
        if flags & PADDED == 0 {
            return Ok(payload);
        }
        let Some((&pad, rest)) = payload.split_first() else {
            return Err(ConnectionFault(
                Reason::FRAME_SIZE_ERROR,
                "a padded frame without its pad length",
            ));
        };
        if usize::from(pad) > rest.len() {
            return Err(ConnectionFault(
                Reason::PROTOCOL_ERROR,
                "padding longer than the frame",
            ));
        }
        Ok(&rest[..rest.len() - usize::from(pad)])
    }

    fn on_data(&mut self, id: u32, flags: u8, payload: BytesMut) -> FrameResult {
        if id == 0 {
            return Err(ConnectionFault(Reason::PROTOCOL_ERROR, "DATA on stream 0"));
        }
        let flow_len = payload.len() as i64;
        if flow_len > self.recv_window {
            return Err(ConnectionFault(
                Reason::FLOW_CONTROL_ERROR,
                "DATA beyond the connection window",
            ));
        }
        self.recv_window -= flow_len;
        let content = Self::unpad(flags, &payload)?;
        let (start, content_len) = (
            content.as_ptr() as usize - payload.as_ptr() as usize,
            content.len(),
        );
        // Padding is given back at once; the content once the pipeline takes it.
        self.recv_released += flow_len - content_len as i64;
        if id > self.last_stream_id {
            return Err(ConnectionFault(
                Reason::PROTOCOL_ERROR,
                "DATA on an idle stream",
            ));
        }
        let Some(i) = self.stream_index(id) else {
            self.recv_released += content_len as i64;
            if self.recently_reset(id) || self.beyond_goaway(id) {
                return Ok(());
            }
            return match self.not_open(id, "DATA on a stream not open") {
                // One that ended normally: the client sent after its own END_STREAM.
                fault @ ConnectionFault(Reason::STREAM_CLOSED, _) => Err(fault),
                // One reset too long ago to remember, or never opened below the last: closed
                // either way, and said so on the stream alone (as h2 does).
                _ => {
                    self.write_reset(id, Reason::STREAM_CLOSED);
                    Ok(())
                }
            };
        };
        let stream = &mut self.streams[i];
        if stream.remote_ended {
            self.recv_released += content_len as i64;
            self.reset(i, Reason::STREAM_CLOSED);
            return Ok(());
        }
        if flow_len > stream.recv_window {
            self.recv_released += content_len as i64;
            self.reset(i, Reason::FLOW_CONTROL_ERROR);
            return Ok(());
        }
        stream.recv_window -= flow_len;
        stream.recv_released += flow_len - content_len as i64;
        stream.received += content_len as u64;
        let end = flags & END_STREAM != 0;
        let length_wrong = stream.content_length.is_some_and(|declared| {
            stream.received > declared || (end && stream.received != declared)
        });
        if length_wrong {
            self.recv_released += content_len as i64;
            self.reset(i, Reason::PROTOCOL_ERROR);
            return Ok(());
        }
        let Some(shared) = &stream.inbound else {
            // Never expected (END_STREAM came with HEADERS, which `remote_ended` caught).
            self.recv_released += content_len as i64;
            return Ok(());
        };
        let mut inbound = shared.lock();
        if inbound.reader_gone {
            self.recv_released += content_len as i64;
            stream.recv_released += content_len as i64;
        } else if content_len > 0 {
            let mut payload = payload.freeze();
            payload.advance(start);
            payload.truncate(content_len);
            inbound.push(payload);
        }
        if inbound.connection.is_none() {
            inbound.connection = self.waker.clone();
        }
        if end {
            inbound.ended = true;
        }
        if let Some(reader) = inbound.reader.take() {
            reader.wake();
        }
        drop(inbound);
        if end {
            stream.remote_ended = true;
            stream.inbound = None;
            if stream.local_ended {
                stream.done = true;
            }
        }
        Ok(())
    }

    fn on_headers(&mut self, id: u32, flags: u8, payload: &[u8]) -> FrameResult {
        if id == 0 || id.is_multiple_of(2) {
            return Err(ConnectionFault(
                Reason::PROTOCOL_ERROR,
                "HEADERS on a stream a client cannot open",
            ));
        }
        let mut fragment = Self::unpad(flags, payload)?;
        let mut self_dependent = false;
        if flags & PRIORITY_FLAG != 0 {
            if fragment.len() < 5 {
                return Err(ConnectionFault(
                    Reason::FRAME_SIZE_ERROR,
                    "HEADERS too short for its priority",
                ));
            }
            let depends_on =
                u32::from_be_bytes([fragment[0], fragment[1], fragment[2], fragment[3]])
                    & 0x7fff_ffff;
            self_dependent = depends_on == id;
            fragment = &fragment[5..];
        }
        let end_stream = flags & END_STREAM != 0;
        if flags & END_HEADERS != 0 {
            return self.on_header_block(id, end_stream, self_dependent, fragment);
        }
        self.partial = Some(PartialBlock {
            id,
            frames: 0,
            end_stream,
            self_dependent,
            block: fragment.to_vec(),
        });
        Ok(())
    }

    fn on_continuation(&mut self, id: u32, flags: u8, payload: &[u8]) -> FrameResult {
        let Some(partial) = &mut self.partial else {
            return Err(ConnectionFault(
                Reason::PROTOCOL_ERROR,
                "CONTINUATION without HEADERS",
            ));
        };
        debug_assert_eq!(partial.id, id);
        partial.block.extend_from_slice(payload);
        partial.frames += 1;
        if partial.frames > MAX_CONTINUATIONS {
            return Err(ConnectionFault(
                Reason::ENHANCE_YOUR_CALM,
                "a header block in too many CONTINUATION frames",
            ));
        }
        // A block cannot decode to less than a third of its size of fields, so one this large is
        // over any header list this server accepts (CONTINUATION flood).
        if partial.block.len() > 3 * self.settings.max_header_list_size + MAX_FRAME_SIZE {
            return Err(ConnectionFault(
                Reason::ENHANCE_YOUR_CALM,
                "a header block beyond any accepted size",
            ));
        }
        if flags & END_HEADERS == 0 {
            return Ok(());
        }
        let partial = self.partial.take().expect("checked above");
        self.on_header_block(
            partial.id,
            partial.end_stream,
            partial.self_dependent,
            &partial.block,
        )
    }

    fn on_header_block(
        &mut self,
        id: u32,
        end_stream: bool,
        self_dependent: bool,
        block: &[u8],
    ) -> FrameResult {
        // Decoded whatever becomes of the stream: the table must follow the client's.
        let mut fields = std::mem::take(&mut self.fields);
        fields.clear();
        // Fields past the list-size limit are decoded (the table must follow) but not kept: a
        // block of one-byte indices would otherwise hold a hundred times its size.
        let limit = self.settings.max_header_list_size;
        let mut list_size = 0usize;
        let decoded = self.decoder.decode(block, |field, size| {
            list_size = list_size.saturating_add(size);
            if list_size <= limit {
                fields.push((field, size));
            }
        });
        let result = match decoded {
            Err(_) => Err(ConnectionFault(
                Reason::COMPRESSION_ERROR,
                "a header block that does not decode",
            )),
            Ok(()) => {
                if id <= self.last_stream_id {
                    if list_size > limit {
                        self.refuse_trailers(id);
                        Ok(())
                    } else {
                        self.on_trailers(id, end_stream, &fields)
                    }
                } else {
                    self.last_stream_id = id;
                    self.idle_since = None;
                    self.open_stream(id, end_stream, self_dependent, list_size, &mut fields);
                    Ok(())
                }
            }
        };
        fields.clear();
        fields.shrink_to(64);
        self.fields = fields;
        result
    }

    /// Trailers over the header-list limit: the stream is reset.
    fn refuse_trailers(&mut self, id: u32) {
        if let Some(i) = self.stream_index(id) {
            self.reset(i, Reason::PROTOCOL_ERROR);
        }
    }

    fn on_trailers(&mut self, id: u32, end_stream: bool, fields: &[(Field, usize)]) -> FrameResult {
        if self.beyond_goaway(id) {
            return Ok(());
        }
        let Some(i) = self.stream_index(id) else {
            if self.recently_reset(id) {
                return Ok(());
            }
            return Err(self.not_open(id, "HEADERS on a stream not open"));
        };
        if self.streams[i].remote_ended {
            self.reset(i, Reason::STREAM_CLOSED);
            return Ok(());
        }
        let mut trailers = HeaderMap::with_capacity(fields.len());
        let mut valid = end_stream;
        for (field, _) in fields {
            match (&field.name, &field.value) {
                (Name::Field(name), Some(value)) if field_allowed(name, value) => {
                    trailers.append(name.clone(), value.clone());
                }
                _ => valid = false,
            }
        }
        let stream = &mut self.streams[i];
        if stream.content_length.is_some_and(|n| n != stream.received) {
            valid = false;
        }
        if !valid {
            self.reset(i, Reason::PROTOCOL_ERROR);
            return Ok(());
        }
        stream.remote_ended = true;
        if let Some(shared) = stream.inbound.take() {
            let mut inbound = shared.lock();
            inbound.trailers = Some(trailers);
            inbound.ended = true;
            if let Some(reader) = inbound.reader.take() {
                reader.wake();
            }
        }
        if stream.local_ended {
            stream.done = true;
        }
        Ok(())
    }

    fn open_stream(
        &mut self,
        id: u32,
        end_stream: bool,
        self_dependent: bool,
        list_size: usize,
        fields: &mut [(Field, usize)],
    ) {
        if self.goaway_sent || self.peer_goaway {
            // Past the last stream the GOAWAY named: never processed, safe to retry (§6.8).
            return;
        }
        let mut stream = Stream::new(id, self.peer_initial_window);
        stream.remote_ended = end_stream;
        if self_dependent {
            self.streams.push(stream);
            let i = self.streams.len() - 1;
            self.reset(i, Reason::PROTOCOL_ERROR);
            return;
        }
        let open = self.streams.iter().filter(|s| !s.done).count();
        if open >= self.settings.max_concurrent_streams as usize {
            self.write_reset(id, Reason::REFUSED_STREAM);
            self.remember_reset(id);
            return;
        }
        if list_size > self.settings.max_header_list_size {
            // Answered, not reset: the client learns why (as hyper's h2 does).
            self.scratch.clear();
            self.encode_block_start();
            hpack::encode_status(
                http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                &mut self.scratch,
            );
            self.write_header_block(id, true);
            stream.local_ended = true;
            if !end_stream {
                self.write_reset(id, Reason::NO_ERROR);
                self.remember_reset(id);
            }
            return;
        }
        let Some((request, content_length)) = build_request(fields) else {
            self.streams.push(stream);
            let i = self.streams.len() - 1;
            self.reset(i, Reason::PROTOCOL_ERROR);
            return;
        };
        if end_stream && content_length.is_some_and(|n| n > 0) {
            self.streams.push(stream);
            let i = self.streams.len() - 1;
            self.reset(i, Reason::PROTOCOL_ERROR);
            return;
        }
        stream.head = request.method() == Method::HEAD;
        stream.content_length = content_length;
        let body = if end_stream {
            crate::body::empty()
        } else {
            let expects_continue = request
                .headers()
                .get(header::EXPECT)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
            let shared = Arc::new(Mutex::new(Inbound {
                connection: self.waker.clone(),
                connection_released: self.connection_released.clone(),
                continue_state: if expects_continue {
                    Continue::Expected
                } else {
                    Continue::Sent
                },
                ..Inbound::default()
            }));
            stream.inbound = Some(shared.clone());
            crate::body::boxed(RequestBody {
                shared,
                content_length,
            })
        };
        let handler = self.proxy.clone().handle(
            request.map(|()| body),
            Some(self.peer),
            None,
            self.scheme,
            ResponseWriter::Lines,
        );
        stream.handler = Some(Box::pin(handler));
        self.streams.push(stream);
    }

    fn on_priority(&mut self, id: u32, payload: &[u8]) -> FrameResult {
        if id == 0 {
            return Err(ConnectionFault(
                Reason::PROTOCOL_ERROR,
                "PRIORITY on stream 0",
            ));
        }
        if payload.len() != 5 {
            self.write_reset(id, Reason::FRAME_SIZE_ERROR);
            if let Some(i) = self.stream_index(id) {
                self.reset_quietly(i);
            }
            return Ok(());
        }
        let depends_on =
            u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) & 0x7fff_ffff;
        if depends_on == id {
            match self.stream_index(id) {
                Some(i) => self.reset(i, Reason::PROTOCOL_ERROR),
                None => self.write_reset(id, Reason::PROTOCOL_ERROR),
            }
        }
        // Priorities are advisory; responses go out as they are ready.
        Ok(())
    }

    fn on_reset(&mut self, id: u32, payload: &[u8]) -> FrameResult {
        if payload.len() != 4 {
            return Err(ConnectionFault(
                Reason::FRAME_SIZE_ERROR,
                "RST_STREAM of the wrong length",
            ));
        }
        if id == 0 {
            return Err(ConnectionFault(
                Reason::PROTOCOL_ERROR,
                "RST_STREAM on stream 0",
            ));
        }
        if id > self.last_stream_id {
            return Err(ConnectionFault(
                Reason::PROTOCOL_ERROR,
                "RST_STREAM on an idle stream",
            ));
        }
        if let Some(i) = self.stream_index(id) {
            let stream = &mut self.streams[i];
            if !stream.local_ended {
                self.excess_client_resets += 1;
                if self.excess_client_resets > MAX_EXCESS_CLIENT_RESETS {
                    return Err(ConnectionFault(
                        Reason::ENHANCE_YOUR_CALM,
                        "too many streams reset while being answered",
                    ));
                }
            }
            stream.abort_inbound();
            stream.done = true;
            stream.handler = None;
            stream.body = None;
        }
        Ok(())
    }

    fn on_settings(&mut self, id: u32, flags: u8, payload: &[u8]) -> FrameResult {
        if id != 0 {
            return Err(ConnectionFault(
                Reason::PROTOCOL_ERROR,
                "SETTINGS on a stream",
            ));
        }
        if flags & ACK != 0 {
            if !payload.is_empty() {
                return Err(ConnectionFault(
                    Reason::FRAME_SIZE_ERROR,
                    "a SETTINGS ACK with a payload",
                ));
            }
            return Ok(());
        }
        if !payload.len().is_multiple_of(6) {
            return Err(ConnectionFault(
                Reason::FRAME_SIZE_ERROR,
                "SETTINGS of a length not a multiple of 6",
            ));
        }
        for setting in payload.chunks_exact(6) {
            let key = u16::from_be_bytes([setting[0], setting[1]]);
            let value = u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]);
            match key {
                SETTINGS_HEADER_TABLE_SIZE => self.table_size_update = true,
                SETTINGS_ENABLE_PUSH if value > 1 => {
                    return Err(ConnectionFault(
                        Reason::PROTOCOL_ERROR,
                        "SETTINGS_ENABLE_PUSH above 1",
                    ));
                }
                SETTINGS_INITIAL_WINDOW_SIZE => {
                    let value = i64::from(value);
                    if value > MAX_WINDOW {
                        return Err(ConnectionFault(
                            Reason::FLOW_CONTROL_ERROR,
                            "SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1",
                        ));
                    }
                    let delta = value - self.peer_initial_window;
                    self.peer_initial_window = value;
                    for stream in &mut self.streams {
                        stream.send_window += delta;
                        if stream.send_window > MAX_WINDOW {
                            return Err(ConnectionFault(
                                Reason::FLOW_CONTROL_ERROR,
                                "a stream window above 2^31-1",
                            ));
                        }
                    }
                }
                SETTINGS_MAX_FRAME_SIZE => {
                    if !(16_384..=16_777_215).contains(&value) {
                        return Err(ConnectionFault(
                            Reason::PROTOCOL_ERROR,
                            "SETTINGS_MAX_FRAME_SIZE out of range",
                        ));
                    }
                    self.peer_max_frame = value as usize;
                }
                _ => {}
            }
        }
        frame_head(&mut self.out, 0, SETTINGS, ACK, 0);
        Ok(())
    }

    fn on_ping(&mut self, id: u32, flags: u8, payload: &[u8]) -> FrameResult {
        if id != 0 {
            return Err(ConnectionFault(Reason::PROTOCOL_ERROR, "PING on a stream"));
        }
        if payload.len() != 8 {
            return Err(ConnectionFault(
                Reason::FRAME_SIZE_ERROR,
                "PING of the wrong length",
            ));
        }
        if flags & ACK == 0 {
            frame_head(&mut self.out, 8, PING, ACK, 0);
            self.out.extend_from_slice(payload);
        }
        Ok(())
    }

    fn on_goaway(&mut self, id: u32, payload: &[u8]) -> FrameResult {
        if id != 0 {
            return Err(ConnectionFault(
                Reason::PROTOCOL_ERROR,
                "GOAWAY on a stream",
            ));
        }
        if payload.len() < 8 {
            return Err(ConnectionFault(
                Reason::FRAME_SIZE_ERROR,
                "GOAWAY too short",
            ));
        }
        // The client opens no more streams; those open are answered, then the connection ends.
        self.peer_goaway = true;
        Ok(())
    }

    fn on_window_update(&mut self, id: u32, payload: &[u8]) -> FrameResult {
        if payload.len() != 4 {
            return Err(ConnectionFault(
                Reason::FRAME_SIZE_ERROR,
                "WINDOW_UPDATE of the wrong length",
            ));
        }
        let increment = i64::from(
            u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) & 0x7fff_ffff,
        );
        if id == 0 {
            if increment == 0 {
                return Err(ConnectionFault(
                    Reason::PROTOCOL_ERROR,
                    "a WINDOW_UPDATE of 0",
                ));
            }
            self.send_window += increment;
            if self.send_window > MAX_WINDOW {
                return Err(ConnectionFault(
                    Reason::FLOW_CONTROL_ERROR,
                    "the connection window above 2^31-1",
                ));
            }
            return Ok(());
        }
        if id > self.last_stream_id {
            return Err(ConnectionFault(
                Reason::PROTOCOL_ERROR,
                "WINDOW_UPDATE on an idle stream",
            ));
        }
        let Some(i) = self.stream_index(id) else {
            return Ok(());
        };
        if increment == 0 {
            self.reset(i, Reason::PROTOCOL_ERROR);
            return Ok(());
        }
        let stream = &mut self.streams[i];
        stream.send_window += increment;
        if stream.send_window > MAX_WINDOW {
            self.reset(i, Reason::FLOW_CONTROL_ERROR);
        }
        Ok(())
    }

    // ---- answering ----

    fn poll_handlers(&mut self, cx: &mut Context<'_>) {
        for i in 0..self.streams.len() {
            let Some(handler) = self.streams[i].handler.as_mut() else {
                continue;
            };
            let Poll::Ready(answer) = handler.as_mut().poll(cx) else {
                continue;
            };
            self.streams[i].handler = None;
            self.start_response(i, answer);
        }
    }

    fn encode_block_start(&mut self) {
        if std::mem::take(&mut self.table_size_update) {
            hpack::encode_table_size_zero(&mut self.scratch);
        }
    }

    /// Sends the response's HEADERS, with the framing HTTP/2 leaves to this server: Date when
    /// the response has none (RFC 9110 §6.6.1) and Content-Length when the body's length is
    /// known, as hyper's server does.
    fn start_response(&mut self, i: usize, answer: Answer) {
        let (parts, body) = answer.response.into_parts();
        let status = parts.status;
        let no_length = status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
        let head = self.streams[i].head;
        if let Some(shared) = &self.streams[i].inbound {
            // The response goes first: no 100 after it.
            shared.lock().continue_state = Continue::Sent;
        }
        self.scratch.clear();
        self.encode_block_start();
        hpack::encode_status(status, &mut self.scratch);
        let mut has_date = false;
        let mut has_length = false;
        if let Some(lines) = &answer.stored_lines {
            // Stored without the framing fields (Content-Length among them).
            hpack::encode_lines(&lines.stored, &mut self.scratch);
            has_date = lines.has_date;
            if !no_length {
                let mut digits = itoa::Buffer::new();
                let digits = digits.format(lines.content_length).as_bytes();
                hpack::encode_bytes(b"content-length", digits, false, &mut self.scratch);
                has_length = true;
            }
        }
        for (name, value) in &parts.headers {
            if *name == header::CONTENT_LENGTH {
                if no_length || has_length {
                    continue;
                }
                has_length = true;
            } else if *name == header::DATE {
                has_date = true;
            }
            hpack::encode_field(name, value, &mut self.scratch);
        }
        hpack::encode_lines(&answer.added_lines, &mut self.scratch);
        if !has_date {
            hpack::encode_date(&mut self.scratch, crate::http1::date::append);
        }
        if !has_length
            && !no_length
            && let Some(len) = body.size_hint().exact()
            && (len > 0 || !head)
        {
            let mut digits = itoa::Buffer::new();
            let digits = digits.format(len).as_bytes();
            hpack::encode_bytes(b"content-length", digits, false, &mut self.scratch);
        }
        let stream = &mut self.streams[i];
        let end = head || no_length || body.is_end_stream();
        let id = stream.id;
        if end {
            stream.local_ended = true;
            drop(body);
        } else {
            stream.body = Some(body);
        }
        self.write_header_block(id, end);
        if end {
            self.finish_local(i);
        }
    }

    /// Sends bodies as far as the windows and the buffer allow, one DATA frame per stream per
    /// round so one large body does not hold back the others. Says whether it stopped because
    /// the buffer is full (more would follow a write).
    fn pump_bodies(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            let mut progressed = false;
            let mut i = 0;
            // A failure (a reset past the limit) empties the list meanwhile.
            while i < self.streams.len() && self.failed.is_none() {
                if self.buffered() >= WRITE_HIGH_WATER {
                    return true;
                }
                progressed |= self.pump_one(i, cx);
                i += 1;
            }
            if !progressed || self.failed.is_some() {
                return false;
            }
        }
    }

    /// Sends at most one frame of stream `i`'s body, polling the body for data first if none is
    /// waiting. Says whether it sent anything.
    fn pump_one(&mut self, i: usize, cx: &mut Context<'_>) -> bool {
        let stream = &mut self.streams[i];
        if stream.done || stream.local_ended {
            return false;
        }
        while stream.pending.is_empty() && !stream.pending_end {
            let Some(body) = stream.body.as_mut() else {
                return false;
            };
            match Pin::new(body).poll_frame(cx) {
                Poll::Pending => return false,
                Poll::Ready(None) => {
                    stream.body = None;
                    stream.pending_end = true;
                }
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        if stream.body.as_ref().is_some_and(Body::is_end_stream) {
                            stream.body = None;
                            stream.pending_end = true;
                        }
                        stream.pending = data;
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            stream.body = None;
                            let id = stream.id;
                            self.scratch.clear();
                            self.encode_block_start();
                            for (name, value) in &trailers {
                                hpack::encode_field(name, value, &mut self.scratch);
                            }
                            self.write_header_block(id, true);
                            self.finish_local(i);
                            return true;
                        }
                    }
                },
                Poll::Ready(Some(Err(e))) => {
                    tracing::debug!(error = %e, stream = stream.id, "response body failed");
                    self.reset(i, Reason::INTERNAL_ERROR);
                    return true;
                }
            }
        }
        let id = stream.id;
        if stream.pending.is_empty() {
            // The body ended after the last chunk went out.
            self.write_data(id, true, Bytes::new());
            self.finish_local(i);
            return true;
        }
        let allowed = stream
            .send_window
            .min(self.send_window)
            .min(self.peer_max_frame as i64);
        if allowed <= 0 {
            self.window_blocked = true;
            return false;
        }
        self.data_sent = true;
        let n = (allowed as usize).min(stream.pending.len());
        let chunk = stream.pending.split_to(n);
        stream.send_window -= n as i64;
        self.send_window -= n as i64;
        let end = stream.pending.is_empty() && stream.pending_end;
        self.write_data(id, end, chunk);
        if end {
            self.finish_local(i);
        }
        true
    }

    /// This side has sent END_STREAM: the stream is over, or the client's request body is
    /// still coming, which it is asked to stop (§8.1).
    fn finish_local(&mut self, i: usize) {
        let stream = &mut self.streams[i];
        stream.local_ended = true;
        stream.body = None;
        self.excess_client_resets = self.excess_client_resets.saturating_sub(1);
        if stream.remote_ended {
            stream.done = true;
        } else {
            let id = stream.id;
            stream.abort_inbound();
            stream.done = true;
            stream.reset = true;
            self.write_reset(id, Reason::NO_ERROR);
            self.remember_reset(id);
        }
    }

    /// Gives back the window of request bodies the pipeline has read, and sends the 100s
    /// their first reads asked for.
    fn release_windows(&mut self) {
        self.recv_released += self
            .connection_released
            .swap(0, std::sync::atomic::Ordering::Relaxed);
        let mut continues = Vec::new();
        for stream in &mut self.streams {
            if let Some(shared) = &stream.inbound {
                let mut inbound = shared.lock();
                stream.recv_released += std::mem::take(&mut inbound.released);
                if inbound.continue_state == Continue::Wanted {
                    inbound.continue_state = Continue::Sent;
                    // Only before the response: a 100 after it would read as trailers.
                    if stream.handler.is_some() {
                        continues.push(stream.id);
                    }
                }
            }
            if stream.recv_released >= WINDOW_UPDATE_AT && !stream.remote_ended && !stream.done {
                let n = std::mem::take(&mut stream.recv_released);
                stream.recv_window += n;
                frame_head(&mut self.out, 4, WINDOW_UPDATE, 0, stream.id);
                self.out.put_u32(n as u32);
            }
        }
        if self.recv_released >= WINDOW_UPDATE_AT {
            let n = std::mem::take(&mut self.recv_released);
            self.recv_window += n;
            self.write_window_update(0, n as u32);
        }
        for id in continues {
            self.scratch.clear();
            self.encode_block_start();
            hpack::encode_status(StatusCode::CONTINUE, &mut self.scratch);
            self.write_header_block(id, false);
        }
    }

    fn sweep(&mut self) {
        if !self.streams.iter().any(|s| s.done) {
            return;
        }
        for stream in &self.streams {
            if stream.done && !stream.reset {
                if self.recent_closes.len() == RECENT_CLOSES {
                    self.recent_closes.pop_front();
                }
                self.recent_closes.push_back(stream.id);
            }
        }
        self.streams.retain(|s| !s.done);
    }

    /// Why a frame names a stream that is not open: one that ended (STREAM_CLOSED, §5.1), or
    /// one never opened below the last opened (PROTOCOL_ERROR, §5.1.1).
    fn not_open(&self, id: u32, frame: &'static str) -> ConnectionFault {
        let ended_here = self
            .streams
            .iter()
            .any(|s| s.id == id && s.done && !s.reset);
        if ended_here || self.recent_closes.contains(&id) {
            ConnectionFault(Reason::STREAM_CLOSED, frame)
        } else {
            ConnectionFault(Reason::PROTOCOL_ERROR, frame)
        }
    }

    /// A stream error (§5.4.2): RST_STREAM, and the stream is dropped.
    fn reset(&mut self, i: usize, reason: Reason) {
        let id = self.streams[i].id;
        self.write_reset(id, reason);
        self.reset_quietly(i);
        // Only resets the client's frames caused count (an origin's failing body is not the
        // client's doing).
        if reason != Reason::NO_ERROR && reason != Reason::INTERNAL_ERROR {
            self.local_resets += 1;
            if self.local_resets > MAX_LOCAL_RESETS {
                self.fail(Reason::ENHANCE_YOUR_CALM, "too many malformed streams");
            }
        }
    }

    fn reset_quietly(&mut self, i: usize) {
        let stream = &mut self.streams[i];
        stream.abort_inbound();
        stream.done = true;
        stream.reset = true;
        stream.local_ended = true;
        stream.handler = None;
        stream.body = None;
        let id = stream.id;
        self.remember_reset(id);
    }

    fn remember_reset(&mut self, id: u32) {
        if self.recent_resets.len() == RECENT_RESETS {
            self.recent_resets.pop_front();
        }
        self.recent_resets.push_back(id);
    }

    // ---- writing ----

    fn write_reset(&mut self, id: u32, reason: Reason) {
        frame_head(&mut self.out, 4, RST_STREAM, 0, id);
        self.out.put_u32(reason.into());
    }

    fn write_window_update(&mut self, id: u32, increment: u32) {
        frame_head(&mut self.out, 4, WINDOW_UPDATE, 0, id);
        self.out.put_u32(increment);
    }

    fn write_goaway(&mut self, reason: Reason) {
        // A later GOAWAY never names a higher stream than an earlier one (§6.8).
        let last = if self.goaway_sent {
            self.goaway_last_id
        } else {
            self.last_stream_id
        };
        frame_head(&mut self.out, 8, GOAWAY, 0, 0);
        self.out.put_u32(last);
        self.out.put_u32(reason.into());
    }

    /// Writes `self.scratch` as a header block: HEADERS, then CONTINUATIONs if it is larger
    /// than the client's frames.
    fn write_header_block(&mut self, id: u32, end_stream: bool) {
        let block = std::mem::take(&mut self.scratch);
        let mut chunks = block.chunks(self.peer_max_frame).peekable();
        let mut kind = HEADERS;
        let mut flags = if end_stream { END_STREAM } else { 0 };
        // An empty block (trailers without fields) is still one frame.
        if block.is_empty() {
            frame_head(&mut self.out, 0, HEADERS, flags | END_HEADERS, id);
        }
        while let Some(chunk) = chunks.next() {
            if chunks.peek().is_none() {
                flags |= END_HEADERS;
            }
            frame_head(&mut self.out, chunk.len(), kind, flags, id);
            self.out.extend_from_slice(chunk);
            kind = CONTINUATION;
            flags = 0;
        }
        self.scratch = block;
    }

    fn write_data(&mut self, id: u32, end_stream: bool, chunk: Bytes) {
        frame_head(
            &mut self.out,
            chunk.len(),
            DATA,
            if end_stream { END_STREAM } else { 0 },
            id,
        );
        if chunk.len() < ZERO_COPY_AT {
            self.out.extend_from_slice(&chunk);
            return;
        }
        let built = self.out.split().freeze();
        self.queued += built.len() + chunk.len();
        self.queue.push_back(built);
        self.queue.push_back(chunk);
    }
}

fn frame_head(out: &mut BytesMut, len: usize, kind: u8, flags: u8, id: u32) {
    let len = len as u32;
    out.put_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    out.put_u32(id);
}

/// Fields meaningful only to one HTTP/1 connection: never in HTTP/2 (§8.2.2).
fn is_connection_specific(name: &HeaderName) -> bool {
    *name == header::CONNECTION
        || *name == header::TRANSFER_ENCODING
        || *name == header::UPGRADE
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// Whether a regular field may be in an HTTP/2 request: not connection-specific (TE only as
/// `trailers`), and its value without whitespace at either end (§8.2.1).
fn field_allowed(name: &HeaderName, value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    let padded =
        matches!(bytes.first(), Some(b' ' | b'\t')) || matches!(bytes.last(), Some(b' ' | b'\t'));
    if padded {
        return false;
    }
    if *name == header::TE {
        return bytes == b"trailers";
    }
    !is_connection_specific(name)
}

/// The request a header block describes, and its Content-Length; None when it is malformed
/// (§8.1.1), which resets the stream.
fn build_request(fields: &mut [(Field, usize)]) -> Option<(Request<()>, Option<u64>)> {
    let (mut method, mut scheme, mut authority, mut path) = (None, None, None, None);
    let mut headers: HeaderMap = HeaderMap::with_capacity(fields.len());
    let mut regular_seen = false;
    let mut cookies: Vec<HeaderValue> = Vec::new();
    for (field, _) in fields {
        match &field.name {
            Name::Pseudo(pseudo) => {
                if regular_seen {
                    return None;
                }
                let slot = match pseudo {
                    Pseudo::Method => &mut method,
                    Pseudo::Scheme => &mut scheme,
                    Pseudo::Authority => &mut authority,
                    Pseudo::Path => &mut path,
                    Pseudo::Other => return None,
                };
                if slot.replace(std::mem::take(&mut field.raw)).is_some() {
                    return None;
                }
            }
            Name::Field(name) => {
                regular_seen = true;
                let value = field.value.take()?;
                if !field_allowed(name, &value) {
                    return None;
                }
                if *name == header::COOKIE {
                    // Cookie crumbs are one field again for HTTP/1 (§8.2.3), joined once.
                    cookies.push(value);
                    continue;
                }
                headers.append(name.clone(), value);
            }
            Name::Invalid => return None,
        }
    }
    match cookies.len() {
        0 => {}
        1 => {
            headers.append(header::COOKIE, cookies.pop().expect("one"));
        }
        _ => {
            let mut joined = Vec::new();
            for (n, crumb) in cookies.iter().enumerate() {
                if n > 0 {
                    joined.extend_from_slice(b"; ");
                }
                joined.extend_from_slice(crumb.as_bytes());
            }
            headers.append(header::COOKIE, HeaderValue::from_bytes(&joined).ok()?);
        }
    }
    let method = match &method?[..] {
        b"GET" => Method::GET,
        b"HEAD" => Method::HEAD,
        b"POST" => Method::POST,
        other => Method::from_bytes(other).ok()?,
    };
    let uri = if method == Method::CONNECT {
        // Authority only (§8.5); Larder refuses the tunnel itself, with 501.
        if scheme.is_some() || path.is_some() {
            return None;
        }
        Uri::from_maybe_shared(authority?).ok()?
    } else {
        let (scheme, path) = (scheme?, path?);
        if path.is_empty() {
            return None;
        }
        let mut parts = http::uri::Parts::default();
        parts.path_and_query = Some(http::uri::PathAndQuery::from_maybe_shared(path).ok()?);
        if let Some(authority) = authority {
            if let Some(host) = headers.get(header::HOST)
                && host.as_bytes() != authority
            {
                return None;
            }
            parts.authority = Some(http::uri::Authority::from_maybe_shared(authority).ok()?);
            parts.scheme = Some(match &scheme[..] {
                b"https" => http::uri::Scheme::HTTPS,
                b"http" => http::uri::Scheme::HTTP,
                other => std::str::from_utf8(other).ok()?.parse().ok()?,
            });
        }
        Uri::from_parts(parts).ok()?
    };
    let content_length = match headers.get(header::CONTENT_LENGTH) {
        None => None,
        Some(value) => {
            if headers.get_all(header::CONTENT_LENGTH).iter().count() > 1 {
                return None;
            }
            let digits = value.as_bytes();
            if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
                return None;
            }
            Some(std::str::from_utf8(digits).ok()?.parse().ok()?)
        }
    };
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_2;
    *request.headers_mut() = headers;
    Some((request, content_length))
}

//! Downstream listeners: HTTP/1.1 and cleartext HTTP/2 (prior knowledge) on one port, with
//! explicit protocol limits and graceful drain.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use http::{Request, Version};
use hyper::body::Incoming;

use crate::body::boxed;
use crate::cork::{Batch, Corked};
use crate::head_deadline::{HeadClock, HeadDeadline, HeadTimedOut, Tracked};
use crate::http1::HeadLimits;
use crate::interim::{InterimIo, InterimSink};
use crate::workers::Workers;
use crate::{Proxy, ResponseWriter};

/// Connection-level limits, fixed when the listeners start (a reload does not change them).
#[derive(Debug, Clone)]
pub struct ServerLimits {
    pub max_request_header_size: usize,
    pub max_request_headers: usize,
    /// A client must finish sending its request head within this time.
    pub header_read_timeout: Duration,
    pub max_concurrent_streams: u32,
    /// How long in-flight requests get to finish once shutdown begins.
    pub drain_timeout: Duration,
    /// Client connections at once, over every listener sharing these limits.
    pub max_connections: usize,
    /// A response write making no progress this long ends the connection.
    pub client_write_timeout: Duration,
    /// An HTTP/2 connection with no stream open this long is closed.
    pub http2_idle_timeout: Duration,
    /// Which server answers HTTP/2: Larder's own ([`crate::http2`]), unless
    /// `LARDER_HTTP2_SERVER=hyper` asks for hyper's (kept to compare the two).
    pub own_http2: bool,
    /// Connections open now, shared by the listeners.
    open: Arc<AtomicUsize>,
}

impl ServerLimits {
    pub fn from_config(config: &larder_config::Config) -> ServerLimits {
        ServerLimits {
            max_request_header_size: config.limits.max_request_header_size as usize,
            max_request_headers: config.limits.max_request_headers,
            header_read_timeout: config.limits.header_read_timeout,
            max_concurrent_streams: MAX_CONCURRENT_STREAMS,
            drain_timeout: config.drain.timeout,
            max_connections: config.limits.max_connections,
            client_write_timeout: config.limits.client_write_timeout,
            http2_idle_timeout: config.limits.http2_idle_timeout,
            own_http2: std::env::var("LARDER_HTTP2_SERVER").map_or(true, |v| v != "hyper"),
            open: Arc::default(),
        }
    }

    /// The request-head limits both HTTP/1 servers (Larder's and hyper's) apply.
    fn http2_settings(&self) -> crate::http2::Settings {
        crate::http2::Settings {
            max_concurrent_streams: self.max_concurrent_streams,
            max_header_list_size: self.max_request_header_size,
            idle_timeout: self.http2_idle_timeout,
            stall_timeout: self.client_write_timeout,
        }
    }

    fn head_limits(&self) -> HeadLimits {
        HeadLimits {
            // hyper's floor for its read buffer is 8 KiB: the same limit for both.
            max_size: self.max_request_header_size.max(8192),
            max_headers: self.max_request_headers,
        }
    }
}

/// HTTP/2 streams a client may have open at once (Envoy and nginx use 100 to 128; a cache
/// answers fast, so a few more fit).
const MAX_CONCURRENT_STREAMS: u32 = 256;
/// RST_STREAMs of streams not yet accepted before the connection is closed (rapid reset,
/// CVE-2023-44487).
const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
/// Resets the server itself sends (to malformed streams) before closing with GOAWAY
/// (MadeYouReset, CVE-2025-8671).
const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 256;

/// hyper's limit on request header lines when none is set.
const HYPER_DEFAULT_MAX_HEADERS: usize = 100;

fn builder(limits: &ServerLimits) -> auto::Builder<InlineStreams> {
    let mut builder = auto::Builder::new(InlineStreams);
    let mut http1 = builder.http1();
    http1
        .timer(TokioTimer::new())
        // `HeadDeadline` enforces `header_read_timeout` instead, without a timer per request
        // (hyper would otherwise arm its own 30 s one).
        .header_read_timeout(None)
        .max_buf_size(limits.head_limits().max_size);
    // At hyper's own default (100) the parser uses uninitialised stack arrays; setting the
    // limit explicitly, even to 100, makes it build and zero two 100-entry vectors per request
    // (5% of a cache hit's CPU).
    if limits.max_request_headers != HYPER_DEFAULT_MAX_HEADERS {
        http1.max_headers(limits.max_request_headers);
    }
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(limits.max_request_header_size as u32)
        .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESET_STREAMS)
        .max_local_error_reset_streams(MAX_LOCAL_ERROR_RESET_STREAMS);
    builder
}

/// Serves until `shutdown` resolves, then stops accepting and lets open requests finish
/// (HTTP/1 connections close after their current response, HTTP/2 ones get GOAWAY).
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    limits: ServerLimits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) {
    let builder = builder(&limits);
    // Every connection holds a receiver: the drain is told by a send, and is over when all
    // are dropped.
    let (drain, draining) = tokio::sync::watch::channel(());
    let head_limits = limits.head_limits();
    let http2 = limits.own_http2.then(|| limits.http2_settings());
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Past the limit a connection is closed at once: cheaper than serving it, and the
        // clients already connected keep their share.
        let open = limits.open.clone();
        if open.fetch_add(1, Ordering::AcqRel) >= limits.max_connections {
            open.fetch_sub(1, Ordering::AcqRel);
            proxy.metrics.connection_limited("max_connections");
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let connection = Accepted {
            proxy: proxy.clone(),
            builder: builder.clone(),
            drain: draining.clone(),
            head_limits,
            http2,
            tls: tls.clone(),
            head_limit: limits.header_read_timeout,
            write_limit: limits.client_write_timeout,
            open,
            peer,
        };
        let Some(workers) = Workers::get() else {
            tokio::spawn(connection.run(stream));
            continue;
        };
        // Served on a connection thread from here on: the socket moves to its reactor.
        let Ok(stream) = stream.into_std() else {
            connection.open.fetch_sub(1, Ordering::AcqRel);
            continue;
        };
        workers.hand(move || match tokio::net::TcpStream::from_std(stream) {
            Ok(stream) => {
                tokio::spawn(connection.run(stream));
            }
            Err(e) => {
                connection.open.fetch_sub(1, Ordering::AcqRel);
                tracing::warn!(error = %e, "could not register an accepted connection");
            }
        });
    }
    drop(listener);
    drop(draining);
    let _ = drain.send(());
    if tokio::time::timeout(limits.drain_timeout, drain.closed())
        .await
        .is_err()
    {
        tracing::warn!("drain timeout: closing remaining connections");
    }
}

/// An accepted connection and what serving it needs, handed to a connection thread.
struct Accepted {
    proxy: Arc<Proxy>,
    builder: auto::Builder<InlineStreams>,
    drain: tokio::sync::watch::Receiver<()>,
    head_limits: HeadLimits,
    /// Larder's HTTP/2 server's settings; None: hyper's serves HTTP/2.
    http2: Option<crate::http2::Settings>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    head_limit: Duration,
    write_limit: Duration,
    open: Arc<AtomicUsize>,
    peer: std::net::SocketAddr,
}

impl Accepted {
    async fn run(self, stream: tokio::net::TcpStream) {
        let stream = WriteStallGuard::new(stream, self.write_limit);
        let write_stalled = stream.tripped.clone();
        let metrics = self.proxy.metrics.clone();
        let open = self.open.clone();
        metrics.connection_opened();
        let result = match self.tls.clone() {
            None => serve_connection(self, stream, "http").await,
            Some(acceptor) => {
                // A client that never finishes its handshake holds nothing for long.
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls_stream)) => serve_connection(self, tls_stream, "https").await,
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, client = %self.peer, "TLS handshake failed");
                        Ok(())
                    }
                    Err(_) => {
                        tracing::debug!(client = %self.peer, "TLS handshake timed out");
                        Ok(())
                    }
                }
            }
        };
        if let Err(e) = result {
            // Asked of the guard, not found in the error: h2 keeps only an I/O error's kind
            // and text, so the error an HTTP/2 connection ends with no longer names the stall.
            if write_stalled.load(Ordering::Relaxed) {
                metrics.connection_limited("write_stalled");
            } else if let Some((protocol, reason)) = protocol_error(&*e) {
                metrics.protocol_error(protocol, reason);
            }
            tracing::debug!(error = %e, "connection ended with an error");
        }
        metrics.connection_closed();
        open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How long a TLS client may take to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

type ConnectionError = Box<dyn std::error::Error + Send + Sync>;

/// Serves one accepted connection (plain or TLS) until it ends or the drain closes it: HTTP/1.1
/// requests without a body on [`crate::http1`]'s server, the rest of the connection on hyper's
/// once one is not. Boxed: proving the connection future `Send` inside an `async fn` trips the
/// compiler's higher-ranked lifetime check (rust-lang/rust#64552) once the stream executor is
/// generic.
fn serve_connection<S>(
    accepted: Accepted,
    stream: S,
    scheme: &'static str,
) -> Pin<Box<dyn Future<Output = Result<(), ConnectionError>> + Send>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let Accepted {
        proxy,
        builder,
        drain,
        head_limits,
        head_limit,
        peer,
        http2: own_http2,
        ..
    } = accepted;
    let interim = InterimSink::default();
    let head_clock = HeadClock::new(head_limit);
    let io = HeadDeadline::new(InterimIo::new(stream, interim.clone()), head_clock.clone());
    let service = {
        let (proxy, interim, head_clock) = (proxy.clone(), interim.clone(), head_clock.clone());
        service_fn(move |req: Request<Incoming>| {
            let proxy = proxy.clone();
            let head_clock = (req.version() != Version::HTTP_2).then(|| {
                head_clock.request_started();
                head_clock.clone()
            });
            // 1xx can only be relayed to HTTP/1.1 clients (never to 1.0; HTTP/2 would need
            // hyper support). Passed along directly, not in the request's extensions: that
            // would cost two allocations per request.
            let relay = (req.version() == Version::HTTP_11).then(|| {
                interim.request_started();
                interim.clone()
            });
            // The pipeline tells the sink when the final response and its body are done.
            async move {
                let response = proxy
                    .handle(
                        req.map(boxed),
                        Some(peer),
                        relay,
                        scheme,
                        ResponseWriter::Hyper,
                    )
                    .await
                    .response;
                Ok::<_, Infallible>(response.map(|body| Tracked::new(body, head_clock)))
            }
        })
    };
    let http2_proxy = proxy.clone();
    let fallback = move |io: crate::http1::Rewind<HeadDeadline<InterimIo<S>>>,
                         mut drain: tokio::sync::watch::Receiver<()>,
                         draining: bool| async move {
        if let Some(settings) = own_http2
            && io.is_http2()
        {
            return crate::http2::serve(io, http2_proxy, peer, scheme, settings, drain, draining)
                .await;
        }
        // HTTP/2's writes wait for the end of the task's poll (`WithStreams`): one system call
        // for all the responses a poll finished. Not HTTP/1's: hyper may end such a
        // connection without the shutdown that sends what is held.
        let http2 = io.is_http2();
        let corked = Corked::new(io, http2);
        let connection = builder.serve_connection(TokioIo::new(corked), service);
        let mut connection = std::pin::pin!(connection);
        if !draining {
            tokio::select! {
                biased;
                ended = connection.as_mut() => return ended,
                _ = drain.changed() => {}
            }
        }
        connection.as_mut().graceful_shutdown();
        connection.await
    };
    let connection = crate::http1::Connection {
        io,
        proxy,
        peer,
        scheme,
        clock: head_clock,
        interim,
        limits: head_limits,
        drain,
        fallback,
    };
    Box::pin(WithStreams {
        connection: connection.serve(),
        streams: futures_util::stream::FuturesUnordered::new(),
        ended: None,
    })
}

/// hyper's executor for HTTP/2 streams: a stream started while its connection is polled runs
/// inside that connection's task ([`WithStreams`]) rather than as a tokio task of its own, so
/// answering it costs no spawn and no wake-up of another task (often on another thread).
#[derive(Debug, Clone, Copy)]
pub struct InlineStreams;

type StreamFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

thread_local! {
    /// Whether a connection is being polled on this thread (a count, should polls nest).
    static POLLING: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    /// The streams hyper started during that poll, for the connection's task to take.
    static STARTED: std::cell::RefCell<Vec<StreamFuture>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

impl<F> hyper::rt::Executor<F> for InlineStreams
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, future: F) {
        let future: StreamFuture = Box::pin(future);
        if POLLING.get() > 0 {
            STARTED.with_borrow_mut(|started| started.push(future));
        } else {
            // Started outside a connection's poll (hyper does not, today): a task of its own.
            tokio::spawn(future);
        }
    }
}

pin_project_lite::pin_project! {
    /// A connection and the HTTP/2 streams it started, polled by one task. It ends when the
    /// connection and all its streams have.
    struct WithStreams<C: Future> {
        #[pin]
        connection: C,
        streams: futures_util::stream::FuturesUnordered<StreamFuture>,
        ended: Option<C::Output>,
    }
}

impl<C: Future> Future for WithStreams<C> {
    type Output = C::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let batch = Batch::begin();
        let polled = self.as_mut().poll_batch(cx);
        if batch.end() && polled.is_pending() {
            // What the batch wrote is held (`Corked`): the connection's flush sends it now.
            let this = self.project();
            if this.ended.is_none() {
                let (flushed, started) = poll_connection(this.connection, this.streams, cx);
                let ended = flushed.is_ready();
                if let Poll::Ready(output) = flushed {
                    *this.ended = Some(output);
                }
                if started || ended {
                    // New streams to start, or an end to report: the next poll does it.
                    cx.waker().wake_by_ref();
                }
            }
        }
        polled
    }
}

impl<C: Future> WithStreams<C> {
    fn poll_batch(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        use futures_util::StreamExt;
        let mut this = self.project();
        // Streams that finish give the connection frames to write: a few rounds here save a
        // trip through the scheduler (their wake-up of this task is pending anyway).
        for _ in 0..3 {
            if this.ended.is_none() {
                let (polled, _) = poll_connection(this.connection.as_mut(), this.streams, cx);
                if let Poll::Ready(output) = polled {
                    *this.ended = Some(output);
                }
            }
            // HTTP/1 connections never start any: they pay for this check only.
            if this.streams.is_empty() {
                return match this.ended.take() {
                    Some(output) => Poll::Ready(output),
                    None => Poll::Pending,
                };
            }
            let mut finished = false;
            while let Poll::Ready(Some(())) = this.streams.poll_next_unpin(cx) {
                finished = true;
            }
            if this.streams.is_empty()
                && let Some(output) = this.ended.take()
            {
                return Poll::Ready(output);
            }
            if !finished {
                break;
            }
        }
        Poll::Pending
    }
}

/// Polls a connection, moving the HTTP/2 streams hyper started meanwhile into `streams`.
/// Also says whether any started.
fn poll_connection<C: Future>(
    connection: Pin<&mut C>,
    streams: &mut futures_util::stream::FuturesUnordered<StreamFuture>,
    cx: &mut Context<'_>,
) -> (Poll<C::Output>, bool) {
    /// Ends the poll's mark, even when it unwinds (and then drops what the failed poll
    /// started: the next connection polled on this thread must not take it).
    struct Polling;
    impl Drop for Polling {
        fn drop(&mut self) {
            POLLING.set(POLLING.get() - 1);
            if std::thread::panicking() {
                STARTED.with_borrow_mut(Vec::clear);
            }
        }
    }
    POLLING.set(POLLING.get() + 1);
    let polling = Polling;
    let polled = connection.poll(cx);
    drop(polling);
    let started = STARTED.with_borrow_mut(|started| {
        if started.is_empty() {
            return false;
        }
        // Drained, not taken: the list keeps its capacity for the next poll.
        streams.extend(started.drain(..));
        true
    });
    (polled, started)
}

/// Ends a connection whose writes make no progress for `limit`: a client that stops reading
/// would otherwise hold its connection, and the response it stalls, forever. The timer exists
/// only while a write is blocked, so the fast path pays nothing.
struct WriteStallGuard<S> {
    inner: S,
    limit: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Set when the limit ended the connection.
    tripped: Arc<std::sync::atomic::AtomicBool>,
}

/// The error a stalled write ends the connection with.
#[derive(Debug, thiserror::Error)]
#[error("the client read nothing for {0:?} (limits.client_write_timeout)")]
struct WriteStalled(Duration);

/// Whether `T` (one of the IO wrappers' own errors) ended the connection: anywhere in the
/// chain, directly or inside the `io::Error` hyper wraps it in.
fn caused_by<T: std::error::Error + 'static>(e: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(e), |e| e.source()).any(|e| {
        e.is::<T>()
            || e.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .is_some_and(|inner| inner.is::<T>())
    })
}

impl<S> WriteStallGuard<S> {
    fn new(inner: S, limit: Duration) -> Self {
        WriteStallGuard {
            inner,
            limit,
            stalled: None,
            tripped: Arc::default(),
        }
    }

    /// Maps a write attempt's outcome: progress disarms the timer, a block arms it, and a
    /// block past the limit is an error.
    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        match polled {
            Poll::Ready(result) => {
                self.stalled = None;
                Poll::Ready(result)
            }
            Poll::Pending => {
                let limit = self.limit;
                let timer = self
                    .stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        self.tripped.store(true, Ordering::Relaxed);
                        Poll::Ready(Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            WriteStalled(limit),
                        )))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for WriteStallGuard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for WriteStallGuard<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Names the protocol error a connection ended with, for the metric: h2's error code, or what
/// hyper's HTTP/1 side reports. None for plain I/O endings (a client going away).
fn protocol_error(e: &(dyn std::error::Error + 'static)) -> Option<(&'static str, &'static str)> {
    let chain = || std::iter::successors(Some(e), |e| e.source());
    if let Some(reason) = chain().find_map(|e| e.downcast_ref::<h2::Error>()?.reason()) {
        let name = match u32::from(reason) {
            0 => "NO_ERROR",
            1 => "PROTOCOL_ERROR",
            2 => "INTERNAL_ERROR",
            3 => "FLOW_CONTROL_ERROR",
            4 => "SETTINGS_TIMEOUT",
            5 => "STREAM_CLOSED",
            6 => "FRAME_SIZE_ERROR",
            7 => "REFUSED_STREAM",
            8 => "CANCEL",
            9 => "COMPRESSION_ERROR",
            10 => "CONNECT_ERROR",
            11 => "ENHANCE_YOUR_CALM",
            12 => "INADEQUATE_SECURITY",
            13 => "HTTP_1_1_REQUIRED",
            _ => "unknown",
        };
        return Some(("h2", name));
    }
    if caused_by::<HeadTimedOut>(e) {
        return Some(("http1", "header_timeout"));
    }
    let hyper = chain().find_map(|e| e.downcast_ref::<hyper::Error>())?;
    if hyper.is_parse() || hyper.is_parse_too_large() {
        Some(("http1", "parse"))
    } else if hyper.is_timeout() {
        Some(("http1", "header_timeout"))
    } else {
        None
    }
}

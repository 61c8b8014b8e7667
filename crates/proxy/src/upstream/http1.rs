//! The HTTP/1.1 client side of a pooled upstream connection: a request head (and body) out, a
//! response head in, the body decoded as the caller reads it. Written here because hyper's
//! client connection cost about a third of a pass-through's instructions (19k of 60k: its
//! dispatcher, the channels between the request and the connection, the head encoding); this
//! one is driven by the request's own task, parses with httparse into header values that are
//! slices of the one read buffer, and hands body bytes on without copying them.
//!
//! Framing follows RFC 9112 §6: no body for HEAD, 1xx, 204 and 304; Transfer-Encoding over
//! Content-Length (and the connection closed after such a message); differing Content-Length
//! values refused; otherwise the body runs until the origin closes. A connection is reused only
//! after a response that ended where its framing said, with nothing unasked after it.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, Version};
use http_body::{Body, Frame};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWrite;

use super::MeteredIo;
use crate::body::{BoxError, ProxyBody};
use crate::headers::{HopFields, list_members};
use crate::interim::InterimSink;

/// As many response header lines as hyper's client accepts by default.
const MAX_HEADERS: usize = 100;
/// A response head (status line and fields) larger than this is refused.
const MAX_HEAD: usize = 128 * 1024;
/// The longest chunk-size line (with extensions) or trailer section taken.
const MAX_CHUNK_LINE: usize = 4 * 1024;
const MAX_TRAILERS: usize = 16 * 1024;
/// All chunk extensions of one body together (hyper's limit): an origin sending 1-byte chunks
/// with long extensions would otherwise have us scan kilobytes per byte of body.
const MAX_CHUNK_EXTENSIONS: usize = 16 * 1024;
/// How much is read at once: enough for a small response whole, bounded for large bodies.
const READ_MIN: usize = 8 * 1024;
const READ_MAX: usize = 64 * 1024;

/// What went wrong on the connection. `IncompleteHead` (closed or reset before a whole
/// response head) is what a pooled connection its origin had just closed looks like: an
/// idempotent request may go again.
#[derive(Debug, thiserror::Error)]
pub enum Http1Error {
    #[error("upstream connection closed before a complete response head")]
    IncompleteHead,
    #[error("invalid response head: {0}")]
    BadHead(&'static str),
    #[error("response head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("upstream connection closed before the response body ended")]
    IncompleteBody,
    #[error("invalid chunked response body: {0}")]
    BadChunk(&'static str),
    #[error("request body {0} than its Content-Length")]
    RequestBodyLength(&'static str),
    /// The I/O error is its source (shown after it).
    #[error("upstream connection failed")]
    Io(#[from] io::Error),
}

/// One open connection and its buffers.
pub(super) struct Conn {
    io: TokioIo<MeteredIo>,
    read: BytesMut,
    out: Vec<u8>,
    /// Since when it has been idle, while parked.
    pub(super) parked_at: Instant,
    /// The rest of a request body, still sent while the response is read (the origin answered
    /// before it had the whole upload; it may still be reading it). The connection closes
    /// after such an exchange.
    upload: Option<Upload>,
    /// Bytes of chunk extensions in the current response body (`MAX_CHUNK_EXTENSIONS`).
    extensions: usize,
    /// The response-head deadline's timer, kept for the connection's life and moved lazily
    /// (see `poll_deadline`). Armed while parked, it holds the last request's waker until it
    /// fires: one task kept at most a timeout longer per pooled connection.
    head_timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

struct Upload {
    writer: RequestWriter,
    body: Option<ProxyBody>,
}

/// A request that failed, and whether it never left (it may go on another connection).
pub(super) struct SendError {
    pub error: BoxError,
    pub unsent: bool,
}

/// How the body of a response ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    /// After this many more bytes.
    Length(u64),
    Chunked(Chunk),
    /// When the origin closes the connection.
    Close,
}

/// Where a chunked body's decoding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Chunk {
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    Trailers,
    End,
}

/// A response head read, and how its body is framed.
pub(super) struct Head {
    pub response: Response<()>,
    pub framing: Framing,
    /// Whether the connection can take another request once the body has ended.
    pub reusable: bool,
}

impl Conn {
    pub(super) fn new(io: MeteredIo, opened: Instant) -> Conn {
        Conn {
            io: TokioIo::new(io),
            read: BytesMut::new(),
            out: Vec::new(),
            parked_at: opened,
            upload: None,
            extensions: 0,
            head_timer: None,
        }
    }

    /// Ready once `deadline` has passed. The timer is not moved per request: each request's
    /// deadline is later than the last one's, so the timer stays armed at an earlier one and,
    /// when that one fires, moves on to the deadline now due. A tokio timer per request cost
    /// two locked timer-wheel updates, about 1.2k of a relayed request's 40k instructions
    /// (callgrind pass); this costs a reset per expiry, once per timeout per connection.
    fn poll_deadline(&mut self, deadline: tokio::time::Instant, cx: &mut Context<'_>) -> Poll<()> {
        let timer = self
            .head_timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        // An earlier deadline than the armed one (a route with a shorter timeout) moves it now.
        if timer.deadline() > deadline {
            timer.as_mut().reset(deadline);
        }
        loop {
            ready!(timer.as_mut().poll(cx));
            if tokio::time::Instant::now() >= deadline {
                return Poll::Ready(());
            }
            timer.as_mut().reset(deadline);
        }
    }

    /// Whether it can take a request now: nothing arrived unasked, and the origin has not
    /// closed it. Costs no system call when the last read drained the socket.
    pub(super) fn usable(&mut self) -> bool {
        if !self.read.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        self.read.reserve(READ_MIN);
        matches!(
            tokio_util::io::poll_read_buf(Pin::new(&mut self.io), &mut cx, &mut self.read),
            Poll::Pending
        )
    }

    /// Reads more into the buffer; `Ok(0)` when the origin has closed.
    fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        if self.read.capacity() - self.read.len() < want.min(READ_MIN) {
            self.read.reserve(want.clamp(READ_MIN, READ_MAX));
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read)
    }

    /// Writes the request (origin-form `target`, its fields, then the body, framed by its
    /// length when known and chunked when not) and reads until the final response head,
    /// handing 1xx interims to `interim` on the way, failing with `HeadTimedOut` at
    /// `deadline`.
    #[allow(clippy::too_many_arguments)]
    #[allow(clippy::manual_async_fn)] // its future stays small: see `Proxy::handle`
    pub(super) fn send(
        &mut self,
        method: &Method,
        target: &str,
        headers: &HeaderMap,
        hop: Option<&HopFields>,
        body: ProxyBody,
        interim: Option<&InterimSink>,
        deadline: tokio::time::Instant,
    ) -> impl Future<Output = Result<Head, SendError>> {
        async move {
            let mut body = (!body.is_end_stream()).then_some(body);
            let framing = self.write_head(method, target, headers, hop, body.as_ref());
            let mut writing = RequestWriter {
                written: 0,
                wrote_any: false,
                unflushed: false,
                chunked: framing.is_none(),
                remaining: framing.unwrap_or(0),
                failed: None,
                holding: body.is_some(),
            };
            let mut searched = 0;
            let mut head = std::future::poll_fn(|cx| {
                if let Err(error) = writing.poll(&mut self.io, &mut self.out, cx, &mut body) {
                    return Poll::Ready(Err(error));
                }
                loop {
                    match parse_head(&mut self.read, method, &mut searched) {
                        Ok(Some(head)) => {
                            if head.response.status().is_informational() {
                                if head.response.status() == StatusCode::SWITCHING_PROTOCOLS {
                                    return Poll::Ready(Err(SendError {
                                        error: Http1Error::BadHead(
                                            "101 to a request without Upgrade",
                                        )
                                        .into(),
                                        unsent: false,
                                    }));
                                }
                                if let Some(sink) = interim {
                                    sink.send(head.response.status(), head.response.headers());
                                }
                                continue;
                            }
                            return Poll::Ready(Ok(head));
                        }
                        Ok(None) => {}
                        Err(error) => {
                            return Poll::Ready(Err(SendError {
                                error: error.into(),
                                unsent: false,
                            }));
                        }
                    }
                    if self.read.len() > MAX_HEAD {
                        return Poll::Ready(Err(SendError {
                            error: Http1Error::HeadTooLarge.into(),
                            unsent: false,
                        }));
                    }
                    let filled = match self.poll_fill(cx, READ_MIN) {
                        Poll::Ready(filled) => filled,
                        Poll::Pending => {
                            if self.poll_deadline(deadline, cx).is_ready() {
                                // Sent, or partly: never replayed, as with any timeout.
                                return Poll::Ready(Err(SendError {
                                    error: Box::new(super::HeadTimedOut),
                                    unsent: false,
                                }));
                            }
                            return Poll::Pending;
                        }
                    };
                    match filled {
                        Ok(n) if n > 0 => {}
                        // Closed before a whole head: a write that failed meanwhile says why.
                        Ok(_) => {
                            let error = match writing.failed.take() {
                                Some(e) => Http1Error::Io(e),
                                None => Http1Error::IncompleteHead,
                            };
                            return Poll::Ready(Err(SendError {
                                error: error.into(),
                                unsent: !writing.wrote_any,
                            }));
                        }
                        Err(e) => {
                            return Poll::Ready(Err(SendError {
                                error: Http1Error::Io(e).into(),
                                unsent: !writing.wrote_any,
                            }));
                        }
                    }
                }
            })
            .await?;
            self.extensions = 0;
            if !writing.sent_all(&body, &self.out) {
                // A body not all sent leaves the connection mid-message: it goes on being sent
                // (as the body is read), and the connection closes after.
                head.reusable = false;
                if writing.failed.is_none() {
                    self.upload = Some(Upload {
                        writer: writing,
                        body,
                    });
                }
            }
            Ok(head)
        }
    }

    /// Encodes the request head into `out`; returns the body's length when it is declared
    /// (zero for none), `None` when it goes chunked.
    fn write_head(
        &mut self,
        method: &Method,
        target: &str,
        headers: &HeaderMap,
        hop: Option<&HopFields>,
        body: Option<&ProxyBody>,
    ) -> Option<u64> {
        let out = &mut self.out;
        out.clear();
        out.extend_from_slice(method.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(target.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        for (name, value) in headers {
            // Framing is this hop's, decided below from the body.
            if name == CONTENT_LENGTH || name == TRANSFER_ENCODING {
                continue;
            }
            crate::headers::push_field(out, name.as_str().as_bytes(), value.as_bytes());
        }
        if let Some(hop) = hop {
            hop.each(|name, value| {
                crate::headers::push_field(out, name.as_str().as_bytes(), value)
            });
        }
        let length = match body {
            None => {
                // RFC 9112 §6.3: a method that defines content says it has none.
                if matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
                    out.extend_from_slice(b"content-length: 0\r\n");
                }
                Some(0)
            }
            Some(body) => match body.size_hint().exact() {
                Some(len) => {
                    out.extend_from_slice(b"content-length: ");
                    out.extend_from_slice(itoa::Buffer::new().format(len).as_bytes());
                    out.extend_from_slice(b"\r\n");
                    Some(len)
                }
                None => {
                    out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                    None
                }
            },
        };
        out.extend_from_slice(b"\r\n");
        length
    }

    /// Moves the body's decoding on: the next data frame, trailers, or `None` at its end.
    pub(super) fn poll_body(
        &mut self,
        framing: &mut Framing,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Http1Error>>> {
        if let Some(upload) = &mut self.upload {
            // A failure here ends only the upload: the origin has answered already.
            let moved = upload
                .writer
                .poll(&mut self.io, &mut self.out, cx, &mut upload.body);
            if moved.is_err()
                || upload.writer.failed.is_some()
                || upload.writer.sent_all(&upload.body, &self.out)
            {
                self.upload = None;
            }
        }
        loop {
            match framing {
                Framing::Length(0) => return Poll::Ready(None),
                Framing::Length(remaining) => {
                    if !self.read.is_empty() {
                        let n = (*remaining).min(self.read.len() as u64) as usize;
                        *remaining -= n as u64;
                        return Poll::Ready(Some(Ok(Frame::data(self.read.split_to(n).freeze()))));
                    }
                    let want = usize::try_from(*remaining).unwrap_or(usize::MAX);
                    if ready!(self.poll_fill(cx, want))? == 0 {
                        return Poll::Ready(Some(Err(Http1Error::IncompleteBody)));
                    }
                }
                Framing::Close => {
                    if !self.read.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(self.read.split().freeze()))));
                    }
                    if ready!(self.poll_fill(cx, READ_MAX))? == 0 {
                        *framing = Framing::Length(0);
                    }
                }
                Framing::Chunked(chunk) => {
                    match decode_chunk(&mut self.read, chunk, &mut self.extensions)? {
                        Decoded::Frame(frame) => {
                            if *chunk == Chunk::End {
                                // Trailers were the last of it: the body has ended.
                                *framing = Framing::Length(0);
                            }
                            return Poll::Ready(Some(Ok(frame)));
                        }
                        Decoded::End => *framing = Framing::Length(0),
                        Decoded::NeedMore => {
                            if ready!(self.poll_fill(cx, READ_MIN))? == 0 {
                                return Poll::Ready(Some(Err(Http1Error::IncompleteBody)));
                            }
                        }
                    }
                }
            }
        }
    }

    /// Whether the buffer holds bytes after the message (the origin sent something unasked).
    pub(super) fn has_leftover(&self) -> bool {
        !self.read.is_empty()
    }
}

/// The request's writing, polled alongside the response's reading: an origin may answer
/// before it has read the whole body.
struct RequestWriter {
    /// Of `out`.
    written: usize,
    wrote_any: bool,
    /// Bytes written but not flushed (TLS keeps them in its own buffer until a flush).
    unflushed: bool,
    chunked: bool,
    /// Declared body bytes not yet sent.
    remaining: u64,
    /// A write that failed after some bytes left: the response may still come.
    failed: Option<io::Error>,
    /// The head waits for the body's first frame if that is ready at once: a body that
    /// turns out malformed (or too large) from its start never reaches the origin, and the
    /// two leave in one write. A body not ready does not hold the head back (an idle pooled
    /// connection could time out meanwhile).
    holding: bool,
}

impl RequestWriter {
    fn poll(
        &mut self,
        io: &mut TokioIo<MeteredIo>,
        out: &mut Vec<u8>,
        cx: &mut Context<'_>,
        body: &mut Option<ProxyBody>,
    ) -> Result<(), SendError> {
        if self.failed.is_some() {
            return Ok(());
        }
        loop {
            if !self.holding {
                while self.written < out.len() {
                    match Pin::new(&mut *io).poll_write(cx, &out[self.written..]) {
                        Poll::Ready(Ok(0)) => {
                            return self.fail(io::ErrorKind::WriteZero.into(), body);
                        }
                        Poll::Ready(Ok(n)) => {
                            self.written += n;
                            self.wrote_any = true;
                            self.unflushed = true;
                        }
                        Poll::Ready(Err(e)) => return self.fail(e, body),
                        Poll::Pending => return Ok(()),
                    }
                }
                out.clear();
                self.written = 0;
                if self.unflushed {
                    match Pin::new(&mut *io).poll_flush(cx) {
                        Poll::Ready(Ok(())) => self.unflushed = false,
                        Poll::Ready(Err(e)) => return self.fail(e, body),
                        Poll::Pending => return Ok(()),
                    }
                }
            }
            let Some(stream) = body else {
                return Ok(());
            };
            let frame = match Pin::new(stream).poll_frame(cx) {
                Poll::Pending if self.holding => {
                    self.holding = false;
                    continue;
                }
                Poll::Pending => return Ok(()),
                Poll::Ready(frame) => frame,
            };
            self.holding = false;
            let bad = |error: BoxError| SendError {
                error,
                unsent: false,
            };
            match frame {
                Some(Ok(frame)) => {
                    // Trailers of a request are not forwarded.
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if data.is_empty() {
                        continue;
                    }
                    if self.chunked {
                        let mut size = [0u8; 16];
                        let size = hex(data.len(), &mut size);
                        out.extend_from_slice(size);
                        out.extend_from_slice(b"\r\n");
                        out.extend_from_slice(&data);
                        out.extend_from_slice(b"\r\n");
                    } else {
                        if data.len() as u64 > self.remaining {
                            return Err(bad(Http1Error::RequestBodyLength("longer").into()));
                        }
                        self.remaining -= data.len() as u64;
                        out.extend_from_slice(&data);
                        if self.remaining == 0 {
                            // All that was declared: done, whether or not the body says so yet.
                            *body = None;
                        }
                    }
                }
                Some(Err(error)) => return Err(bad(error)),
                None => {
                    if self.chunked {
                        out.extend_from_slice(b"0\r\n\r\n");
                    } else if self.remaining > 0 {
                        return Err(bad(Http1Error::RequestBodyLength("shorter").into()));
                    }
                    *body = None;
                }
            }
        }
    }

    /// Whether the whole request has left: body ended, everything written and flushed.
    fn sent_all(&self, body: &Option<ProxyBody>, out: &[u8]) -> bool {
        body.is_none() && out.is_empty() && !self.unflushed && self.failed.is_none()
    }

    /// A write failed. Before any byte left, the request can go elsewhere at once; after,
    /// the response may yet explain (an origin refusing an upload closes early).
    fn fail(&mut self, error: io::Error, body: &mut Option<ProxyBody>) -> Result<(), SendError> {
        if !self.wrote_any {
            return Err(SendError {
                error: Http1Error::Io(error).into(),
                unsent: true,
            });
        }
        *body = None;
        self.failed = Some(error);
        Ok(())
    }
}

/// Lowercase hexadecimal of `n`, in `buf`.
fn hex(mut n: usize, buf: &mut [u8; 16]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b"0123456789abcdef"[n & 15];
        n >>= 4;
        if n == 0 {
            return &buf[at..];
        }
    }
}

/// Takes a complete response head off the front of `read`, if it is all there.
/// `searched`: how much of `read` holds no head end (see `head_end`).
fn parse_head(
    read: &mut BytesMut,
    method: &Method,
    searched: &mut usize,
) -> Result<Option<Head>, Http1Error> {
    let Some(end) = crate::http1::head_end(read, *searched) else {
        *searched = read.len();
        return Ok(None);
    };
    *searched = 0;
    if end > MAX_HEAD {
        return Err(Http1Error::HeadTooLarge);
    }
    let head = read.split_to(end).freeze();
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut parsed,
        &head,
        &mut slots,
    ) {
        // All of it: a head httparse ends early (it takes a bare LF as a line end too) would
        // leave its rest to be read as the body.
        Ok(httparse::Status::Complete(len)) if len == head.len() => {}
        Ok(_) => return Err(Http1Error::BadHead("incomplete")),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Http1Error::BadHead("more than 100 header fields"));
        }
        Err(_) => return Err(Http1Error::BadHead("does not parse")),
    }
    let status = parsed
        .code
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or(Http1Error::BadHead("status code"))?;
    let version = match parsed.version {
        Some(1) => Version::HTTP_11,
        _ => Version::HTTP_10,
    };
    // Room for the fields the proxy adds to a response it relays (Via, Cache-Status,
    // X-Request-Id, Age): growing the map then would rebuild its index.
    let mut headers = HeaderMap::with_capacity(parsed.headers.len() + 4);
    let (mut close_token, mut keep_alive_token) = (false, false);
    // `Some(whether the last coding is chunked)` once a Transfer-Encoding field is seen, even
    // an empty one: any such field makes Content-Length meaningless.
    let mut chunked: Option<bool> = None;
    let mut length: Option<u64> = None;
    let mut bad_length = false;
    for line in parsed.headers.iter() {
        let name = crate::headers::field_name(line.name.as_bytes())
            .map_err(|_| Http1Error::BadHead("field name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice_ref(line.value))
            .map_err(|_| Http1Error::BadHead("field value"))?;
        if name == CONNECTION {
            let tokens = crate::headers::connection_tokens(line.value);
            close_token |= tokens.close;
            keep_alive_token |= tokens.keep_alive;
            if !tokens.names_fields {
                continue;
            }
        } else if name == crate::headers::KEEP_ALIVE {
            // Hop-by-hop whatever Connection says (RFC 9112 §9.6 / RFC 2068 §19.7.1).
            continue;
        } else if name == TRANSFER_ENCODING {
            // Only the last coding says how the message ends.
            let last = list_members(line.value).last();
            chunked = Some(last.is_some_and(|coding| coding.eq_ignore_ascii_case(b"chunked")));
        } else if name == CONTENT_LENGTH {
            // An empty value is no length either.
            bad_length |= list_members(line.value).next().is_none();
            for member in list_members(line.value) {
                let parsed = std::str::from_utf8(member)
                    .ok()
                    .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|s| s.parse::<u64>().ok());
                match (parsed, length) {
                    (Some(n), None) => length = Some(n),
                    (Some(n), Some(seen)) if n == seen => {}
                    _ => bad_length = true,
                }
            }
        }
        headers.append(name, value);
    }
    // Close wins over keep-alive, whatever their order; HTTP/1.0 closes unless asked not to.
    let mut close = close_token || (version == Version::HTTP_10 && !keep_alive_token);
    if version == Version::HTTP_10 && chunked.is_some() {
        // RFC 9112 §6.1: faulty framing (HTTP/1.0 has no transfer codings).
        return Err(Http1Error::BadHead(
            "Transfer-Encoding in an HTTP/1.0 response",
        ));
    }
    let bodiless = *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let framing = if bodiless {
        Framing::Length(0)
    } else if let Some(chunked) = chunked {
        // With a Content-Length too, the message is suspect: the connection ends after it.
        close |= length.is_some() || bad_length;
        if chunked {
            Framing::Chunked(Chunk::Size)
        } else {
            Framing::Close
        }
    } else if bad_length {
        return Err(Http1Error::BadHead("invalid Content-Length"));
    } else if let Some(length) = length {
        Framing::Length(length)
    } else {
        Framing::Close
    };
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.version_mut() = version;
    *response.headers_mut() = headers;
    Ok(Some(Head {
        response,
        framing,
        reusable: !close && framing != Framing::Close,
    }))
}

/// What a chunked body's bytes so far gave.
enum Decoded {
    Frame(Frame<Bytes>),
    NeedMore,
    End,
}

/// Decodes what `read` holds of a chunked body, from where `chunk` says it is.
/// `extensions` counts the body's chunk-extension bytes so far.
fn decode_chunk(
    read: &mut BytesMut,
    chunk: &mut Chunk,
    extensions: &mut usize,
) -> Result<Decoded, Http1Error> {
    loop {
        match chunk {
            Chunk::Size => {
                let Some(eol) = memchr::memchr(b'\n', read) else {
                    if read.len() > MAX_CHUNK_LINE {
                        return Err(Http1Error::BadChunk("chunk-size line too long"));
                    }
                    return Ok(Decoded::NeedMore);
                };
                if eol > MAX_CHUNK_LINE {
                    return Err(Http1Error::BadChunk("chunk-size line too long"));
                }
                let line = read.split_to(eol + 1);
                let line = line
                    .strip_suffix(b"\r\n")
                    .ok_or(Http1Error::BadChunk("bare LF"))?;
                // A CR or other control byte inside is how request smuggling hides a line end.
                if line.iter().any(|b| b.is_ascii_control() && *b != b'\t') {
                    return Err(Http1Error::BadChunk(
                        "control character in a chunk-size line",
                    ));
                }
                // Extensions (`;name=value`) after the size are ignored, as RFC 9112 allows.
                let digits = line.split(|b| *b == b';').next().unwrap_or_default();
                *extensions += line.len() - digits.len();
                if *extensions > MAX_CHUNK_EXTENSIONS {
                    return Err(Http1Error::BadChunk("chunk extensions over 16 KiB"));
                }
                let digits = digits.trim_ascii_end();
                if digits.is_empty() || digits.len() > 15 {
                    return Err(Http1Error::BadChunk("chunk size"));
                }
                let mut size = 0u64;
                for digit in digits {
                    let value = (*digit as char)
                        .to_digit(16)
                        .ok_or(Http1Error::BadChunk("chunk size"))?;
                    size = size * 16 + u64::from(value);
                }
                *chunk = if size == 0 {
                    Chunk::Trailers
                } else {
                    Chunk::Data(size)
                };
            }
            Chunk::Data(left) => {
                if read.is_empty() {
                    return Ok(Decoded::NeedMore);
                }
                let n = (*left).min(read.len() as u64) as usize;
                *left -= n as u64;
                if *left == 0 {
                    *chunk = Chunk::DataEnd;
                }
                return Ok(Decoded::Frame(Frame::data(read.split_to(n).freeze())));
            }
            Chunk::DataEnd => {
                if read.len() < 2 {
                    return Ok(Decoded::NeedMore);
                }
                if &read[..2] != b"\r\n" {
                    return Err(Http1Error::BadChunk("no CRLF after chunk data"));
                }
                read.advance(2);
                *chunk = Chunk::Size;
            }
            Chunk::Trailers => {
                if read.starts_with(b"\r\n") {
                    read.advance(2);
                    *chunk = Chunk::End;
                    return Ok(Decoded::End);
                }
                // A section of fields, ended by an empty line.
                let Some(end) = memchr::memmem::find(read, b"\r\n\r\n") else {
                    if read.len() > MAX_TRAILERS {
                        return Err(Http1Error::BadChunk("trailer section too large"));
                    }
                    return Ok(Decoded::NeedMore);
                };
                if end + 4 > MAX_TRAILERS {
                    return Err(Http1Error::BadChunk("trailer section too large"));
                }
                let section = read.split_to(end + 4).freeze();
                let mut slots = [httparse::EMPTY_HEADER; 32];
                let fields = match httparse::parse_headers(&section, &mut slots) {
                    // All of it: httparse also ends a section at a bare-LF empty line.
                    Ok(httparse::Status::Complete((len, fields))) if len == section.len() => fields,
                    _ => return Err(Http1Error::BadChunk("trailer section")),
                };
                let mut trailers = HeaderMap::with_capacity(fields.len());
                for field in fields {
                    let (Ok(name), Ok(value)) = (
                        crate::headers::field_name(field.name.as_bytes()),
                        HeaderValue::from_maybe_shared(section.slice_ref(field.value)),
                    ) else {
                        return Err(Http1Error::BadChunk("trailer field"));
                    };
                    trailers.append(name, value);
                }
                *chunk = Chunk::End;
                return Ok(Decoded::Frame(Frame::trailers(trailers)));
            }
            Chunk::End => return Ok(Decoded::End),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8]) -> Result<(Vec<u8>, Option<HeaderMap>), Http1Error> {
        // Fed one byte at a time: every state must wait for more at every split.
        let mut read = BytesMut::new();
        let mut chunk = Chunk::Size;
        let mut body = Vec::new();
        let mut trailers = None;
        let mut extensions = 0;
        let mut bytes = input.iter();
        loop {
            match decode_chunk(&mut read, &mut chunk, &mut extensions)? {
                Decoded::Frame(frame) => match frame.into_data() {
                    Ok(data) => body.extend_from_slice(&data),
                    Err(frame) => trailers = frame.into_trailers().ok(),
                },
                Decoded::End => return Ok((body, trailers)),
                Decoded::NeedMore => match bytes.next() {
                    Some(b) => read.extend_from_slice(&[*b]),
                    None => return Err(Http1Error::IncompleteBody),
                },
            }
        }
    }

    fn assert_bad_chunk(input: &[u8]) {
        assert!(
            matches!(decode_all(input), Err(Http1Error::BadChunk(_))),
            "{:?}",
            String::from_utf8_lossy(input)
        );
    }

    #[test]
    fn chunked_bodies_decode_across_every_split() {
        let (body, trailers) =
            decode_all(b"5;ext=1\r\nhello\r\nB\r\n, chunked!!\r\n0\r\n\r\n").unwrap();
        assert_eq!(body, b"hello, chunked!!");
        assert!(trailers.is_none());
        let (body, trailers) = decode_all(b"3\r\nabc\r\n0\r\nx-sum: 12\r\n\r\n").unwrap();
        assert_eq!(body, b"abc");
        assert_eq!(trailers.unwrap()["x-sum"], "12");
    }

    #[test]
    fn malformed_chunked_bodies_are_refused() {
        for bad in [
            &b"x\r\n"[..],
            b"\r\n",
            b"3\r\nabcX\r\n",
            b"3\nabc\r\n0\r\n\r\n",
            b"fffffffffffffffff\r\n",
        ] {
            assert_bad_chunk(bad);
        }
        // Cut off inside a chunk, between chunks, and inside the trailer section.
        for cut in [&b"5\r\nhel"[..], b"5\r\nhello\r\n", b"0\r\nx-sum: 1\r\n"] {
            assert!(
                matches!(decode_all(cut), Err(Http1Error::IncompleteBody)),
                "{:?}",
                String::from_utf8_lossy(cut)
            );
        }
    }

    fn head(text: &str, method: Method) -> Result<Option<Head>, Http1Error> {
        parse_head(&mut BytesMut::from(text.as_bytes()), &method, &mut 0)
    }

    #[test]
    fn this_hops_connection_fields_are_read_and_left_out_of_the_map() {
        let fields = |text: &str| {
            let head = head(text, Method::GET).unwrap().unwrap();
            let names: Vec<String> = head
                .response
                .headers()
                .keys()
                .map(|n| n.to_string())
                .collect();
            (names, head.reusable)
        };
        let (names, reusable) = fields(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\
             Content-Length: 0\r\nX-Kept: 1\r\n\r\n",
        );
        assert_eq!(names, ["content-length", "x-kept"]);
        assert!(reusable);
        let (names, reusable) =
            fields("HTTP/1.1 200 OK\r\nConnection: Close\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(names, ["content-length"]);
        assert!(!reusable);
        // Naming another field: kept, so the relay drops that field too.
        let (names, reusable) = fields(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Private\r\nX-Private: 1\r\n\
             Content-Length: 0\r\n\r\n",
        );
        assert_eq!(names, ["connection", "x-private", "content-length"]);
        assert!(reusable);
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let framing = |text: &str, method| {
            let head = head(text, method).unwrap().unwrap();
            (head.framing, head.reusable)
        };
        // (head, method, framing, whether the connection may be reused after it)
        let cases = [
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
                Method::GET,
                Framing::Length(5),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
                Method::HEAD,
                Framing::Length(0),
                true,
            ),
            (
                "HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
                Method::GET,
                Framing::Length(0),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                Method::GET,
                Framing::Chunked(Chunk::Size),
                true,
            ),
            // Both: chunked wins, and the connection is not trusted after it.
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                Method::GET,
                Framing::Chunked(Chunk::Size),
                false,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
                Method::GET,
                Framing::Close,
                false,
            ),
            (
                "HTTP/1.1 200 OK\r\n\r\n",
                Method::GET,
                Framing::Close,
                false,
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\nConnection: close\r\n\r\n",
                Method::GET,
                Framing::Length(5),
                false,
            ),
            (
                "HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\n",
                Method::GET,
                Framing::Length(5),
                false,
            ),
            (
                "HTTP/1.0 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\n",
                Method::GET,
                Framing::Length(5),
                true,
            ),
        ];
        for (text, method, expected, reusable) in cases {
            assert_eq!(framing(text, method), (expected, reusable), "{text:?}");
        }
        for bad in ["5, 6", "-1", "+5", "5x", ""] {
            let text = format!("HTTP/1.1 200 OK\r\nContent-Length: {bad}\r\n\r\n");
            assert!(
                matches!(head(&text, Method::GET), Err(Http1Error::BadHead(_))),
                "{bad}"
            );
        }
        assert!(
            head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n", Method::GET)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_head_arriving_byte_by_byte_is_found_as_it_completes() {
        for text in [
            &b"HTTP/1.1 200 OK\r\nA: 1\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\nA: 1\n\n",
            b"HTTP/1.1 200 OK\nA: 1\n\r\n",
        ] {
            let mut read = BytesMut::new();
            let mut searched = 0;
            for (i, byte) in text.iter().enumerate() {
                read.extend_from_slice(&[*byte]);
                let head = parse_head(&mut read, &Method::GET, &mut searched).unwrap();
                assert_eq!(head.is_some(), i + 1 == text.len(), "{i}");
                if let Some(head) = head {
                    assert_eq!(head.response.headers()["a"], "1");
                    assert!(read.is_empty());
                }
            }
        }
    }

    #[test]
    fn ambiguous_framing_is_refused_or_never_trusted_with_another_response() {
        // HTTP/1.0 has no transfer codings: faulty framing (RFC 9112 §6.1).
        assert!(matches!(
            head(
                "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n",
                Method::GET
            ),
            Err(Http1Error::BadHead(_))
        ));
        // An empty Transfer-Encoding still overrides Content-Length: read to the close.
        let empty = head(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: \r\nContent-Length: 5\r\n\r\n",
            Method::GET,
        )
        .unwrap()
        .unwrap();
        assert_eq!((empty.framing, empty.reusable), (Framing::Close, false));
        // Close wins over keep-alive in either order.
        for fields in [
            "Connection: keep-alive\r\nConnection: close",
            "Connection: close\r\nConnection: keep-alive",
        ] {
            let text = format!("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n{fields}\r\n\r\n");
            assert!(
                !head(&text, Method::GET).unwrap().unwrap().reusable,
                "{fields}"
            );
        }
    }

    #[test]
    fn chunk_lines_with_control_bytes_or_over_the_limit_are_refused() {
        for bad in [
            &b"5;a\rb\r\nhello\r\n0\r\n\r\n"[..],
            b"5\r\r\nhello\r\n0\r\n\r\n",
            b"5;a\x00\r\nhello\r\n0\r\n\r\n",
            // Trailers ended by a bare LF, with bytes after them.
            b"0\r\nA: b\n\nJUNK\r\n\r\n",
        ] {
            assert_bad_chunk(bad);
        }
        let long = format!("5;{}\r\nhello\r\n0\r\n\r\n", "x".repeat(MAX_CHUNK_LINE));
        let mut read = BytesMut::from(long.as_bytes());
        assert!(matches!(
            decode_chunk(&mut read, &mut Chunk::Size, &mut 0),
            Err(Http1Error::BadChunk(_))
        ));
        // Each line within its limit, but together past the body's.
        let chunk = format!("1;{}\r\nx\r\n", "e".repeat(1000));
        let many = format!("{}0\r\n\r\n", chunk.repeat(17));
        assert!(matches!(
            decode_all(many.as_bytes()),
            Err(Http1Error::BadChunk(_))
        ));
        let few = format!("{}0\r\n\r\n", chunk.repeat(16));
        assert_eq!(decode_all(few.as_bytes()).unwrap().0, b"x".repeat(16));
        // Tabs in an extension are whitespace, not control bytes to refuse.
        assert_eq!(
            decode_all(b"5;\ta=b\r\nhello\r\n0\r\n\r\n").unwrap().0,
            b"hello"
        );
    }

    #[test]
    fn header_values_are_slices_of_the_read_buffer() {
        let mut read =
            BytesMut::from(&b"HTTP/1.1 200 OK\r\nX-A: 1\r\nContent-Length: 2\r\n\r\nhi"[..]);
        let head = parse_head(&mut read, &Method::GET, &mut 0)
            .unwrap()
            .unwrap();
        assert_eq!(head.response.headers()["x-a"], "1");
        assert_eq!(&read[..], b"hi");
    }
}

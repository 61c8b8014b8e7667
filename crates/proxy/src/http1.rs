//! The HTTP/1.1 server for requests without a body (GET, HEAD: nearly all of a cache's
//! traffic). Written here because hyper's general-purpose server took about half of a cache
//! hit's instructions (10k of 21k: its dispatcher state machine, buffering and head encoding).
//!
//! It takes only what it can answer exactly as hyper would. Anything else (a request with a
//! body or `Expect`, `Upgrade`, CONNECT, HTTP/1.0, a target not in origin form, the HTTP/2
//! preface, a head that does not parse or is over the limits) hands the connection to hyper,
//! with the bytes already read, for the rest of its life: errors, upgrades and the rarer
//! features keep hyper's behaviour, and the two never share a connection at once.

use std::future::Future;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, DATE, EXPECT, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Uri};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;

use crate::body::ProxyBody;
use crate::head_deadline::HeadClock;
use crate::headers::lists_token;
use crate::interim::InterimSink;
use crate::{Answer, Proxy, ResponseWriter};

type ConnectionError = Box<dyn std::error::Error + Send + Sync>;

/// Header lines parsed without a heap allocation; a head with more goes to hyper, which
/// applies the configured limit.
const INLINE_HEADERS: usize = 64;
/// Body data up to this size is copied next to the head (one write for both); larger frames
/// are written from where they are.
const COPY_LIMIT: usize = 16 * 1024;
/// Buffered response bytes written out once they reach this much.
const WRITE_AT: usize = 64 * 1024;

/// Limits on a request head, the same hyper is configured with.
#[derive(Debug, Clone, Copy)]
pub struct HeadLimits {
    pub max_size: usize,
    pub max_headers: usize,
}

/// What serving one connection needs.
pub struct Connection<S, F> {
    pub io: S,
    pub proxy: Arc<Proxy>,
    pub peer: SocketAddr,
    pub scheme: &'static str,
    pub clock: Arc<HeadClock>,
    pub interim: InterimSink,
    pub limits: HeadLimits,
    /// Changes (or closes) when the listener drains.
    pub drain: watch::Receiver<()>,
    /// Serves the rest of the connection with hyper: given the stream (its bytes already read
    /// put back), the drain signal, and whether the drain has begun.
    pub fallback: F,
}

/// The stream with bytes already read from it put back in front, for hyper.
pub struct Rewind<S> {
    read: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    /// Whether the connection opened with HTTP/2's whole preface, the 24 bytes hyper's protocol
    /// choice reads. Corking relies on this: hyper's HTTP/1 may end a connection without
    /// flushing. A preface read only in part is not corked (it costs batching, nothing else).
    pub fn is_http2(&self) -> bool {
        self.read.starts_with(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read[..n]);
            self.read.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S, F, C> Connection<S, F>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: FnOnce(Rewind<S>, watch::Receiver<()>, bool) -> C,
    C: Future<Output = Result<(), ConnectionError>>,
{
    /// Serves requests until the client closes, the drain ends an idle connection, or one
    /// request hands the connection to hyper.
    pub async fn serve(self) -> Result<(), ConnectionError> {
        let Connection {
            mut io,
            proxy,
            peer,
            scheme,
            clock,
            interim,
            limits,
            drain,
            fallback,
        } = self;
        let mut read = BytesMut::with_capacity(8 * 1024);
        let mut out: Vec<u8> = Vec::with_capacity(4 * 1024);
        let mut draining = false;
        // One wait for the drain per connection, not one per request: each new wait registers
        // with (and each dropped one leaves) a waiter list all connections share.
        let mut drain_signal = drain.clone();
        let mut drained = std::pin::pin!(drain_signal.changed());
        loop {
            // The next head: complete in what was read, or read until it is.
            let mut searched = 0;
            let end = loop {
                if let Some(end) = head_end(&read, searched) {
                    break Some(end);
                }
                searched = read.len();
                if read.len() >= limits.max_size {
                    break None;
                }
                if !out.is_empty() {
                    flush(&mut io, &mut out).await?;
                }
                draining |= drain.has_changed().unwrap_or(true);
                if draining && read.is_empty() {
                    return Ok(());
                }
                if read.capacity() - read.len() < 1024 {
                    read.reserve(8 * 1024);
                }
                let n = if read.is_empty() {
                    tokio::select! {
                        biased;
                        n = io.read_buf(&mut read) => n?,
                        _ = &mut drained, if !draining => {
                            draining = true;
                            continue;
                        }
                    }
                } else {
                    io.read_buf(&mut read).await?
                };
                if n == 0 {
                    // The client closed: between requests, the normal end; within a head,
                    // hyper's error reporting applies.
                    if read.is_empty() {
                        io.write_all(&out).await?;
                        return Ok(());
                    }
                    break None;
                }
            };
            let next = match end {
                Some(end) if end <= limits.max_size => {
                    let head = read.split_to(end).freeze();
                    match parse(&head, limits.max_headers) {
                        Some(parsed) => Some(parsed),
                        None => {
                            // Handed back whole, the head first.
                            let mut rest = BytesMut::with_capacity(head.len() + read.len());
                            rest.extend_from_slice(&head);
                            rest.extend_from_slice(&read);
                            read = rest;
                            None
                        }
                    }
                }
                _ => None,
            };
            let (request, client_close) = match next {
                Some(parsed) => parsed,
                // Not for this server: hyper gets the connection.
                None => {
                    io.write_all(&out).await?;
                    let rewound = Rewind {
                        read: read.freeze(),
                        inner: io,
                    };
                    return fallback(rewound, drain, draining).await;
                }
            };
            let head_only = request.method() == Method::HEAD;
            clock.request_started();
            interim.request_started();
            // Made where it is pinned: the future is 3 KB, and a move is a copy.
            let mut handled = std::pin::pin!(proxy.clone().handle(
                request,
                Some(peer),
                Some(interim.clone()),
                scheme,
                ResponseWriter::Lines,
            ));
            let answer = match futures_util::FutureExt::now_or_never(handled.as_mut()) {
                Some(answer) => answer,
                None => {
                    // Earlier pipelined responses go out before this one is waited for.
                    if !out.is_empty() {
                        flush(&mut io, &mut out).await?;
                    }
                    await_relaying_interims(handled, &mut io).await
                }
            };
            draining |= drain.has_changed().unwrap_or(true);
            let close = client_close || draining;
            let close = write_response(&mut io, &mut out, answer, head_only, close).await?;
            clock.request_finished();
            if close {
                io.write_all(&out).await?;
                let _ = io.shutdown().await;
                return Ok(());
            }
            // Pipelined requests already read are answered before anything is written.
            if read.is_empty() || out.len() >= WRITE_AT {
                flush(&mut io, &mut out).await?;
            }
        }
    }
}

/// Waits for the response, meanwhile letting the connection's IO write 1xx interims the
/// origin sends (`InterimIo` writes them when flushed).
async fn await_relaying_interims<S: AsyncWrite + Unpin>(
    mut handled: Pin<&mut impl Future<Output = Answer>>,
    io: &mut S,
) -> Answer {
    let mut relaying = true;
    std::future::poll_fn(|cx| {
        if let Poll::Ready(response) = handled.as_mut().poll(cx) {
            return Poll::Ready(response);
        }
        // A client gone shows when the response is written; the request is not cut short.
        if relaying && let Poll::Ready(Err(_)) = Pin::new(&mut *io).poll_flush(cx) {
            relaying = false;
        }
        Poll::Pending
    })
    .await
}

/// Where the head in `read` ends (after its empty line), if it is all there. `searched`: how
/// much of `read` an earlier call already found no end in, so a head arriving in many small
/// reads is scanned once, not once per read (quadratic in its size).
///
/// The end is the first line end followed by an empty line, `\n\r\n` or (bare) `\n\n`.
pub(crate) fn head_end(read: &[u8], searched: usize) -> Option<usize> {
    // An end found now may begin up to two bytes before the new ones (`\n\r` + `\n`).
    let from = searched.saturating_sub(2).min(read.len());
    let rest = &read[from..];
    // Line by line (a `memchr` each) costs less for a few lines, as a load generator's bare
    // GET has; a browser's dozen fields take two vectorised substring searches instead
    // (callgrind hit-browser: 27.7k -> 26.9k instructions per request).
    let end = if rest.len() <= 128 {
        end_by_lines(rest)
    } else {
        end_by_search(rest)
    };
    end.map(|end| from + end)
}

fn end_by_lines(rest: &[u8]) -> Option<usize> {
    memchr::memchr_iter(b'\n', rest).find_map(|at| match rest.get(at + 1) {
        Some(b'\n') => Some(at + 2),
        Some(b'\r') if rest.get(at + 2) == Some(&b'\n') => Some(at + 3),
        _ => None,
    })
}

fn end_by_search(rest: &[u8]) -> Option<usize> {
    static CRLF_END: LazyLock<memchr::memmem::Finder<'static>> =
        LazyLock::new(|| memchr::memmem::Finder::new(b"\n\r\n"));
    static LF_END: LazyLock<memchr::memmem::Finder<'static>> =
        LazyLock::new(|| memchr::memmem::Finder::new(b"\n\n"));
    let crlf = CRLF_END.find(rest);
    // A bare one counts only before the first CRLF one (it may not be there at all).
    let before = crlf.map_or(rest.len(), |at| at + 1);
    match LF_END.find(&rest[..before]) {
        Some(at) => Some(at + 2),
        None => crlf.map(|at| at + 3),
    }
}

/// The request in a complete head, if it is one this server takes, with whether the client
/// asked to close after it.
fn parse(head: &Bytes, max_headers: usize) -> Option<(Request<ProxyBody>, bool)> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; INLINE_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    match parsed.parse_with_uninit_headers(head, &mut slots) {
        Ok(httparse::Status::Complete(len)) if len == head.len() => {}
        _ => return None,
    }
    if parsed.version != Some(1) || parsed.headers.len() > max_headers {
        return None;
    }
    let method = Method::from_bytes(parsed.method?.as_bytes()).ok()?;
    if method == Method::CONNECT {
        return None;
    }
    let path = parsed.path?;
    if !path.starts_with('/') {
        return None;
    }
    let uri = Uri::from_maybe_shared(head.slice_ref(path.as_bytes())).ok()?;
    // Room for the fields a forwarded request may gain in its map (a revalidation's
    // validators, a trace context): growing the map then would move every entry.
    let mut headers = HeaderMap::with_capacity(parsed.headers.len() + 4);
    let mut close = false;
    for line in parsed.headers.iter() {
        let name = crate::headers::field_name(line.name.as_bytes()).ok()?;
        if name == TRANSFER_ENCODING || name == EXPECT || name == UPGRADE {
            return None;
        }
        // Only an explicit empty body: anything else is hyper's to frame (or refuse).
        if name == CONTENT_LENGTH && (line.value != b"0" || headers.contains_key(CONTENT_LENGTH)) {
            return None;
        }
        if name == CONNECTION {
            let tokens = crate::headers::connection_tokens(line.value);
            close |= tokens.close;
            if !tokens.names_fields {
                continue;
            }
        }
        let value = HeaderValue::from_maybe_shared(head.slice_ref(line.value)).ok()?;
        headers.append(name, value);
    }
    let mut request = Request::new(crate::body::empty());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    Some((request, close))
}

/// Writes the response into `out` (and the socket, past `WRITE_AT` or while the body waits
/// for data). Framing follows hyper's server: Content-Length when it is known, chunked when
/// not, no body for HEAD, 204 and 304. A stored response's lines go first, as they are.
/// Returns whether the connection must close after it.
async fn write_response<S: AsyncWrite + Unpin>(
    io: &mut S,
    out: &mut Vec<u8>,
    answer: Answer,
    head_only: bool,
    mut close: bool,
) -> Result<bool, ConnectionError> {
    use std::io::Write as _;
    let (parts, mut body) = answer.response.into_parts();
    let status = parts.status;
    // As hyper: 204 and 304 carry no length and no body; HEAD keeps the length, sends no body.
    let no_length = status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let bodiless = head_only || no_length;
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut declared: Option<u64> = None;
    let mut has_date = false;
    let mut has_close = false;
    if let Some(lines) = &answer.stored_lines {
        // The map of a response with lines holds at most a drain's `Connection: close`: any
        // other field there could repeat one of the lines.
        debug_assert!(parts.headers.keys().all(|n| n == CONNECTION), "{parts:?}");
        // Stored without framing fields (Content-Length, Transfer-Encoding, Connection).
        out.extend_from_slice(&lines.stored);
        has_date = lines.has_date;
        if !no_length {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(lines.content_length).as_bytes());
            out.extend_from_slice(b"\r\n");
            declared = Some(lines.content_length);
        }
    }
    for (name, value) in &parts.headers {
        if *name == TRANSFER_ENCODING {
            // Framing is this hop's business, decided below.
            continue;
        }
        if *name == CONTENT_LENGTH {
            if no_length || declared.is_some() {
                continue;
            }
            match value.to_str().ok().and_then(|v| v.parse::<u64>().ok()) {
                Some(len) => declared = Some(len),
                None => continue,
            }
        } else if *name == DATE {
            has_date = true;
        } else if *name == CONNECTION {
            has_close |= lists_token(value.as_bytes(), b"close");
        }
        crate::headers::push_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    out.extend_from_slice(&answer.added_lines);
    if !has_date {
        out.extend_from_slice(b"date: ");
        date::append(out);
        out.extend_from_slice(b"\r\n");
    }
    close |= has_close;
    if close && !has_close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    let exact = body.size_hint().exact();
    let chunked = !bodiless && declared.is_none() && exact.is_none();
    if declared.is_none()
        && !no_length
        && let Some(len) = exact
    {
        // An empty body's zero is implied for HEAD (the length of a GET is not known here).
        if len > 0 || !head_only {
            let _ = write!(out, "content-length: {len}\r\n");
        }
        declared = Some(len);
    }
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if bodiless {
        return Ok(close);
    }
    let expected = declared;
    let mut sent: u64 = 0;
    loop {
        let frame = match futures_util::FutureExt::now_or_never(http_body_util::BodyExt::frame(
            &mut body,
        )) {
            Some(frame) => frame,
            None => {
                // Data still to come (a fill or a pass streaming from the origin): what is
                // ready goes to the client now.
                flush(io, out).await?;
                http_body_util::BodyExt::frame(&mut body).await
            }
        };
        let data = match frame {
            None => break,
            Some(Err(e)) => {
                // Cut short: the client must not take a truncated body for a whole one.
                flush(io, out).await?;
                return Err(e);
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                // Trailers are not forwarded over HTTP/1.
                Err(_) => continue,
            },
        };
        if data.is_empty() {
            continue;
        }
        sent += data.len() as u64;
        if expected.is_some_and(|len| sent > len) {
            flush(io, out).await?;
            return Err("response body longer than its Content-Length".into());
        }
        if chunked {
            let _ = write!(out, "{:x}\r\n", data.len());
        }
        if data.len() <= COPY_LIMIT {
            out.extend_from_slice(&data);
        } else {
            write_pair(io, out, &data).await?;
            out.clear();
        }
        if chunked {
            out.extend_from_slice(b"\r\n");
        }
        if out.len() >= WRITE_AT {
            flush(io, out).await?;
        }
    }
    if chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    if expected.is_some_and(|len| sent < len) {
        flush(io, out).await?;
        return Err("response body shorter than its Content-Length".into());
    }
    Ok(close)
}

/// Writes what is buffered in `out` and empties it.
async fn flush<S: AsyncWrite + Unpin>(io: &mut S, out: &mut Vec<u8>) -> io::Result<()> {
    io.write_all(out).await?;
    out.clear();
    Ok(())
}

/// Writes `first` then `second`, in one system call when the stream takes vectors.
async fn write_pair<S: AsyncWrite + Unpin>(
    io: &mut S,
    first: &[u8],
    second: &[u8],
) -> io::Result<()> {
    let (mut first, mut second) = (first, second);
    while !first.is_empty() {
        let n = io
            .write_vectored(&[IoSlice::new(first), IoSlice::new(second)])
            .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        if n < first.len() {
            first = &first[n..];
        } else {
            second = &second[n - first.len()..];
            first = &[];
        }
    }
    io.write_all(second).await
}

/// The `Date` header's value, formatted once a second per thread (as hyper does).
pub(crate) mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }

    pub fn append(out: &mut Vec<u8>) {
        let now = SystemTime::now();
        let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        CACHED.with_borrow_mut(|(at, text)| {
            if *at != second || text.is_empty() {
                *at = second;
                *text = httpdate::fmt_http_date(now);
            }
            out.extend_from_slice(text.as_bytes());
        });
    }
}

#[cfg(test)]
mod tests {
    use super::head_end;

    /// The definition: the first `\n` followed by `\n` or `\r\n`, looking from two bytes
    /// before what was searched already.
    fn head_end_by_lines(read: &[u8], searched: usize) -> Option<usize> {
        let from = searched.saturating_sub(2).min(read.len());
        (from..read.len()).find_map(|at| match (read[at], read.get(at + 1), read.get(at + 2)) {
            (b'\n', Some(b'\n'), _) => Some(at + 2),
            (b'\n', Some(b'\r'), Some(b'\n')) => Some(at + 3),
            _ => None,
        })
    }

    #[test]
    fn head_ends_are_found_as_the_definition_finds_them() {
        // Every string of up to 9 bytes over the three that matter, from every resume point,
        // as is and behind 200 bytes of a long head (the other way of searching).
        let alphabet = [b'a', b'\r', b'\n'];
        let long_start = [b'x'; 200];
        for len in 0..=9u32 {
            for mut code in 0..3usize.pow(len) {
                let mut read = Vec::with_capacity(len as usize);
                for _ in 0..len {
                    read.push(alphabet[code % 3]);
                    code /= 3;
                }
                let long = [&long_start[..], &read].concat();
                for searched in 0..=read.len() + 1 {
                    assert_eq!(
                        head_end(&read, searched),
                        head_end_by_lines(&read, searched),
                        "{read:?} searched {searched}"
                    );
                    let searched = searched + long_start.len();
                    assert_eq!(
                        head_end(&long, searched),
                        head_end_by_lines(&long, searched),
                        "long {read:?} searched {searched}"
                    );
                    assert_eq!(
                        super::end_by_search(&read),
                        head_end_by_lines(&read, 0),
                        "{read:?}"
                    );
                }
            }
        }
        let head = b"GET / HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\nGET /next HTTP/1.1\r\n\r\n";
        assert_eq!(head_end(head, 0), Some(40));
        assert_eq!(head_end(&head[..39], 0), None);
    }
}

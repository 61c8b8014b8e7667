//! What is learnt about one request on its way through, and the one place it turns into the
//! `Cache-Status` header and the request event.

use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::{Method, Request, Version, header};
use larder_cache::{CacheResult, NoCacheReason};
use larder_telemetry::RequestEvent;

use super::{REQUEST_ID, ResponseWriter, StoredLines};

/// RFC 9211 `fwd` values: why the request went forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Forward {
    Bypass,
    Method,
    UriMiss,
    VaryMiss,
    /// The client's directives (no-cache, max-age=0…) required it.
    Request,
    Stale,
}

impl Forward {
    fn as_str(self) -> &'static str {
        match self {
            Forward::Bypass => "bypass",
            Forward::Method => "method",
            Forward::UriMiss => "uri-miss",
            Forward::VaryMiss => "vary-miss",
            Forward::Request => "request",
            Forward::Stale => "stale",
        }
    }
}

/// The wall-clock time and the monotonic instant of now, for one clock read (every request needs
/// both; clock reads were 2.5% of a cache hit's CPU): the wall clock is derived from a
/// per-thread pair read at most a second earlier, so it trails a step of the system clock by
/// under a second.
fn now() -> (SystemTime, Instant) {
    thread_local! {
        static ANCHOR: Cell<Option<(Instant, SystemTime)>> = const { Cell::new(None) };
    }
    let instant = Instant::now();
    ANCHOR.with(|anchor| {
        if let Some((at, wall)) = anchor.get() {
            let since = instant.saturating_duration_since(at);
            if since < Duration::from_secs(1) {
                return (wall + since, instant);
            }
        }
        let wall = SystemTime::now();
        anchor.set(Some((instant, wall)));
        (wall, instant)
    })
}

pub(crate) struct Exchange {
    pub start: SystemTime,
    pub started: Instant,
    pub request_id: String,
    pub trace_id: Option<String>,
    pub client: Option<SocketAddr>,
    pub method: Method,
    pub version: Version,
    pub host: String,
    pub path: String,
    pub query: Option<String>,
    pub user_agent: Option<String>,
    pub route: Option<Arc<str>>,
    pub cluster: Option<Arc<str>>,
    pub upstream_address: Option<Arc<str>>,
    pub upstream_duration: Option<Duration>,
    pub result: CacheResult,
    pub reason: Option<NoCacheReason>,
    pub resource_type: Option<Arc<str>>,
    pub fwd: Option<Forward>,
    /// Status the origin answered with, when it was asked.
    pub fwd_status: Option<u16>,
    pub stored: bool,
    pub collapsed: bool,
    pub ttl: Option<i64>,
    /// Why a stale response was served (`stale-while-revalidate`, `stale-if-error`).
    pub stale_reason: Option<&'static str>,
    /// The cache key, shown in Cache-Status when `cache.cache_status_key` is on.
    pub key: Option<String>,
    /// Outcome of a conditional request for a stale stored response: `not_modified`,
    /// `modified` or `failed`.
    pub revalidation: Option<&'static str>,
    /// The request's server span, when tracing is on.
    pub span: Option<larder_telemetry::RequestSpan>,
    /// `http`, or `https` on a TLS listener.
    pub scheme: &'static str,
    pub writer: ResponseWriter,
    /// A hit's stored fields as HTTP/1 lines, when the writer takes them.
    pub stored_lines: Option<StoredLines>,
    /// The fields this hop adds, as lines (see [`super::Answer::added_lines`]).
    pub added_lines: Vec<u8>,
}

impl Exchange {
    pub fn new<B>(req: &Request<B>, client: Option<SocketAddr>) -> Exchange {
        let [id, traceparent, user_agent] = larder_cache::fields::find_each(
            req.headers(),
            [
                &REQUEST_ID,
                &crate::headers::TRACEPARENT,
                &header::USER_AGENT,
            ],
        );
        fn text(value: Option<&http::HeaderValue>) -> Option<&str> {
            value.and_then(|v| v.to_str().ok())
        }
        let request_id = text(id)
            .filter(|id| !id.is_empty() && id.len() <= 128)
            .map(str::to_owned)
            .unwrap_or_else(larder_telemetry::new_request_id);
        let (start, started) = now();
        Exchange {
            start,
            started,
            request_id,
            trace_id: text(traceparent).and_then(larder_telemetry::trace_id_from_traceparent),
            client,
            method: req.method().clone(),
            version: req.version(),
            host: String::new(),
            path: req.uri().path().to_owned(),
            query: req.uri().query().map(str::to_owned),
            user_agent: text(user_agent).map(str::to_owned),
            route: None,
            cluster: None,
            upstream_address: None,
            upstream_duration: None,
            result: CacheResult::Bypass,
            reason: None,
            resource_type: None,
            fwd: None,
            fwd_status: None,
            stored: false,
            collapsed: false,
            ttl: None,
            stale_reason: None,
            key: None,
            revalidation: None,
            span: None,
            scheme: "http",
            writer: ResponseWriter::Hyper,
            stored_lines: None,
            added_lines: Vec::new(),
        }
    }

    /// An exchange for work the proxy starts itself (background refresh): never logged.
    pub fn background(host: String, path: String, query: Option<String>) -> Exchange {
        let req = Request::new(());
        let mut ex = Exchange::new(&req, None);
        ex.host = host;
        ex.path = path;
        ex.query = query;
        ex
    }

    pub fn bypass(&mut self, reason: NoCacheReason) {
        self.result = CacheResult::Bypass;
        self.reason = Some(reason);
        self.fwd = Some(match reason {
            NoCacheReason::MethodNotCacheable => Forward::Method,
            NoCacheReason::RequestNoStore => Forward::Request,
            _ => Forward::Bypass,
        });
    }

    /// Adds this hop's Via to a response from upstream: as a line for Larder's HTTP/1 writer
    /// (it then goes after the origin's own Via fields), else to the map.
    pub fn add_via(&mut self, headers: &mut http::HeaderMap) {
        match self.writer {
            ResponseWriter::Lines => crate::headers::push_field(
                self.added_lines(),
                header::VIA.as_str().as_bytes(),
                crate::headers::VIA_VALUE.as_bytes(),
            ),
            ResponseWriter::Hyper => crate::headers::append_via(headers),
        }
    }

    /// The lines, with room for all this response adds (one allocation, not one per growth).
    pub fn added_lines(&mut self) -> &mut Vec<u8> {
        if self.added_lines.capacity() == 0 {
            self.added_lines.reserve(super::ADDED_LINES_CAPACITY);
        }
        &mut self.added_lines
    }

    pub fn header_id(&self) -> &str {
        &self.request_id
    }

    /// RFC 9211 Cache-Status value.
    pub fn cache_status(&self) -> String {
        let mut value = Vec::with_capacity(64);
        self.write_cache_status(&mut value);
        String::from_utf8(value).expect("written from strings")
    }

    /// Appends the RFC 9211 Cache-Status value.
    pub fn write_cache_status(&self, s: &mut Vec<u8>) {
        s.extend_from_slice(b"larder");
        // `hit` only when the origin was not asked (RFC 9211 §2.1); a revalidated or
        // stale-if-error answer reports its `fwd` instead.
        let hit = matches!(self.result, CacheResult::Hit | CacheResult::Coalesced)
            || (self.result == CacheResult::Stale && self.fwd.is_none());
        if hit {
            s.extend_from_slice(b"; hit");
        } else if let Some(fwd) = self.fwd {
            s.extend_from_slice(b"; fwd=");
            s.extend_from_slice(fwd.as_str().as_bytes());
        }
        if let Some(status) = self.fwd_status {
            s.extend_from_slice(b"; fwd-status=");
            s.extend_from_slice(itoa::Buffer::new().format(status).as_bytes());
        }
        if self.stored {
            s.extend_from_slice(b"; stored");
        }
        if self.collapsed {
            s.extend_from_slice(b"; collapsed");
        }
        if let Some(ttl) = self.ttl {
            s.extend_from_slice(b"; ttl=");
            s.extend_from_slice(itoa::Buffer::new().format(ttl).as_bytes());
        }
        if let Some(key) = &self.key {
            s.extend_from_slice(b"; key=\"");
            s.extend_from_slice(key.replace(['"', '\\'], "_").as_bytes());
            s.push(b'"');
        }
        if let Some(detail) = self.stale_reason.or(self.reason.map(NoCacheReason::as_str)) {
            s.extend_from_slice(b"; detail=");
            s.extend_from_slice(detail.as_bytes());
        }
    }

    pub fn into_event(self, status: u16, body_bytes: u64) -> RequestEvent {
        RequestEvent {
            start: self.start,
            duration: self.started.elapsed(),
            request_id: self.request_id,
            trace_id: self.trace_id,
            client: self.client,
            method: self.method,
            http_version: match self.version {
                Version::HTTP_09 => "0.9",
                Version::HTTP_10 => "1.0",
                Version::HTTP_2 => "2",
                Version::HTTP_3 => "3",
                _ => "1.1",
            },
            host: self.host,
            path: self.path,
            query: self.query,
            user_agent: self.user_agent,
            status,
            response_body_bytes: Some(body_bytes),
            route: self.route,
            cluster: self.cluster,
            upstream_address: self.upstream_address,
            upstream_duration: self.upstream_duration,
            cache_result: self.result.as_str(),
            cache_reason: self.reason.map(NoCacheReason::as_str),
            resource_type: self.resource_type,
            stale_reason: (self.result == CacheResult::Stale)
                .then_some(self.stale_reason)
                .flatten(),
            revalidation: self.revalidation,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_clock_read_gives_both_times_close_to_the_clocks() {
        let (wall, instant) = now();
        let (wall_later, instant_later) = now();
        assert!(instant_later >= instant);
        assert!(wall_later >= wall);
        let skew = SystemTime::now()
            .duration_since(wall_later)
            .unwrap_or_else(|e| e.duration());
        assert!(skew < Duration::from_secs(2), "{skew:?}");
    }
}

//! The request pipeline: route → cache → upstream, as one explicit sequence per request. Every
//! branch records its cache decision by name on the [`Exchange`], which becomes the
//! `Cache-Status` header, the access-log line and the metric labels in one place
//! ([`Proxy::finish`]).

mod exchange;
mod fill;
pub(crate) mod serve;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use crate::body::{
    IdleTimeoutBody, LimitedBody, ObservedBody, ProxyBody, UpstreamBody, boxed, empty, full,
};
use crate::error::ProxyError;
use crate::headers::{add_forwarded, list_members, strip_hop_by_hop};
use crate::interim::InterimSink;
use crate::upstream::{Timeouts, UpstreamRequest};
use crate::{Proxy, Runtime};
use exchange::{Exchange, Forward};
use fill::{Feed, Fill};
use http::header::{
    self, CONTENT_LENGTH, ETAG, HOST, IF_MATCH, IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE,
    IF_UNMODIFIED_SINCE, LAST_MODIFIED, RANGE,
};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use larder_cache::{
    CacheResult, FillGuard, FillStream, FillWaiter, Hit, Join, Key, Lookup, NoCacheReason,
    RequestDirectives, RequestTarget, SURROGATE_CONTROL, Waited, fields, freshness::has_validator,
    is_field_value, key::normalize_host, not_modified, request_directives,
};
use larder_telemetry::UpstreamEvent;
use serve::{ServeOptions, from_store, from_stream, not_modified_response};

pub(crate) static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");
pub(crate) use crate::headers::REQUEST_ID;

/// The client's request once its body has been split off. Cheap to clone for a background
/// refresh (no body).
#[derive(Clone)]
struct ClientRequest {
    method: Method,
    path_and_query: http::uri::PathAndQuery,
    headers: HeaderMap,
    directives: RequestDirectives,
    /// Where the origin's 1xx responses go (HTTP/1.1 clients only).
    interim: Option<InterimSink>,
    /// `http` or `https`, as the client reached the listener: part of the cache key.
    scheme: &'static str,
}

impl ClientRequest {
    fn path(&self) -> &str {
        self.path_and_query.path()
    }

    fn query(&self) -> Option<&str> {
        self.path_and_query.query()
    }

    fn target<'a>(&'a self, host: &'a str) -> RequestTarget<'a> {
        RequestTarget {
            scheme: self.scheme,
            host,
            path: self.path(),
            query: self.query(),
            headers: &self.headers,
        }
    }
}

/// Which server writes the answer to the client, and so which form of a stored response's
/// header fields it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseWriter {
    /// hyper (HTTP/1 requests Larder's own server hands over; HTTP/2 with
    /// `LARDER_HTTP2_SERVER=hyper`): every field in the response's `HeaderMap`.
    Hyper,
    /// Larder's servers (HTTP/1 and HTTP/2): a hit's stored fields as the HTTP/1 lines encoded
    /// when it was stored ([`StoredLines`]), this hop's fields as lines too
    /// ([`Answer::added_lines`]), the `HeaderMap` holding only what else this response adds.
    /// The HTTP/2 server reads the lines into HPACK literals, cheaper than building a map.
    Lines,
}

/// A hit's header fields as HTTP/1 lines: written before the fields of the response's
/// `HeaderMap` (then empty but for a drain's `Connection: close`), so a hit builds no map.
#[derive(Debug, Clone)]
pub struct StoredLines {
    /// The stored fields, as encoded when the response was stored.
    pub stored: bytes::Bytes,
    /// Whether `stored` carries `Date` (else the writer adds one).
    pub has_date: bool,
    /// The body's length, sent for HEAD too (whose body is empty).
    pub content_length: u64,
}

/// Room for the lines a response gets from this hop (Age, Via, Cache-Status with a TTL, a
/// request id) without growing.
pub(crate) const ADDED_LINES_CAPACITY: usize = 192;

/// The response to a request, and for [`ResponseWriter::Lines`] the fields it carries as
/// lines rather than in its `HeaderMap`.
pub struct Answer {
    pub response: Response<ProxyBody>,
    pub stored_lines: Option<StoredLines>,
    /// The fields this hop adds (Via, Cache-Status, X-Request-Id; Age on a hit) as HTTP/1
    /// lines, written after all others (a Via list stays in hop order). Only for
    /// [`ResponseWriter::Lines`]: inserting them into the map and encoding that again cost
    /// a hashed insert and an allocation each.
    pub added_lines: Vec<u8>,
}

/// Marks an upstream response that came with both Transfer-Encoding and Content-Length.
#[derive(Clone, Copy)]
struct ConflictingFraming;

/// hyper accepts any Transfer-Encoding that ends in `chunked`; a client has no use for anything
/// but `chunked` alone (no other coding is supported), so a list, a repeat or an unknown coding
/// is a smuggling probe aimed at whatever reads the message next.
fn single_chunked_coding(headers: &HeaderMap) -> bool {
    let mut codings = fields::find_all(headers, &header::TRANSFER_ENCODING)
        .flat_map(|v| list_members(v.as_bytes()));
    match codings.next() {
        None => true,
        Some(first) => first.eq_ignore_ascii_case(b"chunked") && codings.next().is_none(),
    }
}

/// Where a request goes upstream: the cluster (by index into the runtime) and its timeouts.
#[derive(Clone, Copy)]
struct Upstream {
    cluster: usize,
    timeouts: Timeouts,
}

/// What a fetch for the cache is about.
struct FillPlan {
    /// The key concurrent requests coalesce on.
    fill_key: Key,
    /// A stale stored response: revalidated (if it has validators) and kept as a stand-in
    /// should the origin fail (stale-if-error).
    stale: Option<Hit>,
}

// The request's steps are plain fns returning `async move` blocks: an `async fn`'s future
// keeps every argument twice (rust-lang/rust#62958), and these futures are built, moved and
// boxed on every request.
#[allow(clippy::manual_async_fn)]
impl Proxy {
    pub fn handle(
        self: Arc<Self>,
        req: Request<ProxyBody>,
        client: Option<SocketAddr>,
        interim: Option<InterimSink>,
        scheme: &'static str,
        writer: ResponseWriter,
    ) -> impl Future<Output = Answer> {
        async move {
            // A guard, not a clone: cloning would count on the one reference count every request on
            // every worker thread touches (the guard borrows it through a per-thread slot).
            let runtime = self.runtime.load();
            // Boxed: moved into the body's end-of-response closure and that into a box, it
            // would be copied whole (half a kilobyte) at each step.
            let mut ex = Box::new(Exchange::new(&req, client));
            ex.scheme = scheme;
            ex.writer = writer;
            if let Some(tracing) = &self.tracing {
                let host = req
                    .uri()
                    .authority()
                    .map(|a| a.as_str())
                    .or_else(|| req.headers().get(HOST).and_then(|v| v.to_str().ok()))
                    .unwrap_or_default();
                let span = tracing.server_span(
                    req.headers(),
                    req.method().as_str(),
                    req.uri().path(),
                    host,
                );
                ex.trace_id = Some(span.trace_id());
                ex.span = Some(span);
            }
            let response = match self.process(&runtime, &mut ex, req, interim.clone()).await {
                Ok(response) => response,
                Err(error) => {
                    // Lines belong to the response they came with, never to an error.
                    ex.stored_lines = None;
                    ex.added_lines.clear();
                    if let ProxyError::Upstream(e) = &error {
                        ex.upstream_address = e.endpoint.clone();
                        ex.reason.get_or_insert(NoCacheReason::UpstreamError);
                        tracing::debug!(request_id = %ex.header_id(), error = %e, "upstream failed");
                    }
                    error.into_response()
                }
            };
            Proxy::finish(self, &runtime, ex, response, interim)
        }
    }

    /// Stamps the response with the request's identity and cache status, and arranges for the
    /// event to be emitted (and the connection's interim relay told) when the body is done, in
    /// one body wrapper per response.
    fn finish(
        self: Arc<Self>,
        rt: &Runtime,
        mut ex: Box<Exchange>,
        mut response: Response<ProxyBody>,
        interim: Option<InterimSink>,
    ) -> Answer {
        let stored_lines = ex.stored_lines.take();
        if let Some(sink) = &interim {
            sink.response_returned();
        }
        let headers = response.headers_mut();
        // Meant for this cache only (read at admission): never forwarded, whatever the path.
        // Checked in one pass first: stored responses never have them, so hits skip the removals.
        let hidden =
            |n: &HeaderName| *n == SURROGATE_CONTROL || rt.hidden_response_headers.contains(n);
        if headers.keys().any(hidden) {
            headers.remove(&SURROGATE_CONTROL);
            for name in &rt.hidden_response_headers {
                headers.remove(name);
            }
        }
        // Only Larder's HTTP/1 writer takes lines: hyper's responses get every field in the map.
        let added_lines = match ex.writer {
            ResponseWriter::Lines => {
                let mut added_lines = std::mem::take(ex.added_lines());
                // This hop's values replace any the origin sent, as inserting them into the
                // map would (stored responses never carry them; a relayed one may).
                if headers
                    .keys()
                    .any(|n| *n == CACHE_STATUS || *n == REQUEST_ID)
                {
                    headers.remove(&CACHE_STATUS);
                    headers.remove(&REQUEST_ID);
                }
                // Written in place (no String); a value that could not be a field value (a
                // cache key shown in it, say) is taken back out.
                let line_at = added_lines.len();
                added_lines.extend_from_slice(CACHE_STATUS.as_str().as_bytes());
                added_lines.extend_from_slice(b": ");
                let value_at = added_lines.len();
                ex.write_cache_status(&mut added_lines);
                if is_field_value(&added_lines[value_at..]) {
                    added_lines.extend_from_slice(b"\r\n");
                } else {
                    added_lines.truncate(line_at);
                }
                // Our own hex digits, or the client's value, which read as visible ASCII.
                crate::headers::push_field(
                    &mut added_lines,
                    REQUEST_ID.as_str().as_bytes(),
                    ex.header_id().as_bytes(),
                );
                added_lines
            }
            ResponseWriter::Hyper => {
                let cache_status = ex.cache_status();
                if let Ok(v) = HeaderValue::from_str(&cache_status) {
                    headers.insert(CACHE_STATUS.clone(), v);
                }
                if let Some(v) = request_id_value(ex.header_id()) {
                    headers.insert(REQUEST_ID.clone(), v);
                }
                Vec::new()
            }
        };
        // Draining: no HTTP/1 client should send another request on this connection.
        if self.is_draining() && ex.version < http::Version::HTTP_2 {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        let status = response.status().as_u16();
        let (parts, body) = response.into_parts();
        let body = ObservedBody::new(body, move |bytes, _complete| {
            if let Some(sink) = interim {
                sink.body_finished();
            }
            if let Some(span) = ex.span.take() {
                span.finish(status, ex.result.as_str(), ex.route.as_deref());
            }
            // The proxy's own reference, moved here: cloning its metrics and log handles per
            // request would be two more atomic counts the worker threads contend on.
            ex.into_event(status, bytes)
                .emit(&self.metrics, self.access_log.as_deref());
        });
        Answer {
            response: Response::from_parts(parts, boxed(body)),
            stored_lines,
            added_lines,
        }
    }

    fn process(
        &self,
        rt: &Arc<Runtime>,
        ex: &mut Exchange,
        req: Request<ProxyBody>,
        interim: Option<InterimSink>,
    ) -> impl Future<Output = Result<Response<ProxyBody>, ProxyError>> {
        async move {
            if req.method() == Method::CONNECT {
                // A reverse proxy routes to its own clusters; tunnelling to arbitrary hosts is not
                // its job.
                return Err(ProxyError::NotImplemented("CONNECT is not supported"));
            }
            let (parts, body) = req.into_parts();
            let mut headers = parts.headers;
            let upgrade = fields::has(&headers, &header::UPGRADE);
            if !single_chunked_coding(&headers) {
                return Err(ProxyError::BadRequest(
                    "Transfer-Encoding must be \"chunked\" alone",
                ));
            }
            // Before anything is added: a client's `Connection` may only name its own hop's fields.
            strip_hop_by_hop(&mut headers);
            if fields::find_all(&headers, &HOST).nth(1).is_some() {
                return Err(ProxyError::BadRequest("more than one Host header"));
            }
            // RFC 9113 §8.3.1: a Host that names another entity than :authority is malformed (one
            // of them would key the cache, the other could pick the origin's virtual host).
            if parts.version == http::Version::HTTP_2
                && let (Some(authority), Some(host)) =
                    (parts.uri.authority(), fields::find(&headers, &HOST))
                && !host
                    .as_bytes()
                    .eq_ignore_ascii_case(authority.as_str().as_bytes())
            {
                return Err(ProxyError::BadRequest(":authority and Host differ"));
            }
            // RFC 9113 §8.2.1: a field value may not start or end with whitespace (hyper's HTTP/1
            // parser trims it; h2 passes it on, and an origin could read the value differently).
            if parts.version == http::Version::HTTP_2
                && headers.values().any(|v| {
                    let b = v.as_bytes();
                    matches!(b.first(), Some(b' ' | b'\t'))
                        || matches!(b.last(), Some(b' ' | b'\t'))
                })
            {
                return Err(ProxyError::BadRequest(
                    "a field value starts or ends with whitespace",
                ));
            }
            // The target's authority wins over Host (RFC 9112 §3.2.2); HTTP/2 has only :authority.
            match parts.uri.authority() {
                Some(authority) => {
                    let host_value = HeaderValue::from_str(authority.as_str())
                        .map_err(|_| ProxyError::BadRequest("invalid Host"))?;
                    headers.insert(HOST, host_value);
                    ex.host = normalize_host(authority.as_str(), ex.scheme);
                }
                // Host stays as it came (most requests): only read, never copied or re-inserted.
                None => {
                    let host = fields::find(&headers, &HOST)
                        .ok_or(ProxyError::BadRequest("missing Host header"))?
                        .to_str()
                        .map_err(|_| ProxyError::BadRequest("invalid Host"))?;
                    if host.is_empty() {
                        return Err(ProxyError::BadRequest("missing Host header"));
                    }
                    ex.host = normalize_host(host, ex.scheme);
                }
            }
            if parts.method.as_str() == "PURGE" && rt.config.purge.purge_method.enabled {
                return Box::pin(self.purge_method(rt, ex, &parts.uri)).await;
            }

            let declared = fields::find(&headers, &CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if declared.is_some_and(|len| len > rt.limits.max_request_body_size) {
                return Err(ProxyError::PayloadTooLarge);
            }
            let path_and_query = parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
            if !path_and_query.path().starts_with('/') {
                // `OPTIONS *` and similar have no resource to route.
                return Err(ProxyError::BadRequest("request target must be a path"));
            }
            let route = rt
                .router
                .route(&ex.host, path_and_query.path())
                .ok_or(ProxyError::NoRoute)?;
            let cluster = &rt.clusters[route.cluster];
            ex.route = Some(route.name.clone());
            ex.cluster = Some(cluster.name.clone());
            let first_byte = route.timeout.unwrap_or(cluster.request_timeout);
            let upstream = Upstream {
                cluster: route.cluster,
                timeouts: Timeouts {
                    connect: route.connect_timeout.unwrap_or(cluster.connect_timeout),
                    first_byte,
                    idle: route.idle_timeout.unwrap_or(first_byte),
                    total: route.total_timeout,
                },
            };

            let directives = request_directives(&headers);
            // Boxed: each step the request goes through holds it, and a pointer is what
            // moves into each step's future (not a quarter kilobyte).
            let request = Box::new(ClientRequest {
                method: parts.method,
                path_and_query,
                headers,
                directives,
                interim,
                scheme: ex.scheme,
            });
            // A body still to come must keep coming (slow POST) and stay under the limit; most
            // requests have none, and need neither wrapper (nor its allocation).
            let body = if http_body::Body::is_end_stream(&body) {
                body
            } else {
                let body = boxed(IdleTimeoutBody::new(
                    body,
                    rt.limits.request_body_timeout,
                    None,
                ));
                boxed(LimitedBody::new(body, rt.limits.max_request_body_size))
            };

            let bypass = if !route.cache {
                Some(NoCacheReason::RouteDisabled)
            } else if upgrade {
                Some(NoCacheReason::Upgrade)
            } else {
                None
            };
            if let Some(reason) = bypass {
                return Box::pin(self.pass(rt, ex, upstream, request, body, reason)).await;
            }
            if request.method != Method::GET && request.method != Method::HEAD {
                return Box::pin(self.unsafe_or_uncacheable(rt, ex, upstream, request, body)).await;
            }
            self.cached(rt, ex, upstream, request, body).await
        }
    }

    /// `PURGE <path>`: purges the URL (every variant; `/dir/*` purges a prefix) on every
    /// replica, for clients in the allowed networks only. Answers like the admin API.
    async fn purge_method(
        &self,
        rt: &Arc<Runtime>,
        ex: &mut Exchange,
        uri: &http::Uri,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let client = ex
            .client
            .ok_or(ProxyError::Forbidden("client address unknown"))?;
        let allowed = &rt.config.purge.purge_method.allowed_cidrs;
        if !allowed
            .iter()
            .any(|net| net.contains(&client.ip().to_canonical()))
        {
            return Err(ProxyError::Forbidden(
                "PURGE is not allowed from this address",
            ));
        }
        ex.reason = Some(NoCacheReason::MethodNotCacheable);
        let target = uri.path_and_query().map_or("", |pq| pq.as_str());
        // The same reading of a target as the admin API's, so peers relay it unchanged.
        let selector = larder_purge::wire::path_selector(&ex.host, target)
            .map_err(|_| ProxyError::BadRequest("PURGE needs a path (or /prefix/*)"))?;
        let order = larder_purge::PurgeOrder {
            selectors: vec![selector],
            soft: false,
        };
        let source = larder_purge::Source::PurgeMethod(client);
        let purger = self.purger.get().and_then(std::sync::Weak::upgrade);
        let (status, body) = match purger {
            Some(purger) => {
                if let Err(larder_purge::Refusal::RateLimited { retry_after }) =
                    purger.admit(&source)
                {
                    purger.refused(&source, "rate_limited");
                    let mut response = Response::new(full(format!(
                        "too many purges; retry in {} ms\n",
                        retry_after.as_millis().max(1)
                    )));
                    *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
                    let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
                    response
                        .headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
                    return Ok(response);
                }
                let report = purger.purge(&order, source, None).await;
                let body = serde_json::to_vec(&report).expect("a report always serializes");
                (report.status(), body)
            }
            None => {
                let purged: usize = order
                    .selectors
                    .iter()
                    .map(|s| rt.cache.invalidate(s, false, SystemTime::now()))
                    .sum();
                let status = if purged > 0 {
                    StatusCode::OK
                } else {
                    StatusCode::NOT_FOUND
                };
                let body = serde_json::json!({ "purged": purged, "target": target });
                (status, body.to_string().into_bytes())
            }
        };
        let mut response = Response::new(full(body));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        Ok(response)
    }

    /// Forwards a request the cache does not answer; a successful unsafe one invalidates what
    /// is stored for its URI and for same-host Location / Content-Location (RFC 9111 §4.4).
    fn unsafe_or_uncacheable(
        &self,
        rt: &Arc<Runtime>,
        ex: &mut Exchange,
        upstream: Upstream,
        request: Box<ClientRequest>,
        body: ProxyBody,
    ) -> impl Future<Output = Result<Response<ProxyBody>, ProxyError>> {
        async move {
            let unsafe_method = !matches!(request.method.as_str(), "OPTIONS" | "TRACE");
            let path = request.path().to_owned();
            let query = request.query().map(str::to_owned);
            let response = self
                .pass(
                    rt,
                    ex,
                    upstream,
                    request,
                    body,
                    NoCacheReason::MethodNotCacheable,
                )
                .await?;
            let status = response.status();
            if unsafe_method && (status.is_success() || status.is_redirection()) {
                rt.cache.purge(&ex.host, &path, query.as_deref());
                for name in [header::LOCATION, header::CONTENT_LOCATION] {
                    let Some(target) = response.headers().get(&name).and_then(|v| v.to_str().ok())
                    else {
                        continue;
                    };
                    if let Some((path, query)) = same_host_target(target, &ex.host) {
                        rt.cache.purge(&ex.host, path, query);
                    }
                }
            }
            Ok(response)
        }
    }

    fn cached(
        &self,
        rt: &Arc<Runtime>,
        ex: &mut Exchange,
        upstream: Upstream,
        request: Box<ClientRequest>,
        body: ProxyBody,
    ) -> impl Future<Output = Result<Response<ProxyBody>, ProxyError>> {
        async move {
            // The request's arrival is now enough for freshness (and saves reading the clock).
            let now = ex.start;
            let head = request.method == Method::HEAD;
            let lookup_span = ex.span.as_ref().map(|s| s.child("cache lookup"));
            let mut lookup = rt.cache.lookup(&request.target(&ex.host));
            if let Some(span) = lookup_span {
                span.set(
                    "larder.cache.lookup",
                    match &lookup {
                        Lookup::Found(_) => "found",
                        Lookup::Miss { .. } => "miss",
                        Lookup::NoResourceType => "no_resource_type",
                    },
                );
            }
            if let Lookup::Found(hit) = &lookup
                && hit.stored().freshness.beyond_keep(now)
            {
                // Kept past its keep time: dropped, and the request is a plain miss.
                rt.cache.remove(hit);
                lookup = Lookup::Miss {
                    fill_key: hit.primary.clone(),
                    resource_type: hit.resource_type,
                    vary_miss: false,
                };
            }
            match lookup {
                Lookup::NoResourceType => {
                    Box::pin(self.pass(
                        rt,
                        ex,
                        upstream,
                        request,
                        body,
                        NoCacheReason::NoResourceType,
                    ))
                    .await
                }
                Lookup::Found(hit) => {
                    ex.resource_type = Some(rt.cache.resource_type_label(hit.resource_type));
                    self.note_key(rt, ex, &hit.key);
                    let freshness = &hit.stored().freshness;
                    if freshness.satisfies(&request.directives, now) {
                        return Ok(self.serve_hit(ex, &request, &hit, CacheResult::Hit, now));
                    }
                    if request.directives.only_if_cached {
                        return Err(ProxyError::OnlyIfCached);
                    }
                    if freshness.serve_while_revalidating(&request.directives, now) {
                        ex.stale_reason = Some("stale-while-revalidate");
                        let response = self.serve_hit(ex, &request, &hit, CacheResult::Stale, now);
                        self.refresh_in_background(rt, ex, upstream, &request, hit);
                        return Ok(response);
                    }
                    ex.fwd = Some(if freshness.lifetime > freshness.current_age(now) {
                        Forward::Request
                    } else {
                        Forward::Stale
                    });
                    // A HEAD revalidates the entry with a GET, like any other use of it, unless
                    // the answer would not be stored.
                    if head && let Some(reason) = partial_pass(rt, &request, &hit.primary) {
                        return Box::pin(self.pass(rt, ex, upstream, request, body, reason)).await;
                    }
                    let plan = FillPlan {
                        fill_key: hit.primary.clone(),
                        stale: Some(hit),
                    };
                    self.fill(rt, ex, upstream, request, body, plan).await
                }
                Lookup::Miss {
                    fill_key,
                    resource_type,
                    vary_miss,
                } => {
                    ex.resource_type = Some(rt.cache.resource_type_label(resource_type));
                    self.note_key(rt, ex, &fill_key);
                    if request.directives.only_if_cached {
                        return Err(ProxyError::OnlyIfCached);
                    }
                    ex.fwd = Some(if vary_miss {
                        Forward::VaryMiss
                    } else {
                        Forward::UriMiss
                    });
                    let reason = if let Some(reason) = partial_pass(rt, &request, &fill_key) {
                        Some(reason)
                    } else if request.directives.no_store {
                        Some(NoCacheReason::RequestNoStore)
                    } else if request.headers.contains_key(IF_MATCH)
                        || request.headers.contains_key(IF_UNMODIFIED_SINCE)
                    {
                        Some(NoCacheReason::Precondition)
                    } else {
                        None
                    };
                    match reason {
                        Some(reason) => {
                            let fwd = ex.fwd;
                            let response =
                                Box::pin(self.pass(rt, ex, upstream, request, body, reason)).await;
                            ex.fwd = fwd;
                            response
                        }
                        None => {
                            let plan = FillPlan {
                                fill_key,
                                stale: None,
                            };
                            self.fill(rt, ex, upstream, request, body, plan).await
                        }
                    }
                }
            }
        }
    }

    fn note_key(&self, rt: &Runtime, ex: &mut Exchange, key: &Key) {
        if rt.config.cache.cache_status_key {
            ex.key = Some(key.to_string());
        }
    }

    /// Fetches for the cache. A key recently proven uncacheable is fetched alone (no
    /// coalescing), and still stored should its answer now be storable (hit-for-miss); any
    /// other coalesces with concurrent requests for it. Each future is boxed here, once: they
    /// are the largest a request builds, and a pass-through request never builds the
    /// coalescing one. (A HEAD or range of such a key never gets here: `partial_pass` sent it
    /// to the origin as it came.)
    fn fill(
        &self,
        rt: &Arc<Runtime>,
        ex: &mut Exchange,
        upstream: Upstream,
        request: Box<ClientRequest>,
        body: ProxyBody,
        plan: FillPlan,
    ) -> impl Future<Output = Result<Response<ProxyBody>, ProxyError>> {
        use futures_util::future::Either;
        if rt.cache.is_hit_for_pass(&plan.fill_key, SystemTime::now()) {
            Either::Left(Box::pin(
                self.fetch_for_cache(rt, ex, upstream, request, body, plan, None),
            ))
        } else {
            Either::Right(Box::pin(
                self.coalesce_and_fetch(rt, ex, upstream, request, body, plan),
            ))
        }
    }

    /// `fill` for a key not known to be uncacheable: one request (the leader) fetches, the
    /// rest wait for its answer or read along as it arrives.
    fn coalesce_and_fetch(
        &self,
        rt: &Arc<Runtime>,
        ex: &mut Exchange,
        upstream: Upstream,
        request: Box<ClientRequest>,
        body: ProxyBody,
        plan: FillPlan,
    ) -> impl Future<Output = Result<Response<ProxyBody>, ProxyError>> {
        async move {
            // One deadline for all rounds of waiting, read from the clock only by a follower.
            let mut deadline = None;
            let mut rejoined = false;
            let guard = loop {
                // `fill` checked before the first round; a later one follows a fill that may
                // have proved the key uncacheable meanwhile.
                if rejoined && rt.cache.is_hit_for_pass(&plan.fill_key, SystemTime::now()) {
                    break None;
                }
                match rt.cache.coalescer().join(&plan.fill_key) {
                    Join::Leader(guard) => break Some(guard),
                    Join::Follower(mut waiter) => {
                        let deadline = *deadline.get_or_insert_with(|| {
                            tokio::time::Instant::now() + rt.coalesce_timeout
                        });
                        let wait_span = ex.span.as_ref().map(|s| s.child("coalesced wait"));
                        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                        let mut waited = waiter.wait_for_stream(left).await;
                        if let Ok(Waited::Streaming(stream)) = &waited {
                            let now = SystemTime::now();
                            if reads_along(&request)
                                && stream.head().freshness.satisfies(&request.directives, now)
                                && rt.cache.may_read_along(stream, &request.target(&ex.host))
                            {
                                drop(wait_span);
                                ex.collapsed = true;
                                ex.fwd = None;
                                // Counted under the type it was stored in, not the one it
                                // coalesced under (the first its path might match).
                                ex.resource_type =
                                    Some(rt.cache.resource_type_label(stream.resource_type()));
                                return Ok(self.serve_stream(ex, &request, stream, waiter, now));
                            }
                            // This request cannot take the body as it comes: it waits for the end.
                            let left =
                                deadline.saturating_duration_since(tokio::time::Instant::now());
                            waited = waiter.wait(left).await;
                        }
                        drop(wait_span);
                        match waited {
                            Ok(waited) => {
                                let now = SystemTime::now();
                                if let Lookup::Found(hit) =
                                    rt.cache.lookup(&request.target(&ex.host))
                                    && hit.stored().freshness.satisfies(&request.directives, now)
                                {
                                    ex.collapsed = true;
                                    ex.fwd = None;
                                    ex.resource_type =
                                        Some(rt.cache.resource_type_label(hit.resource_type));
                                    return Ok(self.serve_hit(
                                        ex,
                                        &request,
                                        &hit,
                                        CacheResult::Coalesced,
                                        now,
                                    ));
                                }
                                // Released before the origin answered (the leader's client
                                // cancelled, its origin request failed): one more round, where one
                                // waiter fetches for the rest, rather than all of them at once.
                                if matches!(waited, Waited::Abandoned) && !rejoined {
                                    rejoined = true;
                                    continue;
                                }
                            }
                            Err(_) => ex.reason = Some(NoCacheReason::CoalesceTimeout),
                        }
                        break None;
                    }
                    Join::Overflow => {
                        ex.reason = Some(NoCacheReason::CoalesceOverflow);
                        break None;
                    }
                }
            };
            // Released by a fill that proved the key uncacheable: a HEAD or a range is the
            // origin's to answer now, not a reason to fetch the whole object again. (A range of a
            // stale entry still revalidates it: the range is cut from the stored response.)
            if guard.is_none()
                && (plan.stale.is_none() || request.method == Method::HEAD)
                && let Some(reason) = partial_pass(rt, &request, &plan.fill_key)
            {
                // Still the miss (or stale) it was forwarded as, now bypassing the cache.
                ex.result = CacheResult::Bypass;
                ex.reason = Some(reason);
                return Box::pin(self.relay(rt, ex, upstream, request, body)).await;
            }
            self.fetch_for_cache(rt, ex, upstream, request, body, plan, guard)
                .await
        }
    }

    /// Serves the stale response now and refreshes it without a client, unless another
    /// request is already fetching this key (one refresh per key).
    fn refresh_in_background(
        &self,
        rt: &Arc<Runtime>,
        ex: &Exchange,
        upstream: Upstream,
        request: &ClientRequest,
        stale: Hit,
    ) {
        let Join::Leader(guard) = rt.cache.coalescer().join(&stale.primary) else {
            return;
        };
        let Some(proxy) = self.me.upgrade() else {
            return;
        };
        let rt = rt.clone();
        let mut request = Box::new(request.clone());
        request.directives = RequestDirectives::default();
        request.interim = None;
        // Not the client's fetch: its trace must not claim this origin request.
        for name in [
            "traceparent",
            "tracestate",
            "b3",
            "x-b3-traceid",
            "x-b3-spanid",
            "x-b3-parentspanid",
            "x-b3-sampled",
            "x-b3-flags",
        ] {
            request.headers.remove(name);
        }
        let mut background =
            Exchange::background(ex.host.clone(), ex.path.clone(), ex.query.clone());
        tokio::spawn(async move {
            let plan = FillPlan {
                fill_key: stale.primary.clone(),
                stale: Some(stale),
            };
            // The response only matters for what it stores; its body (if any) is filled by the
            // fill task whether or not anyone reads it.
            let _ = proxy
                .fetch_for_cache(
                    &rt,
                    &mut background,
                    upstream,
                    request,
                    empty(),
                    plan,
                    Some(guard),
                )
                .await;
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn fetch_for_cache(
        &self,
        rt: &Arc<Runtime>,
        ex: &mut Exchange,
        upstream: Upstream,
        request: Box<ClientRequest>,
        body: ProxyBody,
        plan: FillPlan,
        mut guard: Option<FillGuard>,
    ) -> impl Future<Output = Result<Response<ProxyBody>, ProxyError>> {
        async move {
            // The cache wants the full response; the client's own conditions are answered from it.
            // Preconditions too: the answer to one (412) must not be stored for everyone. And a
            // range (a stale hit's refresh): a 206 cannot be stored, and the stale object would be
            // dropped for it; the range is cut from the stored response instead.
            let mut headers = request.headers.clone();
            static CONDITIONS: [HeaderName; 6] = [
                IF_NONE_MATCH,
                IF_MODIFIED_SINCE,
                IF_MATCH,
                IF_UNMODIFIED_SINCE,
                IF_RANGE,
                RANGE,
            ];
            // Usually none is there: one pass over the request's few fields, not a hashed lookup
            // for each name.
            if headers.keys().any(|name| CONDITIONS.contains(name)) {
                for name in &CONDITIONS {
                    headers.remove(name);
                }
            }
            let revalidating = plan
                .stale
                .as_ref()
                .filter(|hit| has_validator(&hit.stored().headers));
            if let Some(hit) = revalidating {
                let stored = &hit.stored().headers;
                if let Some(etag) = stored.get(&ETAG) {
                    headers.insert(IF_NONE_MATCH, etag.clone());
                }
                if let Some(lm) = stored.get(&LAST_MODIFIED) {
                    headers.insert(IF_MODIFIED_SINCE, lm.clone());
                }
            }
            // A HEAD miss asks for the body too, to store it (as nginx and Varnish do); the client
            // gets the head.
            let head = request.method == Method::HEAD;
            let method = if head {
                Method::GET
            } else {
                request.method.clone()
            };
            // A request without a body can be sent again as the client asked (see below).
            let bodiless = http_body::Body::is_end_stream(&body);
            let request_time = SystemTime::now();
            let generation = rt.cache.purge_generation();
            let upstream_request = UpstreamRequest {
                method: method.clone(),
                path_and_query: request.path_and_query.clone(),
                headers,
                hop: None,
            };
            let fetched = match self
                .forward(
                    rt,
                    ex,
                    upstream,
                    upstream_request,
                    body,
                    request.interim.as_ref(),
                )
                .await
            {
                Ok(response) => {
                    // Whatever comes of the answer now, those waiting will not try again.
                    if let Some(guard) = &mut guard {
                        guard.answered();
                    }
                    response
                }
                Err(error) => {
                    drop(guard);
                    if revalidating.is_some() {
                        ex.revalidation = Some("failed");
                    }
                    return match &plan.stale {
                        Some(stale) => self.stale_on_error(ex, &request, stale, error),
                        None => Err(error),
                    };
                }
            };
            let response_time = SystemTime::now();
            let (mut parts, upstream_body) = fetched.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            if revalidating.is_some() {
                ex.revalidation = Some(match parts.status {
                    StatusCode::NOT_MODIFIED => "not_modified",
                    s if s.is_server_error() => "failed",
                    _ => "modified",
                });
            }

            if let Some(stale) = &plan.stale
                && parts.status.is_server_error()
                && stale.stored().freshness.serve_on_error(
                    &request.directives,
                    response_time,
                    false,
                )
            {
                drop(guard);
                ex.stale_reason = Some("stale-if-error");
                return Ok(self.serve_hit(ex, &request, stale, CacheResult::Stale, response_time));
            }

            if let Some(hit) = revalidating
                && parts.status == StatusCode::NOT_MODIFIED
            {
                let target = request.target(&ex.host);
                let refreshed = rt.cache.refresh(
                    hit,
                    &target,
                    &parts.headers,
                    request_time,
                    response_time,
                    generation,
                );
                drop(guard);
                let served = match refreshed {
                    Ok(new_hit) => {
                        ex.stored = true;
                        new_hit
                    }
                    Err(reason) => {
                        ex.reason = Some(reason);
                        hit.clone()
                    }
                };
                return Ok(self.serve_hit(
                    ex,
                    &request,
                    &served,
                    CacheResult::Revalidated,
                    response_time,
                ));
            }

            ex.result = if plan.stale.is_some() {
                CacheResult::Expired
            } else {
                CacheResult::Miss
            };
            let admitted = if parts.extensions.get::<ConflictingFraming>().is_some() {
                Err(NoCacheReason::MalformedResponse)
            } else {
                rt.cache.admit(
                    &method,
                    &request.target(&ex.host),
                    parts.status,
                    &parts.headers,
                    request_time,
                    response_time,
                    generation,
                )
            };
            let admission = match admitted {
                Ok(admission) => admission,
                Err(reason) => {
                    ex.reason = Some(reason);
                    if reason.is_response_side() {
                        // Requests for this key stop queueing behind each other for a while.
                        rt.cache.mark_hit_for_pass(&plan.fill_key, response_time);
                    }
                    if let Some(stale) = &plan.stale {
                        // The origin's new answer replaces the stale one, even if it can't be stored.
                        rt.cache.remove(stale);
                    }
                    drop(guard);
                    if !head
                        && bodiless
                        && parts.status == StatusCode::OK
                        && fields::has(&request.headers, &RANGE)
                    {
                        // The origin cuts the range of what will not be stored: asked again as the
                        // client asked, rather than read from the start for a range deep into a
                        // large file.
                        // The exchange keeps the miss and the reason it was not stored.
                        drop(upstream_body);
                        return Box::pin(self.relay(rt, ex, upstream, request, empty())).await;
                    }
                    ex.add_via(&mut parts.headers);
                    let body = if head {
                        empty()
                    } else {
                        cut_range(&request, &mut parts, boxed(upstream_body))
                    };
                    return Ok(Response::from_parts(parts, body));
                }
            };
            ex.stored = true;
            ex.resource_type = Some(rt.cache.resource_type_label(admission.resource_type()));
            let exact_len = parts
                .headers
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
            let feed = Fill::new(rt.cache.clone(), plan.fill_key, guard, exact_len)
                .start(upstream_body, admission);
            if parts.status == StatusCode::OK && not_modified(&request.headers, &parts.headers) {
                // The client already has it; the fill (if still reading) goes on without this
                // client. (The 304 carries its own Via.)
                drop(feed);
                return Ok(not_modified_response(&parts.headers));
            }
            ex.add_via(&mut parts.headers);
            if head {
                // The fill (if still reading) goes on without this client.
                drop(feed);
                return Ok(Response::from_parts(parts, empty()));
            }
            let body = match feed {
                Feed::Whole(body) => full(body),
                Feed::Streamed(body) => boxed(body),
            };
            let body = cut_range(&request, &mut parts, body);
            Ok(Response::from_parts(parts, body))
        }
    }

    /// The origin failed while a stale response is stored: serve it if stale-if-error allows,
    /// else fail — with 504 when the response demands revalidation (RFC 9111 §5.2.2.2).
    fn stale_on_error(
        &self,
        ex: &mut Exchange,
        request: &ClientRequest,
        stale: &Hit,
        error: ProxyError,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let now = SystemTime::now();
        let freshness = &stale.stored().freshness;
        // No answer at all (connect error, closed connection, timeout) counts as unreachable.
        let unreachable = matches!(&error, ProxyError::Upstream(e) if e.client_fault.is_none());
        if freshness.serve_on_error(&request.directives, now, unreachable) {
            ex.stale_reason = Some("stale-if-error");
            ex.reason = Some(NoCacheReason::UpstreamError);
            return Ok(self.serve_hit(ex, request, stale, CacheResult::Stale, now));
        }
        if freshness.must_revalidate {
            return Err(ProxyError::MustRevalidate(Box::new(error)));
        }
        Err(error)
    }

    /// Forwards without storing, the cache bypassed for `reason`.
    fn pass(
        &self,
        rt: &Runtime,
        ex: &mut Exchange,
        upstream: Upstream,
        request: Box<ClientRequest>,
        body: ProxyBody,
        reason: NoCacheReason,
    ) -> impl Future<Output = Result<Response<ProxyBody>, ProxyError>> {
        async move {
            ex.bypass(reason);
            self.relay(rt, ex, upstream, request, body).await
        }
    }

    /// Forwards without storing, leaving the exchange's cache outcome as the caller set it.
    fn relay(
        &self,
        rt: &Runtime,
        ex: &mut Exchange,
        upstream: Upstream,
        request: Box<ClientRequest>,
        body: ProxyBody,
    ) -> impl Future<Output = Result<Response<ProxyBody>, ProxyError>> {
        async move {
            let interim = request.interim;
            let upstream_request = UpstreamRequest {
                method: request.method,
                path_and_query: request.path_and_query,
                headers: request.headers,
                hop: None,
            };
            let response = self
                .forward(rt, ex, upstream, upstream_request, body, interim.as_ref())
                .await?;
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            ex.add_via(&mut parts.headers);
            Ok(Response::from_parts(parts, boxed(body)))
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        rt: &Runtime,
        ex: &mut Exchange,
        upstream: Upstream,
        mut request: UpstreamRequest,
        body: ProxyBody,
        interim: Option<&InterimSink>,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, ProxyError>> {
        async move {
            let cluster = &rt.clusters[upstream.cluster];
            // Here, not on arrival: a cache hit never pays for formatting them.
            // Visible ASCII only, as the host routed on.
            let host = request
                .headers
                .get(HOST)
                .filter(|v| v.to_str().is_ok())
                .cloned();
            let trusted_peer = ex.client.is_some_and(|c| {
                rt.limits
                    .trusted_proxies
                    .iter()
                    .any(|net| net.contains(&c.ip()))
            });
            // Usually none is there: one pass over the request's few fields, not a hash lookup for
            // each name.
            let strip = &rt.limits.strip_request_headers;
            if request.headers.keys().any(|name| strip.contains(name)) {
                for name in strip {
                    request.headers.remove(name);
                }
            }
            request.hop = Some(add_forwarded(
                &mut request.headers,
                ex.client,
                trusted_peer,
                host,
                ex.scheme,
            ));
            let upstream_span = match (&ex.span, &self.tracing) {
                (Some(span), Some(tracing)) => Some(span.upstream(
                    tracing,
                    request.method.as_str(),
                    &cluster.name,
                    &mut request.headers,
                )),
                _ => None,
            };
            // Fixed before the send: retries and the body share the one total deadline.
            let deadline = upstream
                .timeouts
                .total
                .map(|total| tokio::time::Instant::now() + total);
            let result = cluster
                .send(&mut request, body, &upstream.timeouts, interim)
                .await;
            if let Some(span) = &upstream_span {
                match &result {
                    Ok(r) => {
                        span.set(
                            "http.response.status_code",
                            i64::from(r.response.status().as_u16()),
                        );
                        span.set("server.address", r.endpoint.to_string());
                    }
                    Err(e) => span.fail(e.kind.as_str().to_owned()),
                }
            }
            drop(upstream_span);
            if let Some(sink) = interim
                && sink.has_pending()
            {
                // One turn for the connection to write the 1xx before this final response.
                tokio::task::yield_now().await;
            }
            let (duration, error, retries) = match &result {
                Ok(r) => (r.duration, None, r.retries),
                Err(e) => (
                    e.duration,
                    e.client_fault.is_none().then_some(e.kind),
                    e.retries,
                ),
            };
            UpstreamEvent {
                cluster: &cluster.name,
                duration,
                error,
                retries,
            }
            .emit(&self.metrics);
            ex.upstream_duration = Some(duration);
            let mut response = result?;
            ex.upstream_address = Some(response.endpoint);
            ex.fwd_status = Some(response.response.status().as_u16());
            // hyper reads such a body as chunked; the length must go before anyone relays it (a
            // client trusting it would be desynchronised), and the response is never stored.
            let headers = response.response.headers_mut();
            if headers.contains_key(header::TRANSFER_ENCODING)
                && headers.remove(CONTENT_LENGTH).is_some()
            {
                response
                    .response
                    .extensions_mut()
                    .insert(ConflictingFraming);
            }
            // Here, once for every use of the body (relayed or stored): a stalled or trickling
            // origin is cut off, and a cut-off body is never stored.
            Ok(response
                .response
                .map(|body| IdleTimeoutBody::new(body, upstream.timeouts.idle, deadline)))
        }
    }

    /// Answers a request coalesced on a fill with the fill's body as it arrives: the response
    /// the fill is storing, as a hit would send it once stored.
    fn serve_stream(
        &self,
        ex: &mut Exchange,
        request: &ClientRequest,
        stream: &Arc<FillStream>,
        place: FillWaiter,
        now: SystemTime,
    ) -> Response<ProxyBody> {
        let stored = stream.head();
        ex.result = CacheResult::Coalesced;
        let age = stored.freshness.current_age(now).as_secs();
        ex.ttl = Some(stored.freshness.lifetime.as_secs() as i64 - age as i64);
        ex.stored_lines = None;
        ex.added_lines.clear();
        from_stream(&request.method, &request.headers, stream, place, age)
    }

    fn serve_hit(
        &self,
        ex: &mut Exchange,
        request: &ClientRequest,
        hit: &Hit,
        result: CacheResult,
        now: SystemTime,
    ) -> Response<ProxyBody> {
        let stored = hit.stored();
        ex.result = result;
        let age = stored.freshness.current_age(now).as_secs();
        ex.ttl = Some(stored.freshness.lifetime.as_secs() as i64 - age as i64);
        // Lines go out as stored: nothing in them is replaced or hidden per response, as the
        // fields `finish` sets and the hidden ones are left out at storage (and a reload that
        // hides others drops what was stored: `Runtime::rebuild`).
        let options = ServeOptions {
            without_revalidation: result != CacheResult::Revalidated,
            age_secs: age,
            as_lines: ex.writer == ResponseWriter::Lines,
        };
        ex.added_lines.clear();
        let (response, lines) = from_store(
            &request.method,
            &request.headers,
            stored,
            options,
            &mut ex.added_lines,
        );
        ex.stored_lines = lines;
        response
    }
}

/// HEAD and ranges are fetched as whole GETs for the cache, except where the answer will not
/// be stored: for a key that just proved uncacheable, or a request with credentials (whose
/// answer is stored only if the origin says it may be shared). There a whole body fetched for
/// a head or one range would cost the origin the rest for nothing.
fn partial_pass(rt: &Runtime, request: &ClientRequest, fill_key: &Key) -> Option<NoCacheReason> {
    let reason = if request.method == Method::HEAD {
        NoCacheReason::HeadMiss
    } else if fields::has(&request.headers, &RANGE) {
        NoCacheReason::RangeRequest
    } else {
        return None;
    };
    (request.headers.contains_key(header::AUTHORIZATION)
        || rt.cache.is_hit_for_pass(fill_key, SystemTime::now()))
    .then_some(reason)
}

/// A range request fetched whole for the cache (the fill strips Range) gets its range cut from
/// the origin's 200 as a hit would, and the fill goes on storing the whole. Several ranges, an
/// If-Range that does not match, or a body of unknown length get the whole 200, which a server
/// may always send (RFC 9110 §14.2).
fn cut_range(
    request: &ClientRequest,
    parts: &mut http::response::Parts,
    body: ProxyBody,
) -> ProxyBody {
    if request.method != Method::GET
        || parts.status != StatusCode::OK
        || !fields::has(&request.headers, &RANGE)
    {
        return body;
    }
    let Some(len) = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return body;
    };
    let answer = serve::ranges(&request.headers, &parts.headers, len);
    let (status, body) = serve::cut_streamed(answer, len, &mut parts.headers, body);
    parts.status = status.unwrap_or(parts.status);
    body
}

/// Whether a coalesced request can take a fill's body as it arrives: a GET, perhaps of a range
/// (cut as the body comes), or a HEAD (the head at once). Conditions are answered from the
/// whole stored response, once there.
fn reads_along(request: &ClientRequest) -> bool {
    (request.method == Method::GET || request.method == Method::HEAD)
        && !request.headers.keys().any(|name| {
            [
                &IF_NONE_MATCH,
                &IF_MODIFIED_SINCE,
                &IF_MATCH,
                &IF_UNMODIFIED_SINCE,
            ]
            .contains(&name)
        })
}

/// The path and query of a Location / Content-Location value, if it names this host.
fn same_host_target<'a>(target: &'a str, host: &str) -> Option<(&'a str, Option<&'a str>)> {
    let path_and_query = if target.starts_with('/') && !target.starts_with("//") {
        target
    } else {
        let rest = target.strip_prefix("http://")?;
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if normalize_host(authority, "http") != host || path.is_empty() {
            return None;
        }
        path
    };
    let path_and_query = path_and_query.split('#').next().unwrap_or(path_and_query);
    Some(match path_and_query.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (path_and_query, None),
    })
}

/// This hop's X-Request-Id as a map value, marked sensitive: HTTP/2 then sends it as an HPACK
/// "never indexed" literal. A value new with every response only churns the connection's header
/// table: indexed, each id evicted the stable fields and lengthened the encoder's search (7% of
/// an h2c hit's instructions, `bench/profile.sh callgrind h2c`), and the client's decoder kept
/// copies it would never see again.
fn request_id_value(id: &str) -> Option<HeaderValue> {
    let mut value = HeaderValue::from_str(id).ok()?;
    value.set_sensitive(true);
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn location_targets() {
        assert_eq!(
            same_host_target("/a?b=1", "example.com"),
            Some(("/a", Some("b=1")))
        );
        assert_eq!(
            same_host_target("http://Example.com:80/x", "example.com"),
            Some(("/x", None))
        );
        assert_eq!(same_host_target("http://other.com/x", "example.com"), None);
        assert_eq!(same_host_target("//example.com/x", "example.com"), None);
        assert_eq!(same_host_target("relative", "example.com"), None);
    }

    #[test]
    fn request_ids_stay_out_of_the_http2_header_table() {
        let value = request_id_value("6c7a88810d2f1b8d584bada86e3d1d32").expect("a field value");
        assert!(value.is_sensitive(), "HPACK must send it never-indexed");
        assert_eq!(value, "6c7a88810d2f1b8d584bada86e3d1d32");
        assert!(request_id_value("bad\nid").is_none());
    }
}

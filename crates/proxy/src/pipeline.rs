//! The request pipeline: route → cache → upstream, as one explicit sequence per request. Every
//! branch records its cache decision by name on the [`Exchange`], which becomes the
//! `Cache-Status` header, the access-log line and the metric labels in one place ([`Proxy::finish`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use http::header::{
    self, CONTENT_LENGTH, ETAG, HOST, IF_MODIFIED_SINCE, IF_NONE_MATCH, LAST_MODIFIED, RANGE,
};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use larder_cache::{
    Admission, CacheResult, FillGuard, Hit, Join, Key, Lookup, NoCacheReason, RequestTarget,
    freshness::has_validator, key::normalize_host, not_modified, request_directives,
};
use larder_telemetry::{RequestEvent, UpstreamEvent};
use tokio::sync::mpsc;

use crate::body::{
    ChannelBody, FeedFlow, FeedItem, LimitedBody, ObservedBody, ProxyBody, boxed, empty, full,
};
use crate::error::ProxyError;
use crate::headers::{add_forwarded, append_via, strip_hop_by_hop};
use crate::upstream::{Cluster, UpstreamRequest};
use crate::{Proxy, Runtime};

static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");
static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// Everything learnt about one request on its way through; emitted once when the body ends.
pub(crate) struct Exchange {
    start: SystemTime,
    started: Instant,
    request_id: String,
    trace_id: Option<String>,
    client: Option<SocketAddr>,
    method: Method,
    version: Version,
    host: String,
    path: String,
    query: Option<String>,
    user_agent: Option<String>,
    route: Option<Arc<str>>,
    cluster: Option<Arc<str>>,
    upstream_address: Option<Arc<str>>,
    upstream_duration: Option<Duration>,
    result: CacheResult,
    reason: Option<NoCacheReason>,
    resource_type: Option<String>,
    /// Status the origin answered with, when it was asked.
    fwd_status: Option<u16>,
    stored: bool,
    collapsed: bool,
    ttl: Option<i64>,
}

impl Exchange {
    fn new<B>(req: &Request<B>, client: Option<SocketAddr>) -> Exchange {
        let headers = req.headers();
        let header_str = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
        let request_id = header_str(&REQUEST_ID)
            .filter(|id| !id.is_empty() && id.len() <= 128)
            .map(str::to_owned)
            .unwrap_or_else(larder_telemetry::new_request_id);
        Exchange {
            start: SystemTime::now(),
            started: Instant::now(),
            request_id,
            trace_id: header_str(&TRACEPARENT)
                .and_then(larder_telemetry::trace_id_from_traceparent),
            client,
            method: req.method().clone(),
            version: req.version(),
            host: String::new(),
            path: req.uri().path().to_owned(),
            query: req.uri().query().map(str::to_owned),
            user_agent: header_str(&header::USER_AGENT).map(str::to_owned),
            route: None,
            cluster: None,
            upstream_address: None,
            upstream_duration: None,
            result: CacheResult::Bypass,
            reason: None,
            resource_type: None,
            fwd_status: None,
            stored: false,
            collapsed: false,
            ttl: None,
        }
    }

    fn bypass(&mut self, reason: NoCacheReason) {
        self.result = CacheResult::Bypass;
        self.reason = Some(reason);
    }

    /// RFC 9211 Cache-Status value.
    fn cache_status(&self) -> String {
        let mut s = String::from("larder");
        match self.result {
            CacheResult::Hit | CacheResult::Coalesced => s.push_str("; hit"),
            CacheResult::Revalidated | CacheResult::Expired => s.push_str("; fwd=stale"),
            CacheResult::Miss => s.push_str("; fwd=uri-miss"),
            CacheResult::Bypass => s.push_str(match self.reason {
                Some(NoCacheReason::MethodNotCacheable) => "; fwd=method",
                Some(NoCacheReason::RequestNoStore) => "; fwd=request",
                Some(NoCacheReason::RouteDisabled | NoCacheReason::NoResourceType) => {
                    "; fwd=bypass"
                }
                _ if self.fwd_status.is_some() => "; fwd=uri-miss",
                _ => "; fwd=bypass",
            }),
        }
        if let Some(status) = self.fwd_status {
            s.push_str(&format!("; fwd-status={status}"));
        }
        if self.stored {
            s.push_str("; stored");
        }
        if self.collapsed {
            s.push_str("; collapsed");
        }
        if let Some(ttl) = self.ttl {
            s.push_str(&format!("; ttl={ttl}"));
        }
        if let Some(reason) = self.reason {
            s.push_str("; detail=");
            s.push_str(reason.as_str());
        }
        s
    }

    fn into_event(self, status: u16, body_bytes: u64) -> RequestEvent {
        RequestEvent {
            start: self.start,
            duration: self.started.elapsed(),
            request_id: self.request_id,
            trace_id: self.trace_id,
            client: self.client,
            method: self.method.as_str().to_owned(),
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
            route: self.route.map(|r| r.to_string()),
            cluster: self.cluster.map(|c| c.to_string()),
            upstream_address: self.upstream_address.map(|a| a.to_string()),
            upstream_duration: self.upstream_duration,
            cache_result: self.result.as_str(),
            cache_reason: self.reason.map(NoCacheReason::as_str),
            resource_type: self.resource_type,
        }
    }
}

/// What the pipeline needs to keep of the client's request once the body has been split off.
struct Incoming_ {
    method: Method,
    path_and_query: http::uri::PathAndQuery,
    headers: HeaderMap,
}

impl Incoming_ {
    fn path(&self) -> &str {
        self.path_and_query.path()
    }

    fn query(&self) -> Option<&str> {
        self.path_and_query.query()
    }
}

struct Upstream<'a> {
    cluster: &'a Cluster,
    timeout: Duration,
}

impl Proxy {
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        client: Option<SocketAddr>,
    ) -> Response<ProxyBody> {
        let runtime = self.runtime.load_full();
        let mut ex = Exchange::new(&req, client);
        let response = match self.process(&runtime, &mut ex, req).await {
            Ok(response) => response,
            Err(error) => {
                if let ProxyError::Upstream(e) = &error {
                    ex.upstream_address = e.endpoint.clone();
                    ex.reason.get_or_insert(NoCacheReason::UpstreamError);
                    tracing::debug!(request_id = %ex.request_id, error = %e, "upstream failed");
                }
                error.into_response()
            }
        };
        self.finish(ex, response)
    }

    /// Stamps the response with the request's identity and cache status, and arranges for the
    /// event to be emitted when the body is done.
    fn finish(&self, ex: Exchange, mut response: Response<ProxyBody>) -> Response<ProxyBody> {
        let headers = response.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&ex.cache_status()) {
            headers.insert(CACHE_STATUS.clone(), v);
        }
        if let Ok(v) = HeaderValue::from_str(&ex.request_id) {
            headers.insert(REQUEST_ID.clone(), v);
        }
        let status = response.status().as_u16();
        let metrics = self.metrics.clone();
        let log = self.access_log.clone();
        let (parts, body) = response.into_parts();
        let body = ObservedBody::new(body, move |bytes, _complete| {
            ex.into_event(status, bytes).emit(&metrics, log.as_deref());
        });
        Response::from_parts(parts, boxed(body))
    }

    async fn process(
        &self,
        rt: &Runtime,
        ex: &mut Exchange,
        req: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        if req.method() == Method::CONNECT {
            // A reverse proxy routes to its own clusters; tunnelling to arbitrary hosts is not
            // its job.
            return Err(ProxyError::NotImplemented("CONNECT is not supported"));
        }
        let (parts, body) = req.into_parts();
        let mut headers = parts.headers;
        let upgrade = headers.contains_key(header::UPGRADE);
        // Before anything is added: a client's `Connection` may only name its own hop's fields.
        strip_hop_by_hop(&mut headers);
        if headers.get_all(HOST).iter().count() > 1 {
            return Err(ProxyError::BadRequest("more than one Host header"));
        }
        // The target's authority wins over Host (RFC 9112 §3.2.2); HTTP/2 has only :authority.
        let authority = match parts.uri.authority() {
            Some(a) => a.as_str().to_owned(),
            None => headers
                .get(HOST)
                .and_then(|v| v.to_str().ok())
                .filter(|h| !h.is_empty())
                .ok_or(ProxyError::BadRequest("missing Host header"))?
                .to_owned(),
        };
        let host_value = HeaderValue::from_str(&authority)
            .map_err(|_| ProxyError::BadRequest("invalid Host"))?;
        headers.insert(HOST, host_value);
        ex.host = normalize_host(&authority, "http");

        let declared = headers
            .get(CONTENT_LENGTH)
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
        let upstream = Upstream {
            cluster,
            timeout: route.timeout.unwrap_or(cluster.request_timeout),
        };

        add_forwarded(&mut headers, ex.client, &authority, "http");
        let request = Incoming_ {
            method: parts.method,
            path_and_query,
            headers,
        };
        let body = LimitedBody::new(boxed(body), rt.limits.max_request_body_size);
        let body = boxed(body);

        if !route.cache {
            return self
                .pass(ex, &upstream, request, body, NoCacheReason::RouteDisabled)
                .await;
        }
        if upgrade {
            return self
                .pass(ex, &upstream, request, body, NoCacheReason::Upgrade)
                .await;
        }
        if request.method != Method::GET && request.method != Method::HEAD {
            let unsafe_method = !matches!(request.method.as_str(), "OPTIONS" | "TRACE");
            let host = ex.host.clone();
            let path = request.path().to_owned();
            let query = request.query().map(str::to_owned);
            let response = self
                .pass(
                    ex,
                    &upstream,
                    request,
                    body,
                    NoCacheReason::MethodNotCacheable,
                )
                .await?;
            // RFC 9111 §4.4: a successful unsafe request invalidates what is stored for its URI.
            if unsafe_method
                && (response.status().is_success() || response.status().is_redirection())
            {
                rt.cache.purge(&host, &path, query.as_deref());
            }
            return Ok(response);
        }
        self.cached(rt, ex, &upstream, request, body).await
    }

    fn target<'a>(ex: &'a Exchange, request: &'a Incoming_) -> RequestTarget<'a> {
        RequestTarget {
            scheme: "http",
            host: &ex.host,
            path: request.path(),
            query: request.query(),
            headers: &request.headers,
        }
    }

    async fn cached(
        &self,
        rt: &Runtime,
        ex: &mut Exchange,
        upstream: &Upstream<'_>,
        request: Incoming_,
        body: ProxyBody,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let now = SystemTime::now();
        let directives = request_directives(&request.headers);
        let lookup = rt.cache.lookup(&Self::target(ex, &request));
        let head = request.method == Method::HEAD;
        match lookup {
            Lookup::NoResourceType => {
                self.pass(ex, upstream, request, body, NoCacheReason::NoResourceType)
                    .await
            }
            Lookup::Found(hit) => {
                ex.resource_type = Some(rt.cache.resource_type_name(hit.resource_type).to_owned());
                if hit.stored().freshness.satisfies(&directives, now) {
                    return Ok(self.serve_hit(ex, &request, &hit, CacheResult::Hit, now));
                }
                if directives.only_if_cached {
                    return Err(ProxyError::OnlyIfCached);
                }
                if head {
                    return self
                        .pass(ex, upstream, request, body, NoCacheReason::HeadMiss)
                        .await;
                }
                let primary = hit.primary.clone();
                let revalidate = has_validator(&hit.stored().headers).then_some(hit);
                self.fill(rt, ex, upstream, request, body, primary, revalidate)
                    .await
            }
            Lookup::Miss {
                fill_key,
                resource_type,
            } => {
                ex.resource_type = Some(rt.cache.resource_type_name(resource_type).to_owned());
                if directives.only_if_cached {
                    return Err(ProxyError::OnlyIfCached);
                }
                let reason = if head {
                    Some(NoCacheReason::HeadMiss)
                } else if request.headers.contains_key(RANGE) {
                    Some(NoCacheReason::RangeRequest)
                } else if directives.no_store {
                    Some(NoCacheReason::RequestNoStore)
                } else {
                    None
                };
                match reason {
                    Some(reason) => self.pass(ex, upstream, request, body, reason).await,
                    None => {
                        self.fill(rt, ex, upstream, request, body, fill_key, None)
                            .await
                    }
                }
            }
        }
    }

    /// Fetches for the cache, coalescing with concurrent requests for the same key.
    #[allow(clippy::too_many_arguments)]
    async fn fill(
        &self,
        rt: &Runtime,
        ex: &mut Exchange,
        upstream: &Upstream<'_>,
        request: Incoming_,
        body: ProxyBody,
        fill_key: Key,
        revalidate: Option<Hit>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let guard = if rt.cache.is_hit_for_pass(&fill_key, SystemTime::now()) {
            None
        } else {
            match rt.cache.coalescer().join(&fill_key) {
                Join::Leader(guard) => Some(guard),
                Join::Follower(waiter) => {
                    match waiter.wait(rt.coalesce_timeout).await {
                        Ok(()) => {
                            let now = SystemTime::now();
                            if let Lookup::Found(hit) = rt.cache.lookup(&Self::target(ex, &request))
                                && hit
                                    .stored()
                                    .freshness
                                    .satisfies(&request_directives(&request.headers), now)
                            {
                                ex.collapsed = true;
                                return Ok(self.serve_hit(
                                    ex,
                                    &request,
                                    &hit,
                                    CacheResult::Coalesced,
                                    now,
                                ));
                            }
                        }
                        Err(_) => ex.reason = Some(NoCacheReason::CoalesceTimeout),
                    }
                    None
                }
                Join::Overflow => {
                    ex.reason = Some(NoCacheReason::CoalesceOverflow);
                    None
                }
            }
        };
        self.fetch_for_cache(rt, ex, upstream, request, body, fill_key, revalidate, guard)
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn fetch_for_cache(
        &self,
        rt: &Runtime,
        ex: &mut Exchange,
        upstream: &Upstream<'_>,
        request: Incoming_,
        body: ProxyBody,
        fill_key: Key,
        revalidate: Option<Hit>,
        guard: Option<FillGuard>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        // The cache wants the full response; the client's own conditions are answered from it.
        let mut headers = request.headers.clone();
        headers.remove(IF_NONE_MATCH);
        headers.remove(IF_MODIFIED_SINCE);
        if let Some(hit) = &revalidate {
            let stored = &hit.stored().headers;
            if let Some(etag) = stored.get(ETAG) {
                headers.insert(IF_NONE_MATCH, etag.clone());
            }
            if let Some(lm) = stored.get(LAST_MODIFIED) {
                headers.insert(IF_MODIFIED_SINCE, lm.clone());
            }
        }
        let request_time = SystemTime::now();
        let generation = rt.cache.purge_generation();
        let fetched = self
            .forward(
                ex,
                upstream,
                UpstreamRequest {
                    method: request.method.clone(),
                    path_and_query: request.path_and_query.clone(),
                    headers,
                },
                body,
            )
            .await?;
        let response_time = SystemTime::now();
        let (mut parts, upstream_body) = fetched.into_parts();
        strip_hop_by_hop(&mut parts.headers);

        if let Some(hit) = &revalidate
            && parts.status == StatusCode::NOT_MODIFIED
        {
            let target = Self::target(ex, &request);
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

        ex.result = if revalidate.is_some() {
            CacheResult::Expired
        } else {
            CacheResult::Miss
        };
        let admitted = rt.cache.admit(
            &request.method,
            &Self::target(ex, &request),
            parts.status,
            &parts.headers,
            request_time,
            response_time,
            generation,
        );
        let admission = match admitted {
            Ok(admission) => admission,
            Err(reason) => {
                ex.reason = Some(reason);
                if reason.is_response_side() {
                    // Requests for this key stop queueing behind each other for a while.
                    rt.cache.mark_hit_for_pass(&fill_key, response_time);
                }
                if let Some(stale) = &revalidate {
                    // The origin's new answer replaces the stale one, even if it can't be stored.
                    rt.cache.remove(stale);
                }
                drop(guard);
                append_via(&mut parts.headers);
                return Ok(Response::from_parts(parts, boxed(upstream_body)));
            }
        };
        ex.stored = true;
        ex.resource_type = Some(
            rt.cache
                .resource_type_name(admission.resource_type())
                .to_owned(),
        );
        let exact_len = parts
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let (tx, rx) = mpsc::unbounded_channel();
        let flow = Arc::new(FeedFlow::default());
        tokio::spawn(
            Fill {
                tx,
                flow: flow.clone(),
                cache: rt.cache.clone(),
                fill_key,
                guard,
                idle_timeout: upstream.timeout,
            }
            .run(upstream_body, admission),
        );
        append_via(&mut parts.headers);
        if parts.status == StatusCode::OK && not_modified(&request.headers, &parts.headers) {
            // The client already has it; the fill goes on without this client.
            drop(rx);
            return Ok(not_modified_response(&parts.headers));
        }
        Ok(Response::from_parts(
            parts,
            boxed(ChannelBody::new(rx, flow, exact_len)),
        ))
    }

    /// Forwards without storing.
    async fn pass(
        &self,
        ex: &mut Exchange,
        upstream: &Upstream<'_>,
        request: Incoming_,
        body: ProxyBody,
        reason: NoCacheReason,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        ex.bypass(reason);
        let response = self
            .forward(
                ex,
                upstream,
                UpstreamRequest {
                    method: request.method,
                    path_and_query: request.path_and_query,
                    headers: request.headers,
                },
                body,
            )
            .await?;
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        append_via(&mut parts.headers);
        Ok(Response::from_parts(parts, boxed(body)))
    }

    async fn forward(
        &self,
        ex: &mut Exchange,
        upstream: &Upstream<'_>,
        request: UpstreamRequest,
        body: ProxyBody,
    ) -> Result<Response<Incoming>, ProxyError> {
        let result = upstream.cluster.send(request, body, upstream.timeout).await;
        let (duration, error) = match &result {
            Ok(r) => (r.duration, None),
            Err(e) => (e.duration, (!e.body_too_large).then_some(e.kind)),
        };
        UpstreamEvent {
            cluster: &upstream.cluster.name,
            duration,
            error,
        }
        .emit(&self.metrics);
        ex.upstream_duration = Some(duration);
        let response = result?;
        ex.upstream_address = Some(response.endpoint);
        ex.fwd_status = Some(response.response.status().as_u16());
        Ok(response.response)
    }

    fn serve_hit(
        &self,
        ex: &mut Exchange,
        request: &Incoming_,
        hit: &Hit,
        result: CacheResult,
        now: SystemTime,
    ) -> Response<ProxyBody> {
        let stored = hit.stored();
        ex.result = result;
        let age = stored.freshness.current_age(now).as_secs();
        ex.ttl = Some(stored.freshness.lifetime.as_secs() as i64 - age as i64);
        // Conditions apply to a successful representation (RFC 9110 §13.2.1), never to a stored 404.
        if stored.status.is_success() && not_modified(&request.headers, &stored.headers) {
            let mut response = not_modified_response(&stored.headers);
            response
                .headers_mut()
                .insert(header::AGE, HeaderValue::from(age));
            return response;
        }
        let mut headers = stored.headers.clone();
        headers.insert(header::AGE, HeaderValue::from(age));
        headers.insert(CONTENT_LENGTH, HeaderValue::from(stored.body.len()));
        append_via(&mut headers);
        let body = if request.method == Method::HEAD {
            empty()
        } else {
            full(stored.body.clone())
        };
        let mut response = Response::new(body);
        *response.status_mut() = stored.status;
        *response.headers_mut() = headers;
        response
    }
}

/// A 304 carries only the fields RFC 9110 §15.4.5 lists for it.
fn not_modified_response(headers: &HeaderMap) -> Response<ProxyBody> {
    let mut response = Response::new(empty());
    *response.status_mut() = StatusCode::NOT_MODIFIED;
    for name in [
        header::CACHE_CONTROL,
        header::CONTENT_LOCATION,
        header::DATE,
        header::ETAG,
        header::EXPIRES,
        header::VARY,
        header::LAST_MODIFIED,
    ] {
        for value in headers.get_all(&name) {
            response.headers_mut().append(name.clone(), value.clone());
        }
    }
    append_via(response.headers_mut());
    response
}

/// Past this many bytes queued for a client, a fill that no longer buffers for the cache waits
/// for the client (memory stays bounded for objects streamed through).
const CLIENT_HIGH_WATER: u64 = 1 << 20;

/// Reads one origin body, feeding the client and the cache. While the body is being buffered
/// for the cache (at most `max_object_size`), the client's pace never slows the read, so a slow
/// or vanished client cannot hold the key's fill and stall everyone coalesced on it. Only a body
/// that ends cleanly is stored.
struct Fill {
    tx: mpsc::UnboundedSender<FeedItem>,
    flow: Arc<FeedFlow>,
    cache: Arc<larder_cache::Cache>,
    fill_key: Key,
    guard: Option<FillGuard>,
    idle_timeout: Duration,
}

impl Fill {
    async fn run(mut self, mut body: Incoming, admission: Admission) {
        let max = admission.max_object_size();
        let mut chunks: Vec<Bytes> = Vec::new();
        let mut buffered = 0u64;
        let mut storing = true;
        loop {
            let frame = match tokio::time::timeout(self.idle_timeout, body.frame()).await {
                Ok(Some(Ok(frame))) => frame,
                Ok(None) => break,
                Ok(Some(Err(e))) => return self.fail(Box::new(e)),
                Err(_) => return self.fail("the origin stopped sending the body".into()),
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
                } else {
                    buffered += len;
                    chunks.push(data.clone());
                }
            }
            let client_open = !self.tx.is_closed();
            if client_open {
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
        if storing {
            // One exact-size copy: the stored body owns no slack capacity and no shared buffers.
            let mut body = BytesMut::with_capacity(buffered as usize);
            for chunk in &chunks {
                body.extend_from_slice(chunk);
            }
            drop(chunks);
            self.cache.commit(admission, body.freeze());
        }
        let _ = self.tx.send(FeedItem::End);
        // The guard drops last, after the commit, so waiters find the stored response.
    }

    fn fail(self, error: crate::body::BoxError) {
        let _ = self.tx.send(FeedItem::Error(error));
    }
}

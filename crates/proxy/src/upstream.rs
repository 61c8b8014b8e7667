//! Upstream clusters: endpoint choice, pooled keep-alive connections, timeouts, and the single
//! place where transport failures are classified.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, Method, Request, Response, Uri, Version};
use http_body::Body;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use larder_telemetry::{Breaker, UpstreamConnectionMetrics, UpstreamErrorKind};
use tokio::net::TcpStream;

use crate::balance::Balancer;
use crate::body::{ProxyBody, empty};
use arc_swap::ArcSwap;

mod http1;
mod pool;
pub use http1::Http1Error;
pub use pool::ResponseBody;

pub struct Cluster {
    pub name: Arc<str>,
    /// Swapped whole when DNS discovery finds a different set of endpoints.
    balancer: Arc<ArcSwap<Balancer>>,
    /// HTTP/2 clusters' requests, and every cluster's health checks.
    client: Client<MeteredConnector, ProxyBody>,
    /// HTTP/1 clusters' requests.
    http1: Option<Arc<pool::Pool>>,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    connections: Arc<ConnectionLimit>,
    /// `https` for clusters with `tls:`.
    scheme: Scheme,
    metrics: UpstreamConnectionMetrics,
    /// Requests waiting for response headers now, against `max_requests`.
    in_flight: std::sync::atomic::AtomicUsize,
    max_requests: usize,
    /// Retries in progress, kept within a fifth of `in_flight` (the retry budget).
    retrying: std::sync::atomic::AtomicUsize,
    retry_on_status: Vec<u16>,
    max_retries: u32,
}

/// Holds a unit of a counter for as long as it lives.
struct Held<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Held<'a> {
    fn take(counter: &'a std::sync::atomic::AtomicUsize) -> Held<'a> {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Held(counter)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("name", &self.name)
            .field("endpoints", &self.balancer.load().endpoints)
            .finish()
    }
}

#[derive(Debug)]
pub struct UpstreamResponse {
    pub response: Response<ResponseBody>,
    pub endpoint: Arc<str>,
    pub duration: Duration,
    /// Sends after the first (connect failures, closed pooled connections).
    pub retries: u32,
}

#[derive(Debug, thiserror::Error)]
#[error("{kind:?} error from cluster upstream {endpoint:?}: {message}")]
pub struct UpstreamError {
    pub kind: UpstreamErrorKind,
    pub endpoint: Option<Arc<str>>,
    pub message: String,
    pub duration: Duration,
    /// The client's request body failed: over the limit, or malformed (the client's fault,
    /// not the upstream's).
    pub client_fault: Option<ClientFault>,
    /// The connection closed or was reset before any response arrived (typically a pooled
    /// connection the origin had just timed out).
    pub stale_connection: bool,
    /// Sends after the first.
    pub retries: u32,
    /// No connection was made (refused, unreachable, connect timeout): the origin saw nothing.
    pub nothing_sent: bool,
    /// Which circuit breaker refused the request (kind `Overflow`).
    pub breaker: Option<Breaker>,
}

/// How a client's request body broke an upstream exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientFault {
    /// Over `max_request_body_size`: 413.
    BodyTooLarge,
    /// Malformed framing or the client gone mid-body: 400.
    BadBody,
    /// The body stopped arriving for `limits.request_body_timeout`: 408.
    BodyTimeout,
}

/// How long one upstream exchange may take, phase by phase: a route's settings over its
/// cluster's.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    /// Until the response headers.
    pub first_byte: Duration,
    /// The longest wait for the next chunk of the response body.
    pub idle: Duration,
    /// From the first send to the last body byte, retries included.
    pub total: Option<Duration>,
}

tokio::task_local! {
    /// The connect timeout of the request being sent: the pool's connector is shared by every
    /// route of the cluster and sees only a URI, so the route's value travels with the task.
    static CONNECT_TIMEOUT: Duration;
}

/// What to send upstream; the body is separate so a bodiless request can be replayed on
/// another endpoint after a connect failure.
pub struct UpstreamRequest {
    pub method: Method,
    pub path_and_query: PathAndQuery,
    pub headers: HeaderMap,
    /// The fields this hop adds, written after `headers`; set as the request goes upstream
    /// (`Proxy::forward`).
    pub hop: Option<crate::headers::HopFields>,
}

impl Cluster {
    /// Fails when the cluster's TLS files cannot be loaded (the error names them).
    pub fn new(
        config: &larder_config::Cluster,
        metrics: &larder_telemetry::Metrics,
    ) -> Result<Cluster, String> {
        let name: Arc<str> = config.name.as_str().into();
        let mut connector = HttpConnector::new();
        // The route's connect timeout applies in `MeteredConnector`, around TLS as well.
        connector.set_connect_timeout(None);
        connector.set_nodelay(true);
        connector.set_keepalive(Some(Duration::from_secs(60)));
        // TLS, when configured, happens inside the connector: the pool keeps TLS sessions.
        connector.enforce_http(false);
        let tls_client = match &config.tls {
            Some(tls) => {
                upstream_tls(tls).map_err(|e| format!("cluster {:?}: {e}", config.name))?
            }
            None => upstream_tls_unused(),
        };
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_client)
            .https_or_http();
        let builder = match config.tls.as_ref().and_then(|t| t.server_name.clone()) {
            Some(server_name) => builder.with_server_name_resolver(FixedServerName(server_name)),
            None => builder
                .with_server_name_resolver(hyper_rustls::DefaultServerNameResolver::default()),
        };
        // ALPN offers exactly the protocol the cluster is set to speak.
        let https = if config.http2 {
            builder.enable_http2().wrap_connector(connector)
        } else {
            builder.enable_http1().wrap_connector(connector)
        };
        let scheme = if config.tls.is_some() {
            Scheme::HTTPS
        } else {
            Scheme::HTTP
        };
        let connections = Arc::new(ConnectionLimit {
            slots: Arc::new(tokio::sync::Semaphore::new(config.max_connections)),
            max: config.max_connections,
            waiting: Default::default(),
            max_waiting: config.max_pending_requests,
        });
        let connector = MeteredConnector {
            inner: https,
            metrics: metrics.upstream_connection_metrics(&name),
            limit: connections.clone(),
            default_connect_timeout: config.connect_timeout,
            cluster: name.clone(),
        };
        let http1 = (!config.http2).then(|| {
            pool::Pool::new(
                connector.clone(),
                scheme.clone(),
                config.max_idle_connections,
                config.idle_timeout,
            )
        });
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(config.idle_timeout)
            .pool_max_idle_per_host(config.max_idle_connections)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .http2_only(config.http2)
            .build(connector);
        let endpoints = config
            .endpoints
            .iter()
            .map(|e| {
                let display = e.to_string();
                let authority: Authority = display
                    .parse()
                    .expect("validated endpoint is a valid authority");
                (authority, Arc::from(display), e.weight)
            })
            .collect();
        let balancer = Arc::new(ArcSwap::from_pointee(Balancer::new(
            endpoints,
            config.lb_policy,
            config.outlier_detection.clone(),
        )));
        let discovered = crate::discovery::Discovered {
            balancer: Arc::downgrade(&balancer),
            policy: config.lb_policy,
            outlier: config.outlier_detection.clone(),
            cluster: name.clone(),
        };
        if let Some(dns) = &config.dns {
            tokio::spawn(crate::discovery::dns(discovered, dns.clone()));
        } else if let Some(kubernetes) = &config.kubernetes {
            crate::discovery::kubernetes(discovered, kubernetes.clone())
                .map_err(|e| format!("cluster {:?}: {e}", config.name))?;
        }
        if let Some(check) = &config.health_check {
            tokio::spawn(health_checks(
                Arc::downgrade(&balancer),
                client.clone(),
                check.clone(),
                name.clone(),
                scheme.clone(),
            ));
        }
        Ok(Cluster {
            scheme,
            balancer,
            metrics: metrics.upstream_connection_metrics(&name),
            name,
            client,
            http1,
            connect_timeout: config.connect_timeout,
            request_timeout: config.request_timeout,
            connections,
            in_flight: Default::default(),
            max_requests: config.max_requests,
            retrying: Default::default(),
            retry_on_status: config.retry_on_status.clone(),
            max_retries: config.max_retries,
        })
    }

    /// Endpoint health and load, and the breakers' limits and usage, for `/clusters`.
    pub fn snapshot(&self) -> serde_json::Value {
        use std::sync::atomic::Ordering::Relaxed;
        let limit = &self.connections;
        serde_json::json!({
            "name": &*self.name,
            "endpoints": self.balancer.load().snapshot(),
            "circuit_breakers": {
                "max_requests": self.max_requests,
                "requests": self.in_flight.load(Relaxed),
                "max_connections": limit.max,
                "connections": limit.max - limit.slots.available_permits(),
                "max_pending_requests": limit.max_waiting,
                "pending_requests": limit.waiting.load(Relaxed),
            },
        })
    }

    /// Sends the request to one endpoint (round robin). A connect failure of a bodiless request
    /// moves on to the next endpoint, since nothing reached the origin.
    #[allow(clippy::manual_async_fn)] // its future stays small: see `Proxy::handle`
    pub fn send(
        &self,
        request: &mut UpstreamRequest,
        body: ProxyBody,
        timeouts: &Timeouts,
        interim: Option<&crate::interim::InterimSink>,
    ) -> impl Future<Output = Result<UpstreamResponse, UpstreamError>> {
        async move {
            let start = Instant::now();
            use std::sync::atomic::Ordering::Relaxed;
            // The response headers are due by the first-byte timeout, and by the total one.
            let (timeout, which) = match timeouts.total {
                Some(total) if total < timeouts.first_byte => (total, "total_timeout"),
                _ => (timeouts.first_byte, "timeout"),
            };
            // One deadline for every attempt, from the one clock reading.
            let deadline = tokio::time::Instant::from_std(start) + timeout;
            // Circuit breaking: a struggling upstream gets no queue of requests behind it.
            if self.in_flight.load(Relaxed) >= self.max_requests {
                self.metrics.breaker_tripped(Breaker::MaxRequests);
                return Err(UpstreamError {
                    kind: UpstreamErrorKind::Overflow,
                    endpoint: None,
                    message: format!(
                        "{} requests in flight to cluster {} (max_requests)",
                        self.max_requests, self.name
                    ),
                    duration: start.elapsed(),
                    client_fault: None,
                    stale_connection: false,
                    retries: 0,
                    nothing_sent: true,
                    breaker: Some(Breaker::MaxRequests),
                });
            }
            let _in_flight = Held::take(&self.in_flight);
            // Only what can be sent again safely is: idempotent, and no body already consumed.
            let replayable = body.is_end_stream() && request.method.is_idempotent();
            // One endpoint set for the whole request, even if discovery swaps it meanwhile.
            let balancer = self.balancer.load_full();
            let attempts = if replayable {
                balancer
                    .endpoints
                    .len()
                    .clamp(2, 3)
                    .max(1 + self.max_retries as usize)
            } else {
                1
            };
            let mut status_retries = 0;
            let mut body = Some(body);
            let mut last_error: Option<UpstreamError> = None;
            // The URL the request names: what ring hashing keeps on one endpoint.
            let hash_key = if balancer.hashes_requests() {
                let host = request
                    .headers
                    .get(http::header::HOST)
                    .map_or(&b""[..], |h| h.as_bytes());
                [host, request.path_and_query.as_str().as_bytes()].concat()
            } else {
                Vec::new()
            };
            let mut tried: Vec<usize> = Vec::new();
            // A retry's pause, slept here rather than where it was decided: there the
            // response just dropped would keep its room in this future across the sleep.
            let mut pause_before: Option<(Held, Duration)> = None;
            for attempt in 0..attempts as u32 {
                if let Some((_retrying, pause)) = pause_before.take() {
                    tokio::time::sleep(pause).await;
                }
                let Some(pick) = balancer.pick(&hash_key, &tried) else {
                    break;
                };
                let endpoint = pick.endpoint;
                tried.push(pick.index);
                let sent = self
                    .attempt(
                        &endpoint.authority,
                        request,
                        attempt + 1 == attempts as u32,
                        body.take().unwrap_or_else(empty),
                        interim,
                        timeouts,
                        deadline,
                    )
                    .await;
                let error = match sent {
                    Ok(response) => {
                        // Gateway errors count against the endpoint, though they are relayed.
                        let status = response.status().as_u16();
                        let failed = matches!(status, 502..=504);
                        if balancer.record(pick.index, failed) {
                            self.metrics.ejected();
                        }
                        let budget = (self.in_flight.load(Relaxed) / 5).max(3);
                        let retry = replayable
                            && self.retry_on_status.contains(&status)
                            && status_retries < self.max_retries
                            && attempt + 1 < attempts as u32
                            && self.retrying.load(Relaxed) < budget;
                        if retry {
                            status_retries += 1;
                            drop(response);
                            drop(pick);
                            // Jittered, so replicas retrying together do not arrive together.
                            let pause = Duration::from_millis(25 + fastrand::u64(..25));
                            pause_before = Some((
                                Held::take(&self.retrying),
                                pause.min(timeout.saturating_sub(start.elapsed())),
                            ));
                            continue;
                        }
                        return Ok(UpstreamResponse {
                            response,
                            endpoint: endpoint.display.clone(),
                            duration: start.elapsed(),
                            retries: attempt,
                        });
                    }
                    Err(e) if !e.error.is::<HeadTimedOut>() => {
                        classify(&e, &endpoint.display, start, attempt)
                    }
                    Err(_) => UpstreamError {
                        kind: UpstreamErrorKind::Timeout,
                        endpoint: Some(endpoint.display.clone()),
                        message: format!("no response headers within {timeout:?} (route {which})"),
                        duration: start.elapsed(),
                        client_fault: None,
                        stale_connection: false,
                        retries: attempt,
                        nothing_sent: false,
                        breaker: None,
                    },
                };
                // A request body too large is the client's doing, a full breaker the cluster's
                // load: neither says anything of the endpoint.
                let endpoints_fault =
                    error.client_fault.is_none() && error.kind != UpstreamErrorKind::Overflow;
                if endpoints_fault && balancer.record(pick.index, true) {
                    self.metrics.ejected();
                }
                drop(pick);
                // Safe to resend, for idempotent requests only: nothing reached an origin (connect
                // failure), or the connection closed or was reset before any response byte came.
                let retry = replayable && (error.nothing_sent || error.stale_connection);
                last_error = Some(error);
                if !retry {
                    break;
                }
            }
            Err(last_error.unwrap_or_else(|| UpstreamError {
                kind: UpstreamErrorKind::NoEndpoint,
                endpoint: None,
                message: format!("cluster {} has no endpoints", self.name),
                duration: start.elapsed(),
                client_fault: None,
                stale_connection: false,
                retries: 0,
                nothing_sent: true,
                breaker: None,
            }))
        }
    }
}

impl Cluster {
    /// One try on one endpoint: on the cluster's HTTP/1 pool (which writes the fields from
    /// where they are), or hyper-util's for HTTP/2. `last`: no other attempt follows.
    /// `deadline`: when the response head is due (`HeadTimedOut` after it).
    #[allow(clippy::too_many_arguments)]
    #[allow(clippy::manual_async_fn)] // its future stays small: see `Proxy::handle`
    fn attempt(
        &self,
        endpoint: &Authority,
        request: &mut UpstreamRequest,
        last: bool,
        body: ProxyBody,
        interim: Option<&crate::interim::InterimSink>,
        timeouts: &Timeouts,
        deadline: tokio::time::Instant,
    ) -> impl Future<Output = Result<Response<ResponseBody>, AttemptError>> {
        async move {
            if let Some(pool) = &self.http1 {
                return pool
                    .send(
                        endpoint,
                        &request.method,
                        &request.path_and_query,
                        &request.headers,
                        request.hop.as_ref(),
                        body,
                        interim,
                        timeouts.connect,
                        deadline,
                    )
                    .await;
            }
            let mut req = Request::new(body);
            *req.method_mut() = request.method.clone();
            *req.version_mut() = Version::HTTP_11;
            // hyper takes the fields: only an attempt that may be followed by another copies them.
            *req.headers_mut() = if last {
                std::mem::take(&mut request.headers)
            } else {
                request.headers.clone()
            };
            if let Some(hop) = &request.hop {
                hop.insert_into(req.headers_mut());
            }
            if let Some(sink) = interim {
                let sink = sink.clone();
                hyper::ext::on_informational(&mut req, move |res| {
                    sink.send(res.status(), res.headers())
                });
            }
            *req.uri_mut() = Uri::builder()
                .scheme(self.scheme.clone())
                .authority(endpoint.clone())
                .path_and_query(request.path_and_query.clone())
                .build()
                .expect("authority and path are valid");
            let sent = tokio::time::timeout_at(
                deadline,
                CONNECT_TIMEOUT.scope(timeouts.connect, self.client.request(req)),
            );
            match sent.await {
                Ok(Ok(response)) => Ok(response.map(ResponseBody::detached)),
                Ok(Err(e)) => Err(AttemptError {
                    connect: e.is_connect(),
                    error: Box::new(e),
                }),
                Err(_) => Err(AttemptError {
                    error: Box::new(HeadTimedOut),
                    connect: false,
                }),
            }
        }
    }
}

/// Why one try failed.
struct AttemptError {
    error: Box<dyn std::error::Error + Send + Sync>,
    /// No connection was made (nothing reached the endpoint).
    connect: bool,
}

fn classify(
    attempt: &AttemptError,
    endpoint: &Arc<str>,
    start: Instant,
    retries: u32,
) -> UpstreamError {
    let e: &(dyn std::error::Error + 'static) = &*attempt.error;
    let client_fault = if source_chain(e).any(|s| s.is::<crate::body::BodyTooLarge>()) {
        Some(ClientFault::BodyTooLarge)
    } else if source_chain(e).any(|s| s.is::<crate::body::ClientBodyError>()) {
        if source_chain(e).any(|s| s.is::<crate::body::BodyIdleTimeout>()) {
            Some(ClientFault::BodyTimeout)
        } else {
            Some(ClientFault::BadBody)
        }
    } else {
        None
    };
    // Closed or reset before any response byte: a pooled connection the origin had just timed
    // out, or an origin that dropped the request. An idempotent request may go again.
    let stale_connection = source_chain(e).any(|s| {
        s.downcast_ref::<hyper::Error>()
            .is_some_and(|h| h.is_incomplete_message() || h.is_canceled())
            || matches!(
                s.downcast_ref::<Http1Error>(),
                Some(Http1Error::IncompleteHead)
            )
            || s.downcast_ref::<std::io::Error>().is_some_and(|io| {
                matches!(
                    io.kind(),
                    std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::BrokenPipe
                )
            })
    });
    let breaker = source_chain(e)
        .find_map(|s| s.downcast_ref::<BreakerOpen>())
        .map(|open| open.breaker);
    let kind = if breaker.is_some() {
        UpstreamErrorKind::Overflow
    } else if source_chain(e).any(|s| s.is::<ConnectTimedOut>()) {
        UpstreamErrorKind::Timeout
    } else if attempt.connect {
        UpstreamErrorKind::Connect
    } else {
        UpstreamErrorKind::Protocol
    };
    let nothing_sent = attempt.connect && kind != UpstreamErrorKind::Overflow;
    let message = source_chain(e)
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(": ");
    UpstreamError {
        kind,
        endpoint: Some(endpoint.clone()),
        message,
        duration: start.elapsed(),
        client_fault,
        stale_connection,
        retries,
        nothing_sent,
        breaker,
    }
}

fn source_chain<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |e| e.source())
}

/// Connections open to one cluster (`max_connections`) and connects waiting for one of them
/// (`max_pending_requests`): kept here, in the connector, because hyper's pool has no limit.
struct ConnectionLimit {
    slots: Arc<tokio::sync::Semaphore>,
    max: usize,
    waiting: std::sync::atomic::AtomicUsize,
    max_waiting: usize,
}

/// A circuit breaker refused a connection.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
struct BreakerOpen {
    breaker: Breaker,
    message: String,
}

#[derive(Debug, thiserror::Error)]
#[error("connect timed out after {0:?}")]
struct ConnectTimedOut(Duration);

/// The attempt's response head was not in by the request's deadline (first-byte or total
/// timeout): turned into the timeout error by `Cluster::send`, which knows which one it was.
#[derive(Debug, thiserror::Error)]
#[error("no response headers by the deadline")]
struct HeadTimedOut;

/// Wraps the TCP connector to bound, time and count connections: the pool does none of it.
#[derive(Clone)]
struct MeteredConnector {
    inner: hyper_rustls::HttpsConnector<HttpConnector>,
    metrics: UpstreamConnectionMetrics,
    limit: Arc<ConnectionLimit>,
    /// For connects outside a request (health checks).
    default_connect_timeout: Duration,
    cluster: Arc<str>,
}

impl MeteredConnector {
    /// A `max_connections` slot, waiting for one until `deadline` when all are taken (if fewer
    /// than `max_pending_requests` already wait). With `or_parked`, the wait also ends, with
    /// `None`, when a pooled connection comes free: the caller takes that one instead.
    async fn slot(
        &self,
        connect_timeout: Duration,
        deadline: tokio::time::Instant,
        or_parked: Option<&tokio::sync::Notify>,
    ) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, BreakerOpen> {
        let limit = &self.limit;
        if let Ok(slot) = limit.slots.clone().try_acquire_owned() {
            return Ok(Some(slot));
        }
        self.metrics.breaker_tripped(Breaker::MaxConnections);
        // Claim a place in the queue, or give up at once when it is full.
        use std::sync::atomic::Ordering::Relaxed;
        let queued = limit.waiting.fetch_update(Relaxed, Relaxed, |n| {
            (n < limit.max_waiting).then_some(n + 1)
        });
        if queued.is_err() {
            self.metrics.breaker_tripped(Breaker::MaxPendingRequests);
            return Err(BreakerOpen {
                breaker: Breaker::MaxPendingRequests,
                message: format!(
                    "{} requests already wait for a connection to cluster {} \
                     (max_pending_requests)",
                    limit.max_waiting, self.cluster
                ),
            });
        }
        // Claimed by fetch_update above; released when the wait ends, however.
        let _queued = Held(&limit.waiting);
        let parked = async {
            match or_parked {
                Some(parked) => parked.notified().await,
                None => std::future::pending().await,
            }
        };
        let acquired = tokio::time::timeout_at(deadline, async {
            tokio::select! {
                slot = limit.slots.clone().acquire_owned() => slot.ok(),
                () = parked => None,
            }
        })
        .await;
        match acquired {
            Ok(Some(slot)) => Ok(Some(slot)),
            Ok(None) if or_parked.is_some() => Ok(None),
            _ => Err(BreakerOpen {
                breaker: Breaker::MaxConnections,
                message: format!(
                    "no connection to cluster {} free within {connect_timeout:?} ({} open: \
                     max_connections)",
                    self.cluster, limit.max
                ),
            }),
        }
    }

    /// Opens a connection (TCP, and TLS for `https`) in the slot, by `deadline`.
    async fn open(
        &self,
        uri: Uri,
        slot: tokio::sync::OwnedSemaphorePermit,
        started: Instant,
        deadline: tokio::time::Instant,
        connect_timeout: Duration,
    ) -> Result<MeteredIo, Box<dyn std::error::Error + Send + Sync>> {
        let mut inner = self.inner.clone();
        let io =
            match tokio::time::timeout_at(deadline, tower_service::Service::call(&mut inner, uri))
                .await
            {
                Ok(io) => io?,
                Err(_) => return Err(ConnectTimedOut(connect_timeout).into()),
            };
        self.metrics.connected(started.elapsed());
        Ok(MeteredIo {
            io,
            metrics: self.metrics.clone(),
            _slot: slot,
        })
    }
}

impl tower_service::Service<Uri> for MeteredConnector {
    type Response = MeteredIo;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<MeteredIo, Self::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connect_timeout = CONNECT_TIMEOUT
            .try_with(|t| *t)
            .unwrap_or(self.default_connect_timeout);
        let this = self.clone();
        Box::pin(async move {
            let started = Instant::now();
            let deadline = tokio::time::Instant::now() + connect_timeout;
            // Meanwhile the pool may hand the request a connection another finished with;
            // this connect then completes in the background, for the pool.
            let slot = this
                .slot(connect_timeout, deadline, None)
                .await?
                .expect("only a wait for a parked connection ends without a slot");
            this.open(uri, slot, started, deadline, connect_timeout)
                .await
        })
    }
}

/// An upstream connection that reports its closing and frees its `max_connections` slot.
struct MeteredIo {
    io: hyper_rustls::MaybeHttpsStream<TokioIo<TcpStream>>,
    metrics: UpstreamConnectionMetrics,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for MeteredIo {
    fn drop(&mut self) {
        self.metrics.closed();
    }
}

impl Connection for MeteredIo {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}

impl hyper::rt::Read for MeteredIo {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for MeteredIo {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

/// Asks every endpoint `GET path` each interval until the cluster is gone (a reload replaced
/// it), moving endpoints out of rotation and back by the thresholds.
async fn health_checks(
    balancer: std::sync::Weak<ArcSwap<Balancer>>,
    client: Client<MeteredConnector, ProxyBody>,
    check: larder_config::HealthCheck,
    cluster: Arc<str>,
    scheme: Scheme,
) {
    let mut ticks = tokio::time::interval(check.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(current) = balancer.upgrade() else {
            return;
        };
        let balancer_now = current.load_full();
        let balancer = &balancer_now;
        let probes = balancer.endpoints.iter().enumerate().map(|(i, endpoint)| {
            let client = client.clone();
            let uri = Uri::builder()
                .scheme(scheme.clone())
                .authority(endpoint.authority.clone())
                .path_and_query(check.path.as_str())
                .build();
            let timeout = check.timeout;
            async move {
                let Ok(uri) = uri else { return (i, false) };
                let mut req = Request::new(empty());
                *req.uri_mut() = uri;
                req.headers_mut().insert(
                    http::header::USER_AGENT,
                    http::HeaderValue::from_static("larder-health-check"),
                );
                let passed = match tokio::time::timeout(timeout, client.request(req)).await {
                    Ok(Ok(response)) => response.status().is_success(),
                    _ => false,
                };
                (i, passed)
            }
        });
        for (i, passed) in futures_util::future::join_all(probes).await {
            if let Some(healthy) = balancer.record_check(
                i,
                passed,
                check.healthy_threshold,
                check.unhealthy_threshold,
            ) {
                let endpoint = &balancer.endpoints[i].display;
                if healthy {
                    tracing::info!(cluster = %cluster, endpoint = %endpoint, "endpoint passes its health check again");
                } else {
                    tracing::warn!(cluster = %cluster, endpoint = %endpoint, "endpoint failed its health check; out of rotation");
                }
            }
        }
    }
}

/// Resolves the cluster's DNS name every refresh interval and swaps in a new endpoint set
/// when the addresses change, until the cluster is gone.
/// The rustls client setup of a TLS cluster: its CA bundle (or the Mozilla roots), ALPN for
/// HTTP/2 or HTTP/1.1, and an optional client certificate.
fn upstream_tls(tls: &larder_config::UpstreamTls) -> Result<rustls::ClientConfig, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    match &tls.ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|c| c.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("reading tls.ca_file {}: {e}", path.display()))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(format!(
                    "tls.ca_file {} holds no usable certificate",
                    path.display()
                ));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots);
    let config = match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|c| c.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("reading tls.cert_file {}: {e}", cert.display()))?;
            let key_der = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("reading tls.key_file {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| format!("client certificate {}: {e}", cert.display()))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(config)
}

/// Plain clusters never handshake, but the connector wants a TLS setup all the same.
fn upstream_tls_unused() -> rustls::ClientConfig {
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth()
}

/// SNI and certificate name checks use the configured `server_name`, whatever the endpoint's
/// address (endpoints are often IPs).
#[derive(Clone)]
struct FixedServerName(String);

impl hyper_rustls::ResolveServerName for FixedServerName {
    fn resolve(
        &self,
        _: &Uri,
    ) -> Result<rustls_pki_types::ServerName<'static>, Box<dyn std::error::Error + Sync + Send>>
    {
        rustls_pki_types::ServerName::try_from(self.0.clone()).map_err(|e| e.into())
    }
}

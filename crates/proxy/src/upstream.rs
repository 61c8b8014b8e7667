//! Upstream clusters: endpoint choice, pooled keep-alive connections, timeouts, and the single
//! place where transport failures are classified.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, Method, Request, Response, Uri, Version};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use larder_telemetry::UpstreamErrorKind;

use crate::body::{ProxyBody, empty};

#[derive(Debug)]
struct Endpoint {
    authority: Authority,
    display: Arc<str>,
}

pub struct Cluster {
    pub name: Arc<str>,
    endpoints: Vec<Endpoint>,
    next: AtomicUsize,
    client: Client<HttpConnector, ProxyBody>,
    pub request_timeout: Duration,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("name", &self.name)
            .field("endpoints", &self.endpoints)
            .finish()
    }
}

#[derive(Debug)]
pub struct UpstreamResponse {
    pub response: Response<Incoming>,
    pub endpoint: Arc<str>,
    pub duration: Duration,
}

#[derive(Debug, thiserror::Error)]
#[error("{kind:?} error from cluster upstream {endpoint:?}: {message}")]
pub struct UpstreamError {
    pub kind: UpstreamErrorKind,
    pub endpoint: Option<Arc<str>>,
    pub message: String,
    pub duration: Duration,
    /// The request body was over the limit (the client's fault, not the upstream's).
    pub body_too_large: bool,
    /// The connection closed before any response arrived (typically a pooled connection the
    /// origin had just timed out).
    pub stale_connection: bool,
}

/// What to send upstream; the body is separate so a bodiless request can be replayed on
/// another endpoint after a connect failure.
pub struct UpstreamRequest {
    pub method: Method,
    pub path_and_query: PathAndQuery,
    pub headers: HeaderMap,
}

impl Cluster {
    pub fn new(config: &larder_config::Cluster) -> Cluster {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.set_nodelay(true);
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(config.idle_timeout)
            .pool_max_idle_per_host(config.max_idle_connections)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        let endpoints = config
            .endpoints
            .iter()
            .map(|e| {
                let display = e.to_string();
                Endpoint {
                    authority: display
                        .parse()
                        .expect("validated endpoint is a valid authority"),
                    display: display.into(),
                }
            })
            .collect();
        Cluster {
            name: config.name.as_str().into(),
            endpoints,
            next: AtomicUsize::new(0),
            client,
            request_timeout: config.request_timeout,
        }
    }

    fn pick(&self) -> Option<&Endpoint> {
        if self.endpoints.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.endpoints.len();
        Some(&self.endpoints[i])
    }

    /// Sends the request to one endpoint (round robin). A connect failure of a bodiless request
    /// moves on to the next endpoint, since nothing reached the origin.
    pub async fn send(
        &self,
        request: UpstreamRequest,
        body: ProxyBody,
        timeout: Duration,
        interim: Option<&crate::interim::InterimSink>,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let start = Instant::now();
        let replayable = body.is_end_stream();
        let attempts = if replayable {
            self.endpoints.len().clamp(2, 3)
        } else {
            1
        };
        let mut body = Some(body);
        let mut last_error = None;
        for _ in 0..attempts {
            let Some(endpoint) = self.pick() else { break };
            let uri = Uri::builder()
                .scheme(Scheme::HTTP)
                .authority(endpoint.authority.clone())
                .path_and_query(request.path_and_query.clone())
                .build()
                .expect("authority and path are valid");
            let mut req = Request::new(body.take().unwrap_or_else(empty));
            *req.method_mut() = request.method.clone();
            *req.uri_mut() = uri;
            *req.version_mut() = Version::HTTP_11;
            *req.headers_mut() = request.headers.clone();
            if let Some(sink) = interim {
                let sink = sink.clone();
                hyper::ext::on_informational(&mut req, move |res| {
                    sink.send(res.status(), res.headers())
                });
            }
            let remaining = timeout.saturating_sub(start.elapsed());
            let error = match tokio::time::timeout(remaining, self.client.request(req)).await {
                Ok(Ok(response)) => {
                    return Ok(UpstreamResponse {
                        response,
                        endpoint: endpoint.display.clone(),
                        duration: start.elapsed(),
                    });
                }
                Ok(Err(e)) => classify(e, endpoint, start),
                Err(_) => UpstreamError {
                    kind: UpstreamErrorKind::Timeout,
                    endpoint: Some(endpoint.display.clone()),
                    message: format!("no response within {timeout:?}"),
                    duration: start.elapsed(),
                    body_too_large: false,
                    stale_connection: false,
                },
            };
            // Safe to resend: nothing reached an origin (connect failure), or a pooled connection
            // was closed under an idempotent bodiless request before any response byte came.
            let retry = error.kind == UpstreamErrorKind::Connect
                || (error.stale_connection && request.method.is_idempotent());
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
            body_too_large: false,
            stale_connection: false,
        }))
    }
}

fn classify(
    e: hyper_util::client::legacy::Error,
    endpoint: &Endpoint,
    start: Instant,
) -> UpstreamError {
    let body_too_large = source_chain(&e).any(|s| s.is::<crate::body::BodyTooLarge>());
    let stale_connection = source_chain(&e)
        .filter_map(|s| s.downcast_ref::<hyper::Error>())
        .any(|h| h.is_incomplete_message() || h.is_canceled());
    let kind = if e.is_connect() {
        if source_chain(&e).any(|s| s.to_string().contains("timed out")) {
            UpstreamErrorKind::Timeout
        } else {
            UpstreamErrorKind::Connect
        }
    } else {
        UpstreamErrorKind::Protocol
    };
    let message = source_chain(&e)
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(": ");
    UpstreamError {
        kind,
        endpoint: Some(endpoint.display.clone()),
        message,
        duration: start.elapsed(),
        body_too_large,
        stale_connection,
    }
}

fn source_chain<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |e| e.source())
}

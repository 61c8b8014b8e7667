//! Test harness: in-process origins on ephemeral loopback ports that count and record what they
//! receive, a Larder instance started from YAML, and small HTTP client helpers.
#![allow(dead_code)]

pub mod dns;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::sync::Mutex;
use tokio::net::TcpListener;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type TestBody = UnsyncBoxBody<Bytes, BoxError>;

/// What the origin saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub uri: http::Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Seen {
    /// A request header as text ("" when absent).
    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    }
}

type Handler =
    Arc<dyn Fn(Seen) -> Pin<Box<dyn Future<Output = Response<TestBody>> + Send>> + Send + Sync>;

pub struct Origin {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Origin {
    /// Starts an origin whose responses come from `handler`.
    pub async fn start<F, Fut>(handler: F) -> Origin
    where
        F: Fn(Seen) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<TestBody>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener, handler)
    }

    /// An origin on a chosen address (several loopback IPs sharing one port, as DNS-found
    /// endpoints do); `None` when the address is taken.
    pub async fn start_on<F, Fut>(addr: SocketAddr, handler: F) -> Option<Origin>
    where
        F: Fn(Seen) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<TestBody>> + Send + 'static,
    {
        let listener = TcpListener::bind(addr).await.ok()?;
        Some(Self::serve(listener, handler))
    }

    fn serve<F, Fut>(listener: TcpListener, handler: F) -> Origin
    where
        F: Fn(Seen) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<TestBody>> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |seen| Box::pin(handler(seen)));
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let recorded = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let handler = handler.clone();
                let recorded = recorded.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let handler = handler.clone();
                        let recorded = recorded.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let seen = Seen {
                                method: parts.method,
                                uri: parts.uri,
                                headers: parts.headers,
                                body,
                            };
                            recorded.lock().unwrap().push(seen.clone());
                            Ok::<_, Infallible>(handler(seen).await)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Origin { addr, seen }
    }

    /// An origin answering every request with the same status, headers and body.
    pub async fn fixed(status: u16, headers: &[(&str, &str)], body: &'static str) -> Origin {
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Origin::start(move |_| {
            let headers = headers.clone();
            async move {
                response(
                    status,
                    &headers
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect::<Vec<_>>(),
                    body,
                )
            }
        })
        .await
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn last(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("origin saw a request")
    }
}

pub fn body_of(bytes: impl Into<Bytes>) -> TestBody {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

pub fn response(
    status: u16,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Response<TestBody> {
    let mut builder = Response::builder().status(status);
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    builder.body(body_of(body)).unwrap()
}

/// Standard test config: everything to one origin, one catch-all resource type.
pub fn config_yaml(origin: SocketAddr, resource_types: &str) -> String {
    config_yaml_with(
        "      - match: { prefix: \"/\" }\n        cluster: origin\n",
        &format!(
            "  - name: origin\n    endpoints: [\"{origin}\"]\n    connect_timeout: 1s\n    request_timeout: 5s\n"
        ),
        resource_types,
    )
}

/// A test config with these routes (items of `routes:`), clusters (items of `clusters:`) and
/// resource types, on ephemeral ports, without an access log.
pub fn config_yaml_with(routes: &str, clusters: &str, resource_types: &str) -> String {
    format!(
        r#"listeners: [{{ name: http, address: "127.0.0.1:0" }}]
admin: {{ address: "127.0.0.1:0" }}
access_log: {{ enabled: false }}
virtual_hosts:
  - name: all
    domains: ["*"]
    routes:
{routes}clusters:
{clusters}{resource_types}"#
    )
}

/// A loopback address nothing listens on (it did, for a moment): connections are refused.
pub fn closed_address() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

pub const DEFAULT_TYPES: &str =
    "resource_types:\n  - name: default\n    config: { cache_size: 16MiB }\n";

/// An origin that speaks raw bytes, for answers no HTTP library would send (a cut body, a body
/// held back): `serve` runs on each connection it accepts. `connections` counts them.
pub struct RawOrigin {
    pub addr: SocketAddr,
    connections: Arc<AtomicUsize>,
}

impl RawOrigin {
    pub async fn start<F, Fut>(serve: F) -> RawOrigin
    where
        F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let count = connections.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream));
            }
        });
        RawOrigin { addr, connections }
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

pub struct Larder {
    pub server: larder::Server,
    pub client: Client<HttpConnector, Full<Bytes>>,
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap())
            .unwrap_or("")
    }

    pub fn cache_status(&self) -> &str {
        self.header("cache-status")
    }

    /// Fails, showing the whole Cache-Status field, unless it contains `part`.
    #[track_caller]
    pub fn assert_cache_status(&self, part: &str) {
        let status = self.cache_status();
        assert!(
            status.contains(part),
            "Cache-Status {status:?} lacks {part:?}"
        );
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

impl Larder {
    pub async fn start(yaml: &str) -> Larder {
        Self::start_with(yaml, larder::StartOptions::default()).await
    }

    pub async fn start_with(yaml: &str, options: larder::StartOptions) -> Larder {
        let config =
            larder_config::load_str(yaml, "test.yaml").unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        let server = larder::start(config, options).await.unwrap();
        Larder {
            server,
            client: client(),
        }
    }

    pub fn proxy_url(&self, path: &str) -> String {
        format!("http://{}{}", self.server.proxy_addrs[0], path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.server.admin_addr, path)
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.request(Method::GET, &self.proxy_url(path), &[], Bytes::new())
            .await
    }

    pub async fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.request(Method::GET, &self.proxy_url(path), headers, Bytes::new())
            .await
    }

    pub async fn request(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Reply {
        send(&self.client, method, url, headers, body).await
    }

    pub async fn admin(&self, method: Method, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.request(method, &self.admin_url(path), headers, Bytes::new())
            .await
    }

    pub async fn metrics(&self) -> String {
        self.admin(Method::GET, "/metrics", &[]).await.text()
    }
}

pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

pub async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Reply {
    let mut builder = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let response = client
        .request(builder.body(Full::new(body)).unwrap())
        .await
        .expect("request sent");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body read").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// Value of a sample line `name{labels} value` in a Prometheus exposition, if present.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .map(|v| v.trim().parse().expect("numeric sample"))
}

pub fn counter(count: &AtomicUsize) -> usize {
    count.load(Ordering::SeqCst)
}

/// An origin that holds every request until the test releases it, and says when one
/// arrives: for races with a fill in flight.
pub struct GatedOrigin {
    pub origin: Origin,
    arrivals: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<()>>,
    gate: Arc<tokio::sync::Notify>,
}

impl GatedOrigin {
    pub async fn start(headers: &[(&str, &str)], body: &'static str) -> GatedOrigin {
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let (arrived, arrivals) = tokio::sync::mpsc::unbounded_channel();
        let gate = Arc::new(tokio::sync::Notify::new());
        let held = gate.clone();
        let origin = Origin::start(move |_| {
            let arrived = arrived.clone();
            let held = held.clone();
            let headers = headers.clone();
            async move {
                // Registered before announcing the arrival, so no release is missed.
                let released = held.notified();
                let _ = arrived.send(());
                released.await;
                let headers: Vec<(&str, &str)> = headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                response(200, &headers, body)
            }
        })
        .await;
        GatedOrigin {
            origin,
            arrivals: tokio::sync::Mutex::new(arrivals),
            gate,
        }
    }

    /// Waits (at most 5 s) for the next request to reach the origin.
    pub async fn arrived(&self, why: &str) {
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            self.arrivals.lock().await.recv(),
        )
        .await
        .unwrap_or_else(|_| panic!("no request reached the origin: {why}"))
        .expect("the origin is running");
    }

    /// Lets one held request (or the next one) answer.
    pub fn release_one(&self) {
        self.gate.notify_one();
    }

    /// Lets every request held now answer.
    pub fn release_all(&self) {
        self.gate.notify_waiters();
    }
}

/// The larder binary, started as a process (for what only a process shows: signals, RSS).
/// Kills the child when the test ends, however it ends.
pub struct Running(pub std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the binary and reads its start-up lines until it says where the proxy listens.
pub fn spawn(args: &[&str]) -> (Running, SocketAddr, SocketAddr) {
    spawn_with_env(args, &[])
}

/// `spawn`, with these environment variables set for the process.
pub fn spawn_with_env(args: &[&str], env: &[(&str, &str)]) -> (Running, SocketAddr, SocketAddr) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_larder"))
        .args(args)
        .env_remove("LARDER_CONFIG")
        .env_remove("LARDER_CONNECTION_THREADS")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let (mut proxy, mut admin) = (None, None);
    while proxy.is_none() || admin.is_none() {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            .expect("start-up lines");
        let addr = |prefix: &str| {
            line.trim().strip_prefix(prefix).map(|rest| {
                rest.split_whitespace()
                    .next()
                    .unwrap()
                    .parse::<SocketAddr>()
                    .unwrap()
            })
        };
        proxy = proxy.or(addr("proxy listening on http://"));
        admin = admin.or(addr("admin listening on http://"));
    }
    (Running(child), proxy.unwrap(), admin.unwrap())
}

/// Body sizes either side of what an HTTP/2 connection's write batch copies (4 KiB) and holds
/// (64 KiB), so held, direct and mixed writes all carry bodies.
const BATCH_SIZES: [usize; 5] = [10, 1024, 5000, 70_000, 300_000];

/// The body an origin serves for `/obj/<n>`: one of [`BATCH_SIZES`], its bytes repeating the
/// path, so a byte out of place shows.
pub fn batch_body_for(path: &str) -> Bytes {
    let n: usize = path.rsplit('/').next().unwrap().parse().unwrap();
    let pattern = format!("{path};");
    Bytes::from(
        pattern
            .bytes()
            .cycle()
            .take(BATCH_SIZES[n % BATCH_SIZES.len()])
            .collect::<Vec<u8>>(),
    )
}

/// An origin answering `/obj/<n>` with [`batch_body_for`], cacheable for a minute.
pub async fn batch_origin() -> Origin {
    Origin::start(|seen| async move {
        response(
            200,
            &[("cache-control", "max-age=60")],
            batch_body_for(seen.uri.path()),
        )
    })
    .await
}

/// Checks one of a batch's responses: whole, in place, and a hit in the `hit` round.
pub fn check_batch_response(round: &str, path: &str, cache_status: &str, body: &Bytes) {
    let expected = batch_body_for(path);
    assert_eq!(body.len(), expected.len(), "{round} {path}");
    assert!(*body == expected, "{round} {path}: bytes out of place");
    if round == "hit" {
        assert!(cache_status.contains("hit"), "{path}: {cache_status}");
    }
}

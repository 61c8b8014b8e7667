//! The validated configuration model that the rest of Larder works with.
//!
//! Every value here has already been checked and normalized by the loader, so consumers can
//! use fields directly without re-validating. All types serialize (for `/config_dump`) into
//! a form that [`crate::load_str`] accepts again: durations as strings like `"300s"`, sizes as
//! integers of bytes.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;
use regex::Regex;
use serde::{Serialize, Serializer};

use crate::units::format_duration;

/// Cache budget of a resource type that sets no `cache_size` when there is no total either.
pub const DEFAULT_TYPE_CACHE_SIZE: u64 = 256 << 20;

fn ser_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_duration(*d))
}

fn ser_opt_duration<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => ser_duration(d, s),
        None => s.serialize_none(),
    }
}

/// The whole, validated configuration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    pub listeners: Vec<Listener>,
    pub admin: Admin,
    pub limits: Limits,
    pub access_log: AccessLog,
    pub virtual_hosts: Vec<VirtualHost>,
    pub clusters: Vec<Cluster>,
    pub cache: CacheSettings,
    /// Normalized: the `resource_type:` shorthand becomes a one-element list, and a config
    /// with neither key gets a single catch-all type named `default`. Never empty.
    pub resource_types: Vec<ResourceType>,
    pub purge: Purge,
    pub log: Log,
    pub tracing: Tracing,
    pub drain: Drain,
}

/// Stopping on SIGTERM: readiness fails at once, listeners keep accepting for `delay` (while
/// load balancers take the replica out), then close; requests in flight get up to `timeout`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Drain {
    #[serde(serialize_with = "ser_duration")]
    pub delay: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            delay: Duration::ZERO,
            timeout: Duration::from_secs(30),
        }
    }
}

/// OpenTelemetry request tracing, exported over OTLP/HTTP.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Tracing {
    pub enabled: bool,
    /// The OTLP/HTTP traces URL (a Jaeger collector listens on 4318).
    pub endpoint: String,
    pub service_name: String,
    /// Fraction of new traces recorded; requests with a parent follow its decision.
    pub sample_ratio: f64,
    /// Finished spans waiting for export at most; more are dropped, never waited for.
    pub max_queue_size: usize,
    #[serde(serialize_with = "ser_duration")]
    pub export_timeout: Duration,
}

impl Default for Tracing {
    fn default() -> Self {
        Tracing {
            enabled: false,
            endpoint: "http://localhost:4318/v1/traces".into(),
            service_name: "larder".into(),
            sample_ratio: 1.0,
            max_queue_size: 2048,
            export_timeout: Duration::from_secs(10),
        }
    }
}

/// Larder's own diagnostics (not the access log), on stderr.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Log {
    /// A `tracing` filter: a level (`info`) or per-target directives
    /// (`info,larder::audit=warn`). `RUST_LOG`, when set, wins.
    pub level: String,
    pub format: LogFormat,
}

impl Default for Log {
    fn default() -> Self {
        Log {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

impl LogFormat {
    pub(crate) const NAMES: &[(&str, LogFormat)] =
        &[("text", LogFormat::Text), ("json", LogFormat::Json)];
}

impl Config {
    /// JSON rendering for `/config_dump`. The model holds no secrets (the admin token is
    /// only referenced by path), so everything is included.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("the config model always serializes to JSON")
    }

    pub fn cluster(&self, name: &str) -> Option<&Cluster> {
        self.clusters.iter().find(|c| c.name == name)
    }

    /// Lets the binary point the [`crate::DEMO_CLUSTER`] at its embedded origin.
    pub fn cluster_mut(&mut self, name: &str) -> Option<&mut Cluster> {
        self.clusters.iter_mut().find(|c| c.name == name)
    }

    pub fn resource_type(&self, name: &str) -> Option<&ResourceType> {
        self.resource_types.iter().find(|t| t.name == name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Listener {
    pub name: String,
    pub address: SocketAddr,
    /// Terminate TLS here (HTTPS, with HTTP/2 by ALPN).
    pub tls: Option<ListenerTls>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListenerTls {
    /// Served by SNI: the first certificate valid for the name the client asks for, else the
    /// first one. Reloaded when the files change.
    pub certificates: Vec<CertificateFiles>,
}

/// A certificate chain and its private key, PEM files (a Kubernetes TLS Secret's `tls.crt`
/// and `tls.key`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertificateFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl Listener {
    pub const DEFAULT_ADDRESS: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8080);
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Admin {
    pub address: SocketAddr,
    /// File holding the admin API bearer token; the token itself never enters the config.
    pub token_file: Option<PathBuf>,
}

impl Admin {
    pub const DEFAULT_ADDRESS: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9901);
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            address: Self::DEFAULT_ADDRESS,
            token_file: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Limits {
    pub max_request_header_size: u64,
    pub max_request_headers: usize,
    pub max_request_body_size: u64,
    /// Client connections open at once across the proxy listeners; more are closed as soon
    /// as they are accepted (and counted).
    pub max_connections: usize,
    /// A client must send a whole request head within this (slowloris); an idle keep-alive
    /// connection is closed after it too.
    #[serde(serialize_with = "ser_duration")]
    pub header_read_timeout: Duration,
    /// The longest wait for the next chunk of a request body (slow POST): 408 after it.
    #[serde(serialize_with = "ser_duration")]
    pub request_body_timeout: Duration,
    /// The longest a response write may make no progress (a client that stops reading).
    #[serde(serialize_with = "ser_duration")]
    pub client_write_timeout: Duration,
    /// An HTTP/2 connection with no stream open this long gets GOAWAY and is closed (the
    /// HTTP/1 equivalent is `header_read_timeout`).
    #[serde(serialize_with = "ser_duration")]
    pub http2_idle_timeout: Duration,
    /// Peers whose X-Forwarded-For is extended; from anyone else it is replaced by the
    /// peer's address.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Request fields removed before forwarding (lower case): unkeyed inputs that make
    /// origins serve another resource, method or host than the cache key says.
    pub strip_request_headers: Vec<String>,
}

impl Limits {
    /// Fields frameworks honour to rewrite the URL, the method or the host: keyed by no
    /// cache, so a client could poison a key with another resource's response.
    pub const DEFAULT_STRIP_REQUEST_HEADERS: &[&str] = &[
        "x-original-url",
        "x-rewrite-url",
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x-forwarded-server",
        "x-forwarded-scheme",
        "x-original-host",
        "x-host",
    ];
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_header_size: 64 << 10,
            max_request_headers: 100,
            max_request_body_size: 100 << 20,
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(10),
            request_body_timeout: Duration::from_secs(30),
            client_write_timeout: Duration::from_secs(60),
            http2_idle_timeout: Duration::from_secs(180),
            trusted_proxies: Vec::new(),
            strip_request_headers: Limits::DEFAULT_STRIP_REQUEST_HEADERS
                .iter()
                .map(|h| h.to_string())
                .collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AccessLog {
    pub enabled: bool,
    pub output: LogOutput,
    /// Fraction of requests logged (responses of status 500 and above always are).
    pub sample_rate: f64,
    /// Optional field groups left out of every line; see [`AccessLog::OPTIONAL_FIELDS`].
    pub exclude_fields: Vec<String>,
    /// Also send every line to Elasticsearch with the `_bulk` API.
    pub elasticsearch: Option<Elasticsearch>,
}

/// The Elasticsearch sink of the access log. Credentials are read from files (or the
/// `LARDER_ES_API_KEY` / `LARDER_ES_PASSWORD` environment variables), never from the config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Elasticsearch {
    /// Base URL, `http://host:9200`.
    pub url: String,
    /// Target index; `%Y`, `%m`, `%d` are replaced by the UTC date of the batch. With
    /// `data_stream`, the data stream's name.
    pub index: String,
    /// Write with `create` actions, as data streams require.
    pub data_stream: bool,
    pub api_key_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    /// Documents per `_bulk` request.
    pub batch_size: usize,
    /// A partial batch is sent after this long.
    #[serde(serialize_with = "ser_duration")]
    pub flush_interval: Duration,
    /// Documents waiting to be sent; more are dropped (and counted), never waited for.
    pub max_queue: usize,
    pub gzip: bool,
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
    /// Attempts after the first for a batch (or documents) Elasticsearch refused with 429
    /// or 5xx, with exponential backoff.
    pub max_retries: u32,
}

impl Elasticsearch {
    pub const DEFAULT_INDEX: &str = "logs-larder.access-default";
}

impl AccessLog {
    /// The field groups `exclude_fields` may name.
    pub const OPTIONAL_FIELDS: &[&str] = &[
        "client",
        "user_agent",
        "url.query",
        "trace",
        "larder.upstream",
    ];
}

impl Default for AccessLog {
    fn default() -> Self {
        AccessLog {
            enabled: true,
            output: LogOutput::Stdout,
            sample_rate: 1.0,
            exclude_fields: Vec::new(),
            elasticsearch: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogOutput {
    Stdout,
    Stderr,
    File(PathBuf),
}

impl Serialize for LogOutput {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            LogOutput::Stdout => s.serialize_str("stdout"),
            LogOutput::Stderr => s.serialize_str("stderr"),
            LogOutput::File(path) => path.serialize(s),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VirtualHost {
    pub name: String,
    /// Lower-cased. `example.com`, `example.com:8080`, `*.example.com` (any subdomain, not
    /// the bare domain) or `*` (any host).
    pub domains: Vec<String>,
    /// Tried in order; the first match wins.
    pub routes: Vec<Route>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Route {
    pub name: Option<String>,
    pub r#match: RouteMatch,
    pub cluster: String,
    pub cache: bool,
    /// Until the response headers have arrived; overrides the cluster's `request_timeout`.
    #[serde(serialize_with = "ser_opt_duration")]
    pub timeout: Option<Duration>,
    /// Overrides the cluster's `connect_timeout` for this route's requests.
    #[serde(serialize_with = "ser_opt_duration")]
    pub connect_timeout: Option<Duration>,
    /// The longest wait for the next chunk of a response body (else the first-byte timeout).
    #[serde(serialize_with = "ser_opt_duration")]
    pub idle_timeout: Option<Duration>,
    /// From sending the request to the last byte of the response; a body still arriving then
    /// is cut off (and not stored). None: no bound beyond the others.
    #[serde(serialize_with = "ser_opt_duration")]
    pub total_timeout: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteMatch {
    /// Plain string prefix: `/api` also matches `/apiary`.
    Prefix(String),
    /// Exact path.
    Path(String),
    /// Searched anywhere in the path unless anchored with `^`/`$`.
    Regex(RegexSource),
}

impl RouteMatch {
    /// `path` is the request path without the query string.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            RouteMatch::Prefix(prefix) => path.starts_with(prefix.as_str()),
            RouteMatch::Path(exact) => path == exact,
            RouteMatch::Regex(re) => re.regex().is_match(path),
        }
    }
}

/// A regular expression as written in the config, compiled once at load time.
///
/// The compiled form is private so that a `RegexSource` can only exist for a valid pattern;
/// build one with [`RegexSource::new`].
#[derive(Clone)]
pub struct RegexSource(pub String, Regex);

impl RegexSource {
    pub fn new(pattern: &str) -> Result<Self, regex::Error> {
        Ok(RegexSource(pattern.to_owned(), Regex::new(pattern)?))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The precompiled regex; borrowing it avoids even the cheap clone of [`Self::compile`].
    pub fn regex(&self) -> &Regex {
        &self.1
    }

    /// A handle to the precompiled regex (cloning a `Regex` shares its compiled program).
    pub fn compile(&self) -> Regex {
        self.1.clone()
    }
}

impl fmt::Debug for RegexSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("RegexSource").field(&self.0).finish()
    }
}

impl PartialEq for RegexSource {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

impl Eq for RegexSource {}

impl Serialize for RegexSource {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cluster {
    pub name: String,
    pub endpoints: Vec<Endpoint>,
    pub lb_policy: LbPolicy,
    #[serde(serialize_with = "ser_duration")]
    pub connect_timeout: Duration,
    /// Until the response headers have arrived.
    #[serde(serialize_with = "ser_duration")]
    pub request_timeout: Duration,
    /// How long a pooled connection may stay idle.
    #[serde(serialize_with = "ser_duration")]
    pub idle_timeout: Duration,
    pub max_idle_connections: usize,
    pub outlier_detection: OutlierDetection,
    pub health_check: Option<HealthCheck>,
    /// Endpoints found by DNS instead of (or, until the first answer, besides) `endpoints`.
    pub dns: Option<DnsDiscovery>,
    /// Endpoints from a Kubernetes Service's EndpointSlices (ready endpoints only), watched.
    pub kubernetes: Option<KubernetesDiscovery>,
    /// Requests in flight to the cluster at most; more are answered 503 at once rather than
    /// queueing behind a struggling upstream (circuit breaking).
    pub max_requests: usize,
    /// Connections open to the cluster's endpoints at most (in use or idle). A request that
    /// needs one more waits, up to the connect timeout, for a pooled connection or a free slot.
    pub max_connections: usize,
    /// Requests waiting that way at most; more are answered 503 at once.
    pub max_pending_requests: usize,
    /// Idempotent, bodiless requests answered with one of these statuses are sent again to
    /// another endpoint, up to `max_retries` times, after a short jittered pause, while
    /// retries stay within a fifth of the requests in flight (a retry budget).
    pub retry_on_status: Vec<u16>,
    pub max_retries: u32,
    /// Reach the endpoints over TLS.
    pub tls: Option<UpstreamTls>,
    /// Speak HTTP/2 to the endpoints (over TLS by ALPN, else cleartext with prior knowledge).
    pub http2: bool,
}

/// TLS to a cluster's endpoints: verified against `ca_file` (else the Mozilla root set), with
/// `server_name` for SNI and verification (else the endpoint's host), and optionally a client
/// certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UpstreamTls {
    pub ca_file: Option<PathBuf>,
    pub server_name: Option<String>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// A cluster's endpoints from a DNS name (A and AAAA; a Kubernetes headless Service), asked
/// again every `refresh_interval`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DnsDiscovery {
    pub name: String,
    pub port: u16,
    #[serde(serialize_with = "ser_duration")]
    pub refresh_interval: Duration,
    /// A DNS server to ask instead of the system's resolver.
    pub nameserver: Option<SocketAddr>,
}

/// A cluster's endpoints from the EndpointSlices of a Kubernetes Service (label
/// `kubernetes.io/service-name`), watched: ready endpoints only, on the port named `port`.
/// Needs a build with the `kubernetes` feature and RBAC to list and watch `endpointslices`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KubernetesDiscovery {
    pub service: String,
    /// None: the namespace Larder runs in (from its service account), else `default`.
    pub namespace: Option<String>,
    pub port: ServicePort,
    /// The API server to ask, e.g. `http://127.0.0.1:8001` behind `kubectl proxy`. None: the
    /// in-cluster service account, else the local kubeconfig.
    pub api_server: Option<String>,
}

/// A Service port, by the name its EndpointSlices give it or by number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ServicePort {
    Name(String),
    Number(u16),
}

/// Active health: each endpoint is asked `GET path` every `interval`; it leaves rotation
/// after `unhealthy_threshold` failures in a row (no answer within `timeout`, or not 2xx) and
/// returns after `healthy_threshold` successes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthCheck {
    pub path: String,
    #[serde(serialize_with = "ser_duration")]
    pub interval: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

impl Cluster {
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
    /// Below the 5 s keep-alive timeout of Node.js and many app servers, so a pooled
    /// connection is not reused just as the origin closes it.
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(4);
    pub const DEFAULT_MAX_IDLE_CONNECTIONS: usize = 64;
}

/// An upstream `host:port`. `host` is a DNS name or an IP address (IPv6 without brackets).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    /// Share of the traffic relative to the cluster's other endpoints (1 to 100).
    pub weight: u32,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl FromStr for Endpoint {
    type Err = String;

    /// Accepts `host:port`, `[v6]:port`, and `http://host[:port][/]`.
    fn from_str(text: &str) -> Result<Self, String> {
        let s = text.trim();
        let (rest, scheme_default_port) = if let Some((scheme, rest)) = s.split_once("://") {
            match scheme.to_ascii_lowercase().as_str() {
                "http" => (rest, Some(80)),
                "https" => {
                    return Err(
                        "write the endpoint as host:port and set `tls:` on the cluster".into(),
                    );
                }
                other => {
                    return Err(format!(
                        "unsupported scheme {other:?}; only http is accepted"
                    ));
                }
            }
        } else {
            (s, None)
        };
        let authority = match rest.split_once('/') {
            Some((authority, "")) => authority,
            Some(_) => return Err("an endpoint must not contain a path".into()),
            None => rest,
        };
        if authority.contains('@') || authority.contains('?') || authority.contains('#') {
            return Err("expected host:port".into());
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (addr, after) = v6.split_once(']').ok_or("unclosed '[' in IPv6 address")?;
            if addr.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(format!("invalid IPv6 address {addr:?}"));
            }
            let port = match after {
                "" => None,
                p => Some(
                    p.strip_prefix(':')
                        .ok_or("expected ':' and a port after ']'")?,
                ),
            };
            (addr, port)
        } else if authority.matches(':').count() > 1 {
            return Err("IPv6 addresses must be in brackets, like [::1]:80".into());
        } else {
            match authority.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err("missing host".into());
        }
        if !host.contains(':') && !crate::build::is_hostname(host) {
            return Err(format!("invalid host name {host:?}"));
        }
        let port = match (port, scheme_default_port) {
            (Some(p), _) => p
                .parse::<u16>()
                .map_err(|_| format!("invalid port {p:?}: expected 1-65535"))?,
            (None, Some(default)) => default,
            (None, None) => return Err("missing port; expected host:port".into()),
        };
        if port == 0 {
            return Err("port 0 is not a valid upstream port".into());
        }
        Ok(Endpoint {
            host: host.to_ascii_lowercase(),
            port,
            weight: 1,
        })
    }
}

impl Serialize for Endpoint {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.weight == 1 {
            return s.collect_str(self);
        }
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(2))?;
        map.serialize_entry("address", &self.to_string())?;
        map.serialize_entry("weight", &self.weight)?;
        map.end()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    #[default]
    RoundRobin,
    /// Uniformly at random.
    Random,
    /// The less busy of two endpoints picked at random (power of two choices).
    LeastRequest,
    /// Consistent hashing on the request's host, path and query (the cache key's URL), so a
    /// tier of caches shards its objects: each URL goes to one endpoint while it is healthy,
    /// and only the URLs of an endpoint that leaves move.
    RingHash,
}

impl LbPolicy {
    pub(crate) const NAMES: &[(&str, LbPolicy)] = &[
        ("round_robin", LbPolicy::RoundRobin),
        ("random", LbPolicy::Random),
        ("least_request", LbPolicy::LeastRequest),
        ("ring_hash", LbPolicy::RingHash),
    ];
}

/// Passive health: an endpoint that fails this many times in a row (connect errors, timeouts,
/// 502/503/504) is taken out of rotation for `base_ejection_time`, twice as long each time it
/// is ejected again; never more than `max_ejection_percent` of a cluster at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutlierDetection {
    /// 0 turns ejection off.
    pub consecutive_failures: u32,
    #[serde(serialize_with = "ser_duration")]
    pub base_ejection_time: Duration,
    pub max_ejection_percent: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            consecutive_failures: 5,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 50,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CacheSettings {
    /// Total budget over all resource types; `None` when not configured.
    pub cache_size: Option<u64>,
    /// How long a request waits for an identical in-flight origin fetch before going to
    /// the origin itself.
    #[serde(serialize_with = "ser_duration")]
    pub coalesce_timeout: Duration,
    /// Waiters per in-flight fetch; 0 disables request coalescing.
    pub max_coalesced_waiters: usize,
    /// Larder's own targeted cache-control field (RFC 9213), lower-cased; it takes precedence
    /// over `CDN-Cache-Control`, which takes precedence over `Surrogate-Control` and then
    /// `Cache-Control`.
    pub targeted_cache_control: Option<String>,
    /// `Vary` variants kept per URL.
    pub max_variants: usize,
    /// Add the cache key to `Cache-Status` (a debugging aid: it reveals request headers that
    /// are part of the key).
    pub cache_status_key: bool,
    /// Store 4xx/5xx answers without an origin-given lifetime (on the resource type's `ttl` or
    /// a heuristic), as RFC 9111 allows. Off: an error a client provokes with an unkeyed
    /// header could otherwise be served to everyone (cache poisoning by denial of service).
    pub heuristic_errors: bool,
    /// Touch the whole budget (every resource type's `cache_size`) at start and never give
    /// freed memory back: fills then never wait for the kernel to supply fresh pages (what
    /// HAProxy's cache does), and a memory limit too small for the budget shows at start,
    /// not hours later. Read at start only.
    pub preallocate: bool,
}

impl CacheSettings {
    /// These settings without those read at start only (`preallocate`): what a reload
    /// compares, so changing one neither empties the cache nor passes unannounced.
    pub fn without_start_only(&self) -> CacheSettings {
        CacheSettings {
            preallocate: false,
            ..self.clone()
        }
    }
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            cache_size: None,
            coalesce_timeout: Duration::from_secs(10),
            max_coalesced_waiters: 1024,
            targeted_cache_control: None,
            max_variants: 64,
            cache_status_key: false,
            heuristic_errors: false,
            preallocate: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResourceType {
    pub name: String,
    pub r#match: ResourceMatch,
    pub config: ResourceConfig,
}

/// Which responses a resource type applies to. Conditions that are given must all hold; a
/// list means any of its entries. With every list empty the type matches everything.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct ResourceMatch {
    pub path_prefix: Vec<String>,
    pub path_suffix: Vec<String>,
    pub path_regex: Option<RegexSource>,
    /// Lower-cased media types without parameters: `text/html`, `image/*`, `*/*`.
    pub content_type: Vec<String>,
}

impl ResourceMatch {
    pub fn is_catch_all(&self) -> bool {
        self.path_prefix.is_empty()
            && self.path_suffix.is_empty()
            && self.path_regex.is_none()
            && self.content_type.is_empty()
    }

    /// Decides on the request path alone (without query string) where possible:
    /// `Some(false)` when a path condition fails, `Some(true)` when all conditions hold,
    /// `None` when the path conditions hold but the answer depends on the response's
    /// content type.
    pub fn matches_request_path(&self, path: &str) -> Option<bool> {
        if !self.path_matches(path) {
            return Some(false);
        }
        if self.content_type.is_empty() {
            Some(true)
        } else {
            None
        }
    }

    /// `content_type` is the response's `Content-Type` header value, parameters allowed.
    /// A type with content-type conditions never matches a response without one.
    pub fn matches(&self, path: &str, content_type: Option<&str>) -> bool {
        if !self.path_matches(path) {
            return false;
        }
        if self.content_type.is_empty() {
            return true;
        }
        let Some(value) = content_type else {
            return false;
        };
        let media = value.split(';').next().unwrap_or("").trim();
        let Some((ty, sub)) = media.split_once('/') else {
            return false;
        };
        let (ty, sub) = (ty.trim(), sub.trim());
        self.content_type.iter().any(|pattern| {
            let (pty, psub) = pattern.split_once('/').unwrap_or((pattern.as_str(), "*"));
            (pty == "*" || pty.eq_ignore_ascii_case(ty))
                && (psub == "*" || psub.eq_ignore_ascii_case(sub))
        })
    }

    fn path_matches(&self, path: &str) -> bool {
        (self.path_prefix.is_empty() || self.path_prefix.iter().any(|p| path.starts_with(p)))
            && (self.path_suffix.is_empty() || self.path_suffix.iter().any(|s| path.ends_with(s)))
            && self
                .path_regex
                .as_ref()
                .is_none_or(|re| re.regex().is_match(path))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResourceConfig {
    /// Freshness lifetime for responses whose origin gives none (or for all responses when
    /// `override_origin_ttl` is set).
    #[serde(serialize_with = "ser_opt_duration")]
    pub ttl: Option<Duration>,
    /// When set, `ttl` replaces the origin's `max-age`, `s-maxage` and `Expires`.
    pub override_origin_ttl: bool,
    /// This type's share of the cache, in bytes, after resolution against
    /// `cache.cache_size` (see the crate docs).
    pub cache_size: u64,
    pub max_object_size: u64,
    /// RFC 9111 §4.2.2 heuristic freshness from `Last-Modified` when the response has no
    /// explicit freshness and no `ttl` applies.
    pub heuristic_freshness: bool,
    /// Serve a stale response at once while it is refreshed in the background, up to this
    /// long past its freshness, when the origin gives no `stale-while-revalidate`.
    #[serde(serialize_with = "ser_duration")]
    pub grace: Duration,
    /// Serve a stale response when the origin fails, up to this long past its freshness,
    /// when the origin gives no `stale-if-error`.
    #[serde(serialize_with = "ser_duration")]
    pub stale_if_error: Duration,
    /// Serve a stale response when the origin cannot be reached at all (connect error,
    /// closed connection, timeout), up to this long past its freshness (RFC 9111 §4.2.4).
    #[serde(serialize_with = "ser_duration")]
    pub stale_if_unreachable: Duration,
    /// How long an object past all its stale windows is kept for revalidation; `None` keeps
    /// it until evicted.
    #[serde(serialize_with = "ser_opt_duration")]
    pub keep: Option<Duration>,
    /// What to do with responses that set a cookie.
    pub set_cookie: SetCookiePolicy,
    pub cache_key: CacheKeyConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SetCookiePolicy {
    /// Stored with its Set-Cookie when the origin gave explicit freshness (RFC 9111 §3.1).
    Store,
    /// Stored without the Set-Cookie header.
    Strip,
    /// Never stored: the default, as in Varnish and nginx. A cookie is usually a session,
    /// and an origin that forgot `private` would otherwise hand one user's session to all.
    #[default]
    Bypass,
}

impl SetCookiePolicy {
    pub(crate) const NAMES: &[(&str, SetCookiePolicy)] = &[
        ("store", SetCookiePolicy::Store),
        ("strip", SetCookiePolicy::Strip),
        ("bypass", SetCookiePolicy::Bypass),
    ];
}

impl ResourceConfig {
    pub const DEFAULT_MAX_OBJECT_SIZE: u64 = 8 << 20;
}

impl Default for ResourceConfig {
    fn default() -> Self {
        ResourceConfig {
            ttl: None,
            override_origin_ttl: false,
            cache_size: DEFAULT_TYPE_CACHE_SIZE,
            max_object_size: Self::DEFAULT_MAX_OBJECT_SIZE,
            heuristic_freshness: true,
            grace: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            stale_if_unreachable: Duration::from_secs(30),
            keep: None,
            set_cookie: SetCookiePolicy::default(),
            cache_key: CacheKeyConfig::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct CacheKeyConfig {
    pub query: QueryKeyMode,
    /// Lower-cased request header names whose values become part of the cache key.
    pub headers: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QueryKeyMode {
    /// The query string is part of the key as sent.
    #[default]
    Keep,
    /// The query string is ignored for the key.
    Drop,
    /// Query parameters are sorted so that their order does not matter.
    Sort,
}

impl QueryKeyMode {
    pub(crate) const NAMES: &[(&str, QueryKeyMode)] = &[
        ("keep", QueryKeyMode::Keep),
        ("drop", QueryKeyMode::Drop),
        ("sort", QueryKeyMode::Sort),
    ];
}

/// Invalidation: tags, the PURGE method, rate limit, and how purges reach the other replicas.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Purge {
    /// Response headers whose values are tags (lower-case names).
    pub tag_headers: Vec<String>,
    /// Remove the tag headers from responses to clients (and from stored responses).
    pub strip_tag_headers: bool,
    /// Purge requests from clients accepted per second, with a burst of as many again;
    /// 0 disables the limit. Purges relayed by peers are not counted.
    pub max_requests_per_second: u32,
    pub purge_method: PurgeMethod,
    pub peers: Peers,
    /// Deadline for relaying one purge to every peer, retries included.
    #[serde(serialize_with = "ser_duration")]
    pub fanout_timeout: Duration,
    /// Attempts per peer after the first one fails.
    pub fanout_retries: u32,
    /// Relay purges over a Redis Pub/Sub channel (needs the `redis` cargo feature).
    pub redis: Option<Redis>,
}

impl Default for Purge {
    fn default() -> Self {
        Purge {
            tag_headers: vec!["surrogate-key".into(), "cache-tag".into()],
            strip_tag_headers: true,
            max_requests_per_second: 100,
            purge_method: PurgeMethod::default(),
            peers: Peers::default(),
            fanout_timeout: Duration::from_secs(5),
            fanout_retries: 2,
            redis: None,
        }
    }
}

/// `PURGE <path>` on the proxy listeners.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PurgeMethod {
    pub enabled: bool,
    /// Client addresses allowed to send it.
    pub allowed_cidrs: Vec<IpNet>,
}

impl Default for PurgeMethod {
    fn default() -> Self {
        PurgeMethod {
            enabled: false,
            allowed_cidrs: vec![
                "127.0.0.0/8".parse().expect("valid CIDR"),
                "::1/128".parse().expect("valid CIDR"),
            ],
        }
    }
}

/// The other replicas a purge is relayed to: a DNS name (a Kubernetes headless Service),
/// re-resolved periodically, and/or a static list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Peers {
    pub dns: Option<String>,
    /// Admin port of the replicas found by `dns`.
    pub port: u16,
    #[serde(serialize_with = "ser_duration")]
    pub refresh_interval: Duration,
    /// A DNS server to ask instead of the system's resolver.
    pub nameserver: Option<SocketAddr>,
    /// Admin addresses of replicas, `IP:port`.
    pub r#static: Vec<SocketAddr>,
}

impl Peers {
    pub fn is_empty(&self) -> bool {
        self.dns.is_none() && self.r#static.is_empty()
    }
}

impl Default for Peers {
    fn default() -> Self {
        Peers {
            dns: None,
            port: Admin::DEFAULT_ADDRESS.port(),
            refresh_interval: Duration::from_secs(10),
            nameserver: None,
            r#static: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Redis {
    /// May hold a password: `/config_dump` shows it without one.
    #[serde(serialize_with = "ser_redacted_url")]
    pub url: String,
    pub channel: String,
}

fn ser_redacted_url<S: Serializer>(url: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redact_url(url))
}

/// A URL without its credentials (`redis://user:secret@host` → `redis://…@host`) or
/// password query parameters, for logs, reports and the config dump.
pub fn redact_url(url: &str) -> String {
    let without_query = match url.split_once('?') {
        Some((base, query)) if query.contains("pass") => format!("{base}?…"),
        _ => url.to_owned(),
    };
    match (without_query.find("://"), without_query.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!(
                "{}://…@{}",
                &without_query[..scheme],
                &without_query[at + 1..]
            )
        }
        _ => without_query,
    }
}

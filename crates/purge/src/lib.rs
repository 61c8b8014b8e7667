#![forbid(unsafe_code)]
//! Purge distribution. Every purge, whatever door it came in by (admin API, `PURGE` method,
//! a peer, the Redis bus), goes through [`Purger::purge`]: deduplicated by id, applied to the
//! local cache, and, when a client asked, relayed to every peer replica in parallel (with the
//! token, the id, retries and a deadline) and published on the bus. A relayed purge is applied
//! locally only, so a purge crosses the cluster once.

pub mod peers;
pub mod wire;

#[cfg(feature = "redis")]
mod bus;

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use larder_cache::Invalidator;
use larder_telemetry::{FanoutEvent, Metrics, PurgeEvent, PurgeTargetResult};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

pub use peers::PeerSet;
pub use wire::{PurgeBody, PurgeOrder, order_from_query};

/// Carries a purge's idempotency id between replicas.
pub const PURGE_ID_HEADER: &str = "x-larder-purge-id";
/// Marks a purge relayed by a replica (its instance id): apply locally, relay no further.
pub const RELAYED_BY_HEADER: &str = "x-larder-relayed-by";

/// Where a purge came from.
#[derive(Debug, Clone)]
pub enum Source {
    /// The admin API, from this client address.
    Admin(SocketAddr),
    /// `PURGE` on a proxy listener.
    PurgeMethod(SocketAddr),
    /// Relayed by another replica (its instance id, as it says, and address).
    Peer { instance: String, addr: SocketAddr },
    /// Received on the Redis channel, published by this replica.
    Redis { instance: String },
}

impl Source {
    pub fn name(&self) -> &'static str {
        match self {
            Source::Admin(_) => "admin",
            Source::PurgeMethod(_) => "purge_method",
            Source::Peer { .. } => "peer",
            Source::Redis { .. } => "redis",
        }
    }

    /// For the audit line: always the socket address when there is one, since a relayed
    /// purge's instance id is only what the sender claims.
    pub fn who(&self) -> String {
        match self {
            Source::Admin(addr) | Source::PurgeMethod(addr) => addr.to_string(),
            Source::Peer { instance, addr } => format!("{addr} (replica {instance})"),
            Source::Redis { instance } => format!("redis (replica {instance})"),
        }
    }

    /// Client purges are rate-limited and relayed; relayed ones are neither.
    pub fn is_client(&self) -> bool {
        matches!(self, Source::Admin(_) | Source::PurgeMethod(_))
    }
}

/// What a purge did, here and on each peer: the JSON answer of the purge API.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PurgeReport {
    pub id: String,
    /// The replica that answers.
    pub instance: String,
    pub soft: bool,
    /// Stored responses removed (or, soft, marked stale) on this replica.
    pub purged: usize,
    pub targets: Vec<TargetReport>,
    /// This replica had already applied a purge with this id (nothing was done again).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<PeerReport>,
}

impl PurgeReport {
    /// Stored responses purged here and on every peer that confirmed.
    pub fn purged_everywhere(&self) -> usize {
        self.purged + self.peers.iter().filter_map(|p| p.purged).sum::<usize>()
    }

    /// Whether every peer confirmed (or was this replica itself).
    pub fn complete(&self) -> bool {
        self.peers
            .iter()
            .all(|p| matches!(p.status, PeerStatus::Ok | PeerStatus::Itself))
    }

    /// 200 when something was purged somewhere, 404 when nothing matched anywhere, 502 when
    /// some peer did not confirm (the body says which).
    pub fn status(&self) -> StatusCode {
        if !self.complete() {
            StatusCode::BAD_GATEWAY
        } else if self.purged_everywhere() > 0 || self.duplicate {
            StatusCode::OK
        } else {
            StatusCode::NOT_FOUND
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetReport {
    pub kind: String,
    pub target: String,
    pub purged: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerStatus {
    /// Applied there.
    Ok,
    /// The peer turned out to be this replica (a DNS name lists every replica).
    Itself,
    /// Refused or failed after every attempt.
    Failed,
    /// Not confirmed by the deadline.
    Timeout,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerReport {
    pub peer: String,
    pub status: PeerStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purged: Option<usize>,
    pub attempts: u32,
    pub duration_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Why a purge was not even tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    RateLimited { retry_after: Duration },
}

/// Purge ids recently applied, so a purge arriving twice (by peers and bus, or a replica
/// reaching itself) is applied once. Kept as hashes: fixed memory whatever ids peers send.
struct RecentIds {
    set: HashSet<u64>,
    order: VecDeque<u64>,
    hasher: std::collections::hash_map::RandomState,
}

const RECENT_IDS: usize = 16_384;

impl RecentIds {
    /// False when the id was already seen.
    fn insert(&mut self, id: &str) -> bool {
        use std::hash::BuildHasher;
        let hash = self.hasher.hash_one(id);
        if !self.set.insert(hash) {
            return false;
        }
        if self.order.len() == RECENT_IDS
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        self.order.push_back(hash);
        true
    }
}

/// Whether a purge id or instance id from a peer is well formed (this replica makes hex ones;
/// anything short and plain is accepted).
pub fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Client purge requests per second, with a burst of as many again.
struct TokenBucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(per_second: u32) -> TokenBucket {
        let rate = f64::from(per_second);
        TokenBucket {
            rate,
            capacity: rate * 2.0,
            tokens: rate * 2.0,
            last: Instant::now(),
        }
    }

    fn take(&mut self) -> Result<(), Duration> {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

pub struct Purger {
    local: Arc<dyn Invalidator>,
    instance: String,
    token: Option<String>,
    peers: Arc<PeerSet>,
    client: Client<HttpConnector, Full<Bytes>>,
    seen: Mutex<RecentIds>,
    limiter: Option<Mutex<TokenBucket>>,
    peer_limiter: Option<Mutex<TokenBucket>>,
    fanout_timeout: Duration,
    retries: u32,
    metrics: Arc<Metrics>,
    #[cfg(feature = "redis")]
    bus: Option<bus::Bus>,
}

/// Relayed purges accepted per second, as a multiple of the client limit.
const PEER_RATE_FACTOR: u32 = 16;

/// Whether this build can relay purges over Redis.
pub const REDIS_SUPPORTED: bool = cfg!(feature = "redis");

impl Purger {
    /// `token` is the admin token, sent to peers (they share it).
    pub fn new(
        local: Arc<dyn Invalidator>,
        config: &larder_config::Purge,
        token: Option<String>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Purger>, String> {
        if config.redis.is_some() && !REDIS_SUPPORTED {
            return Err(
                "purge.redis is configured, but this build of larder has no Redis \
                        support (build it with `--features redis`)"
                    .into(),
            );
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.fanout_timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        let instance = larder_telemetry::new_request_id()[..16].to_owned();
        Ok(Arc::new(Purger {
            local,
            peers: Arc::new(PeerSet::new(&config.peers).map_err(|e| e.to_string())?),
            token,
            client,
            seen: Mutex::new(RecentIds {
                set: HashSet::new(),
                order: VecDeque::new(),
                hasher: Default::default(),
            }),
            limiter: (config.max_requests_per_second > 0)
                .then(|| Mutex::new(TokenBucket::new(config.max_requests_per_second))),
            // Peers relay what their own clients were allowed: this bucket only stops a
            // replica (or a token holder posing as one) from flooding the others.
            peer_limiter: (config.max_requests_per_second > 0).then(|| {
                Mutex::new(TokenBucket::new(
                    config
                        .max_requests_per_second
                        .saturating_mul(PEER_RATE_FACTOR),
                ))
            }),
            fanout_timeout: config.fanout_timeout,
            retries: config.fanout_retries,
            metrics,
            #[cfg(feature = "redis")]
            bus: config
                .redis
                .as_ref()
                .map(bus::Bus::new)
                .transpose()
                .map_err(|e| format!("purge.redis.url: {e}"))?,
            instance,
        }))
    }

    /// This replica's id in purge answers and relays.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    pub fn peers(&self) -> &Arc<PeerSet> {
        &self.peers
    }

    /// Runs peer discovery and the bus subscriber until `shutdown` resolves.
    pub async fn run(
        self: Arc<Self>,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let discovery = self.peers.clone().run(self.metrics.clone());
        #[cfg(feature = "redis")]
        let bus = {
            let me = self.clone();
            async move {
                if let Some(bus) = &me.bus {
                    bus.subscribe(&me).await;
                } else {
                    std::future::pending::<()>().await;
                }
            }
        };
        #[cfg(not(feature = "redis"))]
        let bus = std::future::pending::<()>();
        tokio::select! {
            _ = shutdown => {}
            _ = discovery => {}
            _ = bus => {}
        }
    }

    /// Rate limit: client purges by `max_requests_per_second`; relayed ones by a bucket many
    /// times larger (their origin replica already limited its clients).
    pub fn admit(&self, source: &Source) -> Result<(), Refusal> {
        let limiter = match source {
            Source::Admin(_) | Source::PurgeMethod(_) => &self.limiter,
            Source::Peer { .. } | Source::Redis { .. } => &self.peer_limiter,
        };
        let Some(limiter) = limiter else {
            return Ok(());
        };
        limiter
            .lock()
            .take()
            .map_err(|retry_after| Refusal::RateLimited { retry_after })
    }

    /// Writes the audit line and counts a purge request refused before it was applied
    /// (`unauthorized`, `rate_limited`, `invalid`).
    pub fn refused(&self, source: &Source, result: &'static str) {
        PurgeEvent {
            id: "",
            source: source.name(),
            who: &source.who(),
            soft: false,
            result,
            targets: &[],
            peers: 0,
            peers_confirmed: 0,
        }
        .emit(&self.metrics);
    }

    /// Applies a purge here and, for a client's, everywhere else. `id` is the relayed id, if
    /// any; a client's purge gets a new one. Runs as its own task: a client that hangs up
    /// does not cancel the relay to the other replicas.
    pub async fn purge(
        self: &Arc<Self>,
        order: &PurgeOrder,
        source: Source,
        id: Option<String>,
    ) -> PurgeReport {
        let me = self.clone();
        let order = order.clone();
        tokio::spawn(async move { me.run_purge(order, source, id).await })
            .await
            .expect("the purge task does not panic")
    }

    async fn run_purge(
        &self,
        order: PurgeOrder,
        source: Source,
        id: Option<String>,
    ) -> PurgeReport {
        let id = id.unwrap_or_else(larder_telemetry::new_request_id);
        let mut report = PurgeReport {
            id: id.clone(),
            instance: self.instance.clone(),
            soft: order.soft,
            purged: 0,
            targets: Vec::new(),
            duplicate: false,
            peers: Vec::new(),
        };
        if !self.seen.lock().insert(&id) {
            report.duplicate = true;
            self.audit(&report, &source);
            return report;
        }
        // Removing many objects is CPU work: off the async workers.
        let local = self.local.clone();
        let selectors = order.selectors.clone();
        let soft = order.soft;
        let applied = tokio::task::spawn_blocking(move || {
            selectors
                .iter()
                .map(|selector| local.invalidate(selector, soft))
                .collect::<Vec<usize>>()
        })
        .await
        .expect("invalidation does not panic");
        for (selector, applied) in order.selectors.iter().zip(applied) {
            report.purged += applied;
            report.targets.push(TargetReport {
                kind: selector.kind().to_owned(),
                target: selector.to_string(),
                purged: applied,
            });
        }
        if source.is_client() {
            report.peers = self.relay_everywhere(&order, &id).await;
        }
        self.audit(&report, &source);
        report
    }

    /// Relays to every peer and publishes on the bus, all at once, all bounded by the
    /// fan-out deadline.
    async fn relay_everywhere(&self, order: &PurgeOrder, id: &str) -> Vec<PeerReport> {
        let body = Bytes::from(
            serde_json::to_vec(&PurgeBody::from_order(order))
                .expect("a purge body always serializes"),
        );
        let deadline = Instant::now() + self.fanout_timeout;
        let peers = self.peers.current(deadline).await;
        let relays = peers
            .iter()
            .map(|peer| self.relay(*peer, body.clone(), id, deadline));
        let relays = futures_util::future::join_all(relays);
        #[cfg(feature = "redis")]
        let bus = async {
            match &self.bus {
                Some(bus) => Some(
                    bus.publish(id, &self.instance, order, &self.metrics, deadline)
                        .await,
                ),
                None => None,
            }
        };
        #[cfg(not(feature = "redis"))]
        let bus = async { None };
        let (mut reports, bus) = tokio::join!(relays, bus);
        reports.extend(bus);
        // Peers a DNS name would name are unknown until it has resolved once: say so, or a
        // purge reaching only the static peers would look complete.
        if let Some((name, error)) = self.peers.discovery_problem() {
            reports.push(PeerReport {
                peer: name,
                status: PeerStatus::Failed,
                purged: None,
                attempts: 0,
                duration_ms: 0,
                error: Some(error),
            });
        }
        reports
    }

    fn audit(&self, report: &PurgeReport, source: &Source) {
        let targets: Vec<PurgeTargetResult> = report
            .targets
            .iter()
            .map(|t| PurgeTargetResult {
                kind: match t.kind.as_str() {
                    "url" => "url",
                    "prefix" => "prefix",
                    _ => "tag",
                },
                target: t.target.clone(),
                applied: t.purged,
            })
            .collect();
        let result = if report.duplicate {
            "duplicate"
        } else if report.complete() {
            "ok"
        } else {
            "partial"
        };
        PurgeEvent {
            id: &report.id,
            source: source.name(),
            who: &source.who(),
            soft: report.soft,
            result,
            targets: &targets,
            peers: report.peers.len(),
            peers_confirmed: report
                .peers
                .iter()
                .filter(|p| p.status == PeerStatus::Ok)
                .count(),
        }
        .emit(&self.metrics);
    }

    /// Sends one purge to one peer, retrying failures that may pass on a second try, never
    /// past the deadline.
    async fn relay(
        &self,
        peer: SocketAddr,
        body: Bytes,
        id: &str,
        deadline: Instant,
    ) -> PeerReport {
        let started = Instant::now();
        let per_attempt =
            (self.fanout_timeout / (self.retries + 1)).max(Duration::from_millis(100));
        let mut attempts = 0;
        let mut backoff = Duration::from_millis(50);
        let (status, purged, error) = loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break (
                    PeerStatus::Timeout,
                    None,
                    Some("deadline reached".to_owned()),
                );
            }
            attempts += 1;
            let outcome = tokio::time::timeout(
                per_attempt.min(remaining),
                self.send(peer, body.clone(), id),
            )
            .await
            .unwrap_or_else(|_| Err(RelayError::retryable("no answer in time")));
            match outcome {
                Ok(answer) if answer.instance == self.instance => {
                    break (PeerStatus::Itself, None, None);
                }
                Ok(answer) => break (PeerStatus::Ok, Some(answer.purged), None),
                Err(e) if !e.retryable || attempts > self.retries => {
                    let status = if Instant::now() >= deadline {
                        PeerStatus::Timeout
                    } else {
                        PeerStatus::Failed
                    };
                    break (status, None, Some(e.message));
                }
                Err(_) => {
                    let pause = backoff.min(deadline.saturating_duration_since(Instant::now()));
                    tokio::time::sleep(pause).await;
                    backoff *= 2;
                }
            }
        };
        let peer_name = peer.to_string();
        let duration = started.elapsed();
        if status != PeerStatus::Itself {
            FanoutEvent {
                purge_id: id,
                peer: &peer_name,
                attempts,
                duration,
                error: error.as_deref(),
            }
            .emit(&self.metrics);
        }
        PeerReport {
            peer: peer_name,
            status,
            purged,
            attempts,
            duration_ms: duration.as_millis() as u64,
            error,
        }
    }

    async fn send(
        &self,
        peer: SocketAddr,
        body: Bytes,
        id: &str,
    ) -> Result<PeerAnswer, RelayError> {
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(format!("http://{peer}/purge"))
            .header(header::CONTENT_TYPE, "application/json")
            .header(PURGE_ID_HEADER, id)
            .header(RELAYED_BY_HEADER, &self.instance);
        if let Some(token) = &self.token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request
            .body(Full::new(body))
            .map_err(|e| RelayError::fatal(format!("building the request: {e}")))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| RelayError::retryable(format!("{e:#}")))?;
        let status = response.status();
        let bytes = http_body_util::Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| RelayError::retryable(format!("reading the answer: {e}")))?
            .to_bytes();
        // 404 is a purge that found nothing there: applied all the same.
        if status.is_success() || status == StatusCode::NOT_FOUND {
            let answer: PeerAnswer = serde_json::from_slice(&bytes)
                .map_err(|e| RelayError::fatal(format!("unreadable answer: {e}")))?;
            return Ok(answer);
        }
        let text = String::from_utf8_lossy(&bytes);
        let text: String = text.trim().chars().take(200).collect();
        let message = format!("HTTP {}: {text}", status.as_u16());
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            Err(RelayError::retryable(message))
        } else {
            Err(RelayError::fatal(message))
        }
    }
}

/// A peer's answer is a small JSON document; more is not read.
const MAX_ANSWER: usize = 64 << 10;

#[derive(Deserialize)]
struct PeerAnswer {
    instance: String,
    #[serde(default)]
    purged: usize,
}

struct RelayError {
    message: String,
    retryable: bool,
}

impl RelayError {
    fn retryable(message: impl Into<String>) -> RelayError {
        RelayError {
            message: message.into(),
            retryable: true,
        }
    }

    fn fatal(message: impl Into<String>) -> RelayError {
        RelayError {
            message: message.into(),
            retryable: false,
        }
    }
}

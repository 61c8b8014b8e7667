//! The Prometheus registry. Names follow Prometheus conventions: `larder_` prefix, base units in
//! the name, `_total` on counters; label values come from closed sets (route and cluster names are
//! config-defined, so bounded too).

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::sharded::{ShardedCounter, ShardedHistogram};
use crate::{FanoutEvent, PurgeEvent, RequestEvent, UpstreamEvent};
use arc_swap::ArcSwap;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: Arc<str>,
    cluster: Arc<str>,
    method: &'static str,
    status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    resource_type: Arc<str>,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResourceTypeLabels {
    resource_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClusterLabels {
    cluster: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtocolErrorLabels {
    protocol: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BreakerLabels {
    cluster: Arc<str>,
    breaker: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamErrorLabels {
    cluster: Arc<str>,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PurgeLabels {
    kind: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PurgeKindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PurgeRequestLabels {
    source: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServedLabels {
    source: &'static str,
}

/// A closed set of outcomes under the conventional `result` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// A snapshot of one resource type's store, read at scrape time.
#[derive(Debug, Clone)]
pub struct StoreGauge {
    pub resource_type: String,
    pub objects: u64,
    pub bytes: u64,
    pub capacity_bytes: u64,
    pub evictions: u64,
}

/// The cache as a scrape sees it: each resource type's store, and the fills in flight.
#[derive(Debug, Clone, Default)]
pub struct CacheSnapshot {
    pub stores: Vec<StoreGauge>,
    /// Origin fetches for the cache under way, one per key.
    pub fills_in_flight: u64,
    /// Requests waiting on those fills.
    pub coalesce_waiters: u64,
}

type StoreSource = Box<dyn Fn() -> CacheSnapshot + Send + Sync>;

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, ShardedCounter>,
    request_duration: Family<ServedLabels, ShardedHistogram>,
    cache_lookups: Family<CacheLabels, ShardedCounter>,
    cache_not_stored: Family<ReasonLabels, ShardedCounter>,
    served_bytes: Family<ServedLabels, ShardedCounter>,
    store_objects: Family<ResourceTypeLabels, Gauge>,
    store_bytes: Family<ResourceTypeLabels, Gauge>,
    store_capacity: Family<ResourceTypeLabels, Gauge>,
    store_evictions: Family<ResourceTypeLabels, Counter>,
    upstream_duration: Family<ClusterLabels, ShardedHistogram>,
    upstream_errors: Family<UpstreamErrorLabels, Counter>,
    stale_served: Family<ReasonLabels, ShardedCounter>,
    revalidations: Family<OutcomeLabels, ShardedCounter>,
    upstream_retries: Family<ClusterLabels, Counter>,
    access_log_lines: Family<ResultLabels, Counter>,
    es_documents: Family<ResultLabels, Counter>,
    upstream_connect: Family<ClusterLabels, Histogram>,
    upstream_connections: Family<ClusterLabels, Gauge>,
    upstream_ejections: Family<ClusterLabels, Counter>,
    breaker_trips: Family<BreakerLabels, Counter>,
    purges: Family<PurgeLabels, Counter>,
    purged_objects: Family<PurgeKindLabels, Counter>,
    purge_requests: Family<PurgeRequestLabels, Counter>,
    fanout_duration: Family<PeerLabels, Histogram>,
    fanout_failures: Family<PeerLabels, Counter>,
    purge_peers: Gauge,
    fills_in_flight: Gauge,
    coalesce_waiters: Gauge,
    active_connections: Gauge<i64, std::sync::atomic::AtomicI64>,
    connections_refused: Family<ReasonLabels, Counter>,
    protocol_errors: Family<ProtocolErrorLabels, Counter>,
    config_reloads: Family<ResultLabels, Counter>,
    store_source: Mutex<Option<StoreSource>>,
    hot: HotHandles,
}

#[derive(Debug, Clone)]
pub(crate) struct AccessLogCounters {
    pub written: Counter,
    pub dropped: Counter,
    pub sampled_out: Counter,
}

/// Connection-level upstream series of one cluster, held by its connector.
#[derive(Clone, Debug)]
pub struct UpstreamConnectionMetrics {
    connect: Histogram,
    open: Gauge,
    ejections: Counter,
    /// By `Breaker as usize`.
    breaker_trips: [Counter; 3],
}

impl UpstreamConnectionMetrics {
    pub fn connected(&self, took: std::time::Duration) {
        self.connect.observe(took.as_secs_f64());
        self.open.inc();
    }

    pub fn closed(&self) {
        self.open.dec();
    }

    /// Outlier detection took an endpoint out of rotation.
    pub fn ejected(&self) {
        self.ejections.inc();
    }

    pub fn breaker_tripped(&self, breaker: crate::Breaker) {
        self.breaker_trips[breaker as usize].inc();
    }
}

/// Series every request updates, found without the families' SipHash lookups: a fast map from
/// label identity to the family's own series (same atomics, so the exposition is unchanged).
/// Route, cluster and resource-type labels are keyed by their `Arc<str>`'s address, which
/// stays unique because the entry holds a clone of that `Arc`.
struct HotHandles {
    requests: Handles<RequestKey, (Arc<str>, Arc<str>, ShardedCounter)>,
    lookups: Handles<(usize, &'static str), (Arc<str>, ShardedCounter)>,
    not_cached: Handles<&'static str, ShardedCounter>,
    stale_served: Handles<&'static str, ShardedCounter>,
    revalidations: Handles<&'static str, ShardedCounter>,
    /// By cluster address: the family's own lookup takes a read lock whose word both worker
    /// threads write on every pass-through, and hashes the labels with SipHash.
    upstream_duration: Handles<usize, (Arc<str>, ShardedHistogram)>,
    duration_cache: ShardedHistogram,
    duration_upstream: ShardedHistogram,
    bytes_cache: ShardedCounter,
    bytes_upstream: ShardedCounter,
}

/// (route address, cluster address, method class, status class).
type RequestKey = (usize, usize, &'static str, &'static str);

/// Read on every request by every worker thread, written once per new label set: an
/// `ArcSwap` read takes no lock whose cache line the threads would pass back and forth.
/// New entries wait in `added` (read under its lock) and join the shared map in batches, so
/// filling n label sets copies O(n) entries, not O(n²).
struct Handles<K, V> {
    map: ArcSwap<HashMap<K, V, rustc_hash::FxBuildHasher>>,
    added: Mutex<Added<K, V>>,
}

struct Added<K, V> {
    entries: HashMap<K, V, rustc_hash::FxBuildHasher>,
    /// Reads served from `entries` since the last merge.
    reads: usize,
}

/// Reads of waiting entries after which they are merged even if few.
const MERGE_AFTER_READS: usize = 64;

impl<K: std::hash::Hash + Eq + Clone, V: Clone> Handles<K, V> {
    fn new() -> Self {
        Handles {
            map: ArcSwap::default(),
            added: Mutex::new(Added {
                entries: HashMap::default(),
                reads: 0,
            }),
        }
    }

    /// Runs `f` on the entry for `key`, creating it first if needed.
    fn with(&self, key: K, create: impl FnOnce() -> V, f: impl FnOnce(&V)) {
        if let Some(v) = self.map.load().get(&key) {
            return f(v);
        }
        let mut added = self.added.lock();
        let shared = self.map.load_full();
        if let Some(v) = shared.get(&key) {
            return f(v);
        }
        added.reads += 1;
        f(added.entries.entry(key).or_insert_with(create));
        // At least half the shared map's size per merge (or entries read often enough).
        if added.entries.len() * 2 > shared.len() || added.reads >= MERGE_AFTER_READS {
            let mut next = (*shared).clone();
            next.extend(added.entries.drain());
            added.reads = 0;
            self.map.store(Arc::new(next));
        }
    }

    fn clear(&self) {
        let mut added = self.added.lock();
        added.entries.clear();
        added.reads = 0;
        self.map.store(Arc::default());
    }
}

impl Handles<&'static str, ShardedCounter> {
    /// Counts one under `key`, creating the family's series the first time.
    fn inc(&self, key: &'static str, create: impl FnOnce() -> ShardedCounter) {
        self.with(key, create, |counter| {
            counter.inc();
        });
    }
}

fn arc_key(s: &Option<Arc<str>>) -> usize {
    s.as_ref()
        .map_or(0, |s| Arc::as_ptr(s) as *const u8 as usize)
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// The label value for "none" (a request that never reached a route, say), shared so that
/// recording it allocates nothing.
fn empty() -> Arc<str> {
    static EMPTY: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
    EMPTY.get_or_init(|| Arc::from("")).clone()
}

/// 100µs .. ~13s: cache hits sit at the bottom, slow origins at the top.
fn latency_bounds() -> impl Iterator<Item = f64> {
    exponential_buckets(0.0001, 2.0, 18)
}

fn latency_histogram() -> Histogram {
    Histogram::new(latency_bounds())
}

/// For the series every request updates.
fn sharded_latency_histogram() -> ShardedHistogram {
    ShardedHistogram::new(latency_bounds())
}

fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

fn method_class(method: &str) -> &'static str {
    // Methods are client-chosen strings; folding them keeps label cardinality bounded.
    match method {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    }
}

impl Metrics {
    pub fn new(version: &str) -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("larder");
        let m = Metrics {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(sharded_latency_histogram),
            cache_lookups: Family::default(),
            cache_not_stored: Family::default(),
            served_bytes: Family::default(),
            store_objects: Family::default(),
            store_bytes: Family::default(),
            store_capacity: Family::default(),
            store_evictions: Family::default(),
            upstream_duration: Family::new_with_constructor(sharded_latency_histogram),
            upstream_errors: Family::default(),
            stale_served: Family::default(),
            revalidations: Family::default(),
            upstream_retries: Family::default(),
            access_log_lines: Family::default(),
            es_documents: Family::default(),
            upstream_connect: Family::new_with_constructor(latency_histogram),
            upstream_connections: Family::default(),
            upstream_ejections: Family::default(),
            breaker_trips: Family::default(),
            purges: Family::default(),
            purged_objects: Family::default(),
            purge_requests: Family::default(),
            fanout_duration: Family::new_with_constructor(latency_histogram),
            fanout_failures: Family::default(),
            purge_peers: Gauge::default(),
            fills_in_flight: Gauge::default(),
            coalesce_waiters: Gauge::default(),
            active_connections: Gauge::default(),
            connections_refused: Family::default(),
            protocol_errors: Family::default(),
            config_reloads: Family::default(),
            store_source: Mutex::new(None),
            registry: Registry::default(),
            hot: HotHandles {
                requests: Handles::new(),
                lookups: Handles::new(),
                not_cached: Handles::new(),
                stale_served: Handles::new(),
                revalidations: Handles::new(),
                upstream_duration: Handles::new(),
                duration_cache: ShardedHistogram::new(std::iter::empty()),
                duration_upstream: ShardedHistogram::new(std::iter::empty()),
                bytes_cache: ShardedCounter::default(),
                bytes_upstream: ShardedCounter::default(),
            },
        };
        let mut m = m;
        m.hot.duration_cache = m
            .request_duration
            .get_or_create(&ServedLabels { source: "cache" })
            .clone();
        m.hot.duration_upstream = m
            .request_duration
            .get_or_create(&ServedLabels { source: "upstream" })
            .clone();
        m.hot.bytes_cache = m
            .served_bytes
            .get_or_create(&ServedLabels { source: "cache" })
            .clone();
        m.hot.bytes_upstream = m
            .served_bytes
            .get_or_create(&ServedLabels { source: "upstream" })
            .clone();
        registry.register(
            "requests",
            "Downstream requests by route, cluster, method and status class",
            m.requests.clone(),
        );
        registry.register_with_unit(
            "request_duration",
            "Downstream request latency until the last body byte was sent, by where the body came from",
            Unit::Seconds,
            m.request_duration.clone(),
        );
        registry.register(
            "cache_lookups",
            "Cache results by resource type (hit, miss, revalidated, coalesced, expired, bypass)",
            m.cache_lookups.clone(),
        );
        registry.register(
            "cache_not_cached",
            "Requests not served from or stored in the cache, by reason",
            m.cache_not_stored.clone(),
        );
        registry.register_with_unit(
            "response_body",
            "Response body bytes sent to clients, by source (cache or upstream)",
            Unit::Bytes,
            m.served_bytes.clone(),
        );
        registry.register(
            "cache_objects",
            "Objects stored per resource type",
            m.store_objects.clone(),
        );
        registry.register_with_unit(
            "cache_size",
            "Bytes stored per resource type (key, headers and body)",
            Unit::Bytes,
            m.store_bytes.clone(),
        );
        registry.register(
            "cache_fills_in_flight",
            "Origin fetches for the cache under way (one per key; concurrent requests wait on it)",
            m.fills_in_flight.clone(),
        );
        registry.register(
            "cache_coalesce_waiters",
            "Requests waiting on a fill of their key (or reading it along as it arrives)",
            m.coalesce_waiters.clone(),
        );
        registry.register_with_unit(
            "cache_capacity",
            "Byte budget per resource type",
            Unit::Bytes,
            m.store_capacity.clone(),
        );
        registry.register(
            "cache_evictions",
            "Objects evicted to stay within the budget, per resource type",
            m.store_evictions.clone(),
        );
        registry.register_with_unit(
            "upstream_request_duration",
            "Upstream latency until the response head arrived, per cluster",
            Unit::Seconds,
            m.upstream_duration.clone(),
        );
        registry.register(
            "upstream_errors",
            "Upstream failures per cluster and kind (connect, timeout, protocol, no_endpoint)",
            m.upstream_errors.clone(),
        );
        registry.register(
            "cache_stale_served",
            "Stale responses served, by reason (stale_while_revalidate: while refreshing in the background; stale_if_error: the origin failed or was unreachable)",
            m.stale_served.clone(),
        );
        registry.register(
            "cache_revalidations",
            "Conditional requests for stale stored responses, by outcome (not_modified, modified, failed)",
            m.revalidations.clone(),
        );
        registry.register_with_unit(
            "upstream_connect_duration",
            "Time to establish a new upstream connection, per cluster",
            Unit::Seconds,
            m.upstream_connect.clone(),
        );
        registry.register(
            "upstream_connections",
            "Upstream connections open (in use or idle in the pool), per cluster",
            m.upstream_connections.clone(),
        );
        registry.register(
            "access_log_lines",
            "Access log lines by outcome (written: queued for output; dropped: the output could not keep up; sampled_out: left out by access_log.sample_rate)",
            m.access_log_lines.clone(),
        );
        registry.register(
            "access_log_es_documents",
            "Access log documents sent to Elasticsearch, by result (indexed; rejected: refused for good, e.g. a mapping error; dropped: queue full or retries exhausted; retried: sent again after 429/5xx)",
            m.es_documents.clone(),
        );
        registry.register(
            "upstream_ejections",
            "Endpoints taken out of rotation by outlier detection (consecutive failures), per cluster",
            m.upstream_ejections.clone(),
        );
        registry.register(
            "upstream_circuit_breaker_trips",
            "Times a cluster's circuit breaker limited a request, per cluster and breaker (max_requests and max_pending_requests: answered 503; max_connections: queued for a connection)",
            m.breaker_trips.clone(),
        );
        registry.register(
            "upstream_retries",
            "Requests sent again to an upstream (connect failure, closed pooled connection, or a status in retry_on_status), per cluster",
            m.upstream_retries.clone(),
        );
        registry.register(
            "purges",
            "Invalidations applied on this replica, by kind (url, prefix, tag) and result (purged, not_found)",
            m.purges.clone(),
        );
        registry.register(
            "purged_objects",
            "Stored responses removed or marked stale by purges, by kind",
            m.purged_objects.clone(),
        );
        registry.register(
            "purge_requests",
            "Purge requests by source (admin, purge_method, peer, redis) and result (ok, partial, duplicate, unauthorized, rate_limited, invalid)",
            m.purge_requests.clone(),
        );
        registry.register_with_unit(
            "purge_fanout_duration",
            "Time to relay one purge to a peer, retries included, per peer",
            Unit::Seconds,
            m.fanout_duration.clone(),
        );
        registry.register(
            "purge_fanout_failures",
            "Purges a peer did not confirm (after retries, or by the deadline), per peer",
            m.fanout_failures.clone(),
        );
        registry.register(
            "purge_peers",
            "Peers purges are relayed to (static and discovered)",
            m.purge_peers.clone(),
        );
        registry.register(
            "active_connections",
            "Downstream connections currently open",
            m.active_connections.clone(),
        );
        for reason in ["max_connections", "write_stalled"] {
            m.connections_refused
                .get_or_create(&ReasonLabels { reason })
                .inc_by(0);
        }
        registry.register(
            "downstream_protocol_errors",
            "Client connections that ended in a protocol error, by protocol and reason (http1: parse, header_timeout; h2: the error code Larder sent or received, e.g. ENHANCE_YOUR_CALM for floods and resets)",
            m.protocol_errors.clone(),
        );
        registry.register(
            "downstream_connections_closed_by_limit",
            "Downstream connections Larder closed to protect itself, by reason (max_connections: over limits.max_connections at accept; write_stalled: the client read nothing for limits.client_write_timeout)",
            m.connections_refused.clone(),
        );
        registry.register(
            "config_reloads",
            "Configuration loads by result",
            m.config_reloads.clone(),
        );
        // A gauge fixed at 1 rather than an OpenMetrics `info`: the Prometheus text format
        // (and promtool) know no `info` type, and dashboards join on it either way.
        let build: Family<Vec<(String, String)>, Gauge> = Family::default();
        build
            .get_or_create(&vec![("version".to_owned(), version.to_owned())])
            .set(1);
        registry.register("build_info", "Build information", build);
        // Series of closed label sets exist from the start at 0, so rates and dashboards see
        // them before the first event (and a missing series never hides a broken path).
        for reason in ["stale_while_revalidate", "stale_if_error"] {
            let _ = m.stale_served.get_or_create(&ReasonLabels { reason });
        }
        for outcome in ["not_modified", "modified", "failed"] {
            let _ = m.revalidations.get_or_create(&OutcomeLabels { outcome });
        }
        for result in ["written", "dropped", "sampled_out"] {
            let _ = m.access_log_lines.get_or_create(&ResultLabels { result });
        }
        for kind in ["url", "prefix", "tag"] {
            let _ = m.purged_objects.get_or_create(&PurgeKindLabels { kind });
            for result in ["purged", "not_found"] {
                let _ = m.purges.get_or_create(&PurgeLabels { kind, result });
            }
        }
        for result in ["success", "failure"] {
            let _ = m.config_reloads.get_or_create(&ResultLabels { result });
        }
        m.registry = registry;
        Arc::new(m)
    }

    /// Registers the function read at scrape time for per-resource-type store gauges.
    pub fn set_store_source(&self, source: impl Fn() -> CacheSnapshot + Send + Sync + 'static) {
        *self.store_source.lock() = Some(Box::new(source));
    }

    pub(crate) fn record_request(&self, e: &RequestEvent) {
        let hot = &self.hot;
        let method = method_class(e.method.as_str());
        let class = status_class(e.status);
        hot.requests.with(
            (arc_key(&e.route), arc_key(&e.cluster), method, class),
            || {
                let route = e.route.clone().unwrap_or_else(empty);
                let cluster = e.cluster.clone().unwrap_or_else(empty);
                let counter = self
                    .requests
                    .get_or_create(&RequestLabels {
                        route: route.clone(),
                        cluster: cluster.clone(),
                        method,
                        status_class: class,
                    })
                    .clone();
                (route, cluster, counter)
            },
            |(_, _, counter)| {
                counter.inc();
            },
        );
        let from_cache = matches!(
            e.cache_result,
            "hit" | "revalidated" | "coalesced" | "stale"
        );
        let (duration, bytes) = if from_cache {
            (&hot.duration_cache, &hot.bytes_cache)
        } else {
            (&hot.duration_upstream, &hot.bytes_upstream)
        };
        duration.observe(e.duration.as_secs_f64());
        if let Some(n) = e.response_body_bytes {
            bytes.inc_by(n);
        }
        hot.lookups.with(
            (arc_key(&e.resource_type), e.cache_result),
            || {
                let resource_type = e.resource_type.clone().unwrap_or_else(empty);
                let counter = self
                    .cache_lookups
                    .get_or_create(&CacheLabels {
                        resource_type: resource_type.clone(),
                        result: e.cache_result,
                    })
                    .clone();
                (resource_type, counter)
            },
            |(_, counter)| {
                counter.inc();
            },
        );
        if let Some(reason) = e.stale_reason {
            let reason = match reason {
                "stale-while-revalidate" => "stale_while_revalidate",
                "stale-if-error" => "stale_if_error",
                _ => "other",
            };
            hot.stale_served.inc(reason, || {
                self.stale_served
                    .get_or_create(&ReasonLabels { reason })
                    .clone()
            });
        }
        if let Some(outcome) = e.revalidation {
            hot.revalidations.inc(outcome, || {
                self.revalidations
                    .get_or_create(&OutcomeLabels { outcome })
                    .clone()
            });
        }
        if let Some(reason) = e.cache_reason {
            hot.not_cached.inc(reason, || {
                self.cache_not_stored
                    .get_or_create(&ReasonLabels { reason })
                    .clone()
            });
        }
    }

    pub(crate) fn record_upstream(&self, e: &UpstreamEvent<'_>) {
        // The cluster's name is cloned only for a series' first use (or a rare retry or
        // error): its reference count is a cache line every worker thread would write.
        if e.retries > 0 {
            self.upstream_retries
                .get_or_create(&ClusterLabels {
                    cluster: e.cluster.clone(),
                })
                .inc_by(u64::from(e.retries));
        }
        match e.error {
            None => self.hot.upstream_duration.with(
                Arc::as_ptr(e.cluster) as *const u8 as usize,
                || {
                    let histogram = self
                        .upstream_duration
                        .get_or_create(&ClusterLabels {
                            cluster: e.cluster.clone(),
                        })
                        .clone();
                    (e.cluster.clone(), histogram)
                },
                |(_, histogram)| histogram.observe(e.duration.as_secs_f64()),
            ),
            Some(kind) => {
                self.upstream_errors
                    .get_or_create(&UpstreamErrorLabels {
                        cluster: e.cluster.clone(),
                        kind: kind.as_str(),
                    })
                    .inc();
            }
        }
    }

    pub(crate) fn record_purge(&self, e: &PurgeEvent<'_>) {
        self.purge_requests
            .get_or_create(&PurgeRequestLabels {
                source: e.source,
                result: e.result,
            })
            .inc();
        for target in e.targets {
            let result = if target.applied > 0 {
                "purged"
            } else {
                "not_found"
            };
            self.purges
                .get_or_create(&PurgeLabels {
                    kind: target.kind,
                    result,
                })
                .inc();
            self.purged_objects
                .get_or_create(&PurgeKindLabels { kind: target.kind })
                .inc_by(target.applied as u64);
        }
    }

    pub(crate) fn record_fanout(&self, e: &FanoutEvent<'_>) {
        let labels = PeerLabels {
            peer: e.peer.to_owned(),
        };
        self.fanout_duration
            .get_or_create(&labels)
            .observe(e.duration.as_secs_f64());
        if e.error.is_some() {
            self.fanout_failures.get_or_create(&labels).inc();
        }
    }

    /// Forgets the fast handles of route, cluster and resource-type series (their families keep
    /// the counts): after a reload the old labels' `Arc`s would otherwise be held forever.
    pub fn forget_hot_handles(&self) {
        self.hot.requests.clear();
        self.hot.lookups.clear();
        self.hot.upstream_duration.clear();
    }

    /// Drops a peer's series once it is no longer a peer, so churn does not grow them.
    pub fn forget_purge_peer(&self, peer: &str) {
        let labels = PeerLabels {
            peer: peer.to_owned(),
        };
        self.fanout_duration.remove(&labels);
        self.fanout_failures.remove(&labels);
    }

    pub(crate) fn es_counters(&self) -> crate::elasticsearch::EsCounters {
        let counter = |result| {
            self.es_documents
                .get_or_create(&ResultLabels { result })
                .clone()
        };
        crate::elasticsearch::EsCounters {
            indexed: counter("indexed"),
            rejected: counter("rejected"),
            dropped: counter("dropped"),
            retried: counter("retried"),
        }
    }

    pub(crate) fn access_log_counters(&self) -> AccessLogCounters {
        let counter = |result| {
            self.access_log_lines
                .get_or_create(&ResultLabels { result })
                .clone()
        };
        AccessLogCounters {
            written: counter("written"),
            dropped: counter("dropped"),
            sampled_out: counter("sampled_out"),
        }
    }

    /// The series one cluster's connections report into.
    pub fn upstream_connection_metrics(&self, cluster: &Arc<str>) -> UpstreamConnectionMetrics {
        let labels = ClusterLabels {
            cluster: cluster.clone(),
        };
        UpstreamConnectionMetrics {
            connect: self.upstream_connect.get_or_create(&labels).clone(),
            open: self.upstream_connections.get_or_create(&labels).clone(),
            ejections: self.upstream_ejections.get_or_create(&labels).clone(),
            breaker_trips: crate::Breaker::ALL.map(|breaker| {
                self.breaker_trips
                    .get_or_create(&BreakerLabels {
                        cluster: cluster.clone(),
                        breaker: breaker.as_str(),
                    })
                    .clone()
            }),
        }
    }

    /// How many peers purges are currently relayed to.
    pub fn set_purge_peers(&self, n: usize) {
        self.purge_peers.set(n as i64);
    }

    pub fn record_config_reload(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.config_reloads
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    pub fn connection_opened(&self) {
        self.active_connections.inc();
    }

    pub fn connection_closed(&self) {
        self.active_connections.dec();
    }

    /// A client connection ended in a protocol error.
    pub fn protocol_error(&self, protocol: &'static str, reason: &'static str) {
        self.protocol_errors
            .get_or_create(&ProtocolErrorLabels { protocol, reason })
            .inc();
    }

    /// A downstream connection closed by a limit: `max_connections` or `write_stalled`.
    pub fn connection_limited(&self, reason: &'static str) {
        self.connections_refused
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    fn refresh_stores(&self) {
        let source = self.store_source.lock();
        let Some(source) = source.as_ref() else {
            return;
        };
        let snapshot = source();
        self.fills_in_flight.set(snapshot.fills_in_flight as i64);
        self.coalesce_waiters.set(snapshot.coalesce_waiters as i64);
        for s in snapshot.stores {
            let labels = ResourceTypeLabels {
                resource_type: s.resource_type,
            };
            self.store_objects
                .get_or_create(&labels)
                .set(s.objects as i64);
            self.store_bytes.get_or_create(&labels).set(s.bytes as i64);
            self.store_capacity
                .get_or_create(&labels)
                .set(s.capacity_bytes as i64);
            // The store counts evictions itself; catch the exported counter up (the lock above
            // serialises concurrent scrapes, so the counter never runs ahead).
            let counter = self.store_evictions.get_or_create(&labels);
            let seen = counter.get();
            if s.evictions > seen {
                counter.inc_by(s.evictions - seen);
            }
        }
    }

    /// Text exposition (OpenMetrics text, which Prometheus scrapes natively).
    /// The OpenMetrics exposition (what Prometheus asks for).
    pub fn encode(&self) -> String {
        self.refresh_stores();
        let mut out = String::with_capacity(16 * 1024);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// The classic Prometheus text format (0.0.4), for clients that do not ask for
    /// OpenMetrics (curl, promtool, older scrapers). The two differ only in metadata: counters
    /// are named with `_total` in HELP and TYPE, and there are no UNIT lines or EOF marker.
    pub fn encode_text(&self) -> String {
        let open_metrics = self.encode();
        let counters: std::collections::HashSet<&str> = open_metrics
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.strip_suffix(" counter"))
            .collect();
        let mut out = String::with_capacity(open_metrics.len());
        for line in open_metrics.lines() {
            if line.starts_with("# UNIT ") || line == "# EOF" {
                continue;
            }
            let meta = ["# HELP ", "# TYPE "]
                .into_iter()
                .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
            match meta {
                Some((prefix, rest)) => {
                    let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                    out.push_str(prefix);
                    out.push_str(name);
                    if counters.contains(name) {
                        out.push_str("_total");
                    }
                    out.push(' ');
                    out.push_str(tail);
                }
                None => out.push_str(line),
            }
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    fn event(route: &str) -> RequestEvent {
        RequestEvent {
            start: SystemTime::now(),
            duration: Duration::from_millis(3),
            request_id: "r".into(),
            trace_id: None,
            client: None,
            method: http::Method::GET,
            http_version: "1.1",
            host: "h".into(),
            path: "/".into(),
            query: None,
            user_agent: None,
            status: 200,
            response_body_bytes: Some(10),
            route: Some(route.into()),
            cluster: Some("c".into()),
            upstream_address: None,
            upstream_duration: None,
            cache_result: "hit",
            cache_reason: None,
            stale_reason: None,
            revalidation: None,
            resource_type: Some("default".into()),
        }
    }

    /// Label sets arriving one by one (each waits before joining the shared map in a batch)
    /// and concurrently from several threads are all counted, each in its own series.
    #[test]
    fn counts_every_label_set_while_they_join_the_fast_map_in_batches() {
        let m = Metrics::new("1.2.3");
        let events: Vec<RequestEvent> = (0..150).map(|i| event(&format!("r{i}"))).collect();
        std::thread::scope(|scope| {
            for _ in 0..3 {
                scope.spawn(|| {
                    for e in &events {
                        m.record_request(e);
                    }
                });
            }
        });
        let text = m.encode();
        for i in 0..150 {
            let series = format!(
                r#"larder_requests_total{{route="r{i}",cluster="c",method="GET",status_class="2xx"}} 3"#
            );
            assert!(text.contains(&series), "{series}\n{text}");
        }
        assert!(
            text.contains("larder_request_duration_seconds_count{source=\"cache\"} 450"),
            "{text}"
        );
    }

    #[test]
    fn upstream_durations_keep_to_their_cluster_across_a_reload() {
        let m = Metrics::new("1.2.3");
        let record = |cluster: &Arc<str>, n: usize| {
            for _ in 0..n {
                m.record_upstream(&UpstreamEvent {
                    cluster,
                    duration: Duration::from_millis(3),
                    error: None,
                    retries: 0,
                });
            }
        };
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        record(&a, 2);
        record(&b, 3);
        // A reload makes new names; the old ones may be freed and their addresses reused.
        m.forget_hot_handles();
        drop((a, b));
        let (b, c): (Arc<str>, Arc<str>) = ("b".into(), "c".into());
        record(&b, 1);
        record(&c, 4);
        let text = m.encode();
        for (cluster, count) in [("a", 2), ("b", 4), ("c", 4)] {
            let series = format!(
                r#"larder_upstream_request_duration_seconds_count{{cluster="{cluster}"}} {count}"#
            );
            assert!(text.contains(&series), "{series}\n{text}");
        }
    }

    #[test]
    fn encodes_events_and_store_gauges() {
        let m = Metrics::new("1.2.3");
        let event = RequestEvent {
            method: http::Method::from_bytes(b"BREW").unwrap(),
            ..event("r0")
        };
        m.record_request(&event);
        m.set_store_source(|| CacheSnapshot {
            stores: vec![StoreGauge {
                resource_type: "default".into(),
                objects: 2,
                bytes: 300,
                capacity_bytes: 1000,
                evictions: 5,
            }],
            fills_in_flight: 1,
            coalesce_waiters: 7,
        });
        let text = m.encode();
        assert!(text.contains("larder_cache_fills_in_flight 1\n"), "{text}");
        assert!(text.contains("larder_cache_coalesce_waiters 7\n"), "{text}");
        assert!(text.contains(r#"larder_requests_total{route="r0",cluster="c",method="other",status_class="2xx"} 1"#), "{text}");
        assert!(
            text.contains(r#"larder_cache_lookups_total{resource_type="default",result="hit"} 1"#)
        );
        assert!(text.contains(r#"larder_cache_evictions_total{resource_type="default"} 5"#));
        assert!(text.contains(r#"larder_cache_size_bytes{resource_type="default"} 300"#));
        assert!(text.contains(r#"larder_build_info{version="1.2.3"} 1"#));
        // A second scrape does not double-count evictions.
        assert!(
            m.encode()
                .contains(r#"larder_cache_evictions_total{resource_type="default"} 5"#)
        );
    }
}

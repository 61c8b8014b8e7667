#![forbid(unsafe_code)]
//! Larder's data path: listeners, routing, the cache pipeline and upstream clusters.

pub mod body;
pub mod demo;
pub mod error;
pub mod headers;
pub mod interim;
mod pipeline;
pub mod router;
pub mod server;
pub mod upstream;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use larder_cache::{
    Cache, CacheSettings, FreshnessRules, KeyRules, QueryMode, ResourceMatcher, ResourceTypeSpec,
};
use larder_config::Config;
use larder_telemetry::{AccessLog, Metrics, StoreGauge};

use crate::router::Router;
use crate::upstream::Cluster;

/// Request limits enforced before anything is forwarded.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_request_body_size: u64,
}

/// Everything derived from one version of the config. Requests hold an `Arc` to the version
/// they started with, so a reload never changes the rules under a request in flight.
pub struct Runtime {
    pub config: Arc<Config>,
    pub router: Router,
    pub clusters: Vec<Cluster>,
    pub cache: Arc<Cache>,
    pub limits: Limits,
    pub coalesce_timeout: Duration,
    /// Response fields no client sees (tag headers, when stripping is on).
    pub hidden_response_headers: Vec<http::HeaderName>,
}

/// The config's resource-type match, as the cache engine asks it.
#[derive(Debug)]
struct ConfigMatcher(larder_config::ResourceMatch);

impl ResourceMatcher for ConfigMatcher {
    fn may_match_request(&self, path: &str) -> bool {
        self.0.matches_request_path(path) != Some(false)
    }

    fn matches_response(&self, path: &str, content_type: Option<&str>) -> bool {
        self.0.matches(path, content_type)
    }
}

pub fn cache_from_config(config: &Config) -> Cache {
    let specs = config
        .resource_types
        .iter()
        .map(|rt| ResourceTypeSpec {
            name: rt.name.clone(),
            matcher: Arc::new(ConfigMatcher(rt.r#match.clone())),
            capacity_bytes: rt.config.cache_size,
            max_object_size: rt.config.max_object_size,
            freshness: FreshnessRules {
                ttl: rt.config.ttl,
                override_origin: rt.config.override_origin_ttl,
                heuristic: rt.config.heuristic_freshness,
                grace: rt.config.grace,
                stale_if_error: rt.config.stale_if_error,
                stale_if_unreachable: rt.config.stale_if_unreachable,
                keep: rt.config.keep,
            },
            set_cookie: match rt.config.set_cookie {
                larder_config::SetCookiePolicy::Store => larder_cache::SetCookiePolicy::Store,
                larder_config::SetCookiePolicy::Strip => larder_cache::SetCookiePolicy::Strip,
                larder_config::SetCookiePolicy::Bypass => larder_cache::SetCookiePolicy::Bypass,
            },
            key: KeyRules {
                query: match rt.config.cache_key.query {
                    larder_config::QueryKeyMode::Keep => QueryMode::Keep,
                    larder_config::QueryKeyMode::Drop => QueryMode::Drop,
                    larder_config::QueryKeyMode::Sort => QueryMode::Sort,
                },
                headers: rt
                    .config
                    .cache_key
                    .headers
                    .iter()
                    .filter_map(|h| {
                        http::HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).ok()
                    })
                    .collect(),
            },
        })
        .collect();
    let defaults = CacheSettings::default();
    let own_field = config
        .cache
        .targeted_cache_control
        .as_deref()
        .and_then(|name| http::HeaderName::from_bytes(name.as_bytes()).ok());
    Cache::new(
        specs,
        CacheSettings {
            targeted_fields: own_field
                .into_iter()
                .chain(defaults.targeted_fields.iter().cloned())
                .collect(),
            max_variants: config.cache.max_variants,
            max_coalesced_waiters: config.cache.max_coalesced_waiters,
            tag_headers: tag_headers(config),
            strip_tag_headers: config.purge.strip_tag_headers,
            ..defaults
        },
    )
}

fn tag_headers(config: &Config) -> Vec<http::HeaderName> {
    config
        .purge
        .tag_headers
        .iter()
        .filter_map(|name| http::HeaderName::from_bytes(name.as_bytes()).ok())
        .collect()
}

impl Runtime {
    pub fn build(config: Arc<Config>, metrics: &Metrics) -> Runtime {
        let clusters: Vec<Cluster> = config
            .clusters
            .iter()
            .map(|c| Cluster::new(c, metrics))
            .collect();
        let index: HashMap<&str, usize> = config
            .clusters
            .iter()
            .enumerate()
            .map(|(i, c)| (c.name.as_str(), i))
            .collect();
        Runtime {
            router: Router::new(&config, &index),
            clusters,
            cache: Arc::new(cache_from_config(&config)),
            limits: Limits {
                max_request_body_size: config.limits.max_request_body_size,
            },
            coalesce_timeout: config.cache.coalesce_timeout,
            hidden_response_headers: if config.purge.strip_tag_headers {
                tag_headers(&config)
            } else {
                Vec::new()
            },
            config,
        }
    }
}

pub struct Proxy {
    /// Lets the pipeline start work that outlives a request (background refresh).
    me: std::sync::Weak<Proxy>,
    runtime: ArcSwap<Runtime>,
    pub metrics: Arc<Metrics>,
    access_log: Option<Arc<AccessLog>>,
    /// Request tracing, when configured.
    tracing: Option<Arc<larder_telemetry::Tracing>>,
    /// Set when a drain starts: HTTP/1 responses then close their connection, so clients move
    /// to other replicas before the listeners close.
    draining: std::sync::atomic::AtomicBool,
    /// Where `PURGE` requests go (cluster-wide); set once the purger exists, as it holds the
    /// proxy itself as its local cache. Without one, `PURGE` applies to this replica only.
    purger: std::sync::OnceLock<std::sync::Weak<larder_purge::Purger>>,
}

impl Proxy {
    pub fn new(
        config: Arc<Config>,
        metrics: Arc<Metrics>,
        access_log: Option<AccessLog>,
        tracing: Option<Arc<larder_telemetry::Tracing>>,
    ) -> Arc<Proxy> {
        let proxy = Arc::new_cyclic(|me| Proxy {
            me: me.clone(),
            tracing,
            draining: std::sync::atomic::AtomicBool::new(false),
            runtime: ArcSwap::from_pointee(Runtime::build(config, &metrics)),
            metrics: metrics.clone(),
            access_log: access_log.map(Arc::new),
            purger: std::sync::OnceLock::new(),
        });
        let weak = Arc::downgrade(&proxy);
        metrics.set_store_source(move || {
            let Some(proxy) = weak.upgrade() else {
                return Vec::new();
            };
            proxy
                .runtime()
                .cache
                .stats()
                .into_iter()
                .map(|(name, s)| StoreGauge {
                    resource_type: name.to_owned(),
                    objects: s.objects,
                    bytes: s.bytes,
                    capacity_bytes: s.capacity_bytes,
                    evictions: s.evictions,
                })
                .collect()
        });
        proxy
    }

    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.load_full()
    }

    pub fn config(&self) -> Arc<Config> {
        self.runtime.load().config.clone()
    }

    pub fn access_log(&self) -> Option<&Arc<AccessLog>> {
        self.access_log.as_ref()
    }

    pub fn tracing(&self) -> Option<&Arc<larder_telemetry::Tracing>> {
        self.tracing.as_ref()
    }

    /// From now on every HTTP/1 response closes its connection.
    pub fn start_draining(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sends `PURGE` requests through this purger from now on.
    pub fn set_purger(&self, purger: &Arc<larder_purge::Purger>) {
        let _ = self.purger.set(Arc::downgrade(purger));
    }
}

/// Purges go to whatever cache the current config version holds.
impl larder_cache::Invalidator for Proxy {
    fn invalidate(&self, selector: &larder_cache::Selector, soft: bool) -> usize {
        self.runtime
            .load()
            .cache
            .invalidate(selector, soft, std::time::SystemTime::now())
    }
}

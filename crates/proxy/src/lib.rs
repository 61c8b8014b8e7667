#![forbid(unsafe_code)]
//! Larder's data path: listeners, routing, the cache pipeline and upstream clusters.

pub mod balance;
pub mod body;
mod cork;
pub mod demo;
mod discovery;
pub mod error;
#[doc(hidden)]
pub mod fuzz_checks;
pub mod head_deadline;
pub mod headers;
pub mod http1;
mod http2;
pub mod interim;
mod pipeline;
pub use pipeline::{Answer, ResponseWriter, StoredLines};
pub mod router;
pub mod server;
pub mod tls;
pub mod upstream;
pub mod workers;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use larder_cache::{
    Cache, CacheSettings, FreshnessRules, KeyRules, QueryMode, ResourceMatcher, ResourceTypeSpec,
};
use larder_config::Config;
use larder_telemetry::{AccessLog, CacheSnapshot, Metrics, StoreGauge};

use crate::router::Router;
use crate::upstream::Cluster;

/// Request limits and forwarding rules applied per request (a reload swaps them).
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_request_body_size: u64,
    pub request_body_timeout: Duration,
    /// Peers whose X-Forwarded-For is extended rather than replaced.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Removed from requests before forwarding.
    pub strip_request_headers: Vec<http::HeaderName>,
}

/// Everything derived from one version of the config. Requests hold an `Arc` to the version
/// they started with, so a reload never changes the rules under a request in flight.
pub struct Runtime {
    /// 1 for the config Larder started with, one more per successful reload.
    pub generation: u64,
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
    let (specs, settings) = cache_specs(config);
    Cache::new(specs, settings)
}

/// The engine's view of the config: resource types and cache-wide settings.
fn cache_specs(config: &Config) -> (Vec<ResourceTypeSpec>, CacheSettings) {
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
    let settings = CacheSettings {
        targeted_fields: own_field
            .into_iter()
            .chain(defaults.targeted_fields.iter().cloned())
            .collect(),
        max_variants: config.cache.max_variants,
        max_coalesced_waiters: config.cache.max_coalesced_waiters,
        tag_headers: tag_headers(config),
        strip_tag_headers: config.purge.strip_tag_headers,
        heuristic_errors: config.cache.heuristic_errors,
        per_response_fields: vec![pipeline::CACHE_STATUS.clone(), pipeline::REQUEST_ID.clone()],
        ..defaults
    };
    (specs, settings)
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
    pub fn build(config: Arc<Config>, metrics: &Metrics) -> Result<Runtime, String> {
        let cache = Arc::new(cache_from_config(&config));
        Self::assemble(config, metrics, cache, 1)
    }

    /// The runtime of a reloaded config: resource types whose definition did not change keep
    /// their stored objects (and their place in memory); the rest start empty.
    pub fn rebuild(
        config: Arc<Config>,
        metrics: &Metrics,
        previous: &Runtime,
    ) -> Result<Runtime, String> {
        let (specs, settings) = cache_specs(&config);
        // Stored objects were admitted under the old cache-wide rules too: keep them only
        // when those are unchanged as well.
        let cache_rules_same = config.cache.without_start_only()
            == previous.config.cache.without_start_only()
            && config.purge.tag_headers == previous.config.purge.tag_headers
            && config.purge.strip_tag_headers == previous.config.purge.strip_tag_headers;
        let cache = previous.cache.reconfigure(specs, settings, |name| {
            cache_rules_same && config.resource_type(name) == previous.config.resource_type(name)
        });
        Self::assemble(config, metrics, Arc::new(cache), previous.generation + 1)
    }

    fn assemble(
        config: Arc<Config>,
        metrics: &Metrics,
        cache: Arc<Cache>,
        generation: u64,
    ) -> Result<Runtime, String> {
        let clusters: Vec<Cluster> = config
            .clusters
            .iter()
            .map(|c| Cluster::new(c, metrics))
            .collect::<Result<_, _>>()?;
        let index: HashMap<&str, usize> = config
            .clusters
            .iter()
            .enumerate()
            .map(|(i, c)| (c.name.as_str(), i))
            .collect();
        Ok(Runtime {
            generation,
            router: Router::new(&config, &index),
            clusters,
            cache,
            limits: Limits {
                max_request_body_size: config.limits.max_request_body_size,
                request_body_timeout: config.limits.request_body_timeout,
                trusted_proxies: config.limits.trusted_proxies.clone(),
                strip_request_headers: config
                    .limits
                    .strip_request_headers
                    .iter()
                    .filter_map(|n| http::HeaderName::from_bytes(n.as_bytes()).ok())
                    .collect(),
            },
            coalesce_timeout: config.cache.coalesce_timeout,
            hidden_response_headers: if config.purge.strip_tag_headers {
                tag_headers(&config)
            } else {
                Vec::new()
            },
            config,
        })
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
    ) -> Result<Arc<Proxy>, String> {
        let runtime = Runtime::build(config, &metrics)?;
        let proxy = Arc::new_cyclic(|me| Proxy {
            me: me.clone(),
            tracing,
            draining: std::sync::atomic::AtomicBool::new(false),
            runtime: ArcSwap::from_pointee(runtime),
            metrics: metrics.clone(),
            access_log: access_log.map(Arc::new),
            purger: std::sync::OnceLock::new(),
        });
        let weak = Arc::downgrade(&proxy);
        metrics.set_store_source(move || {
            let Some(proxy) = weak.upgrade() else {
                return CacheSnapshot::default();
            };
            let cache = &proxy.runtime().cache;
            let (fills, waiters) = cache.coalescer().snapshot();
            CacheSnapshot {
                stores: cache
                    .stats()
                    .into_iter()
                    .map(|(name, s)| StoreGauge {
                        resource_type: name.to_owned(),
                        objects: s.objects,
                        bytes: s.bytes,
                        capacity_bytes: s.capacity_bytes,
                        evictions: s.evictions,
                    })
                    .collect(),
                fills_in_flight: fills as u64,
                coalesce_waiters: waiters as u64,
            }
        });
        Ok(proxy)
    }

    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.load_full()
    }

    pub fn config(&self) -> Arc<Config> {
        self.runtime.load().config.clone()
    }

    /// Swaps in a new, already validated config; requests in flight finish under the one
    /// they started with. Returns the new generation and the top-level sections that changed.
    pub fn reload(&self, config: Config) -> Result<(u64, Vec<&'static str>), String> {
        let previous = self.runtime.load_full();
        let changed = changed_sections(&previous.config, &config);
        let next = Runtime::rebuild(Arc::new(config), &self.metrics, &previous)?;
        let generation = next.generation;
        self.runtime.store(Arc::new(next));
        self.metrics.forget_hot_handles();
        Ok((generation, changed))
    }

    pub fn generation(&self) -> u64 {
        self.runtime.load().generation
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

/// Top-level config sections that differ.
fn changed_sections(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    let mut check = |name: &'static str, same: bool| {
        if !same {
            changed.push(name);
        }
    };
    check("listeners", old.listeners == new.listeners);
    check("admin", old.admin == new.admin);
    check("limits", old.limits == new.limits);
    check("access_log", old.access_log == new.access_log);
    check("virtual_hosts", old.virtual_hosts == new.virtual_hosts);
    check("clusters", old.clusters == new.clusters);
    check(
        "cache",
        old.cache.without_start_only() == new.cache.without_start_only(),
    );
    check(
        "cache.preallocate",
        old.cache.preallocate == new.cache.preallocate,
    );
    check("resource_types", old.resource_types == new.resource_types);
    check("purge", old.purge == new.purge);
    check("log", old.log == new.log);
    check("tracing", old.tracing == new.tracing);
    check("drain", old.drain == new.drain);
    changed
}

/// Sections a reload cannot apply to a running process: listeners and the admin server are
/// bound, and logging, tracing, the access log and purge relaying are set up, at start.
pub const RESTART_SECTIONS: &[&str] = &[
    "listeners",
    "admin",
    "access_log",
    "log",
    "tracing",
    "purge",
    "cache.preallocate",
];

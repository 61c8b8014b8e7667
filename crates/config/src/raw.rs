//! The config file's shape as serde sees it.
//!
//! Serde only checks structure here (unknown keys, wrong node kinds). Anything that can be
//! wrong in more than one place at once (units, addresses, names, required keys) is kept as
//! loosely typed as possible so that `build` can report all such problems together rather
//! than stopping at the first one.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, SeqAccess, Visitor};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    pub listeners: Option<Vec<RawListener>>,
    pub admin: Option<RawAdmin>,
    pub limits: Option<RawLimits>,
    pub access_log: Option<RawAccessLog>,
    pub virtual_hosts: Option<Vec<RawVirtualHost>>,
    pub clusters: Option<Vec<RawCluster>>,
    pub cache: Option<RawCache>,
    pub resource_type: Option<RawResourceType>,
    pub resource_types: Option<Vec<RawResourceType>>,
    pub purge: Option<RawPurge>,
    pub log: Option<RawLog>,
    pub tracing: Option<RawTracing>,
    pub drain: Option<RawDrain>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDrain {
    pub delay: Option<Scalar>,
    pub timeout: Option<Scalar>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTracing {
    pub enabled: Option<bool>,
    pub endpoint: Option<String>,
    pub service_name: Option<String>,
    pub sample_ratio: Option<f64>,
    pub max_queue_size: Option<u64>,
    pub export_timeout: Option<Scalar>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLog {
    pub level: Option<String>,
    pub format: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPurge {
    pub tag_headers: Option<StrList>,
    pub strip_tag_headers: Option<bool>,
    pub max_requests_per_second: Option<u64>,
    pub purge_method: Option<RawPurgeMethod>,
    pub peers: Option<RawPeers>,
    pub fanout_timeout: Option<Scalar>,
    pub fanout_retries: Option<u64>,
    pub redis: Option<RawRedis>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPurgeMethod {
    pub enabled: Option<bool>,
    pub allowed_cidrs: Option<StrList>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPeers {
    pub dns: Option<String>,
    pub port: Option<u64>,
    pub refresh_interval: Option<Scalar>,
    pub nameserver: Option<String>,
    pub r#static: Option<StrList>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRedis {
    pub url: Option<String>,
    pub channel: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawListener {
    pub name: Option<String>,
    pub address: Option<String>,
    pub tls: Option<RawListenerTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawListenerTls {
    pub certificates: Option<Vec<RawCertificate>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCertificate {
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAdmin {
    pub address: Option<String>,
    pub token_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLimits {
    pub max_request_header_size: Option<Scalar>,
    pub max_request_headers: Option<u64>,
    pub max_request_body_size: Option<Scalar>,
    pub max_connections: Option<u64>,
    pub header_read_timeout: Option<Scalar>,
    pub request_body_timeout: Option<Scalar>,
    pub client_write_timeout: Option<Scalar>,
    pub http2_idle_timeout: Option<Scalar>,
    pub trusted_proxies: Option<Vec<String>>,
    pub strip_request_headers: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAccessLog {
    pub enabled: Option<bool>,
    pub output: Option<String>,
    pub sample_rate: Option<f64>,
    pub exclude_fields: Option<StrList>,
    pub elasticsearch: Option<RawElasticsearch>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawElasticsearch {
    pub url: Option<String>,
    pub index: Option<String>,
    pub data_stream: Option<bool>,
    pub api_key_file: Option<String>,
    pub username: Option<String>,
    pub password_file: Option<String>,
    pub batch_size: Option<u64>,
    pub flush_interval: Option<Scalar>,
    pub max_queue: Option<u64>,
    pub gzip: Option<bool>,
    pub timeout: Option<Scalar>,
    pub max_retries: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawVirtualHost {
    pub name: Option<String>,
    pub domains: Option<Vec<String>>,
    pub routes: Option<Vec<RawRoute>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRoute {
    pub name: Option<String>,
    pub r#match: Option<RawRouteMatch>,
    pub cluster: Option<String>,
    pub cache: Option<bool>,
    pub timeout: Option<Scalar>,
    pub connect_timeout: Option<Scalar>,
    pub idle_timeout: Option<Scalar>,
    pub total_timeout: Option<Scalar>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRouteMatch {
    pub prefix: Option<String>,
    pub path: Option<String>,
    pub regex: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCluster {
    pub name: Option<String>,
    pub endpoints: Option<Vec<RawEndpoint>>,
    pub lb_policy: Option<String>,
    pub connect_timeout: Option<Scalar>,
    pub request_timeout: Option<Scalar>,
    pub idle_timeout: Option<Scalar>,
    pub max_idle_connections: Option<u64>,
    pub outlier_detection: Option<RawOutlierDetection>,
    pub health_check: Option<RawHealthCheck>,
    pub dns: Option<RawDnsDiscovery>,
    pub kubernetes: Option<RawKubernetesDiscovery>,
    pub max_requests: Option<u64>,
    pub max_connections: Option<u64>,
    pub max_pending_requests: Option<u64>,
    pub retry_on_status: Option<Vec<u64>>,
    pub max_retries: Option<u64>,
    pub tls: Option<RawUpstreamTls>,
    pub http2: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUpstreamTls {
    pub ca_file: Option<String>,
    pub server_name: Option<String>,
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDnsDiscovery {
    pub name: Option<String>,
    pub port: Option<u64>,
    pub refresh_interval: Option<Scalar>,
    pub nameserver: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawKubernetesDiscovery {
    pub service: Option<String>,
    pub namespace: Option<String>,
    /// A port name (`http`) or number.
    pub port: Option<Scalar>,
    pub api_server: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHealthCheck {
    pub path: Option<String>,
    pub interval: Option<Scalar>,
    pub timeout: Option<Scalar>,
    pub healthy_threshold: Option<u64>,
    pub unhealthy_threshold: Option<u64>,
}

/// `"host:port"`, or `{ address: "host:port", weight: 3 }`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum RawEndpoint {
    Plain(String),
    Weighted(RawWeightedEndpoint),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawWeightedEndpoint {
    pub address: String,
    pub weight: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOutlierDetection {
    pub consecutive_failures: Option<u64>,
    pub base_ejection_time: Option<Scalar>,
    pub max_ejection_percent: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCache {
    pub cache_size: Option<Scalar>,
    pub coalesce_timeout: Option<Scalar>,
    pub max_coalesced_waiters: Option<u64>,
    pub targeted_cache_control: Option<String>,
    pub max_variants: Option<u64>,
    pub cache_status_key: Option<bool>,
    pub heuristic_errors: Option<bool>,
    pub preallocate: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawResourceType {
    pub name: Option<String>,
    pub r#match: Option<RawResourceMatch>,
    pub config: Option<RawResourceConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawResourceMatch {
    pub path_prefix: Option<StrList>,
    pub path_suffix: Option<StrList>,
    pub path_regex: Option<String>,
    pub content_type: Option<StrList>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawResourceConfig {
    pub ttl: Option<Scalar>,
    pub override_origin_ttl: Option<bool>,
    pub cache_size: Option<Scalar>,
    pub max_object_size: Option<Scalar>,
    pub heuristic_freshness: Option<bool>,
    pub grace: Option<Scalar>,
    pub stale_if_error: Option<Scalar>,
    pub stale_if_unreachable: Option<Scalar>,
    pub keep: Option<Scalar>,
    pub set_cookie: Option<String>,
    pub cache_key: Option<RawCacheKey>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCacheKey {
    pub query: Option<String>,
    pub headers: Option<StrList>,
}

/// A duration or size: YAML gives `300s` as a string but `300` as a number, and both are
/// meant. Interpreting it is left to `build` so that unit errors are collected.
#[derive(Debug, Clone)]
pub(crate) enum Scalar {
    Str(String),
    Int(i128),
    Float(f64),
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string like \"300s\" or \"64MiB\", or a number")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar::Str(v.to_owned()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar::Int(v.into()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar::Int(v.into()))
            }
            fn visit_i128<E: de::Error>(self, v: i128) -> Result<Scalar, E> {
                Ok(Scalar::Int(v))
            }
            fn visit_u128<E: de::Error>(self, v: u128) -> Result<Scalar, E> {
                Ok(Scalar::Int(i128::try_from(v).unwrap_or(i128::MAX)))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar::Float(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// One string or a list of them; `path_suffix: .css` and `path_suffix: [.css, .js]` both work.
#[derive(Debug, Clone, Default)]
pub(crate) struct StrList {
    pub items: Vec<String>,
    /// Whether the YAML had a list, which decides whether key paths get an `[i]`.
    pub was_list: bool,
}

impl<'de> Deserialize<'de> for StrList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StrList;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<StrList, E> {
                Ok(StrList {
                    items: vec![v.to_owned()],
                    was_list: false,
                })
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<StrList, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<String>()? {
                    items.push(item);
                }
                Ok(StrList {
                    items,
                    was_list: true,
                })
            }
        }
        d.deserialize_any(V)
    }
}

#![forbid(unsafe_code)]
//! Observable events. Each event type carries everything known about one thing that happened and
//! turns itself into both the access-log line and the metric updates, so logs and metrics always
//! agree on names and values.

pub mod access_log;
pub mod elasticsearch;
pub mod metrics;
pub mod otel;
mod sharded;

pub use access_log::{AccessLog, AccessLogOptions, LogTarget};
pub use elasticsearch::EsSinkConfig;
pub use metrics::{CacheSnapshot, Metrics, StoreGauge, UpstreamConnectionMetrics};
pub use otel::{ChildSpan, RequestSpan, Tracing, TracingConfig};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// One request through the proxy, from first byte in to response head out (body bytes counted
/// as streamed up to when the event is emitted).
#[derive(Debug, Clone)]
pub struct RequestEvent {
    pub start: SystemTime,
    pub duration: Duration,
    pub request_id: String,
    pub trace_id: Option<String>,
    pub client: Option<SocketAddr>,
    /// Cheap to move: the standard methods are not allocated.
    pub method: http::Method,
    pub http_version: &'static str,
    pub host: String,
    pub path: String,
    pub query: Option<String>,
    pub user_agent: Option<String>,
    pub status: u16,
    pub response_body_bytes: Option<u64>,
    pub route: Option<Arc<str>>,
    pub cluster: Option<Arc<str>>,
    pub upstream_address: Option<std::sync::Arc<str>>,
    pub upstream_duration: Option<Duration>,
    pub cache_result: &'static str,
    pub cache_reason: Option<&'static str>,
    pub resource_type: Option<Arc<str>>,
    /// Why a stale response was served: `stale-while-revalidate` or `stale-if-error`.
    pub stale_reason: Option<&'static str>,
    /// Outcome of revalidating a stale stored response: `not_modified`, `modified`, `failed`.
    pub revalidation: Option<&'static str>,
}

impl RequestEvent {
    pub fn emit(&self, metrics: &Metrics, log: Option<&AccessLog>) {
        metrics.record_request(self);
        if let Some(log) = log {
            log.write(self);
        }
    }
}

/// Classifies upstream failures once; the same name is the metric label and the log field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UpstreamErrorKind {
    /// No connection could be established.
    Connect,
    /// The upstream did not answer within the configured time.
    Timeout,
    /// The connection failed or the response was malformed after connecting.
    Protocol,
    /// No endpoint is available in the cluster.
    NoEndpoint,
    /// A circuit breaker of the cluster refused the request (max_requests or
    /// max_pending_requests reached, or no connection free in time under max_connections).
    Overflow,
}

impl UpstreamErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamErrorKind::Connect => "connect",
            UpstreamErrorKind::Timeout => "timeout",
            UpstreamErrorKind::Protocol => "protocol",
            UpstreamErrorKind::NoEndpoint => "no_endpoint",
            UpstreamErrorKind::Overflow => "overflow",
        }
    }
}

/// A cluster's circuit breakers: each limits one kind of load on an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Breaker {
    /// Requests waiting for response headers.
    MaxRequests = 0,
    /// Connections open to the cluster.
    MaxConnections = 1,
    /// Requests waiting for a connection.
    MaxPendingRequests = 2,
}

impl Breaker {
    pub const ALL: [Breaker; 3] = [
        Breaker::MaxRequests,
        Breaker::MaxConnections,
        Breaker::MaxPendingRequests,
    ];

    /// The config key that sets the limit, also the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Breaker::MaxRequests => "max_requests",
            Breaker::MaxConnections => "max_connections",
            Breaker::MaxPendingRequests => "max_pending_requests",
        }
    }
}

/// An upstream exchange finished (successfully or not).
#[derive(Debug, Clone)]
pub struct UpstreamEvent<'a> {
    pub cluster: &'a Arc<str>,
    pub duration: Duration,
    pub error: Option<UpstreamErrorKind>,
    /// Sends after the first (connect failures, closed pooled connections).
    pub retries: u32,
}

impl UpstreamEvent<'_> {
    pub fn emit(&self, metrics: &Metrics) {
        metrics.record_upstream(self);
        if let Some(kind) = self.error {
            tracing::debug!(
                cluster = %self.cluster,
                error = kind.as_str(),
                "upstream error"
            );
        }
    }
}

/// A purge was applied.
#[derive(Debug, Clone)]
pub struct PurgeEvent<'a> {
    /// Idempotency id, the same on every replica the purge reaches.
    pub id: &'a str,
    /// `admin`, `purge_method`, `peer` or `redis`.
    pub source: &'static str,
    /// Who asked: the client's address, or the relaying replica's instance id.
    pub who: &'a str,
    pub soft: bool,
    /// `ok`, `partial` (some peer did not confirm), `unauthorized`, `rate_limited`, `invalid`.
    pub result: &'static str,
    pub targets: &'a [PurgeTargetResult],
    /// Peers relayed to, and how many confirmed.
    pub peers: usize,
    pub peers_confirmed: usize,
}

/// One selector of a purge and how many stored responses it applied to here.
#[derive(Debug, Clone)]
pub struct PurgeTargetResult {
    /// `url`, `prefix` or `tag`.
    pub kind: &'static str,
    pub target: String,
    pub applied: usize,
}

impl PurgeEvent<'_> {
    /// Counts it, and writes the audit line: one per purge request, accepted or not.
    pub fn emit(&self, metrics: &Metrics) {
        metrics.record_purge(self);
        let applied: usize = self.targets.iter().map(|t| t.applied).sum();
        let targets = self
            .targets
            .iter()
            .map(|t| format!("{}={}", t.kind, t.target))
            .collect::<Vec<_>>()
            .join(" ");
        tracing::info!(
            target: "larder::audit",
            purge_id = self.id,
            source = self.source,
            who = self.who,
            soft = self.soft,
            result = self.result,
            targets = %targets,
            applied,
            peers = self.peers,
            peers_confirmed = self.peers_confirmed,
            "purge"
        );
    }
}

/// One relay of a purge to one peer, finished (confirmed or given up).
pub struct FanoutEvent<'a> {
    pub purge_id: &'a str,
    pub peer: &'a str,
    pub attempts: u32,
    pub duration: std::time::Duration,
    pub error: Option<&'a str>,
}

impl FanoutEvent<'_> {
    pub fn emit(&self, metrics: &Metrics) {
        metrics.record_fanout(self);
        match self.error {
            None => tracing::debug!(
                target: "larder::audit",
                purge_id = self.purge_id,
                peer = self.peer,
                attempts = self.attempts,
                "purge relayed"
            ),
            Some(error) => tracing::warn!(
                target: "larder::audit",
                purge_id = self.purge_id,
                peer = self.peer,
                attempts = self.attempts,
                error,
                "purge not confirmed by peer"
            ),
        }
    }
}

/// A new random request id (128 bits, hex), used when the client sent none.
pub fn new_request_id() -> String {
    let mut id = [0u8; 32];
    id[..16].copy_from_slice(&hex_digits(fastrand::u64(..)));
    id[16..].copy_from_slice(&hex_digits(fastrand::u64(..)));
    String::from_utf8(id.to_vec()).expect("hex digits are ASCII")
}

/// `x` as 16 lower-case hex digits, all at once in a 128-bit word (a digit at a time was most
/// of the cost of a request id, itself 2% of a cache hit's instructions).
fn hex_digits(x: u64) -> [u8; 16] {
    const fn repeat(byte_pattern: u128, width: u32) -> u128 {
        let mut v = 0;
        let mut shift = 0;
        while shift < 128 {
            v |= byte_pattern << shift;
            shift += width;
        }
        v
    }
    // Spread the nibbles one to a byte, the most significant first.
    let mut v = u128::from(x);
    v = ((v & 0xffff_ffff_0000_0000) << 32) | (v & 0xffff_ffff);
    v = ((v & repeat(0xffff_0000, 64)) << 16) | (v & repeat(0xffff, 64));
    v = ((v & repeat(0xff00, 32)) << 8) | (v & repeat(0xff, 32));
    v = ((v & repeat(0xf0, 16)) << 4) | (v & repeat(0xf, 16));
    // 0..=9 become '0'..='9'; 10..=15 (those that carry out of their nibble when 6 is added)
    // get 39 more, to land on 'a'..='f'.
    let letters = ((v + repeat(0x06, 8)) >> 4) & repeat(0x01, 8);
    (v + repeat(0x30, 8) + letters * 0x27).to_be_bytes()
}

/// The trace id of a W3C `traceparent` header, if well formed.
pub fn trace_id_from_traceparent(value: &str) -> Option<String> {
    let mut parts = value.trim().split('-');
    let version = parts.next()?;
    let trace_id = parts.next()?;
    let span_id = parts.next()?;
    let _flags = parts.next()?;
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    };
    (hex(version, 2)
        && version != "ff"
        && hex(trace_id, 32)
        && hex(span_id, 16)
        && trace_id.bytes().any(|b| b != b'0'))
    .then(|| trace_id.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_32_hex_digits() {
        let id = new_request_id();
        assert_eq!(id.len(), 32);
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert_ne!(id, new_request_id());
        for x in [
            0,
            1,
            9,
            10,
            15,
            0x0123_4567_89ab_cdef,
            u64::MAX,
            fastrand::u64(..),
        ] {
            assert_eq!(
                std::str::from_utf8(&hex_digits(x)).unwrap(),
                format!("{x:016x}")
            );
        }
    }

    #[test]
    fn traceparent_parsing() {
        assert_eq!(
            trace_id_from_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
                .as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert!(
            trace_id_from_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01")
                .is_none()
        );
        assert!(trace_id_from_traceparent("garbage").is_none());
    }
}

//! The access log: one JSON object per line with Elastic Common Schema field names, so Filebeat
//! or Fluent Bit can ship it to Elasticsearch unchanged. Lines are handed to a writer thread
//! through a bounded queue: a slow disk or pipe drops log lines (counted), never slows requests.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};

use std::fmt::Write as _;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::RequestEvent;

const QUEUE_LINES: usize = 16 * 1024;
const ECS_VERSION: &str = "8.11.0";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogTarget {
    Stdout,
    Stderr,
    File(PathBuf),
}

/// Which requests are logged, and which optional field groups their lines carry.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessLogOptions {
    /// Fraction of requests logged, 0 to 1. Responses with status 500 and above are always
    /// logged: errors are what operators look for.
    pub sample_rate: f64,
    /// `client` (client and source address), `user_agent`, `url.query`, `trace`,
    /// `larder.upstream`: left out of every line (privacy, volume).
    pub exclude: Vec<String>,
}

impl Default for AccessLogOptions {
    fn default() -> Self {
        AccessLogOptions {
            sample_rate: 1.0,
            exclude: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Excluded {
    client: bool,
    user_agent: bool,
    query: bool,
    trace: bool,
    upstream: bool,
}

impl Excluded {
    fn from_names(names: &[String]) -> Excluded {
        let has = |n: &str| names.iter().any(|x| x == n);
        Excluded {
            client: has("client"),
            user_agent: has("user_agent"),
            query: has("url.query"),
            trace: has("trace"),
            upstream: has("larder.upstream"),
        }
    }
}

#[derive(Debug)]
pub struct AccessLog {
    queue: SyncSender<String>,
    dropped: Arc<AtomicU64>,
    sample_rate: f64,
    excluded: Excluded,
    counters: Option<crate::metrics::AccessLogCounters>,
    elasticsearch: Option<crate::elasticsearch::EsSink>,
}

impl AccessLog {
    pub fn open(target: &LogTarget) -> std::io::Result<AccessLog> {
        Self::open_with(target, &AccessLogOptions::default(), None, None)
    }

    /// Opens the log with sampling and field options, counting lines in `metrics`.
    pub fn open_with(
        target: &LogTarget,
        options: &AccessLogOptions,
        metrics: Option<&crate::Metrics>,
        elasticsearch: Option<crate::EsSinkConfig>,
    ) -> std::io::Result<AccessLog> {
        let mut out: Box<dyn Write + Send> = match target {
            LogTarget::Stdout => Box::new(std::io::stdout()),
            LogTarget::Stderr => Box::new(std::io::stderr()),
            LogTarget::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
        };
        let (queue, lines) = sync_channel::<String>(QUEUE_LINES);
        std::thread::Builder::new()
            .name("larder-access-log".into())
            .spawn(move || {
                while let Ok(line) = lines.recv() {
                    let _ = out.write_all(line.as_bytes());
                    // Flush when the queue is drained, so lines appear promptly at low
                    // rates and are batched at high ones.
                    let mut pending = true;
                    while let Ok(line) = lines.try_recv() {
                        let _ = out.write_all(line.as_bytes());
                        pending = true;
                    }
                    if pending {
                        let _ = out.flush();
                    }
                }
            })?;
        Ok(AccessLog {
            queue,
            dropped: Arc::default(),
            sample_rate: options.sample_rate.clamp(0.0, 1.0),
            excluded: Excluded::from_names(&options.exclude),
            counters: metrics.map(crate::Metrics::access_log_counters),
            elasticsearch: elasticsearch.map(|config| {
                let counters = match metrics {
                    Some(m) => m.es_counters(),
                    None => crate::Metrics::new("").es_counters(),
                };
                crate::elasticsearch::EsSink::start(config, counters)
            }),
        })
    }

    pub fn write(&self, event: &RequestEvent) {
        if event.status < 500 && self.sample_rate < 1.0 && fastrand::f64() >= self.sample_rate {
            if let Some(c) = &self.counters {
                c.sampled_out.inc();
            }
            return;
        }
        let mut line = String::with_capacity(512);
        write_ecs_line(event, &mut line, self.excluded);
        if let Some(es) = &self.elasticsearch {
            es.send(line.clone());
        }
        line.push('\n');
        // Never waits: a full queue (a slow disk or pipe) loses lines, counted, not requests.
        match self.queue.try_send(line) {
            Ok(()) => {
                if let Some(c) = &self.counters {
                    c.written.inc();
                }
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                if let Some(c) = &self.counters {
                    c.dropped.inc();
                }
            }
        }
    }

    /// Sends what the Elasticsearch sink still holds, waiting at most `deadline` (shutdown).
    pub async fn close(&self, deadline: std::time::Duration) {
        if let Some(es) = &self.elasticsearch {
            es.flush_and_stop(deadline).await;
        }
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// `example.com:8080` → (`example.com`, 8080); `[::1]:80` → (`::1`, 80).
fn split_host_port(host: &str) -> (&str, Option<u16>) {
    if let Some(rest) = host.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((ip, port)) => (ip, port.strip_prefix(':').and_then(|p| p.parse().ok())),
            None => (host, None),
        };
    }
    match host.split_once(':') {
        Some((domain, port)) if !port.contains(':') => (domain, port.parse().ok()),
        _ => (host, None),
    }
}

/// Appends `s` as a JSON string literal.
fn json_str(out: &mut String, s: &str) {
    out.push('"');
    // Almost every value needs no escaping: copy it whole.
    if !s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
        out.push_str(s);
        out.push('"');
        return;
    }
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// The ECS document for one request, as one JSON line. Written by hand rather than through a
/// JSON value tree: this runs for every request, and the tree's allocations dominated it.
pub fn ecs_line(e: &RequestEvent) -> String {
    let mut out = String::with_capacity(512);
    write_ecs_line(e, &mut out, Excluded::default());
    out
}

fn write_ecs_line(e: &RequestEvent, out: &mut String, excluded: Excluded) {
    let timestamp = OffsetDateTime::from(e.start)
        .format(&Rfc3339)
        .unwrap_or_default();
    out.push_str("{\"@timestamp\":");
    json_str(out, &timestamp);
    let _ = write!(
        out,
        ",\"ecs\":{{\"version\":\"{ECS_VERSION}\"}},\"event\":{{\"kind\":\"event\",\"category\":[\"web\"],\"dataset\":\"larder.access\",\"duration\":{},\"outcome\":\"{}\"}}",
        e.duration.as_nanos() as u64,
        if e.status < 400 { "success" } else { "failure" }
    );
    out.push_str(",\"http\":{\"version\":");
    json_str(out, e.http_version);
    out.push_str(",\"request\":{\"method\":");
    json_str(out, e.method.as_str());
    out.push_str(",\"id\":");
    json_str(out, &e.request_id);
    let _ = write!(out, "}},\"response\":{{\"status_code\":{}", e.status);
    if let Some(bytes) = e.response_body_bytes {
        let _ = write!(out, ",\"body\":{{\"bytes\":{bytes}}}");
    }
    out.push_str("}}");

    // ECS keeps the port apart from the domain.
    let (domain, port) = split_host_port(&e.host);
    out.push_str(",\"url\":{\"path\":");
    json_str(out, &e.path);
    out.push_str(",\"domain\":");
    json_str(out, domain);
    if let Some(port) = port {
        let _ = write!(out, ",\"port\":{port}");
    }
    if let Some(q) = e.query.as_ref().filter(|_| !excluded.query) {
        out.push_str(",\"query\":");
        json_str(out, q);
        out.push_str(",\"original\":");
        json_str(out, &format!("{}?{}", e.path, q));
    } else {
        out.push_str(",\"original\":");
        json_str(out, &e.path);
    }
    out.push('}');

    if let Some(client) = e.client.filter(|_| !excluded.client) {
        let ip = client.ip().to_string();
        for field in ["client", "source"] {
            let _ = write!(
                out,
                ",\"{field}\":{{\"ip\":\"{ip}\",\"port\":{}}}",
                client.port()
            );
        }
    }
    if let Some(ua) = e.user_agent.as_ref().filter(|_| !excluded.user_agent) {
        out.push_str(",\"user_agent\":{\"original\":");
        json_str(out, ua);
        out.push('}');
    }
    if let Some(trace_id) = e.trace_id.as_ref().filter(|_| !excluded.trace) {
        out.push_str(",\"trace\":{\"id\":");
        json_str(out, trace_id);
        out.push('}');
    }
    out.push_str(",\"larder\":{\"cache\":{\"status\":");
    json_str(out, e.cache_result);
    if let Some(reason) = e.cache_reason {
        out.push_str(",\"reason\":");
        json_str(out, reason);
    }
    if let Some(rt) = &e.resource_type {
        out.push_str(",\"resource_type\":");
        json_str(out, rt);
    }
    if let Some(stale) = e.stale_reason {
        out.push_str(",\"stale\":");
        json_str(out, stale);
    }
    if let Some(outcome) = e.revalidation {
        out.push_str(",\"revalidation\":");
        json_str(out, outcome);
    }
    out.push('}');
    if let Some(route) = &e.route {
        out.push_str(",\"route\":");
        json_str(out, route);
    }
    if let Some(cluster) = &e.cluster {
        out.push_str(",\"cluster\":");
        json_str(out, cluster);
    }
    if !excluded.upstream && (e.upstream_address.is_some() || e.upstream_duration.is_some()) {
        out.push_str(",\"upstream\":{");
        let mut first = true;
        if let Some(addr) = &e.upstream_address {
            out.push_str("\"address\":");
            json_str(out, addr);
            first = false;
        }
        if let Some(d) = e.upstream_duration {
            if !first {
                out.push(',');
            }
            let _ = write!(out, "\"duration\":{}", d.as_nanos() as u64);
        }
        out.push('}');
    }
    out.push_str("}}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    #[test]
    fn ecs_fields() {
        let e = RequestEvent {
            start: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            duration: Duration::from_micros(1500),
            request_id: "abc".into(),
            trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
            client: Some("127.0.0.1:5555".parse().unwrap()),
            method: http::Method::GET,
            http_version: "1.1",
            host: "example.com".into(),
            path: "/a".into(),
            query: Some("x=1".into()),
            user_agent: Some("curl/8".into()),
            status: 200,
            response_body_bytes: Some(5),
            route: Some("all".into()),
            cluster: Some("origin".into()),
            upstream_address: Some("127.0.0.1:9000".into()),
            upstream_duration: Some(Duration::from_millis(1)),
            cache_result: "miss",
            cache_reason: None,
            stale_reason: None,
            revalidation: Some("modified"),
            resource_type: Some("default".into()),
        };
        let line = ecs_line(&e);
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|err| panic!("{err}: {line}"));
        assert_eq!(v["@timestamp"], "2023-11-14T22:13:20Z");
        assert_eq!(v["http"]["request"]["method"], "GET");
        assert_eq!(v["http"]["response"]["status_code"], 200);
        assert_eq!(v["url"]["original"], "/a?x=1");
        assert_eq!(v["event"]["duration"], 1_500_000);
        assert_eq!(v["trace"]["id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(v["larder"]["cache"]["status"], "miss");
        assert_eq!(v["larder"]["cache"]["revalidation"], "modified");
        assert!(v["larder"]["cache"].get("stale").is_none());
        assert_eq!(v["larder"]["upstream"]["address"], "127.0.0.1:9000");
        assert_eq!(v["client"]["ip"], "127.0.0.1");
        assert_eq!(v["url"]["domain"], "example.com");
        assert_eq!(v["source"]["port"], 5555);
        let mut odd = e.clone();
        odd.path = "/q\"uote\\back\u{1}".into();
        odd.query = None;
        odd.client = None;
        odd.upstream_address = None;
        let v: serde_json::Value = serde_json::from_str(&ecs_line(&odd)).unwrap();
        assert_eq!(v["url"]["path"], "/q\"uote\\back\u{1}");
        assert_eq!(v["larder"]["upstream"]["duration"], 1_000_000);
        assert_eq!(
            split_host_port("example.com:8080"),
            ("example.com", Some(8080))
        );
        assert_eq!(split_host_port("[::1]:80"), ("::1", Some(80)));
    }
}

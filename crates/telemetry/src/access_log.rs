//! The access log: one JSON object per line with Elastic Common Schema field names, so Filebeat
//! or Fluent Bit can ship it to Elasticsearch unchanged. Lines are handed to a writer thread
//! through a bounded queue: a slow disk or pipe drops log lines (counted), never slows requests.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};

use serde_json::{Map, Value, json};
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

#[derive(Debug)]
pub struct AccessLog {
    queue: SyncSender<String>,
    dropped: Arc<AtomicU64>,
}

impl AccessLog {
    pub fn open(target: &LogTarget) -> std::io::Result<AccessLog> {
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
        })
    }

    pub fn write(&self, event: &RequestEvent) {
        let mut line = ecs_line(event).to_string();
        line.push('\n');
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.queue.try_send(line)
        {
            self.dropped.fetch_add(1, Ordering::Relaxed);
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

/// The ECS document for one request.
pub fn ecs_line(e: &RequestEvent) -> Value {
    let timestamp = OffsetDateTime::from(e.start)
        .format(&Rfc3339)
        .unwrap_or_default();
    let mut url = Map::new();
    url.insert("path".into(), json!(e.path));
    // ECS keeps the port apart from the domain.
    let (domain, port) = split_host_port(&e.host);
    url.insert("domain".into(), json!(domain));
    if let Some(port) = port {
        url.insert("port".into(), json!(port));
    }
    let original = match &e.query {
        Some(q) => {
            url.insert("query".into(), json!(q));
            format!("{}?{}", e.path, q)
        }
        None => e.path.clone(),
    };
    url.insert("original".into(), json!(original));

    let mut doc = json!({
        "@timestamp": timestamp,
        "ecs": { "version": ECS_VERSION },
        "event": {
            "kind": "event",
            "category": ["web"],
            "dataset": "larder.access",
            "duration": e.duration.as_nanos() as u64,
            "outcome": if e.status < 400 { "success" } else { "failure" },
        },
        "http": {
            "version": e.http_version,
            "request": { "method": e.method, "id": e.request_id },
            "response": { "status_code": e.status },
        },
        "url": url,
        "larder": {
            "cache": {
                "status": e.cache_result,
            },
        },
    });
    let obj = doc.as_object_mut().expect("object literal");
    if let Some(bytes) = e.response_body_bytes {
        obj["http"]["response"]["body"] = json!({ "bytes": bytes });
    }
    if let Some(client) = e.client {
        obj.insert(
            "client".into(),
            json!({ "ip": client.ip().to_string(), "port": client.port() }),
        );
        obj.insert(
            "source".into(),
            json!({ "ip": client.ip().to_string(), "port": client.port() }),
        );
    }
    if let Some(ua) = &e.user_agent {
        obj.insert("user_agent".into(), json!({ "original": ua }));
    }
    if let Some(trace_id) = &e.trace_id {
        obj.insert("trace".into(), json!({ "id": trace_id }));
    }
    let larder = obj["larder"].as_object_mut().expect("object literal");
    if let Some(reason) = e.cache_reason {
        larder["cache"]["reason"] = json!(reason);
    }
    if let Some(rt) = &e.resource_type {
        larder["cache"]["resource_type"] = json!(rt);
    }
    if let Some(route) = &e.route {
        larder.insert("route".into(), json!(route));
    }
    if let Some(cluster) = &e.cluster {
        larder.insert("cluster".into(), json!(cluster));
    }
    if e.upstream_address.is_some() || e.upstream_duration.is_some() {
        let mut up = Map::new();
        if let Some(addr) = &e.upstream_address {
            up.insert("address".into(), json!(addr));
        }
        if let Some(d) = e.upstream_duration {
            up.insert("duration".into(), json!(d.as_nanos() as u64));
        }
        larder.insert("upstream".into(), Value::Object(up));
    }
    doc
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
            method: "GET".into(),
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
            resource_type: Some("default".into()),
        };
        let v = ecs_line(&e);
        assert_eq!(v["@timestamp"], "2023-11-14T22:13:20Z");
        assert_eq!(v["http"]["request"]["method"], "GET");
        assert_eq!(v["http"]["response"]["status_code"], 200);
        assert_eq!(v["url"]["original"], "/a?x=1");
        assert_eq!(v["event"]["duration"], 1_500_000);
        assert_eq!(v["trace"]["id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(v["larder"]["cache"]["status"], "miss");
        assert_eq!(v["larder"]["upstream"]["address"], "127.0.0.1:9000");
        assert_eq!(v["client"]["ip"], "127.0.0.1");
        assert_eq!(v["url"]["domain"], "example.com");
        assert_eq!(
            split_host_port("example.com:8080"),
            ("example.com", Some(8080))
        );
        assert_eq!(split_host_port("[::1]:80"), ("::1", Some(80)));
    }
}

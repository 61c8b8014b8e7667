//! The access log's Elasticsearch sink against an in-process server that checks the `_bulk`
//! protocol strictly: NDJSON framing, action lines, gzip, authentication, and partial-failure
//! answers (Elasticsearch itself cannot be installed on this machine).

mod common;

use std::io::Read;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// One `_bulk` request as received, already checked.
#[derive(Debug, Clone)]
struct Bulk {
    /// `url.path` of each document, in order.
    paths: Vec<String>,
    /// The HTTP status the server answered with.
    status: u16,
}

#[derive(Default)]
struct Recorded {
    requests: Vec<Bulk>,
    /// Protocol violations seen (a strict server would answer 400).
    violations: Vec<String>,
    later_refused: bool,
}

/// Answers like Elasticsearch: the first request with 429 (whole batch), then per document:
/// `/reject` fails for good (400, a mapping error), `/later` fails once with 429, the rest
/// are created.
async fn bulk_server(expected_auth: &'static str) -> (SocketAddr, Arc<Mutex<Recorded>>) {
    let recorded: Arc<Mutex<Recorded>> = Arc::default();
    let shared = recorded.clone();
    let server = Origin::start(move |seen| {
        let (status, body) = answer(&seen, expected_auth, &shared);
        async move { response(status, &[("content-type", "application/json")], body) }
    })
    .await;
    (server.addr, recorded)
}

fn answer(seen: &Seen, expected_auth: &str, recorded: &Mutex<Recorded>) -> (u16, String) {
    let raw = &seen.body;
    let mut violations = Vec::new();
    let header = |name: &str| seen.header(name);
    if seen.method != http::Method::POST || seen.uri.path() != "/_bulk" {
        violations.push(format!("{} {}", seen.method, seen.uri));
    }
    if header("content-type") != "application/x-ndjson" {
        violations.push(format!("content-type {}", header("content-type")));
    }
    if header("authorization") != expected_auth {
        violations.push(format!("authorization {:?}", header("authorization")));
    }
    let text = if header("content-encoding") == "gzip" {
        let mut text = String::new();
        if flate2::read::GzDecoder::new(&raw[..])
            .read_to_string(&mut text)
            .is_err()
        {
            violations.push("content-encoding gzip but not gzip".into());
        }
        text
    } else {
        violations.push("not gzipped".into());
        String::from_utf8_lossy(raw).into_owned()
    };
    if !text.ends_with('\n') {
        violations.push("NDJSON body must end with a newline".into());
    }
    let lines: Vec<&str> = text.lines().collect();
    if !lines.len().is_multiple_of(2) {
        violations.push(format!(
            "{} lines: actions and documents must pair",
            lines.len()
        ));
    }
    let mut paths = Vec::new();
    for pair in lines.chunks(2) {
        let action: serde_json::Value = serde_json::from_str(pair[0]).unwrap_or_default();
        if action["create"]["_index"] != "logs-larder.access-default" {
            violations.push(format!("bad action line {}", pair[0]));
        }
        let document: serde_json::Value =
            serde_json::from_str(pair.get(1).copied().unwrap_or("")).unwrap_or_default();
        if !document["@timestamp"].is_string() {
            violations.push("document without @timestamp".into());
        }
        paths.push(document["url"]["path"].as_str().unwrap_or("").to_owned());
    }
    let mut recorded = recorded.lock().unwrap();
    if !violations.is_empty() {
        recorded.violations.extend(violations);
        recorded.requests.push(Bulk { paths, status: 400 });
        return (400, r#"{"error":"bad request"}"#.into());
    }
    if recorded.requests.is_empty() {
        recorded.requests.push(Bulk { paths, status: 429 });
        return (429, r#"{"error":"es_rejected_execution_exception"}"#.into());
    }
    let mut errors = false;
    let items: Vec<String> = paths
        .iter()
        .map(|path| {
            let status = match path.as_str() {
                "/reject" => 400,
                "/later" if !recorded.later_refused => {
                    recorded.later_refused = true;
                    429
                }
                _ => 201,
            };
            errors |= status != 201;
            format!(r#"{{"create":{{"_index":"logs-larder.access-default","status":{status}}}}}"#)
        })
        .collect();
    recorded.requests.push(Bulk { paths, status: 200 });
    (
        200,
        format!(
            r#"{{"took":3,"errors":{errors},"items":[{}]}}"#,
            items.join(",")
        ),
    )
}

fn es_yaml(origin: SocketAddr, es: SocketAddr, key_file: &std::path::Path, extra: &str) -> String {
    config_yaml(origin, DEFAULT_TYPES).replace(
        "access_log: { enabled: false }",
        &format!(
            "access_log:\n  output: /dev/null\n  elasticsearch:\n    url: http://{es}\n    api_key_file: {:?}\n{extra}",
            key_file.display().to_string()
        ),
    )
}

fn key_file(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("larder-es-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, "dGVzdC1rZXk=\n").unwrap();
    path
}

#[tokio::test]
async fn bulk_batches_are_retried_per_document_and_rejections_are_final() {
    let (es, recorded) = bulk_server("ApiKey dGVzdC1rZXk=").await;
    let origin = Origin::fixed(200, &[], "x").await;
    let extra = "    flush_interval: 50ms\n    max_retries: 3\n";
    let larder = Larder::start(&es_yaml(origin.addr, es, &key_file("a"), extra)).await;
    for path in ["/a", "/reject", "/later"] {
        larder.get(path).await;
    }
    let indexed = r#"larder_access_log_es_documents_total{result="indexed"}"#;
    let rejected = r#"larder_access_log_es_documents_total{result="rejected"}"#;
    // The sink works in the background; its counters say when it is done.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let metrics = larder.metrics().await;
        if metric(&metrics, indexed) == Some(2.0) && metric(&metrics, rejected) == Some(1.0) {
            assert!(
                metric(
                    &metrics,
                    r#"larder_access_log_es_documents_total{result="retried"}"#
                )
                .unwrap()
                    >= 2.0
            );
            assert_eq!(
                metric(
                    &metrics,
                    r#"larder_access_log_es_documents_total{result="dropped"}"#
                ),
                Some(0.0)
            );
            break;
        }
        assert!(Instant::now() < deadline, "sink did not finish:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let recorded = recorded.lock().unwrap();
    assert!(recorded.violations.is_empty(), "{:?}", recorded.violations);
    assert_eq!(
        recorded.requests[0].status, 429,
        "the first batch was refused whole"
    );
    let answered: Vec<&Bulk> = recorded
        .requests
        .iter()
        .filter(|b| b.status == 200)
        .collect();
    let times = |path: &str| {
        answered
            .iter()
            .flat_map(|b| &b.paths)
            .filter(|p| *p == path)
            .count()
    };
    // A 400 is final: the document is never sent again after Elasticsearch looked at it.
    assert_eq!(times("/reject"), 1);
    // A 429 for one document resends that document only.
    assert_eq!(times("/later"), 2);
    assert_eq!(times("/a"), 1);
}

#[tokio::test]
async fn the_sink_flushes_on_shutdown() {
    let (es, recorded) = bulk_server("ApiKey dGVzdC1rZXk=").await;
    let origin = Origin::fixed(200, &[], "x").await;
    // Nothing would be sent for an hour, and no batch fills up: only shutdown sends.
    let extra = "    flush_interval: 1h\n    batch_size: 1000\n";
    let larder = Larder::start(&es_yaml(origin.addr, es, &key_file("b"), extra)).await;
    for i in 0..5 {
        larder.get(&format!("/doc/{i}")).await;
    }
    assert!(recorded.lock().unwrap().requests.is_empty());
    larder.server.shutdown().await;
    let recorded = recorded.lock().unwrap();
    assert!(recorded.violations.is_empty(), "{:?}", recorded.violations);
    let mut sent: Vec<&String> = recorded
        .requests
        .iter()
        .filter(|b| b.status == 200)
        .flat_map(|b| &b.paths)
        .collect();
    sent.sort();
    assert_eq!(sent, ["/doc/0", "/doc/1", "/doc/2", "/doc/3", "/doc/4"]);
}

//! The admin API, metrics and the access log, read the way operators' tools read them.

mod common;

use std::time::Duration;

use common::*;
use http::Method;

#[tokio::test]
async fn admin_token_guards_purge_and_config_dump() {
    let origin = Origin::fixed(200, &[("cache-control", "max-age=60")], "x").await;
    let options = larder::StartOptions {
        admin_token: Some("s3cret-token".into()),
    };
    let larder = Larder::start_with(&config_yaml(origin.addr, DEFAULT_TYPES), options).await;
    larder.get("/p").await;
    let purge = "/purge?hostname=127.0.0.1&path=/p";
    let missing = larder.admin(Method::POST, purge, &[]).await;
    assert_eq!(missing.status, 401);
    assert!(missing.header("www-authenticate").starts_with("Bearer"));
    assert_eq!(
        larder
            .admin(Method::POST, purge, &[("authorization", "Bearer wrong")])
            .await
            .status,
        401
    );
    assert_eq!(
        larder.admin(Method::GET, "/config_dump", &[]).await.status,
        401
    );
    let ok = larder
        .admin(
            Method::POST,
            purge,
            &[("authorization", "Bearer s3cret-token")],
        )
        .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(ok.json()["purged"], 1);
    // Read-only endpoints stay open for probes and scrapers.
    assert_eq!(larder.admin(Method::GET, "/metrics", &[]).await.status, 200);
    assert_eq!(larder.admin(Method::GET, "/ready", &[]).await.status, 200);
    let dump = larder
        .admin(
            Method::GET,
            "/config_dump",
            &[("authorization", "Bearer s3cret-token")],
        )
        .await;
    assert_eq!(dump.status, 200);
    assert!(!dump.text().contains("s3cret-token"));
    assert_eq!(dump.json()["admin_token_configured"], true);
    assert_eq!(dump.json()["clusters"][0]["name"], "origin");
}

#[tokio::test]
async fn health_readiness_and_unknown_endpoints() {
    let origin = Origin::fixed(200, &[], "x").await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    assert_eq!(
        larder.admin(Method::GET, "/healthz", &[]).await.text(),
        "ok\n"
    );
    assert_eq!(larder.admin(Method::GET, "/ready", &[]).await.status, 200);
    larder
        .server
        .ready
        .store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(larder.admin(Method::GET, "/ready", &[]).await.status, 503);
    assert_eq!(larder.admin(Method::GET, "/nope", &[]).await.status, 404);
    assert_eq!(larder.admin(Method::GET, "/purge", &[]).await.status, 405);
}

/// Parses the text exposition strictly enough to catch malformed output: every sample line is
/// `name{labels} value`, every name has a TYPE line, and the document ends with `# EOF`.
fn parse_exposition(text: &str) -> Vec<(String, String, f64)> {
    assert!(text.trim_end().ends_with("# EOF"), "missing # EOF");
    let mut typed = std::collections::HashSet::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            typed.insert(rest.split_whitespace().next().unwrap().to_owned());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line}"));
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n.to_owned(), l.trim_end_matches('}').to_owned()),
            None => (series.to_owned(), String::new()),
        };
        assert!(name.starts_with("larder_"), "{name}");
        let family = ["_total", "_bucket", "_sum", "_count", "_info"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name);
        assert!(
            typed.contains(family) || typed.contains(&name),
            "no TYPE for {name}"
        );
        samples.push((name, labels, value));
    }
    samples
}

#[tokio::test]
async fn metrics_after_traffic_parse_and_add_up() {
    let origin = Origin::fixed(200, &[("cache-control", "max-age=60")], "0123456789").await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    for _ in 0..4 {
        larder.get("/m").await;
    }
    larder
        .request(
            Method::POST,
            &larder.proxy_url("/form"),
            &[],
            bytes::Bytes::new(),
        )
        .await;
    let open_metrics = [("accept", "application/openmetrics-text; version=1.0.0")];
    let reply = larder
        .admin(Method::GET, "/stats/prometheus", &open_metrics)
        .await;
    assert!(
        reply
            .header("content-type")
            .starts_with("application/openmetrics-text")
    );
    let text = reply.text();
    assert_eq!(
        text,
        larder
            .admin(Method::GET, "/metrics", &open_metrics)
            .await
            .text(),
        "both paths serve the same registry"
    );
    // Without the Accept header (curl, promtool): the classic text format, same samples.
    let classic = larder.metrics().await;
    assert!(!classic.contains("# EOF"));
    assert!(classic.contains("# TYPE larder_requests_total counter"));
    let sample_lines = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| {
                // Histogram buckets and durations move between the two scrapes.
                l.split_once(' ').map_or(l, |(series, _)| series).to_owned()
            })
            .collect()
    };
    assert_eq!(sample_lines(&classic), sample_lines(&text));
    let samples = parse_exposition(&text);
    let sum = |name: &str, filter: &str| -> f64 {
        samples
            .iter()
            .filter(|(n, l, _)| n == name && l.contains(filter))
            .map(|(_, _, v)| v)
            .sum()
    };
    assert_eq!(sum("larder_requests_total", "route=\"all/0\""), 5.0);
    assert_eq!(sum("larder_requests_total", "method=\"POST\""), 1.0);
    assert_eq!(sum("larder_cache_lookups_total", "result=\"hit\""), 3.0);
    assert_eq!(sum("larder_cache_lookups_total", "result=\"miss\""), 1.0);
    assert_eq!(
        sum(
            "larder_cache_not_cached_total",
            "reason=\"method_not_cacheable\""
        ),
        1.0
    );
    assert_eq!(
        sum("larder_response_body_bytes_total", "source=\"cache\""),
        30.0
    );
    assert_eq!(sum("larder_request_duration_seconds_count", ""), 5.0);
    assert_eq!(
        sum(
            "larder_upstream_request_duration_seconds_count",
            "cluster=\"origin\""
        ),
        2.0
    );
    assert_eq!(
        sum("larder_cache_objects", "resource_type=\"default\""),
        1.0
    );
    assert!(sum("larder_build_info", "version=") == 1.0);
}

#[tokio::test]
async fn access_log_lines_are_ecs_json() {
    let dir = std::env::temp_dir().join(format!("larder-log-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("access.log");
    let _ = std::fs::remove_file(&path);
    let origin = Origin::fixed(200, &[("cache-control", "max-age=60")], "logged").await;
    let yaml = config_yaml(origin.addr, DEFAULT_TYPES).replace(
        "access_log: { enabled: false }",
        &format!("access_log: {{ output: {:?} }}", path.display().to_string()),
    );
    let larder = Larder::start(&yaml).await;
    larder
        .get_with(
            "/logged?x=1",
            &[
                (
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                ),
                ("user-agent", "test-agent"),
            ],
        )
        .await;
    larder.get("/logged?x=1").await;
    // Lines are written by a background thread; wait (bounded) until both are there.
    let mut lines = Vec::new();
    for _ in 0..100 {
        lines = std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect();
        if lines.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(lines.len(), 2, "{lines:?}");
    let first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert!(first["@timestamp"].as_str().unwrap().ends_with('Z'));
    assert_eq!(first["http"]["request"]["method"], "GET");
    assert_eq!(first["http"]["response"]["status_code"], 200);
    assert_eq!(first["http"]["response"]["body"]["bytes"], 6);
    assert_eq!(first["url"]["path"], "/logged");
    assert_eq!(first["url"]["query"], "x=1");
    assert_eq!(first["url"]["domain"], "127.0.0.1");
    assert_eq!(first["user_agent"]["original"], "test-agent");
    assert_eq!(first["trace"]["id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(first["larder"]["cache"]["status"], "miss");
    assert_eq!(
        first["larder"]["upstream"]["address"],
        origin.addr.to_string()
    );
    assert!(first["event"]["duration"].as_u64().unwrap() > 0);
    assert_eq!(first["http"]["request"]["id"].as_str().unwrap().len(), 32);
    let second: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
    assert_eq!(second["larder"]["cache"]["status"], "hit");
    assert!(second.get("trace").is_none());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn access_log_sampling_keeps_errors_and_field_groups_can_be_left_out() {
    let dir = std::env::temp_dir().join(format!("larder-log-sampled-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("access.log");
    let _ = std::fs::remove_file(&path);
    let origin = Origin::start(|seen| async move {
        let status = if seen.uri.path() == "/boom" { 503 } else { 200 };
        response(status, &[("cache-control", "no-store")], "x")
    })
    .await;
    let groups: Vec<String> = larder_config::AccessLog::OPTIONAL_FIELDS
        .iter()
        .map(|g| format!("{g:?}"))
        .collect();
    let yaml = config_yaml(origin.addr, DEFAULT_TYPES).replace(
        "access_log: { enabled: false }",
        &format!(
            "access_log: {{ output: {:?}, sample_rate: 0, exclude_fields: [{}] }}",
            path.display().to_string(),
            groups.join(", ")
        ),
    );
    let larder = Larder::start(&yaml).await;
    let traced = [
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
        ("user-agent", "test-agent"),
    ];
    for _ in 0..5 {
        larder.get_with("/fine?q=1", &traced).await;
    }
    assert_eq!(larder.get_with("/boom?q=1", &traced).await.status, 503);
    // Nothing signals that the writer thread is done but the counter: the error line is
    // written (counted) once it is queued.
    let metric_name = r#"larder_access_log_lines_total{result="written"}"#;
    for _ in 0..100 {
        if metric(&larder.metrics().await, metric_name) == Some(1.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let metrics = larder.metrics().await;
    assert_eq!(metric(&metrics, metric_name), Some(1.0));
    assert_eq!(
        metric(
            &metrics,
            r#"larder_access_log_lines_total{result="sampled_out"}"#
        ),
        Some(5.0)
    );
    let mut text = String::new();
    for _ in 0..100 {
        text = std::fs::read_to_string(&path).unwrap_or_default();
        if !text.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "only the 5xx is logged at sample_rate 0: {text}"
    );
    let line: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(line["http"]["response"]["status_code"], 503);
    // Every optional group is gone, and only they are.
    for absent in ["client", "source", "user_agent", "trace"] {
        assert!(line.get(absent).is_none(), "{absent} in {line}");
    }
    assert!(line["url"].get("query").is_none());
    assert_eq!(line["url"]["original"], "/boom");
    assert!(line["larder"].get("upstream").is_none(), "{line}");
    assert_eq!(line["url"]["path"], "/boom");
    assert_eq!(line["larder"]["cache"]["status"], "miss");
}

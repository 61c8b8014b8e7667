//! Larder's metrics against the real Prometheus tools: `promtool check metrics` on the
//! exposition after traffic, `promtool` on the shipped alert rules, and a real Prometheus
//! server that scrapes Larder and answers a PromQL query for the hit ratio. The full test script
//! installs Debian's `prometheus` package; without it these tests fail under `CI=true` and say
//! they skipped otherwise.

mod common;

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use http::Method;

fn program(name: &str) -> Option<String> {
    let found = Command::new(name)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if found {
        return Some(name.to_owned());
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{name} is not installed (scripts/test.sh installs Debian's prometheus package)"
    );
    eprintln!("SKIPPED: {name} is not installed; run ./scripts/test.sh");
    None
}

fn repo_file(path: &str) -> String {
    format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))
}

async fn traffic(larder: &Larder) {
    for path in ["/a", "/a", "/a", "/a", "/b"] {
        assert_eq!(larder.get(path).await.status, 200);
    }
}

#[tokio::test]
async fn promtool_accepts_the_exposition_after_traffic() {
    let Some(promtool) = program("promtool") else {
        return;
    };
    let origin = Origin::fixed(200, &[("cache-control", "max-age=60")], "x").await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    traffic(&larder).await;
    larder.admin(Method::POST, "/purge?tag=none", &[]).await;
    let exposition = larder.metrics().await;
    let mut check = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}\n---\n{exposition}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_shipped_alert_rules_pass_promtool() {
    let Some(promtool) = program("promtool") else {
        return;
    };
    for args in [
        vec![
            "check",
            "rules",
            &repo_file("deploy/prometheus/larder-alerts.yaml"),
        ],
        vec![
            "test",
            "rules",
            &repo_file("deploy/prometheus/larder-alerts.test.yaml"),
        ],
    ] {
        let out = Command::new(&promtool).args(&args).output().unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

struct PrometheusServer {
    child: Child,
    dir: std::path::PathBuf,
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn a_real_prometheus_scrapes_larder_and_computes_the_hit_ratio() {
    let Some(prometheus) = program("prometheus") else {
        return;
    };
    let origin = Origin::fixed(200, &[("cache-control", "max-age=60")], "x").await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    // One miss and three hits of /a, one miss of /b: 3 of 5 lookups from the cache. A POST
    // bypasses the cache and does not count.
    traffic(&larder).await;
    larder
        .request(
            Method::POST,
            &larder.proxy_url("/form"),
            &[],
            bytes::Bytes::new(),
        )
        .await;

    let dir = std::env::temp_dir().join(format!("larder-prometheus-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{ scrape_interval: 1s }}\nscrape_configs:\n  - job_name: larder\n    metrics_path: /stats/prometheus\n    static_configs: [{{ targets: [\"{}\"] }}]\n",
            larder.server.admin_addr
        ),
    )
    .unwrap();
    // Prometheus takes its listen address as a flag: find a free port for it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(&prometheus)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _server = PrometheusServer { child, dir };

    let query = "sum(larder_cache_lookups_total{job=\"larder\",result=~\"hit|revalidated|coalesced|stale\"}) / sum(larder_cache_lookups_total{job=\"larder\",result!=\"bypass\"})";
    let url = format!(
        "http://127.0.0.1:{port}/api/v1/query?query={}",
        query
            .bytes()
            .map(|b| if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            })
            .collect::<String>()
    );
    let client = client();
    let deadline = Instant::now() + Duration::from_secs(60);
    let ratio = loop {
        assert!(
            Instant::now() < deadline,
            "Prometheus never answered the query"
        );
        if let Ok(Ok(response)) = tokio::time::timeout(Duration::from_secs(2), async {
            let request = http::Request::get(url.as_str())
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap();
            client.request(request).await
        })
        .await
        {
            use http_body_util::BodyExt;
            let body = response.into_body().collect().await.unwrap().to_bytes();
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            if let Some(value) = json["data"]["result"][0]["value"][1].as_str() {
                break value.parse::<f64>().unwrap();
            }
        }
        // Waiting for an outside process's first scrape: there is no event to await.
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!((ratio - 0.6).abs() < 1e-9, "hit ratio {ratio}");
}

/// Every metric the dashboard and the alert rules query exists in Larder's exposition, so a
/// renamed metric cannot silently blank a panel or disarm an alert.
#[tokio::test]
async fn the_dashboard_and_alerts_only_use_metrics_larder_exposes() {
    let origin = Origin::start(|seen| async move {
        let cache_control = if seen.uri.path() == "/nostore" {
            "no-store"
        } else {
            "max-age=60"
        };
        response(200, &[("cache-control", cache_control)], "x")
    })
    .await;
    // Something listened here once: a dead upstream and a dead purge peer.
    let dead = closed_address();
    let yaml = config_yaml(origin.addr, DEFAULT_TYPES)
        .replace(
            "      - match: { prefix: \"/\" }\n        cluster: origin",
            "      - match: { prefix: \"/dead\" }\n        cluster: dead\n      - match: { prefix: \"/\" }\n        cluster: origin",
        )
        .replace(
            "clusters:\n",
            &format!("clusters:\n  - name: dead\n    endpoints: [\"{dead}\"]\n"),
        )
        + &format!("purge: {{ peers: {{ static: [\"{dead}\"] }}, fanout_timeout: 1s }}\n");
    let larder = Larder::start(&yaml).await;
    // Every kind of event the dashboard and the rules chart: hits and misses, an uncacheable
    // response, an upstream that is down, a purge a peer never confirms.
    traffic(&larder).await;
    larder.get("/nostore").await;
    assert_eq!(larder.get("/dead").await.status, 502);
    larder.admin(Method::POST, "/purge?tag=t", &[]).await;
    let exposition = larder.metrics().await;
    let exposed: std::collections::HashSet<&str> = exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for file in [
        "deploy/grafana/larder-dashboard.json",
        "deploy/prometheus/larder-alerts.yaml",
    ] {
        let text = std::fs::read_to_string(repo_file(file)).unwrap();
        let mut used: Vec<&str> = text
            .match_indices("larder_")
            .map(|(i, _)| {
                let rest = &text[i..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                &rest[..end]
            })
            .collect();
        used.sort_unstable();
        used.dedup();
        assert!(!used.is_empty());
        for name in used {
            // Samples of a family carry suffixes its TYPE line does not.
            let family = ["_total", "_bucket", "_count", "_sum", "_info"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name);
            assert!(
                exposed.contains(family) || exposed.contains(name),
                "{file} uses {name}, which Larder does not expose"
            );
        }
    }
}

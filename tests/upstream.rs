//! Upstream clusters under faults: failing endpoints are ejected and come back, connect
//! failures move idempotent requests elsewhere but never resend a POST, and ring hashing keeps
//! each URL on one endpoint.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::Method;

fn cluster_yaml(endpoints: &[SocketAddr], extra: &str) -> String {
    let list: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    config_yaml_with(
        "      - match: { prefix: \"/\" }\n        cluster: pool\n",
        &format!(
            "  - name: pool\n    endpoints: [{}]\n    connect_timeout: 1s\n{extra}\n",
            list.join(", ")
        ),
        DEFAULT_TYPES,
    )
}

async fn endpoint_health(larder: &Larder, address: SocketAddr) -> serde_json::Value {
    let dump = larder.admin(Method::GET, "/clusters", &[]).await.json();
    dump["clusters"][0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["address"] == address.to_string())
        .unwrap()
        .clone()
}

#[tokio::test]
async fn a_failing_endpoint_is_ejected_and_comes_back() {
    let good = Origin::fixed(200, &[("cache-control", "no-store")], "good").await;
    let bad = Origin::fixed(503, &[("cache-control", "no-store")], "bad").await;
    let extra = "    outlier_detection: { consecutive_failures: 3, base_ejection_time: 300ms }";
    let larder = Larder::start(&cluster_yaml(&[bad.addr, good.addr], extra)).await;
    let mut answers = Vec::new();
    for _ in 0..12 {
        answers.push(larder.get("/x").await.text());
    }
    // Round robin: the bad endpoint answers three times, then it is out.
    assert_eq!(
        answers.iter().filter(|a| *a == "bad").count(),
        3,
        "{answers:?}"
    );
    assert!(answers[6..].iter().all(|a| a == "good"), "{answers:?}");
    let state = endpoint_health(&larder, bad.addr).await;
    assert_eq!(state["healthy"], false, "{state}");
    assert_eq!(state["ejections"], 1);
    assert_eq!(
        metric(
            &larder.metrics().await,
            r#"larder_upstream_ejections_total{cluster="pool"}"#
        ),
        Some(1.0)
    );

    // After its ejection time it gets traffic again.
    let deadline = Instant::now() + Duration::from_secs(5);
    while endpoint_health(&larder, bad.addr).await["healthy"] != true {
        assert!(Instant::now() < deadline, "never back in rotation");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = bad.count();
    for _ in 0..4 {
        larder.get("/x").await;
    }
    assert!(bad.count() > before, "traffic returned to the endpoint");
}

#[tokio::test]
async fn connect_failures_move_idempotent_requests_but_never_resend_a_post() {
    let good = Origin::fixed(200, &[("cache-control", "no-store")], "good").await;
    let dead = closed_address();
    let extra = "    outlier_detection: { consecutive_failures: 0 }";
    let larder = Larder::start(&cluster_yaml(&[dead, good.addr], extra)).await;
    for _ in 0..6 {
        let reply = larder.get("/g").await;
        assert_eq!(
            reply.status, 200,
            "a GET that met the dead endpoint went on to the next"
        );
    }
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let reply = larder
            .request(Method::POST, &larder.proxy_url("/p"), &[], Bytes::new())
            .await;
        statuses.push(reply.status.as_u16());
    }
    // Round robin sends half the POSTs to the dead endpoint: those fail, never resent.
    assert_eq!(
        statuses.iter().filter(|s| **s == 502).count(),
        2,
        "{statuses:?}"
    );
    let posts = good
        .requests()
        .iter()
        .filter(|r| r.method == Method::POST)
        .count();
    assert_eq!(posts, 2);
    let state = endpoint_health(&larder, dead).await;
    assert!(state["failures"].as_u64().unwrap() >= 2, "{state}");
}

#[tokio::test]
async fn ring_hash_keeps_each_url_on_one_endpoint() {
    let mut origins = Vec::new();
    for name in ["one", "two", "three"] {
        origins.push(Origin::fixed(200, &[("cache-control", "no-store")], name).await);
    }
    let addrs: Vec<SocketAddr> = origins.iter().map(|o| o.addr).collect();
    let larder = Larder::start(&cluster_yaml(&addrs, "    lb_policy: ring_hash")).await;
    let mut owners = std::collections::HashSet::new();
    for i in 0..30 {
        let path = format!("/item/{i}");
        let first = larder.get(&path).await.text();
        for _ in 0..2 {
            assert_eq!(larder.get(&path).await.text(), first, "{path} moved");
        }
        owners.insert(first);
    }
    assert_eq!(
        owners.len(),
        3,
        "URLs spread over every endpoint: {owners:?}"
    );
}

#[tokio::test]
async fn when_every_endpoint_is_down_the_cache_keeps_serving() {
    let origin = Origin::fixed(
        200,
        &[("cache-control", "max-age=1, stale-if-error=600")],
        "cached",
    )
    .await;
    let larder = Larder::start(&cluster_yaml(&[origin.addr], "")).await;
    assert_eq!(larder.get("/s").await.text(), "cached");
    // The origin disappears (its port closes) and the object goes stale.
    let config = cluster_yaml(&[closed_address()], "");
    let dir = std::env::temp_dir().join(format!("larder-upstream-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("larder.yaml");
    std::fs::write(&path, &config).unwrap();
    assert_eq!(larder.server.reload_from_file(&path), Ok(2));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let stale = larder.get("/s").await;
    assert_eq!(stale.status, 200);
    assert_eq!(stale.text(), "cached");
    stale.assert_cache_status("stale-if-error");
}

#[tokio::test]
async fn active_health_checks_move_traffic_away_and_back() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let sick = Arc::new(AtomicBool::new(true));
    let flag = sick.clone();
    // Serves requests fine, but its health endpoint says it is going down.
    let draining = Origin::start(move |seen| {
        let sick = flag.load(Ordering::SeqCst);
        async move {
            if seen.uri.path() == "/healthz" {
                response(if sick { 503 } else { 200 }, &[], "")
            } else {
                response(200, &[("cache-control", "no-store")], "draining")
            }
        }
    })
    .await;
    let steady = Origin::fixed(200, &[("cache-control", "no-store")], "steady").await;
    let extra = "    health_check: { path: /healthz, interval: 50ms, timeout: 1s, healthy_threshold: 2, unhealthy_threshold: 1 }";
    let larder = Larder::start(&cluster_yaml(&[draining.addr, steady.addr], extra)).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while endpoint_health(&larder, draining.addr).await["health_check_failed"] != true {
        assert!(
            Instant::now() < deadline,
            "the failing health check was not noticed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..6 {
        assert_eq!(larder.get("/r").await.text(), "steady");
    }
    let probes = draining
        .requests()
        .iter()
        .filter(|r| r.uri.path() == "/healthz")
        .count();
    assert!(probes >= 1);
    assert_eq!(
        draining.requests()[0].header("user-agent"),
        "larder-health-check"
    );

    // Healthy again: after two passing checks it is back in rotation.
    sick.store(false, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(5);
    while endpoint_health(&larder, draining.addr).await["healthy"] != true {
        assert!(Instant::now() < deadline, "never back in rotation");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut answers = Vec::new();
    for _ in 0..4 {
        answers.push(larder.get("/r").await.text());
    }
    assert!(answers.iter().any(|a| a == "draining"), "{answers:?}");
}

#[tokio::test]
async fn dns_discovery_follows_the_name() {
    use std::net::Ipv4Addr;
    // Two endpoints on one port of two loopback addresses, as pods behind a headless Service.
    let (a, b) = 'bind: {
        for _ in 0..20 {
            let Some(a) = Origin::start_on("127.0.0.2:0".parse().unwrap(), |_| async {
                response(200, &[("cache-control", "no-store")], "a")
            })
            .await
            else {
                continue;
            };
            let port = a.addr.port();
            if let Some(b) = Origin::start_on(SocketAddr::from(([127, 0, 0, 3], port)), |_| async {
                response(200, &[("cache-control", "no-store")], "b")
            })
            .await
            {
                break 'bind (a, b);
            }
        }
        panic!("no shared port on 127.0.0.2 and 127.0.0.3");
    };
    let dns = common::dns::TestDns::start("app.test", vec![Ipv4Addr::new(127, 0, 0, 2)]).await;
    let yaml = cluster_yaml(
        &[],
        &format!(
            "    dns: {{ name: app.test, port: {}, refresh_interval: 100ms, nameserver: \"{}\" }}",
            a.addr.port(),
            dns.addr
        ),
    )
    .replace("    endpoints: []\n", "");
    let larder = Larder::start(&yaml).await;
    let endpoints = |larder: &Larder| {
        let larder_url = larder.admin_url("/clusters");
        async move {
            let reply = send(&client(), Method::GET, &larder_url, &[], Bytes::new()).await;
            reply.json()["clusters"][0]["endpoints"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["address"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while endpoints(&larder).await != [a.addr.to_string()] {
        assert!(Instant::now() < deadline, "first resolution never landed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(larder.get("/d").await.text(), "a");
    // The Service's pods change: the next resolution moves traffic.
    *dns.answers.lock().unwrap() = vec![Ipv4Addr::new(127, 0, 0, 3)];
    while endpoints(&larder).await != [b.addr.to_string()] {
        assert!(
            Instant::now() < deadline,
            "the new address was never picked up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(larder.get("/d").await.text(), "b");
}

#[tokio::test]
async fn chosen_statuses_are_retried_elsewhere_for_idempotent_requests_only() {
    let good = Origin::fixed(200, &[("cache-control", "no-store")], "good").await;
    let busy = Origin::fixed(503, &[("cache-control", "no-store")], "busy").await;
    let extra = "    outlier_detection: { consecutive_failures: 0 }\n    retry_on_status: [503]\n    max_retries: 1";
    let larder = Larder::start(&cluster_yaml(&[busy.addr, good.addr], extra)).await;
    for _ in 0..6 {
        assert_eq!(larder.get("/r").await.text(), "good");
    }
    assert!(
        busy.count() >= 3,
        "the busy endpoint was asked and its 503s retried"
    );
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let reply = larder
            .request(Method::DELETE, &larder.proxy_url("/r"), &[], Bytes::new())
            .await;
        statuses.push(reply.status.as_u16());
    }
    // DELETE is idempotent, so it is retried too; POST is not.
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let reply = larder
            .request(Method::POST, &larder.proxy_url("/r"), &[], Bytes::new())
            .await;
        statuses.push(reply.status.as_u16());
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 503).count(),
        2,
        "{statuses:?}"
    );
}

#[tokio::test]
async fn the_circuit_breaker_answers_503_instead_of_queueing() {
    let slow = GatedOrigin::start(&[("cache-control", "no-store")], "slow").await;
    let larder = Larder::start(&cluster_yaml(&[slow.origin.addr], "    max_requests: 2")).await;
    let mut held = Vec::new();
    for i in 0..2 {
        let url = larder.proxy_url(&format!("/held/{i}"));
        let c = larder.client.clone();
        held.push(tokio::spawn(async move {
            send(&c, Method::GET, &url, &[], Bytes::new()).await
        }));
        slow.arrived("a held request").await;
    }
    let refused = larder.get("/third").await;
    assert_eq!(refused.status, 503);
    assert!(
        refused.text().contains("circuit breaker"),
        "{}",
        refused.text()
    );
    assert_eq!(
        metric(
            &larder.metrics().await,
            r#"larder_upstream_errors_total{cluster="pool",kind="overflow"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &larder.metrics().await,
            r#"larder_upstream_circuit_breaker_trips_total{cluster="pool",breaker="max_requests"}"#
        ),
        Some(1.0)
    );
    slow.release_all();
    for h in held {
        assert_eq!(h.await.unwrap().text(), "slow");
    }
    // Room again once they are done.
    let url = larder.proxy_url("/fourth");
    let c = larder.client.clone();
    let later = tokio::spawn(async move { send(&c, Method::GET, &url, &[], Bytes::new()).await });
    slow.arrived("after the breaker closed").await;
    slow.release_one();
    assert_eq!(later.await.unwrap().status, 200);
}

#[tokio::test]
async fn http2_to_a_cleartext_upstream_uses_prior_knowledge() {
    let origin = Origin::fixed(200, &[("cache-control", "no-store")], "h2c").await;
    let larder = Larder::start(&cluster_yaml(&[origin.addr], "    http2: true")).await;
    let reply = larder
        .get_with(
            "/two",
            &[("x-forwarded-for", "6.6.6.6"), ("via", "1.0 client-side")],
        )
        .await;
    assert_eq!(reply.text(), "h2c");
    let seen = origin.last();
    // An HTTP/2 request carries its scheme and authority; HTTP/1.1 sends only the path.
    assert_eq!(seen.uri.scheme_str(), Some("http"));
    // The hop's fields reach an HTTP/2 origin too, a client's claim replaced.
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    let via: Vec<_> = seen.headers.get_all("via").iter().collect();
    assert_eq!(via, ["1.0 client-side", "1.1 larder"]);
}

/// Polls `/clusters` (bounded) until the first cluster's breaker usage satisfies `ready`.
async fn wait_for_breakers(larder: &Larder, why: &str, ready: impl Fn(&serde_json::Value) -> bool) {
    for _ in 0..500 {
        let dump = larder.admin(Method::GET, "/clusters", &[]).await.json();
        if ready(&dump["clusters"][0]["circuit_breakers"]) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("breakers never showed: {why}");
}

#[tokio::test]
async fn max_connections_queues_requests_and_max_pending_requests_refuses_the_rest() {
    let slow = GatedOrigin::start(&[("cache-control", "no-store")], "slow").await;
    let larder = Larder::start(&cluster_yaml(
        &[slow.origin.addr],
        "    max_connections: 1\n    max_pending_requests: 1",
    ))
    .await;
    let spawn_get = |path: &str| {
        let url = larder.proxy_url(path);
        let c = larder.client.clone();
        tokio::spawn(async move { send(&c, Method::GET, &url, &[], Bytes::new()).await })
    };
    let first = spawn_get("/first");
    slow.arrived("the first request, holding the only connection")
        .await;
    let second = spawn_get("/second");
    wait_for_breakers(&larder, "the second request queued", |b| {
        b["pending_requests"] == 1 && b["connections"] == 1
    })
    .await;
    // The queue is full: refused at once, without touching the origin.
    let refused = larder.get("/third").await;
    assert_eq!(refused.status, 503);
    assert!(
        refused.text().contains("max_pending_requests"),
        "{}",
        refused.text()
    );
    // The queued request takes the first one's connection when it is done.
    slow.release_one();
    assert_eq!(first.await.unwrap().text(), "slow");
    slow.arrived("the queued request, on the freed connection")
        .await;
    slow.release_one();
    assert_eq!(second.await.unwrap().text(), "slow");
    assert_eq!(slow.origin.count(), 2);
    let metrics = larder.metrics().await;
    let trips = |breaker: &str| {
        metric(
            &metrics,
            &format!(
                r#"larder_upstream_circuit_breaker_trips_total{{cluster="pool",breaker="{breaker}"}}"#
            ),
        )
    };
    assert_eq!(trips("max_pending_requests"), Some(1.0));
    assert!(trips("max_connections").unwrap() >= 2.0, "{metrics}");
    assert_eq!(trips("max_requests"), Some(0.0));
    assert_eq!(
        metric(
            &metrics,
            r#"larder_upstream_errors_total{cluster="pool",kind="overflow"}"#
        ),
        Some(1.0)
    );
    // A full breaker is the cluster's load, not the endpoint's fault.
    assert_eq!(
        endpoint_health(&larder, slow.origin.addr).await["healthy"],
        true
    );
}

#[tokio::test]
async fn a_route_total_timeout_cuts_off_a_trickling_body_which_is_not_stored() {
    use futures_util::StreamExt;
    let origin = Origin::start(|_| async {
        // A chunk every 50 ms: never idle long, but never done (bounded at 10 minutes).
        let chunks = futures_util::stream::iter(0..12_000).then(|_| async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok::<_, BoxError>(hyper::body::Frame::data(Bytes::from_static(b"drip ")))
        });
        let body = http_body_util::BodyExt::boxed_unsync(http_body_util::StreamBody::new(chunks));
        http::Response::builder()
            .header("cache-control", "max-age=600")
            .body(body)
            .unwrap()
    })
    .await;
    let yaml = config_yaml(origin.addr, DEFAULT_TYPES).replace(
        "        cluster: origin\n",
        "        cluster: origin\n        idle_timeout: 5s\n        total_timeout: 400ms\n",
    );
    let larder = Larder::start(&yaml).await;
    for attempt in 1..=2 {
        let request = http::Request::get(larder.proxy_url("/drip"))
            .body(http_body_util::Full::new(Bytes::new()))
            .unwrap();
        let response = larder.client.request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        let body = tokio::time::timeout(
            Duration::from_secs(10),
            http_body_util::BodyExt::collect(response.into_body()),
        )
        .await
        .expect("the body ends at the total timeout instead of trickling on");
        assert!(body.is_err(), "a cut body is an error, not a short success");
        // Not stored: the second request goes to the origin again.
        assert_eq!(origin.count(), attempt);
    }
}

#[tokio::test]
async fn a_route_connect_timeout_overrides_the_clusters() {
    // Accepts TCP and then says nothing: the TLS handshake, part of connecting, never ends.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            sockets.push(socket);
        }
    });
    let yaml = config_yaml_with(
        "      - match: { prefix: \"/\" }\n        cluster: tls\n        connect_timeout: 200ms\n",
        &format!(
            "  - name: tls\n    endpoints: [\"{address}\"]\n    connect_timeout: 60s\n    request_timeout: 60s\n    tls: {{ server_name: origin.test }}\n"
        ),
        DEFAULT_TYPES,
    );
    let larder = Larder::start(&yaml).await;
    let reply = tokio::time::timeout(Duration::from_secs(20), larder.get("/x"))
        .await
        .expect("answered at the route's connect timeout, not the cluster's");
    assert_eq!(reply.status, 504, "{}", reply.text());
    assert!(
        metric(
            &larder.metrics().await,
            r#"larder_upstream_errors_total{cluster="tls",kind="timeout"}"#
        )
        .unwrap()
            >= 1.0
    );
    held.abort();
}

/// An endpoint that reads each request head and then resets the connection (RST, no
/// response): counts the requests it swallowed, by method.
async fn resetting_endpoint() -> (SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let seen: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
    let recorded = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let recorded = recorded.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let method = String::from_utf8_lossy(&head)
                    .split(' ')
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                recorded.lock().unwrap().push(method);
                socket.set_zero_linger().unwrap();
                drop(socket);
            });
        }
    });
    (address, seen)
}

#[tokio::test]
async fn an_endpoint_that_resets_is_ejected_and_a_post_it_swallowed_is_never_resent() {
    let good = Origin::fixed(200, &[("cache-control", "no-store")], "good").await;
    let (resetting, swallowed) = resetting_endpoint().await;
    let extra = "    outlier_detection: { consecutive_failures: 2, base_ejection_time: 60s }";
    let larder = Larder::start(&cluster_yaml(&[resetting, good.addr], extra)).await;
    // The POSTs first, while round robin still sends every other request to the resetter.
    let mut statuses = Vec::new();
    for _ in 0..2 {
        let reply = post_order(&larder, "/p").await;
        statuses.push(reply.status.as_u16());
    }
    statuses.sort();
    assert_eq!(
        statuses,
        [200, 502],
        "the reset POST fails, it is not resent"
    );
    let posts_at_good = good
        .requests()
        .iter()
        .filter(|r| r.method == Method::POST)
        .count();
    assert_eq!(posts_at_good, 1);
    assert_eq!(*swallowed.lock().unwrap(), ["POST"]);
    // GETs that meet the reset move on to the good endpoint; after two failures in a row the
    // resetter leaves rotation.
    for _ in 0..6 {
        assert_eq!(larder.get("/g").await.text(), "good");
    }
    let state = endpoint_health(&larder, resetting).await;
    assert_eq!(state["healthy"], false, "{state}");
    let reset_gets = swallowed
        .lock()
        .unwrap()
        .iter()
        .filter(|m| *m == "GET")
        .count();
    assert!(reset_gets <= 2, "an ejected endpoint gets no more requests");
}

/// An origin on raw sockets that numbers its connections. Each request line is recorded with
/// the number of the connection it came on. `/close` answers with `connection: close` and
/// closes; `/until-close` sends a body ended by closing; `/204`, `/chunked`, `/trailers` (chunk
/// extensions and a trailer field), `/interim` (a 100 first), `/extra` (bytes after the body),
/// `/two-lengths` (differing Content-Length values), `/both` (Content-Length and chunked) and
/// `/interim-then-close` (a 103, then the connection closes) answer as named; HEAD gets no body; `/gated…` waits for a
/// permit of `gate`. `hang_up` makes every connection close while it waits for a request (an origin
/// timing out idle connections). The number of a connection the proxy closes goes to `closed`.
struct NumberingOrigin {
    addr: SocketAddr,
    seen: std::sync::Arc<std::sync::Mutex<Vec<(usize, String)>>>,
    arrivals: tokio::sync::watch::Receiver<usize>,
    gate: std::sync::Arc<tokio::sync::Semaphore>,
    hang_up: std::sync::Arc<tokio::sync::Notify>,
    closed: tokio::sync::mpsc::UnboundedReceiver<usize>,
}

impl NumberingOrigin {
    async fn start() -> NumberingOrigin {
        use std::sync::Arc;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<std::sync::Mutex<Vec<(usize, String)>>> = Default::default();
        let (arrived, arrivals) = tokio::sync::watch::channel(0);
        let arrived = Arc::new(arrived);
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let hang_up = Arc::new(tokio::sync::Notify::new());
        let (closed_tx, closed) = tokio::sync::mpsc::unbounded_channel();
        let (recorded, gated, hanging_up) = (seen.clone(), gate.clone(), hang_up.clone());
        tokio::spawn(async move {
            let mut number = 0;
            while let Ok((mut socket, _)) = listener.accept().await {
                let connection = number;
                number += 1;
                let (recorded, arrived, gate, hang_up, closed_tx) = (
                    recorded.clone(),
                    arrived.clone(),
                    gated.clone(),
                    hanging_up.clone(),
                    closed_tx.clone(),
                );
                tokio::spawn(async move {
                    let mut pending = Vec::new();
                    let mut buf = [0u8; 8192];
                    loop {
                        while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&pending[..end + 4]).into_owned();
                            let body_length: usize = head
                                .lines()
                                .find_map(|line| {
                                    let line = line.to_ascii_lowercase();
                                    let value = line.strip_prefix("content-length:")?;
                                    Some(value.trim().parse().unwrap())
                                })
                                .unwrap_or(0);
                            while pending.len() < end + 4 + body_length {
                                match socket.read(&mut buf).await {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => pending.extend_from_slice(&buf[..n]),
                                }
                            }
                            pending.drain(..end + 4 + body_length);
                            let request_line = head.lines().next().unwrap().to_owned();
                            let target = request_line.split(' ').nth(1).unwrap_or_default();
                            let target = target.to_owned();
                            recorded
                                .lock()
                                .unwrap()
                                .push((connection, request_line.clone()));
                            arrived.send_modify(|n| *n += 1);
                            if target.starts_with("/gated") {
                                gate.acquire().await.unwrap().forget();
                            }
                            let reply: &[u8] = match target.as_str() {
                                _ if request_line.starts_with("HEAD ") => {
                                    b"HTTP/1.1 200 OK\r\ncache-control: no-store\r\ncontent-length: 5\r\n\r\n"
                                }
                                "/close" => {
                                    b"HTTP/1.1 200 OK\r\ncache-control: no-store\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello"
                                }
                                "/204" => b"HTTP/1.1 204 No Content\r\ncache-control: no-store\r\n\r\n",
                                "/chunked" => {
                                    b"HTTP/1.1 200 OK\r\ncache-control: no-store\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                                }
                                "/trailers" => {
                                    b"HTTP/1.1 200 OK\r\ncache-control: no-store\r\ntransfer-encoding: chunked\r\n\r\n2;x=y\r\nhe\r\n3\r\nllo\r\n0\r\nx-sum: 5\r\n\r\n"
                                }
                                "/interim" => {
                                    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncache-control: no-store\r\ncontent-length: 5\r\n\r\nhello"
                                }
                                "/interim-then-close" => {
                                    b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n"
                                }
                                "/until-close" => {
                                    b"HTTP/1.1 200 OK\r\ncache-control: no-store\r\n\r\nhello"
                                }
                                "/extra" => {
                                    b"HTTP/1.1 200 OK\r\ncache-control: no-store\r\ncontent-length: 5\r\n\r\nhelloHTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nforged"
                                }
                                "/two-lengths" => {
                                    b"HTTP/1.1 200 OK\r\ncache-control: no-store\r\ncontent-length: 5, 6\r\n\r\nhello!"
                                }
                                "/both" => {
                                    b"HTTP/1.1 200 OK\r\ncache-control: no-store\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                                }
                                _ => b"HTTP/1.1 200 OK\r\ncache-control: no-store\r\ncontent-length: 5\r\n\r\nhello",
                            };
                            if socket.write_all(reply).await.is_err()
                                || target == "/close"
                                || target == "/until-close"
                                || target == "/interim-then-close"
                            {
                                return;
                            }
                        }
                        tokio::select! {
                            read = socket.read(&mut buf) => match read {
                                Ok(0) => {
                                    let _ = closed_tx.send(connection);
                                    return;
                                }
                                Err(_) => return,
                                Ok(n) => pending.extend_from_slice(&buf[..n]),
                            },
                            () = hang_up.notified() => return,
                        }
                    }
                });
            }
        });
        NumberingOrigin {
            addr,
            seen,
            arrivals,
            gate,
            hang_up,
            closed,
        }
    }

    /// The connection number each request came on, in order.
    fn connections(&self) -> Vec<usize> {
        self.seen.lock().unwrap().iter().map(|(c, _)| *c).collect()
    }
}

/// A POST of a small body (`order`), which the proxy must never send twice.
async fn post_order(larder: &Larder, path: &str) -> Reply {
    larder
        .request(
            Method::POST,
            &larder.proxy_url(path),
            &[],
            Bytes::from("order"),
        )
        .await
}

async fn open_upstream_connections(larder: &Larder) -> Option<f64> {
    metric(
        &larder.metrics().await,
        r#"larder_upstream_connections{cluster="pool"}"#,
    )
}

#[tokio::test]
async fn one_connection_carries_sequential_requests_whatever_their_bodies() {
    let origin = NumberingOrigin::start().await;
    let larder = Larder::start(&cluster_yaml(&[origin.addr], "")).await;
    for path in ["/a", "/204", "/chunked", "/b"] {
        let reply = larder.get(path).await;
        assert!(reply.status.is_success(), "{path}: {}", reply.status);
    }
    let head = larder
        .request(Method::HEAD, &larder.proxy_url("/a"), &[], Bytes::new())
        .await;
    assert_eq!(head.status, 200);
    let post = post_order(&larder, "/p").await;
    assert_eq!(post.text(), "hello");
    assert_eq!(larder.get("/after").await.text(), "hello");
    // Bodiless, empty, chunked and HEAD responses all give the connection back.
    assert_eq!(origin.connections(), [0; 7], "{:?}", origin.seen);
    assert_eq!(open_upstream_connections(&larder).await, Some(1.0));
    // A response that closes its connection is relayed whole; the next request opens another.
    assert_eq!(larder.get("/close").await.text(), "hello");
    assert_eq!(larder.get("/next").await.text(), "hello");
    assert_eq!(origin.connections()[7..], [0, 1]);
}

#[tokio::test]
async fn every_response_framing_is_read_to_its_end_and_only_a_clean_end_reuses_the_connection() {
    let origin = NumberingOrigin::start().await;
    let larder = Larder::start(&cluster_yaml(&[origin.addr], "")).await;
    // Reused after each: chunk extensions and trailers are read past, a 100 is skipped.
    for path in ["/a", "/trailers", "/interim", "/b"] {
        let reply = larder.get(path).await;
        assert_eq!(
            (reply.status.as_u16(), reply.text().as_str()),
            (200, "hello"),
            "{path}"
        );
    }
    assert_eq!(origin.connections(), [0; 4]);
    // A body that ends with the connection is relayed whole; the connection is not reused.
    assert_eq!(larder.get("/until-close").await.text(), "hello");
    assert_eq!(larder.get("/c").await.text(), "hello");
    assert_eq!(origin.connections()[4..], [0, 1]);
    // Bytes after the body are never read as the next response: the connection is closed.
    assert_eq!(larder.get("/extra").await.text(), "hello");
    assert_eq!(larder.get("/d").await.text(), "hello");
    assert_eq!(origin.connections()[6..], [1, 2]);
    // Chunked wins over a Content-Length beside it, and the connection is not trusted after.
    let both = larder.get("/both").await;
    assert_eq!(both.text(), "hello");
    assert_eq!(both.header("content-length"), "");
    assert_eq!(larder.get("/e").await.text(), "hello");
    assert_eq!(origin.connections()[8..], [2, 3]);
    // Differing lengths: no way to know where the body ends.
    assert_eq!(larder.get("/two-lengths").await.status, 502);
    assert_eq!(larder.get("/f").await.text(), "hello");
    assert_eq!(origin.connections()[10..], [3, 4]);
}

#[tokio::test]
async fn a_connection_closed_after_an_interim_resends_only_an_idempotent_request() {
    let origin = NumberingOrigin::start().await;
    let larder = Larder::start(&cluster_yaml(&[origin.addr], "")).await;
    // No final response: the GET may go again (it did nothing the origin finished), once.
    assert_eq!(larder.get("/interim-then-close").await.status, 502);
    assert_eq!(origin.connections(), [0, 1]);
    let post = post_order(&larder, "/interim-then-close").await;
    assert_eq!(post.status, 502);
    assert_eq!(
        origin.connections(),
        [0, 1, 2],
        "a POST is never sent twice"
    );
}

#[tokio::test]
async fn a_request_body_of_unknown_length_goes_upstream_chunked() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let origin = Origin::fixed(200, &[("cache-control", "no-store")], "stored").await;
    let larder = Larder::start(&cluster_yaml(&[origin.addr], "")).await;
    let mut client = tokio::net::TcpStream::connect(larder.server.proxy_addrs[0])
        .await
        .unwrap();
    client
        .write_all(
            b"POST /upload HTTP/1.1\r\nhost: a.example\r\ntransfer-encoding: chunked\r\n\r\n\
              5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n",
        )
        .await
        .unwrap();
    let mut reply = Vec::new();
    while !reply.ends_with(b"stored") {
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), client.read(&mut buf))
            .await
            .expect("a reply within 10s")
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&reply));
        reply.extend_from_slice(&buf[..n]);
    }
    assert!(reply.starts_with(b"HTTP/1.1 200 OK\r\n"));
    let seen = origin.last();
    assert_eq!(&seen.body[..], b"hello, world");
    assert_eq!(seen.headers["transfer-encoding"], "chunked");
    assert!(seen.headers.get("content-length").is_none());
}

#[tokio::test]
async fn an_upload_goes_on_after_the_origin_answers_early() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // The origin answers as soon as it has the head, then reads the whole upload and reports
    // how much it got as the response body.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut seen = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let head_end = loop {
            let n = socket.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before the request head");
            seen.extend_from_slice(&buf[..n]);
            if let Some(at) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
        };
        let head = String::from_utf8_lossy(&seen[..head_end]).to_lowercase();
        let length: usize = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length:"))
            .expect("a declared length")
            .trim()
            .parse()
            .unwrap();
        socket
            .write_all(
                b"HTTP/1.1 200 OK\r\ncache-control: no-store\r\ntransfer-encoding: chunked\r\n\r\n",
            )
            .await
            .unwrap();
        let mut got = seen.len() - head_end;
        while got < length {
            let n = socket.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got += n;
        }
        let report = got.to_string();
        let _ = socket
            .write_all(format!("{:x}\r\n{report}\r\n0\r\n\r\n", report.len()).as_bytes())
            .await;
    });
    let larder = Larder::start(&cluster_yaml(&[origin], "")).await;
    let mut client = tokio::net::TcpStream::connect(larder.server.proxy_addrs[0])
        .await
        .unwrap();
    let half = 1 << 20;
    client
        .write_all(
            format!(
                "POST /up HTTP/1.1\r\nhost: a.example\r\ncontent-length: {}\r\n\r\n",
                2 * half
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    client.write_all(&vec![b'x'; half]).await.unwrap();
    // The response head comes back before the second half is even sent.
    let mut reply = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    while !reply.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(20), client.read(&mut buf))
            .await
            .expect("the response head within 20s")
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&reply));
        reply.extend_from_slice(&buf[..n]);
    }
    assert!(reply.starts_with(b"HTTP/1.1 200 OK\r\n"));
    client.write_all(&vec![b'y'; half]).await.unwrap();
    while !reply.ends_with(b"0\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(20), client.read(&mut buf))
            .await
            .expect("the end of the response within 20s")
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&reply));
        reply.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&reply);
    assert!(
        text.contains(&format!("\r\n{}\r\n", 2 * half)),
        "the origin got the whole upload: {text}"
    );
}

#[tokio::test]
async fn a_connection_its_origin_closed_while_idle_is_dropped_and_a_post_goes_on_a_new_one() {
    let origin = NumberingOrigin::start().await;
    let larder = Larder::start(&cluster_yaml(&[origin.addr], "    idle_timeout: 60s")).await;
    assert_eq!(larder.get("/a").await.text(), "hello");
    assert_eq!(open_upstream_connections(&larder).await, Some(1.0));
    origin.hang_up.notify_waiters();
    // The pool's sweep (each second at most) finds the close among its idle connections.
    let deadline = Instant::now() + Duration::from_secs(20);
    while open_upstream_connections(&larder).await != Some(0.0) {
        assert!(
            Instant::now() < deadline,
            "the closed connection is still pooled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let post = post_order(&larder, "/p").await;
    assert_eq!(post.status, 200);
    assert_eq!(origin.connections(), [0, 1]);
}

#[tokio::test]
async fn idle_connections_close_after_idle_timeout_and_beyond_max_idle_connections() {
    let mut origin = NumberingOrigin::start().await;
    let larder = Larder::start(&cluster_yaml(
        &[origin.addr],
        "    idle_timeout: 300ms\n    max_idle_connections: 1",
    ))
    .await;
    // Two requests at once need two connections; only one stays parked after them.
    // Distinct URLs: two requests for one would be coalesced into one.
    let spawn_get = |path| {
        let url = larder.proxy_url(path);
        let client = larder.client.clone();
        tokio::spawn(async move { send(&client, Method::GET, &url, &[], Bytes::new()).await })
    };
    let (first, second) = (spawn_get("/gated/1"), spawn_get("/gated/2"));
    origin.arrivals.wait_for(|n| *n == 2).await.unwrap();
    origin.gate.add_permits(2);
    assert_eq!(first.await.unwrap().text(), "hello");
    assert_eq!(second.await.unwrap().text(), "hello");
    let mut both = origin.connections();
    both.sort();
    assert_eq!(both, [0, 1]);
    let over_limit = tokio::time::timeout(Duration::from_secs(10), origin.closed.recv()).await;
    assert!(
        matches!(over_limit, Ok(Some(_))),
        "the connection beyond max_idle_connections is closed"
    );
    let parked_since = Instant::now();
    assert_eq!(open_upstream_connections(&larder).await, Some(1.0));
    let idle = tokio::time::timeout(Duration::from_secs(10), origin.closed.recv()).await;
    assert!(
        matches!(idle, Ok(Some(_))),
        "the parked connection is closed after idle_timeout"
    );
    assert!(parked_since.elapsed() >= Duration::from_millis(150));
    assert_eq!(open_upstream_connections(&larder).await, Some(0.0));
}

/// A pooled connection's response-head timer stays armed between requests and moves only
/// when it must: a later request still gets its own deadline, whether it is later than the
/// armed one (the armed one fires, and the request goes on) or earlier (it moves at once).
#[tokio::test]
async fn a_reused_connection_times_out_at_each_requests_own_deadline() {
    let origin = Origin::start(|seen| async move {
        match seen.uri.path() {
            "/slow" => tokio::time::sleep(Duration::from_millis(700)).await,
            // Never answers (bounded by the test's life).
            "/quick/hang" => tokio::time::sleep(Duration::from_secs(600)).await,
            _ => {}
        }
        response(200, &[("cache-control", "no-store")], "answered")
    })
    .await;
    let larder = Larder::start(&config_yaml_with(
        "      - match: { prefix: \"/quick/\" }\n        cluster: pool\n        timeout: 300ms\n\
         \x20     - match: { prefix: \"/\" }\n        cluster: pool\n        timeout: 30s\n",
        &format!(
            "  - name: pool\n    endpoints: [\"{}\"]\n    connect_timeout: 1s\n",
            origin.addr
        ),
        DEFAULT_TYPES,
    ))
    .await;
    // Arms the connection's timer 300ms out; the next request outlives that deadline.
    assert_eq!(larder.get("/quick/a").await.text(), "answered");
    let slow = larder.get("/slow").await;
    assert_eq!(slow.status, 200, "{}", slow.text());
    assert_eq!(
        open_upstream_connections(&larder).await,
        Some(1.0),
        "reused"
    );
    // Armed 30s out now: a 300ms deadline must not wait for it.
    let hung = tokio::time::timeout(Duration::from_secs(10), larder.get("/quick/hang"))
        .await
        .expect("answered at the route's 300ms timeout, not at the armed 30s one");
    assert_eq!(hung.status, 504, "{}", hung.text());
    assert_eq!(
        metric(
            &larder.metrics().await,
            r#"larder_upstream_errors_total{cluster="pool",kind="timeout"}"#
        ),
        Some(1.0)
    );
}

//! Invalidation through the real proxy and admin API: URL, prefix, tag and soft purges, the
//! JSON batch form, authentication, rate limiting, the PURGE method, the race with an
//! in-flight fill, and cluster-wide purges reaching every replica (DNS discovery, down peers).

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::dns::TestDns;
use common::*;
use http::Method;

/// An origin that tags `/p/<n>` with `product-<n>` and `all` (Surrogate-Key) and `/c/<n>`
/// with `cat-<n>` (Cache-Tag), with an ETag so that revalidation is visible.
async fn tagging_origin() -> Origin {
    Origin::start(|seen| async move {
        let path = seen.uri.path().to_owned();
        if seen.header("if-none-match") == "\"v1\"" {
            return response(
                304,
                &[("etag", "\"v1\""), ("cache-control", "max-age=600")],
                "",
            );
        }
        let mut headers = vec![("cache-control", "max-age=600"), ("etag", "\"v1\"")];
        let tags;
        if let Some(n) = path.strip_prefix("/p/") {
            tags = format!("product-{n} all");
            headers.push(("surrogate-key", &tags));
        } else if let Some(n) = path.strip_prefix("/c/") {
            tags = format!("cat-{n}, all");
            headers.push(("cache-tag", &tags));
        }
        response(200, &headers, format!("body of {path}"))
    })
    .await
}

async fn post_json(larder: &Larder, path: &str, json: &str, headers: &[(&str, &str)]) -> Reply {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    larder
        .request(
            Method::POST,
            &larder.admin_url(path),
            &all,
            Bytes::from(json.to_owned()),
        )
        .await
}

fn is_hit(reply: &Reply) -> bool {
    reply.cache_status().contains("hit")
}

#[tokio::test]
async fn tag_purge_removes_tagged_objects_and_tags_never_reach_clients() {
    let origin = tagging_origin().await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    for path in ["/p/1", "/p/2", "/c/1", "/untagged"] {
        let first = larder.get(path).await;
        assert_eq!(first.status, 200);
        assert_eq!(first.header("surrogate-key"), "", "stripped on a miss");
        assert_eq!(first.header("cache-tag"), "");
        let second = larder.get(path).await;
        assert!(is_hit(&second), "{path}: {}", second.cache_status());
        assert_eq!(second.header("surrogate-key"), "", "stripped on a hit");
    }
    assert_eq!(origin.count(), 4);

    let reply = larder
        .admin(Method::POST, "/purge?tag=product-1", &[])
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let json = reply.json();
    assert_eq!(json["purged"], 1);
    assert_eq!(json["targets"][0]["kind"], "tag");
    assert!(!is_hit(&larder.get("/p/1").await));
    assert!(is_hit(&larder.get("/p/2").await));

    // `all` is in Surrogate-Key (space-separated) and Cache-Tag (comma-separated) alike.
    let reply = larder.admin(Method::POST, "/purge?tag=all", &[]).await;
    assert_eq!(reply.json()["purged"], 3);
    for path in ["/p/1", "/p/2", "/c/1"] {
        assert!(!is_hit(&larder.get(path).await), "{path}");
    }
    assert!(is_hit(&larder.get("/untagged").await));

    let none = larder.admin(Method::POST, "/purge?tag=nothing", &[]).await;
    assert_eq!(none.status, 404);
    assert_eq!(none.json()["purged"], 0);
    let metrics = larder.metrics().await;
    assert_eq!(
        metric(&metrics, r#"larder_purged_objects_total{kind="tag"}"#),
        Some(4.0)
    );
    assert_eq!(
        metric(
            &metrics,
            r#"larder_purges_total{kind="tag",result="not_found"}"#
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn tag_headers_reach_clients_when_stripping_is_off() {
    let origin = tagging_origin().await;
    let yaml = format!(
        "{}purge: {{ strip_tag_headers: false, tag_headers: [x-tags] }}\n",
        config_yaml(origin.addr, DEFAULT_TYPES)
    );
    let larder = Larder::start(&yaml).await;
    larder.get("/p/1").await;
    let hit = larder.get("/p/1").await;
    assert!(is_hit(&hit));
    assert_eq!(hit.header("surrogate-key"), "product-1 all");
    // Surrogate-Key is not a tag header in this config.
    let reply = larder
        .admin(Method::POST, "/purge?tag=product-1", &[])
        .await;
    assert_eq!(reply.status, 404);
}

#[tokio::test]
async fn prefix_purges_and_the_json_batch_answer_with_counts() {
    let origin = tagging_origin().await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    for path in [
        "/img/a.png",
        "/img/b/c.png",
        "/imgx",
        "/p/1",
        "/p/2",
        "/q?x=1",
        "/q?x=2",
    ] {
        larder.get(path).await;
    }
    let reply = larder
        .admin(Method::POST, "/purge?hostname=127.0.0.1&path=/img/*", &[])
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["purged"], 2);
    assert_eq!(reply.json()["targets"][0]["kind"], "prefix");
    assert!(!is_hit(&larder.get("/img/a.png").await));
    assert!(is_hit(&larder.get("/imgx").await));

    let reply = post_json(
        &larder,
        "/purge",
        r#"{"urls": ["http://127.0.0.1/q?x=1"], "prefixes": ["127.0.0.1/imgx"], "tags": ["product-2"]}"#,
        &[],
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let json = reply.json();
    assert_eq!(json["purged"], 3);
    let counts: Vec<(String, u64)> = json["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["kind"].as_str().unwrap().to_owned(),
                t["purged"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        counts,
        [("url".into(), 1), ("prefix".into(), 1), ("tag".into(), 1)]
    );
    assert!(is_hit(&larder.get("/q?x=2").await));
    assert!(is_hit(&larder.get("/p/1").await));

    for (body, expected) in [
        (r#"{"urls": ["no-path"]}"#, "urls[0]"),
        (r#"{"tagz": ["x"]}"#, "unknown field"),
        ("{}", "nothing to purge"),
        ("not json", "invalid JSON body"),
    ] {
        let reply = post_json(&larder, "/purge", body, &[]).await;
        assert_eq!(reply.status, 400, "{body}");
        let error = reply.json()["error"].as_str().unwrap().to_owned();
        assert!(error.contains(expected), "{body}: {error}");
    }
    let metrics = larder.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            r#"larder_purge_requests_total{source="admin",result="invalid"}"#
        ),
        Some(4.0)
    );
}

#[tokio::test]
async fn soft_purge_makes_the_next_request_revalidate() {
    let origin = tagging_origin().await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    larder.get("/p/1").await;
    assert!(is_hit(&larder.get("/p/1").await));
    let reply = larder
        .admin(
            Method::POST,
            "/purge?hostname=127.0.0.1&path=/p/1&soft=true",
            &[],
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["soft"], true);
    assert_eq!(reply.json()["purged"], 1);

    let after = larder.get("/p/1").await;
    assert_eq!(after.status, 200);
    assert_eq!(
        after.text(),
        "body of /p/1",
        "the stored body is served again"
    );
    assert_eq!(origin.count(), 2);
    assert_eq!(
        origin.last().header("if-none-match"),
        "\"v1\"",
        "a soft purge revalidates rather than refetches"
    );
    assert!(
        is_hit(&larder.get("/p/1").await),
        "fresh again after the 304"
    );
}

#[tokio::test]
async fn soft_purge_with_grace_serves_stale_while_the_origin_is_asked() {
    let origin = tagging_origin().await;
    let types =
        "resource_types:\n  - name: default\n    config: { cache_size: 16MiB, grace: 60s }\n";
    let larder = Larder::start(&config_yaml(origin.addr, types)).await;
    larder.get("/c/1").await;
    let reply = larder
        .admin(Method::POST, "/purge?tag=cat-1&soft=1", &[])
        .await;
    assert_eq!(reply.json()["purged"], 1);
    let stale = larder.get("/c/1").await;
    assert_eq!(stale.text(), "body of /c/1");
    assert!(
        stale
            .cache_status()
            .contains("detail=stale-while-revalidate"),
        "{}",
        stale.cache_status()
    );
    // The background revalidation is conditional; wait for it to land.
    let deadline = Instant::now() + Duration::from_secs(5);
    while origin.count() < 2 {
        assert!(Instant::now() < deadline, "no background revalidation");
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(origin.last().header("if-none-match"), "\"v1\"");
}

#[tokio::test]
async fn a_purge_during_an_in_flight_fill_wins() {
    let gated = GatedOrigin::start(
        &[("cache-control", "max-age=600"), ("surrogate-key", "slow")],
        "old",
    )
    .await;
    for purge in ["/purge?hostname=127.0.0.1&path=/slow", "/purge?tag=slow"] {
        let larder = Larder::start(&config_yaml(gated.origin.addr, DEFAULT_TYPES)).await;
        let url = larder.proxy_url("/slow");
        let client = larder.client.clone();
        let fill =
            tokio::spawn(async move { send(&client, Method::GET, &url, &[], Bytes::new()).await });
        gated.arrived("the fill").await;
        // The purge lands while the origin is still answering.
        let reply = larder.admin(Method::POST, purge, &[]).await;
        assert_eq!(
            reply.json()["purged"],
            0,
            "{purge}: nothing stored yet: {}",
            reply.text()
        );
        gated.release_one();
        let first = fill.await.unwrap();
        assert_eq!(first.text(), "old", "the client still gets its answer");
        // …but the fill was not stored: the purge won.
        let url = larder.proxy_url("/slow");
        let client = larder.client.clone();
        let refetch =
            tokio::spawn(async move { send(&client, Method::GET, &url, &[], Bytes::new()).await });
        gated
            .arrived("the next request goes to the origin: the purged fill was not stored")
            .await;
        gated.release_one();
        let second = refetch.await.unwrap();
        assert_eq!(second.status, 200);
        assert!(!is_hit(&second), "{purge}: {}", second.cache_status());
        // Stored this time: nothing purged it.
        assert!(is_hit(&larder.get("/slow").await));
    }
}

#[tokio::test]
async fn purges_need_the_token_and_are_rate_limited() {
    let origin = tagging_origin().await;
    let yaml = format!(
        "{}purge: {{ max_requests_per_second: 1 }}\n",
        config_yaml(origin.addr, DEFAULT_TYPES)
    );
    let larder = Larder::start_with(
        &yaml,
        larder::StartOptions {
            admin_token: Some("s3cret".into()),
        },
    )
    .await;
    larder.get("/p/1").await;
    let purge = "/purge?tag=product-1";
    assert_eq!(larder.admin(Method::POST, purge, &[]).await.status, 401);
    let wrong = [("authorization", "Bearer nope")];
    assert_eq!(larder.admin(Method::POST, purge, &wrong).await.status, 401);
    // A relayed purge needs the token just the same.
    let relayed = [
        ("x-larder-relayed-by", "someone"),
        ("authorization", "Bearer s3cret!"),
    ];
    assert_eq!(
        larder.admin(Method::POST, purge, &relayed).await.status,
        401
    );
    assert!(is_hit(&larder.get("/p/1").await), "nothing was purged");

    let auth = [("authorization", "Bearer s3cret")];
    assert_eq!(larder.admin(Method::POST, purge, &auth).await.status, 200);
    // One per second with a burst of two: the third in a row is refused.
    larder.admin(Method::POST, purge, &auth).await;
    let limited = larder.admin(Method::POST, purge, &auth).await;
    assert_eq!(limited.status, 429, "{}", limited.text());
    assert!(limited.header("retry-after").parse::<u64>().unwrap() >= 1);

    let metrics = larder.metrics().await;
    for (result, n) in [("unauthorized", 2.0), ("rate_limited", 1.0), ("ok", 2.0)] {
        let series = format!(r#"larder_purge_requests_total{{source="admin",result="{result}"}}"#);
        assert_eq!(metric(&metrics, &series), Some(n), "{series}");
    }
    assert_eq!(
        metric(
            &metrics,
            r#"larder_purge_requests_total{source="peer",result="unauthorized"}"#
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn the_purge_method_works_only_when_enabled_and_from_allowed_networks() {
    let origin = tagging_origin().await;
    let purge_method = Method::from_bytes(b"PURGE").unwrap();

    // Off by default: PURGE is just another method, passed to the origin.
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    larder.get("/p/1").await;
    let before = origin.count();
    larder
        .request(
            purge_method.clone(),
            &larder.proxy_url("/p/1"),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(origin.count(), before + 1);

    let allowed = format!(
        "{}purge: {{ purge_method: {{ enabled: true, allowed_cidrs: [127.0.0.0/8] }} }}\n",
        config_yaml(origin.addr, DEFAULT_TYPES)
    );
    let larder = Larder::start(&allowed).await;
    larder.get("/img/1").await;
    larder.get("/img/2").await;
    larder.get("/p/1").await;
    let before = origin.count();
    let reply = larder
        .request(
            purge_method.clone(),
            &larder.proxy_url("/p/1"),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["purged"], 1);
    let reply = larder
        .request(
            purge_method.clone(),
            &larder.proxy_url("/img/*"),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(reply.json()["purged"], 2);
    assert_eq!(origin.count(), before, "PURGE never reaches the origin");
    assert!(!is_hit(&larder.get("/p/1").await));

    let elsewhere = format!(
        "{}purge: {{ purge_method: {{ enabled: true, allowed_cidrs: [10.0.0.0/8, \"fd00::/8\"] }} }}\n",
        config_yaml(origin.addr, DEFAULT_TYPES)
    );
    let larder = Larder::start(&elsewhere).await;
    larder.get("/p/1").await;
    let reply = larder
        .request(purge_method, &larder.proxy_url("/p/1"), &[], Bytes::new())
        .await;
    assert_eq!(reply.status, 403);
    assert!(is_hit(&larder.get("/p/1").await));
}

// ---------------------------------------------------------------------------------------
// Cluster-wide purges

fn replica_yaml(origin: SocketAddr, admin: SocketAddr, purge: &str) -> String {
    config_yaml(origin, DEFAULT_TYPES).replace(
        "admin: { address: \"127.0.0.1:0\" }",
        &format!("admin: {{ address: \"{admin}\" }}\npurge: {purge}"),
    )
}

/// Three replicas whose admin servers listen on the same port of 127.0.0.2, .3 and .4 (as pods
/// of one Service would), found through `larder.test` on the test DNS server.
async fn three_replicas(origin: SocketAddr, dns: &TestDns, token: Option<&str>) -> Vec<Larder> {
    let ips = [2u8, 3, 4].map(|last| Ipv4Addr::new(127, 0, 0, last));
    // Known before any replica starts (A records carry no port), as in a real Service.
    *dns.answers.lock().unwrap() = ips.to_vec();
    'attempt: for _ in 0..20 {
        // An ephemeral port free on the first address is almost surely free on the others.
        let probe = std::net::TcpListener::bind((ips[0], 0)).unwrap();
        let port = probe.local_addr().unwrap().port();
        drop(probe);
        let purge = format!(
            "{{ peers: {{ dns: larder.test, port: {port}, nameserver: \"{}\", refresh_interval: 1h }}, fanout_timeout: 3s }}",
            dns.addr
        );
        let mut replicas = Vec::new();
        for ip in ips {
            let yaml = replica_yaml(origin, SocketAddr::from((ip, port)), &purge);
            let config = larder_config::load_str(&yaml, "test.yaml").unwrap();
            let options = larder::StartOptions {
                admin_token: token.map(str::to_owned),
            };
            match larder::start(config, options).await {
                Ok(server) => replicas.push(Larder {
                    server,
                    client: client(),
                }),
                Err(_) => continue 'attempt,
            }
        }
        return replicas;
    }
    panic!("no common free admin port on 127.0.0.2-4");
}

#[tokio::test]
async fn a_tag_purge_at_one_replica_reaches_all_three_through_dns() {
    let origin = tagging_origin().await;
    let dns = TestDns::start("larder.test", Vec::new()).await;
    let replicas = three_replicas(origin.addr, &dns, Some("cluster-token")).await;
    for larder in &replicas {
        for path in ["/p/1", "/p/2"] {
            larder.get(path).await;
            assert!(is_hit(&larder.get(path).await));
        }
    }
    let auth = [("authorization", "Bearer cluster-token")];
    let reply = replicas[1]
        .admin(Method::POST, "/purge?tag=product-1", &auth)
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let json = reply.json();
    assert_eq!(json["purged"], 1);
    let peers = json["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 3, "{json}");
    let mut statuses: Vec<&str> = peers
        .iter()
        .map(|p| p["status"].as_str().unwrap())
        .collect();
    statuses.sort();
    assert_eq!(statuses, ["itself", "ok", "ok"], "{json}");
    for peer in peers.iter().filter(|p| p["status"] == "ok") {
        assert_eq!(peer["purged"], 1, "{json}");
    }
    for (i, larder) in replicas.iter().enumerate() {
        assert!(
            !is_hit(&larder.get("/p/1").await),
            "replica {i} still has /p/1"
        );
        assert!(is_hit(&larder.get("/p/2").await), "replica {i} lost /p/2");
    }
    // Each replica applied it once, and only the first relayed it.
    let relayed_metric = r#"larder_purge_requests_total{source="peer",result="ok"}"#;
    for (i, larder) in replicas.iter().enumerate() {
        let metrics = larder.metrics().await;
        let expected = if i == 1 { None } else { Some(1.0) };
        assert_eq!(metric(&metrics, relayed_metric), expected, "replica {i}");
    }
}

#[tokio::test]
async fn a_down_peer_is_retried_and_reported_without_holding_the_caller() {
    let origin = tagging_origin().await;
    // Refuses connections: nothing listens there any more.
    let refused = closed_address();
    // Accepts connections and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            held.push(stream);
        }
    });
    let live = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    live.get("/p/1").await;
    let purge = format!(
        "{{ peers: {{ static: [\"{refused}\", \"{silent_addr}\", \"{}\"] }}, fanout_timeout: 1500ms, fanout_retries: 2 }}",
        live.server.admin_addr
    );
    let yaml = replica_yaml(origin.addr, "127.0.0.1:0".parse().unwrap(), &purge);
    let larder = Larder::start(&yaml).await;
    larder.get("/p/1").await;

    let started = Instant::now();
    let reply = larder.admin(Method::POST, "/purge?tag=all", &[]).await;
    let waited = started.elapsed();
    assert_eq!(reply.status, 502, "{}", reply.text());
    let json = reply.json();
    assert_eq!(json["purged"], 1, "applied here regardless");
    let peer = |addr: SocketAddr| {
        json["peers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["peer"] == addr.to_string())
            .unwrap_or_else(|| panic!("{addr} missing from {json}"))
            .clone()
    };
    let down = peer(refused);
    assert_eq!(down["status"], "failed", "{json}");
    assert_eq!(down["attempts"], 3, "first try and two retries: {json}");
    assert_eq!(peer(silent_addr)["status"], "timeout", "{json}");
    let ok = peer(live.server.admin_addr);
    assert_eq!(ok["status"], "ok", "{json}");
    assert_eq!(ok["purged"], 1);
    assert!(!is_hit(&live.get("/p/1").await), "the live peer purged");
    // The deadline bounds the wait, whatever the silent peer does.
    assert!(waited < Duration::from_millis(1500 + 1000), "{waited:?}");

    let metrics = larder.metrics().await;
    let failures = format!(r#"larder_purge_fanout_failures_total{{peer="{refused}"}}"#);
    assert_eq!(metric(&metrics, &failures), Some(1.0), "{metrics}");
    assert_eq!(
        metric(
            &metrics,
            r#"larder_purge_requests_total{source="admin",result="partial"}"#
        ),
        Some(1.0)
    );
    holder.abort();
}

#[tokio::test]
async fn peer_discovery_follows_dns_changes_and_keeps_the_list_on_failure() {
    let mut dns = TestDns::start(
        "peers.test",
        vec![Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2)],
    )
    .await;
    let config = larder_config::Peers {
        dns: Some("peers.test".into()),
        port: 9901,
        nameserver: Some(dns.addr),
        r#static: vec!["10.0.0.9:9901".parse().unwrap()],
        ..Default::default()
    };
    let peers = larder_purge::PeerSet::new(&config).unwrap();
    let addrs =
        |list: &[&str]| -> Vec<SocketAddr> { list.iter().map(|a| a.parse().unwrap()).collect() };
    // Before the first resolution only the static peer is known; `current` waits for it.
    assert_eq!(peers.snapshot(), addrs(&["10.0.0.9:9901"]));
    assert_eq!(peers.refresh().await, Ok(2));
    assert_eq!(
        peers.current(Instant::now()).await,
        addrs(&["10.0.0.9:9901", "10.0.0.1:9901", "10.0.0.2:9901"])
    );
    // A replica leaves, another joins: the next resolution sees it (no cached answer).
    *dns.answers.lock().unwrap() = vec![Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 3)];
    assert_eq!(peers.refresh().await, Ok(2));
    assert_eq!(
        peers.snapshot(),
        addrs(&["10.0.0.9:9901", "10.0.0.2:9901", "10.0.0.3:9901"])
    );
    // Every replica gone: an empty answer means no peers, not an error.
    dns.answers.lock().unwrap().clear();
    assert_eq!(peers.refresh().await, Ok(0));
    assert_eq!(peers.snapshot(), addrs(&["10.0.0.9:9901"]));
    // The DNS server itself gone: the last list stays.
    *dns.answers.lock().unwrap() = vec![Ipv4Addr::new(10, 0, 0, 4)];
    assert_eq!(peers.refresh().await, Ok(1));
    let server = std::mem::replace(&mut dns.task, tokio::spawn(async {}));
    server.abort();
    let _ = server.await;
    assert!(peers.refresh().await.is_err());
    assert_eq!(peers.snapshot(), addrs(&["10.0.0.9:9901", "10.0.0.4:9901"]));
}

#[tokio::test]
async fn peers_behind_an_unresolvable_name_are_reported_not_assumed_reached() {
    let origin = tagging_origin().await;
    // A nameserver address nothing answers on.
    let silent_dns = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let purge = format!(
        "{{ peers: {{ dns: larder.test, nameserver: \"{silent_dns}\" }}, fanout_timeout: 1s }}"
    );
    let yaml = replica_yaml(origin.addr, "127.0.0.1:0".parse().unwrap(), &purge);
    let larder = Larder::start(&yaml).await;
    larder.get("/p/1").await;
    let reply = larder.admin(Method::POST, "/purge?tag=all", &[]).await;
    assert_eq!(reply.status, 502, "{}", reply.text());
    let json = reply.json();
    assert_eq!(json["purged"], 1, "applied here regardless");
    assert_eq!(json["peers"][0]["peer"], "dns:larder.test", "{json}");
    assert_eq!(json["peers"][0]["status"], "failed", "{json}");
}

#[tokio::test]
async fn a_relayed_purge_needs_well_formed_ids() {
    let origin = tagging_origin().await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    larder.get("/p/1").await;
    let long = "x".repeat(65);
    for headers in [
        vec![("x-larder-relayed-by", "peer-1")],
        vec![
            ("x-larder-relayed-by", "peer-1"),
            ("x-larder-purge-id", long.as_str()),
        ],
        vec![
            ("x-larder-relayed-by", "bad id"),
            ("x-larder-purge-id", "abc"),
        ],
    ] {
        let reply = larder.admin(Method::POST, "/purge?tag=all", &headers).await;
        assert_eq!(reply.status, 400, "{headers:?}");
    }
    assert!(is_hit(&larder.get("/p/1").await));
    let relayed = [
        ("x-larder-relayed-by", "peer-1"),
        ("x-larder-purge-id", "abc123"),
    ];
    let reply = larder.admin(Method::POST, "/purge?tag=all", &relayed).await;
    assert_eq!(reply.status, 200);
    assert!(
        reply.json().get("peers").is_none(),
        "a relayed purge goes no further"
    );
    // The same id again is applied once.
    larder.get("/p/1").await;
    let again = larder.admin(Method::POST, "/purge?tag=all", &relayed).await;
    assert_eq!(again.json()["duplicate"], true);
    assert!(is_hit(&larder.get("/p/1").await));
}

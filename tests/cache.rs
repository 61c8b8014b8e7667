//! The cache as a client sees it through the real proxy: RFC 9111 behaviour, coalescing, purge,
//! budgets, and what must never be shared.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Method;

#[tokio::test]
async fn miss_then_hit_with_age_and_cache_status() {
    let origin = Origin::fixed(
        200,
        &[
            ("cache-control", "max-age=60"),
            ("content-type", "text/plain"),
        ],
        "hello",
    )
    .await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;

    let first = larder.get("/a").await;
    assert_eq!(first.status, 200);
    assert_eq!(first.text(), "hello");
    first.assert_cache_status("fwd=uri-miss");
    assert!(first.cache_status().contains("stored"));

    let second = larder.get("/a").await;
    assert_eq!(second.text(), "hello");
    assert!(
        second.cache_status().starts_with("larder; hit"),
        "{}",
        second.cache_status()
    );
    assert!(second.header("age").parse::<u64>().is_ok());
    assert_eq!(second.header("content-length"), "5");
    assert_eq!(origin.count(), 1);

    // A different path, or query, is a different object.
    larder.get("/a?x=1").await;
    larder.get("/b").await;
    assert_eq!(origin.count(), 3);
}

#[tokio::test]
async fn section_4_2_ttl_expiry_refetches() {
    // Three seconds, not one: Date has whole seconds, so a response stored late in a second
    // is already most of a second old, and a one-second lifetime could end before the hit.
    let origin = Origin::fixed(200, &[("cache-control", "max-age=3")], "short-lived").await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    larder.get("/t").await;
    assert!(larder.get("/t").await.cache_status().contains("hit"));
    // Expiry is time passing; poll (bounded) until the stored response goes stale.
    let mut refetched = false;
    for _ in 0..80 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if larder.get("/t").await.cache_status().contains("fwd=") {
            refetched = true;
            break;
        }
    }
    assert!(refetched, "stored response never expired");
    assert_eq!(origin.count(), 2);
}

#[tokio::test]
async fn section_4_2_3_upstream_age_counts_against_freshness() {
    // Age beyond max-age: stale on arrival, so the next request goes to the origin again.
    let origin = Origin::fixed(
        200,
        &[
            ("cache-control", "max-age=60"),
            ("age", "120"),
            ("etag", "\"v\""),
        ],
        "old",
    )
    .await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    larder.get("/aged").await;
    larder.get("/aged").await;
    assert_eq!(origin.count(), 2);
}

#[tokio::test]
async fn configured_ttl_applies_when_origin_gives_none() {
    let origin = Origin::fixed(200, &[], "no headers").await;
    let types =
        "resource_types:\n  - name: default\n    config: { ttl: 300s, cache_size: 16MiB }\n";
    let larder = Larder::start(&config_yaml(origin.addr, types)).await;
    larder.get("/x").await;
    let hit = larder.get("/x").await;
    assert!(hit.cache_status().contains("hit"), "{}", hit.cache_status());
    assert!(hit.cache_status().contains("ttl=300") || hit.cache_status().contains("ttl=299"));
    assert_eq!(origin.count(), 1);
}

#[tokio::test]
async fn section_4_1_vary_selects_variants() {
    let origin = Origin::start(|seen| async move {
        let lang = seen.header("accept-language");
        response(
            200,
            &[("cache-control", "max-age=60"), ("vary", "Accept-Language")],
            format!("lang={lang}"),
        )
    })
    .await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    assert_eq!(
        larder
            .get_with("/v", &[("accept-language", "en")])
            .await
            .text(),
        "lang=en"
    );
    assert_eq!(
        larder
            .get_with("/v", &[("accept-language", "fr")])
            .await
            .text(),
        "lang=fr"
    );
    let en = larder.get_with("/v", &[("Accept-Language", "en")]).await;
    assert_eq!(en.text(), "lang=en");
    assert!(en.cache_status().contains("hit"));
    assert_eq!(larder.get("/v").await.text(), "lang=");
    assert_eq!(origin.count(), 3);
}

#[tokio::test]
async fn section_4_1_vary_star_is_never_reused() {
    let origin = Origin::fixed(200, &[("cache-control", "max-age=60"), ("vary", "*")], "x").await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    larder.get("/s").await;
    let second = larder.get("/s").await;
    second.assert_cache_status("detail=vary_star");
    assert_eq!(origin.count(), 2);
}

#[tokio::test]
async fn section_4_3_revalidation_with_304_merges_headers() {
    let version = Arc::new(AtomicUsize::new(0));
    let v = version.clone();
    let origin = Origin::start(move |seen| {
        let n = v.fetch_add(1, Ordering::SeqCst);
        async move {
            if seen
                .headers
                .get("if-none-match")
                .is_some_and(|t| t == "\"etag-1\"")
            {
                response(
                    304,
                    &[
                        ("cache-control", "max-age=0"),
                        ("etag", "\"etag-1\""),
                        ("x-revision", &n.to_string()),
                    ],
                    "",
                )
            } else {
                response(
                    200,
                    &[
                        ("cache-control", "max-age=0"),
                        ("etag", "\"etag-1\""),
                        ("x-revision", "0"),
                    ],
                    "payload",
                )
            }
        }
    })
    .await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    let first = larder.get("/r").await;
    assert_eq!(first.text(), "payload");
    // max-age=0 with a validator: every use revalidates, and a 304 keeps the stored body.
    let second = larder.get("/r").await;
    assert_eq!(second.status, 200);
    assert_eq!(second.text(), "payload");
    second.assert_cache_status("fwd=stale");
    assert!(second.cache_status().contains("fwd-status=304"));
    assert_eq!(
        second.header("x-revision"),
        "1",
        "304's headers replace the stored ones"
    );
    assert_eq!(origin.last().headers["if-none-match"], "\"etag-1\"");
    assert_eq!(origin.count(), 2);
}

#[tokio::test]
async fn conditional_client_requests_get_304_from_cache() {
    let origin = Origin::fixed(
        200,
        &[("cache-control", "max-age=60"), ("etag", "\"abc\"")],
        "body",
    )
    .await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    // A conditional miss still fills the cache with the full response.
    let first = larder.get_with("/c", &[("if-none-match", "\"abc\"")]).await;
    assert_eq!(first.status, 304);
    let hit = larder
        .get_with("/c", &[("if-none-match", "W/\"abc\"")])
        .await;
    assert_eq!(hit.status, 304);
    assert!(hit.body.is_empty());
    assert_eq!(hit.header("etag"), "\"abc\"");
    let full = larder.get("/c").await;
    assert_eq!((full.status.as_u16(), full.text().as_str()), (200, "body"));
    let other = larder.get_with("/c", &[("if-none-match", "\"zzz\"")]).await;
    assert_eq!(other.status, 200);
    assert_eq!(
        origin.count(),
        1,
        "the origin never sees the client's conditionals"
    );
}

#[tokio::test]
async fn head_is_served_from_the_get_entry() {
    let origin = Origin::fixed(200, &[("cache-control", "max-age=60")], "twelve bytes").await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    larder.get("/h").await;
    let head = larder
        .request(Method::HEAD, &larder.proxy_url("/h"), &[], Bytes::new())
        .await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-length"), "12");
    assert!(head.cache_status().contains("hit"));
    assert_eq!(origin.count(), 1);
}

#[tokio::test]
async fn fifty_concurrent_misses_make_one_origin_request() {
    let origin = Origin::start(|_| async {
        // Slow enough that all fifty arrive while the first fill is in flight.
        tokio::time::sleep(Duration::from_millis(300)).await;
        response(200, &[("cache-control", "max-age=60")], "coalesced body")
    })
    .await;
    let larder = Arc::new(Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await);
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let larder = larder.clone();
        tasks.push(tokio::spawn(async move { larder.get("/popular").await }));
    }
    let mut collapsed = 0;
    for task in tasks {
        let reply = task.await.unwrap();
        assert_eq!(reply.status, 200);
        assert_eq!(reply.text(), "coalesced body");
        if reply.cache_status().contains("collapsed") {
            collapsed += 1;
        }
    }
    assert_eq!(origin.count(), 1);
    assert!(collapsed > 0);
    let metrics = larder.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            r#"larder_cache_lookups_total{resource_type="default",result="miss"}"#
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn uncacheable_responses_do_not_queue_behind_each_other() {
    let origin = Origin::fixed(200, &[("cache-control", "no-store")], "fresh every time").await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    larder.get("/dyn").await;
    let second = larder.get("/dyn").await;
    second.assert_cache_status("detail=response_no_store");
    assert_eq!(origin.count(), 2);
}

/// Hit-for-miss, not hit-for-pass: a key proven uncacheable is still fetched for the cache,
/// so the first storable answer is stored (as Varnish does).
#[tokio::test]
async fn a_key_proven_uncacheable_is_stored_once_its_answer_may_be() {
    let answered = Arc::new(AtomicUsize::new(0));
    let origin = Origin::start({
        let answered = answered.clone();
        move |_seen| {
            let n = answered.fetch_add(1, Ordering::SeqCst);
            async move {
                let cache_control = if n == 0 { "no-store" } else { "max-age=600" };
                response(200, &[("cache-control", cache_control)], "body")
            }
        }
    })
    .await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    larder
        .get("/turns")
        .await
        .assert_cache_status("detail=response_no_store");
    let second = larder.get("/turns").await;
    second.assert_cache_status("fwd=uri-miss; fwd-status=200; stored");
    let third = larder.get("/turns").await;
    third.assert_cache_status("hit");
    assert_eq!(third.text(), "body");
    assert_eq!(origin.count(), 2);
}

#[tokio::test]
async fn purge_removes_every_variant_then_misses() {
    let origin = Origin::start(|seen| async move {
        let enc = seen.header("accept-encoding");
        response(
            200,
            &[
                ("cache-control", "max-age=600"),
                ("vary", "accept-encoding"),
            ],
            enc,
        )
    })
    .await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    for enc in ["gzip", "br"] {
        larder
            .get_with(
                "/data/1",
                &[("host", "example.com"), ("accept-encoding", enc)],
            )
            .await;
    }
    assert!(
        larder
            .get_with(
                "/data/1",
                &[("host", "example.com"), ("accept-encoding", "br")]
            )
            .await
            .cache_status()
            .contains("hit")
    );

    let purged = larder
        .admin(
            Method::POST,
            "/purge?hostname=example.com&path=/data/1",
            &[],
        )
        .await;
    assert_eq!(purged.status, 200);
    assert_eq!(purged.json()["purged"], 2);
    let after = larder
        .get_with(
            "/data/1",
            &[("host", "example.com"), ("accept-encoding", "br")],
        )
        .await;
    after.assert_cache_status("fwd=uri-miss");
    assert_eq!(origin.count(), 3);

    let again = larder
        .admin(
            Method::POST,
            "/purge?hostname=example.com&path=/nothing",
            &[],
        )
        .await;
    assert_eq!(again.status, 404);
    assert_eq!(again.json()["purged"], 0);
    let bad = larder
        .admin(Method::POST, "/purge?hostname=example.com", &[])
        .await;
    assert_eq!(bad.status, 400);
    let metrics = larder.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            r#"larder_purges_total{kind="url",result="purged"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&metrics, r#"larder_purged_objects_total{kind="url"}"#),
        Some(2.0)
    );
}

#[tokio::test]
async fn cache_key_includes_the_host() {
    let origin = Origin::start(|seen| async move {
        let host = seen.headers["host"].to_str().unwrap().to_owned();
        response(200, &[("cache-control", "max-age=60")], host)
    })
    .await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    assert_eq!(
        larder
            .get_with("/same", &[("host", "a.example")])
            .await
            .text(),
        "a.example"
    );
    assert_eq!(
        larder
            .get_with("/same", &[("host", "b.example")])
            .await
            .text(),
        "b.example"
    );
    assert_eq!(
        larder
            .get_with("/same", &[("host", "A.EXAMPLE")])
            .await
            .text(),
        "a.example"
    );
    assert_eq!(origin.count(), 2);
}

#[tokio::test]
async fn budget_evicts_within_resource_type() {
    static OBJECT: [u8; 32 * 1024] = [b'o'; 32 * 1024];
    let origin = Origin::start(|_| async {
        response(200, &[("cache-control", "max-age=600")], &OBJECT[..])
    })
    .await;
    let types = "resource_types:\n  - name: small\n    config: { cache_size: 1MiB, max_object_size: 64KiB }\n";
    let larder = Larder::start(&config_yaml(origin.addr, types)).await;
    for i in 0..100 {
        assert_eq!(
            larder.get(&format!("/obj/{i}")).await.body.len(),
            OBJECT.len()
        );
    }
    let metrics = larder.metrics().await;
    let bytes = metric(
        &metrics,
        r#"larder_cache_size_bytes{resource_type="small"}"#,
    )
    .unwrap();
    let evictions = metric(
        &metrics,
        r#"larder_cache_evictions_total{resource_type="small"}"#,
    )
    .unwrap();
    let objects = metric(&metrics, r#"larder_cache_objects{resource_type="small"}"#).unwrap();
    assert!(bytes <= (1 << 20) as f64, "{bytes} bytes stored");
    assert!(
        bytes >= objects * OBJECT.len() as f64,
        "weights count the body"
    );
    assert!(
        evictions > 0.0 && objects < 100.0,
        "{evictions} evictions, {objects} objects"
    );
    assert_eq!(
        metric(
            &metrics,
            r#"larder_cache_capacity_bytes{resource_type="small"}"#
        ),
        Some((1 << 20) as f64)
    );
}

#[tokio::test]
async fn objects_over_max_object_size_stream_through_uncached() {
    static BIG: [u8; 100 * 1024] = [b'b'; 100 * 1024];
    let origin =
        Origin::start(|_| async { response(200, &[("cache-control", "max-age=600")], &BIG[..]) })
            .await;
    let types = "resource_types:\n  - name: small\n    config: { cache_size: 1MiB, max_object_size: 64KiB }\n";
    let larder = Larder::start(&config_yaml(origin.addr, types)).await;
    assert_eq!(larder.get("/big").await.body.len(), BIG.len());
    let second = larder.get("/big").await;
    assert_eq!(second.body.len(), BIG.len());
    second.assert_cache_status("detail=too_large");
    assert_eq!(origin.count(), 2);
}

#[tokio::test]
async fn private_no_store_cookies_and_authorization_are_never_shared() {
    // The origin answers with the caller's identity: any reuse would leak it to the next user.
    let origin = Origin::start(|seen| async move {
        let user = seen.header("x-user");
        let cc = match seen.uri.path() {
            "/private" => "private, max-age=600",
            "/no-store" => "no-store, max-age=600",
            // A cookie without explicit freshness from the origin: a default ttl never applies.
            "/cookie" => "",
            _ => "max-age=600",
        };
        let mut headers = vec![("cache-control", cc)];
        if seen.uri.path() == "/cookie" {
            headers.push(("set-cookie", "session=secret"));
        }
        response(200, &headers, format!("data of {user}"))
    })
    .await;
    let types = "resource_types:\n  - name: default\n    config: { cache_size: 16MiB, ttl: 1h }\n";
    let larder = Larder::start(&config_yaml(origin.addr, types)).await;
    for path in ["/private", "/no-store", "/cookie"] {
        assert_eq!(
            larder.get_with(path, &[("x-user", "alice")]).await.text(),
            "data of alice"
        );
        let bob = larder.get_with(path, &[("x-user", "bob")]).await;
        assert_eq!(bob.text(), "data of bob", "{path} leaked");
        assert!(
            bob.cache_status().contains("fwd="),
            "{path}: {}",
            bob.cache_status()
        );
    }
    // Authorization: a response without public/s-maxage/must-revalidate is not shared.
    let alice = larder
        .get_with(
            "/account",
            &[("x-user", "alice"), ("authorization", "Bearer alice")],
        )
        .await;
    assert_eq!(alice.text(), "data of alice");
    assert!(alice.cache_status().contains("detail=authorization"));
    assert_eq!(
        larder
            .get_with("/account", &[("x-user", "bob")])
            .await
            .text(),
        "data of bob"
    );
    assert_eq!(origin.count(), 8);
}

#[tokio::test]
async fn truncated_upstream_body_is_never_stored() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A raw origin that promises 100 bytes, sends 10, and hangs up.
    let origin = RawOrigin::start(|mut stream| async move {
        let mut buf = [0u8; 4096];
        let _ = stream.read(&mut buf).await;
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\ncache-control: max-age=600\r\ncontent-length: 100\r\n\r\n0123456789")
            .await;
        let _ = stream.shutdown().await;
    })
    .await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    let client = client();
    for _ in 0..2 {
        let response = client
            .request(
                http::Request::get(larder.proxy_url("/cut"))
                    .body(http_body_util::Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        use http_body_util::BodyExt;
        assert!(
            response.into_body().collect().await.is_err(),
            "a cut body must reach the client as an error"
        );
    }
    assert_eq!(origin.connections(), 2, "the truncated response was stored");
}

#[tokio::test]
async fn a_body_arriving_after_its_head_streams_to_the_client_and_is_stored_whole() {
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A raw origin that sends the head with the body's first half, then the rest only once the
    // client has read that half: the fill takes the first part at once and must go on reading.
    let rest = Arc::new(tokio::sync::Notify::new());
    let origin_rest = rest.clone();
    let origin = RawOrigin::start(move |mut stream| {
        let rest = origin_rest.clone();
        async move {
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf).await;
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncache-control: max-age=600\r\ncontent-length: 10\r\n\r\nfirst")
                .await;
            rest.notified().await;
            let _ = stream.write_all(b"-rest").await;
            // Held open: the body ends by its length.
            let _ = stream.read(&mut buf).await;
        }
    })
    .await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    let response = client()
        .request(
            http::Request::get(larder.proxy_url("/parts"))
                .body(http_body_util::Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = response.into_body();
    let mut got = Vec::new();
    while got.len() < 5 {
        let frame = body.frame().await.expect("more body").expect("body frame");
        got.extend_from_slice(&frame.into_data().unwrap_or_default());
    }
    assert_eq!(
        got, b"first",
        "the first part reaches the client before the rest is sent"
    );
    rest.notify_one();
    got.extend_from_slice(&body.collect().await.unwrap().to_bytes());
    assert_eq!(got, b"first-rest");
    let again = larder.get("/parts").await;
    assert_eq!(again.text(), "first-rest");
    assert!(
        again.cache_status().starts_with("larder; hit"),
        "{}",
        again.cache_status()
    );
    assert_eq!(origin.connections(), 1);
}

#[tokio::test]
async fn a_body_read_whole_with_its_head_reaches_the_client_in_order_stored_or_too_large() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Four chunks of 1,000 distinct bytes, sent with the head in one write: the fill reads them
    // on the client's task and hands the client the body whole when it is stored. Under a 1 KiB
    // object limit the body proves too large to store only as it is read (no Content-Length).
    let body: Vec<u8> = (0..4000u32).map(|i| (i % 251) as u8).collect();
    let mut reply =
        b"HTTP/1.1 200 OK\r\ncache-control: max-age=600\r\ntransfer-encoding: chunked\r\n\r\n"
            .to_vec();
    for chunk in body.chunks(1000) {
        reply.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        reply.extend_from_slice(chunk);
        reply.extend_from_slice(b"\r\n");
    }
    reply.extend_from_slice(b"0\r\n\r\n");
    let reply = Arc::new(reply);
    let origin = RawOrigin::start(move |mut stream| {
        let reply = reply.clone();
        async move {
            let mut buf = [0u8; 4096];
            while stream.read(&mut buf).await.is_ok_and(|n| n > 0) {
                if stream.write_all(&reply).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    for (limit, stored) in [("64KiB", true), ("1KiB", false)] {
        let types = format!(
            "resource_types:\n  - name: default\n    config: {{ cache_size: 1MiB, max_object_size: {limit} }}\n"
        );
        let larder = Larder::start(&config_yaml(origin.addr, &types)).await;
        let first = larder.get("/whole").await;
        assert_eq!(first.body, body, "limit {limit}: first answer");
        let second = larder.get("/whole").await;
        assert_eq!(second.body, body, "limit {limit}: second answer");
        let status = second.cache_status();
        // Without a declared length the head goes out before the body proves too large, so
        // only the second answer tells: asked of the origin again.
        assert_eq!(status.starts_with("larder; hit"), stored, "{status}");
        assert_eq!(status.contains("fwd=uri-miss"), !stored, "{status}");
    }
}

#[tokio::test]
async fn only_if_cached_answers_504_when_nothing_is_stored() {
    let origin = Origin::fixed(200, &[("cache-control", "max-age=60")], "x").await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    let reply = larder
        .get_with("/o", &[("cache-control", "only-if-cached")])
        .await;
    assert_eq!(reply.status, 504);
    assert_eq!(origin.count(), 0);
    larder.get("/o").await;
    assert_eq!(
        larder
            .get_with("/o", &[("cache-control", "only-if-cached")])
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn request_no_cache_revalidates_and_unsafe_methods_invalidate() {
    let origin = Origin::fixed(200, &[("cache-control", "max-age=600")], "v").await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    larder.get("/u").await;
    larder
        .get_with("/u", &[("cache-control", "no-cache")])
        .await;
    assert_eq!(origin.count(), 2, "request no-cache goes to the origin");
    assert!(larder.get("/u").await.cache_status().contains("hit"));
    let put = larder
        .request(
            Method::PUT,
            &larder.proxy_url("/u"),
            &[],
            Bytes::from_static(b"new"),
        )
        .await;
    assert_eq!(put.status, 200);
    assert!(
        larder
            .get("/u")
            .await
            .cache_status()
            .contains("fwd=uri-miss"),
        "PUT must invalidate"
    );
}

#[tokio::test]
async fn resource_types_by_path_have_their_own_policy() {
    let origin = Origin::fixed(200, &[], "no freshness from origin").await;
    let types = r#"resource_types:
  - name: images
    match: { path_prefix: /img/ }
    config: { ttl: 1h, cache_size: 4MiB }
  - name: api
    match: { path_prefix: /api/ }
    config: { cache_size: 4MiB, cache_key: { query: sort } }
"#;
    let larder = Larder::start(&config_yaml(origin.addr, types)).await;
    larder.get("/img/a.png").await;
    assert!(
        larder
            .get("/img/a.png")
            .await
            .cache_status()
            .contains("hit")
    );
    // No ttl and no validator: api responses are not stored.
    larder.get("/api/x?b=2&a=1").await;
    assert!(
        larder
            .get("/api/x?a=1&b=2")
            .await
            .cache_status()
            .contains("detail=no_freshness")
    );
    // Nothing matches /other: not cached at all.
    assert!(
        larder
            .get("/other")
            .await
            .cache_status()
            .contains("detail=no_resource_type")
    );
    let metrics = larder.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            r#"larder_cache_lookups_total{resource_type="images",result="hit"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&metrics, r#"larder_cache_objects{resource_type="images"}"#),
        Some(1.0)
    );
}

#[tokio::test]
async fn query_sort_key_rule_shares_one_object() {
    let origin = Origin::fixed(200, &[("cache-control", "max-age=60")], "q").await;
    let types = "resource_types:\n  - name: default\n    config: { cache_size: 4MiB, cache_key: { query: sort } }\n";
    let larder = Larder::start(&config_yaml(origin.addr, types)).await;
    larder.get("/q?b=2&a=1").await;
    assert!(
        larder
            .get("/q?a=1&b=2")
            .await
            .cache_status()
            .contains("hit")
    );
    assert_eq!(origin.count(), 1);
}

#[tokio::test]
async fn a_client_that_never_reads_does_not_stall_the_fill_for_others() {
    use tokio::io::AsyncWriteExt;
    // Far more than loopback socket buffers absorb, so a blocked writer would really block.
    let body = Bytes::from(vec![b's'; 48 << 20]);
    let served = body.clone();
    let origin = Origin::start(move |_| {
        let body = served.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            response(200, &[("cache-control", "max-age=600")], body)
        }
    })
    .await;
    let types = "resource_types:\n  - name: default\n    config: { cache_size: 256MiB, max_object_size: 64MiB }\n";
    let yaml = config_yaml(origin.addr, types) + "cache: { coalesce_timeout: 5s }\n";
    let larder = Larder::start(&yaml).await;
    // The first client asks and then never reads a byte of its 48 MiB answer.
    let mut stalled = tokio::net::TcpStream::connect(larder.server.proxy_addrs[0])
        .await
        .unwrap();
    stalled
        .write_all(b"GET /big HTTP/1.1\r\nhost: example.com\r\n\r\n")
        .await
        .unwrap();
    // Wait until the origin has the stalled client's request, so the next one coalesces on it.
    for _ in 0..200 {
        if origin.count() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let other = larder.get_with("/big", &[("host", "example.com")]).await;
    assert_eq!(other.body.len(), body.len());
    assert!(
        other.cache_status().contains("hit"),
        "the second client should be served from the first fill: {}",
        other.cache_status()
    );
    assert_eq!(origin.count(), 1);
    drop(stalled);
}

#[tokio::test]
async fn a_purge_during_a_fill_wins_over_the_fill() {
    let origin = Origin::start(|_| async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        response(200, &[("cache-control", "max-age=600")], "old")
    })
    .await;
    let larder = Arc::new(Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await);
    let filling = {
        let larder = larder.clone();
        tokio::spawn(async move { larder.get_with("/racy", &[("host", "example.com")]).await })
    };
    for _ in 0..200 {
        if origin.count() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let purge = larder
        .admin(Method::POST, "/purge?hostname=example.com&path=/racy", &[])
        .await;
    assert_eq!(purge.json()["purged"], 0);
    assert_eq!(filling.await.unwrap().text(), "old");
    let after = larder.get_with("/racy", &[("host", "example.com")]).await;
    assert!(
        after.cache_status().contains("fwd=uri-miss"),
        "purged fill was stored: {}",
        after.cache_status()
    );
    assert_eq!(origin.count(), 2);
}

#[tokio::test]
async fn a_stored_404_is_never_turned_into_304() {
    let origin = Origin::fixed(
        404,
        &[("cache-control", "max-age=60"), ("etag", "\"gone\"")],
        "not here",
    )
    .await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    larder.get("/missing").await;
    let reply = larder
        .get_with("/missing", &[("if-none-match", "\"gone\"")])
        .await;
    assert_eq!(reply.status, 404);
    assert!(reply.cache_status().contains("hit"));
    assert_eq!(reply.text(), "not here");
}

#[tokio::test]
async fn set_cookie_policy_per_resource_type() {
    let origin = Origin::start(|seen| async move {
        let user = seen.header("x-user");
        let cookie = format!("session={user}");
        response(
            200,
            &[
                ("cache-control", "max-age=600"),
                ("set-cookie", cookie.as_str()),
            ],
            format!("page for {user}"),
        )
    })
    .await;
    let types = r#"resource_types:
  - name: strict
    match: { path_prefix: /strict/ }
    config: { cache_size: 4MiB, set_cookie: bypass }
  - name: stripped
    match: { path_prefix: /strip/ }
    config: { cache_size: 4MiB, set_cookie: strip }
  - name: rfc
    match: { path_prefix: /rfc/ }
    config: { cache_size: 4MiB, set_cookie: store }
  - name: default
    config: { cache_size: 4MiB }
"#;
    let larder = Larder::start(&config_yaml(origin.addr, types)).await;
    // bypass: never stored.
    larder.get_with("/strict/a", &[("x-user", "alice")]).await;
    let bob = larder.get_with("/strict/a", &[("x-user", "bob")]).await;
    assert_eq!(bob.header("set-cookie"), "session=bob");
    assert!(bob.cache_status().contains("detail=set_cookie"));
    // strip: the shared body is stored, the cookie never reaches another user.
    assert_eq!(
        larder
            .get_with("/strip/a", &[("x-user", "alice")])
            .await
            .header("set-cookie"),
        "session=alice"
    );
    let bob = larder.get_with("/strip/a", &[("x-user", "bob")]).await;
    assert!(bob.cache_status().contains("hit"));
    assert!(bob.headers.get("set-cookie").is_none());
    // store (RFC 9111 §3.1): explicit freshness from the origin makes it shareable.
    larder.get_with("/rfc/a", &[("x-user", "alice")]).await;
    let bob = larder.get_with("/rfc/a", &[("x-user", "bob")]).await;
    assert!(bob.cache_status().contains("hit"));
    assert_eq!(bob.header("set-cookie"), "session=alice");
    // The default is bypass: never stored, each user keeps their own cookie.
    larder.get_with("/page", &[("x-user", "alice")]).await;
    let bob = larder.get_with("/page", &[("x-user", "bob")]).await;
    assert_eq!(bob.header("set-cookie"), "session=bob");
    assert!(bob.cache_status().contains("detail=set_cookie"));
}

/// An origin answering every request with `HALF` bytes of `a` at once and `HALF` bytes of `b`
/// once the returned gate is opened, or an error in their place when `fail` is set.
async fn half_gated_origin(fail: bool) -> (Origin, Arc<tokio::sync::Notify>) {
    use http_body_util::BodyExt as _;
    let gate = Arc::new(tokio::sync::Notify::new());
    let origin = Origin::start({
        let gate = gate.clone();
        move |_| {
            let gate = gate.clone();
            async move {
                let first = futures_util::stream::iter([Ok::<_, BoxError>(
                    hyper::body::Frame::data(Bytes::from(vec![b'a'; HALF])),
                )]);
                let second = futures_util::stream::once(async move {
                    gate.notified().await;
                    if fail {
                        Err::<hyper::body::Frame<Bytes>, BoxError>("the origin failed".into())
                    } else {
                        Ok(hyper::body::Frame::data(Bytes::from(vec![b'b'; HALF])))
                    }
                });
                let body =
                    http_body_util::StreamBody::new(futures_util::StreamExt::chain(first, second))
                        .boxed_unsync();
                http::Response::builder()
                    .header("cache-control", "max-age=60")
                    .header("content-length", (2 * HALF).to_string())
                    .body(body)
                    .unwrap()
            }
        }
    })
    .await;
    (origin, gate)
}

const HALF: usize = 48 * 1024;

/// Sends a GET and reads its body until `want` bytes are in (bounded in time), returning the
/// response's Cache-Status, the bytes read and the rest of the body.
async fn get_until(
    larder: &Larder,
    path: &str,
    want: usize,
) -> (String, Vec<u8>, hyper::body::Incoming) {
    get_until_with(larder, path, &[], 200, want).await
}

/// [`get_until`] with request fields and the status expected.
async fn get_until_with(
    larder: &Larder,
    path: &str,
    fields: &[(&str, &str)],
    expected_status: u16,
    want: usize,
) -> (String, Vec<u8>, hyper::body::Incoming) {
    use http_body_util::BodyExt as _;
    let mut request = http::Request::get(larder.proxy_url(path));
    for (name, value) in fields {
        request = request.header(*name, *value);
    }
    let response = larder
        .client
        .request(
            request
                .body(http_body_util::Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), expected_status);
    let status = response
        .headers()
        .get("cache-status")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let mut body = response.into_body();
    let mut read = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while read.len() < want {
            let frame = body.frame().await.expect("body ended early").unwrap();
            if let Ok(data) = frame.into_data() {
                read.extend_from_slice(&data);
            }
        }
    })
    .await
    .expect("the bytes sent so far never arrived");
    (status, read, body)
}

async fn rest_of(mut read: Vec<u8>, body: hyper::body::Incoming) -> Result<Vec<u8>, String> {
    use http_body_util::BodyExt as _;
    let rest = body.collect().await.map_err(|e| e.to_string())?;
    read.extend_from_slice(&rest.to_bytes());
    Ok(read)
}

#[tokio::test]
async fn a_request_coalesced_on_a_fill_reads_its_body_as_it_arrives() {
    let (origin, gate) = half_gated_origin(false).await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    let (first_status, first, first_rest) = get_until(&larder, "/slow-big", HALF).await;
    assert!(first_status.contains("fwd=uri-miss"), "{first_status}");
    // The origin holds back the second half: the coalesced request gets the first half now,
    // not after the whole object (it would wait for that until coalesce_timeout).
    let (status, second, second_rest) = get_until(&larder, "/slow-big", HALF).await;
    assert!(status.contains("collapsed"), "{status}");
    gate.notify_one();
    let whole: Vec<u8> = [vec![b'a'; HALF], vec![b'b'; HALF]].concat();
    assert_eq!(rest_of(first, first_rest).await.unwrap(), whole);
    assert_eq!(rest_of(second, second_rest).await.unwrap(), whole);
    assert_eq!(origin.count(), 1);
    // Stored whole as well.
    let third = larder.get("/slow-big").await;
    third.assert_cache_status("hit");
    assert_eq!(third.body, whole);
    assert_eq!(origin.count(), 1);
}

#[tokio::test]
async fn a_fill_that_fails_midway_ends_the_coalesced_bodies_in_an_error() {
    let (origin, gate) = half_gated_origin(true).await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    let (_, first, first_rest) = get_until(&larder, "/breaks", HALF).await;
    let (status, second, second_rest) = get_until(&larder, "/breaks", HALF).await;
    assert!(status.contains("collapsed"), "{status}");
    gate.notify_one();
    // Cut short, never a short body taken for the whole one.
    assert!(rest_of(first, first_rest).await.is_err());
    assert!(rest_of(second, second_rest).await.is_err());
    // Nothing was stored: the next request asks the origin again.
    let before = origin.count();
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        let _ = get_until(&larder, "/breaks", HALF).await;
    })
    .await;
    assert_eq!(origin.count(), before + 1);
}

#[tokio::test]
async fn a_coalesced_request_never_reads_along_a_response_stored_under_another_key() {
    use http_body_util::BodyExt as _;
    // Requests coalesce under the key of the first type their path might match (`images`,
    // which ignores the query); the HTML answer lands in `default`, which keeps it. Bob's
    // request must not read Alice's page along.
    let gate = Arc::new(tokio::sync::Notify::new());
    let origin = Origin::start({
        let gate = gate.clone();
        move |seen| {
            let gate = gate.clone();
            let letter = if seen.uri.query() == Some("user=alice") {
                b'A'
            } else {
                b'B'
            };
            async move {
                let first = futures_util::stream::iter([Ok::<_, BoxError>(
                    hyper::body::Frame::data(Bytes::from(vec![letter; HALF])),
                )]);
                let second = futures_util::stream::once(async move {
                    gate.notified().await;
                    Ok::<_, BoxError>(hyper::body::Frame::data(Bytes::from(vec![letter; HALF])))
                });
                let body =
                    http_body_util::StreamBody::new(futures_util::StreamExt::chain(first, second))
                        .boxed_unsync();
                http::Response::builder()
                    .header("cache-control", "max-age=60")
                    .header("content-type", "text/html")
                    .header("content-length", (2 * HALF).to_string())
                    .body(body)
                    .unwrap()
            }
        }
    })
    .await;
    // A short coalescing wait: Bob, rightly kept waiting on Alice's unfinished fill, then asks
    // the origin himself.
    let types = "cache: { coalesce_timeout: 1s }\nresource_types:\n  - name: images\n    match: { content_type: \"image/*\" }\n    config: { cache_size: 8MiB, cache_key: { query: drop } }\n  - name: default\n    config: { cache_size: 8MiB }\n";
    let larder = Larder::start(&config_yaml(origin.addr, types)).await;
    let (_, alice, _alice_rest) = get_until(&larder, "/avatar?user=alice", HALF).await;
    assert!(alice.iter().all(|&b| b == b'A'));
    let (status, bob, _bob_rest) = get_until(&larder, "/avatar?user=bob", HALF).await;
    assert!(
        bob.iter().all(|&b| b == b'B'),
        "Bob got Alice's page ({status})"
    );
    assert!(!status.contains("collapsed"), "{status}");
    assert_eq!(origin.count(), 2);
}

#[tokio::test]
async fn an_answer_to_a_precondition_is_never_stored_for_everyone() {
    let origin = Origin::start(|seen| async move {
        if seen.headers.contains_key("if-match") || seen.headers.contains_key("if-unmodified-since")
        {
            response(
                412,
                &[("cache-control", "max-age=60")],
                "precondition failed",
            )
        } else {
            response(200, &[("cache-control", "max-age=60")], "the document")
        }
    })
    .await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    for (name, value) in [
        ("if-match", "\"v1\""),
        ("if-unmodified-since", "Sun, 06 Nov 1994 08:49:37 GMT"),
    ] {
        let failed = larder.get_with("/doc", &[(name, value)]).await;
        assert_eq!(failed.status, 412);
        failed.assert_cache_status("detail=precondition");
    }
    let plain = larder.get("/doc").await;
    assert_eq!(plain.status, 200);
    assert_eq!(plain.text(), "the document");
}

/// An origin whose "abcdef" is stored with a validator and no lifetime (every use revalidates:
/// 304 to its ETag), and which cuts its own ranges; and a Larder in front of it, the object
/// stored.
async fn always_revalidated() -> (Origin, Larder) {
    let origin = Origin::start(|seen| async move {
        let validated = [("etag", "\"v1\""), ("cache-control", "max-age=0")];
        if seen
            .headers
            .get("if-none-match")
            .is_some_and(|v| v == "\"v1\"")
        {
            response(304, &validated, "")
        } else if seen.headers.contains_key("range") {
            response(206, &[("content-range", "bytes 1-3/6")], "bcd")
        } else {
            response(200, &validated, "abcdef")
        }
    })
    .await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    assert_eq!(larder.get("/file").await.text(), "abcdef");
    (origin, larder)
}

#[tokio::test]
async fn a_range_request_for_a_stale_object_revalidates_it_and_gets_its_range() {
    let (origin, larder) = always_revalidated().await;
    let ranged = larder.get_with("/file", &[("range", "bytes=1-3")]).await;
    assert_eq!(ranged.status, 206);
    assert_eq!(ranged.text(), "bcd");
    ranged.assert_cache_status("fwd=stale");
    assert!(
        origin
            .requests()
            .iter()
            .all(|r| !r.headers.contains_key("range"))
    );
    // Still stored: the next use revalidates it again rather than passing.
    let again = larder.get("/file").await;
    assert_eq!(again.text(), "abcdef");
    again.assert_cache_status("fwd-status=304");
}

#[tokio::test]
async fn readers_along_keep_their_place_among_a_fills_waiters() {
    let (origin, _gate) = half_gated_origin(false).await;
    let types = format!("cache: {{ max_coalesced_waiters: 1 }}\n{DEFAULT_TYPES}");
    let larder = Larder::start(&config_yaml(origin.addr, &types)).await;
    let (_, _, _first_rest) = get_until(&larder, "/many", HALF).await;
    let (status, _, _second_rest) = get_until(&larder, "/many", HALF).await;
    assert!(status.contains("collapsed"), "{status}");
    // The one place is taken by the reader along: the next request fetches for itself.
    let (status, third, _third_rest) = get_until(&larder, "/many", HALF).await;
    assert!(status.contains("detail=coalesce_overflow"), "{status}");
    assert_eq!(third, vec![b'a'; HALF]);
    assert_eq!(origin.count(), 2);
}

/// A large body whose every byte tells its offset apart from its neighbours'.
fn patterned(len: usize) -> Bytes {
    (0..len)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<u8>>()
        .into()
}

#[tokio::test]
async fn a_range_miss_fetches_the_whole_object_once_and_gets_its_range_cut_from_it() {
    // Players and download managers ask in ranges from the first request: were range misses
    // passed, such an object would never be stored.
    let whole = patterned(200_000);
    let body = whole.clone();
    let origin = Origin::start(move |_| {
        let body = body.clone();
        async move {
            response(
                200,
                &[("cache-control", "max-age=600"), ("etag", "\"p\"")],
                body,
            )
        }
    })
    .await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;

    let ranged = larder
        .get_with("/video", &[("range", "bytes=70000-150001")])
        .await;
    assert_eq!(ranged.status, 206);
    assert_eq!(ranged.header("content-range"), "bytes 70000-150001/200000");
    assert_eq!(ranged.header("content-length"), "80002");
    assert_eq!(ranged.body, whole.slice(70000..=150001));
    ranged.assert_cache_status("fwd=uri-miss");
    ranged.assert_cache_status("stored");
    assert!(!origin.last().headers.contains_key("range"));

    // Stored whole: the next range and the whole body are hits.
    let suffix = larder.get_with("/video", &[("range", "bytes=-5")]).await;
    assert_eq!(
        (suffix.status.as_u16(), suffix.body.clone()),
        (206, whole.slice(199_995..))
    );
    suffix.assert_cache_status("hit");
    let plain = larder.get("/video").await;
    assert_eq!(plain.body, whole);
    plain.assert_cache_status("hit");
    assert_eq!(origin.count(), 1);
}

#[tokio::test]
async fn an_unsatisfiable_range_miss_gets_416_and_the_object_is_stored() {
    let origin = Origin::fixed(200, &[("cache-control", "max-age=600")], "0123456789").await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    let past_the_end = larder.get_with("/r", &[("range", "bytes=10-")]).await;
    assert_eq!(past_the_end.status, 416);
    assert_eq!(past_the_end.header("content-range"), "bytes */10");
    assert_eq!(past_the_end.text(), "");
    // The fill went on without this client.
    let plain = larder.get("/r").await;
    assert_eq!(plain.text(), "0123456789");
    plain.assert_cache_status("hit");
    assert_eq!(origin.count(), 1);
}

#[tokio::test]
async fn range_misses_of_what_cannot_be_stored_are_left_to_the_origin() {
    let origin = Origin::start(|seen| async move {
        match seen.headers.get("range") {
            Some(_) => response(
                206,
                &[
                    ("cache-control", "no-store"),
                    ("content-range", "bytes 2-3/10"),
                ],
                "23",
            ),
            None => response(200, &[("cache-control", "no-store")], "0123456789"),
        }
    })
    .await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    // Fetched whole for the cache, refused (no-store): asked again as the client asked.
    let first = larder.get_with("/live", &[("range", "bytes=2-3")]).await;
    assert_eq!(
        (
            first.status.as_u16(),
            first.text().as_str(),
            first.header("content-range")
        ),
        (206, "23", "bytes 2-3/10")
    );
    let seen = origin.requests();
    assert!(!seen[0].headers.contains_key("range"));
    assert_eq!(seen[1].header("range"), "bytes=2-3");
    // Marked hit-for-pass by the no-store answer: the next range goes to the origin at once.
    let second = larder.get_with("/live", &[("range", "bytes=2-3")]).await;
    assert_eq!(
        (second.status.as_u16(), second.text().as_str()),
        (206, "23")
    );
    assert_eq!(origin.count(), 3);
    assert_eq!(origin.last().header("range"), "bytes=2-3");
    second.assert_cache_status("detail=range_request");
}

#[tokio::test]
async fn a_range_miss_with_a_stale_if_range_gets_the_whole_body() {
    let origin = Origin::fixed(
        200,
        &[("cache-control", "max-age=600"), ("etag", "\"new\"")],
        "0123456789",
    )
    .await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    let reply = larder
        .get_with("/r", &[("range", "bytes=0-1"), ("if-range", "\"old\"")])
        .await;
    assert_eq!(
        (reply.status.as_u16(), reply.text().as_str()),
        (200, "0123456789")
    );
    assert_eq!(reply.header("content-range"), "");
}

#[tokio::test]
async fn a_range_coalesced_on_a_fill_is_cut_from_its_body_as_it_arrives() {
    let (origin, gate) = half_gated_origin(false).await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    let (_, first, first_rest) = get_until(&larder, "/big", HALF).await;
    // Within the half already in: whole before the origin sends the rest.
    let (status, early, early_rest) =
        get_until_with(&larder, "/big", &[("range", "bytes=100-109")], 206, 10).await;
    assert!(status.contains("collapsed"), "{status}");
    assert_eq!(early, vec![b'a'; 10]);
    assert_eq!(rest_of(early, early_rest).await.unwrap(), vec![b'a'; 10]);
    // Across the halves: the first part now, the rest once it arrives.
    let across = format!("bytes={}-{}", HALF - 4, HALF + 3);
    let (status, part, part_rest) =
        get_until_with(&larder, "/big", &[("range", &across)], 206, 4).await;
    assert!(status.contains("collapsed"), "{status}");
    gate.notify_one();
    assert_eq!(
        rest_of(part, part_rest).await.unwrap(),
        b"aaaabbbb".to_vec()
    );
    rest_of(first, first_rest).await.unwrap();
    assert_eq!(origin.count(), 1);
}

#[tokio::test]
async fn a_coalesced_request_is_counted_under_the_type_its_answer_is_stored_in() {
    // The path might be an image (the first type), so requests coalesce under that type's key;
    // the answer, not an image, is stored under `default`.
    let (origin, gate) = half_gated_origin(false).await;
    let types = "resource_types:\n  - name: images\n    match: { content_type: \"image/*\" }\n    config: { cache_size: 8MiB }\n  - name: default\n    config: { cache_size: 8MiB }\n";
    let larder = Larder::start(&config_yaml(origin.addr, types)).await;
    let (_, first, first_rest) = get_until(&larder, "/thing", HALF).await;
    let (status, second, second_rest) = get_until(&larder, "/thing", HALF).await;
    assert!(status.contains("collapsed"), "{status}");
    gate.notify_one();
    rest_of(first, first_rest).await.unwrap();
    rest_of(second, second_rest).await.unwrap();
    // Events are emitted as bodies end; the scrape may come just before the last one.
    let series = r#"larder_cache_lookups_total{resource_type="default",result="coalesced"}"#;
    let mut metrics = larder.metrics().await;
    for _ in 0..100 {
        if metric(&metrics, series).is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        metrics = larder.metrics().await;
    }
    assert_eq!(metric(&metrics, series), Some(1.0), "{metrics}");
    assert!(
        !metrics.contains(r#"resource_type="images",result="coalesced""#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_head_miss_fetches_the_object_for_the_cache_and_answers_with_its_head() {
    let origin = Origin::fixed(200, &[("cache-control", "max-age=60")], "twelve bytes").await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    let head = larder
        .request(Method::HEAD, &larder.proxy_url("/h"), &[], Bytes::new())
        .await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-length"), "12");
    head.assert_cache_status("stored");
    assert_eq!(origin.last().method, Method::GET);
    let get = larder.get("/h").await;
    assert_eq!(get.text(), "twelve bytes");
    assert!(get.cache_status().contains("hit"), "{}", get.cache_status());
    assert_eq!(origin.count(), 1);
}

#[tokio::test]
async fn head_misses_of_what_cannot_be_stored_go_to_the_origin_as_head_once_known() {
    let origin = Origin::fixed(200, &[("cache-control", "no-store")], "twelve bytes").await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    let first = larder
        .request(Method::HEAD, &larder.proxy_url("/live"), &[], Bytes::new())
        .await;
    assert_eq!((first.status.as_u16(), first.body.len()), (200, 0));
    assert_eq!(first.header("content-length"), "12");
    assert_eq!(origin.last().method, Method::GET);
    let second = larder
        .request(Method::HEAD, &larder.proxy_url("/live"), &[], Bytes::new())
        .await;
    assert_eq!((second.status.as_u16(), second.body.len()), (200, 0));
    assert_eq!(origin.last().method, Method::HEAD);
    second.assert_cache_status("detail=head_miss");
}

#[tokio::test]
async fn a_head_coalesced_on_a_fill_gets_the_head_without_waiting_for_the_body() {
    let (origin, gate) = half_gated_origin(false).await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    let (_, first, first_rest) = get_until(&larder, "/big", HALF).await;
    let head = larder
        .request(Method::HEAD, &larder.proxy_url("/big"), &[], Bytes::new())
        .await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-length"), (2 * HALF).to_string());
    head.assert_cache_status("collapsed");
    gate.notify_one();
    rest_of(first, first_rest).await.unwrap();
    assert_eq!(origin.count(), 1);
}

#[tokio::test]
async fn heads_and_ranges_with_credentials_go_to_the_origin_as_asked() {
    // Answers to credentials are rarely storable: no whole body is fetched for a head or a
    // range of one (anyone can add a junk Authorization to make a proxy do that).
    let origin = Origin::start(|seen| async move {
        match seen.headers.get("range") {
            Some(_) => response(206, &[("content-range", "bytes 0-0/10")], "0"),
            None => response(200, &[("cache-control", "max-age=60")], "0123456789"),
        }
    })
    .await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    let credentials = ("authorization", "Bearer junk");
    let ranged = larder
        .get_with("/big", &[("range", "bytes=0-0"), credentials])
        .await;
    assert_eq!((ranged.status.as_u16(), ranged.text().as_str()), (206, "0"));
    assert_eq!(origin.last().header("range"), "bytes=0-0");
    ranged.assert_cache_status("detail=range_request");
    let head = larder
        .request(
            Method::HEAD,
            &larder.proxy_url("/big"),
            &[credentials],
            Bytes::new(),
        )
        .await;
    assert_eq!(head.status, 200);
    assert_eq!(origin.last().method, Method::HEAD);
}

#[tokio::test]
async fn a_range_of_an_object_too_large_to_store_is_asked_again_as_the_client_asked() {
    let whole = patterned(4000);
    let body = whole.clone();
    let origin = Origin::start(move |seen| {
        let body = body.clone();
        async move {
            match seen.headers.get("range") {
                Some(_) => response(
                    206,
                    &[("content-range", "bytes 3000-3009/4000")],
                    body.slice(3000..3010),
                ),
                None => response(200, &[("cache-control", "max-age=60")], body),
            }
        }
    })
    .await;
    let types = "resource_types:\n  - name: default\n    config: { cache_size: 16MiB, max_object_size: 1KiB }\n";
    let larder = Larder::start(&config_yaml(origin.addr, types)).await;
    let ranged = larder
        .get_with("/huge", &[("range", "bytes=3000-3009")])
        .await;
    assert_eq!(ranged.status, 206);
    assert_eq!(ranged.body, whole.slice(3000..3010));
    assert_eq!(ranged.header("content-range"), "bytes 3000-3009/4000");
    ranged.assert_cache_status("fwd=uri-miss");
    ranged.assert_cache_status("detail=too_large");
    let seen = origin.requests();
    assert_eq!(seen.len(), 2);
    assert!(!seen[0].headers.contains_key("range"));
    assert_eq!(seen[1].header("range"), "bytes=3000-3009");
}

#[tokio::test]
async fn a_head_for_a_stale_object_revalidates_it_with_a_get() {
    let (origin, larder) = always_revalidated().await;
    let head = larder
        .request(Method::HEAD, &larder.proxy_url("/file"), &[], Bytes::new())
        .await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), "6");
    head.assert_cache_status("fwd-status=304");
    let seen = origin.last();
    assert_eq!(seen.method, Method::GET);
    assert_eq!(seen.header("if-none-match"), "\"v1\"");
    // Still stored: the next GET revalidates it too rather than fetching it whole.
    let again = larder.get("/file").await;
    assert_eq!(again.text(), "abcdef");
    again.assert_cache_status("fwd-status=304");
}

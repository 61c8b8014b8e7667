//! RFC 9111 / 5861 / 9213 / 9110 §14 behaviour through the real proxy, one test per rule, named
//! after the section it proves (see CONFORMANCE.md).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Method;

/// Polls (bounded) until the origin has seen `n` requests.
async fn wait_for_count(origin: &Origin, n: usize) {
    for _ in 0..400 {
        if origin.count() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("origin saw {} requests, expected {n}", origin.count());
}

/// An origin whose first answer is already stale on arrival (`Age` past `max-age`) with the
/// given extra directives, and whose later answers follow `later`.
async fn stale_first_origin(
    first_cc: &'static str,
    later: fn(usize) -> (u16, &'static str, Duration),
) -> Origin {
    let n = Arc::new(AtomicUsize::new(0));
    Origin::start(move |_| {
        let i = n.fetch_add(1, Ordering::SeqCst);
        async move {
            if i == 0 {
                return response(
                    200,
                    &[
                        ("cache-control", first_cc),
                        ("age", "20"),
                        ("etag", "\"v0\""),
                    ],
                    "v0",
                );
            }
            let (status, cc, delay) = later(i);
            tokio::time::sleep(delay).await;
            response(
                status,
                &[("cache-control", cc), ("etag", "\"v1\"")],
                format!("v{i}"),
            )
        }
    })
    .await
}

#[tokio::test]
async fn rfc5861_3_stale_while_revalidate_serves_stale_and_refreshes_once() {
    let origin = stale_first_origin("max-age=10, stale-while-revalidate=60", |_| {
        (200, "max-age=600", Duration::from_millis(200))
    })
    .await;
    let larder = Arc::new(Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await);
    assert_eq!(larder.get("/swr").await.text(), "v0");
    // Ten clients during the stale window: all get the stale copy at once, one refresh goes out.
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let larder = larder.clone();
        tasks.push(tokio::spawn(async move { larder.get("/swr").await }));
    }
    for task in tasks {
        let reply = task.await.unwrap();
        assert_eq!(reply.text(), "v0");
        reply.assert_cache_status("hit");
        assert!(
            reply
                .cache_status()
                .contains("detail=stale-while-revalidate")
        );
        assert!(
            reply.cache_status().contains("ttl=-"),
            "a stale hit has a negative ttl"
        );
    }
    wait_for_count(&origin, 2).await;
    // The refreshed response replaces the stale one.
    let mut refreshed = String::new();
    for _ in 0..100 {
        refreshed = larder.get("/swr").await.text();
        if refreshed != "v0" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(refreshed, "v1");
    assert_eq!(origin.count(), 2, "exactly one background refresh");
}

#[tokio::test]
async fn rfc5861_4_stale_if_error_on_5xx() {
    let origin = stale_first_origin("max-age=10, stale-if-error=600", |_| {
        (503, "no-store", Duration::ZERO)
    })
    .await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    larder.get("/sie").await;
    let reply = larder.get("/sie").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "v0");
    reply.assert_cache_status("fwd=stale");
    assert!(reply.cache_status().contains("fwd-status=503"));
    assert!(reply.cache_status().contains("detail=stale-if-error"));
}

#[tokio::test]
async fn rfc5861_4_stale_if_error_on_timeout_from_resource_type_config() {
    let origin = stale_first_origin("max-age=10", |_| {
        (200, "max-age=60", Duration::from_secs(3))
    })
    .await;
    let types = "resource_types:\n  - name: default\n    config: { cache_size: 16MiB, stale_if_error: 1h }\n";
    let yaml =
        config_yaml(origin.addr, types).replace("request_timeout: 5s", "request_timeout: 300ms");
    let larder = Larder::start(&yaml).await;
    larder.get("/t").await;
    let reply = larder.get("/t").await;
    assert_eq!((reply.status.as_u16(), reply.text().as_str()), (200, "v0"));
    reply.assert_cache_status("detail=stale-if-error");
}

#[tokio::test]
async fn section_5_2_2_2_must_revalidate_answers_504_when_the_origin_fails() {
    let origin = stale_first_origin("max-age=10, must-revalidate, stale-if-error=600", |_| {
        (200, "max-age=60", Duration::from_secs(3))
    })
    .await;
    let types = "resource_types:\n  - name: default\n    config: { cache_size: 16MiB, grace: 1h, stale_if_error: 1h }\n";
    let yaml =
        config_yaml(origin.addr, types).replace("request_timeout: 5s", "request_timeout: 300ms");
    let larder = Larder::start(&yaml).await;
    larder.get("/mr").await;
    let reply = larder.get("/mr").await;
    assert_eq!(reply.status, 504, "{}", reply.text());
    assert!(!reply.text().contains("v0"));
}

#[tokio::test]
async fn grace_from_config_serves_stale_while_refreshing() {
    let origin = stale_first_origin("max-age=10", |_| (200, "max-age=600", Duration::ZERO)).await;
    let types =
        "resource_types:\n  - name: default\n    config: { cache_size: 16MiB, grace: 1m }\n";
    let larder = Larder::start(&config_yaml(origin.addr, types)).await;
    larder.get("/g").await;
    let reply = larder.get("/g").await;
    assert_eq!(reply.text(), "v0");
    assert!(
        reply
            .cache_status()
            .contains("detail=stale-while-revalidate")
    );
    wait_for_count(&origin, 2).await;
}

#[tokio::test]
async fn rfc9110_14_ranges_are_cut_from_the_stored_object() {
    let origin = Origin::fixed(
        200,
        &[
            ("cache-control", "max-age=600"),
            ("etag", "\"r1\""),
            ("content-type", "text/plain"),
        ],
        "0123456789",
    )
    .await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    // A ranged miss fetches the whole object for the cache and gets its range cut from it.
    let ranged_miss = larder.get_with("/r", &[("range", "bytes=0-1")]).await;
    assert_eq!(
        (ranged_miss.status.as_u16(), ranged_miss.text().as_str()),
        (206, "01")
    );
    assert_eq!(ranged_miss.header("content-range"), "bytes 0-1/10");
    assert!(ranged_miss.cache_status().contains("stored"));
    assert!(!origin.last().headers.contains_key("range"));

    let single = larder.get_with("/r", &[("range", "bytes=2-4")]).await;
    assert_eq!(single.status, 206);
    assert_eq!(single.text(), "234");
    assert_eq!(single.header("content-range"), "bytes 2-4/10");
    assert_eq!(single.header("content-length"), "3");

    let suffix = larder.get_with("/r", &[("range", "bytes=-3")]).await;
    assert_eq!(
        (suffix.status.as_u16(), suffix.text().as_str()),
        (206, "789")
    );

    let unsatisfiable = larder.get_with("/r", &[("range", "bytes=50-")]).await;
    assert_eq!(unsatisfiable.status, 416);
    assert_eq!(unsatisfiable.header("content-range"), "bytes */10");

    let multi = larder.get_with("/r", &[("range", "bytes=0-1,8-9")]).await;
    assert_eq!(multi.status, 206);
    let boundary = multi
        .header("content-type")
        .strip_prefix("multipart/byteranges; boundary=")
        .unwrap()
        .to_owned();
    let text = multi.text();
    assert!(text.contains(&format!(
        "--{boundary}\r\nContent-Type: text/plain\r\nContent-Range: bytes 0-1/10\r\n\r\n01"
    )));
    assert!(text.contains("Content-Range: bytes 8-9/10\r\n\r\n89"));
    assert!(text.ends_with(&format!("--{boundary}--\r\n")));

    let stale_validator = larder
        .get_with("/r", &[("range", "bytes=0-1"), ("if-range", "\"old\"")])
        .await;
    assert_eq!(
        (
            stale_validator.status.as_u16(),
            stale_validator.text().as_str()
        ),
        (200, "0123456789")
    );
    let current = larder
        .get_with("/r", &[("range", "bytes=0-1"), ("if-range", "\"r1\"")])
        .await;
    assert_eq!(
        (current.status.as_u16(), current.text().as_str()),
        (206, "01")
    );
    assert_eq!(origin.count(), 1);
}

#[tokio::test]
async fn section_4_4_unsafe_methods_invalidate_location_and_content_location() {
    let origin = Origin::start(|seen| async move {
        match seen.method {
            Method::POST => response(
                303,
                &[
                    ("location", "/orders/7"),
                    ("content-location", "http://shop.example/cart"),
                ],
                "",
            ),
            _ => response(200, &[("cache-control", "max-age=600")], "page"),
        }
    })
    .await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    let host = [("host", "shop.example")];
    for path in ["/orders/7", "/cart", "/other"] {
        larder.get_with(path, &host).await;
        assert!(
            larder
                .get_with(path, &host)
                .await
                .cache_status()
                .contains("hit")
        );
    }
    let post = larder
        .request(
            Method::POST,
            &larder.proxy_url("/checkout"),
            &[("host", "shop.example")],
            Bytes::from_static(b"x"),
        )
        .await;
    assert_eq!(post.status, 303);
    assert!(
        larder
            .get_with("/orders/7", &host)
            .await
            .cache_status()
            .contains("fwd=uri-miss")
    );
    assert!(
        larder
            .get_with("/cart", &host)
            .await
            .cache_status()
            .contains("fwd=uri-miss")
    );
    assert!(
        larder
            .get_with("/other", &host)
            .await
            .cache_status()
            .contains("hit")
    );
}

#[tokio::test]
async fn rfc9213_cdn_cache_control_overrides_cache_control() {
    let origin = Origin::fixed(
        200,
        &[
            ("cache-control", "private, no-cache"),
            ("cdn-cache-control", "max-age=600"),
        ],
        "cdn",
    )
    .await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    larder.get("/c").await;
    let hit = larder.get("/c").await;
    assert!(hit.cache_status().contains("hit"), "{}", hit.cache_status());
    assert_eq!(
        hit.header("cdn-cache-control"),
        "max-age=600",
        "targeted fields travel on"
    );
    assert_eq!(hit.header("cache-control"), "private, no-cache");
    assert_eq!(origin.count(), 1);
}

#[tokio::test]
async fn rfc9213_own_targeted_field_takes_precedence() {
    let origin = Origin::fixed(
        200,
        &[
            ("larder-cache-control", "no-store"),
            ("cdn-cache-control", "max-age=600"),
        ],
        "x",
    )
    .await;
    let yaml = config_yaml(origin.addr, DEFAULT_TYPES)
        + "cache: { targeted_cache_control: Larder-Cache-Control }\n";
    let larder = Larder::start(&yaml).await;
    larder.get("/own").await;
    assert!(
        larder
            .get("/own")
            .await
            .cache_status()
            .contains("detail=response_no_store")
    );
}

#[tokio::test]
async fn surrogate_control_is_honoured_and_never_reaches_clients() {
    let origin = Origin::fixed(
        200,
        &[
            ("surrogate-control", "max-age=600"),
            ("cache-control", "no-cache"),
        ],
        "s",
    )
    .await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    let miss = larder.get("/s").await;
    assert!(miss.headers.get("surrogate-control").is_none());
    let hit = larder.get("/s").await;
    assert!(hit.cache_status().contains("hit"), "{}", hit.cache_status());
    assert!(hit.headers.get("surrogate-control").is_none());
    assert_eq!(hit.header("cache-control"), "no-cache");
}

#[tokio::test]
async fn section_5_2_2_4_no_cache_fields_are_left_out_of_unvalidated_reuse() {
    let origin = Origin::fixed(
        200,
        &[
            ("cache-control", "max-age=600, no-cache=\"x-debug\""),
            ("x-debug", "origin-only"),
        ],
        "b",
    )
    .await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    assert_eq!(larder.get("/f").await.header("x-debug"), "origin-only");
    let hit = larder.get("/f").await;
    assert!(hit.cache_status().contains("hit"));
    assert!(hit.headers.get("x-debug").is_none());
}

#[tokio::test]
async fn section_5_2_2_7_private_fields_are_not_stored() {
    let origin = Origin::fixed(
        200,
        &[
            ("cache-control", "max-age=600, private=\"set-cookie\""),
            ("set-cookie", "id=alice"),
        ],
        "shared part",
    )
    .await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    assert_eq!(larder.get("/pf").await.header("set-cookie"), "id=alice");
    let hit = larder.get("/pf").await;
    assert!(hit.cache_status().contains("hit"), "{}", hit.cache_status());
    assert!(
        hit.headers.get("set-cookie").is_none(),
        "one user's cookie reached another"
    );
}

#[tokio::test]
async fn rfc9211_cache_status_forward_reasons_and_key() {
    let origin = Origin::fixed(
        200,
        &[
            ("cache-control", "max-age=600"),
            ("vary", "accept-language"),
        ],
        "v",
    )
    .await;
    let yaml = config_yaml(origin.addr, DEFAULT_TYPES) + "cache: { cache_status_key: true }\n";
    let larder = Larder::start(&yaml).await;
    let first = larder.get_with("/k", &[("accept-language", "en")]).await;
    assert!(first.cache_status().contains("fwd=uri-miss"));
    first.assert_cache_status("key=\"http://127.0.0.1");
    let other = larder.get_with("/k", &[("accept-language", "fr")]).await;
    other.assert_cache_status("fwd=vary-miss");
    let forced = larder
        .get_with(
            "/k",
            &[("accept-language", "en"), ("cache-control", "no-cache")],
        )
        .await;
    forced.assert_cache_status("fwd=request");
    let plain = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    assert!(!plain.get("/k").await.cache_status().contains("key="));
}

#[tokio::test]
async fn section_5_2_1_request_directives() {
    // Stored response: max-age=100 but already 50 s old (Age), so current_age ≈ 50.
    let origin = Origin::fixed(200, &[("cache-control", "max-age=100"), ("age", "50")], "r").await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    larder.get("/d").await;
    let hit = |cc: &'static str| {
        let larder = &larder;
        async move {
            larder
                .get_with("/d", &[("cache-control", cc)])
                .await
                .cache_status()
                .contains("hit")
        }
    };
    assert!(hit("max-age=60").await, "age 50 ≤ max-age 60");
    assert!(!hit("max-age=10").await, "age 50 > max-age 10");
    assert!(hit("min-fresh=20").await, "50 s of freshness left ≥ 20");
    assert!(!hit("min-fresh=80").await, "50 s left < 80");
    assert!(!hit("no-cache").await);
    let pragma = larder.get_with("/d", &[("pragma", "no-cache")]).await;
    pragma.assert_cache_status("fwd=request");
}

#[tokio::test]
async fn section_5_2_1_4_max_stale_accepts_stale_responses() {
    let origin = Origin::fixed(
        200,
        &[("cache-control", "max-age=10"), ("age", "30")],
        "stale",
    )
    .await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    larder.get("/ms").await;
    assert!(
        larder
            .get_with("/ms", &[("cache-control", "max-stale=60")])
            .await
            .cache_status()
            .contains("hit")
    );
    assert!(
        larder
            .get_with("/ms", &[("cache-control", "max-stale")])
            .await
            .cache_status()
            .contains("hit")
    );
    assert!(
        !larder
            .get_with("/ms", &[("cache-control", "max-stale=5")])
            .await
            .cache_status()
            .contains("hit")
    );
}

#[tokio::test]
async fn section_4_3_2_if_none_match_takes_precedence_over_if_modified_since() {
    let last_modified = "Mon, 01 Jan 2024 00:00:00 GMT";
    let origin = Origin::fixed(
        200,
        &[
            ("cache-control", "max-age=600"),
            ("etag", "\"e\""),
            ("last-modified", last_modified),
        ],
        "x",
    )
    .await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    larder.get("/p").await;
    // The date alone would say "not modified", but the entity tag does not match.
    let reply = larder
        .get_with(
            "/p",
            &[
                ("if-none-match", "\"other\""),
                ("if-modified-since", "Tue, 02 Jan 2024 00:00:00 GMT"),
            ],
        )
        .await;
    assert_eq!(reply.status, 200);
    let ims = larder
        .get_with(
            "/p",
            &[("if-modified-since", "Tue, 02 Jan 2024 00:00:00 GMT")],
        )
        .await;
    assert_eq!(ims.status, 304);
    assert_eq!(ims.header("last-modified"), last_modified);
}

#[tokio::test]
async fn section_4_1_vary_that_changes_between_responses() {
    let n = Arc::new(AtomicUsize::new(0));
    let origin = Origin::start(move |_| {
        let i = n.fetch_add(1, Ordering::SeqCst);
        async move {
            let vary = if i == 0 {
                "accept-language"
            } else {
                "accept-encoding"
            };
            response(
                200,
                &[("cache-control", "max-age=600"), ("vary", vary)],
                format!("r{i}"),
            )
        }
    })
    .await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    let headers = [("accept-language", "en"), ("accept-encoding", "gzip")];
    assert_eq!(larder.get_with("/vc", &headers).await.text(), "r0");
    // A request the old rule would match differently is forwarded; the new Vary rule wins after.
    assert_eq!(
        larder
            .get_with(
                "/vc",
                &[("accept-language", "de"), ("accept-encoding", "gzip")]
            )
            .await
            .text(),
        "r1"
    );
    let again = larder
        .get_with(
            "/vc",
            &[("accept-language", "fr"), ("accept-encoding", "gzip")],
        )
        .await;
    assert_eq!(again.text(), "r1", "selected by accept-encoding only now");
    assert!(again.cache_status().contains("hit"));
}

#[tokio::test]
async fn section_3_1_stored_fields_keep_repeats_and_drop_hop_by_hop() {
    let origin = Origin::fixed(
        200,
        &[
            ("cache-control", "max-age=600"),
            ("x-multi", "one"),
            ("x-multi", "two"),
            ("connection", "x-hop"),
            ("x-hop", "gone"),
            ("keep-alive", "timeout=5"),
        ],
        "f",
    )
    .await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    larder.get("/h").await;
    let hit = larder.get("/h").await;
    let multi: Vec<_> = hit
        .headers
        .get_all("x-multi")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    assert_eq!(multi, ["one", "two"]);
    assert!(hit.headers.get("x-hop").is_none());
    assert!(hit.headers.get("keep-alive").is_none());
}

#[tokio::test]
async fn section_4_2_4_a_stale_response_of_any_status_is_not_reused_unvalidated() {
    let origin = Origin::fixed(
        404,
        &[("cache-control", "max-age=10"), ("age", "60")],
        "gone",
    )
    .await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    larder.get("/404").await;
    larder.get("/404").await;
    assert_eq!(origin.count(), 2);
}

/// A raw origin that answers every request with a 103 Early Hints, then a cacheable 200.
async fn early_hints_origin() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let count = count.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                loop {
                    let Ok(n) = stream.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                    let reply = b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload; as=style\r\n\r\n\
                        HTTP/1.1 200 OK\r\ncache-control: max-age=600\r\ncontent-length: 5\r\n\r\nhello";
                    if stream.write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, served)
}

/// Sends one HTTP/1.1 request on a fresh connection and returns everything read until the body.
async fn raw_exchange(proxy: std::net::SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    let mut buf = vec![0u8; 4096];
    while !received.ends_with(b"hello") {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(
            n > 0,
            "connection closed early: {}",
            String::from_utf8_lossy(&received)
        );
        received.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(received).unwrap()
}

#[tokio::test]
async fn rfc9110_15_2_interim_responses_are_forwarded_and_never_cached() {
    let (origin, served) = early_hints_origin().await;
    let larder = Larder::start(&config_yaml(origin, DEFAULT_TYPES)).await;
    let proxy = larder.server.proxy_addrs[0];
    let first = raw_exchange(proxy, "GET /hints HTTP/1.1\r\nhost: example.com\r\n\r\n").await;
    assert!(
        first.starts_with("HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload; as=style\r\n\r\nHTTP/1.1 200 OK\r\n"),
        "{first}"
    );
    // From cache: the final response alone.
    let second = raw_exchange(proxy, "GET /hints HTTP/1.1\r\nhost: example.com\r\n\r\n").await;
    assert!(second.starts_with("HTTP/1.1 200 OK\r\n"), "{second}");
    assert!(second.contains("cache-status: larder; hit"), "{second}");
    // (Not just "103": a random request id may contain those digits.)
    assert!(!second.contains("103 Early Hints"), "{second}");
    assert_eq!(served.load(Ordering::SeqCst), 1);
    // HTTP/1.0 clients never get 1xx responses (RFC 9110 §15.2).
    let old = raw_exchange(proxy, "GET /other HTTP/1.0\r\nhost: example.com\r\n\r\n").await;
    assert!(
        old.starts_with("HTTP/1.0 200 OK\r\n") || old.starts_with("HTTP/1.1 200 OK\r\n"),
        "{old}"
    );
}

#[tokio::test]
async fn keep_drops_objects_too_stale_to_revalidate() {
    // 90 s stale on arrival; keep 10 s (+ the 30 s stale_if_unreachable window) is exceeded.
    let origin = Origin::fixed(
        200,
        &[
            ("cache-control", "max-age=10"),
            ("age", "100"),
            ("etag", "\"k\""),
        ],
        "k",
    )
    .await;
    let kept = "resource_types:\n  - name: default\n    config: { cache_size: 16MiB, keep: 10s }\n";
    let larder = Larder::start(&config_yaml(origin.addr, kept)).await;
    larder.get("/keep").await;
    let reply = larder.get("/keep").await;
    reply.assert_cache_status("fwd=uri-miss");
    assert!(origin.last().headers.get("if-none-match").is_none());
    // Without keep, the same object is revalidated.
    let unbounded = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    unbounded.get("/keep2").await;
    unbounded.get("/keep2").await;
    assert_eq!(origin.last().headers["if-none-match"], "\"k\"");
}

//! The proxy as a client and an origin see it: forwarding rules, protocols, limits, failures,
//! routing, streaming.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Method;
use http_body_util::{BodyExt, Full};

#[tokio::test]
async fn forwards_with_proxy_headers_and_without_hop_by_hop() {
    let origin = Origin::fixed(
        200,
        &[
            ("cache-control", "no-store"),
            ("connection", "x-origin-private"),
            ("x-origin-private", "1"),
            ("keep-alive", "timeout=5"),
            ("x-kept", "yes"),
        ],
        "ok",
    )
    .await;
    // The test client is a trusted proxy here: its X-Forwarded-For is extended.
    let yaml = format!(
        "{}limits: {{ trusted_proxies: [127.0.0.1/32] }}\n",
        config_yaml(origin.addr, DEFAULT_TYPES)
    );
    let larder = Larder::start(&yaml).await;
    let reply = larder
        .get_with(
            "/fwd?q=1",
            &[
                ("host", "shop.example:8080"),
                ("connection", "x-client-private"),
                ("x-client-private", "secret"),
                ("x-forwarded-for", "203.0.113.9"),
                ("proxy-authorization", "Basic Zm9v"),
            ],
        )
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-kept"), "yes");
    assert!(reply.headers.get("x-origin-private").is_none());
    assert!(reply.headers.get("keep-alive").is_none());
    assert!(reply.header("via").contains("larder"));
    let seen = origin.last();
    assert_eq!(seen.uri.path_and_query().unwrap().as_str(), "/fwd?q=1");
    assert_eq!(
        seen.headers["host"], "shop.example:8080",
        "Host is preserved"
    );
    assert_eq!(seen.headers["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    assert_eq!(seen.headers["x-forwarded-host"], "shop.example:8080");
    assert!(seen.headers["via"].to_str().unwrap().contains("larder"));
    assert!(seen.headers.get("x-client-private").is_none());
    assert!(seen.headers.get("proxy-authorization").is_none());
    assert!(reply.header("x-request-id").len() >= 16);
}

#[tokio::test]
async fn every_method_is_forwarded_with_its_body() {
    let origin = Origin::start(|seen| async move {
        response(
            201,
            &[],
            format!("{} {}", seen.method, String::from_utf8_lossy(&seen.body)),
        )
    })
    .await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "BREW"] {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let reply = larder
            .request(
                method.clone(),
                &larder.proxy_url("/m"),
                &[],
                Bytes::from_static(b"payload"),
            )
            .await;
        assert_eq!(reply.status, 201);
        assert_eq!(reply.text(), format!("{method} payload"));
        reply.assert_cache_status("fwd=method");
    }
    assert_eq!(origin.count(), 6);
}

#[tokio::test]
async fn request_body_over_the_limit_gets_413_and_never_reaches_the_origin() {
    let origin = Origin::fixed(200, &[], "ok").await;
    let yaml =
        config_yaml(origin.addr, DEFAULT_TYPES) + "limits: { max_request_body_size: 1KiB }\n";
    let larder = Larder::start(&yaml).await;
    let reply = larder
        .request(
            Method::POST,
            &larder.proxy_url("/up"),
            &[],
            Bytes::from(vec![b'x'; 2048]),
        )
        .await;
    assert_eq!(reply.status, 413);
    assert_eq!(origin.count(), 0);
    let small = larder
        .request(
            Method::POST,
            &larder.proxy_url("/up"),
            &[],
            Bytes::from(vec![b'x'; 512]),
        )
        .await;
    assert_eq!(small.status, 200);
}

#[tokio::test]
async fn oversized_request_headers_are_rejected() {
    let origin = Origin::fixed(200, &[], "ok").await;
    let yaml =
        config_yaml(origin.addr, DEFAULT_TYPES) + "limits: { max_request_header_size: 16KiB }\n";
    let larder = Larder::start(&yaml).await;
    let huge = "h".repeat(40 * 1024);
    let result = larder
        .client
        .request(
            http::Request::get(larder.proxy_url("/"))
                .header("x-huge", &huge)
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
    // hyper answers 431 and closes, or closes outright; either way nothing reaches the origin.
    if let Ok(response) = result {
        assert_eq!(response.status(), 431);
    }
    assert_eq!(origin.count(), 0);
}

#[tokio::test]
async fn upstream_connect_failure_is_502() {
    // Bind then drop: a loopback port with nothing listening.
    let closed = closed_address();
    let larder = Larder::start(&config_yaml(closed, DEFAULT_TYPES)).await;
    let reply = larder.get("/down").await;
    assert_eq!(reply.status, 502);
    assert_eq!(reply.text(), "upstream connect error\n");
    reply.assert_cache_status("detail=upstream_error");
    let metrics = larder.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            r#"larder_upstream_errors_total{cluster="origin",kind="connect"}"#
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn upstream_timeout_is_504_and_later_requests_still_work() {
    let origin = Origin::start(|seen| async move {
        if seen.uri.path() == "/slow" {
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        response(200, &[("cache-control", "max-age=60")], "fine")
    })
    .await;
    let yaml = config_yaml(origin.addr, DEFAULT_TYPES)
        .replace("request_timeout: 5s", "request_timeout: 200ms");
    let larder = Larder::start(&yaml).await;
    let reply = larder.get("/slow").await;
    assert_eq!(reply.status, 504);
    assert_eq!(reply.header("cache-control"), "no-store");
    assert_eq!(larder.get("/fast").await.text(), "fine");
    let metrics = larder.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            r#"larder_upstream_errors_total{cluster="origin",kind="timeout"}"#
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn h2c_prior_knowledge_is_served_and_cached() {
    let origin = Origin::fixed(200, &[("cache-control", "max-age=60")], "over h2").await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    for expect in ["fwd=uri-miss", "hit"] {
        let response = client
            .request(
                http::Request::get(larder.proxy_url("/h2"))
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.version(), http::Version::HTTP_2);
        let status = response.headers()["cache-status"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(status.contains(expect), "{status}");
        assert_eq!(
            response.into_body().collect().await.unwrap().to_bytes(),
            "over h2"
        );
    }
    assert_eq!(origin.count(), 1);
    // The origin got a Host header made from :authority.
    assert_eq!(
        origin.last().headers["host"],
        larder.server.proxy_addrs[0].to_string()
    );
}

/// This hop's Via goes after the ones the origin's side added (RFC 9110 §7.6.3: in the order
/// the hops forwarded), whichever server writes the response, and only once on a 304 a fill
/// answers from the stored validators; its X-Request-Id and Cache-Status replace the origin's.
#[tokio::test]
async fn via_lists_this_hop_last_over_http1_and_http2() {
    let origin = Origin::start(|seen| async move {
        let cacheable = seen.uri.path() == "/filled";
        response(
            200,
            &[
                ("via", "1.0 gateway-a, 1.1 gateway-b"),
                ("x-request-id", "origin-id"),
                ("cache-status", "upstream; hit"),
                ("etag", "\"v1\""),
                (
                    "cache-control",
                    if cacheable { "max-age=60" } else { "no-store" },
                ),
            ],
            "ok",
        )
    })
    .await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    let vias = |headers: &http::HeaderMap| -> Vec<String> {
        headers
            .get_all("via")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    };
    let expected = ["1.0 gateway-a, 1.1 gateway-b", "1.1 larder"];
    let one = |headers: &http::HeaderMap, name: &str| -> String {
        let values: Vec<_> = headers.get_all(name).iter().collect();
        assert_eq!(values.len(), 1, "{name}: {values:?}");
        values[0].to_str().unwrap().to_owned()
    };
    let reply = larder.get("/passed").await;
    reply.assert_cache_status("fwd=");
    assert_eq!(vias(&reply.headers), expected, "HTTP/1 pass");
    // The origin's own X-Request-Id and Cache-Status give way to this hop's.
    assert_ne!(one(&reply.headers, "x-request-id"), "origin-id");
    assert!(one(&reply.headers, "cache-status").starts_with("larder;"));

    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let response = h2
        .request(
            http::Request::get(larder.proxy_url("/passed"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(vias(response.headers()), expected, "HTTP/2 pass");
    assert_ne!(one(response.headers(), "x-request-id"), "origin-id");
    assert!(one(response.headers(), "cache-status").starts_with("larder;"));

    // A conditional request that fills: the client already has the representation.
    let reply = larder
        .get_with("/filled", &[("if-none-match", "\"v1\"")])
        .await;
    assert_eq!(reply.status, 304);
    assert_eq!(
        vias(&reply.headers),
        ["1.1 larder"],
        "the 304 a fill answers"
    );
    let hit = larder.get("/filled").await;
    assert!(hit.cache_status().contains("hit"), "{}", hit.cache_status());
    assert_eq!(vias(&hit.headers), expected, "a hit");
    assert_ne!(one(&hit.headers, "x-request-id"), "origin-id");
    assert!(one(&hit.headers, "cache-status").starts_with("larder; hit"));
}

#[tokio::test]
async fn virtual_hosts_route_by_host_with_wildcards() {
    let api = Origin::fixed(200, &[], "api").await;
    let web = Origin::fixed(200, &[], "web").await;
    let yaml = format!(
        r#"listeners: [{{ address: "127.0.0.1:0" }}]
admin: {{ address: "127.0.0.1:0" }}
access_log: {{ enabled: false }}
virtual_hosts:
  - name: api
    domains: ["api.example.com"]
    routes:
      - match: {{ regex: "^/v[0-9]+/" }}
        cluster: api
  - name: web
    domains: ["*.example.com"]
    routes:
      - match: {{ path: "/exact" }}
        cluster: api
      - match: {{ prefix: "/" }}
        cluster: web
clusters:
  - {{ name: api, endpoints: ["{}"] }}
  - {{ name: web, endpoints: ["{}"] }}
"#,
        api.addr, web.addr
    );
    let larder = Larder::start(&yaml).await;
    assert_eq!(
        larder
            .get_with("/v1/users", &[("host", "api.example.com")])
            .await
            .text(),
        "api"
    );
    assert_eq!(
        larder
            .get_with("/v1/users", &[("host", "www.example.com")])
            .await
            .text(),
        "web"
    );
    assert_eq!(
        larder
            .get_with("/exact", &[("host", "shop.example.com:8080")])
            .await
            .text(),
        "api"
    );
    assert_eq!(
        larder
            .get_with("/other", &[("host", "api.example.com")])
            .await
            .status,
        404
    );
    let unknown = larder.get_with("/", &[("host", "example.org")]).await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.text(), "no route matches this host and path\n");
}

#[tokio::test]
async fn route_with_cache_disabled_always_forwards() {
    let origin = Origin::fixed(200, &[("cache-control", "max-age=60")], "x").await;
    let yaml = config_yaml(origin.addr, DEFAULT_TYPES).replace(
        "cluster: origin\n",
        "cluster: origin\n        cache: false\n",
    );
    let larder = Larder::start(&yaml).await;
    larder.get("/n").await;
    let reply = larder.get("/n").await;
    reply.assert_cache_status("detail=route_disabled");
    assert_eq!(origin.count(), 2);
}

/// Peak resident memory of this process, from /proc.
fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1_gib_response_streams_in_bounded_memory() {
    const CHUNK: usize = 256 * 1024;
    const TOTAL: u64 = 1 << 30;
    static DATA: [u8; CHUNK] = [b'z'; CHUNK];
    let origin = Origin::start(|_| async {
        // Chunked with no length: the proxy cannot know the size up front and must give up
        // buffering for the cache at max_object_size while it keeps streaming.
        let chunks = futures_util::stream::iter(
            (0..TOTAL / CHUNK as u64)
                .map(|_| Ok::<_, BoxError>(hyper::body::Frame::data(Bytes::from_static(&DATA)))),
        );
        let body = http_body_util::StreamBody::new(chunks).boxed_unsync();
        http::Response::builder()
            .header("cache-control", "max-age=600")
            .body(body)
            .unwrap()
    })
    .await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    let before = peak_rss_bytes();
    let response = larder
        .client
        .request(
            http::Request::get(larder.proxy_url("/huge"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = response.into_body();
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            received += data.len() as u64;
        }
    }
    assert_eq!(received, TOTAL);
    let growth = peak_rss_bytes().saturating_sub(before);
    assert!(
        growth < 128 << 20,
        "peak RSS grew by {} MiB while streaming 1 GiB",
        growth >> 20
    );
}

#[tokio::test]
async fn clients_cannot_poison_the_host_the_origin_sees() {
    let origin = Origin::start(|seen| async move {
        let host = seen.header("host");
        let xfh = seen.header("x-forwarded-host");
        response(
            200,
            &[("cache-control", "max-age=60")],
            format!("host={host} xfh={xfh}"),
        )
    })
    .await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    // `Connection: host` must not strip Host; X-Forwarded-Host/Forwarded from clients are replaced.
    let attack = larder
        .get_with(
            "/page",
            &[
                ("host", "victim.example"),
                ("connection", "host"),
                ("x-forwarded-host", "evil.example"),
                ("forwarded", "host=evil.example"),
            ],
        )
        .await;
    assert_eq!(attack.text(), "host=victim.example xfh=victim.example");
    assert!(origin.last().headers.get("forwarded").is_none());
    let victim = larder
        .get_with("/page", &[("host", "victim.example")])
        .await;
    assert_eq!(victim.text(), "host=victim.example xfh=victim.example");
}

#[tokio::test]
async fn chunked_request_body_over_the_limit_is_413() {
    let origin = Origin::fixed(200, &[], "ok").await;
    let yaml =
        config_yaml(origin.addr, DEFAULT_TYPES) + "limits: { max_request_body_size: 1KiB }\n";
    let larder = Larder::start(&yaml).await;
    // No Content-Length: the limit can only be enforced while streaming.
    let chunks = futures_util::stream::iter(
        (0..8).map(|_| Ok::<_, BoxError>(hyper::body::Frame::data(Bytes::from(vec![b'c'; 512])))),
    );
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::StreamBody<_>>();
    let response = client
        .request(
            http::Request::post(larder.proxy_url("/upload"))
                .body(http_body_util::StreamBody::new(chunks))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
}

#[tokio::test]
async fn connect_is_not_tunnelled() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let origin = Origin::fixed(200, &[], "ok").await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    let mut stream = tokio::net::TcpStream::connect(larder.server.proxy_addrs[0])
        .await
        .unwrap();
    stream
        .write_all(b"CONNECT internal.example:22 HTTP/1.1\r\nhost: internal.example:22\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = stream.read(&mut buf).await.unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 501"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    assert_eq!(origin.count(), 0);
}

#[tokio::test]
async fn an_origin_that_stalls_mid_body_is_cut_off_by_the_route_timeout() {
    use futures_util::StreamExt;
    let origin = Origin::start(|_| async {
        // One chunk, then nothing, ever.
        let chunks = futures_util::stream::iter([Ok::<_, BoxError>(hyper::body::Frame::data(
            bytes::Bytes::from_static(b"first"),
        ))])
        .chain(futures_util::stream::pending());
        let body = http_body_util::BodyExt::boxed_unsync(http_body_util::StreamBody::new(chunks));
        http::Response::builder()
            .header("cache-control", "no-store")
            .body(body)
            .unwrap()
    })
    .await;
    let yaml = config_yaml(origin.addr, DEFAULT_TYPES).replace(
        "        cluster: origin\n",
        "        cluster: origin\n        timeout: 300ms\n",
    );
    let larder = Larder::start(&yaml).await;
    let request = http::Request::get(larder.proxy_url("/stall"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let response = larder.client.request(request).await.unwrap();
    assert_eq!(response.status(), 200, "the head arrived in time");
    let started = std::time::Instant::now();
    let body = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        http_body_util::BodyExt::collect(response.into_body()),
    )
    .await
    .expect("the stalled body ends instead of hanging");
    assert!(body.is_err(), "a cut body is an error, not a short success");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}

#[tokio::test]
async fn h2c_streams_of_one_connection_do_not_wait_for_each_other() {
    let slow = GatedOrigin::start(&[("cache-control", "no-store")], "slow").await;
    let fast = Origin::fixed(200, &[("cache-control", "no-store")], "fast").await;
    let larder = Larder::start(&config_yaml_with(
        "      - match: { prefix: \"/slow\" }\n        cluster: slow\n      - match: { prefix: \"/\" }\n        cluster: fast\n",
        &format!(
            "  - name: slow\n    endpoints: [\"{}\"]\n  - name: fast\n    endpoints: [\"{}\"]\n",
            slow.origin.addr, fast.addr
        ),
        DEFAULT_TYPES,
    ))
    .await;
    // One HTTP/2 connection carries both requests (streams run inside the connection's task).
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let get = |path: &str| {
        let client = client.clone();
        let url = larder.proxy_url(path);
        tokio::spawn(async move {
            let response = client
                .request(
                    http::Request::get(url)
                        .body(Full::new(Bytes::new()))
                        .unwrap(),
                )
                .await
                .unwrap();
            assert_eq!(response.version(), http::Version::HTTP_2);
            response.into_body().collect().await.unwrap().to_bytes()
        })
    };
    let held = get("/slow");
    slow.arrived("the slow stream's request").await;
    for _ in 0..3 {
        assert_eq!(get("/fast").await.unwrap(), "fast");
    }
    assert!(!held.is_finished(), "the slow stream is still waiting");
    slow.release_one();
    assert_eq!(held.await.unwrap(), "slow");
}

#[tokio::test]
async fn h2c_responses_finished_together_all_arrive_whole_whatever_their_size() {
    let origin = batch_origin().await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    // Twice: misses relayed from the origin, then hits from the cache.
    for round in ["miss", "hit"] {
        let requests = (0..40).map(|i| {
            let client = client.clone();
            let path = format!("/obj/{i}");
            let url = larder.proxy_url(&path);
            tokio::spawn(async move {
                let response = client
                    .request(
                        http::Request::get(url)
                            .body(Full::new(Bytes::new()))
                            .unwrap(),
                    )
                    .await
                    .unwrap();
                assert_eq!(response.version(), http::Version::HTTP_2);
                let status = response
                    .headers()
                    .get("cache-status")
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default();
                let body = response.into_body().collect().await.unwrap().to_bytes();
                (path, status, body)
            })
        });
        for request in requests.collect::<Vec<_>>() {
            let (path, status, body) = request.await.unwrap();
            check_batch_response(round, &path, &status, &body);
        }
    }
    assert_eq!(origin.count(), 40);
}

fn h2c_client() -> H2cClient {
    // Without TCP_NODELAY a request's DATA would wait for the ACK of its HEADERS (Nagle),
    // which a server that has nothing to answer yet delays by 40 ms.
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build(connector)
}

type H2cClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

/// One request over `client`, answered over HTTP/2.
async fn h2c_send(
    client: &H2cClient,
    method: Method,
    url: String,
    body: impl Into<Bytes>,
) -> http::Response<hyper::body::Incoming> {
    let request = http::Request::builder()
        .method(method)
        .uri(url)
        .body(Full::new(body.into()))
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    response
}

/// A request body three times the stream's and the connection's windows: it only arrives
/// whole if the proxy gives the windows back as the upstream request takes the bytes.
#[tokio::test]
async fn h2c_request_bodies_larger_than_the_windows_reach_the_origin_whole() {
    let origin = Origin::fixed(200, &[("cache-control", "no-store")], "stored").await;
    let yaml =
        config_yaml(origin.addr, DEFAULT_TYPES) + "limits: { max_request_body_size: 8MiB }\n";
    let larder = Larder::start(&yaml).await;
    let body: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let client = h2c_client();
    let request = h2c_send(
        &client,
        Method::POST,
        larder.proxy_url("/upload"),
        body.clone(),
    );
    // Windows never given back would stall the upload for good.
    let response = tokio::time::timeout(Duration::from_secs(30), request)
        .await
        .expect("the upload stalled");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.into_body().collect().await.unwrap().to_bytes(),
        "stored"
    );
    let seen = origin.last();
    assert_eq!(seen.body.len(), body.len());
    assert!(seen.body == body, "the body arrived altered");
}

/// An answer given before the request body is all sent (413 here) reaches the client, and the
/// rest of the body is refused with a reset the client takes as "stop sending" (RFC 9113 §8.1).
#[tokio::test]
async fn h2c_an_early_answer_to_a_long_upload_reaches_the_client() {
    let origin = Origin::fixed(200, &[], "ok").await;
    let yaml =
        config_yaml(origin.addr, DEFAULT_TYPES) + "limits: { max_request_body_size: 1KiB }\n";
    let larder = Larder::start(&yaml).await;
    let client = h2c_client();
    let upload = vec![b'x'; 512 * 1024];
    let response = h2c_send(&client, Method::POST, larder.proxy_url("/up"), upload).await;
    assert_eq!(response.status(), 413);
    assert_eq!(origin.count(), 0);
    // The connection goes on serving.
    let next = h2c_send(
        &client,
        Method::GET,
        larder.proxy_url("/after"),
        Bytes::new(),
    )
    .await;
    assert_eq!(next.status(), 200);
}

#[tokio::test]
async fn h2c_head_of_a_cached_object_has_its_length_and_no_body() {
    let origin = Origin::fixed(200, &[("cache-control", "max-age=60")], "twelve bytes").await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    let client = h2c_client();
    let get = h2c_send(&client, Method::GET, larder.proxy_url("/h"), Bytes::new()).await;
    assert_eq!(
        get.into_body().collect().await.unwrap().to_bytes(),
        "twelve bytes"
    );
    let head = h2c_send(&client, Method::HEAD, larder.proxy_url("/h"), Bytes::new()).await;
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"], "12");
    assert!(
        head.headers()["cache-status"]
            .to_str()
            .unwrap()
            .contains("hit"),
        "{:?}",
        head.headers()
    );
    assert!(
        head.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .is_empty()
    );
    assert_eq!(origin.count(), 1);
}

/// A response Larder makes itself has no Date from an origin: the HTTP/2 server adds one (RFC
/// 9110 §6.6.1), and the body's length, as the HTTP/1 server does.
#[tokio::test]
async fn h2c_answers_made_by_larder_carry_date_and_length() {
    let larder = Larder::start(&config_yaml(closed_address(), DEFAULT_TYPES)).await;
    let client = h2c_client();
    let response = h2c_send(
        &client,
        Method::GET,
        larder.proxy_url("/down"),
        Bytes::new(),
    )
    .await;
    assert_eq!(response.status(), 502);
    let date = response.headers()["date"].to_str().unwrap().to_owned();
    assert!(date.len() == 29 && date.ends_with(" GMT"), "{date}");
    let body = b"upstream connect error\n";
    assert_eq!(response.headers()["content-length"], body.len().to_string());
    assert_eq!(
        response.into_body().collect().await.unwrap().to_bytes(),
        &body[..]
    );
}

/// Bodies the pipeline reads after their stream ended still give back the connection's
/// window: 150 uploads of 10 KiB (1.5 MiB, over the 1 MiB window) on one connection.
#[tokio::test]
async fn h2c_many_small_uploads_on_one_connection_never_exhaust_its_window() {
    let origin = Origin::fixed(200, &[("cache-control", "no-store")], "ok").await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    let client = h2c_client();
    let uploads = async {
        for n in 0..150 {
            let url = larder.proxy_url(&format!("/up/{n}"));
            let response = h2c_send(&client, Method::POST, url, vec![b'u'; 10 * 1024]).await;
            assert_eq!(response.status(), 200);
            response.into_body().collect().await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(60), uploads)
        .await
        .expect("the uploads stalled: the connection's window was not given back");
    assert_eq!(origin.count(), 150);
    assert_eq!(origin.last().body.len(), 10 * 1024);
}

/// A drain sends GOAWAY to an HTTP/2 client, lets the stream in flight finish whole, then
/// closes the connection, so the shutdown completes.
#[tokio::test]
async fn h2c_drain_finishes_the_stream_in_flight_then_closes() {
    let slow = GatedOrigin::start(&[("cache-control", "no-store")], "slow answer").await;
    let larder = Larder::start(&config_yaml(slow.origin.addr, DEFAULT_TYPES)).await;
    let client = h2c_client();
    let url = larder.proxy_url("/slow");
    let in_flight = tokio::spawn(async move {
        let response = h2c_send(&client, Method::GET, url, Bytes::new()).await;
        response.into_body().collect().await.unwrap().to_bytes()
    });
    slow.arrived("the request in flight").await;
    let Larder { server, .. } = larder;
    let shutdown = tokio::spawn(server.shutdown());
    // The drain waits for the stream: nothing ends while the origin holds the answer.
    tokio::task::yield_now().await;
    assert!(!shutdown.is_finished());
    slow.release_one();
    assert_eq!(in_flight.await.unwrap(), "slow answer");
    tokio::time::timeout(Duration::from_secs(10), shutdown)
        .await
        .expect("the drain did not end once the stream finished")
        .unwrap();
}

#[tokio::test]
async fn requests_waiting_on_a_cancelled_fill_make_one_origin_request_not_one_each() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    // The first request is held until its client gives up; later ones are answered at once.
    let arrived = Arc::new(tokio::sync::Notify::new());
    let count = Arc::new(AtomicUsize::new(0));
    let origin = Origin::start({
        let (arrived, count) = (arrived.clone(), count.clone());
        move |_| {
            let (arrived, first) = (arrived.clone(), count.fetch_add(1, Ordering::SeqCst) == 0);
            async move {
                if first {
                    arrived.notify_one();
                    std::future::pending::<()>().await;
                }
                response(200, &[("cache-control", "max-age=60")], "the object")
            }
        }
    })
    .await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    let h2 = h2c_client();
    let leader = tokio::spawn({
        let url = larder.proxy_url("/slow");
        async move { h2c_send(&h2, Method::GET, url, Bytes::new()).await }
    });
    arrived.notified().await;
    let followers: Vec<_> = (0..3)
        .map(|_| {
            let url = larder.proxy_url("/slow");
            tokio::spawn(async move { send(&client(), Method::GET, &url, &[], Bytes::new()).await })
        })
        .collect();
    // All three are queued behind the leader's fill (the gauge operators watch).
    let mut waiting = None;
    for _ in 0..250 {
        waiting = metric(&larder.metrics().await, "larder_cache_coalesce_waiters");
        if waiting == Some(3.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(waiting, Some(3.0));
    assert_eq!(
        metric(&larder.metrics().await, "larder_cache_fills_in_flight"),
        Some(1.0)
    );
    // The leader's client cancels its stream: its fill goes, and one follower takes over.
    leader.abort();
    for follower in followers {
        let reply = tokio::time::timeout(Duration::from_secs(10), follower)
            .await
            .expect("a follower is answered")
            .unwrap();
        assert_eq!(reply.status, 200);
        assert_eq!(reply.text(), "the object");
    }
    assert_eq!(count.load(Ordering::SeqCst), 2);
}

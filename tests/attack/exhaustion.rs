//! Exhaustion: slow clients (slowloris, slow POST, slow reader), range amplification, oversized
//! heads, connection floods, and a stampede on one cold key. Each attack is bounded, and a
//! normal request made while it runs still succeeds.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::common::*;
use super::raw;
use super::rss_bytes;

fn with_limits(origin: std::net::SocketAddr, types: &str, limits: &str) -> String {
    format!("{}limits: {{ {limits} }}\n", config_yaml(origin, types))
}

#[tokio::test]
async fn slowloris_heads_are_cut_off_and_others_are_served_meanwhile() {
    let origin = Origin::fixed(200, &[("cache-control", "max-age=60")], "fine").await;
    let larder = Larder::start(&with_limits(
        origin.addr,
        DEFAULT_TYPES,
        "header_read_timeout: 300ms",
    ))
    .await;
    let proxy = larder.server.proxy_addrs[0];
    let mut slow = Vec::new();
    for _ in 0..50 {
        let mut stream = TcpStream::connect(proxy).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: a.example\r\nx-slow: ")
            .await
            .unwrap();
        slow.push(stream);
    }
    assert_eq!(
        larder.get("/ok").await.text(),
        "fine",
        "served during the attack"
    );
    for mut stream in slow {
        let received = raw::until_closed(&mut stream, Duration::from_secs(10))
            .await
            .expect("a head that never ends is cut off");
        let text = String::from_utf8_lossy(&received);
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 408"),
            "{text}"
        );
    }
    assert_eq!(origin.count(), 1);
}

/// The head deadline runs between requests only: a response slower than
/// `header_read_timeout` is delivered whole, the next request on the connection is due from
/// the end of that response (not from the connection's start), and a connection then left idle
/// is closed.
#[tokio::test]
async fn the_head_deadline_spares_slow_responses_and_closes_idle_connections() {
    // An origin whose body pauses for longer than the head deadline.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = socket.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    let head = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\ncache-control: no-store\r\n\r\nhello";
                    if socket.write_all(head).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(700)).await;
                    if socket.write_all(b"world").await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let larder = Larder::start(&with_limits(
        origin,
        DEFAULT_TYPES,
        "header_read_timeout: 300ms",
    ))
    .await;
    let mut client = TcpStream::connect(larder.server.proxy_addrs[0])
        .await
        .unwrap();
    let request = b"GET /slow HTTP/1.1\r\nhost: a.example\r\n\r\n";
    for round in 0..2 {
        client.write_all(request).await.unwrap();
        let mut received = Vec::new();
        let mut buf = [0u8; 4096];
        while !received.ends_with(b"helloworld") {
            let n = tokio::time::timeout(Duration::from_secs(10), client.read(&mut buf))
                .await
                .expect("the response arrives")
                .unwrap();
            assert!(n > 0, "round {round}: closed mid-response: {received:?}");
            received.extend_from_slice(&buf[..n]);
        }
        assert!(received.starts_with(b"HTTP/1.1 200"), "round {round}");
    }
    let rest = raw::until_closed(&mut client, Duration::from_secs(10))
        .await
        .expect("an idle connection is closed at the head deadline");
    assert!(rest.is_empty(), "{rest:?}");
}

/// HTTP/2 connections have no head deadline: streams have their own limits, and a client may
/// keep an idle connection for its next requests.
#[tokio::test]
async fn an_idle_http2_connection_outlives_the_head_deadline() {
    let origin = Origin::fixed(200, &[("cache-control", "max-age=60")], "fine").await;
    let larder = Larder::start(&with_limits(
        origin.addr,
        DEFAULT_TYPES,
        "header_read_timeout: 300ms",
    ))
    .await;
    let stream = TcpStream::connect(larder.server.proxy_addrs[0])
        .await
        .unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    // Idle for twice the deadline: what is tested is that nothing happens.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let request = http::Request::get(format!("http://a.example{}", "/idle"))
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let response = sender
        .send_request(request)
        .await
        .expect("the connection is still open");
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn a_slow_post_gets_408() {
    let origin = Origin::fixed(200, &[("cache-control", "no-store")], "took it").await;
    let larder = Larder::start(&with_limits(
        origin.addr,
        DEFAULT_TYPES,
        "request_body_timeout: 300ms",
    ))
    .await;
    let mut stream = TcpStream::connect(larder.server.proxy_addrs[0])
        .await
        .unwrap();
    stream
        .write_all(
            b"POST /upload HTTP/1.1\r\nhost: a.example\r\ncontent-length: 100\r\n\r\nonly ten b",
        )
        .await
        .unwrap();
    let received = raw::until_closed(&mut stream, Duration::from_secs(10))
        .await
        .expect("the stalled upload ends");
    let text = String::from_utf8_lossy(&received);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(
        larder.get("/after").await.status.is_success(),
        "the proxy serves on"
    );
}

/// Size of the object the slow-reader tests ask for: far more than socket buffers hold.
pub(super) const BIG_OBJECT: usize = 48 << 20;

/// A proxy with a short `client_write_timeout`, `/big` ([`BIG_OBJECT`] bytes) already cached.
pub(super) async fn big_object_cached() -> (Origin, Larder) {
    static MIB: [u8; 1 << 20] = [b'x'; 1 << 20];
    let origin = Origin::start(|_| async {
        let body: Vec<u8> = MIB.iter().copied().cycle().take(BIG_OBJECT).collect();
        response(200, &[("cache-control", "max-age=600")], body)
    })
    .await;
    let types = "resource_types:\n  - name: default\n    config: { cache_size: 256MiB, max_object_size: 64MiB }\n";
    let larder = Larder::start(&with_limits(
        origin.addr,
        types,
        "client_write_timeout: 300ms",
    ))
    .await;
    // Stored first, so the stalled reader is served from cache.
    assert_eq!(larder.get("/big").await.body.len(), BIG_OBJECT);
    (origin, larder)
}

/// Waits (bounded) until a connection has been closed for a stalled write, then checks that
/// `stream` got less than the whole object before its end and that the proxy serves on.
pub(super) async fn assert_cut_off_for_a_stalled_write(larder: &Larder, stream: &mut TcpStream) {
    let series = r#"larder_downstream_connections_closed_by_limit_total{reason="write_stalled"}"#;
    let mut cut = false;
    for _ in 0..500 {
        if metric(&larder.metrics().await, series) == Some(1.0) {
            cut = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(cut, "the stalled connection was never cut off");
    // What was buffered arrives, then the connection ends short of the whole object.
    let received = raw::until_closed(stream, Duration::from_secs(10))
        .await
        .expect("the server closes the connection");
    assert!(received.len() < BIG_OBJECT, "{} bytes", received.len());
    assert_eq!(larder.get("/big").await.body.len(), BIG_OBJECT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_a_big_object_is_cut_off() {
    let (_origin, larder) = big_object_cached().await;
    let mut stream = TcpStream::connect(larder.server.proxy_addrs[0])
        .await
        .unwrap();
    stream
        .write_all(b"GET /big HTTP/1.1\r\nhost: a.example\r\n\r\n")
        .await
        .unwrap();
    // Nothing is read: the socket buffers fill, then the proxy's writes stall.
    assert_cut_off_for_a_stalled_write(&larder, &mut stream).await;
}

#[tokio::test]
async fn range_requests_cannot_amplify_a_response() {
    let body: String = (0..64 * 1024)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let origin = Origin::start(move |_| {
        let body = body.clone();
        async move { response(200, &[("cache-control", "max-age=600")], body) }
    })
    .await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    larder.get("/r").await;
    let overlapping = vec!["0-65535"; 16].join(",");
    let many: Vec<String> = (0..200).map(|i| format!("{i}-{i}")).collect();
    let small: Vec<String> = (0..16)
        .map(|i| format!("{}-{}", i * 100, i * 100))
        .collect();
    for spec in [overlapping, many.join(","), small.join(",")] {
        let reply = larder
            .get_with("/r", &[("range", &format!("bytes={spec}"))])
            .await;
        assert!(
            reply.body.len() <= 64 * 1024 + 16 * 256,
            "{} bytes for {} ranges",
            reply.body.len(),
            spec.split(',').count()
        );
    }
}

#[tokio::test]
async fn oversized_and_overlong_heads_get_431_or_400() {
    let origin = Origin::fixed(200, &[("cache-control", "no-store")], "fine").await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    let proxy = larder.server.proxy_addrs[0];
    let many: String = (0..500).map(|i| format!("x-h{i}: v\r\n")).collect();
    let huge = format!("x-big: {}\r\n", "a".repeat(200 * 1024));
    for extra in [many, huge] {
        let raw = raw::exchange(
            proxy,
            format!("GET / HTTP/1.1\r\nhost: a.example\r\n{extra}connection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
        let statuses = raw::statuses(&raw);
        assert!(
            statuses == [431] || statuses == [400] || statuses.is_empty(),
            "{raw}"
        );
    }
    assert_eq!(origin.count(), 0);
}

#[tokio::test]
async fn connections_past_the_limit_are_closed_at_once() {
    let origin = Origin::fixed(200, &[("cache-control", "no-store")], "fine").await;
    let larder = Larder::start(&with_limits(
        origin.addr,
        DEFAULT_TYPES,
        "max_connections: 20",
    ))
    .await;
    let proxy = larder.server.proxy_addrs[0];
    let mut held = Vec::new();
    // 20 connections that each complete a request and stay open.
    for _ in 0..20 {
        let mut stream = TcpStream::connect(proxy).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: a.example\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 1024];
        let n = stream.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(stream);
    }
    // The next 30 are closed without an answer.
    for _ in 0..30 {
        let mut stream = TcpStream::connect(proxy).await.unwrap();
        let _ = stream
            .write_all(b"GET / HTTP/1.1\r\nhost: a.example\r\n\r\n")
            .await;
        let received = raw::until_closed(&mut stream, Duration::from_secs(10))
            .await
            .unwrap();
        assert!(
            received.is_empty(),
            "{}",
            String::from_utf8_lossy(&received)
        );
    }
    assert_eq!(
        metric(
            &larder.metrics().await,
            r#"larder_downstream_connections_closed_by_limit_total{reason="max_connections"}"#
        ),
        Some(30.0)
    );
    // Room again once some close.
    drop(held.drain(..5));
    let mut served = false;
    for _ in 0..100 {
        if larder
            .client
            .request(
                http::Request::get(larder.proxy_url("/again"))
                    .body(http_body_util::Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .is_ok()
        {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_misses_on_one_cold_key_reach_the_origin_once() {
    let asked = Arc::new(AtomicUsize::new(0));
    // Closed until released: permits, so a release before the handler waits is not lost.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let origin = {
        let asked = asked.clone();
        let gate = gate.clone();
        Origin::start(move |_| {
            asked.fetch_add(1, Ordering::SeqCst);
            let gate = gate.clone();
            async move {
                let _open = gate.acquire().await.unwrap();
                response(200, &[("cache-control", "max-age=600")], "cold")
            }
        })
        .await
    };
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    let mut clients = Vec::new();
    for _ in 0..500 {
        let c = larder.client.clone();
        let url = larder.proxy_url("/cold");
        clients.push(tokio::spawn(async move {
            send(&c, Method::GET, &url, &[], Bytes::new()).await
        }));
    }
    // Wait (bounded) for the first to reach the origin and the rest to queue behind it.
    for _ in 0..500 {
        if asked.load(Ordering::SeqCst) >= 1
            && metric(&larder.metrics().await, "larder_active_connections").unwrap_or(0.0) >= 500.0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gate.add_permits(1000);
    for client in clients {
        assert_eq!(client.await.unwrap().text(), "cold");
    }
    assert_eq!(asked.load(Ordering::SeqCst), 1, "one fill for 500 waiters");
}

/// A fill of unique URLs (16 KiB each) into a 32 MiB cache for 60 s under CI (15 s otherwise,
/// `LARDER_FILL_SECS` to choose): the process's RSS levels off under the budget plus a stated
/// 64 MiB of overhead (runtime, allocator, buffers, index).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_fill_of_unique_urls_levels_off_under_the_budget() {
    const BUDGET: u64 = 32 << 20;
    const OVERHEAD: u64 = 64 << 20;
    let seconds: u64 = std::env::var("LARDER_FILL_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if std::env::var("CI").as_deref() == Ok("true") {
            60
        } else {
            15
        });
    static BODY: [u8; 16 * 1024] = [b'f'; 16 * 1024];
    let origin =
        Origin::start(|_| async { response(200, &[("cache-control", "max-age=600")], &BODY[..]) })
            .await;
    let config = std::env::temp_dir().join(format!("larder-fill-{}.yaml", std::process::id()));
    std::fs::write(
        &config,
        config_yaml(
            origin.addr,
            "resource_types:\n  - name: default\n    config: { cache_size: 32MiB }\n",
        ),
    )
    .unwrap();
    let (larder, proxy, _admin) =
        tokio::task::block_in_place(|| spawn(&["--config", config.to_str().unwrap()]));
    let pid = larder.0.id();
    let deadline = std::time::Instant::now() + Duration::from_secs(seconds);
    let sent = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for w in 0..8 {
        let sent = sent.clone();
        workers.push(tokio::spawn(async move {
            let client = client();
            let mut i = 0u64;
            // Bounded by time and by count.
            while std::time::Instant::now() < deadline && i < 250_000 {
                let url = format!("http://{proxy}/fill/{w}/{i}");
                let reply = send(&client, Method::GET, &url, &[], Bytes::new()).await;
                assert_eq!(reply.body.len(), 16 * 1024);
                sent.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        }));
    }
    let mut samples = Vec::new();
    while std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        samples.push(rss_bytes(pid));
    }
    for w in workers {
        w.await.unwrap();
    }
    let filled = sent.load(Ordering::Relaxed) as u64 * 16 * 1024;
    let peak = samples.iter().copied().max().unwrap();
    let last = *samples.last().unwrap();
    let mid = samples[samples.len() / 2];
    eprintln!(
        "fill: {} MiB through a 32 MiB cache in {seconds} s; RSS mid {} MiB, last {} MiB, peak {} MiB",
        filled >> 20,
        mid >> 20,
        last >> 20,
        peak >> 20
    );
    assert!(
        filled > 4 * BUDGET,
        "the fill must overflow the budget several times"
    );
    assert!(
        peak <= BUDGET + OVERHEAD,
        "RSS peaked at {} MiB",
        peak >> 20
    );
    assert!(
        last <= mid + (16 << 20),
        "RSS still growing: {} MiB then {} MiB",
        mid >> 20,
        last >> 20
    );
    std::fs::remove_file(&config).unwrap();
}

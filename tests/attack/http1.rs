//! HTTP/1 framing: smuggling attempts from clients (CL/TE conflicts, obfuscated codings, bad
//! lengths and chunks, header syntax tricks, absolute-form, h2c upgrade, a body on a cached GET)
//! and framing faults from origins. Pass: 400 and close, or a clean re-framing; the origin
//! never sees a smuggled request; a malformed upstream response is never stored and never
//! poisons a pooled connection.

use super::common::*;
use super::raw;

/// An origin that says which path it served, never cacheable.
async fn echo_origin() -> Origin {
    Origin::start(|seen| async move {
        response(
            200,
            &[("cache-control", "no-store")],
            format!("served {}", seen.uri.path()),
        )
    })
    .await
}

async fn proxy_for(origin: &Origin) -> Larder {
    Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await
}

/// The attack's bytes: a request whose framing is in question, carrying in its (apparent) body
/// a request for `/smuggled`, then a request that closes the connection.
fn smuggle(head: &str, body: &str) -> Vec<u8> {
    format!(
        "{head}\r\n\r\n{body}GET /last HTTP/1.1\r\nhost: a.example\r\nconnection: close\r\n\r\n"
    )
    .into_bytes()
}

const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nhost: a.example\r\n\r\n";

/// The invariant of every framing case: the origin never sees the smuggled request, and every
/// request it sees was answered to the client (no desynchronised extra request).
fn assert_not_smuggled(case: &str, origin: &Origin, before: usize, raw: &str) {
    let paths: Vec<String> = origin.requests()[before..]
        .iter()
        .map(|r| r.uri.path().to_owned())
        .collect();
    assert!(
        !paths.iter().any(|p| p == "/smuggled"),
        "{case}: the origin saw a smuggled request: {paths:?}\n{raw}"
    );
    assert!(
        paths.len() <= raw::statuses(raw).len(),
        "{case}: the origin saw more requests than the client got answers: {paths:?}\n{raw}"
    );
}

/// Each case: request head lines (after the request line), the body bytes, and whether the
/// proxy must refuse it (400 and close). The others (both framings at once) are read as
/// chunked, as RFC 9112 §6.3 says, forwarded re-framed, and the connection closed after.
const REQUEST_CASES: &[(&str, &str, &str, bool)] = &[
    (
        "CL then TE",
        "content-length: 6\r\ntransfer-encoding: chunked",
        "0\r\n\r\n",
        false,
    ),
    (
        "TE then CL",
        "transfer-encoding: chunked\r\ncontent-length: 6",
        "0\r\n\r\n",
        false,
    ),
    (
        "space before colon",
        "transfer-encoding : chunked\r\ncontent-length: 6",
        "0\r\n\r\n",
        true,
    ),
    (
        "vertical tab",
        "transfer-encoding:\x0bchunked\r\ncontent-length: 6",
        "0\r\n\r\n",
        true,
    ),
    (
        "xchunked",
        "transfer-encoding: xchunked\r\ncontent-length: 6",
        "0\r\n\r\n",
        true,
    ),
    (
        "chunked, identity",
        "transfer-encoding: chunked, identity",
        "0\r\n\r\n",
        true,
    ),
    (
        "chunked twice",
        "transfer-encoding: chunked\r\ntransfer-encoding: chunked",
        "0\r\n\r\n",
        true,
    ),
    (
        "two different lengths",
        "content-length: 0\r\ncontent-length: 44",
        "",
        true,
    ),
    ("length list", "content-length: 0, 44", "", true),
    ("plus sign", "content-length: +44", "", true),
    ("hex length", "content-length: 0x2c", "", true),
    (
        "huge length",
        "content-length: 99999999999999999999999",
        "",
        true,
    ),
    (
        "chunk size overflow",
        "transfer-encoding: chunked",
        "fffffffffffffffffff1\r\nx\r\n0\r\n\r\n",
        true,
    ),
    (
        "bare LF in chunk",
        "transfer-encoding: chunked",
        "5\nhello\n0\n\n",
        true,
    ),
    (
        "CR in chunk extension",
        "transfer-encoding: chunked",
        "5;a=\rb\r\nhello\r\n0\r\n\r\n",
        true,
    ),
    ("obs-fold", "x-note: a\r\n b\r\ncontent-length: 0", "", true),
    (
        "NUL in a value",
        "x-note: a\0b\r\ncontent-length: 0",
        "",
        true,
    ),
    (
        "bare CR in a value",
        "x-note: a\rb\r\ncontent-length: 0",
        "",
        true,
    ),
];

#[tokio::test]
async fn smuggling_attempts_are_refused_and_never_reach_the_origin() {
    let origin = echo_origin().await;
    let larder = proxy_for(&origin).await;
    let proxy = larder.server.proxy_addrs[0];
    for (case, headers, body, must_refuse) in REQUEST_CASES {
        let before = origin.count();
        let attack = smuggle(
            &format!("POST /framed HTTP/1.1\r\nhost: a.example\r\n{headers}"),
            &format!("{body}{SMUGGLED}"),
        );
        let raw = raw::exchange(proxy, &attack).await;
        let statuses = raw::statuses(&raw);
        if *must_refuse {
            assert_eq!(statuses, [400], "{case}: refused once, then closed\n{raw}");
            assert_eq!(origin.count(), before, "{case}: nothing reached the origin");
        } else {
            assert_eq!(statuses, [200], "{case}: answered once, then closed\n{raw}");
            assert_eq!(origin.count(), before + 1, "{case}");
            let seen = origin.last();
            assert_eq!(seen.uri.path(), "/framed", "{case}");
            assert!(seen.body.is_empty(), "{case}: the chunked reading wins");
            assert!(
                seen.headers.get("transfer-encoding").is_none()
                    || seen.headers.get("content-length").is_none(),
                "{case}: re-framed with one framing"
            );
        }
        assert_not_smuggled(case, &origin, before, &raw);
    }
}

#[tokio::test]
async fn an_oversized_chunk_extension_is_refused() {
    let origin = echo_origin().await;
    let larder = proxy_for(&origin).await;
    let extension = "a".repeat(64 * 1024);
    let attack = smuggle(
        "POST /ext HTTP/1.1\r\nhost: a.example\r\ntransfer-encoding: chunked",
        &format!("5;{extension}\r\nhello\r\n0\r\n\r\n{SMUGGLED}"),
    );
    let raw = raw::exchange(larder.server.proxy_addrs[0], &attack).await;
    let statuses = raw::statuses(&raw);
    assert!(statuses.is_empty() || statuses == [400], "{raw}");
    assert_not_smuggled("oversized chunk extension", &origin, 0, &raw);
    assert_eq!(origin.count(), 0);
}

/// An origin that says which host and path it served, cacheable for a minute.
async fn cacheable_echo_origin() -> Origin {
    Origin::start(|seen| async move {
        response(
            200,
            &[("cache-control", "max-age=60")],
            format!("served {} {}", seen.header("host"), seen.uri.path()),
        )
    })
    .await
}

#[tokio::test]
async fn absolute_form_targets_win_over_host_for_the_origin_and_the_key_alike() {
    let origin = cacheable_echo_origin().await;
    let larder = proxy_for(&origin).await;
    let proxy = larder.server.proxy_addrs[0];
    let raw = raw::exchange(
        proxy,
        b"GET http://b.example/page HTTP/1.1\r\nhost: a.example\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(raw.ends_with("served b.example /page"), "{raw}");
    assert_eq!(origin.last().header("host"), "b.example");
    // Stored under b.example: a request for a.example is its own miss, with its own answer.
    let a = raw::exchange(
        proxy,
        b"GET /page HTTP/1.1\r\nhost: a.example\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(a.ends_with("served a.example /page"), "{a}");
    assert_eq!(origin.count(), 2);
}

#[tokio::test]
async fn an_h2c_upgrade_is_neither_performed_nor_forwarded() {
    let origin = echo_origin().await;
    let larder = proxy_for(&origin).await;
    let raw = raw::exchange(
        larder.server.proxy_addrs[0],
        b"GET /up HTTP/1.1\r\nhost: a.example\r\nupgrade: h2c\r\nhttp2-settings: AAMAAABkAARAAAAAAAIAAAAA\r\nconnection: Upgrade, HTTP2-Settings, close\r\n\r\n",
    )
    .await;
    assert_eq!(raw::statuses(&raw), [200], "{raw}");
    // A status line, not any "101": the random X-Request-Id holds one in about 1 run of 140.
    assert!(!raw.contains("HTTP/1.1 101"), "{raw}");
    assert!(!raw.to_ascii_lowercase().contains("upgrade: h2c"), "{raw}");
    let seen = origin.last();
    assert!(seen.headers.get("upgrade").is_none(), "{:?}", seen.headers);
    assert!(seen.headers.get("http2-settings").is_none());
}

#[tokio::test]
async fn a_body_on_a_cached_get_is_consumed_never_read_as_a_request() {
    let origin = cacheable_echo_origin().await;
    let larder = proxy_for(&origin).await;
    let proxy = larder.server.proxy_addrs[0];
    let primed = larder.get_with("/cached", &[("host", "a.example")]).await;
    assert!(
        primed.cache_status().contains("stored"),
        "{}",
        primed.cache_status()
    );
    let before = origin.count();
    let attack = format!(
        "GET /cached HTTP/1.1\r\nhost: a.example\r\ncontent-length: {}\r\n\r\n{SMUGGLED}GET /second HTTP/1.1\r\nhost: a.example\r\nconnection: close\r\n\r\n",
        SMUGGLED.len()
    );
    let raw = raw::exchange(proxy, attack.as_bytes()).await;
    let paths: Vec<String> = origin.requests()[before..]
        .iter()
        .map(|r| r.uri.path().to_owned())
        .collect();
    assert!(!paths.contains(&"/smuggled".to_owned()), "{paths:?}\n{raw}");
    // The hit is answered; the pipelined request after the body is served, or the connection
    // closed after the hit (hyper does not always drain an unread body): never the body.
    let statuses = raw::statuses(&raw);
    assert!(statuses == [200, 200] || statuses == [200], "{raw}");
    assert!(raw.contains("hit"), "{raw}");
}

#[tokio::test]
async fn malformed_origin_responses_are_never_stored_and_never_poison_the_pool() {
    // Each path answers with one framing fault, cacheable if it were believed.
    let (origin, heads) = raw::origin(|head| {
        let path = raw::target(head);
        let reply: &str = match path {
            "/cl-te" => "HTTP/1.1 200 OK\r\ncache-control: max-age=600\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n5\r\nclean\r\n0\r\n\r\n",
            "/two-cl" => "HTTP/1.1 200 OK\r\ncache-control: max-age=600\r\ncontent-length: 5\r\ncontent-length: 7\r\n\r\nabcdefg",
            "/extra" => "HTTP/1.1 200 OK\r\ncache-control: no-store\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\ncache-control: max-age=600\r\ncontent-length: 8\r\n\r\npoisoned",
            _ => "HTTP/1.1 200 OK\r\ncache-control: no-store\r\ncontent-length: 4\r\n\r\nreal",
        };
        reply.as_bytes().to_vec()
    })
    .await;
    let yaml = config_yaml(origin, DEFAULT_TYPES);
    let larder = Larder::start(&yaml).await;

    // Both framings: the chunked reading is the only one a client may see, and it is not
    // stored (the origin is asked again).
    let first = larder.get("/cl-te").await;
    assert!(
        first.status == 502 || first.text() == "clean",
        "{}",
        first.text()
    );
    let again = larder.get("/cl-te").await;
    assert!(
        !again.cache_status().contains("hit"),
        "{}",
        again.cache_status()
    );

    // Two lengths: refused as invalid, not stored.
    let two = larder.get("/two-cl").await;
    assert_eq!(two.status, 502);
    assert!(!larder.get("/two-cl").await.cache_status().contains("hit"));

    // Bytes after the body: the next request on that connection must not read them as its
    // response.
    assert_eq!(larder.get("/extra").await.text(), "ok");
    for _ in 0..3 {
        let next = larder.get("/next").await;
        assert_eq!(next.text(), "real", "a pooled connection was poisoned");
    }
    let asked: Vec<String> = heads
        .lock()
        .unwrap()
        .iter()
        .map(|h| raw::target(h).to_owned())
        .collect();
    assert_eq!(
        asked.iter().filter(|p| *p == "/next").count(),
        3,
        "{asked:?}"
    );
}

/// Larder's own HTTP/1.1 server answers bodiless requests and hands the connection to hyper at
/// the first one that is not: pipelined requests across that hand-over are answered in order,
/// each with its own framing, and the POST's body reaches the origin as a body.
#[tokio::test]
async fn pipelined_requests_are_answered_in_order_across_the_hand_over_to_hyper() {
    let origin = Origin::start(|seen| async move {
        let cache = if seen.method == http::Method::POST {
            "no-store"
        } else {
            "max-age=60"
        };
        response(
            200,
            &[("cache-control", cache)],
            format!(
                "{} {} [{}]\n",
                seen.method,
                seen.uri.path(),
                seen.body.len()
            ),
        )
    })
    .await;
    let larder = proxy_for(&origin).await;
    let proxy = larder.server.proxy_addrs[0];
    let primed = larder.get_with("/hit", &[("host", "a.example")]).await;
    assert!(primed.cache_status().contains("stored"));
    let raw = raw::exchange(
        proxy,
        b"GET /hit HTTP/1.1\r\nhost: a.example\r\n\r\n\
          HEAD /hit HTTP/1.1\r\nhost: a.example\r\n\r\n\
          GET /miss HTTP/1.1\r\nhost: a.example\r\n\r\n\
          POST /post HTTP/1.1\r\nhost: a.example\r\ncontent-length: 5\r\n\r\nhello\
          GET /hit HTTP/1.1\r\nhost: a.example\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(raw::statuses(&raw), [200, 200, 200, 200, 200], "{raw}");
    let bodies: Vec<&str> = raw
        .split("HTTP/1.1 ")
        .skip(1)
        .map(|response| response.split_once("\r\n\r\n").map_or("", |(_, body)| body))
        .collect();
    assert_eq!(
        bodies,
        [
            "GET /hit [0]\n",
            "",
            "GET /miss [0]\n",
            "POST /post [5]\n",
            "GET /hit [0]\n"
        ],
        "{raw}"
    );
    // HEAD keeps the GET's length; every response says when it ends.
    let head = raw.split("HTTP/1.1 ").nth(2).unwrap();
    assert!(head.contains("content-length: 13\r\n"), "{head}");
    assert!(raw.matches("\r\ndate: ").count() == 5, "{raw}");
    assert!(raw.ends_with("GET /hit [0]\n"), "{raw}");
    let last = raw.rsplit("HTTP/1.1 ").next().unwrap();
    assert!(last.contains("connection: close\r\n"), "{last}");
    let paths: Vec<String> = origin
        .requests()
        .iter()
        .map(|r| r.uri.path().to_owned())
        .collect();
    assert_eq!(
        paths,
        ["/hit", "/miss", "/post"],
        "hits never reach the origin"
    );
}

/// A head that arrives a few bytes at a time is read until complete; a body of unknown length
/// from the origin is sent chunked.
#[tokio::test]
async fn a_head_in_pieces_is_assembled_and_an_unknown_length_is_sent_chunked() {
    use http_body_util::StreamBody;
    use tokio::io::AsyncWriteExt;
    let origin = Origin::start(|_| async move {
        let chunks = ["first ", "second"].map(|c| {
            Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(bytes::Bytes::from_static(
                c.as_bytes(),
            )))
        });
        let body = StreamBody::new(futures_util::stream::iter(chunks));
        let body = http_body_util::BodyExt::map_err(body, |never| match never {});
        http::Response::builder()
            .header("cache-control", "no-store")
            .body(http_body_util::BodyExt::boxed_unsync(body))
            .unwrap()
    })
    .await;
    let larder = proxy_for(&origin).await;
    let mut stream = tokio::net::TcpStream::connect(larder.server.proxy_addrs[0])
        .await
        .unwrap();
    let request = b"GET /pieces HTTP/1.1\r\nhost: a.example\r\nconnection: close\r\n\r\n";
    for piece in request.chunks(7) {
        stream.write_all(piece).await.unwrap();
        stream.flush().await.unwrap();
        tokio::task::yield_now().await;
    }
    let raw = raw::until_closed(&mut stream, std::time::Duration::from_secs(10))
        .await
        .expect("closed after the response");
    let raw = String::from_utf8_lossy(&raw);
    assert_eq!(raw::statuses(&raw), [200], "{raw}");
    assert!(raw.contains("transfer-encoding: chunked\r\n"), "{raw}");
    assert!(!raw.contains("content-length"), "{raw}");
    // De-chunked, the body is whole.
    let (_, mut chunked) = raw.split_once("\r\n\r\n").unwrap();
    let mut body = String::new();
    loop {
        let (size, rest) = chunked.split_once("\r\n").expect("a chunk size line");
        let size = usize::from_str_radix(size, 16).expect("hex chunk size");
        if size == 0 {
            assert_eq!(rest, "\r\n", "{raw}");
            break;
        }
        body.push_str(&rest[..size]);
        chunked = rest[size..]
            .strip_prefix("\r\n")
            .expect("CRLF after a chunk");
    }
    assert_eq!(body, "first second", "{raw}");
    assert!(raw.ends_with("0\r\n\r\n"), "{raw}");
}

/// A hit over HTTP/1 writes the stored fields as encoded at store time: each must go out once,
/// framing fields must be this hop's own, and fields the proxy sets (Cache-Status, X-Request-Id)
/// must replace the origin's, exactly as the same hit answered over HTTP/2 by hyper.
#[tokio::test]
async fn a_hit_over_http1_carries_the_same_fields_as_over_http2() {
    let origin = Origin::fixed(
        200,
        &[
            ("cache-control", "max-age=600"),
            ("etag", "\"v1\""),
            ("x-request-id", "set-by-origin"),
            ("cache-status", "upstream; hit"),
            ("x-listed", "first"),
            ("x-listed", "second"),
            ("via", "1.1 origin-side"),
        ],
        "stored body",
    )
    .await;
    let larder = proxy_for(&origin).await;
    let primed = larder.get("/fields").await;
    assert!(
        primed.cache_status().contains("stored"),
        "{}",
        primed.cache_status()
    );

    let proxy = larder.server.proxy_addrs[0];
    let request = format!(
        "GET /fields HTTP/1.1\r\nhost: {proxy}\r\nx-request-id: asked-1\r\nconnection: close\r\n\r\n"
    );
    let raw = raw::exchange(proxy, request.as_bytes()).await;
    let (head, body) = raw.split_once("\r\n\r\n").expect("a complete head");
    assert_eq!(body, "stored body", "{raw}");
    let mut lines = head.lines();
    assert_eq!(lines.next(), Some("HTTP/1.1 200 OK"), "{raw}");
    let mut over_http1: Vec<(String, String)> = lines
        .map(|line| {
            let (name, value) = line.split_once(": ").expect("name: value");
            (name.to_ascii_lowercase(), value.to_owned())
        })
        .collect();
    let count = |name: &str| over_http1.iter().filter(|(n, _)| n == name).count();
    for once in [
        "date",
        "content-length",
        "x-request-id",
        "cache-status",
        "age",
    ] {
        assert_eq!(count(once), 1, "{once} once: {raw}");
    }
    assert_eq!(count("transfer-encoding"), 0, "{raw}");
    let value = |name: &str| {
        over_http1
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    assert_eq!(value("x-request-id"), "asked-1", "{raw}");
    assert!(value("cache-status").starts_with("larder; hit"), "{raw}");
    assert_eq!(value("content-length"), "11", "{raw}");
    let listed: Vec<&str> = over_http1
        .iter()
        .filter(|(n, _)| n == "x-listed")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(listed, ["first", "second"], "{raw}");

    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let response = h2
        .request(
            http::Request::get(larder.proxy_url("/fields"))
                .header("x-request-id", "asked-1")
                .body(Default::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    let mut over_http2: Vec<(String, String)> = response
        .headers()
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.to_str().unwrap().to_owned()))
        .collect();
    // Age, and the ttl Cache-Status shows, may tick between the two hits; Connection is
    // HTTP/1's alone.
    for fields in [&mut over_http1, &mut over_http2] {
        fields.retain(|(n, _)| n != "age" && n != "connection");
        for (name, value) in fields.iter_mut() {
            if name == "cache-status" {
                *value = value
                    .split("; ")
                    .filter(|part| !part.starts_with("ttl="))
                    .collect::<Vec<_>>()
                    .join("; ");
            }
        }
        fields.sort();
    }
    assert_eq!(over_http1, over_http2);
    assert_eq!(origin.count(), 1, "both were hits");
}

#[tokio::test]
async fn a_head_miss_fetched_as_a_get_sends_no_body_on_the_connection() {
    let origin = Origin::start(|seen| async move {
        response(
            200,
            &[("cache-control", "max-age=60")],
            format!("{} {}\n", seen.method, seen.uri.path()),
        )
    })
    .await;
    let larder = proxy_for(&origin).await;
    let raw = raw::exchange(
        larder.server.proxy_addrs[0],
        b"HEAD /cold HTTP/1.1\r\nhost: a.example\r\n\r\n\
          GET /cold HTTP/1.1\r\nhost: a.example\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(raw::statuses(&raw), [200, 200], "{raw}");
    // The HEAD's answer carries the GET's length and no body: the next response follows it.
    let head = raw.split("HTTP/1.1 ").nth(1).unwrap();
    assert!(head.contains("content-length: 10\r\n"), "{head}");
    assert!(head.ends_with("\r\n\r\n"), "{head}");
    assert!(raw.ends_with("\r\n\r\nGET /cold\n"), "{raw}");
    // Served by the HEAD's fill (stored, or still being read along).
    assert_eq!(origin.count(), 1);
    assert_eq!(origin.last().method, http::Method::GET);
}

//! HTTP/2 abuse with raw frames over cleartext (prior knowledge): rapid reset, CONTINUATION
//! flood, HPACK bomb, PING and SETTINGS floods from a client that never reads, content-length
//! against DATA, pseudo-header abuse, and :authority against Host. Pass: GOAWAY or close after
//! a bounded count, the protocol-error counter moves, and a request made meanwhile is served.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::common::*;
use super::rss_bytes;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK literal without indexing, the name from the static table (`index`) or literal (0).
fn literal(index: u8, name: &str, value: &str) -> Vec<u8> {
    // The index is a 4-bit prefix integer: 15 and above continue in the next byte.
    let mut out = if index < 15 {
        vec![index]
    } else {
        vec![0x0f, index - 15]
    };
    if index == 0 {
        out.push(name.len() as u8);
        out.extend_from_slice(name.as_bytes());
    }
    assert!(value.len() < 127);
    out.push(value.len() as u8);
    out.extend_from_slice(value.as_bytes());
    out
}

/// A GET's header block: :method GET, :scheme http, :path, :authority.
fn get_block(path: &str, authority: &str) -> Vec<u8> {
    let mut block = vec![0x82, 0x86];
    block.extend(literal(4, "", path));
    block.extend(literal(1, "", authority));
    block
}

/// A client connection that has sent the preface and an empty SETTINGS.
async fn h2(proxy: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    stream.write_all(PREFACE).await.unwrap();
    stream.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    stream
}

/// Frames received until the connection closes (bounded), as (type, flags, stream, payload).
async fn frames_until_closed(stream: &mut TcpStream) -> Vec<(u8, u8, u32, Vec<u8>)> {
    let bytes = super::raw::until_closed(stream, Duration::from_secs(10))
        .await
        .expect("the server closes the connection");
    parse(&bytes)
}

/// The error code of the GOAWAY among `frames`, if one came.
fn goaway_code(frames: &[(u8, u8, u32, Vec<u8>)]) -> Option<u32> {
    frames
        .iter()
        .find(|f| f.0 == GOAWAY)
        .map(|f| u32::from_be_bytes(f.3[4..8].try_into().unwrap()))
}

fn h2_errors(metrics: &str, reason: &str) -> f64 {
    metric(
        metrics,
        &format!(r#"larder_downstream_protocol_errors_total{{protocol="h2",reason="{reason}"}}"#),
    )
    .unwrap_or(0.0)
}

async fn proxy() -> (Origin, Larder) {
    let origin = Origin::fixed(200, &[("cache-control", "max-age=600")], "fine").await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    (origin, larder)
}

/// Opens 2,000 streams, each a GET followed by `then(stream id)`, checks a normal request is
/// served meanwhile, and returns what the server sent until it closed the connection.
async fn stream_attack(
    then: impl Fn(u32) -> Vec<u8>,
) -> (Origin, Larder, Vec<(u8, u8, u32, Vec<u8>)>) {
    let (origin, larder) = proxy().await;
    let mut stream = h2(larder.server.proxy_addrs[0]).await;
    let mut attack = Vec::new();
    for i in 0..2_000u32 {
        let id = 2 * i + 1;
        attack.extend(frame(
            HEADERS,
            END_STREAM | END_HEADERS,
            id,
            &get_block("/attacked", "a.example"),
        ));
        attack.extend(then(id));
    }
    let _ = stream.write_all(&attack).await;
    assert_eq!(
        larder.get("/health").await.text(),
        "fine",
        "served during the attack"
    );
    let frames = frames_until_closed(&mut stream).await;
    (origin, larder, frames)
}

#[tokio::test]
async fn rapid_reset_ends_in_goaway_after_a_bounded_count() {
    let (origin, larder, frames) =
        stream_attack(|id| frame(RST_STREAM, 0, id, &8u32.to_be_bytes())).await;
    assert_eq!(goaway_code(&frames), Some(11), "GOAWAY ENHANCE_YOUR_CALM");
    assert!(origin.count() <= 2_000);
    assert!(h2_errors(&larder.metrics().await, "ENHANCE_YOUR_CALM") >= 1.0);
}

#[tokio::test]
async fn server_provoked_resets_end_in_goaway_after_a_bounded_count() {
    // MadeYouReset (CVE-2025-8671): each stream is opened, then made invalid (DATA after the
    // client ended it), so the server itself resets it; the work behind it goes on unless the
    // count of such resets is bounded. h2 may also treat the frame as a connection error at
    // once, which ends the attack sooner.
    let (origin, larder, frames) = stream_attack(|id| frame(DATA, 0, id, b"late")).await;
    let resets = frames.iter().filter(|f| f.0 == RST_STREAM).count();
    let code = goaway_code(&frames).expect("GOAWAY");
    assert!(
        resets <= 300,
        "{resets} resets before the connection was closed"
    );
    assert!(
        origin.count() <= 300,
        "{} requests reached the origin",
        origin.count()
    );
    let reason = if code == 11 {
        "ENHANCE_YOUR_CALM"
    } else {
        "PROTOCOL_ERROR"
    };
    assert!(
        h2_errors(&larder.metrics().await, reason) >= 1.0,
        "GOAWAY {code}"
    );
}

#[tokio::test]
async fn a_continuation_flood_is_cut_off() {
    let (_origin, larder) = proxy().await;
    let mut stream = h2(larder.server.proxy_addrs[0]).await;
    let _ = stream
        .write_all(&frame(HEADERS, 0, 1, &get_block("/c", "a.example")))
        .await;
    let junk = literal(0, "x-junk", &"j".repeat(100));
    let block: Vec<u8> = junk.iter().copied().cycle().take(16_000).collect();
    let mut sent = 0usize;
    for _ in 0..2_000 {
        if stream
            .write_all(&frame(CONTINUATION, 0, 1, &block))
            .await
            .is_err()
        {
            break;
        }
        sent += 1;
    }
    let frames = frames_until_closed(&mut stream).await;
    assert!(
        goaway_code(&frames).is_some() || sent < 2_000,
        "never cut off"
    );
    assert_eq!(larder.get("/health").await.text(), "fine");
}

#[tokio::test]
async fn an_hpack_bomb_is_refused() {
    let (origin, larder) = proxy().await;
    let mut stream = h2(larder.server.proxy_addrs[0]).await;
    // One 4 KiB value put in the dynamic table (literal with incremental indexing), then
    // referenced thousands of times: a few bytes each on the wire, 4 KiB each decoded.
    let mut block = get_block("/bomb", "a.example");
    block.push(0x40);
    block.push(6);
    block.extend_from_slice(b"x-bomb");
    block.extend([0x7f, 0x81, 0x1f]); // length 4096 as a 7-bit prefix integer (127 + 3969)
    block.extend(std::iter::repeat_n(b'b', 4096));
    // The newest dynamic entry is index 62 (0x80 | 62).
    block.extend(std::iter::repeat_n(0x80 | 62, 4_000));
    let mut wire = Vec::new();
    let mut chunks = block.chunks(16_000).peekable();
    let first = chunks.next().unwrap();
    let last = chunks.peek().is_none();
    wire.extend(frame(
        HEADERS,
        END_STREAM | if last { END_HEADERS } else { 0 },
        1,
        first,
    ));
    while let Some(chunk) = chunks.next() {
        let flags = if chunks.peek().is_none() {
            END_HEADERS
        } else {
            0
        };
        wire.extend(frame(CONTINUATION, flags, 1, chunk));
    }
    let _ = stream.write_all(&wire).await;
    let frames = frames_until_closed_or_answer(&mut stream).await;
    // Refused: a 431, a reset stream or the connection closed; never sent to the origin.
    let answered_ok = frames
        .iter()
        .any(|f| f.0 == HEADERS && f.3.first() == Some(&0x88));
    assert!(!answered_ok, "a 16 MiB header list was accepted");
    assert_eq!(origin.count(), 0);
    assert_eq!(larder.get("/health").await.text(), "fine");
}

/// Like `frames_until_closed`, but also stops at a response or reset for stream 1.
async fn frames_until_closed_or_answer(stream: &mut TcpStream) -> Vec<(u8, u8, u32, Vec<u8>)> {
    let read = async {
        let mut all = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
            if contains_frame_for_stream_1(&all) {
                break;
            }
        }
        all
    };
    let bytes = tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("an answer, a reset or a close");
    parse(&bytes)
}

fn parse(bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
    let mut frames = Vec::new();
    let mut at = 0;
    while at + 9 <= bytes.len() {
        let len = (usize::from(bytes[at]) << 16)
            | (usize::from(bytes[at + 1]) << 8)
            | usize::from(bytes[at + 2]);
        let stream = u32::from_be_bytes(bytes[at + 5..at + 9].try_into().unwrap()) & 0x7fff_ffff;
        let end = (at + 9 + len).min(bytes.len());
        frames.push((
            bytes[at + 3],
            bytes[at + 4],
            stream,
            bytes[at + 9..end].to_vec(),
        ));
        at += 9 + len;
    }
    frames
}

fn contains_frame_for_stream_1(bytes: &[u8]) -> bool {
    parse(bytes).iter().any(|f| {
        (f.0 == HEADERS || f.0 == RST_STREAM || f.0 == GOAWAY) && (f.2 == 1 || f.0 == GOAWAY)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_and_settings_floods_from_a_client_that_never_reads_stay_bounded() {
    // A separate process, so its memory is measured alone (demo mode: built-in origin).
    let (larder, proxy, _admin) = tokio::task::block_in_place(|| {
        spawn(&["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
    });
    let pid = larder.0.id();
    let health = || async move {
        let url = format!("http://{proxy}/");
        send(&client(), http::Method::GET, &url, &[], bytes::Bytes::new())
            .await
            .status
    };
    assert_eq!(health().await, 200);
    let before = rss_bytes(pid);
    for kind in [PING, SETTINGS] {
        let mut stream = h2(proxy).await;
        let one = if kind == PING {
            frame(PING, 0, 0, &[7; 8])
        } else {
            frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100])
        };
        let burst: Vec<u8> = one
            .iter()
            .copied()
            .cycle()
            .take(one.len() * 1_000)
            .collect();
        // Never read: the server must stop reading (backpressure) or close, not queue answers.
        let mut written = 0usize;
        let flood = async {
            for _ in 0..2_000 {
                if stream.write_all(&burst).await.is_err() {
                    break;
                }
                written += 1;
            }
        };
        let finished = tokio::time::timeout(Duration::from_secs(2), flood)
            .await
            .is_ok();
        assert!(
            !finished || written < 2_000,
            "{} MiB of {} frames taken without reading a byte",
            (written * burst.len()) >> 20,
            if kind == PING { "PING" } else { "SETTINGS" }
        );
        assert_eq!(health().await, 200, "served during the flood");
    }
    // Flat memory: the answers a flood asks for are not queued without bound.
    let growth = rss_bytes(pid).saturating_sub(before);
    assert!(
        growth < 32 << 20,
        "RSS grew by {} MiB during the floods",
        growth >> 20
    );
}

#[tokio::test]
async fn malformed_requests_are_reset_and_never_forwarded() {
    let (origin, larder) = proxy().await;
    let proxy = larder.server.proxy_addrs[0];
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    // content-length 10, then 20 bytes of DATA.
    let mut with_length = vec![0x83, 0x86]; // :method POST, :scheme http
    with_length.extend(literal(4, "", "/cl"));
    with_length.extend(literal(1, "", "a.example"));
    with_length.extend(literal(28, "", "10")); // content-length
    let mut wire = frame(HEADERS, END_HEADERS, 1, &with_length);
    wire.extend(frame(DATA, END_STREAM, 1, &[b'x'; 20]));
    cases.push(("content-length against DATA", wire));
    // Two :path pseudo-headers.
    let mut twice = get_block("/one", "a.example");
    twice.extend(literal(4, "", "/two"));
    cases.push((
        "duplicate :path",
        frame(HEADERS, END_STREAM | END_HEADERS, 1, &twice),
    ));
    // An upper-case field name.
    let mut upper = get_block("/upper", "a.example");
    upper.extend(literal(0, "X-Upper", "1"));
    cases.push((
        "upper-case name",
        frame(HEADERS, END_STREAM | END_HEADERS, 1, &upper),
    ));
    // A connection-specific field.
    let mut conn = get_block("/conn", "a.example");
    conn.extend(literal(0, "connection", "keep-alive"));
    cases.push((
        "connection field",
        frame(HEADERS, END_STREAM | END_HEADERS, 1, &conn),
    ));
    // A pseudo-header after a regular one.
    let mut late = vec![0x82, 0x86];
    late.extend(literal(1, "", "a.example"));
    late.extend(literal(0, "x-early", "1"));
    late.extend(literal(4, "", "/late"));
    cases.push((
        "pseudo-header after a field",
        frame(HEADERS, END_STREAM | END_HEADERS, 1, &late),
    ));
    for (case, wire) in cases {
        let mut stream = h2(proxy).await;
        stream.write_all(&wire).await.unwrap();
        let frames = frames_until_closed_or_answer(&mut stream).await;
        let reset = frames
            .iter()
            .any(|f| (f.0 == RST_STREAM && f.2 == 1) || f.0 == GOAWAY);
        let bad_request = frames
            .iter()
            .any(|f| f.0 == HEADERS && f.2 == 1 && f.3.first() != Some(&0x88));
        assert!(
            reset || bad_request,
            "{case}: neither reset nor refused: {frames:?}"
        );
    }
    assert_eq!(origin.count(), 0, "a malformed request reached the origin");
}

#[tokio::test]
async fn authority_and_host_must_agree() {
    let (origin, larder) = proxy().await;
    let mut stream = h2(larder.server.proxy_addrs[0]).await;
    let mut block = get_block("/who", "a.example");
    block.extend(literal(38, "", "b.example")); // host
    stream
        .write_all(&frame(HEADERS, END_STREAM | END_HEADERS, 1, &block))
        .await
        .unwrap();
    let frames = frames_until_closed_or_answer(&mut stream).await;
    // Malformed (RFC 9113 §8.3.1): the stream is reset with PROTOCOL_ERROR (1).
    let reset = frames
        .iter()
        .find(|f| f.0 == RST_STREAM && f.2 == 1)
        .unwrap_or_else(|| panic!("not reset: {frames:?}"));
    assert_eq!(reset.3, 1u32.to_be_bytes());
    assert_eq!(origin.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_opens_its_window_and_stops_reading_is_cut_off() {
    // The client's flow-control windows are wide open, so only the socket can hold the proxy
    // back: its writes (the connection's small frames held for a batch, the big DATA frames
    // written through) stall, and the write limit ends the connection.
    let (_origin, larder) = super::exhaustion::big_object_cached().await;
    let mut stream = TcpStream::connect(larder.server.proxy_addrs[0])
        .await
        .unwrap();
    const INITIAL_WINDOW_SIZE: u16 = 0x4;
    const WINDOW_UPDATE: u8 = 0x8;
    const MAX_WINDOW: u32 = (1 << 31) - 1;
    let mut settings = INITIAL_WINDOW_SIZE.to_be_bytes().to_vec();
    settings.extend_from_slice(&MAX_WINDOW.to_be_bytes());
    let mut wire = PREFACE.to_vec();
    wire.extend(frame(SETTINGS, 0, 0, &settings));
    wire.extend(frame(
        WINDOW_UPDATE,
        0,
        0,
        &(MAX_WINDOW - 65_535).to_be_bytes(),
    ));
    wire.extend(frame(
        HEADERS,
        END_STREAM | END_HEADERS,
        1,
        &get_block("/big", "a.example"),
    ));
    stream.write_all(&wire).await.unwrap();
    super::exhaustion::assert_cut_off_for_a_stalled_write(&larder, &mut stream).await;
}

/// `Expect: 100-continue` over HTTP/2: the client is told to go on (`:status 100`) as soon as
/// the request body is waited for, and the request is then answered.
#[tokio::test]
async fn an_expect_continue_upload_gets_its_100_before_sending_the_body() {
    let (origin, larder) = proxy().await;
    let mut stream = h2(larder.server.proxy_addrs[0]).await;
    let mut block = vec![0x83, 0x86]; // :method POST, :scheme http
    block.extend(literal(4, "", "/upload"));
    block.extend(literal(1, "", "a.example"));
    block.extend(literal(35, "", "100-continue")); // expect
    block.extend(literal(28, "", "5")); // content-length
    stream
        .write_all(&frame(HEADERS, END_HEADERS, 1, &block))
        .await
        .unwrap();
    // Frames until the 100 (a literal :status, name index 8, possibly after a table size
    // update), bounded in time.
    let mut read = Vec::new();
    let got_100 = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before the 100: {:?}", parse(&read));
            read.extend_from_slice(&buf[..n]);
            let continued = parse(&read)
                .iter()
                .any(|f| f.0 == HEADERS && f.2 == 1 && f.3.ends_with(&[0x08, 3, b'1', b'0', b'0']));
            if continued {
                return;
            }
        }
    })
    .await;
    assert!(got_100.is_ok(), "no 100: {:?}", parse(&read));
    assert_eq!(origin.count(), 0, "the body is not sent yet");
    stream
        .write_all(&frame(DATA, END_STREAM, 1, b"hello"))
        .await
        .unwrap();
    let frames = frames_until_closed_or_answer(&mut stream).await;
    assert!(
        frames
            .iter()
            .any(|f| f.0 == HEADERS && f.2 == 1 && f.3.first() == Some(&0x88)),
        "no 200: {frames:?}"
    );
    assert_eq!(origin.last().body, "hello");
}

/// An HTTP/2 connection left with no stream open is sent GOAWAY (NO_ERROR) and closed after
/// `limits.http2_idle_timeout`; one request on it first does not keep it open for good.
#[tokio::test]
async fn an_idle_http2_connection_is_closed_after_the_idle_timeout() {
    let origin = Origin::fixed(200, &[("cache-control", "max-age=600")], "fine").await;
    let yaml = config_yaml(origin.addr, DEFAULT_TYPES) + "limits: { http2_idle_timeout: 300ms }\n";
    let larder = Larder::start(&yaml).await;
    let mut stream = h2(larder.server.proxy_addrs[0]).await;
    stream
        .write_all(&frame(
            HEADERS,
            END_STREAM | END_HEADERS,
            1,
            &get_block("/idle", "a.example"),
        ))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let frames = frames_until_closed(&mut stream).await;
    assert!(
        frames.iter().any(|f| f.0 == HEADERS && f.2 == 1),
        "the request was answered first: {frames:?}"
    );
    assert_eq!(goaway_code(&frames), Some(0), "{frames:?}");
    assert!(started.elapsed() >= Duration::from_millis(250));
}

/// A client that shuts its flow-control windows (SETTINGS_INITIAL_WINDOW_SIZE 0) and never
/// opens them holds its streams only for `limits.client_write_timeout`: then GOAWAY
/// ENHANCE_YOUR_CALM and the connection closes.
#[tokio::test]
async fn streams_held_behind_shut_windows_are_cut_off() {
    let origin = Origin::fixed(200, &[("cache-control", "max-age=600")], "fine").await;
    let yaml =
        config_yaml(origin.addr, DEFAULT_TYPES) + "limits: { client_write_timeout: 300ms }\n";
    let larder = Larder::start(&yaml).await;
    let mut stream = TcpStream::connect(larder.server.proxy_addrs[0])
        .await
        .unwrap();
    const INITIAL_WINDOW_SIZE: u16 = 0x4;
    let mut settings = INITIAL_WINDOW_SIZE.to_be_bytes().to_vec();
    settings.extend_from_slice(&0u32.to_be_bytes());
    let mut wire = PREFACE.to_vec();
    wire.extend(frame(SETTINGS, 0, 0, &settings));
    wire.extend(frame(
        HEADERS,
        END_STREAM | END_HEADERS,
        1,
        &get_block("/shut", "a.example"),
    ));
    stream.write_all(&wire).await.unwrap();
    let frames = frames_until_closed(&mut stream).await;
    assert!(
        frames.iter().any(|f| f.0 == HEADERS && f.2 == 1),
        "the response's head is not flow-controlled: {frames:?}"
    );
    assert!(
        !frames.iter().any(|f| f.0 == DATA && !f.3.is_empty()),
        "{frames:?}"
    );
    assert_eq!(goaway_code(&frames), Some(11), "{frames:?}");
}

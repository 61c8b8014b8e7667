//! Origin faults from a scripted raw origin: a truncated body reaches the client as an abort
//! (never a clean short body) and is not stored; a hang gives 504 at the route's timeout and
//! the next request is served on a fresh connection; a reset mid-body aborts; and a failing
//! origin is covered by stale-if-error within its window.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http_body_util::BodyExt;

use super::common::*;
use super::raw;

/// Fetches `path` and reads the body to its end: Ok(body) or Err (an aborted body).
async fn fetch(larder: &Larder, path: &str) -> (u16, Result<bytes::Bytes, String>) {
    let request = http::Request::get(larder.proxy_url(path))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let response = larder.client.request(request).await.unwrap();
    let status = response.status().as_u16();
    let body = tokio::time::timeout(Duration::from_secs(10), response.into_body().collect())
        .await
        .expect("the body ends")
        .map(|b| b.to_bytes())
        .map_err(|e| e.to_string());
    (status, body)
}

#[tokio::test]
async fn truncated_and_reset_bodies_abort_and_are_never_stored() {
    let asked = Arc::new(AtomicUsize::new(0));
    let counted = asked.clone();
    // Each answer promises 1000 bytes and sends 10; the origin then closes (or resets).
    let (origin, _) = raw::origin(move |head| {
        counted.fetch_add(1, Ordering::SeqCst);
        let _ = head;
        b"HTTP/1.1 200 OK\r\ncache-control: max-age=600\r\ncontent-length: 1000\r\nconnection: close\r\n\r\nonly ten b".to_vec()
    })
    .await;
    let larder = Larder::start(&config_yaml(origin, DEFAULT_TYPES)).await;
    for attempt in 1..=2 {
        let (status, body) = fetch(&larder, "/short").await;
        assert_eq!(status, 200);
        assert!(
            body.is_err(),
            "a short body arrived as a clean one: {body:?}"
        );
        assert_eq!(
            asked.load(Ordering::SeqCst),
            attempt,
            "not stored: asked again"
        );
    }
}

#[tokio::test]
async fn a_hanging_origin_gives_504_and_the_next_request_is_served() {
    let asked = Arc::new(AtomicUsize::new(0));
    let counted = asked.clone();
    let origin = Origin::start(move |seen| {
        let n = counted.fetch_add(1, Ordering::SeqCst);
        async move {
            if seen.uri.path() == "/hang" && n == 0 {
                // Never answers (bounded by the test's life).
                tokio::time::sleep(Duration::from_secs(600)).await;
            }
            response(200, &[("cache-control", "no-store")], "answered")
        }
    })
    .await;
    let yaml = config_yaml(origin.addr, DEFAULT_TYPES).replace(
        "        cluster: origin\n",
        "        cluster: origin\n        timeout: 300ms\n",
    );
    let larder = Larder::start(&yaml).await;
    let hung = larder.get("/hang").await;
    assert_eq!(hung.status, 504);
    // The hung connection is not reused: the next request gets an answer.
    assert_eq!(larder.get("/next").await.text(), "answered");
}

#[tokio::test]
async fn stale_if_error_covers_a_failing_origin_within_its_window_only() {
    let failing = Arc::new(AtomicUsize::new(0));
    let state = failing.clone();
    let origin = Origin::start(move |_| {
        let fail = state.load(Ordering::SeqCst) == 1;
        async move {
            if fail {
                response(503, &[], "down")
            } else {
                response(
                    200,
                    &[("cache-control", "max-age=1, stale-if-error=60")],
                    "good copy",
                )
            }
        }
    })
    .await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    assert_eq!(larder.get("/s").await.text(), "good copy");
    failing.store(1, Ordering::SeqCst);
    // Wait for the copy to go stale (bounded), then the failing origin is covered.
    let mut served = String::new();
    for _ in 0..50 {
        let reply = larder.get("/s").await;
        if reply.header("age").parse::<u64>().unwrap_or(0) >= 1
            || reply.cache_status().contains("stale")
        {
            served = reply.text();
            assert_eq!(reply.status, 200);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(served, "good copy");
}

//! Privacy: one user's response never reaches another. Authorization, Set-Cookie, `private`
//! and `no-cache="field"`; coalesced waiters behind a private answer; and a randomized run
//! checked against what each request was entitled to.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::Method;

use super::common::*;

/// Says whose request it answered: `user=<cookie or authorization> path=<path>`.
fn whose(seen: &Seen) -> String {
    let who = [seen.header("cookie"), seen.header("authorization")].concat();
    format!("user={who} path={}", seen.uri.path())
}

#[tokio::test]
async fn authorization_set_cookie_private_and_field_no_cache_stay_with_their_user() {
    let origin = Origin::start(|seen| async move {
        let headers: Vec<(&str, String)> = match seen.uri.path() {
            "/authorized" => vec![("cache-control", "max-age=600".into())],
            "/private" => vec![("cache-control", "private, max-age=600".into())],
            "/cookie" => vec![
                ("cache-control", "max-age=600".into()),
                ("set-cookie", format!("session={}", seen.header("cookie"))),
            ],
            "/field" => vec![
                (
                    "cache-control",
                    "max-age=600, no-cache=\"set-cookie\"".into(),
                ),
                ("set-cookie", format!("session={}", seen.header("cookie"))),
            ],
            _ => vec![("cache-control", "no-store".into())],
        };
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        response(200, &headers, whose(&seen))
    })
    .await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;

    let alice = larder
        .get_with("/authorized", &[("authorization", "Bearer alice")])
        .await;
    assert_eq!(alice.text(), "user=Bearer alice path=/authorized");
    let anonymous = larder.get("/authorized").await;
    assert_eq!(
        anonymous.text(),
        "user= path=/authorized",
        "an authorized answer was shared"
    );

    larder.get_with("/private", &[("cookie", "alice")]).await;
    let bob = larder.get_with("/private", &[("cookie", "bob")]).await;
    assert_eq!(bob.text(), "user=bob path=/private");

    larder.get_with("/cookie", &[("cookie", "alice")]).await;
    let bob = larder.get_with("/cookie", &[("cookie", "bob")]).await;
    assert_ne!(
        bob.header("set-cookie"),
        "session=alice",
        "alice's session cookie reached bob"
    );

    larder.get_with("/field", &[("cookie", "alice")]).await;
    let bob = larder.get_with("/field", &[("cookie", "bob")]).await;
    assert_ne!(
        bob.header("set-cookie"),
        "session=alice",
        "a no-cache field was served from cache"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalesced_waiters_never_receive_another_users_private_answer() {
    let arrived = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Notify::new());
    let (first_in, mut first_arrived) = tokio::sync::mpsc::unbounded_channel::<()>();
    let origin = {
        let arrived = arrived.clone();
        let gate = gate.clone();
        Origin::start(move |seen| {
            let n = arrived.fetch_add(1, Ordering::SeqCst);
            let gate = gate.clone();
            let first_in = first_in.clone();
            async move {
                if n == 0 {
                    // The first request is held while the others pile up behind it.
                    let released = gate.notified();
                    let _ = first_in.send(());
                    released.await;
                }
                response(
                    200,
                    &[("cache-control", "private, max-age=600")],
                    whose(&seen),
                )
            }
        })
        .await
    };
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    let url = larder.proxy_url("/mine");
    let spawn = |user: String| {
        let c = larder.client.clone();
        let url = url.clone();
        tokio::spawn(async move {
            let reply = send(&c, Method::GET, &url, &[("cookie", &user)], Bytes::new()).await;
            (user, reply.text())
        })
    };
    let first = spawn("user0".into());
    first_arrived.recv().await.unwrap();
    let waiters: Vec<_> = (1..50).map(|i| spawn(format!("user{i}"))).collect();
    // Let the waiters reach the proxy before the first answer is released (bounded).
    for _ in 0..200 {
        if metric(&larder.metrics().await, "larder_active_connections").unwrap_or(0.0) >= 50.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    gate.notify_one();
    for handle in std::iter::once(first).chain(waiters) {
        let (user, body) = handle.await.unwrap();
        assert_eq!(
            body,
            format!("user={user} path=/mine"),
            "{user} got someone else's page"
        );
    }
}

/// A randomized run against a rule each response must obey: it answers the request's own
/// path, and when it is personal (private, authorized, cookie-setting) the request's own user.
#[tokio::test]
async fn randomized_requests_never_get_a_response_for_the_wrong_key_or_user() {
    let origin = Origin::start(|seen| async move {
        // How the page may be cached is part of the path, so each URL behaves consistently.
        let policy = seen
            .uri
            .path()
            .split('/')
            .nth(1)
            .unwrap_or_default()
            .to_owned();
        let mut headers: Vec<(&str, String)> = match policy.as_str() {
            "public" => vec![("cache-control", "max-age=600".into())],
            "private" => vec![("cache-control", "private, max-age=600".into())],
            "nostore" => vec![("cache-control", "no-store".into())],
            "cookie" => vec![
                ("cache-control", "max-age=600".into()),
                ("set-cookie", format!("s={}", seen.header("cookie"))),
            ],
            "vary" => vec![
                ("cache-control", "max-age=600".into()),
                ("vary", "cookie".into()),
            ],
            _ => vec![("cache-control", "max-age=600, public".into())],
        };
        if policy == "public" || policy == "shared" {
            // Shared pages carry no user at all.
            headers.push(("x-shared", "1".into()));
            return response(
                200,
                &[(headers[0].0, headers[0].1.as_str())],
                format!("user= path={}", seen.uri.path()),
            );
        }
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        response(200, &headers, whose(&seen))
    })
    .await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    let mut rng = fastrand::Rng::with_seed(0x001a_2de5);
    let policies = ["public", "private", "nostore", "cookie", "vary", "shared"];
    let users = ["", "cookie-a", "cookie-b", "auth-c"];
    for i in 0..400 {
        let path = format!(
            "/{}/{}",
            policies[rng.usize(..policies.len())],
            rng.usize(..4)
        );
        let user = users[rng.usize(..users.len())];
        let headers: Vec<(&str, &str)> = match user {
            "" => vec![],
            u if u.starts_with("auth") => vec![("authorization", u)],
            u => vec![("cookie", u)],
        };
        let reply = larder.get_with(&path, &headers).await;
        let body = reply.text();
        let (served_user, served_path) = body
            .strip_prefix("user=")
            .and_then(|rest| rest.split_once(" path="))
            .unwrap_or_else(|| panic!("request {i}: unexpected body {body:?}"));
        assert_eq!(served_path, path, "request {i}: another URL's response");
        if !served_user.is_empty() {
            assert_eq!(
                served_user, user,
                "request {i} for {path}: another user's response"
            );
        }
        if path.starts_with("/cookie/") && !reply.header("set-cookie").is_empty() {
            let cookie = if user.starts_with("cookie") { user } else { "" };
            assert_eq!(
                reply.header("set-cookie"),
                format!("s={cookie}"),
                "request {i}: another user's cookie"
            );
        }
    }
}

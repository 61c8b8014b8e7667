//! Cache poisoning and deception: unkeyed inputs never change what an origin serves under a
//! key, host, port and scheme are always keyed, path spellings never share a key with another
//! resource, private answers to `.css` URLs are never stored, client-provoked errors are never
//! stored, and Vary cannot multiply a URL without bound.

use bytes::Bytes;
use http::Method;

use super::common::*;
use super::raw;

/// An origin that reflects what frameworks honour into a cacheable page: the host it was asked
/// for, forwarded fields, and URL or method overrides.
async fn reflecting_origin() -> Origin {
    Origin::start(|seen| async move {
        let body = format!(
            "host={} path={} xfh={} xfp={} xfport={} fwd={} original={} override={}",
            seen.header("host"),
            seen.uri.path(),
            seen.header("x-forwarded-host"),
            seen.header("x-forwarded-proto"),
            seen.header("x-forwarded-port"),
            seen.header("forwarded"),
            seen.header("x-original-url"),
            seen.header("x-http-method-override"),
        );
        response(200, &[("cache-control", "max-age=60")], body)
    })
    .await
}

#[tokio::test]
async fn unkeyed_forwarding_and_override_headers_never_reach_the_origin() {
    let origin = reflecting_origin().await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    let attack = larder
        .get_with(
            "/page",
            &[
                ("host", "shop.example"),
                ("x-forwarded-host", "evil.example"),
                ("x-forwarded-proto", "https"),
                ("x-forwarded-port", "8443"),
                ("forwarded", "host=evil.example;proto=https"),
                ("x-original-url", "/admin"),
                ("x-rewrite-url", "/admin"),
                ("x-http-method-override", "DELETE"),
                ("x-forwarded-for", "10.1.1.1"),
            ],
        )
        .await;
    let clean =
        "host=shop.example path=/page xfh=shop.example xfp=http xfport= fwd= original= override=";
    assert_eq!(attack.text(), clean);
    let seen = origin.last();
    assert!(seen.headers.get("x-rewrite-url").is_none());
    // An untrusted client cannot choose the address the origin sees.
    assert_eq!(seen.header("x-forwarded-for"), "127.0.0.1");
    let victim = larder.get_with("/page", &[("host", "shop.example")]).await;
    assert!(
        victim.cache_status().contains("hit"),
        "{}",
        victim.cache_status()
    );
    assert_eq!(victim.text(), clean);
}

/// Lower case, and without the default port: the host as the cache may equate it.
fn canonical_host(host: &str) -> String {
    host.to_ascii_lowercase().trim_end_matches(":80").to_owned()
}

#[tokio::test]
async fn host_and_port_are_always_in_the_key() {
    let origin = reflecting_origin().await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    let hosts = [
        "a.example",
        "b.example",
        "a.example:80",
        "a.example:8080",
        "A.EXAMPLE",
        "a.example.",
    ];
    // Twice over, so the second round is served from cache wherever the cache stores.
    for _ in 0..2 {
        for host in hosts {
            let reply = larder.get_with("/same", &[("host", host)]).await;
            let served_for = reply
                .text()
                .split(' ')
                .next()
                .unwrap()
                .trim_start_matches("host=")
                .to_owned();
            assert_eq!(
                canonical_host(&served_for),
                canonical_host(host),
                "asked for {host}, served the page of {served_for}"
            );
        }
    }
    // a.example, a.example:80 and A.EXAMPLE share one key; the others have their own.
    assert_eq!(origin.count(), 4);
}

#[tokio::test]
async fn the_scheme_is_in_the_key() {
    let origin = reflecting_origin().await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    let proxy = larder.server.proxy_addrs[0];
    // Absolute-form with https over a cleartext listener is still keyed as what arrived
    // (http): the https page, if any, is another key.
    let raw = raw::exchange(
        proxy,
        b"GET https://shop.example/s HTTP/1.1\r\nhost: shop.example\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(raw.contains("xfp=http"), "{raw}");
    let plain = larder.get_with("/s", &[("host", "shop.example")]).await;
    assert!(plain.text().contains("xfp=http"));
}

#[tokio::test]
async fn path_spellings_never_share_a_key_with_another_resource() {
    let origin = reflecting_origin().await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    let proxy = larder.server.proxy_addrs[0];
    let pairs = [
        ("/a%2fb", "/a/b"),
        ("/%41", "/A"),
        ("//x", "/x"),
        ("/./y", "/y"),
        ("/z/..;/w", "/w"),
        ("/q%3Fx", "/q?x"),
    ];
    for (odd, plain) in pairs {
        for _ in 0..2 {
            for path in [odd, plain, odd] {
                let raw = raw::exchange(
                    proxy,
                    format!(
                        "GET {path} HTTP/1.1\r\nhost: shop.example\r\nconnection: close\r\n\r\n"
                    )
                    .as_bytes(),
                )
                .await;
                let expected_path = path.split('?').next().unwrap();
                assert!(
                    raw.contains(&format!("path={expected_path} ")),
                    "asked for {path}, served:\n{raw}"
                );
            }
        }
    }
}

#[tokio::test]
async fn private_pages_behind_static_looking_urls_are_never_stored() {
    // The deception: /account/x.css reaches the account page, which a `.css` type would keep
    // for a day if its headers allowed.
    let origin = Origin::start(|seen| async move {
        let user = seen.header("cookie");
        let headers: &[(&str, &str)] = match seen.uri.path() {
            "/account/private.css" => &[("cache-control", "private, max-age=600")],
            "/account/cookie.css" => &[("set-cookie", "session=abc")],
            // No cache headers at all: only the static type's ttl could keep it.
            "/account/plain.css" => &[("content-type", "text/html; charset=utf-8")],
            _ => &[("cache-control", "no-store")],
        };
        response(200, headers, format!("account page of {user}"))
    })
    .await;
    let types = "resource_types:\n  - name: static\n    match: { path_suffix: .css }\n    config: { ttl: 1d, override_origin_ttl: true, cache_size: 8MiB }\n  - name: other\n    config: { cache_size: 8MiB }\n";
    let larder = Larder::start(&config_yaml(origin.addr, types)).await;
    for path in [
        "/account/private.css",
        "/account/cookie.css",
        "/account/nostore.css",
        "/account/plain.css",
    ] {
        let victim = larder.get_with(path, &[("cookie", "user=victim")]).await;
        assert_eq!(victim.text(), "account page of user=victim");
        let attacker = larder.get_with(path, &[("cookie", "user=attacker")]).await;
        assert_eq!(attacker.text(), "account page of user=attacker", "{path}");
        assert!(
            attacker.headers.get("set-cookie").is_none()
                || attacker.header("set-cookie") == "session=abc"
        );
        assert!(
            !attacker.cache_status().contains("hit"),
            "{path}: {}",
            attacker.cache_status()
        );
    }
}

#[tokio::test]
async fn errors_a_client_provokes_are_never_stored() {
    // The origin refuses oversized or odd requests, with or without a lifetime of its own.
    let origin = Origin::start(|seen| async move {
        if !seen.header("x-oversized").is_empty() {
            return response(400, &[], "header too large");
        }
        if !seen.header("x-bad").is_empty() {
            return response(
                404,
                &[("last-modified", "Mon, 01 Jan 2001 00:00:00 GMT")],
                "not here",
            );
        }
        response(200, &[("cache-control", "max-age=60")], "the page")
    })
    .await;
    let types = "resource_types:\n  - name: default\n    config: { ttl: 1h, cache_size: 8MiB }\n";
    let larder = Larder::start(&config_yaml(origin.addr, types)).await;
    let attack = larder
        .get_with("/p", &[("x-oversized", &"a".repeat(4000))])
        .await;
    assert_eq!(attack.status, 400);
    assert_eq!(larder.get("/p").await.text(), "the page");
    let attack = larder.get_with("/q", &[("x-bad", "1")]).await;
    assert_eq!(attack.status, 404);
    assert_eq!(larder.get("/q").await.text(), "the page");
}

#[tokio::test]
async fn vary_cannot_multiply_a_url_without_bound() {
    let origin = Origin::start(|seen| async move {
        let variant = seen.header("x-variant");
        response(
            200,
            &[("cache-control", "max-age=600"), ("vary", "x-variant")],
            format!("variant {variant}"),
        )
    })
    .await;
    let larder = Larder::start(&config_yaml(origin.addr, DEFAULT_TYPES)).await;
    for i in 0..300 {
        let v = i.to_string();
        let reply = larder.get_with("/v", &[("x-variant", &v)]).await;
        assert_eq!(reply.text(), format!("variant {v}"));
    }
    let objects = metric(
        &larder.metrics().await,
        r#"larder_cache_objects{resource_type="default"}"#,
    )
    .unwrap();
    // At most max_variants (64) variants, plus the URL's record of what it varies on.
    assert!(objects <= 65.0, "{objects} objects stored for one URL");
    assert!(objects >= 2.0, "variants are stored at all");
    // And each client still gets its own variant, from cache or not.
    let reply = larder
        .request(
            Method::GET,
            &larder.proxy_url("/v"),
            &[("x-variant", "299")],
            Bytes::new(),
        )
        .await;
    assert_eq!(reply.text(), "variant 299");
}

use super::*;
use http::HeaderValue;

const T0: Duration = Duration::from_secs(1_700_000_000);

fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + T0 + Duration::from_secs(secs)
}

fn spec(name: &str, capacity: u64) -> ResourceTypeSpec {
    ResourceTypeSpec {
        name: name.into(),
        matcher: Arc::new(MatchAll),
        capacity_bytes: capacity,
        max_object_size: capacity / 4,
        freshness: FreshnessRules::default(),
        key: KeyRules::default(),
        set_cookie: SetCookiePolicy::default(),
    }
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

fn target<'a>(path: &'a str, req: &'a HeaderMap) -> RequestTarget<'a> {
    RequestTarget {
        scheme: "http",
        host: "example.com",
        path,
        query: None,
        headers: req,
    }
}

/// Admits a 200 answer to a GET of `path`, received at time 0, for a fill that started at purge
/// `generation`.
fn admit_ok(
    cache: &Cache,
    path: &str,
    req: &HeaderMap,
    resp: &HeaderMap,
    generation: u64,
) -> Result<Admission, NoCacheReason> {
    cache.admit(
        &Method::GET,
        &target(path, req),
        StatusCode::OK,
        resp,
        at(0),
        at(0),
        generation,
    )
}

fn store(
    cache: &Cache,
    path: &str,
    req: &HeaderMap,
    resp: &HeaderMap,
    body: &'static [u8],
) -> Result<Hit, NoCacheReason> {
    let adm = admit_ok(cache, path, req, resp, cache.purge_generation())?;
    cache
        .commit(adm, Bytes::from_static(body))
        .ok_or(NoCacheReason::PurgedDuringFill)
}

/// Admits and stores a 200 answer to a GET of `target`, received at time 0.
fn store_target(
    cache: &Cache,
    target: &RequestTarget<'_>,
    resp: &HeaderMap,
    body: &'static [u8],
) -> Hit {
    let adm = cache
        .admit(
            &Method::GET,
            target,
            StatusCode::OK,
            resp,
            at(0),
            at(0),
            cache.purge_generation(),
        )
        .unwrap();
    cache.commit(adm, Bytes::from_static(body)).unwrap()
}

fn found(cache: &Cache, path: &str, req: &HeaderMap) -> Option<Hit> {
    match cache.lookup(&target(path, req)) {
        Lookup::Found(hit) => Some(hit),
        _ => None,
    }
}

#[test]
fn miss_then_hit_shares_the_body() {
    let cache = Cache::new(vec![spec("default", 1 << 20)], CacheSettings::default());
    let req = HeaderMap::new();
    assert!(matches!(
        cache.lookup(&target("/a", &req)),
        Lookup::Miss { .. }
    ));
    store(
        &cache,
        "/a",
        &req,
        &headers(&[("cache-control", "max-age=60")]),
        b"hello",
    )
    .unwrap();
    let hit = found(&cache, "/a", &req).unwrap();
    assert_eq!(&hit.stored().body[..], b"hello");
    assert!(
        hit.stored()
            .freshness
            .satisfies(&RequestDirectives::default(), at(59))
    );
    assert!(found(&cache, "/b", &req).is_none());
}

#[test]
fn private_no_store_cookies_and_authorization_are_never_stored() {
    let cache = Cache::new(vec![spec("default", 1 << 20)], CacheSettings::default());
    let req = HeaderMap::new();
    let cases = [
        (
            headers(&[("cache-control", "private, max-age=60")]),
            NoCacheReason::Private,
        ),
        (
            headers(&[("cache-control", "no-store")]),
            NoCacheReason::ResponseNoStore,
        ),
        (
            headers(&[
                ("last-modified", "Mon, 01 Jan 2024 00:00:00 GMT"),
                ("set-cookie", "a=b"),
            ]),
            NoCacheReason::SetCookie,
        ),
        (
            headers(&[("cache-control", "max-age=60"), ("vary", "*")]),
            NoCacheReason::VaryStar,
        ),
        (headers(&[]), NoCacheReason::NoFreshness),
    ];
    for (resp, reason) in cases {
        assert_eq!(store(&cache, "/p", &req, &resp, b"x").unwrap_err(), reason);
    }
    let auth = headers(&[("authorization", "Bearer x")]);
    assert_eq!(
        store(
            &cache,
            "/p",
            &auth,
            &headers(&[("cache-control", "max-age=60")]),
            b"x"
        )
        .unwrap_err(),
        NoCacheReason::Authorization
    );
    assert!(
        store(
            &cache,
            "/p",
            &auth,
            &headers(&[("cache-control", "public, max-age=60")]),
            b"x"
        )
        .is_ok()
    );
}

#[test]
fn vary_selects_variants_and_purge_removes_all() {
    let cache = Cache::new(vec![spec("default", 1 << 20)], CacheSettings::default());
    let resp = headers(&[("cache-control", "max-age=60"), ("vary", "Accept-Language")]);
    let en = headers(&[("accept-language", "en")]);
    let fr = headers(&[("accept-language", "fr")]);
    store(&cache, "/v", &en, &resp, b"hello").unwrap();
    store(&cache, "/v", &fr, &resp, b"bonjour").unwrap();
    assert_eq!(
        &found(&cache, "/v", &en).unwrap().stored().body[..],
        b"hello"
    );
    assert_eq!(
        &found(&cache, "/v", &fr).unwrap().stored().body[..],
        b"bonjour"
    );
    assert!(found(&cache, "/v", &HeaderMap::new()).is_none());
    assert_eq!(cache.purge("example.com", "/v", None), 2);
    assert!(found(&cache, "/v", &en).is_none());
    assert_eq!(cache.indexed_keys(), 0);
    assert_eq!(cache.purge("example.com", "/v", None), 0);
}

#[test]
fn eviction_stays_within_budget_and_unindexes() {
    let capacity = 256 * 1024;
    let cache = Cache::new(vec![spec("default", capacity)], CacheSettings::default());
    let req = HeaderMap::new();
    let resp = headers(&[("cache-control", "max-age=60")]);
    static BODY: [u8; 4096] = [7; 4096];
    for i in 0..500 {
        store(&cache, &format!("/obj/{i}"), &req, &resp, &BODY).unwrap();
    }
    let stats = cache.stats()[0].1;
    assert!(stats.bytes <= capacity, "{stats:?}");
    assert!(stats.evictions > 0);
    assert_eq!(cache.indexed_keys() as u64, stats.objects);
}

#[test]
fn refresh_merges_304_headers_and_keeps_body() {
    let cache = Cache::new(vec![spec("default", 1 << 20)], CacheSettings::default());
    let req = HeaderMap::new();
    let resp = headers(&[
        ("cache-control", "max-age=1"),
        ("etag", "\"v1\""),
        ("x-old", "1"),
    ]);
    let hit = store(&cache, "/r", &req, &resp, b"body").unwrap();
    let nm = headers(&[
        ("cache-control", "max-age=100"),
        ("x-old", "2"),
        ("content-length", "0"),
    ]);
    let refreshed = cache
        .refresh(&hit, &target("/r", &req), &nm, at(10), at(10), 0)
        .unwrap();
    let stored = refreshed.stored();
    assert_eq!(&stored.body[..], b"body");
    assert_eq!(stored.headers.get("x-old").unwrap(), "2");
    assert!(
        stored
            .freshness
            .satisfies(&RequestDirectives::default(), at(50))
    );
    assert!(
        found(&cache, "/r", &req)
            .unwrap()
            .stored()
            .freshness
            .satisfies(&RequestDirectives::default(), at(50))
    );
}

#[test]
fn purge_by_query_and_port() {
    let cache = Cache::new(vec![spec("default", 1 << 20)], CacheSettings::default());
    let req = HeaderMap::new();
    let resp = headers(&[("cache-control", "max-age=60")]);
    for q in ["a=1", "a=2"] {
        let t = RequestTarget {
            scheme: "http",
            host: "example.com:8080",
            path: "/q",
            query: Some(q),
            headers: &req,
        };
        let adm = cache
            .admit(&Method::GET, &t, StatusCode::OK, &resp, at(0), at(0), 0)
            .unwrap();
        cache.commit(adm, Bytes::from_static(b"x")).unwrap();
    }
    assert_eq!(cache.purge("example.com:9999", "/q", None), 0);
    assert_eq!(cache.purge("example.com", "/q", Some("a=1")), 1);
    assert_eq!(cache.purge("EXAMPLE.com:8080", "/q", None), 1);
}

#[test]
fn conditional_requests() {
    let stored = headers(&[
        ("etag", "W/\"x\""),
        ("last-modified", &httpdate::fmt_http_date(at(0))),
    ]);
    assert!(not_modified(
        &headers(&[("if-none-match", "\"x\"")]),
        &stored
    ));
    assert!(!not_modified(
        &headers(&[("if-none-match", "\"y\"")]),
        &stored
    ));
    assert!(not_modified(
        &headers(&[("if-modified-since", &httpdate::fmt_http_date(at(5)))]),
        &stored
    ));
    assert!(!not_modified(
        &headers(&[(
            "if-modified-since",
            &httpdate::fmt_http_date(at(0) - Duration::from_secs(5))
        )]),
        &stored
    ));
}

#[test]
fn a_purge_during_a_fill_wins() {
    let cache = Cache::new(vec![spec("default", 1 << 20)], CacheSettings::default());
    let req = HeaderMap::new();
    let resp = headers(&[("cache-control", "max-age=60")]);
    // The fetch starts, then a purge of the same URL lands before the body completes.
    let generation = cache.purge_generation();
    let adm = admit_ok(&cache, "/f", &req, &resp, generation).unwrap();
    assert_eq!(cache.purge("example.com", "/f", None), 0);
    assert!(cache.commit(adm, Bytes::from_static(b"old")).is_none());
    assert!(found(&cache, "/f", &req).is_none());
    // A purge of another URL does not cancel unrelated fills.
    let generation = cache.purge_generation();
    let adm = admit_ok(&cache, "/g", &req, &resp, generation).unwrap();
    cache.purge("example.com", "/other", None);
    assert!(cache.commit(adm, Bytes::from_static(b"new")).is_some());
}

#[test]
fn refresh_without_date_restarts_freshness_now() {
    let cache = Cache::new(vec![spec("default", 1 << 20)], CacheSettings::default());
    let req = HeaderMap::new();
    let old_date = httpdate::fmt_http_date(at(0));
    let resp = headers(&[
        ("cache-control", "max-age=10"),
        ("etag", "\"e\""),
        ("date", &old_date),
    ]);
    let hit = store(&cache, "/d", &req, &resp, b"b").unwrap();
    let refreshed = cache
        .refresh(
            &hit,
            &target("/d", &req),
            &HeaderMap::new(),
            at(100),
            at(100),
            cache.purge_generation(),
        )
        .unwrap();
    assert!(
        refreshed
            .stored()
            .freshness
            .satisfies(&RequestDirectives::default(), at(105))
    );
}

#[test]
fn purge_with_default_port_matches() {
    let cache = Cache::new(vec![spec("default", 1 << 20)], CacheSettings::default());
    store(
        &cache,
        "/p",
        &HeaderMap::new(),
        &headers(&[("cache-control", "max-age=60")]),
        b"x",
    )
    .unwrap();
    assert_eq!(cache.purge("Example.com:80", "/p", None), 1);
}

#[test]
fn private_and_no_cache_field_forms_store_the_rest() {
    let cache = Cache::new(vec![spec("default", 1 << 20)], CacheSettings::default());
    let req = HeaderMap::new();
    let resp = headers(&[
        (
            "cache-control",
            "max-age=60, private=\"set-cookie, x-user\", no-cache=\"x-debug\"",
        ),
        ("set-cookie", "session=secret"),
        ("x-user", "alice"),
        ("x-debug", "1"),
    ]);
    let hit = store(&cache, "/pf", &req, &resp, b"shared").unwrap();
    let stored = hit.stored();
    assert!(!stored.headers.contains_key("set-cookie"));
    assert!(!stored.headers.contains_key("x-user"));
    assert!(stored.headers.contains_key("x-debug"));
    assert_eq!(
        stored.no_cache_fields,
        vec![HeaderName::from_static("x-debug")]
    );
}

#[test]
fn any_final_status_with_explicit_freshness_is_stored() {
    let cache = Cache::new(vec![spec("default", 1 << 20)], CacheSettings::default());
    let empty = HeaderMap::new();
    let t = target("/s", &empty);
    let fresh = headers(&[("cache-control", "max-age=60")]);
    for status in [500u16, 302, 429, 599] {
        let status = StatusCode::from_u16(status).unwrap();
        assert!(
            cache
                .admit(&Method::GET, &t, status, &fresh, at(0), at(0), 0)
                .is_ok(),
            "{status}"
        );
    }
    // Without explicit freshness only heuristically cacheable statuses qualify.
    let bare = headers(&[("last-modified", &httpdate::fmt_http_date(at(0)))]);
    assert_eq!(
        cache
            .admit(
                &Method::GET,
                &t,
                StatusCode::INTERNAL_SERVER_ERROR,
                &bare,
                at(0),
                at(0),
                0
            )
            .unwrap_err(),
        NoCacheReason::StatusNotCacheable
    );
    for never in [206u16, 304] {
        let status = StatusCode::from_u16(never).unwrap();
        assert!(
            cache
                .admit(&Method::GET, &t, status, &fresh, at(0), at(0), 0)
                .is_err()
        );
    }
}

#[test]
fn rfc9213_cdn_cache_control_takes_precedence() {
    let cache = Cache::new(vec![spec("default", 1 << 20)], CacheSettings::default());
    let req = HeaderMap::new();
    let resp = headers(&[
        ("cache-control", "private, no-store"),
        ("cdn-cache-control", "max-age=120"),
    ]);
    let hit = store(&cache, "/cdn", &req, &resp, b"x").unwrap();
    assert_eq!(hit.stored().freshness.lifetime, Duration::from_secs(120));
    let resp = headers(&[
        ("cache-control", "max-age=600"),
        ("cdn-cache-control", "no-store"),
    ]);
    assert_eq!(
        store(&cache, "/cdn2", &req, &resp, b"x").unwrap_err(),
        NoCacheReason::ResponseNoStore
    );
    // Surrogate-Control is read and never stored for clients.
    let resp = headers(&[
        ("surrogate-control", "max-age=30"),
        ("cache-control", "no-cache"),
    ]);
    let hit = store(&cache, "/sc", &req, &resp, b"x").unwrap();
    assert_eq!(hit.stored().freshness.lifetime, Duration::from_secs(30));
    assert!(!hit.stored().headers.contains_key("surrogate-control"));
}

#[test]
fn variants_per_url_are_bounded() {
    let settings = CacheSettings {
        max_variants: 4,
        ..Default::default()
    };
    let cache = Cache::new(vec![spec("default", 1 << 20)], settings);
    let resp = headers(&[("cache-control", "max-age=60"), ("vary", "x-v")]);
    for i in 0..20 {
        let req = headers(&[("x-v", &i.to_string())]);
        store(&cache, "/many", &req, &resp, b"v").unwrap();
    }
    // Four variants plus the Vary marker.
    assert_eq!(cache.indexed_keys(), 5);
    // The newest four survive; the oldest went first.
    for kept in ["16", "17", "18", "19"] {
        assert!(
            found(&cache, "/many", &headers(&[("x-v", kept)])).is_some(),
            "{kept}"
        );
    }
    assert!(matches!(
        cache.lookup(&target("/many", &headers(&[("x-v", "0")]))),
        Lookup::Miss {
            vary_miss: true,
            ..
        }
    ));
}

#[test]
fn section_5_2_2_3_must_understand_overrides_no_store_for_known_statuses() {
    let cache = Cache::new(vec![spec("default", 1 << 20)], CacheSettings::default());
    let empty = HeaderMap::new();
    let t = target("/mu", &empty);
    let resp = headers(&[("cache-control", "max-age=60, no-store, must-understand")]);
    assert!(
        cache
            .admit(&Method::GET, &t, StatusCode::OK, &resp, at(0), at(0), 0)
            .is_ok()
    );
    let unknown = StatusCode::from_u16(599).unwrap();
    assert!(
        cache
            .admit(&Method::GET, &t, unknown, &resp, at(0), at(0), 0)
            .is_err()
    );
}

#[test]
fn section_5_2_1_5_request_no_store_is_never_stored() {
    let cache = Cache::new(vec![spec("default", 1 << 20)], CacheSettings::default());
    let req = headers(&[("cache-control", "no-store")]);
    assert_eq!(
        store(
            &cache,
            "/rns",
            &req,
            &headers(&[("cache-control", "max-age=60")]),
            b"x"
        )
        .unwrap_err(),
        NoCacheReason::RequestNoStore
    );
}

#[test]
fn many_unrelated_purges_during_a_fill_do_not_cancel_it() {
    let cache = Cache::new(vec![spec("default", 1 << 20)], CacheSettings::default());
    let req = HeaderMap::new();
    let resp = headers(&[("cache-control", "max-age=60")]);
    let generation = cache.purge_generation();
    let adm = admit_ok(&cache, "/slow", &req, &resp, generation).unwrap();
    // A busy API invalidating other URLs (every successful POST does) while this fill runs;
    // paths sharing this fill's slot are left out, since those may cancel it by design.
    let own_slot = cache.purges.url_slot("example.com", "/slow") as *const _;
    for i in 0..20_000 {
        let path = format!("/api/{i}");
        if !std::ptr::eq(cache.purges.url_slot("example.com", &path), own_slot) {
            cache.purge("example.com", &path, None);
        }
    }
    assert!(cache.commit(adm, Bytes::from_static(b"x")).is_some());
    assert_eq!(cache.purge("example.com", "/slow", None), 1);
}

fn tag(t: &str) -> Selector {
    Selector::Tag(t.into())
}

fn prefix(host: &str, p: &str) -> Selector {
    Selector::Prefix {
        host: host.into(),
        prefix: p.into(),
    }
}

#[test]
fn tags_from_both_headers_are_purgeable_and_stripped() {
    let cache = Cache::new(vec![spec("default", 1 << 20)], CacheSettings::default());
    let req = HeaderMap::new();
    let tagged = |keys: &str, tags: &str| {
        headers(&[
            ("cache-control", "max-age=60"),
            ("surrogate-key", keys),
            ("cache-tag", tags),
        ])
    };
    let hit = store(&cache, "/a", &req, &tagged("product-1  all", "all,x"), b"a").unwrap();
    assert_eq!(
        hit.stored().tags.iter().map(|t| &**t).collect::<Vec<_>>(),
        ["product-1", "all", "x"]
    );
    assert!(!hit.stored().headers.contains_key("surrogate-key"));
    assert!(!hit.stored().headers.contains_key("cache-tag"));
    store(&cache, "/b", &req, &tagged("product-2 all", ""), b"b").unwrap();
    store(
        &cache,
        "/c",
        &req,
        &headers(&[("cache-control", "max-age=60")]),
        b"c",
    )
    .unwrap();
    assert_eq!(cache.indexed_tags(), 5);

    assert_eq!(cache.invalidate(&tag("product-1"), false, at(1)), 1);
    assert!(found(&cache, "/a", &req).is_none());
    assert!(found(&cache, "/b", &req).is_some());
    assert_eq!(cache.invalidate(&tag("all"), false, at(1)), 1);
    assert!(found(&cache, "/b", &req).is_none());
    assert!(found(&cache, "/c", &req).is_some());
    assert_eq!(cache.invalidate(&tag("nothing"), false, at(1)), 0);
    // Nothing left behind for the removed objects.
    assert_eq!(cache.indexed_tags(), 0);
    assert_eq!(cache.indexed_keys(), 1);
}

#[test]
fn a_replaced_object_loses_its_old_tags() {
    let cache = Cache::new(vec![spec("default", 1 << 20)], CacheSettings::default());
    let req = HeaderMap::new();
    let with = |t: &str| headers(&[("cache-control", "max-age=60"), ("surrogate-key", t)]);
    store(&cache, "/r", &req, &with("old"), b"1").unwrap();
    store(&cache, "/r", &req, &with("new"), b"2").unwrap();
    assert_eq!(cache.indexed_tags(), 1);
    // The old tag no longer names the new object.
    assert_eq!(cache.invalidate(&tag("old"), false, at(1)), 0);
    assert_eq!(&found(&cache, "/r", &req).unwrap().stored().body[..], b"2");
    assert_eq!(cache.invalidate(&tag("new"), false, at(1)), 1);
}

#[test]
fn a_replaced_object_stays_purgeable_by_url() {
    // The replacement is indexed before the slot it displaced is unindexed: removing the old
    // entry must leave the new one under the same key.
    let cache = Cache::new(vec![spec("default", 1 << 20)], CacheSettings::default());
    let req = HeaderMap::new();
    let resp = headers(&[("cache-control", "max-age=60")]);
    store(&cache, "/r", &req, &resp, b"1").unwrap();
    store(&cache, "/r", &req, &resp, b"2").unwrap();
    assert_eq!(cache.indexed_keys(), 1);
    assert_eq!(cache.purge("example.com", "/r", None), 1);
    assert!(found(&cache, "/r", &req).is_none());
    assert_eq!(cache.indexed_keys(), 0);
}

#[test]
fn the_tag_index_follows_evictions() {
    // Room for a few objects only: most inserts evict.
    let cache = Cache::new(vec![spec("default", 64 << 10)], CacheSettings::default());
    let req = HeaderMap::new();
    let body: &'static [u8] = &[b'x'; 4096];
    for i in 0..500 {
        let resp = headers(&[
            ("cache-control", "max-age=60"),
            ("surrogate-key", &format!("t{i} shared")),
        ]);
        store(&cache, &format!("/e/{i}"), &req, &resp, body).unwrap();
    }
    let objects: u64 = cache.stats().iter().map(|(_, s)| s.objects).sum();
    assert!(objects < 20, "{objects} objects stored");
    // Exactly one `shared` entry and one own tag per object still stored, no more.
    assert_eq!(cache.indexed_tags() as u64, objects * 2);
    assert_eq!(cache.indexed_keys() as u64, objects);
    assert_eq!(
        cache.invalidate(&tag("shared"), false, at(1)) as u64,
        objects
    );
    assert_eq!(cache.indexed_tags(), 0);
}

#[test]
fn prefix_purge_takes_the_subtree_of_one_host_only() {
    let cache = Cache::new(vec![spec("default", 1 << 20)], CacheSettings::default());
    let req = HeaderMap::new();
    let resp = headers(&[("cache-control", "max-age=60")]);
    for path in ["/img/a.png", "/img/b/c.png", "/imgx", "/im", "/other"] {
        store(&cache, path, &req, &resp, b"x").unwrap();
    }
    let other_host = RequestTarget {
        host: "other.example",
        ..target("/img/a.png", &req)
    };
    store_target(&cache, &other_host, &resp, b"o");

    assert_eq!(
        cache.invalidate(&prefix("example.com", "/img/"), false, at(1)),
        2
    );
    assert!(found(&cache, "/img/a.png", &req).is_none());
    assert!(found(&cache, "/img/b/c.png", &req).is_none());
    assert!(found(&cache, "/imgx", &req).is_some());
    // A port narrows it to that port (these were stored without one).
    assert_eq!(
        cache.invalidate(&prefix("example.com:8080", "/im"), false, at(1)),
        0
    );
    assert_eq!(
        cache.invalidate(&prefix("EXAMPLE.com:80", "/im"), false, at(1)),
        2
    );
    assert!(found(&cache, "/other", &req).is_some());
    assert_eq!(cache.indexed_keys(), 2);
}

#[test]
fn purges_find_exactly_their_urls_among_paths_sharing_long_beginnings() {
    // Paths that agree on their first bytes, or are beginnings of each other, must select as
    // whole paths do (by URL: that path only; by prefix: every path it begins). Checked
    // against a plain filter over what was stored.
    let cache = Cache::new(vec![spec("default", 4 << 20)], CacheSettings::default());
    let req = HeaderMap::new();
    let resp = headers(&[("cache-control", "max-age=60")]);
    let paths = [
        "/",
        "/a",
        "/static",
        "/static/",
        "/static/a",
        "/static/a/b.js",
        "/static/ab",
        "/static/b",
        "/static-x",
        "/staticx/a",
        "/api/v1/users/1",
        "/api/v1/users/10",
        "/api/v1/users/2",
        "/api/v1/users",
        "/api/v2/users/1",
        "/\u{e9}t\u{e9}/caf\u{e9}",
    ];
    let hosts = ["example.com", "example.com:8080", "other.example"];
    let queries = [None, Some("q=1"), Some("q=2")];
    let mut stored = Vec::new();
    for host in hosts {
        for path in paths {
            for query in queries {
                let t = RequestTarget {
                    host,
                    query,
                    ..target(path, &req)
                };
                store_target(&cache, &t, &resp, b"x");
                stored.push((host, path, query));
            }
        }
    }
    assert_eq!(cache.indexed_keys(), stored.len());
    let stored_now = |host: &str, path: &str, query: Option<&str>| {
        let t = RequestTarget {
            host,
            query,
            ..target(path, &req)
        };
        matches!(cache.lookup(&t), Lookup::Found(_))
    };
    // Each URL purge takes its path's keys on both ports of example.com, all queries.
    for path in ["/static/a", "/api/v1/users/1", "/static", "/"] {
        let expected = stored
            .iter()
            .filter(|(h, p, _)| h.starts_with("example.com") && *p == path)
            .count();
        assert_eq!(cache.purge("example.com", path, None), expected, "{path}");
        stored.retain(|(h, p, _)| !(h.starts_with("example.com") && *p == path));
    }
    for (host, pfx) in [
        ("example.com", "/static/a"),
        ("example.com", "/api/v1/users/"),
        ("other.example", "/static"),
        ("other.example", "/api/v1/users/1"),
        ("example.com", "/\u{e9}"),
    ] {
        let expected = stored
            .iter()
            .filter(|(h, p, _)| crate::key::host_without_port(h) == host && p.starts_with(pfx))
            .count();
        assert!(expected > 0, "{host} {pfx}");
        assert_eq!(
            cache.invalidate(&prefix(host, pfx), false, at(1)),
            expected,
            "{host} {pfx}"
        );
        stored
            .retain(|(h, p, _)| !(crate::key::host_without_port(h) == host && p.starts_with(pfx)));
    }
    // What was not named is all still there, and only that is indexed.
    for (host, path, query) in &stored {
        assert!(stored_now(host, path, *query), "{host}{path} {query:?}");
    }
    assert_eq!(cache.indexed_keys(), stored.len());
}

#[test]
fn soft_purge_keeps_the_object_but_makes_it_stale_now() {
    let cache = Cache::new(vec![spec("default", 1 << 20)], CacheSettings::default());
    let req = HeaderMap::new();
    let resp = headers(&[
        ("cache-control", "max-age=600, stale-while-revalidate=30"),
        ("etag", "\"v1\""),
        ("surrogate-key", "s"),
    ]);
    store(&cache, "/s", &req, &resp, b"body").unwrap();
    assert_eq!(cache.invalidate(&tag("s"), true, at(100)), 1);
    let hit = found(&cache, "/s", &req).expect("a soft purge keeps the object");
    let f = &hit.stored().freshness;
    let any = RequestDirectives::default();
    assert!(!f.satisfies(&any, at(100)));
    // Stale-serving windows now count from the purge, not from the original expiry.
    assert!(f.serve_while_revalidating(&any, at(129)));
    assert!(!f.serve_while_revalidating(&any, at(131)));
    assert_eq!(&hit.stored().body[..], b"body");
    // Still tagged, still purgeable, once.
    assert_eq!(cache.indexed_tags(), 1);
    assert_eq!(cache.invalidate(&tag("s"), false, at(101)), 1);
    assert!(found(&cache, "/s", &req).is_none());
}

#[test]
fn tag_and_prefix_purges_during_a_fill_win() {
    let cache = Cache::new(vec![spec("default", 1 << 20)], CacheSettings::default());
    let req = HeaderMap::new();
    let resp = headers(&[("cache-control", "max-age=60"), ("cache-tag", "t1,t2")]);
    let admit = |path: &str| admit_ok(&cache, path, &req, &resp, cache.purge_generation()).unwrap();
    for purge in [tag("t2"), prefix("example.com", "/fi"), tag("t1")] {
        let adm = admit("/fill");
        assert_eq!(cache.invalidate(&purge, false, at(1)), 0);
        assert!(
            cache.commit(adm, Bytes::from_static(b"old")).is_none(),
            "{purge}"
        );
    }
    // Unrelated tags and prefixes do not cancel it.
    let adm = admit("/fill");
    cache.invalidate(&tag("t3"), false, at(1));
    cache.invalidate(&prefix("example.com", "/other"), true, at(1));
    cache.invalidate(&prefix("other.example", "/"), false, at(1));
    assert!(cache.commit(adm, Bytes::from_static(b"new")).is_some());
}

#[test]
fn a_fill_older_than_the_remembered_prefix_purges_is_dropped() {
    let cache = Cache::new(vec![spec("default", 1 << 20)], CacheSettings::default());
    let req = HeaderMap::new();
    let resp = headers(&[("cache-control", "max-age=60")]);
    let adm = admit_ok(&cache, "/slow", &req, &resp, cache.purge_generation()).unwrap();
    for i in 0..1000 {
        cache.invalidate(&prefix("example.com", &format!("/p{i}/")), false, at(1));
    }
    // None of them named /slow, but the log no longer remembers them all: dropping is safe.
    assert!(cache.commit(adm, Bytes::from_static(b"x")).is_none());
}

#[test]
fn refresh_keeps_tags_the_304_does_not_repeat() {
    let cache = Cache::new(vec![spec("default", 1 << 20)], CacheSettings::default());
    let req = HeaderMap::new();
    let resp = headers(&[
        ("cache-control", "max-age=10"),
        ("etag", "\"e\""),
        ("surrogate-key", "keep-me"),
    ]);
    let hit = store(&cache, "/t", &req, &resp, b"b").unwrap();
    cache
        .refresh(
            &hit,
            &target("/t", &req),
            &headers(&[("cache-control", "max-age=100")]),
            at(20),
            at(20),
            cache.purge_generation(),
        )
        .unwrap();
    assert_eq!(cache.invalidate(&tag("keep-me"), false, at(21)), 1);
}

#[test]
fn a_refresh_does_not_bring_back_what_a_purge_removed() {
    let cache = Cache::new(vec![spec("default", 1 << 20)], CacheSettings::default());
    let req = HeaderMap::new();
    let resp = headers(&[("cache-control", "max-age=10"), ("etag", "\"e\"")]);
    let stale = store(&cache, "/r", &req, &resp, b"old").unwrap();
    // Looked up stale, then purged before the revalidation is even sent…
    assert_eq!(cache.purge("example.com", "/r", None), 1);
    let generation = cache.purge_generation();
    // …so the 304 that comes back has nothing to refresh.
    let refreshed = cache.refresh(
        &stale,
        &target("/r", &req),
        &headers(&[("cache-control", "max-age=100")]),
        at(20),
        at(20),
        generation,
    );
    assert_eq!(refreshed.unwrap_err(), NoCacheReason::PurgedDuringFill);
    assert!(found(&cache, "/r", &req).is_none());
}

#[test]
fn variants_are_capped_per_url_among_many_queries() {
    let settings = CacheSettings {
        max_variants: 2,
        ..CacheSettings::default()
    };
    let cache = Cache::new(vec![spec("default", 1 << 22)], settings);
    let resp = headers(&[("cache-control", "max-age=60"), ("vary", "x-v")]);
    let with_query = |q: &'static str, v: &str| {
        let req = headers(&[("x-v", v)]);
        let t = RequestTarget {
            query: Some(q),
            ..target("/v", &req)
        };
        store_target(&cache, &t, &resp, b"x");
    };
    for v in ["1", "2", "3"] {
        with_query("a", v);
        with_query("b", v);
    }
    // Two variants (plus its marker) per query survive; the other query's are not counted.
    assert_eq!(cache.indexed_keys(), 2 * 3);
}

#[test]
fn errors_need_an_origin_lifetime_unless_heuristic_errors() {
    let mut with_ttl = spec("default", 1 << 20);
    with_ttl.freshness.ttl = Some(Duration::from_secs(300));
    let empty = HeaderMap::new();
    let t = target("/missing", &empty);
    let bare = headers(&[("last-modified", &httpdate::fmt_http_date(at(0)))]);
    let admit = |cache: &Cache, status: u16, resp: &HeaderMap| {
        cache.admit(
            &Method::GET,
            &t,
            StatusCode::from_u16(status).unwrap(),
            resp,
            at(10_000),
            at(10_000),
            0,
        )
    };
    let hardened = Cache::new(vec![with_ttl.clone()], CacheSettings::default());
    for status in [404u16, 405, 410, 414, 501] {
        // Heuristically cacheable per RFC 9110, and the type has a ttl: still not stored.
        assert_eq!(
            admit(&hardened, status, &bare).unwrap_err(),
            NoCacheReason::StatusNotCacheable,
            "{status}"
        );
        let explicit = headers(&[("cache-control", "max-age=30")]);
        assert!(admit(&hardened, status, &explicit).is_ok(), "{status}");
    }
    // Successes keep the type's ttl.
    assert!(admit(&hardened, 200, &bare).is_ok());
    let permissive = Cache::new(
        vec![with_ttl],
        CacheSettings {
            heuristic_errors: true,
            ..CacheSettings::default()
        },
    );
    assert!(admit(&permissive, 404, &bare).is_ok());
}

#[test]
fn html_behind_a_static_file_name_needs_an_origin_lifetime() {
    use crate::key::html_behind_static_name as deceptive;
    for path in [
        "/account/x.css",
        "/a/b.JS",
        "/x.css;jsessionid=1",
        "/x.css%3Fa",
        "/account%2Fx.png",
    ] {
        assert!(deceptive(path, Some("text/html; charset=utf-8")), "{path}");
    }
    assert!(!deceptive("/account/x.css", Some("text/css")));
    assert!(!deceptive("/account/page", Some("text/html")));
    assert!(!deceptive("/index.html", Some("text/html")));
    assert!(!deceptive("/account/x.css", None));

    let mut css = spec("static", 1 << 20);
    css.freshness.ttl = Some(Duration::from_secs(86_400));
    let cache = Cache::new(vec![css], CacheSettings::default());
    let empty = HeaderMap::new();
    let html = headers(&[("content-type", "text/html")]);
    let admit = |path: &str, resp: &HeaderMap| {
        cache.admit(
            &Method::GET,
            &target(path, &empty),
            StatusCode::OK,
            resp,
            at(0),
            at(0),
            0,
        )
    };
    assert_eq!(
        admit("/account/x.css", &html).unwrap_err(),
        NoCacheReason::ContentTypeMismatch
    );
    let explicit = headers(&[
        ("content-type", "text/html"),
        ("cache-control", "max-age=60"),
    ]);
    assert!(
        admit("/account/x.css", &explicit).is_ok(),
        "the origin said so"
    );
    assert!(admit("/site.css", &headers(&[("content-type", "text/css")])).is_ok());
}

#[test]
fn a_fill_is_offered_to_read_along_only_when_stored_whole_and_not_once_purged() {
    let cache = Cache::new(vec![spec("default", 1 << 20)], CacheSettings::default());
    let req = HeaderMap::new();
    let resp = headers(&[("cache-control", "max-age=60")]);
    let adm = admit_ok(&cache, "/big", &req, &resp, cache.purge_generation()).unwrap();
    // Beyond max_object_size (a quarter of the budget here) it is never buffered whole.
    assert!(adm.stream(adm.max_object_size() + 1).is_none());
    let stream = adm.stream(10).unwrap();
    assert_eq!(stream.head().status, StatusCode::OK);
    assert!(cache.may_read_along(&stream, &target("/big", &req)));
    assert!(!cache.may_read_along(&stream, &target("/other", &req)));
    cache.purge("example.com", "/big", None);
    assert!(!cache.may_read_along(&stream, &target("/big", &req)));

    let varying = headers(&[("cache-control", "max-age=60"), ("vary", "accept")]);
    let adm = admit_ok(&cache, "/v", &req, &varying, cache.purge_generation()).unwrap();
    assert!(
        adm.stream(10).is_none(),
        "a waiter's request could select another variant"
    );
}

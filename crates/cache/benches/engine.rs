//! Micro-benchmarks of the cache engine's hot paths, through its public API only:
//! a lookup that finds a fresh entry, admit + commit of a 1 KiB response, a lookup that has
//! to pick a `Vary` variant, and purges by URL and by prefix. Run with
//! `cargo bench -p larder-cache` (see BENCHMARKS.md).

use std::hint::black_box;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use larder_cache::{
    Cache, CacheSettings, FreshnessRules, KeyRules, Lookup, MatchAll, RequestDirectives,
    RequestTarget, ResourceTypeSpec, Selector, SetCookiePolicy,
};

const MIB: u64 = 1024 * 1024;
/// Distinct paths the insert benchmark cycles through.
const PATHS: usize = 4096;

fn cache(capacity: u64) -> Cache {
    let spec = ResourceTypeSpec {
        name: "default".into(),
        matcher: Arc::new(MatchAll),
        capacity_bytes: capacity,
        max_object_size: capacity / 4,
        freshness: FreshnessRules::default(),
        key: KeyRules::default(),
        set_cookie: SetCookiePolicy::default(),
    };
    Cache::new(vec![spec], CacheSettings::default())
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

/// What a typical origin sends with a cacheable 1 KiB object.
fn response_headers(extra: &[(&str, &str)]) -> HeaderMap {
    let mut h = headers(&[
        ("cache-control", "max-age=3600"),
        ("content-type", "application/octet-stream"),
        ("content-length", "1024"),
        ("etag", "\"5f3a-400\""),
        ("last-modified", "Mon, 01 Jan 2024 00:00:00 GMT"),
        ("date", &httpdate::fmt_http_date(SystemTime::now())),
    ]);
    for (k, v) in extra {
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
        host: "bench.example",
        path,
        query: None,
        headers: req,
    }
}

/// Admits and commits one response; panics if the engine declines it.
fn store(cache: &Cache, path: &str, req: &HeaderMap, resp: &HeaderMap, body: &Bytes) {
    store_target(cache, &target(path, req), resp, body);
}

fn store_target(cache: &Cache, target: &RequestTarget<'_>, resp: &HeaderMap, body: &Bytes) {
    let now = SystemTime::now();
    let admission = cache
        .admit(
            &Method::GET,
            target,
            StatusCode::OK,
            resp,
            now,
            now,
            cache.purge_generation(),
        )
        .expect("the benchmark response is cacheable");
    cache
        .commit(admission, body.clone())
        .expect("no purge happened");
}

fn assert_fresh_hit(cache: &Cache, path: &str, req: &HeaderMap) {
    match cache.lookup(&target(path, req)) {
        Lookup::Found(hit) => assert!(
            hit.stored()
                .freshness
                .satisfies(&RequestDirectives::default(), SystemTime::now()),
            "entry for {path} is not fresh"
        ),
        _ => panic!("no stored entry for {path}"),
    }
}

fn lookup(c: &mut Criterion) {
    let cache = cache(64 * MIB);
    let body = Bytes::from(vec![b'x'; 1024]);
    let req = headers(&[("user-agent", "bench"), ("accept", "*/*")]);
    let resp = response_headers(&[]);
    // A populated store, so the probe is not into a nearly empty table.
    let paths: Vec<String> = (0..PATHS).map(|i| format!("/obj/{i}")).collect();
    for path in &paths {
        store(&cache, path, &req, &resp, &body);
    }
    assert_fresh_hit(&cache, "/obj/42", &req);

    // Vary: two variants of one URL, chosen by Accept-Encoding.
    let vary_resp = response_headers(&[("vary", "Accept-Encoding")]);
    let gzip = headers(&[("user-agent", "bench"), ("accept-encoding", "gzip")]);
    let br = headers(&[("user-agent", "bench"), ("accept-encoding", "br")]);
    store(&cache, "/vary", &gzip, &vary_resp, &body);
    store(&cache, "/vary", &br, &vary_resp, &body);
    assert_fresh_hit(&cache, "/vary", &gzip);

    let mut group = c.benchmark_group("lookup");
    group.throughput(Throughput::Elements(1));
    group.bench_function("hit_fresh", |b| {
        b.iter(|| {
            let found = cache.lookup(black_box(&target("/obj/42", &req)));
            assert!(matches!(found, Lookup::Found(_)));
            black_box(found)
        })
    });
    group.bench_function("vary_hit", |b| {
        b.iter(|| {
            let found = cache.lookup(black_box(&target("/vary", &gzip)));
            assert!(matches!(found, Lookup::Found(_)));
            black_box(found)
        })
    });
    group.bench_function("miss", |b| {
        b.iter(|| {
            let found = cache.lookup(black_box(&target("/absent", &req)));
            assert!(matches!(found, Lookup::Miss { .. }));
            black_box(found)
        })
    });
    group.finish();
}

fn insert(c: &mut Criterion) {
    let body = Bytes::from(vec![b'x'; 1024]);
    let req = headers(&[("user-agent", "bench"), ("accept", "*/*")]);
    let resp = response_headers(&[]);
    let paths: Vec<String> = (0..PATHS).map(|i| format!("/obj/{i}")).collect();
    let query_strings: Vec<String> = (0..PATHS).map(|i| format!("q={i}")).collect();

    let mut group = c.benchmark_group("insert_1k");
    group.throughput(Throughput::Elements(1));
    // Room for every path: each insert replaces an older copy of the same key.
    let roomy = cache(64 * MIB);
    let mut i = 0usize;
    group.bench_function("admit_commit", |b| {
        b.iter(|| {
            i = (i + 1) % PATHS;
            store(&roomy, black_box(&paths[i]), &req, &resp, &body);
        })
    });
    // A 1 MiB budget holds well under PATHS objects: most inserts also evict.
    let tight = cache(MIB);
    let mut j = 0usize;
    group.bench_function("admit_commit_evicting", |b| {
        b.iter(|| {
            j = (j + 1) % PATHS;
            store(&tight, black_box(&paths[j]), &req, &resp, &body);
        })
    });
    // Every key under one path, told apart by its query (a search page, or a client busting
    // the cache): the index must not read the path's other keys on each insert.
    let queries = cache(64 * MIB);
    let mut k = 0usize;
    let search = |k: usize| -> RequestTarget<'_> {
        RequestTarget {
            query: Some(&query_strings[k]),
            ..target("/search", &req)
        }
    };
    group.bench_function("admit_commit_one_path_many_queries", |b| {
        b.iter(|| {
            k = (k + 1) % PATHS;
            store_target(&queries, black_box(&search(k)), &resp, &body);
        })
    });
    group.finish();
}

const PURGE_HOST_OBJECTS: usize = 100_000;

/// What a purge costs against a host of `PURGE_HOST_OBJECTS` stored paths, with nothing to
/// remove (so every iteration meets the same cache): finding one URL is a hashed lookup; a
/// prefix reads every path of the host, under the index lock that fills take too.
fn purge(c: &mut Criterion) {
    // `cargo test --all-targets` runs each benchmark once, unoptimised: a smaller host there.
    let objects = if std::env::args().any(|a| a == "--bench") {
        PURGE_HOST_OBJECTS
    } else {
        1_000
    };
    let body = Bytes::from_static(b"x");
    let req = HeaderMap::new();
    let resp = response_headers(&[]);
    let big = cache(1024 * MIB);
    for i in 0..objects {
        store(&big, &format!("/static/assets/{i}.js"), &req, &resp, &body);
    }
    let mut group = c.benchmark_group("purge_100k_paths");
    group.throughput(Throughput::Elements(1));
    let now = SystemTime::now();
    let url = Selector::Url {
        host: "bench.example".into(),
        path: "/static/assets/absent.js".into(),
        query: None,
    };
    group.bench_function("url", |b| {
        b.iter(|| assert_eq!(big.invalidate(black_box(&url), false, now), 0))
    });
    let prefix = Selector::Prefix {
        host: "bench.example".into(),
        prefix: "/static/assets/absent/".into(),
    };
    group.bench_function("prefix", |b| {
        b.iter(|| assert_eq!(big.invalidate(black_box(&prefix), false, now), 0))
    });
    group.finish();
}

criterion_group!(benches, lookup, insert, purge);
criterion_main!(benches);

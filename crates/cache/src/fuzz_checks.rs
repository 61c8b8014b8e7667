//! Properties the fuzz targets (fuzz/) check on arbitrary input; the committed corpora are
//! replayed through the same functions by a normal test, so CI checks every saved case.
//! Each function panics when a property fails, and only then.

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::directives::{effective_response_directives, request_directives};
use crate::key::{self, Key, KeyRules, QueryMode, RequestTarget};

/// Splits fuzz input into up to `n` fields at NUL bytes, as text.
fn fields(data: &[u8], n: usize) -> Vec<String> {
    data.splitn(n, |b| *b == 0)
        .map(|f| String::from_utf8_lossy(f).into_owned())
        .collect()
}

/// The cache key: hosts and paths always separate keys; query sorting is idempotent; a key
/// never depends on headers it was not told to use.
pub fn cache_key(data: &[u8]) {
    let f = fields(data, 5);
    let get = |i: usize| f.get(i).map(String::as_str).unwrap_or("");
    let (host_a, host_b, path, query, header) = (get(0), get(1), get(2), get(3), get(4));
    let scheme = if data.first().is_some_and(|b| b & 1 == 1) {
        "https"
    } else {
        "http"
    };
    let host_a = key::normalize_host(host_a, scheme);
    let host_b = key::normalize_host(host_b, scheme);
    let mut headers = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_str(header) {
        headers.insert(HeaderName::from_static("x-fuzz"), value);
    }
    for mode in [QueryMode::Keep, QueryMode::Sort, QueryMode::Drop] {
        let rules = KeyRules {
            query: mode,
            headers: Vec::new(),
        };
        fn target<'a>(
            scheme: &'a str,
            host: &'a str,
            path: &'a str,
            query: &'a str,
            headers: &'a HeaderMap,
        ) -> RequestTarget<'a> {
            RequestTarget {
                scheme,
                host,
                path,
                query: Some(query),
                headers,
            }
        }
        let a = Key::primary(&target(scheme, &host_a, path, query, &headers), &rules);
        let b = Key::primary(&target(scheme, &host_b, path, query, &headers), &rules);
        // Same key only for the same host (hosts cannot smuggle a path separator in).
        if host_a != host_b && !host_a.contains('/') && !host_b.contains('/') {
            assert_ne!(a, b, "hosts {host_a:?} and {host_b:?} share a key");
        }
        assert_eq!(a.host(), host_a.as_str());
        // A header outside the rules never changes the key.
        let bare = HeaderMap::new();
        let without = Key::primary(
            &RequestTarget {
                headers: &bare,
                ..target(scheme, &host_a, path, query, &headers)
            },
            &rules,
        );
        assert_eq!(a, without);
    }
    let sorted = key::normalize_query(Some(query), QueryMode::Sort);
    assert_eq!(key::normalize_query(Some(&sorted), QueryMode::Sort), sorted);
}

/// Cache-Control parsing: any bytes parse without panicking, and the parse does not depend on
/// how the same directives are split over field lines.
pub fn cache_control(data: &[u8]) {
    let Ok(value) = HeaderValue::from_bytes(data) else {
        return;
    };
    let mut one = HeaderMap::new();
    one.insert(http::header::CACHE_CONTROL, value.clone());
    let response = effective_response_directives(&one, &[]);
    let request = request_directives(&one);
    // Split at each top-level comma onto separate lines (bytes as they are): the same
    // directives.
    let text = String::from_utf8_lossy(data);
    if !data.contains(&b'"') {
        let mut split = HeaderMap::new();
        for part in data.split(|b| *b == b',') {
            if let Ok(v) = HeaderValue::from_bytes(part) {
                split.append(http::header::CACHE_CONTROL, v);
            } else {
                return;
            }
        }
        let again = effective_response_directives(&split, &[]);
        assert_eq!(response.max_age, again.max_age, "{text:?}");
        assert_eq!(response.no_store, again.no_store, "{text:?}");
        assert_eq!(response.private, again.private, "{text:?}");
        assert_eq!(
            request_directives(&split).no_store,
            request.no_store,
            "{text:?}"
        );
    }
}

/// Vary: any value parses; the variant key is a function of the varied headers only.
pub fn vary(data: &[u8]) {
    let f = fields(data, 3);
    let get = |i: usize| f.get(i).map(String::as_str).unwrap_or("");
    let Ok(vary) = HeaderValue::from_str(get(0)) else {
        return;
    };
    let mut response = HeaderMap::new();
    response.insert(http::header::VARY, vary);
    let Some(names) = key::vary_names(&response) else {
        return; // Vary: *
    };
    let mut request = HeaderMap::new();
    for name in &names {
        if let Ok(v) = HeaderValue::from_str(get(1)) {
            request.append(name.clone(), v);
        }
    }
    let empty = HeaderMap::new();
    let primary = Key::primary(
        &RequestTarget {
            scheme: "http",
            host: "example.com",
            path: "/v",
            query: None,
            headers: &empty,
        },
        &KeyRules::default(),
    );
    let a = primary.variant(&names, &request);
    // Unrelated headers do not change it.
    let mut noisy = request.clone();
    if let Ok(v) = HeaderValue::from_str(get(2)) {
        noisy.append(HeaderName::from_static("x-unrelated-fuzz"), v);
    }
    if !names.iter().any(|n| n == "x-unrelated-fuzz") {
        assert_eq!(a, primary.variant(&names, &noisy));
    }
    assert_eq!(a.host(), "example.com");
}

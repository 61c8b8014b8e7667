//! Cache-Control parsing (RFC 9111 §5.2) for the directives the engine acts on.
//!
//! Parsing is strict where the RFC asks for it: a delta-seconds value must be plain digits, and a
//! directive whose value is invalid counts as present but unusable (`max-age=1.5` gives no
//! freshness rather than being ignored), which errs toward revalidating.

use http::HeaderMap;
use http::header::{CACHE_CONTROL, PRAGMA};

/// Seconds value of a directive: `None` when absent, `Some(None)` when present but invalid.
pub type Seconds = Option<Option<u64>>;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ResponseDirectives {
    pub max_age: Seconds,
    pub s_maxage: Seconds,
    pub no_store: bool,
    pub no_cache: bool,
    pub private: bool,
    pub public: bool,
    pub must_revalidate: bool,
    pub proxy_revalidate: bool,
    pub immutable: bool,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RequestDirectives {
    pub max_age: Seconds,
    /// `Some(None)` is `max-stale` without a value: any staleness is acceptable.
    pub max_stale: Seconds,
    pub min_fresh: Seconds,
    pub no_cache: bool,
    pub no_store: bool,
    pub only_if_cached: bool,
}

impl RequestDirectives {
    pub fn is_empty(&self) -> bool {
        *self == RequestDirectives::default()
    }
}

/// Splits every Cache-Control field line into `(lower-case name, optional unquoted value)`.
fn for_each_directive(headers: &HeaderMap, mut f: impl FnMut(&str, Option<&str>)) {
    for value in headers.get_all(CACHE_CONTROL) {
        let Ok(text) = value.to_str() else { continue };
        for part in split_list(text) {
            let (name, value) = match part.split_once('=') {
                Some((n, v)) => (n.trim(), Some(unquote(v.trim()))),
                None => (part, None),
            };
            if name.is_empty() {
                continue;
            }
            f(&name.to_ascii_lowercase(), value);
        }
    }
}

/// Splits a comma-separated list, honouring commas inside quoted strings.
fn split_list(text: &str) -> impl Iterator<Item = &str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut in_quotes = false;
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_quotes => escaped = true,
            '"' => in_quotes = !in_quotes,
            ',' if !in_quotes => {
                parts.push(text[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(text[start..].trim());
    parts.into_iter().filter(|p| !p.is_empty())
}

fn unquote(v: &str) -> &str {
    v.strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(v)
}

/// delta-seconds = 1*DIGIT; values too large to hold saturate (RFC 9111 §1.2.2).
fn delta_seconds(v: Option<&str>) -> Option<u64> {
    let v = v?;
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(v.parse().unwrap_or(u64::from(u32::MAX) * 2))
}

/// When a directive is repeated, the most restrictive (smallest) value wins; an invalid
/// occurrence poisons it, so conflicting senders get revalidation rather than a guess.
fn merge_seconds(current: Seconds, new: Option<u64>) -> Seconds {
    match (current, new) {
        (None, n) => Some(n),
        (Some(Some(a)), Some(b)) => Some(Some(a.min(b))),
        _ => Some(None),
    }
}

pub fn response_directives(headers: &HeaderMap) -> ResponseDirectives {
    let mut d = ResponseDirectives::default();
    for_each_directive(headers, |name, value| match name {
        "max-age" => d.max_age = merge_seconds(d.max_age, delta_seconds(value)),
        "s-maxage" => d.s_maxage = merge_seconds(d.s_maxage, delta_seconds(value)),
        "no-store" => d.no_store = true,
        // `no-cache="field"` only forbids reusing those fields; treating it as a whole no-cache
        // is the safe approximation until field stripping lands.
        "no-cache" => d.no_cache = true,
        "private" => d.private = true,
        "public" => d.public = true,
        "must-revalidate" => d.must_revalidate = true,
        "proxy-revalidate" => d.proxy_revalidate = true,
        "immutable" => d.immutable = true,
        _ => {}
    });
    d
}

pub fn request_directives(headers: &HeaderMap) -> RequestDirectives {
    let mut d = RequestDirectives::default();
    let mut any = false;
    for_each_directive(headers, |name, value| {
        any = true;
        match name {
            "max-age" => d.max_age = merge_seconds(d.max_age, delta_seconds(value)),
            "max-stale" => {
                d.max_stale = match value {
                    None => Some(None),
                    Some(v) => merge_seconds(d.max_stale, delta_seconds(Some(v))),
                }
            }
            "min-fresh" => d.min_fresh = merge_seconds(d.min_fresh, delta_seconds(value)),
            "no-cache" => d.no_cache = true,
            "no-store" => d.no_store = true,
            "only-if-cached" => d.only_if_cached = true,
            _ => {}
        }
    });
    // RFC 9111 §5.4: Pragma: no-cache counts only when Cache-Control is absent.
    if !any
        && headers.get_all(PRAGMA).iter().any(|v| {
            v.to_str()
                .is_ok_and(|s| split_list(s).any(|p| p.eq_ignore_ascii_case("no-cache")))
        })
    {
        d.no_cache = true;
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(cc: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in cc {
            h.append(CACHE_CONTROL, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn parses_common_response_directives_case_insensitively() {
        let d = response_directives(&headers(&["Public, MAX-AGE=60", "s-maxage=\"30\""]));
        assert!(d.public);
        assert_eq!(d.max_age, Some(Some(60)));
        assert_eq!(d.s_maxage, Some(Some(30)));
    }

    #[test]
    fn invalid_seconds_are_present_but_unusable() {
        assert_eq!(
            response_directives(&headers(&["max-age=1.5"])).max_age,
            Some(None)
        );
        assert_eq!(
            response_directives(&headers(&["max-age=-1"])).max_age,
            Some(None)
        );
        assert_eq!(
            response_directives(&headers(&["max-age=10, max-age=5"])).max_age,
            Some(Some(5))
        );
    }

    #[test]
    fn quoted_commas_do_not_split() {
        let d = response_directives(&headers(&["no-cache=\"set-cookie, foo\", max-age=9"]));
        assert!(d.no_cache);
        assert_eq!(d.max_age, Some(Some(9)));
    }

    #[test]
    fn pragma_counts_only_without_cache_control() {
        let mut h = HeaderMap::new();
        h.insert(PRAGMA, HeaderValue::from_static("no-cache"));
        assert!(request_directives(&h).no_cache);
        h.insert(CACHE_CONTROL, HeaderValue::from_static("max-age=5"));
        assert!(!request_directives(&h).no_cache);
    }
}

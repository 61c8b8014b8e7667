//! Freshness (RFC 9111 §4.2): how long a stored response may be reused, and how old it is.
//!
//! Everything that depends only on the response is computed once at store time, so a hit costs
//! one subtraction and, only when the request carries Cache-Control, a directive check.

use std::time::{Duration, SystemTime};

use http::header::{AGE, DATE, ETAG, EXPIRES, LAST_MODIFIED};
use http::{HeaderMap, StatusCode};

use crate::directives::{RequestDirectives, ResponseDirectives};

/// Per-resource-type freshness policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FreshnessRules {
    /// Lifetime when the origin gives none (no s-maxage, max-age or Expires).
    pub ttl: Option<Duration>,
    /// Use `ttl` even when the origin gives explicit freshness.
    pub override_origin: bool,
    /// Derive freshness from Last-Modified (§4.2.2) when nothing else applies.
    pub heuristic: bool,
}

impl Default for FreshnessRules {
    fn default() -> Self {
        FreshnessRules {
            ttl: None,
            override_origin: false,
            heuristic: true,
        }
    }
}

/// Heuristic freshness is this fraction of the time since Last-Modified…
const HEURISTIC_FRACTION: f64 = 0.1;
/// …capped, so a file untouched for years is not trusted for months.
const HEURISTIC_CAP: Duration = Duration::from_secs(24 * 3600);

/// Status codes that are heuristically cacheable (RFC 9110 §15.1).
pub fn heuristically_cacheable(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 206 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Freshness {
    /// When the response arrived.
    pub response_time: SystemTime,
    /// `corrected_initial_age` of §4.2.3.
    pub initial_age: Duration,
    pub lifetime: Duration,
    /// `no-cache`: every reuse needs revalidation.
    pub no_cache: bool,
    /// `must-revalidate`, `proxy-revalidate` or `s-maxage`: never served stale.
    pub must_revalidate: bool,
}

pub fn parse_http_date(headers: &HeaderMap, name: http::HeaderName) -> Option<SystemTime> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    if values.next().is_some() {
        // Conflicting dates are no date at all.
        return None;
    }
    httpdate::parse_http_date(first.to_str().ok()?.trim()).ok()
}

fn age_value(headers: &HeaderMap) -> Duration {
    // §5.1: with several Age values or an invalid one, use the first valid and ignore the rest.
    headers
        .get_all(AGE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .map(str::trim)
        .find(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .map(|s| Duration::from_secs(s.parse().unwrap_or(u64::from(u32::MAX))))
        .unwrap_or_default()
}

/// Explicit lifetime from the origin, if it gave one (s-maxage over max-age over Expires).
fn explicit_lifetime(
    headers: &HeaderMap,
    d: &ResponseDirectives,
    date: Option<SystemTime>,
    response_time: SystemTime,
) -> Option<Duration> {
    if let Some(v) = d.s_maxage {
        return Some(Duration::from_secs(v.unwrap_or(0)));
    }
    if let Some(v) = d.max_age {
        return Some(Duration::from_secs(v.unwrap_or(0)));
    }
    if headers.contains_key(EXPIRES) {
        // An invalid Expires (e.g. "0") means already expired (§5.3).
        let Some(expires) = parse_http_date(headers, EXPIRES) else {
            return Some(Duration::ZERO);
        };
        let base = date.unwrap_or(response_time);
        return Some(expires.duration_since(base).unwrap_or_default());
    }
    None
}

impl Freshness {
    pub fn compute(
        status: StatusCode,
        headers: &HeaderMap,
        directives: &ResponseDirectives,
        rules: &FreshnessRules,
        request_time: SystemTime,
        response_time: SystemTime,
    ) -> Freshness {
        let date = parse_http_date(headers, DATE);
        let apparent_age = date
            .and_then(|d| response_time.duration_since(d).ok())
            .unwrap_or_default();
        let response_delay = response_time
            .duration_since(request_time)
            .unwrap_or_default();
        let initial_age = apparent_age.max(age_value(headers) + response_delay);

        let explicit = explicit_lifetime(headers, directives, date, response_time);
        let lifetime = match (explicit, rules.ttl) {
            (_, Some(ttl)) if rules.override_origin => ttl,
            (Some(explicit), _) => explicit,
            (None, Some(ttl)) => ttl,
            (None, None) if rules.heuristic && heuristically_cacheable(status) => {
                heuristic_lifetime(headers, date.unwrap_or(response_time))
            }
            (None, None) => Duration::ZERO,
        };
        Freshness {
            response_time,
            initial_age,
            lifetime,
            no_cache: directives.no_cache,
            must_revalidate: directives.must_revalidate
                || directives.proxy_revalidate
                || directives.s_maxage.is_some(),
        }
    }

    pub fn current_age(&self, now: SystemTime) -> Duration {
        self.initial_age + now.duration_since(self.response_time).unwrap_or_default()
    }

    /// Whether the stored response may be served for a request with these directives
    /// without contacting the origin.
    pub fn satisfies(&self, request: &RequestDirectives, now: SystemTime) -> bool {
        if self.no_cache || request.no_cache {
            return false;
        }
        let age = self.current_age(now);
        if let Some(max_age) = request.max_age {
            match max_age {
                Some(max) if age <= Duration::from_secs(max) => {}
                _ => return false,
            }
        }
        if let Some(Some(min_fresh)) = request.min_fresh
            && self.lifetime < age + Duration::from_secs(min_fresh)
        {
            return false;
        }
        if self.lifetime > age {
            return true;
        }
        if self.must_revalidate {
            return false;
        }
        match request.max_stale {
            Some(None) => true,
            Some(Some(max_stale)) => age - self.lifetime <= Duration::from_secs(max_stale),
            None => false,
        }
    }
}

fn heuristic_lifetime(headers: &HeaderMap, base: SystemTime) -> Duration {
    let Some(last_modified) = parse_http_date(headers, LAST_MODIFIED) else {
        return Duration::ZERO;
    };
    let since = base.duration_since(last_modified).unwrap_or_default();
    since.mul_f64(HEURISTIC_FRACTION).min(HEURISTIC_CAP)
}

/// Whether the response carries a validator the cache can revalidate with.
pub fn has_validator(headers: &HeaderMap) -> bool {
    headers.contains_key(ETAG) || headers.contains_key(LAST_MODIFIED)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directives::{request_directives, response_directives};
    use http::HeaderValue;

    const T0: Duration = Duration::from_secs(1_700_000_000);

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + T0 + Duration::from_secs(secs)
    }

    fn fresh(headers: &[(&str, String)], rules: FreshnessRules) -> Freshness {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        Freshness::compute(
            StatusCode::OK,
            &h,
            &response_directives(&h),
            &rules,
            at(0),
            at(0),
        )
    }

    fn date(secs: u64) -> String {
        httpdate::fmt_http_date(at(secs))
    }

    #[test]
    fn s_maxage_beats_max_age_beats_expires() {
        let f = fresh(
            &[
                ("cache-control", "max-age=10, s-maxage=20".into()),
                ("expires", date(30)),
                ("date", date(0)),
            ],
            FreshnessRules::default(),
        );
        assert_eq!(f.lifetime, Duration::from_secs(20));
        assert!(f.must_revalidate, "s-maxage implies proxy-revalidate");
        let f = fresh(
            &[
                ("cache-control", "max-age=10".into()),
                ("expires", date(30)),
            ],
            FreshnessRules::default(),
        );
        assert_eq!(f.lifetime, Duration::from_secs(10));
        let f = fresh(
            &[("expires", date(30)), ("date", date(0))],
            FreshnessRules::default(),
        );
        assert_eq!(f.lifetime, Duration::from_secs(30));
    }

    #[test]
    fn invalid_expires_is_already_stale() {
        let f = fresh(
            &[("expires", "0".into())],
            FreshnessRules {
                ttl: Some(Duration::from_secs(60)),
                ..Default::default()
            },
        );
        assert_eq!(f.lifetime, Duration::ZERO);
    }

    #[test]
    fn ttl_applies_only_without_origin_freshness_unless_overridden() {
        let ttl = FreshnessRules {
            ttl: Some(Duration::from_secs(300)),
            ..Default::default()
        };
        assert_eq!(fresh(&[], ttl.clone()).lifetime, Duration::from_secs(300));
        assert_eq!(
            fresh(&[("cache-control", "max-age=5".into())], ttl.clone()).lifetime,
            Duration::from_secs(5)
        );
        let over = FreshnessRules {
            override_origin: true,
            ..ttl
        };
        assert_eq!(
            fresh(&[("cache-control", "max-age=5".into())], over).lifetime,
            Duration::from_secs(300)
        );
    }

    #[test]
    fn age_header_and_request_directives() {
        let f = fresh(
            &[
                ("cache-control", "max-age=100".into()),
                ("age", "40".into()),
            ],
            FreshnessRules::default(),
        );
        assert_eq!(f.current_age(at(10)), Duration::from_secs(50));
        let none = RequestDirectives::default();
        assert!(f.satisfies(&none, at(59)));
        assert!(!f.satisfies(&none, at(60)));
        let mut h = HeaderMap::new();
        h.insert("cache-control", HeaderValue::from_static("max-age=30"));
        assert!(!f.satisfies(&request_directives(&h), at(0)));
        h.insert("cache-control", HeaderValue::from_static("max-stale=10"));
        assert!(f.satisfies(&request_directives(&h), at(65)));
        assert!(!f.satisfies(&request_directives(&h), at(75)));
        h.insert("cache-control", HeaderValue::from_static("min-fresh=30"));
        assert!(!f.satisfies(&request_directives(&h), at(40)));
    }

    #[test]
    fn heuristic_uses_last_modified_fraction() {
        let f = fresh(
            &[("date", date(1000)), ("last-modified", date(0))],
            FreshnessRules::default(),
        );
        assert_eq!(f.lifetime, Duration::from_secs(100));
        let off = FreshnessRules {
            heuristic: false,
            ..Default::default()
        };
        assert_eq!(
            fresh(&[("last-modified", date(0))], off).lifetime,
            Duration::ZERO
        );
    }
}

//! Freshness (RFC 9111 §4.2): how long a stored response may be reused, and how old it is.
//!
//! Everything that depends only on the response is computed once at store time, so a hit costs
//! one subtraction and, only when the request carries Cache-Control, a directive check.

use std::cell::Cell;
use std::time::{Duration, SystemTime};

use crate::fields::Fields;
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
    /// Serve a stale response at once while refreshing it in the background, for up to this long
    /// past its freshness, when the origin does not say (`stale-while-revalidate`).
    pub grace: Duration,
    /// Serve a stale response when the origin fails, for up to this long past its freshness,
    /// when the origin does not say (`stale-if-error`).
    pub stale_if_error: Duration,
    /// Serve a stale response when the origin cannot be reached at all (connect error, closed
    /// connection, timeout), up to this long past its freshness: RFC 9111 §4.2.4 allows a
    /// disconnected cache to do so without the origin's say-so.
    pub stale_if_unreachable: Duration,
    /// How long an object past all its stale windows is kept for conditional revalidation
    /// (Varnish's keep); `None` keeps it until evicted.
    pub keep: Option<Duration>,
}

impl Default for FreshnessRules {
    fn default() -> Self {
        FreshnessRules {
            ttl: None,
            override_origin: false,
            heuristic: true,
            grace: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            stale_if_unreachable: Duration::ZERO,
            keep: None,
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
    /// How long past freshness it may be served while a background refresh runs (RFC 5861 §3).
    pub stale_while_revalidate: Duration,
    /// How long past freshness it may be served when the origin fails (RFC 5861 §4).
    pub stale_if_error: Duration,
    /// How long past freshness it may be served when the origin is unreachable (§4.2.4).
    pub stale_if_unreachable: Duration,
    /// Staleness past which the object is dropped rather than revalidated.
    pub keep_until_staleness: Option<Duration>,
}

pub fn parse_http_date(headers: &impl Fields, name: http::HeaderName) -> Option<SystemTime> {
    let mut values = headers.values(&name);
    let first = values.next()?;
    if values.next().is_some() {
        // Conflicting dates are no date at all.
        return None;
    }
    parse_date(first.to_str().ok()?.trim())
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// `Sun, 06 Nov 1994 08:49:37 GMT`: the format origins send.
const IMF_FIXDATE_LEN: usize = 29;

thread_local! {
    /// The last IMF-fixdate this thread parsed, and its time. An origin sends the same `Date`
    /// for a second at a time, on every response a fill stores, and parsing one cost 700
    /// instructions of a 1 KiB fill's 54k (callgrind `fill1k`); comparing 29 bytes costs a few.
    static LAST_FIXDATE: Cell<Option<([u8; IMF_FIXDATE_LEN], SystemTime)>> = const { Cell::new(None) };
}

/// An HTTP-date (RFC 9110 §5.6.7) in any of its three formats. Recipients are lenient the way
/// the RFC allows: day, month and zone names in any case, and an asctime() weekday that does
/// not match its date. Anything else malformed is no date.
pub fn parse_date(text: &str) -> Option<SystemTime> {
    if let Ok(fixdate) = <[u8; IMF_FIXDATE_LEN]>::try_from(text.as_bytes()) {
        if let Some((last, t)) = LAST_FIXDATE.get()
            && last == fixdate
        {
            return Some(t);
        }
        if let Ok(t) = httpdate::parse_http_date(text) {
            LAST_FIXDATE.set(Some((fixdate, t)));
            return Some(t);
        }
    } else if let Ok(t) = httpdate::parse_http_date(text) {
        return Some(t);
    }
    let fixed_case: String = text
        .split(' ')
        .map(|word| {
            let lower = word.to_ascii_lowercase();
            if lower == "gmt" || lower == "gmt," {
                word.to_ascii_uppercase()
            } else {
                let mut chars = lower.chars();
                match chars.next() {
                    Some(c) if c.is_ascii_alphabetic() => {
                        c.to_ascii_uppercase().to_string() + chars.as_str()
                    }
                    _ => word.to_owned(),
                }
            }
        })
        .collect::<Vec<_>>()
        .join(" ");
    if let Ok(t) = httpdate::parse_http_date(&fixed_case) {
        return Some(t);
    }
    parse_asctime(&fixed_case)
}

/// `Sun Nov  6 08:49:37 1994`, trusting the date over the weekday.
fn parse_asctime(text: &str) -> Option<SystemTime> {
    let b = text.as_bytes();
    if b.len() != 24 || b[3] != b' ' || b[7] != b' ' || b[10] != b' ' || b[19] != b' ' {
        return None;
    }
    let month = MONTHS.iter().position(|m| *m == &text[4..7])? as u32 + 1;
    let day: u32 = text[8..10].trim_start().parse().ok()?;
    let (h, m, s) = (
        text[11..13].parse::<u64>().ok()?,
        text[14..16].parse::<u64>().ok()?,
        text[17..19].parse::<u64>().ok()?,
    );
    if &text[13..14] != ":"
        || &text[16..17] != ":"
        || h > 23
        || m > 59
        || s > 60
        || !(1..=31).contains(&day)
    {
        return None;
    }
    let year: i64 = text[20..24].parse().ok()?;
    let days = days_from_civil(year, month, day);
    let secs = u64::try_from(days).ok()? * 86_400 + h * 3600 + m * 60 + s;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(month) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
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
    // A targeted field replaces Cache-Control and Expires alike (RFC 9213 §2.1).
    if !d.targeted && headers.contains_key(EXPIRES) {
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
            // `public` opens heuristics to any status (RFC 9111 §4.2.2).
            (None, None)
                if rules.heuristic && (heuristically_cacheable(status) || directives.public) =>
            {
                heuristic_lifetime(headers, date.unwrap_or(response_time))
            }
            (None, None) => Duration::ZERO,
        };
        let must_revalidate = directives.must_revalidate
            || directives.proxy_revalidate
            || directives.s_maxage.is_some();
        // RFC 9111 §4.2.4: no stale reuse at all when the origin forbids it.
        let window = |directive: crate::directives::Seconds, default: Duration| {
            if must_revalidate || directives.no_cache {
                Duration::ZERO
            } else {
                match directive {
                    Some(Some(secs)) => Duration::from_secs(secs),
                    Some(None) => Duration::ZERO,
                    None => default,
                }
            }
        };
        Freshness {
            response_time,
            initial_age,
            lifetime,
            no_cache: directives.no_cache,
            must_revalidate,
            stale_while_revalidate: window(directives.stale_while_revalidate, rules.grace),
            stale_if_error: window(directives.stale_if_error, rules.stale_if_error),
            stale_if_unreachable: window(None, rules.stale_if_unreachable),
            keep_until_staleness: None,
        }
        .with_keep(rules.keep)
    }

    fn with_keep(mut self, keep: Option<Duration>) -> Self {
        self.keep_until_staleness = keep.map(|keep| {
            keep + self
                .stale_while_revalidate
                .max(self.stale_if_error)
                .max(self.stale_if_unreachable)
        });
        self
    }

    /// The same freshness, stale from `now` on (a soft purge): the stale-serving windows count
    /// from `now`.
    pub fn expired_at(&self, now: SystemTime) -> Freshness {
        let mut expired = self.clone();
        expired.lifetime = self.lifetime.min(self.current_age(now));
        expired
    }

    /// Past every stale window and the keep time: no longer worth revalidating.
    pub fn beyond_keep(&self, now: SystemTime) -> bool {
        self.keep_until_staleness
            .is_some_and(|limit| self.staleness(now) > limit)
    }

    /// How far past its freshness lifetime the response is (zero while fresh).
    pub fn staleness(&self, now: SystemTime) -> Duration {
        self.current_age(now).saturating_sub(self.lifetime)
    }

    /// Whether a stale response may be served at once while it is refreshed in the background.
    pub fn serve_while_revalidating(&self, request: &RequestDirectives, now: SystemTime) -> bool {
        !request.forces_revalidation()
            && !self.stale_while_revalidate.is_zero()
            && self.staleness(now) <= self.stale_while_revalidate
    }

    /// Whether a stale response may stand in for a failed origin: an error status, or (when
    /// `unreachable`) no answer at all.
    pub fn serve_on_error(
        &self,
        request: &RequestDirectives,
        now: SystemTime,
        unreachable: bool,
    ) -> bool {
        if self.must_revalidate || self.no_cache {
            return false;
        }
        let mut allowed = match request.stale_if_error {
            Some(Some(secs)) => self.stale_if_error.max(Duration::from_secs(secs)),
            _ => self.stale_if_error,
        };
        if unreachable {
            allowed = allowed.max(self.stale_if_unreachable);
        }
        !allowed.is_zero() && self.staleness(now) <= allowed
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
pub fn has_validator(headers: &impl Fields) -> bool {
    headers.has(&ETAG) || headers.has(&LAST_MODIFIED)
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
    fn rfc5861_stale_windows_and_must_revalidate() {
        let f = fresh(
            &[(
                "cache-control",
                "max-age=10, stale-while-revalidate=20, stale-if-error=100".into(),
            )],
            FreshnessRules::default(),
        );
        let none = RequestDirectives::default();
        assert!(!f.satisfies(&none, at(15)));
        assert!(f.serve_while_revalidating(&none, at(15)));
        assert!(!f.serve_while_revalidating(&none, at(31)));
        assert!(f.serve_on_error(&none, at(100), false));
        assert!(!f.serve_on_error(&none, at(111), false));
        let strict = fresh(
            &[(
                "cache-control",
                "max-age=10, must-revalidate, stale-while-revalidate=20".into(),
            )],
            FreshnessRules {
                grace: Duration::from_secs(60),
                stale_if_error: Duration::from_secs(60),
                ..Default::default()
            },
        );
        assert!(!strict.serve_while_revalidating(&none, at(15)));
        assert!(!strict.serve_on_error(&none, at(15), true));
        let graced = fresh(
            &[("cache-control", "max-age=10".into())],
            FreshnessRules {
                grace: Duration::from_secs(60),
                ..Default::default()
            },
        );
        assert!(graced.serve_while_revalidating(&none, at(60)));
        let mut h = HeaderMap::new();
        h.insert("cache-control", HeaderValue::from_static("no-cache"));
        assert!(!graced.serve_while_revalidating(&request_directives(&h), at(60)));
    }

    #[test]
    fn keep_bounds_how_long_a_stale_object_is_kept() {
        let rules = FreshnessRules {
            grace: Duration::from_secs(10),
            keep: Some(Duration::from_secs(60)),
            ..Default::default()
        };
        let f = fresh(&[("cache-control", "max-age=10".into())], rules);
        assert!(!f.beyond_keep(at(80)));
        assert!(f.beyond_keep(at(81)));
        assert!(
            !fresh(
                &[("cache-control", "max-age=10".into())],
                FreshnessRules::default()
            )
            .beyond_keep(at(100_000))
        );
    }

    #[test]
    fn targeted_fields_ignore_expires() {
        let mut h = HeaderMap::new();
        h.insert("expires", HeaderValue::from_str(&date(3600)).unwrap());
        h.insert("cdn-cache-control", HeaderValue::from_static("public"));
        let d = crate::directives::effective_response_directives(
            &h,
            &[http::HeaderName::from_static("cdn-cache-control")],
        );
        let f = Freshness::compute(
            StatusCode::OK,
            &h,
            &d,
            &FreshnessRules {
                heuristic: false,
                ..Default::default()
            },
            at(0),
            at(0),
        );
        assert_eq!(f.lifetime, Duration::ZERO);
    }

    #[test]
    fn lenient_dates() {
        let want = httpdate::parse_http_date("Thu, 18 Aug 2050 02:01:18 GMT").unwrap();
        assert_eq!(parse_date("THU, 18 Aug 2050 02:01:18 GMT"), Some(want));
        assert_eq!(parse_date("Thu, 18 AUG 2050 02:01:18 GMT"), Some(want));
        assert_eq!(parse_date("Thu, 18 Aug 2050 02:01:18 gMT"), Some(want));
        assert_eq!(parse_date("Thu Aug 18 02:01:18 2050"), Some(want));
        assert_eq!(
            parse_date("Mon Aug  8 02:01:18 2050"),
            parse_date("Mon, 08 Aug 2050 02:01:18 GMT")
        );
        for bad in [
            "Thu, 18 Aug 2050 02:01:18 UTC",
            "Thu, 18 Aug 50 02:01:18 GMT",
            "Thu 18 Aug 2050 02:01:18 GMT",
            "0",
        ] {
            assert_eq!(parse_date(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_remembered_date_answers_only_for_its_own_text() {
        let dates = [
            "Thu, 18 Aug 2050 02:01:18 GMT",
            "Thu, 18 Aug 2050 02:01:19 GMT",
            "Thu, 18 Aug 2050 02:01:18 UTC",
        ];
        let want = dates.map(|d| httpdate::parse_http_date(d).ok());
        for _ in 0..2 {
            for (text, want) in dates.iter().zip(want) {
                assert_eq!(parse_date(text), want, "{text}");
                assert_eq!(parse_date(text), want, "{text}, asked again");
            }
        }
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

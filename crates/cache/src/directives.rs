//! Cache-Control parsing (RFC 9111 §5.2), plus the targeted fields of RFC 9213
//! (`CDN-Cache-Control` and friends) and the stale-* extensions of RFC 5861.
//!
//! Parsing is strict where the RFC asks for it: a delta-seconds value must be plain digits, and a
//! directive whose value is invalid counts as present but unusable (`max-age=1.5` gives no
//! freshness rather than being ignored), which errs toward revalidating.

use http::header::{CACHE_CONTROL, PRAGMA};
use http::{HeaderMap, HeaderName, HeaderValue};

/// Seconds value of a directive: `None` when absent, `Some(None)` when present but invalid.
pub type Seconds = Option<Option<u64>>;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ResponseDirectives {
    pub max_age: Seconds,
    pub s_maxage: Seconds,
    pub no_store: bool,
    /// Unqualified `no-cache`: every reuse needs revalidation.
    pub no_cache: bool,
    /// `no-cache="field, …"`: those fields are not sent on a reuse without revalidation.
    pub no_cache_fields: Vec<HeaderName>,
    /// Unqualified `private`: not storable by a shared cache.
    pub private: bool,
    /// `private="field, …"`: those fields are not stored by a shared cache.
    pub private_fields: Vec<HeaderName>,
    pub public: bool,
    pub must_revalidate: bool,
    pub proxy_revalidate: bool,
    pub immutable: bool,
    /// RFC 9111 §5.2.2.3: no-store yields to this for status codes the cache understands.
    pub must_understand: bool,
    /// RFC 5861 §3.
    pub stale_while_revalidate: Seconds,
    /// RFC 5861 §4.
    pub stale_if_error: Seconds,
    /// The directives came from a targeted field (RFC 9213), so Expires is ignored too.
    pub targeted: bool,
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
    pub stale_if_error: Seconds,
}

impl RequestDirectives {
    /// The client insists on the origin being asked (no-cache, or max-age=0).
    pub fn forces_revalidation(&self) -> bool {
        self.no_cache || matches!(self.max_age, Some(Some(0)) | Some(None))
    }
}

/// Splits field lines into `(lower-case name, optional unquoted value)` directives.
fn for_each_directive<'a>(
    values: impl Iterator<Item = &'a HeaderValue>,
    mut f: impl FnMut(&str, Option<&str>),
) {
    for value in values {
        // Bytes outside ASCII spoil only the directive they are in (found by fuzzing): dropping
        // the whole line would drop a `private` or `no-store` beside them.
        let text = String::from_utf8_lossy(value.as_bytes());
        for part in split_list(&text) {
            let (name, value) = match part.split_once('=') {
                Some((n, v)) => (n.trim(), Some(unquote(v.trim()))),
                None => (part, None),
            };
            if name.is_empty() {
                continue;
            }
            // Names are nearly always sent in lower case: a copy only for those that are not.
            let lower;
            let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
                lower = name.to_ascii_lowercase();
                &lower
            } else {
                name
            };
            f(name, value);
        }
    }
}

/// Splits a comma-separated list, honouring commas inside quoted strings; empty members are
/// skipped. Lazily and without a list: a fill parses its response's directives.
fn split_list(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(text);
    std::iter::from_fn(move || {
        loop {
            let (member, next) = first_member(rest?);
            rest = next;
            let member = member.trim();
            if !member.is_empty() {
                return Some(member);
            }
        }
    })
}

/// A list's first member, and what follows its comma (`None` when it was the last). Bytes,
/// not chars: the bytes looked for are ASCII, which never occur inside a multi-byte char.
fn first_member(text: &str) -> (&str, Option<&str>) {
    let (mut in_quotes, mut escaped) = (false, false);
    for (i, b) in text.bytes().enumerate() {
        match b {
            _ if escaped => escaped = false,
            b'\\' if in_quotes => escaped = true,
            b'"' => in_quotes = !in_quotes,
            b',' if !in_quotes => return (&text[..i], Some(&text[i + 1..])),
            _ => {}
        }
    }
    (text, None)
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

fn field_names(value: Option<&str>) -> Vec<HeaderName> {
    value
        .into_iter()
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().to_ascii_lowercase().as_bytes()).ok())
        .collect()
}

fn parse_response<'a>(values: impl Iterator<Item = &'a HeaderValue>) -> ResponseDirectives {
    let mut d = ResponseDirectives::default();
    for_each_directive(values, |name, value| match name {
        "max-age" => d.max_age = merge_seconds(d.max_age, delta_seconds(value)),
        "s-maxage" => d.s_maxage = merge_seconds(d.s_maxage, delta_seconds(value)),
        "no-store" => d.no_store = true,
        "no-cache" => match field_names(value) {
            fields if fields.is_empty() => d.no_cache = true,
            fields => d.no_cache_fields.extend(fields),
        },
        "private" => match field_names(value) {
            fields if fields.is_empty() => d.private = true,
            fields => d.private_fields.extend(fields),
        },
        "public" => d.public = true,
        "must-revalidate" => d.must_revalidate = true,
        "proxy-revalidate" => d.proxy_revalidate = true,
        "immutable" => d.immutable = true,
        "must-understand" => d.must_understand = true,
        "stale-while-revalidate" => {
            d.stale_while_revalidate = merge_seconds(d.stale_while_revalidate, delta_seconds(value))
        }
        "stale-if-error" => {
            d.stale_if_error = merge_seconds(d.stale_if_error, delta_seconds(value))
        }
        _ => {}
    });
    d
}

/// Response directives from Cache-Control alone.
pub fn response_directives(headers: &HeaderMap) -> ResponseDirectives {
    parse_response(headers.get_all(CACHE_CONTROL).iter())
}

/// Response directives as a cache with these targeted fields reads them (RFC 9213 §2.1): the
/// first targeted field present with a non-empty value is used instead of Cache-Control (and
/// Expires); otherwise Cache-Control applies.
pub fn effective_response_directives(
    headers: &HeaderMap,
    targeted: &[HeaderName],
) -> ResponseDirectives {
    for name in targeted {
        let mut values = headers.get_all(name).iter().peekable();
        if values.peek().is_none() {
            continue;
        }
        let has_content = headers
            .get_all(name)
            .iter()
            .any(|v| v.to_str().is_ok_and(|s| split_list(s).next().is_some()));
        if !has_content {
            continue;
        }
        // Surrogate-Control predates Structured Fields: `max-age=30;target` in its own syntax.
        if name == "surrogate-control" {
            let mut d = parse_surrogate(values);
            d.targeted = true;
            return d;
        }
        // An invalid Structured Field is ignored as a whole (RFC 9213 §2.1).
        if let Some(mut d) = parse_targeted(values) {
            d.targeted = true;
            return d;
        }
    }
    response_directives(headers)
}

/// Edge Architecture `Surrogate-Control`: Cache-Control syntax, each directive optionally
/// followed by `;device-token` (Larder applies every directive, whichever device it names).
fn parse_surrogate<'a>(values: impl Iterator<Item = &'a HeaderValue>) -> ResponseDirectives {
    let stripped: Vec<HeaderValue> = values
        .filter_map(|v| v.to_str().ok())
        .map(|text| {
            split_list(text)
                .map(|member| member.split(';').next().unwrap_or("").trim())
                .collect::<Vec<_>>()
                .join(", ")
        })
        .filter_map(|text| HeaderValue::from_str(&text).ok())
        .collect();
    parse_response(stripped.iter())
}

/// Parses a targeted field as an RFC 8941 Dictionary: `None` when it is not one. Directives
/// whose value has the wrong type (`max-age="60"`) are ignored, as if absent.
fn parse_targeted<'a>(values: impl Iterator<Item = &'a HeaderValue>) -> Option<ResponseDirectives> {
    let mut d = ResponseDirectives::default();
    for value in values {
        let text = value.to_str().ok()?;
        for member in split_list(text) {
            let (key_and_value, params) = member.split_once(';').unwrap_or((member, ""));
            let (key, item) = match key_and_value.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (key_and_value, None),
            };
            if !sf::is_key(key)
                || item.is_some_and(|v| !sf::is_bare_item(v))
                || !sf::are_params(params)
            {
                return None;
            }
            let integer = |item: Option<&str>| item.and_then(sf::non_negative_integer);
            match key {
                "max-age" => {
                    if let Some(n) = integer(item) {
                        d.max_age = Some(Some(n))
                    }
                }
                "s-maxage" => {
                    if let Some(n) = integer(item) {
                        d.s_maxage = Some(Some(n))
                    }
                }
                "stale-while-revalidate" => {
                    if let Some(n) = integer(item) {
                        d.stale_while_revalidate = Some(Some(n))
                    }
                }
                "stale-if-error" => {
                    if let Some(n) = integer(item) {
                        d.stale_if_error = Some(Some(n))
                    }
                }
                flag => {
                    // Flags are Booleans: bare (true) or ?1 / ?0.
                    let on = match item {
                        None | Some("?1") => true,
                        Some("?0") => false,
                        Some(other) if flag == "no-cache" || flag == "private" => {
                            let fields = field_names(Some(unquote(other)));
                            if flag == "no-cache" {
                                d.no_cache_fields.extend(fields);
                            } else {
                                d.private_fields.extend(fields);
                            }
                            continue;
                        }
                        Some(_) => continue,
                    };
                    match flag {
                        "no-store" => d.no_store |= on,
                        "no-cache" => d.no_cache |= on,
                        "private" => d.private |= on,
                        "public" => d.public |= on,
                        "must-revalidate" => d.must_revalidate |= on,
                        "proxy-revalidate" => d.proxy_revalidate |= on,
                        "immutable" => d.immutable |= on,
                        "must-understand" => d.must_understand |= on,
                        _ => {}
                    }
                }
            }
        }
    }
    Some(d)
}

/// Just enough of RFC 8941 to tell a valid Dictionary member from an invalid one.
mod sf {
    pub fn is_key(key: &str) -> bool {
        let mut bytes = key.bytes();
        matches!(bytes.next(), Some(b'a'..=b'z' | b'*'))
            && bytes.all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' | b'*'))
    }

    pub fn is_bare_item(item: &str) -> bool {
        let b = item.as_bytes();
        match b.first() {
            Some(b'-' | b'0'..=b'9') => is_number(item),
            Some(b'"') => is_string(item),
            Some(b':') => {
                item.len() >= 2
                    && item.ends_with(':')
                    && item[1..item.len() - 1]
                        .bytes()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'='))
            }
            Some(b'?') => item == "?0" || item == "?1",
            Some(c) if c.is_ascii_alphabetic() || *c == b'*' => b[1..]
                .iter()
                .all(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~:/".contains(c)),
            _ => false,
        }
    }

    fn is_number(item: &str) -> bool {
        let digits = item.strip_prefix('-').unwrap_or(item);
        match digits.split_once('.') {
            None => (1..=15).contains(&digits.len()) && digits.bytes().all(|c| c.is_ascii_digit()),
            Some((int, frac)) => {
                (1..=12).contains(&int.len())
                    && (1..=3).contains(&frac.len())
                    && int.bytes().chain(frac.bytes()).all(|c| c.is_ascii_digit())
            }
        }
    }

    fn is_string(item: &str) -> bool {
        let Some(inner) = item.strip_prefix('"').and_then(|s| s.strip_suffix('"')) else {
            return false;
        };
        let mut escaped = false;
        for c in inner.bytes() {
            match c {
                _ if escaped => {
                    if c != b'"' && c != b'\\' {
                        return false;
                    }
                    escaped = false;
                }
                b'\\' => escaped = true,
                b'"' => return false,
                0x20..=0x7e => {}
                _ => return false,
            }
        }
        !escaped
    }

    pub fn are_params(params: &str) -> bool {
        params.is_empty()
            || params.split(';').all(|p| {
                let p = p.trim_start();
                match p.split_once('=') {
                    Some((k, v)) => is_key(k) && is_bare_item(v),
                    None => is_key(p),
                }
            })
    }

    pub fn non_negative_integer(item: &str) -> Option<u64> {
        (!item.is_empty() && item.len() <= 15 && item.bytes().all(|c| c.is_ascii_digit()))
            .then(|| item.parse().ok())
            .flatten()
    }
}

pub fn request_directives(headers: &HeaderMap) -> RequestDirectives {
    let mut d = RequestDirectives::default();
    let mut any = false;
    for_each_directive(
        crate::fields::find_all(headers, &CACHE_CONTROL),
        |name, value| {
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
                "stale-if-error" => {
                    d.stale_if_error = merge_seconds(d.stale_if_error, delta_seconds(value))
                }
                _ => {}
            }
        },
    );
    // RFC 9111 §5.4: Pragma: no-cache counts only when Cache-Control is absent.
    if !any
        && crate::fields::find_all(headers, &PRAGMA).any(|v| {
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

    /// The list splitting as it was, by chars into a list: what `split_list` must agree with.
    fn split_list_by_chars(text: &str) -> Vec<&str> {
        let mut parts = Vec::new();
        let (mut start, mut in_quotes, mut escaped) = (0, false, false);
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
        parts.retain(|p| !p.is_empty());
        parts
    }

    #[test]
    fn lists_split_on_commas_outside_quotes_as_by_chars() {
        for text in [
            "",
            ",",
            " , ,",
            "max-age=60",
            "max-age=60, public",
            "no-cache=\"a, b\", max-age=1",
            "x=\"a\\\", b\", y",
            "x=\"\\\u{e9}\", y",
            "x=\"unterminated, y",
            "caf\u{e9}, \u{1f600}=\"\u{e9},\", z",
            "a,,b, ,c",
        ] {
            assert_eq!(
                split_list(text).collect::<Vec<_>>(),
                split_list_by_chars(text),
                "{text:?}"
            );
        }
    }

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
        assert_eq!(
            response_directives(&headers(&["max-age=007"])).max_age,
            Some(Some(7))
        );
    }

    #[test]
    fn qualified_no_cache_and_private_name_fields() {
        let d = response_directives(&headers(&[
            "no-cache=\"set-cookie, X-Foo\", private=\"x-user\", max-age=9",
        ]));
        assert!(!d.no_cache && !d.private);
        assert_eq!(
            d.no_cache_fields,
            vec![
                HeaderName::from_static("set-cookie"),
                HeaderName::from_static("x-foo")
            ]
        );
        assert_eq!(d.private_fields, vec![HeaderName::from_static("x-user")]);
        assert_eq!(d.max_age, Some(Some(9)));
        assert!(response_directives(&headers(&["no-cache"])).no_cache);
    }

    #[test]
    fn stale_extensions() {
        let d = response_directives(&headers(&[
            "max-age=1, stale-while-revalidate=30, stale-if-error=60",
        ]));
        assert_eq!(d.stale_while_revalidate, Some(Some(30)));
        assert_eq!(d.stale_if_error, Some(Some(60)));
    }

    #[test]
    fn targeted_field_replaces_cache_control() {
        let cdn = HeaderName::from_static("cdn-cache-control");
        let mut h = headers(&["private"]);
        h.insert(&cdn, HeaderValue::from_static("max-age=600"));
        let d = effective_response_directives(&h, std::slice::from_ref(&cdn));
        assert!(d.targeted && !d.private);
        assert_eq!(d.max_age, Some(Some(600)));
        // An empty targeted field falls back to Cache-Control.
        h.insert(&cdn, HeaderValue::from_static(""));
        assert!(effective_response_directives(&h, &[cdn]).private);
    }

    #[test]
    fn invalid_targeted_fields_are_ignored() {
        let cdn = HeaderName::from_static("cdn-cache-control");
        for bad in [
            "max-age=10000, &&&&&",
            "max-age =10",
            "max-age= 10",
            "Max-Age=10",
        ] {
            let mut h = headers(&["no-store"]);
            h.insert(&cdn, HeaderValue::from_str(bad).unwrap());
            let d = effective_response_directives(&h, std::slice::from_ref(&cdn));
            assert!(!d.targeted && d.no_store, "{bad}");
        }
        // Valid Structured Field, wrong type: the directive is ignored, the field still applies.
        let mut h = headers(&["max-age=600"]);
        h.insert(&cdn, HeaderValue::from_static("max-age=\"10000\""));
        let d = effective_response_directives(&h, std::slice::from_ref(&cdn));
        assert!(d.targeted);
        assert_eq!(d.max_age, None);
        h.insert(&cdn, HeaderValue::from_static("no-store=?0, max-age=5;x=1"));
        let d = effective_response_directives(&h, &[cdn]);
        assert!(!d.no_store);
        assert_eq!(d.max_age, Some(Some(5)));
    }

    #[test]
    fn surrogate_control_accepts_device_targets() {
        let mut h = headers(&["no-store"]);
        h.insert(
            "surrogate-control",
            HeaderValue::from_static("max-age=10000;larder, no-store-remote"),
        );
        let d = effective_response_directives(&h, &[HeaderName::from_static("surrogate-control")]);
        assert!(d.targeted && !d.no_store);
        assert_eq!(d.max_age, Some(Some(10000)));
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

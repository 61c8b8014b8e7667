//! Answers built from a stored response: full, HEAD, 304 to a conditional request, and byte
//! ranges (RFC 9110 §14) cut from the complete stored body.

use std::fmt::Write;
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use http::header::{
    self, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, ETAG, IF_RANGE, LAST_MODIFIED, RANGE,
};
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode};
use larder_cache::{Fields, StoredResponse, fields, not_modified};

use crate::body::{ProxyBody, empty, full};
use crate::headers::push_field;
use crate::headers::{VIA_VALUE, append_via};
use crate::pipeline::StoredLines;

/// Age, Via, Content-Length, Content-Range or Content-Type, Cache-Status, X-Request-Id: room
/// for them in the served map up front, so a hit never regrows it.
const FIELDS_ADDED_ON_THE_WAY_OUT: usize = 6;

/// More ranges than this in one request is abuse (or pointless); the whole body is sent.
pub(crate) const MAX_RANGES: usize = 16;

/// How the stored response is sent.
pub(crate) struct ServeOptions {
    /// Served without asking the origin: `no-cache="field"` fields stay out.
    pub without_revalidation: bool,
    pub age_secs: u64,
    /// The writer takes stored fields as HTTP/1 lines.
    pub as_lines: bool,
}

/// The response, and the stored fields as lines when `options.as_lines` and every one of them
/// goes out unchanged (its `HeaderMap` then holds only the fields added here).
pub(crate) fn from_store(
    method: &Method,
    request: &HeaderMap,
    stored: &StoredResponse,
    options: ServeOptions,
    added_lines: &mut Vec<u8>,
) -> (Response<ProxyBody>, Option<StoredLines>) {
    // Conditions apply to a successful representation (RFC 9110 §13.2.1), never to a stored 404.
    if stored.status.is_success() && not_modified(request, &stored.headers) {
        let mut response = not_modified_response(&stored.headers);
        response
            .headers_mut()
            .insert(header::AGE, age_value(options.age_secs));
        return (response, None);
    }
    let mut status = stored.status;
    let mut body = stored.body.clone();
    // What a range answer sets: Content-Range, or a multipart Content-Type.
    let mut range_field = None;
    if method == Method::GET && stored.status == StatusCode::OK && fields::has(request, &RANGE) {
        match ranges(request, &stored.headers, body.len() as u64) {
            RangeAnswer::Full => {}
            RangeAnswer::Unsatisfiable => {
                status = StatusCode::RANGE_NOT_SATISFIABLE;
                range_field = Some((CONTENT_RANGE, content_range_value(None, body.len() as u64)));
                body = Bytes::new();
            }
            RangeAnswer::Single(start, end) => {
                status = StatusCode::PARTIAL_CONTENT;
                range_field = Some((
                    CONTENT_RANGE,
                    content_range_value(Some((start, end)), body.len() as u64),
                ));
                body = body.slice(start as usize..=end as usize);
            }
            RangeAnswer::Multiple(parts) => {
                status = StatusCode::PARTIAL_CONTENT;
                let (content_type, multipart) =
                    multipart_byteranges(&stored.headers, &body, &parts);
                range_field = Some((CONTENT_TYPE, content_type));
                body = multipart;
            }
        }
    }
    let left_out = options.without_revalidation && !stored.no_cache_fields.is_empty();
    let lines = if options.as_lines && !left_out && range_field.is_none() {
        added_lines.reserve(super::ADDED_LINES_CAPACITY);
        // Digits and a constant: valid field values without a check.
        push_field(
            added_lines,
            header::AGE.as_str().as_bytes(),
            itoa::Buffer::new().format(options.age_secs).as_bytes(),
        );
        push_field(
            added_lines,
            header::VIA.as_str().as_bytes(),
            VIA_VALUE.as_bytes(),
        );
        Some(StoredLines {
            stored: stored.headers.http1_lines(),
            has_date: stored.headers.has_date(),
            content_length: body.len() as u64,
        })
    } else {
        None
    };
    let headers = if lines.is_some() {
        HeaderMap::new()
    } else {
        let mut headers = stored.headers.to_header_map(FIELDS_ADDED_ON_THE_WAY_OUT);
        if left_out {
            for name in &stored.no_cache_fields {
                headers.remove(name);
            }
        }
        if let Some((name, value)) = range_field {
            headers.insert(name, value);
        }
        headers.insert(header::AGE, age_value(options.age_secs));
        append_via(&mut headers);
        let length = if body.len() == stored.body.len() {
            stored.content_length.clone()
        } else {
            HeaderValue::from(body.len())
        };
        headers.insert(CONTENT_LENGTH, length);
        headers
    };
    let body = if method == Method::HEAD {
        empty()
    } else {
        full(body)
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    (response, lines)
}

/// A response the cache is still filling, its body read along as it arrives: the fields a hit
/// of it will carry, without those `no-cache="…"` names (it is served without revalidation).
/// A single range is cut from the body as it comes; several get the whole body (a server may
/// always send it, RFC 9110 §14.2).
pub(crate) fn from_stream(
    method: &Method,
    request: &HeaderMap,
    stream: &std::sync::Arc<larder_cache::FillStream>,
    place: larder_cache::FillWaiter,
    age_secs: u64,
) -> Response<ProxyBody> {
    let stored = stream.head();
    let len = stream.content_length();
    let mut headers = stored.headers.to_header_map(FIELDS_ADDED_ON_THE_WAY_OUT);
    for name in &stored.no_cache_fields {
        headers.remove(name);
    }
    headers.insert(header::AGE, age_value(age_secs));
    append_via(&mut headers);
    headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
    let mut status = stored.status;
    let mut body = crate::body::boxed(crate::body::ReadAlong::new(stream.reader(), place));
    if method == Method::HEAD {
        // The head now; the place among the waiters is given up with the body.
        body = empty();
    } else if stored.status == StatusCode::OK && fields::has(request, &RANGE) {
        let answer = ranges(request, &stored.headers, len);
        let cut;
        (cut, body) = cut_streamed(answer, len, &mut headers, body);
        status = cut.unwrap_or(status);
    }
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// A single range (or a 416) of a `len`-byte representation whose body is still arriving: the
/// new status, with the fields in `headers` set to match, and the body cut as it comes. No
/// status: the whole 200 goes out unchanged (several ranges, or Range ignored), which a server
/// may always send (RFC 9110 §14.2).
pub(crate) fn cut_streamed(
    answer: RangeAnswer,
    len: u64,
    headers: &mut HeaderMap,
    body: ProxyBody,
) -> (Option<StatusCode>, ProxyBody) {
    let (status, range, body) = match answer {
        RangeAnswer::Full | RangeAnswer::Multiple(_) => return (None, body),
        RangeAnswer::Unsatisfiable => (StatusCode::RANGE_NOT_SATISFIABLE, None, empty()),
        RangeAnswer::Single(start, end) => (
            StatusCode::PARTIAL_CONTENT,
            Some((start, end)),
            crate::body::boxed(crate::body::RangeOf::new(body, start, end - start + 1)),
        ),
    };
    let cut_len = range.map_or(0, |(start, end)| end - start + 1);
    headers.insert(CONTENT_RANGE, content_range_value(range, len));
    headers.insert(CONTENT_LENGTH, HeaderValue::from(cut_len));
    (Some(status), body)
}

/// The Age value: every hit sends one, so those of the first hour are made once and shared
/// (cloning a static value costs nothing; formatting and allocating one does).
fn age_value(secs: u64) -> HeaderValue {
    const PREBUILT: u64 = 3600;
    static AGES: std::sync::OnceLock<Box<[HeaderValue]>> = std::sync::OnceLock::new();
    if secs > PREBUILT {
        return HeaderValue::from(secs);
    }
    let ages = AGES.get_or_init(|| {
        (0..=PREBUILT)
            .map(|n| HeaderValue::from_static(String::leak(n.to_string())))
            .collect()
    });
    ages[secs as usize].clone()
}

/// A 304 carries only the fields RFC 9110 §15.4.5 lists for it.
pub(crate) fn not_modified_response(headers: &impl Fields) -> Response<ProxyBody> {
    let mut response = Response::new(empty());
    *response.status_mut() = StatusCode::NOT_MODIFIED;
    for name in [
        header::CACHE_CONTROL,
        header::CONTENT_LOCATION,
        header::DATE,
        header::ETAG,
        header::EXPIRES,
        header::VARY,
        header::LAST_MODIFIED,
    ] {
        for value in headers.values(&name) {
            response.headers_mut().append(name.clone(), value.clone());
        }
    }
    append_via(response.headers_mut());
    response
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RangeAnswer {
    /// Ignore the Range header: send 200 with the whole body.
    Full,
    Unsatisfiable,
    Single(u64, u64),
    Multiple(Vec<(u64, u64)>),
}

/// Evaluates Range (and If-Range) against a complete representation of `len` bytes.
pub(crate) fn ranges(request: &HeaderMap, stored: &impl Fields, len: u64) -> RangeAnswer {
    if let Some(if_range) = fields::find(request, &IF_RANGE)
        && !if_range_matches(if_range, stored)
    {
        return RangeAnswer::Full;
    }
    let mut values = fields::find_all(request, &RANGE);
    let (Some(value), None) = (values.next(), values.next()) else {
        return RangeAnswer::Full;
    };
    let Some(spec) = value
        .to_str()
        .ok()
        .and_then(|v| v.trim().strip_prefix("bytes="))
    else {
        // Unknown range units are ignored (RFC 9110 §14.2).
        return RangeAnswer::Full;
    };
    let mut satisfiable = Vec::new();
    let mut count = 0;
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        count += 1;
        if count > MAX_RANGES {
            return RangeAnswer::Full;
        }
        let Some((first, last)) = part.split_once('-') else {
            return RangeAnswer::Full;
        };
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        let range = match (first.trim(), last.trim()) {
            (f, l) if digits(f) && (l.is_empty() || digits(l)) => {
                let Ok(start) = f.parse::<u64>() else {
                    return RangeAnswer::Full;
                };
                let end = if l.is_empty() {
                    u64::MAX
                } else {
                    l.parse::<u64>().unwrap_or(u64::MAX)
                };
                if end < start {
                    return RangeAnswer::Full;
                }
                (start < len).then(|| (start, end.min(len - 1)))
            }
            ("", l) if digits(l) => {
                let suffix = l.parse::<u64>().unwrap_or(u64::MAX);
                (suffix > 0 && len > 0).then(|| (len - suffix.min(len), len - 1))
            }
            _ => return RangeAnswer::Full,
        };
        satisfiable.extend(range);
    }
    if count == 0 {
        return RangeAnswer::Full;
    }
    match satisfiable.len() {
        0 => RangeAnswer::Unsatisfiable,
        1 => RangeAnswer::Single(satisfiable[0].0, satisfiable[0].1),
        _ => {
            // Overlapping ranges are a known amplification trick; answer them with the whole body.
            let mut sorted = satisfiable.clone();
            sorted.sort_unstable();
            if sorted.windows(2).any(|w| w[1].0 <= w[0].1) {
                return RangeAnswer::Full;
            }
            RangeAnswer::Multiple(satisfiable)
        }
    }
}

/// RFC 9110 §13.1.5: a strong entity-tag match, or a date equal to a strong Last-Modified.
fn if_range_matches(if_range: &HeaderValue, stored: &impl Fields) -> bool {
    let Ok(value) = if_range.to_str() else {
        return false;
    };
    let value = value.trim();
    if value.starts_with('"') || value.starts_with("W/") {
        let etag = stored
            .first(&ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::trim);
        return !value.starts_with("W/")
            && etag.is_some_and(|e| !e.starts_with("W/") && e == value);
    }
    let (Ok(date), Some(last_modified)) = (
        httpdate::parse_http_date(value),
        stored
            .first(&LAST_MODIFIED)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v).ok()),
    ) else {
        return false;
    };
    // Last-Modified is only strong if it is at least a second older than the response's Date.
    let strong = stored
        .first(&header::DATE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok())
        .and_then(|d| d.duration_since(last_modified).ok())
        .is_some_and(|gap| gap.as_secs() >= 1);
    strong && date == last_modified && date <= SystemTime::now()
}

pub(crate) fn content_range_value(range: Option<(u64, u64)>, len: u64) -> HeaderValue {
    let text = match range {
        Some((start, end)) => format!("bytes {start}-{end}/{len}"),
        None => format!("bytes */{len}"),
    };
    HeaderValue::from_str(&text).expect("digits and punctuation")
}

fn multipart_byteranges(
    stored: &impl Fields,
    body: &Bytes,
    parts: &[(u64, u64)],
) -> (HeaderValue, Bytes) {
    let boundary = format!("larder{:016x}", fastrand::u64(..));
    let part_type = stored.first(&CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let len = body.len() as u64;
    let mut out = BytesMut::new();
    for &(start, end) in parts {
        let mut head = format!("\r\n--{boundary}\r\n");
        if let Some(t) = part_type {
            let _ = write!(head, "Content-Type: {t}\r\n");
        }
        let _ = write!(head, "Content-Range: bytes {start}-{end}/{len}\r\n\r\n");
        out.extend_from_slice(head.as_bytes());
        out.extend_from_slice(&body[start as usize..=end as usize]);
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let content_type = HeaderValue::from_str(&format!("multipart/byteranges; boundary={boundary}"))
        .expect("token characters");
    (content_type, out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(range: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(RANGE, HeaderValue::from_str(range).unwrap());
        h
    }

    #[test]
    fn range_forms() {
        let stored = HeaderMap::new();
        assert_eq!(
            ranges(&req("bytes=0-4"), &stored, 10),
            RangeAnswer::Single(0, 4)
        );
        assert_eq!(
            ranges(&req("bytes=5-"), &stored, 10),
            RangeAnswer::Single(5, 9)
        );
        assert_eq!(
            ranges(&req("bytes=-3"), &stored, 10),
            RangeAnswer::Single(7, 9)
        );
        assert_eq!(
            ranges(&req("bytes=8-100"), &stored, 10),
            RangeAnswer::Single(8, 9)
        );
        assert_eq!(
            ranges(&req("bytes=-100"), &stored, 10),
            RangeAnswer::Single(0, 9)
        );
        assert_eq!(
            ranges(&req("bytes=20-30"), &stored, 10),
            RangeAnswer::Unsatisfiable
        );
        assert_eq!(
            ranges(&req("bytes=0-1, 5-6"), &stored, 10),
            RangeAnswer::Multiple(vec![(0, 1), (5, 6)])
        );
        assert_eq!(
            ranges(&req("bytes=0-5, 3-6"), &stored, 10),
            RangeAnswer::Full
        );
        assert_eq!(ranges(&req("items=0-1"), &stored, 10), RangeAnswer::Full);
        assert_eq!(ranges(&req("bytes=5-1"), &stored, 10), RangeAnswer::Full);
        assert_eq!(ranges(&req("bytes=x-1"), &stored, 10), RangeAnswer::Full);
    }

    #[test]
    fn if_range_requires_a_strong_match() {
        let mut stored = HeaderMap::new();
        stored.insert(ETAG, HeaderValue::from_static("\"v1\""));
        let mut r = req("bytes=0-1");
        r.insert(IF_RANGE, HeaderValue::from_static("\"v1\""));
        assert_eq!(ranges(&r, &stored, 10), RangeAnswer::Single(0, 1));
        r.insert(IF_RANGE, HeaderValue::from_static("\"v0\""));
        assert_eq!(ranges(&r, &stored, 10), RangeAnswer::Full);
        r.insert(IF_RANGE, HeaderValue::from_static("W/\"v1\""));
        assert_eq!(ranges(&r, &stored, 10), RangeAnswer::Full);
    }
}

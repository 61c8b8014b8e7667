//! Header rules of an intermediary (RFC 9110 §7.6): hop-by-hop fields stop here, Via and the
//! X-Forwarded-* family record the hop.

use std::net::SocketAddr;

use http::HeaderMap;
use http::header::{CONNECTION, HeaderName, HeaderValue, TE, TRANSFER_ENCODING, UPGRADE, VIA};

/// Names without an `http` constant, used in more than one place.
pub(crate) const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
pub(crate) const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub(crate) const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
const XFP: HeaderName = HeaderName::from_static("x-forwarded-proto");
const XFH: HeaderName = HeaderName::from_static("x-forwarded-host");

static HOP_BY_HOP: [HeaderName; 8] = [
    CONNECTION,
    KEEP_ALIVE,
    HeaderName::from_static("proxy-connection"),
    http::header::PROXY_AUTHENTICATE,
    http::header::PROXY_AUTHORIZATION,
    TE,
    TRANSFER_ENCODING,
    UPGRADE,
];

pub const VIA_VALUE: &str = "1.1 larder";

/// Fields a `Connection` header may not remove: dropping them would change which resource the
/// origin serves or how the message is framed, while the cache keys on the original.
fn end_to_end_essential(name: &str) -> bool {
    name.eq_ignore_ascii_case("host") || name.eq_ignore_ascii_case("content-length")
}

/// The members of a comma-separated field value (`Connection: keep-alive, Upgrade`), trimmed,
/// empty ones skipped.
pub fn list_members(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|b| *b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|member| !member.is_empty())
}

/// What one `Connection` field line says. A parser reads it as it goes and leaves the field
/// out of the map (where the relay would only look it up and remove it again) unless it
/// `names_fields`: those are hop-by-hop too, for `strip_hop_by_hop` to remove with it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConnectionTokens {
    pub close: bool,
    pub keep_alive: bool,
    pub names_fields: bool,
}

pub(crate) fn connection_tokens(value: &[u8]) -> ConnectionTokens {
    let mut tokens = ConnectionTokens::default();
    for token in list_members(value) {
        if token.eq_ignore_ascii_case(b"close") {
            tokens.close = true;
        } else if token.eq_ignore_ascii_case(b"keep-alive") {
            tokens.keep_alive = true;
        } else {
            tokens.names_fields = true;
        }
    }
    tokens
}

/// Whether a comma-separated field value lists `token` (case-insensitive).
pub fn lists_token(value: &[u8], token: &[u8]) -> bool {
    list_members(value).any(|member| member.eq_ignore_ascii_case(token))
}

/// Appends one HTTP/1 field line, `name: value\r\n`: the one encoding every head this proxy
/// writes uses (responses, interims, a hit's added fields, upstream requests).
pub(crate) fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A field name as received, parsed. The names nearly every message carries, spelled as
/// servers and browsers send them (`Content-Type`, `content-type`), are matched byte for byte
/// first: the general parse lowercases into a scratch buffer and then looks the name up,
/// about 125 instructions a name, a tenth of a relayed response's parsing (callgrind pass).
pub(crate) fn field_name(raw: &[u8]) -> Result<HeaderName, http::header::InvalidHeaderName> {
    match common_field_name(raw) {
        Some(name) => Ok(name),
        None => HeaderName::from_bytes(raw),
    }
}

fn common_field_name(raw: &[u8]) -> Option<HeaderName> {
    use http::header::*;
    // Names the http crate has no constant for, without an allocation (static bytes).
    const PRIORITY: HeaderName = HeaderName::from_static("priority");
    const SEC_CH_UA: HeaderName = HeaderName::from_static("sec-ch-ua");
    const SEC_CH_UA_MOBILE: HeaderName = HeaderName::from_static("sec-ch-ua-mobile");
    const SEC_CH_UA_PLATFORM: HeaderName = HeaderName::from_static("sec-ch-ua-platform");
    const SEC_FETCH_DEST: HeaderName = HeaderName::from_static("sec-fetch-dest");
    const SEC_FETCH_MODE: HeaderName = HeaderName::from_static("sec-fetch-mode");
    const SEC_FETCH_SITE: HeaderName = HeaderName::from_static("sec-fetch-site");
    const SEC_FETCH_USER: HeaderName = HeaderName::from_static("sec-fetch-user");
    const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
    const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
    Some(match raw.len() {
        2 => match <&[u8; 2]>::try_from(raw).ok()? {
            b"TE" | b"Te" | b"te" => TE,
            _ => return None,
        },
        3 => match <&[u8; 3]>::try_from(raw).ok()? {
            b"Age" | b"age" => AGE,
            b"DNT" | b"Dnt" | b"dnt" => DNT,
            _ => return None,
        },
        4 => match <&[u8; 4]>::try_from(raw).ok()? {
            b"Date" | b"date" => DATE,
            b"ETag" | b"Etag" | b"etag" => ETAG,
            b"Host" | b"host" => HOST,
            b"Link" | b"link" => LINK,
            b"Vary" | b"vary" => VARY,
            _ => return None,
        },
        5 => match <&[u8; 5]>::try_from(raw).ok()? {
            b"Range" | b"range" => RANGE,
            _ => return None,
        },
        6 => match <&[u8; 6]>::try_from(raw).ok()? {
            b"Accept" | b"accept" => ACCEPT,
            b"Cookie" | b"cookie" => COOKIE,
            b"Origin" | b"origin" => ORIGIN,
            b"Pragma" | b"pragma" => PRAGMA,
            b"Server" | b"server" => SERVER,
            _ => return None,
        },
        7 => match <&[u8; 7]>::try_from(raw).ok()? {
            b"Expires" | b"expires" => EXPIRES,
            b"Referer" | b"referer" => REFERER,
            _ => return None,
        },
        8 => match <&[u8; 8]>::try_from(raw).ok()? {
            b"If-Range" | b"if-range" => IF_RANGE,
            b"Location" | b"location" => LOCATION,
            b"Priority" | b"priority" => PRIORITY,
            _ => return None,
        },
        9 => match <&[u8; 9]>::try_from(raw).ok()? {
            b"Forwarded" | b"forwarded" => FORWARDED,
            b"Sec-Ch-Ua" | b"sec-ch-ua" => SEC_CH_UA,
            b"X-Real-IP" | b"X-Real-Ip" | b"x-real-ip" => X_REAL_IP,
            _ => return None,
        },
        10 => match <&[u8; 10]>::try_from(raw).ok()? {
            b"Connection" | b"connection" => CONNECTION,
            b"Set-Cookie" | b"set-cookie" => SET_COOKIE,
            b"User-Agent" | b"user-agent" => USER_AGENT,
            b"Keep-Alive" | b"keep-alive" => KEEP_ALIVE,
            b"Tracestate" | b"tracestate" => TRACESTATE,
            _ => return None,
        },
        11 => match <&[u8; 11]>::try_from(raw).ok()? {
            b"Traceparent" | b"traceparent" => TRACEPARENT,
            _ => return None,
        },
        12 => match <&[u8; 12]>::try_from(raw).ok()? {
            b"Content-Type" | b"content-type" => CONTENT_TYPE,
            b"X-Request-ID" | b"X-Request-Id" | b"x-request-id" => REQUEST_ID,
            _ => return None,
        },
        13 => match <&[u8; 13]>::try_from(raw).ok()? {
            b"Accept-Ranges" | b"accept-ranges" => ACCEPT_RANGES,
            b"Authorization" | b"authorization" => AUTHORIZATION,
            b"Cache-Control" | b"cache-control" => CACHE_CONTROL,
            b"If-None-Match" | b"if-none-match" => IF_NONE_MATCH,
            b"Last-Modified" | b"last-modified" => LAST_MODIFIED,
            _ => return None,
        },
        14 => match <&[u8; 14]>::try_from(raw).ok()? {
            b"Content-Length" | b"content-length" => CONTENT_LENGTH,
            b"Sec-Fetch-Dest" | b"sec-fetch-dest" => SEC_FETCH_DEST,
            b"Sec-Fetch-Mode" | b"sec-fetch-mode" => SEC_FETCH_MODE,
            b"Sec-Fetch-Site" | b"sec-fetch-site" => SEC_FETCH_SITE,
            b"Sec-Fetch-User" | b"sec-fetch-user" => SEC_FETCH_USER,
            _ => return None,
        },
        15 => match <&[u8; 15]>::try_from(raw).ok()? {
            b"Accept-Encoding" | b"accept-encoding" => ACCEPT_ENCODING,
            b"Accept-Language" | b"accept-language" => ACCEPT_LANGUAGE,
            b"X-Frame-Options" | b"x-frame-options" => X_FRAME_OPTIONS,
            b"X-Forwarded-For" | b"x-forwarded-for" => XFF,
            _ => return None,
        },
        16 => match <&[u8; 16]>::try_from(raw).ok()? {
            b"Content-Encoding" | b"content-encoding" => CONTENT_ENCODING,
            b"Sec-Ch-Ua-Mobile" | b"sec-ch-ua-mobile" => SEC_CH_UA_MOBILE,
            b"X-Forwarded-Host" | b"x-forwarded-host" => XFH,
            _ => return None,
        },
        17 => match <&[u8; 17]>::try_from(raw).ok()? {
            b"If-Modified-Since" | b"if-modified-since" => IF_MODIFIED_SINCE,
            b"Transfer-Encoding" | b"transfer-encoding" => TRANSFER_ENCODING,
            b"X-Forwarded-Proto" | b"x-forwarded-proto" => XFP,
            _ => return None,
        },
        18 => match <&[u8; 18]>::try_from(raw).ok()? {
            b"Sec-Ch-Ua-Platform" | b"sec-ch-ua-platform" => SEC_CH_UA_PLATFORM,
            _ => return None,
        },
        22 => match <&[u8; 22]>::try_from(raw).ok()? {
            b"X-Content-Type-Options" | b"x-content-type-options" => X_CONTENT_TYPE_OPTIONS,
            _ => return None,
        },
        25 => match <&[u8; 25]>::try_from(raw).ok()? {
            b"Strict-Transport-Security" | b"strict-transport-security" => {
                STRICT_TRANSPORT_SECURITY
            }
            b"Upgrade-Insecure-Requests" | b"upgrade-insecure-requests" => {
                UPGRADE_INSECURE_REQUESTS
            }
            _ => return None,
        },
        27 => match <&[u8; 27]>::try_from(raw).ok()? {
            b"Access-Control-Allow-Origin" | b"access-control-allow-origin" => {
                ACCESS_CONTROL_ALLOW_ORIGIN
            }
            _ => return None,
        },
        _ => return None,
    })
}

/// Whether a name this long may be hop-by-hop: the names above and Trailer are 2, 7, 10 and
/// 16 to 19 bytes long, so the length (at hand for any name) rules out nearly every other
/// field without a comparison.
fn hop_by_hop_length(len: usize) -> bool {
    matches!(len, 2 | 7 | 10 | 16..=19)
}

/// Removes hop-by-hop fields, including any named by `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none, and most of the rest only `Connection: keep-alive`: one pass
    // over the names says which are present, and only those are removed (each removal is a
    // hashed lookup).
    let mut present = 0u16;
    for name in headers.keys() {
        if !hop_by_hop_length(name.as_str().len()) {
            continue;
        }
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present |= 1 << i;
        } else if name == http::header::TRAILER {
            present |= 1 << HOP_BY_HOP.len();
        }
    }
    if present == 0 {
        return;
    }
    if present & 1 != 0 {
        // Values are cheap to clone (shared bytes); the names they list are removed after.
        // Nearly always one value: the rest are gathered only when there are (an empty
        // `Vec` allocates nothing).
        let mut values = headers.get_all(CONNECTION).iter();
        let first = values.next().cloned();
        let rest: Vec<HeaderValue> = values.cloned().collect();
        for value in first.iter().chain(&rest) {
            let tokens = list_members(value.as_bytes()).filter_map(|t| std::str::from_utf8(t).ok());
            for token in tokens {
                // A listed hop-by-hop name (`keep-alive`, `Upgrade`) goes with the others
                // below; `remove` by text parses and hashes the name, for nothing if absent.
                let listed_below = HOP_BY_HOP
                    .iter()
                    .chain([&http::header::TRAILER])
                    .any(|name| name.as_str().eq_ignore_ascii_case(token));
                // `remove` by text matches case-insensitively and ignores what is no valid name.
                if !listed_below && !end_to_end_essential(token) {
                    headers.remove(token);
                }
            }
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    if present & (1 << HOP_BY_HOP.len()) != 0 {
        headers.remove(http::header::TRAILER);
    }
}

pub fn append_via(headers: &mut HeaderMap) {
    headers.append(VIA, HeaderValue::from_static(VIA_VALUE));
}

/// The fields this hop sets on a request it forwards (X-Forwarded-For, -Proto, -Host and Via),
/// kept out of the client's map: Larder's HTTP/1 client writes them as lines after the map's
/// fields, and hyper's (HTTP/2 clusters) gets them inserted. Four hashed inserts into the map
/// (custom names hash every byte) and its regrowth were a pass-through's costliest header work.
#[derive(Debug, Clone)]
pub struct HopFields {
    pub forwarded_for: Option<HeaderValue>,
    pub proto: &'static str,
    pub host: Option<HeaderValue>,
}

impl HopFields {
    /// Each field and its value, in the order they are written; Via last, after any the
    /// client's side added.
    pub fn each(&self, mut field: impl FnMut(&HeaderName, &[u8])) {
        if let Some(value) = &self.forwarded_for {
            field(&XFF, value.as_bytes());
        }
        field(&XFP, self.proto.as_bytes());
        if let Some(value) = &self.host {
            field(&XFH, value.as_bytes());
        }
        field(&VIA, VIA_VALUE.as_bytes());
    }

    /// For a client that takes a map (hyper's).
    pub fn insert_into(&self, headers: &mut HeaderMap) {
        if let Some(value) = &self.forwarded_for {
            headers.insert(XFF.clone(), value.clone());
        }
        headers.insert(XFP.clone(), HeaderValue::from_static(self.proto));
        if let Some(value) = &self.host {
            headers.insert(XFH.clone(), value.clone());
        }
        append_via(headers);
    }
}

/// The forwarding fields an origin behind a proxy expects, and the client's claims to them
/// removed from its map. A client's X-Forwarded-For is kept (and extended) only when
/// `trusted_peer`: from anyone else it would let a client choose the address the origin logs,
/// rate-limits or allows.
pub fn add_forwarded(
    headers: &mut HeaderMap,
    client: Option<SocketAddr>,
    trusted_peer: bool,
    host: Option<HeaderValue>,
    scheme: &'static str,
) -> HopFields {
    // Usually none of them is there: one pass over the request's few names, not four hashed
    // removals.
    let claimed =
        |n: &HeaderName| *n == XFF || *n == XFP || *n == XFH || *n == http::header::FORWARDED;
    let mut previous = None;
    if headers.keys().any(claimed) {
        if trusted_peer {
            previous = headers
                .get(&XFF)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|prev| !prev.is_empty())
                .map(str::to_owned);
        }
        // Set, not appended: this hop knows the scheme and host it received. A client-supplied
        // X-Forwarded-Host or Forwarded would let one request change the links an origin
        // writes into a page the cache then serves to everyone under the real host's key.
        for name in [&XFF, &XFP, &XFH, &http::header::FORWARDED] {
            headers.remove(name);
        }
    }
    let forwarded_for = client.and_then(|client| {
        let mut value = String::with_capacity(48);
        if let Some(prev) = &previous {
            value.push_str(prev);
            value.push_str(", ");
        }
        push_ip(&mut value, client.ip());
        // The string's buffer becomes the value's: no second allocation and copy.
        HeaderValue::from_maybe_shared(bytes::Bytes::from(value)).ok()
    });
    HopFields {
        forwarded_for,
        proto: scheme,
        // The request's own Host value, shared rather than copied.
        host,
    }
}

/// Appends an address's text; IPv4 (nearly every client) without the formatting machinery,
/// which costs more than the rest of this header's work.
fn push_ip(out: &mut String, ip: std::net::IpAddr) {
    match ip {
        std::net::IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                if octet >= 100 {
                    out.push(char::from(b'0' + octet / 100));
                }
                if octet >= 10 {
                    out.push(char::from(b'0' + octet / 10 % 10));
                }
                out.push(char::from(b'0' + octet % 10));
            }
        }
        std::net::IpAddr::V6(v6) => {
            use std::fmt::Write;
            let _ = write!(out, "{v6}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_names_read_as_the_general_parse_reads_them() {
        // Every name the byte-for-byte match knows, in both spellings, and others around them.
        let common = [
            "accept",
            "accept-encoding",
            "accept-language",
            "accept-ranges",
            "access-control-allow-origin",
            "age",
            "authorization",
            "cache-control",
            "connection",
            "content-encoding",
            "content-length",
            "content-type",
            "cookie",
            "date",
            "dnt",
            "etag",
            "expires",
            "forwarded",
            "host",
            "if-modified-since",
            "if-none-match",
            "if-range",
            "last-modified",
            "link",
            "location",
            "origin",
            "pragma",
            "range",
            "referer",
            "server",
            "set-cookie",
            "strict-transport-security",
            "te",
            "transfer-encoding",
            "upgrade-insecure-requests",
            "user-agent",
            "vary",
            "x-content-type-options",
            "x-frame-options",
            "keep-alive",
            "priority",
            "sec-ch-ua",
            "sec-ch-ua-mobile",
            "sec-ch-ua-platform",
            "sec-fetch-dest",
            "sec-fetch-mode",
            "sec-fetch-site",
            "sec-fetch-user",
            "traceparent",
            "tracestate",
            "x-forwarded-for",
            "x-forwarded-host",
            "x-forwarded-proto",
            "x-real-ip",
            "x-request-id",
        ];
        let title_case = |name: &str| {
            name.split('-')
                .map(|word| word[..1].to_ascii_uppercase() + &word[1..])
                .collect::<Vec<_>>()
                .join("-")
        };
        for name in common {
            for spelling in [name.to_owned(), title_case(name)] {
                let expected = HeaderName::from_bytes(spelling.as_bytes()).unwrap();
                let found = common_field_name(spelling.as_bytes());
                assert_eq!(found.as_ref(), Some(&expected), "{spelling} is matched");
                assert_eq!(field_name(spelling.as_bytes()).unwrap(), expected);
            }
        }
        for spelling in ["ETag", "DNT", "TE", "X-Real-IP", "X-Request-ID"] {
            let expected = HeaderName::from_bytes(spelling.as_bytes()).unwrap();
            assert_eq!(common_field_name(spelling.as_bytes()), Some(expected));
        }
        // Other spellings and names take the general parse, to the same result.
        for name in common
            .iter()
            .chain(&["content-language", "x-custom", "www-authenticate"])
        {
            for spelling in [
                name.to_ascii_uppercase(),
                format!("{name}x"),
                name[1..].to_owned(),
                title_case(name),
            ] {
                let expected = HeaderName::from_bytes(spelling.as_bytes()).unwrap();
                assert_eq!(
                    field_name(spelling.as_bytes()).unwrap(),
                    expected,
                    "{spelling}"
                );
            }
        }
        for bad in [&b""[..], b"Content Type", b"Host:", b"caf\xc3\xa9"] {
            assert!(field_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn every_hop_by_hop_name_passes_the_length_filter() {
        for name in HOP_BY_HOP.iter().chain([&http::header::TRAILER]) {
            assert!(hop_by_hop_length(name.as_str().len()), "{name}");
        }
    }

    #[test]
    fn list_members_are_trimmed_and_empty_ones_skipped() {
        let members: Vec<&[u8]> = list_members(b" keep-alive ,, Upgrade,\tclose ").collect();
        assert_eq!(members, [&b"keep-alive"[..], b"Upgrade", b"close"]);
        assert!(lists_token(b"keep-alive, CLOSE", b"close"));
        assert!(!lists_token(b"closed, x-close", b"close"));
        assert_eq!(list_members(b" , ").count(), 0);
    }

    #[test]
    fn strips_connection_named_fields() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("close, X-Secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        h.insert(CONNECTION, HeaderValue::from_static("host"));
        h.insert(http::header::HOST, HeaderValue::from_static("example.com"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h[http::header::HOST], "example.com");
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn addresses_are_written_as_std_writes_them() {
        for ip in [
            "0.0.0.0",
            "10.0.0.1",
            "127.0.0.2",
            "192.168.100.255",
            "255.9.99.100",
            "::1",
            "2001:db8::7",
        ] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            let mut out = String::new();
            push_ip(&mut out, ip);
            assert_eq!(out, ip.to_string());
        }
    }

    #[test]
    fn connection_tokens_match_any_case_and_skip_garbage() {
        let mut h = HeaderMap::new();
        h.append(CONNECTION, HeaderValue::from_static("Keep-Alive, X-Upper"));
        h.append(
            CONNECTION,
            HeaderValue::from_static(" , bad name, Content-Length"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-upper", HeaderValue::from_static("1"));
        h.insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        h.insert(http::header::TRAILER, HeaderValue::from_static("x-sum"));
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|n| n.as_str()).collect();
        assert_eq!(left, ["content-length"]);
    }

    /// What an origin sees: the map with the hop's fields in it.
    fn forwarded(
        mut h: HeaderMap,
        client: Option<&str>,
        trusted_peer: bool,
        host: &'static str,
    ) -> HeaderMap {
        let client = client.map(|c| c.parse().unwrap());
        let hop = add_forwarded(
            &mut h,
            client,
            trusted_peer,
            Some(HeaderValue::from_static(host)),
            "http",
        );
        hop.insert_into(&mut h);
        h
    }

    #[test]
    fn forwarded_headers_chain() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        let h = forwarded(h, Some("127.0.0.2:1"), true, "example.com");
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.2");
        // From an untrusted peer, the chain it claims is dropped.
        let mut spoofed = HeaderMap::new();
        spoofed.insert("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
        let spoofed = forwarded(spoofed, Some("127.0.0.2:1"), false, "example.com");
        assert_eq!(spoofed["x-forwarded-for"], "127.0.0.2");
        assert_eq!(h["x-forwarded-host"], "example.com");
        let mut h = h;
        h.insert("x-forwarded-host", HeaderValue::from_static("evil.example"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        h.insert("forwarded", HeaderValue::from_static("host=evil.example"));
        h.remove("via");
        let h = forwarded(h, None, true, "example.com");
        assert_eq!(h["x-forwarded-host"], "example.com");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert!(!h.contains_key("forwarded"));
        // No client address: no X-Forwarded-For made up, none of the client's kept.
        assert!(!h.contains_key("x-forwarded-for"));
        assert_eq!(h["via"], VIA_VALUE);
    }

    #[test]
    fn a_clients_forwarding_claims_leave_the_map_whoever_it_is() {
        for trusted_peer in [false, true] {
            let mut h = HeaderMap::new();
            for (name, value) in [
                ("x-forwarded-for", "6.6.6.6"),
                ("x-forwarded-proto", "https"),
                ("x-forwarded-host", "evil.example"),
                ("forwarded", "for=6.6.6.6"),
                ("x-kept", "1"),
            ] {
                h.insert(name, HeaderValue::from_static(value));
            }
            let hop = add_forwarded(
                &mut h,
                Some("10.0.0.2:1".parse().unwrap()),
                trusted_peer,
                Some(HeaderValue::from_static("example.com")),
                "http",
            );
            // What the HTTP/1 client writes: the map's fields, then the hop's lines.
            let left: Vec<&str> = h.keys().map(|n| n.as_str()).collect();
            assert_eq!(left, ["x-kept"], "trusted: {trusted_peer}");
            let expected = if trusted_peer {
                "6.6.6.6, 10.0.0.2"
            } else {
                "10.0.0.2"
            };
            assert_eq!(hop.forwarded_for.as_ref().unwrap(), expected);
            assert_eq!(hop.host.as_ref().unwrap(), "example.com");
        }
    }

    #[test]
    fn hop_fields_come_out_the_same_as_lines_and_in_a_map() {
        let mut h = HeaderMap::new();
        h.insert("via", HeaderValue::from_static("1.0 client-side"));
        let hop = add_forwarded(
            &mut h,
            Some("10.1.2.3:9".parse().unwrap()),
            false,
            Some(HeaderValue::from_static("example.com")),
            "https",
        );
        let mut lines = Vec::new();
        hop.each(|name, value| push_field(&mut lines, name.as_str().as_bytes(), value));
        assert_eq!(
            String::from_utf8(lines).unwrap(),
            "x-forwarded-for: 10.1.2.3\r\nx-forwarded-proto: https\r\n\
             x-forwarded-host: example.com\r\nvia: 1.1 larder\r\n"
        );
        hop.insert_into(&mut h);
        let via: Vec<_> = h.get_all("via").iter().collect();
        assert_eq!(via, ["1.0 client-side", VIA_VALUE]);
        assert_eq!(h["x-forwarded-for"], "10.1.2.3");
    }
}

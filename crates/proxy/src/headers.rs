//! Header rules of an intermediary (RFC 9110 §7.6): hop-by-hop fields stop here, Via and the
//! X-Forwarded-* family record the hop.

use std::net::SocketAddr;

use http::HeaderMap;
use http::header::{CONNECTION, HeaderName, HeaderValue, TE, TRANSFER_ENCODING, UPGRADE, VIA};

static HOP_BY_HOP: [HeaderName; 8] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
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

/// Adds the forwarding headers an origin behind a proxy expects. A client's X-Forwarded-For
/// is kept (and extended) only when `trusted_peer`: from anyone else it would let a client
/// choose the address the origin logs, rate-limits or allows.
pub fn add_forwarded(
    headers: &mut HeaderMap,
    client: Option<SocketAddr>,
    trusted_peer: bool,
    host: Option<HeaderValue>,
    scheme: &'static str,
) {
    static XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
    static XFP: HeaderName = HeaderName::from_static("x-forwarded-proto");
    static XFH: HeaderName = HeaderName::from_static("x-forwarded-host");
    // Room for the four fields added here, so the map does not grow (and rehash) for them.
    headers.reserve(4);
    if let Some(client) = client {
        let mut value = String::with_capacity(48);
        match headers.get(&XFF).and_then(|v| v.to_str().ok()) {
            Some(prev) if trusted_peer && !prev.trim().is_empty() => {
                value.push_str(prev);
                value.push_str(", ");
            }
            _ => {}
        }
        push_ip(&mut value, client.ip());
        // The string's buffer becomes the value's: no second allocation and copy.
        if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(value)) {
            headers.insert(XFF.clone(), v);
        }
    }
    // Set, not appended: this hop knows the scheme and host it received. A client-supplied
    // X-Forwarded-Host or Forwarded would let one request change the links an origin writes
    // into a page the cache then serves to everyone under the real host's key.
    headers.insert(XFP.clone(), HeaderValue::from_static(scheme));
    headers.remove(&XFH);
    headers.remove(http::header::FORWARDED);
    // The request's own Host value, shared rather than copied.
    if let Some(host) = host {
        headers.insert(XFH.clone(), host);
    }
    append_via(headers);
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

    #[test]
    fn forwarded_headers_chain() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        add_forwarded(
            &mut h,
            Some("127.0.0.2:1".parse().unwrap()),
            true,
            Some(HeaderValue::from_static("example.com")),
            "http",
        );
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.2");
        // From an untrusted peer, the chain it claims is dropped.
        let mut spoofed = HeaderMap::new();
        spoofed.insert("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
        add_forwarded(
            &mut spoofed,
            Some("127.0.0.2:1".parse().unwrap()),
            false,
            Some(HeaderValue::from_static("example.com")),
            "http",
        );
        assert_eq!(spoofed["x-forwarded-for"], "127.0.0.2");
        assert_eq!(h["x-forwarded-host"], "example.com");
        h.insert("x-forwarded-host", HeaderValue::from_static("evil.example"));
        h.insert("forwarded", HeaderValue::from_static("host=evil.example"));
        add_forwarded(
            &mut h,
            None,
            true,
            Some(HeaderValue::from_static("example.com")),
            "http",
        );
        assert_eq!(h["x-forwarded-host"], "example.com");
        assert!(!h.contains_key("forwarded"));
        assert_eq!(h["via"], VIA_VALUE);
    }
}

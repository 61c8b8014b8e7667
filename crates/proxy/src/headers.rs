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
fn end_to_end_essential(name: &HeaderName) -> bool {
    name == http::header::HOST || name == http::header::CONTENT_LENGTH
}

/// Removes hop-by-hop fields, including any named by `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names beats nine hashed removals.
    let any = headers
        .keys()
        .any(|n| HOP_BY_HOP.contains(n) || n == http::header::TRAILER);
    if !any {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().to_ascii_lowercase().as_bytes()).ok())
        .filter(|n| !end_to_end_essential(n))
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove(http::header::TRAILER);
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
    host: &str,
    scheme: &'static str,
) {
    static XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
    static XFP: HeaderName = HeaderName::from_static("x-forwarded-proto");
    static XFH: HeaderName = HeaderName::from_static("x-forwarded-host");
    if let Some(client) = client {
        let ip = client.ip().to_string();
        let value = match headers.get(&XFF).and_then(|v| v.to_str().ok()) {
            Some(prev) if trusted_peer && !prev.trim().is_empty() => format!("{prev}, {ip}"),
            _ => ip,
        };
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(XFF.clone(), v);
        }
    }
    // Set, not appended: this hop knows the scheme and host it received. A client-supplied
    // X-Forwarded-Host or Forwarded would let one request change the links an origin writes
    // into a page the cache then serves to everyone under the real host's key.
    headers.insert(XFP.clone(), HeaderValue::from_static(scheme));
    headers.remove(&XFH);
    headers.remove(http::header::FORWARDED);
    if let Ok(v) = HeaderValue::from_str(host) {
        headers.insert(XFH.clone(), v);
    }
    append_via(headers);
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn forwarded_headers_chain() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        add_forwarded(
            &mut h,
            Some("127.0.0.2:1".parse().unwrap()),
            true,
            "example.com",
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
            "example.com",
            "http",
        );
        assert_eq!(spoofed["x-forwarded-for"], "127.0.0.2");
        assert_eq!(h["x-forwarded-host"], "example.com");
        h.insert("x-forwarded-host", HeaderValue::from_static("evil.example"));
        h.insert("forwarded", HeaderValue::from_static("host=evil.example"));
        add_forwarded(&mut h, None, true, "example.com", "http");
        assert_eq!(h["x-forwarded-host"], "example.com");
        assert!(!h.contains_key("forwarded"));
        assert_eq!(h["via"], VIA_VALUE);
    }
}

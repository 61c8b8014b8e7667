//! Cache keys. A key names one stored response: scheme, host, path, the query as the resource
//! type's rules normalise it, chosen request headers, and (for `Vary`) the selecting header values.
//! Fields are joined with NUL, which cannot occur in a parsed URI or header value, so two different
//! requests can never produce the same key.

use std::sync::Arc;

use http::{HeaderMap, HeaderName};

const SEP: char = '\0';
/// Marks a header absent from the request, distinct from a present-but-empty one.
const ABSENT: char = '\u{1}';

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueryMode {
    /// The query string as received.
    #[default]
    Keep,
    /// Ignore the query string: `/a?x=1` and `/a` share one object.
    Drop,
    /// Sort `&`-separated parameters so their order does not split the cache.
    Sort,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyRules {
    pub query: QueryMode,
    /// Request headers whose values become part of the key (lower-case names).
    pub headers: Vec<HeaderName>,
}

/// What the cache needs to know about a request to key it.
#[derive(Debug, Clone, Copy)]
pub struct RequestTarget<'a> {
    pub scheme: &'a str,
    /// Lower-case host, with the port only when it is not the scheme's default.
    pub host: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Key(Arc<str>);

impl std::borrow::Borrow<str> for Key {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// Writes a key in the thread's scratch string, then copies it into its shared string: one
/// allocation per key (every request builds one), not a `String` and then the `Arc` too.
fn build_key(write: impl FnOnce(&mut String)) -> Key {
    thread_local! {
        static SCRATCH: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
    }
    /// A scratch string grown past this by a huge URL is dropped rather than kept per thread.
    const KEEP_AT_MOST: usize = 16 * 1024;
    SCRATCH.with_borrow_mut(|s| {
        s.clear();
        write(s);
        let key = Key(Arc::from(s.as_str()));
        if s.capacity() > KEEP_AT_MOST {
            *s = String::new();
        }
        key
    })
}

impl Key {
    pub fn primary(target: &RequestTarget<'_>, rules: &KeyRules) -> Key {
        let query = normalize_query(target.query, rules.query);
        build_key(|s| {
            s.push_str(target.scheme);
            s.push(SEP);
            s.push_str(target.host);
            s.push(SEP);
            s.push_str(target.path);
            s.push(SEP);
            s.push_str(&query);
            s.push(SEP);
            push_header_values(s, target.headers, &rules.headers);
        })
    }

    /// The key of one `Vary` variant under this primary key.
    pub fn variant(&self, vary: &[HeaderName], headers: &HeaderMap) -> Key {
        build_key(|s| {
            s.push_str(&self.0);
            s.push(SEP);
            s.push('v');
            push_header_values(s, headers, vary);
        })
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn field(&self, n: usize) -> &str {
        self.0.split(SEP).nth(n).unwrap_or("")
    }

    pub fn host(&self) -> &str {
        self.field(1)
    }

    /// Host without port and path in one pass: what purges and the invalidation index find keys by.
    pub fn purge_target(&self) -> (&str, &str) {
        // Byte searches: `str::split` on a char cost 370 instructions here, and this runs
        // twice per fill (index, and unindex of what it evicted).
        let field_end = |s: &str| s.bytes().position(|b| b == SEP as u8).unwrap_or(s.len());
        let Some(rest) = self.0.get(field_end(&self.0) + 1..) else {
            return ("", "");
        };
        let host = &rest[..field_end(rest)];
        let path = rest.get(host.len() + 1..).unwrap_or("");
        (host_without_port(host), &path[..field_end(path)])
    }

    pub fn path(&self) -> &str {
        self.field(2)
    }

    /// The normalised query ("" when none).
    pub fn query(&self) -> &str {
        self.field(3)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let q = self.query();
        write!(
            f,
            "{}://{}{}{}{}",
            self.field(0),
            self.host(),
            self.path(),
            if q.is_empty() { "" } else { "?" },
            q
        )
    }
}

pub fn normalize_query(query: Option<&str>, mode: QueryMode) -> String {
    match (query, mode) {
        (None, _) | (_, QueryMode::Drop) => String::new(),
        (Some(q), QueryMode::Keep) => q.to_owned(),
        (Some(q), QueryMode::Sort) => {
            let mut parts: Vec<&str> = q.split('&').filter(|p| !p.is_empty()).collect();
            parts.sort_unstable();
            parts.join("&")
        }
    }
}

/// Host as keyed: lower case, default port dropped, so `Example.com:80` and `example.com` share.
pub fn normalize_host(host: &str, scheme: &str) -> String {
    let mut lower = host.trim().to_ascii_lowercase();
    let default = match scheme {
        "https" => ":443",
        _ => ":80",
    };
    if lower.len() > default.len() && lower.ends_with(default) {
        lower.truncate(lower.len() - default.len());
    }
    lower
}

/// Host without its port, as purge requests name it.
pub fn host_without_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host
            .split_once(']')
            .map_or(host, |(h, _)| &host[..=h.len()]);
    }
    host.bytes()
        .rposition(|b| b == b':')
        .map_or(host, |colon| &host[..colon])
}

fn push_header_values(s: &mut String, headers: &HeaderMap, names: &[HeaderName]) {
    for name in names {
        s.push_str(name.as_str());
        s.push('=');
        let mut values = headers.get_all(name).iter().peekable();
        if values.peek().is_none() {
            s.push(ABSENT);
        }
        let mut first = true;
        for value in values {
            // Field lines combine with commas (RFC 9110 §5.3); whitespace around members is not
            // significant, so `gzip, br` and `gzip,br` select the same variant.
            for member in value.as_bytes().split(|b| *b == b',') {
                if !first {
                    s.push(',');
                }
                first = false;
                push_escaped(s, member.trim_ascii());
            }
        }
        s.push('\u{1e}');
    }
}

/// Appends header bytes so that distinct byte strings stay distinct: visible ASCII as is,
/// anything else (and the escape character) as `\xNN`.
fn push_escaped(s: &mut String, bytes: &[u8]) {
    use std::fmt::Write;
    for &b in bytes {
        if (0x20..0x7f).contains(&b) && b != b'\\' {
            s.push(b as char);
        } else {
            let _ = write!(s, "\\x{b:02x}");
        }
    }
}

/// `Vary` field names of a response, lower-cased, deduplicated and sorted so equivalent
/// `Vary` headers share variants. `None` means `Vary: *`.
pub fn vary_names(headers: &HeaderMap) -> Option<Vec<HeaderName>> {
    let mut names = Vec::new();
    for value in headers.get_all(http::header::VARY) {
        let text = String::from_utf8_lossy(value.as_bytes());
        for member in text.split(',').map(str::trim).filter(|m| !m.is_empty()) {
            if member == "*" {
                return None;
            }
            if let Ok(name) = HeaderName::from_bytes(member.to_ascii_lowercase().as_bytes()) {
                names.push(name);
            }
        }
    }
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    names.dedup();
    Some(names)
}

/// Extensions of files that are never HTML.
const STATIC_EXTENSIONS: &[&str] = &[
    "css", "js", "mjs", "map", "json", "xml", "txt", "csv", "png", "jpg", "jpeg", "gif", "webp",
    "avif", "ico", "svg", "bmp", "tif", "tiff", "woff", "woff2", "ttf", "otf", "eot", "mp3", "mp4",
    "webm", "ogg", "wav", "pdf", "zip", "gz", "tgz", "wasm",
];

/// An HTML answer for a path whose last segment names a static file (`/a/b.css`,
/// `/a/b.css;x`): what web cache deception looks like.
pub fn html_behind_static_name(path: &str, content_type: Option<&str>) -> bool {
    let Some(content_type) = content_type else {
        return false;
    };
    let media = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    if media != "text/html" && media != "application/xhtml+xml" {
        return false;
    }
    let last = path.rsplit('/').next().unwrap_or_default();
    // Path parameters (`;jsessionid=…`) end the file name; so does anything after the
    // extension's letters (`x.css%3Fa`, `x.css%00`).
    let name = last.split(';').next().unwrap_or_default();
    name.rsplit_once('.').is_some_and(|(_, ext)| {
        let ext = ext
            .split(|c: char| !c.is_ascii_alphanumeric())
            .next()
            .unwrap_or_default();
        STATIC_EXTENSIONS
            .iter()
            .any(|s| s.eq_ignore_ascii_case(ext))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn target<'a>(
        host: &'a str,
        path: &'a str,
        q: Option<&'a str>,
        h: &'a HeaderMap,
    ) -> RequestTarget<'a> {
        RequestTarget {
            scheme: "http",
            host,
            path,
            query: q,
            headers: h,
        }
    }

    #[test]
    fn purge_target_is_the_host_without_port_and_the_path() {
        // As the fields would split, for every shape a key takes.
        fn split(key: &Key) -> (&str, &str) {
            let mut fields = key.as_str().split(SEP).skip(1);
            let host = fields.next().unwrap_or("");
            let host = if host.starts_with('[') {
                host.split_once(']')
                    .map_or(host, |(h, _)| &host[..=h.len()])
            } else {
                host.rsplit_once(':').map_or(host, |(h, _)| h)
            };
            (host, fields.next().unwrap_or(""))
        }
        let headers = HeaderMap::new();
        let mut keys = vec![
            Key("".into()),
            Key("http".into()),
            Key("http\0".into()),
            Key("http\0example.com".into()),
            Key("http\0example.com:8080\0".into()),
            Key("http\0[::1]:8080\0/p\0q=1\0".into()),
            Key("http\0[::1]\0/p".into()),
            Key("http\0h\u{e9}:1\0/caf\u{e9}\0\0".into()),
            Key("\0example.com\0/a/b".into()),
            Key("\0\0".into()),
        ];
        for host in ["example.com", "example.com:8080", "[::1]:443", "[::1]"] {
            for query in [None, Some("a=1&b=2")] {
                let target = RequestTarget {
                    scheme: "https",
                    host,
                    path: "/x/y.css",
                    query,
                    headers: &headers,
                };
                let primary = Key::primary(&target, &KeyRules::default());
                keys.push(primary.variant(&[http::header::ACCEPT], &headers));
                keys.push(primary);
            }
        }
        for key in &keys {
            assert_eq!(key.purge_target(), split(key), "{:?}", key.as_str());
        }
    }

    #[test]
    fn different_hosts_never_share_a_key() {
        let h = HeaderMap::new();
        let r = KeyRules::default();
        assert_ne!(
            Key::primary(&target("a.example", "/x", None, &h), &r),
            Key::primary(&target("b.example", "/x", None, &h), &r)
        );
        // A path cannot smuggle a host boundary.
        assert_ne!(
            Key::primary(&target("a", "/b/c", None, &h), &r),
            Key::primary(&target("a/b", "/c", None, &h), &r)
        );
    }

    #[test]
    fn query_modes() {
        let h = HeaderMap::new();
        let mut r = KeyRules {
            query: QueryMode::Sort,
            ..Default::default()
        };
        assert_eq!(
            Key::primary(&target("a", "/", Some("b=2&a=1"), &h), &r),
            Key::primary(&target("a", "/", Some("a=1&b=2"), &h), &r)
        );
        r.query = QueryMode::Drop;
        assert_eq!(
            Key::primary(&target("a", "/", Some("b=2"), &h), &r),
            Key::primary(&target("a", "/", None, &h), &r)
        );
        r.query = QueryMode::Keep;
        let k = Key::primary(&target("a", "/p", Some("z=1"), &h), &r);
        assert_ne!(k, Key::primary(&target("a", "/p", None, &h), &r));
        assert_eq!((k.host(), k.path(), k.query()), ("a", "/p", "z=1"));
        assert_eq!(k.to_string(), "http://a/p?z=1");
    }

    #[test]
    fn absent_header_differs_from_empty() {
        let names = [HeaderName::from_static("accept-encoding")];
        let k = Key::primary(
            &target("a", "/", None, &HeaderMap::new()),
            &KeyRules::default(),
        );
        let mut empty = HeaderMap::new();
        empty.insert("accept-encoding", HeaderValue::from_static(""));
        assert_ne!(
            k.variant(&names, &HeaderMap::new()),
            k.variant(&names, &empty)
        );
        let mut a = HeaderMap::new();
        a.insert("accept-encoding", HeaderValue::from_static("gzip, br"));
        let mut b = HeaderMap::new();
        b.append("accept-encoding", HeaderValue::from_static("gzip"));
        b.append("accept-encoding", HeaderValue::from_static("br"));
        assert_eq!(k.variant(&names, &a), k.variant(&names, &b));
    }

    #[test]
    fn non_utf8_values_stay_distinct() {
        let names = [HeaderName::from_static("x-v")];
        let k = Key::primary(
            &target("a", "/", None, &HeaderMap::new()),
            &KeyRules::default(),
        );
        let mut a = HeaderMap::new();
        a.insert("x-v", HeaderValue::from_bytes(b"\xe9").unwrap());
        let mut b = HeaderMap::new();
        b.insert("x-v", HeaderValue::from_bytes(b"\xff").unwrap());
        assert_ne!(k.variant(&names, &a), k.variant(&names, &b));
    }

    #[test]
    fn hosts_normalise() {
        assert_eq!(normalize_host("Example.COM:80", "http"), "example.com");
        assert_eq!(
            normalize_host("example.com:8080", "http"),
            "example.com:8080"
        );
        assert_eq!(host_without_port("example.com:8080"), "example.com");
        assert_eq!(host_without_port("[::1]:80"), "[::1]");
    }

    #[test]
    fn vary_star_and_names() {
        let mut h = HeaderMap::new();
        h.insert(
            "vary",
            HeaderValue::from_static("Accept-Encoding, accept-language"),
        );
        assert_eq!(vary_names(&h).unwrap().len(), 2);
        h.append("vary", HeaderValue::from_static("*"));
        assert!(vary_names(&h).is_none());
    }
}

//! The purge request as clients and peers send it: query parameters or a JSON body, both
//! turned into [`Selector`]s here, in one place, with errors that say which value is wrong.

use larder_cache::Selector;
use serde::{Deserialize, Serialize};

/// Targets one request may name; a bigger batch is refused rather than holding the cache's
/// purge gate for long.
pub const MAX_TARGETS: usize = 1000;

/// What to invalidate: the parsed form of a request, and what is relayed to peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurgeOrder {
    pub selectors: Vec<Selector>,
    pub soft: bool,
}

/// The JSON body: `{"urls": [...], "prefixes": [...], "tags": [...], "soft": true}`, plus
/// `hostname` with `paths` for URLs of one host (`/img/*` is a prefix).
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PurgeBody {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefixes: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default)]
    pub soft: bool,
}

impl PurgeBody {
    /// The canonical body for an order: what peers receive.
    pub fn from_order(order: &PurgeOrder) -> PurgeBody {
        let mut body = PurgeBody {
            soft: order.soft,
            ..Default::default()
        };
        for selector in &order.selectors {
            match selector {
                Selector::Url { host, path, query } => body.urls.push(match query {
                    Some(q) => format!("http://{host}{path}?{q}"),
                    None => format!("http://{host}{path}"),
                }),
                Selector::Prefix { host, prefix } => {
                    body.prefixes.push(format!("http://{host}{prefix}"))
                }
                Selector::Tag(tag) => body.tags.push(tag.clone()),
            }
        }
        body
    }

    pub fn into_order(self) -> Result<PurgeOrder, String> {
        let mut selectors = Vec::new();
        for (i, url) in self.urls.iter().enumerate() {
            let (host, target) = split_url(url).map_err(|e| format!("urls[{i}]: {e}"))?;
            selectors.push(path_selector(host, target).map_err(|e| format!("urls[{i}]: {e}"))?);
        }
        for (i, prefix) in self.prefixes.iter().enumerate() {
            let (host, target) = split_url(prefix).map_err(|e| format!("prefixes[{i}]: {e}"))?;
            let prefix = target.strip_suffix('*').unwrap_or(target);
            selectors.push(Selector::Prefix {
                host: host.to_owned(),
                prefix: prefix.to_owned(),
            });
        }
        if !self.paths.is_empty() {
            let host = self
                .hostname
                .as_deref()
                .filter(|h| !h.is_empty())
                .ok_or("paths: needs hostname")?;
            check_host(host).map_err(|e| format!("hostname: {e}"))?;
            for (i, path) in self.paths.iter().enumerate() {
                selectors.push(path_selector(host, path).map_err(|e| format!("paths[{i}]: {e}"))?);
            }
        } else if self.hostname.is_some() {
            return Err("hostname: needs paths".into());
        }
        for (i, tag) in self.tags.iter().enumerate() {
            selectors.push(tag_selector(tag).map_err(|e| format!("tags[{i}]: {e}"))?);
        }
        finish(selectors, self.soft)
    }
}

/// The query form: `hostname` with `path` (exact, or `/img/*` for a prefix) or `prefix`;
/// `tag` (repeatable) or `tags` (comma-separated); `soft=true`.
pub fn order_from_query(query: &str) -> Result<PurgeOrder, String> {
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(query).map_err(|_| "invalid query string".to_owned())?;
    let mut hostname = None;
    let mut paths = Vec::new();
    let mut prefixes = Vec::new();
    let mut tags = Vec::new();
    let mut soft = false;
    for (name, value) in pairs {
        match name.as_str() {
            "hostname" => hostname = Some(value),
            "path" => paths.push(reencode(&value)),
            "prefix" => prefixes.push(reencode(&value)),
            "tag" => tags.push(value),
            "tags" => tags.extend(value.split(',').map(|t| t.trim().to_owned())),
            "soft" => {
                soft = match value.as_str() {
                    "" | "1" | "true" => true,
                    "0" | "false" => false,
                    _ => return Err(format!("soft: expected true or false, got {value:?}")),
                }
            }
            other => return Err(format!("unknown query parameter {other:?}")),
        }
    }
    let mut selectors = Vec::new();
    if !paths.is_empty() || !prefixes.is_empty() {
        let host = hostname
            .as_deref()
            .filter(|h| !h.is_empty())
            .ok_or("missing query parameter: hostname")?;
        check_host(host).map_err(|e| format!("hostname: {e}"))?;
        for path in &paths {
            selectors.push(path_selector(host, path).map_err(|e| format!("path: {e}"))?);
        }
        for prefix in &prefixes {
            if !prefix.starts_with('/') {
                return Err(format!("prefix: must start with /, got {prefix:?}"));
            }
            let prefix = prefix.strip_suffix('*').unwrap_or(prefix);
            selectors.push(Selector::Prefix {
                host: host.to_owned(),
                prefix: prefix.to_owned(),
            });
        }
    } else if hostname.is_some() && tags.is_empty() {
        return Err("missing query parameter: path (must start with /)".into());
    }
    for tag in &tags {
        selectors.push(tag_selector(tag).map_err(|e| format!("tag: {e}"))?);
    }
    if selectors.is_empty() {
        return Err(
            "nothing to purge: give hostname and path (or prefix), or tag; or a JSON body".into(),
        );
    }
    finish(selectors, soft)
}

fn finish(mut selectors: Vec<Selector>, soft: bool) -> Result<PurgeOrder, String> {
    if selectors.is_empty() {
        return Err("nothing to purge: no urls, prefixes, paths or tags".into());
    }
    if selectors.len() > MAX_TARGETS {
        return Err(format!(
            "{} targets in one request; at most {MAX_TARGETS}",
            selectors.len()
        ));
    }
    let mut seen = std::collections::HashSet::new();
    selectors.retain(|s| seen.insert(s.clone()));
    Ok(PurgeOrder { selectors, soft })
}

/// `http://host/path?q`, `https://…`, or `host/path` → (host, "/path?q").
fn split_url(url: &str) -> Result<(&str, &str), String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .unwrap_or(url);
    let (host, target) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => return Err(format!("{url:?} has no path")),
    };
    check_host(host)?;
    Ok((host, target))
}

fn check_host(host: &str) -> Result<(), String> {
    let charset_ok = !host.is_empty()
        && host.len() <= 255
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:[]".contains(&b));
    // An IPv6 address needs its brackets, or its colons would read as a port.
    let bracketed_if_ipv6 = host.matches(':').count() <= 1 || host.starts_with('[');
    if charset_ok && bracketed_if_ipv6 {
        Ok(())
    } else {
        Err(format!(
            "invalid host {host:?} (a name or address, with an optional :port; IPv6 in brackets)"
        ))
    }
}

/// `/path`, `/path?query`, or `/dir/*` (a prefix: `*` only at the end of a path without a
/// query). Also what `PURGE` request targets mean.
pub fn path_selector(host: &str, target: &str) -> Result<Selector, String> {
    if !target.starts_with('/') {
        return Err(format!("path must start with /, got {target:?}"));
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q.to_owned())),
        None => (target, None),
    };
    if query.is_none()
        && let Some(prefix) = path.strip_suffix('*')
    {
        return Ok(Selector::Prefix {
            host: host.to_owned(),
            prefix: prefix.to_owned(),
        });
    }
    Ok(Selector::Url {
        host: host.to_owned(),
        path: path.to_owned(),
        query,
    })
}

/// Query parameters arrive percent-decoded, but cache keys hold paths as clients sent them,
/// encoded: bytes that cannot appear raw in a request target are encoded again, so
/// `path=/caf%C3%A9` purges `/caf%C3%A9`. (A literal `%` in a stored path is sent as `%25`.)
fn reencode(decoded: &str) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(decoded.len());
    for b in decoded.bytes() {
        if b.is_ascii_graphic() {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn tag_selector(tag: &str) -> Result<Selector, String> {
    let tag = tag.trim();
    if tag.is_empty() || tag.len() > larder_cache::invalidate::MAX_TAG_LEN {
        return Err(format!("invalid tag {tag:?}"));
    }
    if tag.contains(|c: char| c == ',' || c.is_whitespace()) {
        return Err(format!("a tag cannot contain commas or spaces: {tag:?}"));
    }
    Ok(Selector::Tag(tag.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(host: &str, path: &str, query: Option<&str>) -> Selector {
        Selector::Url {
            host: host.into(),
            path: path.into(),
            query: query.map(Into::into),
        }
    }

    #[test]
    fn query_forms() {
        let o = order_from_query("hostname=example.com&path=/data/1").unwrap();
        assert_eq!(o.selectors, [url("example.com", "/data/1", None)]);
        assert!(!o.soft);
        let o = order_from_query("hostname=example.com&path=/img/*&soft=true").unwrap();
        assert_eq!(
            o.selectors,
            [Selector::Prefix {
                host: "example.com".into(),
                prefix: "/img/".into()
            }]
        );
        assert!(o.soft);
        let o = order_from_query("tag=a&tag=b&tags=c,d").unwrap();
        assert_eq!(o.selectors.len(), 4);
        let o = order_from_query("hostname=h&path=%2Fq%3Fx%3D1").unwrap();
        assert_eq!(o.selectors, [url("h", "/q", Some("x=1"))]);
        // Keys hold paths as sent: encoded again after the query string's own decoding.
        let o = order_from_query("hostname=h&path=/caf%C3%A9%20x").unwrap();
        assert_eq!(o.selectors, [url("h", "/caf%C3%A9%20x", None)]);
        // `*` is a prefix only at the end of a path, never inside a query.
        let o = order_from_query("hostname=h&path=%2Fp%3Fx%3D*").unwrap();
        assert_eq!(o.selectors, [url("h", "/p", Some("x=*"))]);
        let o = order_from_query("hostname=[::1]:8080&path=/a").unwrap();
        assert_eq!(o.selectors, [url("[::1]:8080", "/a", None)]);
    }

    #[test]
    fn query_errors_say_what_is_wrong() {
        for (query, expected) in [
            ("path=/a", "hostname"),
            ("hostname=h", "path"),
            ("hostname=h&path=a", "must start with /"),
            ("", "nothing to purge"),
            ("tag=a%20b", "spaces"),
            ("hostname=h&path=/a&soft=maybe", "soft"),
            ("hostname=h&paht=/a", "unknown query parameter \"paht\""),
            ("hostname=h%2Fx&path=/a", "invalid host"),
            ("hostname=::1&path=/a", "IPv6 in brackets"),
        ] {
            let err = order_from_query(query).unwrap_err();
            assert!(err.contains(expected), "{query}: {err}");
        }
    }

    #[test]
    fn body_round_trips_through_the_canonical_form() {
        let body: PurgeBody = serde_json::from_str(
            r#"{"urls": ["https://example.com/a?x=1", "example.com/b"],
                "prefixes": ["example.com/img/*"], "tags": ["t1"],
                "hostname": "other.example", "paths": ["/p", "/dir/*"], "soft": true}"#,
        )
        .unwrap();
        let order = body.into_order().unwrap();
        assert_eq!(order.selectors.len(), 6);
        assert!(order.soft);
        let again = PurgeBody::from_order(&order).into_order().unwrap();
        let sorted = |o: &PurgeOrder| {
            let mut v: Vec<String> = o.selectors.iter().map(|s| format!("{s:?}")).collect();
            v.sort();
            v
        };
        assert_eq!(sorted(&again), sorted(&order));
        assert_eq!(again.soft, order.soft);
    }

    #[test]
    fn body_errors_name_the_entry() {
        let bad: PurgeBody =
            serde_json::from_str(r#"{"urls": ["example.com/a", "nopath"]}"#).unwrap();
        assert!(bad.into_order().unwrap_err().starts_with("urls[1]"));
        let too_many = PurgeBody {
            tags: (0..=MAX_TARGETS).map(|i| format!("t{i}")).collect(),
            ..Default::default()
        };
        assert!(too_many.into_order().unwrap_err().contains("at most"));
        assert!(serde_json::from_str::<PurgeBody>(r#"{"tag": ["x"]}"#).is_err());
    }
}

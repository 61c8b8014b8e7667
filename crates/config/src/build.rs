//! Semantic validation: turns the raw document into the model, collecting every problem.
//!
//! Each builder keeps going after an error (substituting a harmless placeholder) so that one
//! run reports everything that is wrong. Checks that depend on other values are skipped when
//! those values were themselves invalid, to avoid follow-on noise.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::ConfigError;
use crate::locate::Locations;
use crate::model::*;
use crate::raw::*;
use crate::units::{DURATION_FORM, format_size, parse_duration, parse_size};

pub(crate) struct Ctx<'a> {
    pub file: &'a str,
    pub locations: &'a Locations,
    pub errors: Vec<ConfigError>,
}

impl Ctx<'_> {
    fn error(&mut self, path: &str, message: impl Into<String>) {
        let pos = self.locations.find(path);
        self.errors.push(ConfigError {
            file: self.file.to_owned(),
            line: pos.map(|p| p.0),
            column: pos.map(|p| p.1),
            path: path.to_owned(),
            message: message.into(),
        });
    }
}

fn key(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

fn index(parent: &str, i: usize) -> String {
    format!("{parent}[{i}]")
}

/// Path of the `i`th entry of a one-or-many value, matching how it appears in the file.
/// A DNS server to ask instead of the system's: `IP` (port 53) or `IP:port`.
fn nameserver(cx: &mut Ctx, path: &str, text: Option<String>) -> Option<SocketAddr> {
    let text = text?;
    let t = text.trim();
    t.parse::<SocketAddr>()
        .or_else(|_| {
            t.parse::<std::net::IpAddr>()
                .map(|ip| SocketAddr::new(ip, 53))
        })
        .map_err(|_| {
            cx.error(
                path,
                format!("invalid address {t:?}: expected IP or IP:port, like 10.96.0.10:53"),
            )
        })
        .ok()
}

/// `10.0.0.0/8`, `fd00::/8`, or a lone address (a /32 or /128).
fn parse_cidr(text: &str) -> Result<ipnet::IpNet, String> {
    text.parse::<ipnet::IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| {
            format!(
                "invalid CIDR {text:?}: expected an address with a prefix length, like \
                 10.0.0.0/8 or fd00::/8"
            )
        })
}

fn list_item(parent: &str, list: &StrList, i: usize) -> String {
    if list.was_list {
        index(parent, i)
    } else {
        parent.to_owned()
    }
}

pub(crate) fn build(raw: RawConfig, cx: &mut Ctx) -> Config {
    let admin = build_admin(raw.admin, cx);
    let listeners = build_listeners(raw.listeners, &admin, cx);
    let limits = build_limits(raw.limits, cx);
    let access_log = build_access_log(raw.access_log, cx);
    let clusters = build_clusters(raw.clusters, cx);
    let virtual_hosts = build_virtual_hosts(raw.virtual_hosts, &clusters, cx);
    let cache = build_cache(raw.cache, cx);
    let resource_types = build_resource_types(raw.resource_type, raw.resource_types, &cache, cx);
    let purge = build_purge(raw.purge, cx);
    let log = build_log(raw.log, cx);
    let tracing = build_tracing(raw.tracing, cx);
    let drain = match raw.drain {
        None => Drain::default(),
        Some(raw) => {
            let d = Drain::default();
            let delay = match &raw.delay {
                Some(v) => duration(cx, "drain.delay", v).unwrap_or(d.delay),
                None => d.delay,
            };
            Drain {
                delay,
                timeout: timeout(cx, "drain.timeout", raw.timeout.as_ref(), d.timeout),
            }
        }
    };
    Config {
        listeners,
        admin,
        limits,
        access_log,
        virtual_hosts,
        clusters,
        cache,
        resource_types,
        purge,
        log,
        tracing,
        drain,
    }
}

fn build_tracing(raw: Option<RawTracing>, cx: &mut Ctx) -> Tracing {
    let d = Tracing::default();
    let Some(raw) = raw else {
        return d;
    };
    let endpoint = match raw.endpoint.map(|e| e.trim().to_owned()) {
        None => d.endpoint.clone(),
        Some(e) if e.starts_with("http://") && e.len() > "http://".len() => e,
        Some(e) if e.starts_with("https://") => {
            cx.error(
                "tracing.endpoint",
                "https:// is not supported yet; use http:// (a collector or agent beside Larder)",
            );
            e
        }
        Some(e) => {
            cx.error(
                "tracing.endpoint",
                format!("expected the OTLP/HTTP traces URL, like http://jaeger:4318/v1/traces, got {e:?}"),
            );
            e
        }
    };
    let sample_ratio = match raw.sample_ratio {
        Some(r) if (0.0..=1.0).contains(&r) => r,
        Some(r) => {
            cx.error(
                "tracing.sample_ratio",
                format!("{r} is not a fraction: expected 0 to 1"),
            );
            d.sample_ratio
        }
        None => d.sample_ratio,
    };
    let service_name = raw.service_name.unwrap_or_else(|| d.service_name.clone());
    if service_name.trim().is_empty() {
        cx.error("tracing.service_name", "must not be empty");
    }
    let max_queue_size = match raw.max_queue_size {
        Some(n) if (1..=1_000_000).contains(&n) => n as usize,
        Some(n) => {
            cx.error(
                "tracing.max_queue_size",
                format!("{n} is out of range: 1 to 1000000"),
            );
            d.max_queue_size
        }
        None => d.max_queue_size,
    };
    Tracing {
        enabled: raw.enabled.unwrap_or(true),
        endpoint,
        service_name,
        sample_ratio,
        max_queue_size,
        export_timeout: timeout(
            cx,
            "tracing.export_timeout",
            raw.export_timeout.as_ref(),
            d.export_timeout,
        ),
    }
}

fn build_log(raw: Option<RawLog>, cx: &mut Ctx) -> Log {
    let d = Log::default();
    let Some(raw) = raw else {
        return d;
    };
    let level = match raw.level {
        None => d.level.clone(),
        Some(level) => {
            let level = level.trim().to_owned();
            // The filter grammar is checked fully at start-up; this catches the common slips.
            let plausible = !level.is_empty()
                && level
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_:=,.-[]{}\"".contains(c));
            if !plausible {
                cx.error(
                    "log.level",
                    format!(
                        "invalid log filter {level:?}: expected a level (error, warn, info, debug, \
                         trace) or directives like \"info,larder::audit=warn\""
                    ),
                );
            }
            level
        }
    };
    let format = raw
        .format
        .as_deref()
        .and_then(|f| choice(cx, "log.format", "log format", f, LogFormat::NAMES))
        .unwrap_or(d.format);
    Log { level, format }
}

// ---------------------------------------------------------------------------------------
// Scalars

fn duration(cx: &mut Ctx, path: &str, value: &Scalar) -> Option<Duration> {
    let parsed = match value {
        Scalar::Str(s) => parse_duration(s),
        Scalar::Int(n) if *n < 0 => Err(format!("invalid duration \"{n}\": must not be negative")),
        Scalar::Int(n) => u64::try_from(*n)
            .map(Duration::from_secs)
            .map_err(|_| format!("invalid duration \"{n}\": too large")),
        Scalar::Float(f) => Err(format!("invalid duration \"{f}\": {DURATION_FORM}")),
    };
    parsed.map_err(|e| cx.error(path, e)).ok()
}

/// A timeout: zero would make every attempt fail, so it is rejected.
fn timeout(cx: &mut Ctx, path: &str, value: Option<&Scalar>, default: Duration) -> Duration {
    let Some(value) = value else {
        return default;
    };
    match duration(cx, path, value) {
        Some(d) if d.is_zero() => {
            cx.error(path, "must be greater than zero");
            default
        }
        Some(d) => d,
        None => default,
    }
}

/// A byte size that is a budget or limit, so zero is rejected.
fn size(cx: &mut Ctx, path: &str, value: &Scalar) -> Option<u64> {
    let parsed = match value {
        Scalar::Str(s) => parse_size(s),
        Scalar::Int(n) if *n < 0 => Err(format!("invalid size \"{n}\": must not be negative")),
        Scalar::Int(n) => u64::try_from(*n).map_err(|_| format!("invalid size \"{n}\": too large")),
        // YAML reads `1e6` as a float; accept it when it is a whole number of bytes.
        Scalar::Float(f) if *f >= 0.0 && f.fract() == 0.0 && *f < u64::MAX as f64 => Ok(*f as u64),
        Scalar::Float(f) => Err(format!(
            "invalid size \"{f}\": expected a whole number of bytes, or a unit like \"1.5MiB\""
        )),
    };
    match parsed {
        Ok(0) => {
            cx.error(path, "must be greater than zero");
            None
        }
        Ok(n) => Some(n),
        Err(e) => {
            cx.error(path, e);
            None
        }
    }
}

fn size_or(cx: &mut Ctx, path: &str, value: Option<&Scalar>, default: u64) -> u64 {
    value.and_then(|v| size(cx, path, v)).unwrap_or(default)
}

fn usize_or(cx: &mut Ctx, path: &str, value: Option<u64>, default: usize, min: usize) -> usize {
    let Some(n) = value else {
        return default;
    };
    match usize::try_from(n) {
        Ok(n) if n >= min => n,
        Ok(_) => {
            cx.error(path, format!("must be at least {min}"));
            default
        }
        Err(_) => {
            cx.error(path, "too large");
            default
        }
    }
}

fn choice<T: Copy>(
    cx: &mut Ctx,
    path: &str,
    what: &str,
    text: &str,
    names: &[(&str, T)],
) -> Option<T> {
    let wanted = text.trim();
    if let Some((_, value)) = names.iter().find(|(name, _)| *name == wanted) {
        return Some(*value);
    }
    let supported: Vec<&str> = names.iter().map(|(name, _)| *name).collect();
    cx.error(
        path,
        format!(
            "unknown {what} {wanted:?} (supported: {})",
            supported.join(", ")
        ),
    );
    None
}

/// Parses a regex and turns the regex crate's multi-line diagnostic into one line, since
/// each config error is printed on a line of its own.
fn regex(cx: &mut Ctx, path: &str, pattern: &str) -> Option<RegexSource> {
    match RegexSource::new(pattern) {
        Ok(re) => Some(re),
        Err(regex::Error::Syntax(text)) => {
            let reason = text
                .lines()
                .rev()
                .find_map(|l| l.strip_prefix("error: "))
                .unwrap_or(text.lines().last().unwrap_or("syntax error"))
                .trim()
                .to_owned();
            cx.error(path, format!("invalid regex {pattern:?}: {reason}"));
            None
        }
        Err(e) => {
            cx.error(path, format!("invalid regex {pattern:?}: {e}"));
            None
        }
    }
}

fn required<'r, T>(cx: &mut Ctx, path: &str, name: &str, value: &'r Option<T>) -> Option<&'r T> {
    if value.is_none() {
        cx.error(&key(path, name), format!("{name} is required"));
    }
    value.as_ref()
}

fn non_empty_name(cx: &mut Ctx, path: &str, name: &Option<String>) -> String {
    match required(cx, path, "name", name) {
        Some(n) if n.trim().is_empty() => {
            cx.error(&key(path, "name"), "name must not be empty");
            String::new()
        }
        Some(n) => n.trim().to_owned(),
        None => String::new(),
    }
}

/// Reports the second and later uses of each name; empty names were already reported.
fn check_unique<'n>(cx: &mut Ctx, what: &str, names: impl IntoIterator<Item = (&'n str, String)>) {
    let mut seen: HashMap<&str, String> = HashMap::new();
    for (name, path) in names {
        if name.is_empty() {
            continue;
        }
        if let Some(first) = seen.get(name) {
            let message = format!("duplicate {what} name {name:?} (first defined at {first})");
            cx.error(&key(&path, "name"), message);
        } else {
            seen.insert(name, path);
        }
    }
}

pub(crate) fn is_hostname(host: &str) -> bool {
    host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// RFC 9110 `token`, the syntax of header names and media type parts.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

// ---------------------------------------------------------------------------------------
// Sections

fn listen_address(cx: &mut Ctx, path: &str, text: &str) -> Option<SocketAddr> {
    let t = text.trim();
    if let Ok(addr) = t.parse() {
        return Some(addr);
    }
    let hint = match t.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() && is_hostname(host) => {
            "host names are not resolved here; use an IP address like 0.0.0.0 or 127.0.0.1"
        }
        _ => "expected IP:port, like 127.0.0.1:8080 or \"[::]:8080\"",
    };
    cx.error(path, format!("invalid address {t:?}: {hint}"));
    None
}

fn build_admin(raw: Option<RawAdmin>, cx: &mut Ctx) -> Admin {
    let Some(raw) = raw else {
        return Admin::default();
    };
    let address = raw
        .address
        .and_then(|a| listen_address(cx, "admin.address", &a))
        .unwrap_or(Admin::DEFAULT_ADDRESS);
    let token_file = match raw.token_file {
        Some(t) if t.trim().is_empty() => {
            cx.error("admin.token_file", "must not be empty");
            None
        }
        t => t.map(PathBuf::from),
    };
    Admin {
        address,
        token_file,
    }
}

/// Two sockets conflict when binding both would fail: same port (other than the
/// ephemeral 0) on the same IP, or on the wildcard IP of the same family.
fn conflicts(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

fn build_listeners(raw: Option<Vec<RawListener>>, admin: &Admin, cx: &mut Ctx) -> Vec<Listener> {
    let Some(raw) = raw else {
        return vec![Listener {
            name: "http".to_owned(),
            address: Listener::DEFAULT_ADDRESS,
            tls: None,
        }];
    };
    if raw.is_empty() {
        cx.error(
            "listeners",
            "at least one listener is required (omit `listeners` for the default 127.0.0.1:8080)",
        );
    }
    let mut built: Vec<(Listener, String, bool)> = Vec::new();
    for (i, l) in raw.into_iter().enumerate() {
        let path = index("listeners", i);
        let address = required(cx, &path, "address", &l.address)
            .cloned()
            .and_then(|a| listen_address(cx, &key(&path, "address"), &a));
        let name = match &l.name {
            Some(n) if n.trim().is_empty() => {
                cx.error(&key(&path, "name"), "name must not be empty");
                String::new()
            }
            Some(n) => n.trim().to_owned(),
            None => l.address.as_deref().unwrap_or("").trim().to_owned(),
        };
        let valid = address.is_some();
        let address = address.unwrap_or(Listener::DEFAULT_ADDRESS);
        let tls = l.tls.map(|tls| {
            let tls_path = key(&path, "tls");
            let list = tls.certificates.unwrap_or_default();
            if list.is_empty() {
                cx.error(
                    &key(&tls_path, "certificates"),
                    "at least one certificate (cert_file and key_file) is required",
                );
            }
            let certificates = list
                .into_iter()
                .enumerate()
                .map(|(j, c)| {
                    let c_path = index(&key(&tls_path, "certificates"), j);
                    let mut file = |name: &str, value: Option<String>| match value
                        .map(|v| v.trim().to_owned())
                        .filter(|v| !v.is_empty())
                    {
                        Some(v) => PathBuf::from(v),
                        None => {
                            cx.error(&key(&c_path, name), "required: a PEM file path");
                            PathBuf::new()
                        }
                    };
                    CertificateFiles {
                        cert_file: file("cert_file", c.cert_file),
                        key_file: file("key_file", c.key_file),
                    }
                })
                .collect();
            ListenerTls { certificates }
        });
        built.push((Listener { name, address, tls }, path, valid));
    }
    check_unique(
        cx,
        "listener",
        built.iter().map(|(l, p, _)| (l.name.as_str(), p.clone())),
    );
    for (i, (l, path, valid)) in built.iter().enumerate() {
        if !valid {
            continue;
        }
        let address_path = key(path, "address");
        if let Some((_, other, _)) = built[..i]
            .iter()
            .find(|(o, _, ok)| *ok && conflicts(o.address, l.address))
        {
            cx.error(
                &address_path,
                format!("address {} conflicts with {other}.address", l.address),
            );
        }
        if conflicts(l.address, admin.address) {
            cx.error(
                &address_path,
                format!(
                    "address {} conflicts with the admin address {}",
                    l.address, admin.address
                ),
            );
        }
    }
    built.into_iter().map(|(l, _, _)| l).collect()
}

fn build_limits(raw: Option<RawLimits>, cx: &mut Ctx) -> Limits {
    let d = Limits::default();
    let Some(raw) = raw else {
        return d;
    };
    Limits {
        max_request_header_size: size_or(
            cx,
            "limits.max_request_header_size",
            raw.max_request_header_size.as_ref(),
            d.max_request_header_size,
        ),
        max_request_headers: usize_or(
            cx,
            "limits.max_request_headers",
            raw.max_request_headers,
            d.max_request_headers,
            1,
        ),
        max_request_body_size: size_or(
            cx,
            "limits.max_request_body_size",
            raw.max_request_body_size.as_ref(),
            d.max_request_body_size,
        ),
        max_connections: usize_or(
            cx,
            "limits.max_connections",
            raw.max_connections,
            d.max_connections,
            1,
        ),
        header_read_timeout: timeout(
            cx,
            "limits.header_read_timeout",
            raw.header_read_timeout.as_ref(),
            d.header_read_timeout,
        ),
        request_body_timeout: timeout(
            cx,
            "limits.request_body_timeout",
            raw.request_body_timeout.as_ref(),
            d.request_body_timeout,
        ),
        client_write_timeout: timeout(
            cx,
            "limits.client_write_timeout",
            raw.client_write_timeout.as_ref(),
            d.client_write_timeout,
        ),
        http2_idle_timeout: timeout(
            cx,
            "limits.http2_idle_timeout",
            raw.http2_idle_timeout.as_ref(),
            d.http2_idle_timeout,
        ),
        trusted_proxies: raw
            .trusted_proxies
            .unwrap_or_default()
            .iter()
            .enumerate()
            .filter_map(|(i, text)| {
                parse_cidr(text.trim())
                    .map_err(|why| cx.error(&index("limits.trusted_proxies", i), why))
                    .ok()
            })
            .collect(),
        strip_request_headers: match raw.strip_request_headers {
            None => d.strip_request_headers,
            Some(list) => list
                .iter()
                .enumerate()
                .filter_map(|(i, name)| {
                    let name = name.trim().to_ascii_lowercase();
                    if is_token(&name) {
                        Some(name)
                    } else {
                        cx.error(
                            &index("limits.strip_request_headers", i),
                            format!("{name:?} is not a header name"),
                        );
                        None
                    }
                })
                .collect(),
        },
    }
}

fn build_access_log(raw: Option<RawAccessLog>, cx: &mut Ctx) -> AccessLog {
    let d = AccessLog::default();
    let Some(raw) = raw else {
        return d;
    };
    let output = match raw.output.as_deref().map(str::trim) {
        None | Some("stdout") => LogOutput::Stdout,
        Some("stderr") => LogOutput::Stderr,
        Some("") => {
            cx.error("access_log.output", "must be stdout, stderr or a file path");
            LogOutput::Stdout
        }
        Some(path) => LogOutput::File(PathBuf::from(path)),
    };
    let sample_rate = match raw.sample_rate {
        Some(r) if (0.0..=1.0).contains(&r) => r,
        Some(r) => {
            cx.error(
                "access_log.sample_rate",
                format!("{r} is not a fraction: expected 0 to 1 (1 logs every request)"),
            );
            d.sample_rate
        }
        None => d.sample_rate,
    };
    let mut exclude_fields = Vec::new();
    if let Some(list) = &raw.exclude_fields {
        for (i, name) in list.items.iter().enumerate() {
            if AccessLog::OPTIONAL_FIELDS.contains(&name.as_str()) {
                if !exclude_fields.contains(name) {
                    exclude_fields.push(name.clone());
                }
            } else {
                cx.error(
                    &list_item("access_log.exclude_fields", list, i),
                    format!(
                        "unknown field group {name:?}; expected one of {}",
                        AccessLog::OPTIONAL_FIELDS.join(", ")
                    ),
                );
            }
        }
    }
    let elasticsearch = raw.elasticsearch.map(|es| build_elasticsearch(es, cx));
    AccessLog {
        enabled: raw.enabled.unwrap_or(d.enabled),
        output,
        sample_rate,
        exclude_fields,
        elasticsearch,
    }
}

fn build_elasticsearch(raw: RawElasticsearch, cx: &mut Ctx) -> Elasticsearch {
    let p = "access_log.elasticsearch";
    let url = match raw.url.as_deref().map(str::trim) {
        None => {
            cx.error(
                &key(p, "url"),
                "required: the Elasticsearch base URL, like http://elasticsearch:9200",
            );
            String::new()
        }
        Some(u) if u.starts_with("https://") => {
            cx.error(
                &key(p, "url"),
                "https:// is not supported yet (TLS to upstreams arrives with the TLS work); use http:// to a local or in-cluster endpoint",
            );
            u.to_owned()
        }
        Some(u) if u.starts_with("http://") && u.len() > "http://".len() => {
            u.trim_end_matches('/').to_owned()
        }
        Some(u) => {
            cx.error(
                &key(p, "url"),
                format!("expected an http:// URL, got {u:?}"),
            );
            u.to_owned()
        }
    };
    let data_stream = raw.data_stream.unwrap_or(raw.index.is_none());
    let index = raw
        .index
        .map(|i| i.trim().to_owned())
        .unwrap_or_else(|| Elasticsearch::DEFAULT_INDEX.to_owned());
    // Checked with the date placeholders filled in, as Elasticsearch will see it.
    let sample = index
        .replace("%Y", "2026")
        .replace("%m", "01")
        .replace("%d", "31");
    let index_ok = !sample.is_empty()
        && !sample.starts_with(['_', '-', '+'])
        && sample == sample.to_lowercase()
        && !sample.contains(['\\', '/', '*', '?', '"', '<', '>', '|', ' ', ',', '#']);
    if !index_ok {
        cx.error(
            &key(p, "index"),
            format!("{index:?} is not a valid index name (lower case, no spaces or \\/*?\"<>|,#, not starting with _ - +)"),
        );
    }
    // A username's password may come from LARDER_ES_PASSWORD instead of a file.
    if raw.password_file.is_some() && raw.username.is_none() {
        cx.error(&key(p, "password_file"), "needs a username");
    }
    if raw.api_key_file.is_some() && raw.username.is_some() {
        cx.error(
            &key(p, "api_key_file"),
            "use either api_key_file or username/password_file, not both",
        );
    }
    let count = |cx: &mut Ctx, name: &str, v: Option<u64>, default: usize, max: u64| match v {
        Some(n) if n >= 1 && n <= max => n as usize,
        Some(n) => {
            cx.error(&key(p, name), format!("{n} is out of range: 1 to {max}"));
            default
        }
        None => default,
    };
    let batch_size = count(cx, "batch_size", raw.batch_size, 500, 100_000);
    let max_queue = count(cx, "max_queue", raw.max_queue, 10_000, 10_000_000);
    let max_retries = match raw.max_retries {
        Some(n) if n <= 20 => n as u32,
        Some(n) => {
            cx.error(
                &key(p, "max_retries"),
                format!("{n} is out of range: 0 to 20"),
            );
            5
        }
        None => 5,
    };
    Elasticsearch {
        url,
        index,
        data_stream,
        api_key_file: raw.api_key_file.map(PathBuf::from),
        username: raw.username,
        password_file: raw.password_file.map(PathBuf::from),
        batch_size,
        flush_interval: timeout(
            cx,
            &key(p, "flush_interval"),
            raw.flush_interval.as_ref(),
            Duration::from_secs(1),
        ),
        max_queue,
        gzip: raw.gzip.unwrap_or(true),
        timeout: timeout(
            cx,
            &key(p, "timeout"),
            raw.timeout.as_ref(),
            Duration::from_secs(10),
        ),
        max_retries,
    }
}

fn build_clusters(raw: Option<Vec<RawCluster>>, cx: &mut Ctx) -> Vec<Cluster> {
    let raw = match raw {
        Some(list) if !list.is_empty() => list,
        _ => {
            cx.error("clusters", "at least one cluster is required");
            return Vec::new();
        }
    };
    let mut clusters = Vec::new();
    let mut paths = Vec::new();
    for (i, c) in raw.into_iter().enumerate() {
        let path = index("clusters", i);
        let name = non_empty_name(cx, &path, &c.name);
        let mut endpoints = Vec::new();
        let dns = c
            .dns
            .map(|d| build_dns_discovery(cx, &key(&path, "dns"), d));
        let kubernetes = c
            .kubernetes
            .map(|k| build_kubernetes_discovery(cx, &key(&path, "kubernetes"), k));
        if dns.is_some() && kubernetes.is_some() {
            cx.error(
                &key(&path, "kubernetes"),
                "choose one discovery: dns or kubernetes",
            );
        }
        let listed = if dns.is_some() || kubernetes.is_some() {
            // With discovery, listed endpoints are optional.
            c.endpoints.as_ref().filter(|l| !l.is_empty())
        } else {
            required(cx, &path, "endpoints", &c.endpoints)
        };
        match listed {
            Some(list) if list.is_empty() => {
                cx.error(
                    &key(&path, "endpoints"),
                    "at least one endpoint is required",
                );
            }
            Some(list) => {
                for (j, raw) in list.iter().enumerate() {
                    let e_path = index(&key(&path, "endpoints"), j);
                    let (text, weight) = match raw {
                        RawEndpoint::Plain(text) => (text, 1),
                        RawEndpoint::Weighted(w) => (&w.address, w.weight),
                    };
                    if !(1..=100).contains(&weight) {
                        cx.error(
                            &key(&e_path, "weight"),
                            format!("{weight} is out of range: 1 to 100"),
                        );
                    }
                    match text.parse::<Endpoint>() {
                        Ok(mut e) => {
                            e.weight = weight.clamp(1, 100) as u32;
                            endpoints.push(e);
                        }
                        Err(why) => cx.error(&e_path, format!("invalid endpoint {text:?}: {why}")),
                    }
                }
            }
            None => {}
        }
        let lb_policy = c
            .lb_policy
            .as_deref()
            .and_then(|p| {
                choice(
                    cx,
                    &key(&path, "lb_policy"),
                    "lb_policy",
                    p,
                    LbPolicy::NAMES,
                )
            })
            .unwrap_or_default();
        clusters.push(Cluster {
            name,
            endpoints,
            lb_policy,
            connect_timeout: timeout(
                cx,
                &key(&path, "connect_timeout"),
                c.connect_timeout.as_ref(),
                Cluster::DEFAULT_CONNECT_TIMEOUT,
            ),
            request_timeout: timeout(
                cx,
                &key(&path, "request_timeout"),
                c.request_timeout.as_ref(),
                Cluster::DEFAULT_REQUEST_TIMEOUT,
            ),
            idle_timeout: timeout(
                cx,
                &key(&path, "idle_timeout"),
                c.idle_timeout.as_ref(),
                Cluster::DEFAULT_IDLE_TIMEOUT,
            ),
            max_idle_connections: usize_or(
                cx,
                &key(&path, "max_idle_connections"),
                c.max_idle_connections,
                Cluster::DEFAULT_MAX_IDLE_CONNECTIONS,
                0,
            ),
            outlier_detection: build_outlier_detection(cx, &path, c.outlier_detection),
            health_check: c
                .health_check
                .map(|h| build_health_check(cx, &key(&path, "health_check"), h)),
            dns,
            kubernetes,
            max_requests: usize_or(cx, &key(&path, "max_requests"), c.max_requests, 1024, 1),
            max_connections: usize_or(
                cx,
                &key(&path, "max_connections"),
                c.max_connections,
                1024,
                1,
            ),
            max_pending_requests: usize_or(
                cx,
                &key(&path, "max_pending_requests"),
                c.max_pending_requests,
                1024,
                0,
            ),
            retry_on_status: c
                .retry_on_status
                .unwrap_or_default()
                .into_iter()
                .enumerate()
                .filter_map(|(j, code)| {
                    if (500..=599).contains(&code) {
                        Some(code as u16)
                    } else {
                        cx.error(
                            &index(&key(&path, "retry_on_status"), j),
                            format!("{code}: only 5xx statuses can be retried"),
                        );
                        None
                    }
                })
                .collect(),
            max_retries: match c.max_retries {
                Some(n) if n <= 10 => n as u32,
                Some(n) => {
                    cx.error(
                        &key(&path, "max_retries"),
                        format!("{n} is out of range: 0 to 10"),
                    );
                    1
                }
                None => 1,
            },
            tls: c.tls.map(|t| {
                if t.cert_file.is_some() != t.key_file.is_some() {
                    cx.error(
                        &key(&key(&path, "tls"), "cert_file"),
                        "cert_file and key_file go together",
                    );
                }
                UpstreamTls {
                    ca_file: t.ca_file.map(PathBuf::from),
                    server_name: t.server_name.map(|n| n.trim().to_owned()),
                    cert_file: t.cert_file.map(PathBuf::from),
                    key_file: t.key_file.map(PathBuf::from),
                }
            }),
            http2: c.http2.unwrap_or(false),
        });
        paths.push(path);
    }
    check_unique(
        cx,
        "cluster",
        clusters.iter().map(|c| c.name.as_str()).zip(paths),
    );
    clusters
}

fn normalize_domain(text: &str) -> Result<String, String> {
    let d = text.trim().to_ascii_lowercase();
    if d.is_empty() {
        return Err("empty domain".into());
    }
    if d == "*" {
        return Ok(d);
    }
    let rest = d.strip_prefix("*.").unwrap_or(&d);
    if rest.contains('*') {
        return Err(format!(
            "invalid domain {text:?}: a wildcard is only allowed as a leading \"*.\" \
             (like \"*.example.com\") or as \"*\" alone"
        ));
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (addr, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("invalid domain {text:?}: unclosed '['"))?;
        if addr.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("invalid domain {text:?}: bad IPv6 address"));
        }
        match after {
            "" => (None, None),
            p => match p.strip_prefix(':') {
                Some(port) => (None, Some(port)),
                None => return Err(format!("invalid domain {text:?}: expected ':' after ']'")),
            },
        }
    } else {
        match rest.split_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(rest), None),
        }
    };
    if let Some(host) = host
        && !is_hostname(host)
    {
        return Err(format!(
            "invalid domain {text:?}: expected a host name like example.com, \
             optionally with :port"
        ));
    }
    if let Some(port) = port
        && !matches!(port.parse::<u16>(), Ok(p) if p > 0)
    {
        return Err(format!("invalid domain {text:?}: invalid port {port:?}"));
    }
    Ok(d)
}

fn build_route_match(cx: &mut Ctx, path: &str, raw: &RawRouteMatch) -> Option<RouteMatch> {
    let given = [
        ("prefix", &raw.prefix),
        ("path", &raw.path),
        ("regex", &raw.regex),
    ];
    let present: Vec<&str> = given
        .iter()
        .filter(|(_, v)| v.is_some())
        .map(|(k, _)| *k)
        .collect();
    if present.len() != 1 {
        let message = if present.is_empty() {
            "expected exactly one of prefix, path or regex".to_owned()
        } else {
            format!(
                "expected exactly one of prefix, path or regex, got {}",
                present.join(" and ")
            )
        };
        cx.error(path, message);
        return None;
    }
    if let Some(p) = &raw.prefix {
        let p_path = key(path, "prefix");
        if !p.starts_with('/') {
            cx.error(&p_path, format!("prefix {p:?} must start with \"/\""));
            return None;
        }
        return Some(RouteMatch::Prefix(p.clone()));
    }
    if let Some(p) = &raw.path {
        if !p.starts_with('/') {
            cx.error(
                &key(path, "path"),
                format!("path {p:?} must start with \"/\""),
            );
            return None;
        }
        return Some(RouteMatch::Path(p.clone()));
    }
    let pattern = raw.regex.as_deref().unwrap_or_default();
    regex(cx, &key(path, "regex"), pattern).map(RouteMatch::Regex)
}

fn build_virtual_hosts(
    raw: Option<Vec<RawVirtualHost>>,
    clusters: &[Cluster],
    cx: &mut Ctx,
) -> Vec<VirtualHost> {
    let raw = match raw {
        Some(list) if !list.is_empty() => list,
        _ => {
            cx.error("virtual_hosts", "at least one virtual host is required");
            return Vec::new();
        }
    };
    let cluster_names: HashSet<&str> = clusters.iter().map(|c| c.name.as_str()).collect();
    let defined = {
        let mut names: Vec<&str> = clusters
            .iter()
            .map(|c| c.name.as_str())
            .filter(|n| !n.is_empty())
            .collect();
        names.sort_unstable();
        names.dedup();
        names.join(", ")
    };
    let mut hosts = Vec::new();
    let mut paths = Vec::new();
    // domain -> (virtual host path, name), to point at the first owner of a duplicate.
    let mut owners: HashMap<String, (String, String)> = HashMap::new();
    for (i, vh) in raw.into_iter().enumerate() {
        let path = index("virtual_hosts", i);
        let name = non_empty_name(cx, &path, &vh.name);
        let mut domains = Vec::new();
        match required(cx, &path, "domains", &vh.domains) {
            Some(list) if list.is_empty() => {
                cx.error(&key(&path, "domains"), "at least one domain is required");
            }
            Some(list) => {
                for (j, text) in list.iter().enumerate() {
                    let d_path = index(&key(&path, "domains"), j);
                    let domain = match normalize_domain(text) {
                        Ok(d) => d,
                        Err(why) => {
                            cx.error(&d_path, why);
                            continue;
                        }
                    };
                    match owners.get(&domain) {
                        Some((owner_path, _)) if *owner_path == path => {
                            cx.error(&d_path, format!("domain {domain:?} is listed twice"));
                        }
                        Some((owner_path, owner_name)) => cx.error(
                            &d_path,
                            format!(
                                "domain {domain:?} is also listed in {owner_path} ({owner_name:?}); \
                                 each domain may belong to only one virtual host"
                            ),
                        ),
                        None => {
                            owners.insert(domain.clone(), (path.clone(), name.clone()));
                            domains.push(domain);
                        }
                    }
                }
            }
            None => {}
        }
        let mut routes = Vec::new();
        match required(cx, &path, "routes", &vh.routes) {
            Some(list) if list.is_empty() => {
                cx.error(&key(&path, "routes"), "at least one route is required");
            }
            Some(list) => {
                for (j, r) in list.iter().enumerate() {
                    let r_path = index(&key(&path, "routes"), j);
                    let route_match = required(cx, &r_path, "match", &r.r#match)
                        .and_then(|m| build_route_match(cx, &key(&r_path, "match"), m));
                    let cluster = match required(cx, &r_path, "cluster", &r.cluster) {
                        Some(c) if !cluster_names.contains(c.as_str()) => {
                            let message = if defined.is_empty() {
                                format!("unknown cluster {c:?} (no clusters are defined)")
                            } else {
                                format!("unknown cluster {c:?} (defined: {defined})")
                            };
                            cx.error(&key(&r_path, "cluster"), message);
                            c.clone()
                        }
                        Some(c) => c.clone(),
                        None => String::new(),
                    };
                    let mut route_timeout = |name: &str, value: &Option<Scalar>| {
                        let t_path = key(&r_path, name);
                        match duration(cx, &t_path, value.as_ref()?) {
                            Some(d) if d.is_zero() => {
                                cx.error(&t_path, "must be greater than zero");
                                None
                            }
                            d => d,
                        }
                    };
                    let timeout = route_timeout("timeout", &r.timeout);
                    let connect_timeout = route_timeout("connect_timeout", &r.connect_timeout);
                    let idle_timeout = route_timeout("idle_timeout", &r.idle_timeout);
                    let total_timeout = route_timeout("total_timeout", &r.total_timeout);
                    routes.push(Route {
                        name: r.name.clone(),
                        r#match: route_match.unwrap_or(RouteMatch::Prefix("/".to_owned())),
                        cluster,
                        cache: r.cache.unwrap_or(true),
                        timeout,
                        connect_timeout,
                        idle_timeout,
                        total_timeout,
                    });
                }
            }
            None => {}
        }
        hosts.push(VirtualHost {
            name,
            domains,
            routes,
        });
        paths.push(path);
    }
    check_unique(
        cx,
        "virtual host",
        hosts.iter().map(|h| h.name.as_str()).zip(paths),
    );
    hosts
}

fn build_cache(raw: Option<RawCache>, cx: &mut Ctx) -> CacheSettings {
    let d = CacheSettings::default();
    let Some(raw) = raw else {
        return d;
    };
    CacheSettings {
        cache_size: raw
            .cache_size
            .as_ref()
            .and_then(|s| size(cx, "cache.cache_size", s)),
        coalesce_timeout: timeout(
            cx,
            "cache.coalesce_timeout",
            raw.coalesce_timeout.as_ref(),
            d.coalesce_timeout,
        ),
        max_coalesced_waiters: usize_or(
            cx,
            "cache.max_coalesced_waiters",
            raw.max_coalesced_waiters,
            d.max_coalesced_waiters,
            0,
        ),
        targeted_cache_control: raw.targeted_cache_control.and_then(|name| {
            let lower = name.trim().to_ascii_lowercase();
            if is_token(&lower) {
                Some(lower)
            } else {
                cx.error(
                    "cache.targeted_cache_control",
                    format!("invalid header name {name:?}"),
                );
                None
            }
        }),
        max_variants: usize_or(
            cx,
            "cache.max_variants",
            raw.max_variants,
            d.max_variants,
            1,
        ),
        cache_status_key: raw.cache_status_key.unwrap_or(d.cache_status_key),
        heuristic_errors: raw.heuristic_errors.unwrap_or(d.heuristic_errors),
        preallocate: raw.preallocate.unwrap_or(d.preallocate),
    }
}

/// A resource type before its cache share is known.
struct PendingType {
    path: String,
    name: String,
    r#match: ResourceMatch,
    config: ResourceConfig,
    explicit_size: Option<u64>,
    /// Set when `cache_size` was given but invalid, which makes resolution meaningless.
    size_invalid: bool,
    max_object_given: bool,
}

fn build_resource_types(
    single: Option<RawResourceType>,
    list: Option<Vec<RawResourceType>>,
    cache: &CacheSettings,
    cx: &mut Ctx,
) -> Vec<ResourceType> {
    let mut raw: Vec<(String, RawResourceType)> = Vec::new();
    let both = single.is_some() && list.is_some();
    if both {
        cx.error(
            "resource_types",
            "both resource_type and resource_types are given; use resource_type for a single \
             type or resource_types for a list, not both",
        );
    }
    if let Some(t) = single {
        raw.push(("resource_type".to_owned(), t));
    }
    match list {
        Some(l) if l.is_empty() => cx.error(
            "resource_types",
            "must not be empty (omit it to cache everything under one type named \"default\")",
        ),
        Some(l) => raw.extend(
            l.into_iter()
                .enumerate()
                .map(|(i, t)| (index("resource_types", i), t)),
        ),
        None => {}
    }

    let mut pending: Vec<PendingType> = if raw.is_empty() {
        vec![PendingType {
            path: String::new(),
            name: "default".to_owned(),
            r#match: ResourceMatch::default(),
            config: ResourceConfig::default(),
            explicit_size: None,
            size_invalid: false,
            max_object_given: false,
        }]
    } else {
        raw.iter()
            .map(|(path, t)| build_pending_type(cx, path, t))
            .collect()
    };
    // With both keys given, relations between the two sets of types would only produce
    // confusing follow-on errors, so just the types themselves are checked.
    if !both {
        check_unique(
            cx,
            "resource type",
            pending.iter().map(|t| (t.name.as_str(), t.path.clone())),
        );
        check_reachable(cx, &pending);
        resolve_cache_sizes(cx, &mut pending, cache);
    }

    pending
        .into_iter()
        .map(|t| ResourceType {
            name: t.name,
            r#match: t.r#match,
            config: t.config,
        })
        .collect()
}

fn build_pending_type(cx: &mut Ctx, path: &str, raw: &RawResourceType) -> PendingType {
    let name = non_empty_name(cx, path, &raw.name);
    let r#match = match &raw.r#match {
        Some(m) => build_resource_match(cx, &key(path, "match"), m),
        None => ResourceMatch::default(),
    };
    let c_path = key(path, "config");
    let d = ResourceConfig::default();
    let mut explicit_size = None;
    let mut size_invalid = false;
    let mut max_object_given = false;
    let config = match &raw.config {
        None => d,
        Some(c) => {
            let ttl = c
                .ttl
                .as_ref()
                .and_then(|t| duration(cx, &key(&c_path, "ttl"), t));
            let override_origin_ttl = c.override_origin_ttl.unwrap_or(d.override_origin_ttl);
            if override_origin_ttl && c.ttl.is_none() {
                cx.error(
                    &key(&c_path, "override_origin_ttl"),
                    "override_origin_ttl needs a ttl to override the origin's freshness with",
                );
            }
            if let Some(s) = &c.cache_size {
                explicit_size = size(cx, &key(&c_path, "cache_size"), s);
                size_invalid = explicit_size.is_none();
            }
            max_object_given = c.max_object_size.is_some();
            let max_object_size = size_or(
                cx,
                &key(&c_path, "max_object_size"),
                c.max_object_size.as_ref(),
                d.max_object_size,
            );
            let cache_key = match &c.cache_key {
                Some(k) => build_cache_key(cx, &key(&c_path, "cache_key"), k),
                None => CacheKeyConfig::default(),
            };
            ResourceConfig {
                ttl,
                override_origin_ttl,
                cache_size: d.cache_size,
                max_object_size,
                heuristic_freshness: c.heuristic_freshness.unwrap_or(d.heuristic_freshness),
                grace: c
                    .grace
                    .as_ref()
                    .and_then(|g| duration(cx, &key(&c_path, "grace"), g))
                    .unwrap_or(d.grace),
                stale_if_error: c
                    .stale_if_error
                    .as_ref()
                    .and_then(|g| duration(cx, &key(&c_path, "stale_if_error"), g))
                    .unwrap_or(d.stale_if_error),
                stale_if_unreachable: c
                    .stale_if_unreachable
                    .as_ref()
                    .and_then(|g| duration(cx, &key(&c_path, "stale_if_unreachable"), g))
                    .unwrap_or(d.stale_if_unreachable),
                keep: c
                    .keep
                    .as_ref()
                    .and_then(|g| duration(cx, &key(&c_path, "keep"), g)),
                set_cookie: c
                    .set_cookie
                    .as_deref()
                    .and_then(|v| {
                        choice(
                            cx,
                            &key(&c_path, "set_cookie"),
                            "set_cookie policy",
                            v,
                            SetCookiePolicy::NAMES,
                        )
                    })
                    .unwrap_or(d.set_cookie),
                cache_key,
            }
        }
    };
    PendingType {
        path: path.to_owned(),
        name,
        r#match,
        config,
        explicit_size,
        size_invalid,
        max_object_given,
    }
}

fn build_resource_match(cx: &mut Ctx, path: &str, raw: &RawResourceMatch) -> ResourceMatch {
    let mut m = ResourceMatch::default();
    if let Some(list) = &raw.path_prefix {
        let p_path = key(path, "path_prefix");
        for (i, p) in list.items.iter().enumerate() {
            if p.starts_with('/') {
                m.path_prefix.push(p.clone());
            } else {
                cx.error(
                    &list_item(&p_path, list, i),
                    format!("path_prefix {p:?} must start with \"/\""),
                );
            }
        }
    }
    if let Some(list) = &raw.path_suffix {
        let s_path = key(path, "path_suffix");
        for (i, s) in list.items.iter().enumerate() {
            if s.is_empty() {
                cx.error(
                    &list_item(&s_path, list, i),
                    "path_suffix must not be empty",
                );
            } else {
                m.path_suffix.push(s.clone());
            }
        }
    }
    if let Some(pattern) = &raw.path_regex {
        m.path_regex = regex(cx, &key(path, "path_regex"), pattern);
    }
    if let Some(list) = &raw.content_type {
        let ct_path = key(path, "content_type");
        for (i, ct) in list.items.iter().enumerate() {
            match normalize_media_range(ct) {
                Ok(ct) => m.content_type.push(ct),
                Err(why) => cx.error(&list_item(&ct_path, list, i), why),
            }
        }
    }
    m
}

fn normalize_media_range(text: &str) -> Result<String, String> {
    let ct = text.trim().to_ascii_lowercase();
    let invalid = |why: &str| format!("invalid content_type {text:?}: {why}");
    if ct.contains(';') {
        return Err(invalid(
            "parameters are not supported; give only the media type, like \"text/html\"",
        ));
    }
    let Some((ty, sub)) = ct.split_once('/') else {
        return Err(invalid(
            "expected type/subtype, like \"text/html\" or \"image/*\"",
        ));
    };
    let part_ok = |p: &str| p == "*" || is_token(p) && !p.contains('*');
    if !part_ok(ty) || !part_ok(sub) {
        return Err(invalid(
            "expected type/subtype, like \"text/html\" or \"image/*\"",
        ));
    }
    if ty == "*" && sub != "*" {
        return Err(invalid(
            "a wildcard type needs a wildcard subtype (\"*/*\")",
        ));
    }
    Ok(ct)
}

fn build_cache_key(cx: &mut Ctx, path: &str, raw: &RawCacheKey) -> CacheKeyConfig {
    let query = raw
        .query
        .as_deref()
        .and_then(|q| {
            choice(
                cx,
                &key(path, "query"),
                "query mode",
                q,
                QueryKeyMode::NAMES,
            )
        })
        .unwrap_or_default();
    let mut headers: Vec<String> = Vec::new();
    if let Some(list) = &raw.headers {
        let h_path = key(path, "headers");
        for (i, h) in list.items.iter().enumerate() {
            let name = h.trim().to_ascii_lowercase();
            if !is_token(&name) {
                cx.error(
                    &list_item(&h_path, list, i),
                    format!("invalid header name {h:?}"),
                );
            } else if !headers.contains(&name) {
                headers.push(name);
            }
        }
    }
    CacheKeyConfig { query, headers }
}

/// Types are tried in order, so anything after a catch-all can never be chosen.
fn check_reachable(cx: &mut Ctx, types: &[PendingType]) {
    let Some(first) = types.iter().position(|t| t.r#match.is_catch_all()) else {
        return;
    };
    let catch_all = &types[first];
    for later in &types[first + 1..] {
        cx.error(
            &later.path,
            format!(
                "resource type {:?} is unreachable: catch-all type {:?} ({}) comes before it \
                 and matches everything; move {:?} last or give it a match",
                later.name, catch_all.name, catch_all.path, catch_all.name
            ),
        );
    }
}

fn resolve_cache_sizes(cx: &mut Ctx, types: &mut [PendingType], cache: &CacheSettings) {
    if types.iter().any(|t| t.size_invalid) {
        return;
    }
    let mut resolved = true;
    if let Some(total) = cache.cache_size {
        let explicit: u128 = types
            .iter()
            .filter_map(|t| t.explicit_size)
            .map(u128::from)
            .sum();
        let shared: Vec<usize> = (0..types.len())
            .filter(|&i| types[i].explicit_size.is_none())
            .collect();
        if explicit > u128::from(total) {
            let parts: Vec<String> = types
                .iter()
                .filter_map(|t| {
                    t.explicit_size
                        .map(|s| format!("{} {}", display_name(t), format_size(s)))
                })
                .collect();
            cx.error(
                "cache.cache_size",
                format!(
                    "resource type cache sizes add up to {} ({}), more than the total \
                     cache.cache_size {}",
                    format_u128_size(explicit),
                    parts.join(", "),
                    format_size(total)
                ),
            );
            resolved = false;
        } else if !shared.is_empty() {
            // explicit <= total here, so the remainder fits in u64.
            let remainder = total - explicit as u64;
            let share = remainder / shared.len() as u64;
            if share == 0 {
                let names: Vec<String> = shared.iter().map(|&i| display_name(&types[i])).collect();
                cx.error(
                    "cache.cache_size",
                    format!(
                        "nothing is left of cache.cache_size {} for resource types without their \
                         own cache_size ({}): the others take {}",
                        format_size(total),
                        names.join(", "),
                        format_u128_size(explicit)
                    ),
                );
                resolved = false;
            }
            for &i in &shared {
                types[i].config.cache_size = share;
            }
        }
    } else {
        for t in types.iter_mut() {
            t.config.cache_size = DEFAULT_TYPE_CACHE_SIZE;
        }
    }
    for t in types.iter_mut() {
        if let Some(s) = t.explicit_size {
            t.config.cache_size = s;
        }
    }
    if !resolved {
        return;
    }
    for t in types.iter_mut() {
        let cache_size = t.config.cache_size;
        // The default object size limit adapts to small budgets; only a limit the user
        // chose is an error.
        if !t.max_object_given && cache_size / 4 > 0 {
            t.config.max_object_size = t.config.max_object_size.min(cache_size / 4);
        }
        let max_object = t.config.max_object_size;
        if max_object > cache_size / 4 {
            let c_path = key(&t.path, "config");
            let at = if t.path.is_empty() {
                // The implicit default type: only the total can be blamed.
                "cache.cache_size".to_owned()
            } else if t.max_object_given {
                key(&c_path, "max_object_size")
            } else {
                key(&c_path, "cache_size")
            };
            let origin = if t.explicit_size.is_some() {
                ""
            } else if cache.cache_size.is_some() {
                " (its share of cache.cache_size)"
            } else {
                " (the default)"
            };
            cx.error(
                &at,
                format!(
                    "max_object_size {} is more than a quarter of this type's cache_size {}{}; \
                     lower max_object_size to at most {} or raise cache_size to at least {}",
                    format_size(max_object),
                    format_size(cache_size),
                    origin,
                    format_size(cache_size / 4),
                    format_u128_size(u128::from(max_object) * 4)
                ),
            );
        }
    }
}

fn display_name(t: &PendingType) -> String {
    if t.name.is_empty() {
        t.path.clone()
    } else {
        format!("{:?}", t.name)
    }
}

fn format_u128_size(n: u128) -> String {
    u64::try_from(n).map_or_else(|_| format!("{n}B"), format_size)
}

fn build_purge(raw: Option<RawPurge>, cx: &mut Ctx) -> Purge {
    let d = Purge::default();
    let Some(raw) = raw else {
        return d;
    };
    let mut tag_headers = Vec::new();
    if let Some(list) = &raw.tag_headers {
        for (i, h) in list.items.iter().enumerate() {
            let name = h.trim().to_ascii_lowercase();
            if !is_token(&name) {
                cx.error(
                    &list_item("purge.tag_headers", list, i),
                    format!("invalid header name {h:?}"),
                );
            } else if !tag_headers.contains(&name) {
                tag_headers.push(name);
            }
        }
    } else {
        tag_headers = d.tag_headers.clone();
    }
    let max_requests_per_second = match raw.max_requests_per_second {
        Some(n) => u32::try_from(n).unwrap_or_else(|_| {
            cx.error(
                "purge.max_requests_per_second",
                "must be at most 4294967295",
            );
            d.max_requests_per_second
        }),
        None => d.max_requests_per_second,
    };
    let purge_method = match raw.purge_method {
        None => d.purge_method.clone(),
        Some(m) => {
            let allowed_cidrs = match &m.allowed_cidrs {
                None => d.purge_method.allowed_cidrs.clone(),
                Some(list) => list
                    .items
                    .iter()
                    .enumerate()
                    .filter_map(|(i, text)| {
                        parse_cidr(text.trim())
                            .map_err(|why| {
                                cx.error(
                                    &list_item("purge.purge_method.allowed_cidrs", list, i),
                                    why,
                                )
                            })
                            .ok()
                    })
                    .collect(),
            };
            PurgeMethod {
                enabled: m.enabled.unwrap_or(false),
                allowed_cidrs,
            }
        }
    };
    let peers = match raw.peers {
        None => d.peers.clone(),
        Some(p) => build_peers(p, cx),
    };
    let fanout_timeout = timeout(
        cx,
        "purge.fanout_timeout",
        raw.fanout_timeout.as_ref(),
        d.fanout_timeout,
    );
    let fanout_retries = match raw.fanout_retries {
        Some(n) if n > 10 => {
            cx.error("purge.fanout_retries", "must be at most 10");
            d.fanout_retries
        }
        Some(n) => n as u32,
        None => d.fanout_retries,
    };
    let redis = raw.redis.map(|r| {
        let url = r.url.unwrap_or_default();
        // The URL may carry a password: errors never repeat it.
        if url.starts_with("rediss://") {
            cx.error(
                "purge.redis.url",
                "TLS (rediss://) is not supported yet; use redis:// or unix://",
            );
        } else if !(url.starts_with("redis://") || url.starts_with("unix://")) {
            cx.error(
                "purge.redis.url",
                "expected a URL starting with redis:// or unix://",
            );
        }
        let channel = r.channel.unwrap_or_else(|| "larder-purge".into());
        if channel.trim().is_empty() {
            cx.error("purge.redis.channel", "must not be empty");
        }
        Redis { url, channel }
    });
    Purge {
        tag_headers,
        strip_tag_headers: raw.strip_tag_headers.unwrap_or(d.strip_tag_headers),
        max_requests_per_second,
        purge_method,
        peers,
        fanout_timeout,
        fanout_retries,
        redis,
    }
}

fn build_peers(raw: RawPeers, cx: &mut Ctx) -> Peers {
    let d = Peers::default();
    let dns = raw.dns.and_then(|name| {
        let name = name.trim().trim_end_matches('.').to_ascii_lowercase();
        if is_hostname(&name) {
            Some(name)
        } else {
            cx.error("purge.peers.dns", format!("invalid DNS name {name:?}"));
            None
        }
    });
    let port = match raw.port {
        Some(p) if (1..=65535).contains(&p) => p as u16,
        Some(p) => {
            cx.error(
                "purge.peers.port",
                format!("invalid port {p}: expected 1 to 65535"),
            );
            d.port
        }
        None => d.port,
    };
    let refresh_interval = timeout(
        cx,
        "purge.peers.refresh_interval",
        raw.refresh_interval.as_ref(),
        d.refresh_interval,
    );
    let nameserver = nameserver(cx, "purge.peers.nameserver", raw.nameserver);
    let mut r#static = Vec::new();
    if let Some(list) = &raw.r#static {
        for (i, text) in list.items.iter().enumerate() {
            match text.trim().parse::<SocketAddr>() {
                Ok(addr) if addr.port() != 0 && !addr.ip().is_unspecified() => r#static.push(addr),
                _ => cx.error(
                    &list_item("purge.peers.static", list, i),
                    format!(
                        "invalid peer {text:?}: expected the admin address of a replica as \
                         IP:port, like 10.0.0.5:9901"
                    ),
                ),
            }
        }
    }
    Peers {
        dns,
        port,
        refresh_interval,
        nameserver,
        r#static,
    }
}

fn build_outlier_detection(
    cx: &mut Ctx,
    cluster_path: &str,
    raw: Option<RawOutlierDetection>,
) -> OutlierDetection {
    let d = OutlierDetection::default();
    let Some(raw) = raw else {
        return d;
    };
    let p = key(cluster_path, "outlier_detection");
    let consecutive_failures = match raw.consecutive_failures {
        Some(n) if n <= 1000 => n as u32,
        Some(n) => {
            cx.error(
                &key(&p, "consecutive_failures"),
                format!("{n} is out of range: 0 (off) to 1000"),
            );
            d.consecutive_failures
        }
        None => d.consecutive_failures,
    };
    let max_ejection_percent = match raw.max_ejection_percent {
        Some(n) if n <= 100 => n as u32,
        Some(n) => {
            cx.error(
                &key(&p, "max_ejection_percent"),
                format!("{n} is out of range: 0 to 100"),
            );
            d.max_ejection_percent
        }
        None => d.max_ejection_percent,
    };
    OutlierDetection {
        consecutive_failures,
        base_ejection_time: timeout(
            cx,
            &key(&p, "base_ejection_time"),
            raw.base_ejection_time.as_ref(),
            d.base_ejection_time,
        ),
        max_ejection_percent,
    }
}

fn build_health_check(cx: &mut Ctx, p: &str, raw: RawHealthCheck) -> HealthCheck {
    let path = raw.path.unwrap_or_else(|| "/".into());
    if !path.starts_with('/') {
        cx.error(&key(p, "path"), format!("must start with /, got {path:?}"));
    }
    let mut threshold = |name: &str, value: Option<u64>, default: u32| match value {
        Some(n) if (1..=100).contains(&n) => n as u32,
        Some(n) => {
            cx.error(&key(p, name), format!("{n} is out of range: 1 to 100"));
            default
        }
        None => default,
    };
    let healthy_threshold = threshold("healthy_threshold", raw.healthy_threshold, 2);
    let unhealthy_threshold = threshold("unhealthy_threshold", raw.unhealthy_threshold, 3);
    HealthCheck {
        path,
        interval: timeout(
            cx,
            &key(p, "interval"),
            raw.interval.as_ref(),
            Duration::from_secs(5),
        ),
        timeout: timeout(
            cx,
            &key(p, "timeout"),
            raw.timeout.as_ref(),
            Duration::from_secs(1),
        ),
        healthy_threshold,
        unhealthy_threshold,
    }
}

/// RFC 1123 label: what Kubernetes allows for Service names, namespaces and port names.
fn is_dns_label(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 63
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !text.starts_with('-')
        && !text.ends_with('-')
}

fn build_kubernetes_discovery(
    cx: &mut Ctx,
    p: &str,
    raw: RawKubernetesDiscovery,
) -> KubernetesDiscovery {
    // Said at validation, with the file and line, rather than when the cluster starts.
    if !cfg!(feature = "kubernetes") {
        cx.error(
            p,
            "kubernetes discovery needs a Larder built with the `kubernetes` feature \
             (cargo build --features kubernetes; the container image has it)",
        );
    }
    let label = |cx: &mut Ctx, name: &str, value: Option<String>| {
        let value = value?;
        if !is_dns_label(&value) {
            cx.error(
                &key(p, name),
                format!("invalid {name} {value:?}: expected a DNS label like \"shop-api\""),
            );
        }
        Some(value)
    };
    let service = label(cx, "service", raw.service).unwrap_or_else(|| {
        cx.error(
            &key(p, "service"),
            "required: the Service whose endpoints to use",
        );
        String::new()
    });
    let namespace = label(cx, "namespace", raw.namespace);
    let port = match raw.port {
        Some(Scalar::Int(n)) if (1..=65535).contains(&n) => ServicePort::Number(n as u16),
        Some(Scalar::Str(name)) if is_dns_label(&name) => ServicePort::Name(name),
        Some(other) => {
            let shown = match other {
                Scalar::Str(text) => format!("{text:?}"),
                Scalar::Int(n) => n.to_string(),
                Scalar::Float(x) => x.to_string(),
            };
            cx.error(
                &key(p, "port"),
                format!("invalid port {shown}: expected a port name like \"http\" or 1 to 65535"),
            );
            ServicePort::Number(80)
        }
        None => {
            cx.error(&key(p, "port"), "required: the port's name (or number)");
            ServicePort::Number(80)
        }
    };
    let api_server = raw.api_server.map(|url| {
        let url = url.trim().trim_end_matches('/').to_owned();
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            cx.error(
                &key(p, "api_server"),
                format!("invalid URL {url:?}: expected http:// or https://"),
            );
        }
        url
    });
    KubernetesDiscovery {
        service,
        namespace,
        port,
        api_server,
    }
}

fn build_dns_discovery(cx: &mut Ctx, p: &str, raw: RawDnsDiscovery) -> DnsDiscovery {
    let name = match raw
        .name
        .map(|n| n.trim().trim_end_matches('.').to_ascii_lowercase())
    {
        Some(n) if is_hostname(&n) => n,
        Some(n) => {
            cx.error(&key(p, "name"), format!("invalid DNS name {n:?}"));
            n
        }
        None => {
            cx.error(
                &key(p, "name"),
                "required: the DNS name that lists the endpoints",
            );
            String::new()
        }
    };
    let port = match raw.port {
        Some(n) if (1..=65535).contains(&n) => n as u16,
        Some(n) => {
            cx.error(
                &key(p, "port"),
                format!("invalid port {n}: expected 1 to 65535"),
            );
            80
        }
        None => {
            cx.error(&key(p, "port"), "required: the endpoints' port");
            80
        }
    };
    let nameserver = nameserver(cx, &key(p, "nameserver"), raw.nameserver);
    DnsDiscovery {
        name,
        port,
        refresh_interval: timeout(
            cx,
            &key(p, "refresh_interval"),
            raw.refresh_interval.as_ref(),
            Duration::from_secs(10),
        ),
        nameserver,
    }
}

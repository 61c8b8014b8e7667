use std::time::Duration;

use larder_config::*;

const BASE: &str = "\
virtual_hosts:
  - name: main
    domains: [\"*\"]
    routes:
      - match: { prefix: / }
        cluster: origin
clusters:
  - name: origin
    endpoints: [\"127.0.0.1:9000\"]
";

fn load(text: &str) -> Config {
    match load_str(text, "larder.yaml") {
        Ok(c) => c,
        Err(e) => panic!("config should load, got:\n{e}"),
    }
}

fn errors(text: &str) -> Vec<ConfigError> {
    match load_str(text, "larder.yaml") {
        Ok(c) => panic!("config should be rejected, got {c:#?}"),
        Err(e) => {
            assert!(!e.errors.is_empty());
            e.errors
        }
    }
}

fn with_base(extra: &str) -> String {
    format!("{BASE}{extra}")
}

/// Errors as their Display lines, which is what users see.
fn lines(text: &str) -> Vec<String> {
    errors(text).iter().map(ToString::to_string).collect()
}

#[test]
fn minimal_config_gets_defaults() {
    let c = load(BASE);
    assert_eq!(c.listeners.len(), 1);
    assert_eq!(c.listeners[0].name, "http");
    assert_eq!(c.listeners[0].address, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(c.admin.address, "127.0.0.1:9901".parse().unwrap());
    assert_eq!(c.admin.token_file, None);
    assert_eq!(c.limits, Limits::default());
    assert_eq!(c.limits.max_request_header_size, 64 * 1024);
    assert_eq!(c.limits.max_request_headers, 100);
    assert_eq!(c.limits.max_request_body_size, 100 * 1024 * 1024);
    assert!(c.access_log.enabled);
    assert_eq!(c.access_log.output, LogOutput::Stdout);
    let route = &c.virtual_hosts[0].routes[0];
    assert_eq!(route.r#match, RouteMatch::Prefix("/".into()));
    assert!(route.cache);
    assert_eq!(route.timeout, None);
    let cluster = &c.clusters[0];
    assert_eq!(cluster.lb_policy, LbPolicy::RoundRobin);
    assert_eq!(cluster.connect_timeout, Duration::from_secs(5));
    assert_eq!(cluster.request_timeout, Duration::from_secs(30));
    assert_eq!(cluster.idle_timeout, Duration::from_secs(4));
    assert_eq!(cluster.max_idle_connections, 64);
    assert_eq!(
        cluster.endpoints,
        vec![Endpoint {
            host: "127.0.0.1".into(),
            port: 9000,
            weight: 1,
        }]
    );
    assert_eq!(c.cache, CacheSettings::default());
    assert_eq!(c.cache.coalesce_timeout, Duration::from_secs(10));
    assert_eq!(c.cache.max_coalesced_waiters, 1024);
    assert_eq!(c.resource_types.len(), 1);
    let t = &c.resource_types[0];
    assert_eq!(t.name, "default");
    assert!(t.r#match.is_catch_all());
    assert_eq!(t.config, ResourceConfig::default());
    assert_eq!(t.config.cache_size, 256 << 20);
    assert_eq!(t.config.max_object_size, 8 << 20);
    assert!(t.config.heuristic_freshness);
    assert!(!t.config.override_origin_ttl);
    assert_eq!(t.config.cache_key.query, QueryKeyMode::Keep);
}

#[test]
fn user_guide_shorthand_loads_as_written() {
    let c = load(&with_base(
        "\
resource_type:
  name: default
  config:
    ttl: 300s # 5 minutes
    cache_size: 50MB
",
    ));
    assert_eq!(c.resource_types.len(), 1);
    let t = &c.resource_types[0];
    assert_eq!(t.name, "default");
    assert!(t.r#match.is_catch_all());
    assert_eq!(t.config.ttl, Some(Duration::from_secs(300)));
    assert_eq!(t.config.cache_size, 50_000_000);
    assert_eq!(t.config.max_object_size, 8 << 20);
}

#[test]
fn shorthand_errors_use_the_shorthand_path() {
    let e = lines(&with_base(
        "resource_type:\n  name: default\n  config:\n    ttl: soon\n",
    ));
    assert_eq!(
        e,
        [
            "larder.yaml:13:10: resource_type.config.ttl: invalid duration \"soon\": expected a number followed by ms, s, m, h or d"
        ]
    );
}

#[test]
fn json_loads_from_text_and_from_a_json_file() {
    let json = r#"{
  "listeners": [{"name": "public", "address": "0.0.0.0:80"}],
  "virtual_hosts": [
    {"name": "main", "domains": ["example.com", "*.example.com"],
     "routes": [{"match": {"regex": "^/v[0-9]+/"}, "cluster": "origin", "timeout": "2s"}]}
  ],
  "clusters": [{"name": "origin", "endpoints": ["http://origin.svc:8080/"]}],
  "resource_types": [{"name": "all", "config": {"ttl": 60, "cache_size": 1048576}}]
}"#;
    let c = load(json);
    assert_eq!(c.listeners[0].address, "0.0.0.0:80".parse().unwrap());
    assert_eq!(c.virtual_hosts[0].domains, ["example.com", "*.example.com"]);
    assert!(c.virtual_hosts[0].routes[0].r#match.matches("/v2/items"));
    assert_eq!(
        c.virtual_hosts[0].routes[0].timeout,
        Some(Duration::from_secs(2))
    );
    assert_eq!(c.clusters[0].endpoints[0].to_string(), "origin.svc:8080");
    assert_eq!(
        c.resource_types[0].config.ttl,
        Some(Duration::from_secs(60))
    );
    assert_eq!(c.resource_types[0].config.cache_size, 1 << 20);
    // Default 8MiB shrinks to a quarter of the 1MiB budget.
    assert_eq!(c.resource_types[0].config.max_object_size, 256 << 10);

    let dir = std::env::temp_dir().join(format!("larder-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("larder.json");
    std::fs::write(&path, json).unwrap();
    assert_eq!(load_file(&path).unwrap(), c);

    // Positions in JSON point into the JSON text.
    let bad = json.replace("\"timeout\": \"2s\"", "\"timeout\": \"2 secs\"");
    std::fs::write(&path, &bad).unwrap();
    let e = load_file(&path).unwrap_err().errors;
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].file, path.display().to_string());
    assert_eq!((e[0].line, e[0].column), (Some(5), Some(84)));
    assert_eq!(e[0].path, "virtual_hosts[0].routes[0].timeout");
}

#[test]
fn unknown_keys_are_rejected_with_position_and_path() {
    let e = errors(&with_base("clusters2: []\n"));
    assert_eq!(e.len(), 1);
    assert_eq!((e[0].line, e[0].column), (Some(10), Some(1)));
    assert_eq!(e[0].path, "clusters2");
    assert!(
        e[0].message.starts_with("unknown field `clusters2`"),
        "{}",
        e[0]
    );

    let text = BASE.replace(
        "        cluster: origin\n",
        "        cluster: origin\n        cahce: false\n",
    );
    let e = errors(&text);
    assert_eq!(e.len(), 1);
    assert_eq!(
        e[0].to_string(),
        "larder.yaml:7:9: virtual_hosts[0].routes[0].cahce: unknown field `cahce`, expected one of name, match, cluster, cache, timeout, connect_timeout, idle_timeout, total_timeout"
    );

    let e = errors(&with_base(
        "resource_types:\n  - name: a\n    match: { path_prefix: /a, content: text/html }\n",
    ));
    assert_eq!(e[0].path, "resource_types[0].match.content");
    assert_eq!(e[0].line, Some(12));
}

#[test]
fn type_errors_stop_parsing_with_position_and_path() {
    let e = lines(&with_base("limits:\n  max_request_headers: [1]\n"));
    assert_eq!(
        e,
        [
            "larder.yaml:11:24: limits.max_request_headers: expected a single value, not a list or mapping (quote values that start with \"[\" or \"{\", like \"[::1]:80\")"
        ]
    );
    let e = errors(&BASE.replace("[\"*\"]", "[*.example.com]"));
    assert_eq!(e[0].path, "virtual_hosts[0].domains");
    assert!(
        e[0].message.contains("quote values that start with \"*\""),
        "{}",
        e[0]
    );
    let e = lines("virtual_hosts:\n  name: x\n");
    assert_eq!(e, ["larder.yaml:2:3: virtual_hosts: expected a list"]);
    let e = errors("virtual_hosts:\n  - name: a\n   domains: [x\n");
    assert_eq!(e.len(), 1);
    assert!(e[0].line.is_some());
}

#[test]
fn bad_durations_and_sizes_are_reported_with_positions() {
    let e = lines(&with_base(
        "\
cache:
  cache_size: 1.5B
  coalesce_timeout: -1s
resource_types:
  - name: pages
    match: { path_suffix: .html }
    config:
      ttl: 5x
      max_object_size: 12QB
  - name: rest
    config:
      ttl: 10
      cache_size: 0
",
    ));
    assert_eq!(
        e,
        [
            "larder.yaml:11:15: cache.cache_size: invalid size \"1.5B\": is not a whole number of bytes",
            "larder.yaml:12:21: cache.coalesce_timeout: invalid duration \"-1s\": must not be negative",
            "larder.yaml:17:12: resource_types[0].config.ttl: invalid duration \"5x\": expected a number followed by ms, s, m, h or d",
            "larder.yaml:18:24: resource_types[0].config.max_object_size: invalid size \"12QB\": expected a number of bytes, optionally followed by a unit: B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB, K, M, G, T (powers of 1024)",
            "larder.yaml:22:19: resource_types[1].config.cache_size: must be greater than zero",
        ]
    );
}

#[test]
fn semantic_errors_are_all_reported_together() {
    let text = "\
listeners:
  - address: 127.0.0.1:9901
  - address: localhost:8080
virtual_hosts:
  - name: main
    domains: [\"*\", example.com]
    routes:
      - match: { prefix: api }
        cluster: api
      - match: { regex: \"^/(v1\" }
        cluster: origin
  - name: other
    domains: [Example.com]
    routes: []
clusters:
  - name: origin
    endpoints: [\"https://origin:443\"]
    lb_policy: fastest
    connect_timeout: 0s
  - name: origin
    endpoints: []
";
    let e = errors(text);
    for err in &e {
        assert!(
            err.line.is_some() && err.column.is_some(),
            "no position: {err}"
        );
    }
    let shown: Vec<String> = e.iter().map(ToString::to_string).collect();
    assert_eq!(
        shown,
        [
            "larder.yaml:2:14: listeners[0].address: address 127.0.0.1:9901 conflicts with the admin address 127.0.0.1:9901",
            "larder.yaml:3:14: listeners[1].address: invalid address \"localhost:8080\": host names are not resolved here; use an IP address like 0.0.0.0 or 127.0.0.1",
            "larder.yaml:8:26: virtual_hosts[0].routes[0].match.prefix: prefix \"api\" must start with \"/\"",
            "larder.yaml:9:18: virtual_hosts[0].routes[0].cluster: unknown cluster \"api\" (defined: origin)",
            "larder.yaml:10:25: virtual_hosts[0].routes[1].match.regex: invalid regex \"^/(v1\": unclosed group",
            "larder.yaml:13:15: virtual_hosts[1].domains[0]: domain \"example.com\" is also listed in virtual_hosts[0] (\"main\"); each domain may belong to only one virtual host",
            "larder.yaml:14:5: virtual_hosts[1].routes: at least one route is required",
            "larder.yaml:17:17: clusters[0].endpoints[0]: invalid endpoint \"https://origin:443\": write the endpoint as host:port and set `tls:` on the cluster",
            "larder.yaml:18:16: clusters[0].lb_policy: unknown lb_policy \"fastest\" (supported: round_robin, random, least_request, ring_hash)",
            "larder.yaml:19:22: clusters[0].connect_timeout: must be greater than zero",
            "larder.yaml:20:11: clusters[1].name: duplicate cluster name \"origin\" (first defined at clusters[0])",
            "larder.yaml:21:5: clusters[1].endpoints: at least one endpoint is required",
        ]
    );
}

#[test]
fn missing_required_sections_point_at_the_enclosing_mapping() {
    let e = errors("listeners:\n  - address: 0.0.0.0:8080\n");
    let msgs: Vec<(&str, &str)> = e
        .iter()
        .map(|e| (e.path.as_str(), e.message.as_str()))
        .collect();
    assert_eq!(
        msgs,
        [
            ("clusters", "at least one cluster is required"),
            ("virtual_hosts", "at least one virtual host is required"),
        ]
    );
    assert!(e.iter().all(|e| e.line == Some(1)));

    let e = errors(&BASE.replace("        cluster: origin\n", ""));
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].path, "virtual_hosts[0].routes[0].cluster");
    assert_eq!(e[0].message, "cluster is required");
    assert_eq!(e[0].line, Some(5));

    // Empty text: nothing to point at.
    let e = errors("");
    assert_eq!(e.len(), 2);
}

#[test]
fn domains_are_validated_and_normalized() {
    let c = load(&BASE.replace(
        "domains: [\"*\"]",
        "domains: [\"*\", WWW.Example.com, \"*.example.org\", \"example.net:8080\", \"[::1]:8080\"]",
    ));
    assert_eq!(
        c.virtual_hosts[0].domains,
        [
            "*",
            "www.example.com",
            "*.example.org",
            "example.net:8080",
            "[::1]:8080"
        ]
    );
    let e = errors(&BASE.replace(
        "domains: [\"*\"]",
        "domains: [\"\", \"*.*.example.com\", \"ex*ample.com\", \"a..b\", \"example.com:0\", \"a.com\", \"a.com\"]",
    ));
    let msgs: Vec<&str> = e.iter().map(|e| e.message.as_str()).collect();
    assert_eq!(
        msgs,
        [
            "empty domain",
            "invalid domain \"*.*.example.com\": a wildcard is only allowed as a leading \"*.\" (like \"*.example.com\") or as \"*\" alone",
            "invalid domain \"ex*ample.com\": a wildcard is only allowed as a leading \"*.\" (like \"*.example.com\") or as \"*\" alone",
            "invalid domain \"a..b\": expected a host name like example.com, optionally with :port",
            "invalid domain \"example.com:0\": invalid port \"0\"",
            "domain \"a.com\" is listed twice",
        ]
    );
    let paths: Vec<&str> = e.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths[5], "virtual_hosts[0].domains[6]");
    assert!(e.iter().all(|e| e.line == Some(3)));
}

#[test]
fn regexes_are_validated_and_precompiled() {
    let e = errors(&with_base(
        "resource_types:\n  - name: a\n    match: { path_regex: \"[a-\" }\n",
    ));
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].path, "resource_types[0].match.path_regex");
    assert_eq!(e[0].line, Some(12));
    assert!(
        e[0].message.starts_with("invalid regex \"[a-\": "),
        "{}",
        e[0]
    );
    assert!(!e[0].message.contains('\n'));

    let c = load(&with_base(
        "resource_types:\n  - name: a\n    match: { path_regex: \"\\\\.(css|js)$\" }\n",
    ));
    let m = &c.resource_types[0].r#match;
    assert_eq!(m.path_regex.as_ref().unwrap().as_str(), "\\.(css|js)$");
    assert!(m.matches("/app.css", None));
    assert!(!m.matches("/app.html", None));
    assert!(m.path_regex.as_ref().unwrap().compile().is_match("/x.js"));
}

#[test]
fn route_match_needs_exactly_one_kind() {
    let text = BASE.replace("{ prefix: / }", "{ prefix: /, path: /x }");
    let e = errors(&text);
    assert_eq!(e[0].path, "virtual_hosts[0].routes[0].match");
    assert_eq!(
        e[0].message,
        "expected exactly one of prefix, path or regex, got prefix and path"
    );
    let e = errors(&BASE.replace("{ prefix: / }", "{}"));
    assert_eq!(
        e[0].message,
        "expected exactly one of prefix, path or regex"
    );
    let e = errors(&BASE.replace("{ prefix: / }", "{ path: healthz }"));
    assert_eq!(e[0].message, "path \"healthz\" must start with \"/\"");
}

#[test]
fn route_matching() {
    assert!(RouteMatch::Prefix("/api".into()).matches("/api/x"));
    assert!(!RouteMatch::Prefix("/api".into()).matches("/ap"));
    assert!(RouteMatch::Path("/x".into()).matches("/x"));
    assert!(!RouteMatch::Path("/x".into()).matches("/x/"));
    let re = RouteMatch::Regex(RegexSource::new("^/v[0-9]+/").unwrap());
    assert!(re.matches("/v12/items"));
    assert!(!re.matches("/x/v1/"));
}

#[test]
fn resource_matching() {
    let c = load(&with_base(
        "\
resource_types:
  - name: images
    match:
      path_prefix: [/static/, /img/]
      content_type: [\"image/*\", Text/CSS]
  - name: js
    match: { path_suffix: .js }
  - name: rest
",
    ));
    let images = &c.resource_types[0].r#match;
    assert_eq!(images.content_type, ["image/*", "text/css"]);
    assert_eq!(images.matches_request_path("/static/a.png"), None);
    assert_eq!(images.matches_request_path("/other/a.png"), Some(false));
    assert!(images.matches("/img/a.png", Some("image/png")));
    assert!(images.matches("/img/a.css", Some("TEXT/css; charset=utf-8")));
    assert!(!images.matches("/img/a.html", Some("text/html")));
    assert!(!images.matches("/img/a.png", None));
    assert!(!images.matches("/a.png", Some("image/png")));
    let js = &c.resource_types[1].r#match;
    assert_eq!(js.path_suffix, [".js"]);
    assert_eq!(js.matches_request_path("/app.js"), Some(true));
    assert_eq!(js.matches_request_path("/app.css"), Some(false));
    let rest = &c.resource_types[2].r#match;
    assert!(rest.is_catch_all());
    assert_eq!(rest.matches_request_path("/anything"), Some(true));
    assert!(rest.matches("/anything", None));

    let any = ResourceMatch {
        content_type: vec!["*/*".into()],
        ..Default::default()
    };
    assert!(any.matches("/", Some("application/json")));
    assert!(!any.matches("/", Some("garbage")));
}

#[test]
fn resource_match_values_are_validated() {
    let e = errors(&with_base(
        "\
resource_types:
  - name: a
    match:
      path_prefix: [/ok, nope]
      path_suffix: \"\"
      content_type: [text, \"text/html; charset=utf-8\", \"*/html\"]
",
    ));
    let shown: Vec<String> = e
        .iter()
        .map(|e| format!("{}: {}", e.path, e.message))
        .collect();
    assert_eq!(
        shown,
        [
            "resource_types[0].match.path_prefix[1]: path_prefix \"nope\" must start with \"/\"",
            "resource_types[0].match.path_suffix: path_suffix must not be empty",
            "resource_types[0].match.content_type[0]: invalid content_type \"text\": expected type/subtype, like \"text/html\" or \"image/*\"",
            "resource_types[0].match.content_type[1]: invalid content_type \"text/html; charset=utf-8\": parameters are not supported; give only the media type, like \"text/html\"",
            "resource_types[0].match.content_type[2]: invalid content_type \"*/html\": a wildcard type needs a wildcard subtype (\"*/*\")",
        ]
    );
}

#[test]
fn catch_all_must_be_last() {
    let e = errors(&with_base(
        "\
resource_types:
  - name: everything
    config: { ttl: 1m }
  - name: images
    match: { content_type: \"image/*\" }
  - name: css
    match: { path_suffix: .css }
",
    ));
    assert_eq!(e.len(), 2);
    assert_eq!(e[0].path, "resource_types[1]");
    assert_eq!(e[0].line, Some(13));
    assert_eq!(
        e[0].message,
        "resource type \"images\" is unreachable: catch-all type \"everything\" (resource_types[0]) comes before it and matches everything; move \"everything\" last or give it a match"
    );
    assert_eq!(e[1].path, "resource_types[2]");
}

#[test]
fn no_catch_all_is_fine() {
    let c = load(&with_base(
        "resource_types:\n  - name: js\n    match: { path_suffix: .js }\n",
    ));
    assert_eq!(c.resource_types.len(), 1);
    assert!(!c.resource_types[0].r#match.is_catch_all());
}

#[test]
fn resource_type_names_are_required_and_unique() {
    let e = errors(&with_base(
        "\
resource_types:
  - name: a
    match: { path_suffix: .a }
  - name: a
    match: { path_suffix: .b }
  - match: { path_suffix: .c }
  - name: \" \"
",
    ));
    let shown: Vec<String> = e
        .iter()
        .map(|e| format!("{}: {}", e.path, e.message))
        .collect();
    assert_eq!(
        shown,
        [
            "resource_types[1].name: duplicate resource type name \"a\" (first defined at resource_types[0])",
            "resource_types[2].name: name is required",
            "resource_types[3].name: name must not be empty",
        ]
    );
}

#[test]
fn both_resource_type_and_resource_types_is_an_error() {
    let e = errors(&with_base(
        "\
resource_type:
  name: a
resource_types:
  - name: b
",
    ));
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].path, "resource_types");
    assert_eq!(e[0].line, Some(12));
    assert!(e[0].message.contains("not both"), "{}", e[0]);
}

fn sizes(extra: &str) -> Vec<(String, u64, u64)> {
    load(&with_base(extra))
        .resource_types
        .into_iter()
        .map(|t| (t.name, t.config.cache_size, t.config.max_object_size))
        .collect()
}

const THREE_TYPES: &str = "\
resource_types:
  - name: a
    match: { path_prefix: /a }
    config: { cache_size: 300MiB }
  - name: b
    match: { path_prefix: /b }
  - name: c
";

#[test]
fn cache_size_without_a_total() {
    assert_eq!(
        sizes(THREE_TYPES),
        [
            ("a".into(), 300 << 20, 8 << 20),
            ("b".into(), 256 << 20, 8 << 20),
            ("c".into(), 256 << 20, 8 << 20),
        ]
    );
}

#[test]
fn cache_size_remainder_is_shared_equally() {
    let text = format!("cache:\n  cache_size: 1GiB\n{THREE_TYPES}");
    assert_eq!(
        sizes(&text),
        [
            ("a".into(), 300 << 20, 8 << 20),
            ("b".into(), 362 << 20, 8 << 20),
            ("c".into(), 362 << 20, 8 << 20),
        ]
    );
    // The implicit default type takes the whole total.
    assert_eq!(
        sizes("cache:\n  cache_size: 2GB\n"),
        [("default".into(), 2_000_000_000, 8 << 20)]
    );
    // Explicit sizes may use the total exactly.
    let text = "cache: { cache_size: 100MiB }\nresource_type: { name: x, config: { cache_size: 100MiB } }\n";
    assert_eq!(sizes(text), [("x".into(), 100 << 20, 8 << 20)]);
}

#[test]
fn cache_size_over_the_total_is_an_error() {
    let text = with_base(&format!(
        "cache:\n  cache_size: 200MiB\n{}",
        THREE_TYPES.replace(
            "  - name: b\n",
            "  - name: b\n    config: { cache_size: 50MB }\n"
        )
    ));
    let e = lines(&text);
    assert_eq!(
        e,
        [
            "larder.yaml:11:15: cache.cache_size: resource type cache sizes add up to 364572800B (\"a\" 300MiB, \"b\" 50MB), more than the total cache.cache_size 200MiB"
        ]
    );
}

#[test]
fn nothing_left_for_types_without_a_size_is_an_error() {
    let text = with_base(&format!("cache:\n  cache_size: 300MiB\n{THREE_TYPES}"));
    let e = errors(&text);
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].path, "cache.cache_size");
    assert_eq!(
        e[0].message,
        "nothing is left of cache.cache_size 300MiB for resource types without their own cache_size (\"b\", \"c\"): the others take 300MiB"
    );
}

#[test]
fn max_object_size_must_fit_a_quarter_of_the_budget() {
    let e = lines(&with_base(
        "resource_type:\n  name: big\n  config:\n    cache_size: 64MiB\n    max_object_size: 20MiB\n",
    ));
    assert_eq!(
        e,
        [
            "larder.yaml:14:22: resource_type.config.max_object_size: max_object_size 20MiB is more than a quarter of this type's cache_size 64MiB; lower max_object_size to at most 16MiB or raise cache_size to at least 80MiB"
        ]
    );
    // Without an explicit max_object_size the default shrinks instead.
    assert_eq!(
        sizes("resource_type:\n  name: small\n  config: { cache_size: 8MiB }\n"),
        [("small".into(), 8 << 20, 2 << 20)]
    );
}

#[test]
fn override_origin_ttl_needs_a_ttl() {
    let e = errors(&with_base(
        "resource_type:\n  name: a\n  config:\n    override_origin_ttl: true\n",
    ));
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].path, "resource_type.config.override_origin_ttl");
}

#[test]
fn cache_key_settings() {
    let c = load(&with_base(
        "resource_type:\n  name: a\n  config:\n    cache_key: { query: sort, headers: [Accept-Encoding, accept-encoding, X-Tenant] }\n",
    ));
    let k = &c.resource_types[0].config.cache_key;
    assert_eq!(k.query, QueryKeyMode::Sort);
    assert_eq!(k.headers, ["accept-encoding", "x-tenant"]);

    let e = errors(&with_base(
        "resource_type:\n  name: a\n  config:\n    cache_key: { query: shuffle, headers: \"bad header\" }\n",
    ));
    let msgs: Vec<&str> = e.iter().map(|e| e.message.as_str()).collect();
    assert_eq!(
        msgs,
        [
            "unknown query mode \"shuffle\" (supported: keep, drop, sort)",
            "invalid header name \"bad header\"",
        ]
    );
    assert_eq!(e[1].path, "resource_type.config.cache_key.headers");
}

#[test]
fn listeners_admin_access_log_limits() {
    let c = load(&with_base(
        "\
listeners:
  - address: 0.0.0.0:80
  - name: alt
    address: \"[::]:8080\"
  - name: test
    address: 127.0.0.1:0
  - name: test2
    address: 127.0.0.1:0
admin:
  address: 127.0.0.1:0
  token_file: /run/secrets/admin-token
access_log: { enabled: false, output: /var/log/larder/access.log }
limits: { max_request_header_size: 32K, max_request_headers: 50, max_request_body_size: 1GB }
",
    ));
    assert_eq!(c.listeners[0].name, "0.0.0.0:80");
    assert_eq!(c.listeners[1].address, "[::]:8080".parse().unwrap());
    assert_eq!(
        c.admin.token_file.as_deref(),
        Some(std::path::Path::new("/run/secrets/admin-token"))
    );
    assert!(!c.access_log.enabled);
    assert_eq!(
        c.access_log.output,
        LogOutput::File("/var/log/larder/access.log".into())
    );
    assert_eq!(
        c.limits,
        Limits {
            max_request_header_size: 32 << 10,
            max_request_headers: 50,
            max_request_body_size: 1_000_000_000,
            ..Limits::default()
        }
    );

    let e = errors(&with_base(
        "\
listeners:
  - name: a
    address: 0.0.0.0:8080
  - name: a
    address: 127.0.0.1:8080
  - address: 127.0.0.1:9901
  - name: c
admin: { address: 127.0.0.1:9901 }
access_log: { output: stderr }
",
    ));
    let shown: Vec<String> = e
        .iter()
        .map(|e| format!("{}: {}", e.path, e.message))
        .collect();
    assert_eq!(
        shown,
        [
            "listeners[1].name: duplicate listener name \"a\" (first defined at listeners[0])",
            "listeners[1].address: address 127.0.0.1:8080 conflicts with listeners[0].address",
            "listeners[2].address: address 127.0.0.1:9901 conflicts with the admin address 127.0.0.1:9901",
            "listeners[3].address: address is required",
        ]
    );
}

#[test]
fn endpoints() {
    let ok = |s: &str| s.parse::<Endpoint>().unwrap();
    assert_eq!(
        ok("origin.svc:80"),
        Endpoint {
            host: "origin.svc".into(),
            port: 80,
            weight: 1,
        }
    );
    assert_eq!(
        ok("[::1]:80"),
        Endpoint {
            host: "::1".into(),
            port: 80,
            weight: 1,
        }
    );
    assert_eq!(ok("[::1]:80").to_string(), "[::1]:80");
    assert_eq!(ok("http://Origin.svc").to_string(), "origin.svc:80");
    assert_eq!(ok("http://10.0.0.1:8080/").to_string(), "10.0.0.1:8080");
    for (bad, why) in [
        ("https://x:443", "set `tls:` on the cluster"),
        ("ftp://x:21", "unsupported scheme"),
        ("x", "missing port"),
        ("x:0", "port 0"),
        ("x:99999", "invalid port"),
        ("::1:80", "brackets"),
        ("http://x:80/path", "path"),
        (":80", "missing host"),
        ("a b:80", "invalid host name"),
    ] {
        let err = bad.parse::<Endpoint>().unwrap_err();
        assert!(err.contains(why), "{bad}: {err}");
    }
}

#[test]
fn yaml_anchors_and_merge_keys_work() {
    let c = load(
        "\
virtual_hosts:
  - name: main
    domains: [\"*\"]
    routes:
      - match: { prefix: /api/ }
        cluster: api
      - match: { prefix: / }
        cluster: web
clusters:
  - &defaults
    name: api
    endpoints: [\"10.0.0.1:80\"]
    connect_timeout: 1s
  - <<: *defaults
    name: web
",
    );
    assert_eq!(c.clusters[1].name, "web");
    assert_eq!(c.clusters[1].connect_timeout, Duration::from_secs(1));
}

#[test]
fn error_display_formats() {
    let e = ConfigError {
        file: "larder.yaml".into(),
        line: Some(20),
        column: Some(14),
        path: "virtual_hosts[0].routes[2].cluster".into(),
        message: "unknown cluster \"api\" (defined: origin, static)".into(),
    };
    assert_eq!(
        e.to_string(),
        "larder.yaml:20:14: virtual_hosts[0].routes[2].cluster: unknown cluster \"api\" (defined: origin, static)"
    );
    let unplaced = ConfigError {
        file: "x.yaml".into(),
        line: None,
        column: None,
        path: String::new(),
        message: "cannot read".into(),
    };
    assert_eq!(unplaced.to_string(), "x.yaml: cannot read");
    let all = ConfigErrors {
        errors: vec![e, unplaced],
    };
    assert_eq!(all.to_string().lines().count(), 2);
    let _: &dyn std::error::Error = &all;

    let missing = load_file(std::path::Path::new("/nonexistent/larder.yaml")).unwrap_err();
    assert_eq!(missing.errors.len(), 1);
    assert!(
        missing.errors[0]
            .to_string()
            .starts_with("/nonexistent/larder.yaml: cannot read config file")
    );
}

#[test]
fn embedded_default_is_valid() {
    let c = load_str(EMBEDDED_DEFAULT, "<embedded>").unwrap();
    assert_eq!(c.listeners[0].address, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(c.admin.address, "127.0.0.1:9901".parse().unwrap());
    assert_eq!(c.virtual_hosts[0].domains, ["*"]);
    assert_eq!(c.virtual_hosts[0].routes[0].cluster, DEMO_CLUSTER);
    assert!(c.virtual_hosts[0].routes[0].r#match.matches("/anything"));
    let demo = c.cluster(DEMO_CLUSTER).unwrap();
    assert_eq!(demo.endpoints.len(), 1);
    assert_eq!(c.resource_types.len(), 1);
    assert_eq!(c.resource_types[0].name, "default");
    assert_eq!(
        c.resource_types[0].config.ttl,
        Some(Duration::from_secs(60))
    );
    assert_eq!(c.resource_types[0].config.cache_size, 64 << 20);
}

fn example_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../larder.example.yaml")
}

#[test]
fn example_config_is_valid() {
    let c = match load_file(&example_path()) {
        Ok(c) => c,
        Err(e) => panic!("larder.example.yaml must load:\n{e}"),
    };
    assert_eq!(c.cache.cache_size, Some(1 << 30));
    let names: Vec<&str> = c.resource_types.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["images", "default"]);
    assert_eq!(c.resource_types[1].config.cache_size, 512 << 20);
    assert_eq!(c.cluster("api").unwrap().endpoints[0].port, 80);
}

#[test]
fn dump_loads_back_to_the_same_config() {
    let example = load_file(&example_path()).unwrap();
    for config in [example, load(EMBEDDED_DEFAULT), load(BASE)] {
        let json = config.to_json();
        let text = serde_json::to_string_pretty(&json).unwrap();
        let again = match load_str(&text, "dump.json") {
            Ok(c) => c,
            Err(e) => panic!("dump must load again:\n{e}\n{text}"),
        };
        assert_eq!(again, config);
    }
    let json = load(BASE).to_json();
    assert_eq!(json["clusters"][0]["connect_timeout"], "5s");
    assert_eq!(json["limits"]["max_request_body_size"], 100u64 << 20);
    assert_eq!(
        json["virtual_hosts"][0]["routes"][0]["match"]["prefix"],
        "/"
    );
}

#[test]
fn purge_section_loads_and_defaults() {
    let c = load(BASE);
    assert_eq!(c.purge, Purge::default());
    assert_eq!(c.purge.tag_headers, ["surrogate-key", "cache-tag"]);
    assert!(c.purge.peers.is_empty());
    let c = load(&with_base(
        "purge:
  tag_headers: X-Tags
  max_requests_per_second: 0
  purge_method: { enabled: true, allowed_cidrs: [10.0.0.0/8, 192.168.1.7, \"fd00::/8\"] }
  peers:
    dns: Larder-Peers.default.svc.cluster.local.
    port: 9902
    refresh_interval: 30s
    nameserver: 10.96.0.10
    static: [\"10.0.0.5:9901\"]
  fanout_timeout: 2s
  fanout_retries: 0
  redis: { url: \"redis://redis:6379\" }
",
    ));
    let p = &c.purge;
    assert_eq!(p.tag_headers, ["x-tags"]);
    assert_eq!(p.max_requests_per_second, 0);
    assert!(p.purge_method.enabled);
    assert_eq!(p.purge_method.allowed_cidrs.len(), 3);
    assert_eq!(
        p.purge_method.allowed_cidrs[1].to_string(),
        "192.168.1.7/32"
    );
    assert_eq!(
        p.peers.dns.as_deref(),
        Some("larder-peers.default.svc.cluster.local")
    );
    assert_eq!(p.peers.port, 9902);
    assert_eq!(p.peers.refresh_interval, Duration::from_secs(30));
    assert_eq!(p.peers.nameserver, Some("10.96.0.10:53".parse().unwrap()));
    assert_eq!(p.peers.r#static, ["10.0.0.5:9901".parse().unwrap()]);
    assert_eq!(p.fanout_timeout, Duration::from_secs(2));
    assert_eq!(p.fanout_retries, 0);
    assert_eq!(p.redis.as_ref().unwrap().channel, "larder-purge");
    let with_password = load(&with_base(
        "purge: { redis: { url: \"redis://user:hunter2@redis:6379/0\" } }\n",
    ));
    let dump = with_password.to_json().to_string();
    assert!(!dump.contains("hunter2"), "{dump}");
    assert!(dump.contains("redis://…@redis:6379/0"), "{dump}");
}

#[test]
fn purge_errors_name_line_and_key() {
    let text = with_base(
        "purge:
  tag_headers: [\"bad header\"]
  purge_method: { allowed_cidrs: [10.0.0.0/33] }
  peers:
    dns: \"not a name\"
    port: 70000
    static: [\"larder-1:9901\"]
  fanout_retries: 11
  redis: { url: \"http://redis\" }
",
    );
    let e = errors(&text);
    let paths: Vec<&str> = e.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "purge.tag_headers[0]",
            "purge.purge_method.allowed_cidrs[0]",
            "purge.peers.dns",
            "purge.peers.port",
            "purge.peers.static[0]",
            "purge.fanout_retries",
            "purge.redis.url",
        ]
    );
    let static_error = &e[4];
    assert_eq!(static_error.line, Some(16));
    assert!(static_error.message.contains("IP:port"), "{static_error}");
    let unknown = errors(&with_base("purge: { peer: {} }\n"));
    assert_eq!(unknown[0].path, "purge.peer");
}

#[test]
fn elasticsearch_index_patterns_and_credentials() {
    let c = load(&with_base(
        "access_log:\n  elasticsearch: { url: \"http://es:9200\", index: \"larder-%Y.%m.%d\", username: larder }\n",
    ));
    let es = c.access_log.elasticsearch.unwrap();
    assert_eq!(es.index, "larder-%Y.%m.%d");
    assert!(
        !es.data_stream,
        "a named index is written with index actions"
    );
    let e = errors(&with_base(
        "access_log:\n  elasticsearch: { url: \"http://es:9200\", index: \"Larder\", password_file: /p }\n",
    ));
    let paths: Vec<&str> = e.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "access_log.elasticsearch.index",
            "access_log.elasticsearch.password_file"
        ]
    );
}

#[test]
fn weighted_endpoints() {
    let c = load(&BASE.replace(
        "    endpoints: [\"127.0.0.1:9000\"]",
        "    endpoints: [\"127.0.0.1:9000\", { address: \"127.0.0.1:9001\", weight: 3 }]",
    ));
    let weights: Vec<u32> = c.clusters[0].endpoints.iter().map(|e| e.weight).collect();
    assert_eq!(weights, [1, 3]);
    let e = errors(&BASE.replace(
        "    endpoints: [\"127.0.0.1:9000\"]",
        "    endpoints: [{ address: \"127.0.0.1:9001\", weight: 0 }]",
    ));
    assert_eq!(e[0].path, "clusters[0].endpoints[0].weight");
}

#[cfg(feature = "kubernetes")]
#[test]
fn kubernetes_discovery_replaces_the_endpoint_list_and_names_bad_keys() {
    let good = BASE.replace(
        "    endpoints: [\"127.0.0.1:9000\"]\n",
        "    kubernetes: { service: shop-api, port: http }\n",
    );
    let c = load(&good);
    let k = c.clusters[0].kubernetes.as_ref().unwrap();
    assert_eq!(k.service, "shop-api");
    assert_eq!(k.port, ServicePort::Name("http".into()));
    assert_eq!(k.namespace, None);
    assert!(c.clusters[0].endpoints.is_empty());

    let bad = BASE.replace(
        "    endpoints: [\"127.0.0.1:9000\"]\n",
        "    kubernetes: { service: shop-api, namespace: Shop, port: HTTP_Port }\n    dns: { name: shop.local, port: 80 }\n",
    );
    assert_eq!(
        lines(&bad),
        [
            "larder.yaml:9:5: clusters[0].kubernetes: choose one discovery: dns or kubernetes",
            "larder.yaml:9:49: clusters[0].kubernetes.namespace: invalid namespace \"Shop\": expected a DNS label like \"shop-api\"",
            "larder.yaml:9:61: clusters[0].kubernetes.port: invalid port \"HTTP_Port\": expected a port name like \"http\" or 1 to 65535",
        ]
    );
}

#[cfg(not(feature = "kubernetes"))]
#[test]
fn kubernetes_discovery_without_the_feature_is_a_validation_error() {
    let text = BASE.replace(
        "    endpoints: [\"127.0.0.1:9000\"]\n",
        "    kubernetes: { service: shop-api, port: http }\n",
    );
    assert_eq!(
        lines(&text),
        [
            "larder.yaml:9:5: clusters[0].kubernetes: kubernetes discovery needs a Larder built with the `kubernetes` feature (cargo build --features kubernetes; the container image has it)"
        ]
    );
}

#[test]
fn hardening_limits_parse_and_name_bad_entries() {
    let c = load(&with_base(
        "limits:\n  max_connections: 500\n  header_read_timeout: 5s\n  trusted_proxies: [10.0.0.0/8, 192.168.1.7]\n  strip_request_headers: [X-Original-URL]\n",
    ));
    assert_eq!(c.limits.max_connections, 500);
    assert_eq!(
        c.limits.header_read_timeout,
        std::time::Duration::from_secs(5)
    );
    assert_eq!(c.limits.trusted_proxies.len(), 2);
    assert_eq!(c.limits.strip_request_headers, ["x-original-url"]);
    assert_eq!(
        load(BASE).limits.strip_request_headers.len(),
        Limits::DEFAULT_STRIP_REQUEST_HEADERS.len()
    );
    let e = lines(&with_base(
        "limits:\n  trusted_proxies: [10.0.0.0/33]\n  strip_request_headers: [\"bad header\"]\n",
    ));
    assert_eq!(
        e,
        [
            "larder.yaml:11:21: limits.trusted_proxies[0]: invalid CIDR \"10.0.0.0/33\": expected an address with a prefix length, like 10.0.0.0/8 or fd00::/8",
            "larder.yaml:12:27: limits.strip_request_headers[0]: \"bad header\" is not a header name",
        ]
    );
}

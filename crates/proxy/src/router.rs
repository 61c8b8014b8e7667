//! Virtual hosts and routes, compiled once per config so each request costs a hash lookup (exact
//! domains) or a short scan (wildcards), then a scan of that host's routes.

use std::collections::HashMap;
use std::sync::Arc;

use larder_config::{Config, RouteMatch};

#[derive(Debug)]
pub struct Route {
    /// Name for logs and metric labels: the configured name, else `<vhost>/<index>`.
    pub name: Arc<str>,
    pub matcher: RouteMatch,
    pub cluster: usize,
    pub cache: bool,
    pub timeout: Option<std::time::Duration>,
    pub connect_timeout: Option<std::time::Duration>,
    pub idle_timeout: Option<std::time::Duration>,
    pub total_timeout: Option<std::time::Duration>,
}

#[derive(Debug)]
struct VirtualHost {
    routes: Vec<Route>,
}

#[derive(Debug, Default)]
pub struct Router {
    vhosts: Vec<VirtualHost>,
    exact: HashMap<String, usize>,
    /// `(".example.com", vhost)`, longest suffix first so the most specific wildcard wins.
    suffixes: Vec<(String, usize)>,
    any: Option<usize>,
}

impl Router {
    pub fn new(config: &Config, cluster_index: &HashMap<&str, usize>) -> Router {
        let mut router = Router::default();
        for (vi, vh) in config.virtual_hosts.iter().enumerate() {
            let routes = vh
                .routes
                .iter()
                .enumerate()
                .map(|(ri, r)| Route {
                    name: r
                        .name
                        .clone()
                        .unwrap_or_else(|| format!("{}/{}", vh.name, ri))
                        .into(),
                    matcher: r.r#match.clone(),
                    cluster: cluster_index[r.cluster.as_str()],
                    cache: r.cache,
                    timeout: r.timeout,
                    connect_timeout: r.connect_timeout,
                    idle_timeout: r.idle_timeout,
                    total_timeout: r.total_timeout,
                })
                .collect();
            router.vhosts.push(VirtualHost { routes });
            for domain in &vh.domains {
                let domain = domain.to_ascii_lowercase();
                if domain == "*" {
                    router.any = Some(vi);
                } else if let Some(suffix) = domain.strip_prefix('*') {
                    router.suffixes.push((suffix.to_owned(), vi));
                } else {
                    router.exact.insert(domain, vi);
                }
            }
        }
        router
            .suffixes
            .sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        router
    }

    /// `host` is lower case, with a port only when non-default. A domain listed with a port
    /// matches only that port; one listed without matches any port.
    pub fn route(&self, host: &str, path: &str) -> Option<&Route> {
        let bare = larder_cache::key::host_without_port(host);
        let vhost = self
            .exact
            .get(host)
            .or_else(|| self.exact.get(bare))
            .copied()
            .or_else(|| {
                self.suffixes
                    .iter()
                    .find(|(suffix, _)| {
                        bare.ends_with(suffix.as_str()) && bare.len() > suffix.len()
                    })
                    .map(|(_, vi)| *vi)
            })
            .or(self.any)?;
        self.vhosts[vhost]
            .routes
            .iter()
            .find(|r| r.matcher.matches(path))
    }
}

//! Where a cluster's endpoints come from when the config does not list them: DNS names
//! (re-resolved) and Kubernetes EndpointSlices (watched). Both end in `Discovered::update`,
//! the one place a cluster's endpoint set is replaced.

use std::net::SocketAddr;
use std::sync::{Arc, Weak};

use arc_swap::ArcSwap;
use http::uri::Authority;

use crate::balance::Balancer;

/// A cluster's endpoint set, as discovery sees it: held weakly, so discovery ends when a
/// reload drops the cluster.
pub(crate) struct Discovered {
    pub balancer: Weak<ArcSwap<Balancer>>,
    pub policy: larder_config::LbPolicy,
    pub outlier: larder_config::OutlierDetection,
    pub cluster: Arc<str>,
}

impl Discovered {
    /// Swaps in `found` (sorted, deduplicated) unless it is the set in use. False once the
    /// cluster is gone.
    fn update(&self, mut found: Vec<SocketAddr>, source: &str) -> bool {
        let Some(current) = self.balancer.upgrade() else {
            return false;
        };
        found.sort();
        found.dedup();
        let fresh: Vec<String> = found.iter().map(SocketAddr::to_string).collect();
        let unchanged = current
            .load()
            .endpoints
            .iter()
            .map(|e| &*e.display)
            .eq(fresh.iter().map(String::as_str));
        if !unchanged {
            let endpoints = fresh
                .iter()
                .filter_map(|a| {
                    let authority = a.parse::<Authority>().ok()?;
                    Some((authority, Arc::from(a.as_str()), 1))
                })
                .collect();
            let balancer = Balancer::new(endpoints, self.policy, self.outlier.clone());
            balancer.inherit(&current.load());
            current.store(Arc::new(balancer));
            tracing::info!(
                cluster = %self.cluster,
                endpoints = %fresh.join(","),
                "cluster endpoints updated from {source}"
            );
        }
        true
    }

    fn alive(&self) -> bool {
        self.balancer.strong_count() > 0
    }
}

/// Asks DNS for the name every `refresh_interval`; an answer without records empties the
/// cluster, a failed lookup keeps the endpoints it had.
pub(crate) async fn dns(discovered: Discovered, dns: larder_config::DnsDiscovery) {
    let cluster = &discovered.cluster;
    let resolver = match larder_purge::peers::resolver(dns.nameserver) {
        Ok(resolver) => resolver,
        Err(e) => {
            tracing::error!(cluster = %cluster, error = %e, "DNS discovery cannot start");
            return;
        }
    };
    let name = format!("{}.", dns.name);
    while discovered.alive() {
        let found: Option<Vec<SocketAddr>> = match resolver.lookup_ip(name.as_str()).await {
            Ok(lookup) => Some(
                lookup
                    .iter()
                    .map(|ip| SocketAddr::new(ip, dns.port))
                    .collect(),
            ),
            Err(e) if e.is_no_records_found() => Some(Vec::new()),
            Err(e) => {
                tracing::warn!(cluster = %cluster, error = %e, "DNS discovery failed; keeping the endpoints");
                None
            }
        };
        if let Some(found) = found
            && !discovered.update(found, "DNS")
        {
            return;
        }
        tokio::time::sleep(dns.refresh_interval).await;
    }
}

/// Starts watching the Service's EndpointSlices. Fails only when no client can be made (no
/// in-cluster account and no kubeconfig); a failing watch is retried with backoff and keeps
/// the endpoints it had.
#[cfg(feature = "kubernetes")]
pub(crate) fn kubernetes(
    discovered: Discovered,
    config: larder_config::KubernetesDiscovery,
) -> Result<(), String> {
    // Inferring the config reads files (service account, kubeconfig): done in the task; an
    // explicit API server needs nothing but the URL, checked here.
    let explicit = match &config.api_server {
        Some(url) => Some(
            url.parse::<http::Uri>()
                .map_err(|e| format!("kubernetes.api_server {url:?}: {e}"))?,
        ),
        None => None,
    };
    tokio::spawn(kubernetes::watch(discovered, config, explicit));
    Ok(())
}

#[cfg(not(feature = "kubernetes"))]
pub(crate) fn kubernetes(
    _discovered: Discovered,
    _config: larder_config::KubernetesDiscovery,
) -> Result<(), String> {
    Err(
        "kubernetes discovery needs a Larder built with the `kubernetes` feature \
         (cargo build --features kubernetes)"
            .into(),
    )
}

#[cfg(feature = "kubernetes")]
mod kubernetes {
    use std::collections::BTreeMap;
    use std::net::{IpAddr, SocketAddr};

    use futures_util::StreamExt;
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use kube::runtime::{WatchStreamExt, watcher};
    use larder_config::{KubernetesDiscovery, ServicePort};

    use super::Discovered;

    pub(super) async fn watch(
        discovered: Discovered,
        config: KubernetesDiscovery,
        explicit: Option<http::Uri>,
    ) {
        let cluster = discovered.cluster.clone();
        let client_config = match explicit {
            Some(url) => Ok(kube::Config::new(url)),
            None => kube::Config::infer().await.map_err(|e| e.to_string()),
        };
        let client = client_config.and_then(|c| {
            let namespace = config
                .namespace
                .clone()
                .unwrap_or_else(|| c.default_namespace.clone());
            kube::Client::try_from(c)
                .map(|client| (client, namespace))
                .map_err(|e| e.to_string())
        });
        let (client, namespace) = match client {
            Ok(made) => made,
            Err(e) => {
                tracing::error!(cluster = %cluster, error = %e, "Kubernetes discovery cannot start: no API client");
                return;
            }
        };
        let api: kube::Api<EndpointSlice> = kube::Api::namespaced(client, &namespace);
        let selector = format!("kubernetes.io/service-name={}", config.service);
        let events = watcher(api, watcher::Config::default().labels(&selector)).default_backoff();
        tokio::pin!(events);
        // Each slice's ready addresses, by slice name; replaced whole after a relist.
        let mut slices: BTreeMap<String, Vec<SocketAddr>> = BTreeMap::new();
        let mut relisting: Option<BTreeMap<String, Vec<SocketAddr>>> = None;
        let source = format!(
            "Kubernetes EndpointSlices of {namespace}/{}",
            config.service
        );
        while discovered.alive() {
            // Checked at least every few seconds, so a dropped cluster stops its watch.
            let next = tokio::time::timeout(std::time::Duration::from_secs(5), events.next());
            let event = match next.await {
                Err(_) => continue,
                Ok(None) => return,
                Ok(Some(Err(e))) => {
                    tracing::warn!(cluster = %cluster, error = %e, "Kubernetes watch failed; keeping the endpoints and retrying");
                    continue;
                }
                Ok(Some(Ok(event))) => event,
            };
            match event {
                watcher::Event::Init => relisting = Some(BTreeMap::new()),
                watcher::Event::InitApply(slice) => {
                    if let Some(buffer) = relisting.as_mut() {
                        buffer.insert(name_of(&slice), ready_addresses(&slice, &config.port));
                    }
                }
                watcher::Event::InitDone => {
                    slices = relisting.take().unwrap_or_default();
                }
                watcher::Event::Apply(slice) => {
                    slices.insert(name_of(&slice), ready_addresses(&slice, &config.port));
                }
                watcher::Event::Delete(slice) => {
                    slices.remove(&name_of(&slice));
                }
            }
            if relisting.is_none() {
                let found = slices.values().flatten().copied().collect();
                if !discovered.update(found, &source) {
                    return;
                }
            }
        }
    }

    fn name_of(slice: &EndpointSlice) -> String {
        slice.metadata.name.clone().unwrap_or_default()
    }

    /// The slice's ready endpoints on the wanted port. An endpoint without a ready condition
    /// counts as ready (the API's rule); FQDN slices are not used.
    pub(super) fn ready_addresses(slice: &EndpointSlice, wanted: &ServicePort) -> Vec<SocketAddr> {
        let port = slice.ports.iter().flatten().find_map(|p| {
            let number = u16::try_from(p.port?).ok()?;
            let matches = match wanted {
                ServicePort::Name(name) => p.name.as_deref() == Some(name.as_str()),
                ServicePort::Number(n) => number == *n,
            };
            let tcp = p.protocol.as_deref().is_none_or(|proto| proto == "TCP");
            (matches && tcp).then_some(number)
        });
        let Some(port) = port else {
            return Vec::new();
        };
        slice
            .endpoints
            .iter()
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
            // Addresses of one endpoint are fungible: the first stands for it.
            .filter_map(|e| e.addresses.first()?.parse::<IpAddr>().ok())
            .map(|ip| SocketAddr::new(ip, port))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn discovered() -> Discovered {
        Discovered {
            balancer: Weak::new(),
            policy: larder_config::LbPolicy::default(),
            outlier: larder_config::OutlierDetection::default(),
            cluster: "app".into(),
        }
    }

    #[cfg(not(feature = "kubernetes"))]
    #[test]
    fn without_the_feature_kubernetes_discovery_says_how_to_get_it() {
        let config = larder_config::KubernetesDiscovery {
            service: "app".into(),
            namespace: None,
            port: larder_config::ServicePort::Number(80),
            api_server: None,
        };
        let error = kubernetes(discovered(), config).unwrap_err();
        assert!(error.contains("--features kubernetes"), "{error}");
    }

    #[test]
    fn an_update_after_the_cluster_is_gone_ends_discovery() {
        assert!(!discovered().update(vec!["127.0.0.1:80".parse().unwrap()], "test"));
    }

    #[cfg(feature = "kubernetes")]
    #[test]
    fn ports_match_by_number_and_tcp_only() {
        use larder_config::ServicePort;
        let slice: k8s_openapi::api::discovery::v1::EndpointSlice =
            serde_json::from_value(serde_json::json!({
                "metadata": { "name": "s" },
                "addressType": "IPv4",
                "endpoints": [
                    { "addresses": ["10.0.0.1", "10.0.0.9"], "conditions": { "ready": true } },
                    { "addresses": ["10.0.0.2"], "conditions": { "ready": false } },
                    { "addresses": ["10.0.0.3"] }
                ],
                "ports": [
                    { "name": "dns", "port": 53, "protocol": "UDP" },
                    { "name": "", "port": 8080 }
                ]
            }))
            .unwrap();
        let found = kubernetes::ready_addresses(&slice, &ServicePort::Number(8080));
        let want: Vec<SocketAddr> = vec![
            "10.0.0.1:8080".parse().unwrap(),
            "10.0.0.3:8080".parse().unwrap(),
        ];
        assert_eq!(found, want);
        assert!(kubernetes::ready_addresses(&slice, &ServicePort::Number(53)).is_empty());
        assert!(kubernetes::ready_addresses(&slice, &ServicePort::Name("dns".into())).is_empty());
    }
}

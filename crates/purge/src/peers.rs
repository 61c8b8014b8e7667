//! The replicas purges are relayed to: a static list plus whatever a DNS name (a Kubernetes
//! headless Service) resolves to, A and AAAA, re-resolved periodically.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use larder_telemetry::Metrics;
use tokio::sync::watch;

pub struct PeerSet {
    r#static: Vec<SocketAddr>,
    dns: Option<Discovery>,
    /// Addresses the DNS name resolved to last time (with the configured port).
    discovered: ArcSwap<Vec<SocketAddr>>,
    /// Flips to true once the first resolution finished (successfully or not), so a purge
    /// right after start-up waits for the peer list instead of relaying to nobody.
    resolved: watch::Sender<bool>,
    /// Set once the name resolved successfully; until then purges report the name as failed.
    ever_resolved: AtomicBool,
    last_error: parking_lot::Mutex<Option<String>>,
}

struct Discovery {
    name: String,
    port: u16,
    interval: Duration,
    resolver: TokioResolver,
}

impl PeerSet {
    pub fn new(config: &larder_config::Peers) -> Result<PeerSet, String> {
        let dns = match &config.dns {
            None => None,
            Some(name) => Some(Discovery {
                // Fully qualified: the search domains of resolv.conf must not rewrite it.
                name: format!("{}.", name.trim_end_matches('.')),
                port: config.port,
                interval: config.refresh_interval,
                resolver: resolver(config.nameserver)
                    .map_err(|e| format!("purge.peers: cannot set up DNS resolution: {e}"))?,
            }),
        };
        let (resolved, _) = watch::channel(dns.is_none());
        Ok(PeerSet {
            r#static: config.r#static.clone(),
            dns,
            discovered: ArcSwap::default(),
            resolved,
            ever_resolved: AtomicBool::new(false),
            last_error: parking_lot::Mutex::new(None),
        })
    }

    /// Every peer: static ones first, then discovered ones, without duplicates. Waits (until
    /// `deadline` at most) for the first DNS resolution.
    pub async fn current(&self, deadline: Instant) -> Vec<SocketAddr> {
        let mut ready = self.resolved.subscribe();
        let _ = tokio::time::timeout_at(deadline.into(), ready.wait_for(|done| *done)).await;
        self.snapshot()
    }

    pub fn snapshot(&self) -> Vec<SocketAddr> {
        let mut peers = self.r#static.clone();
        for addr in self.discovered.load().iter() {
            if !peers.contains(addr) {
                peers.push(*addr);
            }
        }
        peers
    }

    /// Resolves the DNS name once. A name that no longer exists, or has no addresses, means
    /// no replicas; any other failure keeps the last list (a DNS hiccup must not make purges
    /// silently skip every replica).
    pub async fn refresh(&self) -> Result<usize, String> {
        let Some(dns) = &self.dns else {
            return Ok(0);
        };
        let result = match dns.resolver.lookup_ip(dns.name.as_str()).await {
            Ok(lookup) => {
                let mut addrs: Vec<SocketAddr> = lookup
                    .iter()
                    .map(|ip: IpAddr| SocketAddr::new(ip, dns.port))
                    .collect();
                addrs.sort();
                addrs.dedup();
                let n = addrs.len();
                self.discovered.store(Arc::new(addrs));
                Ok(n)
            }
            Err(e) if e.is_no_records_found() => {
                self.discovered.store(Arc::new(Vec::new()));
                Ok(0)
            }
            Err(e) => Err(format!("resolving {}: {e}", dns.name)),
        };
        match &result {
            Ok(_) => {
                self.ever_resolved.store(true, Ordering::Release);
                *self.last_error.lock() = None;
            }
            Err(e) => *self.last_error.lock() = Some(e.clone()),
        }
        self.resolved.send_replace(true);
        result
    }

    /// `(dns:name, why)` while the DNS name has never resolved: the replicas it names are
    /// unknown, so a purge cannot claim to have reached them.
    pub fn discovery_problem(&self) -> Option<(String, String)> {
        let dns = self.dns.as_ref()?;
        if self.ever_resolved.load(Ordering::Acquire) {
            return None;
        }
        let why = self
            .last_error
            .lock()
            .clone()
            .unwrap_or_else(|| "not resolved yet".into());
        Some((format!("dns:{}", dns.name.trim_end_matches('.')), why))
    }

    /// Re-resolves every refresh interval, forever.
    pub async fn run(self: Arc<Self>, metrics: Arc<Metrics>) {
        let Some(dns) = &self.dns else {
            metrics.set_purge_peers(self.r#static.len());
            return std::future::pending().await;
        };
        let mut known = self.snapshot();
        loop {
            match self.refresh().await {
                Ok(n) => tracing::debug!(name = %dns.name, addresses = n, "purge peers resolved"),
                Err(e) => {
                    tracing::warn!(error = %e, "purge peer discovery failed; keeping the last list")
                }
            }
            let now = self.snapshot();
            // Replicas come and go (pod IPs): their per-peer series go with them.
            for gone in known.iter().filter(|p| !now.contains(p)) {
                metrics.forget_purge_peer(&gone.to_string());
            }
            metrics.set_purge_peers(now.len());
            known = now;
            tokio::time::sleep(dns.interval).await;
        }
    }
}

/// A resolver that asks again every time (replicas and endpoints come and go): the system's
/// (resolv.conf), or one `nameserver`. Shared with upstream DNS discovery.
pub fn resolver(
    nameserver: Option<SocketAddr>,
) -> Result<TokioResolver, hickory_resolver::net::NetError> {
    let mut builder = match nameserver {
        Some(server) => {
            let mut udp = ConnectionConfig::udp();
            udp.port = server.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = server.port();
            let config = ResolverConfig::from_name_servers(vec![NameServerConfig::new(
                server.ip(),
                true,
                vec![udp, tcp],
            )]);
            let mut builder =
                TokioResolver::builder_with_config(config, TokioRuntimeProvider::default());
            builder.options_mut().use_hosts_file = ResolveHosts::Never;
            builder
        }
        None => TokioResolver::builder_tokio()?,
    };
    let options = builder.options_mut();
    // Replicas come and go: every refresh asks again rather than trusting a cached answer.
    options.cache_size = 0;
    options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    options.timeout = Duration::from_secs(2);
    options.attempts = 2;
    builder.build()
}

#![forbid(unsafe_code)]
//! Wiring: turns a loaded config into running listeners, the admin server and the demo origin.
//! The binary (`main.rs`) only parses the command line and calls [`start`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use larder_admin::AdminState;
use larder_config::{Config, LogOutput};
use larder_proxy::Proxy;
use larder_proxy::server::{ServerLimits, serve};
use larder_telemetry::{AccessLog, LogTarget, Metrics};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Options that do not live in the config file.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// Admin bearer token (from `LARDER_ADMIN_TOKEN`); overrides `admin.token_file`.
    pub admin_token: Option<String>,
}

pub struct Server {
    pub proxy_addrs: Vec<SocketAddr>,
    pub admin_addr: SocketAddr,
    pub proxy: Arc<Proxy>,
    pub purger: Arc<larder_purge::Purger>,
    pub ready: Arc<AtomicBool>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Server {
    /// Graceful stop: readiness drops at once, listeners stop accepting, in-flight requests
    /// finish (bounded by the drain timeout).
    /// See [`reload_config`].
    pub fn reload_from_file(&self, path: &std::path::Path) -> Result<u64, String> {
        reload_config(&self.proxy, path)
    }

    /// The first step of a drain: readiness fails and HTTP/1 responses close their
    /// connections, while the listeners keep serving.
    pub fn start_draining(&self) {
        self.ready.store(false, Ordering::SeqCst);
        self.proxy.start_draining();
    }

    pub async fn shutdown(self) {
        self.start_draining();
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
        // Every request has been logged by now: what the Elasticsearch sink holds goes out,
        // and so do the last spans.
        if let Some(log) = self.proxy.access_log() {
            log.close(ES_FLUSH_DEADLINE).await;
        }
        if let Some(tracing) = self.proxy.tracing() {
            tracing.clone().shutdown().await;
        }
    }
}

/// How long shutdown waits for the access log's Elasticsearch sink to send what it holds.
const ES_FLUSH_DEADLINE: Duration = Duration::from_secs(5);

/// The Elasticsearch sink's settings, with its credentials read: `LARDER_ES_API_KEY` or
/// `api_key_file` (an API key, sent as `ApiKey …`), or `username` with `LARDER_ES_PASSWORD` or
/// `password_file` (basic auth).
fn es_sink_config(
    es: &larder_config::Elasticsearch,
) -> anyhow::Result<larder_telemetry::EsSinkConfig> {
    use base64::Engine;
    let secret = |env: &str,
                  file: &Option<std::path::PathBuf>,
                  what: &str|
     -> anyhow::Result<Option<String>> {
        if let Ok(value) = std::env::var(env)
            && !value.trim().is_empty()
        {
            return Ok(Some(value.trim().to_owned()));
        }
        let Some(path) = file else { return Ok(None) };
        let value = std::fs::read_to_string(path).with_context(|| {
            format!("reading access_log.elasticsearch.{what} {}", path.display())
        })?;
        anyhow::ensure!(
            !value.trim().is_empty(),
            "access_log.elasticsearch.{what} {} is empty",
            path.display()
        );
        Ok(Some(value.trim().to_owned()))
    };
    let authorization = match &es.username {
        Some(user) => {
            let password = secret("LARDER_ES_PASSWORD", &es.password_file, "password_file")?
                .context("access_log.elasticsearch.username needs a password (password_file or LARDER_ES_PASSWORD)")?;
            let pair =
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            Some(format!("Basic {pair}"))
        }
        None => secret("LARDER_ES_API_KEY", &es.api_key_file, "api_key_file")?
            .map(|key| format!("ApiKey {key}")),
    };
    Ok(larder_telemetry::EsSinkConfig {
        url: es.url.clone(),
        index: es.index.clone(),
        data_stream: es.data_stream,
        authorization,
        batch_size: es.batch_size,
        flush_interval: es.flush_interval,
        max_queue: es.max_queue,
        gzip: es.gzip,
        timeout: es.timeout,
        max_retries: es.max_retries,
    })
}

fn admin_token(config: &Config, options: &StartOptions) -> anyhow::Result<Option<String>> {
    if let Some(token) = options
        .admin_token
        .as_ref()
        .filter(|t| !t.trim().is_empty())
    {
        return Ok(Some(token.trim().to_owned()));
    }
    let Some(path) = &config.admin.token_file else {
        return Ok(None);
    };
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("reading admin.token_file {}", path.display()))?;
    let token = token.trim();
    anyhow::ensure!(
        !token.is_empty(),
        "admin.token_file {} is empty",
        path.display()
    );
    Ok(Some(token.to_owned()))
}

/// Binds every listener and starts serving. Binding errors name the address.
pub async fn start(config: Config, options: StartOptions) -> anyhow::Result<Server> {
    let config = Arc::new(config);
    let token = admin_token(&config, &options)?;
    if token.is_none() && (!config.purge.peers.is_empty() || config.purge.redis.is_some()) {
        tracing::warn!(
            "purges are relayed between replicas but no admin token is set \
             (LARDER_ADMIN_TOKEN or admin.token_file): anyone who can reach an admin port \
             can purge the whole cluster"
        );
    }
    let metrics = Metrics::new(VERSION);
    metrics.record_config_reload(true);
    let access_log = if config.access_log.enabled {
        let target = match &config.access_log.output {
            LogOutput::Stdout => LogTarget::Stdout,
            LogOutput::Stderr => LogTarget::Stderr,
            LogOutput::File(path) => LogTarget::File(path.clone()),
        };
        let options = larder_telemetry::AccessLogOptions {
            sample_rate: config.access_log.sample_rate,
            exclude: config.access_log.exclude_fields.clone(),
        };
        let elasticsearch = config
            .access_log
            .elasticsearch
            .as_ref()
            .map(es_sink_config)
            .transpose()?;
        Some(
            AccessLog::open_with(&target, &options, Some(&metrics), elasticsearch)
                .context("opening the access log")?,
        )
    } else {
        None
    };

    let mut listeners = Vec::new();
    for listener in &config.listeners {
        let bound = TcpListener::bind(listener.address).await.with_context(|| {
            format!(
                "binding listener {:?} on {}",
                listener.name, listener.address
            )
        })?;
        // Certificates are loaded before anything serves: a bad file stops the start, naming it.
        let tls = match &listener.tls {
            None => None,
            Some(tls) => {
                let store = larder_proxy::tls::CertStore::load(&tls.certificates)
                    .map_err(|e| anyhow::anyhow!("listener {:?}: {e}", listener.name))?;
                let config = larder_proxy::tls::server_config(store.clone())
                    .map_err(|e| anyhow::anyhow!("listener {:?}: {e}", listener.name))?;
                match larder_proxy::tls::watch(store) {
                    Ok(watching) => {
                        tokio::spawn(watching);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, listener = %listener.name, "certificates will not be reloaded")
                    }
                }
                Some(tokio_rustls::TlsAcceptor::from(config))
            }
        };
        listeners.push((bound, tls));
    }
    let admin_listener = TcpListener::bind(config.admin.address)
        .await
        .with_context(|| format!("binding the admin server on {}", config.admin.address))?;

    let limits = ServerLimits::from_config(&config);
    let tracing = if config.tracing.enabled {
        let tracing = &config.tracing;
        Some(
            larder_telemetry::Tracing::start(&larder_telemetry::TracingConfig {
                endpoint: tracing.endpoint.clone(),
                service_name: tracing.service_name.clone(),
                sample_ratio: tracing.sample_ratio,
                max_queue_size: tracing.max_queue_size,
                export_timeout: tracing.export_timeout,
            })
            .map_err(|e| anyhow::anyhow!(e))?,
        )
    } else {
        None
    };
    let proxy = Proxy::new(config.clone(), metrics.clone(), access_log, tracing)
        .map_err(|e| anyhow::anyhow!(e))?;
    let ready = Arc::new(AtomicBool::new(true));
    let (shutdown, shutdown_rx) = watch::channel(false);
    let signal = move || {
        let mut rx = shutdown_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };

    let mut tasks = Vec::new();
    let mut proxy_addrs = Vec::new();
    for (listener, tls) in listeners {
        proxy_addrs.push(listener.local_addr()?);
        tasks.push(tokio::spawn(serve(
            listener,
            proxy.clone(),
            limits.clone(),
            tls,
            signal(),
        )));
    }
    let admin_addr = admin_listener.local_addr()?;
    let purger =
        larder_purge::Purger::new(proxy.clone(), &config.purge, token.clone(), metrics.clone())
            .map_err(|e| anyhow::anyhow!(e))?;
    proxy.set_purger(&purger);
    tasks.push(tokio::spawn(purger.clone().run(signal())));
    let dump_proxy = Arc::downgrade(&proxy);
    let clusters_proxy = Arc::downgrade(&proxy);
    let state = Arc::new(AdminState {
        purger: purger.clone(),
        metrics,
        config_dump: Arc::new(move || {
            let Some(proxy) = dump_proxy.upgrade() else {
                return serde_json::Value::Null;
            };
            let mut dump = proxy.config().to_json();
            if let Some(object) = dump.as_object_mut() {
                // Which version is active: 1 at start, one more per successful reload.
                object.insert("generation".into(), proxy.generation().into());
            }
            dump
        }),
        clusters: Arc::new(move || {
            let Some(proxy) = clusters_proxy.upgrade() else {
                return serde_json::Value::Null;
            };
            let runtime = proxy.runtime();
            serde_json::json!({
                "clusters": runtime.clusters.iter().map(|c| c.snapshot()).collect::<Vec<_>>(),
            })
        }),
        token,
        ready: ready.clone(),
    });
    let admin_shutdown = signal();
    tasks.push(tokio::spawn(async move {
        if let Err(e) = larder_admin::serve(admin_listener, state, admin_shutdown).await {
            tracing::error!(error = %e, "admin server failed");
        }
    }));
    Ok(Server {
        proxy_addrs,
        admin_addr,
        proxy,
        purger,
        ready,
        shutdown,
        tasks,
    })
}

/// The embedded default: `EMBEDDED_DEFAULT` in front of the built-in demo origin.
pub async fn demo_config() -> anyhow::Result<Config> {
    let mut config = larder_config::load_str(larder_config::EMBEDDED_DEFAULT, "<embedded default>")
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let origin = larder_proxy::demo::spawn(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .context("starting the demo origin")?;
    let cluster = config
        .cluster_mut(larder_config::DEMO_CLUSTER)
        .context("embedded default has no demo cluster")?;
    cluster.endpoints = vec![larder_config::Endpoint {
        weight: 1,
        host: origin.ip().to_string(),
        port: origin.port(),
    }];
    Ok(config)
}

/// Quick mode: one upstream, everything routed to it, RFC-driven caching with a 256 MiB budget.
pub fn quick_config(
    upstream: &str,
    listen: SocketAddr,
    admin: SocketAddr,
) -> anyhow::Result<Config> {
    let yaml = format!(
        r#"listeners:
  - name: http
    address: "{listen}"
admin:
  address: "{admin}"
virtual_hosts:
  - name: default
    domains: ["*"]
    routes:
      - match: {{ prefix: "/" }}
        cluster: upstream
clusters:
  - name: upstream
    endpoints: [{upstream:?}]
resource_types:
  - name: default
    config:
      cache_size: 256MiB
"#
    );
    larder_config::load_str(&yaml, "--upstream").map_err(|e| anyhow::anyhow!("{e}"))
}

/// Registers the SIGTERM and SIGINT handlers now and returns a future that resolves on the
/// first of them. Register before announcing readiness: a signal that arrives between the
/// announcement and the registration would otherwise kill the process without a drain.
pub fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}

/// Loads the config file again and, if it is valid, swaps it in (validate → diff → swap):
/// requests in flight finish under the old version, resource types whose definition is
/// unchanged keep their cache. An invalid file changes nothing: every error is logged and
/// the failure counted. Returns the new generation.
pub fn reload_config(proxy: &Proxy, path: &std::path::Path) -> Result<u64, String> {
    let config = match larder_config::load_file(path) {
        Ok(config) => config,
        Err(errors) => {
            proxy.metrics.record_config_reload(false);
            for e in &errors.errors {
                tracing::error!(error = %e, "config reload rejected");
            }
            tracing::error!(
                file = %path.display(),
                errors = errors.errors.len(),
                generation = proxy.generation(),
                "config reload rejected; the running config stays"
            );
            return Err(errors.to_string());
        }
    };
    let (generation, changed) = match proxy.reload(config) {
        Ok(applied) => applied,
        Err(e) => {
            proxy.metrics.record_config_reload(false);
            tracing::error!(file = %path.display(), error = %e, "config reload rejected; the running config stays");
            return Err(e);
        }
    };
    proxy.metrics.record_config_reload(true);
    let needs_restart: Vec<&str> = changed
        .iter()
        .copied()
        .filter(|s| larder_proxy::RESTART_SECTIONS.contains(s))
        .collect();
    tracing::info!(
        file = %path.display(),
        generation,
        changed = %changed.join(","),
        "config reloaded"
    );
    if !needs_restart.is_empty() {
        tracing::warn!(
            sections = %needs_restart.join(","),
            "these sections changed but take effect only at the next restart"
        );
    }
    Ok(generation)
}

/// Reloads the config on SIGHUP and whenever the file's directory changes (a Kubernetes
/// ConfigMap volume swaps a `..data` symlink rather than writing the file), skipping events
/// that leave the file's content as it was. The signal handler and the watcher are in place
/// when this returns; the future it returns runs until the process ends.
pub fn watch_config(
    proxy: Arc<Proxy>,
    path: std::path::PathBuf,
) -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use notify::Watcher;
    let (tx, mut changes) = tokio::sync::mpsc::channel::<()>(64);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            let _ = tx.try_send(());
        }
    })
    .context("starting the config file watcher")?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    watcher
        .watch(dir, notify::RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", dir.display()))?;
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut last = std::fs::read(&path).ok();
    Ok(async move {
        // Dropping the watcher would stop the events.
        let _watcher = watcher;
        loop {
            #[cfg(unix)]
            let hup = hangup.recv();
            #[cfg(not(unix))]
            let hup = std::future::pending::<Option<()>>();
            tokio::select! {
                _ = hup => {
                    tracing::info!(file = %path.display(), "SIGHUP: reloading the config");
                    last = std::fs::read(&path).ok();
                    let _ = reload_config(&proxy, &path);
                }
                change = changes.recv() => {
                    if change.is_none() {
                        return;
                    }
                    // One edit is several events (write, rename, symlink swap): let them settle.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    while changes.try_recv().is_ok() {}
                    let now = std::fs::read(&path).ok();
                    if now.is_none() || now == last {
                        continue;
                    }
                    last = now;
                    let _ = reload_config(&proxy, &path);
                }
            }
        }
    })
}

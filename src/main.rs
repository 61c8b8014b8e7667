// One call into the allocator's C API needs `unsafe` (`keep_freed_memory`); nothing else may.
#![deny(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Requests allocate small short-lived objects on every worker thread; mimalloc's per-thread
/// free lists cut the allocator's share of a cache hit roughly in half compared with glibc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Larder: a caching HTTP reverse proxy.
///
/// With no arguments it starts an embedded demo: proxy on 127.0.0.1:8080, admin on
/// 127.0.0.1:9901, in front of a built-in demo origin.
#[derive(Parser, Debug)]
#[command(name = "larder", version, about, long_about)]
struct Cli {
    /// Config file (YAML, or JSON with a .json extension).
    #[arg(short, long, env = "LARDER_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Quick mode: proxy and cache everything to this upstream (http://HOST:PORT).
    #[arg(long, conflicts_with = "config")]
    upstream: Option<String>,
    /// Proxy listen address (quick and demo modes).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Admin listen address (quick and demo modes).
    #[arg(long, default_value = "127.0.0.1:9901")]
    admin: SocketAddr,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Check a config file: exit 0 if valid, else print every error and exit 1.
    Validate,
}

/// What to run, decided before the runtime starts: the config's `log` section sets up logging.
enum Setup {
    Loaded {
        config: Box<larder_config::Config>,
        mode: String,
    },
    Demo,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Validate) = cli.command {
        return validate(cli.config);
    }
    let setup = match (&cli.config, &cli.upstream) {
        (Some(path), _) => match larder_config::load_file(path) {
            Ok(config) => Setup::Loaded {
                config: Box::new(config),
                mode: format!("config {}", path.display()),
            },
            Err(e) => {
                eprintln!("larder: error: invalid config:\n{e}");
                return ExitCode::FAILURE;
            }
        },
        (None, Some(upstream)) => match larder::quick_config(upstream, cli.listen, cli.admin) {
            Ok(config) => Setup::Loaded {
                config: Box::new(config),
                mode: format!("quick mode, upstream {upstream}"),
            },
            Err(e) => {
                eprintln!("larder: error: {e:#}");
                return ExitCode::FAILURE;
            }
        },
        (None, None) => Setup::Demo,
    };
    let log = match &setup {
        Setup::Loaded { config, .. } => config.log.clone(),
        Setup::Demo => larder_config::Log::default(),
    };
    if let Err(e) = init_logging(&log) {
        eprintln!("larder: error: {e:#}");
        return ExitCode::FAILURE;
    }
    if let Setup::Loaded { config, .. } = &setup
        && config.cache.preallocate
    {
        preallocate(
            config
                .resource_types
                .iter()
                .map(|t| t.config.cache_size)
                .sum(),
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("larder")
        .max_io_events_per_tick(IO_EVENTS_PER_TICK)
        .build()
        .expect("building the tokio runtime");
    match runtime.block_on(run(cli, setup)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("larder: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `cache.preallocate`: the budget's memory is written once now, freed, and kept by the
/// allocator for good. Fills then store into memory the process already has; each fresh 4 KiB
/// page otherwise costs the fill a page fault, 4 of them per 16 KiB object (15% of a fill's
/// CPU, `bench/profile.sh perf fill`). Written from this thread before any other exists: mimalloc
/// hands pages a freed block leaves empty back to its arena, where every thread takes them.
fn preallocate(bytes: u64) {
    const BLOCK: usize = 64 << 10;
    let started = std::time::Instant::now();
    keep_freed_memory();
    let blocks: Vec<Vec<u8>> = (0..bytes.div_ceil(BLOCK as u64))
        .map(|_| vec![0x5a; BLOCK])
        .collect();
    drop(blocks);
    tracing::info!(
        mib = bytes >> 20,
        ms = started.elapsed().as_millis() as u64,
        "cache memory preallocated"
    );
}

/// mimalloc's `purge_delay` option, by its place in `mi_option_e` (mimalloc.h, v3; the sys
/// crate names no constant for it): how long freed memory is kept before it goes back to the
/// OS; -1 for never.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Without it, memory freed is returned to the OS after `purge_delay` (and faulted in again
/// when used), and preallocated memory would be gone before the first fill.
#[allow(unsafe_code)]
fn keep_freed_memory() {
    // SAFETY: `mi_option_set` takes any option number and value, and writes the options table
    // without synchronisation: it runs before the tokio runtime and the config watcher exist,
    // on the process's only thread.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// How many ready sockets a worker takes from the poller at once (tokio's default: 1024). With
/// hundreds of busy connections, the worker that polls took readiness for all of them and
/// queued their tasks behind each other on itself; a worker preempted meanwhile (by another
/// process on its core) held them all. Taking 16 at a time keeps the rest with the poller for
/// whichever worker is running: on the 2-core bench, 1 KiB hits at 200 connections went from a
/// p99 of 3.0–5.3 ms to 2.1–2.9 ms at the same throughput (BENCHMARKS.md, thirteenth run).
const IO_EVENTS_PER_TICK: usize = 16;

/// Larder's own diagnostics on stderr: the config's `log.level` filter (`RUST_LOG` wins when
/// set) and `log.format`, text or one JSON object per line.
fn init_logging(log: &larder_config::Log) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(env) if !env.trim().is_empty() => EnvFilter::try_new(&env)
            .map_err(|e| anyhow::anyhow!("RUST_LOG {env:?} is not a valid filter: {e}"))?,
        _ => EnvFilter::try_new(&log.level)
            .map_err(|e| anyhow::anyhow!("log.level {:?} is not a valid filter: {e}", log.level))?,
    };
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match log.format {
        larder_config::LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        larder_config::LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
    Ok(())
}

fn validate(path: Option<PathBuf>) -> ExitCode {
    let Some(path) = path else {
        eprintln!("larder validate: --config FILE (or LARDER_CONFIG) is required");
        return ExitCode::from(2);
    };
    match larder_config::load_file(&path) {
        Ok(_) => {
            println!("{}: ok", path.display());
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors.errors {
                eprintln!("{e}");
            }
            eprintln!("{}: {} error(s)", path.display(), errors.errors.len());
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli, setup: Setup) -> anyhow::Result<()> {
    let (config, mode) = match setup {
        Setup::Loaded { config, mode } => (*config, mode),
        Setup::Demo => {
            let mut config = larder::demo_config().await?;
            config.listeners[0].address = cli.listen;
            config.admin.address = cli.admin;
            let origin = &config.clusters[0].endpoints[0];
            let mode = format!("embedded demo config, demo origin on {origin}");
            (config, mode)
        }
    };
    let options = larder::StartOptions {
        admin_token: std::env::var("LARDER_ADMIN_TOKEN").ok(),
    };
    let server = larder::start(config, options).await?;
    if let Some(path) = cli.config.clone() {
        match larder::watch_config(server.proxy.clone(), path) {
            Ok(watching) => {
                tokio::spawn(watching);
            }
            Err(e) => tracing::warn!(error = %e, "config hot reload is off"),
        }
    }
    let shutdown = larder::shutdown_signal()?;
    eprintln!("larder {} ({mode})", larder::VERSION);
    for addr in &server.proxy_addrs {
        eprintln!("  proxy listening on http://{addr}");
    }
    eprintln!(
        "  admin listening on http://{}  (/stats/prometheus, /ready, POST /purge)",
        server.admin_addr
    );
    shutdown.await;
    eprintln!("larder: shutting down (draining in-flight requests)");
    server.start_draining();
    // Listeners keep serving while load balancers notice /ready failing; a second signal
    // skips the wait.
    let delay = server.proxy.config().drain.delay;
    if !delay.is_zero() {
        eprintln!("larder: still accepting for {delay:?} (drain.delay)");
        let again = larder::shutdown_signal()?;
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = again => eprintln!("larder: second signal: closing listeners now"),
        }
    }
    server.shutdown().await;
    eprintln!("larder: stopped");
    Ok(())
}

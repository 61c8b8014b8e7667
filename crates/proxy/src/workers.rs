//! Connection threads (opt-in, `LARDER_CONNECTION_THREADS=N`): N single-threaded runtimes,
//! each serving the client connections handed to it for their whole life (the model of
//! Envoy's workers and nginx's processes). The accept loops, the admin API and background work
//! (discovery, health checks, reloads) stay on the main runtime.
//!
//! On tokio's work-stealing runtime (the default) idle workers are woken to steal whatever is
//! queued. Measured side by side on the 2-core bench machine, where the load generator shares
//! the cores (BENCHMARKS.md, twelfth run): connection threads served as many HTTP/1 cache hits,
//! 29% more pass-through and 9% more HTTP/2 requests, with a p99 at 50 connections 1.5–2.6×
//! worse (a thread preempted by the load generator stalls its connections, where a
//! work-stealing runtime moves them). Hence opt-in: for dedicated cores, or proxies that mostly
//! pass through.

use std::cell::Cell;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

type Job = Box<dyn FnOnce() + Send>;

pub struct Workers {
    queues: Vec<tokio::sync::mpsc::UnboundedSender<Job>>,
    next: AtomicUsize,
}

thread_local! {
    /// Which connection thread this is, if it is one.
    static CURRENT: Cell<Option<usize>> = const { Cell::new(None) };
}

impl Workers {
    /// The process's connection threads, started on first use, if `LARDER_CONNECTION_THREADS`
    /// asks for them (`auto`: one per core the process may use).
    pub fn get() -> Option<&'static Workers> {
        static WORKERS: OnceLock<Option<Workers>> = OnceLock::new();
        WORKERS.get_or_init(|| count().map(Workers::start)).as_ref()
    }

    fn start(count: usize) -> Workers {
        let queues = (0..count)
            .map(|index| {
                let (queue, mut jobs) = tokio::sync::mpsc::unbounded_channel::<Job>();
                std::thread::Builder::new()
                    .name(format!("larder-conn-{index}"))
                    .spawn(move || {
                        CURRENT.set(Some(index));
                        let runtime = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .expect("a connection thread's runtime starts");
                        // Jobs spawn their connection's task here; it runs on this thread.
                        runtime.block_on(async move {
                            while let Some(job) = jobs.recv().await {
                                job();
                            }
                        });
                    })
                    .expect("a connection thread starts");
                queue
            })
            .collect();
        Workers {
            queues,
            next: AtomicUsize::new(0),
        }
    }

    /// How many connection threads there are.
    pub fn count(&self) -> usize {
        self.queues.len()
    }

    /// Runs `job` on the next connection thread in turn (it spawns the connection's task there).
    pub fn hand(&self, job: impl FnOnce() + Send + 'static) {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.queues.len();
        // The threads never stop, so the queue is always open.
        let _ = self.queues[index].send(Box::new(job));
    }

    /// The connection thread the caller runs on, if it is one.
    pub fn current() -> Option<usize> {
        CURRENT.get()
    }
}

/// How many connection threads `LARDER_CONNECTION_THREADS` asks for: a number, `auto`, or
/// (unset, empty, 0) none.
fn count() -> Option<usize> {
    let value = std::env::var("LARDER_CONNECTION_THREADS").ok()?;
    match value.trim() {
        "auto" => Some(std::thread::available_parallelism().map_or(1, |n| n.get())),
        number => match number.parse::<usize>() {
            Ok(0) => None,
            Ok(n) => Some(n),
            Err(_) if number.is_empty() => None,
            Err(_) => {
                tracing::warn!(
                    value = %value,
                    "LARDER_CONNECTION_THREADS is not a number or `auto`: ignored"
                );
                None
            }
        },
    }
}

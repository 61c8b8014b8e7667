//! The metrics every request updates, kept in per-thread shards and summed when scraped.
//!
//! One atomic (or the histogram's mutex) shared by the worker threads moves its cache line
//! between the cores on every request: on the 2-core bench, recording a cache hit's metrics
//! that way cost about 4% of its CPU. Threads take shards in turn, so up to `SHARDS` threads
//! each add to lines no other thread writes (more share some); a series costs 1 KiB (a
//! histogram about 2 KiB), which is why only the per-request families are sharded.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

const SHARDS: usize = 8;
/// Bounds a histogram may have, the implicit `+Inf` one included.
const MAX_BUCKETS: usize = 24;

/// This thread's shard: threads take shards in turn as they first record.
fn shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Relaxed) % SHARDS;
    }
    SHARD.with(|s| *s)
}

/// A shard on cache lines of its own (128 bytes: x86 prefetches lines in pairs).
#[repr(align(128))]
#[derive(Debug, Default)]
struct Padded<T>(T);

/// A counter, exposed exactly as prometheus-client's `Counter`.
#[derive(Debug, Clone, Default)]
pub struct ShardedCounter(Arc<[Padded<AtomicU64>; SHARDS]>);

impl ShardedCounter {
    pub fn inc(&self) {
        self.inc_by(1);
    }

    pub fn inc_by(&self, n: u64) {
        self.0[shard()].0.fetch_add(n, Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.iter().map(|s| s.0.load(Relaxed)).sum()
    }
}

impl TypedMetric for ShardedCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for ShardedCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.get(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// A histogram with fixed bounds, exposed exactly as prometheus-client's `Histogram`.
#[derive(Debug, Clone)]
pub struct ShardedHistogram(Arc<HistogramShards>);

#[derive(Debug)]
struct HistogramShards {
    /// Finite upper bounds, ascending; `+Inf` follows implicitly.
    bounds: Box<[f64]>,
    shards: [Padded<HistogramShard>; SHARDS],
}

#[derive(Debug, Default)]
struct HistogramShard {
    /// The sum of observations, as `f64` bits.
    sum: AtomicU64,
    /// Observations per bucket (not cumulative); the count is their total, so the exposed
    /// `_count` always equals the `+Inf` bucket.
    buckets: [AtomicU64; MAX_BUCKETS],
}

impl ShardedHistogram {
    /// Non-finite bounds are dropped (`+Inf` is implicit), as prometheus-client does.
    ///
    /// # Panics
    /// With more than `MAX_BUCKETS - 1` finite bounds (the bounds are constants of this crate).
    pub fn new(bounds: impl IntoIterator<Item = f64>) -> ShardedHistogram {
        let bounds: Box<[f64]> = bounds.into_iter().filter(|b| b.is_finite()).collect();
        assert!(
            bounds.len() < MAX_BUCKETS,
            "a sharded histogram takes at most {} bounds",
            MAX_BUCKETS - 1
        );
        ShardedHistogram(Arc::new(HistogramShards {
            bounds,
            shards: Default::default(),
        }))
    }

    pub fn observe(&self, v: f64) {
        let shards = &*self.0;
        // NaN fits no finite bound: it lands in `+Inf`, as with prometheus-client.
        let bucket = shards
            .bounds
            .iter()
            .position(|bound| v <= *bound)
            .unwrap_or(shards.bounds.len());
        let shard = &shards.shards[shard()].0;
        shard.buckets[bucket].fetch_add(1, Relaxed);
        // Only this thread writes this shard (bar a thread sharing it), so this rarely retries.
        let mut current = shard.sum.load(Relaxed);
        loop {
            let next = (f64::from_bits(current) + v).to_bits();
            match shard
                .sum
                .compare_exchange_weak(current, next, Relaxed, Relaxed)
            {
                Ok(_) => break,
                Err(actual) => current = actual,
            }
        }
    }

    /// Sum, count and the (non-cumulative) bucket counts with their upper bounds. Read without a
    /// lock: a scrape racing observations may see a sum a few observations apart from the
    /// count (the count always equals the `+Inf` bucket).
    fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let shards = &*self.0;
        let mut buckets: Vec<(f64, u64)> = shards
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .map(|bound| (bound, 0))
            .collect();
        let mut sum = 0.0;
        for shard in &shards.shards {
            sum += f64::from_bits(shard.0.sum.load(Relaxed));
            for (total, count) in buckets.iter_mut().zip(&shard.0.buckets) {
                total.1 += count.load(Relaxed);
            }
        }
        let count = buckets.iter().map(|(_, n)| n).sum();
        (sum, count, buckets)
    }
}

impl TypedMetric for ShardedHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for ShardedHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = self.snapshot();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;
    use prometheus_client::metrics::histogram::Histogram;
    use prometheus_client::registry::Registry;

    fn exposition(register: impl FnOnce(&mut Registry)) -> String {
        let mut registry = Registry::default();
        register(&mut registry);
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        text
    }

    /// Updates from many threads add up, and the text is the same prometheus-client's own
    /// types would give for the same observations.
    #[test]
    fn exposes_what_prometheus_client_would_from_many_threads() {
        let bounds = [0.001, 0.01, 0.1];
        let (counter, histogram) = (ShardedCounter::default(), ShardedHistogram::new(bounds));
        let (reference_counter, reference_histogram) = (
            prometheus_client::metrics::counter::Counter::<u64>::default(),
            Histogram::new(bounds),
        );
        let values = [0.0005, 0.001, 0.05, 3.0, f64::NAN];
        std::thread::scope(|scope| {
            for _ in 0..12 {
                scope.spawn(|| {
                    for v in values {
                        counter.inc_by(2);
                        histogram.observe(v);
                    }
                });
            }
        });
        for _ in 0..12 {
            for v in values {
                reference_counter.inc_by(2);
                reference_histogram.observe(v);
            }
        }
        assert_eq!(counter.get(), 120);
        // NaN makes the sum NaN in both; compare the rest exactly.
        let ours = exposition(|r| {
            r.register("c", "help", counter.clone());
            r.register("h", "help", histogram.clone());
        });
        let theirs = exposition(|r| {
            r.register("c", "help", reference_counter.clone());
            r.register("h", "help", reference_histogram.clone());
        });
        assert_eq!(ours, theirs);
        assert!(ours.contains("h_count 60\n"), "{ours}");
        assert!(ours.contains("h_bucket{le=\"0.001\"} 24\n"), "{ours}");
    }
}

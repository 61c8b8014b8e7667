//! Choosing an endpoint: the cluster's load-balancing policy over the endpoints that are not
//! ejected, and passive outlier detection that ejects endpoints failing in a row.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::uri::Authority;
use larder_config::{LbPolicy, OutlierDetection};

/// One endpoint and what is known of its health and load.
#[derive(Debug)]
pub struct Endpoint {
    pub authority: Authority,
    pub display: Arc<str>,
    /// Relative share of the traffic.
    pub weight: u32,
    /// Requests in flight (least-request balancing).
    active: AtomicUsize,
    consecutive_failures: AtomicU32,
    /// Milliseconds since the balancer's epoch until which it is out of rotation (0: in).
    ejected_until: AtomicU64,
    ejections: AtomicU32,
    requests: AtomicU64,
    failures: AtomicU64,
    /// Set by active health checks: out of rotation until it passes again.
    check_failed: std::sync::atomic::AtomicBool,
    /// Consecutive health check results in the current direction (passes while failed,
    /// failures while passing).
    check_streak: AtomicU32,
}

/// Longest an endpoint is kept out, however often it was ejected before.
const MAX_EJECTION: Duration = Duration::from_secs(300);
/// Points per endpoint on the hash ring: enough for an even spread over a few dozen endpoints.
const RING_POINTS: usize = 160;

pub struct Balancer {
    pub endpoints: Vec<Endpoint>,
    policy: LbPolicy,
    outlier: OutlierDetection,
    next: AtomicUsize,
    epoch: Instant,
    /// (hash, endpoint index), sorted by hash (ring_hash only); points per endpoint grow with
    /// its weight.
    ring: Vec<(u64, usize)>,
    /// Round robin's order: each endpoint as often as its weight, interleaved (smooth weighted
    /// round robin, computed once).
    schedule: Vec<usize>,
}

/// A request's hold on an endpoint: counts it as active until dropped.
pub struct Pick<'a> {
    pub index: usize,
    pub endpoint: &'a Endpoint,
}

impl Drop for Pick<'_> {
    fn drop(&mut self) {
        self.endpoint.active.fetch_sub(1, Ordering::Relaxed);
    }
}

fn hash(bytes: &[u8]) -> u64 {
    // FNV-1a then a finaliser: stable across processes and replicas (the point of consistent
    // hashing between Larder instances), unlike the std hasher's random keys.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h
}

impl Balancer {
    pub fn new(
        endpoints: Vec<(Authority, Arc<str>, u32)>,
        policy: LbPolicy,
        outlier: OutlierDetection,
    ) -> Balancer {
        let endpoints: Vec<Endpoint> = endpoints
            .into_iter()
            .map(|(authority, display, weight)| Endpoint {
                authority,
                display,
                weight: weight.max(1),
                active: AtomicUsize::new(0),
                consecutive_failures: AtomicU32::new(0),
                ejected_until: AtomicU64::new(0),
                ejections: AtomicU32::new(0),
                requests: AtomicU64::new(0),
                failures: AtomicU64::new(0),
                check_failed: std::sync::atomic::AtomicBool::new(false),
                check_streak: AtomicU32::new(0),
            })
            .collect();
        let mut ring = Vec::new();
        if policy == LbPolicy::RingHash {
            for (i, e) in endpoints.iter().enumerate() {
                for point in 0..RING_POINTS * e.weight as usize {
                    ring.push((hash(format!("{}#{point}", e.display).as_bytes()), i));
                }
            }
            ring.sort_unstable();
        }
        let schedule = smooth_schedule(&endpoints);
        Balancer {
            endpoints,
            policy,
            outlier,
            next: AtomicUsize::new(0),
            epoch: Instant::now(),
            ring,
            schedule,
        }
    }

    /// Whether `pick` looks at the request's hash key (ring hashing); others skip building it.
    pub fn hashes_requests(&self) -> bool {
        self.policy == LbPolicy::RingHash
    }

    /// Takes over what `previous` knew of the endpoints both share (by address): a discovery
    /// update that adds one endpoint must not bring back another that was ejected or failing
    /// its health checks.
    pub fn inherit(&self, previous: &Balancer) {
        for e in &self.endpoints {
            let Some(old) = previous.endpoints.iter().find(|o| o.display == e.display) else {
                continue;
            };
            let copy32 = |to: &AtomicU32, from: &AtomicU32| {
                to.store(from.load(Ordering::Relaxed), Ordering::Relaxed)
            };
            let copy64 = |to: &AtomicU64, from: &AtomicU64| {
                to.store(from.load(Ordering::Relaxed), Ordering::Relaxed)
            };
            copy32(&e.consecutive_failures, &old.consecutive_failures);
            copy32(&e.ejections, &old.ejections);
            copy32(&e.check_streak, &old.check_streak);
            copy64(&e.requests, &old.requests);
            copy64(&e.failures, &old.failures);
            e.check_failed
                .store(old.check_failed.load(Ordering::Relaxed), Ordering::Relaxed);
            // Ejection ends are kept relative to each balancer's own epoch.
            let until = old.ejected_until.load(Ordering::Relaxed);
            if until > 0 {
                let end = previous.epoch + Duration::from_millis(until);
                let relative = end.saturating_duration_since(self.epoch).as_millis() as u64;
                e.ejected_until.store(relative, Ordering::Relaxed);
            }
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn is_ejected(&self, e: &Endpoint, now: u64) -> bool {
        e.ejected_until.load(Ordering::Relaxed) > now || e.check_failed.load(Ordering::Relaxed)
    }

    /// Records an active health check result; returns the new state when it changed.
    pub fn record_check(
        &self,
        index: usize,
        passed: bool,
        healthy_threshold: u32,
        unhealthy_threshold: u32,
    ) -> Option<bool> {
        let e = &self.endpoints[index];
        let failed = e.check_failed.load(Ordering::Relaxed);
        // A result that agrees with the current state resets the streak toward a change.
        if passed != failed {
            e.check_streak.store(0, Ordering::Relaxed);
            return None;
        }
        let streak = e.check_streak.fetch_add(1, Ordering::Relaxed) + 1;
        let needed = if failed {
            healthy_threshold
        } else {
            unhealthy_threshold
        };
        if streak < needed {
            return None;
        }
        e.check_streak.store(0, Ordering::Relaxed);
        e.check_failed.store(!passed, Ordering::Relaxed);
        Some(passed)
    }

    /// An endpoint for a request: by policy among those in rotation, skipping `tried`
    /// (endpoints this request already failed on). With none in rotation, any endpoint: a
    /// cluster that ejected everything still tries rather than refusing all traffic.
    pub fn pick(&self, hash_key: &[u8], tried: &[usize]) -> Option<Pick<'_>> {
        let n = self.endpoints.len();
        if n == 0 {
            return None;
        }
        // One endpoint (a sidecar's, a Service's VIP): every fallback of `choose` ends on it.
        let index = if n == 1 {
            0
        } else {
            self.choose(hash_key, tried)
        };
        let endpoint = &self.endpoints[index];
        endpoint.active.fetch_add(1, Ordering::Relaxed);
        endpoint.requests.fetch_add(1, Ordering::Relaxed);
        Some(Pick { index, endpoint })
    }

    /// The endpoint among several, by policy (see `pick`).
    fn choose(&self, hash_key: &[u8], tried: &[usize]) -> usize {
        let n = self.endpoints.len();
        let now = self.now_ms();
        let usable = |i: usize| !tried.contains(&i) && !self.is_ejected(&self.endpoints[i], now);
        let mut candidates: Vec<usize> = (0..n).filter(|i| usable(*i)).collect();
        if candidates.is_empty() {
            candidates = (0..n).filter(|i| !tried.contains(i)).collect();
        }
        if candidates.is_empty() {
            candidates = (0..n).collect();
        }
        match self.policy {
            LbPolicy::RoundRobin => {
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                let len = self.schedule.len();
                // The next endpoint in the weighted order that is a candidate.
                (0..len)
                    .map(|k| self.schedule[(start + k) % len])
                    .find(|i| candidates.contains(i))
                    .unwrap_or(candidates[0])
            }
            LbPolicy::Random => {
                let total: u32 = candidates.iter().map(|i| self.endpoints[*i].weight).sum();
                let mut ticket = fastrand::u32(..total.max(1));
                *candidates
                    .iter()
                    .find(|i| {
                        let w = self.endpoints[**i].weight;
                        if ticket < w {
                            true
                        } else {
                            ticket -= w;
                            false
                        }
                    })
                    .unwrap_or(&candidates[0])
            }
            LbPolicy::LeastRequest => {
                let a = candidates[fastrand::usize(..candidates.len())];
                let b = candidates[fastrand::usize(..candidates.len())];
                // Requests in flight per unit of weight: a heavier endpoint takes more.
                let load = |i: usize| {
                    let e = &self.endpoints[i];
                    (e.active.load(Ordering::Relaxed) as u64 + 1) * 1000 / u64::from(e.weight)
                };
                if load(b) < load(a) { b } else { a }
            }
            LbPolicy::RingHash => {
                let h = hash(hash_key);
                let start = self.ring.partition_point(|(point, _)| *point < h);
                (0..self.ring.len())
                    .map(|k| self.ring[(start + k) % self.ring.len()].1)
                    .find(|i| candidates.contains(i))
                    .unwrap_or(candidates[0])
            }
        }
    }

    /// Records how a request to `index` went; returns true when this failure ejected it.
    pub fn record(&self, index: usize, failed: bool) -> bool {
        let e = &self.endpoints[index];
        if !failed {
            e.consecutive_failures.store(0, Ordering::Relaxed);
            return false;
        }
        e.failures.fetch_add(1, Ordering::Relaxed);
        let threshold = self.outlier.consecutive_failures;
        let failures = e.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if threshold == 0 || failures < threshold {
            return false;
        }
        let now = self.now_ms();
        if self.is_ejected(e, now) {
            return false;
        }
        let ejected = self
            .endpoints
            .iter()
            .filter(|x| self.is_ejected(x, now))
            .count();
        let allowed = self.endpoints.len() * self.outlier.max_ejection_percent as usize / 100;
        if ejected >= allowed {
            return false;
        }
        let times = e.ejections.fetch_add(1, Ordering::Relaxed);
        let duration = self
            .outlier
            .base_ejection_time
            .saturating_mul(1u32 << times.min(16))
            .min(MAX_EJECTION.max(self.outlier.base_ejection_time));
        e.ejected_until
            .store(now + duration.as_millis() as u64, Ordering::Relaxed);
        e.consecutive_failures.store(0, Ordering::Relaxed);
        tracing::warn!(
            endpoint = %e.display,
            failures,
            ejected_for = ?duration,
            "upstream endpoint ejected after consecutive failures"
        );
        true
    }

    /// Per-endpoint state for `/clusters`.
    pub fn snapshot(&self) -> Vec<serde_json::Value> {
        let now = self.now_ms();
        self.endpoints
            .iter()
            .map(|e| {
                let until = e.ejected_until.load(Ordering::Relaxed);
                let checked_out = e.check_failed.load(Ordering::Relaxed);
                serde_json::json!({
                    "address": &*e.display,
                    "healthy": until <= now && !checked_out,
                    "health_check_failed": checked_out,
                    "ejected_for_ms": until.saturating_sub(now),
                    "ejections": e.ejections.load(Ordering::Relaxed),
                    "consecutive_failures": e.consecutive_failures.load(Ordering::Relaxed),
                    "active_requests": e.active.load(Ordering::Relaxed),
                    "requests": e.requests.load(Ordering::Relaxed),
                    "failures": e.failures.load(Ordering::Relaxed),
                })
            })
            .collect()
    }
}

/// Smooth weighted round robin (nginx's): every endpoint appears as often as its weight,
/// spread out rather than in runs.
fn smooth_schedule(endpoints: &[Endpoint]) -> Vec<usize> {
    let total: i64 = endpoints.iter().map(|e| i64::from(e.weight)).sum();
    let mut current = vec![0i64; endpoints.len()];
    let mut schedule = Vec::with_capacity(total as usize);
    for _ in 0..total {
        for (c, e) in current.iter_mut().zip(endpoints) {
            *c += i64::from(e.weight);
        }
        let Some((best, _)) = current
            .iter()
            .enumerate()
            .max_by_key(|(i, c)| (**c, -(*i as i64)))
        else {
            break;
        };
        current[best] -= total;
        schedule.push(best);
    }
    if schedule.is_empty() {
        schedule.push(0);
    }
    schedule
}

#[cfg(test)]
mod tests {
    use super::*;

    fn balancer(n: usize, policy: LbPolicy) -> Balancer {
        let endpoints = (0..n)
            .map(|i| {
                let display = format!("10.0.0.{i}:80");
                (display.parse().unwrap(), Arc::from(display), 1)
            })
            .collect();
        Balancer::new(endpoints, policy, OutlierDetection::default())
    }

    #[test]
    fn ring_hash_is_stable_spread_and_consistent() {
        let three = balancer(3, LbPolicy::RingHash);
        let owner =
            |b: &Balancer, key: &str, tried: &[usize]| b.pick(key.as_bytes(), tried).unwrap().index;
        let keys: Vec<String> = (0..300).map(|i| format!("example.com/item/{i}")).collect();
        let first: Vec<usize> = keys.iter().map(|k| owner(&three, k, &[])).collect();
        // The same URL always lands on the same endpoint…
        assert_eq!(
            first,
            keys.iter()
                .map(|k| owner(&three, k, &[]))
                .collect::<Vec<_>>()
        );
        // …and the URLs spread over all of them.
        for i in 0..3 {
            let share = first.iter().filter(|o| **o == i).count();
            assert!(
                (50..=150).contains(&share),
                "endpoint {i} owns {share} of 300"
            );
        }
        // Without endpoint 2, only its URLs move.
        for (key, was) in keys.iter().zip(&first) {
            let now = owner(&three, key, &[2]);
            if *was != 2 {
                assert_eq!(now, *was, "{key} moved though its endpoint stayed");
            } else {
                assert_ne!(now, 2);
            }
        }
    }

    #[test]
    fn a_new_endpoint_set_keeps_what_was_known_of_the_old_endpoints() {
        let mut old = balancer(2, LbPolicy::RoundRobin);
        old.outlier = OutlierDetection {
            consecutive_failures: 2,
            base_ejection_time: Duration::from_secs(60),
            max_ejection_percent: 100,
        };
        old.record(0, true);
        assert!(old.record(0, true), "endpoint 0 ejected");
        let fresh = balancer(3, LbPolicy::RoundRobin);
        fresh.inherit(&old);
        // 10.0.0.0 stays out of rotation; the others, old and new, share the traffic.
        let picked: Vec<usize> = (0..30)
            .map(|_| fresh.pick(b"", &[]).unwrap().index)
            .collect();
        assert!(!picked.contains(&0), "{picked:?}");
        assert!(picked.contains(&1) && picked.contains(&2));
        let snapshot = fresh.snapshot();
        assert_eq!(snapshot[0]["healthy"], false, "{snapshot:?}");
        assert_eq!(snapshot[0]["failures"], 2);
    }

    #[test]
    fn least_request_prefers_the_idle_endpoint() {
        let two = balancer(2, LbPolicy::LeastRequest);
        // Ten requests in flight on endpoint 0.
        let busy: Vec<Pick<'_>> = (0..10).map(|_| two.pick(b"", &[1]).unwrap()).collect();
        assert!(busy.iter().all(|p| p.index == 0));
        let to_idle = (0..200)
            .filter(|_| two.pick(b"", &[]).unwrap().index == 1)
            .count();
        // Two random draws: only when both land on the busy one does it win (about 1 in 4).
        assert!(to_idle > 120, "{to_idle} of 200 went to the idle endpoint");
    }

    #[test]
    fn failures_in_a_row_eject_for_a_growing_time_within_the_cap() {
        let mut b = balancer(4, LbPolicy::RoundRobin);
        b.outlier = OutlierDetection {
            consecutive_failures: 3,
            base_ejection_time: Duration::from_secs(10),
            max_ejection_percent: 50,
        };
        // A success resets the count.
        assert!(!b.record(0, true));
        assert!(!b.record(0, true));
        assert!(!b.record(0, false));
        assert!(!b.record(0, true));
        assert!(!b.record(0, true));
        assert!(b.record(0, true), "third failure in a row");
        for _ in 0..20 {
            assert_ne!(
                b.pick(b"", &[]).unwrap().index,
                0,
                "ejected endpoints get no traffic"
            );
        }
        // 50% of four: a second endpoint may go, a third may not.
        for _ in 0..3 {
            b.record(1, true);
        }
        for _ in 0..3 {
            assert!(!b.record(2, true), "over max_ejection_percent");
        }
        let snapshot = b.snapshot();
        assert_eq!(snapshot[0]["healthy"], false);
        assert_eq!(snapshot[2]["healthy"], true);
        // Everything ejected: traffic still flows (to any endpoint) rather than failing.
        let all_out = balancer(1, LbPolicy::Random);
        assert!(all_out.pick(b"", &[]).is_some());
    }
}

#[cfg(test)]
mod weighted {
    use super::*;

    fn weighted(weights: &[u32], policy: LbPolicy) -> Balancer {
        let endpoints = weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let display = format!("10.0.1.{i}:80");
                (display.parse().unwrap(), Arc::from(display), *w)
            })
            .collect();
        Balancer::new(endpoints, policy, OutlierDetection::default())
    }

    #[test]
    fn round_robin_follows_weights_smoothly() {
        let b = weighted(&[3, 1], LbPolicy::RoundRobin);
        let picks: Vec<usize> = (0..8).map(|_| b.pick(b"", &[]).unwrap().index).collect();
        assert_eq!(picks.iter().filter(|i| **i == 0).count(), 6);
        // Spread out: the light endpoint never waits more than three turns.
        assert_eq!(picks, [0, 0, 1, 0, 0, 0, 1, 0]);
    }

    #[test]
    fn random_and_ring_hash_follow_weights() {
        for policy in [LbPolicy::Random, LbPolicy::RingHash] {
            let b = weighted(&[4, 1], policy);
            let heavy = (0..1000)
                .filter(|k| b.pick(format!("key-{k}").as_bytes(), &[]).unwrap().index == 0)
                .count();
            assert!((700..=900).contains(&heavy), "{policy:?}: {heavy} of 1000");
        }
    }
}

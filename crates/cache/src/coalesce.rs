//! Request coalescing: one origin fetch per key at a time; other requests for the key wait
//! (bounded in number and time) and then read what the fetch stored.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;

use crate::key::Key;

struct Fill {
    done: watch::Sender<bool>,
    waiters: AtomicUsize,
}

#[derive(Clone)]
pub struct Coalescer {
    inflight: Arc<Mutex<HashMap<Key, Arc<Fill>>>>,
    max_waiters: usize,
}

pub enum Join {
    /// This request fetches; others wait until the guard drops.
    Leader(FillGuard),
    /// Another request is fetching this key.
    Follower(FillWaiter),
    /// Too many are already waiting: fetch without coalescing.
    Overflow,
}

/// Held by the request filling a key. Dropping it (stored, not storable, failed or aborted)
/// wakes every waiter, so a failed fill never strands them.
pub struct FillGuard {
    inflight: Arc<Mutex<HashMap<Key, Arc<Fill>>>>,
    key: Key,
    fill: Arc<Fill>,
}

impl Drop for FillGuard {
    fn drop(&mut self) {
        {
            let mut map = self.inflight.lock();
            if map
                .get(&self.key)
                .is_some_and(|f| Arc::ptr_eq(f, &self.fill))
            {
                map.remove(&self.key);
            }
        }
        self.fill.done.send_replace(true);
    }
}

pub struct FillWaiter {
    done: watch::Receiver<bool>,
    fill: Arc<Fill>,
}

/// Counted out on drop, so a waiter whose request is cancelled mid-wait frees its place.
impl Drop for FillWaiter {
    fn drop(&mut self) {
        self.fill.waiters.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The wait ended without the fill finishing in time.
#[derive(Debug)]
pub struct WaitTimedOut;

impl FillWaiter {
    pub async fn wait(mut self, timeout: Duration) -> Result<(), WaitTimedOut> {
        let result = tokio::time::timeout(timeout, self.done.wait_for(|done| *done)).await;
        match result {
            // A closed channel means the leader is gone: stop waiting either way.
            Ok(_) => Ok(()),
            Err(_) => Err(WaitTimedOut),
        }
    }
}

impl Coalescer {
    pub fn new(max_waiters: usize) -> Coalescer {
        Coalescer {
            inflight: Arc::default(),
            max_waiters,
        }
    }

    pub fn join(&self, key: &Key) -> Join {
        let mut map = self.inflight.lock();
        if let Some(fill) = map.get(key) {
            if fill.waiters.fetch_add(1, Ordering::Relaxed) >= self.max_waiters {
                fill.waiters.fetch_sub(1, Ordering::Relaxed);
                return Join::Overflow;
            }
            return Join::Follower(FillWaiter {
                done: fill.done.subscribe(),
                fill: fill.clone(),
            });
        }
        let (done, _) = watch::channel(false);
        let fill = Arc::new(Fill {
            done,
            waiters: AtomicUsize::new(0),
        });
        map.insert(key.clone(), fill.clone());
        Join::Leader(FillGuard {
            inflight: self.inflight.clone(),
            key: key.clone(),
            fill,
        })
    }

    pub fn in_flight(&self) -> usize {
        self.inflight.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::{KeyRules, RequestTarget};
    use http::HeaderMap;

    fn key() -> Key {
        let h = HeaderMap::new();
        Key::primary(
            &RequestTarget {
                scheme: "http",
                host: "a",
                path: "/",
                query: None,
                headers: &h,
            },
            &KeyRules::default(),
        )
    }

    #[tokio::test]
    async fn followers_wake_when_leader_drops() {
        let c = Coalescer::new(10);
        let Join::Leader(guard) = c.join(&key()) else {
            panic!("first is leader")
        };
        let Join::Follower(w) = c.join(&key()) else {
            panic!("second follows")
        };
        let waiting = tokio::spawn(w.wait(Duration::from_secs(5)));
        drop(guard);
        waiting.await.unwrap().unwrap();
        assert_eq!(c.in_flight(), 0);
        assert!(matches!(c.join(&key()), Join::Leader(_)));
    }

    #[tokio::test]
    async fn waiters_are_bounded() {
        let c = Coalescer::new(1);
        let _leader = c.join(&key());
        let _w = c.join(&key());
        assert!(matches!(c.join(&key()), Join::Overflow));
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_is_bounded_in_time() {
        let c = Coalescer::new(1);
        let _leader = c.join(&key());
        let Join::Follower(w) = c.join(&key()) else {
            panic!()
        };
        assert!(w.wait(Duration::from_secs(1)).await.is_err());
    }
}

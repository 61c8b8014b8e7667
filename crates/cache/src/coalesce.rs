//! Request coalescing: one origin fetch per key at a time; other requests for the key wait
//! (bounded in number and time) and then read what the fetch stored, or read its body along
//! as it arrives once the fetch offers it ([`FillGuard::offer`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;

use crate::key::Key;
use crate::stream::FillStream;

struct Fill {
    /// Made by the first to need it: a waiter joining, or the fill offering its body. Most
    /// fills have neither, and a channel cost an allocation and, dropped, a wake-up through its
    /// eight notify lists (700 instructions of a 1 KiB fill's 53k, callgrind `fill1k`).
    done: OnceLock<watch::Sender<Progress>>,
    waiters: AtomicUsize,
}

impl Fill {
    fn done(&self) -> &watch::Sender<Progress> {
        self.done
            .get_or_init(|| watch::channel(Progress::default()).0)
    }
}

/// How far a fill has come, as its waiters see it.
#[derive(Clone, Default)]
struct Progress {
    /// Its body, offered to read along.
    stream: Option<Arc<FillStream>>,
    /// Stored, not storable, failed or abandoned: a lookup now tells which.
    done: bool,
    /// Over before the origin answered (its request cancelled, the origin unreachable): the
    /// waiters may try again among themselves.
    abandoned: bool,
}

/// The fills in flight by key. foldhash (seeded per process), not SipHash: a key is hashed
/// twice per miss, where SipHash cost 250 instructions a time. The keys are the clients'
/// URLs; the seed is unknown to them, and the worst a collision does is slow the misses of
/// one process (the hit-for-pass table takes the same risk).
type InFlight = HashMap<Key, Arc<Fill>, foldhash::fast::RandomState>;

#[derive(Clone)]
pub struct Coalescer {
    inflight: Arc<Mutex<InFlight>>,
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
    inflight: Arc<Mutex<InFlight>>,
    key: Key,
    fill: Arc<Fill>,
    answered: bool,
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
        // Waiters join under the map's lock, and this fill has left the map: none counted now
        // means none to wake, ever (most fills; a send wakes through eight lists).
        if self.fill.waiters.load(Ordering::Relaxed) == 0 {
            return;
        }
        let abandoned = !self.answered;
        self.fill.done().send_modify(|p| {
            p.done = true;
            p.abandoned = abandoned;
        });
    }
}

impl FillGuard {
    /// The origin answered: however the fill ends now, its waiters will not try again.
    pub fn answered(&mut self) {
        self.answered = true;
    }

    /// Lets the requests waiting on this fill read its body as it arrives.
    pub fn offer(&self, stream: Arc<FillStream>) {
        self.fill.done().send_modify(|p| p.stream = Some(stream));
    }
}

pub struct FillWaiter {
    done: watch::Receiver<Progress>,
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

/// What a waiter found: the fill over, or its body offered to read along.
pub enum Waited {
    Done,
    /// Over before the origin answered ([`FillGuard::answered`] never called).
    Abandoned,
    Streaming(Arc<FillStream>),
}

impl Progress {
    fn ended(&self) -> Waited {
        if self.abandoned {
            Waited::Abandoned
        } else {
            Waited::Done
        }
    }
}

impl FillWaiter {
    /// Waits for the fill to end, or to offer its body while still running.
    pub async fn wait_for_stream(&mut self, timeout: Duration) -> Result<Waited, WaitTimedOut> {
        let found = tokio::time::timeout(
            timeout,
            self.done.wait_for(|p| p.done || p.stream.is_some()),
        )
        .await;
        match found {
            Ok(Ok(progress)) if !progress.done => match &progress.stream {
                Some(stream) => Ok(Waited::Streaming(stream.clone())),
                None => Ok(Waited::Done),
            },
            Ok(Ok(progress)) => Ok(progress.ended()),
            // The leader is gone (a closed channel): a lookup tells.
            Ok(Err(_)) => Ok(Waited::Done),
            Err(_) => Err(WaitTimedOut),
        }
    }

    /// Waits for the fill to end: [`Waited::Done`] or [`Waited::Abandoned`].
    pub async fn wait(mut self, timeout: Duration) -> Result<Waited, WaitTimedOut> {
        let result = tokio::time::timeout(timeout, self.done.wait_for(|p| p.done)).await;
        match result {
            Ok(Ok(progress)) => Ok(progress.ended()),
            // A closed channel means the leader is gone: stop waiting either way.
            Ok(Err(_)) => Ok(Waited::Done),
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
                done: fill.done().subscribe(),
                fill: fill.clone(),
            });
        }
        let fill = Arc::new(Fill {
            done: OnceLock::new(),
            waiters: AtomicUsize::new(0),
        });
        map.insert(key.clone(), fill.clone());
        Join::Leader(FillGuard {
            inflight: self.inflight.clone(),
            key: key.clone(),
            fill,
            answered: false,
        })
    }

    /// The fills in flight and the requests waiting on them (readers along included): a queue
    /// that grows while the origin is slow. One lock, so the two agree.
    pub fn snapshot(&self) -> (usize, usize) {
        let map = self.inflight.lock();
        let waiting = map
            .values()
            .map(|fill| fill.waiters.load(Ordering::Relaxed))
            .sum();
        (map.len(), waiting)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::key::{KeyRules, RequestTarget};
    use http::HeaderMap;

    /// The key of `http://a/`, for the tests of what is kept per key.
    pub(crate) fn key() -> Key {
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
        let waited = waiting.await.unwrap().unwrap();
        assert!(matches!(waited, Waited::Abandoned), "no answer came");
        assert_eq!(c.snapshot(), (0, 0));
        assert!(matches!(c.join(&key()), Join::Leader(_)));
    }

    #[tokio::test]
    async fn a_fill_the_origin_answered_is_not_abandoned() {
        let c = Coalescer::new(10);
        let Join::Leader(mut guard) = c.join(&key()) else {
            panic!("first is leader")
        };
        let Join::Follower(w) = c.join(&key()) else {
            panic!("second follows")
        };
        assert_eq!(c.snapshot(), (1, 1));
        guard.answered();
        drop(guard);
        assert!(matches!(
            w.wait(Duration::from_secs(5)).await.unwrap(),
            Waited::Done
        ));
        assert_eq!(c.snapshot(), (0, 0));
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

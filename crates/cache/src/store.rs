//! The memory store of one resource type: a byte-budgeted S3-FIFO cache (quick_cache) plus the
//! invalidation index that lets a purge find every variant of a host and path.
//!
//! Lock order is always cache shard → index: eviction callbacks run under a shard lock and take
//! the index lock, so nothing here calls into the cache while holding the index lock.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, StatusCode};
use parking_lot::Mutex;
use quick_cache::sync::Cache as QuickCache;
use quick_cache::{Lifecycle, OptionsBuilder, Weighter};

use crate::freshness::Freshness;
use crate::key::{Key, host_without_port};

/// Bytes charged per object beyond key, header and body bytes: the entry and its `Arc`s, the
/// `HeaderMap` structure, the purge-index entry, the cache slot, and allocator rounding.
/// Measured, not guessed: a 200,000-key fill of 1 KiB objects used ~3.2 KB of RSS per stored
/// object against ~1.6 KB counted with a 256-byte allowance, so budgets were overshot ~2×.
const ENTRY_OVERHEAD: u64 = 1536;
/// Per header line: the map entry, the separately allocated name (when not a standard one) and
/// value buffers.
const HEADER_OVERHEAD: usize = 64;

#[derive(Debug)]
pub struct StoredResponse {
    pub status: StatusCode,
    /// Headers as served to clients (hop-by-hop and Age removed).
    pub headers: HeaderMap,
    /// Shared with every hit: serving never copies the body.
    pub body: Bytes,
    pub freshness: Freshness,
    /// Fields named by `no-cache="…"`: left out of responses served without revalidation.
    pub no_cache_fields: Vec<HeaderName>,
    id: u64,
    weight: u64,
}

impl StoredResponse {
    pub fn new(status: StatusCode, headers: HeaderMap, body: Bytes, freshness: Freshness) -> Self {
        let header_bytes: usize = headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + HEADER_OVERHEAD)
            .sum();
        let weight = ENTRY_OVERHEAD + header_bytes as u64 + body.len() as u64;
        StoredResponse {
            status,
            headers,
            body,
            freshness,
            no_cache_fields: Vec::new(),
            id: next_id(),
            weight,
        }
    }

    /// Bytes this object costs against its resource type's budget, key excluded.
    pub fn weight(&self) -> u64 {
        self.weight
    }
}

/// What a key holds: a response, or (at a primary key) the `Vary` rule selecting among variants.
// Entries already live behind one `Arc`; boxing the big variant would add a second pointer
// chase to every hit to save bytes only on the rare `Vary` markers.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Entry {
    Response(StoredResponse),
    Variants(Vec<HeaderName>),
}

#[derive(Debug)]
pub struct Slot {
    pub(crate) entry: Entry,
    id: u64,
}

impl Slot {
    pub(crate) fn new(entry: Entry) -> Arc<Slot> {
        let id = match &entry {
            Entry::Response(r) => r.id,
            Entry::Variants(_) => next_id(),
        };
        Arc::new(Slot { entry, id })
    }
}

fn next_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

#[derive(Clone)]
struct SlotWeighter;

impl Weighter<Key, Arc<Slot>> for SlotWeighter {
    fn weight(&self, key: &Key, slot: &Arc<Slot>) -> u64 {
        let entry = match &slot.entry {
            Entry::Response(r) => r.weight,
            Entry::Variants(names) => ENTRY_OVERHEAD + names.len() as u64 * 32,
        };
        key.len() as u64 + entry
    }
}

/// Keys grouped by (host without port, path), each with the id of the slot indexed, so an
/// eviction of an old slot never unindexes a newer one stored under the same key.
/// (host without port, path): what a purge names.
type PurgeTarget = (Box<str>, Box<str>);

#[derive(Default)]
struct PurgeIndex {
    by_target: Mutex<HashMap<PurgeTarget, HashMap<Key, u64>>>,
}

impl PurgeIndex {
    fn target(key: &Key) -> PurgeTarget {
        (host_without_port(key.host()).into(), key.path().into())
    }

    fn add(&self, key: &Key, id: u64) {
        self.by_target
            .lock()
            .entry(Self::target(key))
            .or_default()
            .insert(key.clone(), id);
    }

    fn remove(&self, key: &Key, id: u64) {
        let mut map = self.by_target.lock();
        let target = Self::target(key);
        if let Some(keys) = map.get_mut(&target) {
            if keys.get(key) == Some(&id) {
                keys.remove(key);
            }
            if keys.is_empty() {
                map.remove(&target);
            }
        }
    }

    fn take(&self, host: &str, path: &str, mut keep: impl FnMut(&Key) -> bool) -> Vec<Key> {
        let mut map = self.by_target.lock();
        let target: PurgeTarget = (host_without_port(host).into(), path.into());
        let Some(keys) = map.get_mut(&target) else {
            return Vec::new();
        };
        let mut taken = Vec::new();
        keys.retain(|k, _| {
            if keep(k) {
                true
            } else {
                taken.push(k.clone());
                false
            }
        });
        if keys.is_empty() {
            map.remove(&target);
        }
        taken
    }

    fn len(&self) -> usize {
        self.by_target.lock().values().map(HashMap::len).sum()
    }

    /// Keys stored as `Vary` variants of `primary`, oldest first (ids grow with time).
    fn variants_of(&self, primary: &Key) -> Vec<Key> {
        let prefix = format!("{}\0v", primary.as_str());
        let mut variants: Vec<(u64, Key)> = self
            .by_target
            .lock()
            .get(&Self::target(primary))
            .map(|keys| {
                keys.iter()
                    .filter(|(k, _)| k.as_str().starts_with(&prefix))
                    .map(|(k, id)| (*id, k.clone()))
                    .collect()
            })
            .unwrap_or_default();
        variants.sort_unstable_by_key(|(id, _)| *id);
        variants.into_iter().map(|(_, k)| k).collect()
    }
}

#[derive(Clone)]
struct IndexLifecycle {
    index: Arc<PurgeIndex>,
    evictions: Arc<AtomicU64>,
}

impl Lifecycle<Key, Arc<Slot>> for IndexLifecycle {
    type RequestState = ();

    fn on_evict(&self, _state: &mut (), key: Key, slot: Arc<Slot>) {
        self.index.remove(&key, slot.id);
        if matches!(slot.entry, Entry::Response(_)) {
            self.evictions.fetch_add(1, Ordering::Relaxed);
        }
    }
}

pub struct MemoryStore {
    cache:
        QuickCache<Key, Arc<Slot>, SlotWeighter, quick_cache::DefaultHashBuilder, IndexLifecycle>,
    index: Arc<PurgeIndex>,
    evictions: Arc<AtomicU64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreStats {
    pub objects: u64,
    pub bytes: u64,
    pub capacity_bytes: u64,
    pub evictions: u64,
}

impl MemoryStore {
    /// `max_object_size` sizes the shards: each shard must hold several of the largest objects,
    /// or quick_cache would reject them outright.
    pub fn new(capacity_bytes: u64, max_object_size: u64) -> MemoryStore {
        let per_shard_floor = max_object_size.saturating_mul(4).max(1 << 20);
        let shards = (capacity_bytes / per_shard_floor).clamp(1, 64) as usize;
        let estimated_items = (capacity_bytes / 8192).clamp(64, 1 << 22) as usize;
        let options = OptionsBuilder::new()
            .weight_capacity(capacity_bytes)
            .estimated_items_capacity(estimated_items)
            .shards(shards)
            .build()
            .expect("valid quick_cache options");
        let index = Arc::new(PurgeIndex::default());
        let evictions = Arc::new(AtomicU64::new(0));
        let lifecycle = IndexLifecycle {
            index: index.clone(),
            evictions: evictions.clone(),
        };
        MemoryStore {
            cache: QuickCache::with_options(options, SlotWeighter, Default::default(), lifecycle),
            index,
            evictions,
        }
    }

    pub(crate) fn get(&self, key: &Key) -> Option<Arc<Slot>> {
        self.cache.get(key)
    }

    pub(crate) fn insert(&self, key: Key, slot: Arc<Slot>) {
        // Index first: if the insert is rejected or evicts at once, the callback unindexes it.
        self.index.add(&key, slot.id);
        self.cache.insert(key, slot);
    }

    /// Removes keys under (host, path) for which `select` holds; returns how many responses
    /// (not `Vary` markers) were removed.
    pub fn purge(&self, host: &str, path: &str, mut select: impl FnMut(&Key) -> bool) -> usize {
        let host_has_port = host != host_without_port(host);
        let keys = self.index.take(host, path, |k| {
            let host_matches = !host_has_port || k.host() == host;
            !(host_matches && select(k))
        });
        keys.iter()
            .filter_map(|k| self.cache.remove(k))
            .filter(|(_, slot)| matches!(slot.entry, Entry::Response(_)))
            .count()
    }

    /// Removes `key` only if it still holds `slot` (a concurrent fill may have replaced it).
    pub(crate) fn remove_slot(&self, key: &Key, slot: &Arc<Slot>) {
        if let Some((k, removed)) = self.cache.remove_if(key, |s| Arc::ptr_eq(s, slot)) {
            self.index.remove(&k, removed.id);
        }
    }

    pub(crate) fn remove(&self, key: &Key) {
        if let Some((k, slot)) = self.cache.remove(key) {
            self.index.remove(&k, slot.id);
        }
    }

    pub fn stats(&self) -> StoreStats {
        StoreStats {
            objects: self.cache.len() as u64,
            bytes: self.cache.weight(),
            capacity_bytes: self.cache.capacity(),
            evictions: self.evictions.load(Ordering::Relaxed),
        }
    }

    /// Makes room for one more `Vary` variant of `primary`, dropping the oldest past `max`.
    pub(crate) fn cap_variants(&self, primary: &Key, max: usize) {
        let variants = self.index.variants_of(primary);
        let excess = (variants.len() + 1).saturating_sub(max);
        for key in variants.iter().take(excess) {
            self.remove(key);
        }
    }

    /// Number of keys in the invalidation index (for leak checks).
    pub fn indexed_keys(&self) -> usize {
        self.index.len()
    }
}

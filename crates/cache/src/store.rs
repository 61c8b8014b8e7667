//! The memory store of one resource type: a byte-budgeted S3-FIFO cache (quick_cache) plus the
//! invalidation index that lets a purge find every variant of a host and path.
//!
//! Lock order is always index → cache shard: evictions are collected under the shard lock and
//! unindexed after it is released.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::{HeaderName, StatusCode};
use parking_lot::Mutex;
use quick_cache::sync::Cache as QuickCache;
use quick_cache::{Lifecycle, OptionsBuilder, Weighter};

use crate::fields::StoredHeaders;
use crate::freshness::Freshness;
use crate::key::Key;

/// Bytes charged per object beyond key, header and body bytes: the entry and its `Arc`s, the
/// `HeaderMap` structure, the purge-index entry, the cache slot, and allocator rounding.
/// Measured, not guessed: a 200,000-key fill of 1 KiB objects used ~3.2 KB of RSS per stored
/// object against ~1.6 KB counted with a 256-byte allowance, so budgets were overshot ~2×.
const ENTRY_OVERHEAD: u64 = 1536;
/// Per header line: the map entry, the separately allocated name (when not a standard one) and
/// value buffers.
const HEADER_OVERHEAD: usize = 64;
/// Per tag: its string and the tag index's entry for the object.
const TAG_OVERHEAD: usize = 96;

#[derive(Debug)]
pub struct StoredResponse {
    pub status: StatusCode,
    /// Headers as served to clients (hop-by-hop and Age removed).
    pub headers: StoredHeaders,
    /// Shared with every hit: serving never copies the body.
    pub body: Bytes,
    pub freshness: Freshness,
    /// Fields named by `no-cache="…"`: left out of responses served without revalidation.
    pub no_cache_fields: Vec<HeaderName>,
    /// Surrogate keys (`Surrogate-Key`, `Cache-Tag`): what tag purges name.
    pub tags: Box<[Arc<str>]>,
    /// The body's length, ready to send: every full hit needs it.
    pub content_length: http::HeaderValue,
    id: u64,
    weight: u64,
}

impl StoredResponse {
    pub fn new(
        status: StatusCode,
        headers: StoredHeaders,
        body: Bytes,
        freshness: Freshness,
        tags: Box<[Arc<str>]>,
    ) -> Self {
        let header_bytes = headers.byte_len() + headers.len() * HEADER_OVERHEAD;
        let tag_bytes: usize = tags.iter().map(|t| t.len() + TAG_OVERHEAD).sum();
        let weight = ENTRY_OVERHEAD + (header_bytes + tag_bytes) as u64 + body.len() as u64;
        StoredResponse {
            status,
            headers,
            freshness,
            no_cache_fields: Vec::new(),
            tags,
            content_length: http::HeaderValue::from(body.len()),
            body,
            id: next_id(),
            weight,
        }
    }

    /// The same response (body shared), under a new identity: what a soft purge stores.
    pub fn with_freshness(&self, freshness: Freshness) -> StoredResponse {
        StoredResponse {
            status: self.status,
            headers: self.headers.clone(),
            body: self.body.clone(),
            freshness,
            no_cache_fields: self.no_cache_fields.clone(),
            tags: self.tags.clone(),
            content_length: self.content_length.clone(),
            id: next_id(),
            weight: self.weight,
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

impl Slot {
    /// The tags purges can find this slot by (none for `Vary` markers).
    pub(crate) fn tags(&self) -> &[Arc<str>] {
        match &self.entry {
            Entry::Response(r) => &r.tags,
            Entry::Variants(_) => &[],
        }
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

/// A path of one host, as the index finds it: hashed and compared by the path's bytes, which
/// lie within `key` (the first key stored under the path), so indexing a path allocates nothing.
#[derive(Clone)]
struct PathOf {
    key: Key,
    span: (u32, u32),
}

impl PathOf {
    /// `path` lies within `key` (or is empty).
    fn new(key: Key, path: &str) -> PathOf {
        // An absent path is a `""` from elsewhere: its place in the key is no place.
        let span = if path.is_empty() {
            (0, 0)
        } else {
            let start = path.as_ptr() as usize - key.as_str().as_ptr() as usize;
            (start as u32, (start + path.len()) as u32)
        };
        PathOf { key, span }
    }

    fn path(&self) -> &str {
        &self.key.as_str()[self.span.0 as usize..self.span.1 as usize]
    }
}

impl std::hash::Hash for PathOf {
    // As the `str` hashes: the map is searched by `&str` (`Borrow`).
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.path().hash(state);
    }
}

impl PartialEq for PathOf {
    fn eq(&self, other: &Self) -> bool {
        self.path() == other.path()
    }
}

impl Eq for PathOf {}

impl std::borrow::Borrow<str> for PathOf {
    fn borrow(&self) -> &str {
        self.path()
    }
}

/// The keys stored under one path (with their slot ids): usually one; more with queries or
/// `Vary` variants, then ordered, since a path may gather very many (`/search?q=…`, or a
/// client busting the cache with queries) and a fill or an eviction must not read them all;
/// a key's variants sort right after it, so [`Index::variants_of`] reads only those.
enum PathKeys {
    One(Key, u64),
    Many(BTreeMap<Key, u64>),
}

impl PathKeys {
    fn iter(&self) -> impl Iterator<Item = (&Key, u64)> {
        let (one, many) = match self {
            PathKeys::One(key, id) => (Some((key, *id)), None),
            PathKeys::Many(keys) => (None, Some(keys.iter().map(|(k, id)| (k, *id)))),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }

    /// The keys from `first` on, in order.
    fn from<'a>(&'a self, first: &Key) -> impl Iterator<Item = (&'a Key, u64)> {
        let (one, many) = match self {
            PathKeys::One(key, id) => ((key >= first).then_some((key, *id)), None),
            PathKeys::Many(keys) => (
                None,
                Some(keys.range(first.clone()..).map(|(k, id)| (k, *id))),
            ),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }

    fn len(&self) -> usize {
        match self {
            PathKeys::One(..) => 1,
            PathKeys::Many(keys) => keys.len(),
        }
    }

    /// Any one of the keys.
    fn any(&self) -> &Key {
        match self {
            PathKeys::One(key, _) => key,
            // Never empty: one left becomes `One`.
            PathKeys::Many(keys) => keys.keys().next().expect("a path's keys are never empty"),
        }
    }

    /// Indexes `key` as held by slot `id` (a newer slot under a key replaces the old one's).
    fn set(&mut self, key: &Key, id: u64) {
        match self {
            PathKeys::One(k, old) if k == key => *old = id,
            PathKeys::One(k, old) => {
                *self = PathKeys::Many(BTreeMap::from([(k.clone(), *old), (key.clone(), id)]));
            }
            PathKeys::Many(keys) => {
                keys.insert(key.clone(), id);
            }
        }
    }

    /// Unindexes `key` if slot `id` is the one indexed under it (not a newer slot's entry);
    /// returns whether no key is left.
    fn remove(&mut self, key: &Key, id: u64) -> bool {
        match self {
            PathKeys::One(k, held) => k == key && *held == id,
            PathKeys::Many(keys) => {
                if keys.get(key) == Some(&id) {
                    keys.remove(key);
                }
                if keys.len() == 1
                    && let Some((k, id)) = keys.pop_first()
                {
                    *self = PathKeys::One(k, id);
                }
                false
            }
        }
    }
}

/// Which stored objects a purge names, within one store.
pub enum Selection<'a> {
    /// One host and path; `select` picks among its keys (a port, a query).
    Url {
        host: &'a str,
        path: &'a str,
        select: &'a dyn Fn(&Key) -> bool,
    },
    /// Every path of the host starting with `prefix`.
    Prefix { host: &'a str, prefix: &'a str },
    /// Every object whose response carried this tag.
    Tag(&'a str),
}

/// Where each stored key can be found by a purge: by host (without port), then by path, and
/// by tag. Both levels are hashed (foldhash, seeded per map): an insert and an eviction each
/// cost two or three hashes, where an ordered map of paths cost a few dozen path comparisons (paths
/// share long beginnings, so most read the strings: 2.5k instructions per fill, callgrind
/// `fill1k`). A prefix purge reads every path of its host instead of a range, under the
/// index lock: 40–65 ns a path (a cache miss each; `cargo bench -p larder-cache -- purge`),
/// so 4–6 ms for a host of 100,000 objects, during which this store's fills wait. Purges are rare
/// where fills are not, and the peers' prefix purges scan too (Varnish bans, nginx's
/// wildcard purge). Every entry carries the id of the slot it indexes, so
/// removing the entry of an old slot never unindexes a newer one stored under the same key,
/// and a purge never removes an object stored after it looked.
#[derive(Default)]
struct Index {
    hosts: HashMap<Box<str>, PathMap, foldhash::fast::RandomState>,
    tags: HashMap<Arc<str>, HashMap<Key, u64>>,
}

type PathMap = HashMap<PathOf, PathKeys, foldhash::fast::RandomState>;

impl Index {
    fn add(&mut self, key: &Key, slot: &Slot) {
        let (host, path) = key.purge_target();
        let paths = match self.hosts.get_mut(host) {
            Some(paths) => paths,
            None => self.hosts.entry(host.into()).or_default(),
        };
        match paths.get_mut(path) {
            Some(keys) => keys.set(key, slot.id),
            None => {
                paths.insert(
                    PathOf::new(key.clone(), path),
                    PathKeys::One(key.clone(), slot.id),
                );
            }
        }
        for tag in slot.tags() {
            self.tags
                .entry(tag.clone())
                .or_default()
                .insert(key.clone(), slot.id);
        }
    }

    fn remove(&mut self, key: &Key, slot: &Slot) {
        let (host, path) = key.purge_target();
        if let Some(paths) = self.hosts.get_mut(host) {
            if let Some(keys) = paths.get_mut(path) {
                if keys.remove(key, slot.id) {
                    paths.remove(path);
                } else if paths
                    .get_key_value(path)
                    .is_some_and(|(p, _)| p.key == *key)
                {
                    // The path's bytes must not keep a key that left alive: re-keyed under
                    // one still there.
                    if let Some((_, keys)) = paths.remove_entry(path) {
                        let still = keys.any().clone();
                        let still_path = still.purge_target().1;
                        paths.insert(PathOf::new(still.clone(), still_path), keys);
                    }
                }
            }
            if paths.is_empty() {
                self.hosts.remove(host);
            }
        }
        for tag in slot.tags() {
            if let Some(keys) = self.tags.get_mut(tag) {
                if keys.get(key) == Some(&slot.id) {
                    keys.remove(key);
                }
                if keys.is_empty() {
                    self.tags.remove(tag);
                }
            }
        }
    }

    /// Keys (with slot ids) under exactly this host and path.
    fn url<'a>(&'a self, host: &str, path: &str) -> impl Iterator<Item = (&'a Key, u64)> + 'a {
        self.hosts
            .get(host)
            .and_then(|paths| paths.get(path))
            .into_iter()
            .flat_map(PathKeys::iter)
    }

    fn select(&self, selection: &Selection<'_>) -> Vec<(Key, u64)> {
        match selection {
            Selection::Url { host, path, select } => self
                .url(host, path)
                .filter(|(k, _)| select(k))
                .map(|(k, id)| (k.clone(), id))
                .collect(),
            Selection::Prefix { host, prefix } => self
                .hosts
                .get(*host)
                .into_iter()
                .flatten()
                .filter(|(path, _)| path.path().starts_with(prefix))
                .flat_map(|(_, keys)| keys.iter())
                .map(|(k, id)| (k.clone(), id))
                .collect(),
            Selection::Tag(tag) => self
                .tags
                .get(*tag)
                .map(|keys| keys.iter().map(|(k, id)| (k.clone(), *id)).collect())
                .unwrap_or_default(),
        }
    }

    fn len(&self) -> usize {
        self.hosts
            .values()
            .flat_map(HashMap::values)
            .map(PathKeys::len)
            .sum()
    }

    /// Keys stored as `Vary` variants of `primary`, oldest first (ids grow with time). They
    /// share its path and sort right after it, so this reads only them, however many other
    /// queries the path has.
    fn variants_of(&self, primary: &Key) -> Vec<Key> {
        let prefix = format!("{}\0v", primary.as_str());
        let (host, path) = primary.purge_target();
        let mut variants: Vec<(u64, Key)> = self
            .hosts
            .get(host)
            .and_then(|paths| paths.get(path))
            .into_iter()
            .flat_map(|keys| keys.from(primary))
            .take_while(|(k, _)| k.as_str().starts_with(primary.as_str()))
            .filter(|(k, _)| k.as_str().starts_with(&prefix))
            .map(|(k, id)| (id, k.clone()))
            .collect();
        variants.sort_unstable_by_key(|(id, _)| *id);
        variants.into_iter().map(|(_, k)| k).collect()
    }
}

/// Collects what an insert evicted, so the index is updated after the cache shard's lock is
/// released (and the evicted bodies are freed outside it).
#[derive(Clone)]
struct DeferEvictions;

impl Lifecycle<Key, Arc<Slot>> for DeferEvictions {
    type RequestState = Vec<(Key, Arc<Slot>)>;

    fn on_evict(&self, evicted: &mut Self::RequestState, key: Key, slot: Arc<Slot>) {
        evicted.push((key, slot));
    }
}

pub struct MemoryStore {
    cache:
        QuickCache<Key, Arc<Slot>, SlotWeighter, quick_cache::DefaultHashBuilder, DeferEvictions>,
    /// Held across every insert, so the index always matches what the cache holds. Lookups
    /// never take it; lock order is index → cache shard.
    index: Mutex<Index>,
    evictions: AtomicU64,
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
        MemoryStore {
            cache: QuickCache::with_options(
                options,
                SlotWeighter,
                Default::default(),
                DeferEvictions,
            ),
            index: Mutex::default(),
            evictions: AtomicU64::new(0),
        }
    }

    pub(crate) fn get(&self, key: &Key) -> Option<Arc<Slot>> {
        self.cache.get(key)
    }

    /// Like `get`, without counting as a use for eviction.
    pub(crate) fn peek(&self, key: &Key) -> Option<Arc<Slot>> {
        self.cache.peek(key)
    }

    pub(crate) fn insert(&self, key: Key, slot: Arc<Slot>) {
        let mut evicted = Vec::new();
        {
            let mut index = self.index.lock();
            self.cache
                .insert_with_lifecycle(key.clone(), slot.clone(), &mut evicted);
            self.reindex(&mut index, &key, &slot, &evicted);
        }
        self.count_evictions(&key, &evicted);
    }

    /// After an insert or replacement: index the new slot, unindex what left (a value replaced
    /// under the same key comes back as evicted too, and so does a slot too heavy to admit).
    fn reindex(
        &self,
        index: &mut Index,
        key: &Key,
        slot: &Arc<Slot>,
        evicted: &[(Key, Arc<Slot>)],
    ) {
        index.add(key, slot);
        for (key, slot) in evicted {
            index.remove(key, slot);
        }
    }

    fn count_evictions(&self, inserted: &Key, evicted: &[(Key, Arc<Slot>)]) {
        // The value a replacement displaced under the same key was not evicted for room.
        let responses = evicted
            .iter()
            .filter(|(k, s)| k != inserted && matches!(s.entry, Entry::Response(_)))
            .count();
        self.evictions
            .fetch_add(responses as u64, Ordering::Relaxed);
    }

    /// The keys a purge names, with the ids of the slots they hold now.
    pub fn select(&self, selection: &Selection<'_>) -> Vec<(Key, u64)> {
        self.index.lock().select(selection)
    }

    /// Removes each key that still holds the slot it held when selected; returns how many
    /// responses (not `Vary` markers) were removed.
    pub fn remove_selected(&self, selected: &[(Key, u64)]) -> usize {
        let mut removed = 0;
        for (key, id) in selected {
            if let Some((key, slot)) = self.cache.remove_if(key, |s| s.id == *id) {
                self.index.lock().remove(&key, &slot);
                removed += usize::from(matches!(slot.entry, Entry::Response(_)));
            }
        }
        removed
    }

    /// Replaces each selected response that still holds its selected slot with what `change`
    /// makes of it (a soft purge: same body, expired freshness), without making it hotter.
    /// Returns how many were changed.
    pub fn replace_selected(
        &self,
        selected: &[(Key, u64)],
        change: impl Fn(&StoredResponse) -> StoredResponse,
    ) -> usize {
        let mut changed = 0;
        for (key, id) in selected {
            let mut evicted = Vec::new();
            {
                // Under the index lock no other insert can slip in between the check and the
                // replacement; a removal can, and then `replace` finds no entry and does nothing.
                let mut index = self.index.lock();
                let Some(slot) = self.cache.peek(key).filter(|s| s.id == *id) else {
                    continue;
                };
                let Entry::Response(stored) = &slot.entry else {
                    continue;
                };
                let new = Slot::new(Entry::Response(change(stored)));
                if self
                    .cache
                    .replace_with_lifecycle(key.clone(), new.clone(), true, &mut evicted)
                    .is_err()
                {
                    // Refused (the key gone meanwhile, or the new slot too heavy): whatever
                    // the attempt displaced leaves the index too.
                    for (key, slot) in &evicted {
                        index.remove(key, slot);
                    }
                    continue;
                }
                self.reindex(&mut index, key, &new, &evicted);
            }
            self.count_evictions(key, &evicted);
            changed += 1;
        }
        changed
    }

    /// Removes `key` only if it still holds `slot` (a concurrent fill may have replaced it).
    pub(crate) fn remove_slot(&self, key: &Key, slot: &Arc<Slot>) {
        if let Some((k, removed)) = self.cache.remove_if(key, |s| Arc::ptr_eq(s, slot)) {
            self.index.lock().remove(&k, &removed);
        }
    }

    pub(crate) fn remove(&self, key: &Key) {
        if let Some((k, slot)) = self.cache.remove(key) {
            self.index.lock().remove(&k, &slot);
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
        let variants = self.index.lock().variants_of(primary);
        let excess = (variants.len() + 1).saturating_sub(max);
        for key in variants.iter().take(excess) {
            self.remove(key);
        }
    }

    /// Number of keys in the invalidation index (for leak checks).
    pub fn indexed_keys(&self) -> usize {
        self.index.lock().len()
    }

    /// Number of (tag, key) pairs in the tag index (for leak checks).
    pub fn indexed_tags(&self) -> usize {
        self.index.lock().tags.values().map(HashMap::len).sum()
    }
}

//! What a purge names ([`Selector`]), how tags are read from responses, and the purge log that
//! lets a purge win over a fill already in flight when it lands.

use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use http::{HeaderMap, HeaderName};
use parking_lot::Mutex;

use crate::key::{self, Key};

/// Which stored responses an invalidation applies to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Selector {
    /// Every variant (every `Vary` variant, key header value and port) of one URL. With a
    /// port in `host`, only that port; with a `query`, only that query as each resource type
    /// normalises it, else every query.
    Url {
        host: String,
        path: String,
        query: Option<String>,
    },
    /// Every URL of the host (any port) whose path starts with `prefix`.
    Prefix { host: String, prefix: String },
    /// Every response that carried this tag in a tag header (`Surrogate-Key`, `Cache-Tag`).
    Tag(String),
}

impl Selector {
    /// Its name in logs and metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Selector::Url { .. } => "url",
            Selector::Prefix { .. } => "prefix",
            Selector::Tag(_) => "tag",
        }
    }
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Selector::Url {
                host,
                path,
                query: Some(q),
            } => write!(f, "{host}{path}?{q}"),
            Selector::Url { host, path, .. } => write!(f, "{host}{path}"),
            Selector::Prefix { host, prefix } => write!(f, "{host}{prefix}*"),
            Selector::Tag(tag) => write!(f, "tag:{tag}"),
        }
    }
}

/// Tags one response may carry; more are ignored (a response cannot flood the tag index).
pub const MAX_TAGS_PER_OBJECT: usize = 256;
/// Longer tags are ignored.
pub const MAX_TAG_LEN: usize = 1024;

/// The tags in a response's tag headers: `Surrogate-Key` separates them with spaces,
/// `Cache-Tag` with commas; both are accepted in either header, as neither may occur in a tag.
/// Deduplicated, in order of appearance.
pub fn response_tags(headers: &HeaderMap, names: &[HeaderName]) -> Box<[Arc<str>]> {
    let mut tags: Vec<Arc<str>> = Vec::new();
    for name in names {
        for value in headers.get_all(name) {
            let Ok(text) = value.to_str() else { continue };
            for tag in text.split(|c: char| c == ',' || c.is_ascii_whitespace()) {
                if tag.is_empty() || tag.len() > MAX_TAG_LEN || tags.iter().any(|t| **t == *tag) {
                    continue;
                }
                if tags.len() == MAX_TAGS_PER_OBJECT {
                    return tags.into();
                }
                tags.push(tag.into());
            }
        }
    }
    tags.into()
}

/// Purges remembered so that a commit can tell whether one named its object after its fetch
/// began (the purge then wins: the fill is not stored).
///
/// URL and tag purges land in a fixed table of generation slots indexed by hash: constant
/// memory and no history to overflow, however many purges (or POSTs, which invalidate too)
/// arrive during a slow fill; a slot shared by two names can only drop a fill needlessly, never
/// keep a purged one. Prefix purges are few and wide: the latest ones are kept in a short list;
/// a fill older than the oldest one forgotten is dropped.
pub(crate) struct PurgeLog {
    generation: AtomicU64,
    slots: Box<[AtomicU64]>,
    hasher: std::collections::hash_map::RandomState,
    prefixes: Mutex<PrefixLog>,
}

#[derive(Default)]
struct PrefixLog {
    /// (generation, host without port, path prefix), oldest first.
    recent: VecDeque<(u64, Box<str>, Box<str>)>,
    /// Generation of the newest entry dropped from `recent`.
    forgotten: u64,
}

/// 512 KiB of slots: even a thousand invalidations during one fill collide with its slot
/// only about 1.5% of the time.
pub(crate) const PURGE_SLOTS: usize = 65_536;
const RECENT_PREFIXES: usize = 256;

impl Default for PurgeLog {
    fn default() -> Self {
        PurgeLog {
            generation: Default::default(),
            slots: (0..PURGE_SLOTS).map(|_| Default::default()).collect(),
            hasher: Default::default(),
            prefixes: Default::default(),
        }
    }
}

impl PurgeLog {
    pub(crate) fn current(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub(crate) fn url_slot(&self, host: &str, path: &str) -> &AtomicU64 {
        let hash = self.hasher.hash_one((key::host_without_port(host), path));
        &self.slots[(hash as usize) % PURGE_SLOTS]
    }

    fn tag_slot(&self, tag: &str) -> &AtomicU64 {
        // The NUL keeps a tag from sharing a hash input with any (host, path).
        let hash = self.hasher.hash_one(("\0tag", tag));
        &self.slots[(hash as usize) % PURGE_SLOTS]
    }

    /// `host` is already normalised.
    pub(crate) fn record(&self, selector: &Selector) {
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        match selector {
            Selector::Url { host, path, .. } => {
                self.url_slot(host, path)
                    .fetch_max(generation, Ordering::AcqRel);
            }
            Selector::Tag(tag) => {
                self.tag_slot(tag).fetch_max(generation, Ordering::AcqRel);
            }
            Selector::Prefix { host, prefix } => {
                let mut log = self.prefixes.lock();
                if log.recent.len() == RECENT_PREFIXES
                    && let Some((dropped, _, _)) = log.recent.pop_front()
                {
                    log.forgotten = dropped;
                }
                log.recent.push_back((
                    generation,
                    key::host_without_port(host).into(),
                    prefix.as_str().into(),
                ));
            }
        }
    }

    /// Whether a purge since generation `since` names this object.
    pub(crate) fn purged_since(&self, since: u64, key: &Key, tags: &[Arc<str>]) -> bool {
        if self.current() == since {
            return false;
        }
        let (host, path) = key.purge_target();
        if self.url_slot(host, path).load(Ordering::Acquire) > since
            || tags
                .iter()
                .any(|t| self.tag_slot(t).load(Ordering::Acquire) > since)
        {
            return true;
        }
        let log = self.prefixes.lock();
        log.forgotten > since
            || log
                .recent
                .iter()
                .rev()
                .take_while(|(generation, _, _)| *generation > since)
                .any(|(_, h, prefix)| **h == *host && path.starts_with(&**prefix))
    }
}

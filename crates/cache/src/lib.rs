#![forbid(unsafe_code)]
//! Larder's HTTP cache engine: keys, freshness, storage with per-resource-type byte budgets,
//! request coalescing and invalidation. It knows nothing of sockets or config files: the proxy
//! hands it request and response heads, bodies as `Bytes`, and the current time.

pub mod coalesce;
pub mod directives;
pub mod fields;
pub mod freshness;
#[doc(hidden)]
pub mod fuzz_checks;
pub mod invalidate;
pub mod key;
pub mod status;
pub mod store;
pub mod stream;

use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{
    AGE, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, ETAG, LAST_MODIFIED, SET_COOKIE,
};
use http::{HeaderMap, HeaderName, Method, StatusCode};
use quick_cache::sync::Cache as QuickCache;

pub use coalesce::{Coalescer, FillGuard, FillWaiter, Join, Waited};
pub use directives::{RequestDirectives, request_directives, response_directives};
pub use fields::{Fields, StoredHeaders, is_field_value};
pub use freshness::{Freshness, FreshnessRules};
use invalidate::PurgeLog;
pub use invalidate::{Selector, response_tags};
pub use key::{Key, KeyRules, QueryMode, RequestTarget};
pub use status::{CacheResult, NoCacheReason};
pub use store::{Entry, MemoryStore, Slot, StoreStats, StoredResponse};
pub use stream::{FillReader, FillStream, FillStreamAborted};

/// Decides which requests and responses belong to a resource type. The proxy implements it from
/// its config; the engine only asks.
pub trait ResourceMatcher: Send + Sync + Debug {
    /// False when the request alone rules this type out (so its store need not be probed).
    fn may_match_request(&self, path: &str) -> bool;
    /// Whether a response to this path with this Content-Type belongs to the type.
    fn matches_response(&self, path: &str, content_type: Option<&str>) -> bool;
}

/// Matches everything: a catch-all resource type.
#[derive(Debug, Default, Clone, Copy)]
pub struct MatchAll;

impl ResourceMatcher for MatchAll {
    fn may_match_request(&self, _: &str) -> bool {
        true
    }
    fn matches_response(&self, _: &str, _: Option<&str>) -> bool {
        true
    }
}

/// What to do with a response that sets a cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SetCookiePolicy {
    /// Store it, Set-Cookie included, when the origin gave explicit freshness (RFC 9111 §3.1).
    Store,
    /// Store it without its Set-Cookie header.
    Strip,
    /// Never store it (the default).
    #[default]
    Bypass,
}

/// One kind of resource with its own policy and memory budget.
#[derive(Debug, Clone)]
pub struct ResourceTypeSpec {
    pub name: String,
    pub matcher: Arc<dyn ResourceMatcher>,
    pub capacity_bytes: u64,
    pub max_object_size: u64,
    pub freshness: FreshnessRules,
    pub key: KeyRules,
    pub set_cookie: SetCookiePolicy,
}

struct ResourceType {
    spec: ResourceTypeSpec,
    /// The name as a shared string: logs and metric labels take it per request.
    label: Arc<str>,
    /// Shared with the cache of the next configuration when this type is unchanged.
    store: Arc<MemoryStore>,
}

impl ResourceType {
    /// With `store` carried over from an earlier configuration, or an empty one of its size.
    fn new(spec: ResourceTypeSpec, store: Option<Arc<MemoryStore>>) -> ResourceType {
        ResourceType {
            store: store.unwrap_or_else(|| {
                Arc::new(MemoryStore::new(spec.capacity_bytes, spec.max_object_size))
            }),
            label: spec.name.as_str().into(),
            spec,
        }
    }
}

#[derive(Debug, Clone)]
pub struct CacheSettings {
    /// Targeted cache-control fields in priority order (RFC 9213); the first present one
    /// replaces Cache-Control. `CDN-Cache-Control` and `Surrogate-Control` by default.
    pub targeted_fields: Vec<HeaderName>,
    /// `Vary` variants kept per URL; a new one past this replaces an old one, so a header
    /// with endless values cannot flood the cache from one URL.
    pub max_variants: usize,
    pub max_coalesced_waiters: usize,
    /// How long a miss for a key that recently proved uncacheable skips coalescing, so
    /// uncacheable URLs never queue behind one another.
    pub hit_for_pass: Duration,
    /// Response headers carrying tags for tag purges.
    pub tag_headers: Vec<HeaderName>,
    /// Store responses without their tag headers (the proxy strips them from every response
    /// too): tags are for this cache, not for clients.
    pub strip_tag_headers: bool,
    /// Errors (4xx, 5xx) may be stored without an origin-given lifetime.
    pub heuristic_errors: bool,
    /// Fields the proxy sets itself on every response it serves (its Cache-Status, the
    /// request's X-Request-Id): stored without them, so a hit can send what is stored as it is.
    pub per_response_fields: Vec<HeaderName>,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            targeted_fields: vec![
                HeaderName::from_static("cdn-cache-control"),
                HeaderName::from_static("surrogate-control"),
            ],
            max_variants: 64,
            max_coalesced_waiters: 1024,
            hit_for_pass: Duration::from_secs(120),
            tag_headers: vec![
                HeaderName::from_static("surrogate-key"),
                HeaderName::from_static("cache-tag"),
            ],
            strip_tag_headers: true,
            heuristic_errors: false,
            per_response_fields: Vec::new(),
        }
    }
}

/// A stored response found for a request.
#[derive(Clone, Debug)]
pub struct Hit {
    pub response: Arc<Slot>,
    pub resource_type: usize,
    /// Primary key (coalescing key for a refresh).
    pub primary: Key,
    /// The exact key the response sits under (primary or variant).
    pub key: Key,
}

impl Hit {
    pub fn stored(&self) -> &StoredResponse {
        match &self.response.entry {
            Entry::Response(r) => r,
            Entry::Variants(_) => unreachable!("a hit always points at a response"),
        }
    }
}

pub enum Lookup {
    Found(Hit),
    /// Nothing stored; `fill_key` is the key that concurrent misses coalesce on. `vary_miss`
    /// when responses for the URL exist but none for this request's `Vary` header values.
    Miss {
        fill_key: Key,
        resource_type: usize,
        vary_miss: bool,
    },
    /// No resource type can hold this request.
    NoResourceType,
}

/// A response accepted for storage, waiting for its body.
#[derive(Debug)]
pub struct Admission {
    resource_type: usize,
    primary: Key,
    variant: Option<(Vec<HeaderName>, Key)>,
    status: StatusCode,
    headers: StoredHeaders,
    freshness: Freshness,
    max_object_size: u64,
    /// Purge generation when the origin was asked.
    generation: u64,
    no_cache_fields: Vec<HeaderName>,
    tags: Box<[Arc<str>]>,
}

impl Admission {
    /// Streamed bodies beyond this are abandoned (the client still gets them).
    pub fn max_object_size(&self) -> u64 {
        self.max_object_size
    }

    pub fn resource_type(&self) -> usize {
        self.resource_type
    }

    /// The body stream coalesced requests may read along, for a response of `content_length`
    /// bytes that will be stored whole: one without `Vary` (a waiter's request could select
    /// another variant) and within `max_object_size` (a larger one is never buffered).
    pub fn stream(&self, content_length: u64) -> Option<Arc<FillStream>> {
        if self.variant.is_some() || content_length > self.max_object_size {
            return None;
        }
        let mut head = StoredResponse::new(
            self.status,
            self.headers.clone(),
            Bytes::new(),
            self.freshness.clone(),
            self.tags.clone(),
        );
        head.no_cache_fields = self.no_cache_fields.clone();
        Some(FillStream::new(
            head,
            content_length,
            self.resource_type,
            self.primary.clone(),
            self.generation,
        ))
    }
}

pub struct Cache {
    types: Vec<ResourceType>,
    coalescer: Coalescer,
    /// Keys are hashes, so an attacker's long unique URLs cost 16 bytes each, not their length.
    hit_for_pass: Arc<QuickCache<u64, SystemTime>>,
    /// Orders purges against commits: a commit checks the purge log and inserts under the
    /// read side; a purge records, then takes the write side once as a barrier, so a purge
    /// always wins over a fill that began before it.
    gate: Arc<parking_lot::RwLock<()>>,
    /// Shared across configurations, so a purge during a reload still beats the fills of the
    /// previous one.
    purges: Arc<PurgeLog>,
    settings: CacheSettings,
}

/// Response headers as stored: without Age (recomputed on every hit), Surrogate-Control (meant
/// for this cache only), the fields `private="…"` keeps out of shared caches, stripped tag
/// fields and the ones the proxy sets per response. Hop-by-hop
/// fields are already gone (the proxy strips them first).
///
fn storable_headers(
    headers: &HeaderMap,
    private_fields: &[HeaderName],
    stripped: &[HeaderName],
    per_response: &[HeaderName],
) -> StoredHeaders {
    StoredHeaders::from_map(headers, |name| {
        !(name == AGE
            || *name == SURROGATE_CONTROL
            || private_fields.contains(name)
            || stripped.contains(name)
            || per_response.contains(name))
    })
}

/// Read by this cache, never forwarded (Edge Architecture Specification).
pub static SURROGATE_CONTROL: HeaderName = HeaderName::from_static("surrogate-control");

impl Cache {
    pub fn new(specs: Vec<ResourceTypeSpec>, settings: CacheSettings) -> Cache {
        let types = specs
            .into_iter()
            .map(|spec| ResourceType::new(spec, None))
            .collect();
        Cache {
            types,
            coalescer: Coalescer::new(settings.max_coalesced_waiters),
            hit_for_pass: Arc::new(QuickCache::new(65_536)),
            gate: Arc::default(),
            purges: Arc::default(),
            settings,
        }
    }

    /// The cache of a new configuration. Resource types `keep` accepts (by name; the caller
    /// checked their definition is unchanged) keep their stored objects; the others start
    /// empty. The purge history and the hit-for-pass memory carry over.
    pub fn reconfigure(
        &self,
        specs: Vec<ResourceTypeSpec>,
        settings: CacheSettings,
        keep: impl Fn(&str) -> bool,
    ) -> Cache {
        let types = specs
            .into_iter()
            .map(|spec| {
                let kept = self
                    .types
                    .iter()
                    .find(|t| t.spec.name == spec.name && keep(&spec.name))
                    .map(|t| t.store.clone());
                ResourceType::new(spec, kept)
            })
            .collect();
        Cache {
            types,
            coalescer: Coalescer::new(settings.max_coalesced_waiters),
            hit_for_pass: self.hit_for_pass.clone(),
            gate: self.gate.clone(),
            purges: self.purges.clone(),
            settings,
        }
    }

    pub fn resource_type_name(&self, idx: usize) -> &str {
        &self.types[idx].spec.name
    }

    pub fn resource_type_label(&self, idx: usize) -> Arc<str> {
        self.types[idx].label.clone()
    }

    pub fn coalescer(&self) -> &Coalescer {
        &self.coalescer
    }

    /// Finds a stored response for the request, fresh or not; freshness is the caller's
    /// next question (see [`Freshness::satisfies`]).
    pub fn lookup(&self, target: &RequestTarget<'_>) -> Lookup {
        let mut first_candidate = None;
        let mut vary_miss = false;
        for (idx, ty) in self.types.iter().enumerate() {
            if !ty.spec.matcher.may_match_request(target.path) {
                continue;
            }
            let primary = Key::primary(target, &ty.spec.key);
            match self.find(idx, &primary, target.headers) {
                Ok(hit) => return Lookup::Found(hit),
                Err(variant_missing) => vary_miss |= variant_missing,
            }
            if first_candidate.is_none() {
                first_candidate = Some((primary, idx));
            }
        }
        match first_candidate {
            Some((fill_key, resource_type)) => Lookup::Miss {
                fill_key,
                resource_type,
                vary_miss,
            },
            None => Lookup::NoResourceType,
        }
    }

    /// `Err(true)` when the URL has variants but not this one.
    fn find(&self, idx: usize, primary: &Key, headers: &HeaderMap) -> Result<Hit, bool> {
        let store = &self.types[idx].store;
        let slot = store.get(primary).ok_or(false)?;
        let (key, slot) = match &slot.entry {
            Entry::Response(_) => (primary.clone(), slot),
            Entry::Variants(names) => {
                let key = primary.variant(names, headers);
                let slot = store.get(&key).ok_or(true)?;
                if !matches!(slot.entry, Entry::Response(_)) {
                    return Err(true);
                }
                (key, slot)
            }
        };
        Ok(Hit {
            response: slot,
            resource_type: idx,
            primary: primary.clone(),
            key,
        })
    }

    /// Whether misses on this key should skip coalescing (recently uncacheable).
    pub fn is_hit_for_pass(&self, key: &Key, now: SystemTime) -> bool {
        self.hit_for_pass
            .get(&key_hash(key))
            .is_some_and(|until| until > now)
    }

    pub fn mark_hit_for_pass(&self, key: &Key, now: SystemTime) {
        self.hit_for_pass
            .insert(key_hash(key), now + self.settings.hit_for_pass);
    }

    /// The purge generation to pass to [`Cache::admit`] / [`Cache::refresh`], read just before
    /// the origin is asked, so a purge landing during the fetch prevents the store.
    pub fn purge_generation(&self) -> u64 {
        self.purges.current()
    }

    /// Whether the request for `target` may read `stream` along. Only when its own key, under
    /// the resource type the response was admitted to, is the one the fill stores under: the
    /// request was coalesced by the key of the first type its path might match, and the
    /// response can land in another type with other key rules (a query kept there, dropped
    /// here). And not when a purge has named the object since the fill asked the origin (the
    /// fill will not be stored; neither is it served).
    pub fn may_read_along(&self, stream: &FillStream, target: &RequestTarget<'_>) -> bool {
        let rules = &self.types[stream.resource_type].spec.key;
        !stream.is_aborted()
            && Key::primary(target, rules) == stream.primary
            && !self
                .purges
                .purged_since(stream.generation, &stream.primary, &stream.head().tags)
    }

    /// Decides whether a response may be stored for this request (RFC 9111 §3) and under which
    /// resource type and key. `headers` must already be free of hop-by-hop fields.
    #[allow(clippy::too_many_arguments)]
    pub fn admit(
        &self,
        method: &Method,
        target: &RequestTarget<'_>,
        status: StatusCode,
        headers: &HeaderMap,
        request_time: SystemTime,
        response_time: SystemTime,
        generation: u64,
    ) -> Result<Admission, NoCacheReason> {
        if method != Method::GET {
            return Err(if method == Method::HEAD {
                NoCacheReason::HeadMiss
            } else {
                NoCacheReason::MethodNotCacheable
            });
        }
        let req_directives = request_directives(target.headers);
        if req_directives.no_store {
            return Err(NoCacheReason::RequestNoStore);
        }
        let mut d =
            directives::effective_response_directives(headers, &self.settings.targeted_fields);
        // §5.2.2.3: must-understand overrides no-store for a status this cache implements.
        let understood = status.canonical_reason().is_some();
        if d.no_store && !(d.must_understand && understood) {
            return Err(NoCacheReason::ResponseNoStore);
        }
        if d.must_understand && !understood {
            return Err(NoCacheReason::StatusNotCacheable);
        }
        if d.private {
            return Err(NoCacheReason::Private);
        }
        // §3.5: a shared cache reuses a response to an authenticated request only when the
        // origin says so explicitly.
        if target.headers.contains_key(AUTHORIZATION)
            && !(d.public || d.must_revalidate || d.s_maxage.is_some())
        {
            return Err(NoCacheReason::Authorization);
        }
        let Some(vary) = key::vary_names(headers) else {
            return Err(NoCacheReason::VaryStar);
        };
        let explicit = d.max_age.is_some()
            || d.s_maxage.is_some()
            || (!d.targeted && headers.contains_key(http::header::EXPIRES));
        // §3: any final status may be stored with explicit freshness or `public`; without them
        // only the heuristically cacheable ones. Partial and not-modified answers never stand
        // for the whole resource.
        let never = status.is_informational()
            || status == StatusCode::PARTIAL_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        if never || !(freshness::heuristically_cacheable(status) || explicit || d.public) {
            return Err(NoCacheReason::StatusNotCacheable);
        }
        // Cache poisoning by denial of service: an error a client can provoke (a header the
        // origin rejects, a method override it honours) is stored only when the origin gave
        // it a lifetime itself, never on a default ttl or a heuristic.
        if (status.is_client_error() || status.is_server_error())
            && !explicit
            && !self.settings.heuristic_errors
        {
            return Err(NoCacheReason::StatusNotCacheable);
        }

        let content_type = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok());
        // Web cache deception: `/account/x.css` reaching the account page. Only a lifetime the
        // origin gave itself lets a page named like a static file be stored as HTML.
        if !explicit && key::html_behind_static_name(target.path, content_type) {
            return Err(NoCacheReason::ContentTypeMismatch);
        }
        let Some(idx) = self
            .types
            .iter()
            .position(|t| t.spec.matcher.matches_response(target.path, content_type))
        else {
            return Err(NoCacheReason::NoResourceType);
        };
        let spec = &self.types[idx].spec;
        if headers.contains_key(SET_COOKIE) && !d.private_fields.contains(&SET_COOKIE) {
            match spec.set_cookie {
                SetCookiePolicy::Bypass => return Err(NoCacheReason::SetCookie),
                SetCookiePolicy::Strip => d.private_fields.push(SET_COOKIE),
                // The RFC stores Set-Cookie like any field; Larder still wants the origin to have
                // said "shareable" explicitly, never a default ttl or a heuristic.
                SetCookiePolicy::Store if !(explicit || d.public) => {
                    return Err(NoCacheReason::SetCookie);
                }
                SetCookiePolicy::Store => {}
            }
        }
        let declared_len = headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared_len.is_some_and(|len| len > spec.max_object_size) {
            return Err(NoCacheReason::TooLarge);
        }
        let freshness = Freshness::compute(
            status,
            headers,
            &d,
            &spec.freshness,
            request_time,
            response_time,
        );
        if (freshness.lifetime.is_zero() || freshness.no_cache)
            && !freshness::has_validator(headers)
        {
            return Err(NoCacheReason::NoFreshness);
        }
        let primary = Key::primary(target, &spec.key);
        let variant = (!vary.is_empty()).then(|| {
            let key = primary.variant(&vary, target.headers);
            (vary, key)
        });
        let stripped: &[HeaderName] = if self.settings.strip_tag_headers {
            &self.settings.tag_headers
        } else {
            &[]
        };
        Ok(Admission {
            resource_type: idx,
            primary,
            variant,
            status,
            tags: response_tags(headers, &self.settings.tag_headers),
            headers: storable_headers(
                headers,
                &d.private_fields,
                stripped,
                &self.settings.per_response_fields,
            ),
            freshness,
            no_cache_fields: d.no_cache_fields,
            max_object_size: spec.max_object_size,
            generation,
        })
    }

    /// Stores an admitted response with its complete body and returns what was stored, or
    /// `None` when a purge of its URL happened since the origin was asked (the purge wins).
    pub fn commit(&self, admission: Admission, body: Bytes) -> Option<Hit> {
        self.commit_replacing(admission, body, None)
    }

    /// [`Cache::commit`], but when `replacing` is given only while that stored response is
    /// still the one under its key: a refresh must not bring back what a purge removed (or a
    /// newer fill replaced) since it was looked up.
    fn commit_replacing(
        &self,
        admission: Admission,
        body: Bytes,
        replacing: Option<&Hit>,
    ) -> Option<Hit> {
        let Admission {
            resource_type,
            primary,
            variant,
            status,
            headers,
            freshness,
            generation,
            no_cache_fields,
            tags,
            ..
        } = admission;
        let _gate = self.gate.read();
        if self.purges.purged_since(generation, &primary, &tags) {
            return None;
        }
        if let Some(hit) = replacing {
            let current = self.types[hit.resource_type].store.peek(&hit.key);
            if !current.is_some_and(|slot| Arc::ptr_eq(&slot, &hit.response)) {
                return None;
            }
        }
        let store = &self.types[resource_type].store;
        // A key lives in one resource type only; drop copies a Content-Type change left elsewhere.
        for (idx, ty) in self.types.iter().enumerate() {
            if idx != resource_type {
                ty.store.remove(&primary);
            }
        }
        let mut stored = StoredResponse::new(status, headers, body, freshness, tags);
        stored.no_cache_fields = no_cache_fields;
        let response = Slot::new(Entry::Response(stored));
        let key = match variant {
            Some((names, key)) => {
                let marker_current = store
                    .get(&primary)
                    .is_some_and(|s| matches!(&s.entry, Entry::Variants(n) if *n == names));
                if !marker_current {
                    store.insert(primary.clone(), Slot::new(Entry::Variants(names)));
                }
                store.cap_variants(&primary, self.settings.max_variants);
                store.insert(key.clone(), response.clone());
                key
            }
            None => {
                store.insert(primary.clone(), response.clone());
                primary.clone()
            }
        };
        Some(Hit {
            response,
            resource_type,
            primary,
            key,
        })
    }

    /// Applies a 304 from revalidation to a stored response (RFC 9111 §4.3.4): its header
    /// fields replace the stored ones, freshness restarts, the body is reused. Returns the
    /// refreshed entry, or the reason it may no longer be stored (the old one is removed then).
    pub fn refresh(
        &self,
        hit: &Hit,
        target: &RequestTarget<'_>,
        not_modified: &HeaderMap,
        request_time: SystemTime,
        response_time: SystemTime,
        generation: u64,
    ) -> Result<Hit, NoCacheReason> {
        let stored = hit.stored();
        let mut headers = stored.headers.to_header_map(not_modified.len() + 1);
        // A 304 without Date was still generated now (RFC 9110 §6.6.1); keeping the old Date
        // would make the refreshed entry look as old as the first fetch.
        if !not_modified.contains_key(http::header::DATE) {
            headers.insert(
                http::header::DATE,
                http::HeaderValue::from_str(&httpdate::fmt_http_date(response_time))
                    .expect("HTTP dates are valid header values"),
            );
        }
        for name in not_modified.keys() {
            // Fields that describe the stored body itself stay as stored (RFC 9111 §3.2: fields
            // the stored response depends upon): framing, coding, and the body's validator and
            // digests, which a 304 cannot change without sending a new body.
            if matches!(
                name.as_str(),
                "content-length"
                    | "content-encoding"
                    | "content-range"
                    | "transfer-encoding"
                    | "etag"
                    | "content-md5"
                    | "digest"
                    | "content-digest"
                    | "repr-digest"
            ) {
                continue;
            }
            headers.remove(name);
            for value in not_modified.get_all(name) {
                headers.append(name.clone(), value.clone());
            }
        }
        let result = self
            .admit(
                &Method::GET,
                target,
                stored.status,
                &headers,
                request_time,
                response_time,
                generation,
            )
            .and_then(|mut admission| {
                // Stored headers may have lost their tag fields (stripped); a 304 that does not
                // repeat them leaves the tags as they were.
                if admission.tags.is_empty() {
                    admission.tags = stored.tags.clone();
                }
                self.commit_replacing(admission, stored.body.clone(), Some(hit))
                    .ok_or(NoCacheReason::PurgedDuringFill)
            });
        if result.is_err() {
            self.remove(hit);
        }
        result
    }

    /// Removes the stored response a hit points at, unless a newer one replaced it meanwhile.
    pub fn remove(&self, hit: &Hit) {
        self.types[hit.resource_type]
            .store
            .remove_slot(&hit.key, &hit.response);
    }

    /// Removes every stored variant for a host and path (any query when `query` is None,
    /// else only that query as each type normalises it). Returns the number of responses removed.
    pub fn purge(&self, host: &str, path: &str, query: Option<&str>) -> usize {
        let selector = Selector::Url {
            host: host.into(),
            path: path.into(),
            query: query.map(Into::into),
        };
        self.invalidate(&selector, false, SystemTime::now())
    }

    /// Applies one invalidation: removes what `selector` names, or with `soft` marks it stale
    /// as of `now` (kept, so the next request revalidates it and grace or stale-while-revalidate
    /// can still serve it meanwhile). Returns how many responses it applied to.
    pub fn invalidate(&self, selector: &Selector, soft: bool, now: SystemTime) -> usize {
        let selector = match selector {
            Selector::Url { host, path, query } => Selector::Url {
                host: key::normalize_host(host, "http"),
                path: path.clone(),
                query: query.clone(),
            },
            Selector::Prefix { host, prefix } => Selector::Prefix {
                host: key::normalize_host(host, "http"),
                prefix: prefix.clone(),
            },
            Selector::Tag(tag) => Selector::Tag(tag.clone()),
        };
        self.purges.record(&selector);
        // A barrier, not held for the work: a commit that checked the purge log before the
        // record finishes inserting before this returns (so the selection below sees what it
        // stored), and every later check sees the record (so a fill begun before it is
        // dropped). A purge of a million objects never stalls fills.
        drop(self.gate.write());
        let mut applied = 0;
        for ty in &self.types {
            let selected = match &selector {
                Selector::Url { host, path, query } => {
                    let bare = key::host_without_port(host);
                    let host_has_port = host.as_str() != bare;
                    let wanted = query
                        .as_deref()
                        .map(|q| key::normalize_query(Some(q), ty.spec.key.query));
                    let select = |k: &Key| {
                        (!host_has_port || k.host() == host)
                            && wanted.as_deref().is_none_or(|q| k.query() == q)
                    };
                    ty.store.select(&store::Selection::Url {
                        host: bare,
                        path,
                        select: &select,
                    })
                }
                Selector::Prefix { host, prefix } => {
                    let bare = key::host_without_port(host);
                    let mut selected = ty
                        .store
                        .select(&store::Selection::Prefix { host: bare, prefix });
                    // As for URLs: a port narrows the purge to that port.
                    if host.as_str() != bare {
                        selected.retain(|(k, _)| k.host() == host);
                    }
                    selected
                }
                Selector::Tag(tag) => ty.store.select(&store::Selection::Tag(tag)),
            };
            applied += if soft {
                ty.store.replace_selected(&selected, |stored| {
                    stored.with_freshness(stored.freshness.expired_at(now))
                })
            } else {
                ty.store.remove_selected(&selected)
            };
        }
        applied
    }

    pub fn stats(&self) -> Vec<(&str, StoreStats)> {
        self.types
            .iter()
            .map(|t| (t.spec.name.as_str(), t.store.stats()))
            .collect()
    }

    pub fn indexed_keys(&self) -> usize {
        self.types.iter().map(|t| t.store.indexed_keys()).sum()
    }

    /// (tag, key) pairs in the tag indexes (for leak checks).
    pub fn indexed_tags(&self) -> usize {
        self.types.iter().map(|t| t.store.indexed_tags()).sum()
    }
}

/// A key's hash for the hit-for-pass table, seeded per process. foldhash, not SipHash: hashed
/// twice per pass-through, where SipHash cost 280 instructions a time. foldhash does not
/// claim resistance to crafted collisions; one only marks another key hit-for-pass for a
/// while (its requests go forward without coalescing and are still admitted if storable),
/// never serves anything.
fn key_hash(key: &Key) -> u64 {
    use std::hash::BuildHasher;
    static SEED: std::sync::OnceLock<foldhash::fast::RandomState> = std::sync::OnceLock::new();
    SEED.get_or_init(Default::default).hash_one(key)
}

/// The invalidation entry point the admin API talks to. A cluster-wide purge implements it by
/// applying locally and fanning out; callers do not change.
pub trait Invalidator: Send + Sync {
    /// Applies one invalidation (see [`Cache::invalidate`]); returns how many stored responses
    /// it applied to.
    fn invalidate(&self, selector: &Selector, soft: bool) -> usize;
}

impl Invalidator for Cache {
    fn invalidate(&self, selector: &Selector, soft: bool) -> usize {
        Cache::invalidate(self, selector, soft, SystemTime::now())
    }
}

/// Conditional-request evaluation against a stored response (RFC 9110 §13.2.2), so the cache can
/// answer 304 itself.
pub fn not_modified(request: &HeaderMap, stored: &impl Fields) -> bool {
    if let Some(inm) = fields::find(request, &http::header::IF_NONE_MATCH) {
        let Some(etag) = stored.first(&ETAG).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let Ok(inm) = inm.to_str() else { return false };
        // Weak comparison (§13.1.2 of RFC 9110): the opaque tags, `W/` or not.
        fn opaque(tag: &str) -> &str {
            let tag = tag.trim();
            tag.strip_prefix("W/").unwrap_or(tag)
        }
        let etag = opaque(etag);
        return inm.trim() == "*" || inm.split(',').any(|t| opaque(t) == etag);
    }
    if let Some(ims) = fields::find(request, &http::header::IF_MODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok())
    {
        // Without Last-Modified, the stored response's Date is the best known modification time.
        let Some(lm) = freshness::parse_http_date(stored, LAST_MODIFIED)
            .or_else(|| freshness::parse_http_date(stored, http::header::DATE))
        else {
            return false;
        };
        return lm <= ims;
    }
    false
}

#[cfg(test)]
mod tests;

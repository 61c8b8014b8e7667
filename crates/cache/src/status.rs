//! Names for every decision the cache makes. The same name is the access-log field, the metric label
//! and the `Cache-Status` detail, so an operator can follow one request across all three.

/// How a request was answered with respect to the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CacheResult {
    /// Served from a fresh stored response.
    Hit,
    /// Stored response was stale; the origin confirmed it (304) and it was served.
    Revalidated,
    /// Nothing usable was stored; fetched from the origin (and stored if allowed).
    Miss,
    /// Waited for another request's fill of the same key and served its result.
    Coalesced,
    /// Stored response was stale and the origin sent a new one.
    Expired,
    /// A stale stored response was served: while refreshing it in the background
    /// (stale-while-revalidate) or because the origin failed (stale-if-error).
    Stale,
    /// The cache was not used for this request; see [`NoCacheReason`].
    Bypass,
}

impl CacheResult {
    pub const ALL: [CacheResult; 7] = [
        CacheResult::Hit,
        CacheResult::Revalidated,
        CacheResult::Miss,
        CacheResult::Coalesced,
        CacheResult::Expired,
        CacheResult::Stale,
        CacheResult::Bypass,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CacheResult::Hit => "hit",
            CacheResult::Revalidated => "revalidated",
            CacheResult::Miss => "miss",
            CacheResult::Coalesced => "coalesced",
            CacheResult::Expired => "expired",
            CacheResult::Stale => "stale",
            CacheResult::Bypass => "bypass",
        }
    }

    /// Whether the body came out of the cache rather than from the origin.
    pub fn served_from_cache(self) -> bool {
        matches!(
            self,
            CacheResult::Hit
                | CacheResult::Revalidated
                | CacheResult::Coalesced
                | CacheResult::Stale
        )
    }
}

/// Why a request bypassed the cache or a response was not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NoCacheReason {
    /// The route has `cache: false`.
    RouteDisabled,
    /// Only GET and HEAD are looked up; other methods pass through.
    MethodNotCacheable,
    /// No resource type matches the request.
    NoResourceType,
    /// A HEAD request carried credentials, or missed a key that just proved uncacheable
    /// (hit-for-pass): forwarded as HEAD, and a bodiless answer is never stored. (Other HEAD
    /// misses, and HEADs of stale entries, fetch or revalidate with a GET for the cache.)
    HeadMiss,
    /// A Range request carried credentials, missed a key that just proved uncacheable
    /// (hit-for-pass), or its whole answer proved unstorable: forwarded as asked, as fetching
    /// the whole object for one range would be wasted. (Other range misses fetch the whole
    /// object for the cache and cut the range from it.)
    RangeRequest,
    /// The request carried `Cache-Control: no-store`.
    RequestNoStore,
    /// A miss carried `If-Match` or `If-Unmodified-Since`: the origin decides them, and its
    /// answer (a 412 is meant for this request alone) is never stored.
    Precondition,
    /// The response carried `Cache-Control: no-store`.
    ResponseNoStore,
    /// The response carried `Cache-Control: private`.
    Private,
    /// The request carried `Authorization` and the response did not allow sharing it.
    Authorization,
    /// The response sets a cookie; storing it would hand one user's cookie to others.
    SetCookie,
    /// `Vary: *` can never be matched by a later request.
    VaryStar,
    /// The status code is not cacheable without explicit freshness.
    StatusNotCacheable,
    /// The response had no freshness and no validator, so it could never be reused.
    NoFreshness,
    /// The response (declared or streamed) exceeds the resource type's `max_object_size`.
    TooLarge,
    /// The upstream failed before a response arrived.
    UpstreamError,
    /// Too many requests were already waiting on the same fill.
    CoalesceOverflow,
    /// Waiting on another request's fill took longer than `coalesce_timeout`.
    CoalesceTimeout,
    /// The request was a protocol upgrade (WebSocket etc.).
    Upgrade,
    /// A purge of this URL arrived while the response was being fetched; the purge wins.
    PurgedDuringFill,
    /// The upstream's framing was contradictory (Transfer-Encoding with Content-Length): the
    /// response is relayed re-framed but never stored (RFC 9112 §6.3).
    MalformedResponse,
    /// An HTML answer to a URL that names a static file (`/account/x.css`) without an
    /// origin-given lifetime: the web cache deception signature.
    ContentTypeMismatch,
}

impl NoCacheReason {
    pub const ALL: [NoCacheReason; 22] = [
        NoCacheReason::RouteDisabled,
        NoCacheReason::MethodNotCacheable,
        NoCacheReason::NoResourceType,
        NoCacheReason::HeadMiss,
        NoCacheReason::RangeRequest,
        NoCacheReason::RequestNoStore,
        NoCacheReason::Precondition,
        NoCacheReason::ResponseNoStore,
        NoCacheReason::Private,
        NoCacheReason::Authorization,
        NoCacheReason::SetCookie,
        NoCacheReason::VaryStar,
        NoCacheReason::StatusNotCacheable,
        NoCacheReason::NoFreshness,
        NoCacheReason::TooLarge,
        NoCacheReason::UpstreamError,
        NoCacheReason::CoalesceOverflow,
        NoCacheReason::CoalesceTimeout,
        NoCacheReason::Upgrade,
        NoCacheReason::PurgedDuringFill,
        NoCacheReason::MalformedResponse,
        NoCacheReason::ContentTypeMismatch,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NoCacheReason::RouteDisabled => "route_disabled",
            NoCacheReason::MethodNotCacheable => "method_not_cacheable",
            NoCacheReason::NoResourceType => "no_resource_type",
            NoCacheReason::HeadMiss => "head_miss",
            NoCacheReason::RangeRequest => "range_request",
            NoCacheReason::RequestNoStore => "request_no_store",
            NoCacheReason::Precondition => "precondition",
            NoCacheReason::ResponseNoStore => "response_no_store",
            NoCacheReason::Private => "private",
            NoCacheReason::Authorization => "authorization",
            NoCacheReason::SetCookie => "set_cookie",
            NoCacheReason::VaryStar => "vary_star",
            NoCacheReason::StatusNotCacheable => "status_not_cacheable",
            NoCacheReason::NoFreshness => "no_freshness",
            NoCacheReason::TooLarge => "too_large",
            NoCacheReason::UpstreamError => "upstream_error",
            NoCacheReason::CoalesceOverflow => "coalesce_overflow",
            NoCacheReason::CoalesceTimeout => "coalesce_timeout",
            NoCacheReason::Upgrade => "upgrade",
            NoCacheReason::PurgedDuringFill => "purged_during_fill",
            NoCacheReason::MalformedResponse => "malformed_response",
            NoCacheReason::ContentTypeMismatch => "content_type_mismatch",
        }
    }

    /// Whether the reason lies in the response (so it will likely hold for the next request of
    /// this URL too) rather than in one particular request.
    pub fn is_response_side(self) -> bool {
        matches!(
            self,
            NoCacheReason::ResponseNoStore
                | NoCacheReason::Private
                | NoCacheReason::SetCookie
                | NoCacheReason::VaryStar
                | NoCacheReason::StatusNotCacheable
                | NoCacheReason::NoFreshness
                | NoCacheReason::TooLarge
                | NoCacheReason::MalformedResponse
                | NoCacheReason::ContentTypeMismatch
        )
    }
}

impl std::fmt::Display for NoCacheReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

//! HTTP/1 upstream connections, pooled per endpoint and polled by the request using them.
//!
//! hyper-util's pool runs each connection as a task of its own, so a pass-through hops from the
//! client's connection task to the origin's and back, often across threads, on every request
//! (the wake-ups and IPIs measured in BENCHMARKS.md). Here the request's task polls the
//! connection: while it waits for the response head, then from the response body, which parks
//! the connection for the next request once it has ended. HTTP/2 clusters keep hyper-util's
//! pool, where one connection carries many requests from many tasks at once.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, Method, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::http1::{Conn, Framing, SendError};
use super::{AttemptError, MeteredConnector};
use crate::body::{BoxError, ProxyBody};
use crate::headers::HopFields;
use crate::interim::InterimSink;

/// Boxed: a connection's state is large, and moves between the pool, a request and its body.
type Parked = Box<Conn>;

/// One thread's parked connections, by endpoint.
type IdleList = Vec<(Authority, Vec<Parked>)>;

pub(super) struct Pool {
    /// Idle connections by the connection thread that parked them, if there are any (a socket
    /// belongs to the reactor of the thread that opened it: used from another, its every event
    /// would cost a wake across threads), the last list for other threads; then by endpoint, the most
    /// recently parked last (taken first: the others age out, so the pool shrinks to what the
    /// load needs). Lists, not maps: endpoints are few, and hashing an `Authority` (byte by
    /// byte, case-folded) cost more than the search.
    idle: Vec<Mutex<IdleList>>,
    max_idle: usize,
    idle_timeout: Duration,
    /// Tells a request waiting for a `max_connections` slot that a connection was parked.
    parked: tokio::sync::Notify,
    connector: MeteredConnector,
    scheme: Scheme,
}

impl Pool {
    pub(super) fn new(
        connector: MeteredConnector,
        scheme: Scheme,
        max_idle: usize,
        idle_timeout: Duration,
    ) -> Arc<Pool> {
        let threads = crate::workers::Workers::get().map_or(0, |w| w.count());
        let pool = Arc::new(Pool {
            idle: (0..=threads).map(|_| Mutex::default()).collect(),
            max_idle,
            idle_timeout,
            parked: tokio::sync::Notify::new(),
            connector,
            scheme,
        });
        // Closes connections idle too long, or closed by their origin, until the cluster is
        // gone (requests look only at the ones they take): a socket the origin closed is not
        // held for long, and an idle one at most half its timeout past it. Cheap: a parked
        // connection with nothing to read costs no syscall.
        let weak = Arc::downgrade(&pool);
        let period = (idle_timeout / 2).clamp(Duration::from_millis(100), Duration::from_secs(1));
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                let Some(pool) = weak.upgrade() else { return };
                pool.reap();
            }
        });
        pool
    }

    /// Sends the request (`headers` with Host) to `endpoint`, on a parked connection or a
    /// new one, the request's own task polling it.
    #[allow(clippy::too_many_arguments)]
    #[allow(clippy::manual_async_fn)] // its future stays small: see `Proxy::handle`
    pub(super) fn send(
        self: &Arc<Self>,
        endpoint: &Authority,
        method: &Method,
        target: &PathAndQuery,
        headers: &HeaderMap,
        hop: Option<&HopFields>,
        body: ProxyBody,
        interim: Option<&InterimSink>,
        connect_timeout: Duration,
        deadline: tokio::time::Instant,
    ) -> impl Future<Output = Result<Response<ResponseBody>, AttemptError>> {
        async move {
            // Read only when a connection must be opened: a reused one needs no clock.
            let mut connect_clock = None;
            // A request that never left (its connection closed just before) goes on another one;
            // on a fresh connection that happens once at most.
            let mut unsent_on_fresh = 0;
            let mut anywhere = false;
            // Only a request without a body can go again: a body is read as it is sent.
            let mut body = Some(body);
            let replayable = body.as_ref().is_some_and(Body::is_end_stream);
            loop {
                let (mut conn, reused) = match self.checkout(endpoint, anywhere) {
                    Some(conn) => (conn, true),
                    // The response-head deadline bounds the wait for a connection too.
                    None => match tokio::time::timeout_at(
                        deadline,
                        self.connect(endpoint, &mut connect_clock, connect_timeout),
                    )
                    .await
                    .map_err(|_| AttemptError {
                        error: Box::new(super::HeadTimedOut),
                        connect: false,
                    })?? {
                        Some(conn) => (conn, false),
                        // Parked by another request while this one waited for a slot, maybe on
                        // another thread: better than none.
                        None => {
                            anywhere = true;
                            continue;
                        }
                    },
                };
                let this_body = body.take().unwrap_or_else(crate::body::empty);
                match conn
                    .send(
                        method,
                        target.as_str(),
                        headers,
                        hop,
                        this_body,
                        interim,
                        deadline,
                    )
                    .await
                {
                    Ok(head) => {
                        let (parts, ()) = head.response.into_parts();
                        let lease = Lease {
                            conn,
                            pool: self.clone(),
                            endpoint: endpoint.clone(),
                            reusable: head.reusable,
                        };
                        let mut body = ResponseBody {
                            inner: Inner::Pooled {
                                framing: head.framing,
                                lease: Some(lease),
                            },
                        };
                        if body.is_end_stream() {
                            // Nothing to read (HEAD, 204, 304, empty): the connection is free now.
                            body.release();
                        }
                        return Ok(Response::from_parts(parts, body));
                    }
                    Err(SendError { error, unsent }) => {
                        if unsent && replayable && (reused || unsent_on_fresh == 0) {
                            unsent_on_fresh += usize::from(!reused);
                            continue;
                        }
                        return Err(AttemptError {
                            error,
                            connect: false,
                        });
                    }
                }
            }
        }
    }

    /// The list the calling thread parks in and takes from first.
    fn own_list(&self) -> usize {
        let others = self.idle.len() - 1;
        crate::workers::Workers::current().map_or(others, |thread| thread.min(others))
    }

    /// A parked connection that can take a request: from this thread's list, or (`anywhere`)
    /// from any.
    fn checkout(&self, endpoint: &Authority, anywhere: bool) -> Option<Parked> {
        let own = self.own_list();
        if let Some(conn) = self.checkout_from(own, endpoint) {
            return Some(conn);
        }
        if !anywhere {
            return None;
        }
        (0..self.idle.len())
            .filter(|list| *list != own)
            .find_map(|list| self.checkout_from(list, endpoint))
    }

    fn checkout_from(&self, list: usize, endpoint: &Authority) -> Option<Parked> {
        loop {
            let mut conn = {
                let mut idle = self.idle[list].lock().expect("pool lock");
                let at = position(&idle, endpoint)?;
                idle[at].1.pop()?
            };
            if conn.parked_at.elapsed() < self.idle_timeout && conn.usable() {
                return Some(conn);
            }
            // Closed by its origin or idle too long: dropped (closed) here, outside the lock.
        }
    }

    /// A new connection, or `None` when one was parked while this waited for a slot.
    async fn connect(
        &self,
        endpoint: &Authority,
        clock: &mut Option<(Instant, tokio::time::Instant)>,
        connect_timeout: Duration,
    ) -> Result<Option<Parked>, AttemptError> {
        // One deadline for the request however many times it waits for a slot.
        let (started, deadline) = *clock.get_or_insert_with(|| {
            (
                Instant::now(),
                tokio::time::Instant::now() + connect_timeout,
            )
        });
        let refused = |error: Box<dyn std::error::Error + Send + Sync>| AttemptError {
            error,
            connect: true,
        };
        let Some(slot) = self
            .connector
            .slot(connect_timeout, deadline, Some(&self.parked))
            .await
            .map_err(|e| refused(Box::new(e)))?
        else {
            return Ok(None);
        };
        let uri = Uri::builder()
            .scheme(self.scheme.clone())
            .authority(endpoint.clone())
            .path_and_query("/")
            .build()
            .expect("scheme and authority are valid");
        let io = self
            .connector
            .open(uri, slot, started, deadline, connect_timeout)
            .await
            .map_err(refused)?;
        Ok(Some(Box::new(Conn::new(io, started))))
    }

    /// Keeps the connection for the next request to `endpoint`, if it can take one.
    fn park(&self, endpoint: Authority, mut conn: Parked) {
        conn.parked_at = Instant::now();
        let own = self.own_list();
        // `max_idle_connections` counts the endpoint's connections on every thread.
        let elsewhere: usize = (0..self.idle.len())
            .filter(|list| *list != own)
            .map(|list| {
                let idle = self.idle[list].lock().expect("pool lock");
                position(&idle, &endpoint).map_or(0, |at| idle[at].1.len())
            })
            .sum();
        let mut idle = self.idle[own].lock().expect("pool lock");
        let at = match position(&idle, &endpoint) {
            Some(at) => at,
            None => {
                idle.push((endpoint, Vec::new()));
                idle.len() - 1
            }
        };
        let parked = &mut idle[at].1;
        if parked.len() + elsewhere >= self.max_idle {
            drop(idle);
            return;
        }
        parked.push(conn);
        drop(idle);
        use std::sync::atomic::Ordering::Relaxed;
        if self.connector.limit.waiting.load(Relaxed) > 0 {
            self.parked.notify_one();
        }
    }

    fn reap(&self) {
        let mut closing = Vec::new();
        for list in &self.idle {
            let mut idle = list.lock().expect("pool lock");
            for (_, parked) in idle.iter_mut() {
                let mut i = 0;
                while i < parked.len() {
                    let conn = &mut parked[i];
                    if conn.parked_at.elapsed() < self.idle_timeout && conn.usable() {
                        i += 1;
                    } else {
                        closing.push(parked.remove(i));
                    }
                }
            }
            idle.retain(|(_, parked)| !parked.is_empty());
        }
        drop(closing);
    }
}

/// Where `endpoint`'s connections are parked. Endpoint names come from one config or discovery
/// source, so their bytes compare without case folding.
fn position(idle: &IdleList, endpoint: &Authority) -> Option<usize> {
    idle.iter()
        .position(|(name, _)| name.as_str() == endpoint.as_str())
}

/// The connection a response body reads from, parked again when the body has ended.
struct Lease {
    conn: Box<Conn>,
    pool: Arc<Pool>,
    endpoint: Authority,
    /// Whether the response lets the connection take another request.
    reusable: bool,
}

/// An upstream response body: read off a pooled HTTP/1 connection as it is polled, or from
/// hyper's HTTP/2 client.
pub struct ResponseBody {
    inner: Inner,
}

enum Inner {
    Detached(Incoming),
    Pooled {
        framing: Framing,
        /// Gone once the body has ended (the connection parked or closed) or failed.
        lease: Option<Lease>,
    },
}

impl ResponseBody {
    /// A body whose connection is polled elsewhere (hyper-util's pool).
    pub(super) fn detached(inner: Incoming) -> ResponseBody {
        ResponseBody {
            inner: Inner::Detached(inner),
        }
    }

    /// The body has ended: its connection goes back to the pool, if the response allows.
    fn release(&mut self) {
        if let Inner::Pooled { lease, .. } = &mut self.inner
            && let Some(Lease {
                conn,
                pool,
                endpoint,
                reusable,
            }) = lease.take()
            && reusable
            && !conn.has_leftover()
        {
            pool.park(endpoint, conn);
        }
    }
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            Inner::Detached(inner) => f.debug_tuple("ResponseBody").field(inner).finish(),
            Inner::Pooled { framing, lease } => f
                .debug_struct("ResponseBody")
                .field("framing", framing)
                .field("pooled", &lease.is_some())
                .finish(),
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let (framing, lease) = match &mut this.inner {
            Inner::Detached(inner) => {
                return Pin::new(inner).poll_frame(cx).map_err(Into::into);
            }
            Inner::Pooled { framing, lease } => (framing, lease),
        };
        let Some(open) = lease else {
            return Poll::Ready(None);
        };
        let polled = std::task::ready!(open.conn.poll_body(framing, cx));
        match &polled {
            Some(Err(_)) => *lease = None,
            _ if *framing == Framing::Length(0) => this.release(),
            _ => {}
        }
        Poll::Ready(polled.map(|frame| frame.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Detached(inner) => inner.is_end_stream(),
            // Not after a failure: only a body that reached its framing's end has ended.
            Inner::Pooled { framing, .. } => *framing == Framing::Length(0),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Detached(inner) => inner.size_hint(),
            Inner::Pooled {
                framing: Framing::Length(n),
                ..
            } => SizeHint::with_exact(*n),
            Inner::Pooled { .. } => SizeHint::default(),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // One dropped half-read has not ended, and its connection closes with it.
        if let Inner::Pooled {
            framing: Framing::Length(0),
            lease: Some(_),
        } = &self.inner
        {
            self.release();
        }
    }
}

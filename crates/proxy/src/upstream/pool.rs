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
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;

use super::{AttemptError, MeteredConnector, MeteredIo};
use crate::body::ProxyBody;

/// One open connection: the half that sends requests and the state machine to poll.
struct Conn {
    sender: http1::SendRequest<ProxyBody>,
    driver: http1::Connection<MeteredIo, ProxyBody>,
    /// Since when it has been idle, while parked.
    parked_at: Instant,
}

impl Conn {
    /// Reads, writes and moves the connection's state on; ready once it has closed.
    fn drive(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        Pin::new(&mut self.driver).poll(cx).map(drop)
    }

    /// Whether it can take a request now. The poll first lets an idle connection read the end
    /// its origin may have sent meanwhile, and a finished exchange settle into idle.
    fn usable(&mut self, cx: &mut Context<'_>) -> bool {
        self.drive(cx).is_pending() && self.sender.is_ready()
    }
}

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

    /// Sends `request` (origin-form URI, Host set) to `endpoint`, on a parked connection or a
    /// new one, the request's own task polling it.
    pub(super) async fn send(
        self: &Arc<Self>,
        endpoint: &Authority,
        mut request: Request<ProxyBody>,
        connect_timeout: Duration,
    ) -> Result<Response<ResponseBody>, AttemptError> {
        // Read only when a connection must be opened: a reused one needs no clock.
        let mut connect_clock = None;
        // A request that never left (its connection closed just before) goes on another one;
        // on a fresh connection that happens once at most.
        let mut unsent_on_fresh = 0;
        let mut anywhere = false;
        loop {
            let (conn, reused) = match self.checkout(endpoint, anywhere) {
                Some(conn) => (conn, true),
                None => match self
                    .connect(endpoint, &mut connect_clock, connect_timeout)
                    .await?
                {
                    Some(conn) => (conn, false),
                    // Parked by another request while this one waited for a slot, maybe on
                    // another thread: better than none.
                    None => {
                        anywhere = true;
                        continue;
                    }
                },
            };
            let mut conn = Some(conn);
            let sent = conn
                .as_mut()
                .expect("just set")
                .sender
                .try_send_request(request);
            let mut sent = std::pin::pin!(sent);
            let result = std::future::poll_fn(|cx| {
                if let Poll::Ready(result) = sent.as_mut().poll(cx) {
                    return Poll::Ready(result);
                }
                if let Some(open) = &mut conn
                    && open.drive(cx).is_ready()
                {
                    // Dropping the closed connection answers the request, if it has not been.
                    conn = None;
                }
                sent.as_mut().poll(cx)
            })
            .await;
            match result {
                Ok(response) => {
                    let lease = conn.map(|conn| Lease {
                        conn,
                        pool: self.clone(),
                        endpoint: endpoint.clone(),
                    });
                    return Ok(response.map(|inner| ResponseBody { inner, lease }));
                }
                Err(mut unsent) => match unsent.take_message() {
                    Some(again) if reused || unsent_on_fresh == 0 => {
                        unsent_on_fresh += usize::from(!reused);
                        request = again;
                    }
                    _ => {
                        return Err(AttemptError {
                            error: Box::new(unsent.into_error()),
                            connect: false,
                        });
                    }
                },
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
        let mut cx = Context::from_waker(Waker::noop());
        loop {
            let mut conn = {
                let mut idle = self.idle[list].lock().expect("pool lock");
                let at = position(&idle, endpoint)?;
                idle[at].1.pop()?
            };
            if conn.parked_at.elapsed() < self.idle_timeout && conn.usable(&mut cx) {
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
        let (sender, driver) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| refused(Box::new(e)))?;
        Ok(Some(Box::new(Conn {
            sender,
            driver,
            parked_at: started,
        })))
    }

    /// Keeps the connection for the next request to `endpoint`, if it can take one.
    fn park(&self, endpoint: Authority, mut conn: Parked, cx: &mut Context<'_>) {
        if !conn.usable(cx) {
            return;
        }
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
        let mut cx = Context::from_waker(Waker::noop());
        let mut closing = Vec::new();
        for list in &self.idle {
            let mut idle = list.lock().expect("pool lock");
            for (_, parked) in idle.iter_mut() {
                let mut i = 0;
                while i < parked.len() {
                    let conn = &mut parked[i];
                    if conn.parked_at.elapsed() < self.idle_timeout && conn.usable(&mut cx) {
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
}

/// An upstream response body; from the HTTP/1 pool, it polls its connection as it is read.
pub struct ResponseBody {
    inner: Incoming,
    lease: Option<Lease>,
}

impl ResponseBody {
    /// A body whose connection is polled elsewhere (hyper-util's pool).
    pub(super) fn detached(inner: Incoming) -> ResponseBody {
        ResponseBody { inner, lease: None }
    }

    fn release(&mut self, cx: &mut Context<'_>) {
        if let Some(Lease {
            conn,
            pool,
            endpoint,
        }) = self.lease.take()
        {
            pool.park(endpoint, conn, cx);
        }
    }
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody")
            .field("inner", &self.inner)
            .field("pooled", &self.lease.is_some())
            .finish()
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let mut polled = Pin::new(&mut this.inner).poll_frame(cx);
        if polled.is_pending()
            && let Some(lease) = &mut this.lease
        {
            // The frame comes off the connection, which nothing else polls.
            if lease.conn.drive(cx).is_ready() {
                this.lease = None;
            }
            polled = Pin::new(&mut this.inner).poll_frame(cx);
        }
        match &polled {
            Poll::Ready(None) => this.release(cx),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.release(cx),
            Poll::Ready(Some(Err(_))) => this.lease = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // A body nobody had to read (HEAD, 204, 304, empty) has still ended; one dropped
        // half-read has not, and its connection closes with it.
        if self.lease.is_some() && self.inner.is_end_stream() {
            self.release(&mut Context::from_waker(Waker::noop()));
        }
    }
}

//! Downstream listeners: HTTP/1.1 and cleartext HTTP/2 (prior knowledge) on one port, with
//! explicit protocol limits and graceful drain.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use http::{Request, Version};
use hyper::body::Incoming;

use crate::Proxy;
use crate::interim::{InterimIo, InterimSink};

#[derive(Debug, Clone)]
pub struct ServerLimits {
    pub max_request_header_size: usize,
    pub max_request_headers: usize,
    /// A client must finish sending its request head within this time.
    pub header_read_timeout: Duration,
    pub max_concurrent_streams: u32,
    /// How long in-flight requests get to finish once shutdown begins.
    pub drain_timeout: Duration,
}

impl ServerLimits {
    pub fn from_config(config: &larder_config::Config) -> ServerLimits {
        ServerLimits {
            max_request_header_size: config.limits.max_request_header_size as usize,
            max_request_headers: config.limits.max_request_headers,
            header_read_timeout: Duration::from_secs(30),
            max_concurrent_streams: 256,
            drain_timeout: config.drain.timeout,
        }
    }
}

/// hyper's limit on request header lines when none is set.
const HYPER_DEFAULT_MAX_HEADERS: usize = 100;

fn builder(limits: &ServerLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    let mut http1 = builder.http1();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // hyper's floor for the read buffer is 8 KiB.
        .max_buf_size(limits.max_request_header_size.max(8192));
    // At hyper's own default (100) the parser uses uninitialised stack arrays; setting the
    // limit explicitly, even to 100, makes it build and zero two 100-entry vectors per request
    // (5% of a cache hit's CPU).
    if limits.max_request_headers != HYPER_DEFAULT_MAX_HEADERS {
        http1.max_headers(limits.max_request_headers);
    }
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(limits.max_request_header_size as u32)
        .max_pending_accept_reset_streams(20)
        .max_local_error_reset_streams(256);
    builder
}

/// Serves until `shutdown` resolves, then stops accepting and lets open requests finish
/// (HTTP/1 connections close after their current response, HTTP/2 ones get GOAWAY).
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    limits: ServerLimits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) {
    let builder = builder(&limits);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        tokio::spawn(async move {
            let metrics = proxy.metrics.clone();
            metrics.connection_opened();
            let result = match tls {
                None => serve_connection(&builder, watcher, stream, proxy, peer, "http").await,
                Some(acceptor) => {
                    // A client that never finishes its handshake holds nothing for long.
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls_stream)) => {
                            serve_connection(&builder, watcher, tls_stream, proxy, peer, "https")
                                .await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, client = %peer, "TLS handshake failed");
                            Ok(())
                        }
                        Err(_) => {
                            tracing::debug!(client = %peer, "TLS handshake timed out");
                            Ok(())
                        }
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            metrics.connection_closed();
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("drain timeout: closing remaining connections");
    }
}

/// How long a TLS client may take to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves one accepted connection (plain or TLS) until it ends or the drain closes it.
async fn serve_connection<S>(
    builder: &auto::Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
    stream: S,
    proxy: Arc<Proxy>,
    peer: std::net::SocketAddr,
    scheme: &'static str,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let interim = InterimSink::default();
    let io = TokioIo::new(InterimIo::new(stream, interim.clone()));
    let service = service_fn(move |req: Request<Incoming>| {
        let proxy = proxy.clone();
        // 1xx can only be relayed to HTTP/1.1 clients (never to 1.0; HTTP/2 would need
        // hyper support). Passed along directly, not in the request's extensions: that
        // would cost two allocations per request.
        let relay = (req.version() == Version::HTTP_11).then(|| {
            interim.request_started();
            interim.clone()
        });
        // The pipeline tells the sink when the final response and its body are done.
        async move { Ok::<_, Infallible>(proxy.handle(req, Some(peer), relay, scheme).await) }
    });
    let connection = builder.serve_connection(io, service).into_owned();
    watcher.watch(connection).await
}

//! The embedded demo origin `larder` starts when run without a config, so a first run shows a
//! cache at work with nothing else installed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

const INDEX: &str =
    "Larder demo origin. Try these through the proxy (twice, and watch Cache-Status and Age):
  /             this page (max-age=60)
  /time         the origin's clock (max-age=10): a hit repeats the same time
  /data/<id>    JSON with an ETag (max-age=30), revalidated with 304 when stale
  /slow?ms=500  a slow answer (max-age=30): concurrent misses are coalesced into one
  /private      Cache-Control: private (never stored)
  /no-store     Cache-Control: no-store (never stored)
  /bytes/<n>    n bytes (max-age=300)
";

/// Starts the demo origin on `addr` and returns the bound address.
pub async fn spawn(addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let served = Arc::new(AtomicU64::new(0));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let served = served.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let n = served.fetch_add(1, Ordering::Relaxed) + 1;
                    async move { Ok::<_, Infallible>(respond(req, n).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(local)
}

async fn respond(req: Request<Incoming>, served: u64) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let now = httpdate::fmt_http_date(SystemTime::now());
    let (status, cache_control, content_type, body, etag): (
        StatusCode,
        &str,
        &str,
        Bytes,
        Option<String>,
    ) = match path {
        "/" => (
            StatusCode::OK,
            "max-age=60",
            "text/plain",
            INDEX.into(),
            None,
        ),
        "/time" => (
            StatusCode::OK,
            "max-age=10",
            "text/plain",
            format!("{now}\n").into(),
            None,
        ),
        "/private" => (
            StatusCode::OK,
            "private, max-age=60",
            "text/plain",
            "for your eyes only\n".into(),
            None,
        ),
        "/no-store" => (
            StatusCode::OK,
            "no-store",
            "text/plain",
            "never stored\n".into(),
            None,
        ),
        "/slow" => {
            let ms = req
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("ms="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(500u64)
                .min(10_000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            (
                StatusCode::OK,
                "max-age=30",
                "text/plain",
                format!("slept {ms} ms\n").into(),
                None,
            )
        }
        p if p.starts_with("/data/") => {
            let id = &p["/data/".len()..];
            let etag = format!("\"{id}-v1\"");
            if req
                .headers()
                .get(header::IF_NONE_MATCH)
                .is_some_and(|v| v.as_bytes() == etag.as_bytes())
            {
                let mut r = Response::new(Full::new(Bytes::new()));
                *r.status_mut() = StatusCode::NOT_MODIFIED;
                r.headers_mut()
                    .insert(header::ETAG, etag.parse().expect("valid etag"));
                r.headers_mut()
                    .insert(header::CACHE_CONTROL, "max-age=30".parse().expect("static"));
                return r;
            }
            let body = format!("{{\"id\":{id:?},\"generated\":{now:?}}}\n");
            (
                StatusCode::OK,
                "max-age=30",
                "application/json",
                body.into(),
                Some(etag),
            )
        }
        p if p.starts_with("/bytes/") => match p["/bytes/".len()..].parse::<usize>() {
            Ok(n) if n <= 64 << 20 => (
                StatusCode::OK,
                "max-age=300",
                "application/octet-stream",
                vec![b'x'; n].into(),
                None,
            ),
            _ => (
                StatusCode::BAD_REQUEST,
                "no-store",
                "text/plain",
                "size must be at most 64 MiB\n".into(),
                None,
            ),
        },
        _ => (
            StatusCode::NOT_FOUND,
            "max-age=10",
            "text/plain",
            "not found\n".into(),
            None,
        ),
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(
        header::CACHE_CONTROL,
        cache_control.parse().expect("static"),
    );
    h.insert(header::CONTENT_TYPE, content_type.parse().expect("static"));
    h.insert("x-demo-origin-requests", served.into());
    if let Some(etag) = etag {
        h.insert(header::ETAG, etag.parse().expect("valid etag"));
    }
    response
}

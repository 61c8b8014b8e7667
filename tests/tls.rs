//! TLS termination: certificates by SNI, HTTP/2 and HTTP/1.1 by ALPN, and certificates
//! reloaded from their files without a restart.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio_rustls::TlsConnector;

struct TestCert {
    der: CertificateDer<'static>,
}

/// A self-signed certificate for `name`, written as `<stem>.crt` / `<stem>.key`.
fn write_cert(dir: &Path, stem: &str, name: &str) -> TestCert {
    let generated = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
    std::fs::write(dir.join(format!("{stem}.crt.tmp")), generated.cert.pem()).unwrap();
    std::fs::write(
        dir.join(format!("{stem}.key.tmp")),
        generated.signing_key.serialize_pem(),
    )
    .unwrap();
    // Renamed into place, as a Secret update or a renewal tool does.
    std::fs::rename(
        dir.join(format!("{stem}.key.tmp")),
        dir.join(format!("{stem}.key")),
    )
    .unwrap();
    std::fs::rename(
        dir.join(format!("{stem}.crt.tmp")),
        dir.join(format!("{stem}.crt")),
    )
    .unwrap();
    TestCert {
        der: generated.cert.der().clone(),
    }
}

fn connector(trusted: &[&TestCert], alpn: &[&[u8]]) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in trusted {
        roots.add(cert.der.clone()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsConnector::from(Arc::new(config))
}

/// Connects with SNI `name`; returns the certificate served, the ALPN protocol, the stream.
async fn handshake(
    connector: &TlsConnector,
    addr: SocketAddr,
    name: &str,
) -> (
    CertificateDer<'static>,
    Option<Vec<u8>>,
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let stream = connector
        .connect(ServerName::try_from(name.to_owned()).unwrap(), tcp)
        .await
        .unwrap();
    let (_, session) = stream.get_ref();
    let served = session.peer_certificates().unwrap()[0].clone();
    let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
    (served, alpn, stream)
}

fn tls_yaml(origin: SocketAddr, dir: &Path) -> String {
    config_yaml(origin, DEFAULT_TYPES).replace(
        "listeners: [{ name: http, address: \"127.0.0.1:0\" }]",
        &format!(
            "listeners:\n  - name: https\n    address: \"127.0.0.1:0\"\n    tls:\n      certificates:\n        - {{ cert_file: {a_crt:?}, key_file: {a_key:?} }}\n        - {{ cert_file: {b_crt:?}, key_file: {b_key:?} }}",
            a_crt = dir.join("a.crt").display().to_string(),
            a_key = dir.join("a.key").display().to_string(),
            b_crt = dir.join("b.crt").display().to_string(),
            b_key = dir.join("b.key").display().to_string(),
        ),
    )
}

#[tokio::test]
async fn https_with_sni_alpn_and_certificate_reload() {
    let dir = std::env::temp_dir().join(format!("larder-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let a = write_cert(&dir, "a", "a.test");
    let b = write_cert(&dir, "b", "b.test");
    let origin = Origin::start(|seen| async move {
        let proto = seen.header("x-forwarded-proto");
        response(200, &[("cache-control", "max-age=60")], proto)
    })
    .await;
    let larder = Larder::start(&tls_yaml(origin.addr, &dir)).await;
    let addr = larder.server.proxy_addrs[0];

    // SNI picks the certificate; HTTP/2 is negotiated when offered.
    let both = connector(&[&a, &b], &[b"h2", b"http/1.1"]);
    let (served, alpn, _) = handshake(&both, addr, "b.test").await;
    assert_eq!(served, b.der);
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    let (served, _, stream) = handshake(&both, addr, "a.test").await;
    assert_eq!(served, a.der);

    let (mut h2, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = http::Request::get("https://a.test/page")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = h2.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), http::Version::HTTP_2);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "https", "the origin is told the client came over TLS");

    // HTTP/1.1 when that is all the client speaks.
    let h1_only = connector(&[&a, &b], &[b"http/1.1"]);
    let (_, alpn, stream) = handshake(&h1_only, addr, "a.test").await;
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    let (mut h1, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = http::Request::get("/page")
        .header("host", "a.test")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = h1.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["cache-status"]
            .to_str()
            .unwrap()
            .contains("hit"),
        "the same https URL, cached over h2, is a hit over h1"
    );

    // A renewed certificate is served without a restart.
    let renewed = write_cert(&dir, "a", "a.test");
    let trusting = connector(&[&a, &b, &renewed], &[b"http/1.1"]);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (served, _, _) = handshake(&trusting, addr, "a.test").await;
        if served == renewed.der {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the renewed certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A broken file keeps the certificates in use.
    std::fs::write(dir.join("a.key"), "not a key").unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (served, _, _) = handshake(&trusting, addr, "a.test").await;
    assert_eq!(served, renewed.der);
}

#[tokio::test]
async fn a_bad_certificate_file_stops_the_start_naming_the_file() {
    let dir = std::env::temp_dir().join(format!("larder-tls-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    write_cert(&dir, "a", "a.test");
    write_cert(&dir, "b", "b.test");
    // b's key with a's certificate.
    std::fs::copy(dir.join("b.key"), dir.join("a.key")).unwrap();
    let origin = Origin::fixed(200, &[], "x").await;
    let config = larder_config::load_str(&tls_yaml(origin.addr, &dir), "test.yaml").unwrap();
    let error = match larder::start(config, larder::StartOptions::default()).await {
        Ok(_) => panic!("started with a mismatched key"),
        Err(e) => format!("{e:#}"),
    };
    assert!(error.contains("a.key"), "{error}");
    assert!(error.contains("https"), "names the listener: {error}");
}

/// An origin serving HTTPS with `cert` (HTTP/1.1 or HTTP/2 by ALPN), answering `body`, the
/// HTTP version and the length of the request body it read.
async fn tls_origin(dir: &Path, body: &'static str) -> SocketAddr {
    use rustls_pki_types::PrivateKeyDer;
    use rustls_pki_types::pem::PemObject;
    let chain = CertificateDer::pem_file_iter(dir.join("origin.crt"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(dir.join("origin.key")).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(
                    move |req: http::Request<hyper::body::Incoming>| async move {
                        let version = req.version();
                        if req.method() == http::Method::POST {
                            // A slow reader: the upload fills the socket buffers, so the
                            // proxy's TLS layer is left holding what it could not send.
                            tokio::time::sleep(Duration::from_millis(300)).await;
                        }
                        let read = req.into_body().collect().await.map(|b| b.to_bytes().len());
                        let answer = format!("{body} {version:?} {}", read.unwrap_or(0));
                        Ok::<_, std::convert::Infallible>(
                            http::Response::builder()
                                .header("cache-control", "no-store")
                                .body(Full::new(Bytes::from(answer)))
                                .unwrap(),
                        )
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn upstream_tls_is_verified_against_the_ca_and_can_speak_http2() {
    let dir = std::env::temp_dir().join(format!("larder-tls-up-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    write_cert(&dir, "origin", "origin.test");
    write_cert(&dir, "other", "other.test");
    let origin = tls_origin(&dir, "secure").await;
    let cluster = |ca: &str, http2: bool| {
        format!(
            "    tls: {{ ca_file: {:?}, server_name: origin.test }}\n    http2: {http2}\n",
            dir.join(ca).display().to_string()
        )
    };
    let yaml = |ca: &str, http2: bool| {
        config_yaml(origin, DEFAULT_TYPES).replace(
            "    request_timeout: 5s\n",
            &format!("    request_timeout: 5s\n{}", cluster(ca, http2)),
        )
    };
    let larder = Larder::start(&yaml("origin.crt", false)).await;
    let reply = larder.get("/s").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "secure HTTP/1.1 0");
    // An upload far larger than the socket buffers arrives whole: what TLS holds back after a
    // write goes out with a flush.
    let upload = Bytes::from(vec![b'u'; 8 << 20]);
    let post = larder
        .request(http::Method::POST, &larder.proxy_url("/up"), &[], upload)
        .await;
    assert_eq!(post.text(), format!("secure HTTP/1.1 {}", 8 << 20));

    let h2 = Larder::start(&yaml("origin.crt", true)).await;
    assert_eq!(h2.get("/s").await.text(), "secure HTTP/2.0 0");

    // A certificate the CA bundle does not vouch for is refused.
    let untrusting = Larder::start(&yaml("other.crt", false)).await;
    assert_eq!(untrusting.get("/s").await.status, 502);

    // A CA file that does not load stops the start, naming the cluster and the file.
    let config = larder_config::load_str(&yaml("missing.crt", false), "test.yaml").unwrap();
    let error = match larder::start(config, larder::StartOptions::default()).await {
        Ok(_) => panic!("started without its CA file"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        error.contains("missing.crt") && error.contains("origin"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_over_tls_responses_finished_together_all_arrive_whole() {
    // Over TLS the batched writes pass through the TLS session before the socket.
    let dir = std::env::temp_dir().join(format!("larder-tls-batch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let a = write_cert(&dir, "a", "a.test");
    let _b = write_cert(&dir, "b", "b.test");
    let origin = batch_origin().await;
    let larder = Larder::start(&tls_yaml(origin.addr, &dir)).await;
    let (_, alpn, stream) = handshake(
        &connector(&[&a], &[b"h2"]),
        larder.server.proxy_addrs[0],
        "a.test",
    )
    .await;
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    let (h2, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    for round in ["miss", "hit"] {
        let requests = (0..40).map(|i| {
            let mut h2 = h2.clone();
            let path = format!("/obj/{i}");
            tokio::spawn(async move {
                let request = http::Request::get(format!("https://a.test{path}"))
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let response = h2.send_request(request).await.unwrap();
                let status = response
                    .headers()
                    .get("cache-status")
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default();
                let body = response.into_body().collect().await.unwrap().to_bytes();
                (path, status, body)
            })
        });
        for request in requests.collect::<Vec<_>>() {
            let (path, status, body) = request.await.unwrap();
            check_batch_response(round, &path, &status, &body);
        }
    }
    assert_eq!(origin.count(), 40);
    std::fs::remove_dir_all(&dir).ok();
}

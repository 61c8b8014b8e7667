//! Purges over Redis Pub/Sub, against a real `redis-server` (the `redis` feature; the full test
//! script installs the server). Without the program the test fails under `CI=true` and says
//! it skipped otherwise.
#![cfg(feature = "redis")]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use http::Method;

struct RedisServer {
    child: Child,
    addr: SocketAddr,
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One RESP command over a fresh connection; the raw reply.
fn redis_command(addr: SocketAddr, args: &[&str]) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut command = format!("*{}\r\n", args.len());
    for arg in args {
        command.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    stream.write_all(command.as_bytes())?;
    let mut buf = [0u8; 512];
    let n = stream.read(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn start_redis() -> Option<RedisServer> {
    let available = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok();
    if !available {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "redis-server is not installed (scripts/test.sh installs it)"
        );
        eprintln!("SKIPPED: redis-server is not installed; run ./scripts/test.sh");
        return None;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server starts");
    let server = RedisServer {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !redis_command(server.addr, &["PING"]).is_ok_and(|r| r.starts_with("+PONG")) {
        assert!(Instant::now() < deadline, "redis-server did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(server)
}

async fn wait_until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_purge_at_one_replica_reaches_the_other_over_redis() {
    let Some(redis) = start_redis() else { return };
    let origin = Origin::start(|seen| async move {
        let key = format!("item-{}", seen.uri.path().trim_start_matches('/'));
        response(
            200,
            &[("cache-control", "max-age=600"), ("surrogate-key", &key)],
            "x",
        )
    })
    .await;
    let yaml = format!(
        "{}purge: {{ redis: {{ url: \"redis://{}\", channel: larder-test }} }}\n",
        config_yaml(origin.addr, DEFAULT_TYPES),
        redis.addr
    );
    let a = Larder::start(&yaml).await;
    let b = Larder::start(&yaml).await;
    wait_until("both replicas subscribed", async || {
        redis_command(redis.addr, &["PUBSUB", "NUMSUB", "larder-test"])
            .is_ok_and(|r| r.ends_with(":2\r\n"))
    })
    .await;
    for larder in [&a, &b] {
        larder.get("/1").await;
        larder.get("/2").await;
        assert!(larder.get("/1").await.cache_status().contains("hit"));
    }

    let reply = a.admin(Method::POST, "/purge?tag=item-1", &[]).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let json = reply.json();
    assert_eq!(json["purged"], 1);
    assert_eq!(json["peers"][0]["status"], "ok", "{json}");
    assert!(
        json["peers"][0]["peer"]
            .as_str()
            .unwrap()
            .starts_with("redis://")
    );

    wait_until("the other replica applied it", async || {
        metric(
            &b.metrics().await,
            r#"larder_purge_requests_total{source="redis",result="ok"}"#,
        ) == Some(1.0)
    })
    .await;
    assert!(!b.get("/1").await.cache_status().contains("hit"));
    assert!(b.get("/2").await.cache_status().contains("hit"));

    // The other way round; once a has applied b's purge, it has read its own earlier message
    // from the channel too (one connection, in order), and ignored it.
    let reply = b.admin(Method::POST, "/purge?tag=item-2", &[]).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    wait_until("the first replica applied it", async || {
        metric(
            &a.metrics().await,
            r#"larder_purge_requests_total{source="redis",result="ok"}"#,
        ) == Some(1.0)
    })
    .await;
    assert!(!a.get("/2").await.cache_status().contains("hit"));
    let a_metrics = a.metrics().await;
    assert_eq!(
        metric(
            &a_metrics,
            r#"larder_purge_requests_total{source="redis",result="duplicate"}"#
        ),
        None,
        "its own message is skipped, not even counted as a duplicate"
    );
}

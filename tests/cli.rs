//! The `larder` binary as an operator runs it.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_larder");

fn temp_file(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("larder-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn version_and_help() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("larder {}", env!("CARGO_PKG_VERSION"))
    );
    let help = Command::new(BIN).arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&help.stdout);
    for flag in ["--config", "--upstream", "--listen", "--admin", "validate"] {
        assert!(text.contains(flag), "--help lacks {flag}:\n{text}");
    }
}

#[test]
fn validate_accepts_the_sample_config() {
    let sample = concat!(env!("CARGO_MANIFEST_DIR"), "/larder.example.yaml");
    let out = Command::new(BIN)
        .args(["validate", "--config", sample])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn validate_reports_every_error_with_file_line_and_key() {
    let path = temp_file(
        "bad.yaml",
        r#"virtual_hosts:
  - name: all
    domains: ["*"]
    routes:
      - match: { prefix: "/" }
        cluster: missing
clusters:
  - name: origin
    endpoints: ["127.0.0.1:9000"]
    connect_timeout: 5 parsecs
resource_type:
  name: default
  config:
    ttl: 300s # 5 minutes
    cache_size: 50MB
"#,
    );
    let out = Command::new(BIN)
        .args(["validate", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let file = path.display().to_string();
    assert!(stderr.contains(&format!("{file}:6:")), "{stderr}");
    assert!(
        stderr.contains("virtual_hosts[0].routes[0].cluster"),
        "{stderr}"
    );
    assert!(stderr.contains(&format!("{file}:10:")), "{stderr}");
    assert!(stderr.contains("clusters[0].connect_timeout"), "{stderr}");

    let unknown = temp_file(
        "unknown.yaml",
        "clusters: []\nvirtual_hosts: []\ncache_sise: 1GiB\n",
    );
    let out = Command::new(BIN)
        .args(["validate", "--config"])
        .arg(&unknown)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(":3:") && stderr.contains("cache_sise"),
        "{stderr}"
    );
}

#[test]
fn the_guide_shorthand_config_runs() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let origin = rt.block_on(Origin::fixed(200, &[], "guide"));
    let path = temp_file(
        "guide.yaml",
        &format!(
            r#"listeners: [{{ address: "127.0.0.1:0" }}]
admin: {{ address: "127.0.0.1:0" }}
virtual_hosts:
  - name: all
    domains: ["*"]
    routes:
      - match: {{ prefix: "/" }}
        cluster: origin
clusters:
  - name: origin
    endpoints: ["{}"]
resource_type:
  name: default
  config:
    ttl: 300s # 5 minutes
    cache_size: 50MB
"#,
            origin.addr
        ),
    );
    let (_larder, proxy, _) = spawn(&["--config", path.to_str().unwrap()]);
    let client = client();
    let url = format!("http://{proxy}/guide");
    let (first, second) = rt.block_on(async {
        let a = send(&client, http::Method::GET, &url, &[], bytes::Bytes::new()).await;
        let b = send(&client, http::Method::GET, &url, &[], bytes::Bytes::new()).await;
        (a, b)
    });
    assert!(first.cache_status().contains("fwd=uri-miss"));
    assert!(
        second.cache_status().contains("hit; ttl=300") || second.cache_status().contains("ttl=299"),
        "{}",
        second.cache_status()
    );
    assert_eq!(origin.count(), 1);
}

#[test]
fn quick_mode_caches_in_front_of_an_upstream() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let origin = rt.block_on(Origin::fixed(
        200,
        &[("cache-control", "max-age=60")],
        "quick",
    ));
    let upstream = format!("http://{}", origin.addr);
    let (_larder, proxy, admin) = spawn(&[
        "--upstream",
        &upstream,
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
    ]);
    let client = client();
    rt.block_on(async {
        for expect in ["fwd=uri-miss", "hit"] {
            let reply = send(
                &client,
                http::Method::GET,
                &format!("http://{proxy}/q"),
                &[],
                bytes::Bytes::new(),
            )
            .await;
            assert_eq!(reply.text(), "quick");
            reply.assert_cache_status(expect);
        }
        let metrics = send(
            &client,
            http::Method::GET,
            &format!("http://{admin}/metrics"),
            &[],
            bytes::Bytes::new(),
        )
        .await;
        assert!(metrics.text().contains("larder_cache_lookups_total"));
    });
    assert_eq!(origin.count(), 1);
}

#[test]
fn no_arguments_runs_the_embedded_demo_and_stops_on_sigterm() {
    let (mut larder, proxy, _) = spawn(&["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = client();
    rt.block_on(async {
        let first = send(
            &client,
            http::Method::GET,
            &format!("http://{proxy}/time"),
            &[],
            bytes::Bytes::new(),
        )
        .await;
        let second = send(
            &client,
            http::Method::GET,
            &format!("http://{proxy}/time"),
            &[],
            bytes::Bytes::new(),
        )
        .await;
        assert_eq!(first.status, 200);
        assert!(first.cache_status().contains("fwd=uri-miss"));
        second.assert_cache_status("hit");
        assert_eq!(first.body, second.body, "a hit repeats the origin's clock");
    });
    let pid = larder.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = larder.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "larder did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
}

#[test]
fn own_logs_can_be_json_and_a_bad_filter_is_a_clear_error() {
    let origin_free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let origin = origin_free.local_addr().unwrap();
    // Relaying purges without a token makes Larder warn at start-up: a log line to look at.
    let yaml = format!(
        "listeners: [{{ address: \"127.0.0.1:0\" }}]\nadmin: {{ address: \"127.0.0.1:0\" }}\naccess_log: {{ enabled: false }}\nlog: {{ level: \"warn\", format: json }}\npurge: {{ peers: {{ static: [\"127.0.0.1:1\"] }} }}\nvirtual_hosts:\n  - name: all\n    domains: [\"*\"]\n    routes: [{{ match: {{ prefix: / }}, cluster: origin }}]\nclusters:\n  - name: origin\n    endpoints: [\"{origin}\"]\n"
    );
    let path = temp_file("json-log.yaml", &yaml);
    let mut child = Command::new(BIN)
        .args(["--config", path.to_str().unwrap()])
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let running = Running(child);
    let mut json_lines = Vec::new();
    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
        if line.trim_start().starts_with("admin listening") {
            break;
        }
        if let Ok(value) = serde_json::from_str::<serde_json::Value>(&line) {
            json_lines.push(value);
        }
    }
    drop(running);
    let warning = json_lines
        .iter()
        .find(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.contains("no admin token"))
        })
        .unwrap_or_else(|| panic!("no JSON warning among {json_lines:?}"));
    assert_eq!(warning["level"], "WARN");

    let bad = temp_file(
        "bad-log.yaml",
        &yaml.replace("level: \"warn\"", "level: \"info,=[\""),
    );
    let out = Command::new(BIN)
        .args(["--config", bad.to_str().unwrap()])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("log.level"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_lets_every_accepted_request_finish() {
    sigterm_under_load(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_with_connection_threads_lets_every_accepted_request_finish() {
    sigterm_under_load(&[("LARDER_CONNECTION_THREADS", "2")]).await;
}

async fn sigterm_under_load(env: &[(&str, &str)]) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let origin = Origin::start(|seen| async move {
        let pause = if seen.uri.path() == "/slow" { 1000 } else { 20 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
        response(200, &[("cache-control", "no-store")], "complete body")
    })
    .await;
    let yaml = format!(
        "listeners: [{{ address: \"127.0.0.1:0\" }}]\nadmin: {{ address: \"127.0.0.1:0\" }}\naccess_log: {{ enabled: false }}\ndrain: {{ delay: 300ms, timeout: 10s }}\nvirtual_hosts:\n  - name: all\n    domains: [\"*\"]\n    routes: [{{ match: {{ prefix: / }}, cluster: origin }}]\nclusters:\n  - name: origin\n    endpoints: [\"{}\"]\n",
        origin.addr
    );
    // One file per variant: the binary watches its config, and the two variants run at once.
    let path = temp_file(&format!("drain-{}.yaml", env.len()), &yaml);
    let (running, proxy, admin) =
        tokio::task::block_in_place(|| spawn_with_env(&["--config", path.to_str().unwrap()], env));
    let pid = running.0.id();

    async fn get(
        client: &hyper_util::client::legacy::Client<
            hyper_util::client::legacy::connect::HttpConnector,
            http_body_util::Full<bytes::Bytes>,
        >,
        url: String,
    ) -> Result<(u16, bool, bytes::Bytes), String> {
        use http_body_util::BodyExt;
        let request = http::Request::get(url)
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let response = client
            .request(request)
            .await
            .map_err(|e| format!("{e:?}"))?;
        let status = response.status().as_u16();
        let closing = response
            .headers()
            .get("connection")
            .is_some_and(|v| v == "close");
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body cut: {e}"))?
            .to_bytes();
        Ok((status, closing, body))
    }

    let ok = Arc::new(AtomicUsize::new(0));
    let failures: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let mut clients = Vec::new();
    for _ in 0..16 {
        let (ok, failures) = (ok.clone(), failures.clone());
        clients.push(tokio::spawn(async move {
            let client = client();
            // Bounded: at most 5,000 requests per client. A client stops when told the
            // connection closes, as a load balancer stops routing to a replica whose
            // readiness failed: from then on nothing new arrives, as in a real drain.
            for _ in 0..5_000 {
                match get(&client, format!("http://{proxy}/load")).await {
                    Ok((200, closing, body)) if body == "complete body" => {
                        ok.fetch_add(1, Ordering::SeqCst);
                        if closing {
                            return;
                        }
                    }
                    Ok((status, _, _)) => failures.lock().unwrap().push(format!("status {status}")),
                    Err(e) => failures.lock().unwrap().push(e),
                }
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while ok.load(Ordering::SeqCst) < 200 {
        assert!(Instant::now() < deadline, "no load");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A slow request that is still in flight when the listeners close.
    let slow = tokio::spawn(async move { get(&client(), format!("http://{proxy}/slow")).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let signalled = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // Readiness fails as soon as the signal is handled (`kill` returns before that), while
    // the listener still serves (drain.delay; the clients below check that side).
    let admin_client = client();
    loop {
        let ready = send(
            &admin_client,
            http::Method::GET,
            &format!("http://{admin}/ready"),
            &[],
            bytes::Bytes::new(),
        )
        .await;
        if ready.status == 503 {
            break;
        }
        assert_eq!(ready.status, 200, "readiness is 200 or 503, nothing else");
        assert!(
            signalled.elapsed() < Duration::from_secs(5),
            "readiness still passes 5 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for c in clients {
        tokio::time::timeout(Duration::from_secs(20), c)
            .await
            .expect("every client is told to go elsewhere")
            .unwrap();
    }
    let (status, _, body) = slow
        .await
        .unwrap()
        .expect("the in-flight request completes");
    assert_eq!((status, &body[..]), (200, &b"complete body"[..]));
    let mut running = running;
    let exit = tokio::task::block_in_place(|| running.0.wait()).unwrap();
    assert!(exit.success(), "{exit:?}");
    assert!(
        signalled.elapsed() < Duration::from_secs(10),
        "exited within the drain timeout"
    );
    // The listeners are closed now.
    assert!(
        std::net::TcpStream::connect_timeout(&proxy, Duration::from_secs(1)).is_err(),
        "still accepting after exit"
    );
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_reloads_when_the_file_changes_and_on_sighup() {
    let a = Origin::fixed(200, &[("cache-control", "no-store")], "from a").await;
    let b = Origin::fixed(200, &[("cache-control", "no-store")], "from b").await;
    let config = |cluster: &str| {
        format!(
            "listeners: [{{ address: \"127.0.0.1:0\" }}]\nadmin: {{ address: \"127.0.0.1:0\" }}\naccess_log: {{ enabled: false }}\nvirtual_hosts:\n  - name: all\n    domains: [\"*\"]\n    routes: [{{ match: {{ prefix: / }}, cluster: {cluster} }}]\nclusters:\n  - name: a\n    endpoints: [\"{}\"]\n  - name: b\n    endpoints: [\"{}\"]\n",
            a.addr, b.addr
        )
    };
    let dir = std::env::temp_dir().join(format!("larder-cli-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("larder.yaml");
    std::fs::write(&path, config("a")).unwrap();
    let (running, proxy, admin) =
        tokio::task::block_in_place(|| spawn(&["--config", path.to_str().unwrap()]));
    let http = client();
    let get = |url: String| {
        let http = http.clone();
        async move { send(&http, http::Method::GET, &url, &[], bytes::Bytes::new()).await }
    };
    assert_eq!(get(format!("http://{proxy}/x")).await.text(), "from a");
    let generation = |admin: SocketAddr| async move {
        get(format!("http://{admin}/config_dump")).await.json()["generation"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(generation(admin).await, 1);

    // Replaced the way editors and ConfigMap updates do: a new file renamed over the old.
    let staged = dir.join(".larder.yaml.new");
    std::fs::write(&staged, config("b")).unwrap();
    std::fs::rename(&staged, &path).unwrap();
    // The watcher acts on its own schedule: poll the process (bounded) for the new version.
    let deadline = Instant::now() + Duration::from_secs(15);
    while generation(admin).await != 2 {
        assert!(
            Instant::now() < deadline,
            "the file change was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(get(format!("http://{proxy}/x")).await.text(), "from b");

    // SIGHUP reloads even when the file is the same.
    let status = Command::new("kill")
        .args(["-HUP", &running.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    while generation(admin).await != 3 {
        assert!(Instant::now() < deadline, "SIGHUP did not reload");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(get(format!("http://{proxy}/x")).await.text(), "from b");
    drop(running);
}

#[test]
fn connection_threads_serve_both_protocols_and_pool_upstream_connections() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let origin = rt.block_on(Origin::start(|seen| async move {
        let cache_control = if seen.uri.path() == "/hit" {
            "max-age=60"
        } else {
            "no-store"
        };
        response(200, &[("cache-control", cache_control)], "threaded")
    }));
    let upstream = format!("http://{}", origin.addr);
    let (_larder, proxy, admin) = spawn_with_env(
        &[
            "--upstream",
            &upstream,
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ],
        &[("LARDER_CONNECTION_THREADS", "2")],
    );
    rt.block_on(async {
        // Four client connections, handed to the two threads in turn; each sends requests
        // one after another, so each thread needs one upstream connection at a time.
        for _ in 0..4 {
            let mut sender = http1_connection(proxy).await;
            for path in ["/pass", "/hit", "/pass", "/hit"] {
                let request = http::Request::get(path)
                    .header("host", "threads.test")
                    .body(http_body_util::Empty::<bytes::Bytes>::new())
                    .unwrap();
                sender.ready().await.unwrap();
                let response = sender.send_request(request).await.unwrap();
                assert_eq!(response.status(), 200);
                let body = http_body_util::BodyExt::collect(response.into_body())
                    .await
                    .unwrap()
                    .to_bytes();
                assert_eq!(&body[..], b"threaded");
            }
        }
        // HTTP/2 (prior knowledge) on a connection thread: its streams run there too.
        let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http::<http_body_util::Full<bytes::Bytes>>();
        // Keyed by its authority, not the Host above: fetched once more, then hit.
        for expect in ["fwd=uri-miss", "hit", "hit"] {
            let reply = send(
                &h2,
                http::Method::GET,
                &format!("http://{proxy}/hit"),
                &[],
                bytes::Bytes::new(),
            )
            .await;
            assert_eq!(reply.text(), "threaded");
            reply.assert_cache_status(expect);
        }
        let metrics = send(
            &client(),
            http::Method::GET,
            &format!("http://{admin}/metrics"),
            &[],
            bytes::Bytes::new(),
        )
        .await
        .text();
        let open = metric(
            &metrics,
            r#"larder_upstream_connections{cluster="upstream"}"#,
        )
        .expect("the upstream connections gauge");
        assert!(
            (1.0..=2.0).contains(&open),
            "one pooled connection per thread at most, got {open}"
        );
    });
    // Every pass-through reached the origin; each cached URL was fetched once.
    assert_eq!(origin.count(), 4 * 2 + 2);
}

/// An HTTP/1.1 connection of its own to `proxy`.
async fn http1_connection(
    proxy: std::net::SocketAddr,
) -> hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>> {
    let stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let (sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    sender
}

/// Resident memory of a process, from /proc.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib << 10
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preallocated_cache_holds_its_budget_from_the_start_and_still_caches() {
    const BUDGET: u64 = 96 << 20;
    let origin = Origin::fixed(200, &[("cache-control", "max-age=60")], "stored").await;
    let config = |preallocate: bool| {
        format!(
            "listeners: [{{ address: \"127.0.0.1:0\" }}]\nadmin: {{ address: \"127.0.0.1:0\" }}\naccess_log: {{ enabled: false }}\ncache: {{ cache_size: 96MiB, preallocate: {preallocate} }}\nvirtual_hosts:\n  - name: all\n    domains: [\"*\"]\n    routes: [{{ match: {{ prefix: / }}, cluster: origin }}]\nclusters:\n  - name: origin\n    endpoints: [\"{}\"]\n",
            origin.addr
        )
    };
    let http = client();
    for preallocate in [false, true] {
        let path = temp_file(
            &format!("prealloc-{preallocate}.yaml"),
            &config(preallocate),
        );
        // mimalloc told to return freed memory at once: only preallocation's own setting (made
        // after the allocator read this) keeps the budget resident.
        let (running, proxy, _admin) = tokio::task::block_in_place(|| {
            spawn_with_env(
                &["--config", path.to_str().unwrap()],
                &[("MIMALLOC_PURGE_DELAY", "0")],
            )
        });
        let pid = running.0.id();
        let at_start = rss_bytes(pid);
        // Served, stored and hit as without it.
        for expect in ["fwd=uri-miss", "hit"] {
            let reply = send(
                &http,
                http::Method::GET,
                &format!("http://{proxy}/p"),
                &[],
                bytes::Bytes::new(),
            )
            .await;
            assert_eq!(reply.text(), "stored");
            reply.assert_cache_status(expect);
        }
        let after = rss_bytes(pid);
        if preallocate {
            // The budget is resident from the start and stays so (freed memory is kept).
            assert!(at_start >= BUDGET, "{} MiB at start", at_start >> 20);
            assert!(after >= BUDGET, "{} MiB after requests", after >> 20);
        } else {
            assert!(at_start < BUDGET / 2, "{} MiB at start", at_start >> 20);
        }
    }
}

//! Hot reload: validate → diff → swap, keeping the cache of unchanged resource types, and a
//! bad file changing nothing.

mod common;

use std::net::SocketAddr;

use common::*;
use http::Method;

fn yaml(a: SocketAddr, b: SocketAddr, extra_route: bool, cache_size: &str) -> String {
    let route_b = if extra_route {
        "      - match: { prefix: \"/b\" }\n        cluster: b\n"
    } else {
        ""
    };
    config_yaml_with(
        &format!("{route_b}      - match: {{ prefix: \"/\" }}\n        cluster: a\n"),
        &format!("  - name: a\n    endpoints: [\"{a}\"]\n  - name: b\n    endpoints: [\"{b}\"]\n"),
        &format!(
            "resource_types:\n  - name: default\n    config: {{ cache_size: {cache_size} }}\n"
        ),
    )
}

/// Larder started from a config file (written from `yaml` into a directory of this test's
/// own), which the test then rewrites and reloads.
async fn start_from_file(test: &str, yaml: &str) -> (Larder, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("larder-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("larder.yaml");
    std::fs::write(&path, yaml).unwrap();
    let config = larder_config::load_file(&path).unwrap();
    let larder = Larder {
        server: larder::start(config, larder::StartOptions::default())
            .await
            .unwrap(),
        client: client(),
    };
    (larder, path)
}

#[tokio::test]
async fn reload_swaps_routes_keeps_unchanged_caches_and_rejects_bad_files() {
    let a = Origin::fixed(200, &[("cache-control", "max-age=600")], "from a").await;
    let b = Origin::fixed(200, &[("cache-control", "max-age=600")], "from b").await;
    let (larder, path) = start_from_file("reload", &yaml(a.addr, b.addr, false, "16MiB")).await;
    larder.get("/kept").await;
    assert!(larder.get("/kept").await.cache_status().contains("hit"));
    assert_eq!(larder.get("/b/x").await.text(), "from a");

    // A new route: swapped in, and the unchanged resource type keeps what it stored.
    std::fs::write(&path, yaml(a.addr, b.addr, true, "16MiB")).unwrap();
    assert_eq!(larder.server.reload_from_file(&path), Ok(2));
    assert_eq!(larder.get("/b/y").await.text(), "from b");
    let kept = larder.get("/kept").await;
    kept.assert_cache_status("hit");
    assert_eq!(a.count(), 2, "no refetch of /kept");
    let dump = larder.admin(Method::GET, "/config_dump", &[]).await.json();
    assert_eq!(dump["generation"], 2);

    // A bad file: every error reported, nothing changes.
    std::fs::write(
        &path,
        yaml(a.addr, b.addr, true, "16MiB").replace("cluster: b", "cluster: nowhere"),
    )
    .unwrap();
    let error = larder.server.reload_from_file(&path).unwrap_err();
    assert!(error.contains("nowhere"), "{error}");
    assert!(
        error.contains("larder.yaml"),
        "the error names the file: {error}"
    );
    assert_eq!(larder.get("/b/z").await.text(), "from b");
    assert_eq!(
        larder.admin(Method::GET, "/config_dump", &[]).await.json()["generation"],
        2
    );

    // A resized resource type starts empty.
    std::fs::write(&path, yaml(a.addr, b.addr, true, "32MiB")).unwrap();
    assert_eq!(larder.server.reload_from_file(&path), Ok(3));
    assert!(!larder.get("/kept").await.cache_status().contains("hit"));

    let metrics = larder.metrics().await;
    assert_eq!(
        metric(&metrics, r#"larder_config_reloads_total{result="success"}"#),
        Some(3.0),
        "the start and two reloads"
    );
    assert_eq!(
        metric(&metrics, r#"larder_config_reloads_total{result="failure"}"#),
        Some(1.0)
    );
}

#[tokio::test]
async fn a_purge_during_a_reload_still_beats_a_fill_of_the_previous_config() {
    // The purge history is shared across configs: a fill that began under generation 1 and
    // commits after a reload and a purge must not be stored.
    let gated = GatedOrigin::start(&[("cache-control", "max-age=600")], "old").await;
    let other = Origin::fixed(200, &[], "unused").await;
    let yaml_first = yaml(gated.origin.addr, other.addr, false, "16MiB");
    let (larder, path) = start_from_file("reload-race", &yaml_first).await;
    let url = larder.proxy_url("/race");
    let c = larder.client.clone();
    let fill =
        tokio::spawn(async move { send(&c, Method::GET, &url, &[], bytes::Bytes::new()).await });
    gated.arrived("the fill").await;
    std::fs::write(&path, yaml(gated.origin.addr, other.addr, true, "16MiB")).unwrap();
    assert_eq!(larder.server.reload_from_file(&path), Ok(2));
    larder
        .admin(Method::POST, "/purge?hostname=127.0.0.1&path=/race", &[])
        .await;
    gated.release_one();
    assert_eq!(fill.await.unwrap().text(), "old");
    let url = larder.proxy_url("/race");
    let c = larder.client.clone();
    let again =
        tokio::spawn(async move { send(&c, Method::GET, &url, &[], bytes::Bytes::new()).await });
    gated
        .arrived("the purged fill was not stored: the origin is asked again")
        .await;
    gated.release_one();
    assert!(!again.await.unwrap().cache_status().contains("hit"));
}

/// A stored response keeps the fields it was stored with: a reload that starts hiding tag
/// headers must not let a hit (written from the stored fields as they are) show them.
#[tokio::test]
async fn a_reload_that_hides_tag_headers_never_serves_them_from_the_cache() {
    let origin = Origin::fixed(
        200,
        &[("cache-control", "max-age=600"), ("surrogate-key", "tag-1")],
        "tagged",
    )
    .await;
    let with_strip = |strip: bool| {
        config_yaml(origin.addr, DEFAULT_TYPES)
            + &format!("purge: {{ strip_tag_headers: {strip} }}\n")
    };
    let (larder, path) = start_from_file("reload-tags", &with_strip(false)).await;
    larder.get("/t").await;
    let hit = larder.get("/t").await;
    assert!(hit.cache_status().contains("hit"), "{}", hit.cache_status());
    assert_eq!(
        hit.header("surrogate-key"),
        "tag-1",
        "shown while not hidden"
    );

    std::fs::write(&path, with_strip(true)).unwrap();
    assert_eq!(larder.server.reload_from_file(&path), Ok(2));
    for _ in 0..2 {
        let after = larder.get("/t").await;
        assert_eq!(
            after.header("surrogate-key"),
            "",
            "{}",
            after.cache_status()
        );
        assert_eq!(after.text(), "tagged");
    }
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[tokio::test]
async fn a_reload_that_only_changes_preallocate_keeps_the_cache() {
    // Read at start only: a reload neither applies it nor empties what is stored for it.
    let a = Origin::fixed(200, &[("cache-control", "max-age=600")], "from a").await;
    let b = Origin::fixed(200, &[("cache-control", "max-age=600")], "from b").await;
    let base = yaml(a.addr, b.addr, false, "16MiB");
    let (larder, path) = start_from_file("reload-preallocate", &base).await;
    larder
        .get("/kept")
        .await
        .assert_cache_status("fwd=uri-miss");
    std::fs::write(&path, format!("{base}cache:\n  preallocate: true\n")).unwrap();
    assert_eq!(larder.server.reload_from_file(&path), Ok(2));
    larder.get("/kept").await.assert_cache_status("hit");
    assert_eq!(a.count(), 1, "no refetch of /kept");
}

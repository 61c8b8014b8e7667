//! Kubernetes EndpointSlice discovery against an in-process API server that speaks the
//! list/watch JSON: ready endpoints only, the port by name, slices merged, and the cluster
//! following MODIFIED and DELETED events.
#![cfg(feature = "kubernetes")]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Method;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

/// A slice of Service `app` in namespace `shop` with one endpoint on `port` (named `http`,
/// beside a `metrics` port nothing listens on).
fn slice(name: &str, port: u16, ready: Option<bool>) -> Value {
    let mut endpoint = json!({ "addresses": ["127.0.0.1"] });
    if let Some(ready) = ready {
        endpoint["conditions"] = json!({ "ready": ready });
    }
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": "shop",
            "resourceVersion": "10",
            "labels": { "kubernetes.io/service-name": "app" }
        },
        "addressType": "IPv4",
        "endpoints": [endpoint],
        "ports": [
            { "name": "metrics", "port": closed_address().port(), "protocol": "TCP" },
            { "name": "http", "port": port, "protocol": "TCP" }
        ]
    })
}

/// The API server: answers the list with `initial`, then streams what `events` sends to every
/// watch, announcing each watch on `watching`.
struct ApiServer {
    origin: Origin,
    events: broadcast::Sender<Value>,
    watching: tokio::sync::Mutex<mpsc::UnboundedReceiver<()>>,
}

impl ApiServer {
    async fn start(initial: Vec<Value>) -> ApiServer {
        let (events, _) = broadcast::channel::<Value>(16);
        let (watch_started, watching) = mpsc::unbounded_channel();
        let sender = events.clone();
        let initial = Arc::new(Mutex::new(initial));
        let origin = Origin::start(move |seen| {
            let query = seen.uri.query().unwrap_or_default().to_owned();
            let subscribed = sender.subscribe();
            let watch_started = watch_started.clone();
            let items = initial.lock().unwrap().clone();
            async move {
                let ok = |body: TestBody| {
                    http::Response::builder()
                        .header("content-type", "application/json")
                        .body(body)
                        .unwrap()
                };
                if !query
                    .split('&')
                    .any(|p| p == "watch=true" || p == "watch=1")
                {
                    let list = json!({
                        "apiVersion": "discovery.k8s.io/v1",
                        "kind": "EndpointSliceList",
                        "metadata": { "resourceVersion": "10" },
                        "items": items
                    });
                    return ok(body_of(list.to_string()));
                }
                let _ = watch_started.send(());
                let lines = futures_util::stream::unfold(subscribed, |mut subscribed| async move {
                    let event = subscribed.recv().await.ok()?;
                    let line = Bytes::from(format!("{event}\n"));
                    Some((
                        Ok::<_, BoxError>(hyper::body::Frame::data(line)),
                        subscribed,
                    ))
                });
                ok(http_body_util::BodyExt::boxed_unsync(
                    http_body_util::StreamBody::new(lines),
                ))
            }
        })
        .await;
        ApiServer {
            origin,
            events,
            watching: tokio::sync::Mutex::new(watching),
        }
    }

    async fn watch_started(&self) {
        tokio::time::timeout(Duration::from_secs(10), self.watching.lock().await.recv())
            .await
            .expect("Larder starts watching EndpointSlices")
            .unwrap();
    }

    fn send(&self, kind: &str, object: Value) {
        self.events
            .send(json!({ "type": kind, "object": object }))
            .expect("a watch is open");
    }
}

fn config(api: SocketAddr) -> String {
    config_yaml_with(
        "      - match: { prefix: \"/\" }\n        cluster: app\n",
        &format!(
            "  - name: app\n    connect_timeout: 1s\n    kubernetes:\n      service: app\n      namespace: shop\n      port: http\n      api_server: \"http://{api}\"\n"
        ),
        DEFAULT_TYPES,
    )
}

async fn endpoints(larder: &Larder) -> Vec<String> {
    let dump = larder.admin(Method::GET, "/clusters", &[]).await.json();
    let mut list: Vec<String> = dump["clusters"][0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["address"].as_str().unwrap().to_owned())
        .collect();
    list.sort();
    list
}

/// Polls `/clusters` (bounded) until the cluster's endpoints are `want`.
async fn wait_for_endpoints(larder: &Larder, want: &[SocketAddr]) {
    let mut want: Vec<String> = want.iter().map(SocketAddr::to_string).collect();
    want.sort();
    for _ in 0..500 {
        if endpoints(larder).await == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "endpoints stayed {:?}, expected {want:?}",
        endpoints(larder).await
    );
}

#[tokio::test]
async fn endpoint_slices_give_ready_endpoints_on_the_named_port_and_follow_the_watch() {
    let a = Origin::fixed(200, &[("cache-control", "no-store")], "a").await;
    let b = Origin::fixed(200, &[("cache-control", "no-store")], "b").await;
    let api = ApiServer::start(vec![
        slice("app-a", a.addr.port(), None),
        slice("app-b", b.addr.port(), Some(false)),
    ])
    .await;
    let larder = Larder::start(&config(api.origin.addr)).await;

    // `b` is not ready, and the `metrics` port is never used.
    wait_for_endpoints(&larder, &[a.addr]).await;
    for _ in 0..4 {
        assert_eq!(larder.get("/").await.text(), "a");
    }
    let list = &api.origin.requests()[0];
    assert!(
        list.uri
            .path()
            .ends_with("/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices")
    );
    assert!(
        list.uri
            .query()
            .unwrap()
            .contains("labelSelector=kubernetes.io%2Fservice-name%3Dapp"),
        "{}",
        list.uri
    );

    api.watch_started().await;
    api.send("MODIFIED", slice("app-b", b.addr.port(), Some(true)));
    wait_for_endpoints(&larder, &[a.addr, b.addr]).await;
    let mut bodies: Vec<String> = Vec::new();
    for _ in 0..4 {
        bodies.push(larder.get("/").await.text());
    }
    assert!(
        bodies.contains(&"a".to_owned()) && bodies.contains(&"b".to_owned()),
        "{bodies:?}"
    );

    api.send("DELETED", slice("app-a", a.addr.port(), None));
    wait_for_endpoints(&larder, &[b.addr]).await;
    for _ in 0..4 {
        assert_eq!(larder.get("/").await.text(), "b");
    }

    // A slice going unready empties the cluster: 503, never a stale address.
    api.send("MODIFIED", slice("app-b", b.addr.port(), Some(false)));
    wait_for_endpoints(&larder, &[]).await;
    assert_eq!(larder.get("/").await.status, 503);
}

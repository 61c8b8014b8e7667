#![forbid(unsafe_code)]
//! The admin API (default 127.0.0.1:9901): purge, Prometheus metrics, readiness, config dump.
//! It talks to the cache only through [`Invalidator`], so cluster-wide purge can wrap it later
//! without changing this API.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use larder_cache::Invalidator;
use larder_telemetry::{Metrics, PurgeEvent};
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;

pub type ConfigDump = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

pub struct AdminState {
    pub invalidator: Arc<dyn Invalidator>,
    pub metrics: Arc<Metrics>,
    pub config_dump: ConfigDump,
    /// Bearer token required on mutating endpoints, when set. Never logged.
    pub token: Option<String>,
    /// Cleared when draining, so load balancers stop sending traffic before listeners close.
    pub ready: Arc<AtomicBool>,
}

pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/purge", post(purge))
        .route("/stats/prometheus", get(metrics))
        .route("/metrics", get(metrics))
        .route("/ready", get(ready))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/config_dump", get(config_dump))
        .fallback(|| async { json_error(StatusCode::NOT_FOUND, "no such admin endpoint") })
        .with_state(state)
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AdminState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router(state).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

fn json_error(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({ "error": message }))).into_response()
}

/// Checks the bearer token in constant time; `None` means the request may proceed.
fn unauthorized(state: &AdminState, headers: &HeaderMap) -> Option<Response> {
    let expected = state.token.as_deref()?;
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let ok = presented.is_some_and(|p| bool::from(p.as_bytes().ct_eq(expected.as_bytes())));
    if ok {
        return None;
    }
    let mut response = json_error(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"larder-admin\""),
    );
    Some(response)
}

#[derive(Deserialize)]
struct PurgeParams {
    hostname: Option<String>,
    path: Option<String>,
}

async fn purge(
    State(state): State<Arc<AdminState>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    params: Result<Query<PurgeParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if let Some(denied) = unauthorized(&state, &headers) {
        return denied;
    }
    let Ok(Query(params)) = params else {
        return json_error(StatusCode::BAD_REQUEST, "invalid query string");
    };
    let Some(hostname) = params.hostname.filter(|h| !h.is_empty()) else {
        return json_error(StatusCode::BAD_REQUEST, "missing query parameter: hostname");
    };
    let Some(target) = params.path.filter(|p| p.starts_with('/')) else {
        return json_error(
            StatusCode::BAD_REQUEST,
            "missing or invalid query parameter: path (must start with /)",
        );
    };
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target.as_str(), None),
    };
    let removed = state.invalidator.purge(&hostname, path, query);
    PurgeEvent {
        kind: "url",
        host: &hostname,
        path: &target,
        removed,
        client: Some(client),
    }
    .emit(&state.metrics);
    let status = if removed > 0 {
        StatusCode::OK
    } else {
        StatusCode::NOT_FOUND
    };
    (
        status,
        axum::Json(json!({ "hostname": hostname, "path": target, "purged": removed })),
    )
        .into_response()
}

async fn metrics(State(state): State<Arc<AdminState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

async fn ready(State(state): State<Arc<AdminState>>) -> Response {
    if state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    }
}

async fn config_dump(State(state): State<Arc<AdminState>>, headers: HeaderMap) -> Response {
    // The config holds no secret values, but it maps the topology: guard it like a mutation.
    if let Some(denied) = unauthorized(&state, &headers) {
        return denied;
    }
    let mut dump = (state.config_dump)();
    if let Some(obj) = dump.as_object_mut() {
        obj.insert(
            "admin_token_configured".into(),
            json!(state.token.is_some()),
        );
    }
    axum::Json(dump).into_response()
}

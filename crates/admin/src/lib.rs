#![forbid(unsafe_code)]
//! The admin API (default 127.0.0.1:9901): purge, Prometheus metrics, readiness, config dump.
//! Purges go through the [`Purger`], which applies them here and relays them to the other
//! replicas; this module only authenticates, parses and answers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use larder_purge::{PURGE_ID_HEADER, PurgeBody, Purger, RELAYED_BY_HEADER, Refusal, Source};
use larder_telemetry::Metrics;
use serde_json::json;
use subtle::ConstantTimeEq;

pub type ConfigDump = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

pub struct AdminState {
    pub purger: Arc<Purger>,
    pub metrics: Arc<Metrics>,
    pub config_dump: ConfigDump,
    /// Upstream clusters with each endpoint's health and load.
    pub clusters: ConfigDump,
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
        .route("/clusters", get(clusters))
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

/// `POST /purge`: the query form (`hostname` + `path`/`prefix`, `tag`, `soft`) or a JSON body
/// (`urls`, `prefixes`, `tags`, `hostname` + `paths`, `soft`). Answers with what was purged
/// here and on each peer.
async fn purge(
    State(state): State<Arc<AdminState>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    let header_text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let source = match header_text(RELAYED_BY_HEADER) {
        Some(instance) => Source::Peer {
            instance,
            addr: client,
        },
        None => Source::Admin(client),
    };
    if let Some(denied) = unauthorized(&state, &headers) {
        state.purger.refused(&source, "unauthorized");
        return denied;
    }
    let relayed_id = header_text(PURGE_ID_HEADER);
    if let Source::Peer { instance, .. } = &source
        && !(larder_purge::valid_id(instance)
            && relayed_id.as_deref().is_some_and(larder_purge::valid_id))
    {
        state.purger.refused(&source, "invalid");
        return json_error(
            StatusCode::BAD_REQUEST,
            "a relayed purge needs a purge id and an instance id (1-64 letters, digits, - or _)",
        );
    }
    if let Err(Refusal::RateLimited { retry_after }) = state.purger.admit(&source) {
        state.purger.refused(&source, "rate_limited");
        let mut response = json_error(
            StatusCode::TOO_MANY_REQUESTS,
            &format!(
                "too many purge requests; retry in {} ms",
                retry_after.as_millis().max(1)
            ),
        );
        let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        return response;
    }
    let query = query.unwrap_or_default();
    let order = if body.iter().all(u8::is_ascii_whitespace) {
        larder_purge::order_from_query(&query)
    } else if !query.is_empty() {
        Err("give the purge either as query parameters or as a JSON body, not both".into())
    } else {
        serde_json::from_slice::<PurgeBody>(&body)
            .map_err(|e| format!("invalid JSON body: {e}"))
            .and_then(PurgeBody::into_order)
    };
    let order = match order {
        Ok(order) => order,
        Err(message) => {
            state.purger.refused(&source, "invalid");
            return json_error(StatusCode::BAD_REQUEST, &message);
        }
    };
    let id = match &source {
        Source::Peer { .. } => relayed_id,
        _ => None,
    };
    let report = state.purger.purge(&order, source, id).await;
    let status = report.status();
    let mut answer = serde_json::to_value(&report).expect("a report always serializes");
    // The query form's answer has always echoed what was asked.
    if let Ok(pairs) = serde_urlencoded::from_str::<Vec<(String, String)>>(&query)
        && let Some(object) = answer.as_object_mut()
    {
        for (name, value) in pairs {
            if name == "hostname" || name == "path" {
                object.entry(name).or_insert(value.into());
            }
        }
    }
    (status, axum::Json(answer)).into_response()
}

/// OpenMetrics when the scraper asks for it (Prometheus does), else the classic text format.
async fn metrics(State(state): State<Arc<AdminState>>, headers: HeaderMap) -> Response {
    let open_metrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    if open_metrics {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            state.metrics.encode(),
        )
            .into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            state.metrics.encode_text(),
        )
            .into_response()
    }
}

async fn ready(State(state): State<Arc<AdminState>>) -> Response {
    if state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    }
}

async fn clusters(State(state): State<Arc<AdminState>>) -> Response {
    axum::Json((state.clusters)()).into_response()
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

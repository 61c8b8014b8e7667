//! Request tracing end to end: spans exported over OTLP/HTTP to an in-process receiver that
//! decodes the protobuf, with W3C and B3 context taken from the request and passed upstream.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value;
use prost::Message;

#[derive(Debug, Clone)]
struct Span {
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    /// OTLP: 1 internal, 2 server, 3 client.
    kind: i32,
    attributes: Vec<(String, String)>,
    service: String,
}

impl Span {
    fn attr(&self, key: &str) -> &str {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map_or("", |(_, v)| v.as_str())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An OTLP/HTTP traces endpoint that accepts only protobuf and keeps what it decodes.
async fn receiver() -> (SocketAddr, Arc<Mutex<Vec<Span>>>) {
    let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
    let shared = spans.clone();
    let server = Origin::start(move |seen| {
        let ok = seen.method == http::Method::POST
            && seen.uri.path() == "/v1/traces"
            && seen.header("content-type") == "application/x-protobuf";
        let decoded = ExportTraceServiceRequest::decode(&seen.body[..]);
        let (status, reply) = match (ok, decoded) {
            (true, Ok(export)) => {
                shared.lock().unwrap().extend(spans_in(export));
                (200, ExportTraceServiceResponse::default().encode_to_vec())
            }
            _ => (400, b"want OTLP protobuf".to_vec()),
        };
        async move { response(status, &[("content-type", "application/x-protobuf")], reply) }
    })
    .await;
    (server.addr, spans)
}

fn any_value(value: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn spans_in(export: ExportTraceServiceRequest) -> Vec<Span> {
    let mut spans = Vec::new();
    for resource in export.resource_spans {
        let service = resource
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .map(|kv| any_value(kv.value.as_ref()))
            .unwrap_or_default();
        for scope in resource.scope_spans {
            for s in scope.spans {
                spans.push(Span {
                    name: s.name,
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent: hex(&s.parent_span_id),
                    kind: s.kind,
                    attributes: s
                        .attributes
                        .iter()
                        .map(|kv| (kv.key.clone(), any_value(kv.value.as_ref())))
                        .collect(),
                    service: service.clone(),
                });
            }
        }
    }
    spans
}

/// Waits for the batch exporter to deliver spans of `trace` (it sends every second).
async fn spans_of(received: &Mutex<Vec<Span>>, trace: &str, count: usize) -> Vec<Span> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let spans: Vec<Span> = received
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id == trace)
            .cloned()
            .collect();
        if spans.len() >= count {
            return spans;
        }
        assert!(Instant::now() < deadline, "only {spans:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn traced_yaml(origin: SocketAddr, collector: SocketAddr) -> String {
    format!(
        "{}tracing: {{ endpoint: \"http://{collector}/v1/traces\", service_name: larder-test }}\n",
        config_yaml(origin, DEFAULT_TYPES)
    )
}

#[tokio::test]
async fn a_traced_miss_exports_server_cache_and_upstream_spans_under_the_callers_trace() {
    let (collector, received) = receiver().await;
    let origin = Origin::fixed(200, &[("cache-control", "max-age=60")], "x").await;
    let larder = Larder::start(&traced_yaml(origin.addr, collector)).await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let reply = larder
        .get_with(
            "/traced",
            &[("traceparent", &format!("00-{trace}-00f067aa0ba902b7-01"))],
        )
        .await;
    assert_eq!(reply.status, 200);

    let spans = spans_of(&received, trace, 3).await;
    let server = spans.iter().find(|s| s.kind == 2).expect("a server span");
    assert_eq!(
        server.parent, "00f067aa0ba902b7",
        "child of the caller's span"
    );
    // Named by method and route (config routes have generated names), never by raw path.
    assert!(server.name.starts_with("GET "), "{}", server.name);
    assert!(!server.name.contains("/traced"), "{}", server.name);
    assert_eq!(server.attr("url.path"), "/traced");
    assert_eq!(server.attr("http.response.status_code"), "200");
    assert_eq!(server.attr("larder.cache.result"), "miss");
    assert_eq!(server.attr("http.request.method"), "GET");
    assert_eq!(server.service, "larder-test");
    let lookup = spans.iter().find(|s| s.name == "cache lookup").unwrap();
    assert_eq!(lookup.parent, server.span_id);
    assert_eq!(lookup.attr("larder.cache.lookup"), "miss");
    let upstream = spans.iter().find(|s| s.kind == 3).expect("a client span");
    assert_eq!(upstream.parent, server.span_id);
    assert_eq!(upstream.attr("http.response.status_code"), "200");
    assert_eq!(upstream.attr("server.address"), origin.addr.to_string());

    // The origin saw the upstream span as its parent, in both W3C and B3 form.
    let seen = origin.last();
    assert_eq!(
        seen.header("traceparent"),
        format!("00-{trace}-{}-01", upstream.span_id)
    );
    assert_eq!(seen.header("b3"), format!("{trace}-{}-1", upstream.span_id));
}

#[tokio::test]
async fn b3_context_is_followed_and_a_request_without_one_starts_a_trace() {
    let (collector, received) = receiver().await;
    let origin = Origin::fixed(200, &[("cache-control", "no-store")], "x").await;
    let larder = Larder::start(&traced_yaml(origin.addr, collector)).await;
    larder
        .get_with(
            "/b3",
            &[
                ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
                ("x-b3-spanid", "e457b5a2e4d86bd1"),
                ("x-b3-sampled", "1"),
            ],
        )
        .await;
    let spans = spans_of(&received, "80f198ee56343ba864fe8b2a57d3eff7", 3).await;
    let server = spans.iter().find(|s| s.kind == 2).unwrap();
    assert_eq!(server.parent, "e457b5a2e4d86bd1");
    let seen = origin.last();
    assert!(
        seen.header("traceparent")
            .contains("80f198ee56343ba864fe8b2a57d3eff7")
    );
    assert_eq!(
        seen.header("x-b3-spanid"),
        "",
        "the caller's B3 headers are replaced"
    );

    // No context at all: a new trace, with the server span as its root.
    larder.get("/fresh").await;
    let seen = origin.last();
    let traceparent = seen.header("traceparent");
    let trace = traceparent
        .split('-')
        .nth(1)
        .expect("a traceparent upstream")
        .to_owned();
    let spans = spans_of(&received, &trace, 2).await;
    let root = spans.iter().find(|s| s.kind == 2).unwrap();
    assert_eq!(root.parent, "", "a root span");
    assert_eq!(root.attr("url.path"), "/fresh");
}

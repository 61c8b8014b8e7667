//! Request tracing with OpenTelemetry: a server span per request, child spans for the cache
//! lookup, the wait for a coalesced fetch and the upstream request; W3C trace context and B3
//! (single and multi header) extracted from requests and injected upstream; spans exported
//! over OTLP/HTTP (protobuf) by a batch processor whose bounded queue drops spans rather than
//! ever making a request wait.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::HeaderMap;
use opentelemetry::propagation::{
    Extractor, Injector, TextMapCompositePropagator, TextMapPropagator,
};
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState,
    Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider,
};

/// Where spans go and how many are kept.
#[derive(Debug, Clone)]
pub struct TracingConfig {
    /// The OTLP/HTTP traces URL, used as given: `http://jaeger:4318/v1/traces`.
    pub endpoint: String,
    pub service_name: String,
    /// Fraction of new traces recorded; a request with a parent follows its parent's decision.
    pub sample_ratio: f64,
    /// Spans waiting for export at most; more are dropped.
    pub max_queue_size: usize,
    pub export_timeout: Duration,
}

/// The tracer and propagators, shared by every request.
pub struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    extract: TextMapCompositePropagator,
    inject: TextMapCompositePropagator,
}

impl std::fmt::Debug for Tracing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracing").finish_non_exhaustive()
    }
}

impl Tracing {
    /// Must run inside the tokio runtime: exports run on it.
    pub fn start(config: &TracingConfig) -> Result<Arc<Tracing>, String> {
        let client = OnRuntime {
            handle: tokio::runtime::Handle::current(),
            inner: Arc::new(
                opentelemetry_http::hyper::HyperClient::with_default_connector(
                    config.export_timeout,
                    None,
                ),
            ),
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(config.endpoint.clone())
            .with_timeout(config.export_timeout)
            .with_http_client(client)
            .build()
            .map_err(|e| format!("tracing exporter: {e}"))?;
        let batch = BatchSpanProcessor::builder(exporter)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_max_queue_size(config.max_queue_size)
                    .with_max_export_batch_size(config.max_queue_size.min(512))
                    .with_scheduled_delay(Duration::from_secs(1))
                    .build(),
            )
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(batch)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                config.sample_ratio,
            ))))
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(config.service_name.clone())
                    .build(),
            )
            .build();
        let tracer = provider.tracer("larder");
        Ok(Arc::new(Tracing {
            provider,
            tracer,
            // The later propagator wins: a W3C traceparent beats B3 when both are present.
            extract: TextMapCompositePropagator::new(vec![
                Box::new(B3Propagator {
                    ratio: config.sample_ratio,
                }),
                Box::new(TraceContextPropagator::new()),
            ]),
            inject: TextMapCompositePropagator::new(vec![
                Box::new(TraceContextPropagator::new()),
                Box::new(B3Propagator {
                    ratio: config.sample_ratio,
                }),
            ]),
        }))
    }

    /// Starts the request's server span, as a child of the trace context the request carries.
    pub fn server_span(
        &self,
        headers: &HeaderMap,
        method: &str,
        path: &str,
        host: &str,
    ) -> RequestSpan {
        let parent = self
            .extract
            .extract_with_context(&Context::new(), &HeaderExtractor(headers));
        // Named by method now and by route when known (finish): a raw path would make one
        // operation per URL in the tracing backend.
        let span = self
            .tracer
            .span_builder(method.to_owned())
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("http.request.method", method.to_owned()),
                KeyValue::new("url.path", path.to_owned()),
                KeyValue::new("url.scheme", "http"),
                KeyValue::new("server.address", host.to_owned()),
            ])
            .start_with_context(&self.tracer, &parent);
        RequestSpan {
            cx: parent.with_span(span),
            tracer: self.tracer.clone(),
            method: method.to_owned(),
        }
    }

    /// Writes the trace context of `span` into outgoing headers (W3C and B3).
    fn inject(&self, cx: &Context, headers: &mut HeaderMap) {
        self.inject.inject_context(cx, &mut HeaderInjector(headers));
    }

    /// Exports what is queued and stops (shutdown; blocking work kept off the workers).
    pub async fn shutdown(self: Arc<Self>) {
        let provider = self.provider.clone();
        let _ = tokio::task::spawn_blocking(move || {
            provider.shutdown_with_timeout(Duration::from_secs(5))
        })
        .await;
    }
}

/// One request's server span.
pub struct RequestSpan {
    cx: Context,
    tracer: SdkTracer,
    method: String,
}

impl std::fmt::Debug for RequestSpan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestSpan")
            .field("trace_id", &self.trace_id())
            .finish()
    }
}

impl RequestSpan {
    /// The trace id, 32 hex digits (also the access log's `trace.id`).
    pub fn trace_id(&self) -> String {
        self.cx.span().span_context().trace_id().to_string()
    }

    /// A child span of this request (`cache lookup`, `coalesced wait`); ends when dropped.
    pub fn child(&self, name: &'static str) -> ChildSpan {
        let span = self
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Internal)
            .start_with_context(&self.tracer, &self.cx);
        ChildSpan {
            cx: self.cx.with_span(span),
        }
    }

    /// The upstream request's client span; its context goes into `headers`.
    pub fn upstream(
        &self,
        tracing: &Tracing,
        method: &str,
        cluster: &str,
        headers: &mut HeaderMap,
    ) -> ChildSpan {
        let span = self
            .tracer
            .span_builder(format!("{method} upstream"))
            .with_kind(SpanKind::Client)
            .with_attributes([
                KeyValue::new("http.request.method", method.to_owned()),
                KeyValue::new("larder.cluster", cluster.to_owned()),
            ])
            .start_with_context(&self.tracer, &self.cx);
        let cx = self.cx.with_span(span);
        // The client's own context headers would name the wrong parent upstream.
        for name in [
            B3_TRACE_ID,
            B3_SPAN_ID,
            B3_SAMPLED,
            B3_FLAGS,
            "x-b3-parentspanid",
        ] {
            headers.remove(name);
        }
        tracing.inject(&cx, headers);
        ChildSpan { cx }
    }

    pub fn set(&self, key: &'static str, value: impl Into<opentelemetry::Value>) {
        self.cx.span().set_attribute(KeyValue::new(key, value));
    }

    /// Ends the server span with the response's status and how the cache answered.
    pub fn finish(self, status: u16, cache_result: &'static str, route: Option<&str>) {
        let span = self.cx.span();
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
        span.set_attribute(KeyValue::new("larder.cache.result", cache_result));
        if let Some(route) = route {
            span.set_attribute(KeyValue::new("http.route", route.to_owned()));
            span.update_name(format!("{} {route}", self.method));
        }
        if status >= 500 {
            span.set_status(Status::error(format!("HTTP {status}")));
        }
        span.end();
    }
}

/// A child span; ends when dropped.
pub struct ChildSpan {
    cx: Context,
}

impl ChildSpan {
    pub fn set(&self, key: &'static str, value: impl Into<opentelemetry::Value>) {
        self.cx.span().set_attribute(KeyValue::new(key, value));
    }

    pub fn fail(&self, why: String) {
        self.cx.span().set_status(Status::error(why));
    }
}

impl Drop for ChildSpan {
    fn drop(&mut self) {
        self.cx.span().end();
    }
}

/// Runs the exporter's HTTP requests on the proxy's tokio runtime: the batch processor calls
/// it from its own thread, where an async client alone would find no reactor.
#[derive(Debug)]
struct OnRuntime {
    handle: tokio::runtime::Handle,
    inner: Arc<opentelemetry_http::hyper::HyperClient>,
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for OnRuntime {
    async fn send_bytes(
        &self,
        request: opentelemetry_http::Request<opentelemetry_http::Bytes>,
    ) -> Result<
        opentelemetry_http::Response<opentelemetry_http::Bytes>,
        opentelemetry_http::HttpError,
    > {
        let inner = self.inner.clone();
        self.handle
            .spawn(async move { inner.send_bytes(request).await })
            .await
            .map_err(|e| -> opentelemetry_http::HttpError { Box::new(e) })?
    }
}

/// Zipkin's B3 headers: the single `b3` header or the `X-B3-*` set on the way in, the single
/// header on the way out. (The Zipkin crate's propagator is deprecated upstream.)
#[derive(Debug)]
struct B3Propagator {
    /// Decides traces whose sender deferred the sampling decision, as for new traces.
    ratio: f64,
}

const B3_SINGLE: &str = "b3";
const B3_TRACE_ID: &str = "x-b3-traceid";
const B3_SPAN_ID: &str = "x-b3-spanid";
const B3_SAMPLED: &str = "x-b3-sampled";
const B3_FLAGS: &str = "x-b3-flags";

impl B3Propagator {
    /// A 64-bit trace id is the low half of a 128-bit one.
    fn trace_id(hex: &str) -> Option<TraceId> {
        match hex.len() {
            32 => TraceId::from_hex(hex).ok(),
            16 => TraceId::from_hex(&format!("{:0>32}", hex)).ok(),
            _ => None,
        }
        .filter(|id| *id != TraceId::INVALID)
    }

    fn span_id(hex: &str) -> Option<SpanId> {
        (hex.len() == 16)
            .then(|| SpanId::from_hex(hex).ok())
            .flatten()
            .filter(|id| *id != SpanId::INVALID)
    }

    /// Sampling state: `1`/`true`/`d` (debug) sampled, `0`/`false` not; absent means the
    /// sender deferred the decision, which is then made here with the sampling ratio, on the
    /// trace id as OpenTelemetry's ratio sampler does (so every replica decides alike).
    fn sampled(&self, flag: Option<&str>, trace: TraceId) -> Option<bool> {
        match flag.map(str::trim) {
            Some("1") | Some("true") | Some("d") => Some(true),
            Some("0") | Some("false") => Some(false),
            None => {
                let bound = (self.ratio.clamp(0.0, 1.0) * (1u64 << 63) as f64) as u64;
                let bytes = trace.to_bytes();
                let low = u64::from_be_bytes(bytes[8..16].try_into().expect("8 bytes")) >> 1;
                Some(low < bound)
            }
            Some(_) => None,
        }
    }

    fn context(trace: TraceId, span: SpanId, sampled: bool) -> SpanContext {
        let flags = if sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        SpanContext::new(trace, span, flags, true, TraceState::default())
    }

    fn extract_single(&self, value: &str) -> Option<SpanContext> {
        let mut parts = value.trim().split('-');
        let trace = Self::trace_id(parts.next()?)?;
        let span = Self::span_id(parts.next()?)?;
        let sampled = self.sampled(parts.next(), trace)?;
        Some(Self::context(trace, span, sampled))
    }

    fn extract_multi(&self, extractor: &dyn Extractor) -> Option<SpanContext> {
        let trace = Self::trace_id(extractor.get(B3_TRACE_ID)?.trim())?;
        let span = Self::span_id(extractor.get(B3_SPAN_ID)?.trim())?;
        let sampled = if extractor.get(B3_FLAGS).map(str::trim) == Some("1") {
            true
        } else {
            self.sampled(extractor.get(B3_SAMPLED), trace)?
        };
        Some(Self::context(trace, span, sampled))
    }
}

impl TextMapPropagator for B3Propagator {
    fn inject_context(&self, cx: &Context, injector: &mut dyn Injector) {
        let span = cx.span();
        let context = span.span_context();
        if !context.is_valid() {
            return;
        }
        let sampled = if context.is_sampled() { "1" } else { "0" };
        injector.set(
            B3_SINGLE,
            format!("{}-{}-{sampled}", context.trace_id(), context.span_id()),
        );
    }

    fn extract_with_context(&self, cx: &Context, extractor: &dyn Extractor) -> Context {
        let found = match extractor.get(B3_SINGLE) {
            Some(single) => self.extract_single(single),
            None => self.extract_multi(extractor),
        };
        match found {
            Some(context) => cx.with_remote_span_context(context),
            None => cx.clone(),
        }
    }

    fn fields(&self) -> opentelemetry::propagation::text_map_propagator::FieldIter<'_> {
        static FIELDS: OnceLock<Vec<String>> = OnceLock::new();
        let fields = FIELDS.get_or_init(|| {
            [B3_SINGLE, B3_TRACE_ID, B3_SPAN_ID, B3_SAMPLED, B3_FLAGS]
                .map(String::from)
                .to_vec()
        });
        opentelemetry::propagation::text_map_propagator::FieldIter::new(fields)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn extract(pairs: &[(&str, &str)]) -> SpanContext {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        B3Propagator { ratio: 0.0 }
            .extract_with_context(&Context::new(), &map)
            .span()
            .span_context()
            .clone()
    }

    #[test]
    fn b3_single_and_multi_headers() {
        let single = extract(&[("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1")]);
        assert_eq!(
            single.trace_id().to_string(),
            "80f198ee56343ba864fe8b2a57d3eff7"
        );
        assert_eq!(single.span_id().to_string(), "e457b5a2e4d86bd1");
        assert!(single.is_sampled() && single.is_remote());
        let multi = extract(&[
            ("x-b3-traceid", "64fe8b2a57d3eff7"),
            ("x-b3-spanid", "e457b5a2e4d86bd1"),
            ("x-b3-sampled", "0"),
        ]);
        assert_eq!(
            multi.trace_id().to_string(),
            "000000000000000064fe8b2a57d3eff7"
        );
        assert!(!multi.is_sampled());
        // No sampling flag: the local ratio decides (here 0: not sampled).
        let deferred = extract(&[("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1")]);
        assert!(deferred.is_valid() && !deferred.is_sampled());
        for bad in [
            vec![("b3", "nothex-e457b5a2e4d86bd1-1")],
            vec![("b3", "80f198ee56343ba864fe8b2a57d3eff7-short-1")],
            vec![(
                "b3",
                "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-maybe",
            )],
            vec![("x-b3-traceid", "64fe8b2a57d3eff7")],
        ] {
            assert!(!extract(&bad).is_valid(), "{bad:?}");
        }
        let mut out: HashMap<String, String> = HashMap::new();
        let cx = Context::new().with_remote_span_context(single.clone());
        B3Propagator { ratio: 0.0 }.inject_context(&cx, &mut out);
        assert_eq!(
            out["b3"],
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"
        );
    }
}

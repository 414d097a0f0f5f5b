//! Distributed traces: the OpenTelemetry tracer behind `tracing` spans, W3C
//! `traceparent` in and out, and client spans around dependency calls.
//!
//! Span contexts are created even when no collector is configured, so log
//! lines still carry the trace id a caller sent (or a fresh one).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanId, TraceContextExt, TraceId};
use opentelemetry_otlp::{SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing::Instrument;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Registry;
use tracing_subscriber::registry::LookupSpan;

use crate::config::{OtelSettings, OtlpProtocol};

/// Upper bound on the wait for the last spans at exit, so an unreachable
/// collector cannot eat the shutdown grace period.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(3);

/// Whether spans leave the process. Client spans are only worth their cost
/// when someone can see them.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// The tracer provider: with a batch OTLP exporter when an endpoint is set,
/// without any exporter otherwise (ids only, nothing leaves the process).
///
/// The batch processor exports from its own thread through a bounded queue
/// that drops when full, so a slow or absent collector never delays requests.
/// The gRPC exporter must be built inside a Tokio runtime.
pub fn tracer_provider(settings: &OtelSettings) -> Result<SdkTracerProvider, String> {
    let resource = Resource::builder()
        .with_service_name(settings.service_name.clone())
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    let builder = SdkTracerProvider::builder().with_resource(resource);
    let Some(endpoint) = settings.endpoint.as_deref() else {
        // Unexported spans need not record anything: a non-recording span
        // still has the ids logs need, at a fraction of the cost. A caller's
        // sampling decision is kept, so `traceparent` sent on says what it said.
        return Ok(builder
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOff)))
            .build());
    };
    let exporter = match settings.protocol {
        // The base endpoint names the collector; OTLP/HTTP adds the signal path.
        OtlpProtocol::HttpProtobuf => SpanExporter::builder()
            .with_http()
            .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
            .build(),
        OtlpProtocol::Grpc => SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build(),
    }
    .map_err(|e| format!("OTEL_EXPORTER_OTLP_ENDPOINT: {e}"))?;
    EXPORTING.store(true, Ordering::Relaxed);
    Ok(builder.with_batch_exporter(exporter).build())
}

/// Exports what is still queued, waiting at most [`SHUTDOWN_TIMEOUT`].
pub fn shutdown(provider: &SdkTracerProvider) {
    if let Err(e) = provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT) {
        tracing::warn!(error = %e, "trace exporter did not shut down cleanly");
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// Makes `span` continue the trace named by an incoming `traceparent`, if any.
/// Must run before the span is first entered.
pub fn continue_trace(span: &Span, headers: &HeaderMap) {
    // Most requests carry none: extracting builds a context to find that out.
    if !headers.contains_key("traceparent") {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// Adds `traceparent` (and `tracestate`) naming `span` to outgoing headers;
/// where the call has no span of its own (spans are not exported), the
/// operation it is made for: the dependency still joins the caller's trace,
/// and the caller's sampling decision travels on (CONTRACT §5). Background
/// work outside any operation sends none.
pub fn inject(span: &Span, headers: &mut HeaderMap) {
    let current;
    let span = if span.is_none() {
        current = Span::current();
        &current
    } else {
        span
    };
    if span.is_none() {
        return;
    }
    TraceContextPropagator::new().inject_context(&span.context(), &mut HeaderInjector(headers));
}

/// Whether spans leave the process at all.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Whether a dependency call should get a client span: only when spans are
/// exported, and only inside a traced operation. Background work (dependency
/// probes, position flushes) has no span, so it does not flood the collector
/// with one-span traces.
pub fn client_spans() -> bool {
    exporting() && !Span::current().is_none()
}

/// Trace and span id of the innermost traced span the current thread is in.
///
/// Looked up in the registry itself, not through a layer's filtered view, so
/// the ids are found even when the log filter hides the span.
pub fn current_ids() -> Option<(TraceId, SpanId)> {
    tracing::dispatcher::get_default(|dispatch| {
        let registry = dispatch.downcast_ref::<Registry>()?;
        let current = dispatch.current_span();
        let span = registry.span(current.id()?)?;
        span.scope().find_map(|s| {
            let cx = tracing_opentelemetry::get_otel_context(&s.id(), dispatch)?;
            let otel_span = cx.span();
            let sc = otel_span.span_context();
            sc.is_valid().then(|| (sc.trace_id(), sc.span_id()))
        })
    })
}

/// Marks the span as failed when the call is dropped before it finished
/// (a guard timeout or a client that went away).
struct Unfinished(Option<Span>);

impl Drop for Unfinished {
    fn drop(&mut self) {
        if let Some(span) = self.0.take() {
            span.record("error.type", "cancelled");
            span.record("otel.status_code", "error");
        }
    }
}

/// Runs `call` inside the client `span`, recording failure as `error.type`
/// (from `error_type`) and an error status. The span must declare
/// `error.type` and `otel.status_code` as empty fields.
pub async fn traced<T, E, F>(span: Span, call: F, error_type: fn(&E) -> String) -> Result<T, E>
where
    F: Future<Output = Result<T, E>>,
{
    let mut unfinished = Unfinished(Some(span.clone()));
    let result = call.instrument(span.clone()).await;
    unfinished.0 = None;
    if let Err(e) = &result {
        span.record("error.type", error_type(e));
        span.record("otel.status_code", "error");
    }
    result
}

//! Logs, metrics and traces.

pub mod logs;
pub mod metrics;
pub mod stdout;
pub mod throttled;
pub mod traces;

use std::sync::Mutex;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Level;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::prelude::*;

use crate::config::Settings;

/// Whether the process-wide subscriber is installed; tests start many apps in
/// one process and only the first may install it.
static INSTALLED: Mutex<bool> = Mutex::new(false);

/// Keeps the trace exporter of this process; [`Telemetry::shutdown`] sends
/// what is still queued and writes the log lines still pending.
#[must_use = "call shutdown() before exit so the last spans are exported and the last log lines written"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    pub fn shutdown(self) {
        if let Some(provider) = &self.provider {
            traces::shutdown(provider);
        }
        stdout::flush();
    }
}

/// Only Moneta's own spans become OpenTelemetry spans (libraries' spans would
/// only add noise), and only warnings and errors become span events.
fn traced(meta: &tracing::Metadata<'_>) -> bool {
    let ours = meta.target() == "moneta" || meta.target().starts_with("moneta::");
    let level = if meta.is_span() { Level::INFO } else { Level::WARN };
    ours && *meta.level() <= level
}

/// Installs logging and tracing for the process. Later calls (more apps in
/// the same test process) change nothing and return an inert [`Telemetry`].
///
/// With an OTLP endpoint the gRPC exporter needs a Tokio runtime: call this
/// inside one. An unusable endpoint is an error naming the setting.
pub fn init(settings: &Settings) -> Result<Telemetry, String> {
    let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if *installed {
        return Ok(Telemetry { provider: None });
    }
    let provider = traces::tracer_provider(&settings.otel)?;
    let spans = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("moneta"))
        .with_location(false)
        .with_threads(false)
        .with_target(false)
        // Both act on every poll of every request; logs and outgoing
        // `traceparent` look the span's context up when they need it instead.
        .with_tracked_inactivity(false)
        .with_context_activation(false)
        .with_filter(filter_fn(traced).with_max_level_hint(Level::INFO));
    let installed_now = tracing_subscriber::registry()
        .with(spans)
        .with(logs::layer(&settings.log.filter, settings.log.format))
        .try_init()
        .is_ok();
    // Someone else's subscriber (a test harness) keeps its place; ours is unused.
    *installed = true;
    Ok(Telemetry {
        provider: installed_now.then_some(provider),
    })
}

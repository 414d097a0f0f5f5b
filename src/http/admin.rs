//! The admin port's router: `/metrics` only (never routed by nginx).

use axum::Router;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::telemetry;

pub fn router(metrics: PrometheusHandle) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let handle = metrics.clone();
            async move { telemetry::metrics::render(&handle) }
        }),
    )
}

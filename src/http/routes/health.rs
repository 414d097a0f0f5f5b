use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::app::Phase;
use crate::http::AppState;

#[derive(Serialize, Deserialize, ToSchema)]
pub struct Readiness {
    /// `ready`, `degraded`, `starting` or `stopping`.
    pub status: String,
    pub dependencies: Dependencies,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct Dependencies {
    /// `up` or `down`
    pub redis: String,
    /// `up` or `down`
    pub internal_api: String,
}

/// 200 while the process runs.
#[utoipa::path(get, path = "/health/live", tag = "health", responses((status = 200, description = "Alive")))]
pub async fn live() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "live"}))
}

/// Ready to serve; a dependency outage is `degraded` (still 200), since fallbacks serve.
#[utoipa::path(
    get,
    path = "/health/ready",
    tag = "health",
    responses(
        (status = 200, description = "Serving (maybe degraded)", body = Readiness),
        (status = 503, description = "Starting or shutting down", body = Readiness),
    )
)]
pub async fn ready(State(app): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let up = |ok: bool| if ok { "up" } else { "down" }.to_owned();
    let redis = app.redis.is_up();
    let api = app.internal_api.is_up();
    let (status, text) = match app.phase() {
        Phase::Starting => (StatusCode::SERVICE_UNAVAILABLE, "starting"),
        Phase::Draining => (StatusCode::SERVICE_UNAVAILABLE, "stopping"),
        Phase::Serving if redis && api => (StatusCode::OK, "ready"),
        Phase::Serving => (StatusCode::OK, "degraded"),
    };
    (
        status,
        Json(Readiness {
            status: text.to_owned(),
            dependencies: Dependencies {
                redis: up(redis),
                internal_api: up(api),
            },
        }),
    )
}

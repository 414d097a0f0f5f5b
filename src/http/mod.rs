//! The public HTTP surface: router, layers, extractors and the error mapping.

pub mod admin;
mod admission;
mod cookies;
mod cors;
pub mod error;
pub mod extract;
mod json;
mod middleware;
pub mod openapi;
pub mod pacing;
pub mod routes;
pub mod unread_body;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{MethodRouter, get, post, put};
use tower::ServiceBuilder;
use tower::layer::layer_fn;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::timeout::TimeoutLayer;

use crate::app::App;
use crate::config::ServerSettings;
use error::ApiError;
pub use json::JsonAnswer;
use routes::{health, licenses, playback_info, sessions};

pub type AppState = Arc<App>;

/// Request bodies above this are refused (the edge enforces the same).
pub const MAX_BODY_BYTES: usize = 16 * 1024;

pub fn router(app: AppState, server: &ServerSettings) -> Router {
    let openapi = Arc::new(openapi::document());
    let cors = cors::Cors::new(&server.cors_allowed_origins);
    // Each /v1 route answers browsers' preflights for exactly its methods.
    let v1 = |route: MethodRouter<AppState>, methods: &[axum::http::Method]| match &cors {
        Some(cors) => cors.around(route, methods),
        None => route,
    };
    use axum::http::Method;
    Router::new()
        .route(
            "/v1/contents/{content_id}/playback-info",
            v1(get(playback_info::playback_info), &[Method::GET]),
        )
        .route(
            "/v1/playback/sessions",
            v1(
                get(sessions::list).post(sessions::start),
                &[Method::GET, Method::POST],
            ),
        )
        .route(
            "/v1/playback/sessions/{session_id}",
            v1(
                put(sessions::heartbeat).delete(sessions::stop),
                &[Method::PUT, Method::DELETE],
            ),
        )
        .route(
            "/v1/licenses/{drm_system}",
            v1(
                // Its own limit, inside the general one: a CDM's challenge
                // may be far larger than any other body.
                post(licenses::request).layer(DefaultBodyLimit::max(licenses::MAX_LICENSE_BODY_BYTES)),
                &[Method::POST],
            ),
        )
        .route("/health/live", get(health::live))
        .route("/health/ready", get(health::ready))
        .route(
            "/openapi.json",
            get(move || {
                let doc = openapi.clone();
                async move {
                    (
                        [(header::CONTENT_TYPE, "application/json")],
                        doc.as_str().to_owned(),
                    )
                }
            }),
        )
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        // One layer stack, outermost first: axum boxes a route's future once
        // per `Router::layer` call, and the copies of that large future were
        // an eighth of the hot path's instructions with a call per layer.
        // The request id is settled before anything logs, and every error
        // below `observe` leaves as contract JSON.
        .layer(
            ServiceBuilder::new()
                .layer(layer_fn(middleware::request_ids))
                // Before anything that costs: a request refused here is not
                // logged, authenticated or sent to a dependency (CONTRACT §9).
                .layer(admission::AdmissionLayer::new(
                    &server.overload,
                    &server.cors_allowed_origins,
                ))
                .layer(layer_fn(middleware::observe))
                .map_response(IntoResponse::into_response)
                .layer(CatchPanicLayer::custom(|_| ApiError::Internal.into_response()))
                .layer(TimeoutLayer::with_status_code(
                    StatusCode::SERVICE_UNAVAILABLE,
                    server.request_timeout,
                ))
                .layer(DefaultBodyLimit::max(MAX_BODY_BYTES)),
        )
        .with_state(app)
}

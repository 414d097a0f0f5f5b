//! Cross-cutting request handling: request ids, metrics and access log, and
//! making sure every error leaves as contract JSON.

use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::{ErrorBody, ErrorDetail, code_for_status};
use super::validate::is_sane_request_id;

/// A client's request id is kept only when it is short and plain; otherwise a
/// new one is made, so logs and headers never carry arbitrary client bytes.
pub async fn drop_insane_request_id(mut req: Request) -> Request {
    let sane = req
        .headers()
        .get("x-request-id")
        .map(|v| v.to_str().is_ok_and(is_sane_request_id));
    if sane == Some(false) {
        req.headers_mut().remove("x-request-id");
    }
    req
}

/// `moneta_http_*` metrics and one access-log line per request.
pub async fn observe(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    // Route templates, never raw paths: label cardinality stays bounded.
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    metrics::gauge!("moneta_http_requests_in_flight").increment(1);
    let response = next.run(req).await;
    metrics::gauge!("moneta_http_requests_in_flight").decrement(1);
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    metrics::counter!(
        "moneta_http_requests_total",
        "method" => method.as_str().to_owned(),
        "route" => route.clone(),
        "status" => status.to_string()
    )
    .increment(1);
    metrics::histogram!("moneta_http_request_duration_seconds", "route" => route.clone())
        .record(elapsed.as_secs_f64());
    tracing::info!(
        target: "moneta::access",
        method = %method,
        route = %route,
        status,
        latency_ms = elapsed.as_secs_f64() * 1000.0,
        request_id = %request_id,
        "request"
    );
    response
}

/// Errors produced below the handlers (timeouts, body limits, panics) come
/// without a contract body; give them one.
pub async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, _) = response.into_parts();
    let body = ErrorBody {
        error: ErrorDetail {
            code: code_for_status(status),
            message: status.canonical_reason().unwrap_or("error").to_owned(),
            max_streams: None,
            active_sessions: None,
        },
    };
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    parts
        .headers
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(bytes)).into_response()
}

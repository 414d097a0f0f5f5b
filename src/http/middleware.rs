//! Cross-cutting request handling: request ids, metrics and access log, and
//! making sure every error leaves as contract JSON.

use std::collections::HashMap;
use std::sync::{OnceLock, PoisonError, RwLock};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics::{Counter, Histogram};
use tracing::Instrument;
use tracing::field::Empty;

use super::error::{ErrorBody, ErrorDetail, code_for_status};
use super::routes::licenses::Verbatim;
use crate::telemetry::{logs, traces};

/// A client-sent request id we are willing to echo and log: `[A-Za-z0-9_.:-]{1,128}`.
fn is_sane_request_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b))
}

/// The `method` label: the methods HTTP defines that Moneta may see, else
/// `other`, so no client can add label values.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

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

/// Counts a request as in flight until it is answered or abandoned (the
/// client went away and the future was dropped).
struct InFlight;

impl InFlight {
    /// Registered once: `gauge!` looks the series up on every call.
    fn gauge() -> &'static metrics::Gauge {
        static GAUGE: OnceLock<metrics::Gauge> = OnceLock::new();
        GAUGE.get_or_init(|| metrics::gauge!("moneta_http_requests_in_flight"))
    }

    fn start() -> Self {
        Self::gauge().increment(1);
        InFlight
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        Self::gauge().decrement(1);
    }
}

/// The server span of one request, continuing the caller's trace when it
/// sent a `traceparent`. Named after the route template, as the OpenTelemetry
/// HTTP conventions ask, so traces group like the metrics do.
///
/// When no span leaves the process, the span carries no attributes: it exists
/// for the trace ids of log lines and of outgoing `traceparent` only, and
/// recording attributes nobody reads cost ~5 % of a warm request.
fn request_span(req: &Request, route: Option<&str>, request_id: &str) -> tracing::Span {
    if !traces::exporting() {
        let span = tracing::info_span!(target: "moneta::http", "request");
        traces::continue_trace(&span, req.headers());
        return span;
    }
    let method = method_label(req.method());
    let name = match route {
        Some(route) => format!("{method} {route}"),
        None => method.to_owned(),
    };
    let span = tracing::info_span!(
        target: "moneta::http",
        "request",
        otel.name = %name,
        otel.kind = "server",
        otel.status_code = Empty,
        http.request.method = %method,
        http.route = route,
        url.path = %req.uri().path(),
        http.response.status_code = Empty,
        request_id = %request_id,
    );
    traces::continue_trace(&span, req.headers());
    span
}

/// `moneta_http_*` metrics, the request's server span and one access-log
/// line per request.
pub async fn observe(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(req.method());
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
    let span = request_span(
        &req,
        req.extensions().get::<MatchedPath>().map(MatchedPath::as_str),
        &request_id,
    );
    let in_flight = InFlight::start();
    let response = next.run(req).instrument(span.clone()).await;
    drop(in_flight);
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    span.record("http.response.status_code", status);
    if status >= 500 {
        span.record("otel.status_code", "error");
    }
    span.in_scope(|| logs::access(method, &route, status, elapsed, &request_id));
    let (requests, duration) = http_series(method, route, status);
    requests.increment(1);
    duration.record(elapsed.as_secs_f64());
    response
}

/// The `moneta_http_*` series of one (method, route, status), registered once:
/// the `counter!`/`histogram!` macros look their series up on every call.
/// Bounded: methods and route templates are closed sets, statuses three digits.
fn http_series(method: &'static str, route: String, status: u16) -> (Counter, Histogram) {
    type Series = HashMap<(&'static str, String, u16), (Counter, Histogram)>;
    static SERIES: OnceLock<RwLock<Series>> = OnceLock::new();
    let series = SERIES.get_or_init(Default::default);
    let key = (method, route, status);
    if let Some(found) = series.read().unwrap_or_else(PoisonError::into_inner).get(&key) {
        return found.clone();
    }
    let made = (
        metrics::counter!(
            "moneta_http_requests_total",
            "method" => method,
            "route" => key.1.clone(),
            "status" => status.to_string()
        ),
        metrics::histogram!("moneta_http_request_duration_seconds", "route" => key.1.clone()),
    );
    series
        .write()
        .unwrap_or_else(PoisonError::into_inner)
        .entry(key)
        .or_insert(made)
        .clone()
}

/// Errors produced below the handlers (timeouts, body limits, panics) come
/// without a contract body; give them one.
pub async fn json_errors(response: Response) -> Response {
    // A DRM vendor's answer, passed through as it is (CONTRACT §8).
    if response.extensions().get::<Verbatim>().is_some() {
        return response;
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Method;

    #[test]
    fn method_labels_are_a_closed_set() {
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::PATCH), "PATCH");
        assert_eq!(method_label(&Method::from_bytes(b"QWERTY").unwrap()), "other");
        assert_eq!(method_label(&Method::TRACE), "other");
    }

    #[test]
    fn request_ids() {
        assert!(is_sane_request_id("abc-123:x.y_z"));
        assert!(!is_sane_request_id(""));
        assert!(!is_sane_request_id("a b"));
        assert!(!is_sane_request_id(&"a".repeat(129)));
    }
}

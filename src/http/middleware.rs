//! Cross-cutting request handling: request ids, metrics, the request's span
//! and access log, and making sure every error leaves as contract JSON.
//!
//! Both layers are tower services written out, not
//! `axum::middleware::{from_fn, map_request, map_response}`: each of those
//! boxes every request's future, and `from_fn` also a clone of the whole
//! stack below it, on the path every request takes.

use std::future::Future;
use std::pin::Pin;
use std::sync::{OnceLock, PoisonError, RwLock};
use std::task::{Context, Poll, ready};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use metrics::{Counter, Histogram};
use tower::Service;
use tracing::field::Empty;

use super::error::{ErrorBody, ErrorDetail, RETRY_AFTER_S, code_for_status};
use super::routes::licenses::Verbatim;
use crate::telemetry::{logs, traces};

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

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

/// `X-Request-Id` in and out. A client's id is kept only when it is short
/// and plain; otherwise, or without one, a new UUID is made, so logs and
/// headers never carry arbitrary client bytes. The answer carries the id
/// unless something below set one.
#[derive(Debug, Clone)]
pub struct RequestIds<S> {
    inner: S,
}

/// The layer, for `layer_fn`.
pub fn request_ids<S>(inner: S) -> RequestIds<S> {
    RequestIds { inner }
}

fn new_request_id() -> HeaderValue {
    let mut text = uuid::Uuid::encode_buffer();
    let text = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut text);
    // A UUID's text is always a valid header value.
    HeaderValue::from_str(text).unwrap_or(HeaderValue::from_static("unknown"))
}

impl<S> Service<Request> for RequestIds<S>
where
    S: Service<Request, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = RequestIdFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        let id = match req.headers().get(&X_REQUEST_ID) {
            Some(sent) if sent.to_str().is_ok_and(is_sane_request_id) => sent.clone(),
            _ => {
                let made = new_request_id();
                req.headers_mut().insert(X_REQUEST_ID.clone(), made.clone());
                made
            }
        };
        RequestIdFuture {
            inner: self.inner.call(req),
            id: Some(id),
        }
    }
}

pin_project_lite::pin_project! {
    pub struct RequestIdFuture<F> {
        #[pin]
        inner: F,
        id: Option<HeaderValue>,
    }
}

impl<F, E> Future for RequestIdFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut output = ready!(this.inner.poll(cx));
        if let (Ok(response), Some(id)) = (&mut output, this.id.take())
            && !response.headers().contains_key(&X_REQUEST_ID)
        {
            response.headers_mut().insert(X_REQUEST_ID.clone(), id);
        }
        Poll::Ready(output)
    }
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

/// `moneta_http_*` metrics, the request's server span, one access-log line
/// per request, and contract JSON for errors raised below the handlers.
#[derive(Debug, Clone)]
pub struct Observe<S> {
    inner: S,
}

/// The layer, for `layer_fn`.
pub fn observe<S>(inner: S) -> Observe<S> {
    Observe { inner }
}

impl<S> Service<Request> for Observe<S>
where
    S: Service<Request, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = ObserveFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let started = Instant::now();
        // Route templates, never raw paths: label cardinality stays bounded.
        let route = req.extensions().get::<MatchedPath>().cloned();
        // Set by `RequestIds` outside, so always there and plain.
        let request_id = req.headers().get(&X_REQUEST_ID).cloned();
        let span = request_span(
            &req,
            route.as_ref().map(MatchedPath::as_str),
            request_id.as_ref().and_then(|v| v.to_str().ok()).unwrap_or(""),
        );
        let observed = Observed {
            started,
            method: method_label(req.method()),
            route,
            request_id,
            in_flight: InFlight::start(),
        };
        ObserveFuture {
            inner: self.inner.call(req),
            span,
            observed: Some(observed),
        }
    }
}

struct Observed {
    started: Instant,
    method: &'static str,
    route: Option<MatchedPath>,
    request_id: Option<HeaderValue>,
    in_flight: InFlight,
}

pin_project_lite::pin_project! {
    pub struct ObserveFuture<F> {
        #[pin]
        inner: F,
        span: tracing::Span,
        observed: Option<Observed>,
    }
}

impl<F, E> Future for ObserveFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        // Everything below runs in the request's span, the access line too.
        let _entered = this.span.enter();
        let response = match ready!(this.inner.poll(cx)) {
            Ok(response) => json_errors(response),
            Err(error) => return Poll::Ready(Err(error)),
        };
        let Some(observed) = this.observed.take() else {
            return Poll::Ready(Ok(response));
        };
        drop(observed.in_flight);
        let elapsed = observed.started.elapsed();
        let status = response.status().as_u16();
        if traces::exporting() {
            this.span.record("http.response.status_code", status);
            if status >= 500 {
                this.span.record("otel.status_code", "error");
            }
        }
        let route = observed.route.as_ref().map_or("unmatched", MatchedPath::as_str);
        let request_id = observed
            .request_id
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        logs::access(observed.method, route, status, elapsed, request_id);
        let (requests, duration) = http_series(observed.method, route, status);
        requests.increment(1);
        duration.record(elapsed.as_secs_f64());
        Poll::Ready(Ok(response))
    }
}

/// The `moneta_http_*` series of one (method, route, status), registered once:
/// the `counter!`/`histogram!` macros look their series up on every call.
/// Bounded: methods and route templates are closed sets, statuses three
/// digits. Keyed by route, so a lookup borrows the template instead of
/// copying it; a route has a handful of (method, status) pairs.
fn http_series(method: &'static str, route: &str, status: u16) -> (Counter, Histogram) {
    // foldhash: looked up on every request, by a route template, never by
    // what a client sends.
    type Series = foldhash::HashMap<String, Vec<(&'static str, u16, Counter, Histogram)>>;
    static SERIES: OnceLock<RwLock<Series>> = OnceLock::new();
    let series = SERIES.get_or_init(Default::default);
    let find = |of_route: &[(&'static str, u16, Counter, Histogram)]| {
        of_route
            .iter()
            .find(|(m, s, _, _)| *m == method && *s == status)
            .map(|(_, _, c, h)| (c.clone(), h.clone()))
    };
    let known = series.read().unwrap_or_else(PoisonError::into_inner);
    if let Some(found) = known.get(route).and_then(|of_route| find(of_route)) {
        return found;
    }
    drop(known);
    let mut all = series.write().unwrap_or_else(PoisonError::into_inner);
    let of_route = all.entry(route.to_owned()).or_default();
    if let Some(found) = find(of_route) {
        return found;
    }
    let made = (
        metrics::counter!(
            "moneta_http_requests_total",
            "method" => method,
            "route" => route.to_owned(),
            "status" => status.to_string()
        ),
        metrics::histogram!("moneta_http_request_duration_seconds", "route" => route.to_owned()),
    );
    of_route.push((method, status, made.0.clone(), made.1.clone()));
    made
}

/// Errors produced below the handlers (timeouts, body limits, panics) come
/// without a contract body; give them one.
fn json_errors(response: Response) -> Response {
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
    // Every 503 tells when to come back, also the request timeout's.
    if status == StatusCode::SERVICE_UNAVAILABLE && !parts.headers.contains_key(header::RETRY_AFTER) {
        parts
            .headers
            .insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_S));
    }
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
        let made = new_request_id();
        assert!(made.to_str().is_ok_and(is_sane_request_id), "{made:?}");
        assert_ne!(made, new_request_id());
    }
}

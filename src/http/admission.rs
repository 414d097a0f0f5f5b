//! Admission at the front of the public router (CONTRACT §9): a request is
//! admitted at its route's priority, or answered `503 overloaded` with
//! `Retry-After` at once — before its token is verified, before any
//! dependency is asked, before it is logged.
//!
//! It sits right inside the request-id layers, so a refusal still carries
//! `X-Request-Id`, and outside `observe`: a refused request costs a lookup,
//! a compare-and-swap and a static answer, and is counted in
//! `moneta_requests_shed_total{route}` instead of the access log (a flood
//! logged line by line would be a second flood).
//!
//! Never shed: `/health/*` (a probe that fails under load gets the instance
//! restarted when it is busiest), `/openapi.json`, and `OPTIONS`. A CORS
//! preflight does no work beyond comparing headers, answering it costs what
//! refusing it would, and refusing it would fail the request that follows
//! before that request is judged at its own priority.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use metrics::Counter;
use tower::{Layer, Service};

use crate::config::OverloadSettings;
use crate::http::pacing;
use crate::resilience::{Limiter, Permit, Priority};

const PLAYBACK_INFO: &str = "/v1/contents/{content_id}/playback-info";
const SESSIONS: &str = "/v1/playback/sessions";
const SESSION: &str = "/v1/playback/sessions/{session_id}";
const LICENSES: &str = "/v1/licenses/{drm_system}";

/// The `route` label of `moneta_requests_shed_total`: the route templates
/// that can be shed, and `unmatched` for paths no route serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    PlaybackInfo,
    Sessions,
    Session,
    Licenses,
    Unmatched,
}

impl Route {
    const ALL: [Route; 5] = [
        Route::PlaybackInfo,
        Route::Sessions,
        Route::Session,
        Route::Licenses,
        Route::Unmatched,
    ];

    fn label(self) -> &'static str {
        match self {
            Route::PlaybackInfo => PLAYBACK_INFO,
            Route::Sessions => SESSIONS,
            Route::Session => SESSION,
            Route::Licenses => LICENSES,
            Route::Unmatched => "unmatched",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Exempt,
    Ranked(Route, Priority),
}

/// The route template (`MatchedPath`) and method decide; `path` is looked
/// at only when no route matched. Nothing is allocated.
fn classify(method: &Method, template: Option<&str>, path: &str) -> Class {
    use Priority::*;
    if method == Method::OPTIONS {
        return Class::Exempt;
    }
    let reads = method == Method::GET || method == Method::HEAD;
    match template {
        Some("/health/live" | "/health/ready" | "/openapi.json") => Class::Exempt,
        Some(PLAYBACK_INFO) => {
            Class::Ranked(Route::PlaybackInfo, if reads { PlaybackInfo } else { Heartbeat })
        }
        Some(SESSIONS) if method == Method::POST => Class::Ranked(Route::Sessions, Start),
        Some(SESSIONS) => Class::Ranked(Route::Sessions, if reads { Stop } else { Heartbeat }),
        Some(SESSION) if method == Method::DELETE => Class::Ranked(Route::Session, Stop),
        Some(SESSION) => Class::Ranked(Route::Session, Heartbeat),
        Some(LICENSES) if method == Method::POST => Class::Ranked(Route::Licenses, Licence),
        Some(LICENSES) => Class::Ranked(Route::Licenses, Heartbeat),
        None if path.starts_with("/health/") => Class::Exempt,
        // A template this table does not know is a route added without a
        // priority (a unit test keeps the router and this table together).
        _ => Class::Ranked(Route::Unmatched, Heartbeat),
    }
}

const OVERLOADED: &[u8] =
    br#"{"error":{"code":"overloaded","message":"Too busy to take this request now; retry after Retry-After seconds."}}"#;

/// A shed heartbeat comes back within its liveness margin (90 s, sent every
/// 30 s) but not at once, and spread over a few seconds, so that the crowd
/// refused in one instant does not return in one instant.
const HEARTBEAT_RETRY_AFTER: [HeaderValue; 5] = [
    HeaderValue::from_static("8"),
    HeaderValue::from_static("9"),
    HeaderValue::from_static("10"),
    HeaderValue::from_static("11"),
    HeaderValue::from_static("12"),
];
/// A viewer is waiting on everything else.
const VIEWER_RETRY_AFTER: HeaderValue = HeaderValue::from_static("1");

/// How often "shedding" is logged at most, while it goes on.
const WARN_EVERY_S: u64 = 10;

struct Shared {
    limiter: Arc<Limiter>,
    shed: [Counter; Route::ALL.len()],
    /// Shed answers need the CORS headers too, or a browser on another
    /// origin cannot read `Retry-After`; the CORS layer sits inside.
    cors_origins: Vec<HeaderValue>,
    spread: AtomicUsize,
    started: Instant,
    warned_at_s: AtomicU64,
}

impl Shared {
    fn refuse(&self, route: Route, priority: Priority, origin: Option<&HeaderValue>) -> Response {
        self.shed[route as usize].increment(1);
        self.warn_now_and_then();
        let mut response = Response::new(Body::from(OVERLOADED));
        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let retry_after = match priority {
            Priority::Heartbeat => {
                let at = self.spread.fetch_add(1, Ordering::Relaxed) % HEARTBEAT_RETRY_AFTER.len();
                HEARTBEAT_RETRY_AFTER[at].clone()
            }
            _ => VIEWER_RETRY_AFTER,
        };
        headers.insert(header::RETRY_AFTER, retry_after);
        if priority == Priority::Heartbeat {
            // Kept open, and a heartbeat sent on it at once is read at a
            // pace (`http/pacing.rs`).
            pacing::heartbeat_refused();
        } else {
            // A viewer retries on a fresh connection, never behind a pace;
            // the accept loop takes it with the others. Envoy's overload
            // manager disables keep-alive the same way.
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Some(origin) = origin.filter(|o| self.cors_origins.contains(o)) {
            headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
            headers.insert(
                header::ACCESS_CONTROL_EXPOSE_HEADERS,
                HeaderValue::from_static("x-request-id,retry-after"),
            );
            headers.insert(header::VARY, HeaderValue::from_static("origin"));
        }
        response
    }

    fn warn_now_and_then(&self) {
        let now_s = self.started.elapsed().as_secs() + WARN_EVERY_S;
        let last = self.warned_at_s.load(Ordering::Relaxed);
        if now_s >= last + WARN_EVERY_S
            && self
                .warned_at_s
                .compare_exchange(last, now_s, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                limit = self.limiter.limit(),
                in_flight = self.limiter.in_flight(),
                "overloaded: shedding requests (moneta_requests_shed_total)"
            );
        }
    }
}

/// Admission control in front of every public route; a no-op with
/// `MONETA_OVERLOAD_LIMIT=off`.
#[derive(Clone)]
pub struct AdmissionLayer {
    shared: Option<Arc<Shared>>,
}

impl AdmissionLayer {
    pub fn new(settings: &OverloadSettings, cors_origins: &[String]) -> Self {
        let shared = Limiter::from_settings(settings).map(|limiter| {
            let shed = Route::ALL.map(|route| {
                let counter = metrics::counter!("moneta_requests_shed_total", "route" => route.label());
                // Present from the start: `increase()` in an alert sees the first shed.
                counter.increment(0);
                counter
            });
            Arc::new(Shared {
                limiter,
                shed,
                cors_origins: cors_origins
                    .iter()
                    .filter_map(|o| HeaderValue::from_str(o).ok())
                    .collect(),
                spread: AtomicUsize::new(0),
                started: Instant::now(),
                warned_at_s: AtomicU64::new(0),
            })
        });
        Self { shared }
    }
}

impl<S> Layer<S> for AdmissionLayer {
    type Service = Admission<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Admission {
            inner,
            shared: self.shared.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Admission<S> {
    inner: S,
    shared: Option<Arc<Shared>>,
}

impl<S> Service<Request> for Admission<S>
where
    S: Service<Request, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = AdmissionFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let Some(shared) = &self.shared else {
            return AdmissionFuture::Admitted {
                inner: self.inner.call(req),
                permit: None,
            };
        };
        let template = req.extensions().get::<MatchedPath>().map(MatchedPath::as_str);
        let (route, priority) = match classify(req.method(), template, req.uri().path()) {
            Class::Exempt => {
                return AdmissionFuture::Admitted {
                    inner: self.inner.call(req),
                    permit: None,
                };
            }
            Class::Ranked(route, priority) => (route, priority),
        };
        match shared.limiter.try_acquire(priority) {
            Some(permit) => AdmissionFuture::Admitted {
                inner: self.inner.call(req),
                permit: Some(permit),
            },
            None => AdmissionFuture::Refused {
                response: Some(shared.refuse(route, priority, req.headers().get(header::ORIGIN))),
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner answer with the slot held until it is ready (dropped with
    /// it if the client goes away), or the refusal.
    #[project = AdmissionProj]
    pub enum AdmissionFuture<F> {
        Admitted { #[pin] inner: F, permit: Option<Permit> },
        Refused { response: Option<Response> },
    }
}

impl<F, E> Future for AdmissionFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            AdmissionProj::Admitted { inner, permit } => {
                let output = ready!(inner.poll(cx));
                if let Some(permit) = permit.take() {
                    permit.answered();
                }
                Poll::Ready(output)
            }
            AdmissionProj::Refused { response } => Poll::Ready(Ok(response.take().unwrap_or_default())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Priority::*;

    fn class(method: Method, template: &str) -> Class {
        classify(&method, Some(template), "/whatever")
    }

    #[test]
    fn each_route_has_its_priority() {
        use Route as R;
        assert_eq!(class(Method::POST, LICENSES), Class::Ranked(R::Licenses, Licence));
        assert_eq!(class(Method::POST, SESSIONS), Class::Ranked(R::Sessions, Start));
        assert_eq!(
            class(Method::GET, PLAYBACK_INFO),
            Class::Ranked(R::PlaybackInfo, PlaybackInfo)
        );
        assert_eq!(
            class(Method::HEAD, PLAYBACK_INFO),
            Class::Ranked(R::PlaybackInfo, PlaybackInfo)
        );
        assert_eq!(class(Method::DELETE, SESSION), Class::Ranked(R::Session, Stop));
        assert_eq!(class(Method::GET, SESSIONS), Class::Ranked(R::Sessions, Stop));
        assert_eq!(class(Method::PUT, SESSION), Class::Ranked(R::Session, Heartbeat));
        // Wrong methods and unknown paths are answered 405/404, cheap but
        // nobody's playback: last in line.
        assert_eq!(
            class(Method::PATCH, SESSION),
            Class::Ranked(R::Session, Heartbeat)
        );
        assert_eq!(
            class(Method::PUT, LICENSES),
            Class::Ranked(R::Licenses, Heartbeat)
        );
        assert_eq!(
            classify(&Method::GET, None, "/v1/nope"),
            Class::Ranked(R::Unmatched, Heartbeat)
        );
    }

    /// Every method and path of the API document.
    fn documented_routes() -> Vec<(Method, String)> {
        let doc: serde_json::Value =
            serde_json::from_str(&crate::http::openapi::document()).expect("the OpenAPI document");
        let mut routes = Vec::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for method in item.as_object().expect("path item").keys() {
                let method = Method::from_bytes(method.to_ascii_uppercase().as_bytes()).expect("method");
                routes.push((method, path.clone()));
            }
        }
        routes
    }

    /// `http/pacing.rs` tells a heartbeat by its method before reading it.
    #[test]
    fn the_heartbeat_is_the_only_put_of_the_api() {
        let mut puts = 0;
        for (method, path) in documented_routes() {
            let heartbeat = matches!(classify(&method, Some(&path), &path), Class::Ranked(_, Heartbeat));
            assert_eq!(method == Method::PUT, heartbeat, "{method} {path}");
            puts += usize::from(heartbeat);
        }
        assert_eq!(puts, 1);
    }

    #[test]
    fn health_openapi_and_preflights_are_never_shed() {
        for template in ["/health/live", "/health/ready", "/openapi.json"] {
            assert_eq!(class(Method::GET, template), Class::Exempt, "{template}");
        }
        assert_eq!(classify(&Method::GET, None, "/health/other"), Class::Exempt);
        for template in [LICENSES, SESSIONS, SESSION, PLAYBACK_INFO] {
            assert_eq!(class(Method::OPTIONS, template), Class::Exempt, "{template}");
        }
    }

    #[test]
    fn every_route_of_the_api_document_is_classified() {
        let routes = documented_routes();
        let paths: std::collections::BTreeSet<&str> = routes.iter().map(|(_, path)| path.as_str()).collect();
        assert!(paths.len() >= 5, "{paths:?}");
        for (method, path) in &routes {
            let class = classify(method, Some(path), path);
            assert_ne!(
                class,
                Class::Ranked(Route::Unmatched, Heartbeat),
                "{method} {path} has no priority: add it to classify()"
            );
        }
    }
}

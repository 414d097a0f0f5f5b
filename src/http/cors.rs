//! CORS for browsers on other origins (CONTRACT §7), with tower-http's
//! `CorsLayer` around each `/v1` route. What it does not do as the contract
//! says is the status of an `OPTIONS`: it answers every one as a preflight,
//! with `200`; the contract wants `204` for a preflight and `405` for any
//! other.

use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use tower_http::cors::{AllowOrigin, CorsLayer};

use super::AppState;
use super::error::ApiError;

pub struct Cors {
    origins: Vec<HeaderValue>,
}

impl Cors {
    /// `None` without allowed origins: no CORS headers at all.
    pub fn new(origins: &[String]) -> Option<Self> {
        let origins: Vec<HeaderValue> = origins
            .iter()
            .filter_map(|o| HeaderValue::from_str(o).ok())
            .collect();
        (!origins.is_empty()).then_some(Self { origins })
    }

    /// The route has its own `405` inside the CORS layer, so that a wrong
    /// method's answer carries the CORS headers too (the router's `405`
    /// applies to a route after its layers, where none would reach it).
    pub fn around(&self, route: MethodRouter<AppState>, methods: &[Method]) -> MethodRouter<AppState> {
        let layer = CorsLayer::new()
            .allow_origin(AllowOrigin::list(self.origins.clone()))
            .allow_methods(methods.to_vec())
            // SOAPAction: a PlayReady CDM asks for it beside its challenge.
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                HeaderName::from_static("soapaction"),
            ])
            .expose_headers([HeaderName::from_static("x-request-id"), header::RETRY_AFTER]);
        route
            .fallback(|| async { ApiError::MethodNotAllowed })
            .layer(layer)
            .layer(axum::middleware::from_fn_with_state(allow(methods), preflights))
    }
}

/// `Allow` as axum writes it for a route's `405`: `HEAD` comes with `GET`.
fn allow(methods: &[Method]) -> HeaderValue {
    let mut names: Vec<&str> = methods.iter().map(Method::as_str).collect();
    if methods.contains(&Method::GET) && !methods.contains(&Method::HEAD) {
        names.push(Method::HEAD.as_str());
    }
    HeaderValue::from_str(&names.join(",")).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// tower-http answers every `OPTIONS` as a preflight, with `200`. A preflight
/// (`Access-Control-Request-Method`) succeeds with no content, so it says
/// `204`; an `OPTIONS` that is none asks for a method the route does not
/// have, and gets the `405` any other would.
async fn preflights(State(allow): State<HeaderValue>, req: Request, next: Next) -> Response {
    if req.method() != Method::OPTIONS {
        return next.run(req).await;
    }
    if !req.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD) {
        let mut response = ApiError::MethodNotAllowed.into_response();
        response.headers_mut().insert(header::ALLOW, allow);
        return response;
    }
    let mut response = next.run(req).await;
    if response.status() == StatusCode::OK {
        *response.status_mut() = StatusCode::NO_CONTENT;
    }
    response
}

//! CORS for browsers on other origins (CONTRACT §7), with tower-http's
//! `CorsLayer` around each `/v1` route. The one thing it does not do as the
//! contract says is the preflight status: it answers `200`, the contract `204`.

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::MethodRouter;
use tower_http::cors::{AllowOrigin, CorsLayer};

use super::AppState;

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

    /// The route answers `OPTIONS` itself: without a handler, axum's JSON
    /// 405 fallback would take preflights before the CORS layer sees them.
    pub fn around(&self, route: MethodRouter<AppState>, methods: &[Method]) -> MethodRouter<AppState> {
        let layer = CorsLayer::new()
            .allow_origin(AllowOrigin::list(self.origins.clone()))
            .allow_methods(methods.to_vec())
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
            .expose_headers([HeaderName::from_static("x-request-id"), header::RETRY_AFTER]);
        route
            .options(|| async { StatusCode::NO_CONTENT })
            .layer(layer)
            .layer(axum::middleware::from_fn(preflight_no_content))
    }
}

/// A preflight `OPTIONS` with `Access-Control-Request-Method`: its success
/// carries no content, so it says `204`.
async fn preflight_no_content(req: Request, next: Next) -> Response {
    let preflight =
        req.method() == Method::OPTIONS && req.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut response = next.run(req).await;
    if preflight && response.status() == StatusCode::OK {
        *response.status_mut() = StatusCode::NO_CONTENT;
    }
    response
}

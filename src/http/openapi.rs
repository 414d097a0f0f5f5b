//! The OpenAPI 3 document, generated from the handlers and types.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::error::{ActiveSession, ErrorBody, ErrorDetail};
use super::routes::{health, licenses, playback_info, sessions};
use crate::model::{CdnCookies, Drm, LicenseRequestHeaders, Marker, PlaybackInfo, Stream, Subtitle};

#[derive(OpenApi)]
#[openapi(
    info(title = "Moneta playback API", description = "Signed stream URLs, DRM, resume positions and the concurrent-stream limit."),
    paths(
        playback_info::playback_info,
        sessions::start,
        sessions::list,
        sessions::heartbeat,
        sessions::stop,
        licenses::request,
        health::live,
        health::ready,
    ),
    components(schemas(
        PlaybackInfo, Stream, Drm, Subtitle, Marker, CdnCookies, LicenseRequestHeaders, ErrorBody, ErrorDetail, ActiveSession,
        sessions::StartSession, sessions::SessionStarted, sessions::Heartbeat, sessions::PlayerState,
        sessions::HeartbeatAck, sessions::StopSession, sessions::SessionView, sessions::SessionList,
        health::Readiness, health::Dependencies,
        licenses::ClearKeyRequest, licenses::ClearKeyLicense, licenses::ClearKeyKey,
    )),
    modifiers(&BearerAuth),
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
        components.add_security_scheme(
            "licence_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "The stream's `license_token` (HS256), sent as its `license_request_headers` say",
                    ))
                    .build(),
            ),
        );
    }
}

/// The document as served at `/openapi.json`.
pub fn document() -> String {
    ApiDoc::openapi().to_json().unwrap_or_else(|_| "{}".to_owned())
}

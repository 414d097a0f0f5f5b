//! `POST /v1/licenses/{drm_system}`: the licence proxy (CONTRACT §8).
//! Parses the edge's part (system, bearer token, body) and hands the rest
//! to `licenses`.

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::http::AppState;
use crate::http::error::{ApiError, ErrorBody};
use crate::http::extract::PathParam;
use crate::licenses::{self, License, LicenseRequest, Outcome};
use crate::model::DrmSystem;
use crate::sources::CallContext;

/// A CDM's licence request may be much larger than any other body: a
/// PlayReady challenge is a SOAP envelope with the client's certificate
/// chain, a FairPlay SPC carries the certificate too.
pub const MAX_LICENSE_BODY_BYTES: usize = 64 * 1024;

/// Marks an answer that leaves exactly as the vendor gave it, so the layer
/// that gives bare errors a contract body leaves its body alone.
#[derive(Debug, Clone, Copy)]
pub struct Verbatim;

/// A W3C ClearKey licence request (what the browser's ClearKey CDM sends).
#[derive(Deserialize, ToSchema)]
pub struct ClearKeyRequest {
    /// Key ids, unpadded base64url; each must be the licence token's `key_id`.
    #[schema(example = json!(["ASOrzQEjq80BI6vNASOrzQ"]))]
    pub kids: Vec<String>,
    #[serde(rename = "type")]
    #[schema(example = "temporary")]
    pub kind: Option<String>,
}

/// A W3C ClearKey licence: a JSON Web Key set.
#[derive(Serialize, ToSchema)]
pub struct ClearKeyLicense {
    pub keys: Vec<ClearKeyKey>,
    #[serde(rename = "type")]
    #[schema(example = "temporary")]
    pub kind: String,
}

#[derive(Serialize, ToSchema)]
pub struct ClearKeyKey {
    #[schema(example = "oct")]
    pub kty: String,
    /// Key id, unpadded base64url.
    pub kid: String,
    /// The content key, unpadded base64url.
    pub k: String,
}

/// The token of `Authorization: Bearer …`; `None` without the header. A
/// header that is not a bearer token reads as an empty token, which the
/// check refuses as invalid.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?;
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    Some(token.unwrap_or(""))
}

/// A licence for the CDM's request, after the licence token, the session
/// and (ClearKey) the key ids were checked. The answer is Moneta's own
/// ClearKey licence, or the DRM vendor's answer (status, `Content-Type`
/// and body) unchanged.
#[utoipa::path(
    post,
    path = "/v1/licenses/{drm_system}",
    tag = "licenses",
    params(("drm_system" = String, Path, description = "widevine, playready, fairplay or clearkey")),
    request_body(
        description = "The CDM's licence request, as received, in any content type (ClearKey: JSON)",
        content(
            ("application/octet-stream"),
            (ClearKeyRequest = "application/json"),
        )
    ),
    security(("licence_token" = [])),
    responses(
        (status = 200, description = "The licence: Moneta's ClearKey licence, or the vendor's answer as it is", content(
            (ClearKeyLicense = "application/json"),
            ("application/octet-stream"),
        )),
        (status = 400, description = "invalid_body (not a ClearKey licence request)", body = ErrorBody),
        (status = 401, description = "missing_token / invalid_token (the licence token)", body = ErrorBody),
        (status = 403, description = "license_denied (a token for another DRM system, or for another key)", body = ErrorBody),
        (status = 404, description = "session_not_found (stopped, expired or unknown); not_found (no such DRM system, or no licence server for it)", body = ErrorBody),
        (status = 409, description = "session_evicted (playback moved to another device)", body = ErrorBody),
        (status = 413, description = "payload_too_large (over 64 KiB)", body = ErrorBody),
        (status = 429, description = "rate_limited (more than 30 licence requests a minute for this session), with Retry-After", body = ErrorBody),
        (status = 503, description = "dependency_unavailable (the licence server failed, or Moneta is too busy), with Retry-After", body = ErrorBody),
    )
)]
pub async fn request(
    State(app): State<AppState>,
    PathParam(raw_system): PathParam,
    ctx: CallContext,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let system = DrmSystem::parse(&raw_system).ok_or(ApiError::NotFound)?;
    let proxy = app.licenses.as_ref().ok_or(ApiError::NotFound)?;
    let body = body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => {
            licenses::count(system, Outcome::TooLarge);
            ApiError::PayloadTooLarge
        }
        _ => ApiError::InvalidBody(rejection.body_text()),
    })?;
    let license = proxy
        .license(LicenseRequest {
            system,
            token: bearer(&headers),
            body,
            content_type: headers.get(header::CONTENT_TYPE),
            soap_action: headers.get("soapaction"),
            ctx: &ctx,
        })
        .await?;
    // A licence is for one session: no cache keeps it.
    let no_store = (header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(match license {
        License::ClearKey(json) => (
            [
                (header::CONTENT_TYPE, HeaderValue::from_static("application/json")),
                no_store,
            ],
            json,
        )
            .into_response(),
        License::Vendor(answer) => {
            let mut response = Response::new(Body::from(answer.body));
            *response.status_mut() = answer.status;
            let headers = response.headers_mut();
            if let Some(content_type) = answer.content_type {
                headers.insert(header::CONTENT_TYPE, content_type);
            }
            headers.insert(no_store.0, no_store.1);
            response.extensions_mut().insert(Verbatim);
            response
        }
    })
}

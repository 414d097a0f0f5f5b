//! `ApiError`: every error the public API answers, mapped to HTTP once, here.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::AuthError;
use crate::licenses::{LicenseError, TokenError};
use crate::model::LiveSession;
use crate::playback::PlaybackError;
use crate::playback::rules::Denial;
use crate::sessions::SessionError;

/// Seconds a client should wait before retrying a `503`.
pub(super) const RETRY_AFTER_S: &str = "2";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing bearer token")]
    MissingToken,
    #[error("the token is invalid or expired")]
    InvalidToken,
    #[error("content_id must match [A-Za-z0-9_-]{{1,64}}")]
    InvalidContentId,
    #[error("{0}")]
    InvalidBody(String),
    #[error("the body must be application/json")]
    UnsupportedMediaType,
    #[error("the body is too large")]
    PayloadTooLarge,
    #[error("{0}")]
    Playback(#[from] PlaybackError),
    #[error("no such session")]
    SessionNotFound,
    #[error("playback moved to another device")]
    SessionEvicted,
    #[error("too busy to take this now; nothing was changed, try again")]
    Busy,
    #[error("the concurrent-stream limit is reached")]
    StreamLimitReached {
        max_streams: u32,
        active: Vec<LiveSession>,
    },
    #[error("{0}")]
    LicenseDenied(&'static str),
    #[error("too many licence requests for this session; retry later")]
    RateLimited { retry_after_s: u64 },
    #[error("the licence server is unavailable; try again")]
    LicenseServerUnavailable,
    #[error("no such route")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("internal error")]
    Internal,
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Missing => ApiError::MissingToken,
            AuthError::Invalid => ApiError::InvalidToken,
        }
    }
}

impl From<SessionError> for ApiError {
    fn from(e: SessionError) -> Self {
        match e {
            SessionError::NotFound => ApiError::SessionNotFound,
            SessionError::Evicted => ApiError::SessionEvicted,
            SessionError::Busy => ApiError::Busy,
            SessionError::Internal => ApiError::Internal,
            SessionError::LimitReached { max_streams, active } => {
                ApiError::StreamLimitReached { max_streams, active }
            }
            SessionError::Playback(p) => ApiError::Playback(p),
        }
    }
}

impl From<LicenseError> for ApiError {
    fn from(e: LicenseError) -> Self {
        match e {
            LicenseError::Token(t) => match t {
                TokenError::Missing => ApiError::MissingToken,
                TokenError::Invalid => ApiError::InvalidToken,
            },
            LicenseError::Denied(why) => ApiError::LicenseDenied(why),
            LicenseError::SessionNotFound => ApiError::SessionNotFound,
            LicenseError::SessionEvicted => ApiError::SessionEvicted,
            LicenseError::LimitReached { max_streams, active } => {
                ApiError::StreamLimitReached { max_streams, active }
            }
            LicenseError::RateLimited { retry_after } => ApiError::RateLimited {
                // Whole seconds, rounded up: retrying at the announced time succeeds.
                retry_after_s: retry_after.as_millis().div_ceil(1000).max(1) as u64,
            },
            LicenseError::InvalidBody(why) => ApiError::InvalidBody(why.to_owned()),
            LicenseError::NoLicenseServer => ApiError::NotFound,
            LicenseError::Unavailable => ApiError::LicenseServerUnavailable,
            LicenseError::Busy => ApiError::Busy,
        }
    }
}

/// `{"error": {...}}`
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable snake_case code.
    pub code: &'static str,
    /// Text for humans.
    pub message: String,
    /// Only with `stream_limit_reached`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_streams: Option<u32>,
    /// Only with `stream_limit_reached`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active_sessions: Option<Vec<ActiveSession>>,
}

#[derive(Serialize, ToSchema)]
pub struct ActiveSession {
    pub session_id: String,
    pub device_id: String,
    pub content_id: String,
}

impl ApiError {
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        use ApiError::*;
        match self {
            MissingToken => (StatusCode::UNAUTHORIZED, "missing_token"),
            InvalidToken => (StatusCode::UNAUTHORIZED, "invalid_token"),
            InvalidContentId => (StatusCode::BAD_REQUEST, "invalid_content_id"),
            InvalidBody(_) => (StatusCode::BAD_REQUEST, "invalid_body"),
            UnsupportedMediaType => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
            PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            Playback(p) => match p {
                PlaybackError::ContentNotFound => (StatusCode::NOT_FOUND, "content_not_found"),
                PlaybackError::NoEntitlement => (StatusCode::FORBIDDEN, "no_entitlement"),
                PlaybackError::Denied(Denial::SubscriptionInactive) => {
                    (StatusCode::FORBIDDEN, "subscription_inactive")
                }
                PlaybackError::Denied(Denial::PlanNotEligible) => {
                    (StatusCode::FORBIDDEN, "plan_not_eligible")
                }
                PlaybackError::Denied(Denial::RegionUnavailable) => {
                    (StatusCode::FORBIDDEN, "region_unavailable")
                }
                PlaybackError::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "dependency_unavailable"),
            },
            SessionNotFound => (StatusCode::NOT_FOUND, "session_not_found"),
            SessionEvicted => (StatusCode::CONFLICT, "session_evicted"),
            Busy => (StatusCode::SERVICE_UNAVAILABLE, "dependency_unavailable"),
            StreamLimitReached { .. } => (StatusCode::CONFLICT, "stream_limit_reached"),
            LicenseDenied(_) => (StatusCode::FORBIDDEN, "license_denied"),
            RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            LicenseServerUnavailable => (StatusCode::SERVICE_UNAVAILABLE, "dependency_unavailable"),
            NotFound => (StatusCode::NOT_FOUND, "not_found"),
            MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let (max_streams, active_sessions) = match &self {
            ApiError::StreamLimitReached { max_streams, active } => (
                Some(*max_streams),
                Some(
                    active
                        .iter()
                        .map(|s| ActiveSession {
                            session_id: s.session_id.to_string(),
                            device_id: s.device_id.to_string(),
                            content_id: s.content_id.to_string(),
                        })
                        .collect(),
                ),
            ),
            _ => (None, None),
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code,
                message: self.to_string(),
                max_streams,
                active_sessions,
            },
        };
        let mut response = (status, Json(body)).into_response();
        let headers = response.headers_mut();
        match status {
            StatusCode::UNAUTHORIZED => {
                let value = match self {
                    ApiError::InvalidToken => r#"Bearer error="invalid_token""#,
                    _ => "Bearer",
                };
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(value));
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_S));
            }
            _ => {}
        }
        if let ApiError::RateLimited { retry_after_s } = &self {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_s));
        }
        response
    }
}

/// The contract code for a bare status produced outside the handlers
/// (router fallbacks, body limit, timeouts, panics).
pub fn code_for_status(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "bad_request",
        401 => "unauthorized",
        404 => "not_found",
        405 => "method_not_allowed",
        408 => "request_timeout",
        413 => "payload_too_large",
        415 => "unsupported_media_type",
        429 => "rate_limited",
        503 => "service_unavailable",
        504 => "timeout",
        _ if status.is_server_error() => "internal",
        _ => "error",
    }
}

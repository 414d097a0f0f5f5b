//! Every failure a client can see, mapped to a status and a JSON body in one
//! place so all routes answer errors the same way.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::domain::Invalid;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    NotFound { code: &'static str, message: String },
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    #[error("{message}")]
    PayloadTooLarge { code: &'static str, message: String },
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{message}")]
    Unauthorized {
        code: &'static str,
        message: &'static str,
    },
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("the database is unavailable")]
    DatabaseUnavailable(#[source] sqlx::Error),
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: &'a str,
}

impl ApiError {
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::BadRequest {
            code,
            message: message.into(),
        }
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::NotFound {
            code,
            message: message.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::NotFound { .. } => StatusCode::NOT_FOUND,
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::DatabaseUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::NotFound { code, .. }
            | Self::BadRequest { code, .. }
            | Self::PayloadTooLarge { code, .. }
            | Self::Unauthorized { code, .. } => code,
            Self::UnsupportedMediaType(_) => "unsupported_media_type",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::DatabaseUnavailable(_) => "database_unavailable",
            Self::Internal(_) => "internal_error",
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(err: sqlx::Error) -> Self {
        if crate::db::is_unavailable(&err) {
            Self::DatabaseUnavailable(err)
        } else {
            Self::Internal(Box::new(err))
        }
    }
}

/// Values in paths arrive here; values in bodies fail inside serde and
/// become `invalid_body` (see `extract`).
impl From<Invalid> for ApiError {
    fn from(invalid: Invalid) -> Self {
        let code = match invalid {
            Invalid::UserId => "invalid_user_id",
            Invalid::ContentId => "invalid_content_id",
            Invalid::PositionMs | Invalid::UpdatedAt => "invalid_body",
        };
        Self::bad_request(code, invalid.to_string())
    }
}

/// What a lookup answers: `200` with the row it found, else an error.
pub type Found<T> = Result<Json<T>, ApiError>;

/// A missing row is `404` with a code of its own, because Moneta answers
/// each differently (no entitlement is `403` to the viewer, no position is
/// a start from 0).
pub fn found<T>(row: Option<T>, code: &'static str, message: &'static str) -> Found<T> {
    row.map(Json).ok_or_else(|| ApiError::not_found(code, message))
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        // Server-side causes are logged here, inside the request's span, and
        // never sent to the client.
        match &self {
            Self::DatabaseUnavailable(source) => {
                tracing::warn!(error = %source, "database unavailable");
            }
            Self::Internal(source) => {
                tracing::error!(error = %source, "internal error");
            }
            _ => {}
        }
        let message = self.to_string();
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code(),
                message: &message,
            },
        };
        let mut response = (status, Json(body)).into_response();
        match &self {
            Self::Unauthorized { code, .. } => {
                let challenge = if *code == "invalid_token" {
                    HeaderValue::from_static("Bearer error=\"invalid_token\"")
                } else {
                    HeaderValue::from_static("Bearer")
                };
                response.headers_mut().insert(header::WWW_AUTHENTICATE, challenge);
            }
            Self::DatabaseUnavailable(_) => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
    }
}

/// Catch-all for unknown routes so they answer in the same JSON shape.
pub async fn not_found() -> ApiError {
    ApiError::not_found("not_found", "no such route")
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

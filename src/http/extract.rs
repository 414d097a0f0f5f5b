//! Extractors that turn a request into typed input or a contract error.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use serde::de::DeserializeOwned;

use super::AppState;
use super::error::ApiError;
use crate::auth::{AuthError, Claims};
use crate::sources::CallContext;

/// The verified caller of a `/v1` route.
pub struct Caller(pub Arc<Claims>);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, Self::Rejection> {
        let value = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or(AuthError::Missing)?;
        let value = value.to_str().map_err(|_| AuthError::Invalid)?;
        let (scheme, token) = value.split_once(' ').ok_or(AuthError::Invalid)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthError::Invalid.into());
        }
        Ok(Caller(app.verifier.verify(token.trim())?))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for CallContext {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let request_id = parts
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Ok(CallContext { request_id })
    }
}

fn body_error(rejection: JsonRejection) -> ApiError {
    match rejection {
        JsonRejection::MissingJsonContentType(_) => ApiError::UnsupportedMediaType,
        JsonRejection::BytesRejection(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::PayloadTooLarge
        }
        other => ApiError::InvalidBody(other.body_text()),
    }
}

/// The one parameter of a route's path, percent-decoded. A segment that
/// does not decode to UTF-8 (`%FF`) names no title, session or DRM system
/// there is: it is handed on as the empty string, which no id parses from,
/// so the route answers as for any id it does not know.
pub struct PathParam(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathParam {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Ok(PathParam(
            Path::<String>::from_request_parts(parts, state)
                .await
                .map(|Path(value)| value)
                .unwrap_or_default(),
        ))
    }
}

/// A request body: a JSON object. serde's derive also reads a struct from an
/// array of its fields in order (`["m-0001","tv"]`), which no client of this
/// API means; such a body has the wrong type (`400 invalid_body`).
fn from_object<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::InvalidBody("the body must be a JSON object".to_owned()));
    }
    utf8(bytes)?;
    Json::<T>::from_bytes(bytes).map(|Json(v)| v).map_err(body_error)
}

/// JSON is UTF-8 (RFC 8259). serde_json checks the strings it keeps, but
/// skips an unknown field's string without looking inside, so a body with
/// bytes that are no text there would otherwise be taken.
fn utf8(bytes: &[u8]) -> Result<(), ApiError> {
    std::str::from_utf8(bytes)
        .map(drop)
        .map_err(|e| ApiError::InvalidBody(format!("the body is not UTF-8 (byte {})", e.valid_up_to())))
}

async fn body_bytes<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    Bytes::from_request(req, state)
        .await
        .map_err(|r| match r.status() {
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
            _ => ApiError::InvalidBody(r.body_text()),
        })
}

/// A required JSON body.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !is_json(req.headers()) {
            return Err(ApiError::UnsupportedMediaType);
        }
        from_object(&body_bytes(req, state).await?).map(JsonBody)
    }
}

/// A JSON body that may be absent (empty).
pub struct OptionalJsonBody<T>(pub Option<T>);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for OptionalJsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = is_json(req.headers());
        let bytes = body_bytes(req, state).await?;
        if bytes.is_empty() {
            return Ok(OptionalJsonBody(None));
        }
        if !is_json {
            return Err(ApiError::UnsupportedMediaType);
        }
        from_object(&bytes).map(|v| OptionalJsonBody(Some(v)))
    }
}

/// Matches axum's own rule for JSON bodies: `application/json` or `application/*+json`.
/// Compared in place, ignoring case, and the bare `application/json` that
/// players send first: a lowercased copy of the header, found by a search
/// for `;`, was ~550 instructions of every heartbeat.
fn is_json(headers: &axum::http::HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return false;
    };
    if value.as_bytes().eq_ignore_ascii_case(b"application/json") {
        return true;
    }
    let Ok(value) = value.to_str() else {
        return false;
    };
    let essence = value
        .split_once(';')
        .map_or(value, |(essence, _)| essence)
        .trim()
        .as_bytes();
    let is = |part: Option<&[u8]>, text: &str| part.is_some_and(|p| p.eq_ignore_ascii_case(text.as_bytes()));
    essence.eq_ignore_ascii_case(b"application/json")
        || (is(essence.get(..12), "application/")
            && is(
                essence.len().checked_sub(5).and_then(|at| essence.get(at..)),
                "+json",
            ))
}

#[cfg(test)]
mod tests {
    use axum::http::{HeaderMap, HeaderValue};

    use super::*;

    #[test]
    fn json_media_types_are_recognised_as_axum_recognises_them() {
        let cases = [
            ("application/json", true),
            ("Application/JSON; charset=utf-8", true),
            ("  application/json  ;charset=utf-8", true),
            ("application/vnd.api+json", true),
            ("APPLICATION/Problem+JSON", true),
            ("application/+json", true),
            ("application/json-patch", false),
            ("application/jsonx", false),
            ("text/json", false),
            ("application/", false),
            ("+json", false),
            ("", false),
            ("json", false),
        ];
        for (value, expected) in cases {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(value));
            assert_eq!(is_json(&headers), expected, "{value:?}");
        }
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_bytes(b"application/json; x=\xff").unwrap(),
        );
        assert!(!is_json(&headers), "a value that is not visible ASCII");
        assert!(!is_json(&HeaderMap::new()));
    }
}

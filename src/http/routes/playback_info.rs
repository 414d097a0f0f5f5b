use axum::extract::State;

use crate::http::AppState;
use crate::http::cookies::CdnCookieHeaders;
use crate::http::error::{ApiError, ErrorBody};
use crate::http::extract::{Caller, PathParam};
use crate::model::{ContentId, PlaybackInfo};
use crate::playback::{Audience, PlaybackAnswer};
use crate::sources::CallContext;

/// Stream URLs, DRM, subtitles and resume position for one title.
#[utoipa::path(
    get,
    path = "/v1/contents/{content_id}/playback-info",
    tag = "playback",
    params(("content_id" = String, Path, description = "Title id", pattern = "^[A-Za-z0-9_-]{1,64}$", example = "m-0001")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Playback information", body = PlaybackInfo),
        (status = 400, description = "invalid_content_id", body = ErrorBody),
        (status = 401, description = "missing_token / invalid_token", body = ErrorBody),
        (status = 403, description = "no_entitlement / subscription_inactive / plan_not_eligible / region_unavailable", body = ErrorBody),
        (status = 404, description = "content_not_found", body = ErrorBody),
        (status = 503, description = "dependency_unavailable", body = ErrorBody),
    )
)]
pub async fn playback_info(
    State(app): State<AppState>,
    Caller(claims): Caller,
    ctx: CallContext,
    PathParam(content_id): PathParam,
) -> Result<(CdnCookieHeaders, PlaybackAnswer), ApiError> {
    let content_id = ContentId::parse(content_id).map_err(|_| ApiError::InvalidContentId)?;
    let authorized = app.playback.authorize(&claims, &content_id, &ctx).await?;
    let audience = Audience {
        claims: &claims,
        session_id: None,
        max_streams: None,
    };
    let answer = app.playback.answer(&authorized, &audience);
    Ok((
        CdnCookieHeaders::new(
            answer.content_id(),
            answer.cdn_cookies(),
            app.cdn_cookie_domain.as_deref(),
        ),
        answer,
    ))
}

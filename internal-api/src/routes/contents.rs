use axum::Json;
use axum::extract::State;

use crate::domain::{ContentPlayback, MAX_CONTENT_ID_LEN, valid_content_id};
use crate::error::ApiError;
use crate::extract::ApiPath;
use crate::queries;
use crate::startup::AppState;

pub async fn playback(
    State(state): State<AppState>,
    ApiPath(content_id): ApiPath<String>,
) -> Result<Json<ContentPlayback>, ApiError> {
    check_content_id(&content_id)?;
    queries::content_playback(&state.db, &content_id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("content_not_found", "no such content"))
}

pub(crate) fn check_content_id(content_id: &str) -> Result<(), ApiError> {
    if valid_content_id(content_id) {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "invalid_content_id",
            format!("content_id must match [A-Za-z0-9_-]{{1,{MAX_CONTENT_ID_LEN}}}"),
        ))
    }
}

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;

use crate::domain::{Progress, ProgressBatch};
use crate::error::ApiError;
use crate::extract::{ApiJson, ApiPath};
use crate::queries;
use crate::routes::contents::check_content_id;
use crate::routes::users::check_user_id;
use crate::startup::AppState;

/// Keeps one statement's arrays, and the time it holds row locks, bounded.
pub const MAX_BATCH_ITEMS: usize = 1000;

pub async fn get_progress(
    State(state): State<AppState>,
    ApiPath((user_id, content_id)): ApiPath<(String, String)>,
) -> Result<Json<Progress>, ApiError> {
    check_user_id(&user_id)?;
    check_content_id(&content_id)?;
    queries::progress(&state.db, &user_id, &content_id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("progress_not_found", "no position stored yet"))
}

/// Validates every item before writing any, so a bad batch changes nothing.
pub async fn batch(
    State(state): State<AppState>,
    ApiJson(batch): ApiJson<ProgressBatch>,
) -> Result<StatusCode, ApiError> {
    if batch.items.len() > MAX_BATCH_ITEMS {
        return Err(ApiError::PayloadTooLarge {
            code: "batch_too_large",
            message: format!("at most {MAX_BATCH_ITEMS} items per batch"),
        });
    }
    for (index, item) in batch.items.iter().enumerate() {
        if let Some(problem) = item.problem() {
            return Err(ApiError::bad_request(
                "invalid_body",
                format!("items[{index}]: {problem}"),
            ));
        }
    }
    let changed = queries::upsert_progress(&state.db, &batch.items).await?;
    tracing::info!(items = batch.items.len(), changed, "progress batch stored");
    Ok(StatusCode::NO_CONTENT)
}

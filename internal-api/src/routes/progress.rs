use axum::extract::State;
use axum::http::StatusCode;

use crate::domain::{ContentId, Progress, ProgressBatch, UserId};
use crate::error::{ApiError, Found, found};
use crate::extract::{ApiJson, ApiPath};
use crate::queries;
use crate::state::AppState;

/// Keeps one statement's arrays, and the time it holds row locks, bounded.
pub const MAX_BATCH_ITEMS: usize = 1000;

pub async fn get_progress(
    State(state): State<AppState>,
    ApiPath((user_id, content_id)): ApiPath<(String, String)>,
) -> Found<Progress> {
    let user_id = UserId::parse(user_id)?;
    let content_id = ContentId::parse(content_id)?;
    let progress = queries::progress(&state.db, &user_id, &content_id).await?;
    found(progress, "progress_not_found", "no position stored yet")
}

/// Every item was checked while the body was parsed (see `ProgressItem`), so
/// a batch that gets here is stored whole.
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
    let changed = queries::upsert_progress(&state.db, &batch.items).await?;
    tracing::info!(items = batch.items.len(), changed, "progress batch stored");
    Ok(StatusCode::NO_CONTENT)
}

use axum::extract::State;

use crate::domain::{ContentId, ContentPlayback};
use crate::error::{Found, found};
use crate::extract::ApiPath;
use crate::queries;
use crate::state::AppState;

pub async fn playback(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> Found<ContentPlayback> {
    let id = ContentId::parse(id)?;
    let playback = queries::content_playback(&state.db, &id).await?;
    found(playback, "content_not_found", "no such content")
}

use axum::Json;
use axum::extract::State;

use crate::domain::{Entitlement, MAX_USER_ID_LEN, valid_user_id};
use crate::error::ApiError;
use crate::extract::ApiPath;
use crate::queries;
use crate::startup::AppState;

pub async fn entitlement(
    State(state): State<AppState>,
    ApiPath(user_id): ApiPath<String>,
) -> Result<Json<Entitlement>, ApiError> {
    check_user_id(&user_id)?;
    queries::entitlement(&state.db, &user_id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("entitlement_not_found", "no entitlement for this user"))
}

pub(crate) fn check_user_id(user_id: &str) -> Result<(), ApiError> {
    if valid_user_id(user_id) {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "invalid_user_id",
            format!("user_id must be 1 to {MAX_USER_ID_LEN} bytes without control characters"),
        ))
    }
}

use axum::extract::State;

use crate::domain::{Entitlement, UserId};
use crate::error::{Found, found};
use crate::extract::ApiPath;
use crate::queries;
use crate::state::AppState;

pub async fn entitlement(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> Found<Entitlement> {
    let id = UserId::parse(id)?;
    let entitlement = queries::entitlement(&state.db, &id).await?;
    found(
        entitlement,
        "entitlement_not_found",
        "no entitlement for this user",
    )
}

//! What every request handler shares. It sits below the routes and the
//! router alike, so handlers never depend on the module that wires them up.

use std::sync::Arc;

use secrecy::SecretString;
use sqlx::PgPool;

#[derive(Clone)]
pub struct AppState {
    pub db: PgPool,
    /// `None` leaves the `/internal` routes open. Shared rather than copied
    /// into every request's clone of the state.
    pub token: Option<Arc<SecretString>>,
}

//! Connection pool, start-up retry and migrations.

use std::time::Duration;

use sqlx::migrate::{MigrateError, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};
use tokio::time::Instant;

/// Relative to this crate's Cargo.toml: the SQL lives at the workspace root
/// so operators and other tools find it without knowing the crate layout.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// Short enough that a request fails fast (and Moneta falls back) while the
/// database is down, long enough to ride out a brief connection spike.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(2);
pub const MAX_CONNECTIONS: u32 = 10;
/// Bounds a query on a hung or overloaded database; the server cancels it.
pub const STATEMENT_TIMEOUT: &str = "5s";

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("database not reachable within {0:?}: {1}")]
    Unreachable(Duration, #[source] sqlx::Error),
    #[error("cannot connect to the database: {0}")]
    Connect(#[source] sqlx::Error),
    #[error("migrations failed: {0}")]
    Migrate(#[source] MigrateError),
}

/// Errors that mean "the database cannot answer right now" rather than "this
/// request is wrong": they become 503 so callers retry or fall back, and the
/// pool reconnects by itself once the database is back.
pub fn is_unavailable(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08: connection exception; 57P01-57P03: shutdown or start-up in
            // progress; 57014: statement timeout; 53300: too many connections.
            code.starts_with("08") || code.starts_with("57P0") || code == "57014" || code == "53300"
        }),
        _ => false,
    }
}

/// Builds a pool that connects lazily, so that once built it never needs the
/// process to restart: every checkout pings the connection and replaces dead
/// ones after a database restart.
pub fn pool(options: &PgConnectOptions) -> PgPool {
    let options = options
        .clone()
        .options([("statement_timeout", STATEMENT_TIMEOUT)]);
    PgPoolOptions::new()
        .max_connections(MAX_CONNECTIONS)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .test_before_acquire(true)
        .connect_lazy_with(options)
}

/// Waits for the database to accept connections, for up to `timeout`, so the
/// service can be started together with PostgreSQL. Errors that waiting cannot
/// cure (bad password, unknown database) end the wait at once.
pub async fn wait_until_reachable(pool: &PgPool, timeout: Duration) -> Result<(), StartupError> {
    let deadline = Instant::now() + timeout;
    let mut attempt: u32 = 0;
    loop {
        attempt += 1;
        let err = match sqlx::query("SELECT 1").execute(pool).await {
            Ok(_) => return Ok(()),
            Err(err) if !is_unavailable(&err) => return Err(StartupError::Connect(err)),
            Err(err) => err,
        };
        if Instant::now() + Duration::from_millis(500) >= deadline {
            return Err(StartupError::Unreachable(timeout, err));
        }
        tracing::warn!(attempt, error = %err, "database not reachable yet, retrying");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Applies pending migrations. sqlx holds an advisory lock meanwhile, so
/// several instances starting together do not race, and already applied
/// migrations are skipped, so a restart is a no-op. They run on a connection
/// of their own, free of the per-request statement timeout, because a schema
/// change on a large table may rightly take longer.
pub async fn migrate(options: &PgConnectOptions) -> Result<(), StartupError> {
    let mut conn = PgConnection::connect_with(options)
        .await
        .map_err(StartupError::Connect)?;
    // `run` only acquires a connection and calls `run_direct`; calling it
    // directly keeps this future `Send` (sqlx's `Acquire` bound is not).
    let result = MIGRATOR.run_direct(&mut conn).await;
    let _ = conn.close().await;
    result.map_err(StartupError::Migrate)?;
    tracing::info!(migrations = MIGRATOR.iter().count(), "database schema up to date");
    Ok(())
}

/// Everything a command needs before touching data: a reachable, migrated
/// database.
pub async fn connect_and_migrate(
    options: &PgConnectOptions,
    startup_timeout: Duration,
) -> Result<PgPool, StartupError> {
    let pool = pool(options);
    wait_until_reachable(&pool, startup_timeout).await?;
    migrate(options).await?;
    Ok(pool)
}

//! Command line: which job this process does.

use std::io::Write;

use clap::{Parser, Subcommand};

use crate::configuration::Settings;
use crate::db;
use crate::domain::CatalogSnapshot;
use crate::queries;
use crate::seed;
use crate::startup::{Application, StartupError};

const SETTINGS_HELP: &str = "\
Settings (environment):
  DATABASE_URL                       PostgreSQL URL (required)
  INTERNAL_API_LISTEN_ADDR           listen address [default: 0.0.0.0:4000]
  INTERNAL_API_TOKEN                 bearer token required on /internal routes (unset: no auth)
  INTERNAL_API_DB_STARTUP_TIMEOUT_S  how long to wait for the database at start [default: 30]
  RUST_LOG                           log filter [default: info,sqlx=warn]";

#[derive(Debug, Parser)]
#[command(
    name = "internal-api",
    version,
    about = "Reference internal API for Moneta (catalog, entitlements, resume positions)",
    after_help = SETTINGS_HELP
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Serve the API (the default)
    Serve,
    /// Load the demo catalog and users; running it again changes nothing
    Seed,
    /// Print the catalog as a Moneta fallback catalog document on stdout
    ExportSnapshot,
}

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Startup(#[from] StartupError),
    #[error(transparent)]
    Database(#[from] db::StartupError),
    #[error("database query failed: {0}")]
    Query(#[from] sqlx::Error),
    #[error("cannot serve: {0}")]
    Serve(#[source] std::io::Error),
    #[error("cannot write the snapshot: {0}")]
    Output(#[source] std::io::Error),
}

pub async fn run(command: Command, settings: Settings) -> Result<(), CommandError> {
    match command {
        Command::Serve => serve(&settings).await,
        Command::Seed => {
            let pool = db::connect_and_migrate(&settings.database, settings.db_startup_timeout).await?;
            let report = seed::apply(&pool).await?;
            tracing::info!(
                contents = report.contents,
                users = report.users,
                rows_changed = report.rows_changed,
                "demo data seeded"
            );
            pool.close().await;
            Ok(())
        }
        Command::ExportSnapshot => {
            let pool = db::connect_and_migrate(&settings.database, settings.db_startup_timeout).await?;
            let snapshot = CatalogSnapshot {
                contents: queries::all_content_playback(&pool).await?,
            };
            pool.close().await;
            let mut out = std::io::stdout().lock();
            serde_json::to_writer_pretty(&mut out, &snapshot).map_err(|e| CommandError::Output(e.into()))?;
            out.write_all(b"\n")
                .and_then(|()| out.flush())
                .map_err(CommandError::Output)?;
            Ok(())
        }
    }
}

async fn serve(settings: &Settings) -> Result<(), CommandError> {
    let app = Application::build(settings).await?;
    tracing::info!(
        addr = %app.local_addr(),
        auth = if settings.token.is_some() { "bearer" } else { "none" },
        "listening"
    );
    app.run_until_stopped().await.map_err(CommandError::Serve)?;
    tracing::info!("stopped");
    Ok(())
}

//! Builds the router, binds the listener and serves until told to stop.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::middleware::{from_fn, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tower_http::catch_panic::CatchPanicLayer;

use crate::configuration::Settings;
use crate::db;
use crate::error::{self, ApiError};
use crate::middleware::request_context;
use crate::routes::{contents, health, progress, users};
use crate::state::AppState;

/// A full batch of 1000 items is about 200 KiB; anything far larger is not a
/// request this API expects.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Database(#[from] db::StartupError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

pub fn router(state: AppState) -> Router {
    let internal = Router::new()
        .route(
            "/internal/v1/contents/{content_id}/playback",
            get(contents::playback),
        )
        .route(
            "/internal/v1/users/{user_id}/entitlement",
            get(users::entitlement),
        )
        .route(
            "/internal/v1/users/{user_id}/progress/{content_id}",
            get(progress::get_progress),
        )
        // The colon is literal here: axum 0.8 only treats `{...}` as a
        // capture.
        .route("/internal/v1/progress:batch", post(progress::batch))
        .route_layer(from_fn_with_state(state.clone(), crate::auth::require_token));

    // Health stays outside the token check so load balancers and container
    // health checks need no secret.
    Router::new()
        .route("/health", get(health::health))
        .merge(internal)
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(from_fn(request_context))
        .with_state(state)
}

/// A panic is a bug, but the caller still gets the documented error shape and
/// the process keeps serving.
fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::Internal("request handler panicked".into()).into_response()
}

pub struct Application {
    listener: TcpListener,
    local_addr: SocketAddr,
    router: Router,
    pool: PgPool,
}

impl Application {
    /// Connects (retrying while the database comes up), migrates and binds.
    pub async fn build(settings: &Settings) -> Result<Self, StartupError> {
        let pool = db::connect_and_migrate(&settings.database, settings.db_startup_timeout).await?;
        Self::build_with_pool(settings, pool).await
    }

    pub async fn build_with_pool(settings: &Settings, pool: PgPool) -> Result<Self, StartupError> {
        let addr = settings.listen_addr;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartupError::Bind { addr, source })?;
        // Port 0 asks the OS for a free port; report the one it chose.
        let local_addr = listener
            .local_addr()
            .map_err(|source| StartupError::Bind { addr, source })?;
        let state = AppState {
            db: pool.clone(),
            token: settings.token.clone().map(Arc::new),
        };
        Ok(Self {
            listener,
            local_addr,
            router: router(state),
            pool,
        })
    }

    pub fn port(&self) -> u16 {
        self.local_addr.port()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Serves until SIGTERM or SIGINT, then lets in-flight requests finish.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.run_with_shutdown(shutdown_signal()).await
    }

    pub async fn run_with_shutdown<F>(self, signal: F) -> std::io::Result<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let result = axum::serve(self.listener, self.router)
            .with_graceful_shutdown(signal)
            .await;
        self.pool.close().await;
        result
    }
}

pub async fn shutdown_signal() {
    let interrupt = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %err, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
    tracing::info!("shutdown requested, finishing in-flight requests");
}

//! Builds the application from settings, binds its listeners, runs it and
//! shuts it down in order.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::auth::keys::{JwksFile, StaticSecret};
use crate::auth::secrets_manager::SecretsManagerJwks;
use crate::auth::{KeySource, KeyStore, Verifier};
use crate::config::Settings;
use crate::playback::Playback;
use crate::playback::cdn::{Cdn, CloudFrontSigner};
use crate::progress::{ProgressQueue, Sinks};
use crate::sessions::Sessions;
use crate::sources::internal_api::InternalApi;
use crate::sources::redis::RedisStore;
use crate::sources::snapshot::Snapshot;
use crate::telemetry;

/// How often dependencies are probed in the background, so readiness and the
/// breakers learn of recovery even without traffic.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// A start-up failure; the message names the setting at fault.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StartupError(pub String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Starting = 0,
    Serving = 1,
    Stopping = 2,
}

/// Everything the handlers share.
pub struct App {
    pub settings: Arc<Settings>,
    pub verifier: Verifier,
    pub playback: Arc<Playback>,
    pub sessions: Sessions,
    pub internal_api: InternalApi,
    pub progress: Arc<ProgressQueue>,
    phase: AtomicU8,
}

impl App {
    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Starting,
            1 => Phase::Serving,
            _ => Phase::Stopping,
        }
    }

    fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Release);
    }
}

async fn key_sources(settings: &Settings) -> Result<Vec<Box<dyn KeySource>>, StartupError> {
    let mut sources: Vec<Box<dyn KeySource>> = Vec::new();
    if let Some(secret) = &settings.jwt_hs256_secret {
        sources.push(Box::new(StaticSecret(secret.clone())));
    }
    if let Some(path) = &settings.jwt_jwks_file {
        sources.push(Box::new(JwksFile(path.clone())));
    }
    if let Some(secret_id) = &settings.jwt_secret_id {
        let source = SecretsManagerJwks::from_env(secret_id.as_str())
            .await
            .map_err(|e| StartupError(e.to_string()))?;
        sources.push(Box::new(source));
    }
    Ok(sources)
}

pub struct Application {
    app: Arc<App>,
    public: TcpListener,
    admin: TcpListener,
    metrics: PrometheusHandle,
}

impl Application {
    /// Loads keys and the snapshot, prepares the clients and binds both ports.
    /// Dependencies are not contacted: Moneta starts while they are down.
    pub async fn build(settings: Settings) -> Result<Self, StartupError> {
        let settings = Arc::new(settings);
        let metrics = telemetry::metrics::install();
        let keys = KeyStore::load(key_sources(&settings).await?)
            .await
            .map_err(|e| StartupError(e.to_string()))?;
        let verifier = Verifier::new(
            keys,
            settings.jwt_issuer.as_deref(),
            settings.jwt_audience.as_deref(),
        );
        let snapshot = match &settings.fallback_catalog_file {
            Some(path) => Snapshot::load(path).map_err(|e| StartupError(e.to_string()))?,
            None => Snapshot::empty(),
        };
        let signer = match (&settings.cdn_key_pair_id, &settings.cdn_private_key_file) {
            (Some(id), Some(path)) => Some(
                CloudFrontSigner::from_pem_file(id, path, settings.cdn_url_ttl)
                    .map_err(|e| StartupError(e.to_string()))?,
            ),
            _ => None,
        };
        let cdn = Cdn::new(&settings.cdn_base_url, signer);
        let redis = RedisStore::new(&settings).map_err(|e| StartupError(format!("MONETA_REDIS_URL: {e}")))?;
        let internal_api = InternalApi::new(&settings).map_err(StartupError)?;
        let progress = ProgressQueue::new(settings.progress_queue_capacity);
        let playback = Arc::new(Playback::new(
            redis,
            internal_api.clone(),
            snapshot,
            cdn,
            settings.clone(),
        ));
        let sessions = Sessions::new(playback.clone(), progress.clone(), settings.session_ttl);

        let bind = |addr, setting: &'static str| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|e| StartupError(format!("{setting}: cannot listen on {addr}: {e}")))
        };
        let public = bind(settings.listen_addr, "MONETA_LISTEN_ADDR").await?;
        let admin = bind(settings.admin_addr, "MONETA_ADMIN_ADDR").await?;
        let app = Arc::new(App {
            settings,
            verifier,
            playback,
            sessions,
            internal_api,
            progress,
            phase: AtomicU8::new(Phase::Starting as u8),
        });
        Ok(Self {
            app,
            public,
            admin,
            metrics,
        })
    }

    pub fn port(&self) -> u16 {
        self.public.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    pub fn admin_port(&self) -> u16 {
        self.admin.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    pub fn app(&self) -> Arc<App> {
        self.app.clone()
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight
    /// requests finish and delivers pending positions before returning.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let Self {
            app,
            public,
            admin,
            metrics,
        } = self;
        let settings = app.settings.clone();
        let stop = Arc::new(Notify::new());

        let sinks = Sinks {
            api: app.internal_api.clone(),
            redis: app.playback.redis().clone(),
            interval: settings.progress_flush_interval,
            batch_size: settings.progress_batch_size,
        };
        let flusher = tokio::spawn(app.progress.clone().run_flusher(
            sinks,
            stop.clone(),
            settings.shutdown_grace,
        ));
        let background = [
            tokio::spawn(probe_dependencies(app.clone())),
            tokio::spawn(refresh_keys(app.clone(), settings.jwt_refresh)),
            tokio::spawn(telemetry::metrics::upkeep(metrics.clone())),
        ];

        let admin_router = Router::new().route(
            "/metrics",
            get(move || {
                let handle = metrics.clone();
                async move { telemetry::metrics::render(&handle) }
            }),
        );
        let admin_stop = stop.clone();
        let admin_task = tokio::spawn(async move {
            axum::serve(admin, admin_router)
                .with_graceful_shutdown(async move { admin_stop.notified().await })
                .await
        });

        let router = crate::http::router(app.clone(), settings.request_timeout);
        app.set_phase(Phase::Serving);
        tracing::info!(port = public.local_addr()?.port(), "moneta serving");
        let phase_app = app.clone();
        axum::serve(public, router)
            .with_graceful_shutdown(async move {
                shutdown.await;
                phase_app.set_phase(Phase::Stopping);
                tracing::info!("shutting down: no new connections, finishing in-flight requests");
            })
            .await?;

        // notify_waiters reaches the admin server; notify_one stores a permit for
        // the flusher in case it is not waiting at this instant.
        stop.notify_waiters();
        stop.notify_one();
        for task in background {
            task.abort();
        }
        let _ = flusher.await;
        let _ = admin_task.await;
        tracing::info!("moneta stopped");
        Ok(())
    }
}

async fn probe_dependencies(app: Arc<App>) {
    let mut tick = tokio::time::interval(PROBE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let _ = tokio::join!(app.playback.redis().ping(), app.internal_api.probe());
    }
}

async fn refresh_keys(app: Arc<App>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    // A slow key source must not be asked again in a burst once it answers.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        app.verifier.keys().refresh().await;
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

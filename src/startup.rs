//! Builds the application from settings, binds its listeners, runs it and
//! shuts it down in order: drain, close, finish in flight, deliver, exit.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::app::{App, Phase};
use crate::auth::keys::{JwksFile, KeyError, StaticSecret};
use crate::auth::secrets_manager::SecretsManagerJwks;
use crate::auth::{KeySource, KeyStore, Verifier};
use crate::config::{JwtSettings, Settings, StreamLimitPolicy};
use crate::playback::cdn::{Cdn, CdnKeyError, CloudFrontSigner};
use crate::playback::{Answers, Playback, Titles, UserStates};
use crate::progress::{Courier, ProgressQueue};
use crate::sessions::{SessionKey, SessionKeyError, Sessions};
use crate::sources::internal_api::InternalApi;
use crate::sources::redis::RedisStore;
use crate::sources::snapshot::{Snapshot, SnapshotError};
use crate::telemetry;

/// How often dependencies are probed in the background, so readiness and the
/// breakers learn of recovery even without traffic.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// A start-up failure; the message names the setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Cdn(#[from] CdnKeyError),
    #[error("MONETA_REDIS_URL: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("{0}")]
    InternalApi(String),
    #[error(transparent)]
    SessionKey(#[from] SessionKeyError),
    #[error("{setting}: cannot listen on {addr}: {source}")]
    Listen {
        setting: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

async fn key_sources(jwt: &JwtSettings) -> Result<Vec<Box<dyn KeySource>>, StartupError> {
    let mut sources: Vec<Box<dyn KeySource>> = Vec::new();
    if let Some(secret) = &jwt.hs256_secret {
        sources.push(Box::new(StaticSecret(secret.clone())));
    }
    if let Some(path) = &jwt.jwks_file {
        sources.push(Box::new(JwksFile(path.clone())));
    }
    if let Some(secret_id) = &jwt.secret_id {
        sources.push(Box::new(SecretsManagerJwks::from_env(secret_id.as_str()).await?));
    }
    Ok(sources)
}

async fn bind(addr: SocketAddr, setting: &'static str) -> Result<TcpListener, StartupError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartupError::Listen {
            setting,
            addr,
            source,
        })
}

pub struct Application {
    app: Arc<App>,
    settings: Settings,
    public: TcpListener,
    admin: TcpListener,
    metrics: PrometheusHandle,
    courier: Courier,
}

impl Application {
    /// Loads keys and the snapshot, prepares the clients and binds both ports.
    /// Dependencies are not contacted: Moneta starts while they are down.
    pub async fn build(settings: Settings) -> Result<Self, StartupError> {
        let metrics = telemetry::metrics::install();
        let jwt = &settings.jwt;
        let keys = KeyStore::load(key_sources(jwt).await?).await?;
        let verifier = Verifier::new(keys, jwt.issuer.as_deref(), jwt.audience.as_deref());
        let snapshot = match &settings.catalog.fallback_file {
            Some(path) => Snapshot::load(path)?,
            None => Snapshot::empty(),
        };
        let cdn = &settings.cdn;
        let signer = match (&cdn.key_pair_id, &cdn.private_key_file) {
            (Some(id), Some(path)) => Some(CloudFrontSigner::from_pem_file(id, path, cdn.url_ttl)?),
            _ => None,
        };
        let redis = RedisStore::new(&settings.redis)?;
        let internal_api = InternalApi::new(&settings.internal_api).map_err(StartupError::InternalApi)?;
        let unlogged = ProgressQueue::new(settings.progress.queue_capacity);
        let playback = Arc::new(Playback::new(
            Titles::new(redis.clone(), internal_api.clone(), snapshot, &settings.catalog),
            UserStates::new(
                redis.clone(),
                internal_api.clone(),
                settings.catalog.entitlement_ttl,
            ),
            Answers::new(
                Cdn::new(&cdn.base_url, signer),
                settings.drm.clone(),
                settings.resume,
            ),
        ));
        let s = &settings.sessions;
        let sessions = Sessions::new(
            playback.clone(),
            redis.sessions(s.ttl),
            SessionKey::new(s.secret.as_ref())?,
            unlogged.clone(),
            s.ttl,
            s.limit_policy == StreamLimitPolicy::EvictOldest,
        );
        let consumer = format!("moneta-{}", uuid::Uuid::new_v4().simple());
        let courier = Courier {
            api: internal_api.clone(),
            log: redis.progress_log_as(consumer),
            unlogged: unlogged.clone(),
            interval: settings.progress.flush_interval,
            batch_size: settings.progress.batch_size,
        };
        let public = bind(settings.server.listen_addr, "MONETA_LISTEN_ADDR").await?;
        let admin = bind(settings.server.admin_addr, "MONETA_ADMIN_ADDR").await?;
        let app = Arc::new(App::new(
            verifier,
            playback,
            sessions,
            unlogged,
            (redis.guard().clone(), internal_api.guard().clone()),
            s.heartbeat_interval,
            settings.cdn.cookie_domain.clone(),
        ));
        spawn_probes(redis, internal_api, app.clone());
        Ok(Self {
            app,
            settings,
            public,
            admin,
            metrics,
            courier,
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

    /// Serves until `shutdown` resolves. Then: readiness answers `503` at
    /// once while the public API keeps serving for the drain time (load
    /// balancers stop routing here), the listener closes, in-flight requests
    /// finish, and positions held in memory are delivered before returning.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let Self {
            app,
            settings,
            public,
            admin,
            metrics,
            courier,
        } = self;
        let stop = Arc::new(Notify::new());
        let courier = tokio::spawn(courier.run(stop.clone(), settings.server.shutdown_grace));
        let background = [
            tokio::spawn(refresh_keys(app.clone(), settings.jwt.refresh)),
            tokio::spawn(telemetry::metrics::upkeep(metrics.clone())),
        ];

        let admin_stop = stop.clone();
        let admin_task = tokio::spawn(async move {
            axum::serve(admin, crate::http::admin::router(metrics))
                .with_graceful_shutdown(async move { admin_stop.notified().await })
                .await
        });

        let router = crate::http::router(app.clone(), &settings.server);
        app.set_phase(Phase::Serving);
        tracing::info!(port = public.local_addr()?.port(), "moneta serving");
        let drain = settings.server.shutdown_drain;
        let phase_app = app.clone();
        axum::serve(public, router)
            .with_graceful_shutdown(async move {
                shutdown.await;
                phase_app.set_phase(Phase::Draining);
                tracing::info!(drain_ms = drain.as_millis() as u64, "shutting down: draining");
                tokio::time::sleep(drain).await;
                tracing::info!("shutting down: no new connections, finishing in-flight requests");
            })
            .await?;

        // notify_waiters reaches the admin server; notify_one stores a permit for
        // the courier in case it is not waiting at this instant.
        stop.notify_waiters();
        stop.notify_one();
        for task in background {
            task.abort();
        }
        let _ = courier.await;
        let _ = admin_task.await;
        tracing::info!("moneta stopped");
        Ok(())
    }
}

/// Keeps breakers and readiness current without traffic; stops with the App.
fn spawn_probes(redis: RedisStore, api: InternalApi, app: Arc<App>) {
    let app = Arc::downgrade(&app);
    let serving = app.clone();
    if let Some(keeper) = redis.client_cache_keeper(move || serving.strong_count() > 0) {
        tokio::spawn(keeper);
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(PROBE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if app.upgrade().is_none() {
                break;
            }
            let _ = tokio::join!(redis.ping(), api.probe());
        }
    });
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

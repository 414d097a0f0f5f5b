//! Builds the application from settings, binds its listeners, runs it and
//! shuts it down in order: drain, close, finish in flight, deliver, exit.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use crate::http::unread_body::AnswerThenDrain;
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::futures::OwnedNotified;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, oneshot, watch};
use tokio::time::Instant;

use crate::app::{App, Phase};
use crate::auth::keys::{JwksFile, KeyError, StaticSecret};
use crate::auth::secrets_manager::SecretsManagerJwks;
use crate::auth::{KeySource, KeyStore, Verifier};
use crate::config::{JwtSettings, Settings, StreamLimitPolicy};
use crate::http::pacing::{self, ReadPace};
use crate::licenses::Licenses;
use crate::playback::cdn::{Cdn, CdnKeyError, CloudFrontSigner};
use crate::playback::{Answers, Playback, Titles, UserStates};
use crate::progress::{Courier, ProgressQueue};
use crate::sessions::{SessionKey, SessionKeyError, Sessions};
use crate::sources::drm::load_clearkey_keys;
use crate::sources::internal_api::InternalApi;
use crate::sources::redis::RedisStore;
use crate::sources::snapshot::{Snapshot, SnapshotError};
use crate::telemetry;

/// How often dependencies are probed in the background, so readiness and the
/// breakers learn of recovery even without traffic.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// A client that starts a request must finish its headers within this
/// (CONTRACT §6 Shutdown), so a slowloris cannot hold connections, nor hold
/// up a shutdown while the connection waits for the rest of a head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// An idle keep-alive connection is closed after this. It must outlast the
/// edge's upstream `keepalive_timeout` (60 s, nginx/templates/), or nginx
/// could send a request on a connection Moneta is closing.
const KEEP_ALIVE_IDLE: Duration = Duration::from_secs(75);

/// What admin connections (scrapes, probes) get once the public side is done.
const ADMIN_CONNECTION_GRACE: Duration = Duration::from_secs(1);

/// Admin connections open at once: scrapes and probes need a handful.
const ADMIN_MAX_CONNECTIONS: usize = 64;

/// The most a connection buffers of an unparsed request head. hyper's
/// default (~400 KiB) would let 4096 connections sending big heads hold
/// over 1.5 GiB; this still takes a head with an 8 KiB token and more (the
/// edge passes at most 16 KiB per header line), and a larger one is refused
/// with 431. Buffers start at hyper's 8 KiB and grow only when a read fills
/// them.
const MAX_HEAD_BUFFER: usize = 32 * 1024;

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
    /// The licence proxy's keys file or vendor settings; names the setting.
    #[error("{0}")]
    Licenses(String),
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

/// The licence proxy, when `MONETA_DRM_PROXY` turns it on.
fn licenses(
    settings: &Settings,
    redis: &RedisStore,
    session_key: &SessionKey,
) -> Result<Option<Licenses>, StartupError> {
    let (Some(proxy), Some(secret)) = (&settings.drm.proxy, &settings.drm.token_secret) else {
        return Ok(None);
    };
    let clear_keys = match &proxy.clearkey_keys_file {
        Some(path) => Some(load_clearkey_keys(path).map_err(StartupError::Licenses)?),
        None => None,
    };
    let licenses = Licenses::from_settings(
        secret,
        settings.drm.token_ttl,
        proxy,
        redis.sessions(settings.sessions.ttl),
        session_key.clone(),
        clear_keys,
    )
    .map_err(StartupError::Licenses)?;
    Ok(Some(licenses))
}

/// Connections the kernel completes and holds for `accept` (capped by
/// `net.core.somaxconn`, 4096 on current kernels); tokio's `bind` asks for
/// 1024. When the queue is full the kernel drops the handshake's last ACK:
/// the client believes it is connected and sends its request, which then
/// waits for TCP retransmissions (200 ms and more) before it is even read.
/// The overload benchmark's 4096 reconnecting clients overflowed 1024 on a
/// busy machine (`ListenOverflows` in `nstat`), never 4096. Go's listeners
/// ask for somaxconn too.
const LISTEN_BACKLOG: u32 = 8192;

async fn bind(addr: SocketAddr, setting: &'static str) -> Result<TcpListener, StartupError> {
    let listen = || {
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        // As `TcpListener::bind` does: a restarted instance takes its port
        // back while the old connections linger in TIME_WAIT.
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    listen().map_err(|source| StartupError::Listen {
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
    terminated: Pin<Box<dyn Future<Output = ()> + Send>>,
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
        let unlogged = ProgressQueue::new(settings.progress.queue_capacity, redis.clock_handle());
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
            )
            .on_clock(redis.clock_handle()),
        ));
        let s = &settings.sessions;
        let session_key = SessionKey::new(s.secret.as_ref())?;
        let licenses = licenses(&settings, &redis, &session_key)?;
        let sessions = Sessions::new(
            playback.clone(),
            redis.sessions(s.ttl),
            session_key,
            unlogged.clone(),
            s.ttl,
            s.limit_policy == StreamLimitPolicy::EvictOldest,
        );
        let consumer = format!("moneta-{}", uuid::Uuid::new_v4().simple());
        let courier = Courier {
            items_taken: Default::default(),
            api: internal_api.clone(),
            log: redis.progress_log_as(consumer),
            unlogged: unlogged.clone(),
            interval: settings.progress.flush_interval,
            batch_size: settings.progress.batch_size,
            max_attempts: settings.progress.max_attempts,
        };
        // Handled before the ports open: a SIGTERM may follow the first
        // connection at once, and must start the shutdown, not kill.
        let terminated = terminated();
        let public = bind(settings.server.listen_addr, "MONETA_LISTEN_ADDR").await?;
        let admin = bind(settings.server.admin_addr, "MONETA_ADMIN_ADDR").await?;
        let app = Arc::new(
            App::new(
                verifier,
                playback,
                sessions,
                unlogged,
                (redis.guard().clone(), internal_api.guard().clone()),
                s.heartbeat_interval,
                settings.cdn.cookie_domain.clone(),
            )
            .with_licenses(licenses),
        );
        spawn_probes(redis, internal_api, app.clone());
        Ok(Self {
            app,
            settings,
            public,
            admin,
            metrics,
            courier,
            terminated,
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

    /// Serves until `shutdown` resolves or the process gets SIGTERM. Then:
    /// readiness answers `503` at once while the public API keeps serving for
    /// the drain time (load balancers stop routing here), the listener
    /// closes, in-flight requests finish, and positions held in memory are
    /// delivered before returning.
    ///
    /// Everything after the drain shares `MONETA_SHUTDOWN_GRACE_MS`, whatever
    /// clients do: connections get part of it and are dropped when it is
    /// over (a client stalled in its headers or body must not keep the
    /// process alive), the courier gets the rest.
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
            terminated,
        } = self;
        let grace = settings.server.shutdown_grace;
        let (stop, stopped) = oneshot::channel();
        let unlogged = courier.unlogged.clone();
        let mut courier = tokio::spawn(courier.run(stopped));
        let background = [
            tokio::spawn(refresh_keys(app.clone(), settings.jwt.refresh)),
            tokio::spawn(end_held_stops(app.clone())),
            tokio::spawn(telemetry::metrics::upkeep(metrics.clone())),
        ];

        let (admin_stop, admin_stopped) = oneshot::channel::<()>();
        let admin_task = tokio::spawn(serve(
            admin,
            crate::http::admin::router(metrics),
            async move {
                // A dropped sender means stop as well.
                let _ = admin_stopped.await;
            },
            ADMIN_CONNECTION_GRACE,
            ConnectionLimit::new(ADMIN_MAX_CONNECTIONS, None),
        ));

        let router = crate::http::router(app.clone(), &settings.server);
        app.set_phase(Phase::Serving);
        tracing::info!(port = public.local_addr()?.port(), "moneta serving");
        let drain = settings.server.shutdown_drain;
        let phase_app = app.clone();
        // A running request ends within the request timeout, which covers
        // reading its body: at any time, a body stalled half-way is answered
        // 503 then and hyper closes the connection, its body unread to the
        // end. A separate body timeout would second-guess
        // MONETA_REQUEST_TIMEOUT_MS, the documented whole-request bound.
        // The courier needs a fair part of the grace too.
        let connection_grace = (settings.server.request_timeout + Duration::from_secs(1)).min(grace * 2 / 3);
        let max_connections = settings.server.max_connections;
        let closed_at = serve(
            public,
            router,
            async move {
                tokio::select! {
                    () = shutdown => {}
                    () = terminated => {}
                }
                phase_app.set_phase(Phase::Draining);
                tracing::info!(drain_ms = drain.as_millis() as u64, "shutting down: draining");
                tokio::time::sleep(drain).await;
                tracing::info!("shutting down: no new connections, finishing in-flight requests");
            },
            connection_grace,
            ConnectionLimit::new(max_connections, Some(metrics::gauge!("moneta_http_connections"))),
        )
        .await;

        // Its last tick ends before the grace does, so it is not cut off mid-way.
        let _ = stop.send(closed_at + grace.saturating_sub(COURIER_LAST_TICK));
        let _ = admin_stop.send(());
        for task in background {
            task.abort();
        }
        if tokio::time::timeout_at(closed_at + grace, &mut courier)
            .await
            .is_err()
        {
            courier.abort();
            tracing::error!(
                positions = unlogged.len(),
                "shutting down before positions held in memory could be delivered"
            );
        }
        let _ = admin_task.await;
        tracing::info!("moneta stopped");
        Ok(())
    }
}

/// Room left at the end of the shutdown grace for the courier's last tick.
const COURIER_LAST_TICK: Duration = Duration::from_millis(1_000);

/// How many connections a listener holds open at once.
struct ConnectionLimit {
    permits: Arc<Semaphore>,
    open: Option<metrics::Gauge>,
    /// Notified when a connection waits for a place: idle keep-alive
    /// connections then close and make room (see [`HeadSleep`]).
    full: Arc<Notify>,
}

impl ConnectionLimit {
    fn new(max: usize, open: Option<metrics::Gauge>) -> Self {
        if let Some(gauge) = &open {
            gauge.set(0.0);
        }
        Self {
            permits: Arc::new(Semaphore::new(max.clamp(1, Semaphore::MAX_PERMITS))),
            open,
            full: Arc::new(Notify::new()),
        }
    }
}

/// One open connection's share of the limit, given back when it closes.
struct OpenConnection {
    _permit: OwnedSemaphorePermit,
    open: Option<metrics::Gauge>,
}

impl OpenConnection {
    fn new(permit: OwnedSemaphorePermit, open: &Option<metrics::Gauge>) -> Self {
        if let Some(gauge) = open {
            gauge.increment(1.0);
        }
        Self {
            _permit: permit,
            open: open.clone(),
        }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        if let Some(gauge) = &self.open {
            gauge.decrement(1.0);
        }
    }
}

/// Serves `router` on `listener` until `stop_accepting` resolves, then
/// closes the listener and shuts open connections down gracefully: each
/// finishes the request it is serving, idle ones close at once. Connections
/// still open `connection_grace` later are dropped. Returns when the
/// listener closed.
///
/// At most `limit` connections are open at once. At the limit nothing is
/// accepted: new connections wait in the kernel's listen backlog (beyond
/// it, clients retry their SYN) until one closes. That costs nothing here
/// and a client merely waits; accepting and closing at once would cost a
/// handshake and a task each and invite an immediate reconnect, a loop
/// that burns the CPU the open connections need.
async fn serve(
    listener: TcpListener,
    router: Router,
    stop_accepting: impl Future<Output = ()>,
    connection_grace: Duration,
    limit: ConnectionLimit,
) -> Instant {
    let graceful = GracefulShutdown::new();
    // Connection tasks end when this sender goes away.
    let (abandon, abandoned) = watch::channel(());
    let mut stop_accepting = pin!(stop_accepting);
    loop {
        let permit = match limit.permits.clone().try_acquire_owned() {
            Ok(permit) => Ok(permit),
            Err(_) => {
                // Full: the idle keep-alive connections close (players keep
                // one open between heartbeats), as nginx reuses its idle
                // ones when its connections run out; a client that sends
                // nothing must not hold a place a new one is waiting for.
                limit.full.notify_waiters();
                tokio::select! {
                    () = &mut stop_accepting => break,
                    permit = limit.permits.clone().acquire_owned() => permit,
                }
            }
        };
        // The semaphore is never closed.
        let Ok(permit) = permit else { break };
        let accepted = tokio::select! {
            () = &mut stop_accepting => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => spawn_connection(
                stream,
                router.clone(),
                graceful.watcher(),
                abandoned.clone(),
                OpenConnection::new(permit, &limit.open),
                limit.full.clone(),
            ),
            Err(e) if is_connection_error(&e) => {}
            Err(e) => {
                // Out of file descriptors and the like: closing connections
                // free some, so wait instead of spinning on the error.
                tracing::error!(error = %e, "accept failed");
                tokio::select! {
                    () = &mut stop_accepting => break,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
    let closed_at = Instant::now();
    drop(listener);
    let open = graceful.count();
    if tokio::time::timeout(connection_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            connections = open,
            grace_ms = connection_grace.as_millis() as u64,
            "connections still open after the shutdown grace are dropped"
        );
    }
    drop(abandon);
    closed_at
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

fn spawn_connection(
    stream: TcpStream,
    router: Router,
    watcher: Watcher,
    mut abandoned: watch::Receiver<()>,
    open: OpenConnection,
    full: Arc<Notify>,
) {
    let reads = Arc::new(AtomicU64::new(0));
    let io = TokioIo::new(CountedReads {
        stream,
        reads: reads.clone(),
        pace: ReadPace::default(),
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(HeadTimer {
            reads,
            first_head: AtomicBool::new(true),
            full,
        })
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEAD_BUFFER);
    let connection = pacing::serve(watcher.watch(builder.serve_connection(io, AnswerThenDrain::new(router))));
    tokio::spawn(async move {
        let _open = open;
        tokio::select! {
            result = connection => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection closed with an error");
                }
            }
            _ = abandoned.changed() => {}
        }
    });
}

/// The only timer hyper's HTTP/1 server asks for is the header read timeout,
/// which it arms whenever it waits for a request head: on a fresh connection
/// and after every response. Armed as is, it would also close idle
/// keep-alive connections after 10 s. So on a connection that has served a
/// request the clock starts with the first byte of the next head, and an
/// idle one is closed after `KEEP_ALIVE_IDLE`. (A head whose first bytes
/// came in one read with the previous request is only bounded by the idle
/// limit, and at shutdown by the connection grace.)
struct HeadTimer {
    reads: Arc<AtomicU64>,
    first_head: AtomicBool,
    /// The connection limit was reached: an idle connection closes at once.
    full: Arc<Notify>,
}

impl hyper::rt::Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(std::time::Instant::now() + duration)
    }

    fn sleep_until(&self, deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        let (clock, full) = if self.first_head.swap(false, Ordering::Relaxed) {
            (HeadClock::Fresh, None)
        } else {
            let idle = HeadClock::Idle {
                reads_before: self.reads.load(Ordering::Relaxed),
            };
            (idle, Some(Box::pin(self.full.clone().notified_owned())))
        };
        Box::pin(HeadSleep {
            reads: self.reads.clone(),
            clock,
            armed_at: Instant::now(),
            timeout: deadline.saturating_duration_since(std::time::Instant::now()),
            sleep: None,
            full,
        })
    }
}

enum HeadClock {
    /// A new connection owes its first head from the start.
    Fresh,
    /// Between requests, until a byte of the next head comes.
    Idle { reads_before: u64 },
    /// The next head has started.
    Started { at: Instant },
}

struct HeadSleep {
    reads: Arc<AtomicU64>,
    clock: HeadClock,
    armed_at: Instant,
    timeout: Duration,
    // Made on the first poll: most heads arrive whole and never need it.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Between requests: the connection limit was reached.
    full: Option<Pin<Box<OwnedNotified>>>,
}

impl Future for HeadSleep {
    type Output = ();

    // hyper polls this each time a read leaves the head unfinished, so the
    // first byte is noticed when it arrives.
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        if let HeadClock::Idle { reads_before } = this.clock
            && this.reads.load(Ordering::Relaxed) != reads_before
        {
            this.clock = HeadClock::Started { at: Instant::now() };
        }
        if let (HeadClock::Idle { .. }, Some(full)) = (&this.clock, this.full.as_mut())
            && full.as_mut().poll(cx).is_ready()
        {
            // hyper closes a connection whose next head did not start.
            return Poll::Ready(());
        }
        let deadline = match this.clock {
            HeadClock::Fresh => this.armed_at + this.timeout,
            HeadClock::Idle { .. } => this.armed_at + KEEP_ALIVE_IDLE,
            HeadClock::Started { at } => at + this.timeout,
        };
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.deadline() != deadline {
            sleep.as_mut().reset(deadline);
        }
        sleep.as_mut().poll(cx)
    }
}

impl hyper::rt::Sleep for HeadSleep {}

/// The connection's socket, counting the bytes read from it for `HeadTimer`,
/// read at the pace of `http/pacing.rs`.
struct CountedReads {
    stream: TcpStream,
    reads: Arc<AtomicU64>,
    pace: ReadPace,
}

impl AsyncRead for CountedReads {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.pace.poll_ready(cx, &this.stream))?;
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        let read = buf.filled().len().saturating_sub(before);
        if read > 0 {
            self.reads.fetch_add(read as u64, Ordering::Relaxed);
        }
        polled
    }
}

impl AsyncWrite for CountedReads {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Keeps breakers and readiness current without traffic; stops with the App.
fn spawn_probes(redis: RedisStore, api: InternalApi, app: Arc<App>) {
    let app = Arc::downgrade(&app);
    let serving = app.clone();
    if let Some(keeper) = redis.client_cache_keeper(move || serving.strong_count() > 0) {
        tokio::spawn(keeper);
    }
    let watching = app.clone();
    tokio::spawn(redis.outage_watch(move || watching.strong_count() > 0));
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

/// How often stops held while Redis was unreachable are tried there.
const HELD_STOPS_EVERY: Duration = Duration::from_secs(1);

async fn end_held_stops(app: Arc<App>) {
    let mut tick = tokio::time::interval(HELD_STOPS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        app.sessions.end_held_stops().await;
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

/// Resolves on SIGTERM or Ctrl-C. The handlers are installed by this call,
/// not when the future is first polled: a SIGTERM that comes as soon as the
/// process serves must start the shutdown, not kill the process.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate());
        let interrupt = signal(SignalKind::interrupt());
        async move {
            tokio::select! {
                () = received(term) => {},
                () = received(interrupt) => {},
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Resolves on SIGTERM; the handler is installed by this call.
fn terminated() -> Pin<Box<dyn Future<Output = ()> + Send>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        Box::pin(received(signal(SignalKind::terminate())))
    }
    #[cfg(not(unix))]
    {
        Box::pin(std::future::pending())
    }
}

#[cfg(unix)]
async fn received(signal: io::Result<tokio::signal::unix::Signal>) {
    match signal {
        Ok(mut signal) => {
            signal.recv().await;
        }
        // Without a handler this signal keeps its default action.
        Err(_) => std::future::pending::<()>().await,
    }
}

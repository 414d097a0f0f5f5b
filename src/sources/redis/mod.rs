//! Redis: the first source for everything, the home of sessions, and the
//! durable log of positions on their way to the internal API. Every Redis
//! command Moneta sends is in this folder; callers see typed operations.

mod catalog;
mod client_cache;
mod clock;
mod grouped;
pub mod keys;
mod outages;
mod progress;
mod sessions;

pub use catalog::{CachedContent, CheckedPosition, LearntPosition, UserView, WriteBack};
pub use clock::{RedisClock, Stamp};
pub use progress::{
    DeadLetter, Delivery, EntryId, LeftOut, PROGRESS_GROUP, ParkedField, ProgressLog, Settlement,
};
pub use sessions::{
    EndOutcome, LiveList, SessionState, SessionStore, StartOutcome, StartRequest, TouchOutcome, Untraced,
};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, ProtocolVersion, RedisFuture, RedisResult, Value};
use tracing::field::Empty;

use self::client_cache::ClientCache;
use self::keys::{Buckets, UserKeys};
use crate::config::RedisSettings;
use crate::resilience::{DependencyError, Guard, Verdict};
use crate::telemetry::traces;

/// How long resume positions live in Redis; the internal API keeps them for good.
const POSITION_TTL_S: i64 = 30 * 24 * 3600;

/// One connection object for both deployment shapes.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    /// With the slot of the keys the call is for, if it has one: where a
    /// script it needs is loaded (see [`Conn::aim`]).
    Cluster(ClusterConnection, Option<u16>),
}

/// `cmd` on the primary serving `slot`.
async fn on_primary_of(conn: &mut ClusterConnection, cmd: Cmd, slot: u16) -> RedisResult<Value> {
    use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
    let route = SingleNodeRoutingInfo::SpecificNode(Route::new(slot, SlotAddr::Master));
    conn.route_command(cmd, RoutingInfo::SingleNode(route)).await
}

/// Whether `cmd` is `SCRIPT LOAD`.
fn is_script_load(cmd: &Cmd) -> bool {
    let mut args = cmd.args_iter();
    let is = |arg: Option<redis::Arg<&[u8]>>, word: &[u8]| matches!(arg, Some(redis::Arg::Simple(name)) if name.eq_ignore_ascii_case(word));
    is(args.next(), b"SCRIPT") && is(args.next(), b"LOAD")
}

impl Conn {
    /// A call for the keys `on` names: in a cluster, a script it finds
    /// missing (`NOSCRIPT`: a node restarted or promoted) is loaded on the
    /// primary serving them alone. `SCRIPT LOAD` otherwise goes to every
    /// primary, and one that hangs failed the calls of users whose primary
    /// answered.
    fn aim(&mut self, on: On<'_>) {
        if let Conn::Cluster(_, slot) = self {
            *slot = on.slot();
        }
    }

    /// Redis' `TIME`; in a cluster on the primary serving `bucket`, as a
    /// script on one of its keys. Left to the cluster client, a keyless
    /// command goes to any node, also one that hangs. And a cluster that
    /// stopped serving keys (`CLUSTERDOWN`: a primary failed with no replica
    /// to promote) still answers a keyless `TIME`: the courier, asking
    /// whether Redis answers again, kept the breaker closed with it while
    /// every keyed call waited out its timeout.
    async fn time(&mut self, bucket: keys::Bucket) -> RedisResult<(i64, i64)> {
        match self {
            Conn::Single(c) => redis::cmd("TIME").query_async(c).await,
            Conn::Cluster(c, _) => {
                let mut time = redis::cmd("EVAL");
                time.arg("return redis.call('TIME')").arg(1).arg(bucket.clock());
                time.query_async(c).await
            }
        }
    }

    /// `pipe` on the node serving `key`'s slot. The cluster client routes a
    /// pipeline by what it takes for keys, and takes the `YES` of
    /// `CLIENT CACHING YES` for one (of another slot).
    async fn pipeline_on(&mut self, pipe: Pipeline, key: &str) -> RedisResult<Vec<Value>> {
        match self {
            Conn::Single(_) => pipe.query_async(self).await,
            Conn::Cluster(c, _) => {
                use redis::cluster_routing::{Route, SingleNodeRoutingInfo, Slot, SlotAddr};
                let route = Route::with_slot(Slot::for_key(key), SlotAddr::Master);
                let span = batch_span(&pipe, c.get_db());
                let count = pipe.len();
                let call = c.route_pipeline(pipe, 0, count, SingleNodeRoutingInfo::SpecificNode(route));
                match span.is_none() {
                    true => call.await,
                    false => traces::traced(span, call, redis_error_type).await,
                }
            }
        }
    }
}

/// The command name only: keys and values may be user ids or positions.
fn command_name(cmd: &Cmd) -> String {
    match cmd.args_iter().next() {
        Some(redis::Arg::Simple(name))
            if !name.is_empty() && name.len() <= 32 && name.iter().all(u8::is_ascii_alphabetic) =>
        {
            String::from_utf8_lossy(name).to_ascii_uppercase()
        }
        _ => "UNKNOWN".to_owned(),
    }
}

/// A client span for one round trip, following the OpenTelemetry database
/// conventions.
fn command_span(operation: &str, summary: &str, batch_size: Option<usize>, db: i64) -> tracing::Span {
    tracing::info_span!(
        target: "moneta::sources::redis",
        "redis",
        otel.name = %summary,
        otel.kind = "client",
        otel.status_code = Empty,
        db.system.name = "redis",
        db.operation.name = %operation,
        db.query.summary = %summary,
        db.operation.batch.size = batch_size,
        db.namespace = %db,
        error.type = Empty,
    )
}

/// A pipeline's client span, or none when client spans are off.
fn batch_span(pipeline: &Pipeline, db: i64) -> tracing::Span {
    if !traces::client_spans() {
        return tracing::Span::none();
    }
    let names: Vec<String> = pipeline.cmd_iter().map(command_name).collect();
    // The conventions name a mixed batch `BATCH`; the summary lists its commands.
    let operation = match names.first() {
        Some(first) if names.iter().all(|n| n == first) => format!("BATCH {first}"),
        _ => "BATCH".to_owned(),
    };
    command_span(&operation, &names.join(" "), Some(names.len()), db)
}

/// Server error codes (`NOSCRIPT`, `WRONGTYPE`…) or the kind of failure.
fn redis_error_type(e: &redis::RedisError) -> String {
    match e.code() {
        Some(code) => code.to_owned(),
        None if e.is_timeout() => "timeout".to_owned(),
        None if e.is_io_error() => "io".to_owned(),
        None => "error".to_owned(),
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        let span = if traces::client_spans() {
            let name = command_name(cmd);
            command_span(&name, &name, None, self.get_db())
        } else {
            tracing::Span::none()
        };
        let call = match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c, slot) => match slot {
                Some(slot) if is_script_load(cmd) => Box::pin(on_primary_of(c, cmd.clone(), *slot)),
                _ => c.req_packed_command(cmd),
            },
        };
        if span.is_none() {
            return call;
        }
        Box::pin(traces::traced(span, call, redis_error_type))
    }
    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        let span = batch_span(pipeline, self.get_db());
        let call = match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c, _) => c.req_packed_commands(pipeline, offset, count),
        };
        if span.is_none() {
            return call;
        }
        Box::pin(traces::traced(span, call, redis_error_type))
    }
    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c, _) => c.get_db(),
        }
    }
}

enum Connector {
    Single(Arc<SingleLink>),
    /// Cluster connections discover the topology when they connect, so the
    /// first successful call establishes it (Redis may be down at start).
    Cluster(Arc<ClusterLink>),
}

/// Calls fail this long after a connection was made before it is made again.
const REMAKE_AFTER: Duration = Duration::from_secs(2);

/// When a link's connection was last made, so that calls failing as an
/// outage make a new one at most every [`REMAKE_AFTER`].
struct Remakes {
    /// Milliseconds after `born` of the last time one was made (0: never).
    made_ms: AtomicU64,
    born: std::time::Instant,
}

impl Remakes {
    fn new() -> Self {
        Self {
            made_ms: AtomicU64::new(0),
            born: std::time::Instant::now(),
        }
    }

    fn since_born_ms(&self) -> u64 {
        self.born.elapsed().as_millis() as u64 + 1
    }

    fn made_now(&self) {
        self.made_ms.store(self.since_born_ms(), Ordering::Relaxed);
    }

    /// True for the one caller that makes the connection again, now.
    fn claim(&self) -> bool {
        let now = self.since_born_ms();
        let made = self.made_ms.load(Ordering::Relaxed);
        now.saturating_sub(made) >= REMAKE_AFTER.as_millis() as u64
            && self
                .made_ms
                .compare_exchange(made, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

/// The single-node connection, made again while calls keep failing as an
/// outage. redis-rs makes a `ConnectionManager`'s connection again only once
/// it is known to be dropped (a reset, an end of stream). One that went
/// silent (a host that died without a reset, a partition, a NAT that forgot
/// it) only times out, every call queued on it too, for as long as the
/// kernel keeps the socket: the instance stayed degraded, with the stream
/// limit open, against a Redis that answered every new connection. A new
/// manager opens a new connection; the old one closes with its last clone.
pub(crate) struct SingleLink {
    client: redis::Client,
    config: ConnectionManagerConfig,
    current: arc_swap::ArcSwap<ConnectionManager>,
    remakes: Remakes,
    cache: Option<Arc<ClientCache>>,
}

/// A connection was replaced by a new one. The old one closes with its last
/// user and says nothing, so what was read through it, which only it would
/// have heard invalidated, goes now (after the swap: a read that begins later
/// is made on the new connection).
fn replaced(cache: Option<&ClientCache>) {
    if let Some(cache) = cache {
        cache.distrust();
        cache.forget_all();
    }
}

impl SingleLink {
    fn new(
        client: redis::Client,
        config: ConnectionManagerConfig,
        cache: Option<Arc<ClientCache>>,
    ) -> RedisResult<Self> {
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())?;
        let remakes = Remakes::new();
        remakes.made_now();
        Ok(Self {
            client,
            config,
            current: arc_swap::ArcSwap::from_pointee(manager),
            remakes,
            cache,
        })
    }

    fn conn(&self) -> ConnectionManager {
        (**self.current.load()).clone()
    }

    /// A call failed as Redis being unreachable: unless a connection was
    /// made within [`REMAKE_AFTER`], the next calls go on a new one.
    fn suspect(&self) {
        if !self.remakes.claim() {
            return;
        }
        match ConnectionManager::new_lazy_with_config(self.client.clone(), self.config.clone()) {
            Ok(manager) => {
                self.current.store(Arc::new(manager));
                replaced(self.cache.as_deref());
            }
            Err(e) => tracing::warn!(error = %e, "could not connect to Redis again"),
        }
    }
}

/// Builds a cluster client on these node URLs, with a link's settings.
type BuildCluster = Box<dyn Fn(Vec<String>) -> RedisResult<ClusterClient> + Send + Sync>;

/// Nodes of the topology kept to connect through, at most.
const LEARNED_NODES: usize = 64;

/// The cluster connection, made again while calls keep failing. redis-rs 1.8
/// refreshes its slot map on `MOVED` or when a slot has no connection; after
/// a primary was SIGKILLed and its replica promoted, calls to those slots
/// went on timing out against the dead address for minutes
/// (tests/failover.rs). A new connection asks for the topology afresh: from
/// the seed nodes and from every node of the topology last seen, since the
/// seeds may be the very nodes that died (one seed listed, or every listed
/// node replaced over time).
pub(crate) struct ClusterLink {
    build: BuildCluster,
    seeds: Vec<String>,
    /// The nodes of the topology as last seen, as URLs of the first seed's
    /// shape (scheme, credentials, parameters).
    learned: std::sync::Mutex<Vec<String>>,
    current: arc_swap::ArcSwapOption<ClusterConnection>,
    /// One connection is made at a time.
    making: tokio::sync::Mutex<()>,
    remakes: Remakes,
    cache: Option<Arc<ClientCache>>,
}

impl ClusterLink {
    fn new(seeds: Vec<String>, build: BuildCluster, cache: Option<Arc<ClientCache>>) -> Self {
        Self {
            cache,
            build,
            seeds,
            learned: std::sync::Mutex::new(Vec::new()),
            current: arc_swap::ArcSwapOption::empty(),
            making: tokio::sync::Mutex::new(()),
            remakes: Remakes::new(),
        }
    }

    /// The seeds, then the nodes last seen that are not seeds.
    fn nodes(&self) -> Vec<String> {
        let learned = self.learned.lock().unwrap_or_else(PoisonError::into_inner);
        let mut nodes = self.seeds.clone();
        nodes.extend(learned.iter().filter(|n| !self.seeds.contains(n)).cloned());
        nodes
    }

    /// Keeps the nodes of the topology `conn` sees (`CLUSTER NODES`).
    async fn learn(&self, conn: &mut ClusterConnection) {
        use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
        let (Some(seed), Ok(reply)) = (
            self.seeds.first(),
            conn.route_command(
                redis::cmd("CLUSTER").arg("NODES").clone(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
            )
            .await,
        ) else {
            return;
        };
        let Ok(text) = redis::from_redis_value::<String>(reply) else {
            return;
        };
        let nodes: Vec<String> = text
            .lines()
            .filter_map(|line| node_url(seed, line))
            .take(LEARNED_NODES)
            .collect();
        if !nodes.is_empty() {
            *self.learned.lock().unwrap_or_else(PoisonError::into_inner) = nodes;
        }
    }

    /// The connection, when one is made.
    fn made(&self) -> Option<ClusterConnection> {
        self.current.load().as_deref().cloned()
    }

    async fn conn(&self) -> RedisResult<ClusterConnection> {
        if let Some(conn) = self.made() {
            return Ok(conn);
        }
        let _making = self.making.lock().await;
        if let Some(conn) = self.made() {
            return Ok(conn);
        }
        self.make().await
    }

    async fn make(&self) -> RedisResult<ClusterConnection> {
        let mut conn = (self.build)(self.nodes())?.get_async_connection().await?;
        self.learn(&mut conn).await;
        self.current.store(Some(Arc::new(conn.clone())));
        replaced(self.cache.as_deref());
        self.remakes.made_now();
        Ok(conn)
    }

    /// Makes the connection again now, after the one being made, within
    /// `patience`.
    async fn remake(&self, patience: Duration) {
        let remade = tokio::time::timeout(patience, async {
            let _making = self.making.lock().await;
            self.make().await
        });
        match remade.await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "could not reconnect to the Redis Cluster"),
            Err(_) => tracing::warn!("could not reconnect to the Redis Cluster in time"),
        }
    }

    /// A call failed as Redis being unreachable: unless a connection was
    /// made within [`REMAKE_AFTER`], make one in the background (calls go
    /// on with the current one meanwhile).
    fn suspect(self: &Arc<Self>) {
        if !self.remakes.claim() {
            return;
        }
        let link = self.clone();
        tokio::spawn(async move {
            let Ok(_making) = link.making.try_lock() else {
                return;
            };
            if let Err(e) = link.make().await {
                tracing::warn!(error = %e, "could not reconnect to the Redis Cluster");
            }
        });
    }
}

/// The URL, of `seed`'s shape, of a node as `CLUSTER NODES` lists it
/// (`<id> <ip>:<port>@<bus port>[,<hostname>] <flags> …`); `None` for one
/// without an address or known to have failed.
fn node_url(seed: &str, line: &str) -> Option<String> {
    let mut fields = line.split_whitespace();
    let address = fields.nth(1)?;
    let flags = fields.next()?;
    if flags
        .split(',')
        .any(|flag| matches!(flag, "noaddr" | "fail" | "handshake"))
    {
        return None;
    }
    let endpoint = address.split(['@', ',']).next()?;
    let (host, port) = endpoint.rsplit_once(':')?;
    url_at(seed, host, port.parse::<u16>().ok()?)
}

/// The URL of the node at `host`:`port`, of `seed`'s shape (scheme,
/// credentials, parameters).
fn url_at(seed: &str, host: &str, port: u16) -> Option<String> {
    if host.is_empty() || port == 0 {
        return None;
    }
    let mut url = reqwest::Url::parse(seed).ok()?;
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    url.set_host(Some(&host)).ok()?;
    url.set_port(Some(port)).ok()?;
    Some(url.into())
}

/// The keys a call needs, for the cluster primary serving them.
#[derive(Clone, Copy)]
enum On<'a> {
    /// A user's bucket.
    Bucket(keys::Bucket),
    /// One key (a title's).
    Key(&'a str),
    /// No key, or keys of several primaries (a grouped call answers for
    /// each primary on its own).
    Anything,
}

impl On<'_> {
    /// The cluster slot, when the call has one.
    fn slot(self) -> Option<u16> {
        match self {
            On::Bucket(bucket) => Some(bucket.slot()),
            On::Key(key) => Some(keys::key_slot(keys::hash_tag(key).as_bytes())),
            On::Anything => None,
        }
    }
}

/// Typed Redis operations, each behind the Redis guard.
#[derive(Clone)]
pub struct RedisStore {
    connector: Arc<Connector>,
    guard: Guard,
    /// Redis' clock as last measured, for stamps and deadlines.
    clock: Arc<RedisClock>,
    /// The client-side cache, on the shared connection (every node's
    /// connection in cluster mode).
    cache: Option<Arc<ClientCache>>,
    buckets: Buckets,
    /// Replicas a heartbeat or stop must reach before it counts as recorded.
    min_replicas_acked: u32,
    /// Set when `min_replicas_acked` is: see [`Waiting`].
    waiting: Option<Arc<Waiting>>,
    outages: Arc<outages::Outages>,
}

/// How many connections of their own writes followed by `WAIT` spread over.
const WAITING_CONNECTIONS: usize = 8;

/// Connections of their own for writes followed by `WAIT`. Redis holds back
/// a connection's next commands while its `WAIT` blocks, so on the shared
/// connection one write waiting for replicas would hold back every other
/// call of this instance (and, should a replica lag, time them all out).
/// Here it holds back at most the writes sent after it on the same one of
/// these connections.
struct Waiting {
    connectors: Vec<Connector>,
    next: std::sync::atomic::AtomicUsize,
}

impl Waiting {
    fn new(settings: &RedisSettings) -> RedisResult<Self> {
        let connectors = (0..WAITING_CONNECTIONS)
            .map(|_| connector(settings, None))
            .collect::<RedisResult<_>>()?;
        Ok(Self {
            connectors,
            next: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    fn pick(&self) -> Option<&Connector> {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.connectors.get(n % self.connectors.len().max(1))
    }
}

/// A connection of `settings`' shape, not connected yet; with `cache`, the
/// single-node connection that also serves the client-side cache.
fn connector(settings: &RedisSettings, cache: Option<&Arc<ClientCache>>) -> RedisResult<Connector> {
    let timeout = settings.guard.timeout;
    Ok(match &settings.cluster_urls {
        Some(urls) => {
            let copy = cache.cloned();
            let cache = cache.cloned();
            let build = move |nodes: Vec<String>| {
                let mut builder = ClusterClient::builder(nodes)
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .retries(1);
                if let Some(cache) = &cache {
                    // Every node connection tracks what was read through it:
                    // an invalidation arrives on the connection that read the
                    // key, and one that is lost (a node reconnected, a primary
                    // failed over) drops the whole copy (`client_cache`).
                    builder = builder
                        .use_protocol(ProtocolVersion::RESP3)
                        .cache_config(cache.config())
                        .push_sender(cache.push_handler());
                }
                builder.build()
            };
            // Built once here so that unusable URLs stop the start.
            build(urls.clone())?;
            Connector::Cluster(Arc::new(ClusterLink::new(urls.clone(), Box::new(build), copy)))
        }
        None => {
            let mut client = redis::Client::open(settings.url.as_str())?;
            // Without these a paused Redis would hang every call on this connection.
            let mut config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_millis(500));
            if let Some(cache) = cache {
                // One connection for reads and writes: an instance's own
                // write is invalidated right behind its reply, on the same
                // connection (its own heartbeats and stops also drop what
                // they change at once: `ClientCache::written`).
                let info = client.get_connection_info().clone();
                let redis_info = info.redis_settings().clone().set_protocol(ProtocolVersion::RESP3);
                client = redis::Client::open(info.set_redis_settings(redis_info))?;
                config = config
                    .set_cache_config(cache.config())
                    .set_push_sender(cache.push_handler());
            }
            Connector::Single(Arc::new(SingleLink::new(client, config, cache.cloned())?))
        }
    })
}

impl RedisStore {
    /// Prepares the connection without connecting: Moneta starts while Redis is down.
    pub fn new(settings: &RedisSettings) -> RedisResult<Self> {
        let cache = ClientCache::new(&settings.client_cache);
        let connector = connector(settings, cache.as_ref())?;
        let waiting = match settings.min_replicas_acked {
            0 => None,
            _ => Some(Arc::new(Waiting::new(settings)?)),
        };
        Ok(Self {
            connector: Arc::new(connector),
            guard: Guard::new("redis", &settings.guard),
            clock: Arc::new(RedisClock::default()),
            cache,
            buckets: Buckets::new(settings.buckets),
            min_replicas_acked: settings.min_replicas_acked,
            waiting,
            outages: Arc::default(),
        })
    }

    /// Keeps the client-side cache's proof of life current (see
    /// `client_cache`) and its counters exported, while `alive` says so.
    /// `None` when the cache is off.
    pub fn client_cache_keeper(
        &self,
        alive: impl Fn() -> bool + Send + 'static,
    ) -> Option<impl Future<Output = ()> + Send + 'static> {
        let cache = self.cache.clone()?;
        let connector = self.connector.clone();
        Some(async move {
            let mut tick = tokio::time::interval(client_cache::PING_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while alive() {
                tick.tick().await;
                // Not through the guard: this is the cache's bookkeeping, not
                // a dependency call, and the connections' response timeout
                // bounds it.
                match prove_alive(&connector).await {
                    Ok(()) => cache.confirm(),
                    Err(_) => cache.distrust(),
                }
                cache.export();
            }
        })
    }

    pub fn guard(&self) -> &Guard {
        &self.guard
    }

    /// After this instance wrote `keys`' resume positions: see
    /// [`ClientCache::written`].
    fn written_positions(&self, keys: &UserKeys) {
        if let Some(cache) = &self.cache {
            cache.written(&keys.positions());
        }
    }

    /// Redis' clock as this instance estimates it.
    pub fn clock(&self) -> &RedisClock {
        &self.clock
    }

    /// The same, to keep.
    pub fn clock_handle(&self) -> Arc<RedisClock> {
        self.clock.clone()
    }

    /// Measures Redis' clock now (`TIME`), as a call under the guard.
    pub async fn measure_clock(&self) -> Result<(), DependencyError> {
        let bucket = self.answering_bucket();
        let (secs, micros): (i64, i64) = self
            .run(
                On::Bucket(bucket),
                |mut conn| async move { conn.time(bucket).await },
            )
            .await?;
        self.clock.observe(secs * 1000 + micros / 1000);
        Ok(())
    }

    /// A bucket on a cluster primary that answered the outage watch's last
    /// look (the first bucket when none did, and on one node): where a
    /// keyless question such as the time is asked.
    fn answering_bucket(&self) -> keys::Bucket {
        (self.buckets.all())
            .find(|bucket| !self.outages.primary_failing(|| bucket.slot()))
            .unwrap_or(self.buckets.first())
    }

    /// In cluster mode a pipeline may only touch keys of one slot.
    fn is_cluster(&self) -> bool {
        matches!(&*self.connector, Connector::Cluster(..))
    }

    /// The keys of `user`, in the user's bucket.
    fn user_keys(&self, user: &crate::model::UserId) -> UserKeys {
        self.buckets.user(user)
    }

    async fn conn(&self) -> RedisResult<Conn> {
        connect(&self.connector).await
    }

    /// Like [`RedisStore::run`], on a connection of [`Waiting`]'s (the
    /// shared one when writes wait for no replica).
    async fn run_waiting<T, F, Fut>(&self, on: On<'_>, op: F) -> Result<T, DependencyError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let connector = self
            .waiting
            .as_deref()
            .and_then(Waiting::pick)
            .unwrap_or(&*self.connector);
        self.run_on(connector, on, op).await
    }

    /// Runs `op`, a call for the keys `on` names, on a connection under the
    /// guard. A command error (Redis answered, about this command) is
    /// [`DependencyError::Refused`] and never trips the breaker; see
    /// [`is_outage`].
    async fn run<T, F, Fut>(&self, on: On<'_>, op: F) -> Result<T, DependencyError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        self.run_on(&self.connector, on, op).await
    }

    async fn run_on<T, F, Fut>(&self, connector: &Connector, on: On<'_>, op: F) -> Result<T, DependencyError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        // A cluster primary that fails is this one call's outage, not
        // Redis' (`Outages::isolated`): not made while the watch says so,
        // and, failing as the watch learns so, counted neither way.
        let isolated = || self.outages.isolated(|| on.slot());
        if isolated() {
            return Err(self.guard.refuse());
        }
        let result = self
            .guard
            .call_judged_timing_out(
                async {
                    let mut conn = connect(connector).await?;
                    conn.aim(on);
                    op(conn).await
                },
                |e: &redis::RedisError| match is_outage(e) {
                    true if isolated() => Verdict::Unclear,
                    true => Verdict::Outage,
                    false => Verdict::Answered,
                },
                || match isolated() {
                    true => Verdict::Unclear,
                    false => Verdict::Outage,
                },
            )
            .await;
        if matches!(
            result,
            Err(DependencyError::Failed(..) | DependencyError::Timeout(_))
        ) {
            self.outages.call_failed();
            // A new connection would not bring a hung primary back, and
            // would drop every user's cached reads.
            if !isolated() {
                after_call(connector, &result);
            }
        }
        result
    }

    /// Reachability probe for readiness and the breaker; `TIME`, so that an
    /// idle instance keeps its estimate of Redis' clock current too.
    pub async fn ping(&self) -> Result<(), DependencyError> {
        let result = self
            .guard
            .probe(async {
                let mut conn = self.conn().await?;
                let (secs, micros) = conn.time(self.answering_bucket()).await?;
                self.clock.observe(secs * 1000 + micros / 1000);
                Ok::<_, redis::RedisError>(())
            })
            .await;
        after_call(&self.connector, &result);
        result
    }
}

/// A `PING` answered on every connection cached reads go through: each
/// connection's invalidations arrive before its reply, so every change made
/// before now has reached the cache. In cluster mode that is one `PING` per
/// primary, all of which must answer.
async fn prove_alive(connector: &Connector) -> RedisResult<()> {
    match connector {
        Connector::Single(link) => redis::cmd("PING").query_async(&mut link.conn()).await,
        Connector::Cluster(link) => {
            use redis::cluster_routing::{MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo};
            let every_primary = RoutingInfo::MultiNode((
                MultipleNodeRoutingInfo::AllMasters,
                Some(ResponsePolicy::AllSucceeded),
            ));
            link.conn()
                .await?
                .route_command(redis::cmd("PING"), every_primary)
                .await
                .map(drop)
        }
    }
}

/// The making of a cluster connection is boxed: its future is ~3 KB, and
/// every call's future (so every request's) would carry it while calls
/// almost always find the connection made.
async fn connect(connector: &Connector) -> RedisResult<Conn> {
    match connector {
        Connector::Single(link) => Ok(Conn::Single(link.conn())),
        Connector::Cluster(link) => match link.made() {
            Some(conn) => Ok(Conn::Cluster(conn, None)),
            None => Ok(Conn::Cluster(Box::pin(link.conn()).await?, None)),
        },
    }
}

/// After a call on `connector`: an outage may be a connection gone silent
/// (see [`SingleLink`]) or, in cluster mode, a topology the connection has
/// not followed (see [`ClusterLink`]).
fn after_call<T>(connector: &Connector, result: &Result<T, DependencyError>) {
    if !matches!(
        result,
        Err(DependencyError::Failed(..) | DependencyError::Timeout(_))
    ) {
        return;
    }
    match connector {
        Connector::Single(link) => link.suspect(),
        Connector::Cluster(link) => link.suspect(),
    }
}

/// Whether a Redis error means Redis cannot serve (unreachable, hung,
/// loading, failing over, no quorum) rather than an answer about one command
/// (`NOGROUP` after Redis lost its data, `WRONGTYPE`, a script error). Only
/// the former is an outage: counting a command error as one would keep the
/// breaker flapping against a Redis that answers.
fn is_outage(e: &redis::RedisError) -> bool {
    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
        return true;
    }
    if e.kind() == redis::ErrorKind::UnexpectedReturnType {
        // Redis answered; the reply had another shape than expected.
        return false;
    }
    // A pipeline's errors carry their codes one by one (`code()` is `None`
    // there for codes the client does not know, such as `NOGROUP`).
    match e.clone().into_server_errors() {
        Some(errors) => errors.iter().any(|(_, error)| {
            matches!(
                error.code(),
                "LOADING"
                    | "BUSY"
                    | "MASTERDOWN"
                    | "TRYAGAIN"
                    | "CLUSTERDOWN"
                    | "NOAUTH"
                    | "WRONGPASS"
                    | "NOPERM"
            )
        }),
        // No server answer: a client-side failure (no connection, a cluster
        // without a route); treat as unreachable.
        None => true,
    }
}

/// Milliseconds since the epoch from a `TIME`-based script reply.
fn millis_to_utc(ms: i64) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answered(resp: &[u8]) -> redis::RedisError {
        let value = redis::parse_redis_value(resp).unwrap();
        value.extract_error().unwrap_err()
    }

    #[test]
    fn command_errors_are_answers_and_transport_errors_outages() {
        assert!(!is_outage(&answered(
            b"-NOGROUP No such key or consumer group\r\n"
        )));
        assert!(!is_outage(&answered(b"-WRONGTYPE Operation against a key\r\n")));
        assert!(!is_outage(&answered(b"*2\r\n+OK\r\n-NOGROUP No such group\r\n")));
        assert!(is_outage(&answered(b"-LOADING Redis is loading\r\n")));
        assert!(is_outage(&answered(b"*2\r\n-BUSY script running\r\n+OK\r\n")));
        let io = redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(is_outage(&io));
    }

    #[test]
    fn only_script_load_goes_to_the_calls_primary() {
        assert!(is_script_load(redis::cmd("SCRIPT").arg("LOAD").arg("return 1")));
        assert!(is_script_load(redis::cmd("script").arg("load").arg("return 1")));
        assert!(!is_script_load(redis::cmd("SCRIPT").arg("FLUSH")));
        assert!(!is_script_load(redis::cmd("EVALSHA").arg("abc").arg(0)));
        assert!(!is_script_load(&redis::cmd("SCRIPT")));
    }

    #[test]
    fn cluster_nodes_become_urls_of_the_seeds_shape() {
        let seed = "rediss://moneta:s3cret@redis-0.example:7000/?insecure";
        let line = |address: &str, flags: &str| {
            format!(
                "07c37dfeb235213a872192d90877d0cd55635b91 {address} {flags} - 0 1426238317239 4 connected"
            )
        };
        assert_eq!(
            node_url(seed, &line("10.0.0.7:7002@17002", "master")).as_deref(),
            Some("rediss://moneta:s3cret@10.0.0.7:7002/?insecure")
        );
        assert_eq!(
            node_url(
                "redis://127.0.0.1:7000",
                &line("127.0.0.1:7004@17004,node-4", "myself,slave")
            )
            .as_deref(),
            Some("redis://127.0.0.1:7004")
        );
        assert_eq!(
            node_url("redis://127.0.0.1:7000", &line("::1:7001@17001", "master")).as_deref(),
            Some("redis://[::1]:7001")
        );
        for (address, flags) in [
            (":0@0", "master,noaddr"),
            ("127.0.0.1:7005@17005", "master,fail"),
            ("127.0.0.1:7006@17006", "handshake"),
            (":7007@17007", "master"),
        ] {
            assert_eq!(node_url(seed, &line(address, flags)), None, "{address} {flags}");
        }
        assert_eq!(node_url(seed, ""), None);
    }
}

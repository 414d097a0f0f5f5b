//! Redis: the first source for everything, and the home of sessions.

pub mod keys;

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;
use tracing::field::Empty;

use crate::config::Settings;
use crate::playback::model::{ContentPlayback, Entitlement};
use crate::resilience::{DependencyError, Guard};
use crate::sources::internal_api::ProgressItem;
use crate::telemetry::traces;
use keys::UserKeys;

/// How long resume positions live in Redis; the internal API keeps them for good.
const POSITION_TTL_S: i64 = 30 * 24 * 3600;

/// A cached title, or the fact that the internal API does not know it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CachedContent {
    pub fetched_at_ms: u64,
    pub content: Option<ContentPlayback>,
}

/// One connection object for both deployment shapes.
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
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
            Conn::Cluster(c) => c.req_packed_command(cmd),
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
        let span = if traces::client_spans() {
            let names: Vec<String> = pipeline.cmd_iter().map(command_name).collect();
            // The conventions name a mixed batch `BATCH`; the summary lists its commands.
            let operation = match names.first() {
                Some(first) if names.iter().all(|n| n == first) => format!("BATCH {first}"),
                _ => "BATCH".to_owned(),
            };
            command_span(&operation, &names.join(" "), Some(names.len()), self.get_db())
        } else {
            tracing::Span::none()
        };
        let call = match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        };
        if span.is_none() {
            return call;
        }
        Box::pin(traces::traced(span, call, redis_error_type))
    }
    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

enum Connector {
    Single(ConnectionManager),
    /// Cluster connections discover the topology when they connect, so the
    /// first successful call establishes it (Redis may be down at start).
    Cluster(Box<ClusterClient>, Arc<OnceCell<ClusterConnection>>),
}

/// Typed Redis operations, each behind the Redis guard.
#[derive(Clone)]
pub struct RedisStore {
    connector: Arc<Connector>,
    guard: Guard,
}

impl RedisStore {
    /// Prepares the connection without connecting: Moneta starts while Redis is down.
    pub fn new(settings: &Settings) -> RedisResult<Self> {
        let timeout = settings.redis.timeout;
        let connector = match &settings.redis_cluster_urls {
            Some(urls) => {
                let client = ClusterClient::builder(urls.clone())
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .retries(1)
                    .build()?;
                Connector::Cluster(Box::new(client), Arc::new(OnceCell::new()))
            }
            None => {
                let client = redis::Client::open(settings.redis_url.as_str())?;
                // Without these a paused Redis would hang every call on this connection.
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_millis(500));
                Connector::Single(ConnectionManager::new_lazy_with_config(client, config)?)
            }
        };
        Ok(Self {
            connector: Arc::new(connector),
            guard: Guard::new("redis", &settings.redis),
        })
    }

    pub fn guard(&self) -> &Guard {
        &self.guard
    }

    async fn conn(&self) -> RedisResult<Conn> {
        match &*self.connector {
            Connector::Single(manager) => Ok(Conn::Single(manager.clone())),
            Connector::Cluster(client, cell) => {
                let conn = cell.get_or_try_init(|| client.get_async_connection()).await?;
                Ok(Conn::Cluster(conn.clone()))
            }
        }
    }

    /// Runs `op` on a connection under the guard.
    pub async fn run<T, F, Fut>(&self, op: F) -> Result<T, DependencyError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        self.guard
            .call(async {
                let conn = self.conn().await?;
                op(conn).await
            })
            .await
    }

    pub async fn ping(&self) -> Result<(), DependencyError> {
        self.run(|mut c| async move { redis::cmd("PING").query_async::<()>(&mut c).await })
            .await
    }

    pub async fn content(&self, content_id: &str) -> Result<Option<CachedContent>, DependencyError> {
        let key = keys::content(content_id);
        let raw: Option<String> = self
            .run(|mut c| async move { redis::cmd("GET").arg(key).query_async(&mut c).await })
            .await?;
        // A value that no longer parses (older layout) is a miss, not an error.
        Ok(raw.and_then(|s| serde_json::from_str(&s).ok()))
    }

    pub async fn put_content(
        &self,
        content_id: &str,
        cached: &CachedContent,
        ttl: Duration,
    ) -> Result<(), DependencyError> {
        self.set_json(keys::content(content_id), cached, ttl).await
    }

    /// `SET key <json> PX ttl`.
    async fn set_json<T: Serialize>(
        &self,
        key: String,
        value: &T,
        ttl: Duration,
    ) -> Result<(), DependencyError> {
        let value = serde_json::to_string(value).unwrap_or_default();
        self.run(|mut c| async move {
            redis::cmd("SET")
                .arg(key)
                .arg(value)
                .arg("PX")
                .arg(ttl.as_millis() as u64)
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }

    /// The caller's cached entitlement and resume position for a title, in one
    /// round trip. `None` means "not cached"; `Some(None)` a cached "no entitlement".
    pub async fn user_view(&self, user_id: &str, content_id: &str) -> Result<UserView, DependencyError> {
        let keys = UserKeys::new(user_id);
        let (ent, pos): (Option<String>, Option<u64>) = self
            .run(|mut c| async move {
                redis::pipe()
                    .cmd("GET")
                    .arg(keys.entitlement())
                    .cmd("HGET")
                    .arg(keys.positions())
                    .arg(content_id)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        let entitlement = ent.and_then(|s| serde_json::from_str::<Option<Entitlement>>(&s).ok());
        Ok(UserView {
            entitlement,
            position_ms: pos,
        })
    }

    pub async fn put_entitlement(
        &self,
        user_id: &str,
        entitlement: Option<&Entitlement>,
        ttl: Duration,
    ) -> Result<(), DependencyError> {
        self.set_json(UserKeys::new(user_id).entitlement(), &entitlement, ttl)
            .await
    }

    pub async fn put_position(
        &self,
        user_id: &str,
        content_id: &str,
        position_ms: u64,
    ) -> Result<(), DependencyError> {
        let key = UserKeys::new(user_id).positions();
        self.run(|mut c| async move {
            redis::pipe()
                .cmd("HSET")
                .arg(&key)
                .arg(content_id)
                .arg(position_ms)
                .ignore()
                .cmd("EXPIRE")
                .arg(&key)
                .arg(POSITION_TTL_S)
                .ignore()
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }
}

impl RedisStore {
    /// Parks positions the internal API could not take. One key for the whole
    /// fleet, touched only by flushers, so Redis Cluster keeps it in one slot;
    /// trimmed to `capacity`, newest kept.
    pub async fn spill_progress(
        &self,
        items: &[ProgressItem],
        capacity: usize,
    ) -> Result<(), DependencyError> {
        let encoded: Vec<String> = items
            .iter()
            .filter_map(|i| serde_json::to_string(i).ok())
            .collect();
        if encoded.is_empty() {
            return Ok(());
        }
        let key = keys::progress_spill();
        self.run(|mut c| async move {
            redis::pipe()
                .cmd("RPUSH")
                .arg(&key)
                .arg(encoded)
                .ignore()
                .cmd("LTRIM")
                .arg(&key)
                .arg(-(capacity as i64))
                .arg(-1)
                .ignore()
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }

    /// Takes up to `max` parked positions (this instance's or another's).
    pub async fn take_spilled_progress(&self, max: usize) -> Result<Vec<ProgressItem>, DependencyError> {
        let key = keys::progress_spill();
        let raw: Option<Vec<String>> = self
            .run(|mut c| async move { redis::cmd("LPOP").arg(key).arg(max).query_async(&mut c).await })
            .await?;
        Ok(raw
            .unwrap_or_default()
            .iter()
            .filter_map(|s| serde_json::from_str(s).ok())
            .collect())
    }
}

/// Position TTL for scripts that write positions themselves.
pub fn position_ttl_s() -> i64 {
    POSITION_TTL_S
}

/// What Redis knows about one user and one title.
#[derive(Debug, Clone, Default)]
pub struct UserView {
    pub entitlement: Option<Option<Entitlement>>,
    pub position_ms: Option<u64>,
}

//! The ceilings `scripts/bench` measures Moneta against, on the same runtime
//! settings as Moneta and answering a JSON body of the same size:
//!
//! - without a Redis URL, a bare axum handler: no authentication, no I/O;
//! - with one, the one-round-trip ceilings on a multiplexed connection:
//!   - playback-info (`GET`, any path): one Redis pipeline (GET + HGET, the
//!     shape of Moneta's warm playback-info read), then the answer. Request
//!     `i` reads user `bench-{i % users}`'s entitlement and their position
//!     for title `(i / users) % titles`, the order `scripts/bench` sends
//!     Moneta.
//!   - heartbeat (`PUT /v1/playback/sessions/{id}`, Moneta's heartbeat
//!     request): the position taken from the JSON body, one `EVALSHA` of a
//!     Lua script doing a heartbeat's writes (`ZADD` to the sessions set,
//!     `HSET` of the position, `XADD` to the bucket's progress log, their
//!     lifetimes renewed when low) on keys of Moneta's shape, then an answer of the
//!     heartbeat's shape. Heartbeat `i` writes for user `bench-{i % users}`.
//!     Its keys start `ceiling:` instead of `moneta:` so that Moneta, when
//!     it runs beside, does not deliver these log entries, and its log is
//!     capped (`MAXLEN ~`) since nothing consumes it.
//!
//!     With `BENCH_HEARTBEAT_BATCH=<n>` the heartbeats are group-committed
//!     instead: heartbeats that arrive while earlier ones are being written
//!     wait and go together, up to `n` in one `EVALSHA` of a script doing the
//!     same writes for each, with at most two such calls in flight. Nothing
//!     waits for a batch to fill: an idle server writes each heartbeat alone.
//!
//! Usage: `bench_baseline <listen addr> <body bytes> [<redis url> <users> [<title,title,…>]]`
//! (titles default to `m-0001`)

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::extract::Path;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, put};
use chrono::{SecondsFormat, TimeZone, Utc};
use redis::Script;

/// A heartbeat's Redis writes, without Moneta's checks (liveness, eviction,
/// the deadline), written the way Moneta's script writes them (`now` cut
/// from `TIME`'s digits, lifetimes written into the script and renewed only
/// when the positions hash runs low, numbers read by arithmetic;
/// `session_lib.lua`): KEYS sessions, positions, log; ARGV session id,
/// position, user, title. Returns `{1, now}` like Moneta's script.
const HEARTBEAT_LUA: &str = r"
local t = redis.call('TIME')
local now_s = t[1] .. string.sub('00000' .. t[2], -6, -4)
local POSITION_TTL_MS, KEY_LIFETIME_MS = 2592000000, 3600000
redis.call('ZADD', KEYS[1], now_s, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[4], ARGV[2] .. '@' .. now_s)
if redis.call('PTTL', KEYS[2]) < POSITION_TTL_MS + KEY_LIFETIME_MS then
  redis.call('PEXPIRE', KEYS[1], 2 * KEY_LIFETIME_MS)
  redis.call('PEXPIRE', KEYS[2], POSITION_TTL_MS + 2 * KEY_LIFETIME_MS)
end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', 10000, '*', 'i', ARGV[2] .. ' ' .. now_s .. ' 0 ' .. ARGV[4] .. ' ' .. ARGV[3])
return {1, now_s + 0}
";
/// [`HEARTBEAT_LUA`] for many heartbeats: KEYS three per heartbeat, ARGV four
/// per heartbeat in the same order. Returns `now`.
const HEARTBEATS_LUA: &str = r"
local t = redis.call('TIME')
local now_s = t[1] .. string.sub('00000' .. t[2], -6, -4)
local POSITION_TTL_MS, KEY_LIFETIME_MS = 2592000000, 3600000
for i = 0, #KEYS / 3 - 1 do
  local k, a = i * 3, i * 4
  redis.call('ZADD', KEYS[k + 1], now_s, ARGV[a + 1])
  redis.call('HSET', KEYS[k + 2], ARGV[a + 4], ARGV[a + 2] .. '@' .. now_s)
  if redis.call('PTTL', KEYS[k + 2]) < POSITION_TTL_MS + KEY_LIFETIME_MS then
    redis.call('PEXPIRE', KEYS[k + 1], 2 * KEY_LIFETIME_MS)
    redis.call('PEXPIRE', KEYS[k + 2], POSITION_TTL_MS + 2 * KEY_LIFETIME_MS)
  end
  redis.call('XADD', KEYS[k + 3], 'MAXLEN', '~', 10000, '*', 'i', ARGV[a + 2] .. ' ' .. now_s .. ' 0 ' .. ARGV[a + 4] .. ' ' .. ARGV[a + 3])
end
return now_s + 0
";
/// Group-committed batches in flight at once.
const BATCHES_IN_FLIGHT: usize = 2;
/// Moneta's default `MONETA_SESSION_TTL_S`, for the answer's `expires_at`.
const SESSION_TTL_MS: i64 = 90_000;

/// The Redis side of the heartbeat's one-round-trip ceiling.
struct HeartbeatTrip {
    conn: redis::aio::MultiplexedConnection,
    hash: String,
    /// `(user, sessions key, positions key, log key)` per user, built once.
    keys: Vec<(String, String, String, String)>,
    next: AtomicUsize,
    /// Where heartbeats wait for the group-committing writer, when batching.
    batched: Option<tokio::sync::mpsc::Sender<Pending>>,
}

/// One heartbeat waiting for its batch: its keys and arguments, and where
/// the batch's time goes.
struct Pending {
    keys: [String; 3],
    args: [String; 4],
    done: tokio::sync::oneshot::Sender<Result<i64, redis::RedisError>>,
}

/// Writes what waits on `queue` in batches of at most `limit`, at most
/// [`BATCHES_IN_FLIGHT`] at once; a batch takes everything queued when a
/// call slot frees, so batches grow with the load and never wait to fill.
async fn group_commit(
    mut queue: tokio::sync::mpsc::Receiver<Pending>,
    conn: redis::aio::MultiplexedConnection,
    hash: String,
    limit: usize,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT));
    let mut batch = Vec::with_capacity(limit);
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        if queue.recv_many(&mut batch, limit).await == 0 {
            return;
        }
        let call = std::mem::replace(&mut batch, Vec::with_capacity(limit));
        let mut conn = conn.clone();
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&hash).arg(call.len() * 3);
        for p in &call {
            cmd.arg(&p.keys[..]);
        }
        for p in &call {
            cmd.arg(&p.args[..]);
        }
        tokio::spawn(async move {
            let result: Result<i64, redis::RedisError> = cmd.query_async(&mut conn).await;
            for p in call {
                let _ = p.done.send(result.clone());
            }
            drop(slot);
        });
    }
}

#[derive(serde::Deserialize)]
struct HeartbeatBody {
    position_ms: u64,
}

impl HeartbeatTrip {
    /// The answer Moneta gives, or `None` for a body without a position.
    async fn beat(&self, id: &str, body: &[u8]) -> Result<Option<String>, redis::RedisError> {
        let Ok(HeartbeatBody { position_ms }) = serde_json::from_slice(body) else {
            return Ok(None);
        };
        // `<random>.<title>.<device>.<mac>`
        let title = id.split('.').nth(1).unwrap_or_default();
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        let (user, sessions, positions, log) = &self.keys[i % self.keys.len()];
        let now = if let Some(queue) = &self.batched {
            let (done, answer) = tokio::sync::oneshot::channel();
            let pending = Pending {
                keys: [sessions.clone(), positions.clone(), log.clone()],
                args: [
                    id.to_owned(),
                    position_ms.to_string(),
                    user.clone(),
                    title.to_owned(),
                ],
                done,
            };
            let gone = || redis::RedisError::from((redis::ErrorKind::Io, "the batch writer stopped"));
            queue.send(pending).await.map_err(|_| gone())?;
            answer.await.map_err(|_| gone())??
        } else {
            let mut conn = self.conn.clone();
            let (_, now): (i64, i64) = redis::cmd("EVALSHA")
                .arg(&self.hash)
                .arg(3)
                .arg(sessions)
                .arg(positions)
                .arg(log)
                .arg(id)
                .arg(position_ms)
                .arg(user)
                .arg(title)
                .query_async(&mut conn)
                .await?;
            now
        };
        let expires_at = Utc
            .timestamp_millis_opt(now + SESSION_TTL_MS)
            .single()
            .unwrap_or_default()
            .to_rfc3339_opts(SecondsFormat::Millis, true);
        Ok(Some(format!(
            "{{\"session_id\":\"{id}\",\"expires_at\":\"{expires_at}\",\"degraded\":false}}"
        )))
    }
}

/// The Redis side of the one-round-trip ceiling.
struct OneTrip {
    conn: redis::aio::MultiplexedConnection,
    /// `(entitlement key, positions key)` per user, built once: Moneta builds
    /// its keys per request, the ceiling does not pay for that.
    keys: Vec<(String, String)>,
    titles: Vec<String>,
    next: AtomicUsize,
}

impl OneTrip {
    async fn read(&self) -> Result<(), redis::RedisError> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        let (entitlement, positions) = &self.keys[i % self.keys.len()];
        let title = &self.titles[(i / self.keys.len()) % self.titles.len()];
        let mut conn = self.conn.clone();
        let _: (Option<String>, Option<String>) = redis::pipe()
            .cmd("GET")
            .arg(entitlement)
            .cmd("HGET")
            .arg(positions)
            .arg(title)
            .query_async(&mut conn)
            .await?;
        Ok(())
    }
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:3900".into());
    let size: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(900);
    let redis_url = args.next();
    let users: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(256).max(1);
    let titles: Vec<String> = args
        .next()
        .map(|s| {
            s.split(',')
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .filter(|t: &Vec<String>| !t.is_empty())
        .unwrap_or_else(|| vec!["m-0001".to_owned()]);
    let body: &'static str =
        Box::leak(format!("{{\"pad\":\"{}\"}}", "x".repeat(size.saturating_sub(10))).into_boxed_str());
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let listener = tokio::net::TcpListener::bind(&addr).await?;
            let Some(url) = redis_url else {
                let app = Router::new().fallback(get(move || async move {
                    ([(header::CONTENT_TYPE, "application/json")], body)
                }));
                return axum::serve(listener, app).await;
            };
            let client = redis::Client::open(url).map_err(std::io::Error::other)?;
            let conn = client
                .get_multiplexed_async_connection()
                .await
                .map_err(std::io::Error::other)?;
            // Moneta's own layout (the default `MONETA_REDIS_BUCKETS`).
            let buckets = moneta::sources::redis::keys::Buckets::new(64);
            let keys = (0..users)
                .map(|i| {
                    let user = moneta::model::UserId::parse(format!("bench-{i}"))
                        .map_err(|e| std::io::Error::other(e.to_string()))?;
                    let keys = buckets.user(&user);
                    Ok((keys.entitlement(), keys.positions()))
                })
                .collect::<std::io::Result<_>>()?;
            let hash = Script::new(HEARTBEAT_LUA)
                .load_async(&mut conn.clone())
                .await
                .map_err(std::io::Error::other)?;
            let batch_limit: usize = std::env::var("BENCH_HEARTBEAT_BATCH")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let batched = if batch_limit > 1 {
                let batch_hash = Script::new(HEARTBEATS_LUA)
                    .load_async(&mut conn.clone())
                    .await
                    .map_err(std::io::Error::other)?;
                let (queue, waiting) = tokio::sync::mpsc::channel(4096);
                tokio::spawn(group_commit(waiting, conn.clone(), batch_hash, batch_limit));
                Some(queue)
            } else {
                None
            };
            let beat = Arc::new(HeartbeatTrip {
                conn: conn.clone(),
                hash,
                keys: heartbeat_keys(&buckets, users)?,
                next: AtomicUsize::new(0),
                batched,
            });
            let trip = Arc::new(OneTrip {
                conn,
                keys,
                titles,
                next: AtomicUsize::new(0),
            });
            let heartbeat = put(move |Path(id): Path<String>, body: Bytes| async move {
                match beat.beat(&id, &body).await {
                    Ok(Some(answer)) => {
                        ([(header::CONTENT_TYPE, "application/json")], answer).into_response()
                    }
                    Ok(None) => StatusCode::BAD_REQUEST.into_response(),
                    Err(_) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
                }
            });
            let app = Router::new()
                .route("/v1/playback/sessions/{id}", heartbeat)
                .fallback(get(move || {
                    let trip = trip.clone();
                    async move {
                        match trip.read().await {
                            Ok(()) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
                            Err(_) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
                        }
                    }
                }));
            axum::serve(listener, app).await
        })
}

/// Per user: the id and the keys a heartbeat writes, under `ceiling:`
/// instead of `moneta:`.
fn heartbeat_keys(
    buckets: &moneta::sources::redis::keys::Buckets,
    users: usize,
) -> std::io::Result<Vec<(String, String, String, String)>> {
    let ours = |key: String| key.replacen("moneta:", "ceiling:", 1);
    (0..users)
        .map(|i| {
            let id = format!("bench-{i}");
            let user =
                moneta::model::UserId::parse(id.clone()).map_err(|e| std::io::Error::other(e.to_string()))?;
            let keys = buckets.user(&user);
            Ok((
                id,
                ours(keys.sessions()),
                ours(keys.positions()),
                ours(keys.log()),
            ))
        })
        .collect()
}

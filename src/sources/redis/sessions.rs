//! Playback sessions and the concurrent-stream limit, as atomic scripts on
//! one user's keys (one cluster slot). The limit rule itself lives in
//! `scripts/start.lua`; this file turns replies into typed outcomes.

use std::sync::LazyLock;
use std::time::Duration;

use chrono::{DateTime, Utc};
use redis::{Script, Value};

use super::keys::{self, UserKeys};
use super::{POSITION_TTL_S, RedisStore, millis_to_utc};
use crate::model::{ContentId, DeviceId, LiveSession, PositionMs, ProgressItem, SessionId, UserId};
use crate::resilience::DependencyError;

static START: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/start.lua")));
static HEARTBEAT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/heartbeat.lua")));
static STOP: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/stop.lua")));
static LIST: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/list.lua")));

/// A start the stream limit has to admit.
pub struct StartRequest<'a> {
    pub user: &'a UserId,
    pub session_id: &'a SessionId,
    pub device_id: &'a DeviceId,
    pub content_id: &'a ContentId,
    pub max_streams: u32,
    /// At the limit, end the session with the oldest heartbeat instead of refusing.
    pub evict_oldest: bool,
}

#[derive(Debug)]
pub enum StartOutcome {
    /// Started at Redis' `now`; `evicted` names the session that made room.
    Started {
        now: DateTime<Utc>,
        evicted: Option<SessionId>,
    },
    /// At the limit: the sessions holding the slots. Nothing was changed.
    Full(Vec<LiveSession>),
}

#[derive(Debug, PartialEq, Eq)]
pub enum TouchOutcome {
    /// Recorded (and durable) at Redis' `now`.
    Touched(DateTime<Utc>),
    Unknown,
    /// Ended by a newer start under `evict_oldest`.
    Evicted,
}

#[derive(Debug, PartialEq, Eq)]
pub enum EndOutcome {
    Ended,
    /// It had been evicted already; a final position was still recorded.
    WasEvicted,
    Unknown,
}

/// The caller's live sessions at Redis' `now`.
pub struct LiveList {
    pub now: DateTime<Utc>,
    pub sessions: Vec<LiveSession>,
}

/// Sessions of every user; `ttl` is how long a session lives without a heartbeat.
#[derive(Clone)]
pub struct SessionStore {
    redis: RedisStore,
    ttl: Duration,
}

fn int(v: Option<&Value>) -> i64 {
    v.and_then(|v| redis::from_redis_value_ref::<i64>(v).ok())
        .unwrap_or(0)
}

fn text(v: Option<&Value>) -> Option<String> {
    v.and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
}

/// `"device_id content_id"` as the scripts store it; `None` for anything
/// that does not parse (a key written by hand, an older layout).
fn live_session(id: String, info: &str, expires_at: Option<DateTime<Utc>>) -> Option<LiveSession> {
    let (device, content) = info.split_once(' ')?;
    Some(LiveSession {
        session_id: SessionId::parse(id).ok()?,
        device_id: DeviceId::parse(device).ok()?,
        content_id: ContentId::parse(content).ok()?,
        expires_at,
    })
}

impl RedisStore {
    pub fn sessions(&self, ttl: Duration) -> SessionStore {
        SessionStore {
            redis: self.clone(),
            ttl,
        }
    }
}

impl SessionStore {
    fn ttl_ms(&self) -> u64 {
        self.ttl.as_millis() as u64
    }

    /// When a session seen at `last_ms` stops counting.
    pub fn expiry(&self, last: DateTime<Utc>) -> DateTime<Utc> {
        last + self.ttl
    }

    pub async fn start(&self, req: StartRequest<'_>) -> Result<StartOutcome, DependencyError> {
        let keys = UserKeys::new(req.user);
        let mut call = START.prepare_invoke();
        call.key(keys.sessions())
            .key(keys.session_info())
            .key(keys.devices())
            .key(keys.evicted())
            .arg(self.ttl_ms())
            .arg(req.max_streams)
            .arg(req.session_id.as_str())
            .arg(req.device_id.as_str())
            .arg(req.content_id.as_str())
            .arg(if req.evict_oldest { "1" } else { "0" });
        let reply: Vec<Value> = self
            .redis
            .run(|mut c| async move { call.invoke_async(&mut c).await })
            .await?;
        let now = millis_to_utc(int(reply.get(1)));
        if int(reply.first()) == 1 {
            let evicted = text(reply.get(2)).and_then(|id| SessionId::parse(id).ok());
            return Ok(StartOutcome::Started { now, evicted });
        }
        let active = reply
            .get(2..)
            .unwrap_or_default()
            .chunks(2)
            .filter_map(|pair| live_session(text(pair.first())?, &text(pair.get(1))?, None))
            .collect();
        Ok(StartOutcome::Full(active))
    }

    /// Single-node mode writes the progress-log entry inside the script, so
    /// a heartbeat is one round trip; in cluster mode the log lives in
    /// another slot and the entry is a second command (see `ProgressLog`).
    fn log_key(&self) -> Option<String> {
        (!self.redis.is_cluster()).then(keys::progress_log)
    }

    /// A heartbeat or stop script on one user's session and position keys
    /// (and, single-node, the progress log), arguments still to come.
    fn writing_call<'a>(&self, script: &'a Script, user: &UserId) -> redis::ScriptInvocation<'a> {
        let keys = UserKeys::new(user);
        let mut call = script.prepare_invoke();
        call.key(keys.sessions())
            .key(keys.session_info())
            .key(keys.positions())
            .key(keys.devices())
            .key(keys.evicted());
        if let Some(log) = self.log_key() {
            call.key(log);
        }
        call
    }

    /// Keeps a session alive and records its position, durably: once this
    /// returns `Touched`, the position reaches the internal API even if this
    /// instance dies.
    pub async fn touch(
        &self,
        user: &UserId,
        session_id: &SessionId,
        position: PositionMs,
    ) -> Result<TouchOutcome, DependencyError> {
        let content = session_id.content_id();
        let mut call = self.writing_call(&HEARTBEAT, user);
        call.arg(self.ttl_ms())
            .arg(session_id.as_str())
            .arg(position.get())
            .arg(POSITION_TTL_S)
            .arg(user.as_str())
            .arg(content.as_str());
        let reply: Vec<Value> = self
            .redis
            .run(|mut c| async move { call.invoke_async(&mut c).await })
            .await?;
        let now = millis_to_utc(int(reply.get(1)));
        Ok(match int(reply.first()) {
            1 => {
                if self.redis.is_cluster() {
                    let item = ProgressItem {
                        user_id: user.clone(),
                        content_id: content,
                        position_ms: position,
                        updated_at: now,
                        completed: false,
                    };
                    self.redis
                        .progress_log()
                        .append_all(std::slice::from_ref(&item))
                        .await?;
                }
                TouchOutcome::Touched(now)
            }
            -1 => TouchOutcome::Evicted,
            _ => TouchOutcome::Unknown,
        })
    }

    /// Ends a session at once, freeing its slot; records a final position
    /// (and, `completed`, that the title was watched to the end).
    pub async fn end(
        &self,
        user: &UserId,
        session_id: &SessionId,
        position: Option<PositionMs>,
        completed: bool,
    ) -> Result<EndOutcome, DependencyError> {
        let content = session_id.content_id();
        let mut call = self.writing_call(&STOP, user);
        call.arg(session_id.as_str())
            .arg(position.map(|p| p.get().to_string()).unwrap_or_default())
            .arg(POSITION_TTL_S)
            .arg(user.as_str())
            .arg(content.as_str())
            .arg(if completed { "1" } else { "0" });
        let reply: Vec<Value> = self
            .redis
            .run(|mut c| async move { call.invoke_async(&mut c).await })
            .await?;
        let outcome = match int(reply.first()) {
            1 => EndOutcome::Ended,
            2 => EndOutcome::WasEvicted,
            _ => return Ok(EndOutcome::Unknown),
        };
        let recorded = text(reply.get(2))
            .and_then(|p| p.parse().ok())
            .and_then(|p| PositionMs::new(p).ok());
        if let Some(position) = recorded
            && self.redis.is_cluster()
        {
            let item = ProgressItem {
                user_id: user.clone(),
                content_id: content,
                position_ms: position,
                updated_at: millis_to_utc(int(reply.get(1))),
                completed,
            };
            self.redis
                .progress_log()
                .append_all(std::slice::from_ref(&item))
                .await?;
        }
        Ok(outcome)
    }

    pub async fn list(&self, user: &UserId) -> Result<LiveList, DependencyError> {
        let keys = UserKeys::new(user);
        let mut call = LIST.prepare_invoke();
        call.key(keys.sessions())
            .key(keys.session_info())
            .arg(self.ttl_ms());
        let reply: Vec<Value> = self
            .redis
            .run(|mut c| async move { call.invoke_async(&mut c).await })
            .await?;
        let now = millis_to_utc(int(reply.first()));
        let sessions = reply
            .get(1..)
            .unwrap_or_default()
            .chunks(3)
            .filter_map(|triple| {
                let last: f64 = text(triple.get(1))?.parse().ok()?;
                let expires = self.expiry(millis_to_utc(last as i64));
                live_session(text(triple.first())?, &text(triple.get(2))?, Some(expires))
            })
            .collect();
        Ok(LiveList { now, sessions })
    }
}

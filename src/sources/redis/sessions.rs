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

/// The session scripts, each behind the helpers they share.
macro_rules! session_script {
    ($file:literal) => {
        LazyLock::new(|| {
            Script::new(concat!(
                include_str!("scripts/session_lib.lua"),
                include_str!(concat!("scripts/", $file))
            ))
        })
    };
}

static START: LazyLock<Script> = session_script!("start.lua");
static HEARTBEAT: LazyLock<Script> = session_script!("heartbeat.lua");
static STOP: LazyLock<Script> = session_script!("stop.lua");
static LIST: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/list.lua")));

/// How long a user's session keys outlive their last write: ended ids stay
/// ended (a stray heartbeat is not recorded again) for this long.
const SESSION_MEMORY: Duration = Duration::from_secs(3600);

/// The device a session recorded again by its heartbeat is listed under:
/// session ids do not carry the device.
pub const UNKNOWN_DEVICE: &str = "unknown";

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
    /// Started at Redis' `now`; `evicted` names the sessions that made room,
    /// oldest first.
    Started {
        now: DateTime<Utc>,
        evicted: Vec<SessionId>,
    },
    /// At the limit: the sessions holding the slots. Nothing was changed.
    Full(Vec<LiveSession>),
}

#[derive(Debug, PartialEq, Eq)]
pub enum TouchOutcome {
    /// Recorded (and durable) at Redis' `now`.
    Touched(DateTime<Utc>),
    /// Unknown to this caller, or stopped, replaced or expired.
    Unknown,
    /// Ended by a newer start under `evict_oldest`.
    Evicted,
    /// Redis keeps no trace of it (it started while Redis was unreachable,
    /// or Redis lost its data); nothing was written.
    Untraced,
    /// Untraced, and recording it again would exceed the limit: the
    /// sessions holding the slots. Nothing was changed.
    Full(Vec<LiveSession>),
}

#[derive(Debug, PartialEq, Eq)]
pub enum EndOutcome {
    Ended,
    /// It had been evicted already; a final position was still recorded.
    WasEvicted,
    /// Redis kept no trace of it; the final position was still recorded.
    Untraced,
    Unknown,
}

/// How much a heartbeat or stop may do with an id Redis has no trace of.
#[derive(Debug, Clone, Copy)]
pub enum Untraced {
    /// The id's MAC did not prove it ours: only a session Redis knows counts.
    Refuse,
    /// Ours: a stop ends it and records its position; a heartbeat reports it.
    Report,
    /// Ours: a heartbeat records it again within this limit.
    Record { max_streams: u32 },
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

/// `{code, now, id1, info1, …}` refusals: the sessions holding the slots.
fn holders(rest: &[Value]) -> Vec<LiveSession> {
    rest.chunks(2)
        .filter_map(|pair| live_session(text(pair.first())?, &text(pair.get(1))?, None))
        .collect()
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

    /// Redis' clock as this instance estimates it: the stamp of positions
    /// acknowledged while Redis is unreachable.
    pub fn clock_now(&self) -> DateTime<Utc> {
        self.redis.clock().now()
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
            .key(keys.ended())
            .arg(self.ttl_ms())
            .arg(req.max_streams)
            .arg(req.session_id.as_str())
            .arg(req.device_id.as_str())
            .arg(req.content_id.as_str())
            .arg(if req.evict_oldest { "1" } else { "0" })
            .arg(self.key_lifetime_ms());
        let reply = self.invoke(call).await?;
        let now = millis_to_utc(int(reply.get(1)));
        let rest = reply.get(2..).unwrap_or_default();
        if int(reply.first()) == 1 {
            let evicted = rest
                .iter()
                .filter_map(|id| SessionId::parse(text(Some(id))?).ok())
                .collect();
            return Ok(StartOutcome::Started { now, evicted });
        }
        Ok(StartOutcome::Full(holders(rest)))
    }

    fn key_lifetime_ms(&self) -> u64 {
        (self.ttl * 2).max(SESSION_MEMORY).as_millis() as u64
    }

    /// Runs a session script; its `now` (reply item 1) keeps this instance's
    /// estimate of Redis' clock current.
    async fn invoke(&self, call: redis::ScriptInvocation<'_>) -> Result<Vec<Value>, DependencyError> {
        let reply: Vec<Value> = self
            .redis
            .run(|mut c| async move { call.invoke_async(&mut c).await })
            .await?;
        self.redis.clock().observe(int(reply.get(1)));
        Ok(reply)
    }

    /// Redis' time after which a write sent now is no longer awaited, or ''.
    fn deadline(&self) -> String {
        self.redis
            .clock()
            .deadline(self.redis.guard().timeout())
            .map(|ms| ms.to_string())
            .unwrap_or_default()
    }

    /// A write the script skipped because its caller had given up waiting:
    /// the caller's answer (from memory) stands, as for a timeout.
    fn too_late() -> DependencyError {
        DependencyError::Timeout("redis")
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
            .key(keys.devices())
            .key(keys.ended())
            .key(keys.positions());
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
        untraced: Untraced,
    ) -> Result<TouchOutcome, DependencyError> {
        let content = session_id.content_id();
        let mut call = self.writing_call(&HEARTBEAT, user);
        let rejoin = match untraced {
            Untraced::Record { max_streams } => max_streams.to_string(),
            Untraced::Refuse | Untraced::Report => String::new(),
        };
        call.arg(self.ttl_ms())
            .arg(session_id.as_str())
            .arg(position.get())
            .arg(POSITION_TTL_S)
            .arg(user.as_str())
            .arg(content.as_str())
            .arg(self.deadline())
            .arg(rejoin)
            .arg(self.key_lifetime_ms())
            .arg(UNKNOWN_DEVICE);
        let reply = self.invoke(call).await?;
        let now = millis_to_utc(int(reply.get(1)));
        Ok(match int(reply.first()) {
            1 => {
                self.append_in_cluster(user, content, position, now, false)
                    .await?;
                TouchOutcome::Touched(now)
            }
            -1 => TouchOutcome::Evicted,
            2 if !matches!(untraced, Untraced::Refuse) => TouchOutcome::Untraced,
            3 => TouchOutcome::Full(holders(reply.get(2..).unwrap_or_default())),
            4 => return Err(Self::too_late()),
            _ => TouchOutcome::Unknown,
        })
    }

    /// Cluster mode: the log lives in another slot than the user's keys, so
    /// the entry the script could not write is a second command.
    async fn append_in_cluster(
        &self,
        user: &UserId,
        content: ContentId,
        position: PositionMs,
        now: DateTime<Utc>,
        completed: bool,
    ) -> Result<(), DependencyError> {
        if !self.redis.is_cluster() {
            return Ok(());
        }
        let item = ProgressItem {
            user_id: user.clone(),
            content_id: content,
            position_ms: position,
            updated_at: now,
            completed,
        };
        self.redis
            .progress_log()
            .append_all(std::slice::from_ref(&item))
            .await
    }

    /// Ends a session at once, freeing its slot; records a final position
    /// (and, `completed`, that the title was watched to the end).
    pub async fn end(
        &self,
        user: &UserId,
        session_id: &SessionId,
        position: Option<PositionMs>,
        completed: bool,
        untraced: Untraced,
    ) -> Result<EndOutcome, DependencyError> {
        let content = session_id.content_id();
        let mut call = self.writing_call(&STOP, user);
        call.arg(session_id.as_str())
            .arg(position.map(|p| p.get().to_string()).unwrap_or_default())
            .arg(POSITION_TTL_S)
            .arg(user.as_str())
            .arg(content.as_str())
            .arg(if completed { "1" } else { "0" })
            .arg(self.deadline())
            .arg(if matches!(untraced, Untraced::Refuse) {
                "0"
            } else {
                "1"
            })
            .arg(self.key_lifetime_ms());
        let reply = self.invoke(call).await?;
        let outcome = match int(reply.first()) {
            1 => EndOutcome::Ended,
            2 => EndOutcome::WasEvicted,
            3 => EndOutcome::Untraced,
            4 => return Err(Self::too_late()),
            _ => return Ok(EndOutcome::Unknown),
        };
        let recorded = text(reply.get(2))
            .and_then(|p| p.parse().ok())
            .and_then(|p| PositionMs::new(p).ok());
        if let Some(position) = recorded {
            let now = millis_to_utc(int(reply.get(1)));
            self.append_in_cluster(user, content, position, now, completed)
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
        self.redis.clock().observe(int(reply.first()));
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

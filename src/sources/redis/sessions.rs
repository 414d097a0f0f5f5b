//! Playback sessions and the concurrent-stream limit, as atomic scripts on
//! one user's keys (one cluster slot). The limit rule itself lives in
//! `scripts/start.lua`; this file turns replies into typed outcomes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use redis::{Cmd, ErrorKind, RedisResult, Script, ServerErrorKind, Value};

use super::keys::UserKeys;
use super::{Conn, On, RedisStore, millis_to_utc};
use crate::model::{ContentId, DeviceId, LiveSession, PositionMs, SessionId, UserId};
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
static STATE: LazyLock<Script> = session_script!("state.lua");
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
    /// Recorded by the primary at Redis' `now`, but fewer replicas than
    /// `MONETA_REDIS_MIN_REPLICAS_ACKED` acknowledged it in time: a failover
    /// could still lose it.
    Unreplicated(DateTime<Utc>),
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
    /// Ended (or recorded) by the primary, but fewer replicas than
    /// `MONETA_REDIS_MIN_REPLICAS_ACKED` acknowledged it in time.
    Unreplicated,
    Unknown,
}

/// Where a session stands, judged on Redis' clock, without changing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    /// A heartbeat within the session TTL.
    Live,
    /// Ended by a newer start under `evict_oldest`.
    Evicted,
    /// Stopped, replaced by the same device, or silent past the TTL.
    Ended,
    /// Redis keeps no trace of it (it started while Redis was unreachable,
    /// Redis lost its data, or it ended too long ago to be remembered).
    Untraced,
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
    /// Where the heartbeat and the stop script were loaded.
    loaded: Arc<[Preloaded; 2]>,
}

/// Whether a script whose writes wait for replicas is on every primary:
/// a `WAIT` after an `EVALSHA` answered `NOSCRIPT` still blocks (for the
/// connection's earlier writes), so such a script is loaded before a call
/// rather than after a refusal.
#[derive(Default)]
struct Preloaded {
    /// 1 + the count of topology changes seen when it was loaded on every
    /// primary (0: never): a replica promoted since has none of it.
    everywhere: AtomicU64,
    /// A load on every primary is under way.
    spreading: AtomicBool,
}

impl Preloaded {
    /// Loads `script` where `conn`'s call goes, at once, and, in a cluster,
    /// on every primary in the background (one load at a time, until one
    /// succeeds): loading it on every primary before the call would have
    /// the call wait for a primary that hangs.
    async fn ensure(
        this: &Arc<[Preloaded; 2]>,
        at: usize,
        topology_changes: u64,
        script: &'static Script,
        conn: &mut Conn,
    ) -> RedisResult<()> {
        let Some(preloaded) = this.get(at) else {
            return Ok(());
        };
        let current = topology_changes.wrapping_add(1);
        if preloaded.everywhere.load(Ordering::Relaxed) == current {
            return Ok(());
        }
        script.load_async(conn).await?;
        let Conn::Cluster(cluster, _) = conn else {
            preloaded.everywhere.store(current, Ordering::Relaxed);
            return Ok(());
        };
        if preloaded.spreading.swap(true, Ordering::Relaxed) {
            return Ok(());
        }
        let (this, mut everywhere) = (this.clone(), Conn::Cluster(cluster.clone(), None));
        tokio::spawn(async move {
            // Bounded by the connection's response timeout.
            let loaded = script.load_async(&mut everywhere).await.is_ok();
            if let Some(preloaded) = this.get(at) {
                if loaded {
                    preloaded.everywhere.store(current, Ordering::Relaxed);
                }
                preloaded.spreading.store(false, Ordering::Relaxed);
            }
        });
        Ok(())
    }
}

/// A script argument that may be absent: the scripts read `''` as "none".
/// Numbers go as they are (the client writes their digits in place), not
/// through a `String` each.
fn arg_or_empty(call: &mut Cmd, value: Option<impl redis::ToSingleRedisArg>) {
    match value {
        Some(value) => call.arg(value),
        None => call.arg(""),
    };
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

/// How long `WAIT` may block: half the Redis timeout, so the script before
/// it and the round trip keep the other half (never 0, which blocks forever).
fn wait_ms(timeout: Duration) -> u64 {
    (timeout.as_millis() as u64 / 2).max(1)
}

/// Sends `pipe` (a script's `EVALSHA`, maybe `WAIT`, errors kept per
/// command); a script Redis does not know (restarted, failed over to a
/// replica that never loaded it) is loaded and the pipeline sent once more.
/// Returns the script's reply and `WAIT`'s count.
async fn script_then_wait(
    conn: &mut Conn,
    script: &Script,
    pipe: &redis::Pipeline,
) -> RedisResult<(Vec<Value>, Option<i64>)> {
    let mut loaded = false;
    loop {
        let replies: Vec<Value> = pipe.query_async(conn).await?;
        let mut replies = replies.into_iter();
        let reply = replies
            .next()
            .ok_or_else(|| redis::RedisError::from((ErrorKind::UnexpectedReturnType, "no script reply")))?;
        let acked = replies
            .next()
            .and_then(|v| redis::from_redis_value_ref::<i64>(&v).ok());
        match reply.extract_error() {
            Err(e) if !loaded && e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                script.load_async(conn).await?;
                loaded = true;
            }
            Err(e) => return Err(e),
            Ok(reply) => return Ok((redis::from_redis_value(reply)?, acked)),
        }
    }
}

/// Sends a script's `EVALSHA` alone; a script Redis does not know is loaded
/// and the call sent once more.
async fn script_alone(conn: &mut Conn, script: &Script, call: &Cmd) -> RedisResult<Vec<Value>> {
    let mut loaded = false;
    loop {
        match call.query_async(conn).await {
            Err(e) if !loaded && e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                script.load_async(conn).await?;
                loaded = true;
            }
            reply => return reply,
        }
    }
}

impl RedisStore {
    pub fn sessions(&self, ttl: Duration) -> SessionStore {
        SessionStore {
            redis: self.clone(),
            ttl,
            loaded: Arc::default(),
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

    /// What a position acknowledged now is stamped with.
    pub fn stamp(&self) -> super::Stamp {
        self.redis.clock().stamp()
    }

    /// See [`RedisStore::measure_clock`].
    pub async fn measure_clock(&self) -> Result<(), DependencyError> {
        self.redis.measure_clock().await
    }

    /// Redis' clock as this instance estimates it, once it has measured it.
    pub fn measured_now(&self) -> Option<DateTime<Utc>> {
        self.redis.clock().measured_now()
    }

    /// When a session seen at `last_ms` stops counting.
    pub fn expiry(&self, last: DateTime<Utc>) -> DateTime<Utc> {
        last + self.ttl
    }

    pub async fn start(&self, req: StartRequest<'_>) -> Result<StartOutcome, DependencyError> {
        let keys = self.redis.user_keys(req.user);
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
            .arg(
                (self.redis.clock())
                    .deadline(self.redis.guard().timeout())
                    .map(|ms| ms.to_string())
                    .unwrap_or_default(),
            );
        let reply = self.invoke(&keys, call).await?;
        let now = millis_to_utc(int(reply.get(1)));
        let rest = reply.get(2..).unwrap_or_default();
        if int(reply.first()) == 4 {
            return Err(Self::too_late());
        }
        if int(reply.first()) == 1 {
            let evicted = rest
                .iter()
                .filter_map(|id| SessionId::parse(text(Some(id))?).ok())
                .collect();
            return Ok(StartOutcome::Started { now, evicted });
        }
        Ok(StartOutcome::Full(holders(rest)))
    }

    /// Runs a session script; its `now` (reply item 1) keeps this instance's
    /// estimate of Redis' clock current.
    async fn invoke(
        &self,
        keys: &UserKeys,
        call: redis::ScriptInvocation<'_>,
    ) -> Result<Vec<Value>, DependencyError> {
        let reply: Vec<Value> = self
            .redis
            .run(On::Bucket(keys.bucket()), |mut c| async move {
                call.invoke_async(&mut c).await
            })
            .await?;
        self.redis.clock().observe(int(reply.get(1)));
        Ok(reply)
    }

    /// Redis' time after which a write sent now is no longer awaited, `None`
    /// before the offset to Redis' clock was measured.
    /// A write that has to wait for replicas is skipped earlier: it must
    /// leave its `WAIT` room within the caller's patience.
    fn deadline(&self) -> Option<i64> {
        let timeout = self.redis.guard().timeout();
        let budget = match self.replicas_wait() {
            Some((_, wait_ms)) => timeout.saturating_sub(Duration::from_millis(wait_ms)),
            None => timeout,
        };
        self.redis.clock().deadline(budget)
    }

    /// `WAIT`'s arguments when writes must reach replicas.
    fn replicas_wait(&self) -> Option<(u32, u64)> {
        let replicas = self.redis.min_replicas_acked;
        (replicas > 0).then(|| (replicas, wait_ms(self.redis.guard().timeout())))
    }

    /// Runs a heartbeat or stop script, followed in the same pipeline by
    /// `WAIT` when writes must reach replicas. The pipeline goes to one node
    /// in cluster mode too: the cluster client routes a pipeline by its
    /// keyed commands, and `WAIT` has no key. `WAIT` counts the replicas
    /// holding everything this connection wrote before it, so the script's
    /// writes. Returns the script's reply and whether the replicas hold it
    /// (always so without `WAIT`).
    async fn invoke_written(
        &self,
        keys: &UserKeys,
        script: &'static Script,
        loaded: usize,
        call: Cmd,
    ) -> Result<(Vec<Value>, bool), DependencyError> {
        let replicas = self.replicas_wait();
        let Some((n, wait_ms)) = replicas else {
            // Alone, not as a pipeline of one: the shared connection's
            // client-side cache copies and resolves every pipeline (~2 k
            // instructions a heartbeat) but lets a single uncacheable
            // command through untouched.
            let reply = self
                .redis
                .run_waiting(On::Bucket(keys.bucket()), |mut c| async move {
                    script_alone(&mut c, script, &call).await
                })
                .await?;
            self.redis.clock().observe(int(reply.get(1)));
            return Ok((reply, true));
        };
        let mut pipe = redis::pipe();
        pipe.add_command(call).ignore_errors();
        pipe.cmd("WAIT").arg(n).arg(wait_ms);
        let (reply, acked) = self
            .redis
            .run_waiting(On::Bucket(keys.bucket()), |mut c| async move {
                let topology_changes = self.redis.outages.topology_changes();
                Preloaded::ensure(&self.loaded, loaded, topology_changes, script, &mut c).await?;
                script_then_wait(&mut c, script, &pipe).await
            })
            .await?;
        // The clock is not observed here: a reply that waited for replicas
        // arrives late by that wait, and its `now` would set the estimate
        // back by as much.
        Ok((reply, acked.is_some_and(|acked| acked >= i64::from(n))))
    }

    /// A write the script skipped because its caller had given up waiting:
    /// the caller's answer (from memory) stands, as for a timeout.
    fn too_late() -> DependencyError {
        DependencyError::Timeout("redis")
    }

    /// Keeps a session alive and records its position, durably: once this
    /// returns `Touched`, the position reaches the internal API even if this
    /// instance dies. Without a position (a licence request recording a
    /// session Redis lost), only the session.
    pub async fn touch(
        &self,
        user: &UserId,
        session_id: &SessionId,
        position: Option<PositionMs>,
        untraced: Untraced,
    ) -> Result<TouchOutcome, DependencyError> {
        let content = session_id.content_str();
        let keys = self.redis.user_keys(user);
        let mut call = keys.session_script_call(HEARTBEAT.get_hash());
        let rejoin = match untraced {
            Untraced::Record { max_streams } => Some(max_streams),
            Untraced::Refuse | Untraced::Report => None,
        };
        call.arg(self.ttl_ms()).arg(session_id.as_str());
        arg_or_empty(&mut call, position.map(PositionMs::get));
        call.arg(user.as_str()).arg(content);
        arg_or_empty(&mut call, self.deadline());
        arg_or_empty(&mut call, rejoin);
        call.arg(session_id.device_str().unwrap_or_default());
        let (reply, held) = self.invoke_written(&keys, &HEARTBEAT, 0, call).await?;
        if position.is_some() {
            self.redis.written_positions(&keys);
        }
        let now = millis_to_utc(int(reply.get(1)));
        Ok(match int(reply.first()) {
            1 if held => TouchOutcome::Touched(now),
            1 => TouchOutcome::Unreplicated(now),
            -1 => TouchOutcome::Evicted,
            2 if !matches!(untraced, Untraced::Refuse) => TouchOutcome::Untraced,
            3 => TouchOutcome::Full(holders(reply.get(2..).unwrap_or_default())),
            4 => return Err(Self::too_late()),
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
        untraced: Untraced,
    ) -> Result<EndOutcome, DependencyError> {
        let content = session_id.content_str();
        let keys = self.redis.user_keys(user);
        let mut call = keys.session_script_call(STOP.get_hash());
        call.arg(self.ttl_ms()).arg(session_id.as_str());
        arg_or_empty(&mut call, position.map(PositionMs::get));
        call.arg(user.as_str())
            .arg(content)
            .arg(if completed { "1" } else { "0" });
        arg_or_empty(&mut call, self.deadline());
        call.arg(if matches!(untraced, Untraced::Refuse) {
            "0"
        } else {
            "1"
        });
        let (reply, held) = self.invoke_written(&keys, &STOP, 1, call).await?;
        if position.is_some() {
            self.redis.written_positions(&keys);
        }
        Ok(match int(reply.first()) {
            1..=3 if !held => EndOutcome::Unreplicated,
            1 => EndOutcome::Ended,
            2 => EndOutcome::WasEvicted,
            3 => EndOutcome::Untraced,
            4 => return Err(Self::too_late()),
            _ => EndOutcome::Unknown,
        })
    }

    /// Where `session_id` of `user` stands: one read-only script, on the
    /// user's keys alone (one cluster slot).
    pub async fn state(
        &self,
        user: &UserId,
        session_id: &SessionId,
    ) -> Result<SessionState, DependencyError> {
        let keys = self.redis.user_keys(user);
        let mut call = STATE.prepare_invoke();
        call.key(keys.sessions())
            .key(keys.session_info())
            .key(keys.devices())
            .key(keys.ended())
            .arg(self.ttl_ms())
            .arg(session_id.as_str());
        let reply = self.invoke(&keys, call).await?;
        Ok(match int(reply.first()) {
            1 => SessionState::Live,
            -1 => SessionState::Evicted,
            2 => SessionState::Untraced,
            _ => SessionState::Ended,
        })
    }

    pub async fn list(&self, user: &UserId) -> Result<LiveList, DependencyError> {
        let keys = self.redis.user_keys(user);
        let mut call = LIST.prepare_invoke();
        call.key(keys.sessions())
            .key(keys.session_info())
            .arg(self.ttl_ms());
        let reply: Vec<Value> = self
            .redis
            .run(On::Bucket(keys.bucket()), |mut c| async move {
                call.invoke_async(&mut c).await
            })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_leaves_half_the_redis_timeout_and_never_blocks_forever() {
        assert_eq!(wait_ms(Duration::from_millis(250)), 125);
        assert_eq!(wait_ms(Duration::from_millis(2_000)), 1_000);
        // `WAIT n 0` would block until the replicas answer, however long.
        assert_eq!(wait_ms(Duration::from_millis(1)), 1);
    }

    /// The session scripts carry the positions' lifetime in their text (an
    /// argument cost Redis a string and a number conversion per heartbeat);
    /// the hash's other writers pass `POSITION_TTL_S`, and the session
    /// scripts' renewal-when-low rests on no writer giving the hash more.
    #[test]
    fn the_session_scripts_give_positions_the_lifetime_the_other_writers_give() {
        let lib = include_str!("scripts/session_lib.lua");
        let line = format!("\nlocal POSITION_TTL_S = {}\n", super::super::POSITION_TTL_S);
        assert!(lib.contains(&line), "session_lib.lua lacks `{}`", line.trim());
    }
}

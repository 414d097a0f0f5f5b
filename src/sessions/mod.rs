//! Playback sessions and the concurrent-stream limit.
//!
//! The limit rule lives in `scripts/start.lua`: counting live sessions,
//! replacing the same device's session and adding the new one happen in one
//! atomic script, so simultaneous starts by one user never exceed the limit.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};
use redis::{Script, Value};

use crate::auth::Claims;
use crate::playback::model::PlaybackInfo;
use crate::playback::{Playback, PlaybackError};
use crate::progress::ProgressQueue;
use crate::resilience::DependencyError;
use crate::sources::CallContext;
use crate::sources::redis::keys::UserKeys;
use crate::sources::redis::position_ttl_s;

static START: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/start.lua")));
static HEARTBEAT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/heartbeat.lua")));
static STOP: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/stop.lua")));

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveSession {
    pub session_id: String,
    pub device_id: String,
    pub content_id: String,
    pub expires_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum SessionError {
    #[error("no such session")]
    NotFound,
    #[error("the concurrent-stream limit is reached")]
    LimitReached {
        max_streams: u32,
        active: Vec<LiveSession>,
    },
    #[error(transparent)]
    Playback(#[from] PlaybackError),
}

pub struct Started {
    pub session_id: String,
    pub expires_at: DateTime<Utc>,
    pub playback: PlaybackInfo,
}

/// A session id names its title (`<random>.<content_id>`), so heartbeats can
/// still route positions to the right title while Redis is down.
pub fn new_session_id(content_id: &str) -> String {
    format!("{}.{}", uuid::Uuid::new_v4().simple(), content_id)
}

/// The title of a well-formed session id.
pub fn session_content(session_id: &str) -> Option<&str> {
    let (random, content) = session_id.split_once('.')?;
    let ok = random.len() == 32
        && random.bytes().all(|b| b.is_ascii_hexdigit())
        && crate::http::validate::is_content_id(content);
    ok.then_some(content)
}

fn parse_info(info: &str) -> (String, String) {
    match info.split_once(' ') {
        Some((device, content)) => (device.to_owned(), content.to_owned()),
        None => (info.to_owned(), String::new()),
    }
}

fn now() -> (u64, DateTime<Utc>) {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    (ms, DateTime::from_timestamp_millis(ms as i64).unwrap_or_default())
}

fn expiry(last_heartbeat_ms: u64, ttl: Duration) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_millis((last_heartbeat_ms + ttl.as_millis() as u64) as i64)
}

/// Session ids with their last heartbeat (ms, as Redis returns scores).
type LiveScores = Vec<(String, f64)>;

/// A script's verdict on a session: unknown is `NotFound`; with Redis down the
/// call is accepted unchecked (and counted), so playback is never refused for it.
fn known_or_unchecked(
    result: Result<Option<String>, DependencyError>,
    kind: &'static str,
) -> Result<(), SessionError> {
    match result {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(SessionError::NotFound),
        Err(_) => {
            metrics::counter!("moneta_fallbacks_total", "dependency" => "redis", "kind" => kind).increment(1);
            Ok(())
        }
    }
}

pub struct Sessions {
    playback: Arc<Playback>,
    progress: Arc<ProgressQueue>,
    ttl: Duration,
}

impl Sessions {
    pub fn new(playback: Arc<Playback>, progress: Arc<ProgressQueue>, ttl: Duration) -> Self {
        Self {
            playback,
            progress,
            ttl,
        }
    }

    fn ttl_ms(&self) -> u64 {
        self.ttl.as_millis() as u64
    }

    /// Authorizes the title, then takes a stream slot. With Redis down the
    /// limit cannot be counted, so the start is allowed and marked degraded.
    pub async fn start(
        &self,
        claims: &Claims,
        content_id: &str,
        device_id: &str,
        ctx: &CallContext,
    ) -> Result<Started, SessionError> {
        let authorized = self.playback.authorize(claims, content_id, ctx).await?;
        let max_streams = authorized.entitlement.value.max_streams;
        let session_id = new_session_id(content_id);
        let (now_ms, _) = now();
        let keys = UserKeys::new(&claims.sub);
        let ttl_ms = self.ttl_ms();
        let result = self
            .playback
            .redis()
            .run(|mut c| {
                let mut call = START.prepare_invoke();
                call.key(keys.sessions())
                    .key(keys.session_info())
                    .key(keys.devices())
                    .arg(now_ms)
                    .arg(ttl_ms)
                    .arg(max_streams)
                    .arg(&session_id)
                    .arg(device_id)
                    .arg(content_id);
                async move { call.invoke_async::<Vec<Value>>(&mut c).await }
            })
            .await;
        let mut playback = self.playback.assemble(&authorized);
        match result {
            Ok(reply) => {
                if redis::from_redis_value_ref::<i64>(reply.first().unwrap_or(&Value::Nil)).unwrap_or(0) != 1
                {
                    let active = reply[1..]
                        .chunks(2)
                        .filter_map(|pair| {
                            let id: String = redis::from_redis_value_ref(pair.first()?).ok()?;
                            let info: String = redis::from_redis_value_ref(pair.get(1)?).ok()?;
                            let (device_id, content_id) = parse_info(&info);
                            Some(LiveSession {
                                session_id: id,
                                device_id,
                                content_id,
                                expires_at: None,
                            })
                        })
                        .collect();
                    metrics::counter!("moneta_stream_limit_rejections_total").increment(1);
                    return Err(SessionError::LimitReached { max_streams, active });
                }
            }
            Err(_) => {
                metrics::counter!("moneta_fallbacks_total", "dependency" => "redis", "kind" => "stream_limit_open")
                    .increment(1);
                playback.degraded = true;
            }
        }
        Ok(Started {
            session_id,
            expires_at: expiry(now_ms, self.ttl).unwrap_or_default(),
            playback,
        })
    }

    /// Runs the heartbeat or stop script on one user's session keys; the
    /// position TTL is always the last argument. Returns the session's info,
    /// `None` when the session is unknown.
    async fn session_script(
        &self,
        script: &Script,
        user: &str,
        args: &[String],
    ) -> Result<Option<String>, DependencyError> {
        let keys = UserKeys::new(user);
        self.playback
            .redis()
            .run(|mut c| {
                let mut call = script.prepare_invoke();
                call.key(keys.sessions())
                    .key(keys.session_info())
                    .key(keys.positions())
                    .key(keys.devices());
                for arg in args {
                    call.arg(arg);
                }
                call.arg(position_ttl_s());
                async move { call.invoke_async::<Option<String>>(&mut c).await }
            })
            .await
    }

    /// Keeps a session alive and records its position (Redis at once, the
    /// internal API through the write-behind queue).
    pub async fn heartbeat(
        &self,
        claims: &Claims,
        session_id: &str,
        position_ms: u64,
    ) -> Result<DateTime<Utc>, SessionError> {
        let content_id = session_content(session_id).ok_or(SessionError::NotFound)?;
        let (now_ms, at) = now();
        let args = [
            now_ms.to_string(),
            self.ttl_ms().to_string(),
            session_id.to_owned(),
            position_ms.to_string(),
        ];
        let result = self.session_script(&HEARTBEAT, &claims.sub, &args).await;
        known_or_unchecked(result, "heartbeat_unchecked")?;
        self.progress.record(&claims.sub, content_id, position_ms, at);
        Ok(expiry(now_ms, self.ttl).unwrap_or_default())
    }

    /// Ends a session at once, freeing its slot.
    pub async fn stop(
        &self,
        claims: &Claims,
        session_id: &str,
        position_ms: Option<u64>,
    ) -> Result<(), SessionError> {
        let content_id = session_content(session_id).ok_or(SessionError::NotFound)?;
        let (_, at) = now();
        let position_arg = position_ms.map(|p| p.to_string()).unwrap_or_default();
        let result = self
            .session_script(&STOP, &claims.sub, &[session_id.to_owned(), position_arg])
            .await;
        known_or_unchecked(result, "stop_unchecked")?;
        if let Some(p) = position_ms {
            self.progress.record(&claims.sub, content_id, p, at);
        }
        Ok(())
    }

    /// The caller's live sessions; `None` while Redis cannot be asked.
    pub async fn list(&self, claims: &Claims) -> Option<Vec<LiveSession>> {
        let (now_ms, _) = now();
        let keys = UserKeys::new(&claims.sub);
        let min = now_ms.saturating_sub(self.ttl_ms()) + 1;
        let reply: Result<(LiveScores, HashMap<String, String>), _> = self
            .playback
            .redis()
            .run(|mut c| async move {
                redis::pipe()
                    .cmd("ZRANGEBYSCORE")
                    .arg(keys.sessions())
                    .arg(min)
                    .arg("+inf")
                    .arg("WITHSCORES")
                    .cmd("HGETALL")
                    .arg(keys.session_info())
                    .query_async(&mut c)
                    .await
            })
            .await;
        let (live, infos) = reply.ok()?;
        Some(
            live.into_iter()
                .filter_map(|(id, last)| {
                    let (device_id, content_id) = parse_info(infos.get(&id)?);
                    Some(LiveSession {
                        session_id: id,
                        device_id,
                        content_id,
                        expires_at: expiry(last as u64, self.ttl),
                    })
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_carry_their_title() {
        let id = new_session_id("m-0001");
        assert_eq!(session_content(&id), Some("m-0001"));
        assert_eq!(session_content("nope"), None);
        assert_eq!(session_content("0123.m-1"), None);
        assert_eq!(session_content(&format!("{}.bad/id", "a".repeat(32))), None);
    }
}

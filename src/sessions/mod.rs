//! Playback sessions: who may start one (the playback checks, then the
//! concurrent-stream limit, whose rule is the atomic `start.lua` in
//! `sources/redis/scripts/`), heartbeats that carry positions, and stops.
//!
//! Degraded operation: while Redis is unreachable, starts are allowed
//! uncounted, and heartbeats and stops are accepted with their positions kept
//! in memory for the internal API. A full Redis bulkhead is Moneta's own
//! overload, not an outage, and answers `503` instead.

mod ids;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

pub use ids::{SessionKey, SessionKeyError};

use crate::auth::Claims;
use crate::model::{ContentId, DeviceId, LiveSession, PlaybackInfo, PositionMs, ProgressItem, SessionId};
use crate::playback::{Audience, Playback, PlaybackError};
use crate::progress::ProgressQueue;
use crate::resilience::DependencyError;
use crate::sources::CallContext;
use crate::sources::redis::{EndOutcome, SessionStore, StartOutcome, StartRequest, TouchOutcome};

#[derive(Debug, Clone, thiserror::Error)]
pub enum SessionError {
    #[error("no such session")]
    NotFound,
    #[error("playback moved to another device")]
    Evicted,
    #[error("the concurrent-stream limit is reached")]
    LimitReached {
        max_streams: u32,
        active: Vec<LiveSession>,
    },
    /// Moneta's own Redis bulkhead is full: nothing was changed, try again.
    #[error("too busy to count streams; try again")]
    Busy,
    #[error("internal error")]
    Internal,
    #[error(transparent)]
    Playback(#[from] PlaybackError),
}

pub struct Started {
    pub session_id: SessionId,
    pub expires_at: DateTime<Utc>,
    pub playback: PlaybackInfo,
    /// The session ended to make room (`evict_oldest`).
    pub evicted: Option<SessionId>,
}

fn fallback(kind: &'static str) {
    metrics::counter!("moneta_fallbacks_total", "dependency" => "redis", "kind" => kind).increment(1);
}

pub struct Sessions {
    playback: Arc<Playback>,
    store: SessionStore,
    key: SessionKey,
    /// Positions acknowledged while Redis was unreachable.
    unlogged: Arc<ProgressQueue>,
    ttl: Duration,
    evict_oldest: bool,
}

impl Sessions {
    pub fn new(
        playback: Arc<Playback>,
        store: SessionStore,
        key: SessionKey,
        unlogged: Arc<ProgressQueue>,
        ttl: Duration,
        evict_oldest: bool,
    ) -> Self {
        Self {
            playback,
            store,
            key,
            unlogged,
            ttl,
            evict_oldest,
        }
    }

    /// Authorizes the title, then takes a stream slot.
    pub async fn start(
        &self,
        claims: &Claims,
        content_id: &ContentId,
        device_id: &DeviceId,
        ctx: &CallContext,
    ) -> Result<Started, SessionError> {
        let authorized = self.playback.authorize(claims, content_id, ctx).await?;
        let max_streams = authorized.entitlement.value.max_streams;
        let session_id = self
            .key
            .issue(&claims.sub, content_id)
            .map_err(|_| SessionError::Internal)?;
        let outcome = self
            .store
            .start(StartRequest {
                user: &claims.sub,
                session_id: &session_id,
                device_id,
                content_id,
                max_streams,
                evict_oldest: self.evict_oldest,
            })
            .await;
        let audience = Audience {
            claims,
            session_id: Some(&session_id),
        };
        let mut playback = self.playback.assemble(&authorized, &audience);
        let (now, evicted) = match outcome {
            Ok(StartOutcome::Started { now, evicted }) => (now, evicted),
            Ok(StartOutcome::Full(active)) => {
                metrics::counter!("moneta_stream_limit_rejections_total").increment(1);
                return Err(SessionError::LimitReached { max_streams, active });
            }
            Err(DependencyError::Saturated(_)) => return Err(SessionError::Busy),
            Err(_) => {
                // Redis unreachable: the limit cannot be counted; playback goes on.
                fallback("stream_limit_open");
                playback.degraded = true;
                (Utc::now(), None)
            }
        };
        if evicted.is_some() {
            metrics::counter!("moneta_stream_limit_evictions_total").increment(1);
        }
        Ok(Started {
            session_id,
            expires_at: self.store.expiry(now),
            playback,
            evicted,
        })
    }

    /// The caller's own session, or `NotFound` before anything is asked.
    fn verified(&self, claims: &Claims, session_id: &SessionId) -> Result<(), SessionError> {
        if self.key.verify(&claims.sub, session_id) {
            Ok(())
        } else {
            Err(SessionError::NotFound)
        }
    }

    /// With Redis unreachable the position is kept in memory, delivered
    /// from there (it is the only kind of position a crash can lose).
    fn keep_unlogged(
        &self,
        claims: &Claims,
        session_id: &SessionId,
        position: PositionMs,
        completed: bool,
        kind: &'static str,
    ) {
        fallback(kind);
        self.unlogged.record(ProgressItem {
            user_id: claims.sub.clone(),
            content_id: session_id.content_id(),
            position_ms: position,
            updated_at: Utc::now(),
            completed,
        });
    }

    /// Keeps a session alive and records its position, durably, before answering.
    pub async fn heartbeat(
        &self,
        claims: &Claims,
        session_id: &SessionId,
        position: PositionMs,
    ) -> Result<DateTime<Utc>, SessionError> {
        self.verified(claims, session_id)?;
        match self.store.touch(&claims.sub, session_id, position).await {
            Ok(TouchOutcome::Touched(now)) => Ok(self.store.expiry(now)),
            Ok(TouchOutcome::Unknown) => Err(SessionError::NotFound),
            Ok(TouchOutcome::Evicted) => Err(SessionError::Evicted),
            Err(DependencyError::Saturated(_)) => Err(SessionError::Busy),
            Err(_) => {
                self.keep_unlogged(claims, session_id, position, false, "heartbeat_unchecked");
                Ok(Utc::now() + self.ttl)
            }
        }
    }

    /// Ends a session at once, freeing its slot; `completed`: the title was
    /// watched to the end.
    pub async fn stop(
        &self,
        claims: &Claims,
        session_id: &SessionId,
        position: Option<PositionMs>,
        completed: bool,
    ) -> Result<(), SessionError> {
        self.verified(claims, session_id)?;
        match self.store.end(&claims.sub, session_id, position, completed).await {
            Ok(EndOutcome::Ended | EndOutcome::WasEvicted) => Ok(()),
            Ok(EndOutcome::Unknown) => Err(SessionError::NotFound),
            Err(DependencyError::Saturated(_)) => Err(SessionError::Busy),
            Err(_) => {
                match position {
                    Some(p) => self.keep_unlogged(claims, session_id, p, completed, "stop_unchecked"),
                    None => fallback("stop_unchecked"),
                }
                Ok(())
            }
        }
    }

    /// The caller's live sessions; `None` while Redis cannot be asked.
    pub async fn list(&self, claims: &Claims) -> Option<Vec<LiveSession>> {
        self.store.list(&claims.sub).await.ok().map(|l| l.sessions)
    }
}

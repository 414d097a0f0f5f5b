//! Playback sessions: who may start one (the playback checks, then the
//! concurrent-stream limit, whose rule is the atomic `start.lua` in
//! `sources/redis/scripts/`), heartbeats that carry positions, and stops.
//!
//! Degraded operation: while Redis is unreachable, starts are allowed
//! uncounted, and heartbeats and stops are accepted with their positions kept
//! in memory for the internal API. A full Redis bulkhead is Moneta's own
//! overload, not an outage, and answers `503` instead.

mod ids;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};

pub use ids::{IssuedAt, Provenance, SessionKey, SessionKeyError};

use crate::auth::Claims;
use crate::model::{
    ContentId, DeviceId, LiveSession, PlaybackInfo, PositionMs, ProgressItem, SessionId, UserId,
};
use crate::playback::{Audience, Playback, PlaybackError};
use crate::progress::ProgressQueue;
use crate::resilience::DependencyError;
use crate::sources::CallContext;
use crate::sources::redis::{EndOutcome, SessionStore, StartOutcome, StartRequest, TouchOutcome, Untraced};
use crate::telemetry::metrics::Fallback;

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
    /// Moneta's own Redis bulkhead is full, or (Redis unreachable) the
    /// memory that holds positions is: nothing was changed, try again.
    #[error("too busy to take this now; nothing was changed, try again")]
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
    /// The sessions ended to make room (`evict_oldest`), oldest first.
    pub evicted: Vec<SessionId>,
}

/// A heartbeat taken: until when the session counts, and whether a fallback
/// took it (Redis unreachable, or its replicas did not acknowledge the write:
/// the position waits in this instance's memory).
#[derive(Debug, Clone, Copy)]
pub struct Beat {
    pub expires_at: DateTime<Utc>,
    pub degraded: bool,
}

pub struct Sessions {
    playback: Arc<Playback>,
    store: SessionStore,
    key: SessionKey,
    /// Positions acknowledged while Redis was unreachable.
    unlogged: Arc<ProgressQueue>,
    /// Sessions stopped while Redis was unreachable, ended there once it
    /// answers again ([`Sessions::end_held_stops`]).
    held_stops: Mutex<VecDeque<(UserId, SessionId)>>,
    ttl: Duration,
    evict_oldest: bool,
}

/// Stops held in memory at most: beyond this the oldest is forgotten, and
/// its session only ends when its heartbeats stop counting (the TTL).
const HELD_STOPS: usize = 10_000;

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
            held_stops: Mutex::new(VecDeque::new()),
            ttl,
            evict_oldest,
        }
    }

    /// Ends in Redis the sessions stopped while it was unreachable: the
    /// player stopped, and its stream slot must be free (and a stray
    /// heartbeat must not bring the session back) once Redis answers again.
    /// Returns at the first call Redis does not answer; what is left waits
    /// for the next round.
    pub async fn end_held_stops(&self) {
        loop {
            let Some((user, session_id)) = self
                .held_stops
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop_front()
            else {
                return;
            };
            // The position went with the stop, through memory; this only ends
            // the session (buried even where Redis lost it: the id was proven ours).
            match self
                .store
                .end(&user, &session_id, None, false, Untraced::Report)
                .await
            {
                // Answered, whatever it said: an error about this one call
                // would only be said again, and must not hold back the rest.
                Ok(_) | Err(DependencyError::Refused(..)) => {}
                Err(_) => {
                    self.held_stops
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push_front((user, session_id));
                    return;
                }
            }
        }
    }

    fn hold_stop(&self, user: &UserId, session_id: &SessionId) {
        let mut held = self.held_stops.lock().unwrap_or_else(PoisonError::into_inner);
        if held.len() >= HELD_STOPS {
            held.pop_front();
        }
        held.push_back((user.clone(), session_id.clone()));
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
        if self.store.measured_now().is_none() {
            // Only until the first measurement; boxed, as this rare call
            // would otherwise size every start's future.
            let _ = Box::pin(self.store.measure_clock()).await;
        }
        let issued_at = match self.store.measured_now() {
            Some(now) => IssuedAt::Known(now),
            None => IssuedAt::Unknown,
        };
        let issue = |at| {
            self.key
                .issue(&claims.sub, content_id, device_id, at)
                .map_err(|_| SessionError::Internal)
        };
        let mut session_id = issue(issued_at)?;
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
        let (now, evicted, degraded) = match outcome {
            Ok(StartOutcome::Started { now, evicted }) => (now, evicted, false),
            Ok(StartOutcome::Full(active)) => {
                metrics::counter!("moneta_stream_limit_rejections_total").increment(1);
                return Err(SessionError::LimitReached { max_streams, active });
            }
            Err(DependencyError::Saturated(_)) => return Err(SessionError::Busy),
            Err(_) => {
                // Redis unreachable: the limit cannot be counted; playback goes on.
                Fallback::StreamLimitOpen.count();
                if matches!(issued_at, IssuedAt::Known(_)) {
                    // Redis skips a start that arrives after its deadline
                    // (start.lua), so it never records the first id.
                    session_id = issue(IssuedAt::Unknown)?;
                }
                (self.store.clock_now(), Vec::new(), true)
            }
        };
        let audience = Audience {
            claims,
            session_id: Some(&session_id),
            max_streams: Some(max_streams),
        };
        let mut playback = self.playback.assemble(&authorized, &audience);
        playback.degraded |= degraded;
        if !evicted.is_empty() {
            metrics::counter!("moneta_stream_limit_evictions_total").increment(evicted.len() as u64);
        }
        Ok(Started {
            session_id,
            expires_at: self.store.expiry(now),
            playback,
            evicted,
        })
    }

    /// What the id's MAC proves; a forged id is `NotFound` before anything
    /// is asked.
    fn provenance(&self, claims: &Claims, session_id: &SessionId) -> Result<Provenance, SessionError> {
        match self.key.provenance(&claims.sub, session_id) {
            Provenance::Forged => Err(SessionError::NotFound),
            other => Ok(other),
        }
    }

    /// With Redis unreachable the position is kept in memory, delivered
    /// from there (it is the only kind of position a crash can lose). Only
    /// an id this instance can prove ours is accepted then, and only while
    /// the memory has room: a position is never answered and then dropped.
    fn keep_unlogged(
        &self,
        claims: &Claims,
        session_id: &SessionId,
        provenance: Provenance,
        position: Option<PositionMs>,
        completed: bool,
        kind: Fallback,
    ) -> Result<(), SessionError> {
        if provenance != Provenance::Issued {
            return Err(SessionError::NotFound);
        }
        self.keep(claims, session_id, position, completed, kind)
    }

    /// Keeps a position in memory for the internal API, as while Redis is
    /// unreachable: `keep_unlogged` once the caller is known to be entitled
    /// to it, or a write the primary took but too few replicas acknowledged
    /// (`MONETA_REDIS_MIN_REPLICAS_ACKED`), which a failover could lose.
    fn keep(
        &self,
        claims: &Claims,
        session_id: &SessionId,
        position: Option<PositionMs>,
        completed: bool,
        kind: Fallback,
    ) -> Result<(), SessionError> {
        if let Some(position) = position {
            let stamp = self.store.stamp();
            let kept = self.unlogged.record(ProgressItem {
                user_id: claims.sub.clone(),
                content_id: session_id.content_id(),
                position_ms: position,
                updated_at: stamp.at,
                completed,
                provisional: !stamp.measured,
            });
            if !kept {
                return Err(SessionError::Busy);
            }
        }
        kind.count();
        Ok(())
    }

    /// Keeps a session alive and records its position, durably, before
    /// answering. A session Moneta issued that Redis has no trace of is
    /// recorded again, within the limit.
    pub async fn heartbeat(
        &self,
        claims: &Claims,
        session_id: &SessionId,
        position: PositionMs,
        ctx: &CallContext,
    ) -> Result<Beat, SessionError> {
        let provenance = self.provenance(claims, session_id)?;
        let untraced = match provenance {
            Provenance::Issued => Untraced::Report,
            _ => Untraced::Refuse,
        };
        let mut outcome = self
            .store
            .touch(&claims.sub, session_id, Some(position), untraced)
            .await;
        if let Ok(TouchOutcome::Untraced) = outcome {
            // Boxed: this rare branch asks the internal API, whose future
            // would otherwise size every heartbeat's, and each layer of the
            // router copies that whole future once per request.
            let max_streams = Box::pin(self.playback.stream_limit(claims, ctx)).await?;
            outcome = self
                .store
                .touch(
                    &claims.sub,
                    session_id,
                    Some(position),
                    Untraced::Record { max_streams },
                )
                .await;
            match &outcome {
                Ok(TouchOutcome::Touched(_) | TouchOutcome::Unreplicated(_)) => {
                    metrics::counter!("moneta_sessions_recorded_again_total").increment(1);
                }
                Ok(TouchOutcome::Full(_)) => {
                    metrics::counter!("moneta_stream_limit_rejections_total").increment(1);
                }
                _ => {}
            }
            if let Ok(TouchOutcome::Full(active)) = outcome {
                return Err(SessionError::LimitReached { max_streams, active });
            }
        }
        match outcome {
            Ok(TouchOutcome::Touched(now)) => Ok(Beat {
                expires_at: self.store.expiry(now),
                degraded: false,
            }),
            Ok(TouchOutcome::Unreplicated(now)) => {
                self.keep(
                    claims,
                    session_id,
                    Some(position),
                    false,
                    Fallback::ReplicasUnacked,
                )?;
                Ok(Beat {
                    expires_at: self.store.expiry(now),
                    degraded: true,
                })
            }
            Ok(TouchOutcome::Evicted) => Err(SessionError::Evicted),
            Ok(_) => Err(SessionError::NotFound),
            Err(DependencyError::Saturated(_)) => Err(SessionError::Busy),
            Err(_) => {
                self.keep_unlogged(
                    claims,
                    session_id,
                    provenance,
                    Some(position),
                    false,
                    Fallback::HeartbeatUnchecked,
                )?;
                Ok(Beat {
                    expires_at: self.store.clock_now() + self.ttl,
                    degraded: true,
                })
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
        let provenance = self.provenance(claims, session_id)?;
        let untraced = match provenance {
            Provenance::Issued => Untraced::Report,
            _ => Untraced::Refuse,
        };
        match self
            .store
            .end(&claims.sub, session_id, position, completed, untraced)
            .await
        {
            Ok(EndOutcome::Ended | EndOutcome::WasEvicted | EndOutcome::Untraced) => Ok(()),
            Ok(EndOutcome::Unreplicated) => {
                self.keep(claims, session_id, position, completed, Fallback::ReplicasUnacked)
            }
            Ok(EndOutcome::Unknown) => Err(SessionError::NotFound),
            Err(DependencyError::Saturated(_)) => Err(SessionError::Busy),
            Err(_) => {
                self.keep_unlogged(
                    claims,
                    session_id,
                    provenance,
                    position,
                    completed,
                    Fallback::StopUnchecked,
                )?;
                self.hold_stop(&claims.sub, session_id);
                Ok(())
            }
        }
    }

    /// The caller's live sessions; `None` while Redis cannot be asked.
    pub async fn list(&self, claims: &Claims) -> Option<Vec<LiveSession>> {
        self.store.list(&claims.sub).await.ok().map(|l| l.sessions)
    }
}

//! The caller's entitlement and resume position: Redis (one round trip
//! together) → internal API → the JWT's claims / position 0. After a Redis
//! outage, a position Redis held from before its end is checked against the
//! internal API once (see `sources::redis::outages`).

use std::time::Duration;

use super::rules;
use super::{PlaybackError, cache_metric};
use crate::auth::Claims;
use crate::model::{ContentId, Entitlement, Origin, PositionMs, ResumePoint, Sourced, StoredPoint};
use crate::sources::CallContext;
use crate::sources::internal_api::InternalApi;
use crate::sources::redis::{CheckedPosition, LearntPosition, RedisStore, WriteBack};
use crate::telemetry::metrics::Fallback;

pub struct UserStates {
    redis: RedisStore,
    api: InternalApi,
    entitlement_ttl: Duration,
}

/// A caller's state for one title, and what Redis should learn of it once
/// the caller turns out to be allowed to play the title.
pub struct UserState {
    pub entitlement: Sourced<Entitlement>,
    pub position: Sourced<ResumePoint>,
    write_back: Option<WriteBack>,
}

impl UserStates {
    pub fn new(redis: RedisStore, api: InternalApi, entitlement_ttl: Duration) -> Self {
        Self {
            redis,
            api,
            entitlement_ttl,
        }
    }

    pub async fn get(
        &self,
        claims: &Claims,
        content_id: &ContentId,
        known_title: bool,
        ctx: &CallContext,
    ) -> Result<UserState, PlaybackError> {
        let user = &claims.sub;
        let view = match self.redis.user_view(user, content_id, known_title).await {
            Ok(view) => Some(view),
            Err(_) => {
                Fallback::UserStateSkipCache.count();
                None
            }
        };
        let redis_up = view.is_some();
        let view = view.unwrap_or_default();
        if redis_up {
            cache_metric("entitlement_redis", view.entitlement.is_some());
            cache_metric("position_redis", view.position.is_some());
        }
        let mut write_back = WriteBack::default();

        let entitlement = async {
            match view.entitlement {
                Some(Some(e)) => Ok((Sourced::fresh(e), None)),
                Some(None) => Err(PlaybackError::NoEntitlement),
                // Boxed: the internal API's futures are large and this branch is the cold one.
                None => Box::pin(self.entitlement_from_api(claims, ctx)).await,
            }
        };
        let position = async {
            match view.position {
                Some(stored) => {
                    let (position, checked) = self.stored_position(claims, content_id, stored, ctx).await;
                    (position, None, checked)
                }
                None => {
                    let (position, learnt) =
                        Box::pin(self.position_from_api(claims, content_id, redis_up, ctx)).await;
                    (position, learnt, None)
                }
            }
        };
        let (entitlement, (position, learnt_position, checked)) = tokio::join!(entitlement, position);
        let (entitlement, learnt_entitlement) = entitlement?;
        write_back.entitlement = learnt_entitlement;
        write_back.position = learnt_position.map(|p| (content_id.clone(), p));
        write_back.checked = checked.map(|c| (content_id.clone(), c));
        Ok(UserState {
            entitlement,
            position,
            write_back: redis_up.then_some(write_back),
        })
    }

    /// The caller's concurrent-stream limit alone, for a session Redis lost:
    /// the internal API's entitlement, else the JWT's claims. No title is
    /// involved, so neither a cold title cache nor a failing internal API
    /// stops a player that was already playing.
    pub async fn stream_limit(&self, claims: &Claims, ctx: &CallContext) -> Result<u32, PlaybackError> {
        let (entitlement, _) = self.entitlement_from_api(claims, ctx).await?;
        Ok(entitlement.value.max_streams)
    }

    /// A "no entitlement" answer is cached too (and refused): it does not
    /// grow with titles, only with users the internal API knows nothing of.
    async fn entitlement_from_api(
        &self,
        claims: &Claims,
        ctx: &CallContext,
    ) -> Result<(Sourced<Entitlement>, Option<Option<Entitlement>>), PlaybackError> {
        match self.api.entitlement(&claims.sub, ctx).await {
            Ok(Some(found)) => Ok((Sourced::fresh(found.clone()), Some(Some(found)))),
            Ok(None) => {
                let _ = self
                    .redis
                    .write_back(
                        &claims.sub,
                        WriteBack {
                            entitlement: Some(None),
                            ..WriteBack::default()
                        },
                        self.entitlement_ttl,
                    )
                    .await;
                Err(PlaybackError::NoEntitlement)
            }
            Err(_) => {
                Fallback::ClaimsEntitlement.count();
                Ok((
                    Sourced::new(rules::entitlement_from_claims(claims), Origin::Claims),
                    None,
                ))
            }
        }
    }

    /// The position Redis holds, unless it is older than the last Redis
    /// outage's end and not checked since: then an instance killed during
    /// the outage may have delivered a newer one straight to the internal
    /// API, which is asked once. Whichever is newer is answered and goes
    /// back to Redis stamped as checked. While the internal API fails,
    /// Redis' position is answered and checked on a later read.
    ///
    /// A read of a node that failed at the watch's last look (it answers
    /// now: its outage just ended, and the end is not recorded yet) is
    /// checked too; the newer position goes back unstamped.
    async fn stored_position(
        &self,
        claims: &Claims,
        content_id: &ContentId,
        stored: StoredPoint,
        ctx: &CallContext,
    ) -> (Sourced<ResumePoint>, Option<CheckedPosition>) {
        let outage_ended = self.redis.outage_ended_ms();
        let after_the_outage = stored.known_newest_at() >= outage_ended;
        let unsettled = after_the_outage && self.redis.outage_unsettled(&claims.sub);
        if after_the_outage && !unsettled {
            return (Sourced::fresh(stored.point), None);
        }
        let Ok(found) = Box::pin(self.api.progress(&claims.sub, content_id, ctx)).await else {
            return (Sourced::fresh(stored.point), None);
        };
        let newest = match found {
            Some(found)
                if stored
                    .at_ms
                    .is_none_or(|at| found.updated_at.timestamp_millis() > at) =>
            {
                StoredPoint {
                    point: ResumePoint {
                        position_ms: found.position_ms,
                        completed: found.completed,
                    },
                    at_ms: Some(found.updated_at.timestamp_millis()),
                    checked_ms: None,
                }
            }
            _ => stored,
        };
        metrics::counter!("moneta_resume_positions_checked_total", "found" => match newest == stored {
            true => "redis",
            false => "internal_api",
        })
        .increment(1);
        let checked = match unsettled {
            false => Some(CheckedPosition {
                newest,
                checked_ms: outage_ended,
            }),
            true => (newest != stored).then_some(CheckedPosition {
                newest,
                checked_ms: 0,
            }),
        };
        (Sourced::fresh(newest.point), checked)
    }

    async fn position_from_api(
        &self,
        claims: &Claims,
        content_id: &ContentId,
        redis_up: bool,
        ctx: &CallContext,
    ) -> (Sourced<ResumePoint>, Option<LearntPosition>) {
        match self.api.progress(&claims.sub, content_id, ctx).await {
            Ok(found) => {
                let point = found.as_ref().map_or(ResumePoint::default(), |f| ResumePoint {
                    position_ms: f.position_ms,
                    completed: f.completed,
                });
                if redis_up {
                    let learnt = PositionMs::new(point.position_ms)
                        .ok()
                        .map(|position_ms| LearntPosition {
                            position_ms,
                            at_ms: found.map(|f| f.updated_at.timestamp_millis()),
                            completed: point.completed,
                            // Just read there: no check needed after the last outage.
                            checked_ms: self.redis.outage_ended_ms(),
                        });
                    (Sourced::fresh(point), learnt)
                } else {
                    // Positions reach Redis first and the internal API later, so
                    // without Redis the API's copy may lag the newest heartbeat.
                    Fallback::PositionFromApi.count();
                    (Sourced::new(point, Origin::Stale), None)
                }
            }
            Err(_) => {
                Fallback::DefaultPosition.count();
                (Sourced::new(ResumePoint::default(), Origin::Default), None)
            }
        }
    }

    /// Called once the caller may play the title.
    pub async fn remember(&self, claims: &Claims, state: &mut UserState) {
        if let Some(write) = state.write_back.take() {
            self.redis
                .write_back(&claims.sub, write, self.entitlement_ttl)
                .await;
        }
    }
}

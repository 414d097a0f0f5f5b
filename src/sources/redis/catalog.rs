//! Cached titles, entitlements and resume positions.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::keys;
use super::{POSITION_TTL_S, RedisStore};
use crate::model::{ContentId, ContentPlayback, Entitlement, PositionMs, ResumePoint, UserId};
use crate::resilience::DependencyError;

/// A cached title, or the fact that the internal API does not know it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CachedContent {
    pub fetched_at_ms: u64,
    pub content: Option<ContentPlayback>,
}

/// What Redis knows about one user and one title.
#[derive(Debug, Clone, Default)]
pub struct UserView {
    /// `None`: not cached; `Some(None)`: cached "no entitlement".
    pub entitlement: Option<Option<Entitlement>>,
    pub position: Option<ResumePoint>,
}

/// Values learnt from the internal API, written back to Redis only once the
/// caller turned out to be allowed to play the title: a request for a title
/// that does not exist, or that the caller may not play, leaves nothing behind.
#[derive(Debug, Clone, Default)]
pub struct WriteBack {
    pub entitlement: Option<Option<Entitlement>>,
    pub position: Option<(ContentId, LearntPosition)>,
}

/// A resume position the internal API holds, with the time it was
/// acknowledged (`None` when the API holds none: position 0, older than
/// any stamped one).
#[derive(Debug, Clone, Copy)]
pub struct LearntPosition {
    pub position_ms: PositionMs,
    pub at_ms: Option<i64>,
    pub completed: bool,
}

impl LearntPosition {
    fn encode(self) -> String {
        let point = ResumePoint {
            position_ms: self.position_ms.get(),
            completed: self.completed,
        };
        match self.at_ms {
            Some(at) => point.encode_at(at),
            None => point.encode(),
        }
    }
}

impl RedisStore {
    pub async fn content(&self, content_id: &ContentId) -> Result<Option<CachedContent>, DependencyError> {
        let key = keys::content(content_id);
        let raw: Option<String> = self
            .run(|mut c| async move { redis::cmd("GET").arg(key).query_async(&mut c).await })
            .await?;
        // A value that no longer parses (older layout) is a miss, not an error.
        Ok(raw.and_then(|s| serde_json::from_str(&s).ok()))
    }

    /// Only titles the internal API answered for are written, so the number
    /// of these keys is bounded by the catalog (unknown titles live 30 s).
    pub async fn put_content(
        &self,
        content_id: &ContentId,
        cached: &CachedContent,
        ttl: Duration,
    ) -> Result<(), DependencyError> {
        let value = serde_json::to_string(cached).unwrap_or_default();
        let key = keys::content(content_id);
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
    /// round trip, or none when the client-side cache holds both.
    ///
    /// `known_title`: the title exists. Only then is the position kept in
    /// process (and for a few titles per user): the crate keeps one entry per
    /// field read, so positions of made-up titles must not be cached.
    pub async fn user_view(
        &self,
        user: &UserId,
        content_id: &ContentId,
        known_title: bool,
    ) -> Result<UserView, DependencyError> {
        let keys = self.user_keys(user);
        let positions = keys.positions();
        let cached = self.cache.as_ref().and_then(|c| Some((c, c.for_read()?)));
        let admission = cached
            .as_ref()
            .filter(|_| known_title)
            .and_then(|(cache, _)| cache.admit_position(&positions, content_id.as_str()));
        let keep_position = admission.is_some();
        let cached = cached.map(|(_, config)| config);
        let key = &positions;
        let (ent, pos): (Option<String>, Option<String>) = self
            .run(|mut c| async move {
                // Sized up front: growing the pipeline and each command's
                // buffers took three reallocations a request.
                let mut pipe = redis::Pipeline::with_capacity(2);
                let entitlement = keys.entitlement();
                let mut get = redis::Cmd::with_capacity(2, 3 + entitlement.len());
                get.arg("GET").arg(entitlement);
                pipe.add_command(get);
                if let Some(cached) = &cached {
                    pipe.set_cache_config(cached.clone());
                }
                let mut hget = redis::Cmd::with_capacity(3, 4 + key.len() + content_id.as_str().len());
                hget.arg("HGET").arg(key).arg(content_id.as_str());
                pipe.add_command(hget);
                if let Some(cached) = cached.filter(|_| keep_position) {
                    pipe.set_cache_config(cached);
                }
                pipe.query_async(&mut c).await
            })
            .await?;
        if let (Some(cache), Some(admission)) = (&self.cache, admission)
            && admission.raced(cache)
        {
            cache.taint(&positions);
        }
        let entitlement = ent.and_then(|s| serde_json::from_str::<Option<Entitlement>>(&s).ok());
        Ok(UserView {
            entitlement,
            position: pos.as_deref().and_then(ResumePoint::decode),
        })
    }

    /// Applies what the internal API told about a user, in one round trip.
    /// Best effort: a failed write only costs a later miss.
    ///
    /// The position only fills a field Redis lacked (`HSETNX`), stamped
    /// with the API's time: whatever Redis learnt meanwhile (a heartbeat, a
    /// position held in memory coming home after an outage) is at least as
    /// new, and a position an instance brings home later replaces it only
    /// if newer. An unstamped overwrite made an older homecoming win.
    pub async fn write_back(&self, user: &UserId, write: WriteBack, entitlement_ttl: Duration) {
        if write.entitlement.is_none() && write.position.is_none() {
            return;
        }
        let keys = self.user_keys(user);
        let _ = self
            .run(|mut c| async move {
                let mut pipe = redis::pipe();
                if let Some(entitlement) = &write.entitlement {
                    pipe.cmd("SET")
                        .arg(keys.entitlement())
                        .arg(serde_json::to_string(entitlement).unwrap_or_default())
                        .arg("PX")
                        .arg(entitlement_ttl.as_millis() as u64)
                        .ignore();
                }
                if let Some((content_id, position)) = &write.position {
                    let positions = keys.positions();
                    pipe.cmd("HSETNX")
                        .arg(&positions)
                        .arg(content_id.as_str())
                        .arg(position.encode())
                        .ignore()
                        .cmd("EXPIRE")
                        .arg(&positions)
                        .arg(POSITION_TTL_S)
                        .ignore();
                }
                pipe.query_async::<()>(&mut c).await
            })
            .await;
    }
}

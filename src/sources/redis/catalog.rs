//! Cached titles, entitlements and resume positions.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::client_cache::{Admission, ClientCache, Lookup};
use super::keys;
use super::{On, POSITION_TTL_S, RedisStore};
use crate::model::{ContentId, ContentPlayback, Entitlement, PositionMs, ResumePoint, StoredPoint, UserId};
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
    pub position: Option<StoredPoint>,
}

/// Values learnt from the internal API, written back to Redis only once the
/// caller turned out to be allowed to play the title: a request for a title
/// that does not exist, or that the caller may not play, leaves nothing behind.
#[derive(Debug, Clone, Default)]
pub struct WriteBack {
    pub entitlement: Option<Option<Entitlement>>,
    pub position: Option<(ContentId, LearntPosition)>,
    /// A stored position checked against the internal API after an outage
    /// (see `outages`): the newest of the two, stamped as checked then.
    pub checked: Option<(ContentId, CheckedPosition)>,
}

/// What a check of a stored position against the internal API found.
#[derive(Debug, Clone, Copy)]
pub struct CheckedPosition {
    pub newest: StoredPoint,
    /// The outage end it was checked for; 0: the end is not recorded yet
    /// (written back unstamped, checked again once it is).
    pub checked_ms: i64,
}

/// A resume position the internal API holds, with the time it was
/// acknowledged (`None` when the API holds none: position 0, older than
/// any stamped one).
#[derive(Debug, Clone, Copy)]
pub struct LearntPosition {
    pub position_ms: PositionMs,
    pub at_ms: Option<i64>,
    pub completed: bool,
    /// The last Redis outage end known when it was read (0: none): it needs
    /// no check against the internal API for that outage (see `outages`).
    pub checked_ms: i64,
}

impl LearntPosition {
    fn encode(self) -> String {
        let stored = StoredPoint {
            point: ResumePoint {
                position_ms: self.position_ms.get(),
                completed: self.completed,
            },
            at_ms: self.at_ms,
            checked_ms: None,
        };
        match (self.at_ms, self.checked_ms) {
            (_, checked @ 1..) => stored.encode_checked(checked),
            (Some(at), _) => stored.point.encode_at(at),
            (None, _) => stored.point.encode(),
        }
    }
}

impl RedisStore {
    pub async fn content(&self, content_id: &ContentId) -> Result<Option<CachedContent>, DependencyError> {
        let key = &keys::content(content_id);
        let raw: Option<String> = self
            .run(On::Key(key), |mut c| async move {
                redis::cmd("GET").arg(key).query_async(&mut c).await
            })
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
        let key = &keys::content(content_id);
        self.run(On::Key(key), |mut c| async move {
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
    /// process (and for a few titles per user), so positions of made-up
    /// titles cannot grow the copy.
    pub async fn user_view(
        &self,
        user: &UserId,
        content_id: &ContentId,
        known_title: bool,
    ) -> Result<UserView, DependencyError> {
        let keys = self.user_keys(user);
        let entitlement_key = keys.entitlement();
        let positions_key = keys.positions();
        let title = content_id.as_str();
        let (ent, pos) = match &self.cache {
            Some(cache) => (
                cache.lookup(&entitlement_key, ""),
                match known_title {
                    true => cache.lookup(&positions_key, title),
                    false => Lookup::Miss(None),
                },
            ),
            None => (Lookup::Miss(None), Lookup::Miss(None)),
        };
        let (ent, pos) = match (ent, pos) {
            (Lookup::Hit(ent), Lookup::Hit(pos)) => (ent, pos),
            (ent, pos) => {
                let reads = [
                    Read::new(ent, "GET", &entitlement_key, None),
                    Read::new(pos, "HGET", &positions_key, Some(title)),
                ];
                self.read_through(reads).await?
            }
        };
        let entitlement = ent.and_then(|s| serde_json::from_str::<Option<Entitlement>>(&s).ok());
        Ok(UserView {
            entitlement,
            position: pos.as_deref().and_then(StoredPoint::decode),
        })
    }

    /// The reads the copy could not answer, in one pipeline; an admitted one
    /// is tracked (`CLIENT CACHING YES`, then the `PTTL` that bounds how
    /// long it is kept) and kept.
    async fn read_through(
        &self,
        reads: [Read<'_>; 2],
    ) -> Result<(Option<String>, Option<String>), DependencyError> {
        let commands = reads.iter().map(Read::commands).sum();
        // Every key read is the user's: one slot.
        let slot_key = reads.iter().find_map(Read::key).unwrap_or_default();
        let values: Vec<redis::Value> = self
            .run(On::Key(slot_key), |mut c| {
                // Sized up front: growing the pipeline took reallocations a request.
                let mut pipe = redis::Pipeline::with_capacity(commands);
                for read in &reads {
                    read.add_to(&mut pipe);
                }
                async move { c.pipeline_on(pipe, slot_key).await }
            })
            .await?;
        let mut values = values.into_iter();
        let [ent, pos] = reads.map(|read| read.answer(self.cache.as_deref(), &mut values));
        Ok((ent, pos))
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
        if let Some((content_id, checked)) = &write.checked {
            let _ = self.confirm_position(user, content_id, checked).await;
        }
        if write.entitlement.is_none() && write.position.is_none() {
            return;
        }
        let keys = self.user_keys(user);
        let _ = self
            .run(On::Bucket(keys.bucket()), |mut c| async move {
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

/// One read of [`RedisStore::user_view`]: answered by the copy, or sent.
enum Read<'a> {
    Held(Option<String>),
    Sent {
        command: &'static str,
        key: &'a str,
        field: Option<&'a str>,
        admission: Option<Admission>,
    },
}

impl<'a> Read<'a> {
    fn new(lookup: Lookup, command: &'static str, key: &'a str, field: Option<&'a str>) -> Self {
        match lookup {
            Lookup::Hit(value) => Read::Held(value),
            Lookup::Miss(admission) => Read::Sent {
                command,
                key,
                field,
                admission,
            },
        }
    }

    fn commands(&self) -> usize {
        match self {
            Read::Held(_) => 0,
            Read::Sent { admission: None, .. } => 1,
            Read::Sent {
                admission: Some(_), ..
            } => 3,
        }
    }

    fn key(&self) -> Option<&'a str> {
        match self {
            Read::Held(_) => None,
            Read::Sent { key, .. } => Some(key),
        }
    }

    fn add_to(&self, pipe: &mut redis::Pipeline) {
        let Read::Sent {
            command,
            key,
            field,
            admission,
        } = self
        else {
            return;
        };
        if admission.is_some() {
            // Opt-in tracking covers the one command after this: the PTTL.
            // Not `.ignore()`d: the cluster connection hands back every reply.
            pipe.cmd("CLIENT").arg("CACHING").arg("YES");
            pipe.cmd("PTTL").arg(*key);
        }
        let mut read = redis::Cmd::with_capacity(3, command.len() + key.len() + field.map_or(0, str::len));
        read.arg(*command).arg(*key);
        if let Some(field) = field {
            read.arg(*field);
        }
        pipe.add_command(read);
    }

    /// The value, taken from the pipeline's replies and kept when admitted.
    fn answer(
        self,
        cache: Option<&ClientCache>,
        replies: &mut impl Iterator<Item = redis::Value>,
    ) -> Option<String> {
        let admission = match self {
            Read::Held(value) => return value,
            Read::Sent { admission, .. } => admission,
        };
        let pttl = admission
            .is_some()
            .then(|| {
                replies
                    .nth(1)
                    .and_then(|v| redis::from_redis_value::<i64>(v).ok())
            })
            .flatten();
        // A reply that is not a string (an error, a key of another type) is
        // read as nothing there, and not kept.
        let value = replies
            .next()
            .map(redis::from_redis_value::<Option<String>>)?
            .ok()?;
        if let (Some(cache), Some(admission)) = (cache, admission) {
            cache.keep(admission, value.clone(), pttl.unwrap_or(-1));
        }
        value
    }
}

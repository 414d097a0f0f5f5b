//! Runs the title ladder (`ladder.rs`) against the sources: a short-lived
//! copy in memory, Redis, the internal API, the stale copies and the snapshot.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use moka::Expiry;
use moka::future::Cache;

use super::ladder::{self, CacheStep, Lookup, Rung};
use super::{PlaybackError, cache_metric};
use crate::config::CatalogSettings;
use crate::model::{ContentId, ContentPlayback, Origin, Sourced};
use crate::sources::CallContext;
use crate::sources::internal_api::InternalApi;
use crate::sources::redis::{CachedContent, RedisStore};
use crate::sources::snapshot::Snapshot;
use crate::telemetry::metrics::Fallback;

/// Degraded answers are kept in memory only briefly, so recovery shows quickly.
const DEGRADED_LOCAL_TTL: Duration = Duration::from_millis(500);
/// Titles kept in memory, at most (each a few hundred bytes).
const LOCAL_CAPACITY: u64 = 100_000;

struct LookupExpiry {
    fresh: Duration,
}

impl Expiry<ContentId, Lookup> for LookupExpiry {
    fn expire_after_create(&self, _: &ContentId, value: &Lookup, _: std::time::Instant) -> Option<Duration> {
        Some(match value.origin {
            Origin::Fresh => self.fresh,
            _ => DEGRADED_LOCAL_TTL,
        })
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The catalog as Moneta sees it: titles from wherever they can be had.
pub struct Titles {
    redis: RedisStore,
    api: InternalApi,
    snapshot: Snapshot,
    content_ttl: Duration,
    stale_ttl: Duration,
    /// Short-lived copy of titles; `try_get_with` also coalesces concurrent
    /// misses for one title into one load (single flight).
    local: Cache<ContentId, Lookup>,
    /// The last good copy of each title seen, for when Redis and the API both fail.
    last_good: Cache<ContentId, Arc<ContentPlayback>, foldhash::fast::RandomState>,
}

impl Titles {
    pub fn new(redis: RedisStore, api: InternalApi, snapshot: Snapshot, settings: &CatalogSettings) -> Self {
        let local = Cache::builder()
            .max_capacity(LOCAL_CAPACITY)
            .expire_after(LookupExpiry {
                fresh: settings.content_local_ttl,
            })
            .build();
        // foldhash, as the verified tokens (`auth/verifier.rs`): asked on
        // every playback-info ([`Titles::known`]), and only titles that
        // exist are inserted. `local` keeps SipHash: it also remembers ids
        // that callers made up.
        let last_good = Cache::builder()
            .max_capacity(LOCAL_CAPACITY)
            .time_to_live(settings.content_stale_ttl)
            .build_with_hasher(foldhash::fast::RandomState::default());
        Self {
            redis,
            api,
            snapshot,
            content_ttl: settings.content_ttl,
            stale_ttl: settings.content_stale_ttl,
            local,
            last_good,
        }
    }

    /// The title existed when last looked up (within the stale TTL): a set
    /// bounded by the catalog, whatever ids callers make up.
    pub fn known(&self, content_id: &ContentId) -> bool {
        self.last_good.contains_key(content_id)
    }

    /// The title, or `ContentNotFound` / `Unavailable`.
    pub async fn get(
        &self,
        content_id: &ContentId,
        ctx: &CallContext,
    ) -> Result<Sourced<Arc<ContentPlayback>>, PlaybackError> {
        // The hit path stays small: moka's loading future is large, and every
        // byte of a request's future is copied when axum boxes it.
        let lookup = match self.local.get(content_id).await {
            Some(hit) => {
                cache_metric("content_memory", true);
                Ok(hit)
            }
            None => Box::pin(self.load_once(content_id, ctx)).await,
        };
        let lookup = lookup?;
        match lookup.value {
            Some(content) => Ok(Sourced::new(content, lookup.origin)),
            None => Err(PlaybackError::ContentNotFound),
        }
    }

    /// Concurrent misses for one title share one load (single flight).
    async fn load_once(&self, content_id: &ContentId, ctx: &CallContext) -> Result<Lookup, PlaybackError> {
        // A caller that waited on another's load counts as a hit.
        let loaded = AtomicBool::new(false);
        // Every waiter's future holds its own unstarted `init`, and an
        // unstarted async block is as large as its largest state, here the
        // Redis and internal-API calls: the ≤ 64 requests waiting on one
        // title held 1.5 MiB at the heap's peak (scripts/heap; docs/
        // profiling.md, "Memory, round 2"). Boxed, the load is allocated
        // only by the one caller that runs it.
        let lookup = self
            .local
            .try_get_with(content_id.clone(), async {
                loaded.store(true, Ordering::Relaxed);
                Box::pin(self.load(content_id, ctx)).await
            })
            .await
            .map_err(|e| (*e).clone());
        cache_metric("content_memory", !loaded.load(Ordering::Relaxed));
        lookup
    }

    async fn load(&self, content_id: &ContentId, ctx: &CallContext) -> Result<Lookup, PlaybackError> {
        let cached = match self.redis.content(content_id).await {
            Ok(cached) => Some(cached),
            Err(_) => {
                Fallback::ContentSkipCache.count();
                None
            }
        };
        let redis_answered = cached.is_some();
        let step = ladder::from_cache(cached.flatten(), now_ms(), self.content_ttl);
        if redis_answered {
            // A stale entry is a miss: the internal API is asked again.
            cache_metric("content_redis", matches!(step, CacheStep::Fresh(_)));
        }
        let stale = match step {
            CacheStep::Fresh(content) => return Ok(Sourced::fresh(self.remember(content_id, content).await)),
            CacheStep::AskApi { stale } => stale,
        };
        match self.api.content(content_id, ctx).await {
            Ok(found) => {
                let entry = CachedContent {
                    fetched_at_ms: now_ms(),
                    content: found,
                };
                // Only titles that exist are copied to Redis: an id a caller
                // made up leaves no key behind (CONTRACT §6), however many
                // they send; `local` remembers it here for a while. Best
                // effort: a failed write only costs a later miss.
                if entry.content.is_some() {
                    let _ = self.redis.put_content(content_id, &entry, self.stale_ttl).await;
                }
                Ok(Sourced::fresh(self.remember(content_id, entry.content).await))
            }
            Err(_) => {
                let last_good = self.last_good.get(content_id).await;
                match ladder::after_api_failure(stale, last_good, self.snapshot.get(content_id)) {
                    Ok((lookup, rung)) => {
                        if rung == Rung::Snapshot {
                            Fallback::Snapshot.count();
                        } else {
                            Fallback::StaleContent.count();
                        }
                        Ok(lookup)
                    }
                    Err(_) => {
                        Fallback::Unavailable.count();
                        Err(PlaybackError::Unavailable)
                    }
                }
            }
        }
    }

    /// Keeps a good copy for outages of both Redis and the internal API.
    async fn remember(
        &self,
        content_id: &ContentId,
        content: Option<ContentPlayback>,
    ) -> Option<Arc<ContentPlayback>> {
        let content = content.map(Arc::new);
        if let Some(content) = &content {
            self.last_good.insert(content_id.clone(), content.clone()).await;
        }
        content
    }
}

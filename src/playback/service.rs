//! Orchestration of one playback answer: title, entitlement and resume
//! position from their sources, each with its named fallback.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use moka::Expiry;
use moka::future::Cache;

use super::cdn::Cdn;
use super::model::{ContentPlayback, Drm, Entitlement, Origin, PlaybackInfo, Sourced, Stream, Subtitle};
use super::rules::{self, Denial};
use crate::auth::Claims;
use crate::config::Settings;
use crate::sources::CallContext;
use crate::sources::internal_api::InternalApi;
use crate::sources::redis::{CachedContent, RedisStore};
use crate::sources::snapshot::Snapshot;

/// How long "the internal API does not know this title" is cached.
const NEGATIVE_TTL: Duration = Duration::from_secs(30);
/// Degraded answers are kept in memory only briefly, so recovery shows quickly.
const DEGRADED_LOCAL_TTL: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, thiserror::Error)]
pub enum PlaybackError {
    #[error("no such title")]
    ContentNotFound,
    #[error("no entitlement for this user")]
    NoEntitlement,
    #[error(transparent)]
    Denied(#[from] Denial),
    #[error("the catalog is unavailable")]
    Unavailable,
}

/// A title the caller may watch, with everything needed to answer.
pub struct Authorized {
    pub content: Sourced<Arc<ContentPlayback>>,
    pub entitlement: Sourced<Entitlement>,
    pub position: Sourced<u64>,
}

impl Authorized {
    pub fn degraded(&self) -> bool {
        self.content.origin.is_degraded()
            || self.entitlement.origin.is_degraded()
            || self.position.origin.is_degraded()
    }
}

/// In-process lookup result; `None` content means "unknown title".
type Lookup = Sourced<Option<Arc<ContentPlayback>>>;

struct LookupExpiry {
    fresh: Duration,
}

impl Expiry<String, Lookup> for LookupExpiry {
    fn expire_after_create(&self, _: &String, value: &Lookup, _: std::time::Instant) -> Option<Duration> {
        Some(match value.origin {
            Origin::Fresh => self.fresh,
            _ => DEGRADED_LOCAL_TTL,
        })
    }
}

pub struct Playback {
    redis: RedisStore,
    api: InternalApi,
    snapshot: Snapshot,
    cdn: Cdn,
    settings: Arc<Settings>,
    /// Short-lived copy of titles; `try_get_with` also coalesces concurrent
    /// misses for one title into one load (single flight).
    local: Cache<String, Lookup>,
    /// The last good copy of each title seen, for when Redis and the API both fail.
    last_good: Cache<String, Arc<ContentPlayback>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One lookup in a cache; lookups that could not be made (Redis down) are
/// counted by the dependency metrics, not here.
fn cache(cache: &'static str, hit: bool) {
    let result = if hit { "hit" } else { "miss" };
    metrics::counter!("moneta_cache_requests_total", "cache" => cache, "result" => result).increment(1);
}

fn fallback(dependency: &'static str, kind: &'static str) {
    metrics::counter!("moneta_fallbacks_total", "dependency" => dependency, "kind" => kind).increment(1);
}

impl Playback {
    pub fn new(
        redis: RedisStore,
        api: InternalApi,
        snapshot: Snapshot,
        cdn: Cdn,
        settings: Arc<Settings>,
    ) -> Self {
        let local = Cache::builder()
            .max_capacity(100_000)
            .expire_after(LookupExpiry {
                fresh: settings.content_local_ttl,
            })
            .build();
        let last_good = Cache::builder()
            .max_capacity(100_000)
            .time_to_live(settings.content_stale_ttl)
            .build();
        Self {
            redis,
            api,
            snapshot,
            cdn,
            settings,
            local,
            last_good,
        }
    }

    pub fn redis(&self) -> &RedisStore {
        &self.redis
    }

    /// The title: memory → Redis → internal API → stale copy → snapshot.
    pub async fn content(
        &self,
        content_id: &str,
        ctx: &CallContext,
    ) -> Result<Sourced<Arc<ContentPlayback>>, PlaybackError> {
        // The hit path stays small: moka's loading future is large, and every
        // byte of a request's future is copied when axum boxes it.
        let lookup = match self.local.get(content_id).await {
            Some(hit) => {
                cache("content_memory", true);
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

    /// Loads a title that is not in memory; concurrent misses for one title
    /// share one load (single flight).
    async fn load_once(&self, content_id: &str, ctx: &CallContext) -> Result<Lookup, PlaybackError> {
        // A caller that waited on another's load counts as a hit.
        let loaded = AtomicBool::new(false);
        let lookup = self
            .local
            .try_get_with(content_id.to_owned(), async {
                loaded.store(true, Ordering::Relaxed);
                self.load_content(content_id, ctx).await
            })
            .await
            .map_err(|e| (*e).clone());
        cache("content_memory", !loaded.load(Ordering::Relaxed));
        lookup
    }

    async fn load_content(&self, content_id: &str, ctx: &CallContext) -> Result<Lookup, PlaybackError> {
        let (cached, redis_answered) = match self.redis.content(content_id).await {
            Ok(cached) => (cached, true),
            Err(_) => {
                fallback("redis", "content_skip_cache");
                (None, false)
            }
        };
        let fresh = cached.as_ref().is_some_and(|c| {
            let age = Duration::from_millis(now_ms().saturating_sub(c.fetched_at_ms));
            let fresh_for = if c.content.is_some() {
                self.settings.content_ttl
            } else {
                NEGATIVE_TTL
            };
            age < fresh_for
        });
        if redis_answered {
            // A stale entry is a miss: the internal API is asked again.
            cache("content_redis", fresh);
        }
        if fresh && let Some(c) = &cached {
            let content = c.content.clone().map(Arc::new);
            if let Some(content) = &content {
                self.last_good
                    .insert(content_id.to_owned(), content.clone())
                    .await;
            }
            return Ok(Sourced::fresh(content));
        }
        match self.api.content(content_id, ctx).await {
            Ok(found) => {
                let entry = CachedContent {
                    fetched_at_ms: now_ms(),
                    content: found,
                };
                let ttl = if entry.content.is_some() {
                    self.settings.content_stale_ttl
                } else {
                    NEGATIVE_TTL
                };
                // Best effort: a failed write only costs a later miss.
                let _ = self.redis.put_content(content_id, &entry, ttl).await;
                let content = entry.content.map(Arc::new);
                if let Some(content) = &content {
                    self.last_good
                        .insert(content_id.to_owned(), content.clone())
                        .await;
                }
                Ok(Sourced::fresh(content))
            }
            Err(_) => {
                if let Some(stale) = cached {
                    fallback("internal_api", "stale_content");
                    return Ok(Sourced::new(stale.content.map(Arc::new), Origin::Stale));
                }
                if let Some(copy) = self.last_good.get(content_id).await {
                    fallback("internal_api", "stale_content");
                    return Ok(Sourced::new(Some(copy), Origin::Stale));
                }
                if let Some(snap) = self.snapshot.get(content_id) {
                    fallback("internal_api", "snapshot");
                    return Ok(Sourced::new(Some(snap), Origin::Snapshot));
                }
                fallback("internal_api", "unavailable");
                Err(PlaybackError::Unavailable)
            }
        }
    }

    /// Entitlement and resume position: Redis (one round trip) → internal API →
    /// claims / 0.
    async fn user_state(
        &self,
        claims: &Claims,
        content_id: &str,
        ctx: &CallContext,
    ) -> Result<(Sourced<Entitlement>, Sourced<u64>), PlaybackError> {
        let user = claims.sub.as_str();
        let view = match self.redis.user_view(user, content_id).await {
            Ok(view) => Some(view),
            Err(_) => {
                fallback("redis", "user_state_skip_cache");
                None
            }
        };
        let redis_up = view.is_some();
        let view = view.unwrap_or_default();
        if redis_up {
            cache("entitlement_redis", view.entitlement.is_some());
            cache("position_redis", view.position_ms.is_some());
        }

        let entitlement = async {
            match view.entitlement {
                Some(Some(e)) => Ok(Sourced::fresh(e)),
                Some(None) => Err(PlaybackError::NoEntitlement),
                // Boxed: the internal API's futures are large and this branch is the cold one.
                None => {
                    Box::pin(async {
                        match self.api.entitlement(user, ctx).await {
                            Ok(found) => {
                                if redis_up {
                                    let _ = self
                                        .redis
                                        .put_entitlement(user, found.as_ref(), self.settings.entitlement_ttl)
                                        .await;
                                }
                                found.map(Sourced::fresh).ok_or(PlaybackError::NoEntitlement)
                            }
                            Err(_) => {
                                fallback("internal_api", "claims_entitlement");
                                Ok(Sourced::new(claims.fallback_entitlement(), Origin::Claims))
                            }
                        }
                    })
                    .await
                }
            }
        };
        let position = async {
            match view.position_ms {
                Some(p) => Sourced::fresh(p),
                None => {
                    Box::pin(async {
                        match self.api.progress(user, content_id, ctx).await {
                            Ok(found) => {
                                let p = found.map(|p| p.position_ms).unwrap_or(0);
                                if redis_up {
                                    let _ = self.redis.put_position(user, content_id, p).await;
                                    Sourced::fresh(p)
                                } else {
                                    // Positions reach Redis first and the internal API later, so
                                    // without Redis the API's copy may lag the newest heartbeat.
                                    fallback("redis", "position_from_api");
                                    Sourced::new(p, Origin::Stale)
                                }
                            }
                            Err(_) => {
                                fallback("internal_api", "default_position");
                                Sourced::new(0, Origin::Default)
                            }
                        }
                    })
                    .await
                }
            }
        };
        let (entitlement, position) = tokio::join!(entitlement, position);
        Ok((entitlement?, position))
    }

    /// Everything the contract checks before a title may play.
    pub async fn authorize(
        &self,
        claims: &Claims,
        content_id: &str,
        ctx: &CallContext,
    ) -> Result<Authorized, PlaybackError> {
        let (content, user) = tokio::join!(
            self.content(content_id, ctx),
            self.user_state(claims, content_id, ctx)
        );
        let content = content?;
        let (entitlement, position) = user?;
        rules::check_access(&content.value, &entitlement.value, claims.country.as_deref())?;
        Ok(Authorized {
            content,
            entitlement,
            position,
        })
    }

    /// The playback-info answer for an authorized title.
    pub fn assemble(&self, authorized: &Authorized) -> PlaybackInfo {
        let c = &authorized.content.value;
        let streams = c
            .streams
            .iter()
            .map(|s| Stream {
                protocol: s.protocol.clone(),
                url: self.cdn.stream_url(&s.path),
                drm: s.drm.as_ref().map(|d| Drm {
                    system: d.system.clone(),
                    license_url: self
                        .settings
                        .drm_license_url(&d.system)
                        .map(str::to_owned)
                        .unwrap_or_else(|| format!("https://drm.example.com/{}", d.system)),
                    key_id: d.key_id.clone(),
                }),
            })
            .collect();
        let subtitles = c
            .subtitles
            .iter()
            .map(|s| Subtitle {
                language: s.language.clone(),
                url: self.cdn.url(&s.path),
            })
            .collect();
        PlaybackInfo {
            content_id: c.content_id.clone(),
            title: c.title.clone(),
            duration_ms: c.duration_ms,
            streams,
            subtitles,
            resume_position_ms: authorized.position.value,
            degraded: authorized.degraded(),
        }
    }
}

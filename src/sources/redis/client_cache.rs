//! The in-process copy of entitlements and resume positions, kept coherent by
//! Redis itself (server-assisted client-side caching: RESP3 `CLIENT TRACKING`
//! in opt-in mode, the `redis` crate's `cache-aio`).
//!
//! Redis remembers which keys this connection read with `CLIENT CACHING YES`
//! and pushes an invalidation on that same connection the moment any client
//! changes one of them, so a heartbeat through another instance reaches this
//! copy within a network hop. Writes made through this connection are
//! invalidated before their reply arrives (one ordered stream), so an instance
//! always reads its own writes.
//!
//! What the crate does not do, and this module adds: it serves cached values
//! even while the connection is silently dead (a partition delivers no
//! invalidations and no error). A cached value is therefore served only while
//! the connection has recently proven itself alive: a `PING` answered at time
//! T means every invalidation Redis sent before T has been applied. A
//! disconnection drops trust at once; the reconnect starts a new cache epoch
//! (the crate drops every older entry), so nothing from before a reconnect is
//! ever read again.
//!
//! In Redis Cluster mode the crate tracks on every node connection, each with
//! its own cache epoch over one shared LRU: a read is invalidated by the
//! primary that served it, and a connection that dies (its primary failed
//! over) takes everything read through it along. The proof of life is then
//! a `PING` answered by every primary.
//!
//! Bounded: the crate's LRU counts Redis keys, but keeps one entry per
//! (key, command) with no bound per key, and a user's positions are one hash
//! read one title at a time. So a position is kept for at most
//! [`TITLES_PER_USER`] titles per user until that user's positions change
//! (the invalidation clears both the crate's entries and this count) or for
//! one TTL: at most `2 × max_keys × TITLES_PER_USER` entries in all.
//!
//! The crate stores a reply after handing it to the caller, so an
//! invalidation the connection applies in between (a write to the same key
//! while the read is answered) leaves a stale entry, served until the key
//! changes again or its TTL passes (a fleet test under CPU load saw a resume
//! position one heartbeat behind for the whole TTL). The crate offers no way
//! to drop one entry, so for positions this module stops serving it instead:
//! a read holds its [`Admission`], an invalidation of the key marks it, and
//! a read whose admission was marked meanwhile ([`Admission::raced`]) taints
//! the key: its positions are read from Redis, uncached, for one TTL, by
//! which time any entry stored before the taint has expired. Entitlements,
//! which change rarely, keep the gap, the TTL their bound.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use redis::caching::{CacheConfig, CacheMode, CacheStatistics};
use redis::{CommandCacheConfig, PushInfo, PushKind, Value};

use crate::config::ClientCacheSettings;

/// How often the connection proves it is alive.
pub const PING_EVERY: Duration = Duration::from_millis(250);
/// How long one proof lasts: the bound on staleness should the connection
/// die without a word (no FIN, no RST).
const TRUST_FOR: Duration = Duration::from_millis(1_000);
/// Titles whose positions are kept per user between two changes of them.
pub const TITLES_PER_USER: usize = 4;

/// Trust in the cached copy, shared with the connection's push handler.
pub struct ClientCache {
    ttl: Duration,
    max_keys: usize,
    born: Instant,
    /// Milliseconds since `born` until which cached values may be served; 0: not trusted.
    trusted_until_ms: AtomicU64,
    /// Positions key → the titles whose positions are kept.
    admitted: moka::sync::Cache<String, Arc<Admitted>, foldhash::fast::RandomState>,
    /// Invalidations of everything (FLUSHALL) so far: they mark no
    /// admission one by one.
    flushes: AtomicU64,
    /// Titles are kept as hashes, at most [`TITLES_PER_USER`] a key in a
    /// list, never in a table, so a cheap hash will do.
    hasher: foldhash::fast::RandomState,
}

/// One positions key's share of the cache.
#[derive(Default)]
struct Admitted {
    /// Hashes of the titles whose positions are kept.
    titles: Mutex<Vec<u64>>,
    /// An invalidation of the key was applied after this was handed out.
    invalidated: AtomicBool,
    /// Positions of the key are not kept while this entry lives (one TTL).
    tainted: bool,
}

/// A position read the cache may keep. Once the read is answered,
/// [`Admission::raced`] says whether an invalidation may have landed between
/// the reply and the crate storing it.
pub struct Admission {
    admitted: Arc<Admitted>,
    flushes: u64,
}

impl ClientCache {
    /// `None` when the settings turn the cache off.
    pub fn new(settings: &ClientCacheSettings) -> Option<Arc<Self>> {
        (settings.max_keys > 0).then(|| {
            Arc::new(Self {
                ttl: settings.ttl,
                max_keys: settings.max_keys,
                born: Instant::now(),
                trusted_until_ms: AtomicU64::new(0),
                // Counts restart after a TTL even without a change, so a
                // viewer who browsed a few titles can have a new one kept
                // later; the crate's older entries for the key live at most
                // one more TTL, so a key never holds more than twice the bound.
                // foldhash, as the verified tokens (`auth/verifier.rs`): one
                // lookup a playback-info, and the keys are callers' own
                // positions keys, made from verified tokens.
                admitted: moka::sync::Cache::builder()
                    .max_capacity(settings.max_keys as u64)
                    .time_to_live(settings.ttl)
                    .build_with_hasher(foldhash::fast::RandomState::default()),
                flushes: AtomicU64::new(0),
                hasher: foldhash::fast::RandomState::default(),
            })
        })
    }

    /// The connection's cache: opt-in, so only reads marked by
    /// [`ClientCache::for_read`] are tracked and kept.
    pub fn config(&self) -> CacheConfig {
        let size = std::num::NonZeroUsize::new(self.max_keys).unwrap_or(std::num::NonZeroUsize::MIN);
        CacheConfig::new()
            .set_mode(CacheMode::OptIn)
            .set_size(size)
            .set_default_client_ttl(self.ttl)
    }

    /// Handles the connection's out-of-band messages (invalidations are applied
    /// by the crate before they get here).
    pub fn push_handler(self: &Arc<Self>) -> impl Fn(PushInfo) -> Result<(), ()> + Send + Sync + 'static {
        let cache = Arc::downgrade(self);
        move |push: PushInfo| {
            let Some(cache) = cache.upgrade() else {
                return Ok(());
            };
            match push.kind {
                // No read of the old connection is marked: the reconnect
                // starts a new cache epoch, and what they store is never read.
                PushKind::Disconnection => {
                    cache.distrust();
                    cache.admitted.invalidate_all();
                }
                PushKind::Invalidate => cache.forget(&push.data),
                _ => {}
            }
            Ok(())
        }
    }

    /// Whether the position of `title` under `positions_key` may be kept:
    /// `Some` when it may, to be asked [`Admission::raced`] after the read.
    pub fn admit_position(&self, positions_key: &str, title: &str) -> Option<Admission> {
        let title = self.hasher.hash_one(title);
        // Before the lookup: a flush between the two must count as a race.
        let flushes = self.flushes.load(Ordering::Acquire);
        let admitted = self
            .admitted
            .get_with_by_ref(positions_key, || Arc::new(Admitted::default()));
        if admitted.tainted {
            return None;
        }
        {
            let mut titles = admitted.titles.lock().unwrap_or_else(PoisonError::into_inner);
            if !titles.contains(&title) {
                if titles.len() >= TITLES_PER_USER {
                    return None;
                }
                titles.push(title);
            }
        }
        Some(Admission { admitted, flushes })
    }

    /// Positions of `positions_key` are read uncached for one TTL (see the
    /// module's comment).
    pub fn taint(&self, positions_key: &str) {
        let tainted = Admitted {
            tainted: true,
            ..Admitted::default()
        };
        self.admitted.insert(positions_key.to_owned(), Arc::new(tainted));
        metrics::counter!("moneta_redis_client_cache_raced_total").increment(1);
    }

    /// An invalidation: `[keys]`, or nil when Redis dropped everything.
    fn forget(&self, data: &[Value]) {
        match data.first() {
            Some(Value::Array(keys)) => {
                for key in keys {
                    if let Ok(key) = redis::from_redis_value_ref::<String>(key)
                        && let Some(admitted) = self.admitted.remove(&key)
                    {
                        admitted.invalidated.store(true, Ordering::Release);
                    }
                }
            }
            _ => self.forget_all(),
        }
    }

    fn forget_all(&self) {
        self.flushes.fetch_add(1, Ordering::AcqRel);
        self.admitted.invalidate_all();
    }

    /// The per-command setting for a cacheable read: cached while trusted,
    /// straight to Redis otherwise.
    pub fn for_read(&self) -> Option<CommandCacheConfig> {
        self.trusted()
            .then(|| CommandCacheConfig::new().set_client_side_ttl(self.ttl))
    }

    pub fn trusted(&self) -> bool {
        self.now_ms() < self.trusted_until_ms.load(Ordering::Acquire)
    }

    /// A reply from Redis just arrived on the connection.
    pub fn confirm(&self) {
        let until = self.now_ms() + TRUST_FOR.as_millis() as u64;
        self.trusted_until_ms.fetch_max(until, Ordering::AcqRel);
        metrics::gauge!("moneta_redis_client_cache_trusted").set(1.0);
    }

    pub fn distrust(&self) {
        if self.trusted_until_ms.swap(0, Ordering::AcqRel) > self.now_ms() {
            metrics::counter!("moneta_redis_client_cache_distrusted_total").increment(1);
        }
        metrics::gauge!("moneta_redis_client_cache_trusted").set(0.0);
    }

    /// Copies the crate's counters into Moneta's metrics.
    pub fn export(stats: &CacheStatistics) {
        metrics::counter!("moneta_redis_client_cache_requests_total", "result" => "hit")
            .absolute(stats.hit as u64);
        metrics::counter!("moneta_redis_client_cache_requests_total", "result" => "miss")
            .absolute(stats.miss as u64);
        metrics::counter!("moneta_redis_client_cache_invalidations_total").absolute(stats.invalidate as u64);
    }

    fn now_ms(&self) -> u64 {
        // +1: zero means "never trusted".
        self.born.elapsed().as_millis() as u64 + 1
    }
}

impl Admission {
    /// Whether an invalidation of the key (or of everything) was applied
    /// since this admission: the read's reply may have been stored after it.
    pub fn raced(&self, cache: &ClientCache) -> bool {
        self.admitted.invalidated.load(Ordering::Acquire)
            || cache.flushes.load(Ordering::Acquire) != self.flushes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache() -> Arc<ClientCache> {
        ClientCache::new(&ClientCacheSettings {
            max_keys: 16,
            ttl: Duration::from_secs(60),
        })
        .expect("enabled")
    }

    #[test]
    fn nothing_is_served_before_the_connection_proves_itself() {
        let cache = cache();
        assert!(cache.for_read().is_none());
        cache.confirm();
        assert!(cache.for_read().is_some());
    }

    #[test]
    fn a_disconnection_withdraws_trust_at_once() {
        let cache = cache();
        cache.confirm();
        let handler = cache.push_handler();
        let _ = handler(PushInfo {
            kind: PushKind::Invalidate,
            data: vec![],
        });
        assert!(cache.trusted(), "an invalidation is routine");
        let _ = handler(PushInfo {
            kind: PushKind::Disconnection,
            data: vec![],
        });
        assert!(!cache.trusted());
    }

    #[test]
    fn a_few_titles_per_user_until_the_positions_change() {
        let cache = cache();
        let key = "moneta:{b7}:u:viewer:positions";
        for title in ["a", "b", "c", "d"] {
            assert!(cache.admit_position(key, title).is_some());
        }
        assert!(
            cache.admit_position(key, "a").is_some(),
            "admitted titles stay admitted"
        );
        assert!(
            cache.admit_position(key, "e").is_none(),
            "a fifth title is read, not kept"
        );
        assert!(
            cache
                .admit_position("moneta:{b7}:u:other:positions", "e")
                .is_some()
        );
        invalidate(&cache, key);
        assert!(
            cache.admit_position(key, "e").is_some(),
            "the change cleared the count with the entries"
        );
    }

    fn invalidate(cache: &Arc<ClientCache>, key: &str) {
        let _ = cache.push_handler()(PushInfo {
            kind: PushKind::Invalidate,
            data: vec![Value::Array(vec![Value::BulkString(key.as_bytes().to_vec())])],
        });
    }

    #[test]
    fn a_read_an_invalidation_overtook_taints_the_key_for_one_ttl() {
        let cache = ClientCache::new(&ClientCacheSettings {
            max_keys: 16,
            ttl: Duration::from_millis(300),
        })
        .expect("enabled");
        let key = "moneta:{b7}:u:viewer:positions";
        let quiet = cache.admit_position(key, "a").expect("admitted");
        let raced = cache.admit_position(key, "b").expect("admitted");
        assert!(!quiet.raced(&cache));
        invalidate(&cache, "moneta:{b7}:u:other:positions");
        assert!(!raced.raced(&cache), "another key's change");
        invalidate(&cache, key);
        assert!(raced.raced(&cache) && quiet.raced(&cache));
        let after = cache.admit_position(key, "a").expect("admitted again");
        assert!(!after.raced(&cache), "admitted after the invalidation");

        cache.taint(key);
        assert!(
            cache.admit_position(key, "a").is_none(),
            "read uncached while tainted"
        );
        invalidate(&cache, key);
        assert!(
            cache.admit_position(key, "a").is_some(),
            "a later change removed the stale entry with the taint"
        );
        cache.taint(key);
        std::thread::sleep(Duration::from_millis(400));
        assert!(cache.admit_position(key, "a").is_some(), "one TTL later");

        let flushed = cache.admit_position(key, "c").expect("admitted");
        let _ = cache.push_handler()(PushInfo {
            kind: PushKind::Invalidate,
            data: vec![Value::Nil],
        });
        assert!(flushed.raced(&cache), "Redis dropped everything meanwhile");
    }

    #[test]
    fn zero_keys_turns_the_cache_off() {
        let off = ClientCache::new(&ClientCacheSettings {
            max_keys: 0,
            ttl: Duration::from_secs(60),
        });
        assert!(off.is_none());
    }
}

//! The in-process copy of entitlements and resume positions, kept coherent by
//! Redis itself (server-assisted client-side caching: RESP3 `CLIENT TRACKING`
//! in opt-in mode).
//!
//! Redis remembers which keys this connection read right after
//! `CLIENT CACHING YES` and pushes an invalidation on that same connection
//! the moment any client changes one of them (or it expires), so a heartbeat
//! through another instance reaches this copy within a network hop.
//!
//! Why the copy is kept here and not in the `redis` crate's own cache (whose
//! connection setup still turns tracking on): the crate stores a reply in
//! the caller's task after handing it over, and its connections pass pushes
//! to their owner through a channel and a task of their own. An
//! invalidation sent right behind a reply (another instance's write landing
//! while the read is answered) could therefore be applied by the crate
//! before the reply was stored, and reach Moneta only after Moneta had
//! checked for it. Redis tracks a key only until its next invalidation, so
//! nothing ever removed that entry: a black-box test with two instances saw
//! a resume position seconds old served for the whole TTL (a packet capture
//! showed the reply and its invalidation in one segment). Here a read holds
//! an [`Admission`] to the key's [`Entry`]; the push handler, however late,
//! removes the entry and marks it dead under the same lock a reply is
//! stored under. A reply whose key was invalidated after the read began is
//! not kept, and one stored before the invalidation is handled goes with
//! the entry. Either order ends with nothing stale kept.
//!
//! The copy is served only while the connection has recently proven itself
//! alive (a silently dead connection delivers no invalidations and no
//! error): a `PING` answered at time T means every invalidation Redis sent
//! before T has reached the connection. A disconnection drops trust and the
//! whole copy at once, and a read begun before it keeps nothing.
//!
//! In Redis Cluster mode every node connection tracks what it read: a read
//! is invalidated by the primary that served it, and a connection that dies
//! (its primary failed over) takes the whole copy along. The proof of life
//! is then a `PING` answered by every primary.
//!
//! Bounded: at most `max_keys` Redis keys for one TTL each, and a user's
//! positions (one hash, read one title at a time) for at most
//! [`TITLES_PER_USER`] titles until they change.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use redis::caching::{CacheConfig, CacheMode};
use redis::{PushInfo, PushKind, Value};

use crate::config::ClientCacheSettings;

/// How often the connection proves it is alive.
pub const PING_EVERY: Duration = Duration::from_millis(250);
/// How long one proof lasts: the bound on staleness should the connection
/// die without a word (no FIN, no RST).
const TRUST_FOR: Duration = Duration::from_millis(1_000);
/// Titles whose positions are kept per user between two changes of them.
pub const TITLES_PER_USER: usize = 4;

/// The copy, and trust in it, shared with the connection's push handler.
pub struct ClientCache {
    ttl: Duration,
    born: Instant,
    /// Milliseconds since `born` until which the copy may be served; 0: not trusted.
    trusted_until_ms: AtomicU64,
    /// Redis key → what is kept of it.
    entries: moka::sync::Cache<String, Arc<Entry>, foldhash::fast::RandomState>,
    /// Times Redis dropped everything (FLUSHALL) or the connection was lost
    /// so far: a read begun before one keeps nothing.
    flushes: AtomicU64,
    counts: Counts,
}

/// Counted where they happen, exported by the keeper (a metric lookup a
/// read would cost more than the read).
#[derive(Default)]
struct Counts {
    hits: AtomicU64,
    misses: AtomicU64,
    invalidations: AtomicU64,
    raced: AtomicU64,
}

/// What is kept of one Redis key: the fields read from it (`""` for a
/// whole value), or `None` once an invalidation or a flush dropped it.
struct Entry {
    fields: Mutex<Option<Vec<Kept>>>,
}

struct Kept {
    field: Box<str>,
    /// What Redis answered; `None`: nothing there.
    value: Option<String>,
    /// Milliseconds since the cache's birth until which it is served: one
    /// TTL, or less when the key expires sooner in Redis.
    until_ms: u64,
}

/// What the copy says about one field of one key.
pub enum Lookup {
    /// Held: Redis' answer (`None`: nothing there).
    Hit(Option<String>),
    /// Read it from Redis: with an admission, tracked (`CLIENT CACHING YES`
    /// first) and then kept with [`ClientCache::keep`]; without, plainly.
    Miss(Option<Admission>),
}

/// A read the copy may keep, unless the key changes before its reply is stored.
pub struct Admission {
    entry: Arc<Entry>,
    field: Box<str>,
    flushes: u64,
}

impl ClientCache {
    /// `None` when the settings turn the cache off.
    pub fn new(settings: &ClientCacheSettings) -> Option<Arc<Self>> {
        (settings.max_keys > 0).then(|| {
            Arc::new(Self {
                ttl: settings.ttl,
                born: Instant::now(),
                trusted_until_ms: AtomicU64::new(0),
                // An entry lives one TTL from its first read even without a
                // change, so a viewer who browsed a few titles can have a new
                // one kept later. foldhash, as the verified tokens
                // (`auth/verifier.rs`): two lookups a playback-info, and the
                // keys are callers' own keys, made from verified tokens.
                entries: moka::sync::Cache::builder()
                    .max_capacity(settings.max_keys as u64)
                    // The least recently read key goes first, and a new one
                    // is always let in: what a read-through copy needs.
                    .eviction_policy(moka::policy::EvictionPolicy::lru())
                    .time_to_live(settings.ttl)
                    .build_with_hasher(foldhash::fast::RandomState::default()),
                flushes: AtomicU64::new(0),
                counts: Counts::default(),
            })
        })
    }

    /// The connection's setup: the crate turns opt-in tracking on (again on
    /// every reconnect) and passes pushes on; it keeps nothing itself, as
    /// no command is marked for its cache.
    pub fn config(&self) -> CacheConfig {
        CacheConfig::new()
            .set_mode(CacheMode::OptIn)
            .set_size(std::num::NonZeroUsize::MIN)
    }

    /// Handles the connection's out-of-band messages.
    pub fn push_handler(self: &Arc<Self>) -> impl Fn(PushInfo) -> Result<(), ()> + Send + Sync + 'static {
        let cache = Arc::downgrade(self);
        move |push: PushInfo| {
            let Some(cache) = cache.upgrade() else {
                return Ok(());
            };
            match push.kind {
                // The new connection tracks nothing yet.
                PushKind::Disconnection => {
                    cache.distrust();
                    cache.forget_all();
                }
                PushKind::Invalidate => cache.forget(&push.data),
                _ => {}
            }
            Ok(())
        }
    }

    /// What the copy holds of `field` of `key` (`""`: the whole value).
    pub fn lookup(&self, key: &str, field: &str) -> Lookup {
        if !self.trusted() {
            return Lookup::Miss(None);
        }
        // Before the entry is taken: a flush between the two must count.
        let flushes = self.flushes.load(Ordering::Acquire);
        let entry = self.entries.entry_by_ref(key).or_insert_with(|| {
            Arc::new(Entry {
                fields: Mutex::new(Some(Vec::new())),
            })
        });
        // moka evicts in batches; the bound is the setting's word, so a new
        // key makes room at once (a miss, about to ask Redis anyway).
        let entry = match entry.is_fresh() {
            true => {
                self.entries.run_pending_tasks();
                entry.into_value()
            }
            false => entry.into_value(),
        };
        let now = self.now_ms();
        {
            let fields = entry.fields.lock().unwrap_or_else(PoisonError::into_inner);
            // Dropped between the two: read, keep nothing.
            let Some(fields) = fields.as_ref() else {
                return Lookup::Miss(None);
            };
            match fields.iter().find(|k| &*k.field == field) {
                Some(kept) if kept.until_ms > now => {
                    self.counts.hits.fetch_add(1, Ordering::Relaxed);
                    return Lookup::Hit(kept.value.clone());
                }
                Some(_) => {}
                // The crate's old bound, kept: positions of a few titles per user.
                None if fields.len() >= TITLES_PER_USER => {
                    self.counts.misses.fetch_add(1, Ordering::Relaxed);
                    return Lookup::Miss(None);
                }
                None => {}
            }
        }
        self.counts.misses.fetch_add(1, Ordering::Relaxed);
        Lookup::Miss(Some(Admission {
            entry,
            field: field.into(),
            flushes,
        }))
    }

    /// Keeps what an admitted read answered (`pttl`: the `PTTL` read with
    /// it), unless the key changed or everything was dropped since the
    /// read began.
    pub fn keep(&self, admission: Admission, value: Option<String>, pttl: i64) {
        let mut fields = admission
            .entry
            .fields
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(fields) = fields
            .as_mut()
            .filter(|_| self.flushes.load(Ordering::Acquire) == admission.flushes)
        else {
            self.counts.raced.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let ttl = match u64::try_from(pttl) {
            Ok(pttl) if pttl > 0 => (self.ttl.as_millis() as u64).min(pttl),
            _ => self.ttl.as_millis() as u64,
        };
        let until_ms = self.now_ms() + ttl;
        if let Some(kept) = fields.iter_mut().find(|k| k.field == admission.field) {
            kept.value = value;
            kept.until_ms = until_ms;
        } else if fields.len() < TITLES_PER_USER {
            fields.push(Kept {
                field: admission.field,
                value,
                until_ms,
            });
        }
    }

    /// An invalidation: `[keys]`, or nil when Redis dropped everything.
    fn forget(&self, data: &[Value]) {
        match data.first() {
            Some(Value::Array(keys)) => {
                for key in keys {
                    if let Ok(key) = redis::from_redis_value_ref::<String>(key)
                        && self.drop_key(&key)
                    {
                        self.counts.invalidations.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            _ => self.forget_all(),
        }
    }

    /// Drops what is kept of `key`, which this instance just changed in
    /// Redis: its reads see the change at once, without waiting for the
    /// invalidation. That one is handled by another task, and when the
    /// write went over a connection of its own (writes that wait for
    /// replicas) it comes on another connection, in no set order with the
    /// write's reply.
    pub fn written(&self, key: &str) {
        self.drop_key(key);
    }

    /// Whether `key` was kept.
    fn drop_key(&self, key: &str) -> bool {
        let Some(entry) = self.entries.remove(key) else {
            return false;
        };
        // Under the lock replies are stored under: one stored before this
        // goes with it, one stored after is refused.
        *entry.fields.lock().unwrap_or_else(PoisonError::into_inner) = None;
        true
    }

    /// Drops the whole copy; reads in flight keep nothing.
    pub fn forget_all(&self) {
        self.flushes.fetch_add(1, Ordering::AcqRel);
        self.entries.invalidate_all();
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

    /// Copies the counters into Moneta's metrics.
    pub fn export(&self) {
        let counts = &self.counts;
        metrics::counter!("moneta_redis_client_cache_requests_total", "result" => "hit")
            .absolute(counts.hits.load(Ordering::Relaxed));
        metrics::counter!("moneta_redis_client_cache_requests_total", "result" => "miss")
            .absolute(counts.misses.load(Ordering::Relaxed));
        metrics::counter!("moneta_redis_client_cache_invalidations_total")
            .absolute(counts.invalidations.load(Ordering::Relaxed));
        metrics::counter!("moneta_redis_client_cache_raced_total")
            .absolute(counts.raced.load(Ordering::Relaxed));
    }

    fn now_ms(&self) -> u64 {
        // +1: zero means "never trusted".
        self.born.elapsed().as_millis() as u64 + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POSITIONS: &str = "moneta:{b7}:u:viewer:positions";

    fn cache_with_ttl(ttl: Duration) -> Arc<ClientCache> {
        let cache = ClientCache::new(&ClientCacheSettings { max_keys: 16, ttl }).expect("enabled");
        cache.confirm();
        cache
    }

    fn cache() -> Arc<ClientCache> {
        cache_with_ttl(Duration::from_secs(60))
    }

    fn admitted(cache: &ClientCache, key: &str, field: &str) -> Admission {
        match cache.lookup(key, field) {
            Lookup::Miss(Some(admission)) => admission,
            Lookup::Miss(None) => panic!("{key} {field}: read without keeping"),
            Lookup::Hit(_) => panic!("{key} {field}: held"),
        }
    }

    /// An admitted read answered `value` (with `pttl`) and kept.
    fn read(cache: &ClientCache, key: &str, field: &str, value: Option<String>, pttl: i64) {
        let admission = admitted(cache, key, field);
        cache.keep(admission, value, pttl);
    }

    fn held(cache: &ClientCache, key: &str, field: &str) -> Option<Option<String>> {
        match cache.lookup(key, field) {
            Lookup::Hit(value) => Some(value),
            Lookup::Miss(_) => None,
        }
    }

    fn push(cache: &Arc<ClientCache>, kind: PushKind, data: Vec<Value>) {
        let _ = cache.push_handler()(PushInfo { kind, data });
    }

    fn invalidate(cache: &Arc<ClientCache>, key: &str) {
        let key = Value::BulkString(key.as_bytes().to_vec());
        push(cache, PushKind::Invalidate, vec![Value::Array(vec![key])]);
    }

    #[test]
    fn nothing_is_served_or_tracked_before_the_connection_proves_itself() {
        let cache = ClientCache::new(&ClientCacheSettings {
            max_keys: 16,
            ttl: Duration::from_secs(60),
        })
        .expect("enabled");
        assert!(matches!(cache.lookup(POSITIONS, "a"), Lookup::Miss(None)));
        cache.confirm();
        read(&cache, POSITIONS, "a", Some("1000".into()), -1);
        assert_eq!(held(&cache, POSITIONS, "a"), Some(Some("1000".into())));
    }

    #[test]
    fn a_disconnection_withdraws_trust_and_the_copy_at_once() {
        let cache = cache();
        read(&cache, POSITIONS, "a", Some("1000".into()), -1);
        push(&cache, PushKind::Invalidate, vec![]);
        assert!(cache.trusted(), "an empty invalidation is routine");
        let in_flight = admitted(&cache, POSITIONS, "b");
        push(&cache, PushKind::Disconnection, vec![]);
        assert!(!cache.trusted());
        cache.confirm();
        assert_eq!(held(&cache, POSITIONS, "a"), None, "nothing from before");
        cache.keep(in_flight, Some("2000".into()), -1);
        assert_eq!(
            held(&cache, POSITIONS, "b"),
            None,
            "a reply of the lost connection is not kept"
        );
    }

    /// The case the crate's own cache got wrong: the reply is in hand, the
    /// invalidation sent right behind it is handled, then the reply is kept.
    #[test]
    fn a_reply_whose_key_changed_meanwhile_is_not_kept() {
        let cache = cache();
        let admission = admitted(&cache, POSITIONS, "a");
        invalidate(&cache, POSITIONS);
        cache.keep(admission, Some("old".into()), -1);
        assert_eq!(held(&cache, POSITIONS, "a"), None);
        assert_eq!(cache.counts.raced.load(Ordering::Relaxed), 1);

        // The next read is tracked again and kept.
        read(&cache, POSITIONS, "a", Some("new".into()), -1);
        assert_eq!(held(&cache, POSITIONS, "a"), Some(Some("new".into())));
    }

    #[test]
    fn an_invalidation_handled_after_the_reply_was_kept_drops_it() {
        let cache = cache();
        read(&cache, POSITIONS, "a", Some("old".into()), -1);
        invalidate(&cache, "moneta:{b7}:u:other:positions");
        assert_eq!(
            held(&cache, POSITIONS, "a"),
            Some(Some("old".into())),
            "another key"
        );
        invalidate(&cache, POSITIONS);
        assert_eq!(held(&cache, POSITIONS, "a"), None);
        assert_eq!(cache.counts.invalidations.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_flush_drops_everything_and_every_read_in_flight() {
        let cache = cache();
        read(&cache, POSITIONS, "a", Some("1".into()), -1);
        let in_flight = admitted(&cache, "moneta:{b7}:u:viewer:entitlement", "");
        push(&cache, PushKind::Invalidate, vec![Value::Nil]);
        cache.keep(in_flight, Some("{}".into()), -1);
        assert_eq!(held(&cache, POSITIONS, "a"), None);
        assert_eq!(held(&cache, "moneta:{b7}:u:viewer:entitlement", ""), None);
    }

    #[test]
    fn a_few_titles_per_user_until_the_positions_change() {
        let cache = cache();
        for title in ["a", "b", "c", "d"] {
            let admission = admitted(&cache, POSITIONS, title);
            cache.keep(admission, None, -1);
            assert_eq!(held(&cache, POSITIONS, title), Some(None), "absence is kept too");
        }
        assert!(
            matches!(cache.lookup(POSITIONS, "e"), Lookup::Miss(None)),
            "a fifth title is read, not kept"
        );
        invalidate(&cache, POSITIONS);
        admitted(&cache, POSITIONS, "e");
    }

    #[test]
    fn nothing_is_served_past_the_ttl_or_the_keys_own_expiry() {
        let cache = cache();
        read(&cache, POSITIONS, "a", Some("1".into()), -1);
        read(&cache, POSITIONS, "b", Some("2".into()), 50);
        std::thread::sleep(Duration::from_millis(100));
        cache.confirm();
        assert_eq!(held(&cache, POSITIONS, "b"), None, "the key expired in Redis");
        assert!(held(&cache, POSITIONS, "a").is_some());

        let short = cache_with_ttl(Duration::from_millis(50));
        read(&short, POSITIONS, "a", Some("1".into()), 60_000);
        std::thread::sleep(Duration::from_millis(100));
        short.confirm();
        assert_eq!(held(&short, POSITIONS, "a"), None, "one TTL later");
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

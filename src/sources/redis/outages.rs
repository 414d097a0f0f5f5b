//! When the last Redis outage ended, as the deployment saw it.
//!
//! While Redis is unreachable an instance acknowledges positions from memory
//! and delivers them straight to the internal API. If it is killed before
//! Redis answers again, the internal API holds a newer position than Redis,
//! and playback-info (Redis first) would answer the older one until the
//! player writes again. The instance that knew is gone, so every instance
//! watches Redis itself: once Redis answers after failing to, the end of the
//! outage is recorded in Redis (`keys::outages`, the latest end kept), and
//! every instance learns it. A resume position older than that end is
//! checked against the internal API once (`playback::user_state`), and
//! stamped as checked in Redis so no instance asks again. Between Redis
//! answering again and the watch's next look, reads of the slots that
//! failed are checked too (without the stamp): the first read after an
//! outage must not be the one that answers the older position.
//!
//! What this cannot see: an outage no live instance saw (only the killed
//! one could not reach Redis, or every instance of the deployment died).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use redis::Value;
use redis::aio::MultiplexedConnection;

use super::{ClusterLink, Connector, RedisStore, keys, prove_alive};

/// How often each instance looks at Redis (a `PING` on every primary). Often enough to
/// see a hang barely longer than the Redis timeout: that is all it takes
/// for an instance to acknowledge a position from memory, deliver it and be
/// killed, and a hang no live instance saw is never checked. Its own calls
/// that failed count as seen too (an instance with traffic sees every hang
/// that way).
pub const WATCH_EVERY: Duration = Duration::from_millis(100);
/// Looks between two readings of the deployment's last outage end (one
/// `ZSCORE`): another instance's record is learnt within a second.
const LEARN_EVERY_LOOKS: u32 = 10;
/// How long the cluster's primaries (`CLUSTER SLOTS`) are taken as known
/// before they are read again (a failover changes them).
const TOPOLOGY_FOR: Duration = Duration::from_secs(1);

/// The member of [`keys::outages`] whose score is the last end.
const ENDED: &str = "ended";

/// Records an outage's end at Redis' own time (`TIME` inside the script, on
/// the key's node), keeping the latest, and returns the latest.
const RECORD_END: &str = "\
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], 'GT', now, ARGV[1])
return tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]))";

/// The last outage end this instance knows of (Redis' clock, ms since the
/// epoch; 0: none), and what failed at the watch's last look.
#[derive(Default)]
pub struct Outages {
    ended_ms: AtomicI64,
    /// Whether a call of this instance failed as an outage since the last look.
    call_failed: AtomicBool,
    /// Whether anything failed at the last look; `failing` says what.
    any_failing: AtomicBool,
    /// Whether some cluster primaries failed at the last look and others
    /// answered: calls for the former are not made (see [`Outages::isolated`]).
    isolating: AtomicBool,
    failing: Mutex<Failing>,
    /// How often the cluster's primaries were seen to change: a promoted
    /// replica has none of the scripts loaded on its old primary (`SCRIPT
    /// LOAD` is not replicated).
    topology_changes: AtomicU64,
}

/// What failed to answer at the watch's last look.
#[derive(Debug, Default, PartialEq)]
enum Failing {
    #[default]
    Nothing,
    /// The single node, or the cluster's topology could not be read.
    Everything,
    /// The slot ranges of the primaries that failed.
    Slots(Vec<(u16, u16)>),
}

impl Outages {
    pub fn ended_ms(&self) -> i64 {
        self.ended_ms.load(Ordering::Relaxed)
    }

    /// A call failed as an outage (timed out, unreachable): when Redis
    /// answers the next look, an outage has ended.
    pub(super) fn call_failed(&self) {
        self.call_failed.store(true, Ordering::Relaxed);
    }

    /// How often the cluster's primaries were seen to change.
    pub(super) fn topology_changes(&self) -> u64 {
        self.topology_changes.load(Ordering::Relaxed)
    }

    fn learn(&self, ended_ms: i64) {
        self.ended_ms.fetch_max(ended_ms, Ordering::Relaxed);
    }

    fn set_failing(&self, failing: Failing) {
        self.any_failing
            .store(failing != Failing::Nothing, Ordering::Relaxed);
        let failed_slots = match &failing {
            Failing::Slots(ranges) => ranges
                .iter()
                .map(|&(first, last)| usize::from(last.saturating_sub(first)) + 1)
                .sum(),
            _ => 0,
        };
        self.isolating.store(
            failed_slots > 0 && failed_slots < usize::from(keys::MAX_BUCKETS),
            Ordering::Relaxed,
        );
        *self.failing.lock().unwrap_or_else(PoisonError::into_inner) = failing;
    }

    /// Whether the slot `slot()` names is on a cluster primary that failed
    /// at the watch's last look (not when everything failed).
    pub(super) fn primary_failing(&self, slot: impl FnOnce() -> u16) -> bool {
        self.covers(slot, false)
    }

    /// Whether a call for the slot `slot()` names (`None`: a call on no
    /// key) is not to be made: its primary failed the watch's last look
    /// while others answered. The call would wait out the Redis timeout, and
    /// the cluster client, asked for a node it lost its connection to, holds
    /// back every call of the instance while it reconnects; every user's
    /// calls timed out, opened the breaker they share, and the stream limit
    /// went unenforced for users whose primary answered. When every primary
    /// fails, the breaker decides, as on one node.
    pub(super) fn isolated(&self, slot: impl FnOnce() -> Option<u16>) -> bool {
        self.isolating.load(Ordering::Relaxed) && slot().is_some_and(|slot| self.covers(|| slot, false))
    }

    /// Whether the slot `slot()` names failed at the watch's last look.
    fn failing(&self, slot: impl FnOnce() -> u16) -> bool {
        self.covers(slot, true)
    }

    /// Whether what failed at the watch's last look covers the slot
    /// `slot()` names; `everything`: what "everything failed" says.
    fn covers(&self, slot: impl FnOnce() -> u16, everything: bool) -> bool {
        if !self.any_failing.load(Ordering::Relaxed) {
            return false;
        }
        match &*self.failing.lock().unwrap_or_else(PoisonError::into_inner) {
            Failing::Nothing => false,
            Failing::Everything => everything,
            Failing::Slots(ranges) => {
                let slot = slot();
                ranges.iter().any(|&(first, last)| (first..=last).contains(&slot))
            }
        }
    }
}

impl RedisStore {
    /// The last Redis outage end known (see the module).
    pub fn outage_ended_ms(&self) -> i64 {
        self.outages.ended_ms()
    }

    /// Whether the node holding `user`'s keys failed to answer at the
    /// watch's last look: if it answers now, its outage just ended and the
    /// end is not recorded yet.
    pub fn outage_unsettled(&self, user: &crate::model::UserId) -> bool {
        self.outages.failing(|| self.user_keys(user).bucket().slot())
    }

    /// Whether `user`'s keys are on a cluster primary that failed to answer
    /// at the watch's last look: a call for them would wait out the Redis
    /// timeout and count against the breaker every other user shares.
    pub fn primary_failing(&self, user: &crate::model::UserId) -> bool {
        self.outages
            .primary_failing(|| self.user_keys(user).bucket().slot())
    }

    /// Watches Redis while `alive` says so. Not through the guard: an open
    /// breaker would hide Redis' return, and one look at a time, each
    /// bounded by the Redis timeout, cannot pile up.
    pub fn outage_watch(
        &self,
        alive: impl Fn() -> bool + Send + 'static,
    ) -> impl Future<Output = ()> + Send + 'static {
        let redis = self.clone();
        async move {
            // Whether Redis failed to answer since it last did.
            let mut failed = false;
            let mut lookouts = Lookouts::new(redis.guard.timeout());
            let mut looks: u32 = 0;
            while alive() {
                let next = tokio::time::Instant::now() + WATCH_EVERY;
                let seen = redis.outages.call_failed.swap(false, Ordering::Relaxed);
                let learn = looks.is_multiple_of(LEARN_EVERY_LOOKS);
                failed = !redis.watched(failed || seen, learn, &mut lookouts).await;
                looks = looks.wrapping_add(1);
                tokio::time::sleep_until(next).await;
            }
        }
    }

    /// One look: whether Redis answered; when it did, the deployment's last
    /// outage end is recorded as now if Redis `failed` before, and learnt
    /// then or when `learn`.
    async fn watched(&self, failed: bool, learn: bool, lookouts: &mut Lookouts) -> bool {
        let timeout = self.guard.timeout();
        let failing = match &*self.connector {
            Connector::Cluster(link) => lookouts.failing_primaries(link, self).await,
            single => match tokio::time::timeout(timeout, prove_alive(single)).await {
                Ok(Ok(())) => Failing::Nothing,
                _ => Failing::Everything,
            },
        };
        lookouts.report(match &failing {
            Failing::Slots(_) => lookouts.failed.len(),
            _ => 0,
        });
        if failing != Failing::Nothing {
            self.outages.set_failing(failing);
            return false;
        }
        if failed || learn {
            let Ok(Ok(ended)) = tokio::time::timeout(timeout, self.last_outage_end(failed)).await else {
                return false;
            };
            if failed {
                tracing::info!(
                    ended_ms = ended,
                    "Redis answers again; resume positions older than this outage are checked against the internal API once"
                );
            }
            self.outages.learn(ended);
        }
        self.outages.set_failing(Failing::Nothing);
        true
    }

    /// The cluster's primaries changed (a replica took over): every cluster
    /// connection is made again now, each within a few Redis timeouts.
    /// Left to themselves they follow when calls fail, and calls for a
    /// primary that failed were not made.
    async fn follow_topology(&self) {
        let waiting = (self.waiting.iter()).flat_map(|waiting| waiting.connectors.iter());
        let remakes =
            std::iter::once(&*self.connector)
                .chain(waiting)
                .filter_map(|connector| match connector {
                    Connector::Cluster(link) => Some(link.remake(self.guard.timeout() * 4)),
                    Connector::Single(_) => None,
                });
        futures::future::join_all(remakes).await;
        self.outages.topology_changes.fetch_add(1, Ordering::Relaxed);
        tracing::info!("the Redis Cluster's primaries changed; its connections were made again");
    }

    /// The deployment's last outage end, recorded first as now when
    /// `record` (this instance saw one end just now).
    async fn last_outage_end(&self, record: bool) -> redis::RedisResult<i64> {
        let mut conn = self.conn().await?;
        let key = keys::outages();
        if record {
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(RECORD_END).arg(1).arg(&key).arg(ENDED);
            return cmd.query_async(&mut conn).await;
        }
        // A float in Redis' reply; ms since the epoch are exact in it.
        let ended: Option<f64> = redis::cmd("ZSCORE")
            .arg(&key)
            .arg(ENDED)
            .query_async(&mut conn)
            .await?;
        Ok(ended.map_or(0, |ms| ms as i64))
    }
}

/// The watch's own connection to each cluster node it asks, apart from the
/// cluster connection that calls go through. Asked for a node it holds no
/// live connection to (a paused primary, once its connection was dropped),
/// the cluster connection reconnects from its seeds and holds back every
/// call of the instance meanwhile (redis 1.8 `reconnect_to_initial_nodes`);
/// its fan-out to every primary silently leaves such a node out. Looking
/// every [`WATCH_EVERY`] through it kept every user's calls waiting for as
/// long as one primary hung.
pub(super) struct Lookouts {
    config: redis::AsyncConnectionConfig,
    timeout: Duration,
    /// By node URL.
    open: HashMap<String, MultiplexedConnection>,
    /// When making a connection to a node last failed. A hung node is not
    /// asked for another before [`TOPOLOGY_FOR`]: each would wait in its
    /// queue until it resumes.
    refused_at: HashMap<String, tokio::time::Instant>,
    /// The cluster's primaries as last read, and when.
    topology: Option<(tokio::time::Instant, Vec<Primary>)>,
    /// The URLs of the primaries that failed the last look.
    failed: HashSet<String>,
    /// `moneta_redis_primaries_failing`, and what it was last set to.
    reported: (metrics::Gauge, Option<usize>),
}

impl Lookouts {
    fn new(timeout: Duration) -> Self {
        Self {
            config: redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout)),
            timeout,
            open: HashMap::new(),
            refused_at: HashMap::new(),
            topology: None,
            failed: HashSet::new(),
            reported: (metrics::gauge!("moneta_redis_primaries_failing"), None),
        }
    }

    /// Sets the gauge when `failing` changed: the watch looks ten times a
    /// second.
    fn report(&mut self, failing: usize) {
        if self.reported.1 != Some(failing) {
            self.reported.0.set(failing as f64);
            self.reported.1 = Some(failing);
        }
    }

    /// The slot ranges of the primaries that do not answer a `PING`, each
    /// asked by its address on a connection of the watch's own. The
    /// primaries are read again (`CLUSTER SLOTS`, from one that answered)
    /// when the last reading is older than [`TOPOLOGY_FOR`]; if they cannot
    /// be, the last known stand.
    async fn failing_primaries(&mut self, link: &ClusterLink, redis: &RedisStore) -> Failing {
        let Some(seed) = link.seeds.first() else {
            return Failing::Everything;
        };
        // Read again at every look while a primary fails: its replica may
        // have taken over.
        let known = (self.topology.as_ref())
            .filter(|(at, _)| at.elapsed() < TOPOLOGY_FOR && self.failed.is_empty())
            .map(|(_, primaries)| primaries.clone());
        let primaries = match known {
            Some(primaries) => primaries,
            None => match self.read_topology(link, seed).await {
                Some(primaries) => {
                    let addresses = |primaries: &[Primary]| -> HashSet<(String, u16)> {
                        primaries
                            .iter()
                            .map(|(host, port, _)| (host.clone(), *port))
                            .collect()
                    };
                    if let Some((_, before)) = &self.topology
                        && addresses(before) != addresses(&primaries)
                    {
                        // Calls go on connections that followed the change
                        // before the new primaries' users are let through.
                        redis.follow_topology().await;
                    }
                    self.topology = Some((tokio::time::Instant::now(), primaries.clone()));
                    primaries
                }
                None => match &self.topology {
                    Some((_, primaries)) => primaries.clone(),
                    None => return Failing::Everything,
                },
            },
        };
        let urls: Vec<Option<String>> = (primaries.iter())
            .map(|(host, port, _)| super::url_at(seed, host, *port))
            .collect();
        let asked: Vec<String> = urls.iter().flatten().cloned().collect();
        let answers = self.ask_each(&asked, &redis::cmd("PING")).await;
        let answered: HashSet<&String> = (asked.iter().zip(&answers))
            .filter(|(_, answer)| answer.is_some())
            .map(|(url, _)| url)
            .collect();
        let mut failed = Vec::new();
        self.failed.clear();
        for ((_, _, ranges), url) in primaries.into_iter().zip(urls) {
            // A primary without an address to ask (`?`, or none known) is
            // not taken for failing: its users' calls would not be made.
            let Some(url) = url else { continue };
            if !answered.contains(&url) {
                self.failed.insert(url);
                failed.extend(ranges);
            }
        }
        // What the watch keeps of nodes no longer primaries goes.
        self.open.retain(|url, _| asked.contains(url));
        self.refused_at.retain(|url, _| asked.contains(url));
        match failed.is_empty() {
            true => Failing::Nothing,
            false => Failing::Slots(failed),
        }
    }

    /// The primaries, from the first node that tells: those that answered
    /// the last look, then every node the cluster connection knows of.
    async fn read_topology(&mut self, link: &ClusterLink, seed: &str) -> Option<Vec<Primary>> {
        let mut candidates: Vec<String> = Vec::new();
        if let Some((_, primaries)) = &self.topology {
            let urls = primaries
                .iter()
                .filter_map(|(host, port, _)| super::url_at(seed, host, *port));
            candidates.extend(urls.filter(|url| !self.failed.contains(url)));
        }
        for node in link.nodes() {
            if !candidates.contains(&node) {
                candidates.push(node);
            }
        }
        let mut cluster_slots = redis::cmd("CLUSTER");
        cluster_slots.arg("SLOTS");
        for url in candidates {
            let answer = self.ask_each(std::slice::from_ref(&url), &cluster_slots).await;
            let primaries = answer.into_iter().flatten().map(|slots| primaries(&slots));
            if let Some(found) = primaries.into_iter().find(|p| !p.is_empty()) {
                return Some(found);
            }
        }
        None
    }

    /// `cmd`'s answer from each node of `urls`, asked at once, each within
    /// the timeout. A connection that timed out is kept (a paused node
    /// answers on it once resumed); one that broke is made again.
    async fn ask_each(&mut self, urls: &[String], cmd: &redis::Cmd) -> Vec<Option<Value>> {
        let now = tokio::time::Instant::now();
        let to_make: Vec<&String> = (urls.iter())
            .filter(|url| !self.open.contains_key(*url))
            .filter(|url| {
                (self.refused_at.get(*url)).is_none_or(|at| now.duration_since(*at) >= TOPOLOGY_FOR)
            })
            .collect();
        let (config, timeout) = (&self.config, self.timeout);
        let made = futures::future::join_all(to_make.into_iter().map(|url| async move {
            let made = async {
                redis::Client::open(url.as_str())?
                    .get_multiplexed_async_connection_with_config(config)
                    .await
            };
            (url, tokio::time::timeout(timeout, made).await)
        }))
        .await;
        for (url, made) in made {
            match made {
                Ok(Ok(conn)) => {
                    self.refused_at.remove(url);
                    self.open.insert(url.clone(), conn);
                }
                _ => {
                    self.refused_at.insert(url.clone(), now);
                }
            }
        }
        let answers = futures::future::join_all(urls.iter().map(|url| {
            let conn = self.open.get(url).cloned();
            async move {
                let mut conn = conn?;
                let answer = tokio::time::timeout(timeout, cmd.query_async::<Value>(&mut conn)).await;
                Some(match answer {
                    Ok(Ok(value)) => Ok(value),
                    Ok(Err(e)) if !e.is_timeout() => Err(true),
                    _ => Err(false),
                })
            }
        }))
        .await;
        (urls.iter().zip(answers))
            .map(|(url, answer)| match answer? {
                Ok(value) => Some(value),
                Err(broken) => {
                    if broken {
                        self.open.remove(url);
                    }
                    None
                }
            })
            .collect()
    }
}

/// A primary's host, port and slot ranges.
type Primary = (String, u16, Vec<(u16, u16)>);

/// The primaries in a `CLUSTER SLOTS` reply (per slot range `[first, last,
/// [host, port, id, …], replicas…]`): each address with its ranges.
fn primaries(slots: &Value) -> Vec<Primary> {
    let Value::Array(ranges) = slots else {
        return Vec::new();
    };
    let mut found: Vec<Primary> = Vec::new();
    for range in ranges {
        let Value::Array(parts) = range else {
            continue;
        };
        let number = |at: usize| {
            parts
                .get(at)
                .and_then(|v| redis::from_redis_value_ref::<u16>(v).ok())
        };
        let (Some(first), Some(last), Some(Value::Array(node))) = (number(0), number(1), parts.get(2)) else {
            continue;
        };
        let address = node
            .first()
            .and_then(|v| redis::from_redis_value_ref::<String>(v).ok());
        let port = node
            .get(1)
            .and_then(|v| redis::from_redis_value_ref::<u16>(v).ok());
        let (Some(host), Some(port)) = (address, port) else {
            continue;
        };
        match found.iter_mut().find(|(h, p, _)| *h == host && *p == port) {
            Some((_, _, ranges)) => ranges.push((first, last)),
            None => found.push((host, port, vec![(first, last)])),
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_end_is_kept() {
        let outages = Outages::default();
        assert_eq!(outages.ended_ms(), 0);
        outages.learn(2_000);
        outages.learn(1_000);
        assert_eq!(outages.ended_ms(), 2_000);
    }

    #[test]
    fn primaries_are_read_from_cluster_slots() {
        let node = |port: i64| {
            Value::Array(vec![
                Value::BulkString(b"127.0.0.1".to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let range = |first: i64, primary: i64, replica: i64| {
            Value::Array(vec![
                Value::Int(first),
                Value::Int(first + 1),
                node(primary),
                node(replica),
            ])
        };
        let slots = Value::Array(vec![
            range(0, 7001, 7004),
            range(2, 7002, 7005),
            range(4, 7001, 7004),
        ]);
        assert_eq!(
            primaries(&slots),
            vec![
                ("127.0.0.1".to_owned(), 7001, vec![(0, 1), (4, 5)]),
                ("127.0.0.1".to_owned(), 7002, vec![(2, 3)])
            ]
        );
        assert!(primaries(&Value::Nil).is_empty());
    }

    #[test]
    fn only_the_slots_that_failed_are_unsettled() {
        let outages = Outages::default();
        assert!(!outages.failing(|| 5));
        outages.set_failing(Failing::Slots(vec![(0, 10), (100, 200)]));
        assert!(outages.failing(|| 5));
        assert!(outages.failing(|| 150));
        assert!(!outages.failing(|| 50));
        outages.set_failing(Failing::Everything);
        assert!(outages.failing(|| 50));
        outages.set_failing(Failing::Nothing);
        assert!(!outages.failing(|| 5));
    }

    #[test]
    fn calls_are_held_back_only_for_the_primaries_that_fail_while_others_answer() {
        let outages = Outages::default();
        assert!(!outages.isolated(|| Some(7000)));
        outages.set_failing(Failing::Slots(vec![(5461, 10922)]));
        assert!(outages.isolated(|| Some(7000)));
        assert!(!outages.isolated(|| Some(12000)), "a primary that answers");
        assert!(!outages.isolated(|| None), "a call on no key");
        // Every primary fails: Redis' outage, which the breaker judges.
        outages.set_failing(Failing::Slots(vec![(0, 5460), (5461, 10922), (10923, 16383)]));
        assert!(!outages.isolated(|| Some(7000)));
        outages.set_failing(Failing::Everything);
        assert!(!outages.isolated(|| Some(7000)));
        outages.set_failing(Failing::Nothing);
        assert!(!outages.isolated(|| Some(7000)));
    }

    #[test]
    fn held_positions_wait_only_for_a_primary_that_failed() {
        let outages = Outages::default();
        assert!(!outages.primary_failing(|| 7000));
        outages.set_failing(Failing::Slots(vec![(5461, 10922), (0, 5460)]));
        assert!(outages.primary_failing(|| 7000) && !outages.primary_failing(|| 12000));
        // On one node (or an unreadable topology) the breaker decides.
        outages.set_failing(Failing::Everything);
        assert!(!outages.primary_failing(|| 7000));
    }
}

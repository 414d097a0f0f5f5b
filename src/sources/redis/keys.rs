//! Every Redis key Moneta uses, in one place.
//!
//! Users map to a fixed number of buckets (`MONETA_REDIS_BUCKETS`). A bucket
//! is one hash tag, `{b<n>}`: every per-user key of its users and the
//! bucket's progress log, parked hash and dead letters share it, so one
//! script writes a heartbeat's position and its log entry atomically in Redis
//! Cluster as on a single node, while the buckets spread the log over the
//! shards. A user's bucket is the Redis Cluster key slot of the user id
//! (CRC16/XMODEM modulo 16384, the id taken whole) modulo the number of
//! buckets: stable across processes, versions and platforms, and
//! reproducible with `redis-cli CLUSTER KEYSLOT <user id>` for ids without
//! braces.
//!
//! Inside a key the user id is escaped, so a `{`, `}`, `:` or `%` in it can
//! neither open a hash tag of its own nor make two users' keys collide.
//!
//! Keys of the layout before buckets (`moneta:{u:<user>}:…` per user, one
//! `moneta:{progress}` log) are read only to drain the progress log they may
//! still hold ([`Shard::Legacy`]).

use std::fmt::Write;

use crate::model::{ContentId, UserId};

const PREFIX: &str = "moneta";

/// Redis Cluster's number of hash slots: more buckets could not spread further.
pub const MAX_BUCKETS: u16 = 16_384;

/// Cached title (fresh/stale envelope), shared by all users.
pub fn content(content_id: &ContentId) -> String {
    format!("{PREFIX}:content:{content_id}")
}

/// When the last Redis outage an instance saw ended (Redis' clock, ms): the
/// score of member `ended` in a sorted set, so `ZADD GT` keeps the latest
/// without a script. One key for the deployment (`outages`).
pub fn outages() -> String {
    format!("{PREFIX}:outages")
}

/// CRC16/XMODEM (polynomial 0x1021, initial value 0), the checksum Redis
/// Cluster hashes keys with.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The Redis Cluster slot of `bytes` taken whole (without looking for a
/// hash tag inside them).
pub fn key_slot(bytes: &[u8]) -> u16 {
    crc16(bytes) % MAX_BUCKETS
}

/// The slot of the first of Moneta's keys among `args` (`moneta:{tag}…`,
/// hashed by its tag as Redis Cluster does), if any.
pub fn slot_of_first_key<'a>(args: impl IntoIterator<Item = &'a [u8]>) -> Option<u16> {
    args.into_iter().find_map(|arg| {
        let rest = arg.strip_prefix(PREFIX.as_bytes())?.strip_prefix(b":{")?;
        let end = rest.iter().position(|&b| b == b'}').filter(|&end| end > 0)?;
        Some(key_slot(&rest[..end]))
    })
}

/// How users are spread over buckets: the same count on every instance of a
/// deployment, or the same user's keys live under two tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buckets(u16);

impl Buckets {
    /// `count` is kept within 1..=[`MAX_BUCKETS`] (the settings refuse
    /// anything else before this is reached).
    pub fn new(count: u16) -> Self {
        Self(count.clamp(1, MAX_BUCKETS))
    }

    pub fn count(self) -> u16 {
        self.0
    }

    pub fn of(self, user: &UserId) -> Bucket {
        Bucket(key_slot(user.as_str().as_bytes()) % self.0)
    }

    /// Bucket 0, which every count has.
    pub fn first(self) -> Bucket {
        Bucket(0)
    }

    pub fn all(self) -> impl Iterator<Item = Bucket> {
        (0..self.0).map(Bucket)
    }

    /// The keys of one user, in the user's bucket.
    pub fn user(self, user: &UserId) -> UserKeys {
        UserKeys::new(self.of(user), user)
    }

    /// Every shard of the progress log: the layout before buckets first, then
    /// every bucket.
    pub fn shards(self) -> Vec<Shard> {
        std::iter::once(Shard::Legacy)
            .chain(self.all().map(Shard::Bucket))
            .collect()
    }
}

/// One bucket: one hash tag, one cluster slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Bucket(u16);

impl Bucket {
    pub fn index(self) -> u16 {
        self.0
    }

    /// The Redis Cluster slot of the bucket's keys (of its hash tag, `b<n>`).
    pub fn slot(self) -> u16 {
        key_slot(format!("b{}", self.0).as_bytes())
    }

    /// A key of the bucket that is never written: what a question with no
    /// key of its own (Redis' time) is routed by in a cluster.
    pub fn clock(self) -> String {
        let mut key = self.tag();
        key.push_str(":clock");
        key
    }

    /// `moneta:{b<n>}`: the start of every key of the bucket. Room for the
    /// longest key's suffix. Written piece by piece: every heartbeat names
    /// its bucket's keys, and `format!` cost ~4 times as much.
    fn tag(self) -> String {
        let mut tag = String::with_capacity(PREFIX.len() + 64);
        tag.push_str(PREFIX);
        tag.push_str(":{b");
        tag.push_str(itoa::Buffer::new().format(self.0));
        tag.push('}');
        tag
    }
}

/// Where a part of the progress log lives: a bucket's keys, or the single
/// `{progress}` log of the layout before buckets, drained while it holds
/// anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Shard {
    Legacy,
    Bucket(Bucket),
}

impl Shard {
    fn tag(self) -> String {
        match self {
            Shard::Legacy => format!("{PREFIX}:{{progress}}"),
            Shard::Bucket(bucket) => bucket.tag(),
        }
    }

    fn key(self, suffix: &str) -> String {
        let mut key = self.tag();
        key.push_str(suffix);
        key
    }

    /// Stream of positions acknowledged to players and not yet delivered to
    /// the internal API (consumer group `delivery`).
    pub fn log(self) -> String {
        self.key(":log")
    }

    /// Hash of positions the internal API could not take yet, one field per
    /// (user, title): an outage parks distinct pairs, not heartbeats.
    pub fn parked(self) -> String {
        self.key(":parked")
    }

    /// Stream of positions the internal API failed to take alone
    /// `MONETA_PROGRESS_MAX_ATTEMPTS` times while it took others (poison
    /// items), kept for `moneta progress dead-letters` / `replay` instead of
    /// being dropped. Bounded (`XADD MAXLEN ~`).
    pub fn dead(self) -> String {
        self.key(":dead")
    }

    pub fn is_legacy(self) -> bool {
        matches!(self, Shard::Legacy)
    }
}

/// The keys of one user; all of them, and the user's bucket's progress
/// keys, hash to the same cluster slot.
pub struct UserKeys {
    bucket: Bucket,
    /// `moneta:{b<n>}:u:<escaped user>`
    base: String,
}

impl UserKeys {
    fn new(bucket: Bucket, user_id: &UserId) -> Self {
        let mut base = bucket.tag();
        base.reserve(user_id.as_str().len() + 4);
        base.push_str(":u:");
        for c in user_id.as_str().chars() {
            match c {
                '{' | '}' | ':' | '%' => {
                    let _ = write!(base, "%{:02X}", c as u32);
                }
                c => base.push(c),
            }
        }
        Self { bucket, base }
    }

    /// The user's base and `suffix`, without `format!`'s machinery (a
    /// playback-info names two keys, a heartbeat six).
    fn with(&self, suffix: &str) -> String {
        let mut key = String::with_capacity(self.base.len() + suffix.len());
        key.push_str(&self.base);
        key.push_str(suffix);
        key
    }

    /// Cached entitlement JSON (`null` when the user has none).
    pub fn entitlement(&self) -> String {
        self.with(":entitlement")
    }
    /// Hash: content id → resume position in ms.
    pub fn positions(&self) -> String {
        self.with(":positions")
    }
    /// Sorted set: session id → last heartbeat (ms since epoch, Redis' clock).
    pub fn sessions(&self) -> String {
        self.with(":sessions")
    }
    /// Hash: session id → "device_id content_id".
    pub fn session_info(&self) -> String {
        self.with(":session-info")
    }
    /// Hash: device id → its live session id (finds the session a device replaces).
    pub fn devices(&self) -> String {
        self.with(":devices")
    }
    /// Sorted set of recently ended sessions (`e:<id>` evicted, `s:<id>`
    /// stopped, replaced or expired) → when each was issued, and per kind a
    /// mark of the latest issued among those no longer listed: their ids
    /// stay ended, and an evicted player's next heartbeat can say why.
    /// Bounded per user by the scripts (`session_lib.lua`, `bury`).
    pub fn ended(&self) -> String {
        self.with(":ended")
    }
    /// The progress log of the user's bucket: the session scripts append to
    /// it in the same atomic step that records the position.
    pub fn log(&self) -> String {
        Shard::Bucket(self.bucket).log()
    }
    pub fn bucket(&self) -> Bucket {
        self.bucket
    }

    /// `EVALSHA <hash> 6` and the keys of a session script, in its `KEYS`
    /// order: sessions, session-info, devices, ended, positions and the
    /// bucket's log; arguments still to come. The keys are written from the
    /// one base into a command sized once: formatted one by one, with the
    /// command regrowing, they were ~7 k instructions of a heartbeat.
    pub fn session_script_call(&self, hash: &str) -> redis::Cmd {
        // `EVALSHA`, hash, key count, 6 keys and up to 8 arguments; room
        // for the keys and 256 bytes of everything else.
        let mut call = redis::Cmd::with_capacity(17, 256 + 6 * (self.base.len() + 16));
        call.arg("EVALSHA").arg(hash).arg(6);
        let mut key = String::with_capacity(self.base.len() + 16);
        for suffix in [":sessions", ":session-info", ":devices", ":ended", ":positions"] {
            key.clear();
            key.push_str(&self.base);
            key.push_str(suffix);
            call.arg(key.as_str());
        }
        call.arg(self.log());
        call
    }
}

/// The cluster hash slot part of a key (what Redis Cluster hashes).
pub fn hash_tag(key: &str) -> &str {
    let tag = key
        .split_once('{')
        .and_then(|(_, rest)| rest.split_once('}'))
        .map(|(tag, _)| tag);
    match tag {
        Some(tag) if !tag.is_empty() => tag,
        _ => key,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use redis::cluster_routing::Slot;

    use super::*;

    const BUCKETS: Buckets = Buckets(64);

    fn user(s: &str) -> UserId {
        UserId::parse(s).unwrap()
    }

    fn every_key(k: &UserKeys) -> [String; 7] {
        [
            k.entitlement(),
            k.positions(),
            k.sessions(),
            k.session_info(),
            k.devices(),
            k.ended(),
            k.log(),
        ]
    }

    #[test]
    fn user_keys_and_their_buckets_progress_keys_share_one_hash_tag() {
        for id in ["user-42", "a}b{c:d", "%7B", "{", "}{", "x:y", "u 1"] {
            let k = BUCKETS.user(&user(id));
            let shard = Shard::Bucket(k.bucket());
            let tag = format!("b{}", k.bucket().index());
            for key in every_key(&k).iter().chain(&[shard.parked(), shard.dead()]) {
                assert_eq!(hash_tag(key), tag, "{id:?}: {key}");
                // What Redis Cluster itself hashes.
                assert_eq!(Slot::for_key(key), Slot::for_key(format!("{{{tag}}}")), "{key}");
            }
        }
    }

    #[test]
    fn the_layout_is_the_documented_one() {
        let k = BUCKETS.user(&user("user-42"));
        let b = k.bucket().index();
        assert_eq!(k.sessions(), format!("moneta:{{b{b}}}:u:user-42:sessions"));
        assert_eq!(k.log(), format!("moneta:{{b{b}}}:log"));
        assert_eq!(Shard::Legacy.log(), "moneta:{progress}:log");
        assert_eq!(Shard::Legacy.parked(), "moneta:{progress}:parked");
        assert_eq!(Shard::Legacy.dead(), "moneta:{progress}:dead");
    }

    #[test]
    fn escaped_user_ids_cannot_collide() {
        let k = BUCKETS.user(&user("a}b{c:d"));
        assert!(
            k.sessions().ends_with(":u:a%7Db%7Bc%3Ad:sessions"),
            "{}",
            k.sessions()
        );
        let ids = [
            "a:b",
            "a%3Ab",
            "a%b",
            "a%25b",
            "a}",
            "a%7D",
            "a{",
            "a%7B",
            "a",
            "a:sessions",
        ];
        let keys: BTreeSet<String> = ids
            .iter()
            .flat_map(|id| every_key(&BUCKETS.user(&user(id))))
            .filter(|key| !key.ends_with(":log"))
            .collect();
        assert_eq!(keys.len(), ids.len() * 6, "two users share a key");
    }

    #[test]
    fn the_bucket_is_redis_own_key_slot_of_the_user_id() {
        // The check value of CRC16/XMODEM.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        for id in ["user-42", "u-basic", "load-poison", "x"] {
            assert_eq!(
                Slot::new(key_slot(id.as_bytes())),
                Some(Slot::for_key(id)),
                "{id}"
            );
            let bucket = BUCKETS.of(&user(id)).index();
            assert_eq!(bucket, key_slot(id.as_bytes()) % 64);
        }
        // Fixed once and for all, whatever the process, version or platform
        // (`redis-cli CLUSTER KEYSLOT user-42` answers 14587).
        assert_eq!(key_slot(b"user-42"), 14_587);
        assert_eq!(BUCKETS.of(&user("user-42")).index(), 59);
    }

    #[test]
    fn users_spread_over_every_bucket() {
        let mut per_bucket: BTreeMap<u16, usize> = BTreeMap::new();
        for i in 0..6_400 {
            *per_bucket
                .entry(BUCKETS.of(&user(&format!("user-{i}"))).index())
                .or_default() += 1;
        }
        assert_eq!(per_bucket.len(), 64);
        let (least, most) = (per_bucket.values().min(), per_bucket.values().max());
        assert!(least >= Some(&70) && most <= Some(&130), "{per_bucket:?}");
    }

    #[test]
    fn buckets_spread_over_the_slots_of_a_three_shard_cluster() {
        // `redis-cli --cluster create` gives each of three primaries a third
        // of the slots, in one range each.
        let mut per_shard = [0usize; 3];
        let mut slots = BTreeSet::new();
        for bucket in BUCKETS.all() {
            let slot = bucket.slot();
            slots.insert(slot);
            per_shard[usize::from(slot) * 3 / usize::from(MAX_BUCKETS)] += 1;
        }
        assert_eq!(slots.len(), 64, "two buckets share a slot");
        assert!(per_shard.iter().all(|n| *n >= 16), "{per_shard:?}");
    }

    #[test]
    fn bucket_counts_stay_within_the_slots() {
        assert_eq!(Buckets::new(0).count(), 1);
        assert_eq!(Buckets::new(u16::MAX).count(), MAX_BUCKETS);
        assert_eq!(Buckets::new(1).of(&user("anyone")).index(), 0);
        assert_eq!(Buckets::new(3).shards().len(), 4);
        assert_eq!(Buckets::new(3).shards()[0], Shard::Legacy);
    }

    #[test]
    fn content_keys_are_per_title() {
        let id = ContentId::parse("m-0001").unwrap();
        assert_eq!(content(&id), "moneta:content:m-0001");
    }

    #[test]
    fn a_session_script_call_names_the_keys_of_its_user_in_order() {
        let buckets = Buckets::new(64);
        for id in ["user-42", "a}b{c:d", "x:sessions", "%7B"] {
            let keys = buckets.user(&UserId::parse(id).expect("valid id"));
            let call = keys.session_script_call("abc");
            let args: Vec<String> = call
                .args_iter()
                .map(|a| match a {
                    redis::Arg::Simple(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                    _ => String::new(),
                })
                .collect();
            let expected = [
                "EVALSHA".to_owned(),
                "abc".to_owned(),
                "6".to_owned(),
                keys.sessions(),
                keys.session_info(),
                keys.devices(),
                keys.ended(),
                keys.positions(),
                keys.log(),
            ];
            assert_eq!(args, expected, "{id}");
        }
    }

    #[test]
    fn the_slot_of_a_group_is_its_first_key_s_tag() {
        let bucket = Buckets::new(64).user(&UserId::parse("u-1").unwrap()).bucket();
        let key = Shard::Bucket(bucket).log();
        let args: [&[u8]; 4] = [b"EVALSHA", b"0123abcd", b"1", key.as_bytes()];
        assert_eq!(slot_of_first_key(args), Some(bucket.slot()));
        let none: [&[u8]; 2] = [b"PING", b"moneta:{}:x"];
        assert_eq!(slot_of_first_key(none), None);
        assert_eq!(
            slot_of_first_key([b"moneta:{progress}:log".as_slice()]),
            Some(key_slot(b"progress"))
        );
    }
}

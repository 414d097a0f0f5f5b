//! The progress log: positions acknowledged to players, kept in Redis until
//! the internal API has them (at-least-once delivery).
//!
//! Every bucket (see `keys`) has its own shard of the log: a Redis Stream
//! with one consumer group, a parked hash and a dead-letter stream, all under
//! the bucket's hash tag. The session scripts append to the stream of the
//! user's bucket in the same atomic step that records the position. Every
//! instance reads every shard (`XREADGROUP`), and entries read by an instance
//! that died are taken over by another after a short idle time
//! (`XAUTOCLAIM`): no instance owns a bucket. Entries the internal API cannot
//! take now are folded into the shard's parked hash, one field per (user,
//! title), so an outage parks distinct pairs rather than heartbeats, and are
//! offered again beside fresh entries on every round. An item that fails
//! alone too often while others are delivered moves to the shard's bounded
//! dead-letter stream. A round is settled shard by shard, each by one script
//! on that shard's keys. How many times an item failed alone travels with it
//! (the `a` field of an entry, `attempts` in a parked value), so every
//! instance and every restart counts on from the same number.
//!
//! The single `{progress}` log of the layout before buckets is one more
//! shard, drained while it holds anything and never created again.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

// foldhash, seeded per process, for a round's maps (as the courier's).
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use redis::{Cmd, Script, Value};
use serde::{Deserialize, Serialize};

use super::catalog::CheckedPosition;
use super::grouped::{Group, all_answered, error_code};
use super::keys::{Bucket, Shard, UserKeys};
use super::{On, POSITION_TTL_S, RedisStore, millis_to_utc};
use crate::model::{ContentId, PositionMs, ProgressItem, ResumePoint, UserId};
use crate::resilience::DependencyError;

static SETTLE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/settle.lua")));
static REMEMBER: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/remember.lua")));
static READ: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/read.lua")));

pub const PROGRESS_GROUP: &str = "delivery";

/// Entries read by a consumer and not settled for this long belong to an
/// instance that died (or hung); another takes them over. Far above a round's
/// duration (a batch post is bounded by the internal API's timeout).
const CLAIM_IDLE: Duration = Duration::from_secs(15);

/// The dead-letter stream of a shard keeps about this many items (`XADD
/// MAXLEN ~`): poison items are rare, and an operator replays them long
/// before.
const DEAD_LETTERS_KEPT: u64 = 10_000;

/// Reads per round: every shard's share, then what the shards that had more
/// than their share may take of what the others left.
const STAGES: usize = 2;

/// Once the `{progress}` log of the layout before buckets held nothing (or
/// does not exist), it is looked at again only this much later: a round
/// pays for it while it drains, not for ever.
const LEGACY_RECHECK: Duration = Duration::from_secs(60);

/// The log's handle for one consumer (one instance).
#[derive(Clone)]
pub struct ProgressLog {
    redis: RedisStore,
    consumer: String,
    walk: Arc<Walk>,
}

/// Where the walk over the shards stands, across rounds.
struct Walk {
    /// The first shard to get one more than the others, so that no shard
    /// always gets the smaller share.
    next: AtomicUsize,
    born: Instant,
    /// Milliseconds since `born` before which the `{progress}` log is not
    /// read (0: read it).
    legacy_quiet_until: AtomicU64,
}

impl Walk {
    fn new() -> Self {
        Self {
            next: AtomicUsize::new(0),
            born: Instant::now(),
            legacy_quiet_until: AtomicU64::new(0),
        }
    }

    fn legacy_due(&self) -> bool {
        self.born.elapsed().as_millis() as u64 >= self.legacy_quiet_until.load(Ordering::Relaxed)
    }

    fn legacy_seen(&self, held_something: bool) {
        let until = if held_something {
            0
        } else {
            (self.born.elapsed() + LEGACY_RECHECK).as_millis() as u64
        };
        self.legacy_quiet_until.store(until, Ordering::Relaxed);
    }
}

/// An entry of the log: its id in the stream of its shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryId {
    shard: Shard,
    id: String,
}

/// A field of a parked hash: its name in the hash of its shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedField {
    shard: Shard,
    field: String,
}

#[cfg(test)]
impl EntryId {
    pub(crate) fn for_tests(id: &str) -> Self {
        Self {
            shard: Shard::Legacy,
            id: id.to_owned(),
        }
    }
}

#[cfg(test)]
impl ParkedField {
    pub(crate) fn for_tests(field: String) -> Self {
        Self {
            shard: Shard::Legacy,
            field,
        }
    }
}

/// An item and the times it failed alone so far.
pub type Tried = (ProgressItem, u32);

/// One round's work: fresh entries of the log and a sample of parked pairs,
/// each with the number of times it already failed alone.
#[derive(Debug, Default)]
pub struct Delivery {
    /// (entry, (item, attempts)); an entry that does not parse is settled
    /// as done, with `None`.
    pub fresh: Vec<(EntryId, Option<Tried>)>,
    /// (field, raw value, (item, attempts)); a value that does not parse is
    /// settled as done, with `None`.
    pub parked: Vec<(ParkedField, String, Option<Tried>)>,
    /// How many of them a sweep brought (entries taken over, parked pairs).
    pub swept: usize,
}

/// A position moved to the dead letters: its fields in the stream.
#[derive(Debug, Clone)]
struct Buried {
    item: ProgressItem,
    attempts: u32,
    error: String,
}

/// How a round ended for each piece of it, applied by [`ProgressLog::settle`]
/// in one atomic script per shard.
#[derive(Debug, Default)]
pub struct Settlement {
    shards: BTreeMap<Shard, ShardSettlement>,
    /// Positions held in memory moved to the dead letters (of their user's
    /// bucket, known only to the store).
    buried_from_memory: Vec<Buried>,
}

/// The part of a settlement on one shard's keys: the sections of `settle.lua`.
#[derive(Debug, Default)]
struct ShardSettlement {
    done: Vec<String>,
    forget: Vec<(String, String)>,
    retry: Vec<(String, String, String)>,
    bury: Vec<(String, String, Buried)>,
    dead: Vec<(String, Buried)>,
    park: Vec<(String, String, String)>,
}

impl ShardSettlement {
    fn is_empty(&self) -> bool {
        self.done.is_empty()
            && self.forget.is_empty()
            && self.retry.is_empty()
            && self.bury.is_empty()
            && self.dead.is_empty()
            && self.park.is_empty()
    }
}

impl Settlement {
    fn on(&mut self, shard: Shard) -> &mut ShardSettlement {
        self.shards.entry(shard).or_default()
    }

    /// A fresh entry delivered, refused for good or unparseable: it leaves the log.
    pub fn done(&mut self, id: EntryId) {
        self.on(id.shard).done.push(id.id);
    }

    /// A parked field delivered (or refused for good): removed unless it changed meanwhile.
    pub fn forget_parked(&mut self, field: ParkedField, value: String) {
        self.on(field.shard).forget.push((field.field, value));
    }

    /// A fresh entry not delivered: parked in its shard (unless a newer
    /// position of its pair is), with the times it failed alone so far.
    pub fn park(&mut self, id: EntryId, item: &ProgressItem, attempts: u32) {
        let parked = (id.id, field(item), parked_value(item, attempts));
        self.on(id.shard).park.push(parked);
    }

    /// A parked field that failed alone once more: its count goes up,
    /// unless the field changed meanwhile.
    pub fn retry_parked(&mut self, field: ParkedField, value: String, item: &ProgressItem, attempts: u32) {
        let new = parked_value(item, attempts);
        self.on(field.shard).retry.push((field.field, value, new));
    }

    /// A parked field that failed alone `attempts` times: moved to the dead
    /// letters, unless it changed meanwhile.
    pub fn bury_parked(
        &mut self,
        field: ParkedField,
        value: String,
        item: &ProgressItem,
        attempts: u32,
        error: &str,
    ) {
        let buried = buried(item, attempts, error);
        self.on(field.shard).bury.push((field.field, value, buried));
    }

    /// A fresh entry that failed alone `attempts` times: moved to the dead letters.
    pub fn bury_entry(&mut self, id: EntryId, item: &ProgressItem, attempts: u32, error: &str) {
        let buried = buried(item, attempts, error);
        self.on(id.shard).dead.push((id.id, buried));
    }

    /// A position held in memory that failed alone `attempts` times.
    pub fn bury(&mut self, item: &ProgressItem, attempts: u32, error: &str) {
        self.buried_from_memory.push(buried(item, attempts, error));
    }

    pub fn is_empty(&self) -> bool {
        self.buried_from_memory.is_empty() && self.shards.values().all(ShardSettlement::is_empty)
    }
}

fn buried(item: &ProgressItem, attempts: u32, error: &str) -> Buried {
    Buried {
        item: item.clone(),
        attempts,
        error: error.to_owned(),
    }
}

/// One dead-lettered position, as `moneta progress dead-letters` lists it.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub id: String,
    shard: Shard,
    /// `None` when the entry does not parse (it is listed, never replayed).
    pub item: Option<ProgressItem>,
    pub attempts: u32,
    pub last_error: String,
}

impl DeadLetter {
    pub fn to_json(&self) -> serde_json::Value {
        let stream = self.shard.dead();
        match &self.item {
            Some(item) => serde_json::json!({
                "entry_id": self.id,
                "stream": stream,
                "user_id": item.user_id,
                "content_id": item.content_id,
                "position_ms": item.position_ms,
                "updated_at": item.updated_at,
                "completed": item.completed,
                "attempts": self.attempts,
                "last_error": self.last_error,
            }),
            None => serde_json::json!({"entry_id": self.id, "stream": stream, "invalid": true}),
        }
    }
}

fn field(item: &ProgressItem) -> String {
    // Neither id may hold a control character, so '\n' separates them unambiguously.
    format!("{}\n{}", item.user_id, item.content_id)
}

/// What a parked value holds besides the '<updated_at_ms> ' prefix the
/// settle script compares. Values written before attempts were counted parse
/// with none.
#[derive(Serialize, Deserialize)]
struct ParkedJson {
    #[serde(flatten)]
    item: ProgressItem,
    #[serde(default, skip_serializing_if = "is_zero")]
    attempts: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn parked_value(item: &ProgressItem, attempts: u32) -> String {
    let json = ParkedJson {
        item: item.clone(),
        attempts,
    };
    format!(
        "{} {}",
        item.updated_at.timestamp_millis(),
        serde_json::to_string(&json).unwrap_or_default()
    )
}

fn parse_parked(value: &str) -> Option<(ProgressItem, u32)> {
    let (_, json) = value.split_once(' ')?;
    let parked: ParkedJson = serde_json::from_str(json).ok()?;
    Some((parked.item, parked.attempts))
}

/// An `XADD` entry back into an item and its attempts; `None` if anything
/// is off. Entries carry the item packed in one field, `i` =
/// `<position_ms> <updated_at_ms> <0|1 completed> <content_id> <user_id>`
/// (the user last: a token's subject may hold spaces), and `a`, the
/// attempts, when it was tried before. The courier reads every heartbeat's
/// entry back, and the Redis client parses and frees each field of a reply
/// as a value of its own: one field instead of five took ~10 k instructions
/// off each heartbeat. Entries written with one field per part (`u c p t
/// [w]`: dead letters, and logs from before the packing) still read.
fn parse_entry(fields: &[(&str, &str)]) -> Option<(ProgressItem, u32)> {
    let get = |name: &str| fields.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
    let item = match get("i") {
        Some(packed) => {
            let [position, at, completed, content, user] = packed_parts(packed)?;
            item_of(user, content, position, at, Some(completed))?
        }
        None => item_of(get("u")?, get("c")?, get("p")?, get("t")?, get("w"))?,
    };
    let attempts = get("a").and_then(|a| a.parse().ok()).unwrap_or(0);
    Some((item, attempts))
}

/// A packed entry's five parts, the last (the user id, which may hold
/// spaces) running to the end. A byte loop: `splitn(5, ' ')` searched each
/// space with `memchr`, ~170 instructions a part on strings this short, in
/// the courier that reads back every heartbeat.
fn packed_parts(packed: &str) -> Option<[&str; 5]> {
    let mut parts = [""; 5];
    let mut rest = packed;
    for part in parts.iter_mut().take(4) {
        let (head, tail) = rest.split_at_checked(rest.bytes().position(|b| b == b' ')?)?;
        *part = head;
        rest = tail.get(1..)?;
    }
    parts[4] = rest;
    Some(parts)
}

fn item_of(
    user: &str,
    content: &str,
    position: &str,
    at: &str,
    completed: Option<&str>,
) -> Option<ProgressItem> {
    Some(ProgressItem {
        user_id: UserId::parse(user).ok()?,
        content_id: ContentId::parse(content).ok()?,
        position_ms: PositionMs::new(position.parse().ok()?).ok()?,
        updated_at: millis_to_utc(at.parse().ok()?),
        completed: completed == Some("1"),
        provisional: false,
    })
}

fn parse_dead_letter(shard: Shard, id: &str, fields: &[(&str, &str)]) -> DeadLetter {
    let parsed = parse_entry(fields);
    let last_error = fields
        .iter()
        .find(|(k, _)| *k == "e")
        .map(|(_, v)| (*v).to_owned())
        .unwrap_or_default();
    DeadLetter {
        id: id.to_owned(),
        shard,
        attempts: parsed.as_ref().map_or(0, |(_, a)| *a),
        item: parsed.map(|(item, _)| item),
        last_error,
    }
}

/// Pairs as either protocol answers them: RESP2 as a flat array, RESP3 as a
/// map or as an array of two-element arrays (the connection speaks RESP3 when
/// the client-side cache is on).
fn pairs_of(value: &Value) -> Vec<(&Value, &Value)> {
    match value {
        Value::Map(pairs) => pairs.iter().map(|(k, v)| (k, v)).collect(),
        Value::Array(items) if items.iter().all(|i| matches!(i, Value::Array(p) if p.len() == 2)) => items
            .iter()
            .filter_map(|i| match i {
                Value::Array(p) => Some((p.first()?, p.get(1)?)),
                _ => None,
            })
            .collect(),
        Value::Array(items) => items
            .chunks(2)
            .filter_map(|kv| Some((kv.first()?, kv.get(1)?)))
            .collect(),
        _ => Vec::new(),
    }
}

/// A stream entry: its id and its (field, value) pairs, borrowed from the
/// reply (a round decodes hundreds of entries: no copy of each field).
type StreamEntry<'a> = (&'a str, Vec<(&'a str, &'a str)>);

/// A reply's text, borrowed.
fn text(value: &Value) -> Option<&str> {
    match value {
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok(),
        Value::SimpleString(s) => Some(s),
        Value::VerbatimString { text, .. } => Some(text),
        _ => None,
    }
}

/// Stream replies as (id, [(field, value)]) whatever the command. An entry
/// without fields (deleted while pending) has none.
fn entries(value: &Value) -> Vec<StreamEntry<'_>> {
    let Value::Array(list) = value else {
        return Vec::new();
    };
    list.iter()
        .filter_map(|entry| {
            let Value::Array(parts) = entry else { return None };
            let id = text(parts.first()?)?;
            let pairs = match parts.get(1) {
                Some(Value::Array(fields)) => fields
                    .chunks_exact(2)
                    .filter_map(|kv| Some((text(kv.first()?)?, text(kv.get(1)?)?)))
                    .collect(),
                _ => Vec::new(),
            };
            Some((id, pairs))
        })
        .collect()
}

/// `XAUTOCLAIM`'s answer: the cursor to go on from (`0-0` once the pending
/// entries were all looked at) and the entries taken over.
fn claimed(value: &Value) -> (String, Vec<StreamEntry<'_>>) {
    let Value::Array(parts) = value else {
        return ("0-0".to_owned(), Vec::new());
    };
    let cursor = parts.first().and_then(text).unwrap_or("0-0").to_owned();
    (cursor, parts.get(1).map(entries).unwrap_or_default())
}

/// The resume position an item leaves in the user's positions hash.
fn position_value(item: &ProgressItem) -> String {
    ResumePoint {
        position_ms: item.position_ms.get(),
        completed: item.completed,
    }
    .encode_at(item.updated_at.timestamp_millis())
}

/// What one user's positions held in memory need from Redis: resume
/// positions to write, and entries (with their attempts) for the log.
#[derive(Default)]
struct UserHomecoming<'a> {
    positions: Vec<&'a ProgressItem>,
    logged: Vec<(&'a ProgressItem, u32)>,
}

/// One user's part of a homecoming: `EVALSHA remember.lua` writing their
/// positions and appending their entries to the log of their bucket.
fn remember_cmd(keys: &UserKeys, user: &UserId, home: &UserHomecoming<'_>) -> Cmd {
    let positions = home.positions.iter().map(|item| {
        (
            item.content_id.as_str(),
            position_value(item),
            item.updated_at.timestamp_millis(),
        )
    });
    let mut cmd = remember_positions_cmd(keys, user, home.positions.len(), positions);
    cmd.arg(home.logged.len());
    for (item, attempts) in &home.logged {
        cmd.arg(item.content_id.as_str())
            .arg(item.position_ms.get())
            .arg(item.updated_at.timestamp_millis())
            .arg(if item.completed { "1" } else { "0" })
            .arg(*attempts);
    }
    cmd
}

/// `EVALSHA remember.lua` up to its positions: `n` (content id, stored
/// value, time acknowledged) triples. The log entries' count and records
/// follow.
fn remember_positions_cmd<'a>(
    keys: &UserKeys,
    user: &UserId,
    n: usize,
    positions: impl Iterator<Item = (&'a str, String, i64)>,
) -> Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(REMEMBER.get_hash())
        .arg(2)
        .arg(keys.positions())
        .arg(keys.log())
        .arg(POSITION_TTL_S)
        .arg(user.as_str())
        .arg(n);
    for (content, value, at) in positions {
        cmd.arg(content).arg(value).arg(at);
    }
    cmd
}

/// A dead letter's fields for the settle script: `u c p t w a e`.
fn buried_args(cmd: &mut Cmd, b: &Buried) {
    cmd.arg(b.item.user_id.as_str())
        .arg(b.item.content_id.as_str())
        .arg(b.item.position_ms.get())
        .arg(b.item.updated_at.timestamp_millis())
        .arg(if b.item.completed { "1" } else { "0" })
        .arg(b.attempts)
        .arg(&b.error);
}

/// `EVALSHA settle.lua` on one shard's keys.
fn settle_cmd(shard: Shard, s: Option<&ShardSettlement>, from_memory: &[&Buried]) -> Cmd {
    let empty = ShardSettlement::default();
    let s = s.unwrap_or(&empty);
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(SETTLE.get_hash())
        .arg(3)
        .arg(shard.log())
        .arg(shard.parked())
        .arg(shard.dead())
        .arg(PROGRESS_GROUP)
        .arg(DEAD_LETTERS_KEPT);
    cmd.arg(s.forget.len());
    for (field, value) in &s.forget {
        cmd.arg(field).arg(value);
    }
    cmd.arg(s.retry.len());
    for (field, value, new) in &s.retry {
        cmd.arg(field).arg(value).arg(new);
    }
    cmd.arg(s.bury.len());
    for (field, value, buried) in &s.bury {
        cmd.arg(field).arg(value);
        buried_args(&mut cmd, buried);
    }
    cmd.arg(s.dead.len() + from_memory.len());
    for (id, buried) in &s.dead {
        cmd.arg(id);
        buried_args(&mut cmd, buried);
    }
    for buried in from_memory {
        cmd.arg("");
        buried_args(&mut cmd, buried);
    }
    cmd.arg(s.park.len());
    for (id, field, value) in &s.park {
        cmd.arg(id).arg(field).arg(value);
    }
    cmd.arg(s.done.len());
    for id in &s.done {
        cmd.arg(id);
    }
    cmd
}

/// Creates a shard's consumer group, reading from the stream's start. The
/// `{progress}` log of the layout before buckets is never created again:
/// without it there is nothing to drain.
fn create_group(shard: Shard) -> Cmd {
    let mut cmd = redis::cmd("XGROUP");
    cmd.arg("CREATE").arg(shard.log()).arg(PROGRESS_GROUP).arg("0");
    if !shard.is_legacy() {
        cmd.arg("MKSTREAM");
    }
    cmd
}

/// How many of each kind a shard is asked for in one stage of a round.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Ask {
    /// `XAUTOCLAIM`: entries abandoned by dead consumers.
    claim: usize,
    /// `XREADGROUP`: new entries.
    read: usize,
    /// `HRANDFIELD`: parked pairs.
    sample: usize,
}

/// `total` shared by `n` shards: equal shares, one more for the `total % n`
/// shards from `first` on.
fn shares(total: usize, n: usize, first: usize) -> Vec<usize> {
    if n == 0 {
        return Vec::new();
    }
    let (base, extra) = (total / n, total % n);
    (0..n)
        .map(|i| base + usize::from((i + n - first % n) % n < extra))
        .collect()
}

/// `total` shared by the shards at the places `who` (as [`shares`]): place → share.
fn shares_among(who: &[usize], total: usize, first: usize) -> HashMap<usize, usize> {
    who.iter().copied().zip(shares(total, who.len(), first)).collect()
}

/// One shard's reads in a round.
struct ShardRead {
    shard: Shard,
    /// `shard.log()`, named once a round.
    log: String,
    /// Where `XAUTOCLAIM` goes on from.
    cursor: String,
    ask: Ask,
}

impl ShardRead {
    /// The shard's commands; without its `XREADGROUP` when that is part of
    /// one over many shards ([`read_together`]).
    fn commands(&self, consumer: &str, read_apart: bool) -> Group {
        let (log, ask) = (&self.log, self.ask);
        let mut group = Vec::with_capacity(3);
        if ask.claim > 0 {
            let mut cmd = redis::cmd("XAUTOCLAIM");
            cmd.arg(log)
                .arg(PROGRESS_GROUP)
                .arg(consumer)
                .arg(CLAIM_IDLE.as_millis() as u64)
                .arg(&self.cursor)
                .arg("COUNT")
                .arg(ask.claim);
            group.push(cmd);
        }
        if ask.read > 0 && read_apart {
            group.push(read_cmd(&[log], ask.read, consumer));
        }
        if ask.sample > 0 {
            let mut cmd = redis::cmd("HRANDFIELD");
            cmd.arg(self.shard.parked()).arg(ask.sample).arg("WITHVALUES");
            group.push(cmd);
        }
        if self.shard.is_legacy() {
            // Whether it still holds anything at all: entries another
            // instance read and has not settled yet count too.
            group.push(redis::cmd("XLEN").arg(log).clone());
            group.push(redis::cmd("HLEN").arg(self.shard.parked()).clone());
        }
        group
    }
}

/// One read (`read.lua`) over the logs of `reads` at the places `at`, all
/// asked for the same count. On a single node a round's reads are two such
/// commands (shares differ by one at most) instead of one per bucket: the
/// command's cost is per call far more than per stream.
fn read_together(reads: &[ShardRead], at: &[usize], count: usize, consumer: &str) -> Cmd {
    let logs: Vec<&str> = at
        .iter()
        .filter_map(|&i| reads.get(i))
        .map(|r| r.log.as_str())
        .collect();
    read_cmd(&logs, count, consumer)
}

/// `EVALSHA read.lua`: `XREADGROUP … COUNT count STREAMS logs… > …`, its
/// answer packed into one string ([`unpack_read`] gives the shape back).
fn read_cmd(logs: &[&str], count: usize, consumer: &str) -> Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(READ.get_hash()).arg(logs.len());
    for log in logs {
        cmd.arg(*log);
    }
    cmd.arg(PROGRESS_GROUP).arg(consumer).arg(count);
    cmd
}

/// `read.lua`'s packed answer in the shape `XREADGROUP` answers in RESP2,
/// `[[log, [[id, [field, value, …]], …]], …]`. Nil and errors stay as they
/// are. A string that does not unpack (never written by `read.lua`) reads
/// as nothing new: its entries stay pending with this consumer, and the
/// sweep's `XAUTOCLAIM` delivers them once they are idle.
fn unpack_read(value: Value) -> Value {
    let Value::BulkString(bytes) = value else {
        return value;
    };
    let mut parts = Packed(&bytes);
    let unpacked = (|| {
        let mut streams = Vec::new();
        while !parts.0.is_empty() {
            let log = parts.value()?;
            let n = parts.count()?;
            let mut entries = Vec::with_capacity(n);
            for _ in 0..n {
                let id = parts.value()?;
                let k = parts.count()?;
                let fields = (0..k).map(|_| parts.value()).collect::<Option<Vec<_>>>()?;
                entries.push(Value::Array(vec![id, Value::Array(fields)]));
            }
            streams.push(Value::Array(vec![log, Value::Array(entries)]));
        }
        Some(Value::Array(streams))
    })();
    unpacked.unwrap_or_else(|| {
        tracing::warn!("a progress-log read answered something other than read.lua's packing");
        Value::Nil
    })
}

/// The parts of `read.lua`'s answer, each `<byte length>:<bytes>`.
struct Packed<'a>(&'a [u8]);

impl<'a> Packed<'a> {
    fn part(&mut self) -> Option<&'a [u8]> {
        let colon = self.0.iter().position(|&b| b == b':')?;
        let len: usize = std::str::from_utf8(self.0.get(..colon)?).ok()?.parse().ok()?;
        let part = self.0.get(colon + 1..colon + 1 + len)?;
        self.0 = self.0.get(colon + 1 + len..)?;
        Some(part)
    }

    fn value(&mut self) -> Option<Value> {
        self.part().map(|p| Value::BulkString(p.to_vec()))
    }

    fn count(&mut self) -> Option<usize> {
        std::str::from_utf8(self.part()?).ok()?.parse().ok()
    }
}

/// A many-stream `XREADGROUP` answer split by stream, as the answer to each
/// stream's own `XREADGROUP` (streams with nothing new are left out of the
/// answer: `Nil`). An error answer (`NOGROUP` when one of the groups is
/// gone) stands for every stream asked.
fn split_read(reply: Option<Value>, logs: &[&str]) -> Vec<Value> {
    let streams = match reply {
        Some(Value::ServerError(e)) => return logs.iter().map(|_| Value::ServerError(e.clone())).collect(),
        // RESP3 answers a map, RESP2 an array of [stream, entries].
        Some(Value::Map(streams)) => streams,
        Some(Value::Array(streams)) => streams
            .into_iter()
            .filter_map(|stream| match stream {
                Value::Array(pair) => {
                    let mut pair = pair.into_iter();
                    Some((pair.next()?, pair.next()?))
                }
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    let mut by_log: HashMap<String, Value> = streams
        .into_iter()
        .filter_map(|(name, list)| {
            let name = text(&name)?.to_owned();
            Some((
                name.clone(),
                Value::Array(vec![Value::Array(vec![
                    Value::BulkString(name.into_bytes()),
                    list,
                ])]),
            ))
        })
        .collect();
    logs.iter()
        .map(|log| by_log.remove(*log).unwrap_or(Value::Nil))
        .collect()
}

/// The three reads of a shard, in the order of its commands.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Claim,
    Read,
    Sample,
}

/// Which kinds a shard had more of than it was asked for.
#[derive(Debug, Clone, Copy, Default)]
struct More {
    claim: bool,
    read: bool,
    sample: bool,
}

impl RedisStore {
    /// The log as seen by this instance's consumer.
    pub fn progress_log(&self) -> ProgressLog {
        self.progress_log_as(String::new())
    }

    pub fn progress_log_as(&self, consumer: String) -> ProgressLog {
        ProgressLog {
            redis: self.clone(),
            consumer,
            walk: Arc::new(Walk::new()),
        }
    }

    /// Writes the position a check after an outage found newest, stamped as
    /// checked (see `outages`), unless Redis learnt a newer one meanwhile:
    /// `remember.lua`, which replaces a stored position only with one at
    /// least as new. No log entry: the internal API has it.
    pub(super) async fn confirm_position(
        &self,
        user: &UserId,
        content_id: &ContentId,
        checked: &CheckedPosition,
    ) -> Result<(), DependencyError> {
        let keys = self.user_keys(user);
        let newest = checked.newest;
        let value = match checked.checked_ms {
            0 => newest.point.encode_at(newest.at_ms.unwrap_or(0)),
            checked_ms => newest.encode_checked(checked_ms),
        };
        let position = (content_id.as_str(), value, newest.at_ms.unwrap_or(0));
        let mut cmd = remember_positions_cmd(&keys, user, 1, std::iter::once(position));
        cmd.arg(0);
        let replies = self.run_grouped(vec![vec![cmd]], Some(&REMEMBER)).await;
        self.written_positions(&keys);
        all_answered(replies?).map(drop)
    }
}

/// What a homecoming ([`ProgressLog::bring_back`]) did not bring home:
/// nothing is known to have arrived (`None`), or these users' part did not.
#[derive(Debug)]
pub struct LeftOut(Option<HashSet<UserId>>);

impl LeftOut {
    /// Whether `user`'s part may not have arrived.
    pub fn holds(&self, user: &UserId) -> bool {
        self.0.as_ref().is_none_or(|users| users.contains(user))
    }
}

impl ProgressLog {
    /// Whether `user`'s primary failed to answer the outage watch's last
    /// look (in a cluster): their positions wait in memory without a call.
    pub fn unreachable(&self, user: &UserId) -> bool {
        self.redis.primary_failing(user)
    }

    /// Redis' guard: whether Redis answers, as calls and probes found.
    pub fn guard(&self) -> &crate::resilience::Guard {
        self.redis.guard()
    }

    /// Brings positions held in memory (while Redis was unreachable) back:
    /// `positions` update their users' resume positions unless Redis holds
    /// newer ones, and `logged` (with the times each failed alone) join the
    /// log of their user's bucket; one script per user does both atomically.
    /// One round trip on a single node, one round-trip time in cluster mode
    /// (see `run_grouped`). On `Err` what it names as left out may have
    /// happened in part or not at all, and the rest has; doing it again is
    /// harmless (a position is written only if not older, an entry logged
    /// twice is delivered twice). In a cluster a primary that does not answer
    /// leaves out only its users: the others are home, and are not logged
    /// again on every round until it answers.
    pub async fn bring_back(
        &self,
        positions: &[&ProgressItem],
        logged: &[(&ProgressItem, u32)],
    ) -> Result<(), LeftOut> {
        let mut by_user: HashMap<&UserId, UserHomecoming<'_>> = HashMap::new();
        for item in positions {
            by_user.entry(&item.user_id).or_default().positions.push(item);
        }
        for (item, attempts) in logged {
            by_user
                .entry(&item.user_id)
                .or_default()
                .logged
                .push((item, *attempts));
        }
        if by_user.is_empty() {
            return Ok(());
        }
        let mut by_bucket: BTreeMap<Bucket, (Group, Vec<&UserId>)> = BTreeMap::new();
        let mut written = Vec::with_capacity(by_user.len());
        for (user, home) in &by_user {
            let keys = self.redis.user_keys(user);
            let (group, users) = by_bucket.entry(keys.bucket()).or_default();
            group.push(remember_cmd(&keys, user, home));
            users.push(*user);
            written.push(keys);
        }
        let (groups, users): (Vec<Group>, Vec<Vec<&UserId>>) = by_bucket.into_values().unzip();
        let replies = self.redis.run_grouped(groups, Some(&REMEMBER)).await;
        for keys in &written {
            self.redis.written_positions(keys);
        }
        let replies = replies.map_err(|_| LeftOut(None))?;
        let left: HashSet<UserId> = (users.into_iter().zip(replies))
            .filter(|(_, reply)| {
                !(reply.as_ref()).is_ok_and(|values| values.iter().all(|v| error_code(v).is_none()))
            })
            .flat_map(|(users, _)| users.into_iter().cloned())
            .collect();
        match left.is_empty() {
            true => Ok(()),
            false => Err(LeftOut(Some(left))),
        }
    }

    /// Creates every shard's consumer group (and stream) unless it exists.
    /// Needed again after Redis lost its data.
    /// See [`RedisStore::measure_clock`].
    pub async fn measure_clock(&self) -> Result<(), DependencyError> {
        self.redis.measure_clock().await
    }

    pub async fn ensure_group(&self) -> Result<(), DependencyError> {
        self.create_groups(&self.redis.buckets.shards()).await
    }

    async fn create_groups(&self, shards: &[Shard]) -> Result<(), DependencyError> {
        let groups = shards.iter().map(|s| vec![create_group(*s)]).collect();
        let replies = self.redis.run_grouped(groups, None).await?;
        let mut first = None;
        for (shard, reply) in shards.iter().zip(replies) {
            let refused = match reply {
                Err(e) => Some(DependencyError::Failed("redis", e.to_string())),
                Ok(values) => values.iter().find_map(|v| match (error_code(v), v) {
                    (None | Some("BUSYGROUP"), _) => None,
                    // No `{progress}` log: nothing of the layout before buckets to drain.
                    (Some(_), _) if shard.is_legacy() => None,
                    (Some(_), Value::ServerError(e)) => Some(DependencyError::Refused(
                        "redis",
                        redis::RedisError::from(e.clone()).to_string(),
                    )),
                    (Some(code), _) => Some(DependencyError::Refused("redis", code.to_owned())),
                }),
            };
            if first.is_none() {
                first = refused;
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Takes over entries abandoned by dead consumers, reads new ones and
    /// samples parked pairs, from every shard: at most `max` of each kind,
    /// or one of each per shard when there are more shards than that (so no
    /// shard waits for its turn). Every shard is asked for its share; the
    /// shards that had more than their share are then asked for what the
    /// others left, in the same round. A shard whose group is gone (Redis
    /// lost its data) gets it back within the round; a shard whose node does
    /// not answer is skipped this round (what it holds stays in Redis).
    /// Never blocks (the connection is shared with the request path).
    ///
    /// Round trips: one per stage, two at most (and one more to create
    /// groups after Redis lost its data); the second only when some shard
    /// had more than its share.
    ///
    /// `sweep`: whether to take over and sample as well; without it the
    /// round only reads new entries. Abandoned entries and parked pairs are
    /// rare, and looking for them costs a command per shard: the courier
    /// sweeps once a tick, and again only while sweeps find something.
    pub async fn next_round(&self, max: usize, sweep: bool) -> Result<Delivery, DependencyError> {
        let legacy_due = self.walk.legacy_due();
        let shards: Vec<Shard> = self
            .redis
            .buckets
            .shards()
            .into_iter()
            .filter(|s| legacy_due || !s.is_legacy())
            .collect();
        let n = shards.len();
        let budget = max.max(n);
        let first = self.walk.next.fetch_add(budget % n.max(1), Ordering::Relaxed);
        let share = shares(budget, n, first);
        let mut reads: Vec<ShardRead> = shards
            .iter()
            .zip(&share)
            .map(|(&shard, &k)| ShardRead {
                shard,
                log: shard.log(),
                cursor: "0-0".to_owned(),
                ask: Ask {
                    claim: if sweep { k } else { 0 },
                    read: k,
                    sample: if sweep { k } else { 0 },
                },
            })
            .collect();
        let swept_budget = if sweep { budget } else { 0 };
        let mut left = Ask {
            claim: swept_budget,
            read: budget,
            sample: swept_budget,
        };
        let mut delivery = Delivery::default();
        let mut sampled: HashSet<(Shard, String)> = HashSet::new();
        let mut refusal: Option<String> = None;
        // Whether the `{progress}` log answered, and held anything.
        let mut legacy: Option<bool> = None;
        for stage in 0..STAGES {
            let asked: Vec<usize> = (0..n)
                .filter(|&i| reads.get(i).is_some_and(|r| r.ask != Ask::default()))
                .collect();
            if asked.is_empty() {
                break;
            }
            // A single node serves every bucket: their reads go together,
            // one command per count asked (cluster slots must stay apart).
            let mut together: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
            if !self.redis.is_cluster() {
                for &i in &asked {
                    if let Some(r) = reads.get(i).filter(|r| r.ask.read > 0 && !r.shard.is_legacy()) {
                        together.entry(r.ask.read).or_default().push(i);
                    }
                }
            }
            let apart = |i: usize| !together.values().any(|at| at.contains(&i));
            let mut groups: Vec<Group> = asked
                .iter()
                .filter_map(|&i| reads.get(i).map(|r| r.commands(&self.consumer, apart(i))))
                .collect();
            groups.extend(
                together
                    .iter()
                    .map(|(&count, at)| vec![read_together(&reads, at, count, &self.consumer)]),
            );
            let mut replies = match self.redis.run_grouped(groups, Some(&READ)).await {
                Ok(replies) => replies,
                Err(e) if stage == 0 => return Err(e),
                // What the first stage read is delivered this round.
                Err(_) => break,
            };
            let mut read_values: HashMap<usize, Value> = HashMap::new();
            for (at, reply) in together.values().zip(replies.drain(asked.len()..)) {
                let logs: Vec<&str> = at
                    .iter()
                    .filter_map(|&i| reads.get(i))
                    .map(|r| r.log.as_str())
                    .collect();
                let reply = reply
                    .ok()
                    .and_then(|values| values.into_iter().next())
                    .map(unpack_read);
                read_values.extend(at.iter().copied().zip(split_read(reply, &logs)));
            }
            let mut more = vec![More::default(); n];
            let mut missing: Vec<usize> = Vec::new();
            for (&i, reply) in asked.iter().zip(replies) {
                let (Some(read), Some(more)) = (reads.get_mut(i), more.get_mut(i)) else {
                    continue;
                };
                let ask = std::mem::take(&mut read.ask);
                // A node that does not answer: its shards wait for a later round.
                let Ok(mut values) = reply else { continue };
                if !apart(i) {
                    let read_value = read_values.remove(&i).unwrap_or(Value::Nil);
                    values.insert(usize::from(ask.claim > 0).min(values.len()), read_value);
                }
                let before = (delivery.fresh.len(), delivery.parked.len());
                let mut values = values.into_iter();
                for (asked_for, kind) in [
                    (ask.claim, Kind::Claim),
                    (ask.read, Kind::Read),
                    (ask.sample, Kind::Sample),
                ] {
                    if asked_for == 0 {
                        continue;
                    }
                    let mut value = values.next().unwrap_or(Value::Nil);
                    if matches!(kind, Kind::Read) && apart(i) {
                        value = unpack_read(value);
                    }
                    match (error_code(&value), &value) {
                        (Some("NOGROUP"), _) => {
                            if !missing.contains(&i) {
                                missing.push(i);
                            }
                            continue;
                        }
                        (Some(_), Value::ServerError(e)) => {
                            refusal.get_or_insert_with(|| redis::RedisError::from(e.clone()).to_string());
                            continue;
                        }
                        _ => {}
                    }
                    let shard = read.shard;
                    match kind {
                        Kind::Claim => {
                            let (cursor, list) = claimed(&value);
                            left.claim = left.claim.saturating_sub(list.len());
                            delivery.swept += list.len();
                            for (id, fields) in list {
                                let id = id.to_owned();
                                delivery.fresh.push((EntryId { shard, id }, parse_entry(&fields)));
                            }
                            more.claim = cursor != "0-0";
                            read.cursor = cursor;
                        }
                        Kind::Read => {
                            // XREADGROUP answers stream → entries (or nil when nothing is new).
                            let list: Vec<_> = pairs_of(&value)
                                .into_iter()
                                .flat_map(|(_, list)| entries(list))
                                .collect();
                            left.read = left.read.saturating_sub(list.len());
                            more.read = list.len() >= asked_for;
                            for (id, fields) in list {
                                let id = id.to_owned();
                                delivery.fresh.push((EntryId { shard, id }, parse_entry(&fields)));
                            }
                        }
                        Kind::Sample => {
                            let pairs = pairs_of(&value);
                            more.sample = pairs.len() >= asked_for;
                            for (field, value) in pairs {
                                let (Ok(field), Ok(value)) = (
                                    redis::from_redis_value_ref::<String>(field),
                                    redis::from_redis_value_ref::<String>(value),
                                ) else {
                                    continue;
                                };
                                // A second sample may draw a field again.
                                if !sampled.insert((shard, field.clone())) {
                                    continue;
                                }
                                left.sample = left.sample.saturating_sub(1);
                                delivery.swept += 1;
                                let parsed = parse_parked(&value);
                                delivery
                                    .parked
                                    .push((ParkedField { shard, field }, value, parsed));
                            }
                        }
                    }
                }
                if read.shard.is_legacy() {
                    let left_there =
                        values.any(|v| redis::from_redis_value_ref::<u64>(&v).is_ok_and(|n| n > 0));
                    let held = (delivery.fresh.len(), delivery.parked.len()) != before || left_there;
                    legacy = Some(legacy.unwrap_or(false) || held);
                }
            }
            if stage + 1 == STAGES {
                break;
            }
            if !missing.is_empty() {
                let gone: Vec<Shard> = missing
                    .iter()
                    .filter_map(|&i| reads.get(i).map(|r| r.shard))
                    .collect();
                // The log of the layout before buckets has no group once
                // nothing of it is left: no news, and nothing to create.
                let lost = gone.iter().filter(|s| !s.is_legacy()).count();
                if lost > 0 {
                    tracing::warn!(shards = lost, "progress log groups missing; creating them");
                }
                let _ = self.create_groups(&gone).await;
            }
            // What is left of each kind, shared by the shards that had more
            // of it (and those whose group was just created).
            let wanting = |kind: fn(&More) -> bool| -> Vec<usize> {
                (0..n)
                    .filter(|i| missing.contains(i) || more.get(*i).is_some_and(kind))
                    .collect()
            };
            let claim = shares_among(&wanting(|m| m.claim), left.claim, first);
            let read = shares_among(&wanting(|m| m.read), left.read, first);
            let sample = shares_among(&wanting(|m| m.sample), left.sample, first);
            for (i, r) in reads.iter_mut().enumerate() {
                r.ask = Ask {
                    claim: claim.get(&i).copied().unwrap_or(0),
                    read: read.get(&i).copied().unwrap_or(0),
                    sample: sample.get(&i).copied().unwrap_or(0),
                };
            }
        }
        if let Some(held) = legacy {
            self.walk.legacy_seen(held);
        }
        match refusal {
            Some(error) if delivery.fresh.is_empty() && delivery.parked.is_empty() => {
                Err(DependencyError::Refused("redis", error))
            }
            _ => Ok(delivery),
        }
    }

    /// Applies a round's outcome: one atomic script per shard it touches,
    /// all in one round trip (one round-trip time in cluster mode). `Err`
    /// when any shard's script did not run: those entries stay with this
    /// consumer and are taken over later (delivering twice is fine).
    /// Returns how many positions it moved to the dead letters: fewer than
    /// the settlement buries when another instance settled some first.
    pub async fn settle(&self, s: &Settlement) -> Result<usize, DependencyError> {
        if s.is_empty() {
            return Ok(0);
        }
        let mut from_memory: BTreeMap<Shard, Vec<&Buried>> = BTreeMap::new();
        for buried in &s.buried_from_memory {
            let bucket = self.redis.buckets.of(&buried.item.user_id);
            from_memory.entry(Shard::Bucket(bucket)).or_default().push(buried);
        }
        let mut shards: Vec<Shard> = s
            .shards
            .iter()
            .filter(|(_, part)| !part.is_empty())
            .map(|(shard, _)| *shard)
            .collect();
        shards.extend(from_memory.keys().filter(|k| !s.shards.contains_key(k)));
        let groups = shards
            .iter()
            .map(|shard| {
                let buried = from_memory.get(shard).map(Vec::as_slice).unwrap_or_default();
                vec![settle_cmd(*shard, s.shards.get(shard), buried)]
            })
            .collect();
        let replies = self.redis.run_grouped(groups, Some(&SETTLE)).await?;
        let buried = all_answered(replies)?
            .iter()
            .flatten()
            .filter_map(|reply| redis::from_redis_value_ref::<(u64, u64)>(reply).ok())
            .map(|(_, buried)| buried as usize)
            .sum();
        Ok(buried)
    }

    /// Up to `count` dead letters after `after` (from the first when
    /// `None`), shard by shard, oldest first within a shard.
    pub async fn dead_letters(
        &self,
        after: Option<&DeadLetter>,
        count: usize,
    ) -> Result<Vec<DeadLetter>, DependencyError> {
        let shards = self.redis.buckets.shards();
        let from = after
            .and_then(|a| shards.iter().position(|s| *s == a.shard))
            .unwrap_or(0);
        let rest = shards.get(from..).unwrap_or_default();
        // Which shards hold any, in one look, so that empty ones cost nothing more.
        let lengths = self
            .redis
            .run_grouped(
                rest.iter()
                    .map(|s| vec![redis::cmd("XLEN").arg(s.dead()).clone()])
                    .collect(),
                None,
            )
            .await?;
        let lengths = all_answered(lengths)?;
        let mut letters = Vec::new();
        for (shard, length) in rest.iter().zip(lengths) {
            let held: u64 = length
                .first()
                .and_then(|v| redis::from_redis_value_ref(v).ok())
                .unwrap_or(0);
            if held == 0 {
                continue;
            }
            let wanted = count.saturating_sub(letters.len());
            if wanted == 0 {
                break;
            }
            let start = match after {
                Some(a) if a.shard == *shard => format!("({}", a.id),
                _ => "-".to_owned(),
            };
            let key = &shard.dead();
            let list: Value = self
                .redis
                .run(On::Key(key), |mut c| async move {
                    redis::cmd("XRANGE")
                        .arg(key)
                        .arg(start)
                        .arg("+")
                        .arg("COUNT")
                        .arg(wanted)
                        .query_async(&mut c)
                        .await
                })
                .await?;
            letters.extend(
                entries(&list)
                    .into_iter()
                    .map(|(id, fields)| parse_dead_letter(*shard, id, &fields)),
            );
        }
        Ok(letters)
    }

    /// Removes dead letters (delivered by a replay).
    pub async fn forget_dead_letters(&self, letters: &[&DeadLetter]) -> Result<(), DependencyError> {
        let mut by_shard: BTreeMap<Shard, Vec<&str>> = BTreeMap::new();
        for letter in letters {
            by_shard.entry(letter.shard).or_default().push(&letter.id);
        }
        let groups = by_shard
            .into_iter()
            .map(|(shard, ids)| vec![redis::cmd("XDEL").arg(shard.dead()).arg(ids).clone()])
            .collect();
        let replies = self.redis.run_grouped(groups, None).await?;
        all_answered(replies).map(drop)
    }

    /// Forgets consumers (instances long gone) that hold no entries and were
    /// idle longer than `idle`, shard by shard, so the groups do not grow
    /// with restarts.
    pub async fn forget_idle_consumers(&self, idle: Duration) -> Result<usize, DependencyError> {
        let shards = self.redis.buckets.shards();
        let groups = shards
            .iter()
            .map(|s| {
                vec![
                    redis::cmd("XINFO")
                        .arg("CONSUMERS")
                        .arg(s.log())
                        .arg(PROGRESS_GROUP)
                        .clone(),
                ]
            })
            .collect();
        let replies = self.redis.run_grouped(groups, None).await?;
        let idle_ms = idle.as_millis() as i64;
        let mut forgotten = 0;
        let mut deletions: Vec<Group> = Vec::new();
        for (shard, reply) in shards.iter().zip(replies) {
            // A shard without its group (or whose node does not answer) has none to forget.
            let Some(Ok(consumers)) = reply
                .ok()
                .and_then(|values| values.into_iter().next())
                .map(redis::from_redis_value::<Vec<Value>>)
            else {
                continue;
            };
            let gone: Vec<Cmd> = consumers
                .iter()
                .filter_map(|consumer| {
                    let fields = pairs_of(consumer);
                    let get = |name: &str| {
                        fields
                            .iter()
                            .find(|(k, _)| {
                                redis::from_redis_value_ref::<String>(k).ok().as_deref() == Some(name)
                            })
                            .map(|(_, v)| *v)
                    };
                    let name: String = redis::from_redis_value_ref(get("name")?).ok()?;
                    let pending: i64 = redis::from_redis_value_ref(get("pending")?).ok()?;
                    let idle: i64 = redis::from_redis_value_ref(get("idle")?).ok()?;
                    (pending == 0 && idle > idle_ms && name != self.consumer).then_some(name)
                })
                .map(|name| {
                    redis::cmd("XGROUP")
                        .arg("DELCONSUMER")
                        .arg(shard.log())
                        .arg(PROGRESS_GROUP)
                        .arg(name)
                        .clone()
                })
                .collect();
            forgotten += gone.len();
            if !gone.is_empty() {
                deletions.push(gone);
            }
        }
        if deletions.is_empty() {
            return Ok(0);
        }
        let replies = self.redis.run_grouped(deletions, None).await?;
        all_answered(replies).map(|_| forgotten)
    }

    /// Entries in the logs and parked pairs, summed over the shards that
    /// answered (for metrics and tests).
    pub async fn backlog(&self) -> Result<(u64, u64), DependencyError> {
        let shards = self.redis.buckets.shards();
        let groups = shards
            .iter()
            .map(|s| {
                vec![
                    redis::cmd("XLEN").arg(s.log()).clone(),
                    redis::cmd("HLEN").arg(s.parked()).clone(),
                ]
            })
            .collect();
        let replies = self.redis.run_grouped(groups, None).await?;
        let count =
            |v: Option<&Value>| -> u64 { v.and_then(|v| redis::from_redis_value_ref(v).ok()).unwrap_or(0) };
        Ok(replies
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .fold((0, 0), |(log, parked), values| {
                (log + count(values.first()), parked + count(values.get(1)))
            }))
    }
}

#[cfg(test)]
mod tests {
    use super::super::keys::Buckets;
    use super::*;

    fn item() -> ProgressItem {
        ProgressItem {
            user_id: UserId::parse("u 1").unwrap(),
            content_id: ContentId::parse("m-1").unwrap(),
            position_ms: PositionMs::new(42).unwrap(),
            updated_at: millis_to_utc(1_700_000_000_123),
            completed: true,
            provisional: false,
        }
    }

    #[test]
    fn parked_values_round_trip_with_their_attempts() {
        let item = item();
        let value = parked_value(&item, 3);
        assert!(value.starts_with("1700000000123 "));
        assert_eq!(parse_parked(&value), Some((item.clone(), 3)));
        assert_eq!(parse_parked(&parked_value(&item, 0)), Some((item.clone(), 0)));
        assert_eq!(field(&item), "u 1\nm-1");
    }

    #[test]
    fn parked_values_from_before_attempts_still_parse() {
        let old = format!("1700000000123 {}", serde_json::to_string(&item()).unwrap());
        assert_eq!(parse_parked(&old), Some((item(), 0)));
    }

    #[test]
    fn positions_carry_their_time() {
        assert_eq!(position_value(&item()), "42:c@1700000000123");
    }

    #[test]
    fn entries_need_every_field() {
        let f = |pairs: &[(&'static str, &'static str)]| pairs.to_vec();
        let ok = f(&[("u", "x"), ("c", "m-1"), ("p", "5"), ("t", "1000")]);
        assert_eq!(
            parse_entry(&ok).map(|(i, a)| (i.position_ms.get(), a)),
            Some((5, 0))
        );
        let tried = f(&[("u", "x"), ("c", "m-1"), ("p", "5"), ("t", "1000"), ("a", "2")]);
        assert_eq!(parse_entry(&tried).map(|(_, a)| a), Some(2));
        assert!(parse_entry(&f(&[("u", "x"), ("c", "m/1"), ("p", "5"), ("t", "1")])).is_none());
        assert!(
            parse_entry(&f(&[
                ("u", "x"),
                ("c", "m-1"),
                ("p", "9007199254740992"),
                ("t", "1")
            ]))
            .is_none()
        );
    }

    #[test]
    fn packed_entries_split_as_splitn_splits_them() {
        for packed in [
            "5000 1700000000123 1 m-1 a user 2",
            "5 1 0 m-1 x",
            "5 1 0 m-1 ",
            "    ",
            "5 1 0 m-1",
            "",
            "é 1 0 m ü ser",
        ] {
            let splitn: Vec<&str> = packed.splitn(5, ' ').collect();
            let expected = <[&str; 5]>::try_from(splitn).ok();
            assert_eq!(packed_parts(packed), expected, "{packed:?}");
        }
    }

    #[test]
    fn packed_reads_unpack_to_the_shape_xreadgroup_answers() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let pack = |parts: &[&str]| -> String { parts.iter().map(|p| format!("{}:{p}", p.len())).collect() };
        let packed = pack(&[
            "moneta:{b0}:log",
            "2",
            "1-0",
            "4",
            "i",
            "5 1000 0 m-1 a:user 2",
            "a",
            "3",
            "2-0",
            "0",
            "moneta:{b1}:log",
            "0",
        ]);
        let value = unpack_read(bulk(&packed));
        let expected = Value::Array(vec![
            Value::Array(vec![
                bulk("moneta:{b0}:log"),
                Value::Array(vec![
                    Value::Array(vec![
                        bulk("1-0"),
                        Value::Array(vec![
                            bulk("i"),
                            bulk("5 1000 0 m-1 a:user 2"),
                            bulk("a"),
                            bulk("3"),
                        ]),
                    ]),
                    Value::Array(vec![bulk("2-0"), Value::Array(vec![])]),
                ]),
            ]),
            Value::Array(vec![bulk("moneta:{b1}:log"), Value::Array(vec![])]),
        ]);
        assert_eq!(value, expected);
        let split = split_read(Some(value), &["moneta:{b0}:log", "moneta:{b1}:log"]);
        let list: Vec<_> = pairs_of(&split[0])
            .into_iter()
            .flat_map(|(_, l)| entries(l))
            .collect();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0], ("1-0", vec![("i", "5 1000 0 m-1 a:user 2"), ("a", "3")]));
        let (item, attempts) = parse_entry(&list[0].1).unwrap();
        assert_eq!((item.user_id.as_str(), attempts), ("a:user 2", 3));
        assert_eq!(unpack_read(Value::Nil), Value::Nil);
        for broken in ["5:abc", "3:abc2:", "x:abc", "3:abcy:", "3:abc1:21:x"] {
            assert_eq!(unpack_read(bulk(broken)), Value::Nil, "{broken:?}");
        }
    }

    #[test]
    fn packed_entries_parse_with_spaces_in_the_user() {
        let (item, attempts) = parse_entry(&[("i", "5000 1700000000123 1 m-1 a user 2")]).unwrap();
        assert_eq!(item.user_id.as_str(), "a user 2");
        assert_eq!(item.content_id.as_str(), "m-1");
        assert_eq!(item.position_ms.get(), 5000);
        assert_eq!(item.updated_at.timestamp_millis(), 1_700_000_000_123);
        assert!(item.completed);
        assert_eq!(attempts, 0);
        let tried = parse_entry(&[("i", "5 1000 0 m-1 x"), ("a", "3")]).unwrap();
        assert_eq!((tried.0.completed, tried.1), (false, 3));
        for bad in [
            "5 1000 0 m-1",
            "5 1000 0 m/1 x",
            "x 1000 0 m-1 u",
            "5 t 0 m-1 u",
            "",
        ] {
            assert!(parse_entry(&[("i", bad)]).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn dead_letters_list_as_json() {
        let fields = [
            ("u", "x"),
            ("c", "m-1"),
            ("p", "5"),
            ("t", "1700000000123"),
            ("w", "0"),
            ("a", "5"),
            ("e", "status 404"),
        ];
        let json = parse_dead_letter(Shard::Legacy, "1-0", &fields).to_json();
        assert_eq!(json["entry_id"], "1-0");
        assert_eq!(json["user_id"], "x");
        assert_eq!(json["position_ms"], 5);
        assert_eq!(json["attempts"], 5);
        assert_eq!(json["last_error"], "status 404");
        assert_eq!(json["updated_at"], "2023-11-14T22:13:20.123Z");
        assert_eq!(json["stream"], "moneta:{progress}:dead");
    }

    #[test]
    fn shares_are_equal_and_the_remainder_rotates() {
        assert_eq!(shares(10, 4, 0), [3, 3, 2, 2]);
        assert_eq!(shares(10, 4, 3), [3, 2, 2, 3]);
        assert_eq!(shares(8, 4, 1), [2, 2, 2, 2]);
        assert_eq!(shares(3, 5, 4), [1, 1, 0, 0, 1]);
        assert!(shares(5, 0, 0).is_empty());
        for first in 0..7 {
            assert_eq!(shares(200, 7, first).iter().sum::<usize>(), 200);
        }
    }

    #[test]
    fn a_settlement_goes_to_the_shards_of_its_pieces() {
        let mut s = Settlement::default();
        assert!(s.is_empty());
        s.done(EntryId::for_tests("1-0"));
        s.park(
            EntryId {
                shard: Shard::Bucket(Buckets::new(64).of(&item().user_id)),
                id: "2-0".to_owned(),
            },
            &item(),
            1,
        );
        s.bury(&item(), 5, "status 404");
        assert_eq!(s.shards.len(), 2);
        assert_eq!(s.shards[&Shard::Legacy].done, ["1-0"]);
        assert_eq!(s.buried_from_memory.len(), 1);
        assert!(!s.is_empty());
    }
}

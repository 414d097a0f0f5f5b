//! The progress log: positions acknowledged to players, kept in Redis until
//! the internal API has them (at-least-once delivery).
//!
//! A Redis Stream with one consumer group: every instance reads its share
//! (`XREADGROUP`), and entries read by an instance that died are taken over
//! by another after a short idle time (`XAUTOCLAIM`). Entries the internal API
//! cannot take now are folded into a parked hash, one field per (user, title),
//! so an outage parks distinct pairs rather than heartbeats, and are offered
//! again beside fresh entries on every round. An item that fails alone too
//! often while others are delivered moves to a bounded dead-letter stream.
//! The three keys share one hash tag, so the settle script works in Redis
//! Cluster mode too. How many times an item failed alone travels with it (the
//! `a` field of an entry, `attempts` in a parked value), so every instance
//! and every restart counts on from the same number.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

use redis::{Script, Value};
use serde::{Deserialize, Serialize};

use super::keys::{self, UserKeys};
use super::{POSITION_TTL_S, RedisStore, millis_to_utc};
use crate::model::{ContentId, PositionMs, ProgressItem, ResumePoint, UserId};
use crate::resilience::DependencyError;

static SETTLE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/settle.lua")));
static REMEMBER: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/remember.lua")));

pub const PROGRESS_GROUP: &str = "delivery";

/// Entries read by a consumer and not settled for this long belong to an
/// instance that died (or hung); another takes them over. Far above a round's
/// duration (a batch post is bounded by the internal API's timeout).
const CLAIM_IDLE: Duration = Duration::from_secs(15);

/// The dead-letter stream keeps about this many items (`XADD MAXLEN ~`):
/// poison items are rare, and an operator replays them long before.
const DEAD_LETTERS_KEPT: u64 = 10_000;

/// The log's handle for one consumer (one instance).
#[derive(Clone)]
pub struct ProgressLog {
    redis: RedisStore,
    consumer: String,
}

/// An item and the times it failed alone so far.
pub type Tried = (ProgressItem, u32);

/// One round's work: fresh entries of the log and a sample of parked pairs,
/// each with the number of times it already failed alone.
#[derive(Debug, Default)]
pub struct Delivery {
    /// (entry id, (item, attempts)); an entry that does not parse is settled
    /// as done, with `None`.
    pub fresh: Vec<(String, Option<Tried>)>,
    /// (field, raw value, (item, attempts)); a value that does not parse is
    /// settled as done, with `None`.
    pub parked: Vec<(String, String, Option<Tried>)>,
}

/// A position moved to the dead letters: its fields in the stream.
#[derive(Debug, Clone)]
struct Buried {
    item: ProgressItem,
    attempts: u32,
    error: String,
}

/// How a round ended for each piece of it, applied by [`ProgressLog::settle`]
/// in one atomic script.
#[derive(Debug, Default)]
pub struct Settlement {
    done: Vec<String>,
    forget: Vec<(String, String)>,
    retry: Vec<(String, String, String)>,
    bury: Vec<(String, String, Buried)>,
    dead: Vec<(String, Buried)>,
    park: Vec<(String, String, String)>,
}

impl Settlement {
    /// A fresh entry delivered, refused for good or unparseable: it leaves the log.
    pub fn done(&mut self, id: String) {
        self.done.push(id);
    }

    /// A parked field delivered (or refused for good): removed unless it changed meanwhile.
    pub fn forget_parked(&mut self, field: String, value: String) {
        self.forget.push((field, value));
    }

    /// A fresh entry not delivered: parked (unless a newer position of its
    /// pair is), with the times it failed alone so far.
    pub fn park(&mut self, id: String, item: &ProgressItem, attempts: u32) {
        self.park.push((id, field(item), parked_value(item, attempts)));
    }

    /// A parked field that failed alone once more: its count goes up,
    /// unless the field changed meanwhile.
    pub fn retry_parked(&mut self, field: String, value: String, item: &ProgressItem, attempts: u32) {
        let new = parked_value(item, attempts);
        self.retry.push((field, value, new));
    }

    /// A parked field that failed alone `attempts` times: moved to the dead
    /// letters, unless it changed meanwhile.
    pub fn bury_parked(
        &mut self,
        field: String,
        value: String,
        item: &ProgressItem,
        attempts: u32,
        error: &str,
    ) {
        self.bury.push((field, value, buried(item, attempts, error)));
    }

    /// A fresh entry that failed alone `attempts` times: moved to the dead letters.
    pub fn bury_entry(&mut self, id: String, item: &ProgressItem, attempts: u32, error: &str) {
        self.dead.push((id, buried(item, attempts, error)));
    }

    /// A position held in memory that failed alone `attempts` times.
    pub fn bury(&mut self, item: &ProgressItem, attempts: u32, error: &str) {
        self.dead.push((String::new(), buried(item, attempts, error)));
    }

    pub fn is_empty(&self) -> bool {
        self.done.is_empty()
            && self.forget.is_empty()
            && self.retry.is_empty()
            && self.bury.is_empty()
            && self.dead.is_empty()
            && self.park.is_empty()
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
    /// `None` when the entry does not parse (it is listed, never replayed).
    pub item: Option<ProgressItem>,
    pub attempts: u32,
    pub last_error: String,
}

impl DeadLetter {
    pub fn to_json(&self) -> serde_json::Value {
        match &self.item {
            Some(item) => serde_json::json!({
                "entry_id": self.id,
                "user_id": item.user_id,
                "content_id": item.content_id,
                "position_ms": item.position_ms,
                "updated_at": item.updated_at,
                "completed": item.completed,
                "attempts": self.attempts,
                "last_error": self.last_error,
            }),
            None => serde_json::json!({"entry_id": self.id, "invalid": true}),
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

/// An `XADD` entry `u c p t [w] [a]` back into an item and its attempts;
/// `None` if anything is off.
fn parse_entry(fields: &[(String, String)]) -> Option<(ProgressItem, u32)> {
    let get = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let item = ProgressItem {
        user_id: UserId::parse(get("u")?).ok()?,
        content_id: ContentId::parse(get("c")?).ok()?,
        position_ms: PositionMs::new(get("p")?.parse().ok()?).ok()?,
        updated_at: millis_to_utc(get("t")?.parse().ok()?),
        completed: get("w") == Some("1"),
    };
    let attempts = get("a").and_then(|a| a.parse().ok()).unwrap_or(0);
    Some((item, attempts))
}

fn parse_dead_letter(id: String, fields: &[(String, String)]) -> DeadLetter {
    let parsed = parse_entry(fields);
    let last_error = fields
        .iter()
        .find(|(k, _)| k == "e")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    DeadLetter {
        id,
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

/// Stream replies as (id, [(field, value)]) whatever the command.
fn entries(value: &Value) -> Vec<(String, Vec<(String, String)>)> {
    let Ok(list) = redis::from_redis_value_ref::<Vec<Value>>(value) else {
        return Vec::new();
    };
    list.iter()
        .filter_map(|entry| {
            let (id, fields): (String, Option<Vec<String>>) = redis::from_redis_value_ref(entry).ok()?;
            let fields = fields.unwrap_or_default();
            let pairs = fields
                .chunks(2)
                .filter_map(|kv| Some((kv.first()?.clone(), kv.get(1)?.clone())))
                .collect();
            Some((id, pairs))
        })
        .collect()
}

/// The first error reply of a pipeline run with `ignore_errors`, as the
/// error of that one command: its code (`NOGROUP`, `NOSCRIPT`) stays
/// readable, so the store can tell an answer from an outage.
fn first_error(replies: &[Value]) -> Option<redis::RedisError> {
    replies.iter().find_map(|reply| match reply {
        Value::ServerError(e) => Some(redis::RedisError::from(e.clone())),
        _ => None,
    })
}

fn is_noscript(e: &redis::RedisError) -> bool {
    e.code() == Some("NOSCRIPT")
}

/// The same fields the session scripts write: `u c p t w`, and `a` once the
/// item failed alone.
fn add_entry(pipe: &mut redis::Pipeline, item: &ProgressItem, attempts: u32) {
    let cmd = pipe
        .cmd("XADD")
        .arg(keys::progress_log())
        .arg("*")
        .arg("u")
        .arg(item.user_id.as_str())
        .arg("c")
        .arg(item.content_id.as_str())
        .arg("p")
        .arg(item.position_ms.get())
        .arg("t")
        .arg(item.updated_at.timestamp_millis())
        .arg("w")
        .arg(if item.completed { "1" } else { "0" });
    if attempts > 0 {
        cmd.arg("a").arg(attempts);
    }
    cmd.ignore();
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
/// positions and, when `log` is true, appending their entries.
fn remember_cmd(user: &UserId, home: &UserHomecoming<'_>, log: bool) -> redis::Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(REMEMBER.get_hash())
        .arg(if log { 2 } else { 1 })
        .arg(UserKeys::new(user).positions());
    if log {
        cmd.arg(keys::progress_log());
    }
    cmd.arg(POSITION_TTL_S)
        .arg(user.as_str())
        .arg(home.positions.len());
    for item in &home.positions {
        cmd.arg(item.content_id.as_str())
            .arg(position_value(item))
            .arg(item.updated_at.timestamp_millis());
    }
    let logged: &[(&ProgressItem, u32)] = if log { &home.logged } else { &[] };
    cmd.arg(logged.len());
    for (item, attempts) in logged {
        cmd.arg(item.content_id.as_str())
            .arg(item.position_ms.get())
            .arg(item.updated_at.timestamp_millis())
            .arg(if item.completed { "1" } else { "0" })
            .arg(*attempts);
    }
    cmd
}

/// A dead letter's fields for the settle script: `u c p t w a e`.
fn buried_args(call: &mut redis::ScriptInvocation<'_>, b: &Buried) {
    call.arg(b.item.user_id.as_str())
        .arg(b.item.content_id.as_str())
        .arg(b.item.position_ms.get())
        .arg(b.item.updated_at.timestamp_millis())
        .arg(if b.item.completed { "1" } else { "0" })
        .arg(b.attempts)
        .arg(&b.error);
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
        }
    }
}

impl ProgressLog {
    /// Appends positions: (cluster mode, where the session script cannot) a
    /// heartbeat's.
    pub async fn append_all(&self, items: &[ProgressItem]) -> Result<(), DependencyError> {
        let items: Vec<(&ProgressItem, u32)> = items.iter().map(|i| (i, 0)).collect();
        self.append(&items).await
    }

    async fn append(&self, items: &[(&ProgressItem, u32)]) -> Result<(), DependencyError> {
        if items.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (item, attempts) in items {
            add_entry(&mut pipe, item, *attempts);
        }
        self.redis
            .run(|mut c| async move { pipe.query_async::<()>(&mut c).await })
            .await
    }

    /// Brings positions held in memory (while Redis was unreachable) back:
    /// `positions` update their users' resume positions unless Redis holds
    /// newer ones, and `logged` (with the times each failed alone) join the
    /// log. Single-node mode: one script per user doing both atomically, all
    /// in one round trip. Cluster mode: a script may touch one slot only, so
    /// the users' scripts run side by side and the log entries follow in one
    /// pipeline. On `Err` any part may have happened; doing it all again is
    /// harmless (a position is written only if not older, an entry logged
    /// twice is delivered twice).
    pub async fn bring_back(
        &self,
        positions: &[&ProgressItem],
        logged: &[(&ProgressItem, u32)],
    ) -> Result<(), DependencyError> {
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
        if !self.redis.is_cluster() {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for (user, home) in &by_user {
                pipe.add_command(remember_cmd(user, home, true));
            }
            return self
                .redis
                .run(|mut c| async move {
                    let mut replies: Vec<Value> = pipe.query_async(&mut c).await?;
                    if first_error(&replies).as_ref().is_some_and(is_noscript) {
                        // Redis restarted (or flushed its scripts): load and
                        // run again, which writes nothing twice that matters.
                        REMEMBER.load_async(&mut c).await?;
                        replies = pipe.query_async(&mut c).await?;
                    }
                    first_error(&replies).map_or(Ok(()), Err)
                })
                .await;
        }
        let writes = by_user
            .iter()
            .filter(|(_, home)| !home.positions.is_empty())
            .map(|(user, home)| {
                let cmd = remember_cmd(user, home, false);
                self.redis.run(|mut c| async move {
                    match cmd.query_async::<Value>(&mut c).await {
                        Err(e) if is_noscript(&e) => {
                            REMEMBER.load_async(&mut c).await?;
                            cmd.query_async::<Value>(&mut c).await
                        }
                        other => other,
                    }
                })
            });
        for written in futures::future::join_all(writes).await {
            written?;
        }
        self.append(logged).await
    }

    /// Creates the consumer group (and the stream) unless it exists. Needed
    /// again after Redis lost its data.
    pub async fn ensure_group(&self) -> Result<(), DependencyError> {
        let created: Result<(), DependencyError> = self
            .redis
            .run(|mut c| async move {
                let reply: redis::RedisResult<()> = redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg(keys::progress_log())
                    .arg(PROGRESS_GROUP)
                    .arg("0")
                    .arg("MKSTREAM")
                    .query_async(&mut c)
                    .await;
                match reply {
                    Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
                    other => other,
                }
            })
            .await;
        created
    }

    /// Takes over entries abandoned by dead consumers, then reads new ones,
    /// and samples parked pairs: at most `max` of each. Never blocks (the
    /// connection is shared with the request path).
    pub async fn next_round(&self, max: usize) -> Result<Delivery, DependencyError> {
        let log = keys::progress_log();
        let parked = keys::progress_parked();
        let consumer = self.consumer.clone();
        let replies: Vec<Value> = self
            .redis
            .run(|mut c| async move {
                let replies: Vec<Value> = redis::pipe()
                    .ignore_errors()
                    .cmd("XAUTOCLAIM")
                    .arg(&log)
                    .arg(PROGRESS_GROUP)
                    .arg(&consumer)
                    .arg(CLAIM_IDLE.as_millis() as u64)
                    .arg("0-0")
                    .arg("COUNT")
                    .arg(max)
                    .cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(PROGRESS_GROUP)
                    .arg(&consumer)
                    .arg("COUNT")
                    .arg(max)
                    .arg("STREAMS")
                    .arg(&log)
                    .arg(">")
                    .cmd("HRANDFIELD")
                    .arg(&parked)
                    .arg(max)
                    .arg("WITHVALUES")
                    .query_async(&mut c)
                    .await?;
                // `NOGROUP` (Redis lost its data) must read as an answer,
                // not as a failure of Redis.
                first_error(&replies).map_or(Ok(replies), Err)
            })
            .await?;
        let [claimed, read, sample] = <[Value; 3]>::try_from(replies).unwrap_or_default();
        let mut delivery = Delivery::default();
        // XAUTOCLAIM answers [next-cursor, entries, deleted-ids].
        if let Ok(parts) = redis::from_redis_value_ref::<Vec<Value>>(&claimed)
            && let Some(list) = parts.get(1)
        {
            for (id, fields) in entries(list) {
                delivery.fresh.push((id, parse_entry(&fields)));
            }
        }
        // XREADGROUP answers stream → entries (or nil when nothing is new).
        for (_, list) in pairs_of(&read) {
            for (id, fields) in entries(list) {
                delivery.fresh.push((id, parse_entry(&fields)));
            }
        }
        for (field, value) in pairs_of(&sample) {
            if let (Ok(field), Ok(value)) = (
                redis::from_redis_value_ref::<String>(field),
                redis::from_redis_value_ref::<String>(value),
            ) {
                let parsed = parse_parked(&value);
                delivery.parked.push((field, value, parsed));
            }
        }
        Ok(delivery)
    }

    /// Applies a round's outcome in one atomic script.
    pub async fn settle(&self, s: &Settlement) -> Result<(), DependencyError> {
        if s.is_empty() {
            return Ok(());
        }
        let mut call = SETTLE.prepare_invoke();
        call.key(keys::progress_log())
            .key(keys::progress_parked())
            .key(keys::progress_dead())
            .arg(PROGRESS_GROUP)
            .arg(DEAD_LETTERS_KEPT);
        call.arg(s.forget.len());
        for (field, value) in &s.forget {
            call.arg(field).arg(value);
        }
        call.arg(s.retry.len());
        for (field, value, new) in &s.retry {
            call.arg(field).arg(value).arg(new);
        }
        call.arg(s.bury.len());
        for (field, value, buried) in &s.bury {
            call.arg(field).arg(value);
            buried_args(&mut call, buried);
        }
        call.arg(s.dead.len());
        for (id, buried) in &s.dead {
            call.arg(id);
            buried_args(&mut call, buried);
        }
        call.arg(s.park.len());
        for (id, field, value) in &s.park {
            call.arg(id).arg(field).arg(value);
        }
        call.arg(s.done.len());
        for id in &s.done {
            call.arg(id);
        }
        self.redis
            .run(|mut c| async move { call.invoke_async::<i64>(&mut c).await })
            .await
            .map(drop)
    }

    /// Up to `count` dead letters after entry `after` (from the first when `None`), oldest first.
    pub async fn dead_letters(
        &self,
        after: Option<&str>,
        count: usize,
    ) -> Result<Vec<DeadLetter>, DependencyError> {
        let start = after.map_or_else(|| "-".to_owned(), |id| format!("({id}"));
        let list: Value = self
            .redis
            .run(|mut c| async move {
                redis::cmd("XRANGE")
                    .arg(keys::progress_dead())
                    .arg(start)
                    .arg("+")
                    .arg("COUNT")
                    .arg(count)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(entries(&list)
            .into_iter()
            .map(|(id, fields)| parse_dead_letter(id, &fields))
            .collect())
    }

    /// Removes dead letters (delivered by a replay).
    pub async fn forget_dead_letters(&self, ids: &[String]) -> Result<(), DependencyError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("XDEL");
        cmd.arg(keys::progress_dead()).arg(ids);
        self.redis
            .run(|mut c| async move { cmd.query_async::<()>(&mut c).await })
            .await
    }

    /// Forgets consumers (instances long gone) that hold no entries and were
    /// idle longer than `idle`, so the group does not grow with restarts.
    pub async fn forget_idle_consumers(&self, idle: Duration) -> Result<usize, DependencyError> {
        let log = keys::progress_log();
        let consumers: Vec<Value> = self
            .redis
            .run(|mut c| {
                let log = log.clone();
                async move {
                    redis::cmd("XINFO")
                        .arg("CONSUMERS")
                        .arg(log)
                        .arg(PROGRESS_GROUP)
                        .query_async(&mut c)
                        .await
                }
            })
            .await?;
        let idle_ms = idle.as_millis() as i64;
        let gone: Vec<String> = consumers
            .iter()
            .filter_map(|consumer| {
                let fields = pairs_of(consumer);
                let get = |name: &str| {
                    fields
                        .iter()
                        .find(|(k, _)| redis::from_redis_value_ref::<String>(k).ok().as_deref() == Some(name))
                        .map(|(_, v)| *v)
                };
                let name: String = redis::from_redis_value_ref(get("name")?).ok()?;
                let pending: i64 = redis::from_redis_value_ref(get("pending")?).ok()?;
                let idle: i64 = redis::from_redis_value_ref(get("idle")?).ok()?;
                (pending == 0 && idle > idle_ms && name != self.consumer).then_some(name)
            })
            .collect();
        if gone.is_empty() {
            return Ok(0);
        }
        let count = gone.len();
        self.redis
            .run(|mut c| async move {
                let mut pipe = redis::pipe();
                for name in &gone {
                    pipe.cmd("XGROUP")
                        .arg("DELCONSUMER")
                        .arg(&log)
                        .arg(PROGRESS_GROUP)
                        .arg(name)
                        .ignore();
                }
                pipe.query_async::<()>(&mut c).await
            })
            .await?;
        Ok(count)
    }

    /// Entries in the log and parked pairs (for metrics and tests).
    pub async fn backlog(&self) -> Result<(u64, u64), DependencyError> {
        let (log, parked) = (keys::progress_log(), keys::progress_parked());
        self.redis
            .run(|mut c| async move {
                redis::pipe()
                    .cmd("XLEN")
                    .arg(log)
                    .cmd("HLEN")
                    .arg(parked)
                    .query_async(&mut c)
                    .await
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item() -> ProgressItem {
        ProgressItem {
            user_id: UserId::parse("u 1").unwrap(),
            content_id: ContentId::parse("m-1").unwrap(),
            position_ms: PositionMs::new(42).unwrap(),
            updated_at: millis_to_utc(1_700_000_000_123),
            completed: true,
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
        let f = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
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
    fn dead_letters_list_as_json() {
        let fields = vec![
            ("u".to_owned(), "x".to_owned()),
            ("c".to_owned(), "m-1".to_owned()),
            ("p".to_owned(), "5".to_owned()),
            ("t".to_owned(), "1700000000123".to_owned()),
            ("w".to_owned(), "0".to_owned()),
            ("a".to_owned(), "5".to_owned()),
            ("e".to_owned(), "status 404".to_owned()),
        ];
        let json = parse_dead_letter("1-0".to_owned(), &fields).to_json();
        assert_eq!(json["entry_id"], "1-0");
        assert_eq!(json["user_id"], "x");
        assert_eq!(json["position_ms"], 5);
        assert_eq!(json["attempts"], 5);
        assert_eq!(json["last_error"], "status 404");
        assert_eq!(json["updated_at"], "2023-11-14T22:13:20.123Z");
    }
}

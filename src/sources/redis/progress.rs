//! The progress log: positions acknowledged to players, kept in Redis until
//! the internal API has them (at-least-once delivery).
//!
//! A Redis Stream with one consumer group: every instance reads its share
//! (`XREADGROUP`), and entries read by an instance that died are taken over
//! by another after a short idle time (`XAUTOCLAIM`). Entries the internal API
//! cannot take now are folded into a parked hash, one field per (user, title),
//! so an outage parks distinct pairs rather than heartbeats, and are offered
//! again beside fresh entries on every round. Both keys share one hash tag,
//! so the settle script works in Redis Cluster mode too.

use std::sync::LazyLock;
use std::time::Duration;

use redis::{Script, Value};

use super::keys;
use super::{RedisStore, millis_to_utc};
use crate::model::{ContentId, PositionMs, ProgressItem, UserId};
use crate::resilience::DependencyError;

static SETTLE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/settle.lua")));

pub const PROGRESS_GROUP: &str = "delivery";

/// Entries read by a consumer and not settled for this long belong to an
/// instance that died (or hung); another takes them over. Far above a round's
/// duration (a batch post is bounded by the internal API's timeout).
const CLAIM_IDLE: Duration = Duration::from_secs(15);

/// The log's handle for one consumer (one instance).
#[derive(Clone)]
pub struct ProgressLog {
    redis: RedisStore,
    consumer: String,
}

/// One round's work: fresh entries of the log and a sample of parked pairs.
#[derive(Debug, Default)]
pub struct Delivery {
    /// (entry id, item); an entry that does not parse is settled as done, with `None`.
    pub fresh: Vec<(String, Option<ProgressItem>)>,
    /// (field, raw value, item); a value that does not parse is settled as done, with `None`.
    pub parked: Vec<(String, String, Option<ProgressItem>)>,
}

/// How a round ended for each piece of it.
#[derive(Debug, Default)]
pub struct Settlement {
    /// Fresh entries delivered, refused for good or unparseable.
    pub done: Vec<String>,
    /// Parked fields delivered or refused for good: (field, raw value).
    pub parked_done: Vec<(String, String)>,
    /// Fresh entries not delivered: (entry id, item) to park.
    pub park: Vec<(String, ProgressItem)>,
}

fn field(item: &ProgressItem) -> String {
    // Neither id may hold a control character, so '\n' separates them unambiguously.
    format!("{}\n{}", item.user_id, item.content_id)
}

fn parked_value(item: &ProgressItem) -> String {
    format!(
        "{} {}",
        item.updated_at.timestamp_millis(),
        serde_json::to_string(item).unwrap_or_default()
    )
}

fn parse_parked(value: &str) -> Option<ProgressItem> {
    let (_, json) = value.split_once(' ')?;
    serde_json::from_str(json).ok()
}

/// An `XADD` entry `u c p t` back into an item; `None` if anything is off.
fn parse_entry(fields: &[(String, String)]) -> Option<ProgressItem> {
    let get = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    Some(ProgressItem {
        user_id: UserId::parse(get("u")?).ok()?,
        content_id: ContentId::parse(get("c")?).ok()?,
        position_ms: PositionMs::new(get("p")?.parse().ok()?).ok()?,
        updated_at: millis_to_utc(get("t")?.parse().ok()?),
        completed: get("w") == Some("1"),
    })
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

/// The same fields the session scripts write: `u c p t w`.
fn add_entry(pipe: &mut redis::Pipeline, item: &ProgressItem) {
    pipe.cmd("XADD")
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
        .arg(if item.completed { "1" } else { "0" })
        .ignore();
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
    /// Appends positions: those kept in memory while Redis was down, and
    /// (cluster mode, where the session script cannot) a heartbeat's.
    pub async fn append_all(&self, items: &[ProgressItem]) -> Result<(), DependencyError> {
        if items.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for item in items {
            add_entry(&mut pipe, item);
        }
        self.redis
            .run(|mut c| async move { pipe.query_async::<()>(&mut c).await })
            .await
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
        let (claimed, read, sample): (Value, Value, Value) = self
            .redis
            .run(|mut c| async move {
                redis::pipe()
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
                    .await
            })
            .await?;
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
        if s.done.is_empty() && s.parked_done.is_empty() && s.park.is_empty() {
            return Ok(());
        }
        let mut call = SETTLE.prepare_invoke();
        call.key(keys::progress_log())
            .key(keys::progress_parked())
            .arg(PROGRESS_GROUP)
            .arg(s.done.len());
        for id in &s.done {
            call.arg(id);
        }
        call.arg(s.parked_done.len());
        for (field, value) in &s.parked_done {
            call.arg(field).arg(value);
        }
        call.arg(s.park.len());
        for (id, item) in &s.park {
            call.arg(id).arg(field(item)).arg(parked_value(item));
        }
        self.redis
            .run(|mut c| async move { call.invoke_async::<i64>(&mut c).await })
            .await
            .map(drop)
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

    #[test]
    fn parked_values_round_trip() {
        let item = ProgressItem {
            user_id: UserId::parse("u 1").unwrap(),
            content_id: ContentId::parse("m-1").unwrap(),
            position_ms: PositionMs::new(42).unwrap(),
            updated_at: millis_to_utc(1_700_000_000_123),
            completed: true,
        };
        let value = parked_value(&item);
        assert!(value.starts_with("1700000000123 "));
        assert_eq!(parse_parked(&value), Some(item.clone()));
        assert_eq!(field(&item), "u 1\nm-1");
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
        assert_eq!(parse_entry(&ok).map(|i| i.position_ms.get()), Some(5));
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
}

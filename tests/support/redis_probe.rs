//! Moneta's Redis as a test reads it: straight from the server, with a
//! connection of the test's own, so what is checked is what Redis holds and
//! not what Moneta says it holds.

use std::collections::BTreeMap;

use moneta::model::UserId;
use moneta::sources::redis::keys::Buckets;
use redis::aio::MultiplexedConnection;

/// `MONETA_REDIS_BUCKETS` as the tests run Moneta (its default).
pub const BUCKETS: u16 = 64;

/// The consumer group of every bucket's progress log.
pub const PROGRESS_GROUP: &str = "delivery";

/// The single progress log, parked hash and dead letters of the key layout
/// before buckets (the courier drains them).
pub const LEGACY_LOG: &str = "moneta:{progress}:log";
pub const LEGACY_PARKED: &str = "moneta:{progress}:parked";
pub const LEGACY_DEAD: &str = "moneta:{progress}:dead";

/// The bucket of `user`, as Moneta computes it (the key slot of the id).
pub fn bucket(user: &str) -> u16 {
    let user = UserId::parse(user).expect("a valid user id");
    Buckets::new(BUCKETS).of(&user).index()
}

/// The progress log (a Stream with the consumer group `delivery`) of a bucket.
pub fn progress_log(bucket: u16) -> String {
    format!("moneta:{{b{bucket}}}:log")
}

/// Positions the internal API could not take yet, one field per (user,
/// title), of a bucket.
pub fn progress_parked(bucket: u16) -> String {
    format!("moneta:{{b{bucket}}}:parked")
}

/// Positions that failed alone too often, of a bucket.
pub fn progress_dead(bucket: u16) -> String {
    format!("moneta:{{b{bucket}}}:dead")
}

/// One key of a user (a user id without `{`, `}`, `:` or `%`):
/// `moneta:{b<bucket>}:u:<user>:<name>`.
pub fn user_key(user: &str, name: &str) -> String {
    format!("moneta:{{b{}}}:u:{user}:{name}", bucket(user))
}

/// The pattern of one user's keys (a user id without `{`, `}`, `:`, `%` or glob characters).
pub fn user_keys(user: &str) -> String {
    format!("moneta:{{b{}}}:u:{user}:*", bucket(user))
}

/// Every key of one kind, over every bucket and the layout before buckets.
fn every(kind: fn(u16) -> String, legacy: &str) -> Vec<String> {
    (0..BUCKETS).map(kind).chain([legacy.to_owned()]).collect()
}

/// What the progress keys hold, summed over every bucket (and the layout before buckets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// `XLEN` of the logs.
    Log,
    /// `HLEN` of the parked hashes.
    Parked,
    /// `XLEN` of the dead letters.
    Dead,
}
/// One key as it stands: its type and its members, rendered so that two
/// readings compare equal exactly when the contents are equal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyContent {
    pub kind: String,
    pub items: Vec<String>,
}

impl KeyContent {
    /// HLEN, ZCARD, SCARD, LLEN or XLEN as fits; STRLEN for a string.
    pub fn size(&self) -> usize {
        match self.kind.as_str() {
            "string" => self.items.first().map_or(0, String::len),
            _ => self.items.len(),
        }
    }
}

pub struct RedisProbe {
    conn: MultiplexedConnection,
}

impl RedisProbe {
    pub async fn connect(url: &str) -> RedisProbe {
        let client = redis::Client::open(url).expect("redis URL");
        RedisProbe {
            conn: client
                .get_multiplexed_async_connection()
                .await
                .expect("test's own Redis connection"),
        }
    }

    /// Runs one command; panics on an error reply.
    pub async fn query<T: redis::FromRedisValue>(&mut self, cmd: &redis::Cmd) -> T {
        cmd.query_async(&mut self.conn)
            .await
            .unwrap_or_else(|e| panic!("{:?}: {e}", cmd.args_iter().next()))
    }

    pub async fn count(&mut self, command: &str, key: &str) -> u64 {
        self.query(redis::cmd(command).arg(key)).await
    }

    /// Every key matching `pattern`, with its contents.
    pub async fn contents(&mut self, pattern: &str) -> BTreeMap<String, KeyContent> {
        let keys: Vec<String> = self.query(redis::cmd("KEYS").arg(pattern)).await;
        let mut all = BTreeMap::new();
        for key in keys {
            let kind: String = self.query(redis::cmd("TYPE").arg(&key)).await;
            let mut items: Vec<String> = match kind.as_str() {
                "string" => vec![self.query(redis::cmd("GET").arg(&key)).await],
                "hash" => pairs(self.query(redis::cmd("HGETALL").arg(&key)).await),
                "zset" => pairs(
                    self.query(redis::cmd("ZRANGE").arg(&key).arg(0).arg(-1).arg("WITHSCORES"))
                        .await,
                ),
                "set" => self.query(redis::cmd("SMEMBERS").arg(&key)).await,
                "list" => self.query(redis::cmd("LRANGE").arg(&key).arg(0).arg(-1)).await,
                "stream" => {
                    let entries: Vec<(String, Vec<String>)> =
                        self.query(redis::cmd("XRANGE").arg(&key).arg("-").arg("+")).await;
                    entries
                        .into_iter()
                        .map(|(id, fields)| format!("{id} {}", fields.join(" ")))
                        .collect()
                }
                // Gone between KEYS and TYPE.
                _ => Vec::new(),
            };
            if kind != "list" && kind != "stream" {
                items.sort();
            }
            all.insert(key, KeyContent { kind, items });
        }
        all
    }

    /// `command` on each key, in one pipeline, summed.
    async fn sum(&mut self, command: &str, keys: &[String]) -> u64 {
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd(command).arg(key);
        }
        let counts: Vec<u64> = pipe
            .query_async(&mut self.conn)
            .await
            .unwrap_or_else(|e| panic!("{command} of the progress keys: {e}"));
        counts.iter().sum()
    }

    /// Entries, parked pairs or dead letters, summed over every bucket.
    pub async fn total(&mut self, what: Progress) -> u64 {
        match what {
            Progress::Log => self.sum("XLEN", &every(progress_log, LEGACY_LOG)).await,
            Progress::Parked => self.sum("HLEN", &every(progress_parked, LEGACY_PARKED)).await,
            Progress::Dead => self.sum("XLEN", &every(progress_dead, LEGACY_DEAD)).await,
        }
    }

    /// Whether every bucket's log has the consumer group `delivery`.
    pub async fn every_log_has_its_group(&mut self) -> bool {
        for bucket in 0..BUCKETS {
            if !self
                .groups(&progress_log(bucket))
                .await
                .iter()
                .any(|g| g == PROGRESS_GROUP)
            {
                return false;
            }
        }
        true
    }

    /// (entries read by some instance and not settled, entries in the logs),
    /// summed over every bucket; a log without its group has nothing read.
    pub async fn progress_log_state(&mut self) -> (u64, u64) {
        let mut pending = 0;
        for log in every(progress_log, LEGACY_LOG) {
            if self.groups(&log).await.iter().any(|g| g == PROGRESS_GROUP) {
                pending += self
                    .consumers(&log, PROGRESS_GROUP)
                    .await
                    .iter()
                    .map(|(_, held)| held)
                    .sum::<u64>();
            }
        }
        (pending, self.total(Progress::Log).await)
    }

    /// The names of the consumer groups of a stream (none when it does not exist).
    pub async fn groups(&mut self, stream: &str) -> Vec<String> {
        let reply: redis::RedisResult<Vec<Vec<redis::Value>>> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(stream)
            .query_async(&mut self.conn)
            .await;
        reply
            .unwrap_or_default()
            .iter()
            .filter_map(|group| field(group, "name"))
            .collect()
    }

    /// `XINFO CONSUMERS`: each consumer's name and how many entries it holds unacknowledged.
    pub async fn consumers(&mut self, stream: &str, group: &str) -> Vec<(String, u64)> {
        let reply: Vec<Vec<redis::Value>> = self
            .query(redis::cmd("XINFO").arg("CONSUMERS").arg(stream).arg(group))
            .await;
        reply
            .iter()
            .filter_map(|c| Some((field(c, "name")?, field(c, "pending")?.parse().ok()?)))
            .collect()
    }
}

/// A flat `[field, value, …]` reply as `field=value` lines.
fn pairs(flat: Vec<String>) -> Vec<String> {
    flat.chunks(2).map(|kv| kv.join("=")).collect()
}

/// One field of a flat `XINFO` reply, as text.
fn field(flat: &[redis::Value], name: &str) -> Option<String> {
    flat.chunks(2).find_map(|kv| {
        let [k, v] = kv else { return None };
        let k: String = redis::from_redis_value_ref(k).ok()?;
        if k != name {
            return None;
        }
        redis::from_redis_value_ref(v).ok()
    })
}

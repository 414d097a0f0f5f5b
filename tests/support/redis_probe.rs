//! Moneta's Redis as a test reads it: straight from the server, with a
//! connection of the test's own, so what is checked is what Redis holds and
//! not what Moneta says it holds.

use std::collections::BTreeMap;

use redis::aio::MultiplexedConnection;

/// The progress log (a Stream with the consumer group `delivery`).
pub const PROGRESS_LOG: &str = "moneta:{progress}:log";
/// Positions the internal API could not take yet, one field per (user, title).
pub const PROGRESS_PARKED: &str = "moneta:{progress}:parked";

/// The pattern of one user's keys (a user id without `{`, `}`, `:`, `%` or glob characters).
pub fn user_keys(user: &str) -> String {
    format!("moneta:{{u:{user}}}*")
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

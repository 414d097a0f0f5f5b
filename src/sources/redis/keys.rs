//! Every Redis key Moneta uses, in one place.
//!
//! Per-user keys share the hash tag `{u:<user>}` so that every script touching
//! one user's keys stays in one Redis Cluster slot. The user id is escaped so a
//! `{`, `}` or `:` in it can neither end the tag early nor collide with a key
//! of another user.

use crate::model::{ContentId, UserId};

const PREFIX: &str = "moneta";

/// Cached title (fresh/stale envelope), shared by all users.
pub fn content(content_id: &ContentId) -> String {
    format!("{PREFIX}:content:{content_id}")
}

/// Stream of positions acknowledged to players and not yet delivered to the
/// internal API (consumer group `delivery`). Shares its slot with
/// [`progress_parked`] so one script can move entries between them.
pub fn progress_log() -> String {
    format!("{PREFIX}:{{progress}}:log")
}

/// Hash of positions the internal API could not take yet, one field per
/// (user, title): an outage parks distinct pairs, not heartbeats.
pub fn progress_parked() -> String {
    format!("{PREFIX}:{{progress}}:parked")
}

/// Stream of positions the internal API failed to take alone
/// `MONETA_PROGRESS_MAX_ATTEMPTS` times while it took others (poison items),
/// kept for `moneta progress dead-letters` / `replay` instead of being dropped.
/// Bounded (`XADD MAXLEN ~`); shares the slot of [`progress_log`] so the
/// settle script moves items into it atomically.
pub fn progress_dead() -> String {
    format!("{PREFIX}:{{progress}}:dead")
}

/// The keys of one user; all of them hash to the same cluster slot.
pub struct UserKeys {
    tag: String,
}

impl UserKeys {
    pub fn new(user_id: &UserId) -> Self {
        let mut tag = String::with_capacity(user_id.as_str().len() + 16);
        tag.push_str(PREFIX);
        tag.push_str(":{u:");
        for c in user_id.as_str().chars() {
            match c {
                '{' | '}' | ':' | '%' => tag.push_str(&format!("%{:02X}", c as u32)),
                c => tag.push(c),
            }
        }
        tag.push('}');
        Self { tag }
    }

    /// Cached entitlement JSON (`null` when the user has none).
    pub fn entitlement(&self) -> String {
        format!("{}:entitlement", self.tag)
    }
    /// Hash: content id → resume position in ms.
    pub fn positions(&self) -> String {
        format!("{}:positions", self.tag)
    }
    /// Sorted set: session id → last heartbeat (ms since epoch, Redis' clock).
    pub fn sessions(&self) -> String {
        format!("{}:sessions", self.tag)
    }
    /// Hash: session id → "device_id content_id".
    pub fn session_info(&self) -> String {
        format!("{}:session-info", self.tag)
    }
    /// Hash: device id → its live session id (finds the session a device replaces).
    pub fn devices(&self) -> String {
        format!("{}:devices", self.tag)
    }
    /// Sorted set of recently ended sessions (`e:<id>` evicted, `s:<id>`
    /// stopped, replaced or expired) → when: their ids stay ended, and an
    /// evicted player's next heartbeat can say why. Bounded per user by the
    /// scripts.
    pub fn ended(&self) -> String {
        format!("{}:ended", self.tag)
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
    use super::*;

    #[test]
    fn user_keys_share_one_hash_tag() {
        let k = UserKeys::new(&user("user-42"));
        let tags = [
            k.entitlement(),
            k.positions(),
            k.sessions(),
            k.session_info(),
            k.devices(),
            k.ended(),
        ];
        assert!(tags.iter().all(|t| hash_tag(t) == "u:user-42"));
    }

    #[test]
    fn braces_in_user_ids_cannot_break_the_tag() {
        let k = UserKeys::new(&user("a}b{c:d"));
        assert_eq!(hash_tag(&k.sessions()), "u:a%7Db%7Bc%3Ad");
        assert_ne!(
            UserKeys::new(&user("a:b")).sessions(),
            UserKeys::new(&user("a%3Ab")).sessions()
        );
    }

    #[test]
    fn content_keys_are_per_title() {
        let id = ContentId::parse("m-0001").unwrap();
        assert_eq!(content(&id), "moneta:content:m-0001");
    }

    #[test]
    fn progress_keys_share_a_slot() {
        assert_eq!(hash_tag(&progress_log()), hash_tag(&progress_parked()));
        assert_eq!(hash_tag(&progress_log()), hash_tag(&progress_dead()));
    }

    fn user(s: &str) -> UserId {
        UserId::parse(s).unwrap()
    }
}

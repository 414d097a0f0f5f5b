//! Every Redis key Moneta uses, in one place.
//!
//! Per-user keys share the hash tag `{u:<user>}` so that every script touching
//! one user's keys stays in one Redis Cluster slot. The user id is escaped so a
//! `{`, `}` or `:` in it can neither end the tag early nor collide with a key
//! of another user.

const PREFIX: &str = "moneta";

/// Cached title (fresh/stale envelope), shared by all users.
pub fn content(content_id: &str) -> String {
    format!("{PREFIX}:content:{content_id}")
}

/// Positions waiting for the internal API (a list of JSON items).
pub fn progress_spill() -> String {
    format!("{PREFIX}:progress:pending")
}

/// The keys of one user; all of them hash to the same cluster slot.
pub struct UserKeys {
    tag: String,
}

impl UserKeys {
    pub fn new(user_id: &str) -> Self {
        let mut tag = String::with_capacity(user_id.len() + 16);
        tag.push_str(PREFIX);
        tag.push_str(":{u:");
        for c in user_id.chars() {
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
    /// Sorted set: session id → last heartbeat (ms since epoch).
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
        let k = UserKeys::new("user-42");
        let tags = [
            k.entitlement(),
            k.positions(),
            k.sessions(),
            k.session_info(),
            k.devices(),
        ];
        assert!(tags.iter().all(|t| hash_tag(t) == "u:user-42"));
    }

    #[test]
    fn braces_in_user_ids_cannot_break_the_tag() {
        let k = UserKeys::new("a}b{c:d");
        assert_eq!(hash_tag(&k.sessions()), "u:a%7Db%7Bc%3Ad");
        assert_ne!(UserKeys::new("a:b").sessions(), UserKeys::new("a%3Ab").sessions());
    }

    #[test]
    fn content_keys_are_per_title() {
        assert_eq!(content("m-0001"), "moneta:content:m-0001");
    }
}

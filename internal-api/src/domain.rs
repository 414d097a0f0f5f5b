//! Wire types of the internal API (CONTRACT section 5) and the rules for the
//! identifiers that appear in paths and bodies.

use chrono::{DateTime, Datelike, Utc};
use serde::{Deserialize, Serialize};

pub const MAX_CONTENT_ID_LEN: usize = 64;
pub const MAX_USER_ID_LEN: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContentPlayback {
    pub content_id: String,
    pub title: String,
    pub duration_ms: i64,
    /// `None` means available everywhere; it is serialised as `null`, not
    /// omitted, because clients tell "everywhere" from "nowhere" by it.
    pub available_countries: Option<Vec<String>>,
    /// Empty means any plan.
    pub required_plans: Vec<String>,
    pub streams: Vec<Stream>,
    pub subtitles: Vec<Subtitle>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stream {
    pub protocol: String,
    pub path: String,
    pub drm: Option<Drm>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drm {
    pub system: String,
    pub key_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subtitle {
    pub language: String,
    pub path: String,
}

/// The document `export-snapshot` prints, read by Moneta as its fallback
/// catalog file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogSnapshot {
    pub contents: Vec<ContentPlayback>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct Entitlement {
    pub user_id: String,
    pub plan: String,
    pub max_streams: i32,
    pub active: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct Progress {
    pub position_ms: i64,
    pub updated_at: DateTime<Utc>,
}

/// Unknown fields are ignored on purpose: Moneta may send more than this
/// version understands.
#[derive(Debug, Clone, Deserialize)]
pub struct ProgressBatch {
    pub items: Vec<ProgressItem>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ProgressItem {
    pub user_id: String,
    pub content_id: String,
    pub position_ms: i64,
    pub updated_at: DateTime<Utc>,
}

/// Same rule as Moneta's public API, so any id Moneta accepts is accepted here.
pub fn valid_content_id(id: &str) -> bool {
    (1..=MAX_CONTENT_ID_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// User ids are the JWT `sub` of whatever identity provider is in use, so any
/// text is allowed except control characters, which PostgreSQL rejects (NUL)
/// or which would corrupt logs.
pub fn valid_user_id(id: &str) -> bool {
    (1..=MAX_USER_ID_LEN).contains(&id.len()) && !id.chars().any(char::is_control)
}

impl ProgressItem {
    /// Returns why the item cannot be stored, if it cannot.
    pub fn problem(&self) -> Option<String> {
        if !valid_user_id(&self.user_id) {
            return Some(format!(
                "user_id must be 1 to {MAX_USER_ID_LEN} bytes without control characters"
            ));
        }
        if !valid_content_id(&self.content_id) {
            return Some(format!(
                "content_id must match [A-Za-z0-9_-]{{1,{MAX_CONTENT_ID_LEN}}}"
            ));
        }
        if self.position_ms < 0 {
            return Some("position_ms must not be negative".to_owned());
        }
        // Outside this range PostgreSQL's timestamptz either rejects the value
        // or a far-future stamp would pin the position forever.
        let year = self.updated_at.year();
        if !(1970..=9999).contains(&year) {
            return Some("updated_at must be between years 1970 and 9999".to_owned());
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ids() {
        assert!(valid_content_id("m-0001"));
        assert!(valid_content_id(&"a".repeat(64)));
        assert!(!valid_content_id(&"a".repeat(65)));
        assert!(!valid_content_id(""));
        assert!(!valid_content_id("m 0001"));
        assert!(!valid_content_id("m/0001"));
    }

    #[test]
    fn user_ids() {
        assert!(valid_user_id("demo-basic"));
        assert!(valid_user_id("auth0|5f7c8ec7c33c6c004bbafe82"));
        assert!(valid_user_id("someone@example.com"));
        assert!(!valid_user_id(""));
        assert!(!valid_user_id("a\0b"));
        assert!(!valid_user_id(&"u".repeat(129)));
    }

    #[test]
    fn null_countries_serialise_as_null() {
        let c = ContentPlayback {
            content_id: "m-1".into(),
            title: "t".into(),
            duration_ms: 1,
            available_countries: None,
            required_plans: vec![],
            streams: vec![Stream {
                protocol: "hls".into(),
                path: "/p".into(),
                drm: None,
            }],
            subtitles: vec![],
        };
        let v = serde_json::to_value(&c).expect("serialise");
        assert!(v["available_countries"].is_null());
        assert!(
            v.as_object()
                .is_some_and(|o| o.contains_key("available_countries"))
        );
        assert!(v["streams"][0]["drm"].is_null());
    }
}

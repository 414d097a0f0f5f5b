//! Wire types of the internal API (CONTRACT section 5) and the rules for the
//! values that arrive in paths and bodies, each checked once, where the value
//! enters.

use chrono::{DateTime, Datelike, Utc};
use serde::{Deserialize, Serialize};

pub const MAX_CONTENT_ID_LEN: usize = 64;
pub const MAX_USER_ID_LEN: usize = 128;
/// 2^53 - 1: the largest integer every JSON reader holds exactly.
pub const MAX_POSITION_MS: i64 = (1 << 53) - 1;

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
    /// Always an array, sorted by `start_ms` then `type`. A snapshot written
    /// before markers existed still reads, as a title without any.
    #[serde(default)]
    pub markers: Vec<Marker>,
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

/// A skippable part of a title; the schema keeps `type` to the contract's
/// four values and `start_ms < end_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct Marker {
    #[serde(rename = "type")]
    #[sqlx(rename = "type")]
    pub kind: String,
    pub start_ms: i64,
    pub end_ms: i64,
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
    /// The player stopped the title as completed: watched whatever the position.
    pub completed: bool,
}

/// Unknown fields are ignored on purpose: Moneta may send more than this
/// version understands.
#[derive(Debug, Clone, Deserialize)]
pub struct ProgressBatch {
    pub items: Vec<ProgressItem>,
}

/// Every field is checked while the body is parsed, so a batch holding one
/// bad item fails as a whole before anything is written.
#[derive(Debug, Clone, Deserialize)]
pub struct ProgressItem {
    pub user_id: UserId,
    pub content_id: ContentId,
    pub position_ms: PositionMs,
    pub updated_at: UpdatedAt,
    /// Moneta sends it only when true.
    #[serde(default)]
    pub completed: bool,
}

/// Why a value was refused. The message states the rule but never the value,
/// because it goes back to the caller and into logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("user_id must be 1 to {MAX_USER_ID_LEN} bytes without control characters")]
    UserId,
    #[error("content_id must match [A-Za-z0-9_-]{{1,{MAX_CONTENT_ID_LEN}}}")]
    ContentId,
    #[error("position_ms must be an integer from 0 to {MAX_POSITION_MS}")]
    PositionMs,
    #[error("updated_at must be between years 1970 and 9999")]
    UpdatedAt,
}

/// Declares a newtype whose only constructor is `parse`, which checks `rule`:
/// holding one proves the value was checked, so nothing downstream checks it
/// again. The caller's `#[serde(try_from = ...)]` sends deserialisation
/// through `parse` as well. There is no `DerefMut`, so a checked value cannot
/// be changed into an unchecked one.
macro_rules! checked {
    ($(#[$attr:meta])* pub struct $name:ident($raw:ty) if $rule:path, else $invalid:expr;) => {
        $(#[$attr])*
        pub struct $name($raw);

        impl $name {
            pub fn parse(raw: $raw) -> Result<Self, Invalid> {
                if $rule(&raw) { Ok(Self(raw)) } else { Err($invalid) }
            }
        }

        impl TryFrom<$raw> for $name {
            type Error = Invalid;

            fn try_from(raw: $raw) -> Result<Self, Invalid> {
                Self::parse(raw)
            }
        }

        impl std::ops::Deref for $name {
            type Target = $raw;

            fn deref(&self) -> &$raw {
                &self.0
            }
        }
    };
}

checked! {
    /// Same rule as Moneta's public API, so any id Moneta accepts is accepted
    /// here.
    #[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
    #[serde(try_from = "String")]
    pub struct ContentId(String) if valid_content_id, else Invalid::ContentId;
}

checked! {
    /// The JWT `sub` of whatever identity provider is in use, so any text is
    /// allowed except control characters, which PostgreSQL rejects (NUL) or
    /// which would corrupt logs.
    #[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
    #[serde(try_from = "String")]
    pub struct UserId(String) if valid_user_id, else Invalid::UserId;
}

checked! {
    /// Whatever position Moneta accepts (CONTRACT section 6), and no more: a
    /// larger one would lose precision in a JSON client reading it back.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
    #[serde(try_from = "i64")]
    pub struct PositionMs(i64) if valid_position_ms, else Invalid::PositionMs;
}

checked! {
    /// Outside these years PostgreSQL's timestamptz either rejects the value
    /// or a far-future stamp would pin the position forever, since the newest
    /// write wins.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
    #[serde(try_from = "DateTime<Utc>")]
    pub struct UpdatedAt(DateTime<Utc>) if valid_updated_at, else Invalid::UpdatedAt;
}

fn valid_content_id(id: &str) -> bool {
    (1..=MAX_CONTENT_ID_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn valid_user_id(id: &str) -> bool {
    (1..=MAX_USER_ID_LEN).contains(&id.len()) && !id.chars().any(char::is_control)
}

fn valid_position_ms(position_ms: &i64) -> bool {
    (0..=MAX_POSITION_MS).contains(position_ms)
}

fn valid_updated_at(updated_at: &DateTime<Utc>) -> bool {
    (1970..=9999).contains(&updated_at.year())
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
    fn positions_up_to_2_pow_53_minus_1() {
        assert_eq!(MAX_POSITION_MS, 9_007_199_254_740_991);
        assert_eq!(PositionMs::parse(0).map(|p| *p), Ok(0));
        assert_eq!(
            PositionMs::parse(MAX_POSITION_MS).map(|p| *p),
            Ok(MAX_POSITION_MS)
        );
        assert_eq!(PositionMs::parse(MAX_POSITION_MS + 1), Err(Invalid::PositionMs));
        assert_eq!(PositionMs::parse(-1), Err(Invalid::PositionMs));
    }

    #[test]
    fn an_item_is_checked_while_it_is_parsed() {
        let item = |user_id: &str, position_ms: i64, updated_at: &str| {
            serde_json::from_value::<ProgressItem>(serde_json::json!({
                "user_id": user_id, "content_id": "m-0001",
                "position_ms": position_ms, "updated_at": updated_at,
            }))
        };
        let parsed = item("u1", MAX_POSITION_MS, "2026-01-01T00:00:00Z").expect("valid");
        assert_eq!(
            (parsed.user_id.as_str(), *parsed.position_ms),
            ("u1", MAX_POSITION_MS)
        );

        let err = item("u1", MAX_POSITION_MS + 1, "2026-01-01T00:00:00Z").expect_err("too far");
        assert!(err.to_string().contains("position_ms must be"), "{err}");
        let err = item("u\u{7}1", 1, "2026-01-01T00:00:00Z").expect_err("control character");
        assert!(err.to_string().contains("user_id must be"), "{err}");
        let err = item("u1", 1, "1969-12-31T23:59:59Z").expect_err("before 1970");
        assert!(err.to_string().contains("updated_at must be"), "{err}");
    }

    #[test]
    fn completed_is_false_unless_sent() {
        let item = |extra: serde_json::Value| {
            let mut v = serde_json::json!({
                "user_id": "u1", "content_id": "m-0001",
                "position_ms": 1, "updated_at": "2026-01-01T00:00:00Z",
            });
            if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
                o.extend(e.clone());
            }
            serde_json::from_value::<ProgressItem>(v).expect("valid")
        };
        assert!(!item(serde_json::json!({})).completed);
        assert!(item(serde_json::json!({"completed": true})).completed);
        assert!(!item(serde_json::json!({"completed": false})).completed);
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
            markers: vec![],
        };
        let v = serde_json::to_value(&c).expect("serialise");
        assert!(v["available_countries"].is_null());
        assert!(
            v.as_object()
                .is_some_and(|o| o.contains_key("available_countries"))
        );
        assert!(v["streams"][0]["drm"].is_null());
        assert_eq!(v["markers"], serde_json::json!([]));
    }

    #[test]
    fn markers_carry_the_contract_field_names() {
        let marker = Marker {
            kind: "intro".into(),
            start_ms: 1,
            end_ms: 2,
        };
        let v = serde_json::to_value(&marker).expect("serialise");
        assert_eq!(
            v,
            serde_json::json!({"type": "intro", "start_ms": 1, "end_ms": 2})
        );
    }

    #[test]
    fn a_snapshot_entry_without_markers_reads_as_none() {
        let c: ContentPlayback = serde_json::from_value(serde_json::json!({
            "content_id": "m-1", "title": "t", "duration_ms": 1,
            "available_countries": null, "required_plans": [],
            "streams": [], "subtitles": [],
        }))
        .expect("an entry written before markers existed");
        assert!(c.markers.is_empty());
    }
}

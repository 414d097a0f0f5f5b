//! Resume positions on their way to the internal API.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{ContentId, PositionMs, UserId};

/// The internal API's record of a position.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Progress {
    pub position_ms: u64,
    pub updated_at: DateTime<Utc>,
    /// Stopped as completed; absent from internal APIs that do not keep it.
    #[serde(default)]
    pub completed: bool,
}

/// One position for `POST /internal/v1/progress:batch`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgressItem {
    pub user_id: UserId,
    pub content_id: ContentId,
    pub position_ms: PositionMs,
    pub updated_at: DateTime<Utc>,
    /// The player said the title was watched to the end (a stop with
    /// `completed: true`); sent only when true.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub completed: bool,
    /// Stamped with this instance's own clock, Redis' never measured (see
    /// `progress::queue`); only positions held in memory are.
    #[serde(skip)]
    pub provisional: bool,
}

/// A stored position as Redis keeps it: the raw position, and whether the
/// player said the title was completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResumePoint {
    pub position_ms: u64,
    pub completed: bool,
}

impl ResumePoint {
    /// The Redis field value: `"<ms>"`, or `"<ms>:c"` once completed.
    pub fn encode(self) -> String {
        if self.completed {
            format!("{}:c", self.position_ms)
        } else {
            self.position_ms.to_string()
        }
    }

    /// The value with the time it was acknowledged (Redis' clock, ms since
    /// the epoch): `"<ms>[:c]@<at_ms>"`. A write that carries an older time
    /// than the stored one must not replace it (positions kept in memory
    /// during an outage arrive late).
    pub fn encode_at(self, at_ms: i64) -> String {
        format!("{}@{at_ms}", self.encode())
    }

    pub fn decode(raw: &str) -> Option<Self> {
        StoredPoint::decode(raw).map(|stored| stored.point)
    }
}

/// A resume position as Redis stores it: `"<ms>[:c]@<at_ms>[/<checked_ms>]"`.
///
/// `checked_ms`: when the position was last found to be the newest one the
/// internal API knows too (Redis' clock). An instance killed while Redis was
/// unreachable may have delivered a newer position straight to the internal
/// API, which Redis never saw; after such an outage, positions older than
/// its end are checked there once (`sources::redis::outages`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredPoint {
    pub point: ResumePoint,
    /// When it was acknowledged; `None` for a value written before positions
    /// were stamped: older than any stamped one.
    pub at_ms: Option<i64>,
    pub checked_ms: Option<i64>,
}

impl StoredPoint {
    pub fn decode(raw: &str) -> Option<Self> {
        let (point, stamps) = match raw.split_once('@') {
            Some((point, stamps)) => (point, Some(stamps)),
            None => (raw, None),
        };
        let (at_ms, checked_ms) = match stamps.map(|s| s.split_once('/').unwrap_or((s, ""))) {
            None => (None, None),
            Some((at, "")) => (Some(at.parse().ok()?), None),
            Some((at, checked)) => (Some(at.parse().ok()?), Some(checked.parse().ok()?)),
        };
        let (ms, completed) = match point.strip_suffix(":c") {
            Some(ms) => (ms, true),
            None => (point, false),
        };
        Some(Self {
            point: ResumePoint {
                position_ms: ms.parse().ok()?,
                completed,
            },
            at_ms,
            checked_ms,
        })
    }

    /// The same position, found newest as of `checked_ms`. An unstamped one
    /// gets time 0, still older than any stamped one.
    pub fn encode_checked(self, checked_ms: i64) -> String {
        format!("{}/{checked_ms}", self.point.encode_at(self.at_ms.unwrap_or(0)))
    }

    /// Up to when this position is known to be the newest: acknowledged
    /// then, or checked then.
    pub fn known_newest_at(self) -> i64 {
        self.at_ms.unwrap_or(0).max(self.checked_ms.unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_progress_answer_without_completed_is_not_completed() {
        let read = |body: &str| serde_json::from_str::<Progress>(body).map(|p| (p.position_ms, p.completed));
        let at = r#""updated_at":"2026-01-01T00:00:00Z""#;
        assert_eq!(
            read(&format!(r#"{{"position_ms":5,{at}}}"#)).ok(),
            Some((5, false))
        );
        assert_eq!(
            read(&format!(r#"{{"position_ms":5,{at},"completed":true}}"#)).ok(),
            Some((5, true))
        );
    }

    #[test]
    fn resume_points_round_trip() {
        for p in [
            ResumePoint {
                position_ms: 0,
                completed: false,
            },
            ResumePoint {
                position_ms: 42,
                completed: true,
            },
        ] {
            assert_eq!(ResumePoint::decode(&p.encode()), Some(p));
        }
        let p = ResumePoint {
            position_ms: 7,
            completed: true,
        };
        assert_eq!(p.encode_at(1_700_000_000_123), "7:c@1700000000123");
        let stored = StoredPoint::decode("7:c@1700000000123");
        assert_eq!(
            stored.map(|s| (s.point, s.at_ms, s.checked_ms)),
            Some((p, Some(1_700_000_000_123), None))
        );
        let checked = stored.map(|s| s.encode_checked(1_700_000_000_999));
        assert_eq!(checked.as_deref(), Some("7:c@1700000000123/1700000000999"));
        let again = checked.as_deref().and_then(StoredPoint::decode);
        assert_eq!(
            again.map(|s| (s.at_ms, s.checked_ms)),
            Some((Some(1_700_000_000_123), Some(1_700_000_000_999)))
        );
        assert_eq!(again.map(StoredPoint::known_newest_at), Some(1_700_000_000_999));
        let unstamped = StoredPoint::decode("42");
        assert_eq!(unstamped.map(|s| s.encode_checked(9)).as_deref(), Some("42@0/9"));
        assert_eq!(ResumePoint::decode("42@5/x"), None);
        assert_eq!(ResumePoint::decode("42@/5"), None);
        assert_eq!(ResumePoint::decode("42@5").map(|p| p.position_ms), Some(42));
        assert_eq!(ResumePoint::decode("42@x"), None);
        assert_eq!(ResumePoint::decode("12:x"), None);
        assert_eq!(ResumePoint::decode("abc"), None);
    }
}

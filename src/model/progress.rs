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
        Self::decode_stamped(raw).map(|(point, _)| point)
    }

    /// The point and, when the value carries one, the time it was
    /// acknowledged; a value without a time is older than any with one.
    pub fn decode_stamped(raw: &str) -> Option<(Self, Option<i64>)> {
        let (point, at) = match raw.split_once('@') {
            Some((point, at)) => (point, Some(at.parse().ok()?)),
            None => (raw, None),
        };
        let (ms, completed) = match point.strip_suffix(":c") {
            Some(ms) => (ms, true),
            None => (point, false),
        };
        Some((
            Self {
                position_ms: ms.parse().ok()?,
                completed,
            },
            at,
        ))
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
        assert_eq!(
            ResumePoint::decode_stamped("7:c@1700000000123"),
            Some((p, Some(1_700_000_000_123)))
        );
        assert_eq!(ResumePoint::decode("42@5").map(|p| p.position_ms), Some(42));
        assert_eq!(ResumePoint::decode("42@x"), None);
        assert_eq!(ResumePoint::decode("12:x"), None);
        assert_eq!(ResumePoint::decode("abc"), None);
    }
}

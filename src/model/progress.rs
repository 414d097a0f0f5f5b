//! Resume positions on their way to the internal API.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{ContentId, PositionMs, UserId};

/// The internal API's record of a position.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Progress {
    pub position_ms: u64,
    pub updated_at: DateTime<Utc>,
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

    pub fn decode(raw: &str) -> Option<Self> {
        let (ms, completed) = match raw.strip_suffix(":c") {
            Some(ms) => (ms, true),
            None => (raw, false),
        };
        Some(Self {
            position_ms: ms.parse().ok()?,
            completed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(ResumePoint::decode("12:x"), None);
        assert_eq!(ResumePoint::decode("abc"), None);
    }
}

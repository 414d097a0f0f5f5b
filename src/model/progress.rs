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
}

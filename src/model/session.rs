use chrono::{DateTime, Utc};

use super::{ContentId, DeviceId, SessionId};

/// One live playback session, as Redis holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveSession {
    pub session_id: SessionId,
    pub device_id: DeviceId,
    pub content_id: ContentId,
    /// Last heartbeat plus the session TTL; unknown in a refusal's list.
    pub expires_at: Option<DateTime<Utc>>,
}

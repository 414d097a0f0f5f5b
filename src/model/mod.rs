//! The ground floor: shapes every other module shares and the identifier
//! types parsed once at the edge. Imports nothing else of the crate.

mod answer;
mod catalog;
mod drm;
mod ids;
mod progress;
mod session;
mod sourced;
mod timestamp;

pub use answer::{CdnCookies, Drm, LicenseRequestHeaders, Marker, PlaybackInfo, Stream, Subtitle};
pub use catalog::{ContentPlayback, DrmSource, Entitlement, StreamSource, SubtitleSource};
pub use drm::{DrmSystem, KeyId};
pub use ids::{
    ContentId, DeviceId, InvalidId, PositionMs, SESSION_MAC_LEN, SESSION_RANDOM_LEN, SessionId, SessionParts,
    UserId,
};
pub use progress::{Progress, ProgressItem, ResumePoint, StoredPoint};
pub use session::LiveSession;
pub use sourced::{Origin, Sourced};
pub use timestamp::{rfc3339, write_rfc3339};

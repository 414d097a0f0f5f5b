//! The shape Moneta answers with (playback-info, and `playback` in a session start).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The `200` answer of playback-info.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PlaybackInfo {
    pub content_id: String,
    pub title: String,
    pub duration_ms: u64,
    pub streams: Vec<Stream>,
    pub subtitles: Vec<Subtitle>,
    /// Skip-intro / next-episode points, in the internal API's order.
    pub markers: Vec<Marker>,
    pub resume_position_ms: u64,
    /// True when any part of the answer came from a fallback.
    pub degraded: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Stream {
    pub protocol: String,
    pub url: String,
    pub drm: Option<Drm>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Drm {
    pub system: String,
    pub license_url: String,
    pub key_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Subtitle {
    pub language: String,
    pub url: String,
}

/// A span of a title a player may offer to skip (`intro`, `recap`, `credits`, `preview`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Marker {
    #[serde(rename = "type")]
    pub kind: String,
    pub start_ms: u64,
    pub end_ms: u64,
}

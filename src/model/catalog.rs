//! What the internal API describes (also what Redis caches and the static
//! snapshot holds).

use serde::{Deserialize, Serialize};

use super::ContentId;
use super::answer::Marker;

/// A title as the internal API describes it (CONTRACT §5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContentPlayback {
    pub content_id: ContentId,
    pub title: String,
    pub duration_ms: u64,
    /// `null`: available everywhere.
    #[serde(default)]
    pub available_countries: Option<Vec<String>>,
    /// Empty: any plan.
    #[serde(default)]
    pub required_plans: Vec<String>,
    #[serde(default)]
    pub streams: Vec<StreamSource>,
    #[serde(default)]
    pub subtitles: Vec<SubtitleSource>,
    #[serde(default)]
    pub markers: Vec<Marker>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamSource {
    pub protocol: String,
    pub path: String,
    #[serde(default)]
    pub drm: Option<DrmSource>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrmSource {
    pub system: String,
    pub key_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubtitleSource {
    pub language: String,
    pub path: String,
}

/// What a user may watch, from the internal API (or, degraded, from the JWT).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entitlement {
    pub user_id: String,
    pub plan: String,
    pub max_streams: u32,
    pub active: bool,
}

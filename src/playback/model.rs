//! The shapes Moneta reads from its sources and the shape it answers with.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A title as the internal API describes it (also what Redis caches and the
/// static snapshot holds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ContentPlayback {
    pub content_id: String,
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
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StreamSource {
    pub protocol: String,
    pub path: String,
    #[serde(default)]
    pub drm: Option<DrmSource>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DrmSource {
    pub system: String,
    pub key_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
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

/// The `200` answer of playback-info.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PlaybackInfo {
    pub content_id: String,
    pub title: String,
    pub duration_ms: u64,
    pub streams: Vec<Stream>,
    pub subtitles: Vec<Subtitle>,
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

/// Where a piece of an answer came from; anything but `Fresh` makes the answer degraded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Redis or the internal API, within its freshness.
    Fresh,
    /// A copy kept past its freshness because the internal API failed.
    Stale,
    /// The static fallback catalog file.
    Snapshot,
    /// The caller's JWT claims instead of the entitlement service.
    Claims,
    /// Nothing could answer; a neutral default was used.
    Default,
}

impl Origin {
    pub fn is_degraded(self) -> bool {
        self != Origin::Fresh
    }
}

/// A value together with where it came from.
#[derive(Debug, Clone)]
pub struct Sourced<T> {
    pub value: T,
    pub origin: Origin,
}

impl<T> Sourced<T> {
    pub fn fresh(value: T) -> Self {
        Self {
            value,
            origin: Origin::Fresh,
        }
    }
    pub fn new(value: T, origin: Origin) -> Self {
        Self { value, origin }
    }
}

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
    /// Where to start: 0 below the resume threshold and once watched.
    pub resume_position_ms: u64,
    /// Watched to the end (or stopped as completed): the next play starts over.
    pub watched: bool,
    /// True when any part of the answer came from a fallback.
    pub degraded: bool,
    /// CloudFront signed cookies for the title's whole folder (segments, not
    /// just the manifest), when a key pair is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cdn_cookies: Option<CdnCookies>,
}

/// The three cookies CloudFront checks for a custom-policy signed request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CdnCookies {
    #[serde(rename = "CloudFront-Policy")]
    pub policy: String,
    #[serde(rename = "CloudFront-Signature")]
    pub signature: String,
    #[serde(rename = "CloudFront-Key-Pair-Id")]
    pub key_pair_id: String,
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
    /// A short-lived JWS (HS256) the licence proxy checks before asking the
    /// DRM vendor: claims `sub`, `content_id`, `key_id`, `drm_system`, `iat`,
    /// `exp`, and `session_id` in a session start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub license_token: Option<String>,
    /// What the player sends with each licence request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub license_request_headers: Option<LicenseRequestHeaders>,
    /// FairPlay only: where the player fetches the application certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_url: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LicenseRequestHeaders {
    /// `Bearer <license_token>`
    #[serde(rename = "Authorization")]
    pub authorization: String,
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

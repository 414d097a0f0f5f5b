//! Assembles the playback-info answer from an authorized title: CDN URLs and
//! cookies, licence servers and tokens, subtitles, markers and where to resume.

use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

use super::Authorized;
use super::cdn::Cdn;
use super::rules;
use crate::auth::Claims;
use crate::config::{DrmSettings, ExposeSecret, ResumeSettings};
use crate::model::{
    ContentId, Drm, DrmSource, LicenseRequestHeaders, PlaybackInfo, SessionId, Stream, Subtitle,
};

/// What a licence proxy checks before it asks the DRM vendor for a licence.
#[derive(Serialize)]
struct LicenseClaims<'a> {
    sub: &'a str,
    content_id: &'a str,
    key_id: &'a str,
    drm_system: &'a str,
    iat: u64,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    session_id: Option<&'a str>,
}

/// Licence tokens: HS256 under `MONETA_DRM_TOKEN_SECRET`.
struct LicenseTokens {
    key: EncodingKey,
    ttl: Duration,
}

impl LicenseTokens {
    fn token(&self, claims: &LicenseClaims<'_>) -> Option<String> {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.key).ok()
    }
}

pub struct Answers {
    cdn: Cdn,
    drm: DrmSettings,
    tokens: Option<LicenseTokens>,
    resume: ResumeSettings,
}

/// Who the answer is for: the caller, and the session when it is a start.
pub struct Audience<'a> {
    pub claims: &'a Claims,
    pub session_id: Option<&'a SessionId>,
}

impl Answers {
    pub fn new(cdn: Cdn, drm: DrmSettings, resume: ResumeSettings) -> Self {
        let tokens = drm.token_secret.as_ref().map(|secret| LicenseTokens {
            key: EncodingKey::from_secret(secret.expose_secret().as_bytes()),
            ttl: drm.token_ttl,
        });
        Self {
            cdn,
            drm,
            tokens,
            resume,
        }
    }

    fn drm(&self, source: &DrmSource, content_id: &ContentId, audience: &Audience<'_>) -> Drm {
        let license_token = self.tokens.as_ref().and_then(|tokens| {
            let iat = jsonwebtoken::get_current_timestamp();
            tokens.token(&LicenseClaims {
                sub: audience.claims.sub.as_str(),
                content_id: content_id.as_str(),
                key_id: &source.key_id,
                drm_system: &source.system,
                iat,
                exp: iat + tokens.ttl.as_secs(),
                session_id: audience.session_id.map(SessionId::as_str),
            })
        });
        Drm {
            system: source.system.clone(),
            license_url: self
                .drm
                .license_url(&source.system)
                .map(str::to_owned)
                .unwrap_or_else(|| format!("https://drm.example.com/{}", source.system)),
            key_id: source.key_id.clone(),
            license_request_headers: license_token.as_ref().map(|t| LicenseRequestHeaders {
                authorization: format!("Bearer {t}"),
            }),
            license_token,
            certificate_url: match source.system.as_str() {
                "fairplay" => self.drm.fairplay_certificate_url.clone(),
                _ => None,
            },
        }
    }

    pub fn playback_info(&self, authorized: &Authorized, audience: &Audience<'_>) -> PlaybackInfo {
        let c = &authorized.content.value;
        let now = std::time::SystemTime::now();
        let streams = c
            .streams
            .iter()
            .map(|s| Stream {
                protocol: s.protocol.clone(),
                url: self.cdn.stream_url(&s.path, now),
                drm: s.drm.as_ref().map(|d| self.drm(d, &c.content_id, audience)),
            })
            .collect();
        let subtitles = c
            .subtitles
            .iter()
            .map(|s| Subtitle {
                language: s.language.clone(),
                url: self.cdn.url(&s.path),
            })
            .collect();
        let (resume_position_ms, watched) =
            rules::resume(authorized.position.value, c.duration_ms, self.resume);
        PlaybackInfo {
            content_id: c.content_id.to_string(),
            title: c.title.clone(),
            duration_ms: c.duration_ms,
            streams,
            subtitles,
            markers: c.markers.clone(),
            resume_position_ms,
            watched,
            degraded: authorized.degraded(),
            cdn_cookies: self.cdn.cookies(&c.content_id, now),
        }
    }
}

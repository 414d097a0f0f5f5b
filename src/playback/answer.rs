//! Assembles the playback-info answer from an authorized title: CDN URLs and
//! cookies, licence servers and tokens, subtitles, markers and where to resume.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

use super::Authorized;
use super::cdn::Cdn;
use super::rules;
use crate::auth::Claims;
use crate::config::{DrmSettings, ExposeSecret, ResumeSettings};
use crate::model::{
    CdnCookies, ContentId, ContentPlayback, Drm, DrmSource, LicenseRequestHeaders, PlaybackInfo, SessionId,
    Stream, Subtitle,
};
use crate::sources::redis::RedisClock;

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
    /// The limit the session's start enforced: a licence request for the
    /// session after Redis lost it records it again within this limit, as
    /// a heartbeat would.
    #[serde(skip_serializing_if = "Option::is_none")]
    max_streams: Option<u32>,
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
    /// Licence tokens are dated on Redis' clock (`licenses/token.rs`).
    clock: Arc<RedisClock>,
    resume: ResumeSettings,
    /// Media parts written once per title version and URL-signing step.
    media: moka::sync::Cache<(ContentId, u64), Arc<MediaJson>, foldhash::fast::RandomState>,
}

/// Titles whose media parts are kept as JSON: more than a catalog's
/// playable titles, so a warm instance writes each once per signing step.
const MEDIA_TITLES: u64 = 20_000;

/// A title's streams, subtitles and markers, already written as JSON.
///
/// Without licence tokens they depend on the title and, with signed URLs,
/// on the signing step alone, yet writing them was most of an answer's
/// serialization: serde_json escapes strings byte by byte, ~6 k
/// instructions a warm playback-info for the URLs (`docs/profiling.md`).
pub struct MediaJson {
    /// The title version they were written from. A refreshed title is a
    /// new `Arc`; held here, its address cannot be reused while compared.
    from: Arc<ContentPlayback>,
    streams: String,
    subtitles: String,
    markers: String,
}

/// What playback-info answers: title-only parts shared between callers, or,
/// with licence tokens in the streams, everything written for this caller.
pub enum PlaybackAnswer {
    Shared {
        media: Arc<MediaJson>,
        resume_position_ms: u64,
        watched: bool,
        degraded: bool,
        cdn_cookies: Option<CdnCookies>,
    },
    PerCaller(PlaybackInfo),
}

impl PlaybackAnswer {
    pub fn content_id(&self) -> &str {
        match self {
            Self::Shared { media, .. } => media.from.content_id.as_str(),
            Self::PerCaller(info) => &info.content_id,
        }
    }

    pub fn cdn_cookies(&self) -> Option<&CdnCookies> {
        match self {
            Self::Shared { cdn_cookies, .. } => cdn_cookies.as_ref(),
            Self::PerCaller(info) => info.cdn_cookies.as_ref(),
        }
    }

    /// The answer's JSON: what `serde_json` writes for the [`PlaybackInfo`]
    /// it stands for, same keys in the same order. A shared answer is
    /// written here, its keys as literals: serde_json escapes every key of a
    /// struct byte by byte (~1 k instructions an answer).
    pub fn write_json(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        let (media, resume_position_ms, watched, degraded, cdn_cookies) = match self {
            Self::PerCaller(info) => return serde_json::to_writer(out, info),
            Self::Shared {
                media,
                resume_position_ms,
                watched,
                degraded,
                cdn_cookies,
            } => (media, resume_position_ms, watched, degraded, cdn_cookies),
        };
        let c = &media.from;
        let flag = |on: bool| if on { "true" } else { "false" };
        out.extend_from_slice(b"{\"content_id\":");
        serde_json::to_writer(&mut *out, c.content_id.as_str())?;
        out.extend_from_slice(b",\"title\":");
        serde_json::to_writer(&mut *out, &c.title)?;
        for (key, value) in [
            (
                &b",\"duration_ms\":"[..],
                itoa::Buffer::new().format(c.duration_ms),
            ),
            (b",\"streams\":", &media.streams),
            (b",\"subtitles\":", &media.subtitles),
            (b",\"markers\":", &media.markers),
            (
                b",\"resume_position_ms\":",
                itoa::Buffer::new().format(*resume_position_ms),
            ),
            (b",\"watched\":", flag(*watched)),
            (b",\"degraded\":", flag(*degraded)),
        ] {
            out.extend_from_slice(key);
            out.extend_from_slice(value.as_bytes());
        }
        if let Some(cookies) = cdn_cookies {
            out.extend_from_slice(b",\"cdn_cookies\":");
            serde_json::to_writer(&mut *out, cookies)?;
        }
        out.push(b'}');
        Ok(())
    }
}

/// Who the answer is for: the caller, and the session when it is a start.
pub struct Audience<'a> {
    pub claims: &'a Claims,
    pub session_id: Option<&'a SessionId>,
    /// The stream limit a session start enforced (with `session_id`).
    pub max_streams: Option<u32>,
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
            clock: Arc::default(),
            resume,
            // foldhash, as the verified tokens (`auth/verifier.rs`): looked
            // up on every answer, and only titles that exist are inserted.
            media: moka::sync::Cache::builder()
                .max_capacity(MEDIA_TITLES)
                .time_to_idle(Duration::from_secs(600))
                .build_with_hasher(foldhash::fast::RandomState::default()),
        }
    }

    /// Dates licence tokens on `clock` (until then, this instance's own).
    pub fn on_clock(mut self, clock: Arc<RedisClock>) -> Self {
        self.clock = clock;
        self
    }

    fn drm(&self, source: &DrmSource, content_id: &ContentId, audience: Option<&Audience<'_>>) -> Drm {
        let license_token = self.tokens.as_ref().zip(audience).and_then(|(tokens, audience)| {
            let iat = u64::try_from(self.clock.now().timestamp()).unwrap_or_default();
            tokens.token(&LicenseClaims {
                sub: audience.claims.sub.as_str(),
                content_id: content_id.as_str(),
                key_id: &source.key_id,
                drm_system: &source.system,
                iat,
                exp: iat + tokens.ttl.as_secs(),
                session_id: audience.session_id.map(SessionId::as_str),
                max_streams: audience.max_streams,
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

    fn streams(&self, c: &ContentPlayback, audience: Option<&Audience<'_>>, now: SystemTime) -> Vec<Stream> {
        c.streams
            .iter()
            .map(|s| Stream {
                protocol: s.protocol.clone(),
                url: self.cdn.stream_url(&s.path, now),
                drm: s.drm.as_ref().map(|d| self.drm(d, &c.content_id, audience)),
            })
            .collect()
    }

    fn subtitles(&self, c: &ContentPlayback) -> Vec<Subtitle> {
        c.subtitles
            .iter()
            .map(|s| Subtitle {
                language: s.language.clone(),
                url: self.cdn.url(&s.path),
            })
            .collect()
    }

    pub fn playback_info(&self, authorized: &Authorized, audience: &Audience<'_>) -> PlaybackInfo {
        let c = &authorized.content.value;
        let now = SystemTime::now();
        let (resume_position_ms, watched) =
            rules::resume(authorized.position.value, c.duration_ms, self.resume);
        PlaybackInfo {
            content_id: c.content_id.to_string(),
            title: c.title.clone(),
            duration_ms: c.duration_ms,
            streams: self.streams(c, Some(audience), now),
            subtitles: self.subtitles(c),
            markers: c.markers.clone(),
            resume_position_ms,
            watched,
            degraded: authorized.degraded(),
            cdn_cookies: self.cdn.cookies(&c.content_id, now),
        }
    }

    /// playback-info's answer: the same JSON as [`Self::playback_info`],
    /// with the title's media parts written once and shared when no
    /// licence token makes them the caller's own.
    pub fn playback_answer(&self, authorized: &Authorized, audience: &Audience<'_>) -> PlaybackAnswer {
        if self.tokens.is_some() {
            return PlaybackAnswer::PerCaller(self.playback_info(authorized, audience));
        }
        let c = &authorized.content.value;
        let now = SystemTime::now();
        let Some(media) = self.media_json(c, now) else {
            return PlaybackAnswer::PerCaller(self.playback_info(authorized, audience));
        };
        let (resume_position_ms, watched) =
            rules::resume(authorized.position.value, c.duration_ms, self.resume);
        PlaybackAnswer::Shared {
            media,
            resume_position_ms,
            watched,
            degraded: authorized.degraded(),
            cdn_cookies: self.cdn.cookies(&c.content_id, now),
        }
    }

    /// The title's media parts as JSON, written at most once per title
    /// version and signing step (`None` only if they cannot be written).
    fn media_json(&self, c: &Arc<ContentPlayback>, now: SystemTime) -> Option<Arc<MediaJson>> {
        let key = (c.content_id.clone(), self.cdn.signing_step(now));
        if let Some(known) = self.media.get(&key)
            && Arc::ptr_eq(&known.from, c)
        {
            return Some(known);
        }
        let written = Arc::new(MediaJson {
            from: Arc::clone(c),
            streams: serde_json::to_string(&self.streams(c, None, now)).ok()?,
            subtitles: serde_json::to_string(&self.subtitles(c)).ok()?,
            markers: serde_json::to_string(&c.markers).ok()?,
        });
        self.media.insert(key, Arc::clone(&written));
        Some(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Entitlement, ResumePoint, Sourced};

    fn title(manifest: &str) -> Arc<ContentPlayback> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "content_id": "m-0001",
                "title": "Quote \" and tab \t in a title",
                "duration_ms": 7_200_000,
                "streams": [
                    {"protocol": "dash", "path": manifest,
                     "drm": {"system": "widevine", "key_id": "0123abcd0123abcd0123abcd0123abcd"}},
                    {"protocol": "hls", "path": "/m-0001/hls/master.m3u8", "drm": null}
                ],
                "subtitles": [{"language": "ko", "path": "/m-0001/subs/ko.vtt"}],
                "markers": [{"type": "intro", "start_ms": 30_000, "end_ms": 105_000}]
            }))
            .unwrap(),
        )
    }

    fn authorized(content: Arc<ContentPlayback>, position_ms: u64) -> Authorized {
        Authorized {
            content: Sourced::fresh(content),
            entitlement: Sourced::fresh(Entitlement {
                user_id: "u-1".into(),
                plan: "premium".into(),
                max_streams: 4,
                active: true,
            }),
            position: Sourced::fresh(ResumePoint {
                position_ms,
                completed: false,
            }),
        }
    }

    fn answers(token_secret: Option<&str>) -> Answers {
        let drm = DrmSettings {
            license_url_widevine: "https://drm.example.com/widevine".into(),
            license_url_playready: "https://drm.example.com/playready".into(),
            license_url_fairplay: "https://drm.example.com/fairplay".into(),
            token_secret: token_secret.map(crate::config::Secret::from),
            token_ttl: Duration::from_secs(300),
            fairplay_certificate_url: None,
            proxy: None,
        };
        let resume = ResumeSettings {
            min_pct: 5,
            max_pct: 90,
        };
        Answers::new(Cdn::new("https://cdn.example.com", None), drm, resume)
    }

    fn json(answer: &PlaybackAnswer) -> Vec<u8> {
        let mut out = Vec::new();
        answer.write_json(&mut out).unwrap();
        out
    }

    fn claims() -> Claims {
        serde_json::from_value(serde_json::json!({"sub": "u-1", "exp": 4_000_000_000_i64})).unwrap()
    }

    #[test]
    fn a_shared_answer_is_the_json_of_the_whole_one() {
        let answers = answers(None);
        let claims = claims();
        let audience = Audience {
            claims: &claims,
            session_id: None,
            max_streams: None,
        };
        let content = title("/m-0001/dash/manifest.mpd");
        for position_ms in [0, 1_234_000, 7_000_000] {
            let authorized = authorized(Arc::clone(&content), position_ms);
            let shared = answers.playback_answer(&authorized, &audience);
            assert!(matches!(shared, PlaybackAnswer::Shared { .. }));
            assert_eq!(
                String::from_utf8(json(&shared)).unwrap(),
                serde_json::to_string(&answers.playback_info(&authorized, &audience)).unwrap()
            );
        }
    }

    #[test]
    fn a_refreshed_title_is_written_again() {
        let answers = answers(None);
        let claims = claims();
        let audience = Audience {
            claims: &claims,
            session_id: None,
            max_streams: None,
        };
        let old = authorized(title("/m-0001/dash/old.mpd"), 0);
        let new = authorized(title("/m-0001/dash/new.mpd"), 0);
        let url = |a: &Authorized| {
            let json: serde_json::Value =
                serde_json::from_slice(&json(&answers.playback_answer(a, &audience))).unwrap();
            json["streams"][0]["url"].as_str().unwrap().to_owned()
        };
        assert_eq!(url(&old), "https://cdn.example.com/m-0001/dash/old.mpd");
        assert_eq!(url(&new), "https://cdn.example.com/m-0001/dash/new.mpd");
        assert_eq!(url(&old), "https://cdn.example.com/m-0001/dash/old.mpd");
    }

    #[test]
    fn licence_tokens_make_the_answer_the_callers_own() {
        let answers = answers(Some("test-only-drm-token-secret"));
        let claims = claims();
        let audience = Audience {
            claims: &claims,
            session_id: None,
            max_streams: None,
        };
        let authorized = authorized(title("/m-0001/dash/manifest.mpd"), 0);
        let answer = answers.playback_answer(&authorized, &audience);
        assert!(matches!(answer, PlaybackAnswer::PerCaller(_)));
        let json: serde_json::Value = serde_json::from_slice(&json(&answer)).unwrap();
        assert!(json["streams"][0]["drm"]["license_token"].is_string(), "{json}");
    }
}

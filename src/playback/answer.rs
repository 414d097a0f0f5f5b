//! Assembles the playback-info answer from an authorized title: CDN URLs,
//! licence servers, subtitles, markers and the resume position.

use super::Authorized;
use super::cdn::Cdn;
use crate::config::DrmSettings;
use crate::model::{Drm, PlaybackInfo, Stream, Subtitle};

pub struct Answers {
    cdn: Cdn,
    drm: DrmSettings,
}

impl Answers {
    pub fn new(cdn: Cdn, drm: DrmSettings) -> Self {
        Self { cdn, drm }
    }

    pub fn playback_info(&self, authorized: &Authorized) -> PlaybackInfo {
        let c = &authorized.content.value;
        let streams = c
            .streams
            .iter()
            .map(|s| Stream {
                protocol: s.protocol.clone(),
                url: self.cdn.stream_url(&s.path),
                drm: s.drm.as_ref().map(|d| Drm {
                    system: d.system.clone(),
                    license_url: self
                        .drm
                        .license_url(&d.system)
                        .map(str::to_owned)
                        .unwrap_or_else(|| format!("https://drm.example.com/{}", d.system)),
                    key_id: d.key_id.clone(),
                }),
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
        PlaybackInfo {
            content_id: c.content_id.to_string(),
            title: c.title.clone(),
            duration_ms: c.duration_ms,
            streams,
            subtitles,
            markers: c.markers.clone(),
            resume_position_ms: authorized.position.value,
            degraded: authorized.degraded(),
        }
    }
}

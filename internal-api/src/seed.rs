//! The demo catalog and users that the README walkthrough relies on.
//!
//! Every write is an upsert that only touches a row whose values differ, so
//! seeding twice changes nothing, and re-seeding restores demo rows that were
//! edited by hand.

use sqlx::{PgConnection, PgPool};

pub struct DemoUser {
    pub user_id: &'static str,
    pub plan: &'static str,
    pub max_streams: i32,
    pub active: bool,
}

pub struct DemoContent {
    pub id: &'static str,
    pub title: &'static str,
    pub duration_ms: i64,
    pub available_countries: Option<&'static [&'static str]>,
    pub required_plans: &'static [&'static str],
    pub streams: &'static [DemoStream],
    pub subtitles: &'static [&'static str],
}

pub struct DemoStream {
    pub protocol: &'static str,
    pub drm: Option<(&'static str, &'static str)>,
}

const fn dash(drm: Option<(&'static str, &'static str)>) -> DemoStream {
    DemoStream {
        protocol: "dash",
        drm,
    }
}

const fn hls(drm: Option<(&'static str, &'static str)>) -> DemoStream {
    DemoStream { protocol: "hls", drm }
}

pub const USERS: &[DemoUser] = &[
    DemoUser {
        user_id: "demo-basic",
        plan: "basic",
        max_streams: 1,
        active: true,
    },
    DemoUser {
        user_id: "demo-standard",
        plan: "standard",
        max_streams: 2,
        active: true,
    },
    DemoUser {
        user_id: "demo-premium",
        plan: "premium",
        max_streams: 4,
        active: true,
    },
    DemoUser {
        user_id: "demo-inactive",
        plan: "standard",
        max_streams: 2,
        active: false,
    },
];

pub const CATALOG: &[DemoContent] = &[
    DemoContent {
        id: "m-0001",
        title: "Parasite",
        duration_ms: 7_920_000,
        available_countries: None,
        required_plans: &[],
        streams: &[
            dash(Some(("widevine", "0123abcd0123abcd0123abcd0123abcd"))),
            hls(None),
        ],
        subtitles: &["ko", "en"],
    },
    DemoContent {
        id: "m-0002",
        title: "Oldboy",
        duration_ms: 7_200_000,
        available_countries: None,
        required_plans: &["premium"],
        streams: &[
            dash(Some(("widevine", "9f8e7d6c5b4a39281706f5e4d3c2b1a0"))),
            hls(Some(("fairplay", "9f8e7d6c5b4a39281706f5e4d3c2b1a0"))),
        ],
        subtitles: &["ko", "en"],
    },
    DemoContent {
        id: "m-0003",
        title: "The Host",
        duration_ms: 7_140_000,
        available_countries: Some(&["KR"]),
        required_plans: &[],
        streams: &[dash(None), hls(None)],
        subtitles: &["ko"],
    },
    DemoContent {
        id: "m-0004",
        title: "Burning",
        duration_ms: 8_880_000,
        available_countries: None,
        required_plans: &["standard", "premium"],
        streams: &[
            dash(Some(("playready", "a1b2c3d4e5f60718293a4b5c6d7e8f90"))),
            hls(Some(("fairplay", "a1b2c3d4e5f60718293a4b5c6d7e8f90"))),
        ],
        subtitles: &["ko", "en", "ja"],
    },
    DemoContent {
        id: "m-0005",
        title: "Train to Busan",
        duration_ms: 7_080_000,
        available_countries: Some(&["KR", "JP", "US"]),
        required_plans: &[],
        streams: &[dash(Some(("widevine", "5b1f0c9e8d7a6b5c4d3e2f1a0b9c8d7e")))],
        subtitles: &["ko", "en"],
    },
    DemoContent {
        id: "m-0006",
        title: "Memories of Murder",
        duration_ms: 7_860_000,
        available_countries: None,
        required_plans: &[],
        streams: &[dash(None), hls(None)],
        subtitles: &["ko", "en", "fr"],
    },
    DemoContent {
        id: "m-0007",
        title: "The Handmaiden",
        duration_ms: 8_700_000,
        available_countries: Some(&["KR", "JP"]),
        required_plans: &["premium"],
        streams: &[
            dash(Some(("playready", "c0ffee00c0ffee00c0ffee00c0ffee00"))),
            hls(Some(("fairplay", "c0ffee00c0ffee00c0ffee00c0ffee00"))),
        ],
        subtitles: &["ko", "ja"],
    },
    DemoContent {
        id: "m-0008",
        title: "Minari",
        duration_ms: 6_900_000,
        available_countries: Some(&["US", "CA", "GB"]),
        required_plans: &[],
        streams: &[hls(None)],
        subtitles: &["en", "ko"],
    },
    DemoContent {
        id: "m-0009",
        title: "Decision to Leave",
        duration_ms: 8_280_000,
        available_countries: None,
        required_plans: &["standard", "premium"],
        // One CENC manifest serves both Widevine and PlayReady clients.
        streams: &[
            dash(Some(("widevine", "deadbeefdeadbeefdeadbeefdeadbeef"))),
            dash(Some(("playready", "deadbeefdeadbeefdeadbeefdeadbeef"))),
            hls(Some(("fairplay", "deadbeefdeadbeefdeadbeefdeadbeef"))),
        ],
        subtitles: &["ko", "en", "es"],
    },
    DemoContent {
        id: "m-0010",
        title: "Broker",
        duration_ms: 7_740_000,
        available_countries: None,
        required_plans: &["basic", "standard", "premium"],
        streams: &[dash(Some(("widevine", "b40ce4b40ce4b40ce4b40ce4b40ce400")))],
        subtitles: &["ko", "en", "ja"],
    },
    DemoContent {
        id: "m-0011",
        title: "Moneta Sample Trailer",
        duration_ms: 90_000,
        available_countries: None,
        required_plans: &[],
        streams: &[hls(None)],
        subtitles: &[],
    },
    DemoContent {
        id: "m-0012",
        title: "Space Sweepers",
        duration_ms: 8_160_000,
        available_countries: Some(&["KR"]),
        required_plans: &["premium"],
        streams: &[
            dash(Some(("widevine", "5ace5ace5ace5ace5ace5ace5ace5ace"))),
            hls(Some(("fairplay", "5ace5ace5ace5ace5ace5ace5ace5ace"))),
        ],
        subtitles: &["ko", "en"],
    },
];

pub fn stream_path(content_id: &str, protocol: &str) -> String {
    match protocol {
        "hls" => format!("/{content_id}/hls/master.m3u8"),
        _ => format!("/{content_id}/dash/manifest.mpd"),
    }
}

pub fn subtitle_path(content_id: &str, language: &str) -> String {
    format!("/{content_id}/subs/{language}.vtt")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeedReport {
    pub contents: usize,
    pub users: usize,
    /// Rows inserted, updated or deleted; 0 when the demo data was already
    /// in place.
    pub rows_changed: u64,
}

/// Writes the demo data in one transaction, so a reader never sees a
/// half-seeded title.
pub async fn apply(pool: &PgPool) -> Result<SeedReport, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let mut changed = 0;
    for content in CATALOG {
        changed += seed_content(&mut tx, content).await?;
    }
    for user in USERS {
        changed += sqlx::query(
            "INSERT INTO entitlements (user_id, plan, max_streams, active)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (user_id) DO UPDATE
             SET plan = EXCLUDED.plan, max_streams = EXCLUDED.max_streams,
                 active = EXCLUDED.active
             WHERE (entitlements.plan, entitlements.max_streams, entitlements.active)
                 IS DISTINCT FROM (EXCLUDED.plan, EXCLUDED.max_streams, EXCLUDED.active)",
        )
        .bind(user.user_id)
        .bind(user.plan)
        .bind(user.max_streams)
        .bind(user.active)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    }
    tx.commit().await?;
    Ok(SeedReport {
        contents: CATALOG.len(),
        users: USERS.len(),
        rows_changed: changed,
    })
}

async fn seed_content(conn: &mut PgConnection, content: &DemoContent) -> Result<u64, sqlx::Error> {
    let mut changed = sqlx::query(
        "INSERT INTO contents (id, title, duration_ms, available_countries, required_plans)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (id) DO UPDATE
         SET title = EXCLUDED.title, duration_ms = EXCLUDED.duration_ms,
             available_countries = EXCLUDED.available_countries,
             required_plans = EXCLUDED.required_plans
         WHERE (contents.title, contents.duration_ms, contents.available_countries,
                contents.required_plans)
             IS DISTINCT FROM (EXCLUDED.title, EXCLUDED.duration_ms,
                EXCLUDED.available_countries, EXCLUDED.required_plans)",
    )
    .bind(content.id)
    .bind(content.title)
    .bind(content.duration_ms)
    .bind(content.available_countries)
    .bind(content.required_plans)
    .execute(&mut *conn)
    .await?
    .rows_affected();

    let stream_count = i32::try_from(content.streams.len()).unwrap_or(i32::MAX);
    changed += sqlx::query("DELETE FROM streams WHERE content_id = $1 AND ordinal >= $2")
        .bind(content.id)
        .bind(stream_count)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    for (ordinal, stream) in (0_i32..).zip(content.streams) {
        let (drm_system, drm_key_id) = match stream.drm {
            Some((system, key_id)) => (Some(system), Some(key_id)),
            None => (None, None),
        };
        changed += sqlx::query(
            "INSERT INTO streams (content_id, ordinal, protocol, path, drm_system, drm_key_id)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (content_id, ordinal) DO UPDATE
             SET protocol = EXCLUDED.protocol, path = EXCLUDED.path,
                 drm_system = EXCLUDED.drm_system, drm_key_id = EXCLUDED.drm_key_id
             WHERE (streams.protocol, streams.path, streams.drm_system, streams.drm_key_id)
                 IS DISTINCT FROM (EXCLUDED.protocol, EXCLUDED.path, EXCLUDED.drm_system,
                    EXCLUDED.drm_key_id)",
        )
        .bind(content.id)
        .bind(ordinal)
        .bind(stream.protocol)
        .bind(stream_path(content.id, stream.protocol))
        .bind(drm_system)
        .bind(drm_key_id)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    }

    changed += sqlx::query("DELETE FROM subtitles WHERE content_id = $1 AND NOT (language = ANY($2))")
        .bind(content.id)
        .bind(content.subtitles)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    for (ordinal, language) in (0_i32..).zip(content.subtitles) {
        changed += sqlx::query(
            "INSERT INTO subtitles (content_id, language, path, ordinal)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (content_id, language) DO UPDATE
             SET path = EXCLUDED.path, ordinal = EXCLUDED.ordinal
             WHERE (subtitles.path, subtitles.ordinal)
                 IS DISTINCT FROM (EXCLUDED.path, EXCLUDED.ordinal)",
        )
        .bind(content.id)
        .bind(*language)
        .bind(subtitle_path(content.id, language))
        .bind(ordinal)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::valid_content_id;

    #[test]
    fn demo_catalog_is_well_formed() {
        assert!(CATALOG.len() >= 10);
        let mut ids: Vec<_> = CATALOG.iter().map(|c| c.id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), CATALOG.len(), "duplicate content id");
        for c in CATALOG {
            assert!(valid_content_id(c.id), "{}", c.id);
            assert!(!c.streams.is_empty(), "{} has no stream", c.id);
        }
        let parasite = &CATALOG[0];
        assert_eq!((parasite.id, parasite.title), ("m-0001", "Parasite"));
    }
}

//! The demo catalog and users that the README walkthrough relies on.
//!
//! Every write is an upsert that only touches a row whose values differ, so
//! seeding twice changes nothing, and re-seeding restores demo rows that were
//! edited by hand.

use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use sqlx::{PgConnection, PgPool, Postgres};

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
    pub subtitles: &'static [&'static str],
    /// Shared by all the title's protected streams, as one CENC key serves
    /// every DRM system.
    pub key_id: Option<&'static str>,
    pub streams: &'static [DemoStream],
    pub markers: &'static [DemoMarker],
}

pub struct DemoStream {
    pub protocol: &'static str,
    pub drm_system: Option<&'static str>,
}

pub struct DemoMarker {
    pub kind: &'static str,
    pub start_ms: i64,
    pub end_ms: i64,
}

const DASH: DemoStream = DemoStream::new("dash", None);
const HLS: DemoStream = DemoStream::new("hls", None);
const DASH_WIDEVINE: DemoStream = DemoStream::new("dash", Some("widevine"));
const DASH_PLAYREADY: DemoStream = DemoStream::new("dash", Some("playready"));
const HLS_FAIRPLAY: DemoStream = DemoStream::new("hls", Some("fairplay"));
const EVERYWHERE: Option<&[&str]> = None;
const ANY_PLAN: &[&str] = &[];

impl DemoStream {
    const fn new(protocol: &'static str, drm_system: Option<&'static str>) -> Self {
        Self { protocol, drm_system }
    }
}

/// A title without streams yet; `DemoContent::streams` adds them.
const fn title(
    id: &'static str,
    title: &'static str,
    duration_ms: i64,
    available_countries: Option<&'static [&'static str]>,
    required_plans: &'static [&'static str],
    subtitles: &'static [&'static str],
) -> DemoContent {
    DemoContent {
        id,
        title,
        duration_ms,
        available_countries,
        required_plans,
        subtitles,
        key_id: None,
        streams: &[],
        markers: &[],
    }
}

impl DemoContent {
    const fn streams(self, key_id: Option<&'static str>, streams: &'static [DemoStream]) -> Self {
        Self {
            key_id,
            streams,
            ..self
        }
    }

    const fn markers(self, markers: &'static [DemoMarker]) -> Self {
        Self { markers, ..self }
    }
}

const fn marker(kind: &'static str, start_ms: i64, end_ms: i64) -> DemoMarker {
    DemoMarker {
        kind,
        start_ms,
        end_ms,
    }
}

const fn user(user_id: &'static str, plan: &'static str, max_streams: i32, active: bool) -> DemoUser {
    DemoUser {
        user_id,
        plan,
        max_streams,
        active,
    }
}

pub const USERS: &[DemoUser] = &[
    user("demo-basic", "basic", 1, true),
    user("demo-standard", "standard", 2, true),
    user("demo-premium", "premium", 4, true),
    user("demo-inactive", "standard", 2, false),
];

/// One title to a row, laid out by hand because rustfmt would give every
/// argument a line of its own and bury the table.
#[rustfmt::skip]
pub const CATALOG: &[DemoContent] = &[
    title("m-0001", "Parasite", 7_920_000, EVERYWHERE, ANY_PLAN, &["ko", "en"])
        .streams(Some("0123abcd0123abcd0123abcd0123abcd"), &[DASH_WIDEVINE, HLS])
        .markers(&[marker("intro", 30_000, 105_000), marker("credits", 7_680_000, 7_920_000)]),
    title("m-0002", "Oldboy", 7_200_000, EVERYWHERE, &["premium"], &["ko", "en"])
        .streams(Some("9f8e7d6c5b4a39281706f5e4d3c2b1a0"), &[DASH_WIDEVINE, HLS_FAIRPLAY]),
    title("m-0003", "The Host", 7_140_000, Some(&["KR"]), ANY_PLAN, &["ko"])
        .streams(None, &[DASH, HLS]),
    title("m-0004", "Burning", 8_880_000, EVERYWHERE, &["standard", "premium"], &["ko", "en", "ja"])
        .streams(Some("a1b2c3d4e5f60718293a4b5c6d7e8f90"), &[DASH_PLAYREADY, HLS_FAIRPLAY]),
    title("m-0005", "Train to Busan", 7_080_000, Some(&["KR", "JP", "US"]), ANY_PLAN, &["ko", "en"])
        .streams(Some("5b1f0c9e8d7a6b5c4d3e2f1a0b9c8d7e"), &[DASH_WIDEVINE]),
    title("m-0006", "Memories of Murder", 7_860_000, EVERYWHERE, ANY_PLAN, &["ko", "en", "fr"])
        .streams(None, &[DASH, HLS]),
    title("m-0007", "The Handmaiden", 8_700_000, Some(&["KR", "JP"]), &["premium"], &["ko", "ja"])
        .streams(Some("c0ffee00c0ffee00c0ffee00c0ffee00"), &[DASH_PLAYREADY, HLS_FAIRPLAY]),
    title("m-0008", "Minari", 6_900_000, Some(&["US", "CA", "GB"]), ANY_PLAN, &["en", "ko"])
        .streams(None, &[HLS]),
    // One CENC manifest serves both Widevine and PlayReady clients.
    title("m-0009", "Decision to Leave", 8_280_000, EVERYWHERE, &["standard", "premium"], &["ko", "en", "es"])
        .streams(Some("deadbeefdeadbeefdeadbeefdeadbeef"), &[DASH_WIDEVINE, DASH_PLAYREADY, HLS_FAIRPLAY]),
    title("m-0010", "Broker", 7_740_000, EVERYWHERE, &["basic", "standard", "premium"], &["ko", "en", "ja"])
        .streams(Some("b40ce4b40ce4b40ce4b40ce4b40ce400"), &[DASH_WIDEVINE]),
    title("m-0011", "Moneta Sample Trailer", 90_000, EVERYWHERE, ANY_PLAN, &[])
        .streams(None, &[HLS]),
    title("m-0012", "Space Sweepers", 8_160_000, Some(&["KR"]), &["premium"], &["ko", "en"])
        .streams(Some("5ace5ace5ace5ace5ace5ace5ace5ace"), &[DASH_WIDEVINE, HLS_FAIRPLAY]),
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
        let write = sqlx::query(
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
        .bind(user.active);
        changed += rows_changed(&mut tx, write).await?;
    }
    tx.commit().await?;
    Ok(SeedReport {
        contents: CATALOG.len(),
        users: USERS.len(),
        rows_changed: changed,
    })
}

async fn seed_content(conn: &mut PgConnection, content: &DemoContent) -> Result<u64, sqlx::Error> {
    let write = sqlx::query(
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
    .bind(content.required_plans);
    let mut changed = rows_changed(&mut *conn, write).await?;

    let stream_count = i32::try_from(content.streams.len()).unwrap_or(i32::MAX);
    let write = sqlx::query("DELETE FROM streams WHERE content_id = $1 AND ordinal >= $2")
        .bind(content.id)
        .bind(stream_count);
    changed += rows_changed(&mut *conn, write).await?;
    for (ordinal, stream) in (0_i32..).zip(content.streams) {
        let drm_key_id = stream.drm_system.and(content.key_id);
        let write = sqlx::query(
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
        .bind(stream.drm_system)
        .bind(drm_key_id);
        changed += rows_changed(&mut *conn, write).await?;
    }

    let write = sqlx::query("DELETE FROM subtitles WHERE content_id = $1 AND NOT (language = ANY($2))")
        .bind(content.id)
        .bind(content.subtitles);
    changed += rows_changed(&mut *conn, write).await?;
    for (ordinal, language) in (0_i32..).zip(content.subtitles) {
        let write = sqlx::query(
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
        .bind(ordinal);
        changed += rows_changed(&mut *conn, write).await?;
    }
    Ok(changed + seed_markers(conn, content).await?)
}

/// Two set-wise statements rather than one per marker: a marker has no
/// ordinal to upsert by, so those not in the demo set are found by their key
/// `(start_ms, type)`, the same key the upsert conflicts on.
async fn seed_markers(conn: &mut PgConnection, content: &DemoContent) -> Result<u64, sqlx::Error> {
    let kinds: Vec<&str> = content.markers.iter().map(|m| m.kind).collect();
    let starts: Vec<i64> = content.markers.iter().map(|m| m.start_ms).collect();
    let ends: Vec<i64> = content.markers.iter().map(|m| m.end_ms).collect();
    let write = sqlx::query(
        "DELETE FROM markers WHERE content_id = $1
         AND (start_ms, type) NOT IN (SELECT * FROM UNNEST($2::int8[], $3::text[]))",
    )
    .bind(content.id)
    .bind(&starts)
    .bind(&kinds);
    let mut changed = rows_changed(&mut *conn, write).await?;
    let write = sqlx::query(
        "INSERT INTO markers (content_id, type, start_ms, end_ms)
         SELECT $1, * FROM UNNEST($2::text[], $3::int8[], $4::int8[])
         ON CONFLICT (content_id, start_ms, type) DO UPDATE
         SET end_ms = EXCLUDED.end_ms
         WHERE markers.end_ms IS DISTINCT FROM EXCLUDED.end_ms",
    )
    .bind(content.id)
    .bind(&kinds)
    .bind(&starts)
    .bind(&ends);
    changed += rows_changed(&mut *conn, write).await?;
    Ok(changed)
}

/// Runs one upsert or delete, which touches only rows that differ, so the
/// count is what re-seeding had to repair.
async fn rows_changed(
    conn: &mut PgConnection,
    write: Query<'_, Postgres, PgArguments>,
) -> Result<u64, sqlx::Error> {
    Ok(write.execute(conn).await?.rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ContentId;

    #[test]
    fn demo_catalog_is_well_formed() {
        assert!(CATALOG.len() >= 10);
        let mut ids: Vec<_> = CATALOG.iter().map(|c| c.id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), CATALOG.len(), "duplicate content id");
        for c in CATALOG {
            assert!(ContentId::parse(c.id.to_owned()).is_ok(), "{}", c.id);
            assert!(!c.streams.is_empty(), "{} has no stream", c.id);
            // The schema refuses a DRM system without its key id.
            let protected = c.streams.iter().any(|s| s.drm_system.is_some());
            assert_eq!(protected, c.key_id.is_some(), "{} key id", c.id);
            for m in c.markers {
                assert!(
                    ["intro", "recap", "credits", "preview"].contains(&m.kind),
                    "{} marker type {}",
                    c.id,
                    m.kind
                );
                assert!(
                    0 <= m.start_ms && m.start_ms < m.end_ms && m.end_ms <= c.duration_ms,
                    "{} {} marker outside the title",
                    c.id,
                    m.kind
                );
            }
        }
        let parasite = &CATALOG[0];
        assert_eq!((parasite.id, parasite.title), ("m-0001", "Parasite"));
    }
}

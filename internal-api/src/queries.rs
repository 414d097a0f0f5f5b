//! SQL for the API and the snapshot export. Queries are checked at run time
//! (no `query!` macros) so the crate builds without a database at hand.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};

use crate::domain::{ContentPlayback, Drm, Entitlement, Progress, ProgressItem, Stream, Subtitle};

#[derive(sqlx::FromRow)]
struct ContentRow {
    id: String,
    title: String,
    duration_ms: i64,
    available_countries: Option<Vec<String>>,
    required_plans: Vec<String>,
}

#[derive(sqlx::FromRow)]
struct StreamRow {
    content_id: String,
    protocol: String,
    path: String,
    drm_system: Option<String>,
    drm_key_id: Option<String>,
}

#[derive(sqlx::FromRow)]
struct SubtitleRow {
    content_id: String,
    language: String,
    path: String,
}

impl From<StreamRow> for Stream {
    fn from(row: StreamRow) -> Self {
        let drm = match (row.drm_system, row.drm_key_id) {
            (Some(system), Some(key_id)) => Some(Drm { system, key_id }),
            // The schema forbids one without the other.
            _ => None,
        };
        Stream {
            protocol: row.protocol,
            path: row.path,
            drm,
        }
    }
}

impl From<SubtitleRow> for Subtitle {
    fn from(row: SubtitleRow) -> Self {
        Subtitle {
            language: row.language,
            path: row.path,
        }
    }
}

fn assemble(row: ContentRow, streams: Vec<Stream>, subtitles: Vec<Subtitle>) -> ContentPlayback {
    ContentPlayback {
        content_id: row.id,
        title: row.title,
        duration_ms: row.duration_ms,
        available_countries: row.available_countries,
        required_plans: row.required_plans,
        streams,
        subtitles,
    }
}

const READ_SNAPSHOT: &str = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY";
const CONTENT_COLUMNS: &str = "id, title, duration_ms, available_countries, required_plans";
const STREAM_COLUMNS: &str = "content_id, protocol, path, drm_system, drm_key_id";
const SUBTITLE_COLUMNS: &str = "content_id, language, path";

pub async fn content_playback(
    pool: &PgPool,
    content_id: &str,
) -> Result<Option<ContentPlayback>, sqlx::Error> {
    // One read-only transaction so the title and its streams are a consistent
    // picture even while the catalog is being re-seeded.
    let mut tx = pool.begin_with(READ_SNAPSHOT).await?;
    let Some(row) =
        sqlx::query_as::<_, ContentRow>(&format!("SELECT {CONTENT_COLUMNS} FROM contents WHERE id = $1"))
            .bind(content_id)
            .fetch_optional(&mut *tx)
            .await?
    else {
        tx.commit().await?;
        return Ok(None);
    };
    let streams = sqlx::query_as::<_, StreamRow>(&format!(
        "SELECT {STREAM_COLUMNS} FROM streams WHERE content_id = $1 ORDER BY ordinal"
    ))
    .bind(content_id)
    .fetch_all(&mut *tx)
    .await?;
    let subtitles = sqlx::query_as::<_, SubtitleRow>(&format!(
        "SELECT {SUBTITLE_COLUMNS} FROM subtitles WHERE content_id = $1 \
         ORDER BY ordinal, language"
    ))
    .bind(content_id)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(assemble(
        row,
        streams.into_iter().map(Stream::from).collect(),
        subtitles.into_iter().map(Subtitle::from).collect(),
    )))
}

/// The whole catalog sorted by id, read from one snapshot of the database.
pub async fn all_content_playback(pool: &PgPool) -> Result<Vec<ContentPlayback>, sqlx::Error> {
    let mut tx = pool.begin_with(READ_SNAPSHOT).await?;
    let contents = read_all(&mut tx).await?;
    tx.commit().await?;
    Ok(contents)
}

async fn read_all(conn: &mut PgConnection) -> Result<Vec<ContentPlayback>, sqlx::Error> {
    let rows =
        sqlx::query_as::<_, ContentRow>(&format!("SELECT {CONTENT_COLUMNS} FROM contents ORDER BY id"))
            .fetch_all(&mut *conn)
            .await?;
    let mut streams: HashMap<String, Vec<Stream>> = HashMap::new();
    for row in sqlx::query_as::<_, StreamRow>(&format!(
        "SELECT {STREAM_COLUMNS} FROM streams ORDER BY content_id, ordinal"
    ))
    .fetch_all(&mut *conn)
    .await?
    {
        streams
            .entry(row.content_id.clone())
            .or_default()
            .push(row.into());
    }
    let mut subtitles: HashMap<String, Vec<Subtitle>> = HashMap::new();
    for row in sqlx::query_as::<_, SubtitleRow>(&format!(
        "SELECT {SUBTITLE_COLUMNS} FROM subtitles ORDER BY content_id, ordinal, language"
    ))
    .fetch_all(&mut *conn)
    .await?
    {
        subtitles
            .entry(row.content_id.clone())
            .or_default()
            .push(row.into());
    }
    Ok(rows
        .into_iter()
        .map(|row| {
            let s = streams.remove(&row.id).unwrap_or_default();
            let t = subtitles.remove(&row.id).unwrap_or_default();
            assemble(row, s, t)
        })
        .collect())
}

pub async fn entitlement(pool: &PgPool, user_id: &str) -> Result<Option<Entitlement>, sqlx::Error> {
    sqlx::query_as::<_, Entitlement>(
        "SELECT user_id, plan, max_streams, active FROM entitlements WHERE user_id = $1",
    )
    .bind(user_id)
    .fetch_optional(pool)
    .await
}

pub async fn progress(
    pool: &PgPool,
    user_id: &str,
    content_id: &str,
) -> Result<Option<Progress>, sqlx::Error> {
    sqlx::query_as::<_, Progress>(
        "SELECT position_ms, updated_at FROM watch_progress \
         WHERE user_id = $1 AND content_id = $2",
    )
    .bind(user_id)
    .bind(content_id)
    .fetch_optional(pool)
    .await
}

/// Stores a batch of positions in one statement, so a batch is applied
/// wholly or not at all.
///
/// The newest write wins, ordered by `(updated_at, position_ms)`: comparing
/// the position too makes equal timestamps resolve the same way whatever
/// order the writes arrive in, which keeps retries and concurrent batches
/// idempotent. `DISTINCT ON` keeps one item per key, because `ON CONFLICT`
/// cannot touch the same row twice in one statement. Rows are inserted in key
/// order, so concurrent batches lock rows in the same order and cannot
/// deadlock.
pub async fn upsert_progress(pool: &PgPool, items: &[ProgressItem]) -> Result<u64, sqlx::Error> {
    if items.is_empty() {
        return Ok(0);
    }
    let mut user_ids = Vec::with_capacity(items.len());
    let mut content_ids = Vec::with_capacity(items.len());
    let mut positions = Vec::with_capacity(items.len());
    let mut stamps: Vec<DateTime<Utc>> = Vec::with_capacity(items.len());
    for item in items {
        user_ids.push(item.user_id.as_str());
        content_ids.push(item.content_id.as_str());
        positions.push(item.position_ms);
        stamps.push(item.updated_at);
    }
    let result = sqlx::query(
        "INSERT INTO watch_progress (user_id, content_id, position_ms, updated_at)
         SELECT DISTINCT ON (user_id, content_id) user_id, content_id, position_ms, updated_at
         FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::timestamptz[])
              AS batch (user_id, content_id, position_ms, updated_at)
         ORDER BY user_id, content_id, updated_at DESC, position_ms DESC
         ON CONFLICT (user_id, content_id) DO UPDATE
         SET position_ms = EXCLUDED.position_ms, updated_at = EXCLUDED.updated_at
         WHERE (watch_progress.updated_at, watch_progress.position_ms)
             < (EXCLUDED.updated_at, EXCLUDED.position_ms)",
    )
    .bind(&user_ids)
    .bind(&content_ids)
    .bind(&positions)
    .bind(&stamps)
    .execute(pool)
    .await?;
    Ok(result.rows_affected())
}

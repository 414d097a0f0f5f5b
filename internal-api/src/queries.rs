//! SQL for the API and the snapshot export. Queries are checked at run time
//! (no `query!` macros) so the crate builds without a database at hand.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool};

use crate::domain::{
    ContentId, ContentPlayback, Drm, Entitlement, Marker, Progress, ProgressItem, Stream, Subtitle, UserId,
};

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

#[derive(sqlx::FromRow)]
struct MarkerRow {
    content_id: String,
    #[sqlx(flatten)]
    marker: Marker,
}

impl StreamRow {
    fn split(self) -> (String, Stream) {
        let drm = match (self.drm_system, self.drm_key_id) {
            (Some(system), Some(key_id)) => Some(Drm { system, key_id }),
            // The schema forbids one without the other.
            _ => None,
        };
        let stream = Stream {
            protocol: self.protocol,
            path: self.path,
            drm,
        };
        (self.content_id, stream)
    }
}

impl SubtitleRow {
    fn split(self) -> (String, Subtitle) {
        let subtitle = Subtitle {
            language: self.language,
            path: self.path,
        };
        (self.content_id, subtitle)
    }
}

impl MarkerRow {
    fn split(self) -> (String, Marker) {
        (self.content_id, self.marker)
    }
}

/// One read-only snapshot, so a title and its streams are a consistent
/// picture even while the catalog is being re-seeded.
const READ_SNAPSHOT: &str = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY";

pub async fn content_playback(
    pool: &PgPool,
    content_id: &ContentId,
) -> Result<Option<ContentPlayback>, sqlx::Error> {
    let mut tx = pool.begin_with(READ_SNAPSHOT).await?;
    let mut found = read_contents(&mut tx, Some(content_id)).await?;
    tx.commit().await?;
    // The id is the primary key: at most one title.
    Ok(found.pop())
}

/// The whole catalog sorted by id.
pub async fn all_content_playback(pool: &PgPool) -> Result<Vec<ContentPlayback>, sqlx::Error> {
    let mut tx = pool.begin_with(READ_SNAPSHOT).await?;
    let contents = read_contents(&mut tx, None).await?;
    tx.commit().await?;
    Ok(contents)
}

const CONTENT_COLUMNS: &str = "id, title, duration_ms, available_countries, required_plans";
const STREAM_COLUMNS: &str = "content_id, protocol, path, drm_system, drm_key_id";
const SUBTITLE_COLUMNS: &str = "content_id, language, path";
const MARKER_COLUMNS: &str = "content_id, type, start_ms, end_ms";

/// Titles sorted by id, all of them or `only` one: four queries whatever
/// the number of titles.
async fn read_contents(
    conn: &mut PgConnection,
    only: Option<&ContentId>,
) -> Result<Vec<ContentPlayback>, sqlx::Error> {
    // Two spellings rather than `$1 IS NULL OR id = $1`, which a cached
    // generic plan may answer with a full scan.
    let (by_id, by_content_id) = match only {
        Some(_) => ("WHERE id = $1", "WHERE content_id = $1"),
        None => ("", ""),
    };
    let sql = format!("SELECT {CONTENT_COLUMNS} FROM contents {by_id} ORDER BY id");
    let rows: Vec<ContentRow> = fetch_all(conn, &sql, only).await?;
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let sql = format!("SELECT {STREAM_COLUMNS} FROM streams {by_content_id} ORDER BY content_id, ordinal");
    let mut streams = by_content(fetch_all(conn, &sql, only).await?, StreamRow::split);
    let sql = format!(
        "SELECT {SUBTITLE_COLUMNS} FROM subtitles {by_content_id} ORDER BY content_id, ordinal, language"
    );
    let mut subtitles = by_content(fetch_all(conn, &sql, only).await?, SubtitleRow::split);
    // The contract's order; the primary key makes it total.
    let sql =
        format!("SELECT {MARKER_COLUMNS} FROM markers {by_content_id} ORDER BY content_id, start_ms, type");
    let mut markers = by_content(fetch_all(conn, &sql, only).await?, MarkerRow::split);
    Ok(rows
        .into_iter()
        .map(|row| ContentPlayback {
            streams: streams.remove(&row.id).unwrap_or_default(),
            subtitles: subtitles.remove(&row.id).unwrap_or_default(),
            markers: markers.remove(&row.id).unwrap_or_default(),
            content_id: row.id,
            title: row.title,
            duration_ms: row.duration_ms,
            available_countries: row.available_countries,
            required_plans: row.required_plans,
        })
        .collect())
}

/// Runs `sql`, binding `only` as `$1` when it is given.
async fn fetch_all<R>(
    conn: &mut PgConnection,
    sql: &str,
    only: Option<&ContentId>,
) -> Result<Vec<R>, sqlx::Error>
where
    R: for<'r> sqlx::FromRow<'r, PgRow> + Send + Unpin,
{
    let mut query = sqlx::query_as::<_, R>(sql);
    if let Some(content_id) = only {
        query = query.bind(content_id.as_str());
    }
    query.fetch_all(conn).await
}

/// Groups child rows by title, keeping their order within each title.
fn by_content<R, T>(rows: Vec<R>, split: fn(R) -> (String, T)) -> HashMap<String, Vec<T>> {
    let mut groups: HashMap<String, Vec<T>> = HashMap::new();
    for (content_id, item) in rows.into_iter().map(split) {
        groups.entry(content_id).or_default().push(item);
    }
    groups
}

pub async fn entitlement(pool: &PgPool, user_id: &UserId) -> Result<Option<Entitlement>, sqlx::Error> {
    sqlx::query_as::<_, Entitlement>(
        "SELECT user_id, plan, max_streams, active FROM entitlements WHERE user_id = $1",
    )
    .bind(user_id.as_str())
    .fetch_optional(pool)
    .await
}

pub async fn progress(
    pool: &PgPool,
    user_id: &UserId,
    content_id: &ContentId,
) -> Result<Option<Progress>, sqlx::Error> {
    sqlx::query_as::<_, Progress>(
        "SELECT position_ms, updated_at, completed FROM watch_progress \
         WHERE user_id = $1 AND content_id = $2",
    )
    .bind(user_id.as_str())
    .bind(content_id.as_str())
    .fetch_optional(pool)
    .await
}

/// Stores a batch of positions in one statement, so a batch is applied
/// wholly or not at all.
///
/// The newest write wins, ordered by `(updated_at, position_ms, completed)`:
/// comparing the rest too makes equal timestamps resolve the same way
/// whatever order the writes arrive in, which keeps retries and concurrent
/// batches idempotent. `completed` belongs to the winning write, so a later
/// write without it clears it (the title is being watched again).
/// `DISTINCT ON` keeps one item per key, because `ON CONFLICT` cannot touch
/// the same row twice in one statement. Rows are inserted in key
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
    let mut completed = Vec::with_capacity(items.len());
    for item in items {
        user_ids.push(item.user_id.as_str());
        content_ids.push(item.content_id.as_str());
        positions.push(*item.position_ms);
        stamps.push(*item.updated_at);
        completed.push(item.completed);
    }
    let result = sqlx::query(
        "INSERT INTO watch_progress (user_id, content_id, position_ms, updated_at, completed)
         SELECT DISTINCT ON (user_id, content_id) user_id, content_id, position_ms, updated_at, completed
         FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::timestamptz[], $5::bool[])
              AS batch (user_id, content_id, position_ms, updated_at, completed)
         ORDER BY user_id, content_id, updated_at DESC, position_ms DESC, completed DESC
         ON CONFLICT (user_id, content_id) DO UPDATE
         SET position_ms = EXCLUDED.position_ms, updated_at = EXCLUDED.updated_at,
             completed = EXCLUDED.completed
         WHERE (watch_progress.updated_at, watch_progress.position_ms, watch_progress.completed)
             < (EXCLUDED.updated_at, EXCLUDED.position_ms, EXCLUDED.completed)",
    )
    .bind(&user_ids)
    .bind(&content_ids)
    .bind(&positions)
    .bind(&stamps)
    .bind(&completed)
    .execute(pool)
    .await?;
    Ok(result.rows_affected())
}

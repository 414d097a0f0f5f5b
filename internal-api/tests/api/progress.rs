use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone, Utc};
use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{BATCH, TestApp, assert_error, assert_json, progress_path, send, spawn_app};

/// 2^53 - 1, the largest position CONTRACT section 6 lets Moneta accept.
const MAX_POSITION_MS: i64 = 9_007_199_254_740_991;

fn at(seconds: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_780_000_000 + seconds, 0)
        .single()
        .expect("valid timestamp")
}

fn item(user: &str, content: &str, position_ms: i64, updated_at: DateTime<Utc>) -> Value {
    json!({
        "user_id": user,
        "content_id": content,
        "position_ms": position_ms,
        "updated_at": updated_at.to_rfc3339(),
    })
}

async fn send_items(app: &TestApp, items: Vec<Value>) {
    let response = app.post_batch(&json!({ "items": items })).await;
    assert_eq!(response.status().as_u16(), 204);
}

async fn all_rows(app: &TestApp) -> Vec<(String, String, i64, DateTime<Utc>, bool)> {
    sqlx::query_as(
        "SELECT user_id, content_id, position_ms, updated_at, completed FROM watch_progress ORDER BY 1, 2",
    )
    .fetch_all(&app.db)
    .await
    .expect("rows")
}

/// The GET answer, `None` for `404`.
async fn answer(app: &TestApp, user: &str, content: &str) -> Option<Value> {
    let response = app.get(&progress_path(user, content)).await;
    if response.status().as_u16() == 404 {
        return None;
    }
    let body = assert_json(response, 200).await;
    let mut fields: Vec<&str> = body
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default();
    fields.sort_unstable();
    assert_eq!(fields, ["completed", "position_ms", "updated_at"], "{body}");
    assert!(body["completed"].is_boolean(), "{body}");
    Some(body)
}

/// The stored position and whether it was stopped as completed.
async fn stored_completed(app: &TestApp, user: &str, content: &str) -> Option<(i64, bool)> {
    let body = answer(app, user, content).await?;
    Some((
        body["position_ms"].as_i64().expect("position_ms"),
        body["completed"] == true,
    ))
}

fn completed(mut item: Value) -> Value {
    item["completed"] = json!(true);
    item
}

async fn stored(app: &TestApp, user: &str, content: &str) -> Option<(i64, DateTime<Utc>)> {
    let body = answer(app, user, content).await?;
    let updated_at = body["updated_at"]
        .as_str()
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .expect("updated_at is RFC 3339")
        .with_timezone(&Utc);
    Some((body["position_ms"].as_i64().expect("position_ms"), updated_at))
}

#[tokio::test]
async fn a_stored_position_can_be_read_back() {
    let app = spawn_app().await;
    app.get_error(&progress_path("u1", "m-0001"), 404, "progress_not_found")
        .await;

    send_items(&app, vec![item("u1", "m-0001", 61_000, at(0))]).await;
    assert_eq!(stored(&app, "u1", "m-0001").await, Some((61_000, at(0))));
    // Other keys are untouched.
    assert_eq!(stored(&app, "u1", "m-0002").await, None);
    assert_eq!(stored(&app, "u2", "m-0001").await, None);
}

#[tokio::test]
async fn timestamps_with_offsets_and_fractions_are_kept() {
    let app = spawn_app().await;
    let body = json!({"items": [{
        "user_id": "u1", "content_id": "m-0001", "position_ms": 5,
        "updated_at": "2026-05-01T09:30:00.123456+09:00"}]});
    assert_eq!(app.post_batch(&body).await.status().as_u16(), 204);
    let expected = DateTime::parse_from_rfc3339("2026-05-01T00:30:00.123456Z")
        .expect("valid")
        .with_timezone(&Utc);
    assert_eq!(stored(&app, "u1", "m-0001").await, Some((5, expected)));
}

#[tokio::test]
async fn an_older_write_is_ignored() {
    let app = spawn_app().await;
    send_items(&app, vec![item("u1", "m-0001", 500, at(20))]).await;
    send_items(&app, vec![item("u1", "m-0001", 100, at(10))]).await;
    assert_eq!(stored(&app, "u1", "m-0001").await, Some((500, at(20))));
    send_items(&app, vec![item("u1", "m-0001", 900, at(30))]).await;
    assert_eq!(stored(&app, "u1", "m-0001").await, Some((900, at(30))));
}

#[tokio::test]
async fn equal_timestamps_resolve_the_same_way_in_any_order() {
    let app = spawn_app().await;
    send_items(&app, vec![item("u1", "a", 300, at(5))]).await;
    send_items(&app, vec![item("u1", "a", 200, at(5))]).await;
    send_items(&app, vec![item("u2", "a", 200, at(5))]).await;
    send_items(&app, vec![item("u2", "a", 300, at(5))]).await;
    assert_eq!(stored(&app, "u1", "a").await, Some((300, at(5))));
    assert_eq!(stored(&app, "u2", "a").await, Some((300, at(5))));
}

#[tokio::test]
async fn completed_is_stored_and_read_back() {
    let app = spawn_app().await;
    send_items(
        &app,
        vec![
            completed(item("u1", "m-0001", 4_000, at(1))),
            item("u1", "m-0002", 5_000, at(1)),
        ],
    )
    .await;
    assert_eq!(stored_completed(&app, "u1", "m-0001").await, Some((4_000, true)));
    assert_eq!(stored_completed(&app, "u1", "m-0002").await, Some((5_000, false)));
    // Sent as false, it is as absent.
    let mut explicit = item("u1", "m-0003", 6_000, at(1));
    explicit["completed"] = json!(false);
    send_items(&app, vec![explicit]).await;
    assert_eq!(stored_completed(&app, "u1", "m-0003").await, Some((6_000, false)));
}

#[tokio::test]
async fn a_later_write_without_completed_clears_it() {
    let app = spawn_app().await;
    send_items(&app, vec![completed(item("u1", "m-0001", 4_000, at(1)))]).await;
    // Watched again: a later heartbeat carries no mark.
    send_items(&app, vec![item("u1", "m-0001", 1_000, at(2))]).await;
    assert_eq!(stored_completed(&app, "u1", "m-0001").await, Some((1_000, false)));
    // Completed again later, at the same position.
    send_items(&app, vec![completed(item("u1", "m-0001", 1_000, at(3)))]).await;
    assert_eq!(stored_completed(&app, "u1", "m-0001").await, Some((1_000, true)));
}

#[tokio::test]
async fn an_older_write_with_completed_does_not_set_it() {
    let app = spawn_app().await;
    send_items(&app, vec![item("u1", "m-0001", 2_000, at(5))]).await;
    send_items(&app, vec![completed(item("u1", "m-0001", 9_000, at(4)))]).await;
    assert_eq!(stored_completed(&app, "u1", "m-0001").await, Some((2_000, false)));
    assert_eq!(stored(&app, "u1", "m-0001").await, Some((2_000, at(5))));
    // Within one batch too: the newest item decides.
    send_items(
        &app,
        vec![
            completed(item("u1", "m-0002", 9_000, at(4))),
            item("u1", "m-0002", 2_000, at(5)),
        ],
    )
    .await;
    assert_eq!(stored_completed(&app, "u1", "m-0002").await, Some((2_000, false)));
}

#[tokio::test]
async fn equal_writes_but_completed_resolve_to_completed_in_any_order() {
    let app = spawn_app().await;
    send_items(&app, vec![item("u1", "a", 300, at(5))]).await;
    send_items(&app, vec![completed(item("u1", "a", 300, at(5)))]).await;
    send_items(&app, vec![completed(item("u2", "a", 300, at(5)))]).await;
    send_items(&app, vec![item("u2", "a", 300, at(5))]).await;
    assert_eq!(stored_completed(&app, "u1", "a").await, Some((300, true)));
    assert_eq!(stored_completed(&app, "u2", "a").await, Some((300, true)));
    // Resent, a completed batch changes nothing.
    let before = all_rows(&app).await;
    send_items(&app, vec![completed(item("u1", "a", 300, at(5)))]).await;
    assert_eq!(all_rows(&app).await, before);
}

#[tokio::test]
async fn resending_a_batch_changes_nothing() {
    let app = spawn_app().await;
    let batch = vec![
        item("u1", "m-0001", 1_000, at(1)),
        item("u1", "m-0002", 2_000, at(2)),
        item("u2", "m-0001", 3_000, at(3)),
    ];
    send_items(&app, batch.clone()).await;
    let before = all_rows(&app).await;
    send_items(&app, batch).await;
    let after = all_rows(&app).await;
    assert_eq!(before, after);
    assert_eq!(after.len(), 3);
}

#[tokio::test]
async fn duplicates_within_one_batch_keep_the_newest() {
    let app = spawn_app().await;
    send_items(
        &app,
        vec![
            item("u1", "m-0001", 100, at(1)),
            item("u1", "m-0001", 300, at(3)),
            item("u1", "m-0001", 200, at(2)),
            item("u1", "m-0002", 50, at(9)),
            item("u1", "m-0002", 60, at(9)),
            item("u1", "m-0002", 60, at(9)),
        ],
    )
    .await;
    assert_eq!(stored(&app, "u1", "m-0001").await, Some((300, at(3))));
    assert_eq!(stored(&app, "u1", "m-0002").await, Some((60, at(9))));
    assert_eq!(app.progress_rows().await, 2);
}

#[tokio::test]
async fn an_empty_batch_is_accepted() {
    let app = spawn_app().await;
    send_items(&app, vec![]).await;
    assert_eq!(app.progress_rows().await, 0);
}

/// Cheap randomness without another dependency: UUIDv4 carries 122 random bits.
fn random_u32() -> u32 {
    let bytes = uuid::Uuid::new_v4().into_bytes();
    u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_batches_converge_on_the_newest_write() {
    let app = Arc::new(spawn_app().await);
    let keys: Vec<(String, String)> = (0..5)
        .flat_map(|u| (0..3).map(move |c| (format!("user-{u}"), format!("m-{c:04}"))))
        .collect();

    // Each writer sends every key once, in its own random order, so batches
    // overlap heavily and lock rows concurrently.
    let mut writers = tokio::task::JoinSet::new();
    let mut sent: Vec<Vec<(usize, i64, DateTime<Utc>)>> = Vec::new();
    for _ in 0..20 {
        let mut items: Vec<(usize, i64, DateTime<Utc>)> = (0..keys.len())
            .map(|k| {
                let stamp = at(i64::from(random_u32() % 1_000));
                (k, i64::from(random_u32() % 10_000_000), stamp)
            })
            .collect();
        items.sort_by_key(|_| random_u32());
        sent.push(items.clone());
        let app = Arc::clone(&app);
        let keys = keys.clone();
        writers.spawn(async move {
            let body: Vec<Value> = items
                .iter()
                .map(|(k, pos, ts)| item(&keys[*k].0, &keys[*k].1, *pos, *ts))
                .collect();
            app.post_batch(&json!({ "items": body })).await.status().as_u16()
        });
    }
    while let Some(status) = writers.join_next().await {
        assert_eq!(status.expect("writer task"), 204);
    }

    let mut newest: HashMap<usize, (DateTime<Utc>, i64)> = HashMap::new();
    for (k, pos, ts) in sent.into_iter().flatten() {
        let entry = newest.entry(k).or_insert((ts, pos));
        if (ts, pos) > *entry {
            *entry = (ts, pos);
        }
    }
    for (k, (user, content)) in keys.iter().enumerate() {
        let (ts, pos) = newest[&k];
        assert_eq!(
            stored(&app, user, content).await,
            Some((pos, ts)),
            "{user}/{content}"
        );
    }
    assert_eq!(app.progress_rows().await, keys.len() as i64);
}

#[tokio::test]
async fn bad_batches_are_rejected_and_write_nothing() {
    let app = spawn_app().await;
    let good = item("u1", "m-0001", 1, at(0));
    let post = |content_type: &str, body: String| {
        send(
            app.request(Method::POST, BATCH)
                .header("content-type", content_type)
                .body(body),
        )
    };
    let raw = |body: &str| post("application/json", body.to_owned());

    assert_error(raw("{not json").await, 400, "invalid_body").await;
    assert_error(raw("{}").await, 400, "invalid_body").await;
    assert_error(raw("{\"items\": 5}").await, 400, "invalid_body").await;
    let overflow = r#"{"items": [{"user_id": "u1", "content_id": "m-0001",
        "position_ms": 99999999999999999999, "updated_at": "2026-01-01T00:00:00Z"}]}"#;
    assert_error(raw(overflow).await, 400, "invalid_body").await;

    let cases = [
        json!({"items": [{"user_id": "u1", "content_id": "m-0001", "position_ms": "12", "updated_at": "2026-01-01T00:00:00Z"}]}),
        json!({"items": [{"user_id": "u1", "content_id": "m-0001", "position_ms": 1.5, "updated_at": "2026-01-01T00:00:00Z"}]}),
        json!({"items": [{"user_id": "u1", "content_id": "m-0001", "updated_at": "2026-01-01T00:00:00Z"}]}),
        json!({"items": [{"user_id": "u1", "content_id": "m-0001", "position_ms": 1, "updated_at": "yesterday"}]}),
        json!({"items": [{"user_id": "u1", "content_id": "m-0001", "position_ms": 1, "updated_at": "2026-01-01 00:00:00"}]}),
        json!({"items": [good.clone(), {"user_id": "u1", "content_id": "m-0002", "position_ms": -1, "updated_at": "2026-01-01T00:00:00Z"}]}),
        json!({"items": [good.clone(), item("u1", &"c".repeat(65), 1, at(0))]}),
        json!({"items": [good.clone(), item(&"u".repeat(129), "m-0001", 1, at(0))]}),
        json!({"items": [good.clone(), item("u\u{0}1", "m-0001", 1, at(0))]}),
        json!({"items": [good.clone(), item("u1", "bad id", 1, at(0))]}),
        json!({"items": [good.clone(), item("u1", "m-0001", 1, at(0) + Duration::days(365 * 9000))]}),
        json!({"items": [{"user_id": 7, "content_id": "m-0001", "position_ms": 1, "updated_at": "2026-01-01T00:00:00Z"}]}),
    ];
    for body in &cases {
        let body = assert_error(app.post_batch(body).await, 400, "invalid_body").await;
        assert!(!body["error"]["message"].as_str().unwrap_or_default().is_empty());
    }

    let one_good = json!({"items": [good.clone()]}).to_string();
    let untyped = send(app.request(Method::POST, BATCH).body(one_good.clone())).await;
    assert_error(untyped, 415, "unsupported_media_type").await;
    assert_error(post("text/plain", one_good).await, 415, "unsupported_media_type").await;

    let too_many: Vec<Value> = (0..1001)
        .map(|i| item(&format!("u{i}"), "m-0001", 1, at(0)))
        .collect();
    assert_error(
        app.post_batch(&json!({ "items": too_many })).await,
        413,
        "batch_too_large",
    )
    .await;

    let huge = json!({"items": [], "padding": "x".repeat(2 * 1024 * 1024)});
    assert_error(app.post_batch(&huge).await, 413, "payload_too_large").await;

    assert_eq!(app.progress_rows().await, 0, "a rejected batch wrote rows");
}

#[tokio::test]
async fn a_full_batch_is_accepted() {
    let app = spawn_app().await;
    let items: Vec<Value> = (0..1000)
        .map(|i| item(&format!("user-{i}"), "m-0001", i, at(i)))
        .collect();
    send_items(&app, items).await;
    assert_eq!(app.progress_rows().await, 1000);
}

#[tokio::test]
async fn malformed_ids_in_the_progress_path_are_400() {
    let app = spawn_app().await;
    let bad_content = progress_path("u1", "not%20valid");
    app.get_error(&bad_content, 400, "invalid_content_id").await;
    let bad_user = progress_path(&"u".repeat(129), "m-0001");
    app.get_error(&bad_user, 400, "invalid_user_id").await;
}

#[tokio::test]
async fn positions_up_to_2_pow_53_minus_1_are_stored_and_read_back() {
    let app = spawn_app().await;
    send_items(
        &app,
        vec![
            item("u1", "m-0001", MAX_POSITION_MS, at(0)),
            item("u1", "m-0002", 0, at(0)),
        ],
    )
    .await;
    assert_eq!(stored(&app, "u1", "m-0001").await, Some((MAX_POSITION_MS, at(0))));
    assert_eq!(stored(&app, "u1", "m-0002").await, Some((0, at(0))));
    // Exactly, as the JSON number Moneta parses, not rounded through a float.
    let body = app.get_json(&progress_path("u1", "m-0001")).await;
    assert_eq!(body["position_ms"].to_string(), "9007199254740991");
}

#[tokio::test]
async fn positions_beyond_2_pow_53_minus_1_or_negative_are_400() {
    let app = spawn_app().await;
    send_items(&app, vec![item("u1", "m-0001", 7, at(0))]).await;
    for position_ms in [MAX_POSITION_MS + 1, i64::MAX, -1, i64::MIN] {
        // A newer stamp, so only the position can be why nothing changes.
        let batch = json!({ "items": [item("u1", "m-0001", position_ms, at(1))] });
        let body = assert_error(app.post_batch(&batch).await, 400, "invalid_body").await;
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("position_ms"), "{position_ms}: {message}");
    }
    assert_eq!(stored(&app, "u1", "m-0001").await, Some((7, at(0))));
    assert_eq!(app.progress_rows().await, 1);
}

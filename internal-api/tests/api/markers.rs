//! Markers (CONTRACT section 7): stored with checks, served in a stable
//! order, exported, and seeded idempotently.

use serde_json::{Value, json};
use sqlx::PgPool;

use crate::helpers::{internal_api, playback_path, run_ok, spawn_seeded_app};

/// What `seed` gives m-0001, as served.
fn parasite_markers() -> Value {
    json!([
        {"type": "intro", "start_ms": 30_000, "end_ms": 105_000},
        {"type": "credits", "start_ms": 7_680_000, "end_ms": 7_920_000}
    ])
}

/// Every marker row with its `xmin`, which changes whenever a row is
/// rewritten, even to the same values.
async fn marker_rows(db: &PgPool) -> Vec<String> {
    sqlx::query_scalar("SELECT m.xmin::text || ' ' || m::text FROM markers m ORDER BY m::text")
        .fetch_all(db)
        .await
        .expect("read markers")
}

#[tokio::test]
async fn m_0001_has_exactly_the_seeded_markers_in_order() {
    let app = spawn_seeded_app().await;
    let body = app.get_json(&playback_path("m-0001")).await;
    assert_eq!(body["markers"], parasite_markers());
}

#[tokio::test]
async fn a_title_without_markers_answers_an_empty_array() {
    let app = spawn_seeded_app().await;
    let body = app.get_json(&playback_path("m-0002")).await;
    assert_eq!(body["markers"], json!([]));
}

#[tokio::test]
async fn markers_are_served_by_start_then_type() {
    let app = spawn_seeded_app().await;
    // Inserted out of order, with two markers starting together.
    app.execute(
        "INSERT INTO markers (content_id, type, start_ms, end_ms) VALUES
         ('m-0002', 'preview', 7100000, 7200000), ('m-0002', 'recap', 0, 60000),
         ('m-0002', 'credits', 6900000, 7100000), ('m-0002', 'intro', 0, 30000)",
    )
    .await;
    let body = app.get_json(&playback_path("m-0002")).await;
    assert_eq!(
        body["markers"],
        json!([
            {"type": "intro", "start_ms": 0, "end_ms": 30_000},
            {"type": "recap", "start_ms": 0, "end_ms": 60_000},
            {"type": "credits", "start_ms": 6_900_000, "end_ms": 7_100_000},
            {"type": "preview", "start_ms": 7_100_000, "end_ms": 7_200_000}
        ])
    );
}

#[tokio::test]
async fn the_database_refuses_malformed_markers() {
    let app = spawn_seeded_app().await;
    for (kind, start_ms, end_ms) in [
        ("outro", 0, 1_000),
        ("Intro", 0, 1_000),
        ("intro", -1, 1_000),
        ("intro", 1_000, 1_000),
        ("intro", 2_000, 1_000),
        ("intro", 0, internal_api::domain::MAX_POSITION_MS + 1),
    ] {
        let err =
            sqlx::query("INSERT INTO markers (content_id, type, start_ms, end_ms) VALUES ($1, $2, $3, $4)")
                .bind("m-0002")
                .bind(kind)
                .bind(start_ms)
                .bind(end_ms)
                .execute(&app.db)
                .await
                .expect_err("a malformed marker is refused");
        let code = err.as_database_error().and_then(|e| e.code());
        assert_eq!(
            code.as_deref(),
            Some("23514"),
            "{kind} {start_ms}..{end_ms}: {err}"
        );
    }
    let body = app.get_json(&playback_path("m-0002")).await;
    assert_eq!(body["markers"], json!([]));
}

#[tokio::test]
async fn export_snapshot_carries_the_markers() {
    let app = spawn_seeded_app().await;
    let output = run_ok(internal_api(Some(&app.database_url)).arg("export-snapshot")).await;
    let snapshot: Value = serde_json::from_slice(&output.stdout).expect("stdout is one JSON document");
    let contents = snapshot["contents"].as_array().expect("contents array");
    assert_eq!(contents.len(), internal_api::seed::CATALOG.len());
    for content in contents {
        let expected = match content["content_id"].as_str() {
            Some("m-0001") => parasite_markers(),
            _ => json!([]),
        };
        assert_eq!(content["markers"], expected, "{}", content["content_id"]);
    }
}

#[tokio::test]
async fn seeding_twice_leaves_the_same_markers() {
    let app = spawn_seeded_app().await;
    let first = marker_rows(&app.db).await;
    assert_eq!(first.len(), 2, "{first:?}");

    let report = internal_api::seed::apply(&app.db).await.expect("seed");
    assert_eq!(report.rows_changed, 0);
    assert_eq!(
        marker_rows(&app.db).await,
        first,
        "the second seed rewrote markers"
    );
    let body = app.get_json(&playback_path("m-0001")).await;
    assert_eq!(body["markers"], parasite_markers());
}

#[tokio::test]
async fn reseeding_restores_the_demo_markers() {
    let app = spawn_seeded_app().await;
    // Markers the demo data lacks, on a title with markers and on one without.
    app.execute(
        "INSERT INTO markers (content_id, type, start_ms, end_ms) VALUES
         ('m-0001', 'recap', 0, 20000), ('m-0003', 'preview', 7000000, 7140000)",
    )
    .await;
    app.execute("UPDATE markers SET end_ms = 90000 WHERE content_id = 'm-0001' AND type = 'intro'")
        .await;
    app.execute("DELETE FROM markers WHERE content_id = 'm-0001' AND type = 'credits'")
        .await;

    let report = internal_api::seed::apply(&app.db).await.expect("seed");
    let body = app.get_json(&playback_path("m-0001")).await;
    assert_eq!(body["markers"], parasite_markers());
    let body = app.get_json(&playback_path("m-0003")).await;
    assert_eq!(body["markers"], json!([]));
    assert_eq!(report.rows_changed, 4, "one update, one insert, two deletes");
}

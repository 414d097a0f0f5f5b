//! Database outages, each on a dedicated server so stopping it does not
//! disturb other tests.

use std::sync::Arc;
use std::time::{Duration, Instant};

use internal_api::startup::{Application, StartupError};
use serde_json::json;

use crate::helpers::{PgServer, assert_error, settings, spawn_app_on};

async fn dedicated_server() -> Arc<PgServer> {
    Arc::new(
        tokio::task::spawn_blocking(PgServer::start)
            .await
            .expect("start PostgreSQL"),
    )
}

async fn blocking(server: &Arc<PgServer>, f: fn(&PgServer)) {
    let server = Arc::clone(server);
    tokio::task::spawn_blocking(move || f(&server))
        .await
        .expect("pg_ctl");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_answers_503_and_recovers_without_restart() {
    let server = dedicated_server().await;
    let app = spawn_app_on(&server, None).await;
    internal_api::seed::apply(&app.db).await.expect("seed");
    let playback = "/internal/v1/contents/m-0001/playback";
    assert_eq!(app.get(playback).await.status().as_u16(), 200);

    blocking(&server, PgServer::stop).await;

    let started = Instant::now();
    let response = app.get(playback).await;
    assert_eq!(response.headers()["retry-after"], "1");
    assert_error(response, 503, "database_unavailable").await;
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "took {:?}",
        started.elapsed()
    );
    assert_error(app.get("/health").await, 503, "database_unavailable").await;
    let batch = json!({"items": [{"user_id": "u1", "content_id": "m-0001",
        "position_ms": 42, "updated_at": "2026-01-01T00:00:00Z"}]});
    assert_error(app.post_batch(&batch).await, 503, "database_unavailable").await;

    blocking(&server, PgServer::restart).await;

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = app.get(playback).await.status().as_u16();
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "still {status} after the restart");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(app.get("/health").await.status().as_u16(), 200);
    assert_eq!(app.post_batch(&batch).await.status().as_u16(), 204);
    assert_eq!(
        app.get("/internal/v1/users/u1/progress/m-0001")
            .await
            .status()
            .as_u16(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_waits_for_the_database_and_migrations_run_once() {
    let server = dedicated_server().await;
    let url = server.create_database().await;
    blocking(&server, PgServer::stop).await;

    let mut quick = settings(&url, None);
    quick.db_startup_timeout = Duration::from_secs(1);
    match Application::build(&quick).await {
        Err(StartupError::Database(internal_api::db::StartupError::Unreachable(..))) => {}
        Err(other) => panic!("unexpected error: {other}"),
        Ok(_) => panic!("started without a database"),
    }

    let patient = settings(&url, None);
    let starting = tokio::spawn(async move { Application::build(&patient).await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!starting.is_finished(), "gave up too early");
    blocking(&server, PgServer::restart).await;
    let first = match starting.await.expect("task") {
        Ok(app) => app,
        Err(err) => panic!("did not start once the database came up: {err}"),
    };

    // A second start on a migrated database is a no-op.
    let second = match Application::build(&settings(&url, None)).await {
        Ok(app) => app,
        Err(err) => panic!("second start failed: {err}"),
    };
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(second.pool())
        .await
        .expect("count");
    assert_eq!(applied, internal_api::db::MIGRATOR.iter().count() as i64);
    assert_ne!(first.port(), second.port());
}

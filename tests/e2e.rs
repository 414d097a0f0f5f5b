//! End to end: the real `internal-api` binary on a real PostgreSQL, a real
//! redis-server and the real `moneta` binary, driven through a user story.

#[path = "support/mod.rs"]
mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use support::{MonetaProcess, Process, RedisServer, assert_error, eventually, free_port, mint_token};
use testkit::sqlx::{self, PgPool};
use testkit::{run, shared_server};

const INTERNAL_API_TOKEN: &str = "e2e-internal-token";

/// The workspace's `internal-api` binary, built when this test binary was
/// built alone (`cargo test --test e2e` builds only this package's binaries).
fn internal_api_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target profile dir");
    let bin = dir.join("internal-api");
    if !bin.is_file() {
        run(
            Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())).args([
                "build",
                "-p",
                "internal-api",
                "--bin",
                "internal-api",
            ]),
            "cargo build -p internal-api",
        );
    }
    bin
}

fn internal_api(database_url: &str) -> Command {
    let mut command = Command::new(internal_api_binary());
    command.env("DATABASE_URL", database_url).env("RUST_LOG", "warn");
    command
}

/// The internal API serving `database_url`; returns it and its base URL.
fn serve_internal_api(database_url: &str) -> (Process, String) {
    let port = free_port();
    let mut command = internal_api(database_url);
    command
        .env("INTERNAL_API_LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("INTERNAL_API_TOKEN", INTERNAL_API_TOKEN);
    let process = Process::logged(&mut command, "internal-api").listening_on(port);
    (process, format!("http://127.0.0.1:{port}"))
}

async fn seeded_database() -> String {
    let url = shared_server().create_database().await;
    run(internal_api(&url).arg("seed"), "internal-api seed");
    url
}

/// Moneta on `redis`, in front of the internal API at `api_url`.
fn moneta(redis: &RedisServer, api_url: &str, extra: &[(&str, String)]) -> MonetaProcess {
    let mut envs = vec![
        ("MONETA_REDIS_URL", redis.url.clone()),
        ("MONETA_INTERNAL_API_URL", api_url.to_owned()),
        ("MONETA_INTERNAL_API_TOKEN", INTERNAL_API_TOKEN.to_owned()),
    ];
    envs.extend(extra.iter().cloned());
    MonetaProcess::start(&envs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_stop_and_resume_reaches_postgres() {
    let database_url = seeded_database().await;
    let (_api, api_url) = serve_internal_api(&database_url);
    let redis = RedisServer::start();
    let moneta_process = moneta(&redis, &api_url, &[("MONETA_PROGRESS_FLUSH_MS", "200".into())]);
    let public = moneta_process.public_api();
    let token = mint_token("demo-standard", "standard", 2, "KR");

    let info = public.playback_info_json("m-0001", &token).await;
    assert_eq!(info["degraded"], false, "{info}");
    assert_eq!(info["resume_position_ms"], 0);
    assert!(info["streams"].as_array().is_some_and(|s| !s.is_empty()));

    // Plan and region rules come from the seeded catalog and entitlements.
    let inactive = mint_token("demo-inactive", "standard", 2, "KR");
    let jp_basic = mint_token("demo-basic", "basic", 1, "JP");
    for (content, token) in [("m-0002", &token), ("m-0001", &inactive), ("m-0003", &jp_basic)] {
        let status = public.playback_info(content, token).await.status();
        assert_eq!(status, 403, "{content}");
    }

    let id = public.started_session(&token, "m-0001", "tv-livingroom").await;
    for position in [10_000, 20_000, 30_000] {
        assert_eq!(public.heartbeat(&token, &id, position).await.status(), 200);
    }
    assert_eq!(public.stop_session_at(&token, &id, 4_200_000).await.status(), 204);

    let info = public.playback_info_json("m-0001", &token).await;
    assert_eq!(info["resume_position_ms"], 4_200_000);

    let db = PgPool::connect(&database_url).await.unwrap();
    // The contract's bound for delivering a position.
    let stored = eventually(Duration::from_secs(30), async || {
        sqlx::query_scalar::<_, i64>(
            "SELECT position_ms FROM watch_progress WHERE user_id = 'demo-standard' AND content_id = 'm-0001'",
        )
        .fetch_optional(&db)
        .await
        .unwrap()
        .filter(|p| *p == 4_200_000)
    })
    .await;
    assert_eq!(stored, Some(4_200_000), "the final position reaches PostgreSQL");

    // A new Moneta with an empty Redis reads the position back from the internal API.
    drop(moneta_process);
    let fresh_redis = RedisServer::start();
    let moneta_process = moneta(&fresh_redis, &api_url, &[]);
    let info = moneta_process
        .public_api()
        .playback_info_json("m-0001", &token)
        .await;
    assert_eq!(info["resume_position_ms"], 4_200_000);
    assert_eq!(info["degraded"], false);
}

/// The completed mark is kept by PostgreSQL too: a Moneta with an empty Redis
/// still answers a title stopped as completed as watched, until a later
/// heartbeat (watching again) clears the mark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_stop_stays_watched_through_postgres() {
    let database_url = seeded_database().await;
    let (_api, api_url) = serve_internal_api(&database_url);
    let db = PgPool::connect(&database_url).await.unwrap();
    let token = mint_token("demo-standard", "standard", 2, "KR");
    let flush = [("MONETA_PROGRESS_FLUSH_MS", "200".to_owned())];
    let stored = async |position_ms: i64, completed: bool| {
        let row = eventually(Duration::from_secs(30), async || {
            sqlx::query_as::<_, (i64, bool)>(
                "SELECT position_ms, completed FROM watch_progress \
                 WHERE user_id = 'demo-standard' AND content_id = 'm-0001'",
            )
            .fetch_optional(&db)
            .await
            .unwrap()
            .filter(|row| *row == (position_ms, completed))
        })
        .await;
        assert_eq!(row, Some((position_ms, completed)), "PostgreSQL's row");
    };
    // With a fresh Redis, the position can only come from the internal API.
    let resume_from_postgres = async || {
        let redis = RedisServer::start();
        let info = moneta(&redis, &api_url, &[])
            .public_api()
            .playback_info_json("m-0001", &token)
            .await;
        assert_eq!(info["degraded"], false, "{info}");
        (info["resume_position_ms"].clone(), info["watched"].clone())
    };

    let redis = RedisServer::start();
    let moneta_process = moneta(&redis, &api_url, &flush);
    let public = moneta_process.public_api();
    // Well past 5 % of the title: without the mark it would resume here.
    let id = public.started_session(&token, "m-0001", "tv").await;
    assert_eq!(public.heartbeat(&token, &id, 1_000_000).await.status(), 200);
    let stop = serde_json::json!({"position_ms": 1_000_000, "completed": true});
    assert_eq!(public.stop_session_with(&token, &id, &stop).await.status(), 204);
    stored(1_000_000, true).await;
    assert_eq!(resume_from_postgres().await, (0.into(), true.into()));

    // Watching again clears the mark.
    let id = public.started_session(&token, "m-0001", "tv").await;
    assert_eq!(public.heartbeat(&token, &id, 1_200_000).await.status(), 200);
    stored(1_200_000, false).await;
    assert_eq!(resume_from_postgres().await, (1_200_000.into(), false.into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exported_snapshot_serves_as_the_fallback_catalog() {
    let database_url = seeded_database().await;
    let out = run(
        internal_api(&database_url).arg("export-snapshot"),
        "internal-api export-snapshot",
    );
    let snapshot: Value = serde_json::from_slice(&out.stdout).expect("snapshot is JSON");
    let titles = snapshot["contents"].as_array().expect("contents").len();
    assert!(titles >= 10, "a dozen seeded titles, got {titles}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("catalog.json");
    std::fs::write(&path, &out.stdout).unwrap();

    let redis = RedisServer::start();
    // Nobody listens there: every title must come from the snapshot.
    let moneta_process = moneta(
        &redis,
        &support::nobody_listens(),
        &[("MONETA_FALLBACK_CATALOG_FILE", path.display().to_string())],
    );
    let public = moneta_process.public_api();
    let token = mint_token("demo-premium", "premium", 4, "KR");
    for content in snapshot["contents"].as_array().unwrap() {
        let id = content["content_id"].as_str().unwrap();
        let resp = public.playback_info(id, &token).await;
        // KR premium may still be outside a title's regions; everything else plays.
        if resp.status() == 403 {
            assert_error(resp, 403, "region_unavailable").await;
            continue;
        }
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or_default();
        assert_eq!(status, 200, "{id}: {body}");
        assert_eq!(body["degraded"], true);
        assert_eq!(body["title"], content["title"]);
    }
}

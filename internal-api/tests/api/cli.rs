//! The binary itself: subcommands, settings errors, logs and shutdown.

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use sqlx::PgPool;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::helpers::{
    TRACE_ID, entitlement_path, internal_api, playback_path, run_ok, send, shared_server, spawn_seeded_app,
    traced,
};

/// Every row of the seeded tables with its `xmin`, which changes whenever a
/// row is rewritten, even to the same values.
async fn table_state(pool: &PgPool) -> Vec<String> {
    let mut rows = Vec::new();
    for table in ["contents", "streams", "subtitles", "markers", "entitlements"] {
        let mut part: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT '{table} ' || t.xmin::text || ' ' || t::text FROM {table} t ORDER BY t::text"
        ))
        .fetch_all(pool)
        .await
        .expect("read table");
        rows.append(&mut part);
    }
    rows
}

#[tokio::test]
async fn seeding_twice_changes_nothing() {
    let url = shared_server().create_database().await;
    run_ok(internal_api(Some(&url)).arg("seed")).await;
    let pool = PgPool::connect(&url).await.expect("connect");
    let first = table_state(&pool).await;
    assert!(!first.is_empty());

    run_ok(internal_api(Some(&url)).arg("seed")).await;
    let second = table_state(&pool).await;
    assert_eq!(first, second, "the second seed rewrote rows");

    let contents: i64 = sqlx::query_scalar("SELECT count(*) FROM contents")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(contents, internal_api::seed::CATALOG.len() as i64);
    assert!(contents >= 10);
    let users: i64 = sqlx::query_scalar("SELECT count(*) FROM entitlements")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(users, 4);
    let migrations: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(migrations, internal_api::db::MIGRATOR.iter().count() as i64);
}

#[tokio::test]
async fn reseeding_restores_edited_demo_rows() {
    let app = spawn_seeded_app().await;
    app.execute("UPDATE entitlements SET max_streams = 9 WHERE user_id = 'demo-basic'")
        .await;
    app.execute("DELETE FROM streams WHERE content_id = 'm-0001' AND ordinal = 1")
        .await;
    let report = internal_api::seed::apply(&app.db).await.expect("seed");
    assert_eq!(report.rows_changed, 2);
    let again = internal_api::seed::apply(&app.db).await.expect("seed");
    assert_eq!(again.rows_changed, 0);
}

#[tokio::test]
async fn export_snapshot_prints_the_catalog_in_playback_shape() {
    let app = spawn_seeded_app().await;
    let output = run_ok(internal_api(Some(&app.database_url)).arg("export-snapshot")).await;
    let snapshot: Value = serde_json::from_slice(&output.stdout).expect("stdout is one JSON document");
    let object = snapshot.as_object().expect("an object");
    assert_eq!(object.keys().collect::<Vec<_>>(), vec!["contents"]);
    let contents = snapshot["contents"].as_array().expect("contents array");

    let ids: Vec<&str> = contents
        .iter()
        .map(|c| c["content_id"].as_str().expect("content_id"))
        .collect();
    let mut expected: Vec<&str> = internal_api::seed::CATALOG.iter().map(|c| c.id).collect();
    expected.sort_unstable();
    assert_eq!(ids, expected, "all titles, sorted by id");

    for content in contents {
        let id = content["content_id"].as_str().expect("id");
        let served = app.get_json(&playback_path(id)).await;
        assert_eq!(content, &served, "snapshot entry differs from the API for {id}");
    }

    // Logs went to stderr, as JSON lines, keeping stdout parseable.
    for line in String::from_utf8_lossy(&output.stderr).lines() {
        serde_json::from_str::<Value>(line).unwrap_or_else(|_| panic!("not JSON: {line}"));
    }
}

#[tokio::test]
async fn export_snapshot_of_an_empty_catalog() {
    let url = shared_server().create_database().await;
    let output = run_ok(internal_api(Some(&url)).arg("export-snapshot")).await;
    let snapshot: Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(snapshot, serde_json::json!({"contents": []}));
}

async fn expect_config_error(cmd: &mut Command, setting: &str) -> String {
    let output = cmd.output().await.expect("ran");
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains(setting), "names {setting}: {stderr}");
    stderr
}

#[tokio::test]
async fn bad_settings_exit_with_code_2_naming_the_setting() {
    expect_config_error(&mut internal_api(None), "DATABASE_URL").await;
    expect_config_error(internal_api(None).arg("seed"), "DATABASE_URL").await;
    let stderr = expect_config_error(
        &mut internal_api(Some("mysql://user:pa55word@db/x")),
        "DATABASE_URL",
    )
    .await;
    assert!(!stderr.contains("pa55word"), "{stderr}");
    expect_config_error(
        internal_api(Some("postgres://u@127.0.0.1/x")).env("INTERNAL_API_LISTEN_ADDR", "localhost"),
        "INTERNAL_API_LISTEN_ADDR",
    )
    .await;
    let stderr = expect_config_error(
        internal_api(Some("postgres://u@127.0.0.1/x")).env("INTERNAL_API_TOKEN", "two words"),
        "INTERNAL_API_TOKEN",
    )
    .await;
    assert!(!stderr.contains("two words"), "{stderr}");
}

#[tokio::test]
async fn help_lists_the_subcommands() {
    let output = run_ok(internal_api(None).arg("--help")).await;
    let help = String::from_utf8_lossy(&output.stdout);
    for word in ["serve", "seed", "export-snapshot", "DATABASE_URL"] {
        assert!(help.contains(word), "{help}");
    }
}

#[tokio::test]
async fn an_unreachable_database_fails_the_start_after_the_wait() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let started = std::time::Instant::now();
    let output = internal_api(Some(&format!("postgres://u@127.0.0.1:{port}/x")))
        .env("INTERNAL_API_DB_STARTUP_TIMEOUT_S", "1")
        .arg("serve")
        .output()
        .await
        .expect("ran");
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[tokio::test]
async fn serve_logs_json_hides_the_token_and_stops_on_sigterm() {
    const TOKEN: &str = "cli-secret-token-42";
    let url = shared_server().create_database().await;
    let mut child = internal_api(Some(&url))
        .arg("serve")
        .env("INTERNAL_API_LISTEN_ADDR", "127.0.0.1:0")
        .env("INTERNAL_API_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("piped");
    let mut lines = BufReader::new(stdout).lines();
    let mut log: Vec<String> = Vec::new();

    let addr = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            log.push(line.clone());
            let event: Value = serde_json::from_str(&line).expect("log line is JSON");
            if event["message"] == "listening" {
                return event["addr"].as_str().expect("addr").to_owned();
            }
        }
        panic!("exited before listening: {log:?}");
    })
    .await
    .expect("listening in time");

    let client = reqwest::Client::new();
    let url = format!("http://{addr}{}", entitlement_path("demo-basic"));
    let unauthorised = send(client.get(&url)).await;
    assert_eq!(unauthorised.status().as_u16(), 401);
    let response = send(traced(client.get(&url).bearer_auth(TOKEN), "cli-req-1")).await;
    // Not seeded: the token was accepted and the user is unknown.
    assert_eq!(response.status().as_u16(), 404);
    assert_eq!(response.headers()["x-request-id"], "cli-req-1");

    let pid = i32::try_from(child.id().expect("running")).expect("pid fits");
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("stopped in time after SIGTERM")
        .expect("wait");
    assert!(status.success(), "{status}");
    while let Some(line) = lines.next_line().await.expect("read stdout") {
        log.push(line);
    }

    let events: Vec<Value> = log
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect();
    assert!(log.iter().all(|l| !l.contains(TOKEN)), "token in logs: {log:?}");
    let request_log = events
        .iter()
        .find(|e| e["span"]["request_id"] == "cli-req-1" && e["message"] == "request finished")
        .unwrap_or_else(|| panic!("no request log: {log:?}"));
    assert_eq!(request_log["span"]["trace_id"], TRACE_ID);
    assert_eq!(request_log["status"], 404);
    assert!(events.iter().any(|e| e["message"] == "stopped"), "{log:?}");
}

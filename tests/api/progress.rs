use std::time::Duration;

use crate::helpers::{TestApp, spawn_app};
use crate::support::redis_probe::{bucket, progress_parked};
use crate::support::{Fault, PATIENCE, eventually};

/// An app on which `user` (a demo user of `plan`) plays m-0001: the app, the
/// user's token and the session id.
async fn watching(user: &str, plan: &str, max_streams: u32) -> (TestApp, String, String) {
    let app = spawn_app().await;
    let token = app.token(user, plan, max_streams, "KR");
    let session_id = app.started_session(&token, "m-0001", "tv").await;
    (app, token, session_id)
}

#[tokio::test]
async fn resume_position_round_trip() {
    let (app, token, id) = watching("u-basic", "basic", 1).await;
    // Both within the resume thresholds (5 % to 90 % of the title's 7 920 s).
    assert_eq!(app.heartbeat(&token, &id, 1_234_500).await.status(), 200);
    let info = app.playback_info_json("m-0001", &token).await;
    assert_eq!(info["resume_position_ms"], 1_234_500);
    // The final position given on stop wins.
    assert_eq!(app.stop_session_at(&token, &id, 2_000_000).await.status(), 204);
    let info = app.playback_info_json("m-0001", &token).await;
    assert_eq!(info["resume_position_ms"], 2_000_000);
}

#[tokio::test]
async fn positions_reach_the_internal_api() {
    let (app, token, id) = watching("u-standard", "standard", 2).await;
    for p in [1_000, 2_000, 3_000] {
        assert_eq!(app.heartbeat(&token, &id, p).await.status(), 200);
    }
    app.api.assert_receives_position("u-standard", 3_000).await;
    assert!(
        app.api.delivered().iter().any(|i| i["user_id"] == "u-standard"
            && i["content_id"] == "m-0001"
            && i["position_ms"] == 3_000),
        "the position names its title"
    );
}

/// An app whose internal API fails, and the `u-basic` heartbeat with
/// `position_ms` it has acknowledged since.
async fn position_acknowledged_while_the_api_fails(position_ms: u64) -> TestApp {
    let (app, token, id) = watching("u-basic", "basic", 1).await;
    app.api.set_fault(Fault::Status500);
    assert_eq!(app.heartbeat(&token, &id, position_ms).await.status(), 200);
    app
}

#[tokio::test]
async fn positions_written_while_the_api_is_down_arrive_after_recovery() {
    let app = position_acknowledged_while_the_api_fails(777).await;
    // Gives a delivery the chance to (wrongly) happen; a slow machine only makes this check weaker.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(app.api.delivered().is_empty());
    app.api.set_fault(Fault::None);
    app.api.assert_receives_position("u-basic", 777).await;
}

#[tokio::test]
async fn positions_the_api_refuses_are_parked_in_redis_until_it_recovers() {
    let app = position_acknowledged_while_the_api_fails(888).await;
    let client = redis::Client::open(app.redis.url.as_str()).unwrap();
    let mut conn = client.get_connection().unwrap();
    let key = progress_parked(bucket("u-basic"));
    let mut parked = || -> i64 { redis::cmd("HLEN").arg(&key).query(&mut conn).unwrap() };
    let seen = eventually(PATIENCE, async || (parked() > 0).then_some(())).await;
    assert!(seen.is_some(), "the refused batch is parked in Redis");
    app.api.set_fault(Fault::None);
    app.api.assert_receives_position("u-basic", 888).await;
    // The round settles after the internal API answered.
    let settled = eventually(PATIENCE, async || (parked() == 0).then_some(())).await;
    assert!(settled.is_some(), "the delivered pair stays parked");
}

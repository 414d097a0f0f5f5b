use std::time::Duration;

use crate::helpers::{TestApp, spawn_app, spawn_app_with};
use crate::support::redis_probe::{bucket, progress_parked, user_key};
use crate::support::{Fault, PATIENCE, RedisProbe, eventually};

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

/// What Redis holds as `user`'s resume position of `content_id`.
async fn stored_position(redis: &mut RedisProbe, user: &str, content_id: &str) -> Option<String> {
    redis
        .query(
            redis::cmd("HGET")
                .arg(user_key(user, "positions"))
                .arg(content_id),
        )
        .await
}

/// A position Redis lacked is read from the internal API and written back
/// with the API's time, and only where Redis still holds none: a position
/// Redis learnt while the API was being asked stays, and one an instance
/// brings home from memory after an outage replaces the API's copy only if
/// it is newer. (Written back bare and unconditionally, it had no time, so
/// an older position coming home afterwards won.)
#[tokio::test]
async fn a_position_learnt_from_the_internal_api_never_replaces_a_newer_one() {
    // Patient enough to wait out the slowed internal API below.
    let app = spawn_app_with(&[
        ("MONETA_INTERNAL_API_TIMEOUT_MS", "30000"),
        ("MONETA_REQUEST_TIMEOUT_MS", "60000"),
    ])
    .await;
    let mut redis = RedisProbe::connect(&app.redis.url).await;
    let user = "load-learnt";
    let token = app.token(user, "standard", 2, "KR");
    // Redis knows the title and the user, not the user's position of it.
    let _ = app
        .playback_info("m-0001", &app.token("load-learnt-other", "standard", 2, "KR"))
        .await;
    assert_eq!(app.playback_info("m-0003", &token).await.status(), 200);

    let before = chrono::Utc::now().timestamp_millis();
    app.api.set_progress(user, "m-0001", 700_000);
    let after = chrono::Utc::now().timestamp_millis();
    let info = app.playback_info_json("m-0001", &token).await;
    assert_eq!(info["resume_position_ms"], 700_000, "{info}");
    let learnt = stored_position(&mut redis, user, "m-0001")
        .await
        .unwrap_or_default();
    let at: i64 = learnt
        .strip_prefix("700000@")
        .and_then(|at| at.parse().ok())
        .unwrap_or_else(|| panic!("written back without the API's time: {learnt:?}"));
    assert!(
        (before..=after).contains(&at),
        "{at} not the API's {before}..={after}"
    );

    // Again, with a newer position reaching Redis while the API is asked.
    let _: () = redis
        .query(redis::cmd("HDEL").arg(user_key(user, "positions")).arg("m-0001"))
        .await;
    app.api.set_fault(Fault::Slow(Duration::from_secs(1)));
    let asked = app.api.progress_calls();
    let read = tokio::spawn({
        let client = app.client.clone();
        let url = format!("{}/v1/contents/m-0001/playback-info", app.address);
        let token = token.clone();
        async move { client.get(url).bearer_auth(token).send().await }
    });
    let asking = eventually(PATIENCE, async || {
        (app.api.progress_calls() > asked).then_some(())
    })
    .await;
    assert!(asking.is_some(), "the internal API was never asked");
    let newer = format!("800000@{}", chrono::Utc::now().timestamp_millis());
    let _: () = redis
        .query(
            redis::cmd("HSET")
                .arg(user_key(user, "positions"))
                .arg("m-0001")
                .arg(&newer),
        )
        .await;
    let answer = read.await.expect("the read").expect("an answer");
    assert_eq!(answer.status(), 200);
    app.api.set_fault(Fault::None);
    assert_eq!(
        stored_position(&mut redis, user, "m-0001").await.as_deref(),
        Some(newer.as_str()),
        "the API's older position replaced the one Redis learnt meanwhile"
    );
    let info = app.playback_info_json("m-0001", &token).await;
    assert_eq!(info["resume_position_ms"], 800_000, "{info}");
}

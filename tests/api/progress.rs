use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{Fault, eventually, spawn_app};
use crate::support::PATIENCE;

/// The contract's bound for delivering a position once the internal API is reachable.
const DELIVERY: Duration = Duration::from_secs(30);

#[tokio::test]
async fn resume_position_round_trip() {
    let app = spawn_app().await;
    let token = app.token("u-basic", "basic", 1, "KR");
    let s_id = app.started_session(&token, "m-0001", "tv").await;
    let id = s_id.as_str();
    assert_eq!(app.heartbeat(&token, id, 12_345).await.status(), 200);
    let info: Value = app.playback_info("m-0001", &token).await.json().await.unwrap();
    assert_eq!(info["resume_position_ms"], 12_345);
    // The final position given on stop wins.
    let resp = app
        .client
        .delete(format!("{}/v1/playback/sessions/{id}", app.address))
        .bearer_auth(&token)
        .json(&json!({"position_ms": 20_000}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let info: Value = app.playback_info("m-0001", &token).await.json().await.unwrap();
    assert_eq!(info["resume_position_ms"], 20_000);
}

#[tokio::test]
async fn positions_reach_the_internal_api() {
    let app = spawn_app().await;
    let token = app.token("u-standard", "standard", 2, "KR");
    let s_id = app.started_session(&token, "m-0001", "tv").await;
    let id = s_id.as_str();
    for p in [1_000, 2_000, 3_000] {
        assert_eq!(app.heartbeat(&token, id, p).await.status(), 200);
    }
    let api = app.api.clone();
    let delivered = eventually(DELIVERY, || {
        api.delivered()
            .iter()
            .any(|i| i["user_id"] == "u-standard" && i["content_id"] == "m-0001" && i["position_ms"] == 3_000)
    })
    .await;
    assert!(delivered, "got {:?}", app.api.delivered());
}

#[tokio::test]
async fn positions_written_while_the_api_is_down_arrive_after_recovery() {
    let app = spawn_app().await;
    let token = app.token("u-basic", "basic", 1, "KR");
    let s_id = app.started_session(&token, "m-0001", "tv").await;
    app.api.set_fault(Fault::Status500);
    assert_eq!(app.heartbeat(&token, s_id.as_str(), 777).await.status(), 200);
    // Gives a delivery the chance to (wrongly) happen; a slow machine only makes this check weaker.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(app.api.delivered().is_empty());
    app.api.set_fault(Fault::None);
    let api = app.api.clone();
    let delivered = eventually(DELIVERY, || {
        api.delivered().iter().any(|i| i["position_ms"] == 777)
    })
    .await;
    assert!(delivered);
}

#[tokio::test]
async fn positions_the_api_refuses_are_parked_in_redis_until_it_recovers() {
    let app = spawn_app().await;
    let token = app.token("u-basic", "basic", 1, "KR");
    let s_id = app.started_session(&token, "m-0001", "tv").await;
    app.api.set_fault(Fault::Status500);
    assert_eq!(app.heartbeat(&token, s_id.as_str(), 888).await.status(), 200);
    let client = redis::Client::open(app.redis.url.as_str()).unwrap();
    let mut conn = client.get_connection().unwrap();
    let mut parked = 0;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while tokio::time::Instant::now() < deadline {
        parked = redis::cmd("LLEN")
            .arg("moneta:progress:pending")
            .query(&mut conn)
            .unwrap();
        if parked > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(parked > 0, "the refused batch is parked in Redis");
    app.api.set_fault(Fault::None);
    let api = app.api.clone();
    assert!(
        eventually(DELIVERY, || api
            .delivered()
            .iter()
            .any(|i| i["position_ms"] == 888))
        .await
    );
    let left: i64 = redis::cmd("LLEN")
        .arg("moneta:progress:pending")
        .query(&mut conn)
        .unwrap();
    assert_eq!(left, 0);
}

//! `MONETA_REDIS_MIN_REPLICAS_ACKED` on a real primary and replica: a
//! heartbeat or stop is answered once a replica holds it; when no replica
//! acknowledges in time, the position is kept in memory and delivered, as
//! while Redis is unreachable, and the player is answered all the same.

use std::time::Duration;

use testkit::RedisServer;

use crate::fault_proxy::LaggingProxy;
use crate::helpers::{TestApp, spawn_app_with};
use crate::support::redis_probe::user_key;
use crate::support::{PATIENCE, eventually, metric_value};

/// A Redis timeout (so a `WAIT` of half of it) a busy machine's replica
/// meets: whether a write waited is what is checked, not how long.
const PATIENT_MS: &str = "2000";

const UNACKED: &str = r#"moneta_fallbacks_total{dependency="redis",kind="replicas_unacked"}"#;

/// The resume position of `user` on `m-0001` as the server on `port` holds it.
fn position_on(port: u16, user: &str) -> Option<u64> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).expect("node URL");
    let mut conn = client.get_connection().expect("a connection of the test's own");
    let stored: Option<String> = redis::cmd("HGET")
        .arg(user_key(user, "positions"))
        .arg("m-0001")
        .query(&mut conn)
        .expect("HGET");
    stored?.split_once('@')?.0.parse().ok()
}

/// A primary, its replica, and an app whose writes wait for one replica.
async fn replicated_app() -> (RedisServer, RedisServer, TestApp) {
    let primary = RedisServer::start();
    let replica = RedisServer::start_replica_of(primary.port);
    let app = spawn_app_with(&[
        ("MONETA_REDIS_URL", &primary.url),
        ("MONETA_REDIS_MIN_REPLICAS_ACKED", "1"),
        ("MONETA_REDIS_TIMEOUT_MS", PATIENT_MS),
    ])
    .await;
    (primary, replica, app)
}

async fn unacked(app: &TestApp) -> f64 {
    metric_value(&app.metrics().await, UNACKED).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_heartbeat_is_already_on_the_replica() {
    let (_primary, replica, app) = replicated_app().await;
    let user = "load-replicas-acked";
    let token = app.token(user, "standard", 2, "KR");
    let id = app.started_session(&token, "m-0001", "tv").await;
    for position in [10_000, 20_000, 30_000] {
        assert_eq!(app.heartbeat(&token, &id, position).await.status(), 200);
        // `WAIT` answered before the player was: the replica holds it now.
        assert_eq!(position_on(replica.port, user), Some(position));
    }
    assert_eq!(app.stop_session_at(&token, &id, 35_000).await.status(), 204);
    assert_eq!(position_on(replica.port, user), Some(35_000));
    assert_eq!(unacked(&app).await, 0.0, "the replica acknowledged every write");
    app.api.assert_receives_position(user, 35_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_replica_acknowledging_positions_are_kept_in_memory_and_delivered() {
    let (primary, replica, app) = replicated_app().await;
    let user = "load-replicas-unacked";
    let token = app.token(user, "standard", 2, "KR");
    let id = app.started_session(&token, "m-0001", "tv").await;

    // A frozen replica stays connected and acknowledges nothing.
    replica.pause();
    assert_eq!(app.heartbeat(&token, &id, 40_000).await.status(), 200);
    app.api.assert_receives_position(user, 40_000).await;
    assert_eq!(app.stop_session_at(&token, &id, 45_000).await.status(), 204);
    app.api.assert_receives_position(user, 45_000).await;
    assert_eq!(unacked(&app).await, 2.0, "one heartbeat and one stop");
    // The primary took both: the stop ended the session there.
    assert_eq!(position_on(primary.port, user), Some(45_000));
    assert_eq!(app.heartbeat(&token, &id, 46_000).await.status(), 404);
    replica.resume();
    let caught_up = eventually(PATIENCE, async || {
        (position_on(replica.port, user) == Some(45_000)).then_some(())
    })
    .await;
    assert!(caught_up.is_some(), "the replica never caught up");

    // Not an outage: the next session is counted and acknowledged by the replica again.
    let id = app.started_session(&token, "m-0001", "tv").await;
    assert_eq!(app.heartbeat(&token, &id, 50_000).await.status(), 200);
    assert_eq!(position_on(replica.port, user), Some(50_000));
    assert_eq!(unacked(&app).await, 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_replica_at_all_every_position_still_reaches_the_internal_api() {
    let app = spawn_app_with(&[
        ("MONETA_REDIS_MIN_REPLICAS_ACKED", "1"),
        ("MONETA_REDIS_TIMEOUT_MS", PATIENT_MS),
    ])
    .await;
    let user = "load-replicas-none";
    let token = app.token(user, "standard", 2, "KR");
    let id = app.started_session(&token, "m-0001", "tv").await;
    for position in [60_000, 61_000] {
        assert_eq!(app.heartbeat(&token, &id, position).await.status(), 200);
        app.api.assert_receives_position(user, position).await;
    }
    assert_eq!(unacked(&app).await, 2.0);
}

/// Writes that wait for a replica go over connections of their own, so
/// their invalidations reach the in-process copy on the shared connection
/// in no set order with the write's reply: the instance drops its copy of
/// what it wrote itself, and a playback-info right after a heartbeat or a
/// stop answers its position.
///
/// The shared connection (the instance's first) hears Redis 300 ms late
/// here, so every invalidation comes well after the reply of the write that
/// caused it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_written_is_read_back_at_once_through_the_same_instance() {
    let primary = RedisServer::start();
    let _replica = RedisServer::start_replica_of(primary.port);
    let lagging = LaggingProxy::start(primary.port, Duration::from_millis(300)).await;
    let app = spawn_app_with(&[
        ("MONETA_REDIS_URL", &format!("redis://127.0.0.1:{}", lagging.port)),
        ("MONETA_REDIS_MIN_REPLICAS_ACKED", "1"),
        ("MONETA_REDIS_TIMEOUT_MS", PATIENT_MS),
        ("MONETA_REDIS_CLIENT_CACHE_TTL_MS", "3600000"),
    ])
    .await;
    let user = "load-replicas-read-back";
    let token = app.token(user, "standard", 2, "KR");
    let resume = async || app.playback_info_json("m-0001", &token).await["resume_position_ms"].clone();
    for round in 0..3u64 {
        let id = app.started_session(&token, "m-0001", "tv").await;
        for beat in 0..4u64 {
            let position = 1_000_000 + round * 40_000 + beat * 10_000;
            assert_eq!(app.heartbeat(&token, &id, position).await.status(), 200);
            assert_eq!(
                resume().await,
                position,
                "right after heartbeat {beat} of round {round}"
            );
        }
        let stopped = 1_000_000 + round * 40_000 + 35_000;
        assert_eq!(app.stop_session_at(&token, &id, stopped).await.status(), 204);
        assert_eq!(resume().await, stopped, "right after the stop of round {round}");
    }
}

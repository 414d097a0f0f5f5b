//! Redis Cluster mode (`MONETA_REDIS_CLUSTER_URLS`) on a real three-node
//! cluster: every script's keys share one slot, so sessions, the stream limit,
//! heartbeats, positions and cached reads work unchanged.

use serde_json::Value;
use testkit::RedisCluster;

use crate::helpers::spawn_app_with;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_and_playback_on_a_redis_cluster() {
    let cluster = RedisCluster::start(3);
    let urls = cluster.urls();
    let app = spawn_app_with(&[
        ("MONETA_REDIS_CLUSTER_URLS", &urls),
        ("MONETA_CONTENT_LOCAL_TTL_MS", "1"),
        // The last read finds the entitlement cached, however long the test takes.
        ("MONETA_ENTITLEMENT_TTL_S", "3600"),
    ])
    .await;
    let token = app.token("u-basic", "basic", 1, "KR");
    let info = app.playback_info_json("m-0001", &token).await;
    assert_eq!(info["degraded"], false, "{info}");

    let resp = app.start_session(&token, "m-0001", "tv").await;
    assert_eq!(resp.status(), 201);
    let s: Value = resp.json().await.unwrap();
    assert_eq!(
        s["playback"]["degraded"], false,
        "the limit was checked in the cluster"
    );
    assert_eq!(app.start_session(&token, "m-0001", "phone").await.status(), 409);
    let id = s["session_id"].as_str().unwrap();
    assert_eq!(app.heartbeat(&token, id, 4_321_000).await.status(), 200);
    let list = app.sessions(&token).await;
    assert_eq!(list["sessions"].as_array().unwrap().len(), 1);
    assert_eq!(list["degraded"], false);

    let calls = app.api.total_calls();
    let info = app.playback_info_json("m-0001", &token).await;
    assert_eq!(info["resume_position_ms"], 4_321_000);
    assert_eq!(info["degraded"], false);
    assert_eq!(
        app.api.total_calls(),
        calls,
        "title, entitlement and position came from the cluster"
    );
    assert_eq!(app.stop_session(&token, id).await.status(), 204);
    assert_eq!(app.start_session(&token, "m-0001", "phone").await.status(), 201);
}

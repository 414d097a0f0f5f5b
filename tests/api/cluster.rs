//! Redis Cluster mode (`MONETA_REDIS_CLUSTER_URLS`) on a real three-node
//! cluster: every script's keys share one slot (the user's bucket), so
//! sessions, the stream limit, heartbeats, positions and cached reads work
//! unchanged; a heartbeat writes its position and its log entry in one
//! step; every instance drains every bucket's log, on whichever node; the
//! dead-letter commands work on a cluster.

use std::collections::{BTreeMap, BTreeSet};

use redis::cluster::{ClusterClient, ClusterConnection};
use serde_json::Value;
use testkit::RedisCluster;

use crate::delivery::moneta_progress_on;
use crate::helpers::spawn_app_with;
use crate::support::redis_probe::{BUCKETS, bucket, progress_dead, progress_log, user_key};
use crate::support::{PATIENCE, eventually};

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

/// A connection of the test's own to the cluster; it follows redirections.
fn cluster_connection(cluster: &RedisCluster) -> ClusterConnection {
    let nodes: Vec<String> = cluster.nodes.iter().map(|n| n.url.clone()).collect();
    ClusterClient::new(nodes)
        .expect("cluster client")
        .get_connection()
        .expect("the test's own cluster connection")
}

/// The port of the primary serving each bucket, as the cluster itself says
/// (`CLUSTER KEYSLOT`, `CLUSTER SLOTS`).
fn node_of_each_bucket(cluster: &RedisCluster) -> BTreeMap<u16, u16> {
    let client = redis::Client::open(cluster.nodes[0].url.as_str()).expect("node URL");
    let mut node = client.get_connection().expect("node connection");
    let ranges: Vec<Vec<redis::Value>> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query(&mut node)
        .expect("CLUSTER SLOTS");
    let ranges: Vec<(i64, i64, u16)> = ranges
        .iter()
        .map(|range| {
            let int = |v: &redis::Value| redis::from_redis_value_ref::<i64>(v).expect("slot");
            let primary: Vec<redis::Value> = redis::from_redis_value_ref(&range[2]).expect("primary");
            let port = redis::from_redis_value_ref::<u16>(&primary[1]).expect("port");
            (int(&range[0]), int(&range[1]), port)
        })
        .collect();
    (0..BUCKETS)
        .map(|b| {
            let slot: i64 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(progress_log(b))
                .query(&mut node)
                .expect("CLUSTER KEYSLOT");
            let port = ranges
                .iter()
                .find(|(start, end, _)| (*start..=*end).contains(&slot))
                .map(|(_, _, port)| *port)
                .expect("every slot is served");
            (b, port)
        })
        .collect()
}

/// A stream's entries as field → value maps; a progress-log entry's packed
/// item (`i`: `<p> <t> <w> <c> <u>`) is read as those five fields.
fn stream(conn: &mut ClusterConnection, key: &str) -> Vec<BTreeMap<String, String>> {
    let entries: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query(conn)
        .expect("XRANGE");
    entries
        .into_iter()
        .map(|(_, fields)| {
            let mut entry: BTreeMap<String, String> = fields
                .chunks(2)
                .map(|kv| (kv[0].clone(), kv[1].clone()))
                .collect();
            if let Some(packed) = entry.remove("i") {
                for (name, part) in ["p", "t", "w", "c", "u"].into_iter().zip(packed.splitn(5, ' ')) {
                    entry.insert(name.to_owned(), part.to_owned());
                }
            }
            entry
        })
        .collect()
}

/// (entries in every bucket's log, entries read and not settled).
fn logs_left(conn: &mut ClusterConnection) -> (u64, u64) {
    (0..BUCKETS).fold((0, 0), |(len, pending), b| {
        let log = progress_log(b);
        let xlen: u64 = redis::cmd("XLEN").arg(&log).query(conn).expect("XLEN");
        let summary: Vec<redis::Value> = redis::cmd("XPENDING")
            .arg(&log)
            .arg("delivery")
            .query(conn)
            .expect("XPENDING");
        let held: u64 = summary
            .first()
            .and_then(|v| redis::from_redis_value_ref(v).ok())
            .unwrap_or(0);
        (len + xlen, pending + held)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_logs_its_position_in_the_same_step_in_buckets_on_every_node() {
    let cluster = RedisCluster::start(3);
    let urls = cluster.urls();
    // No delivery round within the test: the logs hold what the requests wrote.
    let writer = spawn_app_with(&[
        ("MONETA_REDIS_CLUSTER_URLS", &urls),
        ("MONETA_PROGRESS_FLUSH_MS", "3600000"),
    ])
    .await;
    // Two users in two different buckets on each primary.
    let node_of = node_of_each_bucket(&cluster);
    let mut per_node: BTreeMap<u16, BTreeSet<u16>> = BTreeMap::new();
    let mut users = Vec::new();
    for i in 0..10_000 {
        let user = format!("load-cl-{i}");
        let b = bucket(&user);
        let buckets = per_node.entry(node_of[&b]).or_default();
        if buckets.len() < 2 && buckets.insert(b) {
            users.push(user);
        }
        if users.len() == 6 {
            break;
        }
    }
    assert_eq!(per_node.len(), 3, "buckets on every primary: {per_node:?}");
    assert_eq!(users.len(), 6, "{per_node:?}");

    let mut conn = cluster_connection(&cluster);
    let mut acknowledged = Vec::new();
    for (n, user) in users.iter().enumerate() {
        let token = writer.token(user, "standard", 2, "KR");
        let id = writer.started_session(&token, "m-0001", "tv").await;
        let position = 1_000_000 + n as u64 * 1_000;
        assert_eq!(writer.heartbeat(&token, &id, position).await.status(), 200);
        // Right after the 200, the user's bucket holds the entry, stamped
        // with the same Redis time as the resume position: one script wrote both.
        let stored: String = redis::cmd("HGET")
            .arg(user_key(user, "positions"))
            .arg("m-0001")
            .query(&mut conn)
            .expect("the resume position");
        let (value, at) = stored.split_once('@').expect("<ms>@<time>");
        assert_eq!(value, position.to_string());
        let log = stream(&mut conn, &progress_log(bucket(user)));
        let entry = log
            .iter()
            .find(|e| e.get("u") == Some(user) && e.get("p") == Some(&position.to_string()))
            .unwrap_or_else(|| panic!("no entry for {user} in its bucket's log: {log:?}"));
        assert_eq!(entry.get("c").map(String::as_str), Some("m-0001"));
        assert_eq!(entry.get("t").map(String::as_str), Some(at), "{entry:?}");
        assert_eq!(entry.get("w").map(String::as_str), Some("0"));
        if n == 0 {
            // A stop's final position, likewise (the internal API gets the
            // newest of a user and title).
            let last = position + 500;
            assert_eq!(writer.stop_session_at(&token, &id, last).await.status(), 204);
            let log = stream(&mut conn, &progress_log(bucket(user)));
            assert!(
                log.iter()
                    .any(|e| e.get("u") == Some(user) && e.get("p") == Some(&last.to_string())),
                "{log:?}"
            );
            acknowledged.push((user.clone(), last));
        } else {
            acknowledged.push((user.clone(), position));
        }
    }

    // Any instance delivers every bucket's entries: none owns a bucket.
    let courier = spawn_app_with(&[("MONETA_REDIS_CLUSTER_URLS", &urls)]).await;
    for (user, position) in &acknowledged {
        courier.api.assert_receives_position(user, *position).await;
    }
    let drained = eventually(PATIENCE, async || (logs_left(&mut conn) == (0, 0)).then_some(())).await;
    assert!(drained.is_some(), "left in the logs: {:?}", logs_left(&mut conn));
    assert!(writer.api.delivered().is_empty(), "the writer never ran a round");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_and_replayed_in_cluster_mode() {
    let cluster = RedisCluster::start(3);
    let urls = cluster.urls();
    let app = spawn_app_with(&[("MONETA_REDIS_CLUSTER_URLS", &urls)]).await;
    let users: Vec<String> = ["load-cl-fine", "load-cl-poison"].map(String::from).into();
    let sessions = app.watching(&users).await;
    app.api.fail_user("load-cl-poison", 404);
    for (n, (token, id)) in sessions.iter().enumerate() {
        let resp = app.heartbeat(token, id, 90_000 + n as u64).await;
        assert_eq!(resp.status(), 200);
    }
    app.api.assert_receives_position("load-cl-fine", 90_000).await;

    let mut conn = cluster_connection(&cluster);
    let dead = progress_dead(bucket("load-cl-poison"));
    let buried = eventually(PATIENCE, async || {
        let n: u64 = redis::cmd("XLEN").arg(&dead).query(&mut conn).expect("XLEN");
        (n == 1).then_some(())
    })
    .await;
    assert!(buried.is_some(), "no dead letter in {dead}");

    let listed = moneta_progress_on(
        ("MONETA_REDIS_CLUSTER_URLS", &urls),
        &app.api.url(),
        "dead-letters",
    )
    .await;
    assert_eq!(listed.code, Some(0), "{}", listed.stderr);
    let lines = listed.lines();
    assert_eq!(lines.len(), 1, "{}", listed.stdout);
    assert_eq!(lines[0]["user_id"], "load-cl-poison", "{}", lines[0]);
    assert_eq!(lines[0]["position_ms"], 90_001, "{}", lines[0]);
    assert_eq!(lines[0]["stream"], dead.as_str(), "{}", lines[0]);

    app.api.heal_user("load-cl-poison");
    let replayed = moneta_progress_on(("MONETA_REDIS_CLUSTER_URLS", &urls), &app.api.url(), "replay").await;
    assert_eq!(replayed.code, Some(0), "{}", replayed.stderr);
    assert!(app.api.received_position("load-cl-poison", 90_001));
    let n: u64 = redis::cmd("XLEN").arg(&dead).query(&mut conn).expect("XLEN");
    assert_eq!(n, 0, "a replayed dead letter stayed");
}

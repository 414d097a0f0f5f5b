//! CONTRACT §6, "Resume positions: at-least-once delivery", where the
//! internal API fails some items or all of them, and where Redis loses its
//! data or goes away: an item failing alone ends in the dead letters (and
//! comes back with `moneta progress replay`) while everybody else's
//! positions flow; an API that takes nothing judges nothing; a flushed Redis
//! is mended without tripping its breaker; positions held in memory catch up
//! the resume position Redis holds. What Redis holds is read from Redis.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::{TestApp, spawn_app, spawn_app_with};
use crate::support::redis_probe::{
    LEGACY_DEAD, LEGACY_LOG, LEGACY_PARKED, PROGRESS_GROUP, Progress, bucket, progress_dead, progress_parked,
    user_key,
};
use crate::support::{
    self, Fault, MonetaProcess, PATIENCE, RedisProbe, RedisServer, eventually, metric_value, spawn_fake_api,
};
/// What the contract bounds the wait for a position by, once the internal API answers.
const DELIVERY: Duration = Duration::from_secs(30);
const POISON: &str = r#"moneta_progress_dropped_total{reason="poison"}"#;
const REFUSED: &str = r#"moneta_progress_dropped_total{reason="refused"}"#;
const API_BREAKER: &str = r#"moneta_circuit_breaker_state{dependency="internal_api"}"#;
const REDIS_BREAKER: &str = r#"moneta_circuit_breaker_state{dependency="redis"}"#;
/// The apps' `MONETA_PROGRESS_FLUSH_MS` (tests/api/helpers.rs).
const ROUND: Duration = Duration::from_millis(200);

async fn metric(app: &TestApp, series: &str) -> f64 {
    metric_value(&app.metrics().await, series).unwrap_or(0.0)
}

async fn heartbeat_ok(app: &TestApp, token: &str, session_id: &str, position_ms: u64) {
    let resp = app.heartbeat(token, session_id, position_ms).await;
    assert_eq!(resp.status(), 200, "heartbeat at {position_ms}");
}

async fn assert_delivered(app: &TestApp, user: &str, position_ms: u64) {
    let found = eventually(DELIVERY, async || {
        app.api.received_position(user, position_ms).then_some(())
    })
    .await;
    assert!(
        found.is_some(),
        "{user} at {position_ms} never reached the internal API; it got {:?}",
        app.api.delivered()
    );
}

/// Waits until the progress keys of every bucket hold `n` of `what` in all.
async fn wait_for_total(redis: &mut RedisProbe, what: Progress, n: u64) {
    let reached = eventually(PATIENCE, async || (redis.total(what).await == n).then_some(())).await;
    assert!(
        reached.is_some(),
        "{what:?} never {n}: {}",
        redis.total(what).await
    );
}

/// The dead letters of `user`'s bucket as Redis holds them: each entry's fields.
async fn dead_letters(redis: &mut RedisProbe, user: &str) -> Vec<HashMap<String, String>> {
    let entries: Vec<(String, Vec<String>)> = redis
        .query(
            redis::cmd("XRANGE")
                .arg(progress_dead(bucket(user)))
                .arg("-")
                .arg("+"),
        )
        .await;
    entries
        .into_iter()
        .map(|(_, fields)| {
            fields
                .chunks(2)
                .map(|kv| (kv[0].clone(), kv[1].clone()))
                .collect()
        })
        .collect()
}

/// What a run of the real binary ended with.
pub(crate) struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// stdout, one JSON object per line.
    pub fn lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?} is not one JSON object: {e}")))
            .collect()
    }
}

/// `moneta progress <command>`, the real binary, on the app's settings.
async fn moneta_progress(app: &TestApp, command: &str) -> Run {
    moneta_progress_on(("MONETA_REDIS_URL", &app.redis.url), &app.api.url(), command).await
}

/// `moneta progress <command>` on `redis` (`MONETA_REDIS_URL` or
/// `MONETA_REDIS_CLUSTER_URLS` and its value) and the internal API at `api_url`.
pub(crate) async fn moneta_progress_on(redis: (&str, &str), api_url: &str, command: &str) -> Run {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_moneta"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env(redis.0, redis.1)
        .env("MONETA_INTERNAL_API_URL", api_url)
        .env("MONETA_INTERNAL_API_TOKEN", "internal-token")
        .env("MONETA_JWT_HS256_SECRET", support::DEV_SECRET)
        .args(["progress", command])
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(PATIENCE, run)
        .await
        .unwrap_or_else(|_| panic!("moneta progress {command} kept running"))
        .expect("run moneta progress");
    Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// How the internal API fails one user's items while it takes the others'.
#[derive(Clone, Copy)]
enum ItemFault {
    Status(u16),
    /// Never answered: the delivery times out.
    Hang,
}

impl ItemFault {
    /// What the dead letter records.
    fn error(self) -> String {
        match self {
            ItemFault::Status(status) => format!("status {status}"),
            ItemFault::Hang => "timeout".to_owned(),
        }
    }
}

/// One user's items failed by the internal API while the others' are taken.
async fn an_item_failing_alone_ends_in_the_dead_letters(fault: ItemFault) {
    // A breaker that opens at the first failure it counts: one item's
    // failures must never be counted.
    let app = spawn_app_with(&[("MONETA_INTERNAL_API_BREAKER_FAILURES", "1")]).await;
    let users: Vec<String> = ["load-d1", "load-d2", "load-poison", "load-d3"]
        .map(String::from)
        .into();
    let sessions = app.watching(&users).await;
    match fault {
        ItemFault::Status(status) => app.api.fail_user("load-poison", status),
        ItemFault::Hang => app.api.hang_user("load-poison"),
    }
    for (n, (token, id)) in sessions.iter().enumerate() {
        heartbeat_ok(&app, token, id, 50_000 + n as u64).await;
    }
    for (n, user) in users.iter().enumerate() {
        if user != "load-poison" {
            assert_delivered(&app, user, 50_000 + n as u64).await;
        }
    }

    let mut redis = RedisProbe::connect(&app.redis.url).await;
    wait_for_total(&mut redis, Progress::Dead, 1).await;
    let letters = dead_letters(&mut redis, "load-poison").await;
    let letter = &letters[0];
    assert_eq!(letter["u"], "load-poison", "{letters:?}");
    assert_eq!(letter["c"], "m-0001", "{letters:?}");
    assert_eq!(letter["p"], "50002", "{letters:?}");
    assert_eq!(letter["a"], "5", "MONETA_PROGRESS_MAX_ATTEMPTS: {letters:?}");
    assert_eq!(letter["e"], fault.error(), "{letters:?}");
    // Nothing of it is left behind to be offered again.
    wait_for_total(&mut redis, Progress::Parked, 0).await;
    wait_for_total(&mut redis, Progress::Log, 0).await;
    assert_eq!(metric(&app, POISON).await, 1.0);
    assert_eq!(metric(&app, REFUSED).await, 0.0);
    assert_eq!(
        metric(&app, API_BREAKER).await,
        0.0,
        "one user's items opened the breaker"
    );
    assert!(!app.api.received_position("load-poison", 50_002));

    // Given every chance to be offered again; a slow machine only makes this check weaker.
    let failed = app.api.failed_batches().len();
    tokio::time::sleep(ROUND * 5).await;
    assert_eq!(
        app.api.failed_batches().len(),
        failed,
        "a dead letter is offered again"
    );
    assert_eq!(redis.total(Progress::Dead).await, 1);

    // Others go on being delivered beside it.
    let (token, id) = &sessions[0];
    heartbeat_ok(&app, token, id, 60_000).await;
    assert_delivered(&app, "load-d1", 60_000).await;

    let listed = moneta_progress(&app, "dead-letters").await;
    assert_eq!(listed.code, Some(0), "{}", listed.stderr);
    let lines = listed.lines();
    assert_eq!(lines.len(), 1, "{}", listed.stdout);
    let line = &lines[0];
    assert_eq!(line["user_id"], "load-poison", "{line}");
    assert_eq!(line["content_id"], "m-0001", "{line}");
    assert_eq!(line["position_ms"], 50_002, "{line}");
    assert_eq!(line["attempts"], 5, "{line}");
    assert_eq!(line["last_error"], fault.error(), "{line}");
    assert_eq!(line["stream"], progress_dead(bucket("load-poison")), "{line}");
    assert!(
        line["entry_id"].as_str().is_some_and(|id| !id.is_empty()),
        "{line}"
    );
    assert!(
        line["updated_at"]
            .as_str()
            .is_some_and(|t| chrono::DateTime::parse_from_rfc3339(t).is_ok()),
        "{line}"
    );

    // Still failing: it stays, and the replay says so.
    let replayed = moneta_progress(&app, "replay").await;
    assert_ne!(replayed.code, Some(0), "{}", replayed.stderr);
    assert_eq!(redis.total(Progress::Dead).await, 1);

    app.api.heal_user("load-poison");
    let replayed = moneta_progress(&app, "replay").await;
    assert_eq!(replayed.code, Some(0), "{}", replayed.stderr);
    assert!(app.api.received_position("load-poison", 50_002));
    assert_eq!(redis.total(Progress::Dead).await, 0);
    let listed = moneta_progress(&app, "dead-letters").await;
    assert_eq!((listed.code, listed.stdout.as_str()), (Some(0), ""));
}

#[tokio::test]
async fn an_item_answered_404_alone_ends_in_the_dead_letters_and_replays() {
    an_item_failing_alone_ends_in_the_dead_letters(ItemFault::Status(404)).await;
}

#[tokio::test]
async fn an_item_answered_500_alone_ends_in_the_dead_letters_and_replays() {
    an_item_failing_alone_ends_in_the_dead_letters(ItemFault::Status(500)).await;
}

/// A transport failure alone (the item's batch times out) is the item's
/// fault as much as a status is: split out, never the breaker's business.
#[tokio::test]
async fn an_item_timing_out_alone_ends_in_the_dead_letters_and_replays() {
    an_item_failing_alone_ends_in_the_dead_letters(ItemFault::Hang).await;
}

/// Every delivery fails, the empty batch too: an outage, whatever the status.
async fn nothing_is_judged_while_every_delivery_fails(fault: Fault) {
    let app = spawn_app().await;
    let users: Vec<String> = (0..8).map(|i| format!("load-out-{i}")).collect();
    let sessions = app.watching(&users).await;
    app.api.set_fault(fault);
    for (n, (token, id)) in sessions.iter().enumerate() {
        heartbeat_ok(&app, token, id, 70_000 + n as u64).await;
    }
    let mut redis = RedisProbe::connect(&app.redis.url).await;
    wait_for_total(&mut redis, Progress::Parked, users.len() as u64).await;

    // Far more rounds than MONETA_PROGRESS_MAX_ATTEMPTS, each a few calls,
    // never one per item.
    let calls = app.api.batch_calls();
    let started = Instant::now();
    tokio::time::sleep(ROUND * 15).await;
    let made = app.api.batch_calls() - calls;
    let rounds = (started.elapsed().as_millis() / ROUND.as_millis()) as usize + 2;
    assert!(made <= 3 * rounds, "{made} calls in at most {rounds} rounds");
    assert_eq!(
        redis.total(Progress::Dead).await,
        0,
        "an outage made dead letters"
    );
    assert_eq!(metric(&app, POISON).await, 0.0);
    assert_eq!(metric(&app, REFUSED).await, 0.0);
    assert_eq!(redis.total(Progress::Parked).await, users.len() as u64);

    app.api.set_fault(Fault::None);
    for (n, user) in users.iter().enumerate() {
        assert_delivered(&app, user, 70_000 + n as u64).await;
    }
    wait_for_total(&mut redis, Progress::Parked, 0).await;
    assert_eq!(redis.total(Progress::Dead).await, 0);
    assert_eq!(metric(&app, POISON).await, 0.0);
    assert_eq!(metric(&app, REFUSED).await, 0.0);
}

#[tokio::test]
async fn an_internal_api_failing_everything_is_an_outage_not_poison() {
    nothing_is_judged_while_every_delivery_fails(Fault::Status500).await;
}

#[tokio::test]
async fn a_misconfigured_internal_api_url_is_an_outage_not_poison() {
    nothing_is_judged_while_every_delivery_fails(Fault::NotFound).await;
}

/// Once playback traffic opened the breaker of an internal API that fails
/// everything, the courier keeps offering its positions at every half-open
/// moment. A failed batch may be one item's fault, so it must not count as a
/// sign of life: that would close the breaker and let every player's reads
/// through to the dead API again.
#[tokio::test]
async fn failed_deliveries_never_close_the_breaker_of_an_api_failing_everything() {
    let app = spawn_app().await;
    let sessions = app.watching(&["load-halfopen".to_owned()]).await;
    let (token, id) = &sessions[0];
    app.api.set_fault(Fault::Status500);
    heartbeat_ok(&app, token, id, 80_000).await;
    let mut n = 0;
    let opened = eventually(PATIENCE, async || {
        n += 1;
        let cold = app.token(&format!("load-halfopen-{n}"), "standard", 2, "KR");
        let _ = app.playback_info("m-0001", &cold).await;
        (metric(&app, API_BREAKER).await == 2.0).then_some(())
    })
    .await;
    assert!(opened.is_some(), "the breaker never opened");

    // From here only the courier calls the API: its half-open moments come
    // after 0.5, 1 and 2 s (MONETA_INTERNAL_API_BREAKER_OPEN_MS doubling).
    let mut states = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(4) {
        states.push(metric(&app, API_BREAKER).await);
        tokio::time::sleep(ROUND / 2).await;
    }
    assert!(
        states.iter().all(|s| *s != 0.0),
        "the breaker closed while every call failed: {states:?}"
    );

    app.api.set_fault(Fault::None);
    assert_delivered(&app, "load-halfopen", 80_000).await;
    let closed = eventually(PATIENCE, async || {
        (metric(&app, API_BREAKER).await == 0.0).then_some(())
    })
    .await;
    assert!(closed.is_some(), "the breaker never closed again");
}

#[tokio::test]
async fn redis_flushed_under_delivery_is_mended_without_tripping_its_breaker() {
    let app = spawn_app().await;
    let token = app.token("load-flush", "standard", 2, "KR");
    let id = app.started_session(&token, "m-0001", "tv").await;
    heartbeat_ok(&app, &token, &id, 5_000).await;
    assert_delivered(&app, "load-flush", 5_000).await;

    let mut redis = RedisProbe::connect(&app.redis.url).await;
    let _: () = redis.query(&redis::cmd("FLUSHALL")).await;
    // The courier meets the empty Redis every round meanwhile.
    let mut states = Vec::new();
    for _ in 0..10 {
        states.push(metric(&app, REDIS_BREAKER).await);
        tokio::time::sleep(ROUND).await;
    }
    assert!(states.iter().all(|s| *s == 0.0), "breaker states {states:?}");
    let group = eventually(PATIENCE, async || {
        redis.every_log_has_its_group().await.then_some(())
    })
    .await;
    assert!(group.is_some(), "the groups never came back");

    let id = app.started_session(&token, "m-0001", "phone").await;
    heartbeat_ok(&app, &token, &id, 6_000).await;
    assert_delivered(&app, "load-flush", 6_000).await;
    wait_for_total(&mut redis, Progress::Log, 0).await;
    assert_eq!(metric(&app, REDIS_BREAKER).await, 0.0);
    let ready: Value = app
        .get_anonymously("/health/ready")
        .await
        .json()
        .await
        .expect("readiness JSON");
    assert_eq!(ready["dependencies"]["redis"], "up", "{ready}");
}

#[tokio::test]
async fn positions_held_in_memory_update_the_resume_position_redis_holds() {
    let mut app = spawn_app().await;
    let user = "load-memory";
    let token = app.token(user, "standard", 2, "KR");
    let id = app.started_session(&token, "m-0001", "tv").await;
    heartbeat_ok(&app, &token, &id, 1_000_000).await;
    assert_delivered(&app, user, 1_000_000).await;

    let port = app.redis.port;
    app.redis.kill();
    heartbeat_ok(&app, &token, &id, 2_000_000).await;
    // The internal API takes it from memory while Redis is away.
    assert_delivered(&app, user, 2_000_000).await;

    app.redis = RedisServer::start_on(port);
    let mut redis = RedisProbe::connect(&app.redis.url).await;
    let positions = user_key(user, "positions");
    let written = eventually(PATIENCE, async || {
        let value: Option<String> = redis
            .query(redis::cmd("HGET").arg(&positions).arg("m-0001"))
            .await;
        value.filter(|v| v.starts_with("2000000@"))
    })
    .await;
    assert!(
        written.is_some(),
        "the resume position Redis holds never caught up"
    );
    // Delivered already: it needs no entry in the log.
    assert_eq!(redis.total(Progress::Log).await, 0);
    let info = app.playback_info_json("m-0001", &token).await;
    assert_eq!(info["resume_position_ms"], 2_000_000, "{info}");
}

/// One command through `redis-cli -c` (it follows the cluster's redirections).
fn cluster_cli(cluster: &testkit::RedisCluster, args: &[&str]) -> String {
    let port = cluster.nodes[0].port.to_string();
    let output = testkit::run(
        std::process::Command::new(testkit::require_binary("redis-cli"))
            .args(["-c", "-p", &port])
            .args(args),
        "redis-cli -c",
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_held_in_memory_come_back_to_a_redis_cluster() {
    let cluster = testkit::RedisCluster::start(3);
    let urls = cluster.urls();
    let app = crate::helpers::spawn_app_with(&[("MONETA_REDIS_CLUSTER_URLS", &urls)]).await;
    let user = "load-cluster";
    let token = app.token(user, "standard", 2, "KR");
    let id = app.started_session(&token, "m-0001", "tv").await;
    heartbeat_ok(&app, &token, &id, 1_000_000).await;
    assert_delivered(&app, user, 1_000_000).await;

    // Neither Redis nor the internal API takes the next position.
    app.api.set_fault(Fault::Status500);
    for node in &cluster.nodes {
        node.pause();
    }
    heartbeat_ok(&app, &token, &id, 2_000_000).await;
    for node in &cluster.nodes {
        node.resume();
    }
    let kept = r#"moneta_fallbacks_total{dependency="redis",kind="heartbeat_unchecked"}"#;
    assert_eq!(
        metric(&app, kept).await,
        1.0,
        "the position was not kept in memory"
    );

    // Back from memory: the resume position and the log entry, parked
    // while the API fails (both in the user's bucket).
    let positions = user_key(user, "positions");
    let parked_key = progress_parked(bucket(user));
    let back = eventually(PATIENCE, async || {
        let value = cluster_cli(&cluster, &["HGET", &positions, "m-0001"]);
        let parked = cluster_cli(&cluster, &["HGET", &parked_key, &format!("{user}\nm-0001")]);
        (value.starts_with("2000000@") && parked.contains("\"position_ms\":2000000")).then_some(())
    })
    .await;
    assert!(
        back.is_some(),
        "position {:?}, parked {:?}",
        cluster_cli(&cluster, &["HGET", &positions, "m-0001"]),
        cluster_cli(&cluster, &["HGETALL", &parked_key])
    );
    app.api.set_fault(Fault::None);
    assert_delivered(&app, user, 2_000_000).await;
    let parked = eventually(PATIENCE, async || {
        (cluster_cli(&cluster, &["HLEN", &parked_key]) == "0").then_some(())
    })
    .await;
    assert!(
        parked.is_some(),
        "{}",
        cluster_cli(&cluster, &["HGETALL", &parked_key])
    );
}

#[tokio::test]
async fn the_progress_commands_fail_in_one_line_when_redis_or_the_api_is_unreachable() {
    let app = spawn_app().await;
    let run = async |redis_url: &str, api_url: &str, command: &str| {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_moneta"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("MONETA_REDIS_URL", redis_url)
            .env("MONETA_INTERNAL_API_URL", api_url)
            .env("MONETA_JWT_HS256_SECRET", support::DEV_SECRET)
            .args(["progress", command])
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(PATIENCE, output)
            .await
            .expect("moneta progress kept running")
            .expect("run moneta progress");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let no_redis = format!("redis://127.0.0.1:{}", support::refused_port());
    let no_api = support::nobody_listens();
    for (redis_url, api_url, command) in [
        (no_redis.as_str(), app.api.url(), "dead-letters"),
        (no_redis.as_str(), app.api.url(), "replay"),
        (app.redis.url.as_str(), no_api.clone(), "replay"),
    ] {
        let (code, stderr) = run(redis_url, &api_url, command).await;
        assert!(code.is_some_and(|c| c != 0), "{command}: exit {code:?}");
        assert_eq!(stderr.trim().lines().count(), 1, "{command}: {stderr}");
    }
}

/// What the key layout before buckets left in Redis at an upgrade: one
/// `{progress}` log with its group, holding an entry nobody read and one an
/// instance read and never settled (it was stopped mid-round), a parked pair
/// and a dead letter. The upgraded courier delivers them all, and the
/// dead-letter commands still list and replay the old stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_layout_before_buckets_left_is_still_delivered() {
    let redis = RedisServer::start();
    let mut probe = RedisProbe::connect(&redis.url).await;
    let now = chrono::Utc::now().timestamp_millis();
    let entry = |stream: &str, user: &str, position: u64| {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(stream).arg("*");
        // The fields the previous version's scripts wrote.
        for (field, value) in [
            ("u", user.to_owned()),
            ("c", "m-0001".to_owned()),
            ("p", position.to_string()),
            ("t", now.to_string()),
            ("w", "0".to_owned()),
        ] {
            cmd.arg(field).arg(value);
        }
        cmd
    };
    let _: () = probe
        .query(
            redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(LEGACY_LOG)
                .arg(PROGRESS_GROUP)
                .arg("0")
                .arg("MKSTREAM"),
        )
        .await;
    let _: String = probe.query(&entry(LEGACY_LOG, "legacy-claimed", 222_000)).await;
    let _: redis::Value = probe
        .query(
            redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(PROGRESS_GROUP)
                .arg("instance-before-the-upgrade")
                .arg("COUNT")
                .arg(1)
                .arg("STREAMS")
                .arg(LEGACY_LOG)
                .arg(">"),
        )
        .await;
    let _: String = probe.query(&entry(LEGACY_LOG, "legacy-fresh", 111_000)).await;
    let parked = serde_json::json!({
        "user_id": "legacy-parked",
        "content_id": "m-0001",
        "position_ms": 333_000,
        "updated_at": chrono::DateTime::from_timestamp_millis(now).expect("now"),
    });
    let _: () = probe
        .query(
            redis::cmd("HSET")
                .arg(LEGACY_PARKED)
                .arg("legacy-parked\nm-0001")
                .arg(format!("{now} {parked}")),
        )
        .await;
    let mut dead = entry(LEGACY_DEAD, "legacy-dead", 444_000);
    let _: String = probe.query(dead.arg("a").arg(5).arg("e").arg("status 404")).await;

    let api = spawn_fake_api().await;
    let _moneta = MonetaProcess::start(&[
        ("MONETA_REDIS_URL", redis.url.clone()),
        ("MONETA_INTERNAL_API_URL", api.url()),
        ("MONETA_PROGRESS_FLUSH_MS", "200".into()),
    ]);
    // The entry read before the upgrade waits its 15 s of idleness before
    // it is taken over: within the contract's bound all the same.
    for (user, position) in [
        ("legacy-fresh", 111_000),
        ("legacy-parked", 333_000),
        ("legacy-claimed", 222_000),
    ] {
        let found = eventually(DELIVERY, async || {
            api.received_position(user, position).then_some(())
        })
        .await;
        assert!(found.is_some(), "{user} never delivered: {:?}", api.delivered());
    }
    let drained = eventually(PATIENCE, async || {
        let log: u64 = probe.count("XLEN", LEGACY_LOG).await;
        let parked: u64 = probe.count("HLEN", LEGACY_PARKED).await;
        let held: u64 = probe
            .consumers(LEGACY_LOG, PROGRESS_GROUP)
            .await
            .iter()
            .map(|(_, n)| n)
            .sum();
        (log + parked + held == 0).then_some(())
    })
    .await;
    assert!(drained.is_some(), "the old log was not drained");

    let listed = moneta_progress_on(("MONETA_REDIS_URL", &redis.url), &api.url(), "dead-letters").await;
    assert_eq!(listed.code, Some(0), "{}", listed.stderr);
    let lines = listed.lines();
    assert_eq!(lines.len(), 1, "{}", listed.stdout);
    assert_eq!(lines[0]["user_id"], "legacy-dead", "{}", lines[0]);
    assert_eq!(lines[0]["stream"], LEGACY_DEAD, "{}", lines[0]);
    let replayed = moneta_progress_on(("MONETA_REDIS_URL", &redis.url), &api.url(), "replay").await;
    assert_eq!(replayed.code, Some(0), "{}", replayed.stderr);
    assert!(api.received_position("legacy-dead", 444_000));
    assert_eq!(probe.count("XLEN", LEGACY_DEAD).await, 0);
}

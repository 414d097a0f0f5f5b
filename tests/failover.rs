//! A Redis Cluster primary dies (SIGKILL) while two real `moneta` processes
//! take heartbeats, and its replica takes over: Moneta keeps answering
//! (never a 5xx), follows the new topology without a restart, and, with
//! `MONETA_REDIS_MIN_REPLICAS_ACKED=1`, every acknowledged position reaches
//! the internal API. The same run with `0` reports what it lost.

#[path = "support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use moneta::sources::redis::keys::key_slot;
use serde_json::Value;
use support::redis_probe::{bucket, user_key};
use support::{
    FakeApi, MonetaProcess, PATIENCE, PublicApi, eventually, eventually_blocking, mint_token, spawn_fake_api,
};
use testkit::RedisCluster;
use testkit::redis::cli;

const TITLE: &str = "m-0001";
/// Users on the primary that dies whose last heartbeat comes right before it dies.
const FROZEN: usize = 16;
/// Users on that primary who keep heartbeating through the failover.
const PROBES: usize = 2;
/// Users on the other primaries.
const CONTROL: usize = 4;

#[derive(Clone)]
struct Viewer {
    user: String,
    token: String,
    session: String,
}

/// The slot of the bucket `user` is in.
fn slot_of(user: &str) -> u16 {
    key_slot(format!("b{}", bucket(user)).as_bytes())
}

/// `n` users of the form `load-fo-<tag>-<i>` (the fake internal API entitles
/// `load-…` users to two streams) whose bucket is, or is not, on `victim`.
fn users(
    cluster: &RedisCluster,
    asked: u16,
    victim: u16,
    on_victim: bool,
    tag: &str,
    n: usize,
) -> Vec<String> {
    let chosen: Vec<String> = (0..10_000)
        .map(|i| format!("load-fo-{tag}-{i}"))
        .filter(|u| (cluster.primary_of_slot(asked, slot_of(u)) == Some(victim)) == on_victim)
        .take(n)
        .collect();
    assert_eq!(chosen.len(), n, "not enough users for {tag}");
    chosen
}

/// The resume position of `user` as the node on `port` holds it.
fn position_on(port: u16, user: &str) -> Option<u64> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
    let mut conn = client.get_connection().ok()?;
    let stored: Option<String> = redis::cmd("HGET")
        .arg(user_key(user, "positions"))
        .arg(TITLE)
        .query(&mut conn)
        .ok()?;
    stored?.split_once('@')?.0.parse().ok()
}

/// Whether the internal API received exactly this position of `user`.
fn received(api: &FakeApi, user: &str, position: u64) -> bool {
    api.received_position(user, position)
}

/// The nodes a failover test gives parts to.
struct Roles {
    /// The primary of `user`'s bucket, which dies.
    victim: u16,
    /// Its replica, which takes over.
    replica: u16,
    /// Another node, asked about the topology while they change.
    survivor: u16,
}

fn roles(cluster: &RedisCluster, user: &str) -> Roles {
    let victim = cluster
        .primary_of_slot(cluster.nodes[0].port, slot_of(user))
        .expect("a primary serves every slot");
    let replica = *cluster
        .replicas_of(victim)
        .first()
        .expect("the victim has a replica");
    let survivor = cluster
        .nodes
        .iter()
        .map(|n| n.port)
        .find(|p| *p != victim && *p != replica)
        .expect("another node");
    Roles {
        victim,
        replica,
        survivor,
    }
}

/// What one run saw.
struct Report {
    acknowledged: usize,
    lost: Vec<String>,
    /// From the kill until a start on the dead primary's slots was counted again.
    window: Duration,
    /// Answers of the probes' heartbeats during the failover, by status.
    statuses: BTreeMap<u16, usize>,
    slowest_heartbeat: Duration,
    unacked: f64,
}

async fn start_viewers(instances: &[PublicApi], users: &[String]) -> Vec<Viewer> {
    let mut viewers = Vec::new();
    for (i, user) in users.iter().enumerate() {
        let token = mint_token(user, "standard", 2, "KR");
        let session = instances[i % 2].started_session(&token, TITLE, "tv").await;
        viewers.push(Viewer {
            user: user.clone(),
            token,
            session,
        });
    }
    viewers
}

/// One heartbeat per viewer, all at once, through alternating instances;
/// every one must be answered 200. Returns (user, position) acknowledged.
async fn burst(instances: &[PublicApi], viewers: &[Viewer], round: u64) -> Vec<(String, u64)> {
    let mut tasks = tokio::task::JoinSet::new();
    for (i, v) in viewers.iter().enumerate() {
        let public = instances[(i + round as usize) % 2].clone();
        let (user, token, session) = (v.user.clone(), v.token.clone(), v.session.clone());
        let position = round * 100_000 + i as u64;
        tasks.spawn(async move {
            let status = public.heartbeat(&token, &session, position).await.status();
            (user, position, status)
        });
    }
    let mut acknowledged = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (user, position, status) = done.expect("heartbeat task");
        assert_eq!(
            status, 200,
            "heartbeat of {user} at {position} before the failover"
        );
        acknowledged.push((user, position));
    }
    acknowledged
}

async fn failover_with(min_replicas_acked: &str) -> Report {
    let mut cluster = RedisCluster::start_with_replicas(3, 1);
    let api = spawn_fake_api().await;
    let env = vec![
        ("MONETA_REDIS_CLUSTER_URLS", cluster.urls()),
        ("MONETA_INTERNAL_API_URL", api.url()),
        ("MONETA_REDIS_MIN_REPLICAS_ACKED", min_replicas_acked.to_owned()),
        ("MONETA_PROGRESS_FLUSH_MS", "200".to_owned()),
        ("RUST_LOG", "warn".to_owned()),
    ];
    let a = MonetaProcess::start(&env);
    let b = MonetaProcess::start(&env);
    let instances = [a.public_api(), b.public_api()];

    let Roles {
        victim,
        replica,
        survivor: asked,
    } = roles(&cluster, "load-fo-pick-0");
    let frozen = start_viewers(
        &instances,
        &users(&cluster, asked, victim, true, "frozen", FROZEN),
    )
    .await;
    let probes = start_viewers(&instances, &users(&cluster, asked, victim, true, "probe", PROBES)).await;
    let control = start_viewers(
        &instances,
        &users(&cluster, asked, victim, false, "control", CONTROL),
    )
    .await;

    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    for round in 1..=3 {
        let viewers: Vec<Viewer> = frozen.iter().chain(&probes).chain(&control).cloned().collect();
        last.extend(burst(&instances, &viewers, round).await);
    }
    // Right after those were acknowledged.
    let killed = Instant::now();
    cluster.kill(victim);

    // The probes keep watching through the failover, through both instances.
    let watching = Arc::new(AtomicBool::new(true));
    let mut probe_tasks = tokio::task::JoinSet::new();
    for (i, v) in probes.iter().enumerate() {
        let (user, token, session) = (v.user.clone(), v.token.clone(), v.session.clone());
        let instances = instances.clone();
        let watching = watching.clone();
        probe_tasks.spawn(async move {
            let mut seen = Vec::new();
            let mut position = 1_000_000 + i as u64;
            while watching.load(Ordering::Relaxed) {
                position += 1_000;
                let asked_at = Instant::now();
                let status = instances[(position / 1_000) as usize % 2]
                    .heartbeat(&token, &session, position)
                    .await
                    .status()
                    .as_u16();
                seen.push((position, status, asked_at.elapsed()));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (user, seen)
        });
    }

    let promoted = eventually_blocking(PATIENCE, || {
        (cli(replica, &["INFO", "replication"]).contains("role:master")
            && cli(replica, &["CLUSTER", "INFO"]).contains("cluster_state:ok")
            && cli(asked, &["CLUSTER", "INFO"]).contains("cluster_state:ok"))
        .then_some(())
    });
    assert!(
        promoted.is_some(),
        "the replica {replica} never took over from {victim}"
    );

    // Both instances follow the new topology: a start on the dead primary's
    // slots is counted again (not degraded), and its heartbeat is on the new primary.
    let fresh = users(&cluster, asked, replica, true, "after", 2);
    let mut window = Duration::ZERO;
    for (i, user) in fresh.iter().enumerate() {
        let public = &instances[i % 2];
        let token = mint_token(user, "standard", 2, "KR");
        let counted = eventually(PATIENCE, async || {
            let resp = public.start_session(&token, TITLE, "tv").await;
            assert!(resp.status().as_u16() < 500, "a start answered {}", resp.status());
            let body: Value = resp.json().await.ok()?;
            (body["playback"]["degraded"] == false).then(|| body["session_id"].as_str().map(str::to_owned))?
        })
        .await;
        let session = counted.unwrap_or_else(|| {
            let output = [&a, &b][i].output();
            let tail = &output[output.len().saturating_sub(3_000)..];
            panic!("instance {i} never counted a start on the new primary again:\n{tail}")
        });
        window = window.max(killed.elapsed());
        let heartbeat = public.heartbeat(&token, &session, 777_000).await;
        assert_eq!(heartbeat.status(), 200);
        let answer: Value = heartbeat.json().await.unwrap_or_default();
        let recorded = position_on(replica, user);
        if recorded != Some(777_000) {
            let output = [&a, &b][i].output();
            let tail = &output[output.len().saturating_sub(4_000)..];
            panic!(
                "the heartbeat is not recorded on the new primary ({recorded:?}; answered {answer}):\n{tail}"
            );
        }
        last.insert(user.clone(), 777_000);
    }

    watching.store(false, Ordering::Relaxed);
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    let mut slowest_heartbeat = Duration::ZERO;
    while let Some(done) = probe_tasks.join_next().await {
        let (user, seen) = done.expect("probe task");
        for (position, status, took) in &seen {
            *statuses.entry(*status).or_default() += 1;
            slowest_heartbeat = slowest_heartbeat.max(*took);
            if *status == 200 {
                last.insert(user.clone(), *position);
            }
        }
    }

    // Every position is delivered within the contract's bound, or lost.
    let _ = eventually(Duration::from_secs(30), async || {
        last.iter().all(|(u, p)| received(&api, u, *p)).then_some(())
    })
    .await;
    let lost: Vec<String> = last
        .iter()
        .filter(|(u, p)| !received(&api, u, **p))
        .map(|(u, p)| format!("{u}@{p}"))
        .collect();
    let series = r#"moneta_fallbacks_total{dependency="redis",kind="replicas_unacked"}"#;
    let unacked = support::metric_value(&a.metrics().await, series).unwrap_or(0.0)
        + support::metric_value(&b.metrics().await, series).unwrap_or(0.0);
    Report {
        acknowledged: last.len(),
        lost,
        window,
        statuses,
        slowest_heartbeat,
        unacked,
    }
}

fn print(label: &str, r: &Report) {
    println!(
        "failover ({label}): last acknowledged positions {}, lost {} {:?}; \
         window until starts are counted again {:?}; probe heartbeats during it by status {:?}, \
         slowest {:?}; replicas_unacked fallbacks {}",
        r.acknowledged,
        r.lost.len(),
        r.lost,
        r.window,
        r.statuses,
        r.slowest_heartbeat,
        r.unacked
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_replica_acknowledging_a_failover_loses_nothing() {
    let report = failover_with("1").await;
    print("MIN_REPLICAS_ACKED=1", &report);
    assert!(
        report.statuses.keys().all(|s| *s == 200),
        "heartbeats during the failover: {:?}",
        report.statuses
    );
    assert!(report.lost.is_empty(), "acknowledged and lost: {:?}", report.lost);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_waiting_for_replicas_a_failover_keeps_answering_and_reports_its_losses() {
    let report = failover_with("0").await;
    print("MIN_REPLICAS_ACKED=0", &report);
    assert!(
        report.statuses.keys().all(|s| *s == 200),
        "heartbeats during the failover: {:?}",
        report.statuses
    );
}

/// The only seed node Moneta was given dies, and its replica takes over:
/// Moneta connects again through the nodes of the topology it last saw, so
/// answers are fresh and the limit counts again without that node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_seed_node_is_not_needed_to_connect_again() {
    let mut cluster = RedisCluster::start_with_replicas(3, 1);
    let api = spawn_fake_api().await;
    let Roles {
        victim,
        replica,
        survivor: asked,
    } = roles(&cluster, "load-fo-seed-0");
    let seed = cluster
        .nodes
        .iter()
        .find(|n| n.port == victim)
        .map(|n| n.url.clone())
        .expect("the victim's URL");
    let moneta = MonetaProcess::start(&[
        ("MONETA_REDIS_CLUSTER_URLS", seed),
        ("MONETA_INTERNAL_API_URL", api.url()),
        ("RUST_LOG", "warn".to_owned()),
    ]);
    let public = moneta.public_api();
    let fresh = async |user: &str| {
        let token = mint_token(user, "standard", 2, "KR");
        let info = public.playback_info_json(TITLE, &token).await;
        info["degraded"] == false
    };
    let before = eventually(PATIENCE, async || fresh("load-fo-seed-0").await.then_some(())).await;
    assert!(before.is_some(), "never fresh with the seed alive");

    cluster.kill(victim);
    let promoted = eventually_blocking(PATIENCE, || {
        (cli(replica, &["INFO", "replication"]).contains("role:master")
            && cli(asked, &["CLUSTER", "INFO"]).contains("cluster_state:ok"))
        .then_some(())
    });
    assert!(promoted.is_some(), "the replica {replica} never took over");

    // Users on the promoted replica's slots and on the others'.
    let on_replica = users(&cluster, asked, replica, true, "seed-after", 1);
    let elsewhere = users(&cluster, asked, replica, false, "seed-other", 1);
    for user in on_replica.iter().chain(&elsewhere) {
        let again = eventually(PATIENCE, async || fresh(user).await.then_some(())).await;
        if again.is_none() {
            let output = moneta.output();
            let tail = &output[output.len().saturating_sub(3_000)..];
            panic!("never fresh again for {user} without the seed:\n{tail}");
        }
        let token = mint_token(user, "standard", 2, "KR");
        for device in ["tv", "phone"] {
            assert_eq!(public.start_session(&token, TITLE, device).await.status(), 201);
        }
        let third = public.start_session(&token, TITLE, "laptop").await;
        assert_eq!(third.status(), 409, "the limit counts again for {user}");
    }
}

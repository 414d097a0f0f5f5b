//! Several real `moneta` processes on one redis-server and one internal API,
//! as a deployment runs them: clocks that disagree, instances killed with
//! SIGKILL after they acknowledged positions, the drain on SIGTERM, and a
//! chaos run in which no acknowledged resume position may be lost.

#[path = "support/mod.rs"]
mod support;

use std::collections::{BTreeMap, HashSet};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use reqwest::Method;
use serde_json::{Value, json};
use support::redis_probe::{PROGRESS_LOG, RedisProbe};
use support::{
    FakeApi, Fault, MonetaProcess, PATIENCE, PublicApi, RedisServer, assert_error, eventually,
    eventually_blocking, faketime, metric_value, mint_token, signal, spawn_fake_api,
};

const TITLE: &str = "m-0001";
/// The contract's bound for delivering a position once the internal API is reachable.
const DELIVERY_BOUND: Duration = Duration::from_secs(30);
/// The progress log's consumer group, which every instance reads in.
const PROGRESS_GROUP: &str = "delivery";

/// What the instances of one deployment share: a redis-server and the
/// (fake) internal API.
struct Deployment {
    redis: RedisServer,
    api: FakeApi,
}

impl Deployment {
    async fn start() -> Deployment {
        Deployment {
            redis: RedisServer::start(),
            api: spawn_fake_api().await,
        }
    }

    /// An instance's settings: the shared dependencies, then `extra`.
    fn env(&self, extra: &[(&'static str, String)]) -> Vec<(&'static str, String)> {
        let mut envs = vec![
            ("MONETA_REDIS_URL", self.redis.url.clone()),
            ("MONETA_INTERNAL_API_URL", self.api.url()),
        ];
        envs.extend(extra.iter().cloned());
        envs
    }

    /// One more instance of the deployment.
    fn member(&self, extra: &[(&'static str, String)]) -> MonetaProcess {
        MonetaProcess::start(&self.env(extra))
    }
}

/// SIGKILL: no shutdown code of the process runs.
fn kill(process: MonetaProcess) {
    signal(process.pid(), "KILL");
    drop(process);
}

/// A user watching `TITLE` in one session.
#[derive(Clone)]
struct Viewer {
    user: String,
    token: String,
    session: String,
}

/// `n` users (the fake internal API entitles every `load-…` user to two
/// streams), each with a session started through `public`.
async fn start_viewers(public: &PublicApi, prefix: &str, n: usize) -> Vec<Viewer> {
    let mut viewers = Vec::with_capacity(n);
    for i in 0..n {
        let user = format!("load-{prefix}-{i:02}");
        let token = mint_token(&user, "standard", 2, "KR");
        let session = public.started_session(&token, TITLE, "tv").await;
        viewers.push(Viewer { user, token, session });
    }
    viewers
}

/// `rounds` heartbeats per viewer, every one of which must be acknowledged;
/// returns each user's last acknowledged position.
async fn acknowledged_heartbeats(
    public: &PublicApi,
    viewers: &[Viewer],
    rounds: u64,
) -> BTreeMap<String, u64> {
    let mut last = BTreeMap::new();
    for round in 1..=rounds {
        for (i, v) in viewers.iter().enumerate() {
            let position = round * 10_000 + i as u64;
            let status = public.heartbeat(&v.token, &v.session, position).await.status();
            assert_eq!(status, 200, "heartbeat of {} at {position}", v.user);
            last.insert(v.user.clone(), position);
        }
    }
    last
}

/// The users whose `last` position the internal API has not received.
fn undelivered(api: &FakeApi, last: &BTreeMap<String, u64>) -> Vec<String> {
    let received: HashSet<(String, u64)> = api
        .delivered()
        .iter()
        .filter_map(|i| Some((i["user_id"].as_str()?.to_owned(), i["position_ms"].as_u64()?)))
        .collect();
    last.iter()
        .filter(|(user, position)| !received.contains(&((*user).clone(), **position)))
        .map(|(user, position)| format!("{user}@{position}"))
        .collect()
}

/// Waits the contract's bound for every user's last position to reach the
/// internal API; returns how long that took.
async fn assert_all_delivered(api: &FakeApi, last: &BTreeMap<String, u64>, context: &str) -> Duration {
    let waiting = Instant::now();
    let done = eventually(DELIVERY_BOUND, async || {
        undelivered(api, last).is_empty().then_some(())
    })
    .await;
    assert!(
        done.is_some(),
        "{context}: acknowledged positions never reached the internal API: {:?}",
        undelivered(api, last)
    );
    waiting.elapsed()
}

/// (entries read by some instance and not settled, entries in the log).
async fn progress_log_state(redis: &RedisServer) -> (u64, u64) {
    let mut probe = RedisProbe::connect(&redis.url).await;
    // Until a courier creates the group, nobody has read anything.
    let pending = if probe
        .groups(PROGRESS_LOG)
        .await
        .iter()
        .any(|g| g == PROGRESS_GROUP)
    {
        probe
            .consumers(PROGRESS_LOG, PROGRESS_GROUP)
            .await
            .iter()
            .map(|(_, held)| held)
            .sum()
    } else {
        0
    };
    (pending, probe.count("XLEN", PROGRESS_LOG).await)
}

/// How far ahead of this machine's clock `public`'s clock is, read from the
/// `Date` header it sends (whole seconds).
async fn clock_lead_s(public: &PublicApi) -> i64 {
    let response = public.get_anonymously("/health/live").await;
    let date = &response.headers()["date"];
    let date = date.to_str().expect("a Date header in ASCII");
    let theirs = DateTime::parse_from_rfc2822(date).unwrap_or_else(|e| panic!("Date {date:?}: {e}"));
    theirs.timestamp() - Utc::now().timestamp()
}

fn session_ids(list: &Value) -> Vec<String> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["session_id"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_whose_clocks_differ_by_minutes_agree_on_the_stream_limit() {
    let fleet = Deployment::start().await;
    let api = &fleet.api;
    let honest_process = fleet.member(&[]);
    let skewed_process = fleet.member(&faketime::skewed_clock("+150s"));
    let (honest, skewed) = (honest_process.public_api(), skewed_process.public_api());

    // Without a clock that really is ahead, every check below would pass vacuously.
    let lead = clock_lead_s(&skewed).await;
    assert!(
        (120..=180).contains(&lead),
        "the skewed instance's clock leads by {lead} s, not ~150 s"
    );
    let honest_lead = clock_lead_s(&honest).await;
    assert!(
        honest_lead.abs() <= 30,
        "the honest instance's clock leads by {honest_lead} s"
    );

    for (user, first, second) in [
        ("clock-honest-first", &honest, &skewed),
        ("clock-skewed-first", &skewed, &honest),
    ] {
        api.state.entitlements.lock().unwrap().insert(
            user.to_owned(),
            json!({"user_id": user, "plan": "basic", "max_streams": 1, "active": true}),
        );
        let token = mint_token(user, "basic", 1, "KR");
        let asked = Utc::now();
        let started = first.start_session(&token, TITLE, "device-a").await;
        assert_eq!(started.status(), 201, "{user}: first start");
        let started: Value = started.json().await.unwrap();
        let session = started["session_id"].as_str().expect("session_id").to_owned();
        // The session lives 90 s from Redis' clock; an instance's own clock
        // would put the expiry 150 s further out on the skewed one.
        let expires_at = started["expires_at"].as_str().expect("expires_at");
        let expires_in = (DateTime::parse_from_rfc3339(expires_at)
            .expect("RFC 3339")
            .with_timezone(&Utc)
            - asked)
            .num_seconds();
        assert!(
            (85..=150).contains(&expires_in),
            "{user}: expires_at {expires_at} is {expires_in} s after the start, not ~90 s by Redis' clock"
        );

        let refused = assert_error(
            second.start_session(&token, TITLE, "device-b").await,
            409,
            "stream_limit_reached",
        )
        .await;
        assert_eq!(
            session_ids(&refused["error"]["active_sessions"]),
            std::slice::from_ref(&session),
            "{user}: the live session is the one refusing the start: {refused}"
        );
        // A heartbeat through the other instance keeps the same session live for both.
        assert_eq!(
            second.heartbeat(&token, &session, 5_000).await.status(),
            200,
            "{user}"
        );
        assert_error(
            first.start_session(&token, TITLE, "device-b").await,
            409,
            "stream_limit_reached",
        )
        .await;
        for (name, public) in [("first", first), ("second", second)] {
            let listed = public.sessions(&token).await;
            assert_eq!(
                session_ids(&listed["sessions"]),
                std::slice::from_ref(&session),
                "{user}: {name} instance lists {listed}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_acknowledged_before_a_sigkill_are_delivered_by_another_instance() {
    let fleet = Deployment::start().await;
    let (redis, api) = (&fleet.redis, &fleet.api);
    // This instance's courier first reads the log ten minutes after the start,
    // long after it is killed: only another instance can deliver.
    let doomed = fleet.member(&[("MONETA_PROGRESS_FLUSH_MS", "600000".into())]);
    let public = doomed.public_api();
    let viewers = start_viewers(&public, "kill-unread", 20).await;
    let last = acknowledged_heartbeats(&public, &viewers, 3).await;
    assert!(
        api.delivered().is_empty(),
        "delivered before the kill: {:?}",
        api.delivered()
    );
    assert_eq!(
        progress_log_state(redis).await,
        (0, 60),
        "(read, logged) entries before the kill"
    );

    kill(doomed);
    let _heir = fleet.member(&[]);
    assert_all_delivered(api, &last, "unread entries of a killed instance").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_a_killed_instance_was_delivering_are_taken_over() {
    let fleet = Deployment::start().await;
    let (redis, api) = (&fleet.redis, &fleet.api);
    // The courier waits this long on the hung internal API, holding the
    // entries it read, until the SIGKILL.
    let doomed = fleet.member(&[
        ("MONETA_INTERNAL_API_TIMEOUT_MS", "30000".into()),
        ("MONETA_PROGRESS_FLUSH_MS", "2000".into()),
    ]);
    let public = doomed.public_api();
    // Starts ask the internal API, so they come before it hangs; heartbeats do not.
    let viewers = start_viewers(&public, "kill-held", 20).await;
    api.set_fault(Fault::Hang);
    let last = acknowledged_heartbeats(&public, &viewers, 3).await;

    let held = eventually(PATIENCE, async || {
        let (pending, logged) = progress_log_state(redis).await;
        (pending > 0 && pending == logged).then_some(pending)
    })
    .await;
    assert!(
        held.is_some(),
        "the instance never held every logged entry: (read, logged) = {:?}",
        progress_log_state(redis).await
    );
    // Its post of them is under way, and unanswered.
    let posting = eventually(PATIENCE, async || (api.batch_calls() > 0).then_some(())).await;
    assert!(posting.is_some(), "the instance never posted the entries it read");
    assert!(
        api.delivered().is_empty(),
        "delivered before the kill: {:?}",
        api.delivered()
    );

    kill(doomed);
    api.set_fault(Fault::None);
    let _heir = fleet.member(&[]);
    assert_all_delivered(api, &last, "entries held by a killed instance").await;
    let settled = eventually(PATIENCE, async || {
        (progress_log_state(redis).await.0 == 0).then_some(())
    })
    .await;
    assert!(
        settled.is_some(),
        "entries still held after their delivery: (read, logged) = {:?}",
        progress_log_state(redis).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_then_closes_the_listener_and_exits_0() {
    const DRAIN: Duration = Duration::from_millis(3_000);
    let fleet = Deployment::start().await;
    let mut moneta = fleet.member(&[("MONETA_SHUTDOWN_DRAIN_MS", DRAIN.as_millis().to_string())]);
    let public = moneta.public_api();
    let token = mint_token("u-basic", "basic", 1, "KR");
    assert_eq!(public.playback_info(TITLE, &token).await.status(), 200);
    assert_eq!(public.get_anonymously("/health/ready").await.status(), 200);

    let signalled = Instant::now();
    signal(moneta.pid(), "TERM");
    let unready = eventually(Duration::from_secs(1), async || {
        (public.get_anonymously("/health/ready").await.status() == 503).then_some(())
    })
    .await;
    assert!(
        unready.is_some(),
        "/health/ready did not answer 503 within 1 s of SIGTERM"
    );

    tokio::time::sleep_until((signalled + Duration::from_millis(1_500)).into()).await;
    // A fresh connection, as a load balancer that has not noticed yet opens one.
    let late = PublicApi::new(moneta.base_url());
    let answer = late.playback_info(TITLE, &token).await;
    assert_eq!(
        answer.status(),
        200,
        "1.5 s into a 3 s drain the public API must still answer"
    );

    let port = moneta.port;
    let bound = DRAIN + Duration::from_secs(15);
    let (closed_after, status, output) = tokio::task::spawn_blocking(move || {
        let closed_after = eventually_blocking(bound, || {
            TcpStream::connect(("127.0.0.1", port))
                .is_err()
                .then(|| signalled.elapsed())
        });
        let status = moneta.wait_for_exit(bound.saturating_sub(signalled.elapsed()));
        (closed_after, status, moneta.output())
    })
    .await
    .unwrap();
    let closed_after = closed_after
        .unwrap_or_else(|| panic!("the listener was still open {bound:?} after SIGTERM\n{output}"));
    assert!(
        closed_after >= DRAIN,
        "the listener closed {closed_after:?} after SIGTERM, before the {DRAIN:?} drain was over"
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "exit within {bound:?} of SIGTERM with status 0, got {status:?}\n{output}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_acknowledged_while_redis_was_down_is_delivered_before_the_exit() {
    let mut fleet = Deployment::start().await;
    let api = &fleet.api;
    // Only the shutdown can deliver within this test.
    let mut moneta = fleet.member(&[("MONETA_PROGRESS_FLUSH_MS", "600000".into())]);
    let public = moneta.public_api();
    let viewer = start_viewers(&public, "redis-down", 1).await.remove(0);

    fleet.redis.kill();
    let answer = public.heartbeat(&viewer.token, &viewer.session, 61_000).await;
    assert_eq!(
        answer.status(),
        200,
        "a heartbeat while Redis is down is still acknowledged"
    );
    let kept_in_memory = metric_value(
        &moneta.metrics().await,
        r#"moneta_fallbacks_total{dependency="redis",kind="heartbeat_unchecked"}"#,
    );
    assert_eq!(
        kept_in_memory,
        Some(1.0),
        "the position went by the Redis-down path"
    );
    assert!(
        api.delivered().is_empty(),
        "delivered before SIGTERM: {:?}",
        api.delivered()
    );

    let (status, output) = tokio::task::spawn_blocking(move || (moneta.terminate(PATIENCE), moneta.output()))
        .await
        .unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "exit status {status:?}\n{output}"
    );
    let last = BTreeMap::from([(viewer.user, 61_000)]);
    assert_eq!(
        undelivered(api, &last),
        Vec::<String>::new(),
        "lost on SIGTERM\n{output}"
    );
}

/// A small deterministic generator, so a failing chaos run can be replayed from its seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n.max(1)
    }
}

/// Base URLs of the fleet's members by slot; `None` while that slot is down.
type Roster = Arc<Mutex<Vec<Option<String>>>>;

fn live_members(roster: &Roster) -> Vec<String> {
    roster.lock().unwrap().iter().flatten().cloned().collect()
}

/// What one player saw during the chaos run.
#[derive(Default)]
struct Tally {
    user: String,
    last_acknowledged: Option<u64>,
    acknowledged: usize,
    /// Heartbeats that never got an answer (the instance died under them).
    unanswered: usize,
    /// Answers other than 200, by status.
    other: BTreeMap<u16, usize>,
}

/// Heartbeats every ~250 ms through a random live member until `until`.
async fn play(viewer: Viewer, roster: Roster, client: reqwest::Client, until: Instant, seed: u64) -> Tally {
    let mut rng = Rng(seed);
    let mut tally = Tally {
        user: viewer.user.clone(),
        ..Tally::default()
    };
    let body = |position: u64| json!({"position_ms": position, "state": "playing"});
    for beat in 1..=400u64 {
        if Instant::now() >= until {
            break;
        }
        let live = live_members(&roster);
        if let Some(address) = live.get(rng.below(live.len())) {
            let public = PublicApi {
                address: address.clone(),
                client: client.clone(),
            };
            let position = beat * 1_000;
            let path = format!("/v1/playback/sessions/{}", viewer.session);
            let request = public.request(Method::PUT, &path, Some(&viewer.token));
            match request.json(&body(position)).send().await {
                Ok(r) if r.status() == 200 => {
                    tally.acknowledged += 1;
                    tally.last_acknowledged = Some(position);
                }
                Ok(r) => *tally.other.entry(r.status().as_u16()).or_default() += 1,
                Err(_) => tally.unanswered += 1,
            }
        }
        tokio::time::sleep(Duration::from_millis(150 + rng.below(200) as u64)).await;
    }
    tally
}

/// The disturbances, at these offsets from the start of the run.
#[derive(Debug, Clone, Copy)]
enum Disturbance {
    /// SIGKILL of this many random live members, restarted on fresh ports
    /// after `DOWNTIME`.
    Crash(usize),
    /// SIGKILL of every member, for good.
    KillAll,
    Api(Fault),
}

const MEMBERS: usize = 3;
const RUN_MS: u64 = 20_000;
const BALANCER_LAG: Duration = Duration::from_millis(300);
const DOWNTIME: Duration = Duration::from_millis(700);

fn chaos_script() -> Vec<(u64, Disturbance)> {
    use Disturbance::*;
    vec![
        (2_000, Crash(1)),
        (4_000, Api(Fault::Status500)),
        (6_000, Crash(1)),
        (8_000, Api(Fault::Hang)),
        (10_000, Crash(2)),
        (12_500, Api(Fault::None)),
        (14_000, Crash(1)),
        (16_000, Api(Fault::Status500)),
        (17_000, Api(Fault::None)),
        // The last positions meet a hung internal API: at the end they are
        // in the log, read by a courier that is waiting, or parked.
        (18_000, Api(Fault::Hang)),
        (18_500, Crash(1)),
        (RUN_MS, KillAll),
    ]
}

/// SIGKILLs `n` random live members; returns their slots once the
/// balancer (the roster) has noticed they are gone.
fn kill_some(members: &mut [Option<MonetaProcess>], roster: &Roster, n: usize, rng: &mut Rng) -> Vec<usize> {
    let mut victims = Vec::new();
    for _ in 0..n {
        let live: Vec<usize> = (0..members.len()).filter(|i| members[*i].is_some()).collect();
        let Some(&slot) = live.get(rng.below(live.len())) else {
            break;
        };
        if let Some(process) = members[slot].take() {
            kill(process);
        }
        victims.push(slot);
    }
    // Players go on calling a dead member until the balancer notices.
    std::thread::sleep(BALANCER_LAG);
    for slot in &victims {
        roster.lock().unwrap()[*slot] = None;
    }
    victims
}

/// Runs the script against the members (SIGKILL of random live ones,
/// restarts on fresh ports, internal API faults); returns the members and
/// what it did.
fn disturb(
    mut members: Vec<Option<MonetaProcess>>,
    roster: Roster,
    api: FakeApi,
    envs: Vec<(&'static str, String)>,
    started: Instant,
    seed: u64,
) -> (Vec<Option<MonetaProcess>>, Vec<String>) {
    let mut rng = Rng(seed);
    let mut journal = Vec::new();
    for (at_ms, step) in chaos_script() {
        let at = started + Duration::from_millis(at_ms);
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        match step {
            Disturbance::Crash(n) => {
                let victims = kill_some(&mut members, &roster, n, &mut rng);
                journal.push(format!("{at_ms}ms SIGKILL {victims:?}"));
                std::thread::sleep(DOWNTIME);
                for slot in victims {
                    let process = MonetaProcess::start(&envs);
                    roster.lock().unwrap()[slot] = Some(process.base_url());
                    members[slot] = Some(process);
                }
            }
            Disturbance::KillAll => {
                let victims = kill_some(&mut members, &roster, MEMBERS, &mut rng);
                journal.push(format!("{at_ms}ms SIGKILL {victims:?}, the end"));
            }
            Disturbance::Api(fault) => {
                api.set_fault(fault);
                journal.push(format!("{at_ms}ms internal API {fault:?}"));
            }
        }
    }
    (members, journal)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_chaos_loses_no_acknowledged_position() {
    const USERS: usize = 30;
    let seed = std::env::var("FLEET_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| Utc::now().timestamp_micros() as u64 | 1);
    let fleet = Deployment::start().await;
    let api = &fleet.api;
    let envs = fleet.env(&[
        ("MONETA_PROGRESS_FLUSH_MS", "500".into()),
        // Redis stays up throughout; a busy machine must not make it look
        // unreachable, which would move acknowledgements into memory, the
        // one place the contract lets a SIGKILL lose them.
        ("MONETA_REDIS_TIMEOUT_MS", "5000".into()),
    ]);
    let members: Vec<Option<MonetaProcess>> =
        (0..MEMBERS).map(|_| Some(MonetaProcess::start(&envs))).collect();
    let roster: Roster = Arc::new(Mutex::new(
        members
            .iter()
            .map(|m| m.as_ref().map(MonetaProcess::base_url))
            .collect(),
    ));

    // Sessions start while everything is healthy, each through some member;
    // their ids work through every member (one MONETA_SESSION_SECRET).
    let mut viewers = Vec::with_capacity(USERS);
    for i in 0..USERS {
        let public = PublicApi::new(live_members(&roster)[i % MEMBERS].clone());
        viewers.extend(start_viewers(&public, &format!("chaos{i:02}"), 1).await);
    }

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("HTTP client");
    let started = Instant::now();
    let until = started + Duration::from_millis(RUN_MS);
    let chaos = {
        let (roster, api) = (roster.clone(), api.clone());
        std::thread::spawn(move || disturb(members, roster, api, envs, started, seed))
    };
    let players: Vec<_> = viewers
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            tokio::spawn(play(
                v,
                roster.clone(),
                client.clone(),
                until,
                seed.wrapping_add(i as u64 * 7919),
            ))
        })
        .collect();
    let mut tallies = Vec::with_capacity(USERS);
    for player in players {
        tallies.push(player.await.expect("player task"));
    }
    let (members, journal) = tokio::task::spawn_blocking(move || chaos.join().expect("chaos thread"))
        .await
        .unwrap();
    // The script ended by killing the whole fleet right after the last
    // acknowledged heartbeats.
    assert!(members.iter().all(Option::is_none), "chaos: {journal:?}");
    let last: BTreeMap<String, u64> = tallies
        .iter()
        .filter_map(|t| Some((t.user.clone(), t.last_acknowledged?)))
        .collect();
    let at_the_kill = undelivered(api, &last).len();
    api.set_fault(Fault::None);
    let _survivor = fleet.member(&[]);
    let acknowledged: usize = tallies.iter().map(|t| t.acknowledged).sum();
    let unanswered: usize = tallies.iter().map(|t| t.unanswered).sum();
    let mut other: BTreeMap<u16, usize> = BTreeMap::new();
    for (status, n) in tallies.iter().flat_map(|t| &t.other) {
        *other.entry(*status).or_default() += n;
    }
    let waiting = Instant::now();
    let _ = eventually(DELIVERY_BOUND, async || {
        undelivered(api, &last).is_empty().then_some(())
    })
    .await;
    let seconds = waiting.elapsed().as_secs_f64();
    let lost = undelivered(api, &last);
    println!(
        "fleet chaos: {acknowledged} positions acknowledged, {} users, {} delivered, {} lost, \
         {seconds:.1} s to deliver ({at_the_kill} last positions undelivered at the kill, \
         {unanswered} heartbeats unanswered, other answers {other:?}, seed {seed})",
        last.len(),
        last.len() - lost.len(),
        lost.len(),
    );
    assert_eq!(last.len(), USERS, "every user had a heartbeat acknowledged");
    // Otherwise the fresh instance would have had nothing to deliver.
    assert!(
        at_the_kill > 0,
        "every last position was delivered before the kill"
    );
    assert!(
        lost.is_empty(),
        "lost acknowledged positions {lost:?}; chaos: {journal:?}"
    );
    assert!(
        other.is_empty(),
        "answers other than 200 to heartbeats: {other:?}; chaos: {journal:?}"
    );
}

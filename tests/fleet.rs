//! Several real `moneta` processes on one redis-server and one internal API,
//! as a deployment runs them: clocks that disagree, instances killed with
//! SIGKILL after they acknowledged positions, the drain on SIGTERM, a Redis
//! that hangs (SIGSTOP) or comes back empty, instances without a shared
//! session secret, and a chaos run in which no acknowledged resume position
//! may be lost.

#[path = "support/mod.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use moneta::sources::redis::keys::key_slot;
use reqwest::Method;
use serde_json::{Value, json};
use support::redis_probe::{RedisProbe, bucket};
use support::{
    FakeApi, Fault, MonetaProcess, PATIENCE, PublicApi, RedisServer, assert_error, eventually,
    eventually_blocking, eventually_every, faketime, metric_value, mint_token, signal, spawn_fake_api,
};
use testkit::RedisCluster;
use testkit::redis::cli;

const TITLE: &str = "m-0001";
/// The contract's bound for delivering a position once the internal API is reachable.
const DELIVERY_BOUND: Duration = Duration::from_secs(30);

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

impl Viewer {
    /// This viewer ending with `position`.
    fn ending(&self, position: u64) -> Ending<'_> {
        Ending {
            user: &self.user,
            token: &self.token,
            position,
        }
    }
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
    let missing = undelivered(api, last);
    assert!(
        done.is_some(),
        "{context}: {} acknowledged positions never reached the internal API, among them {:?}",
        missing.len(),
        missing.iter().take(20).collect::<Vec<_>>()
    );
    waiting.elapsed()
}

/// (entries read by some instance and not settled, entries in the logs),
/// over every bucket.
async fn progress_log_state(redis: &RedisServer) -> (u64, u64) {
    RedisProbe::connect(&redis.url).await.progress_log_state().await
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

/// The series counting acknowledgements answered from memory because Redis
/// did not answer in time.
fn answered_from_memory(metrics: &str, kind: &str) -> f64 {
    let series = format!(r#"moneta_fallbacks_total{{dependency="redis",kind="{kind}"}}"#);
    metric_value(metrics, &series).unwrap_or(0.0)
}

fn updated_at(item: &Value) -> DateTime<Utc> {
    let text = item["updated_at"]
        .as_str()
        .unwrap_or_else(|| panic!("an item without updated_at: {item}"));
    DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|e| panic!("updated_at {text:?}: {e}"))
        .with_timezone(&Utc)
}

/// The items delivered for `user` and `TITLE`, in the order they arrived.
fn delivered_for(api: &FakeApi, user: &str) -> Vec<Value> {
    api.delivered()
        .into_iter()
        .filter(|i| i["user_id"] == user && i["content_id"] == TITLE)
        .collect()
}

/// The position the internal API ends with for `user` and `TITLE`: last
/// write by `updated_at` wins (§5), and of equal ones the one received last.
fn latest_delivered(api: &FakeApi, user: &str) -> Option<u64> {
    let mut latest: Option<(DateTime<Utc>, u64)> = None;
    for item in delivered_for(api, user) {
        let at = updated_at(&item);
        if latest.is_none_or(|(best, _)| at >= best) {
            latest = Some((at, item["position_ms"].as_u64().expect("position_ms")));
        }
    }
    latest.map(|(_, position)| position)
}

/// playback-info's `resume_position_ms` for `TITLE`, `None` unless it
/// answered 200.
async fn resume_position(public: &PublicApi, token: &str) -> Option<u64> {
    let answer = public.playback_info(TITLE, token).await;
    if answer.status() != 200 {
        return None;
    }
    let info: Value = answer.json().await.ok()?;
    info["resume_position_ms"].as_u64()
}

/// What one user should end with: the internal API's latest item and the
/// resume position every instance answers.
struct Ending<'a> {
    user: &'a str,
    token: &'a str,
    position: u64,
}

/// Where `ending` is not what the internal API and playback-info (through
/// each of `publics`) say.
async fn misses(api: &FakeApi, publics: &[PublicApi], endings: &[Ending<'_>]) -> Vec<String> {
    let mut missed = Vec::new();
    for ending in endings {
        let latest = latest_delivered(api, ending.user);
        if latest != Some(ending.position) {
            missed.push(format!(
                "{}: internal API ends with {latest:?}, not {}",
                ending.user, ending.position
            ));
        }
        for public in publics {
            let resume = resume_position(public, ending.token).await;
            if resume != Some(ending.position) {
                missed.push(format!(
                    "{}: playback-info through {} resumes at {resume:?}, not {}",
                    ending.user, public.address, ending.position
                ));
            }
        }
    }
    missed
}

/// Waits the delivery bound for the internal API and playback-info to end
/// with each last acknowledged position, then checks a while later that no
/// older one replaced it (a late write of a stale position lands after the
/// right one was seen).
async fn assert_ends_with(api: &FakeApi, publics: &[PublicApi], endings: &[Ending<'_>], context: &str) {
    let ended = eventually(DELIVERY_BOUND, async || {
        misses(api, publics, endings).await.is_empty().then_some(())
    })
    .await;
    let history = |user: &str| {
        delivered_for(api, user)
            .iter()
            .map(|i| format!("{}@{}", i["position_ms"], i["updated_at"]))
            .collect::<Vec<_>>()
    };
    if ended.is_none() {
        let missed = misses(api, publics, endings).await;
        let histories: Vec<_> = endings.iter().map(|e| history(e.user)).collect();
        panic!("{context}: {missed:?}; delivered: {histories:?}");
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let missed = misses(api, publics, endings).await;
    assert!(
        missed.is_empty(),
        "{context}: an older position came back after the last one: {missed:?}; delivered: {:?}",
        endings.iter().map(|e| history(e.user)).collect::<Vec<_>>()
    );
}

/// What `/health/ready` says of Redis ("up", "down"), or the whole answer
/// when it says nothing of it.
async fn redis_readiness(public: &PublicApi) -> String {
    let answer = public.get_anonymously("/health/ready").await;
    let status = answer.status();
    let body: Value = answer.json().await.unwrap_or(Value::Null);
    match body["dependencies"]["redis"].as_str() {
        Some(redis) => redis.to_owned(),
        None => format!("{status} {body}"),
    }
}

async fn heartbeat_status(public: &PublicApi, viewer: &Viewer, position: u64) -> u16 {
    public
        .heartbeat(&viewer.token, &viewer.session, position)
        .await
        .status()
        .as_u16()
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

/// A ClearKey licence request for the key `clearkey_title` streams under.
const CLEARKEY_KID: &str = "ASOrzQEjq80BI6vNASOrzQ";

/// `TITLE` with a ClearKey stream as well (key id `0123abcd…`).
fn clearkey_title() -> Value {
    let mut title = support::sample_content(TITLE);
    title["streams"].as_array_mut().expect("streams").push(json!({
        "protocol": "dash", "path": "/m-0001/dash/clearkey.mpd",
        "drm": {"system": "clearkey", "key_id": "0123abcd0123abcd0123abcd0123abcd"}
    }));
    title
}

/// The licence proxy's settings, ClearKey from a keys file in `dir`, licence
/// tokens living `ttl_s`.
fn licence_proxy(dir: &std::path::Path, ttl_s: u64) -> Vec<(&'static str, String)> {
    let keys = dir.join("keys.json");
    let file = json!({"keys": [{"key_id": "0123abcd0123abcd0123abcd0123abcd", "key": "6d6f6e6574612d6465762d6b65792121"}]});
    std::fs::write(&keys, file.to_string()).expect("write the keys file");
    vec![
        ("MONETA_DRM_PROXY", "true".into()),
        ("MONETA_DRM_TOKEN_SECRET", "fleet-licence-token-secret".into()),
        ("MONETA_PUBLIC_BASE_URL", "https://play.example.test".into()),
        ("MONETA_DRM_CLEARKEY_KEYS_FILE", keys.display().to_string()),
        ("MONETA_DRM_TOKEN_TTL_S", ttl_s.to_string()),
    ]
}

/// A session started through `public`, and its ClearKey licence token.
async fn licensed_session(public: &PublicApi, user: &str) -> String {
    let token = mint_token(user, "premium", 4, "KR");
    let resp = public.start_session(&token, TITLE, "tv").await;
    assert_eq!(resp.status(), 201, "start of {user}");
    let started: Value = resp.json().await.expect("a JSON start");
    let streams = started["playback"]["streams"].as_array().expect("streams");
    let clearkey = streams.iter().find(|s| s["drm"]["system"] == "clearkey");
    let token = clearkey.and_then(|s| s["drm"]["license_token"].as_str());
    token
        .unwrap_or_else(|| panic!("no ClearKey licence token in {started}"))
        .to_owned()
}

/// A licence token's `iat`, read without checking anything.
fn issued_at(token: &str) -> i64 {
    use base64::Engine;
    let payload = token.split('.').nth(1).expect("a JWS payload");
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url");
    let claims: Value = serde_json::from_slice(&json).expect("JSON claims");
    claims["iat"].as_i64().expect("iat")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_whose_clocks_differ_by_minutes_agree_on_licence_tokens() {
    // Tokens live a minute: five minutes of skew would expire every token
    // minted on one clock at once on the other, or keep it for five more.
    let fleet = Deployment::start().await;
    fleet.api.serve_title(clearkey_title());
    let dir = tempfile::tempdir().expect("tempdir");
    let proxy = licence_proxy(dir.path(), 60);
    let members = [
        ("honest", fleet.member(&proxy)),
        (
            "ahead",
            fleet.member(&[proxy.clone(), faketime::skewed_clock("+5m")].concat()),
        ),
        (
            "behind",
            fleet.member(&[proxy.clone(), faketime::skewed_clock("-5m")].concat()),
        ),
    ];
    let publics: Vec<(&str, PublicApi)> = members.iter().map(|(name, m)| (*name, m.public_api())).collect();
    assert!(
        clock_lead_s(&publics[1].1).await >= 240,
        "the instance ahead is not"
    );
    assert!(
        clock_lead_s(&publics[2].1).await <= -240,
        "the instance behind is not"
    );

    let body = json!({"kids": [CLEARKEY_KID], "type": "temporary"}).to_string();
    for (minter, public) in &publics {
        let token = licensed_session(public, &format!("load-licence-clock-{minter}")).await;
        // Redis runs on this machine's clock.
        let lead = issued_at(&token) - Utc::now().timestamp();
        assert!(
            lead.abs() <= 10,
            "{minter} dated its token {lead} s off Redis' clock"
        );
        for (checker, public) in &publics {
            let request = public.request(Method::POST, "/v1/licenses/clearkey", Some(&token));
            let resp = PublicApi::send(request.body(body.clone())).await;
            assert_eq!(
                resp.status(),
                200,
                "{minter}'s token at {checker}: {}",
                resp.text().await.unwrap_or_default()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_beyond_one_ticks_rounds_drains_without_waiting_for_the_next_tick() {
    // What a flood admitted while the internal API was away leaves: more
    // entries than a tick's 50 rounds read (64 buckets × 50 at most, with
    // rounds of 10), and the next tick ten minutes away.
    const ENTRIES: usize = 10_000;
    let fleet = Deployment::start().await;
    let client = redis::Client::open(fleet.redis.url.as_str()).expect("a Redis URL");
    let mut redis = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to Redis");
    let now_ms = Utc::now().timestamp_millis();
    let mut last = BTreeMap::new();
    for chunk in (0..ENTRIES).collect::<Vec<_>>().chunks(1_000) {
        let mut pipe = redis::pipe();
        for &i in chunk {
            let user = format!("load-backlog-{i:05}");
            let position = 60_000 + i as u64;
            let entry = format!("{position} {now_ms} 0 {TITLE} {user}");
            let log = support::redis_probe::progress_log(support::redis_probe::bucket(&user));
            pipe.cmd("XADD").arg(log).arg("*").arg("i").arg(entry).ignore();
            last.insert(user, position);
        }
        let _: () = pipe.query_async(&mut redis).await.expect("XADD the backlog");
    }
    let _courier = fleet.member(&[
        ("MONETA_PROGRESS_FLUSH_MS", "600000".into()),
        ("MONETA_PROGRESS_BATCH_SIZE", "10".into()),
    ]);
    assert_all_delivered(&fleet.api, &last, "a backlog of many ticks' rounds").await;
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

const POISON: &str = r#"moneta_progress_dropped_total{reason="poison"}"#;

/// One user's batches hang at the internal API while another's are taken,
/// on two instances with `env`: the poison item reaches the dead letters
/// once, and the instances count it once between them, however many of
/// them judged it.
async fn a_poison_item_is_dead_lettered_once(prefix: &str, env: &[(&'static str, String)], judged: Duration) {
    let fleet = Deployment::start().await;
    let members = [fleet.member(env), fleet.member(env)];
    let public = members[0].public_api();
    let viewers = start_viewers(&public, prefix, 2).await;
    let (poison, fine) = (&viewers[0], &viewers[1]);
    fleet.api.hang_user(&poison.user);
    // The internal API takes items: the poison item's failures are its own.
    assert_eq!(heartbeat_status(&public, fine, 40_001).await, 200);
    assert_all_delivered(&fleet.api, &BTreeMap::from([(fine.user.clone(), 40_001)]), prefix).await;
    assert_eq!(heartbeat_status(&public, poison, 40_000).await, 200);

    let mut redis = RedisProbe::connect(&fleet.redis.url).await;
    let buried = eventually(judged, async || {
        (redis.total(support::redis_probe::Progress::Dead).await > 0).then_some(())
    })
    .await;
    assert!(buried.is_some(), "the poison item never reached the dead letters");
    // Every instance that held it has judged it by now (its timeout since);
    // a slow machine only makes this check weaker.
    tokio::time::sleep(judged / 2).await;
    let mut counted = 0.0;
    for member in &members {
        counted += metric_value(&member.metrics().await, POISON).unwrap_or(0.0);
    }
    assert_eq!(
        redis.total(support::redis_probe::Progress::Dead).await,
        1,
        "dead letters"
    );
    assert_eq!(counted, 1.0, "{POISON} summed over the instances");
    assert_eq!(
        (
            redis.total(support::redis_probe::Progress::Parked).await,
            redis.total(support::redis_probe::Progress::Log).await
        ),
        (0, 0),
        "(parked, logged) after the burial"
    );
}

/// Settings for [`a_poison_item_is_dead_lettered_once`]: the internal API's
/// timeout and the attempts an item gets, rounds every 200 ms.
fn poison_settings(timeout_ms: u32, attempts: u32) -> [(&'static str, String); 3] {
    [
        ("MONETA_INTERNAL_API_TIMEOUT_MS", timeout_ms.to_string()),
        ("MONETA_PROGRESS_MAX_ATTEMPTS", attempts.to_string()),
        ("MONETA_PROGRESS_FLUSH_MS", "200".into()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_poison_item_both_instances_judge_is_dead_lettered_and_counted_once() {
    // Parked after its first failure, then sampled by both instances' sweeps
    // within the same hang: both judge it for the last time.
    let env = poison_settings(2_000, 2);
    a_poison_item_is_dead_lettered_once("poison-parked", &env, Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_entry_another_instance_took_over_is_dead_lettered_and_counted_once() {
    // The entry's first reader hangs past the 15 s after which the other
    // instance takes it over: both judge it, the first while the other holds it.
    let env = poison_settings(18_000, 1);
    a_poison_item_is_dead_lettered_once("poison-taken", &env, Duration::from_secs(45)).await;
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

/// Pauses Redis, sends heartbeats through `moneta` until its Redis breaker
/// opens, then a stop at `stop_at`: every one acknowledged from memory, none
/// run by Redis in time. A frozen Redis keeps the calls it was sent and runs
/// them at SIGCONT, after their callers gave up; the heartbeats go on until
/// the breaker opens so that the stop never reaches Redis (a heartbeat Redis
/// ran late would then be the last write Redis saw). Redis stays paused.
async fn acknowledged_during_a_hang(
    redis: &RedisServer,
    moneta: &MonetaProcess,
    viewer: &Viewer,
    stop_at: u64,
) {
    let public = moneta.public_api();
    redis.pause();
    let mut heartbeats = Vec::new();
    let breaker_open = r#"moneta_circuit_breaker_state{dependency="redis"}"#;
    for position in (2_400_000..stop_at).step_by(5_000) {
        heartbeats.push((position, heartbeat_status(&public, viewer, position).await));
        if metric_value(&moneta.metrics().await, breaker_open) == Some(2.0) {
            break;
        }
    }
    let stop = public
        .stop_session_at(&viewer.token, &viewer.session, stop_at)
        .await
        .status();
    let metrics = moneta.metrics().await;
    assert!(
        heartbeats.iter().all(|(_, status)| *status == 200),
        "heartbeats while Redis hangs: {heartbeats:?}"
    );
    assert_eq!(stop, 204, "a stop while Redis hangs");
    assert_eq!(
        metric_value(&metrics, breaker_open),
        Some(2.0),
        "the breaker never opened over {} heartbeats",
        heartbeats.len()
    );
    assert_eq!(
        answered_from_memory(&metrics, "heartbeat_unchecked"),
        heartbeats.len() as f64,
        "every heartbeat was answered from memory, none by Redis in time"
    );
    assert_eq!(answered_from_memory(&metrics, "stop_unchecked"), 1.0);
}

/// The stop `acknowledged_during_a_hang` sends.
const STOPPED_AT: u64 = 2_460_000;

/// One viewer playing through `moneta`, with a heartbeat that went through
/// Redis: the instance learns Redis' clock, which both stamps what it
/// acknowledges from memory and dates the calls Redis may run too late.
async fn playing_through_redis(moneta: &MonetaProcess, prefix: &str) -> Viewer {
    let public = moneta.public_api();
    let viewer = start_viewers(&public, prefix, 1).await.remove(0);
    assert_eq!(heartbeat_status(&public, &viewer, 600_000).await, 200);
    viewer
}

/// The resume position Redis holds for `user` and `TITLE`, `<ms>[:c]@<time>`.
async fn position_in_redis(redis: &RedisServer, user: &str) -> Option<String> {
    let mut probe = RedisProbe::connect(&redis.url).await;
    let key = support::redis_probe::user_key(user, "positions");
    probe.query(redis::cmd("HGET").arg(key).arg(TITLE)).await
}

/// Waits for the stop `acknowledged_during_a_hang` sent to be Redis' resume
/// position, from where any instance delivers it.
async fn assert_stop_reaches_redis(redis: &RedisServer, moneta: &MonetaProcess, viewer: &Viewer) {
    let home = eventually(Duration::from_secs(20), async || {
        let position = position_in_redis(redis, &viewer.user).await?;
        position.starts_with(&format!("{STOPPED_AT}@")).then_some(())
    })
    .await;
    assert!(
        home.is_some(),
        "the stop's position never reached Redis: {:?}\n{}",
        position_in_redis(redis, &viewer.user).await,
        moneta.output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_acknowledged_during_a_redis_hang_is_the_last_word() {
    let fleet = Deployment::start().await;
    let (redis, api) = (&fleet.redis, &fleet.api);
    let moneta = fleet.member(&[]);
    let viewer = playing_through_redis(&moneta, "hang-stop").await;
    acknowledged_during_a_hang(redis, &moneta, &viewer, STOPPED_AT).await;
    redis.resume();
    let ending = viewer.ending(STOPPED_AT);
    assert_ends_with(
        api,
        &[moneta.public_api()],
        &[ending],
        "the stop acknowledged last",
    )
    .await;
}

/// The internal API hangs too, and its calls give up only after a minute:
/// the stop held in memory goes to Redis once Redis answers, not once the
/// internal API does, so the instance may die right after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_held_in_memory_reaches_redis_while_the_internal_api_hangs() {
    let fleet = Deployment::start().await;
    let (redis, api) = (&fleet.redis, &fleet.api);
    let moneta = fleet.member(&[("MONETA_INTERNAL_API_TIMEOUT_MS", "60000".into())]);
    let viewer = playing_through_redis(&moneta, "hang-both").await;
    api.set_fault(Fault::Hang);
    acknowledged_during_a_hang(redis, &moneta, &viewer, STOPPED_AT).await;
    redis.resume();

    assert_stop_reaches_redis(redis, &moneta, &viewer).await;
    kill(moneta);
    api.set_fault(Fault::None);
    let other = fleet.member(&[]);
    let ending = viewer.ending(STOPPED_AT);
    let context = "the stop held in memory, after its instance was killed";
    assert_ends_with(api, &[other.public_api()], &[ending], context).await;
}

/// Deliveries run every ten minutes here: the stop held in memory goes to
/// Redis when Redis answers again, not at the courier's next tick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_held_in_memory_goes_to_redis_when_it_answers_not_at_the_next_delivery() {
    let fleet = Deployment::start().await;
    let redis = &fleet.redis;
    let moneta = fleet.member(&[("MONETA_PROGRESS_FLUSH_MS", "600000".into())]);
    let viewer = playing_through_redis(&moneta, "hang-tick").await;
    acknowledged_during_a_hang(redis, &moneta, &viewer, STOPPED_AT).await;
    redis.resume();
    assert_stop_reaches_redis(redis, &moneta, &viewer).await;
}

/// SIGTERM while Redis hangs: the instance delivers the stop to the internal
/// API, then waits out its grace for Redis, whose resume position would
/// otherwise stay the older one for as long as Redis keeps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_held_in_memory_at_sigterm_reaches_redis_when_it_answers_within_the_grace() {
    let fleet = Deployment::start().await;
    let (redis, api) = (&fleet.redis, &fleet.api);
    // A short drain, and a breaker that opens for half a second at most, so
    // that Redis answers again well within the grace.
    let mut moneta = fleet.member(&[
        ("MONETA_SHUTDOWN_DRAIN_MS", "300".into()),
        ("MONETA_REDIS_BREAKER_OPEN_MAX_MS", "500".into()),
    ]);
    let viewer = playing_through_redis(&moneta, "hang-term").await;
    acknowledged_during_a_hang(redis, &moneta, &viewer, STOPPED_AT).await;
    // Delivered while Redis still hangs: what is left is Redis' resume position.
    api.assert_receives_position(&viewer.user, STOPPED_AT).await;

    signal(moneta.pid(), "TERM");
    tokio::time::sleep(Duration::from_secs(1)).await;
    redis.resume();
    let (status, output) =
        tokio::task::spawn_blocking(move || (moneta.wait_for_exit(PATIENCE), moneta.output()))
            .await
            .unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "exit status {status:?}\n{output}"
    );
    let position = position_in_redis(redis, &viewer.user).await;
    assert!(
        position
            .as_deref()
            .is_some_and(|p| p.starts_with(&format!("{STOPPED_AT}@"))),
        "Redis' resume position after the exit: {position:?}\n{output}"
    );
    let other = fleet.member(&[]);
    let ending = viewer.ending(STOPPED_AT);
    assert_ends_with(api, &[other.public_api()], &[ending], "the stop held at SIGTERM").await;
}

/// The instance that acknowledged a stop while Redis hung delivers it to the
/// internal API and is SIGKILLed before Redis answers again, so Redis keeps
/// the older resume position for as long as it keeps the user's positions.
/// Another instance saw the outage end: it checks positions older than that
/// end against the internal API once, and resumes at the stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_delivered_by_an_instance_killed_during_a_redis_hang_is_where_playback_resumes() {
    let fleet = Deployment::start().await;
    let (redis, api) = (&fleet.redis, &fleet.api);
    let moneta = fleet.member(&[]);
    let other = fleet.member(&[]);
    let viewer = playing_through_redis(&moneta, "hang-killed").await;
    // The older position, read through the other instance before the outage.
    assert_eq!(
        resume_position(&other.public_api(), &viewer.token).await,
        Some(600_000)
    );
    acknowledged_during_a_hang(redis, &moneta, &viewer, STOPPED_AT).await;
    api.assert_receives_position(&viewer.user, STOPPED_AT).await;
    kill(moneta);
    redis.resume();
    let stored = async || position_in_redis(redis, &viewer.user).await;
    resumes_where_the_killed_instance_left(api, &other, &viewer, STOPPED_AT, stored).await;
}

/// The same in a Redis Cluster, where only the primary holding the user's
/// keys hangs: the other instance sees that one primary fail to answer,
/// though every other one does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_cluster_a_position_delivered_by_an_instance_killed_during_a_primary_hang_is_where_playback_resumes()
 {
    const LAST: u64 = 800_000;
    let cluster = RedisCluster::start(3);
    let api = spawn_fake_api().await;
    let env = [
        ("MONETA_REDIS_CLUSTER_URLS", cluster.urls()),
        ("MONETA_INTERNAL_API_URL", api.url()),
    ];
    let moneta = MonetaProcess::start(&env);
    let other = MonetaProcess::start(&env);
    let viewer = playing_through_redis(&moneta, "cluster-hang-killed").await;
    assert_eq!(
        resume_position(&other.public_api(), &viewer.token).await,
        Some(600_000)
    );
    let slot = key_slot(format!("b{}", bucket(&viewer.user)).as_bytes());
    let owner_port = cluster
        .primary_of_slot(cluster.nodes[0].port, slot)
        .expect("a primary serves the user's slot");
    let owner = (cluster.nodes.iter())
        .find(|n| n.port == owner_port)
        .expect("the owner is a node of the cluster");

    owner.pause();
    let public = moneta.public_api();
    for position in [700_000, LAST] {
        let status = heartbeat_status(&public, &viewer, position).await;
        assert_eq!(status, 200, "a heartbeat while the user's primary hangs");
    }
    api.assert_receives_position(&viewer.user, LAST).await;
    kill(moneta);
    owner.resume();
    let key = support::redis_probe::user_key(&viewer.user, "positions");
    let stored = async || {
        let value = cli(owner_port, &["HGET", &key, TITLE]);
        Some(value.trim().to_owned()).filter(|v| !v.is_empty())
    };
    resumes_where_the_killed_instance_left(&api, &other, &viewer, LAST, stored).await;
}

/// A cluster of three primaries, the fake internal API, one Moneta on them,
/// and viewers started through it; the primary of the first viewer is the
/// one a test stops.
struct OnePrimaryOfThree {
    cluster: RedisCluster,
    api: FakeApi,
    moneta: MonetaProcess,
    viewers: Vec<Viewer>,
    hung_port: u16,
}

impl OnePrimaryOfThree {
    async fn start(prefix: &str, viewers: usize) -> Self {
        let cluster = RedisCluster::start(3);
        let api = spawn_fake_api().await;
        let moneta = MonetaProcess::start(&[
            ("MONETA_REDIS_CLUSTER_URLS", cluster.urls()),
            ("MONETA_INTERNAL_API_URL", api.url()),
        ]);
        let viewers = start_viewers(&moneta.public_api(), prefix, viewers).await;
        let mut setup = Self {
            cluster,
            api,
            moneta,
            viewers,
            hung_port: 0,
        };
        setup.hung_port = setup
            .primary_of(&setup.viewers[0].user)
            .expect("a primary serves the first viewer");
        assert!(!setup.others().is_empty(), "every viewer on one primary");
        setup
    }

    fn primary_of(&self, user: &str) -> Option<u16> {
        let slot = key_slot(format!("b{}", bucket(user)).as_bytes());
        self.cluster.primary_of_slot(self.cluster.nodes[0].port, slot)
    }

    /// The viewers on the other primaries.
    fn others(&self) -> Vec<&Viewer> {
        (self.viewers.iter())
            .filter(|v| {
                self.primary_of(&v.user)
                    .is_some_and(|port| port != self.hung_port)
            })
            .collect()
    }

    fn hung(&self) -> &RedisServer {
        (self.cluster.nodes.iter())
            .find(|n| n.port == self.hung_port)
            .expect("the primary is a node of the cluster")
    }
}

/// In a Redis Cluster one primary that hangs holds back only its own users:
/// positions the other primaries' logs hold reach the internal API while it
/// hangs, not once it answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_cluster_positions_on_the_other_primaries_are_delivered_while_one_primary_hangs() {
    const AT: u64 = 900_000;
    let setup = OnePrimaryOfThree::start("one-primary-hangs", 9).await;
    let (api, moneta, viewers) = (&setup.api, &setup.moneta, &setup.viewers);
    let public = moneta.public_api();
    let others = setup.others();
    // Logged in Redis while the internal API fails: delivery has to read them back.
    api.set_fault(Fault::Status500);
    for viewer in &others {
        assert_eq!(heartbeat_status(&public, viewer, AT).await, 200);
    }
    let hung = setup.hung();
    hung.pause();
    // A position held in memory for a user of the hung primary: its
    // homecoming fails every round, which must not keep the others' logs unread.
    assert_eq!(heartbeat_status(&public, &viewers[0], AT).await, 200);
    api.set_fault(Fault::None);
    for viewer in &others {
        let delivered = eventually(DELIVERY_BOUND, async || {
            api.received_position(&viewer.user, AT).then_some(())
        })
        .await;
        assert!(
            delivered.is_some(),
            "{} of {} on a primary that answers is not delivered while another hangs; delivered: {:?}\n{}",
            AT,
            viewer.user,
            api.delivered(),
            moneta.output()
        );
    }
    api.assert_receives_position(&viewers[0].user, AT).await;
    hung.resume();
    // And the held position goes home once its primary answers.
    let key = support::redis_probe::user_key(&viewers[0].user, "positions");
    let home = eventually(DELIVERY_BOUND, async || {
        let value = cli(hung.port, &["HGET", &key, TITLE]);
        value.starts_with(&format!("{AT}@")).then_some(())
    })
    .await;
    assert!(
        home.is_some(),
        "the held position never reached its primary\n{}",
        moneta.output()
    );
}

/// While one cluster primary hangs, the users of the others get what Redis
/// holds: fresh answers and the stream limit. The hang is that primary's
/// outage, not Redis': its users are answered from fallbacks at once,
/// without opening the breaker every user shares.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_cluster_users_of_the_other_primaries_keep_fresh_answers_and_the_limit_while_one_primary_hangs()
{
    let setup = OnePrimaryOfThree::start("fresh-while-one-hangs", 6).await;
    let (moneta, viewers) = (&setup.moneta, &setup.viewers);
    let public = moneta.public_api();
    let others = setup.others();
    // Each at the limit of the plan (two streams).
    for viewer in &others {
        public.started_session(&viewer.token, TITLE, "phone").await;
    }
    let hung = setup.hung();
    hung.pause();
    let gauge = async |name: &str| metric_value(&moneta.metrics().await, name);
    let noticed = eventually(PATIENCE, async || {
        (gauge("moneta_redis_primaries_failing").await == Some(1.0)).then_some(())
    })
    .await;
    assert!(
        noticed.is_some(),
        "the watch never saw the primary hang\n{}",
        moneta.output()
    );
    for round in 1..=3u64 {
        for viewer in &others {
            let context = format!("{} on a primary that answers, round {round}", viewer.user);
            let answer = public
                .heartbeat(&viewer.token, &viewer.session, round * 60_000)
                .await;
            assert_eq!(answer.status(), 200, "heartbeat of {context}");
            let body: Value = answer.json().await.expect("a heartbeat answer");
            assert_eq!(
                body["degraded"],
                false,
                "heartbeat of {context}\n{}",
                moneta.output()
            );
            let info = public.playback_info_json(TITLE, &viewer.token).await;
            assert_eq!(info["degraded"], false, "playback-info of {context}");
            let third = public.start_session(&viewer.token, TITLE, "tablet").await;
            assert_error(third, 409, "stream_limit_reached").await;
        }
    }
    let rejected = r#"moneta_dependency_requests_total{dependency="redis",outcome="rejected_open"}"#;
    let before = gauge(rejected).await.unwrap_or(0.0);
    let answer = public
        .heartbeat(&viewers[0].token, &viewers[0].session, 240_000)
        .await;
    assert_eq!(answer.status(), 200, "a heartbeat of the hung primary's user");
    let body: Value = answer.json().await.expect("a heartbeat answer");
    assert_eq!(body["degraded"], true, "the hung primary's user");
    assert!(
        gauge(rejected).await.unwrap_or(0.0) > before,
        "the hung primary's user waited for it instead of being answered at once"
    );
    assert_eq!(
        gauge(r#"moneta_circuit_breaker_state{dependency="redis"}"#).await,
        Some(0.0),
        "one primary's hang opened the breaker every user shares\n{}",
        moneta.output()
    );
    hung.resume();
    let back = eventually(PATIENCE, async || {
        let info = public.playback_info_json(TITLE, &viewers[0].token).await;
        (info["degraded"] == false).then_some(())
    })
    .await;
    assert!(
        back.is_some(),
        "the hung primary's user stayed degraded after it answered again"
    );
}

/// A cluster that stops serving keys (a primary failed with no replica to
/// promote: `CLUSTERDOWN` on every primary) is Redis' outage: the breaker
/// opens and stays open, so answers come at once. Keyless commands
/// (`TIME`) still answer then, and must not pass for Redis answering. The success-rate rule is off
/// here: it would open the breaker in the end whatever else answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_that_stops_serving_keys_keeps_the_breaker_open() {
    let cluster = RedisCluster::start_failing_fast(3);
    let api = spawn_fake_api().await;
    let moneta = MonetaProcess::start(&[
        ("MONETA_REDIS_CLUSTER_URLS", cluster.urls()),
        ("MONETA_INTERNAL_API_URL", api.url()),
        ("MONETA_REDIS_BREAKER_MIN_SUCCESS_PCT", "0".to_owned()),
    ]);
    let public = moneta.public_api();
    let viewers = start_viewers(&public, "cluster-down", 3).await;
    let (stopped, asked) = (&cluster.nodes[0], cluster.nodes[1].port);
    stopped.pause();
    let down = eventually_blocking(PATIENCE, || {
        cli(asked, &["CLUSTER", "INFO"])
            .contains("cluster_state:fail")
            .then_some(())
    });
    assert!(down.is_some(), "the cluster never stopped serving keys");
    let breaker = r#"moneta_circuit_breaker_state{dependency="redis"}"#;
    let mut position = 0;
    let opened = eventually(PATIENCE, async || {
        for viewer in &viewers {
            position += 1_000;
            assert_eq!(heartbeat_status(&public, viewer, position).await, 200);
        }
        (metric_value(&moneta.metrics().await, breaker) != Some(0.0)).then_some(())
    })
    .await;
    assert!(
        opened.is_some(),
        "the breaker stayed closed while the cluster refused every key\n{}",
        moneta.output()
    );
    // Half-open, it lets a call through now and then; positions wait in
    // memory, so the courier keeps asking whether Redis answers again. No
    // answer may close it while the cluster still refuses every key.
    let watched = Instant::now();
    while watched.elapsed() < Duration::from_secs(4) {
        let state = metric_value(&moneta.metrics().await, breaker);
        assert_ne!(
            state,
            Some(0.0),
            "closed while the cluster refused every key\n{}",
            moneta.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stopped.resume();
}

/// `other`, and the internal API, end with `position`, which Redis holds
/// stamped as checked; `other` asked the internal API once, and not again.
async fn resumes_where_the_killed_instance_left(
    api: &FakeApi,
    other: &MonetaProcess,
    viewer: &Viewer,
    position: u64,
    stored: impl AsyncFn() -> Option<String>,
) {
    // From the hang's end on, no fresh answer is the older position: not even
    // the first reads that reach Redis before the outage's end is recorded.
    let public = other.public_api();
    let mut stale = Vec::new();
    let fresh = eventually_every(DELIVERY_BOUND, Duration::from_millis(10), async || {
        let answer = public.playback_info(TITLE, &viewer.token).await;
        let info: Value = answer.json().await.ok()?;
        let resume = info["resume_position_ms"].as_u64();
        if info["degraded"] != false {
            return None;
        }
        if resume != Some(position) {
            stale.push(resume);
        }
        (resume == Some(position)).then_some(())
    })
    .await;
    if fresh.is_none() || !stale.is_empty() {
        panic!(
            "fresh answers after the hang: {} stale ({:?}…) before {position} (reached: {}); \
             Redis holds {:?}; delivered: {:?}\n{}",
            stale.len(),
            stale.first(),
            fresh.is_some(),
            stored().await,
            api.delivered(),
            other.output()
        );
    }
    let context = "a position delivered by an instance killed during the hang";
    assert_ends_with(api, &[other.public_api()], &[viewer.ending(position)], context).await;
    let checked = stored().await;
    assert!(
        checked
            .as_deref()
            .is_some_and(|p| p.starts_with(&format!("{position}@")) && p.contains('/')),
        "Redis' resume position after the check: {checked:?}\n{}",
        other.output()
    );
    let checked_total = async || {
        let metrics = other.metrics().await;
        let found = |at: &str| {
            metric_value(
                &metrics,
                &format!(r#"moneta_resume_positions_checked_total{{found="{at}"}}"#),
            )
        };
        (found("internal_api"), found("redis"))
    };
    let before = checked_total().await;
    assert!(before.0.is_some_and(|n| n >= 1.0), "{before:?}");
    for _ in 0..5 {
        assert_eq!(
            resume_position(&other.public_api(), &viewer.token).await,
            Some(position)
        );
    }
    assert_eq!(checked_total().await, before, "checked again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skewed_instances_during_a_redis_hang_keep_the_last_position() {
    const AHEAD: u64 = 2_000_000;
    const BEHIND: u64 = 2_100_000;
    const HONEST_AFTER: u64 = 2_200_000;
    const BEHIND_AFTER: u64 = 2_300_000;
    const STOP: u64 = 2_400_000;
    // Estimates of Redis' clock are off by up to a round trip: acknowledgements
    // through different instances come this far apart, as a player's do.
    const APART: Duration = Duration::from_secs(1);
    let fleet = Deployment::start().await;
    let (redis, api) = (&fleet.redis, &fleet.api);
    let honest_process = fleet.member(&[]);
    let ahead_process = fleet.member(&faketime::skewed_clock("+300s"));
    let behind_process = fleet.member(&faketime::skewed_clock("-300s"));
    let (honest, ahead, behind) = (
        honest_process.public_api(),
        ahead_process.public_api(),
        behind_process.public_api(),
    );
    // Without clocks that really are off, every check below would pass vacuously.
    for (name, public, leads) in [
        ("honest", &honest, -30..=30),
        ("ahead", &ahead, 270..=330),
        ("behind", &behind, -330..=-270),
    ] {
        let lead = clock_lead_s(public).await;
        assert!(
            leads.contains(&lead),
            "the {name} instance's clock leads by {lead} s"
        );
    }

    let began = Utc::now();
    let viewer = start_viewers(&honest, "skew-hang", 1).await.remove(0);
    // Each instance learns Redis' clock from a call that reaches it.
    for (i, public) in [&honest, &ahead, &behind].into_iter().enumerate() {
        let position = 1_000_000 + i as u64 * 10_000;
        assert_eq!(heartbeat_status(public, &viewer, position).await, 200);
    }

    redis.pause();
    let ahead_status = heartbeat_status(&ahead, &viewer, AHEAD).await;
    tokio::time::sleep(APART).await;
    let behind_status = heartbeat_status(&behind, &viewer, BEHIND).await;
    let ahead_metrics = ahead_process.metrics().await;
    let behind_metrics = behind_process.metrics().await;
    redis.resume();
    assert_eq!(ahead_status, 200, "through the instance ahead, Redis hanging");
    assert_eq!(behind_status, 200, "through the instance behind, Redis hanging");
    for (name, metrics) in [("ahead", &ahead_metrics), ("behind", &behind_metrics)] {
        assert_eq!(
            answered_from_memory(metrics, "heartbeat_unchecked"),
            1.0,
            "the instance {name} answered from memory"
        );
    }

    tokio::time::sleep(APART).await;
    assert_eq!(heartbeat_status(&honest, &viewer, HONEST_AFTER).await, 200);
    tokio::time::sleep(APART).await;
    assert_eq!(heartbeat_status(&behind, &viewer, BEHIND_AFTER).await, 200);
    tokio::time::sleep(APART).await;
    let stop = honest
        .stop_session_at(&viewer.token, &viewer.session, STOP)
        .await
        .status();
    assert_eq!(stop, 204);

    // Nothing else replaces the instance ahead's position in its memory: it
    // arrives, and with it any stamp that would bury the later ones.
    api.assert_receives_position(&viewer.user, AHEAD).await;
    let ending = Ending {
        user: &viewer.user,
        token: &viewer.token,
        position: STOP,
    };
    assert_ends_with(
        api,
        &[honest.clone(), ahead.clone(), behind.clone()],
        &[ending],
        "the stop acknowledged last",
    )
    .await;
    let slack = chrono::Duration::seconds(60);
    let (earliest, latest) = (began - slack, Utc::now() + slack);
    let misdated: Vec<String> = delivered_for(api, &viewer.user)
        .iter()
        .filter(|i| !(earliest..=latest).contains(&updated_at(i)))
        .map(|i| format!("{}@{}", i["position_ms"], i["updated_at"]))
        .collect();
    assert!(
        misdated.is_empty(),
        "items dated by an instance's own clock, not Redis': {misdated:?} (the test ran from {began})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_that_never_reached_redis_settle_their_stamps_on_its_clock() {
    const AHEAD: u64 = 3_000_000;
    const BEHIND: u64 = 3_100_000;
    const APART: Duration = Duration::from_secs(1);
    let fleet = Deployment::start().await;
    let (redis, api) = (&fleet.redis, &fleet.api);
    let honest_process = fleet.member(&[]);
    let honest = honest_process.public_api();
    let viewer = playing_through_redis(&honest_process, "skew-unmeasured").await;

    // Both skewed instances start while Redis hangs: neither has ever read
    // its clock. The internal API is down too, so that what they hold meets
    // the other positions only once Redis is back.
    api.set_fault(Fault::Status500);
    redis.pause();
    let ahead_process = fleet.member(&faketime::skewed_clock("+300s"));
    let behind_process = fleet.member(&faketime::skewed_clock("-300s"));
    let (ahead, behind) = (ahead_process.public_api(), behind_process.public_api());
    for (name, public, leads) in [("ahead", &ahead, 270..=330), ("behind", &behind, -330..=-270)] {
        let lead = clock_lead_s(public).await;
        assert!(
            leads.contains(&lead),
            "the {name} instance's clock leads by {lead} s"
        );
    }
    let ahead_status = heartbeat_status(&ahead, &viewer, AHEAD).await;
    tokio::time::sleep(APART).await;
    let behind_status = heartbeat_status(&behind, &viewer, BEHIND).await;
    let held = [
        answered_from_memory(&ahead_process.metrics().await, "heartbeat_unchecked"),
        answered_from_memory(&behind_process.metrics().await, "heartbeat_unchecked"),
    ];
    redis.resume();
    api.set_fault(Fault::None);
    assert_eq!(
        (ahead_status, behind_status),
        (200, 200),
        "heartbeats while Redis hangs"
    );
    assert_eq!(held, [1.0, 1.0], "both were answered from memory");

    let ending = Ending {
        user: &viewer.user,
        token: &viewer.token,
        position: BEHIND,
    };
    assert_ends_with(
        api,
        &[honest.clone(), ahead.clone(), behind.clone()],
        &[ending],
        "the heartbeat acknowledged last, by the instance behind",
    )
    .await;
}

/// An instance minutes ahead that never reached Redis delivers what it holds
/// while Redis hangs and the internal API answers: dated by its own clock,
/// that position would win at the internal API over every one acknowledged
/// in the next five minutes, and no later correction could undo it there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_never_reached_redis_does_not_outdate_later_positions_at_the_internal_api() {
    const AHEAD: u64 = 3_000_000;
    const LAST: u64 = 3_100_000;
    let fleet = Deployment::start().await;
    let (redis, api) = (&fleet.redis, &fleet.api);
    let honest_process = fleet.member(&[]);
    let honest = honest_process.public_api();
    let viewer = playing_through_redis(&honest_process, "skew-delivered").await;

    redis.pause();
    let ahead_process = fleet.member(&faketime::skewed_clock("+300s"));
    let ahead = ahead_process.public_api();
    let lead = clock_lead_s(&ahead).await;
    assert!(
        (270..=330).contains(&lead),
        "the instance's clock leads by {lead} s"
    );
    assert_eq!(heartbeat_status(&ahead, &viewer, AHEAD).await, 200);
    api.assert_receives_position(&viewer.user, AHEAD).await;
    // Well past what the estimate from `Date` may err by (half a second and
    // a round trip), and five minutes short of the instance's own clock.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stop = honest
        .stop_session_at(&viewer.token, &viewer.session, LAST)
        .await
        .status();
    assert_eq!(stop, 204, "a stop while Redis hangs");
    api.assert_receives_position(&viewer.user, LAST).await;
    let ends = latest_delivered(api, &viewer.user);
    redis.resume();
    assert_eq!(
        ends,
        Some(LAST),
        "while Redis hangs, the internal API ends with: {:?}",
        delivered_for(api, &viewer.user)
    );

    let ending = Ending {
        user: &viewer.user,
        token: &viewer.token,
        position: LAST,
    };
    assert_ends_with(
        api,
        &[honest.clone(), ahead.clone()],
        &[ending],
        "the stop acknowledged last, after the instance ahead",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_without_a_shared_secret_accept_each_others_sessions_while_redis_knows_them() {
    let fleet = Deployment::start().await;
    let redis = &fleet.redis;
    let member = || MonetaProcess::start_without(&["MONETA_SESSION_SECRET"], &fleet.env(&[]));
    let mut a_process = member();
    let b_process = member();
    let (a, b) = (a_process.public_api(), b_process.public_api());

    let stopped = start_viewers(&a, "nosecret-stopped", 1).await.remove(0);
    assert_eq!(
        heartbeat_status(&b, &stopped, 600_000).await,
        200,
        "A's id through B"
    );
    let stop = b
        .stop_session_at(&stopped.token, &stopped.session, 660_000)
        .await
        .status();
    assert_eq!(stop, 204, "A's id stopped through B");
    // Ended stays ended, through either instance.
    for public in [&a, &b] {
        let answer = public.heartbeat(&stopped.token, &stopped.session, 700_000).await;
        assert_error(answer, 404, "session_not_found").await;
    }

    let before_restart = start_viewers(&a, "nosecret-old-a", 1).await.remove(0);
    let (exit, output) = tokio::task::spawn_blocking(move || {
        let exit = a_process.terminate(PATIENCE);
        (exit, a_process.output())
    })
    .await
    .unwrap();
    assert!(exit.is_some_and(|s| s.success()), "A's exit {exit:?}\n{output}");
    let a_process = member();
    let a = a_process.public_api();

    assert_eq!(
        heartbeat_status(&a, &before_restart, 600_000).await,
        200,
        "an id the previous A issued, through the new A"
    );
    let from_b = start_viewers(&b, "nosecret-b", 1).await.remove(0);
    assert_eq!(
        heartbeat_status(&a, &from_b, 600_000).await,
        200,
        "B's id through the new A"
    );
    // Redis knows the session, but not for this caller.
    let stranger = mint_token("load-nosecret-stranger", "standard", 2, "KR");
    for public in [&a, &b] {
        let answer = public.heartbeat(&stranger, &from_b.session, 600_000).await;
        assert_error(answer, 404, "session_not_found").await;
    }
    let own = start_viewers(&a, "nosecret-own", 1).await.remove(0);

    // Without Redis, only A's own key can vouch for an id; that B's id and
    // the previous A's are refused here also shows the keys really differ.
    redis.pause();
    let b_id = a.heartbeat(&from_b.token, &from_b.session, 660_000).await;
    let old_a_id = a
        .heartbeat(&before_restart.token, &before_restart.session, 660_000)
        .await;
    let own_id = heartbeat_status(&a, &own, 660_000).await;
    redis.resume();
    assert_error(b_id, 404, "session_not_found").await;
    assert_error(old_a_id, 404, "session_not_found").await;
    assert_eq!(own_id, 200, "A's own id through A while Redis hangs");
}

/// One heartbeat a player sent, and what came of it.
struct Beat {
    position: u64,
    sent: Instant,
    /// `None`: no answer (a transport error).
    status: Option<u16>,
}

/// Heartbeats every ~250 ms through `members` in turn, from `first` on,
/// until `stop` is set.
async fn keep_playing(
    viewer: Viewer,
    members: Vec<PublicApi>,
    first: u64,
    stop: Arc<AtomicBool>,
) -> (Viewer, Vec<Beat>) {
    let mut beats = Vec::new();
    let path = format!("/v1/playback/sessions/{}", viewer.session);
    while !stop.load(Ordering::SeqCst) {
        let position = first + beats.len() as u64 * 1_000;
        let public = &members[beats.len() % members.len()];
        let sent = Instant::now();
        let status = public
            .request(Method::PUT, &path, Some(&viewer.token))
            .json(&json!({"position_ms": position, "state": "playing"}))
            .send()
            .await
            .ok()
            .map(|r| r.status().as_u16());
        beats.push(Beat {
            position,
            sent,
            status,
        });
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    (viewer, beats)
}

/// Players heartbeating until `stop_playing`.
struct Playing {
    stop: Arc<AtomicBool>,
    players: Vec<tokio::task::JoinHandle<(Viewer, Vec<Beat>)>>,
}

fn start_playing(viewers: &[Viewer], members: &[PublicApi], first: u64) -> Playing {
    let stop = Arc::new(AtomicBool::new(false));
    let players = viewers
        .iter()
        .map(|v| tokio::spawn(keep_playing(v.clone(), members.to_vec(), first, stop.clone())))
        .collect();
    Playing { stop, players }
}

/// What each player sent, once its heartbeat under way is answered.
async fn stop_playing(playing: Playing) -> Vec<(Viewer, Vec<Beat>)> {
    playing.stop.store(true, Ordering::SeqCst);
    let mut played = Vec::with_capacity(playing.players.len());
    for player in playing.players {
        played.push(player.await.expect("player task"));
    }
    played
}

/// Every heartbeat not answered 200, as `user@position: status`.
fn refused_beats(played: &[(Viewer, Vec<Beat>)], since: Instant) -> Vec<String> {
    played
        .iter()
        .flat_map(|(v, beats)| {
            beats.iter().filter(|b| b.status != Some(200)).map(move |b| {
                let at = b.sent.saturating_duration_since(since).as_secs_f64();
                format!("{}@{} ({at:.1} s in): {:?}", v.user, b.position, b.status)
            })
        })
        .collect()
}

fn last_acknowledged(beats: &[Beat]) -> Option<&Beat> {
    beats.iter().rev().find(|b| b.status == Some(200))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_under_traffic_loses_no_player() {
    let mut fleet = Deployment::start().await;
    let members = [fleet.member(&[]), fleet.member(&[])];
    let publics: Vec<PublicApi> = members.iter().map(MonetaProcess::public_api).collect();
    let mut viewers = Vec::new();
    for (i, public) in publics.iter().enumerate() {
        viewers.extend(start_viewers(public, &format!("restart{i}"), 3).await);
    }
    // Half go on playing through the restart; the other half pause while
    // Redis is down, so that their last positions are in memory alone when
    // it returns, with nothing newer to stand in for them.
    let (mut flowing, mut pausing) = (Vec::new(), Vec::new());
    for (i, viewer) in viewers.into_iter().enumerate() {
        if i % 2 == 0 {
            flowing.push(viewer);
        } else {
            pausing.push(viewer);
        }
    }
    let began = Instant::now();
    let flow = start_playing(&flowing, &publics, 1_000_000);
    let pause = start_playing(&pausing, &publics, 1_000_000);
    tokio::time::sleep(Duration::from_millis(1_500)).await;

    let port = fleet.redis.port;
    fleet.redis.kill();
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let paused = stop_playing(pause).await;
    let parked: Vec<(&Viewer, u64)> = paused
        .iter()
        .map(|(v, beats)| {
            let last =
                last_acknowledged(beats).unwrap_or_else(|| panic!("{}: no heartbeat acknowledged", v.user));
            assert!(
                last.sent > killed,
                "{}: no heartbeat acknowledged while Redis was down",
                v.user
            );
            (v, last.position)
        })
        .collect();
    fleet.redis = RedisServer::start_on(port);
    let restarted = Instant::now();

    let probes = [&flowing[0], &pausing[0]];
    let fresh = async || {
        let mut stale = Vec::new();
        for public in &publics {
            let redis = redis_readiness(public).await;
            if redis != "up" {
                stale.push(format!("{}: Redis {redis}", public.address));
            }
            for viewer in probes {
                let answer = public.playback_info(TITLE, &viewer.token).await;
                let status = answer.status();
                let info: Value = answer.json().await.unwrap_or(Value::Null);
                if status != 200 || info["degraded"] != false {
                    stale.push(format!(
                        "{}: playback-info of {}: {status} degraded {}",
                        public.address, viewer.user, info["degraded"]
                    ));
                }
            }
        }
        stale
    };
    // The contract's bound is 15 s; the rest is a busy machine's slack.
    let recovered = eventually(Duration::from_secs(30), async || {
        fresh().await.is_empty().then(|| restarted.elapsed())
    })
    .await;
    let Some(recovered) = recovered else {
        panic!("30 s after Redis came back empty: {:?}", fresh().await);
    };
    println!(
        "fresh answers {:.1} s after Redis came back empty",
        recovered.as_secs_f64()
    );

    // Held only in memory when Redis came back: they reach the internal API
    // and the resume position Redis holds.
    let endings: Vec<Ending> = parked
        .iter()
        .map(|(v, position)| Ending {
            user: &v.user,
            token: &v.token,
            position: *position,
        })
        .collect();
    assert_ends_with(
        &fleet.api,
        &publics,
        &endings,
        "positions acknowledged while Redis was down",
    )
    .await;
    let resumed = start_playing(&pausing, &publics, 3_000_000);

    tokio::time::sleep_until((restarted + Duration::from_secs(17)).into()).await;
    let limited = &flowing[0];
    let second = publics[0].start_session(&limited.token, TITLE, "phone").await;
    let status = second.status();
    let second: Value = second.json().await.unwrap_or(Value::Null);
    assert_eq!(
        status, 201,
        "{}: a second stream, within the limit of 2: {second}",
        limited.user
    );
    let second = second["session_id"].as_str().expect("session_id").to_owned();
    let expected: BTreeSet<String> = [limited.session.clone(), second].into();
    for (public, device) in publics.iter().zip(["tablet", "laptop"]) {
        let refused = assert_error(
            public.start_session(&limited.token, TITLE, device).await,
            409,
            "stream_limit_reached",
        )
        .await;
        let active: BTreeSet<String> = session_ids(&refused["error"]["active_sessions"])
            .into_iter()
            .collect();
        assert_eq!(
            active, expected,
            "{}: the sessions refusing the start through {}",
            limited.user, public.address
        );
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    let mut played = stop_playing(flow).await;
    played.extend(stop_playing(resumed).await);
    let mut refused = refused_beats(&played, began);
    refused.extend(refused_beats(&paused, began));
    assert!(
        refused.is_empty(),
        "heartbeats not answered 200 (Redis killed {:.1} s in, back {:.1} s in): {refused:?}",
        killed.duration_since(began).as_secs_f64(),
        restarted.duration_since(began).as_secs_f64(),
    );
    for (viewer, beats) in &played {
        let after = beats.iter().filter(|b| b.sent > restarted).count();
        assert!(after > 0, "{}: no heartbeat after the restart", viewer.user);
    }
    let last: BTreeMap<String, u64> = played
        .iter()
        .filter_map(|(v, beats)| Some((v.user.clone(), last_acknowledged(beats)?.position)))
        .collect();
    assert_eq!(last.len(), 6, "every player's last heartbeat was acknowledged");
    assert_all_delivered(&fleet.api, &last, "after Redis came back empty").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_redis_forgot_are_recorded_again_while_the_internal_api_fails() {
    let mut fleet = Deployment::start().await;
    let old = fleet.member(&[]);
    let viewers = start_viewers(&old.public_api(), "forgot-api-down", 3).await;
    for viewer in &viewers {
        assert_eq!(heartbeat_status(&old.public_api(), viewer, 600_000).await, 200);
    }

    fleet.api.set_fault(Fault::Status500);
    // Started during the outage, as after a crash: it could learn the title
    // from Redis alone, which then forgets it.
    let during = fleet.member(&[]);
    let port = fleet.redis.port;
    fleet.redis.kill();
    fleet.redis = RedisServer::start_on(port);
    let after = fleet.member(&[]);
    let instances = [
        ("the instance that started them", old.public_api()),
        (
            "an instance started while the internal API failed",
            during.public_api(),
        ),
        ("an instance started after Redis forgot", after.public_api()),
    ];
    for (name, public) in &instances {
        let back = eventually(PATIENCE, async || {
            (redis_readiness(public).await == "up").then_some(())
        })
        .await;
        assert!(
            back.is_some(),
            "{name}: Redis never up again: {}",
            redis_readiness(public).await
        );
    }

    // The id proves the title and the caller, the token the limit: nothing
    // the failing internal API would add.
    for ((name, public), viewer) in instances.iter().zip(&viewers) {
        let answer = public.heartbeat(&viewer.token, &viewer.session, 660_000).await;
        let status = answer.status();
        let body = answer.text().await.unwrap_or_default();
        assert_eq!(
            status, 200,
            "{name}: a heartbeat of a session Redis forgot, the internal API failing: {body}"
        );
        assert_eq!(
            public.live_session_ids(&viewer.token).await,
            BTreeSet::from([viewer.session.clone()]),
            "{name}: the session is recorded again"
        );
    }
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
    /// The first few of them, as `status code (ms into the run)`.
    other_seen: Vec<String>,
}

/// Heartbeats every ~250 ms through a random live member until `until`.
async fn play(
    viewer: Viewer,
    roster: Roster,
    client: reqwest::Client,
    (started, until): (Instant, Instant),
    seed: u64,
) -> Tally {
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
                Ok(r) => {
                    let status = r.status().as_u16();
                    *tally.other.entry(status).or_default() += 1;
                    if tally.other_seen.len() < 3 {
                        let body: Value = r.json().await.unwrap_or(Value::Null);
                        let at = started.elapsed().as_millis();
                        let code = &body["error"]["code"];
                        tally.other_seen.push(format!("{status} {code} ({at} ms)"));
                    }
                }
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
    /// SIGSTOP of Redis for `REDIS_HANG`, then SIGCONT.
    RedisHang,
    /// SIGKILL of Redis, started again on its port without its data.
    RedisEmptyRestart,
}

const MEMBERS: usize = 3;
const RUN_MS: u64 = 20_000;
const BALANCER_LAG: Duration = Duration::from_millis(300);
const DOWNTIME: Duration = Duration::from_millis(700);
/// Shorter than the run's Redis timeout (5 s): callers wait the hang out and
/// Redis answers them late, so the hang checks that late scripts still count
/// while their callers wait, not the memory path (the empty restart, refused
/// at once, takes that one).
const REDIS_HANG: Duration = Duration::from_millis(1_000);
/// How long Redis stays dead before its empty restart: long enough for
/// heartbeats to be answered from memory meanwhile.
const REDIS_DOWNTIME: Duration = Duration::from_millis(700);

fn chaos_script() -> Vec<(u64, Disturbance)> {
    use Disturbance::*;
    // A position acknowledged while Redis is unreachable is held in its
    // instance's memory, which the contract lets a SIGKILL lose: no member
    // dies between a Redis disturbance and every member answering with Redis
    // again (the disturber waits for that before its next step).
    vec![
        (2_000, Crash(1)),
        (4_000, Api(Fault::Status500)),
        (4_500, RedisHang),
        (6_000, Crash(1)),
        // Two faults at once: Redis comes back empty while the internal API
        // fails, so sessions are recorded again on the JWT's limit.
        (7_000, RedisEmptyRestart),
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

/// What the disturber works with.
struct Stage {
    members: Vec<Option<MonetaProcess>>,
    redis: RedisServer,
    roster: Roster,
    api: FakeApi,
    envs: Vec<(&'static str, String)>,
    runtime: tokio::runtime::Handle,
    /// Heartbeats the members killed so far answered from memory, by their
    /// own count just before the SIGKILL.
    from_memory: f64,
}

impl Stage {
    /// SIGKILLs `n` random live members; returns their slots once the
    /// balancer (the roster) has noticed they are gone.
    fn kill_some(&mut self, n: usize, rng: &mut Rng) -> Vec<usize> {
        let mut victims = Vec::new();
        for _ in 0..n {
            let live: Vec<usize> = (0..self.members.len())
                .filter(|i| self.members[*i].is_some())
                .collect();
            let Some(&slot) = live.get(rng.below(live.len())) else {
                break;
            };
            if let Some(process) = self.members[slot].take() {
                let metrics = self.runtime.block_on(process.metrics());
                self.from_memory += answered_from_memory(&metrics, "heartbeat_unchecked");
                kill(process);
            }
            victims.push(slot);
        }
        // Players go on calling a dead member until the balancer notices.
        std::thread::sleep(BALANCER_LAG);
        for slot in &victims {
            self.roster.lock().unwrap()[*slot] = None;
        }
        victims
    }

    /// Waits until every live member says Redis is up; how long that took.
    fn members_on_redis(&self) -> Option<Duration> {
        let waiting = Instant::now();
        let publics: Vec<PublicApi> = self
            .members
            .iter()
            .flatten()
            .map(MonetaProcess::public_api)
            .collect();
        eventually_blocking(PATIENCE, || {
            self.runtime.block_on(async {
                for public in &publics {
                    if redis_readiness(public).await != "up" {
                        return None;
                    }
                }
                Some(waiting.elapsed())
            })
        })
    }
}

/// Runs the script against the members (SIGKILL of random live ones,
/// restarts on fresh ports, internal API faults, a hung and an emptied
/// Redis); returns the stage and what it did.
fn disturb(mut stage: Stage, started: Instant, seed: u64) -> (Stage, Vec<String>) {
    let mut rng = Rng(seed);
    let mut journal = Vec::new();
    for (at_ms, step) in chaos_script() {
        let at = started + Duration::from_millis(at_ms);
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        match step {
            Disturbance::Crash(n) => {
                let victims = stage.kill_some(n, &mut rng);
                journal.push(format!("{at_ms}ms SIGKILL {victims:?}"));
                std::thread::sleep(DOWNTIME);
                for slot in victims {
                    let process = MonetaProcess::start(&stage.envs);
                    stage.roster.lock().unwrap()[slot] = Some(process.base_url());
                    stage.members[slot] = Some(process);
                }
            }
            Disturbance::KillAll => {
                let victims = stage.kill_some(MEMBERS, &mut rng);
                journal.push(format!("{at_ms}ms SIGKILL {victims:?}, the end"));
            }
            Disturbance::Api(fault) => {
                stage.api.set_fault(fault);
                journal.push(format!("{at_ms}ms internal API {fault:?}"));
            }
            Disturbance::RedisHang | Disturbance::RedisEmptyRestart => {
                if let Disturbance::RedisHang = step {
                    stage.redis.pause();
                    std::thread::sleep(REDIS_HANG);
                    stage.redis.resume();
                } else {
                    let port = stage.redis.port;
                    stage.redis.kill();
                    std::thread::sleep(REDIS_DOWNTIME);
                    stage.redis = RedisServer::start_on(port);
                }
                let back = stage.members_on_redis();
                journal.push(format!(
                    "{at_ms}ms Redis {step:?}, every member on Redis again after {back:?}"
                ));
                assert!(
                    back.is_some(),
                    "members still without Redis {PATIENCE:?} after {step:?}; chaos: {journal:?}"
                );
            }
        }
    }
    (stage, journal)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_chaos_loses_no_acknowledged_position() {
    const USERS: usize = 30;
    let seed = std::env::var("FLEET_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| Utc::now().timestamp_micros() as u64 | 1);
    let fleet = Deployment::start().await;
    let envs = fleet.env(&[
        ("MONETA_PROGRESS_FLUSH_MS", "500".into()),
        // Outside the Redis disturbances, a busy machine must not make Redis
        // look unreachable, which would move acknowledgements into memory,
        // the one place the contract lets a SIGKILL lose them.
        ("MONETA_REDIS_TIMEOUT_MS", "5000".into()),
    ]);
    let Deployment { redis, api } = fleet;
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
    let stage = Stage {
        members,
        redis,
        roster: roster.clone(),
        api: api.clone(),
        envs,
        runtime: tokio::runtime::Handle::current(),
        from_memory: 0.0,
    };
    let chaos = std::thread::spawn(move || disturb(stage, started, seed));
    let players: Vec<_> = viewers
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            tokio::spawn(play(
                v,
                roster.clone(),
                client.clone(),
                (started, until),
                seed.wrapping_add(i as u64 * 7919),
            ))
        })
        .collect();
    let mut tallies = Vec::with_capacity(USERS);
    for player in players {
        tallies.push(player.await.expect("player task"));
    }
    let (stage, journal) = tokio::task::spawn_blocking(move || chaos.join().expect("chaos thread"))
        .await
        .unwrap();
    // The script ended by killing the whole fleet right after the last
    // acknowledged heartbeats.
    assert!(stage.members.iter().all(Option::is_none), "chaos: {journal:?}");
    let from_memory = stage.from_memory;
    let fleet = Deployment {
        redis: stage.redis,
        api,
    };
    let api = &fleet.api;
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
        "fleet chaos: {acknowledged} positions acknowledged ({from_memory} answered from memory), \
         {} users, {} delivered, {} lost, {seconds:.1} s to deliver ({at_the_kill} last positions \
         undelivered at the kill, {unanswered} heartbeats unanswered, other answers {other:?}, \
         seed {seed})",
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
    let seen: Vec<&String> = tallies.iter().flat_map(|t| &t.other_seen).collect();
    assert!(
        other.is_empty(),
        "answers other than 200 to heartbeats: {other:?}, such as {seen:?}; chaos: {journal:?}"
    );
}

//! Fault tests: real dependencies killed, paused (SIGSTOP), refused, hung,
//! slowed and broken while 32 clients keep asking. Each asserts no 5xx beyond
//! the contract's 503, no connection errors, answers that do not wait on the
//! dead dependency while its breaker is open, recovery once the fault ends and
//! no lost positions.
//!
//! Nothing here bounds latency in absolute terms: these tests share the
//! machine with the rest of the suite. Every dependency call may take
//! [`DEPENDENCY_TIMEOUT`], so an answer that waited on a dead dependency takes
//! at least that long, and one that did not stays an order of magnitude under
//! it however loaded the machine is.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::fault_proxy::FaultProxy;
use crate::helpers::{TestApp, spawn_app, spawn_app_on};
use crate::support::{self, FakeApi, Fault, PATIENCE, RedisServer, eventually, metric_value, spawn_fake_api};

const CLIENTS: usize = 32;
/// Pause between a client's requests: enough load to matter, bounded in rate.
const THINK: Duration = Duration::from_millis(5);
/// Fewer answers than this say too little to judge a phase by, so a phase
/// lasts until it has them, however slow the machine.
const MIN_ANSWERS: usize = 200;
const DEPENDENCY_TIMEOUT: Duration = Duration::from_secs(5);
/// A playback-info makes at most two calls to one dependency in a row (a
/// title's Redis copy is read, then refreshed), each bounded by the timeout.
const CALLS_IN_A_ROW: u32 = 2;
/// Only a server that never answers reaches this.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// The app under test with long dependency timeouts (see the module comment)
/// and `extra` settings. The whole-request bound stays above the longest
/// chain of dependency calls, so that only the dependencies' own timeouts are
/// under test.
async fn spawn_fault_app(api: FakeApi, extra: &[(&str, &str)]) -> TestApp {
    let timeout = DEPENDENCY_TIMEOUT.as_millis().to_string();
    let request_timeout = (DEPENDENCY_TIMEOUT * (CALLS_IN_A_ROW + 2))
        .as_millis()
        .to_string();
    let mut settings = vec![
        ("MONETA_REDIS_TIMEOUT_MS", timeout.as_str()),
        ("MONETA_INTERNAL_API_TIMEOUT_MS", timeout.as_str()),
        ("MONETA_REQUEST_TIMEOUT_MS", request_timeout.as_str()),
    ];
    settings.extend_from_slice(extra);
    spawn_app_on(api, &settings).await
}

#[derive(Default)]
struct Report {
    statuses: HashMap<u16, usize>,
    bad_5xx: Vec<String>,
    connection_errors: usize,
    latencies: Vec<Duration>,
    degraded: usize,
}

impl Report {
    fn p95(&self) -> Duration {
        let mut l = self.latencies.clone();
        l.sort();
        l.get(l.len() * 95 / 100).copied().unwrap_or_default()
    }
    fn worst(&self) -> Duration {
        self.latencies.iter().max().copied().unwrap_or_default()
    }
    fn total(&self) -> usize {
        self.statuses.values().sum()
    }
}

/// Drives playback-info from `CLIENTS` clients for `window` (and until
/// `MIN_ANSWERS` came back); each request is a fresh user when `cold`, so it
/// misses the user caches and needs the internal API.
async fn drive(app: &TestApp, window: Duration, cold: bool) -> Report {
    let report = Arc::new(Mutex::new(Report::default()));
    let counter = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + window;
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let client = app.client.clone();
            let base = app.address.clone();
            let report = report.clone();
            let counter = counter.clone();
            let answered = answered.clone();
            tokio::spawn(async move {
                let warm_token = support::mint_token("load-warm", "standard", 2, "KR");
                while Instant::now() < deadline || answered.load(Ordering::Relaxed) < MIN_ANSWERS {
                    let token = if cold {
                        let n = counter.fetch_add(1, Ordering::Relaxed);
                        support::mint_token(&format!("load-{n}"), "standard", 2, "KR")
                    } else {
                        warm_token.clone()
                    };
                    let started = Instant::now();
                    let result = client
                        .get(format!("{base}/v1/contents/m-0001/playback-info"))
                        .bearer_auth(&token)
                        .timeout(CLIENT_TIMEOUT)
                        .send()
                        .await;
                    let elapsed = started.elapsed();
                    let outcome = match result {
                        Ok(resp) => {
                            let status = resp.status().as_u16();
                            Some((status, resp.json::<Value>().await.unwrap_or(Value::Null)))
                        }
                        Err(_) => None,
                    };
                    answered.fetch_add(1, Ordering::Relaxed);
                    {
                        let mut r = report.lock().unwrap();
                        r.latencies.push(elapsed);
                        match outcome {
                            Some((status, body)) => {
                                *r.statuses.entry(status).or_default() += 1;
                                if status >= 500
                                    && !(status == 503 && body["error"]["code"] == "dependency_unavailable")
                                {
                                    r.bad_5xx.push(format!("{status} {body}"));
                                }
                                if body["degraded"] == true {
                                    r.degraded += 1;
                                }
                            }
                            None => r.connection_errors += 1,
                        }
                    }
                    tokio::time::sleep(THINK).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    Arc::try_unwrap(report).ok().unwrap().into_inner().unwrap()
}

async fn wait_for_breaker_open(app: &TestApp, dependency: &str) {
    let series = format!("moneta_circuit_breaker_state{{dependency=\"{dependency}\"}}");
    let open = eventually(PATIENCE, async || {
        (metric_value(&app.metrics().await, &series) == Some(2.0)).then_some(())
    })
    .await;
    assert!(open.is_some(), "{dependency} breaker never opened");
}

/// Calls that reached `dependency` (not rejected by its guard), as Moneta counts them.
async fn attempts(app: &TestApp, dependency: &str) -> u64 {
    let text = app.metrics().await;
    let dep = format!("dependency=\"{dependency}\"");
    text.lines()
        .filter(|l| l.starts_with("moneta_dependency_requests_total{") && l.contains(&dep))
        .filter(|l| !l.contains("outcome=\"rejected"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Drives load while `dependency`'s breaker is open; asserts answers that did
/// not wait on the dependency and almost no calls reaching it.
async fn while_open(app: &TestApp, name: &str, dependency: &str, cold: bool) {
    let before = attempts(app, dependency).await;
    let open = drive(app, Duration::from_secs(2), cold).await;
    let reached = attempts(app, dependency).await - before;
    assert_clean(name, &open);
    println!(
        "{name}: p95 {:?} while open; {reached} calls reached {dependency}",
        open.p95()
    );
    assert!(
        open.p95() < DEPENDENCY_TIMEOUT / 10,
        "{name}: p95 {:?} while the breaker was open: answers waited on the dependency \
         (its timeout is {DEPENDENCY_TIMEOUT:?})",
        open.p95()
    );
    assert!(
        reached <= 10,
        "{name}: {reached} calls reached the dead {dependency}"
    );
    assert!(open.degraded > 0, "{name}: answers say degraded");
}

/// Asks until an answer is not degraded; returns how long that took.
async fn recovery_time(app: &TestApp) -> Duration {
    let started = Instant::now();
    let token = support::mint_token("u-basic", "basic", 1, "KR");
    let recovered = eventually(PATIENCE, async || {
        let resp = app.playback_info("m-0001", &token).await;
        let body: Value = resp.json().await.unwrap_or_default();
        (body["degraded"] == false).then_some(())
    })
    .await;
    assert!(
        recovered.is_some(),
        "answers were still degraded {PATIENCE:?} after the fault ended"
    );
    started.elapsed()
}

/// Starts a session and sends a heartbeat with `position` during the fault.
async fn write_position_during_fault(app: &TestApp, user: &str, position: u64) {
    let token = support::mint_token(user, "standard", 2, "KR");
    let id = app.started_session(&token, "m-0001", "fault-device").await;
    assert_eq!(
        app.heartbeat(&token, &id, position).await.status(),
        200,
        "heartbeat during the fault"
    );
}

fn assert_clean(name: &str, r: &Report) {
    println!(
        "{name}: {} requests, p95 {:?}, worst {:?}, statuses {:?}, degraded {}",
        r.total(),
        r.p95(),
        r.worst(),
        r.statuses,
        r.degraded
    );
    assert!(
        r.bad_5xx.is_empty(),
        "{name}: 5xx answers: {:?}",
        &r.bad_5xx[..r.bad_5xx.len().min(5)]
    );
    assert_eq!(r.connection_errors, 0, "{name}: connection errors");
    assert!(r.total() >= MIN_ANSWERS, "{name}: too little load to judge");
}

async fn internal_api_fault(name: &str, fault: Fault) {
    let app = spawn_fault_app(spawn_fake_api().await, &[]).await;
    let warm = drive(&app, Duration::from_millis(500), true).await;
    assert_clean(&format!("{name} (before)"), &warm);
    app.api.set_fault(fault);
    write_position_during_fault(&app, "u-standard", 31_000).await;
    let _ = drive(&app, Duration::from_secs(2), true).await;
    wait_for_breaker_open(&app, "internal_api").await;
    let calls_before = app.api.total_calls();
    while_open(&app, name, "internal_api", true).await;
    let served = app.api.total_calls() - calls_before;
    assert!(served <= 10, "{name}: the internal API itself saw {served} calls");
    app.api.set_fault(Fault::None);
    let recovered = recovery_time(&app).await;
    println!("{name}: not degraded again after {recovered:?}");
    app.api.assert_receives_position("u-standard", 31_000).await;
}

macro_rules! internal_api_faults {
    ($($test:ident: $fault:expr,)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $test() {
            internal_api_fault(stringify!($test), $fault).await;
        }
    )*};
}

internal_api_faults! {
    internal_api_answering_500: Fault::Status500,
    internal_api_hanging: Fault::Hang,
    // Slower than the timeout, so every call times out although it would be answered.
    internal_api_answering_slowly: Fault::Slow(DEPENDENCY_TIMEOUT * 2),
    internal_api_answering_garbage: Fault::Garbage,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_api_refusing_connections() {
    let api = spawn_fake_api().await;
    let proxy = FaultProxy::start(api.port).await;
    let proxied = format!("http://127.0.0.1:{}", proxy.port);
    let app = spawn_fault_app(api, &[("MONETA_INTERNAL_API_URL", &proxied)]).await;
    let _ = drive(&app, Duration::from_millis(500), true).await;
    proxy.refuse();
    write_position_during_fault(&app, "u-standard", 41_000).await;
    let _ = drive(&app, Duration::from_secs(1), true).await;
    wait_for_breaker_open(&app, "internal_api").await;
    while_open(&app, "internal API refusing", "internal_api", true).await;
    proxy.restore().await;
    let recovered = recovery_time(&app).await;
    println!("internal API refusing: not degraded again after {recovered:?}");
    app.api.assert_receives_position("u-standard", 41_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted() {
    let mut app = spawn_fault_app(spawn_fake_api().await, &[]).await;
    let _ = drive(&app, Duration::from_millis(500), false).await;
    let port = app.redis.port;
    app.redis.kill();
    write_position_during_fault(&app, "u-standard", 51_000).await;
    let _ = drive(&app, Duration::from_secs(1), false).await;
    wait_for_breaker_open(&app, "redis").await;
    while_open(&app, "redis killed", "redis", false).await;
    app.redis = RedisServer::start_on(port);
    let recovered = recovery_time(&app).await;
    println!("redis restarted: not degraded again after {recovered:?}");
    app.api.assert_receives_position("u-standard", 51_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused_with_sigstop() {
    let app = spawn_fault_app(spawn_fake_api().await, &[]).await;
    let _ = drive(&app, Duration::from_millis(500), false).await;
    app.redis.pause();
    let hung = drive(&app, Duration::from_secs(1), false).await;
    assert_clean("redis paused (breaker closing in)", &hung);
    let bound = DEPENDENCY_TIMEOUT * (CALLS_IN_A_ROW + 1);
    assert!(
        hung.worst() < bound,
        "no answer waits on a hung Redis beyond its timeouts: {:?} (bound {bound:?})",
        hung.worst()
    );
    wait_for_breaker_open(&app, "redis").await;
    write_position_during_fault(&app, "u-premium", 61_000).await;
    while_open(&app, "redis paused", "redis", false).await;
    app.redis.resume();
    let recovered = recovery_time(&app).await;
    println!("redis resumed: not degraded again after {recovered:?}");
    app.api.assert_receives_position("u-premium", 61_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_cold_reads_make_one_internal_api_call() {
    let app = spawn_app().await;
    let token = support::mint_token("u-basic", "basic", 1, "KR");
    let reads = (0..100).map(|_| {
        let client = app.client.clone();
        let url = format!("{}/v1/contents/m-0003/playback-info", app.address);
        let token = token.clone();
        tokio::spawn(async move { client.get(url).bearer_auth(token).send().await.unwrap().status() })
    });
    for r in reads {
        assert_eq!(r.await.unwrap(), 200);
    }
    assert_eq!(app.api.content_calls(), 1);
}

#[tokio::test]
async fn graceful_shutdown_of_the_in_process_app() {
    let app = spawn_app().await;
    let token = support::mint_token("u-basic", "basic", 1, "KR");
    assert_eq!(app.playback_info("m-0001", &token).await.status(), 200);
    app.shutdown().await;
}

/// The app on a Redis of its own reached through a [`FaultProxy`].
async fn behind_redis_proxy() -> (TestApp, FaultProxy, RedisServer) {
    behind_redis_proxy_with(&[]).await
}

async fn behind_redis_proxy_with(settings: &[(&str, &str)]) -> (TestApp, FaultProxy, RedisServer) {
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(redis.port).await;
    let url = format!("redis://127.0.0.1:{}", proxy.port);
    let mut settings = settings.to_vec();
    settings.push(("MONETA_REDIS_URL", &url));
    let app = spawn_app_on(spawn_fake_api().await, &settings).await;
    (app, proxy, redis)
}

/// A connection to Redis that goes silent (open, answering nothing: a host
/// that died without a reset, a partition) while Redis itself answers new
/// connections: Moneta connects again, and the stream limit holds again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_connection_gone_silent_is_made_again() {
    let (app, proxy, _redis) = behind_redis_proxy().await;
    // One stream (the internal API's plan for u-basic).
    let token = app.token("u-basic", "basic", 1, "KR");
    app.started_session(&token, "m-0001", "tv").await;
    assert_eq!(app.start_session(&token, "m-0001", "phone").await.status(), 409);

    proxy.silence();
    // Calls on the silent connection time out and open the breaker; until a
    // new connection answers, starts go on uncounted (201, degraded).
    let enforced = eventually(PATIENCE, async || {
        (app.start_session(&token, "m-0001", "phone").await.status() == 409).then_some(())
    })
    .await;
    assert!(
        enforced.is_some(),
        "the stream limit was still open {PATIENCE:?} after the connection went silent"
    );
    let ready: Value = app
        .get_anonymously("/health/ready")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(ready["dependencies"]["redis"], "up", "{ready}");
    let recovered = recovery_time(&app).await;
    println!("redis connection silent: fresh answers again after {recovered:?}");
}

/// What the in-process copy read through a connection that went silent is
/// dropped when the connection is made again: the invalidations of changes
/// made meanwhile went to the silent connection, and the copy would
/// otherwise answer the older value for as long as it may keep one (an hour
/// here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_copy_read_through_a_connection_gone_silent_is_not_served_after_it_is_made_again() {
    let (app, proxy, redis) = behind_redis_proxy_with(&[
        ("MONETA_REDIS_CLIENT_CACHE_TTL_MS", "3600000"),
        ("MONETA_ENTITLEMENT_TTL_S", "3600"),
    ])
    .await;
    let token = app.token("u-basic", "basic", 1, "KR");
    let mut direct = support::redis_probe::RedisProbe::connect(&redis.url).await;
    let positions = support::redis_probe::user_key("u-basic", "positions");
    let write = async |probe: &mut support::redis_probe::RedisProbe, position: u64| {
        let value = format!("{position}@{}", chrono::Utc::now().timestamp_millis());
        let _: () = probe
            .query(redis::cmd("HSET").arg(&positions).arg("m-0001").arg(value))
            .await;
    };
    let resume = async || {
        let info: Value = app.playback_info("m-0001", &token).await.json().await.ok()?;
        Some((info["resume_position_ms"].as_u64()?, info["degraded"] == true))
    };
    write(&mut direct, 1_000_000).await;
    for _ in 0..3 {
        assert_eq!(
            resume().await,
            Some((1_000_000, false)),
            "read, then answered from the copy"
        );
    }

    proxy.silence();
    // Changed behind the silent connection: its invalidation is never heard.
    write(&mut direct, 2_000_000).await;
    let fresh = eventually(PATIENCE, async || {
        (resume().await == Some((2_000_000, false))).then_some(())
    })
    .await;
    assert!(
        fresh.is_some(),
        "still {:?} {PATIENCE:?} after the connection went silent",
        resume().await
    );
    // And it stays so: nothing older comes back from the copy.
    for _ in 0..5 {
        assert_eq!(resume().await, Some((2_000_000, false)));
    }
}

/// A position held in memory while Redis refuses connections goes to the
/// internal API at once, not at the courier's next tick (ten minutes here):
/// until then only this process holds it, and a SIGKILL would lose it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_held_in_memory_goes_to_the_internal_api_at_once_not_at_the_next_delivery() {
    let (app, proxy, _redis) = behind_redis_proxy_with(&[("MONETA_PROGRESS_FLUSH_MS", "600000")]).await;
    let token = app.token("u-basic", "basic", 1, "KR");
    let id = app.started_session(&token, "m-0001", "tv").await;
    proxy.refuse();
    assert_eq!(app.heartbeat(&token, &id, 1_234_000).await.status(), 200);
    app.api.assert_receives_position("u-basic", 1_234_000).await;
}

/// A stop acknowledged while Redis was unreachable (it kept its data) ends
/// the session there once Redis answers again: the slot is free for another
/// device, and the stopped session's stray heartbeat does not bring it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_made_while_redis_was_unreachable_ends_the_session_when_it_is_back() {
    let (app, proxy, _redis) = behind_redis_proxy().await;
    // One stream (the internal API's plan for u-basic).
    let token = app.token("u-basic", "basic", 1, "KR");
    let tv = app.started_session(&token, "m-0001", "tv").await;

    proxy.refuse();
    assert_eq!(app.stop_session_at(&token, &tv, 90_000).await.status(), 204);
    proxy.restore().await;

    let freed = eventually(PATIENCE, async || {
        let resp = app.start_session(&token, "m-0001", "phone").await;
        let body: Value = resp.json().await.ok()?;
        (body["playback"]["degraded"] == false).then_some(body)
    })
    .await;
    assert!(
        freed.is_some(),
        "the stopped session still held the only slot {PATIENCE:?} after Redis came back"
    );
    let resp = app.heartbeat(&token, &tv, 91_000).await;
    assert_eq!(resp.status(), 404, "the stopped session came back");
    app.api.assert_receives_position("u-basic", 90_000).await;
}

#[tokio::test]
async fn a_request_past_its_own_timeout_is_a_503_with_retry_after() {
    // The internal API may take longer than the whole request may: the
    // request's bound answers, in the contract's shape, with when to retry.
    let api = spawn_fake_api().await;
    api.set_fault(Fault::Hang);
    let app = spawn_app_on(
        api,
        &[
            ("MONETA_INTERNAL_API_TIMEOUT_MS", "30000"),
            ("MONETA_REQUEST_TIMEOUT_MS", "500"),
        ],
    )
    .await;
    let token = app.token("u-premium", "premium", 4, "KR");
    let resp = app.playback_info("m-0001", &token).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(
        resp.headers().get("retry-after").map(|v| v.as_bytes()),
        Some(&b"2"[..])
    );
    let body: Value = resp.json().await.expect("a JSON body");
    assert_eq!(body["error"]["code"], "service_unavailable", "{body}");
}

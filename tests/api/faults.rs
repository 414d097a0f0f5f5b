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
use crate::helpers::{Fault, TestApp, eventually, spawn_app, spawn_app_with};
use crate::support::{self, PATIENCE, RedisServer};

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

/// Long dependency timeouts (see the module comment). The whole-request bound
/// stays above the longest chain of dependency calls, so that only the
/// dependencies' own timeouts are under test.
fn long_timeouts(vars: &mut Vec<(String, String)>) {
    let millis = |d: Duration| d.as_millis().to_string();
    for (key, value) in [
        ("MONETA_REDIS_TIMEOUT_MS", millis(DEPENDENCY_TIMEOUT)),
        ("MONETA_INTERNAL_API_TIMEOUT_MS", millis(DEPENDENCY_TIMEOUT)),
        (
            "MONETA_REQUEST_TIMEOUT_MS",
            millis(DEPENDENCY_TIMEOUT * (CALLS_IN_A_ROW + 2)),
        ),
    ] {
        vars.push((key.to_owned(), value));
    }
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

async fn breaker_state(app: &TestApp, dependency: &str) -> Option<u8> {
    let text = app.metrics().await;
    let prefix = format!("moneta_circuit_breaker_state{{dependency=\"{dependency}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

async fn wait_for_breaker(app: &TestApp, dependency: &str, state: u8) {
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        if breaker_state(app, dependency).await == Some(state) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{dependency} breaker never reached state {state}");
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
async fn while_open(app: &TestApp, name: &str, dependency: &str, cold: bool) -> Report {
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
    open
}

/// Asks until an answer is not degraded; returns how long that took.
async fn recovery_time(app: &TestApp) -> Duration {
    let started = Instant::now();
    let token = support::mint_token("u-basic", "basic", 1, "KR");
    while started.elapsed() < PATIENCE {
        let resp = app.playback_info("m-0001", &token).await;
        if resp.status() == 200 {
            let body: Value = resp.json().await.unwrap();
            if body["degraded"] == false {
                return started.elapsed();
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("answers were still degraded {PATIENCE:?} after the fault ended");
}

/// Starts a session and sends a heartbeat during the fault; returns the position sent.
async fn write_position_during_fault(app: &TestApp, user: &str, position: u64) {
    let token = support::mint_token(user, "standard", 2, "KR");
    let resp = app.start_session(&token, "m-0001", "fault-device").await;
    assert_eq!(resp.status(), 201, "start during the fault");
    let body: Value = resp.json().await.unwrap();
    let id = body["session_id"].as_str().unwrap().to_owned();
    assert_eq!(
        app.heartbeat(&token, &id, position).await.status(),
        200,
        "heartbeat during the fault"
    );
}

async fn assert_position_delivered(app: &TestApp, user: &str, position: u64) {
    let api = app.api.clone();
    let user = user.to_owned();
    let ok = eventually(Duration::from_secs(30), move || {
        api.delivered()
            .iter()
            .any(|i| i["user_id"] == user.as_str() && i["position_ms"] == position)
    })
    .await;
    assert!(
        ok,
        "position {position} was lost; delivered: {:?}",
        app.api.delivered()
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
    let app = spawn_app_with(long_timeouts).await;
    let warm = drive(&app, Duration::from_millis(500), true).await;
    assert_clean(&format!("{name} (before)"), &warm);
    app.api.set_fault(fault);
    write_position_during_fault(&app, "u-standard", 31_000).await;
    let _ = drive(&app, Duration::from_secs(2), true).await;
    wait_for_breaker(&app, "internal_api", 2).await;
    let calls_before = app.api.total_calls();
    while_open(&app, name, "internal_api", true).await;
    let served = app.api.total_calls() - calls_before;
    assert!(served <= 10, "{name}: the internal API itself saw {served} calls");
    app.api.set_fault(Fault::None);
    let recovered = recovery_time(&app).await;
    println!("{name}: not degraded again after {recovered:?}");
    assert_position_delivered(&app, "u-standard", 31_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_api_answering_500() {
    internal_api_fault("internal API 500", Fault::Status500).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_api_hanging() {
    internal_api_fault("internal API hanging", Fault::Hang).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_api_answering_slowly() {
    // Slower than the timeout, so every call times out although it would be answered.
    internal_api_fault("internal API slow", Fault::Slow(DEPENDENCY_TIMEOUT * 2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_api_answering_garbage() {
    internal_api_fault("internal API garbage JSON", Fault::Garbage).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_api_refusing_connections() {
    let redis = RedisServer::start();
    let api = crate::helpers::spawn_fake_api().await;
    let proxy = FaultProxy::start(api.port).await;
    let proxy_port = proxy.port;
    let mut app = spawn_app_with(|v| {
        long_timeouts(v);
        v.retain(|(k, _)| k != "MONETA_INTERNAL_API_URL" && k != "MONETA_REDIS_URL");
        v.push((
            "MONETA_INTERNAL_API_URL".into(),
            format!("http://127.0.0.1:{proxy_port}"),
        ));
        v.push(("MONETA_REDIS_URL".into(), redis.url.clone()));
    })
    .await;
    // The app's own fake API is not used here; observe the proxied one.
    app.api = api.clone();
    let _ = drive(&app, Duration::from_millis(500), true).await;
    proxy.refuse();
    write_position_during_fault(&app, "u-standard", 41_000).await;
    let _ = drive(&app, Duration::from_secs(1), true).await;
    wait_for_breaker(&app, "internal_api", 2).await;
    while_open(&app, "internal API refusing", "internal_api", true).await;
    proxy.restore().await;
    let recovered = recovery_time(&app).await;
    println!("internal API refusing: not degraded again after {recovered:?}");
    assert_position_delivered(&app, "u-standard", 41_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted() {
    let mut app = spawn_app_with(long_timeouts).await;
    let _ = drive(&app, Duration::from_millis(500), false).await;
    let port = app.redis.port;
    app.redis.kill();
    write_position_during_fault(&app, "u-standard", 51_000).await;
    let _ = drive(&app, Duration::from_secs(1), false).await;
    wait_for_breaker(&app, "redis", 2).await;
    while_open(&app, "redis killed", "redis", false).await;
    app.redis = RedisServer::start_on(port);
    let recovered = recovery_time(&app).await;
    println!("redis restarted: not degraded again after {recovered:?}");
    assert_position_delivered(&app, "u-standard", 51_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused_with_sigstop() {
    let app = spawn_app_with(long_timeouts).await;
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
    wait_for_breaker(&app, "redis", 2).await;
    write_position_during_fault(&app, "u-premium", 61_000).await;
    while_open(&app, "redis paused", "redis", false).await;
    app.redis.resume();
    let recovered = recovery_time(&app).await;
    println!("redis resumed: not degraded again after {recovered:?}");
    assert_position_delivered(&app, "u-premium", 61_000).await;
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

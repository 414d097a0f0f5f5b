//! The client-side cache of entitlements and resume positions (RESP3
//! `CLIENT TRACKING`), checked on a fleet of real `moneta` processes sharing
//! one real redis-server: a change made anywhere reaches every instance's
//! cached answer, a reconnect forgets everything cached before it, and the
//! cache stays within its bound.
//!
//! Visibility is timed from the writer's reply to the first answer that shows
//! the change. The bound (50 ms) is checked on the median of several changes,
//! so one scheduling hiccup of a busy machine does not decide the outcome;
//! each change must still show within `PATIENCE`, far below the cache's own
//! TTL (one hour here), so only an invalidation can explain it.

#[path = "support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::redis_probe::RedisProbe;
use support::{
    FakeApi, MonetaProcess, PATIENCE, PublicApi, RedisServer, eventually, metric_value, mint_token,
    spawn_fake_api,
};

const TITLE: &str = "m-0001";
/// The issue's bound on how long an instance may answer from a stale copy.
const VISIBLE_WITHIN: Duration = Duration::from_millis(50);

struct Fleet {
    redis: RedisServer,
    api: FakeApi,
}

impl Fleet {
    async fn start() -> Fleet {
        Fleet {
            redis: RedisServer::start(),
            api: spawn_fake_api().await,
        }
    }

    /// An instance whose caches never expire during the test: what it answers
    /// is either current or stale, never merely re-read.
    fn member(&self, extra: &[(&'static str, String)]) -> MonetaProcess {
        let mut envs = vec![
            ("MONETA_REDIS_URL", self.redis.url.clone()),
            ("MONETA_INTERNAL_API_URL", self.api.url()),
            ("MONETA_REDIS_CLIENT_CACHE_TTL_MS", "3600000".to_owned()),
            ("MONETA_ENTITLEMENT_TTL_S", "3600".to_owned()),
            ("MONETA_CONTENT_LOCAL_TTL_MS", "3600000".to_owned()),
        ];
        envs.extend(extra.iter().cloned());
        MonetaProcess::start(&envs)
    }

    async fn probe(&self) -> RedisProbe {
        RedisProbe::connect(&self.redis.url).await
    }
}

fn entitlement_key(user: &str) -> String {
    support::redis_probe::user_key(user, "entitlement")
}

/// Calls Redis received since start, by command (`INFO commandstats`).
async fn command_calls(probe: &mut RedisProbe) -> BTreeMap<String, u64> {
    let info: String = probe.query(redis::cmd("INFO").arg("commandstats")).await;
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest.split("calls=").nth(1)?.split(',').next()?.parse().ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

async fn reads(probe: &mut RedisProbe) -> u64 {
    let calls = command_calls(probe).await;
    calls.get("get").copied().unwrap_or(0) + calls.get("hget").copied().unwrap_or(0)
}

/// Polls `api` until its playback-info answer satisfies `shows`; returns how
/// long that took.
async fn until_answer(api: &PublicApi, token: &str, shows: impl Fn(u16, &Value) -> bool) -> Duration {
    let started = Instant::now();
    let seen = eventually(PATIENCE, async || {
        let response = api.playback_info(TITLE, token).await;
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        shows(status, &body).then_some(())
    })
    .await;
    assert!(seen.is_some(), "the change never showed within {PATIENCE:?}");
    started.elapsed()
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn resume_of(body: &Value) -> Option<u64> {
    body["resume_position_ms"].as_u64()
}

#[tokio::test]
async fn a_heartbeat_through_one_instance_shows_in_the_others_cached_answer() {
    let fleet = Fleet::start().await;
    let writer = fleet.member(&[]);
    let reader = fleet.member(&[]);
    let (writer_api, reader_api) = (writer.public_api(), reader.public_api());
    let token = mint_token("u-standard", "standard", 2, "KR");
    let mut probe = fleet.probe().await;

    // The reader has looked the title up once: positions are cached only for
    // titles known to exist.
    assert_eq!(reader_api.playback_info(TITLE, &token).await.status(), 200);
    let session = writer_api.started_session(&token, TITLE, "tv").await;
    let mut lags = Vec::new();
    // Positions between the resume thresholds (5 % and 90 % of 132 min), so
    // the answer carries each one as it is.
    for position in (0..5).map(|i| 600_000 + i * 60_000) {
        assert_eq!(
            writer_api.heartbeat(&token, &session, position).await.status(),
            200
        );
        let lag = until_answer(&reader_api, &token, |status, body| {
            status == 200 && resume_of(body) == Some(position)
        })
        .await;
        lags.push(lag);

        // Now warm: repeated answers make no Redis read at all.
        let before = reads(&mut probe).await;
        for _ in 0..10 {
            let body = reader_api.playback_info_json(TITLE, &token).await;
            assert_eq!(resume_of(&body), Some(position));
        }
        assert_eq!(
            reads(&mut probe).await,
            before,
            "a warm answer is served from the instance's own copy"
        );
    }
    eprintln!("heartbeat → other instance's answer: {lags:?}");
    let typical = median(lags.clone());
    assert!(
        typical <= VISIBLE_WITHIN,
        "median visibility {typical:?} exceeds {VISIBLE_WITHIN:?}: {lags:?}"
    );

    // Exported every quarter second.
    let metrics = eventually(PATIENCE, async || {
        let metrics = reader.metrics().await;
        let hits = metric_value(
            &metrics,
            r#"moneta_redis_client_cache_requests_total{result="hit"}"#,
        )?;
        // Every heartbeat after the first changed a position the reader held.
        let invalidations = metric_value(&metrics, "moneta_redis_client_cache_invalidations_total")?;
        (hits >= 50.0 && invalidations >= 4.0).then_some(metrics)
    })
    .await
    .expect("hits and invalidations are exported");
    assert_eq!(
        metric_value(&metrics, "moneta_redis_client_cache_trusted"),
        Some(1.0)
    );
}

#[tokio::test]
async fn an_entitlement_rewritten_in_redis_shows_in_every_cached_answer() {
    let fleet = Fleet::start().await;
    let first = fleet.member(&[]);
    let second = fleet.member(&[]);
    let token = mint_token("u-premium", "premium", 4, "KR");
    let mut probe = fleet.probe().await;
    for instance in [&first, &second] {
        assert_eq!(
            instance.public_api().playback_info(TITLE, &token).await.status(),
            200
        );
    }
    let key = entitlement_key("u-premium");
    let granted: String = probe.query(redis::cmd("GET").arg(&key)).await;

    let mut lags = Vec::new();
    for (value, allowed) in [("null", false), (granted.as_str(), true), ("null", false)] {
        // Warm on both before the change, so a stale copy would be there to serve.
        for instance in [&first, &second] {
            let status = instance.public_api().playback_info(TITLE, &token).await.status();
            assert_eq!(status == 200, !allowed);
        }
        let _: () = probe
            .query(redis::cmd("SET").arg(&key).arg(value).arg("KEEPTTL"))
            .await;
        for instance in [&first, &second] {
            lags.push(
                until_answer(&instance.public_api(), &token, |status, _| {
                    (status == 200) == allowed && (allowed || status == 403)
                })
                .await,
            );
        }
    }
    eprintln!("entitlement rewrite → answers: {lags:?}");
    let typical = median(lags.clone());
    assert!(typical <= VISIBLE_WITHIN, "median {typical:?}: {lags:?}");
}

#[tokio::test]
async fn after_a_redis_restart_nothing_cached_before_is_served() {
    let mut fleet = Fleet::start().await;
    let instance = fleet.member(&[]);
    let api = instance.public_api();
    let token = mint_token("u-standard", "standard", 2, "KR");
    for _ in 0..3 {
        assert_eq!(api.playback_info(TITLE, &token).await.status(), 200);
    }

    // The new server holds "no entitlement" for the user: a copy that
    // survived the reconnect would keep answering 200 for an hour.
    let port = fleet.redis.port;
    fleet.redis.kill();
    fleet.redis = RedisServer::start_on(port);
    let mut probe = fleet.probe().await;
    let _: () = probe
        .query(redis::cmd("SET").arg(entitlement_key("u-standard")).arg("null"))
        .await;
    until_answer(&api, &token, |status, _| status == 403).await;
    for _ in 0..5 {
        assert_eq!(api.playback_info(TITLE, &token).await.status(), 403);
    }
    let metrics = instance.metrics().await;
    assert!(
        metric_value(&metrics, "moneta_redis_client_cache_distrusted_total").is_some_and(|n| n >= 1.0),
        "the lost connection withdrew trust"
    );
}

#[tokio::test]
async fn the_cache_holds_at_most_its_bound_and_can_be_turned_off() {
    let fleet = Fleet::start().await;
    // Two keys per user: room for one user's view at a time.
    let small = fleet.member(&[("MONETA_REDIS_CLIENT_CACHE_KEYS", "2".to_owned())]);
    let off = fleet.member(&[("MONETA_REDIS_CLIENT_CACHE_KEYS", "0".to_owned())]);
    let mut probe = fleet.probe().await;
    let tokens: Vec<String> = [
        ("u-basic", "basic"),
        ("u-standard", "standard"),
        ("u-premium", "premium"),
    ]
    .iter()
    .map(|(user, plan)| mint_token(user, plan, 2, "KR"))
    .collect();
    for instance in [&small, &off] {
        for token in &tokens {
            for _ in 0..2 {
                assert_eq!(
                    instance.public_api().playback_info(TITLE, token).await.status(),
                    200
                );
            }
        }
    }

    // The last user is still held; the first was pushed out by the others.
    let api = small.public_api();
    let before = reads(&mut probe).await;
    assert_eq!(api.playback_info(TITLE, &tokens[2]).await.status(), 200);
    assert_eq!(reads(&mut probe).await, before, "the most recent user is cached");
    assert_eq!(api.playback_info(TITLE, &tokens[0]).await.status(), 200);
    assert_eq!(reads(&mut probe).await, before + 2, "the oldest user was evicted");

    let api = off.public_api();
    let before = reads(&mut probe).await;
    assert_eq!(api.playback_info(TITLE, &tokens[2]).await.status(), 200);
    assert_eq!(
        reads(&mut probe).await,
        before + 2,
        "turned off, every answer reads Redis"
    );
    assert_eq!(
        metric_value(
            &off.metrics().await,
            r#"moneta_redis_client_cache_requests_total{result="hit"}"#
        ),
        None
    );
}

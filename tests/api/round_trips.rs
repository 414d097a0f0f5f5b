//! The hot path's Redis cost, counted by Redis itself (`INFO commandstats`):
//! a warm playback-info is no command at all with the client-side cache and
//! one pipeline of GET + HGET without it; a heartbeat is one script. Fails if
//! any grows.

use std::collections::BTreeMap;

use crate::helpers::{TestApp, spawn_app_with};
use crate::support::{PATIENCE, eventually, metric_value};

/// Client commands since the last reset, by name; the background probe's PING,
/// the outage watch's PING (ten times a second) and ZSCORE (once a second), never a request's, and
/// this test's own INFO/CONFIG are not requests' costs.
fn commands(app: &TestApp) -> BTreeMap<String, u64> {
    let client = redis::Client::open(app.redis.url.as_str()).unwrap();
    let mut conn = client.get_connection().unwrap();
    let info: String = redis::cmd("INFO").arg("commandstats").query(&mut conn).unwrap();
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest.split("calls=").nth(1)?.split(',').next()?.parse().ok()?;
            Some((name.to_owned(), calls))
        })
        .filter(|(name, _)| {
            !(name == "ping" || name == "zscore" || name == "info" || name.starts_with("config"))
        })
        .collect()
}

/// Waits for the courier's first tick, at start, to end: it counts the
/// backlog (`XLEN`, `HLEN` of every bucket) last, and on a loaded machine
/// that came after the reset and was counted as the requests'.
async fn courier_idle(app: &TestApp) {
    let counted = eventually(PATIENCE, async || {
        let metrics = app.metrics().await;
        metric_value(&metrics, r#"moneta_progress_backlog{kind="parked"}"#).map(drop)
    })
    .await;
    assert!(
        counted.is_some(),
        "the courier's first tick never counted the backlog"
    );
}

fn reset(app: &TestApp) {
    let client = redis::Client::open(app.redis.url.as_str()).unwrap();
    let mut conn = client.get_connection().unwrap();
    let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query(&mut conn).unwrap();
}

/// The counted reads find every cache warm, however long the test takes.
const CACHES_STAY_WARM: &[(&str, &str)] = &[
    ("MONETA_CONTENT_LOCAL_TTL_MS", "3600000"),
    ("MONETA_ENTITLEMENT_TTL_S", "3600"),
];

#[tokio::test]
async fn warm_playback_info_makes_no_round_trip_with_the_client_cache() {
    let mut settings = CACHES_STAY_WARM.to_vec();
    // The courier's periodic sweep measures the backlog (XLEN, HLEN of
    // every bucket); a loaded machine stretched the count over one.
    settings.push(("MONETA_PROGRESS_FLUSH_MS", "3600000"));
    let app = spawn_app_with(&settings).await;
    courier_idle(&app).await;
    let token = app.token("u-standard", "standard", 2, "KR");
    for _ in 0..3 {
        assert_eq!(app.playback_info("m-0001", &token).await.status(), 200);
    }
    reset(&app);
    for _ in 0..20 {
        assert_eq!(app.playback_info("m-0001", &token).await.status(), 200);
    }
    assert_eq!(
        commands(&app),
        BTreeMap::new(),
        "answered from the instance's own copy"
    );
}

#[tokio::test]
async fn warm_playback_info_is_one_pipeline_and_heartbeat_one_script() {
    let mut settings = CACHES_STAY_WARM.to_vec();
    settings.push(("MONETA_REDIS_CLIENT_CACHE_KEYS", "0"));
    // The courier's own round (a stream read and a settle script) would be
    // counted with the heartbeats'.
    settings.push(("MONETA_PROGRESS_FLUSH_MS", "3600000"));
    let app = spawn_app_with(&settings).await;
    courier_idle(&app).await;
    let token = app.token("u-standard", "standard", 2, "KR");
    for _ in 0..2 {
        assert_eq!(app.playback_info("m-0001", &token).await.status(), 200);
    }
    reset(&app);
    const N: u64 = 20;
    for _ in 0..N {
        assert_eq!(app.playback_info("m-0001", &token).await.status(), 200);
    }
    let counted = commands(&app);
    let expected: BTreeMap<String, u64> = [("get".to_owned(), N), ("hget".to_owned(), N)].into();
    assert_eq!(
        counted, expected,
        "a warm playback-info sends exactly GET + HGET in one pipeline"
    );

    let s_id = app.started_session(&token, "m-0001", "tv").await;
    let id = s_id.as_str();
    // The first call loads the script into Redis (NOSCRIPT, SCRIPT LOAD): once per process.
    assert_eq!(app.heartbeat(&token, id, 0).await.status(), 200);
    reset(&app);
    for p in 0..N {
        assert_eq!(app.heartbeat(&token, id, p * 1000).await.status(), 200);
    }
    let counted = commands(&app);
    assert_eq!(
        counted.get("evalsha"),
        Some(&N),
        "one script call per heartbeat: {counted:?}"
    );
    // GET/SET never run inside the scripts: seen here they would be extra round trips.
    assert!(
        !counted.contains_key("get") && !counted.contains_key("set"),
        "{counted:?}"
    );
}

//! CONTRACT §6, "Guarantees under abuse and failure", line by line: input
//! bounds, session ids and the stream limit under abuse, and the delivery of
//! resume positions when the internal API refuses or fails. What Redis holds
//! is read from Redis itself.
//!
//! The tests in `under_fault` stop Redis or the internal API; they run in
//! nextest's serial group (`.config/nextest.toml`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{TestApp, assert_invalid_token, spawn_app, spawn_app_with};
use crate::support::redis_probe::{Progress, user_key, user_keys};
use crate::support::{self, PATIENCE, PublicApi, RedisProbe, assert_error, eventually, metric_value};

const MAX_POSITION: u64 = (1 << 53) - 1;

/// What the contract bounds the wait for a position by, once the internal API answers.
const DELIVERY: Duration = Duration::from_secs(30);

/// A token signed with the dev secret, well-formed but for its `sub`.
fn token_for_sub(sub: Value) -> String {
    let now = chrono::Utc::now().timestamp();
    let claims = json!({
        "sub": sub, "exp": now + 3600, "iat": now,
        "plan": "standard", "max_streams": 2, "country": "KR"
    });
    moneta::auth::verifier::mint_hs256(support::DEV_SECRET, &claims).expect("sign")
}

async fn redis_of(app: &TestApp) -> RedisProbe {
    RedisProbe::connect(&app.redis.url).await
}

async fn metric(app: &TestApp, series: &str) -> Option<f64> {
    metric_value(&app.metrics().await, series)
}

/// Heartbeats that must be acknowledged.
async fn heartbeat_ok(app: &PublicApi, token: &str, session_id: &str, position_ms: u64) {
    let resp = app.heartbeat(token, session_id, position_ms).await;
    assert_eq!(resp.status(), 200, "heartbeat at {position_ms}");
}

/// Waits (at most the contract's bound) until `user`'s position for
/// `content_id` is exactly `position_ms` at the internal API.
async fn assert_delivered(app: &TestApp, user: &str, content_id: &str, position_ms: u64) {
    let found = eventually(DELIVERY, async || {
        app.api
            .delivered()
            .iter()
            .any(|i| i["user_id"] == user && i["content_id"] == content_id && i["position_ms"] == position_ms)
            .then_some(())
    })
    .await;
    assert!(
        found.is_some(),
        "{user}/{content_id} at {position_ms} never reached the internal API; it got {:?}",
        app.api.delivered()
    );
}

#[tokio::test]
async fn jwt_sub_is_1_to_128_bytes_without_control_characters() {
    let app = spawn_app().await;
    // The fake internal API entitles every `load-` user, so an accepted sub plays.
    let ascii = format!("load-{}", "x".repeat(123));
    let multibyte = format!("load-{}x", "é".repeat(61));
    for sub in [ascii, multibyte] {
        assert_eq!(sub.len(), 128);
        let resp = app
            .playback_info("m-0001", &token_for_sub(json!(sub.as_str())))
            .await;
        assert_eq!(resp.status(), 200, "sub of 128 bytes: {sub:?}");
    }
    let refused = [
        ("129 bytes", json!(format!("load-{}", "x".repeat(124)))),
        // 67 characters: bytes count, not characters.
        (
            "129 bytes of 67 characters",
            json!(format!("load-{}", "é".repeat(62))),
        ),
        ("empty", json!("")),
        ("NUL", json!("load-a\u{0}b")),
        ("bell", json!("load-a\u{7}b")),
        ("newline", json!("load-a\nb")),
        ("tab", json!("load-a\tb")),
        ("escape sequence", json!("load-\u{1b}[31mred")),
        ("DEL", json!("load-a\u{7f}")),
        ("C1 control", json!("load-a\u{85}b")),
        ("a number", json!(12345)),
        ("null", Value::Null),
    ];
    for (case, sub) in refused {
        let resp = app.playback_info("m-0001", &token_for_sub(sub)).await;
        assert_invalid_token(resp, case).await;
    }
}

#[tokio::test]
async fn position_ms_is_an_integer_from_0_to_2_pow_53_minus_1() {
    let app = spawn_app().await;
    let viewer = app.token("u-premium", "premium", 4, "KR");
    // Two titles, so the two accepted bounds are two (user, title) pairs
    // and neither can stand in for the other on delivery.
    let at_max = app.started_session(&viewer, "m-0001", "tv").await;
    let at_zero = app.started_session(&viewer, "m-0003", "phone").await;
    heartbeat_ok(&app, &viewer, &at_zero, 0).await;
    heartbeat_ok(&app, &viewer, &at_max, MAX_POSITION).await;
    assert_delivered(&app, "u-premium", "m-0001", MAX_POSITION).await;
    assert_delivered(&app, "u-premium", "m-0003", 0).await;

    let path = format!("/v1/playback/sessions/{at_max}");
    let json_body = "application/json";
    for bad in ["9007199254740992", "18446744073709551615", "-1", "1.5", "\"12\""] {
        let body = format!(r#"{{"position_ms": {bad}, "state": "playing"}}"#);
        let resp = app
            .send_raw(Method::PUT, &path, Some(&viewer), json_body, body)
            .await;
        assert_error(resp, 400, "invalid_body").await;
        let body = format!(r#"{{"position_ms": {bad}}}"#);
        let resp = app
            .send_raw(Method::DELETE, &path, Some(&viewer), json_body, body)
            .await;
        assert_error(resp, 400, "invalid_body").await;
    }
    // The refused stops ended nothing: this one finds the session.
    assert_eq!(app.stop_session_at(&viewer, &at_max, 0).await.status(), 204);

    let stopper = app.token("u-standard", "standard", 2, "KR");
    let id = app.started_session(&stopper, "m-0001", "tv").await;
    assert_eq!(
        app.stop_session_at(&stopper, &id, MAX_POSITION).await.status(),
        204
    );
    assert_delivered(&app, "u-standard", "m-0001", MAX_POSITION).await;
}

/// Tokens an HTTP method may be made of, none of them a method Moneta serves.
const METHOD_TOKENS: [&str; 30] = [
    "QWERTY",
    "FOO1",
    "M-SEARCH",
    "PROPFIND",
    "PROPPATCH",
    "MKCOL",
    "COPY",
    "MOVE",
    "LOCK",
    "UNLOCK",
    "REPORT",
    "MKACTIVITY",
    "CHECKOUT",
    "MERGE",
    "NOTIFY",
    "SUBSCRIBE",
    "UNSUBSCRIBE",
    "PURGE",
    "LINK",
    "UNLINK",
    "SEARCH",
    "MKCALENDAR",
    "TRACE",
    "BREW",
    "get",
    "Post",
    "X.Y_Z~1",
    "A!#$%&'*+^`|",
    "Z",
    "VERYLONGMETHODNAMEVERYLONGMETHODNAME",
];

/// The values of one label of one metric, as exported.
fn label_values(text: &str, metric: &str, label: &str) -> BTreeSet<String> {
    let start = format!("{metric}{{");
    let key = format!("{label}=\"");
    text.lines()
        .filter_map(|l| l.strip_prefix(&start))
        .filter_map(|l| Some(l.split_once(&key)?.1.split_once('"')?.0.to_owned()))
        .collect()
}

#[tokio::test]
async fn any_method_token_is_answered_and_labelled_from_a_closed_set() {
    let app = spawn_app().await;
    let token = app.token("u-basic", "basic", 1, "KR");
    let routes = [
        "/v1/playback/sessions",
        "/v1/contents/m-0001/playback-info",
        "/v1/playback/sessions/some-session",
        "/health/live",
        "/openapi.json",
    ];
    let unknown = [
        "/nope",
        "/v1/contents",
        "/v1/contents/m-0001/other",
        "/v1/playback/sessions/a/b",
    ];
    for (i, name) in METHOD_TOKENS.iter().enumerate() {
        let method = Method::from_bytes(name.as_bytes()).expect("a valid method token");
        let path = routes[i % routes.len()];
        let resp = PublicApi::send(app.request(method.clone(), path, Some(&token))).await;
        assert_eq!(resp.status(), 405, "{name} {path}");
        assert_error(resp, 405, "method_not_allowed").await;
        let path = unknown[i % unknown.len()];
        let resp = PublicApi::send(app.request(method, path, Some(&token))).await;
        assert_eq!(resp.status(), 404, "{name} {path}");
        assert_error(resp, 404, "not_found").await;
    }

    let text = app.metrics().await;
    let methods = label_values(&text, "moneta_http_requests_total", "method");
    let allowed: BTreeSet<String> = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "other",
    ]
    .map(String::from)
    .into();
    assert!(
        methods.contains("other"),
        "the requests above were counted: {methods:?}"
    );
    assert!(methods.is_subset(&allowed), "method labels {methods:?}");
    // Paths are client input too: only route templates become labels.
    let routes = label_values(&text, "moneta_http_requests_total", "route");
    let templates: BTreeSet<String> = [
        "/v1/contents/{content_id}/playback-info",
        "/v1/playback/sessions",
        "/v1/playback/sessions/{session_id}",
        "/health/live",
        "/health/ready",
        "/openapi.json",
        "unmatched",
    ]
    .map(String::from)
    .into();
    assert!(routes.is_subset(&templates), "route labels {routes:?}");
}

/// Each of the user's keys with its type and size.
async fn sizes(redis: &mut RedisProbe, user: &str) -> BTreeMap<String, (String, usize)> {
    redis
        .contents(&user_keys(user))
        .await
        .into_iter()
        .map(|(key, content)| {
            let size = content.size();
            (key, (content.kind, size))
        })
        .collect()
}

/// Fields the user's session keys hold (entitlement and positions aside).
async fn session_fields(redis: &mut RedisProbe, user: &str) -> usize {
    sizes(redis, user)
        .await
        .iter()
        .filter(|(key, _)| !key.ends_with(":entitlement") && !key.ends_with(":positions"))
        .map(|(_, (_, size))| size)
        .sum()
}

#[tokio::test]
async fn titles_a_caller_may_not_play_leave_no_state_that_grows() {
    // The cached entitlement outlives the test however slow the machine: its
    // expiry would change the user's keys without any request.
    let app = spawn_app_with(&[("MONETA_ENTITLEMENT_TTL_S", "3600")]).await;
    // A basic plan (m-0002 is premium only) in the US (m-0003 plays in KR only).
    let token = app.token("u-basic", "basic", 1, "US");
    let mut redis = redis_of(&app).await;
    // A title the caller may play leaves state, which the rest must not grow.
    assert_eq!(app.playback_info("m-0001", &token).await.status(), 200);

    let mut after_first = BTreeMap::new();
    for round in 1..=75 {
        let made_up = format!("made-up-{round}");
        let refusals = [
            (made_up.as_str(), 404, "content_not_found"),
            ("m-0002", 403, "plan_not_eligible"),
            ("m-0003", 403, "region_unavailable"),
        ];
        for (title, status, code) in refusals {
            assert_error(app.playback_info(title, &token).await, status, code).await;
            assert_error(app.start_session(&token, title, "tv").await, status, code).await;
        }
        if round == 1 {
            after_first = sizes(&mut redis, "u-basic").await;
        }
    }
    assert!(!after_first.is_empty(), "the played title left no state to watch");
    assert_eq!(sizes(&mut redis, "u-basic").await, after_first);
    // Nor anything of the titles that do not exist, under any key.
    let keys: Vec<String> = redis.query(redis::cmd("KEYS").arg("*made-up*")).await;
    assert_eq!(keys, Vec::<String>::new());
}

#[tokio::test]
async fn a_start_refused_with_409_changes_nothing() {
    let app = spawn_app_with(&[WITHOUT_CLIENT_CACHE]).await;
    let two = app.token("u-standard", "standard", 2, "KR");
    let mut live = BTreeSet::new();
    for device in ["device-a", "device-b"] {
        live.insert(app.started_session(&two, "m-0001", device).await);
    }

    // The plan drops to one stream: the internal API and the new token say so,
    // and the cached entitlement is forgotten.
    app.api.state.entitlements.lock().unwrap().insert(
        "u-standard".into(),
        json!({"user_id": "u-standard", "plan": "standard", "max_streams": 1, "active": true}),
    );
    let mut redis = redis_of(&app).await;
    let _: i64 = redis
        .query(redis::cmd("DEL").arg(user_key("u-standard", "entitlement")))
        .await;
    let one = app.token("u-standard", "standard", 1, "KR");
    assert_eq!(app.playback_info("m-0001", &one).await.status(), 200);
    let before = redis.contents(&user_keys("u-standard")).await;

    // Device A again: its own session would be replaced, but B alone fills the limit.
    let resp = app.start_session(&one, "m-0001", "device-a").await;
    let body = assert_error(resp, 409, "stream_limit_reached").await;
    assert_eq!(body["error"]["max_streams"], 1, "{body}");

    assert_eq!(redis.contents(&user_keys("u-standard")).await, before);
    let listed: BTreeSet<String> = app.sessions(&one).await["sessions"]
        .as_array()
        .expect("sessions")
        .iter()
        .map(|s| s["session_id"].as_str().expect("session_id").to_owned())
        .collect();
    assert_eq!(listed, live);
    for id in &live {
        heartbeat_ok(&app, &one, id, 1_000).await;
    }
}

#[tokio::test]
async fn the_progress_log_has_its_delivery_group_from_the_start() {
    let app = spawn_app().await;
    let mut redis = redis_of(&app).await;
    let has_group = async |redis: &mut RedisProbe| {
        eventually(PATIENCE, async || {
            redis.every_log_has_its_group().await.then_some(())
        })
        .await
        .is_some()
    };
    assert!(
        has_group(&mut redis).await,
        "no group `delivery` on every bucket's log before any traffic"
    );

    let token = app.token("u-basic", "basic", 1, "KR");
    let id = app.started_session(&token, "m-0001", "tv").await;
    heartbeat_ok(&app, &token, &id, 5_000).await;
    assert_delivered(&app, "u-basic", "m-0001", 5_000).await;
    // Delivered entries are acknowledged and leave the log.
    let settled = eventually(PATIENCE, async || {
        (redis.progress_log_state().await == (0, 0)).then_some(())
    })
    .await;
    assert!(settled.is_some(), "a delivered entry stayed in the log");

    // Redis lost its data: the group comes back, and positions flow again.
    let _: () = redis.query(&redis::cmd("FLUSHALL")).await;
    assert!(
        has_group(&mut redis).await,
        "the group never came back after Redis lost its data"
    );
    let id = app.started_session(&token, "m-0001", "tv").await;
    heartbeat_ok(&app, &token, &id, 6_000).await;
    assert_delivered(&app, "u-basic", "m-0001", 6_000).await;
}

/// For tests that change an entitlement in Redis behind Moneta's back and
/// act on it at once: with the in-process copy, the invalidation reaches
/// Moneta on its own connection a little later (the copy's coherence is
/// tests/client_cache.rs' subject), and a start in between saw the old plan.
const WITHOUT_CLIENT_CACHE: (&str, &str) = ("MONETA_REDIS_CLIENT_CACHE_KEYS", "0");

/// Fault-style tests: Redis killed or frozen, the internal API failing.
/// Sets the entitlement Moneta reads first (Redis' copy), as a plan change
/// at the internal API would once the copy is refreshed.
async fn entitle(redis: &mut RedisProbe, user: &str, max_streams: u32) {
    let entitlement = json!({"user_id": user, "plan": "premium", "max_streams": max_streams, "active": true});
    let key = user_key(user, "entitlement");
    redis
        .query::<()>(
            redis::cmd("SET")
                .arg(key)
                .arg(entitlement.to_string())
                .arg("EX")
                .arg(3600),
        )
        .await;
}

fn evicted_ids(body: &Value) -> Vec<String> {
    body["evicted_session_ids"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|id| id.as_str().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn evict_oldest_state_stays_bounded_and_a_downgrade_ends_every_extra_session() {
    let app = spawn_app_with(&[
        ("MONETA_STREAM_LIMIT_POLICY", "evict_oldest"),
        WITHOUT_CLIENT_CACHE,
    ])
    .await;
    let mut redis = redis_of(&app).await;
    let user = "u-evicting";
    let token = app.token(user, "premium", 3, "KR");
    entitle(&mut redis, user, 3).await;

    let mut live = Vec::new();
    for device in ["tv", "phone", "tablet"] {
        live.push(app.started_session(&token, "m-0001", device).await);
    }
    // The plan drops to one stream: the next start ends all three.
    entitle(&mut redis, user, 1).await;
    let resp = app.start_session(&token, "m-0001", "laptop").await;
    assert_eq!(resp.status(), 201);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(evicted_ids(&body), live, "oldest first, every extra one");
    assert_eq!(
        body["evicted_session_id"].as_str(),
        live.last().map(String::as_str)
    );
    assert_eq!(app.live_session_ids(&token).await.len(), 1);
    for id in &live {
        assert_error(app.heartbeat(&token, id, 1_000).await, 409, "session_evicted").await;
    }

    // Evicting starts by the hundred leave state bounded by the limit, not by their number.
    for i in 0..150 {
        let resp = app.start_session(&token, "m-0001", &format!("device-{i}")).await;
        assert_eq!(resp.status(), 201, "start {i}");
    }
    let fields = session_fields(&mut redis, user).await;
    // Per live session: its score, info and device (3); ended ids kept: the
    // limit + 16, a mark for the evicted ones forgotten one by one and one
    // for the time before the first ending.
    assert!(
        fields <= 3 + 1 + 16 + 1 + 1,
        "{fields} fields after 150 evicting starts: {:?}",
        sizes(&mut redis, user).await
    );
    assert_eq!(app.live_session_ids(&token).await.len(), 1);
    // Redis no longer lists the first of them one by one, and still knows
    // that every one was evicted: none comes back.
    for id in &live {
        assert_error(app.heartbeat(&token, id, 2_000).await, 409, "session_evicted").await;
    }
    assert_eq!(app.live_session_ids(&token).await.len(), 1);
}

/// Past what Redis lists one by one, an ended session still answers as it
/// ended: a stopped one `404`, an evicted one `409`, however many endings
/// of the other kind came before or after it.
#[tokio::test]
async fn forgotten_endings_keep_their_kind() {
    let app = spawn_app_with(&[
        ("MONETA_STREAM_LIMIT_POLICY", "evict_oldest"),
        WITHOUT_CLIENT_CACHE,
    ])
    .await;
    let mut redis = redis_of(&app).await;
    let user = "u-kinds";
    let token = app.token(user, "premium", 1, "KR");
    entitle(&mut redis, user, 1).await;
    // Ids carry the millisecond they were issued in; kinds are told apart by it.
    let tick = || tokio::time::sleep(Duration::from_millis(2));
    let mut stopped = Vec::new();
    let mut evicted = Vec::new();
    for round in 0..3 {
        let id = app.started_session(&token, "m-0001", "tv").await;
        assert_eq!(app.stop_session(&token, &id).await.status(), 204);
        stopped.push(id);
        tick().await;
        for i in 0..20 {
            if i == 19 {
                // The last start is stopped below, not evicted: a start
                // in the same millisecond as the one it evicts would share
                // its kind.
                tick().await;
            }
            evicted.push(
                app.started_session(&token, "m-0001", &format!("d-{round}-{i}"))
                    .await,
            );
        }
        tick().await;
        // The last start still plays; it is stopped next round.
        let playing = evicted.pop().expect("started");
        assert_eq!(app.stop_session(&token, &playing).await.status(), 204);
        stopped.push(playing);
        tick().await;
    }
    for id in &stopped {
        assert_error(app.heartbeat(&token, id, 1_000).await, 404, "session_not_found").await;
    }
    for id in &evicted {
        assert_error(app.heartbeat(&token, id, 1_000).await, 409, "session_evicted").await;
    }
    let fields = session_fields(&mut redis, user).await;
    // No live session; ended ids listed (the limit + 16) and at most 32 runs.
    assert!(
        fields <= 1 + 16 + 32,
        "{fields} fields after {} endings: {:?}",
        stopped.len() + evicted.len(),
        sizes(&mut redis, user).await
    );

    // A long session, issued before sessions evicted and forgotten, and
    // stopped after them: forgotten at once, inside their span.
    let user = "u-long";
    let token = app.token(user, "premium", 2, "KR");
    entitle(&mut redis, user, 2).await;
    let long = app.started_session(&token, "m-0001", "tv").await;
    tick().await;
    let mut evicted = Vec::new();
    for i in 0..20 {
        // Its heartbeats keep it the newest: each start evicts the other one
        // (a tick apart, or a heartbeat in the same Redis millisecond as the
        // last start would tie with it).
        tick().await;
        heartbeat_ok(&app, &token, &long, 1_000).await;
        evicted.push(app.started_session(&token, "m-0001", &format!("d-{i}")).await);
    }
    let playing = evicted.pop().expect("started");
    assert_eq!(app.stop_session(&token, &long).await.status(), 204);
    assert_error(
        app.heartbeat(&token, &long, 2_000).await,
        404,
        "session_not_found",
    )
    .await;
    for id in &evicted {
        assert_error(app.heartbeat(&token, id, 2_000).await, 409, "session_evicted").await;
    }
    heartbeat_ok(&app, &token, &playing, 2_000).await;
}

#[tokio::test]
async fn ended_sessions_stay_ended_after_many_more_end() {
    let app = spawn_app_with(&[WITHOUT_CLIENT_CACHE]).await;
    let mut redis = redis_of(&app).await;
    let user = "u-many-ends";
    let token = app.token(user, "standard", 2, "KR");
    entitle(&mut redis, user, 2).await;
    // Stopped, and replaced by a start from the same device, each many times
    // over what Redis lists one by one.
    let mut stopped = Vec::new();
    for _ in 0..25 {
        let id = app.started_session(&token, "m-0001", "tv").await;
        assert_eq!(app.stop_session(&token, &id).await.status(), 204);
        stopped.push(id);
    }
    let mut replaced = Vec::new();
    for _ in 0..25 {
        replaced.push(app.started_session(&token, "m-0001", "phone").await);
    }
    let playing = replaced.pop().expect("the last start plays");
    for id in stopped.iter().chain(&replaced) {
        assert_error(app.heartbeat(&token, id, 1_000).await, 404, "session_not_found").await;
    }
    assert_eq!(
        app.live_session_ids(&token).await,
        BTreeSet::from([playing.clone()]),
        "no ended session was recorded again"
    );
    heartbeat_ok(&app, &token, &playing, 2_000).await;
    // What fifty endings leave: the live session (3), the ended ids listed
    // (the limit + 16), the mark of the stopped ones forgotten and the one
    // for the time before the first ending.
    let fields = session_fields(&mut redis, user).await;
    assert!(
        fields <= 3 + 2 + 16 + 1 + 1,
        "{fields} fields after 50 endings: {:?}",
        sizes(&mut redis, user).await
    );
}

#[tokio::test]
async fn sessions_redis_lost_come_back_within_the_limit_and_ended_ones_stay_ended() {
    let app = spawn_app().await;
    let mut redis = redis_of(&app).await;
    // load- users have two streams at the internal API.
    let token = app.token("load-flushed", "standard", 2, "KR");
    let first = app.started_session(&token, "m-0001", "tv").await;
    let second = app.started_session(&token, "m-0001", "phone").await;
    assert_eq!(app.stop_session(&token, &first).await.status(), 204);
    assert_error(
        app.heartbeat(&token, &first, 5_000).await,
        404,
        "session_not_found",
    )
    .await;

    // Redis loses everything (a restart without persistence, a failover to an empty replica).
    redis.query::<()>(&redis::cmd("FLUSHALL")).await;
    let third = app.started_session(&token, "m-0001", "laptop").await;
    // A player that saw nothing keeps playing while the limit allows.
    heartbeat_ok(&app, &token, &second, 60_000).await;
    assert_eq!(
        app.live_session_ids(&token).await,
        BTreeSet::from([second.clone(), third.clone()])
    );
    // Redis forgot that `first` ended; recording it again would exceed the limit.
    let body = assert_error(
        app.heartbeat(&token, &first, 61_000).await,
        409,
        "stream_limit_reached",
    )
    .await;
    assert_eq!(body["error"]["max_streams"], 2);
    assert_eq!(
        app.live_session_ids(&token).await,
        BTreeSet::from([second.clone(), third.clone()]),
        "a refused heartbeat changes nothing"
    );
    assert_delivered(&app, "load-flushed", "m-0001", 60_000).await;
    // Ended stays ended: a stop, then a stray heartbeat of the same id.
    assert_eq!(app.stop_session_at(&token, &second, 62_000).await.status(), 204);
    assert_error(
        app.heartbeat(&token, &second, 63_000).await,
        404,
        "session_not_found",
    )
    .await;
    assert_delivered(&app, "load-flushed", "m-0001", 62_000).await;
}

#[tokio::test]
async fn a_stop_of_a_session_redis_lost_records_its_final_position() {
    let app = spawn_app().await;
    let mut redis = redis_of(&app).await;
    let token = app.token("load-final", "standard", 2, "KR");
    let session = app.started_session(&token, "m-0001", "tv").await;
    redis.query::<()>(&redis::cmd("FLUSHALL")).await;
    // 900 s of 7920: past the 5 % under which there is no resume point.
    assert_eq!(app.stop_session_at(&token, &session, 900_000).await.status(), 204);
    assert_delivered(&app, "load-final", "m-0001", 900_000).await;
    assert_error(
        app.heartbeat(&token, &session, 901_000).await,
        404,
        "session_not_found",
    )
    .await;
    let info = app.playback_info_json("m-0001", &token).await;
    assert_eq!(info["resume_position_ms"], 900_000);
}

/// Starts and stops more sessions on one device than Redis lists ended ids
/// one by one, so that the earliest are judged by runs.
async fn end_more_than_listed(app: &TestApp, token: &str) {
    for _ in 0..25 {
        let id = app.started_session(token, "m-0001", "phone").await;
        assert_eq!(app.stop_session(token, &id).await.status(), 204);
    }
}

/// Sessions started while Redis hangs are recorded by their first heartbeat
/// after the outage, however many sessions their user ended meanwhile:
/// Redis judges forgotten ids by when they were issued, and these were
/// issued without it. One start waits for Redis in vain (Redis runs it late,
/// too late to count), one finds the breaker open.
#[tokio::test]
async fn sessions_started_while_redis_hangs_outlive_endings_before_their_first_heartbeat() {
    let app = spawn_app().await;
    // load- users have two streams at the internal API.
    let token = app.token("load-outage-start", "standard", 2, "KR");
    let phone = app.started_session(&token, "m-0001", "phone").await;
    heartbeat_ok(&app, &token, &phone, 1_000).await;

    app.redis.pause();
    let waited = app.start_session(&token, "m-0001", "tv").await;
    let breaker_open = r#"moneta_circuit_breaker_state{dependency="redis"}"#;
    let open = eventually(PATIENCE, async || {
        heartbeat_ok(&app, &token, &phone, 2_000).await;
        (metric(&app, breaker_open).await == Some(2.0)).then_some(())
    })
    .await;
    let turned_away = app.start_session(&token, "m-0001", "tablet").await;
    app.redis.resume();
    assert!(open.is_some(), "the Redis breaker never opened");
    let mut outage_started = Vec::new();
    for resp in [waited, turned_away] {
        assert_eq!(resp.status(), 201, "a start while Redis hangs");
        let started: Value = resp.json().await.expect("JSON");
        assert_eq!(started["playback"]["degraded"], true, "{started}");
        outage_started.push(started["session_id"].as_str().expect("session_id").to_owned());
    }

    // More endings than Redis lists one by one, by starts it counted.
    let fresh = eventually(PATIENCE, async || {
        let resp = app.start_session(&token, "m-0001", "phone").await;
        let body: Value = resp.json().await.ok()?;
        (body["playback"]["degraded"] == false).then_some(())
    })
    .await;
    assert!(fresh.is_some(), "starts never counted by Redis again");
    end_more_than_listed(&app, &token).await;
    for id in &outage_started {
        heartbeat_ok(&app, &token, id, 3_000).await;
    }
    assert_eq!(
        app.live_session_ids(&token).await,
        outage_started.iter().cloned().collect::<BTreeSet<_>>()
    );
}

/// A session Redis lost is recorded again by its heartbeat however many
/// sessions its user ends first: Redis judges forgotten ids by when they
/// were issued, and knows of no ending from before it lost its data.
#[tokio::test]
async fn a_session_redis_lost_outlives_endings_before_its_first_heartbeat() {
    let app = spawn_app().await;
    let mut redis = redis_of(&app).await;
    // load- users have two streams at the internal API.
    let token = app.token("load-lost-then-ends", "standard", 2, "KR");
    let tv = app.started_session(&token, "m-0001", "tv").await;
    redis.query::<()>(&redis::cmd("FLUSHALL")).await;
    end_more_than_listed(&app, &token).await;
    heartbeat_ok(&app, &token, &tv, 2_000).await;
    assert_eq!(app.live_session_ids(&token).await, BTreeSet::from([tv]));
}

/// A session Redis lost comes back under the device it started on, so a
/// new start on that device replaces it instead of counting against it.
#[tokio::test]
async fn a_session_redis_lost_is_replaced_by_a_start_on_its_device() {
    let app = spawn_app().await;
    let mut redis = redis_of(&app).await;
    // load- users have two streams at the internal API.
    let token = app.token("load-device", "standard", 2, "KR");
    let tv = app.started_session(&token, "m-0001", "tv.living:room").await;
    let phone = app.started_session(&token, "m-0001", "phone").await;
    redis.query::<()>(&redis::cmd("FLUSHALL")).await;
    heartbeat_ok(&app, &token, &tv, 10_000).await;
    heartbeat_ok(&app, &token, &phone, 11_000).await;
    let devices = |listed: Value| -> BTreeMap<String, String> {
        listed["sessions"]
            .as_array()
            .unwrap_or_else(|| panic!("no sessions in {listed}"))
            .iter()
            .map(|s| (s["session_id"].to_string(), s["device_id"].to_string()))
            .collect()
    };
    assert_eq!(
        devices(app.sessions(&token).await),
        BTreeMap::from([
            (json!(tv).to_string(), json!("tv.living:room").to_string()),
            (json!(phone).to_string(), json!("phone").to_string())
        ])
    );
    // The television restarts its player: same device, so not a third stream.
    let again = app.started_session(&token, "m-0001", "tv.living:room").await;
    assert_eq!(
        app.live_session_ids(&token).await,
        BTreeSet::from([again, phone.clone()])
    );
    assert_error(app.heartbeat(&token, &tv, 12_000).await, 404, "session_not_found").await;
    heartbeat_ok(&app, &token, &phone, 13_000).await;
}

/// Two sessions of one device, the first replaced by the second, and Redis
/// loses both: whichever heartbeat comes first, the device counts once and
/// the later session is the one that plays.
#[tokio::test]
async fn sessions_of_one_device_redis_lost_count_once() {
    let app = spawn_app().await;
    let mut redis = redis_of(&app).await;
    for (user, replaced_first) in [("load-one-device-a", true), ("load-one-device-b", false)] {
        let token = app.token(user, "standard", 2, "KR");
        let replaced = app.started_session(&token, "m-0001", "tv").await;
        // Ids carry the millisecond they were issued in, which orders them.
        tokio::time::sleep(Duration::from_millis(2)).await;
        let playing = app.started_session(&token, "m-0001", "tv").await;
        redis.query::<()>(&redis::cmd("FLUSHALL")).await;
        if replaced_first {
            // Recorded again, until the later session of its device comes.
            heartbeat_ok(&app, &token, &replaced, 10_000).await;
            heartbeat_ok(&app, &token, &playing, 11_000).await;
        } else {
            heartbeat_ok(&app, &token, &playing, 11_000).await;
        }
        assert_error(
            app.heartbeat(&token, &replaced, 12_000).await,
            404,
            "session_not_found",
        )
        .await;
        assert_eq!(
            app.live_session_ids(&token).await,
            BTreeSet::from([playing.clone()])
        );
        // The other slot is free for another device.
        app.started_session(&token, "m-0001", "phone").await;
        heartbeat_ok(&app, &token, &playing, 13_000).await;
    }
}

mod under_fault {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::support::{Fault, RedisServer};

    /// Calls the Redis bulkhead turned away.
    async fn redis_rejected_full(app: &TestApp) -> f64 {
        app.metrics()
            .await
            .lines()
            .filter(|l| l.starts_with("moneta_dependency_requests_total{"))
            .filter(|l| l.contains("dependency=\"redis\"") && l.contains("outcome=\"rejected_full\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// `id` with the character at `at` replaced by another of the same alphabet.
    fn altered(id: &str, at: usize) -> String {
        let mut chars: Vec<char> = id.chars().collect();
        chars[at] = if chars[at] == 'a' { 'b' } else { 'a' };
        chars.into_iter().collect()
    }

    #[tokio::test]
    async fn session_ids_moneta_did_not_issue_to_the_caller_are_404_while_redis_is_down() {
        let mut app = spawn_app().await;
        let alice = app.token("u-standard", "standard", 2, "KR");
        let bob = app.token("u-premium", "premium", 4, "KR");
        let own = app.started_session(&alice, "m-0001", "tv").await;
        let bobs = app.started_session(&bob, "m-0001", "tv").await;
        app.redis.kill();

        let mac_at = own.rfind('.').expect("id has a MAC") + 1;
        let random = own.split('.').next().expect("id has parts");
        let forged = [
            ("a wrong MAC", altered(&own, mac_at)),
            ("another random part", altered(&own, 0)),
            ("another title", own.replace(".m-0001.", ".m-0002.")),
            (
                "a made-up id",
                format!("{}.m-0001.{}", "0".repeat(random.len()), "A".repeat(22)),
            ),
            ("another user's id", bobs),
        ];
        for (n, (case, id)) in forged.iter().enumerate() {
            assert_ne!(id, &own, "{case}");
            let position = 900_000 + n as u64;
            let resp = app.heartbeat(&alice, id, position).await;
            assert_error(resp, 404, "session_not_found").await;
            let resp = app.stop_session_at(&alice, id, position).await;
            assert_error(resp, 404, "session_not_found").await;
        }
        let resp = app.heartbeat(&alice, &own, 4_242).await;
        assert_eq!(resp.status(), 200, "the caller's own session, Redis down");
        assert_delivered(&app, "u-standard", "m-0001", 4_242).await;
        let forged_positions: Vec<Value> = app
            .api
            .delivered()
            .into_iter()
            .filter(|i| i["position_ms"].as_u64().is_some_and(|p| p >= 900_000))
            .collect();
        assert!(forged_positions.is_empty(), "{forged_positions:?}");
    }

    #[tokio::test]
    async fn a_full_redis_bulkhead_answers_503_and_starts_nothing() {
        // One call at a time, each waiting up to 10 s on a frozen Redis: a
        // single call in flight fills the bulkhead long before any timeout.
        let app = spawn_app_with(&[
            ("MONETA_REDIS_MAX_CONCURRENCY", "1"),
            ("MONETA_REDIS_TIMEOUT_MS", "10000"),
            ("MONETA_REQUEST_TIMEOUT_MS", "60000"),
        ])
        .await;
        let token = app.token("u-standard", "standard", 2, "KR");
        // With one slot, the courier's own rounds fill the bulkhead now and then,
        // and a start meeting one of them is refused: it is tried again.
        let before = eventually(PATIENCE, async || {
            let resp = app.start_session(&token, "m-0001", "phone").await;
            match resp.status().as_u16() {
                201 => Some(resp.json::<Value>().await.expect("JSON")["session_id"].clone()),
                503 => None,
                other => panic!("session start: {other}"),
            }
        })
        .await
        .expect("no start found the slot free");
        let before = before.as_str().expect("session_id").to_owned();
        let turned_away = redis_rejected_full(&app).await;

        app.redis.pause();
        let holder = {
            let api = app.public.clone();
            let token = token.clone();
            tokio::spawn(async move { api.get("/v1/playback/sessions", &token).await.status() })
        };
        // Someone (the request above, or the courier) holds the only slot once
        // another Redis call is turned away.
        let full = eventually(PATIENCE, async || {
            (redis_rejected_full(&app).await > turned_away).then_some(())
        })
        .await;
        assert!(full.is_some(), "the bulkhead never filled");

        let resp = app.start_session(&token, "m-0001", "tv").await;
        let retry_after = resp.headers().get("retry-after").cloned();
        assert_error(resp, 503, "dependency_unavailable").await;
        assert!(retry_after.is_some(), "503 without Retry-After");

        app.redis.resume();
        holder.await.expect("the holding request");
        let listed = eventually(PATIENCE, async || {
            let list = app.sessions(&token).await;
            (list["degraded"] == false).then_some(list)
        })
        .await
        .expect("the session list never came back from Redis");
        let ids: Vec<&str> = listed["sessions"]
            .as_array()
            .expect("sessions")
            .iter()
            .filter_map(|s| s["session_id"].as_str())
            .collect();
        assert_eq!(ids, [before.as_str()], "{listed}");
    }

    async fn wait_parked(redis: &mut RedisProbe, n: u64) {
        let parked = eventually(PATIENCE, async || {
            (redis.total(Progress::Parked).await == n).then_some(())
        })
        .await;
        assert!(parked.is_some(), "never {n} parked pairs");
    }

    #[tokio::test]
    async fn a_refused_item_is_dropped_alone_and_not_retried() {
        let app = spawn_app().await;
        let users: Vec<String> = ["load-r1", "load-r2", "load-poison", "load-r3", "load-r4"]
            .map(String::from)
            .into();
        let sessions = app.watching(&users).await;
        // Parked while the API fails, the five go out together in one batch.
        app.api.set_fault(Fault::Status500);
        for (n, (token, id)) in sessions.iter().enumerate() {
            heartbeat_ok(&app, token, id, 7_000 + n as u64).await;
        }
        let mut redis = redis_of(&app).await;
        wait_parked(&mut redis, 5).await;
        app.api.refuse_user("load-poison");
        app.api.set_fault(Fault::None);

        for (n, user) in users.iter().enumerate() {
            if user != "load-poison" {
                assert_delivered(&app, user, "m-0001", 7_000 + n as u64).await;
            }
        }
        let dropped = r#"moneta_progress_dropped_total{reason="refused"}"#;
        let counted = eventually(PATIENCE, async || {
            (metric(&app, dropped).await == Some(1.0)).then_some(())
        })
        .await;
        assert!(counted.is_some(), "{dropped}: {:?}", metric(&app, dropped).await);
        let refused = app.api.refused_batches();
        assert!(
            refused
                .iter()
                .any(|b| b["items"].as_array().is_some_and(|i| i.len() > 1)),
            "the poisoned item never shared a batch: {refused:?}"
        );
        assert!(app.api.delivered().iter().all(|i| i["user_id"] != "load-poison"));
        wait_parked(&mut redis, 0).await;

        // Given every chance to be offered again; a slow machine only makes this check weaker.
        let seen = app.api.refused_batches().len();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            app.api.refused_batches().len(),
            seen,
            "the refused item is offered again"
        );
        assert_eq!(metric(&app, dropped).await, Some(1.0));
    }

    /// An internal API that takes an empty batch but refuses every item (a
    /// gateway in the way, a schema change) is misconfigured, not shown
    /// invalid items: nothing is dropped, everything waits.
    #[tokio::test]
    async fn items_refused_when_none_gets_through_wait_instead_of_being_dropped() {
        let app = spawn_app().await;
        let users: Vec<String> = (1..=3).map(|i| format!("load-all-refused-{i}")).collect();
        let sessions = app.watching(&users).await;
        for user in &users {
            app.api.refuse_user(user);
        }
        for (n, (token, id)) in sessions.iter().enumerate() {
            heartbeat_ok(&app, token, id, 8_000 + n as u64).await;
        }
        let refused_alone = eventually(PATIENCE, async || {
            let batches = app.api.refused_batches();
            let alone = batches
                .iter()
                .filter(|b| b["items"].as_array().is_some_and(|i| i.len() == 1));
            (alone.count() >= users.len()).then_some(())
        })
        .await;
        assert!(refused_alone.is_some(), "{:?}", app.api.refused_batches());
        for user in &users {
            app.api.accept_user(user);
        }
        for (n, user) in users.iter().enumerate() {
            assert_delivered(&app, user, "m-0001", 8_000 + n as u64).await;
        }
        let dropped = r#"moneta_progress_dropped_total{reason="refused"}"#;
        assert_eq!(metric(&app, dropped).await.unwrap_or(0.0), 0.0);
    }

    #[tokio::test]
    async fn parked_positions_are_delivered_alongside_traffic() {
        let app = spawn_app().await;
        let parked_users: Vec<String> = (0..20).map(|i| format!("load-parked-{i}")).collect();
        let live_users: Vec<String> = (0..5).map(|i| format!("load-live-{i}")).collect();
        let parked_sessions = app.watching(&parked_users).await;
        let live_sessions = app.watching(&live_users).await;

        app.api.set_fault(Fault::Status500);
        for (n, (token, id)) in parked_sessions.iter().enumerate() {
            heartbeat_ok(&app, token, id, 10_000 + n as u64).await;
        }
        let gauge = r#"moneta_progress_backlog{kind="parked"}"#;
        let parked = eventually(PATIENCE, async || {
            (metric(&app, gauge).await == Some(20.0)).then_some(())
        })
        .await;
        assert!(parked.is_some(), "{gauge}: {:?}", metric(&app, gauge).await);

        let stop = Arc::new(AtomicBool::new(false));
        let traffic = {
            let api = app.public.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                // Bounded: 60 s of heartbeats at most.
                for round in 1..=300u64 {
                    if stop.load(Ordering::Relaxed) {
                        return Some(round - 1);
                    }
                    for (token, id) in &live_sessions {
                        heartbeat_ok(&api, token, id, round * 1_000).await;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                None
            })
        };
        app.api.set_fault(Fault::None);
        let all = eventually(DELIVERY, async || {
            parked_users
                .iter()
                .enumerate()
                .all(|(n, user)| app.api.received_position(user, 10_000 + n as u64))
                .then_some(())
        })
        .await;
        stop.store(true, Ordering::Relaxed);
        let rounds = traffic.await.expect("traffic task");
        let missing: Vec<&String> = parked_users
            .iter()
            .enumerate()
            .filter(|(n, user)| !app.api.received_position(user, 10_000 + *n as u64))
            .map(|(_, user)| user)
            .collect();
        assert!(
            all.is_some(),
            "parked positions not delivered within {DELIVERY:?}: {missing:?}"
        );
        let rounds = rounds.expect("the traffic ran out before the parked positions arrived");
        assert!(rounds > 0, "no traffic beside the delivery");
        for user in &live_users {
            assert_delivered(&app, user, "m-0001", rounds * 1_000).await;
        }
    }

    #[tokio::test]
    async fn an_outage_parks_pairs_not_heartbeats() {
        const BATCH: u64 = 10;
        let batch = BATCH.to_string();
        let app = spawn_app_with(&[("MONETA_PROGRESS_BATCH_SIZE", batch.as_str())]).await;
        let token = app.token("load-one", "standard", 2, "KR");
        let id = app.started_session(&token, "m-0001", "tv").await;
        let mut redis = redis_of(&app).await;
        app.api.set_fault(Fault::Status500);

        let mut most_parked = 0;
        for p in 1..=100u64 {
            heartbeat_ok(&app, &token, &id, p * 1_000).await;
            most_parked = most_parked.max(redis.total(Progress::Parked).await);
        }
        assert!(most_parked <= 1, "{most_parked} parked fields for one pair");
        // With the API still down, the courier folds the log into the one field.
        let folded = eventually(PATIENCE, async || {
            let log = redis.total(Progress::Log).await;
            let parked = redis.total(Progress::Parked).await;
            (log <= 2 * BATCH && parked == 1).then_some(())
        })
        .await;
        assert!(
            folded.is_some(),
            "log {} entries, {} parked fields",
            redis.total(Progress::Log).await,
            redis.total(Progress::Parked).await
        );

        app.api.set_fault(Fault::None);
        assert_delivered(&app, "load-one", "m-0001", 100_000).await;
        wait_parked(&mut redis, 0).await;
    }

    /// Readiness says Redis is up, and playback-info answers fresh.
    async fn fresh_again(app: &TestApp, token: &str) -> bool {
        let ready: Value = app
            .get_anonymously("/health/ready")
            .await
            .json()
            .await
            .unwrap_or_default();
        let info = app.playback_info_json("m-0001", token).await;
        ready["dependencies"]["redis"] == "up" && info["degraded"] == false
    }

    #[tokio::test]
    async fn redis_restarted_empty_is_an_outage_that_ends() {
        let mut app = spawn_app().await;
        let token = app.token("load-restart", "standard", 2, "KR");
        let before = app.started_session(&token, "m-0001", "tv").await;
        heartbeat_ok(&app, &token, &before, 10_000).await;
        let port = app.redis.port;
        app.redis.kill();
        // Started while Redis is unreachable: uncounted, degraded.
        let resp = app.start_session(&token, "m-0001", "phone").await;
        assert_eq!(resp.status(), 201);
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body["playback"]["degraded"], true);
        let during = body["session_id"].as_str().expect("id").to_owned();
        heartbeat_ok(&app, &token, &during, 20_000).await;

        // Back, without its data: the progress log's group is gone too.
        back_empty(&mut app, &token, port).await;
        assert_eq!(
            metric(&app, "moneta_circuit_breaker_state{dependency=\"redis\"}").await,
            Some(0.0)
        );
        // Neither player saw anything wrong, so neither stops.
        heartbeat_ok(&app, &token, &before, 30_000).await;
        heartbeat_ok(&app, &token, &during, 40_000).await;
        // And the limit holds again.
        assert_error(
            app.start_session(&token, "m-0001", "laptop").await,
            409,
            "stream_limit_reached",
        )
        .await;
        // The newest position of the pair wins; 20 000, held in memory, may
        // have been superseded before it was sent.
        assert_delivered(&app, "load-restart", "m-0001", 40_000).await;
    }

    /// Starts Redis again, empty, on `port` (where the killed one ran);
    /// returns once Moneta answers fresh from it.
    async fn back_empty(app: &mut TestApp, token: &str, port: u16) {
        app.redis = RedisServer::start_on(port);
        let recovered = eventually(Duration::from_secs(30), async || {
            fresh_again(app, token).await.then_some(())
        })
        .await;
        assert!(recovered.is_some(), "still degraded with Redis answering");
    }

    /// Failures one after another: Redis back empty, then hung, then killed
    /// while hung and back empty again. Every heartbeat is acknowledged, the
    /// newest position reaches the internal API, the limit holds again, and
    /// the keys recorded again have their lifetimes.
    #[tokio::test]
    async fn recoveries_hold_when_failures_follow_one_another() {
        let mut app = spawn_app().await;
        let user = "load-chain";
        let token = app.token(user, "standard", 2, "KR");
        let session = app.started_session(&token, "m-0001", "tv").await;
        heartbeat_ok(&app, &token, &session, 10_000).await;
        let port = app.redis.port;

        app.redis.kill();
        back_empty(&mut app, &token, port).await;
        heartbeat_ok(&app, &token, &session, 20_000).await;

        // Hung: heartbeats are answered from memory until the breaker opens.
        app.redis.pause();
        let breaker_open = r#"moneta_circuit_breaker_state{dependency="redis"}"#;
        let mut during = Vec::new();
        for position in (30_000..90_000).step_by(5_000) {
            during.push((position, app.heartbeat(&token, &session, position).await.status()));
            if metric(&app, breaker_open).await == Some(2.0) {
                break;
            }
        }
        assert!(
            during.iter().all(|(_, status)| *status == 200),
            "heartbeats while Redis hangs: {during:?}"
        );
        assert_eq!(
            metric(&app, breaker_open).await,
            Some(2.0),
            "the breaker never opened"
        );

        // Killed while hung: what it had queued never runs.
        app.redis.kill();
        back_empty(&mut app, &token, port).await;
        heartbeat_ok(&app, &token, &session, 90_000).await;
        assert_eq!(app.start_session(&token, "m-0001", "phone").await.status(), 201);
        assert_error(
            app.start_session(&token, "m-0001", "laptop").await,
            409,
            "stream_limit_reached",
        )
        .await;
        assert_delivered(&app, user, "m-0001", 90_000).await;
        for key in ["sessions", "positions"] {
            let key = user_key(user, key);
            let pttl = testkit::redis::cli(app.redis.port, &["PTTL", &key]);
            assert!(
                pttl.trim().parse::<i64>().is_ok_and(|ms| ms > 0),
                "{key} after the failures: PTTL {pttl:?}"
            );
        }
    }

    /// Redis hangs while the internal API takes every position: what the
    /// memory holds was delivered and still has to reach Redis, so it keeps
    /// its room until then, and once Redis answers again playback-info
    /// answers the last acknowledged position of every pair, not the one
    /// Redis held before the outage.
    #[tokio::test]
    async fn positions_delivered_during_a_redis_hang_reach_playback_info() {
        let app = spawn_app_with(&[("MONETA_PROGRESS_QUEUE_CAPACITY", "3"), WITHOUT_CLIENT_CACHE]).await;
        let mut viewers = Vec::new();
        for i in 0..6 {
            let user = format!("load-hang-{i}");
            let token = app.token(&user, "standard", 2, "KR");
            let session = app.started_session(&token, "m-0001", "tv").await;
            // 1 000 s of 7920: past the 5 % under which there is no resume point.
            heartbeat_ok(&app, &token, &session, 1_000_000).await;
            viewers.push((user, token, session));
        }
        app.redis.pause();
        let mut last = BTreeMap::new();
        // Three pairs fill the memory; the internal API takes them.
        for (i, (user, token, session)) in viewers.iter().take(3).enumerate() {
            let position = 2_000_000 + i as u64;
            heartbeat_ok(&app, token, session, position).await;
            assert_delivered(&app, user, "m-0001", position).await;
            last.insert(user.clone(), position);
        }
        // They still wait for Redis: no room for another pair (the new
        // pairs first, while those three are still only waiting for Redis).
        for (i, (user, token, session)) in viewers.iter().enumerate().rev() {
            let position = 2_100_000 + i as u64;
            let resp = app.heartbeat(token, session, position).await;
            match resp.status().as_u16() {
                200 => {
                    last.insert(user.clone(), position);
                }
                503 => {
                    assert_error(resp, 503, "dependency_unavailable").await;
                }
                other => panic!("heartbeat of {user}: {other}"),
            }
        }
        assert_eq!(last.len(), 3, "the memory holds three pairs: {last:?}");
        app.redis.resume();
        for (user, token, _) in &viewers {
            let expected = last.get(user).copied().unwrap_or(1_000_000);
            let answered = eventually(PATIENCE, async || {
                let info = app.playback_info_json("m-0001", token).await;
                (info["degraded"] == false && info["resume_position_ms"] == expected).then_some(())
            })
            .await;
            let info = app.playback_info_json("m-0001", token).await;
            assert!(answered.is_some(), "{user}: {info} instead of {expected}");
            assert_delivered(&app, user, "m-0001", expected).await;
        }
    }

    #[tokio::test]
    async fn a_full_memory_queue_answers_503_and_drops_nothing_it_acknowledged() {
        let mut app = spawn_app_with(&[("MONETA_PROGRESS_QUEUE_CAPACITY", "4")]).await;
        let mut viewers = Vec::new();
        for i in 0..10 {
            let user = format!("load-queue-{i}");
            let token = app.token(&user, "standard", 2, "KR");
            let session = app.started_session(&token, "m-0001", "tv").await;
            viewers.push((user, token, session));
        }
        app.api.set_fault(Fault::Status500);
        let port = app.redis.port;
        app.redis.kill();

        let mut acknowledged = Vec::new();
        for (user, token, session) in &viewers {
            let resp = app.heartbeat(token, session, 77_000).await;
            match resp.status().as_u16() {
                200 => {
                    let ack: Value = resp.json().await.expect("json");
                    assert_eq!(ack["degraded"], true, "taken while Redis is down: {ack}");
                    acknowledged.push(user.clone());
                }
                503 => {
                    assert!(
                        resp.headers().contains_key("retry-after"),
                        "503 without Retry-After"
                    );
                    assert_error(resp, 503, "dependency_unavailable").await;
                }
                other => panic!("heartbeat of {user}: {other}"),
            }
        }
        assert_eq!(
            acknowledged.len(),
            4,
            "the memory holds four pairs: {acknowledged:?}"
        );
        // A pair already held takes no more room.
        let (_, token, session) = viewers
            .iter()
            .find(|(u, ..)| *u == acknowledged[0])
            .expect("viewer");
        heartbeat_ok(&app, token, session, 78_000).await;

        app.redis = RedisServer::start_on(port);
        app.api.set_fault(Fault::None);
        assert_delivered(&app, &acknowledged[0], "m-0001", 78_000).await;
        for user in &acknowledged[1..] {
            assert_delivered(&app, user, "m-0001", 77_000).await;
        }
    }
}

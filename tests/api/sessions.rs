use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{TestApp, spawn_app, spawn_app_with};
use crate::support::assert_error;

#[tokio::test]
async fn start_heartbeat_list_stop() {
    let app = spawn_app().await;
    let token = app.token("u-standard", "standard", 2, "KR");
    let resp = app.start_session(&token, "m-0001", "tv-livingroom").await;
    assert_eq!(resp.status(), 201);
    let started: Value = resp.json().await.unwrap();
    let id = started["session_id"].as_str().unwrap().to_owned();
    assert_eq!(started["heartbeat_interval_s"], 30);
    assert!(chrono::DateTime::parse_from_rfc3339(started["expires_at"].as_str().unwrap()).is_ok());
    assert_eq!(started["playback"]["content_id"], "m-0001");
    assert_eq!(started["playback"]["degraded"], false);

    let resp = app.heartbeat(&token, &id, 1000).await;
    assert_eq!(resp.status(), 200);
    let ack: Value = resp.json().await.unwrap();
    assert_eq!(ack["session_id"], id.as_str());
    assert!(chrono::DateTime::parse_from_rfc3339(ack["expires_at"].as_str().unwrap()).is_ok());
    assert_eq!(ack["degraded"], false);

    let list = app.sessions(&token).await;
    assert_eq!(list["sessions"].as_array().unwrap().len(), 1);
    assert_eq!(list["sessions"][0]["device_id"], "tv-livingroom");
    assert_eq!(list["sessions"][0]["content_id"], "m-0001");

    assert_eq!(app.stop_session(&token, &id).await.status(), 204);
    let list = app.sessions(&token).await;
    assert!(list["sessions"].as_array().unwrap().is_empty());
    let resp = app.stop_session(&token, &id).await;
    assert_error(resp, 404, "session_not_found").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_parallel_starts_never_exceed_the_limit() {
    let app = spawn_app().await;
    let token = app.token("u-standard", "standard", 2, "KR");
    // Warm the caches so every start races on the limit itself.
    assert_eq!(app.playback_info("m-0001", &token).await.status(), 200);
    let starts = (0..50).map(|i| {
        let client = app.client.clone();
        let url = format!("{}/v1/playback/sessions", app.address);
        let token = token.clone();
        tokio::spawn(async move {
            client
                .post(url)
                .bearer_auth(token)
                .json(&json!({"content_id": "m-0001", "device_id": format!("device-{i}")}))
                .send()
                .await
                .unwrap()
        })
    });
    let mut created = 0;
    let mut conflicts = 0;
    for handle in starts {
        let resp = handle.await.unwrap();
        match resp.status().as_u16() {
            201 => created += 1,
            409 => {
                let body = assert_error(resp, 409, "stream_limit_reached").await;
                assert_eq!(body["error"]["max_streams"], 2);
                assert_eq!(body["error"]["active_sessions"].as_array().unwrap().len(), 2);
                conflicts += 1;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!((created, conflicts), (2, 48));
}

#[tokio::test]
async fn the_same_device_replaces_its_session() {
    let app = spawn_app().await;
    let token = app.token("u-basic", "basic", 1, "KR");
    let first: Value = app
        .start_session(&token, "m-0001", "phone")
        .await
        .json()
        .await
        .unwrap();
    let resp = app.start_session(&token, "m-0001", "phone").await;
    assert_eq!(resp.status(), 201);
    let old = first["session_id"].as_str().unwrap();
    assert_eq!(
        app.heartbeat(&token, old, 5).await.status(),
        404,
        "the replaced session is gone"
    );
    let resp = app.start_session(&token, "m-0001", "tablet").await;
    assert_eq!(resp.status(), 409);
}

#[tokio::test]
async fn stop_frees_the_slot_at_once() {
    let app = spawn_app().await;
    let token = app.token("u-basic", "basic", 1, "KR");
    let s_id = app.started_session(&token, "m-0001", "phone").await;
    assert_eq!(app.start_session(&token, "m-0001", "tv").await.status(), 409);
    assert_eq!(app.stop_session(&token, s_id.as_str()).await.status(), 204);
    assert_eq!(app.start_session(&token, "m-0001", "tv").await.status(), 201);
}

/// An app whose sessions live `ttl` without a heartbeat, and one session of
/// a one-stream user on it.
async fn one_session_living(ttl: Duration) -> (TestApp, String, String) {
    let ttl_s = ttl.as_secs().to_string();
    let app = spawn_app_with(&[
        ("MONETA_SESSION_TTL_S", &ttl_s),
        ("MONETA_HEARTBEAT_INTERVAL_S", "1"),
    ])
    .await;
    let token = app.token("u-basic", "basic", 1, "KR");
    let s_id = app.started_session(&token, "m-0001", "phone").await;
    (app, token, s_id)
}

#[tokio::test]
async fn sessions_without_heartbeat_stop_counting() {
    // Long enough that the session is surely still live for the 409 below,
    // however slow the machine; its end is waited for, not raced.
    let ttl = Duration::from_secs(5);
    let (app, token, s_id) = one_session_living(ttl).await;
    assert_eq!(app.start_session(&token, "m-0001", "tv").await.status(), 409);
    // The session's last heartbeat was before this answer, so after this sleep it is over the TTL.
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    assert_eq!(app.heartbeat(&token, s_id.as_str(), 1).await.status(), 404);
    assert_eq!(app.start_session(&token, "m-0001", "tv").await.status(), 201);
}

/// A heartbeat that finds its session expired buries the id and writes
/// nothing else. The first burial creates the user's `ended` key, and a key
/// without a lifetime would stay in Redis for good if the user never came back.
#[tokio::test]
async fn an_expired_sessions_heartbeat_leaves_no_key_without_a_lifetime() {
    let ttl = Duration::from_secs(2);
    let (app, token, s_id) = one_session_living(ttl).await;
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    assert_eq!(app.heartbeat(&token, s_id.as_str(), 1).await.status(), 404);

    let keys = testkit::redis::cli(app.redis.port, &["--scan", "--pattern", "*u-basic*"]);
    let ended: Vec<&str> = keys.lines().filter(|k| k.ends_with(":ended")).collect();
    assert_eq!(ended.len(), 1, "the burial is remembered: {keys}");
    for key in keys.lines().filter(|k| !k.is_empty()) {
        let pttl = pttl_ms(&app, key);
        assert!(pttl > 0, "{key} has no lifetime (PTTL {pttl})");
    }
}

/// A user's session keys outlive their last heartbeat by at least the key
/// lifetime (an hour at the default TTL), so that ended ids stay ended, even
/// though a heartbeat renews them only once they run low.
#[tokio::test]
async fn session_keys_and_positions_outlive_the_last_write_by_their_lifetimes() {
    const LIFETIME_MS: i64 = 3_600_000;
    const POSITIONS_MS: i64 = 30 * 24 * 3_600_000;
    // A margin for the time between a write and the reading of its lifetimes.
    const MARGIN_MS: i64 = 10_000;
    let app = spawn_app().await;
    let token = app.token("u-basic", "basic", 1, "KR");
    let s_id = app.started_session(&token, "m-0001", "phone").await;
    let user_keys = |suffixes: &[&str]| -> Vec<String> {
        testkit::redis::cli(app.redis.port, &["--scan", "--pattern", "*u-basic*"])
            .lines()
            .filter(|k| suffixes.iter().any(|s| k.ends_with(s)))
            .map(str::to_owned)
            .collect()
    };
    let session_keys = user_keys(&[":sessions", ":session-info", ":devices"]);
    assert_eq!(session_keys.len(), 3, "{session_keys:?}");
    let set_pttl = |key: &str, ms: i64| {
        testkit::redis::cli(app.redis.port, &["PEXPIRE", key, &ms.to_string()]);
    };
    let assert_lifetimes = |positions: &str, after: &str| {
        for key in &session_keys {
            let pttl = pttl_ms(&app, key);
            assert!(
                pttl >= LIFETIME_MS - MARGIN_MS,
                "{key} lives {pttl} ms after {after}"
            );
        }
        let pttl = pttl_ms(&app, positions);
        assert!(
            pttl >= POSITIONS_MS - MARGIN_MS,
            "{positions} lives {pttl} ms after {after}"
        );
    };

    // The first heartbeat creates the positions hash.
    assert_eq!(app.heartbeat(&token, s_id.as_str(), 1_000).await.status(), 200);
    let positions = user_keys(&[":positions"]).pop().expect("a positions hash");
    assert_lifetimes(&positions, "the first heartbeat");

    // As the last renewal leaves them one and a half key lifetimes later:
    // every clock ran down together.
    for key in &session_keys {
        set_pttl(key, LIFETIME_MS / 2);
    }
    set_pttl(&positions, POSITIONS_MS + LIFETIME_MS / 2);
    assert_eq!(app.heartbeat(&token, s_id.as_str(), 2_000).await.status(), 200);
    assert_lifetimes(&positions, "a heartbeat that found half a key lifetime left");

    // As a position read from the internal API and written back half a key
    // lifetime ago leaves the hash, the session keys renewed since.
    set_pttl(&positions, POSITIONS_MS - LIFETIME_MS / 2);
    assert_eq!(app.heartbeat(&token, s_id.as_str(), 3_000).await.status(), 200);
    assert_lifetimes(&positions, "a heartbeat after a write-back");

    // A stop's final position renews the hash too (the stop empties, and so
    // deletes, the session's own keys).
    set_pttl(&positions, LIFETIME_MS);
    assert_eq!(
        app.stop_session_at(&token, s_id.as_str(), 4_000).await.status(),
        204
    );
    let pttl = pttl_ms(&app, &positions);
    assert!(
        pttl >= POSITIONS_MS - MARGIN_MS,
        "{positions} lives {pttl} ms after a stop"
    );
}

/// What is left of `key`'s lifetime in the app's Redis (-1 none, -2 no key).
fn pttl_ms(app: &TestApp, key: &str) -> i64 {
    let answer = testkit::redis::cli(app.redis.port, &["PTTL", key]);
    answer
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("PTTL {key}: {answer:?}"))
}

#[tokio::test]
async fn another_users_session_is_not_found() {
    let app = spawn_app().await;
    let alice = app.token("u-standard", "standard", 2, "KR");
    let bob = app.token("u-premium", "premium", 4, "KR");
    let s_id = app.started_session(&alice, "m-0001", "phone").await;
    let id = s_id.as_str();
    assert_eq!(app.heartbeat(&bob, id, 1).await.status(), 404);
    assert_eq!(app.stop_session(&bob, id).await.status(), 404);
    assert_eq!(app.heartbeat(&alice, "no-such-session", 1).await.status(), 404);
}

#[tokio::test]
async fn start_applies_the_playback_checks() {
    let app = spawn_app().await;
    let resp = app
        .start_session(&app.token("u-standard", "standard", 2, "KR"), "m-0002", "tv")
        .await;
    assert_error(resp, 403, "plan_not_eligible").await;
    let resp = app
        .start_session(&app.token("u-basic", "basic", 1, "KR"), "m-4040", "tv")
        .await;
    assert_error(resp, 404, "content_not_found").await;
}

#[tokio::test]
async fn bad_bodies_are_rejected_and_nothing_is_written() {
    let app = spawn_app().await;
    let token = app.token("u-basic", "basic", 1, "KR");
    let send = async |method: Method, path: &str, content_type: &str, body: String| {
        app.send_raw(method, path, Some(&token), content_type, body).await
    };
    let start = "/v1/playback/sessions";
    let cases = [
        ("{not json", "application/json", 400, "invalid_body"),
        (
            r#"{"content_id": 5, "device_id": "tv"}"#,
            "application/json",
            400,
            "invalid_body",
        ),
        (r#"{"device_id": "tv"}"#, "application/json", 400, "invalid_body"),
        // The fields in order, as an array: the wrong type, not a start.
        (r#"["m-0001", "tv"]"#, "application/json", 400, "invalid_body"),
        ("", "application/json", 400, "invalid_body"),
        (
            r#"{"content_id": "m-0001", "device_id": "bad/device"}"#,
            "application/json",
            400,
            "invalid_body",
        ),
        (
            r#"{"content_id": "bad.id", "device_id": "tv"}"#,
            "application/json",
            400,
            "invalid_content_id",
        ),
        (
            r#"{"content_id": "m-0001", "device_id": "tv"}"#,
            "text/plain",
            415,
            "unsupported_media_type",
        ),
    ];
    for (body, ct, status, code) in cases {
        let resp = send(Method::POST, start, ct, body.to_owned()).await;
        assert_eq!(resp.status(), status, "{body}");
        assert_error(resp, status, code).await;
    }
    let big = format!(
        r#"{{"content_id": "m-0001", "device_id": "tv", "pad": "{}"}}"#,
        "x".repeat(20_000)
    );
    let json = "application/json";
    assert_eq!(send(Method::POST, start, json, big).await.status(), 413);
    let list = app.sessions(&token).await;
    assert!(
        list["sessions"].as_array().unwrap().is_empty(),
        "nothing half-written"
    );

    let s_id = app.started_session(&token, "m-0001", "tv").await;
    let session = format!("/v1/playback/sessions/{s_id}");
    for body in [
        r#"{"position_ms": 1, "state": "dancing"}"#,
        r#"{"position_ms": -1, "state": "playing"}"#,
        r#"{"state": "paused"}"#,
        r#"[4000000, "playing"]"#,
    ] {
        let resp = send(Method::PUT, &session, json, body.to_owned()).await;
        assert_eq!(resp.status(), 400, "{body}");
        assert_error(resp, 400, "invalid_body").await;
    }
    for body in ["{oops", "[5000000, false]", "[1]"] {
        let resp = send(Method::DELETE, &session, json, body.to_owned()).await;
        assert_eq!(resp.status(), 400, "{body}");
        assert_error(resp, 400, "invalid_body").await;
    }
    // JSON is UTF-8: bytes that are no text are refused also where they sit
    // in a field the API does not read.
    let not_text = |json: &str| -> Vec<u8> {
        let mut body = json.as_bytes().to_vec();
        body.extend_from_slice(b", \"x\": \"\xff\xfe\xc3\x28\"}");
        body
    };
    for (method, path, body) in [
        (
            Method::POST,
            start,
            not_text(r#"{"content_id": "m-0001", "device_id": "tv2""#),
        ),
        (
            Method::PUT,
            session.as_str(),
            not_text(r#"{"position_ms": 7, "state": "playing""#),
        ),
        (Method::DELETE, session.as_str(), not_text(r#"{"position_ms": 7"#)),
    ] {
        let resp = app.send_raw(method.clone(), path, Some(&token), json, body).await;
        assert_eq!(resp.status(), 400, "{method}");
        assert_error(resp, 400, "invalid_body").await;
    }
    assert_eq!(
        app.heartbeat(&token, s_id.as_str(), 1).await.status(),
        200,
        "the bad stop did nothing"
    );
}

/// A path segment that is not UTF-8 once decoded names nothing there is: each
/// route answers as for an id it does not know, in the contract's shape.
#[tokio::test]
async fn path_ids_that_do_not_decode_are_ids_nobody_knows() {
    let app = spawn_app().await;
    let token = app.token("u-basic", "basic", 1, "KR");
    let json = "application/json";
    let beat = r#"{"position_ms": 1, "state": "playing"}"#;
    let resp = app
        .send_raw(
            Method::PUT,
            "/v1/playback/sessions/%FF%FE",
            Some(&token),
            json,
            beat,
        )
        .await;
    assert_error(resp, 404, "session_not_found").await;
    let resp = app
        .send_raw(
            Method::DELETE,
            "/v1/playback/sessions/%FF",
            Some(&token),
            json,
            "",
        )
        .await;
    assert_error(resp, 404, "session_not_found").await;
    let resp = app.get("/v1/contents/%FF%FE/playback-info", &token).await;
    assert_error(resp, 400, "invalid_content_id").await;
    let resp = app
        .send_raw(
            Method::POST,
            "/v1/licenses/%FF",
            Some(&token),
            "application/octet-stream",
            "x",
        )
        .await;
    assert_error(resp, 404, "not_found").await;
}

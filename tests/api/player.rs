//! CONTRACT §7, what a real player needs: resume thresholds and `watched`,
//! markers, licence tokens, the FairPlay certificate, CloudFront signed
//! cookies, the `evict_oldest` stream-limit policy and CORS. Tokens and
//! signatures are checked by independent implementations (Python's `hmac`,
//! the openssl command line), never by the crates Moneta signs with.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use base64::Engine;
use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{TestApp, spawn_app, spawn_app_on, spawn_app_with};
use crate::support::redis_probe::{RedisProbe, user_key};
use crate::support::{
    CdnKeyPair, PATIENCE, PublicApi, assert_error, eventually, require_binary, sample_content, spawn_fake_api,
};

/// Enough streams for every test's user: none of them is about the limit.
const USER: &str = "u-premium";

fn premium_token(app: &TestApp) -> String {
    app.token(USER, "premium", 4, "KR")
}

/// `sample_content(id)` lasting `duration_ms`.
fn title(id: &str, duration_ms: u64) -> Value {
    let mut content = sample_content(id);
    content["duration_ms"] = json!(duration_ms);
    content
}

/// An app whose internal API also serves `titles`.
async fn app_serving(titles: &[Value], settings: &[(&str, &str)]) -> TestApp {
    let api = spawn_fake_api().await;
    for content in titles {
        api.serve_title(content.clone());
    }
    spawn_app_on(api, settings).await
}

/// `(resume_position_ms, watched)` of a playback answer.
fn resume_of(playback: &Value) -> (u64, bool) {
    (
        playback["resume_position_ms"]
            .as_u64()
            .unwrap_or_else(|| panic!("no resume_position_ms: {playback}")),
        playback["watched"]
            .as_bool()
            .unwrap_or_else(|| panic!("no watched: {playback}")),
    )
}

async fn json(resp: reqwest::Response) -> Value {
    let status = resp.status();
    let body = resp.text().await.expect("body");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{status}: {body:?} is not JSON: {e}"))
}

async fn start_json(app: &TestApp, token: &str, content_id: &str, device_id: &str) -> Value {
    let resp = app.start_session(token, content_id, device_id).await;
    assert_eq!(resp.status(), 201, "start of {content_id} on {device_id}");
    json(resp).await
}

fn session_id_of(started: &Value) -> String {
    started["session_id"].as_str().expect("session_id").to_owned()
}

// ---------------------------------------------------------------- resume

/// 100 s: 5 % is 5 000 ms, 90 % is 90 000 ms.
const DURATION_MS: u64 = 100_000;

/// One title of `DURATION_MS` per case of [`boundaries`].
const BOUNDARY_TITLES: [&str; 4] = ["m-under-min", "m-at-min", "m-under-max", "m-at-max"];

/// Each threshold and the millisecond under it, with what a player is told:
/// `(title, stored position, resume_position_ms, watched)`.
fn boundaries(min_ms: u64, max_ms: u64) -> [(&'static str, u64, u64, bool); 4] {
    let [under_min, at_min, under_max, at_max] = BOUNDARY_TITLES;
    [
        (under_min, min_ms - 1, 0, false),
        (at_min, min_ms, min_ms, false),
        (under_max, max_ms - 1, max_ms - 1, false),
        (at_max, max_ms, 0, true),
    ]
}

fn boundary_titles() -> Vec<Value> {
    BOUNDARY_TITLES.iter().map(|id| title(id, DURATION_MS)).collect()
}

/// Positions the internal API holds (no heartbeat reached Redis) are judged
/// by the same thresholds.
async fn assert_thresholds_on_stored_positions(app: &TestApp, min_ms: u64, max_ms: u64) {
    let token = premium_token(app);
    for (content_id, position, resume, watched) in boundaries(min_ms, max_ms) {
        app.api.set_progress(USER, content_id, position);
        let info = json(app.playback_info(content_id, &token).await).await;
        assert_eq!(
            resume_of(&info),
            (resume, watched),
            "stored position {position} of {DURATION_MS}: {info}"
        );
    }
}

#[tokio::test]
async fn heartbeat_positions_resume_from_5_percent_and_are_watched_from_90() {
    let app = app_serving(&boundary_titles(), &[]).await;
    let token = premium_token(&app);
    for (i, (content_id, position, resume, watched)) in boundaries(5_000, 90_000).into_iter().enumerate() {
        let started = start_json(&app, &token, content_id, &format!("device-{i}")).await;
        assert_eq!(resume_of(&started["playback"]), (0, false), "nothing stored yet");
        let id = session_id_of(&started);
        assert_eq!(app.heartbeat(&token, &id, position).await.status(), 200);
        let info = json(app.playback_info(content_id, &token).await).await;
        assert_eq!(
            resume_of(&info),
            (resume, watched),
            "position {position} of {DURATION_MS}: {info}"
        );
        assert_eq!(app.stop_session(&token, &id).await.status(), 204);
    }
    // The next start of a watched title starts over, in the session's answer too.
    let again = start_json(&app, &token, "m-at-max", "device-again").await;
    assert_eq!(resume_of(&again["playback"]), (0, true));
    // The internal API keeps what the player sent, not what players are told.
    for (_, position, ..) in boundaries(5_000, 90_000) {
        app.api.assert_receives_position(USER, position).await;
    }
}

#[tokio::test]
async fn positions_from_the_internal_api_meet_the_default_thresholds() {
    let app = app_serving(&boundary_titles(), &[]).await;
    assert_thresholds_on_stored_positions(&app, 5_000, 90_000).await;
}

#[tokio::test]
async fn thresholds_follow_the_settings() {
    let app = app_serving(
        &boundary_titles(),
        &[("MONETA_RESUME_MIN_PCT", "20"), ("MONETA_RESUME_MAX_PCT", "50")],
    )
    .await;
    assert_thresholds_on_stored_positions(&app, 20_000, 50_000).await;
}

#[tokio::test]
async fn a_title_without_duration_resumes_wherever_it_stopped() {
    let app = app_serving(&[title("m-live", 0)], &[]).await;
    let token = premium_token(&app);
    let info = json(app.playback_info("m-live", &token).await).await;
    assert_eq!(info["duration_ms"], 0);
    assert_eq!(resume_of(&info), (0, false));
    let id = app.started_session(&token, "m-live", "tv").await;
    for position in [1, 1_234, 50_000_000] {
        assert_eq!(app.heartbeat(&token, &id, position).await.status(), 200);
        let info = json(app.playback_info("m-live", &token).await).await;
        assert_eq!(resume_of(&info), (position, false), "position {position}: {info}");
    }
}

#[tokio::test]
async fn a_completed_stop_is_watched_whatever_the_position() {
    let titles = [
        title("m-completed", DURATION_MS),
        title("m-stopped", DURATION_MS),
        title("m-completed-bare", DURATION_MS),
    ];
    let app = app_serving(&titles, &[]).await;
    let token = premium_token(&app);

    // 1 % of the title, stopped as completed: watched.
    let id = app.started_session(&token, "m-completed", "tv").await;
    let resp = app
        .stop_session_with(&token, &id, &json!({"position_ms": 1_000, "completed": true}))
        .await;
    assert_eq!(resp.status(), 204);
    let info = json(app.playback_info("m-completed", &token).await).await;
    assert_eq!(resume_of(&info), (0, true), "{info}");

    // The same stop without `completed` is just an early stop.
    let id = app.started_session(&token, "m-stopped", "tv").await;
    assert_eq!(app.stop_session_at(&token, &id, 1_001).await.status(), 204);
    let info = json(app.playback_info("m-stopped", &token).await).await;
    assert_eq!(resume_of(&info), (0, false), "{info}");

    // `completed` alone, after a heartbeat mid-title: watched as well.
    let id = app.started_session(&token, "m-completed-bare", "tv").await;
    assert_eq!(app.heartbeat(&token, &id, 40_000).await.status(), 200);
    let resp = app
        .stop_session_with(&token, &id, &json!({"completed": true}))
        .await;
    assert_eq!(resp.status(), 204);
    let again = start_json(&app, &token, "m-completed-bare", "phone").await;
    assert_eq!(resume_of(&again["playback"]), (0, true), "{again}");

    // The internal API receives the raw position of the completed stop.
    app.api.assert_receives_position(USER, 1_000).await;
    let delivered = app.api.delivered();
    let completed = delivered
        .iter()
        .find(|i| i["content_id"] == "m-completed")
        .expect("the completed stop was delivered");
    assert_eq!(completed["position_ms"], 1_000, "{delivered:?}");
}

/// The completed mark reaches the internal API with the position, so a title
/// stopped as completed stays watched once Redis lost its position; a later
/// heartbeat (watching again) clears the mark there as it does in Redis.
#[tokio::test]
async fn a_completed_stop_stays_watched_when_redis_loses_the_position() {
    let app = app_serving(&[title("m-completed-lost", DURATION_MS)], &[]).await;
    let mut redis = RedisProbe::connect(&app.redis.url).await;
    let token = premium_token(&app);
    let positions = user_key(USER, "positions");

    // Redis forgets the position; the answer must come from the internal API
    // (the in-process copy may still hold Redis' value for a moment).
    async fn from_the_api(app: &TestApp, redis: &mut RedisProbe, positions: &str, token: &str) -> Value {
        let _: () = redis.query(redis::cmd("DEL").arg(positions)).await;
        let asked = app.api.progress_calls();
        let mut last = Value::Null;
        let answered = eventually(PATIENCE, async || {
            last = json(app.playback_info("m-completed-lost", token).await).await;
            (app.api.progress_calls() > asked).then(|| last.clone())
        })
        .await;
        answered.unwrap_or_else(|| panic!("the internal API was never asked: {last}"))
    }

    // 40 % of the title, stopped as completed.
    let id = app.started_session(&token, "m-completed-lost", "tv").await;
    let resp = app
        .stop_session_with(&token, &id, &json!({"position_ms": 40_000, "completed": true}))
        .await;
    assert_eq!(resp.status(), 204);
    let delivered = eventually(PATIENCE, async || {
        app.api
            .delivered()
            .into_iter()
            .find(|i| i["content_id"] == "m-completed-lost" && i["completed"] == true)
    })
    .await;
    assert!(delivered.is_some(), "the completed stop was never delivered");

    let info = from_the_api(&app, &mut redis, &positions, &token).await;
    assert_eq!(resume_of(&info), (0, true), "{info}");
    // Written back to Redis with its mark.
    let back: Option<String> = redis
        .query(redis::cmd("HGET").arg(&positions).arg("m-completed-lost"))
        .await;
    assert!(
        back.as_deref().is_some_and(|v| v.starts_with("40000:c@")),
        "{back:?}"
    );

    // Watched again: the heartbeat carries no mark, and the API's copy loses it.
    let id = app.started_session(&token, "m-completed-lost", "phone").await;
    assert_eq!(app.heartbeat(&token, &id, 60_000).await.status(), 200);
    assert_eq!(app.stop_session(&token, &id).await.status(), 204);
    app.api.assert_receives_position(USER, 60_000).await;
    let info = from_the_api(&app, &mut redis, &positions, &token).await;
    assert_eq!(resume_of(&info), (60_000, false), "{info}");
}

// ---------------------------------------------------------------- markers

#[tokio::test]
async fn markers_pass_through_in_their_order() {
    // Deliberately not sorted by start: the internal API's order is kept.
    let markers = json!([
        {"type": "credits", "start_ms": 95_000, "end_ms": 100_000},
        {"type": "intro", "start_ms": 1_000, "end_ms": 30_000},
        {"type": "recap", "start_ms": 0, "end_ms": 1_000},
        {"type": "preview", "start_ms": 99_000, "end_ms": 100_000}
    ]);
    let mut marked = title("m-marked", DURATION_MS);
    marked["markers"] = markers.clone();
    let mut empty = title("m-empty-markers", DURATION_MS);
    empty["markers"] = json!([]);
    let app = app_serving(&[marked, empty], &[]).await;
    let token = premium_token(&app);

    let info = json(app.playback_info("m-marked", &token).await).await;
    assert_eq!(info["markers"], markers);
    let started = start_json(&app, &token, "m-marked", "tv").await;
    assert_eq!(started["playback"]["markers"], markers);

    // `sample_content` has no `markers` field at all.
    for content_id in ["m-0001", "m-empty-markers"] {
        let info = json(app.playback_info(content_id, &token).await).await;
        assert_eq!(info["markers"], json!([]), "{content_id}: {info}");
    }
}

// ---------------------------------------------------------------- DRM

const DRM_SECRET: &str = "licence-token-secret-for-tests";
const DRM_TTL_S: u64 = 120;
const CERTIFICATE_URL: &str = "https://fairplay.example.com/certificate.der";

/// A title with one stream per DRM system and a clear one.
fn multi_drm_title() -> Value {
    let mut content = sample_content("m-drm");
    content["streams"] = json!([
        {"protocol": "dash", "path": "/m-drm/dash/wv.mpd", "drm": {"system": "widevine", "key_id": "0123abcd"}},
        {"protocol": "dash", "path": "/m-drm/dash/pr.mpd", "drm": {"system": "playready", "key_id": "4567ef01"}},
        {"protocol": "hls", "path": "/m-drm/hls/fps.m3u8", "drm": {"system": "fairplay", "key_id": "89abcdef"}},
        {"protocol": "hls", "path": "/m-drm/hls/clear.m3u8", "drm": null}
    ]);
    content
}

/// HS256 computed by Python's standard library from the token's own
/// signing input: the signature a licence proxy expects.
const PYTHON_HS256: &str = r#"
import base64, hashlib, hmac, sys
secret, token = sys.argv[1], sys.argv[2]
signing_input = token.rsplit(".", 1)[0].encode()
mac = hmac.new(secret.encode(), signing_input, hashlib.sha256).digest()
print(base64.urlsafe_b64encode(mac).rstrip(b"=").decode())
"#;

fn python_hs256(secret: &str, token: &str) -> String {
    let out = testkit::run(
        Command::new(require_binary("python3")).args(["-c", PYTHON_HS256, secret, token]),
        "python3 hmac",
    );
    String::from_utf8(out.stdout).expect("text").trim().to_owned()
}

fn base64url_json(part: &str) -> Value {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .unwrap_or_else(|e| panic!("{part:?} is not base64url: {e}"));
    serde_json::from_slice(&bytes).expect("a JSON segment")
}

/// Checks every DRM stream of a playback answer: its licence token, signed
/// with the secret, names exactly this title, key, system and caller, lives
/// at most the TTL, and carries `session_id` only when given one.
fn assert_licence_tokens(playback: &Value, session_id: Option<&str>, issued: (u64, u64)) {
    let streams = playback["streams"].as_array().expect("streams");
    assert_eq!(streams.len(), 4, "{playback}");
    for stream in streams {
        let drm = &stream["drm"];
        if drm.is_null() {
            continue;
        }
        let token = drm["license_token"]
            .as_str()
            .unwrap_or_else(|| panic!("no license_token: {stream}"));
        assert_eq!(
            drm["license_request_headers"],
            json!({"Authorization": format!("Bearer {token}")}),
            "{stream}"
        );
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3, "a compact JWS: {token}");
        assert_eq!(parts[2], python_hs256(DRM_SECRET, token), "signature of {token}");
        assert_eq!(base64url_json(parts[0])["alg"], "HS256");
        let claims = base64url_json(parts[1]);
        assert_eq!(claims["sub"], USER, "{claims}");
        assert_eq!(claims["content_id"], "m-drm", "{claims}");
        assert_eq!(claims["key_id"], drm["key_id"], "{claims}");
        assert_eq!(claims["drm_system"], drm["system"], "{claims}");
        let iat = claims["iat"].as_u64().expect("iat");
        let exp = claims["exp"].as_u64().expect("exp");
        // The same clock issued them, between these two readings of it.
        assert!(issued.0 <= iat && iat <= issued.1, "iat {iat} outside {issued:?}");
        assert!(exp > iat && exp - iat <= DRM_TTL_S, "iat {iat}, exp {exp}");
        match session_id {
            Some(id) => assert_eq!(claims["session_id"], id, "{claims}"),
            None => assert!(claims.get("session_id").is_none(), "{claims}"),
        }
    }
}

fn unix_now() -> u64 {
    chrono::Utc::now().timestamp().try_into().expect("after 1970")
}

#[tokio::test]
async fn licence_tokens_verify_independently_and_carry_every_claim() {
    let ttl = DRM_TTL_S.to_string();
    let app = app_serving(
        &[multi_drm_title()],
        &[
            ("MONETA_DRM_TOKEN_SECRET", DRM_SECRET),
            ("MONETA_DRM_TOKEN_TTL_S", &ttl),
        ],
    )
    .await;
    let token = premium_token(&app);
    let before = unix_now();
    let info = json(app.playback_info("m-drm", &token).await).await;
    let started = start_json(&app, &token, "m-drm", "tv").await;
    let after = unix_now();
    assert_licence_tokens(&info, None, (before, after));
    assert_licence_tokens(
        &started["playback"],
        Some(&session_id_of(&started)),
        (before, after),
    );
    assert!(info["streams"][3]["drm"].is_null(), "a clear stream stays clear");
}

/// Asserts that no stream's `drm` object has `field`.
fn assert_no_drm_field(playback: &Value, field: &str) {
    for stream in playback["streams"].as_array().expect("streams") {
        if let Some(drm) = stream["drm"].as_object() {
            assert!(!drm.contains_key(field), "{field} in {stream}");
        }
    }
}

#[tokio::test]
async fn without_the_secret_there_are_no_licence_tokens() {
    let app = app_serving(&[multi_drm_title()], &[]).await;
    let token = premium_token(&app);
    let info = json(app.playback_info("m-drm", &token).await).await;
    let started = start_json(&app, &token, "m-drm", "tv").await;
    for playback in [&info, &started["playback"]] {
        assert_eq!(playback["streams"][0]["drm"]["system"], "widevine", "{playback}");
        assert_no_drm_field(playback, "license_token");
        assert_no_drm_field(playback, "license_request_headers");
    }
}

#[tokio::test]
async fn only_fairplay_streams_carry_the_certificate_url() {
    let app = app_serving(
        &[multi_drm_title()],
        &[("MONETA_DRM_FAIRPLAY_CERTIFICATE_URL", CERTIFICATE_URL)],
    )
    .await;
    let token = premium_token(&app);
    let info = json(app.playback_info("m-drm", &token).await).await;
    let started = start_json(&app, &token, "m-drm", "tv").await;
    for playback in [&info, &started["playback"]] {
        let streams = playback["streams"].as_array().expect("streams");
        for stream in streams.iter().filter(|s| !s["drm"].is_null()) {
            let certificate = stream["drm"].get("certificate_url");
            if stream["drm"]["system"] == "fairplay" {
                assert_eq!(certificate, Some(&json!(CERTIFICATE_URL)), "{stream}");
            } else {
                assert_eq!(certificate, None, "{stream}");
            }
        }
    }
}

#[tokio::test]
async fn without_the_setting_fairplay_has_no_certificate_url() {
    let app = app_serving(&[multi_drm_title()], &[]).await;
    let info = json(app.playback_info("m-drm", &premium_token(&app)).await).await;
    assert_eq!(info["streams"][2]["drm"]["system"], "fairplay", "{info}");
    assert_no_drm_field(&info, "certificate_url");
}

// ---------------------------------------------------------------- CloudFront cookies

const CDN_BASE: &str = "https://d111111abcdef8.cloudfront.net";
const KEY_PAIR_ID: &str = "K2JCJMDEHXQW5F";
const COOKIE_DOMAIN: &str = ".example.com";

/// Moneta signing with `key` for `CDN_BASE`, with `extra` settings.
async fn signing_app(key: &CdnKeyPair, extra: &[(&str, &str)]) -> TestApp {
    let key_settings = key.settings();
    let mut settings: Vec<(&str, &str)> = key_settings.iter().map(|(k, v)| (*k, v.as_str())).collect();
    settings.push(("MONETA_CDN_BASE_URL", CDN_BASE));
    settings.extend_from_slice(extra);
    spawn_app_with(&settings).await
}

/// Undoes CloudFront's base64 (`-`, `_`, `~` for `+`, `=`, `/`).
fn cloudfront_unbase64(text: &str) -> Vec<u8> {
    let standard: String = text
        .chars()
        .map(|c| match c {
            '-' => '+',
            '_' => '=',
            '~' => '/',
            c => c,
        })
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(standard)
        .unwrap_or_else(|e| panic!("{text:?} is not CloudFront base64: {e}"))
}

/// The `Expires` of a canned-policy signed URL.
fn expires_of(url: &str) -> u64 {
    let (_, query) = url.split_once('?').unwrap_or_else(|| panic!("unsigned: {url}"));
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("Expires="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no Expires in {url}"))
}

/// Checks `cdn_cookies` of a playback answer as CloudFront would: a custom
/// policy over the title's folder, expiring with the signed stream URLs,
/// signed by the key pair.
fn assert_signed_cookies(key: &CdnKeyPair, playback: &Value) {
    let content_id = playback["content_id"].as_str().expect("content_id");
    let cookies = &playback["cdn_cookies"];
    assert_eq!(cookies["CloudFront-Key-Pair-Id"], KEY_PAIR_ID, "{cookies}");
    let policy_bytes = cloudfront_unbase64(cookies["CloudFront-Policy"].as_str().expect("policy"));
    let policy: Value = serde_json::from_slice(&policy_bytes).expect("the policy is JSON");

    let statements = policy["Statement"].as_array().expect("Statement");
    assert_eq!(statements.len(), 1, "{policy}");
    let statement = &statements[0];
    assert_eq!(
        statement["Resource"],
        format!("{CDN_BASE}/{content_id}/*"),
        "{policy}"
    );
    let date_less_than = statement["Condition"]["DateLessThan"]["AWS:EpochTime"]
        .as_u64()
        .unwrap_or_else(|| panic!("no DateLessThan: {policy}"));
    for stream in playback["streams"].as_array().expect("streams") {
        let url = stream["url"].as_str().expect("url");
        assert_eq!(expires_of(url), date_less_than, "{url} against {policy}");
    }
    // Nothing else restricts (or widens) what the cookies allow.
    assert_eq!(
        policy,
        json!({"Statement": [{
            "Resource": format!("{CDN_BASE}/{content_id}/*"),
            "Condition": {"DateLessThan": {"AWS:EpochTime": date_less_than}}
        }]})
    );

    let signature = cloudfront_unbase64(cookies["CloudFront-Signature"].as_str().expect("signature"));
    assert!(
        key.verifies_sha1(&policy_bytes, &signature),
        "openssl rejects the signature of {policy}"
    );
    let other = String::from_utf8(policy_bytes)
        .expect("text")
        .replace(&format!("/{content_id}/"), "/m-other/");
    assert!(
        !key.verifies_sha1(other.as_bytes(), &signature),
        "the signature would also cover another folder"
    );
}

fn set_cookies(resp: &reqwest::Response) -> Vec<String> {
    resp.headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().expect("a text cookie").to_owned())
        .collect()
}

#[tokio::test]
async fn signed_cookies_cover_the_title_folder_and_verify_with_openssl() {
    let key = CdnKeyPair::generate(KEY_PAIR_ID);
    let app = signing_app(&key, &[]).await;
    let token = premium_token(&app);

    let resp = app.playback_info("m-0001", &token).await;
    assert_eq!(
        set_cookies(&resp),
        Vec::<String>::new(),
        "no cookie domain, no Set-Cookie"
    );
    let info = json(resp).await;
    assert_signed_cookies(&key, &info);

    let resp = app.start_session(&token, "m-0002", "tv").await;
    assert_eq!(resp.status(), 201);
    assert_eq!(set_cookies(&resp), Vec::<String>::new());
    let started = json(resp).await;
    assert_signed_cookies(&key, &started["playback"]);
}

/// The cookies of `resp`: name → (value, attributes with lowercase names).
fn parse_set_cookies(resp: &reqwest::Response) -> Vec<(String, String, BTreeSet<String>)> {
    set_cookies(resp)
        .iter()
        .map(|header| {
            let mut parts = header.split(';').map(str::trim);
            let (name, value) = parts
                .next()
                .and_then(|p| p.split_once('='))
                .unwrap_or_else(|| panic!("not a cookie: {header}"));
            let attributes = parts
                .map(|a| match a.split_once('=') {
                    Some((k, v)) => format!("{}={v}", k.to_ascii_lowercase()),
                    None => a.to_ascii_lowercase(),
                })
                .collect();
            (name.to_owned(), value.to_owned(), attributes)
        })
        .collect()
}

async fn assert_cookie_headers(resp: reqwest::Response, content_id: &str) {
    let cookies = parse_set_cookies(&resp);
    let body = json(resp).await;
    let playback = if body["playback"].is_object() {
        &body["playback"]
    } else {
        &body
    };
    let expected_attributes: BTreeSet<String> = [
        format!("domain={COOKIE_DOMAIN}"),
        format!("path=/{content_id}/"),
        "secure".to_owned(),
        "httponly".to_owned(),
        "samesite=None".to_owned(),
    ]
    .into();
    let names: BTreeSet<&str> = cookies.iter().map(|(n, ..)| n.as_str()).collect();
    assert_eq!(
        names,
        BTreeSet::from([
            "CloudFront-Policy",
            "CloudFront-Signature",
            "CloudFront-Key-Pair-Id"
        ]),
        "{cookies:?}"
    );
    for (name, value, attributes) in &cookies {
        assert_eq!(playback["cdn_cookies"][name], value.as_str(), "{name}");
        assert_eq!(attributes, &expected_attributes, "{name}");
    }
}

#[tokio::test]
async fn the_cookie_domain_sends_the_cookies_as_set_cookie() {
    let key = CdnKeyPair::generate(KEY_PAIR_ID);
    let app = signing_app(&key, &[("MONETA_CDN_COOKIE_DOMAIN", COOKIE_DOMAIN)]).await;
    let token = premium_token(&app);
    assert_cookie_headers(app.playback_info("m-0001", &token).await, "m-0001").await;
    let resp = app.start_session(&token, "m-0002", "tv").await;
    assert_eq!(resp.status(), 201);
    assert_cookie_headers(resp, "m-0002").await;
}

#[tokio::test]
async fn without_a_key_pair_there_are_no_cookies() {
    let app = spawn_app_with(&[("MONETA_CDN_COOKIE_DOMAIN", COOKIE_DOMAIN)]).await;
    let resp = app.playback_info("m-0001", &premium_token(&app)).await;
    assert_eq!(set_cookies(&resp), Vec::<String>::new());
    let info = json(resp).await;
    assert!(info.get("cdn_cookies").is_none(), "{info}");
}

// ---------------------------------------------------------------- stream-limit policy

/// Redis keeps heartbeats in milliseconds: steps further apart than that
/// have an unambiguous order.
async fn let_the_redis_clock_tick() {
    tokio::time::sleep(Duration::from_millis(20)).await;
}

/// `u-standard` (2 streams) at its limit: its token and the sessions it
/// started on a TV, then on a phone.
async fn two_streams_playing(app: &TestApp) -> (String, String, String) {
    let token = app.token("u-standard", "standard", 2, "KR");
    let tv = app.started_session(&token, "m-0001", "tv").await;
    let_the_redis_clock_tick().await;
    let phone = app.started_session(&token, "m-0001", "phone").await;
    let_the_redis_clock_tick().await;
    (token, tv, phone)
}

#[tokio::test]
async fn evict_oldest_ends_the_session_with_the_oldest_heartbeat() {
    let app = spawn_app_with(&[("MONETA_STREAM_LIMIT_POLICY", "evict_oldest")]).await;
    let (token, first, second) = two_streams_playing(&app).await;
    // The first start is the oldest, but its heartbeat is now the newest.
    assert_eq!(app.heartbeat(&token, &first, 10_000).await.status(), 200);
    let_the_redis_clock_tick().await;

    let started = start_json(&app, &token, "m-0001", "tablet").await;
    assert_eq!(started["evicted_session_id"], second.as_str(), "{started}");
    let third = session_id_of(&started);

    assert_eq!(app.heartbeat(&token, &first, 20_000).await.status(), 200);
    assert_eq!(app.heartbeat(&token, &third, 1_000).await.status(), 200);
    assert_error(
        app.heartbeat(&token, &second, 30_000).await,
        409,
        "session_evicted",
    )
    .await;
    assert_eq!(app.stop_session_at(&token, &second, 30_000).await.status(), 204);

    let live = app.live_session_ids(&token).await;
    assert_eq!(live, BTreeSet::from([first, third]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evict_oldest_keeps_twenty_parallel_starts_within_the_limit() {
    let app = spawn_app_with(&[("MONETA_STREAM_LIMIT_POLICY", "evict_oldest")]).await;
    let token = app.token("u-standard", "standard", 2, "KR");
    // Warm the caches so every start races on the limit itself.
    assert_eq!(app.playback_info("m-0001", &token).await.status(), 200);
    let starts: Vec<_> = (0..20)
        .map(|i| {
            let api = PublicApi::clone(&app);
            let token = token.clone();
            tokio::spawn(async move {
                let resp = api.start_session(&token, "m-0001", &format!("device-{i}")).await;
                assert_eq!(resp.status(), 201, "evict_oldest never refuses a start");
                json(resp).await
            })
        })
        .collect();
    let mut started = BTreeSet::new();
    let mut evicted = Vec::new();
    for handle in starts {
        let body = handle.await.expect("start");
        started.insert(session_id_of(&body));
        if let Some(id) = body.get("evicted_session_id") {
            evicted.push(id.as_str().expect("an id").to_owned());
        }
    }
    let evicted_set: BTreeSet<String> = evicted.iter().cloned().collect();
    assert_eq!(
        evicted.len(),
        18,
        "each start past the second ends one: {evicted:?}"
    );
    assert_eq!(evicted_set.len(), 18, "no session is ended twice: {evicted:?}");
    assert!(
        evicted_set.is_subset(&started),
        "only sessions of this user are ended"
    );

    let live = app.live_session_ids(&token).await;
    assert_eq!(live.len(), 2, "{live:?}");
    assert!(live.is_disjoint(&evicted_set) && live.is_subset(&started));
    for id in &evicted {
        assert_error(app.heartbeat(&token, id, 1_000).await, 409, "session_evicted").await;
    }
    for id in &live {
        assert_eq!(app.heartbeat(&token, id, 1_000).await.status(), 200);
    }
}

#[tokio::test]
async fn the_default_policy_still_refuses_with_409() {
    let app = spawn_app().await;
    let (token, first, second) = two_streams_playing(&app).await;
    let body = assert_error(
        app.start_session(&token, "m-0001", "tablet").await,
        409,
        "stream_limit_reached",
    )
    .await;
    assert_eq!(body["error"]["max_streams"], 2);
    let active: BTreeSet<&str> = body["error"]["active_sessions"]
        .as_array()
        .expect("active_sessions")
        .iter()
        .map(|s| s["session_id"].as_str().expect("session_id"))
        .collect();
    assert_eq!(active, BTreeSet::from([first.as_str(), second.as_str()]));
    assert!(!body.to_string().contains("evicted"), "{body}");
    for id in [&first, &second] {
        assert_eq!(app.heartbeat(&token, id, 1_000).await.status(), 200);
    }
}

// ---------------------------------------------------------------- CORS

const ORIGIN: &str = "https://player.example.com";
const SECOND_ORIGIN: &str = "https://tv.example.com";
const ALL_METHODS: [&str; 4] = ["GET", "POST", "PUT", "DELETE"];

async fn cors_app() -> TestApp {
    let origins = format!("{ORIGIN},{SECOND_ORIGIN}");
    spawn_app_with(&[("MONETA_CORS_ALLOWED_ORIGINS", &origins)]).await
}

/// Every `/v1` route (with a real session id) and its methods.
async fn v1_routes(app: &TestApp, token: &str) -> Vec<(String, &'static [&'static str])> {
    let id = app.started_session(token, "m-0001", "browser").await;
    vec![
        ("/v1/contents/m-0001/playback-info".to_owned(), &["GET"][..]),
        ("/v1/playback/sessions".to_owned(), &["GET", "POST"][..]),
        (format!("/v1/playback/sessions/{id}"), &["PUT", "DELETE"][..]),
    ]
}

/// A browser's preflight: no credentials, the method and headers it wants.
async fn preflight(api: &PublicApi, path: &str, origin: &str, method: &str) -> reqwest::Response {
    PublicApi::send(
        api.request(Method::OPTIONS, path, None)
            .header("origin", origin)
            .header("access-control-request-method", method)
            .header("access-control-request-headers", "authorization,content-type"),
    )
    .await
}

fn header(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().expect("a text header").to_owned())
}

/// A comma-list header's items, lowercase.
fn header_items(resp: &reqwest::Response, name: &str) -> BTreeSet<String> {
    resp.headers()
        .get_all(name)
        .iter()
        .flat_map(|v| v.to_str().expect("a text header").split(','))
        .map(|item| item.trim().to_ascii_lowercase())
        .filter(|item| !item.is_empty())
        .collect()
}

fn cors_headers(resp: &reqwest::Response) -> Vec<String> {
    resp.headers()
        .keys()
        .map(|k| k.as_str().to_owned())
        .filter(|k| k.starts_with("access-control-"))
        .collect()
}

#[tokio::test]
async fn cors_preflight_on_every_v1_route_allows_that_routes_methods() {
    let app = cors_app().await;
    let token = premium_token(&app);
    for (path, methods) in v1_routes(&app, &token).await {
        for (origin, method) in methods
            .iter()
            .map(|m| (ORIGIN, *m))
            .chain([(SECOND_ORIGIN, methods[0])])
        {
            let case = format!("preflight {method} {path} from {origin}");
            let resp = preflight(&app, &path, origin, method).await;
            assert_eq!(resp.status(), 204, "{case}");
            assert_eq!(
                header(&resp, "access-control-allow-origin").as_deref(),
                Some(origin),
                "{case}"
            );
            let allowed = header_items(&resp, "access-control-allow-methods");
            for m in ALL_METHODS {
                assert_eq!(
                    allowed.contains(&m.to_ascii_lowercase()),
                    methods.contains(&m),
                    "{case}: {m} in {allowed:?}"
                );
            }
            let headers = header_items(&resp, "access-control-allow-headers");
            for h in ["authorization", "content-type"] {
                assert!(headers.contains(h), "{case}: {h} not in {headers:?}");
            }
        }
    }
}

/// A request as a page on `origin` sends it.
fn from_origin(
    api: &PublicApi,
    method: Method,
    path: &str,
    token: Option<&str>,
    origin: &str,
) -> reqwest::RequestBuilder {
    api.request(method, path, token).header("origin", origin)
}

fn assert_cors_answer(resp: &reqwest::Response, case: &str) {
    assert_eq!(
        header(resp, "access-control-allow-origin").as_deref(),
        Some(ORIGIN),
        "{case}"
    );
    let exposed = header_items(resp, "access-control-expose-headers");
    for h in ["x-request-id", "retry-after"] {
        assert!(exposed.contains(h), "{case}: {h} not in {exposed:?}");
    }
}

#[tokio::test]
async fn cors_answers_name_the_origin_and_expose_request_id_and_retry_after() {
    let app = cors_app().await;
    let token = premium_token(&app);
    let info = "/v1/contents/m-0001/playback-info";

    let resp = app.get_with(info, Some(&token), &[("origin", ORIGIN)]).await;
    assert_eq!(resp.status(), 200);
    assert_cors_answer(&resp, "playback-info");

    let start = json!({"content_id": "m-0001", "device_id": "browser"});
    let resp = PublicApi::send(
        from_origin(&app, Method::POST, "/v1/playback/sessions", Some(&token), ORIGIN).json(&start),
    )
    .await;
    assert_eq!(resp.status(), 201);
    assert_cors_answer(&resp, "start");
    let path = format!("/v1/playback/sessions/{}", session_id_of(&json(resp).await));

    let beat = json!({"position_ms": 1_000, "state": "playing"});
    let resp = PublicApi::send(from_origin(&app, Method::PUT, &path, Some(&token), ORIGIN).json(&beat)).await;
    assert_eq!(resp.status(), 200);
    assert_cors_answer(&resp, "heartbeat");

    let resp = app
        .get_with("/v1/playback/sessions", Some(&token), &[("origin", ORIGIN)])
        .await;
    assert_eq!(resp.status(), 200);
    assert_cors_answer(&resp, "list");

    let resp = PublicApi::send(from_origin(&app, Method::DELETE, &path, Some(&token), ORIGIN)).await;
    assert_eq!(resp.status(), 204);
    assert_cors_answer(&resp, "stop");

    // A page must be able to read errors too, a wrong method's among them.
    let resp = app.get_with(info, None, &[("origin", ORIGIN)]).await;
    assert_cors_answer(&resp, "missing token");
    assert_error(resp, 401, "missing_token").await;
    for (method, path) in [
        (Method::PATCH, "/v1/playback/sessions"),
        (Method::POST, info),
        (Method::GET, path.as_str()),
    ] {
        let case = format!("{method} {path}");
        let resp = PublicApi::send(from_origin(&app, method, path, Some(&token), ORIGIN)).await;
        assert_cors_answer(&resp, &case);
        assert!(resp.headers().contains_key("allow"), "{case}");
        assert_error(resp, 405, "method_not_allowed").await;
    }
}

/// An `OPTIONS` without `Access-Control-Request-Method` is no preflight, and
/// no route has `OPTIONS`: `405` as for any other method, from any origin.
#[tokio::test]
async fn an_options_that_is_no_preflight_is_a_wrong_method() {
    let app = cors_app().await;
    let token = premium_token(&app);
    for (path, methods) in v1_routes(&app, &token).await {
        for origin in [Some(ORIGIN), Some("https://evil.example.net"), None] {
            let mut request = app.request(Method::OPTIONS, &path, Some(&token));
            if let Some(origin) = origin {
                request = request.header("origin", origin);
            }
            let resp = PublicApi::send(request).await;
            let case = format!("OPTIONS {path} from {origin:?}");
            let allow = header_items(&resp, "allow");
            for m in methods {
                assert!(
                    allow.contains(&m.to_ascii_lowercase()),
                    "{case}: {m} not in {allow:?}"
                );
            }
            assert!(!allow.contains("options"), "{case}: {allow:?}");
            assert_error(resp, 405, "method_not_allowed").await;
        }
    }
}

#[tokio::test]
async fn cors_allows_no_other_origin() {
    let app = cors_app().await;
    let token = premium_token(&app);
    let path = "/v1/contents/m-0001/playback-info";
    // Exact origins: another scheme, port or host is another origin.
    for origin in [
        "https://evil.example.net",
        "http://player.example.com",
        "https://player.example.com:8443",
        "https://player.example.com.evil.example.net",
    ] {
        let resp = preflight(&app, path, origin, "GET").await;
        assert_eq!(
            header(&resp, "access-control-allow-origin"),
            None,
            "preflight from {origin}"
        );
        let resp = app.get_with(path, Some(&token), &[("origin", origin)]).await;
        assert_eq!(resp.status(), 200, "{origin}: the answer itself is unchanged");
        assert_eq!(
            header(&resp, "access-control-allow-origin"),
            None,
            "GET from {origin}"
        );
    }
}

#[tokio::test]
async fn without_allowed_origins_there_are_no_cors_headers() {
    let app = spawn_app().await;
    let token = premium_token(&app);
    for (path, methods) in v1_routes(&app, &token).await {
        let resp = preflight(&app, &path, ORIGIN, methods[0]).await;
        assert_eq!(cors_headers(&resp), Vec::<String>::new(), "preflight {path}");
    }
    let resp = app
        .get_with(
            "/v1/contents/m-0001/playback-info",
            Some(&token),
            &[("origin", ORIGIN)],
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(cors_headers(&resp), Vec::<String>::new());
}

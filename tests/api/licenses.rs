//! CONTRACT §8, the licence proxy: `POST /v1/licenses/{drm_system}` checks
//! the licence token, the session and (ClearKey) the key ids, then answers
//! a ClearKey licence itself or passes the CDM's challenge to a vendor and
//! the vendor's answer back. The vendor is a fake licence server in this
//! file, on a loopback port: it records what it received and answers what
//! it is told. Licence tokens the tests make themselves are signed here with
//! `hmac` directly, never by the code under test.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Deref;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method as AxumMethod, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use reqwest::Method;
use serde_json::{Value, json};
use sha2::Sha256;

use crate::helpers::{TestApp, spawn_app_on};
use crate::support::{
    DEV_SECRET, PATIENCE, PublicApi, assert_error, eventually, metric_value, nobody_listens,
    run_moneta_until_exit, sample_content, spawn_fake_api,
};

const DRM_SECRET: &str = "licence-proxy-test-drm-secret";
const BASE: &str = "https://play.example.test";
const TITLE: &str = "m-drm";
/// The title's key id, as the catalog and the keys file write it…
const KEY_ID: &str = "0123abcd0123abcd0123abcd0123abcd";
/// …and as a ClearKey CDM does (unpadded base64url).
const KID: &str = "ASOrzQEjq80BI6vNASOrzQ";
const KEY: &str = "6d6f6e6574612d6465762d6b65792121";
/// The content key as a ClearKey licence carries it.
const K: &str = "bW9uZXRhLWRldi1rZXkhIQ";
/// Another key id, which no token grants.
const OTHER_KID: &str = "AAAAAAAAAAAAAAAAAAAAAA";
const SYSTEMS: [&str; 4] = ["widevine", "playready", "fairplay", "clearkey"];

// ---------------------------------------------------------------------------
// Fixtures

/// A title with a stream for each DRM system, all under one key.
fn drm_title() -> Value {
    let mut title = sample_content(TITLE);
    title["streams"] = json!([
        {"protocol": "dash", "path": "/m-drm/dash/widevine.mpd", "drm": {"system": "widevine", "key_id": KEY_ID}},
        {"protocol": "dash", "path": "/m-drm/dash/playready.mpd", "drm": {"system": "playready", "key_id": KEY_ID}},
        {"protocol": "hls", "path": "/m-drm/hls/fairplay.m3u8", "drm": {"system": "fairplay", "key_id": KEY_ID}},
        {"protocol": "dash", "path": "/m-drm/dash/clearkey.mpd", "drm": {"system": "clearkey", "key_id": KEY_ID}},
    ]);
    title
}

/// Moneta as the licence proxy, with the keys file it reads.
struct Proxy {
    app: TestApp,
    _keys: tempfile::TempDir,
}

impl Deref for Proxy {
    type Target = TestApp;
    fn deref(&self) -> &TestApp {
        &self.app
    }
}

/// The proxy on, ClearKey from a keys file; `settings` replace the ones
/// they name (an empty value unsets one).
async fn proxy_with(settings: &[(&str, &str)]) -> Proxy {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = dir.path().join("keys.json");
    let file = json!({"keys": [{"key_id": KEY_ID, "key": KEY}]});
    std::fs::write(&keys, file.to_string()).expect("write keys file");
    let keys = keys.display().to_string();
    let api = spawn_fake_api().await;
    api.serve_title(drm_title());
    let mut all: Vec<(&str, &str)> = vec![
        ("MONETA_DRM_PROXY", "true"),
        ("MONETA_DRM_TOKEN_SECRET", DRM_SECRET),
        ("MONETA_PUBLIC_BASE_URL", BASE),
        ("MONETA_DRM_CLEARKEY_KEYS_FILE", &keys),
    ];
    all.retain(|(k, _)| settings.iter().all(|(name, _)| name != k));
    all.extend_from_slice(settings);
    Proxy {
        app: spawn_app_on(api, &all).await,
        _keys: dir,
    }
}

async fn proxy() -> Proxy {
    proxy_with(&[]).await
}

async fn json(resp: reqwest::Response) -> Value {
    let status = resp.status();
    let body = resp.text().await.expect("body");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{status}: {body:?} is not JSON: {e}"))
}

/// Starts a session of `TITLE`: `(session id, playback)`.
async fn start(app: &TestApp, token: &str, device: &str) -> (String, Value) {
    let resp = app.start_session(token, TITLE, device).await;
    assert_eq!(resp.status(), 201, "start on {device}");
    let started = json(resp).await;
    let id = started["session_id"].as_str().expect("session_id").to_owned();
    (id, started["playback"].clone())
}

/// The licence token of `system`'s stream.
fn token_for(playback: &Value, system: &str) -> String {
    playback["streams"]
        .as_array()
        .expect("streams")
        .iter()
        .find(|s| s["drm"]["system"] == system)
        .and_then(|s| s["drm"]["license_token"].as_str())
        .unwrap_or_else(|| panic!("no {system} licence token in {playback}"))
        .to_owned()
}

/// A premium user's session and its ClearKey licence token.
async fn session_token(app: &TestApp, device: &str) -> (String, String) {
    let user = app.token("u-premium", "premium", 4, "KR");
    let (id, playback) = start(app, &user, device).await;
    (id, token_for(&playback, "clearkey"))
}

fn clearkey_body(kids: &[&str]) -> String {
    json!({"kids": kids, "type": "temporary"}).to_string()
}

/// `POST /v1/licenses/{system}`, as a player's licence request goes.
async fn licence(
    api: &PublicApi,
    system: &str,
    token: Option<&str>,
    content_type: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    let mut request = api.request(Method::POST, &format!("/v1/licenses/{system}"), token);
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    PublicApi::send(request.body(body)).await
}

/// A ClearKey licence request for the title's key.
async fn clearkey(api: &PublicApi, token: &str) -> reqwest::Response {
    licence(api, "clearkey", Some(token), None, clearkey_body(&[KID])).await
}

/// Asserts the ClearKey licence for the title's key.
async fn assert_clearkey_licence(resp: reqwest::Response) {
    assert_eq!(resp.status(), 200, "a ClearKey licence");
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    assert_eq!(header("content-type").as_deref(), Some("application/json"));
    assert_eq!(header("cache-control").as_deref(), Some("no-store"));
    assert_eq!(
        json(resp).await,
        json!({"keys": [{"kty": "oct", "kid": KID, "k": K}], "type": "temporary"})
    );
}

fn unix_now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A compact JWS signed here with HMAC-SHA-`bits`.
fn sign(secret: &str, header: &Value, claims: &Value) -> String {
    let head = URL_SAFE_NO_PAD.encode(header.to_string());
    let body = URL_SAFE_NO_PAD.encode(claims.to_string());
    let input = format!("{head}.{body}");
    let tag = match header["alg"].as_str() {
        Some("HS384") => {
            let mut mac = Hmac::<sha2::Sha384>::new_from_slice(secret.as_bytes()).unwrap();
            mac.update(input.as_bytes());
            mac.finalize().into_bytes().to_vec()
        }
        _ => {
            let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
            mac.update(input.as_bytes());
            mac.finalize().into_bytes().to_vec()
        }
    };
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(tag))
}

/// Claims as Moneta mints them, for `sub` and `system`, valid for 5 minutes.
fn claims(sub: &str, system: &str, session_id: Option<&str>) -> Value {
    let now = unix_now();
    let mut claims = json!({
        "sub": sub, "content_id": TITLE, "key_id": KEY_ID, "drm_system": system,
        "iat": now, "exp": now + 300,
    });
    if let Some(id) = session_id {
        claims["session_id"] = json!(id);
    }
    claims
}

fn hs256(claims: &Value) -> String {
    sign(DRM_SECRET, &json!({"alg": "HS256", "typ": "JWT"}), claims)
}

fn header_of(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// The `Retry-After` seconds of a refusal that must carry one.
fn retry_after(resp: &reqwest::Response) -> u64 {
    header_of(resp, "retry-after")
        .unwrap_or_else(|| panic!("{} without Retry-After", resp.status()))
        .parse()
        .expect("Retry-After in seconds")
}

/// `moneta_license_requests_total{drm_system,outcome}`, 0 when absent.
async fn licence_count(app: &TestApp, system: &str, outcome: &str) -> f64 {
    let series = format!("moneta_license_requests_total{{drm_system=\"{system}\",outcome=\"{outcome}\"}}");
    metric_value(&app.metrics().await, &series).unwrap_or(0.0)
}

async fn fallbacks(app: &TestApp, kind: &str) -> f64 {
    let series = format!("moneta_fallbacks_total{{dependency=\"redis\",kind=\"{kind}\"}}");
    metric_value(&app.metrics().await, &series).unwrap_or(0.0)
}

/// `moneta_dependency_requests_total` of one dependency and outcome.
async fn dependency_count(app: &TestApp, dependency: &str, outcome: &str) -> f64 {
    let series =
        format!("moneta_dependency_requests_total{{dependency=\"{dependency}\",outcome=\"{outcome}\"}}");
    metric_value(&app.metrics().await, &series).unwrap_or(0.0)
}

// ---------------------------------------------------------------------------
// The fake vendor licence server

/// What the vendor does with the next requests.
#[derive(Clone)]
enum Reply {
    Answer {
        status: u16,
        content_type: &'static str,
        body: Vec<u8>,
    },
    /// Never answers.
    Hang,
}

/// One request as the vendor received it.
#[derive(Clone)]
struct Received {
    method: String,
    uri: String,
    headers: HeaderMap,
    body: Bytes,
}

impl Received {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

#[derive(Default)]
struct VendorState {
    received: Mutex<Vec<Received>>,
    reply: Mutex<Option<Reply>>,
}

struct Vendor {
    url: String,
    state: Arc<VendorState>,
    task: tokio::task::JoinHandle<()>,
}

impl Vendor {
    /// Answers `200 application/octet-stream` with `LICENCE` until told otherwise.
    async fn start() -> Vendor {
        let state = Arc::new(VendorState::default());
        let app = Router::new().fallback(vendor).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind vendor");
        let url = format!("http://{}", listener.local_addr().expect("vendor address"));
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("vendor server");
        });
        let vendor = Vendor { url, state, task };
        vendor.answer(200, "application/octet-stream", LICENCE);
        vendor
    }

    fn answer(&self, status: u16, content_type: &'static str, body: &[u8]) {
        *self.state.reply.lock().unwrap() = Some(Reply::Answer {
            status,
            content_type,
            body: body.to_vec(),
        });
    }

    fn hang(&self) {
        *self.state.reply.lock().unwrap() = Some(Reply::Hang);
    }

    fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }
}

impl Drop for Vendor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A vendor licence: binary, with every byte value in it.
const LICENCE: &[u8] = b"\x00\x01\x02CENC-licence\xff\xfe\r\n\x80";

async fn vendor(
    State(state): State<Arc<VendorState>>,
    method: AxumMethod,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    state.received.lock().unwrap().push(Received {
        method: method.to_string(),
        uri: uri.to_string(),
        headers,
        body,
    });
    let reply = state.reply.lock().unwrap().clone();
    match reply {
        Some(Reply::Answer {
            status,
            content_type,
            body,
        }) => (
            StatusCode::from_u16(status).expect("status"),
            [("content-type", content_type)],
            body,
        )
            .into_response(),
        Some(Reply::Hang) | None => {
            std::future::pending::<()>().await;
            StatusCode::GATEWAY_TIMEOUT.into_response()
        }
    }
}

/// The proxy in front of `vendor` for Widevine and PlayReady (FairPlay has
/// no vendor), with vendor headers.
async fn proxy_to(vendor: &Vendor, extra: &[(&str, &str)]) -> Proxy {
    let widevine = format!("{}/widevine/licence?customer=7", vendor.url);
    let playready = format!("{}/playready", vendor.url);
    let mut settings = vec![
        ("MONETA_DRM_UPSTREAM_WIDEVINE", widevine.as_str()),
        ("MONETA_DRM_UPSTREAM_PLAYREADY", playready.as_str()),
        (
            "MONETA_DRM_UPSTREAM_HEADERS",
            r#"{"X-Api-Key": "vendor-api-key-0001", "X-Customer": "moneta-tests"}"#,
        ),
    ];
    settings.extend_from_slice(extra);
    proxy_with(&settings).await
}

// ---------------------------------------------------------------------------
// The route and its settings

#[tokio::test]
async fn licence_urls_point_at_the_proxy_and_carry_the_token() {
    let app = proxy().await;
    let user = app.token("u-premium", "premium", 4, "KR");
    let info = app.playback_info_json(TITLE, &user).await;
    let (session_id, started) = start(&app, &user, "tv").await;
    for (playback, session) in [(&info, None), (&started, Some(session_id.as_str()))] {
        for system in SYSTEMS {
            let stream = playback["streams"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["drm"]["system"] == system)
                .unwrap_or_else(|| panic!("no {system} stream: {playback}"));
            let drm = &stream["drm"];
            assert_eq!(
                drm["license_url"],
                format!("{BASE}/v1/licenses/{system}"),
                "{drm}"
            );
            let token = drm["license_token"].as_str().expect("license_token");
            assert_eq!(
                drm["license_request_headers"],
                json!({"Authorization": format!("Bearer {token}")})
            );
            let payload = token.split('.').nth(1).expect("a JWS");
            let claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
            assert_eq!(claims["session_id"].as_str(), session, "{claims}");
            assert_eq!(claims["drm_system"], system);
        }
    }
}

#[tokio::test]
async fn without_the_proxy_the_route_is_404_and_licence_urls_are_the_vendors() {
    let api = spawn_fake_api().await;
    api.serve_title(drm_title());
    let app = spawn_app_on(api, &[("MONETA_DRM_TOKEN_SECRET", DRM_SECRET)]).await;
    let user = app.token("u-premium", "premium", 4, "KR");
    let info = app.playback_info_json(TITLE, &user).await;
    let token = token_for(&info, "clearkey");
    assert_eq!(
        info["streams"][0]["drm"]["license_url"],
        "https://drm.example.com/widevine"
    );
    assert_error(clearkey(&app, &token).await, 404, "not_found").await;
}

#[test]
fn the_proxy_does_not_start_without_what_it_needs() {
    let dir = tempfile::tempdir().unwrap();
    let bad_keys = dir.path().join("keys.json");
    std::fs::write(
        &bad_keys,
        r#"{"keys": [{"key_id": "0123", "key": "c0ffee-not-a-key"}]}"#,
    )
    .unwrap();
    let bad_keys = bad_keys.display().to_string();
    let base = [
        ("MONETA_JWT_HS256_SECRET", DEV_SECRET.to_owned()),
        ("MONETA_DRM_PROXY", "true".to_owned()),
        ("MONETA_DRM_TOKEN_SECRET", DRM_SECRET.to_owned()),
        ("MONETA_PUBLIC_BASE_URL", BASE.to_owned()),
        ("MONETA_REDIS_URL", "redis://127.0.0.1:1".to_owned()),
    ];
    let cases = [
        ("MONETA_DRM_TOKEN_SECRET", "", "MONETA_DRM_TOKEN_SECRET"),
        ("MONETA_PUBLIC_BASE_URL", "", "MONETA_PUBLIC_BASE_URL"),
        (
            "MONETA_PUBLIC_BASE_URL",
            "play.example.test",
            "MONETA_PUBLIC_BASE_URL",
        ),
        ("MONETA_DRM_PROXY", "maybe", "MONETA_DRM_PROXY"),
        (
            "MONETA_DRM_CLEARKEY_KEYS_FILE",
            "/nonexistent/keys.json",
            "MONETA_DRM_CLEARKEY_KEYS_FILE",
        ),
        (
            "MONETA_DRM_CLEARKEY_KEYS_FILE",
            &bad_keys,
            "MONETA_DRM_CLEARKEY_KEYS_FILE",
        ),
        (
            "MONETA_DRM_UPSTREAM_WIDEVINE",
            "lic.vendor.example",
            "MONETA_DRM_UPSTREAM_WIDEVINE",
        ),
        (
            "MONETA_DRM_UPSTREAM_HEADERS",
            r#"{"X-Api-Key": 7}"#,
            "MONETA_DRM_UPSTREAM_HEADERS",
        ),
        (
            "MONETA_DRM_UPSTREAM_HEADERS",
            r#"{"X-Api-Key": "c0ffee-secret"#,
            "MONETA_DRM_UPSTREAM_HEADERS",
        ),
        (
            "MONETA_DRM_UPSTREAM_TIMEOUT_MS",
            "soon",
            "MONETA_DRM_UPSTREAM_TIMEOUT_MS",
        ),
    ];
    for (name, value, named) in cases {
        let mut envs: Vec<(&str, String)> = base.iter().filter(|(k, _)| *k != name).cloned().collect();
        envs.push((name, value.to_owned()));
        let (code, stderr) = run_moneta_until_exit(&envs);
        assert_eq!(code, Some(2), "{name}={value:?}: {stderr}");
        assert!(
            stderr.contains(named),
            "{name}={value:?} must name {named}: {stderr}"
        );
        assert!(!stderr.contains("c0ffee"), "a secret was printed: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    }
}

#[tokio::test]
async fn an_unknown_drm_system_is_404_and_never_a_label() {
    let app = proxy().await;
    let (_, token) = session_token(&app, "tv").await;
    for system in ["primetime", "ClearKey", "widevine2", "%2e%2e"] {
        let resp = licence(&app, system, Some(&token), None, clearkey_body(&[KID])).await;
        assert_error(resp, 404, "not_found").await;
    }
    // Every series is there from the start, each of the four systems', and
    // none of these requests counted in any of them.
    let metrics = app.metrics().await;
    let series: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("moneta_license_requests_total{"))
        .collect();
    assert!(!series.is_empty());
    for line in series {
        let known = SYSTEMS
            .iter()
            .any(|system| line.contains(&format!(r#"drm_system="{system}""#)));
        assert!(known && line.ends_with(" 0"), "{line}");
    }
}

// ---------------------------------------------------------------------------
// The licence token

#[tokio::test]
async fn the_licence_token_is_checked_first() {
    let app = proxy().await;
    let body = clearkey_body(&[KID]);
    let resp = licence(&app, "clearkey", None, None, body.clone()).await;
    assert_eq!(header_of(&resp, "www-authenticate").as_deref(), Some("Bearer"));
    assert_error(resp, 401, "missing_token").await;

    let valid = claims("u-premium", "clearkey", None);
    let expired = {
        let mut c = valid.clone();
        c["exp"] = json!(unix_now() - 60);
        c
    };
    let without_sub = {
        let mut c = valid.clone();
        c.as_object_mut().unwrap().remove("sub");
        c
    };
    let bad_session = {
        let mut c = valid.clone();
        c["session_id"] = json!("not-a-session-id");
        c
    };
    // Moneta mints neither: tokens live `MONETA_DRM_TOKEN_TTL_S` (300 s)
    // from now.
    let from_the_future = {
        let mut c = valid.clone();
        c["iat"] = json!(unix_now() + 3600);
        c["exp"] = json!(unix_now() + 3900);
        c
    };
    let too_long = {
        let mut c = valid.clone();
        c["exp"] = json!(unix_now() + 3600);
        c
    };
    let hs256_header = json!({"alg": "HS256", "typ": "JWT"});
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(valid.to_string())
    );
    let invalid = [
        (
            "another secret",
            sign("not-the-drm-secret", &hs256_header, &valid),
        ),
        (
            "another algorithm",
            sign(DRM_SECRET, &json!({"alg": "HS384"}), &valid),
        ),
        ("alg none", none),
        ("expired past the leeway", hs256(&expired)),
        ("no sub", hs256(&without_sub)),
        ("a malformed session id", hs256(&bad_session)),
        ("minted in the future", hs256(&from_the_future)),
        ("minted for longer than the TTL", hs256(&too_long)),
        ("the user's own JWT", app.token("u-premium", "premium", 4, "KR")),
        ("garbage", "a.b.c".to_owned()),
        ("oversized", format!("{}.{}.x", "a".repeat(9000), "b")),
    ];
    for (case, token) in invalid {
        let resp = licence(&app, "clearkey", Some(&token), None, body.clone()).await;
        crate::helpers::assert_invalid_token(resp, case).await;
    }
    let basic = app
        .request(Method::POST, "/v1/licenses/clearkey", None)
        .header("authorization", "Basic dXNlcjpwYXNz")
        .body(body.clone());
    crate::helpers::assert_invalid_token(PublicApi::send(basic).await, "Basic").await;

    // Within the 30 s leeway an expired token still passes.
    let mut lately = valid.clone();
    lately["exp"] = json!(unix_now() - 10);
    assert_clearkey_licence(clearkey(&app, &hs256(&lately)).await).await;
}

#[tokio::test]
async fn a_token_for_another_system_is_denied_but_clearkey_takes_any() {
    let vendor = Vendor::start().await;
    let app = proxy_to(&vendor, &[]).await;
    let user = app.token("u-premium", "premium", 4, "KR");
    let (_, playback) = start(&app, &user, "tv").await;
    let challenge = b"widevine-challenge".to_vec();
    for (token_system, route) in [
        ("widevine", "playready"),
        ("playready", "widevine"),
        ("fairplay", "widevine"),
        ("clearkey", "widevine"),
    ] {
        let token = token_for(&playback, token_system);
        let resp = licence(&app, route, Some(&token), None, challenge.clone()).await;
        assert_error(resp, 403, "license_denied").await;
    }
    assert!(
        vendor.received().is_empty(),
        "a denied request reached the vendor"
    );
    // ClearKey stands in for any CENC system: the key id decides.
    for system in SYSTEMS {
        let token = token_for(&playback, system);
        assert_clearkey_licence(clearkey(&app, &token).await).await;
    }
}

// ---------------------------------------------------------------------------
// The session

#[tokio::test]
async fn a_licence_only_while_the_session_is_live() {
    let app = proxy_with(&[("MONETA_STREAM_LIMIT_POLICY", "evict_oldest")]).await;
    let basic = app.token("u-basic", "basic", 1, "KR");
    let (_, first) = start(&app, &basic, "tv").await;
    let first = token_for(&first, "clearkey");
    assert_clearkey_licence(clearkey(&app, &first).await).await;

    // A second device takes the only slot: the first one's next licence
    // request (a renewal) is refused, every time.
    let (second_id, second) = start(&app, &basic, "phone").await;
    let second = token_for(&second, "clearkey");
    for _ in 0..2 {
        assert_error(clearkey(&app, &first).await, 409, "session_evicted").await;
    }
    assert_clearkey_licence(clearkey(&app, &second).await).await;

    // Stopped: no licence either.
    assert_eq!(app.stop_session(&basic, &second_id).await.status(), 204);
    assert_error(clearkey(&app, &second).await, 404, "session_not_found").await;

    assert_eq!(licence_count(&app, "clearkey", "evicted").await, 2.0);
    assert_eq!(licence_count(&app, "clearkey", "session_not_found").await, 1.0);
    assert_eq!(licence_count(&app, "clearkey", "issued").await, 2.0);
}

/// By default a token from playback-info alone (no session) gets licences,
/// as CONTRACT §8 has it; `MONETA_DRM_REQUIRE_SESSION=true` closes that door.
#[tokio::test]
async fn licences_can_be_kept_for_sessions_alone() {
    for (required, expected) in [("false", 200), ("true", 403)] {
        let app = proxy_with(&[("MONETA_DRM_REQUIRE_SESSION", required)]).await;
        let user = app.token("u-premium", "premium", 4, "KR");
        let playback = app.playback_info_json(TITLE, &user).await;
        let sessionless = token_for(&playback, "clearkey");
        let resp = clearkey(&app, &sessionless).await;
        if expected == 200 {
            assert_clearkey_licence(resp).await;
        } else {
            assert_error(resp, 403, "license_denied").await;
            assert_eq!(licence_count(&app, "clearkey", "denied").await, 1.0);
        }
        let (_, token) = session_token(&app, "tv").await;
        assert_clearkey_licence(clearkey(&app, &token).await).await;
    }
}

#[tokio::test]
async fn an_expired_session_gets_no_licence() {
    let app = proxy_with(&[
        ("MONETA_SESSION_TTL_S", "2"),
        ("MONETA_HEARTBEAT_INTERVAL_S", "1"),
    ])
    .await;
    let (_, token) = session_token(&app, "tv").await;
    assert_clearkey_licence(clearkey(&app, &token).await).await;
    // No heartbeat: the session expires on Redis' clock. Watched through
    // the session list, so the wait costs no licence request (and no rate).
    let user = app.token("u-premium", "premium", 4, "KR");
    let expired = eventually(PATIENCE, async || {
        app.live_session_ids(&user).await.is_empty().then_some(())
    })
    .await;
    assert!(expired.is_some(), "the session never expired");
    assert_error(clearkey(&app, &token).await, 404, "session_not_found").await;
}

#[tokio::test]
async fn a_session_moneta_did_not_issue_to_the_caller_gets_no_licence() {
    let app = proxy().await;
    let standard = app.token("u-standard", "standard", 2, "KR");
    let (someone_elses, _) = start(&app, &standard, "tv").await;
    let (own, _) = session_token(&app, "tv").await;
    let random = own.split('.').next().unwrap();
    let made_up = format!("{}.{TITLE}.{}", "0".repeat(random.len()), "A".repeat(22));
    let other_title = own.replace(&format!(".{TITLE}."), ".m-0001.");
    for (case, session) in [
        ("another user's session", someone_elses.as_str()),
        ("a made-up id", made_up.as_str()),
        ("an id of another title", other_title.as_str()),
    ] {
        let token = hs256(&claims("u-premium", "clearkey", Some(session)));
        let resp = clearkey(&app, &token).await;
        assert_eq!(resp.status(), 404, "{case}");
        assert_error(resp, 404, "session_not_found").await;
    }
    // The caller's own session, in a token of the same shape, passes.
    let token = hs256(&claims("u-premium", "clearkey", Some(&own)));
    assert_clearkey_licence(clearkey(&app, &token).await).await;
}

/// Client commands Redis counted since the last reset, by name (the
/// background probe's `PING` and this test's own commands left out).
fn redis_commands(app: &TestApp) -> BTreeMap<String, u64> {
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
            !(name == "ping" || name == "info" || name == "time" || name.starts_with("config"))
        })
        .collect()
}

#[tokio::test]
async fn a_session_check_is_one_redis_round_trip() {
    // The courier's rounds would be counted with the licences'.
    let app = proxy_with(&[("MONETA_PROGRESS_FLUSH_MS", "3600000")]).await;
    let (_, token) = session_token(&app, "tv").await;
    assert_clearkey_licence(clearkey(&app, &token).await).await;
    let client = redis::Client::open(app.redis.url.as_str()).unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query(&mut client.get_connection().unwrap())
        .unwrap();
    const N: u64 = 10;
    for _ in 0..N {
        assert_clearkey_licence(clearkey(&app, &token).await).await;
    }
    let counted = redis_commands(&app);
    assert_eq!(
        counted.get("evalsha"),
        Some(&N),
        "one script per licence request: {counted:?}"
    );
    // Anything else would be another round trip (the script's own ZSCORE is counted too).
    assert!(
        counted.keys().all(|name| name == "evalsha" || name == "zscore"),
        "{counted:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn licences_follow_sessions_on_a_redis_cluster() {
    let cluster = testkit::RedisCluster::start(3);
    let urls = cluster.urls();
    let app = proxy_with(&[
        ("MONETA_REDIS_CLUSTER_URLS", &urls),
        ("MONETA_STREAM_LIMIT_POLICY", "evict_oldest"),
    ])
    .await;
    let basic = app.token("u-basic", "basic", 1, "KR");
    let (_, first) = start(&app, &basic, "tv").await;
    let first = token_for(&first, "clearkey");
    assert_clearkey_licence(clearkey(&app, &first).await).await;
    let (_, second) = start(&app, &basic, "phone").await;
    assert_error(clearkey(&app, &first).await, 409, "session_evicted").await;
    assert_clearkey_licence(clearkey(&app, &token_for(&second, "clearkey")).await).await;
    assert_eq!(
        fallbacks(&app, "license_unchecked").await,
        0.0,
        "Redis answered every check"
    );
}

// ---------------------------------------------------------------------------
// ClearKey

#[tokio::test]
async fn clearkey_licences_come_from_the_keys_file_whatever_the_content_type() {
    let app = proxy().await;
    let (_, token) = session_token(&app, "tv").await;
    for content_type in [
        None,
        Some("application/json"),
        Some("text/plain;charset=UTF-8"),
        Some("application/octet-stream"),
    ] {
        let resp = licence(
            &app,
            "clearkey",
            Some(&token),
            content_type,
            clearkey_body(&[KID, KID]),
        )
        .await;
        assert_clearkey_licence(resp).await;
    }
}

#[tokio::test]
async fn clearkey_kids_must_be_the_tokens_key_id() {
    let app = proxy().await;
    let (_, token) = session_token(&app, "tv").await;
    for kids in [
        &[OTHER_KID][..],
        &[KID, OTHER_KID],
        &["not base64url!"],
        &["ASOrzQ"],
    ] {
        let resp = licence(&app, "clearkey", Some(&token), None, clearkey_body(kids)).await;
        assert_error(resp, 403, "license_denied").await;
    }
    // A token for a key the keys file does not hold gets no licence either.
    let mut other_key = claims("u-premium", "clearkey", None);
    other_key["key_id"] = json!("ffffffffffffffffffffffffffffffff");
    let resp = licence(
        &app,
        "clearkey",
        Some(&hs256(&other_key)),
        None,
        clearkey_body(&["_____________________w"]),
    )
    .await;
    assert_error(resp, 403, "license_denied").await;
    for body in ["", "not json", "{}", r#"{"kids": []}"#, r#"{"kids": "x"}"#] {
        let resp = licence(&app, "clearkey", Some(&token), None, body).await;
        assert_error(resp, 400, "invalid_body").await;
    }
    assert_eq!(licence_count(&app, "clearkey", "denied").await, 5.0);
    assert_eq!(licence_count(&app, "clearkey", "invalid_body").await, 5.0);
}

#[tokio::test]
async fn without_a_licence_source_a_system_is_404() {
    // No keys file, no vendor.
    let app = proxy_with(&[("MONETA_DRM_CLEARKEY_KEYS_FILE", "")]).await;
    let user = app.token("u-premium", "premium", 4, "KR");
    let (_, playback) = start(&app, &user, "tv").await;
    assert_error(
        clearkey(&app, &token_for(&playback, "clearkey")).await,
        404,
        "not_found",
    )
    .await;
    for system in ["widevine", "playready", "fairplay"] {
        let token = token_for(&playback, system);
        let resp = licence(&app, system, Some(&token), None, b"challenge".to_vec()).await;
        assert_error(resp, 404, "not_found").await;
        assert_eq!(licence_count(&app, system, "no_license_server").await, 1.0);
    }
}

// ---------------------------------------------------------------------------
// Vendors

/// A PlayReady CDM hands the player `SOAPAction` with its challenge; SOAP
/// licence servers dispatch on it.
#[tokio::test]
async fn a_playready_challenge_reaches_the_vendor_with_its_soap_action() {
    let vendor = Vendor::start().await;
    let app = proxy_to(&vendor, &[]).await;
    let user = app.token("u-premium", "premium", 4, "KR");
    let (_, playback) = start(&app, &user, "tv").await;
    let token = token_for(&playback, "playready");
    let action = "\"http://schemas.microsoft.com/DRM/2007/03/protocols/AcquireLicense\"";
    let request = app
        .request(Method::POST, "/v1/licenses/playready", Some(&token))
        .header("content-type", "text/xml; charset=utf-8")
        .header("soapaction", action)
        .header("x-other", "not forwarded");
    let resp = PublicApi::send(request.body("<soap:Envelope/>")).await;
    assert_eq!(resp.status(), 200);
    let received = vendor.received();
    let got = received.last().expect("the vendor was asked");
    assert_eq!(got.header("soapaction"), Some(action));
    assert_eq!(got.header("content-type"), Some("text/xml; charset=utf-8"));
    assert_eq!(got.header("x-other"), None);
}

#[tokio::test]
async fn vendor_licences_pass_through_unchanged_and_the_token_stays_home() {
    let vendor = Vendor::start().await;
    let app = proxy_to(&vendor, &[]).await;
    let user = app.token("u-premium", "premium", 4, "KR");
    let (session_id, playback) = start(&app, &user, "tv").await;
    let token = token_for(&playback, "widevine");
    let challenge: Vec<u8> = (0..=255u8)
        .chain(b"\r\n\r\nCDM challenge".iter().copied())
        .collect();

    let resp = licence(
        &app,
        "widevine",
        Some(&token),
        Some("application/octet-stream"),
        challenge.clone(),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        header_of(&resp, "content-type").as_deref(),
        Some("application/octet-stream")
    );
    assert_eq!(resp.bytes().await.unwrap().as_ref(), LICENCE);

    let received = vendor.received();
    assert_eq!(received.len(), 1);
    let got = &received[0];
    assert_eq!(got.method, "POST");
    assert_eq!(got.uri, "/widevine/licence?customer=7");
    assert_eq!(
        got.body.as_ref(),
        challenge.as_slice(),
        "the challenge byte for byte"
    );
    assert_eq!(got.header("content-type"), Some("application/octet-stream"));
    assert_eq!(got.header("x-api-key"), Some("vendor-api-key-0001"));
    assert_eq!(got.header("x-customer"), Some("moneta-tests"));
    assert_eq!(got.header("x-moneta-user"), Some("u-premium"));
    assert_eq!(got.header("x-moneta-content"), Some(TITLE));
    assert_eq!(got.header("x-moneta-session"), Some(session_id.as_str()));
    assert_eq!(got.header("authorization"), None);
    for (name, value) in &got.headers {
        assert!(
            !value
                .as_bytes()
                .windows(20)
                .any(|w| token.as_bytes().windows(20).any(|t| t == w)),
            "the licence token reached the vendor in {name}"
        );
    }

    // The vendor's refusals and failures come back as it gave them.
    for (status, content_type, body) in [
        (403, "text/plain", b"denied by the vendor's policy".as_slice()),
        (500, "application/json", br#"{"vendor":"internal"}"#.as_slice()),
        (
            400,
            "application/octet-stream",
            b"\x01\x02bad challenge".as_slice(),
        ),
    ] {
        vendor.answer(status, content_type, body);
        let resp = licence(&app, "widevine", Some(&token), None, challenge.clone()).await;
        assert_eq!(resp.status().as_u16(), status);
        assert_eq!(header_of(&resp, "content-type").as_deref(), Some(content_type));
        assert_eq!(resp.bytes().await.unwrap().as_ref(), body, "{status}");
    }
    assert_eq!(
        vendor.received()[1].header("content-type"),
        None,
        "no Content-Type was made up"
    );

    // PlayReady: another vendor URL, the challenge's own content type.
    vendor.answer(200, "text/xml; charset=utf-8", b"<AcquireLicenseResponse/>");
    let token = token_for(&playback, "playready");
    let soap = b"<?xml version=\"1.0\"?><soap:Envelope/>".to_vec();
    let resp = licence(
        &app,
        "playready",
        Some(&token),
        Some("text/xml; charset=utf-8"),
        soap.clone(),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        header_of(&resp, "content-type").as_deref(),
        Some("text/xml; charset=utf-8")
    );
    let last = vendor.received().pop().unwrap();
    assert_eq!(last.uri, "/playready");
    assert_eq!(last.body.as_ref(), soap.as_slice());
    assert_eq!(last.header("content-type"), Some("text/xml; charset=utf-8"));

    assert_eq!(licence_count(&app, "widevine", "forwarded").await, 1.0);
    assert_eq!(licence_count(&app, "widevine", "upstream_status").await, 3.0);
    assert_eq!(licence_count(&app, "playready", "forwarded").await, 1.0);
}

#[tokio::test]
async fn an_evicted_session_never_reaches_the_vendor() {
    let vendor = Vendor::start().await;
    let app = proxy_to(&vendor, &[("MONETA_STREAM_LIMIT_POLICY", "evict_oldest")]).await;
    let basic = app.token("u-basic", "basic", 1, "KR");
    let (_, first) = start(&app, &basic, "tv").await;
    let first = token_for(&first, "widevine");
    assert_eq!(
        licence(&app, "widevine", Some(&first), None, b"c".to_vec())
            .await
            .status(),
        200
    );
    start(&app, &basic, "phone").await;
    let resp = licence(&app, "widevine", Some(&first), None, b"renewal".to_vec()).await;
    assert_error(resp, 409, "session_evicted").await;
    assert_eq!(
        vendor.received().len(),
        1,
        "only the live session's request was forwarded"
    );
}

#[tokio::test]
async fn bodies_up_to_64_kib_pass_and_larger_ones_are_413() {
    let vendor = Vendor::start().await;
    let app = proxy_to(&vendor, &[]).await;
    let (_, token) = {
        let user = app.token("u-premium", "premium", 4, "KR");
        let (id, playback) = start(&app, &user, "tv").await;
        (id, token_for(&playback, "widevine"))
    };
    for size in [20 * 1024, 64 * 1024] {
        let body = vec![b'w'; size];
        let resp = licence(
            &app,
            "widevine",
            Some(&token),
            Some("application/octet-stream"),
            body,
        )
        .await;
        assert_eq!(resp.status(), 200, "{size} bytes");
        assert_eq!(vendor.received().pop().unwrap().body.len(), size);
    }
    let resp = licence(&app, "widevine", Some(&token), None, vec![b'w'; 64 * 1024 + 1]).await;
    assert_error(resp, 413, "payload_too_large").await;
    assert_eq!(vendor.received().len(), 2, "the oversized body was forwarded");
    assert_eq!(licence_count(&app, "widevine", "too_large").await, 1.0);
    // Every other route keeps its 16 KiB.
    let user = app.token("u-premium", "premium", 4, "KR");
    let resp = app
        .send_raw(
            Method::POST,
            "/v1/playback/sessions",
            Some(&user),
            "application/json",
            vec![b' '; 17 * 1024],
        )
        .await;
    assert_error(resp, 413, "payload_too_large").await;
}

// ---------------------------------------------------------------------------
// Rate limit, CORS, metrics

#[tokio::test]
async fn more_than_30_licence_requests_a_minute_are_429() {
    let app = proxy().await;
    let (_, token) = session_token(&app, "tv").await;
    for n in 1..=30 {
        assert_eq!(clearkey(&app, &token).await.status(), 200, "request {n}");
    }
    let resp = clearkey(&app, &token).await;
    let wait = retry_after(&resp);
    assert!((1..=60).contains(&wait), "Retry-After {wait}");
    assert_error(resp, 429, "rate_limited").await;
    // Counted per session: another one is not held back.
    let (_, other) = session_token(&app, "phone").await;
    assert_clearkey_licence(clearkey(&app, &other).await).await;

    // A token without a session (from playback-info) counts per user and title.
    let user = app.token("u-standard", "standard", 2, "KR");
    let info = app.playback_info_json(TITLE, &user).await;
    let unbound = token_for(&info, "clearkey");
    for n in 1..=30 {
        assert_eq!(clearkey(&app, &unbound).await.status(), 200, "request {n}");
    }
    let again = app.playback_info_json(TITLE, &user).await;
    let resp = clearkey(&app, &token_for(&again, "clearkey")).await;
    retry_after(&resp);
    assert_error(resp, 429, "rate_limited").await;
    assert_eq!(licence_count(&app, "clearkey", "rate_limited").await, 2.0);
}

#[tokio::test]
async fn cors_on_the_licence_route_as_on_every_v1_route() {
    let origin = "https://player.example.test";
    let app = proxy_with(&[("MONETA_CORS_ALLOWED_ORIGINS", origin)]).await;
    let preflight = PublicApi::send(
        app.request(Method::OPTIONS, "/v1/licenses/widevine", None)
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "authorization, content-type"),
    )
    .await;
    assert_eq!(preflight.status(), 204);
    assert_eq!(
        header_of(&preflight, "access-control-allow-origin").as_deref(),
        Some(origin)
    );
    let methods = header_of(&preflight, "access-control-allow-methods").unwrap_or_default();
    assert!(methods.contains("POST"), "{methods}");
    let allowed = header_of(&preflight, "access-control-allow-headers")
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(
        allowed.contains("authorization") && allowed.contains("content-type"),
        "{allowed}"
    );

    let (_, token) = session_token(&app, "tv").await;
    let from_origin = |token: Option<&str>| {
        app.request(Method::POST, "/v1/licenses/clearkey", token)
            .header("origin", origin)
            .body(clearkey_body(&[KID]))
    };
    let granted = PublicApi::send(from_origin(Some(&token))).await;
    let refused = PublicApi::send(from_origin(None)).await;
    for resp in [&granted, &refused] {
        assert_eq!(
            header_of(resp, "access-control-allow-origin").as_deref(),
            Some(origin)
        );
        let exposed = header_of(resp, "access-control-expose-headers")
            .unwrap_or_default()
            .to_ascii_lowercase();
        assert!(
            exposed.contains("x-request-id") && exposed.contains("retry-after"),
            "{exposed}"
        );
    }
    assert_clearkey_licence(granted).await;
    let foreign = PublicApi::send(
        app.request(Method::OPTIONS, "/v1/licenses/clearkey", None)
            .header("origin", "https://elsewhere.example")
            .header("access-control-request-method", "POST"),
    )
    .await;
    assert_eq!(header_of(&foreign, "access-control-allow-origin"), None);
}

#[tokio::test]
async fn the_openapi_document_describes_the_route() {
    let app = proxy().await;
    let doc = json(app.get_anonymously("/openapi.json").await).await;
    let post = &doc["paths"]["/v1/licenses/{drm_system}"]["post"];
    for status in ["200", "401", "403", "404", "409", "413", "429", "503"] {
        assert!(
            post["responses"][status].is_object(),
            "{status} undocumented: {post}"
        );
    }
    assert!(
        post["requestBody"]["content"]["application/octet-stream"].is_object(),
        "{post}"
    );
}

// ---------------------------------------------------------------------------
// Random tokens and bodies

/// Deterministic pseudo-random numbers (xorshift64), so a failure repeats.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    fn hex16(&mut self) -> String {
        self.bytes(16).iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// A random token: garbage, a valid one with a character changed, or one
/// signed with the right secret for random claims (never for the title's
/// key, so that none may have a licence).
fn random_token(noise: &mut Noise, valid: &str) -> Option<String> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ ";
    match noise.below(5) {
        0 => None,
        1 => {
            let n = noise.below(120);
            Some(
                (0..n)
                    .map(|_| ALPHABET[noise.below(ALPHABET.len())] as char)
                    .collect(),
            )
        }
        2 => {
            // Any change before the signature's last character (whose low
            // bits base64 may ignore) breaks the signature.
            let mut chars: Vec<char> = valid.chars().collect();
            let at = noise.below(chars.len() - 1);
            let mut with = ALPHABET[noise.below(ALPHABET.len())] as char;
            if with == chars[at] {
                with = if with == 'A' { 'B' } else { 'A' };
            }
            chars[at] = with;
            Some(chars.into_iter().collect())
        }
        3 => {
            let mut c = claims(
                &format!("u-random-{}", noise.next() % 1000),
                noise.pick(&["widevine", "playready", "fairplay", "clearkey", "primetime", ""]),
                None,
            );
            let key_id = noise.hex16();
            assert_ne!(key_id, KEY_ID);
            c["key_id"] = json!(key_id);
            if noise.below(2) == 0 {
                c["session_id"] = json!(format!("{}.{TITLE}.{}", noise.hex16(), "B".repeat(22)));
            }
            Some(hs256(&c))
        }
        _ => Some(valid.to_owned()),
    }
}

/// A random body: ClearKey-shaped with key ids that are not the title's, or bytes.
fn random_body(noise: &mut Noise) -> Vec<u8> {
    match noise.below(3) {
        0 => {
            let kids: Vec<String> = (0..noise.below(4))
                .map(|_| match noise.below(3) {
                    0 => URL_SAFE_NO_PAD.encode(noise.bytes(16)),
                    1 => OTHER_KID.to_owned(),
                    _ => {
                        let n = noise.below(40);
                        URL_SAFE_NO_PAD.encode(noise.bytes(n))
                    }
                })
                .collect();
            json!({"kids": kids, "type": noise.pick(&["temporary", "persistent-license", ""])})
                .to_string()
                .into_bytes()
        }
        1 => {
            let n = noise.below(300);
            noise.bytes(n)
        }
        _ => {
            let pieces = [
                "{", "}", "[", "]", "\"kids\"", ":", ",", "\"", OTHER_KID, "null", "1e999", "\\u0000",
            ];
            (0..noise.below(20))
                .map(|_| noise.pick(&pieces))
                .collect::<String>()
                .into_bytes()
        }
    }
}

#[tokio::test]
async fn random_tokens_and_bodies_are_never_a_5xx_nor_a_licence() {
    let app = proxy().await;
    // The title's key, without a session: only the body keeps it from a
    // licence, and bodies here never ask for the title's key.
    let valid = hs256(&claims("u-fuzz", "widevine", None));
    let mut noise = Noise(0x2545_F491_4F6C_DD1D);
    let mut statuses = BTreeMap::new();
    for case in 0..600 {
        let token = random_token(&mut noise, &valid);
        let body = random_body(&mut noise);
        let system = noise.pick(&["clearkey", "clearkey", "widevine", "playready", "fairplay", "x"]);
        let content_type = noise.pick(&["application/json", "application/octet-stream", "text/plain", ""]);
        let mut request = app.request(Method::POST, &format!("/v1/licenses/{system}"), None);
        if let Some(token) = &token {
            request = request.header(
                "authorization",
                format!("{} {token}", noise.pick(&["Bearer", "bearer", "Basic"])),
            );
        }
        if !content_type.is_empty() {
            request = request.header("content-type", content_type);
        }
        let resp = PublicApi::send(request.body(body.clone())).await;
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        assert!(
            status < 500 && status != 200 && !text.contains(K),
            "case {case}: {status} {text}\ntoken {token:?}\nbody {:?}",
            String::from_utf8_lossy(&body)
        );
        *statuses.entry(status).or_insert(0u32) += 1;
    }
    // The cases reached every check, not only the first.
    for status in [400, 401, 403, 404] {
        assert!(statuses.contains_key(&status), "no {status} among {statuses:?}");
    }
}

// ---------------------------------------------------------------------------
// Faults: run one at a time (nextest's `serial` group)

mod under_fault {
    use super::*;

    #[tokio::test]
    async fn while_redis_is_down_sessions_moneta_issued_keep_their_licence() {
        let mut app = proxy().await;
        let standard = app.token("u-standard", "standard", 2, "KR");
        let (someone_elses, _) = start(&app, &standard, "tv").await;
        let (own, token) = session_token(&app, "tv").await;
        app.app.redis.kill();

        assert_clearkey_licence(clearkey(&app, &token).await).await;
        assert!(fallbacks(&app, "license_unchecked").await >= 1.0);
        // Only an id whose MAC proves it the caller's passes unchecked.
        let random = own.split('.').next().unwrap();
        let made_up = format!("{}.{TITLE}.{}", "0".repeat(random.len()), "A".repeat(22));
        for session in [someone_elses.as_str(), made_up.as_str()] {
            let token = hs256(&claims("u-premium", "clearkey", Some(session)));
            assert_error(clearkey(&app, &token).await, 404, "session_not_found").await;
        }
    }

    #[tokio::test]
    async fn sessions_redis_lost_keep_their_licence_and_ended_ones_stay_ended() {
        let app = proxy().await;
        let (_, live) = session_token(&app, "tv").await;
        let (stopped_id, stopped) = session_token(&app, "phone").await;
        let user = app.token("u-premium", "premium", 4, "KR");
        assert_eq!(app.stop_session(&user, &stopped_id).await.status(), 204);
        // Redis loses the live sessions, but remembers which ones ended.
        let client = redis::Client::open(app.redis.url.as_str()).unwrap();
        let mut conn = client.get_connection().unwrap();
        let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn).unwrap();
        for key in keys.iter().filter(|k| {
            k.contains("u-premium")
                && [":sessions", ":session-info", ":devices"]
                    .iter()
                    .any(|s| k.ends_with(s))
        }) {
            let _: () = redis::cmd("DEL").arg(key).query(&mut conn).unwrap();
        }

        // Recorded again, as its heartbeat would record it, within the limit.
        assert_clearkey_licence(clearkey(&app, &live).await).await;
        assert_eq!(fallbacks(&app, "license_untraced").await, 0.0);
        let listed = app.sessions(&user).await;
        assert_eq!(listed["sessions"].as_array().map(Vec::len), Some(1), "{listed}");
        assert_error(clearkey(&app, &stopped).await, 404, "session_not_found").await;
    }

    /// FLUSHALL: every trace of `app`'s sessions is gone.
    async fn flush(app: &TestApp) {
        let client = redis::Client::open(app.redis.url.as_str()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    }

    #[tokio::test]
    async fn a_session_redis_lost_gets_a_licence_only_within_the_limit() {
        // One stream: after Redis lost everything, the session that starts
        // (or beats) first holds the slot; a player that only asks for
        // licences does not play beside it.
        let app = proxy().await;
        let basic = app.token("u-basic", "basic", 1, "KR");
        let (first, playback) = start(&app, &basic, "tv").await;
        let first_token = token_for(&playback, "clearkey");
        flush(&app).await;
        let (second, playback) = start(&app, &basic, "phone").await;
        let second_token = token_for(&playback, "clearkey");

        let refused = clearkey(&app, &first_token).await;
        assert_eq!(refused.status(), 409);
        let body = json(refused).await;
        assert_eq!(body["error"]["code"], "stream_limit_reached", "{body}");
        assert_eq!(
            body["error"]["active_sessions"][0]["session_id"], second,
            "{body}"
        );
        assert_eq!(licence_count(&app, "clearkey", "stream_limit_reached").await, 1.0);
        assert_clearkey_licence(clearkey(&app, &second_token).await).await;
        assert_eq!(
            app.live_session_ids(&basic).await,
            BTreeSet::from([second.clone()])
        );

        // The slot frees: the licence records the lost session again.
        assert_eq!(app.stop_session(&basic, &second).await.status(), 204);
        assert_clearkey_licence(clearkey(&app, &first_token).await).await;
        assert_eq!(
            app.live_session_ids(&basic).await,
            BTreeSet::from([first.clone()])
        );
        assert_error(clearkey(&app, &second_token).await, 404, "session_not_found").await;
        assert_eq!(fallbacks(&app, "license_untraced").await, 0.0);
    }

    #[tokio::test]
    async fn a_full_redis_bulkhead_is_503() {
        let app = proxy_with(&[
            ("MONETA_REDIS_MAX_CONCURRENCY", "1"),
            ("MONETA_REDIS_TIMEOUT_MS", "10000"),
            ("MONETA_REQUEST_TIMEOUT_MS", "60000"),
            ("MONETA_PROGRESS_FLUSH_MS", "3600000"),
        ])
        .await;
        let user = app.token("u-premium", "premium", 4, "KR");
        // With one slot, the background probe fills the bulkhead now and
        // then, and a start meeting it is refused: it is tried again.
        let token = eventually(PATIENCE, async || {
            let resp = app.start_session(&user, TITLE, "tv").await;
            match resp.status().as_u16() {
                201 => Some(token_for(&json(resp).await["playback"], "clearkey")),
                503 => None,
                other => panic!("session start: {other}"),
            }
        })
        .await
        .expect("no start found the slot free");
        let turned_away = dependency_count(&app, "redis", "rejected_full").await;
        app.app.redis.pause();
        let holder = {
            let api = app.public.clone();
            let token = token.clone();
            tokio::spawn(async move { clearkey(&api, &token).await.status() })
        };
        // Someone (the request above, or the probe) holds the only slot, for
        // as long as the frozen Redis keeps it, once a call is turned away.
        let full = eventually(PATIENCE, async || {
            (dependency_count(&app, "redis", "rejected_full").await > turned_away).then_some(())
        })
        .await;
        assert!(full.is_some(), "the bulkhead never filled");
        let resp = clearkey(&app, &token).await;
        retry_after(&resp);
        assert_error(resp, 503, "dependency_unavailable").await;
        assert!(licence_count(&app, "clearkey", "unavailable").await >= 1.0);
        app.app.redis.resume();
        holder.await.expect("the holding request");
    }

    #[tokio::test]
    async fn a_vendor_that_is_down_is_503_and_its_breaker_opens() {
        let down = nobody_listens();
        let vendor = Vendor::start().await;
        let app = proxy_with(&[
            ("MONETA_DRM_UPSTREAM_WIDEVINE", &down),
            ("MONETA_DRM_UPSTREAM_PLAYREADY", &vendor.url),
            ("MONETA_DRM_UPSTREAM_BREAKER_FAILURES", "3"),
            ("MONETA_DRM_UPSTREAM_BREAKER_OPEN_MS", "60000"),
            ("MONETA_DRM_UPSTREAM_BREAKER_OPEN_MAX_MS", "60000"),
        ])
        .await;
        let user = app.token("u-premium", "premium", 4, "KR");
        let (_, playback) = start(&app, &user, "tv").await;
        let widevine = token_for(&playback, "widevine");
        for _ in 0..3 {
            let resp = licence(&app, "widevine", Some(&widevine), None, b"c".to_vec()).await;
            retry_after(&resp);
            assert_error(resp, 503, "dependency_unavailable").await;
        }
        let metrics = app.metrics().await;
        assert_eq!(
            metric_value(
                &metrics,
                r#"moneta_circuit_breaker_state{dependency="drm_widevine"}"#
            ),
            Some(2.0)
        );
        assert_eq!(dependency_count(&app, "drm_widevine", "error").await, 3.0);
        let resp = licence(&app, "widevine", Some(&widevine), None, b"c".to_vec()).await;
        retry_after(&resp);
        assert_error(resp, 503, "dependency_unavailable").await;
        assert_eq!(dependency_count(&app, "drm_widevine", "rejected_open").await, 1.0);
        // One vendor's breaker is its own.
        let playready = token_for(&playback, "playready");
        let resp = licence(&app, "playready", Some(&playready), None, b"c".to_vec()).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(licence_count(&app, "widevine", "unavailable").await, 4.0);
    }

    /// A vendor that never answers, the proxy in front of it with
    /// `settings`, and a session's Widevine licence token.
    async fn hung_vendor(settings: &[(&str, &str)]) -> (Vendor, Proxy, String) {
        let vendor = Vendor::start().await;
        vendor.hang();
        let app = proxy_to(&vendor, settings).await;
        let user = app.token("u-premium", "premium", 4, "KR");
        let (_, playback) = start(&app, &user, "tv").await;
        let token = token_for(&playback, "widevine");
        (vendor, app, token)
    }

    #[tokio::test]
    async fn a_hung_vendor_times_out_and_then_is_not_waited_for() {
        let (vendor, app, token) = hung_vendor(&[
            ("MONETA_DRM_UPSTREAM_TIMEOUT_MS", "300"),
            ("MONETA_DRM_UPSTREAM_BREAKER_FAILURES", "2"),
            ("MONETA_DRM_UPSTREAM_BREAKER_OPEN_MS", "60000"),
            ("MONETA_DRM_UPSTREAM_BREAKER_OPEN_MAX_MS", "60000"),
        ])
        .await;
        for _ in 0..2 {
            let resp = licence(&app, "widevine", Some(&token), None, b"c".to_vec()).await;
            assert_error(resp, 503, "dependency_unavailable").await;
        }
        assert_eq!(dependency_count(&app, "drm_widevine", "timeout").await, 2.0);
        let reached = vendor.received().len();
        // Open: answered without asking the vendor.
        let resp = licence(&app, "widevine", Some(&token), None, b"c".to_vec()).await;
        assert_error(resp, 503, "dependency_unavailable").await;
        assert_eq!(
            vendor.received().len(),
            reached,
            "the open breaker let a call through"
        );
        assert_eq!(dependency_count(&app, "drm_widevine", "rejected_open").await, 1.0);
    }

    #[tokio::test]
    async fn a_vendor_timeout_longer_than_the_request_ends_within_it() {
        // Set longer than the request may last: the vendor's failure is
        // still answered (and counted) as the vendor's, not as a timeout of
        // the whole request.
        let (_vendor, app, token) = hung_vendor(&[
            ("MONETA_DRM_UPSTREAM_TIMEOUT_MS", "10000"),
            ("MONETA_REQUEST_TIMEOUT_MS", "1000"),
        ])
        .await;
        let resp = licence(&app, "widevine", Some(&token), None, b"c".to_vec()).await;
        retry_after(&resp);
        assert_error(resp, 503, "dependency_unavailable").await;
        assert_eq!(dependency_count(&app, "drm_widevine", "timeout").await, 1.0);
        assert_eq!(licence_count(&app, "widevine", "unavailable").await, 1.0);
    }
}

/// Without a keys file, ClearKey licences come from
/// `MONETA_DRM_UPSTREAM_CLEARKEY` like any system's, after the key id check.
#[tokio::test]
async fn clearkey_without_a_keys_file_goes_to_its_upstream() {
    let vendor = Vendor::start().await;
    let upstream = format!("{}/clearkey", vendor.url);
    let app = proxy_to(
        &vendor,
        &[
            ("MONETA_DRM_UPSTREAM_CLEARKEY", &upstream),
            ("MONETA_DRM_CLEARKEY_KEYS_FILE", ""),
        ],
    )
    .await;
    let user = app.token("u-premium", "premium", 4, "KR");
    let token = token_for(&app.playback_info_json(TITLE, &user).await, "clearkey");
    let other_kid = "AAAAAAAAAAAAAAAAAAAAAA";
    let resp = licence(&app, "clearkey", Some(&token), None, clearkey_body(&[other_kid])).await;
    assert_error(resp, 403, "license_denied").await;
    assert!(
        vendor.received().is_empty(),
        "a key the token does not grant is not asked for"
    );

    let resp = clearkey(&app, &token).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap().as_ref(), LICENCE);
    let received = vendor.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].uri, "/clearkey");
    assert_eq!(received[0].body.as_ref(), clearkey_body(&[KID]).as_bytes());
}

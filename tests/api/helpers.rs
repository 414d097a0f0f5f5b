//! `spawn_app()`: a real Moneta (in process, port 0) on a real redis-server,
//! in front of a small internal API that counts its calls and fails on demand.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::support::{self, RedisServer};
use moneta::config::Settings;
use moneta::startup::Application;

/// How the fake internal API misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    #[default]
    None,
    Status500,
    Hang,
    Garbage,
    /// Answers correctly, but only after this long.
    Slow(Duration),
}

#[derive(Default)]
pub struct FakeState {
    pub contents: Mutex<HashMap<String, Value>>,
    pub entitlements: Mutex<HashMap<String, Value>>,
    pub progress: Mutex<HashMap<(String, String), Value>>,
    pub batches: Mutex<Vec<Value>>,
    pub request_ids: Mutex<Vec<String>>,
    pub authorizations: Mutex<Vec<String>>,
    pub content_calls: AtomicUsize,
    pub entitlement_calls: AtomicUsize,
    pub progress_calls: AtomicUsize,
    pub total_calls: AtomicUsize,
    fault: Mutex<Fault>,
}

#[derive(Clone)]
pub struct FakeApi {
    pub state: Arc<FakeState>,
    pub port: u16,
}

impl FakeApi {
    pub fn set_fault(&self, fault: Fault) {
        *self.state.fault.lock().unwrap() = fault;
    }
    pub fn content_calls(&self) -> usize {
        self.state.content_calls.load(Ordering::SeqCst)
    }
    pub fn total_calls(&self) -> usize {
        self.state.total_calls.load(Ordering::SeqCst)
    }
    /// Every progress item delivered so far, in order.
    pub fn delivered(&self) -> Vec<Value> {
        self.state
            .batches
            .lock()
            .unwrap()
            .iter()
            .flat_map(|b| b["items"].as_array().cloned().unwrap_or_default())
            .collect()
    }
}

async fn misbehave(state: &FakeState) -> Option<Response> {
    state.total_calls.fetch_add(1, Ordering::SeqCst);
    let fault = *state.fault.lock().unwrap();
    match fault {
        Fault::None => None,
        Fault::Status500 => Some((StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response()),
        Fault::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            None
        }
        Fault::Garbage => Some(
            (
                [("content-type", "application/json")],
                "{\"content_id\": [not json",
            )
                .into_response(),
        ),
        Fault::Slow(delay) => {
            tokio::time::sleep(delay).await;
            None
        }
    }
}

fn note_headers(state: &FakeState, headers: &HeaderMap) {
    if let Some(id) = headers.get("x-request-id").and_then(|v| v.to_str().ok()) {
        state.request_ids.lock().unwrap().push(id.to_owned());
    }
    if let Some(auth) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
        state.authorizations.lock().unwrap().push(auth.to_owned());
    }
}

async fn content(State(s): State<Arc<FakeState>>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    s.content_calls.fetch_add(1, Ordering::SeqCst);
    note_headers(&s, &headers);
    if let Some(r) = misbehave(&s).await {
        return r;
    }
    match s.contents.lock().unwrap().get(&id) {
        Some(c) => Json(c.clone()).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn entitlement(
    State(s): State<Arc<FakeState>>,
    headers: HeaderMap,
    Path(user): Path<String>,
) -> Response {
    s.entitlement_calls.fetch_add(1, Ordering::SeqCst);
    note_headers(&s, &headers);
    if let Some(r) = misbehave(&s).await {
        return r;
    }
    match s.entitlements.lock().unwrap().get(&user) {
        Some(e) => Json(e.clone()).into_response(),
        // Load tests use many distinct users so that every request misses the cache.
        None if user.starts_with("load-") => {
            Json(json!({"user_id": user, "plan": "standard", "max_streams": 2, "active": true}))
                .into_response()
        }
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn progress(
    State(s): State<Arc<FakeState>>,
    Path((user, content)): Path<(String, String)>,
) -> Response {
    s.progress_calls.fetch_add(1, Ordering::SeqCst);
    if let Some(r) = misbehave(&s).await {
        return r;
    }
    match s.progress.lock().unwrap().get(&(user, content)) {
        Some(p) => Json(p.clone()).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn batch(State(s): State<Arc<FakeState>>, Json(body): Json<Value>) -> Response {
    // A write has no JSON answer to garble; a broken server fails it instead.
    if *s.fault.lock().unwrap() == Fault::Garbage {
        s.total_calls.fetch_add(1, Ordering::SeqCst);
        return (StatusCode::INTERNAL_SERVER_ERROR, "<html>bad gateway</html>").into_response();
    }
    if let Some(r) = misbehave(&s).await {
        return r;
    }
    for item in body["items"].as_array().cloned().unwrap_or_default() {
        let key = (
            item["user_id"].as_str().unwrap_or("").to_owned(),
            item["content_id"].as_str().unwrap_or("").to_owned(),
        );
        s.progress.lock().unwrap().insert(
            key,
            json!({"position_ms": item["position_ms"], "updated_at": item["updated_at"]}),
        );
    }
    s.batches.lock().unwrap().push(body);
    StatusCode::NO_CONTENT.into_response()
}

async fn health(State(s): State<Arc<FakeState>>) -> Response {
    match misbehave(&s).await {
        Some(r) => r,
        None => Json(json!({"status": "ok"})).into_response(),
    }
}

/// Starts the fake internal API with the demo users and titles.
pub async fn spawn_fake_api() -> FakeApi {
    let state = Arc::new(FakeState::default());
    {
        let mut e = state.entitlements.lock().unwrap();
        for (user, plan, max, active) in [
            ("u-basic", "basic", 1, true),
            ("u-standard", "standard", 2, true),
            ("u-premium", "premium", 4, true),
            ("u-inactive", "standard", 2, false),
        ] {
            e.insert(
                user.into(),
                json!({"user_id": user, "plan": plan, "max_streams": max, "active": active}),
            );
        }
        let mut c = state.contents.lock().unwrap();
        c.insert("m-0001".into(), support::sample_content("m-0001"));
        let mut premium = support::sample_content("m-0002");
        premium["required_plans"] = json!(["premium"]);
        c.insert("m-0002".into(), premium);
        let mut korea = support::sample_content("m-0003");
        korea["available_countries"] = json!(["KR"]);
        c.insert("m-0003".into(), korea);
    }
    let router = Router::new()
        .route("/internal/v1/contents/{id}/playback", get(content))
        .route("/internal/v1/users/{user}/entitlement", get(entitlement))
        .route("/internal/v1/users/{user}/progress/{content}", get(progress))
        .route("/internal/v1/progress:batch", post(batch))
        .route("/health", get(health))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, router).await });
    FakeApi { state, port }
}

pub struct TestApp {
    pub address: String,
    pub admin_address: String,
    pub client: reqwest::Client,
    pub api: FakeApi,
    pub redis: RedisServer,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl TestApp {
    pub fn token(&self, sub: &str, plan: &str, max_streams: u32, country: &str) -> String {
        support::mint_token(sub, plan, max_streams, country)
    }

    pub async fn get(&self, path: &str, token: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.address))
            .bearer_auth(token)
            .send()
            .await
            .expect("request failed")
    }

    pub async fn playback_info(&self, content_id: &str, token: &str) -> reqwest::Response {
        self.get(&format!("/v1/contents/{content_id}/playback-info"), token)
            .await
    }

    pub async fn start_session(&self, token: &str, content_id: &str, device_id: &str) -> reqwest::Response {
        self.client
            .post(format!("{}/v1/playback/sessions", self.address))
            .bearer_auth(token)
            .json(&json!({"content_id": content_id, "device_id": device_id}))
            .send()
            .await
            .expect("request failed")
    }

    /// Starts a session that must succeed and returns its id.
    pub async fn started_session(&self, token: &str, content_id: &str, device_id: &str) -> String {
        let resp = self.start_session(token, content_id, device_id).await;
        assert_eq!(resp.status(), 201, "session start");
        let body: Value = resp.json().await.expect("session body");
        body["session_id"].as_str().expect("session_id").to_owned()
    }

    pub async fn heartbeat(&self, token: &str, session_id: &str, position_ms: u64) -> reqwest::Response {
        self.client
            .put(format!("{}/v1/playback/sessions/{session_id}", self.address))
            .bearer_auth(token)
            .json(&json!({"position_ms": position_ms, "state": "playing"}))
            .send()
            .await
            .expect("request failed")
    }

    pub async fn stop_session(&self, token: &str, session_id: &str) -> reqwest::Response {
        self.client
            .delete(format!("{}/v1/playback/sessions/{session_id}", self.address))
            .bearer_auth(token)
            .send()
            .await
            .expect("request failed")
    }

    pub async fn metrics(&self) -> String {
        self.client
            .get(format!("{}/metrics", self.admin_address))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Stops the app as SIGTERM would and waits for it to finish.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(handle) = self.handle.take() {
            let _ = handle.await;
        }
    }
}

/// The settings every test app starts from.
pub fn base_vars(redis: &RedisServer, api: &FakeApi) -> Vec<(String, String)> {
    [
        ("MONETA_LISTEN_ADDR", "127.0.0.1:0".to_owned()),
        ("MONETA_ADMIN_ADDR", "127.0.0.1:0".to_owned()),
        ("MONETA_REDIS_URL", redis.url.clone()),
        (
            "MONETA_INTERNAL_API_URL",
            format!("http://127.0.0.1:{}", api.port),
        ),
        ("MONETA_INTERNAL_API_TOKEN", "internal-token".to_owned()),
        ("MONETA_JWT_HS256_SECRET", support::DEV_SECRET.to_owned()),
        ("MONETA_PROGRESS_FLUSH_MS", "200".to_owned()),
        ("RUST_LOG", "warn".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Like [`spawn_app`], with a chance to change settings first.
pub async fn spawn_app_with(configure: impl FnOnce(&mut Vec<(String, String)>)) -> TestApp {
    let redis = RedisServer::start();
    let api = spawn_fake_api().await;
    let mut vars = base_vars(&redis, &api);
    configure(&mut vars);
    let settings = Settings::from_vars(vars).expect("test settings");
    // Process-wide and idempotent: the first app installs it, the rest reuse it.
    let _ = moneta::telemetry::init(&settings).expect("telemetry");
    let application = Application::build(settings).await.expect("build app");
    let address = format!("http://127.0.0.1:{}", application.port());
    let admin_address = format!("http://127.0.0.1:{}", application.admin_port());
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(application.run_until_stopped(async move {
        let _ = rx.await;
    }));
    TestApp {
        address,
        admin_address,
        client: reqwest::Client::new(),
        api,
        redis,
        shutdown: Some(tx),
        handle: Some(handle),
    }
}

/// The `error.code` of a contract error response, checking its content type.
pub async fn error_code(resp: reqwest::Response) -> String {
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    assert!(
        ct.starts_with("application/json"),
        "error content-type was {ct:?}"
    );
    let body: Value = resp.json().await.expect("error body is JSON");
    body["error"]["code"].as_str().unwrap_or_default().to_owned()
}

/// Polls `check` until it is true or `within` passes.
pub async fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    check()
}

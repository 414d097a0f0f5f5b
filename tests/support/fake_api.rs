//! A small internal API (CONTRACT section 5) that serves the demo users and
//! titles, remembers what it was sent, counts its calls and fails on demand.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use testkit::eventually;

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
    /// Every route answers `404`, as behind a wrong base URL.
    NotFound,
}

/// The "status" of a user whose batches hang ([`FakeApi::hang_user`]).
const HANGS: u16 = 0;

#[derive(Default)]
pub struct FakeState {
    pub contents: Mutex<HashMap<String, Value>>,
    pub entitlements: Mutex<HashMap<String, Value>>,
    pub progress: Mutex<HashMap<(String, String), Value>>,
    pub batches: Mutex<Vec<Value>>,
    pub request_ids: Mutex<Vec<String>>,
    pub authorizations: Mutex<Vec<String>>,
    pub traceparents: Mutex<Vec<String>>,
    /// Users whose positions the API refuses (see [`FakeApi::refuse_user`]).
    pub refused_users: Mutex<HashSet<String>>,
    /// Batches answered `400` for holding one of them, in order.
    pub refused_batches: Mutex<Vec<Value>>,
    /// Users whose positions the API fails with a status (see [`FakeApi::fail_user`]).
    pub failing_users: Mutex<HashMap<String, u16>>,
    /// Batches failed for holding one of them, in order.
    pub failed_batches: Mutex<Vec<Value>>,
    pub content_calls: AtomicUsize,
    /// Reads of one position, whatever the answer (or none, while slow).
    pub progress_calls: AtomicUsize,
    /// Progress batches that arrived, whatever the answer (or none, when hanging).
    pub batch_calls: AtomicUsize,
    pub total_calls: AtomicUsize,
    fault: Mutex<Fault>,
}

#[derive(Clone)]
pub struct FakeApi {
    pub state: Arc<FakeState>,
    pub port: u16,
}

impl FakeApi {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
    pub fn set_fault(&self, fault: Fault) {
        *self.state.fault.lock().unwrap() = fault;
    }
    pub fn content_calls(&self) -> usize {
        self.state.content_calls.load(Ordering::SeqCst)
    }
    pub fn progress_calls(&self) -> usize {
        self.state.progress_calls.load(Ordering::SeqCst)
    }
    pub fn total_calls(&self) -> usize {
        self.state.total_calls.load(Ordering::SeqCst)
    }
    pub fn batch_calls(&self) -> usize {
        self.state.batch_calls.load(Ordering::SeqCst)
    }
    pub fn traceparents(&self) -> Vec<String> {
        self.state.traceparents.lock().unwrap().clone()
    }
    /// Serves a ContentPlayback (e.g. `sample_content` with fields changed)
    /// under its `content_id`, in place of any title of that id.
    pub fn serve_title(&self, content: Value) {
        let id = content["content_id"]
            .as_str()
            .expect("a title has a content_id")
            .to_owned();
        self.state.contents.lock().unwrap().insert(id, content);
    }
    /// The position the internal API holds for `user` and `content_id`, as
    /// if another device had written it.
    pub fn set_progress(&self, user: &str, content_id: &str, position_ms: u64) {
        self.state.progress.lock().unwrap().insert(
            (user.to_owned(), content_id.to_owned()),
            json!({"position_ms": position_ms, "updated_at": chrono::Utc::now().to_rfc3339()}),
        );
    }
    /// From now on a progress batch holding an item of `user` is refused
    /// whole with `400`, as the real internal API refuses a batch with one bad item.
    pub fn refuse_user(&self, user: &str) {
        self.state.refused_users.lock().unwrap().insert(user.to_owned());
    }
    /// Ends [`FakeApi::refuse_user`] for `user`.
    pub fn accept_user(&self, user: &str) {
        self.state.refused_users.lock().unwrap().remove(user);
    }
    /// From now on a progress batch holding an item of `user` is answered
    /// `status` whole (a `404` for a user the API does not know, a `500` for
    /// one whose rows break it), while batches without them are taken.
    pub fn fail_user(&self, user: &str, status: u16) {
        self.state
            .failing_users
            .lock()
            .unwrap()
            .insert(user.to_owned(), status);
    }
    /// Batches holding `user`'s positions are never answered (the caller
    /// times out), while batches without them are taken.
    pub fn hang_user(&self, user: &str) {
        self.fail_user(user, HANGS);
    }
    /// Ends [`FakeApi::fail_user`] for `user`.
    pub fn heal_user(&self, user: &str) {
        self.state.failing_users.lock().unwrap().remove(user);
    }
    /// The batches failed for one of the failing users so far, in order.
    pub fn failed_batches(&self) -> Vec<Value> {
        self.state.failed_batches.lock().unwrap().clone()
    }
    /// The batches refused so far, in order.
    pub fn refused_batches(&self) -> Vec<Value> {
        self.state.refused_batches.lock().unwrap().clone()
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
    /// Whether a position of `user` has been delivered.
    pub fn received_position(&self, user: &str, position_ms: u64) -> bool {
        self.delivered()
            .iter()
            .any(|i| i["user_id"] == user && i["position_ms"] == position_ms)
    }
    /// Waits until a position of `user` is delivered, at most the contract's
    /// bound for delivery once the internal API is reachable.
    pub async fn assert_receives_position(&self, user: &str, position_ms: u64) {
        let delivered = eventually(Duration::from_secs(30), async || {
            self.received_position(user, position_ms).then_some(())
        })
        .await;
        assert!(
            delivered.is_some(),
            "position {position_ms} of {user} was lost; delivered: {:?}",
            self.delivered()
        );
    }
}

/// Counts the call and, when a fault is set, answers in its place.
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
        Fault::NotFound => Some(StatusCode::NOT_FOUND.into_response()),
    }
}

fn note_headers(state: &FakeState, headers: &HeaderMap) {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    for (name, seen) in [
        ("x-request-id", &state.request_ids),
        ("authorization", &state.authorizations),
        ("traceparent", &state.traceparents),
    ] {
        if let Some(value) = header(name) {
            seen.lock().unwrap().push(value);
        }
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
    headers: HeaderMap,
    Path((user, content)): Path<(String, String)>,
) -> Response {
    s.progress_calls.fetch_add(1, Ordering::SeqCst);
    note_headers(&s, &headers);
    if let Some(r) = misbehave(&s).await {
        return r;
    }
    match s.progress.lock().unwrap().get(&(user, content)) {
        Some(p) => Json(p.clone()).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn batch(State(s): State<Arc<FakeState>>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    s.batch_calls.fetch_add(1, Ordering::SeqCst);
    note_headers(&s, &headers);
    // A write has no JSON answer to garble; a broken server fails it instead.
    if *s.fault.lock().unwrap() == Fault::Garbage {
        s.total_calls.fetch_add(1, Ordering::SeqCst);
        return (StatusCode::INTERNAL_SERVER_ERROR, "<html>bad gateway</html>").into_response();
    }
    if let Some(r) = misbehave(&s).await {
        return r;
    }
    let failing = {
        let users = s.failing_users.lock().unwrap();
        body["items"].as_array().and_then(|items| {
            items
                .iter()
                .find_map(|i| users.get(i["user_id"].as_str()?).copied())
        })
    };
    if let Some(status) = failing {
        s.failed_batches.lock().unwrap().push(body);
        if status == HANGS {
            std::future::pending::<()>().await;
        }
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return status.into_response();
    }
    let refused = {
        let users = s.refused_users.lock().unwrap();
        body["items"].as_array().is_some_and(|items| {
            items
                .iter()
                .any(|i| i["user_id"].as_str().is_some_and(|u| users.contains(u)))
        })
    };
    if refused {
        s.refused_batches.lock().unwrap().push(body);
        return StatusCode::BAD_REQUEST.into_response();
    }
    // As the contract's internal API: the last write by `updated_at` wins,
    // whatever order deliveries arrive in.
    let at = |v: &Value| {
        v["updated_at"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
    };
    for item in body["items"].as_array().cloned().unwrap_or_default() {
        let key = (
            item["user_id"].as_str().unwrap_or("").to_owned(),
            item["content_id"].as_str().unwrap_or("").to_owned(),
        );
        let mut progress = s.progress.lock().unwrap();
        if progress.get(&key).is_some_and(|known| at(known) > at(&item)) {
            continue;
        }
        progress.insert(
            key,
            json!({
                "position_ms": item["position_ms"],
                "updated_at": item["updated_at"],
                "completed": item["completed"].as_bool().unwrap_or(false),
            }),
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
        c.insert("m-0001".into(), super::sample_content("m-0001"));
        let mut premium = super::sample_content("m-0002");
        premium["required_plans"] = json!(["premium"]);
        c.insert("m-0002".into(), premium);
        let mut korea = super::sample_content("m-0003");
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

//! Test harness: a fresh database per test on a real PostgreSQL server
//! (testkit), the application served on a random port, the binary run with a
//! clean environment, and the one way each suite sends a request and checks
//! an answer.

use std::process::Stdio;
use std::time::Duration;

use internal_api::configuration::Settings;
use internal_api::startup::Application;
use reqwest::{Method, RequestBuilder, Response};
use serde_json::Value;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::process::Command;
use tokio::sync::oneshot;

pub use testkit::{PgServer, shared_server};

pub const BATCH: &str = "/internal/v1/progress:batch";
/// What Moneta sends (W3C Trace Context); `TRACE_ID` is its trace id.
pub const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
pub const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

pub fn playback_path(content_id: &str) -> String {
    format!("/internal/v1/contents/{content_id}/playback")
}

pub fn entitlement_path(user_id: &str) -> String {
    format!("/internal/v1/users/{user_id}/entitlement")
}

pub fn progress_path(user_id: &str, content_id: &str) -> String {
    format!("/internal/v1/users/{user_id}/progress/{content_id}")
}

pub fn settings(database_url: &str, token: Option<&str>) -> Settings {
    let database_url = database_url.to_owned();
    let token = token.map(str::to_owned);
    Settings::from_lookup(|name| match name {
        "DATABASE_URL" => Some(database_url.clone()),
        "INTERNAL_API_LISTEN_ADDR" => Some("127.0.0.1:0".to_owned()),
        "INTERNAL_API_TOKEN" => token.clone(),
        "INTERNAL_API_DB_STARTUP_TIMEOUT_S" => Some("10".to_owned()),
        _ => None,
    })
    .expect("test settings are valid")
}

pub struct TestApp {
    pub address: String,
    pub database_url: String,
    /// A separate pool for checking what the application wrote.
    pub db: PgPool,
    pub client: reqwest::Client,
    _shutdown: oneshot::Sender<()>,
}

pub async fn spawn_app() -> TestApp {
    spawn_app_on(shared_server(), None).await
}

pub async fn spawn_app_with_token(token: &str) -> TestApp {
    spawn_app_on(shared_server(), Some(token)).await
}

/// Serves a freshly migrated database, seeded with the demo data.
pub async fn spawn_seeded_app() -> TestApp {
    let app = spawn_app().await;
    internal_api::seed::apply(&app.db).await.expect("seed demo data");
    app
}

pub async fn spawn_app_on(server: &PgServer, token: Option<&str>) -> TestApp {
    let database_url = server.create_database().await;
    let application = Application::build(&settings(&database_url, token))
        .await
        .expect("application starts");
    let address = format!("http://127.0.0.1:{}", application.port());
    let (shutdown, stopped) = oneshot::channel::<()>();
    tokio::spawn(application.run_with_shutdown(async {
        let _ = stopped.await;
    }));
    let db = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&database_url)
        .await
        .expect("connect test pool");
    TestApp {
        address,
        database_url,
        db,
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .build()
            .expect("http client"),
        _shutdown: shutdown,
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    /// A request to the app for a test to finish (headers, body) and `send`.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.client.request(method, self.url(path))
    }

    pub async fn get(&self, path: &str) -> Response {
        send(self.request(Method::GET, path)).await
    }

    pub async fn post_batch(&self, body: &Value) -> Response {
        send(self.request(Method::POST, BATCH).json(body)).await
    }

    /// `GET path`, which must answer `200` with JSON; returns the body.
    pub async fn get_json(&self, path: &str) -> Value {
        assert_json(self.get(path).await, 200).await
    }

    /// `GET path`, which must fail with `status` and `code`; returns the body.
    pub async fn get_error(&self, path: &str, status: u16, code: &str) -> Value {
        assert_error(self.get(path).await, status, code).await
    }

    /// Edits the database behind the app's back, as an operator would by
    /// hand.
    pub async fn execute(&self, sql: &str) {
        sqlx::query(sql)
            .execute(&self.db)
            .await
            .unwrap_or_else(|err| panic!("{sql}: {err}"));
    }

    pub async fn progress_rows(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM watch_progress")
            .fetch_one(&self.db)
            .await
            .expect("count progress rows")
    }
}

pub async fn send(request: RequestBuilder) -> Response {
    request.send().await.expect("request sent")
}

/// Sends the correlation headers Moneta sends: its request id and
/// `TRACEPARENT`.
pub fn traced(request: RequestBuilder, request_id: &str) -> RequestBuilder {
    request
        .header("x-request-id", request_id)
        .header("traceparent", TRACEPARENT)
}

/// Asserts `status` and a JSON body, which it returns.
pub async fn assert_json(response: Response, status: u16) -> Value {
    let url = response.url().clone();
    assert_eq!(response.status().as_u16(), status, "status of {url}");
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        content_type.starts_with("application/json"),
        "{url}: content-type {content_type}"
    );
    response.json().await.expect("JSON body")
}

/// Asserts the documented error shape and returns the body.
pub async fn assert_error(response: Response, status: u16, code: &str) -> Value {
    let body = assert_json(response, status).await;
    assert_eq!(body["error"]["code"], code, "body: {body}");
    assert!(body["error"]["message"].is_string(), "body: {body}");
    body
}

const BIN: &str = env!("CARGO_BIN_EXE_internal-api");

/// The binary with a clean environment, so settings of whoever runs the
/// tests cannot leak in.
pub fn internal_api(database_url: Option<&str>) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Some(url) = database_url {
        cmd.env("DATABASE_URL", url);
    }
    cmd
}

pub async fn run_ok(cmd: &mut Command) -> std::process::Output {
    let output = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("command finished in time")
        .expect("command ran");
    assert!(
        output.status.success(),
        "{:?} failed: {}\nstdout:\n{}\nstderr:\n{}",
        cmd,
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

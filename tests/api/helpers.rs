//! `spawn_app()`: a real Moneta (in process, port 0) on a real redis-server,
//! in front of the fake internal API, which counts its calls and fails on demand.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::support::{self, FakeApi, PATIENCE, PublicApi, RedisServer, spawn_fake_api};
use moneta::config::Settings;
use moneta::startup::Application;

pub struct TestApp {
    pub public: PublicApi,
    pub admin_address: String,
    pub api: FakeApi,
    pub redis: RedisServer,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

/// The app is driven through its public API: `app.playback_info(…)`, `app.address`, `app.client`.
impl std::ops::Deref for TestApp {
    type Target = PublicApi;
    fn deref(&self) -> &PublicApi {
        &self.public
    }
}

impl TestApp {
    pub fn token(&self, sub: &str, plan: &str, max_streams: u32, country: &str) -> String {
        support::mint_token(sub, plan, max_streams, country)
    }

    pub async fn metrics(&self) -> String {
        support::metrics_text(&self.admin_address).await
    }

    /// Starts one session per user on m-0001 (with the internal API up):
    /// (token, session id) each.
    pub async fn watching(&self, users: &[String]) -> Vec<(String, String)> {
        let mut sessions = Vec::new();
        for user in users {
            let token = self.token(user, "standard", 2, "KR");
            let id = self.started_session(&token, "m-0001", "tv").await;
            sessions.push((token, id));
        }
        sessions
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
fn base_vars(redis: &RedisServer, api: &FakeApi) -> Vec<(String, String)> {
    [
        ("MONETA_LISTEN_ADDR", "127.0.0.1:0".to_owned()),
        ("MONETA_ADMIN_ADDR", "127.0.0.1:0".to_owned()),
        ("MONETA_REDIS_URL", redis.url.clone()),
        ("MONETA_INTERNAL_API_URL", api.url()),
        ("MONETA_INTERNAL_API_TOKEN", "internal-token".to_owned()),
        ("MONETA_JWT_HS256_SECRET", support::DEV_SECRET.to_owned()),
        ("MONETA_PROGRESS_FLUSH_MS", "200".to_owned()),
        // Tests stop apps often; the drain itself is tested where it matters.
        ("MONETA_SHUTDOWN_DRAIN_MS", "0".to_owned()),
        ("MONETA_SESSION_SECRET", "integration-session-secret".to_owned()),
        // Tests of other behaviour fire bursts of up to 100 requests; on a
        // busy machine the adaptive limit may fall to its floor and shed
        // some, as it should under overload (tests/api/overload.rs sets its
        // own limits). Above every burst here, it never does.
        ("MONETA_OVERLOAD_MIN_LIMIT", "128".to_owned()),
        ("RUST_LOG", "warn".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(&[]).await
}

/// Like [`spawn_app`], with `settings` in place of the base ones they name.
pub async fn spawn_app_with(settings: &[(&str, &str)]) -> TestApp {
    spawn_app_on(spawn_fake_api().await, settings).await
}

/// Like [`spawn_app_with`], in front of a fake internal API the test made.
pub async fn spawn_app_on(api: FakeApi, settings: &[(&str, &str)]) -> TestApp {
    let redis = RedisServer::start();
    let mut vars = base_vars(&redis, &api);
    vars.retain(|(k, _)| settings.iter().all(|(name, _)| k != name));
    vars.extend(settings.iter().map(|(k, v)| (k.to_string(), v.to_string())));
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
        public: PublicApi::new(address),
        admin_address,
        api,
        redis,
        shutdown: Some(tx),
        handle: Some(handle),
    }
}

/// Asserts the contract's answer to a token that must not pass: `401
/// invalid_token` with `WWW-Authenticate: Bearer error="invalid_token"`.
pub async fn assert_invalid_token(resp: reqwest::Response, case: &str) {
    assert_eq!(resp.status(), 401, "{case}");
    assert_eq!(
        resp.headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok()),
        Some(r#"Bearer error="invalid_token""#),
        "{case}"
    );
    support::assert_error(resp, 401, "invalid_token").await;
}

/// A raw connection to the public API.
pub async fn connect(app: &TestApp) -> TcpStream {
    let port = app.address.rsplit(':').next().expect("a port");
    TcpStream::connect(format!("127.0.0.1:{port}"))
        .await
        .expect("connect")
}

/// One request on `stream` and its whole answer: the status and the head,
/// lowercased.
pub async fn exchange(stream: &mut TcpStream, request: &str) -> (u16, String) {
    stream.write_all(request.as_bytes()).await.expect("request");
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let head = tokio::time::timeout(PATIENCE, async {
        loop {
            if let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&answer[..end]).to_ascii_lowercase();
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                if answer.len() >= end + 4 + length {
                    return head;
                }
            }
            let n = stream.read(&mut buf).await.expect("read answer");
            assert!(n > 0, "closed: {:?}", String::from_utf8_lossy(&answer));
            answer.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("an answer");
    (head[9..12].parse().expect("a status"), head)
}

//! What every suite shares: the moneta binary as a process, the fake internal
//! API, dev tokens, fixtures and the contract's error shape. Dependency
//! processes and waiting come from `testkit`.
// Each test binary uses a different part of the kit.
#![allow(dead_code, unused_imports)]

pub mod fake_api;
pub mod faketime;
pub mod redis_probe;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

pub use fake_api::{FakeApi, Fault, spawn_fake_api};
pub use redis_probe::RedisProbe;
pub use testkit::{
    PATIENCE, Process, RedisServer, eventually, eventually_blocking, eventually_every, free_port, nginx,
    require_binary, signal,
};

pub const DEV_SECRET: &str = "integration-test-secret-do-not-use";

/// The real `moneta` binary on free loopback ports, killed on drop.
pub struct MonetaProcess {
    pub port: u16,
    pub admin_port: u16,
    process: Process,
}

/// The binary with nothing from the test's own environment but `PATH`.
fn moneta_command(port: u16, admin_port: u16) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_moneta"));
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("MONETA_LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("MONETA_ADMIN_ADDR", format!("127.0.0.1:{admin_port}"));
    command
}

impl MonetaProcess {
    /// Starts with the dev HS256 secret and `RUST_LOG=info`, then `envs`;
    /// returns once it listens.
    pub fn start(envs: &[(&str, String)]) -> MonetaProcess {
        Self::start_without(&[], envs)
    }

    /// As [`MonetaProcess::start`], with the settings named in `unset` left
    /// out of the defaults (`MONETA_SESSION_SECRET`: a per-process key).
    pub fn start_without(unset: &[&str], envs: &[(&str, String)]) -> MonetaProcess {
        // A port found free is free no longer once any process on the
        // machine makes a connection from it (the kernel draws outgoing
        // ports from the same range); under the suite's parallel load that
        // happened. Fresh ports then, a few times.
        for _ in 0..4 {
            let port = free_port();
            let admin_port = free_port();
            let started = Self::command(unset, envs, port, admin_port).try_listening_on(port);
            let (process, status) = match started {
                Ok(process) => {
                    return MonetaProcess {
                        port,
                        admin_port,
                        process,
                    };
                }
                Err(exited) => *exited,
            };
            if !process.output().contains("Address already in use") {
                panic!("moneta exited early with {status}\n{}", process.output());
            }
        }
        panic!("moneta found no free port in four tries")
    }

    fn command(unset: &[&str], envs: &[(&str, String)], port: u16, admin_port: u16) -> Process {
        let mut command = moneta_command(port, admin_port);
        command
            .env("MONETA_JWT_HS256_SECRET", DEV_SECRET)
            .env("MONETA_SESSION_SECRET", "integration-session-secret")
            // Tests stop processes often; the drain itself is tested where it matters.
            .env("MONETA_SHUTDOWN_DRAIN_MS", "0")
            // Bursts of heartbeats while a dependency fails must be answered,
            // not shed: the adaptive limit stays above every burst here.
            .env("MONETA_OVERLOAD_MIN_LIMIT", "128")
            .env("RUST_LOG", "info");
        for name in unset {
            command.env_remove(name);
        }
        command.envs(envs.iter().map(|(k, v)| (*k, v.as_str())));
        Process::logged(&mut command, "moneta")
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn public_api(&self) -> PublicApi {
        PublicApi::new(self.base_url())
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Sends SIGTERM and waits for the exit (at most `within`).
    pub fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        self.process.terminate(within)
    }

    /// Waits at most `within` for an exit already asked for (a signal sent
    /// with `signal`), so a test can watch what happens in between.
    pub fn wait_for_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        self.process.wait_for_exit(within)
    }

    /// Everything the process wrote to stdout and stderr so far.
    pub fn output(&self) -> String {
        self.process.output()
    }

    pub async fn metrics(&self) -> String {
        metrics_text(&format!("http://127.0.0.1:{}", self.admin_port)).await
    }
}

/// Runs moneta with `envs` on free ports until it exits, as a start that must
/// fail does; returns its exit code and stderr.
pub fn run_moneta_until_exit(envs: &[(&str, String)]) -> (Option<i32>, String) {
    let envs: Vec<(&str, OsString)> = envs.iter().map(|(k, v)| (*k, v.into())).collect();
    run_moneta_until_exit_os(&envs)
}

/// As [`run_moneta_until_exit`], with values that need not be UTF-8.
pub fn run_moneta_until_exit_os(envs: &[(&str, OsString)]) -> (Option<i32>, String) {
    let mut command = moneta_command(free_port(), free_port());
    command.envs(envs.iter().map(|(k, v)| (*k, v)));
    let mut process = Process::logged(&mut command, "moneta");
    let status = process.wait_for_exit(PATIENCE).unwrap_or_else(|| {
        panic!(
            "moneta kept running for {PATIENCE:?} although it could not start:\n{}",
            process.output()
        )
    });
    (status.code(), process.stderr())
}

/// Moneta on a live Redis whose internal API never answers, with the fallback
/// snapshot: playback-info for `m-0001` answers 200, degraded.
pub struct SnapshotMoneta {
    pub process: MonetaProcess,
    _redis: RedisServer,
    _dir: tempfile::TempDir,
}

impl SnapshotMoneta {
    pub fn start(envs: &[(&str, String)]) -> SnapshotMoneta {
        let dir = tempfile::tempdir().expect("tempdir");
        let redis = RedisServer::start();
        let snapshot = write_snapshot(dir.path());
        let mut all = vec![
            ("MONETA_REDIS_URL", redis.url.clone()),
            ("MONETA_INTERNAL_API_URL", nobody_listens()),
            ("MONETA_FALLBACK_CATALOG_FILE", snapshot.display().to_string()),
        ];
        all.extend(envs.iter().cloned());
        SnapshotMoneta {
            process: MonetaProcess::start(&all),
            _redis: redis,
            _dir: dir,
        }
    }
}

/// A loopback URL where nothing listens: every call is refused.
pub fn nobody_listens() -> String {
    format!("http://127.0.0.1:{}", refused_port())
}

/// A loopback port where every connection is refused for the rest of the
/// run: it stays bound, without listening, by this process. A port merely
/// found free could be taken by another test's server meanwhile, which
/// would then answer in nobody's place.
pub fn refused_port() -> u16 {
    static HELD: std::sync::Mutex<Vec<tokio::net::TcpSocket>> = std::sync::Mutex::new(Vec::new());
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket
        .bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("bind a loopback port");
    let port = socket.local_addr().expect("its address").port();
    HELD.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(socket);
    port
}

/// A valid HS256 dev token for one hour.
pub fn mint_token(sub: &str, plan: &str, max_streams: u32, country: &str) -> String {
    let now = chrono::Utc::now().timestamp();
    let claims = moneta::auth::Claims {
        sub: moneta::model::UserId::parse(sub).expect("a valid test user id"),
        exp: now + 3600,
        iat: Some(now),
        nbf: None,
        iss: None,
        plan: Some(plan.into()),
        max_streams: Some(max_streams),
        country: Some(country.into()),
    };
    moneta::auth::verifier::mint_hs256(DEV_SECRET, &claims).expect("sign")
}

/// The title every fixture knows: Widevine DASH, clear HLS, two subtitle tracks.
pub fn sample_content(id: &str) -> Value {
    serde_json::json!({
        "content_id": id,
        "title": format!("Title {id}"),
        "duration_ms": 7_920_000,
        "available_countries": null,
        "required_plans": [],
        "streams": [
            {"protocol": "dash", "path": format!("/{id}/dash/manifest.mpd"), "drm": {"system": "widevine", "key_id": "0123abcd"}},
            {"protocol": "hls", "path": format!("/{id}/hls/master.m3u8"), "drm": null}
        ],
        "subtitles": [{"language": "ko", "path": format!("/{id}/subs/ko.vtt")}, {"language": "en", "path": format!("/{id}/subs/en.vtt")}]
    })
}

/// Writes a fallback catalog holding `m-0001` and returns its path.
pub fn write_snapshot(dir: &Path) -> PathBuf {
    let path = dir.join("snapshot.json");
    let doc = serde_json::json!({"contents": [sample_content("m-0001")]});
    std::fs::write(&path, doc.to_string()).expect("write snapshot");
    path
}

/// A fresh 2048-bit RSA key made by the openssl command line (an independent
/// implementation): its PKCS#8 PEM and the parsed key.
pub fn openssl_rsa_key(dir: &Path, name: &str) -> (Vec<u8>, rsa::RsaPrivateKey) {
    use rsa::pkcs8::DecodePrivateKey;
    let path = dir.join(format!("{name}.pem"));
    testkit::run(
        Command::new(require_binary("openssl"))
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
            ])
            .arg(&path),
        "openssl genpkey",
    );
    let pem = std::fs::read(&path).expect("read key");
    let key = rsa::RsaPrivateKey::from_pkcs8_pem(std::str::from_utf8(&pem).expect("PEM is text"))
        .expect("parse key");
    (pem, key)
}

/// A CloudFront key pair made by openssl, held as a CDN holds it: Moneta signs
/// with the private key, the CDN checks with the public one.
pub struct CdnKeyPair {
    pub id: String,
    pub private_pem: PathBuf,
    pub public_pem: PathBuf,
    dir: tempfile::TempDir,
}

impl CdnKeyPair {
    pub fn generate(id: &str) -> CdnKeyPair {
        let dir = tempfile::tempdir().expect("tempdir");
        openssl_rsa_key(dir.path(), "cdn");
        let private_pem = dir.path().join("cdn.pem");
        let public_pem = dir.path().join("cdn.pub.pem");
        testkit::run(
            Command::new(require_binary("openssl"))
                .args(["pkey", "-pubout", "-in"])
                .arg(&private_pem)
                .arg("-out")
                .arg(&public_pem),
            "openssl pkey -pubout",
        );
        CdnKeyPair {
            id: id.to_owned(),
            private_pem,
            public_pem,
            dir,
        }
    }

    /// The settings under which Moneta signs with this key.
    pub fn settings(&self) -> [(&'static str, String); 2] {
        [
            ("MONETA_CDN_KEY_PAIR_ID", self.id.clone()),
            (
                "MONETA_CDN_PRIVATE_KEY_FILE",
                self.private_pem.display().to_string(),
            ),
        ]
    }

    /// Whether `openssl dgst -sha1 -verify` accepts `signature` over `message`
    /// under the public key, as CloudFront checks a policy.
    pub fn verifies_sha1(&self, message: &[u8], signature: &[u8]) -> bool {
        let message_file = tempfile::NamedTempFile::new_in(self.dir.path()).expect("temp file");
        let signature_file = tempfile::NamedTempFile::new_in(self.dir.path()).expect("temp file");
        std::fs::write(message_file.path(), message).expect("write message");
        std::fs::write(signature_file.path(), signature).expect("write signature");
        Command::new(require_binary("openssl"))
            .args(["dgst", "-sha1", "-verify"])
            .arg(&self.public_pem)
            .arg("-signature")
            .arg(signature_file.path())
            .arg(message_file.path())
            .output()
            .expect("run openssl dgst")
            .status
            .success()
    }
}

/// Moneta's public API at `address` (Moneta itself, or nginx in front of
/// it), called the way a player calls it.
#[derive(Clone)]
pub struct PublicApi {
    pub address: String,
    pub client: reqwest::Client,
}

impl PublicApi {
    pub fn new(address: impl Into<String>) -> PublicApi {
        PublicApi {
            address: address.into(),
            // Only a server that never answers reaches this.
            client: reqwest::Client::builder()
                .timeout(PATIENCE)
                .build()
                .expect("HTTP client"),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    pub async fn send(request: reqwest::RequestBuilder) -> reqwest::Response {
        request.send().await.expect("request failed")
    }

    /// A request to `path`, with `token` when given, for what the helpers below do not cover.
    pub fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
    ) -> reqwest::RequestBuilder {
        let request = self.client.request(method, self.url(path));
        match token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// `GET path` with `token` (when given) and extra headers.
    pub async fn get_with(
        &self,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut request = self.request(reqwest::Method::GET, path, token);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        Self::send(request).await
    }

    pub async fn get(&self, path: &str, token: &str) -> reqwest::Response {
        self.get_with(path, Some(token), &[]).await
    }

    pub async fn get_anonymously(&self, path: &str) -> reqwest::Response {
        self.get_with(path, None, &[]).await
    }

    pub async fn playback_info(&self, content_id: &str, token: &str) -> reqwest::Response {
        self.get(&format!("/v1/contents/{content_id}/playback-info"), token)
            .await
    }

    pub async fn playback_info_json(&self, content_id: &str, token: &str) -> Value {
        json_of(self.playback_info(content_id, token).await).await
    }

    /// The caller's live sessions, as JSON.
    pub async fn sessions(&self, token: &str) -> Value {
        json_of(self.get("/v1/playback/sessions", token).await).await
    }

    /// The ids of the caller's live sessions.
    pub async fn live_session_ids(&self, token: &str) -> std::collections::BTreeSet<String> {
        let listed = self.sessions(token).await;
        listed["sessions"]
            .as_array()
            .unwrap_or_else(|| panic!("no sessions in {listed}"))
            .iter()
            .map(|s| s["session_id"].as_str().expect("session_id").to_owned())
            .collect()
    }

    pub async fn start_session(&self, token: &str, content_id: &str, device_id: &str) -> reqwest::Response {
        let body = serde_json::json!({"content_id": content_id, "device_id": device_id});
        let request = self.request(reqwest::Method::POST, "/v1/playback/sessions", Some(token));
        Self::send(request.json(&body)).await
    }

    /// Starts a session that must succeed and returns its id.
    pub async fn started_session(&self, token: &str, content_id: &str, device_id: &str) -> String {
        let resp = self.start_session(token, content_id, device_id).await;
        assert_eq!(resp.status(), 201, "session start");
        let body = json_of(resp).await;
        body["session_id"].as_str().expect("session_id").to_owned()
    }

    pub async fn heartbeat(&self, token: &str, session_id: &str, position_ms: u64) -> reqwest::Response {
        let body = serde_json::json!({"position_ms": position_ms, "state": "playing"});
        Self::send(
            self.session_request(reqwest::Method::PUT, token, session_id)
                .json(&body),
        )
        .await
    }

    pub async fn stop_session(&self, token: &str, session_id: &str) -> reqwest::Response {
        Self::send(self.session_request(reqwest::Method::DELETE, token, session_id)).await
    }

    /// Stops with a final position.
    pub async fn stop_session_at(
        &self,
        token: &str,
        session_id: &str,
        position_ms: u64,
    ) -> reqwest::Response {
        self.stop_session_with(
            token,
            session_id,
            &serde_json::json!({"position_ms": position_ms}),
        )
        .await
    }

    /// Stops with any JSON body (`{"completed": true}`, …).
    pub async fn stop_session_with(&self, token: &str, session_id: &str, body: &Value) -> reqwest::Response {
        Self::send(
            self.session_request(reqwest::Method::DELETE, token, session_id)
                .json(body),
        )
        .await
    }

    fn session_request(
        &self,
        method: reqwest::Method,
        token: &str,
        session_id: &str,
    ) -> reqwest::RequestBuilder {
        self.request(
            method,
            &format!("/v1/playback/sessions/{session_id}"),
            Some(token),
        )
    }

    /// A request whose body goes as it is, for bodies no well-behaved player sends.
    pub async fn send_raw(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        let request = self.request(method, path, token);
        Self::send(request.header("content-type", content_type).body(body)).await
    }
}

async fn json_of(resp: reqwest::Response) -> Value {
    resp.json().await.expect("JSON body")
}

/// The Prometheus text of an admin port.
pub async fn metrics_text(admin_base: &str) -> String {
    reqwest::get(format!("{admin_base}/metrics"))
        .await
        .expect("metrics request")
        .text()
        .await
        .expect("metrics body")
}

/// The value of one series (`name{labels}` exactly as exported) in Prometheus text.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Asserts the contract's error shape — the status, `Content-Type:
/// application/json` and `{"error":{"code","message"}}` with this code and a
/// message — and returns the body for further checks.
pub async fn assert_error(response: reqwest::Response, status: u16, code: &str) -> Value {
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
        "{url}: content-type {content_type:?}"
    );
    let body: Value = response.json().await.expect("error body is JSON");
    assert_eq!(body["error"]["code"], code, "{url}: {body}");
    assert!(
        body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{url}: error without a message: {body}"
    );
    body
}

//! JWT keys from AWS Secrets Manager, end to end: a real `moto_server` plays
//! Secrets Manager, the real AWS SDK creates and rotates the secret, and the
//! real `moneta` binary verifies tokens signed with the rotated keys.

#[path = "support/mod.rs"]
mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_secretsmanager::Client;
use aws_sdk_secretsmanager::config::{BehaviorVersion, Credentials, Region};
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rsa::traits::PublicKeyParts;
use serde_json::{Value, json};

use support::{MonetaProcess, PATIENCE, RedisServer, free_port, require_binary};

const SECRET_ID: &str = "moneta/jwt-keys";
/// Shared-secret material placed in the key set, to prove it never reaches a log line.
const HMAC_MATERIAL: &str = "moneta-hmac-material-that-must-never-be-logged";

/// Secrets Manager stand-in on a free loopback port, killed on drop.
struct Moto {
    port: u16,
    child: Child,
}

impl Moto {
    fn start() -> Moto {
        let bin = require_binary("moto_server");
        let port = free_port();
        let mut child = Command::new(bin)
            .args(["-p", &port.to_string(), "-H", "127.0.0.1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start moto_server");
        let deadline = Instant::now() + PATIENCE;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("moto_server exited early with {status}");
            }
            assert!(
                Instant::now() < deadline,
                "moto_server did not listen on port {port} within {PATIENCE:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Moto { port, child }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn client(&self) -> Client {
        let config = aws_sdk_secretsmanager::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(self.endpoint())
            .credentials_provider(Credentials::new("testing", "testing", None, None, "test"))
            .build();
        Client::from_conf(config)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An RS256 signing key made by the openssl command line.
struct SigningKey {
    kid: String,
    pem: Vec<u8>,
    jwk: Value,
}

impl SigningKey {
    fn generate(dir: &Path, kid: &str) -> SigningKey {
        let (pem, key) = support::openssl_rsa_key(dir, kid);
        let b64 = |bytes: Vec<u8>| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let jwk = json!({
            "kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid,
            "n": b64(key.n().to_bytes_be()), "e": b64(key.e().to_bytes_be()),
        });
        SigningKey {
            kid: kid.to_owned(),
            pem,
            jwk,
        }
    }

    fn token(&self, sub: &str) -> String {
        let now = chrono::Utc::now().timestamp();
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(self.kid.clone());
        let claims = json!({"sub": sub, "exp": now + 600, "iat": now, "plan": "basic", "country": "KR"});
        let key = EncodingKey::from_rsa_pem(&self.pem).expect("encoding key");
        jsonwebtoken::encode(&header, &claims, &key).expect("sign")
    }
}

fn key_set(keys: &[&SigningKey]) -> String {
    let mut jwks: Vec<Value> = keys.iter().map(|k| k.jwk.clone()).collect();
    let k = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(HMAC_MATERIAL);
    jwks.push(json!({"kty": "oct", "kid": "shared", "alg": "HS512", "k": k}));
    json!({ "keys": jwks }).to_string()
}

async fn create_secret(client: &Client, value: &str) {
    client
        .create_secret()
        .name(SECRET_ID)
        .secret_string(value)
        .send()
        .await
        .expect("create the secret");
}

/// A new version becomes AWSCURRENT; the one it replaces becomes AWSPREVIOUS.
async fn rotate(client: &Client, value: &str) {
    client
        .put_secret_value()
        .secret_id(SECRET_ID)
        .secret_string(value)
        .send()
        .await
        .expect("put a new secret version");
}

fn aws_env(moto_endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("MONETA_JWT_SECRET_ID", SECRET_ID.to_owned()),
        ("AWS_ENDPOINT_URL", moto_endpoint.to_owned()),
        ("AWS_REGION", "us-east-1".to_owned()),
        ("AWS_DEFAULT_REGION", "us-east-1".to_owned()),
        ("AWS_ACCESS_KEY_ID", "testing".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "testing".to_owned()),
        ("AWS_EC2_METADATA_DISABLED", "true".to_owned()),
    ]
}

/// Moneta on real Redis, Secrets Manager keys refreshed every second, and an
/// internal API that is down, so a valid token gets the degraded snapshot answer.
struct Stack {
    moneta: MonetaProcess,
    http: reqwest::Client,
    _redis: RedisServer,
    _dir: tempfile::TempDir,
}

impl Stack {
    fn start(moto: &Moto) -> Stack {
        let dir = tempfile::tempdir().expect("tempdir");
        let redis = RedisServer::start();
        let snapshot = support::write_snapshot(dir.path());
        let mut envs = aws_env(&moto.endpoint());
        envs.extend([
            ("MONETA_JWT_REFRESH_S", "1".to_owned()),
            ("MONETA_REDIS_URL", redis.url.clone()),
            (
                "MONETA_INTERNAL_API_URL",
                format!("http://127.0.0.1:{}", free_port()),
            ),
            (
                "MONETA_FALLBACK_CATALOG_FILE",
                snapshot.to_string_lossy().into_owned(),
            ),
        ]);
        let moneta = MonetaProcess::start(&envs);
        Stack {
            moneta,
            http: reqwest::Client::new(),
            _redis: redis,
            _dir: dir,
        }
    }

    /// Status and `error.code` (or `degraded`) of a playback-info request.
    async fn playback(&self, token: &str) -> (u16, Value) {
        let resp = self
            .http
            .get(format!(
                "{}/v1/contents/m-0001/playback-info",
                self.moneta.base_url()
            ))
            .bearer_auth(token)
            .send()
            .await
            .expect("playback-info request");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn assert_accepts(&self, key: &SigningKey) {
        let (status, body) = self.playback(&key.token("u-1")).await;
        assert_eq!(status, 200, "key {} refused: {body}", key.kid);
        assert_eq!(body["degraded"], true, "{body}");
    }

    async fn assert_refuses(&self, key: &SigningKey) {
        let (status, body) = self.playback(&key.token("u-1")).await;
        assert_eq!(status, 401, "key {} accepted", key.kid);
        assert_eq!(body["error"]["code"], "invalid_token");
    }

    /// Waits until the key is accepted (`true`) or refused (`false`).
    async fn wait_until(&self, key: &SigningKey, accepted: bool) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let (status, _) = self.playback(&key.token("u-1")).await;
            if (status == 200) == accepted {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "key {} still {} after {PATIENCE:?}; log:\n{}",
                key.kid,
                if accepted { "refused" } else { "accepted" },
                self.moneta.output()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn metrics(&self) -> String {
        self.http
            .get(format!("http://127.0.0.1:{}/metrics", self.moneta.admin_port))
            .send()
            .await
            .expect("metrics request")
            .text()
            .await
            .expect("metrics body")
    }
}

fn metric_value(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name_and_labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn rotation_accepts_current_and_previous_then_drops_the_oldest() {
    let moto = Moto::start();
    let sm = moto.client();
    let dir = tempfile::tempdir().unwrap();
    let [a, b, c] = ["key-a", "key-b", "key-c"].map(|kid| SigningKey::generate(dir.path(), kid));

    create_secret(&sm, &key_set(&[&a])).await;
    let started = chrono::Utc::now().timestamp() as f64;
    let stack = Stack::start(&moto);
    stack.assert_accepts(&a).await;
    stack.assert_refuses(&b).await;

    rotate(&sm, &key_set(&[&b])).await;
    stack.wait_until(&b, true).await;
    stack.assert_accepts(&a).await; // now AWSPREVIOUS

    rotate(&sm, &key_set(&[&c])).await;
    stack.wait_until(&a, false).await;
    stack.assert_refuses(&a).await;
    stack.assert_accepts(&b).await;
    stack.assert_accepts(&c).await;

    let metrics = stack.metrics().await;
    let last = metric_value(
        &metrics,
        r#"moneta_jwt_keys_last_refresh_timestamp_seconds{source="MONETA_JWT_SECRET_ID"}"#,
    )
    .expect("last refresh gauge");
    // A Unix time in seconds, of a refresh made while this test ran.
    let now = chrono::Utc::now().timestamp() as f64;
    assert!(started - 1.0 <= last && last <= now + 1.0, "{last}");
    let log = stack.moneta.output();
    let k = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(HMAC_MATERIAL);
    assert!(
        !log.contains(HMAC_MATERIAL) && !log.contains(&k),
        "key material in the log"
    );
}

#[tokio::test]
async fn secrets_manager_outage_keeps_the_last_good_keys() {
    let mut moto = Moto::start();
    let sm = moto.client();
    let dir = tempfile::tempdir().unwrap();
    let a = SigningKey::generate(dir.path(), "key-a");
    create_secret(&sm, &key_set(&[&a])).await;
    let stack = Stack::start(&moto);
    stack.assert_accepts(&a).await;

    moto.kill();
    let failures = r#"moneta_jwt_key_refresh_failures_total{source="MONETA_JWT_SECRET_ID"}"#;
    let deadline = Instant::now() + PATIENCE;
    loop {
        let seen = metric_value(&stack.metrics().await, failures).unwrap_or(0.0);
        if seen >= 2.0 {
            break;
        }
        assert!(Instant::now() < deadline, "no failed refresh counted");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    stack.assert_accepts(&a).await;
    assert!(
        stack.moneta.output().contains("keeping the last good keys"),
        "the failed refresh was not logged"
    );
}

/// Runs moneta until it exits; returns its exit code and stderr.
fn run_until_exit(envs: &[(&str, String)]) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_moneta"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("MONETA_LISTEN_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("MONETA_ADMIN_ADDR", format!("127.0.0.1:{}", free_port()))
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start moneta");
    let deadline = Instant::now() + PATIENCE;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("moneta kept running although its keys cannot be loaded");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("output");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_start_refused(code: Option<i32>, stderr: &str) {
    assert_eq!(code, Some(2), "stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected: {stderr}");
    assert!(lines[0].contains("MONETA_JWT_SECRET_ID"), "{stderr}");
}

#[test]
fn a_missing_secret_stops_the_start_with_exit_code_2() {
    let moto = Moto::start();
    let (code, stderr) = run_until_exit(&aws_env(&moto.endpoint()));
    assert_start_refused(code, &stderr);
    assert!(stderr.contains(SECRET_ID), "{stderr}");
}

#[test]
fn an_unreachable_secrets_manager_stops_the_start_with_exit_code_2() {
    let closed = format!("http://127.0.0.1:{}", free_port());
    let (code, stderr) = run_until_exit(&aws_env(&closed));
    assert_start_refused(code, &stderr);
}

#[tokio::test]
async fn a_secret_that_is_not_a_key_set_stops_the_start_without_echoing_it() {
    let moto = Moto::start();
    let value = format!("{HMAC_MATERIAL:?}");
    create_secret(&moto.client(), &value).await;
    let envs = aws_env(&moto.endpoint());
    let (code, stderr) = tokio::task::spawn_blocking(move || run_until_exit(&envs))
        .await
        .expect("join");
    assert_start_refused(code, &stderr);
    assert!(!stderr.contains(HMAC_MATERIAL), "{stderr}");
}

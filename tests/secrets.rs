//! JWT keys from AWS Secrets Manager, end to end: a real `moto_server` plays
//! Secrets Manager, the real AWS SDK creates and rotates the secret, and the
//! real `moneta` binary verifies tokens signed with the rotated keys.

#[path = "support/mod.rs"]
mod support;

use std::path::Path;
use std::process::Command;

use aws_sdk_secretsmanager::Client;
use aws_sdk_secretsmanager::config::{BehaviorVersion, Credentials, Region};
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rsa::traits::PublicKeyParts;
use serde_json::{Value, json};

use support::{
    PATIENCE, Process, PublicApi, SnapshotMoneta, assert_error, eventually, free_port, metric_value,
    require_binary, run_moneta_until_exit,
};

const SECRET_ID: &str = "moneta/jwt-keys";
/// Shared-secret material placed in the key set, to prove it never reaches a log line.
const HMAC_MATERIAL: &str = "moneta-hmac-material-that-must-never-be-logged";

/// Secrets Manager stand-in on a free loopback port, killed on drop.
struct Moto {
    port: u16,
    process: Process,
}

impl Moto {
    fn start() -> Moto {
        let port = free_port();
        let mut command = Command::new(require_binary("moto_server"));
        command.args(["-p", &port.to_string(), "-H", "127.0.0.1"]);
        Moto {
            port,
            process: Process::logged(&mut command, "moto_server").listening_on(port),
        }
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
        self.process.kill();
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
    moneta: SnapshotMoneta,
    public: PublicApi,
}

impl Stack {
    fn start(moto: &Moto) -> Stack {
        let mut envs = aws_env(&moto.endpoint());
        envs.push(("MONETA_JWT_REFRESH_S", "1".to_owned()));
        let moneta = SnapshotMoneta::start(&envs);
        let public = moneta.process.public_api();
        Stack { moneta, public }
    }

    /// A playback-info request with a token signed by `key`.
    async fn playback(&self, key: &SigningKey) -> reqwest::Response {
        self.public.playback_info("m-0001", &key.token("u-1")).await
    }

    async fn assert_accepts(&self, key: &SigningKey) {
        let resp = self.playback(key).await;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or_default();
        assert_eq!(status, 200, "key {} refused: {body}", key.kid);
        assert_eq!(body["degraded"], true, "{body}");
    }

    async fn assert_refuses(&self, key: &SigningKey) {
        let resp = self.playback(key).await;
        assert_eq!(resp.status(), 401, "key {} accepted", key.kid);
        assert_error(resp, 401, "invalid_token").await;
    }

    /// Waits until the key is accepted (`true`) or refused (`false`).
    async fn wait_until(&self, key: &SigningKey, accepted: bool) {
        let settled = eventually(PATIENCE, async || {
            ((self.playback(key).await.status() == 200) == accepted).then_some(())
        })
        .await;
        assert!(
            settled.is_some(),
            "key {} still {} after {PATIENCE:?}; log:\n{}",
            key.kid,
            if accepted { "refused" } else { "accepted" },
            self.moneta.process.output()
        );
    }

    fn output(&self) -> String {
        self.moneta.process.output()
    }

    async fn metric(&self, series: &str) -> Option<f64> {
        metric_value(&self.moneta.process.metrics().await, series)
    }
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

    let last = stack
        .metric(r#"moneta_jwt_keys_last_refresh_timestamp_seconds{source="MONETA_JWT_SECRET_ID"}"#)
        .await
        .expect("last refresh gauge");
    // A Unix time in seconds, of a refresh made while this test ran.
    let now = chrono::Utc::now().timestamp() as f64;
    assert!(started - 1.0 <= last && last <= now + 1.0, "{last}");
    let log = stack.output();
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
    let counted = eventually(PATIENCE, async || {
        (stack.metric(failures).await.unwrap_or(0.0) >= 2.0).then_some(())
    })
    .await;
    assert!(counted.is_some(), "no failed refresh counted");
    stack.assert_accepts(&a).await;
    assert!(
        stack.output().contains("keeping the last good keys"),
        "the failed refresh was not logged"
    );
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
    let (code, stderr) = run_moneta_until_exit(&aws_env(&moto.endpoint()));
    assert_start_refused(code, &stderr);
    assert!(stderr.contains(SECRET_ID), "{stderr}");
}

#[test]
fn an_unreachable_secrets_manager_stops_the_start_with_exit_code_2() {
    let (code, stderr) = run_moneta_until_exit(&aws_env(&support::nobody_listens()));
    assert_start_refused(code, &stderr);
}

#[tokio::test]
async fn a_secret_that_is_not_a_key_set_stops_the_start_without_echoing_it() {
    let moto = Moto::start();
    let value = format!("{HMAC_MATERIAL:?}");
    create_secret(&moto.client(), &value).await;
    let envs = aws_env(&moto.endpoint());
    let (code, stderr) = tokio::task::spawn_blocking(move || run_moneta_until_exit(&envs))
        .await
        .expect("join");
    assert_start_refused(code, &stderr);
    assert!(!stderr.contains(HMAC_MATERIAL), "{stderr}");
}

use base64::Engine;
use serde_json::json;

use crate::helpers::{assert_invalid_token, spawn_app, spawn_app_with};
use crate::support::{DEV_SECRET, assert_error};

fn b64(v: &serde_json::Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

/// Signs arbitrary header and claims with HS256 and the dev secret.
fn forge(header: serde_json::Value, claims: serde_json::Value, secret: &str) -> String {
    use jsonwebtoken::{EncodingKey, Header, encode};
    let mut h = Header::new(jsonwebtoken::Algorithm::HS256);
    if let Some(kid) = header.get("kid").and_then(|k| k.as_str()) {
        h.kid = Some(kid.to_owned());
    }
    encode(&h, &claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

#[tokio::test]
async fn missing_token_is_401_missing_token() {
    let app = spawn_app().await;
    let resp = app.get_anonymously("/v1/contents/m-0001/playback-info").await;
    assert_error(resp, 401, "missing_token").await;
}

#[tokio::test]
async fn every_bad_token_is_401_invalid_token() {
    let app = spawn_app().await;
    let good_claims = json!({"sub": "u-basic", "exp": now() + 600});
    let alg_none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&good_claims)
    );
    let cases: Vec<(&str, String)> = vec![
        ("garbage", "not-a-jwt".into()),
        ("alg none", alg_none),
        (
            "wrong secret",
            forge(json!({}), good_claims.clone(), "another-secret"),
        ),
        (
            "expired beyond leeway",
            forge(json!({}), json!({"sub": "u", "exp": now() - 60}), DEV_SECRET),
        ),
        (
            "not yet valid",
            forge(
                json!({}),
                json!({"sub": "u", "exp": now() + 600, "nbf": now() + 300}),
                DEV_SECRET,
            ),
        ),
        ("no exp", forge(json!({}), json!({"sub": "u"}), DEV_SECRET)),
        (
            "no sub",
            forge(json!({}), json!({"exp": now() + 600}), DEV_SECRET),
        ),
        (
            "unknown kid",
            forge(json!({"kid": "nope"}), good_claims.clone(), DEV_SECRET),
        ),
        ("too large", format!("{}.{}.x", "a".repeat(9000), "b")),
        (
            "extra segment",
            format!("{}.extra", forge(json!({}), good_claims.clone(), DEV_SECRET)),
        ),
        ("bad base64", "@@@.###.$$$".into()),
    ];
    for (name, token) in cases {
        assert_invalid_token(app.playback_info("m-0001", &token).await, name).await;
    }
}

#[tokio::test]
async fn a_scheme_other_than_bearer_is_refused() {
    let app = spawn_app().await;
    let token = app.token("u-basic", "basic", 1, "KR");
    let basic = format!("Basic {token}");
    let resp = app
        .get_with(
            "/v1/contents/m-0001/playback-info",
            None,
            &[("authorization", &basic)],
        )
        .await;
    assert_error(resp, 401, "invalid_token").await;
}

#[tokio::test]
async fn expiry_within_leeway_is_accepted() {
    let app = spawn_app().await;
    let token = forge(
        json!({}),
        json!({"sub": "u-basic", "exp": now() - 10}),
        DEV_SECRET,
    );
    assert_eq!(app.playback_info("m-0001", &token).await.status(), 200);
}

/// RFC 7519 NumericDates may be fractional: what `time.time() + 3600` mints.
#[tokio::test]
async fn fractional_times_are_times() {
    let app = spawn_app().await;
    let at = now() as f64 + 0.5;
    let token = |exp: f64| {
        let claims = json!({"sub": "u-basic", "iat": at, "nbf": at - 1.25, "exp": exp});
        forge(json!({}), claims, DEV_SECRET)
    };
    assert_eq!(
        app.playback_info("m-0001", &token(at + 3600.5)).await.status(),
        200
    );
    assert_invalid_token(app.playback_info("m-0001", &token(at - 120.5)).await, "expired").await;
}

/// `moneta token` mints what the same configuration accepts, issuer and
/// audience included.
#[tokio::test]
async fn moneta_token_passes_the_checks_of_its_own_configuration() {
    let checks = [
        ("MONETA_JWT_ISSUER", "https://id.example"),
        ("MONETA_JWT_AUDIENCE", "moneta"),
    ];
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_moneta"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("MONETA_JWT_HS256_SECRET", DEV_SECRET)
        .envs(checks)
        .args([
            "token",
            "--sub",
            "u-premium",
            "--plan",
            "premium",
            "--max-streams",
            "4",
            "--country",
            "KR",
        ])
        .output()
        .expect("run moneta token");
    assert!(output.status.success(), "{output:?}");
    let token = String::from_utf8(output.stdout).expect("utf-8").trim().to_owned();
    let app = spawn_app_with(&checks).await;
    assert_eq!(app.playback_info("m-0001", &token).await.status(), 200);
}

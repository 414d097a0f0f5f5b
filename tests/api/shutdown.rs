//! SIGTERM: the real binary stops accepting, finishes in-flight requests and
//! delivers pending positions before it exits.

use serde_json::{Value, json};

use crate::helpers::spawn_fake_api;
use crate::support::{MonetaProcess, PATIENCE, RedisServer, mint_token};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_a_just_written_position() {
    let redis = RedisServer::start();
    let api = spawn_fake_api().await;
    let mut moneta = MonetaProcess::start(&[
        ("MONETA_REDIS_URL", redis.url.clone()),
        (
            "MONETA_INTERNAL_API_URL",
            format!("http://127.0.0.1:{}", api.port),
        ),
        // Only the shutdown flush can deliver within this test.
        ("MONETA_PROGRESS_FLUSH_MS", "600000".into()),
    ]);
    let client = reqwest::Client::new();
    let token = mint_token("u-basic", "basic", 1, "KR");
    let base = moneta.base_url();
    let started: Value = client
        .post(format!("{base}/v1/playback/sessions"))
        .bearer_auth(&token)
        .json(&json!({"content_id": "m-0001", "device_id": "tv"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = started["session_id"].as_str().expect("session id");
    let resp = client
        .put(format!("{base}/v1/playback/sessions/{id}"))
        .bearer_auth(&token)
        .json(&json!({"position_ms": 4242, "state": "paused"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(api.delivered().is_empty());

    // Drain, in-flight requests and the flush each have their own bounds;
    // this deadline only catches a process that never exits.
    let status = tokio::task::spawn_blocking(move || {
        let status = moneta.terminate(PATIENCE);
        (status, moneta.output())
    })
    .await
    .unwrap();
    let (status, output) = status;
    assert!(
        status.is_some_and(|s| s.success()),
        "moneta did not exit cleanly: {status:?}\n{output}"
    );
    let delivered = api.delivered();
    assert!(
        delivered
            .iter()
            .any(|i| i["user_id"] == "u-basic" && i["position_ms"] == 4242),
        "delivered: {delivered:?}\n{output}"
    );
    assert!(
        !output.contains(crate::support::DEV_SECRET),
        "the secret must never be logged"
    );
    assert!(!output.contains(&token), "the token must never be logged");
}

#[tokio::test]
async fn bad_configuration_exits_2_naming_the_setting() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_moneta"))
        .env_clear()
        .env("MONETA_JWT_HS256_SECRET", "x")
        .env("MONETA_LISTEN_ADDR", "not-an-address")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("MONETA_LISTEN_ADDR"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_moneta"))
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "no key source at all");
}

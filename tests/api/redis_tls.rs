//! `rediss://` (CONTRACT §2): Moneta reaches a real Redis over TLS, checking
//! its certificate against the system's roots (`SSL_CERT_FILE` here, a CA
//! made for the test).

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::support::{
    MonetaProcess, PATIENCE, RedisServer, eventually, free_port, mint_token, require_binary, spawn_fake_api,
};

/// A CA and a certificate it signed for `localhost` and 127.0.0.1.
fn certificates(dir: &Path) {
    let openssl = require_binary("openssl");
    let run = |args: &[&str]| {
        let output = Command::new(&openssl)
            .current_dir(dir)
            .args(args)
            .output()
            .expect("run openssl");
        assert!(output.status.success(), "openssl {args:?}: {output:?}");
    };
    std::fs::write(dir.join("san.ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        .expect("write san.ext");
    let subject = |cn: &str| format!("/CN={cn}");
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-subj",
        &subject("moneta-test-ca"),
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "redis.key",
        "-out",
        "redis.csr",
        "-subj",
        &subject("localhost"),
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        "redis.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "redis.crt",
    ]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_kept_in_a_redis_reached_over_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    certificates(dir.path());
    let file = |name: &str| dir.path().join(name).display().to_string();
    let tls_port = free_port();
    let redis = RedisServer::start_with(
        free_port(),
        &[
            "--tls-port",
            &tls_port.to_string(),
            "--tls-cert-file",
            &file("redis.crt"),
            "--tls-key-file",
            &file("redis.key"),
            "--tls-ca-cert-file",
            &file("ca.crt"),
            "--tls-auth-clients",
            "no",
        ],
    );
    let api = spawn_fake_api().await;
    let moneta = MonetaProcess::start(&[
        ("MONETA_REDIS_URL", format!("rediss://localhost:{tls_port}")),
        ("MONETA_INTERNAL_API_URL", api.url()),
        ("SSL_CERT_FILE", file("ca.crt")),
    ]);
    let public = moneta.public_api();
    let up = eventually(PATIENCE, async || {
        let ready: Value = public.get_anonymously("/health/ready").await.json().await.ok()?;
        (ready["dependencies"]["redis"] == "up").then_some(())
    })
    .await;
    assert!(up.is_some(), "Redis over TLS never came up:\n{}", moneta.output());

    let token = mint_token("u-basic", "basic", 1, "KR");
    let first = public.started_session(&token, "m-0001", "tv").await;
    // The limit is counted in that Redis: a second device is refused.
    assert_eq!(
        public.start_session(&token, "m-0001", "phone").await.status(),
        409
    );
    let sessions = testkit::redis::cli(redis.port, &["--scan", "--pattern", "*u-basic*:sessions"]);
    assert!(!sessions.trim().is_empty(), "no sessions key in the TLS Redis");
    let members = testkit::redis::cli(redis.port, &["ZRANGE", sessions.trim(), "0", "-1"]);
    assert_eq!(members.trim(), first);
}

//! SIGTERM: the real binary stops accepting, finishes in-flight requests and
//! delivers pending positions before it exits.

use crate::support::{
    DEV_SECRET, MonetaProcess, PATIENCE, RedisServer, mint_token, run_moneta_until_exit, spawn_fake_api,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_a_just_written_position() {
    let redis = RedisServer::start();
    let api = spawn_fake_api().await;
    let mut moneta = MonetaProcess::start(&[
        ("MONETA_REDIS_URL", redis.url.clone()),
        ("MONETA_INTERNAL_API_URL", api.url()),
        // Only the shutdown flush can deliver within this test.
        ("MONETA_PROGRESS_FLUSH_MS", "600000".into()),
    ]);
    let public = moneta.public_api();
    let token = mint_token("u-basic", "basic", 1, "KR");
    let id = public.started_session(&token, "m-0001", "tv").await;
    assert_eq!(public.heartbeat(&token, &id, 4242).await.status(), 200);
    assert!(api.delivered().is_empty());

    // Drain, in-flight requests and the flush each have their own bounds;
    // this deadline only catches a process that never exits.
    let (status, output) = tokio::task::spawn_blocking(move || {
        let status = moneta.terminate(PATIENCE);
        (status, moneta.output())
    })
    .await
    .unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "moneta did not exit cleanly: {status:?}\n{output}"
    );
    assert!(
        api.received_position("u-basic", 4242),
        "delivered: {:?}\n{output}",
        api.delivered()
    );
    assert!(!output.contains(DEV_SECRET), "the secret must never be logged");
    assert!(!output.contains(&token), "the token must never be logged");
}

#[test]
fn bad_configuration_exits_2_naming_the_setting() {
    let (code, stderr) = run_moneta_until_exit(&[
        ("MONETA_JWT_HS256_SECRET", "x".into()),
        ("MONETA_LISTEN_ADDR", "not-an-address".into()),
    ]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("MONETA_LISTEN_ADDR"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");

    let (code, stderr) = run_moneta_until_exit(&[]);
    assert_eq!(code, Some(2), "no key source at all: {stderr}");
}

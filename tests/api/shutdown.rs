//! SIGTERM: the real binary stops accepting, finishes in-flight requests and
//! delivers pending positions before it exits, whatever its clients do; and
//! a client slow to send its request headers is disconnected.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{
    DEV_SECRET, FakeApi, MonetaProcess, PATIENCE, RedisServer, mint_token, run_moneta_until_exit,
    run_moneta_until_exit_os, spawn_fake_api,
};

/// A connection whose request announced 1000 body bytes and sent 10.
async fn stalled_body(moneta: &MonetaProcess, token: &str) -> TcpStream {
    let mut stalled = connect(moneta).await;
    let head = format!(
        "POST /v1/playback/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    );
    stalled.write_all(head.as_bytes()).await.unwrap();
    stalled.write_all(b"{\"content_").await.unwrap();
    stalled
}

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
    let heartbeat = public.heartbeat(&token, &id, 4242).await;
    assert_eq!(heartbeat.status(), 200);
    let request_id = heartbeat.headers()["x-request-id"].to_str().unwrap().to_owned();
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
    // Access lines are written in batches; a stop writes the last of them.
    assert!(
        output
            .lines()
            .any(|l| l.contains("\"moneta::access\"") && l.contains(&request_id)),
        "no access line for the last request ({request_id}):\n{output}"
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

    for filter in ["warn,[[[bad", "info,moneta=loud", "="] {
        let (code, stderr) = run_moneta_until_exit(&[
            ("MONETA_JWT_HS256_SECRET", "x".into()),
            ("RUST_LOG", filter.into()),
        ]);
        assert_eq!(code, Some(2), "RUST_LOG={filter}: {stderr}");
        assert!(stderr.contains("RUST_LOG"), "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    }
}

#[test]
fn a_toml_syntax_error_gives_its_position_never_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("moneta.toml");
    std::fs::write(&file, "session_secret = \"Hunter2\\Secret\"\n").unwrap();
    let (code, stderr) = run_moneta_until_exit(&[
        ("MONETA_JWT_HS256_SECRET", "x".into()),
        ("MONETA_CONFIG_FILE", file.to_str().unwrap().into()),
    ]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("MONETA_CONFIG_FILE") && stderr.contains("line 1, column 27"),
        "{stderr}"
    );
    assert!(!stderr.contains("Hunter2"), "the line was quoted: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
}

/// `std::env::vars` panics on any variable that is not UTF-8: a setting that
/// is not must stop the start as any bad setting does, anything else is no
/// concern of Moneta's.
#[test]
fn variables_that_are_not_utf8_stop_the_start_only_when_they_are_settings() {
    use std::os::unix::ffi::OsStringExt;
    let bytes = |b: &[u8]| std::ffi::OsString::from_vec(b.to_vec());
    let (code, stderr) = run_moneta_until_exit_os(&[
        ("MONETA_JWT_HS256_SECRET", "x".into()),
        ("MONETA_SESSION_SECRET", bytes(b"\xffTopSecret")),
    ]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("MONETA_SESSION_SECRET"), "{stderr}");
    assert!(!stderr.contains("TopSecret"), "the value was printed: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_moneta"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("MONETA_JWT_HS256_SECRET", DEV_SECRET)
        .env("UNRELATED_VAR", bytes(b"caf\xe9"))
        .args(["token", "--sub", "u-basic"])
        .output()
        .expect("run moneta token");
    assert!(output.status.success(), "{output:?}");
}

/// CONTRACT §6: a client has 10 s to finish its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const DRAIN_MS: u64 = 1_000;
/// The contract's bound on the exit (drain + 10 s), plus slack for a loaded
/// machine. A process that waits for a stalled client never exits at all.
const EXIT_BOUND: Duration = Duration::from_millis(DRAIN_MS + 10_000 + 5_000);
/// Only ends the wait for a disconnection that is never going to happen.
const DISCONNECT_PATIENCE: Duration = Duration::from_secs(30);

async fn moneta_with_drain(extra: &[(&str, String)]) -> (MonetaProcess, RedisServer, FakeApi) {
    let redis = RedisServer::start();
    let api = spawn_fake_api().await;
    let mut envs = vec![
        ("MONETA_REDIS_URL", redis.url.clone()),
        ("MONETA_INTERNAL_API_URL", api.url()),
        ("MONETA_SHUTDOWN_DRAIN_MS", DRAIN_MS.to_string()),
    ];
    envs.extend(extra.iter().cloned());
    (MonetaProcess::start(&envs), redis, api)
}

async fn connect(moneta: &MonetaProcess) -> TcpStream {
    TcpStream::connect(("127.0.0.1", moneta.port)).await.unwrap()
}

/// Sends SIGTERM and waits for the exit; the exit status, if any, and the log.
async fn terminate(
    mut moneta: MonetaProcess,
    within: Duration,
) -> (Option<std::process::ExitStatus>, String) {
    tokio::task::spawn_blocking(move || {
        let status = moneta.terminate(within);
        (status, moneta.output())
    })
    .await
    .unwrap()
}

/// Reads until the server closes the connection (or resets it); false when
/// it is still open after `within`. Whatever the server sends first is skipped.
async fn closed_by_server(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// Reads one response with a `Content-Length` body; its status and body.
async fn read_response(stream: &mut TcpStream) -> (u16, String) {
    tokio::time::timeout(PATIENCE, async {
        let mut received = Vec::new();
        let mut buf = [0u8; 4096];
        let head_end = loop {
            if let Some(at) = received.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            let n = stream.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "closed before a whole response: {}",
                String::from_utf8_lossy(&received)
            );
            received.extend_from_slice(&buf[..n]);
        };
        let head = String::from_utf8_lossy(&received[..head_end]).to_ascii_lowercase();
        let status = head[9..12].parse().unwrap();
        let length: usize = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse().unwrap());
        while received.len() < head_end + length {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed in the middle of a body");
            received.extend_from_slice(&buf[..n]);
        }
        (
            status,
            String::from_utf8_lossy(&received[head_end..head_end + length]).into_owned(),
        )
    })
    .await
    .expect("a response")
}

const LIVE: &[u8] = b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_although_a_client_stalls_in_its_headers() {
    let (moneta, _redis, _api) = moneta_with_drain(&[]).await;
    let mut stalled = connect(&moneta).await;
    stalled
        .write_all(b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Half: ")
        .await
        .unwrap();
    // The head is stuck in Moneta, not in this process.
    stalled.flush().await.unwrap();
    // Once a request is answered, Moneta runs and handles SIGTERM (the port
    // accepts connections a moment before that).
    let mut other = connect(&moneta).await;
    other.write_all(LIVE).await.unwrap();
    assert_eq!(read_response(&mut other).await.0, 200);

    let (status, output) = terminate(moneta, EXIT_BOUND).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "moneta did not exit 0 within {EXIT_BOUND:?} of SIGTERM: {status:?}\n{output}"
    );
    // Held open until the process is gone.
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_although_a_request_body_stalls() {
    // A request timeout far beyond the exit bound: only the shutdown itself
    // may end the stalled request.
    let (moneta, _redis, _api) = moneta_with_drain(&[("MONETA_REQUEST_TIMEOUT_MS", "120000".into())]).await;
    let token = mint_token("u-stall", "basic", 1, "KR");
    let mut stalled = stalled_body(&moneta, &token).await;
    stalled.flush().await.unwrap();
    // The request is in flight (its handler waits for the body) before the
    // signal: a normal request on another connection is answered meanwhile,
    // which also shows Moneta runs and handles SIGTERM.
    let mut other = connect(&moneta).await;
    other.write_all(LIVE).await.unwrap();
    assert_eq!(read_response(&mut other).await.0, 200);
    assert!(
        !closed_by_server(&mut stalled, Duration::from_millis(200)).await,
        "the stalled request must still be open before SIGTERM"
    );

    let (status, output) = terminate(moneta, EXIT_BOUND).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "moneta did not exit 0 within {EXIT_BOUND:?} of SIGTERM: {status:?}\n{output}"
    );
    // Held open until the process is gone.
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_slow_to_send_its_headers_is_disconnected_while_others_are_served() {
    let (moneta, _redis, _api) = moneta_with_drain(&[]).await;
    let mut slow = connect(&moneta).await;
    slow.write_all(b"GET /health/live HTTP/1.1\r\nHost: 127.0")
        .await
        .unwrap();

    let mut other = connect(&moneta).await;
    other.write_all(LIVE).await.unwrap();
    let (status, body) = read_response(&mut other).await;
    assert_eq!(status, 200, "{body}");

    assert!(
        closed_by_server(&mut slow, HEADER_TIMEOUT + DISCONNECT_PATIENCE).await,
        "a client that never finished its headers is still connected"
    );
    // The server is unaffected.
    other.write_all(LIVE).await.unwrap();
    assert_eq!(read_response(&mut other).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_outlives_the_header_timeout_but_not_a_stalled_head() {
    let (moneta, _redis, _api) = moneta_with_drain(&[]).await;
    let mut client = connect(&moneta).await;
    client.write_all(LIVE).await.unwrap();
    assert_eq!(read_response(&mut client).await.0, 200);

    // The edge keeps idle upstream connections for a minute and must not
    // find them closed under its next request.
    tokio::time::sleep(HEADER_TIMEOUT + Duration::from_secs(2)).await;
    client.write_all(LIVE).await.unwrap();
    assert_eq!(read_response(&mut client).await.0, 200);

    // On a connection that has served requests, a head started and never
    // finished is cut as on a fresh one.
    client
        .write_all(b"GET /health/live HTTP/1.1\r\nHo")
        .await
        .unwrap();
    assert!(
        closed_by_server(&mut client, HEADER_TIMEOUT + DISCONNECT_PATIENCE).await,
        "a head started on a kept-alive connection was never cut"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_stalled_in_normal_operation_is_answered_and_its_connection_closed() {
    let (moneta, _redis, _api) = moneta_with_drain(&[("MONETA_REQUEST_TIMEOUT_MS", "5000".into())]).await;
    let token = mint_token("u-stall", "basic", 1, "KR");
    let mut stalled = stalled_body(&moneta, &token).await;

    let (status, body) = read_response(&mut stalled).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        closed_by_server(&mut stalled, DISCONNECT_PATIENCE).await,
        "the connection of a stalled body stays open"
    );
}

//! The edge (CONTRACT section 4): the real `nginx`, running the repository's
//! rendered configuration, in front of the real `moneta` binary — or, where
//! an assertion needs to see what nginx forwards, in front of a small echo
//! server that reports the request headers and counts TCP connections.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Json;
use axum::Router;
use axum::http::{HeaderMap, Method, Uri};
use axum::response::IntoResponse;
use axum::serve::ListenerExt;
use serde_json::{Value, json};
use support::nginx::{Nginx, NginxOptions};
use support::{PATIENCE, PublicApi, SnapshotMoneta, assert_error};

// ---------------------------------------------------------------------------
// Fixtures

/// nginx in front of Moneta on a live Redis with the fallback snapshot and an
/// internal API nobody answers for, so playback-info for m-0001 answers 200 (degraded).
fn moneta_behind(options: impl FnOnce(NginxOptions) -> NginxOptions) -> (SnapshotMoneta, Nginx) {
    let moneta = SnapshotMoneta::start(&[]);
    let upstream = format!("127.0.0.1:{}", moneta.process.port);
    let nginx = Nginx::start(options(NginxOptions::new(upstream)));
    (moneta, nginx)
}

/// nginx in front of an [`Echo`].
async fn echo_behind(options: impl FnOnce(NginxOptions) -> NginxOptions) -> (Echo, Nginx) {
    let echo = Echo::start().await;
    let nginx = Nginx::start(options(NginxOptions::new(echo.upstream())));
    (echo, nginx)
}

fn public_api(nginx: &Nginx) -> PublicApi {
    PublicApi::new(nginx.url(""))
}

/// Stands in for Moneta where the test must see what nginx sends upstream.
struct Echo {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Echo {
    async fn start() -> Echo {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind echo");
        let addr = listener.local_addr().expect("echo addr");
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let accepted = connections.clone();
        let listener = listener.tap_io(move |_| {
            accepted.fetch_add(1, Ordering::SeqCst);
        });
        let seen = requests.clone();
        let app = Router::new().fallback(move |method: Method, uri: Uri, headers: HeaderMap| {
            seen.fetch_add(1, Ordering::SeqCst);
            async move { echo(method, uri, headers) }
        });
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("echo server");
        });
        Echo {
            addr,
            connections,
            requests,
            task,
        }
    }

    fn upstream(&self) -> String {
        self.addr.to_string()
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reports the request as received, and answers with the kind of banner
/// headers a framework adds, which the edge must not let out.
fn echo(method: Method, uri: Uri, headers: HeaderMap) -> impl IntoResponse {
    let mut seen = serde_json::Map::new();
    for (name, value) in &headers {
        let values = seen.entry(name.as_str().to_owned()).or_insert_with(|| json!([]));
        values
            .as_array_mut()
            .expect("array")
            .push(json!(value.to_str().unwrap_or("<non-ascii>")));
    }
    (
        [("x-powered-by", "EchoFramework/1.2.3"), ("x-runtime", "0.001")],
        Json(json!({
            "method": method.as_str(),
            "uri": uri.to_string(),
            "headers": seen,
        })),
    )
}

fn token() -> String {
    support::mint_token("demo-premium", "premium", 4, "KR")
}

fn request_ids(response: &reqwest::Response) -> Vec<String> {
    response
        .headers()
        .get_all("x-request-id")
        .iter()
        .map(|v| v.to_str().expect("ascii request id").to_owned())
        .collect()
}

/// Sends raw bytes, for requests no HTTP client would produce.
fn raw_exchange(port: u16, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to nginx");
    stream.set_read_timeout(Some(PATIENCE)).expect("read timeout");
    stream.write_all(request).expect("write raw request");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

// ---------------------------------------------------------------------------
// Through to Moneta

#[tokio::test]
async fn public_routes_reach_moneta_and_its_answers_pass_untouched() {
    let (_moneta, nginx) = moneta_behind(|o| o);
    let edge = public_api(&nginx);
    let token = token();

    let live = edge.get_anonymously("/health/live").await;
    assert_eq!(live.status(), 200);

    let ready = edge.get_anonymously("/health/ready").await;
    assert_eq!(ready.status(), 200);
    let ready: Value = ready.json().await.unwrap();
    assert!(ready["status"].is_string(), "{ready}");

    let openapi = edge.get_anonymously("/openapi.json").await;
    assert_eq!(openapi.status(), 200);
    let openapi: Value = openapi.json().await.unwrap();
    assert!(
        openapi["openapi"].as_str().is_some_and(|v| v.starts_with('3')),
        "not an OpenAPI 3 document"
    );

    let info = edge.playback_info("m-0001", &token).await;
    assert_eq!(info.status(), 200);
    let info: Value = info.json().await.unwrap();
    assert_eq!(info["content_id"], "m-0001");
    assert_eq!(info["degraded"], true, "{info}");

    // Moneta's own errors must not be replaced by the edge's error pages.
    let anonymous = edge.get_anonymously("/v1/contents/m-0001/playback-info").await;
    assert_error(anonymous, 401, "missing_token").await;

    let unknown = edge.playback_info("m-9999", &token).await;
    assert!(
        unknown.headers().contains_key("retry-after"),
        "Moneta's Retry-After was lost"
    );
    assert_error(unknown, 503, "dependency_unavailable").await;

    // The session routes, including the one with an id in its path.
    let session_id = edge.started_session(&token, "m-0001", "tv-edge").await;
    assert_eq!(edge.get("/v1/playback/sessions", &token).await.status(), 200);
    assert_eq!(edge.heartbeat(&token, &session_id, 1000).await.status(), 200);
    assert_eq!(edge.stop_session(&token, &session_id).await.status(), 204);
}

#[tokio::test]
async fn bodies_over_16_kib_are_refused_with_413_json() {
    let (_moneta, nginx) = moneta_behind(|o| o);
    let edge = public_api(&nginx);
    let token = token();

    let sessions = "/v1/playback/sessions";
    let json = "application/json";
    let too_big = edge
        .send_raw(Method::POST, sessions, Some(&token), json, vec![b' '; 17 * 1024])
        .await;
    assert_error(too_big, 413, "payload_too_large").await;

    // Just under the limit goes through to Moneta, which judges the body.
    let mut body = br#"{"content_id":"m-0001","device_id":"tv-edge"}"#.to_vec();
    body.resize(15 * 1024, b' ');
    let fits = edge
        .send_raw(Method::POST, sessions, Some(&token), json, body)
        .await;
    assert_ne!(fits.status(), 413, "a 15 KiB body was refused");
    assert!(fits.status().as_u16() < 500, "{}", fits.status());

    // Moneta has the same limit; the point of the edge one is that an
    // oversized body never costs the service anything.
    let (echo, nginx) = echo_behind(|o| o).await;
    let too_big = public_api(&nginx)
        .send_raw(Method::POST, sessions, None, json, vec![b' '; 17 * 1024])
        .await;
    assert_error(too_big, 413, "payload_too_large").await;
    assert_eq!(
        echo.requests.load(Ordering::SeqCst),
        0,
        "the oversized body was forwarded"
    );
}

#[tokio::test]
async fn licence_requests_pass_with_bodies_up_to_64_kib() {
    // Moneta as the licence proxy (CONTRACT section 8) behind the edge.
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = dir.path().join("keys.json");
    std::fs::write(
        &keys,
        r#"{"keys": [{"key_id": "0123abcd0123abcd0123abcd0123abcd", "key": "6d6f6e6574612d6465762d6b65792121"}]}"#,
    )
    .expect("keys file");
    let origin = "https://player.example.test";
    let moneta = SnapshotMoneta::start(&[
        ("MONETA_DRM_PROXY", "true".to_owned()),
        ("MONETA_DRM_TOKEN_SECRET", "edge-drm-secret".to_owned()),
        ("MONETA_PUBLIC_BASE_URL", "https://play.example.test".to_owned()),
        ("MONETA_DRM_CLEARKEY_KEYS_FILE", keys.display().to_string()),
        ("MONETA_CORS_ALLOWED_ORIGINS", origin.to_owned()),
    ]);
    let nginx = Nginx::start(NginxOptions::new(format!("127.0.0.1:{}", moneta.process.port)));
    let edge = public_api(&nginx);
    let licences = "/v1/licenses/clearkey";

    // Browsers' preflights and Moneta's own answers pass untouched.
    let preflight = PublicApi::send(
        edge.request(Method::OPTIONS, licences, None)
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "authorization"),
    )
    .await;
    assert_eq!(preflight.status(), 204);
    assert_eq!(
        preflight
            .headers()
            .get("access-control-allow-origin")
            .and_then(|v| v.to_str().ok()),
        Some(origin)
    );
    let token = token();
    let started: Value = edge
        .start_session(&token, "m-0001", "tv-edge")
        .await
        .json()
        .await
        .expect("session start");
    let licence_token = started["playback"]["streams"][0]["drm"]["license_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no licence token: {started}"))
        .to_owned();
    let license_url = started["playback"]["streams"][0]["drm"]["license_url"].clone();
    assert_eq!(license_url, "https://play.example.test/v1/licenses/widevine");
    // The snapshot's key id is not the one this token would need.
    let denied = edge
        .send_raw(
            Method::POST,
            licences,
            Some(&licence_token),
            "application/json",
            r#"{"kids": ["ASOrzQEjq80BI6vNASOrzQ"], "type": "temporary"}"#,
        )
        .await;
    assert_error(denied, 403, "license_denied").await;

    // 64 KiB reaches Moneta, which judges it (here: no token); everywhere
    // else 16 KiB stays the limit.
    let octets = "application/octet-stream";
    let fits = edge
        .send_raw(Method::POST, licences, None, octets, vec![b'c'; 64 * 1024])
        .await;
    assert_error(fits, 401, "missing_token").await;
    let sessions = edge
        .send_raw(
            Method::POST,
            "/v1/playback/sessions",
            Some(&token),
            "application/json",
            vec![b' '; 17 * 1024],
        )
        .await;
    assert_error(sessions, 413, "payload_too_large").await;

    // Over 64 KiB never reaches the upstream.
    let (echo, nginx) = echo_behind(|o| o).await;
    let edge = public_api(&nginx);
    let too_big = edge
        .send_raw(Method::POST, licences, None, octets, vec![b'c'; 64 * 1024 + 1])
        .await;
    assert_error(too_big, 413, "payload_too_large").await;
    assert_eq!(
        echo.requests.load(Ordering::SeqCst),
        0,
        "the oversized body was forwarded"
    );
    for path in ["/v1/licenses", "/v1/licenses/", "/v1/licenses/clearkey/extra"] {
        let response = PublicApi::send(edge.request(Method::POST, path, None)).await;
        assert_error(response, 404, "not_found").await;
    }
    let allowed = PublicApi::send(
        edge.request(Method::POST, "/v1/licenses/widevine", None)
            .body("c"),
    )
    .await;
    assert_eq!(allowed.status(), 200, "the route is on the allow-list");
    assert_eq!(echo.requests.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn bursts_over_the_rate_limit_get_429_json() {
    // One request a minute: nothing refills while the test runs, however
    // slow the machine, so the counts below are exact.
    let (_moneta, nginx) = moneta_behind(|o| o.rate_limit("1r/m", 5));
    let edge = public_api(&nginx);

    let mut statuses = Vec::new();
    let mut limited = None;
    for _ in 0..30 {
        let response = edge.get_anonymously("/health/live").await;
        statuses.push(response.status().as_u16());
        if response.status() == 429 && limited.is_none() {
            limited = Some(response);
        }
    }
    let passed = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    // The first request, then the burst of five; everything after is excess.
    assert_eq!(
        &statuses[..6],
        &[200; 6],
        "the burst itself must pass: {statuses:?}"
    );
    assert_eq!(passed, 6, "{statuses:?}");
    assert_eq!(
        refused,
        statuses.len() - 6,
        "the excess must be refused: {statuses:?}"
    );

    let limited = limited.expect("a 429");
    assert!(limited.headers().contains_key("retry-after"));
    assert_eq!(request_ids(&limited).len(), 1);
    assert_error(limited, 429, "rate_limited").await;

    nginx.wait_for_access_log("a REJECTED line", |lines| {
        lines
            .iter()
            .any(|l| l["limit_req_status"] == "REJECTED" && l["status"] == 429)
    });
}

#[tokio::test]
async fn server_version_is_hidden_and_request_ids_are_set_or_kept() {
    let (_moneta, nginx) = moneta_behind(|o| o);
    let edge = public_api(&nginx);

    for path in ["/health/live", "/metrics"] {
        let response = edge.get_anonymously(path).await;
        let server = response
            .headers()
            .get("server")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        assert!(
            !server.contains('/') && !server.chars().any(|c| c.is_ascii_digit()),
            "{path}: Server header reveals a version: {server:?}"
        );

        // Absent: one is set, whether Moneta or nginx itself answered.
        let ids = request_ids(&response);
        assert_eq!(ids.len(), 1, "{path}: {ids:?}");
        assert!(!ids[0].is_empty());

        // Sent and sane: kept.
        let kept = edge
            .get_with(path, None, &[("x-request-id", "edge-test.42:a_b")])
            .await;
        assert_eq!(request_ids(&kept), ["edge-test.42:a_b"], "{path}");

        // Sent but not sane: replaced, never echoed.
        let insane = "x".repeat(300);
        let replaced = edge.get_with(path, None, &[("x-request-id", &insane)]).await;
        let ids = request_ids(&replaced);
        assert_eq!(ids.len(), 1, "{path}: {ids:?}");
        assert_ne!(ids[0], insane, "{path}");
    }

    // The JSON access log carries the id the client was given.
    let response = edge
        .get_with("/openapi.json", None, &[("x-request-id", "edge-access-log-1")])
        .await;
    assert_eq!(response.status(), 200);
    let lines = nginx.wait_for_access_log("edge-access-log-1", |lines| {
        lines.iter().any(|l| l["request_id"] == "edge-access-log-1")
    });
    let line = lines
        .iter()
        .find(|l| l["request_id"] == "edge-access-log-1")
        .unwrap();
    assert_eq!(line["status"], 200);
    assert_eq!(line["uri"], "/openapi.json");
    assert_eq!(line["method"], "GET");
    assert!(line["request_time"].is_number(), "{line}");
}

// ---------------------------------------------------------------------------
// What nginx forwards (echo upstream)

#[tokio::test]
async fn everything_outside_the_allow_list_is_a_json_404_and_never_forwarded() {
    let (echo, nginx) = echo_behind(|o| o).await;
    let edge = public_api(&nginx);

    let denied = [
        "/",
        "/metrics",
        "/admin",
        "/v2/x",
        "/v1",
        "/v1/",
        "/v1/contents",
        "/v1/contents/m-0001",
        "/v1/contents/m-0001/playback-info/",
        "/v1/contents/m-0001/playback-info/extra",
        "/v1/playback/sessions/abc/extra",
        "/health",
        "/health/",
        "/health/startup",
        "/openapi.yaml",
        "/_edge/bad-request",
        "/v1/contents/../../metrics",
        "/%2e%2e/metrics",
    ];
    for path in denied {
        for method in [Method::GET, Method::POST, Method::PATCH] {
            let response = PublicApi::send(edge.request(method.clone(), path, None)).await;
            assert_eq!(request_ids(&response).len(), 1, "{method} {path}");
            assert_error(response, 404, "not_found").await;
        }
    }
    assert_eq!(
        echo.requests.load(Ordering::SeqCst),
        0,
        "a denied path reached the upstream"
    );

    // Errors nginx raises before routing are JSON too.
    let trace = Method::from_bytes(b"TRACE").unwrap();
    let trace = PublicApi::send(edge.request(trace, "/health/live", None)).await;
    assert_error(trace, 405, "method_not_allowed").await;

    let garbage = raw_exchange(nginx.port, b"GARBAGE\r\n\r\n");
    assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");
    assert!(garbage.contains("\"code\":\"bad_request\""), "{garbage}");
    assert!(!garbage.contains("<html>"), "{garbage}");

    // The allowed routes do reach it.
    let allowed = edge.get_anonymously("/health/live").await;
    assert_eq!(allowed.status(), 200);
    assert_eq!(echo.requests.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn forwarding_headers_are_set_by_nginx_not_taken_from_the_client() {
    let (_echo, nginx) = echo_behind(|o| o).await;
    let edge = public_api(&nginx);

    let spoofed = [
        ("x-forwarded-for", "6.6.6.6"),
        ("x-real-ip", "6.6.6.6"),
        ("forwarded", "for=6.6.6.6"),
        ("x-forwarded-host", "evil.example"),
        ("x-forwarded-proto", "https"),
    ];
    let response = edge.get_with("/health/live", None, &spoofed).await;
    assert_eq!(response.status(), 200);
    assert!(
        !response.headers().contains_key("x-powered-by"),
        "upstream banner leaked"
    );
    assert!(!response.headers().contains_key("x-runtime"));
    let nginx_id = request_ids(&response);
    let seen: Value = response.json().await.unwrap();
    let headers = &seen["headers"];

    assert_eq!(headers["x-forwarded-for"], json!(["127.0.0.1"]), "{seen}");
    assert_eq!(headers["x-real-ip"], json!(["127.0.0.1"]), "{seen}");
    for smuggled in ["forwarded", "x-forwarded-host", "x-forwarded-proto"] {
        assert!(headers[smuggled].is_null(), "{smuggled} reached upstream: {seen}");
    }
    // The id nginx generated is the one Moneta would log, and the one the
    // client got back.
    assert_eq!(headers["x-request-id"], json!(nginx_id), "{seen}");
    assert_eq!(headers["connection"], Value::Null, "{seen}");

    let with_id = edge
        .get_with("/health/live", None, &[("x-request-id", "client-chosen-1")])
        .await;
    let seen: Value = with_id.json().await.unwrap();
    assert_eq!(seen["headers"]["x-request-id"], json!(["client-chosen-1"]));
}

#[tokio::test]
async fn only_a_trusted_load_balancer_can_name_the_client() {
    // The test client itself plays the load balancer here.
    let (_echo, nginx) = echo_behind(|o| o.trust_proxy("127.0.0.1/32")).await;
    let edge = public_api(&nginx);

    // What a balancer produces when a client spoofs the header: the client's
    // claim first, the address the balancer saw appended last.
    let seen: Value = edge
        .get_with(
            "/health/live",
            None,
            &[("x-forwarded-for", "6.6.6.6, 203.0.113.7")],
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(seen["headers"]["x-forwarded-for"], json!(["203.0.113.7"]));

    nginx.wait_for_access_log("the balancer-reported client", |lines| {
        lines.iter().any(|l| l["remote_addr"] == "203.0.113.7")
    });
}

#[tokio::test]
async fn upstream_connections_are_kept_alive() {
    let (echo, nginx) = echo_behind(|o| o).await;
    let edge = public_api(&nginx);

    for _ in 0..20 {
        let response = edge.get_anonymously("/health/live").await;
        assert_eq!(response.status(), 200);
        let _ = response.bytes().await.unwrap();
    }
    assert_eq!(echo.requests.load(Ordering::SeqCst), 20);
    let connections = echo.connections.load(Ordering::SeqCst);
    assert!(
        connections <= 2,
        "20 sequential requests used {connections} upstream connections"
    );
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_json_502() {
    let nobody_listens = support::refused_port();
    let nginx = Nginx::start(NginxOptions::new(format!("127.0.0.1:{nobody_listens}")));
    let response = public_api(&nginx)
        .get_anonymously("/v1/contents/m-0001/playback-info")
        .await;
    assert!(response.headers().contains_key("retry-after"));
    assert_eq!(request_ids(&response).len(), 1);
    assert_error(response, 502, "bad_gateway").await;
}

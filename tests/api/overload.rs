//! CONTRACT §9, overload: with a small fixed limit, requests held in flight
//! fill it, and what comes next is admitted or answered `503 overloaded`
//! at once by its priority. Requests are held in flight deterministically:
//! by a body that is still on its way (Moneta admitted the request and waits
//! for the rest), and, in `under_fault`, by a frozen Redis.
//!
//! Nothing here measures time; the figures are `scripts/bench`'s (overload
//! scenario, docs/performance.md). The tests in `under_fault` pause Redis and
//! run in nextest's serial group (`.config/nextest.toml`).

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{TestApp, connect, exchange, spawn_app_with};
use crate::support::{PATIENCE, assert_error, eventually, metric_value};

const SESSION_ROUTE: &str = "/v1/playback/sessions/{session_id}";

/// Limit 4: heartbeats are admitted while fewer than 2 requests are in
/// flight, stops while fewer than 3, starts and playback-info while fewer
/// than 4.
const SMALL_LIMIT: &[(&str, &str)] = &[
    ("MONETA_OVERLOAD_LIMIT", "4"),
    // Held requests wait for their bodies longer than the test takes.
    ("MONETA_REQUEST_TIMEOUT_MS", "60000"),
];

/// A request whose head and first body byte were sent; the rest waits for
/// [`Held::finish`]. Moneta has admitted it (or refused it) by then.
struct Held {
    stream: TcpStream,
    rest: Vec<u8>,
}

impl Held {
    async fn send(app: &TestApp, method: &str, path: &str, token: &str, body: &Value) -> Held {
        let mut stream = connect(app).await;
        let body = body.to_string().into_bytes();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await.expect("head");
        stream.write_all(&body[..1]).await.expect("first body byte");
        Held {
            stream,
            rest: body[1..].to_vec(),
        }
    }

    async fn heartbeat(app: &TestApp, token: &str, session_id: &str, position_ms: u64) -> Held {
        let path = format!("/v1/playback/sessions/{session_id}");
        Held::send(
            app,
            "PUT",
            &path,
            token,
            &json!({"position_ms": position_ms, "state": "playing"}),
        )
        .await
    }

    async fn start(app: &TestApp, token: &str, device_id: &str) -> Held {
        let body = json!({"content_id": "m-0001", "device_id": device_id});
        Held::send(app, "POST", "/v1/playback/sessions", token, &body).await
    }

    /// Sends the rest of the body; the answer's status.
    async fn finish(mut self) -> u16 {
        self.stream.write_all(&self.rest).await.expect("rest of the body");
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        tokio::time::timeout(PATIENCE, async {
            while !head.windows(2).any(|w| w == b"\r\n") {
                let n = self.stream.read(&mut buf).await.expect("read answer");
                assert!(n > 0, "closed without an answer");
                head.extend_from_slice(&buf[..n]);
            }
        })
        .await
        .expect("an answer");
        let line = String::from_utf8_lossy(&head);
        line[9..12].parse().expect("a status")
    }
}

async fn metric(app: &TestApp, series: &str) -> Option<f64> {
    metric_value(&app.metrics().await, series)
}

/// Waits until Moneta counts exactly `n` admitted requests in flight.
async fn in_flight_reaches(app: &TestApp, n: f64) {
    let reached = eventually(PATIENCE, async || {
        (metric(app, "moneta_overload_in_flight").await == Some(n)).then_some(())
    })
    .await;
    assert!(
        reached.is_some(),
        "in flight never reached {n}: {:?}",
        metric(app, "moneta_overload_in_flight").await
    );
}

/// Asserts `503 overloaded` with a `Retry-After` of whole seconds; returns
/// them. A refused heartbeat keeps its connection (read again at a pace,
/// `http/pacing.rs`); any other refusal closes it, so the viewer retries on
/// a fresh one.
async fn assert_overloaded(resp: reqwest::Response, connection: Refused) -> u64 {
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    assert!(
        resp.headers().contains_key("x-request-id"),
        "a refusal has a request id too"
    );
    let close = resp.headers().get("connection").and_then(|v| v.to_str().ok());
    match connection {
        Refused::Kept => assert_eq!(close, None, "a refused heartbeat keeps its connection"),
        Refused::Closed => assert_eq!(
            close,
            Some("close"),
            "a refused viewer retries on a fresh connection"
        ),
    }
    assert_error(resp, 503, "overloaded").await;
    retry_after.expect("503 overloaded without a Retry-After in seconds")
}

#[derive(Clone, Copy)]
enum Refused {
    Kept,
    Closed,
}

/// A user of its own with one live session, and its token.
async fn watching(app: &TestApp, user: &str) -> (String, String) {
    let token = app.token(user, "standard", 2, "KR");
    let id = app.started_session(&token, "m-0001", "tv").await;
    (token, id)
}

/// Two heartbeats of other viewers held in flight: the heartbeats' share
/// of limit 4 is taken.
async fn hold_the_heartbeats_share(app: &TestApp) -> Vec<Held> {
    let mut held = Vec::new();
    for n in 0..2 {
        let (token, id) = watching(app, &format!("load-holder-{n}")).await;
        held.push(Held::heartbeat(app, &token, &id, 1_000_000).await);
    }
    in_flight_reaches(app, 2.0).await;
    held
}

#[tokio::test]
async fn a_flood_of_heartbeats_is_shed_first_while_playback_info_and_starts_are_admitted() {
    let app = spawn_app_with(SMALL_LIMIT).await;
    let (token, id) = watching(&app, "u-premium").await;
    let held = hold_the_heartbeats_share(&app).await;

    let flood: Vec<_> = (0..40u64)
        .map(|n| {
            let (api, token, id) = (app.public.clone(), token.clone(), id.clone());
            tokio::spawn(async move { api.heartbeat(&token, &id, 2_000_000 + n).await })
        })
        .collect();
    for heartbeat in flood {
        let retry_after = assert_overloaded(heartbeat.await.expect("heartbeat"), Refused::Kept).await;
        assert!(
            (1..=30).contains(&retry_after),
            "a heartbeat comes back within its interval: {retry_after}"
        );
    }

    // What a viewer waits on is still admitted, and answered.
    let info = app.playback_info("m-0001", &token).await;
    assert_eq!(info.status(), 200);
    let start = app.start_session(&token, "m-0001", "phone").await;
    assert_eq!(
        start.status(),
        201,
        "a start is admitted where heartbeats are not"
    );

    // A start held too: stops are refused now, playback-info still admitted.
    let held_start = Held::start(&app, &token, "laptop").await;
    in_flight_reaches(&app, 3.0).await;
    assert_overloaded(app.stop_session(&token, &id).await, Refused::Closed).await;
    assert_eq!(app.playback_info("m-0001", &token).await.status(), 200);

    let shed = metric(
        &app,
        &format!("moneta_requests_shed_total{{route=\"{SESSION_ROUTE}\"}}"),
    )
    .await;
    assert_eq!(shed, Some(41.0), "40 heartbeats and a stop");
    assert_eq!(metric(&app, "moneta_overload_limit").await, Some(4.0));

    // Once the held requests are answered, heartbeats are admitted again.
    assert_eq!(held_start.finish().await, 201);
    for h in held {
        assert_eq!(h.finish().await, 200);
    }
    in_flight_reaches(&app, 0.0).await;
    assert_eq!(app.heartbeat(&token, &id, 3_000_000).await.status(), 200);
}

/// A client that ignores `Retry-After` and sends its next heartbeat at once
/// on the same connection is read again only after the pace; a viewer's
/// request on that connection (behind a proxy that reuses it) is admitted.
#[tokio::test]
async fn a_heartbeat_resent_at_once_waits_the_pace_on_its_kept_connection() {
    let app = spawn_app_with(SMALL_LIMIT).await;
    let (token, id) = watching(&app, "u-standard").await;
    let held = hold_the_heartbeats_share(&app).await;

    let mut stream = connect(&app).await;
    let body = json!({"position_ms": 2_000_000, "state": "playing"}).to_string();
    let heartbeat = format!(
        "PUT /v1/playback/sessions/{id} HTTP/1.1\r\nHost: moneta\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    // Before the first is sent, so before it is refused: the pace counts
    // from the refusal, and this bound holds on any machine.
    let sent = std::time::Instant::now();
    let (status, head) = exchange(&mut stream, &heartbeat).await;
    assert_eq!(status, 503, "{head}");
    assert!(!head.contains("connection: close"), "{head}");
    let (status, head) = exchange(&mut stream, &heartbeat).await;
    assert_eq!(status, 503, "still over the heartbeats' share: {head}");
    assert!(
        sent.elapsed() >= moneta::http::pacing::PACE,
        "the second heartbeat was answered {:?} after the first was sent",
        sent.elapsed()
    );

    let info = format!(
        "GET /v1/contents/m-0001/playback-info HTTP/1.1\r\nHost: moneta\r\nAuthorization: Bearer {token}\r\n\r\n"
    );
    let (status, head) = exchange(&mut stream, &info).await;
    assert_eq!(status, 200, "a viewer's request on the paced connection: {head}");

    for h in held {
        assert_eq!(h.finish().await, 200);
    }
}

#[tokio::test]
async fn health_openapi_and_preflights_are_never_shed() {
    let origin = "https://player.example.com";
    let mut settings = SMALL_LIMIT.to_vec();
    settings.push(("MONETA_CORS_ALLOWED_ORIGINS", origin));
    let app = spawn_app_with(&settings).await;
    let token = app.token("u-premium", "premium", 4, "KR");
    // Four held starts: the whole limit, nothing ranked is admitted.
    let mut held = Vec::new();
    for n in 0..4 {
        held.push(Held::start(&app, &token, &format!("device-{n}")).await);
    }
    in_flight_reaches(&app, 4.0).await;
    let info = app
        .get_with(
            "/v1/contents/m-0001/playback-info",
            Some(&token),
            &[("origin", origin)],
        )
        .await;
    assert_eq!(
        info.headers()
            .get("access-control-allow-origin")
            .and_then(|v| v.to_str().ok()),
        Some(origin),
        "a browser on an allowed origin can read the refusal and its Retry-After"
    );
    assert_overloaded(info, Refused::Closed).await;

    for path in ["/health/live", "/health/ready", "/openapi.json"] {
        assert_eq!(app.get_anonymously(path).await.status(), 200, "{path}");
    }
    let preflight = app
        .public
        .request(reqwest::Method::OPTIONS, "/v1/playback/sessions", None)
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .send()
        .await
        .expect("preflight");
    assert_eq!(preflight.status(), 204, "a preflight is answered, not shed");

    for h in held {
        assert_eq!(h.finish().await, 201);
    }
    assert_eq!(app.playback_info("m-0001", &token).await.status(), 200);
}

#[tokio::test]
async fn shed_heartbeats_lose_no_position_the_next_accepted_one_carries_it() {
    let app = spawn_app_with(SMALL_LIMIT).await;
    let (token, id) = watching(&app, "u-standard").await;
    assert_eq!(app.heartbeat(&token, &id, 1_000_000).await.status(), 200);

    let held = hold_the_heartbeats_share(&app).await;
    for position in [2_000_000, 2_500_000] {
        assert_overloaded(app.heartbeat(&token, &id, position).await, Refused::Kept).await;
    }
    for h in held {
        assert_eq!(h.finish().await, 200);
    }
    in_flight_reaches(&app, 0.0).await;

    // The player plays on and sends its next heartbeat after Retry-After.
    assert_eq!(app.heartbeat(&token, &id, 3_000_000).await.status(), 200);
    app.api.assert_receives_position("u-standard", 3_000_000).await;
    let info = app.playback_info_json("m-0001", &token).await;
    assert_eq!(info["resume_position_ms"], 3_000_000, "{info}");
    // A refusal wrote nothing.
    let refused: Vec<Value> = app
        .api
        .delivered()
        .into_iter()
        .filter(|i| {
            i["user_id"] == "u-standard"
                && i["position_ms"]
                    .as_u64()
                    .is_some_and(|p| (2_000_000..3_000_000).contains(&p))
        })
        .collect();
    assert!(refused.is_empty(), "{refused:?}");
}

#[tokio::test]
async fn the_limit_is_adaptive_by_default_and_off_admits_everything() {
    let app = spawn_app_with(&[]).await;
    assert_eq!(
        metric(&app, "moneta_overload_limit").await,
        Some(256.0),
        "adaptive, starting at a quarter of MONETA_OVERLOAD_MAX_LIMIT"
    );
    app.shutdown().await;

    let app = spawn_app_with(&[
        ("MONETA_OVERLOAD_LIMIT", "off"),
        ("MONETA_REQUEST_TIMEOUT_MS", "60000"),
    ])
    .await;
    assert_eq!(metric(&app, "moneta_overload_limit").await, Some(0.0));
    let (token, id) = watching(&app, "u-standard").await;
    let mut held = Vec::new();
    for n in 0..10 {
        let (token, id) = watching(&app, &format!("load-holder-{n}")).await;
        held.push(Held::heartbeat(&app, &token, &id, 1_000_000).await);
    }
    let all_in = eventually(PATIENCE, async || {
        (metric(&app, "moneta_http_requests_in_flight").await == Some(10.0)).then_some(())
    })
    .await;
    assert!(all_in.is_some(), "the held heartbeats were not all in flight");
    assert_eq!(app.heartbeat(&token, &id, 1_000_000).await.status(), 200);
    for h in held {
        assert_eq!(h.finish().await, 200);
    }
}

mod under_fault {
    use super::*;

    /// Redis frozen with a long timeout: heartbeats pile up on it, as on any
    /// slow dependency, until they fill their share; then the flood is
    /// refused at once while a viewer's playback-info and start are still
    /// admitted (and answered, from fallbacks, once the timeout passes).
    #[tokio::test]
    async fn heartbeats_piling_up_on_a_frozen_redis_are_shed_while_play_is_admitted() {
        let mut settings = SMALL_LIMIT.to_vec();
        settings.push(("MONETA_REDIS_TIMEOUT_MS", "5000"));
        let app = spawn_app_with(&settings).await;
        let viewers = [watching(&app, "load-a").await, watching(&app, "load-b").await];
        let (token, id) = watching(&app, "u-premium").await;

        app.redis.pause();
        let piled: Vec<_> = viewers
            .iter()
            .cloned()
            .map(|(token, id)| {
                let api = app.public.clone();
                tokio::spawn(async move { api.heartbeat(&token, &id, 1_500_000).await.status() })
            })
            .collect();
        in_flight_reaches(&app, 2.0).await;

        for n in 0..20 {
            assert_overloaded(app.heartbeat(&token, &id, 2_000_000 + n).await, Refused::Kept).await;
        }
        assert!(
            piled.iter().all(|h| !h.is_finished()),
            "the refusals came while the piled-up heartbeats still waited on Redis"
        );
        assert_eq!(app.get_anonymously("/health/ready").await.status(), 200);

        let (info, start) = tokio::join!(
            app.playback_info("m-0001", &token),
            app.start_session(&token, "m-0001", "phone"),
        );
        assert_eq!(info.status(), 200, "playback-info admitted and answered");
        assert_eq!(start.status(), 201, "a start admitted and answered");

        app.redis.resume();
        for heartbeat in piled {
            assert_eq!(heartbeat.await.expect("heartbeat"), 200);
        }
        in_flight_reaches(&app, 0.0).await;
        assert_eq!(app.heartbeat(&token, &id, 3_000_000).await.status(), 200);
        app.api.assert_receives_position("u-premium", 3_000_000).await;
    }
}

/// At `MONETA_MAX_CONNECTIONS` a new connection waits in the listen
/// backlog; the connections that sit idle between requests (a player's,
/// between heartbeats) close to make room for it, instead of holding their
/// places for the whole keep-alive idle time (75 s).
#[tokio::test]
async fn at_the_connection_limit_idle_keep_alive_connections_make_room() {
    let app = spawn_app_with(&[("MONETA_MAX_CONNECTIONS", "2")]).await;
    let mut idle = Vec::new();
    for _ in 0..2 {
        let mut stream = connect(&app).await;
        stream
            .write_all(b"GET /health/live HTTP/1.1\r\nHost: moneta\r\n\r\n")
            .await
            .expect("request");
        let mut answer = [0u8; 1024];
        let n = stream.read(&mut answer).await.expect("answer");
        assert!(
            answer[..n].starts_with(b"HTTP/1.1 200"),
            "{:?}",
            String::from_utf8_lossy(&answer[..n])
        );
        idle.push(stream);
    }

    // A third client, on a connection of its own, is answered well before
    // an idle connection would have timed out…
    let third = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .expect("client");
    let status = third
        .get(format!("{}/health/live", app.address))
        .send()
        .await
        .expect("the third connection is answered while two idle ones held the limit")
        .status();
    assert_eq!(status, 200);
    // …because the idle ones were closed.
    let closed = eventually(PATIENCE, async || {
        for stream in &mut idle {
            let mut byte = [0u8; 1];
            if let Ok(Ok(0)) =
                tokio::time::timeout(std::time::Duration::from_millis(50), stream.read(&mut byte)).await
            {
                return Some(());
            }
        }
        None
    })
    .await;
    assert!(closed.is_some(), "no idle connection was closed");
}

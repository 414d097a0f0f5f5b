use reqwest::Method;
use serde_json::Value;

use crate::helpers::{spawn_app, spawn_app_with};
use crate::support::{self, Fault, PublicApi, assert_error};

#[tokio::test]
async fn answers_the_contract_shape() {
    let app = spawn_app().await;
    let token = app.token("u-basic", "basic", 1, "KR");
    let resp = app.playback_info("m-0001", &token).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().contains_key("x-request-id"));
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["content_id"], "m-0001");
    assert_eq!(body["duration_ms"], 7_920_000);
    assert_eq!(body["degraded"], false);
    assert_eq!(body["resume_position_ms"], 0);
    let dash = &body["streams"][0];
    assert_eq!(dash["protocol"], "dash");
    assert_eq!(dash["url"], "https://cdn.example.com/m-0001/dash/manifest.mpd");
    assert_eq!(dash["drm"]["system"], "widevine");
    assert_eq!(dash["drm"]["license_url"], "https://drm.example.com/widevine");
    assert_eq!(dash["drm"]["key_id"], "0123abcd");
    assert!(body["streams"][1]["drm"].is_null());
    assert_eq!(
        body["subtitles"][0]["url"],
        "https://cdn.example.com/m-0001/subs/ko.vtt"
    );
    // The internal API got our bearer token and the request id.
    assert!(
        app.api
            .state
            .authorizations
            .lock()
            .unwrap()
            .iter()
            .all(|a| a == "Bearer internal-token")
    );
    assert!(!app.api.state.request_ids.lock().unwrap().is_empty());
}

#[tokio::test]
async fn invalid_content_id_is_400_and_unknown_content_404() {
    let app = spawn_app().await;
    let token = app.token("u-basic", "basic", 1, "KR");
    let long = "x".repeat(65);
    for (id, status, code) in [
        ("bad.id", 400, "invalid_content_id"),
        ("a%20b", 400, "invalid_content_id"),
        (long.as_str(), 400, "invalid_content_id"),
        ("m-9999", 404, "content_not_found"),
    ] {
        let resp = app.playback_info(id, &token).await;
        assert_error(resp, status, code).await;
    }
}

#[tokio::test]
async fn entitlement_rules_give_403s() {
    let app = spawn_app().await;
    let cases = [
        ("u-nobody", "basic", "m-0001", "KR", "no_entitlement"),
        ("u-inactive", "standard", "m-0001", "KR", "subscription_inactive"),
        ("u-standard", "standard", "m-0002", "KR", "plan_not_eligible"),
        ("u-basic", "basic", "m-0003", "JP", "region_unavailable"),
    ];
    for (user, plan, content, country, code) in cases {
        let resp = app
            .playback_info(content, &app.token(user, plan, 1, country))
            .await;
        assert_eq!(resp.status(), 403, "{user} {content}");
        assert_error(resp, 403, code).await;
    }
    // The entitlement decides, not the token's claim: premium in the token does not help.
    let resp = app
        .playback_info("m-0002", &app.token("u-standard", "premium", 1, "KR"))
        .await;
    assert_eq!(resp.status(), 403);
    assert_eq!(
        app.playback_info("m-0002", &app.token("u-premium", "premium", 4, "KR"))
            .await
            .status(),
        200
    );
    assert_eq!(
        app.playback_info("m-0003", &app.token("u-basic", "basic", 1, "KR"))
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn redis_is_read_first() {
    // No in-process copy: the second read must come from Redis.
    let app = spawn_app_with(&[("MONETA_CONTENT_LOCAL_TTL_MS", "1")]).await;
    let token = app.token("u-basic", "basic", 1, "KR");
    assert_eq!(app.playback_info("m-0001", &token).await.status(), 200);
    let after_first = app.api.total_calls();
    assert_eq!(app.api.content_calls(), 1);
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    for _ in 0..3 {
        assert_eq!(app.playback_info("m-0001", &token).await.status(), 200);
    }
    assert_eq!(app.api.content_calls(), 1);
    assert_eq!(
        app.api.total_calls(),
        after_first,
        "warm reads must not call the internal API"
    );
}

#[tokio::test]
async fn internal_api_down_without_fallback_is_503() {
    let app = spawn_app().await;
    app.api.set_fault(Fault::Status500);
    let resp = app
        .playback_info("m-0001", &app.token("u-basic", "basic", 1, "KR"))
        .await;
    assert!(resp.headers().contains_key("retry-after"));
    assert_error(resp, 503, "dependency_unavailable").await;
}

#[tokio::test]
async fn internal_api_down_serves_the_snapshot_and_claims_degraded() {
    let dir = tempfile::tempdir().unwrap();
    let snapshot = support::write_snapshot(dir.path());
    let snapshot = snapshot.display().to_string();
    let app = spawn_app_with(&[("MONETA_FALLBACK_CATALOG_FILE", &snapshot)]).await;
    app.api.set_fault(Fault::Status500);
    let resp = app
        .playback_info("m-0001", &app.token("u-basic", "basic", 1, "KR"))
        .await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["degraded"], true);
    assert_eq!(body["content_id"], "m-0001");
}

#[tokio::test]
async fn stale_copy_serves_when_the_api_fails_later() {
    let app = spawn_app_with(&[
        ("MONETA_CONTENT_TTL_S", "1"),
        ("MONETA_CONTENT_LOCAL_TTL_MS", "1"),
    ])
    .await;
    let token = app.token("u-basic", "basic", 1, "KR");
    assert_eq!(app.playback_info("m-0001", &token).await.status(), 200);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    app.api.set_fault(Fault::Status500);
    let body = app.playback_info_json("m-0001", &token).await;
    assert_eq!(body["degraded"], true, "stale title and claims-based entitlement");
    assert_eq!(body["title"], "Title m-0001");
}

#[tokio::test]
async fn request_ids_are_kept_when_sane_and_replaced_otherwise() {
    let app = spawn_app().await;
    let token = app.token("u-basic", "basic", 1, "KR");
    let path = "/v1/contents/m-0001/playback-info";
    let with_id = async |id: &str| app.get_with(path, Some(&token), &[("x-request-id", id)]).await;
    let resp = with_id("client-abc.123").await;
    assert_eq!(resp.headers()["x-request-id"], "client-abc.123");
    assert!(
        app.api
            .state
            .request_ids
            .lock()
            .unwrap()
            .contains(&"client-abc.123".to_owned())
    );
    let resp = with_id("bad id <script>").await;
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_ne!(id, "bad id <script>");
    assert!(!id.is_empty());
}

#[tokio::test]
async fn unknown_route_and_wrong_method_are_json() {
    let app = spawn_app().await;
    let token = app.token("u-basic", "basic", 1, "KR");
    let resp = app.get("/v1/nothing-here", &token).await;
    assert_error(resp, 404, "not_found").await;
    let post = app.request(Method::POST, "/v1/contents/m-0001/playback-info", Some(&token));
    let resp = PublicApi::send(post).await;
    assert_error(resp, 405, "method_not_allowed").await;
}

/// The internal API joins the caller's trace whether or not spans are
/// exported (none are here): `traceparent` carries the caller's trace id and
/// sampling decision on (CONTRACT §5).
#[tokio::test]
async fn the_internal_api_gets_the_callers_trace() {
    let app = spawn_app().await;
    let token = app.token("u-premium", "premium", 4, "KR");
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traceparent = format!("00-{trace_id}-00f067aa0ba902b7-01");
    let resp = app
        .get_with(
            "/v1/contents/m-0001/playback-info",
            Some(&token),
            &[("traceparent", &traceparent)],
        )
        .await;
    assert_eq!(resp.status(), 200);
    let seen = app.api.traceparents();
    assert!(
        !seen.is_empty(),
        "the internal API was asked without a traceparent"
    );
    for sent in &seen {
        let parts: Vec<&str> = sent.split('-').collect();
        assert_eq!(parts.len(), 4, "{sent}");
        assert_eq!(parts[1], trace_id, "{sent}");
        assert_ne!(
            parts[2], "00f067aa0ba902b7",
            "Moneta's own span is the parent: {sent}"
        );
        assert_eq!(parts[3], "01", "the caller's sampling decision: {sent}");
    }
}

use reqwest::Method;
use serde_json::json;

use crate::helpers::{BATCH, assert_error, playback_path, send, spawn_app_with_token};

const TOKEN: &str = "test-token-9f3a";

#[tokio::test]
async fn internal_routes_require_the_token_when_configured() {
    let app = spawn_app_with_token(TOKEN).await;
    internal_api::seed::apply(&app.db).await.expect("seed");
    let path = playback_path("m-0001");

    let body = app.get_error(&path, 401, "missing_token").await;
    assert!(!body.to_string().contains(TOKEN));

    let response = send(app.request(Method::GET, &path).bearer_auth("wrong-token")).await;
    assert_eq!(
        response.headers()["www-authenticate"],
        "Bearer error=\"invalid_token\""
    );
    assert_error(response, 401, "invalid_token").await;

    let basic = app
        .request(Method::GET, &path)
        .header("authorization", format!("Basic {TOKEN}"));
    assert_error(send(basic).await, 401, "missing_token").await;

    let response = send(app.request(Method::GET, &path).bearer_auth(TOKEN)).await;
    assert_eq!(response.status().as_u16(), 200);

    // Writes are protected too, and a rejected write stores nothing.
    let batch = json!({"items": [{
        "user_id": "u1", "content_id": "m-0001", "position_ms": 1,
        "updated_at": "2026-01-01T00:00:00Z"}]});
    assert_error(app.post_batch(&batch).await, 401, "missing_token").await;
    assert_eq!(app.progress_rows().await, 0);
    let response = send(app.request(Method::POST, BATCH).bearer_auth(TOKEN).json(&batch)).await;
    assert_eq!(response.status().as_u16(), 204);
    assert_eq!(app.progress_rows().await, 1);
}

#[tokio::test]
async fn health_needs_no_token() {
    let app = spawn_app_with_token(TOKEN).await;
    assert_eq!(app.get("/health").await.status().as_u16(), 200);
}

use reqwest::Method;
use serde_json::json;

use crate::helpers::{assert_error, playback_path, send, spawn_app, traced};

#[tokio::test]
async fn health_reports_ok_when_the_database_answers() {
    let app = spawn_app().await;
    assert_eq!(app.get_json("/health").await, json!({"status": "ok"}));
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json_errors() {
    let app = spawn_app().await;
    app.get_error("/nope", 404, "not_found").await;
    app.get_error("/internal/v1/contents", 404, "not_found").await;
    // The batch route exists, but only for POST.
    app.get_error("/internal/v1/progress:batch", 405, "method_not_allowed")
        .await;
    let response = send(app.request(Method::DELETE, &playback_path("m-0001"))).await;
    assert_error(response, 405, "method_not_allowed").await;
}

#[tokio::test]
async fn request_id_is_echoed_or_generated() {
    let app = spawn_app().await;
    let response = send(traced(app.request(Method::GET, "/health"), "req-abc-123")).await;
    assert_eq!(response.headers()["x-request-id"], "req-abc-123");

    let response = app.get("/health").await;
    let generated = response.headers()["x-request-id"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(uuid::Uuid::parse_str(&generated).is_ok(), "{generated}");

    // An unreasonable id is replaced rather than echoed.
    let unreasonable = "x".repeat(500);
    let response = send(
        app.request(Method::GET, "/health")
            .header("x-request-id", unreasonable),
    )
    .await;
    let replaced = response.headers()["x-request-id"].to_str().expect("ascii");
    assert!(uuid::Uuid::parse_str(replaced).is_ok(), "{replaced}");

    // Errors carry it too.
    let response = send(
        app.request(Method::GET, "/nope")
            .header("x-request-id", "req-404"),
    )
    .await;
    assert_eq!(response.headers()["x-request-id"], "req-404");
}

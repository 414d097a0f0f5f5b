use serde_json::{Value, json};

use crate::helpers::{assert_error, spawn_app};

#[tokio::test]
async fn health_reports_ok_when_the_database_answers() {
    let app = spawn_app().await;
    let response = app.get("/health").await;
    assert_eq!(response.status().as_u16(), 200);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body, json!({"status": "ok"}));
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json_errors() {
    let app = spawn_app().await;
    assert_error(app.get("/nope").await, 404, "not_found").await;
    assert_error(app.get("/internal/v1/contents").await, 404, "not_found").await;
    // The batch route exists, but only for POST.
    assert_error(
        app.get("/internal/v1/progress:batch").await,
        405,
        "method_not_allowed",
    )
    .await;
    let response = app
        .client
        .delete(app.url("/internal/v1/contents/m-0001/playback"))
        .send()
        .await
        .expect("sent");
    assert_error(response, 405, "method_not_allowed").await;
}

#[tokio::test]
async fn request_id_is_echoed_or_generated() {
    let app = spawn_app().await;
    let response = app
        .client
        .get(app.url("/health"))
        .header("x-request-id", "req-abc-123")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .send()
        .await
        .expect("sent");
    assert_eq!(response.headers()["x-request-id"], "req-abc-123");

    let response = app.get("/health").await;
    let generated = response.headers()["x-request-id"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(uuid::Uuid::parse_str(&generated).is_ok(), "{generated}");

    // An unreasonable id is replaced rather than echoed.
    let response = app
        .client
        .get(app.url("/health"))
        .header("x-request-id", "x".repeat(500))
        .send()
        .await
        .expect("sent");
    let replaced = response.headers()["x-request-id"].to_str().expect("ascii");
    assert!(uuid::Uuid::parse_str(replaced).is_ok(), "{replaced}");

    // Errors carry it too.
    let response = app
        .client
        .get(app.url("/nope"))
        .header("x-request-id", "req-404")
        .send()
        .await
        .expect("sent");
    assert_eq!(response.headers()["x-request-id"], "req-404");
}

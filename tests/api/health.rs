use serde_json::Value;

use crate::helpers::spawn_app;

#[tokio::test]
async fn live_and_ready() {
    let app = spawn_app().await;
    assert_eq!(app.get_anonymously("/health/live").await.status(), 200);
    let resp = app.get_anonymously("/health/ready").await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["status"], "ready");
    assert_eq!(body["dependencies"]["redis"], "up");
    assert_eq!(body["dependencies"]["internal_api"], "up");
}

#[tokio::test]
async fn openapi_document_lists_the_routes() {
    let app = spawn_app().await;
    let doc: Value = app.get_anonymously("/openapi.json").await.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/v1/contents/{content_id}/playback-info",
        "/v1/playback/sessions",
        "/v1/playback/sessions/{session_id}",
    ] {
        assert!(doc["paths"][path].is_object(), "{path}");
    }
}

#[tokio::test]
async fn metrics_carry_the_contract_names() {
    let app = spawn_app().await;
    let token = app.token("u-basic", "basic", 1, "KR");
    assert_eq!(app.playback_info("m-0001", &token).await.status(), 200);
    let text = app.metrics().await;
    for name in [
        "moneta_http_requests_total{",
        "moneta_http_request_duration_seconds_bucket{",
        "moneta_dependency_requests_total{",
        "moneta_dependency_request_duration_seconds_bucket{",
        "moneta_circuit_breaker_state{",
        "process_resident_memory_bytes",
        "process_threads",
    ] {
        assert!(text.contains(name), "missing {name}");
    }
    assert!(text.contains(r#"route="/v1/contents/{content_id}/playback-info""#));
}

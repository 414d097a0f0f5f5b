use serde_json::{Value, json};

use crate::helpers::{assert_error, spawn_seeded_app};

#[tokio::test]
async fn entitlements_of_the_demo_users() {
    let app = spawn_seeded_app().await;
    let expected = [
        ("demo-basic", "basic", 1, true),
        ("demo-standard", "standard", 2, true),
        ("demo-premium", "premium", 4, true),
        ("demo-inactive", "standard", 2, false),
    ];
    for (user_id, plan, max_streams, active) in expected {
        let response = app
            .get(&format!("/internal/v1/users/{user_id}/entitlement"))
            .await;
        assert_eq!(response.status().as_u16(), 200, "{user_id}");
        let body: Value = response.json().await.expect("json");
        assert_eq!(
            body,
            json!({"user_id": user_id, "plan": plan, "max_streams": max_streams, "active": active})
        );
    }
}

#[tokio::test]
async fn unknown_user_is_404() {
    let app = spawn_seeded_app().await;
    assert_error(
        app.get("/internal/v1/users/nobody/entitlement").await,
        404,
        "entitlement_not_found",
    )
    .await;
}

#[tokio::test]
async fn user_ids_from_identity_providers_are_accepted() {
    let app = spawn_seeded_app().await;
    // `|` and `@` occur in real `sub` claims; unknown, so 404, not 400.
    assert_error(
        app.get("/internal/v1/users/auth0%7C5f7c8e/entitlement").await,
        404,
        "entitlement_not_found",
    )
    .await;
    assert_error(
        app.get("/internal/v1/users/someone@example.com/entitlement")
            .await,
        404,
        "entitlement_not_found",
    )
    .await;
}

#[tokio::test]
async fn malformed_user_ids_are_400() {
    let app = spawn_seeded_app().await;
    let long = "u".repeat(129);
    for id in [long.as_str(), "bad%00id", "bad%0Aid"] {
        assert_error(
            app.get(&format!("/internal/v1/users/{id}/entitlement")).await,
            400,
            "invalid_user_id",
        )
        .await;
    }
}

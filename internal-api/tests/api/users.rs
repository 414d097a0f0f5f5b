use serde_json::json;

use crate::helpers::{entitlement_path, spawn_seeded_app};

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
        let body = app.get_json(&entitlement_path(user_id)).await;
        assert_eq!(
            body,
            json!({"user_id": user_id, "plan": plan, "max_streams": max_streams, "active": active})
        );
    }
}

#[tokio::test]
async fn unknown_users_are_404_and_malformed_ids_are_400() {
    let app = spawn_seeded_app().await;
    // `|` and `@` occur in real `sub` claims: such ids are unknown, not malformed.
    for id in ["nobody", "auth0%7C5f7c8e", "someone@example.com"] {
        app.get_error(&entitlement_path(id), 404, "entitlement_not_found")
            .await;
    }
    let long = "u".repeat(129);
    for id in [long.as_str(), "bad%00id", "bad%0Aid"] {
        app.get_error(&entitlement_path(id), 400, "invalid_user_id").await;
    }
}

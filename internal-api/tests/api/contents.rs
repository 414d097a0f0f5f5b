use serde_json::{Value, json};

use crate::helpers::{assert_error, spawn_app, spawn_seeded_app};

#[tokio::test]
async fn playback_returns_the_contract_shape() {
    let app = spawn_seeded_app().await;
    let response = app.get("/internal/v1/contents/m-0001/playback").await;
    assert_eq!(response.status().as_u16(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .expect("ascii")
            .starts_with("application/json")
    );
    let body: Value = response.json().await.expect("json");
    assert_eq!(
        body,
        json!({
            "content_id": "m-0001",
            "title": "Parasite",
            "duration_ms": 7_920_000,
            "available_countries": null,
            "required_plans": [],
            "streams": [
                {"protocol": "dash", "path": "/m-0001/dash/manifest.mpd",
                 "drm": {"system": "widevine", "key_id": "0123abcd0123abcd0123abcd0123abcd"}},
                {"protocol": "hls", "path": "/m-0001/hls/master.m3u8", "drm": null}
            ],
            "subtitles": [
                {"language": "ko", "path": "/m-0001/subs/ko.vtt"},
                {"language": "en", "path": "/m-0001/subs/en.vtt"}
            ]
        })
    );
}

#[tokio::test]
async fn plan_and_region_limits_are_reported() {
    let app = spawn_seeded_app().await;
    let premium: Value = app
        .get("/internal/v1/contents/m-0002/playback")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(premium["required_plans"], json!(["premium"]));
    assert_eq!(premium["available_countries"], Value::Null);

    let korea: Value = app
        .get("/internal/v1/contents/m-0003/playback")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(korea["available_countries"], json!(["KR"]));
    assert_eq!(korea["required_plans"], json!([]));
}

#[tokio::test]
async fn the_demo_catalog_mixes_drm_systems() {
    let app = spawn_seeded_app().await;
    let mut systems = std::collections::BTreeSet::new();
    for content in internal_api::seed::CATALOG {
        let response = app
            .get(&format!("/internal/v1/contents/{}/playback", content.id))
            .await;
        assert_eq!(response.status().as_u16(), 200, "{}", content.id);
        let body: Value = response.json().await.expect("json");
        for stream in body["streams"].as_array().expect("streams") {
            if let Some(system) = stream["drm"]["system"].as_str() {
                systems.insert(system.to_owned());
            }
        }
    }
    let expected: std::collections::BTreeSet<String> = ["fairplay", "playready", "widevine"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(systems, expected);
}

#[tokio::test]
async fn unknown_content_is_404() {
    let app = spawn_seeded_app().await;
    assert_error(
        app.get("/internal/v1/contents/m-9999/playback").await,
        404,
        "content_not_found",
    )
    .await;
}

#[tokio::test]
async fn malformed_content_ids_are_400() {
    let app = spawn_app().await;
    let long = "a".repeat(65);
    for id in [long.as_str(), "m%200001", "m.0001"] {
        assert_error(
            app.get(&format!("/internal/v1/contents/{id}/playback")).await,
            400,
            "invalid_content_id",
        )
        .await;
    }
}

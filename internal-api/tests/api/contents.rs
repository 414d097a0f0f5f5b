use std::collections::BTreeSet;

use serde_json::{Value, json};

use crate::helpers::{playback_path, spawn_seeded_app};

#[tokio::test]
async fn playback_returns_the_contract_shape() {
    let app = spawn_seeded_app().await;
    let body = app.get_json(&playback_path("m-0001")).await;
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
            ],
            "markers": [
                {"type": "intro", "start_ms": 30_000, "end_ms": 105_000},
                {"type": "credits", "start_ms": 7_680_000, "end_ms": 7_920_000}
            ]
        })
    );
}

#[tokio::test]
async fn plan_and_region_limits_are_reported() {
    let app = spawn_seeded_app().await;
    let premium = app.get_json(&playback_path("m-0002")).await;
    assert_eq!(premium["required_plans"], json!(["premium"]));
    assert_eq!(premium["available_countries"], Value::Null);

    let korea = app.get_json(&playback_path("m-0003")).await;
    assert_eq!(korea["available_countries"], json!(["KR"]));
    assert_eq!(korea["required_plans"], json!([]));
}

#[tokio::test]
async fn the_demo_catalog_mixes_drm_systems() {
    let app = spawn_seeded_app().await;
    let mut systems = BTreeSet::new();
    for content in internal_api::seed::CATALOG {
        let body = app.get_json(&playback_path(content.id)).await;
        for stream in body["streams"].as_array().expect("streams") {
            if let Some(system) = stream["drm"]["system"].as_str() {
                systems.insert(system.to_owned());
            }
        }
    }
    assert_eq!(
        systems,
        BTreeSet::from(["fairplay", "playready", "widevine"].map(String::from))
    );
}

#[tokio::test]
async fn unknown_content_is_404_and_malformed_ids_are_400() {
    let app = spawn_seeded_app().await;
    app.get_error(&playback_path("m-9999"), 404, "content_not_found")
        .await;
    let long = "a".repeat(65);
    for id in [long.as_str(), "m%200001", "m.0001"] {
        app.get_error(&playback_path(id), 400, "invalid_content_id").await;
    }
}

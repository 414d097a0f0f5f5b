//! Property-based checks of the served OpenAPI document with schemathesis
//! (PyPI): no 5xx, and every response conforms to what the document says.

use std::time::Duration;

use crate::helpers::spawn_app;
use crate::support::require_binary;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_conform_to_the_openapi_document() {
    let bin = require_binary("schemathesis");
    let app = spawn_app().await;
    let token = app.token("u-premium", "premium", 4, "KR");
    let run = tokio::process::Command::new(bin)
        .arg("run")
        .arg(format!("{}/openapi.json", app.address))
        .args(["--header", &format!("Authorization: Bearer {token}")])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
        ])
        .args(["--exclude-path-regex", "^/health/"])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args([
            "--max-examples",
            "40",
            "--seed",
            "1",
            // One worker: with two, hypothesis describes filters with
            // `ast.parse` from both threads at once, which CPython 3.11
            // can fail with "AST constructor recursion depth mismatch"
            // (cpython#106905), now and then.
            "--workers",
            "1",
            "--no-color",
        ])
        .env("SCHEMATHESIS_HOOKS", "")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(300), run)
        .await
        .expect("schemathesis ran over 5 minutes")
        .expect("schemathesis could not start");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "schemathesis found problems:\n{stdout}\n{stderr}"
    );
    // A run that generated nothing proves nothing.
    let generated: u64 = stdout
        .lines()
        .find_map(|l| {
            l.trim()
                .split_once(" generated,")
                .map(|(n, _)| n.trim().to_owned())
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        generated >= 50,
        "schemathesis generated only {generated} cases:\n{stdout}"
    );
}

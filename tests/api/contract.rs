//! The contract files and the live documentation: `openapi/openapi.json` must equal what
//! `assetd openapi` prints, and the Swagger UI at /file/doc must list every operation in
//! a real browser.

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

use crate::helpers::TestApp;

fn repo_file(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

#[tokio::test]
async fn checked_in_openapi_matches_the_code() {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_assetd")).arg("openapi").output().await.unwrap();
    assert!(output.status.success());
    let generated = String::from_utf8(output.stdout).unwrap();
    let checked_in = std::fs::read_to_string(repo_file("openapi/openapi.json")).unwrap_or_default();
    assert!(
        generated == checked_in,
        "openapi/openapi.json is stale: run `cargo run -- openapi > openapi/openapi.json` and commit it"
    );
}

/// The document served at /file/doc/openapi.json is the checked-in one, and every path
/// of the API is in it.
#[tokio::test]
async fn the_served_document_covers_every_route() {
    let app = TestApp::spawn().await;
    let served: Value = app.client.get(app.url("/doc/openapi.json")).send().await.unwrap().json().await.unwrap();
    let checked_in: Value =
        serde_json::from_str(&std::fs::read_to_string(repo_file("openapi/openapi.json")).unwrap()).unwrap();
    assert_eq!(served, checked_in);
    assert_eq!(served["servers"][0]["url"], "/file");
    let paths = served["paths"].as_object().unwrap();
    for (path, methods) in [
        ("/api/sessions/{id_session}", &["put", "get", "delete"][..]),
        ("/api/sessions/{id_session}/assets", &["get"]),
        ("/api/assets", &["post", "get", "delete"]),
        ("/api/assets/infos", &["get", "post"]),
        ("/api/assets/{asset_uuid}/events", &["get"]),
        ("/health", &["get"]),
        ("/ready", &["get"]),
    ] {
        for method in methods {
            assert!(paths[path][method].is_object(), "{method} {path} is documented");
        }
    }
    assert_eq!(served["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    let redirect = app.client.get(app.url("/doc")).send().await.unwrap();
    assert_eq!(redirect.status(), 302);
    assert_eq!(redirect.headers()["location"], "/file/doc/");
}

/// Headless Chromium renders /file/doc/ and shows every operation of the document.
#[tokio::test]
async fn swagger_ui_lists_the_operations_in_chromium() {
    let app = TestApp::spawn().await;
    let spec: Value = app.client.get(app.url("/doc/openapi.json")).send().await.unwrap().json().await.unwrap();
    let profile = tempfile::tempdir().unwrap();
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--virtual-time-budget=15000",
                "--dump-dom",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(app.url("/doc/"))
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("chromium finished")
    .expect("chromium is installed (scripts/test installs it)");
    let dom = String::from_utf8_lossy(&output.stdout);
    let mut operations = 0;
    for (_, methods) in spec["paths"].as_object().unwrap() {
        for (_, operation) in methods.as_object().unwrap() {
            let tag = operation["tags"][0].as_str().unwrap();
            let id = operation["operationId"].as_str().unwrap();
            assert!(
                dom.contains(&format!("id=\"operations-{tag}-{id}\"")),
                "operation {tag}/{id} is not shown in the Swagger UI"
            );
            operations += 1;
        }
    }
    assert!(operations >= 12, "{operations} operations");
}

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

/// `events/` (AsyncAPI document and JSON Schemas) is what `assetd contract` writes:
/// the same files, no more, no less.
#[tokio::test]
async fn checked_in_amqp_contract_matches_the_code() {
    let out = tempfile::tempdir().unwrap();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_assetd"))
        .args(["contract", "--out"])
        .arg(out.path())
        .env_remove("ASSETD_AMQP_PREFIX")
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let generated = contract_files(out.path());
    let checked_in = contract_files(&repo_file("events"));
    let names = |files: &std::collections::BTreeMap<String, String>| files.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(&checked_in), names(&generated), "events/ is stale: run `cargo run -- contract` and commit it");
    for (name, text) in &generated {
        assert!(&checked_in[name] == text, "events/{name} is stale: run `cargo run -- contract` and commit it");
    }
    assert!(generated.len() >= 11, "{:?}", names(&generated));
}

/// `asyncapi.json` and every `.json` under `schemas/`, by relative path.
fn contract_files(dir: &std::path::Path) -> std::collections::BTreeMap<String, String> {
    let mut files = std::collections::BTreeMap::new();
    let mut pending = vec![dir.join("schemas")];
    files.insert("asyncapi.json".to_owned(), std::fs::read_to_string(dir.join("asyncapi.json")).unwrap_or_default());
    while let Some(folder) = pending.pop() {
        for entry in std::fs::read_dir(&folder).into_iter().flatten() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let name = path.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                files.insert(name, std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    files
}

/// The AsyncAPI document is a valid AsyncAPI 3.0 document (the official JSON Schema,
/// bindings included), every reference in it resolves, every schema in it is a valid
/// JSON Schema, and every event type assetd records has a channel and a schema file.
#[test]
fn asyncapi_document_is_valid_and_complete() {
    let document: Value =
        serde_json::from_str(&std::fs::read_to_string(repo_file("events/asyncapi.json")).unwrap()).unwrap();
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(repo_file("tests/fixtures/asyncapi-3.0.0.schema.json")).unwrap())
            .unwrap();
    let validator = jsonschema::validator_for(&meta).expect("the AsyncAPI 3.0.0 schema compiles");
    let errors: Vec<String> =
        validator.iter_errors(&document).map(|e| format!("{e} at {}", e.instance_path())).collect();
    assert!(errors.is_empty(), "not a valid AsyncAPI 3.0.0 document: {errors:#?}");

    let mut references = Vec::new();
    collect_references(&document, &mut references);
    assert!(references.len() > 20);
    for reference in references {
        let pointer = reference.strip_prefix('#').unwrap_or_else(|| panic!("external reference {reference}"));
        assert!(document.pointer(pointer).is_some(), "{reference} does not resolve");
    }
    for (name, schema) in document["components"]["schemas"].as_object().unwrap() {
        jsonschema::draft7::new(schema).unwrap_or_else(|e| panic!("components/schemas/{name}: {e}"));
    }
    for event_type in
        ["SessionRegistered", "SessionUpdated", "SessionDeleted", "AssetUploaded", "AssetRenamed", "AssetDeleted"]
    {
        let key = assetd::relay::routing_key(event_type);
        assert!(
            document["channels"].as_object().unwrap().values().any(|c| c["address"] == key),
            "no channel for {key}"
        );
        assert!(repo_file(&format!("events/schemas/events/{key}.json")).exists(), "no schema for {key}");
    }
}

fn collect_references(value: &Value, into: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(reference)) = map.get("$ref") {
                into.push(reference.clone());
            }
            map.values().for_each(|v| collect_references(v, into));
        }
        Value::Array(items) => items.iter().for_each(|v| collect_references(v, into)),
        _ => {}
    }
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

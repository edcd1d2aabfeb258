//! Operations: health, readiness, request ids, the command line, graceful shutdown.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use assetd::app::App;
use assetd::auth::Authenticator;
use assetd::blobs::BlobStore;
use assetd::config::DatabaseConfig;
use assetd::http::{self, Context, HttpSettings};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

use crate::helpers::{TestApp, TestDatabase, JWT_SECRET};

#[tokio::test]
async fn health_ready_and_request_ids() {
    let app = TestApp::spawn().await;
    let health = app.client.get(app.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    assert!(health.headers().contains_key("x-request-id"));
    let ready = app.client.get(app.url("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    assert_eq!(ready.json::<Value>().await.unwrap()["checks"]["database"], "ok");

    let echoed = app.client.get(app.url("/health")).header("X-Request-Id", "trace-42").send().await.unwrap();
    assert_eq!(echoed.headers()["x-request-id"], "trace-42");
    let replaced =
        app.client.get(app.url("/health")).header("X-Request-Id", "bad id with spaces").send().await.unwrap();
    assert_ne!(replaced.headers()["x-request-id"], "bad id with spaces");
}

#[tokio::test]
async fn ready_is_503_when_postgres_is_unreachable() {
    // A pool pointed at a closed port stands in for a database that went away.
    let database =
        DatabaseConfig { database_url: "postgres://postgres@127.0.0.1:1/assetd".into(), database_pool_size: 2 };
    let data_dir = tempfile::tempdir().unwrap();
    let app = App::new(
        database.pool().unwrap(),
        BlobStore::open(data_dir.path()).await.unwrap(),
        Authenticator::new(JWT_SECRET),
        60,
    );
    let settings = HttpSettings {
        base_path: "/file".into(),
        max_upload_size: 1024,
        accel_redirect_prefix: None,
        body_idle_timeout: Duration::from_secs(5),
        public_url: None,
        import_policy: assetd::app::jobs::JobPolicy { max_attempts: 3 },
        signer: assetd::auth::UrlSigner::new("key".into(), None),
        signed_url_seconds: 900,
        signed_url_max_seconds: 3600,
    };
    let ctx = Context { app, settings: Arc::new(settings) };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(http::serve(ctx.clone(), listener, std::future::pending(), Duration::from_secs(1)));

    let ready = reqwest::get(format!("http://{addr}/file/ready")).await.unwrap();
    assert_eq!(ready.status(), 503);
    assert!(ready.headers().contains_key("retry-after"));
    let request_id = ready.headers()["x-request-id"].to_str().unwrap().to_owned();
    let body = ready.json::<Value>().await.unwrap();
    assert_eq!(body["checks"]["database"], "unreachable");
    assert_eq!(body["error"]["code"], "unavailable", "an error answer has the error shape: {body}");
    assert_eq!(body["error"]["request_id"], request_id);
    assert_eq!(reqwest::get(format!("http://{addr}/file/health")).await.unwrap().status(), 200);

    // Requests that need the database get 503, not 500.
    let token = ctx.app.auth.mint(
        &assetd::domain::principal::Principal {
            kind: assetd::domain::principal::PrincipalKind::Service,
            uuid: uuid::Uuid::new_v4(),
            name: "s".into(),
            superadmin: false,
        },
        60,
    );
    let response = reqwest::Client::new()
        .get(format!("http://{addr}/file/api/sessions/1"))
        .header("Authorization", format!("Bearer {token}"))
        .send()
        .await
        .unwrap();
    crate::helpers::assert_error(response, 503, "unavailable").await;
    // So do the metrics, which read the relay's lag from the database.
    let metrics = reqwest::get(format!("http://{addr}/file/metrics")).await.unwrap();
    crate::helpers::assert_error(metrics, 503, "unavailable").await;
}

/// The value of one series (name and labels as exported) in a `/metrics` text.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn metrics_count_requests_by_method_and_status_class_and_the_bytes_moved() {
    let app = TestApp::spawn().await;
    assert_eq!(app.client.get(app.url("/health")).send().await.unwrap().status(), 200);
    let scrape = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(scrape.status(), 200);
    assert_eq!(scrape.headers()["content-type"], "text/plain; version=0.0.4; charset=utf-8");
    let text = scrape.text().await.unwrap();
    // A scrape is counted once answered, so only /health is in the first one.
    assert_eq!(sample(&text, r#"assetd_http_requests_total{method="GET",status="2xx"}"#), Some(1.0), "{text}");
    assert_eq!(sample(&text, "assetd_relay_lag_events"), Some(0.0), "{text}");
    assert_eq!(sample(&text, "assetd_upload_received_bytes_total"), Some(0.0), "{text}");

    let (_, token) = app.session_with_user(1).await;
    let content = vec![7u8; 5000];
    let uploaded = app.upload_ok(&token, 1, "m.bin", &content).await;
    let download =
        app.get(&token, &format!("/api/assets?asset_uuid={}", uploaded["asset_uuid"].as_str().unwrap())).await;
    assert_eq!(download.status(), 200);
    assert_eq!(download.bytes().await.unwrap().len(), content.len());
    let refused = app.client.post(app.url("/api/assets")).send().await.unwrap();
    assert_eq!(refused.status(), 401);

    let text = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for (series, count) in [
        (r#"assetd_http_requests_total{method="GET",status="2xx"}"#, 3.0),
        (r#"assetd_http_requests_total{method="PUT",status="2xx"}"#, 1.0),
        (r#"assetd_http_requests_total{method="POST",status="2xx"}"#, 1.0),
        (r#"assetd_http_requests_total{method="POST",status="4xx"}"#, 1.0),
    ] {
        assert_eq!(sample(&text, series), Some(count), "{series} in:\n{text}");
    }
    // The upload's body is its file plus the multipart framing around it.
    let received = sample(&text, "assetd_upload_received_bytes_total").unwrap();
    assert!((5000.0..6000.0).contains(&received), "{received} bytes received:\n{text}");
    assert_eq!(sample(&text, "assetd_download_sent_bytes_total"), Some(5000.0), "{text}");
}

async fn run_cli(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_assetd"));
    command.args(args);
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().await.unwrap()
}

#[tokio::test]
async fn migrate_is_idempotent_and_token_mints_verifiable_tokens() {
    let db = TestDatabase::create().await;
    let first = run_cli(&["migrate"], &[("ASSETD_DATABASE_URL", &db.url)]).await;
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let migrations = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/src/migrations")).unwrap().count();
    assert_eq!(String::from_utf8_lossy(&first.stdout).trim(), format!("{migrations} migration(s) applied"));
    let second = run_cli(&["migrate"], &[("ASSETD_DATABASE_URL", &db.url)]).await;
    assert_eq!(String::from_utf8_lossy(&second.stdout).trim(), "0 migration(s) applied");

    let sub = uuid::Uuid::new_v4().to_string();
    let minted = run_cli(
        &["token", "--kind", "user", "--sub", &sub, "--name", "ann", "--superadmin", "--lifetime", "60"],
        &[("ASSETD_JWT_SECRET", JWT_SECRET)],
    )
    .await;
    assert!(minted.status.success());
    let principal = Authenticator::new(JWT_SECRET).verify(String::from_utf8_lossy(&minted.stdout).trim()).unwrap();
    assert_eq!(principal.uuid.to_string(), sub);
    assert_eq!(principal.kind, assetd::domain::principal::PrincipalKind::User);
    assert!(principal.superadmin);
    assert_eq!(principal.name, "ann");
    // Only users can be superadmins, and tokens live a day at most by default.
    let device_admin =
        run_cli(&["token", "--kind", "device", "--superadmin"], &[("ASSETD_JWT_SECRET", JWT_SECRET)]).await;
    assert!(!device_admin.status.success());
    let too_long = run_cli(&["token", "--lifetime", "172800"], &[("ASSETD_JWT_SECRET", JWT_SECRET)]).await;
    assert!(!too_long.status.success());

    let refused = run_cli(&["token", "--kind", "robot"], &[("ASSETD_JWT_SECRET", JWT_SECRET)]).await;
    assert!(!refused.status.success());
    let no_secret = run_cli(&["serve"], &[("ASSETD_DATABASE_URL", &db.url)]).await;
    assert!(!no_secret.status.success(), "serve refuses to start without secrets");
}

/// SIGTERM: no new connections, the upload in flight completes, the process exits 0,
/// and its log lines carry the request id.
#[tokio::test]
async fn sigterm_lets_an_upload_in_flight_finish() {
    let db = TestDatabase::create().await;
    let data_dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_assetd"))
        .arg("serve")
        .env("ASSETD_DATABASE_URL", &db.url)
        .env("ASSETD_JWT_SECRET", JWT_SECRET)
        .env("ASSETD_URL_SIGNING_KEY", "k")
        .env("ASSETD_LISTEN", &addr)
        .env("ASSETD_DATA_DIR", data_dir.path())
        .env("NO_COLOR", "1")
        .env("ASSETD_RELAY", "false")
        .env("ASSETD_COMMANDS", "false")
        .env_remove("ASSETD_ACCEL_REDIRECT_PREFIX")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while client.get(format!("http://{addr}/file/health")).send().await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "assetd did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let auth = Authenticator::new(JWT_SECRET);
    let service = auth.mint(
        &assetd::domain::principal::Principal {
            kind: assetd::domain::principal::PrincipalKind::Service,
            uuid: uuid::Uuid::new_v4(),
            name: "s".into(),
            superadmin: false,
        },
        600,
    );
    let registered = client
        .put(format!("http://{addr}/file/api/sessions/1"))
        .header("Authorization", format!("Bearer {service}"))
        .json(&json!({"session_name": "s"}))
        .send()
        .await
        .unwrap();
    assert_eq!(registered.status(), 200);

    // Start an upload and stop half way.
    let boundary = "b0undary";
    let head = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file_asset\"\r\n\r\n{{\"id_session\": 1, \"asset_name\": \"n\", \"id_service\": \"{}\"}}\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"slow.bin\"\r\n\r\n",
        uuid::Uuid::new_v4()
    );
    let tail = format!("\r\n--{boundary}--\r\n");
    let content = vec![3u8; 2 * 1024 * 1024];
    let length = head.len() + content.len() + tail.len();
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let request = format!(
        "POST /file/api/assets HTTP/1.1\r\nHost: {addr}\r\nX-Request-Id: slow-upload-1\r\nAuthorization: Bearer {service}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n{head}"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    stream.write_all(&content[..1024 * 1024]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(tokio::net::TcpStream::connect(&addr).await.is_err(), "no new connections after SIGTERM");

    stream.write_all(&content[1024 * 1024..]).await.unwrap();
    stream.write_all(tail.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut answer)).await.unwrap().unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"asset_file_size\":2097152"), "{answer}");

    let status =
        tokio::time::timeout(Duration::from_secs(10), child.wait()).await.expect("exits after the upload").unwrap();
    assert!(status.success(), "{status:?}");
    let mut log = Vec::new();
    let mut stderr = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    while let Ok(Some(line)) = stderr.next_line().await {
        log.push(line);
    }
    let log = log.join("\n");
    assert!(log.contains("request_id=slow-upload-1"), "request ids are in the logs:\n{log}");
    assert!(log.contains("shutting down"), "{log}");
}

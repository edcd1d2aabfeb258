//! Bad input never hurts: every malformed or hostile upload gets a 4xx JSON error and
//! leaves nothing behind (no asset, no event, no temporary file, no blob).

use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{assert_error, serve_process, wait_until_serving, Backend, TestApp, TestOptions};

const BOUNDARY: &str = "----assetd-test-boundary";

/// One multipart part: its header lines, then its content.
type Part = (Vec<u8>, Vec<u8>);

/// A multipart body from raw parts: (part headers, content).
fn raw_multipart(parts: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (headers, content) in parts {
        body.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
        body.extend_from_slice(headers);
        body.extend_from_slice(b"\r\n\r\n");
        body.extend_from_slice(content);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

fn file_asset_part(json: &str) -> Part {
    (b"Content-Disposition: form-data; name=\"file_asset\"".to_vec(), json.as_bytes().to_vec())
}

fn file_part(filename: &[u8], content: &[u8]) -> Part {
    let mut headers = b"Content-Disposition: form-data; name=\"file\"; filename=\"".to_vec();
    headers.extend_from_slice(filename);
    headers.extend_from_slice(b"\"\r\nContent-Type: application/octet-stream");
    (headers, content.to_vec())
}

/// Connects to `addr` and sends an upload's request head and its form up to the file's
/// first byte (`file_asset`, then the `file` part named `filename`), announcing
/// `length` bytes in all: the test sends what it wants of the file, or vanishes.
async fn start_raw_upload(
    addr: std::net::SocketAddr,
    token: &str,
    filename: &str,
    length: usize,
) -> tokio::net::TcpStream {
    let head = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file_asset\"\r\n\r\n{GOOD_FILE_ASSET}\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n\r\n"
    );
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST /file/api/assets HTTP/1.1\r\nHost: {addr}\r\nAuthorization: OpenTera {token}\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {length}\r\n\r\n{head}"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    stream
}

async fn post_raw(app: &TestApp, token: &str, parts: &[Part]) -> reqwest::Response {
    let borrowed: Vec<(&[u8], &[u8])> = parts.iter().map(|(h, c)| (h.as_slice(), c.as_slice())).collect();
    app.client
        .post(app.url("/api/assets"))
        .header("Authorization", format!("OpenTera {token}"))
        .header("Content-Type", format!("multipart/form-data; boundary={BOUNDARY}"))
        .body(raw_multipart(&borrowed))
        .send()
        .await
        .unwrap()
}

/// Posts a multipart body (with [`BOUNDARY`]) sent in the given chunks, without a
/// Content-Length.
async fn post_streamed(app: &TestApp, token: &str, chunks: Vec<Result<Vec<u8>, std::io::Error>>) -> reqwest::Response {
    app.client
        .post(app.url("/api/assets"))
        .header("Authorization", format!("OpenTera {token}"))
        .header("Content-Type", format!("multipart/form-data; boundary={BOUNDARY}"))
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap()
}

const GOOD_FILE_ASSET: &str = r#"{"id_session": 1, "asset_name": "Asset Name"}"#;

async fn malformed_forms_are_refused_and_leave_nothing(backend: Backend) {
    let app = TestApp::on(backend).await;
    let (_, token) = app.session_with_user(1).await;
    let before = app.footprint().await;
    let content = vec![7u8; 200_000];

    let cases: Vec<(&str, Vec<Part>, u16, &str)> = vec![
        ("missing file_asset", vec![file_part(b"a.bin", &content)], 400, "missing_file_asset"),
        ("missing file", vec![file_asset_part(GOOD_FILE_ASSET)], 400, "missing_file"),
        (
            "file_asset not JSON",
            vec![file_asset_part("{id_session: 1"), file_part(b"a.bin", &content)],
            400,
            "invalid_file_asset",
        ),
        (
            "file_asset not an object",
            vec![file_asset_part("[1, 2]"), file_part(b"a.bin", &content)],
            400,
            "invalid_file_asset",
        ),
        (
            "file_asset without id_session",
            vec![file_asset_part(r#"{"asset_name": "n"}"#), file_part(b"a.bin", &content)],
            422,
            "invalid_field",
        ),
        (
            "file_asset without asset_name",
            vec![file_asset_part(r#"{"id_session": 1}"#), file_part(b"a.bin", &content)],
            422,
            "invalid_field",
        ),
        (
            "id_session of the wrong type",
            vec![file_asset_part(r#"{"id_session": "one", "asset_name": "n"}"#), file_part(b"a.bin", &content)],
            422,
            "invalid_field",
        ),
        (
            "unknown session",
            vec![file_asset_part(r#"{"id_session": 999, "asset_name": "n"}"#), file_part(b"a.bin", &content)],
            404,
            "not_found",
        ),
        (
            "unknown session, file first",
            vec![file_part(b"a.bin", &content), file_asset_part(r#"{"id_session": 999, "asset_name": "n"}"#)],
            404,
            "not_found",
        ),
        (
            "invalid file_asset, file first",
            vec![file_part(b"a.bin", &content), file_asset_part("nope")],
            400,
            "invalid_file_asset",
        ),
        (
            "filename with ../",
            vec![file_asset_part(GOOD_FILE_ASSET), file_part(b"../../etc/passwd", &content)],
            422,
            "invalid_field",
        ),
        (
            "filename with a backslash path",
            vec![file_asset_part(GOOD_FILE_ASSET), file_part(b"..\\..\\boot.ini", &content)],
            422,
            "invalid_field",
        ),
        (
            "filename with NUL",
            vec![file_asset_part(GOOD_FILE_ASSET), file_part(b"a\0b.txt", &content)],
            400,
            "invalid_multipart",
        ),
        (
            "filename of 1,000 characters",
            vec![file_asset_part(GOOD_FILE_ASSET), file_part("é".repeat(1000).as_bytes(), &content)],
            422,
            "invalid_field",
        ),
        (
            "asset_name with NUL",
            vec![file_asset_part(r#"{"id_session": 1, "asset_name": "a\u0000b"}"#), file_part(b"a.bin", &content)],
            422,
            "invalid_field",
        ),
        (
            "asset_name of 1,000 characters",
            vec![
                file_asset_part(&format!(r#"{{"id_session": 1, "asset_name": "{}"}}"#, "n".repeat(1000))),
                file_part(b"a.bin", &content),
            ],
            422,
            "invalid_field",
        ),
        (
            "directory climbing out",
            vec![
                file_asset_part(r#"{"id_session": 1, "asset_name": "n", "directory": "/a/../../b"}"#),
                file_part(b"a.bin", &content),
            ],
            422,
            "invalid_field",
        ),
        (
            "bad asset_type",
            vec![
                file_asset_part(r#"{"id_session": 1, "asset_name": "n", "asset_type": "not a type"}"#),
                file_part(b"a.bin", &content),
            ],
            422,
            "invalid_field",
        ),
        (
            "bad asset_datetime",
            vec![
                file_asset_part(r#"{"id_session": 1, "asset_name": "n", "asset_datetime": "yesterday"}"#),
                file_part(b"a.bin", &content),
            ],
            422,
            "invalid_field",
        ),
        (
            // The mime crate reads this; the OpenAPI document's grammar does not allow it.
            "asset_type with a trailing ';'",
            vec![
                file_asset_part(r#"{"id_session": 1, "asset_name": "n", "asset_type": "text/plain;"}"#),
                file_part(b"a.bin", &content),
            ],
            422,
            "invalid_field",
        ),
        (
            // chrono reads one-digit fields without an offset; the document says two.
            "asset_datetime with one-digit fields",
            vec![
                file_asset_part(r#"{"id_session": 1, "asset_name": "n", "asset_datetime": "2024-1-5T1:2:3"}"#),
                file_part(b"a.bin", &content),
            ],
            422,
            "invalid_field",
        ),
        (
            "NUL in a metadata key",
            vec![
                file_asset_part(r#"{"id_session": 1, "asset_name": "n", "metadata": {"a\u0000": 1}}"#),
                file_part(b"a.bin", &content),
            ],
            422,
            "invalid_field",
        ),
        (
            "NUL in a metadata value",
            vec![
                file_asset_part(r#"{"id_session": 1, "asset_name": "n", "metadata": {"a": ["\u0000"]}}"#),
                file_part(b"a.bin", &content),
            ],
            422,
            "invalid_field",
        ),
        (
            "asset_datetime out of range",
            vec![
                file_asset_part(r#"{"id_session": 1, "asset_name": "n", "asset_datetime": "-5000-01-01T00:00:00"}"#),
                file_part(b"a.bin", &content),
            ],
            422,
            "invalid_field",
        ),
        (
            "file_asset not UTF-8",
            vec![
                (
                    b"Content-Disposition: form-data; name=\"file_asset\"".to_vec(),
                    b"{\"id_session\": 1, \"asset_name\": \"\xff\"}".to_vec(),
                ),
                file_part(b"a.bin", &content),
            ],
            400,
            "invalid_file_asset",
        ),
        (
            "filename not UTF-8",
            vec![file_asset_part(GOOD_FILE_ASSET), file_part(b"\xff\xfe.bin", &content)],
            422,
            "invalid_field",
        ),
        (
            "file sent twice",
            vec![file_asset_part(GOOD_FILE_ASSET), file_part(b"a.bin", &content), file_part(b"b.bin", &content)],
            400,
            "duplicate_field",
        ),
        (
            "file_asset over its limit",
            vec![
                file_asset_part(&format!(
                    r#"{{"id_session": 1, "asset_name": "n", "metadata": {{"x": "{}"}}}}"#,
                    "x".repeat(70_000)
                )),
                file_part(b"a.bin", &content),
            ],
            413,
            "payload_too_large",
        ),
    ];
    for (case, parts, status, code) in cases {
        let response = post_raw(&app, &token, &parts).await;
        let body = assert_error(response, status, code).await;
        assert_eq!(app.footprint().await, before, "{case}: something was left behind ({body})");
    }

    let truncated = app
        .client
        .post(app.url("/api/assets"))
        .header("Authorization", format!("OpenTera {token}"))
        .header("Content-Type", format!("multipart/form-data; boundary={BOUNDARY}"))
        .body(format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\npartial"))
        .send()
        .await
        .unwrap();
    assert_error(truncated, 400, "invalid_multipart").await;
    assert_eq!(app.footprint().await, before, "a truncated body leaves nothing");
}

#[tokio::test]
async fn wrong_content_types_get_415() {
    let app = TestApp::spawn().await;
    let (_, token) = app.session_with_user(1).await;
    let before = app.footprint().await;
    for content_type in [None, Some("application/json"), Some("text/plain"), Some("application/x-www-form-urlencoded")]
    {
        let mut request =
            app.client.post(app.url("/api/assets")).header("Authorization", format!("OpenTera {token}")).body("{}");
        if let Some(content_type) = content_type {
            request = request.header("Content-Type", content_type);
        }
        assert_error(request.send().await.unwrap(), 415, "unsupported_media_type").await;
    }
    for content_type in ["multipart/form-data", "multipart/form-data; boundary="] {
        let response = app
            .client
            .post(app.url("/api/assets"))
            .header("Authorization", format!("OpenTera {token}"))
            .header("Content-Type", content_type)
            .body("x")
            .send()
            .await
            .unwrap();
        assert_error(response, 400, "invalid_multipart").await;
    }
    assert_eq!(app.footprint().await, before);
}

async fn bodies_over_the_limit_get_413_whether_declared_or_streamed(backend: Backend) {
    let app =
        TestApp::spawn_with(TestOptions { max_upload_size: Some(1024 * 1024), backend, ..Default::default() }).await;
    let (_, token) = app.session_with_user(1).await;
    let before = app.footprint().await;

    // Declared length over the limit: refused from the headers.
    let big =
        app.upload(&token, &json!({"id_session": 1, "asset_name": "big"}), "big.bin", vec![1u8; 3 * 1024 * 1024]).await;
    assert_error(big, 413, "payload_too_large").await;
    assert_eq!(app.footprint().await, before);

    // Chunked, no length: refused when the file part passes the limit.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = {
        let head = format!(
            "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file_asset\"\r\n\r\n{GOOD_FILE_ASSET}\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.bin\"\r\n\r\n"
        );
        let mut chunks = vec![Ok(head.into_bytes())];
        chunks.extend((0..40).map(|_| Ok(vec![9u8; 64 * 1024])));
        chunks.push(Ok(format!("\r\n--{BOUNDARY}--\r\n").into_bytes()));
        chunks
    };
    let streamed = post_streamed(&app, &token, chunks).await;
    assert_error(streamed, 413, "payload_too_large").await;
    assert_eq!(app.footprint().await, before);

    // Just under the limit still works.
    let fits =
        app.upload(&token, &json!({"id_session": 1, "asset_name": "fits"}), "fits.bin", vec![1u8; 1024 * 1024]).await;
    assert_eq!(fits.status(), 200);
}

async fn a_client_disconnecting_mid_upload_leaves_nothing(backend: Backend) {
    let app = TestApp::on(backend).await;
    let (_, token) = app.session_with_user(1).await;
    let before = app.footprint().await;

    let mut stream = start_raw_upload(app.addr, &token, "cut.bin", 50 * 1024 * 1024).await;
    for _ in 0..32 {
        stream.write_all(&[5u8; 64 * 1024]).await.unwrap();
    }
    stream.flush().await.unwrap();
    // Wait until the server has started writing the file, then vanish.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while TestApp::files_under(&app.tmp_dir()) == 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(TestApp::files_under(&app.tmp_dir()), 1, "the upload was being written");
    drop(stream);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while app.footprint().await != before && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(app.footprint().await, before, "the partial upload was cleaned up");
    // The server is still fine.
    assert_eq!(
        app.upload(&token, &json!({"id_session": 1, "asset_name": "ok"}), "ok.bin", b"ok".to_vec()).await.status(),
        200
    );
}

/// S3: a client that goes away after several parts were sent leaves no object and no
/// multipart upload open in the bucket (nothing billed), and no temporary file.
#[tokio::test]
async fn a_failed_multipart_upload_leaves_no_object_and_no_pending_upload() {
    let app = TestApp::on(Backend::S3).await;
    let bucket = app.bucket.as_ref().unwrap();
    let (_, token) = app.session_with_user(1).await;
    let before = app.footprint().await;
    let mut stream = start_raw_upload(app.addr, &token, "cut.bin", 64 * 1024 * 1024).await;
    // Two and a half parts (5 MiB each in the tests): two are sent while the rest arrives.
    for _ in 0..(25 * 16) {
        stream.write_all(&[9u8; 32 * 1024]).await.unwrap();
    }
    stream.flush().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while bucket.pending_multipart_uploads().await.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no multipart upload was started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(stream);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while app.footprint().await != before && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(app.footprint().await, before, "no asset, event or temporary file is left");
    assert_eq!(bucket.pending_multipart_uploads().await, vec![], "the multipart upload was aborted");
    assert_eq!(bucket.object_keys().await, Vec::<String>::new(), "no object was made");
    assert_eq!(
        app.upload(&token, &json!({"id_session": 1, "asset_name": "ok"}), "ok.bin", vec![1; 6 << 20]).await.status(),
        200,
        "the server still takes uploads, multipart ones too"
    );
    assert_eq!(bucket.pending_multipart_uploads().await, vec![], "a completed upload leaves none open");
    assert_eq!(bucket.object_keys().await.len(), 1);
}

/// `assetd serve` killed with SIGKILL in the middle of an upload (several parts already
/// sent, on S3): nothing of it becomes visible, and once the process is started again on
/// the same data directory its temporary file is gone and it takes uploads again. (On
/// S3 a killed process cannot abort its multipart upload: the bucket's lifecycle rule
/// does, see README "Blob storage"; no object is made.)
async fn a_sigkill_during_an_upload_leaves_nothing_visible_and_the_restart_cleans_up(backend: Backend) {
    let app = TestApp::on(backend).await;
    let (_, token) = app.session_with_user(1).await;
    let data_dir = tempfile::tempdir().unwrap();
    let (mut process, addr) = serve_process(&app, data_dir.path());
    wait_until_serving(addr).await;
    let (events, assets) = (app.event_count().await, app.scalar("SELECT count(*) FROM assets").await);

    let mut stream = start_raw_upload(addr, &token, "killed.bin", 64 * 1024 * 1024).await;
    for _ in 0..(12 * 32) {
        stream.write_all(&[4u8; 32 * 1024]).await.unwrap();
    }
    stream.flush().await.unwrap();
    let temp_dir = data_dir.path().join("tmp");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while TestApp::files_under(&temp_dir) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the upload was not being written");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    process.start_kill().unwrap(); // SIGKILL
    process.wait().await.unwrap();
    drop(stream);
    assert_eq!(TestApp::files_under(&temp_dir), 1, "the killed upload's temporary file is there");

    // Started again once the file is older than a live writer's could be unlocked.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (_process, addr) = serve_process(&app, data_dir.path());
    wait_until_serving(addr).await;
    assert_eq!(TestApp::files_under(&temp_dir), 0, "the restart removed the orphan temporary file");
    assert_eq!(app.event_count().await, events, "no event");
    assert_eq!(app.scalar("SELECT count(*) FROM assets").await, assets, "no asset");
    let stored = match &app.bucket {
        Some(bucket) => bucket.object_keys().await.len(),
        None => TestApp::files_under(&data_dir.path().join("blobs")),
    };
    assert_eq!(stored, 0, "no blob");

    let bytes = crate::helpers::pseudo_random_bytes(41, 6 << 20);
    let form = reqwest::multipart::Form::new()
        .text("file_asset", GOOD_FILE_ASSET)
        .part("file", reqwest::multipart::Part::bytes(bytes.clone()).file_name("after.bin"));
    let answer = reqwest::Client::new()
        .post(format!("http://{addr}/file/api/assets"))
        .header("Authorization", format!("OpenTera {token}"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200, "the restarted process takes uploads");
    let info: serde_json::Value = answer.json().await.unwrap();
    let download = reqwest::Client::new()
        .get(format!("http://{addr}/file/api/assets?asset_uuid={}", info["asset_uuid"].as_str().unwrap()))
        .header("Authorization", format!("OpenTera {token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(download.bytes().await.unwrap().as_ref(), &bytes[..], "and its bytes come back whole");
}

/// SIGTERM while an upload outlasts the grace period: the process closes it and exits
/// cleanly (it once panicked, polling its spent deadline again).
#[tokio::test]
async fn sigterm_with_an_upload_outlasting_the_grace_period_exits_cleanly() {
    let app = TestApp::spawn().await;
    let (_, token) = app.session_with_user(1).await;
    let data_dir = tempfile::tempdir().unwrap();
    let (mut command, addr) = crate::helpers::serve_command(&app, data_dir.path());
    let mut process = command.env("ASSETD_SHUTDOWN_GRACE", "1").stderr(std::process::Stdio::piped()).spawn().unwrap();
    wait_until_serving(addr).await;
    let mut stream = start_raw_upload(addr, &token, "slow.bin", 64 * 1024 * 1024).await;
    stream.write_all(&[1u8; 256 * 1024]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = process.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    // The upload keeps trickling, past the grace period.
    let trickle = async {
        for _ in 0..40 {
            if stream.write_all(&[1u8; 1024]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let (exit, ()) = tokio::join!(tokio::time::timeout(Duration::from_secs(30), process.wait()), trickle);
    let exit = exit.expect("exits after the grace period").unwrap();
    let mut stderr = String::new();
    process.stderr.take().unwrap().read_to_string(&mut stderr).await.unwrap();
    assert!(exit.success(), "{exit:?}\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(app.scalar("SELECT count(*) FROM assets").await, 0, "the cut upload made no asset");
}

/// Many uploads cut off at once, at different points: every one gives back its
/// temporary file and its memory, and the server goes on answering.
async fn many_concurrent_disconnecting_uploads_leave_nothing_and_memory_comes_back(backend: Backend) {
    let app = TestApp::on(backend).await;
    let (_, token) = app.session_with_user(1).await;
    let before = app.footprint().await;
    let budget = app.ctx.app.blobs.budget().clone();
    let clients = (0..24usize).map(|n| {
        let (addr, token) = (app.addr, token.clone());
        tokio::spawn(async move {
            let mut stream = start_raw_upload(addr, &token, "cut.bin", 8 * 1024 * 1024).await;
            // Cut after 1 byte, 64 KiB + 1, 128 KiB + 2, ... up to about 1.5 MiB.
            let cut = n * (64 * 1024 + 1) + 1;
            let content = vec![n as u8; cut];
            for piece in content.chunks(16 * 1024) {
                if stream.write_all(piece).await.is_err() {
                    break;
                }
            }
            drop(stream);
        })
    });
    futures::future::try_join_all(clients).await.unwrap();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while (app.footprint().await != before || budget.available() != budget.total())
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(app.footprint().await, before, "no asset, event, temporary file or blob is left");
    assert_eq!(budget.available(), budget.total(), "every upload gave its buffers back");
    let ok = app.upload(&token, &json!({"id_session": 1, "asset_name": "ok"}), "ok.bin", vec![3u8; 300_000]).await;
    assert_eq!(ok.status(), 200, "the server still takes uploads");
}

async fn garbage_requests_get_json_errors_not_500s(backend: Backend) {
    let app = TestApp::on(backend).await;
    let (_, token) = app.session_with_user(1).await;
    assert_error(app.get(&token, "/api/assets").await, 400, "missing_parameter").await;
    assert_error(app.get(&token, "/api/assets?asset_uuid=nope").await, 400, "invalid_parameter").await;
    assert_error(app.get(&token, "/api/assets?asset_uuid=%ZZ%00").await, 400, "invalid_parameter").await;
    assert_error(app.get(&token, &format!("/api/assets?asset_uuid={}", uuid::Uuid::new_v4())).await, 404, "not_found")
        .await;
    assert_error(app.delete(&token, "/api/assets").await, 400, "missing_parameter").await;
    assert_error(app.get(&token, "/api/assets/nope/events").await, 400, "invalid_parameter").await;
    assert_error(app.get(&token, "/api/nowhere").await, 404, "not_found").await;
    let twice = format!("/api/assets?asset_uuid={}&asset_uuid={}", uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    assert_error(app.get(&token, &twice).await, 400, "invalid_query").await;
    assert_error(app.post_json(&token, "/api/assets/infos", &json!({"neither": 1})).await, 422, "invalid_field").await;
    // One shape or the other, as the document's oneOf says: not both, nothing else beside.
    let rename = json!({"asset_uuid": uuid::Uuid::new_v4(), "asset_original_filename": "x"});
    let both = json!({"assets": [], "file_asset": rename});
    assert_error(app.post_json(&token, "/api/assets/infos", &both).await, 422, "invalid_field").await;
    let extra = json!({"assets": [], "limit": 1});
    assert_error(app.post_json(&token, "/api/assets/infos", &extra).await, 422, "invalid_field").await;
    let rename_bad = json!({"file_asset": {"asset_uuid": uuid::Uuid::new_v4(), "asset_original_filename": "../x"}});
    assert_error(app.post_json(&token, "/api/assets/infos", &rename_bad).await, 422, "invalid_field").await;
    let too_many: Vec<_> = (0..1001).map(|_| json!({"asset_uuid": uuid::Uuid::new_v4()})).collect();
    assert_error(app.post_json(&token, "/api/assets/infos", &json!({"assets": too_many})).await, 422, "invalid_field")
        .await;
    let wrong_method = app
        .client
        .patch(app.url("/api/assets"))
        .header("Authorization", format!("Bearer {token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_method.headers()["allow"], "GET, HEAD, POST, DELETE");
    assert_error(wrong_method, 405, "method_not_allowed").await;
    let put_infos = app
        .client
        .put(app.url("/api/assets/infos"))
        .header("Authorization", format!("Bearer {token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(put_infos.headers()["allow"], "GET, HEAD, POST");

    // A raw request with a broken request line or header gets an answer, not a hang.
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    stream.write_all(b"GARBAGE\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 400"), "{}", String::from_utf8_lossy(&answer));
}

/// A body that never reaches a multipart delimiter is cut off after a bounded amount
/// (the parser would otherwise buffer all of it).
#[tokio::test]
async fn a_preamble_without_delimiters_is_cut_off() {
    let app = TestApp::spawn().await;
    let (_, token) = app.session_with_user(1).await;
    let before = app.footprint().await;
    let chunks = (0..64).map(|_| Ok(vec![b'a'; 64 * 1024])).collect();
    let response = post_streamed(&app, &token, chunks).await;
    let body = assert_error(response, 400, "invalid_multipart").await;
    assert!(body["error"]["message"].as_str().unwrap().contains("outside any form field"), "{body}");
    assert_eq!(app.footprint().await, before);
}

/// A client that stops sending mid-upload gets 408 and leaves nothing.
async fn a_stalled_upload_times_out_with_408(backend: Backend) {
    let app =
        TestApp::spawn_with(TestOptions { body_idle_timeout_seconds: Some(1), backend, ..Default::default() }).await;
    let (_, token) = app.session_with_user(1).await;
    let before = app.footprint().await;
    let head = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file_asset\"\r\n\r\n{GOOD_FILE_ASSET}\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"slow.bin\"\r\n\r\nsome bytes"
    );
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let request = format!(
        "POST /file/api/assets HTTP/1.1\r\nHost: x\r\nAuthorization: OpenTera {token}\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: 100000\r\n\r\n{head}"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut answer)).await.unwrap().unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    assert_eq!(app.footprint().await, before);
}

/// RFC 5987 names are read; parameters that merely contain "filename" are not names.
async fn extended_filenames_are_understood(backend: Backend) {
    let app = TestApp::on(backend).await;
    let (_, token) = app.session_with_user(1).await;
    let part = |disposition: &str| {
        (format!("Content-Disposition: form-data; name=\"file\"; {disposition}").into_bytes(), b"x".to_vec())
    };
    let euro =
        post_raw(&app, &token, &[file_asset_part(GOOD_FILE_ASSET), part("filename*=UTF-8''%E2%82%AC.txt")]).await;
    assert_eq!(euro.status(), 200);
    assert_eq!(euro.json::<serde_json::Value>().await.unwrap()["asset_original_filename"], "€.txt");
    let hint = post_raw(&app, &token, &[file_asset_part(GOOD_FILE_ASSET), part("x-filename-hint=\"y\"")]).await;
    assert_eq!(hint.status(), 200, "no filename: the asset name stands in");
    let latin1 =
        post_raw(&app, &token, &[file_asset_part(GOOD_FILE_ASSET), part("filename*=ISO-8859-1''%E9.txt")]).await;
    assert_eq!(latin1.json::<serde_json::Value>().await.unwrap()["asset_original_filename"], "é.txt");
    let both = post_raw(
        &app,
        &token,
        &[file_asset_part(GOOD_FILE_ASSET), part("filename=\"fallback.txt\"; filename*=UTF-8''r%C3%A9el.txt")],
    )
    .await;
    assert_eq!(
        both.json::<serde_json::Value>().await.unwrap()["asset_original_filename"],
        "réel.txt",
        "filename* wins"
    );
    let unknown_charset =
        post_raw(&app, &token, &[file_asset_part(GOOD_FILE_ASSET), part("filename*=KOI8-R''%E9.txt")]).await;
    assert_error(unknown_charset, 422, "invalid_field").await;
}

on_both_backends!(
    a_sigkill_during_an_upload_leaves_nothing_visible_and_the_restart_cleans_up,
    malformed_forms_are_refused_and_leave_nothing,
    bodies_over_the_limit_get_413_whether_declared_or_streamed,
    a_client_disconnecting_mid_upload_leaves_nothing,
    many_concurrent_disconnecting_uploads_leave_nothing_and_memory_comes_back,
    a_stalled_upload_times_out_with_408,
    extended_filenames_are_understood,
    garbage_requests_get_json_errors_not_500s,
);

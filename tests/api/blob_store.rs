//! The S3 backend's own behaviour, beyond the asset suite that runs on both backends
//! (`on_both_backends!`): an unreachable bucket, presigned downloads, a missing bucket
//! at start, imports into multipart objects.

use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::{assert_error, pseudo_random_bytes, sha256_hex, Backend, TcpProxy, TestApp, TestOptions};
use crate::s3::TestBucket;

/// The bucket out of reach (its endpoint cut) is a 503 with `Retry-After` for uploads and
/// downloads, `/ready` says so, nothing is left of the refused upload, and everything
/// works again once the bucket is back.
#[tokio::test]
async fn an_unreachable_bucket_is_a_503_and_everything_resumes_when_it_is_back() {
    let endpoint = crate::s3::s3_endpoint().expect("ASSETD_TEST_S3_ENDPOINT");
    let proxy = TcpProxy::start(endpoint.trim_start_matches("http://").to_owned()).await;
    let options = TestOptions {
        backend: Backend::S3,
        s3_endpoint: Some(format!("http://127.0.0.1:{}", proxy.port)),
        ..Default::default()
    };
    let app = TestApp::spawn_with(options).await;
    let (_, token) = app.session_with_user(1).await;
    let before = pseudo_random_bytes(5, 300_000);
    let stored = app.upload_ok(&token, 1, "before.bin", &before).await;
    let download_path = format!("/api/assets?asset_uuid={}", stored["asset_uuid"].as_str().unwrap());
    let (events, assets) = (app.event_count().await, app.scalar("SELECT count(*) FROM assets").await);

    proxy.cut();
    for size in [1000, 7 << 20] {
        let refused =
            app.upload(&token, &json!({"id_session": 1, "asset_name": "during"}), "during.bin", vec![1; size]).await;
        assert_eq!(refused.headers().get("retry-after").map(|v| v.to_str().unwrap()), Some("5"), "{size} bytes");
        assert_error(refused, 503, "unavailable").await;
    }
    let download = app.get(&token, &download_path).await;
    assert_error(download, 503, "unavailable").await;
    let ready = app.get("", "/ready").await;
    assert_eq!(ready.status(), 503);
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(ready["checks"]["blobs"], "unreachable", "{ready}");
    assert_eq!(ready["checks"]["database"], "ok", "{ready}");
    assert_eq!(app.event_count().await, events, "no event for the refused uploads");
    assert_eq!(app.scalar("SELECT count(*) FROM assets").await, assets);
    assert_eq!(TestApp::files_under(&app.tmp_dir()), 0, "no temporary file");

    proxy.restore();
    let ready: Value = app.get("", "/ready").await.json().await.unwrap();
    assert_eq!(ready["checks"]["blobs"], "ok", "{ready}");
    let download = app.get(&token, &download_path).await;
    assert_eq!(download.status(), 200);
    assert_eq!(download.bytes().await.unwrap().as_ref(), &before[..]);
    app.upload_ok(&token, 1, "after.bin", &[2; 6 << 20]).await;
    let bucket = app.bucket.as_ref().unwrap();
    // What the cut left open (a multipart upload whose abort could not reach the bucket
    // then) is the lifecycle rule's; the bucket holds exactly the two stored objects.
    assert_eq!(bucket.object_keys().await.len(), 2);
}

/// With `ASSETD_S3_PRESIGNED_SECONDS`, a plain download answers 302 to a presigned GET
/// of the object, which gives the bytes without any assetd credentials; a range request
/// is still answered by assetd (206).
#[tokio::test]
async fn presigned_downloads_redirect_to_the_object() {
    let app =
        TestApp::spawn_with(TestOptions { backend: Backend::S3, s3_presigned_seconds: 60, ..Default::default() }).await;
    let (_, token) = app.session_with_user(1).await;
    let bytes = pseudo_random_bytes(7, 6 << 20);
    let info = app.upload_ok(&token, 1, "p.bin", &bytes).await;
    let path = format!("/api/assets?asset_uuid={}", info["asset_uuid"].as_str().unwrap());
    let redirect = app.get(&token, &path).await;
    assert_eq!(redirect.status(), 302);
    let location = redirect.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.contains("X-Amz-Signature=") && location.contains("X-Amz-Expires=60"), "{location}");
    let fetched = reqwest::get(&location).await.unwrap();
    assert_eq!(fetched.status(), 200);
    assert_eq!(sha256_hex(&fetched.bytes().await.unwrap()), sha256_hex(&bytes));
    let range = app.client.get(app.url(&path)).bearer_auth(&token).header("Range", "bytes=0-9").send().await.unwrap();
    assert_eq!(range.status(), 206);
    assert_eq!(range.bytes().await.unwrap().as_ref(), &bytes[..10]);
}

/// `serve` with a bucket that does not exist stops at once and says why.
#[tokio::test]
async fn serve_stops_at_once_when_its_bucket_does_not_exist() {
    let app = TestApp::spawn().await;
    let bucket = TestBucket { endpoint: crate::s3::s3_endpoint().unwrap(), name: "assetd-no-such-bucket".into() };
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_assetd"))
            .arg("serve")
            .envs(bucket.env("assets"))
            .env("ASSETD_DATABASE_URL", &app.db.url)
            .env("ASSETD_JWT_SECRET", crate::helpers::JWT_SECRET)
            .env("ASSETD_URL_SIGNING_KEY", "k")
            .env("ASSETD_LISTEN", "127.0.0.1:0")
            .env("ASSETD_DATA_DIR", app.data_dir.path())
            .output(),
    )
    .await
    .expect("serve stops at once")
    .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("assetd-no-such-bucket") && stderr.contains("does the bucket exist"), "{stderr}");
}

/// Two processes on one database and one bucket: what one changes (a rename, a member
/// removed, a deletion) the other never serves from what it kept of the asset or the
/// session, and the one that made the change sees it at once.
#[tokio::test]
async fn kept_records_never_outlive_a_change_made_by_any_process() {
    let app = TestApp::on(Backend::S3).await;
    let data_dir = tempfile::tempdir().unwrap();
    let (_other, other_addr) = crate::helpers::serve_process(&app, data_dir.path());
    crate::helpers::wait_until_serving(other_addr).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !app.ctx.app.read_cache.is_live() {
        assert!(tokio::time::Instant::now() < deadline, "the read cache never listens");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (user, token) = app.session_with_user(1).await;
    let info = app.upload_ok(&token, 1, "first.bin", b"kept").await;
    let path = format!("/file/api/assets?asset_uuid={}", info["asset_uuid"].as_str().unwrap());
    let here = format!("http://{}{path}", app.addr);
    let there = format!("http://{other_addr}{path}");
    let get = |url: String| {
        let token = token.clone();
        async move { reqwest::Client::new().get(url).bearer_auth(token).send().await.unwrap() }
    };
    for url in [&here, &there, &here, &there] {
        assert_eq!(get(url.clone()).await.status(), 200, "{url}: read (and kept)");
    }
    // Within two seconds at the other process; at once where the change was made.
    let eventually = |url: String, expect: &'static (dyn Fn(&reqwest::Response) -> bool + Sync)| async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        loop {
            let response = get(url.clone()).await;
            if expect(&response) {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "{url}: {:?}", response.headers());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let renamed = app
        .post_json(
            &token,
            "/api/assets/infos",
            &json!({"file_asset": {"asset_uuid": info["asset_uuid"], "asset_original_filename": "second.bin"}}),
        )
        .await;
    assert_eq!(renamed.status(), 200);
    static NEW_NAME: fn(&reqwest::Response) -> bool =
        |r| r.headers().get("content-disposition").is_some_and(|v| v.to_str().unwrap().contains("second.bin"));
    assert!(NEW_NAME(&get(here.clone()).await), "the renaming process sees the new name at once");
    eventually(there.clone(), &NEW_NAME).await;

    // The user leaves the session: no more access, anywhere.
    let members = json!({"session_name": "session 1", "session_users": []});
    assert_eq!(app.put_session(&app.service_token(), 1, &members).await.status(), 200);
    static FORBIDDEN: fn(&reqwest::Response) -> bool = |r| r.status() == 403;
    assert!(FORBIDDEN(&get(here.clone()).await), "the process that changed the session refuses at once");
    eventually(there.clone(), &FORBIDDEN).await;

    // Back in, then the asset is deleted: 404 everywhere.
    let members = json!({"session_name": "session 1", "session_users": [user]});
    assert_eq!(app.put_session(&app.service_token(), 1, &members).await.status(), 200);
    static OK: fn(&reqwest::Response) -> bool = |r| r.status() == 200;
    eventually(there.clone(), &OK).await;
    let uuid = info["asset_uuid"].as_str().unwrap();
    assert_eq!(app.delete(&token, &format!("/api/assets?uuid={uuid}")).await.status(), 200);
    static GONE: fn(&reqwest::Response) -> bool = |r| r.status() == 404;
    assert!(GONE(&get(here.clone()).await), "the deleting process answers 404 at once");
    eventually(there.clone(), &GONE).await;
}

/// The bucket deleted under a running deployment is the store gone (503, like an
/// unreachable one), not a missing blob (500) or a missing asset.
#[tokio::test]
async fn a_bucket_deleted_under_a_running_server_is_a_503() {
    let app = TestApp::on(Backend::S3).await;
    let (_, token) = app.session_with_user(1).await;
    let info = app.upload_ok(&token, 1, "a.bin", b"bytes").await;
    app.bucket.as_ref().unwrap().delete_everything().await;
    let download = app.get(&token, &format!("/api/assets?asset_uuid={}", info["asset_uuid"].as_str().unwrap())).await;
    assert_error(download, 503, "unavailable").await;
    let upload = app.upload(&token, &json!({"id_session": 1, "asset_name": "b"}), "b.bin", vec![1; 100]).await;
    assert_error(upload, 503, "unavailable").await;
    assert_eq!(app.get("", "/ready").await.status(), 503);
}

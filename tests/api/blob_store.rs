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
    assert!(stderr.contains("assetd-no-such-bucket") && stderr.contains("must exist"), "{stderr}");
}

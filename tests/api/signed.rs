//! Signed URLs and two-phase uploads (API.md "Signed URLs and two-phase uploads"): signed
//! download URLs (headers, ranges, tampering, expiry, key rotation, CORS), uploads that
//! are created, sent with one PUT to a signed URL and then committed or imported by a job,
//! their expiry, the helpers for devices that cannot set headers, a browser on another
//! origin, a 1 GiB PUT in flat memory, and all of it through nginx.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use assetd::auth::UrlSigner;
use futures::StreamExt;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::helpers::{
    assert_error, pseudo_random_bytes, serve_process, sha256_hex, vm_rss_kib, wait_until_serving, Backend, TestApp,
    TestOptions, URL_SIGNING_KEY,
};
use crate::jobs::{quick_jobs, system_ctx, Jobs};
use crate::nginx::Nginx;

/// Seconds since the Unix epoch, now.
fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// An `expires_at` as Unix seconds, whether the answer gives a number or an RFC 3339 time.
fn unix_seconds(value: &Value) -> i64 {
    match value {
        Value::Number(number) => number.as_i64().unwrap_or_else(|| panic!("not whole seconds: {number}")),
        Value::String(text) => {
            chrono::DateTime::parse_from_rfc3339(text).unwrap_or_else(|e| panic!("{text}: {e}")).timestamp()
        }
        other => panic!("not a time: {other}"),
    }
}

/// The string field `field` of `value`, which must be there.
fn text(value: &Value, field: &str) -> String {
    value[field].as_str().unwrap_or_else(|| panic!("no string {field} in {value}")).to_owned()
}

/// The sorted keys of a JSON object.
fn keys(value: &Value) -> Vec<String> {
    let mut keys: Vec<String> =
        value.as_object().unwrap_or_else(|| panic!("not an object: {value}")).keys().cloned().collect();
    keys.sort();
    keys
}

/// The value of query parameter `name` in `url`.
fn query_param(url: &str, name: &str) -> Option<String> {
    reqwest::Url::parse(url)
        .unwrap_or_else(|e| panic!("{url}: {e}"))
        .query_pairs()
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.into_owned())
}

/// `url` with query parameter `name` set to `value` (put last).
fn with_param(url: &str, name: &str, value: &str) -> String {
    edit_query(url, name, Some(value))
}

/// `url` without query parameter `name`.
fn without_param(url: &str, name: &str) -> String {
    edit_query(url, name, None)
}

fn edit_query(url: &str, name: &str, value: Option<&str>) -> String {
    let mut parsed = reqwest::Url::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"));
    let kept: Vec<(String, String)> = parsed
        .query_pairs()
        .filter(|(key, _)| *key != name)
        .map(|(key, value)| (key.into_owned(), value.into_owned()))
        .collect();
    parsed.set_query(None);
    {
        let mut query = parsed.query_pairs_mut();
        for (key, value) in &kept {
            query.append_pair(key, value);
        }
        if let Some(value) = value {
            query.append_pair(name, value);
        }
    }
    parsed.to_string()
}

/// `<path>?expires=<E>&signature=<S>`, signed with `key` for `method`.
fn sign_path(key: &str, method: &str, path: &str, expires: i64) -> String {
    let signature = UrlSigner::new(key.to_owned(), None).sign(method, path, expires);
    format!("{path}?expires={expires}&signature={signature}")
}

/// A signed download URL of `app` made by the test itself.
fn signed_download(app: &TestApp, key: &str, uuid: &str, expires: i64) -> String {
    format!("http://{}{}", app.addr, sign_path(key, "GET", &format!("/file/api/signed/assets/{uuid}"), expires))
}

/// A signed upload URL of `app` made by the test itself.
fn signed_upload(app: &TestApp, key: &str, uuid: &str, expires: i64) -> String {
    format!("http://{}{}", app.addr, sign_path(key, "PUT", &format!("/file/api/signed/uploads/{uuid}"), expires))
}

/// Asserts an error answer's status and code, naming the case when it fails.
async fn assert_refused(response: reqwest::Response, status: u16, code: &str, case: &str) {
    let actual = response.status().as_u16();
    let text = response.text().await.unwrap();
    let body: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{case}: error body is not JSON: {text}"));
    assert_eq!((actual, body["error"]["code"].as_str()), (status, Some(code)), "{case}: {body}");
}

/// A chunked body (no Content-Length) of `bytes`, in chunks of `chunk` bytes.
fn chunked(bytes: &[u8], chunk: usize) -> reqwest::Body {
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = bytes.chunks(chunk).map(|c| Ok(c.to_vec())).collect();
    reqwest::Body::wrap_stream(futures::stream::iter(chunks))
}

/// Polls the upload until `status` (30 s at most); returns it.
async fn until_upload(app: &TestApp, token: &str, uuid: &str, status: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let upload = app.upload_status(token, uuid).await;
        if upload["status"] == status {
            return upload;
        }
        assert!(tokio::time::Instant::now() < deadline, "upload {uuid} never became {status}: {upload}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asserts that events, assets, temporary files and blobs are back to `before` (within
/// 10 s: an aborted S3 upload may take a moment).
async fn assert_nothing_kept(app: &TestApp, before: (i64, i64, usize, usize), case: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while app.footprint().await != before && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(app.footprint().await, before, "{case}: something was kept (events, assets, temporary files, blobs)");
}

/// `POST /api/assets/{uuid}/download-url<query>`.
async fn ask_download_url(app: &TestApp, token: &str, uuid: &str, query: &str) -> reqwest::Response {
    app.post_empty(token, &format!("/api/assets/{uuid}/download-url{query}")).await
}

/// `assetd_download_sent_bytes_total`: bytes assetd streamed itself.
async fn download_sent_bytes(app: &TestApp) -> u64 {
    let text = app.get("", "/metrics").await.text().await.unwrap();
    let line = text.lines().find(|l| l.starts_with("assetd_download_sent_bytes_total ")).expect("the metric");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

// ---------------------------------------------------------------------------------------
// Signed downloads

on_both_backends!(a_signed_download_url_answers_like_the_download_without_authorization);

async fn a_signed_download_url_answers_like_the_download_without_authorization(backend: Backend) {
    let app = TestApp::on(backend).await;
    let (_, token) = app.session_with_user(1).await;
    let bytes = pseudo_random_bytes(3, 1000);
    let info = app.upload_ok(&token, 1, "report.pdf", &bytes).await;
    let uuid = text(&info, "asset_uuid");
    let before = now();
    let answer = app.download_url(&token, &uuid).await;
    let url = text(&answer, "download_url");
    assert!(url.starts_with(&format!("http://{}/file/api/signed/assets/{uuid}?", app.addr)), "absolute: {answer}");
    let expires_at = unix_seconds(&answer["expires_at"]);
    assert!(
        (before + 900 - 1..=now() + 900 + 1).contains(&expires_at),
        "valid 15 minutes by default: {answer} (now {})",
        now()
    );
    assert_eq!(query_param(&url, "expires"), Some(expires_at.to_string()), "the URL expires when the answer says");
    assert!(query_param(&url, "signature").is_some_and(|s| s.len() == 64), "{url}");

    // The same answer as the download with Authorization, with none.
    let normal = app.get(&token, &format!("/api/assets?asset_uuid={uuid}")).await;
    assert_eq!(normal.status(), 200);
    let signed = app.client.get(url.as_str()).send().await.unwrap();
    assert_eq!(signed.status(), 200);
    for name in ["content-type", "content-length", "content-disposition", "etag", "accept-ranges", "last-modified"] {
        assert!(signed.headers().get(name).is_some(), "{name} is set");
        assert_eq!(signed.headers().get(name), normal.headers().get(name), "{name} as in the download");
    }
    assert_eq!(signed.headers()["content-type"], "application/pdf");
    assert_eq!(signed.headers()["access-control-allow-origin"], "*");
    assert_eq!(signed.bytes().await.unwrap().as_ref(), &bytes[..]);

    // Ranges.
    let ranged = app.client.get(url.as_str()).header("Range", "bytes=10-19").send().await.unwrap();
    assert_eq!(ranged.status(), 206);
    assert_eq!(ranged.headers()["content-range"], "bytes 10-19/1000");
    assert_eq!(ranged.bytes().await.unwrap().as_ref(), &bytes[10..20]);
    let suffix = app.client.get(url.as_str()).header("Range", "bytes=-5").send().await.unwrap();
    assert_eq!(suffix.status(), 206);
    assert_eq!(suffix.bytes().await.unwrap().as_ref(), &bytes[995..]);
    let past_the_end = app.client.get(url.as_str()).header("Range", "bytes=1000-").send().await.unwrap();
    assert_eq!(past_the_end.headers()["content-range"], "bytes */1000");
    assert_error(past_the_end, 416, "range_not_satisfiable").await;

    // Conditional requests.
    let etag = format!("\"sha256:{}\"", sha256_hex(&bytes));
    let cached = app.client.get(url.as_str()).header("If-None-Match", etag.as_str()).send().await.unwrap();
    assert_eq!(cached.status(), 304);
    assert_eq!(cached.headers()["etag"].to_str().unwrap(), etag);
    assert!(cached.bytes().await.unwrap().is_empty());
    let stale = app.client.get(url.as_str()).header("If-None-Match", "\"other\"").send().await.unwrap();
    assert_eq!(stale.status(), 200);

    // HEAD is checked as the GET it precedes.
    let head = app.client.head(url.as_str()).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"], "1000");
    assert_eq!(head.headers()["etag"].to_str().unwrap(), etag);
    assert!(head.bytes().await.unwrap().is_empty());
}

#[tokio::test]
async fn signed_urls_answer_cross_origin_requests() {
    let app = TestApp::spawn().await;
    let (_, token) = app.session_with_user(1).await;
    let info = app.upload_ok(&token, 1, "cors.bin", b"shared across origins").await;
    let url = text(&app.download_url(&token, &text(&info, "asset_uuid")).await, "download_url");
    let origin = "http://elsewhere.example";

    let get = app.client.get(url.as_str()).header("Origin", origin).send().await.unwrap();
    assert_eq!(get.status(), 200);
    assert_eq!(get.headers()["access-control-allow-origin"], "*");
    let exposed = get.headers()["access-control-expose-headers"].to_str().unwrap().to_ascii_lowercase();
    for name in ["content-length", "content-range", "etag", "content-disposition", "accept-ranges"] {
        assert!(exposed.split(',').any(|h| h.trim() == name), "{name} is exposed: {exposed}");
    }

    // Preflights, for the download and for an upload's PUT.
    let created = app.create_upload_ok(&token, &json!({"id_session": 1, "filename": "cors-up.bin"})).await;
    let upload_url = text(&created, "upload_url");
    for (url, method) in [(&url, "GET"), (&upload_url, "PUT")] {
        let preflight = app
            .client
            .request(reqwest::Method::OPTIONS, url.as_str())
            .header("Origin", origin)
            .header("Access-Control-Request-Method", method)
            .send()
            .await
            .unwrap();
        assert_eq!(preflight.status(), 204, "preflight of a {method}");
        assert_eq!(preflight.headers()["access-control-allow-origin"], "*");
        let allowed = preflight.headers()["access-control-allow-methods"].to_str().unwrap().to_owned();
        for method in ["GET", "HEAD", "PUT", "OPTIONS"] {
            assert!(allowed.split(',').any(|m| m.trim() == method), "{method} is allowed: {allowed}");
        }
    }

    // The PUT's answer, and refusals too (a browser reads neither without it).
    let put = app.client.put(upload_url.as_str()).header("Origin", origin).body("from afar").send().await.unwrap();
    assert_eq!(put.status(), 200);
    assert_eq!(put.headers()["access-control-allow-origin"], "*");
    let forged = with_param(&url, "signature", &"0".repeat(64));
    let refused = app.client.get(forged.as_str()).header("Origin", origin).send().await.unwrap();
    assert_eq!(refused.headers().get("access-control-allow-origin").map(|v| v.to_str().unwrap()), Some("*"));
    assert_error(refused, 403, "invalid_signature").await;
}

#[tokio::test]
async fn tampered_signed_download_urls_are_refused() {
    let app = TestApp::spawn().await;
    let (_, token) = app.session_with_user(1).await;
    let first = text(&app.upload_ok(&token, 1, "a.bin", b"first").await, "asset_uuid");
    let second = text(&app.upload_ok(&token, 1, "b.bin", b"second").await, "asset_uuid");
    let url = text(&app.download_url(&token, &first).await, "download_url");
    assert_eq!(app.client.get(url.as_str()).send().await.unwrap().status(), 200, "the URL as given works");

    let expires: i64 = query_param(&url, "expires").unwrap().parse().unwrap();
    let signature = query_param(&url, "signature").unwrap();
    let mut flipped = signature.clone().into_bytes();
    flipped[0] = if flipped[0] == b'0' { b'1' } else { b'0' };
    let flipped = String::from_utf8(flipped).unwrap();
    let path = format!("/file/api/signed/assets/{first}");
    let put_signature = UrlSigner::new(URL_SIGNING_KEY.into(), None).sign("PUT", &path, expires);
    let cases = [
        ("another asset's path", url.replace(&first, &second)),
        ("a later expiry", with_param(&url, "expires", &(expires + 3600).to_string())),
        ("an earlier expiry", with_param(&url, "expires", &(expires - 1).to_string())),
        ("a padded expiry", with_param(&url, "expires", &format!("0{expires}"))),
        ("another signature", with_param(&url, "signature", &flipped)),
        ("a truncated signature", with_param(&url, "signature", &signature[..32])),
        ("a longer signature", with_param(&url, "signature", &format!("{signature}00"))),
        ("a signature that is not hex", with_param(&url, "signature", &"z".repeat(64))),
        ("no expires", without_param(&url, "expires")),
        ("no signature", without_param(&url, "signature")),
        ("no query", url.split('?').next().unwrap().to_owned()),
        ("a PUT's signature", with_param(&url, "signature", &put_signature)),
        ("another key", signed_download(&app, "another-key", &first, expires)),
    ];
    for (case, tampered) in cases {
        let response = app.client.get(tampered.as_str()).send().await.unwrap();
        assert_refused(response, 403, "invalid_signature", case).await;
        let head = app.client.head(tampered.as_str()).send().await.unwrap();
        assert_eq!(head.status(), 403, "{case}: HEAD");
    }
    // A download's signature does not open the upload route.
    let upload_route =
        format!("http://{}/file/api/signed/uploads/{first}?expires={expires}&signature={signature}", app.addr);
    let put = app.client.put(upload_route.as_str()).body("nope").send().await.unwrap();
    assert_refused(put, 403, "invalid_signature", "a GET's signature on a PUT").await;
    assert_eq!(app.scalar("SELECT count(*) FROM events WHERE stream LIKE 'upload-%'").await, 0);
}

#[tokio::test]
async fn an_expired_signed_download_url_is_refused_as_expired() {
    let app = TestApp::spawn().await;
    let (_, token) = app.session_with_user(1).await;
    let uuid = text(&app.upload_ok(&token, 1, "old.bin", b"old news").await, "asset_uuid");
    let expired = signed_download(&app, URL_SIGNING_KEY, &uuid, now() - 10);
    assert_error(app.client.get(expired.as_str()).send().await.unwrap(), 403, "url_expired").await;
    // A forged URL is "invalid" whatever its expiry: only our own URLs learn they expired.
    let forged = signed_download(&app, "another-key", &uuid, now() - 10);
    assert_error(app.client.get(forged.as_str()).send().await.unwrap(), 403, "invalid_signature").await;

    // Valid until its second, refused after.
    let soon = signed_download(&app, URL_SIGNING_KEY, &uuid, now() + 2);
    let response = app.client.get(soon.as_str()).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.bytes().await.unwrap().as_ref(), b"old news");
    tokio::time::sleep(Duration::from_millis(3100)).await;
    assert_error(app.client.get(soon.as_str()).send().await.unwrap(), 403, "url_expired").await;
}

#[tokio::test]
async fn signed_downloads_of_deleted_or_unknown_assets_are_not_found() {
    let app = TestApp::spawn().await;
    let (_, token) = app.session_with_user(1).await;
    let uuid = text(&app.upload_ok(&token, 1, "gone.bin", b"soon gone").await, "asset_uuid");
    let url = text(&app.download_url(&token, &uuid).await, "download_url");
    assert_eq!(app.delete(&token, &format!("/api/assets?uuid={uuid}")).await.status(), 200);
    assert_error(app.client.get(url.as_str()).send().await.unwrap(), 404, "not_found").await;
    assert_eq!(app.client.head(url.as_str()).send().await.unwrap().status(), 404);
    assert_error(ask_download_url(&app, &token, &uuid, "").await, 404, "not_found").await;

    let unknown = Uuid::new_v4().to_string();
    assert_error(ask_download_url(&app, &token, &unknown, "").await, 404, "not_found").await;
    let signed = signed_download(&app, URL_SIGNING_KEY, &unknown, now() + 600);
    assert_error(app.client.get(signed.as_str()).send().await.unwrap(), 404, "not_found").await;
}

#[tokio::test]
async fn download_url_lifetimes_are_validated_and_clamped() {
    let app = TestApp::spawn().await;
    let (_, token) = app.session_with_user(1).await;
    let uuid = text(&app.upload_ok(&token, 1, "t.bin", b"timed").await, "asset_uuid");

    let before = now();
    let response = ask_download_url(&app, &token, &uuid, "?expires_in=60").await;
    assert_eq!(response.status(), 200);
    let minute: Value = response.json().await.unwrap();
    let expires_at = unix_seconds(&minute["expires_at"]);
    assert!((before + 59..=now() + 61).contains(&expires_at), "a minute: {minute}");

    // Above the longest lifetime (a week): cut to it.
    let before = now();
    let response = ask_download_url(&app, &token, &uuid, "?expires_in=100000000").await;
    assert_eq!(response.status(), 200);
    let clamped: Value = response.json().await.unwrap();
    let expires_at = unix_seconds(&clamped["expires_at"]);
    assert!(expires_at <= now() + 604_800 + 5, "clamped to a week: {clamped}");
    assert!(expires_at >= before + 604_800 - 5, "a week, not less: {clamped}");
    let url = text(&clamped, "download_url");
    assert_eq!(query_param(&url, "expires"), Some(expires_at.to_string()));
    assert_eq!(app.client.get(url.as_str()).send().await.unwrap().status(), 200);

    for bad in ["0", "-1", "abc", "1.5", "0x10"] {
        let response = ask_download_url(&app, &token, &uuid, &format!("?expires_in={bad}")).await;
        assert_refused(response, 400, "invalid_parameter", &format!("expires_in={bad}")).await;
    }

    // Asking needs the right to download.
    let anonymous = app.client.post(app.url(&format!("/api/assets/{uuid}/download-url"))).body("").send().await;
    assert_eq!(anonymous.unwrap().status(), 401);
    let stranger = app.user_token(Uuid::new_v4());
    assert_error(ask_download_url(&app, &stranger, &uuid, "").await, 403, "forbidden").await;
}

#[tokio::test]
async fn urls_signed_with_the_previous_key_still_verify() {
    let options = TestOptions { url_signing_key_previous: Some("old".into()), ..Default::default() };
    let app = TestApp::spawn_with(options).await;
    let (_, token) = app.session_with_user(1).await;
    let uuid = text(&app.upload_ok(&token, 1, "rotated.bin", b"rotated").await, "asset_uuid");

    let by_old = signed_download(&app, "old", &uuid, now() + 600);
    let response = app.client.get(by_old.as_str()).send().await.unwrap();
    assert_eq!(response.status(), 200, "signed with the previous key");
    assert_eq!(response.bytes().await.unwrap().as_ref(), b"rotated");
    let by_other = signed_download(&app, "other", &uuid, now() + 600);
    assert_error(app.client.get(by_other.as_str()).send().await.unwrap(), 403, "invalid_signature").await;
    let expired_old = signed_download(&app, "old", &uuid, now() - 5);
    assert_error(app.client.get(expired_old.as_str()).send().await.unwrap(), 403, "url_expired").await;

    // New URLs are signed with the current key only.
    let url = text(&app.download_url(&token, &uuid).await, "download_url");
    let parsed = reqwest::Url::parse(&url).unwrap();
    let expires: i64 = query_param(&url, "expires").unwrap().parse().unwrap();
    let current = UrlSigner::new(URL_SIGNING_KEY.into(), None).sign("GET", parsed.path(), expires);
    assert_eq!(query_param(&url, "signature"), Some(current));

    // Upload URLs too.
    let created = app.create_upload_ok(&token, &json!({"id_session": 1, "filename": "up.bin"})).await;
    let upload = text(&created, "upload_uuid");
    let expires = unix_seconds(&created["expires_at"]);
    let by_old = signed_upload(&app, "old", &upload, expires);
    let by_other = signed_upload(&app, "other", &upload, expires);
    assert_error(app.put_signed(&by_other, b"x".to_vec()).await, 403, "invalid_signature").await;
    let put = app.put_signed(&by_old, b"by the old key".to_vec()).await;
    assert_eq!(put.status(), 200, "an upload URL signed with the previous key");
    assert_eq!(app.upload_status(&token, &upload).await["sha256"], sha256_hex(b"by the old key"));
}

// ---------------------------------------------------------------------------------------
// Two-phase uploads

on_both_backends!(a_two_phase_upload_is_received_committed_and_downloaded);

async fn a_two_phase_upload_is_received_committed_and_downloaded(backend: Backend) {
    let app = TestApp::on(backend).await;
    let (user, token) = app.session_with_user(1).await;
    // More than one S3 part (5 MiB in the tests).
    let bytes = pseudo_random_bytes(21, (6 << 20) + 123);
    let sha = sha256_hex(&bytes);
    let before = now();
    let response = app
        .create_upload(
            &token,
            &json!({"id_session": 1, "filename": "scan.raw", "mime_type": "application/x-scan",
                    "size": bytes.len(), "sha256": sha}),
        )
        .await;
    assert_eq!(response.status(), 201);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let created: Value = response.json().await.unwrap();
    let uuid = text(&created, "upload_uuid");
    assert_eq!(created["status_url"], location.as_str(), "Location is the status URL");
    assert!(location.ends_with(&format!("/file/api/uploads/{uuid}")), "{location}");
    let upload_url = text(&created, "upload_url");
    assert!(upload_url.starts_with(&format!("http://{}/file/api/signed/uploads/{uuid}?", app.addr)), "{created}");
    let expires_at = unix_seconds(&created["expires_at"]);
    assert!((before + 86_400 - 1..=now() + 86_400 + 1).contains(&expires_at), "a day: {created}");

    let pending = app.upload_status(&token, &uuid).await;
    assert_eq!(pending["upload_uuid"], uuid.as_str());
    assert_eq!(pending["status"], "pending");
    assert_eq!(pending["id_session"], 1);
    assert_eq!(pending["filename"], "scan.raw");
    assert_eq!(pending["mime_type"], "application/x-scan");
    assert_eq!(pending["expected_size"], bytes.len());
    assert_eq!(pending["expected_sha256"], sha.as_str());
    assert_eq!(pending["size"], Value::Null);
    assert_eq!(pending["sha256"], Value::Null);
    assert_eq!(pending["asset_uuid"], Value::Null);
    assert_eq!(pending["error"], Value::Null);
    assert_eq!(unix_seconds(&pending["expires_at"]), expires_at);
    assert_eq!(app.events_of(&format!("upload-{uuid}")).await, ["UploadStarted"]);

    // The bytes, with no Authorization, streamed.
    let blobs = app.blob_count().await;
    let put = app.client.put(upload_url.as_str()).body(chunked(&bytes, 256 * 1024)).send().await.unwrap();
    assert_eq!(put.status(), 200);
    assert_eq!(put.headers()["etag"].to_str().unwrap(), format!("\"sha256:{sha}\""));
    let received: Value = put.json().await.unwrap();
    assert_eq!(received["upload_uuid"], uuid.as_str());
    assert_eq!(received["status"], "received");
    assert_eq!(received["size"], bytes.len());
    assert_eq!(received["sha256"], sha.as_str());
    let status = app.upload_status(&token, &uuid).await;
    assert_eq!(status["status"], "received");
    assert_eq!(status["size"], bytes.len());
    assert_eq!(status["sha256"], sha.as_str());
    assert_eq!(app.blob_count().await, blobs + 1, "the bytes are stored");
    assert_eq!(TestApp::files_under(&app.tmp_dir()), 0, "no temporary file is left");
    assert_eq!(app.scalar("SELECT count(*) FROM assets").await, 0, "not an asset yet");

    // Committed: the asset, as a multipart upload's answer.
    let response = app
        .commit_upload(
            &token,
            &uuid,
            &json!({"asset_name": "Scan", "directory": "/scans", "tags": ["raw"], "metadata": {"camera": 2},
                    "asset_datetime": "2026-01-02T03:04:05Z"}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let info: Value = response.json().await.unwrap();
    assert_eq!(info["asset_uuid"], uuid.as_str(), "the asset has the upload's uuid");
    assert_eq!(info["asset_source"], "signed_upload");
    assert_eq!(info["id_session"], 1);
    assert_eq!(info["asset_name"], "Scan");
    assert_eq!(info["asset_original_filename"], "scan.raw");
    assert_eq!(info["asset_type"], "application/x-scan");
    assert_eq!(info["asset_file_size"], bytes.len());
    assert_eq!(info["asset_sha256"], sha.as_str());
    assert_eq!(info["directory"], "/scans");
    assert_eq!(info["tags"], json!(["raw"]));
    assert_eq!(info["metadata"], json!({"camera": 2}));
    assert_eq!(info["asset_datetime"], "2026-01-02T03:04:05Z");
    assert_eq!(info["asset_status"], "available");
    assert_eq!(info["asset_creator"], json!({"kind": "user", "uuid": user}));
    assert!(info["access_token"].as_str().is_some_and(|t| t.len() > 20), "{info}");
    assert_eq!(info["asset_url"], format!("http://{}/file/api/assets?asset_uuid={uuid}", app.addr));
    assert_eq!(info["asset_infos_url"], format!("http://{}/file/api/assets/infos?asset_uuid={uuid}", app.addr));
    assert_eq!(app.blob_count().await, blobs + 1, "committing moves no byte");

    let committed = app.upload_status(&token, &uuid).await;
    assert_eq!(committed["status"], "committed");
    assert_eq!(committed["asset_uuid"], uuid.as_str());

    let download = app.get(&token, &format!("/api/assets?asset_uuid={uuid}")).await;
    assert_eq!(download.status(), 200);
    assert_eq!(download.headers()["content-type"], "application/x-scan");
    assert_eq!(
        download.headers()["content-disposition"],
        "attachment; filename=\"scan.raw\"; filename*=UTF-8''scan.raw"
    );
    assert_eq!(download.bytes().await.unwrap().as_ref(), &bytes[..]);
    let infos: Value = app.get(&token, &format!("/api/assets/infos?asset_uuid={uuid}")).await.json().await.unwrap();
    assert_eq!(infos["asset_source"], "signed_upload");
    assert_eq!(infos["asset_sha256"], sha.as_str());

    // The events.
    assert_eq!(app.events_of(&format!("upload-{uuid}")).await, ["UploadStarted", "UploadReceived", "UploadCommitted"]);
    assert_eq!(app.events_of(&format!("asset-{uuid}")).await, ["AssetCommitted"]);
    let event = app.scalar_json(&format!("SELECT data FROM events WHERE stream = 'asset-{uuid}'")).await;
    assert_eq!(event["upload_uuid"], uuid.as_str(), "{event}");
    assert_eq!(event["asset_source"], "signed_upload", "{event}");
    let history: Value = app.get(&token, &format!("/api/assets/{uuid}/events")).await.json().await.unwrap();
    assert_eq!(history[0]["event_type"], "AssetCommitted", "{history}");

    // Once is all.
    let events = app.event_count().await;
    assert_error(app.commit_upload(&token, &uuid, &json!({"asset_name": "Again"})).await, 409, "conflict").await;
    assert_error(app.put_signed(&upload_url, bytes.clone()).await, 409, "conflict").await;
    assert_eq!(app.event_count().await, events, "no event for a refusal");
    assert_eq!(app.blob_count().await, blobs + 1);

    // The same shape as a multipart upload's answer.
    let multipart = app.upload_ok(&token, 1, "other.bin", b"other").await;
    assert_eq!(keys(&info), keys(&multipart));
}

#[tokio::test]
async fn an_upload_is_committed_only_once_its_bytes_are_received() {
    let app = TestApp::spawn().await;
    let (_, token) = app.session_with_user(1).await;
    let created = app.create_upload_ok(&token, &json!({"id_session": 1, "filename": "early.bin"})).await;
    let uuid = text(&created, "upload_uuid");
    let events = app.event_count().await;
    assert_error(app.commit_upload(&token, &uuid, &json!({"asset_name": "Early"})).await, 409, "conflict").await;
    assert_eq!(app.event_count().await, events);
    assert_eq!(app.upload_status(&token, &uuid).await["status"], "pending");

    // Unknown uploads: at the status, the commit and (well signed) the PUT.
    let unknown = Uuid::new_v4().to_string();
    assert_error(app.get(&token, &format!("/api/uploads/{unknown}")).await, 404, "not_found").await;
    assert_error(app.commit_upload(&token, &unknown, &json!({"asset_name": "x"})).await, 404, "not_found").await;
    let signed = signed_upload(&app, URL_SIGNING_KEY, &unknown, now() + 600);
    assert_error(app.put_signed(&signed, b"x".to_vec()).await, 404, "not_found").await;

    // Sent, then committed.
    let put = app.put_signed(&text(&created, "upload_url"), b"at last".to_vec()).await;
    assert_eq!(put.status(), 200);
    let response = app.commit_upload(&token, &uuid, &json!({"asset_name": "Early"})).await;
    assert_eq!(response.status(), 200);
    let info: Value = response.json().await.unwrap();
    assert_eq!(info["asset_file_size"], 7);
    assert_eq!(info["asset_sha256"], sha256_hex(b"at last"));
}

on_both_backends!(a_put_of_another_size_than_declared_keeps_nothing_and_a_retry_succeeds);

async fn a_put_of_another_size_than_declared_keeps_nothing_and_a_retry_succeeds(backend: Backend) {
    let app = TestApp::on(backend).await;
    let (_, token) = app.session_with_user(1).await;
    // More than one S3 part, so that a refusal has a multipart upload to abort.
    let size = (6 << 20) + 100;
    let bytes = pseudo_random_bytes(7, size);
    let created = app.create_upload_ok(&token, &json!({"id_session": 1, "filename": "sized.bin", "size": size})).await;
    let (uuid, url) = (text(&created, "upload_uuid"), text(&created, "upload_url"));
    let before = app.footprint().await;
    let longer = pseudo_random_bytes(7, size + (1 << 20));
    let cases = [
        ("one byte short", reqwest::Body::from(bytes[..size - 1].to_vec())),
        ("one byte over", reqwest::Body::from(longer[..size + 1].to_vec())),
        ("short, chunked", chunked(&bytes[..size / 2], 64 * 1024)),
        ("over, chunked", chunked(&longer, 64 * 1024)),
        ("empty", reqwest::Body::from(Vec::new())),
    ];
    for (case, body) in cases {
        let response = app.client.put(url.as_str()).body(body).send().await.unwrap();
        assert_refused(response, 422, "size_mismatch", case).await;
        assert_nothing_kept(&app, before, case).await;
        assert_eq!(app.upload_status(&token, &uuid).await["status"], "pending", "{case}: still pending");
    }
    assert_eq!(app.scalar("SELECT count(*) FROM events WHERE type = 'UploadReceived'").await, 0);

    // The right bytes, after all that.
    let put = app.put_signed(&url, bytes.clone()).await;
    assert_eq!(put.status(), 200, "a retry with the right size");
    let received: Value = put.json().await.unwrap();
    assert_eq!(received["status"], "received");
    assert_eq!(received["size"], size);
    assert_eq!(received["sha256"], sha256_hex(&bytes));
    assert_eq!(app.events_of(&format!("upload-{uuid}")).await, ["UploadStarted", "UploadReceived"]);
    assert_eq!(app.blob_count().await, before.3 + 1);
    assert_eq!(TestApp::files_under(&app.tmp_dir()), 0);
}

on_both_backends!(a_put_with_another_sha256_than_declared_keeps_nothing);

async fn a_put_with_another_sha256_than_declared_keeps_nothing(backend: Backend) {
    let app = TestApp::on(backend).await;
    let (_, token) = app.session_with_user(1).await;
    let bytes = pseudo_random_bytes(8, (6 << 20) + 1);
    let wrong = pseudo_random_bytes(10, bytes.len());
    let created = app
        .create_upload_ok(
            &token,
            &json!({"id_session": 1, "filename": "hashed.bin", "size": bytes.len(), "sha256": sha256_hex(&bytes)}),
        )
        .await;
    let (uuid, url) = (text(&created, "upload_uuid"), text(&created, "upload_url"));
    let before = app.footprint().await;
    let response = app.put_signed(&url, wrong.clone()).await;
    assert_refused(response, 422, "sha256_mismatch", "other bytes of the same size").await;
    assert_nothing_kept(&app, before, "other bytes").await;
    let response = app.client.put(url.as_str()).body(chunked(&wrong, 64 * 1024)).send().await.unwrap();
    assert_refused(response, 422, "sha256_mismatch", "other bytes, chunked").await;
    assert_nothing_kept(&app, before, "other bytes, chunked").await;
    assert_eq!(app.upload_status(&token, &uuid).await["status"], "pending");

    let put = app.put_signed(&url, bytes.clone()).await;
    assert_eq!(put.status(), 200, "the declared bytes");
    assert_eq!(app.upload_status(&token, &uuid).await["sha256"], sha256_hex(&bytes));
    assert_eq!(app.blob_count().await, before.3 + 1);
}

#[tokio::test]
async fn an_expired_upload_refuses_its_put_and_its_commit() {
    // Three seconds: time enough to send one upload's bytes right away.
    let app = TestApp::spawn_with(TestOptions { upload_ttl_seconds: Some(3), ..Default::default() }).await;
    let (_, token) = app.session_with_user(1).await;
    let before = now();
    let pending = app.create_upload_ok(&token, &json!({"id_session": 1, "filename": "late.bin"})).await;
    let received = app.create_upload_ok(&token, &json!({"id_session": 1, "filename": "sent.bin"})).await;
    let expires_at = unix_seconds(&pending["expires_at"]);
    assert!((before + 2..=now() + 4).contains(&expires_at), "the configured lifetime: {pending}");
    assert_eq!(app.put_signed(&text(&received, "upload_url"), b"sent in time".to_vec()).await.status(), 200);

    let (pending_uuid, received_uuid) = (text(&pending, "upload_uuid"), text(&received, "upload_uuid"));
    until_upload(&app, &token, &pending_uuid, "expired").await;
    until_upload(&app, &token, &received_uuid, "expired").await;
    let events = app.event_count().await;
    let put = app.put_signed(&text(&pending, "upload_url"), b"too late".to_vec()).await;
    assert_error(put, 403, "url_expired").await;
    for uuid in [&received_uuid, &pending_uuid] {
        let commit = app.commit_upload(&token, uuid, &json!({"asset_name": "Late"})).await;
        assert_error(commit, 410, "upload_expired").await;
    }
    assert_eq!(app.event_count().await, events, "refusals record nothing");
    assert_eq!(app.scalar("SELECT count(*) FROM events WHERE type = 'UploadExpired'").await, 0, "only the job expires");
    assert_eq!(app.scalar("SELECT count(*) FROM assets").await, 0);
}

#[tokio::test]
async fn uploads_are_created_only_where_their_creator_may_upload() {
    let app = TestApp::spawn_with(TestOptions { max_upload_size: Some(1000), ..Default::default() }).await;
    let service = app.service_token();
    let (creator, member) = (Uuid::new_v4(), Uuid::new_v4());
    let registered =
        app.put_session(&service, 1, &json!({"session_name": "two users", "session_users": [creator, member]})).await;
    assert_eq!(registered.status(), 200);
    let (creator_token, member_token) = (app.user_token(creator), app.user_token(member));
    let stranger = app.user_token(Uuid::new_v4());
    let before = app.footprint().await;

    let good = json!({"id_session": 1, "filename": "ok.bin"});
    assert_error(
        app.create_upload(&creator_token, &json!({"id_session": 99, "filename": "x.bin"})).await,
        404,
        "not_found",
    )
    .await;
    assert_error(app.create_upload(&stranger, &good).await, 403, "forbidden").await;
    let anonymous = app.client.post(app.url("/api/uploads")).json(&good).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    // A declared size over the limit is an invalid field (the request itself is small);
    // a size written as a whole float is a size (below).
    let too_big = json!({"id_session": 1, "filename": "big.bin", "size": 1001});
    let refused = assert_error(app.create_upload(&creator_token, &too_big).await, 422, "invalid_field").await;
    assert!(refused["error"]["message"].as_str().unwrap().contains("size"), "{refused}");
    for (case, body) in [
        ("a sha256 that is not one", json!({"id_session": 1, "filename": "x.bin", "sha256": "xyz"})),
        ("an empty filename", json!({"id_session": 1, "filename": ""})),
        ("an unknown field", json!({"id_session": 1, "filename": "x.bin", "sizes": 3})),
    ] {
        assert_eq!(app.create_upload(&creator_token, &body).await.status(), 422, "{case}");
    }
    assert_nothing_kept(&app, before, "refused creations").await;
    let whole = json!({"id_session": 1, "filename": "whole.bin", "size": 1000.0});
    assert_eq!(app.create_upload(&creator_token, &whole).await.status(), 201);

    // Who may read its status: its creator, the session's members, services.
    let created = app.create_upload_ok(&creator_token, &good).await;
    let uuid = text(&created, "upload_uuid");
    for token in [&creator_token, &member_token, &service] {
        assert_eq!(app.upload_status(token, &uuid).await["status"], "pending");
    }
    assert_error(app.get(&stranger, &format!("/api/uploads/{uuid}")).await, 403, "forbidden").await;
    assert_error(app.commit_upload(&stranger, &uuid, &json!({"asset_name": "x"})).await, 403, "forbidden").await;

    // With no declared size, the PUT is held to the largest upload.
    let url = text(&created, "upload_url");
    let before = app.footprint().await;
    assert_error(app.put_signed(&url, vec![1; 1001]).await, 413, "payload_too_large").await;
    assert_nothing_kept(&app, before, "over the limit").await;
    let streamed = app.client.put(url.as_str()).body(chunked(&[2; 3000], 500)).send().await.unwrap();
    assert_error(streamed, 413, "payload_too_large").await;
    assert_nothing_kept(&app, before, "over the limit, chunked").await;
    assert_eq!(app.upload_status(&creator_token, &uuid).await["status"], "pending");
    assert_eq!(app.put_signed(&url, vec![3; 1000]).await.status(), 200, "the limit itself fits");

    // A service names the creator the asset will have.
    let on_behalf = json!({"id_session": 1, "filename": "service.bin", "id_user": creator});
    let created = app.create_upload_ok(&service, &on_behalf).await;
    assert_eq!(app.put_signed(&text(&created, "upload_url"), b"for a user".to_vec()).await.status(), 200);
    let uuid = text(&created, "upload_uuid");
    let response = app.commit_upload(&service, &uuid, &json!({"asset_name": "On behalf"})).await;
    assert_eq!(response.status(), 200);
    let info: Value = response.json().await.unwrap();
    assert_eq!(info["asset_creator"], json!({"kind": "user", "uuid": creator}));
}

// ---------------------------------------------------------------------------------------
// Replay

#[tokio::test]
async fn replay_rebuilds_the_uploads_table() {
    let app = TestApp::spawn().await;
    let (_, token) = app.session_with_user(1).await;
    let create = |filename: &'static str, size: Option<usize>| {
        let mut body = json!({"id_session": 1, "filename": filename, "mime_type": "text/plain"});
        if let Some(size) = size {
            body["size"] = json!(size);
        }
        let (app, token) = (&app, &token);
        async move { app.create_upload_ok(token, &body).await }
    };
    // Pending; pending after a refused PUT; received; committed; importing; received
    // again after its import was cancelled.
    create("pending.txt", None).await;
    let refused = create("refused.txt", Some(5)).await;
    assert_eq!(app.put_signed(&text(&refused, "upload_url"), b"too long".to_vec()).await.status(), 422);
    let received = create("received.txt", Some(5)).await;
    assert_eq!(app.put_signed(&text(&received, "upload_url"), b"12345".to_vec()).await.status(), 200);
    let committed = create("committed.txt", None).await;
    assert_eq!(app.put_signed(&text(&committed, "upload_url"), b"kept".to_vec()).await.status(), 200);
    let uuid = text(&committed, "upload_uuid");
    let body = json!({"asset_name": "Kept", "tags": ["t"], "directory": "/d"});
    assert_eq!(app.commit_upload(&token, &uuid, &body).await.status(), 200);
    let importing = create("importing.txt", None).await;
    assert_eq!(app.put_signed(&text(&importing, "upload_url"), b"queued".to_vec()).await.status(), 200);
    let body = json!({"upload_uuid": text(&importing, "upload_uuid"), "asset_name": "Queued"});
    assert_eq!(app.post_json(&token, "/api/imports", &body).await.status(), 202);
    let cancelled = create("cancelled.txt", None).await;
    assert_eq!(app.put_signed(&text(&cancelled, "upload_url"), b"back".to_vec()).await.status(), 200);
    let cancelled_uuid = text(&cancelled, "upload_uuid");
    let body = json!({"upload_uuid": cancelled_uuid, "asset_name": "Cancelled"});
    let accepted: Value = app.post_json(&token, "/api/imports", &body).await.json().await.unwrap();
    let job = text(&accepted, "job_uuid");
    assert_eq!(app.delete(&app.service_token(), &format!("/api/jobs/{job}")).await.status(), 200);
    assert_eq!(app.upload_status(&token, &cancelled_uuid).await["status"], "received", "back once cancelled");

    let uploads = app.table_snapshot("uploads", "upload_uuid").await;
    let assets = app.table_snapshot("assets", "asset_uuid").await;
    let jobs = app.table_snapshot("jobs", "job_uuid").await;
    assert_eq!(uploads.as_array().unwrap().len(), 6, "{uploads}");
    {
        let client = app.ctx.app.pool.get().await.unwrap();
        client.batch_execute("DELETE FROM uploads").await.unwrap();
    }
    let mut client = app.ctx.app.pool.get().await.unwrap();
    let applied = assetd::projections::replay(&mut client).await.unwrap();
    drop(client);
    assert_eq!(applied as i64, app.event_count().await);
    assert_eq!(app.table_snapshot("uploads", "upload_uuid").await, uploads);
    assert_eq!(app.table_snapshot("assets", "asset_uuid").await, assets);
    assert_eq!(app.table_snapshot("jobs", "job_uuid").await, jobs);
}

// ---------------------------------------------------------------------------------------
// Imports of uploads (jobs)

/// Creates an upload in session `id_session` and sends `bytes` to it; returns its uuid.
async fn received_upload(app: &TestApp, token: &str, id_session: i64, filename: &str, bytes: &[u8]) -> String {
    let created = app
        .create_upload_ok(token, &json!({"id_session": id_session, "filename": filename, "size": bytes.len()}))
        .await;
    let put = app.put_signed(&text(&created, "upload_url"), bytes.to_vec()).await;
    assert_eq!(put.status(), 200, "{:?}", put.text().await);
    text(&created, "upload_uuid")
}

#[tokio::test]
async fn an_import_turns_a_received_upload_into_an_asset() {
    let jobs = Jobs::start(quick_jobs("")).await;
    let app = &jobs.app;
    let (_, token) = app.session_with_user(2).await;
    let bytes = pseudo_random_bytes(31, 300_000);
    let uuid = received_upload(app, &token, 2, "queued.bin", &bytes).await;

    let body = json!({"upload_uuid": uuid, "asset_name": "Queued", "sha256": sha256_hex(&bytes), "tags": ["q"]});
    let response = app.post_json(&token, "/api/imports", &body).await;
    assert_eq!(response.status(), 202);
    let accepted: Value = response.json().await.unwrap();
    let job_uuid = text(&accepted, "job_uuid");
    assert!(text(&accepted, "status_url").ends_with(&format!("/file/api/jobs/{job_uuid}")), "{accepted}");

    // received → importing → committed.
    let mut seen: Vec<String> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let upload = loop {
        let upload = app.upload_status(&token, &uuid).await;
        let status = text(&upload, "status");
        if seen.last() != Some(&status) {
            seen.push(status.clone());
        }
        if status == "committed" {
            break upload;
        }
        assert!(status == "importing", "{upload}");
        assert!(tokio::time::Instant::now() < deadline, "never committed: {upload}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(upload["asset_uuid"], uuid.as_str());
    assert_eq!(upload["job_uuid"], job_uuid.as_str());
    let job = jobs.until(&job_uuid, "succeeded", 30).await;
    assert_eq!(job["kind"], "import");
    assert_eq!(job["result"]["asset_uuid"], uuid.as_str(), "{job}");

    let infos: Value = app.get(&token, &format!("/api/assets/infos?asset_uuid={uuid}")).await.json().await.unwrap();
    assert_eq!(infos["asset_source"], "signed_upload");
    assert_eq!(infos["asset_name"], "Queued");
    assert_eq!(infos["asset_original_filename"], "queued.bin");
    assert_eq!(infos["asset_sha256"], sha256_hex(&bytes));
    assert_eq!(infos["tags"], json!(["q"]));
    let download = app.get(&token, &format!("/api/assets?asset_uuid={uuid}")).await;
    assert_eq!(download.bytes().await.unwrap().as_ref(), &bytes[..]);

    let upload_events = app.events_of(&format!("upload-{uuid}")).await;
    assert_eq!(upload_events, ["UploadStarted", "UploadReceived", "UploadImportQueued", "UploadCommitted"]);
    assert_eq!(app.events_of(&format!("asset-{uuid}")).await, ["AssetImported"]);
    let imported = app.scalar_json(&format!("SELECT data FROM events WHERE stream = 'asset-{uuid}'")).await;
    assert_eq!(imported["upload_uuid"], uuid.as_str(), "{imported}");
    assert_eq!(imported["job_uuid"], job_uuid.as_str(), "{imported}");
    assert_eq!(imported["asset_source"], "signed_upload", "{imported}");
    assert_eq!(app.blob_count().await, 1, "the bytes stayed where the PUT put them");
    assert_eq!(TestApp::files_under(&app.tmp_dir()), 0);

    // Once is all.
    let again = app.post_json(&token, "/api/imports", &json!({"upload_uuid": uuid, "asset_name": "Again"})).await;
    assert_error(again, 409, "conflict").await;
    assert_error(app.commit_upload(&token, &uuid, &json!({"asset_name": "Again"})).await, 409, "conflict").await;
    jobs.stop().await;
}

#[tokio::test]
async fn an_import_with_another_sha256_fails_the_upload_and_removes_its_bytes() {
    let jobs = Jobs::start(quick_jobs("")).await;
    let app = &jobs.app;
    let (_, token) = app.session_with_user(2).await;
    let uuid = received_upload(app, &token, 2, "doubtful.bin", &pseudo_random_bytes(32, 100_000)).await;
    assert_eq!(app.blob_count().await, 1);
    let body = json!({"upload_uuid": uuid, "asset_name": "Doubtful", "sha256": sha256_hex(b"something else")});
    let response = app.post_json(&token, "/api/imports", &body).await;
    assert_eq!(response.status(), 202);
    let job_uuid = text(&response.json::<Value>().await.unwrap(), "job_uuid");
    let job = jobs.until(&job_uuid, "failed", 60).await;
    assert!(job["error"].as_str().is_some_and(|e| !e.is_empty()), "{job}");

    let upload = until_upload(app, &token, &uuid, "failed").await;
    assert!(upload["error"].as_str().is_some_and(|e| !e.is_empty()), "the upload says why: {upload}");
    assert_eq!(upload["asset_uuid"], Value::Null, "{upload}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while app.blob_count().await > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(app.blob_count().await, 0, "the bytes are removed");
    assert_eq!(TestApp::files_under(&app.tmp_dir()), 0);
    assert_eq!(app.scalar("SELECT count(*) FROM assets").await, 0);
    assert_eq!(app.events_of(&format!("upload-{uuid}")).await.last().map(String::as_str), Some("UploadFailed"));
    jobs.stop().await;
}

#[tokio::test]
async fn an_import_before_the_bytes_is_a_conflict() {
    let app = TestApp::spawn().await;
    let (_, token) = app.session_with_user(1).await;
    let created = app.create_upload_ok(&token, &json!({"id_session": 1, "filename": "empty-handed.bin"})).await;
    let uuid = text(&created, "upload_uuid");
    let events = app.event_count().await;
    let response = app.post_json(&token, "/api/imports", &json!({"upload_uuid": uuid, "asset_name": "No"})).await;
    assert_error(response, 409, "conflict").await;
    assert_eq!(app.event_count().await, events);
    assert_eq!(app.scalar("SELECT count(*) FROM jobs").await, 0);
    assert_eq!(app.upload_status(&token, &uuid).await["status"], "pending");
    let unknown = json!({"upload_uuid": Uuid::new_v4(), "asset_name": "No"});
    assert_error(app.post_json(&token, "/api/imports", &unknown).await, 404, "not_found").await;
}

#[tokio::test]
async fn a_queued_import_holds_the_upload_until_it_is_cancelled() {
    // No workers: the import stays queued.
    let jobs = Jobs::start_with(quick_jobs(""), TestOptions::default(), false, None).await;
    let app = &jobs.app;
    let (_, token) = app.session_with_user(2).await;
    let bytes = b"held by a job".to_vec();
    let created = app.create_upload_ok(&token, &json!({"id_session": 2, "filename": "held.bin"})).await;
    let (uuid, url) = (text(&created, "upload_uuid"), text(&created, "upload_url"));
    assert_eq!(app.put_signed(&url, bytes.clone()).await.status(), 200);
    let accepted = jobs.import(json!({"upload_uuid": uuid, "asset_name": "Held"})).await;
    let job_uuid = text(&accepted, "job_uuid");
    let upload = app.upload_status(&token, &uuid).await;
    assert_eq!(upload["status"], "importing");
    assert_eq!(upload["job_uuid"], job_uuid.as_str());

    assert_error(app.commit_upload(&token, &uuid, &json!({"asset_name": "Now"})).await, 409, "conflict").await;
    assert_error(app.put_signed(&url, bytes.clone()).await, 409, "conflict").await;
    let again = app.post_json(&token, "/api/imports", &json!({"upload_uuid": uuid, "asset_name": "Again"})).await;
    assert_error(again, 409, "conflict").await;

    let cancelled = app.delete(&jobs.service, &format!("/api/jobs/{job_uuid}")).await;
    assert_eq!(cancelled.status(), 200);
    assert_eq!(app.upload_status(&token, &uuid).await["status"], "received", "the upload is given back");
    assert!(app.events_of(&format!("upload-{uuid}")).await.contains(&"UploadImportCancelled".to_owned()));
    let response = app.commit_upload(&token, &uuid, &json!({"asset_name": "Now"})).await;
    assert_eq!(response.status(), 200);
    let info: Value = response.json().await.unwrap();
    assert_eq!(info["asset_uuid"], uuid.as_str());
    assert_eq!(info["asset_source"], "signed_upload");
    let download = app.get(&token, &format!("/api/assets?asset_uuid={uuid}")).await;
    assert_eq!(download.bytes().await.unwrap().as_ref(), &bytes[..]);
    jobs.stop().await;
}

// ---------------------------------------------------------------------------------------
// Expiry

#[tokio::test]
async fn the_expiry_job_expires_uncommitted_uploads_and_removes_their_bytes() {
    // Four seconds: time enough to send and commit right away.
    let options = TestOptions { upload_ttl_seconds: Some(4), ..Default::default() };
    let jobs = Jobs::start_with(quick_jobs(""), options, true, None).await;
    let app = &jobs.app;
    let (_, token) = app.session_with_user(2).await;
    let kept_bytes = pseudo_random_bytes(51, 5000);
    let kept = received_upload(app, &token, 2, "kept.bin", &kept_bytes).await;
    assert_eq!(app.commit_upload(&token, &kept, &json!({"asset_name": "Kept"})).await.status(), 200);
    let received = received_upload(app, &token, 2, "received.bin", b"never committed").await;
    let pending =
        text(&app.create_upload_ok(&token, &json!({"id_session": 2, "filename": "p.bin"})).await, "upload_uuid");
    assert_eq!(app.blob_count().await, 2);

    // Past their expiry they show as expired, before any job ran.
    until_upload(app, &token, &received, "expired").await;
    until_upload(app, &token, &pending, "expired").await;
    assert_eq!(app.upload_status(&token, &kept).await["status"], "committed");
    assert_eq!(app.blob_count().await, 2, "the bytes stay until the job");

    let ctx = system_ctx(Uuid::new_v4());
    let job_uuid =
        app.ctx.app.request_upload_expiry(&ctx, app.ctx.settings.import_policy).await.expect("queueing the expiry job");
    let job = jobs.until(&job_uuid.to_string(), "succeeded", 30).await;
    assert_eq!(job["kind"], "expire_uploads");
    assert_eq!(job["result"]["uploads_expired"], 2, "{job}");
    assert_eq!(app.scalar("SELECT count(*) FROM events WHERE type = 'UploadExpired'").await, 2);
    for uuid in [&received, &pending] {
        assert_eq!(app.events_of(&format!("upload-{uuid}")).await.last().map(String::as_str), Some("UploadExpired"));
        assert_eq!(app.upload_status(&token, uuid).await["status"], "expired");
    }
    let expired = app
        .scalar_json(&format!("SELECT data FROM events WHERE stream = 'upload-{received}' AND type = 'UploadExpired'"))
        .await;
    assert_eq!(expired["had_bytes"], json!(true), "{expired}");
    assert_eq!(app.blob_count().await, 1, "the received bytes are removed, the asset's stay");
    assert_eq!(TestApp::files_under(&app.tmp_dir()), 0);
    assert_error(app.commit_upload(&token, &received, &json!({"asset_name": "Late"})).await, 410, "upload_expired")
        .await;
    assert_eq!(app.upload_status(&token, &kept).await["status"], "committed");
    let download = app.get(&token, &format!("/api/assets?asset_uuid={kept}")).await;
    assert_eq!(download.status(), 200);
    assert_eq!(download.bytes().await.unwrap().as_ref(), &kept_bytes[..]);

    // `assetd expire-uploads` queues the same job; it finds nothing more to expire.
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_assetd"))
        .arg("expire-uploads")
        .env("ASSETD_DATABASE_URL", &app.db.url)
        .env("ASSETD_JWT_SECRET", crate::helpers::JWT_SECRET)
        .env("ASSETD_URL_SIGNING_KEY", URL_SIGNING_KEY)
        .env("ASSETD_DATA_DIR", app.data_dir.path())
        .env("ASSETD_AMQP_URL", &jobs.config.amqp_url)
        .env("ASSETD_AMQP_PREFIX", &jobs.config.amqp_prefix)
        .env("ASSETD_LOG", "warn")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    let queued =
        stdout.split_whitespace().find_map(|word| word.parse::<Uuid>().ok()).expect("the job's uuid is printed");
    let job = jobs.until(&queued.to_string(), "succeeded", 30).await;
    assert_eq!(job["kind"], "expire_uploads");
    assert_eq!(job["result"]["uploads_expired"], 0, "{job}");
    assert_eq!(app.scalar("SELECT count(*) FROM events WHERE type = 'UploadExpired'").await, 2);
    jobs.stop().await;
}

// ---------------------------------------------------------------------------------------
// Helpers for devices that cannot set headers

#[tokio::test]
async fn the_download_helper_redirects_to_a_fresh_signed_url() {
    let app = TestApp::spawn().await;
    let (_, token) = app.session_with_user(1).await;
    let bytes = pseudo_random_bytes(61, 5000);
    let uuid = text(&app.upload_ok(&token, 1, "device.bin", &bytes).await, "asset_uuid");
    let helper = app.url(&format!("/helper/download?asset_uuid={uuid}"));

    let before = now();
    let response =
        app.client.get(helper.as_str()).header("Authorization", format!("OpenTera {token}")).send().await.unwrap();
    assert_eq!(response.status(), 302);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with(&format!("http://{}/file/api/signed/assets/{uuid}?", app.addr)), "{location}");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["download_url"], location.as_str());
    let expires_at = unix_seconds(&body["expires_at"]);
    assert!((before + 899..=now() + 901).contains(&expires_at), "{body}");

    // Followed by a client that has no token.
    let followed = reqwest::Client::new().get(location.as_str()).send().await.unwrap();
    assert_eq!(followed.status(), 200);
    assert_eq!(
        followed.headers()["content-disposition"],
        "attachment; filename=\"device.bin\"; filename*=UTF-8''device.bin"
    );
    assert_eq!(followed.bytes().await.unwrap().as_ref(), &bytes[..]);

    // A chosen lifetime.
    let short = app
        .client
        .get(format!("{helper}&expires_in=60"))
        .header("Authorization", format!("Bearer {token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(short.status(), 302);
    let short: Value = short.json().await.unwrap();
    assert!(unix_seconds(&short["expires_at"]) <= now() + 61, "{short}");

    // Authorization as for the download.
    assert_eq!(app.client.get(helper.as_str()).send().await.unwrap().status(), 401);
    let stranger = app.user_token(Uuid::new_v4());
    assert_error(app.get(&stranger, &format!("/helper/download?asset_uuid={uuid}")).await, 403, "forbidden").await;
    let unknown = format!("/helper/download?asset_uuid={}", Uuid::new_v4());
    assert_error(app.get(&token, &unknown).await, 404, "not_found").await;
}

on_both_backends!(the_upload_helper_answers_like_the_multipart_upload);

async fn the_upload_helper_answers_like_the_multipart_upload(backend: Backend) {
    let app = TestApp::on(backend).await;
    let (_, token) = app.session_with_user(1).await;
    let bytes = pseudo_random_bytes(62, 300_000);
    let form = reqwest::multipart::Form::new()
        .text("jsonData", json!({"id_session": 1, "asset_name": "From a device", "tags": ["d"]}).to_string())
        .part("file", reqwest::multipart::Part::bytes(bytes.clone()).file_name("device.bin"));
    let response = app
        .client
        .post(app.url("/helper/upload"))
        .header("Authorization", format!("OpenTera {token}"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let info: Value = response.json().await.unwrap();
    let uuid = text(&info, "asset_uuid");
    assert_eq!(info["asset_name"], "From a device");
    assert_eq!(info["asset_original_filename"], "device.bin");
    assert_eq!(info["asset_file_size"], bytes.len());
    assert_eq!(info["asset_sha256"], sha256_hex(&bytes));
    assert_eq!(info["tags"], json!(["d"]));
    assert!(info["access_token"].as_str().is_some_and(|t| t.len() > 20), "{info}");
    assert_eq!(info["asset_url"], format!("http://{}/file/api/assets?asset_uuid={uuid}", app.addr));
    assert_eq!(info["asset_infos_url"], format!("http://{}/file/api/assets/infos?asset_uuid={uuid}", app.addr));
    let multipart = app.upload_ok(&token, 1, "multipart.bin", b"the usual way").await;
    assert_eq!(keys(&info), keys(&multipart), "the same answer as POST /api/assets");
    let download = app.get(&token, &format!("/api/assets?asset_uuid={uuid}")).await;
    assert_eq!(download.bytes().await.unwrap().as_ref(), &bytes[..]);

    // Refusals leave nothing.
    let before = app.footprint().await;
    let no_json = reqwest::multipart::Form::new()
        .part("file", reqwest::multipart::Part::bytes(b"orphan".to_vec()).file_name("orphan.bin"));
    let response = app
        .client
        .post(app.url("/helper/upload"))
        .header("Authorization", format!("OpenTera {token}"))
        .multipart(no_json)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400, "no jsonData");
    let body: Value = response.json().await.unwrap();
    assert!(body["error"]["code"].as_str().is_some_and(|c| !c.is_empty()), "{body}");
    let anonymous = reqwest::multipart::Form::new()
        .text("jsonData", json!({"id_session": 1, "asset_name": "x"}).to_string())
        .part("file", reqwest::multipart::Part::bytes(b"x".to_vec()).file_name("x.bin"));
    let response = app.client.post(app.url("/helper/upload")).multipart(anonymous).send().await.unwrap();
    assert_eq!(response.status(), 401);
    assert_nothing_kept(&app, before, "refused helper uploads").await;
}

// ---------------------------------------------------------------------------------------
// A browser on another origin

/// A web server of its own (another origin than assetd's): `/` the page; `/hold` answers
/// once the page reported (a request in flight keeps Chromium's virtual time from running
/// out while the script awaits the digest); `/done` takes the page's report.
struct PageServer {
    addr: SocketAddr,
    report: Arc<Mutex<Option<String>>>,
}

async fn serve_page(html: String) -> PageServer {
    use hyper::service::{make_service_fn, service_fn};
    use hyper::{Body, Response};
    let html = Arc::new(html);
    let report: Arc<Mutex<Option<String>>> = Arc::default();
    let done = Arc::new(tokio::sync::Notify::new());
    let finished = Arc::new(AtomicBool::new(false));
    let state = (html, report.clone(), done, finished);
    let make = make_service_fn(move |_| {
        let state = state.clone();
        async move {
            Ok::<_, Infallible>(service_fn(move |request: hyper::Request<Body>| {
                let (html, report, done, finished) = state.clone();
                async move {
                    let path = request.uri().path().to_owned();
                    let response = match path.as_str() {
                        "/" => Response::builder()
                            .header("content-type", "text/html; charset=utf-8")
                            .body(Body::from(html.as_str().to_owned()))
                            .unwrap(),
                        "/hold" => {
                            let notified = done.notified();
                            if !finished.load(Ordering::SeqCst) {
                                let _ = tokio::time::timeout(Duration::from_secs(60), notified).await;
                            }
                            Response::new(Body::from("released"))
                        }
                        "/done" => {
                            let body = hyper::body::to_bytes(request.into_body()).await.unwrap_or_default();
                            *report.lock().unwrap() = Some(String::from_utf8_lossy(&body).into_owned());
                            finished.store(true, Ordering::SeqCst);
                            done.notify_waiters();
                            Response::new(Body::from("thanks"))
                        }
                        _ => Response::builder().status(404).body(Body::empty()).unwrap(),
                    };
                    Ok::<_, Infallible>(response)
                }
            }))
        }
    });
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(hyper::Server::from_tcp(listener).unwrap().serve(make));
    PageServer { addr, report }
}

/// Downloads from a signed URL (hashing with WebCrypto), then PUTs generated bytes to a
/// signed upload URL, with no header of its own; writes what it saw into the page.
const PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>signed URLs from another origin</title></head>
<body>running<script>
(async () => {
  const hold = fetch('/hold').catch(() => null);
  let out = 'RESULT';
  try {
    const download = await fetch(__DOWNLOAD_URL__);
    const buffer = await download.arrayBuffer();
    const digest = new Uint8Array(await crypto.subtle.digest('SHA-256', buffer));
    const hex = Array.from(digest, (b) => b.toString(16).padStart(2, '0')).join('');
    out += ' download=' + download.status + ':' + buffer.byteLength + ':' + hex;
    out += ' etag=' + String(download.headers.get('ETag')).replace(/"/g, '');
    out += ' disposition=' + (download.headers.get('Content-Disposition') ? 'yes' : 'no');
    const bytes = new Uint8Array(__SIZE__);
    for (let i = 0; i < bytes.length; i++) bytes[i] = (i * 7 + 3) & 255;
    const put = await fetch(__UPLOAD_URL__, {method: 'PUT', body: new Blob([bytes])});
    const answer = await put.json();
    out += ' put=' + put.status + ':' + answer.status + ':' + answer.sha256;
  } catch (error) {
    out += ' error=' + error;
  }
  document.body.textContent = out + ' END';
  await fetch('/done', {method: 'POST', body: out}).catch(() => null);
  await hold;
})();
</script></body></html>
"#;

#[tokio::test]
async fn a_browser_on_another_origin_downloads_and_uploads_with_signed_urls() {
    let app = TestApp::spawn().await;
    let (_, token) = app.session_with_user(1).await;
    let download_bytes = pseudo_random_bytes(71, 200_000);
    let asset = text(&app.upload_ok(&token, 1, "for-the-browser.bin", &download_bytes).await, "asset_uuid");
    let download_url = text(&app.download_url(&token, &asset).await, "download_url");
    let upload_bytes: Vec<u8> = (0..100_000usize).map(|i| ((i * 7 + 3) & 255) as u8).collect();
    let created = app
        .create_upload_ok(
            &token,
            &json!({"id_session": 1, "filename": "from-the-browser.bin", "size": upload_bytes.len(),
                    "sha256": sha256_hex(&upload_bytes)}),
        )
        .await;
    let upload = text(&created, "upload_uuid");
    let page = PAGE
        .replace("__DOWNLOAD_URL__", &serde_json::to_string(&download_url).unwrap())
        .replace("__UPLOAD_URL__", &serde_json::to_string(&text(&created, "upload_url")).unwrap())
        .replace("__SIZE__", &upload_bytes.len().to_string());
    let server = serve_page(page).await;
    assert_ne!(server.addr.port(), app.addr.port(), "another origin");

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
                "--virtual-time-budget=20000",
                "--dump-dom",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(format!("http://127.0.0.1:{}/", server.addr.port()))
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("chromium finished")
    .expect("chromium is installed (scripts/test installs it)");
    let dom = String::from_utf8_lossy(&output.stdout);
    let report = server.report.lock().unwrap().clone();
    let context = format!("page: {dom}\nreport: {report:?}");
    assert!(dom.contains("RESULT") && dom.contains("END"), "the script ran to its end: {context}");
    assert!(!dom.contains("error="), "no fetch failed (CORS): {context}");
    let sha = sha256_hex(&download_bytes);
    assert!(dom.contains(&format!("download=200:{}:{sha}", download_bytes.len())), "{context}");
    assert!(dom.contains(&format!("etag=sha256:{sha}")), "ETag is exposed: {context}");
    assert!(dom.contains("disposition=yes"), "Content-Disposition is exposed: {context}");
    assert!(dom.contains(&format!("put=200:received:{}", sha256_hex(&upload_bytes))), "{context}");

    let status = app.upload_status(&token, &upload).await;
    assert_eq!(status["status"], "received");
    assert_eq!(status["size"], upload_bytes.len());
    assert_eq!(status["sha256"], sha256_hex(&upload_bytes));
}

// ---------------------------------------------------------------------------------------
// A 1 GiB PUT in flat memory

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1_gib_signed_put_streams_in_flat_memory() {
    const SIZE: u64 = 1 << 30;
    const CHUNK: usize = 1 << 20;
    let app = TestApp::spawn().await;
    let (_, token) = app.session_with_user(1).await;
    let data_dir = tempfile::tempdir().unwrap();
    let (process, addr) = serve_process(&app, data_dir.path());
    wait_until_serving(addr).await;
    let pid = process.id().expect("the process runs");
    let client = reqwest::Client::new();
    let response = client
        .post(format!("http://{addr}/file/api/uploads"))
        .bearer_auth(token.as_str())
        .json(&json!({"id_session": 1, "filename": "big.bin", "size": SIZE}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let created: Value = response.json().await.unwrap();
    let uuid = text(&created, "upload_uuid");
    let upload_url = text(&created, "upload_url");
    assert!(upload_url.starts_with(&format!("http://{addr}/file/api/signed/uploads/")), "{created}");
    let idle = vm_rss_kib(pid).expect("the process's VmRSS");

    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        tokio::spawn(async move {
            let (mut peak, mut samples) = (0u64, 0usize);
            while sampling.load(Ordering::SeqCst) {
                if let Some(kib) = vm_rss_kib(pid) {
                    peak = peak.max(kib);
                    samples += 1;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (peak, samples)
        })
    };
    // Generated and hashed as it goes: the test holds one chunk at a time too.
    let (hash_tx, hash_rx) = tokio::sync::oneshot::channel();
    let mut hasher = Some((Sha256::new(), hash_tx));
    let chunks = (SIZE as usize) / CHUNK;
    let body = futures::stream::iter(0..chunks).map(move |i| {
        let chunk = pseudo_random_bytes(i as u64 + 1, CHUNK);
        if let Some((h, _)) = hasher.as_mut() {
            h.update(&chunk);
        }
        if i + 1 == chunks {
            if let Some((h, tx)) = hasher.take() {
                let _ = tx.send(hex::encode(h.finalize()));
            }
        }
        Ok::<_, std::io::Error>(chunk)
    });
    let put = client.put(upload_url.as_str()).body(reqwest::Body::wrap_stream(body)).send().await.unwrap();
    let status = put.status();
    let answer = put.text().await.unwrap();
    sampling.store(false, Ordering::SeqCst);
    let (peak, samples) = sampler.await.unwrap();
    assert_eq!(status, 200, "{answer}");
    let sent_sha = hash_rx.await.unwrap();
    let received: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(received["status"], "received");
    assert_eq!(received["size"], SIZE);
    assert_eq!(received["sha256"], sent_sha.as_str(), "assetd hashed what was sent");
    eprintln!("1 GiB signed PUT: peak RSS {} MiB, idle {} MiB, {samples} samples", peak / 1024, idle / 1024);
    assert!(samples >= 10, "RSS was sampled during the PUT ({samples} samples)");
    assert!(peak < 150 * 1024, "peak RSS {} MiB (idle {} MiB): the PUT must stream", peak / 1024, idle / 1024);

    let status: Value = client
        .get(format!("http://{addr}/file/api/uploads/{uuid}"))
        .bearer_auth(token.as_str())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["status"], "received");
    assert_eq!(status["sha256"], sent_sha.as_str());
    assert_eq!(TestApp::files_under(&data_dir.path().join("blobs")), 1, "the bytes are one blob");
    assert_eq!(TestApp::files_under(&data_dir.path().join("tmp")), 0, "no temporary file is left");
    drop(process);
}

// ---------------------------------------------------------------------------------------
// The platform flows through nginx

on_both_backends!(
    the_two_phase_flow_works_through_nginx,
    an_upload_imported_through_nginx_becomes_an_asset,
    the_helpers_work_through_nginx,
);

async fn the_two_phase_flow_works_through_nginx(backend: Backend) {
    let app = TestApp::on(backend).await;
    let nginx = Nginx::start(app.addr, &app.data_dir.path().join("blobs")).await;
    let (_, token) = app.session_with_user(1).await;
    let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let bytes = pseudo_random_bytes(81, (6 << 20) + 7);
    let sha = sha256_hex(&bytes);

    let response = client
        .post(format!("{}/api/uploads", nginx.base))
        .bearer_auth(token.as_str())
        .json(&json!({"id_session": 1, "filename": "proxied.bin", "size": bytes.len(), "sha256": sha}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let created: Value = response.json().await.unwrap();
    let uuid = text(&created, "upload_uuid");
    let upload_url = text(&created, "upload_url");
    assert!(upload_url.starts_with(&format!("{}/api/signed/uploads/{uuid}?", nginx.base)), "names nginx: {created}");

    let put = client.put(upload_url.as_str()).body(chunked(&bytes, 64 * 1024)).send().await.unwrap();
    assert_eq!(put.status(), 200);
    let received: Value = put.json().await.unwrap();
    assert_eq!(received["status"], "received");
    assert_eq!(received["sha256"], sha.as_str());

    let response = client
        .post(format!("{}/api/uploads/{uuid}/commit", nginx.base))
        .bearer_auth(token.as_str())
        .json(&json!({"asset_name": "Proxied"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let info: Value = response.json().await.unwrap();
    assert_eq!(info["asset_uuid"], uuid.as_str());
    assert_eq!(info["asset_url"], format!("{}/api/assets?asset_uuid={uuid}", nginx.base));

    let response = client
        .post(format!("{}/api/assets/{uuid}/download-url", nginx.base))
        .bearer_auth(token.as_str())
        .body("")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let download_url = text(&response.json::<Value>().await.unwrap(), "download_url");
    assert!(download_url.starts_with(&format!("{}/api/signed/assets/{uuid}?", nginx.base)), "{download_url}");
    let download = reqwest::Client::new().get(download_url.as_str()).send().await.unwrap();
    assert_eq!(download.status(), 200);
    assert_eq!(download.headers()["etag"].to_str().unwrap(), format!("\"sha256:{sha}\""));
    assert_eq!(download.headers()["access-control-allow-origin"], "*");
    let mut hasher = Sha256::new();
    let mut size = 0;
    let mut stream = download.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        size += chunk.len();
        hasher.update(&chunk);
    }
    assert_eq!(size, bytes.len());
    assert_eq!(hex::encode(hasher.finalize()), sha);
    let ranged =
        reqwest::Client::new().get(download_url.as_str()).header("Range", "bytes=100-109").send().await.unwrap();
    assert_eq!(ranged.status(), 206);
    assert_eq!(ranged.bytes().await.unwrap().as_ref(), &bytes[100..110]);
}

async fn an_upload_imported_through_nginx_becomes_an_asset(backend: Backend) {
    let jobs = Jobs::start_with(quick_jobs(""), TestOptions { backend, ..Default::default() }, true, None).await;
    let nginx = Nginx::start(jobs.app.addr, &jobs.app.data_dir.path().join("blobs")).await;
    let (_, token) = jobs.app.session_with_user(2).await;
    let client = reqwest::Client::new();
    let bytes = pseudo_random_bytes(82, (6 << 20) + 9);

    let response = client
        .post(format!("{}/api/uploads", nginx.base))
        .bearer_auth(token.as_str())
        .json(&json!({"id_session": 2, "filename": "imported.bin", "size": bytes.len()}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let created: Value = response.json().await.unwrap();
    let uuid = text(&created, "upload_uuid");
    let status_url = text(&created, "status_url");
    assert!(status_url.starts_with(&nginx.base), "{created}");
    let put = client.put(text(&created, "upload_url")).body(bytes.clone()).send().await.unwrap();
    assert_eq!(put.status(), 200);

    let response = client
        .post(format!("{}/api/imports", nginx.base))
        .bearer_auth(token.as_str())
        .json(&json!({"upload_uuid": uuid, "asset_name": "Imported", "sha256": sha256_hex(&bytes)}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let accepted: Value = response.json().await.unwrap();
    let job_url = text(&accepted, "status_url");
    assert!(job_url.starts_with(&nginx.base), "{accepted}");

    let poll = |url: String, status: &'static str| {
        let (client, token) = (client.clone(), token.clone());
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                let value: Value =
                    client.get(url.as_str()).bearer_auth(token.as_str()).send().await.unwrap().json().await.unwrap();
                if value["status"] == status {
                    return value;
                }
                assert!(tokio::time::Instant::now() < deadline, "{url} never {status}: {value}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let upload = poll(status_url, "committed").await;
    assert_eq!(upload["asset_uuid"], uuid.as_str());
    let job = poll(job_url, "succeeded").await;
    assert_eq!(job["result"]["asset_uuid"], uuid.as_str(), "{job}");
    let download = client
        .get(format!("{}/api/assets?asset_uuid={uuid}", nginx.base))
        .bearer_auth(token.as_str())
        .send()
        .await
        .unwrap();
    assert_eq!(download.status(), 200);
    assert_eq!(download.bytes().await.unwrap().as_ref(), &bytes[..]);
    drop(nginx);
    jobs.stop().await;
}

async fn the_helpers_work_through_nginx(backend: Backend) {
    let app = TestApp::on(backend).await;
    let nginx = Nginx::start(app.addr, &app.data_dir.path().join("blobs")).await;
    let (_, token) = app.session_with_user(1).await;
    let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let bytes = pseudo_random_bytes(83, (6 << 20) + 11);

    let form = reqwest::multipart::Form::new()
        .text("jsonData", json!({"id_session": 1, "asset_name": "Through nginx"}).to_string())
        .part("file", reqwest::multipart::Part::bytes(bytes.clone()).file_name("helper.bin"));
    let response = client
        .post(format!("{}/helper/upload", nginx.base))
        .header("Authorization", format!("OpenTera {token}"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let info: Value = response.json().await.unwrap();
    let uuid = text(&info, "asset_uuid");
    assert_eq!(info["asset_sha256"], sha256_hex(&bytes));
    assert_eq!(info["asset_url"], format!("{}/api/assets?asset_uuid={uuid}", nginx.base));

    let response = client
        .get(format!("{}/helper/download?asset_uuid={uuid}", nginx.base))
        .header("Authorization", format!("OpenTera {token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 302);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with(&format!("{}/api/signed/assets/{uuid}?", nginx.base)), "{location}");
    let followed = reqwest::Client::new().get(location.as_str()).send().await.unwrap();
    assert_eq!(followed.status(), 200);
    assert_eq!(followed.bytes().await.unwrap().as_ref(), &bytes[..]);
}

#[tokio::test]
async fn a_signed_download_through_nginx_is_sent_by_nginx_with_x_accel_redirect() {
    let options = TestOptions { accel_redirect_prefix: Some("/_assetd_blobs/".to_owned()), ..Default::default() };
    let app = TestApp::spawn_with(options).await;
    let nginx = Nginx::start(app.addr, &app.data_dir.path().join("blobs")).await;
    let (_, token) = app.session_with_user(1).await;
    let bytes = pseudo_random_bytes(84, 3_000_000);
    let uuid = text(&app.upload_ok(&token, 1, "accel.bin", &bytes).await, "asset_uuid");
    let response = reqwest::Client::new()
        .post(format!("{}/api/assets/{uuid}/download-url", nginx.base))
        .bearer_auth(token.as_str())
        .body("")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let url = text(&response.json::<Value>().await.unwrap(), "download_url");
    assert!(url.starts_with(&nginx.base), "{url}");

    let streamed_before = download_sent_bytes(&app).await;
    let download = reqwest::Client::new().get(url.as_str()).send().await.unwrap();
    assert_eq!(download.status(), 200);
    let headers = download.headers().clone();
    assert_eq!(download.bytes().await.unwrap().as_ref(), &bytes[..]);
    assert!(headers.get("x-accel-redirect").is_none(), "nginx consumes the redirect header");
    assert_eq!(headers["content-disposition"], "attachment; filename=\"accel.bin\"; filename*=UTF-8''accel.bin");
    assert_eq!(headers["etag"].to_str().unwrap(), format!("\"sha256:{}\"", sha256_hex(&bytes)));
    assert_eq!(
        headers.get("access-control-allow-origin").map(|v| v.to_str().unwrap()),
        Some("*"),
        "CORS holds when nginx sends the bytes: {headers:?}"
    );
    let ranged = reqwest::Client::new().get(url.as_str()).header("Range", "bytes=1000-1009").send().await.unwrap();
    assert_eq!(ranged.status(), 206);
    assert_eq!(ranged.bytes().await.unwrap().as_ref(), &bytes[1000..1010]);
    assert_eq!(download_sent_bytes(&app).await, streamed_before, "nginx sent the bytes, not assetd");
    // A tampered URL is refused by assetd before any handover.
    let forged = with_param(&url, "signature", &"0".repeat(64));
    assert_error(reqwest::Client::new().get(forged.as_str()).send().await.unwrap(), 403, "invalid_signature").await;
}

// ---------------------------------------------------------------------------------------
// Races and what goes with a session (from review)

on_both_backends!(two_puts_racing_for_one_upload_leave_exactly_the_recorded_bytes);

/// Two PUTs of different bytes to one upload URL at once (a client retrying while its
/// first PUT still runs): one is recorded, the other refused, and the bytes the upload
/// names are the recorded ones, intact, whichever finished first. (On S3 an object's
/// completion cannot refuse to replace another: each PUT writes a blob of its own.)
async fn two_puts_racing_for_one_upload_leave_exactly_the_recorded_bytes(backend: Backend) {
    let app = TestApp::on(backend).await;
    let (_, token) = app.session_with_user(1).await;
    for round in 0..3u64 {
        let created = app.create_upload_ok(&token, &json!({"id_session": 1, "filename": "raced.bin"})).await;
        let (uuid, url) = (text(&created, "upload_uuid"), text(&created, "upload_url"));
        let first = pseudo_random_bytes(100 + 2 * round, (6 << 20) + 5);
        let second = pseudo_random_bytes(101 + 2 * round, (6 << 20) + 5);
        let (a, b) = tokio::join!(
            app.client.put(url.as_str()).body(chunked(&first, 256 * 1024)).send(),
            app.client.put(url.as_str()).body(chunked(&second, 256 * 1024)).send(),
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        let statuses = (a.status().as_u16(), b.status().as_u16());
        let winner = match statuses {
            (200, 409) => &first,
            (409, 200) => &second,
            other => panic!("one PUT is recorded, the other refused with 409, not {other:?}"),
        };
        let upload = app.upload_status(&token, &uuid).await;
        assert_eq!(upload["sha256"], sha256_hex(winner), "round {round}");
        let committed = app.commit_upload(&token, &uuid, &json!({"asset_name": "raced"})).await;
        assert_eq!(committed.status(), 200);
        let bytes = app.get(&token, &format!("/api/assets?asset_uuid={uuid}")).await.bytes().await.unwrap();
        assert_eq!(sha256_hex(&bytes), sha256_hex(winner), "round {round}: the asset has the recorded bytes");
    }
    // Only the committed assets' blobs are left: the losers removed theirs.
    assert_eq!(app.blob_count().await, 3);
    assert_eq!(TestApp::files_under(&app.tmp_dir()), 0);
}

#[tokio::test]
async fn deleting_a_session_expires_its_open_uploads_and_removes_their_bytes() {
    let app = TestApp::spawn().await;
    let service = app.service_token();
    let (_, token) = app.session_with_user(1).await;
    let pending = app.create_upload_ok(&token, &json!({"id_session": 1, "filename": "p.bin"})).await;
    let received = app.create_upload_ok(&token, &json!({"id_session": 1, "filename": "r.bin"})).await;
    let put = app.put_signed(&text(&received, "upload_url"), pseudo_random_bytes(41, 50_000)).await;
    assert_eq!(put.status(), 200);
    let committed = app.create_upload_ok(&token, &json!({"id_session": 1, "filename": "c.bin"})).await;
    let put = app.put_signed(&text(&committed, "upload_url"), pseudo_random_bytes(43, 50_000)).await;
    assert_eq!(put.status(), 200);
    let commit = app.commit_upload(&token, &text(&committed, "upload_uuid"), &json!({"asset_name": "c"})).await;
    assert_eq!(commit.status(), 200);
    assert_eq!(app.blob_count().await, 2);

    assert_eq!(app.delete_session_and_purge(1).await, 1, "the committed asset");
    for upload in [&pending, &received] {
        let uuid = text(upload, "upload_uuid");
        let status = app.upload_status(&service, &uuid).await;
        assert_eq!(status["status"], "expired", "{status}");
        let reason = app
            .scalar_json(&format!(
                "SELECT data->'reason' FROM events WHERE stream = 'upload-{uuid}' AND type = 'UploadExpired'"
            ))
            .await;
        assert_eq!(reason, json!("session_deleted"));
    }
    assert_eq!(app.upload_status(&service, &text(&committed, "upload_uuid")).await["status"], "committed");
    // The received upload's bytes and the committed asset's are gone; a PUT to the
    // pending one's URL is refused.
    assert_eq!(app.blob_count().await, 0);
    let late = app.put_signed(&text(&pending, "upload_url"), b"too late".to_vec()).await;
    assert_refused(late, 409, "conflict", "a PUT to an upload of a deleted session").await;
    assert_eq!(app.blob_count().await, 0);
}

#[tokio::test]
async fn a_download_url_won_by_an_access_token_lives_no_longer_than_the_token() {
    let app = TestApp::spawn().await;
    let (_, token) = app.session_with_user(1).await;
    let asset = app.upload_ok(&token, 1, "shared.bin", b"shared bytes").await;
    let (uuid, access_token) = (text(&asset, "asset_uuid"), text(&asset, "access_token"));
    // A stranger with only the asset's access token (valid an hour in tests).
    let stranger = app.user_token(Uuid::new_v4());
    let asked = app
        .post_empty(&stranger, &format!("/api/assets/{uuid}/download-url?expires_in=86400&access_token={access_token}"))
        .await;
    assert_eq!(asked.status(), 200);
    let link: Value = asked.json().await.unwrap();
    let expires = unix_seconds(&link["expires_at"]);
    assert!(expires <= now() + 3600 + 5, "cut to the token's hour: {link}");
    assert!(expires >= now() + 3600 - 60, "{link}");
    let bytes = app.client.get(text(&link, "download_url")).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(&bytes[..], b"shared bytes");
    // A member gets the day asked for.
    let member: Value = app
        .post_empty(&token, &format!("/api/assets/{uuid}/download-url?expires_in=86400"))
        .await
        .json()
        .await
        .unwrap();
    assert!(unix_seconds(&member["expires_at"]) >= now() + 86400 - 60, "{member}");
    // Without access or token: 403.
    let refused = app.post_empty(&stranger, &format!("/api/assets/{uuid}/download-url")).await;
    assert_eq!(refused.status(), 403);
}

#[tokio::test]
async fn a_requester_who_lost_the_session_gets_no_token_for_the_committed_asset() {
    let app = TestApp::spawn().await;
    let service = app.service_token();
    let (_, token) = app.session_with_user(1).await;
    let created = app.create_upload_ok(&token, &json!({"id_session": 1, "filename": "mine.bin"})).await;
    let uuid = text(&created, "upload_uuid");
    assert_eq!(app.put_signed(&text(&created, "upload_url"), b"mine".to_vec()).await.status(), 200);
    assert_eq!(app.commit_upload(&token, &uuid, &json!({"asset_name": "mine"})).await.status(), 200);
    let status = app.upload_status(&token, &uuid).await;
    assert!(status["access_token"].is_string(), "a member gets a token: {status}");
    // The user is taken off the session.
    let updated = app.put_session(&service, 1, &json!({"session_name": "first", "session_users": []})).await;
    assert_eq!(updated.status(), 200);
    let status = app.upload_status(&token, &uuid).await;
    assert_eq!(status["status"], "committed");
    assert!(status.get("access_token").is_none(), "no token for who lost access: {status}");
}

/// From an outside try: a part of a file is not taken for the file, and a JSON body
/// cannot drop a declared checksum by naming it twice, nor be an array read by position.
#[tokio::test]
async fn partial_puts_duplicate_keys_and_array_bodies_are_refused() {
    let app = TestApp::spawn().await;
    let (_, token) = app.session_with_user(1).await;
    let created = app.create_upload_ok(&token, &json!({"id_session": 1, "filename": "part.bin"})).await;
    let (uuid, url) = (text(&created, "upload_uuid"), text(&created, "upload_url"));
    let before = app.footprint().await;
    let part =
        app.client.put(url.as_str()).header("content-range", "bytes 0-0/10").body(vec![1u8]).send().await.unwrap();
    assert_refused(part, 400, "invalid_header", "a PUT of a part").await;
    assert_nothing_kept(&app, before, "a PUT of a part").await;
    assert_eq!(app.upload_status(&token, &uuid).await["status"], "pending");

    let raw = |body: &'static str| {
        app.client
            .post(app.url("/api/uploads"))
            .bearer_auth(token.as_str())
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let twice = raw(
        r#"{"id_session": 1, "filename": "a", "sha256": "0000000000000000000000000000000000000000000000000000000000000000", "sha256": null}"#,
    );
    let refused = assert_error(twice.await.unwrap(), 400, "invalid_json").await;
    assert!(refused["error"]["message"].as_str().unwrap().contains("sha256"), "{refused}");
    let nested = raw(r#"{"id_session": 1, "filename": "a", "x": {"k": 1, "k": 2}}"#);
    assert_error(nested.await.unwrap(), 400, "invalid_json").await;
    let array = raw(r#"[1, "arr.bin", null, null, null, null, null, null, null]"#);
    assert_error(array.await.unwrap(), 422, "invalid_field").await;
    assert_nothing_kept(&app, before, "refused bodies").await;
}

//! Archives (API.md "Jobs: imports and archives"): zips of a session's assets or of a list
//! of assets, built by a job, followed, downloaded (ETag, Range), deleted, expired; the
//! cleanup job the scheduler queues (expiries, orphan blobs, never a live blob); and the
//! purge job that deletes a deleted session's assets in batches. Each test runs the relay,
//! the workers and the scheduler of its own `TestApp` on AMQP names of its own
//! (`crate::jobs::Jobs`), unless it says otherwise.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use assetd::config::JobsConfig;
use assetd::domain::principal::PrincipalKind;
use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use uuid::Uuid;

use crate::helpers::{
    amqp_url, assert_conforms, assert_error, assert_event_conforms, pseudo_random_bytes, sha256_hex, vm_rss_kib,
    Backend, TestApp, TestOptions,
};
use crate::jobs::{quick_jobs, Jobs};

/// Seconds a test waits for an archive, a job or a cleanup before it fails.
const WAIT: u64 = 60;

/// Not a signature: moto reads only the region in it (see `crate::s3`).
const S3_AUTHORIZATION: &str =
    "AWS4-HMAC-SHA256 Credential=test/20250101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0";

/// The string field `field` of `value`, which must be there.
fn text(value: &Value, field: &str) -> String {
    value[field].as_str().unwrap_or_else(|| panic!("no string {field} in {value}")).to_owned()
}

/// The header `name`, which must be there.
fn header(headers: &reqwest::header::HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_else(|| panic!("no {name} header in {headers:?}"))
        .to_owned()
}

/// Asserts an error answer's status and code (and that it has a message), naming the case.
async fn assert_refused(response: reqwest::Response, status: u16, code: &str, case: &str) {
    let actual = response.status().as_u16();
    let body_text = response.text().await.unwrap();
    let body: Value =
        serde_json::from_str(&body_text).unwrap_or_else(|_| panic!("{case}: the error is not JSON: {body_text}"));
    assert_eq!((actual, body["error"]["code"].as_str()), (status, Some(code)), "{case}: {body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{case}: no message in {body}");
}

/// Registers session `id`, named `name`, with these users (as a service).
async fn register(app: &TestApp, id: i64, name: &str, users: &[Uuid]) {
    let body = json!({"session_name": name, "session_users": users});
    let response = app.put_session(&app.service_token(), id, &body).await;
    let status = response.status();
    assert_eq!(status, 200, "registering session {id}: {}", response.text().await.unwrap());
}

/// `POST /api/archives` as `token`: asserts the 202 and its shape, returns it.
async fn request_archive(app: &TestApp, token: &str, body: &Value) -> Value {
    let response = app.post_json(token, "/api/archives", body).await;
    let status = response.status();
    let answer = response.text().await.unwrap();
    assert_eq!(status, 202, "asking for an archive of {body}: {answer}");
    let accepted: Value = serde_json::from_str(&answer).unwrap_or_else(|e| panic!("not JSON ({e}): {answer}"));
    let uuid = text(&accepted, "archive_uuid");
    assert!(Uuid::try_parse(&uuid).is_ok(), "{accepted}");
    assert!(Uuid::try_parse(&text(&accepted, "job_uuid")).is_ok(), "{accepted}");
    assert_eq!(accepted["archive_status"], "pending", "{accepted}");
    let status_url = text(&accepted, "status_url");
    assert!(status_url.ends_with(&format!("/file/api/archives/infos?archive_uuid={uuid}")), "{accepted}");
    accepted
}

/// `GET /api/archives/infos` as `token`, asserting a 200.
async fn archive_infos(app: &TestApp, token: &str, uuid: &str) -> Value {
    let response = app.get(token, &format!("/api/archives/infos?archive_uuid={uuid}")).await;
    let status = response.status();
    let answer = response.text().await.unwrap();
    assert_eq!(status, 200, "reading archive {uuid}: {answer}");
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("not JSON ({e}): {answer}"))
}

/// Polls the archive's infos until its status is one of `wanted`, for at most `seconds`;
/// fails at once on a final status that is not wanted (failed, expired, deleted).
async fn archive_until(app: &TestApp, token: &str, uuid: &str, wanted: &[&str], seconds: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    loop {
        let infos = archive_infos(app, token, uuid).await;
        let status = infos["archive_status"].as_str().unwrap_or_default().to_owned();
        if wanted.contains(&status.as_str()) {
            return infos;
        }
        assert!(
            !["failed", "expired", "deleted"].contains(&status.as_str()),
            "archive {uuid} is {status} while {wanted:?} was awaited: {infos}"
        );
        assert!(Instant::now() < deadline, "archive {uuid} still {status} after {seconds} s, not {wanted:?}: {infos}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `GET /api/archives` as `token`.
async fn download_archive(app: &TestApp, token: &str, uuid: &str) -> reqwest::Response {
    app.get(token, &format!("/api/archives?archive_uuid={uuid}")).await
}

/// Downloads a completed archive and checks it against its infos: 200, a zip, the ETag,
/// size and SHA-256 the infos give. Returns its bytes.
async fn download_completed(app: &TestApp, token: &str, infos: &Value) -> Vec<u8> {
    let uuid = text(infos, "archive_uuid");
    let response = download_archive(app, token, &uuid).await;
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.unwrap().to_vec();
    assert_eq!(status, 200, "downloading archive {uuid}: {}", String::from_utf8_lossy(&bytes));
    assert_eq!(header(&headers, "content-type"), "application/zip");
    let sha = text(infos, "archive_sha256");
    assert_eq!(header(&headers, "etag"), format!("\"sha256:{sha}\""), "the ETag names the archive's SHA-256");
    assert!(
        header(&headers, "content-disposition").contains(&text(infos, "archive_original_filename")),
        "the download is named after the archive: {headers:?}"
    );
    assert_eq!(sha256_hex(&bytes), sha, "the download's SHA-256 is archive_sha256");
    assert_eq!(
        Some(bytes.len() as u64),
        infos["archive_file_size"].as_u64(),
        "the download has archive_file_size bytes"
    );
    bytes
}

/// The entries of a zip, in order: name and content (the CRC-32 of each is checked as it is read).
fn zip_entries(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut archive =
        zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap_or_else(|e| panic!("the download is not a zip: {e}"));
    let mut entries = Vec::new();
    for index in 0..archive.len() {
        let mut entry = archive.by_index(index).unwrap_or_else(|e| panic!("zip entry {index}: {e}"));
        let mut content = Vec::new();
        entry.read_to_end(&mut content).unwrap_or_else(|e| panic!("reading zip entry {}: {e}", entry.name()));
        entries.push((entry.name().to_owned(), content));
    }
    entries
}

/// The entries of the zip file at `path`: name, size and SHA-256 of each, read a chunk at
/// a time (the CRC-32 of each is checked as it is read).
fn zip_digests(path: &Path) -> Vec<(String, u64, String)> {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut archive = zip::ZipArchive::new(std::io::BufReader::new(file))
        .unwrap_or_else(|e| panic!("the download is not a zip: {e}"));
    let mut digests = Vec::new();
    let mut buffer = vec![0u8; 1 << 20];
    for index in 0..archive.len() {
        let mut entry = archive.by_index(index).unwrap_or_else(|e| panic!("zip entry {index}: {e}"));
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        loop {
            let read = entry.read(&mut buffer).unwrap_or_else(|e| panic!("reading zip entry {}: {e}", entry.name()));
            if read == 0 {
                break;
            }
            hasher.update(&buffer[..read]);
            size += read as u64;
        }
        digests.push((entry.name().to_owned(), size, hex::encode(hasher.finalize())));
    }
    digests
}

/// Streams a download into the file `path`; returns the SHA-256 of what came.
async fn download_to_file(response: reqwest::Response, path: &Path) -> String {
    use tokio::io::AsyncWriteExt;
    let mut file = tokio::fs::File::create(path).await.unwrap();
    let mut hasher = Sha256::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap_or_else(|e| panic!("the download broke off: {e}"));
        hasher.update(&chunk);
        file.write_all(&chunk).await.unwrap();
    }
    file.flush().await.unwrap();
    hex::encode(hasher.finalize())
}

/// Whether the blob store new blobs go to holds bytes under `key` (`ab/cd/<uuid>`): the
/// file `<data_dir>/blobs/<key>` on the local backend, an object whose key ends with it
/// on S3.
async fn bytes_at(app: &TestApp, key: &str) -> bool {
    match &app.bucket {
        Some(bucket) => bucket.object_keys().await.iter().any(|object| object.ends_with(key)),
        None => app.data_dir.path().join("blobs").join(key).exists(),
    }
}

/// Whether an archive's bytes are in the blob store, at the key of its uuid.
async fn archive_bytes_exist(app: &TestApp, uuid: &str) -> bool {
    let uuid: Uuid = uuid.parse().unwrap();
    let key = assetd::blobs::key_for(uuid);
    if app.bucket.is_none() {
        assert_eq!(app.data_dir.path().join("blobs").join(&key), app.ctx.app.blobs.local().path(uuid));
    }
    bytes_at(app, &key).await
}

/// The `archives` row's status (not the view's, which says `expired` before the cleanup did).
async fn archive_row_status(app: &TestApp, uuid: &str) -> String {
    let client = app.ctx.app.pool.get().await.unwrap();
    let uuid: Uuid = uuid.parse().unwrap();
    client.query_one("SELECT status FROM archives WHERE archive_uuid = $1", &[&uuid]).await.unwrap().get(0)
}

/// Polls until `stream` has an event of type `event_type`, for at most `seconds`.
async fn until_event(app: &TestApp, stream: &str, event_type: &str, seconds: u64) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    loop {
        let types = app.events_of(stream).await;
        if types.iter().any(|t| t == event_type) {
            return;
        }
        assert!(Instant::now() < deadline, "no {event_type} in {stream} after {seconds} s: {types:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls the job until it is over (succeeded, failed or cancelled), for at most `seconds`.
async fn until_job_over(jobs: &Jobs, job: &str, seconds: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    loop {
        let state = jobs.job(job).await;
        if matches!(state["status"].as_str(), Some("succeeded" | "failed" | "cancelled")) {
            return state;
        }
        assert!(Instant::now() < deadline, "job {job} still unfinished after {seconds} s: {state}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The last position of the global log: what comes later was recorded after this moment.
async fn event_position(app: &TestApp) -> i64 {
    app.scalar("SELECT coalesce(max(position), 0) FROM events").await
}

/// Cleanup jobs queued after `position` (so run wholly after it) that succeeded.
async fn cleanups_succeeded_since(app: &TestApp, position: i64) -> i64 {
    app.scalar(&format!(
        "SELECT count(*) FROM jobs WHERE kind = 'cleanup' AND status = 'succeeded' AND created_position > {position}"
    ))
    .await
}

/// Polls until `count` cleanups queued after `position` succeeded, for at most `seconds`.
async fn until_cleanups_since(app: &TestApp, position: i64, count: i64, seconds: u64) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    loop {
        let done = cleanups_succeeded_since(app, position).await;
        if done >= count {
            return;
        }
        assert!(Instant::now() < deadline, "only {done} of {count} cleanups succeeded within {seconds} s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The sum of a counter (`archives_expired`, `orphan_blobs_removed`, …) over the results
/// of the cleanups that succeeded.
async fn cleanup_total(app: &TestApp, counter: &str) -> i64 {
    app.scalar(&format!(
        "SELECT coalesce(sum((result->>'{counter}')::bigint), 0)::bigint FROM jobs
         WHERE kind = 'cleanup' AND status = 'succeeded'"
    ))
    .await
}

async fn assert_no_cleanup_failed(app: &TestApp) {
    let failed = app.scalar("SELECT count(*) FROM jobs WHERE kind = 'cleanup' AND status = 'failed'").await;
    assert_eq!(
        failed,
        0,
        "cleanups failed: {}",
        app.scalar_json("SELECT json_agg(error) FROM jobs WHERE kind = 'cleanup' AND status = 'failed'").await
    );
}

/// Asserts that asset `uuid` downloads with the SHA-256 `sha`.
async fn assert_asset_intact(app: &TestApp, token: &str, uuid: &str, sha: &str) {
    let response = app.get(token, &format!("/api/assets?asset_uuid={uuid}")).await;
    let status = response.status();
    let bytes = response.bytes().await.unwrap();
    assert_eq!(status, 200, "asset {uuid} no longer downloads: {}", String::from_utf8_lossy(&bytes));
    assert_eq!(sha256_hex(&bytes), sha, "asset {uuid} lost its bytes");
}

/// Every file under `dir`.
fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(files_in(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// The size of the largest file directly in `dir` (0 when there is none).
fn largest_file(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.metadata().ok())
        .filter(|metadata| metadata.is_file())
        .map(|metadata| metadata.len())
        .max()
        .unwrap_or(0)
}

/// Makes the file at `path` look an hour old (its modification time), as most blobs are.
fn make_old(path: &Path) {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    file.set_modified(SystemTime::now() - Duration::from_secs(3600))
        .unwrap_or_else(|e| panic!("ageing {}: {e}", path.display()));
}

/// Puts an object into the test's bucket behind assetd's back.
async fn put_object(bucket: &crate::s3::TestBucket, key: &str, bytes: Vec<u8>) {
    let url = format!("{}/{}/{key}", bucket.endpoint, bucket.name);
    let response = reqwest::Client::new()
        .put(&url)
        .header(reqwest::header::AUTHORIZATION, S3_AUTHORIZATION)
        .body(bytes)
        .send()
        .await
        .unwrap_or_else(|e| panic!("PUT {url}: {e}"));
    assert!(response.status().is_success(), "PUT {url}: {}", response.status());
}

/// Workers (and a scheduler) for `jobs`, as another process's would be.
fn start_workers(jobs: &Jobs) -> assetd::shutdown::Shutdown {
    let mut config = jobs.config.clone();
    config.relay = false;
    config.commands = false;
    config.jobs.workers = true;
    let shutdown = assetd::shutdown::Shutdown::new();
    assetd::cli::start_background(&jobs.app.ctx.app, &config, &shutdown, assetd::cli::Role::Worker).unwrap();
    shutdown
}

/// The next message of `consumer`, within 60 s.
async fn next_delivery(consumer: &mut lapin::Consumer, what: &str) -> lapin::message::Delivery {
    tokio::time::timeout(Duration::from_secs(60), consumer.next())
        .await
        .unwrap_or_else(|_| panic!("no {what} within 60 s"))
        .unwrap_or_else(|| panic!("the consumer of the {what} closed"))
        .unwrap_or_else(|e| panic!("receiving the {what}: {e}"))
}

/// A session's archive: one entry per live asset, `<id>_<name>/<original filename>`, in
/// upload order, a same name made unique before its extension, a non-ASCII name kept
/// (UTF-8 in the zip), every byte as uploaded (deflated or not); the download is what
/// the infos and the job's result say, and lies at the key of the archive's uuid.
async fn a_session_archive_holds_every_asset_byte_for_byte(backend: Backend) {
    let jobs = Jobs::start_with(quick_jobs(""), TestOptions { backend, ..Default::default() }, true, None).await;
    let app = &jobs.app;
    let owner = Uuid::new_v4();
    register(app, 11, "visit", &[owner]).await;
    let token = app.user_token(owner);
    // Text that deflates well, a small table, and bytes that do not compress at all.
    let notes = "Grüße aus Köln, café ünïcode\n".repeat(4_000).into_bytes();
    let table = "id,value\n1,2\n".repeat(500).into_bytes();
    let noise = pseudo_random_bytes(11, 300_000);
    let first = app.upload_ok(&token, 11, "cafe.txt", &notes).await;
    // Named through the API rather than the multipart filename, so that the name is exactly this.
    let rename =
        json!({"file_asset": {"asset_uuid": first["asset_uuid"], "asset_original_filename": "café ünïcode.txt"}});
    let renamed = app.post_json(&token, "/api/assets/infos", &rename).await;
    assert_eq!(renamed.status(), 200);
    assert_eq!(renamed.json::<Value>().await.unwrap()["asset_original_filename"], "café ünïcode.txt");
    app.upload_ok(&token, 11, "data.csv", &table).await;
    app.upload_ok(&token, 11, "data.csv", &noise).await;

    let accepted = request_archive(app, &token, &json!({"id_session": 11})).await;
    let uuid = text(&accepted, "archive_uuid");
    let job_uuid = text(&accepted, "job_uuid");
    let infos = archive_until(app, &token, &uuid, &["completed"], WAIT).await;
    assert_eq!(infos["archive_uuid"], uuid);
    assert_eq!(infos["archive_entries"], 3, "{infos}");
    assert_eq!(infos["archive_skipped_assets"], json!([]), "{infos}");
    assert_eq!(infos["id_session"], 11, "{infos}");
    assert_eq!(infos["archive_owner_uuid"], owner.to_string(), "{infos}");
    assert_eq!(infos["archive_original_filename"], "11_visit.zip", "{infos}");
    assert_eq!(infos["archive_error"], Value::Null, "{infos}");
    assert_eq!(infos["job_uuid"], job_uuid, "{infos}");
    let completed_at = chrono::DateTime::parse_from_rfc3339(&text(&infos, "archive_completed_at")).unwrap();
    let expires_at = chrono::DateTime::parse_from_rfc3339(&text(&infos, "archive_expires_at")).unwrap();
    let kept = (expires_at - completed_at).num_seconds();
    assert!((7 * 86_400 - 60..=7 * 86_400 + 60).contains(&kept), "kept {kept} s, not the default 7 days: {infos}");

    let job = jobs.until(&job_uuid, "succeeded", WAIT).await;
    assert_eq!(job["kind"], "archive", "{job}");
    assert_eq!(job["result"]["archive_uuid"], uuid, "{job}");
    assert_eq!(job["result"]["archive_file_size"], infos["archive_file_size"], "{job}");
    assert_eq!(job["result"]["archive_sha256"], infos["archive_sha256"], "{job}");
    assert_eq!(job["result"]["entries"], 3, "{job}");

    let bytes = download_completed(app, &token, &infos).await;
    let entries = zip_entries(&bytes);
    let names: Vec<&str> = entries.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["11_visit/café ünïcode.txt", "11_visit/data.csv", "11_visit/data (2).csv"], "in upload order");
    for ((name, content), expected) in entries.iter().zip([&notes, &table, &noise]) {
        assert!(content == expected, "{name}: {} bytes, not the {} bytes uploaded", content.len(), expected.len());
    }

    // Its bytes are at the key of its uuid: `ab/cd/<uuid>`, the first two hex digits, the next two.
    let hex = uuid.replace('-', "");
    assert_eq!(assetd::blobs::key_for(uuid.parse().unwrap()), format!("{}/{}/{uuid}", &hex[..2], &hex[2..4]));
    assert!(archive_bytes_exist(app, &uuid).await, "the archive's bytes are at the key of its uuid");
    assert_eq!(
        app.events_of(&format!("archive-{uuid}")).await,
        ["ArchiveRequested", "ArchiveStarted", "ArchiveCompleted"]
    );
    // The archives table comes from the events alone: a replay rebuilds it exactly.
    let before = app.table_snapshot("archives", "archive_uuid").await;
    {
        let mut client = app.ctx.app.pool.get().await.unwrap();
        assetd::projections::replay(&mut client).await.unwrap();
    }
    assert_eq!(app.table_snapshot("archives", "archive_uuid").await, before, "replay rebuilds the archives table");
    jobs.stop().await;
}

on_both_backends!(
    a_session_archive_holds_every_asset_byte_for_byte,
    an_expired_archive_answers_410_and_its_bytes_are_gone,
    a_deleted_archive_is_404_and_its_bytes_go,
    cleanup_removes_a_planted_orphan_and_never_a_live_blob,
);

/// An archive of a list of assets holds those (not the session's others); its download
/// answers ranges (206, the same bytes as the whole) and conditional requests.
#[tokio::test]
async fn an_archive_of_listed_assets_and_its_range_download() {
    let jobs = Jobs::start(quick_jobs("")).await;
    let app = &jobs.app;
    let owner = Uuid::new_v4();
    register(app, 12, "lab", &[owner]).await;
    let token = app.user_token(owner);
    let a = pseudo_random_bytes(12, 50_000);
    let b = b"second listed\n".repeat(100);
    let first = text(&app.upload_ok(&token, 12, "a.bin", &a).await, "asset_uuid");
    let second = text(&app.upload_ok(&token, 12, "b.txt", &b).await, "asset_uuid");
    app.upload_ok(&token, 12, "c.txt", b"not listed").await;

    let accepted = request_archive(app, &token, &json!({"asset_uuids": [second, first]})).await;
    let uuid = text(&accepted, "archive_uuid");
    let infos = archive_until(app, &token, &uuid, &["completed"], WAIT).await;
    assert_eq!(infos["archive_entries"], 2, "{infos}");
    assert_eq!(infos["id_session"], Value::Null, "asked for by list: {infos}");
    assert_eq!(infos["archive_skipped_assets"], json!([]), "{infos}");
    let filename = text(&infos, "archive_original_filename");
    assert!(filename.ends_with(".zip"), "{infos}");
    let full = download_completed(app, &token, &infos).await;
    let mut entries = zip_entries(&full);
    entries.sort();
    assert_eq!(entries, [("12_lab/a.bin".to_owned(), a), ("12_lab/b.txt".to_owned(), b)]);

    let path = app.url(&format!("/api/archives?archive_uuid={uuid}"));
    let ranged = |range: &'static str| {
        app.client.get(path.as_str()).header("Authorization", format!("Bearer {token}")).header("Range", range).send()
    };
    let head = ranged("bytes=0-9").await.unwrap();
    assert_eq!(head.status(), 206);
    assert_eq!(header(head.headers(), "content-range"), format!("bytes 0-9/{}", full.len()));
    let etag = header(head.headers(), "etag");
    assert_eq!(etag, format!("\"sha256:{}\"", text(&infos, "archive_sha256")));
    let body = head.bytes().await.unwrap();
    assert_eq!(&body[..], &full[..10], "the first 10 bytes of the whole download");
    assert!(body.starts_with(b"PK\x03\x04"), "a zip starts with a local file header");
    // The end of central directory record, by a suffix range.
    let tail = ranged("bytes=-22").await.unwrap();
    assert_eq!(tail.status(), 206);
    assert_eq!(&tail.bytes().await.unwrap()[..], &full[full.len() - 22..]);
    // A cached copy is current.
    let cached = app
        .client
        .get(path.as_str())
        .header("Authorization", format!("Bearer {token}"))
        .header("If-None-Match", etag.as_str())
        .send()
        .await
        .unwrap();
    assert_eq!(cached.status(), 304);
    jobs.stop().await;
}

/// An archive is its owner's: another member of its session (or anyone else) is refused
/// its infos, its download and its deletion; superadmins and services reach it.
#[tokio::test]
async fn only_the_owner_or_a_service_reaches_an_archive() {
    let jobs = Jobs::start(quick_jobs("")).await;
    let app = &jobs.app;
    let (owner, member) = (Uuid::new_v4(), Uuid::new_v4());
    register(app, 20, "shared", &[owner, member]).await;
    let (owner_token, member_token) = (app.user_token(owner), app.user_token(member));
    let asset = app.upload_ok(&member_token, 20, "shared.txt", b"both members may read this").await;
    let uuid = text(&request_archive(app, &owner_token, &json!({"id_session": 20})).await, "archive_uuid");
    let infos = archive_until(app, &owner_token, &uuid, &["completed"], WAIT).await;
    assert_eq!(infos["archive_owner_uuid"], owner.to_string());

    let stranger = app.user_token(Uuid::new_v4());
    for token in [&member_token, &stranger] {
        assert_error(app.get(token, &format!("/api/archives/infos?archive_uuid={uuid}")).await, 403, "forbidden").await;
        assert_error(download_archive(app, token, &uuid).await, 403, "forbidden").await;
        assert_error(app.delete(token, &format!("/api/archives?uuid={uuid}")).await, 403, "forbidden").await;
    }
    // Someone outside the session may not ask for an archive of it, nor of its assets.
    let of_session = app.post_json(&stranger, "/api/archives", &json!({"id_session": 20})).await;
    assert_error(of_session, 403, "forbidden").await;
    let of_list = app.post_json(&stranger, "/api/archives", &json!({"asset_uuids": [asset["asset_uuid"]]})).await;
    assert_error(of_list, 403, "forbidden").await;

    let superadmin = app.token_for(PrincipalKind::User, Uuid::new_v4(), true);
    assert_eq!(archive_infos(app, &superadmin, &uuid).await["archive_status"], "completed");
    let service = app.service_token();
    let infos = archive_infos(app, &service, &uuid).await;
    download_completed(app, &service, &infos).await;
    let deleted = app.delete(&service, &format!("/api/archives?uuid={uuid}")).await;
    assert_eq!(deleted.status(), 200);
    assert_eq!(deleted.json::<Value>().await.unwrap()["archive_status"], "deleted");
    assert_eq!(archive_infos(app, &owner_token, &uuid).await["archive_status"], "deleted", "the owner sees it deleted");
    // The refusals changed nothing: one archive, asked for, built and deleted.
    assert_eq!(app.scalar("SELECT count(*) FROM archives").await, 1);
    assert_eq!(
        app.events_of(&format!("archive-{uuid}")).await,
        ["ArchiveRequested", "ArchiveStarted", "ArchiveCompleted", "ArchiveDeleted"]
    );
    jobs.stop().await;
}

/// Requests that cannot be an archive get a JSON error naming why, and leave nothing (no
/// archive, no job); unknown or malformed archive uuids too. No workers needed: nothing
/// here is built.
#[tokio::test]
async fn bad_archive_requests_get_clear_errors() {
    let app = TestApp::spawn().await;
    let owner = Uuid::new_v4();
    register(&app, 30, "checked", &[owner]).await;
    let token = app.user_token(owner);
    let asset = text(&app.upload_ok(&token, 30, "a.txt", b"a").await, "asset_uuid");
    let gone = text(&app.upload_ok(&token, 30, "gone.txt", b"gone").await, "asset_uuid");
    assert_eq!(app.delete(&token, &format!("/api/assets?uuid={gone}")).await.status(), 200);
    let too_many: Vec<Uuid> = (0..10_001).map(|_| Uuid::new_v4()).collect();
    let unprocessable = [
        ("neither field", json!({})),
        ("both fields", json!({"id_session": 30, "asset_uuids": [asset]})),
        ("an empty list", json!({"asset_uuids": []})),
        ("an unknown field", json!({"id_session": 30, "format": "tar"})),
        ("an id that is a string", json!({"id_session": "30"})),
        ("an id that is not an integer", json!({"id_session": 30.5})),
        ("an id that is no session id", json!({"id_session": 0})),
        ("a list of things that are not uuids", json!({"asset_uuids": ["not-a-uuid"]})),
        ("more than 10,000 assets", json!({"asset_uuids": too_many})),
        ("a deleted asset", json!({"asset_uuids": [gone]})),
        ("a body that is not an object", json!([30])),
    ];
    for (case, body) in &unprocessable {
        assert_refused(app.post_json(&token, "/api/archives", body).await, 422, "invalid_field", case).await;
    }
    let raw = |body: &'static str, content_type: &'static str| {
        app.client
            .post(app.url("/api/archives"))
            .header("Authorization", format!("Bearer {token}"))
            .header("Content-Type", content_type)
            .body(body)
            .send()
    };
    let cut_short = raw(r#"{"id_session": 30"#, "application/json").await.unwrap();
    assert_refused(cut_short, 400, "invalid_json", "JSON cut short").await;
    let twice = raw(r#"{"id_session": 30, "id_session": 31}"#, "application/json").await.unwrap();
    assert_refused(twice, 400, "invalid_json", "a key given twice").await;
    let plain = raw(r#"{"id_session": 30}"#, "text/plain").await.unwrap();
    assert_refused(plain, 415, "unsupported_media_type", "not application/json").await;
    let anonymous = app.client.post(app.url("/api/archives")).json(&json!({"id_session": 30})).send().await.unwrap();
    assert_refused(anonymous, 401, "missing_token", "no token").await;
    let unknown_session = app.post_json(&token, "/api/archives", &json!({"id_session": 9_999})).await;
    assert_refused(unknown_session, 404, "not_found", "an unknown session").await;
    let unknown_asset = app.post_json(&token, "/api/archives", &json!({"asset_uuids": [asset, Uuid::new_v4()]})).await;
    assert_refused(unknown_asset, 404, "not_found", "an unknown asset").await;
    assert_eq!(app.scalar("SELECT count(*) FROM archives").await, 0, "no archive was made");
    assert_eq!(app.scalar("SELECT count(*) FROM jobs").await, 0, "no job was queued");
    assert_eq!(app.scalar("SELECT count(*) FROM events WHERE type LIKE 'Archive%'").await, 0);

    let unknown = Uuid::new_v4();
    for path in [format!("/api/archives/infos?archive_uuid={unknown}"), format!("/api/archives?archive_uuid={unknown}")]
    {
        assert_refused(app.get(&token, &path).await, 404, "not_found", &path).await;
    }
    let delete_unknown = app.delete(&token, &format!("/api/archives?uuid={unknown}")).await;
    assert_refused(delete_unknown, 404, "not_found", "DELETE of an unknown archive").await;
    for path in ["/api/archives/infos?archive_uuid=not-a-uuid", "/api/archives?archive_uuid=1234"] {
        assert_refused(app.get(&token, path).await, 400, "invalid_parameter", path).await;
    }
    let delete_malformed = app.delete(&token, "/api/archives?uuid=zzz").await;
    assert_refused(delete_malformed, 400, "invalid_parameter", "DELETE of a malformed uuid").await;
    for path in ["/api/archives/infos", "/api/archives"] {
        assert_refused(app.get(&token, path).await, 400, "missing_parameter", path).await;
    }
    assert_refused(app.delete(&token, "/api/archives").await, 400, "missing_parameter", "DELETE without uuid").await;
}

/// With `ASSETD_ARCHIVE_TTL=1` and `ASSETD_CLEANUP_INTERVAL=1`: the cleanup expires the
/// archive (`ArchiveExpired`), its bytes go, and its download answers 410.
async fn an_expired_archive_answers_410_and_its_bytes_are_gone(backend: Backend) {
    let config = JobsConfig { archive_ttl_seconds: 1, cleanup_interval_seconds: 1, ..quick_jobs("") };
    let jobs = Jobs::start_with(config, TestOptions { backend, ..Default::default() }, true, None).await;
    let app = &jobs.app;
    let owner = Uuid::new_v4();
    register(app, 15, "brief", &[owner]).await;
    let token = app.user_token(owner);
    let bytes = pseudo_random_bytes(15, 30_000);
    let asset = text(&app.upload_ok(&token, 15, "kept.bin", &bytes).await, "asset_uuid");
    let uuid = text(&request_archive(app, &token, &json!({"id_session": 15})).await, "archive_uuid");
    let stream = format!("archive-{uuid}");
    until_event(app, &stream, "ArchiveCompleted", WAIT).await;
    until_event(app, &stream, "ArchiveExpired", WAIT).await;
    // The bytes go in the cleanup that expired it, before it reports success.
    let deadline = Instant::now() + Duration::from_secs(WAIT);
    while cleanup_total(app, "archives_expired").await < 1 {
        assert!(Instant::now() < deadline, "no cleanup that expired an archive succeeded within {WAIT} s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        app.events_of(&stream).await,
        ["ArchiveRequested", "ArchiveStarted", "ArchiveCompleted", "ArchiveExpired"]
    );
    let expired = app
        .scalar_json(&format!("SELECT data FROM events WHERE stream = '{stream}' AND type = 'ArchiveExpired'"))
        .await;
    assert_eq!(expired["archive_uuid"], uuid, "{expired}");
    assert_eq!(expired["blob"]["key"], assetd::blobs::key_for(uuid.parse().unwrap()), "{expired}");
    assert_eq!(archive_row_status(app, &uuid).await, "expired");
    assert_eq!(archive_infos(app, &token, &uuid).await["archive_status"], "expired");
    assert_refused(download_archive(app, &token, &uuid).await, 410, "archive_expired", "an expired archive").await;
    assert!(!archive_bytes_exist(app, &uuid).await, "the expired archive's bytes are gone");
    assert_asset_intact(app, &token, &asset, &sha256_hex(&bytes)).await;
    assert_no_cleanup_failed(app).await;
    jobs.stop().await;
}

/// A deleted archive answers 404 and loses its bytes at once; one deleted as soon as it
/// was asked for is never completed afterwards by its job, and leaves no bytes either.
async fn a_deleted_archive_is_404_and_its_bytes_go(backend: Backend) {
    let jobs = Jobs::start_with(quick_jobs(""), TestOptions { backend, ..Default::default() }, true, None).await;
    let app = &jobs.app;
    let owner = Uuid::new_v4();
    register(app, 16, "deleted", &[owner]).await;
    let token = app.user_token(owner);
    let mut assets = Vec::new();
    for n in 0..2u64 {
        let bytes = pseudo_random_bytes(160 + n, 40_000);
        let asset = app.upload_ok(&token, 16, &format!("a{n}.bin"), &bytes).await;
        assets.push((text(&asset, "asset_uuid"), sha256_hex(&bytes)));
    }
    let uuid = text(&request_archive(app, &token, &json!({"id_session": 16})).await, "archive_uuid");
    archive_until(app, &token, &uuid, &["completed"], WAIT).await;
    assert!(archive_bytes_exist(app, &uuid).await, "a completed archive has its bytes");

    let response = app.delete(&token, &format!("/api/archives?uuid={uuid}")).await;
    let status = response.status();
    let deleted: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{deleted}");
    assert_eq!(deleted["archive_uuid"], uuid, "{deleted}");
    assert_eq!(deleted["archive_status"], "deleted", "{deleted}");
    assert!(!archive_bytes_exist(app, &uuid).await, "its bytes went with it");
    assert_refused(download_archive(app, &token, &uuid).await, 404, "not_found", "a deleted archive").await;
    assert_eq!(archive_infos(app, &token, &uuid).await["archive_status"], "deleted");
    let again = app.delete(&token, &format!("/api/archives?uuid={uuid}")).await;
    assert_refused(again, 404, "not_found", "deleting it again").await;
    let types = app.events_of(&format!("archive-{uuid}")).await;
    assert_eq!(types.last().map(String::as_str), Some("ArchiveDeleted"), "{types:?}");
    for (asset, sha) in &assets {
        assert_asset_intact(app, &token, asset, sha).await;
    }

    // Deleted right after it was asked for, whatever its job was doing then.
    let early = text(&request_archive(app, &token, &json!({"id_session": 16})).await, "archive_uuid");
    let response = app.delete(&token, &format!("/api/archives?uuid={early}")).await;
    assert_eq!(response.status(), 200);
    let job = text(&archive_infos(app, &token, &early).await, "job_uuid");
    let over = until_job_over(&jobs, &job, WAIT).await;
    assert!(over["status"] == "cancelled" || over["status"] == "succeeded", "the job of a deleted archive: {over}");
    assert_eq!(archive_infos(app, &token, &early).await["archive_status"], "deleted", "its job did not bring it back");
    let types = app.events_of(&format!("archive-{early}")).await;
    assert_eq!(types.last().map(String::as_str), Some("ArchiveDeleted"), "{types:?}");
    assert_refused(download_archive(app, &token, &early).await, 404, "not_found", "an archive deleted early").await;
    // No bytes stay: none at its key, no multipart upload left open; only the assets' blobs.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (left, blobs) = (archive_bytes_exist(app, &early).await, app.blob_count().await);
        if !left && blobs == assets.len() {
            break;
        }
        assert!(Instant::now() < deadline, "bytes stay: at its key {left}, blobs {blobs} for {} assets", assets.len());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    jobs.stop().await;
}

/// With `ASSETD_ORPHAN_GRACE=1` and `ASSETD_CLEANUP_INTERVAL=1`: bytes planted under a
/// key of the right shape that nothing refers to go; the live blobs (assets, an upload
/// received and not committed, a completed archive), however old, all stay.
async fn cleanup_removes_a_planted_orphan_and_never_a_live_blob(backend: Backend) {
    let config = JobsConfig { cleanup_interval_seconds: 1, orphan_grace_seconds: 1, ..quick_jobs("") };
    let jobs = Jobs::start_with(config, TestOptions { backend, ..Default::default() }, true, None).await;
    let app = &jobs.app;
    let owner = Uuid::new_v4();
    register(app, 35, "live", &[owner]).await;
    let token = app.user_token(owner);
    let mut live = Vec::new();
    for n in 0..3u64 {
        let bytes = pseudo_random_bytes(350 + n, 20_000 + n as usize * 1_000);
        let asset = app.upload_ok(&token, 35, &format!("live{n}.bin"), &bytes).await;
        live.push((text(&asset, "asset_uuid"), sha256_hex(&bytes)));
    }
    let created = app.create_upload_ok(&token, &json!({"id_session": 35, "filename": "received.bin"})).await;
    let received = text(&created, "upload_uuid");
    let received_bytes = pseudo_random_bytes(359, 25_000);
    let received_sha = sha256_hex(&received_bytes);
    assert_eq!(app.put_signed(&text(&created, "upload_url"), received_bytes).await.status(), 200);
    let archive = text(&request_archive(app, &token, &json!({"id_session": 35})).await, "archive_uuid");
    archive_until(app, &token, &archive, &["completed"], WAIT).await;

    // The orphan: bytes under `ab/cd/<uuid>` (the shards of its uuid) that nothing refers to.
    let orphan = Uuid::new_v4();
    let key = assetd::blobs::key_for(orphan);
    let hex = orphan.simple().to_string();
    assert_eq!(key, format!("{}/{}/{orphan}", &hex[..2], &hex[2..4]));
    let planted_at = event_position(app).await;
    match &app.bucket {
        None => {
            // Every blob an hour old, the live ones too: older than the grace, as most are.
            let blobs = app.data_dir.path().join("blobs");
            let path = blobs.join(&key);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, b"nothing refers to these bytes").unwrap();
            assert!(path.exists(), "the orphan was planted");
            for file in files_in(&blobs) {
                make_old(&file);
            }
        }
        Some(bucket) => {
            // Objects cannot be made old: they are within a second.
            let keys = bucket.object_keys().await;
            let live_key = assetd::blobs::key_for(live[0].0.parse().unwrap());
            let object = keys.iter().find(|k| k.ends_with(&live_key)).unwrap_or_else(|| panic!("{keys:?}"));
            let prefix = &object[..object.len() - live_key.len()];
            put_object(bucket, &format!("{prefix}{key}"), b"nothing refers to these bytes".to_vec()).await;
            assert!(bytes_at(app, &key).await, "the orphan was planted");
        }
    }
    // Two whole cleanups after the plant, and the orphan went.
    let deadline = Instant::now() + Duration::from_secs(WAIT);
    loop {
        let gone = !bytes_at(app, &key).await;
        let cleanups = cleanups_succeeded_since(app, planted_at).await;
        if gone && cleanups >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "after {WAIT} s: orphan gone {gone}, cleanups since the plant {cleanups}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(cleanup_total(app, "orphan_blobs_removed").await >= 1, "a cleanup reports the orphan it removed");
    assert_no_cleanup_failed(app).await;

    for (uuid, sha) in &live {
        assert_asset_intact(app, &token, uuid, sha).await;
        assert!(app.blob_exists(uuid.parse().unwrap()).await, "asset {uuid} keeps its blob");
    }
    let infos = archive_until(app, &token, &archive, &["completed"], 1).await;
    download_completed(app, &token, &infos).await;
    assert_eq!(app.upload_status(&token, &received).await["status"], "received");
    let committed = app.commit_upload(&token, &received, &json!({"asset_name": "received"})).await;
    assert_eq!(committed.status(), 200, "{:?}", committed.text().await);
    assert_asset_intact(app, &token, &received, &received_sha).await;
    jobs.stop().await;
}

/// Cleanups every second with a grace of a second, while assets are uploaded, two-phase
/// uploads are sent (some committed, some left received) and archives are built, for
/// 10 s: afterwards every asset, every archive and every received upload is whole.
#[tokio::test]
async fn cleanup_running_repeatedly_never_removes_what_is_live() {
    let jobs = Jobs::start(JobsConfig { cleanup_interval_seconds: 1, orphan_grace_seconds: 1, ..quick_jobs("") }).await;
    let app = &jobs.app;
    let owner = Uuid::new_v4();
    register(app, 40, "busy", &[owner]).await;
    let token = app.user_token(owner);
    let started = event_position(app).await;
    let until = Instant::now() + Duration::from_secs(10);
    // What each writer made, with the SHA-256 it must keep.
    let assets: Mutex<Vec<(String, String)>> = Mutex::default();
    let received: Mutex<Vec<(String, String)>> = Mutex::default();
    let archives: Mutex<Vec<String>> = Mutex::default();
    let uploading = async {
        let mut n = 0u64;
        while Instant::now() < until {
            let bytes = pseudo_random_bytes(1_000 + n, 1_000 + (n as usize * 7_919) % 60_000);
            let asset = app.upload_ok(&token, 40, &format!("u{n}.bin"), &bytes).await;
            assets.lock().unwrap().push((text(&asset, "asset_uuid"), sha256_hex(&bytes)));
            n += 1;
        }
    };
    let sending = async {
        let mut n = 0u64;
        while Instant::now() < until {
            let bytes = pseudo_random_bytes(2_000 + n, 20_000);
            let sha = sha256_hex(&bytes);
            let body = json!({"id_session": 40, "filename": format!("p{n}.bin")});
            let created = app.create_upload_ok(&token, &body).await;
            let uuid = text(&created, "upload_uuid");
            assert_eq!(app.put_signed(&text(&created, "upload_url"), bytes).await.status(), 200, "PUT of {uuid}");
            if n.is_multiple_of(2) {
                let committed = app.commit_upload(&token, &uuid, &json!({"asset_name": format!("p{n}")})).await;
                assert_eq!(committed.status(), 200, "committing {uuid}: {:?}", committed.text().await);
                assets.lock().unwrap().push((uuid, sha));
            } else {
                received.lock().unwrap().push((uuid, sha));
            }
            n += 1;
        }
    };
    let archiving = async {
        let mut n = 0u64;
        while Instant::now() < until {
            let recent: Vec<String> =
                assets.lock().unwrap().iter().rev().take(3).map(|(uuid, _)| uuid.clone()).collect();
            let body = if recent.is_empty() || n.is_multiple_of(2) {
                json!({"id_session": 40})
            } else {
                json!({"asset_uuids": recent})
            };
            // As a service: a user may have only 5 being built, and this asks faster
            // than a loaded machine builds.
            let accepted = request_archive(app, &app.service_token(), &body).await;
            archives.lock().unwrap().push(text(&accepted, "archive_uuid"));
            n += 1;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    tokio::join!(uploading, sending, archiving);
    let (assets, received, archives) =
        (assets.into_inner().unwrap(), received.into_inner().unwrap(), archives.into_inner().unwrap());
    let during = cleanups_succeeded_since(app, started).await;
    assert!(during >= 2, "only {during} cleanups ran during the 10 s: nothing was put to the test");
    assert!(!assets.is_empty(), "no asset was uploaded");
    assert!(!received.is_empty(), "no upload was left received");
    assert!(!archives.is_empty(), "no archive was asked for");

    // Every archive built, then two more cleanups, everything being older than the grace.
    let mut completed = Vec::new();
    for uuid in &archives {
        completed.push(archive_until(app, &app.service_token(), uuid, &["completed"], WAIT).await);
    }
    until_cleanups_since(app, event_position(app).await, 2, WAIT).await;
    assert_no_cleanup_failed(app).await;
    // Nothing here fails, so nothing is ever orphaned: a removal can only have been of a live blob.
    assert_eq!(cleanup_total(app, "orphan_blobs_removed").await, 0, "blobs were removed, though none was orphaned");

    for (uuid, sha) in &assets {
        assert_asset_intact(app, &token, uuid, sha).await;
    }
    for infos in &completed {
        download_completed(app, &app.service_token(), infos).await;
    }
    for (uuid, sha) in &received {
        assert_eq!(app.upload_status(&token, uuid).await["status"], "received", "upload {uuid}");
        let committed = app.commit_upload(&token, uuid, &json!({"asset_name": "late"})).await;
        assert_eq!(committed.status(), 200, "committing {uuid} afterwards: {:?}", committed.text().await);
        assert_asset_intact(app, &token, uuid, sha).await;
    }
    jobs.stop().await;
}

/// `DELETE /api/sessions/{id}` answers 202 with a `purge_session` job: the session is
/// gone at once, its 1,200 assets are deleted in batches of at most 500 (one
/// transaction each), while uploads to another session go on.
#[tokio::test]
async fn deleting_a_session_is_a_job_that_deletes_its_assets_in_batches() {
    let jobs = Jobs::start(quick_jobs("")).await;
    let app = &jobs.app;
    let (member, other) = (Uuid::new_v4(), Uuid::new_v4());
    register(app, 60, "doomed", &[member]).await;
    register(app, 61, "kept", &[other]).await;
    let (token, other_token) = (app.user_token(member), app.user_token(other));
    let count = 1_200u64;
    let member_token = token.as_str();
    let uploaded: Vec<String> = futures::stream::iter(0..count)
        .map(|n| async move {
            let asset = app.upload_ok(member_token, 60, &format!("f{n}.txt"), format!("file {n}").as_bytes()).await;
            text(&asset, "asset_uuid")
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let kept = app.upload_ok(&other_token, 61, "kept.txt", b"kept").await;
    let before = event_position(app).await;

    let response = app.delete(&jobs.service, "/api/sessions/60").await;
    let status = response.status();
    let accepted: Value = response.json().await.unwrap();
    assert_eq!(status, 202, "{accepted}");
    assert_eq!(accepted["id_session"], 60, "{accepted}");
    let job = text(&accepted, "job_uuid");
    assert!(text(&accepted, "status_url").ends_with(&format!("/file/api/jobs/{job}")), "{accepted}");
    // At once, the session is gone for its members (and everyone).
    assert_error(app.get(&token, "/api/sessions/60").await, 404, "not_found").await;
    assert_error(app.get(&jobs.service, "/api/sessions/60").await, 404, "not_found").await;
    // Meanwhile, uploads to another session go on, one after another until the purge is done.
    let mut meanwhile = vec![(text(&kept, "asset_uuid"), sha256_hex(b"kept"))];
    let deadline = Instant::now() + Duration::from_secs(120);
    let done = loop {
        let bytes = format!("uploaded while session 60 is purged ({})", meanwhile.len()).into_bytes();
        let asset = app.upload_ok(&other_token, 61, "meanwhile.txt", &bytes).await;
        meanwhile.push((text(&asset, "asset_uuid"), sha256_hex(&bytes)));
        let state = jobs.job(&job).await;
        if state["status"] == "succeeded" {
            break state;
        }
        assert!(matches!(state["status"].as_str(), Some("queued" | "running")), "the purge: {state}");
        assert!(Instant::now() < deadline, "the purge is not done after 120 s: {state}");
    };
    assert_eq!(done["kind"], "purge_session", "{done}");
    assert_eq!(done["id_session"], 60, "{done}");
    assert_eq!(done["result"]["assets_deleted"], count, "{done}");

    let live = app.scalar("SELECT count(*) FROM assets WHERE id_session = 60 AND asset_status = 'available'").await;
    assert_eq!(live, 0, "no asset of the session is left");
    let deletions = format!(
        "FROM events WHERE type = 'AssetDeleted' AND data->>'reason' = 'session_deleted' AND position > {before}"
    );
    assert_eq!(app.scalar(&format!("SELECT count(*) {deletions}")).await, count as i64, "an AssetDeleted each");
    let batches = app.scalar(&format!("SELECT count(DISTINCT tx::text) {deletions}")).await;
    assert!(batches >= 3, "1,200 assets in batches of at most 500 take 3 transactions at least, not {batches}");
    let largest =
        app.scalar(&format!("SELECT max(n) FROM (SELECT count(*) AS n {deletions} GROUP BY tx::text) b")).await;
    assert!(largest <= 500, "a batch of {largest} deletions in one transaction");
    for uuid in uploaded.iter().step_by(97) {
        let infos: Value =
            app.get(&jobs.service, &format!("/api/assets/infos?asset_uuid={uuid}")).await.json().await.unwrap();
        assert_eq!(infos["asset_status"], "deleted", "{infos}");
        let download = app.get(&jobs.service, &format!("/api/assets?asset_uuid={uuid}")).await;
        assert_error(download, 404, "not_found").await;
        assert!(!app.blob_exists(uuid.parse().unwrap()).await, "the bytes of {uuid} are removed");
    }
    assert_eq!(
        TestApp::files_under(&app.data_dir.path().join("blobs")),
        meanwhile.len(),
        "only the other session's blobs are left"
    );
    for (uuid, sha) in &meanwhile {
        assert_asset_intact(app, &other_token, uuid, sha).await;
    }
    jobs.stop().await;
}

/// A session deleted and registered again before its purge ran (workers busy or down:
/// here none): the new registration's members list none of the old one's assets, which
/// are still in the table, waiting for the purge.
#[tokio::test]
async fn a_session_registered_again_before_its_purge_lists_none_of_the_old_assets() {
    let app = TestApp::spawn().await;
    let (old_member, new_member) = (Uuid::new_v4(), Uuid::new_v4());
    register(&app, 51, "first", &[old_member]).await;
    let old = app.upload_ok(&app.user_token(old_member), 51, "private.txt", b"the old registration's").await;
    let old = text(&old, "asset_uuid");
    assert_eq!(app.delete(&app.service_token(), "/api/sessions/51").await.status(), 202);
    register(&app, 51, "second", &[new_member]).await;
    let newcomer = app.user_token(new_member);
    let listing: Value = app.get(&newcomer, "/api/sessions/51/assets").await.json().await.unwrap();
    assert_eq!(listing["assets"], json!([]), "the old registration's assets are not the new one's: {listing}");
    assert_error(app.get(&newcomer, &format!("/api/assets/infos?asset_uuid={old}")).await, 403, "forbidden").await;
    assert_error(app.get(&newcomer, &format!("/api/assets?asset_uuid={old}")).await, 403, "forbidden").await;
}

/// A worker (its own process) killed with SIGKILL while it writes an archive's zip: the
/// lease runs out, another worker runs attempt 2, and there is exactly one archive, whole.
#[tokio::test]
async fn an_archive_job_killed_midway_is_retried_into_exactly_one_archive() {
    // This process relays and serves; the workers are separate processes.
    let jobs = Jobs::start_with(quick_jobs(""), TestOptions::default(), false, None).await;
    let app = &jobs.app;
    let owner = Uuid::new_v4();
    register(app, 80, "large", &[owner]).await;
    let token = app.user_token(owner);
    // Bytes that do not compress: deflating them keeps the worker busy a few seconds.
    let len = 192usize << 20;
    let bytes = pseudo_random_bytes(80, len);
    let expected = sha256_hex(&bytes);
    let uploaded = app.upload(&token, &json!({"id_session": 80, "asset_name": "raw"}), "raw.bin", bytes).await;
    assert_eq!(uploaded.status(), 200, "{:?}", uploaded.text().await);
    let config = &jobs.config;
    let spawn_worker = || {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_assetd"))
            .arg("worker")
            .env("ASSETD_DATABASE_URL", &config.database.database_url)
            .env("ASSETD_DATA_DIR", &config.data_dir)
            .env("ASSETD_JWT_SECRET", &config.jwt_secret)
            .env("ASSETD_URL_SIGNING_KEY", &config.url_signing_key)
            .env("ASSETD_AMQP_URL", &config.amqp_url)
            .env("ASSETD_AMQP_PREFIX", &config.amqp_prefix)
            .env("ASSETD_JOB_LEASE_SECONDS", "2")
            .env("ASSETD_JOB_RETRY_BASE_MS", "200")
            .env("ASSETD_LOG", "warn")
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };
    let mut first = spawn_worker();
    let accepted = request_archive(app, &token, &json!({"id_session": 80})).await;
    let (uuid, job) = (text(&accepted, "archive_uuid"), text(&accepted, "job_uuid"));
    // Killed once it is writing the zip: its temporary file has grown past 1 MiB.
    let deadline = Instant::now() + Duration::from_secs(120);
    while largest_file(&app.tmp_dir()) <= 1 << 20 {
        let state = jobs.job(&job).await;
        assert_ne!(state["status"], "succeeded", "built before the worker could be killed: make the asset larger");
        assert!(Instant::now() < deadline, "the archive job never started writing: {state}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.start_kill().unwrap(); // SIGKILL
    first.wait().await.unwrap();
    let stream = format!("archive-{uuid}");
    let completed = format!("SELECT count(*) FROM events WHERE stream = '{stream}' AND type = 'ArchiveCompleted'");
    assert_eq!(app.scalar(&completed).await, 0, "the kill came after the archive was completed, not mid-build");
    assert_eq!(archive_infos(app, &token, &uuid).await["archive_status"], "in_progress");

    let _second = spawn_worker();
    let done = jobs.until(&job, "succeeded", 300).await;
    assert!(done["attempts"].as_i64().unwrap() >= 2, "{done}");
    assert_eq!(done["result"]["entries"], 1, "{done}");
    assert_eq!(app.scalar(&completed).await, 1, "exactly one ArchiveCompleted");
    let started = format!("SELECT count(*) FROM events WHERE stream = '{stream}' AND type = 'ArchiveStarted'");
    assert!(app.scalar(&started).await >= 2, "{:?}", app.events_of(&stream).await);
    let infos = archive_until(app, &token, &uuid, &["completed"], 1).await;
    assert_eq!(infos["archive_entries"], 1, "{infos}");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("archive.zip");
    let download = download_archive(app, &token, &uuid).await;
    assert_eq!(download.status(), 200);
    assert_eq!(download_to_file(download, &path).await, text(&infos, "archive_sha256"));
    let digests = tokio::task::spawn_blocking(move || zip_digests(&path)).await.unwrap();
    assert_eq!(digests, [("80_large/raw.bin".to_owned(), len as u64, expected)], "the zip opens, its entry whole");
    assert_eq!(
        TestApp::files_under(&app.data_dir.path().join("blobs")),
        2,
        "the asset's blob and the archive's: one archive"
    );
    // The killed attempt's temporary file is an orphan (no process holds it): swept.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        app.ctx.app.blobs.remove_orphan_temp_files().await.unwrap();
        if TestApp::files_under(&app.tmp_dir()) == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the killed attempt's temporary file stays");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    jobs.stop().await;
}

/// Assets of a list deleted after the archive was asked for: one deleted before the
/// build started is left out and named in `archive_skipped_assets`; one deleted while
/// the zip is being written is either left out (the attempt fails as retryable and the
/// next one plans without it) or whole: never a truncated entry.
#[tokio::test]
async fn assets_deleted_while_an_archive_is_built_are_left_out_or_the_attempt_retries() {
    // No workers until the test starts them.
    let jobs = Jobs::start_with(quick_jobs(""), TestOptions::default(), false, None).await;
    let app = &jobs.app;
    let owner = Uuid::new_v4();
    register(app, 90, "list", &[owner]).await;
    let token = app.user_token(owner);
    let contents = [b"first".to_vec(), b"second".to_vec(), b"third".to_vec()];
    let mut uuids = Vec::new();
    for (n, bytes) in contents.iter().enumerate() {
        uuids.push(text(&app.upload_ok(&token, 90, &format!("f{n}.txt"), bytes).await, "asset_uuid"));
    }
    let accepted = request_archive(app, &token, &json!({"asset_uuids": uuids})).await;
    let uuid = text(&accepted, "archive_uuid");
    // Not built yet: its infos say so, its download is refused.
    let pending = archive_infos(app, &token, &uuid).await;
    assert_eq!(pending["archive_status"], "pending", "{pending}");
    for field in ["archive_file_size", "archive_sha256", "archive_entries", "archive_completed_at", "id_session"] {
        assert_eq!(pending[field], Value::Null, "{field}: {pending}");
    }
    assert_refused(download_archive(app, &token, &uuid).await, 409, "archive_not_ready", "a pending archive").await;
    assert_eq!(app.delete(&token, &format!("/api/assets?uuid={}", uuids[1])).await.status(), 200);

    let workers = start_workers(&jobs);
    let infos = archive_until(app, &token, &uuid, &["completed"], WAIT).await;
    assert_eq!(infos["archive_skipped_assets"], json!([uuids[1]]), "{infos}");
    assert_eq!(infos["archive_entries"], 2, "{infos}");
    let mut entries = zip_entries(&download_completed(app, &token, &infos).await);
    entries.sort();
    let [first, _, third] = contents;
    assert_eq!(entries, [("90_list/f0.txt".to_owned(), first), ("90_list/f2.txt".to_owned(), third)]);
    let job = jobs.until(&text(&accepted, "job_uuid"), "succeeded", WAIT).await;
    assert_eq!(job["result"]["entries"], 2, "{job}");

    // Deleted while the zip is being written.
    let big = pseudo_random_bytes(91, 64 << 20);
    let big_sha = sha256_hex(&big);
    let response = app.upload(&token, &json!({"id_session": 90, "asset_name": "big"}), "big.bin", big).await;
    assert_eq!(response.status(), 200);
    let big_uuid = text(&response.json::<Value>().await.unwrap(), "asset_uuid");
    let small = text(&app.upload_ok(&token, 90, "small.txt", b"small").await, "asset_uuid");
    let accepted = request_archive(app, &token, &json!({"asset_uuids": [big_uuid, small]})).await;
    let uuid = text(&accepted, "archive_uuid");
    archive_until(app, &token, &uuid, &["in_progress", "completed"], WAIT).await;
    assert_eq!(app.delete(&token, &format!("/api/assets?uuid={big_uuid}")).await.status(), 200);
    let infos = archive_until(app, &token, &uuid, &["completed"], WAIT).await;
    let digests: Vec<(String, String)> = zip_entries(&download_completed(app, &token, &infos).await)
        .into_iter()
        .map(|(name, content)| (name, sha256_hex(&content)))
        .collect();
    let small_entry = ("90_list/small.txt".to_owned(), sha256_hex(b"small"));
    if infos["archive_skipped_assets"] == json!([big_uuid]) {
        assert_eq!(infos["archive_entries"], 1, "{infos}");
        assert_eq!(digests, [small_entry], "left out");
    } else {
        assert_eq!(infos["archive_skipped_assets"], json!([]), "{infos}");
        assert_eq!(infos["archive_entries"], 2, "{infos}");
        assert_eq!(digests, [("90_list/big.bin".to_owned(), big_sha), small_entry], "whole, in the list's order");
    }
    workers.finish(Duration::from_secs(10)).await;
    jobs.stop().await;
}

/// `archive.request` over AMQP (as `import.request`): the reply names the archive and its
/// job; `archive.completed` is published on the events exchange with what a consumer
/// needs to download it; the same message again is answered as a duplicate.
#[tokio::test]
async fn the_amqp_archive_request_queues_an_archive() {
    let jobs = Jobs::start(quick_jobs("")).await;
    let app = &jobs.app;
    let member = Uuid::new_v4();
    register(app, 70, "amqp", &[member]).await;
    app.upload_ok(&app.user_token(member), 70, "report.txt", b"sent over AMQP").await;

    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let exclusive = QueueDeclareOptions { exclusive: true, ..Default::default() };
    let no_ack = BasicConsumeOptions { no_ack: true, ..Default::default() };
    let reply_queue = channel.queue_declare("".into(), exclusive, FieldTable::default()).await.unwrap();
    let mut replies = channel
        .basic_consume(reply_queue.name().clone(), "replies".into(), no_ack, FieldTable::default())
        .await
        .unwrap();
    // Bound before the request: the event cannot come first.
    let events_exchange = assetd::jobs::topology::events_exchange(&jobs.config.amqp_prefix);
    channel
        .exchange_declare(
            events_exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions { durable: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let event_queue = channel.queue_declare("".into(), exclusive, FieldTable::default()).await.unwrap();
    channel
        .queue_bind(
            event_queue.name().clone(),
            events_exchange.as_str().into(),
            "archive.completed".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut events = channel
        .basic_consume(event_queue.name().clone(), "events".into(), no_ack, FieldTable::default())
        .await
        .unwrap();
    // The consumer declares the commands exchange: wait for it (and for the workers).
    let deadline = Instant::now() + Duration::from_secs(10);
    let up = assetd::app::ComponentState::Up;
    while app.ctx.app.messaging.commands() != up || app.ctx.app.messaging.workers() != up {
        assert!(Instant::now() < deadline, "the command consumer or the workers never came up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let send = |body: Value, message_id: &'static str| {
        let properties = BasicProperties::default()
            .with_message_id(message_id.into())
            .with_correlation_id(format!("corr-{message_id}").as_str().into())
            .with_reply_to(reply_queue.name().clone());
        let channel = &channel;
        let exchange = format!("{}.commands", jobs.config.amqp_prefix);
        async move {
            channel
                .basic_publish(
                    exchange.as_str().into(),
                    "archive.request".into(),
                    BasicPublishOptions::default(),
                    body.to_string().as_bytes(),
                    properties,
                )
                .await
                .unwrap()
                .await
                .unwrap();
        }
    };

    send(json!({"id_session": 70}), "archive-1").await;
    let delivery = next_delivery(&mut replies, "reply").await;
    assert_eq!(delivery.properties.correlation_id().as_ref().unwrap().as_str(), "corr-archive-1");
    let reply: Value = serde_json::from_slice(&delivery.data).unwrap();
    assert_conforms("schemas/commands/archive.request.reply.json", &reply);
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["result"]["archive_status"], "pending", "{reply}");
    let uuid = text(&reply["result"], "archive_uuid");
    let job = text(&reply["result"], "job_uuid");

    let message = loop {
        let delivery = next_delivery(&mut events, "archive.completed event").await;
        assert_eq!(delivery.routing_key.as_str(), "archive.completed");
        let message: Value = serde_json::from_slice(&delivery.data).unwrap();
        if message["data"]["archive_uuid"] == uuid {
            break message;
        }
    };
    assert_event_conforms(&message);
    assert_eq!(message["event_type"], "ArchiveCompleted", "{message}");
    let data = &message["data"];
    assert_eq!(data["download_path"], format!("archives?archive_uuid={uuid}"), "{message}");
    assert_eq!(data["entries"], 1, "{message}");
    assert_eq!(data["id_session"], 70, "{message}");
    let expires_at = chrono::DateTime::parse_from_rfc3339(&text(data, "expires_at")).unwrap().to_utc();
    assert!(expires_at > chrono::Utc::now() + chrono::Duration::days(6), "kept 7 days by default: {message}");
    let service = app.service_token();
    let infos = archive_until(app, &service, &uuid, &["completed"], WAIT).await;
    assert_eq!(infos["archive_sha256"], data["sha256"], "{message}");
    assert_eq!(infos["archive_file_size"], data["size"], "{message}");
    assert_eq!(jobs.until(&job, "succeeded", WAIT).await["kind"], "archive");
    let entries = zip_entries(&download_completed(app, &service, &infos).await);
    assert_eq!(entries, [("70_amqp/report.txt".to_owned(), b"sent over AMQP".to_vec())]);

    // Sent again (the same message id): the same archive, as it is now; no second one.
    send(json!({"id_session": 70}), "archive-1").await;
    let again: Value = serde_json::from_slice(&next_delivery(&mut replies, "reply").await.data).unwrap();
    assert_eq!(again["duplicate"], true, "{again}");
    assert_eq!(again["result"]["archive_uuid"], uuid, "{again}");
    assert_eq!(again["result"]["archive_status"], "completed", "{again}");
    // Requests that cannot be an archive are refused in the reply.
    for (body, message_id) in [
        (json!({"id_session": 70, "asset_uuids": [Uuid::new_v4()]}), "archive-2"),
        (json!({"id_session": 9_999}), "archive-3"),
    ] {
        send(body, message_id).await;
        let refused: Value = serde_json::from_slice(&next_delivery(&mut replies, "reply").await.data).unwrap();
        assert_eq!(refused["ok"], false, "{message_id}: {refused}");
    }
    assert_eq!(app.scalar("SELECT count(*) FROM events WHERE type = 'ArchiveRequested'").await, 1);
    let _ = connection.close(200, "done".into()).await;
    jobs.stop().await;
}

/// A 1 GiB archive (random bytes: deflated, the costly path) is built by a separate
/// `assetd serve` whose RSS, sampled every 100 ms over the whole build, stays under
/// 64 MiB; the zip's entry is the asset, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1_gib_archive_is_built_in_flat_memory() {
    const SIZE: u64 = 1 << 30;
    const CHUNK: usize = 1 << 20;
    let app = TestApp::spawn().await;
    let (_, token) = app.session_with_user(1).await;
    let data_dir = tempfile::tempdir().unwrap();
    let (mut command, addr) = crate::helpers::serve_command(&app, data_dir.path());
    command.env("ASSETD_WORKERS", "true").env("ASSETD_RELAY", "true").env("ASSETD_CLEANUP_INTERVAL", "0");
    let process = command.spawn().unwrap();
    crate::helpers::wait_until_serving(addr).await;
    let pid = process.id().expect("the process runs");
    let client = reqwest::Client::new();

    // The asset, generated and hashed as it streams.
    let (hash_tx, hash_rx) = tokio::sync::oneshot::channel();
    let mut hasher = Some((Sha256::new(), hash_tx));
    let chunks = (SIZE as usize) / CHUNK;
    let body = futures::stream::iter(0..chunks).map(move |i| {
        let chunk = pseudo_random_bytes(i as u64 + 7, CHUNK);
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
    let file = reqwest::multipart::Part::stream_with_length(reqwest::Body::wrap_stream(body), SIZE)
        .file_name("big.bin")
        .mime_str("application/octet-stream")
        .unwrap();
    let form = reqwest::multipart::Form::new()
        .part(
            "file_asset",
            reqwest::multipart::Part::text(json!({"id_session": 1, "asset_name": "big"}).to_string())
                .mime_str("application/json")
                .unwrap(),
        )
        .part("file", file);
    let uploaded =
        client.post(format!("http://{addr}/file/api/assets")).bearer_auth(&token).multipart(form).send().await.unwrap();
    assert_eq!(uploaded.status(), 200, "{:?}", uploaded.text().await);
    let sent_sha = hash_rx.await.unwrap();

    let idle = vm_rss_kib(pid).expect("the process's VmRSS");
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        tokio::spawn(async move {
            let (mut peak, mut samples) = (0u64, 0usize);
            while sampling.load(std::sync::atomic::Ordering::SeqCst) {
                if let Some(kib) = vm_rss_kib(pid) {
                    peak = peak.max(kib);
                    samples += 1;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (peak, samples)
        })
    };
    let accepted: Value = client
        .post(format!("http://{addr}/file/api/archives"))
        .bearer_auth(&token)
        .json(&json!({"id_session": 1}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let uuid = text(&accepted, "archive_uuid");
    let deadline = Instant::now() + Duration::from_secs(600);
    let infos = loop {
        let infos: Value = client
            .get(format!("http://{addr}/file/api/archives/infos?archive_uuid={uuid}"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        match infos["archive_status"].as_str() {
            Some("completed") => break infos,
            Some("pending" | "in_progress") => {}
            _ => panic!("the archive did not complete: {infos}"),
        }
        assert!(Instant::now() < deadline, "the archive is not built after 600 s: {infos}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    sampling.store(false, std::sync::atomic::Ordering::SeqCst);
    let (peak, samples) = sampler.await.unwrap();
    eprintln!("1 GiB archive: peak RSS {} MiB, idle {} MiB, {samples} samples", peak / 1024, idle / 1024);
    assert!(samples >= 10, "RSS was sampled during the build ({samples} samples)");
    assert!(peak < 64 * 1024, "peak RSS {} MiB (idle {} MiB): the archive must stream", peak / 1024, idle / 1024);

    let download = client
        .get(format!("http://{addr}/file/api/archives?archive_uuid={uuid}"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(download.status(), 200);
    let zip_path = data_dir.path().join("downloaded.zip");
    let zip_sha = download_to_file(download, &zip_path).await;
    assert_eq!(infos["archive_sha256"], zip_sha.as_str(), "{infos}");
    let digests = zip_digests(&zip_path);
    assert_eq!(digests, [("1_session 1/big.bin".to_owned(), SIZE, sent_sha)], "{infos}");
}

/// An archive of a list holds only what its owner still reaches when it is built: a
/// member removed from the session meanwhile gets the archive without that session's
/// assets (named as skipped). And another member of the session may neither read nor
/// cancel the archive's job: the archive, and its job, are the owner's.
#[tokio::test]
async fn an_archive_of_a_list_holds_only_what_its_owner_still_reaches() {
    let jobs = Jobs::start_with(quick_jobs(""), TestOptions::default(), false, None).await;
    let app = &jobs.app;
    let (owner, member) = (Uuid::new_v4(), Uuid::new_v4());
    register(app, 31, "kept", &[owner, member]).await;
    register(app, 32, "left", &[owner, member]).await;
    let owner_token = app.user_token(owner);
    let kept = app.upload_ok(&owner_token, 31, "kept.txt", b"still reachable").await;
    let left = app.upload_ok(&owner_token, 32, "left.txt", b"no longer the owner's to read").await;
    let body = json!({"asset_uuids": [kept["asset_uuid"], left["asset_uuid"], kept["asset_uuid"]]});
    let accepted = request_archive(app, &owner_token, &body).await;
    let (uuid, job) = (text(&accepted, "archive_uuid"), text(&accepted, "job_uuid"));

    let member_token = app.user_token(member);
    assert_error(app.get(&member_token, &format!("/api/jobs/{job}")).await, 403, "forbidden").await;
    assert_error(app.delete(&member_token, &format!("/api/jobs/{job}")).await, 403, "forbidden").await;
    // The owner leaves session 32 before the build.
    register(app, 32, "left", &[member]).await;

    let workers = start_workers(&jobs);
    let infos = archive_until(app, &owner_token, &uuid, &["completed"], WAIT).await;
    assert_eq!(infos["archive_entries"], 1, "{infos}");
    assert_eq!(infos["archive_skipped_assets"], json!([left["asset_uuid"]]), "{infos}");
    let entries = zip_entries(&download_completed(app, &owner_token, &infos).await);
    let names: Vec<&str> = entries.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["31_kept/kept.txt"]);
    workers.finish(Duration::from_secs(10)).await;
    jobs.stop().await;
}

/// A deleted session whose purge was cancelled (or failed for good) still loses its
/// assets: the cleanup queues its purge again.
#[tokio::test]
async fn the_cleanup_queues_again_the_purge_of_a_deleted_session() {
    let config = JobsConfig { cleanup_interval_seconds: 1, ..quick_jobs("") };
    let jobs = Jobs::start_with(config, TestOptions::default(), false, None).await;
    let app = &jobs.app;
    let (_, token) = app.session_with_user(33).await;
    let asset = app.upload_ok(&token, 33, "orphaned.txt", b"must go").await;
    let deleted = app.delete(&app.service_token(), "/api/sessions/33").await;
    assert_eq!(deleted.status(), 202);
    let purge = deleted.json::<Value>().await.unwrap()["job_uuid"].as_str().unwrap().to_owned();
    assert_eq!(app.delete(&app.service_token(), &format!("/api/jobs/{purge}")).await.status(), 200);

    let workers = start_workers(&jobs);
    let uuid = asset["asset_uuid"].as_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(WAIT);
    loop {
        let infos: Value =
            app.get(&app.service_token(), &format!("/api/assets/infos?asset_uuid={uuid}")).await.json().await.unwrap();
        if infos["asset_status"] == "deleted" {
            break;
        }
        assert!(Instant::now() < deadline, "the asset of the deleted session is still there: {infos}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Its success is recorded once its work is done: a moment after the asset is.
    let succeeded = "SELECT count(*) FROM jobs WHERE kind = 'purge_session' AND status = 'succeeded'";
    while app.scalar(succeeded).await < 1 {
        assert!(Instant::now() < deadline, "the purge queued again did not succeed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        app.scalar("SELECT count(*) FROM jobs WHERE kind = 'purge_session'").await,
        2,
        "one cancelled, one queued again"
    );
    workers.finish(Duration::from_secs(10)).await;
    jobs.stop().await;
}

/// One member cannot fill the queue ahead of everyone: at most 5 archives of one owner
/// pending or in progress; the 6th is refused (429) until one is built. Services are
/// not limited.
#[tokio::test]
async fn an_owner_has_at_most_five_archives_being_built() {
    let jobs = Jobs::start_with(quick_jobs(""), TestOptions::default(), false, None).await;
    let app = &jobs.app;
    let owner = Uuid::new_v4();
    register(app, 34, "busy", &[owner]).await;
    let token = app.user_token(owner);
    app.upload_ok(&token, 34, "a.txt", b"a").await;
    for _ in 0..5 {
        request_archive(app, &token, &json!({"id_session": 34})).await;
    }
    let refused = app.post_json(&token, "/api/archives", &json!({"id_session": 34})).await;
    let body = assert_error(refused, 429, "too_many_archives").await;
    assert!(body["error"]["message"].as_str().unwrap().contains("at most 5"), "{body}");
    assert_eq!(app.scalar("SELECT count(*) FROM archives").await, 5, "the refused request left nothing");
    request_archive(app, &app.service_token(), &json!({"id_session": 34})).await;

    let workers = start_workers(&jobs);
    let deadline = Instant::now() + Duration::from_secs(WAIT);
    while app.scalar("SELECT count(*) FROM archives WHERE status = 'completed'").await < 6 {
        assert!(Instant::now() < deadline, "the six archives are not all built");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    request_archive(app, &token, &json!({"id_session": 34})).await;
    workers.finish(Duration::from_secs(10)).await;
    jobs.stop().await;
}

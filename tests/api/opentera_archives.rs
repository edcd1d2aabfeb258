//! OpenTera mode's archives, as FTS has them (`QueryArchiveFile*.py`) and OpenTera runs
//! them: TeraServer records an archive, `AssetsArchiveWorker` marks it in progress and
//! uploads the zip, the owner downloads it; each change published on Redis as OpenTera's
//! protobuf `ArchiveEvent`. Also: archives expired by the cleanup, TeraServer's asset
//! deletions followed, and `/doc` at the root. Each test runs its own app, Redis and
//! TeraServer double (`crate::opentera`).

use std::time::Duration;

use assetd::app::cleanup::CleanupPolicy;
use assetd::app::CommandContext;
use assetd::config::JobsConfig;
use assetd::domain::principal::{Principal, PrincipalKind};
use assetd::opentera::events::{
    Any, ArchiveEvent, DatabaseEvent, DatabaseEventType, Header, TeraEvent, ASSET_EVENTS_CHANNEL,
};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use prost::Message;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{pseudo_random_bytes, TestOptions};
use crate::opentera::{session_json, start_opentera_app, start_opentera_app_with, Answer, OtApp, RedisServer};

/// The channel assetd publishes archive events on (the record's service key).
const EVENTS_CHANNEL: &str = "service.FileTransferService.events";

// ---------------------------------------------------------------------------------------
// Requests.

impl OtApp {
    /// `POST /api/archives/infos` with this JSON body.
    async fn archive_post_infos(&self, token: &str, body: &Value) -> Answer {
        let request = self
            .client
            .post(self.url("/api/archives/infos"))
            .header("Authorization", format!("OpenTera {token}"))
            .json(body);
        Answer::of(request.send().await.unwrap()).await
    }

    /// Creates an archive for `owner` as the service (id 0), asserting the 200.
    async fn create_archive(&self, owner: Uuid, filename: &str) -> Value {
        let service = self.keys.service(self.service_uuid);
        let body = json!({"archive": {"id_archive_file_data": 0, "archive_original_filename": filename,
                                      "archive_owner_uuid": owner}});
        let created = self.archive_post_infos(&service, &body).await;
        assert_eq!(created.status, 200, "creating an archive: {}", created.text());
        created.json()
    }

    /// Sets an archive's status as `AssetsArchiveWorker` does (the whole record, with
    /// `archive_status`).
    async fn set_archive_status(&self, token: &str, archive: &Value, status: i64) -> Answer {
        let mut info = archive.clone();
        info["archive_status"] = json!(status);
        self.archive_post_infos(token, &json!({ "archive": info })).await
    }

    /// `POST /api/archives`: multipart `archive` (text) and `file` (bytes, named
    /// `filename`; no filename parameter when None), either left out when None.
    async fn archive_upload(&self, token: &str, archive: Option<&str>, file: Option<FilePart<'_>>) -> Answer {
        let mut form = reqwest::multipart::Form::new().text("other", "ignored");
        if let Some(archive) = archive {
            form = form.text("archive", archive.to_owned());
        }
        if let Some((filename, bytes)) = file {
            let mut part = reqwest::multipart::Part::bytes(bytes.to_vec());
            if let Some(filename) = filename {
                part = part.file_name(filename.to_owned());
            }
            form = form.part("file", part);
        }
        let request = self
            .client
            .post(self.url("/api/archives"))
            .header("Authorization", format!("OpenTera {token}"))
            .multipart(form);
        Answer::of(request.send().await.unwrap()).await
    }

    /// Uploads `bytes` as archive `id`'s zip, named `filename`.
    async fn upload_zip(&self, token: &str, id: i64, filename: &str, bytes: &[u8]) -> Answer {
        let info = json!({"id_archive_file_data": id}).to_string();
        self.archive_upload(token, Some(&info), Some((Some(filename), bytes))).await
    }

    async fn archive_infos(&self, token: &str, uuid: &str) -> Answer {
        self.get(token, &format!("/api/archives/infos?archive_uuid={uuid}")).await
    }

    async fn archive_download(&self, token: &str, uuid: &str) -> Answer {
        self.get(token, &format!("/api/archives?archive_uuid={uuid}")).await
    }

    async fn archive_delete(&self, token: &str, uuid: &str) -> Answer {
        let request = self
            .client
            .delete(self.url(&format!("/api/archives?uuid={uuid}")))
            .header("Authorization", format!("OpenTera {token}"));
        Answer::of(request.send().await.unwrap()).await
    }

    /// Where the local backend keeps an archive's bytes (as its row records them).
    async fn archive_path(&self, uuid: &str) -> std::path::PathBuf {
        let client = self.ctx.app.pool.get().await.unwrap();
        let uuid: Uuid = uuid.parse().unwrap();
        let sql = "SELECT blob_backend, blob_key FROM archives WHERE archive_uuid = $1";
        let row = client.query_one(sql, &[&uuid]).await.unwrap();
        let (backend, key): (Option<String>, Option<String>) = (row.get(0), row.get(1));
        assert_eq!(backend.as_deref(), Some("local"), "the archive's bytes are recorded");
        let path = self.ctx.app.blobs.local().path_of(&key.expect("a blob key")).unwrap();
        assert!(path.starts_with(self.data_dir.path().join("blobs")), "{path:?} is in the data dir's blobs");
        path
    }

    async fn archive_row_status(&self, uuid: &str) -> String {
        let client = self.ctx.app.pool.get().await.unwrap();
        let uuid: Uuid = uuid.parse().unwrap();
        client.query_one("SELECT status FROM archives WHERE archive_uuid = $1", &[&uuid]).await.unwrap().get(0)
    }
}

/// A multipart `file` part: its filename (none: no filename parameter), its bytes.
type FilePart<'a> = (Option<&'a str>, &'a [u8]);

/// Asserts FTS's answer: `status`, the JSON string `message`.
fn assert_fts(answer: &Answer, status: u16, message: &str, what: &str) {
    assert_eq!((answer.status, answer.json()), (status, json!(message)), "{what}");
}

fn datetime(value: &Value) -> DateTime<Utc> {
    serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("not a datetime ({e}): {value}"))
}

fn text(value: &Value, field: &str) -> String {
    value[field].as_str().unwrap_or_else(|| panic!("no string {field} in {value}")).to_owned()
}

// ---------------------------------------------------------------------------------------
// Redis: archive events received, asset events sent.

/// The messages published on one channel of the test's Redis, from the subscription on.
struct Subscription {
    messages: tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    task: tokio::task::JoinHandle<()>,
}

impl Subscription {
    async fn start(redis: &RedisServer, channel: &str) -> Self {
        let client = redis::Client::open(redis.url()).unwrap();
        let mut pubsub = client.get_async_pubsub().await.unwrap();
        // Answers once Redis confirmed the subscription.
        pubsub.subscribe(channel).await.unwrap();
        let (sender, messages) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut stream = pubsub.into_on_message();
            while let Some(message) = stream.next().await {
                let channel = message.get_channel_name().to_owned();
                if sender.send((channel, message.get_payload_bytes().to_vec())).is_err() {
                    break;
                }
            }
        });
        Self { messages, task }
    }

    /// The next archive event (5 s at most), its envelope checked as OpenTera's.
    async fn next_archive_event(&mut self, what: &str) -> ArchiveEvent {
        let received = tokio::time::timeout(Duration::from_secs(5), self.messages.recv()).await;
        let (channel, bytes) =
            received.unwrap_or_else(|_| panic!("{what}: no archive event within 5 s")).expect("the subscription runs");
        assert_eq!(channel, EVENTS_CHANNEL, "{what}");
        let event = TeraEvent::decode(&bytes[..]).unwrap_or_else(|e| panic!("{what}: not a TeraEvent ({e})"));
        let header = event.header.as_ref().unwrap_or_else(|| panic!("{what}: no header"));
        assert_eq!(header.version, 1, "{what}: header version");
        assert_eq!(header.topic, EVENTS_CHANNEL, "{what}: header topic");
        let age = Utc::now().timestamp_micros() as f64 / 1e6 - header.time;
        assert!((0.0..30.0).contains(&age), "{what}: header time {} is now (age {age} s)", header.time);
        assert_eq!(event.events.len(), 1, "{what}: one event in the TeraEvent");
        assert_eq!(event.events[0].type_url, "type.googleapis.com/opentera.protobuf.ArchiveEvent", "{what}");
        ArchiveEvent::decode(&event.events[0].value[..]).unwrap_or_else(|e| panic!("{what}: not an ArchiveEvent ({e})"))
    }

    /// Asserts nothing more is published within `wait`.
    async fn assert_quiet(&mut self, wait: Duration, what: &str) {
        if let Ok(Some((_, bytes))) = tokio::time::timeout(wait, self.messages.recv()).await {
            panic!("{what}: unexpected message {:?}", TeraEvent::decode(&bytes[..]));
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A `TeraEvent` as TeraServer's DatabaseModule publishes one: a `DatabaseEvent` on
/// `object_type`, whose JSON names `asset_uuid`.
fn database_event(kind: DatabaseEventType, object_type: &str, asset_uuid: &str) -> Vec<u8> {
    let change = DatabaseEvent {
        r#type: kind as i32,
        object_type: object_type.into(),
        object_value: json!({"asset_uuid": asset_uuid, "id_asset": 12, "asset_name": "Recording"}).to_string(),
    };
    TeraEvent {
        header: Some(Header { version: 1, time: Utc::now().timestamp() as f64, topic: ASSET_EVENTS_CHANNEL.into() }),
        events: vec![Any {
            type_url: "type.googleapis.com/opentera.protobuf.DatabaseEvent".into(),
            value: change.encode_to_vec(),
        }],
    }
    .encode_to_vec()
}

/// Publishes on `channel`; returns how many subscribers received it.
async fn publish(redis: &RedisServer, channel: &str, bytes: &[u8]) -> i64 {
    redis::cmd("PUBLISH").arg(channel).arg(bytes).query_async(&mut redis.connection().await).await.unwrap()
}

// ---------------------------------------------------------------------------------------
// The tests.

#[tokio::test]
async fn an_archive_goes_from_creation_to_deletion_as_opentera_runs_it() {
    let app = start_opentera_app().await;
    let (owner, stranger) = (Uuid::new_v4(), Uuid::new_v4());
    let owner_token = app.keys.user(owner, 5, false);
    let stranger_token = app.keys.user(stranger, 6, false);
    let service = app.keys.service(app.service_uuid);

    // TeraServer (a service) records the archive: pending, with FTS's fields.
    let before = Utc::now();
    let created = app.create_archive(owner, "a.zip").await;
    let after = Utc::now();
    let id = created["id_archive_file_data"].as_i64().unwrap_or_else(|| panic!("an integer id: {created}"));
    assert!(id > 0, "{created}");
    let uuid = text(&created, "archive_uuid");
    assert!(Uuid::try_parse(&uuid).is_ok(), "{created}");
    assert_eq!(created["archive_status"], 0, "{created}");
    assert_eq!(created["archive_original_filename"], "a.zip", "{created}");
    assert_eq!(created["archive_owner_uuid"], owner.to_string(), "{created}");
    for field in ["archive_file_size", "archive_upload_datetime", "archive_uploader_uuid"] {
        assert!(created[field].is_null(), "{field} is null until uploaded: {created}");
    }
    let creation = datetime(&created["archive_creation_datetime"]);
    assert!(before - chrono::Duration::seconds(1) <= creation && creation <= after, "{created}");
    let expiration = datetime(&created["archive_expiration_datetime"]);
    assert_eq!(expiration - creation, chrono::Duration::days(7), "FTS: 7 days after creation: {created}");

    // The owner sees it; a pending archive does not download.
    let infos = app.archive_infos(&owner_token, &uuid).await;
    assert_eq!((infos.status, &infos.json()["archive_status"]), (200, &json!(0)), "{}", infos.text());
    assert_fts(&app.archive_download(&owner_token, &uuid).await, 404, "No archive found", "a pending archive");

    // The worker marks it in progress (its whole record, with the status).
    let started = app.set_archive_status(&service, &created, 1).await;
    assert_eq!(started.status, 200, "{}", started.text());
    let started = started.json();
    assert_eq!((started["archive_status"].clone(), text(&started, "archive_uuid")), (json!(1), uuid.clone()));
    assert_eq!(started["id_archive_file_data"], id);

    // Refused uploads leave nothing behind.
    let zip = pseudo_random_bytes(71, 300_000);
    let wrong_name = app.upload_zip(&service, id, "b.zip", &zip).await;
    assert_fts(&wrong_name, 400, "Filename does not match the archive information", "another filename");
    let unknown = app.upload_zip(&service, id + 1_000_000, "a.zip", &zip).await;
    assert_fts(&unknown, 404, "No archive found", "an unknown id");
    app.assert_disk(0, "refused archive uploads").await;

    // The worker (a service) uploads the zip: completed.
    let uploaded = app.upload_zip(&service, id, "a.zip", &zip).await;
    assert_eq!(uploaded.status, 200, "{}", uploaded.text());
    let uploaded = uploaded.json();
    assert_eq!(uploaded["archive_status"], 2, "{uploaded}");
    assert_eq!(uploaded["archive_uuid"], uuid.as_str(), "{uploaded}");
    assert_eq!(uploaded["id_archive_file_data"], id, "{uploaded}");
    assert_eq!(uploaded["archive_file_size"], zip.len() as i64, "{uploaded}");
    assert_eq!(uploaded["archive_uploader_uuid"], app.service_uuid.to_string(), "{uploaded}");
    assert_eq!(uploaded["archive_owner_uuid"], owner.to_string(), "{uploaded}");
    let upload_time = datetime(&uploaded["archive_upload_datetime"]);
    assert!(upload_time >= creation && upload_time <= Utc::now(), "{uploaded}");
    assert_eq!(datetime(&uploaded["archive_expiration_datetime"]), expiration, "still 7 days after creation");
    app.assert_disk(1, "the uploaded zip").await;
    let path = app.archive_path(&uuid).await;
    assert_eq!(std::fs::read(&path).unwrap(), zip, "the zip is stored under the archive's uuid");

    // The owner downloads the exact bytes, and ranges of them.
    let download = app.archive_download(&owner_token, &uuid).await;
    assert_eq!(download.status, 200, "{}", download.text());
    assert!(download.bytes == zip, "the downloaded bytes are the uploaded ones");
    let ranged = app
        .client
        .get(app.url(&format!("/api/archives?archive_uuid={uuid}")))
        .header("Authorization", format!("OpenTera {owner_token}"))
        .header("Range", "bytes=1000-1999")
        .send()
        .await
        .unwrap();
    let ranged = Answer::of(ranged).await;
    assert_eq!(ranged.status, 206, "{}", ranged.text());
    assert!(ranged.bytes == zip[1000..2000], "the range's bytes");
    let content_range = ranged.headers.get("content-range").and_then(|v| v.to_str().ok());
    assert_eq!(content_range, Some(format!("bytes 1000-1999/{}", zip.len()).as_str()));
    let infos = app.archive_infos(&owner_token, &uuid).await;
    assert_eq!(infos.status, 200, "{}", infos.text());
    assert_eq!(infos.json(), uploaded, "the infos are the upload's answer");

    // Someone else: neither infos nor download. A service: infos, but no download (FTS:
    // the owner only).
    let other = app.archive_infos(&stranger_token, &uuid).await;
    assert_fts(&other, 403, "Access denied for that archive", "another user's infos");
    let other = app.archive_download(&stranger_token, &uuid).await;
    assert_fts(&other, 403, "Access denied to the requested archive", "another user's download");
    let other = app.archive_delete(&stranger_token, &uuid).await;
    assert_fts(&other, 403, "Access denied to the requested archive", "another user's delete");
    let by_service = app.archive_infos(&service, &uuid).await;
    assert_eq!((by_service.status, by_service.json()), (200, uploaded.clone()), "a service's infos");
    let by_service = app.archive_download(&service, &uuid).await;
    assert_fts(&by_service, 403, "Access denied to the requested archive", "a service's download");

    // Uploaded once only; the bytes stay the first ones.
    let again = app.upload_zip(&service, id, "a.zip", b"another zip").await;
    assert_fts(&again, 404, "Archive has already been uploaded.", "a second upload");
    app.assert_disk(1, "a refused second upload").await;
    assert!(app.archive_download(&owner_token, &uuid).await.bytes == zip, "the first zip stays");

    // The owner deletes it: gone, bytes too.
    let deleted = app.archive_delete(&owner_token, &uuid).await;
    assert_fts(&deleted, 200, "Archive deleted", "the owner's delete");
    assert!(!path.exists(), "the deleted archive's bytes are gone");
    app.assert_disk(0, "a deleted archive").await;
    assert_fts(&app.archive_infos(&owner_token, &uuid).await, 404, "No archive found", "infos once deleted");
    assert_fts(&app.archive_download(&owner_token, &uuid).await, 404, "No archive found", "download once deleted");
    assert_fts(&app.archive_delete(&owner_token, &uuid).await, 404, "No archive found", "deleting it again");
    let upload_deleted = app.upload_zip(&service, id, "a.zip", &zip).await;
    assert_fts(&upload_deleted, 404, "No archive found", "an upload once deleted");
    app.assert_disk(0, "an upload to a deleted archive").await;
}

/// FTS's checks, in its order; and assetd's own rule: only services create, change or
/// upload archives.
#[tokio::test]
async fn archive_requests_are_refused_as_fts_refuses_them() {
    let app = start_opentera_app().await;
    let owner = Uuid::new_v4();
    let owner_token = app.keys.user(owner, 5, false);
    let service = app.keys.service(app.service_uuid);
    let created = app.create_archive(owner, "r.zip").await;
    let id = created["id_archive_file_data"].as_i64().unwrap();
    let zip = pseudo_random_bytes(72, 5_000);

    // POST /api/archives/infos: each missing field in FTS's order.
    let post = |body: Value| {
        let app = &app;
        let service = service.clone();
        async move { app.archive_post_infos(&service, &body).await }
    };
    let owner_text = owner.to_string();
    let cases = [
        (json!({}), 400, "Badly formatted request"),
        (json!({"archive": {"archive_original_filename": "r.zip"}}), 400, "Badly formatted request"),
        (json!({"archive": {"id_archive_file_data": 0}}), 400, "Missing original filename"),
        (
            json!({"archive": {"id_archive_file_data": 0, "archive_owner_uuid": owner_text}}),
            400,
            "Missing original filename",
        ),
        (
            json!({"archive": {"id_archive_file_data": 0, "archive_original_filename": "r.zip"}}),
            400,
            "Missing owner UUID",
        ),
        // An existing id without a status; an unknown id is looked up first.
        (
            json!({"archive": {"id_archive_file_data": id, "archive_original_filename": "r.zip",
                            "archive_owner_uuid": owner_text}}),
            400,
            "Missing archive status",
        ),
        (
            json!({"archive": {"id_archive_file_data": id + 1_000_000, "archive_original_filename": "r.zip",
                            "archive_owner_uuid": owner_text}}),
            404,
            "No archive found",
        ),
        (
            json!({"archive": {"id_archive_file_data": 0, "archive_original_filename": "r.zip",
                            "archive_owner_uuid": "not-a-uuid"}}),
            400,
            "Error parsing archive information",
        ),
    ];
    for (body, status, message) in cases {
        let answer = post(body.clone()).await;
        assert_fts(&answer, status, message, &format!("POST /api/archives/infos {body}"));
    }
    assert_eq!(app.scalar("SELECT count(*) FROM archives").await, 1, "no archive made by a refused request");

    // GET and DELETE without their argument: flask-restx's 400.
    for (path, argument) in [("/api/archives/infos", "archive_uuid"), ("/api/archives", "archive_uuid")] {
        let answer = app.get(&owner_token, path).await;
        assert_eq!(answer.status, 400, "GET {path}: {}", answer.text());
        assert_eq!(answer.json()["message"], "Input payload validation failed", "GET {path}");
        assert!(answer.json()["errors"][argument].is_string(), "GET {path}: {}", answer.text());
    }
    let request =
        app.client.delete(app.url("/api/archives")).header("Authorization", format!("OpenTera {owner_token}"));
    let answer = Answer::of(request.send().await.unwrap()).await;
    assert_eq!(answer.status, 400, "DELETE without uuid: {}", answer.text());
    assert!(answer.json()["errors"]["uuid"].is_string(), "{}", answer.text());

    // POST /api/archives: each missing part in FTS's order.
    let info = json!({"id_archive_file_data": id}).to_string();
    let not_multipart = app
        .client
        .post(app.url("/api/archives"))
        .header("Authorization", format!("OpenTera {service}"))
        .json(&json!({"archive": {"id_archive_file_data": id}}));
    let not_multipart = Answer::of(not_multipart.send().await.unwrap()).await;
    assert_fts(&not_multipart, 400, "Wrong content type", "a JSON body");
    let file = Some((Some("r.zip"), &zip[..]));
    let cases: [(Option<&str>, Option<FilePart>, &str); 6] = [
        (None, None, "Missing archive information"),
        (None, file, "Missing archive information"),
        (Some(&info), None, "Missing uploaded file"),
        (Some(r#"{"archive_original_filename": "r.zip"}"#), file, "Missing archive ID"),
        // Before the name is compared.
        (Some(r#"{"archive_original_filename": "r.zip"}"#), Some((Some("other.zip"), &zip[..])), "Missing archive ID"),
        (Some(r#"{"id_archive_file_data": 99999999}"#), Some((Some("other.zip"), &zip[..])), "No archive found"),
    ];
    for (archive, file, message) in cases {
        let answer = app.archive_upload(&service, archive, file).await;
        let status = if message == "No archive found" { 404 } else { 400 };
        assert_fts(&answer, status, message, &format!("upload with archive {archive:?}, file {:?}", file.map(|f| f.0)));
    }
    // A file part without a filename, or with an empty one: 400 (FTS's messages differ:
    // werkzeug takes a part without a filename for a form field, "Missing uploaded file";
    // an empty one is "Missing filename").
    for filename in [None, Some("")] {
        let answer = app.archive_upload(&service, Some(&info), Some((filename, &zip[..]))).await;
        assert_eq!(answer.status, 400, "file part named {filename:?}: {}", answer.text());
        assert!(answer.json().is_string(), "FTS's body, a JSON string: {}", answer.text());
    }
    let not_json = app.archive_upload(&service, Some("{not json"), file).await;
    assert_eq!(not_json.status, 400, "{}", not_json.text());
    let message = not_json.json();
    assert!(
        message.as_str().is_some_and(|m| m.starts_with("Error parsing archive information : ")),
        "archive not JSON: {message}"
    );
    app.assert_disk(0, "refused archive uploads").await;

    // assetd's rule: a user, participant or device does not create, change or upload
    // archives (FTS lets any token).
    let device = app.keys.device(Uuid::new_v4(), 3);
    let participant = app.keys.participant_static(Uuid::new_v4(), 4);
    let create = json!({"archive": {"id_archive_file_data": 0, "archive_original_filename": "x.zip",
                                    "archive_owner_uuid": owner}});
    let mut change = created.clone();
    change["archive_status"] = json!(1);
    for (token, who) in [(&owner_token, "the owner"), (&device, "a device"), (&participant, "a static participant")] {
        let refused = app.archive_post_infos(token, &create).await;
        assert_eq!(refused.status, 403, "{who} creating: {}", refused.text());
        let refused = app.archive_post_infos(token, &json!({ "archive": change })).await;
        assert_eq!(refused.status, 403, "{who} changing the status: {}", refused.text());
        let refused = app.upload_zip(token, id, "r.zip", &zip).await;
        assert_eq!(refused.status, 403, "{who} uploading: {}", refused.text());
    }
    assert_eq!(app.scalar("SELECT count(*) FROM archives").await, 1, "no archive made by a refused request");
    let infos = app.archive_infos(&owner_token, &text(&created, "archive_uuid")).await;
    assert_eq!(infos.json()["archive_status"], 0, "the archive is still pending: {}", infos.text());
    app.assert_disk(0, "refused archive uploads").await;
    // No token at all: FTS's 403.
    let anonymous =
        Answer::of(app.client.post(app.url("/api/archives/infos")).json(&create).send().await.unwrap()).await;
    anonymous.assert_forbidden("creating without a token");
}

#[tokio::test]
async fn each_archive_change_is_published_as_openteras_archive_event() {
    let app = start_opentera_app().await;
    let mut events = Subscription::start(&app.redis, EVENTS_CHANNEL).await;
    let owner = Uuid::new_v4();
    let owner_token = app.keys.user(owner, 5, false);
    let service = app.keys.service(app.service_uuid);

    let created = app.create_archive(owner, "e.zip").await;
    let uuid = text(&created, "archive_uuid");
    let id = created["id_archive_file_data"].as_i64().unwrap();
    let url = format!("/file/api/archives?archive_uuid={uuid} ");
    let expected = |status: i32| ArchiveEvent {
        archive_uuid: uuid.clone(),
        owner_uuid: owner.to_string(),
        status,
        archive_url: url.clone(),
    };
    assert_eq!(events.next_archive_event("created").await, expected(0));

    // A refused change publishes nothing.
    let refused = app.set_archive_status(&owner_token, &created, 1).await;
    assert_eq!(refused.status, 403, "{}", refused.text());
    assert_eq!(app.set_archive_status(&service, &created, 1).await.status, 200);
    assert_eq!(events.next_archive_event("in progress").await, expected(1));

    let wrong = app.upload_zip(&service, id, "not-e.zip", b"zip").await;
    assert_eq!(wrong.status, 400, "{}", wrong.text());
    let uploaded = app.upload_zip(&service, id, "e.zip", b"the zip").await;
    assert_eq!(uploaded.status, 200, "{}", uploaded.text());
    assert_eq!(events.next_archive_event("completed").await, expected(2));

    let stranger = app.archive_delete(&app.keys.user(Uuid::new_v4(), 6, false), &uuid).await;
    assert_eq!(stranger.status, 403, "{}", stranger.text());
    let deleted = app.archive_delete(&owner_token, &uuid).await;
    assert_eq!(deleted.status, 200, "{}", deleted.text());
    assert_eq!(events.next_archive_event("deleted").await, expected(4));
    events.assert_quiet(Duration::from_millis(500), "after the delete").await;
}

#[tokio::test]
async fn the_cleanup_expires_uploaded_archives_past_their_time() {
    let jobs = JobsConfig { archive_ttl_seconds: 1, ..Default::default() };
    let app = start_opentera_app_with(TestOptions { jobs: Some(jobs), ..Default::default() }).await;
    let owner = Uuid::new_v4();
    let owner_token = app.keys.user(owner, 5, false);
    let service = app.keys.service(app.service_uuid);

    let kept_pending = app.create_archive(owner, "pending.zip").await;
    let created = app.create_archive(owner, "x.zip").await;
    let uuid = text(&created, "archive_uuid");
    let creation = datetime(&created["archive_creation_datetime"]);
    assert_eq!(datetime(&created["archive_expiration_datetime"]) - creation, chrono::Duration::seconds(1));
    let zip = pseudo_random_bytes(73, 50_000);
    let uploaded = app.upload_zip(&service, created["id_archive_file_data"].as_i64().unwrap(), "x.zip", &zip).await;
    assert_eq!(uploaded.status, 200, "{}", uploaded.text());
    let uploaded = uploaded.json();
    assert_eq!(datetime(&uploaded["archive_expiration_datetime"]) - creation, chrono::Duration::seconds(1));
    let path = app.archive_path(&uuid).await;
    assert!(path.exists());

    // Past its time: FTS no longer has it, even before the cleanup ran.
    let wait = (creation + chrono::Duration::milliseconds(1200) - Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(wait).await;
    assert_fts(&app.archive_infos(&owner_token, &uuid).await, 404, "No archive found", "infos past its time");
    assert_fts(&app.archive_download(&owner_token, &uuid).await, 404, "No archive found", "download past its time");

    // The cleanup (what the cleanup job runs) expires it and removes its bytes.
    let system = Principal { kind: PrincipalKind::Service, uuid: Uuid::nil(), name: "test".into(), superadmin: false };
    let ctx = CommandContext::for_request(&system, &format!("cleanup-{}", Uuid::new_v4()));
    let stop = tokio_util::sync::CancellationToken::new();
    let result = app.ctx.app.cleanup(&ctx, &CleanupPolicy::default(), &stop).await.expect("the cleanup succeeds");
    assert_eq!(result.archives_expired, 1, "{result:?}");
    assert!(!path.exists(), "the expired archive's bytes are gone");
    app.assert_disk(0, "an expired archive").await;
    assert_eq!(app.archive_row_status(&uuid).await, "expired");
    assert_fts(&app.archive_infos(&owner_token, &uuid).await, 404, "No archive found", "infos once expired");
    assert_fts(&app.archive_download(&owner_token, &uuid).await, 404, "No archive found", "download once expired");
    let again = app.upload_zip(&service, created["id_archive_file_data"].as_i64().unwrap(), "x.zip", &zip).await;
    assert_eq!(again.status, 404, "an upload to an expired archive: {}", again.text());
    app.assert_disk(0, "an upload to an expired archive").await;

    // An archive never uploaded is not expired (README: they stay pending).
    let pending = app.archive_infos(&owner_token, &text(&kept_pending, "archive_uuid")).await;
    assert_eq!((pending.status, &pending.json()["archive_status"]), (200, &json!(0)), "{}", pending.text());
    let again = app.ctx.app.cleanup(&ctx, &CleanupPolicy::default(), &stop).await.expect("the cleanup succeeds");
    assert_eq!(again.archives_expired, 0, "expired once: {again:?}");
}

#[tokio::test]
async fn a_cancelled_archive_shows_status_3_and_takes_no_upload() {
    let app = start_opentera_app().await;
    let mut events = Subscription::start(&app.redis, EVENTS_CHANNEL).await;
    let owner = Uuid::new_v4();
    let owner_token = app.keys.user(owner, 5, false);
    let service = app.keys.service(app.service_uuid);

    let created = app.create_archive(owner, "c.zip").await;
    let uuid = text(&created, "archive_uuid");
    let id = created["id_archive_file_data"].as_i64().unwrap();
    assert_eq!(events.next_archive_event("created").await.status, 0);
    assert_eq!(app.set_archive_status(&service, &created, 1).await.status, 200);
    assert_eq!(events.next_archive_event("in progress").await.status, 1);

    // Statuses one cannot set: refused, nothing published (the next event is the next
    // change's).
    for status in [0, 2, 7] {
        let refused = app.set_archive_status(&service, &created, status).await;
        assert_eq!(refused.status, 400, "archive_status {status}: {}", refused.text());
    }
    let again = app.set_archive_status(&service, &created, 1).await;
    assert_eq!(again.status, 200, "in progress again: {}", again.text());
    assert_eq!(events.next_archive_event("in progress again").await.status, 1);

    let cancelled = app.set_archive_status(&service, &created, 3).await;
    assert_eq!(cancelled.status, 200, "{}", cancelled.text());
    assert_eq!(cancelled.json()["archive_status"], 3, "{}", cancelled.text());
    assert_eq!(events.next_archive_event("cancelled").await.status, 3);
    let infos = app.archive_infos(&owner_token, &uuid).await;
    assert_eq!((infos.status, &infos.json()["archive_status"]), (200, &json!(3)), "{}", infos.text());
    assert_fts(&app.archive_download(&owner_token, &uuid).await, 404, "No archive found", "a cancelled archive");

    // Its upload is refused, and nothing is kept.
    let late = app.upload_zip(&service, id, "c.zip", &pseudo_random_bytes(74, 80_000)).await;
    assert!((400..500).contains(&late.status), "an upload to a cancelled archive: {} {}", late.status, late.text());
    app.assert_disk(0, "an upload to a cancelled archive").await;
    let infos = app.archive_infos(&owner_token, &uuid).await;
    assert_eq!(infos.json()["archive_status"], 3, "still cancelled: {}", infos.text());
    assert!(infos.json()["archive_file_size"].is_null(), "{}", infos.text());
    events.assert_quiet(Duration::from_millis(300), "a refused upload").await;

    // Status 4 deletes it.
    let deleted = app.set_archive_status(&service, &created, 4).await;
    assert_eq!(deleted.status, 200, "{}", deleted.text());
    assert_eq!(deleted.json()["archive_status"], 4, "{}", deleted.text());
    assert_eq!(events.next_archive_event("deleted").await.status, 4);
    assert_fts(&app.archive_infos(&owner_token, &uuid).await, 404, "No archive found", "infos once deleted");
}

/// FTS removes a deleted (or expired) archive's record: asked to change its status, it
/// answers 404 "No archive found", as assetd's GET infos and upload do.
#[tokio::test]
async fn status_changes_of_a_deleted_archive_are_404() {
    let app = start_opentera_app().await;
    let owner = Uuid::new_v4();
    let service = app.keys.service(app.service_uuid);
    let created = app.create_archive(owner, "d.zip").await;
    let id = created["id_archive_file_data"].as_i64().unwrap();
    assert_eq!(app.upload_zip(&service, id, "d.zip", b"zip").await.status, 200);
    let deleted = app.archive_delete(&app.keys.user(owner, 5, false), &text(&created, "archive_uuid")).await;
    assert_eq!(deleted.status, 200, "{}", deleted.text());

    let mut events = Subscription::start(&app.redis, EVENTS_CHANNEL).await;
    for status in [1, 3] {
        let answer = app.set_archive_status(&service, &created, status).await;
        assert_fts(&answer, 404, "No archive found", &format!("archive_status {status} once deleted"));
    }
    events.assert_quiet(Duration::from_millis(300), "status changes of a deleted archive").await;
}

#[tokio::test]
async fn assets_teraserver_deletes_are_deleted_here_too() {
    let app = start_opentera_app().await;
    let user = Uuid::new_v4();
    let token = app.keys.user(user, 3, false);
    app.tera.set_session(session_json(120, &[user], &[], &[]));
    let kept = app.upload_ok(&token, 120, b"kept").await;
    let gone = app.upload_ok(&token, 120, b"deleted in TeraServer").await;
    let (kept_uuid, kept_access) = (text(&kept, "asset_uuid"), text(&kept, "access_token"));
    let (gone_uuid, gone_access) = (text(&gone, "asset_uuid"), text(&gone, "access_token"));
    app.assert_disk(2, "two uploads").await;

    // build_context subscribed assetd to TeraServer's asset events.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, subscribers): (String, i64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(ASSET_EVENTS_CHANNEL)
            .query_async(&mut app.redis.connection().await)
            .await
            .unwrap();
        if subscribers >= 1 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "assetd does not follow {ASSET_EVENTS_CHANNEL}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // What is not an asset's deletion is left alone (sent first: handled first).
    for message in [
        database_event(DatabaseEventType::DbUpdate, "asset", &kept_uuid),
        database_event(DatabaseEventType::DbCreate, "asset", &kept_uuid),
        database_event(DatabaseEventType::DbDelete, "session", &kept_uuid),
        b"not protobuf".to_vec(),
    ] {
        assert!(publish(&app.redis, ASSET_EVENTS_CHANNEL, &message).await >= 1, "assetd receives it");
    }
    let deleted = database_event(DatabaseEventType::DbDelete, "asset", &gone_uuid);
    assert!(publish(&app.redis, ASSET_EVENTS_CHANNEL, &deleted).await >= 1);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        let infos = app.infos(&token, &gone_uuid, &gone_access).await;
        if infos.status == 404 {
            break;
        }
        assert_eq!(infos.status, 200, "{}", infos.text());
        assert!(tokio::time::Instant::now() < deadline, "the asset TeraServer deleted is still here after 3 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(app.download(&token, &gone_uuid, &gone_access).await.status, 404);
    app.assert_disk(1, "the deleted asset's bytes are removed").await;
    assert_eq!(app.tera.calls("delete_asset"), 0, "TeraServer is not asked to delete what it deleted");

    let download = app.download(&token, &kept_uuid, &kept_access).await;
    assert_eq!((download.status, download.bytes.as_slice()), (200, &b"kept"[..]), "the other asset stays");
    let admin = app.keys.user(Uuid::new_v4(), 1, true);
    let history = app.get(&admin, &format!("/api/assets/{gone_uuid}/events")).await;
    assert_eq!(history.status, 200, "{}", history.text());
    let history = history.json();
    let deletion = history
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["event_type"] == "AssetDeleted")
        .unwrap_or_else(|| panic!("no AssetDeleted event: {history}"));
    crate::helpers::assert_event_conforms(deletion);
    assert!(deletion.to_string().contains(&app.service_uuid.to_string()), "deleted as the service: {deletion}");

    // The same deletion again (TeraServer publishes each once, but Redis may repeat
    // nothing): harmless.
    assert!(publish(&app.redis, ASSET_EVENTS_CHANNEL, &deleted).await >= 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let kept_infos = app.infos(&token, &kept_uuid, &kept_access).await;
    assert_eq!(kept_infos.status, 200, "{}", kept_infos.text());
}

#[tokio::test]
async fn the_doc_is_served_at_the_root_under_the_proxys_prefix() {
    let app = start_opentera_app().await;
    let get = |path: &str, script_name: Option<&str>| {
        let mut request = app.client.get(app.url(path));
        if let Some(prefix) = script_name {
            request = request.header("X-Script-Name", prefix);
        }
        async move { Answer::of(request.send().await.unwrap()).await }
    };

    let redirect = get("/doc", None).await;
    assert_eq!(redirect.status, 302, "{}", redirect.text());
    assert_eq!(redirect.headers.get("location").and_then(|v| v.to_str().ok()), Some("doc/"), "a relative redirect");

    let server = |answer: &Answer| answer.json()["servers"][0]["url"].clone();
    let proxied = get("/doc/openapi.json", Some("/file")).await;
    assert_eq!(proxied.status, 200, "{}", proxied.text());
    assert_eq!(server(&proxied), "/file");
    assert!(proxied.json()["paths"]["/api/assets"].is_object(), "the document's paths are relative to its server");
    assert_eq!(server(&get("/doc/openapi.json", Some("/file/")).await), "/file", "a trailing slash is dropped");
    assert_eq!(server(&get("/doc/openapi.json", None).await), "", "no prefix: the root");
    for unsafe_prefix in ["file", "/file\"><script>", "https://elsewhere.example"] {
        assert_eq!(server(&get("/doc/openapi.json", Some(unsafe_prefix)).await), "", "{unsafe_prefix} is ignored");
    }

    let page = get("/doc/", None).await;
    assert_eq!(page.status, 200, "{}", page.text());
    let content_type = page.headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
    assert!(content_type.starts_with("text/html"), "{content_type}");
    assert!(page.text().to_lowercase().contains("swagger"), "{}", page.text());
    let initializer = get("/doc/swagger-initializer.js", None).await;
    assert_eq!(initializer.status, 200, "{}", initializer.text());
    assert!(
        initializer.text().contains("\"openapi.json\""),
        "the page loads the document relatively: {}",
        initializer.text()
    );
}

//! OpenTera mode over real HTTP: assetd in place of OpenTera's FileTransferService (FTS),
//! with a private `redis-server` holding OpenTera's keys and service record, and a
//! TeraServer double (warp) that the tests steer and count the calls of
//! (../shared/OPENTERA.md).

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use assetd::cli::build_context;
use assetd::http::{self, Context};
use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{json, Value};
use uuid::Uuid;
use warp::Filter;

use crate::helpers::{serve_config, TestApp, TestDatabase, TestOptions};

/// The six keys' names, as TeraServer writes them to Redis.
const KEY_NAMES: [&str; 6] = [
    "UserTokenAPIKey",
    "ParticipantTokenAPIKey",
    "ParticipantStaticTokenAPIKey",
    "DeviceTokenAPIKey",
    "DeviceStaticTokenAPIKey",
    "ServiceTokenAPIKey",
];
const RECORD_KEY: &str = "service.FileTransferService";
/// The record's `id_service`.
const ID_SERVICE: i64 = 3;
/// `id_creator_user` of every session of the double: no test caller has this id.
const CREATOR_ID: i64 = 999;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// HS256 with a raw key, as OpenTera signs every token.
pub fn sign(key: &str, claims: &Value) -> String {
    encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(key.as_bytes())).unwrap()
}

/// The claims of `token` if `key` verifies it (`exp` required, as on every token the
/// double is sent).
fn verified(token: &str, key: &str) -> Option<Value> {
    decode::<Value>(token, &DecodingKey::from_secret(key.as_bytes()), &Validation::new(Algorithm::HS256))
        .ok()
        .map(|data| data.claims)
}

// ---------------------------------------------------------------------------------------
// A private Redis.

/// `redis-server` on a free port, without persistence, killed on drop.
pub struct RedisServer {
    child: std::process::Child,
    pub port: u16,
}

impl RedisServer {
    pub async fn start() -> Self {
        for _ in 0..5 {
            let port = free_port();
            let mut child = std::process::Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server is installed");
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break; // exited: the port was taken meanwhile
                }
                if Self::ping(port).await {
                    return Self { child, port };
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("redis-server did not start");
    }

    async fn ping(port: u16) -> bool {
        let attempt = async {
            let client = redis::Client::open(format!("redis://127.0.0.1:{port}/0")).ok()?;
            let mut connection = client.get_multiplexed_async_connection().await.ok()?;
            redis::cmd("PING").query_async::<String>(&mut connection).await.ok()
        };
        matches!(tokio::time::timeout(Duration::from_secs(1), attempt).await, Ok(Some(_)))
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url()).unwrap().get_multiplexed_async_connection().await.unwrap()
    }

    /// Runs one command, e.g. `redis.run(&["SADD", "user_disabled_tokens", token])`.
    pub async fn run(&self, args: &[&str]) {
        let mut command = redis::cmd(args[0]);
        for arg in &args[1..] {
            command.arg(*arg);
        }
        command.query_async::<redis::Value>(&mut self.connection().await).await.unwrap();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// OpenTera's keys and tokens.

/// The keys TeraServer keeps in Redis (devices: one key for dynamic and static tokens).
#[derive(Clone, Debug)]
pub struct OtKeys {
    pub user: String,
    pub participant: String,
    pub participant_static: String,
    pub device: String,
    pub service: String,
}

impl OtKeys {
    pub fn random() -> Self {
        let key = |kind: &str| format!("{kind}-{}", Uuid::new_v4().simple());
        Self {
            user: key("user"),
            participant: key("participant"),
            participant_static: key("participant-static"),
            device: key("device"),
            service: key("service"),
        }
    }

    /// Writes the six keys, as TeraServer does at its start.
    pub async fn write(&self, redis: &RedisServer) {
        let values =
            [&self.user, &self.participant, &self.participant_static, &self.device, &self.device, &self.service];
        let mut args = vec!["MSET"];
        for (name, value) in KEY_NAMES.iter().zip(values) {
            args.push(name);
            args.push(value);
        }
        redis.run(&args).await;
    }

    pub fn user(&self, uuid: Uuid, id: i64, superadmin: bool) -> String {
        sign(
            &self.user,
            &json!({"user_uuid": uuid, "id_user": id, "user_fullname": "Test User", "user_superadmin": superadmin,
                    "service_access": {}, "exp": now() + 3600}),
        )
    }

    pub fn participant(&self, uuid: Uuid, id: i64) -> String {
        sign(&self.participant, &json!({"participant_uuid": uuid, "id_participant": id, "exp": now() + 3600}))
    }

    pub fn participant_static(&self, uuid: Uuid, id: i64) -> String {
        sign(&self.participant_static, &json!({"participant_uuid": uuid, "id_participant": id}))
    }

    pub fn device(&self, uuid: Uuid, id: i64) -> String {
        sign(&self.device, &json!({"device_uuid": uuid, "id_device": id}))
    }

    pub fn service(&self, uuid: Uuid) -> String {
        sign(&self.service, &json!({"service_uuid": uuid, "exp": now() + 3600}))
    }

    /// An asset access token as TeraServer mints them (`asset_uuids` may be a list or
    /// one string).
    pub fn access(&self, asset_uuids: Value, requester: Uuid, lifetime: i64) -> String {
        sign(&self.service, &json!({"asset_uuids": asset_uuids, "requester_uuid": requester, "exp": now() + lifetime}))
    }
}

// ---------------------------------------------------------------------------------------
// The TeraServer double.

/// What the double holds and has seen; tests steer it through [`TeraDouble::state`].
#[derive(Default)]
pub struct DoubleState {
    /// id_session → the session as TeraServer shows it (unknown ids: 403).
    pub sessions: HashMap<i64, Value>,
    /// user_uuid → the user's projects (`GET /api/user/projects`).
    pub projects: HashMap<String, Value>,
    /// Calls received, per route: `sessions`, `create_asset`, `delete_asset`, `projects`;
    /// and `unauthorized`: calls refused for their token.
    pub calls: HashMap<&'static str, usize>,
    /// Answer asset creations with this status.
    pub create_status: Option<u16>,
    /// Answer asset deletions with this status.
    pub delete_status: Option<u16>,
    /// Give created assets this uuid (rather than a fresh one).
    pub forced_asset_uuid: Option<Uuid>,
    /// The assets created, as answered.
    pub created: Vec<Value>,
    /// The uuids of the assets deleted.
    pub deleted: Vec<String>,
    next_id_asset: i64,
}

pub struct TeraDouble {
    pub port: u16,
    pub state: Arc<Mutex<DoubleState>>,
    stop: Mutex<Option<(tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>)>>,
}

type Shared = (Arc<Mutex<DoubleState>>, redis::aio::MultiplexedConnection);

impl TeraDouble {
    pub async fn start(redis: &RedisServer) -> Self {
        let state = Arc::new(Mutex::new(DoubleState { next_id_asset: 100, ..Default::default() }));
        let shared: Shared = (state.clone(), redis.connection().await);
        let routes = warp::any()
            .map(move || shared.clone())
            .and(warp::method())
            .and(warp::path::full())
            .and(warp::query::raw().or(warp::any().map(String::new)).unify())
            .and(warp::header::headers_cloned())
            .and(warp::body::bytes())
            .then(|shared: Shared, method: warp::http::Method, path: warp::path::FullPath, query, headers, body| {
                answer(shared, method, path.as_str().to_owned(), query, headers, body)
            });
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (addr, server) = warp::serve(routes).bind_with_graceful_shutdown(([127, 0, 0, 1], 0), async move {
            let _ = stop_rx.await;
        });
        let task = tokio::spawn(server);
        Self { port: addr.port(), state, stop: Mutex::new(Some((stop_tx, task))) }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn calls(&self, route: &str) -> usize {
        self.state.lock().unwrap().calls.get(route).copied().unwrap_or(0)
    }

    pub fn set_session(&self, session: Value) {
        let id = session["id_session"].as_i64().unwrap();
        self.state.lock().unwrap().sessions.insert(id, session);
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut DoubleState) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }

    /// Stops listening: TeraServer is unreachable from then on.
    pub async fn stop(&self) {
        let stop = self.stop.lock().unwrap().take();
        if let Some((signal, task)) = stop {
            let _ = signal.send(());
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), task).await.is_err() {
                abort.abort();
            }
        }
    }
}

fn reply(status: u16, body: Value) -> warp::reply::Response {
    use warp::Reply;
    let status = warp::http::StatusCode::from_u16(status).unwrap();
    warp::reply::with_status(warp::reply::json(&body), status).into_response()
}

async fn answer(
    (state, mut redis): Shared,
    method: warp::http::Method,
    path: String,
    query: String,
    headers: warp::http::HeaderMap,
    body: bytes::Bytes,
) -> warp::reply::Response {
    let route = match (method.as_str(), path.as_str()) {
        ("GET", "/api/service/sessions") => "sessions",
        ("POST", "/api/service/assets") => "create_asset",
        ("DELETE", "/api/service/assets") => "delete_asset",
        ("GET", "/api/user/projects") => "projects",
        _ => return reply(404, json!("Not Found")),
    };
    *state.lock().unwrap().calls.entry(route).or_default() += 1;
    // As TeraServer: the keys and record it holds (read from its Redis, so a renewal
    // made by a test is seen here too).
    let (service_key, user_key, record): (Option<String>, Option<String>, Option<String>) = redis::cmd("MGET")
        .arg("ServiceTokenAPIKey")
        .arg("UserTokenAPIKey")
        .arg(RECORD_KEY)
        .query_async(&mut redis)
        .await
        .unwrap();
    let service_uuid = record
        .and_then(|r| serde_json::from_str::<Value>(&r).ok())
        .and_then(|r| r["service_uuid"].as_str().map(str::to_owned));
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("OpenTera "))
        .map(str::to_owned)
        .unwrap_or_default();
    let authorized = match route {
        "projects" => user_key.is_some_and(|key| verified(&token, &key).is_some_and(|c| c["user_uuid"].is_string())),
        _ => service_key.is_some_and(|key| {
            verified(&token, &key).is_some_and(|c| {
                c["service_uuid"].as_str().is_some() && c["service_uuid"].as_str() == service_uuid.as_deref()
            })
        }),
    };
    if !authorized {
        *state.lock().unwrap().calls.entry("unauthorized").or_default() += 1;
        return reply(401, json!("Unauthorized"));
    }
    let args: HashMap<String, String> = serde_urlencoded::from_str(&query).unwrap_or_default();
    let mut state = state.lock().unwrap();
    match route {
        "sessions" => {
            let id = args.get("id_session").and_then(|id| id.parse::<i64>().ok());
            match id.and_then(|id| state.sessions.get(&id)) {
                Some(session) => reply(200, json!([session])),
                None => reply(403, json!("Forbidden")),
            }
        }
        "create_asset" => {
            if let Some(status) = state.create_status {
                return reply(status, json!("Refused by the TeraServer double"));
            }
            let asset = serde_json::from_slice::<Value>(&body).ok().and_then(|b| b.get("asset").cloned());
            let Some(Value::Object(mut asset)) = asset else { return reply(400, json!("Missing asset")) };
            if !asset.get("id_session").is_some_and(Value::is_i64) || !asset.contains_key("asset_name") {
                return reply(400, json!("Missing asset fields"));
            }
            state.next_id_asset += 1;
            let uuid = state.forced_asset_uuid.unwrap_or_else(Uuid::new_v4);
            asset.insert("id_asset".into(), json!(state.next_id_asset));
            asset.insert("asset_uuid".into(), json!(uuid.to_string()));
            let asset = Value::Object(asset);
            state.created.push(asset.clone());
            reply(200, json!([asset]))
        }
        "delete_asset" => {
            if let Some(status) = state.delete_status {
                return reply(status, json!("Forbidden"));
            }
            let Some(uuid) = args.get("uuid") else { return reply(400, json!("Missing uuid")) };
            state.deleted.push(uuid.clone());
            reply(200, json!(""))
        }
        _ => {
            let projects = args.get("user_uuid").and_then(|u| state.projects.get(u)).cloned();
            reply(200, projects.unwrap_or_else(|| json!([])))
        }
    }
}

/// A session as TeraServer shows it to a service.
pub fn session_json(id: i64, users: &[Uuid], participants: &[Uuid], devices: &[Uuid]) -> Value {
    json!({
        "id_session": id,
        "session_uuid": Uuid::new_v4(),
        "session_name": format!("Session {id}"),
        "id_session_type": 3,
        "id_creator_user": CREATOR_ID,
        "session_users": users.iter().map(|u| json!({"user_uuid": u, "id_user": 1})).collect::<Vec<_>>(),
        "session_participants": participants.iter()
            .map(|p| json!({"participant_uuid": p, "id_participant": 1, "id_project": 1}))
            .collect::<Vec<_>>(),
        "session_devices": devices.iter().map(|d| json!({"device_uuid": d, "id_device": 1})).collect::<Vec<_>>(),
    })
}

// ---------------------------------------------------------------------------------------
// assetd in OpenTera mode.

pub struct OtApp {
    /// `http://127.0.0.1:<port>` (OpenTera mode serves at the root).
    pub base: String,
    pub client: reqwest::Client,
    pub ctx: Context,
    pub keys: OtKeys,
    pub service_uuid: Uuid,
    pub tera: TeraDouble,
    pub redis: RedisServer,
    pub data_dir: tempfile::TempDir,
    /// Dropped (with the database) when the test ends.
    pub _db: TestDatabase,
}

/// assetd in OpenTera mode on its own database, data directory, Redis and TeraServer
/// double, served over HTTP on a free port (no relay, commands or workers).
pub async fn start_opentera_app() -> OtApp {
    start_opentera_app_with(TestOptions::default()).await
}

/// [`start_opentera_app`] with these options (jobs settings: e.g. the archive TTL).
pub async fn start_opentera_app_with(options: TestOptions) -> OtApp {
    let redis = RedisServer::start().await;
    let keys = OtKeys::random();
    keys.write(&redis).await;
    let service_uuid = Uuid::new_v4();
    let record = json!({"service_uuid": service_uuid, "id_service": ID_SERVICE, "service_key": "FileTransferService",
                        "service_clientendpoint": "/file", "service_endpoint": "/", "service_port": 4042});
    redis.run(&["SET", RECORD_KEY, &record.to_string()]).await;
    let tera = TeraDouble::start(&redis).await;
    let db = TestDatabase::create().await;
    let data_dir = tempfile::tempdir().unwrap();
    let mut config = serve_config(&db.url, data_dir.path(), &options);
    config.base_path = None;
    config.opentera.opentera_redis = Some(redis.url());
    config.opentera.opentera_server = tera.url();
    config.opentera.opentera_verify_tls = false;
    config.opentera.opentera_service_key = "FileTransferService".into();
    config.opentera.opentera_session_cache_seconds = 2;
    let ctx = build_context(&config).await.expect("building the app in OpenTera mode");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(http::serve(ctx.clone(), listener, std::future::pending(), Duration::from_secs(5)));
    OtApp {
        base: format!("http://{addr}"),
        client: reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap(),
        ctx,
        keys,
        service_uuid,
        tera,
        redis,
        data_dir,
        _db: db,
    }
}

/// An answer's status, headers and body (JSON, or the text as a JSON string).
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub bytes: Vec<u8>,
}

impl Answer {
    pub async fn of(response: reqwest::Response) -> Self {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        Self { status, headers, bytes: response.bytes().await.unwrap().to_vec() }
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.bytes)
            .unwrap_or_else(|_| panic!("not JSON ({}): {}", self.status, String::from_utf8_lossy(&self.bytes)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
    /// Asserts FTS's authentication refusal: 403, the JSON string "Forbidden".
    pub fn assert_forbidden(&self, what: &str) {
        assert_eq!(self.status, 403, "{what}: {}", self.text());
        assert_eq!(self.json(), json!("Forbidden"), "{what}");
    }
    pub fn assert_cors(&self, what: &str) {
        for name in ["access-control-allow-origin", "access-control-allow-headers", "access-control-allow-methods"] {
            assert_eq!(self.headers.get(name).and_then(|v| v.to_str().ok()), Some("*"), "{what}: {name}");
        }
    }
}

impl OtApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A request with `Authorization: OpenTera <token>`.
    pub async fn get(&self, token: &str, path: &str) -> Answer {
        let request = self.client.get(self.url(path)).header("Authorization", format!("OpenTera {token}"));
        Answer::of(request.send().await.unwrap()).await
    }

    /// `GET /api/assets` without arguments: 400 once authenticated, 403 otherwise.
    pub async fn probe(&self, token: &str) -> u16 {
        self.get(token, "/api/assets").await.status
    }

    /// OpenTera's upload: multipart `file_asset` (JSON text) and `file`.
    pub async fn upload(&self, token: &str, file_asset: &Value, filename: &str, bytes: &[u8]) -> Answer {
        self.upload_with(token, file_asset, filename, bytes, &[]).await
    }

    pub async fn upload_with(
        &self,
        token: &str,
        file_asset: &Value,
        filename: &str,
        bytes: &[u8],
        headers: &[(&str, &str)],
    ) -> Answer {
        let form = reqwest::multipart::Form::new()
            .text("file_asset", file_asset.to_string())
            .part("file", reqwest::multipart::Part::bytes(bytes.to_vec()).file_name(filename.to_owned()));
        let mut request = self
            .client
            .post(self.url("/api/assets"))
            .header("Authorization", format!("OpenTera {token}"))
            .multipart(form);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        Answer::of(request.send().await.unwrap()).await
    }

    /// Uploads `bytes` to session `id_session`, asserting a 200; returns the answer.
    pub async fn upload_ok(&self, token: &str, id_session: i64, bytes: &[u8]) -> Value {
        let file_asset =
            json!({"id_session": id_session, "asset_name": "Recording", "asset_type": "application/octet-stream"});
        let answer = self.upload(token, &file_asset, "recording.bin", bytes).await;
        assert_eq!(answer.status, 200, "upload to session {id_session}: {}", answer.text());
        answer.json()
    }

    pub async fn download(&self, token: &str, asset_uuid: &str, access_token: &str) -> Answer {
        self.get(token, &format!("/api/assets?asset_uuid={asset_uuid}&access_token={access_token}")).await
    }

    pub async fn infos(&self, token: &str, asset_uuid: &str, access_token: &str) -> Answer {
        self.get(token, &format!("/api/assets/infos?asset_uuid={asset_uuid}&access_token={access_token}")).await
    }

    pub async fn scalar(&self, sql: &str) -> i64 {
        let client = self.ctx.app.pool.get().await.unwrap();
        client.query_one(sql, &[]).await.unwrap().get(0)
    }

    /// Files under `<data dir>/<dir>` (`blobs` or `tmp`).
    pub fn files_in(&self, dir: &str) -> Vec<std::path::PathBuf> {
        files_under(&self.data_dir.path().join(dir))
    }

    /// Waits (5 s at most) until the data dir holds `blobs` blobs and no temporary file.
    pub async fn assert_disk(&self, blobs: usize, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (stored, temporary) = (self.files_in("blobs"), self.files_in("tmp"));
            if stored.len() == blobs && temporary.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: blobs {stored:?} (expected {blobs}), temporary files {temporary:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                files.extend(files_under(&path));
            } else {
                files.push(path);
            }
        }
    }
    files
}

// ---------------------------------------------------------------------------------------
// The tests.

#[tokio::test]
async fn renewed_keys_are_used_at_once_and_old_ones_refused_after_a_second() {
    let app = start_opentera_app().await;
    let (user, participant, device) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let old = app.keys.clone();
    // Authenticated with the seeded keys: 400 (no arguments), not 403.
    assert_eq!(app.probe(&old.user(user, 1, false)).await, 400, "user token");
    assert_eq!(app.probe(&old.participant(participant, 1)).await, 400, "participant token");
    assert_eq!(app.probe(&old.device(device, 1)).await, 400, "device token");
    assert_eq!(app.probe(&old.service(app.service_uuid)).await, 400, "service token");

    // A token that fails makes assetd read the keys again (at most every 100 ms).
    tokio::time::sleep(Duration::from_millis(150)).await;
    let read_again = Instant::now();
    assert_eq!(app.probe("not-a-token").await, 403);
    // TeraServer restarts: new keys.
    let new = OtKeys::random();
    new.write(&app.redis).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(app.probe(&new.user(user, 1, false)).await, 400, "a token signed with the new user key passes at once");
    assert!(
        read_again.elapsed() < Duration::from_millis(1000),
        "too slow to tell a re-read on failure from the periodic one ({:?})",
        read_again.elapsed()
    );
    assert_eq!(app.probe(&new.participant(participant, 1)).await, 400, "new participant key");
    assert_eq!(app.probe(&new.device(device, 1)).await, 400, "new device key");
    assert_eq!(app.probe(&new.service(app.service_uuid)).await, 400, "new service key");

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let refused = app.get(&old.user(user, 1, false), "/api/assets").await;
    refused.assert_forbidden("a token signed with the old user key");
    assert_eq!(app.probe(&old.participant(participant, 1)).await, 403, "old participant key");
    assert_eq!(app.probe(&old.device(device, 1)).await, 403, "old device key");
    assert_eq!(app.probe(&old.service(app.service_uuid)).await, 403, "old service key");

    // assetd calls TeraServer with a token signed with the new service key (the double
    // refuses any other with 401, which would make the session forbidden).
    app.tera.set_session(session_json(1, &[user], &[], &[]));
    let uploaded = app.upload_ok(&new.user(user, 1, false), 1, b"after the renewal").await;
    assert_eq!(app.tera.calls("unauthorized"), 0);
    // And the access token it hands out is signed with the new key.
    let access = uploaded["access_token"].as_str().unwrap();
    assert!(verified(access, &new.service).is_some(), "access token signed with the new service key");
}

#[tokio::test]
async fn revoked_user_and_participant_tokens_are_refused() {
    let app = start_opentera_app().await;
    let (user, participant) = (Uuid::new_v4(), Uuid::new_v4());
    let revoked_user = app.keys.user(user, 1, false);
    let other_user = app.keys.user(user, 1, true);
    let revoked_participant = app.keys.participant(participant, 2);
    assert_eq!(app.probe(&revoked_user).await, 400);
    assert_eq!(app.probe(&revoked_participant).await, 400);

    app.redis.run(&["SADD", "user_disabled_tokens", &revoked_user]).await;
    app.get(&revoked_user, "/api/assets").await.assert_forbidden("a revoked user token");
    let by_argument =
        Answer::of(app.client.get(app.url(&format!("/api/assets?token={revoked_user}"))).send().await.unwrap()).await;
    by_argument.assert_forbidden("a revoked user token as ?token=");
    assert_eq!(app.probe(&other_user).await, 400, "another token of the same user still passes");
    assert_eq!(app.probe(&revoked_participant).await, 400, "the participant's token is not in the user set");

    app.redis.run(&["SADD", "participant_disabled_tokens", &revoked_participant]).await;
    app.get(&revoked_participant, "/api/assets").await.assert_forbidden("a revoked participant token");
    // Also on the POSTs, where static tokens would be allowed.
    app.tera.set_session(session_json(4, &[], &[participant], &[]));
    let upload = app.upload(&revoked_participant, &json!({"id_session": 4, "asset_name": "a"}), "a.bin", b"x").await;
    upload.assert_forbidden("an upload with a revoked participant token");
    assert_eq!(app.tera.calls("create_asset"), 0);
}

#[tokio::test]
async fn tokens_are_taken_from_the_header_the_token_argument_or_the_cookie() {
    let app = start_opentera_app().await;
    let token = app.keys.user(Uuid::new_v4(), 1, false);
    let send = |request: reqwest::RequestBuilder| async move { Answer::of(request.send().await.unwrap()).await };

    let header = send(app.client.get(app.url("/api/assets")).header("Authorization", format!("OpenTera {token}")));
    assert_eq!(header.await.status, 400, "Authorization: OpenTera <token>");
    let argument = send(app.client.get(app.url(&format!("/api/assets?token={token}"))));
    assert_eq!(argument.await.status, 400, "?token=");
    let cookie = send(app.client.get(app.url("/api/assets")).header("Cookie", format!("other=1; OpenTera={token}")));
    assert_eq!(cookie.await.status, 400, "cookie OpenTera");
    let bearer = send(
        app.client.get(app.url(&format!("/api/assets?token={token}"))).header("Authorization", "Bearer not-a-token"),
    );
    assert_eq!(bearer.await.status, 400, "Authorization: Bearer is ignored, ?token= is used");

    let empty =
        send(app.client.get(app.url(&format!("/api/assets?token={token}"))).header("Authorization", "OpenTera"));
    empty.await.assert_forbidden("Authorization: OpenTera without a token, even with a valid ?token=");
    let none = send(app.client.get(app.url("/api/assets")));
    none.await.assert_forbidden("no token at all");

    let service = app.keys.service(app.service_uuid);
    let service_argument = send(app.client.get(app.url(&format!("/api/assets?token={service}"))));
    service_argument.await.assert_forbidden("a service token as ?token=");
    let service_cookie = send(app.client.get(app.url("/api/assets")).header("Cookie", format!("OpenTera={service}")));
    service_cookie.await.assert_forbidden("a service token as the cookie");
    assert_eq!(app.probe(&service).await, 400, "a service token in the header");
}

#[tokio::test]
async fn static_participant_tokens_only_on_posts_and_device_tokens_everywhere() {
    let app = start_opentera_app().await;
    let (participant, device) = (Uuid::new_v4(), Uuid::new_v4());
    let static_token = app.keys.participant_static(participant, 12);
    app.get(&static_token, "/api/assets").await.assert_forbidden("a static participant token on GET /api/assets");
    let by_argument =
        Answer::of(app.client.get(app.url(&format!("/api/assets?token={static_token}"))).send().await.unwrap()).await;
    by_argument.assert_forbidden("a static participant token as ?token=");
    let infos = app.get(&static_token, "/api/assets/infos?asset_uuid=x&access_token=y").await;
    infos.assert_forbidden("a static participant token on GET /api/assets/infos");
    let delete = Answer::of(
        app.client
            .delete(app.url("/api/assets?uuid=x&access_token=y"))
            .header("Authorization", format!("OpenTera {static_token}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    delete.assert_forbidden("a static participant token on DELETE /api/assets");

    // Accepted on the upload, to a session listing the participant.
    app.tera.set_session(session_json(21, &[], &[participant], &[]));
    let uploaded = app.upload_ok(&static_token, 21, b"from a static token").await;
    let created = app.tera.with(|s| s.created.clone());
    assert_eq!(created.len(), 1);
    assert_eq!(created[0]["id_participant"], 12, "the creator is the caller: {}", created[0]);
    assert_eq!(uploaded["asset_uuid"], created[0]["asset_uuid"]);
    // And on POST /api/assets/infos.
    let access = uploaded["access_token"].as_str().unwrap();
    let listed = Answer::of(
        app.client
            .post(app.url("/api/assets/infos"))
            .header("Authorization", format!("OpenTera {static_token}"))
            .json(&json!({"assets": [{"asset_uuid": uploaded["asset_uuid"], "access_token": access}]}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(listed.status, 200, "POST /api/assets/infos with a static token: {}", listed.text());
    assert_eq!(listed.json().as_array().map(Vec::len), Some(1));

    // A device token (one key for dynamic and static device tokens) works on GET.
    let device_token = app.keys.device(device, 5);
    assert_eq!(app.probe(&device_token).await, 400, "a device token on GET /api/assets");
    app.tera.set_session(session_json(22, &[], &[], &[device]));
    let from_device = app.upload_ok(&device_token, 22, b"from a device").await;
    let asset = from_device["asset_uuid"].as_str().unwrap();
    let download = app.download(&device_token, asset, from_device["access_token"].as_str().unwrap()).await;
    assert_eq!(download.status, 200, "a device downloads: {}", download.text());
    assert_eq!(download.bytes, b"from a device");
}

#[tokio::test]
async fn every_authentication_failure_is_403_with_cors_and_options_answer_200() {
    let app = start_opentera_app().await;
    let bad = format!("OpenTera {}", sign("not-the-key", &json!({"user_uuid": Uuid::new_v4(), "id_user": 1})));
    let job = format!("/api/jobs/{}", Uuid::new_v4());
    let asset_events = format!("/api/assets/{}/events", Uuid::new_v4());
    for path in [job.as_str(), "/api/sessions/1", "/api/sessions/1/assets", asset_events.as_str(), "/api/assets"] {
        for authorization in [None, Some(bad.as_str()), Some("Bearer whatever"), Some("OpenTera")] {
            let mut request = app.client.get(app.url(path));
            if let Some(value) = authorization {
                request = request.header("Authorization", value);
            }
            let answer = Answer::of(request.send().await.unwrap()).await;
            let what = format!("GET {path} with {authorization:?}");
            assert_eq!(answer.status, 403, "{what}: {}", answer.text());
            answer.assert_cors(&what);
        }
    }
    // FTS's own routes answer its body.
    app.get("garbage", "/api/assets?asset_uuid=x&access_token=y").await.assert_forbidden("download");
    // A refused upload too (authentication comes before the body's checks).
    let upload = Answer::of(app.client.post(app.url("/api/assets")).body("not a form").send().await.unwrap()).await;
    upload.assert_forbidden("an upload without a token");
    upload.assert_cors("an upload without a token");

    for path in ["/api/assets", "/api/assets/infos", "/api/sessions/1"] {
        let options =
            Answer::of(app.client.request(reqwest::Method::OPTIONS, app.url(path)).send().await.unwrap()).await;
        assert_eq!(options.status, 200, "OPTIONS {path}: {}", options.text());
        options.assert_cors(&format!("OPTIONS {path}"));
    }
    // Successful answers carry CORS too.
    let ok = app.get(&app.keys.user(Uuid::new_v4(), 1, false), "/api/assets").await;
    assert_eq!(ok.status, 400);
    ok.assert_cors("a 400");
}

#[tokio::test]
async fn an_upload_makes_the_asset_in_teraserver_and_answers_as_fts() {
    let app = start_opentera_app().await;
    let user = Uuid::new_v4();
    let token = app.keys.user(user, 7, false);
    app.tera.set_session(session_json(31, &[user], &[], &[]));
    let bytes = crate::helpers::pseudo_random_bytes(31, 300_000);
    let file_asset = json!({"id_session": 31, "asset_name": "Heart rate", "asset_type": "application/octet-stream"});
    let headers = [("X_ExternalServer", "files.example.org"), ("X-ExternalPort", "40075")];
    let answer = app.upload_with(&token, &file_asset, "heart.bin", &bytes, &headers).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let body = answer.json();

    // What TeraServer was asked and answered.
    let created = app.tera.with(|s| s.created.clone());
    assert_eq!(created.len(), 1, "one asset created in TeraServer");
    let made = &created[0];
    assert_eq!(made["id_session"], 31);
    assert_eq!(made["asset_name"], "Heart rate");
    assert_eq!(made["asset_type"], "application/octet-stream");
    assert_eq!(made["id_user"], 7, "the creator is the caller");
    assert_eq!(made["asset_service_uuid"], app.service_uuid.to_string());
    assert_eq!(app.tera.calls("unauthorized"), 0, "assetd called TeraServer with a valid service token");

    // FTS's answer: TeraServer's asset, assetd's row, URLs and an access token.
    let asset_uuid = made["asset_uuid"].as_str().unwrap().to_owned();
    let id_asset = made["id_asset"].as_i64().unwrap();
    assert_eq!(body["asset_uuid"], asset_uuid.as_str(), "{body}");
    assert_eq!(body["id_asset"], id_asset, "{body}");
    assert!(body["id_asset_file_data"].is_i64(), "{body}");
    assert_eq!(body["asset_original_filename"], "heart.bin");
    assert_eq!(body["asset_file_size"], bytes.len() as i64);
    assert_eq!(body["asset_url"], "https://files.example.org:40075/file/api/assets");
    assert_eq!(body["asset_infos_url"], "https://files.example.org:40075/file/api/assets/infos");
    let access = body["access_token"].as_str().unwrap();
    let claims = verified(access, &app.keys.service).expect("the access token is signed with the service key");
    assert_eq!(claims["asset_uuids"], json!([asset_uuid]));
    assert_eq!(claims["requester_uuid"], user.to_string());
    let lifetime = claims["exp"].as_i64().unwrap() - now();
    assert!((1700..=1800).contains(&lifetime), "FTS's access tokens live 1,800 s: {lifetime}");

    // The bytes download with that token.
    let download = app.download(&token, &asset_uuid, access).await;
    assert_eq!(download.status, 200, "{}", download.text());
    assert!(download.bytes == bytes, "the downloaded bytes are the uploaded ones");
    let infos = app.infos(&token, &asset_uuid, access).await;
    assert_eq!(infos.status, 200, "{}", infos.text());
    assert_eq!(infos.json()["id_asset"], id_asset);

    // assetd's events record TeraServer's id_asset.
    let admin = app.keys.user(Uuid::new_v4(), 1, true);
    let events = app.get(&admin, &format!("/api/assets/{asset_uuid}/events")).await;
    assert_eq!(events.status, 200, "{}", events.text());
    let events = events.json();
    let uploaded = events
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["event_type"] == "AssetUploaded")
        .unwrap_or_else(|| panic!("no AssetUploaded event: {events}"));
    assert_eq!(uploaded["data"]["id_asset"], id_asset, "{uploaded}");
    assert_eq!(uploaded["data"]["asset_uuid"], asset_uuid.as_str(), "{uploaded}");
    assert_eq!(uploaded["data"]["id_session"], 31, "{uploaded}");
    assert_eq!(uploaded["data"]["asset_file_size"], bytes.len() as i64, "{uploaded}");
    assert_eq!(uploaded["data"]["asset_creator"], json!({"kind": "user", "uuid": user}), "{uploaded}");
    crate::helpers::assert_event_conforms(uploaded);
}

#[tokio::test]
async fn a_service_uploading_must_name_a_creator() {
    let app = start_opentera_app().await;
    let service = app.keys.service(app.service_uuid);
    app.tera.set_session(session_json(41, &[], &[], &[]));
    let unnamed = app.upload(&service, &json!({"id_session": 41, "asset_name": "a"}), "a.bin", b"x").await;
    assert_eq!(unnamed.status, 400, "{}", unnamed.text());
    assert_eq!(app.tera.calls("create_asset"), 0);
    let file_asset = json!({"id_session": 41, "asset_name": "a", "id_participant": 8});
    let named = app.upload(&service, &file_asset, "a.bin", b"x").await;
    assert_eq!(named.status, 200, "{}", named.text());
    let created = app.tera.with(|s| s.created.clone());
    assert_eq!(created[0]["id_participant"], 8, "{}", created[0]);
    assert_eq!(created[0]["id_service"], ID_SERVICE, "{}", created[0]);
}

#[tokio::test]
async fn sessions_teraserver_does_not_show_or_that_do_not_list_the_caller_are_refused() {
    let app = start_opentera_app().await;
    let (member, stranger, admin) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let stranger_token = app.keys.user(stranger, 50, false);

    // Not shown by TeraServer.
    let unknown = app.upload(&stranger_token, &json!({"id_session": 70, "asset_name": "a"}), "a.bin", b"x").await;
    assert_eq!(unknown.status, 403, "{}", unknown.text());
    assert_eq!(unknown.json(), json!("Session access is forbidden"));
    // Shown, but not listing the caller (nor made by them; not a project admin).
    app.tera.set_session(session_json(71, &[member], &[Uuid::new_v4()], &[]));
    let unlisted = app.upload(&stranger_token, &json!({"id_session": 71, "asset_name": "a"}), "a.bin", b"x").await;
    assert_eq!(unlisted.status, 403, "{}", unlisted.text());
    assert_eq!(unlisted.json(), json!("Session access is forbidden"));
    let participant = app.keys.participant(Uuid::new_v4(), 60);
    let unlisted = app.upload(&participant, &json!({"id_session": 71, "asset_name": "a"}), "a.bin", b"x").await;
    assert_eq!(unlisted.status, 403, "a participant not listed: {}", unlisted.text());
    assert_eq!(app.tera.calls("create_asset"), 0, "no asset created in TeraServer");
    assert_eq!(app.scalar("SELECT count(*) FROM assets").await, 0);
    app.assert_disk(0, "refused uploads").await;

    // The session's creator, and a project admin, pass.
    let creator = app.keys.user(Uuid::new_v4(), CREATOR_ID, false);
    app.upload_ok(&creator, 71, b"by the creator").await;
    app.tera.with(|s| s.projects.insert(admin.to_string(), json!([{"id_project": 1, "project_role": "admin"}])));
    app.upload_ok(&app.keys.user(admin, 51, false), 71, b"by a project admin").await;

    // Two uploads to one session within 2 s: TeraServer is asked once.
    app.tera.set_session(session_json(72, &[member], &[], &[]));
    let member_token = app.keys.user(member, 52, false);
    let before = app.tera.calls("sessions");
    app.upload_ok(&member_token, 72, b"first").await;
    app.upload_ok(&member_token, 72, b"second").await;
    assert_eq!(app.tera.calls("sessions") - before, 1, "the session is asked once for two uploads within 2 s");
    // Once 2 s have passed, TeraServer is asked again.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    app.upload_ok(&member_token, 72, b"third").await;
    assert_eq!(app.tera.calls("sessions") - before, 2, "asked again once 2 s have passed");
}

#[tokio::test]
async fn teraserver_unreachable_or_failing_leaves_nothing_recorded_or_stored() {
    let app = start_opentera_app().await;
    let user = Uuid::new_v4();
    let token = app.keys.user(user, 9, false);
    app.tera.set_session(session_json(80, &[user], &[], &[]));
    app.tera.set_session(session_json(81, &[user], &[], &[]));
    let bytes = crate::helpers::pseudo_random_bytes(80, 200_000);
    let nothing_recorded = |what: &'static str| {
        let app = &app;
        async move {
            assert_eq!(app.scalar("SELECT count(*) FROM assets").await, 0, "{what}: no asset recorded");
            let uploads = app.scalar("SELECT count(*) FROM events WHERE type = 'AssetUploaded'").await;
            assert_eq!(uploads, 0, "{what}: no AssetUploaded event");
            app.assert_disk(0, what).await;
        }
    };

    // TeraServer refuses the asset: its status passed on.
    app.tera.with(|s| s.create_status = Some(500));
    let failed = app.upload(&token, &json!({"id_session": 80, "asset_name": "a"}), "a.bin", &bytes).await;
    assert_eq!(failed.status, 500, "{}", failed.text());
    assert_eq!(app.tera.calls("create_asset"), 1);
    nothing_recorded("TeraServer answering 500").await;
    app.tera.with(|s| s.create_status = Some(403));
    let refused = app.upload(&token, &json!({"id_session": 80, "asset_name": "a"}), "a.bin", &bytes).await;
    assert_eq!(refused.status, 403, "{}", refused.text());
    nothing_recorded("TeraServer answering 403").await;
    app.tera.with(|s| s.create_status = None);

    // TeraServer unreachable: 503, with a JSON body.
    app.tera.stop().await;
    for id_session in [81, 80] {
        // 81: asking for the session fails; 80: the session may still be cached, then
        // the asset creation fails.
        let file_asset = json!({"id_session": id_session, "asset_name": "a"});
        let unreachable = app.upload(&token, &file_asset, "a.bin", &bytes).await;
        assert_eq!(unreachable.status, 503, "session {id_session}: {}", unreachable.text());
        let _: Value = unreachable.json();
        nothing_recorded("TeraServer unreachable").await;
    }
}

#[tokio::test]
async fn a_recording_that_fails_after_teraserver_made_the_asset_deletes_it_again() {
    let app = start_opentera_app().await;
    let user = Uuid::new_v4();
    let token = app.keys.user(user, 9, false);
    app.tera.set_session(session_json(90, &[user], &[], &[]));
    let first = app.upload_ok(&token, 90, b"first").await;
    let existing: Uuid = first["asset_uuid"].as_str().unwrap().parse().unwrap();
    app.assert_disk(1, "one upload").await;

    // TeraServer hands out a uuid assetd already holds: assetd cannot record the asset.
    app.tera.with(|s| s.forced_asset_uuid = Some(existing));
    let failed = app.upload(&token, &json!({"id_session": 90, "asset_name": "b"}), "b.bin", b"second").await;
    assert!(failed.status >= 400, "the upload fails: {} {}", failed.status, failed.text());
    assert_eq!(app.tera.with(|s| s.deleted.clone()), vec![existing.to_string()], "TeraServer's asset deleted again");
    assert_eq!(app.scalar("SELECT count(*) FROM assets").await, 1);
    app.assert_disk(1, "the failed upload's bytes are removed").await;
    let download = app.download(&token, &existing.to_string(), first["access_token"].as_str().unwrap()).await;
    assert_eq!(download.bytes, b"first", "the first asset is untouched");
}

#[tokio::test]
async fn access_tokens_grant_their_assets_to_their_requester_only() {
    let app = start_opentera_app().await;
    let user = Uuid::new_v4();
    let token = app.keys.user(user, 3, false);
    app.tera.set_session(session_json(100, &[user], &[], &[]));
    let a = app.upload_ok(&token, 100, b"asset a").await;
    let b = app.upload_ok(&token, 100, b"asset b").await;
    let (a_uuid, b_uuid) = (a["asset_uuid"].as_str().unwrap(), b["asset_uuid"].as_str().unwrap());

    // TeraServer's per-asset tokens name the asset as a plain string.
    let single = app.keys.access(json!(a_uuid), user, 1800);
    let infos = app.infos(&token, a_uuid, &single).await;
    assert_eq!(infos.status, 200, "{}", infos.text());
    assert_eq!(infos.json()["asset_uuid"], a_uuid);
    assert_eq!(app.download(&token, a_uuid, &single).await.bytes, b"asset a");
    // Not the other asset.
    assert_eq!(app.download(&token, b_uuid, &single).await.status, 403, "a token for a only");
    // Not for another requester.
    let someone_else = app.keys.access(json!([a_uuid]), Uuid::new_v4(), 1800);
    assert_eq!(app.download(&token, a_uuid, &someone_else).await.status, 403, "another requester's token");
    assert_eq!(app.infos(&token, a_uuid, &someone_else).await.status, 403);
    // Not once expired, nor signed with another key.
    let expired = app.keys.access(json!([a_uuid]), user, -60);
    assert_eq!(app.download(&token, a_uuid, &expired).await.status, 403, "an expired token");
    let forged = sign(&app.keys.user, &json!({"asset_uuids": [a_uuid], "requester_uuid": user, "exp": now() + 60}));
    assert_eq!(app.download(&token, a_uuid, &forged).await.status, 403, "a token not signed with the service key");

    // POST /api/assets/infos: one bad token refuses all; unknown assets are left out.
    let post = |assets: Value| {
        let request = app
            .client
            .post(app.url("/api/assets/infos"))
            .header("Authorization", format!("OpenTera {token}"))
            .json(&json!({ "assets": assets }));
        async move { Answer::of(request.send().await.unwrap()).await }
    };
    let b_token = b["access_token"].as_str().unwrap();
    let one_bad =
        post(json!([{"asset_uuid": a_uuid, "access_token": single}, {"asset_uuid": b_uuid, "access_token": single}]));
    let one_bad = one_bad.await;
    assert_eq!(one_bad.status, 403, "{}", one_bad.text());
    let unknown = Uuid::new_v4().to_string();
    let unknown_token = app.keys.access(json!([unknown]), user, 1800);
    let good = post(json!([
        {"asset_uuid": a_uuid, "access_token": single},
        {"asset_uuid": b_uuid, "access_token": b_token},
        {"asset_uuid": unknown, "access_token": unknown_token},
    ]))
    .await;
    assert_eq!(good.status, 200, "{}", good.text());
    let listed: Vec<Value> = good.json().as_array().unwrap().iter().map(|a| a["asset_uuid"].clone()).collect();
    assert_eq!(listed, vec![json!(a_uuid), json!(b_uuid)], "the known assets, the unknown one left out");
    // GET infos of an unknown asset: 404.
    assert_eq!(app.infos(&token, &unknown, &unknown_token).await.status, 404);
}

#[tokio::test]
async fn deletes_go_to_teraserver_first() {
    let app = start_opentera_app().await;
    let user = Uuid::new_v4();
    let token = app.keys.user(user, 4, false);
    app.tera.set_session(session_json(110, &[user], &[], &[]));
    let a = app.upload_ok(&token, 110, b"to delete").await;
    let b = app.upload_ok(&token, 110, b"to keep").await;
    let delete = |asset: &Value| {
        let path = format!(
            "/api/assets?uuid={}&access_token={}",
            asset["asset_uuid"].as_str().unwrap(),
            asset["access_token"].as_str().unwrap()
        );
        let request = app.client.delete(app.url(&path)).header("Authorization", format!("OpenTera {token}"));
        async move { Answer::of(request.send().await.unwrap()).await }
    };

    let deleted = delete(&a).await;
    assert_eq!(deleted.status, 200, "{}", deleted.text());
    assert_eq!(deleted.json(), json!(""));
    assert_eq!(app.tera.calls("delete_asset"), 1);
    assert_eq!(app.tera.with(|s| s.deleted.clone()), vec![a["asset_uuid"].as_str().unwrap().to_owned()]);
    let a_uuid = a["asset_uuid"].as_str().unwrap();
    let a_token = a["access_token"].as_str().unwrap();
    assert_eq!(app.infos(&token, a_uuid, a_token).await.status, 404, "infos of a deleted asset");
    assert_eq!(app.download(&token, a_uuid, a_token).await.status, 404, "download of a deleted asset");
    app.assert_disk(1, "the deleted asset's bytes are removed").await;

    // TeraServer refuses: its status passed on, the asset stays.
    app.tera.with(|s| s.delete_status = Some(403));
    let refused = delete(&b).await;
    assert_eq!(refused.status, 403, "{}", refused.text());
    assert_eq!(app.tera.calls("delete_asset"), 2);
    let download = app.download(&token, b["asset_uuid"].as_str().unwrap(), b["access_token"].as_str().unwrap()).await;
    assert_eq!(download.status, 200, "{}", download.text());
    assert_eq!(download.bytes, b"to keep");
}

#[tokio::test]
async fn native_mode_still_answers_401_without_cors() {
    let app = TestApp::spawn().await;
    let response = app.client.get(app.url(&format!("/api/assets?asset_uuid={}", Uuid::new_v4()))).send().await.unwrap();
    assert_eq!(response.status(), 401);
    assert!(response.headers().get("access-control-allow-origin").is_none(), "no CORS header in native mode");
    let response = app.client.get(app.url("/api/sessions/1")).header("Authorization", "Bearer bad").send().await;
    assert_eq!(response.unwrap().status(), 401);
}

/// The double refuses what TeraServer would (the tests above rely on it to tell whether
/// assetd calls TeraServer with a valid service token).
#[tokio::test]
async fn the_teraserver_double_refuses_tokens_teraserver_would_refuse() {
    let app = start_opentera_app().await;
    app.tera.set_session(session_json(1, &[], &[], &[]));
    let ask = |authorization: String| {
        let request = app.client.get(format!("{}/api/service/sessions?id_session=1", app.tera.url()));
        async move { request.header("Authorization", authorization).send().await.unwrap().status().as_u16() }
    };
    assert_eq!(ask(format!("OpenTera {}", app.keys.service(app.service_uuid))).await, 200);
    assert_eq!(ask(format!("OpenTera {}", app.keys.service(Uuid::new_v4()))).await, 401, "another service's uuid");
    let other_key = sign("other", &json!({"service_uuid": app.service_uuid, "exp": now() + 60}));
    assert_eq!(ask(format!("OpenTera {other_key}")).await, 401, "another key");
    assert_eq!(ask(format!("OpenTera {}", app.keys.user(Uuid::new_v4(), 1, true))).await, 401, "a user token");
    assert_eq!(app.tera.calls("unauthorized"), 3);
}

// ---------------------------------------------------------------------------------------
// The fixes after the outside try.

#[tokio::test]
async fn redis_stopped_answers_503_within_seconds_not_after_a_hang() {
    let mut app = start_opentera_app().await;
    let user_token = app.keys.user(Uuid::new_v4(), 1, false);
    assert_eq!(app.probe(&user_token).await, 400);
    let _ = app.redis.child.kill();
    let _ = app.redis.child.wait();

    // A token signed with an unknown key makes assetd read the keys again: Redis fails.
    let unknown = OtKeys::random().user(Uuid::new_v4(), 1, false);
    for attempt in 1..=2 {
        let started = Instant::now();
        let answer = app.get(&unknown, "/api/assets").await;
        let elapsed = started.elapsed();
        assert_eq!(answer.status, 503, "attempt {attempt}, unknown key: {}", answer.text());
        let _: Value = answer.json();
        assert!(elapsed < Duration::from_secs(5), "attempt {attempt}, unknown key: answered after {elapsed:?}");
    }
    // A good user token: its revocation check fails closed, then the keys cannot be read
    // again: 503 too (never a 400).
    let started = Instant::now();
    let answer = app.get(&user_token, "/api/assets").await;
    assert_eq!(answer.status, 503, "good user token: {}", answer.text());
    let _: Value = answer.json();
    assert!(started.elapsed() < Duration::from_secs(5), "good user token: answered after {:?}", started.elapsed());
}

#[tokio::test]
async fn a_token_signed_with_keys_renewed_a_moment_ago_passes_at_once() {
    let app = start_opentera_app().await;
    let user = Uuid::new_v4();
    assert_eq!(app.probe(&app.keys.user(user, 1, false)).await, 400);
    // A failing token: the keys were read just now.
    assert_eq!(app.probe("not-a-token").await, 403);
    for round in 1..=2 {
        // No sleep: renewed, then used at once (previously refused for 100 ms).
        let new = OtKeys::random();
        new.write(&app.redis).await;
        assert_eq!(app.probe(&new.user(user, 1, false)).await, 400, "round {round}: the new user key");
        assert_eq!(app.probe(&new.participant(Uuid::new_v4(), 2)).await, 400, "round {round}: the new participant key");
    }
}

#[tokio::test]
async fn an_upload_right_after_teraserver_renews_its_service_key_succeeds() {
    let app = start_opentera_app().await;
    let user = Uuid::new_v4();
    let token = app.keys.user(user, 1, false);
    app.tera.set_session(session_json(120, &[user], &[], &[]));
    // The session is now cached (2 s), so the next upload's first TeraServer call is the
    // asset creation.
    app.upload_ok(&token, 120, b"before").await;
    assert_eq!(app.probe("not-a-token").await, 403, "the keys were read just now");
    let renewed_at = Instant::now();
    let new_service_key = format!("service-{}", Uuid::new_v4().simple());
    app.redis.run(&["SET", "ServiceTokenAPIKey", &new_service_key]).await;
    app.upload_ok(&token, 120, b"after").await;
    let elapsed = renewed_at.elapsed();
    assert_eq!(app.tera.with(|s| s.created.len()), 2, "both assets created");
    if elapsed < Duration::from_millis(900) {
        // The keys assetd held were the old ones: refused once, then retried.
        assert_eq!(app.tera.calls("unauthorized"), 1, "one refusal, then the retry");
        assert_eq!(app.tera.calls("create_asset"), 3, "first upload, refused call, retry");
    }
}

#[tokio::test]
async fn a_participant_cannot_name_other_creators() {
    let app = start_opentera_app().await;
    let participant = Uuid::new_v4();
    app.tera.set_session(session_json(130, &[], &[participant], &[]));
    let file_asset = json!({"id_session": 130, "asset_name": "a", "id_user": 1, "id_device": 2, "id_service": 3});
    let answer = app.upload(&app.keys.participant(participant, 44), &file_asset, "a.bin", b"x").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let created = app.tera.with(|s| s.created.clone());
    assert_eq!(created.len(), 1);
    let asset = created[0].as_object().unwrap();
    let creators: Vec<(&String, &Value)> = asset
        .iter()
        .filter(|(k, _)| ["id_user", "id_participant", "id_device", "id_service"].contains(&k.as_str()))
        .collect();
    assert_eq!(creators, vec![(&"id_participant".to_owned(), &json!(44))], "{}", created[0]);
}

#[tokio::test]
async fn native_routes_grant_nothing_through_the_registry_in_opentera_mode() {
    let app = start_opentera_app().await;
    let participant = Uuid::new_v4();
    let token = app.keys.participant(participant, 5);
    app.tera.set_session(session_json(140, &[], &[participant], &[]));
    let uploaded = app.upload_ok(&token, 140, b"by a member").await;
    let asset_uuid = uploaded["asset_uuid"].as_str().unwrap();

    let listing = app.get(&token, "/api/sessions/140/assets").await;
    assert_eq!(listing.status, 403, "the listing: {}", listing.text());
    let events = app.get(&token, &format!("/api/assets/{asset_uuid}/events")).await;
    assert_eq!(events.status, 403, "the events: {}", events.text());
    let signed = Answer::of(
        app.client
            .post(app.url(&format!("/api/assets/{asset_uuid}/download-url")))
            .header("Authorization", format!("OpenTera {token}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(signed.status, 403, "a download URL: {}", signed.text());

    let admin = app.get(&app.keys.user(Uuid::new_v4(), 1, true), "/api/sessions/140/assets").await;
    assert_eq!(admin.status, 200, "a superadmin lists: {}", admin.text());
}

#[tokio::test]
async fn external_address_headers_that_are_not_a_host_and_port_are_ignored() {
    let app = start_opentera_app().await;
    let user = Uuid::new_v4();
    app.tera.set_session(session_json(150, &[user], &[], &[]));
    let headers = [("X_ExternalServer", "evil.com/\"<x>"), ("X-ExternalPort", "abc")];
    let file_asset = json!({"id_session": 150, "asset_name": "a"});
    let answer = app.upload_with(&app.keys.user(user, 1, false), &file_asset, "a.bin", b"x", &headers).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let url = answer.json()["asset_url"].as_str().unwrap().to_owned();
    assert!(!url.contains("evil") && !url.contains("abc") && !url.contains('<'), "{url}");
    let host = app.base.trim_start_matches("http://");
    assert!(url.contains(host), "falls back to the request's Host ({host}): {url}");
}

/// Found while writing the test above: the upload reads the service key before calling
/// TeraServer and signs the access token with it, so after the retry with the renewed key
/// the access token handed out is signed with the old one and stops working once assetd
/// reads the keys again.
#[tokio::test]
async fn the_access_token_of_an_upload_retried_after_a_renewal_is_signed_with_the_new_key() {
    let app = start_opentera_app().await;
    let user = Uuid::new_v4();
    let token = app.keys.user(user, 1, false);
    app.tera.set_session(session_json(121, &[user], &[], &[]));
    app.upload_ok(&token, 121, b"before").await;
    assert_eq!(app.probe("not-a-token").await, 403, "the keys were read just now");
    let new_service_key = format!("service-{}", Uuid::new_v4().simple());
    app.redis.run(&["SET", "ServiceTokenAPIKey", &new_service_key]).await;
    let uploaded = app.upload_ok(&token, 121, b"after").await;
    let access = uploaded["access_token"].as_str().unwrap();
    assert!(verified(access, &new_service_key).is_some(), "access token signed with the new service key");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let download = app.download(&token, uploaded["asset_uuid"].as_str().unwrap(), access).await;
    assert_eq!(download.status, 200, "{}", download.text());
}

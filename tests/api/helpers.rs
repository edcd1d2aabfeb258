//! `TestApp`: each test gets its own freshly migrated database, data directory and
//! server on a free port, plus helpers that read like the API contract.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use assetd::cli::build_context;
use assetd::config::{DatabaseConfig, ServeConfig};
use assetd::domain::principal::{Principal, PrincipalKind};
use assetd::http::{self, Context};
use serde_json::{json, Value};
use uuid::Uuid;

pub const JWT_SECRET: &str = "test-jwt-secret-0123456789abcdef";
/// The key test servers sign URLs with (`ASSETD_URL_SIGNING_KEY`).
pub const URL_SIGNING_KEY: &str = "test-url-signing-key";

/// The RabbitMQ the AMQP tests use (each on names of its own).
pub fn amqp_url() -> String {
    std::env::var("ASSETD_TEST_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A stop signal that never comes, for the relay and the command consumer.
pub fn never_stop() -> tokio_util::sync::CancellationToken {
    tokio_util::sync::CancellationToken::new()
}

/// A TCP proxy to the test RabbitMQ that a test can cut (every connection through it
/// dropped, new ones refused) and restore: a broker restart as assetd sees it, without
/// touching the machine's broker under other tests. It can also hold what the broker
/// sends (publisher confirms among it) while what the client sends still flows: messages
/// are routed, their confirms are not yet seen.
pub struct BrokerProxy {
    port: u16,
    cut: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
    held: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
}

impl BrokerProxy {
    pub async fn start() -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let target = amqp_url()
            .split('@')
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .expect("ASSETD_TEST_AMQP_URL like amqp://user:pass@host:port/vhost")
            .to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = std::sync::Arc::new(tokio::sync::watch::channel(false).0);
        let held = std::sync::Arc::new(tokio::sync::watch::channel(false).0);
        let (cut_state, held_state) = (cut.clone(), held.clone());
        tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else { return };
                if *cut_state.borrow() {
                    continue; // refused: dropped at once
                }
                let mut cut_now = cut_state.subscribe();
                let mut held = held_state.subscribe();
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(&target).await else { return };
                    let (mut from_client, mut to_client) = inbound.into_split();
                    let (mut from_broker, mut to_broker) = outbound.into_split();
                    let upstream = tokio::io::copy(&mut from_client, &mut to_broker);
                    let downstream = async {
                        let mut buffer = vec![0; 64 * 1024];
                        loop {
                            let read = from_broker.read(&mut buffer).await?;
                            if read == 0 {
                                return Ok::<_, std::io::Error>(());
                            }
                            // What arrives while held is passed on once released.
                            let _ = held.wait_for(|held| !*held).await;
                            to_client.write_all(&buffer[..read]).await?;
                        }
                    };
                    tokio::select! {
                        _ = upstream => {}
                        _ = downstream => {}
                        _ = cut_now.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        Self { port, cut, held }
    }
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }
    pub fn restore(&self) {
        self.cut.send_replace(false);
    }
    /// Holds back what the broker sends until [`BrokerProxy::release`].
    pub fn hold_answers(&self) {
        self.held.send_replace(true);
    }
    pub fn release(&self) {
        self.held.send_replace(false);
    }
}

/// A TCP proxy to `target` that a test can cut (every connection through it dropped,
/// new ones refused) and restore: a server going away and coming back as assetd sees
/// it, without touching the server other tests use.
pub struct TcpProxy {
    pub port: u16,
    cut: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
}

impl TcpProxy {
    pub async fn start(target: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = std::sync::Arc::new(tokio::sync::watch::channel(false).0);
        let cut_state = cut.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else { return };
                if *cut_state.borrow() {
                    continue; // refused: dropped at once
                }
                let mut cut_now = cut_state.subscribe();
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut_now.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        Self { port, cut }
    }

    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    pub fn restore(&self) {
        self.cut.send_replace(false);
    }
}

/// A [`TcpProxy`] to the test PostgreSQL server.
pub struct DatabaseProxy(TcpProxy);

impl DatabaseProxy {
    pub async fn start() -> Self {
        // postgres://user@host:port → host:port
        let server = server_url();
        let authority = server.split("://").nth(1).unwrap_or(&server);
        let authority = authority.rsplit('@').next().unwrap_or(authority);
        let target = authority.split('/').next().unwrap_or(authority).to_owned();
        Self(TcpProxy::start(target).await)
    }

    /// The URL of database `name` through the proxy.
    pub fn url(&self, name: &str) -> String {
        let server = server_url();
        let (scheme, rest) = server.split_once("://").unwrap_or(("postgres", &server));
        let user = rest.rsplit_once('@').map(|(user, _)| format!("{user}@")).unwrap_or_default();
        format!("{scheme}://{user}127.0.0.1:{}/{name}", self.0.port)
    }

    pub fn cut(&self) {
        self.0.cut();
    }

    pub fn restore(&self) {
        self.0.restore();
    }
}

/// Asserts that `message` conforms to the checked-in schema `events/<schema>` (kept
/// current by the contract test), listing every violation.
pub fn assert_conforms(schema: &str, message: &Value) {
    let errors: Vec<String> =
        contract_validator(schema).iter_errors(message).map(|e| format!("{} at {}", e, e.instance_path())).collect();
    assert!(errors.is_empty(), "message does not conform to {schema}: {errors:#?}\n{message:#}");
}

/// The validator of the checked-in schema `events/<schema>`, compiled once.
pub fn contract_validator(schema: &str) -> std::sync::Arc<jsonschema::Validator> {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};
    static VALIDATORS: OnceLock<Mutex<HashMap<String, Arc<jsonschema::Validator>>>> = OnceLock::new();
    VALIDATORS
        .get_or_init(Default::default)
        .lock()
        .unwrap()
        .entry(schema.to_owned())
        .or_insert_with(|| {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("events").join(schema);
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("no schema {}: {e}", path.display()));
            Arc::new(jsonschema::validator_for(&serde_json::from_str(&text).unwrap()).unwrap())
        })
        .clone()
}

/// Asserts that an event message conforms to its event type's schema (there must be one).
pub fn assert_event_conforms(message: &Value) {
    let event_type = message["event_type"].as_str().unwrap_or_else(|| panic!("no event_type in {message}"));
    assert_conforms(&format!("schemas/events/{}.json", assetd::relay::routing_key(event_type)), message);
}

/// The Postgres server the tests create their databases on.
pub fn server_url() -> String {
    std::env::var("ASSETD_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// A database of its own for one test, dropped with it.
pub struct TestDatabase {
    pub name: String,
    pub url: String,
}

impl TestDatabase {
    pub async fn create() -> Self {
        let name = format!("assetd_test_{}", Uuid::new_v4().simple());
        let (client, connection) =
            tokio_postgres::connect(&format!("{}/postgres", server_url()), tokio_postgres::NoTls)
                .await
                .expect("the test Postgres server is reachable (ASSETD_TEST_DATABASE_URL)");
        tokio::spawn(connection);
        client.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("creating a test database");
        Self { url: format!("{}/{name}", server_url()), name }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop can't await; a short-lived runtime on its own thread does the job.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            runtime.block_on(async {
                let (client, connection) =
                    tokio_postgres::connect(&format!("{}/postgres", server_url()), tokio_postgres::NoTls).await.ok()?;
                tokio::spawn(connection);
                client.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await.ok()
            })
        })
        .join();
    }
}

/// Knobs a test may turn.
#[derive(Clone, Default)]
pub struct TestOptions {
    pub max_upload_size: Option<u64>,
    pub accel_redirect_prefix: Option<String>,
    pub body_idle_timeout_seconds: Option<u64>,
    pub public_url: Option<String>,
    /// Reach the database through a [`DatabaseProxy`] the test can cut (`TestApp::database_proxy`).
    pub proxied_database: bool,
    /// Jobs and imports (defaults otherwise).
    pub jobs: Option<assetd::config::JobsConfig>,
    /// Where blobs go (the local backend by default).
    pub backend: Backend,
    /// On S3: reach the bucket at this endpoint (a proxy the test can cut) rather than
    /// the test server's.
    pub s3_endpoint: Option<String>,
    /// On S3: `ASSETD_S3_PRESIGNED_SECONDS`.
    pub s3_presigned_seconds: u64,
    /// `ASSETD_UPLOAD_TTL`: how long a two-phase upload lives (a day by default).
    pub upload_ttl_seconds: Option<u64>,
    /// `ASSETD_URL_SIGNING_KEY_PREVIOUS`: a key URLs may still be signed with.
    pub url_signing_key_previous: Option<String>,
}

/// The blob backends the asset suite runs on (see [`on_both_backends!`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Backend {
    #[default]
    Local,
    /// A bucket of its own on the test S3 server (moto, started by scripts/test).
    S3,
}

pub struct TestApp {
    pub addr: SocketAddr,
    /// `http://127.0.0.1:<port>/file`
    pub base: String,
    pub client: reqwest::Client,
    pub ctx: Context,
    pub data_dir: tempfile::TempDir,
    pub db: TestDatabase,
    /// With [`TestOptions::proxied_database`]: what stands between assetd and its database.
    pub database_proxy: Option<DatabaseProxy>,
    /// With [`Backend::S3`]: the test's bucket.
    pub bucket: Option<crate::s3::TestBucket>,
}

pub fn serve_config(database_url: &str, data_dir: &Path, options: &TestOptions) -> ServeConfig {
    ServeConfig {
        blobs: "local".into(),
        // The smallest part S3 allows, so that a few MiB already make a multipart upload.
        s3: assetd::config::S3Settings {
            part_size: 5 << 20,
            presigned_seconds: options.s3_presigned_seconds,
            ..Default::default()
        },
        database: DatabaseConfig { database_url: database_url.to_owned(), database_pool_size: 16 },
        listen: "127.0.0.1:0".parse().unwrap(),
        base_path: Some("/file".into()),
        opentera: Default::default(),
        data_dir: data_dir.to_owned(),
        max_upload_size: options.max_upload_size.unwrap_or(10 * 1024 * 1024 * 1024),
        jwt_secret: JWT_SECRET.into(),
        url_signing_key: URL_SIGNING_KEY.into(),
        url_signing_key_previous: options.url_signing_key_previous.clone(),
        signed_url_seconds: 900,
        signed_url_max_seconds: 7 * 24 * 3600,
        upload_ttl_seconds: options.upload_ttl_seconds.unwrap_or(24 * 3600),
        accel_redirect_prefix: options.accel_redirect_prefix.clone(),
        token_limits: Default::default(),
        asset_token_ttl: 3600,
        body_idle_timeout_seconds: options.body_idle_timeout_seconds.unwrap_or(60),
        public_url: options.public_url.clone(),
        shutdown_grace_seconds: 5,
        amqp_url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
        amqp_prefix: format!("assetd_test_{}", Uuid::new_v4().simple()),
        // In-process servers never run `serve`; the relay and commands have tests of their own.
        relay: false,
        commands: false,
        jobs: options.jobs.clone().unwrap_or_default(),
    }
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(TestOptions::default()).await
    }

    pub async fn spawn_with(options: TestOptions) -> Self {
        let db = TestDatabase::create().await;
        let data_dir = tempfile::tempdir().unwrap();
        // nginx workers (another user) read blobs for X-Accel-Redirect.
        std::fs::set_permissions(data_dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let database_proxy = match options.proxied_database {
            true => Some(DatabaseProxy::start().await),
            false => None,
        };
        let database_url = match &database_proxy {
            Some(proxy) => proxy.url(&db.name),
            None => db.url.clone(),
        };
        let mut config = serve_config(&database_url, data_dir.path(), &options);
        let bucket = match options.backend {
            Backend::Local => None,
            Backend::S3 => {
                let bucket = crate::s3::TestBucket::create().await;
                // Given as settings, not through the process's environment, which tests
                // running side by side in one process share.
                for (name, value) in bucket.env("assets") {
                    match name.as_str() {
                        "ASSETD_BLOBS" => config.blobs = value,
                        "AWS_ENDPOINT" if options.s3_endpoint.is_some() => {
                            let endpoint = options.s3_endpoint.clone().unwrap();
                            config.s3.aws_overrides.push(("aws_endpoint".into(), endpoint));
                        }
                        _ => config.s3.aws_overrides.push((name.to_ascii_lowercase(), value)),
                    }
                }
                Some(bucket)
            }
        };
        let ctx = build_context(&config).await.expect("building the app");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(http::serve(ctx.clone(), listener, std::future::pending(), Duration::from_secs(5)));
        Self {
            addr,
            base: format!("http://{addr}/file"),
            client: reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap(),
            ctx,

            data_dir,
            db,
            database_proxy,
            bucket,
        }
    }

    /// A server on `backend`, otherwise as [`TestApp::spawn`].
    pub async fn on(backend: Backend) -> Self {
        Self::spawn_with(TestOptions { backend, ..Default::default() }).await
    }

    /// Blobs in the store new blobs go to (files under `blobs/`, or the bucket's objects
    /// and the multipart uploads left open in it: a failed upload leaves neither).
    pub async fn blob_count(&self) -> usize {
        use futures::TryStreamExt;
        let listing = self.ctx.app.blobs.writer_backend().list();
        let blobs = listing.try_collect::<Vec<_>>().await.expect("listing the blobs").len();
        match &self.bucket {
            Some(bucket) => blobs + bucket.pending_multipart_uploads().await.len(),
            None => blobs,
        }
    }

    /// Whether the blob of asset `uuid` exists where its event put it (the backend of
    /// this app's blob store when no such asset was recorded).
    pub async fn blob_exists(&self, uuid: Uuid) -> bool {
        let client = self.ctx.app.pool.get().await.unwrap();
        let asset = assetd::projections::read::asset(&client, uuid).await.unwrap();
        let location = asset.map_or_else(|| self.ctx.app.blobs.location_for(uuid), |asset| asset.blob_location());
        self.ctx.app.blobs.stat(&location).await.expect("stat of a blob").is_some()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn token_for(&self, kind: PrincipalKind, uuid: Uuid, superadmin: bool) -> String {
        self.ctx.app.auth.mint(&Principal { kind, uuid, name: "test".into(), superadmin }, 3600)
    }

    pub fn service_token(&self) -> String {
        self.token_for(PrincipalKind::Service, Uuid::new_v4(), false)
    }

    pub fn user_token(&self, uuid: Uuid) -> String {
        self.token_for(PrincipalKind::User, uuid, false)
    }

    pub async fn put_session(&self, token: &str, id: i64, body: &Value) -> reqwest::Response {
        self.client
            .put(self.url(&format!("/api/sessions/{id}")))
            .header("Authorization", format!("Bearer {token}"))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// Registers session `id` with these users; returns a token of its first user.
    pub async fn session_with_user(&self, id: i64) -> (Uuid, String) {
        let user = Uuid::new_v4();
        let response = self
            .put_session(
                &self.service_token(),
                id,
                &json!({"session_name": format!("session {id}"), "session_users": [user]}),
            )
            .await;
        assert_eq!(response.status(), 200, "registering session {id}");
        (user, self.user_token(user))
    }

    /// OpenTera's upload: multipart with `file_asset` JSON then `file`.
    pub async fn upload(&self, token: &str, file_asset: &Value, filename: &str, bytes: Vec<u8>) -> reqwest::Response {
        let form = reqwest::multipart::Form::new()
            .text("file_asset", file_asset.to_string())
            .part("file", reqwest::multipart::Part::bytes(bytes).file_name(filename.to_owned()));
        self.post_form(token, form).await
    }

    /// Posts any multipart form to the upload route.
    pub async fn post_form(&self, token: &str, form: reqwest::multipart::Form) -> reqwest::Response {
        self.client
            .post(self.url("/api/assets"))
            .header("Authorization", format!("OpenTera {token}"))
            .multipart(form)
            .send()
            .await
            .unwrap()
    }

    /// Uploads and returns the answer's JSON, asserting success.
    pub async fn upload_ok(&self, token: &str, id_session: i64, filename: &str, bytes: &[u8]) -> Value {
        let response = self
            .upload(token, &json!({"id_session": id_session, "asset_name": filename}), filename, bytes.to_vec())
            .await;
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        assert_eq!(status, 200, "upload failed: {body}");
        body
    }

    pub async fn get(&self, token: &str, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).header("Authorization", format!("Bearer {token}")).send().await.unwrap()
    }

    pub async fn delete(&self, token: &str, path: &str) -> reqwest::Response {
        self.client.delete(self.url(path)).header("Authorization", format!("Bearer {token}")).send().await.unwrap()
    }

    /// `DELETE /api/sessions/{id}` as a service (asserting 202), then runs its purge job's
    /// work here as a worker would (a `TestApp` runs no workers); returns how many assets
    /// it deleted.
    pub async fn delete_session_and_purge(&self, id: i64) -> u64 {
        let response = self.delete(&self.service_token(), &format!("/api/sessions/{id}")).await;
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        assert_eq!(status, 202, "deleting session {id}: {body}");
        let job: Uuid = body["job_uuid"].as_str().unwrap().parse().unwrap();
        self.purge(id, job).await
    }

    /// Runs the purge job `job` of the deleted session `id`, as a worker would.
    pub async fn purge(&self, id: i64, job: Uuid) -> u64 {
        let ctx = assetd::app::CommandContext {
            actor: assetd::domain::principal::Actor { kind: PrincipalKind::Service, uuid: Uuid::nil() },
            request_id: job.to_string(),
            correlation_id: job.to_string(),
            message: None,
        };
        let (progress, _) = tokio::sync::watch::channel((0u64, None::<u64>));
        let id = assetd::domain::names::SessionId::new(id).unwrap();
        self.ctx.app.purge_session(&ctx, job, id, &progress, &never_stop()).await.unwrap()
    }

    pub async fn post_json(&self, token: &str, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .header("Authorization", format!("Bearer {token}"))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// A POST with an empty body (the request is in the path and query).
    pub async fn post_empty(&self, token: &str, path: &str) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .header("Authorization", format!("Bearer {token}"))
            .body("")
            .send()
            .await
            .unwrap()
    }

    /// `POST /api/uploads`: asks for a two-phase upload.
    pub async fn create_upload(&self, token: &str, body: &Value) -> reqwest::Response {
        self.post_json(token, "/api/uploads", body).await
    }

    /// Asks for a two-phase upload and returns the answer's JSON, asserting a 201.
    pub async fn create_upload_ok(&self, token: &str, body: &Value) -> Value {
        let response = self.create_upload(token, body).await;
        let status = response.status();
        let text = response.text().await.unwrap();
        assert_eq!(status, 201, "creating an upload failed: {text}");
        serde_json::from_str(&text).unwrap()
    }

    /// `PUT` of raw bytes to a signed upload URL, with no Authorization header.
    pub async fn put_signed(&self, url: &str, bytes: Vec<u8>) -> reqwest::Response {
        self.client.put(url).body(bytes).send().await.unwrap()
    }

    /// `GET /api/uploads/{uuid}`: the upload's status as JSON, asserting a 200.
    pub async fn upload_status(&self, token: &str, uuid: &str) -> Value {
        let response = self.get(token, &format!("/api/uploads/{uuid}")).await;
        let status = response.status();
        let text = response.text().await.unwrap();
        assert_eq!(status, 200, "reading upload {uuid} failed: {text}");
        serde_json::from_str(&text).unwrap()
    }

    /// `POST /api/uploads/{uuid}/commit`.
    pub async fn commit_upload(&self, token: &str, uuid: &str, body: &Value) -> reqwest::Response {
        self.post_json(token, &format!("/api/uploads/{uuid}/commit"), body).await
    }

    /// `POST /api/assets/{uuid}/download-url`: `{download_url, expires_at}`, asserting a 200.
    pub async fn download_url(&self, token: &str, uuid: &str) -> Value {
        let response = self.post_empty(token, &format!("/api/assets/{uuid}/download-url")).await;
        let status = response.status();
        let text = response.text().await.unwrap();
        assert_eq!(status, 200, "asking for a download URL of {uuid} failed: {text}");
        serde_json::from_str(&text).unwrap()
    }

    /// The event types of `stream`, in order.
    pub async fn events_of(&self, stream: &str) -> Vec<String> {
        let client = self.ctx.app.pool.get().await.unwrap();
        client
            .query("SELECT type FROM events WHERE stream = $1 ORDER BY version", &[&stream])
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect()
    }

    pub async fn scalar(&self, sql: &str) -> i64 {
        let client = self.ctx.app.pool.get().await.unwrap();
        client.query_one(sql, &[]).await.unwrap().get(0)
    }

    pub async fn scalar_json(&self, sql: &str) -> Value {
        let client = self.ctx.app.pool.get().await.unwrap();
        client.query_one(sql, &[]).await.unwrap().get(0)
    }

    pub async fn event_count(&self) -> i64 {
        self.scalar("SELECT count(*) FROM events").await
    }

    /// Rows of a read model as JSON, in a stable order, for before/after comparisons.
    pub async fn table_snapshot(&self, table: &str, order_by: &str) -> Value {
        let client = self.ctx.app.pool.get().await.unwrap();
        let sql = format!("SELECT coalesce(json_agg(t ORDER BY {order_by}), '[]'::json) FROM {table} t");
        client.query_one(&sql, &[]).await.unwrap().get(0)
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.data_dir.path().join("tmp")
    }

    pub fn files_under(dir: &Path) -> usize {
        walk(dir).len()
    }

    /// What a refused request must leave unchanged: events, assets, temp files, blobs.
    /// Stores an upload through the application, bypassing HTTP and its early checks
    /// (as if the session changed while the bytes were streaming).
    pub async fn store_upload_directly(
        &self,
        principal: &Principal,
        id_session: i64,
        asset_uuid: Uuid,
    ) -> Result<assetd::projections::read::AssetInfo, assetd::app::AppError> {
        store_upload_via(&self.ctx.app, principal, id_session, asset_uuid).await
    }

    pub async fn footprint(&self) -> (i64, i64, usize, usize) {
        (
            self.event_count().await,
            self.scalar("SELECT count(*) FROM assets").await,
            Self::files_under(&self.tmp_dir()),
            self.blob_count().await,
        )
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                files.extend(walk(&path));
            } else {
                files.push(path);
            }
        }
    }
    files
}

/// Asserts an error answer: status, JSON shape of API.md, code; returns the body.
pub async fn assert_error(response: reqwest::Response, status: u16, code: &str) -> Value {
    let actual = response.status().as_u16();
    let request_id = response.headers().get("x-request-id").map(|v| v.to_str().unwrap().to_owned());
    let text = response.text().await.unwrap();
    let body: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("error body is not JSON: {text}"));
    assert_eq!(actual, status, "unexpected status, body {body}");
    assert_eq!(body["error"]["code"], code, "unexpected code, body {body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    assert_eq!(body["error"]["request_id"].as_str(), request_id.as_deref(), "request id in body matches the header");
    body
}

/// Deterministic pseudo-random bytes (xorshift), cheap to generate in bulk.
pub fn pseudo_random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// [`TestApp::store_upload_directly`] on any `App` (for spawned tasks).
pub async fn store_upload_via(
    app: &assetd::app::App,
    principal: &Principal,
    id_session: i64,
    asset_uuid: Uuid,
) -> Result<assetd::projections::read::AssetInfo, assetd::app::AppError> {
    use assetd::app::CommandContext;
    use assetd::domain::asset::{AssetSource, AssetUploaded};
    use assetd::domain::names::{AssetName, Directory, FileName, MediaType, SessionId, Tags};
    use assetd::domain::principal::Actor;

    let mut blob = app.blobs.create_temp(asset_uuid);
    blob.write(bytes::Bytes::copy_from_slice(asset_uuid.as_bytes())).await.unwrap();
    let context =
        CommandContext { actor: principal.actor(), request_id: "r".into(), correlation_id: "r".into(), message: None };
    app.store_upload(principal, &context, blob, |stored| AssetUploaded {
        asset_uuid,
        id_session: SessionId::new(id_session).unwrap(),
        asset_name: AssetName::parse("n").unwrap(),
        asset_original_filename: FileName::parse("n.bin").unwrap(),
        asset_type: MediaType::octet_stream(),
        asset_file_size: stored.size,
        asset_sha256: stored.sha256,
        asset_datetime: None,
        directory: Directory::root(),
        tags: Tags::default(),
        metadata: Default::default(),
        asset_creator: Actor { kind: principal.kind, uuid: principal.uuid },
        asset_source: AssetSource::Upload,
        blob: Some(stored.location),
        id_asset: None,
    })
    .await
}

/// `assetd serve` as its own process on `app`'s database (and bucket, on S3) with the
/// data directory `data_dir`, on a free port; relay, commands and workers off.
pub fn serve_process(app: &TestApp, data_dir: &Path) -> (tokio::process::Child, SocketAddr) {
    let (mut command, addr) = serve_command(app, data_dir);
    (command.spawn().unwrap(), addr)
}

/// The command of [`serve_process`], for a test to add to (it overrides what it sets).
pub fn serve_command(app: &TestApp, data_dir: &Path) -> (tokio::process::Command, SocketAddr) {
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_assetd"));
    if let Some(bucket) = &app.bucket {
        command.envs(bucket.env("assets")).env("ASSETD_S3_PART_SIZE", (5 << 20).to_string());
    }
    command
        .arg("serve")
        .env("ASSETD_DATABASE_URL", &app.db.url)
        .env("ASSETD_JWT_SECRET", JWT_SECRET)
        .env("ASSETD_URL_SIGNING_KEY", URL_SIGNING_KEY)
        .env("ASSETD_LISTEN", addr.to_string())
        .env("ASSETD_DATA_DIR", data_dir)
        .env("ASSETD_AMQP_URL", amqp_url())
        .env("ASSETD_AMQP_PREFIX", format!("assetd_test_{}", Uuid::new_v4().simple()))
        .env("ASSETD_RELAY", "false")
        .env("ASSETD_COMMANDS", "false")
        .env("ASSETD_WORKERS", "false")
        .env("ASSETD_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    (command, addr)
}

/// Waits (60 s at most) until the process at `addr` answers `/file/ready` with 200.
pub async fn wait_until_serving(addr: SocketAddr) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let ready = reqwest::get(format!("http://{addr}/file/ready")).await;
        if ready.is_ok_and(|r| r.status() == 200) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{addr} does not become ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs each named test function (taking a [`Backend`]) once per blob backend, as the
/// tests `<name>::local` and `<name>::s3`: the asset suite holds on both.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test]
                async fn local() {
                    super::$name($crate::helpers::Backend::Local).await
                }

                #[tokio::test]
                async fn s3() {
                    super::$name($crate::helpers::Backend::S3).await
                }
            }
        )*
    };
}

/// `VmRSS` of a process, in KiB (for the tests that hold a transfer's memory flat).
pub fn vm_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

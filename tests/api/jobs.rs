//! Jobs and imports (EVENTS.md "Jobs", API.md "Jobs"), against the real RabbitMQ and a
//! local HTTP source written here: it can be slow, fail N times then succeed, lie about
//! its length, redirect, answer 404. Each test runs the relay, the workers and the
//! scheduler of its own `TestApp` on AMQP names of its own.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use assetd::config::JobsConfig;
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::helpers::{amqp_url, serve_config, sha256_hex, BrokerProxy, TestApp, TestOptions};

/// Byte `i` of every source file (so the test can hash what it expects).
fn byte_at(i: u64) -> u8 {
    (i.wrapping_mul(31) ^ (i >> 9)) as u8
}

fn sha_of(len: u64) -> String {
    let mut hasher = Sha256::new();
    let chunk: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut chunk = chunk;
    let mut i = 0;
    while i < len {
        chunk.clear();
        let end = (i + 64 * 1024).min(len);
        chunk.extend((i..end).map(byte_at));
        hasher.update(&chunk);
        i = end;
    }
    hex::encode(hasher.finalize())
}

/// A source of files on 127.0.0.1. Paths:
/// `/data/<len>` the file; `/slow/<len>` 64 KiB every 100 ms; `/flaky/<key>/<fails>/<len>`
/// 503 `fails` times per key, then the file; `/missing` 404; `/short/<len>` announces
/// `len` and sends half; `/redirect?to=<url>` 302.
struct Source {
    addr: SocketAddr,
    requests: Arc<Mutex<HashMap<String, usize>>>,
}

impl Source {
    async fn start() -> Self {
        use hyper::service::{make_service_fn, service_fn};
        use hyper::{Body, Response};
        let requests: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let counts = requests.clone();
        let make = make_service_fn(move |_| {
            let counts = counts.clone();
            async move {
                Ok::<_, Infallible>(service_fn(move |request: hyper::Request<Body>| {
                    let counts = counts.clone();
                    async move {
                        let path = request.uri().path().to_owned();
                        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
                        let file = |len: u64, delay: Option<Duration>| {
                            let chunks = futures::stream::unfold(0u64, move |at| async move {
                                if at >= len {
                                    return None;
                                }
                                if let Some(delay) = delay {
                                    tokio::time::sleep(delay).await;
                                }
                                let end = (at + 64 * 1024).min(len);
                                let bytes: Vec<u8> = (at..end).map(byte_at).collect();
                                Some((Ok::<_, std::io::Error>(bytes), end))
                            });
                            Response::builder()
                                .header("content-length", len)
                                .header("content-type", "application/x-test")
                                .body(Body::wrap_stream(chunks))
                                .unwrap()
                        };
                        let response = match parts[..] {
                            ["data", len] => file(len.parse().unwrap(), None),
                            ["slow", len] => file(len.parse().unwrap(), Some(Duration::from_millis(100))),
                            ["flaky", key, fails, len] => {
                                let seen = {
                                    let mut counts = counts.lock().unwrap();
                                    let seen = counts.entry(key.to_owned()).or_insert(0);
                                    *seen += 1;
                                    *seen
                                };
                                if seen <= fails.parse().unwrap() {
                                    Response::builder().status(503).body(Body::from("try later")).unwrap()
                                } else {
                                    file(len.parse().unwrap(), None)
                                }
                            }
                            ["short", len] => {
                                let len: u64 = len.parse().unwrap();
                                let half: Vec<u8> = (0..len / 2).map(byte_at).collect();
                                let stream = futures::stream::iter(vec![Ok::<_, std::io::Error>(half)]);
                                Response::builder()
                                    .header("content-length", len)
                                    .body(Body::wrap_stream(stream))
                                    .unwrap()
                            }
                            ["redirect"] => {
                                let to = request.uri().query().unwrap_or("").trim_start_matches("to=").to_owned();
                                let to = percent_encoding::percent_decode_str(&to).decode_utf8_lossy().into_owned();
                                Response::builder().status(302).header("location", to).body(Body::empty()).unwrap()
                            }
                            _ => Response::builder().status(404).body(Body::from("no such file")).unwrap(),
                        };
                        Ok::<_, Infallible>(response)
                    }
                }))
            }
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(hyper::Server::from_tcp(listener).unwrap().serve(make));
        Self { addr, requests }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.addr.port())
    }

    fn requests(&self, key: &str) -> usize {
        self.requests.lock().unwrap().get(key).copied().unwrap_or(0)
    }
}

/// Reads a request's head, up to its blank line, byte by byte (the hand-written sources
/// answer nothing else); `None` if the connection ends first.
async fn read_request_head(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await.unwrap_or(0) == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// A source that writes its answers by hand, as a broken or lying server would (hyper
/// will not send more than the length it announced). Paths: `/long/<len>` announces
/// `len` bytes and sends twice as many at once; `/late/<len>` sends `len`, then 50 ms
/// later the rest; `/exact/<len>` sends `len` and keeps the connection open a second;
/// `/stall/<len>` sends half and then nothing for a minute; `/reset/<len>` sends `len`,
/// then resets the connection; `/partial` answers 206, `/nocontent` 204, `/doubled` two
/// Content-Lengths, `/badlocation` a redirect whose Location is not ASCII, `/leak` a
/// redirect to a private address with credentials and a token in it.
struct RawSource {
    addr: SocketAddr,
}

impl RawSource {
    async fn start() -> Self {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else { return };
                tokio::spawn(async move {
                    let Some(head) = read_request_head(&mut stream).await else { return };
                    let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
                    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
                    let (kind, len): (&str, u64) = (parts[0], parts.get(1).and_then(|l| l.parse().ok()).unwrap_or(0));
                    let announced =
                        format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nContent-Type: application/x-test\r\n\r\n");
                    let bytes: Vec<u8> = (0..2 * len).map(byte_at).collect();
                    // Answers that are wrong in their head, written whole.
                    let whole = match kind {
                        "partial" => Some("HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-2/100\r\nContent-Length: 3\r\n\r\nabc"),
                        "doubled" => Some("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"),
                        "badlocation" => Some("HTTP/1.1 302 Found\r\nLocation: http://h\u{e9}.example/\r\nContent-Length: 0\r\n\r\n"),
                        "nocontent" => Some("HTTP/1.1 204 No Content\r\n\r\n"),
                        "leak" => Some("HTTP/1.1 302 Found\r\nLocation: http://u:PASSWORD@10.0.0.1/x?token=SUPERSECRET\r\nContent-Length: 0\r\n\r\n"),
                        _ => None,
                    };
                    if let Some(whole) = whole {
                        let _ = stream.write_all(whole.as_bytes()).await;
                        let _ = stream.shutdown().await;
                        return;
                    }
                    let _ = stream.write_all(announced.as_bytes()).await;
                    match kind {
                        "long" => {
                            let _ = stream.write_all(&bytes).await;
                        }
                        "stall" => {
                            let _ = stream.write_all(&bytes[..len as usize / 2]).await;
                            tokio::time::sleep(Duration::from_secs(60)).await;
                        }
                        "reset" => {
                            // All of it, then a reset rather than a clean close.
                            let _ = stream.write_all(&bytes[..len as usize]).await;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            let _ = stream.set_zero_linger();
                            drop(stream);
                            return;
                        }
                        "late" => {
                            let _ = stream.write_all(&bytes[..len as usize]).await;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            let _ = stream.write_all(&bytes[len as usize..]).await;
                        }
                        _ => {
                            let _ = stream.write_all(&bytes[..len as usize]).await;
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                    let _ = stream.shutdown().await;
                });
            }
        });
        Self { addr }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.addr.port())
    }
}

/// A `TestApp` with its relay, command consumer, workers and scheduler running.
pub(crate) struct Jobs {
    pub(crate) app: TestApp,
    pub(crate) config: assetd::config::ServeConfig,
    pub(crate) shutdown: assetd::shutdown::Shutdown,
    pub(crate) service: String,
}

pub(crate) fn quick_jobs(allowlist: &str) -> JobsConfig {
    JobsConfig {
        import_allowlist: allowlist.into(),
        import_max_attempts: 3,
        retry_base_ms: 500,
        retry_max_ms: 2_000,
        lease_seconds: 3,
        ..Default::default()
    }
}

impl Jobs {
    pub(crate) async fn start(jobs: JobsConfig) -> Self {
        Self::start_with(jobs, TestOptions::default(), true, None).await
    }

    pub(crate) async fn start_with(
        jobs: JobsConfig,
        options: TestOptions,
        workers: bool,
        amqp: Option<String>,
    ) -> Self {
        let options = TestOptions { jobs: Some(JobsConfig { workers, ..jobs }), ..options };
        let app = TestApp::spawn_with(options.clone()).await;
        let mut config = serve_config(&app.db.url, app.data_dir.path(), &options);
        config.relay = true;
        config.commands = true;
        if let Some(amqp) = amqp {
            config.amqp_url = amqp;
        }
        let shutdown = assetd::shutdown::Shutdown::new();
        assetd::cli::start_background(&app.ctx.app, &config, &shutdown, assetd::cli::Role::Serve).unwrap();
        let service = app.service_token();
        app.put_session(&service, 1, &json!({"session_name": "imports"})).await;
        Self { app, config, shutdown, service }
    }

    pub(crate) async fn import(&self, body: Value) -> Value {
        let response = self.app.post_json(&self.service, "/api/imports", &body).await;
        assert_eq!(response.status(), 202, "{:?}", response.text().await);
        response.json().await.unwrap()
    }

    fn body(&self, url: &str) -> Value {
        json!({"id_session": 1, "url": url, "asset_name": "imported", "id_user": Uuid::new_v4()})
    }

    pub(crate) async fn job(&self, uuid: &str) -> Value {
        self.app.get(&self.service, &format!("/api/jobs/{uuid}")).await.json().await.unwrap()
    }

    /// Polls the job until `status`, for at most `seconds`.
    pub(crate) async fn until(&self, uuid: &str, status: &str, seconds: u64) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
        loop {
            let job = self.job(uuid).await;
            if job["status"] == status {
                return job;
            }
            assert!(tokio::time::Instant::now() < deadline, "job never {status}: {job}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub(crate) async fn events_of(&self, stream: &str) -> Vec<String> {
        let client = self.app.ctx.app.pool.get().await.unwrap();
        client
            .query("SELECT type FROM events WHERE stream = $1 ORDER BY version", &[&stream])
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect()
    }

    /// Nothing left of a failed import: no asset, no blob, no temporary file.
    async fn nothing_left(&self) {
        assert_eq!(self.app.scalar("SELECT count(*) FROM assets").await, 0);
        assert_eq!(TestApp::files_under(&self.app.data_dir.path().join("blobs")), 0, "no blob");
        assert_eq!(TestApp::files_under(&self.app.tmp_dir()), 0, "no temporary file");
    }

    pub(crate) async fn stop(self) {
        self.shutdown.finish(Duration::from_secs(10)).await;
        delete_queues(&self.config.amqp_prefix).await;
    }
}

async fn delete_queues(prefix: &str) {
    let Ok(connection) = Connection::connect(&amqp_url(), ConnectionProperties::default()).await else { return };
    let channel = connection.create_channel().await.unwrap();
    let mut queues = vec![
        format!("{prefix}.jobs"),
        format!("{prefix}.jobs.dead"),
        format!("{prefix}.commands"),
        format!("{prefix}.commands.dead"),
    ];
    queues.extend(assetd::jobs::topology::RETRY_STEPS.iter().map(|s| assetd::jobs::topology::retry_queue(prefix, *s)));
    for queue in queues {
        let _ = channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await;
    }
    for exchange in [format!("{prefix}.events"), format!("{prefix}.commands")] {
        let _ = channel.exchange_delete(exchange.as_str().into(), Default::default()).await;
    }
    let _ = connection.close(200, "done".into()).await;
}

#[tokio::test]
async fn a_256_mib_import_streams_into_an_asset_with_the_sources_sha256() {
    let source = Source::start().await;
    let jobs = Jobs::start(quick_jobs("127.0.0.1")).await;
    let len: u64 = 256 << 20;
    let expected = sha_of(len);
    let mut body = jobs.body(&source.url(&format!("/data/{len}?token=secret")));
    body["sha256"] = json!(expected);
    let accepted = jobs.import(body).await;
    let uuid = accepted["job_uuid"].as_str().unwrap().to_owned();
    assert!(accepted["status_url"].as_str().unwrap().ends_with(&format!("/file/api/jobs/{uuid}")));
    let job = jobs.until(&uuid, "succeeded", 120).await;
    assert_eq!(job["kind"], "import");
    assert_eq!(job["attempts"], 1);
    assert_eq!(job["progress"]["total"], len);
    let asset_uuid = job["result"]["asset_uuid"].as_str().unwrap();
    assert_eq!(job["result"]["asset_sha256"], expected);
    let info: Value =
        jobs.app.get(&jobs.service, &format!("/api/assets/infos?asset_uuid={asset_uuid}")).await.json().await.unwrap();
    assert_eq!(info["asset_sha256"], expected);
    assert_eq!(info["asset_source"], "import");
    assert_eq!(info["asset_file_size"], len);
    assert_eq!(info["asset_type"], "application/x-test", "the response's Content-Type when none was asked for");
    // The bytes come back as the source had them.
    let download = jobs
        .app
        .client
        .get(job["result"]["asset_url"].as_str().unwrap())
        .header("authorization", format!("Bearer {}", jobs.service))
        .send()
        .await
        .unwrap();
    assert_eq!(download.status(), 200);
    let mut hasher = Sha256::new();
    let mut stream = download.bytes_stream();
    while let Some(chunk) = stream.next().await {
        hasher.update(chunk.unwrap());
    }
    assert_eq!(hex::encode(hasher.finalize()), expected);
    // The event says where from, without the query's secret.
    let client = jobs.app.ctx.app.pool.get().await.unwrap();
    let imported: Value =
        client.query_one("SELECT data FROM events WHERE type = 'AssetImported'", &[]).await.unwrap().get(0);
    assert!(imported["source_url"].as_str().unwrap().ends_with(&format!("/data/{len}?token=REDACTED")), "{imported}");
    assert_eq!(imported["job_uuid"], uuid);
    // Progress is recorded at most once a second.
    let beats: Vec<chrono::DateTime<chrono::Utc>> = client
        .query("SELECT recorded_at FROM events WHERE type = 'JobProgressed' ORDER BY position", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    for pair in beats.windows(2) {
        assert!(pair[1] - pair[0] >= chrono::Duration::milliseconds(900), "{beats:?}");
    }
    jobs.stop().await;
}

#[tokio::test]
async fn a_source_failing_twice_succeeds_on_attempt_3_with_retries_recorded_between() {
    let source = Source::start().await;
    let jobs = Jobs::start(quick_jobs("127.0.0.1")).await;
    let key = Uuid::new_v4().simple().to_string();
    let uuid = jobs.import(jobs.body(&source.url(&format!("/flaky/{key}/2/1000")))).await["job_uuid"]
        .as_str()
        .unwrap()
        .to_owned();
    let job = jobs.until(&uuid, "succeeded", 60).await;
    assert_eq!(job["attempts"], 3);
    assert_eq!(job["error"], Value::Null, "a succeeded job has no error left: {job}");
    assert_eq!(job["progress"], json!({"done": 1000, "total": 1000}), "{job}");
    assert_eq!(source.requests(&key), 3);
    assert_eq!(
        jobs.events_of(&format!("job-{uuid}")).await.into_iter().filter(|t| t != "JobProgressed").collect::<Vec<_>>(),
        [
            "JobQueued",
            "JobStarted",
            "JobRetryScheduled",
            "JobStarted",
            "JobRetryScheduled",
            "JobStarted",
            "JobSucceeded"
        ]
    );
    assert_eq!(jobs.app.scalar("SELECT count(*) FROM assets").await, 1);
    jobs.stop().await;
}

#[tokio::test]
async fn failing_sources_fail_after_their_attempts_with_a_copy_in_the_dead_queue_and_nothing_left() {
    let source = Source::start().await;
    let jobs = Jobs::start(quick_jobs("127.0.0.1")).await;
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let dead = format!("{}.jobs.dead", jobs.config.amqp_prefix);
    channel
        .queue_declare(
            dead.as_str().into(),
            QueueDeclareOptions { durable: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut consumer = channel
        .basic_consume(
            dead.as_str().into(),
            "test".into(),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap();
    // A 404 will not pass: failed at the first attempt. A source that keeps failing
    // with 503: failed once the configured attempts (3) are spent, with the last error.
    let key = Uuid::new_v4().simple().to_string();
    for (path, attempts, error) in [("/missing".to_owned(), 1, "404"), (format!("/flaky/{key}/100/10"), 3, "503")] {
        let uuid = jobs.import(jobs.body(&source.url(&path))).await["job_uuid"].as_str().unwrap().to_owned();
        let job = jobs.until(&uuid, "failed", 60).await;
        assert_eq!(job["attempts"], attempts, "{job}");
        assert!(job["error"].as_str().unwrap().contains(error), "{job}");
        let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("a dead letter")
            .unwrap()
            .unwrap();
        let message: Value = serde_json::from_slice(&delivery.data).unwrap();
        assert_eq!(message["event_type"], "JobFailed");
        assert_eq!(message["data"]["job_uuid"], uuid);
        assert_eq!(message["data"]["retryable"], attempts > 1);
        crate::helpers::assert_event_conforms(&message);
        jobs.nothing_left().await;
    }
    assert_eq!(source.requests(&key), 3);
    let _ = connection.close(200, "done".into()).await;
    jobs.stop().await;
}

#[tokio::test]
async fn bad_sources_fail_and_leave_nothing_behind() {
    let source = Source::start().await;
    let options = TestOptions { max_upload_size: Some(10_000), ..Default::default() };
    let jobs =
        Jobs::start_with(JobsConfig { import_max_attempts: 2, ..quick_jobs("127.0.0.1") }, options, true, None).await;
    let mut mismatch = jobs.body(&source.url("/data/1000"));
    mismatch["sha256"] = json!("0".repeat(64));
    let cases = [
        (mismatch, "SHA-256"),
        (jobs.body(&source.url("/data/20000")), "upload limit"),
        (jobs.body(&source.url("/short/4000")), ""),
    ];
    for (body, reason) in cases {
        let uuid = jobs.import(body).await["job_uuid"].as_str().unwrap().to_owned();
        let job = jobs.until(&uuid, "failed", 30).await;
        assert!(job["error"].as_str().unwrap().contains(reason), "{job}");
        jobs.nothing_left().await;
    }
    jobs.stop().await;
}

#[tokio::test]
async fn a_source_longer_than_it_announced_or_stalling_fails_and_leaves_nothing_behind() {
    let source = RawSource::start().await;
    let jobs = Jobs::start(JobsConfig { import_max_attempts: 2, ..quick_jobs("127.0.0.1") }).await;
    for path in ["/long/4000", "/late/4000", "/long/300000"] {
        let uuid = jobs.import(jobs.body(&source.url(path))).await["job_uuid"].as_str().unwrap().to_owned();
        let job = jobs.until(&uuid, "failed", 30).await;
        assert!(job["error"].as_str().unwrap().contains("bytes it announced"), "{path}: {job}");
        assert_eq!(job["attempts"], 1, "a lying source is not asked again: {job}");
        jobs.nothing_left().await;
    }
    // Answers that are not the whole file, or not readable HTTP, fail at once; a
    // refused redirect's URL is shown without its secrets.
    let cases = [
        ("/partial", "206"),
        ("/nocontent", "204"),
        ("/doubled", "content-length"),
        ("/badlocation", "not visible ascii"),
        ("/leak", "redirected to"),
    ];
    for (path, reason) in cases {
        let uuid = jobs.import(jobs.body(&source.url(path))).await["job_uuid"].as_str().unwrap().to_owned();
        let job = jobs.until(&uuid, "failed", 30).await;
        let error = job["error"].as_str().unwrap();
        assert!(error.to_ascii_lowercase().contains(reason), "{path}: {job}");
        assert_eq!(job["attempts"], 1, "{path}: {job}");
        assert!(!error.contains("SUPERSECRET") && !error.contains("PASSWORD"), "{error}");
        jobs.nothing_left().await;
    }
    assert_eq!(jobs.app.scalar("SELECT count(*) FROM events WHERE data::text LIKE '%SUPERSECRET%'").await, 0);
    jobs.stop().await;
    // A source that stops sending: the read timeout.
    let jobs =
        Jobs::start(JobsConfig { import_max_attempts: 1, import_read_timeout: 1, ..quick_jobs("127.0.0.1") }).await;
    let uuid = jobs.import(jobs.body(&source.url("/stall/100000"))).await["job_uuid"].as_str().unwrap().to_owned();
    let job = jobs.until(&uuid, "failed", 30).await;
    assert!(job["error"].as_str().unwrap().contains("sent nothing for 1 s"), "{job}");
    jobs.nothing_left().await;
    // A source that sends exactly what it announced and then keeps its connection open,
    // or resets it, is not taken for a liar, nor waited for.
    for path in ["/exact/4000", "/reset/4000"] {
        let uuid = jobs.import(jobs.body(&source.url(path))).await["job_uuid"].as_str().unwrap().to_owned();
        let job = jobs.until(&uuid, "succeeded", 30).await;
        let asset = job["result"]["asset_uuid"].as_str().unwrap();
        let download = jobs.app.get(&jobs.service, &format!("/api/assets?asset_uuid={asset}")).await;
        assert_eq!(download.bytes().await.unwrap().to_vec(), (0..4000).map(byte_at).collect::<Vec<u8>>(), "{path}");
    }
    jobs.stop().await;
}

#[tokio::test]
async fn private_addresses_are_refused_unless_allow_listed_and_at_every_redirect() {
    let source = Source::start().await;
    // Without the allow-list, the source on 127.0.0.1 is refused.
    let closed = Jobs::start(quick_jobs("")).await;
    let uuid = closed.import(closed.body(&source.url("/data/100"))).await["job_uuid"].as_str().unwrap().to_owned();
    let job = closed.until(&uuid, "failed", 30).await;
    assert!(job["error"].as_str().unwrap().contains("not a public address"), "{job}");
    assert_eq!(job["attempts"], 1, "a refusal is not retried");
    closed.nothing_left().await;
    closed.stop().await;

    // Allowed by name, the source may not redirect to an address that is not.
    let jobs = Jobs::start(quick_jobs("localhost")).await;
    let by_name = format!("http://localhost:{}", source.addr.port());
    let ok = jobs.import(jobs.body(&format!("{by_name}/data/100"))).await["job_uuid"].as_str().unwrap().to_owned();
    jobs.until(&ok, "succeeded", 30).await;
    let target = source.url("/data/100");
    let redirect = format!(
        "{by_name}/redirect?to={}",
        percent_encoding::utf8_percent_encode(&target, percent_encoding::NON_ALPHANUMERIC)
    );
    let uuid = jobs.import(jobs.body(&redirect)).await["job_uuid"].as_str().unwrap().to_owned();
    let job = jobs.until(&uuid, "failed", 30).await;
    assert!(job["error"].as_str().unwrap().contains("redirected to"), "{job}");
    // Not http(s): refused at the request.
    let response = jobs.app.post_json(&jobs.service, "/api/imports", &jobs.body("file:///etc/passwd")).await;
    crate::helpers::assert_error(response, 422, "invalid_field").await;
    jobs.stop().await;
}

#[tokio::test]
async fn a_cancelled_import_stops_within_a_second_and_leaves_nothing_behind() {
    let source = Source::start().await;
    let jobs = Jobs::start(quick_jobs("127.0.0.1")).await;
    let uuid = jobs.import(jobs.body(&source.url("/slow/100000000"))).await["job_uuid"].as_str().unwrap().to_owned();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while jobs.job(&uuid).await["progress"]["done"].as_u64().unwrap_or(0) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the import never made progress");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cancelled = jobs.app.delete(&jobs.service, &format!("/api/jobs/{uuid}")).await;
    assert_eq!(cancelled.status(), 200);
    assert_eq!(cancelled.json::<Value>().await.unwrap()["status"], "cancelled");
    // The worker lets go within a second or so: no temporary file, no blob, no asset.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while TestApp::files_under(&jobs.app.tmp_dir()) > 0 {
        assert!(tokio::time::Instant::now() < deadline, "the cancelled import still writes");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let done = jobs.job(&uuid).await["progress"]["done"].clone();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(jobs.job(&uuid).await["progress"]["done"], done, "no progress after the cancel");
    jobs.nothing_left().await;
    assert_eq!(jobs.job(&uuid).await["status"], "cancelled");
    // Deleting a session cancels its unfinished jobs.
    let other = jobs.import(jobs.body(&source.url("/slow/100000000"))).await["job_uuid"].as_str().unwrap().to_owned();
    let deleted = jobs.app.delete(&jobs.service, "/api/sessions/1").await;
    assert_eq!(deleted.status(), 202);
    let client = jobs.app.ctx.app.pool.get().await.unwrap();
    let status: String = client
        .query_one("SELECT status FROM jobs WHERE job_uuid = $1", &[&other.parse::<Uuid>().unwrap()])
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "cancelled");
    // A finished job cannot be cancelled; an unknown one is not found.
    let again = jobs.app.delete(&jobs.service, &format!("/api/jobs/{uuid}")).await;
    assert_eq!(again.status(), 200, "cancelling a cancelled job changes nothing");
    let unknown = jobs.app.delete(&jobs.service, &format!("/api/jobs/{}", Uuid::new_v4())).await;
    crate::helpers::assert_error(unknown, 404, "not_found").await;
    jobs.stop().await;
}

#[tokio::test]
async fn idempotency_keys_give_the_same_job_and_refuse_another_body() {
    let source = Source::start().await;
    let jobs = Jobs::start(quick_jobs("127.0.0.1")).await;
    let body = jobs.body(&source.url("/data/100"));
    let send = |body: Value, key: &'static str| {
        let request = jobs
            .app
            .client
            .post(jobs.app.url("/api/imports"))
            .header("authorization", format!("Bearer {}", jobs.service))
            .header("idempotency-key", key)
            .json(&body);
        async move { request.send().await.unwrap() }
    };
    let twice = jobs
        .app
        .client
        .post(jobs.app.url("/api/imports"))
        .header("authorization", format!("Bearer {}", jobs.service))
        .header("idempotency-key", "k-1")
        .header("idempotency-key", "k-2")
        .json(&body)
        .send()
        .await
        .unwrap();
    crate::helpers::assert_error(twice, 400, "invalid_header").await;
    let mut misspelt = body.clone();
    misspelt["sha265"] = json!("0".repeat(64));
    let refused = jobs.app.post_json(&jobs.service, "/api/imports", &misspelt).await;
    assert_eq!(refused.status(), 422, "an unknown field is refused, not ignored");
    let port_zero = jobs.body("http://127.0.0.1:0/x");
    crate::helpers::assert_error(
        jobs.app.post_json(&jobs.service, "/api/imports", &port_zero).await,
        422,
        "invalid_field",
    )
    .await;
    assert_eq!(jobs.app.scalar("SELECT count(*) FROM jobs").await, 0);
    let first: Value = send(body.clone(), "k-1").await.json().await.unwrap();
    let again = send(body.clone(), "k-1").await;
    assert_eq!(again.status(), 202);
    assert_eq!(again.json::<Value>().await.unwrap()["job_uuid"], first["job_uuid"]);
    let mut other = body.clone();
    other["asset_name"] = json!("other");
    crate::helpers::assert_error(send(other, "k-1").await, 409, "conflict").await;
    let uuid = first["job_uuid"].as_str().unwrap();
    jobs.until(uuid, "succeeded", 30).await;
    assert_eq!(jobs.app.scalar("SELECT count(*) FROM jobs").await, 1);
    assert_eq!(jobs.app.scalar("SELECT count(*) FROM assets").await, 1);
    // Listed with the session's jobs, newest first, paged.
    let second = jobs.import(jobs.body(&source.url("/data/10"))).await;
    let page: Value = jobs.app.get(&jobs.service, "/api/sessions/1/jobs?limit=1").await.json().await.unwrap();
    assert_eq!(page["jobs"][0]["job_uuid"], second["job_uuid"]);
    let cursor = page["next_cursor"].as_str().unwrap();
    let next: Value = jobs
        .app
        .get(&jobs.service, &format!("/api/sessions/1/jobs?limit=1&cursor={cursor}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(next["jobs"][0]["job_uuid"], first["job_uuid"]);
    assert!(next["next_cursor"].is_null());
    // Members of the session see its jobs; others do not.
    let stranger = jobs.app.user_token(Uuid::new_v4());
    crate::helpers::assert_error(jobs.app.get(&stranger, &format!("/api/jobs/{uuid}")).await, 403, "forbidden").await;
    jobs.stop().await;
}

#[tokio::test]
async fn the_same_job_delivered_twice_and_raced_by_two_workers_makes_one_asset() {
    let source = Source::start().await;
    let jobs = Jobs::start(quick_jobs("127.0.0.1")).await;
    // A second worker (another process's, as far as the broker can tell) on the same queue.
    let mut second = jobs.config.clone();
    second.relay = false;
    second.commands = false;
    let other = assetd::shutdown::Shutdown::new();
    assetd::cli::start_background(&jobs.app.ctx.app, &second, &other, assetd::cli::Role::Worker).unwrap();
    let uuid = jobs.import(jobs.body(&source.url("/slow/1000000"))).await["job_uuid"].as_str().unwrap().to_owned();
    // The same message again, twice, straight to the job queue.
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let body = json!({"event_type": "JobQueued", "data": {"job_uuid": uuid}}).to_string();
    for _ in 0..2 {
        channel
            .basic_publish(
                "".into(),
                format!("{}.jobs", jobs.config.amqp_prefix).as_str().into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    jobs.until(&uuid, "succeeded", 60).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(jobs.app.scalar("SELECT count(*) FROM assets").await, 1);
    assert_eq!(jobs.app.scalar("SELECT count(*) FROM events WHERE type = 'AssetImported'").await, 1);
    assert_eq!(jobs.app.scalar("SELECT count(*) FROM events WHERE type = 'JobStarted'").await, 1);
    let _ = connection.close(200, "done".into()).await;
    other.finish(Duration::from_secs(10)).await;
    jobs.stop().await;
}

#[tokio::test]
async fn a_short_retry_is_not_held_back_by_a_long_one_queued_before_it() {
    let prefix = format!("assetd_test_{}", Uuid::new_v4().simple());
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    assetd::jobs::topology::declare(&channel, &prefix).await.unwrap();
    let send = |step: u64, name: &'static str| {
        let channel = channel.clone();
        let queue = assetd::jobs::topology::retry_queue(&prefix, step);
        async move {
            channel
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    name.as_bytes(),
                    BasicProperties::default(),
                )
                .await
                .unwrap()
                .await
                .unwrap();
        }
    };
    // 60 s is made of the 32 s step first; 1 s of the 1 s step.
    let long = assetd::jobs::topology::step_for(Duration::from_secs(60)).unwrap();
    send(long, "long").await;
    send(1, "short").await;
    let started = tokio::time::Instant::now();
    let mut consumer = channel
        .basic_consume(
            format!("{prefix}.jobs").as_str().into(),
            "test".into(),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("the short retry")
        .unwrap()
        .unwrap();
    assert_eq!(delivery.data, b"short");
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    let _ = connection.close(200, "done".into()).await;
    delete_queues(&prefix).await;
}

#[tokio::test]
async fn imports_asked_for_while_the_broker_is_down_run_when_it_is_back() {
    let source = Source::start().await;
    let proxy = BrokerProxy::start().await;
    proxy.cut();
    let jobs = Jobs::start_with(quick_jobs("127.0.0.1"), TestOptions::default(), true, Some(proxy.url())).await;
    let mut uuids = vec![];
    for _ in 0..3 {
        uuids.push(jobs.import(jobs.body(&source.url("/data/5000"))).await["job_uuid"].as_str().unwrap().to_owned());
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(jobs.job(&uuids[0]).await["status"], "queued");
    proxy.restore();
    for uuid in &uuids {
        jobs.until(uuid, "succeeded", 60).await;
    }
    assert_eq!(jobs.app.scalar("SELECT count(*) FROM assets").await, 3);
    jobs.stop().await;
}

#[tokio::test]
async fn import_request_over_amqp_replies_with_the_job() {
    let source = Source::start().await;
    let jobs = Jobs::start(quick_jobs("127.0.0.1")).await;
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let reply_queue = channel
        .queue_declare("".into(), QueueDeclareOptions { exclusive: true, ..Default::default() }, FieldTable::default())
        .await
        .unwrap();
    let mut replies = channel
        .basic_consume(
            reply_queue.name().as_str().into(),
            "replies".into(),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap();
    // The consumer declares the commands exchange: wait for it (and for the workers).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let up = assetd::app::ComponentState::Up;
    while jobs.app.ctx.app.messaging.commands() != up || jobs.app.ctx.app.messaging.workers() != up {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ready: Value = jobs.app.get("", "/ready").await.json().await.unwrap();
    assert_eq!(ready["checks"]["workers"], "up", "{ready}");
    let body = jobs.body(&source.url("/data/777"));
    // Sends `body` as `import.request` with a message id (its correlation id alike).
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
                    "import.request".into(),
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
    send(body.clone(), "import-1").await;
    let reply = tokio::time::timeout(Duration::from_secs(10), replies.next()).await.expect("a reply").unwrap().unwrap();
    assert_eq!(reply.properties.correlation_id().as_ref().unwrap().as_str(), "corr-import-1");
    let reply: Value = serde_json::from_slice(&reply.data).unwrap();
    crate::helpers::assert_conforms("schemas/commands/import.request.reply.json", &reply);
    assert_eq!(reply["ok"], true, "{reply}");
    let uuid = reply["result"]["job_uuid"].as_str().unwrap().to_owned();
    jobs.until(&uuid, "succeeded", 30).await;
    // Sent again (the same message id): the same job, not a second import.
    send(body.clone(), "import-1").await;
    let again = tokio::time::timeout(Duration::from_secs(10), replies.next()).await.expect("a reply").unwrap().unwrap();
    let again: Value = serde_json::from_slice(&again.data).unwrap();
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["result"]["job_uuid"], uuid);
    assert_eq!(jobs.app.scalar("SELECT count(*) FROM jobs").await, 1);
    // An import that cannot be asked for as sent: refused in the reply (and dead-lettered).
    let bad = json!({"id_session": 1, "url": "ftp://example.org/x", "asset_name": "x", "id_user": Uuid::new_v4()});
    send(bad, "import-2").await;
    let refused =
        tokio::time::timeout(Duration::from_secs(10), replies.next()).await.expect("a reply").unwrap().unwrap();
    let refused: Value = serde_json::from_slice(&refused.data).unwrap();
    assert_eq!(refused["ok"], false, "{refused}");
    assert!(refused["error"].as_str().unwrap().contains("url"), "{refused}");
    // Over the 1 MiB that HTTP takes, or with a field it does not know: refused too.
    let mut huge =
        json!({"id_session": 1, "url": "http://example.org/x", "asset_name": "x", "id_user": Uuid::new_v4()});
    huge["metadata"] = json!({"x": "a".repeat(2 << 20)});
    let mut unknown =
        json!({"id_session": 1, "url": "http://example.org/x", "asset_name": "x", "id_user": Uuid::new_v4()});
    unknown["sha265"] = json!("misspelt");
    for (body, message_id) in [(huge, "import-3"), (unknown, "import-4")] {
        send(body, message_id).await;
        let refused =
            tokio::time::timeout(Duration::from_secs(10), replies.next()).await.expect("a reply").unwrap().unwrap();
        let refused: Value = serde_json::from_slice(&refused.data).unwrap();
        assert_eq!(refused["ok"], false, "{refused}");
    }
    assert_eq!(jobs.app.scalar("SELECT count(*) FROM jobs").await, 1);
    let _ = connection.close(200, "done".into()).await;
    jobs.stop().await;
}

#[tokio::test]
async fn a_worker_killed_mid_import_is_replaced_and_the_job_finishes_once() {
    let source = Source::start().await;
    // This process relays and serves; the workers are separate processes.
    let jobs = Jobs::start_with(quick_jobs("127.0.0.1"), TestOptions::default(), false, None).await;
    let spawn_worker = || {
        let config = &jobs.config;
        tokio::process::Command::new(env!("CARGO_BIN_EXE_assetd"))
            .arg("worker")
            .env("ASSETD_DATABASE_URL", &config.database.database_url)
            .env("ASSETD_DATA_DIR", &config.data_dir)
            .env("ASSETD_JWT_SECRET", &config.jwt_secret)
            .env("ASSETD_URL_SIGNING_KEY", &config.url_signing_key)
            .env("ASSETD_AMQP_URL", &config.amqp_url)
            .env("ASSETD_AMQP_PREFIX", &config.amqp_prefix)
            .env("ASSETD_IMPORT_ALLOWLIST", "127.0.0.1")
            .env("ASSETD_JOB_LEASE_SECONDS", "2")
            .env("ASSETD_JOB_RETRY_BASE_MS", "200")
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };
    let mut first = spawn_worker();
    let uuid = jobs.import(jobs.body(&source.url("/slow/3000000"))).await["job_uuid"].as_str().unwrap().to_owned();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while jobs.job(&uuid).await["progress"]["done"].as_u64().unwrap_or(0) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the import never made progress");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    first.start_kill().unwrap(); // SIGKILL
    first.wait().await.unwrap();
    let _second = spawn_worker();
    let job = jobs.until(&uuid, "succeeded", 90).await;
    assert!(job["attempts"].as_i64().unwrap() >= 2, "{job}");
    assert_eq!(jobs.app.scalar("SELECT count(*) FROM assets").await, 1);
    assert_eq!(jobs.app.scalar("SELECT count(*) FROM events WHERE type = 'AssetImported'").await, 1);
    // The killed worker's temporary file is an orphan (no process holds it): swept.
    tokio::time::sleep(Duration::from_secs(3)).await;
    jobs.app.ctx.app.blobs.remove_orphan_temp_files().await.unwrap();
    assert_eq!(TestApp::files_under(&jobs.app.tmp_dir()), 0, "nothing of the killed attempt stays");
    // Replay rebuilds the jobs table exactly.
    let before = jobs.app.table_snapshot("jobs", "job_uuid").await;
    let mut client = jobs.app.ctx.app.pool.get().await.unwrap();
    assetd::projections::replay(&mut client).await.unwrap();
    assert_eq!(jobs.app.table_snapshot("jobs", "job_uuid").await, before);
    jobs.stop().await;
}

/// What a worker's commands carry: the system as actor.
pub(crate) fn system_ctx(job: Uuid) -> assetd::app::CommandContext {
    assetd::app::CommandContext {
        actor: assetd::domain::principal::Actor {
            kind: assetd::domain::principal::PrincipalKind::Service,
            uuid: Uuid::nil(),
        },
        request_id: job.to_string(),
        correlation_id: job.to_string(),
        message: None,
    }
}

/// `bytes` for the asset of `job`, complete and durable in a temporary file of `app`'s store.
async fn sealed(app: &assetd::app::App, job: Uuid, bytes: &[u8]) -> assetd::blobs::SealedBlob {
    let mut blob = app.blobs.create_temp(assetd::domain::job::asset_uuid_of(job));
    blob.write(bytes::Bytes::copy_from_slice(bytes)).await.unwrap();
    blob.seal().await.unwrap()
}

fn is_conflict(result: &Result<(), assetd::app::AppError>) -> bool {
    matches!(result, Err(assetd::app::AppError::Domain(assetd::domain::DomainError::Conflict(_))))
}

/// On S3: an import streams into a multipart object, completed only when the asset is
/// recorded; a stale attempt that ends later with other bytes is refused, the object
/// keeps the import's bytes, and the stale attempt's multipart upload is aborted.
#[tokio::test]
async fn an_import_on_s3_becomes_one_object_and_a_stale_attempt_cannot_replace_it() {
    let source = Source::start().await;
    let options = TestOptions { backend: crate::helpers::Backend::S3, ..Default::default() };
    let jobs = Jobs::start_with(quick_jobs("127.0.0.1"), options, true, None).await;
    let len: u64 = 12 << 20;
    let expected = sha_of(len);
    let mut body = jobs.body(&source.url(&format!("/data/{len}")));
    body["sha256"] = json!(expected);
    let uuid = jobs.import(body).await["job_uuid"].as_str().unwrap().to_owned();
    let job = jobs.until(&uuid, "succeeded", 120).await;
    let download_path = format!("/api/assets?asset_uuid={}", job["result"]["asset_uuid"].as_str().unwrap());
    let download = jobs.app.get(&jobs.service, &download_path).await;
    assert_eq!(sha256_hex(&download.bytes().await.unwrap()), expected);
    let bucket = jobs.app.bucket.as_ref().unwrap();
    assert_eq!(bucket.object_keys().await.len(), 1);
    assert_eq!(bucket.pending_multipart_uploads().await, vec![]);

    let app = &jobs.app.ctx.app;
    let job_uuid: Uuid = uuid.parse().unwrap();
    let loaded = app.load_job(job_uuid).await.unwrap();
    let stale = sealed(app, job_uuid, &vec![9u8; 6 << 20]).await;
    assert_eq!(bucket.pending_multipart_uploads().await.len(), 1, "the stale attempt's parts are up");
    let imported = loaded.imported_asset(&stale, None, None).unwrap();
    assert!(is_conflict(&app.import_succeeded(&system_ctx(job_uuid), job_uuid, 1, imported, Some(stale)).await));
    let download = jobs.app.get(&jobs.service, &download_path).await;
    assert_eq!(sha256_hex(&download.bytes().await.unwrap()), expected, "the asset keeps the import's bytes");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !bucket.pending_multipart_uploads().await.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "the stale attempt's multipart upload stays open");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(bucket.object_keys().await.len(), 1);
    jobs.stop().await;
}

#[tokio::test]
async fn a_stale_attempt_never_touches_the_asset_and_leftovers_go_with_jobs_that_end_without_one() {
    use assetd::domain::job::asset_uuid_of;
    // No workers: the test plays them, through the commands a worker runs.
    let jobs = Jobs::start_with(quick_jobs("127.0.0.1"), TestOptions::default(), false, None).await;
    let app = &jobs.app.ctx.app;
    let queue = || async {
        let accepted = jobs.import(jobs.body("http://127.0.0.1:9/never-fetched")).await;
        accepted["job_uuid"].as_str().unwrap().parse::<Uuid>().unwrap()
    };
    let leave_bytes = |job: Uuid, bytes: &[u8]| {
        let path = app.blobs.local().path(asset_uuid_of(job));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, bytes).unwrap();
        path
    };
    let now = chrono::Utc::now();
    let minute = chrono::Duration::seconds(60);

    // Attempt 1's worker stops reporting; the sweep schedules attempt 2, which starts
    // elsewhere, finding what a crashed attempt left under the asset's id.
    let job = queue().await;
    let ctx = system_ctx(job);
    app.start_job(&ctx, job, 1, "stale", now - chrono::Duration::seconds(1)).await.unwrap();
    app.expire_job_lease(&ctx, job, now).await.unwrap();
    app.start_job(&ctx, job, 2, "fresh", now + minute).await.unwrap();
    let path = leave_bytes(job, b"a crashed attempt's bytes");
    let loaded = app.load_job(job).await.unwrap();
    let fresh = sealed(app, job, b"attempt 2's bytes").await;
    let imported = loaded.imported_asset(&fresh, Some("fresh.bin"), None).unwrap();
    app.import_succeeded(&ctx, job, 2, imported, Some(fresh)).await.unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"attempt 2's bytes", "the leftover was replaced");
    // The stale attempt ends later, with other bytes: refused, and the asset keeps its own.
    let stale = sealed(app, job, b"attempt 1's late bytes").await;
    let imported = loaded.imported_asset(&stale, None, None).unwrap();
    assert!(is_conflict(&app.import_succeeded(&ctx, job, 1, imported, Some(stale)).await));
    app.discard_import_bytes(job).await;
    let asset = asset_uuid_of(job);
    let download = jobs.app.get(&jobs.service, &format!("/api/assets?asset_uuid={asset}")).await;
    assert_eq!(download.bytes().await.unwrap().as_ref(), b"attempt 2's bytes");
    assert_eq!(TestApp::files_under(&jobs.app.tmp_dir()), 0, "the stale attempt's file went with it");

    // A job cancelled after a crash between placing its bytes and recording the asset:
    // the bytes go.
    let job = queue().await;
    app.start_job(&system_ctx(job), job, 1, "w", now + minute).await.unwrap();
    let path = leave_bytes(job, b"left by a crash");
    assert_eq!(jobs.app.delete(&jobs.service, &format!("/api/jobs/{job}")).await.status(), 200);
    assert!(!path.exists(), "a cancelled job's leftover goes");

    // The same for a job that fails for good.
    let job = queue().await;
    app.start_job(&system_ctx(job), job, 1, "w", now + minute).await.unwrap();
    let path = leave_bytes(job, b"left by a crash");
    app.job_failed(&system_ctx(job), job, 1, "the source answered 404", false, now).await.unwrap();
    assert!(!path.exists(), "a failed job's leftover goes");
    assert_eq!(jobs.app.scalar("SELECT count(*) FROM assets").await, 1);
    jobs.stop().await;
}

#[tokio::test]
async fn deleting_a_session_while_its_imports_finish_never_fails_and_leaves_no_asset() {
    let jobs = Jobs::start_with(quick_jobs("127.0.0.1"), TestOptions::default(), false, None).await;
    let app = &jobs.app.ctx.app;
    let mut purges = Vec::new();
    for id in 100..116 {
        jobs.app.put_session(&jobs.service, id, &json!({"session_name": "doomed"})).await;
        let mut body = jobs.body("http://127.0.0.1:9/never-fetched");
        body["id_session"] = json!(id);
        let job: Uuid = jobs.import(body).await["job_uuid"].as_str().unwrap().parse().unwrap();
        let ctx = system_ctx(job);
        app.start_job(&ctx, job, 1, "w", chrono::Utc::now() + chrono::Duration::seconds(60)).await.unwrap();
        let loaded = app.load_job(job).await.unwrap();
        let bytes = sealed(app, job, format!("session {id}").as_bytes()).await;
        let imported = loaded.imported_asset(&bytes, None, None).unwrap();
        let session_path = format!("/api/sessions/{id}");
        let (finished, deleted) = tokio::join!(
            app.import_succeeded(&ctx, job, 1, imported, Some(bytes)),
            jobs.app.delete(&jobs.service, &session_path),
        );
        let status = deleted.status();
        let accepted: Value = deleted.json().await.unwrap();
        assert_eq!(status, 202, "{accepted}");
        purges.push((id, accepted["job_uuid"].as_str().unwrap().parse::<Uuid>().unwrap()));
        assert!(
            finished.is_ok()
                || is_conflict(&finished)
                || matches!(finished, Err(assetd::app::AppError::Domain(assetd::domain::DomainError::NotFound(_)))),
            "{finished:?}"
        );
    }
    for (id, purge) in purges {
        jobs.app.purge(id, purge).await;
    }
    assert_eq!(jobs.app.scalar("SELECT count(*) FROM assets WHERE asset_status = 'available'").await, 0);
    assert_eq!(TestApp::files_under(&jobs.app.data_dir.path().join("blobs")), 0, "no bytes stay");
    assert_eq!(TestApp::files_under(&jobs.app.tmp_dir()), 0);
    // An import asked for a deleted session is refused.
    let mut body = jobs.body("http://127.0.0.1:9/never-fetched");
    body["id_session"] = json!(100);
    let refused = jobs.app.post_json(&jobs.service, "/api/imports", &body).await;
    crate::helpers::assert_error(refused, 404, "not_found").await;
    jobs.stop().await;
}

#[tokio::test]
async fn a_shutdown_hands_the_running_attempt_back_without_using_it_up() {
    let source = Source::start().await;
    let jobs = Jobs::start(JobsConfig { import_max_attempts: 1, ..quick_jobs("127.0.0.1") }).await;
    let uuid = jobs.import(jobs.body(&source.url("/slow/2000000"))).await["job_uuid"].as_str().unwrap().to_owned();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while jobs.job(&uuid).await["progress"]["done"].as_u64().unwrap_or(0) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the import never made progress");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The process stops during the job's only attempt.
    jobs.shutdown.finish(Duration::from_secs(10)).await;
    let job = jobs.job(&uuid).await;
    assert_eq!(job["status"], "queued", "{job}");
    assert!(job["error"].as_str().unwrap().contains("shutdown"), "{job}");
    assert_eq!(jobs.app.scalar("SELECT count(*) FROM events WHERE type = 'JobFailed'").await, 0);
    assert_eq!(TestApp::files_under(&jobs.app.tmp_dir()), 0, "what it fetched went");
    // The next process runs it, as the same attempt.
    let again = assetd::shutdown::Shutdown::new();
    assetd::cli::start_background(&jobs.app.ctx.app, &jobs.config, &again, assetd::cli::Role::Serve).unwrap();
    let job = jobs.until(&uuid, "succeeded", 60).await;
    assert_eq!(job["attempts"], 1, "{job}");
    assert_eq!(jobs.app.scalar("SELECT count(*) FROM events WHERE type = 'AssetImported'").await, 1);
    again.finish(Duration::from_secs(10)).await;
    delete_queues(&jobs.config.amqp_prefix).await;
}

#[tokio::test]
async fn a_worker_that_lost_its_lease_stops_and_the_next_attempt_makes_the_one_asset() {
    let source = Source::start().await;
    let jobs = Jobs::start_with(quick_jobs("127.0.0.1"), TestOptions::default(), false, None).await;
    // A worker whose database connection the test can cut.
    let proxy = crate::helpers::DatabaseProxy::start().await;
    let mut stale_config = jobs.config.clone();
    stale_config.database.database_url = proxy.url(&jobs.app.db.name);
    stale_config.relay = false;
    stale_config.commands = false;
    stale_config.jobs.workers = true;
    let stale_ctx = assetd::cli::build_context(&stale_config).await.unwrap();
    let stale = assetd::shutdown::Shutdown::new();
    assetd::cli::start_background(&stale_ctx.app, &stale_config, &stale, assetd::cli::Role::Worker).unwrap();
    let len = 6_000_000u64;
    let uuid =
        jobs.import(jobs.body(&source.url(&format!("/slow/{len}")))).await["job_uuid"].as_str().unwrap().to_owned();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while jobs.job(&uuid).await["progress"]["done"].as_u64().unwrap_or(0) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the import never made progress");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Its worker loses the database: its lease runs out, and another worker (with the
    // lease sweep) runs attempt 2.
    proxy.cut();
    let mut fresh_config = jobs.config.clone();
    fresh_config.relay = false;
    fresh_config.commands = false;
    let fresh = assetd::shutdown::Shutdown::new();
    assetd::cli::start_background(&jobs.app.ctx.app, &fresh_config, &fresh, assetd::cli::Role::Worker).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let job = jobs.job(&uuid).await;
        if job["status"] == "running" && job["attempts"] == 2 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "attempt 2 never started: {job}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The database comes back while attempt 1 is still fetching: it sees that it is no
    // longer the job's attempt and stops, leaving attempt 2 alone.
    proxy.restore();
    let job = jobs.until(&uuid, "succeeded", 60).await;
    assert_eq!(job["attempts"], 2, "{job}");
    assert_eq!(jobs.app.scalar("SELECT count(*) FROM events WHERE type = 'AssetImported'").await, 1);
    let asset = job["result"]["asset_uuid"].as_str().unwrap();
    let download = jobs.app.get(&jobs.service, &format!("/api/assets?asset_uuid={asset}")).await;
    let bytes = download.bytes().await.unwrap();
    assert_eq!(hex::encode(Sha256::digest(&bytes)), sha_of(len));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while TestApp::files_under(&jobs.app.tmp_dir()) > 0 {
        assert!(tokio::time::Instant::now() < deadline, "the stale attempt never stopped");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stale.finish(Duration::from_secs(10)).await;
    fresh.finish(Duration::from_secs(10)).await;
    jobs.stop().await;
}

/// An HTTPS source on 127.0.0.1, its certificate signed by a CA of its own: any path
/// answers `len` bytes.
struct TlsSource {
    addr: SocketAddr,
    ca_pem: String,
}

impl TlsSource {
    async fn start(len: u64) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        use tokio::io::AsyncWriteExt;
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "assetd test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        let certificate = params.signed_by(&key, &ca, &ca_key).unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![certificate.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut stream) = acceptor.accept(tcp).await else { return };
                    if read_request_head(&mut stream).await.is_none() {
                        return;
                    }
                    let answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n");
                    let _ = stream.write_all(answer.as_bytes()).await;
                    let _ = stream.write_all(&(0..len).map(byte_at).collect::<Vec<u8>>()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        Self { addr, ca_pem: ca.pem() }
    }

    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.addr.port())
    }
}

#[tokio::test]
async fn https_sources_are_verified_and_a_configured_ca_is_trusted() {
    let len = 300_000;
    let source = TlsSource::start(len).await;
    // Its CA is no public one: refused, nothing left.
    let jobs = Jobs::start(JobsConfig { import_max_attempts: 1, ..quick_jobs("127.0.0.1") }).await;
    let uuid = jobs.import(jobs.body(&source.url("/report.bin"))).await["job_uuid"].as_str().unwrap().to_owned();
    let job = jobs.until(&uuid, "failed", 30).await;
    assert!(job["error"].as_str().unwrap().contains("certificate"), "{job}");
    jobs.nothing_left().await;
    jobs.stop().await;
    // With its CA in ASSETD_IMPORT_CA_FILE, the same import succeeds.
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &source.ca_pem).unwrap();
    let jobs = Jobs::start(JobsConfig { import_ca_file: Some(ca_file), ..quick_jobs("127.0.0.1") }).await;
    let uuid = jobs.import(jobs.body(&source.url("/report.bin"))).await["job_uuid"].as_str().unwrap().to_owned();
    let job = jobs.until(&uuid, "succeeded", 30).await;
    assert_eq!(job["result"]["asset_sha256"], sha_of(len));
    // By name too: the name is resolved (and checked), and is the one TLS verifies.
    let by_name = source.url("/report.bin").replace("127.0.0.1", "localhost");
    let uuid = jobs.import(jobs.body(&by_name)).await["job_uuid"].as_str().unwrap().to_owned();
    let job = jobs.until(&uuid, "succeeded", 30).await;
    assert_eq!(job["result"]["asset_sha256"], sha_of(len));
    jobs.stop().await;
}

#[tokio::test]
async fn at_most_five_redirects_are_followed() {
    let source = Source::start().await;
    let jobs = Jobs::start(JobsConfig { import_max_attempts: 1, ..quick_jobs("127.0.0.1") }).await;
    // `depth` redirects in a row, then the file; the first one relative.
    let chain = |depth: usize| {
        let mut url = source.url("/data/1000");
        for _ in 0..depth {
            let encoded = percent_encoding::utf8_percent_encode(&url, percent_encoding::NON_ALPHANUMERIC).to_string();
            url = source.url(&format!("/redirect?to={encoded}"));
        }
        url
    };
    let five = jobs.import(jobs.body(&chain(5))).await["job_uuid"].as_str().unwrap().to_owned();
    let job = jobs.until(&five, "succeeded", 30).await;
    assert_eq!(job["result"]["asset_sha256"], sha_of(1000));
    let six = jobs.import(jobs.body(&chain(6))).await["job_uuid"].as_str().unwrap().to_owned();
    let job = jobs.until(&six, "failed", 30).await;
    assert!(job["error"].as_str().unwrap().contains("more than 5 redirects"), "{job}");
    // A relative Location is resolved against the URL it came from.
    let relative = source.url("/redirect?to=%2Fdata%2F1000");
    let uuid = jobs.import(jobs.body(&relative)).await["job_uuid"].as_str().unwrap().to_owned();
    jobs.until(&uuid, "succeeded", 30).await;
    jobs.stop().await;
}

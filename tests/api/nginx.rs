//! assetd behind nginx with `nginx/assetd.conf`: a 256 MiB file goes up and comes back
//! through the proxy, streamed both ways, in both download modes (proxied and
//! X-Accel-Redirect), and arrives intact.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::helpers::{pseudo_random_bytes, sha256_hex, Backend, TestApp, TestOptions};

/// An nginx of the test's own, on a free port, configured by `nginx/assetd.conf`.
pub struct Nginx {
    pub base: String,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

/// The template's one upstream line, which the tests replace with their servers.
const UPSTREAM_LINE: &str = "server {{upstream}};";

impl Nginx {
    /// Starts nginx and waits until assetd answers through it.
    pub async fn start(upstream: std::net::SocketAddr, blob_dir: &Path) -> Self {
        Self::start_unchecked(upstream, blob_dir).await.until_healthy().await
    }

    /// Starts nginx and waits until it listens, whatever is behind it.
    pub async fn start_unchecked(upstream: std::net::SocketAddr, blob_dir: &Path) -> Self {
        Self::launch(&[upstream], "", blob_dir).await
    }

    /// Starts nginx in front of several assetd processes (the template's multi-process
    /// setup: each skipped for 5 s after one failure) and waits until assetd answers
    /// through it.
    pub async fn start_cluster(upstreams: &[std::net::SocketAddr], blob_dir: &Path) -> Self {
        assert!(!upstreams.is_empty(), "a cluster has at least one process");
        Self::launch(upstreams, " max_fails=1 fail_timeout=5s", blob_dir).await.until_healthy().await
    }

    /// Renders `nginx/assetd.conf` with one `server <addr><options>;` line per upstream,
    /// starts nginx on it and waits until it listens.
    async fn launch(upstreams: &[std::net::SocketAddr], options: &str, blob_dir: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let template =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("nginx/assetd.conf")).unwrap();
        assert!(template.contains(UPSTREAM_LINE), "nginx/assetd.conf has the line `{UPSTREAM_LINE}`");
        let servers: Vec<String> = upstreams.iter().map(|addr| format!("server {addr}{options};")).collect();
        let listed: Vec<String> = upstreams.iter().map(|addr| addr.to_string()).collect();
        let config = template
            .replace(UPSTREAM_LINE, &servers.join("\n        "))
            // What is left of the placeholder is in the header comment.
            .replace("{{upstream}}", &listed.join(", "))
            .replace("{{listen}}", &format!("127.0.0.1:{port}"))
            .replace("{{blob_dir}}", &blob_dir.display().to_string());
        assert!(!config.contains("{{"), "every placeholder is filled");
        for sub in ["logs", "tmp"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        let config_path = dir.path().join("nginx.conf");
        std::fs::write(&config_path, config).unwrap();
        let child = std::process::Command::new("nginx")
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&config_path)
            .args(["-e", "logs/error.log", "-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx is installed (scripts/test installs it)");
        let base = format!("http://127.0.0.1:{port}/file");
        // Built now, so that nginx is stopped (Drop) if it never comes up.
        let nginx = Self { base, child, _dir: dir };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(tokio::time::Instant::now() < deadline, "nginx did not come up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        nginx
    }

    /// Waits (20 s at most) until `/file/health` answers 200 through nginx.
    async fn until_healthy(self) -> Self {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while reqwest::get(format!("{}/health", self.base)).await.map(|r| r.status() != 200).unwrap_or(true) {
            assert!(tokio::time::Instant::now() < deadline, "assetd does not answer through nginx");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self
    }
}

impl Nginx {
    /// `127.0.0.1:<port>`
    pub fn addr(&self) -> String {
        self.base.trim_start_matches("http://").trim_end_matches("/file").to_owned()
    }

    /// What nginx wrote to its access log so far.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("logs/access.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM is nginx's fast shutdown; wait so no worker outlives the test.
        let _ = std::process::Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}

const SIZE: u64 = 256 * 1024 * 1024;
const CHUNK: usize = 1024 * 1024;

/// Uploads SIZE pseudo-random bytes through nginx as a stream; returns the answer and
/// the SHA-256 the client computed while sending.
async fn upload_large(nginx: &Nginx, token: &str) -> (Value, String) {
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
    let part =
        reqwest::multipart::Part::stream_with_length(reqwest::Body::wrap_stream(body), SIZE).file_name("big.bin");
    let form = reqwest::multipart::Form::new()
        .text("file_asset", json!({"id_session": 1, "asset_name": "big"}).to_string())
        .part("file", part);
    let response = reqwest::Client::new()
        .post(format!("{}/api/assets", nginx.base))
        .header("Authorization", format!("OpenTera {token}"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let info: Value = response.json().await.unwrap();
    (info, hash_rx.await.unwrap())
}

/// Downloads through nginx, hashing as the bytes arrive; returns (headers, size, sha256).
async fn download_hashed(nginx: &Nginx, token: &str, uuid: &str) -> (reqwest::header::HeaderMap, u64, String) {
    let response = reqwest::Client::new()
        .get(format!("{}/api/assets?asset_uuid={uuid}", nginx.base))
        .header("Authorization", format!("OpenTera {token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    let mut stream = response.bytes_stream();
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        size += chunk.len() as u64;
        hasher.update(&chunk);
    }
    (headers, size, hex::encode(hasher.finalize()))
}

async fn round_trip(accel: bool) {
    let options =
        TestOptions { accel_redirect_prefix: accel.then(|| "/_assetd_blobs/".to_owned()), ..Default::default() };
    let app = TestApp::spawn_with(options).await;
    let nginx = Nginx::start(app.addr, &app.data_dir.path().join("blobs")).await;
    let (_, token) = app.session_with_user(1).await;

    let (info, sent_sha) = upload_large(&nginx, &token).await;
    assert_eq!(info["asset_file_size"], SIZE);
    assert_eq!(info["asset_sha256"], sent_sha, "assetd hashed what the client sent");
    let port = nginx.base.trim_start_matches("http://127.0.0.1:").split('/').next().unwrap().to_owned();
    assert!(
        info["asset_url"].as_str().unwrap().starts_with(&format!("http://127.0.0.1:{port}/file/")),
        "URLs name the proxy: {info}"
    );

    let uuid = info["asset_uuid"].as_str().unwrap();
    let (headers, size, received_sha) = download_hashed(&nginx, &token, uuid).await;
    assert_eq!(size, SIZE);
    assert_eq!(received_sha, sent_sha);
    assert_eq!(headers["content-length"], SIZE.to_string());
    assert_eq!(headers["content-disposition"], "attachment; filename=\"big.bin\"; filename*=UTF-8''big.bin");
    assert_eq!(headers["etag"].to_str().unwrap(), format!("\"sha256:{sent_sha}\""));
    assert!(headers.get("x-accel-redirect").is_none(), "nginx consumes the redirect header");

    // A range through the proxy.
    let ranged = reqwest::Client::new()
        .get(format!("{}/api/assets?asset_uuid={uuid}", nginx.base))
        .header("Authorization", format!("OpenTera {token}"))
        .header("Range", "bytes=1048576-1048585")
        .send()
        .await
        .unwrap();
    assert_eq!(ranged.status(), 206);
    assert_eq!(ranged.bytes().await.unwrap().as_ref(), &pseudo_random_bytes(2, 10)[..]);

    // The internal location is not reachable from outside.
    let blob_path = assetd::blobs::key_for(uuid.parse().unwrap());
    let direct =
        reqwest::get(format!("{}/_assetd_blobs/{blob_path}", nginx.base.trim_end_matches("/file"))).await.unwrap();
    assert_eq!(direct.status(), 404);
}

#[tokio::test]
async fn a_256_mib_file_round_trips_through_nginx_proxied() {
    round_trip(false).await;
}

#[tokio::test]
async fn a_256_mib_file_round_trips_through_nginx_with_x_accel_redirect() {
    round_trip(true).await;
}

#[tokio::test]
async fn errors_pass_through_nginx_unchanged() {
    let app = TestApp::spawn().await;
    let nginx = Nginx::start(app.addr, &app.data_dir.path().join("blobs")).await;
    let response = reqwest::get(format!("{}/api/sessions/1", nginx.base)).await.unwrap();
    assert_eq!(response.status(), 401);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "missing_token");
    let doc = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(format!("{}/doc", nginx.base))
        .send()
        .await
        .unwrap();
    assert_eq!(doc.headers()["location"], "/file/doc/");
}

/// A named download request: which asset, with which extra headers.
type DownloadCase<'a> = (&'static str, &'a Value, Vec<(&'static str, String)>);

/// Every conditional and range case answers the same whether assetd streams the bytes
/// (through nginx) or hands them to nginx with X-Accel-Redirect.
#[tokio::test]
async fn downloads_answer_alike_in_every_mode() {
    let mut answers = Vec::new();
    // Local blobs proxied, local blobs sent by nginx (X-Accel-Redirect, ranges too), and
    // S3 blobs streamed by assetd.
    for (accel, backend) in [(false, Backend::Local), (true, Backend::Local), (false, Backend::S3)] {
        let options = TestOptions {
            accel_redirect_prefix: accel.then(|| "/_assetd_blobs/".to_owned()),
            backend,
            ..Default::default()
        };
        let app = TestApp::spawn_with(options).await;
        let nginx = Nginx::start(app.addr, &app.data_dir.path().join("blobs")).await;
        let (_, token) = app.session_with_user(1).await;
        let bytes = pseudo_random_bytes(9, 1000);
        let info = app.upload_ok(&token, 1, "r.bin", &bytes).await;
        let empty = app.upload_ok(&token, 1, "e.bin", b"").await;
        let etag = format!("\"sha256:{}\"", info["asset_sha256"].as_str().unwrap());
        let last_modified = app
            .get(&token, &format!("/api/assets?asset_uuid={}", info["asset_uuid"].as_str().unwrap()))
            .await
            .headers()["last-modified"]
            .to_str()
            .unwrap()
            .to_owned();
        let url =
            |asset: &Value| format!("{}/api/assets?asset_uuid={}", nginx.base, asset["asset_uuid"].as_str().unwrap());
        let cases: Vec<DownloadCase> = vec![
            ("plain", &info, vec![]),
            ("single range", &info, vec![("Range", "bytes=10-19".into())]),
            ("upper-case unit", &info, vec![("Range", "BYTES=0-5".into())]),
            ("inverted range", &info, vec![("Range", "bytes=5-2".into())]),
            ("trailing comma", &info, vec![("Range", "bytes=0-5,".into())]),
            ("two ranges", &info, vec![("Range", "bytes=0-1,5-6".into())]),
            ("suffix of zero", &info, vec![("Range", "bytes=-0".into())]),
            ("past the end", &info, vec![("Range", "bytes=1000-".into())]),
            ("range of an empty file", &empty, vec![("Range", "bytes=0-".into())]),
            ("if-match other", &info, vec![("If-Match", "\"nope\"".into())]),
            ("if-match same", &info, vec![("If-Match", etag.clone())]),
            ("if-none-match same", &info, vec![("If-None-Match", etag.clone())]),
            ("if-range stale", &info, vec![("Range", "bytes=0-1".into()), ("If-Range", "\"old\"".into())]),
            ("if-modified-since future", &info, vec![("If-Modified-Since", "Fri, 01 Jan 2100 00:00:00 GMT".into())]),
            // Proxies drop trailing whitespace: a valid range either way.
            ("trailing tab", &info, vec![("Range", "bytes=0-5\t".into())]),
            ("if-range date", &info, vec![("Range", "bytes=0-1".into()), ("If-Range", last_modified.clone())]),
            ("suffix range", &info, vec![("Range", "bytes=-7".into())]),
            ("open range", &info, vec![("Range", "bytes=990-".into())]),
            ("range past the end", &info, vec![("Range", "bytes=995-2000".into())]),
            ("if-range same", &info, vec![("Range", "bytes=3-8".into()), ("If-Range", etag.clone())]),
            ("if-range weak", &info, vec![("Range", "bytes=3-8".into()), ("If-Range", format!("W/{etag}"))]),
        ];
        // What nginx sends itself with X-Accel-Redirect: whole downloads and plain
        // single ranges (the rest assetd streams, so that the answers stay alike).
        let sent_by_nginx =
            ["plain", "single range", "suffix range", "open range", "range past the end", "if-range same"];
        let client = reqwest::Client::new();
        let mut mode = Vec::new();
        for (name, asset, headers) in cases {
            let mut request = client.get(url(asset)).header("Authorization", format!("Bearer {token}"));
            for (header, value) in headers {
                request = request.header(header, value);
            }
            let streamed_before = download_sent_bytes(&app).await;
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let json_error = response.headers().get("content-type").is_some_and(|t| t == "application/json");
            // The headers a client relies on, alike in every mode.
            let headers: Vec<String> =
                ["content-range", "etag", "content-disposition", "accept-ranges", "content-type"]
                    .iter()
                    .map(|name| {
                        let values = response.headers().get_all(*name).iter();
                        format!("{name}: {:?}", values.map(|v| v.to_str().unwrap_or("?")).collect::<Vec<_>>())
                    })
                    .collect();
            if status < 300 {
                // assetd's (the asset's creation), whoever sends the bytes.
                assert_eq!(response.headers()["last-modified"], last_modified.as_str(), "{name}");
            }
            let body = response.bytes().await.unwrap();
            if status >= 400 {
                assert!(json_error, "{name}: errors are JSON ({status})");
            }
            let summary = if status < 300 { format!("{} {headers:?}", sha256_hex(&body)) } else { String::new() };
            mode.push((name, status, summary));
            if accel && sent_by_nginx.contains(&name) {
                assert_eq!(download_sent_bytes(&app).await, streamed_before, "{name}: assetd streamed it, not nginx");
            }
        }
        // Straight to assetd (no nginx to follow a redirect): always the bytes themselves.
        let direct = app.get(&token, &format!("/api/assets?asset_uuid={}", info["asset_uuid"].as_str().unwrap())).await;
        assert!(direct.headers().get("x-accel-redirect").is_none());
        assert_eq!(direct.bytes().await.unwrap().as_ref(), &bytes[..], "accel {accel}: direct clients get the bytes");
        let head = client.head(url(&info)).header("Authorization", format!("Bearer {token}")).send().await.unwrap();
        mode.push(("head", head.status().as_u16(), head.headers()["content-length"].to_str().unwrap().to_owned()));
        answers.push(mode);
    }
    // An If-Modified-Since later than now is ignored (RFC 9110 §13.1.3): 200.
    let expected_status =
        [200, 206, 206, 200, 200, 200, 416, 416, 416, 412, 200, 304, 200, 200, 206, 206, 206, 206, 206, 206, 200, 200];
    for mode in &answers {
        let statuses: Vec<u16> = mode.iter().map(|(_, status, _)| *status).collect();
        assert_eq!(statuses, expected_status, "{mode:?}");
    }
    assert_eq!(answers[0], answers[1], "proxied and X-Accel-Redirect downloads answer alike");
    assert_eq!(answers[0], answers[2], "local and S3 blobs answer alike");
}

/// `assetd_download_sent_bytes_total`: bytes assetd streamed itself.
async fn download_sent_bytes(app: &TestApp) -> u64 {
    let text = app.get("", "/metrics").await.text().await.unwrap();
    let line = text.lines().find(|l| l.starts_with("assetd_download_sent_bytes_total ")).expect("the metric");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Early refusals of large uploads reach the client through nginx as assetd's JSON,
/// not as a 502 from a connection reset under a body still being sent.
#[tokio::test]
async fn early_refusals_of_large_uploads_arrive_through_nginx() {
    let app = TestApp::spawn().await;
    let nginx = Nginx::start(app.addr, &app.data_dir.path().join("blobs")).await;
    let (_, member) = app.session_with_user(1).await;
    let stranger = app.user_token(uuid::Uuid::new_v4());
    let big = vec![0u8; 30 * 1024 * 1024];
    let cases = [
        ("Bearer forged", json!({"id_session": 1, "asset_name": "x"}), 401, "invalid_token"),
        (&*format!("Bearer {stranger}"), json!({"id_session": 1, "asset_name": "x"}), 403, "forbidden"),
        (&*format!("Bearer {member}"), json!({"id_session": 99, "asset_name": "x"}), 404, "not_found"),
    ];
    for (authorization, file_asset, status, code) in cases {
        for _ in 0..3 {
            let form = reqwest::multipart::Form::new()
                .text("file_asset", file_asset.to_string())
                .part("file", reqwest::multipart::Part::bytes(big.clone()).file_name("big.bin"));
            let response = reqwest::Client::new()
                .post(format!("{}/api/assets", nginx.base))
                .header("Authorization", authorization)
                .multipart(form)
                .send()
                .await
                .unwrap();
            crate::helpers::assert_error(response, status, code).await;
        }
    }
    // JSON routes too: a refused token with a large body.
    let large_json = format!("{{\"session_name\": \"{}\"}}", "x".repeat(4 * 1024 * 1024));
    for _ in 0..3 {
        let response = reqwest::Client::new()
            .put(format!("{}/api/sessions/1", nginx.base))
            .header("Authorization", "Bearer forged")
            .header("Content-Type", "application/json")
            .body(large_json.clone())
            .send()
            .await
            .unwrap();
        crate::helpers::assert_error(response, 401, "invalid_token").await;
    }
}

/// Errors nginx answers itself are JSON too, with a request id, and nginx and assetd
/// share the request id.
#[tokio::test]
async fn errors_from_nginx_itself_are_json() {
    let app = TestApp::spawn().await;
    let nginx = Nginx::start(app.addr, &app.data_dir.path().join("blobs")).await;
    let root = nginx.base.trim_end_matches("/file").to_owned();
    let not_found = reqwest::get(format!("{root}/FILE/api/sessions/1")).await.unwrap();
    crate::helpers::assert_error(not_found, 404, "not_found").await;
    let long = reqwest::get(format!("{}/api/assets?asset_uuid={}", nginx.base, "x".repeat(20_000))).await.unwrap();
    crate::helpers::assert_error(long, 414, "uri_too_long").await;
    // Just over 8 KiB: nginx (request line over its buffer) or assetd (URI over its
    // limit) refuses it, alike.
    let long = reqwest::get(format!("{}/api/assets?asset_uuid={}", nginx.base, "x".repeat(8_200))).await.unwrap();
    crate::helpers::assert_error(long, 414, "uri_too_long").await;

    let traced = reqwest::Client::new()
        .get(format!("{}/health", nginx.base))
        .header("X-Request-Id", "trace-7")
        .send()
        .await
        .unwrap();
    assert_eq!(traced.headers()["x-request-id"], "trace-7", "the client's id goes through");

    // assetd unreachable: nginx's 502 is JSON.
    let unreachable = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let orphan = Nginx::start_unchecked(unreachable, &app.data_dir.path().join("blobs")).await;
    let bad_gateway = reqwest::get(format!("{}/health", orphan.base)).await.unwrap();
    crate::helpers::assert_error(bad_gateway, 502, "bad_gateway").await;
}

/// Requests refused for their form, by nginx or by assetd behind it, get the JSON error
/// shape and the request id nginx logs.
#[tokio::test]
async fn malformed_requests_through_nginx_get_json_errors() {
    use crate::error_shape::raw_exchange;
    let app = TestApp::spawn().await;
    let nginx = Nginx::start(app.addr, &app.data_dir.path().join("blobs")).await;
    let one = |request: &'static [u8]| {
        let addr = nginx.addr();
        async move {
            let answers = raw_exchange(&addr, request, 1).await;
            answers.into_iter().next().expect("an answer")
        }
    };
    // nginx passes control characters in header values on; assetd refuses them.
    let control = one(b"GET /file/health HTTP/1.1\r\nHost: x\r\nIf-None-Match: \"a\x01b\"\r\n\r\n").await;
    let body = control.assert_error(400, "bad_request");
    let id = body["error"]["request_id"].as_str().unwrap().to_owned();
    // nginx logs a request once it is over, a moment after the answer.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !nginx.access_log().contains("\" 400 ") {
        assert!(tokio::time::Instant::now() < deadline, "nginx logged the 400: {}", nginx.access_log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(nginx.access_log().contains(&format!("rid={id}")), "nginx logged the same request id {id}");
    let traced = one(b"GET /file/health HTTP/1.1\r\nHost: x\r\nX-Request-Id: trace-9\r\nIf-Match: \x7f\r\n\r\n").await;
    assert_eq!(traced.assert_error(400, "bad_request")["error"]["request_id"], "trace-9");
    // Non-ASCII in If-None-Match reaches the route: 400 too.
    let (_, token) = app.session_with_user(1).await;
    let info = app.upload_ok(&token, 1, "n.bin", b"bytes").await;
    let non_ascii = reqwest::Client::new()
        .get(format!("{}/api/assets?asset_uuid={}", nginx.base, info["asset_uuid"].as_str().unwrap()))
        .header("Authorization", format!("Bearer {token}"))
        .header("If-None-Match", reqwest::header::HeaderValue::from_bytes(b"\"caf\xc3\xa9\"").unwrap())
        .send()
        .await
        .unwrap();
    crate::helpers::assert_error(non_ascii, 400, "invalid_header").await;
    // nginx's own refusals.
    one(b"GET /file/health HTTP/1.1\r\nHost: x\r\nBad Name: x\r\n\r\n").await.assert_error(400, "bad_request");
    one(b"GET /file/health HTTP/1.1\r\n\r\n").await.assert_error(400, "bad_request");
    one(b"GET /file/health HTTP/2.0\r\nHost: x\r\n\r\n").await.assert_error(505, "http_version_not_supported");
    one(b"GET /file/health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n")
        .await
        .assert_error(501, "not_implemented");
    let big_header = format!("GET /file/health HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(9000));
    let big = raw_exchange(&nginx.addr(), big_header.as_bytes(), 1).await;
    big[0].assert_error(431, "request_header_too_large");
    let wrong_method = reqwest::Client::new().patch(format!("{}/api/assets", nginx.base)).send().await.unwrap();
    assert_eq!(wrong_method.headers()["allow"], "GET, HEAD, POST, DELETE");
    crate::helpers::assert_error(wrong_method, 405, "method_not_allowed").await;
}

/// Secrets in query strings (asset access tokens, signatures) never reach nginx's
/// access log in clear; other queries are logged as sent.
#[tokio::test]
async fn query_secrets_are_not_written_to_the_access_log() {
    let app = TestApp::spawn().await;
    let nginx = Nginx::start(app.addr, &app.data_dir.path().join("blobs")).await;
    let asset = uuid::Uuid::new_v4();
    for query in [
        format!("asset_uuid={asset}&access_token=SECRET1"),
        "access_token=SECRET2".to_owned(),
        "expires=1&signature=SECRET3".to_owned(),
        "Access%5Ftoken=SECRET4".to_owned(),
        "TOKEN=SECRET5".to_owned(),
    ] {
        let response = reqwest::get(format!("{}/api/assets?{query}", nginx.base)).await.unwrap();
        assert_eq!(response.status(), 401);
    }
    let plain = reqwest::get(format!("{}/api/assets?asset_uuid={asset}", nginx.base)).await.unwrap();
    assert_eq!(plain.status(), 401);
    tokio::time::sleep(Duration::from_millis(500)).await; // nginx logs once a request is over
    let log = nginx.access_log();
    for secret in ["SECRET1", "SECRET2", "SECRET3", "SECRET4", "SECRET5"] {
        assert!(!log.contains(secret), "{secret} is in the access log:\n{log}");
    }
    assert!(log.contains("/file/api/assets?[redacted] HTTP/1.1\" 401"), "{log}");
    assert!(log.contains(&format!("/file/api/assets?asset_uuid={asset} HTTP/1.1\" 401")), "{log}");
}

/// nginx refuses TRACE itself, before proxying: its 405 names the methods the path
/// answers, as assetd's own 405s do (RFC 9110 requires `Allow`), and is JSON.
#[tokio::test]
async fn trace_is_refused_with_the_allowed_methods() {
    let app = TestApp::spawn().await;
    let nginx = Nginx::start(app.addr, &app.data_dir.path().join("blobs")).await;
    let trace = reqwest::Method::from_bytes(b"TRACE").unwrap();
    let client = reqwest::Client::new();
    for (path, allowed) in [
        ("/api/assets?asset_uuid=x", "GET, HEAD, POST, DELETE"),
        ("/api/assets/infos", "GET, HEAD, POST"),
        ("/api/assets/2a5c1b4e-0d6a-4a31-9d1c-1f2e3d4c5b6a/events", "GET, HEAD"),
        ("/api/sessions/7/assets?limit=2", "GET, HEAD"),
        ("/api/sessions/7", "GET, HEAD, PUT, DELETE"),
        ("/health", "GET, HEAD"),
        ("/doc/openapi.json", "GET, HEAD"),
    ] {
        let proxied = client.request(trace.clone(), format!("{}{path}", nginx.base)).send().await.unwrap();
        assert_eq!(proxied.headers().get("allow").map(|v| v.to_str().unwrap()), Some(allowed), "{path} via nginx");
        crate::helpers::assert_error(proxied, 405, "method_not_allowed").await;
        let direct = client.request(trace.clone(), app.url(path)).send().await.unwrap();
        assert_eq!(direct.status(), 405, "{path}");
        assert_eq!(direct.headers().get("allow").map(|v| v.to_str().unwrap()), Some(allowed), "{path} direct");
    }
}

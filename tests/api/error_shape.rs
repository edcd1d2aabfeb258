//! Every answer carries the JSON error shape of API.md with a request id (issue 11,
//! item 7): requests hyper refuses before any route sees them, over-long URIs,
//! 405s with their `Allow`, malformed or unusual conditional headers. (The same through
//! nginx is in `nginx.rs`.)

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{assert_error, TestApp};

/// A raw answer: status, headers (lower-case names), body.
pub struct RawAnswer {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: String,
    /// Whether the whole body (per Content-Length) arrived.
    complete: bool,
}

impl RawAnswer {
    /// Asserts the JSON error shape with the request id of the header; returns the body.
    pub fn assert_error(&self, status: u16, code: &str) -> Value {
        assert_eq!(self.status, status, "{}", self.body);
        assert_eq!(self.headers.get("content-type").map(String::as_str), Some("application/json"), "{}", self.body);
        let body: Value = serde_json::from_str(&self.body).unwrap_or_else(|_| panic!("not JSON: {:?}", self.body));
        assert_eq!(body["error"]["code"], code, "{body}");
        assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
        let id = self.headers.get("x-request-id").expect("an X-Request-Id header");
        assert_eq!(body["error"]["request_id"].as_str(), Some(id.as_str()), "{body}");
        body
    }
}

/// Sends `request` as is on a new connection and reads `expected` answers (fewer if
/// the server closes the connection first, or 5 s pass).
pub async fn raw_exchange(addr: &str, request: &[u8], expected: usize) -> Vec<RawAnswer> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut received = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let mut chunk = vec![0u8; 64 * 1024];
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => received.extend_from_slice(&chunk[..n]),
            _ => break,
        }
        let answers = parse_answers(&received);
        if answers.len() >= expected && answers.iter().all(|a| a.complete) {
            break;
        }
    }
    parse_answers(&received)
}

fn parse_answers(mut bytes: &[u8]) -> Vec<RawAnswer> {
    let mut answers = Vec::new();
    while let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&bytes[..end]).into_owned();
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
        let headers: HashMap<String, String> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let length: usize = headers.get("content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
        let body_end = (end + 4 + length).min(bytes.len());
        let body = String::from_utf8_lossy(&bytes[end + 4..body_end]).into_owned();
        answers.push(RawAnswer { status, headers, body, complete: end + 4 + length <= bytes.len() });
        bytes = &bytes[body_end..];
    }
    answers
}

#[tokio::test]
async fn requests_hyper_refuses_get_json_errors_with_a_request_id() {
    let app = TestApp::spawn().await;
    let addr = app.addr.to_string();
    let one = |request: Vec<u8>| {
        let addr = addr.clone();
        async move {
            let mut answers = raw_exchange(&addr, &request, 2).await;
            assert_eq!(answers.len(), 1, "one answer, then the connection closes");
            answers.remove(0)
        }
    };
    // A control character in a header value.
    let control = one(b"GET /file/health HTTP/1.1\r\nHost: x\r\nIf-None-Match: \"a\x01b\"\r\n\r\n".to_vec()).await;
    control.assert_error(400, "bad_request");
    // The client's plain request id is kept, as through nginx.
    let traced = one(b"GET /file/health HTTP/1.1\r\nX-Request-Id: trace-42\r\nBad: \x7f\r\n\r\n".to_vec()).await;
    assert_eq!(traced.assert_error(400, "bad_request")["error"]["request_id"], "trace-42");
    one(b"GARBAGE\r\n\r\n".to_vec()).await.assert_error(400, "bad_request");
    one(b"GET /file/health HTTP/1.1\r\nBad Name: x\r\n\r\n".to_vec()).await.assert_error(400, "bad_request");
    // A URI over hyper's own limit (64 KiB), and headers over its count.
    let huge_uri = format!("GET /file/health?{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(70_000));
    one(huge_uri.into_bytes()).await.assert_error(414, "uri_too_long");
    let many_headers: String = (0..120).map(|i| format!("X-H{i}: v\r\n")).collect();
    let many = format!("GET /file/health HTTP/1.1\r\nHost: x\r\n{many_headers}\r\n");
    one(many.into_bytes()).await.assert_error(431, "request_header_too_large");

    // On a connection that served requests before (keep-alive, and pipelined).
    let good = "GET /file/health HTTP/1.1\r\nHost: x\r\n\r\n";
    let bad = "GET /file/health HTTP/1.1\r\nHost: x\r\nIf-Match: \x02\r\n\r\n";
    let pipelined = raw_exchange(&addr, format!("{good}{good}{bad}").as_bytes(), 4).await;
    assert_eq!(pipelined.iter().map(|a| a.status).collect::<Vec<_>>(), [200, 200, 400]);
    assert_eq!(pipelined[0].body, "{\"status\":\"ok\"}", "answers before are untouched");
    pipelined[2].assert_error(400, "bad_request");
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    stream.write_all(good.as_bytes()).await.unwrap();
    let mut first = vec![0u8; 4096];
    let n = stream.read(&mut first).await.unwrap();
    assert!(first[..n].starts_with(b"HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    stream.write_all(bad.as_bytes()).await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await.unwrap().unwrap();
    parse_answers(&rest)[0].assert_error(400, "bad_request");

    // A streamed download whose every chunk (256 KiB read at a time) starts with what
    // hyper's own answer looks like is not taken for one, neither before a refused head
    // on the same connection nor after.
    let (_, token) = app.session_with_user(1).await;
    let mut lookalike = Vec::new();
    for _ in 0..3 {
        let mut chunk = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n".to_vec();
        chunk.resize(256 * 1024, b'.');
        lookalike.extend_from_slice(&chunk);
    }
    let info = app.upload_ok(&token, 1, "lookalike.txt", &lookalike).await;
    let download = format!(
        "GET /file/api/assets?asset_uuid={} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n",
        info["asset_uuid"].as_str().unwrap()
    );
    let answers = raw_exchange(&addr, format!("{download}{bad}").as_bytes(), 3).await;
    assert_eq!(answers.len(), 2);
    assert_eq!(answers[0].status, 200);
    assert!(answers[0].body.as_bytes() == &lookalike[..], "the download arrives as stored");
    answers[1].assert_error(400, "bad_request");
}

#[tokio::test]
async fn over_long_uris_get_414_in_json() {
    let app = TestApp::spawn().await;
    let long = app.client.get(app.url(&format!("/api/assets?asset_uuid={}", "x".repeat(9000)))).send().await.unwrap();
    assert_error(long, 414, "uri_too_long").await;
    // Under the limit: routed as usual.
    let fine = app.client.get(app.url(&format!("/health?pad={}", "x".repeat(7000)))).send().await.unwrap();
    assert_eq!(fine.status(), 200);
}

#[tokio::test]
async fn malformed_entity_tags_get_400_and_every_date_form_is_read() {
    let app = TestApp::spawn().await;
    let (_, token) = app.session_with_user(1).await;
    let info = app.upload_ok(&token, 1, "d.bin", b"some bytes").await;
    let url = app.url(&format!("/api/assets?asset_uuid={}", info["asset_uuid"].as_str().unwrap()));
    let get = |name: &'static str, value: &[u8]| {
        app.client
            .get(&url)
            .header("Authorization", format!("Bearer {token}"))
            .header(name, reqwest::header::HeaderValue::from_bytes(value).unwrap())
            .send()
    };
    for (name, value) in [
        ("If-None-Match", &b"\"caf\xc3\xa9\""[..]),
        ("If-None-Match", b"\xff"),
        ("If-None-Match", b"not-quoted"),
        ("If-Match", b"\"a\" \"b\""),
    ] {
        let response = get(name, value).await.unwrap();
        let body = assert_error(response, 400, "invalid_header").await;
        assert!(body["error"]["message"].as_str().unwrap().contains(name), "{body}");
    }

    let last_modified = get("X-Nothing", b"1").await.unwrap().headers()["last-modified"].to_str().unwrap().to_owned();
    let modified = httpdate::parse_http_date(&last_modified).unwrap();
    // Last-Modified itself (a later date would be in the future: ignored, see below),
    // and the same instant in RFC 850 and asctime form.
    let imf = httpdate::fmt_http_date(modified);
    let parts: Vec<&str> = imf.split(' ').collect(); // Sun, 06 Nov 1994 08:49:37 GMT
    let weekday = match parts[0] {
        "Mon," => "Monday",
        "Tue," => "Tuesday",
        "Wed," => "Wednesday",
        "Thu," => "Thursday",
        "Fri," => "Friday",
        "Sat," => "Saturday",
        _ => "Sunday",
    };
    let rfc850 = format!("{weekday}, {}-{}-{} {} GMT", parts[1], parts[2], &parts[3][2..], parts[4]);
    let day: u32 = parts[1].parse().unwrap();
    let asctime = format!("{} {} {day:>2} {} {}", &parts[0][..3], parts[2], parts[4], parts[3]);
    for date in [&imf, &rfc850, &asctime] {
        let cached = get("If-Modified-Since", date.as_bytes()).await.unwrap();
        assert_eq!(cached.status(), 304, "If-Modified-Since: {date}");
        let unchanged = get("If-Unmodified-Since", date.as_bytes()).await.unwrap();
        assert_eq!(unchanged.status(), 200, "If-Unmodified-Since: {date}");
    }
    let earlier = httpdate::fmt_http_date(modified - Duration::from_secs(60));
    assert_error(get("If-Unmodified-Since", earlier.as_bytes()).await.unwrap(), 412, "precondition_failed").await;
    assert_eq!(get("If-Modified-Since", earlier.as_bytes()).await.unwrap().status(), 200);
    // A date later than now is not one this server sent: ignored (RFC 9110 §13.1.3).
    let future = get("If-Modified-Since", b"Fri, 01 Jan 2100 00:00:00 GMT").await.unwrap();
    assert_eq!(future.status(), 200);
    assert_eq!(&future.bytes().await.unwrap()[..], b"some bytes");
    // Invalid dates are ignored.
    for bad in [&b"yesterday"[..], b"Sun, 06 Nov 1994 08:49:37 +0100", b"\xe9t\xe9"] {
        assert_eq!(get("If-Modified-Since", bad).await.unwrap().status(), 200);
        assert_eq!(get("If-Unmodified-Since", bad).await.unwrap().status(), 200);
    }
}

/// What each route answers matches the `Allow` of its 405s: every method listed is
/// routed (whatever it then answers), every other one is a 405 with the same `Allow`.
#[tokio::test]
async fn every_route_lists_its_methods_in_allow() {
    let app = TestApp::spawn().await;
    let document: Value = serde_json::from_str(
        &std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi/openapi.json"))
            .unwrap(),
    )
    .unwrap();
    let mut paths: Vec<String> = document["paths"].as_object().unwrap().keys().cloned().collect();
    paths.extend(["/doc/".to_owned(), "/doc/index.html".to_owned()]);
    let sample = uuid::Uuid::new_v4().to_string();
    for template in paths {
        let path: String = template
            .split('/')
            .map(|segment| match segment {
                s if s.starts_with('{') && s.contains("session") => "1",
                s if s.starts_with('{') => &sample,
                s => s,
            })
            .collect::<Vec<_>>()
            .join("/");
        let url = app.url(&path);
        let probe = app.client.request(reqwest::Method::PATCH, &url).send().await.unwrap();
        let allow = probe.headers().get("allow").map(|v| v.to_str().unwrap().to_owned());
        let allow = allow.unwrap_or_else(|| panic!("{path}: PATCH answers {} with no Allow", probe.status()));
        assert_error(probe, 405, "method_not_allowed").await;
        for method in ["GET", "HEAD", "POST", "PUT", "DELETE"] {
            let response = app.client.request(method.parse().unwrap(), &url).send().await.unwrap();
            let listed = allow.split(", ").any(|m| m == method);
            if listed {
                assert_ne!(response.status(), 405, "{method} {path} is in Allow: {allow}");
            } else {
                assert_eq!(response.status(), 405, "{method} {path} is not in Allow: {allow}");
                assert_eq!(response.headers()["allow"].to_str().unwrap(), allow);
            }
        }
    }
    // A method refused on a path no route has is a 404, not a 405 without Allow.
    let nowhere = app.client.request(reqwest::Method::DELETE, app.url("/nowhere/at/all")).send().await.unwrap();
    assert_error(nowhere, 404, "not_found").await;
}

//! Every answer carries the JSON error shape of API.md with a request id (issue 11,
//! item 7): malformed or unusual conditional headers.

use std::time::Duration;

use crate::helpers::{assert_error, TestApp};

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

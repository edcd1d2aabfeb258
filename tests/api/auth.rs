//! Authentication: bad tokens are refused with 401 before any body is read.

use std::time::Duration;

use assetd::auth::Authenticator;
use assetd::domain::principal::{Principal, PrincipalKind};
use base64::Engine;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

use crate::helpers::{assert_error, TestApp};

fn b64(s: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

#[tokio::test]
async fn missing_expired_unsigned_wrongly_signed_and_malformed_tokens_get_401() {
    let app = TestApp::spawn().await;
    let principal =
        Principal { kind: PrincipalKind::Service, uuid: Uuid::new_v4(), name: "s".into(), superadmin: true };
    let expired = app.ctx.app.auth.mint(&principal, -120);
    let wrongly_signed = Authenticator::new("another-secret").mint(&principal, 3600);
    let claims = format!(
        r#"{{"sub":"{}","kind":"service","superadmin":true,"exp":{}}}"#,
        principal.uuid,
        chrono::Utc::now().timestamp() + 3600
    );
    let unsigned = format!("{}.{}.", b64(r#"{"alg":"none","typ":"JWT"}"#), b64(&claims));
    let bad_kind = {
        let valid = app.ctx.app.auth.mint(&principal, 3600);
        // Same signature, claims swapped: the signature no longer matches.
        let mut parts: Vec<&str> = valid.split('.').collect();
        let tampered = b64(&claims.replace("service", "robot"));
        parts[1] = &tampered;
        parts.join(".")
    };

    let not_yet_valid = {
        let claims = format!(
            r#"{{"sub":"{}","kind":"service","exp":{},"nbf":{}}}"#,
            principal.uuid,
            chrono::Utc::now().timestamp() + 3600,
            chrono::Utc::now().timestamp() + 600
        );
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &serde_json::from_str::<serde_json::Value>(&claims).unwrap(),
            &jsonwebtoken::EncodingKey::from_secret(crate::helpers::JWT_SECRET.as_bytes()),
        )
        .unwrap()
    };
    let cases: Vec<(Option<String>, &str)> = vec![
        (Some(format!("Bearer {not_yet_valid}")), "invalid_token"),
        (None, "missing_token"),
        (Some(format!("Bearer {expired}")), "token_expired"),
        (Some(format!("Bearer {wrongly_signed}")), "invalid_token"),
        (Some(format!("OpenTera {unsigned}")), "invalid_token"),
        (Some(format!("Bearer {bad_kind}")), "invalid_token"),
        (Some("Bearer not.a.jwt".into()), "invalid_token"),
        (Some("Bearer ".into()), "invalid_token"),
        (Some("Basic dXNlcjpwYXNz".into()), "invalid_token"),
    ];
    for (header, code) in cases {
        for path in [
            "/api/sessions/1",
            "/api/assets?asset_uuid=00000000-0000-0000-0000-000000000000",
            "/api/assets/infos?asset_uuid=x",
        ] {
            let mut request = app.client.get(app.url(path));
            if let Some(header) = &header {
                request = request.header("Authorization", header);
            }
            let response = request.send().await.unwrap();
            assert_eq!(
                response.headers().get("www-authenticate").map(|v| v.to_str().unwrap()),
                Some("Bearer realm=\"assetd\"")
            );
            assert_error(response, 401, code).await;
        }
    }
    let put = app
        .client
        .put(app.url("/api/sessions/1"))
        .header("Authorization", format!("Bearer {unsigned}"))
        .json(&json!({"session_name": "x"}));
    assert_error(put.send().await.unwrap(), 401, "invalid_token").await;
    assert_eq!(app.event_count().await, 0);
}

/// The server answers 401 while the client has sent only headers announcing a 1 GiB body:
/// the body is never waited for.
#[tokio::test]
async fn uploads_with_a_bad_token_are_refused_before_the_body_is_read() {
    let app = TestApp::spawn().await;
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let request = format!(
        "POST /file/api/assets HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer forged.token.here\r\nContent-Type: multipart/form-data; boundary=x\r\nContent-Length: {}\r\n\r\n",
        app.addr,
        1u64 << 30
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer))
        .await
        .expect("answered without the body")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(answer.contains("invalid_token"), "{answer}");
    assert_eq!(TestApp::files_under(&app.tmp_dir()), 0);
}

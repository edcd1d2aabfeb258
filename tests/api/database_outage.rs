//! The database going away under load (issue 11, item 6): its connections terminated
//! by the administrator (SQLSTATE 57P01, as in a restart), then unreachable for a while,
//! then back. Every request meanwhile gets its answer or a 503 in the JSON error shape,
//! never a 500; every upload that got a 200 is intact afterwards.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::{pseudo_random_bytes, server_url, TestApp, TestOptions};

/// Upload clients at once.
const UPLOADERS: usize = 8;
/// Read clients at once (listings, infos, downloads, history, renames, ready, metrics).
const READERS: usize = 2;

/// What the clients saw.
#[derive(Default)]
struct Seen {
    /// (asset uuid, the bytes sent) of every upload answered 200.
    uploaded: Vec<(String, Vec<u8>)>,
    /// Answers other than the expected success: (what, status, body).
    failures: Vec<(String, u16, String)>,
    successes_by_phase: [usize; 3],
    /// 0 before the outage, 1 during, 2 after.
    phase: usize,
}

/// Records an answer that was not a success: it must be a 503 in the JSON error shape.
async fn record_failure(seen: &Mutex<Seen>, what: &str, response: reqwest::Response) {
    let status = response.status().as_u16();
    let header_id = response.headers().get("x-request-id").map(|v| v.to_str().unwrap_or("").to_owned());
    let retry_after = response.headers().get("retry-after").is_some();
    let text = response.text().await.unwrap_or_default();
    let shaped = serde_json::from_str::<Value>(&text).is_ok_and(|body| {
        body["error"]["code"] == "unavailable"
            && body["error"]["message"].as_str().is_some_and(|m| !m.is_empty())
            && body["error"]["request_id"].as_str() == header_id.as_deref()
    });
    let verdict = if status == 503 && shaped && retry_after { "ok" } else { "BAD" };
    seen.lock().unwrap().failures.push((format!("{verdict} {what}"), status, text));
}

fn success(seen: &Mutex<Seen>) {
    let mut seen = seen.lock().unwrap();
    let phase = seen.phase;
    seen.successes_by_phase[phase] += 1;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_under_load_answers_503_never_500_and_loses_no_acknowledged_upload() {
    let app = Arc::new(TestApp::spawn_with(TestOptions { proxied_database: true, ..Default::default() }).await);
    let (_, token) = app.session_with_user(1).await;
    let known = app.upload_ok(&token, 1, "known.bin", b"known bytes").await;
    let known_uuid = known["asset_uuid"].as_str().unwrap().to_owned();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = Arc::new(AtomicBool::new(false));

    let mut clients = Vec::new();
    for client in 0..UPLOADERS {
        let (app, token, seen, stop) = (app.clone(), token.clone(), seen.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let bytes = pseudo_random_bytes(client as u64 * 1_000_000 + n, 1 + (n as usize * 977) % 20_000);
                let name = format!("c{client}-{n}.bin");
                let response =
                    app.upload(&token, &json!({"id_session": 1, "asset_name": name}), &name, bytes.clone()).await;
                if response.status() == 200 {
                    let info: Value = response.json().await.unwrap();
                    let uuid = info["asset_uuid"].as_str().unwrap().to_owned();
                    seen.lock().unwrap().uploaded.push((uuid, bytes));
                    success(&seen);
                } else {
                    record_failure(&seen, "upload", response).await;
                }
            }
        }));
    }
    for reader in 0..READERS {
        let (app, token, seen, stop, known_uuid) =
            (app.clone(), token.clone(), seen.clone(), stop.clone(), known_uuid.clone());
        clients.push(tokio::spawn(async move {
            let paths = [
                "/api/sessions/1".to_owned(),
                "/api/sessions/1/assets?limit=5".to_owned(),
                format!("/api/assets/infos?asset_uuid={known_uuid}"),
                format!("/api/assets?asset_uuid={known_uuid}"),
                format!("/api/assets/{known_uuid}/events"),
                "/ready".to_owned(),
                "/metrics".to_owned(),
            ];
            let mut n = reader;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let response = if n % (paths.len() + 1) == paths.len() {
                    let rename = json!({"file_asset": {"asset_uuid": known_uuid, "asset_original_filename": format!("k{n}.bin")}});
                    app.post_json(&token, "/api/assets/infos", &rename).await
                } else {
                    app.get(&token, &paths[n % (paths.len() + 1)]).await
                };
                if response.status().is_success() {
                    success(&seen);
                } else {
                    record_failure(&seen, &format!("read {n}"), response).await;
                }
            }
        }));
    }

    // The database as it restarts: its connections terminated by the administrator
    // (in-flight statements fail with 57P01) a few times over, then unreachable for a
    // while, then back.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    seen.lock().unwrap().phase = 1;
    let admin = admin_connection().await;
    let proxy = app.database_proxy.as_ref().unwrap();
    for _ in 0..3 {
        terminate_backends(&admin, &app.db.name).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    proxy.cut();
    terminate_backends(&admin, &app.db.name).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    proxy.restore();
    // Back: requests succeed again once the pool has reconnected.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while reqwest::get(app.url("/ready")).await.unwrap().status() != 200 {
        assert!(tokio::time::Instant::now() < deadline, "assetd is not ready again after the database came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    seen.lock().unwrap().phase = 2;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        client.await.unwrap();
    }

    let seen = std::mem::take(&mut *seen.lock().unwrap());
    let bad: Vec<_> = seen.failures.iter().filter(|(what, _, _)| what.starts_with("BAD")).collect();
    assert!(bad.is_empty(), "answers other than success or a JSON 503 with Retry-After: {bad:#?}");
    assert!(!seen.failures.is_empty(), "the outage was seen (503s)");
    let [before, _, after] = seen.successes_by_phase;
    assert!(before > 0 && after > 0, "requests succeed before and after the outage: {:?}", seen.successes_by_phase);
    // Every acknowledged upload is there, byte for byte.
    for (uuid, bytes) in &seen.uploaded {
        let response = app.get(&token, &format!("/api/assets?asset_uuid={uuid}")).await;
        assert_eq!(response.status(), 200, "acknowledged upload {uuid} can be downloaded");
        assert_eq!(&response.bytes().await.unwrap()[..], &bytes[..], "acknowledged upload {uuid} is intact");
    }
    let recorded = app.scalar("SELECT count(*) FROM assets WHERE asset_status = 'available'").await;
    assert!(
        recorded as usize > seen.uploaded.len(),
        "{recorded} assets for {} acknowledged uploads",
        seen.uploaded.len()
    );
}

/// A connection to the test server itself, not through the proxy.
async fn admin_connection() -> tokio_postgres::Client {
    let (client, connection) =
        tokio_postgres::connect(&format!("{}/postgres", server_url()), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

/// What an administrator's restart does to assetd's sessions: FATAL 57P01 on each.
async fn terminate_backends(admin: &tokio_postgres::Client, database: &str) {
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            &[&database],
        )
        .await
        .unwrap();
}

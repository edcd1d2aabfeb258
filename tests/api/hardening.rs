//! What outside testing found (issue 11): one upload can fail only itself, whatever it
//! carries; a session registered again is a new session; access tokens grant what their
//! requester could do when they are used; claims are trusted no further than they must be.

use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{assert_error, Backend, TestApp};
use assetd::domain::principal::{Principal, PrincipalKind};

/// Uploads with `file_asset` sent as this exact text (which need not be valid JSON).
async fn upload_raw(app: &TestApp, token: &str, file_asset: &str, bytes: &[u8]) -> reqwest::Response {
    let form = reqwest::multipart::Form::new()
        .text("file_asset", file_asset.to_owned())
        .part("file", reqwest::multipart::Part::bytes(bytes.to_vec()).file_name("f.bin"));
    app.post_form(token, form).await
}

fn nested(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

/// Every class of value a `file_asset` can carry that is near or past a limit: each is
/// either stored so that it reads back, or refused with a 4xx up front.
fn hostile_file_assets(id_session: i64) -> Vec<String> {
    let with =
        |field: &str, value: &str| format!(r#"{{"id_session":{id_session},"asset_name":"h","{field}":{value}}}"#);
    let metadata = |value: &str| with("metadata", &format!(r#"{{"v":{value}}}"#));
    let mut cases: Vec<String> = [
        "1.7976931348623157e308",
        "-1.7976931348623157e308",
        "5e-324",
        "2.2250738585072014e-308",
        "1e-400",
        "1e400",
        "-0",
        "-0.0",
        "18446744073709551615",
        "18446744073709551616",
        "-9223372036854775809",
        "123456789012345678901234567890.123456789",
        "0.30000000000000004",
        r#""\u0000""#,
        r#""\ud800""#,
        r#""\udc00x""#,
        r#""\u202e exe""#,
        r#"{"\u0000":1}"#,
        r#"{"":1}"#,
        "null",
        "true",
    ]
    .iter()
    .map(|value| metadata(value))
    .collect();
    cases.push(metadata(&nested(30)));
    cases.push(metadata(&nested(40)));
    cases.push(metadata(&nested(200)));
    cases.push(with(
        "metadata",
        &format!("{{{}}}", (0..2000).map(|i| format!(r#""k{i}":{i}.5"#)).collect::<Vec<_>>().join(",")),
    ));
    cases.push(with("metadata", r#"[1,2]"#));
    cases.push(with("metadata", r#""text""#));
    for datetime in [
        "9999-12-31T23:59:59.999999Z",
        "9999-12-31T23:59:60Z",
        "0001-01-01T00:00:00Z",
        "0000-01-01T00:00:00Z",
        "+10000-01-01T00:00:00Z",
        "-0001-01-01T00:00:00Z",
        "2026-02-30T00:00:00Z",
        "2026-01-01T00:00:00+23:59",
        "2026-01-01T00:00:00.1234567891234Z",
    ] {
        cases.push(with("asset_datetime", &format!("{datetime:?}")));
    }
    for directory in ["\"/a/../b\"", "\"/x\\u0000\"", &format!("{:?}", "/d".repeat(600)), "\"//a///b//\""] {
        cases.push(with("directory", directory));
    }
    for tags in [&format!("[{}]", vec!["\"t\""; 65].join(",")), &format!("[{:?}]", "t".repeat(129)), "[\"\"]", "[1]"] {
        cases.push(with("tags", tags));
    }
    for asset_type in ["\"text/\"", "\"a/b; c=\\\"d\\\"\"", &format!("\"a/{}\"", "b".repeat(300)), "\"x\""] {
        cases.push(with("asset_type", asset_type));
    }
    cases.push(format!(r#"{{"id_session":{id_session},"asset_name":"{}"}}"#, "n".repeat(300)));
    cases.push(format!(r#"{{"id_session":{id_session},"asset_name":"..\\/x"}}"#));
    cases.push(r#"{"id_session":9223372036854775807,"asset_name":"h"}"#.to_owned());
    cases.push(format!(r#"{{"id_session":{id_session}.0,"asset_name":"h"}}"#));
    cases.push(format!(r#"{{"id_session":{id_session},"asset_name":"h","asset_name":"dup"}}"#));
    cases
}

async fn hostile_uploads_fail_only_themselves_and_what_is_stored_reads_back(backend: Backend) {
    let app = TestApp::on(backend).await;
    let (_, token) = app.session_with_user(1).await;
    let hostile = hostile_file_assets(1);
    let rounds = 3;
    let mut tasks = Vec::new();
    for round in 0..rounds {
        for (index, file_asset) in hostile.iter().enumerate() {
            let (app_client, url, token, file_asset) =
                (app.client.clone(), app.url("/api/assets"), token.clone(), file_asset.clone());
            tasks.push(tokio::spawn(async move {
                let form = reqwest::multipart::Form::new()
                    .text("file_asset", file_asset.clone())
                    .part("file", reqwest::multipart::Part::bytes(vec![round as u8; 16]).file_name("h.bin"));
                let response =
                    app_client.post(url).header("Authorization", format!("OpenTera {token}")).multipart(form).send();
                let response = response.await.unwrap();
                (false, index, response.status().as_u16(), response.text().await.unwrap())
            }));
        }
        for honest in 0..24 {
            let (app_client, url, token) = (app.client.clone(), app.url("/api/assets"), token.clone());
            tasks.push(tokio::spawn(async move {
                let file_asset = json!({"id_session": 1, "asset_name": format!("honest {round} {honest}"),
                                        "metadata": {"n": honest, "f": 0.5}});
                let form = reqwest::multipart::Form::new()
                    .text("file_asset", file_asset.to_string())
                    .part("file", reqwest::multipart::Part::bytes(b"honest".to_vec()).file_name("ok.txt"));
                let response =
                    app_client.post(url).header("Authorization", format!("OpenTera {token}")).multipart(form).send();
                let response = response.await.unwrap();
                (true, honest, response.status().as_u16(), response.text().await.unwrap())
            }));
        }
    }
    let mut stored = Vec::new();
    for task in tasks {
        let (honest, index, status, body) = task.await.unwrap();
        if honest {
            assert_eq!(status, 200, "an honest upload failed next to hostile ones: {body}");
            continue;
        }
        let case = &hostile[index];
        assert!(status == 200 || (400..500).contains(&status), "{case} answered {status}: {body}");
        let body: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("{case}: not JSON: {body}"));
        if status == 200 {
            stored.push((case.clone(), body));
        } else {
            assert!(body["error"]["code"].is_string(), "{case}: {body}");
        }
    }
    assert!(stored.len() >= rounds * 10, "most value classes are storable: {}", stored.len());

    // Everything stored reads back, alone, in a batch, in the listing and in its history.
    for (case, answer) in &stored {
        let uuid = answer["asset_uuid"].as_str().unwrap();
        let infos = app.get(&token, &format!("/api/assets/infos?asset_uuid={uuid}")).await;
        assert_eq!(infos.status(), 200, "{case}");
        let infos: Value = infos.json().await.unwrap();
        assert_eq!(infos["metadata"], answer["metadata"], "{case}: the answer and the stored row agree");
        assert_eq!(app.get(&token, &format!("/api/assets/{uuid}/events")).await.status(), 200, "{case}");
    }
    let mut cursor = String::new();
    let mut listed = 0;
    loop {
        let page = app.get(&token, &format!("/api/sessions/1/assets?limit=100{cursor}")).await;
        assert_eq!(page.status(), 200);
        let page: Value = page.json().await.unwrap();
        listed += page["assets"].as_array().unwrap().len();
        match page["next_cursor"].as_str() {
            Some(next) => cursor = format!("&cursor={next}"),
            None => break,
        }
    }
    assert_eq!(listed, stored.len() + rounds * 24);

    // And the read models rebuild from these events exactly.
    let before = app.table_snapshot("assets", "asset_uuid").await;
    let mut client = app.ctx.app.pool.get().await.unwrap();
    assetd::projections::replay(&mut client).await.unwrap();
    assert_eq!(app.table_snapshot("assets", "asset_uuid").await, before);
}

#[tokio::test]
async fn extreme_numbers_are_stored_exactly_and_deep_nesting_is_refused() {
    let app = TestApp::spawn().await;
    let (_, token) = app.session_with_user(1).await;
    let answer = upload_raw(
        &app,
        &token,
        r#"{"id_session":1,"asset_name":"x","metadata":{"max":1.7976931348623157e308,"tiny":5e-324,"big":18446744073709551615}}"#,
        b"x",
    )
    .await;
    assert_eq!(answer.status(), 200);
    let uuid = answer.json::<Value>().await.unwrap()["asset_uuid"].as_str().unwrap().to_owned();
    let infos: Value = app.get(&token, &format!("/api/assets/infos?asset_uuid={uuid}")).await.json().await.unwrap();
    assert_eq!(infos["metadata"]["max"].as_f64(), Some(f64::MAX));
    assert_eq!(infos["metadata"]["tiny"].as_f64(), Some(5e-324));
    assert_eq!(infos["metadata"]["big"].as_u64(), Some(u64::MAX));

    let before = app.footprint().await;
    let deep = format!(r#"{{"id_session":1,"asset_name":"x","metadata":{{"v":{}}}}}"#, nested(40));
    let body = assert_error(upload_raw(&app, &token, &deep, b"x").await, 422, "invalid_field").await;
    assert!(body["error"]["message"].as_str().unwrap().contains("nest"), "{body}");
    assert_eq!(app.footprint().await, before, "a refused upload leaves nothing");
}

#[tokio::test]
async fn a_session_registered_again_is_a_new_session() {
    let app = TestApp::spawn().await;
    let service = app.service_token();
    let (u1, u3) = (Uuid::new_v4(), Uuid::new_v4());
    let register = |members: Vec<Uuid>| json!({"session_name": "s", "session_users": members});
    assert_eq!(app.put_session(&service, 7, &register(vec![u1])).await.status(), 200);
    let old = app
        .upload(
            &app.user_token(u1),
            &json!({"id_session": 7, "asset_name": "private", "metadata": {"secret": 1}}),
            "p.txt",
            b"p".to_vec(),
        )
        .await
        .json::<Value>()
        .await
        .unwrap();
    let old_uuid = old["asset_uuid"].as_str().unwrap();
    assert_eq!(app.delete(&service, "/api/sessions/7").await.status(), 202);
    assert_eq!(app.put_session(&service, 7, &register(vec![u3])).await.status(), 200);

    let newcomer = app.user_token(u3);
    for path in [format!("/api/assets/infos?asset_uuid={old_uuid}"), format!("/api/assets/{old_uuid}/events")] {
        assert_error(app.get(&newcomer, &path).await, 403, "forbidden").await;
    }
    let batch = app.post_json(&newcomer, "/api/assets/infos", &json!({"assets": [{"asset_uuid": old_uuid}]})).await;
    assert_error(batch, 403, "forbidden").await;
    let listing: Value = app.get(&newcomer, "/api/sessions/7/assets").await.json().await.unwrap();
    assert_eq!(listing["assets"], json!([]));
    // Its own assets are the new members' to see; services still see the old ones.
    let new = app.upload_ok(&newcomer, 7, "mine.txt", b"m").await;
    let new_uuid = new["asset_uuid"].as_str().unwrap();
    assert_eq!(app.get(&newcomer, &format!("/api/assets/infos?asset_uuid={new_uuid}")).await.status(), 200);
    assert_eq!(app.get(&service, &format!("/api/assets/infos?asset_uuid={old_uuid}")).await.status(), 200);

    // The rule holds after a replay too (it comes from the events alone).
    let (sessions, assets) =
        (app.table_snapshot("sessions", "id_session").await, app.table_snapshot("assets", "asset_uuid").await);
    let mut client = app.ctx.app.pool.get().await.unwrap();
    assetd::projections::replay(&mut client).await.unwrap();
    assert_eq!(app.table_snapshot("sessions", "id_session").await, sessions);
    assert_eq!(app.table_snapshot("assets", "asset_uuid").await, assets);
    assert_error(app.get(&newcomer, &format!("/api/assets/infos?asset_uuid={old_uuid}")).await, 403, "forbidden").await;

    // Migration 0005 fills the new columns of existing databases as the projections do.
    let migration = include_str!("../../src/migrations/0005_session_registrations.sql");
    let backfill: String = migration.split(';').filter(|s| s.contains("UPDATE")).map(|s| format!("{s};")).collect();
    client
        .batch_execute("UPDATE sessions SET registered_position = -1; UPDATE assets SET created_position = -1")
        .await
        .unwrap();
    client.batch_execute(&backfill).await.unwrap();
    assert_eq!(app.table_snapshot("sessions", "id_session").await, sessions);
    assert_eq!(app.table_snapshot("assets", "asset_uuid").await, assets);
}

#[tokio::test]
async fn access_tokens_grant_what_their_requester_could_do_when_used() {
    let app = TestApp::spawn().await;
    let service = app.service_token();
    let member = Uuid::new_v4();
    let session = |members: Vec<Uuid>| json!({"session_name": "s", "session_users": members});
    assert_eq!(app.put_session(&service, 1, &session(vec![member])).await.status(), 200);
    let info = app.upload_ok(&app.user_token(member), 1, "x.txt", b"x").await;
    let uuid = info["asset_uuid"].as_str().unwrap();
    let token = info["access_token"].as_str().unwrap().to_owned();
    // A token a service asked for (from the listing).
    let listing: Value = app.get(&service, "/api/sessions/1/assets").await.json().await.unwrap();
    let service_token = listing["assets"][0]["access_token"].as_str().unwrap().to_owned();
    let stranger = app.user_token(Uuid::new_v4());
    let with = |token: &str| format!("/api/assets/infos?asset_uuid={uuid}&access_token={token}");

    assert_eq!(app.get(&stranger, &with(&token)).await.status(), 200);
    // The member who asked for it leaves the session: the token stops working...
    assert_eq!(app.put_session(&service, 1, &session(vec![])).await.status(), 200);
    let body = assert_error(app.get(&stranger, &with(&token)).await, 403, "forbidden").await;
    assert!(body["error"]["message"].as_str().unwrap().contains("requester"), "{body}");
    assert_error(
        app.get(&stranger, &format!("/api/assets?asset_uuid={uuid}&access_token={token}")).await,
        403,
        "forbidden",
    )
    .await;
    // ...and works again when they are back (within its lifetime).
    assert_eq!(app.put_session(&service, 1, &session(vec![member])).await.status(), 200);
    assert_eq!(app.get(&stranger, &with(&token)).await.status(), 200);
    assert_eq!(app.get(&stranger, &with(&service_token)).await.status(), 200);

    // Once the asset is deleted, no token opens its infos, history or bytes.
    assert_eq!(app.delete(&service, &format!("/api/assets?uuid={uuid}")).await.status(), 200);
    for token in [&token, &service_token] {
        assert_error(app.get(&stranger, &with(token)).await, 404, "not_found").await;
        let events = format!("/api/assets/{uuid}/events?access_token={token}");
        assert_error(app.get(&stranger, &events).await, 404, "not_found").await;
        let download = format!("/api/assets?asset_uuid={uuid}&access_token={token}");
        assert_error(app.get(&stranger, &download).await, 404, "not_found").await;
    }
    // Members still see what happened to it.
    assert_eq!(app.get(&app.user_token(member), &format!("/api/assets/{uuid}/events")).await.status(), 200);
}

#[tokio::test]
async fn only_users_are_superadmins_and_token_lifetimes_are_capped() {
    let app = TestApp::spawn().await;
    app.session_with_user(1).await;
    for kind in [PrincipalKind::Participant, PrincipalKind::Device] {
        let claims_superadmin = app.token_for(kind, Uuid::new_v4(), true);
        assert_error(app.get(&claims_superadmin, "/api/sessions/1").await, 403, "forbidden").await;
    }
    assert_eq!(
        app.get(&app.token_for(PrincipalKind::User, Uuid::new_v4(), true), "/api/sessions/1").await.status(),
        200
    );

    let principal = Principal { kind: PrincipalKind::User, uuid: Uuid::new_v4(), name: "u".into(), superadmin: true };
    let for_a_year = app.ctx.app.auth.mint(&principal, 365 * 24 * 3600);
    assert_error(app.get(&for_a_year, "/api/sessions/1").await, 401, "token_lifetime_too_long").await;
    let for_a_day = app.ctx.app.auth.mint(&principal, 24 * 3600);
    assert_eq!(app.get(&for_a_day, "/api/sessions/1").await.status(), 200);
}

/// A valid two-part upload body, to be mutated.
fn multipart_body(boundary: &str, file_asset: &str, content: &[u8]) -> Vec<u8> {
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file_asset\"\r\n\r\n{file_asset}\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f.bin\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(content);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    body
}

/// One way to damage a body: cut it, flip a byte, insert junk, repeat or drop a slice.
#[derive(Debug, Clone)]
enum Mutation {
    Truncate(usize),
    Flip(usize, u8),
    Insert(usize, Vec<u8>),
    Repeat(usize, usize),
    Remove(usize, usize),
}

fn mutation() -> impl proptest::strategy::Strategy<Value = Mutation> {
    use proptest::prelude::*;
    let junk = prop_oneof![
        prop::collection::vec(any::<u8>(), 1..16),
        Just(b"\r\n".to_vec()),
        Just(b"--B0undary\r\n".to_vec()),
        Just(b"--B0undary--".to_vec()),
        Just(b"\r\n\r\n".to_vec()),
        Just(b"Content-Disposition: form-data; name=\"file\"; filename*=UTF-8''%FF%00\r\n".to_vec()),
        Just(b"Content-Disposition: form-data; name=\"file_asset\"\r\n\r\n{\"id_session\":1}".to_vec()),
    ];
    prop_oneof![
        (0..400usize).prop_map(Mutation::Truncate),
        (0..400usize, any::<u8>()).prop_map(|(at, byte)| Mutation::Flip(at, byte)),
        (0..400usize, junk).prop_map(|(at, junk)| Mutation::Insert(at, junk)),
        (0..400usize, 1..64usize).prop_map(|(at, len)| Mutation::Repeat(at, len)),
        (0..400usize, 1..64usize).prop_map(|(at, len)| Mutation::Remove(at, len)),
    ]
}

fn mutate(mut body: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for mutation in mutations {
        let len = body.len();
        let at = |i: usize| i.min(len);
        match mutation {
            Mutation::Truncate(i) => body.truncate(at(*i)),
            Mutation::Flip(i, byte) if *i < len => body[*i] = *byte,
            Mutation::Flip(..) => {}
            Mutation::Insert(i, junk) => {
                body.splice(at(*i)..at(*i), junk.iter().copied());
            }
            Mutation::Repeat(i, n) => {
                let slice = body[at(*i)..at(i + n)].to_vec();
                body.splice(at(*i)..at(*i), slice);
            }
            Mutation::Remove(i, n) => {
                body.drain(at(*i)..at(i + n));
            }
        }
    }
    body
}

/// The multipart reader and `file_asset` parsing, fuzzed through the real server:
/// damaged bodies get a 200 or a JSON 4xx, never a 5xx or a hang, and leave no temp file
/// and no asset behind unless they were answered 200.
async fn damaged_multipart_bodies_get_json_answers_and_leave_nothing_behind(backend: Backend) {
    use proptest::strategy::{Strategy, ValueTree};
    let app = TestApp::on(backend).await;
    let (_, token) = app.session_with_user(1).await;
    let valid =
        multipart_body("B0undary", r#"{"id_session":1,"asset_name":"fuzz","metadata":{"a":[1.5,"x"]}}"#, &[7; 200]);
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = proptest::collection::vec(mutation(), 1..4);
    let (mut stored, cases) = (0, 600);
    for _ in 0..cases {
        let mutations = strategy.new_tree(&mut runner).unwrap().current();
        let body = mutate(valid.clone(), &mutations);
        let request = app
            .client
            .post(app.url("/api/assets"))
            .header("Authorization", format!("OpenTera {token}"))
            .header("Content-Type", "multipart/form-data; boundary=B0undary")
            .body(body.clone())
            .timeout(std::time::Duration::from_secs(30));
        let response = request.send().await.unwrap_or_else(|e| panic!("{mutations:?}: {e}"));
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        assert!(status == 200 || (400..500).contains(&status), "{mutations:?} answered {status}: {text}");
        let json: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{mutations:?}: not JSON: {text}"));
        if status == 200 {
            stored += 1;
        } else {
            assert!(json["error"]["code"].is_string(), "{mutations:?}: {json}");
        }
    }
    let (_, assets, temp_files, blobs) = app.footprint().await;
    assert_eq!((assets, blobs), (stored, stored as usize), "only what was answered 200 is stored");
    assert_eq!(temp_files, 0, "no temp file is left behind");
}

on_both_backends!(
    hostile_uploads_fail_only_themselves_and_what_is_stored_reads_back,
    damaged_multipart_bodies_get_json_answers_and_leave_nothing_behind,
);

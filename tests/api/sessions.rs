//! Sessions: registration by services, access rules, deletion with assets, listings.

use std::time::Duration;

use assetd::domain::principal::PrincipalKind;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{assert_error, TestApp};

#[tokio::test]
async fn services_register_update_and_members_read_sessions() {
    let app = TestApp::spawn().await;
    let service = app.service_token();
    let (user, participant, device, creator) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let body = json!({
        "session_name": "Visit 12", "id_creator_uuid": creator,
        "session_users": [user], "session_participants": [participant], "session_devices": [device],
    });
    let response = app.put_session(&service, 12, &body).await;
    assert_eq!(response.status(), 200);
    let registered: Value = response.json().await.unwrap();
    assert_eq!(registered["id_session"], 12);
    assert_eq!(registered["session_name"], "Visit 12");
    assert_eq!(registered["session_version"], 1);
    let session_uuid = registered["session_uuid"].clone();
    assert!(session_uuid.is_string());

    // Idempotent: the same body again changes nothing, appends nothing.
    let events_before = app.event_count().await;
    let again: Value = app.put_session(&service, 12, &body).await.json().await.unwrap();
    assert_eq!(again["session_version"], 1);
    assert_eq!(app.event_count().await, events_before);

    let mut renamed = body.clone();
    renamed["session_name"] = json!("Visit 12b");
    let updated: Value = app.put_session(&service, 12, &renamed).await.json().await.unwrap();
    assert_eq!(updated["session_version"], 2);
    assert_eq!(updated["session_uuid"], session_uuid, "the uuid is kept across updates");

    for (kind, uuid) in [
        (PrincipalKind::User, user),
        (PrincipalKind::Participant, participant),
        (PrincipalKind::Device, device),
        (PrincipalKind::User, creator),
    ] {
        let response = app.get(&app.token_for(kind, uuid, false), "/api/sessions/12").await;
        assert_eq!(response.status(), 200, "{kind:?} {uuid} is a member");
    }
    assert_eq!(
        app.get(&app.token_for(PrincipalKind::User, Uuid::new_v4(), true), "/api/sessions/12").await.status(),
        200
    );
    assert_error(app.get(&app.user_token(Uuid::new_v4()), "/api/sessions/12").await, 403, "forbidden").await;
    assert_error(
        app.get(&app.token_for(PrincipalKind::Participant, user, false), "/api/sessions/12").await,
        403,
        "forbidden",
    )
    .await;
    assert_error(app.get(&service, "/api/sessions/404").await, 404, "not_found").await;
}

#[tokio::test]
async fn only_services_register_or_delete_sessions() {
    let app = TestApp::spawn().await;
    let body = json!({"session_name": "v"});
    let admin = app.token_for(PrincipalKind::User, Uuid::new_v4(), true);
    for token in
        [app.user_token(Uuid::new_v4()), admin.clone(), app.token_for(PrincipalKind::Device, Uuid::new_v4(), false)]
    {
        assert_error(app.put_session(&token, 1, &body).await, 403, "forbidden").await;
    }
    assert_eq!(app.put_session(&app.service_token(), 1, &body).await.status(), 200);
    assert_error(app.delete(&app.user_token(Uuid::new_v4()), "/api/sessions/1").await, 403, "forbidden").await;
    assert_error(app.delete(&admin, "/api/sessions/1").await, 403, "forbidden").await;
    assert_eq!(app.get(&admin, "/api/sessions/1").await.status(), 200, "superadmins read any session");
    assert_eq!(app.event_count().await, 1);
}

#[tokio::test]
async fn session_bodies_and_ids_are_validated() {
    let app = TestApp::spawn().await;
    let service = app.service_token();
    assert_error(app.put_session(&service, 0, &json!({"session_name": "v"})).await, 422, "invalid_field").await;
    assert_error(app.put_session(&service, 1, &json!({"session_name": "  "})).await, 422, "invalid_field").await;
    assert_error(app.put_session(&service, 1, &json!({"session_users": []})).await, 422, "invalid_field").await;
    assert_error(
        app.put_session(&service, 1, &json!({"session_name": "v", "session_users": ["not-a-uuid"]})).await,
        422,
        "invalid_field",
    )
    .await;
    assert_error(
        app.put_session(&service, 1, &json!({"session_name": "v", "unexpected": 1})).await,
        422,
        "invalid_field",
    )
    .await;
    let not_json = app
        .client
        .put(app.url("/api/sessions/1"))
        .header("Authorization", format!("Bearer {service}"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_error(not_json, 400, "invalid_json").await;
    let huge = app
        .client
        .put(app.url("/api/sessions/1"))
        .header("Authorization", format!("Bearer {service}"))
        .body(vec![b' '; 2 * 1024 * 1024])
        .send()
        .await
        .unwrap();
    assert_error(huge, 413, "payload_too_large").await;
    assert_error(app.get(&service, "/api/sessions/abc").await, 400, "invalid_parameter").await;
    for content_type in ["text/plain", "application/x-www-form-urlencoded"] {
        let wrong_type = app
            .client
            .put(app.url("/api/sessions/1"))
            .header("Authorization", format!("Bearer {service}"))
            .header("Content-Type", content_type)
            .body(r#"{"session_name": "v"}"#)
            .send()
            .await
            .unwrap();
        assert_error(wrong_type, 415, "unsupported_media_type").await;
    }
    assert_eq!(app.event_count().await, 0);
}

#[tokio::test]
async fn deleting_a_session_deletes_its_assets_with_an_event_each() {
    let app = TestApp::spawn().await;
    let (_, token) = app.session_with_user(5).await;
    let (_, other_token) = app.session_with_user(6).await;
    let a = app.upload_ok(&token, 5, "a.txt", b"a").await;
    let b = app.upload_ok(&token, 5, "b.txt", b"b").await;
    let kept = app.upload_ok(&other_token, 6, "c.txt", b"c").await;

    assert_eq!(app.delete_session_and_purge(5).await, 2);

    for asset in [&a, &b] {
        let uuid = asset["asset_uuid"].as_str().unwrap();
        let history: Value =
            app.get(&app.service_token(), &format!("/api/assets/{uuid}/events")).await.json().await.unwrap();
        let types: Vec<&str> = history.as_array().unwrap().iter().map(|e| e["event_type"].as_str().unwrap()).collect();
        assert_eq!(types, ["AssetUploaded", "AssetDeleted"]);
        assert_eq!(history[1]["data"]["reason"], "session_deleted");
        assert_error(app.get(&app.service_token(), &format!("/api/assets?asset_uuid={uuid}")).await, 404, "not_found")
            .await;
        assert!(!app.ctx.app.blobs.local().path(uuid.parse().unwrap()).exists(), "bytes removed");
    }
    let kept_uuid = kept["asset_uuid"].as_str().unwrap();
    assert_eq!(app.get(&other_token, &format!("/api/assets?asset_uuid={kept_uuid}")).await.status(), 200);
    assert_error(app.get(&app.service_token(), "/api/sessions/5").await, 404, "not_found").await;
    assert_error(app.delete(&app.service_token(), "/api/sessions/5").await, 404, "not_found").await;
    assert_eq!(app.scalar("SELECT count(*) FROM events WHERE type = 'SessionDeleted'").await, 1);

    // A deleted session can be registered again, empty.
    assert_eq!(app.put_session(&app.service_token(), 5, &json!({"session_name": "again"})).await.status(), 200);
    let listing: Value = app.get(&app.service_token(), "/api/sessions/5/assets").await.json().await.unwrap();
    assert_eq!(listing["assets"], json!([]));
}

#[tokio::test]
async fn listings_are_newest_first_paginated_and_filtered_by_directory() {
    let app = TestApp::spawn().await;
    let (_, token) = app.session_with_user(3).await;
    let mut uploaded = Vec::new();
    for n in 0..7 {
        let directory = if n % 2 == 0 { "/even" } else { "/odd" };
        let response = app
            .upload(
                &token,
                &json!({"id_session": 3, "asset_name": format!("n{n}"), "directory": directory}),
                &format!("{n}.bin"),
                vec![n as u8],
            )
            .await;
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        uploaded.push(body["asset_uuid"].as_str().unwrap().to_owned());
    }
    let mut listed = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/sessions/3/assets?limit=3&cursor={c}"),
            None => "/api/sessions/3/assets?limit=3".to_owned(),
        };
        let page: Value = app.get(&token, &path).await.json().await.unwrap();
        pages += 1;
        for item in page["assets"].as_array().unwrap() {
            assert!(item["access_token"].as_str().is_some_and(|t| !t.is_empty()), "each item carries an access token");
            listed.push(item["asset_uuid"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let newest_first: Vec<String> = uploaded.iter().rev().cloned().collect();
    assert_eq!(listed, newest_first);

    let odd: Value = app.get(&token, "/api/sessions/3/assets?directory=/odd").await.json().await.unwrap();
    assert_eq!(odd["assets"].as_array().unwrap().len(), 3);
    assert!(odd["assets"].as_array().unwrap().iter().all(|a| a["directory"] == "/odd"));

    assert_error(app.get(&token, "/api/sessions/3/assets?limit=0").await, 400, "invalid_parameter").await;
    assert_error(app.get(&token, "/api/sessions/3/assets?limit=x").await, 400, "invalid_parameter").await;
    assert_error(app.get(&token, "/api/sessions/3/assets?cursor=garbage").await, 400, "invalid_parameter").await;
    // A cursor is a position: before the year 1, nothing is older; after 9999, everything.
    let far_past = format!("/api/sessions/3/assets?cursor=-300000000000000000_{}", "0".repeat(32));
    let page: Value = app.get(&token, &far_past).await.json().await.unwrap();
    assert_eq!(page["assets"], json!([]));
    let far_future = format!("/api/sessions/3/assets?limit=1000&cursor=999999999999999999_{}", "f".repeat(32));
    let page: Value = app.get(&token, &far_future).await.json().await.unwrap();
    assert_eq!(page["assets"].as_array().unwrap().len(), uploaded.len());
    assert_error(
        app.get(&token, "/api/sessions/3/assets?cursor=1_00000000-0000-0000-0000-000000000000").await,
        400,
        "invalid_parameter",
    )
    .await;
    assert_error(app.get(&token, "/api/sessions/3/assets?directory=/a/../b").await, 422, "invalid_field").await;
    assert_error(app.get(&app.user_token(Uuid::new_v4()), "/api/sessions/3/assets").await, 403, "forbidden").await;
}

/// An upload whose session is deleted, or whose uploader is removed from it, while its
/// bytes stream is not recorded, and its bytes are removed.
#[tokio::test]
async fn an_upload_is_not_recorded_when_its_session_changes_meanwhile() {
    use assetd::app::AppError;
    use assetd::domain::principal::Principal;

    let app = TestApp::spawn().await;
    let (user, _) = app.session_with_user(8).await;
    let (other_user, _) = app.session_with_user(9).await;
    let store = |principal: Principal, id_session: i64| {
        let app = &app;
        async move {
            let asset_uuid = Uuid::new_v4();
            (app.store_upload_directly(&principal, id_session, asset_uuid).await, asset_uuid)
        }
    };
    let member = |uuid| Principal { kind: PrincipalKind::User, uuid, name: String::new(), superadmin: false };

    assert_eq!(app.delete(&app.service_token(), "/api/sessions/8").await.status(), 202);
    let before = app.footprint().await;
    let (result, uuid) = store(member(user), 8).await;
    assert!(matches!(result, Err(AppError::Domain(assetd::domain::DomainError::NotFound("session")))), "{result:?}");
    assert!(!app.ctx.app.blobs.local().path(uuid).exists(), "the bytes are removed");
    assert_eq!(app.footprint().await, before);

    // Session 9 no longer lists this user.
    assert_eq!(
        app.put_session(&app.service_token(), 9, &json!({"session_name": "s", "session_users": []})).await.status(),
        200
    );
    let before = app.footprint().await;
    let (result, uuid) = store(member(other_user), 9).await;
    assert!(matches!(result, Err(AppError::Forbidden(_))), "{result:?}");
    assert!(!app.ctx.app.blobs.local().path(uuid).exists());
    assert_eq!(app.footprint().await, before);
}

/// Uploads arriving together are recorded in one transaction (group commit), yet each is
/// judged on its own: refused ones leave nothing, and one that makes the batch's
/// transaction fail (here a stream that already exists) does not take the others down.
#[tokio::test]
async fn uploads_recorded_together_are_judged_one_by_one() {
    use assetd::app::AppError;
    use assetd::domain::principal::Principal;

    let app = TestApp::spawn().await;
    let (member, _) = app.session_with_user(8).await;
    app.session_with_user(9).await;
    let user = Principal { kind: PrincipalKind::User, uuid: member, name: String::new(), superadmin: false };
    let taken = Uuid::new_v4();
    {
        let client = app.ctx.app.pool.get().await.unwrap();
        client
            .execute(
                "INSERT INTO events (stream, version, id, type, data, metadata) VALUES ($1, 1, $2, 'Other', '{}', '{}')",
                &[&format!("asset-{taken}"), &Uuid::new_v4()],
            )
            .await
            .unwrap();
    }
    let before = app.footprint().await;
    // 30 good ones, 5 to a session that does not admit the user, 4 to none, 1 taken uuid.
    let mut planned: Vec<(i64, Uuid)> = (0..30).map(|_| (8, Uuid::new_v4())).collect();
    let twice = planned[0].1;
    planned.extend((0..5).map(|_| (9, Uuid::new_v4())));
    planned.extend((0..4).map(|_| (77, Uuid::new_v4())));
    planned.push((8, taken));
    let outcomes = futures::future::join_all(
        planned.iter().map(|(session, uuid)| app.store_upload_directly(&user, *session, *uuid)),
    )
    .await;
    // The same uuid again, however it comes, never replaces the bytes nor the record.
    let again = app.store_upload_directly(&user, 8, twice).await;
    assert!(matches!(&again, Err(AppError::Storage(e)) if e.kind() == std::io::ErrorKind::AlreadyExists), "{again:?}");
    assert_eq!(std::fs::read(app.ctx.app.blobs.local().path(twice)).unwrap(), twice.as_bytes());
    for ((session, uuid), outcome) in planned.iter().zip(&outcomes) {
        match (session, outcome) {
            (8, Ok(info)) if *uuid != taken => {
                assert_eq!(info.asset_uuid, *uuid);
                assert!(app.ctx.app.blobs.local().path(*uuid).exists());
            }
            (8, Err(AppError::EventStore(conflict))) if *uuid == taken => assert!(conflict.is_conflict()),
            (9, Err(AppError::Forbidden(_))) => assert!(!app.ctx.app.blobs.local().path(*uuid).exists()),
            (77, Err(AppError::Domain(assetd::domain::DomainError::NotFound("session")))) => {
                assert!(!app.ctx.app.blobs.local().path(*uuid).exists())
            }
            other => panic!("unexpected outcome for session {session}: {other:?}"),
        }
    }
    let (events, assets, temp_files, blobs) = app.footprint().await;
    assert_eq!((events, assets, temp_files, blobs), (before.0 + 30, before.1 + 30, before.2, before.3 + 30));
}

/// Recording never queues behind a session that another transaction holds (a long
/// session delete, say): uploads to other sessions go on, and the held session's upload
/// is recorded once it is free.
#[tokio::test]
async fn a_session_held_by_another_transaction_does_not_stall_other_uploads() {
    use assetd::domain::principal::Principal;

    let app = TestApp::spawn().await;
    app.session_with_user(8).await;
    app.session_with_user(9).await;
    let admin = Principal { kind: PrincipalKind::User, uuid: Uuid::new_v4(), name: String::new(), superadmin: true };
    let mut holder = app.ctx.app.pool.get().await.unwrap();
    let hold = holder.transaction().await.unwrap();
    hold.execute("SELECT 1 FROM sessions WHERE id_session = 8 FOR UPDATE", &[]).await.unwrap();

    let held_uuid = Uuid::new_v4();
    let held = tokio::spawn({
        let ctx = app.ctx.clone();
        let admin = admin.clone();
        async move { crate::helpers::store_upload_via(&ctx.app, &admin, 8, held_uuid).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!held.is_finished(), "the upload to the held session waits for it");
    let other = tokio::time::timeout(Duration::from_secs(5), app.store_upload_directly(&admin, 9, Uuid::new_v4()))
        .await
        .expect("an upload to another session is not stalled");
    assert!(other.is_ok(), "{other:?}");

    hold.rollback().await.unwrap();
    let held = tokio::time::timeout(Duration::from_secs(10), held).await.expect("recorded once free").unwrap();
    assert_eq!(held.unwrap().asset_uuid, held_uuid);
}

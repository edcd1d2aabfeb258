//! Assets end to end: upload, download (headers, ranges, conditional), infos, rename,
//! delete, history, and who may do what.

use assetd::domain::principal::{Principal, PrincipalKind};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{assert_error, pseudo_random_bytes, sha256_hex, Backend, TestApp};

async fn upload_download_rename_delete_round_trip_with_events(backend: Backend) {
    let app = TestApp::on(backend).await;
    let (user, token) = app.session_with_user(1).await;
    let bytes = pseudo_random_bytes(1, 300_000);
    let response = app
        .upload(
            &token,
            &json!({"id_session": 1, "asset_name": "Asset Name", "directory": "/videos", "tags": ["a", "b"],
                    "metadata": {"camera": 2}, "asset_datetime": "2026-01-02T03:04:05Z"}),
            "name.zip",
            bytes.clone(),
        )
        .await;
    assert_eq!(response.status(), 200);
    let request_id = response.headers()["x-request-id"].to_str().unwrap().to_owned();
    let info: Value = response.json().await.unwrap();
    let uuid = info["asset_uuid"].as_str().unwrap().to_owned();
    assert_eq!(info["id_session"], 1);
    assert_eq!(info["asset_name"], "Asset Name");
    assert_eq!(info["asset_original_filename"], "name.zip");
    assert_eq!(info["asset_type"], "application/zip", "guessed from the file name");
    assert_eq!(info["asset_file_size"], 300_000);
    assert_eq!(info["asset_sha256"], sha256_hex(&bytes));
    assert_eq!(info["directory"], "/videos");
    assert_eq!(info["tags"], json!(["a", "b"]));
    assert_eq!(info["metadata"], json!({"camera": 2}));
    assert_eq!(info["asset_datetime"], "2026-01-02T03:04:05Z");
    assert_eq!(info["asset_status"], "available");
    assert_eq!(info["asset_source"], "upload");
    assert_eq!(info["asset_version"], 1);
    assert_eq!(info["asset_creator"], json!({"kind": "user", "uuid": user}));
    assert!(info["access_token"].as_str().is_some_and(|t| t.len() > 20));
    assert_eq!(info["asset_url"], format!("http://{}/file/api/assets?asset_uuid={uuid}", app.addr));
    assert_eq!(info["asset_infos_url"], format!("http://{}/file/api/assets/infos?asset_uuid={uuid}", app.addr));

    let download = app.get(&token, &format!("/api/assets?asset_uuid={uuid}")).await;
    assert_eq!(download.status(), 200);
    let headers = download.headers().clone();
    assert_eq!(headers["content-type"], "application/zip");
    assert_eq!(headers["content-length"], "300000");
    assert_eq!(headers["accept-ranges"], "bytes");
    assert_eq!(headers["etag"].to_str().unwrap(), format!("\"sha256:{}\"", sha256_hex(&bytes)));
    assert_eq!(headers["content-disposition"], "attachment; filename=\"name.zip\"; filename*=UTF-8''name.zip");
    assert_eq!(download.bytes().await.unwrap().as_ref(), &bytes[..]);

    let infos: Value = app.get(&token, &format!("/api/assets/infos?asset_uuid={uuid}")).await.json().await.unwrap();
    assert_eq!(infos["asset_sha256"], info["asset_sha256"]);

    let renamed = app
        .post_json(
            &token,
            "/api/assets/infos",
            &json!({"file_asset": {"asset_uuid": uuid, "asset_original_filename": "vidéo du jour.zip"}}),
        )
        .await;
    assert_eq!(renamed.status(), 200);
    let renamed: Value = renamed.json().await.unwrap();
    assert_eq!(renamed["asset_original_filename"], "vidéo du jour.zip");
    assert_eq!(renamed["asset_version"], 2);
    let download = app.get(&token, &format!("/api/assets?asset_uuid={uuid}")).await;
    assert_eq!(
        download.headers()["content-disposition"],
        "attachment; filename=\"vid_o du jour.zip\"; filename*=UTF-8''vid%C3%A9o%20du%20jour.zip"
    );

    assert!(app.blob_exists(uuid.parse().unwrap()).await, "the bytes are where the event says");
    let deleted = app.delete(&token, &format!("/api/assets?uuid={uuid}")).await;
    assert_eq!(deleted.status(), 200);
    assert_error(app.get(&token, &format!("/api/assets?asset_uuid={uuid}")).await, 404, "not_found").await;
    assert_error(app.delete(&token, &format!("/api/assets?uuid={uuid}")).await, 404, "not_found").await;
    assert!(!app.blob_exists(uuid.parse().unwrap()).await, "bytes removed after the event");
    let infos: Value = app.get(&token, &format!("/api/assets/infos?asset_uuid={uuid}")).await.json().await.unwrap();
    assert_eq!(infos["asset_status"], "deleted");

    let history: Value = app.get(&token, &format!("/api/assets/{uuid}/events")).await.json().await.unwrap();
    let history = history.as_array().unwrap();
    let types: Vec<&str> = history.iter().map(|e| e["event_type"].as_str().unwrap()).collect();
    assert_eq!(types, ["AssetUploaded", "AssetRenamed", "AssetDeleted"]);
    for event in history {
        assert_eq!(event["metadata"]["actor"], json!({"kind": "user", "uuid": user}));
        assert!(event["metadata"]["request_id"].as_str().is_some_and(|r| !r.is_empty()));
        assert!(event["metadata"]["service_version"].is_string());
    }
    assert_eq!(history[0]["metadata"]["request_id"], request_id, "the upload's request id is in its event");
    assert_eq!(history[0]["data"]["asset_sha256"], sha256_hex(&bytes));
    assert_eq!(history[1]["data"]["previous_filename"], "name.zip");
}

async fn ranges_and_conditional_requests(backend: Backend) {
    let app = TestApp::on(backend).await;
    let (_, token) = app.session_with_user(1).await;
    let bytes = pseudo_random_bytes(2, 1000);
    let info = app.upload_ok(&token, 1, "r.bin", &bytes).await;
    let path = format!("/file/api/assets?asset_uuid={}", info["asset_uuid"].as_str().unwrap());
    let get = |headers: Vec<(&'static str, String)>| {
        let mut request =
            app.client.get(format!("http://{}{path}", app.addr)).header("Authorization", format!("Bearer {token}"));
        for (name, value) in headers {
            request = request.header(name, value);
        }
        request.send()
    };

    let partial = get(vec![("Range", "bytes=10-19".into())]).await.unwrap();
    assert_eq!(partial.status(), 206);
    assert_eq!(partial.headers()["content-range"], "bytes 10-19/1000");
    assert_eq!(partial.headers()["content-length"], "10");
    assert_eq!(partial.bytes().await.unwrap().as_ref(), &bytes[10..20]);

    let suffix = get(vec![("Range", "bytes=-5".into())]).await.unwrap();
    assert_eq!(suffix.status(), 206);
    assert_eq!(suffix.bytes().await.unwrap().as_ref(), &bytes[995..]);

    let open_ended = get(vec![("Range", "bytes=990-".into())]).await.unwrap();
    assert_eq!(open_ended.headers()["content-range"], "bytes 990-999/1000");

    let unsatisfiable = get(vec![("Range", "bytes=1000-".into())]).await.unwrap();
    assert_eq!(unsatisfiable.headers()["content-range"], "bytes */1000");
    assert_error(unsatisfiable, 416, "range_not_satisfiable").await;

    let multiple = get(vec![("Range", "bytes=0-1,5-6".into())]).await.unwrap();
    assert_eq!(multiple.status(), 200, "several ranges are answered with the whole file");
    assert_eq!(multiple.bytes().await.unwrap().len(), 1000);

    let etag = format!("\"sha256:{}\"", sha256_hex(&bytes));
    let cached = get(vec![("If-None-Match", etag.clone())]).await.unwrap();
    assert_eq!(cached.status(), 304);
    assert_eq!(cached.headers()["etag"].to_str().unwrap(), etag);
    assert!(cached.bytes().await.unwrap().is_empty());
    assert_eq!(get(vec![("If-None-Match", "\"other\"".into())]).await.unwrap().status(), 200);

    let stale_if_range = get(vec![("Range", "bytes=0-1".into()), ("If-Range", "\"old\"".into())]).await.unwrap();
    assert_eq!(stale_if_range.status(), 200, "If-Range with another validator sends everything");
    let fresh_if_range = get(vec![("Range", "bytes=0-1".into()), ("If-Range", etag)]).await.unwrap();
    assert_eq!(fresh_if_range.status(), 206);

    // A blob of several parts on S3 (5 MiB each in the tests): ranges across a part's
    // end, within the last part, and the whole.
    let large = pseudo_random_bytes(3, (11 << 20) + 7);
    let info = app.upload_ok(&token, 1, "large.bin", &large).await;
    let url = format!("http://{}/file/api/assets?asset_uuid={}", app.addr, info["asset_uuid"].as_str().unwrap());
    for (start, end) in [(0, 9), ((5 << 20) - 3, (5 << 20) + 2), ((10 << 20) + 1, large.len() - 1)] {
        let answer = app
            .client
            .get(&url)
            .header("Authorization", format!("Bearer {token}"))
            .header("Range", format!("bytes={start}-{end}"))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 206);
        assert_eq!(answer.bytes().await.unwrap().as_ref(), &large[start..=end], "bytes {start}-{end}");
    }
    let whole = app.client.get(&url).header("Authorization", format!("Bearer {token}")).send().await.unwrap();
    assert_eq!(sha256_hex(&whole.bytes().await.unwrap()), sha256_hex(&large));
}

async fn access_tokens_open_one_asset_to_callers_without_session_access(backend: Backend) {
    let app = TestApp::on(backend).await;
    let (user, token) = app.session_with_user(1).await;
    let info = app.upload_ok(&token, 1, "x.txt", b"secret").await;
    let other = app.upload_ok(&token, 1, "y.txt", b"other").await;
    let uuid = info["asset_uuid"].as_str().unwrap();
    let access_token = info["access_token"].as_str().unwrap();
    let stranger = app.user_token(Uuid::new_v4());

    assert_error(app.get(&stranger, &format!("/api/assets?asset_uuid={uuid}")).await, 403, "forbidden").await;
    let with_token = app.get(&stranger, &format!("/api/assets?asset_uuid={uuid}&access_token={access_token}")).await;
    assert_eq!(with_token.status(), 200);
    assert_eq!(with_token.bytes().await.unwrap().as_ref(), b"secret");
    let infos = app.get(&stranger, &format!("/api/assets/infos?asset_uuid={uuid}&access_token={access_token}")).await;
    assert_eq!(infos.status(), 200);

    // The token names one asset only, and is no principal token.
    let other_uuid = other["asset_uuid"].as_str().unwrap();
    assert_error(
        app.get(&stranger, &format!("/api/assets?asset_uuid={other_uuid}&access_token={access_token}")).await,
        403,
        "forbidden",
    )
    .await;
    assert_error(app.get(access_token, &format!("/api/assets?asset_uuid={uuid}")).await, 401, "invalid_token").await;
    let requester = Principal { kind: PrincipalKind::User, uuid: user, name: "u".into(), superadmin: false };
    let expired = app.ctx.app.auth.mint_asset_token(&[uuid.parse().unwrap()], &requester, -60);
    assert_error(
        app.get(&stranger, &format!("/api/assets?asset_uuid={uuid}&access_token={expired}")).await,
        403,
        "access_token_expired",
    )
    .await;
    assert_error(
        app.get(&stranger, &format!("/api/assets?asset_uuid={uuid}&access_token=garbage")).await,
        403,
        "forbidden",
    )
    .await;

    // Batch infos: every asset must be reachable.
    let batch = app
        .post_json(
            &stranger,
            "/api/assets/infos",
            &json!({"assets": [{"asset_uuid": uuid, "access_token": access_token}]}),
        )
        .await;
    assert_eq!(batch.status(), 200);
    let batch: Value = batch.json().await.unwrap();
    assert_eq!(batch.as_array().unwrap().len(), 1);
    let refused = app
        .post_json(
            &stranger,
            "/api/assets/infos",
            &json!({"assets": [{"asset_uuid": uuid, "access_token": access_token}, {"asset_uuid": other_uuid}]}),
        )
        .await;
    assert_error(refused, 403, "forbidden").await;
    let members_batch: Value = app
        .post_json(&token, "/api/assets/infos", &json!({"assets": [{"asset_uuid": uuid}, {"asset_uuid": other_uuid}]}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(members_batch.as_array().unwrap().len(), 2);
    let unknown =
        app.post_json(&token, "/api/assets/infos", &json!({"assets": [{"asset_uuid": Uuid::new_v4()}]})).await;
    assert_error(unknown, 404, "not_found").await;

    // A stranger with the token can delete, as in OpenTera.
    assert_eq!(
        app.delete(&stranger, &format!("/api/assets?uuid={uuid}&access_token={access_token}")).await.status(),
        200
    );
}

async fn services_upload_on_behalf_of_a_named_creator(backend: Backend) {
    let app = TestApp::on(backend).await;
    app.session_with_user(1).await;
    let service = app.service_token();
    let participant = Uuid::new_v4();
    let response = app
        .upload(
            &service,
            &json!({"id_session": 1, "asset_name": "n", "id_participant": participant}),
            "n.txt",
            b"x".to_vec(),
        )
        .await;
    assert_eq!(response.status(), 200);
    let info: Value = response.json().await.unwrap();
    assert_eq!(info["asset_creator"], json!({"kind": "participant", "uuid": participant}));

    let anonymous = app.upload(&service, &json!({"id_session": 1, "asset_name": "n"}), "n.txt", b"x".to_vec()).await;
    assert_error(anonymous, 422, "invalid_field").await;
    let two = app
        .upload(
            &service,
            &json!({"id_session": 1, "asset_name": "n", "id_user": Uuid::new_v4(), "id_device": Uuid::new_v4()}),
            "n.txt",
            b"x".to_vec(),
        )
        .await;
    assert_error(two, 422, "invalid_field").await;
}

async fn non_members_cannot_reach_a_sessions_assets_but_superadmins_can(backend: Backend) {
    let app = TestApp::on(backend).await;
    let (_, token) = app.session_with_user(1).await;
    let info = app.upload_ok(&token, 1, "a.txt", b"a").await;
    let uuid = info["asset_uuid"].as_str().unwrap();
    let stranger = app.user_token(Uuid::new_v4());
    let before = app.footprint().await;
    assert_error(
        app.upload(&stranger, &json!({"id_session": 1, "asset_name": "n"}), "n.txt", b"x".to_vec()).await,
        403,
        "forbidden",
    )
    .await;
    assert_error(app.delete(&stranger, &format!("/api/assets?uuid={uuid}")).await, 403, "forbidden").await;
    let rename = app
        .post_json(
            &stranger,
            "/api/assets/infos",
            &json!({"file_asset": {"asset_uuid": uuid, "asset_original_filename": "b"}}),
        )
        .await;
    assert_error(rename, 403, "forbidden").await;
    assert_error(app.get(&stranger, &format!("/api/assets/{uuid}/events")).await, 403, "forbidden").await;
    assert_error(app.get(&stranger, &format!("/api/assets/infos?asset_uuid={uuid}")).await, 403, "forbidden").await;
    assert_eq!(app.footprint().await, before);

    // Superadmins are users (a device claiming it is refused: hardening.rs).
    let admin = app.token_for(PrincipalKind::User, Uuid::new_v4(), true);
    assert_eq!(app.get(&admin, &format!("/api/assets?asset_uuid={uuid}")).await.status(), 200);
    assert_eq!(
        app.upload(&admin, &json!({"id_session": 1, "asset_name": "n"}), "n.txt", b"x".to_vec()).await.status(),
        200
    );
}

async fn asset_types_come_from_file_asset_then_the_part_then_the_name(backend: Backend) {
    let app = TestApp::on(backend).await;
    let (_, token) = app.session_with_user(1).await;
    let explicit = app
        .upload(
            &token,
            &json!({"id_session": 1, "asset_name": "n", "asset_type": "video/webm"}),
            "n.mp4",
            b"x".to_vec(),
        )
        .await;
    assert_eq!(explicit.json::<Value>().await.unwrap()["asset_type"], "video/webm");
    let guessed = app.upload(&token, &json!({"id_session": 1, "asset_name": "n"}), "n.mp4", b"x".to_vec()).await;
    assert_eq!(guessed.json::<Value>().await.unwrap()["asset_type"], "video/mp4");
    let form = reqwest::multipart::Form::new()
        .text("file_asset", json!({"id_session": 1, "asset_name": "n"}).to_string())
        .part(
            "file",
            reqwest::multipart::Part::bytes(b"x".to_vec()).file_name("data").mime_str("application/zip").unwrap(),
        );
    let from_part: Value = app.post_form(&token, form).await.json().await.unwrap();
    assert_eq!(from_part["asset_type"], "application/zip");
    let unknown = app.upload(&token, &json!({"id_session": 1, "asset_name": "n"}), "n.zzqq", b"x".to_vec()).await;
    assert_eq!(unknown.json::<Value>().await.unwrap()["asset_type"], "application/octet-stream");
}

async fn empty_files_and_a_file_part_before_file_asset_are_accepted(backend: Backend) {
    let app = TestApp::on(backend).await;
    let (_, token) = app.session_with_user(1).await;
    let empty = app.upload_ok(&token, 1, "empty.txt", b"").await;
    assert_eq!(empty["asset_file_size"], 0);
    let uuid = empty["asset_uuid"].as_str().unwrap();
    let download = app.get(&token, &format!("/api/assets?asset_uuid={uuid}")).await;
    assert_eq!(download.status(), 200);
    assert!(download.bytes().await.unwrap().is_empty());

    let form = reqwest::multipart::Form::new()
        .part("file", reqwest::multipart::Part::bytes(b"late".to_vec()).file_name("late.txt"))
        .text("file_asset", json!({"id_session": 1, "asset_name": "late"}).to_string());
    let response = app.post_form(&token, form).await;
    assert_eq!(response.status(), 200);
}

/// Concurrent commands on one stream queue up instead of failing with 409.
async fn concurrent_commands_on_one_asset_or_session_all_succeed(backend: Backend) {
    let app = TestApp::on(backend).await;
    let (_, token) = app.session_with_user(1).await;
    let info = app.upload_ok(&token, 1, "a.txt", b"a").await;
    let uuid = info["asset_uuid"].as_str().unwrap().to_owned();
    let renames = (0..40).map(|n| {
        let (app, token, uuid) = (&app, &token, &uuid);
        async move {
            let body = json!({"file_asset": {"asset_uuid": uuid, "asset_original_filename": format!("name {n}.txt")}});
            app.post_json(token, "/api/assets/infos", &body).await.status().as_u16()
        }
    });
    let statuses = futures::future::join_all(renames).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let service = app.service_token();
    let upserts = (0..40).map(|n| {
        let (app, service) = (&app, &service);
        async move { app.put_session(service, 1, &json!({"session_name": format!("name {n}")})).await.status().as_u16() }
    });
    let statuses = futures::future::join_all(upserts).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    // (The upserts dropped the user from the session: read as the service.)
    let history: Value = app.get(&service, &format!("/api/assets/{uuid}/events")).await.json().await.unwrap();
    assert_eq!(history.as_array().unwrap().len(), 41, "one upload and 40 renames, in one stream");
}

/// With ASSETD_PUBLIC_URL set, answer URLs ignore what the client says its host is.
async fn a_configured_public_url_is_not_overridden_by_request_headers(backend: Backend) {
    let options = crate::helpers::TestOptions {
        public_url: Some("https://files.example.org".into()),
        backend,
        ..Default::default()
    };
    let app = TestApp::spawn_with(options).await;
    let (_, token) = app.session_with_user(1).await;
    let form = reqwest::multipart::Form::new()
        .text("file_asset", json!({"id_session": 1, "asset_name": "n"}).to_string())
        .part("file", reqwest::multipart::Part::bytes(b"x".to_vec()).file_name("n.txt"));
    let info: Value = app
        .client
        .post(app.url("/api/assets"))
        .header("Authorization", format!("OpenTera {token}"))
        .header("X-Forwarded-Host", "evil.example")
        .multipart(form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let uuid = info["asset_uuid"].as_str().unwrap();
    assert_eq!(info["asset_url"], format!("https://files.example.org/file/api/assets?asset_uuid={uuid}"));
}

/// The `AssetUploaded` event and the asset's info say the same `asset_datetime`: the
/// upload time when none is given, a leap second as the next second, to the microsecond;
/// one that rolls over into the year 10000 is refused.
async fn the_event_and_the_info_agree_on_the_asset_datetime(backend: Backend) {
    let app = TestApp::on(backend).await;
    let (_, token) = app.session_with_user(1).await;
    for (given, shown) in [
        (None, None),
        (Some("2016-12-31T23:59:60Z"), Some("2017-01-01T00:00:00Z")),
        (Some("2026-01-02T03:04:05.123456789+02:00"), Some("2026-01-02T01:04:05.123456Z")),
    ] {
        let mut file_asset = json!({"id_session": 1, "asset_name": "n"});
        if let Some(given) = given {
            file_asset["asset_datetime"] = json!(given);
        }
        let response = app.upload(&token, &file_asset, "f.bin", vec![1]).await;
        assert_eq!(response.status(), 200, "{given:?}");
        let info: Value = response.json().await.unwrap();
        let recorded = app
            .scalar_json(&format!(
                "SELECT data->'asset_datetime' FROM events WHERE stream = 'asset-{}'",
                info["asset_uuid"].as_str().unwrap()
            ))
            .await;
        let parse = |value: &Value| chrono::DateTime::parse_from_rfc3339(value.as_str().unwrap()).unwrap();
        assert_eq!(
            parse(&recorded),
            parse(&info["asset_datetime"]),
            "{given:?}: {recorded} vs {}",
            info["asset_datetime"]
        );
        if let Some(shown) = shown {
            assert_eq!(info["asset_datetime"], shown);
        }
    }
    let response = app
        .upload(
            &token,
            &json!({"id_session": 1, "asset_name": "n", "asset_datetime": "9999-12-31T23:59:60Z"}),
            "f",
            vec![1],
        )
        .await;
    assert_error(response, 422, "invalid_field").await;
}

/// Metadata numbers anywhere in f64's range come back as sent: PostgreSQL's `jsonb` keeps
/// them as exact decimals (1.7976931348623157e308 as 309 digits), which must read back
/// to the same f64, not overflow (found by schemathesis: the upload's events could not be
/// read back, and the whole batch failed with 503).
async fn metadata_numbers_at_the_ends_of_f64_come_back_as_sent(backend: Backend) {
    let app = TestApp::on(backend).await;
    let (_, token) = app.session_with_user(1).await;
    let metadata = json!({
        "max": f64::MAX, "lowest": f64::MIN, "big": 1.7900647685940498e261,
        "smallest": 5e-324, "tiny": -1.6192416955605e-66, "nested": [{"x": 1.7976931348623155e308}],
    });
    let response = app
        .upload(&token, &json!({"id_session": 1, "asset_name": "n", "metadata": metadata}), "n.bin", b"x".to_vec())
        .await;
    assert_eq!(response.status(), 200);
    let uploaded: Value = response.json().await.unwrap();
    assert_eq!(uploaded["metadata"], metadata);
    let uuid = uploaded["asset_uuid"].as_str().unwrap();
    let info: Value = app.get(&token, &format!("/api/assets/infos?asset_uuid={uuid}")).await.json().await.unwrap();
    assert_eq!(info["metadata"], metadata);
    let history: Value = app.get(&token, &format!("/api/assets/{uuid}/events")).await.json().await.unwrap();
    assert_eq!(history[0]["data"]["metadata"], metadata);
}

on_both_backends!(
    upload_download_rename_delete_round_trip_with_events,
    ranges_and_conditional_requests,
    access_tokens_open_one_asset_to_callers_without_session_access,
    services_upload_on_behalf_of_a_named_creator,
    non_members_cannot_reach_a_sessions_assets_but_superadmins_can,
    asset_types_come_from_file_asset_then_the_part_then_the_name,
    empty_files_and_a_file_part_before_file_asset_are_accepted,
    concurrent_commands_on_one_asset_or_session_all_succeed,
    a_configured_public_url_is_not_overridden_by_request_headers,
    the_event_and_the_info_agree_on_the_asset_datetime,
    metadata_numbers_at_the_ends_of_f64_come_back_as_sent,
);

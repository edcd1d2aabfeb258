//! Replay: the read models rebuilt from the events alone equal the ones kept inline.

use serde_json::json;

use crate::helpers::TestApp;

#[tokio::test]
async fn replay_rebuilds_identical_read_models_after_a_mixed_workload() {
    let app = TestApp::spawn().await;
    let service = app.service_token();
    let (_, token1) = app.session_with_user(1).await;
    let (_, token2) = app.session_with_user(2).await;
    app.session_with_user(3).await;

    let mut uuids = Vec::new();
    for n in 0..12 {
        let (token, session) = if n % 3 == 0 { (&token2, 2) } else { (&token1, 1) };
        let info = app
            .upload(token, &json!({"id_session": session, "asset_name": format!("asset {n}"), "tags": [format!("t{n}")], "directory": format!("/d{}", n % 2)}), &format!("f{n}.dat"), vec![n as u8; n * 10])
            .await
            .json::<serde_json::Value>()
            .await
            .unwrap();
        uuids.push((info["asset_uuid"].as_str().unwrap().to_owned(), token.clone()));
    }
    for (uuid, token) in uuids.iter().step_by(3) {
        let renamed = app
            .post_json(
                token,
                "/api/assets/infos",
                &json!({"file_asset": {"asset_uuid": uuid, "asset_original_filename": "renamed.dat"}}),
            )
            .await;
        assert_eq!(renamed.status(), 200);
    }
    for (uuid, token) in uuids.iter().skip(1).step_by(4) {
        assert_eq!(app.delete(token, &format!("/api/assets?uuid={uuid}")).await.status(), 200);
    }
    let updated = app
        .put_session(
            &service,
            1,
            &json!({"session_name": "renamed session", "session_devices": [uuid::Uuid::new_v4()]}),
        )
        .await;
    assert_eq!(updated.status(), 200);
    assert_eq!(app.delete(&service, "/api/sessions/2").await.status(), 202);
    assert_eq!(app.put_session(&service, 2, &json!({"session_name": "session 2 again"})).await.status(), 200);

    let sessions_before = app.table_snapshot("sessions", "id_session").await;
    let assets_before = app.table_snapshot("assets", "asset_uuid").await;
    assert_eq!(sessions_before.as_array().unwrap().len(), 3);
    assert_eq!(assets_before.as_array().unwrap().len(), 12);

    // Spoil the read models, then rebuild them with the real command.
    {
        let client = app.ctx.app.pool.get().await.unwrap();
        client
            .batch_execute("UPDATE assets SET asset_name = 'spoiled'; DELETE FROM sessions WHERE id_session = 3")
            .await
            .unwrap();
    }
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_assetd"))
        .arg("replay")
        .env("ASSETD_DATABASE_URL", &app.db.url)
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains(&format!("replayed {} events", app.event_count().await)), "{stdout}");

    assert_eq!(app.table_snapshot("sessions", "id_session").await, sessions_before);
    assert_eq!(app.table_snapshot("assets", "asset_uuid").await, assets_before);
}

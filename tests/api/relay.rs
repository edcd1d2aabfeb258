//! The outbox relay: every committed event reaches a consumer bound to the exchange.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use serde_json::{json, Value};
use uuid::Uuid;

use assetd::broker::Broker;

use crate::helpers::{
    amqp_url, assert_conforms, assert_event_conforms, never_stop, pseudo_random_bytes, sha256_hex, Backend,
    BrokerProxy, TestApp,
};
use crate::nginx::Nginx;

/// A consumer on an exchange of the test's own, bound to everything.
pub(crate) struct Listener {
    connection: Connection,
    /// `<prefix>.events`
    pub(crate) exchange: String,
    consumer: lapin::Consumer,
}

impl Listener {
    pub(crate) async fn bind() -> Self {
        let exchange = format!("assetd_test_{}.events", Uuid::new_v4().simple());
        let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("the test RabbitMQ is reachable (ASSETD_TEST_AMQP_URL)");
        let channel = connection.create_channel().await.unwrap();
        channel
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions { durable: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions { exclusive: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .queue_bind(
                queue.name().clone(),
                exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let consumer = channel
            .basic_consume(queue.name().clone(), "test".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .unwrap();
        Self { connection, exchange, consumer }
    }

    /// Messages (routing key, message id, body) until `done` says so or 60 s pass.
    pub(crate) async fn receive_until(
        &mut self,
        mut done: impl FnMut(&[(String, String, Value)]) -> bool,
    ) -> Vec<(String, String, Value)> {
        let mut received = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !done(&received) {
            let delivery = tokio::time::timeout_at(deadline, self.consumer.next())
                .await
                .unwrap_or_else(|_| panic!("timed out with {} messages", received.len()))
                .expect("the consumer is open")
                .unwrap();
            delivery.ack(BasicAckOptions::default()).await.unwrap();
            let message_id = delivery.properties.message_id().as_ref().map(|m| m.to_string()).unwrap_or_default();
            let body: Value = serde_json::from_slice(&delivery.data).unwrap();
            assert_event_conforms(&body);
            // EVENTS.md's properties.
            let event_type = body["event_type"].as_str().unwrap();
            let properties = &delivery.properties;
            assert_eq!(delivery.routing_key.as_str(), assetd::relay::routing_key(event_type));
            assert_eq!(properties.kind().as_ref().map(|t| t.as_str()), Some(event_type));
            assert_eq!(properties.content_type().as_ref().map(|t| t.as_str()), Some("application/json"));
            assert_eq!(*properties.delivery_mode(), Some(2), "persistent");
            assert_eq!(
                properties.correlation_id().as_ref().map(|c| c.as_str()),
                body["metadata"]["correlation_id"].as_str()
            );
            received.push((delivery.routing_key.to_string(), message_id, body));
        }
        received
    }

    pub(crate) async fn delete(self) {
        let channel = self.connection.create_channel().await.unwrap();
        let _ = channel.exchange_delete(self.exchange.as_str().into(), ExchangeDeleteOptions::default()).await;
        let _ = self.connection.close(200, "done".into()).await;
    }
}

/// A relay in this process, on the test's database and the listener's exchange.
fn start_relay(
    app: &TestApp,
    listener: &Listener,
    status: std::sync::Arc<assetd::app::MessagingStatus>,
) -> tokio::task::JoinHandle<()> {
    let broker = Broker::start(&amqp_url(), status.clone());
    tokio::spawn(assetd::relay::run(relay_config(app, listener, status, broker), never_stop()))
}

fn relay_config(
    app: &TestApp,
    listener: &Listener,
    status: std::sync::Arc<assetd::app::MessagingStatus>,
    broker: Broker,
) -> assetd::relay::RelayConfig {
    assetd::relay::RelayConfig {
        status,
        database_url: app.db.url.clone(),
        broker,
        exchange: listener.exchange.clone(),
        job_queues: None,
        idle_poll: Duration::from_millis(20),
    }
}

/// Uploads assets `a<n>` for each n to session 1, one after the other; each must succeed.
async fn upload_each(app: &TestApp, token: &str, numbers: std::ops::Range<usize>) {
    for n in numbers {
        let response =
            app.upload(token, &json!({"id_session": 1, "asset_name": format!("a{n}")}), "f.bin", vec![1; 10]).await;
        assert_eq!(response.status(), 200);
    }
}

/// `assetd_relay_lag_events` from `/metrics`.
async fn relay_lag(app: &TestApp) -> i64 {
    let response = app.get("", "/metrics").await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    let line = text.lines().find(|l| l.starts_with("assetd_relay_lag_events ")).expect("the lag metric");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn every_upload_from_concurrent_clients_is_published() {
    let app = TestApp::spawn().await;
    let mut listener = Listener::bind().await;
    let relay = start_relay(&app, &listener, Default::default());
    let (_, token) = app.session_with_user(1).await;
    let statuses: Vec<u16> = futures::stream::iter(0..200)
        .map(|n| {
            let app = &app;
            let token = &token;
            async move {
                app.upload(token, &json!({"id_session": 1, "asset_name": format!("a{n}")}), "f.bin", vec![n as u8; 100])
                    .await
                    .status()
                    .as_u16()
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");

    let uploaded = |messages: &[(String, String, Value)]| {
        messages
            .iter()
            .filter(|(key, _, _)| key == "asset.uploaded")
            .map(|(_, id, _)| id.clone())
            .collect::<HashSet<_>>()
    };
    let received = listener.receive_until(|m| uploaded(m).len() == 200).await;
    for (key, message_id, body) in &received {
        assert_eq!(body["event_id"].as_str(), Some(message_id.as_str()), "message_id is the event id");
        assert_eq!(assetd::relay::routing_key(body["event_type"].as_str().unwrap()), *key);
        for field in ["stream", "version", "position", "recorded_at", "data", "metadata"] {
            assert!(body.get(field).is_some(), "{field} missing in {body}");
        }
    }
    assert!(received.iter().any(|(key, _, _)| key == "session.registered"));
    relay.abort();
    listener.delete().await;
}

/// With the broker unreachable, uploads still succeed; once it can be reached, the
/// same relay (no restart) publishes every event recorded meanwhile (the checkpoint
/// never moved past them).
#[tokio::test]
async fn events_recorded_while_the_broker_is_unreachable_arrive_when_it_is_back() {
    let app = TestApp::spawn().await;
    let mut listener = Listener::bind().await;
    let proxy = BrokerProxy::start().await;
    proxy.cut();
    let status = app.ctx.app.messaging.clone();
    let broker = Broker::start(&proxy.url(), status.clone());
    let relay = tokio::spawn(assetd::relay::run(relay_config(&app, &listener, status, broker), never_stop()));
    let (_, token) = app.session_with_user(1).await;
    upload_each(&app, &token, 0..100).await;
    // /ready still answers 200 and says the broker cannot be reached; /metrics shows
    // every event waiting (100 uploads and the session's registration).
    let ready: Value = app.get("", "/ready").await.json().await.unwrap();
    assert_eq!(ready["status"], "ready", "{ready}");
    assert_eq!(ready["checks"]["broker"], "connecting", "{ready}");
    assert_eq!(ready["checks"]["relay"], "connecting", "{ready}");
    assert_eq!(relay_lag(&app).await, 101);

    proxy.restore();
    let received =
        listener.receive_until(|m| m.iter().filter(|(key, _, _)| key == "asset.uploaded").count() >= 100).await;
    let ids: HashSet<&String> =
        received.iter().filter(|(key, _, _)| key == "asset.uploaded").map(|(_, id, _)| id).collect();
    assert_eq!(ids.len(), 100);
    wait_until_all_published(&app).await;
    let ready: Value = app.get("", "/ready").await.json().await.unwrap();
    assert_eq!((&ready["checks"]["broker"], &ready["checks"]["relay"]), (&json!("up"), &json!("up")), "{ready}");
    relay.abort();
    listener.delete().await;
}

/// The broker "restarts" (every connection to it dropped, new ones refused for a
/// while) under a running relay and command consumer sharing one pooled connection:
/// uploads keep succeeding, `/ready` says the broker is being reconnected, and once it
/// is back both recover by themselves: every event arrives, and a command sent during
/// the outage runs and is answered.
#[tokio::test]
async fn relay_and_commands_recover_by_themselves_after_a_broker_restart() {
    use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
    use lapin::BasicProperties;

    let app = TestApp::spawn().await;
    let mut listener = Listener::bind().await;
    let proxy = BrokerProxy::start().await;
    let status = app.ctx.app.messaging.clone();
    let broker = Broker::start(&proxy.url(), status.clone());
    let relay =
        tokio::spawn(assetd::relay::run(relay_config(&app, &listener, status.clone(), broker.clone()), never_stop()));
    let commands_config = assetd::commands::CommandsConfig {
        broker: broker.clone(),
        prefix: listener.exchange.trim_end_matches(".events").to_owned(),
        import_policy: assetd::app::jobs::JobPolicy { max_attempts: 3 },
    };
    let commands = tokio::spawn(assetd::commands::run(app.ctx.app.clone(), commands_config.clone(), never_stop()));
    let (_, token) = app.session_with_user(1).await;
    upload_each(&app, &token, 0..10).await;
    let uploads = |m: &[(String, String, Value)]| {
        m.iter().filter(|(key, _, _)| key == "asset.uploaded").map(|(_, id, _)| id.clone()).collect::<HashSet<_>>()
    };
    let before = uploads(&listener.receive_until(|m| uploads(m).len() == 10).await);
    wait_for_state(&app, "commands", "up").await;

    proxy.cut();
    wait_for_state(&app, "broker", "connecting").await;
    upload_each(&app, &token, 10..60).await;
    // A command sent meanwhile (straight to the broker) waits in the queue.
    let channel = listener.connection.create_channel().await.unwrap();
    let replies = channel
        .queue_declare("".into(), QueueDeclareOptions { exclusive: true, ..Default::default() }, FieldTable::default())
        .await
        .unwrap();
    channel
        .basic_publish(
            commands_config.queue().as_str().into(),
            "session.upsert".into(),
            BasicPublishOptions::default(),
            json!({"id_session": 2, "session_name": "sent during the outage"}).to_string().as_bytes(),
            BasicProperties::default().with_reply_to(replies.name().clone()).with_correlation_id("outage".into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(app.get(&app.service_token(), "/api/sessions/2").await.status(), 404, "ran without a broker?");

    proxy.restore();
    let during = uploads(&listener.receive_until(|m| uploads(m).difference(&before).count() == 50).await);
    assert_eq!(before.union(&during).count(), 60);
    let mut reply_consumer = channel
        .basic_consume(replies.name().clone(), "replies".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(30), reply_consumer.next())
        .await
        .expect("a reply once the broker is back")
        .unwrap()
        .unwrap();
    let reply: Value = serde_json::from_slice(&reply.data).unwrap();
    assert_conforms("schemas/commands/session.upsert.reply.json", &reply);
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(app.get(&app.service_token(), "/api/sessions/2").await.status(), 200);
    wait_for_state(&app, "broker", "up").await;
    wait_for_state(&app, "relay", "up").await;
    wait_for_state(&app, "commands", "up").await;
    // The relay's and the consumer's channels (and the keeper's) share the pool.
    assert!(broker.open_channels() <= 3, "{} channels", broker.open_channels());

    relay.abort();
    commands.abort();
    for queue in [commands_config.queue(), commands_config.dead_queue()] {
        let _ = channel.queue_delete(queue.as_str().into(), Default::default()).await;
    }
    let _ = channel.exchange_delete(commands_config.queue().as_str().into(), Default::default()).await;
    listener.delete().await;
}

/// The broker refusing a message (nack: here a queue bound to the exchange that is
/// full and rejects publishes) holds the relay back: it tries again, never moves its
/// checkpoint past the refused event; once the broker takes it, everything arrives.
#[tokio::test]
async fn events_the_broker_refuses_are_retried_not_skipped() {
    use lapin::types::AMQPValue;

    let app = TestApp::spawn().await;
    let mut listener = Listener::bind().await;
    let channel = listener.connection.create_channel().await.unwrap();
    let blocker = format!("{}.blocker", listener.exchange);
    let mut arguments = FieldTable::default();
    arguments.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
    arguments.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
    channel.queue_declare(blocker.as_str().into(), QueueDeclareOptions::default(), arguments).await.unwrap();
    channel
        .queue_bind(
            blocker.as_str().into(),
            listener.exchange.as_str().into(),
            "asset.uploaded".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let relay = start_relay(&app, &listener, app.ctx.app.messaging.clone());
    let (_, token) = app.session_with_user(1).await;
    upload_each(&app, &token, 0..5).await;
    listener.receive_until(|m| m.iter().any(|(key, _, _)| key == "session.registered")).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(relay_lag(&app).await, 5, "the refused uploads are still waiting");

    channel.queue_delete(blocker.as_str().into(), Default::default()).await.unwrap();
    let uploads = |m: &[(String, String, Value)]| {
        m.iter().filter(|(key, _, _)| key == "asset.uploaded").map(|(_, id, _)| id.clone()).collect::<HashSet<_>>()
    };
    listener.receive_until(|m| uploads(m).len() == 5).await;
    wait_until_all_published(&app).await;
    relay.abort();
    listener.delete().await;
}

/// Waits (up to 30 s) until `/ready` shows `component` in `state`.
async fn wait_for_state(app: &TestApp, component: &str, state: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let ready: Value = app.get("", "/ready").await.json().await.unwrap();
        if ready["checks"][component] == state {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{component} never {state}: {ready}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An event whose transaction commits after later ones is published too: the relay's
/// checkpoint never moves past a transaction still running.
#[tokio::test]
async fn an_event_committed_after_later_ones_is_not_skipped() {
    use assetd::eventstore::{self, ExpectedVersion, NewEvent};

    let app = TestApp::spawn().await;
    let mut listener = Listener::bind().await;
    let relay = start_relay(&app, &listener, Default::default());
    let mut held_client = app.ctx.app.pool.get().await.unwrap();
    let held = held_client.transaction().await.unwrap();
    let late = Uuid::new_v4();
    // A real event type (every message received is checked against its schema).
    let event = NewEvent {
        id: late,
        event_type: "SessionRegistered".into(),
        data: json!({"id_session": 77, "session_uuid": Uuid::new_v4(), "session_name": "late", "id_creator_uuid": null,
                     "session_users": [], "session_participants": [], "session_devices": []}),
        metadata: json!({"actor": {"kind": "service", "uuid": Uuid::nil()}, "request_id": "late",
                         "correlation_id": "late", "causation_id": null, "service_version": "test"}),
    };
    eventstore::append(&held, "session-77", ExpectedVersion::NoStream, &[event]).await.unwrap();

    let (_, token) = app.session_with_user(1).await;
    upload_each(&app, &token, 0..20).await;
    // The relay polls meanwhile: it must not move its checkpoint past the open transaction.
    tokio::time::sleep(Duration::from_millis(500)).await;
    held.commit().await.unwrap();

    let uploads = |m: &[(String, String, Value)]| m.iter().filter(|(key, _, _)| key == "asset.uploaded").count();
    let received =
        listener.receive_until(|m| uploads(m) >= 20 && m.iter().any(|(_, id, _)| *id == late.to_string())).await;
    // Nothing after the open transaction went out while it ran (the relay waits for the
    // oldest running transaction), and its event comes first: its transaction is older.
    let late_at = received.iter().position(|(_, id, _)| *id == late.to_string()).unwrap();
    let first_upload = received.iter().position(|(key, _, _)| key == "asset.uploaded").unwrap();
    assert!(late_at < first_upload, "late event at {late_at}, first upload at {first_upload}");
    relay.abort();
    listener.delete().await;
}

/// Every event type assetd records reaches the exchange, each message conforming to
/// its schema in `events/` (checked by the listener) with the AMQP properties of
/// EVENTS.md.
#[tokio::test]
async fn every_event_type_is_published_as_its_schema_says() {
    let app = TestApp::spawn().await;
    let mut listener = Listener::bind().await;
    let relay = start_relay(&app, &listener, Default::default());
    let (user, token) = app.session_with_user(3).await; // SessionRegistered
    let service = app.service_token();
    let renamed_session = json!({"session_name": "renamed session", "session_users": [user]});
    let updated = app.put_session(&service, 3, &renamed_session).await;
    assert_eq!(updated.status(), 200); // SessionUpdated
    let first = app
        .upload(
            &token,
            &json!({"id_session": 3, "asset_name": "a", "directory": "/day 1", "tags": ["x"],
                    "metadata": {"k": [1, null]}, "asset_datetime": "2026-01-02T03:04:05Z"}),
            "a.txt",
            b"one".to_vec(),
        )
        .await;
    assert_eq!(first.status(), 200); // AssetUploaded
    let first: Value = first.json().await.unwrap();
    let second = app.upload_ok(&token, 3, "b.bin", b"two").await;
    let rename = json!({"file_asset": {"asset_uuid": first["asset_uuid"], "asset_original_filename": "c.txt"}});
    assert_eq!(app.post_json(&token, "/api/assets/infos", &rename).await.status(), 200); // AssetRenamed
    let deleted = app.delete(&token, &format!("/api/assets?uuid={}", second["asset_uuid"].as_str().unwrap())).await;
    assert_eq!(deleted.status(), 200); // AssetDeleted (requested)
                                       // SessionDeleted, and AssetDeleted (session_deleted) for the asset left.
    assert_eq!(app.delete_session_and_purge(3).await, 1);

    let types = |m: &[(String, String, Value)]| {
        m.iter().map(|(_, _, body)| body["event_type"].as_str().unwrap().to_owned()).collect::<HashSet<_>>()
    };
    let asset_deletions = |m: &[(String, String, Value)]| m.iter().filter(|(key, _, _)| key == "asset.deleted").count();
    let received = listener.receive_until(|m| types(m).contains("SessionDeleted") && asset_deletions(m) == 2).await;
    let expected = [
        "SessionRegistered",
        "SessionUpdated",
        "AssetUploaded",
        "AssetRenamed",
        "AssetDeleted",
        "SessionDeleted",
        "JobQueued",
    ];
    assert_eq!(types(&received), expected.iter().map(|t| t.to_string()).collect::<HashSet<_>>());
    let deletions: HashSet<(&str, &str, &str)> = received
        .iter()
        .filter(|(key, _, _)| key == "asset.deleted")
        .map(|(_, _, body)| {
            let data = &body["data"];
            (
                data["reason"].as_str().unwrap(),
                data["asset_original_filename"].as_str().unwrap(),
                data["directory"].as_str().unwrap(),
            )
        })
        .collect();
    // Each says what was deleted: the name it had then, its folder.
    assert_eq!(deletions, HashSet::from([("requested", "b.bin", "/"), ("session_deleted", "c.txt", "/day 1")]));
    for (_, message_id, body) in &received {
        assert_eq!(*message_id, body["event_id"].as_str().unwrap());
    }
    relay.abort();
    listener.delete().await;
}

/// Two relays on one database: one publishes, the other stands by (no duplicates);
/// when the publishing one dies, the other takes over.
#[tokio::test]
async fn one_relay_publishes_at_a_time_and_another_takes_over() {
    let app = TestApp::spawn().await;
    let mut listener = Listener::bind().await;
    let (first_status, second_status) = (std::sync::Arc::default(), std::sync::Arc::default());
    let first = start_relay(&app, &listener, std::sync::Arc::clone(&first_status));
    let second = start_relay(&app, &listener, std::sync::Arc::clone(&second_status));
    let (_, token) = app.session_with_user(1).await;
    upload_each(&app, &token, 0..30).await;
    let uploads = |m: &[(String, String, Value)]| m.iter().filter(|(key, _, _)| key == "asset.uploaded").count();
    let received = listener.receive_until(|m| uploads(m) >= 30).await;
    // Give a second publisher, if there were one, time to send its copies.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let states = [first_status.relay(), second_status.relay()];
    use assetd::app::ComponentState::{Standby, Up};
    assert!(states == [Up, Standby] || states == [Standby, Up], "{states:?}");

    let (leader, survivor) = if states[0] == Up { (first, second) } else { (second, first) };
    leader.abort();
    let _ = leader.await;
    upload_each(&app, &token, 30..60).await;
    let first_ids: HashSet<String> =
        received.iter().filter(|(key, _, _)| key == "asset.uploaded").map(|(_, id, _)| id.clone()).collect();
    assert_eq!(first_ids.len(), 30);
    let new_uploads = |m: &[(String, String, Value)]| {
        m.iter().filter(|(key, id, _)| key == "asset.uploaded" && !first_ids.contains(id)).count()
    };
    let more = listener.receive_until(|m| new_uploads(m) >= 30).await;
    // The standby relay never published, and the survivor started from the leader's
    // checkpoint: nothing of the first 30 comes again.
    assert!(more.iter().all(|(_, id, _)| !first_ids.contains(id)), "an event was published twice");
    assert_eq!(uploads(&received), 30, "no event published twice while one relay led");
    survivor.abort();
    listener.delete().await;
}

/// `assetd serve` running only its relay, on the test's database, the broker at
/// `amqp_url` and the exchange prefix.
fn relay_process(app: &TestApp, amqp_url: &str, prefix: &str, data_dir: &std::path::Path) -> tokio::process::Child {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    tokio::process::Command::new(env!("CARGO_BIN_EXE_assetd"))
        .arg("serve")
        .env("ASSETD_DATABASE_URL", &app.db.url)
        .env("ASSETD_JWT_SECRET", crate::helpers::JWT_SECRET)
        .env("ASSETD_URL_SIGNING_KEY", "k")
        .env("ASSETD_LISTEN", format!("127.0.0.1:{port}"))
        .env("ASSETD_DATA_DIR", data_dir)
        .env("ASSETD_AMQP_URL", amqp_url)
        .env("ASSETD_AMQP_PREFIX", prefix)
        .env("ASSETD_RELAY", "true")
        .env("ASSETD_COMMANDS", "false")
        .env("ASSETD_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Waits (30 s at most) until the relay's checkpoint is past every committed event.
async fn wait_until_all_published(app: &TestApp) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while relay_lag(app).await != 0 {
        assert!(tokio::time::Instant::now() < deadline, "the relay's checkpoint did not catch up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `assetd serve` running only its relay, reaching the broker through a proxy, with
/// session 1 registered and its event published and confirmed.
struct ProxiedRelay {
    app: TestApp,
    listener: Listener,
    proxy: BrokerProxy,
    process: tokio::process::Child,
    prefix: String,
    data_dir: tempfile::TempDir,
    /// A token of session 1's user.
    token: String,
    /// What the listener has received so far (the session's registration).
    received: Vec<(String, String, Value)>,
}

impl ProxiedRelay {
    async fn start() -> Self {
        let app = TestApp::spawn().await;
        let mut listener = Listener::bind().await;
        let prefix = listener.exchange.trim_end_matches(".events").to_owned();
        let data_dir = tempfile::tempdir().unwrap();
        let proxy = BrokerProxy::start().await;
        let process = relay_process(&app, &proxy.url(), &prefix, data_dir.path());
        let (_, token) = app.session_with_user(1).await;
        let received = listener.receive_until(|m| !m.is_empty()).await;
        wait_until_all_published(&app).await;
        Self { app, listener, proxy, process, prefix, data_dir, token, received }
    }

    /// Another relay process, once the last one has exited.
    fn restart(&mut self) {
        self.process = relay_process(&self.app, &self.proxy.url(), &self.prefix, self.data_dir.path());
    }
}

/// Uploads and renames assets `a<n>` (two events each) to session 1.
async fn upload_and_rename_each(app: &TestApp, token: &str, numbers: std::ops::Range<usize>) {
    for n in numbers {
        let response =
            app.upload(token, &json!({"id_session": 1, "asset_name": format!("a{n}")}), "f.bin", vec![1; 10]).await;
        assert_eq!(response.status(), 200);
        let info: Value = response.json().await.unwrap();
        let rename =
            json!({"file_asset": {"asset_uuid": info["asset_uuid"], "asset_original_filename": "renamed.bin"}});
        assert_eq!(app.post_json(token, "/api/assets/infos", &rename).await.status(), 200);
    }
}

/// The relay's process killed with SIGKILL in the middle of publishing: its messages
/// have reached the broker (and our queue) but their confirms have not come back (a
/// proxy holds what the broker sends), so its checkpoint is behind them. After a
/// restart, while events keep coming, every event arrives, the unconfirmed ones again,
/// and each stream's first deliveries come in version order.
#[tokio::test]
async fn after_a_sigkill_in_the_middle_of_publishing_every_event_arrives_in_stream_order() {
    let mut relay = ProxiedRelay::start().await;
    let (app, token) = (&relay.app, relay.token.clone());

    relay.proxy.hold_answers();
    upload_and_rename_each(app, &token, 0..20).await;
    // Published: some have reached the queue. Not confirmed: the checkpoint stays.
    let unconfirmed = relay.listener.receive_until(|m| !m.is_empty()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(relay_lag(app).await, 40, "the relay moved its checkpoint without confirms");
    relay.process.start_kill().unwrap();
    relay.process.wait().await.unwrap();
    let mut received = std::mem::take(&mut relay.received);
    received.extend(unconfirmed.iter().cloned());
    relay.proxy.release();

    relay.restart();
    let app = &relay.app;
    upload_and_rename_each(app, &token, 20..40).await;
    let client = app.ctx.app.pool.get().await.unwrap();
    let all: HashSet<String> =
        client.query("SELECT id::text FROM events", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(all.len(), 1 + 40 * 2);
    let seen = |m: &[(String, String, Value)], earlier: &[(String, String, Value)]| {
        earlier.iter().chain(m).map(|(_, id, _)| id.clone()).collect::<HashSet<_>>()
    };
    let after_restart = relay.listener.receive_until(|m| seen(m, &received).is_superset(&all)).await;
    // At least once: what was published but unconfirmed when the relay died comes again.
    let again: HashSet<&String> = after_restart.iter().map(|(_, id, _)| id).collect();
    for (_, id, _) in &unconfirmed {
        assert!(again.contains(id), "event {id} was unconfirmed at the kill and not published again");
    }
    received.extend(after_restart);
    assert_first_deliveries_in_stream_order(&received);
    relay.process.start_kill().unwrap();
    relay.listener.delete().await;
}

/// Per stream, the first delivery of each event comes in version order (later ones are
/// the at-least-once copies a relay sends again after taking over from a dead one).
fn assert_first_deliveries_in_stream_order(received: &[(String, String, Value)]) {
    let mut first_seen = HashSet::new();
    let mut last_version: std::collections::HashMap<String, i64> = Default::default();
    for (_, id, body) in received {
        if first_seen.insert(id.clone()) {
            let stream = body["stream"].as_str().unwrap().to_owned();
            let version = body["version"].as_i64().unwrap();
            let previous = last_version.insert(stream.clone(), version).unwrap_or(0);
            assert!(version > previous, "{stream}: version {version} after {previous}");
        }
    }
}

/// SIGTERM: before exiting, the relay publishes what the process's last requests
/// recorded. Here the broker's confirms are held back until after the signal, and the
/// last events are held back from the global log by an older transaction still open
/// (as any transaction of the cluster can): the relay waits for both, then exits.
#[tokio::test]
async fn sigterm_publishes_every_committed_event_before_exiting() {
    let mut relay = ProxiedRelay::start().await;
    relay.proxy.hold_answers();
    upload_and_rename_each(&relay.app, &relay.token, 0..5).await;
    relay.listener.receive_until(|m| !m.is_empty()).await; // publishing, awaiting confirms
    let mut older_client = relay.app.ctx.app.pool.get().await.unwrap();
    let older = older_client.transaction().await.unwrap();
    older.query_one("SELECT pg_current_xact_id()", &[]).await.unwrap();
    upload_and_rename_each(&relay.app, &relay.token, 5..6).await;

    let pid = relay.process.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    tokio::time::sleep(Duration::from_millis(300)).await;
    relay.proxy.release();
    // It has published all it may read (the last upload's two events are held back),
    // and waits for the rest rather than exit.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while relay_lag(&relay.app).await != 2 {
        assert!(tokio::time::Instant::now() < deadline, "the relay did not publish what it may read");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(relay.process.try_wait().unwrap().is_none(), "exited before the held-back events were published");
    older.commit().await.unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(20), relay.process.wait()).await.expect("exits").unwrap();
    assert!(exit.success(), "{exit:?}");
    assert_eq!(relay_lag(&relay.app).await, 0, "exited with committed events not published");
    relay.listener.delete().await;
}

/// SIGTERM with the broker unreachable: nothing can be flushed, so the process does not
/// wait for the relay; the events stay for the next relay.
#[tokio::test]
async fn sigterm_without_a_broker_exits_at_once() {
    let app = TestApp::spawn().await;
    let proxy = BrokerProxy::start().await;
    proxy.cut();
    let data_dir = tempfile::tempdir().unwrap();
    let prefix = format!("assetd_test_{}", Uuid::new_v4().simple());
    let mut relay = relay_process(&app, &proxy.url(), &prefix, data_dir.path());
    app.session_with_user(1).await;
    tokio::time::sleep(Duration::from_secs(1)).await; // serving, the relay connecting
    let pid = relay.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let exit = tokio::time::timeout(Duration::from_secs(5), relay.wait()).await.expect("exits at once").unwrap();
    assert!(exit.success(), "{exit:?}");
    assert_eq!(relay_lag(&app).await, 1, "the session's event waits for the next relay");
}

/// Clients uploading at once through nginx in the cluster test, and uploads each.
const CLUSTER_CLIENTS: usize = 32;
const UPLOADS_PER_CLIENT: usize = 6;
/// Uploads stored through nginx before the relay leader is killed.
const KILL_AFTER: usize = 40;

/// Three `assetd serve` processes behind one nginx, sharing one database, one bucket and
/// one exchange; 32 clients upload through nginx while the relay leader is killed with
/// SIGKILL. Only uploads in flight on the killed process fail (nginx answering for it);
/// every stored one downloads intact through nginx and from each survivor; a survivor
/// takes over the relay and every recorded event arrives, each stream in order; no
/// multipart upload is left open but the killed process's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_processes_behind_one_nginx_on_one_bucket_survive_a_sigkill_of_the_relay_leader() {
    let app = TestApp::on(Backend::S3).await;
    let bucket = app.bucket.as_ref().expect("an S3 test app has its bucket");
    let mut listener = Listener::bind().await;
    let prefix = listener.exchange.trim_end_matches(".events").to_owned();
    let (_, token) = app.session_with_user(1).await;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(300)).build().unwrap();

    let data_dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut processes: Vec<(tokio::process::Child, SocketAddr)> =
        data_dirs.iter().map(|dir| cluster_process(&app, &prefix, dir.path())).collect();
    for (_, addr) in &processes {
        wait_until_ready(&client, *addr).await;
    }
    let addrs: Vec<SocketAddr> = processes.iter().map(|(_, addr)| *addr).collect();
    // Blobs are in the bucket: nginx's X-Accel-Redirect directory goes unused.
    let nginx = Nginx::start_cluster(&addrs, &app.data_dir.path().join("blobs")).await;
    let leaders = relay_leaders(&client, &addrs).await;
    assert_eq!(leaders.len(), 1, "one relay leads, not {leaders:?}");

    // The clients upload through nginx; once KILL_AFTER uploads are stored, the leader
    // is killed under them.
    let progress = Arc::new(ClusterProgress::default());
    let clients: Vec<_> = (0..CLUSTER_CLIENTS)
        .map(|number| {
            let (client, base, token) = (client.clone(), nginx.base.clone(), token.clone());
            tokio::spawn(cluster_client(client, base, token, number, progress.clone()))
        })
        .collect();
    tokio::time::timeout(Duration::from_secs(120), progress.enough.notified())
        .await
        .expect("uploads are stored through nginx");
    let (mut leader, leader_addr) = processes.remove(leaders[0]);
    progress.killed.store(true, Ordering::SeqCst);
    leader.start_kill().unwrap();
    leader.wait().await.unwrap();
    let survivors = processes;
    let survivor_addrs: Vec<SocketAddr> = survivors.iter().map(|(_, addr)| *addr).collect();
    // Another relay takes over (the lock died with its holder's connection) while the
    // clients keep uploading.
    let new_leaders = relay_leaders(&client, &survivor_addrs).await;
    assert_eq!(new_leaders.len(), 1, "one survivor leads after {leader_addr} was killed, not {new_leaders:?}");

    let mut stored = Vec::new();
    let mut failed = Vec::new();
    for handle in clients {
        for outcome in handle.await.expect("a client panicked") {
            match outcome {
                Ok(upload) => stored.push(upload),
                Err(failure) => failed.push(failure),
            }
        }
    }
    let failures = failed.iter().map(|failure| format!("\n  {failure}")).collect::<String>();
    assert!(failed.iter().all(|failure| failure.after_kill), "uploads failed before the kill:{failures}");
    // What was in flight on the killed process: nginx's answer for a lost upstream (or a
    // connection closed under a body still being sent). Each client has one upload in
    // flight at a time.
    assert!(
        failed.iter().all(|failure| matches!(failure.status, None | Some(502..=504))),
        "failures other than a lost upstream:{failures}"
    );
    assert!(failed.len() <= CLUSTER_CLIENTS, "more failures than uploads in flight:{failures}");
    assert!(stored.len() >= 150, "only {} uploads stored; failures:{failures}", stored.len());

    let mut bases = vec![nginx.base.clone()];
    bases.extend(survivor_addrs.iter().map(|addr| format!("http://{addr}/file")));
    assert_downloads_intact(&client, &bases, &token, &stored).await;

    // The survivors still serve, each on its own.
    for (number, addr) in survivor_addrs.iter().enumerate() {
        let (status, ready) = ready_of(&client, *addr).await.unwrap_or_else(|| panic!("{addr} answers /ready"));
        assert_eq!(status, 200, "{addr}: {ready}");
        let bytes = pseudo_random_bytes(number as u64 * 2 + 1_000_001, 1000);
        let response = post_upload(&client, &format!("http://{addr}/file"), &token, &format!("after{number}"), bytes)
            .await
            .unwrap_or_else(|error| panic!("upload to {addr}: {error}"));
        assert_eq!(response.status(), 200, "{addr} takes an upload after the kill");
    }

    // Every event recorded (those of the uploads just above too) is published by the
    // relay that took over.
    let db = app.ctx.app.pool.get().await.unwrap();
    let all: HashSet<String> =
        db.query("SELECT id::text FROM events", &[]).await.unwrap().iter().map(|row| row.get(0)).collect();
    let received = listener
        .receive_until(|m| m.iter().map(|(_, id, _)| id.clone()).collect::<HashSet<_>>().is_superset(&all))
        .await;
    assert_first_deliveries_in_stream_order(&received);

    let pending = bucket.pending_multipart_uploads().await;
    assert!(
        pending.len() <= failed.len(),
        "multipart uploads left open beyond the killed process's ({} failed uploads): {pending:?}",
        failed.len()
    );

    for (mut process, _) in survivors {
        process.start_kill().unwrap();
        process.wait().await.unwrap();
    }
    drop(nginx);
    listener.delete().await;
}

/// One of the cluster's `assetd serve` processes: the app's database and bucket (S3,
/// the same prefix as the in-process app), the listener's exchange, its relay on.
fn cluster_process(app: &TestApp, prefix: &str, data_dir: &std::path::Path) -> (tokio::process::Child, SocketAddr) {
    let (mut command, addr) = crate::helpers::serve_command(app, data_dir);
    command.env("ASSETD_AMQP_PREFIX", prefix).env("ASSETD_RELAY", "true").env("ASSETD_WORKERS", "true");
    (command.spawn().unwrap(), addr)
}

/// `/file/ready` of one process, asked directly: its status and JSON answer, or None
/// while it does not answer.
async fn ready_of(client: &reqwest::Client, addr: SocketAddr) -> Option<(u16, Value)> {
    let response = client.get(format!("http://{addr}/file/ready")).send().await.ok()?;
    let status = response.status().as_u16();
    Some((status, response.json().await.ok()?))
}

/// Waits (60 s at most: three debug builds start at once) until the process at `addr`
/// answers `/file/ready` with 200.
async fn wait_until_ready(client: &reqwest::Client, addr: SocketAddr) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let answer = ready_of(client, addr).await;
        if matches!(answer, Some((200, _))) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{addr} is not ready: {answer:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The indexes in `addrs` of the processes whose relay leads (`checks.relay` "up"),
/// once at least one does (30 s at most). The advisory lock allows one at a time, so
/// more than one is a bug the caller asserts against.
async fn relay_leaders(client: &reqwest::Client, addrs: &[SocketAddr]) -> Vec<usize> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut states = Vec::new();
        for addr in addrs {
            let answer = ready_of(client, *addr).await;
            states.push(answer.map(|(_, ready)| ready["checks"]["relay"].clone()).unwrap_or(Value::Null));
        }
        let leaders: Vec<usize> = (0..addrs.len()).filter(|&i| states[i] == "up").collect();
        if !leaders.is_empty() {
            return leaders;
        }
        assert!(tokio::time::Instant::now() < deadline, "no relay leads: {states:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Posts an OpenTera upload of `bytes` to session 1, asset `name`, at `base`.
async fn post_upload(
    client: &reqwest::Client,
    base: &str,
    token: &str,
    name: &str,
    bytes: Vec<u8>,
) -> reqwest::Result<reqwest::Response> {
    let form = reqwest::multipart::Form::new()
        .text("file_asset", json!({"id_session": 1, "asset_name": name}).to_string())
        .part("file", reqwest::multipart::Part::bytes(bytes).file_name(format!("{name}.bin")));
    client
        .post(format!("{base}/api/assets"))
        .header("Authorization", format!("OpenTera {token}"))
        .multipart(form)
        .send()
        .await
}

/// What the cluster test's clients share with it.
#[derive(Default)]
struct ClusterProgress {
    /// Uploads answered 200 so far.
    stored: AtomicUsize,
    /// Notified once `stored` reaches KILL_AFTER (the permit waits if no one listens yet).
    enough: tokio::sync::Notify,
    /// Set just before the leader is killed: what fails earlier is not the kill's doing.
    killed: AtomicBool,
}

/// An upload through nginx that got no 200.
struct FailedUpload {
    /// The answer's status, or None if there was no answer (`detail` says why).
    status: Option<u16>,
    detail: String,
    after_kill: bool,
}

impl std::fmt::Display for FailedUpload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let status = self.status.map_or_else(|| "no answer".to_owned(), |status| status.to_string());
        let when = if self.after_kill { "after" } else { "before" };
        write!(f, "{status} ({when} the kill), {}", self.detail)
    }
}

/// One client of the cluster test: its uploads through nginx at `base`, one after the
/// other, each stored (asset uuid, SHA-256 of the bytes sent) or failed. Mostly 20 to
/// 200 KB; the third is 6 MiB, a multipart upload (two 5 MiB parts at most).
async fn cluster_client(
    client: reqwest::Client,
    base: String,
    token: String,
    number: usize,
    progress: Arc<ClusterProgress>,
) -> Vec<Result<(String, String), FailedUpload>> {
    let mut outcomes = Vec::new();
    for upload in 0..UPLOADS_PER_CLIENT {
        // Odd seeds: pseudo_random_bytes sets the low bit, so each upload has bytes of its own.
        let seed = (number * UPLOADS_PER_CLIENT + upload) as u64 * 2 + 1;
        let size = if upload == 2 { 6 << 20 } else { 20_000 + (seed as usize * 7_919) % 180_000 };
        let bytes = pseudo_random_bytes(seed, size);
        let sha256 = sha256_hex(&bytes);
        let name = format!("c{number}u{upload}");
        let outcome = match post_upload(&client, &base, &token, &name, bytes).await {
            Ok(response) if response.status() == 200 => {
                let info: Value = response.json().await.unwrap_or_else(|error| panic!("{name}: {error}"));
                assert_eq!(info["asset_sha256"].as_str(), Some(sha256.as_str()), "{name}: {info}");
                let uuid = info["asset_uuid"].as_str().unwrap_or_else(|| panic!("{name}: {info}")).to_owned();
                if progress.stored.fetch_add(1, Ordering::SeqCst) + 1 == KILL_AFTER {
                    progress.enough.notify_one();
                }
                Ok((uuid, sha256))
            }
            Ok(response) => {
                let after_kill = progress.killed.load(Ordering::SeqCst);
                let status = Some(response.status().as_u16());
                let detail = response.text().await.unwrap_or_else(|error| error.to_string());
                Err(FailedUpload { status, detail: format!("{name}: {detail}"), after_kill })
            }
            Err(error) => {
                let after_kill = progress.killed.load(Ordering::SeqCst);
                Err(FailedUpload { status: None, detail: format!("{name}: {error:?}"), after_kill })
            }
        };
        outcomes.push(outcome);
    }
    outcomes
}

/// Asserts that every stored upload (asset uuid, SHA-256 of the bytes sent) downloads
/// from each of `bases` with that hash, 16 downloads at a time.
async fn assert_downloads_intact(client: &reqwest::Client, bases: &[String], token: &str, stored: &[(String, String)]) {
    let mut downloads = Vec::new();
    for (uuid, sha256) in stored {
        for base in bases {
            downloads.push((uuid, sha256, base));
        }
    }
    futures::stream::iter(downloads)
        .for_each_concurrent(16, move |(uuid, sha256, base)| async move {
            let response = client
                .get(format!("{base}/api/assets?asset_uuid={uuid}"))
                .header("Authorization", format!("OpenTera {token}"))
                .send()
                .await
                .unwrap_or_else(|error| panic!("GET {uuid} from {base}: {error}"));
            assert_eq!(response.status(), 200, "GET {uuid} from {base}");
            let bytes = response.bytes().await.unwrap_or_else(|error| panic!("GET {uuid} from {base}: {error}"));
            assert_eq!(sha256_hex(&bytes), *sha256, "{uuid} from {base}: not the bytes sent");
        })
        .await;
}

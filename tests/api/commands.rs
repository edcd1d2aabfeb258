//! Commands over AMQP: the same application commands as HTTP, replies, dead letters.

use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ExchangeDeleteOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{amqp_url, assert_conforms, contract_validator, never_stop, TestApp};

async fn next(consumer: &mut Consumer) -> Delivery {
    let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.next())
        .await
        .expect("a message within 30 s")
        .expect("the consumer is open")
        .unwrap();
    delivery.ack(BasicAckOptions::default()).await.unwrap();
    delivery
}

async fn consumer(channel: &Channel, queue: &str) -> Consumer {
    channel
        .basic_consume(
            queue.into(),
            Uuid::new_v4().to_string().as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap()
}

/// A test's own commands topology, with consumers of the replies and of the dead queue.
struct Bus {
    config: assetd::commands::CommandsConfig,
    connection: Connection,
    channel: Channel,
    reply_to: lapin::types::ShortString,
    replies: Consumer,
    dead: Consumer,
}

impl Bus {
    async fn declare(config: assetd::commands::CommandsConfig) -> Self {
        let connection = Connection::connect(&amqp_url(), ConnectionProperties::default()).await.unwrap();
        let channel = connection.create_channel().await.unwrap();
        assetd::commands::declare(&channel, &config).await.unwrap();
        let exclusive = QueueDeclareOptions { exclusive: true, ..Default::default() };
        let reply_to = channel.queue_declare("".into(), exclusive, FieldTable::default()).await.unwrap().name().clone();
        let replies = consumer(&channel, reply_to.as_str()).await;
        let dead = consumer(&channel, &config.dead_queue()).await;
        Self { config, connection, channel, reply_to, replies, dead }
    }

    /// Publishes `body` to the commands exchange with `routing_key` (or, with `None`,
    /// straight to the queue), replies to come to [`Bus::reply`].
    async fn publish(&self, routing_key: Option<&str>, body: &[u8], properties: BasicProperties) {
        let queue = self.config.queue();
        let (exchange, routing_key) = match routing_key {
            Some(key) => (queue.as_str(), key),
            None => ("", queue.as_str()),
        };
        self.channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                properties.with_reply_to(self.reply_to.clone()),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// `command` with `body`, its `correlation_id` (and `message_id`, when given).
    async fn send(&self, command: &str, body: &Value, correlation_id: &str, message_id: Option<&str>) {
        let mut properties = BasicProperties::default().with_correlation_id(correlation_id.into());
        if let Some(message_id) = message_id {
            properties = properties.with_message_id(message_id.into());
        }
        self.publish(Some(command), body.to_string().as_bytes(), properties).await;
    }

    /// The next reply, checked against `command`'s reply schema, with its correlation id.
    async fn reply(&mut self, command: &str) -> (String, Value) {
        let delivery = next(&mut self.replies).await;
        let reply: Value = serde_json::from_slice(&delivery.data).unwrap();
        assert_conforms(&format!("schemas/commands/{command}.reply.json"), &reply);
        assert_eq!(*delivery.properties.delivery_mode(), Some(2), "replies are persistent");
        (delivery.properties.correlation_id().as_ref().map(|c| c.to_string()).unwrap_or_default(), reply)
    }

    async fn dead_letter(&mut self) -> Delivery {
        next(&mut self.dead).await
    }

    async fn delete(self) {
        for queue in [self.config.queue(), self.config.dead_queue()] {
            let _ = self.channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await;
        }
        let _ =
            self.channel.exchange_delete(self.config.queue().as_str().into(), ExchangeDeleteOptions::default()).await;
        let _ = self.connection.close(200, "done".into()).await;
    }
}

/// A command consumer of this test's app, on names of its own.
fn commands_config(app: &TestApp) -> assetd::commands::CommandsConfig {
    assetd::commands::CommandsConfig {
        broker: assetd::broker::Broker::start(&amqp_url(), app.ctx.app.messaging.clone()),
        prefix: format!("assetd_test_{}", Uuid::new_v4().simple()),
        import_policy: assetd::app::jobs::JobPolicy { max_attempts: 3 },
    }
}

/// A bus of its own, and a command consumer of `app` on it.
async fn consuming(app: &TestApp) -> (Bus, tokio::task::JoinHandle<()>) {
    let bus = Bus::declare(commands_config(app)).await;
    let worker = tokio::spawn(assetd::commands::run(app.ctx.app.clone(), bus.config.clone(), never_stop()));
    (bus, worker)
}

#[tokio::test]
async fn session_commands_run_reply_and_dead_letter_what_is_invalid() {
    let app = TestApp::spawn().await;
    let (mut bus, worker) = consuming(&app).await;

    // Valid commands conform to their schema; the invalid ones sent below do not.
    let upsert_5 = json!({"id_session": 5, "session_name": "via amqp"});
    assert_conforms("schemas/commands/session.upsert.json", &upsert_5);
    assert_conforms("schemas/commands/session.delete.json", &json!({"id_session": 5}));
    assert!(!contract_validator("schemas/commands/session.upsert.json").is_valid(&json!({"id_session": 5, "bogus": 1})));

    // A valid upsert: the session exists, as if registered over HTTP.
    bus.send("session.upsert", &upsert_5, "c1", None).await;
    let (correlation, reply) = bus.reply("session.upsert").await;
    assert_eq!(correlation, "c1");
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["result"]["id_session"], 5);
    let session = app.get(&app.service_token(), "/api/sessions/5").await;
    assert_eq!(session.status(), 200);
    assert_eq!(session.json::<Value>().await.unwrap()["session_name"], "via amqp");

    // Not JSON, then a field that does not exist: each answered, dead-lettered with why.
    for (body, correlation_id) in
        [(b"not json".to_vec(), "c2"), (json!({"id_session": 5, "bogus": 1}).to_string().into_bytes(), "c3")]
    {
        let properties = BasicProperties::default().with_correlation_id(correlation_id.into());
        bus.publish(Some("session.upsert"), &body, properties).await;
        let (_, reply) = bus.reply("session.upsert").await;
        assert_eq!(reply["ok"], false, "{reply}");
        assert!(reply["error"].as_str().unwrap().contains("invalid body"), "{reply}");
        let dead_letter = bus.dead_letter().await;
        assert_eq!(dead_letter.data, body);
        let headers = dead_letter.properties.headers().clone().unwrap();
        let why = headers.inner().get("x-assetd-error").cloned();
        assert!(matches!(why, Some(AMQPValue::LongString(_))), "{why:?}");
    }

    // An unknown command (sent to the queue by its name), refused by the rules: the
    // queue is not blocked, and a valid delete that follows still runs.
    bus.publish(None, b"{}", BasicProperties::default().with_type("session.explode".into())).await;
    let dead_letter = bus.dead_letter().await;
    assert_eq!(dead_letter.properties.kind().as_ref().unwrap().as_str(), "session.explode");
    let (_, reply) = bus.reply("session.upsert").await; // the shape every refusal has
    assert_eq!(reply["error"], "unknown command \"session.explode\"", "{reply}");
    // Straight to the queue without a type: which command is meant cannot be told.
    bus.publish(None, json!({"id_session": 5}).to_string().as_bytes(), BasicProperties::default()).await;
    bus.dead_letter().await;
    let (_, reply) = bus.reply("session.delete").await;
    assert!(reply["error"].as_str().unwrap().contains("names itself in the AMQP type"), "{reply}");
    bus.send("session.delete", &json!({"id_session": 999}), "c4", None).await;
    let (correlation, reply) = bus.reply("session.delete").await;
    assert_eq!((correlation.as_str(), reply["ok"].clone()), ("c4", json!(false)), "{reply}");
    bus.dead_letter().await;
    bus.send("session.delete", &json!({"id_session": 5}), "c5", None).await;
    let (correlation, reply) = bus.reply("session.delete").await;
    assert_eq!((correlation.as_str(), reply["ok"].clone()), ("c5", json!(true)), "{reply}");
    assert_eq!(app.get(&app.service_token(), "/api/sessions/5").await.status(), 404);

    // A correlation id that cannot be recorded as sent (a NUL) is replaced, not fatal:
    // the command runs once, and is not retried forever.
    bus.send("session.upsert", &json!({"id_session": 6, "session_name": "odd ids"}), "bad\u{0}id", None).await;
    let (_, reply) = bus.reply("session.upsert").await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(app.get(&app.service_token(), "/api/sessions/6").await.status(), 200);

    // The same message twice (a redelivery after a lost ack, or a publisher's retry):
    // run once; the second answer says so, with the current state. Any message id
    // counts, even one with a NUL (recorded escaped).
    let (_, token) = app.session_with_user(8).await;
    app.upload_ok(&token, 8, "kept.bin", b"kept").await;
    let mut purge_job = None;
    for attempt in 0..2 {
        bus.send("session.upsert", &json!({"id_session": 9, "session_name": "once"}), "up", Some("orders/9 ✓")).await;
        let (_, reply) = bus.reply("session.upsert").await;
        assert_eq!(reply["ok"], true, "{reply}");
        assert_eq!(reply["result"]["session_name"], "once", "{reply}");
        assert_eq!(reply.get("duplicate").is_some(), attempt == 1, "{reply}");

        bus.send("session.delete", &json!({"id_session": 8}), "del", Some("del\u{0}8")).await;
        let (_, reply) = bus.reply("session.delete").await;
        assert_eq!(reply["ok"], true, "not refused as not found the second time: {reply}");
        let job = reply["result"]["job_uuid"].as_str().expect("the purge job").to_owned();
        assert_eq!(*purge_job.get_or_insert(job.clone()), job, "a duplicate names the same job: {reply}");
        assert_eq!(reply.get("duplicate").is_some(), attempt == 1, "{reply}");
    }
    assert_eq!(app.scalar("SELECT count(*) FROM events WHERE stream = 'session-9'").await, 1);
    assert_eq!(app.scalar("SELECT count(*) FROM events WHERE stream = 'session-8'").await, 2);
    let causation = "SELECT count(*) FROM events WHERE metadata->>'causation_id' = ";
    assert_eq!(app.scalar(&format!("{causation} 'orders/9 ✓'")).await, 1);
    assert_eq!(app.scalar(&format!("{causation} 'del\\u{{0}}8'")).await, 2, "SessionDeleted and the purge's JobQueued");

    // A command that changed nothing is remembered too: sent again after a later
    // change, it does not undo it.
    let unchanged = json!({"id_session": 9, "session_name": "once"});
    bus.send("session.upsert", &unchanged, "no-op", Some("no-op-9")).await;
    assert!(bus.reply("session.upsert").await.1.get("duplicate").is_none());
    let renamed = app.put_session(&app.service_token(), 9, &json!({"session_name": "renamed over HTTP"})).await;
    assert_eq!(renamed.status(), 200);
    bus.send("session.upsert", &unchanged, "no-op again", Some("no-op-9")).await;
    let (_, reply) = bus.reply("session.upsert").await;
    assert_eq!(reply["duplicate"], true, "{reply}");
    assert_eq!(reply["result"]["session_name"], "renamed over HTTP", "{reply}");

    worker.abort();
    bus.delete().await;
}

/// A message id names one command as sent: with another command, another session or
/// another body, it is refused (not answered as if it had run). Through the exchange, the
/// routing key names the command, and a `type` that says otherwise is refused. The
/// sender may name itself (its service uuid) in `app_id`: it is the events' actor.
#[tokio::test]
async fn message_ids_routing_keys_and_senders_are_not_mistaken() {
    let app = TestApp::spawn().await;
    let (mut bus, worker) = consuming(&app).await;
    let service = Uuid::new_v4();
    let as_service = BasicProperties::default().with_app_id(service.to_string().as_str().into());

    bus.publish(
        Some("session.upsert"),
        json!({"id_session": 30, "session_name": "kept"}).to_string().as_bytes(),
        as_service.clone().with_message_id("reused".into()),
    )
    .await;
    assert_eq!(bus.reply("session.upsert").await.1["ok"], true);
    let actor = app.scalar_json("SELECT metadata->'actor' FROM events WHERE stream = 'session-30'").await;
    assert_eq!(actor, json!({"kind": "service", "uuid": service}));
    // The sender's retry, serialised anew (other key order, white space): the same body.
    let reserialised = br#"{ "session_name" : "kept",  "id_session" : 30 }"#;
    bus.publish(Some("session.upsert"), reserialised, as_service.clone().with_message_id("reused".into())).await;
    assert_eq!(bus.reply("session.upsert").await.1["duplicate"], true);

    // The id again, for a delete of that session, an upsert of another one, and the
    // same upsert with another name.
    bus.send("session.delete", &json!({"id_session": 30}), "reused-for-delete", Some("reused")).await;
    let (_, reply) = bus.reply("session.delete").await;
    assert_eq!(reply["ok"], false, "{reply}");
    assert!(reply["error"].as_str().unwrap().contains("already used by another command"), "{reply}");
    bus.dead_letter().await;
    bus.send("session.upsert", &json!({"id_session": 31, "session_name": "new"}), "reused-elsewhere", Some("reused"))
        .await;
    assert_eq!(bus.reply("session.upsert").await.1["ok"], false);
    bus.dead_letter().await;
    bus.send("session.upsert", &json!({"id_session": 30, "session_name": "changed"}), "reused-body", Some("reused"))
        .await;
    assert_eq!(bus.reply("session.upsert").await.1["ok"], false);
    bus.dead_letter().await;
    let session = app.get(&app.service_token(), "/api/sessions/30").await;
    assert_eq!(session.status(), 200, "deleted by a reused id");
    assert_eq!(session.json::<Value>().await.unwrap()["session_name"], "kept");
    assert_eq!(app.get(&app.service_token(), "/api/sessions/31").await.status(), 404);

    // Routing key `session.upsert`, type `session.delete`: neither is run.
    let contradicting = BasicProperties::default().with_type("session.delete".into());
    bus.publish(Some("session.upsert"), json!({"id_session": 30}).to_string().as_bytes(), contradicting).await;
    let (_, reply) = bus.reply("session.upsert").await;
    assert!(reply["error"].as_str().unwrap().contains("contradicts the routing key"), "{reply}");
    let dead_letter = bus.dead_letter().await;
    let headers = dead_letter.properties.headers().clone().unwrap();
    assert_eq!(headers.inner().get("x-assetd-command"), Some(&AMQPValue::LongString("session.upsert".into())));
    assert_eq!(app.get(&app.service_token(), "/api/sessions/30").await.status(), 200);
    // A type that agrees is fine; without `app_id` the actor is the nil uuid.
    let agreeing = BasicProperties::default().with_type("session.delete".into());
    bus.publish(Some("session.delete"), json!({"id_session": 30}).to_string().as_bytes(), agreeing).await;
    assert_eq!(bus.reply("session.delete").await.1["ok"], true);
    let actor = app
        .scalar_json("SELECT metadata->'actor' FROM events WHERE stream = 'session-30' AND type = 'SessionDeleted'")
        .await;
    assert_eq!(actor, json!({"kind": "service", "uuid": Uuid::nil()}));

    worker.abort();
    bus.delete().await;
}

/// `assetd serve` consuming commands on `prefix` (the real binary: its thread stacks
/// are what a hostile command tests).
fn commands_process(app: &TestApp, prefix: &str, data_dir: &std::path::Path) -> tokio::process::Child {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    tokio::process::Command::new(env!("CARGO_BIN_EXE_assetd"))
        .arg("serve")
        .env("ASSETD_DATABASE_URL", &app.db.url)
        .env("ASSETD_JWT_SECRET", crate::helpers::JWT_SECRET)
        .env("ASSETD_URL_SIGNING_KEY", "k")
        .env("ASSETD_LISTEN", format!("127.0.0.1:{port}"))
        .env("ASSETD_DATA_DIR", data_dir)
        .env("ASSETD_AMQP_URL", amqp_url())
        .env("ASSETD_AMQP_PREFIX", prefix)
        .env("ASSETD_RELAY", "false")
        .env("ASSETD_COMMANDS", "true")
        .env("ASSETD_LOG", "warn")
        .env_remove("RUST_MIN_STACK")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Commands built to break the consumer: headers nested 17,000 tables deep
/// (parsed recursively by the AMQP client), a reason that would quote 140 KB of input,
/// headers filling most of a frame (which, copied into the dead letter with the
/// reason, would exceed the broker's frame size and cost the whole connection). Each is
/// dead-lettered, the process lives, and the valid command after them runs.
#[tokio::test]
async fn hostile_commands_are_dead_lettered_without_harm() {
    // This process's AMQP client serialises the nested headers recursively too: its
    // I/O threads get a large stack from .cargo/config.toml.
    let app = TestApp::spawn().await;
    let mut bus = Bus::declare(commands_config(&app)).await;
    let data_dir = tempfile::tempdir().unwrap();
    let mut process = commands_process(&app, &bus.config.prefix, data_dir.path());
    let publish = |body: Vec<u8>, headers: FieldTable, correlation_id: &'static str| {
        let properties = BasicProperties::default().with_headers(headers).with_correlation_id(correlation_id.into());
        let bus = &bus;
        async move { bus.publish(Some("session.upsert"), &body, properties).await }
    };

    // 17,000 levels of 7 bytes: close to the broker's 128 KiB frame (1,500 used to
    // crash the process).
    let mut nested = FieldTable::default();
    for _ in 0..17_000 {
        let mut outer = FieldTable::default();
        outer.insert("n".into(), AMQPValue::FieldTable(nested));
        nested = outer;
    }
    publish(b"not json".to_vec(), nested, "nested").await;
    let long_input = json!({"id_session": 1, "session_name": ["A".repeat(140_000)]}).to_string().into_bytes();
    publish(long_input, FieldTable::default(), "long").await;
    let mut padded = FieldTable::default();
    padded.insert("pad".into(), AMQPValue::LongString("h".repeat(130_000).as_str().into()));
    publish(b"not json".to_vec(), padded, "padded").await;
    publish(
        json!({"id_session": 3, "session_name": "after them"}).to_string().into_bytes(),
        FieldTable::default(),
        "ok",
    )
    .await;

    let mut answered = std::collections::HashMap::new();
    for _ in 0..4 {
        let (correlation_id, reply) = bus.reply("session.upsert").await;
        answered.insert(correlation_id, reply);
    }
    for refused in ["nested", "long", "padded"] {
        assert_eq!(answered[refused]["ok"], false, "{refused}: {}", answered[refused]);
        assert!(answered[refused]["error"].as_str().unwrap().len() <= 1100, "{refused}: error not bounded");
        let dead_letter = bus.dead_letter().await;
        let headers = dead_letter.properties.headers().clone().unwrap();
        assert!(headers.inner().contains_key("x-assetd-error"), "{refused}");
        assert_eq!(headers.inner().get("x-assetd-command"), Some(&AMQPValue::LongString("session.upsert".into())));
    }
    assert_eq!(answered["ok"]["ok"], true, "{}", answered["ok"]);
    assert_eq!(app.get(&app.service_token(), "/api/sessions/3").await.status(), 200);
    assert!(process.try_wait().unwrap().is_none(), "assetd died");

    process.kill().await.unwrap();
    bus.delete().await;
}

/// A process whose database is unreachable takes no commands (they would only go back
/// to the queue, late and out of order): they wait for a process that can run them.
#[tokio::test]
async fn a_process_without_its_database_leaves_commands_to_others() {
    use assetd::app::{App, ComponentState};
    use assetd::auth::Authenticator;
    use assetd::blobs::BlobStore;
    use assetd::config::DatabaseConfig;

    let prefix = format!("assetd_test_{}", Uuid::new_v4().simple());
    // A pool pointed at a closed port stands in for a database that went away.
    let database =
        DatabaseConfig { database_url: "postgres://postgres@127.0.0.1:1/assetd".into(), database_pool_size: 2 };
    let data_dir = tempfile::tempdir().unwrap();
    let cut_off = App::new(
        database.pool().unwrap(),
        BlobStore::open(data_dir.path()).await.unwrap(),
        Authenticator::new(crate::helpers::JWT_SECRET),
        60,
    );
    let config = |app: &App| assetd::commands::CommandsConfig {
        broker: assetd::broker::Broker::start(&amqp_url(), app.messaging.clone()),
        prefix: prefix.clone(),
        import_policy: assetd::app::jobs::JobPolicy { max_attempts: 3 },
    };
    let cut_off_config = config(&cut_off);
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    assetd::commands::declare(&channel, &cut_off_config).await.unwrap();
    let stranded = tokio::spawn(assetd::commands::run(cut_off.clone(), cut_off_config.clone(), never_stop()));
    let body = json!({"id_session": 4, "session_name": "waits"}).to_string();
    channel
        .basic_publish(
            cut_off_config.queue().as_str().into(),
            "session.upsert".into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    let queue =
        channel.queue_declare(cut_off_config.queue().as_str().into(), passive, FieldTable::default()).await.unwrap();
    assert_eq!(queue.message_count(), 1, "the command was taken by a process that cannot run it");
    assert_eq!(cut_off.messaging.commands(), ComponentState::Connecting);

    let app = TestApp::spawn().await;
    let healthy = tokio::spawn(assetd::commands::run(app.ctx.app.clone(), config(&app.ctx.app), never_stop()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while app.get(&app.service_token(), "/api/sessions/4").await.status() != 200 {
        assert!(tokio::time::Instant::now() < deadline, "the healthy process never ran the command");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    stranded.abort();
    healthy.abort();
    for queue in [cut_off_config.queue(), cut_off_config.dead_queue()] {
        let _ = channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await;
    }
    let _ = channel.exchange_delete(cut_off_config.queue().as_str().into(), ExchangeDeleteOptions::default()).await;
    let _ = connection.close(200, "done".into()).await;
}

/// Two copies of one message run at once by two processes (a redelivery while the
/// first copy is still running): one runs, the other is answered as a duplicate, not
/// refused because the session it deletes is gone.
#[tokio::test]
async fn copies_of_one_message_running_at_once_are_answered_as_one() {
    let app = TestApp::spawn().await;
    let mut bus = Bus::declare(commands_config(&app)).await;
    let data_dir = tempfile::tempdir().unwrap();
    let database = assetd::config::DatabaseConfig { database_url: app.db.url.clone(), database_pool_size: 4 };
    let other_process = assetd::app::App::new(
        database.pool().unwrap(),
        assetd::blobs::BlobStore::open(data_dir.path()).await.unwrap(),
        assetd::auth::Authenticator::new(crate::helpers::JWT_SECRET),
        60,
    );
    let other_config = assetd::commands::CommandsConfig {
        broker: assetd::broker::Broker::start(&amqp_url(), other_process.messaging.clone()),
        prefix: bus.config.prefix.clone(),
        import_policy: assetd::app::jobs::JobPolicy { max_attempts: 3 },
    };
    let workers = [
        tokio::spawn(assetd::commands::run(app.ctx.app.clone(), bus.config.clone(), never_stop())),
        tokio::spawn(assetd::commands::run(other_process.clone(), other_config, never_stop())),
    ];
    for messaging in [&app.ctx.app.messaging, &other_process.messaging] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while messaging.commands() != assetd::app::ComponentState::Up {
            assert!(tokio::time::Instant::now() < deadline, "a consumer never started");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    app.session_with_user(40).await;

    // The session's stream lock, held: each copy (one per consumer, dispatched in turn)
    // waits for it; the one that gets it second finds the other's receipt.
    let mut client = app.ctx.app.pool.get().await.unwrap();
    let lock = client.transaction().await.unwrap();
    lock.execute("SELECT pg_advisory_xact_lock(hashtextextended('session-40', 0))", &[]).await.unwrap();
    let waiting =
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'";
    // Waiting without a transaction id: a transaction with one would hold back the
    // global log (every event after it) for as long as it waits.
    let waiting_with_an_id = "SELECT count(*) FROM pg_stat_activity
        WHERE datname = current_database() AND wait_event_type = 'Lock' AND backend_xid IS NOT NULL";
    for (copy, correlation_id) in ["first", "second"].into_iter().enumerate() {
        bus.send("session.delete", &json!({"id_session": 40}), correlation_id, Some("delete-40")).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while app.scalar(waiting).await != copy as i64 + 1 {
            assert!(tokio::time::Instant::now() < deadline, "the {correlation_id} copy never reached the lock");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(app.scalar(waiting_with_an_id).await, 0);
    lock.rollback().await.unwrap();

    let replies = [bus.reply("session.delete").await.1, bus.reply("session.delete").await.1];
    assert!(replies.iter().all(|reply| reply["ok"] == true), "{replies:?}");
    assert_eq!(replies.iter().filter(|reply| reply.get("duplicate").is_some()).count(), 1, "{replies:?}");
    assert_eq!(app.scalar("SELECT count(*) FROM events WHERE type = 'SessionDeleted'").await, 1);

    workers.iter().for_each(|worker| worker.abort());
    bus.delete().await;
}

/// Stopped (SIGTERM), the consumer returns and takes no more commands: what is sent
/// afterwards waits in the queue for the next process.
#[tokio::test]
async fn a_stopped_consumer_takes_no_more_commands() {
    let app = TestApp::spawn().await;
    let mut bus = Bus::declare(commands_config(&app)).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let mut worker = tokio::spawn(assetd::commands::run(app.ctx.app.clone(), bus.config.clone(), stop.clone()));
    bus.send("session.upsert", &json!({"id_session": 50, "session_name": "before"}), "before", None).await;
    assert_eq!(bus.reply("session.upsert").await.1["ok"], true);

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), &mut worker).await.expect("the consumer returns").unwrap();
    assert_eq!(app.ctx.app.messaging.commands(), assetd::app::ComponentState::Disabled);
    bus.send("session.upsert", &json!({"id_session": 51, "session_name": "after"}), "after", None).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    let queue = bus.channel.queue_declare(bus.config.queue().as_str().into(), passive, FieldTable::default()).await;
    assert_eq!(queue.unwrap().message_count(), 1, "the command sent after the stop waits in the queue");
    assert_eq!(app.get(&app.service_token(), "/api/sessions/51").await.status(), 404);
    bus.delete().await;
}

/// A command that cannot have its session's lock within the bound (5 s) goes back to
/// the queue, not to the dead letters, and runs once the lock is free.
#[tokio::test]
async fn a_command_kept_waiting_for_a_lock_goes_back_to_the_queue() {
    let app = TestApp::spawn().await;
    let (mut bus, worker) = consuming(&app).await;
    let mut client = app.ctx.app.pool.get().await.unwrap();
    let lock = client.transaction().await.unwrap();
    lock.execute("SELECT pg_advisory_xact_lock(hashtextextended('session-70', 0))", &[]).await.unwrap();

    bus.send("session.upsert", &json!({"id_session": 70, "session_name": "waited"}), "waits", Some("m-70")).await;
    tokio::time::sleep(Duration::from_secs(7)).await;
    lock.rollback().await.unwrap();
    let (correlation, reply) = bus.reply("session.upsert").await;
    assert_eq!((correlation.as_str(), &reply["ok"]), ("waits", &json!(true)), "{reply}");
    assert!(reply.get("duplicate").is_none(), "{reply}");
    let dead_letter = tokio::time::timeout(Duration::from_millis(500), bus.dead.next()).await;
    assert!(dead_letter.is_err(), "dead-lettered while it only had to wait");

    worker.abort();
    bus.delete().await;
}

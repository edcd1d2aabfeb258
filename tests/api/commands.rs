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

use crate::helpers::{amqp_url, assert_conforms, contract_validator, TestApp};

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

#[tokio::test]
async fn session_commands_run_reply_and_dead_letter_what_is_invalid() {
    let app = TestApp::spawn().await;
    let config = assetd::commands::CommandsConfig {
        broker: assetd::broker::Broker::start(&amqp_url(), app.ctx.app.messaging.clone()),
        prefix: format!("assetd_test_{}", Uuid::new_v4().simple()),
    };
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    assetd::commands::declare(&channel, &config).await.unwrap();
    let worker = tokio::spawn(assetd::commands::run(app.ctx.app.clone(), config.clone()));

    let replies = channel
        .queue_declare("".into(), QueueDeclareOptions { exclusive: true, ..Default::default() }, FieldTable::default())
        .await
        .unwrap();
    let mut replies_consumer = consumer(&channel, replies.name().as_str()).await;
    let mut dead = consumer(&channel, &config.dead_queue()).await;
    let send = |command: &'static str, body: Vec<u8>, correlation_id: &'static str| {
        let channel = &channel;
        let config = &config;
        let reply_to = replies.name().clone();
        async move {
            channel
                .basic_publish(
                    config.queue().as_str().into(),
                    command.into(),
                    BasicPublishOptions::default(),
                    &body,
                    BasicProperties::default().with_reply_to(reply_to).with_correlation_id(correlation_id.into()),
                )
                .await
                .unwrap()
                .await
                .unwrap();
        }
    };
    // A reply, checked against the command's reply schema.
    let reply_of = |delivery: &Delivery, command: &str| -> (String, Value) {
        let reply: Value = serde_json::from_slice(&delivery.data).unwrap();
        assert_conforms(&format!("schemas/commands/{command}.reply.json"), &reply);
        (delivery.properties.correlation_id().as_ref().unwrap().to_string(), reply)
    };
    // Valid commands conform to their schema; the invalid ones sent below do not.
    let upsert_5 = json!({"id_session": 5, "session_name": "via amqp"});
    assert_conforms("schemas/commands/session.upsert.json", &upsert_5);
    assert_conforms("schemas/commands/session.delete.json", &json!({"id_session": 5}));
    assert!(!contract_validator("schemas/commands/session.upsert.json").is_valid(&json!({"id_session": 5, "bogus": 1})));

    // A valid upsert: the session exists, as if registered over HTTP.
    send("session.upsert", upsert_5.to_string().into_bytes(), "c1").await;
    let (correlation, reply) = reply_of(&next(&mut replies_consumer).await, "session.upsert");
    assert_eq!(correlation, "c1");
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["result"]["id_session"], 5);
    let session = app.get(&app.service_token(), "/api/sessions/5").await;
    assert_eq!(session.status(), 200);
    assert_eq!(session.json::<Value>().await.unwrap()["session_name"], "via amqp");

    // Not JSON, then a field that does not exist: each answered, dead-lettered with why.
    for (n, body) in
        [b"not json".to_vec(), json!({"id_session": 5, "bogus": 1}).to_string().into_bytes()].into_iter().enumerate()
    {
        send("session.upsert", body.clone(), if n == 0 { "c2" } else { "c3" }).await;
        let (_, reply) = reply_of(&next(&mut replies_consumer).await, "session.upsert");
        assert_eq!(reply["ok"], false, "{reply}");
        assert!(reply["error"].as_str().unwrap().contains("invalid body"), "{reply}");
        let dead_letter = next(&mut dead).await;
        assert_eq!(dead_letter.data, body);
        let headers = dead_letter.properties.headers().clone().unwrap();
        let why = headers.inner().get("x-assetd-error").cloned();
        assert!(matches!(why, Some(AMQPValue::LongString(_))), "{why:?}");
    }

    // An unknown command (sent to the queue by its name), refused by the rules: the
    // queue is not blocked, and a valid delete that follows still runs.
    channel
        .basic_publish(
            "".into(),
            config.queue().as_str().into(),
            BasicPublishOptions::default(),
            b"{}",
            BasicProperties::default().with_type("session.explode".into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let dead_letter = next(&mut dead).await;
    assert_eq!(dead_letter.properties.kind().as_ref().unwrap().as_str(), "session.explode");
    send("session.delete", json!({"id_session": 999}).to_string().into_bytes(), "c4").await;
    let (correlation, reply) = reply_of(&next(&mut replies_consumer).await, "session.delete");
    assert_eq!((correlation.as_str(), reply["ok"].clone()), ("c4", json!(false)), "{reply}");
    next(&mut dead).await;
    send("session.delete", json!({"id_session": 5}).to_string().into_bytes(), "c5").await;
    let (correlation, reply) = reply_of(&next(&mut replies_consumer).await, "session.delete");
    assert_eq!((correlation.as_str(), reply["ok"].clone()), ("c5", json!(true)), "{reply}");
    assert_eq!(app.get(&app.service_token(), "/api/sessions/5").await.status(), 404);

    // Ids that cannot be recorded as sent (a NUL, say) are replaced, not fatal: the
    // command still runs once, and is not retried forever.
    channel
        .basic_publish(
            config.queue().as_str().into(),
            "session.upsert".into(),
            BasicPublishOptions::default(),
            json!({"id_session": 6, "session_name": "odd ids"}).to_string().as_bytes(),
            BasicProperties::default()
                .with_reply_to(replies.name().clone())
                .with_correlation_id("bad\u{0}id".into())
                .with_message_id("also bad\u{0}".into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let (_, reply) = reply_of(&next(&mut replies_consumer).await, "session.upsert");
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(app.get(&app.service_token(), "/api/sessions/6").await.status(), 200);

    // The same message twice (a redelivery after a lost ack, or a publisher's retry):
    // run once; the second answer says so, with the current state.
    let send_with_id = |command: &'static str, body: Value, message_id: &'static str| {
        let (channel, config, reply_to) = (&channel, &config, replies.name().clone());
        async move {
            channel
                .basic_publish(
                    config.queue().as_str().into(),
                    command.into(),
                    BasicPublishOptions::default(),
                    body.to_string().as_bytes(),
                    BasicProperties::default()
                        .with_reply_to(reply_to)
                        .with_correlation_id(message_id.into())
                        .with_message_id(message_id.into()),
                )
                .await
                .unwrap()
                .await
                .unwrap();
        }
    };
    let (_, token) = app.session_with_user(8).await;
    let asset = app.upload_ok(&token, 8, "kept.bin", b"kept").await;
    for attempt in 0..2 {
        send_with_id("session.upsert", json!({"id_session": 9, "session_name": format!("try {attempt}")}), "m-up")
            .await;
        let (_, reply) = reply_of(&next(&mut replies_consumer).await, "session.upsert");
        assert_eq!(reply["ok"], true, "{reply}");
        assert_eq!(reply["result"]["session_name"], "try 0", "{reply}");
        assert_eq!(reply.get("duplicate").is_some(), attempt == 1, "{reply}");

        send_with_id("session.delete", json!({"id_session": 8}), "m-del").await;
        let (_, reply) = reply_of(&next(&mut replies_consumer).await, "session.delete");
        assert_eq!(reply["ok"], true, "not refused as not found the second time: {reply}");
        assert_eq!(reply["result"]["deleted_assets"], json!([asset["asset_uuid"]]), "{reply}");
        assert_eq!(reply.get("duplicate").is_some(), attempt == 1, "{reply}");
    }
    assert_eq!(app.scalar("SELECT count(*) FROM events WHERE stream = 'session-9'").await, 1);
    assert_eq!(app.scalar("SELECT count(*) FROM events WHERE stream = 'session-8'").await, 2);

    worker.abort();
    for queue in [config.queue(), config.dead_queue()] {
        let _ = channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await;
    }
    let _ = channel.exchange_delete(config.queue().as_str().into(), ExchangeDeleteOptions::default()).await;
    let _ = connection.close(200, "done".into()).await;
}

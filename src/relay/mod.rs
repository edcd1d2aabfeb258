//! The outbox relay: publishes every committed event to RabbitMQ, in commit order, at
//! least once. It is a [`subscriber`](crate::subscriber) of the global log (checkpoint
//! `relay`, one leader across processes) that publishes each batch with publisher
//! confirms (persistent messages on the `<prefix>.events` topic exchange, EVENTS.md's
//! envelope and properties) before the checkpoint advances. Whatever fails (broker
//! gone, process killed), the next pass starts from the checkpoint again: events may be
//! published twice, never skipped.
//!
//! `JobQueued` reaches the `<prefix>.jobs` queue this way too (the queue is bound to
//! `job.queued`): a job is never lost between the database and the broker.
//!
//! At shutdown (`flush`), the relay publishes what is committed, so that the last
//! requests' events do not wait for the next start, then returns.

use std::time::Duration;

use lapin::options::{BasicPublishOptions, ExchangeDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, ExchangeKind};
use tokio_util::sync::CancellationToken;

use crate::app::ComponentState;
use crate::broker::{Broker, PooledChannel};
use crate::eventstore::RecordedEvent;
use crate::subscriber::{self, LogHandler, PartlyHandled, SubscriberError, Subscription};

/// Arbitrary, fixed: the advisory lock key only one relay may hold.
const LEADER_LOCK: i64 = 0x6173_7365_7464_0001;
const CHECKPOINT: &str = "relay";
/// How long a publish may wait for the broker's confirm.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// Where the relay reports its state (shown by `/ready`).
    pub status: std::sync::Arc<crate::app::MessagingStatus>,
    pub database_url: String,
    /// Where its channel comes from (shared with the command consumer).
    pub broker: Broker,
    /// The topic exchange events go to (`<prefix>.events`).
    pub exchange: String,
    /// The job queues to declare (and bind) before publishing, so that no `JobQueued`
    /// is published before its queue exists: `Some(prefix)`.
    pub job_queues: Option<String>,
    /// How long to wait when there is nothing to publish.
    pub idle_poll: Duration,
}

/// Runs the relay until the task is dropped, or until `flush` is cancelled and it has
/// published everything committed (see [`subscriber::run`]). A flush cannot finish
/// while the broker is down: the caller bounds it.
pub async fn run(config: RelayConfig, flush: CancellationToken) {
    let subscription = Subscription {
        checkpoint: CHECKPOINT,
        leader_lock: LEADER_LOCK,
        database_url: config.database_url.clone(),
        idle_poll: config.idle_poll,
    };
    subscriber::run(subscription, Relay { config, channel: None }, flush).await
}

struct Relay {
    config: RelayConfig,
    /// Confirm mode; for one leadership term (a broken one is discarded by the pool).
    channel: Option<PooledChannel>,
}

fn broker_error(error: impl std::fmt::Display) -> SubscriberError {
    SubscriberError::Handler(format!("broker: {error}"))
}

#[async_trait::async_trait]
impl LogHandler for Relay {
    async fn begin_term(&mut self) -> Result<(), SubscriberError> {
        self.channel = None;
        let channel = self.config.broker.channel().await.map_err(broker_error)?;
        channel
            .exchange_declare(
                self.config.exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions { durable: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .map_err(broker_error)?;
        if let Some(prefix) = &self.config.job_queues {
            crate::jobs::topology::declare(&channel, prefix).await.map_err(broker_error)?;
        }
        tracing::info!(exchange = %self.config.exchange, "relay leading");
        self.channel = Some(channel);
        Ok(())
    }

    async fn handle(&mut self, events: &[RecordedEvent]) -> Result<(), PartlyHandled> {
        let none = |error| PartlyHandled { handled: 0, error };
        let channel = self.channel.as_ref().ok_or_else(|| none(broker_error("no channel")))?;
        // Published in order on one channel (the broker keeps that order), then confirmed.
        // A broker that stops answering (or blocks us) must not hold the leadership forever.
        let silent = |what: &str| broker_error(format!("the broker did not {what} within {CONFIRM_TIMEOUT:?}"));
        let mut confirms = Vec::with_capacity(events.len());
        for event in events {
            let body = envelope(event);
            let publish = channel.basic_publish(
                self.config.exchange.as_str().into(),
                routing_key(&event.event_type).as_str().into(),
                BasicPublishOptions::default(),
                &body,
                properties(event),
            );
            let confirm = tokio::time::timeout(CONFIRM_TIMEOUT, publish)
                .await
                .map_err(|_| none(silent("take a message")))?
                .map_err(|e| none(broker_error(e)))?;
            confirms.push(confirm);
        }
        for (index, confirm) in confirms.into_iter().enumerate() {
            let partly = |error| PartlyHandled { handled: index, error };
            let confirmation = tokio::time::timeout(CONFIRM_TIMEOUT, confirm)
                .await
                .map_err(|_| partly(silent("confirm a message")))?
                .map_err(|e| partly(broker_error(e)))?;
            if !confirmation.is_ack() {
                // What was confirmed before it is not published again.
                return Err(partly(broker_error(format!("the broker refused event {}", events[index].id))));
            }
        }
        Ok(())
    }

    async fn idle(&mut self) -> Result<(), SubscriberError> {
        // Notice a lost broker now, not at the next event (and let /ready say so).
        match &self.channel {
            Some(channel) if channel.usable() => Ok(()),
            _ => Err(broker_error("the broker connection was lost")),
        }
    }

    fn report(&self, state: ComponentState) {
        self.config.status.set_relay(state);
    }
}

/// `AssetUploaded` → `asset.uploaded`: the type's words, dotted, lower case.
pub fn routing_key(event_type: &str) -> String {
    let mut key = String::with_capacity(event_type.len() + 4);
    for (i, c) in event_type.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            key.push('.');
        }
        key.extend(c.to_lowercase());
    }
    key
}

/// The message body of EVENTS.md. Published with the stored `data` and `metadata`;
/// `crate::contract` derives each event's JSON Schema from it with their types.
#[derive(Debug, serde::Serialize, schemars::JsonSchema)]
pub struct EventMessage<Data, Metadata> {
    /// Unique; also the AMQP `message_id`. Deliveries are at least once: dedupe by it.
    pub event_id: uuid::Uuid,
    pub event_type: String,
    /// `session-<id_session>` or `asset-<uuid>`.
    pub stream: String,
    /// The event's number in its stream: 1, 2, …
    pub version: i64,
    /// Position in the global log (increasing in commit order within a transaction).
    pub position: i64,
    pub recorded_at: chrono::DateTime<chrono::Utc>,
    pub data: Data,
    pub metadata: Metadata,
}

pub fn envelope(event: &RecordedEvent) -> Vec<u8> {
    serde_json::to_vec(&EventMessage {
        event_id: event.id,
        event_type: event.event_type.clone(),
        stream: event.stream.clone(),
        version: event.version,
        position: event.position,
        recorded_at: event.recorded_at,
        data: &event.data,
        metadata: &event.metadata,
    })
    .expect("JSON values serialize")
}

fn properties(event: &RecordedEvent) -> BasicProperties {
    let properties = BasicProperties::default()
        .with_message_id(event.id.to_string().into())
        .with_type(event.event_type.as_str().into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2);
    match event.metadata.get("correlation_id").and_then(|c| c.as_str()) {
        Some(correlation_id) => properties.with_correlation_id(correlation_id.into()),
        None => properties,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn routing_keys_are_the_dotted_lower_case_type() {
        assert_eq!(super::routing_key("AssetUploaded"), "asset.uploaded");
        assert_eq!(super::routing_key("SessionDeleted"), "session.deleted");
        assert_eq!(super::routing_key("JobRetryScheduled"), "job.retry.scheduled");
    }
}
